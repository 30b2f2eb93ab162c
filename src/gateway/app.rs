//! Assembly of the gateway: the layers, the proxy and the operator routes in one axum router,
//! and a server loop with graceful shutdown.
//!
//! The request path, outermost first:
//!
//! ```text
//! App: one path check (see super::front)
//!  ├─ operator prefix → axum Router ── /healthz /readyz /balancer/... /metrics /balancer/ui
//!  │                        └─ (no route matched) → the data path below
//!  └─ any other path → the data path (built in super::stack):
//!     [PoolRouter: with `routes:`, the first matching route picks the chain, and so the
//!      pool; no match: the pool `default`; without routes there is one chain, no router]
//!       HttpAdmission (watched endpoints: capacity, FIFO queue, 504, 503)
//!        └─ HoldOnCancel (`on_client_cancel: hold`: a cancelled request keeps its slot)
//!          └─ StripPrefix (a route's `strip_prefix`)
//!            └─ ReplayBuffer (`retry.on: [5xx]`: small idempotent bodies read into memory)
//!                └─ HttpFallback (only with `fallback:`; primary → fallback after N failures)
//!                      ├─ primary: RetryingHttpBalance (health-gated p2c / round-robin /
//!                      │              │  first-healthy; retries on another replica)
//!                      │              └─ Proxy to the picked upstream (per-thread pool)
//!                      └─ fallback: Proxy to `fallback.url`
//! ```
//!
//! **Retry** sits in the balancer, below admission: a request whose connection to the picked
//! replica failed before any byte was sent comes back from the proxy unsent
//! ([`NotSent`](portcullis_balance::NotSent)) and is sent to another healthy replica (any
//! method); with `retry.on: [5xx]` a buffered idempotent request is also sent again after a
//! 502/503. Each retry is bounded by `retry.max_attempts` and the pool's budget
//! (`retry.budget_percent` of the last 10 s, plus `retry.min_retries_per_second`), and all
//! attempts run in the balancer's one response future: a retried request holds one
//! admission slot.
//!
//! The response body is one concrete type from the proxy up to the admission layer (each
//! layer wraps it, `http_body_util::Either` joins the branches) and is boxed once, at the
//! top ([`GatewayService`]).
//!
//! The admission layer's capacity source is in-process ([`LocalCapacity`], adaptive where an
//! `adaptive:` block applies) with
//! `storage: {type: memory}` and Redis-shared ([`RedisCapacity`]) with `storage: {type:
//! redis}`. Watched endpoints without a `capacity` are probed at startup when
//! `probe_on_startup` is set (see [`super::startup`]).
//!
//! [`RedisCapacity`]: portcullis_redis::RedisCapacity
//! [`LocalCapacity`]: portcullis_admission::LocalCapacity

use super::access_log::AccessLog;
use super::admin::AdminPool;
use super::admin_listener::AdminListener;
use super::config::{ConfigError, GatewayConfig, PoolConfig, StorageType, DEFAULT_POOL};
use super::front::App;
use super::proxy::{Proxy, ProxySettings, ProxyTo, Upstream};
use super::reload::{
    changed_sections, keep_restart_fields, pool_settings, ConfigFile, ReloadError, ReloadHandle,
    ReloadReport, ReloadSource, ReloadStatus,
};
use super::routes::RouteTable;
use super::server::ConnectionLimits;
use super::stack;
use super::startup;
use super::stats::{AdmissionStatsFn, GatewayStats};
use super::tls::{TlsTerminator, UpstreamTls};
use super::upstream_probe::UpstreamProbe;
use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::response::IntoResponse;
use axum::Router;
use http::{Request, Response};
use portcullis_admission::adaptive::AdaptiveCapacity;
use portcullis_admission::{EndpointConfig, Endpoints, LocalCapacity};
use portcullis_balance::{CheckerHandle, ReplicaRegistry, Retries, Tier};
use portcullis_breaker::Breaker;
use portcullis_core::classify::GrpcFailures;
use portcullis_health::{HealthRegistry, HealthServer};
use portcullis_redis::{RedisCapacity, RedisStorage};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::AbortOnDropHandle;
use tower::util::BoxCloneSyncService;

/// The type-erased request path below the router (admission and everything under it).
pub type GatewayService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// How often the cached readiness flags are refreshed from the layers' state (no I/O).
const READINESS_REFRESH: Duration = Duration::from_millis(100);

/// A built gateway: its router plus the background tasks it owns (health checkers, the
/// breaker's prober, the Redis heartbeat and PING loops, startup probes, the standalone
/// health server, the reload task).
///
/// Dropping it stops every background task.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    reloads: ReloadHandle,
    health_server: Option<HealthServer>,
    admin: Option<AdminListener>,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shared.base.proxy.close_idle_connections();
    }
}

