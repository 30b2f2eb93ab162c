//! The reverse-proxy core of the gateway.
//!
//! * HTTP/1 upstreams are reached through the proxy's own per-thread connection pool on
//!   `hyper::client::conn::http1` ([`super::pool`]): LIFO idle stacks, a connection back in
//!   its stack the moment its response body ends, no lock. HTTP/2 upstreams (gRPC, which
//!   needs HTTP/2 end to end, and every request with [`ProxySettings::http2`]) share one
//!   h2c (prior knowledge) connection per upstream and thread on
//!   `hyper::client::conn::http2` (`pool::h2`).
//! * Request and response bodies are streamed through, never buffered whole.
//! * Hop-by-hop headers (RFC 9110 §7.6.1, plus every header named in `Connection`) are removed
//!   both ways; `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` are added. The
//!   request's header map is moved upstream and edited in place, never rebuilt.
//! * A connect error (or a connection the upstream broke) answers 502 `bad_gateway`; no
//!   response headers within `upstream_timeout` answers 504 `upstream_timeout`. Through
//!   the balancer ([`ProxyTo::send`]) a connect error hands the request back unsent
//!   ([`NotSent`]) instead, and the request is retried on another replica (HTTP/1 and
//!   HTTP/2 alike: the connection is had before the request is rewritten). The JSON body
//!   never names the upstream: internal addresses stay internal (they are logged instead).
//! * Errors are classified by side. The client's request body is watched while it streams
//!   ([`ClientBody`]): malformed framing answers 400 `bad_request`, a client that went away
//!   gets 499 `client_closed` (nobody reads it; it is counted, like nginx's 499), and a client
//!   that stops sending for `client_body_timeout` gets 408 `client_timeout`. None of these is a
//!   5xx, so none counts against the upstream: not for ejection, not for the breaker, not in
//!   its `failures`. `upstream_timeout` starts once the request body has been sent, so a slow
//!   upload is never blamed on the upstream.

use super::bodies::{BodyOutcome, BodyWatch, ClientBody, UpstreamBody};
use super::pool::h2::{self, H2Sender};
use super::pool::{ConnectError, PooledConn, Pools, UpstreamPool, UpstreamRequestBody};
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use portcullis_balance::NotSent;
use portcullis_core::classify::GrpcFailures;
use portcullis_core::Rejection;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The response body the proxy hands to the layers above: the upstream's body (watched,
/// and giving its pooled connection back when it ends), or the JSON / gRPC body of a
/// rejection. One concrete type: nothing is boxed on the way up.
pub type ProxyBody = http_body_util::Either<UpstreamBody<Incoming>, Body>;

/// A parsed upstream base URL (`http://host:port[/prefix]`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash; empty for none.
    prefix: Arc<str>,
    /// The canonical URL, stored once per distinct URL for the life of the process (see
    /// [`interned`]): a request's access log line points at it without touching a shared
    /// reference count.
    url: &'static str,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Upstream").field(&self.url).finish()
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url)
    }
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUpstream(pub String);

impl fmt::Display for InvalidUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidUpstream {}

/// `url` as a `&'static str`, each distinct URL allocated once and kept for the life of the
/// process. Upstream URLs come from the config, reloads and the upstream admin, so the set is
/// as small as the URLs ever configured. Per request, a line of the access log then refers to
/// its upstream with a plain pointer: the reference count of a shared `Arc<str>` would be
/// written by every serving thread on every request, and that cache line would move between
/// the cores each time. Called when an upstream is parsed, never on the request path.
fn interned(url: &str) -> &'static str {
    static URLS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut urls = URLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = urls.get(url) {
        return known;
    }
    let leaked: &'static str = Box::leak(url.into());
    urls.insert(leaked);
    leaked
}

