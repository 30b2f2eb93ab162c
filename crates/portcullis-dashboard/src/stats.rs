//! The `GET /balancer/stats` document and the [`StatsSource`] that fills it.
//!
//! The core shape is `{"endpoints": {"/predict": {"capacity": 50, "active_requests":
//! 12, "available_slots": 38}}}`, extended with the queue, counters and a queue-wait
//! histogram per endpoint, the upstream pool, the circuit-breaker fallback, the storage,
//! and the gateway's readiness, uptime and version. `docs/stats.schema.json` at the
//! repository root is its JSON schema (draft 2020-12); a test validates live output
//! against it.
//!
//! These types are the wire format. A [`StatsSource`] (any `Fn() -> Stats` closure, or the
//! gateway's own) fills them from the layers' snapshots. The endpoint entries come from
//! `portcullis-admission`: its [`AdmissionStats`] and `EndpointStats` snapshots convert
//! into [`Stats`] and [`EndpointStats`] with `From` (field for field, same names), and
//! [`AdmissionSource`] serves the endpoints of an [`Endpoints`] as a source of its own.

use portcullis_admission::{AdmissionStats, CapacitySource, Endpoints};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The whole `/balancer/stats` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The gateway version (`CARGO_PKG_VERSION` of the binary).
    pub version: String,
    /// Seconds since the gateway started.
    pub uptime_seconds: f64,
    /// Readiness and liveness, filled by the router from the
    /// [`HealthRegistry`](portcullis_health::HealthRegistry) (a source may leave it `None`).
    #[serde(default)]
    pub health: Option<HealthSummary>,
    /// Per watched endpoint path.
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointStats>,
    /// The upstream replicas, in configuration order.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStats>,
    /// The circuit-breaker fallback; `null` when no fallback is configured.
    #[serde(default)]
    pub fallback: Option<FallbackStats>,
    /// The storage of the admission counters (local memory or Redis).
    #[serde(default)]
    pub storage: StorageStats,
    /// TLS handshakes on the listener that failed or timed out (0 without TLS).
    #[serde(default)]
    pub tls_handshakes_failed: u64,
    /// Access log lines dropped because the log writer fell behind (0 without an access
    /// log).
    #[serde(default)]
    pub access_log_dropped: u64,
    /// The retries of each upstream pool, by pool name (`default`: the top-level
    /// `upstreams`); empty for a source without retries.
    #[serde(default)]
    pub retry: BTreeMap<String, RetryStats>,
    /// The generation of the config in force: 1 at start, one more for every applied
    /// reload (0 where the source has no config reload).
    #[serde(default)]
    pub config_generation: u64,
    /// Reloads refused so far (an invalid config, or one that could not be applied).
    #[serde(default)]
    pub reloads_failed: u64,
    /// The outcome of the last reload; `null` before the first.
    #[serde(default)]
    pub last_reload: Option<ReloadStats>,
    /// Every upstream pool by name, `default` (the top-level `upstreams`, also in
    /// [`upstreams`](Self::upstreams), [`fallback`](Self::fallback) and
    /// [`retry`](Self::retry)) among them; empty for a source without pools.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolStats>,
}

/// One upstream pool (`pools.<name>` in `/balancer/stats`): its replicas, its retries and
/// its breaker's fallback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The pool's replicas, in configuration order.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStats>,
    /// The pool's retries.
    #[serde(default)]
    pub retry: RetryStats,
    /// The pool's fallback; `null` when it has no `fallback:` section.
    #[serde(default)]
    pub fallback: Option<FallbackStats>,
}

/// The outcome of one config reload (`last_reload` in `/balancer/stats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadStats {
    /// When it ended, in seconds since the Unix epoch.
    pub time: f64,
    /// Whether the new config was applied.
    pub ok: bool,
    /// Why it was refused (`ok: false`), naming the field.
    #[serde(default)]
    pub error: Option<String>,
    /// Fields that changed but only take effect at the next start, so were not applied.
    #[serde(default)]
    pub needs_restart: Vec<String>,
}

/// The retries of one upstream pool since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryStats {
    /// Retries sent to another replica (each attempt after the first).
    pub retries: u64,
    /// Retries wanted and refused because the pool's retry budget was spent.
    pub retries_budget_exhausted: u64,
}

