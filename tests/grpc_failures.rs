//! gRPC failures through the gateway: a tonic backend that answers `UNAVAILABLE` to every
//! call (an HTTP `200`) is ejected after `eject_after` calls, trips the breaker to the
//! fallback after `failure_threshold` calls, and shows up in its upstream's `failures`, with
//! the status in the response headers (trailers-only) and in the trailers alike. Plain HTTP
//! requests keep the "5xx is a failure" rule.
//!
//! Run: `cargo test -p portcullis --test grpc_failures`

mod grpc_support;
mod support;

use grpc_support::{channel, say_hello, start_plain, Greeter, Mode};
use http_body_util::BodyExt;
use support::TestGateway;
use tonic::Code;

const FAILING_MODES: [Mode; 2] = [Mode::UnavailableInHeaders, Mode::UnavailableInTrailers];

async fn stats(gw: &TestGateway) -> serde_json::Value {
    let resp = support::client()
        .get(gw.url("/balancer/stats").parse().unwrap())
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn upstream<'a>(stats: &'a serde_json::Value, url: &str) -> &'a serde_json::Value {
    stats["upstreams"]
        .as_array()
        .and_then(|all| all.iter().find(|u| u["url"] == url))
        .unwrap_or_else(|| panic!("{url} not in {stats}"))
}

fn free_addr() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grpc_backend_is_ejected_and_counted() {
    for mode in FAILING_MODES {
        let a = start_plain(free_addr(), Greeter::new("a")).await;
        let b = start_plain(free_addr(), Greeter::new("b")).await;
        a.greeter.set_mode(mode);
        let gw = TestGateway::start(&format!(
            "listen: 127.0.0.1:0\nrouting_strategy: first-healthy\neject_after: 3\neject_for: 30\n\
             health_check_interval: 60\nupstreams:\n  - {{url: \"{}\", primary: true}}\n  - {{url: \"{}\"}}\n",
            a.url(),
            b.url()
        ))
        .await;
        let gw_url = format!("http://{}", gw.addr);

        for i in 0..3 {
            let status = say_hello(channel(&gw_url), "x", None)
                .await
                .expect_err("a fails every call");
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "{mode:?} call {i}: {status:?}"
            );
        }
        // Three failed calls: `a` is out, `b` serves.
        for _ in 0..3 {
            let reply = say_hello(channel(&gw_url), "x", None).await.unwrap();
            assert_eq!(reply, "hello, x from b", "{mode:?}");
        }
        assert_eq!(a.greeter.calls(), 3, "{mode:?}");
        let s = stats(&gw).await;
        let a_stats = upstream(&s, &a.url());
        assert_eq!(a_stats["ejected"], true, "{mode:?}: {a_stats}");
        assert_eq!(a_stats["failures"], 3, "{mode:?}: {a_stats}");
        assert_eq!(upstream(&s, &b.url())["failures"], 0, "{mode:?}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grpc_backend_trips_the_breaker() {
    for mode in FAILING_MODES {
        let primary = start_plain(free_addr(), Greeter::new("primary")).await;
        let fallback = start_plain(free_addr(), Greeter::new("fallback")).await;
        primary.greeter.set_mode(mode);
        let gw = TestGateway::start(&format!(
            "listen: 127.0.0.1:0\neject_after: 0\nhealth_check_interval: 60\n\
             upstreams:\n  - {{url: \"{}\"}}\nfallback:\n  url: \"{}\"\n  failure_threshold: 3\n  \
             min_fallback_duration: 30\n  recheck_interval: 10\n  probe_max_retries: 0\n",
            primary.url(),
            fallback.url()
        ))
        .await;
        let gw_url = format!("http://{}", gw.addr);

        for i in 0..3 {
            let status = say_hello(channel(&gw_url), "x", None)
                .await
                .expect_err("the primary fails every call");
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "{mode:?} call {i}: {status:?}"
            );
        }
        let s = stats(&gw).await;
        assert_eq!(s["fallback"]["engaged"], true, "{mode:?}: {s}");
        let reply = say_hello(channel(&gw_url), "x", None).await.unwrap();
        assert_eq!(reply, "hello, x from fallback", "{mode:?}");
        assert_eq!(primary.greeter.calls(), 3, "{mode:?}");
        assert_eq!(upstream(&s, &primary.url())["failures"], 3, "{mode:?}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_outside_the_set_and_served_calls_are_not_failures() {
    let a = start_plain(free_addr(), Greeter::new("a")).await;
    // UNAVAILABLE is not in this set: the backend is never blamed for it.
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\neject_after: 1\nhealth_check_interval: 60\n\
         grpc_failure_codes: [internal, DATA_LOSS]\nupstreams:\n  - {{url: \"{}\"}}\n",
        a.url()
    ))
    .await;
    let gw_url = format!("http://{}", gw.addr);
    for _ in 0..3 {
        say_hello(channel(&gw_url), "x", None).await.unwrap();
    }
    a.greeter.set_mode(Mode::UnavailableInTrailers);
    for _ in 0..3 {
        let status = say_hello(channel(&gw_url), "x", None).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    // Still routed to: never ejected.
    assert_eq!(a.greeter.calls(), 6);
    let s = stats(&gw).await;
    let a_stats = upstream(&s, &a.url());
    assert_eq!(a_stats["failures"], 0, "{a_stats}");
    assert_eq!(a_stats["ejected"], false, "{a_stats}");
    assert_eq!(a_stats["requests"], 6, "{a_stats}");
}
