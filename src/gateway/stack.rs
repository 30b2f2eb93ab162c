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
//! [`admission_over`] builds that chain over either capacity source (in-process or
//! Redis-shared); [`local_source`] and [`shared_source`] build one endpoint's source,
//! adaptive where an `adaptive:` block applies; [`fallback_breaker`] builds the breaker it
//! routes with.

use super::app::{BuildError, GatewayService};
use super::config::GatewayConfig;
use super::proxy::{Proxy, ProxyBody, ProxyTo, SendFuture, Upstream};
use super::replay_buffer::ReplayBuffer;
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

/// The whole data path over `endpoints`, outermost first (see the [module docs](self)).
///
/// The response body is one concrete type from the proxy up to the admission layer (each
/// layer wraps it, `http_body_util::Either` joins the branches) and is boxed once, here.
pub(super) fn admission_over<C>(
    config: &GatewayConfig,
    endpoints: &Endpoints<C>,
    can_serve: &CanServe,
    fallback: Option<&Fallback>,
    retries: &Arc<Retries>,
) -> GatewayService
where
    C: CapacitySource,
    C::Permit: Send + Sync,
{
    let admission = HttpAdmissionLayer::new(endpoints.clone())
        .with_health(can_serve.clone())
        .honor_request_timeout(config.admission.honor_request_timeout);
    // gRPC calls are failures by their `grpc-status`, the rest by 5xx: for ejection and for
    // the breaker alike.
    let classifier = config.balance.classifier();
    // Retries happen inside the balancer's response future, under the admission layer: a
    // retried request holds one admission slot.
    let pool = RetryingHttpBalance::new(Dispatch, can_serve.registry.clone(), Arc::clone(retries))
        .with_classifier(classifier.clone());
    let primary = match fallback {
        None => Either::Left(pool.map_response(either_left)),
        Some((breaker, fallback_to)) => {
            let fallback = match fallback_to {
                Some(to) => Either::Left(to.clone().map_response(either_left)),
                None => Either::Right(pool.clone().map_response(either_right)),
            };
            Either::Right(
                HttpFallback::new(pool, fallback, breaker.clone())
                    .with_classifier(classifier)
                    .map_response(either_right),
            )
        }
    };
    // With `retry.on: [5xx]`, small idempotent requests are buffered here, so that the
    // balancer can send them again after a 502/503.
    let primary = ReplayBuffer::new(primary, Arc::clone(retries), config.client_body_timeout);
    match config.on_client_cancel {
        OnClientCancel::Release => {
            BoxCloneSyncService::new(admission.layer(primary).map_response(to_body))
        }
        // Keeps a cancelled request's slot until its upstream request has ended.
        OnClientCancel::Hold => {
            let hold = HoldOnCancelLayer::new(config.client_cancel_hold_limit());
            BoxCloneSyncService::new(
                admission
                    .hold_on_client_cancel(true)
                    .layer(hold.layer(primary))
                    .map_response(to_body),
            )
        }
    }
}

/// The breaker of `config.fallback` (none without that section), probing the live pool of
/// `registry` and the fallback's `url`; its proxy goes through `proxy`.
pub(super) fn fallback_breaker(
    config: &GatewayConfig,
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
        HealthCheckKind::Http => Arc::new(super::upstream_probe::UpstreamProbe::new(
            config.balance.health_endpoint.clone(),
            fallback.probe_timeout,
            proxy,
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
    Ok(Some((breaker, fallback_url.map(|u| proxy.to(u)))))
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
