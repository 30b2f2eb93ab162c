//! Config reload (SIGHUP and `POST /balancer/reload`) against real backends: a steady load
//! through ten reloads that change the upstream set and the capacity loses no request and
//! gets the new capacity within a second; an invalid reload keeps the old config and names
//! the field; SIGHUP reloads and the process lives on; credentials, pool settings and the
//! log level change live; fields that need a restart are reported, not applied.

mod support;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::gateway_process::GatewayProcess;
use support::temp_dir::TempDir;
use support::{backend, client, Server, TestGateway};

const USER: &str = "ops";
const PASS: &str = "reload-secret";

/// The in-flight requests across every backend, and the highest value seen since the last
/// `take_peak`.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    fn take_peak(&self) -> usize {
        self.peak
            .swap(self.now.load(Ordering::SeqCst), Ordering::SeqCst)
    }
}

/// A backend with `/healthz` and `POST /work` (10 ms), counting into `c` and `served`.
async fn work_backend(c: Arc<Concurrency>, served: Arc<AtomicU64>) -> Server {
    backend(
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/work",
                post(move || {
                    let (c, served) = (c.clone(), served.clone());
                    async move {
                        let n = c.now.fetch_add(1, Ordering::SeqCst) + 1;
                        c.peak.fetch_max(n, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        c.now.fetch_sub(1, Ordering::SeqCst);
                        served.fetch_add(1, Ordering::Relaxed);
                        "done"
                    }
                }),
            ),
    )
    .await
}

/// `POST <url>` with `{}`: the status.
async fn post_work(url: &str) -> StatusCode {
    let resp = client()
        .request(Request::post(url).body(Body::from("{}")).unwrap())
        .await
        .expect("the gateway answers");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    )
}

