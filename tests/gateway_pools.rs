//! Named pools and routes (issue 16) through the gateway binary, against real backends on
//! 127.0.0.1 that say who they are: each request lands on its route's pool (prefix, exact
//! path with a method, host), `strip_prefix` rewrites the path, the rest goes to `default`;
//! a watched endpoint served by two pools is one limit; the stats, metrics and the runtime
//! upstream admin know the pools; a route to an unknown pool exits 2 naming it; a reload
//! that changes the routes moves the traffic and keeps the pools it leaves alone.

mod support;

use axum::body::Body;
use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use base64::Engine;
use http::StatusCode;
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::gateway_process::GatewayProcess;
use support::{backend, client, Server};

const USER: &str = "ops";
const PASS: &str = "pools-secret";

/// A backend that answers `<name> <path and query>` (and counts its requests, but the
/// health checks), after `delay`, tracking the peak of requests in flight in `inflight`.
fn named(name: &'static str, delay: Duration, load: Arc<Load>) -> Router {
    Router::new()
        .route("/healthz", any(|| async { "ok" }))
        .fallback(any(move |req: Request| {
            let load = Arc::clone(&load);
            async move {
                let now = load.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                load.peak.fetch_max(now, Ordering::SeqCst);
                load.requests.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                load.inflight.fetch_sub(1, Ordering::SeqCst);
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/".to_owned(), |pq| pq.to_string());
                format!("{name} {pq}")
            }
        }))
}

/// Requests seen by one or more backends: in flight, their peak, the total.
#[derive(Default)]
struct Load {
    inflight: AtomicU64,
    peak: AtomicU64,
    requests: AtomicU64,
}

async fn start(name: &'static str, load: &Arc<Load>) -> Server {
    backend(named(name, Duration::ZERO, Arc::clone(load))).await
}

/// The backends `web`, `gpu` and `cpu`, counted in `load`.
async fn web_gpu_cpu(load: &Arc<Load>) -> (Server, Server, Server) {
    (
        start("web", load).await,
        start("gpu", load).await,
        start("cpu", load).await,
    )
}

fn basic() -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    format!("Basic {token}")
}

