//! One health check of one target.
//!
//! [`Probe`] is a trait so that unit tests can inject a deterministic probe; the default is
//! [`HttpProbe`], which sends `GET <base><health_endpoint>` on one shared, pooled `hyper-util`
//! client (keep-alive), with a per-probe timeout. Non-2xx, timeouts and connect errors are
//! failures.

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// `true` when the target answered healthy.
    pub healthy: bool,
    /// How long the probe took.
    pub latency: Duration,
    /// A short human description of the outcome (`"200 OK"`, `"timeout"`, `"connect error"`).
    pub detail: String,
}

impl ProbeResult {
    /// A healthy result.
    pub fn healthy(latency: Duration, detail: impl Into<String>) -> Self {
        Self {
            healthy: true,
            latency,
            detail: detail.into(),
        }
    }

    /// A failed result.
    pub fn unhealthy(latency: Duration, detail: impl Into<String>) -> Self {
        Self {
            healthy: false,
            latency,
            detail: detail.into(),
        }
    }
}

/// The future a [`Probe`] returns.
pub type ProbeFuture = Pin<Box<dyn Future<Output = ProbeResult> + Send + 'static>>;

/// Checks the health of one target, identified by its base URL (or any key for non-HTTP
/// targets).
///
/// Implementations must bound their own duration (the HTTP probe applies its timeout).
pub trait Probe: Send + Sync + 'static {
    /// Probes `target` once.
    fn probe(&self, target: &str) -> ProbeFuture;
}

impl<P: Probe + ?Sized> Probe for Arc<P> {
    fn probe(&self, target: &str) -> ProbeFuture {
        (**self).probe(target)
    }
}

/// The real HTTP probe: `GET <target><path>` with a timeout, on one shared pooled client.
///
/// Clone it freely: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    path: Arc<str>,
    timeout: Duration,
}

impl HttpProbe {
    /// A probe of `path` (e.g. `/healthz`) with the given per-probe timeout.
    pub fn new(path: impl Into<String>, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(connector);
        let mut path = path.into();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        Self {
            client,
            path: path.into(),
            timeout,
        }
    }

    /// The probed path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The per-probe timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Probe for HttpProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        let url = format!("{}{}", target.trim_end_matches('/'), self.path);
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let start = Instant::now();
            let uri: Uri = match url.parse() {
                Ok(u) => u,
                Err(_) => return ProbeResult::unhealthy(start.elapsed(), "invalid url"),
            };
            let req = match Request::get(uri).body(Empty::new()) {
                Ok(r) => r,
                Err(_) => return ProbeResult::unhealthy(start.elapsed(), "invalid request"),
            };
            let fut = async {
                let resp = client.request(req).await?;
                let status = resp.status();
                // Drain the (small) body so the connection goes back to the pool.
                let _ = resp.into_body().collect().await;
                Ok::<_, hyper_util::client::legacy::Error>(status)
            };
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(status)) if status.is_success() => {
                    ProbeResult::healthy(start.elapsed(), status.to_string())
                }
                Ok(Ok(status)) => ProbeResult::unhealthy(start.elapsed(), status.to_string()),
                Ok(Err(e)) if e.is_connect() => {
                    ProbeResult::unhealthy(start.elapsed(), "connect error")
                }
                Ok(Err(_)) => ProbeResult::unhealthy(start.elapsed(), "transport error"),
                Err(_) => ProbeResult::unhealthy(start.elapsed(), "timeout"),
            }
        })
    }
}
