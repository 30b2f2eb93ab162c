//! [`Readiness`]: the cached result of the Redis PING loop.
//!
//! Reference: the `HealthServer` of the Stargazer services (`ping_interval`,
//! `failure_threshold`): a background loop PINGs Redis and caches one flag, which turns
//! false only after `failure_threshold` consecutive failures (so a transient blip does not
//! pull the instance out of rotation) and true again on the first success. Probe handlers
//! read the flag and never touch Redis.

use crate::process::TaskSet;
use portcullis_core::HealthSource;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) struct ReadyState {
    ready: AtomicBool,
    consecutive_failures: AtomicU32,
    threshold: u32,
    pings: AtomicU64,
    /// Round trip of the last successful PING in microseconds, plus 1 (0: none yet).
    last_latency_us: AtomicU64,
}

impl ReadyState {
    pub(crate) fn new(threshold: u32) -> Self {
        Self {
            ready: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            pings: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
        }
    }

    /// Records the round trip of a successful PING.
    pub(crate) fn record_latency(&self, rtt: std::time::Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1);
        self.last_latency_us.store(us + 1, Ordering::Release);
    }

    /// Records one PING result.
    pub(crate) fn record(&self, ok: bool) {
        self.pings.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.consecutive_failures.store(0, Ordering::Release);
            if !self.ready.swap(true, Ordering::AcqRel) {
                tracing::info!("redis answers PING again: ready");
            }
        } else {
            let n = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.threshold && self.ready.swap(false, Ordering::AcqRel) {
                tracing::warn!(consecutive_failures = n, "redis PING failing: not ready");
            }
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The cached Redis readiness of a [`RedisStorage`](crate::RedisStorage) (no I/O to read).
///
/// Wire it to `/readyz`: 200 while [`is_ready`](Readiness::is_ready), 503 otherwise. It also
/// implements [`HealthSource`]. Holding it keeps the PING loop running.
#[derive(Clone)]
pub struct Readiness {
    state: Arc<ReadyState>,
    _tasks: Arc<TaskSet>,
}

impl Readiness {
    pub(crate) fn new(state: Arc<ReadyState>, tasks: Arc<TaskSet>) -> Self {
        Self {
            state,
            _tasks: tasks,
        }
    }

    /// `false` only after `failure_threshold` consecutive failed PINGs; `true` again on the
    /// first success. Starts `true`.
    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }

    /// The current run of failed PINGs.
    pub fn consecutive_failures(&self) -> u32 {
        self.state.consecutive_failures.load(Ordering::Acquire)
    }

    /// PINGs sent so far (successful or not).
    pub fn pings(&self) -> u64 {
        self.state.pings.load(Ordering::Relaxed)
    }

    /// The round trip of the last successful PING (`None` before the first one).
    pub fn last_ping_latency(&self) -> Option<std::time::Duration> {
        match self.state.last_latency_us.load(Ordering::Acquire) {
            0 => None,
            us => Some(std::time::Duration::from_micros(us - 1)),
        }
    }
}

impl HealthSource for Readiness {
    fn can_serve(&self) -> bool {
        self.is_ready()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .field("consecutive_failures", &self.consecutive_failures())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_then_first_success() {
        let s = ReadyState::new(3);
        assert!(s.is_ready());
        s.record(false);
        s.record(false);
        assert!(s.is_ready(), "two failures < threshold 3");
        s.record(false);
        assert!(!s.is_ready());
        s.record(false);
        assert!(!s.is_ready());
        s.record(true);
        assert!(s.is_ready(), "back on the first success");
        s.record(false);
        s.record(true);
        s.record(false);
        s.record(false);
        assert!(s.is_ready(), "failures are consecutive only");
    }
}
