//! Assembly of the gateway: the layers, the proxy and the operator routes in one axum router,
//! and a server loop with graceful shutdown.
//!
//! The request path, outermost first:
//!
//! ```text
//! App: one path check (see super::front)
//!  ├─ operator prefix → axum Router ── /healthz /readyz /balancer/... /metrics /balancer/ui
//!  │                        └─ (no route matched) → the data path below
//!  └─ any other path → the data path:
//!       HttpAdmission (watched endpoints: capacity, FIFO queue, 504, 503)
//!            └─ HttpFallback (only with `fallback:`; primary → fallback after N failures)
//!                  ├─ primary: HttpBalance (health-gated p2c / round-robin / first-healthy)
//!                  │              └─ Proxy to the picked upstream (per-thread pool)
//!                  └─ fallback: Proxy to `fallback.url`
//! ```
//!
//! The response body is one concrete type from the proxy up to the admission layer (each
//! layer wraps it, `http_body_util::Either` joins the branches) and is boxed once, at the
//! top ([`GatewayService`]).
//!
//! The admission layer's capacity source is in-process ([`LocalCapacity`]) with
//! `storage: {type: memory}` and Redis-shared ([`RedisCapacity`]) with `storage: {type:
//! redis}`. Watched endpoints without a `capacity` are probed at startup when
//! `probe_on_startup` is set (see [`super::startup`]).

use super::config::{GatewayConfig, StorageType};
use super::front::App;
use super::proxy::{Proxy, ProxyBody, ProxySettings, ProxyTo, Upstream};
use super::startup;
use super::stats::GatewayStats;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use http::{Request, Response};
use portcullis_admission::{
    CapacitySource, EndpointConfig as AdmissionEndpoint, Endpoints, HoldOnCancelLayer,
    HttpAdmissionLayer, LocalCapacity, OnClientCancel,
};
use portcullis_balance::{CheckerHandle, HttpBalance, ReplicaRegistry, Tier};
use portcullis_breaker::{Breaker, HttpFallback};
use portcullis_core::HealthSource;
use portcullis_health::{
    Component, HealthRegistry, HealthServer, HttpProbe, Probe, ProbeFuture, ProbeResult,
};
use portcullis_redis::{RedisCapacity, RedisStorage};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower::util::{BoxCloneSyncService, Either};
use tower::{Layer, Service, ServiceExt};

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
    _checker: CheckerHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.proxy.close_idle_connections();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the admission layer and `/readyz` ask: can anything serve a request right now?
///
/// A healthy replica can; so can a configured fallback (the breaker routes to it once the
/// pool fails, and a broken fallback answers `fallback_unavailable` itself).
#[derive(Debug, Clone)]
struct CanServe {
    registry: ReplicaRegistry<ProxyTo>,
    has_fallback: bool,
}

