//! Serde configuration of the shared storage (YAML durations are f64 seconds).
//!
//! ```yaml
//! storage:
//!   type: redis                 # memory (default; no url needed) | redis
//!   url: redis://:secret@127.0.0.1:6379   # rediss:// for TLS; comma-separated seeds for a Cluster
//!   key_prefix: portcullis      # every key is `{<key_prefix>:<endpoint>}:...`
//!   lease_ttl: 10               # seconds a dead process's slots survive it
//!   expected_workers: 1         # per-process limit during an outage: ceil(capacity / this)
//!   on_error: local             # local | reject | allow
//!   timeout: 0.5                # seconds, every Redis call
//!   ping_interval: 5            # seconds between readiness PINGs
//!   failure_threshold: 3        # consecutive failed PINGs before "not ready"
//!   tls_ca_file: /etc/redis/ca.pem      # rediss://: trust this CA instead of the system's
//!   tls_cert_file: /etc/redis/client.pem  # rediss://: client certificate (mutual TLS) ...
//!   tls_key_file: /etc/redis/client.key   # ... and its key (both or neither)
//! ```
//!
//! Three shorthands stand for a whole section: `storage: memory`, `storage: null` (or an
//! empty `storage:`) for the in-process default, and `storage: redis://host:port` (or
//! `rediss://...`, or comma-separated seeds) for `{type: redis, url: ...}` with every other
//! field at its default.

use portcullis_core::ConfigError;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where admission slots are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// In-process counting (`portcullis_admission::LocalCapacity`); one limit per process.
    #[default]
    Memory,
    /// One global limit per endpoint shared through Redis by every process.
    Redis,
}

/// What a process does while Redis is unreachable (`storage.on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Keep serving with a per-process limit of `ceil(capacity / expected_workers)` (at least
    /// 1), warning once per outage.
    #[default]
    Local,
    /// Refuse requests with 503 `storage_unavailable`.
    Reject,
    /// Admit every request (no limit) until Redis is back.
    Allow,
}

/// The `storage` section of the gateway configuration.
///
/// `Debug` and [`redacted_url`](StorageConfig::redacted_url) never show the password.
///
/// It deserializes from the full mapping or from a shorthand: `memory` or `null` (the
/// default), or a `redis://` / `rediss://` URL (`type: redis` with that `url`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `memory` (default) or `redis`.
    #[serde(rename = "type")]
    pub kind: StorageType,
    /// The Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS). Several
    /// comma-separated URLs are the seed nodes of a Redis Cluster; a single URL pointing at a
    /// cluster-enabled node is detected as a Cluster too. Required for `type: redis`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Prefix of every key (default `portcullis`).
    pub key_prefix: String,
    /// How long the slots of a process survive it when it stops heart-beating (default 10 s).
    #[serde(with = "portcullis_core::seconds")]
    pub lease_ttl: Duration,
    /// How many processes are expected to share the limit; sizes the per-process limit of
    /// `on_error: local` (default 1).
    pub expected_workers: usize,
    /// Behaviour while Redis is unreachable (default `local`).
    pub on_error: OnError,
    /// Timeout of every Redis call (default 0.5 s).
    #[serde(with = "portcullis_core::seconds")]
    pub timeout: Duration,
    /// Interval of the readiness PING loop (default 5 s).
    #[serde(with = "portcullis_core::seconds")]
    pub ping_interval: Duration,
    /// Consecutive failed PINGs before readiness turns false (default 3).
    pub failure_threshold: u32,
    /// With `rediss://`: a PEM file of the CA certificate(s) to trust instead of the system's
    /// trust store (a private CA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: a PEM client certificate, for servers that require one (mutual
    /// TLS; Redis `tls-auth-clients yes`). Needs `tls_key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

