//! Behaviours an operator relies on, through the whole gateway against real axum backends on
//! 127.0.0.1: an upstream path prefix kept on every request and on the health check, a
//! passive ejection that good health checks do not undo, the breaker's route chosen after the
//! admission queue, the forced breaker check counted as primary evidence, the `Retry-After`
//! of the 503s, and a replica added at run time that waits for its first good health check.

mod support;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::http::StatusCode;
use axum::Router;
use http::Request;
use http_body_util::BodyExt;
use portcullis_testkit::eventually_async;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{backend, client, Server, TestGateway};

/// What a recording backend saw and how it answers.
#[derive(Default)]
struct Seen {
    /// Every request's path and query, in arrival order.
    paths: Mutex<Vec<String>>,
    /// `/…/healthz` answers 503 while set.
    sick: AtomicBool,
    /// Every other path answers 500 while set.
    failing: AtomicBool,
    /// Requests other than health checks.
    hits: AtomicUsize,
}

impl Seen {
    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

/// A backend answering `name` to everything (after `delay` for paths containing `slow`),
/// recording each request's path and query.
async fn recording(name: &'static str, delay: Duration) -> (Server, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let app = Router::new().fallback(move |req: AxumRequest| {
        let s = s.clone();
        async move {
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
            s.paths.lock().unwrap().push(pq.clone());
            if pq.ends_with("/healthz") {
                if s.sick.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, name);
                }
                return (StatusCode::OK, name);
            }
            s.hits.fetch_add(1, Ordering::SeqCst);
            if pq.contains("slow") {
                tokio::time::sleep(delay).await;
            }
            if s.failing.load(Ordering::SeqCst) {
                return (StatusCode::INTERNAL_SERVER_ERROR, name);
            }
            (StatusCode::OK, name)
        }
    });
    (backend(app).await, seen)
}

/// Sends `req`; the status, headers and body text.
async fn send(req: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn get(url: &str) -> (StatusCode, http::HeaderMap, String) {
    send(Request::get(url).body(Body::empty()).unwrap()).await
}

async fn json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get(url).await.2).unwrap_or_default()
}

/// The `/balancer/stats` entry of the upstream `url`.
async fn upstream_stats(gw: &TestGateway, url: &str) -> serde_json::Value {
    let stats = json(&gw.url("/balancer/stats")).await;
    stats["upstreams"]
        .as_array()
        .and_then(|all| all.iter().find(|u| u["url"] == url).cloned())
        .unwrap_or_else(|| panic!("{url} not in {stats}"))
}

