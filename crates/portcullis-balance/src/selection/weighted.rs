//! `weighted`: smooth weighted round robin (nginx's `ngx_http_upstream_get_peer`, the
//! algorithm of its `weight=` parameter), lock-free.
//!
//! Every replica keeps a running score. A pick adds each candidate's weight to its score,
//! chooses the candidate with the highest score (the first on a tie) and takes the sum of
//! the weights off the winner's score. Over any run of `W = Σ weight` consecutive picks each
//! replica is chosen exactly `weight` times, spread out rather than in bursts: weights 5, 1,
//! 1 give `a a b a c a a`, where a plain weighted round robin gives `a a a a a b c`.
//!
//! Smooth WRR rather than a weighted power of two choices: it splits the traffic by weight
//! exactly (every `W` picks), where a weighted p2c does so only on average and only while
//! the replicas are equally fast; and a replica of weight 1 beside one of weight 100 gets its
//! turn at a fixed interval, not by chance.
//!
//! Lock-free: the scores are atomics, each changed by `fetch_add` / `fetch_sub`, so
//! concurrent picks never wait for each other. They may both read a score before either
//! takes the sum off it and pick the same replica; the sums still stay exact, because every
//! pick adds `W` in total and takes `W` off, so a replica's score is always
//! `picks × weight − W × (times chosen)`. A replica picked too often goes negative and is
//! passed over until the others catch up: the shares converge to the weights whatever the
//! interleaving. A pick costs one atomic add per candidate: O(n), no allocation. For pools
//! of hundreds of replicas `p2c` (O(1)) is the cheaper choice. A replica's score is kept while
//! it is out of the candidate set (unhealthy, another tier serving), and counts again when it
//! returns.

use crate::replica::Replica;
use crate::sync::Ordering;
use std::sync::Arc;

#[inline]
pub(crate) fn select<T>(candidates: &[Arc<Replica<T>>]) -> &Arc<Replica<T>> {
    if candidates.len() == 1 {
        return &candidates[0];
    }
    let mut best = &candidates[0];
    let mut best_score = i64::MIN;
    let mut total = 0i64;
    for r in candidates {
        let weight = i64::from(r.weight());
        total += weight;
        let score = r.current_weight().fetch_add(weight, Ordering::Relaxed) + weight;
        if score > best_score {
            best = r;
            best_score = score;
        }
    }
    best.current_weight().fetch_sub(total, Ordering::Relaxed);
    best
}