/// What lives as long as the gateway, whatever config is in force.
struct Base {
    started: Instant,
    proxy: Proxy,
    health: HealthRegistry,
    storage: Option<RedisStorage>,
    tls: Option<TlsTerminator>,
    access_log: Option<AccessLog>,
    reload_status: Arc<ReloadStatus>,
    reloads: ReloadHandle,
    config_file: ConfigFile,
    log_filter: std::sync::OnceLock<LogFilterHook>,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("proxy", &self.proxy)
            .field("storage", &self.storage)
            .field("config_file", &self.config_file)
            .finish_non_exhaustive()
    }
}

/// The gateway's state, shared with its reload task.
#[derive(Debug)]
struct Shared {
    base: Base,
    current: ArcSwap<Generation>,
    /// What the data-plane servers serve.
    app: App,
    /// What the admin listener serves, when `admin.listen` is set.
    admin_app: Option<App>,
}

/// Sets the process's log filter (an `EnvFilter` directive such as `info`; `None`: the
/// process's default) when a reload changes `log_level`. The library does not own the
/// subscriber: the process installs this hook ([`Gateway::set_log_filter_hook`]).
pub type LogFilterHook = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// What one config builds (a generation): the upstream pools, the routes to them and the
/// watched endpoints the data path runs over. Replaced as a whole by a reload.
struct Generation {
    config: Arc<GatewayConfig>,
    /// Every pool, `default` first, then the named pools in name order (the indexes of
    /// `routes`).
    pools: Vec<PoolState>,
    routes: Arc<RouteTable>,
    endpoints: Watched,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("pools", &self.pools)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// The pool `default` (the top-level `upstreams`).
    fn default_pool(&self) -> &PoolState {
        &self.pools[0]
    }