impl Stats {
    /// An empty document for `version`, `uptime` after start.
    pub fn new(version: impl Into<String>, uptime: Duration) -> Self {
        Self {
            version: version.into(),
            uptime_seconds: uptime.as_secs_f64(),
            ..Self::default()
        }
    }

    /// A document with the endpoints of `admission` (an [`Endpoints::stats`] snapshot) and
    /// nothing else: no upstreams, no fallback, local storage; `version` empty and
    /// `uptime_seconds` 0 (set them, or use [`AdmissionSource`], which does).
    pub fn from_admission(admission: AdmissionStats) -> Self {
        Self::from(admission)
    }
}

impl From<AdmissionStats> for Stats {
    fn from(admission: AdmissionStats) -> Self {
        Self {
            endpoints: admission
                .endpoints
                .into_iter()
                .map(|(path, e)| (path, e.into()))
                .collect(),
            ..Self::default()
        }
    }
}

/// Liveness and readiness as `/healthz` and `/readyz` report them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// `/healthz` answers 200.
    pub live: bool,
    /// `/readyz` answers 200.
    pub ready: bool,
    /// The components failing readiness (or liveness).
    #[serde(default)]
    pub failing: Vec<String>,
}

/// One watched endpoint (one admission limiter).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Maximum concurrent requests (the probed or configured capacity).
    pub capacity: u64,
    /// Requests holding a slot now.
    pub active_requests: u64,
    /// `capacity - active_requests`, at least 0.
    pub available_slots: u64,
    /// Requests waiting in the FIFO queue now.
    pub queue_depth: u64,
    /// How long a request may wait for a slot before a 504, in seconds.
    pub queue_timeout: f64,
    /// The queue bound (`null`: unbounded).
    #[serde(default)]
    pub max_queue: Option<u64>,
    /// The HTTP method filter (`null`: every method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Requests admitted since start.
    #[serde(default)]
    pub admitted: u64,
    /// Requests refused with 503 (unhealthy, queue full, storage unavailable).
    #[serde(default)]
    pub rejected_503: u64,
    /// Requests that waited `queue_timeout` and got 504.
    #[serde(default)]
    pub timed_out_504: u64,
    /// Queued requests answered 504 `deadline_exceeded` because their own deadline
    /// (`grpc-timeout`, or `x-request-timeout` with `honor_request_timeout`) passed first.
    #[serde(default)]
    pub deadline_exceeded: u64,
    /// Requests whose client went away while queued.
    #[serde(default)]
    pub cancelled: u64,
    /// Slots held by this process now. With shared (Redis) storage `active_requests` is the
    /// global count, the same in every process; this is the process's own share, the one
    /// to sum across processes.
    #[serde(default)]
    pub local_active: u64,
    /// Admitted requests whose client went away and that kept their slot until their
    /// upstream request ended (`on_client_cancel: hold`).
    #[serde(default)]
    pub held_after_cancel: u64,
    /// Of those, the ones cut off at the hold time limit.
    #[serde(default)]
    pub held_cut: u64,
    /// How long admitted requests waited for their slot.
    #[serde(default)]
    pub queue_wait: Histogram,
    /// The adaptive limit's state, for an endpoint with `adaptive:` (`capacity` is then
    /// the limit in force); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<portcullis_admission::AdaptiveStats>,
}

/// The admission layer's snapshot of one endpoint, field for field (counts widened to
/// `u64`).
impl From<portcullis_admission::EndpointStats> for EndpointStats {
    fn from(e: portcullis_admission::EndpointStats) -> Self {
        // A struct literal without `..`: a field added to the wire type is mapped here too.
        Self {
            capacity: e.capacity as u64,
            active_requests: e.active_requests as u64,
            available_slots: e.available_slots as u64,
            queue_depth: e.queue_depth as u64,
            queue_timeout: e.queue_timeout,
            max_queue: e.max_queue.map(|q| q as u64),
            method: e.method,
            admitted: e.admitted,
            rejected_503: e.rejected_503,
            timed_out_504: e.timed_out_504,
            deadline_exceeded: e.deadline_exceeded,
            cancelled: e.cancelled,
            local_active: e.local_active as u64,
            held_after_cancel: e.held_after_cancel,
            held_cut: e.held_cut,
            queue_wait: e.queue_wait.into(),
            adaptive: e.adaptive,
        }
    }
}