impl HealthSource for CanServe {
    fn can_serve(&self) -> bool {
        self.has_fallback || self.registry.can_serve()
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
        });
        config
            .check_servable()
            .map_err(|e| BuildError(e.to_string()))?;

        // Health-gated balance over the upstreams.
        let balance_config = &config.balance;
        let registry: ReplicaRegistry<ProxyTo> = ReplicaRegistry::new(balance_config);
        for (upstream, primary) in config.parsed_upstreams() {
            let key = upstream.url().to_owned();
            registry.add(key, Tier::from_primary(primary), proxy.to(upstream));
        }
        let checker = registry.spawn_http_checker(balance_config);
        // The request path is one concrete type down to the proxy (no boxing per layer);
        // only the top of it is boxed, below.
        let pool = HttpBalance::new(Dispatch, registry.clone());

        // Optional circuit-breaker fallback around the pool.
        let mut fallback_to: Option<ProxyTo> = None;
        let (primary, breaker) = match &config.fallback {
            None => (Either::Left(pool.clone().map_response(either_left)), None),
            Some(fallback) => {
                let fallback_proxy = match &fallback.url {
                    Some(url) => Some(
                        Upstream::parse(url)
                            .map_err(|e| BuildError(format!("fallback.url: {}", e.0)))?,
                    ),
                    None => None,
                };
                let probe = PoolProbe {
                    http: HttpProbe::new(
                        config.balance.health_endpoint.clone(),
                        fallback.probe_timeout,
                    ),
                    registry: registry.clone(),
                };
                let breaker = Breaker::builder(fallback.clone())
                    .primary_target(POOL_TARGET)
                    .fallback_target(fallback_proxy.as_ref().map(|u| u.url().to_owned()))
                    .health_endpoint(config.balance.health_endpoint.clone())
                    .probe(probe)
                    .build();
                if fallback_proxy.is_none() {
                    tracing::warn!(
                        "fallback: no url configured; the breaker only reports primary_unhealthy"
                    );
                }
                fallback_to = fallback_proxy.map(|u| proxy.to(u));
                let fallback_svc = match &fallback_to {
                    Some(to) => Either::Left(to.clone().map_response(either_left)),
                    None => Either::Right(pool.clone().map_response(either_right)),
                };
                let svc = HttpFallback::new(pool.clone(), fallback_svc, breaker.clone())
                    .map_response(either_right);
                (Either::Right(svc), Some(breaker))
            }
        };

        let can_serve = CanServe {
            registry: registry.clone(),
            has_fallback: breaker.as_ref().is_some_and(Breaker::has_fallback),
        };

        // Readiness components.
        let health = HealthRegistry::new();
        let upstreams_ready = health.register("upstreams");

        // Admission over the chosen storage.
        let admission = &config.admission;
        let to_probe: Vec<String> = if config.probe.probe_on_startup {
            admission
                .endpoints
                .iter()
                .filter(|(_, e)| e.capacity.is_none())
                .map(|(p, _)| p.clone())
                .collect()
        } else {
            Vec::new()
        };
        let startup_ready = (!to_probe.is_empty()).then(|| health.register("startup_probe"));
        let initial = |path: &str, ep: &AdmissionEndpoint| -> usize {
            match ep.capacity {
                Some(c) => c,
                // Probed endpoints admit nothing until their capacity is known: requests
                // wait in the FIFO queue (bounded by queue_timeout) instead of overloading
                // the backend while it is being measured.
                None if to_probe.iter().any(|p| p == path) => 0,
                None => config.default_capacity as usize,
            }
        };

        let mut tasks = Vec::new();
        let (admitted, stats, storage): (GatewayService, GatewayStats, Option<RedisStorage>) =
            match config.storage.kind {
                StorageType::Memory => {
                    let endpoints = Endpoints::from_config_with(admission, |p, e| {
                        LocalCapacity::new(initial(p, e))
                    })
                    .map_err(BuildError)?;
                    let svc = admission_stack(&endpoints, &can_serve, &config, primary.clone());
                    if let Some(ready) = &startup_ready {
                        tasks.push(tokio::spawn(startup::probe_local(
                            Arc::clone(&config),
                            registry.clone(),
                            endpoints.clone(),
                            to_probe.clone(),
                            ready.clone(),
                        )));
                    }
                    let stats = GatewayStats::new(
                        started,
                        registry.clone(),
                        breaker.clone().map(|b| (b, fallback_to.clone())),
                        Arc::new(move || endpoints.stats()),
                        None,
                    );
                    (svc, stats, None)
                }
                StorageType::Redis => {
                    let storage = RedisStorage::connect(&config.storage)
                        .await
                        .map_err(|e| BuildError(format!("storage: {e}")))?;
                    let endpoints =
                        Endpoints::<RedisCapacity>::from_config_with(admission, |p, e| {
                            storage.capacity_source(p, initial(p, e))
                        })
                        .map_err(BuildError)?;
                    // A configured capacity is the truth: store it for every process.
                    for (path, ep) in &admission.endpoints {
                        if let Some(c) = ep.capacity {
                            if let Some(l) = endpoints.get(path) {
                                l.set_capacity(c);
                            }
                        }
                    }
                    let svc = admission_stack(&endpoints, &can_serve, &config, primary.clone());
                    if let Some(ready) = &startup_ready {
                        tasks.push(tokio::spawn(startup::probe_shared(
                            Arc::clone(&config),
                            registry.clone(),
                            endpoints.clone(),
                            storage.clone(),
                            to_probe.clone(),
                            ready.clone(),
                        )));
                    }
                    let storage_ready = health.register_ready("storage");
                    tasks.push(tokio::spawn(refresh_storage(
                        storage.readiness(),
                        storage_ready,
                    )));
                    let stats = GatewayStats::new(
                        started,
                        registry.clone(),
                        breaker.clone().map(|b| (b, fallback_to.clone())),
                        Arc::new(move || endpoints.stats()),
                        Some(storage.clone()),
                    );
                    (svc, stats, Some(storage))
                }
            };
        tasks.push(tokio::spawn(refresh_upstreams(
            can_serve.clone(),
            upstreams_ready,
        )));

        portcullis_dashboard::log_auth_mode(&config.ui);
        let operator = portcullis_dashboard::router(&config.ui, stats, &health);
        let router = Router::new()
            .merge(operator)
            .merge(fallback_check_route(&config, breaker.clone()))
            .merge(admin_routes(&config, &registry, &proxy))
            .fallback_service(admitted.clone());
        let app = App::with_data_path(router.clone(), admitted, operator_prefixes(&config));

        let health_server = if config.health_server.enable {
            let mut server = HealthServer::from_config(&config.health_server, health.clone());
            let addr = server.start().await.map_err(|e| {
                BuildError(format!(
                    "health_server.listen: cannot bind {}: {e}",
                    config.health_server.listen
                ))
            })?;
            tracing::info!(%addr, "health server listening");
            Some(server)
        } else {
            None
        };

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
            _checker: checker,
            tasks,
        })
    }

    /// The router serving everything (proxy and operator routes).
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

    /// Stops the standalone health server (frees its port); the rest stops on drop.
    pub async fn shutdown(mut self) {
        if let Some(mut s) = self.health_server.take() {
            s.stop().await;
        }
    }
}

