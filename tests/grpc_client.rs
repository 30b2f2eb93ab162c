//! The client side: a tonic client whose channels are wrapped in our balance and breaker
//! layers, over three real tonic servers (with `grpc.health.v1` health services) on
//! 127.0.0.1. One server is stopped and restarted while four client loops keep calling:
//! every call succeeds.
//!
//! The stack, outermost first:
//!
//! ```text
//! tonic::client::Grpc
//!  └─ BufferedRetry (unary bodies buffered; a call that failed at the transport, with no
//!     │              response, is sent again, so the balancer picks again)
//!     └─ HttpFallback (breaker; fallback: a fourth server)
//!         └─ HttpBalance (p2c over the three channels; ProtocolClassifier; eject_after 1;
//!            │            GrpcHealthProbe every 50 ms)
//!            └─ Dispatch: (Channel, request) → the replica's tonic Channel
//! ```
//!
//! `HttpBalance` takes the tonic `Channel` of each replica as its payload and
//! `HttpFallback` takes a channel as its fallback: the HTTP forms wrap tonic's service
//! types as they are.
//!
//! Run: `cargo test -p portcullis --test grpc_client`

mod grpc_support;

use bytes::Bytes;
use grpc_support::{channel, say_hello, start_with_health, Greeter, GrpcServer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use portcullis::balance::{Config, HttpBalance, ReplicaRegistry, Tier};
use portcullis::breaker::{Breaker, HttpFallback};
use portcullis::core::BoxError;
use portcullis_testkit::eventually;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::transport::Channel;
use tower::util::{MapRequest, Oneshot};
use tower::{Service, ServiceExt};

type Body = Full<Bytes>;

fn to_tonic(req: Request<Body>) -> Request<tonic::body::Body> {
    req.map(tonic::body::Body::new)
}

/// The balancer's dispatch: the picked replica's channel (driven ready, then called).
#[derive(Debug, Clone, Copy)]
struct Dispatch;

impl Service<(Channel, Request<Body>)> for Dispatch {
    type Response = Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = Oneshot<Channel, Request<tonic::body::Body>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (channel, req): (Channel, Request<Body>)) -> Self::Future {
        channel.oneshot(to_tonic(req))
    }
}

/// Buffers the (small, unary) request body and sends a call that failed before any
/// response again, up to `attempts` times in all.
#[derive(Clone)]
struct BufferedRetry<S> {
    inner: S,
    attempts: usize,
}

impl<S, ResB> Service<Request<tonic::body::Body>> for BufferedRetry<S>
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let attempts = self.attempts;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let mut last = None;
            for _ in 0..attempts {
                let mut req = Request::new(Full::new(bytes.clone()));
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.headers_mut() = parts.headers.clone();
                match inner.clone().oneshot(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => last = Some(e.into()),
                }
            }
            Err(last.unwrap_or_else(|| "no attempt".into()))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_succeeds_while_a_server_restarts() {
    let any = "127.0.0.1:0".parse().unwrap();
    let mut servers: Vec<GrpcServer> = Vec::new();
    let mut reporters = Vec::new();
    for name in ["a", "b", "c"] {
        let (s, r) = start_with_health(any, Greeter::new(name)).await;
        servers.push(s);
        reporters.push(r);
    }
    let (fallback_server, _fallback_health) = start_with_health(any, Greeter::new("fb")).await;

    let config: Config = serde_json::from_value(serde_json::json!({
        "eject_after": 1,
        "eject_for": 0.2,
        "health_check_interval": 0.05,
        "health_check_timeout": 0.5,
        "failure_threshold": 1,
        "recovery_threshold": 1,
        "health_check": {"kind": "grpc", "service": grpc_support::SERVICE},
    }))
    .unwrap();
    config.validate().unwrap();
    let registry: ReplicaRegistry<Channel> = ReplicaRegistry::new(&config);
    for s in &servers {
        registry.add(s.url(), Tier::Primary, channel(&s.url()));
    }
    let _checker = registry.spawn_checker(
        config.grpc_health_probe().expect("kind: grpc"),
        config.checker_config(),
    );
    let breaker = Breaker::builder(portcullis::breaker::Config::default()).build();
    let balance = HttpBalance::new(Dispatch, registry.clone()).with_classifier(config.classifier());
    let fallback = MapRequest::new(channel(&fallback_server.url()), to_tonic);
    let stack = HttpFallback::new(balance, fallback, breaker).with_classifier(config.classifier());
    let client = BufferedRetry {
        inner: stack,
        attempts: 3,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answered = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let reply = say_hello(client.clone(), &format!("l{i}"), None).await;
                    let reply = reply.unwrap_or_else(|s| panic!("call {answered} failed: {s:?}"));
                    assert!(reply.starts_with(&format!("hello, l{i} from ")), "{reply}");
                    answered += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                answered
            })
        })
        .collect();

    // All three serve.
    assert!(
        eventually(Duration::from_secs(10), || servers
            .iter()
            .all(|s| s.greeter.calls() > 5))
        .await
    );

    // `a` goes away...
    let a_addr = servers[0].addr;
    let a_greeter = servers[0].greeter.clone();
    servers[0].stop().await;
    let before = a_greeter.calls();
    let snapshot_has_a_down = || {
        registry
            .snapshot()
            .replicas
            .iter()
            .any(|r| r.url == servers[0].url() && !r.healthy)
    };
    assert!(eventually(Duration::from_secs(10), snapshot_has_a_down).await);
    let others = servers[1].greeter.calls() + servers[2].greeter.calls();
    assert!(
        eventually(Duration::from_secs(10), || servers[1].greeter.calls()
            + servers[2].greeter.calls()
            > others + 20)
        .await,
        "b and c carry the traffic"
    );
    assert_eq!(a_greeter.calls(), before, "a is stopped");

    // ... and comes back on the same port: it is checked healthy and gets traffic again.
    let (restarted, _a_health) = start_with_health(a_addr, a_greeter.clone()).await;
    assert!(
        eventually(Duration::from_secs(15), || a_greeter.calls() > before + 5).await,
        "the restarted server gets no traffic"
    );

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for l in loops {
        total += l.await.expect("no client loop saw a failed call");
    }
    assert!(total > 40, "only {total} calls");
    drop(restarted);
}
