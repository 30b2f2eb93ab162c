//! The gateway's data path in one place, read outermost to innermost:
//!
//! ```text
//! HttpAdmission (watched endpoints: capacity, FIFO queue, 504, 503; gated by CanServe)
//!  └─ HoldOnCancel (only with `on_client_cancel: hold`)
//!       └─ ReplayBuffer (with `retry.on: [5xx]`: buffers small idempotent request bodies)
//!            └─ HttpFallback (only with `fallback:`; primary → fallback after N failures)
//!                 ├─ primary: RetryingHttpBalance (health-gated p2c / round-robin /
//!                 │              │  first-healthy; a request not sent, or a buffered
//!                 │              │  idempotent one after a 502/503, is retried on another
//!                 │              │  replica within the budget, inside this one request)
//!                 │              └─ Dispatch → Proxy to the picked upstream
//!                 └─ fallback: Proxy to `fallback.url` (the pool again when none is set)
//! ```
//!
//! With `routes:`, a [`PoolRouter`] picks the chain of the request's route (one per route,
//! each over its pool, and one for the requests no route matches; see [`super::routes`]):
//!
//! ```text
//! PoolRouter (first matching route; none: the pool `default`)
//!  └─ one chain per route: HttpAdmission (shared endpoints, the pool's health gate)
//!       └─ HoldOnCancel └─ StripPrefix (`strip_prefix`) └─ ReplayBuffer └─ HttpFallback
//!            └─ RetryingHttpBalance over the route's pool
//! ```
//!
//! [`admission_over`] builds that chain over either capacity source (in-process or
//! Redis-shared); [`local_source`] and [`shared_source`] build one endpoint's source,
//! adaptive where an `adaptive:` block applies; [`fallback_breaker`] builds the breaker it
//! routes with.

use super::app::{BuildError, GatewayService};
use super::config::{GatewayConfig, PoolConfig};
use super::proxy::{Proxy, ProxyBody, ProxyTo, SendFuture, Upstream};
use super::replay_buffer::ReplayBuffer;
use super::routes::{PoolRouter, RouteTable, StripPrefix};
use axum::body::Body;
use http::{Request, Response};
use portcullis_admission::adaptive::AdaptiveCapacity;
use portcullis_admission::{
    CapacitySource, EndpointConfig, Endpoints, HoldOnCancelLayer, HttpAdmissionLayer,
    LocalCapacity, OnClientCancel,
};
use portcullis_balance::HealthCheckKind;
use portcullis_balance::{NotSent, ReplicaRegistry, Retries, RetryingHttpBalance};
use portcullis_breaker::{Breaker, HttpFallback};
use portcullis_core::HealthSource;
use portcullis_health::{GrpcHealthProbe, Probe, ProbeFuture, ProbeResult};
use portcullis_redis::{RedisCapacity, RedisStorage};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tower::util::{BoxCloneSyncService, Either};
use tower::{Layer, Service, ServiceExt};

/// The circuit breaker of a `fallback:` section and the proxy to its `url`, when one is set.
pub(super) type Fallback = (Breaker, Option<ProxyTo>);

/// What the admission layer and `/readyz` ask: can anything serve a request right now?
///
/// A healthy replica can; so can a configured fallback (the breaker routes to it once the
/// pool fails, and a broken fallback answers `fallback_unavailable` itself).
#[derive(Debug, Clone)]
pub(super) struct CanServe {
    pub(super) registry: ReplicaRegistry<ProxyTo>,
    pub(super) has_fallback: bool,
}

impl HealthSource for CanServe {
    fn can_serve(&self) -> bool {
        self.has_fallback || self.registry.can_serve()
    }
}

/// The in-process capacity source of one watched endpoint (`storage: memory`): adaptive
/// ([`AdaptiveCapacity`] over [`LocalCapacity`]) where an `adaptive:` block applies, fixed
/// elsewhere, starting at `initial`.
pub(super) fn local_source(
    config: &GatewayConfig,
    path: &str,
    ep: &EndpointConfig,
    initial: usize,
) -> AdaptiveCapacity<LocalCapacity> {
    let local = LocalCapacity::new(initial);
    match config.admission.adaptive_for(ep) {
        Some(a) => AdaptiveCapacity::new(local, a, path),
        None => AdaptiveCapacity::fixed(local),
    }
}

