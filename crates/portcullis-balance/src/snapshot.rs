use crate::config::RoutingStrategy;
use crate::registry::Tier;
use portcullis_health::HealthCounters;
use serde::Serialize;

/// The state of a pool at one instant, for `/balancer/stats` and metrics (built with no I/O).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// The routing strategy.
    pub strategy: RoutingStrategy,
    /// `true` while panic mode routes to every replica.
    pub panic: bool,
    /// Replicas whose status is healthy.
    pub healthy: usize,
    /// All replicas.
    pub total: usize,
    /// Per replica, in insertion order.
    pub replicas: Vec<ReplicaSnapshot>,
}

/// One replica in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaSnapshot {
    /// The key (base URL).
    pub url: String,
    /// The tier.
    pub tier: Tier,
    /// `tier == Primary`.
    pub primary: bool,
    /// Status is healthy.
    pub healthy: bool,
    /// Status is ejected or probing (passive outlier ejection).
    pub ejected: bool,
    /// Requests in flight.
    pub inflight: usize,
    /// Status, streak counters, ejection count and time left, last probe latency (seconds).
    #[serde(flatten)]
    pub counters: HealthCounters,
}
