//! [`AdaptiveLease`]: which process computes an endpoint's shared adaptive limit.

use crate::scripts::{Keys, EXTEND_SCRIPT};
use crate::storage::RedisStorage;
use futures_util::future::BoxFuture;
use portcullis_admission::adaptive::LimitLease;
use std::fmt;
use std::time::Duration;

/// How many windows a lease outlives its last renewal.
pub const LEASE_WINDOWS: u32 = 3;

/// The lease on computing one endpoint's adaptive limit, for
/// [`AdaptiveCapacity::shared`](portcullis_admission::adaptive::AdaptiveCapacity::shared).
///
/// # One writer with a lease, rather than merged samples
///
/// Every process admits requests against the one capacity stored in Redis (each acquire
/// script reads it, and a change reaches every process at once as a `c:<n>` notification),
/// so there is only ever one limit in force. What has to be decided is who moves it. Two
/// designs were possible:
///
/// * **merge samples**: every process pushes its window (a latency histogram, overload
///   counts) to Redis and one computation runs over the sum. That costs a write of a few
///   hundred counters per process per window, a merge step, and still needs one process to
///   run the controller (its state: the smoothed limit, `min_rtt` and its schedule), so a
///   leader is needed anyway;
/// * **one writer**: the process holding a short lease (`SET NX PX`, renewed every window,
///   as the probe lock of `get_or_probe` is) runs its controller over its own samples and
///   stores the limit; the others apply it and keep their controllers in step with it.
///
/// The second is chosen. The quantities the controllers use are properties of the backend,
/// not of one process's share: latency (`sample_rtt`, `min_rtt`) is the same whichever
/// process measures it, an overloaded backend fails every process's requests, and the
/// in-flight count the growth rule compares with the limit is the global count Redis keeps
/// (`active`). With requests spread over the processes, one process's sample of them is a
/// random sample of all. It costs one round trip per window for the holder (`PEXPIRE` of its
/// lease) and one for each other process (a failed `SET NX`), and no extra state in Redis.
///
/// # A process that dies
///
/// The lease lasts [`LEASE_WINDOWS`] windows. A holder that dies (or loses Redis) stops
/// renewing it; it expires, and the next process to try (each tries every window) takes it
/// and continues from the limit in force, measuring `min_rtt` first. The limit is not
/// frozen for longer than the lease. Meanwhile every process keeps admitting against the
/// stored limit, which the dead process no longer changes.
#[derive(Clone)]
pub struct AdaptiveLease {
    storage: RedisStorage,
    key: String,
    ttl: Duration,
}

impl fmt::Debug for AdaptiveLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLease")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl RedisStorage {
    /// The lease on computing `endpoint`'s adaptive limit, for a controller updating it
    /// every `window`: it lasts [`LEASE_WINDOWS`] windows (at least 100 ms) after its last
    /// renewal.
    pub fn adaptive_lease(&self, endpoint: &str, window: Duration) -> AdaptiveLease {
        let keys = Keys::new(&self.process.config.key_prefix, endpoint);
        AdaptiveLease {
            storage: self.clone(),
            key: keys.adaptive_lease,
            ttl: (window * LEASE_WINDOWS).max(Duration::from_millis(100)),
        }
    }
}

impl AdaptiveLease {
    /// Renews the lease if this process holds it, else takes it if nobody does.
    pub async fn try_hold(&self) -> bool {
        let process = &self.storage.process;
        let ttl = self.ttl.as_millis() as u64;
        let mut extend = EXTEND_SCRIPT.key(&self.key);
        extend.arg(&process.instance).arg(ttl);
        if let Ok(1) = process.redis.invoke::<i64>(&extend).await {
            return true;
        }
        let won: Result<Option<String>, _> = process
            .redis
            .query(
                redis::cmd("SET")
                    .arg(&self.key)
                    .arg(&process.instance)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl),
            )
            .await;
        matches!(won, Ok(Some(_)))
    }
}

impl LimitLease for AdaptiveLease {
    fn renew(&self) -> BoxFuture<'static, bool> {
        let lease = self.clone();
        Box::pin(async move { lease.try_hold().await })
    }
}
