//! Serializable views of the breaker for `/balancer/stats` (under `"fallback"`) and metrics.

use serde::Serialize;
use std::fmt;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// All traffic goes to the primary.
    Normal,
    /// The primary tripped; all traffic goes to the fallback (except half-open trials).
    Fallback,
    /// The primary tripped but no fallback is configured: traffic keeps going to the primary.
    PrimaryUnhealthy,
}

impl BreakerState {
    /// The snake_case name used in JSON and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Fallback => "fallback",
            Self::PrimaryUnhealthy => "primary_unhealthy",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side receives traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The primary service.
    Primary,
    /// The fallback service.
    Fallback,
}

/// The outcome of one probe of one side, retries included.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The probed target (base URL in the HTTP form).
    pub target: String,
    /// `true` when one of the attempts succeeded.
    pub healthy: bool,
    /// Attempts used (1 + retries used).
    pub attempts: u32,
    /// Latency of the last attempt, seconds.
    pub latency_seconds: f64,
    /// Whole probe duration including back-off delays, seconds.
    pub elapsed_seconds: f64,
    /// Outcome of the last attempt (`"200 OK"`, `"timeout"`, `"connect error"`, ...).
    pub detail: String,
}

/// Counters of transitions and probes since the breaker was built (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// NORMAL -> FALLBACK transitions.
    pub fallback_engaged: u64,
    /// FALLBACK -> NORMAL transitions.
    pub recovered: u64,
    /// NORMAL -> PRIMARY_UNHEALTHY transitions (no fallback configured).
    pub primary_unhealthy: u64,
    /// PRIMARY_UNHEALTHY -> NORMAL transitions.
    pub primary_unhealthy_cleared: u64,
    /// Primary failures: responses classified as failures, and failed forced checks
    /// ([`Breaker::force_health_check`](crate::Breaker::force_health_check)), both of which
    /// count toward `failure_threshold` in NORMAL.
    pub primary_failures: u64,
    /// Fallback responses or errors classified as failures.
    pub fallback_failures: u64,
    /// Background probes run (each with its retries).
    pub probes: u64,
    /// Background probes that failed (every retry failed).
    pub probe_failures: u64,
    /// Probe attempts (retries included), background and forced.
    pub probe_attempts: u64,
    /// Forced checks run ([`Breaker::force_health_check`](crate::Breaker::force_health_check),
    /// `POST /balancer/fallback/check`).
    pub forced_checks: u64,
    /// Half-open trial requests sent to the primary.
    pub half_open_trials: u64,
    /// Half-open trial requests that failed.
    pub half_open_failures: u64,
}

/// The breaker's state, read without I/O ([`Breaker::status_snapshot`](crate::Breaker::status_snapshot)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusSnapshot {
    /// The state.
    pub state: BreakerState,
    /// The side receiving traffic.
    pub active: Side,
    /// The active side's target (base URL in the HTTP form).
    pub active_url: String,
    /// `true` while traffic goes to the fallback.
    pub using_fallback: bool,
    /// `true` when a fallback is configured.
    pub fallback_configured: bool,
    /// Consecutive failed primary responses (reset by a success and by recovery).
    pub consecutive_failures: u32,
    /// `failure_threshold`.
    pub failure_threshold: u32,
    /// Consecutive successful recovery probes (and half-open trials) since the last failure.
    pub consecutive_recovery_successes: u32,
    /// `recovery_success_threshold`.
    pub recovery_threshold: u32,
    /// Seconds since the primary tripped (`None` in NORMAL).
    pub fallback_age_seconds: Option<f64>,
    /// Seconds left before `min_fallback_duration` allows recovery (`None` in NORMAL).
    pub min_hold_remaining_seconds: Option<f64>,
    /// `min_fallback_duration`, seconds.
    pub min_fallback_duration_seconds: f64,
    /// Latency of the last attempt of the last background probe, seconds.
    pub last_probe_latency_seconds: Option<f64>,
    /// Attempts used by the last background probe.
    pub last_probe_attempts: Option<u32>,
    /// Outcome of the last background probe.
    pub last_probe_healthy: Option<bool>,
    /// Transition and probe counters.
    pub counters: Counters,
}

/// The result of [`Breaker::force_health_check`](crate::Breaker::force_health_check): the
/// status after applying the probes, plus the probe results of both sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// The status after the probe results were applied.
    #[serde(flatten)]
    pub status: StatusSnapshot,
    /// The primary's probe.
    pub primary: ProbeReport,
    /// The fallback's probe (`None` when no fallback is configured).
    pub fallback: Option<ProbeReport>,
}
