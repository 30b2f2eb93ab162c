//! Live admission statistics: lock-free counters and a fixed-bucket queue-wait histogram,
//! and their serializable snapshots (the `/balancer/stats` shape).
//!
//! Reading a snapshot does no I/O: every number is an atomic load (or, for a shared
//! capacity source, its cached value).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds, inclusive) of the queue-wait histogram buckets; a last, implicit
/// bucket counts everything above the last bound.
pub const QUEUE_WAIT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const N_BUCKETS: usize = QUEUE_WAIT_BUCKETS.len() + 1;

/// The counters of one limiter. Admissions that did not wait at all are only counted in
/// `admitted` (one atomic add on the fast path); the histogram derives them.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) admitted: AtomicU64,
    pub(crate) rejected_503: AtomicU64,
    pub(crate) timed_out_504: AtomicU64,
    /// Queued requests answered when their own deadline passed.
    pub(crate) deadline_exceeded: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    /// Requests whose client went away and that were held to their end.
    pub(crate) held_after_cancel: AtomicU64,
    /// Held requests cut off at the hold time limit.
    pub(crate) held_cut: AtomicU64,
    /// Waits of admitted requests that went through the queue, per bucket.
    waited: [AtomicU64; N_BUCKETS],
    waited_nanos: AtomicU64,
}

impl Metrics {
    pub(crate) fn admitted_now(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn admitted_after(&self, wait: Duration) {
        let secs = wait.as_secs_f64();
        let i = QUEUE_WAIT_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(N_BUCKETS - 1);
        self.waited[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.waited_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self) {
        self.rejected_503.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self) {
        self.timed_out_504.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn deadline_exceeded(&self) {
        self.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn held_after_cancel(&self) {
        self.held_after_cancel.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn held_cut(&self) {
        self.held_cut.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn queue_wait(&self) -> QueueWaitHistogram {
        let mut counts: Vec<u64> = self
            .waited
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let admitted = self.admitted.load(Ordering::Relaxed);
        let queued: u64 = counts.iter().sum();
        // Admissions without a wait are in `admitted` only: they belong to the first bucket.
        counts[0] += admitted.saturating_sub(queued);
        let count = counts.iter().sum();
        let buckets = counts
            .into_iter()
            .enumerate()
            .map(|(i, count)| WaitBucket {
                le: QUEUE_WAIT_BUCKETS.get(i).copied(),
                count,
            })
            .collect();
        QueueWaitHistogram {
            buckets,
            count,
            sum_seconds: Duration::from_nanos(self.waited_nanos.load(Ordering::Relaxed))
                .as_secs_f64(),
        }
    }
}

/// A snapshot of one watched endpoint (one limiter).
///
/// Serializes to one endpoint entry of `/balancer/stats`:
/// `{"capacity": 8, "active_requests": 3, "available_slots": 5, "queue_depth": 0, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStats {
    /// The current capacity (maximum concurrent requests).
    pub capacity: usize,
    /// Requests holding a slot now (until their response body ends). With shared (Redis)
    /// storage this is the global count, the same in every process: do not sum it across
    /// processes; `local_active` is this process's share.
    pub active_requests: usize,
    /// Slots held by this process now (equals `active_requests` with in-process storage).
    pub local_active: usize,
    /// `capacity - active_requests`, at least 0.
    pub available_slots: usize,
    /// Requests waiting in the FIFO queue now.
    pub queue_depth: usize,
    /// How long a request may wait for a slot before a 504, in seconds.
    pub queue_timeout: f64,
    /// The queue bound (`null` when unbounded).
    pub max_queue: Option<usize>,
    /// The HTTP method filter (`null`: every method); only set by the HTTP form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Requests admitted since start.
    pub admitted: u64,
    /// Requests refused with 503 (unhealthy, queue full, storage unavailable).
    pub rejected_503: u64,
    /// Requests that waited `queue_timeout` and got 504.
    pub timed_out_504: u64,
    /// Queued requests answered 504 `deadline_exceeded` when their own deadline
    /// (`grpc-timeout`, or `x-request-timeout` where honoured) passed before `queue_timeout`;
    /// not counted in `timed_out_504`.
    #[serde(default)]
    pub deadline_exceeded: u64,
    /// Requests whose client went away while they were queued.
    pub cancelled: u64,
    /// Admitted requests whose client went away and that kept their slot while their
    /// upstream request ran to its end (`on_client_cancel: hold`).
    pub held_after_cancel: u64,
    /// Of those, the ones cut off at the hold time limit (slot freed, upstream request
    /// dropped).
    pub held_cut: u64,
    /// How long admitted requests waited for their slot.
    pub queue_wait: QueueWaitHistogram,
    /// The adaptive limit's state, for an endpoint with `adaptive:` (absent otherwise);
    /// `capacity` is then the limit in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveStats>,
}

/// The state of an endpoint's adaptive limit (`endpoints.<path>.adaptive` in
/// `/balancer/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveStats {
    /// `gradient` or `aimd`.
    pub algorithm: String,
    /// The lowest limit.
    pub min_capacity: usize,
    /// The highest limit.
    pub max_capacity: usize,
    /// The no-load latency estimate, in milliseconds (`null` before the first
    /// measurement).
    pub min_rtt_ms: Option<f64>,
    /// The last window's latency at the configured quantile, in milliseconds.
    pub sample_rtt_ms: Option<f64>,
    /// What the controller did with the last window: `initial`, `measuring_min_rtt`,
    /// `increasing`, `decreasing`, `holding`, `overloaded`, `following`.
    pub state: String,
    /// Limit changes since start.
    pub changes: u64,
    /// Which latency is sampled: `headers` or `body`.
    pub latency: String,
    /// With shared storage: whether this process computes the shared limit (`false`: it
    /// applies the one stored by the process that does). Absent with in-process storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<bool>,
}

/// A fixed-bucket histogram of the queue waits of admitted requests (non-cumulative
/// counts; requests admitted at once are in the first bucket).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueWaitHistogram {
    /// One entry per bucket, in increasing order.
    pub buckets: Vec<WaitBucket>,
    /// The total count (equals `admitted`).
    pub count: u64,
    /// The sum of all waits, in seconds.
    pub sum_seconds: f64,
}

/// One bucket of a [`QueueWaitHistogram`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WaitBucket {
    /// Upper bound in seconds (inclusive); `null` for the overflow bucket.
    pub le: Option<f64>,
    /// Waits that fell into this bucket (and not into a lower one).
    pub count: u64,
}

/// The statistics of every watched endpoint: `{"endpoints": {"/work": {...}}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AdmissionStats {
    /// Per watched path.
    pub endpoints: BTreeMap<String, EndpointStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_places_waits_and_derives_immediate_admissions() {
        let m = Metrics::default();
        m.admitted_now();
        m.admitted_now();
        m.admitted_after(Duration::from_millis(3));
        m.admitted_after(Duration::from_secs(100));
        let h = m.queue_wait();
        assert_eq!(h.count, 4);
        assert_eq!(h.buckets.len(), QUEUE_WAIT_BUCKETS.len() + 1);
        assert_eq!(h.buckets[0].count, 2);
        assert_eq!(h.buckets[2].le, Some(0.005));
        assert_eq!(h.buckets[2].count, 1);
        assert_eq!(h.buckets.last().unwrap().count, 1);
        assert!(h.buckets.last().unwrap().le.is_none());
        assert!((h.sum_seconds - 100.003).abs() < 1e-6);
    }
}
