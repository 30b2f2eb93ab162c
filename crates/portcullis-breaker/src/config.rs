//! Serde configuration of the breaker: the `fallback:` section of the gateway's YAML
//! (durations are f64 seconds).
//!
//! ```yaml
//! fallback:
//!   url: http://10.0.0.9:8000        # optional: the fallback's URL (see `Config::url`)
//!   failure_threshold: 2             # consecutive failed primary responses that engage it
//!   recheck_interval: 60             # seconds between background probes while engaged
//!   min_fallback_duration: 30        # seconds on the fallback before recovery is allowed
//!   recovery_success_threshold: 2    # consecutive successful probes needed to go back
//!   probe_max_retries: 2             # extra attempts per probe (0 = one attempt)
//!   probe_backoff_base: 0.5          # retry delays: base × 2^attempt = 0.5, 1, 2, ...
//!   probe_timeout: 5                 # per-attempt timeout
//!   half_open:                       # optional, off by default
//!     enabled: true
//!     one_in: 20                     # after the hold, 1 request in 20 tries the primary
//! ```
//!
//! Every field has a default (see [`Config::default`]).

use portcullis_core::backoff::Backoff;
use portcullis_core::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The breaker configuration (the gateway's `fallback:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the fallback (`http://host:port[/prefix]`), probed by
    /// [`Breaker::force_health_check`](crate::Breaker::force_health_check) and, in the
    /// example gateway, proxied to.
    ///
    /// Only URL probing needs it. A fallback *service* handed to a layer
    /// ([`HttpFallbackLayer::new`](crate::HttpFallbackLayer::new) and the others) is a
    /// configured fallback with or without a `url`, so an in-process fallback works with
    /// `None`. With `None` and no fallback service (the gateway's `fallback:` section without
    /// `url`), after `failure_threshold` failures the breaker logs once, keeps using the
    /// primary and reports `primary_unhealthy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Consecutive failed primary responses that engage the fallback (default 2).
    pub failure_threshold: u32,
    /// Time between two background probes of the primary while the fallback is engaged
    /// (default 60 s). The first probe runs one interval after the fallback engaged.
    #[serde(with = "portcullis_core::seconds")]
    pub recheck_interval: Duration,
    /// Minimum time on the fallback before traffic may return to the primary (default 30 s).
    #[serde(with = "portcullis_core::seconds")]
    pub min_fallback_duration: Duration,
    /// Consecutive successful probes needed before traffic returns (default 2). A failed
    /// probe resets the count.
    pub recovery_success_threshold: u32,
    /// Extra attempts of one probe after the first (default 2; 0 = a single attempt). A
    /// probe fails only when every attempt failed.
    pub probe_max_retries: u32,
    /// Base of the retry back-off: the delay before retry `n` (0-based) is
    /// `probe_backoff_base × 2^n` (default 0.5 s: 0.5, 1, 2, ...); 0 retries without a wait.
    /// See [`Config::probe_backoff`].
    #[serde(with = "portcullis_core::seconds")]
    pub probe_backoff_base: Duration,
    /// Timeout of one probe attempt (default 5 s).
    #[serde(with = "portcullis_core::seconds")]
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
    /// Checks what serde cannot: thresholds at least 1, a non-zero `recheck_interval` and
    /// `probe_timeout`, `half_open.one_in` at least 1, an `http://` fallback URL when one is
    /// set. A missing `url` is valid (an in-process fallback needs none; see
    /// [`url`](Self::url)). The error names the field relative to this section (`url`,
    /// `half_open.one_in`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("failure_threshold", self.failure_threshold),
            (
                "recovery_success_threshold",
                self.recovery_success_threshold,
            ),
            ("half_open.one_in", self.half_open.one_in),
        ];
        for (field, v) in at_least_one {
            if v == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        ConfigError::require_positive("recheck_interval", self.recheck_interval)?;
        ConfigError::require_positive("probe_timeout", self.probe_timeout)?;
        if let Some(url) = &self.url {
            let uri: http::Uri = url.parse().map_err(|e| {
                ConfigError::new("url", format!("`{url}` is not a valid URL ({e})"))
            })?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(ConfigError::new(
                    "url",
                    format!("`{url}` must be an http://host:port URL"),
                ));
            }
        }
        Ok(())
    }

    /// The back-off delay before retry `attempt` (0-based): `probe_backoff_base × 2^attempt`
    /// (the doubling stops at `2^31`), zero with a zero base. The waits of
    /// [`probe_backoff`](Self::probe_backoff).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.probe_backoff().map_or(Duration::ZERO, |b| {
            b.delays()
                .nth(attempt.min(MAX_DOUBLINGS) as usize)
                .unwrap_or(b.max())
        })
    }

    /// The probe retry back-off as the shared [`Backoff`] policy: starts at
    /// `probe_backoff_base`, doubles, and stops doubling at `probe_backoff_base × 2^31`.
    ///
    /// `None` when `probe_backoff_base` is zero. A zero base is a valid setting (the retries
    /// of one probe follow each other without a wait, each still bounded by `probe_timeout`),
    /// which a `Backoff` cannot express, so `validate` accepts it and the prober then does not
    /// wait. Any other base gives a valid policy (its cap is never below it).
    pub fn probe_backoff(&self) -> Option<Backoff> {
        let base = self.probe_backoff_base;
        let cap = base.saturating_mul(1u32 << MAX_DOUBLINGS);
        Backoff::new(base, cap, 2.0).ok()
    }
}

