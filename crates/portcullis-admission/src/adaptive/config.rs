//! [`AdaptiveConfig`]: the `adaptive:` block of an endpoint (or the top-level default).

use portcullis_core::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Which controller moves the limit (see the [module docs](super)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// The gradient controller ([`Gradient`](super::Gradient)): follows the ratio of the
    /// minimum latency to the current latency, plus √limit headroom. The default.
    #[default]
    Gradient,
    /// Additive increase, multiplicative decrease ([`Aimd`](super::Aimd)).
    Aimd,
}

impl Algorithm {
    /// The name used in the configuration and in stats (`gradient`, `aimd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gradient => "gradient",
            Self::Aimd => "aimd",
        }
    }
}

/// Which latency of an admitted request is sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencyMode {
    /// From the grant of the slot to the response head (status and headers). The default;
    /// for a streamed answer this is the time to its first byte.
    #[default]
    Headers,
    /// From the grant of the slot to the end of the response body (its release): for
    /// streamed answers whose length is the load.
    Body,
}

/// How an endpoint's capacity adapts at run time: `adaptive: {algorithm: gradient,
/// min_capacity: 4, max_capacity: 64}`.
///
/// The endpoint's `capacity` (or its probed capacity, or `default_capacity`) is the
/// *initial* limit; from there the controller moves it once per `window`, always inside
/// `[min_capacity, max_capacity]`. Every field has a default; see the README's
/// "Adaptive capacity" section for what each one does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// `false` turns adaptation off for one endpoint when a top-level default is set.
    pub enabled: bool,
    /// The controller: `gradient` (default) or `aimd`.
    pub algorithm: Algorithm,
    /// The lowest limit (default 1). Also the limit held while `min_rtt` is measured.
    pub min_capacity: usize,
    /// The highest limit (default 1000).
    pub max_capacity: usize,
    /// Which latency is sampled: `headers` (default) or `body`.
    pub latency: LatencyMode,
    /// How often the limit is recomputed, from the samples of the window that ended
    /// (seconds, default 0.25).
    #[serde(with = "portcullis_core::seconds")]
    pub window: Duration,
    /// A window with fewer samples is extended instead of being used (default 10).
    pub min_samples: u64,
    /// The quantile of a window's latencies taken as its `sample_rtt` (default 0.5).
    pub latency_quantile: f64,
    /// Weight of a new gradient limit against the old one, in (0, 1] (default 0.5; 1 =
    /// no smoothing).
    pub smoothing: f64,
    /// Latency above `min_rtt` tolerated before the gradient shrinks the limit, as a
    /// fraction of `min_rtt` (default 0.15).
    pub buffer: f64,
    /// How often `min_rtt` is measured again (seconds, default 30), so it cannot drift.
    #[serde(with = "portcullis_core::seconds")]
    pub min_rtt_interval: Duration,
    /// Random spread of that interval, as a fraction in [0, 1) (default 0.15).
    pub min_rtt_jitter: f64,
    /// Factor applied to the limit on an overload signal (5xx, 429, transport error;
    /// for AIMD also a latency above `tolerance × min_rtt`), in (0, 1) (default 0.9).
    pub backoff: f64,
    /// AIMD: a window whose `sample_rtt` exceeds `tolerance × min_rtt` counts as an
    /// overload (default 1.5, more than 1).
    pub tolerance: f64,
    /// AIMD: slots added per window without overload (default 1).
    pub increase: usize,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithm: Algorithm::Gradient,
            min_capacity: 1,
            max_capacity: 1000,
            latency: LatencyMode::Headers,
            window: Duration::from_millis(250),
            min_samples: 10,
            latency_quantile: 0.5,
            smoothing: 0.5,
            buffer: 0.15,
            min_rtt_interval: Duration::from_secs(30),
            min_rtt_jitter: 0.15,
            backoff: 0.9,
            tolerance: 1.5,
            increase: 1,
        }
    }
}

