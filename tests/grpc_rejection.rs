//! A `Rejection` seen by a real tonic client: a proper gRPC status, not a protocol error.
//!
//! A tiny proto is built inside this test crate (no `protoc` needed: the messages are
//! hand-written `prost::Message`s and the service glue is what `tonic-build` generates for a
//! unary method, trimmed to the bone):
//!
//! ```proto
//! syntax = "proto3";
//! package portcullis.test;
//!
//! service Greeter {
//!   rpc SayHello (HelloRequest) returns (HelloReply);
//! }
//!
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```
//!
//! A real `tonic::transport::Server` serves it over h2c on 127.0.0.1, wrapped in
//! [`RejectWhenLayer`], a small tower layer that answers `Rejection::to_response` instead of
//! calling the service while a shared switch holds a rejection. The same layer answers a plain
//! HTTP/1 JSON request with the JSON form. A second test puts the in-process gateway between
//! the tonic client and the tonic server.
//!
//! Run: `cargo nextest run -p portcullis --test grpc_rejection`

mod support;

use arc_swap::ArcSwapOption;
use futures_util::future::{Either, MapOk, Ready, TryFutureExt};
use http::{Request, Response};
use http_body_util::BodyExt;
use portcullis::core::RejectionBody;
use portcullis::Rejection;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use support::{closed_port, TestGateway};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status};
use tower::{Layer, Service};

// ---------------------------------------------------------------------------------------------
// The tiny proto: messages.

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

/// `message HelloReply { string message = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

const SAY_HELLO_PATH: &str = "/portcullis.test.Greeter/SayHello";

// ---------------------------------------------------------------------------------------------
// The tiny proto: server glue (what tonic-build generates for one unary method).

/// The Greeter implementation: counts the calls that reach it.
#[derive(Debug, Default)]
struct Greeter {
    calls: AtomicUsize,
}

impl Greeter {
    async fn say_hello(
        &self,
        req: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = req.into_inner().name;
        Ok(tonic::Response::new(HelloReply {
            message: format!("hello, {name}"),
        }))
    }
}

/// The generated `GreeterServer<T>`: routes the method path to `tonic::server::Grpc::unary`.
#[derive(Debug, Clone)]
struct GreeterServer(Arc<Greeter>);

struct SayHelloSvc(Arc<Greeter>);

impl tonic::server::UnaryService<HelloRequest> for SayHelloSvc {
    type Response = HelloReply;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<HelloReply>, Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.say_hello(request).await })
    }
}

