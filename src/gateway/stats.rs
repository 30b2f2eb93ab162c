//! The gateway's [`StatsSource`]: maps the admission, balance, breaker and storage
//! snapshots into the `/balancer/stats` document (and so into `/metrics` and the dashboard).
//!
//! Everything here reads atomics and `ArcSwap` snapshots: no I/O per stats request.

use super::access_log::AccessLog;
use super::proxy::{ProxyTo, LATENCY_BUCKETS};
use super::reload::ReloadStatus;
use super::tls::TlsTerminator;
use portcullis_admission::AdmissionStats;
use portcullis_balance::{ReplicaRegistry, Retries};
use portcullis_breaker::{Breaker, BreakerState, StatusSnapshot};
use portcullis_dashboard::{
    FallbackStats, Histogram, PoolStats, RetryStats, Stats, StatsSource, StorageStats, Tier,
    UpstreamStats,
};
use portcullis_redis::RedisStorage;
use std::sync::Arc;
use std::time::Instant;

/// A function returning the admission stats of every watched endpoint.
pub type AdmissionStatsFn = Arc<dyn Fn() -> AdmissionStats + Send + Sync>;

/// The live numbers of one gateway.
#[derive(Clone)]
pub struct GatewayStats {
    started: Instant,
    registry: ReplicaRegistry<ProxyTo>,
    breaker: Option<(Breaker, Option<ProxyTo>)>,
    admission: AdmissionStatsFn,
    storage: Option<RedisStorage>,
    tls: Option<TlsTerminator>,
    access_log: Option<AccessLog>,
    reload: Option<Arc<ReloadStatus>>,
    retries: Option<Arc<Retries>>,
    /// The named pools (`pools:`), in name order.
    pools: Vec<NamedPool>,
}

/// What the stats read of one named pool.
#[derive(Clone)]
struct NamedPool {
    name: String,
    registry: ReplicaRegistry<ProxyTo>,
    breaker: Option<(Breaker, Option<ProxyTo>)>,
    retries: Arc<Retries>,
}

impl std::fmt::Debug for GatewayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayStats")
            .field("registry", &self.registry)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl GatewayStats {
    /// Stats over the given parts; `started` is the gateway's start instant (uptime);
    /// `breaker` comes with the proxy to `fallback.url` (which counts the fallback's requests).
    pub fn new(
        started: Instant,
        registry: ReplicaRegistry<ProxyTo>,
        breaker: Option<(Breaker, Option<ProxyTo>)>,
        admission: AdmissionStatsFn,
        storage: Option<RedisStorage>,
    ) -> Self {
        Self {
            started,
            registry,
            breaker,
            admission,
            storage,
            tls: None,
            access_log: None,
            reload: None,
            retries: None,
            pools: Vec::new(),
        }
    }

    /// The same stats with the named pool `name` too (`pools.<name>`; its upstreams carry
    /// the `pool` label in `/metrics`).
    pub fn with_pool(
        mut self,
        name: &str,
        registry: ReplicaRegistry<ProxyTo>,
        breaker: Option<(Breaker, Option<ProxyTo>)>,
        retries: Arc<Retries>,
    ) -> Self {
        self.pools.push(NamedPool {
            name: name.to_owned(),
            registry,
            breaker,
            retries,
        });
        self
    }

    /// The same stats with the config generation and the reload outcomes.
    pub fn with_reload_status(mut self, status: Arc<ReloadStatus>) -> Self {
        self.reload = Some(status);
        self
    }

    /// The same stats with the listener's counters: failed TLS handshakes and dropped
    /// access log lines.
    pub fn with_listener(
        mut self,
        tls: Option<TlsTerminator>,
        access_log: Option<AccessLog>,
    ) -> Self {
        self.tls = tls;
        self.access_log = access_log;
        self
    }

    /// The same stats with the retry counters of the pool `default`.
    pub fn with_retries(mut self, retries: Arc<Retries>) -> Self {
        self.retries = Some(retries);
        self
    }
}

use super::config::DEFAULT_POOL;

/// The breaker state in the dashboard's vocabulary: `closed` (primary), `open` (fallback
/// engaged, minimum hold running), `half_open` (hold passed, probing the primary for
/// recovery), `primary_unhealthy` (tripped with no fallback configured).
fn dashboard_state(s: &StatusSnapshot) -> &'static str {
    match s.state {
        BreakerState::Normal => "closed",
        BreakerState::Fallback if s.min_hold_remaining_seconds.unwrap_or(0.0) > 0.0 => "open",
        BreakerState::Fallback => "half_open",
        BreakerState::PrimaryUnhealthy => "primary_unhealthy",
    }
}