fn upstreams_yaml(upstreams: &[(String, bool)]) -> String {
    let mut y = String::from("upstreams:\n");
    for (url, primary) in upstreams {
        y.push_str(&format!("  - {{url: \"{url}\", primary: {primary}}}\n"));
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_path_prefix_is_kept_for_every_request_and_the_health_check() {
    let (a, seen_a) = recording("a", Duration::ZERO).await;
    let (b, seen_b) = recording("b", Duration::ZERO).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\nrouting_strategy: round-robin\n{}",
        upstreams_yaml(&[
            (format!("{}/prefix", a.url()), true),
            // A trailing slash is the same prefix.
            (format!("{}/deep/er/", b.url()), true),
        ])
    ))
    .await;
    let requests = ["/", "/x", "/x/y/", "/q?a=1&b=two", "/healthz-not"];
    for path in requests {
        for _ in 0..2 {
            let (status, _, _) = get(&gw.url(path)).await;
            assert_eq!(status, StatusCode::OK, "{path}");
        }
    }
    for _ in 0..2 {
        let post = Request::post(gw.url("/submit?id=7"))
            .body(Body::from("body"))
            .unwrap();
        assert_eq!(send(post).await.0, StatusCode::OK);
    }
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            seen_a.paths().contains(&"/prefix/healthz".to_owned())
                && seen_b.paths().contains(&"/deep/er/healthz".to_owned())
        })
        .await,
        "both health checks seen: not within 5s"
    );
    for (seen, prefix) in [(&seen_a, "/prefix"), (&seen_b, "/deep/er")] {
        let paths = seen.paths();
        for p in &paths {
            assert!(p.starts_with(&format!("{prefix}/")), "{p} lost {prefix}");
        }
        // Round robin over two replicas: every request path reached each of them once.
        for path in requests.iter().chain(&["/submit?id=7"]) {
            let want = format!("{prefix}{path}");
            assert!(paths.contains(&want), "{want} not in {paths:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_ejection_outlasts_passing_health_checks() {
    let (a, seen_a) = recording("a", Duration::ZERO).await;
    let (b, _) = recording("b", Duration::ZERO).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\nrecovery_threshold: 2\n\
         routing_strategy: first-healthy\neject_after: 1\neject_for: 30\n{}",
        upstreams_yaml(&[(a.url(), true), (b.url(), true)])
    ))
    .await;
    assert_eq!(get(&gw.url("/work")).await.2, "a");
    // `a` keeps answering its health check but fails one live request: ejected for 30 s.
    seen_a.failing.store(true, Ordering::SeqCst);
    assert_eq!(
        get(&gw.url("/work")).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let hits = seen_a.hits.load(Ordering::SeqCst);
    // Twenty check intervals later (ten times recovery_threshold), it is still out.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(get(&gw.url("/work")).await.2, "b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen_a.hits.load(Ordering::SeqCst),
        hits,
        "no request reached a"
    );
    let checks = seen_a.paths().iter().filter(|p| *p == "/healthz").count();
    assert!(checks >= 10, "only {checks} health checks of a");
    let a_stats = upstream_stats(&gw, &a.url()).await;
    assert_eq!(a_stats["status"], "ejected", "{a_stats}");
    assert_eq!(a_stats["ejected"], true);
    assert!(
        a_stats["ejected_for_seconds"].as_f64().unwrap() > 25.0,
        "{a_stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_for_admission_follows_the_breaker_of_when_it_is_sent() {
    let (primary, seen_p) = recording("primary", Duration::from_millis(1500)).await;
    let (fallback, _) = recording("fallback", Duration::ZERO).await;
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\neject_after: 0\nqueue_timeout: 20\n\
         endpoints:\n  /slow: {{capacity: 1}}\n\
         fallback: {{url: \"{}\", failure_threshold: 2, recheck_interval: 60, min_fallback_duration: 60}}\n{}",
        fallback.url(),
        upstreams_yaml(&[(primary.url(), true)])
    ))
    .await;
    // The first request holds the only slot for 1.5 s; the second waits for it.
    let url = gw.url("/slow");
    let first = tokio::spawn(async move { get(&url).await });
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            seen_p.hits.load(Ordering::SeqCst) == 1
        })
        .await,
        "the first request is in: not within 5s"
    );
    let url = gw.url("/slow");
    let second = tokio::spawn(async move { get(&url).await });
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            json(&gw.url("/balancer/stats")).await["endpoints"]["/slow"]["queue_depth"] == 1
        })
        .await,
        "the second request is queued: not within 5s"
    );
    // Meanwhile the primary fails twice on an unwatched path: the breaker trips.
    seen_p.failing.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(
            get(&gw.url("/other")).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(
        json(&gw.url("/balancer/stats")).await["fallback"]["engaged"],
        true
    );
    first.await.unwrap();
    let (status, _, body) = second.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "fallback"));
    assert_eq!(
        seen_p.hits.load(Ordering::SeqCst),
        3,
        "the queued request skipped the primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forced_breaker_check_counts_as_a_primary_failure() {
    let (fallback, _) = recording("fallback", Duration::ZERO).await;
    let dead = format!("http://127.0.0.1:{}", support::closed_port().await);
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nfallback: {{url: \"{}\", failure_threshold: 3, probe_max_retries: 0, \
         recheck_interval: 60}}\n{}",
        fallback.url(),
        upstreams_yaml(&[(dead, true)])
    ))
    .await;
    let check = async || {
        let req = Request::post(gw.url("/balancer/fallback/check"))
            .header("content-type", "application/json")
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    for n in 1..=2 {
        let report = check().await;
        assert_eq!(report["primary"]["healthy"], false, "{report}");
        assert_eq!(report["fallback"]["healthy"], true, "{report}");
        assert_eq!(report["state"], "normal");
        assert_eq!(report["consecutive_failures"], n);
        assert_eq!(report["counters"]["primary_failures"], n, "{report}");
        assert_eq!(report["counters"]["forced_checks"], n);
    }
    // The third failed check trips the breaker, as a third failed request would.
    let report = check().await;
    assert_eq!(report["state"], "fallback", "{report}");
    assert_eq!(report["counters"]["primary_failures"], 3);
    assert_eq!(get(&gw.url("/x")).await.2, "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_503s_carry_the_documented_retry_after() {
    let (be, seen) = recording("be", Duration::ZERO).await;
    seen.sick.store(true, Ordering::SeqCst);
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 1.5\nfailure_threshold: 1\n\
         endpoints:\n  /work: {{capacity: 2}}\n{}",
        upstreams_yaml(&[(be.url(), true)])
    ))
    .await;
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            upstream_stats(&gw, &be.url()).await["healthy"] == false
        })
        .await,
        "the upstream is marked down: not within 5s"
    );
    // An unwatched path: the next health check is the soonest a replica can return,
    // health_check_interval rounded up to whole seconds.
    let (status, headers, body) = get(&gw.url("/other")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no_healthy_upstream"), "{body}");
    assert_eq!(headers["retry-after"], "2");
    // A watched endpoint refuses before queueing: 1 s.
    let (status, headers, body) = get(&gw.url("/work")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("backend_unhealthy"), "{body}");
    assert_eq!(headers["retry-after"], "1");
}