    /// The pool named `name`.
    fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// One upstream pool of a generation: its balancer's registry, its breaker, its retries and
/// the tasks it owns. A reload that leaves the pool's settings as they are hands all of it
/// on (see [`super::reload`]).
struct PoolState {
    name: String,
    /// Its settings, resolved (see [`GatewayConfig::pool_configs`]).
    config: PoolConfig,
    registry: ReplicaRegistry<ProxyTo>,
    fallback: Option<stack::Fallback>,
    /// The pool's retry policy, budget and counters (the stats read the counters); kept by
    /// a reload that leaves its `retry:` as it is.
    retries: Arc<Retries>,
    /// The pool's health checker and readiness refresher, shared by the generations that
    /// keep the same pool.
    _tasks: Arc<PoolTasks>,
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState")
            .field("name", &self.name)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl PoolState {
    fn path(&self) -> stack::PoolPath<'_> {
        stack::PoolPath {
            registry: &self.registry,
            fallback: self.fallback.as_ref(),
            retries: &self.retries,
        }
    }
}

struct PoolTasks {
    _checker: CheckerHandle,
    /// The refresher of the pool's readiness component ([`readiness_component`]).
    _readiness: AbortOnDropHandle<()>,
}

/// The watched endpoints over the configured storage.
#[derive(Clone)]
enum Watched {
    Local(Endpoints<AdaptiveCapacity<LocalCapacity>>),
    Shared(Endpoints<AdaptiveCapacity<RedisCapacity>>),
}

/// The routers a generation serves: the data plane's (with the operator routes unless an
/// admin listener has them) and the admin listener's.
struct Routers {
    data: GatewayService,
    router: Router,
    prefixes: Vec<String>,
    admin: Option<Router>,
}

impl Gateway {
    /// Builds the gateway for `config` (already validated).
    ///
    /// Connects the storage (a single Redis node lazily: an unreachable Redis at start is an
    /// outage handled by `storage.on_error`, not an error), spawns the health checker, the
    /// breaker's prober and, when configured, the startup probes and the standalone health
    /// server.
    pub async fn build(config: GatewayConfig) -> Result<Self, BuildError> {
        let config = Arc::new(config);
        let started = Instant::now();
        // Off the request path: the request records' clock calibrates once per process.
        super::access_log::prepare_clock();
        let proxy = Proxy::new(ProxySettings {
            upstream_timeout: config.upstream_timeout(),
            connect_timeout: config.connect_timeout,
            pool_idle_timeout: config.upstream_idle_timeout,
            pool_max_idle_per_host: config.upstream_max_idle,
            client_body_timeout: config.client_body_timeout,
            upstream_body_timeout: config.upstream_body_timeout,
            grpc_failures: GrpcFailures::new(config.balance.grpc_failure_codes),
            http2: config.http2,
        });
        config
            .check_servable()
            .map_err(|e| BuildError(e.to_string()))?;
        if let Some(tls) = &config.upstream_tls {
            let tls = UpstreamTls::from_config(Some(tls)).map_err(|e| BuildError(e.to_string()))?;
            proxy.set_upstream_tls(tls);
        }
        let health = HealthRegistry::new();
        let storage = match config.storage.kind {
            StorageType::Memory => None,
            StorageType::Redis => Some(
                RedisStorage::connect(&config.storage)
                    .await
                    .map_err(|e| BuildError(format!("storage: {e}")))?,
            ),
        };
        // The listener's TLS and access log, counted in the stats.
        let tls = config
            .tls
            .as_ref()
            .map(TlsTerminator::from_config)
            .transpose()
            .map_err(|e| BuildError(e.to_string()))?;
        let access_log = match config.access_log.enable {
            true => Some(AccessLog::start(&config.access_log).map_err(|e| {
                BuildError(format!(
                    "access_log.path: cannot open {}: {e}",
                    config.access_log.path
                ))
            })?),
            false => None,
        };
        let (reloads, reload_requests) = ReloadHandle::channel();
        let base = Base {
            started,
            proxy,
            health,
            storage,
            tls,
            access_log,
            reload_status: Arc::new(ReloadStatus::default()),
            reloads: reloads.clone(),
            config_file: ConfigFile::new(),
            log_filter: std::sync::OnceLock::new(),
        };

        let plan = startup::StartupPlan::new(&config);
        let (generation, routers) = base.generation(Arc::clone(&config), None, &plan)?;
        let mut tasks = Vec::new();
        let startup_ready =
            (!plan.paths().is_empty()).then(|| base.health.register("startup_probe"));
        if let Some(ready) = startup_ready {
            // Each endpoint through the pool its probe request is routed to.
            let pools = startup::ProbePools::new(
                Arc::clone(&generation.routes),
                generation
                    .pools
                    .iter()
                    .map(|p| (p.name.clone(), p.registry.clone()))
                    .collect(),
            );
            let paths = plan.paths().to_vec();
            tasks.push(match (&generation.endpoints, &base.storage) {
                (Watched::Local(endpoints), _) => spawn_owned(startup::probe_local(
                    Arc::clone(&config),
                    pools,
                    endpoints.clone(),
                    paths,
                    ready,
                )),
                (Watched::Shared(endpoints), Some(storage)) => spawn_owned(startup::probe_shared(
                    Arc::clone(&config),
                    pools,
                    endpoints.clone(),
                    storage.clone(),
                    paths,
                    ready,
                )),
                (Watched::Shared(_), None) => unreachable!("shared endpoints come with a storage"),
            });
        }
        if let Some(storage) = &base.storage {
            let (readiness, storage_ready) =
                (storage.readiness(), base.health.register_ready("storage"));
            tasks.push(spawn_owned(refresh_readiness(move || {
                storage_ready.set_ready(readiness.is_ready());
                let n = readiness.consecutive_failures();
                storage_ready.set_detail((n > 0).then(|| format!("{n} consecutive failed PINGs")));
            })));
        }
        portcullis_dashboard::log_auth_mode(&config.ui);

        // With an admin listener the operator routes live there only, and the data plane
        // proxies every path.
        let (admin, admin_app) = match (config.admin.listen_addr(), &routers.admin) {
            (Some(addr), Some(router)) => {
                let limits = ConnectionLimits::from_config(&config);
                let admin_app = App::from(router.clone());
                let admin = AdminListener::start(addr, admin_app.clone(), limits)
                    .await
                    .map_err(|e| BuildError(format!("admin.listen: cannot bind {addr}: {e}")))?;
                tracing::info!(addr = %admin.local_addr(), "admin listener serving the operator routes");
                (Some(admin), Some(admin_app))
            }
            _ => (None, None),
        };
        let mut app = App::with_data_path(routers.router, routers.data, routers.prefixes);
        if let Some(log) = &base.access_log {
            app = app.with_access_log(log.clone());
        }
        if let Some(tls) = &base.tls {
            app = app.with_tls(tls.clone());
        }

        let health_server = start_health_server(&config, &base.health).await?;
        let shared = Arc::new(Shared {
            base,
            current: ArcSwap::from_pointee(generation),
            app,
            admin_app,
        });
        tasks.push(spawn_owned(run_reloads(
            Arc::clone(&shared),
            reload_requests,
        )));

        Ok(Self {
            shared,
            reloads,
            health_server,
            admin,
            _tasks: tasks,
        })
    }

    /// The router of the data-plane port in force: the proxy and, without an admin
    /// listener, the operator routes.
    pub fn router(&self) -> Router {
        self.shared.app.router()
    }

    /// What the servers serve: the router for operator paths, the data path directly for
    /// every other (one path check per request instead of a route lookup; see
    /// [`front`](super::front)). Serves the same responses as [`Gateway::router`], and
    /// follows every reload.
    pub fn app(&self) -> App {
        self.shared.app.clone()
    }

    /// The config in force (the one the gateway was built with, or the last reloaded one,
    /// with the fields that need a restart at their running values).
    pub fn config(&self) -> Arc<GatewayConfig> {
        Arc::clone(&self.shared.current.load().config)
    }

    /// The upstream registry of the pool `default` in force (runtime `add` / `remove`,
    /// snapshots). A reload that changes the pool's settings replaces it: ask again after
    /// one.
    pub fn registry(&self) -> ReplicaRegistry<ProxyTo> {
        self.shared.current.load().default_pool().registry.clone()
    }

    /// The upstream registry in force of the pool `name` (`default`, or one of `pools:`);
    /// `None` when there is no such pool.
    pub fn pool_registry(&self, name: &str) -> Option<ReplicaRegistry<ProxyTo>> {
        self.shared
            .current
            .load()
            .pool(name)
            .map(|p| p.registry.clone())
    }

