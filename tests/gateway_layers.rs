//! The gateway with every layer stacked, against real axum backends on 127.0.0.1:
//! admission (capacity, FIFO, 504, unwatched paths), health gating (503 and readiness),
//! the circuit-breaker fallback, and the operator routes (schema-checked stats, metrics,
//! auth).

mod support;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{any, get};
use axum::Router;
use http::Request;
use http_body_util::BodyExt;
use portcullis_testkit::eventually_async;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{backend, client, Server, TestGateway};

/// What a test backend records.
#[derive(Default)]
struct Meter {
    now: AtomicUsize,
    max: AtomicUsize,
    hits: AtomicUsize,
    sick: AtomicBool,
    failing: AtomicBool,
}

/// A backend: `/work` holds a slot for `delay` and records concurrency; `/healthz` is 200
/// unless `sick`; everything answers 500 while `failing`.
async fn metered(name: &'static str, delay: Duration) -> (Server, Arc<Meter>) {
    let meter = Arc::new(Meter::default());
    let work = move |State((m, delay)): State<(Arc<Meter>, Duration)>| async move {
        m.hits.fetch_add(1, Ordering::SeqCst);
        if m.failing.load(Ordering::SeqCst) {
            return (StatusCode::INTERNAL_SERVER_ERROR, name);
        }
        let c = m.now.fetch_add(1, Ordering::SeqCst) + 1;
        m.max.fetch_max(c, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        m.now.fetch_sub(1, Ordering::SeqCst);
        (StatusCode::OK, name)
    };
    let app = Router::new()
        .route(
            "/healthz",
            get(|State((m, _)): State<(Arc<Meter>, Duration)>| async move {
                if m.sick.load(Ordering::SeqCst) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }),
        )
        .route("/work", any(work))
        .route("/free", any(work))
        .route("/v1/{*rest}", any(work))
        .with_state((meter.clone(), delay));
    (backend(app).await, meter)
}

fn yaml(upstreams: &[&Server], extra: &str) -> String {
    let mut y = String::from(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\nhealth_check_timeout: 0.5\nfailure_threshold: 2\nrecovery_threshold: 2\nupstreams:\n",
    );
    for (i, u) in upstreams.iter().enumerate() {
        y.push_str(&format!(
            "  - {{url: \"{}\", primary: {}}}\n",
            u.url(),
            i == 0
        ));
    }
    y.push_str(extra);
    y
}

/// Sends `req` through the test client; the status, headers and whole body.
async fn send(req: Request<Body>) -> (StatusCode, http::HeaderMap, axum::body::Bytes) {
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

async fn get_status(url: &str) -> (StatusCode, serde_json::Value, http::HeaderMap) {
    let (status, headers, body) = send(Request::get(url).body(Body::empty()).unwrap()).await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

async fn stats(gw: &TestGateway) -> serde_json::Value {
    get_status(&gw.url("/balancer/stats")).await.1
}

/// One client task per URL, each sending `per_client` requests one after the other; every
/// status, in no particular order.
async fn concurrent_clients(urls: Vec<String>, per_client: usize) -> Vec<StatusCode> {
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                let mut codes = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    codes.push(get_status(&url).await.0);
                }
                codes
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_8_holds_against_64_clients_and_every_client_gets_200() {
    let (be, meter) = metered("a", Duration::from_millis(40)).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "queue_timeout: 30\nendpoints:\n  /work: {capacity: 8}\n",
    ))
    .await;
    let urls: Vec<String> = (0..64).map(|_| gw.url("/work")).collect();
    for code in concurrent_clients(urls, 3).await {
        assert_eq!(code, StatusCode::OK);
    }
    assert_eq!(meter.hits.load(Ordering::SeqCst), 192);
    let max = meter.max.load(Ordering::SeqCst);
    assert!(max <= 8, "the backend saw {max} concurrent requests");
    assert_eq!(max, 8, "the capacity should be used fully");
    let s = stats(&gw).await;
    let ep = &s["endpoints"]["/work"];
    assert_eq!(ep["capacity"], 8);
    assert_eq!(ep["active_requests"], 0);
    assert_eq!(ep["queue_depth"], 0);
    assert_eq!(ep["admitted"], 192);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_504_json_and_unwatched_paths_pass_uncounted() {
    let (be, meter) = metered("a", Duration::from_millis(1500)).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "queue_timeout: 30\nendpoints:\n  /work: {capacity: 1, queue_timeout: 0.3}\n",
    ))
    .await;
    let first = tokio::spawn({
        let url = gw.url("/work");
        async move { get_status(&url).await.0 }
    });
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            meter.now.load(Ordering::SeqCst) == 1
        })
        .await,
        "the first request holds the slot: not within 5s"
    );
    let t0 = Instant::now();
    let (code, body, _) = get_status(&gw.url("/work")).await;
    let waited = t0.elapsed();
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"], "queue_timeout", "{body}");
    assert!(body["message"].is_string());
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_millis(1000),
        "504 after {waited:?}"
    );
    // An unwatched path is neither queued nor counted.
    let t0 = Instant::now();
    let (code, _, _) = get_status(&gw.url("/free")).await;
    assert_eq!(code, StatusCode::OK);
    assert!(t0.elapsed() >= Duration::from_millis(1400));
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    let s = stats(&gw).await;
    assert_eq!(s["endpoints"]["/work"]["timed_out_504"], 1);
    assert_eq!(s["endpoints"]["/work"]["admitted"], 1);
    assert!(s["endpoints"].get("/free").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sick_replica_stops_getting_traffic_and_all_sick_is_503_and_not_ready() {
    let (a, ma) = metered("a", Duration::ZERO).await;
    let (b, mb) = metered("b", Duration::ZERO).await;
    // Both primary here: the pool spreads over them.
    let cfg = yaml(&[&a, &b], "endpoints:\n  /work: {capacity: 4}\n")
        .replace("primary: false", "primary: true");
    let gw = TestGateway::start(&cfg).await;
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            get_status(&gw.url("/readyz")).await.0 == StatusCode::OK
        })
        .await,
        "ready: not within 5s"
    );

    ma.sick.store(true, Ordering::SeqCst);
    // failure_threshold × interval + timeout + interval = 0.2 + 0.5 + 0.1 s.
    assert!(
        eventually_async(Duration::from_secs(3), async || {
            stats(&gw).await["upstreams"][0]["healthy"] == false
        })
        .await,
        "a is marked unhealthy: not within 3s"
    );
    let before = ma.hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
    }
    assert_eq!(
        ma.hits.load(Ordering::SeqCst),
        before,
        "a sick replica got traffic"
    );
    assert!(mb.hits.load(Ordering::SeqCst) >= 20);

    mb.sick.store(true, Ordering::SeqCst);
    assert!(
        eventually_async(Duration::from_secs(3), async || {
            get_status(&gw.url("/readyz")).await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await,
        "not ready: not within 3s"
    );
    let (_, body, _) = get_status(&gw.url("/readyz")).await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["failing"], serde_json::json!(["upstreams"]));
    // Watched path: the admission gate refuses before queueing.
    let (code, body, headers) = get_status(&gw.url("/work")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "backend_unhealthy", "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
    // Unwatched path: the balancer answers.
    let (code, body, headers) = get_status(&gw.url("/free")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "no_healthy_upstream", "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
    // Liveness is unaffected.
    assert_eq!(get_status(&gw.url("/healthz")).await.0, StatusCode::OK);

    // Recovery after recovery_threshold good probes.
    ma.sick.store(false, Ordering::SeqCst);
    assert!(
        eventually_async(Duration::from_secs(3), async || {
            get_status(&gw.url("/readyz")).await.0 == StatusCode::OK
        })
        .await,
        "ready again: not within 3s"
    );
    let before = ma.hits.load(Ordering::SeqCst);
    assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
    assert_eq!(ma.hits.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pool_engages_the_fallback_and_no_request_is_lost() {
    let (primary, mp) = metered("primary", Duration::ZERO).await;
    let (fallback, mf) = metered("fallback", Duration::ZERO).await;
    let extra = format!(
        "eject_after: 0\nfallback:\n  url: \"{}\"\n  failure_threshold: 3\n  recheck_interval: 0.1\n  min_fallback_duration: 1\n  recovery_success_threshold: 2\n  probe_max_retries: 0\n  probe_timeout: 0.5\n",
        fallback.url()
    );
    let gw = TestGateway::start(&yaml(&[&primary], &extra)).await;
    let body_of = async |url: String| {
        let (status, _, bytes) = send(Request::get(url).body(Body::empty()).unwrap()).await;
        (status, String::from_utf8_lossy(&bytes).into_owned())
    };
    assert_eq!(
        body_of(gw.url("/work")).await,
        (StatusCode::OK, "primary".into())
    );

    // The primary answers 500 (its /healthz stays green: the live responses trip it).
    mp.failing.store(true, Ordering::SeqCst);
    let mut engaged_at = Instant::now();
    for _ in 0..3 {
        // The breaker engages while the third failure is classified: not before this.
        engaged_at = Instant::now();
        assert_eq!(
            body_of(gw.url("/work")).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let s = stats(&gw).await;
    assert_eq!(s["fallback"]["engaged"], true, "{s}");
    assert_eq!(s["fallback"]["state"], "open");
    assert_eq!(
        body_of(gw.url("/work")).await,
        (StatusCode::OK, "fallback".into())
    );
    assert_eq!(stats(&gw).await["fallback"]["fallback_requests"], 1);

    // The primary heals; traffic stays on the fallback for the hold, then returns.
    mp.failing.store(false, Ordering::SeqCst);
    let mut seen_primary_at = None;
    let mut answered = 0;
    while engaged_at.elapsed() < Duration::from_secs(5) {
        let (code, who) = body_of(gw.url("/work")).await;
        assert_eq!(code, StatusCode::OK, "every request gets an answer");
        answered += 1;
        if who == "primary" {
            seen_primary_at = Some(engaged_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = seen_primary_at.expect("traffic returns to the primary");
    assert!(
        back >= Duration::from_secs(1),
        "returned after {back:?}, before the hold"
    );
    assert!(answered > 1);
    assert!(mf.hits.load(Ordering::SeqCst) >= 1);
    assert_eq!(stats(&gw).await["fallback"]["state"], "closed");

    // The on-demand probe of both sides.
    let (status, _, body) = send(
        Request::post(gw.url("/balancer/fallback/check"))
            .header("content-type", "application/json")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["primary"]["healthy"], true, "{report}");
    assert_eq!(report["fallback"]["healthy"], true, "{report}");
    assert_eq!(report["state"], "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_the_schema_and_metrics_parse() {
    let (be, _) = metered("a", Duration::ZERO).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "endpoints:\n  /work: {capacity: 3, method: GET}\nfallback: {url: \"http://127.0.0.1:9\"}\n",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
    }
    let s = stats(&gw).await;
    let schema_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/stats.schema.json"
    ))
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&schema_text).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&s).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{s}");
    assert_eq!(s["endpoints"]["/work"]["capacity"], 3);
    assert_eq!(s["endpoints"]["/work"]["admitted"], 3);
    assert_eq!(s["upstreams"][0]["url"], be.url());
    assert_eq!(s["upstreams"][0]["requests"], 3);
    assert_eq!(s["upstreams"][0]["failures"], 0);
    assert_eq!(s["upstreams"][0]["latency"]["count"], 3);
    assert_eq!(s["fallback"]["state"], "closed");
    assert_eq!(s["storage"]["healthy"], true);

    let (status, _, body) = send(
        Request::get(gw.url("/metrics"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let admitted = scrape
        .samples
        .iter()
        .find(|s| s.metric.starts_with("portcullis_endpoint_admitted"))
        .unwrap_or_else(|| panic!("no admitted counter in\n{text}"));
    match admitted.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => {
            assert_eq!(v, 3.0)
        }
        ref other => panic!("unexpected {other:?}"),
    }
    assert!(scrape
        .samples
        .iter()
        .all(|s| s.metric.starts_with("portcullis_")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_protect_stats_metrics_and_ui_but_not_probes() {
    let (be, _) = metered("a", Duration::ZERO).await;
    let gw = TestGateway::start(&yaml(&[&be], "ui: {username: ops, password: \"s3cret\"}\n")).await;
    for path in ["/balancer/stats", "/metrics", "/balancer/ui"] {
        let (code, _, headers) = get_status(&gw.url(path)).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            headers.contains_key(http::header::WWW_AUTHENTICATE),
            "{path}"
        );
        let resp = client()
            .request(
                Request::get(gw.url(path))
                    .header("authorization", "Basic b3BzOnMzY3JldA==")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let url = gw.url(path);
        assert!(
            eventually_async(Duration::from_secs(3), async || {
                get_status(&url).await.0 == StatusCode::OK
            })
            .await,
            "{path}: not within 3s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_on_startup_sets_the_capacity_and_gates_readiness() {
    // A backend with a knee at 6 concurrent requests: past it, 503.
    let now = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/work",
            any(|State(now): State<Arc<AtomicUsize>>| async move {
                let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                if c > 6 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }),
        )
        .with_state(now);
    let be = backend(app).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "eject_after: 3\nprobe_on_startup: true\nmax_probe_concurrency: 32\nprobe_min_requests: 12\nerror_threshold: 0.05\nendpoints:\n  /work: {method: GET}\n  /v1/*: {method: GET, probe_path: /work}\n",
    ))
    .await;
    let (code, body, _) = get_status(&gw.url("/readyz")).await;
    if code == StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            body["failing"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "startup_probe"),
            "{body}"
        );
    }
    assert!(
        eventually_async(Duration::from_secs(30), async || {
            get_status(&gw.url("/readyz")).await.0 == StatusCode::OK
        })
        .await,
        "startup probe done: not within 30s"
    );
    let s = stats(&gw).await;
    let cap = s["endpoints"]["/work"]["capacity"].as_u64().unwrap();
    assert!((5..=7).contains(&cap), "probed capacity {cap}, knee 6");
    // A prefix pattern is probed at its probe_path.
    let cap = s["endpoints"]["/v1/*"]["capacity"].as_u64().unwrap();
    assert!(
        (5..=7).contains(&cap),
        "probed /v1/* capacity {cap}, knee 6"
    );
    // The probe's deliberate 503s do not eject the replica (passive ejection is on).
    assert_eq!(s["upstreams"][0]["ejected"], false, "{s}");
    assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_health_server_serves_the_same_probes() {
    let (be, meter) = metered("a", Duration::ZERO).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "health_server: {enable: true, listen: \"127.0.0.1:0\"}\n",
    ))
    .await;
    let addr = gw
        .gateway
        .health_server_addr()
        .expect("health server running");
    assert!(addr.ip().is_loopback());
    let ready = format!("http://{addr}/readyz");
    assert!(
        eventually_async(Duration::from_secs(3), async || {
            get_status(&ready).await.0 == StatusCode::OK
        })
        .await,
        "ready on the health server: not within 3s"
    );
    assert_eq!(
        get_status(&format!("http://{addr}/healthz")).await.0,
        StatusCode::OK
    );
    meter.sick.store(true, Ordering::SeqCst);
    assert!(
        eventually_async(Duration::from_secs(3), async || {
            let (code, body, _) = get_status(&ready).await;
            code == StatusCode::SERVICE_UNAVAILABLE
                && body["failing"] == serde_json::json!(["upstreams"])
        })
        .await,
        "not ready on the health server: not within 3s"
    );
    // Only the probe routes live there.
    assert_eq!(
        get_status(&format!("http://{addr}/balancer/stats")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_can_be_added_and_removed_at_runtime() {
    let (a, ma) = metered("a", Duration::ZERO).await;
    let (b, mb) = metered("b", Duration::ZERO).await;
    // a is a secondary replica here.
    let cfg = yaml(
        &[&a],
        "upstream_admin: true\nui: {username: ops, password: pw}\n",
    )
    .replace("primary: true", "primary: false");
    let gw = TestGateway::start(&cfg).await;
    let auth = "Basic b3BzOnB3"; // ops:pw
    let as_operator = async |req: http::request::Builder, body: &str| {
        let req = req
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let (status, _, bytes) = send(req).await;
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default(),
        )
    };
    let url = gw.url("/balancer/upstreams");
    // Behind the operator auth.
    assert_eq!(get_status(&url).await.0, StatusCode::UNAUTHORIZED);

    let add = format!("{{\"url\": \"{}\", \"primary\": true}}", b.url());
    let (code, body) = as_operator(Request::post(&url), &add).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let (code, body) = as_operator(Request::post(&url), &add).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(body["error"], "upstream_exists");
    let (code, body) = as_operator(Request::post(&url), "{\"url\": \"ftp://x\"}").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");
    let (code, body) = as_operator(Request::post(&url), "not json").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");

    let (code, body) = as_operator(Request::get(&url), "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["replicas"].as_array().unwrap().len(), 2, "{body}");
    // b starts unknown: it gets traffic once its first health check passed (0.1 s interval).
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            let (_, s) = as_operator(Request::get(gw.url("/balancer/stats")), "").await;
            s["upstreams"][1]["healthy"] == true
        })
        .await,
        "b passes its first check: not within 5s"
    );
    // b is primary, a is not: new requests go to b.
    let before = mb.hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
    }
    assert_eq!(mb.hits.load(Ordering::SeqCst), before + 5);

    // Remove b: traffic goes back to a; removing it twice is 404.
    let del = format!("{url}?url={}", b.url());
    let (code, body) = as_operator(Request::delete(&del), "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = as_operator(Request::delete(&del), "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let before = ma.hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(get_status(&gw.url("/work")).await.0, StatusCode::OK);
    }
    assert_eq!(ma.hits.load(Ordering::SeqCst), before + 5);
    let (_, s) = as_operator(Request::get(gw.url("/balancer/stats")), "").await;
    assert_eq!(s["upstreams"].as_array().unwrap().len(), 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_pattern_is_one_endpoint_for_every_path_under_it() {
    let (be, meter) = metered("a", Duration::from_millis(60)).await;
    let gw = TestGateway::start(&yaml(
        &[&be],
        "queue_timeout: 30\nendpoints:\n  /v1/*: {capacity: 2}\n  /v1/exact: {capacity: 5}\n",
    ))
    .await;
    let urls: Vec<String> = (0..8)
        .map(|i| gw.url(if i % 2 == 0 { "/v1/models/a" } else { "/v1/b" }))
        .collect();
    assert!(concurrent_clients(urls, 3)
        .await
        .iter()
        .all(|c| *c == StatusCode::OK));
    let max = meter.max.load(Ordering::SeqCst);
    assert_eq!(max, 2, "two paths under /v1/* share its capacity of 2");
    let s = stats(&gw).await;
    assert_eq!(s["endpoints"]["/v1/*"]["admitted"], 24, "{s}");
    assert_eq!(s["endpoints"]["/v1/exact"]["admitted"], 0);
    // The exact key wins over the pattern.
    assert_eq!(get_status(&gw.url("/v1/exact")).await.0, StatusCode::OK);
    let s = stats(&gw).await;
    assert_eq!(s["endpoints"]["/v1/exact"]["admitted"], 1);
    assert_eq!(s["endpoints"]["/v1/*"]["admitted"], 24);
}
