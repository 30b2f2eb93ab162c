//! What is probed: one endpoint ([`ProbeTarget`]) and how one request is sent
//! ([`ProbeTransport`], [`HttpTransport`]).

use crate::error::ProbeError;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// One endpoint to probe: base URL, path, method, headers and an optional JSON body.
///
/// These come from the endpoint's entry in the gateway config (`endpoints[path].{method,
/// headers, body}`). Without a `method`, the request is `POST` when there is a body and
/// `GET` otherwise. A body is sent with `content-type: application/json` unless the headers
/// set a content type.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeTarget {
    /// Where the API lives, e.g. `http://127.0.0.1:8000` (a path prefix is kept).
    pub base_url: String,
    /// The endpoint path, e.g. `/predict`.
    pub path: String,
    /// HTTP method; `None` means `POST` with a body, `GET` without.
    pub method: Option<String>,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// JSON request body.
    pub body: Option<serde_json::Value>,
}

impl ProbeTarget {
    /// A target for `path` on `base_url`, no headers, no body.
    pub fn new(base_url: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            path: path.into(),
            ..Self::default()
        }
    }

    /// Sets the HTTP method.
    pub fn with_method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Adds a request header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the JSON body.
    pub fn with_json_body(mut self, body: serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }

    /// The full URL probed: `base_url` (trailing `/` trimmed) followed by `path`.
    pub fn url(&self) -> String {
        let path = self.path.trim_start_matches('/');
        format!("{}/{}", self.base_url.trim_end_matches('/'), path)
    }

    /// The method used: the configured one, else `POST` with a body and `GET` without.
    pub fn resolved_method(&self) -> String {
        match &self.method {
            Some(m) => m.to_ascii_uppercase(),
            None if self.body.is_some() => "POST".into(),
            None => "GET".into(),
        }
    }
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.resolved_method(), self.url())
    }
}

/// How one probe request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A response arrived (and its body was read to the end).
    Status(StatusCode),
    /// A gRPC response (HTTP 200) whose `grpc-status`, in its headers (trailers-only) or
    /// its trailers, is not `OK` (0): an error, whatever the code. The probe sends the
    /// endpoint's own sample request, which must succeed, as a 4xx is an error for plain
    /// HTTP: a probe answered `INVALID_ARGUMENT` or `UNIMPLEMENTED` measures nothing.
    GrpcStatus(i32),
    /// No complete response within the request timeout.
    Timeout,
    /// The connection could not be opened.
    ConnectError,
    /// Any other transport failure (reset, protocol error, body error).
    TransportError,
}

impl RequestOutcome {
    /// `true` for a 2xx response (without a failed `grpc-status`); everything else counts
    /// as an error.
    pub fn is_success(&self) -> bool {
        matches!(self, RequestOutcome::Status(s) if s.is_success())
    }

    /// A short stable label used in outcome histograms: `"200"`, `"503"`,
    /// `"grpc UNAVAILABLE"`, `"timeout"`, `"connect error"`, `"transport error"`.
    pub fn label(&self) -> String {
        match self {
            RequestOutcome::Status(s) => s.as_u16().to_string(),
            RequestOutcome::GrpcStatus(code) => {
                match portcullis_core::classify::GrpcCodeSet::name_of(*code) {
                    Some(name) => format!("grpc {name}"),
                    None => format!("grpc {code}"),
                }
            }
            RequestOutcome::Timeout => "timeout".into(),
            RequestOutcome::ConnectError => "connect error".into(),
            RequestOutcome::TransportError => "transport error".into(),
        }
    }

    /// The outcome of a response read to its end: [`GrpcStatus`](Self::GrpcStatus) when a
    /// `grpc-status` other than 0 is in `headers` (trailers-only) or `trailers`, else
    /// [`Status`](Self::Status).
    pub fn of_response(
        status: StatusCode,
        headers: &HeaderMap,
        trailers: Option<&HeaderMap>,
    ) -> Self {
        let grpc = |h: &HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i32>().ok())
        };
        match grpc(headers).or_else(|| trailers.and_then(grpc)) {
            Some(code) if code != 0 => RequestOutcome::GrpcStatus(code),
            _ => RequestOutcome::Status(status),
        }
    }
}

/// The future a [`ProbeTransport`] returns.
pub type SendFuture = Pin<Box<dyn Future<Output = RequestOutcome> + Send + 'static>>;

