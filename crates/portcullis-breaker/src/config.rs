//! Serde configuration of the breaker: the `fallback:` section of the gateway's YAML
//! (durations are f64 seconds).
//!
//! ```yaml
//! fallback:
//!   url: http://10.0.0.9:8000        # optional; absent = no fallback (log once, keep primary)
//!   failure_threshold: 2             # consecutive failed primary responses that engage it
//!   recheck_interval: 60             # seconds between background probes while engaged
//!   min_fallback_duration: 30        # seconds on the fallback before recovery is allowed
//!   recovery_success_threshold: 2    # consecutive successful probes needed to go back
//!   probe_max_retries: 2             # extra attempts per probe (0 = one attempt)
//!   probe_backoff_base: 0.5          # retry delays: base × 2^attempt = 0.5, 1, 2, ...
//!   probe_timeout: 5                 # per-attempt timeout
//!   half_open:                       # optional (beyond the seed), off by default
//!     enabled: true
//!     one_in: 20                     # after the hold, 1 request in 20 tries the primary
//! ```
//!
//! The defaults are the seed's (`BACKEND_HEALTH_*` environment defaults).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// The breaker configuration (the gateway's `fallback:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the fallback (`http://host:port[/prefix]`). `None`: no fallback; after
    /// `failure_threshold` failures the breaker logs once, keeps using the primary and reports
    /// `primary_unhealthy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Consecutive failed primary responses that engage the fallback (default 2).
    pub failure_threshold: u32,
    /// Time between two background probes of the primary while the fallback is engaged
    /// (default 60 s). The first probe runs one interval after the fallback engaged.
    #[serde(with = "secs")]
    pub recheck_interval: Duration,
    /// Minimum time on the fallback before traffic may return to the primary (default 30 s).
    #[serde(with = "secs")]
    pub min_fallback_duration: Duration,
    /// Consecutive successful probes needed before traffic returns (default 2). A failed
    /// probe resets the count.
    pub recovery_success_threshold: u32,
    /// Extra attempts of one probe after the first (default 2; 0 = a single attempt). A
    /// probe fails only when every attempt failed.
    pub probe_max_retries: u32,
    /// Base of the retry back-off: the delay before retry `n` (0-based) is
    /// `probe_backoff_base × 2^n` (default 0.5 s: 0.5, 1, 2, ...).
    #[serde(with = "secs")]
    pub probe_backoff_base: Duration,
    /// Timeout of one probe attempt (default 5 s).
    #[serde(with = "secs")]
    pub probe_timeout: Duration,
    /// Half-open by live traffic (off by default).
    pub half_open: HalfOpenConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: None,
            failure_threshold: 2,
            recheck_interval: Duration::from_secs(60),
            min_fallback_duration: Duration::from_secs(30),
            recovery_success_threshold: 2,
            probe_max_retries: 2,
            probe_backoff_base: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(5),
            half_open: HalfOpenConfig::default(),
        }
    }
}

impl Config {
    /// Checks what serde cannot: thresholds at least 1, a non-zero `recheck_interval`,
    /// `half_open.one_in` at least 1, an `http://` fallback URL. The error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("fallback.failure_threshold: must be at least 1".into());
        }
        if self.recovery_success_threshold == 0 {
            return Err("fallback.recovery_success_threshold: must be at least 1".into());
        }
        if self.recheck_interval.is_zero() {
            return Err("fallback.recheck_interval: must be greater than 0".into());
        }
        if self.probe_timeout.is_zero() {
            return Err("fallback.probe_timeout: must be greater than 0".into());
        }
        if self.half_open.one_in == 0 {
            return Err("fallback.half_open.one_in: must be at least 1".into());
        }
        if let Some(url) = &self.url {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("fallback.url: `{url}` is not a valid URL ({e})"))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(format!(
                    "fallback.url: `{url}` must be an http://host:port URL"
                ));
            }
        }
        Ok(())
    }

    /// The back-off delay before retry `attempt` (0-based): `probe_backoff_base × 2^attempt`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.probe_backoff_base
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
    }
}

/// Half-open by live traffic: once `min_fallback_duration` has passed, a bounded trickle of
/// real requests tries the primary (at most one at a time, one request in `one_in`). A
/// successful trial counts as a successful probe, a failed one resets the count. The client
/// of a failed trial gets the primary's (failed) response: that is the price of testing with
/// live traffic, bounded to one request in `one_in`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HalfOpenConfig {
    /// Turns the trickle on (default `false`: only the background probes decide).
    pub enabled: bool,
    /// One request in `one_in` is sent to the primary (default 20).
    pub one_in: u32,
}

impl Default for HalfOpenConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            one_in: 20,
        }
    }
}

mod secs {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected a non-negative number of seconds, got {secs}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = Config::default();
        assert_eq!(c.failure_threshold, 2);
        assert_eq!(c.recheck_interval, Duration::from_secs(60));
        assert_eq!(c.min_fallback_duration, Duration::from_secs(30));
        assert_eq!(c.recovery_success_threshold, 2);
        assert_eq!(c.probe_max_retries, 2);
        assert_eq!(c.probe_backoff_base, Duration::from_millis(500));
        assert_eq!(c.probe_timeout, Duration::from_secs(5));
        assert!(c.url.is_none());
        assert!(!c.half_open.enabled);
    }

    #[test]
    fn backoff_doubles() {
        let c = Config::default();
        let d: Vec<f64> = (0..4).map(|a| c.backoff(a).as_secs_f64()).collect();
        assert_eq!(d, [0.5, 1.0, 2.0, 4.0]);
        assert!(c.backoff(200) >= c.backoff(31));
    }

    #[test]
    fn validate_names_the_field() {
        let c = Config {
            failure_threshold: 0,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .starts_with("fallback.failure_threshold"));
        let c = Config {
            url: Some("ftp://x".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().starts_with("fallback.url"));
        assert!(Config::default().validate().is_ok());
    }
}
