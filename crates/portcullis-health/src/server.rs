//! [`HealthServer`]: a small standalone server answering `/healthz` and `/readyz`.
//!
//! Its own listener, bound to `127.0.0.1` by default
//! (probes are for the local orchestrator, not the internet), port 9090 by default, serving
//! the [`HealthRegistry`] routes, and owning the [`CheckSet`] loops that keep the registry's
//! flags fresh. [`start`](HealthServer::start) binds and spawns the loops;
//! [`stop`](HealthServer::stop) cancels them and closes the listener and every open
//! connection, so the port is free again when it returns. Both are idempotent, and
//! `start` → `stop` → `start` on the same port works.
//!
//! Gateway config: `health_server: {enable: false, listen: "127.0.0.1:9090"}`.

use crate::checks::{Check, CheckPolicy, CheckSet, ChecksHandle};
use crate::readiness::HealthRegistry;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The default port of the health server.
pub const DEFAULT_HEALTH_PORT: u16 = 9090;

/// `health_server:` in the gateway config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthServerConfig {
    /// Run the standalone server (default `false`: `/healthz` and `/readyz` are still served
    /// on the main listener).
    pub enable: bool,
    /// The address to bind (default `127.0.0.1:9090`).
    pub listen: SocketAddr,
}

impl Default for HealthServerConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_HEALTH_PORT)),
        }
    }
}

struct Running {
    local_addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<()>,
    checks: ChecksHandle,
}

/// The standalone liveness/readiness server (see the [module docs](self)).
///
/// ```
/// use portcullis_health::{HealthRegistry, HealthServer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let registry = HealthRegistry::new();
/// let mut server = HealthServer::new(registry.clone(), "127.0.0.1:0".parse().unwrap());
/// let addr = server.start().await?;
/// assert!(addr.ip().is_loopback());
/// server.stop().await;
/// server.stop().await; // idempotent
/// # Ok(()) }
/// ```
pub struct HealthServer {
    registry: HealthRegistry,
    listen: SocketAddr,
    checks: CheckSet,
    running: Option<Running>,
}

impl std::fmt::Debug for HealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthServer")
            .field("listen", &self.listen)
            .field("local_addr", &self.local_addr())
            .field("checks", &self.checks)
            .finish()
    }
}

impl HealthServer {
    /// A server of `registry`'s routes on `listen`. Nothing is bound until
    /// [`start`](Self::start).
    pub fn new(registry: HealthRegistry, listen: SocketAddr) -> Self {
        Self {
            registry,
            listen,
            checks: CheckSet::new(),
            running: None,
        }
    }

    /// A server configured by `health_server:`.
    pub fn from_config(config: &HealthServerConfig, registry: HealthRegistry) -> Self {
        Self::new(registry, config.listen)
    }

    /// Adds a check updating the component `name` (registered ready if it does not
    /// exist yet). Checks added while running start with the next `start`.
    pub fn with_check(
        mut self,
        name: impl Into<String>,
        check: impl Check,
        policy: CheckPolicy,
    ) -> Self {
        self.add_check(name, check, policy);
        self
    }

    /// Adds a check (see [`with_check`](Self::with_check)).
    pub fn add_check(
        &mut self,
        name: impl Into<String>,
        check: impl Check,
        policy: CheckPolicy,
    ) -> &mut Self {
        let component = self.registry.register_ready(name);
        self.checks.add(component, check, policy);
        self
    }

    /// The registry this server reports.
    pub fn registry(&self) -> &HealthRegistry {
        &self.registry
    }

    /// The bound address while running (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|r| r.local_addr)
    }

    /// `true` between `start` and `stop`.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Binds the listener, starts serving and spawns the check loops; returns the bound
    /// address. Already running: returns the current address.
    pub async fn start(&mut self) -> io::Result<SocketAddr> {
        if let Some(r) = &self.running {
            return Ok(r.local_addr);
        }
        let listener = TcpListener::bind(self.listen).await?;
        let local_addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(serve(listener, self.registry.routes(), rx));
        let checks = self.checks.spawn();
        tracing::info!(%local_addr, checks = self.checks.len(), "health server started");
        self.running = Some(Running {
            local_addr,
            shutdown: tx,
            server,
            checks,
        });
        Ok(local_addr)
    }

    /// Cancels the check loops, closes the listener and every connection, and waits until
    /// the port is free. Does nothing when not running.
    pub async fn stop(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        r.checks.stop().await;
        let _ = r.shutdown.send(());
        let mut server = r.server;
        // The serve task exits at once on the signal; the bound is a safety net.
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
        tracing::info!(local_addr = %r.local_addr, "health server stopped");
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            // Aborting the serve task drops the listener and its connection tasks; the
            // check loops stop with their handle.
            r.server.abort();
        }
    }
}

