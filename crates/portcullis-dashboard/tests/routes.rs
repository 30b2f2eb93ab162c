//! Every operator route over a real axum server on 127.0.0.1: statuses, bodies, headers,
//! Basic auth, the committed JSON schema, and the Prometheus exposition parsed by a
//! Prometheus text parser.

mod support;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_dashboard::{auth_mode, router, AuthMode, Stats, UiConfig};
use portcullis_health::HealthRegistry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::{sample_stats, serve};

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }
}

async fn get(addr: SocketAddr, path: &str, auth: Option<(&str, &str)>) -> Reply {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some((u, p)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header(header::AUTHORIZATION, format!("Basic {token}"));
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn schema() -> jsonschema::Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/stats.schema.json");
    let text = std::fs::read_to_string(path).expect("docs/stats.schema.json is committed");
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::draft202012::new(&schema).expect("a valid draft 2020-12 schema")
}

fn assert_valid(v: &jsonschema::Validator, doc: &serde_json::Value) {
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema errors: {errors:#?}\n{doc:#}");
}

#[tokio::test]
async fn stats_document_is_live_and_matches_the_committed_schema() {
    let active = Arc::new(AtomicU64::new(6));
    let a = active.clone();
    let registry = HealthRegistry::new();
    let app = router(
        &UiConfig::default(),
        move || sample_stats(a.load(Ordering::SeqCst), 3),
        &registry,
    );
    let (addr, _server) = serve(app).await;

    let r = get(addr, "/balancer/stats", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
    let doc = r.json();
    let v = schema();
    assert_valid(&v, &doc);
    // The core shape (capacity, active, available per endpoint) is still there.
    assert_eq!(doc["endpoints"]["/work"]["capacity"], 8);
    assert_eq!(doc["endpoints"]["/work"]["active_requests"], 6);
    assert_eq!(doc["endpoints"]["/work"]["available_slots"], 2);
    assert_eq!(doc["endpoints"]["/work"]["queue_depth"], 3);
    assert_eq!(doc["upstreams"][1]["ejected"], true);
    assert_eq!(doc["upstreams"][0]["tier"], "primary");
    assert_eq!(doc["fallback"]["state"], "half_open");
    assert_eq!(doc["storage"]["kind"], "redis");
    assert_eq!(
        doc["health"],
        serde_json::json!({"live": true, "ready": true, "failing": []})
    );

    // Live: the next request sees the new numbers, and the registry's readiness.
    active.store(8, Ordering::SeqCst);
    registry.register("startup");
    let doc = get(addr, "/balancer/stats", None).await.json();
    assert_eq!(doc["endpoints"]["/work"]["active_requests"], 8);
    assert_eq!(doc["endpoints"]["/work"]["available_slots"], 0);
    assert_eq!(doc["health"]["ready"], false);
    assert_eq!(doc["health"]["failing"], serde_json::json!(["startup"]));
    assert_valid(&v, &doc);

    // A gateway with nothing configured yet is valid too (fallback null, no upstreams).
    let empty = serde_json::to_value(Stats::new("0.1.0", std::time::Duration::ZERO)).unwrap();
    assert_valid(&v, &empty);
    assert!(empty["fallback"].is_null());

    // The schema is not vacuous: it rejects a broken document.
    let mut broken = doc.clone();
    broken["endpoints"]["/work"]
        .as_object_mut()
        .unwrap()
        .remove("capacity");
    assert!(!v.is_valid(&broken));
    let mut broken = doc.clone();
    broken["upstreams"][0]["tier"] = "tertiary".into();
    assert!(!v.is_valid(&broken));
    let mut broken = doc;
    broken["endpoints"]["/work"]["active_requests"] = (-1).into();
    assert!(!v.is_valid(&broken));
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_with_stable_names() {
    let registry = HealthRegistry::new();
    let app = router(&UiConfig::default(), || sample_stats(6, 3), &registry);
    let (addr, _server) = serve(app).await;
    let r = get(addr, "/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for s in &scrape.samples {
        assert!(
            s.metric.starts_with("portcullis_"),
            "unprefixed metric {}",
            s.metric
        );
    }
    let find = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .unwrap_or_else(|| panic!("no sample {name}{{{}={}}} in\n{text}", label.0, label.1))
    };
    let value = |v: &prometheus_parse::Value| match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        other => panic!("not a scalar: {other:?}"),
    };
    let ep = ("endpoint", "/work");
    assert_eq!(value(&find("portcullis_endpoint_capacity", ep).value), 8.0);
    assert_eq!(
        value(&find("portcullis_endpoint_active_requests", ep).value),
        6.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_available_slots", ep).value),
        2.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_queue_depth", ep).value),
        3.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_queue_timeout_seconds", ep).value),
        30.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_admitted_total", ep).value),
        157.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_rejected_503_total", ep).value),
        2.0
    );
    assert_eq!(
        value(&find("portcullis_endpoint_timed_out_504_total", ep).value),
        1.0
    );
    let up = ("upstream", "http://10.0.0.12:8000");
    assert_eq!(value(&find("portcullis_upstream_ejected", up).value), 1.0);
    assert_eq!(value(&find("portcullis_upstream_healthy", up).value), 0.0);
    assert_eq!(
        find("portcullis_upstream_inflight", up).labels.get("tier"),
        Some("primary")
    );
    assert!(
        (value(&find("portcullis_upstream_probe_latency_seconds", up).value) - 0.812).abs() < 1e-9
    );
    assert_eq!(
        value(&find("portcullis_upstream_failures_total", up).value),
        6.0
    );
    let fb = ("fallback", "http://fallback.internal:9000");
    assert_eq!(value(&find("portcullis_fallback_engaged", fb).value), 1.0);
    assert_eq!(
        value(&find("portcullis_fallback_trips_total", fb).value),
        1.0
    );
    assert_eq!(
        value(&find("portcullis_storage_healthy", ("kind", "redis")).value),
        1.0
    );
    assert_eq!(
        value(&find("portcullis_build_info", ("version", "0.1.0")).value),
        1.0
    );

    // Histograms: cumulative buckets ending with +Inf == _count.
    let wait = find("portcullis_endpoint_queue_wait_seconds", ep);
    let prometheus_parse::Value::Histogram(buckets) = &wait.value else {
        panic!("queue wait is not a histogram: {:?}", wait.value)
    };
    assert_eq!(buckets.len(), 15);
    assert_eq!(buckets[0].less_than, 0.0005);
    assert_eq!(buckets[0].count, 120.0);
    assert_eq!(buckets[4].count, 150.0, "cumulative");
    let inf = buckets.last().unwrap();
    assert!(inf.less_than.is_infinite());
    assert_eq!(inf.count, 157.0);
    assert!(text.contains("portcullis_endpoint_queue_wait_seconds_count{endpoint=\"/work\"} 157"));
    assert!(text.contains("portcullis_endpoint_queue_wait_seconds_sum{endpoint=\"/work\"} 42.5"));
    let lat = find("portcullis_upstream_request_duration_seconds", up);
    let prometheus_parse::Value::Histogram(buckets) = &lat.value else {
        panic!("upstream latency is not a histogram")
    };
    assert_eq!(
        buckets.iter().map(|b| b.count).collect::<Vec<_>>(),
        [10.0, 90.0, 150.0, 153.0, 154.0]
    );
}

#[tokio::test]
async fn basic_auth_guards_ui_stats_and_metrics_but_never_probes() {
    let ui = UiConfig {
        username: Some("admin".into()),
        password: Some("correct horse".into()),
        ..UiConfig::default()
    };
    assert_eq!(auth_mode(&ui), AuthMode::Basic);
    let registry = HealthRegistry::new();
    let (addr, _server) = serve(router(&ui, || sample_stats(1, 0), &registry)).await;

    for path in [
        "/balancer/ui",
        "/balancer/stats",
        "/balancer/stats/history",
        "/metrics",
    ] {
        for creds in [
            None,
            Some(("admin", "wrong")),
            Some(("Admin", "correct horse")),
            Some(("admin", "")),
        ] {
            let r = get(addr, path, creds).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} {creds:?}");
            assert_eq!(
                r.headers[header::WWW_AUTHENTICATE],
                "Basic realm=\"portcullis\", charset=\"UTF-8\""
            );
            assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(r.json()["error"], "unauthorized");
            assert!(!r.text().contains("correct horse"));
        }
        let r = get(addr, path, Some(("admin", "correct horse"))).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(addr, path, None).await.status,
            StatusCode::OK,
            "{path} needs no auth"
        );
    }

    // Without credentials everything is open.
    let open = UiConfig::default();
    assert_eq!(auth_mode(&open), AuthMode::Open);
    assert_eq!(portcullis_dashboard::log_auth_mode(&open), AuthMode::Open);
    let (addr, _server) = serve(router(&open, || sample_stats(1, 0), &registry)).await;
    for path in ["/balancer/ui", "/balancer/stats", "/metrics"] {
        let r = get(addr, path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(r.headers.get(header::WWW_AUTHENTICATE).is_none());
    }
}

#[tokio::test]
async fn ui_page_is_self_contained_and_its_path_configurable() {
    let registry = HealthRegistry::new();
    let (addr, _server) = serve(router(
        &UiConfig::default(),
        || sample_stats(1, 0),
        &registry,
    ))
    .await;
    let r = get(addr, "/balancer/ui", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(r.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .contains("connect-src 'self'"));
    let html = r.text();
    assert!(html.contains(r#"<meta name="portcullis-stats" content="/balancer/stats">"#));
    assert!(!html.contains("{{"), "template filled");
    assert!(
        !html.contains("://"),
        "no external URL (CDN, fonts) in the page"
    );
    assert!(html.contains("<canvas"));

    // A custom path moves the page; the default path is gone.
    let ui = UiConfig {
        path: "/ops/dashboard".into(),
        ..UiConfig::default()
    };
    let (addr, _server) = serve(router(&ui, || sample_stats(1, 0), &registry)).await;
    assert_eq!(
        get(addr, "/ops/dashboard", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/balancer/ui", None).await.status,
        StatusCode::NOT_FOUND
    );

    // `enable: false` removes the page, not the stats.
    let ui = UiConfig {
        enable: false,
        ..UiConfig::default()
    };
    let (addr, _server) = serve(router(&ui, || sample_stats(1, 0), &registry)).await;
    assert_eq!(
        get(addr, "/balancer/ui", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(addr, "/balancer/stats", None).await.status,
        StatusCode::OK
    );
    assert_eq!(get(addr, "/metrics", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn probes_in_the_router_follow_the_registry() {
    let registry = HealthRegistry::new();
    let (addr, _server) = serve(router(
        &UiConfig::default(),
        || sample_stats(0, 0),
        &registry,
    ))
    .await;
    let r = get(addr, "/readyz", None).await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    );

    let storage = registry.register_ready("storage");
    storage.set_ready(false);
    let r = get(addr, "/readyz", None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json(),
        serde_json::json!({"status": "not_ready", "failing": ["storage"]})
    );
    assert_eq!(get(addr, "/healthz", None).await.status, StatusCode::OK);

    storage.set_wedged(true);
    let r = get(addr, "/healthz", None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json(),
        serde_json::json!({"status": "wedged", "failing": ["storage"]})
    );
    let m = get(addr, "/metrics", None).await.text();
    assert!(m.contains("portcullis_ready 0"), "{m}");
    assert!(m.contains("portcullis_live 0"));
}

/// `/balancer/stats/history` keeps what the source reported, one sample per interval, with
/// ages (oldest first), and the router's sampler stops with the router.
#[tokio::test(start_paused = true)]
async fn history_keeps_the_last_minute_of_each_endpoint() {
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let source = move || {
        // active 1, 2, 3, ... on successive samples
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        sample_stats(n.min(8), 0)
    };
    let app = router(&UiConfig::default(), source, &HealthRegistry::new());
    let svc = app.clone();
    // Three sampling intervals: samples at 0 s, 2 s, 4 s.
    for _ in 0..3 {
        tokio::task::yield_now().await;
        tokio::time::advance(portcullis_dashboard::history::HISTORY_INTERVAL).await;
    }
    tokio::task::yield_now().await;
    let resp = tower::ServiceExt::oneshot(
        svc,
        Request::get("/balancer/stats/history")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let samples = doc["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{doc}");
    let actives: Vec<u64> = samples
        .iter()
        .map(|s| s["endpoints"]["/work"]["active"].as_u64().unwrap())
        .collect();
    assert!(
        actives.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {actives:?}"
    );
    assert_eq!(samples[0]["endpoints"]["/work"]["capacity"], 8);
    let ages: Vec<f64> = samples
        .iter()
        .map(|s| s["age_seconds"].as_f64().unwrap())
        .collect();
    assert!(ages.windows(2).all(|w| w[0] > w[1]), "ages: {ages:?}");
    assert!(ages[0] <= 60.0);

    // Dropping the router stops the sampler: the source is not asked again.
    drop(app);
    tokio::task::yield_now().await;
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        tokio::time::advance(portcullis_dashboard::history::HISTORY_INTERVAL).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
}
