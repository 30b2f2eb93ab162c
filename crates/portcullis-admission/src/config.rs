//! Serde configuration of the admission layer (YAML durations are f64 seconds).
//!
//! ```yaml
//! queue_timeout: 30        # seconds a request may wait for a slot (default 30)
//! max_queue: 1000          # optional; default unbounded
//! endpoints:
//!   /v1/models/*:          # a prefix pattern: /v1/models and every path under it,
//!     capacity: 16         # sharing these 16 slots (one endpoint, one queue)
//!   /predict:
//!     method: POST         # optional; only this method is admission-controlled
//!     capacity: 8          # optional; absent = probed (a default applies until then)
//!     queue_timeout: 120   # optional; overrides the global one
//!     headers: {Authorization: Bearer t}   # optional; used by the probe, kept as is
//!     body: {input: sample}                 # optional; used by the probe, kept as is
//!     probe_path: /predict   # optional; where the probe sends (needed for a `/*` pattern)
//!     adaptive:              # optional; the capacity adapts at run time (8 is the start)
//!       algorithm: gradient  # or aimd
//!       min_capacity: 2
//!       max_capacity: 32
//! adaptive: {max_capacity: 64}  # optional; the default block of every other endpoint
//! ```
//!
//! See [`adaptive`](crate::adaptive) for the `adaptive:` block.
//!
//! # Endpoint keys
//!
//! A key is an exact path (`/predict`), or a prefix pattern ending in `/*`
//! (`/v1/models/*`), which matches the prefix itself (`/v1/models`) and every path under it
//! on a `/` boundary (`/v1/models/a`, `/v1/models/a/b`; not `/v1/modelsX`). A pattern is one
//! endpoint: every path it matches shares its capacity and queue, and its stats are
//! reported under the pattern key. An exact key wins over a pattern and the longest
//! pattern wins over shorter ones; see [`Endpoints`](crate::Endpoints) for the full
//! matching rule. [`Config::validate`] refuses a `*` anywhere but in a trailing `/*`, and
//! a pattern without a prefix (`/*`).
//!
//! # `max_queue` and memory
//!
//! By default a request is never refused for being queued: the queue is unbounded and
//! requests only fail after `queue_timeout`. Each queued request costs
//! its connection, its request head (the body is not read while queued), the response
//! future and a waiter node: a few KiB per waiter. A burst of N requests therefore holds
//! about N × (a few KiB) for up to `queue_timeout`. Under a sustained overload that arrival
//! rate × `queue_timeout` product can be large; set `max_queue` to answer 503 `queue_full`
//! at once instead of holding the memory (and the client) for a wait that is unlikely to
//! end well.

use crate::adaptive::AdaptiveConfig;
use portcullis_core::ConfigError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The admission configuration: global settings and the watched endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How long a request may wait for a slot before a 504 `queue_timeout` (default 30 s).
    #[serde(with = "portcullis_core::seconds")]
    pub queue_timeout: Duration,
    /// Bound on queued requests per endpoint; beyond it, 503 `queue_full` at once. Default
    /// `None`: unbounded (see the [module docs](self) for the memory trade-off).
    pub max_queue: Option<usize>,
    /// Honour the HTTP header `x-request-timeout` (seconds, a float) as the request's
    /// deadline: a queued request is answered 504 `deadline_exceeded` once it passes, and
    /// the header is rewritten to the time left when it is admitted (default `false`;
    /// `grpc-timeout` is always honoured; see [`crate::deadline`]).
    pub honor_request_timeout: bool,
    /// Watched endpoints by key: an exact path (`/predict`), or a prefix pattern ending in
    /// `/*` (`/v1/models/*`) that matches `/v1/models` and every path under it
    /// (`/v1/models/a/b`, not `/v1/modelsX`) and shares one capacity and queue between
    /// them, with stats under the pattern key. Exact keys win over patterns, longer
    /// patterns over shorter ones; see [`Endpoints`](crate::Endpoints). Other paths pass
    /// through uncounted.
    pub endpoints: BTreeMap<String, EndpointConfig>,
    /// The default `adaptive:` block of every watched endpoint that has none of its own
    /// (an endpoint's own block replaces it whole; `adaptive: {enabled: false}` turns it
    /// off for one endpoint). `None`: fixed capacities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            queue_timeout: crate::DEFAULT_QUEUE_TIMEOUT,
            max_queue: None,
            honor_request_timeout: false,
            endpoints: BTreeMap::new(),
            adaptive: None,
        }
    }
}

/// One watched endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointConfig {
    /// Only requests with this method are admission-controlled (`None`: every method).
    /// Case-insensitive (`post` = `POST`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Maximum concurrent requests. `None`: to be probed; until the probe sets it, the
    /// gateway applies its default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
    /// Overrides the global `queue_timeout` for this endpoint.
    #[serde(
        with = "portcullis_core::seconds::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub queue_timeout: Option<Duration>,
    /// Request headers the probe sends (not used by admission; kept as given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// Request body the probe sends (not used by admission; kept as given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// The concrete path the probe sends to (not used by admission). Default: the key
    /// itself; required to probe a prefix pattern (`/v1/models/*`) that has no `capacity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_path: Option<String>,
    /// How the capacity adapts at run time (overrides the top-level `adaptive:`); the
    /// `capacity` (or the probed one, or the default) is then the initial limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveConfig>,
}

