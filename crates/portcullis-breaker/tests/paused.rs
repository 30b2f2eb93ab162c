//! State-machine tests on tokio's paused clock with injected probes.

use portcullis_breaker::{
    Breaker, BreakerState, Config, FallbackLayer, FallbackUnavailable, HalfOpenConfig,
};
use portcullis_core::{BoxError, HealthSource, IntoRejection};
use portcullis_health::{Probe, ProbeFuture, ProbeResult};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, Service, ServiceExt};

/// A probe answering from a script (then `default`), recording when each attempt started
/// and how many run at once.
struct Scripted {
    script: Mutex<VecDeque<bool>>,
    default: bool,
    delay: Duration,
    starts: Mutex<Vec<(String, Instant)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Scripted {
    fn new(script: &[bool], default: bool) -> Arc<Self> {
        Self::slow(script, default, Duration::ZERO)
    }

    fn slow(script: &[bool], default: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script.iter().copied().collect()),
            default,
            delay,
            starts: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn starts(&self) -> Vec<(String, Instant)> {
        self.starts.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.starts.lock().unwrap().len()
    }
}

struct InFlight(Arc<Scripted>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct ScriptedProbe(Arc<Scripted>);

impl Probe for ScriptedProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        let s = self.0.clone();
        s.starts
            .lock()
            .unwrap()
            .push((target.to_owned(), Instant::now()));
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let healthy = s.script.lock().unwrap().pop_front().unwrap_or(s.default);
        Box::pin(async move {
            let _g = InFlight(s.clone());
            sleep(s.delay).await;
            if healthy {
                ProbeResult::healthy(s.delay, "200 OK")
            } else {
                ProbeResult::unhealthy(s.delay, "500 Internal Server Error")
            }
        })
    }
}

fn config(hold: f64, threshold: u32) -> Config {
    Config {
        url: Some("fallback".into()),
        failure_threshold: 2,
        recheck_interval: Duration::from_secs(1),
        min_fallback_duration: Duration::from_secs_f64(hold),
        recovery_success_threshold: threshold,
        probe_max_retries: 0,
        ..Config::default()
    }
}

fn breaker(cfg: Config, probe: &Arc<Scripted>) -> Breaker {
    Breaker::builder(cfg)
        .primary_target("primary")
        .probe(ScriptedProbe(probe.clone()))
        .build()
}

fn trip(b: &Breaker) {
    for _ in 0..b.config().failure_threshold {
        b.record_failure();
    }
    assert_eq!(b.state(), BreakerState::Fallback);
}

/// Sleeps until `secs` after `t0`.
async fn at(t0: Instant, secs: f64) {
    tokio::time::sleep_until(t0 + Duration::from_secs_f64(secs)).await;
}

#[tokio::test(start_paused = true)]
async fn the_hold_alone_blocks_recovery() {
    let probe = Scripted::new(&[], true);
    let b = breaker(config(10.0, 2), &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 9.5).await;
    // Nine successful probes: the success gate holds, the hold does not.
    assert_eq!(probe.calls(), 9);
    let snap = b.status_snapshot();
    assert_eq!(snap.state, BreakerState::Fallback);
    assert!(snap.consecutive_recovery_successes >= 2);
    assert!((snap.min_hold_remaining_seconds.unwrap() - 0.5).abs() < 1e-6);
    at(t0, 10.5).await;
    assert_eq!(b.state(), BreakerState::Normal);
    assert_eq!(b.counters().recovered, 1);
}

#[tokio::test(start_paused = true)]
async fn the_success_count_alone_blocks_recovery() {
    let probe = Scripted::new(&[], true);
    let b = breaker(config(0.0, 3), &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 2.5).await;
    // The hold passed long ago, but only 2 of 3 successes.
    let snap = b.status_snapshot();
    assert_eq!(snap.state, BreakerState::Fallback);
    assert_eq!(snap.consecutive_recovery_successes, 2);
    assert_eq!(snap.min_hold_remaining_seconds, Some(0.0));
    at(t0, 3.5).await;
    assert_eq!(b.state(), BreakerState::Normal);
}