impl Upstream {
    /// Parses `http://host:port[/prefix]` or `https://host:port[/prefix]` (TLS, see
    /// [`super::tls`]); a query or fragment is refused.
    pub fn parse(url: &str) -> Result<Self, InvalidUpstream> {
        let uri: Uri = url
            .parse()
            .map_err(|e| InvalidUpstream(format!("`{url}` is not a valid URL ({e})")))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| {
            InvalidUpstream(format!("`{url}` has no scheme (expected http://host:port)"))
        })?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(InvalidUpstream(format!(
                "`{url}`: only http:// and https:// upstreams are supported"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| InvalidUpstream(format!("`{url}` has no host")))?;
        if authority.host().is_empty() {
            return Err(InvalidUpstream(format!("`{url}` has no host")));
        }
        if uri.query().is_some() {
            return Err(InvalidUpstream(format!("`{url}` must not have a query")));
        }
        super::upstream_url::validate_upstream_url(url).map_err(|e| InvalidUpstream(e.0))?;
        let prefix = uri.path().trim_end_matches('/');
        let canonical = format!("{scheme}://{authority}{prefix}");
        Ok(Self {
            scheme,
            authority,
            prefix: prefix.into(),
            url: interned(&canonical),
        })
    }

    /// The canonical base URL (`http://host:port[/prefix]`).
    pub fn url(&self) -> &str {
        self.url
    }

    /// The upstream path and query for a request's: the prefix, then the request's.
    fn path_for(&self, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, http::Error> {
        Ok(match (self.prefix.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{}", self.prefix, pq))?
            }
        })
    }

    /// Builds the absolute upstream URI for a request path and query (HTTP/2 requests).
    fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(self.path_for(pq)?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// Settings of the proxy client.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Time allowed for the upstream's response headers (504 `upstream_timeout` after it).
    pub upstream_timeout: Duration,
    /// Time allowed to open a TCP connection (502 after it).
    pub connect_timeout: Duration,
    /// Idle keep-alive connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// At most this many idle connections are kept per upstream (and serving thread).
    pub pool_max_idle_per_host: usize,
    /// Longest pause allowed between two reads of a client's request body (408
    /// `client_timeout` after it).
    pub client_body_timeout: Duration,
    /// Longest pause allowed between two reads of an upstream's response body; the body is
    /// then cut off (the client sees the truncation) and the slots it held are freed.
    pub upstream_body_timeout: Duration,
    /// The `grpc-status` codes that count in an upstream's `failures` (read from the
    /// response headers, or from the trailers at the end of the body).
    pub grpc_failures: GrpcFailures,
    /// Every request goes to the upstream over HTTP/2 with prior knowledge (h2c), not only
    /// gRPC (config `http2`): one multiplexed connection per upstream and serving thread.
    pub http2: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            client_body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            grpc_failures: GrpcFailures::default(),
            http2: false,
        }
    }
}

/// The reverse-proxy client. Clone it: clones share one configuration and one set of
/// connection pools.
///
/// Pools are per thread (see [`super::pool`]): with the thread-per-core server
/// ([`serve_sharded`](super::server::serve_sharded)) a request and its upstream connection
/// live on one thread: no pool lock shared between cores and no cross-thread wake-up to
/// reach the connection task. On a multi-thread runtime it costs at most one idle pool per
/// worker thread.
#[derive(Clone)]
pub struct Proxy {
    settings: Arc<ProxySettings>,
    pools: Arc<Pools>,
}

/// A pooled HTTP/2 (prior knowledge) client: the health checks' client for upstreams
/// reached over h2c.
pub(super) type H2Client = Client<HttpConnector, UpstreamRequestBody>;

/// A pooled h2c (prior knowledge) client with `settings`' timeouts and pool bounds.
pub(super) fn h2_client(settings: &ProxySettings) -> H2Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(true)
        .build(connector)
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Proxy {
    /// A proxy client with the given settings.
    pub fn new(settings: ProxySettings) -> Self {
        let pools = Pools::new(
            settings.pool_max_idle_per_host,
            settings.pool_idle_timeout,
            settings.connect_timeout,
        );
        Self {
            settings: Arc::new(settings),
            pools: Arc::new(pools),
        }
    }

    /// The settings this proxy was built with.
    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// The connection pools' shared settings (the health checks open their `https://`
    /// connections with them).
    pub(crate) fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Sets how `https://` upstreams are reached (`upstream_tls`); without it they are
    /// reached with the system roots. `false` when an https connection was already made.
    pub fn set_upstream_tls(&self, tls: super::tls::UpstreamTls) -> bool {
        self.pools.set_tls(tls)
    }

    /// Closes every idle pooled HTTP/1 connection now and every busy one when its exchange
    /// ends; nothing is pooled afterwards. Called when the gateway shuts down.
    pub fn close_idle_connections(&self) {
        self.pools.close_idle();
    }

    /// A tower service that forwards every request to `upstream`, counting its requests,
    /// failures and response-header latency in [`ProxyTo::metrics`]; over h2c when
    /// [`ProxySettings::http2`] says so.
    pub fn to(&self, upstream: Upstream) -> ProxyTo {
        self.to_over(upstream, self.settings.http2)
    }

    /// [`to`](Self::to), over h2c (prior knowledge) for every request when `http2` is set,
    /// whatever [`ProxySettings::http2`] says: the `http2` setting of a named pool.
    pub fn to_over(&self, upstream: Upstream, http2: bool) -> ProxyTo {
        let pool = Arc::new(UpstreamPool::new(
            Arc::clone(&self.pools),
            &upstream.authority,
            upstream.scheme == Scheme::HTTPS,
        ));
        ProxyTo {
            target: Arc::new(Target {
                proxy: self.clone(),
                upstream,
                pool,
                metrics: UpstreamMetrics::default(),
                http2,
            }),
        }
    }
}