/// The Redis-shared capacity source of one watched endpoint (`storage: redis`): adaptive
/// where an `adaptive:` block applies, the limit moved by the one process that holds the
/// endpoint's [`AdaptiveLease`](portcullis_redis::AdaptiveLease) and applied by all; fixed
/// elsewhere. `initial` is its capacity until the shared one is read.
pub(super) fn shared_source(
    config: &GatewayConfig,
    storage: &RedisStorage,
    path: &str,
    ep: &EndpointConfig,
    initial: usize,
) -> AdaptiveCapacity<RedisCapacity> {
    let shared = storage.capacity_source(path, initial);
    match config.admission.adaptive_for(ep) {
        Some(a) => {
            let lease = Arc::new(storage.adaptive_lease(path, a.window));
            AdaptiveCapacity::shared(shared, a, path, lease)
        }
        None => AdaptiveCapacity::fixed(shared),
    }
}

/// What the data path needs of one upstream pool: its balancer's registry, its breaker
/// and fallback, its retry policy.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolPath<'a> {
    pub(super) registry: &'a ReplicaRegistry<ProxyTo>,
    pub(super) fallback: Option<&'a Fallback>,
    pub(super) retries: &'a Arc<Retries>,
}

impl PoolPath<'_> {
    /// What the admission layer's health gate of this pool's branches asks.
    pub(super) fn can_serve(&self) -> CanServe {
        CanServe {
            registry: self.registry.clone(),
            has_fallback: self.fallback.is_some_and(|(b, _)| b.has_fallback()),
        }
    }
}

/// The whole data path over `endpoints`, outermost first (see the [module docs](self)),
/// for each of `pools` (in the order of `routes`' pool indexes, `default` among them).
///
/// With no route, the one chain of the pool `default`, exactly as a single-pool gateway
/// has it; with routes, a [`PoolRouter`] over one chain per route and one for the
/// requests that match none (see [`super::routes`]).
///
/// The response body is one concrete type from the proxy up to the admission layer (each
/// layer wraps it, `http_body_util::Either` joins the branches) and is boxed once, here.
pub(super) fn admission_over<C>(
    config: &GatewayConfig,
    endpoints: &Endpoints<C>,
    pools: &[PoolPath<'_>],
    routes: &Arc<RouteTable>,
) -> GatewayService
where
    C: CapacitySource,
    C::Permit: Send + Sync,
{
    let admission = |pool: &PoolPath<'_>| {
        HttpAdmissionLayer::new(endpoints.clone())
            .with_health(pool.can_serve())
            .honor_request_timeout(config.admission.honor_request_timeout)
    };
    // One pool's part of the data path, under the admission layer: the replay buffer, the
    // breaker when the pool has a `fallback:`, the retrying balancer.
    let primary = |pool: &PoolPath<'_>| {
        // gRPC calls are failures by their `grpc-status`, the rest by 5xx: for ejection and for
        // the breaker alike (one `grpc_failure_codes` for every pool).
        let classifier = config.balance.classifier();
        // Retries happen inside the balancer's response future, under the admission layer: a
        // retried request holds one admission slot.
        let balance =
            RetryingHttpBalance::new(Dispatch, pool.registry.clone(), Arc::clone(pool.retries))
                .with_classifier(classifier.clone());
        let primary = match pool.fallback {
            None => Either::Left(balance.map_response(either_left)),
            Some((breaker, fallback_to)) => {
                let fallback = match fallback_to {
                    Some(to) => Either::Left(to.clone().map_response(either_left)),
                    None => Either::Right(balance.clone().map_response(either_right)),
                };
                Either::Right(
                    HttpFallback::new(balance, fallback, breaker.clone())
                        .with_classifier(classifier)
                        .map_response(either_right),
                )
            }
        };
        // With `retry.on: [5xx]`, small idempotent requests are buffered here, so that the
        // balancer can send them again after a 502/503.
        ReplayBuffer::new(
            primary,
            Arc::clone(pool.retries),
            config.client_body_timeout,
        )
    };
    let targets = routes.targets().chain([routes.fallthrough()]);
    match config.on_client_cancel {
        OnClientCancel::Release => routed(
            routes,
            targets
                .map(|t| {
                    let pool = &pools[t.pool];
                    admission(pool).layer(StripPrefix::new(primary(pool), t.strip))
                })
                .collect(),
        ),
        // Keeps a cancelled request's slot until its upstream request has ended.
        OnClientCancel::Hold => {
            let hold = HoldOnCancelLayer::new(config.client_cancel_hold_limit());
            routed(
                routes,
                targets
                    .map(|t| {
                        let pool = &pools[t.pool];
                        admission(pool)
                            .hold_on_client_cancel(true)
                            .layer(hold.layer(StripPrefix::new(primary(pool), t.strip)))
                    })
                    .collect(),
            )
        }
    }
}