    /// The circuit breaker in force, when `fallback` is configured.
    pub fn breaker(&self) -> Option<Breaker> {
        self.shared
            .current
            .load()
            .default_pool()
            .fallback
            .as_ref()
            .map(|(b, _)| b.clone())
    }

    /// The liveness/readiness registry behind `/healthz` and `/readyz`.
    pub fn health(&self) -> &HealthRegistry {
        &self.shared.base.health
    }

    /// The Redis storage, with `storage: {type: redis}`.
    pub fn storage(&self) -> Option<&RedisStorage> {
        self.shared.base.storage.as_ref()
    }

    /// The standalone health server's address, when `health_server.enable` is set.
    pub fn health_server_addr(&self) -> Option<SocketAddr> {
        self.health_server
            .as_ref()
            .and_then(HealthServer::local_addr)
    }

    /// The admin listener's address, when `admin.listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminListener::local_addr)
    }

    /// Makes `path` the config file that `SIGHUP` and `POST /balancer/reload` re-read (the
    /// one the gateway was built from). Set once; later calls are ignored. Without it, the
    /// route answers 409 `reload_unavailable`.
    pub fn set_config_file(&self, path: impl Into<PathBuf>) {
        let _ = self.shared.base.config_file.set(path.into());
    }

    /// Installs the hook that applies a reloaded `log_level` (set once).
    pub fn set_log_filter_hook(&self, hook: LogFilterHook) {
        let _ = self.shared.base.log_filter.set(hook);
    }

    /// A handle that asks this gateway for reloads (for `SIGHUP`); see [`super::reload`].
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reloads.clone()
    }

    /// Applies `config` (read and validated by the caller, as for [`Gateway::build`]) as a
    /// reload would (see [`super::reload`]).
    pub async fn reload(&self, config: GatewayConfig) -> Result<ReloadReport, ReloadError> {
        self.reloads.reload(config).await
    }

    /// Re-reads the config file set by [`set_config_file`](Self::set_config_file) and
    /// applies it.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.reloads.reload_from_file().await
    }

    /// Stops the standalone health server and the admin listener (frees their ports) and
    /// writes out the access log; the rest stops on drop.
    pub async fn shutdown(mut self) {
        if let Some(log) = &self.shared.base.access_log {
            log.flush(std::time::Duration::from_secs(2)).await;
        }
        if let Some(mut s) = self.health_server.take() {
            s.stop().await;
        }
        if let Some(admin) = self.admin.take() {
            admin.stop().await;
        }
    }
}

impl Base {
    /// Builds the generation of `config`, carrying over what `prev` (the generation in
    /// force, on a reload) can hand on, pool by pool (see [`super::reload`]). Everything
    /// that can fail runs before a running pool is changed.
    fn generation(
        &self,
        config: Arc<GatewayConfig>,
        prev: Option<&Generation>,
        plan: &startup::StartupPlan,
    ) -> Result<(Generation, Routers), BuildError> {
        let routes = config
            .route_table()
            .map_err(|e| BuildError(format!("{}: {}", e.field, e.message)))?;
        let endpoints = self.endpoints(&config, prev, plan)?;
        let mut planned = Vec::new();
        for (name, pool) in config.pool_configs() {
            let old = prev.and_then(|p| p.pool(&name));
            let keep = old.filter(|o| same_pool_settings(&o.config, &pool));
            let registry = match keep {
                Some(o) => o.registry.clone(),
                None => self.new_pool(&pool, old.map(|o| &o.registry)),
            };
            let fallback = match keep {
                Some(o) if o.config.fallback == pool.fallback => o.fallback.clone(),
                _ => stack::fallback_breaker(&pool, &registry, &self.proxy)?,
            };
            planned.push((name, pool, registry, fallback, old, keep));
        }
        // Nothing below fails.
        let pools = planned
            .into_iter()
            .map(|(name, pool, registry, fallback, old, keep)| {
                let tasks = match keep {
                    Some(o) => {
                        self.update_pool(&pool, &o.registry);
                        Arc::clone(&o._tasks)
                    }
                    None => Arc::new(self.pool_tasks(&name, &pool, &registry)),
                };
                let retry = pool.retry.clone().unwrap_or_default();
                let retries = match old {
                    Some(o) if o.config.retry == pool.retry => Arc::clone(&o.retries),
                    _ => Arc::new(Retries::new(&retry)),
                };
                PoolState {
                    name,
                    config: pool,
                    registry,
                    fallback,
                    retries,
                    _tasks: tasks,
                }
            })
            .collect();
        let generation = Generation {
            config,
            pools,
            routes: Arc::new(routes),
            endpoints,
        };
        let routers = self.routers(&generation);
        Ok((generation, routers))
    }