impl<B> Service<Request<B>> for GreeterServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match req.uri().path() {
            SAY_HELLO_PATH => {
                let inner = self.0.clone();
                Box::pin(async move {
                    let codec = tonic_prost::ProstCodec::<HelloReply, HelloRequest>::default();
                    let mut grpc = tonic::server::Grpc::new(codec);
                    Ok(grpc.unary(SayHelloSvc(inner), req).await)
                })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

impl tonic::server::NamedService for GreeterServer {
    const NAME: &'static str = "portcullis.test.Greeter";
}

// ---------------------------------------------------------------------------------------------
// The tiny proto: client glue (what tonic-build generates: `tonic::client::Grpc::unary`).

async fn say_hello(url: &str, name: &str) -> Result<HelloReply, Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let path = http::uri::PathAndQuery::from_static(SAY_HELLO_PATH);
    let req = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    Ok(client.unary(req, path, codec).await?.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The layer under test: rejects every request while the switch holds a `Rejection`.

/// The shared switch: `Some(rejection)` rejects every request with it, `None` lets them through.
type Switch = Arc<ArcSwapOption<Rejection>>;

#[derive(Debug, Clone)]
struct RejectWhenLayer {
    switch: Switch,
}

impl<S> Layer<S> for RejectWhenLayer {
    type Service = RejectWhen<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectWhen {
            inner,
            switch: self.switch.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct RejectWhen<S> {
    inner: S,
    switch: Switch,
}

type Wrapped<B> = fn(Response<B>) -> Response<RejectionBody<B>>;

impl<S, B, ResBody> Service<Request<B>> for RejectWhen<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<RejectionBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Either<Ready<Result<Self::Response, S::Error>>, MapOk<S::Future, Wrapped<ResBody>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(rejection) = self.switch.load_full() {
            let resp = rejection.to_response::<ResBody>(req.headers());
            return Either::Left(futures_util::future::ready(Ok(resp)));
        }
        let wrap: Wrapped<ResBody> = |resp| resp.map(RejectionBody::inner);
        Either::Right(self.inner.call(req).map_ok(wrap))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness.

/// A tonic server on 127.0.0.1 behind the reject layer; stopped when dropped.
struct GrpcServer {
    addr: SocketAddr,
    greeter: Arc<Greeter>,
    switch: Switch,
    task: JoinHandle<()>,
}

impl GrpcServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let greeter = Arc::new(Greeter::default());
        let switch: Switch = Arc::new(ArcSwapOption::empty());
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(RejectWhenLayer {
                switch: switch.clone(),
            })
            .add_service(GreeterServer(greeter.clone()));
        let task = tokio::spawn(async move {
            let _ = server
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        Self {
            addr,
            greeter,
            switch,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn reject_with(&self, rejection: Option<Rejection>) {
        self.switch.store(rejection.map(Arc::new));
    }

    fn calls(&self) -> usize {
        self.greeter.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asserts a client-side status: the code, and the rejection's `error` code in the message.
fn assert_status(status: &Status, code: Code, error_code: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(error_code),
        "status message {:?} does not name `{error_code}`",
        status.message()
    );
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn tonic_client_sees_rejections_as_grpc_statuses() {
    let server = GrpcServer::start().await;
    let url = server.url();

    // Switch off: the real reply.
    let reply = say_hello(&url, "portcullis").await.expect("call succeeds");
    assert_eq!(reply.message, "hello, portcullis");
    assert_eq!(server.calls(), 1);

    // 504 queue_timeout -> DEADLINE_EXCEEDED.
    server.reject_with(Some(Rejection::queue_timeout(Duration::from_millis(1500))));
    let status = say_hello(&url, "a").await.expect_err("rejected");
    assert_status(&status, Code::DeadlineExceeded, "queue_timeout");
    assert!(
        status.message().contains("1.500s"),
        "{:?}",
        status.message()
    );

    // 503 no_healthy_upstream -> UNAVAILABLE, with its Retry-After in the metadata.
    server.reject_with(Some(Rejection::no_healthy_upstream()));
    let status = say_hello(&url, "b").await.expect_err("rejected");
    assert_status(&status, Code::Unavailable, "no_healthy_upstream");
    assert_eq!(
        status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );

    // 502 bad_gateway -> UNAVAILABLE.
    server.reject_with(Some(Rejection::bad_gateway()));
    let status = say_hello(&url, "c").await.expect_err("rejected");
    assert_status(&status, Code::Unavailable, "bad_gateway");

    // The rejections never reached the service.
    assert_eq!(server.calls(), 1);

    // Switch back off: served again.
    server.reject_with(None);
    let reply = say_hello(&url, "again").await.expect("call succeeds");
    assert_eq!(reply.message, "hello, again");
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn plain_http_request_gets_the_json_form() {
    let server = GrpcServer::start().await;
    let client = support::client();

    let cases = [
        (
            Rejection::queue_timeout(Duration::from_secs(2)),
            504,
            "queue_timeout",
            None,
        ),
        (
            Rejection::no_healthy_upstream(),
            503,
            "no_healthy_upstream",
            Some("1"),
        ),
        (Rejection::bad_gateway(), 502, "bad_gateway", None),
    ];
    for (rejection, status, code, retry_after) in cases {
        server.reject_with(Some(rejection.clone()));
        let req = Request::post(format!("{}/work", server.url()))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .expect("answered in time")
            .expect("HTTP/1 request");
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.version(), http::Version::HTTP_11);
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        assert!(!resp.headers().contains_key("grpc-status"));
        assert_eq!(
            resp.headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap()),
            retry_after
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(v["error"], code);
        assert_eq!(v["message"], rejection.message());
        assert_eq!(
            v.as_object().unwrap().len(),
            2,
            "exactly error and message: {v}"
        );
    }
    assert_eq!(server.calls(), 0);
}

fn gateway_yaml(upstream: &str) -> String {
    format!("listen: 127.0.0.1:0\nupstream_timeout: 5\nupstreams:\n  - {{url: \"{upstream}\"}}\n")
}

#[tokio::test]
async fn tonic_through_the_gateway() {
    let server = GrpcServer::start().await;
    let gw = TestGateway::start(&gateway_yaml(&server.url())).await;
    let gw_url = format!("http://{}", gw.addr);

    // tonic client -> gateway (h2c) -> tonic server (h2c): the real reply.
    let reply = say_hello(&gw_url, "via gateway")
        .await
        .expect("proxied call succeeds");
    assert_eq!(reply.message, "hello, via gateway");
    assert_eq!(server.calls(), 1);

    // The upstream's own trailers-only rejection passes through the gateway unchanged.
    server.reject_with(Some(Rejection::queue_timeout(Duration::from_secs(1))));
    let status = say_hello(&gw_url, "x")
        .await
        .expect_err("rejected upstream");
    assert_status(&status, Code::DeadlineExceeded, "queue_timeout");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn gateway_renders_a_closed_upstream_as_unavailable() {
    let port = closed_port().await;
    let gw = TestGateway::start(&gateway_yaml(&format!("http://127.0.0.1:{port}"))).await;
    let gw_url = format!("http://{}", gw.addr);

    let status = say_hello(&gw_url, "nobody home")
        .await
        .expect_err("no upstream");
    // The gateway's own 502 bad_gateway, rendered as gRPC (a transport error on the client
    // side would also be UNAVAILABLE, but would not carry the `bad_gateway` code).
    assert_status(&status, Code::Unavailable, "bad_gateway");
    assert!(
        !status.message().contains(&port.to_string()),
        "upstream address leaked: {:?}",
        status.message()
    );
}
