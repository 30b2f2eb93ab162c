//! The health check of the gateway's upstreams: `GET <url><health_endpoint>`, over TLS for
//! `https://` upstreams.
//!
//! An `http://` target goes through [`HttpProbe`] (its pooled keep-alive client). An
//! `https://` target gets one fresh connection per check, opened with the proxy's own TLS
//! settings ([`super::tls::UpstreamTls`]: the system roots or `upstream_tls`), so the check
//! trusts exactly what requests trust: a certificate the proxy would refuse fails the check
//! ("tls error") as it fails the request (502 `bad_gateway`). A fresh connection per check
//! also proves the handshake still succeeds (a certificate that expired or was replaced).
//!
//! With `http2: true` ([`ProxySettings::http2`](super::ProxySettings::http2)) an `http://`
//! target is checked over h2c (prior knowledge), as its requests are sent: a backend that
//! speaks only h2c would fail an HTTP/1.1 check and never get traffic, and one that speaks
//! only HTTP/1.1 would pass it while every request fails. The check has its own pooled
//! h2c client, built like the proxy's (its timeouts and pool bounds).

use super::pool::{Pools, UpstreamPool, UpstreamRequestBody};
use super::proxy::{h2_client, H2Client};
use axum::body::Body;
use http::{header, Request, Uri};
use http_body_util::BodyExt;
use portcullis_health::{HttpProbe, Probe, ProbeFuture, ProbeResult};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The upstreams' health check (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct UpstreamProbe {
    http: HttpProbe,
    pools: Arc<Pools>,
    /// `http2: true`: the h2c client that checks `http://` targets.
    h2: Option<H2Client>,
}

impl UpstreamProbe {
    /// A probe of `path` with a per-check `timeout`; `https://` targets use `proxy`'s TLS,
    /// and `http://` targets are checked over h2c when `proxy` sends its requests so.
    pub fn new(path: impl Into<String>, timeout: Duration, proxy: &super::Proxy) -> Self {
        Self::over(path, timeout, proxy, proxy.settings().http2)
    }

    /// [`new`](Self::new), checking `http://` targets over h2c when `http2` is set whatever
    /// `proxy` does (the `http2` setting of a named pool).
    pub fn over(
        path: impl Into<String>,
        timeout: Duration,
        proxy: &super::Proxy,
        http2: bool,
    ) -> Self {
        let settings = proxy.settings();
        Self {
            http: HttpProbe::new(path, timeout),
            pools: Arc::clone(proxy.pools()),
            h2: http2.then(|| h2_client(settings)),
        }
    }

    /// One `GET url` over h2c with `client`.
    fn probe_h2c(client: H2Client, url: String, timeout: Duration) -> ProbeFuture {
        Box::pin(async move {
            let start = Instant::now();
            let Ok(uri) = url.parse::<Uri>() else {
                return ProbeResult::unhealthy(start.elapsed(), "invalid url");
            };
            let check = async {
                let req = Request::get(uri)
                    .version(http::Version::HTTP_2)
                    .body(UpstreamRequestBody::Right(Body::empty()))
                    .map_err(|_| "invalid request")?;
                let resp = client.request(req).await.map_err(|e| {
                    if e.is_connect() {
                        "connect error"
                    } else {
                        "transport error"
                    }
                })?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                Ok::<_, &str>(status)
            };
            finish(start, tokio::time::timeout(timeout, check).await)
        })
    }
}

impl Probe for UpstreamProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        let url = format!("{}{}", target.trim_end_matches('/'), self.http.path());
        let timeout = self.http.timeout();
        if !target.starts_with("https://") {
            return match &self.h2 {
                Some(client) => Self::probe_h2c(client.clone(), url, timeout),
                None => self.http.probe(target),
            };
        }
        let pools = Arc::clone(&self.pools);
        Box::pin(async move {
            let start = Instant::now();
            let Ok(uri) = url.parse::<Uri>() else {
                return ProbeResult::unhealthy(start.elapsed(), "invalid url");
            };
            let (Some(authority), Some(path)) = (uri.authority(), uri.path_and_query()) else {
                return ProbeResult::unhealthy(start.elapsed(), "invalid url");
            };
            let pool = Arc::new(UpstreamPool::new(pools, authority, true));
            let check = async {
                let mut conn = pool.connect().await.map_err(|e| match e {
                    super::pool::ConnectError::Tls(_) => "tls error",
                    _ => "connect error",
                })?;
                let req = Request::get(path.as_str())
                    .header(header::HOST, pool.host_header().clone())
                    .body(UpstreamRequestBody::Right(Body::empty()))
                    .map_err(|_| "invalid request")?;
                let resp = conn
                    .sender()
                    .send_request(req)
                    .await
                    .map_err(|_| "transport error")?;
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                Ok::<_, &str>(status)
            };
            finish(start, tokio::time::timeout(timeout, check).await)
        })
    }
}

/// The result of one check that started at `start`: healthy on a 2xx.
fn finish(
    start: Instant,
    outcome: Result<Result<http::StatusCode, &str>, tokio::time::error::Elapsed>,
) -> ProbeResult {
    match outcome {
        Ok(Ok(status)) if status.is_success() => {
            ProbeResult::healthy(start.elapsed(), status.to_string())
        }
        Ok(Ok(status)) => ProbeResult::unhealthy(start.elapsed(), status.to_string()),
        Ok(Err(why)) => ProbeResult::unhealthy(start.elapsed(), why),
        Err(_) => ProbeResult::unhealthy(start.elapsed(), "timeout"),
    }
}
