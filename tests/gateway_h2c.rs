//! `http2: true`: plain HTTP requests reach the upstream over HTTP/2 with prior knowledge
//! (h2c), and the health check speaks h2c too. The backend here speaks only h2c, so the
//! same backend without `http2: true` fails: the setting is what makes it work.

mod support;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::{any, get};
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{client, Server, TestGateway};
use tokio::net::TcpListener;

const ONE_MIB: usize = 1024 * 1024;

/// What the h2c-only backend saw.
#[derive(Default)]
struct Seen {
    /// Requests that came over HTTP/2.
    h2: AtomicU64,
    /// Health checks (`GET /healthz`), all over HTTP/2 (nothing else gets through).
    health: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// The connections (by accept order) that carried an `/echo` request.
    echo_connections: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Seen {
    fn echo_connections(&self) -> usize {
        self.echo_connections.lock().unwrap().len()
    }
}

/// The accept order of the connection a request came on.
#[derive(Clone, Copy)]
struct ConnId(u64);

/// A backend that speaks only HTTP/2 with prior knowledge: an HTTP/1.1 request on it is a
/// protocol error and the connection is closed.
async fn h2c_only_backend() -> (Server, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = {
        let (health, any_seen) = (Arc::clone(&seen), Arc::clone(&seen));
        Router::new()
            .route(
                "/healthz",
                get(move |req: Request| async move {
                    assert_eq!(req.version(), http::Version::HTTP_2);
                    health.health.fetch_add(1, Ordering::Relaxed);
                    "ok"
                }),
            )
            .route(
                "/echo/{*rest}",
                any(move |req: Request| async move {
                    if req.version() == http::Version::HTTP_2 {
                        any_seen.h2.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(ConnId(id)) = req.extensions().get::<ConnId>() {
                        any_seen.echo_connections.lock().unwrap().insert(*id);
                    }
                    let version = format!("{:?}", req.version());
                    let method = req.method().to_string();
                    let path = req.uri().path().to_string();
                    let forwarded_host = req
                        .headers()
                        .get("x-forwarded-host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    // Count the body as it streams in, and checksum it.
                    let mut stream = req.into_body().into_data_stream();
                    let (mut n, mut sum, mut first) = (0usize, 0u64, Vec::new());
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.unwrap();
                        if first.len() < 64 {
                            first.extend_from_slice(&chunk[..chunk.len().min(64)]);
                        }
                        n += chunk.len();
                        sum = chunk
                            .iter()
                            .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64));
                    }
                    Json(serde_json::json!({
                        "version": version, "method": method, "path": path,
                        "forwarded_host": forwarded_host,
                        "bytes": n, "sum": sum, "head": String::from_utf8_lossy(&first),
                    }))
                }),
            )
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let id = accepted.connections.fetch_add(1, Ordering::Relaxed);
            let service = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnId(id))));
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (Server::new(addr, task), seen)
}

fn yaml(backend: &Server, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\nhealth_check_timeout: 1\nfailure_threshold: 2\nupstreams:\n  - {{url: \"{}\"}}\n{extra}",
        backend.url()
    )
}

async fn send(req: http::Request<Body>) -> (http::StatusCode, serde_json::Value) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, json)
}

async fn upstream_stats(gw: &TestGateway, url: &str) -> serde_json::Value {
    let req = http::Request::get(gw.url("/balancer/stats"))
        .body(Body::empty())
        .unwrap();
    let (status, stats) = send(req).await;
    assert_eq!(status, 200, "{stats}");
    stats["upstreams"]
        .as_array()
        .and_then(|all| all.iter().find(|u| u["url"] == url).cloned())
        .unwrap_or_else(|| panic!("{url} not in {stats}"))
}