/// Why the upstream exchange failed (before any response header).
#[derive(Debug)]
enum UpstreamError {
    /// No connection could be opened.
    Connect(String),
    /// The connection failed or was closed before the response headers.
    Exchange(String),
}

impl From<ConnectError> for UpstreamError {
    fn from(e: ConnectError) -> Self {
        Self::Connect(e.to_string())
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) | Self::Exchange(e) => f.write_str(e),
        }
    }
}

/// A ready HTTP/1 connection to the upstream: the most recently idle one, else a new one.
///
/// An idle connection that turns out to be closed (the upstream closed it while it was idle)
/// is skipped. Nothing of a request has been written when this fails, so its caller hands
/// the request back unsent ([`NotSent`]): a connection refused, reset on connect or not
/// opened within `connect_timeout`, or one closed before it was ever ready.
async fn ready_http1(pool: &Arc<UpstreamPool>) -> Result<PooledConn, UpstreamError> {
    loop {
        let mut conn = match pool.checkout() {
            Some(c) => c,
            // Boxed: opening a connection (TCP, maybe TLS) is the rare path, and its future
            // (the TLS handshake's state) is over a kilobyte, which inline would be part of
            // every request's future, allocated and moved with it.
            None => Box::pin(pool.connect()).await?,
        };
        // A connection just given back may still be reading the end of its previous
        // exchange: wait for it rather than open another.
        match std::future::poll_fn(|cx| conn.sender().poll_ready(cx)).await {
            Ok(()) => return Ok(conn),
            Err(_) if conn.is_reused() => continue,
            Err(e) => return Err(UpstreamError::Connect(e.to_string())),
        }
    }
}

/// Sends `req` on `conn` (from [`ready_http1`]).
///
/// A reused connection that was closed between its readiness and the send hands the
/// request back unwritten: it goes to the next ready connection. A request that was written
/// is never sent twice.
async fn send_http1(
    pool: &Arc<UpstreamPool>,
    mut conn: PooledConn,
    mut req: Request<UpstreamRequestBody>,
) -> Result<(Response<Incoming>, PooledConn), UpstreamError> {
    loop {
        match conn.sender().try_send_request(req).await {
            Ok(resp) => return Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if conn.is_reused() => req = unsent,
                _ => return Err(UpstreamError::Exchange(e.into_error().to_string())),
            },
        }
        conn = ready_http1(pool).await?;
    }
}

/// A connection to send one request on.
enum UpstreamConn {
    /// A pooled HTTP/1 connection, this request's alone.
    Http1(PooledConn),
    /// This thread's HTTP/2 connection to the upstream, shared by its streams.
    Http2(H2Sender),
}

/// A ready connection of the kind the request needs (see [`ready_http1`], [`h2::ready`]).
///
/// The HTTP/2 futures are boxed: they are the rarer path, and inline they would make every
/// HTTP/1 request's future (boxed and moved per request) as large as theirs.
async fn ready_conn(pool: &Arc<UpstreamPool>, h2: bool) -> Result<UpstreamConn, UpstreamError> {
    if h2 {
        Ok(UpstreamConn::Http2(Box::pin(h2::ready(pool)).await?))
    } else {
        Ok(UpstreamConn::Http1(ready_http1(pool).await?))
    }
}

