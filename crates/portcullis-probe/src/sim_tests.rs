//! Search-logic tests on tokio's paused clock with an in-process simulated backend
//! (deterministic; the real-HTTP tests live in `tests/`).

use crate::*;
use http::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy)]
enum Past {
    /// Sleep `base + penalty` when in flight > knee.
    Slow(Duration),
    /// Answer 503 at once when in flight > knee.
    Unavailable,
}

/// One odd response, injected the first time the backend has a given number in flight.
#[derive(Clone, Copy)]
enum Outlier {
    /// That request takes this long (past any latency threshold).
    Slow(Duration),
    /// That request gets a 503.
    Error,
}

struct Sim {
    knee: usize,
    base: Duration,
    past: Past,
    /// `(in flight, what)`: the first request that arrives with exactly that many in flight
    /// (itself included) gets the outlier.
    outlier: Option<(usize, Outlier)>,
    outlier_done: Arc<AtomicBool>,
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
            outlier: None,
            outlier_done: Arc::default(),
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
        let (knee, base, past, outlier) = (self.knee, self.base, self.past, self.outlier);
        let outlier_done = self.outlier_done.clone();
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
            if let Some((at, what)) = outlier {
                if now == at && !outlier_done.swap(true, Ordering::SeqCst) {
                    match what {
                        Outlier::Slow(d) => tokio::time::sleep(d).await,
                        Outlier::Error => {
                            return RequestOutcome::Status(StatusCode::SERVICE_UNAVAILABLE)
                        }
                    }
                    return RequestOutcome::Status(StatusCode::OK);
                }
            }
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

/// Today's default before the gentle schedule.
const ADAPTIVE: Schedule = Schedule::Adaptive { tolerance: 0.1 };

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
    for (schedule, expected) in [
        (ADAPTIVE, &[1, 2, 4, 8, 16, 32, 50][..]),
        (
            Schedule::default(),
            &[1, 2, 3, 4, 6, 9, 13, 19, 28, 42, 50][..],
        ),
    ] {
        let sim = Sim::new(10_000, Past::Unavailable);
        let prober = Prober::new(ProbeConfig {
            max_probe_concurrency: 50,
            ..config()
        })
        .with_schedule(schedule);
        let r = prober.probe_transport(&sim, |_| {}).await.unwrap();
        assert_eq!(r.max_concurrency, 50);
        assert_eq!(r.bound, ProbeBound::MaxConcurrency);
        let levels: Vec<_> = r.levels.iter().map(|m| m.level).collect();
        assert_eq!(levels, expected);
        assert_eq!(sim.max_seen.load(Ordering::SeqCst), 50);
    }
}

#[tokio::test(start_paused = true)]
async fn levels_send_min_requests_and_two_rounds() {
    // The reference schedules' plan; the gentle one's is `gentle_levels_are_one_wave`.
    let sim = Sim::new(10_000, Past::Unavailable);
    let prober = Prober::new(ProbeConfig {
        max_probe_concurrency: 64,
        probe_min_requests: 40,
        ..config()
    })
    .with_schedule(ADAPTIVE);
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
    // The baseline settles after 8 requests (160 ms), then 20-25 ms per wave: mid-growth.
    let res = tokio::time::timeout(
        Duration::from_millis(300),
        prober.probe_transport(&sim, |_| {}),
    )
    .await;
    assert!(res.is_err(), "the probe should still be running");
    assert_eq!(sim.inflight.load(Ordering::SeqCst), 0);
    let started = sim.started.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sim.started.load(Ordering::SeqCst), started);
}

#[tokio::test(start_paused = true)]
async fn gentle_levels_are_one_wave() {
    let sim = Sim::new(10_000, Past::Unavailable);
    let prober = Prober::new(ProbeConfig {
        max_probe_concurrency: 64,
        probe_min_requests: 40,
        ..config()
    });
    let r = prober.probe_transport(&sim, |_| {}).await.unwrap();
    // the baseline sends its requests one at a time and stops once 8 agree (a constant
    // backend: after 8), every other level is one wave: the part above the previous level
    // within half the baseline (10 ms), all of it in flight with the first part
    assert_eq!(r.levels[0].requests, 8);
    assert!(r.levels[0].stopped_early && r.levels[0].passed);
    assert!((r.levels[0].elapsed_secs - 0.160).abs() < 0.002);
    for m in &r.levels[1..] {
        assert_eq!(m.requests, m.level, "level {}", m.level);
        assert_eq!(m.phase, Phase::Growing);
        assert!(
            (0.020..0.0302).contains(&m.elapsed_secs),
            "{}",
            m.elapsed_secs
        );
    }
    assert_eq!(
        sim.max_seen.load(Ordering::SeqCst),
        64,
        "the last wave, together"
    );
}