/// The upstream admin routes when `upstream_admin` is on, behind the operator auth (the
/// same-site JSON check sits inside it). Without `ui` credentials the routes are not
/// mounted at all: the config validation refuses that combination, and a config built in
/// code that skipped validation gets no open admin routes either.
fn admin_routes(
    config: &GatewayConfig,
    registry: &ReplicaRegistry<ProxyTo>,
    proxy: &Proxy,
) -> Router {
    if !config.upstream_admin {
        return Router::new();
    }
    let Some((user, pass)) = config.ui.credentials() else {
        tracing::error!(
            "upstream_admin is on without ui.username/ui.password: the admin routes are not served"
        );
        return Router::new();
    };
    super::admin::routes(registry.clone(), proxy.clone(), config.admin_allowlist()).route_layer(
        portcullis_dashboard::BasicAuthLayer::new(portcullis_dashboard::Credentials::new(
            user, pass,
        )),
    )
}

/// The path of the on-demand breaker probe.
pub const FALLBACK_CHECK_PATH: &str = "/balancer/fallback/check";

/// `POST /balancer/fallback/check`: probes the primary pool and the fallback now (with the
/// configured retries) and answers the breaker's status plus both probe results as JSON;
/// 404 `not_found` without a `fallback:` section. Behind the same Basic auth as the other
/// operator routes, and like every state-changing operator route it needs `Content-Type:
/// application/json` and refuses cross-site requests ([`super::admin::same_site_json`]).
fn fallback_check_route(config: &GatewayConfig, breaker: Option<Breaker>) -> Router {
    let mut router = Router::new()
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
        .route_layer(axum::middleware::from_fn(super::admin::same_site_json));
    if let Some((user, pass)) = config.ui.credentials() {
        router = router.route_layer(portcullis_dashboard::BasicAuthLayer::new(
            portcullis_dashboard::Credentials::new(user, pass),
        ));
    }
    router
}

/// Sends `(replica, request)` to the replica's proxy: the balancer's dispatch service.
#[derive(Debug, Clone, Copy, Default)]
struct Dispatch;

impl Service<(ProxyTo, Request<Body>)> for Dispatch {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = <ProxyTo as Service<Request<Body>>>::Future;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (mut to, req): (ProxyTo, Request<Body>)) -> Self::Future {
        to.call(req)
    }
}

