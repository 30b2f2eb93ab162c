//! A tiny gRPC service for the tests, with real tonic servers and clients on 127.0.0.1.
//!
//! No `protoc`: the messages are hand-written `prost::Message`s and the service glue is what
//! `tonic-build` generates, trimmed to the bone:
//!
//! ```proto
//! syntax = "proto3";
//! package portcullis.test;
//!
//! service Greeter {
//!   rpc SayHello (HelloRequest) returns (HelloReply);
//!   rpc StreamHellos (HelloRequest) returns (stream HelloReply);
//! }
//!
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```
//!
//! [`Greeter`] records what the tests assert on: calls, the most calls in flight at once,
//! the `grpc-timeout` each call carried. [`Mode`] makes every unary call fail with
//! `UNAVAILABLE`, either trailers-only (the status in the response headers, as tonic
//! answers an `Err`) or in the trailers after a `200` with no `grpc-status`.

#![allow(dead_code, unreachable_pub)]

use futures_util::Stream;
use http::{Request, Response};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::Status;
use tower::Service;

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `message HelloReply { string message = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The service name.
pub const SERVICE: &str = "portcullis.test.Greeter";
/// The unary method.
pub const SAY_HELLO: &str = "/portcullis.test.Greeter/SayHello";
/// The server-streaming method.
pub const STREAM_HELLOS: &str = "/portcullis.test.Greeter/StreamHellos";

/// How [`Greeter`] answers unary calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// The reply.
    Serve = 0,
    /// `UNAVAILABLE`, trailers-only (`grpc-status` in the response headers).
    UnavailableInHeaders = 1,
    /// `UNAVAILABLE` in the trailers of a `200` whose headers carry no `grpc-status`.
    UnavailableInTrailers = 2,
}

/// The Greeter implementation and what it saw.
#[derive(Debug, Default)]
pub struct Greeter {
    /// Names this server in its replies (`hello, x from <name>`).
    pub name: String,
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    delay_ms: AtomicU64,
    mode: AtomicU8,
    /// Messages a `StreamHellos` call sends, and the pause before each.
    stream_items: AtomicUsize,
    stream_gap_ms: AtomicU64,
    timeouts: Mutex<Vec<Option<String>>>,
}

impl Greeter {
    /// A greeter named `name`, answering at once, streams of 3 messages 100 ms apart.
    pub fn new(name: &str) -> Arc<Self> {
        let g = Self {
            name: name.to_owned(),
            ..Self::default()
        };
        g.stream_items.store(3, Ordering::SeqCst);
        g.stream_gap_ms.store(100, Ordering::SeqCst);
        Arc::new(g)
    }

    /// Each unary call takes `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How unary calls are answered from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// `StreamHellos` sends `items` messages, each after `gap`.
    pub fn set_stream(&self, items: usize, gap: Duration) {
        self.stream_items.store(items, Ordering::SeqCst);
        self.stream_gap_ms
            .store(gap.as_millis() as u64, Ordering::SeqCst);
    }

    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::UnavailableInHeaders,
            2 => Mode::UnavailableInTrailers,
            _ => Mode::Serve,
        }
    }

    /// Calls that reached the service (unary and streaming).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls in flight now (a streaming call until its stream ends).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls in flight at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The `grpc-timeout` header of every call, in arrival order.
    pub fn timeouts(&self) -> Vec<Option<String>> {
        self.timeouts.lock().unwrap().clone()
    }

    fn enter(self: &Arc<Self>, headers: &http::HeaderMap) -> InFlight {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let timeout = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.timeouts.lock().unwrap().push(timeout);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }
}

/// One call in flight: counted until dropped.
struct InFlight(Arc<Greeter>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct SayHelloSvc(Arc<Greeter>, Option<InFlight>);

impl tonic::server::UnaryService<HelloRequest> for SayHelloSvc {
    type Response = HelloReply;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<HelloReply>, Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let greeter = self.0.clone();
        let in_flight = self.1.take();
        Box::pin(async move {
            let delay = greeter.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            drop(in_flight);
            if greeter.mode() == Mode::UnavailableInHeaders {
                return Err(Status::unavailable("the greeter is down"));
            }
            let name = request.into_inner().name;
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {name} from {}", greeter.name),
            }))
        })
    }
}

type HelloStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

struct StreamHellosSvc(Arc<Greeter>, Option<InFlight>);

impl tonic::server::ServerStreamingService<HelloRequest> for StreamHellosSvc {
    type Response = HelloReply;
    type ResponseStream = HelloStream;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<HelloStream>, Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let greeter = self.0.clone();
        let in_flight = self.1.take();
        Box::pin(async move {
            let name = request.into_inner().name;
            let items = greeter.stream_items.load(Ordering::SeqCst);
            let gap = Duration::from_millis(greeter.stream_gap_ms.load(Ordering::SeqCst));
            // The in-flight count lives as long as the stream.
            let stream = futures_util::stream::unfold((0, in_flight), move |(i, in_flight)| {
                let name = name.clone();
                async move {
                    if i == items {
                        drop(in_flight);
                        return None;
                    }
                    tokio::time::sleep(gap).await;
                    let reply = HelloReply {
                        message: format!("hello #{i}, {name}"),
                    };
                    Some((Ok(reply), (i + 1, in_flight)))
                }
            });
            Ok(tonic::Response::new(Box::pin(stream) as HelloStream))
        })
    }
}