impl EndpointConfig {
    /// The parsed method filter.
    pub fn parsed_method(&self) -> Result<Option<http::Method>, String> {
        match &self.method {
            None => Ok(None),
            Some(m) => http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map(Some)
                .map_err(|_| format!("invalid method `{m}`")),
        }
    }

    /// The path probed for the endpoint under `key`: `probe_path`, else `key` itself;
    /// `None` for a prefix pattern without `probe_path`.
    pub fn probe_path<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        match &self.probe_path {
            Some(p) => Some(p),
            None if key.ends_with("/*") => None,
            None => Some(key),
        }
    }

    /// The endpoint's own fields (paths relative to it: `capacity`, `method`), with
    /// `adaptive` the block that applies to it.
    fn validate(&self, adaptive: Option<&AdaptiveConfig>) -> Result<(), ConfigError> {
        if self.capacity == Some(0) {
            return Err(ConfigError::new("capacity", "must be at least 1, got 0"));
        }
        if let Some(a) = &self.adaptive {
            a.validate().map_err(|e| e.within("adaptive"))?;
        }
        if let (Some(c), Some(a)) = (self.capacity, adaptive) {
            check_within_bounds("capacity", c, a)?;
        }
        if let Some(t) = self.queue_timeout {
            ConfigError::require_positive("queue_timeout", t)?;
        }
        self.parsed_method()
            .map_err(|m| ConfigError::new("method", m))?;
        if let Some(p) = &self.probe_path {
            if !p.starts_with('/') || p.contains('*') {
                return Err(ConfigError::new(
                    "probe_path",
                    "must be a concrete path starting with `/`",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The `adaptive:` block that applies to `endpoint`: its own, else the top-level one;
    /// `None` when neither is set or the one that applies says `enabled: false`.
    pub fn adaptive_for<'a>(&'a self, endpoint: &'a EndpointConfig) -> Option<&'a AdaptiveConfig> {
        endpoint
            .adaptive
            .as_ref()
            .or(self.adaptive.as_ref())
            .filter(|a| a.enabled)
    }

    /// The `queue_timeout` that applies to `endpoint`.
    pub fn queue_timeout_for(&self, endpoint: &EndpointConfig) -> Duration {
        endpoint.queue_timeout.unwrap_or(self.queue_timeout)
    }

    /// Checks what serde cannot: timeouts are positive, paths start with `/`, a `*` only
    /// appears as a trailing `/*` after a non-empty prefix, capacities are at least 1,
    /// methods parse, a `probe_path` is concrete. The error names the offending field
    /// (`endpoints./x.method`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::require_positive("queue_timeout", self.queue_timeout)?;
        if let Some(a) = &self.adaptive {
            a.validate().map_err(|e| e.within("adaptive"))?;
        }
        for (path, ep) in &self.endpoints {
            crate::pattern::validate_key(path)
                .map_err(|m| ConfigError::new(path.as_str(), m).within("endpoints"))?;
            ep.validate(self.adaptive_for(ep))
                .map_err(|e| e.within(path).within("endpoints"))?;
        }
        Ok(())
    }
}

/// `Err` for `field` unless `min_capacity ≤ capacity ≤ max_capacity` of `adaptive`.
pub fn check_within_bounds(
    field: &str,
    capacity: usize,
    adaptive: &AdaptiveConfig,
) -> Result<(), ConfigError> {
    if capacity < adaptive.min_capacity || capacity > adaptive.max_capacity {
        return Err(ConfigError::new(
            field,
            format!(
                "must be within adaptive min_capacity..=max_capacity ({}..={}), got {capacity}",
                adaptive.min_capacity, adaptive.max_capacity
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_endpoint() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.max_queue, None);

        let c: Config = serde_json::from_value(serde_json::json!({
            "queue_timeout": 2.5,
            "max_queue": 10,
            "endpoints": {
                "/predict": {"method": "post", "capacity": 8, "queue_timeout": 0.25,
                              "headers": {"Authorization": "Bearer x"}, "body": {"input": [1, 2]}},
                "/embed": {}
            }
        }))
        .unwrap();
        c.validate().unwrap();
        let p = &c.endpoints["/predict"];
        assert_eq!(p.parsed_method().unwrap(), Some(http::Method::POST));
        assert_eq!(c.queue_timeout_for(p), Duration::from_millis(250));
        assert_eq!(
            c.queue_timeout_for(&c.endpoints["/embed"]),
            Duration::from_millis(2500)
        );
        assert_eq!(c.endpoints["/embed"].capacity, None);
        assert_eq!(p.body.as_ref().unwrap()["input"][1], 2);
        // Round trip (the probe's bench command writes this config back).
        let back: Config = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn rejects_unknown_fields_bad_durations_and_paths() {
        let e = serde_json::from_str::<Config>(r#"{"queue_timout": 1}"#).unwrap_err();
        assert!(e.to_string().contains("queue_timout"), "{e}");
        let e =
            serde_json::from_str::<Config>(r#"{"endpoints": {"/a": {"capacty": 1}}}"#).unwrap_err();
        assert!(e.to_string().contains("capacty"), "{e}");
        assert!(serde_json::from_str::<Config>(r#"{"queue_timeout": -1}"#).is_err());
        let c: Config = serde_json::from_str(r#"{"endpoints": {"a": {}}}"#).unwrap();
        assert_eq!(c.validate().unwrap_err().field, "endpoints.a");
        let c: Config =
            serde_json::from_str(r#"{"endpoints": {"/a": {"method": "GE T"}}}"#).unwrap();
        assert_eq!(c.validate().unwrap_err().field, "endpoints./a.method");
    }

    #[test]
    fn adaptive_blocks_validate_and_bound_the_capacity() {
        use serde_json::json;
        let field = |v: serde_json::Value| {
            let c: Config = serde_json::from_value(v).unwrap();
            c.validate().map_err(|e| e.field)
        };
        let ok = json!({"adaptive": {"min_capacity": 2, "max_capacity": 20},
                        "endpoints": {"/a": {"capacity": 8}, "/b": {},
                                      "/c": {"capacity": 50, "adaptive": {"max_capacity": 64}},
                                      "/d": {"capacity": 500, "adaptive": {"enabled": false}}}});
        field(ok.clone()).unwrap();
        let c: Config = serde_json::from_value(ok).unwrap();
        assert_eq!(c.adaptive_for(&c.endpoints["/a"]).unwrap().max_capacity, 20);
        assert_eq!(c.adaptive_for(&c.endpoints["/c"]).unwrap().max_capacity, 64);
        assert!(c.adaptive_for(&c.endpoints["/d"]).is_none());
        assert_eq!(
            field(json!({"adaptive": {"max_capacity": 4}, "endpoints": {"/a": {"capacity": 8}}})),
            Err("endpoints./a.capacity".into())
        );
        assert_eq!(
            field(json!({"endpoints": {"/a": {"capacity": 1, "adaptive": {"min_capacity": 2}}}})),
            Err("endpoints./a.capacity".into())
        );
        assert_eq!(
            field(json!({"endpoints": {"/a": {"adaptive": {"min_capacity": 0}}}})),
            Err("endpoints./a.adaptive.min_capacity".into())
        );
        assert_eq!(
            field(json!({"adaptive": {"min_capacity": 9, "max_capacity": 3}})),
            Err("adaptive.max_capacity".into())
        );
        let e = serde_json::from_value::<Config>(json!({"adaptive": {"algoritm": "aimd"}}))
            .unwrap_err();
        assert!(e.to_string().contains("algoritm"), "{e}");
    }

    #[test]
    fn accepts_prefix_patterns_and_rejects_malformed_ones() {
        let validate = |key: &str| {
            let c: Config =
                serde_json::from_value(serde_json::json!({"endpoints": {key: {}}})).unwrap();
            c.validate()
        };
        for ok in ["/v1/models/*", "/a/*", "/v1/models", "/v1/models/"] {
            validate(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("/a*b", "trailing `/*`"),
            ("/a*", "trailing `/*`"),
            ("/a/*/b", "trailing `/*`"),
            ("/a/**", "trailing `/*`"),
            ("/*/b/*", "trailing `/*`"),
            ("*", "must start with `/`"),
            ("/*", "non-empty prefix"),
            ("/a//*", "must not end with `/`"),
        ] {
            let e = validate(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("endpoints.{bad}: ")), "{bad}: {e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn refuses_zero_capacities_and_timeouts_and_pattern_probe_paths() {
        use serde_json::json;
        let field = |v: serde_json::Value| {
            let c: Config = serde_json::from_value(v).unwrap();
            c.validate().unwrap_err().field
        };
        assert_eq!(field(json!({"queue_timeout": 0})), "queue_timeout");
        assert_eq!(
            field(json!({"endpoints": {"/w": {"capacity": 0}}})),
            "endpoints./w.capacity"
        );
        assert_eq!(
            field(json!({"endpoints": {"/w": {"queue_timeout": 0}}})),
            "endpoints./w.queue_timeout"
        );
        assert_eq!(
            field(json!({"endpoints": {"/v1/*": {"probe_path": "/v1/*"}}})),
            "endpoints./v1/*.probe_path"
        );
        let c: Config = serde_json::from_value(
            json!({"endpoints": {"/v1/*": {"probe_path": "/v1/models"}, "/w": {}}}),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.endpoints["/v1/*"].probe_path("/v1/*"), Some("/v1/models"));
        assert_eq!(c.endpoints["/w"].probe_path("/w"), Some("/w"));
        assert_eq!(EndpointConfig::default().probe_path("/v1/*"), None);
    }
}