    /// A new pool with the upstreams of `pool`. Each starts healthy, as at start, except
    /// that on a reload (`prev`) a replica that was not healthy in the old pool awaits its
    /// first good check in the new one; a replica that carries over keeps its proxy (and so
    /// its counters) unless the pool's `http2` changed.
    fn new_pool(
        &self,
        pool: &PoolConfig,
        prev: Option<&ReplicaRegistry<ProxyTo>>,
    ) -> ReplicaRegistry<ProxyTo> {
        let registry: ReplicaRegistry<ProxyTo> = ReplicaRegistry::new(&pool.balance);
        for (upstream, tier, weight) in parsed_upstreams(&pool.balance) {
            let key = upstream.url().to_owned();
            let old = prev.and_then(|p| p.get(&key));
            let target = match &old {
                Some(r) if r.target().http2() == pool.http2 => r.target().clone(),
                _ => self.proxy.to_over(upstream, pool.http2),
            };
            match old {
                Some(r) if !r.health().is_healthy() => {
                    registry.add_weighted_awaiting_check(key, tier, weight, target)
                }
                _ => registry.add_weighted(key, tier, weight, target),
            };
        }
        registry
    }

    /// Brings the running pool's replicas in line with `pool.upstreams` (same settings):
    /// removed ones leave (and drain), changed ones (tier, weight) are re-added healthy if
    /// they were (with their proxy and counters), new ones join awaiting their first good
    /// check, or healthy when no healthy replica would remain otherwise.
    fn update_pool(&self, pool: &PoolConfig, registry: &ReplicaRegistry<ProxyTo>) {
        let wanted = parsed_upstreams(&pool.balance);
        // Replicas whose tier or weight changed leave and come back with their health.
        let mut changed: Vec<(Arc<str>, ProxyTo, bool)> = Vec::new();
        for replica in registry.replicas() {
            let key = replica.key();
            match wanted.iter().find(|(u, _, _)| u.url() == &**key) {
                Some((_, tier, weight))
                    if *tier == replica.tier() && *weight == replica.weight() => {}
                Some(_) => {
                    let healthy = replica.health().is_healthy();
                    changed.push((key.clone(), replica.target().clone(), healthy));
                    registry.remove(key);
                }
                None => {
                    registry.remove(key);
                }
            }
        }
        let none_healthy = !registry.replicas().iter().any(|r| r.health().is_healthy())
            && !changed.iter().any(|(_, _, healthy)| *healthy);
        for (upstream, tier, weight) in wanted {
            if registry.get(upstream.url()).is_some() {
                continue;
            }
            let key = upstream.url().to_owned();
            let (target, healthy) = match changed.iter().find(|(k, _, _)| **k == *key) {
                Some((_, target, healthy)) => (target.clone(), *healthy),
                None => (self.proxy.to_over(upstream, pool.http2), none_healthy),
            };
            if healthy {
                registry.add_weighted(key, tier, weight, target);
            } else {
                registry.add_weighted_awaiting_check(key, tier, weight, target);
            }
        }
    }

    /// The health checker of `pool` over `registry`, and the refresher of the pool's
    /// readiness component ([`readiness_component`]), registered here and set at once.
    fn pool_tasks(
        &self,
        name: &str,
        pool: &PoolConfig,
        registry: &ReplicaRegistry<ProxyTo>,
    ) -> PoolTasks {
        let checker = match pool.balance.grpc_health_probe() {
            // `health_check: {kind: grpc}`: grpc.health.v1 over h2c.
            Some(grpc) => registry.spawn_checker(grpc, pool.balance.checker_config()),
            None => registry.spawn_checker(
                UpstreamProbe::over(
                    pool.balance.health_endpoint.clone(),
                    pool.balance.health_check_timeout,
                    &self.proxy,
                    pool.http2,
                ),
                pool.balance.checker_config(),
            ),
        };
        let ready = self.health.register(readiness_component(name));
        let (registry, has_fallback) = (registry.clone(), has_fallback_url(pool));
        let refresh = move || ready.set_ready(has_fallback || registry.can_serve());
        // A pool added by a reload is not reported failing until its first refresh.
        refresh();
        let readiness = spawn_owned(refresh_readiness(refresh));
        PoolTasks {
            _checker: checker,
            _readiness: readiness,
        }
    }

