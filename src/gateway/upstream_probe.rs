//! The health check of the gateway's upstreams: `GET <url><health_endpoint>`, over TLS for
//! `https://` upstreams.
//!
//! An `http://` target goes through [`HttpProbe`] (its pooled keep-alive client). An
//! `https://` target gets one fresh connection per check, opened with the proxy's own TLS
//! settings ([`super::tls::UpstreamTls`]: the system roots or `upstream_tls`), so the check
//! trusts exactly what requests trust: a certificate the proxy would refuse fails the check
//! ("tls error") as it fails the request (502 `bad_gateway`). A fresh connection per check
//! also proves the handshake still succeeds (a certificate that expired or was replaced).

use super::pool::{Pools, UpstreamPool, UpstreamRequestBody};
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
}

impl UpstreamProbe {
    /// A probe of `path` with a per-check `timeout`; `https://` targets use `proxy`'s TLS.
    pub fn new(path: impl Into<String>, timeout: Duration, proxy: &super::Proxy) -> Self {
        Self {
            http: HttpProbe::new(path, timeout),
            pools: Arc::clone(proxy.pools()),
        }
    }
}

impl Probe for UpstreamProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        if !target.starts_with("https://") {
            return self.http.probe(target);
        }
        let url = format!("{}{}", target.trim_end_matches('/'), self.http.path());
        let timeout = self.http.timeout();
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
            match tokio::time::timeout(timeout, check).await {
                Ok(Ok(status)) if status.is_success() => {
                    ProbeResult::healthy(start.elapsed(), status.to_string())
                }
                Ok(Ok(status)) => ProbeResult::unhealthy(start.elapsed(), status.to_string()),
                Ok(Err(why)) => ProbeResult::unhealthy(start.elapsed(), why),
                Err(_) => ProbeResult::unhealthy(start.elapsed(), "timeout"),
            }
        })
    }
}
