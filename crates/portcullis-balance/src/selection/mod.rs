//! The selection policies, one file per algorithm (as pingora's `selection/`).
//!
//! Each policy chooses among a non-empty slice of candidates — the healthy replicas of the
//! best tier with a healthy member, precomputed in the registry's snapshot — with no lock
//! and no allocation: `first-healthy`, `round-robin` and `p2c` in O(1), `least-connections`
//! and `weighted` in one O(n) pass over the candidates.

pub(crate) mod first_healthy;
pub(crate) mod least_connections;
pub(crate) mod p2c;
pub(crate) mod round_robin;
pub(crate) mod weighted;

use crate::config::RoutingStrategy;
use crate::replica::Replica;
use crate::sync::AtomicUsize;
use std::sync::Arc;

/// Chooses one of `candidates` (non-empty) with `strategy`.
#[inline]
pub(crate) fn select<'a, T>(
    strategy: RoutingStrategy,
    candidates: &'a [Arc<Replica<T>>],
    rr: &AtomicUsize,
) -> &'a Arc<Replica<T>> {
    match strategy {
        RoutingStrategy::FirstHealthy => first_healthy::select(candidates),
        RoutingStrategy::RoundRobin => round_robin::select(candidates, rr),
        RoutingStrategy::P2c => p2c::select(candidates),
        RoutingStrategy::LeastConnections => least_connections::select(candidates, rr),
        RoutingStrategy::Weighted => weighted::select(candidates),
    }
}
