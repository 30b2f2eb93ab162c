//! The gateway's `health_check: {kind: grpc, service: ...}`: the replicas are checked with
//! `grpc.health.v1.Health/Check` (served by `tonic-health`) instead of `GET /healthz`.
//! `NOT_SERVING` takes a replica out after `failure_threshold` checks, `SERVING` brings it
//! back after `recovery_threshold`; the backends speak h2c only, so an HTTP check could not
//! pass at all.
//!
//! Run: `cargo test -p portcullis --test grpc_health`

mod grpc_support;
mod support;

use grpc_support::{channel, say_hello, start_with_health, Greeter, SERVICE};
use portcullis_testkit::eventually;
use std::time::Duration;
use support::TestGateway;
use tonic_health::ServingStatus;

fn replica_healthy(gw: &TestGateway, url: &str) -> bool {
    let snap = gw.gateway.registry().snapshot();
    let r = snap
        .replicas
        .iter()
        .find(|r| r.url == url)
        .unwrap_or_else(|| panic!("{url} not in the pool"));
    r.healthy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_takes_a_replica_out_and_serving_brings_it_back() {
    let addr = "127.0.0.1:0".parse().unwrap();
    let (a, a_health) = start_with_health(addr, Greeter::new("a")).await;
    let (b, _b_health) = start_with_health(addr, Greeter::new("b")).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nrouting_strategy: first-healthy\nhealth_check_interval: 0.05\n\
         failure_threshold: 2\nrecovery_threshold: 3\n\
         health_check: {{kind: grpc, service: {SERVICE}}}\n\
         upstreams:\n  - {{url: \"{}\", primary: true}}\n  - {{url: \"{}\"}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let gw_url = format!("http://{}", gw.addr);

    // Both pass the gRPC check (an HTTP/1 GET /healthz could not reach these servers).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(replica_healthy(&gw, &a.url()) && replica_healthy(&gw, &b.url()));
    let reply = say_hello(channel(&gw_url), "x", None).await.unwrap();
    assert_eq!(reply, "hello, x from a");

    a_health
        .set_service_status(SERVICE, ServingStatus::NotServing)
        .await;
    assert!(
        eventually(Duration::from_secs(10), || !replica_healthy(&gw, &a.url())).await,
        "a stays healthy while NOT_SERVING"
    );
    let reply = say_hello(channel(&gw_url), "x", None).await.unwrap();
    assert_eq!(reply, "hello, x from b");

    a_health
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    assert!(
        eventually(Duration::from_secs(10), || replica_healthy(&gw, &a.url())).await,
        "a does not come back while SERVING"
    );
    let reply = say_hello(channel(&gw_url), "x", None).await.unwrap();
    assert_eq!(reply, "hello, x from a");
}
