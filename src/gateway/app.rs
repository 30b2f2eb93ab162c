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
//!       HttpAdmission (watched endpoints: capacity, FIFO queue, 504, 503)
//!        └─ HoldOnCancel (`on_client_cancel: hold`: a cancelled request keeps its slot)
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
use super::admin_listener::AdminListener;
use super::config::{GatewayConfig, StorageType};
use super::front::App;
use super::proxy::{Proxy, ProxySettings, ProxyTo};
use super::server::ConnectionLimits;
use super::stack::{self, CanServe};
use super::startup;
use super::stats::{AdmissionStatsFn, GatewayStats};
use super::tls::{TlsTerminator, UpstreamTls};
use super::upstream_probe::UpstreamProbe;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use http::{Request, Response};
use portcullis_balance::{CheckerHandle, ReplicaRegistry, Retries, Tier};
use portcullis_breaker::Breaker;
use portcullis_core::classify::GrpcFailures;
use portcullis_core::HealthSource;
use portcullis_health::{HealthRegistry, HealthServer};
use portcullis_redis::RedisStorage;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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
/// health server).
///
/// Dropping it stops every background task.
#[derive(Debug)]
pub struct Gateway {
    router: Router,
    app: App,
    proxy: Proxy,
    config: Arc<GatewayConfig>,
    registry: ReplicaRegistry<ProxyTo>,
    breaker: Option<Breaker>,
    health: HealthRegistry,
    storage: Option<RedisStorage>,
    health_server: Option<HealthServer>,
    admin: Option<AdminListener>,
    _checker: CheckerHandle,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.proxy.close_idle_connections();
    }
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
        let proxy = Proxy::new(ProxySettings {
            upstream_timeout: config.upstream_timeout(),
            connect_timeout: config.connect_timeout,
            pool_idle_timeout: config.upstream_idle_timeout,
            pool_max_idle_per_host: config.upstream_max_idle,
            client_body_timeout: config.client_body_timeout,
            upstream_body_timeout: config.upstream_body_timeout,
            grpc_failures: GrpcFailures::new(config.balance.grpc_failure_codes),
        });
        config
            .check_servable()
            .map_err(|e| BuildError(e.to_string()))?;

        // Health-gated balance over the upstreams, and the optional breaker around them.
        let registry: ReplicaRegistry<ProxyTo> = ReplicaRegistry::new(&config.balance);
        // Every configured upstream parses (checked at load), so the two lists line up.
        let weights = config.balance.upstreams.iter().map(|u| u.weight);
        for ((upstream, primary), weight) in config.parsed_upstreams().into_iter().zip(weights) {
            let key = upstream.url().to_owned();
            let tier = Tier::from_primary(primary);
            registry.add_weighted(key, tier, weight, proxy.to(upstream));
        }
        if let Some(tls) = &config.upstream_tls {
            let tls = UpstreamTls::from_config(Some(tls)).map_err(|e| BuildError(e.to_string()))?;
            proxy.set_upstream_tls(tls);
        }
        let checker = match config.balance.grpc_health_probe() {
            // `health_check: {kind: grpc}`: grpc.health.v1 over h2c.
            Some(grpc) => registry.spawn_checker(grpc, config.balance.checker_config()),
            None => registry.spawn_checker(
                UpstreamProbe::new(
                    config.balance.health_endpoint.clone(),
                    config.balance.health_check_timeout,
                    &proxy,
                ),
                config.balance.checker_config(),
            ),
        };
        let fallback = stack::fallback_breaker(&config, &registry, &proxy)?;
        let breaker = fallback.as_ref().map(|(b, _)| b.clone());
        // The pool's retry policy, budget and counters (the stats read the counters).
        let retries = Arc::new(Retries::new(&config.retry));
        let can_serve = CanServe {
            registry: registry.clone(),
            has_fallback: breaker.as_ref().is_some_and(Breaker::has_fallback),
        };

        // Readiness components.
        let health = HealthRegistry::new();
        let upstreams_ready = health.register("upstreams");
        let ready_can_serve = can_serve.clone();
        let mut tasks = vec![spawn_owned(refresh_readiness(move || {
            upstreams_ready.set_ready(ready_can_serve.can_serve());
        }))];

        // Admission over the chosen storage.
        let admission = &config.admission;
        let plan = startup::StartupPlan::new(&config);
        let startup_ready = (!plan.paths().is_empty()).then(|| health.register("startup_probe"));
        let (admitted, admission_stats, storage) = match config.storage.kind {
            StorageType::Memory => {
                let endpoints = stack::local_endpoints(&config, &plan)?;
                if let Some(ready) = startup_ready {
                    tasks.push(spawn_owned(startup::probe_local(
                        Arc::clone(&config),
                        registry.clone(),
                        endpoints.clone(),
                        plan.paths().to_vec(),
                        ready,
                    )));
                }
                let svc = stack::admission_over(
                    &config,
                    &endpoints,
                    &can_serve,
                    fallback.as_ref(),
                    &retries,
                );
                let stats: AdmissionStatsFn = Arc::new(move || endpoints.stats());
                (svc, stats, None)
            }
            StorageType::Redis => {
                let storage = RedisStorage::connect(&config.storage)
                    .await
                    .map_err(|e| BuildError(format!("storage: {e}")))?;
                let endpoints = stack::shared_endpoints(&config, &plan, &storage)?;
                // A configured fixed capacity is the truth: store it for every process. An
                // adaptive one is only the initial limit: a process that starts later does
                // not reset the limit the others share.
                for (path, ep) in &admission.endpoints {
                    if let (Some(c), None) = (ep.capacity, admission.adaptive_for(ep)) {
                        endpoints.set_capacity(path, c);
                    }
                }
                if let Some(ready) = startup_ready {
                    tasks.push(spawn_owned(startup::probe_shared(
                        Arc::clone(&config),
                        registry.clone(),
                        endpoints.clone(),
                        storage.clone(),
                        plan.paths().to_vec(),
                        ready,
                    )));
                }
                let svc = stack::admission_over(
                    &config,
                    &endpoints,
                    &can_serve,
                    fallback.as_ref(),
                    &retries,
                );
                let stats: AdmissionStatsFn = Arc::new(move || endpoints.stats());
                (svc, stats, Some(storage))
            }
        };
        if let Some(storage) = &storage {
            let (readiness, storage_ready) =
                (storage.readiness(), health.register_ready("storage"));
            tasks.push(spawn_owned(refresh_readiness(move || {
                storage_ready.set_ready(readiness.is_ready());
                let n = readiness.consecutive_failures();
                storage_ready.set_detail((n > 0).then(|| format!("{n} consecutive failed PINGs")));
            })));
        }
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
        let stats = GatewayStats::new(
            started,
            registry.clone(),
            fallback,
            admission_stats,
            storage.clone(),
        )
        .with_listener(tls.clone(), access_log.clone())
        .with_retries(retries);

        portcullis_dashboard::log_auth_mode(&config.ui);
        let operator = Router::new()
            .merge(portcullis_dashboard::router(&config.ui, stats, &health))
            .merge(operator_actions(
                &config,
                breaker.clone(),
                &registry,
                &proxy,
            ));
        // With an admin listener the operator routes live there only, and the data plane
        // proxies every path.
        let (router, prefixes, admin) = match config.admin.listen_addr() {
            None => (operator, operator_prefixes(&config), None),
            Some(addr) => {
                let limits = ConnectionLimits::from_config(&config);
                let admin = AdminListener::start(addr, operator, limits)
                    .await
                    .map_err(|e| BuildError(format!("admin.listen: cannot bind {addr}: {e}")))?;
                tracing::info!(addr = %admin.local_addr(), "admin listener serving the operator routes");
                (Router::new(), Vec::new(), Some(admin))
            }
        };
        let router = router.fallback_service(admitted.clone());
        let mut app = App::with_data_path(router.clone(), admitted, prefixes);
        if let Some(log) = access_log {
            app = app.with_access_log(log);
        }
        if let Some(tls) = tls {
            app = app.with_tls(tls);
        }

        let health_server = start_health_server(&config, &health).await?;

        Ok(Self {
            router,
            app,
            proxy,
            config,
            registry,
            breaker,
            health,
            storage,
            health_server,
            admin,
            _checker: checker,
            _tasks: tasks,
        })
    }

    /// The router of the data-plane port: the proxy and, without an admin listener, the
    /// operator routes.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// What the servers serve: the router for operator paths, the data path directly for
    /// every other (one path check per request instead of a route lookup; see
    /// [`front`](super::front)). Serves the same responses as [`Gateway::router`].
    pub fn app(&self) -> App {
        self.app.clone()
    }

    /// The config the gateway was built with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The upstream registry (runtime `add` / `remove`, snapshots).
    pub fn registry(&self) -> &ReplicaRegistry<ProxyTo> {
        &self.registry
    }

    /// The circuit breaker, when `fallback` is configured.
    pub fn breaker(&self) -> Option<&Breaker> {
        self.breaker.as_ref()
    }

    /// The liveness/readiness registry behind `/healthz` and `/readyz`.
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// The Redis storage, with `storage: {type: redis}`.
    pub fn storage(&self) -> Option<&RedisStorage> {
        self.storage.as_ref()
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

    /// Stops the standalone health server and the admin listener (frees their ports); the
    /// rest stops on drop.
    pub async fn shutdown(mut self) {
        if let Some(mut s) = self.health_server.take() {
            s.stop().await;
        }
        if let Some(admin) = self.admin.take() {
            admin.stop().await;
        }
    }
}
/// The state-changing operator routes, behind one Basic auth when `ui` credentials are set:
/// the on-demand breaker check, and the upstream admin routes when `upstream_admin` is on.
/// Without credentials the admin routes are not mounted at all: the config validation
/// refuses that combination, and a config built in code that skipped validation gets no
/// open admin routes either.
fn operator_actions(
    config: &GatewayConfig,
    breaker: Option<Breaker>,
    registry: &ReplicaRegistry<ProxyTo>,
    proxy: &Proxy,
) -> Router {
    let router = fallback_check_route(breaker);
    let Some((user, pass)) = config.ui.credentials() else {
        if config.upstream_admin {
            tracing::error!(
                "upstream_admin is on without ui.username/ui.password: the admin routes are not served"
            );
        }
        return router;
    };
    let router = if config.upstream_admin {
        router.merge(super::admin::routes(
            registry.clone(),
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

/// `POST /balancer/fallback/check`: probes the primary pool and the fallback now (with the
/// configured retries) and answers the breaker's status plus both probe results as JSON;
/// 404 `not_found` without a `fallback:` section. Behind the same Basic auth as the other
/// operator routes ([`operator_actions`]), and like every state-changing operator route it
/// needs `Content-Type: application/json` and refuses cross-site requests
/// ([`super::admin::same_site_json`]).
fn fallback_check_route(breaker: Option<Breaker>) -> Router {
    Router::new()
        .route(
            FALLBACK_CHECK_PATH,
            axum::routing::post(move || {
                let breaker = breaker.clone();
                async move {
                    match breaker {
                        Some(b) => {
                            let report = b.force_health_check().await;
                            axum::Json(report).into_response()
                        }
                        None => portcullis_core::Rejection::new(
                            http::StatusCode::NOT_FOUND,
                            portcullis_core::codes::NOT_FOUND,
                            "no fallback is configured",
                        )
                        .to_json_response::<Body>()
                        .into_response(),
                    }
                }
            }),
        )
        .route_layer(axum::middleware::from_fn(super::admin::same_site_json))
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
