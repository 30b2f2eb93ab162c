//! The cost of classifying gRPC responses on the response path: one request through
//! `HttpBalance` (3 replicas, p2c) to a dispatch service that answers at once, the response
//! body read to its end, with
//!
//! * `http`: the default classifier (`ServerErrorsAsFailures`: 5xx is a failure);
//! * `grpc`: `ProtocolClassifier` on a gRPC request (`grpc-status` looked up in the headers,
//!   then, since a `200` has none, in the trailers at the end of the body);
//! * `protocol_on_http`: `ProtocolClassifier` on a plain HTTP request (what the gateway
//!   pays per request for choosing).
//!
//! Every variant gets the same response (`200`, one data frame, trailers with
//! `grpc-status: 0`), so the difference between them is the classification alone.
//!
//! Run: `cargo bench -p portcullis-balance --bench grpc_classify -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)] // criterion_group! generates an undocumented fn

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use portcullis_balance::http::{DefaultClassifier, ProtocolClassifier};
use portcullis_balance::{Config, HttpBalance, ReplicaRegistry, Tier};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Service, ServiceExt};
use tower_http::classify::MakeClassifier;

/// One data frame, then the trailers.
struct GrpcLikeBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcLikeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// Answers every `(replica, request)` at once with the same response.
#[derive(Clone)]
struct Dispatch {
    trailers: HeaderMap,
}

impl Service<(u32, Request<()>)> for Dispatch {
    type Response = Response<GrpcLikeBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: (u32, Request<()>)) -> Self::Future {
        let body = GrpcLikeBody {
            data: Some(Bytes::from_static(b"\0\0\0\0\x02\x0a\0")),
            trailers: Some(self.trailers.clone()),
        };
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        std::future::ready(Ok(resp))
    }
}

fn balance<M>(classifier: M) -> HttpBalance<Dispatch, u32, M> {
    let registry = ReplicaRegistry::new(&Config::default());
    for i in 0..3u32 {
        registry.add(format!("r{i}"), Tier::Primary, i);
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    HttpBalance::new(Dispatch { trailers }, registry).with_classifier(classifier)
}

/// The same request for every variant but its `content-type`.
fn request(content_type: &'static str) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = http::Method::POST;
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    req
}

fn run<M>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    classifier: M,
    content_type: &'static str,
) where
    M: MakeClassifier + Clone,
{
    let mut svc = balance(classifier);
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let req = request(content_type);
                    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap();
                    std::hint::black_box(body);
                }
                start.elapsed()
            })
        })
    });
}

fn bench_all(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http: DefaultClassifier = tower_http::classify::SharedClassifier::new(
        tower_http::classify::ServerErrorsAsFailures::new(),
    );
    run(c, &rt, "http", http, "application/json");
    run(
        c,
        &rt,
        "grpc",
        ProtocolClassifier::default(),
        "application/grpc",
    );
    let protocol = ProtocolClassifier::default();
    run(c, &rt, "protocol_on_http", protocol, "application/json");
}

criterion_group!(benches, bench_all);
criterion_main!(benches);