    /// The watched endpoints of `config`: those of `prev` that stay keep their limiter
    /// (see [`Endpoints::reconfigure`]); a configured fixed capacity that is new or changed
    /// is applied (with Redis, for every process).
    fn endpoints(
        &self,
        config: &GatewayConfig,
        prev: Option<&Generation>,
        plan: &startup::StartupPlan,
    ) -> Result<Watched, BuildError> {
        let admission = &config.admission;
        let old_config = prev.map(|p| &p.config.admission);
        // An endpoint keeps its limiter when its adaptive block is unchanged.
        let keep = |path: &str, ep: &EndpointConfig| {
            old_config
                .and_then(|old| old.endpoints.get(path).map(|o| old.adaptive_for(o)))
                .is_some_and(|old| old == admission.adaptive_for(ep))
        };
        let watched = match (&self.storage, prev.map(|p| &p.endpoints)) {
            (None, prev) => {
                let old = match prev {
                    Some(Watched::Local(e)) => e.clone(),
                    _ => Endpoints::new(),
                };
                Watched::Local(
                    old.reconfigure(admission, keep, |path, ep| {
                        stack::local_source(config, path, ep, plan.initial_capacity(path, ep))
                    })
                    .map_err(BuildError)?,
                )
            }
            (Some(storage), prev) => {
                let old = match prev {
                    Some(Watched::Shared(e)) => e.clone(),
                    _ => Endpoints::new(),
                };
                Watched::Shared(
                    old.reconfigure(admission, keep, |path, ep| {
                        stack::shared_source(
                            config,
                            storage,
                            path,
                            ep,
                            plan.initial_capacity(path, ep),
                        )
                    })
                    .map_err(BuildError)?,
                )
            }
        };
        // A configured fixed capacity is the truth: store it (with Redis, for every
        // process). An adaptive one is only the initial limit, and an unchanged one is
        // left alone (a process that starts or reloads later does not reset the limit in
        // force).
        for (path, ep) in &admission.endpoints {
            let unchanged = old_config
                .and_then(|old| old.endpoints.get(path))
                .is_some_and(|o| o.capacity == ep.capacity);
            if let (Some(c), None, false) = (ep.capacity, admission.adaptive_for(ep), unchanged) {
                watched.set_capacity(path, c);
            }
        }
        Ok(watched)
    }

    /// The data path, the operator routes and where each is served.
    fn routers(&self, generation: &Generation) -> Routers {
        let config = &generation.config;
        let paths: Vec<_> = generation.pools.iter().map(PoolState::path).collect();
        let routes = &generation.routes;
        let (data, admission_stats): (GatewayService, AdmissionStatsFn) =
            match &generation.endpoints {
                Watched::Local(e) => {
                    let stats = e.clone();
                    (
                        stack::admission_over(config, e, &paths, routes),
                        Arc::new(move || stats.stats()),
                    )
                }
                Watched::Shared(e) => {
                    let stats = e.clone();
                    (
                        stack::admission_over(config, e, &paths, routes),
                        Arc::new(move || stats.stats()),
                    )
                }
            };
        let default = generation.default_pool();
        let mut stats = GatewayStats::new(
            self.started,
            default.registry.clone(),
            default.fallback.clone(),
            admission_stats,
            self.storage.clone(),
        )
        .with_listener(self.tls.clone(), self.access_log.clone())
        .with_reload_status(Arc::clone(&self.reload_status))
        .with_retries(Arc::clone(&default.retries));
        for pool in &generation.pools[1..] {
            stats = stats.with_pool(
                &pool.name,
                pool.registry.clone(),
                pool.fallback.clone(),
                Arc::clone(&pool.retries),
            );
        }
        let admin_pools: Vec<_> = generation
            .pools
            .iter()
            .map(|p| AdminPool::new(&p.name, p.registry.clone(), p.config.http2))
            .collect();
        let breakers: Vec<_> = generation
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.fallback.as_ref().map(|(b, _)| b.clone())))
            .collect();
        let operator = Router::new()
            .merge(portcullis_dashboard::router(
                &config.ui,
                stats,
                &self.health,
            ))
            .merge(operator_actions(
                config,
                breakers,
                admin_pools,
                &self.proxy,
                &self.reloads,
            ));
        match config.admin.listen_addr() {
            None => Routers {
                router: operator.fallback_service(data.clone()),
                data,
                prefixes: operator_prefixes(config),
                admin: None,
            },
            Some(_) => Routers {
                router: Router::new().fallback_service(data.clone()),
                data,
                prefixes: Vec::new(),
                admin: Some(operator),
            },
        }
    }
}

impl Watched {
    fn set_capacity(&self, path: &str, capacity: usize) {
        match self {
            Self::Local(e) => e.set_capacity(path, capacity),
            Self::Shared(e) => e.set_capacity(path, capacity),
        };
    }
}

/// The name of the pool `pool`'s component in `/readyz` (and the stats' `health`):
/// `upstreams` for the pool `default` (its name before there were pools), `pools.<name>`
/// for a named pool. The gateway is ready when every pool can serve: a healthy replica or
/// a `fallback.url`.
pub fn readiness_component(pool: &str) -> String {
    if pool == DEFAULT_POOL {
        UPSTREAMS_COMPONENT.to_owned()
    } else {
        format!("pools.{pool}")
    }
}

/// The `/readyz` component of the pool `default` (see [`readiness_component`]).
pub const UPSTREAMS_COMPONENT: &str = "upstreams";

/// Whether `old` and `new` run the pool the same way (every balance setting but the
/// upstream list, and `http2`), so a reload can keep the running pool.
fn same_pool_settings(old: &PoolConfig, new: &PoolConfig) -> bool {
    pool_settings(&old.balance) == pool_settings(&new.balance)
        && has_fallback_url(old) == has_fallback_url(new)
        && old.http2 == new.http2
}

/// Whether `pool` has a fallback to route to (a `fallback.url`): then it can serve with no
/// healthy replica.
fn has_fallback_url(pool: &PoolConfig) -> bool {
    pool.fallback.as_ref().is_some_and(|f| f.url.is_some())
}

