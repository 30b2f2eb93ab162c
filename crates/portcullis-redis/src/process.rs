//! [`Process`]: the process-wide state every endpoint of a storage shares (configuration,
//! Redis client, instance id, outage), and the outage's start and end.

use crate::config::{OnError, StorageConfig};
use crate::connection::{RedisClient, RECONNECT_MAX_DELAY};
use crate::error::StorageError;
use crate::outage::Outage;
use portcullis_core::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

/// A storage's background tasks, aborted when the last owner drops them.
pub(crate) type TaskSet = Vec<AbortOnDropHandle<()>>;

/// The endpoints of a process, as the outage's start and end see them (the storage's
/// registry implements it; it sits above the endpoints, which sit above this file).
pub(crate) trait EndpointSet: Send + Sync {
    /// Sets every live endpoint's fallback limit for the current outage state.
    fn fit_fallbacks(&self);
}

/// The longest wait between two recovery attempts of any process during an outage.
pub(crate) const RECOVERY_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// The first wait between two recovery attempts.
const RECOVERY_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// The process-wide state shared by the storage handle, its endpoints and its tasks.
pub(crate) struct Process {
    pub(crate) config: StorageConfig,
    pub(crate) redis: RedisClient,
    /// This process's instance id (the owner of its slot leases).
    pub(crate) instance: String,
    pub(crate) outage: Outage,
    /// Wakes the heartbeat: an outage began, or a PING succeeded during one.
    pub(crate) recover_kick: Notify,
    endpoints: Arc<dyn EndpointSet>,
}

impl Process {
    /// The state of a process connected through `redis`, with a fresh instance id.
    pub(crate) fn new(
        config: StorageConfig,
        redis: RedisClient,
        endpoints: Arc<dyn EndpointSet>,
    ) -> Self {
        Self {
            config,
            redis,
            instance: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            outage: Outage::new(),
            recover_kick: Notify::new(),
            endpoints,
        }
    }

    /// `true` while in an outage.
    pub(crate) fn is_degraded(&self) -> bool {
        self.outage.is_degraded()
    }

    /// [`is_degraded`](Self::is_degraded), sequentially consistent with the outage's start
    /// and end (for the hand-over checks of the endpoint tasks and permits).
    pub(crate) fn degraded_seqcst(&self) -> bool {
        self.outage.is_degraded_seqcst()
    }

    /// Enters an outage (once; warns once per outage) and wakes the recovery loop.
    pub(crate) fn enter_outage(&self, err: &StorageError) {
        let started = self.outage.start(|| {
            match self.config.on_error {
                OnError::Local => tracing::warn!(
                    error = %err,
                    expected_workers = self.config.expected_workers,
                    "redis storage unavailable; serving with a per-process limit (on_error: local) until it is back"
                ),
                OnError::Reject => tracing::warn!(
                    error = %err,
                    "redis storage unavailable; refusing admission-controlled requests with 503 storage_unavailable (on_error: reject)"
                ),
                OnError::Allow => tracing::warn!(
                    error = %err,
                    "redis storage unavailable; admitting every request without a limit (on_error: allow)"
                ),
            }
            if self.config.on_error == OnError::Local {
                // Before any request is routed to the fallback: the requests Redis admitted
                // still run and take their place in the per-process limit.
                self.endpoints.fit_fallbacks();
            }
        });
        if started {
            self.recover_kick.notify_one();
        }
    }

    /// Leaves the outage (the heartbeat re-registered every live slot) and opens the
    /// recovery window.
    pub(crate) fn leave_outage(&self) {
        self.outage.end(self.recovery_window(), |lasted| {
            tracing::info!(
                outage_secs = lasted.as_secs_f64(),
                "redis storage available again; live leases re-registered"
            );
            self.endpoints.fit_fallbacks();
        });
    }

    /// How long a live process may take to notice that Redis is back and re-register its
    /// slots, and at least `lease_ttl` (the time within which a live process renews its
    /// leases). Its recovery loop retries at least every [`RECOVERY_BACKOFF_CAP`], each try
    /// bounded by [`heartbeat_timeout`](Self::heartbeat_timeout); the first try after
    /// Redis returns may still fail (the connection is re-opened after up to
    /// [`RECONNECT_MAX_DELAY`]), so two waits and two tries, plus that reconnect delay.
    pub(crate) fn recovery_window(&self) -> Duration {
        let two_tries = (RECOVERY_BACKOFF_CAP + self.heartbeat_timeout()) * 2;
        self.config.lease_ttl.max(two_tries + RECONNECT_MAX_DELAY)
    }

    /// The bound of one heartbeat (or recovery try) of every endpoint.
    pub(crate) fn heartbeat_timeout(&self) -> Duration {
        self.config.timeout * 4
    }

    /// During an `on_error: local` outage: fits every endpoint's fallback limit again (the
    /// cap for the others' pre-outage requests lifts with time, not with an event).
    pub(crate) fn refit_fallbacks(&self) {
        if self.config.on_error == OnError::Local && self.is_degraded() {
            self.endpoints.fit_fallbacks();
        }
    }

    /// With `on_error: local`, during [`recovery_window`](Self::recovery_window) after an
    /// outage: the time left. Other processes may still be serving on their local share,
    /// unknown to Redis (which may have lost everything), so this process keeps to its own
    /// share until they have all re-registered; otherwise the backend would see up to
    /// `capacity` plus the others' shares.
    pub(crate) fn recovery_grace(&self) -> Option<Duration> {
        if self.config.on_error != OnError::Local {
            return None;
        }
        self.outage.recovery_left()
    }

    /// The waits between two recovery attempts of this process: from 100 ms, doubling up to
    /// a third of `lease_ttl`, itself between 100 ms and [`RECOVERY_BACKOFF_CAP`].
    pub(crate) fn recovery_backoff(&self) -> Backoff {
        let max = (self.config.lease_ttl / 3).clamp(RECOVERY_BACKOFF_INITIAL, RECOVERY_BACKOFF_CAP);
        Backoff::new(RECOVERY_BACKOFF_INITIAL, max, 2.0).expect("100 ms <= max, factor 2")
    }
}
