//! The balancer's serde configuration (part of the gateway's YAML contract).

use portcullis_health::{CheckerConfig, HealthPolicy};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the balancer picks a replica (`routing_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingStrategy {
    /// Power of two random choices on in-flight count over the healthy replicas of the best
    /// tier (the default).
    #[default]
    P2c,
    /// Round robin over the healthy replicas of the best tier.
    RoundRobin,
    /// The first healthy primary, else the first healthy non-primary, in insertion order.
    FirstHealthy,
}

/// One upstream replica (`upstreams[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, `http://host:port[/prefix]` (or any key for non-HTTP replicas).
    pub url: String,
    /// Primary tier: preferred while any primary is healthy.
    #[serde(default)]
    pub primary: bool,
}

/// The balancer and health-check settings. Durations are seconds (`f64`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The replicas.
    pub upstreams: Vec<UpstreamConfig>,
    /// `p2c` (default) | `round-robin` | `first-healthy`.
    pub routing_strategy: RoutingStrategy,
    /// Path probed on every replica (`/healthz`).
    pub health_endpoint: String,
    /// Seconds between the starts of two health-check cycles (1).
    pub health_check_interval: f64,
    /// Seconds a health probe may take (1).
    pub health_check_timeout: f64,
    /// Consecutive failed probes that mark a replica unhealthy (3).
    pub failure_threshold: u32,
    /// Consecutive good probes that mark it healthy again (2).
    pub recovery_threshold: u32,
    /// Up to this many seconds of random delay added to each interval (0).
    pub health_check_jitter: f64,
    /// Consecutive failed live responses that eject a replica; 0 turns passive ejection off
    /// (5).
    pub eject_after: u32,
    /// Seconds of the first ejection (30); it doubles on each consecutive re-ejection.
    pub eject_for: f64,
    /// Cap, in seconds, of the growing ejection time (300).
    pub eject_max: f64,
    /// Panic mode: when fewer than this percentage of replicas are healthy, route to all of
    /// them anyway (0 = off).
    pub panic_threshold: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            routing_strategy: RoutingStrategy::P2c,
            health_endpoint: "/healthz".into(),
            health_check_interval: 1.0,
            health_check_timeout: 1.0,
            failure_threshold: 3,
            recovery_threshold: 2,
            health_check_jitter: 0.0,
            eject_after: 5,
            eject_for: 30.0,
            eject_max: 300.0,
            panic_threshold: 0.0,
        }
    }
}

fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v).unwrap_or(Duration::ZERO)
}

impl Config {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("health_check_interval", self.health_check_interval),
            ("health_check_timeout", self.health_check_timeout),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ));
            }
        }
        let non_negative = [
            ("health_check_jitter", self.health_check_jitter),
            ("eject_for", self.eject_for),
            ("eject_max", self.eject_max),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "{name} must be a non-negative number of seconds, got {v}"
                ));
            }
        }
        if self.failure_threshold == 0 {
            return Err("failure_threshold must be at least 1".into());
        }
        if self.recovery_threshold == 0 {
            return Err("recovery_threshold must be at least 1".into());
        }
        if !(0.0..=100.0).contains(&self.panic_threshold) {
            return Err(format!(
                "panic_threshold is a percentage (0-100), got {}",
                self.panic_threshold
            ));
        }
        if !self.health_endpoint.starts_with('/') {
            return Err(format!(
                "health_endpoint must start with `/`, got `{}`",
                self.health_endpoint
            ));
        }
        Ok(())
    }

    /// The state-machine thresholds.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            failure_threshold: self.failure_threshold.max(1),
            recovery_threshold: self.recovery_threshold.max(1),
            eject_after: self.eject_after,
            eject_for: secs(self.eject_for),
            eject_max: secs(self.eject_max),
        }
    }

    /// The active checker's timing.
    pub fn checker_config(&self) -> CheckerConfig {
        CheckerConfig {
            interval: secs(self.health_check_interval),
            timeout: secs(self.health_check_timeout),
            jitter: secs(self.health_check_jitter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_field_names() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.routing_strategy, RoutingStrategy::P2c);
        assert_eq!(c.health_endpoint, "/healthz");
        assert_eq!((c.failure_threshold, c.recovery_threshold), (3, 2));
        let c: Config = serde_json::from_value(serde_json::json!({
            "routing_strategy": "first-healthy",
            "health_check_interval": 0.5,
            "health_check_jitter": 0.1,
            "eject_after": 0,
            "panic_threshold": 50,
            "upstreams": [{"url": "http://127.0.0.1:1", "primary": true}, {"url": "http://127.0.0.1:2"}]
        }))
        .unwrap();
        assert_eq!(c.routing_strategy, RoutingStrategy::FirstHealthy);
        assert!(c.upstreams[0].primary && !c.upstreams[1].primary);
        assert_eq!(c.checker_config().interval, Duration::from_millis(500));
        c.validate().unwrap();
        let rr: RoutingStrategy = serde_json::from_str("\"round-robin\"").unwrap();
        assert_eq!(rr, RoutingStrategy::RoundRobin);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(serde_json::from_str::<Config>(r#"{"failure_treshold": 3}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"routing_strategy": "random"}"#).is_err());
        let c = Config {
            failure_threshold: 0,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("failure_threshold"));
        let c = Config {
            health_check_interval: 0.0,
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("health_check_interval"));
        let c = Config {
            panic_threshold: 150.0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