/// Default `key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "portcullis";
/// Default `lease_ttl`: 10 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default `timeout`: 0.5 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `ping_interval`: 5 s.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);
/// Default `failure_threshold`: 3.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageType::Memory,
            url: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
            expected_workers: 1,
            on_error: OnError::Local,
            timeout: DEFAULT_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl StorageConfig {
    /// A `type: redis` configuration for `url` with every other field at its default.
    pub fn redis(url: impl Into<String>) -> Self {
        Self {
            kind: StorageType::Redis,
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// Checks what serde cannot; the error names the field relative to the `storage`
    /// section (`url`, `ping_interval`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kind == StorageType::Redis {
            let url = self.url.as_deref().unwrap_or("").trim();
            if url.is_empty() {
                return Err(ConfigError::new(
                    "url",
                    "required when storage.type is redis",
                ));
            }
            for u in url.split(',') {
                let u = u.trim();
                if !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("redis+unix://")
                    || u.starts_with("unix://"))
                {
                    return Err(ConfigError::new(
                        "url",
                        format!("`{}` is not a redis:// or rediss:// URL", redact_url(u)),
                    ));
                }
                // What `RedisStorage::connect` would refuse, refused here (and by `--check`).
                redis::IntoConnectionInfo::into_connection_info(u).map_err(|e| {
                    ConfigError::new(
                        "url",
                        format!("`{}`: {}", redact_url(u), redact_url(&e.to_string())),
                    )
                })?;
            }
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "key_prefix",
                "must be non-empty and contain no `{` or `}`",
            ));
        }
        if self.lease_ttl < Duration::from_millis(100) {
            return Err(ConfigError::new("lease_ttl", "must be at least 0.1 s"));
        }
        if self.expected_workers == 0 {
            return Err(ConfigError::new("expected_workers", "must be at least 1"));
        }
        ConfigError::require_positive("timeout", self.timeout)?;
        // Below 10 ms the PING loop would be a busy loop against Redis.
        if self.ping_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "ping_interval",
                format!(
                    "must be at least 0.01 s (10 ms), got {}",
                    self.ping_interval.as_secs_f64()
                ),
            ));
        }
        if self.failure_threshold == 0 {
            return Err(ConfigError::new("failure_threshold", "must be at least 1"));
        }
        self.validate_tls()
    }

    /// The `tls_*` files: only with `rediss://`, readable, and a key with every certificate.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let files = [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ];
        let tls = self
            .url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .any(|u| u.trim().starts_with("rediss://"));
        for (field, path) in files {
            let Some(path) = path else { continue };
            if !tls {
                return Err(ConfigError::new(
                    field,
                    "only used with a rediss:// url (storage.url is not TLS)",
                ));
            }
            if let Err(e) = std::fs::metadata(path).and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a file"))
                }
            }) {
                return Err(ConfigError::new(
                    field,
                    format!("cannot read `{}`: {e}", path.display()),
                ));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::new(
                "tls_cert_file",
                "a client certificate needs tls_key_file, and the key needs tls_cert_file",
            ));
        }
        Ok(())
    }

    /// The URL(s) with any password replaced by `***`, safe to log.
    pub fn redacted_url(&self) -> Option<String> {
        self.url
            .as_deref()
            .map(|u| u.split(',').map(redact_url).collect::<Vec<_>>().join(","))
    }

    /// The per-process limit used by `on_error: local`: `ceil(capacity / expected_workers)`,
    /// at least 1.
    pub fn local_limit(&self, capacity: usize) -> usize {
        capacity.div_ceil(self.expected_workers.max(1)).max(1)
    }
}

impl Serialize for StorageConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The derived (remote = "Self") mapping.
        StorageConfig::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for StorageConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StorageVisitor)
    }
}

/// The URL schemes the `storage: <url>` shorthand accepts.
const SHORTHAND_SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];

/// The `storage` value: the mapping (read by the derived code, so its errors name the
/// field), or a shorthand.
struct StorageVisitor;