impl From<portcullis_admission::QueueWaitHistogram> for Histogram {
    fn from(h: portcullis_admission::QueueWaitHistogram) -> Self {
        Self {
            buckets: h
                .buckets
                .into_iter()
                .map(|b| Bucket {
                    le: b.le,
                    count: b.count,
                })
                .collect(),
            count: h.count,
            sum_seconds: h.sum_seconds,
        }
    }
}

impl EndpointStats {
    /// Utilization in percent (`active / capacity × 100`, 100 when the capacity is 0 and
    /// something is active).
    pub fn utilization_percent(&self) -> f64 {
        if self.capacity == 0 {
            if self.active_requests > 0 {
                100.0
            } else {
                0.0
            }
        } else {
            self.active_requests as f64 * 100.0 / self.capacity as f64
        }
    }
}

/// A fixed-bucket histogram with **non-cumulative** bucket counts (each count is the
/// observations that fell into this bucket and not a lower one), in seconds. `/metrics`
/// renders it as a Prometheus histogram (cumulative `_bucket{le}`, `_sum`, `_count`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// The buckets in increasing `le` order; the last may be the overflow bucket
    /// (`le: null`, i.e. `+Inf`).
    pub buckets: Vec<Bucket>,
    /// Total number of observations.
    pub count: u64,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
}

/// One bucket of a [`Histogram`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound in seconds (inclusive); `null` for the overflow (`+Inf`) bucket.
    pub le: Option<f64>,
    /// Observations in this bucket only.
    pub count: u64,
}

impl Histogram {
    /// Builds a histogram from upper bounds and non-cumulative counts
    /// (`counts.len()` is `bounds.len()` or `bounds.len() + 1` with the overflow last).
    pub fn from_counts(bounds: &[f64], counts: &[u64], sum_seconds: f64) -> Self {
        let buckets: Vec<Bucket> = counts
            .iter()
            .enumerate()
            .map(|(i, &count)| Bucket {
                le: bounds.get(i).copied(),
                count,
            })
            .collect();
        Self {
            count: buckets.iter().map(|b| b.count).sum(),
            buckets,
            sum_seconds,
        }
    }
}

/// The tier of an upstream replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Preferred.
    #[default]
    Primary,
    /// Used when no primary is healthy.
    Secondary,
}

/// One upstream replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStats {
    /// Its base URL.
    pub url: String,
    /// Its tier.
    pub tier: Tier,
    /// `"healthy"`, `"unhealthy"`, `"ejected"` or `"probing"`.
    pub status: String,
    /// Serving traffic.
    pub healthy: bool,
    /// Ejected by passive outlier detection (or probing its way back).
    pub ejected: bool,
    /// Requests in flight to it now.
    pub inflight: u64,
    /// Latency of the last active health probe, in milliseconds (`null`: none yet).
    #[serde(default)]
    pub last_probe_latency_ms: Option<f64>,
    /// Consecutive failed active probes.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Consecutive ejections (the cooldown multiplier).
    #[serde(default)]
    pub ejections: u32,
    /// Seconds before an ejected replica may be probed again (0 when not ejected).
    #[serde(default)]
    pub ejected_for_seconds: f64,
    /// Requests sent to it since start.
    #[serde(default)]
    pub requests: u64,
    /// Requests that failed (5xx, connect error, timeout) since start.
    #[serde(default)]
    pub failures: u64,
    /// Requests whose client went away before its request body was complete (nginx's 499).
    /// Not failures: they never count against the upstream.
    #[serde(default)]
    pub client_closed: u64,
    /// Latency of the requests proxied to it (`null`: not measured).
    #[serde(default)]
    pub latency: Option<Histogram>,
}