/// The generated `GreeterServer<T>`: routes the method path to `tonic::server::Grpc`.
#[derive(Debug, Clone)]
pub struct GreeterServer(pub Arc<Greeter>);

impl<B> Service<Request<B>> for GreeterServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let greeter = self.0.clone();
        match req.uri().path() {
            SAY_HELLO => Box::pin(async move {
                let in_flight = greeter.enter(req.headers());
                if greeter.mode() == Mode::UnavailableInTrailers {
                    drop(in_flight);
                    return Ok(unavailable_in_trailers());
                }
                let codec = tonic_prost::ProstCodec::<HelloReply, HelloRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc.unary(SayHelloSvc(greeter, Some(in_flight)), req).await)
            }),
            STREAM_HELLOS => Box::pin(async move {
                let in_flight = greeter.enter(req.headers());
                let codec = tonic_prost::ProstCodec::<HelloReply, HelloRequest>::default();
                let mut grpc = tonic::server::Grpc::new(codec);
                Ok(grpc
                    .server_streaming(StreamHellosSvc(greeter, Some(in_flight)), req)
                    .await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

impl tonic::server::NamedService for GreeterServer {
    const NAME: &'static str = SERVICE;
}

/// A `200` whose headers carry no `grpc-status`, then trailers with `UNAVAILABLE`.
fn unavailable_in_trailers() -> Response<tonic::body::Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        http::HeaderValue::from_static("the greeter is down"),
    );
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
        http_body::Frame::trailers(trailers),
    )]);
    let mut resp = Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(
        frames,
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// A running tonic server; stopped (gracefully) by [`stop`](Self::stop) or on drop.
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub greeter: Arc<Greeter>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl GrpcServer {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server: no new connection is accepted, open ones get GOAWAY, and this
    /// returns once the server task has ended (bounded: 5 s, then it is aborted).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Binds `addr` (`127.0.0.1:0` for a free port), retrying for a while when a restarted
/// server's old port is not free yet.
pub async fn bind(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot bind {addr}");
}

/// Serves `router` (a tonic router, layered or not) on `listener`.
pub fn spawn<F>(listener: TcpListener, greeter: Arc<Greeter>, serve: F) -> GrpcServer
where
    F: FnOnce(
        TcpIncoming,
        oneshot::Receiver<()>,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
{
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve(TcpIncoming::from(listener), rx));
    GrpcServer {
        addr,
        greeter,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A plain tonic server (no layer) for `greeter` on `addr`. It accepts HTTP/1 too, so the
/// gateway's plain HTTP health check (`GET /healthz`, answered `200` with
/// `grpc-status: 12`) finds it up.
pub async fn start_plain(addr: SocketAddr, greeter: Arc<Greeter>) -> GrpcServer {
    let listener = bind(addr).await;
    let svc = GreeterServer(greeter.clone());
    spawn(listener, greeter, move |incoming, stop| {
        Box::pin(async move {
            let _ = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        })
    })
}

/// A tonic server for `greeter` plus the `grpc.health.v1` service (`tonic-health`), h2c
/// only, on `addr`; the greeter's service starts `SERVING`.
pub async fn start_with_health(
    addr: SocketAddr,
    greeter: Arc<Greeter>,
) -> (GrpcServer, tonic_health::server::HealthReporter) {
    let listener = bind(addr).await;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let svc = GreeterServer(greeter.clone());
    let server = spawn(listener, greeter, move |incoming, stop| {
        Box::pin(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        })
    });
    (server, reporter)
}

/// A channel to `url` (connects lazily).
pub fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// One `SayHello` call over `svc`, with a `grpc-timeout` of `timeout` when given.
pub async fn say_hello<S>(svc: S, name: &str, timeout: Option<Duration>) -> Result<String, Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = tonic::client::Grpc::new(svc);
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))?;
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
    let mut req = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    Ok(client.unary(req, path, codec).await?.into_inner().message)
}

/// One `StreamHellos` call over `svc`: every message, in order.
pub async fn stream_hellos<S>(svc: S, name: &str) -> Result<Vec<String>, Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = tonic::client::Grpc::new(svc);
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))?;
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let path = http::uri::PathAndQuery::from_static(STREAM_HELLOS);
    let req = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    let mut stream = client
        .server_streaming(req, path, codec)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(reply) = stream.message().await? {
        out.push(reply.message);
    }
    Ok(out)
}