const AUTH: &str = "Basic b3BzOnB3"; // ops:pw

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_at_run_time_gets_traffic_only_after_its_first_good_check() {
    let (old, _) = recording("old", Duration::ZERO).await;
    let (new, seen_new) = recording("new", Duration::ZERO).await;
    // Still starting: its health check fails.
    seen_new.sick.store(true, Ordering::SeqCst);
    let gw = TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.1\nfailure_threshold: 3\n\
         recovery_threshold: 3\nrouting_strategy: round-robin\nupstream_admin: true\n\
         ui: {{username: ops, password: pw}}\nupstream_admin_allow: [127.0.0.0/8]\n{}",
        upstreams_yaml(&[(old.url(), true)])
    ))
    .await;
    let add = Request::post(gw.url("/balancer/upstreams"))
        .header("authorization", AUTH)
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"url": "{}", "primary": true}}"#,
            new.url()
        )))
        .unwrap();
    assert_eq!(send(add).await.0, StatusCode::CREATED);
    let stats = async || {
        let req = Request::get(gw.url("/balancer/stats"))
            .header("authorization", AUTH)
            .body(Body::empty())
            .unwrap();
        let all: serde_json::Value = serde_json::from_str(&send(req).await.2).unwrap();
        all["upstreams"]
            .as_array()
            .and_then(|u| u.iter().find(|u| u["url"] == new.url()).cloned())
            .unwrap()
    };
    let s = stats().await;
    assert_eq!(
        (s["status"].as_str(), s["healthy"].as_bool()),
        (Some("unknown"), Some(false)),
        "{s}"
    );
    // Round robin over two primaries, but the unchecked one gets nothing.
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/work")).await.2, "old");
    }
    assert_eq!(seen_new.hits.load(Ordering::SeqCst), 0);
    // One good check (of recovery_threshold 3) lets it in.
    seen_new.sick.store(false, Ordering::SeqCst);
    assert!(
        eventually_async(Duration::from_secs(5), async || {
            get(&gw.url("/work")).await.2 == "new"
        })
        .await,
        "the new replica is served: not within 5s"
    );
    assert_eq!(stats().await["status"], "healthy");
}