/// The accept loop: one task per connection, all owned by a `JoinSet` that is dropped
/// (aborting them) when the loop ends.
async fn serve(listener: TcpListener, app: axum::Router, mut shutdown: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "health server accept failed");
                        // e.g. EMFILE: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = TowerToHyperService::new(app.clone());
                let builder = builder.clone();
                conns.spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::check_fn;
    use axum::body::Body;
    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tower::ServiceExt;

    async fn call(app: &axum::Router, path: &str) -> (StatusCode, serde_json::Value) {
        let resp = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn routes_answer_every_status_and_body() {
        let registry = HealthRegistry::new();
        let app = registry.routes();
        assert_eq!(
            call(&app, "/healthz").await,
            (StatusCode::OK, serde_json::json!({"status": "ok"}))
        );
        assert_eq!(
            call(&app, "/readyz").await,
            (StatusCode::OK, serde_json::json!({"status": "ok"}))
        );

        let startup = registry.register("startup");
        let storage = registry.register_ready("storage");
        assert_eq!(
            call(&app, "/healthz").await.0,
            StatusCode::OK,
            "not ready is still live"
        );
        assert_eq!(
            call(&app, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not_ready", "failing": ["startup"]})
            )
        );
        startup.set_ready(true);
        storage.set_ready(false);
        assert_eq!(
            call(&app, "/readyz").await.1,
            serde_json::json!({"status": "not_ready", "failing": ["storage"]})
        );
        storage.set_ready(true);
        assert_eq!(call(&app, "/readyz").await.0, StatusCode::OK);

        let event_loop = registry.register_ready("event_loop");
        event_loop.set_wedged(true);
        assert_eq!(
            call(&app, "/healthz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "wedged", "failing": ["event_loop"]})
            )
        );
        assert_eq!(
            call(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        event_loop.set_wedged(false);
        assert_eq!(call(&app, "/healthz").await.0, StatusCode::OK);

        let head = app
            .clone()
            .oneshot(Request::head("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        let post = app
            .clone()
            .oneshot(Request::post("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    /// A Redis-ping-like check: readiness flips after exactly N failed pings and comes
    /// back after one good ping (paused clock).
    #[tokio::test(start_paused = true)]
    async fn readiness_flips_after_n_failed_pings_and_back_after_one_success() {
        let registry = HealthRegistry::new();
        let redis_up = Arc::new(AtomicBool::new(true));
        let up = redis_up.clone();
        let mut server = HealthServer::new(registry.clone(), "127.0.0.1:0".parse().unwrap())
            .with_check(
                "storage",
                check_fn(move || {
                    let ok = up.load(Ordering::SeqCst);
                    async move {
                        if ok {
                            Ok(())
                        } else {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionRefused,
                                "connection refused",
                            ))
                        }
                    }
                }),
                CheckPolicy {
                    interval: Duration::from_secs(5),
                    timeout: Duration::from_secs(1),
                    failure_threshold: 3,
                    wedge_on_failure: false,
                },
            );
        let app = registry.routes();
        server.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await; // first ping at t=0
        assert_eq!(call(&app, "/readyz").await.0, StatusCode::OK);

        redis_up.store(false, Ordering::SeqCst);
        // Pings at t=5 and t=10 fail: still ready.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(call(&app, "/readyz").await.0, StatusCode::OK);
        assert_eq!(registry.get("storage").unwrap().consecutive_failures(), 2);
        // The third failure (t=15) flips it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            call(&app, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not_ready", "failing": ["storage"]})
            )
        );
        assert_eq!(
            call(&app, "/healthz").await.0,
            StatusCode::OK,
            "readiness only"
        );

        redis_up.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await; // one good ping at t=20
        assert_eq!(
            call(&app, "/readyz").await,
            (StatusCode::OK, serde_json::json!({"status": "ok"}))
        );
        server.stop().await;
    }

    async fn get(
        addr: SocketAddr,
        path: &str,
    ) -> Result<StatusCode, hyper_util::client::legacy::Error> {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = client
            .request(
                Request::get(format!("http://{addr}{path}"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await?;
        Ok(resp.status())
    }

    #[tokio::test]
    async fn start_stop_start_on_the_same_port() {
        let registry = HealthRegistry::new();
        let mut server = HealthServer::new(registry.clone(), "127.0.0.1:0".parse().unwrap());
        server.stop().await; // before start: no-op
        assert!(!server.is_running());

        let addr = server.start().await.unwrap();
        assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(
            server.start().await.unwrap(),
            addr,
            "start twice: same listener"
        );
        assert_eq!(get(addr, "/healthz").await.unwrap(), StatusCode::OK);
        registry.register("startup");
        assert_eq!(
            get(addr, "/readyz").await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE
        );

        // A keep-alive connection is open now; stop must still free the port.
        server.stop().await;
        server.stop().await;
        assert!(
            get(addr, "/healthz").await.is_err(),
            "nothing listens after stop"
        );

        // Same port again.
        let mut again = HealthServer::new(registry.clone(), addr);
        assert_eq!(again.start().await.unwrap(), addr);
        assert_eq!(get(addr, "/healthz").await.unwrap(), StatusCode::OK);
        again.stop().await;
        let mut third = HealthServer::from_config(
            &HealthServerConfig {
                enable: true,
                listen: addr,
            },
            registry,
        );
        assert_eq!(third.start().await.unwrap(), addr);
        third.stop().await;
    }

    #[tokio::test]
    async fn stop_cancels_the_check_loops() {
        let registry = HealthRegistry::new();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let mut server = HealthServer::new(registry, "127.0.0.1:0".parse().unwrap()).with_check(
            "dep",
            check_fn(move || {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), std::io::Error>(()) }
            }),
            CheckPolicy {
                interval: Duration::from_millis(10),
                ..Default::default()
            },
        );
        server.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.stop().await;
        let n = calls.load(Ordering::SeqCst);
        assert!(n >= 2, "the loop ran ({n})");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.load(Ordering::SeqCst), n, "no check after stop");
    }

    #[test]
    fn config_defaults_and_yaml_names() {
        let c: HealthServerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, HealthServerConfig::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:9090");
        assert!(!c.enable);
        let c: HealthServerConfig =
            serde_json::from_str(r#"{"enable": true, "listen": "0.0.0.0:9191"}"#).unwrap();
        assert!(c.enable && c.listen.port() == 9191);
        assert!(serde_json::from_str::<HealthServerConfig>(r#"{"port": 1}"#).is_err());
        let p: CheckPolicy =
            serde_json::from_str(r#"{"interval": 0.5, "failure_threshold": 2}"#).unwrap();
        assert_eq!(p.interval, Duration::from_millis(500));
        assert_eq!(p.failure_threshold, 2);
    }
}