/// Issue 17, "the probe, gentler and cheaper": for knees K = 4, 24 and 100, latency and 503
/// knees, the gentle schedule keeps the backend's in-flight requests within 1.5 x K, finds
/// K within 10%, and sends at most half the requests of the adaptive doubling schedule.
#[tokio::test(start_paused = true)]
async fn gentle_schedule_is_gentle_accurate_and_half_the_requests() {
    for knee in [4, 24, 100] {
        for past in [Past::Slow(Duration::from_millis(500)), Past::Unavailable] {
            let before = Sim::new(knee, past);
            let old = run(&before, ADAPTIVE).await;
            let sim = Sim::new(knee, past);
            let r = run(&sim, Schedule::default()).await;
            let peak = sim.max_seen.load(Ordering::SeqCst);
            let old_peak = before.max_seen.load(Ordering::SeqCst);
            let ctx = format!(
                "K = {knee}: gentle {} requests, peak {peak}; adaptive {} requests, peak {old_peak}\n{}",
                r.total_requests,
                old.total_requests,
                r.table()
            );
            assert_eq!(r.schedule, "gentle");
            assert!(within_10_percent(r.max_concurrency, knee), "{ctx}");
            assert!(peak as f64 <= 1.5 * knee as f64, "{ctx}");
            // Half the requests. The tightest is the 503 knee at K = 100: 8 (the settled
            // baseline) + 2 + 3 + ... + 94 + 106 (the failing wave of 141 stops its ramp once
            // 6 of its first 106 failed) = 397 against 813 (0.49 x).
            assert!(
                r.total_requests as f64 <= 0.5 * old.total_requests as f64,
                "{ctx}"
            );
            assert_eq!(r.total_requests, sim.started.load(Ordering::SeqCst));
            // never more than the doubling (2 x K at K = 4, 1.33 x K at K = 24, 1.28 x K at
            // K = 100 here, since the simulated 503 answers within its own poll; the real
            // backends of the benchmark count 2.56 x K at K = 100)
            assert!(peak <= old_peak.max(knee + knee / 2), "{ctx}");
            println!("{ctx}");
        }
    }
}

/// One slow response or one error below the knee does not fail a level of the gentle
/// schedule; it did fail the adaptive doubling schedule's level 16 (the issue's "found 14 for
/// a knee of 24-28").
#[tokio::test(start_paused = true)]
async fn one_outlier_does_not_fail_a_level() {
    for knee in [24, 100] {
        for past in [Past::Slow(Duration::from_millis(500)), Past::Unavailable] {
            for outlier in [Outlier::Slow(Duration::from_secs(1)), Outlier::Error] {
                let mut sim = Sim::new(knee, past);
                // level 16 of the doubling schedule, level 19 of the gentle one
                sim.outlier = Some((16, outlier));
                let r = run(&sim, Schedule::default()).await;
                assert!(sim.outlier_done.load(Ordering::SeqCst));
                assert!(within_10_percent(r.max_concurrency, knee), "{}", r.table());
                assert!(
                    sim.max_seen.load(Ordering::SeqCst) as f64 <= 1.5 * knee as f64,
                    "{}",
                    r.table()
                );
            }
        }
    }
    // the old schedule, fooled by one slow response at level 16
    let mut sim = Sim::new(24, Past::Slow(Duration::from_millis(500)));
    sim.outlier = Some((16, Outlier::Slow(Duration::from_secs(1))));
    let r = run(&sim, ADAPTIVE).await;
    assert!(r.max_concurrency < 16, "{}", r.table());
}