/// Sends `req` on the HTTP/2 connection `send` (from [`h2::ready`]).
///
/// A connection that closed before taking the request (hyper hands it back unwritten) is
/// replaced once; a request that was written is never sent twice.
async fn send_http2(
    pool: &Arc<UpstreamPool>,
    mut send: H2Sender,
    req: Request<UpstreamRequestBody>,
) -> Result<Response<Incoming>, UpstreamError> {
    match send.try_send_request(req).await {
        Ok(resp) => Ok(resp),
        Err(mut e) => match e.take_message() {
            Some(unsent) => {
                let mut send = h2::ready(pool).await?;
                send.send_request(unsent).await.map_err(exchange_error)
            }
            None => Err(exchange_error(e.into_error())),
        },
    }
}

fn exchange_error(e: hyper::Error) -> UpstreamError {
    UpstreamError::Exchange(e.to_string())
}

/// What one [`ProxyTo`] and its clones share.
#[derive(Debug)]
struct Target {
    proxy: Proxy,
    upstream: Upstream,
    pool: Arc<UpstreamPool>,
    metrics: UpstreamMetrics,
    /// Every request over h2c, not only gRPC.
    http2: bool,
}

impl Target {
    /// Forwards `req`; every failure becomes a [`Rejection`], except a request that was
    /// not sent at all ([`NotSent`]: no connection could be had), which is handed back
    /// whole so that the balancer may send it to another replica.
    ///
    /// A failure caused by the client's request body (see [`super::bodies`]) becomes the
    /// client's rejection (400 / 408 / 499), never a 502: it does not count against the
    /// upstream. `upstream_timeout` runs from the moment the request body was sent.
    ///
    /// The connection (HTTP/1, or this thread's HTTP/2 one for gRPC and
    /// [`ProxySettings::http2`]) is had before the request is rewritten, so a connect failure
    /// hands back the client's request as it came.
    async fn forward(
        &self,
        req: Request<Body>,
        grpc: bool,
    ) -> Result<Response<ProxyBody>, Failure> {
        let settings = &*self.proxy.settings;
        check_request(&req)?;
        let h2 = grpc || self.http2;
        // The connection is had before the request is rewritten: a connect failure hands
        // the client's request back as it came, for another replica.
        let conn = match ready_conn(&self.pool, h2).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(upstream = %self.upstream.url, error = %e, "upstream connect failed");
                return Err(Failure::NotSent(NotSent::new(req, e.to_string())));
            }
        };
        let (req, watch) = prepare_request(
            &self.upstream,
            &self.pool,
            req,
            Wire { h2, grpc },
            settings.client_body_timeout,
        )?;
        let timeout = settings.upstream_timeout;
        let sent = async {
            match conn {
                UpstreamConn::Http1(conn) => {
                    let (resp, conn) = send_http1(&self.pool, conn, req).await?;
                    Ok::<_, UpstreamError>((resp, Some(conn)))
                }
                UpstreamConn::Http2(send) => {
                    let sent = Box::pin(send_http2(&self.pool, send, req));
                    Ok((sent.await?, None))
                }
            }
        };
        let outcome = wait_headers(sent, timeout, watch.as_deref()).await;
        let upstream_url = &self.upstream.url;
        match outcome {
            Some(Ok((resp, conn))) => {
                let (mut parts, body) = resp.into_parts();
                // An upgrade was never asked for (`Upgrade` is stripped), and a status
                // outside 100..=599 is not HTTP: relaying either would confuse the client.
                let status = parts.status.as_u16();
                if status == 101 || !(100..=599).contains(&status) {
                    tracing::debug!(upstream = %upstream_url, status, "upstream answered an invalid status");
                    return Err(Failure::Rejected(Rejection::new(
                        http::StatusCode::BAD_GATEWAY,
                        portcullis_core::codes::BAD_GATEWAY,
                        "the upstream sent an invalid response",
                    )));
                }
                // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; the body is
                // re-framed for the client, so the stale length must go.
                if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                strip_hop_by_hop(&mut parts.headers);
                let body = UpstreamBody::new(body, settings.upstream_body_timeout, watch)
                    .with_connection(conn);
                Ok(Response::from_parts(parts, ProxyBody::Left(body)))
            }
            Some(Err(e)) => {
                if let Some(rej) = watch.as_deref().and_then(client_rejection) {
                    tracing::debug!(upstream = %upstream_url, error = %e, code = rej.code(), "request body failed on the client's side");
                    return Err(rej.into());
                }
                tracing::debug!(upstream = %upstream_url, error = %e, "upstream request failed");
                Err(Failure::Rejected(match e {
                    UpstreamError::Connect(_) => Rejection::bad_gateway(),
                    UpstreamError::Exchange(_) => Rejection::new(
                        http::StatusCode::BAD_GATEWAY,
                        portcullis_core::codes::BAD_GATEWAY,
                        "the upstream closed the connection without a response",
                    ),
                }))
            }
            None => {
                if let Some(rej) = watch.as_deref().and_then(client_rejection) {
                    return Err(rej.into());
                }
                tracing::debug!(upstream = %upstream_url, ?timeout, "upstream timed out");
                Err(Rejection::upstream_timeout(timeout).into())
            }
        }
    }

    /// Forwards `req` and records the outcome in the metrics; a request that was not sent
    /// is handed back (counted as a failed request: a 502 unless it is retried).
    async fn serve(
        self: Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<ProxyBody>, NotSent<Body>> {
        let grpc = portcullis_core::is_grpc_request(req.headers());
        let started = Instant::now();
        super::access_log::note_dispatch(&req, self.upstream.url);
        match self.forward(req, grpc).await {
            // A gRPC failure is in `grpc-status`, possibly in the trailers.
            Ok(resp) if grpc => {
                self.metrics.record_exchange(started.elapsed());
                let classifier = &self.proxy.settings.grpc_failures;
                Ok(super::grpc_outcome::count(
                    classifier,
                    resp,
                    Arc::clone(&self),
                ))
            }
            Ok(resp) => {
                self.metrics.record(started.elapsed(), resp.status());
                Ok(resp)
            }
            Err(Failure::Rejected(rej)) => {
                self.metrics.record(started.elapsed(), rej.status());
                Ok(rejection_response(&rej, grpc).map(ProxyBody::Right))
            }
            Err(Failure::NotSent(not_sent)) => {
                self.metrics
                    .record(started.elapsed(), http::StatusCode::BAD_GATEWAY);
                Err(not_sent)
            }
        }
    }
}

