//! Retries through the gateway (issue 16), against real backends on 127.0.0.1: a request
//! whose connection failed before any byte was sent goes to another replica, whatever its
//! method; buffered idempotent requests are retried after a 502/503 with `retry.on: [5xx]`;
//! a POST that reached the upstream is never sent twice; the budget bounds the extra load.

mod support;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::{backend, client, closed_port, TestGateway};

/// A gateway config over `upstreams` with round-robin routing, active checks too slow to
/// matter during a test, and `extra` appended.
fn yaml_for(upstreams: &[String], extra: &str) -> String {
    let mut y = String::from(
        "listen: 127.0.0.1:0\nrouting_strategy: round-robin\nhealth_check_interval: 60\nupstreams:\n",
    );
    for u in upstreams {
        y.push_str(&format!("  - {{url: \"{u}\"}}\n"));
    }
    y.push_str(extra);
    y
}

/// A backend that counts its requests (but the health checks) and echoes their body with
/// `status`.
fn counting_app(status: u16, seen: Arc<AtomicU64>) -> Router {
    Router::new()
        .route("/healthz", any(|| async { "ok" }))
        .route(
            "/{*rest}",
            any(move |req: Request| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    http::Response::builder()
                        .status(status)
                        .body(Body::from(body))
                        .unwrap()
                }
            }),
        )
}

