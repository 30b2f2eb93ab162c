//! The balancer's serde configuration (part of the gateway's YAML contract).

use portcullis_core::classify::{GrpcCodeSet, ProtocolClassifier};
use portcullis_core::ConfigError;
use portcullis_health::{CheckerConfig, GrpcHealthProbe, HealthPolicy};
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
    /// The healthy replica of the best tier with the fewest requests in flight (an exact
    /// minimum over all of them, not a sample); ties rotate.
    LeastConnections,
    /// Smooth weighted round robin over the healthy replicas of the best tier, by
    /// `upstreams[].weight`.
    Weighted,
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
    /// Share of the traffic under `routing_strategy: weighted`, relative to the other
    /// replicas of its tier (1; at least 1). The other strategies ignore it.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// The protocol of the active health check (`health_check.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// `GET <url><health_endpoint>`; 2xx is healthy (the default).
    #[default]
    Http,
    /// `grpc.health.v1.Health/Check` over h2c for `health_check.service`; `SERVING` is
    /// healthy ([`GrpcHealthProbe`]).
    Grpc,
}

/// How replicas are health-checked (`health_check: {kind: grpc, service: ""}`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// `http` (default) or `grpc`.
    pub kind: HealthCheckKind,
    /// The service name a `grpc` check asks about (`""`, the default: the whole server).
    /// Only for `kind: grpc`.
    pub service: String,
}

/// The balancer and health-check settings. Durations are seconds in YAML (`0.5`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The replicas.
    pub upstreams: Vec<UpstreamConfig>,
    /// `p2c` (default) | `round-robin` | `first-healthy` | `least-connections` | `weighted`.
    pub routing_strategy: RoutingStrategy,
    /// Path probed on every replica (`/healthz`).
    pub health_endpoint: String,
    /// Time between the starts of two health-check cycles (1 s; at least 10 ms).
    #[serde(with = "portcullis_core::seconds")]
    pub health_check_interval: Duration,
    /// Time a health probe may take (1 s).
    #[serde(with = "portcullis_core::seconds")]
    pub health_check_timeout: Duration,
    /// Consecutive failed probes that mark a replica unhealthy (3).
    pub failure_threshold: u32,
    /// Consecutive good probes that mark it healthy again (2).
    pub recovery_threshold: u32,
    /// Up to this much random delay added to each interval (0; at most
    /// `health_check_interval`).
    #[serde(with = "portcullis_core::seconds")]
    pub health_check_jitter: Duration,
    /// Consecutive failed live responses that eject a replica; 0 turns passive ejection off
    /// (5).
    pub eject_after: u32,
    /// The first ejection's cooldown (30 s); it doubles on each consecutive re-ejection.
    #[serde(with = "portcullis_core::seconds")]
    pub eject_for: Duration,
    /// Cap of the growing ejection time (300 s).
    #[serde(with = "portcullis_core::seconds")]
    pub eject_max: Duration,
    /// Panic mode: when fewer than this percentage of replicas are healthy, route to all of
    /// them anyway (0 = off).
    pub panic_threshold: f64,
    /// With `true`, `recovery_threshold` good active health checks also end a passive
    /// ejection (Envoy's `successful_active_health_check_uneject_host`). With `false` (the
    /// default) a passively ejected replica stays out until its cooldown ends and the one live
    /// request leased to it succeeds: a replica that passes `/healthz` but fails live traffic
    /// would otherwise be back within a check or two and its cooldown would never grow.
    pub uneject_on_active_check: bool,
    /// The `grpc-status` codes that count as a failed gRPC call, for passive ejection, the
    /// breaker and the per-upstream `failures` (`[UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
    /// UNKNOWN, DATA_LOSS]`; names in `SCREAMING_SNAKE_CASE` or `snake_case`; see
    /// [`portcullis_core::classify`] for why `PERMISSION_DENIED` is not among them).
    pub grpc_failure_codes: GrpcCodeSet,
    /// The health check's protocol: `{kind: http}` (the default, `health_endpoint`) or
    /// `{kind: grpc, service: ""}` (the gRPC health checking protocol).
    pub health_check: HealthCheckConfig,
}

