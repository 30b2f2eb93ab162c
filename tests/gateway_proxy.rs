//! The gateway as a reverse proxy, against real axum backends on 127.0.0.1.

mod support;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use support::{backend, client, closed_port, TestGateway};

const TEN_MIB: usize = 10 * 1024 * 1024;

fn yaml_for(upstreams: &[String], extra: &str) -> String {
    let mut y = String::from("listen: 127.0.0.1:0\nhealth_check_interval: 0.2\nupstreams:\n");
    for u in upstreams {
        y.push_str(&format!("  - {{url: \"{u}\"}}\n"));
    }
    y.push_str(extra);
    y
}

fn echo_app() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/echo/{*rest}",
            any(|req: Request| async move {
                let headers: serde_json::Map<String, serde_json::Value> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                    .collect();
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let query = req.uri().query().unwrap_or("").to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                Json(serde_json::json!({
                    "method": method, "path": path, "query": query,
                    "headers": headers, "body": String::from_utf8_lossy(&body),
                }))
            }),
        )
        .route(
            "/upload",
            post(|req: Request| async move {
                // Count the body as it streams in, and checksum it.
                let mut stream = req.into_body().into_data_stream();
                let (mut n, mut sum) = (0usize, 0u64);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.unwrap();
                    n += chunk.len();
                    sum = chunk
                        .iter()
                        .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64));
                }
                Json(serde_json::json!({"bytes": n, "sum": sum}))
            }),
        )
        .route(
            "/download",
            get(|| async {
                let chunks = futures_util::stream::iter((0..160).map(|i| {
                    Ok::<_, std::io::Error>(Bytes::from(vec![(i % 251) as u8; 64 * 1024]))
                }));
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        )
        .route(
            "/take-a-second",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "finished"
            }),
        )
}

fn checksum(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(*b as u64))
}

#[tokio::test]
async fn forwards_method_path_query_and_headers() {
    let be = backend(echo_app()).await;
    let gw = TestGateway::start(&yaml_for(&[be.url()], "")).await;
    let req = http::Request::builder()
        .method("PATCH")
        .uri(gw.url("/echo/a/b?x=1&y=two"))
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("keep-alive", "timeout=5")
        .header("x-forwarded-for", "10.1.2.3")
        .body(Body::from("hello"))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["method"], "PATCH");
    assert_eq!(v["path"], "/echo/a/b");
    assert_eq!(v["query"], "x=1&y=two");
    assert_eq!(v["body"], "hello");
    let h = &v["headers"];
    assert_eq!(h["x-custom"], "kept");
    assert!(
        h.get("x-hop").is_none(),
        "header named in Connection must be removed: {h}"
    );
    assert!(
        h.get("keep-alive").is_none(),
        "hop-by-hop header leaked: {h}"
    );
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr.to_string());
    assert_eq!(
        h["host"],
        be.addr.to_string(),
        "the upstream sees its own Host"
    );
}

#[tokio::test]
async fn streams_ten_mib_both_ways() {
    let be = backend(echo_app()).await;
    let gw = TestGateway::start(&yaml_for(&[be.url()], "")).await;

    // Upload: a streamed 10 MiB request body, sent in 64 KiB chunks.
    let payload: Vec<u8> = (0..TEN_MIB).map(|i| (i % 253) as u8).collect();
    let expected = checksum(&payload);
    let chunks: Vec<Result<Bytes, std::io::Error>> = payload
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let req = http::Request::post(gw.url("/upload"))
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["bytes"], TEN_MIB);
    assert_eq!(v["sum"], expected);

    // Download: the response arrives in frames (streamed), not as one buffered block.
    let resp = client()
        .request(
            http::Request::get(gw.url("/download"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut n, mut frames) = (0usize, 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len();
            frames += 1;
        }
    }
    assert_eq!(n, TEN_MIB);
    assert!(frames > 10, "response was not streamed ({frames} frames)");
}

#[tokio::test]
async fn closed_port_is_502_without_leaking_the_upstream() {
    let port = closed_port().await;
    let upstream = format!("http://127.0.0.1:{port}");
    let gw = TestGateway::start(&yaml_for(std::slice::from_ref(&upstream), "")).await;
    let resp = client()
        .request(
            http::Request::get(gw.url("/anything"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "bad_gateway");
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains(&port.to_string()),
        "upstream address leaked: {text}"
    );
}

#[tokio::test]
async fn slow_backend_is_504_after_upstream_timeout() {
    let be = backend(echo_app()).await;
    let gw = TestGateway::start(&yaml_for(&[be.url()], "upstream_timeout: 0.5\n")).await;
    let start = Instant::now();
    let resp = client()
        .request(
            http::Request::get(gw.url("/slow"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(resp.status(), 504);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let be = backend(echo_app()).await;
    let mut gw = TestGateway::start(&yaml_for(&[be.url()], "drain_timeout: 5\n")).await;
    let url = gw.url("/take-a-second");
    let in_flight = tokio::spawn(async move {
        let resp = client()
            .request(http::Request::get(url).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = gw.shutdown();
    // New connections are refused soon after the signal.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::net::TcpStream::connect(gw.addr).await;
    assert!(refused.is_err(), "listener still accepting after shutdown");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    assert!(
        server.await.unwrap().unwrap(),
        "server did not drain cleanly"
    );
}