async fn send(
    gw: &TestGateway,
    method: http::Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (u16, Bytes) {
    let resp = client()
        .request(
            http::Request::builder()
                .method(method)
                .uri(gw.url(path))
                .body(Body::from(body.into()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn stats(gw: &TestGateway) -> serde_json::Value {
    let (status, body) = send(gw, http::Method::GET, "/balancer/stats", "").await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

fn upstream_failures(stats: &serde_json::Value, url: &str) -> u64 {
    stats["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["url"] == url)
        .map(|u| u["failures"].as_u64().unwrap())
        .unwrap()
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_the_other_replica_for_every_post() {
    let seen = Arc::new(AtomicU64::new(0));
    let alive = backend(counting_app(200, Arc::clone(&seen))).await;
    let closed = format!("http://127.0.0.1:{}", closed_port().await);
    let gw = TestGateway::start(&yaml_for(&[closed.clone(), alive.url()], "")).await;

    let gw = Arc::new(gw);
    let mut tasks = Vec::new();
    for worker in 0..10 {
        let gw = Arc::clone(&gw);
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let body = format!("payload {worker}-{i}");
                let (status, echoed) = send(&gw, http::Method::POST, "/work", body.clone()).await;
                assert_eq!(status, 200, "POST {worker}-{i}: {echoed:?}");
                assert_eq!(
                    echoed,
                    body.as_bytes(),
                    "the body reached the replica whole"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every POST reached the live replica exactly once.
    assert_eq!(seen.load(Ordering::SeqCst), 500);

    let s = stats(&gw).await;
    let retries = s["retry"]["default"]["retries"].as_u64().unwrap();
    assert!(retries > 0, "the closed replica was picked: {s}");
    // Each connect failure of the closed replica was retried (and counted for its ejection).
    assert_eq!(retries, upstream_failures(&s, &closed), "{s}");
    assert_eq!(s["retry"]["default"]["retries_budget_exhausted"], 0);

    let (_, metrics) = send(&gw, http::Method::GET, "/metrics", "").await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(&format!(
            "portcullis_retries_total{{pool=\"default\"}} {retries}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_retries_budget_exhausted_total{pool=\"default\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_every_replica_refusing_the_request_is_tried_max_attempts_times_then_502() {
    let a = format!("http://127.0.0.1:{}", closed_port().await);
    let b = format!("http://127.0.0.1:{}", closed_port().await);
    let c = format!("http://127.0.0.1:{}", closed_port().await);
    let gw = TestGateway::start(&yaml_for(
        &[a.clone(), b.clone(), c.clone()],
        "eject_after: 0\nretry: {max_attempts: 3}\n",
    ))
    .await;
    let (status, body) = send(&gw, http::Method::POST, "/work", "x").await;
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "bad_gateway");
    assert!(v["message"].is_string());
    let s = stats(&gw).await;
    assert_eq!(s["retry"]["default"]["retries"], 2, "{s}");
    // Three different replicas, one attempt each.
    for u in [&a, &b, &c] {
        assert_eq!(upstream_failures(&s, u), 1, "{u}: {s}");
    }
}

#[tokio::test]
async fn max_attempts_one_turns_retries_off() {
    let seen = Arc::new(AtomicU64::new(0));
    let alive = backend(counting_app(200, Arc::clone(&seen))).await;
    let closed = format!("http://127.0.0.1:{}", closed_port().await);
    let gw = TestGateway::start(&yaml_for(
        &[closed, alive.url()],
        "eject_after: 0\nretry: {max_attempts: 1}\n",
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&gw, http::Method::GET, "/x", "").await.0);
    }
    statuses.sort_unstable();
    // Round robin: two land on the closed replica and are not retried.
    assert_eq!(statuses, [200, 200, 502, 502]);
    assert_eq!(stats(&gw).await["retry"]["default"]["retries"], 0);
}

#[tokio::test]
async fn a_post_answered_503_is_seen_by_the_backend_once() {
    let seen_a = Arc::new(AtomicU64::new(0));
    let seen_b = Arc::new(AtomicU64::new(0));
    let a = backend(counting_app(503, Arc::clone(&seen_a))).await;
    let b = backend(counting_app(503, Arc::clone(&seen_b))).await;
    let gw = TestGateway::start(&yaml_for(
        &[a.url(), b.url()],
        "eject_after: 0\nretry: {on: [5xx], max_attempts: 3}\n",
    ))
    .await;
    let (status, body) = send(&gw, http::Method::POST, "/work", "once").await;
    assert_eq!(status, 503);
    assert_eq!(body, "once");
    assert_eq!(
        seen_a.load(Ordering::SeqCst) + seen_b.load(Ordering::SeqCst),
        1,
        "a POST that reached an upstream is never sent again"
    );
    assert_eq!(stats(&gw).await["retry"]["default"]["retries"], 0);
}

#[tokio::test]
async fn with_on_5xx_an_idempotent_request_is_retried_after_a_503_with_its_body() {
    let seen_bad = Arc::new(AtomicU64::new(0));
    let seen_good = Arc::new(AtomicU64::new(0));
    let bad = backend(counting_app(503, Arc::clone(&seen_bad))).await;
    let good = backend(counting_app(200, Arc::clone(&seen_good))).await;
    let gw = TestGateway::start(&yaml_for(
        &[bad.url(), good.url()],
        "eject_after: 0\nretry: {on: [5xx]}\n",
    ))
    .await;
    for i in 0..10 {
        let (status, body) = send(&gw, http::Method::GET, "/x", "").await;
        assert_eq!((status, body.len()), (200, 0), "GET {i}");
        let payload = format!("put {i}");
        let (status, body) = send(&gw, http::Method::PUT, "/x", payload.clone()).await;
        assert_eq!(status, 200, "PUT {i}");
        assert_eq!(
            body,
            payload.as_bytes(),
            "the buffered body was sent again whole"
        );
    }
    // Round robin: half of the first attempts hit the 503 replica, each retried once.
    let bad_seen = seen_bad.load(Ordering::SeqCst);
    assert_eq!(bad_seen, 10);
    assert_eq!(seen_good.load(Ordering::SeqCst), 20);
    assert_eq!(stats(&gw).await["retry"]["default"]["retries"], bad_seen);

    // A body of unknown length is streamed, so it is not retried after a 5xx.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let chunked = Body::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            Bytes::from_static(b"chunk"),
        )]));
        let resp = client()
            .request(http::Request::put(gw.url("/x")).body(chunked).unwrap())
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503]);
    assert_eq!(seen_bad.load(Ordering::SeqCst), 11);
}

#[tokio::test]
async fn the_budget_bounds_the_retries_when_every_replica_answers_503() {
    let seen = Arc::new(AtomicU64::new(0));
    let a = backend(counting_app(503, Arc::clone(&seen))).await;
    let b = backend(counting_app(503, Arc::clone(&seen))).await;
    let gw = Arc::new(
        TestGateway::start(&yaml_for(
            &[a.url(), b.url()],
            "eject_after: 0\nretry: {on: [5xx], budget_percent: 20, min_retries_per_second: 10}\n",
        ))
        .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let gw = Arc::clone(&gw);
        tasks.push(tokio::spawn(async move {
            for _ in 0..125 {
                let (status, _) = send(&gw, http::Method::GET, "/x", "").await;
                assert_eq!(status, 503);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.load(Ordering::SeqCst);
    // 20% of the 1,000 requests plus the minimum: 10 per second over the 10 s window. Two
    // retries racing for the last unit may both pass: a few concurrent ones over at most.
    let bound = 1000 + 200 + 100 + 8;
    assert!(
        seen <= bound,
        "the backends saw {seen} requests (bound {bound})"
    );
    assert!(seen > 1000, "some requests were retried: {seen}");
    let s = stats(&gw).await;
    let r = &s["retry"]["default"];
    let (retries, exhausted) = (
        r["retries"].as_u64().unwrap(),
        r["retries_budget_exhausted"].as_u64().unwrap(),
    );
    assert_eq!(retries, seen - 1000, "{s}");
    // Every request wanted one retry (max_attempts 2): the budget granted some, refused the rest.
    assert_eq!(retries + exhausted, 1000, "{s}");
    assert!(exhausted > 0, "{s}");
}

#[tokio::test]
async fn a_retried_request_holds_one_admission_slot() {
    let seen = Arc::new(AtomicU64::new(0));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let app = {
        let (seen, release) = (Arc::clone(&seen), Arc::clone(&release));
        Router::new()
            .route("/healthz", any(|| async { "ok" }))
            .route(
                "/work",
                any(move || {
                    let (seen, release, started) =
                        (Arc::clone(&seen), Arc::clone(&release), started_tx.clone());
                    async move {
                        seen.fetch_add(1, Ordering::SeqCst);
                        let _ = started.send(()).await;
                        release.notified().await;
                        "done"
                    }
                }),
            )
    };
    let alive = backend(app).await;
    let closed = format!("http://127.0.0.1:{}", closed_port().await);
    // First-healthy: the closed replica is always tried first.
    let yaml = format!(
        "listen: 127.0.0.1:0\nrouting_strategy: first-healthy\nhealth_check_interval: 60\n\
         eject_after: 0\nupstreams:\n  - {{url: \"{closed}\"}}\n  - {{url: \"{}\"}}\n\
         endpoints:\n  /work: {{method: POST, capacity: 2, queue_timeout: 5}}\n",
        alive.url()
    );
    let gw = Arc::new(TestGateway::start(&yaml).await);
    let request = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move { send(&gw, http::Method::POST, "/work", "x").await })
    };
    // The second attempt reached the live replica: the request is still one admitted request.
    started_rx.recv().await.unwrap();
    let s = stats(&gw).await;
    assert_eq!(s["retry"]["default"]["retries"], 1, "{s}");
    let work = &s["endpoints"]["/work"];
    assert_eq!(work["active_requests"], 1, "{s}");
    assert_eq!(work["admitted"], 1, "{s}");
    release.notify_one();
    let (status, body) = request.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"done"[..]));
    let s = stats(&gw).await;
    assert_eq!(s["endpoints"]["/work"]["active_requests"], 0, "{s}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}