/// The shortest `health_check_interval`: 10 ms (a shorter one is a busy loop against the
/// replicas).
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

impl Default for Config {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            routing_strategy: RoutingStrategy::P2c,
            health_endpoint: "/healthz".into(),
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_secs(1),
            failure_threshold: 3,
            recovery_threshold: 2,
            health_check_jitter: Duration::ZERO,
            eject_after: 5,
            eject_for: Duration::from_secs(30),
            eject_max: Duration::from_secs(300),
            panic_threshold: 0.0,
            uneject_on_active_check: false,
            grpc_failure_codes: GrpcCodeSet::DEFAULT_FAILURES,
            health_check: HealthCheckConfig::default(),
        }
    }
}

impl Config {
    /// Checks what serde cannot; the error names the field. Upstream URLs are not checked
    /// here (a replica key need not be a URL): the gateway checks them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("health_check_interval", self.health_check_interval),
            ("health_check_timeout", self.health_check_timeout),
            ("eject_for", self.eject_for),
            ("eject_max", self.eject_max),
        ] {
            ConfigError::require_positive(name, v)?;
        }
        if self.health_check_interval < MIN_CHECK_INTERVAL {
            return Err(ConfigError::new(
                "health_check_interval",
                format!(
                    "must be at least 0.01 s (10 ms), got {}",
                    self.health_check_interval.as_secs_f64()
                ),
            ));
        }
        if self.health_check_jitter > self.health_check_interval {
            return Err(ConfigError::new(
                "health_check_jitter",
                format!(
                    "must not exceed health_check_interval ({} s), got {}",
                    self.health_check_interval.as_secs_f64(),
                    self.health_check_jitter.as_secs_f64()
                ),
            ));
        }
        for (name, v) in [
            ("failure_threshold", self.failure_threshold),
            ("recovery_threshold", self.recovery_threshold),
        ] {
            if v == 0 {
                return Err(ConfigError::new(name, "must be at least 1"));
            }
        }
        if !(0.0..=100.0).contains(&self.panic_threshold) {
            return Err(ConfigError::new(
                "panic_threshold",
                format!(
                    "must be a percentage between 0 and 100, got {}",
                    self.panic_threshold
                ),
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.weight == 0 {
                return Err(ConfigError::new(
                    format!("upstreams[{i}].weight"),
                    "must be at least 1",
                ));
            }
        }
        if self.health_check.kind == HealthCheckKind::Http && !self.health_check.service.is_empty()
        {
            return Err(ConfigError::new(
                "health_check.service",
                "is only used by `kind: grpc` (the HTTP check requests `health_endpoint`)",
            ));
        }
        if !self.health_endpoint.starts_with('/') {
            return Err(ConfigError::new(
                "health_endpoint",
                format!(
                    "must be a path starting with `/`, got `{}`",
                    self.health_endpoint
                ),
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
            eject_for: self.eject_for,
            eject_max: self.eject_max,
        }
    }

    /// The response classifier of the HTTP forms: `grpc_failure_codes` for gRPC requests,
    /// 5xx for the others.
    pub fn classifier(&self) -> ProtocolClassifier {
        ProtocolClassifier::new(self.grpc_failure_codes)
    }

    /// The gRPC health probe of `health_check` (`None` for `kind: http`), with
    /// `health_check_timeout`. Start it with
    /// [`ReplicaRegistry::spawn_checker`](crate::ReplicaRegistry::spawn_checker).
    pub fn grpc_health_probe(&self) -> Option<GrpcHealthProbe> {
        (self.health_check.kind == HealthCheckKind::Grpc).then(|| {
            GrpcHealthProbe::new(self.health_check.service.clone(), self.health_check_timeout)
        })
    }

    /// The active checker's timing.
    pub fn checker_config(&self) -> CheckerConfig {
        CheckerConfig {
            interval: self.health_check_interval,
            timeout: self.health_check_timeout,
            jitter: self.health_check_jitter,
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
        for (text, strategy) in [
            ("\"least-connections\"", RoutingStrategy::LeastConnections),
            ("\"weighted\"", RoutingStrategy::Weighted),
        ] {
            assert_eq!(
                serde_json::from_str::<RoutingStrategy>(text).unwrap(),
                strategy
            );
        }
    }

    #[test]
    fn weights_default_to_one_and_must_be_positive() {
        let c: Config = serde_json::from_value(serde_json::json!({
            "routing_strategy": "weighted",
            "upstreams": [{"url": "http://127.0.0.1:1", "weight": 3}, {"url": "http://127.0.0.1:2"}]
        }))
        .unwrap();
        assert_eq!((c.upstreams[0].weight, c.upstreams[1].weight), (3, 1));
        c.validate().unwrap();
        let c: Config = serde_json::from_value(serde_json::json!({
            "upstreams": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2", "weight": 0}]
        }))
        .unwrap();
        assert_eq!(c.validate().unwrap_err().field, "upstreams[1].weight");
        let e = serde_json::from_value::<Config>(serde_json::json!({
            "upstreams": [{"url": "http://127.0.0.1:1", "weight": -2}]
        }))
        .unwrap_err();
        assert!(e.to_string().contains("-2"), "{e}");
    }

    #[test]
    fn grpc_failure_codes_default_and_parse() {
        let c = Config::default();
        assert_eq!(c.grpc_failure_codes, GrpcCodeSet::DEFAULT_FAILURES);
        assert!(
            !c.grpc_failure_codes.contains(7),
            "PERMISSION_DENIED is not counted"
        );
        let c: Config = serde_json::from_value(serde_json::json!({
            "grpc_failure_codes": ["UNAVAILABLE", "permission_denied"]
        }))
        .unwrap();
        assert_eq!(c.grpc_failure_codes.codes().collect::<Vec<_>>(), [7, 14]);
        assert_eq!(c.classifier().grpc_failure_codes(), c.grpc_failure_codes);
        assert!(
            serde_json::from_str::<Config>(r#"{"grpc_failure_codes": ["UNAVAILBLE"]}"#).is_err()
        );
        assert!(serde_json::from_str::<Config>(r#"{"grpc_failure_codes": ["OK"]}"#).is_err());
    }

    #[test]
    fn health_check_kind() {
        assert_eq!(Config::default().health_check.kind, HealthCheckKind::Http);
        assert!(Config::default().grpc_health_probe().is_none());
        let c: Config = serde_json::from_value(serde_json::json!({
            "health_check": {"kind": "grpc", "service": "pkg.Svc"}
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.grpc_health_probe().unwrap().service(), "pkg.Svc");
        let c: Config = serde_json::from_value(serde_json::json!({
            "health_check": {"service": "pkg.Svc"}
        }))
        .unwrap();
        assert_eq!(c.validate().unwrap_err().field, "health_check.service");
        assert!(serde_json::from_str::<Config>(r#"{"health_check": {"kind": "tcp"}}"#).is_err());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(serde_json::from_str::<Config>(r#"{"failure_treshold": 3}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"routing_strategy": "random"}"#).is_err());
        let c = Config {
            failure_threshold: 0,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "failure_threshold");
        let c = Config {
            health_check_interval: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "health_check_interval");
        let c = Config {
            panic_threshold: 150.0,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "panic_threshold");
        let c = Config {
            health_check_interval: Duration::from_millis(5),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "health_check_interval");
        let c = Config {
            health_check_jitter: Duration::from_millis(1500),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "health_check_jitter");
        let c = Config {
            eject_for: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "eject_for");
        assert!(serde_json::from_str::<Config>(r#"{"eject_max": -1}"#).is_err());
        let c = Config {
            health_check_interval: Duration::from_millis(10),
            health_check_jitter: Duration::from_millis(10),
            ..Config::default()
        };
        c.validate().unwrap();
    }
}
