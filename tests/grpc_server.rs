//! `HttpAdmissionLayer` on a real tonic server (`Server::builder().layer(..)`), called by
//! real tonic clients over h2c on 127.0.0.1.
//!
//! * A watched endpoint is a gRPC method path (`/portcullis.test.Greeter/SayHello`) or a
//!   service prefix (`/portcullis.test.Greeter/*`).
//! * Refusals reach the client as gRPC statuses: `DEADLINE_EXCEEDED` for 504
//!   `queue_timeout`, `UNAVAILABLE` for 503 `backend_unhealthy`, `RESOURCE_EXHAUSTED` for
//!   `queue_full`.
//! * A server-streaming response holds its slot until the stream ends.
//!
//! Run: `cargo test -p portcullis --test grpc_server`

mod grpc_support;

use grpc_support::{bind, channel, say_hello, spawn, stream_hellos, Greeter, GreeterServer};
use grpc_support::{GrpcServer, SAY_HELLO};
use portcullis::admission::{Endpoints, HttpAdmissionLayer, Limiter};
use portcullis::core::HealthSource;
use portcullis_testkit::eventually;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// A tonic server for `greeter` behind `layer`.
async fn start(greeter: Arc<Greeter>, layer: HttpAdmissionLayer) -> GrpcServer {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await;
    let svc = GreeterServer(greeter.clone());
    spawn(listener, greeter, move |incoming, stop| {
        Box::pin(async move {
            let _ = tonic::transport::Server::builder()
                .layer(layer)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
        })
    })
}

fn limiter(capacity: usize, queue_timeout: Duration) -> Arc<Limiter> {
    Arc::new(Limiter::local(capacity).with_queue_timeout(queue_timeout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_two_on_a_unary_method_with_sixteen_clients() {
    let greeter = Greeter::new("a");
    greeter.set_delay(Duration::from_millis(300));
    let endpoints =
        Endpoints::new().watch(SAY_HELLO, None, limiter(2, Duration::from_millis(1000)));
    let server = start(greeter.clone(), HttpAdmissionLayer::new(endpoints.clone())).await;
    let url = server.url();

    let calls: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { say_hello(channel(&url), &format!("c{i}"), None).await })
        })
        .collect();
    let mut served = 0;
    let mut timed_out = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(reply) => {
                assert!(reply.starts_with("hello, c"), "{reply}");
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
                assert!(status.message().contains("queue_timeout"), "{status:?}");
                timed_out += 1;
            }
        }
    }
    // 16 calls of 300 ms on 2 slots need 2.4 s; the queue gives up after 1 s.
    assert_eq!(
        greeter.max_in_flight(),
        2,
        "the server saw more than 2 at once"
    );
    assert!(served >= 2, "served {served}");
    assert!(timed_out >= 1, "none timed out");
    assert_eq!(served, greeter.calls(), "a refused call reached the server");
    let stats = endpoints.get(SAY_HELLO).unwrap().stats();
    assert_eq!(stats.timed_out_504, timed_out as u64);
    assert_eq!(stats.admitted, served as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stream_holds_its_slot_until_it_ends() {
    let greeter = Greeter::new("a");
    greeter.set_stream(4, Duration::from_millis(150));
    // One slot for the whole service: the stream and the unary method share it.
    let endpoints = Endpoints::new().watch(
        "/portcullis.test.Greeter/*",
        None,
        limiter(1, Duration::from_secs(10)),
    );
    let server = start(greeter.clone(), HttpAdmissionLayer::new(endpoints.clone())).await;
    let url = server.url();

    let stream = tokio::spawn({
        let url = url.clone();
        async move { stream_hellos(channel(&url), "s").await }
    });
    assert!(eventually(Duration::from_secs(5), || greeter.in_flight() == 1).await);
    let unary = tokio::spawn({
        let url = url.clone();
        async move { say_hello(channel(&url), "u", None).await }
    });
    // The unary call waits in the queue while the stream runs.
    assert!(
        eventually(Duration::from_secs(5), || {
            endpoints
                .get("/portcullis.test.Greeter/*")
                .unwrap()
                .stats()
                .queue_depth
                == 1
        })
        .await
    );
    assert_eq!(
        greeter.calls(),
        1,
        "the unary call got in beside the stream"
    );
    let messages = stream.await.unwrap().expect("stream succeeds");
    assert_eq!(messages.len(), 4);
    let reply = unary
        .await
        .unwrap()
        .expect("unary succeeds after the stream");
    assert_eq!(reply, "hello, u from a");
    assert_eq!(greeter.max_in_flight(), 1);
    assert_eq!(greeter.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_is_resource_exhausted() {
    let greeter = Greeter::new("a");
    greeter.set_delay(Duration::from_millis(1500));
    let limiter = Arc::new(
        Limiter::local(1)
            .with_queue_timeout(Duration::from_secs(10))
            .with_max_queue(Some(1)),
    );
    let endpoints = Endpoints::new().watch(SAY_HELLO, None, limiter.clone());
    let server = start(greeter.clone(), HttpAdmissionLayer::new(endpoints)).await;
    let url = server.url();

    let first = tokio::spawn({
        let url = url.clone();
        async move { say_hello(channel(&url), "1", None).await }
    });
    assert!(eventually(Duration::from_secs(5), || greeter.in_flight() == 1).await);
    let second = tokio::spawn({
        let url = url.clone();
        async move { say_hello(channel(&url), "2", None).await }
    });
    assert!(eventually(Duration::from_secs(5), || limiter.stats().queue_depth == 1).await);
    let status = say_hello(channel(&url), "3", None)
        .await
        .expect_err("the queue is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queue_full"), "{status:?}");
    assert!(first.await.unwrap().is_ok());
    assert!(second.await.unwrap().is_ok());
    assert_eq!(greeter.calls(), 2);
}

/// Healthy while its flag is set.
#[derive(Debug, Clone)]
struct Switch(Arc<AtomicBool>);

impl HealthSource for Switch {
    fn can_serve(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_backend_is_unavailable() {
    let greeter = Greeter::new("a");
    let healthy = Arc::new(AtomicBool::new(false));
    let endpoints = Endpoints::new().watch(SAY_HELLO, None, limiter(4, Duration::from_secs(5)));
    let layer = HttpAdmissionLayer::new(endpoints).with_health(Switch(healthy.clone()));
    let server = start(greeter.clone(), layer).await;

    let status = say_hello(channel(&server.url()), "x", None)
        .await
        .expect_err("unhealthy");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("backend_unhealthy"), "{status:?}");
    assert_eq!(greeter.calls(), 0);

    healthy.store(true, Ordering::SeqCst);
    let reply = say_hello(channel(&server.url()), "x", None).await.unwrap();
    assert_eq!(reply, "hello, x from a");
}