/// The future of [`ProbeTransport::prepare`].
pub type PrepareFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Sends one probe request to the endpoint under test.
///
/// The [`Prober`](crate::Prober) measures latency and applies the request timeout around
/// [`send`](ProbeTransport::send), and drops the future to cancel. [`HttpTransport`] is the
/// real implementation; the gateway may implement this over its own balanced upstream
/// service to probe "through its upstreams".
pub trait ProbeTransport: Send + Sync {
    /// Sends one request and reports how it ended. Dropping the future cancels it.
    fn send(&self) -> SendFuture;

    /// A human description of the endpoint, used in reports and errors.
    fn describe(&self) -> String;

    /// Gets ready to send `concurrency` requests at once, before a level that sends them
    /// as one wave: [`HttpTransport`] opens the connections its pool lacks, so that the
    /// wave's requests reach the endpoint together instead of the ones on new connections
    /// arriving a connect later (see the `prober` module docs). Best effort: a connection
    /// that cannot be opened is left to the request. The prober bounds the wait with the
    /// request timeout. The default does nothing.
    fn prepare(&self, concurrency: usize) -> PrepareFuture {
        let _ = concurrency;
        Box::pin(std::future::ready(()))
    }
}

impl<T: ProbeTransport + ?Sized> ProbeTransport for &T {
    fn send(&self) -> SendFuture {
        (**self).send()
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn prepare(&self, concurrency: usize) -> PrepareFuture {
        (**self).prepare(concurrency)
    }
}

impl<T: ProbeTransport + ?Sized> ProbeTransport for std::sync::Arc<T> {
    fn send(&self) -> SendFuture {
        (**self).send()
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn prepare(&self, concurrency: usize) -> PrepareFuture {
        (**self).prepare(concurrency)
    }
}

/// The shared, pooled HTTP client type the prober uses.
pub(crate) type ProbeClient = Client<WarmConnector, Full<Bytes>>;

/// The prober's connector: an [`HttpConnector`] that first hands out connections opened
/// ahead of a wave by [`HttpTransport::prepare`], so that the pool's new connections are
/// ready the moment the wave's requests ask for them.
#[derive(Debug, Clone)]
pub(crate) struct WarmConnector {
    inner: HttpConnector,
    /// Connections opened ahead, per `host:port`, each taken by one pool connect.
    opened: Arc<Mutex<HashMap<String, Vec<TcpStream>>>>,
}

impl WarmConnector {
    pub(crate) fn new(inner: HttpConnector) -> Self {
        Self {
            inner,
            opened: Arc::default(),
        }
    }

    /// A connection opened ahead that the endpoint has not closed meanwhile.
    fn take(&self, authority: &str) -> Option<TcpStream> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        let streams = opened.get_mut(authority)?;
        while let Some(stream) = streams.pop() {
            // Nothing to read yet means open; end of file (or an error) means closed.
            let mut byte = [0u8; 1];
            if matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, authority: &str, streams: Vec<TcpStream>) {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened
            .entry(authority.to_owned())
            .or_default()
            .extend(streams);
    }

    fn waiting(&self, authority: &str) -> usize {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.get(authority).map_or(0, Vec::len)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for WarmConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let authority = dst.authority().map(|a| a.as_str().to_owned());
        if let Some(stream) = authority.and_then(|a| self.take(&a)) {
            return Box::pin(std::future::ready(Ok(TokioIo::new(stream))));
        }
        let connecting = self.inner.call(dst);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// A [`ProbeTransport`] sending one fixed HTTP request on the prober's pooled client.
///
/// Built by [`Prober::transport`](crate::Prober::transport); clones share the pool.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: ProbeClient,
    connector: WarmConnector,
    /// The most requests this transport (and its clones) had in flight at once: the pool
    /// holds at least that many connections (it keeps idle ones for 30 s).
    peak: Arc<InFlight>,
    /// `host:port`, the key of the connections opened ahead.
    authority: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    description: String,
}

impl HttpTransport {
    pub(crate) fn new(
        client: ProbeClient,
        connector: WarmConnector,
        target: &ProbeTarget,
    ) -> Result<Self, ProbeError> {
        let url = target.url();
        let uri: Uri = url
            .parse()
            .map_err(|e| ProbeError::InvalidTarget(format!("`{url}` is not a valid URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(ProbeError::InvalidTarget(format!(
                "`{url}`: only http:// URLs can be probed"
            )));
        }
        let method_name = target.resolved_method();
        let method = Method::from_bytes(method_name.as_bytes()).map_err(|_| {
            ProbeError::InvalidTarget(format!("`{method_name}` is not an HTTP method"))
        })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &target.headers {
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ProbeError::InvalidTarget(format!("`{name}` is not a valid header name"))
            })?;
            let v = HeaderValue::from_str(value).map_err(|_| {
                ProbeError::InvalidTarget(format!("the value of header `{name}` is not valid"))
            })?;
            headers.append(n, v);
        }
        let body = match &target.body {
            Some(json) => {
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Bytes::from(serde_json::to_vec(json).map_err(|e| {
                    ProbeError::InvalidTarget(format!("the body cannot be encoded: {e}"))
                })?)
            }
            None => Bytes::new(),
        };
        let authority = uri.authority().map(|a| a.as_str().to_owned());
        let authority = authority.ok_or_else(|| {
            ProbeError::InvalidTarget(format!("`{url}` has no host to connect to"))
        })?;
        Ok(Self {
            client,
            connector,
            peak: Arc::default(),
            authority,
            method,
            uri,
            headers,
            body,
            description: target.to_string(),
        })
    }
}

