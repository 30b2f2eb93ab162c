//! `probe_on_startup`: find the capacity of every watched endpoint that has none, through
//! the gateway's own balanced upstreams, before admitting traffic on it.
//!
//! Each endpoint is probed through the pool that serves it: its probe request (method,
//! `probe_path`, `Host` header) is routed as a client's would be ([`ProbePools`]), and the
//! route's `strip_prefix` applies.
//!
//! While probing, the endpoint's capacity is 0 (its requests wait in the FIFO queue, bounded
//! by `queue_timeout`), `/readyz` reports `startup_probe` as failing, and every other path
//! passes through. With Redis storage only one process probes (the capacity store's
//! `SET NX PX` lock); the others reuse the stored result. A probe that fails leaves the
//! endpoint at `default_capacity` and says why in the log.

use super::config::{GatewayConfig, DEFAULT_POOL};
use super::proxy::ProxyTo;
use super::routes::{strip_path, RouteTable};
use axum::body::Body;
use http::{Method, Request};
use http_body_util::BodyExt;
use portcullis_admission::{CapacitySource, EndpointConfig, Endpoints};
use portcullis_balance::ReplicaRegistry;
use portcullis_health::Component;
use portcullis_probe::{ProbeReport, ProbeTransport, Prober, RequestOutcome, SendFuture};
use portcullis_redis::RedisStorage;
use std::sync::Arc;
use tower::Service;

/// Which watched endpoints `probe_on_startup` probes (those without a `capacity`), and the
/// capacity each watched endpoint starts with.
#[derive(Debug, Clone)]
pub(super) struct StartupPlan {
    paths: Vec<String>,
    default_capacity: usize,
}

impl StartupPlan {
    /// The plan for `config`: no path at all without `probe_on_startup`.
    pub(super) fn new(config: &GatewayConfig) -> Self {
        let paths = if config.probe.probe_on_startup {
            config
                .admission
                .endpoints
                .iter()
                .filter(|(_, e)| e.capacity.is_none())
                .map(|(p, _)| p.clone())
                .collect()
        } else {
            Vec::new()
        };
        Self {
            paths,
            default_capacity: config.default_capacity as usize,
        }
    }

    /// The plan of a reload: nothing is probed (the startup probe runs at start only), so
    /// an endpoint without a `capacity` starts at `default_capacity`.
    pub(super) fn at_reload(config: &GatewayConfig) -> Self {
        Self {
            paths: Vec::new(),
            default_capacity: config.default_capacity as usize,
        }
    }

    /// The paths to probe, in config order.
    pub(super) fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The capacity the endpoint watching `path` starts with: its configured one, else 0
    /// while it is probed (its requests wait in the FIFO queue, bounded by
    /// `queue_timeout`, instead of overloading the backend while it is being measured),
    /// else `default_capacity`.
    pub(super) fn initial_capacity(&self, path: &str, ep: &EndpointConfig) -> usize {
        match ep.capacity {
            Some(c) => c,
            None if self.paths.iter().any(|p| p == path) => 0,
            None => self.default_capacity,
        }
    }
}

/// Sends the endpoint's probe request (method, headers, JSON body from its `endpoints`
/// entry) to the upstream pool, bypassing admission.
///
/// Each request goes to a replica the registry picks (health-gated, counted in flight), but
/// its outcome is not fed to passive outlier ejection: a probe drives the endpoint into
/// errors on purpose, and ejecting the replica for it would make the next levels fail for
/// the wrong reason.
#[derive(Clone)]
pub struct BalancedTransport {
    registry: ReplicaRegistry<ProxyTo>,
    /// The pool's name, for the messages (`None`: the pool `default`).
    pool: Option<String>,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<bytes::Bytes>,
}

impl std::fmt::Debug for BalancedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BalancedTransport({} {})", self.method, self.path)
    }
}

/// The pools the startup probe sends through, and the routes that pick one: a watched
/// endpoint is probed through the pool its probe request is routed to, as a client's
/// request with the same method, path and `Host` header would be, with the route's
/// `strip_prefix` applied (see [`super::routes`]).
#[derive(Debug, Clone)]
pub struct ProbePools {
    routes: Arc<RouteTable>,
    /// Every pool by name, in the order of the table's pool indexes.
    pools: Vec<(String, ReplicaRegistry<ProxyTo>)>,
}

impl ProbePools {
    /// The pools `pools` (named, in the order of `routes`' pool indexes) under `routes`.
    pub fn new(routes: Arc<RouteTable>, pools: Vec<(String, ReplicaRegistry<ProxyTo>)>) -> Self {
        Self { routes, pools }
    }

    /// The transport of the watched endpoint `path` of `config`, through the pool its
    /// probe request is routed to.
    ///
    /// # Panics
    ///
    /// When the table routes to a pool index that `pools` does not have.
    pub fn transport(&self, config: &GatewayConfig, path: &str) -> BalancedTransport {
        let mut transport = BalancedTransport::new(config, path, self.pools[0].1.clone());
        let route = match transport.path.parse::<http::Uri>() {
            Ok(uri) => self.routes.route(&transport.method, &uri, transport.host()),
            // Not a valid request path: sent nowhere (the request fails to build).
            Err(_) => self.routes.fallthrough(),
        };
        let (name, registry) = &self.pools[route.pool];
        transport.registry = registry.clone();
        transport.pool = (name != DEFAULT_POOL).then(|| name.clone());
        if route.strip > 0 {
            transport.path = strip_path(&transport.path, route.strip);
        }
        transport
    }
}

