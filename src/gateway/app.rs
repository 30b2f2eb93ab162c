//! Assembly of the gateway: the layers, the proxy and the operator routes in one axum router,
//! and a server loop with graceful shutdown.

use super::config::GatewayConfig;
use super::proxy::{OriginalAuthority, Proxy, ProxySettings, ProxyTo};
use axum::body::Body;
use axum::Router;
use http::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A built gateway: its router plus the background tasks it owns (health checkers, probes).
///
/// Dropping it stops every background task.
#[derive(Debug)]
pub struct Gateway {
    router: Router,
    config: Arc<GatewayConfig>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// Builds the gateway for `config` (already validated).
    pub async fn build(config: GatewayConfig) -> Result<Self, BuildError> {
        let config = Arc::new(config);
        let proxy = Proxy::new(ProxySettings {
            upstream_timeout: Duration::from_secs_f64(config.upstream_timeout),
            connect_timeout: Duration::from_secs_f64(config.connect_timeout),
            ..ProxySettings::default()
        });
        let upstreams: Vec<ProxyTo> = config
            .parsed_upstreams()
            .into_iter()
            .map(|(u, _)| proxy.to(u))
            .collect();
        if upstreams.is_empty() {
            return Err(BuildError("no upstreams configured".into()));
        }
        let pool = Arc::new(RoundRobin {
            next: AtomicUsize::new(0),
            upstreams,
        });
        let proxy_service = tower::service_fn(move |req: Request<Body>| {
            let pool = pool.clone();
            async move {
                let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.upstreams.len();
                let mut svc = pool.upstreams[i].clone();
                tower::Service::call(&mut svc, req).await
            }
        });
        let router = Router::new()
            .fallback_service(proxy_service)
            .layer(axum::middleware::map_request(remember_authority));
        Ok(Self {
            router,
            config,
            tasks: Vec::new(),
        })
    }

    /// The router serving everything (proxy and operator routes).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The config the gateway was built with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }
}

#[derive(Debug)]
struct RoundRobin {
    next: AtomicUsize,
    upstreams: Vec<ProxyTo>,
}

async fn remember_authority(mut req: Request<Body>) -> Request<Body> {
    if let Some(a) = req.uri().authority().cloned() {
        req.extensions_mut().insert(OriginalAuthority(a));
    }
    req
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

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `drain` to finish.
///
/// Returns `Ok(true)` when every connection drained in time, `Ok(false)` when the drain
/// timeout cut some off.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<bool> {
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = fired_tx.send(());
    });
    let mut server = Box::pin(std::future::IntoFuture::into_future(server));
    tokio::select! {
        res = &mut server => { res?; return Ok(true); }
        _ = fired_rx => {}
    }
    match tokio::time::timeout(drain, server).await {
        Ok(res) => res.map(|_| true),
        Err(_) => Ok(false),
    }
}

/// Converts any response into an axum response (used to unify the layers' body types).
pub fn into_axum<B>(resp: Response<B>) -> Result<Response<Body>, Infallible>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    Ok(resp.map(Body::new))
}
