//! The prober against real axum backends on 127.0.0.1 with a known knee K.

mod support;

use portcullis_probe::{
    ProbeBound, ProbeConfig, ProbeError, ProbeEvent, ProbeReport, ProbeTarget, Prober, Schedule,
};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{spawn, spawn_with, PastKnee};

const BASE: Duration = Duration::from_millis(5);
/// Extra latency past the knee. A past-knee request sleeps `base + PENALTY`, so it is slower
/// than the threshold below on any machine; the margin that noise can eat is on the passing
/// side, which is why the threshold sits well above the base and the penalty above that.
const PENALTY: Duration = Duration::from_millis(1000);
/// Every test body is bounded by this.
const TEST_LIMIT: Duration = Duration::from_secs(25);

fn config() -> ProbeConfig {
    ProbeConfig {
        // Far above the base latency (5-50 ms), so scheduling noise on a busy machine does not
        // fail a passing level: on two cores shared with other work, a debug client and
        // server at a passing level have shown p99s of 250-460 ms. Below base + PENALTY, which
        // a past-knee request always takes (its sleep never ends early).
        latency_threshold_ms: 750.0,
        ..ProbeConfig::default()
    }
}

fn prober() -> Prober {
    Prober::new(config()).with_request_timeout(Duration::from_secs(5))
}

/// The backend's base latency for a knee at `knee`.
///
/// The server only sees `level` requests at once if the client can start them all within
/// one base latency, and a debug build of client and server sharing two busy cores manages
/// only a few thousand requests/s, far fewer when other work takes the cores: a level above
/// the knee then passes because the server never sees more than K at once (K = 24 with a
/// 12 ms base passed level 32 that way). So the base is K ms (5 ms for K = 4, 24 ms for
/// K = 24, 100 ms for K = 100), and `probe_min_requests` is lowered to 8 so the sequential
/// low levels stay short.
fn base_for(knee: usize) -> Duration {
    Duration::from_millis((knee as u64).max(5))
}