impl BalancedTransport {
    /// The transport for the watched endpoint `path` of `config`.
    pub fn new(config: &GatewayConfig, path: &str, registry: ReplicaRegistry<ProxyTo>) -> Self {
        let ep = config
            .admission
            .endpoints
            .get(path)
            .cloned()
            .unwrap_or_default();
        let body = ep
            .body
            .as_ref()
            .and_then(|b| serde_json::to_vec(b).ok())
            .map(bytes::Bytes::from);
        let method = ep
            .method
            .as_deref()
            .and_then(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
            .unwrap_or(if body.is_some() {
                Method::POST
            } else {
                Method::GET
            });
        let probed = ep.probe_path(path).unwrap_or(path).to_owned();
        Self {
            registry,
            pool: None,
            method,
            path: probed,
            headers: ep.headers.unwrap_or_default().into_iter().collect(),
            body,
        }
    }

    /// The `Host` header of the probe request, if its endpoint sets one.
    fn host(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.as_str())
    }
}

impl ProbeTransport for BalancedTransport {
    fn send(&self) -> SendFuture {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(&self.path);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if self.body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(match &self.body {
            Some(b) => Body::from(b.clone()),
            None => Body::empty(),
        });
        let registry = self.registry.clone();
        Box::pin(async move {
            let Ok(req) = req else {
                return RequestOutcome::TransportError;
            };
            let Ok(guard) = registry.pick() else {
                return RequestOutcome::Status(http::StatusCode::SERVICE_UNAVAILABLE);
            };
            let mut to = guard.target().clone();
            let Ok(resp) = to.call(req).await;
            let (parts, body) = resp.into_parts();
            // Read the body to the end: a streamed answer is load until it ends. A gRPC
            // answer is an error by its `grpc-status` (headers or trailers).
            let outcome = match body.collect().await {
                Ok(c) => RequestOutcome::of_response(parts.status, &parts.headers, c.trailers()),
                Err(_) => RequestOutcome::TransportError,
            };
            drop(guard);
            outcome
        })
    }

    fn describe(&self) -> String {
        match &self.pool {
            None => format!("{} {} (through the upstreams)", self.method, self.path),
            Some(pool) => format!("{} {} (through the pool `{pool}`)", self.method, self.path),
        }
    }
}

async fn probe_one(
    config: &GatewayConfig,
    pools: &ProbePools,
    path: &str,
) -> Result<ProbeReport, portcullis_probe::ProbeError> {
    let prober = Prober::new(config.probe.clone()).with_request_timeout(config.upstream_timeout());
    let transport = pools.transport(config, path);
    let pool = transport.pool.as_deref().unwrap_or(DEFAULT_POOL);
    tracing::info!(endpoint = %path, pool, "probing capacity");
    let report = prober.probe_transport(&transport, |_| {}).await?;
    if report.latency_bound() {
        tracing::warn!(
            endpoint = %path,
            capacity = report.max_concurrency,
            "latency_threshold_ms, not errors, bound the probed capacity"
        );
    }
    tracing::info!(
        endpoint = %path,
        capacity = report.max_concurrency,
        best_rps_level = report.best_rps_level,
        requests = report.total_requests,
        seconds = report.elapsed_secs,
        "probed capacity"
    );
    Ok(report)
}

fn apply<C: CapacitySource>(endpoints: &Endpoints<C>, path: &str, capacity: usize) {
    endpoints.set_capacity(path, capacity.max(1));
}

/// Probes `paths` one after the other (in-process storage), each through the pool of
/// `pools` that serves it, and sets their capacities.
pub async fn probe_local<C: CapacitySource>(
    config: Arc<GatewayConfig>,
    pools: ProbePools,
    endpoints: Endpoints<C>,
    paths: Vec<String>,
    ready: Component,
) {
    for path in &paths {
        let capacity = match probe_one(&config, &pools, path).await {
            Ok(r) => r.max_concurrency,
            Err(e) => {
                tracing::error!(endpoint = %path, error = %e, fallback = config.default_capacity, "capacity probe failed; using default_capacity");
                config.default_capacity as usize
            }
        };
        apply(&endpoints, path, capacity);
    }
    ready.set_ready(true);
}

/// Probes `paths` through the Redis capacity store (each through the pool of `pools` that
/// serves it): the first process probes and stores, the others wait for and reuse its
/// result; `force_reprobe` probes again.
pub async fn probe_shared<C: CapacitySource>(
    config: Arc<GatewayConfig>,
    pools: ProbePools,
    endpoints: Endpoints<C>,
    storage: RedisStorage,
    paths: Vec<String>,
    ready: Component,
) {
    for path in &paths {
        let probed = storage
            .get_or_probe(path, config.probe.force_reprobe, || async {
                probe_one(&config, &pools, path)
                    .await
                    .map(|r| r.max_concurrency.max(1))
            })
            .await;
        let capacity = match probed {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(endpoint = %path, error = %e, fallback = config.default_capacity, "capacity probe failed; using default_capacity");
                config.default_capacity as usize
            }
        };
        apply(&endpoints, path, capacity);
    }
    ready.set_ready(true);
}