impl ProbeTransport for HttpTransport {
    fn send(&self) -> SendFuture {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        let fut = self.client.request(req);
        let guard = self.peak.enter();
        Box::pin(async move {
            let _guard = guard;
            match fut.await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    // Read the body to the end: latency covers the whole response and the
                    // connection goes back to the pool.
                    match body.collect().await {
                        Ok(c) => {
                            RequestOutcome::of_response(parts.status, &parts.headers, c.trailers())
                        }
                        Err(_) => RequestOutcome::TransportError,
                    }
                }
                Err(e) if e.is_connect() => RequestOutcome::ConnectError,
                Err(_) => RequestOutcome::TransportError,
            }
        })
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    /// Opens, all at once, the connections the pool lacks for `concurrency` requests: the
    /// pool holds about as many as this transport ever had in flight together, and the
    /// connector hands the new ones to the wave's first connects.
    fn prepare(&self, concurrency: usize) -> PrepareFuture {
        let have = self.peak.peak() + self.connector.waiting(&self.authority);
        let missing = concurrency.saturating_sub(have);
        if missing == 0 {
            return Box::pin(std::future::ready(()));
        }
        let (connector, authority) = (self.connector.clone(), self.authority.clone());
        Box::pin(async move {
            let opened = futures_util::future::join_all(
                (0..missing).map(|_| TcpStream::connect(authority.as_str())),
            )
            .await;
            let streams: Vec<TcpStream> = opened
                .into_iter()
                .filter_map(Result::ok)
                .filter(|s| s.set_nodelay(true).is_ok())
                .collect();
            let opened_any = !streams.is_empty();
            connector.put(&authority, streams);
            if opened_any {
                // A moment for the endpoint to accept them, so that the wave's requests do
                // not wait in its accept queue either.
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        })
    }
}

/// How long [`HttpTransport::prepare`] waits after opening connections.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Requests in flight on an [`HttpTransport`] and the most there have been at once.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        InFlightGuard(Arc::clone(self))
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_method_resolution() {
        let t = ProbeTarget::new("http://h:1/", "work");
        assert_eq!(t.url(), "http://h:1/work");
        assert_eq!(t.resolved_method(), "GET");
        let t = t.with_json_body(serde_json::json!({"a": 1}));
        assert_eq!(t.resolved_method(), "POST");
        let t = t.with_method("put");
        assert_eq!(t.to_string(), "PUT http://h:1/work");
    }

    #[test]
    fn outcome_labels() {
        assert_eq!(RequestOutcome::Status(StatusCode::OK).label(), "200");
        assert!(RequestOutcome::Status(StatusCode::NO_CONTENT).is_success());
        assert!(!RequestOutcome::Status(StatusCode::SERVICE_UNAVAILABLE).is_success());
        assert!(!RequestOutcome::Timeout.is_success());
        let grpc = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_str(v).unwrap());
            h
        };
        let none = HeaderMap::new();
        // Trailers-only, and in the trailers.
        let unavailable = RequestOutcome::of_response(StatusCode::OK, &grpc("14"), None);
        assert_eq!(unavailable, RequestOutcome::GrpcStatus(14));
        assert!(!unavailable.is_success());
        assert_eq!(unavailable.label(), "grpc UNAVAILABLE");
        let invalid = RequestOutcome::of_response(StatusCode::OK, &none, Some(&grpc("3")));
        assert_eq!(invalid, RequestOutcome::GrpcStatus(3));
        assert!(!invalid.is_success());
        let ok = RequestOutcome::of_response(StatusCode::OK, &none, Some(&grpc("0")));
        assert!(ok.is_success());
        assert!(RequestOutcome::of_response(StatusCode::OK, &none, None).is_success());
        assert_eq!(RequestOutcome::ConnectError.label(), "connect error");
    }
}