impl StatsSource for GatewayStats {
    fn stats(&self) -> Stats {
        let mut stats = Stats {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ..Stats::from_admission((self.admission)())
        };
        stats.upstreams = upstream_stats(&self.registry);
        stats.fallback = self.breaker.as_ref().map(fallback_stats);
        stats.tls_handshakes_failed = self
            .tls
            .as_ref()
            .map_or(0, TlsTerminator::handshakes_failed);
        stats.access_log_dropped = self.access_log.as_ref().map_or(0, AccessLog::dropped);
        if let Some(reload) = &self.reload {
            stats.config_generation = reload.generation();
            stats.reloads_failed = reload.failed();
            stats.last_reload = reload.last();
        }
        let default_retry = self.retries.as_deref().map(retry_stats);
        if let Some(retry) = default_retry {
            stats.retry.insert(DEFAULT_POOL.to_owned(), retry);
        }
        stats.pools.insert(
            DEFAULT_POOL.to_owned(),
            PoolStats {
                upstreams: stats.upstreams.clone(),
                retry: default_retry.unwrap_or_default(),
                fallback: stats.fallback.clone(),
            },
        );
        for pool in &self.pools {
            let retry = retry_stats(&pool.retries);
            stats.retry.insert(pool.name.clone(), retry);
            stats.pools.insert(
                pool.name.clone(),
                PoolStats {
                    upstreams: upstream_stats(&pool.registry),
                    retry,
                    fallback: pool.breaker.as_ref().map(fallback_stats),
                },
            );
        }
        stats.storage = match &self.storage {
            None => StorageStats::default(),
            Some(storage) => {
                let r = storage.readiness();
                StorageStats {
                    kind: "redis".into(),
                    healthy: r.is_ready() && !storage.is_degraded(),
                    last_ping_latency_ms: r.last_ping_latency().map(|d| d.as_secs_f64() * 1e3),
                    consecutive_failures: r.consecutive_failures(),
                    error: storage
                        .is_degraded()
                        .then(|| "redis unreachable: storage.on_error applies".to_owned()),
                }
            }
        };
        stats
    }
}

/// The retry counters of one pool.
fn retry_stats(retries: &Retries) -> RetryStats {
    let c = retries.counts();
    RetryStats {
        retries: c.retries,
        retries_budget_exhausted: c.retries_budget_exhausted,
    }
}

/// Every replica of `registry`, in configuration order, with its proxy's counters.
fn upstream_stats(registry: &ReplicaRegistry<ProxyTo>) -> Vec<UpstreamStats> {
    let targets: std::collections::HashMap<String, ProxyTo> = registry
        .replicas()
        .into_iter()
        .map(|r| (r.key().to_string(), r.target().clone()))
        .collect();
    registry
        .snapshot()
        .replicas
        .into_iter()
        .map(|r| {
            let m = targets.get(&r.url).map(ProxyTo::metrics);
            UpstreamStats {
                requests: m.map_or(0, |m| m.requests()),
                failures: m.map_or(0, |m| m.failures()),
                client_closed: m.map_or(0, |m| m.client_closed()),
                latency: m.map(|m| {
                    Histogram::from_counts(&LATENCY_BUCKETS, &m.bucket_counts(), m.sum_seconds())
                }),
                url: r.url,
                tier: if r.primary {
                    Tier::Primary
                } else {
                    Tier::Secondary
                },
                status: serde_json::to_value(r.counters.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                healthy: r.healthy,
                ejected: r.ejected,
                inflight: r.inflight as u64,
                last_probe_latency_ms: r
                    .counters
                    .last_probe_latency
                    .map(|d| d.as_secs_f64() * 1000.0),
                consecutive_failures: r
                    .counters
                    .consecutive_probe_failures
                    .max(r.counters.consecutive_response_failures),
                ejections: r.counters.ejections,
                ejected_for_seconds: r.counters.ejected_for.as_secs_f64(),
            }
        })
        .collect()
}

/// A breaker's state and its fallback's request count.
fn fallback_stats((b, fallback_to): &(Breaker, Option<ProxyTo>)) -> FallbackStats {
    let s = b.status_snapshot();
    FallbackStats {
        url: b.config().url.clone().unwrap_or_default(),
        engaged: s.using_fallback,
        state: dashboard_state(&s).to_owned(),
        consecutive_failures: s.consecutive_failures,
        failure_threshold: s.failure_threshold,
        engaged_for_seconds: s.fallback_age_seconds.unwrap_or(0.0),
        hold_seconds: s.min_hold_remaining_seconds.unwrap_or(0.0),
        recovery_successes: s.consecutive_recovery_successes,
        recovery_threshold: s.recovery_threshold,
        trips: s.counters.fallback_engaged,
        fallback_requests: fallback_to.as_ref().map_or(0, |f| f.metrics().requests()),
    }
}