/// The upstreams of `balance`, parsed (checked at load), with their tier and weight.
fn parsed_upstreams(balance: &portcullis_balance::Config) -> Vec<(Upstream, Tier, u32)> {
    balance
        .upstreams
        .iter()
        .filter_map(|u| {
            let parsed = Upstream::parse(&u.url).ok()?;
            Some((parsed, Tier::from_primary(u.primary), u.weight))
        })
        .collect()
}

/// The reload task: applies one reload at a time, for as long as the gateway lives.
async fn run_reloads(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<(ReloadSource, super::reload::ReloadReply)>,
) {
    while let Some((source, reply)) = requests.recv().await {
        let outcome = shared.reload(source);
        match &outcome {
            Ok(report) => tracing::info!(
                generation = report.config_generation,
                applied = ?report.applied,
                needs_restart = ?report.needs_restart,
                "config reloaded"
            ),
            Err(e) => {
                shared.base.reload_status.refused(e);
                tracing::error!(error = %e, "config reload refused; the old config keeps running");
            }
        }
        let _ = reply.send(outcome);
    }
}

impl Shared {
    /// One reload (see [`super::reload`]): read, check, build, then swap.
    fn reload(&self, source: ReloadSource) -> Result<ReloadReport, ReloadError> {
        let (new, file) = match source {
            ReloadSource::Config(config) => (*config, PathBuf::from("<reload>")),
            ReloadSource::File => {
                let path = self
                    .base
                    .config_file
                    .get()
                    .ok_or(ReloadError::NoConfigFile)?;
                let config = GatewayConfig::load(path).map_err(ReloadError::Invalid)?;
                (config, path.clone())
            }
        };
        new.check_servable()
            .map_err(|e| ReloadError::Invalid(ConfigError::from_field(&file, e)))?;
        let old = self.current.load_full();
        let (new, needs_restart) = keep_restart_fields(&old.config, new);
        let applied = changed_sections(&old.config, &new);
        // The certificate files are re-read first: a bad one refuses the whole reload.
        let certs = match &self.base.tls {
            Some(tls) => Some(
                tls.read_certs()
                    .map_err(|e| ReloadError::Invalid(ConfigError::from_field(&file, e)))?,
            ),
            None => None,
        };
        let plan = startup::StartupPlan::at_reload(&new);
        let new = Arc::new(new);
        let (generation, routers) = self
            .base
            .generation(Arc::clone(&new), Some(&old), &plan)
            .map_err(|e| ReloadError::Failed(e.0))?;
        if let Some((tls, certs)) = self.base.tls.as_ref().zip(certs) {
            tls.install_certs(certs);
        }
        if old.config.log_level != new.log_level {
            match self.base.log_filter.get() {
                Some(hook) => {
                    if let Err(e) = hook(new.log_level.as_deref()) {
                        tracing::warn!(error = %e, "log_level: the new filter was not applied");
                    }
                }
                None => tracing::warn!(
                    "log_level changed, but this process installed no log filter hook"
                ),
            }
        }
        if !needs_restart.is_empty() {
            tracing::warn!(fields = ?needs_restart, "these fields changed but need a restart; their running values stay");
        }
        portcullis_dashboard::log_auth_mode(&new.ui);
        let removed: Vec<String> = old
            .pools
            .iter()
            .filter(|p| generation.pool(&p.name).is_none())
            .map(|p| p.name.clone())
            .collect();
        self.current.store(Arc::new(generation));
        // A removed pool no longer counts for `/readyz` (its refresher stops with the old
        // generation; what it writes until then is not read).
        for name in removed {
            self.base.health.remove(&readiness_component(&name));
        }
        self.app
            .swap(routers.router, routers.data, routers.prefixes);
        if let (Some(app), Some(router)) = (&self.admin_app, routers.admin) {
            app.swap_router(router);
        }
        let config_generation = self.base.reload_status.applied(needs_restart.clone());
        Ok(ReloadReport {
            config_generation,
            applied,
            needs_restart,
        })
    }
}

/// The state-changing operator routes, behind one Basic auth when `ui` credentials are set:
/// the on-demand breaker check, and the upstream admin routes when `upstream_admin` is on.
/// Without credentials the admin routes are not mounted at all: the config validation
/// refuses that combination, and a config built in code that skipped validation gets no
/// open admin routes either.
fn operator_actions(
    config: &GatewayConfig,
    breakers: Vec<(String, Option<Breaker>)>,
    pools: Vec<AdminPool>,
    proxy: &Proxy,
    reloads: &ReloadHandle,
) -> Router {
    let router = fallback_check_route(breakers);
    let Some((user, pass)) = config.ui.credentials() else {
        if config.upstream_admin {
            tracing::error!(
                "upstream_admin is on without ui.username/ui.password: the admin routes are not served"
            );
        }
        // Open only on a loopback admin listener; elsewhere without credentials the reload
        // route is not served (SIGHUP still reloads).
        if config
            .admin
            .listen_addr()
            .is_some_and(|a| a.ip().is_loopback())
        {
            return router.merge(super::reload::route(reloads.clone()));
        }
        return router;
    };
    let router = router.merge(super::reload::route(reloads.clone()));
    let router = if config.upstream_admin {
        router.merge(super::admin::pool_routes(
            pools,
            proxy.clone(),
            config.admin_allowlist(),
        ))
    } else {
        router
    };
    router.route_layer(portcullis_dashboard::BasicAuthLayer::new(
        portcullis_dashboard::Credentials::new(user, pass),
    ))
}

