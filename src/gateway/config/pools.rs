//! Named upstream pools (`pools:`): each one a balancer of its own, with the same settings
//! as the top-level pool `default`.
//!
//! ```yaml
//! pools:
//!   gpu:
//!     upstreams: [{url: "http://10.0.0.5:8000"}]
//!     routing_strategy: least-connections
//!     health_endpoint: /health
//!     fallback: {url: "http://10.0.0.9:8000"}
//!     http2: true
//! ```
//!
//! A pool's keys are the balancer's ([`portcullis_balance::Config`]: `upstreams`,
//! `routing_strategy`, the health-check and ejection settings), plus `fallback`, `http2` and
//! `retry`. Absent keys take their defaults, as at the top level (a pool does not inherit
//! the top-level settings), except `retry`, which is the top-level `retry:` unless the pool
//! has its own (the pool always has its own budget and counters). `grpc_failure_codes` is
//! set once, at the top level, for every pool (the proxy counts each upstream's failures by
//! it), so a pool that names it is refused.
//!
//! The balancer's section is read straight from the parser, like the top-level one (see
//! [`super::sections`]): a [`PoolKeys`] hands it every key but the pool's own three, which
//! are read on the side. So an error in a pool keeps its field path and its line
//! (`pools.gpu.routing_strategy`, `pools.gpu.bogus`).

use super::{FallbackConfig, RetryConfig};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// The name of the pool of the top-level `upstreams` and settings.
pub const DEFAULT_POOL: &str = "default";

/// One entry of `pools:`: a balancer of its own, with the same settings as the top-level
/// pool `default` (its upstreams, routing strategy, health-check and ejection settings),
/// plus an optional `fallback`, `http2` and `retry`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolConfig {
    /// The balancer: `upstreams`, `routing_strategy`, the health checks and passive
    /// ejection. Its `grpc_failure_codes` is the top-level one (see
    /// [`GatewayConfig::pool_configs`](super::GatewayConfig::pool_configs)).
    pub balance: portcullis_balance::Config,
    /// This pool's circuit-breaker fallback (absent: no breaker).
    pub fallback: Option<FallbackConfig>,
    /// Reach this pool's upstreams (and its fallback) over h2c, as the top-level `http2`
    /// does for the pool `default`.
    pub http2: bool,
    /// This pool's retry settings; absent: the top-level `retry:`.
    pub retry: Option<RetryConfig>,
}

impl<'de> Deserialize<'de> for PoolConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PoolVisitor)
    }
}

struct PoolVisitor;

impl<'de> Visitor<'de> for PoolVisitor {
    type Value = PoolConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a pool: a mapping with `upstreams` and the balancer's settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PoolConfig, A::Error> {
        let mut own = OwnKeys::default();
        let balance = portcullis_balance::Config::deserialize(
            de::value::MapAccessDeserializer::new(PoolKeys { map, own: &mut own }),
        )?;
        Ok(PoolConfig {
            balance,
            fallback: own.fallback.flatten(),
            http2: own.http2.unwrap_or(false),
            retry: own.retry,
        })
    }
}

/// The pool's own keys, read on the side of the balancer's section.
#[derive(Default)]
struct OwnKeys {
    fallback: Option<Option<FallbackConfig>>,
    http2: Option<bool>,
    retry: Option<RetryConfig>,
}

/// A pool's mapping as the balancer's section sees it: its own keys are read into
/// [`OwnKeys`] as they come and skipped.
struct PoolKeys<'a, A> {
    map: A,
    own: &'a mut OwnKeys,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for PoolKeys<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<String>()? {
            let seen = match key.as_str() {
                "fallback" => self.own.fallback.replace(self.map.next_value()?).is_some(),
                "http2" => self.own.http2.replace(self.map.next_value()?).is_some(),
                "retry" => self.own.retry.replace(self.map.next_value()?).is_some(),
                "grpc_failure_codes" => {
                    return Err(de::Error::custom(
                        "unknown field `grpc_failure_codes`: it is set once, at the top level, for every pool",
                    ))
                }
                _ => return seed.deserialize(key.into_deserializer()).map(Some),
            };
            if seen {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
        }
        Ok(None)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// `true` when `name` can name a pool: lowercase ASCII letters, digits, `-` and `_`,
/// starting with a letter or digit (so that `PORTCULLIS_POOLS__<NAME>__...` reaches it and
/// it is a plain metrics label value).
pub(super) fn is_pool_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_reads_the_balancer_and_its_own_keys() {
        let pool: PoolConfig = serde_yaml_ng::from_str(
            "upstreams: [{url: \"http://a:1\"}]\nrouting_strategy: least-connections\nhttp2: true\nfallback: {url: \"http://f:1\"}\nretry: {max_attempts: 3}\nhealth_endpoint: /health\n",
        )
        .unwrap();
        assert_eq!(pool.balance.upstreams[0].url, "http://a:1");
        assert_eq!(
            pool.balance.routing_strategy,
            portcullis_balance::RoutingStrategy::LeastConnections
        );
        assert_eq!(pool.balance.health_endpoint, "/health");
        assert!(pool.http2);
        assert_eq!(pool.fallback.unwrap().url.as_deref(), Some("http://f:1"));
        assert_eq!(pool.retry.unwrap().max_attempts, 3);
        let pool: PoolConfig = serde_yaml_ng::from_str("upstreams: []\n").unwrap();
        assert_eq!(pool, PoolConfig::default());
        for (text, wanted) in [
            ("bogus: 1\n", "unknown field `bogus`"),
            (
                "grpc_failure_codes: []\n",
                "unknown field `grpc_failure_codes`",
            ),
            ("routing_strategy: fastest\n", "routing_strategy"),
            ("http2: maybe\n", "http2"),
        ] {
            let e = serde_yaml_ng::from_str::<PoolConfig>(text).unwrap_err();
            assert!(e.to_string().contains(wanted), "{text}: {e}");
        }
    }

    #[test]
    fn pool_names() {
        for ok in ["gpu", "cpu-2", "a_b", "9"] {
            assert!(is_pool_name(ok), "{ok}");
        }
        for bad in ["", "GPU", "-a", "a b", "a.b", "é"] {
            assert!(!is_pool_name(bad), "{bad}");
        }
    }
}