/// The circuit breaker's fallback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FallbackStats {
    /// The fallback's base URL.
    pub url: String,
    /// `true` while traffic goes to the fallback.
    pub engaged: bool,
    /// The breaker state: `"closed"` (primary), `"open"` (fallback engaged) or
    /// `"half_open"` (probing the primary).
    pub state: String,
    /// Consecutive primary failures counted towards the trip.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Failures that trip the breaker.
    #[serde(default)]
    pub failure_threshold: u32,
    /// Seconds the fallback has been engaged (0 when not engaged).
    #[serde(default)]
    pub engaged_for_seconds: f64,
    /// The minimum time the fallback stays engaged before recovery is tried, in seconds.
    #[serde(default)]
    pub hold_seconds: f64,
    /// Consecutive good recovery probes of the primary so far.
    #[serde(default)]
    pub recovery_successes: u32,
    /// Good recovery probes needed to switch back to the primary.
    #[serde(default)]
    pub recovery_threshold: u32,
    /// Times the breaker tripped since start.
    #[serde(default)]
    pub trips: u64,
    /// Requests served by the fallback since start.
    #[serde(default)]
    pub fallback_requests: u64,
}

/// The storage of the admission counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageStats {
    /// `"local"` (in-process) or `"redis"`.
    pub kind: String,
    /// The storage answers (always `true` for local).
    pub healthy: bool,
    /// Latency of the last ping in milliseconds (`null` for local or before the first ping).
    #[serde(default)]
    pub last_ping_latency_ms: Option<f64>,
    /// Consecutive failed pings.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// The last error, if the storage is failing.
    #[serde(default)]
    pub error: Option<String>,
}

impl Default for StorageStats {
    fn default() -> Self {
        Self {
            kind: "local".into(),
            healthy: true,
            last_ping_latency_ms: None,
            consecutive_failures: 0,
            error: None,
        }
    }
}

/// Produces the current [`Stats`] for each `/balancer/stats` and `/metrics` request.
///
/// It runs on the request path: build the document from cached snapshots (atomics,
/// `ArcSwap`), never with I/O. Any `Fn() -> Stats` closure is a source.
pub trait StatsSource: Send + Sync + 'static {
    /// The current statistics.
    fn stats(&self) -> Stats;
}

impl<F> StatsSource for F
where
    F: Fn() -> Stats + Send + Sync + 'static,
{
    fn stats(&self) -> Stats {
        self()
    }
}

impl<S: StatsSource + ?Sized> StatsSource for Arc<S> {
    fn stats(&self) -> Stats {
        (**self).stats()
    }
}

/// The [`StatsSource`] of an application with admission control only: the endpoints of an
/// [`Endpoints`] (each request reads their atomics), the uptime since this source was
/// built, and a version (default: empty).
///
/// ```
/// use portcullis_admission::{Endpoints, Limiter};
/// use portcullis_dashboard::{AdmissionSource, StatsSource};
/// use std::sync::Arc;
///
/// let endpoints = Endpoints::new().watch("/predict", None, Arc::new(Limiter::local(8)));
/// let source = AdmissionSource::new(&endpoints).with_version("1.2.0");
/// let stats = source.stats();
/// assert_eq!(stats.version, "1.2.0");
/// assert_eq!(stats.endpoints["/predict"].capacity, 8);
/// assert_eq!(stats.endpoints["/predict"].available_slots, 8);
/// ```
pub struct AdmissionSource<C> {
    endpoints: Endpoints<C>,
    started: Instant,
    version: String,
}

impl<C> Clone for AdmissionSource<C> {
    fn clone(&self) -> Self {
        Self {
            endpoints: self.endpoints.clone(),
            started: self.started,
            version: self.version.clone(),
        }
    }
}

impl<C: CapacitySource + std::fmt::Debug> std::fmt::Debug for AdmissionSource<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionSource")
            .field("endpoints", &self.endpoints)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<C: CapacitySource> AdmissionSource<C> {
    /// Serves the endpoints of `endpoints` (a clone: the same limiters the layer uses).
    pub fn new(endpoints: &Endpoints<C>) -> Self {
        Self {
            endpoints: endpoints.clone(),
            started: Instant::now(),
            version: String::new(),
        }
    }

    /// The `version` the document reports (for example `env!("CARGO_PKG_VERSION")`).
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }
}

impl<C: CapacitySource> StatsSource for AdmissionSource<C> {
    fn stats(&self) -> Stats {
        Stats {
            version: self.version.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ..Stats::from_admission(self.endpoints.stats())
        }
    }
}