/// Why [`Target::forward`] did not answer with the upstream's response.
enum Failure {
    /// Answered by the gateway: 502, 504, or the client's own 400 / 408 / 499.
    Rejected(Rejection),
    /// Nothing of the request was sent: it is handed back.
    NotSent(NotSent<Body>),
}

impl From<Rejection> for Failure {
    fn from(rej: Rejection) -> Self {
        Self::Rejected(rej)
    }
}

impl super::grpc_outcome::CountFailure for Target {
    fn count_failure(&self) {
        self.metrics.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// The client's rejection when its request body failed (`None` when it did not).
pub(super) fn client_rejection(watch: &BodyWatch) -> Option<Rejection> {
    match watch.outcome() {
        BodyOutcome::Malformed => Some(Rejection::malformed_body()),
        BodyOutcome::ClientClosed => Some(Rejection::client_closed()),
        BodyOutcome::TimedOut => Some(Rejection::client_timeout(watch.idle_timeout())),
        BodyOutcome::Streaming | BodyOutcome::Complete => None,
    }
}

/// Waits for the response headers: within `timeout` for a request without a body
/// (`watch` is `None`). For a request with a body, `timeout` counts from the end of the body
/// (a slow upload is the client's time, bounded by `client_body_timeout`), and a failed
/// request body ends the wait at once. `None` on timeout.
///
/// One future for both kinds, so that a request's future holds the send future once.
async fn wait_headers<T>(
    sent: impl Future<Output = T>,
    timeout: Duration,
    watch: Option<&BodyWatch>,
) -> Option<T> {
    tokio::pin!(sent);
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(out) = tokio::time::timeout_at(deadline, &mut sent).await {
            return Some(out);
        }
        // No body to wait for: the time is up.
        let watch = watch?;
        match watch.outcome() {
            // Still uploading: the upstream's time has not started.
            BodyOutcome::Streaming => deadline = tokio::time::Instant::now() + timeout,
            BodyOutcome::Complete => {
                let end = watch.completed_at().map_or(deadline, |at| at + timeout);
                if end <= tokio::time::Instant::now() {
                    return None;
                }
                deadline = end;
            }
            // The client's failure: answered by the caller.
            _ => return None,
        }
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`: one implementation
/// with the library's [`UpstreamClient`](crate::client::UpstreamClient).
pub use crate::client::strip_hop_by_hop;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Refuses what is never forwarded, before a connection is taken for it.
fn check_request(req: &Request<Body>) -> Result<(), Rejection> {
    // CONNECT asks for a tunnel, which this proxy does not open: never forward it.
    if req.method() == http::Method::CONNECT {
        return Err(Rejection::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            portcullis_core::codes::METHOD_NOT_ALLOWED,
            "CONNECT is not supported",
        ));
    }
    // RFC 9112 §3.2: a request with more than one Host is refused.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Rejection::new(
            http::StatusCode::BAD_REQUEST,
            portcullis_core::codes::BAD_REQUEST,
            "the request has more than one Host header",
        ));
    }
    Ok(())
}

/// How a request goes to its upstream.
#[derive(Debug, Clone, Copy)]
struct Wire {
    /// Over HTTP/2 (h2c, prior knowledge): gRPC, or every request with `http2`.
    h2: bool,
    /// A gRPC request (keeps `te: trailers`).
    grpc: bool,
}

/// Rewrites a client request for `upstream` (checked by [`check_request`]): absolute URI, no hop-by-hop headers, the
/// upstream's own `Host`, and the `X-Forwarded-*` headers. HTTP/1 requests get the
/// origin form (`/path?query`) and an explicit `Host`; HTTP/2 requests (gRPC, or all with
/// `http2`) the absolute URI, from which the client derives `:authority`.
///
/// A request body that is not empty is wrapped in a [`ClientBody`]; its watch is returned.
fn prepare_request(
    upstream: &Upstream,
    pool: &UpstreamPool,
    req: Request<Body>,
    wire: Wire,
    client_body_timeout: Duration,
) -> Result<(Request<UpstreamRequestBody>, Option<Arc<BodyWatch>>), Rejection> {
    let Wire { h2, grpc } = wire;
    let (mut parts, body) = req.into_parts();
    let (body, watch) = if http_body::Body::is_end_stream(&body) {
        (UpstreamRequestBody::Right(body), None)
    } else {
        let (body, watch) = ClientBody::new(body, client_body_timeout);
        (UpstreamRequestBody::Left(body), Some(watch))
    };
    // HTTP/2 clients send the authority in the URI, not in `Host`.
    let uri_authority = parts.uri.authority().cloned();
    let uri = if h2 {
        upstream.uri_for(parts.uri.path_and_query())
    } else {
        upstream.path_for(parts.uri.path_and_query()).map(Uri::from)
    };
    parts.uri = uri.map_err(|_| {
        Rejection::new(
            http::StatusCode::BAD_REQUEST,
            portcullis_core::codes::BAD_REQUEST,
            "the request path cannot be forwarded",
        )
    })?;
    parts.version = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // Keep gRPC's `te: trailers`, which is end-to-end in practice.
    if grpc {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // X-Forwarded-Host: the Host the client asked for (or the URI authority for HTTP/2).
    let host = headers.remove(header::HOST).or_else(|| {
        let authority = uri_authority.or_else(|| {
            parts
                .extensions
                .get::<OriginalAuthority>()
                .map(|a| a.0.clone())
        })?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    if let Some(host) = host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
    if !h2 {
        headers.insert(header::HOST, pool.host_header().clone());
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        append_forwarded_for(headers, peer.ip());
    }
    Ok((Request::from_parts(parts, body), watch))
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// The authority of the client's original request URI (HTTP/2 has no `Host` header), for
/// routers that rewrite the URI before the proxy sees it: a middleware may store it in the
/// request extensions; the proxy uses it for `X-Forwarded-Host` when the URI has none.
#[derive(Debug, Clone)]
pub struct OriginalAuthority(pub Authority);

/// A tower service that forwards every request to one upstream (see [`Proxy::to`]).
///
/// Failures are answered as responses (502/504 JSON, or gRPC trailers-only for gRPC
/// requests), so the error type is `Infallible`. Clones share one upstream pool, one set of
/// metrics and one `Arc`.
#[derive(Clone, Debug)]
pub struct ProxyTo {
    target: Arc<Target>,
}

impl ProxyTo {
    /// The upstream this service forwards to.
    pub fn upstream(&self) -> &Upstream {
        &self.target.upstream
    }

    /// This upstream's request counters and latency histogram (clones share them).
    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.target.metrics
    }

    /// `true` when every request goes to this upstream over h2c (`http2: true`), not only
    /// gRPC.
    pub fn http2(&self) -> bool {
        self.target.http2
    }

    /// HTTP/1 connections opened to this upstream so far, by every thread.
    pub fn connections_opened(&self) -> u64 {
        self.target.pool.opened()
    }
}

/// The status of a `client_closed` rejection (nginx's "client closed request").
const CLIENT_CLOSED_STATUS: u16 = 499;

/// Upper bounds (seconds) of the upstream latency histogram's buckets; one more bucket
/// holds the rest.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Requests, failures and time to response headers of one upstream (atomics only).
///
/// A failure is a 5xx answer, a transport error (502), a timeout (504) or a gRPC call whose
/// `grpc-status` is one of `grpc_failure_codes` (from its headers or trailers). A request whose
/// client went away before its body was complete is counted in `client_closed`, not as a
/// failure.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    requests: AtomicU64,
    failures: AtomicU64,
    client_closed: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl UpstreamMetrics {
    fn record(&self, elapsed: Duration, status: http::StatusCode) {
        self.record_exchange(elapsed);
        if status.is_server_error() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        } else if status.as_u16() == CLIENT_CLOSED_STATUS {
            self.client_closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one request and its time to response headers (not its outcome).
    fn record_exchange(&self, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Requests forwarded (answered or failed).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests that failed (5xx, 502, 504, gRPC failure codes).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Requests whose client went away before its request body was complete (nginx's 499).
    pub fn client_closed(&self) -> u64 {
        self.client_closed.load(Ordering::Relaxed)
    }

    /// Per-bucket (non-cumulative) counts, one per [`LATENCY_BUCKETS`] bound plus overflow.
    pub fn bucket_counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// The sum of all recorded latencies, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl tower::Service<Request<Body>> for ProxyTo {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// One allocation per request: the future of the whole exchange (hyper's HTTP/1 send
    /// future has no nameable type). A request that could not be sent answers 502
    /// `bad_gateway` (this service is not retried; see [`ProxyTo::send`]).
    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let target = Arc::clone(&self.target);
        Box::pin(async move {
            match target.serve(req).await {
                Ok(resp) => Ok(resp),
                Err(not_sent) => {
                    let grpc = portcullis_core::is_grpc_request(not_sent.into_request().headers());
                    Ok(rejection_response(&Rejection::bad_gateway(), grpc).map(ProxyBody::Right))
                }
            }
        })
    }
}

/// The future of [`ProxyTo::send`].
pub type SendFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, NotSent<Body>>> + Send>>;

impl ProxyTo {
    /// Forwards `req` like the service does, but hands back a request that was not sent at
    /// all ([`NotSent`]: no connection could be had) instead of answering it 502, so that
    /// the balancer can send it to another replica. Every other failure is a response.
    pub fn send(&self, req: Request<Body>) -> SendFuture {
        Box::pin(Arc::clone(&self.target).serve(req))
    }
}

/// Renders a [`Rejection`] as an axum response (gRPC trailers-only when `grpc`).
pub fn rejection_response(rej: &Rejection, grpc: bool) -> Response<Body> {
    if grpc {
        rej.to_grpc_response::<Body>().map(Body::new)
    } else {
        rej.to_json_response::<Body>().map(Body::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_parsing() {
        let u = Upstream::parse("http://127.0.0.1:9001/").unwrap();
        assert_eq!(u.url(), "http://127.0.0.1:9001");
        let pq = PathAndQuery::from_static("/a/b?x=1");
        assert_eq!(
            u.uri_for(Some(&pq)).unwrap(),
            "http://127.0.0.1:9001/a/b?x=1"
        );
        let u = Upstream::parse("http://h:1/api/").unwrap();
        assert_eq!(u.uri_for(Some(&pq)).unwrap(), "http://h:1/api/a/b?x=1");
        assert!(Upstream::parse("ftp://h:1").is_err());
        assert!(Upstream::parse("127.0.0.1:9001").is_err());
        assert!(Upstream::parse("http://h:1/?q=1").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
    }
}
