//! A client's bad or aborted request body is the client's failure, never the upstream's:
//! real axum backends and the real gateway on 127.0.0.1, raw bytes over TCP.

mod support;

use axum::extract::Request;
use axum::routing::{any, get};
use axum::Router;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use portcullis_breaker::BreakerState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{backend, Server, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that reads every `/work` body to its end and counts the bodies it got whole;
/// `/boom` always answers 500.
async fn counting_backend() -> (Server, Arc<AtomicUsize>) {
    let complete = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&complete);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/work",
            any(move |req: Request| {
                let c = Arc::clone(&c);
                async move {
                    match req.into_body().collect().await {
                        Ok(b) => {
                            c.fetch_add(1, Ordering::SeqCst);
                            format!("got {} bytes", b.to_bytes().len())
                        }
                        Err(_) => "body failed".to_owned(),
                    }
                }
            }),
        )
        .route(
            "/boom",
            any(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
    (backend(app).await, complete)
}

/// Sends raw bytes, half-closes nothing, and reads whatever comes back until the gateway
/// closes the connection or 3 s pass.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends the head and part of a body, then closes the connection.
async fn aborted_upload(addr: std::net::SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    // Let the gateway start forwarding, then go away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(s);
}

const MALFORMED_CHUNKED: &[u8] =
    b"POST /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";

fn config(upstreams: &[&Server], fallback: &Server) -> String {
    let mut y = String::from(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.2\neject_after: 2\neject_for: 30\nupstreams:\n",
    );
    for u in upstreams {
        y.push_str(&format!("  - {{url: \"{}\", primary: true}}\n", u.url()));
    }
    y.push_str(&format!(
        "fallback:\n  url: \"{}\"\n  failure_threshold: 3\n  recheck_interval: 0.1\n  min_fallback_duration: 1\n  probe_max_retries: 0\n  probe_timeout: 0.5\n",
        fallback.url()
    ));
    y
}

async fn stats(gw: &TestGateway) -> serde_json::Value {
    let body = reqwest_get(gw.addr, "/balancer/stats").await;
    serde_json::from_str(&body).unwrap()
}

async fn reqwest_get(addr: std::net::SocketAddr, path: &str) -> String {
    let resp = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_and_aborted_request_bodies_never_eject_an_upstream_or_trip_the_breaker() {
    let (a, a_complete) = counting_backend().await;
    let (b, b_complete) = counting_backend().await;
    let (fallback, _) = counting_backend().await;
    let gw = TestGateway::start(&config(&[&a, &b], &fallback)).await;

    // Malformed chunked framing: the client gets 400 bad_request.
    for i in 0..20 {
        let resp = raw(gw.addr, MALFORMED_CHUNKED).await;
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "malformed chunk #{i} answered: {resp:?}"
        );
        assert!(resp.contains(r#""error":"bad_request""#), "{resp}");
    }
    // Aborted uploads: the client goes away mid-body.
    for _ in 0..20 {
        aborted_upload(gw.addr).await;
    }
    // Let the gateway finish the aborted requests.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let snap = gw.gateway.registry().snapshot();
    for r in &snap.replicas {
        assert!(r.healthy, "{} unhealthy: {r:?}", r.url);
        assert!(!r.ejected, "{} ejected: {r:?}", r.url);
        assert_eq!(r.counters.ejections, 0, "{}: {r:?}", r.url);
    }
    let breaker = gw.gateway.breaker().unwrap().status_snapshot();
    assert_eq!(breaker.state, BreakerState::Normal, "{breaker:?}");
    assert_eq!(breaker.consecutive_failures, 0, "{breaker:?}");

    let s = stats(&gw).await;
    let ups = s["upstreams"].as_array().unwrap();
    let failures: u64 = ups.iter().map(|u| u["failures"].as_u64().unwrap()).sum();
    let closed: u64 = ups
        .iter()
        .map(|u| u["client_closed"].as_u64().unwrap())
        .sum();
    assert_eq!(failures, 0, "no failure counts against an upstream: {s}");
    assert_eq!(
        closed, 20,
        "every aborted upload is counted as client_closed: {s}"
    );
    assert_eq!(
        a_complete.load(Ordering::SeqCst) + b_complete.load(Ordering::SeqCst),
        0,
        "no bad body reached a backend whole"
    );

    // The pool still serves.
    let ok = raw(
        gw.addr,
        b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("got 5 bytes"), "{ok}");
}

#[tokio::test]
async fn a_real_upstream_failure_still_ejects() {
    let (a, _) = counting_backend().await;
    let (fallback, _) = counting_backend().await;
    let gw = TestGateway::start(&config(&[&a], &fallback)).await;
    for _ in 0..2 {
        let resp = reqwest_get(gw.addr, "/boom").await;
        assert_eq!(resp, "boom");
    }
    let snap = gw.gateway.registry().snapshot();
    assert!(snap.replicas[0].ejected, "{:?}", snap.replicas[0]);
    assert_eq!(snap.replicas[0].counters.ejections, 1);
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_counts_against_nobody() {
    let (a, _) = counting_backend().await;
    let (fallback, _) = counting_backend().await;
    let yaml = config(&[&a], &fallback) + "client_body_timeout: 0.3\nupstream_timeout: 0.2\n";
    let gw = TestGateway::start(&yaml).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the gateway answers a stalled upload");
    let resp = String::from_utf8_lossy(&out);
    // upstream_timeout (0.2 s) is shorter than the stall: it must not fire while the client
    // is still uploading.
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains(r#""error":"client_timeout""#), "{resp}");
    let snap = gw.gateway.registry().snapshot();
    assert!(snap.replicas[0].healthy && !snap.replicas[0].ejected);
    let st = stats(&gw).await;
    assert_eq!(st["upstreams"][0]["failures"], 0, "{st}");
}

#[tokio::test]
async fn an_upstream_that_trickles_past_upstream_body_timeout_frees_the_slot_and_the_client_sees_the_truncation(
) {
    // The backend sends one chunk, then stalls forever (well past upstream_body_timeout).
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/trickle",
            get(|| async {
                let stream = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"first"))
                })
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(axum::body::Bytes::from_static(b"never"))
                }));
                axum::body::Body::from_stream(stream)
            }),
        );
    let up = backend(app).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.2\nupstream_body_timeout: 0.3\nupstreams:\n  - {{url: \"{}\"}}\nendpoints:\n  /trickle: {{method: GET, capacity: 1}}\n",
        up.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let started = std::time::Instant::now();
    let resp = raw(
        gw.addr,
        b"GET /trickle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut off in time"
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("first"), "{resp}");
    // Chunked framing without its final 0-length chunk: the client can tell it was cut.
    assert!(!resp.ends_with("0\r\n\r\n"), "truncation hidden: {resp:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = stats(&gw).await;
    assert_eq!(
        s["endpoints"]["/trickle"]["active_requests"], 0,
        "the slot is freed: {s}"
    );
    assert_eq!(s["upstreams"][0]["inflight"], 0, "{s}");
}
