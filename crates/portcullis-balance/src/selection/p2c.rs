//! `p2c`: the power of two random choices (Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 2001; tower's and linkerd2-proxy's balancer) on the in-flight
//! count.
//!
//! Two distinct candidates are drawn uniformly at random and the one with fewer requests in
//! flight wins. That is O(1) whatever the number of replicas, needs no coordination between
//! callers (each reads two atomics), and keeps the maximum load within `O(log log n)` of the
//! mean instead of random choice's `O(log n / log log n)`. The random numbers come from a
//! per-thread xorshift generator: no lock, no allocation, no syscall.

use crate::replica::Replica;
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(&h as *const _ as usize);
    h.finish() | 1
}

/// A uniform random number in `0..n` (n > 0), from a per-thread xorshift64* generator.
#[inline]
pub(crate) fn below(n: usize) -> usize {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // Lemire's multiply-shift reduction (bias negligible for pool sizes).
        ((u128::from(r >> 32) * n as u128) >> 32) as usize
    })
}

#[inline]
pub(crate) fn select<T>(candidates: &[Arc<Replica<T>>]) -> &Arc<Replica<T>> {
    let n = candidates.len();
    if n == 1 {
        return &candidates[0];
    }
    let i = below(n);
    let mut j = below(n - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (&candidates[i], &candidates[j]);
    if b.inflight() < a.inflight() {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::below;

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            let v = below(7);
            seen[v] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
    }
}