/// `POST /balancer/reload` with the operator's credentials: status and JSON body.
async fn post_reload(url: &str, auth: &str) -> (StatusCode, serde_json::Value) {
    let resp = client()
        .request(
            Request::post(url)
                .header("authorization", auth)
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .expect("the reload route answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

async fn get_json(url: &str, auth: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut req = Request::get(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = client()
        .request(req.body(Body::empty()).unwrap())
        .await
        .expect("answers");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn config(upstreams: &[&Server], capacity: usize) -> String {
    let list: String = upstreams
        .iter()
        .map(|s| format!("  - {{url: \"{}\"}}\n", s.url()))
        .collect();
    format!(
        "upstreams:\n{list}health_endpoint: /healthz\nhealth_check_interval: 0.2\n\
         health_check_timeout: 1\nrecovery_threshold: 1\nqueue_timeout: 30\n\
         ui: {{username: {USER}, password: {PASS}}}\n\
         endpoints:\n  /work: {{method: POST, capacity: {capacity}}}\n"
    )
}

fn sighup(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -HUP {pid}");
}

/// The gateway's stats until `pred` holds (at most 10 s).
async fn stats_until(
    gw: &GatewayProcess,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, s) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
        if status == StatusCode::OK && pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen; stats {s}\nlog:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_a_64_client_load_fail_no_request_and_apply_the_new_capacity() {
    let c = Arc::new(Concurrency::default());
    let served = Arc::new(AtomicU64::new(0));
    let a = work_backend(c.clone(), served.clone()).await;
    let b = work_backend(c.clone(), served.clone()).await;
    let d = work_backend(c.clone(), served.clone()).await;
    let gw = GatewayProcess::start("reload-load", &config(&[&a, &b], 4)).await;
    let pid = gw.pid().expect("running");

    // 64 clients, each on its own keep-alive connection, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_failure = Arc::new(std::sync::OnceLock::<String>::new());
    let url = gw.url("/work");
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (stop, ok, failed, first_failure, url) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                first_failure.clone(),
                url.clone(),
            );
            tokio::spawn(async move {
                let http = client();
                // Bounded: the test stops the loop, and no run goes past 120 s.
                let limit = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    let req = Request::post(&url).body(Body::from("{}")).unwrap();
                    match http.request(req).await {
                        Ok(resp) if resp.status() == StatusCode::OK => {
                            let _ = resp.into_body().collect().await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                            let _ = first_failure.set(format!("{status} {body:?}"));
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let _ = first_failure.set(format!("transport: {e}"));
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    // Ten reloads, alternating the route and SIGHUP, each changing the upstream set (one
    // replica always stays, one joins) and the capacity.
    let sets: [[&Server; 2]; 3] = [[&b, &d], [&d, &a], [&a, &b]];
    let capacities = [12, 3, 8, 5, 10, 2, 7, 4, 9, 6];
    let mut peaks = Vec::new();
    for (i, &capacity) in capacities.iter().enumerate() {
        let set = sets[i % 3];
        gw.rewrite_config(&config(&set, capacity));
        let generation = i as u64 + 2;
        if i % 2 == 0 {
            let (status, body) = post_reload(&gw.url("/balancer/reload"), &basic()).await;
            assert_eq!(status, StatusCode::OK, "reload {i}: {body}");
            assert_eq!(body["config_generation"], generation, "{body}");
        } else {
            sighup(pid);
            stats_until(&gw, "the SIGHUP reload", |s| {
                s["config_generation"] == generation
            })
            .await;
        }
        let stats = stats_until(&gw, "the new upstream set", |s| {
            let urls: Vec<_> = s["upstreams"]
                .as_array()
                .map(|u| u.iter().filter_map(|u| u["url"].as_str()).collect())
                .unwrap_or_default();
            urls.len() == 2 && set.iter().all(|b| urls.contains(&b.url().as_str()))
        })
        .await;
        assert_eq!(stats["endpoints"]["/work"]["capacity"], capacity, "{stats}");
        // Within a second of the reload the old generation's extra requests have ended:
        // from then on the backends never see more than the new capacity.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.take_peak();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let peak = c.take_peak();
        peaks.push(peak);
        assert!(
            peak <= capacity,
            "reload {i}: {peak} requests in flight at the backends with capacity {capacity}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} failed requests (first: {:?}); {ok} ok\nlog:\n{}",
        first_failure.get(),
        gw.log()
    );
    assert!(ok > 1000, "the load ran: {ok} requests");
    // Under the load the capacity was used, not only respected.
    assert!(peaks.iter().any(|&p| p >= 2), "peaks {peaks:?}");
    let (_, stats) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
    assert_eq!(stats["config_generation"], 11, "{stats}");
    assert_eq!(stats["reloads_failed"], 0, "{stats}");
    assert_eq!(stats["last_reload"]["ok"], true, "{stats}");
    assert!(gw.log().contains("config reloaded"), "{}", gw.log());
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_killing_the_process_and_changes_the_log_level() {
    let c = Arc::new(Concurrency::default());
    let served = Arc::new(AtomicU64::new(0));
    let a = work_backend(c.clone(), served.clone()).await;
    let gw = GatewayProcess::start("reload-sighup", &config(&[&a], 4)).await;
    let pid = gw.pid().expect("running");

    // A change that needs a restart is reported and not applied, the rest applies.
    gw.rewrite_config(&format!("{}max_connections: 77\n", config(&[&a], 6)));
    sighup(pid);
    let stats = stats_until(&gw, "generation 2", |s| s["config_generation"] == 2).await;
    assert_eq!(stats["endpoints"]["/work"]["capacity"], 6, "{stats}");
    assert_eq!(stats["last_reload"]["ok"], true, "{stats}");
    assert_eq!(
        stats["last_reload"]["needs_restart"],
        serde_json::json!(["max_connections"]),
        "{stats}"
    );
    let log = gw.log();
    assert!(log.contains("config reloaded"), "{log}");
    assert!(log.contains("need a restart"), "{log}");

    // To `warn`: it applies before the reload's own info line, which is not written.
    let before = gw.log().matches("config reloaded").count();
    gw.rewrite_config(&format!("{}log_level: warn\n", config(&[&a], 9)));
    sighup(pid);
    let stats = stats_until(&gw, "generation 3", |s| s["config_generation"] == 3).await;
    assert_eq!(stats["endpoints"]["/work"]["capacity"], 9, "{stats}");
    assert_eq!(
        gw.log().matches("config reloaded").count(),
        before,
        "{}",
        gw.log()
    );

    // Still serving after the signals.
    assert_eq!(post_work(&gw.url("/work")).await, StatusCode::OK);
    // Back to info: the info line returns.
    gw.rewrite_config(&config(&[&a], 9));
    sighup(pid);
    stats_until(&gw, "generation 4", |s| s["config_generation"] == 4).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.log().matches("config reloaded").count() == before {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-process gateway over `yaml`, re-reading `dir/gw.yml`.
async fn in_process(dir: &TempDir, yaml: &str) -> TestGateway {
    let path = dir.path().join("gw.yml");
    std::fs::write(&path, yaml).unwrap();
    let gw = TestGateway::start(yaml).await;
    gw.gateway.set_config_file(&path);
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config_and_names_the_field() {
    let c = Arc::new(Concurrency::default());
    let served = Arc::new(AtomicU64::new(0));
    let a = work_backend(c.clone(), served.clone()).await;
    let dir = TempDir::new("reload-invalid");
    let gw = in_process(&dir, &config(&[&a], 4)).await;
    let reload = gw.url("/balancer/reload");

    // Invalid: a bad field value, then a file that does not parse, then no upstreams.
    let cases = [
        (
            config(&[&a], 4).replace("recovery_threshold: 1", "recovery_threshold: -3"),
            "recovery_threshold",
        ),
        (
            config(&[&a], 4).replace("capacity: 4", "capacity: 0"),
            "endpoints./work.capacity",
        ),
        (
            format!("{}unknown_key: 1\n", config(&[&a], 4)),
            "unknown_key",
        ),
        ("listen: 127.0.0.1:1\n".to_owned(), "upstreams"),
    ];
    for (n, (yaml, field)) in cases.iter().enumerate() {
        std::fs::write(dir.path().join("gw.yml"), yaml).unwrap();
        let (status, body) = post_reload(&reload, &basic()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert_eq!(body["error"], "invalid_config", "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field} not named: {message}");
        let (_, stats) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
        assert_eq!(stats["reloads_failed"], n as u64 + 1, "{stats}");
        assert_eq!(stats["config_generation"], 1, "{stats}");
        assert_eq!(stats["last_reload"]["ok"], false, "{stats}");
        assert_eq!(stats["endpoints"]["/work"]["capacity"], 4, "{stats}");
    }
    // The old config still serves.
    assert_eq!(post_work(&gw.url("/work")).await, StatusCode::OK);
    // No credentials: refused before anything is read.
    let (status, _) = post_reload(&reload, "Basic bm9wZTpub3Bl").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The password never reaches a reload message or the stats.
    let (_, stats) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
    assert!(!stats.to_string().contains(PASS), "{stats}");

    // A valid reload with new credentials: the old ones stop working at once.
    std::fs::write(
        dir.path().join("gw.yml"),
        config(&[&a], 5).replace(PASS, "rotated-secret"),
    )
    .unwrap();
    let (status, body) = post_reload(&reload, &basic()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["config_generation"], 2);
    let applied = body["applied"].as_array().unwrap();
    assert!(applied.contains(&"ui".into()), "{body}");
    assert!(applied.contains(&"endpoints".into()), "{body}");
    let (status, _) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let rotated = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:rotated-secret"))
    );
    let (status, stats) = get_json(&gw.url("/balancer/stats"), Some(&rotated)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["endpoints"]["/work"]["capacity"], 5, "{stats}");
    assert_eq!(stats["last_reload"]["ok"], true, "{stats}");
    assert_eq!(stats["reloads_failed"], 4, "{stats}");
    let (_, metrics) = {
        let resp = client()
            .request(
                Request::get(gw.url("/metrics"))
                    .header("authorization", &rotated)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert!(
        metrics.contains("portcullis_config_generation 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_reloads_failed_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_last_reload_success 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_pool_settings_keeps_serving_and_applies_them() {
    let c = Arc::new(Concurrency::default());
    let served = Arc::new(AtomicU64::new(0));
    let a = work_backend(c.clone(), served.clone()).await;
    let b = work_backend(c.clone(), served.clone()).await;
    let dir = TempDir::new("reload-pool");
    let yaml = config(&[&a, &b], 8);
    let gw = in_process(&dir, &yaml).await;
    assert_eq!(
        gw.gateway.registry().strategy(),
        portcullis::balance::RoutingStrategy::P2c
    );
    // New routing strategy and thresholds: a new pool with the same replicas.
    std::fs::write(
        dir.path().join("gw.yml"),
        format!("{yaml}routing_strategy: round-robin\nfailure_threshold: 7\n"),
    )
    .unwrap();
    let report = gw.gateway.reload_from_file().await.expect("applied");
    assert_eq!(report.config_generation, 2);
    assert!(report.applied.contains(&"balance".to_owned()), "{report:?}");
    assert_eq!(
        gw.gateway.registry().strategy(),
        portcullis::balance::RoutingStrategy::RoundRobin
    );
    assert_eq!(gw.gateway.config().balance.failure_threshold, 7);
    // Both replicas are healthy in the new pool at once, and round-robin alternates them.
    let before = served.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(post_work(&gw.url("/work")).await, StatusCode::OK);
    }
    assert_eq!(served.load(Ordering::Relaxed) - before, 20);
    let snapshot = gw.gateway.registry().snapshot();
    assert!(snapshot.replicas.iter().all(|r| r.healthy), "{snapshot:?}");
    let (_, stats) = get_json(&gw.url("/balancer/stats"), Some(&basic())).await;
    let requests: Vec<u64> = stats["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["requests"].as_u64().unwrap())
        .collect();
    assert!(
        requests.iter().all(|&r| r >= 10),
        "round-robin split: {requests:?}"
    );

    // A gateway built in code with no config file: the route says there is nothing to read.
    let bare = TestGateway::start(&yaml).await;
    let (status, body) = post_reload(&bare.url("/balancer/reload"), &basic()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "reload_unavailable");
}