impl<'de> Visitor<'de> for StorageVisitor {
    type Value = StorageConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a storage mapping ({type: memory} or {type: redis, url: ...}), `memory`, `null` or a redis:// / rediss:// URL")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StorageConfig, A::Error> {
        StorageConfig::deserialize(MapAccessDeserializer::new(map))
    }

    fn visit_unit<E: de::Error>(self) -> Result<StorageConfig, E> {
        Ok(StorageConfig::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<StorageConfig, E> {
        Ok(StorageConfig::default())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StorageConfig, E> {
        let v = v.trim();
        if v == "memory" {
            return Ok(StorageConfig::default());
        }
        if SHORTHAND_SCHEMES.iter().any(|s| v.starts_with(s)) {
            return Ok(StorageConfig::redis(v));
        }
        Err(E::invalid_value(de::Unexpected::Str(&redact_url(v)), &self))
    }
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("kind", &self.kind)
            .field("url", &self.redacted_url())
            .field("key_prefix", &self.key_prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("expected_workers", &self.expected_workers)
            .field("on_error", &self.on_error)
            .field("timeout", &self.timeout)
            .field("ping_interval", &self.ping_interval)
            .field("failure_threshold", &self.failure_threshold)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// `url` with the password (and a username's password part) replaced by `***`.
///
/// ```
/// use portcullis_redis::redact_url;
/// assert_eq!(redact_url("redis://:hunter2@h:6379/0"), "redis://:***@h:6379/0");
/// assert_eq!(redact_url("rediss://user:hunter2@h"), "rediss://user:***@h");
/// assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_owned(),
    };
    format!(
        "{}{}{}{}",
        &url[..scheme_end],
        redacted,
        &authority[at..],
        &rest[authority_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_memory_needs_no_url() {
        let c: StorageConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, StorageConfig::default());
        assert_eq!(c.kind, StorageType::Memory);
        c.validate().unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.on_error, OnError::Local);
        assert_eq!(c.key_prefix, "portcullis");
        let c: StorageConfig = serde_json::from_str(r#"{"type": "memory"}"#).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn full_redis_config_and_errors() {
        let c: StorageConfig = serde_json::from_value(serde_json::json!({
            "type": "redis", "url": "redis://:pw@127.0.0.1:6379", "key_prefix": "gw",
            "lease_ttl": 2.5, "expected_workers": 3, "on_error": "reject", "timeout": 0.25,
            "ping_interval": 1, "failure_threshold": 2
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.lease_ttl, Duration::from_millis(2500));
        assert_eq!(c.on_error, OnError::Reject);
        assert_eq!(c.local_limit(8), 3);
        assert_eq!(c.local_limit(1), 1);
        assert_eq!(c.local_limit(0), 1);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("pw@"), "{dbg}");
        assert!(dbg.contains(":***@"), "{dbg}");
        let back: StorageConfig =
            serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        let e = serde_json::from_str::<StorageConfig>(r#"{"typ": "redis"}"#).unwrap_err();
        assert!(e.to_string().contains("typ"), "{e}");
        let c: StorageConfig = serde_json::from_str(r#"{"type": "redis"}"#).unwrap();
        let e = c.validate().unwrap_err().within("storage");
        assert!(e.to_string().starts_with("storage.url"), "{e}");
        let c = StorageConfig::redis("http://:secret@x");
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "url");
        assert!(!e.to_string().contains("secret"), "{e}");
        for bad in [
            "redis://:secret@127.0.0.1:99999",
            "redis://h:1,rediss://[::1",
        ] {
            let e = StorageConfig::redis(bad).validate().unwrap_err();
            assert_eq!(e.field, "url", "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        StorageConfig::redis("redis://127.0.0.1:6379/2,redis://h:7000")
            .validate()
            .unwrap();
        assert!(serde_json::from_str::<StorageConfig>(r#"{"on_error": "explode"}"#).is_err());
    }

    #[test]
    fn shorthands_stand_for_the_mapping() {
        for memory in ["\"memory\"", "null", "\" memory \""] {
            let c: StorageConfig = serde_json::from_str(memory).unwrap();
            assert_eq!(c, StorageConfig::default(), "{memory}");
        }
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://:pw@cache.internal:6380/1",
            "redis://a:7000,redis://b:7000",
        ] {
            let c: StorageConfig = serde_json::from_value(serde_json::json!(url)).unwrap();
            assert_eq!(c, StorageConfig::redis(url));
            c.validate().unwrap();
        }
        // The mapping still names its fields.
        let e =
            serde_json::from_str::<StorageConfig>(r#"{"type": "redis", "urll": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `urll`"), "{e}");
        let e = serde_json::from_str::<StorageConfig>(r#"{"lease_ttl": "long"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        // A string that is neither is refused without showing a password.
        for bad in ["\"redis\"", "\"http://:hunter2@h:1\"", "\"\"", "3", "[1]"] {
            let e = serde_json::from_str::<StorageConfig>(bad).unwrap_err();
            assert!(e.to_string().contains("storage mapping"), "{bad}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // It serializes as the mapping, which reads back.
        let c = StorageConfig::redis("redis://h:1");
        let back: StorageConfig =
            serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