#[tokio::test(start_paused = true)]
async fn both_gates_together_allow_recovery() {
    let probe = Scripted::new(&[], true);
    let b = breaker(config(5.0, 2), &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 4.9).await;
    assert_eq!(b.state(), BreakerState::Fallback);
    at(t0, 5.1).await;
    assert_eq!(b.state(), BreakerState::Normal);
    let snap = b.status_snapshot();
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.consecutive_recovery_successes, 0);
    assert_eq!(snap.fallback_age_seconds, None);
    // Back in NORMAL the prober sleeps: no more probes.
    at(t0, 20.0).await;
    assert_eq!(probe.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_failure_between_successes_resets_the_count() {
    let probe = Scripted::new(&[true, false, true, true], true);
    let b = breaker(config(0.0, 2), &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 1.5).await;
    assert_eq!(b.status_snapshot().consecutive_recovery_successes, 1);
    at(t0, 2.5).await;
    assert_eq!(b.status_snapshot().consecutive_recovery_successes, 0);
    at(t0, 3.5).await;
    let snap = b.status_snapshot();
    assert_eq!(snap.state, BreakerState::Fallback);
    assert_eq!(snap.consecutive_recovery_successes, 1);
    at(t0, 4.5).await;
    assert_eq!(b.state(), BreakerState::Normal);
    assert_eq!(b.counters().probe_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exactly_half_one_two_seconds() {
    let probe = Scripted::new(&[], false);
    let cfg = Config {
        probe_max_retries: 3,
        probe_backoff_base: Duration::from_millis(500),
        recheck_interval: Duration::from_secs(100),
        ..config(0.0, 1)
    };
    let b = breaker(cfg, &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 110.0).await;
    let starts = probe.starts();
    assert_eq!(starts.len(), 4, "1 attempt + 3 retries");
    let first = starts[0].1;
    assert_eq!(first, t0 + Duration::from_secs(100));
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert_eq!(
        gaps,
        [
            Duration::from_millis(500),
            Duration::from_millis(1000),
            Duration::from_millis(2000)
        ]
    );
    let snap = b.status_snapshot();
    assert_eq!(snap.last_probe_attempts, Some(4));
    assert_eq!(snap.last_probe_healthy, Some(false));
    assert_eq!(snap.counters.probes, 1);
    assert_eq!(snap.counters.probe_attempts, 4);
}

#[tokio::test(start_paused = true)]
async fn a_probe_succeeds_when_one_retry_succeeds() {
    let probe = Scripted::new(&[false, true], false);
    let cfg = Config {
        probe_max_retries: 2,
        ..config(0.0, 1)
    };
    let b = breaker(cfg, &probe);
    let t0 = Instant::now();
    trip(&b);
    at(t0, 1.6).await;
    assert_eq!(probe.calls(), 2);
    assert_eq!(b.state(), BreakerState::Normal);
    assert_eq!(b.status_snapshot().last_probe_attempts, Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_probe_is_cut_by_probe_timeout() {
    let probe = Scripted::slow(&[], true, Duration::from_secs(3600));
    let cfg = Config {
        probe_timeout: Duration::from_secs(2),
        probe_max_retries: 1,
        probe_backoff_base: Duration::from_secs(1),
        ..config(0.0, 1)
    };
    let b = breaker(cfg, &probe);
    let t0 = Instant::now();
    trip(&b);
    // Probe at 1 s: attempt (2 s timeout), back-off 1 s, attempt (2 s timeout) -> done at 6 s.
    at(t0, 6.5).await;
    let snap = b.status_snapshot();
    assert_eq!(snap.last_probe_attempts, Some(2));
    assert_eq!(snap.last_probe_healthy, Some(false));
    // Both timed-out attempts were dropped (nothing left running); the next probe is due at 7 s.
    assert_eq!(probe.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(probe.calls(), 2);
    at(t0, 7.5).await;
    assert_eq!(probe.calls(), 3);
    assert_eq!(probe.in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn exactly_one_probe_in_flight_under_100_concurrent_requests() {
    // Slow probes (3 s) every second: requests keep arriving while a probe is running.
    let probe = Scripted::slow(&[], false, Duration::from_secs(3));
    let cfg = Config {
        probe_timeout: Duration::from_secs(10),
        ..config(0.0, 2)
    };
    let b = breaker(cfg, &probe);
    let primary_calls = Arc::new(AtomicUsize::new(0));
    let pc = primary_calls.clone();
    let primary = service_fn(move |_: u32| {
        pc.fetch_add(1, Ordering::SeqCst);
        async { Err::<String, _>(std::io::Error::other("down")) }
    });
    let fallback = service_fn(|_: u32| async { Ok::<_, Infallible>(String::from("fallback")) });
    let svc = FallbackLayer::new(fallback, b.clone()).layer(primary);
    for i in 0..2 {
        assert!(svc.clone().oneshot(i).await.is_err());
    }
    assert_eq!(b.state(), BreakerState::Fallback);

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = 0;
            for j in 0..20u32 {
                sleep(Duration::from_millis(150 + u64::from(i % 7) * 10)).await;
                let start = Instant::now();
                let r = svc.clone().oneshot(i * 100 + j).await;
                assert_eq!(r.unwrap(), "fallback");
                // Never waits for a probe: the answer comes at once.
                assert_eq!(start.elapsed(), Duration::ZERO);
                answered += 1;
            }
            answered
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 2000);
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert!(probe.calls() >= 1);
    assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(
        primary_calls.load(Ordering::SeqCst),
        2,
        "no request reached the primary"
    );
}

/// A `tracing` writer collecting everything into a string.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn no_fallback_configured_keeps_the_primary_and_logs_once() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let probe = Scripted::new(&[], false);
    // No fallback: turned off in the builder, so the service the layer is given is unused.
    let b = Breaker::builder(Config {
        url: None,
        ..config(0.0, 2)
    })
    .primary_target("primary")
    .fallback_target(None)
    .probe(ScriptedProbe(probe.clone()))
    .build();
    assert!(!b.has_fallback());
    let fail = Arc::new(AtomicBool::new(true));
    let primary_calls = Arc::new(AtomicUsize::new(0));
    let (f, pc) = (fail.clone(), primary_calls.clone());
    let primary = service_fn(move |_: u32| {
        pc.fetch_add(1, Ordering::SeqCst);
        let fail = f.load(Ordering::SeqCst);
        async move {
            if fail {
                Err::<&'static str, BoxError>("down".into())
            } else {
                Ok("primary")
            }
        }
    });
    let fallback_calls = Arc::new(AtomicUsize::new(0));
    let fc = fallback_calls.clone();
    let fallback = service_fn(move |_: u32| {
        fc.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>("fallback") }
    });
    let svc = FallbackLayer::new(fallback, b.clone()).layer(primary);

    for i in 0..10 {
        assert!(svc.clone().oneshot(i).await.is_err());
    }
    let snap = b.status_snapshot();
    assert_eq!(snap.state, BreakerState::PrimaryUnhealthy);
    assert!(!snap.using_fallback);
    assert!(!snap.fallback_configured);
    assert_eq!(snap.active_url, "primary");
    assert!(!b.can_serve());
    assert_eq!(primary_calls.load(Ordering::SeqCst), 10);
    assert_eq!(fallback_calls.load(Ordering::SeqCst), 0);

    // A live success clears it; tripping again does not log again.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(svc.clone().oneshot(11).await.unwrap(), "primary");
    assert_eq!(b.state(), BreakerState::Normal);
    assert!(b.can_serve());
    fail.store(true, Ordering::SeqCst);
    for i in 0..5 {
        assert!(svc.clone().oneshot(20 + i).await.is_err());
    }
    assert_eq!(b.state(), BreakerState::PrimaryUnhealthy);
    assert_eq!(b.counters().primary_unhealthy, 2);
    assert_eq!(b.counters().fallback_engaged, 0);
    assert_eq!(fallback_calls.load(Ordering::SeqCst), 0);
    assert_eq!(logs.count("no fallback is configured"), 1);
}

/// Without `url`, the fallback service given to the layer is the fallback: the breaker
/// engages it after `failure_threshold` failures (no `primary_unhealthy`).
#[tokio::test(start_paused = true)]
async fn a_fallback_service_without_url_engages() {
    let probe = Scripted::new(&[], false);
    let b = breaker(
        Config {
            url: None,
            ..config(0.0, 2)
        },
        &probe,
    );
    assert!(!b.has_fallback(), "no fallback before a layer is given one");
    let primary = service_fn(|_: u32| async { Err::<&'static str, BoxError>("down".into()) });
    let fallback = service_fn(|_: u32| async { Ok::<_, Infallible>("fallback") });
    let svc = FallbackLayer::new(fallback, b.clone()).layer(primary);
    assert!(b.has_fallback());

    assert!(svc.clone().oneshot(1).await.is_err());
    assert!(svc.clone().oneshot(2).await.is_err());
    assert_eq!(b.state(), BreakerState::Fallback);
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), "fallback");
    let snap = b.status_snapshot();
    assert!(snap.fallback_configured && snap.using_fallback);
    assert_eq!(snap.counters.fallback_engaged, 1);
    assert_eq!(snap.counters.primary_unhealthy, 0);
    assert!(b.can_serve());
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_failure_streak() {
    let probe = Scripted::new(&[], false);
    let b = breaker(config(0.0, 2), &probe);
    b.record_failure();
    b.record_success();
    b.record_failure();
    assert_eq!(b.state(), BreakerState::Normal);
    assert_eq!(b.status_snapshot().consecutive_failures, 1);
    b.record_failure();
    assert_eq!(b.state(), BreakerState::Fallback);
    assert_eq!(b.counters().fallback_engaged, 1);
    // Failures while engaged change nothing.
    b.record_failure();
    assert_eq!(b.counters().fallback_engaged, 1);
    assert!(b.can_serve());
}

#[tokio::test(start_paused = true)]
async fn the_route_is_chosen_when_the_request_is_sent_not_when_it_was_ready() {
    let probe = Scripted::new(&[], false);
    let b = breaker(config(0.0, 2), &probe);
    let primary = service_fn(|_: u32| async { Ok::<_, BoxError>("primary") });
    let fallback = service_fn(|_: u32| async { Ok::<_, BoxError>("fallback") });
    let mut svc = FallbackLayer::new(fallback, b.clone()).layer(primary);
    // Made ready while NORMAL (a connection's service, before its request waited in an
    // admission queue), then the breaker trips, then the request is sent.
    svc.ready().await.unwrap();
    trip(&b);
    assert_eq!(svc.call(1).await.unwrap(), "fallback");
    assert_eq!(
        svc.ready().await.unwrap().call(2).await.unwrap(),
        "fallback"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fallback_not_ready_does_not_stop_the_primary() {
    let probe = Scripted::new(&[], false);
    let b = breaker(config(0.0, 2), &probe);
    let primary = service_fn(|_: u32| async { Ok::<_, BoxError>("primary") });
    let mut svc = FallbackLayer::new(Broken, b.clone()).layer(primary);
    // The fallback's `poll_ready` fails: NORMAL traffic is served by the primary.
    for i in 0..3 {
        assert_eq!(svc.ready().await.unwrap().call(i).await.unwrap(), "primary");
    }
    trip(&b);
    let e = svc.ready().await.unwrap().call(9).await.unwrap_err();
    assert!(e.is::<FallbackUnavailable>(), "{e}");
    assert_eq!(b.counters().fallback_failures, 1);
}

/// A service whose `poll_ready` always fails.
#[derive(Clone)]
struct Broken;

impl tower::Service<u32> for Broken {
    type Response = &'static str;
    type Error = BoxError;
    type Future = std::future::Ready<Result<&'static str, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Err("broken".into()))
    }

    fn call(&mut self, _: u32) -> Self::Future {
        std::future::ready(Ok("broken fallback called"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_fallback_is_fallback_unavailable() {
    let probe = Scripted::new(&[], false);
    let b = breaker(config(0.0, 2), &probe);
    let primary = service_fn(|_: u32| async { Err::<&'static str, BoxError>("down".into()) });
    let fallback =
        service_fn(|_: u32| async { Err::<&'static str, _>(std::io::Error::other("refused")) });
    let svc = FallbackLayer::new(fallback, b.clone()).layer(primary);
    for i in 0..2 {
        let e = svc.clone().oneshot(i).await.unwrap_err();
        assert!(!e.is::<FallbackUnavailable>());
    }
    let e = svc.clone().oneshot(3).await.unwrap_err();
    let fu = e
        .downcast_ref::<FallbackUnavailable>()
        .expect("FallbackUnavailable");
    assert_eq!(fu.to_rejection().code(), "fallback_unavailable");
    assert_eq!(fu.to_rejection().status(), 502);
    assert_eq!(b.counters().fallback_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_trickle_tests_the_primary_after_the_hold() {
    // Probes never succeed and are rare: only live trials can bring the primary back.
    let probe = Scripted::new(&[], false);
    let cfg = Config {
        recheck_interval: Duration::from_secs(1000),
        half_open: HalfOpenConfig {
            enabled: true,
            one_in: 4,
        },
        ..config(5.0, 2)
    };
    let b = breaker(cfg, &probe);
    let primary_ok = Arc::new(AtomicBool::new(false));
    let primary_calls = Arc::new(AtomicUsize::new(0));
    let (ok, pc) = (primary_ok.clone(), primary_calls.clone());
    let primary = service_fn(move |_: u32| {
        pc.fetch_add(1, Ordering::SeqCst);
        let ok = ok.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok::<_, BoxError>("primary")
            } else {
                Err("down".into())
            }
        }
    });
    let fallback = service_fn(|_: u32| async { Ok::<_, Infallible>("fallback") });
    let svc = FallbackLayer::new(fallback, b.clone()).layer(primary);
    let t0 = Instant::now();
    for i in 0..2 {
        let _ = svc.clone().oneshot(i).await;
    }
    assert_eq!(b.state(), BreakerState::Fallback);
    primary_ok.store(true, Ordering::SeqCst);
    // During the hold: no trial.
    for i in 0..40 {
        assert_eq!(svc.clone().oneshot(i).await.unwrap(), "fallback");
    }
    assert_eq!(primary_calls.load(Ordering::SeqCst), 2);
    at(t0, 5.0).await;
    // After the hold: 1 request in 4 tries the primary; two successes bring it back.
    let mut answers = Vec::new();
    for i in 0..8 {
        answers.push(svc.clone().oneshot(i).await.unwrap());
    }
    assert_eq!(
        answers,
        [
            "fallback", "fallback", "fallback", "primary", "fallback", "fallback", "fallback",
            "primary"
        ]
    );
    assert_eq!(b.state(), BreakerState::Normal);
    assert_eq!(b.counters().half_open_trials, 2);
    assert_eq!(svc.clone().oneshot(99).await.unwrap(), "primary");
}

#[tokio::test(start_paused = true)]
async fn force_health_check_probes_both_sides_and_applies_the_result() {
    // Primary: fail, then ok. Fallback: ok.
    let probe = Scripted::new(&[false, true], true);
    let cfg = Config {
        probe_max_retries: 2,
        recheck_interval: Duration::from_secs(1000),
        ..config(0.0, 1)
    };
    let b = breaker(cfg, &probe);
    trip(&b);
    let report = b.force_health_check().await;
    let targets: Vec<String> = probe.starts().into_iter().map(|(t, _)| t).collect();
    assert!(targets.contains(&"primary".to_string()));
    assert!(targets.contains(&"fallback".to_string()));
    let fallback = report.fallback.clone().unwrap();
    assert!(fallback.healthy);
    assert_eq!(fallback.target, "fallback");
    // One of the two sides consumed the failing first answer and needed a retry.
    assert_eq!(report.primary.attempts + fallback.attempts, 3);
    assert!(report.primary.healthy);
    // Threshold 1, no hold: the primary's healthy probe recovers it.
    assert_eq!(report.status.state, BreakerState::Normal);
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "state",
        "using_fallback",
        "consecutive_failures",
        "consecutive_recovery_successes",
        "recovery_threshold",
        "fallback_age_seconds",
        "min_hold_remaining_seconds",
        "last_probe_latency_seconds",
        "last_probe_attempts",
        "primary",
        "fallback",
        "counters",
    ] {
        assert!(json.get(key).is_some(), "missing {key}: {json}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_forced_check_counts_as_a_primary_failure() {
    let probe = Scripted::new(&[], false);
    let cfg = Config {
        recheck_interval: Duration::from_secs(1000),
        ..config(0.0, 1)
    };
    let b = breaker(cfg, &probe);
    let report = b.force_health_check().await;
    assert!(!report.primary.healthy);
    assert_eq!(report.status.state, BreakerState::Normal);
    assert_eq!(report.status.consecutive_failures, 1);
    assert_eq!(report.status.counters.primary_failures, 1);
    // A failed request and a failed check make the same streak.
    b.record_failure();
    assert_eq!(b.state(), BreakerState::Fallback);
    let c = b.counters();
    assert_eq!(
        (c.primary_failures, c.forced_checks, c.fallback_engaged),
        (2, 1, 1)
    );
    // While tripped, a failed check is still counted, and changes no state.
    let report = b.force_health_check().await;
    assert_eq!(report.status.state, BreakerState::Fallback);
    assert_eq!(report.status.counters.primary_failures, 3);
    assert_eq!(report.status.counters.forced_checks, 2);
    // Two failed checks alone trip a fresh breaker, as two failed requests would.
    let b = breaker(config(0.0, 1), &Scripted::new(&[], false));
    b.force_health_check().await;
    assert_eq!(
        b.force_health_check().await.status.state,
        BreakerState::Fallback
    );
    assert_eq!(b.counters().primary_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn the_prober_stops_when_the_breaker_is_dropped() {
    let probe = Scripted::new(&[], false);
    let b = breaker(config(0.0, 2), &probe);
    assert!(b.prober_running());
    let t0 = Instant::now();
    trip(&b);
    at(t0, 2.5).await;
    let calls = probe.calls();
    assert_eq!(calls, 2);
    drop(b);
    at(t0, 10.0).await;
    assert_eq!(probe.calls(), calls);
}

#[test]
fn config_parses_from_yaml_with_defaults() {
    let c: Config = serde_yaml_ng::from_str(
        "url: http://127.0.0.1:9\nfailure_threshold: 3\nprobe_backoff_base: 0.25\nhalf_open: {enabled: true}\n",
    )
    .unwrap();
    assert_eq!(c.failure_threshold, 3);
    assert_eq!(c.probe_backoff_base, Duration::from_millis(250));
    assert_eq!(c.recheck_interval, Duration::from_secs(60));
    assert!(c.half_open.enabled);
    assert_eq!(c.half_open.one_in, 20);
    assert!(c.validate().is_ok());
    assert!(serde_yaml_ng::from_str::<Config>("nope: 1\n").is_err());
}