/// The number of doublings after which the probe retry back-off stays constant.
const MAX_DOUBLINGS: u32 = 31;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
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

    /// The shared `Backoff` gives the waits of `probe_backoff_base × 2^min(n, 31)`
    /// (saturating), the breaker's documented formula, for small, odd and huge bases: to the
    /// nanosecond below 2^53 ns (about 104 days, where an f64 of seconds still holds every
    /// nanosecond), within one part in 10^15 above.
    #[test]
    fn probe_backoff_is_base_times_two_to_the_n() {
        const EXACT: Duration = Duration::from_nanos(1 << 53);
        let bases = [
            Duration::from_nanos(1),
            Duration::from_millis(20),
            Duration::from_millis(250),
            Duration::from_nanos(333_333_333),
            Duration::from_secs_f64(0.3),
            Duration::from_secs(7),
            Duration::from_secs(u64::MAX / 2),
        ];
        for base in bases {
            let c = Config {
                probe_backoff_base: base,
                ..Config::default()
            };
            let mut delays = c
                .probe_backoff()
                .expect("a non-zero base is valid")
                .delays();
            for n in 0..40u32 {
                let expected = base.saturating_mul(1u32 << n.min(31));
                for got in [delays.next_delay(), c.backoff(n)] {
                    if expected < EXACT {
                        assert_eq!(got, expected, "base {base:?}, retry {n}");
                    } else {
                        let off = got.abs_diff(expected).as_secs_f64();
                        assert!(
                            off <= expected.as_secs_f64() * 1e-15,
                            "base {base:?}, retry {n}: {got:?} against {expected:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_backoff_base_is_valid_and_does_not_wait() {
        let c = Config {
            probe_backoff_base: Duration::ZERO,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        assert!(c.probe_backoff().is_none());
        assert_eq!(c.backoff(0), Duration::ZERO);
        assert_eq!(c.backoff(5), Duration::ZERO);
    }

    #[test]
    fn validate_names_the_field() {
        let c = Config {
            failure_threshold: 0,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "failure_threshold");
        let c = Config {
            url: Some("ftp://x".into()),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().within("fallback");
        assert_eq!(e.field, "fallback.url");
        assert!(e.to_string().starts_with("fallback.url: "), "{e}");
        let c = Config {
            half_open: HalfOpenConfig {
                enabled: true,
                one_in: 0,
            },
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "half_open.one_in");
        assert!(Config::default().validate().is_ok());
    }

    /// An in-process fallback needs no URL: a config without one, with every other knob
    /// set, is valid.
    #[test]
    fn a_fallback_without_url_is_valid() {
        let c = Config {
            url: None,
            half_open: HalfOpenConfig {
                enabled: true,
                one_in: 3,
            },
            ..Config::default()
        };
        assert_eq!(c.validate(), Ok(()));
    }
}