/// The admission layer over `endpoints`, gated by `can_serve`, in front of `inner`; with
/// `on_client_cancel: hold`, a [`HoldOnCancel`](portcullis_admission::HoldOnCancel) right
/// below it keeps a cancelled request's slot until its upstream request has ended.
fn admission_stack<C, S, B>(
    endpoints: &Endpoints<C>,
    can_serve: &CanServe,
    config: &GatewayConfig,
    inner: S,
) -> GatewayService
where
    C: CapacitySource,
    C::Permit: Send + Sync,
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError> + Send,
{
    let layer = HttpAdmissionLayer::new(endpoints.clone()).with_health(can_serve.clone());
    match config.on_client_cancel {
        OnClientCancel::Release => {
            BoxCloneSyncService::new(layer.layer(inner).map_response(to_body))
        }
        OnClientCancel::Hold => {
            let hold = HoldOnCancelLayer::new(config.client_cancel_hold_limit());
            let layer = layer.hold_on_client_cancel(true);
            BoxCloneSyncService::new(layer.layer(hold.layer(inner)).map_response(to_body))
        }
    }
}

/// The first branch of a response body that can come from two services.
fn either_left<L, R>(resp: Response<L>) -> Response<http_body_util::Either<L, R>> {
    resp.map(http_body_util::Either::Left)
}

/// The second branch of a response body that can come from two services.
fn either_right<L, R>(resp: Response<R>) -> Response<http_body_util::Either<L, R>> {
    resp.map(http_body_util::Either::Right)
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

fn to_body<B>(resp: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    resp.map(Body::new)
}

/// Keeps the `upstreams` readiness flag in step with the pool (atomics only, no I/O).
async fn refresh_upstreams(can_serve: CanServe, component: Component) {
    let mut tick = tokio::time::interval(READINESS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        component.set_ready(can_serve.can_serve());
    }
}

/// Keeps the `storage` readiness flag in step with the Redis PING loop's cached verdict.
async fn refresh_storage(readiness: portcullis_redis::Readiness, component: Component) {
    let mut tick = tokio::time::interval(READINESS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        component.set_ready(readiness.is_ready());
        let n = readiness.consecutive_failures();
        component.set_detail((n > 0).then(|| format!("{n} consecutive failed PINGs")));
    }
}

/// The breaker's name for the primary pool in its probes and snapshots.
const POOL_TARGET: &str = "upstreams";

/// The breaker's probe: the primary is the whole upstream pool, healthy when any replica's
/// `health_endpoint` answers 2xx (all probed concurrently); any other target (the
/// fallback) is probed over HTTP directly.
#[derive(Debug, Clone)]
struct PoolProbe {
    http: HttpProbe,
    registry: ReplicaRegistry<ProxyTo>,
}

impl Probe for PoolProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        if target != POOL_TARGET {
            return self.http.probe(target);
        }
        // The live pool: replicas added or removed at runtime count.
        let probes: Vec<ProbeFuture> = self
            .registry
            .replicas()
            .iter()
            .map(|r| self.http.probe(r.key()))
            .collect();
        Box::pin(async move {
            let results = futures_util::future::join_all(probes).await;
            let best = results
                .iter()
                .filter(|r| r.healthy)
                .min_by_key(|r| r.latency)
                .or_else(|| results.iter().max_by_key(|r| r.latency));
            match best {
                Some(r) if r.healthy => ProbeResult::healthy(r.latency, r.detail.clone()),
                Some(r) => {
                    ProbeResult::unhealthy(r.latency, format!("no healthy upstream ({})", r.detail))
                }
                None => ProbeResult::unhealthy(Duration::ZERO, "no upstream"),
            }
        })
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

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `drain` to finish. Connections get the default
/// [`ConnectionLimits`](super::server::ConnectionLimits); [`serve_with_limits`] takes a
/// config's.
///
/// Returns `Ok(true)` when every connection drained in time, `Ok(false)` when the drain
/// timeout cut some off.
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<bool> {
    serve_with_limits(
        listener,
        app,
        shutdown,
        drain,
        super::server::ConnectionLimits::default(),
    )
    .await
}

/// [`serve`] with every client connection bounded by `limits`
/// (`ConnectionLimits::from_config(gateway.config())`): the request-head and idle timeouts
/// and `max_connections`. See [`server`](super::server) for the behaviour.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    limits: super::server::ConnectionLimits,
) -> std::io::Result<bool> {
    super::server::serve_listener(listener, app, shutdown, drain, limits).await
}

/// Converts any response into an axum response (used to unify the layers' body types).
pub fn into_axum<B>(resp: Response<B>) -> Result<Response<Body>, Infallible>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    Ok(resp.map(Body::new))
}
