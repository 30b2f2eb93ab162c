//! [`Limiter`]: one endpoint's admission state, shared by every service built from a layer.

use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use crate::stats::{EndpointStats, Metrics};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

const UNBOUNDED: usize = usize::MAX;

/// One endpoint's admission state: its [`CapacitySource`], its `queue_timeout` and
/// `max_queue` settings, and its counters.
///
/// Layers share a limiter through an `Arc`, so every connection's service counts against the
/// same slots. The settings are atomics: they can be changed at runtime and the next request
/// sees the change.
pub struct Limiter<C = LocalCapacity> {
    source: C,
    queue_timeout_nanos: AtomicU64,
    max_queue: AtomicUsize,
    pub(crate) metrics: Metrics,
}

/// The default `queue_timeout`: 30 seconds.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

impl Limiter<LocalCapacity> {
    /// An in-process limiter with `capacity` slots.
    pub fn local(capacity: usize) -> Self {
        Self::new(LocalCapacity::new(capacity))
    }
}

impl<C: CapacitySource> Limiter<C> {
    /// A limiter over `source`, with the default `queue_timeout` (30 s) and an unbounded
    /// queue.
    pub fn new(source: C) -> Self {
        Self {
            source,
            queue_timeout_nanos: AtomicU64::new(nanos(DEFAULT_QUEUE_TIMEOUT)),
            max_queue: AtomicUsize::new(UNBOUNDED),
            metrics: Metrics::default(),
        }
    }

    /// Sets `queue_timeout` (builder form).
    pub fn with_queue_timeout(self, timeout: Duration) -> Self {
        self.set_queue_timeout(timeout);
        self
    }

    /// Sets `max_queue` (builder form; `None` = unbounded).
    pub fn with_max_queue(self, max_queue: Option<usize>) -> Self {
        self.set_max_queue(max_queue);
        self
    }

    /// The capacity source.
    pub fn source(&self) -> &C {
        &self.source
    }

    /// Changes the capacity at runtime (see [`CapacitySource::set_capacity`]): queued
    /// requests stay queued, active ones keep their slots.
    pub fn set_capacity(&self, capacity: usize) {
        self.source.set_capacity(capacity);
    }

    /// How long a request may wait for a slot before it is refused (504).
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_nanos(self.queue_timeout_nanos.load(Ordering::Relaxed))
    }

    /// Changes `queue_timeout` for requests arriving from now on.
    pub fn set_queue_timeout(&self, timeout: Duration) {
        self.queue_timeout_nanos
            .store(nanos(timeout), Ordering::Relaxed);
    }

    /// The queue bound (`None` = unbounded).
    pub fn max_queue(&self) -> Option<usize> {
        match self.max_queue.load(Ordering::Relaxed) {
            UNBOUNDED => None,
            n => Some(n),
        }
    }

    /// Changes the queue bound for requests arriving from now on (`None` = unbounded).
    pub fn set_max_queue(&self, max_queue: Option<usize>) {
        let v = match max_queue {
            None => UNBOUNDED,
            Some(n) => n.min(UNBOUNDED - 1),
        };
        self.max_queue.store(v, Ordering::Relaxed);
    }

    /// A snapshot of this limiter's state and counters (no I/O).
    pub fn stats(&self) -> EndpointStats {
        let capacity = self.source.capacity();
        let active = self.source.active();
        let m = &self.metrics;
        EndpointStats {
            capacity,
            active_requests: active,
            available_slots: capacity.saturating_sub(active),
            queue_depth: self.source.queue_depth(),
            queue_timeout: self.queue_timeout().as_secs_f64(),
            max_queue: self.max_queue(),
            method: None,
            admitted: m.admitted.load(Ordering::Relaxed),
            rejected_503: m.rejected_503.load(Ordering::Relaxed),
            timed_out_504: m.timed_out_504.load(Ordering::Relaxed),
            deadline_exceeded: m.deadline_exceeded.load(Ordering::Relaxed),
            cancelled: m.cancelled.load(Ordering::Relaxed),
            local_active: self.source.local_active(),
            held_after_cancel: m.held_after_cancel.load(Ordering::Relaxed),
            held_cut: m.held_cut.load(Ordering::Relaxed),
            queue_wait: m.queue_wait(),
            adaptive: self.source.adaptive_stats(),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<C: CapacitySource + fmt::Debug> fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("source", &self.source)
            .field("queue_timeout", &self.queue_timeout())
            .field("max_queue", &self.max_queue())
            .finish()
    }
}