/// `method path` through the gateway with an optional `Host`: status and body.
async fn send(
    gw: &GatewayProcess,
    method: &str,
    path: &str,
    host: Option<&str>,
) -> (StatusCode, String) {
    let mut req = http::Request::builder().method(method).uri(gw.url(path));
    if let Some(h) = host {
        req = req.header(http::header::HOST, h);
    }
    let resp = client()
        .request(req.body(Body::empty()).unwrap())
        .await
        .expect("the gateway answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An operator request with the credentials (JSON content type): status and JSON body.
async fn operator(
    gw: &GatewayProcess,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(gw.url(path))
        .header(http::header::AUTHORIZATION, basic())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = client().request(req).await.expect("the gateway answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, json)
}

/// The config: `web` is the pool `default`, `gpu` and `cpu` are named pools, and `routes`.
fn config(web: &Server, gpu: &Server, cpu: &Server, routes: &str) -> String {
    format!(
        "ui: {{username: {USER}, password: {PASS}}}\n\
         upstream_admin: true\n\
         health_check_interval: 0.1\n\
         upstreams:\n  - {{url: \"{}\"}}\n\
         pools:\n\
         \x20 gpu:\n    upstreams: [{{url: \"{}\"}}]\n    routing_strategy: least-connections\n    health_check_interval: 0.1\n\
         \x20 cpu:\n    upstreams: [{{url: \"{}\"}}]\n    health_check_interval: 0.1\n    retry: {{max_attempts: 3}}\n\
         routes:\n{routes}",
        web.url(),
        gpu.url(),
        cpu.url()
    )
}

const ROUTES: &str = "  - {prefix: /v1/chat/, pool: gpu}\n\
                      \x20 - {path: /v1/embed, method: POST, pool: cpu}\n\
                      \x20 - {prefix: /api/, pool: cpu, strip_prefix: true}\n\
                      \x20 - {prefix: /, host: gpu.example, pool: gpu}\n";

/// `GET /balancer/stats` with the credentials.
async fn stats(gw: &GatewayProcess) -> serde_json::Value {
    let (status, stats) = operator(gw, "GET", "/balancer/stats", "").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    stats
}

fn pool_upstream<'a>(stats: &'a serde_json::Value, pool: &str) -> &'a serde_json::Value {
    &stats["pools"][pool]["upstreams"][0]
}

#[tokio::test]
async fn each_request_lands_on_its_routes_pool_and_the_stats_group_upstreams_by_pool() {
    let load = Arc::new(Load::default());
    let (web, gpu, cpu) = web_gpu_cpu(&load).await;
    let gw = GatewayProcess::start("pools-routes", &config(&web, &gpu, &cpu, ROUTES)).await;

    for (method, path, host, want) in [
        (
            "GET",
            "/v1/chat/completions",
            None,
            "gpu /v1/chat/completions",
        ),
        ("POST", "/v1/embed", None, "cpu /v1/embed"),
        // The method of the exact-path route does not match: the default pool.
        ("GET", "/v1/embed", None, "web /v1/embed"),
        // An exact path does not match below it.
        ("POST", "/v1/embed/x", None, "web /v1/embed/x"),
        // strip_prefix: the upstream sees the path less the prefix, the query kept.
        ("GET", "/api/users?id=1", None, "cpu /users?id=1"),
        ("GET", "/api/", None, "cpu /"),
        // Host matching, with a port and in another case.
        ("GET", "/other", Some("GPU.example:8080"), "gpu /other"),
        ("GET", "/other", Some("web.example"), "web /other"),
        ("GET", "/other", None, "web /other"),
    ] {
        let (status, body) = send(&gw, method, path, host).await;
        assert_eq!(status, StatusCode::OK, "{method} {path} {host:?}: {body}");
        assert_eq!(body, want, "{method} {path} {host:?}");
    }

    let stats = stats(&gw).await;
    // The top-level list is the pool `default`, as before, and `pools` has every pool.
    assert_eq!(stats["upstreams"][0]["url"], web.url(), "{stats}");
    assert_eq!(stats["upstreams"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(stats["pools"]["default"]["upstreams"], stats["upstreams"]);
    assert_eq!(pool_upstream(&stats, "gpu")["url"], gpu.url(), "{stats}");
    assert_eq!(pool_upstream(&stats, "cpu")["url"], cpu.url(), "{stats}");
    assert_eq!(pool_upstream(&stats, "default")["requests"], 4, "{stats}");
    assert_eq!(pool_upstream(&stats, "gpu")["requests"], 2, "{stats}");
    assert_eq!(pool_upstream(&stats, "cpu")["requests"], 3, "{stats}");
    for pool in ["default", "gpu", "cpu"] {
        assert_eq!(stats["pools"][pool]["retry"]["retries"], 0, "{stats}");
        assert_eq!(stats["retry"][pool]["retries"], 0, "{stats}");
        assert!(stats["pools"][pool]["fallback"].is_null(), "{stats}");
    }

    let (status, metrics) = send(&gw, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{metrics}");
    let req = http::Request::get(gw.url("/metrics"))
        .header(http::header::AUTHORIZATION, basic())
        .body(Body::empty())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let metrics = resp.into_body().collect().await.unwrap().to_bytes();
    let metrics = String::from_utf8_lossy(&metrics);
    for (pool, url, n) in [
        ("default", web.url(), 4),
        ("gpu", gpu.url(), 2),
        ("cpu", cpu.url(), 3),
    ] {
        let series = format!(
            "portcullis_upstream_requests_total{{upstream=\"{url}\",tier=\"secondary\",pool=\"{pool}\"}} {n}"
        );
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
        let retries = format!("portcullis_retries_total{{pool=\"{pool}\"}} 0");
        assert!(metrics.contains(&retries), "{retries} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_watched_endpoint_served_by_two_pools_is_one_limit() {
    let load = Arc::new(Load::default());
    let slow = Duration::from_millis(150);
    let web = start("web", &load).await;
    let gpu = backend(named("gpu", slow, Arc::clone(&load))).await;
    let cpu = backend(named("cpu", slow, Arc::clone(&load))).await;
    let routes = "  - {prefix: /v1/chat/a, pool: gpu}\n  - {prefix: /v1/chat/b, pool: cpu}\n";
    let yaml = format!(
        "{}endpoints:\n  /v1/chat/*: {{capacity: 1, queue_timeout: 10}}\n",
        config(&web, &gpu, &cpu, routes)
    );
    let gw = Arc::new(GatewayProcess::start("pools-admission", &yaml).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let gw = Arc::clone(&gw);
        let path = if i % 2 == 0 {
            "/v1/chat/a"
        } else {
            "/v1/chat/b"
        };
        tasks.push(tokio::spawn(
            async move { send(&gw, "POST", path, None).await },
        ));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        let pool = if i % 2 == 0 { "gpu" } else { "cpu" };
        assert!(body.starts_with(pool), "request {i} went to {body}");
    }
    // Capacity 1 across both pools: never two requests at the backends at once.
    assert_eq!(
        load.peak.load(Ordering::SeqCst),
        1,
        "one slot for both pools"
    );
    let stats = stats(&gw).await;
    let ep = &stats["endpoints"]["/v1/chat/*"];
    assert_eq!(ep["admitted"], 8, "each request counted once: {stats}");
    assert_eq!(ep["active_requests"], 0, "{stats}");
    assert_eq!(pool_upstream(&stats, "gpu")["requests"], 4, "{stats}");
    assert_eq!(pool_upstream(&stats, "cpu")["requests"], 4, "{stats}");
}

#[tokio::test]
async fn the_upstream_admin_takes_a_pool_and_refuses_an_unknown_one() {
    let load = Arc::new(Load::default());
    let (web, gpu, cpu) = web_gpu_cpu(&load).await;
    let gpu2 = start("gpu2", &load).await;
    let gw = GatewayProcess::start("pools-admin", &config(&web, &gpu, &cpu, ROUTES)).await;

    let add = format!("{{\"url\": \"{}\", \"pool\": \"gpu\"}}", gpu2.url());
    let (status, body) = operator(&gw, "POST", "/balancer/upstreams", &add).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["pool"], "gpu", "{body}");
    // The same URL again in the same pool is a conflict, in another pool it is not.
    let (status, body) = operator(&gw, "POST", "/balancer/upstreams", &add).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = operator(&gw, "GET", "/balancer/upstreams?pool=gpu", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let urls: Vec<&str> = body["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("a snapshot: {body}"))
        .iter()
        .map(|r| r["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls, [gpu.url(), gpu2.url()], "{body}");
    // Without `pool`: the pool `default`, untouched.
    let (status, body) = operator(&gw, "GET", "/balancer/upstreams", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replicas"].as_array().unwrap().len(), 1, "{body}");

    // Once its first health check passed, the new replica serves the gpu routes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = send(&gw, "GET", "/v1/chat/x", None).await;
        if body.starts_with("gpu2") {
            break;
        }
        assert!(Instant::now() < deadline, "gpu2 never served: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = stats(&gw).await;
    assert_eq!(
        stats["pools"]["gpu"]["upstreams"].as_array().unwrap().len(),
        2,
        "{stats}"
    );

    for (method, path, body) in [
        (
            "POST",
            "/balancer/upstreams".to_owned(),
            format!("{{\"url\": \"{}\", \"pool\": \"tpu\"}}", gpu2.url()),
        ),
        (
            "DELETE",
            format!("/balancer/upstreams?url={}&pool=tpu", gpu2.url()),
            String::new(),
        ),
        (
            "GET",
            "/balancer/upstreams?pool=tpu".to_owned(),
            String::new(),
        ),
    ] {
        let (status, answer) = operator(&gw, method, &path, &body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(answer["error"], "unknown_pool", "{method} {path}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("tpu"),
            "{answer}"
        );
    }
    let path = format!("/balancer/upstreams?url={}&pool=gpu", gpu2.url());
    let (status, body) = operator(&gw, "DELETE", &path, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = operator(&gw, "DELETE", &path, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    for _ in 0..5 {
        let (_, body) = send(&gw, "GET", "/v1/chat/x", None).await;
        assert_eq!(body, "gpu /v1/chat/x", "the removed replica gets nothing");
    }
}

#[tokio::test]
async fn a_reload_that_changes_the_routes_moves_the_traffic_and_keeps_the_other_pools() {
    let load = Arc::new(Load::default());
    let (web, gpu, cpu) = web_gpu_cpu(&load).await;
    let gw = GatewayProcess::start("pools-reload", &config(&web, &gpu, &cpu, ROUTES)).await;
    for _ in 0..3 {
        let (_, body) = send(&gw, "GET", "/v1/chat/x", None).await;
        assert_eq!(body, "gpu /v1/chat/x");
    }
    let (_, body) = send(&gw, "GET", "/api/x", None).await;
    assert_eq!(body, "cpu /x");

    // /v1/chat/ moves to cpu, /api/ is no longer stripped, and a new pool `edge` serves
    // /edge/; the pools keep their settings.
    let gpu_again = gpu.url();
    let edge = start("edge", &load).await;
    let routes = "  - {prefix: /v1/chat/, pool: cpu}\n  - {prefix: /api/, pool: cpu}\n  - {prefix: /edge/, pool: edge}\n";
    let yaml = config(&web, &gpu, &cpu, routes).replace(
        "pools:\n",
        &format!(
            "pools:\n  edge:\n    upstreams: [{{url: \"{}\"}}]\n",
            edge.url()
        ),
    );
    gw.rewrite_config(&yaml);
    let (status, report) = operator(&gw, "POST", "/balancer/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let applied: Vec<&str> = report["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        applied.contains(&"routes") && applied.contains(&"pools"),
        "{report}"
    );

    for (path, want) in [
        ("/v1/chat/x", "cpu /v1/chat/x"),
        ("/api/x", "cpu /api/x"),
        ("/edge/y", "edge /edge/y"),
        ("/other", "web /other"),
    ] {
        let (status, body) = send(&gw, "GET", path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body, want, "{path}");
    }
    let stats = stats(&gw).await;
    assert_eq!(stats["config_generation"], 2, "{stats}");
    // gpu's settings did not change: its registry (and so its counters) carried over.
    assert_eq!(pool_upstream(&stats, "gpu")["url"], gpu_again, "{stats}");
    assert_eq!(pool_upstream(&stats, "gpu")["requests"], 3, "{stats}");
    assert_eq!(pool_upstream(&stats, "cpu")["requests"], 3, "{stats}");
    assert_eq!(pool_upstream(&stats, "edge")["requests"], 1, "{stats}");
}

/// A backend that speaks only HTTP/2 with prior knowledge (an HTTP/1.1 request on it is a
/// protocol error), answering `<name> <version> <path>`.
async fn h2c_only(name: &'static str) -> Server {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let app = Router::new()
        .route("/healthz", any(|| async { "ok" }))
        .fallback(any(move |req: Request| async move {
            format!("{name} {:?} {}", req.version(), req.uri().path())
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server::new(addr, task)
}

#[tokio::test]
async fn a_pool_with_http2_reaches_its_h2c_upstream_while_default_stays_http1() {
    let load = Arc::new(Load::default());
    let web = start("web", &load).await;
    let h2 = h2c_only("h2").await;
    let yaml = format!(
        "health_check_interval: 0.1\nupstreams:\n  - {{url: \"{}\"}}\n\
         pools:\n  h2:\n    upstreams: [{{url: \"{}\"}}]\n    http2: true\n    health_check_interval: 0.1\n\
         routes:\n  - {{prefix: /h2/, pool: h2, strip_prefix: true}}\n",
        web.url(),
        h2.url()
    );
    let gw = GatewayProcess::start("pools-h2c", &yaml).await;
    // The h2c-only replica passes its (h2c) health check and stays in: many requests in a
    // row, each over HTTP/2, the prefix stripped.
    for _ in 0..20 {
        let (status, body) = send(&gw, "GET", "/h2/x", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "h2 HTTP/2.0 /x");
        let (status, body) = send(&gw, "GET", "/x", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "web /x", "the pool default is HTTP/1");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = send(&gw, "GET", "/h2/y", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "h2 HTTP/2.0 /y"));
}

#[test]
fn a_route_to_an_unknown_pool_exits_2_naming_its_index() {
    let (code, text) = support::env_check::check_with_env(
        "upstreams:\n  - {url: \"http://127.0.0.1:1\"}\npools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\nroutes:\n  - {prefix: /v1/chat/, pool: gpu}\n  - {path: /v1/embed, pool: cpu}\n",
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("`routes[1].pool`"), "{text}");
    assert!(text.contains("line 8"), "{text}");
    assert!(text.contains("no pool named `cpu`"), "{text}");
}

/// `GET /readyz` through a fresh client: status and JSON body; `None` while the gateway
/// does not answer yet.
async fn readyz(gw: &GatewayProcess) -> Option<(StatusCode, serde_json::Value)> {
    let req = http::Request::get(gw.url("/readyz"))
        .body(Body::empty())
        .unwrap();
    let resp = client().request(req).await.ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&body).ok()?))
}

/// Polls `/readyz` until it answers `want` (within 15 s); the last body.
async fn readyz_until(gw: &GatewayProcess, want: StatusCode) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = readyz(gw).await;
        if let Some((status, body)) = &got {
            if *status == want {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {want}: {got:?}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `web` is the pool default, `cpu` a named pool, and with `gpu` the pool gpu's only
/// replica is `127.0.0.1:<gpu>`.
fn readyz_config(web: &Server, cpu: &Server, gpu: Option<u16>) -> String {
    let (pool, route) = match gpu {
        Some(port) => (
            format!("\x20 gpu:\n    upstreams: [{{url: \"http://127.0.0.1:{port}\"}}]\n    health_check_interval: 0.1\n    failure_threshold: 2\n    recovery_threshold: 1\n"),
            "  - {prefix: /v1/chat/, pool: gpu}\n",
        ),
        None => (String::new(), ""),
    };
    format!(
        "ui: {{username: {USER}, password: {PASS}}}\n\
         health_check_interval: 0.1\n\
         upstreams:\n  - {{url: \"{}\"}}\n\
         pools:\n{pool}\
         \x20 cpu:\n    upstreams: [{{url: \"{}\"}}]\n    health_check_interval: 0.1\n\
         routes:\n{route}  - {{prefix: /v1/embed, pool: cpu}}\n",
        web.url(),
        cpu.url()
    )
}

#[tokio::test]
async fn readyz_names_the_pool_whose_only_upstream_is_down() {
    let load = Arc::new(Load::default());
    let (web, cpu) = (start("web", &load).await, start("cpu", &load).await);
    // The pool gpu's only replica: nothing listens on its port.
    let down = support::closed_port().await;
    let yaml = readyz_config(&web, &cpu, Some(down));
    let gw = GatewayProcess::spawn("pools-readyz", &yaml);
    let body = readyz_until(&gw, StatusCode::SERVICE_UNAVAILABLE).await;
    // The failing pool by name, and only it: `upstreams` (the pool default) is fine.
    assert_eq!(
        body,
        serde_json::json!({"status": "not_ready", "failing": ["pools.gpu"]})
    );
    let stats = stats(&gw).await;
    assert_eq!(
        stats["health"]["failing"],
        serde_json::json!(["pools.gpu"]),
        "{stats}"
    );
    // The other pools serve on; the failing one answers 503.
    assert_eq!(
        send(&gw, "GET", "/v1/embed", None).await,
        (StatusCode::OK, "cpu /v1/embed".to_owned())
    );
    assert_eq!(
        send(&gw, "GET", "/x", None).await,
        (StatusCode::OK, "web /x".to_owned())
    );
    let (status, body) = send(&gw, "GET", "/v1/chat/x", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no_healthy_upstream"), "{body}");

    // The replica comes up on its port: the gateway is ready again.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", down))
        .await
        .expect("the closed port is free again");
    let app = named("gpu", Duration::ZERO, Arc::clone(&load));
    let _gpu = Server::new(
        listener.local_addr().unwrap(),
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
    );
    assert_eq!(
        readyz_until(&gw, StatusCode::OK).await,
        serde_json::json!({"status": "ok"})
    );
    assert_eq!(
        send(&gw, "GET", "/v1/chat/x", None).await,
        (StatusCode::OK, "gpu /v1/chat/x".to_owned())
    );
}

#[tokio::test]
async fn a_pool_removed_by_a_reload_no_longer_counts_for_readiness() {
    let load = Arc::new(Load::default());
    let (web, cpu) = (start("web", &load).await, start("cpu", &load).await);
    let down = support::closed_port().await;
    let gw = GatewayProcess::spawn(
        "pools-readyz-reload",
        &readyz_config(&web, &cpu, Some(down)),
    );
    let body = readyz_until(&gw, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["failing"], serde_json::json!(["pools.gpu"]), "{body}");
    gw.rewrite_config(&readyz_config(&web, &cpu, None));
    let (status, report) = operator(&gw, "POST", "/balancer/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (status, body) = readyz(&gw).await.expect("/readyz answers");
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    );
}

/// A backend with a knee: past `knee` concurrent requests (each takes 20 ms) it answers
/// 503. It records the path of every request but the health checks.
fn knee(knee: u64, load: Arc<Load>, paths: Arc<std::sync::Mutex<Vec<String>>>) -> Router {
    Router::new()
        .route("/healthz", any(|| async { "ok" }))
        .fallback(any(move |req: Request| {
            let (load, paths) = (Arc::clone(&load), Arc::clone(&paths));
            async move {
                paths.lock().unwrap().push(req.uri().path().to_owned());
                load.requests.fetch_add(1, Ordering::SeqCst);
                let now = load.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                load.inflight.fetch_sub(1, Ordering::SeqCst);
                if now > knee {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_probe_measures_each_endpoint_through_the_pool_that_serves_it() {
    let (web_load, cpu_load) = (Arc::new(Load::default()), Arc::new(Load::default()));
    let (web_paths, cpu_paths) = (Arc::default(), Arc::default());
    // Different knees: the probed capacity says which backend was measured.
    let web = backend(knee(12, Arc::clone(&web_load), Arc::clone(&web_paths))).await;
    let cpu = backend(knee(4, Arc::clone(&cpu_load), Arc::clone(&cpu_paths))).await;
    let yaml = format!(
        "health_check_interval: 0.1\neject_after: 3\n\
         probe_on_startup: true\nmax_probe_concurrency: 32\nprobe_min_requests: 12\nerror_threshold: 0.05\n\
         upstreams:\n  - {{url: \"{}\"}}\n\
         pools:\n  cpu:\n    upstreams: [{{url: \"{}\"}}]\n    health_check_interval: 0.1\n\
         routes:\n  - {{path: /v1/embed, method: POST, pool: cpu}}\n  - {{prefix: /api/, pool: cpu, strip_prefix: true}}\n\
         endpoints:\n  /v1/embed: {{method: POST}}\n  /api/*: {{method: GET, probe_path: /api/work}}\n",
        web.url(),
        cpu.url()
    );
    // Ready once both endpoints are probed.
    let gw = GatewayProcess::start("pools-startup-probe", &yaml).await;
    let stats = gw.stats().await;
    for ep in ["/v1/embed", "/api/*"] {
        let cap = stats["endpoints"][ep]["capacity"].as_u64().unwrap();
        assert!(
            (3..=5).contains(&cap),
            "{ep}: probed capacity {cap}, cpu's knee 4"
        );
    }
    // Every probe request reached cpu's backend, `/api/` stripped as the route says; the
    // pool default's backend got none.
    assert_eq!(
        web_load.requests.load(Ordering::SeqCst),
        0,
        "web was probed"
    );
    let paths = cpu_paths.lock().unwrap().clone();
    assert!(paths.iter().any(|p| p == "/v1/embed"), "{paths:?}");
    assert!(paths.iter().any(|p| p == "/work"), "{paths:?}");
    assert!(
        paths.iter().all(|p| p == "/v1/embed" || p == "/work"),
        "{paths:?}"
    );
    assert!(web_paths.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_fallback_check_takes_a_pool() {
    let load = Arc::new(Load::default());
    let (web, gpu, cpu) = web_gpu_cpu(&load).await;
    let fallback = start("fallback", &load).await;
    // Only gpu has a fallback.
    let yaml = config(&web, &gpu, &cpu, ROUTES).replace(
        "    routing_strategy: least-connections\n",
        &format!(
            "    routing_strategy: least-connections\n    fallback: {{url: \"{}\", probe_max_retries: 0}}\n",
            fallback.url()
        ),
    );
    assert!(yaml.contains("fallback:"), "{yaml}");
    let gw = GatewayProcess::start("pools-fallback-check", &yaml).await;

    let (status, report) = operator(&gw, "POST", "/balancer/fallback/check?pool=gpu", "").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["primary"]["healthy"], true, "{report}");
    assert_eq!(report["fallback"]["healthy"], true, "{report}");
    assert_eq!(report["state"], "normal", "{report}");
    // gpu's breaker: its fallback was probed.
    assert_eq!(report["fallback"]["target"], fallback.url(), "{report}");
    assert_eq!(report["counters"]["forced_checks"], 1, "{report}");

    // Without `pool`: the pool default's breaker, as before (it has none).
    let (status, body) = operator(&gw, "POST", "/balancer/fallback/check", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    assert_eq!(body["message"], "no fallback is configured", "{body}");
    // A pool without a fallback, and a pool that does not exist.
    let (status, body) = operator(&gw, "POST", "/balancer/fallback/check?pool=cpu", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("`cpu`"),
        "{body}"
    );
    let (status, body) = operator(&gw, "POST", "/balancer/fallback/check?pool=nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "unknown_pool", "{body}");
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");
}