impl AdaptiveConfig {
    /// `capacity` moved inside `[min_capacity, max_capacity]`.
    pub fn clamp(&self, capacity: usize) -> usize {
        capacity.clamp(self.min_capacity, self.max_capacity.max(self.min_capacity))
    }

    /// Checks every field; the error names it (`min_capacity`, `smoothing`, ...).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_capacity == 0 {
            return Err(ConfigError::new(
                "min_capacity",
                "must be at least 1, got 0",
            ));
        }
        if self.max_capacity < self.min_capacity {
            return Err(ConfigError::new(
                "max_capacity",
                format!(
                    "must be at least min_capacity ({}), got {}",
                    self.min_capacity, self.max_capacity
                ),
            ));
        }
        ConfigError::require_positive("window", self.window)?;
        ConfigError::require_positive("min_rtt_interval", self.min_rtt_interval)?;
        if self.min_samples == 0 {
            return Err(ConfigError::new("min_samples", "must be at least 1, got 0"));
        }
        if self.increase == 0 {
            return Err(ConfigError::new("increase", "must be at least 1, got 0"));
        }
        // (field, value, lowest, lowest allowed, highest, highest allowed)
        let ranges = [
            (
                "latency_quantile",
                self.latency_quantile,
                0.0,
                false,
                1.0,
                true,
            ),
            ("smoothing", self.smoothing, 0.0, false, 1.0, true),
            ("min_rtt_jitter", self.min_rtt_jitter, 0.0, true, 1.0, false),
            ("backoff", self.backoff, 0.0, false, 1.0, false),
            ("buffer", self.buffer, 0.0, true, 10.0, true),
            ("tolerance", self.tolerance, 1.0, false, 100.0, true),
        ];
        for (field, v, lo, lo_in, hi, hi_in) in ranges {
            let above = if lo_in { v >= lo } else { v > lo };
            let below = if hi_in { v <= hi } else { v < hi };
            if !(above && below) {
                let (open, close) = (if lo_in { "[" } else { "(" }, if hi_in { "]" } else { ")" });
                return Err(ConfigError::new(
                    field,
                    format!("must be in {open}{lo}, {hi}{close}, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(v: serde_json::Value) -> String {
        let c: AdaptiveConfig = serde_json::from_value(v).unwrap();
        c.validate().unwrap_err().field
    }

    #[test]
    fn defaults_parse_and_validate() {
        let c: AdaptiveConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c, AdaptiveConfig::default());
        c.validate().unwrap();
        let c: AdaptiveConfig = serde_json::from_value(
            json!({"algorithm": "aimd", "min_capacity": 4, "max_capacity": 4, "latency": "body",
                   "window": 0.5, "min_rtt_interval": 10}),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.algorithm, c.latency),
            (Algorithm::Aimd, LatencyMode::Body)
        );
        assert_eq!((c.clamp(1), c.clamp(9)), (4, 4));
        assert!(serde_json::from_value::<AdaptiveConfig>(json!({"algorithm": "vegas"})).is_err());
        assert!(serde_json::from_value::<AdaptiveConfig>(json!({"min_capacty": 1})).is_err());
    }

    #[test]
    fn each_bad_field_is_named() {
        for (v, f) in [
            (json!({"min_capacity": 0}), "min_capacity"),
            (
                json!({"min_capacity": 5, "max_capacity": 4}),
                "max_capacity",
            ),
            (json!({"window": 0}), "window"),
            (json!({"min_rtt_interval": 0}), "min_rtt_interval"),
            (json!({"min_samples": 0}), "min_samples"),
            (json!({"increase": 0}), "increase"),
            (json!({"latency_quantile": 0}), "latency_quantile"),
            (json!({"latency_quantile": 1.5}), "latency_quantile"),
            (json!({"smoothing": 0}), "smoothing"),
            (json!({"min_rtt_jitter": 1}), "min_rtt_jitter"),
            (json!({"backoff": 1}), "backoff"),
            (json!({"buffer": -0.1}), "buffer"),
            (json!({"tolerance": 1}), "tolerance"),
        ] {
            assert_eq!(field(v.clone()), f, "{v}");
        }
    }
}