async fn probe_knee(knee: usize, past: PastKnee, schedule: Schedule) -> ProbeReport {
    let backend = spawn(knee, base_for(knee), past).await;
    let target = ProbeTarget::new(&backend.base_url, "/work").with_method("POST");
    let prober = Prober::new(ProbeConfig {
        probe_min_requests: 8,
        ..config()
    })
    .with_request_timeout(Duration::from_secs(5))
    .with_schedule(schedule);
    let report = tokio::time::timeout(TEST_LIMIT, prober.probe(&target))
        .await
        .expect("probe took too long")
        .expect("probe failed");
    println!("{}", report.table());
    let found = report.max_concurrency as f64;
    assert!(
        (found - knee as f64).abs() <= knee as f64 * 0.1,
        "K = {knee}: found {found}\n{}",
        report.table()
    );
    // the prober never had more in flight than the largest level it measured
    let largest = report.levels.iter().map(|m| m.level).max().unwrap();
    let peak = backend.counters.max_inflight.load(Ordering::SeqCst);
    assert!(peak <= largest);
    // the gentle schedule's bound (issue 17): at most 1.5 x K in flight at the backend
    if matches!(schedule, Schedule::Gentle { .. }) {
        assert!(
            peak as f64 <= 1.5 * knee as f64,
            "K = {knee}: peak {peak}\n{}",
            report.table()
        );
    }
    assert_eq!(
        backend.counters.requests.load(Ordering::SeqCst),
        report.total_requests
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_knee_4() {
    let r = probe_knee(4, PastKnee::Slow(PENALTY), Schedule::default()).await;
    assert_eq!(r.bound, ProbeBound::Latency);
    assert!(r.latency_bound());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_knee_24() {
    let r = probe_knee(24, PastKnee::Slow(PENALTY), Schedule::default()).await;
    assert!(r.latency_bound(), "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_knee_100() {
    let r = probe_knee(100, PastKnee::Slow(PENALTY), Schedule::default()).await;
    assert!(r.latency_bound(), "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_knee_4() {
    let r = probe_knee(4, PastKnee::Unavailable, Schedule::default()).await;
    assert_eq!(r.bound, ProbeBound::Errors);
    let failing = r.levels.iter().find(|m| !m.passed).unwrap();
    assert!(
        failing.outcomes.contains_key("503"),
        "{:?}",
        failing.outcomes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_knee_24() {
    let r = probe_knee(24, PastKnee::Unavailable, Schedule::default()).await;
    assert_eq!(r.bound, ProbeBound::Errors, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_knee_100() {
    let r = probe_knee(100, PastKnee::Unavailable, Schedule::default()).await;
    assert_eq!(r.bound, ProbeBound::Errors, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_schedule_knee_24() {
    let r = probe_knee(24, PastKnee::Unavailable, Schedule::Plain).await;
    assert!(r.max_concurrency >= 24, "{}", r.table());
    assert!(r.levels.iter().all(|m| m.requests == m.planned));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_backend_is_a_clear_error() {
    let url = support::down_url().await;
    let err = tokio::time::timeout(TEST_LIMIT, prober().probe(&ProbeTarget::new(&url, "/work")))
        .await
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ProbeError::FirstLevelFailed { .. }), "{msg}");
    assert!(msg.contains("connect error"), "{msg}");
    assert!(msg.contains(&format!("GET {url}/work")), "{msg}");
    assert!(msg.contains("down or misconfigured"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_endpoint_reports_status_codes() {
    let backend = spawn(100, BASE, PastKnee::Unavailable).await;
    let err = prober()
        .probe(&ProbeTarget::new(&backend.base_url, "/nope"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404 x"), "{err}");
    // it gave up after a handful of requests
    assert!(backend.counters.requests.load(Ordering::SeqCst) <= 2 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_configured_method_headers_and_json_body() {
    let backend = spawn_with(1000, BASE, PastKnee::Unavailable, Some("Bearer t0k")).await;
    let p = Prober::new(ProbeConfig {
        max_probe_concurrency: 8,
        ..config()
    });
    // without the header: 400 at level 1
    let bare =
        ProbeTarget::new(&backend.base_url, "/work").with_json_body(serde_json::json!({"x": 1}));
    let err = p.probe(&bare).await.unwrap_err();
    assert!(err.to_string().contains("400 x"), "{err}");
    let before = backend.counters.bad_requests.load(Ordering::SeqCst);
    let target = bare.with_header("Authorization", "Bearer t0k");
    let r = p.probe(&target).await.unwrap();
    assert_eq!(r.max_concurrency, 8);
    assert_eq!(r.bound, ProbeBound::MaxConcurrency);
    assert!(r.target.starts_with("POST "), "{}", r.target);
    assert_eq!(backend.counters.bad_requests.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_exceeds_max_probe_concurrency() {
    let backend = spawn(10_000, BASE, PastKnee::Unavailable).await;
    let p = Prober::new(ProbeConfig {
        max_probe_concurrency: 12,
        ..config()
    });
    let r = p
        .probe(&ProbeTarget::new(&backend.base_url, "/work"))
        .await
        .unwrap();
    assert_eq!(r.max_concurrency, 12);
    // The gentle levels depend on how many answers came back fast (timing), so what is
    // asserted is the schedule's rule: each level at most 1.5 x the one before (and one
    // more than it at least), the last one at the cap, none above it.
    let levels: Vec<_> = r.levels.iter().map(|m| m.level).collect();
    assert_eq!(levels.first(), Some(&1), "{levels:?}");
    assert_eq!(levels.last(), Some(&12), "{levels:?}");
    for pair in levels.windows(2) {
        assert!(pair[1] > pair[0], "{levels:?}");
        assert!(
            pair[1] as f64 <= 1.5 * pair[0] as f64 || pair[1] == pair[0] + 1,
            "{levels:?}"
        );
    }
    assert!(levels.iter().all(|&l| l <= 12), "{levels:?}");
    assert!(backend.counters.max_inflight.load(Ordering::SeqCst) <= 12);
    // the reference doubling, likewise capped
    let r = p
        .with_schedule(Schedule::Adaptive { tolerance: 0.1 })
        .probe(&ProbeTarget::new(&backend.base_url, "/work"))
        .await
        .unwrap();
    let levels: Vec<_> = r.levels.iter().map(|m| m.level).collect();
    assert_eq!(levels, [1, 2, 4, 8, 12]);
    assert!(backend.counters.max_inflight.load(Ordering::SeqCst) <= 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honours_the_request_timeout() {
    // Past K = 4 requests take 30 s; with a 300 ms timeout they become errors.
    let backend = spawn(4, BASE, PastKnee::Slow(Duration::from_secs(30))).await;
    let p = Prober::new(ProbeConfig {
        latency_threshold_ms: 10_000.0,
        ..config()
    })
    .with_request_timeout(Duration::from_millis(300));
    let r = tokio::time::timeout(
        TEST_LIMIT,
        p.probe(&ProbeTarget::new(&backend.base_url, "/work")),
    )
    .await
    .unwrap()
    .unwrap();
    assert!((4..=5).contains(&r.max_concurrency), "{}", r.table());
    assert_eq!(r.bound, ProbeBound::Errors);
    let failing = r.levels.iter().find(|m| !m.passed).unwrap();
    assert!(
        failing.outcomes.contains_key("timeout"),
        "{:?}",
        failing.outcomes
    );
    assert!(failing.p99_ms < 1_000.0, "{}", failing.p99_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_probe_stops_all_requests() {
    // Every request takes 2 s: drop the probe while level 1's requests are in flight,
    // then while level 2's are.
    let backend = spawn(10_000, Duration::from_secs(2), PastKnee::Unavailable).await;
    let p = Prober::new(config().clone()).with_request_timeout(Duration::from_secs(10));
    let target = ProbeTarget::new(&backend.base_url, "/work");
    let mut saw_level = 0;
    let fut = p.probe_with_progress(&target, |e| {
        if let ProbeEvent::LevelStarted { level, .. } = e {
            saw_level = *level;
        }
    });
    assert!(tokio::time::timeout(Duration::from_millis(300), fut)
        .await
        .is_err());
    assert_eq!(saw_level, 1);
    // The server saw the request and lost it when the client went away.
    let c = &backend.counters;
    assert_eq!(c.requests.load(Ordering::SeqCst), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while c.inflight.load(Ordering::SeqCst) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend still has a probe request in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.requests.load(Ordering::SeqCst), 1, "nothing new was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_each_level() {
    let backend = spawn(24, BASE, PastKnee::Unavailable).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let r = prober()
        .probe_with_progress(&ProbeTarget::new(&backend.base_url, "/work"), move |e| {
            let _ = tx.try_send(e.clone());
        })
        .await
        .unwrap();
    let mut finished = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let ProbeEvent::LevelFinished(m) = e {
            assert!(m.rps > 0.0 && m.p99_ms > 0.0);
            finished.push(m.level);
        }
    }
    let levels: Vec<_> = r.levels.iter().map(|m| m.level).collect();
    assert_eq!(finished, levels);
}

#[test]
fn report_serializes_to_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let backend = spawn(1000, BASE, PastKnee::Unavailable).await;
        let p = Prober::new(ProbeConfig {
            max_probe_concurrency: 4,
            probe_min_requests: 4,
            ..config()
        });
        let r = p
            .probe(&ProbeTarget::new(&backend.base_url, "/work"))
            .await
            .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["max_concurrency"], 4);
        assert_eq!(v["bound"], "max_concurrency");
        assert_eq!(v["levels"][0]["phase"], "growing");
        // the gentle levels 1, 2, 3, 4
        assert_eq!(v["levels"].as_array().unwrap().len(), 4);
        let back: ProbeReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    });
}
