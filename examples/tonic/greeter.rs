//! The example's tiny gRPC service, without `protoc`: hand-written `prost` messages and the
//! glue `tonic-build` would generate for one unary method.
//!
//! ```proto
//! package portcullis.example;
//! service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```

use http::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloRequest {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
}

/// `message HelloReply { string message = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloReply {
    #[prost(string, tag = "1")]
    pub(crate) message: String,
}

/// The service name (what `grpc.health.v1` is asked about).
pub(crate) const SERVICE: &str = "portcullis.example.Greeter";
/// The method path: the admission layer's watched endpoint.
pub(crate) const SAY_HELLO: &str = "/portcullis.example.Greeter/SayHello";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The server: answers `hello, <name> from <server>` after `work`.
#[derive(Debug, Clone)]
pub(crate) struct GreeterServer {
    pub(crate) name: &'static str,
    pub(crate) work: Duration,
}

struct SayHello(GreeterServer);

impl tonic::server::UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(server.work).await;
            let name = request.into_inner().name;
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {name} from {}", server.name),
            }))
        })
    }
}

impl<B> tower::Service<Request<B>> for GreeterServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let server = self.clone();
        Box::pin(async move {
            if req.uri().path() != SAY_HELLO {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let codec = tonic_prost::ProstCodec::<HelloReply, HelloRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .unary(SayHello(server), req)
                .await)
        })
    }
}

impl tonic::server::NamedService for GreeterServer {
    const NAME: &'static str = SERVICE;
}

/// One `SayHello` call over `svc` (any tonic client service).
pub(crate) async fn say_hello<S>(svc: S, name: &str) -> Result<String, Status>
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
        .map_err(|e| Status::unavailable(format!("not ready: {}", e.into())))?;
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let path = http::uri::PathAndQuery::from_static(SAY_HELLO);
    let req = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    Ok(client.unary(req, path, codec).await?.into_inner().message)
}
