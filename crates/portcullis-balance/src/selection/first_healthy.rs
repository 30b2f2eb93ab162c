//! `first-healthy`: the first healthy primary, else the first healthy non-primary, in
//! insertion order. The candidates are already the healthy
//! members of the best tier, in insertion order, so this is the first of them.

use crate::replica::Replica;
use std::sync::Arc;

#[inline]
pub(crate) fn select<T>(candidates: &[Arc<Replica<T>>]) -> &Arc<Replica<T>> {
    &candidates[0]
}