/// A step latency knee hit at `K + 1` (the gentle levels 1, 2, 3, 4, 6, 9, 13 reach 6, 9 and
/// 13 for K = 5, 8 and 12): that wave has exactly one slow response, which the statistic
/// excuses, so the level is measured again and the second slow response fails it. Without
/// that, K + 1 passed and K = 5 found 6 (20% off).
#[tokio::test(start_paused = true)]
async fn a_level_one_past_a_latency_knee_fails_on_its_second_wave() {
    for knee in [5, 8, 12] {
        let sim = Sim::new(knee, Past::Slow(Duration::from_millis(500)));
        let r = run(&sim, Schedule::default()).await;
        assert_eq!(r.max_concurrency, knee, "{}", r.table());
        let twice: Vec<_> = r.levels.iter().filter(|m| m.level == knee + 1).collect();
        assert_eq!(twice.len(), 2, "{}", r.table());
        assert!(twice[0].passed && !twice[1].passed, "{}", r.table());
        assert!(twice[1].latency_exceeded, "{}", r.table());
        assert!(
            sim.max_seen.load(Ordering::SeqCst) as f64 <= 1.5 * knee as f64,
            "{}",
            r.table()
        );
    }
    // a transient slow response at a level below the knee is measured again and passes
    let mut sim = Sim::new(24, Past::Slow(Duration::from_millis(500)));
    sim.outlier = Some((9, Outlier::Slow(Duration::from_secs(1))));
    let r = run(&sim, Schedule::default()).await;
    let nines: Vec<_> = r.levels.iter().filter(|m| m.level == 9).collect();
    assert_eq!(nines.len(), 2, "{}", r.table());
    assert!(nines.iter().all(|m| m.passed), "{}", r.table());
    assert_eq!(r.max_concurrency, 24, "{}", r.table());
}

/// A wave just past a 503 knee passes on the error threshold (94 in flight at K = 90: 4
/// errors, 4.3% < 5%; 63 at K = 60: 4.8%) but counts for the requests it served, so the
/// probe stays exact on a 503 knee instead of reporting the wave's size.
#[tokio::test(start_paused = true)]
async fn a_passing_wave_with_errors_counts_for_what_it_served() {
    for (knee, wave) in [(90, 94), (60, 63)] {
        let sim = Sim::new(knee, Past::Unavailable);
        let r = run(&sim, Schedule::default()).await;
        let m = r.levels.iter().find(|m| m.level == wave).unwrap();
        assert!(m.passed && m.errors > 0, "{}", r.table());
        assert_eq!(r.max_concurrency, knee, "{}", r.table());
    }
}

/// The slow-growth branch: a backend whose latency rises smoothly with concurrency (no step)
/// is stepped up by `1 + tolerance` once latency has doubled, and the result still lands
/// within 10% of where the latency threshold is crossed.
#[tokio::test(start_paused = true)]
async fn rising_latency_slows_the_growth() {
    struct Rising {
        inflight: Arc<AtomicUsize>,
        max_seen: Arc<AtomicUsize>,
    }
    impl ProbeTransport for Rising {
        fn send(&self) -> SendFuture {
            let inflight = self.inflight.clone();
            let max_seen = self.max_seen.clone();
            Box::pin(async move {
                let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
                let _dec = Dec(inflight);
                max_seen.fetch_max(now, Ordering::SeqCst);
                // 20 ms, plus 4 ms per request in flight past 10: 200 ms is crossed at 55
                let extra = now.saturating_sub(10) as u64 * 4;
                tokio::time::sleep(Duration::from_millis(20 + extra)).await;
                RequestOutcome::Status(StatusCode::OK)
            })
        }
        fn describe(&self) -> String {
            "RISING /work".into()
        }
    }
    let sim = Rising {
        inflight: Arc::default(),
        max_seen: Arc::default(),
    };
    let r = Prober::new(config())
        .with_request_timeout(Duration::from_secs(5))
        .probe_transport(&sim, |_| {})
        .await
        .unwrap();
    // A wave of L holds requests that arrived with 1..=L in flight; its second-worst sample
    // came in with L - 1, so L passes while 20 + 4 (L - 11) <= 200, i.e. L <= 56.
    assert!(within_10_percent(r.max_concurrency, 56), "{}", r.table());
    assert!(sim.max_seen.load(Ordering::SeqCst) <= 62, "{}", r.table());
    assert_eq!(r.bound, ProbeBound::Latency);
}
