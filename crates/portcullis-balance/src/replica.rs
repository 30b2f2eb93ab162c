//! The core types of a pool: a [`Replica`] and its [`Tier`].
//!
//! A replica is an `Arc` holding its key (base URL or any id), tier, the user's payload `T`
//! (a tower service, an upstream address, ...), a [`HealthState`] and an in-flight counter.
//! The selection policies (`selection/*`) depend only on this file; the registry
//! ([`crate::registry`]) owns the replicas and the view built from them.

use crate::sync::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use portcullis_health::{HealthState, Transition};
use serde::Serialize;
use std::fmt;
use std::sync::{Arc, Weak};
use tokio::time::Instant;

/// What a replica tells its registry when a live response moves it between categories
/// (healthy, ejected, other): rebuild the view that requests pick from. Implemented by the
/// registry; a replica holds it weakly, so a replica outliving its registry refreshes nothing.
pub(crate) trait RefreshView: Send + Sync {
    /// Rebuilds the view (concurrent callers combine).
    fn refresh(&self);
}

/// The tier of a replica: primaries are preferred while any of them is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Preferred.
    Primary,
    /// Used when no primary is healthy.
    Secondary,
}

impl Tier {
    /// `Primary` when `primary`, else `Secondary` (the `upstreams[].primary` flag).
    pub const fn from_primary(primary: bool) -> Self {
        if primary {
            Tier::Primary
        } else {
            Tier::Secondary
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            Tier::Primary => 0,
            Tier::Secondary => 1,
        }
    }
}

/// One replica of a pool.
pub struct Replica<T> {
    pub(crate) key: Arc<str>,
    pub(crate) tier: Tier,
    target: T,
    pub(crate) health: Arc<HealthState>,
    inflight: AtomicUsize,
    /// Share of the traffic under `routing_strategy: weighted` (at least 1).
    weight: u32,
    /// The smooth weighted round robin's running score (`selection::weighted`).
    current_weight: AtomicI64,
    pub(crate) removed: AtomicBool,
    registry: Weak<dyn RefreshView>,
}

impl<T> fmt::Debug for Replica<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("key", &self.key)
            .field("tier", &self.tier)
            .field("status", &self.health.status())
            .field("inflight", &self.inflight())
            .field("weight", &self.weight)
            .finish()
    }
}

impl<T> Replica<T> {
    /// A replica with no request in flight, reporting category changes to `registry`.
    pub(crate) fn new(
        key: Arc<str>,
        tier: Tier,
        target: T,
        health: Arc<HealthState>,
        registry: Weak<dyn RefreshView>,
    ) -> Self {
        Self {
            key,
            tier,
            target,
            health,
            inflight: AtomicUsize::new(0),
            weight: 1,
            current_weight: AtomicI64::new(0),
            removed: AtomicBool::new(false),
            registry,
        }
    }

    /// This replica with `weight` (0 counts as 1).
    pub(crate) fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// The share of the traffic it gets under `routing_strategy: weighted`, relative to the
    /// other candidates (1 unless added with
    /// [`ReplicaRegistry::add_weighted`](crate::ReplicaRegistry::add_weighted)).
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The smooth weighted round robin's running score.
    #[inline]
    pub(crate) fn current_weight(&self) -> &AtomicI64 {
        &self.current_weight
    }

    /// The key (base URL or id).
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// The tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The payload given to [`ReplicaRegistry::add`](crate::ReplicaRegistry::add).
    pub fn target(&self) -> &T {
        &self.target
    }

    /// The health state machine.
    pub fn health(&self) -> &Arc<HealthState> {
        &self.health
    }

    /// Requests in flight.
    #[inline]
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// `true` once removed from its registry.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Takes an in-flight slot unless the replica was removed.
    #[inline]
    pub(crate) fn acquire(&self) -> bool {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.removed.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn release(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Applies a live response outcome and, on a category change, refreshes the view.
    pub(crate) fn record_response(&self, success: bool, lease: bool) {
        if self.is_removed() {
            return; // Removed mid-flight: the outcome concerns nobody.
        }
        let t = if success && !lease {
            // The common case: no clock read, usually no write.
            self.health.record_success();
            None
        } else {
            self.health.record_response(success, lease, Instant::now())
        };
        if let Some(t) = t {
            tracing::info!(replica = %self.key, from = ?t.from, to = ?t.to, "replica health changed (live traffic)");
            if changes_category(t) {
                if let Some(inner) = self.registry.upgrade() {
                    inner.refresh();
                }
            }
        }
    }
}

pub(crate) fn changes_category(t: Transition) -> bool {
    t.from.is_healthy() != t.to.is_healthy() || t.from.is_ejected() != t.to.is_ejected()
}
