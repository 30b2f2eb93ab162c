//! `least-connections`: the candidate with the fewest requests in flight, an exact minimum
//! over every candidate (nginx's `least_conn`, Envoy's `LEAST_REQUEST` with all hosts
//! compared), where [`p2c`](super::p2c) compares only two random ones.
//!
//! One pass over the candidates reads each in-flight counter once: O(n), no lock, no
//! allocation. The pass stops early at a replica with nothing in flight, since none can have
//! fewer, so a lightly loaded pool costs O(1). Ties rotate: the pass starts at a shared
//! counter taken modulo the number of candidates (as `round-robin` does) and keeps the first
//! minimum it meets, so equally loaded replicas (an idle pool, a run of quick requests) take
//! turns instead of the first one getting everything.
//!
//! The minimum is exact at the moment each counter is read; two requests picking at the same
//! instant may both see the same replica as the least loaded, as with any balancer that does
//! not serialise its picks.

use crate::replica::Replica;
use crate::sync::{AtomicUsize, Ordering};
use std::sync::Arc;

#[inline]
pub(crate) fn select<'a, T>(
    candidates: &'a [Arc<Replica<T>>],
    rr: &AtomicUsize,
) -> &'a Arc<Replica<T>> {
    let n = candidates.len();
    if n == 1 {
        return &candidates[0];
    }
    let start = rr.fetch_add(1, Ordering::Relaxed) % n;
    let (after, before) = candidates.split_at(start);
    let mut best = &before[0];
    let mut least = usize::MAX;
    for r in before.iter().chain(after) {
        let inflight = r.inflight();
        if inflight < least {
            best = r;
            least = inflight;
            if inflight == 0 {
                break;
            }
        }
    }
    best
}
