//! [`UpstreamClient`]: the HTTP client that sends a request to the replica
//! [`HttpBalance`](crate::balance::HttpBalance) picked.
//!
//! `HttpBalance` calls a `Service<(T, Request<B>)>` with the picked replica's payload `T`.
//! With a [`ReplicaRegistry`](crate::balance::ReplicaRegistry) whose payload is each
//! replica's base URL (`http://host:port[/prefix]`, what
//! [`ReplicaRegistry::from_config`](crate::balance::ReplicaRegistry::from_config) adds from
//! `upstreams[].url`), this client is that service:
//!
//! * the request goes to `<base URL><path and query>` (`http://h:9000/api` + `/x?q=1` →
//!   `http://h:9000/api/x?q=1`); its `Host` header is dropped, so the upstream sees its own
//!   authority;
//! * hop-by-hop headers (RFC 9110 §7.6.1, plus every header named in `Connection`) are
//!   removed from the request and from the response;
//! * a replica that cannot be reached is a 502 `bad_gateway`, one that sends no response
//!   headers within the timeout a 504 `upstream_timeout`: the gateway's mapping, as JSON or
//!   gRPC trailers-only for gRPC requests. So the breaker and passive ejection count them as
//!   failures, and the error type is [`Infallible`].
//!
//! Connections are pooled and kept alive by one `hyper-util` client shared by every clone.
//!
//! ```
//! use axum::{routing::get, Router};
//! use portcullis::prelude::*;
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A replica to balance over.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("http://{}", listener.local_addr().unwrap());
//! let app = Router::new().route("/hi", get(|| async { "hello" }));
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! let registry = ReplicaRegistry::new(&BalanceConfig::default());
//! registry.add(url.as_str(), Tier::Primary, url.clone());
//! let mut client = HttpBalance::new(UpstreamClient::new(), registry);
//!
//! let req = http::Request::get("/hi").body(axum::body::Body::empty()).unwrap();
//! let resp = client.ready().await.unwrap().call(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//!
//! // Nothing listens there: 502 bad_gateway, an answer, not an error.
//! let req = http::Request::get("/hi").body(axum::body::Body::empty()).unwrap();
//! let resp = UpstreamClient::new().oneshot(("http://127.0.0.1:1".to_owned(), req)).await.unwrap();
//! assert_eq!(resp.status(), 502);
//! # }
//! ```

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_core::{is_grpc_request, BoxError, Rejection, RejectionBody};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// The default time an upstream has to send its response headers: 30 s (the gateway's
/// `upstream_timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time to open an upstream connection: 5 s (the gateway's `connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The response of an [`UpstreamClient`]: the upstream's body, or the 502/504 it answered
/// itself.
pub type UpstreamResponse = Response<RejectionBody<Incoming>>;

/// The future of an [`UpstreamClient`] call.
pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<UpstreamResponse, Infallible>> + Send>>;

/// Sends `(base_url, request)` to `<base_url><path and query>`: the dispatch service of
/// [`HttpBalance`](crate::balance::HttpBalance) for replicas keyed by base URL (see the
/// [module docs](self)).
pub struct UpstreamClient<B> {
    client: Client<HttpConnector, B>,
    http2: bool,
    timeout: Duration,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            http2: self.http2,
            timeout: self.timeout,
        }
    }
}

impl<B> fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("http2", &self.http2)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// An HTTP/1.1 client with keep-alive, [`DEFAULT_CONNECT_TIMEOUT`] and
    /// [`DEFAULT_TIMEOUT`].
    pub fn new() -> Self {
        Self::build(false, DEFAULT_CONNECT_TIMEOUT)
    }

    /// An HTTP/2 client with prior knowledge (cleartext h2c), for gRPC upstreams.
    pub fn http2() -> Self {
        Self::build(true, DEFAULT_CONNECT_TIMEOUT)
    }

    /// Uses `connect_timeout` to open a connection (then 502 `bad_gateway`).
    pub fn with_connect_timeout(self, connect_timeout: Duration) -> Self {
        let mut rebuilt = Self::build(self.http2, connect_timeout);
        rebuilt.timeout = self.timeout;
        rebuilt
    }

    /// Gives the upstream `timeout` to send its response headers (then 504
    /// `upstream_timeout`). The body streams on without a limit of this client.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn build(http2: bool, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build(connector);
        Self {
            client,
            http2,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl<B> Default for UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<T, B> Service<(T, Request<B>)> for UpstreamClient<B>
where
    T: AsRef<str>,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = UpstreamResponse;
    type Error = Infallible;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool opens connections on demand; a request never waits here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (base, req): (T, Request<B>)) -> Self::Future {
        let grpc = is_grpc_request(req.headers());
        let answer = move |rejection: Rejection| -> Result<UpstreamResponse, Infallible> {
            Ok(if grpc {
                rejection.to_grpc_response()
            } else {
                rejection.to_json_response()
            })
        };
        let (mut parts, body) = req.into_parts();
        let Some(uri) = upstream_uri(base.as_ref(), &parts.uri) else {
            tracing::debug!(base = base.as_ref(), "not an http://host:port base URL");
            return Box::pin(std::future::ready(answer(Rejection::bad_gateway())));
        };
        parts.uri = uri;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        let sent = self.client.request(Request::from_parts(parts, body));
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, RejectionBody::inner(body)))
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, connect = e.is_connect(), "upstream request failed");
                    answer(Rejection::bad_gateway())
                }
                Err(_) => answer(Rejection::upstream_timeout(timeout)),
            }
        })
    }
}

/// `<base><path and query of uri>`, or `None` when `base` is not an `http://host:port`
/// URL (a trailing `/` of `base` is dropped).
fn upstream_uri(base: &str, uri: &Uri) -> Option<Uri> {
    let base = base.trim_end_matches('/');
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = format!("{base}{pq}").parse().ok()?;
    (uri.scheme_str() == Some("http") && uri.authority().is_some()).then_some(uri)
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop headers of `headers` (RFC 9110 §7.6.1: `Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`,
/// `Transfer-Encoding`, `Upgrade`), and every header that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them; comparing standard names is cheaper than `remove`.
    let any = headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.iter().any(|h| h == k));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_prefixes_the_path_and_query() {
        let uri: Uri = "/x?q=1".parse().unwrap();
        let to = |base| upstream_uri(base, &uri).map(|u| u.to_string());
        assert_eq!(to("http://h:9000").as_deref(), Some("http://h:9000/x?q=1"));
        assert_eq!(
            to("http://h:9000/api/").as_deref(),
            Some("http://h:9000/api/x?q=1")
        );
        assert_eq!(to("h:9000"), None);
        assert_eq!(to("https://h:9000"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-secret", "1"),
            ("x-kept", "2"),
        ] {
            h.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "2");
    }
}