/// The path of the on-demand breaker probe.
pub const FALLBACK_CHECK_PATH: &str = "/balancer/fallback/check";

/// `POST /balancer/fallback/check`: probes a pool and its fallback now (with the
/// configured retries) and answers the breaker's status plus both probe results as JSON.
///
/// `?pool=gpu` names the pool (default `default`, the top-level `upstreams`): a pool the
/// gateway does not have answers 404 `unknown_pool`, a pool without a `fallback:` section
/// 404 `not_found`. Behind the same Basic auth as the other operator routes
/// ([`operator_actions`]), and like every state-changing operator route it needs
/// `Content-Type: application/json` and refuses cross-site requests
/// ([`super::admin::same_site_json`]).
///
/// `breakers`: every pool by name, with its breaker when it has a `fallback:`.
fn fallback_check_route(breakers: Vec<(String, Option<Breaker>)>) -> Router {
    let breakers: Arc<[(String, Option<Breaker>)]> = breakers.into();
    Router::new()
        .route(
            FALLBACK_CHECK_PATH,
            axum::routing::post(move |query: Result<Query<PoolQuery>, QueryRejection>| {
                let breakers = Arc::clone(&breakers);
                async move {
                    let name = query.ok().and_then(|Query(q)| q.pool);
                    let wanted = name.as_deref().unwrap_or(DEFAULT_POOL);
                    let Some((_, breaker)) = breakers.iter().find(|(n, _)| n == wanted) else {
                        let known = breakers.iter().map(|(n, _)| n.as_str());
                        return super::admin::unknown_pool(wanted, known);
                    };
                    match (breaker, name) {
                        (Some(b), _) => axum::Json(b.force_health_check().await).into_response(),
                        (None, None) => no_fallback("no fallback is configured".to_owned()),
                        (None, Some(name)) => {
                            no_fallback(format!("the pool `{name}` has no fallback configured"))
                        }
                    }
                }
            }),
        )
        .route_layer(axum::middleware::from_fn(super::admin::same_site_json))
}

/// The query of `POST /balancer/fallback/check`.
#[derive(Debug, serde::Deserialize)]
struct PoolQuery {
    #[serde(default)]
    pool: Option<String>,
}

/// The 404 `not_found` of `POST /balancer/fallback/check` for a pool without `fallback:`.
fn no_fallback(message: String) -> axum::response::Response {
    portcullis_core::Rejection::new(
        http::StatusCode::NOT_FOUND,
        portcullis_core::codes::NOT_FOUND,
        message,
    )
    .to_json_response::<Body>()
    .into_response()
}

/// Starts the standalone health server when `health_server.enable` is set.
async fn start_health_server(
    config: &GatewayConfig,
    health: &HealthRegistry,
) -> Result<Option<HealthServer>, BuildError> {
    if !config.health_server.enable {
        return Ok(None);
    }
    let mut server = HealthServer::from_config(&config.health_server, health.clone());
    let addr = server.start().await.map_err(|e| {
        BuildError(format!(
            "health_server.listen: cannot bind {}: {e}",
            config.health_server.listen
        ))
    })?;
    tracing::info!(%addr, "health server listening");
    Ok(Some(server))
}

/// Every path prefix the operator router may answer (see [`App::with_data_path`]): the
/// health routes, `/metrics`, everything under `/balancer` and the dashboard's path.
fn operator_prefixes(config: &GatewayConfig) -> Vec<String> {
    vec![
        portcullis_health::HEALTHZ_PATH.to_owned(),
        portcullis_health::READYZ_PATH.to_owned(),
        portcullis_dashboard::METRICS_PATH.to_owned(),
        "/balancer".to_owned(),
        config.ui.normalized_path(),
    ]
}

/// Spawns `task`, owned by the returned handle: dropping the handle aborts the task (so a
/// build that fails half-way leaves no task behind).
fn spawn_owned(task: impl Future<Output = ()> + Send + 'static) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(task))
}

/// Runs `step` every [`READINESS_REFRESH`], for ever: keeps a cached readiness flag in
/// step with a layer's state (atomics only, no I/O). The task's owner aborts it.
async fn refresh_readiness(mut step: impl FnMut()) {
    let mut tick = tokio::time::interval(READINESS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        step();
    }
}

/// The gateway could not be built from a (valid) config.
#[derive(Debug, Clone)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

/// The in-process server loops, kept under their old path (`gateway::app::serve`); they
/// live in [`server`](super::server) with the sharded loop.
pub use super::server::{serve, serve_with_limits};
