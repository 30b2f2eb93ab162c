//! `round-robin`: a shared counter, taken modulo the number of healthy replicas of the best
//! tier. When the candidate set changes the rotation continues from wherever the counter is.

use crate::replica::Replica;
use crate::sync::{AtomicUsize, Ordering};
use std::sync::Arc;

#[inline]
pub(crate) fn select<'a, T>(
    candidates: &'a [Arc<Replica<T>>],
    rr: &AtomicUsize,
) -> &'a Arc<Replica<T>> {
    let i = rr.fetch_add(1, Ordering::Relaxed) % candidates.len();
    &candidates[i]
}
