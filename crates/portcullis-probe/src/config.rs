//! The probing configuration (`probe_on_startup`, thresholds, limits).

use portcullis_core::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How an endpoint is probed. Field names are the public YAML contract.
///
/// The endpoint itself (method, headers, JSON body, manual `capacity`) lives in the
/// admission crate's endpoint config; pass those to [`ProbeTarget`](crate::ProbeTarget).
///
/// ```
/// use portcullis_probe::ProbeConfig;
///
/// let cfg: ProbeConfig = serde_json::from_str(r#"{"latency_threshold_ms": 500}"#).unwrap();
/// assert_eq!(cfg.latency_threshold_ms, 500.0);
/// assert_eq!(cfg.error_threshold, 0.05);
/// assert_eq!(cfg.max_probe_concurrency, 1024);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Probe watched endpoints without a manual `capacity` before admitting traffic
    /// (default `false`).
    pub probe_on_startup: bool,
    /// Probe again even when a stored capacity exists (default `false`).
    pub force_reprobe: bool,
    /// A level fails when more than this fraction of its requests fail (non-2xx or transport
    /// error). Default `0.05`.
    pub error_threshold: f64,
    /// A level fails when its p99 latency exceeds this many milliseconds. Default `2000`.
    pub latency_threshold_ms: f64,
    /// Upper bound of the probed concurrency; never exceeded. Default `1024`.
    pub max_probe_concurrency: usize,
    /// Minimum requests per level (a level also sends at least two rounds of itself).
    /// Default `32`. Under the gentle schedule (the default) this is the largest size of the
    /// level-1 baseline, which stops early once its last 8 requests agree within 25%; the
    /// other levels send one wave of `level` requests (see
    /// [`Schedule::Gentle`](crate::Schedule::Gentle)).
    pub probe_min_requests: usize,
    /// The gentle schedule's largest factor from one level to the next: a level is at most
    /// `floor(probe_growth × n)` where `n` is how many requests the previous level had
    /// answered at near-baseline latency (or 10% above the previous level once latency has
    /// risen, or one above it), which bounds the in-flight requests at the backend by
    /// `probe_growth × K` for a backend that serves `K` at once. Greater than 1, at most 2.
    /// Default `1.5`.
    pub probe_growth: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            probe_on_startup: false,
            force_reprobe: false,
            error_threshold: 0.05,
            latency_threshold_ms: 2000.0,
            max_probe_concurrency: 1024,
            probe_min_requests: 32,
            probe_growth: 1.5,
        }
    }
}

impl ProbeConfig {
    /// `latency_threshold_ms` as a duration.
    pub fn latency_threshold(&self) -> Duration {
        Duration::from_secs_f64(self.latency_threshold_ms.max(0.0) / 1000.0)
    }

    /// Checks the ranges of every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), InvalidProbeConfig> {
        if !(self.error_threshold.is_finite() && (0.0..1.0).contains(&self.error_threshold)) {
            return Err(ConfigError::new(
                "error_threshold",
                format!("must be a fraction in [0, 1), got {}", self.error_threshold),
            ));
        }
        if !(self.latency_threshold_ms.is_finite() && self.latency_threshold_ms > 0.0) {
            return Err(ConfigError::new(
                "latency_threshold_ms",
                format!(
                    "must be a positive number of milliseconds, got {}",
                    self.latency_threshold_ms
                ),
            ));
        }
        if !(1..=MAX_PROBE_CONCURRENCY).contains(&self.max_probe_concurrency) {
            return Err(ConfigError::new(
                "max_probe_concurrency",
                format!(
                    "must be between 1 and {MAX_PROBE_CONCURRENCY}, got {}",
                    self.max_probe_concurrency
                ),
            ));
        }
        if !(1..=MAX_PROBE_MIN_REQUESTS).contains(&self.probe_min_requests) {
            return Err(ConfigError::new(
                "probe_min_requests",
                format!(
                    "must be between 1 and {MAX_PROBE_MIN_REQUESTS}, got {}",
                    self.probe_min_requests
                ),
            ));
        }
        if !(self.probe_growth.is_finite() && self.probe_growth > 1.0 && self.probe_growth <= 2.0) {
            return Err(ConfigError::new(
                "probe_growth",
                format!(
                    "must be a factor greater than 1 and at most 2, got {}",
                    self.probe_growth
                ),
            ));
        }
        Ok(())
    }
}

/// The largest `max_probe_concurrency` accepted: a level needs one connection (a file
/// descriptor) and one in-flight request per unit, and at least `2 × level` requests.
pub const MAX_PROBE_CONCURRENCY: usize = 10_000;

/// The largest `probe_min_requests` accepted.
pub const MAX_PROBE_MIN_REQUESTS: usize = 1_000_000;

/// A [`ProbeConfig`] field out of range: the shared [`ConfigError`], whose `field` is the
/// YAML field name.
pub type InvalidProbeConfig = ConfigError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let cfg: ProbeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ProbeConfig::default());
        assert!(!cfg.probe_on_startup);
        assert_eq!(cfg.latency_threshold(), Duration::from_secs(2));
        let err = serde_json::from_str::<ProbeConfig>(r#"{"max_concurrency": 3}"#).unwrap_err();
        assert!(err.to_string().contains("max_concurrency"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = [
            (
                ProbeConfig {
                    error_threshold: 1.5,
                    ..Default::default()
                },
                "error_threshold",
            ),
            (
                ProbeConfig {
                    latency_threshold_ms: 0.0,
                    ..Default::default()
                },
                "latency_threshold_ms",
            ),
            (
                ProbeConfig {
                    max_probe_concurrency: 0,
                    ..Default::default()
                },
                "max_probe_concurrency",
            ),
            (
                ProbeConfig {
                    max_probe_concurrency: 1_000_000_000,
                    ..Default::default()
                },
                "max_probe_concurrency",
            ),
            (
                ProbeConfig {
                    probe_min_requests: usize::MAX,
                    ..Default::default()
                },
                "probe_min_requests",
            ),
            (
                ProbeConfig {
                    probe_min_requests: 0,
                    ..Default::default()
                },
                "probe_min_requests",
            ),
            (
                ProbeConfig {
                    probe_growth: 1.0,
                    ..Default::default()
                },
                "probe_growth",
            ),
            (
                ProbeConfig {
                    probe_growth: 2.5,
                    ..Default::default()
                },
                "probe_growth",
            ),
            (
                ProbeConfig {
                    probe_growth: f64::NAN,
                    ..Default::default()
                },
                "probe_growth",
            ),
        ];
        for (cfg, field) in bad {
            assert_eq!(cfg.validate().unwrap_err().field, field);
        }
        ProbeConfig::default().validate().unwrap();
    }
}