/// Waits (at most 5 s) until `cond` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_true_sends_get_and_post_to_an_h2c_only_backend_over_http2() {
    let (be, seen) = h2c_only_backend().await;
    let gw = TestGateway::start(&yaml(&be, "http2: true\n")).await;

    // GET, from an HTTP/1.1 client.
    let req = http::Request::get(gw.url("/echo/a?x=1"))
        .header("host", "front.example")
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["method"], "GET", "{body}");
    assert_eq!(body["path"], "/echo/a", "{body}");
    assert_eq!(body["forwarded_host"], "front.example", "{body}");

    // POST with a small body.
    let req = http::Request::post(gw.url("/echo/post"))
        .body(Body::from("hello over h2c"))
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["method"], "POST", "{body}");
    assert_eq!(body["head"], "hello over h2c", "{body}");

    // POST with a 1 MiB body streamed in 16 KiB chunks (chunked from the client).
    let chunks =
        (0..64).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![(i % 251) as u8; 16 * 1024])));
    let expected_sum = (0..64u64).fold(0u64, |s, i| {
        (0..16 * 1024).fold(s, |s, _| s.wrapping_mul(31).wrapping_add(i % 251))
    });
    let req = http::Request::post(gw.url("/echo/upload"))
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["bytes"], ONE_MIB, "{body}");
    assert_eq!(body["sum"], expected_sum, "{body}");

    // And from an HTTP/2 (prior knowledge) client.
    let h2_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let resp = h2_client
        .request(
            http::Request::get(gw.url("/echo/from-h2"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["path"], "/echo/from-h2", "{body}");

    assert_eq!(seen.h2.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_true_health_checks_an_h2c_only_backend_over_h2c() {
    let (be, seen) = h2c_only_backend().await;
    let gw = TestGateway::start(&yaml(&be, "http2: true\n")).await;
    // Checks every 0.1 s and 2 failures to eject: after 5 answered checks, an HTTP/1.1
    // check would long have marked it down.
    eventually("five health checks answered over h2c", || async {
        seen.health.load(Ordering::Relaxed) >= 5
    })
    .await;
    let stats = upstream_stats(&gw, &be.url()).await;
    assert_eq!(stats["healthy"], true, "{stats}");
    let req = http::Request::get(gw.url("/echo/after-checks"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_http2_the_same_h2c_only_backend_fails() {
    let (be, seen) = h2c_only_backend().await;
    let gw = TestGateway::start(&yaml(&be, "")).await;
    // HTTP/1.1 to an h2c-only backend: the connection is refused at the protocol level.
    let req = http::Request::get(gw.url("/echo/a"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 502, "{body}");
    // The HTTP/1.1 health check fails too.
    eventually("the h2c-only backend is marked unhealthy", || async {
        upstream_stats(&gw, &be.url()).await["healthy"] == false
    })
    .await;
    assert_eq!(seen.h2.load(Ordering::Relaxed), 0);
    assert_eq!(seen.health.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_http2_off_needs_a_restart_and_keeps_h2c() {
    let (be, seen) = h2c_only_backend().await;
    let gw = TestGateway::start(&yaml(&be, "http2: true\n")).await;
    let off = portcullis::gateway::GatewayConfig::from_yaml(
        &yaml(&be, "http2: false\n"),
        std::path::Path::new("test.yml"),
    )
    .unwrap();
    let report = gw
        .gateway
        .reload(off)
        .await
        .expect("the reload is accepted");
    assert_eq!(report.needs_restart, vec!["http2".to_owned()], "{report:?}");
    // The running proxy still speaks h2c.
    let req = http::Request::get(gw.url("/echo/after-reload"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(seen.h2.load(Ordering::Relaxed), 1);
}

/// `http2: true`, a live h2c backend and a replica that refuses connections, round-robin.
fn with_a_dead_replica(be: &Server, dead_port: u16, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 30\nrouting_strategy: round-robin\nhttp2: true\nupstreams:\n  - {{url: \"{}\"}}\n  - {{url: \"http://127.0.0.1:{dead_port}\"}}\n{extra}",
        be.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connect_failure_is_retried_on_the_other_replica_for_every_post() {
    let (be, seen) = h2c_only_backend().await;
    let dead = support::closed_port().await;
    let gw = Arc::new(TestGateway::start(&with_a_dead_replica(&be, dead, "")).await);
    let mut tasks = Vec::new();
    for worker in 0..10 {
        let gw = Arc::clone(&gw);
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let payload = format!("post {worker}-{i}");
                let req = http::Request::post(gw.url(&format!("/echo/{worker}-{i}")))
                    .body(Body::from(payload.clone()))
                    .unwrap();
                let (status, body) = send(req).await;
                assert_eq!(status, 200, "POST {worker}-{i}: {body}");
                assert_eq!(body["head"], payload, "the body reached the replica whole");
                assert_eq!(body["version"], "HTTP/2.0", "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Each POST reached the live replica once: the refused ones were never sent.
    assert_eq!(seen.h2.load(Ordering::Relaxed), 200);
    let req = http::Request::get(gw.url("/balancer/stats"))
        .body(Body::empty())
        .unwrap();
    let (_, stats) = send(req).await;
    let retries = stats["retry"]["default"]["retries"].as_u64().unwrap();
    assert!(retries > 0, "round-robin picked the dead replica: {stats}");
    assert_eq!(stats["retry"]["default"]["retries_budget_exhausted"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_h2c_requests_share_one_connection_per_serving_thread() {
    let (be, seen) = h2c_only_backend().await;
    // In process, on the test's two runtime threads: a connection per thread at most.
    let gw = Arc::new(TestGateway::start(&yaml(&be, "http2: true\n")).await);
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let gw = Arc::clone(&gw);
            tasks.push(tokio::spawn(async move {
                let req = http::Request::get(gw.url(&format!("/echo/{round}-{i}")))
                    .body(Body::empty())
                    .unwrap();
                send(req).await.0
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
    }
    assert_eq!(seen.h2.load(Ordering::Relaxed), 320);
    // One connection per thread (2), opened once even when 64 requests arrive at a
    // cold thread together.
    let opened = seen.echo_connections();
    assert!(opened <= 2, "{opened} connections for 320 requests");
}

// One thread: the in-process gateway's requests all share one connection.
#[tokio::test]
async fn an_idle_h2c_connection_is_let_go_after_upstream_idle_timeout() {
    let (be, seen) = h2c_only_backend().await;
    let gw = TestGateway::start(&yaml(&be, "http2: true\nupstream_idle_timeout: 0.3\n")).await;
    let get = |path: &str| {
        http::Request::get(gw.url(path))
            .body(Body::empty())
            .unwrap()
    };
    for i in 0..3 {
        assert_eq!(send(get(&format!("/echo/warm-{i}"))).await.0, 200);
    }
    assert_eq!(seen.echo_connections(), 1, "reused");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(send(get("/echo/after-idle")).await.0, 200);
    assert_eq!(
        seen.echo_connections(),
        2,
        "a new connection after the idle timeout"
    );
}
