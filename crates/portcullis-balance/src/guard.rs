use crate::replica::{Replica, Tier};
use std::fmt;
use std::sync::Arc;

/// The in-flight slot of one request on one replica (RAII).
///
/// Returned by [`ReplicaRegistry::pick`](crate::ReplicaRegistry::pick). Dropping it releases
/// the slot — also when the request is cancelled — and, if this request was an ejected
/// replica's recovery probe and no outcome was recorded, gives the lease back so that the
/// next request may probe. Releasing the slot of a removed replica is a no-op for the pool.
pub struct InflightGuard<T> {
    replica: Arc<Replica<T>>,
    lease: bool,
    recorded: bool,
}

impl<T> fmt::Debug for InflightGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InflightGuard")
            .field("replica", &self.replica.key())
            .field("lease", &self.lease)
            .field("recorded", &self.recorded)
            .finish()
    }
}

impl<T> InflightGuard<T> {
    pub(crate) fn new(replica: Arc<Replica<T>>, lease: bool) -> Self {
        Self {
            replica,
            lease,
            recorded: false,
        }
    }

    /// The chosen replica's payload.
    pub fn target(&self) -> &T {
        self.replica.target()
    }

    /// The chosen replica's key.
    pub fn key(&self) -> &Arc<str> {
        self.replica.key()
    }

    /// The chosen replica's tier.
    pub fn tier(&self) -> Tier {
        self.replica.tier()
    }

    /// The chosen replica.
    pub fn replica(&self) -> &Arc<Replica<T>> {
        &self.replica
    }

    /// `true` when this request is an ejected replica's single recovery probe.
    pub fn is_probe(&self) -> bool {
        self.lease
    }

    /// Records the request's outcome for passive outlier ejection (first call wins; later
    /// calls are ignored). A no-op if the replica was removed meanwhile.
    pub fn record(&mut self, success: bool) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.replica.record_response(success, self.lease);
    }

    /// `true` once an outcome was recorded.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }
}

impl<T> Drop for InflightGuard<T> {
    fn drop(&mut self) {
        if self.lease && !self.recorded {
            self.replica.health().abandon_lease();
        }
        self.replica.release();
    }
}