/// The data path of one chain (no route), or the router over one chain per route; boxed.
fn routed<S, B>(routes: &Arc<RouteTable>, mut branches: Vec<S>) -> GatewayService
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    match (routes.is_empty(), branches.pop()) {
        (true, Some(only)) => BoxCloneSyncService::new(only.map_response(to_body)),
        (_, last) => {
            branches.extend(last);
            BoxCloneSyncService::new(
                PoolRouter::new(Arc::clone(routes), branches).map_response(to_body),
            )
        }
    }
}

/// The breaker of a pool's `fallback` (none without that section), probing the live pool
/// of `registry` and the fallback's `url`; its proxy goes through `proxy` (over h2c with
/// the pool's `http2`).
pub(super) fn fallback_breaker(
    config: &PoolConfig,
    registry: &ReplicaRegistry<ProxyTo>,
    proxy: &Proxy,
) -> Result<Option<Fallback>, BuildError> {
    let Some(fallback) = &config.fallback else {
        return Ok(None);
    };
    let fallback_url = match &fallback.url {
        Some(url) => {
            Some(Upstream::parse(url).map_err(|e| BuildError(format!("fallback.url: {}", e.0)))?)
        }
        None => {
            tracing::warn!(
                "fallback: no url configured; the breaker only reports primary_unhealthy"
            );
            None
        }
    };
    // The replicas' own kind of check (HTTP or grpc.health.v1), with the breaker's timeout.
    let check: Arc<dyn Probe> = match config.balance.health_check.kind {
        // Over TLS for `https://` targets, with the proxy's own TLS settings.
        HealthCheckKind::Http => Arc::new(super::upstream_probe::UpstreamProbe::over(
            config.balance.health_endpoint.clone(),
            fallback.probe_timeout,
            proxy,
            config.http2,
        )),
        HealthCheckKind::Grpc => Arc::new(GrpcHealthProbe::new(
            config.balance.health_check.service.clone(),
            fallback.probe_timeout,
        )),
    };
    let probe = PoolProbe {
        check,
        registry: registry.clone(),
    };
    let breaker = Breaker::builder(fallback.clone())
        .primary_target(POOL_TARGET)
        .fallback_target(fallback_url.as_ref().map(|u| u.url().to_owned()))
        .health_endpoint(config.balance.health_endpoint.clone())
        .probe(probe)
        .build();
    Ok(Some((
        breaker,
        fallback_url.map(|u| proxy.to_over(u, config.http2)),
    )))
}

/// Sends `(replica, request)` to the replica's proxy: the balancer's dispatch service. A
/// request that could not be sent comes back as [`NotSent`], for the balancer to retry.
#[derive(Debug, Clone, Copy, Default)]
struct Dispatch;

impl Service<(ProxyTo, Request<Body>)> for Dispatch {
    type Response = Response<ProxyBody>;
    type Error = NotSent<Body>;
    type Future = SendFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), NotSent<Body>>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (to, req): (ProxyTo, Request<Body>)) -> Self::Future {
        to.send(req)
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

/// Boxes the data path's one concrete body type into axum's.
fn to_body<B>(resp: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    resp.map(Body::new)
}

/// The breaker's name for the primary pool in its probes and snapshots.
const POOL_TARGET: &str = "upstreams";

/// The breaker's probe: the primary is the whole upstream pool, healthy when any replica
/// passes its health check (`health_endpoint` answers 2xx, or `SERVING` for `health_check:
/// {kind: grpc}`; all probed concurrently); any other target (the fallback) is checked the
/// same way directly.
#[derive(Clone)]
struct PoolProbe {
    check: Arc<dyn Probe>,
    registry: ReplicaRegistry<ProxyTo>,
}

impl std::fmt::Debug for PoolProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolProbe")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Probe for PoolProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        if target != POOL_TARGET {
            return self.check.probe(target);
        }
        // The live pool: replicas added or removed at runtime count.
        let probes: Vec<ProbeFuture> = self
            .registry
            .replicas()
            .iter()
            .map(|r| self.check.probe(r.key()))
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
