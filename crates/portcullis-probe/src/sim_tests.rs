//! Search-logic tests on tokio's paused clock with an in-process simulated backend
//! (deterministic; the real-HTTP tests live in `tests/`).

use crate::*;
use http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy)]
enum Past {
    /// Sleep `base + penalty` when in flight > knee.
    Slow(Duration),
    /// Answer 503 at once when in flight > knee.
    Unavailable,
}

struct Sim {
    knee: usize,
    base: Duration,
    past: Past,
    inflight: Arc<AtomicUsize>,
    max_seen: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
}

impl Sim {
    fn new(knee: usize, past: Past) -> Self {
        Self {
            knee,
            base: Duration::from_millis(20),
            past,
            inflight: Arc::default(),
            max_seen: Arc::default(),
            started: Arc::default(),
        }
    }
}

struct Dec(Arc<AtomicUsize>);
impl Drop for Dec {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ProbeTransport for Sim {
    fn send(&self) -> SendFuture {
        let (knee, base, past) = (self.knee, self.base, self.past);
        let (inflight, max_seen, started) = (
            self.inflight.clone(),
            self.max_seen.clone(),
            self.started.clone(),
        );
        Box::pin(async move {
            started.fetch_add(1, Ordering::SeqCst);
            let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
            let _dec = Dec(inflight);
            max_seen.fetch_max(now, Ordering::SeqCst);
            match past {
                Past::Slow(penalty) if now > knee => tokio::time::sleep(base + penalty).await,
                Past::Unavailable if now > knee => {
                    return RequestOutcome::Status(StatusCode::SERVICE_UNAVAILABLE)
                }
                _ => tokio::time::sleep(base).await,
            }
            RequestOutcome::Status(StatusCode::OK)
        })
    }

    fn describe(&self) -> String {
        "SIM /work".into()
    }
}

fn config() -> ProbeConfig {
    ProbeConfig {
        latency_threshold_ms: 200.0,
        ..ProbeConfig::default()
    }
}

async fn run(sim: &Sim, schedule: Schedule) -> ProbeReport {
    Prober::new(config())
        .with_schedule(schedule)
        .with_request_timeout(Duration::from_secs(5))
        .probe_transport(sim, |_| {})
        .await
        .unwrap()
}

fn within_10_percent(found: usize, knee: usize) -> bool {
    (found as f64 - knee as f64).abs() <= knee as f64 * 0.1
}

#[tokio::test(start_paused = true)]
async fn plain_schedule_finds_the_knee() {
    // At K + 1 only the request that arrives while K others are inside is penalised (about
    // one per round), which a large level can absorb under its p99 / error threshold; so
    // the plain search lands on K or slightly above, never below.
    for knee in [4, 24, 100, 300] {
        for past in [Past::Slow(Duration::from_millis(500)), Past::Unavailable] {
            let sim = Sim::new(knee, past);
            let r = run(&sim, Schedule::Plain).await;
            assert!(r.max_concurrency >= knee, "{}", r.table());
            assert!(within_10_percent(r.max_concurrency, knee), "{}", r.table());
            assert!(r.levels.iter().all(|m| !m.stopped_early));
            assert!(r.levels.iter().all(|m| m.requests == m.planned));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn adaptive_schedule_is_within_tolerance_and_cheaper() {
    for knee in [4, 24, 100, 300, 700] {
        for past in [Past::Slow(Duration::from_millis(500)), Past::Unavailable] {
            let plain = run(&Sim::new(knee, past), Schedule::Plain).await;
            let sim = Sim::new(knee, past);
            let r = run(&sim, Schedule::default()).await;
            assert!(within_10_percent(r.max_concurrency, knee), "{}", r.table());
            assert!(
                r.total_requests < plain.total_requests,
                "adaptive {} vs plain {} requests\n{}",
                r.total_requests,
                plain.total_requests,
                r.table()
            );
            assert!(r.elapsed() <= plain.elapsed(), "{}", r.table());
            // the reported total is what the backend saw
            assert_eq!(r.total_requests, sim.started.load(Ordering::SeqCst));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn bound_reports_latency_or_errors() {
    let r = run(
        &Sim::new(24, Past::Slow(Duration::from_millis(500))),
        Schedule::default(),
    )
    .await;
    assert_eq!(r.bound, ProbeBound::Latency);
    assert!(r.latency_bound());
    let r = run(&Sim::new(24, Past::Unavailable), Schedule::default()).await;
    assert_eq!(r.bound, ProbeBound::Errors);
    assert!(!r.latency_bound());
    // best req/s is a passing level
    assert!(r
        .levels
        .iter()
        .any(|m| m.passed && m.level == r.best_rps_level));
}

#[tokio::test(start_paused = true)]
async fn never_exceeds_max_probe_concurrency() {
    let sim = Sim::new(10_000, Past::Unavailable);
    let prober = Prober::new(ProbeConfig {
        max_probe_concurrency: 50,
        ..config()
    });
    let r = prober.probe_transport(&sim, |_| {}).await.unwrap();
    assert_eq!(r.max_concurrency, 50);
    assert_eq!(r.bound, ProbeBound::MaxConcurrency);
    let levels: Vec<_> = r.levels.iter().map(|m| m.level).collect();
    assert_eq!(levels, [1, 2, 4, 8, 16, 32, 50]);
    assert_eq!(sim.max_seen.load(Ordering::SeqCst), 50);
}

#[tokio::test(start_paused = true)]
async fn levels_send_min_requests_and_two_rounds() {
    let sim = Sim::new(10_000, Past::Unavailable);
    let prober = Prober::new(ProbeConfig {
        max_probe_concurrency: 64,
        probe_min_requests: 40,
        ..config()
    });
    let r = prober.probe_transport(&sim, |_| {}).await.unwrap();
    for m in &r.levels {
        assert_eq!(m.requests, 40.max(2 * m.level), "level {}", m.level);
    }
    // level 16 keeps 16 in flight for 40 requests of 20 ms: 3 rounds = 60 ms
    let l16 = r.levels.iter().find(|m| m.level == 16).unwrap();
    assert!(
        (l16.elapsed_secs - 0.060).abs() < 0.002,
        "{}",
        l16.elapsed_secs
    );
    assert!((l16.p99_ms - 20.0).abs() < 1.0);
}

#[tokio::test(start_paused = true)]
async fn request_timeout_counts_as_error() {
    // Past the knee requests take 60 s; the timeout is 1 s and the latency threshold 10 s,
    // so only the timeouts (errors) can fail a level.
    let sim = Sim::new(8, Past::Slow(Duration::from_secs(60)));
    let prober = Prober::new(ProbeConfig {
        latency_threshold_ms: 10_000.0,
        ..ProbeConfig::default()
    })
    .with_request_timeout(Duration::from_secs(1));
    let r = prober.probe_transport(&sim, |_| {}).await.unwrap();
    assert_eq!(r.max_concurrency, 8, "{}", r.table());
    assert_eq!(r.bound, ProbeBound::Errors);
    let failing = r.levels.iter().find(|m| !m.passed).unwrap();
    assert!(failing.outcomes.contains_key("timeout"));
    assert!(failing.p99_ms <= 1_010.0);
    // nothing was left running after the probe
    assert_eq!(sim.inflight.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn first_level_failure_aborts_with_the_statuses_seen() {
    let sim = Sim::new(0, Past::Unavailable);
    let err = Prober::new(config())
        .probe_transport(&sim, |_| {})
        .await
        .unwrap_err();
    let msg = err.to_string();
    // the level stops as soon as more than 5% of its 32 planned requests failed
    assert!(msg.contains("503 x2"), "{msg}");
    assert!(msg.contains("concurrency 1"), "{msg}");
    assert!(msg.contains("error rate 100.0% > 5.0%"), "{msg}");
    assert_eq!(err.measurement().unwrap().level, 1);
    assert_eq!(sim.started.load(Ordering::SeqCst), 2);

    // too slow at level 1 is also a failure
    let mut slow = Sim::new(10, Past::Unavailable);
    slow.base = Duration::from_millis(300);
    let err = Prober::new(config())
        .probe_transport(&slow, |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("p99 300.0 ms > 200 ms"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn progress_events_bracket_every_level() {
    let sim = Sim::new(24, Past::Unavailable);
    let mut events = Vec::new();
    let r = Prober::new(config())
        .probe_transport(&sim, |e| events.push(e.clone()))
        .await
        .unwrap();
    assert_eq!(events.len(), 2 * r.levels.len());
    for (pair, m) in events.chunks(2).zip(&r.levels) {
        match (&pair[0], &pair[1]) {
            (ProbeEvent::LevelStarted { level, planned, .. }, ProbeEvent::LevelFinished(f)) => {
                assert_eq!(*level, m.level);
                assert_eq!(*planned, m.planned);
                assert_eq!(f, m);
            }
            other => panic!("unexpected events {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_probe_cancels_in_flight_requests() {
    let sim = Sim::new(10_000, Past::Unavailable);
    let prober = Prober::new(config());
    let res = tokio::time::timeout(
        Duration::from_millis(1_000),
        prober.probe_transport(&sim, |_| {}),
    )
    .await;
    assert!(res.is_err(), "the probe should still be running");
    assert_eq!(sim.inflight.load(Ordering::SeqCst), 0);
    let started = sim.started.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sim.started.load(Ordering::SeqCst), started);
}
