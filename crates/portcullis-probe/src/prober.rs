//! The search for an endpoint's capacity.
//!
//! Three schedules (see [`Schedule`]); each keeps a last passing level `lo` and a first
//! failing level `hi`, and the result is the highest passing level found.
//!
//! # The gentle schedule (the default)
//!
//! [`Schedule::Gentle`] is built for backends where too much concurrency does harm (a model
//! server that runs out of memory at 2.5 times its safe concurrency), and to send few
//! requests:
//!
//! 1. **Baseline.** Level 1 sends up to `probe_min_requests` requests one after the other,
//!    and stops early once its last 8 requests all succeeded within 25% of each other (a
//!    settled no-load latency: after 8 on a steady backend; a slow first request on a new
//!    connection, or an outlier, only pushes the window on). Its median latency is the
//!    baseline; a response counts as *fast* when it succeeded within
//!    `max(2 x baseline, baseline + 5 ms)` (capped at the latency threshold), a cutoff that a
//!    median of 8 estimates well enough. Failing here aborts with
//!    [`ProbeError::FirstLevelFailed`].
//! 2. **Growing.** Every further level is **one wave**: `level` requests in flight together,
//!    so the backend has exactly `level` in flight, and the level ends when they have all
//!    answered (nothing of one level is still running when the next starts). The wave sends
//!    at once as many requests as the previous level answered fast (a count the backend has
//!    shown it serves), and the rest in 16 steps within half the baseline latency, so the
//!    first requests are still in flight when the last ones arrive. While it ramps, the
//!    wave stops as soon as it fails *as sent so far* (more than `error_threshold` of the
//!    requests sent have failed): on a 503 knee the answers past the knee come back at once,
//!    and the failing wave of 141 at K = 100 stops after about 106 requests instead of
//!    sending 141. A latency knee shows nothing within the ramp, so there the wave is sent
//!    whole, and the peak below is unchanged. After a
//!    passing level `L` with `f` fast responses the next level is
//!    `max(L + 1, floor(probe_growth x f), floor(L x (1 + tolerance)))`: while latency is flat
//!    (`f` close to `L`) that is 1.5 x `f` (1, 2, 3, 4, 6, 9, 13, 19, 28, 42, 63, 94, 141, ...
//!    with the default `probe_growth` 1.5); once latency has risen against the baseline (few
//!    fast answers) the growth slows to `1 + tolerance` (10%) per level, and a few noisy
//!    answers only slow it in proportion.
//!
//!    The first failing level ends the growth.
//!
//!    **Warm connections.** A wave is only a concurrency level if its requests reach the
//!    backend together. A request on a new connection arrives a connect (and an accept)
//!    later than one on a pooled connection, and with a fast backend on a loaded machine the
//!    pooled ones have already been answered by then: a wave above the knee then passes, or
//!    its failing wave over-counts the knee (a debug build under load found 28 for K = 24
//!    and 114-123 for K = 100, 3 of 40 runs). So before each wave the prober asks the
//!    transport to [`prepare`](ProbeTransport::prepare) it: [`HttpTransport`] opens the
//!    connections its pool lacks, all at once, and hands them to the wave's connects. No
//!    request is sent for it.
//! 3. **Refining.** The failing level `hi`'s wave had `hi` requests in flight together; the
//!    `e` of them that succeeded within the latency threshold
//!    (`first_wave_within_threshold`) show the backend serving `e` at once within the
//!    thresholds, which is what a passing wave of `e` shows. When `lo < e < hi`, `e` is the
//!    result and the search ends without another level (on a step knee `e` is the knee
//!    itself: 100 for K = 100, where the growth passed 94 and failed 141; on a smoothly
//!    rising one it is where the threshold is crossed). When `e = lo` the result is `lo`.
//!    Otherwise (noise) the next level is the geometric midpoint `sqrt(lo x hi)`, one wave,
//!    until `hi <= lo x (1 + tolerance)` or `hi = lo + 1`; a failing midpoint's own estimate
//!    is used the same way. The result is `lo`: a passing level, or a count of requests
//!    served within the thresholds together.
//!
//!    A passing wave that had errors (within `error_threshold`) counts for the requests it
//!    served, not for its size: on a 503 knee at 100 a wave of 103 passes with 3 errors
//!    (2.9%), and sets `lo` to 100, so the probe is exact on a 503 knee (it reported 103
//!    once, then spent 3 more waves bisecting above it).
//!
//! **Peak in-flight.** A level is never more than `probe_growth` times the number of
//! requests the previous level had answered fast, `1 + tolerance` times the previous
//! (passing) level, or one more than it; and levels never overlap, so the backend's in-flight
//! count is the level. A backend that serves at most `K` requests at once at its baseline
//! latency (the knee) can answer at most `K` of one wave fast, and a wave much above `K`
//! fails (a one-wave level passes only up to about `1.05 x K`, where 5% of it got 503s), so no
//! level exceeds `max(probe_growth x K, 1.16 x K, K + 2)`: **1.5 x K** for `K >= 4` with the
//! defaults (refinement levels lie strictly between `lo` and `hi`, so they are smaller
//! still). `K + 2` covers the tiny knees: from level 1 the next level is 2, and a level
//! `K + 1` may pass the error threshold. The reference doubling puts up to `2 x` the last passing level in flight:
//! 2.56 x K for K = 100 (it steps from 128 to 256).
//!
//! **Requests.** One wave per level instead of two rounds, a baseline that stops once it has
//! settled, no `probe_min_requests` floor past the baseline, a failing wave on a 503 knee
//! that stops a few requests past the knee, and the knee estimate ends the search at the
//! first failing level on a step knee: for K = 100 that is 8 + (2 + 3 + ... + 94) + 141 = 432
//! requests on a latency knee and 8 + 283 + about 106 = 397 on a 503 knee, for K = 24
//! 8 + (2 + ... + 19) + 28 = 92 (503: about 91), for K = 4 8 + 2 + 3 + 4 + 6 = 23, against
//! 1028 / 813, 324 / 271 and 123 / 111 for the adaptive doubling schedule (see
//! `BENCHMARKS.md`). Sending a wave whole and at once (the schedule before the ramp) and
//! waiting for 32 baseline requests cost 456 at K = 100 on both kinds of knee: on a 503
//! knee that was 0.56 x the doubling, which stops its failing levels early.
//!
//! **One outlier.** Levels are judged with the statistic of the `measure` module: the p99
//! from 100 samples up, the second-worst sample below, so one slow response never fails a
//! level. A level whose failure rests on a single error (e.g. one reset connection at level
//! 9, 11% > 5%) is measured once more, and the second measurement decides; a real knee fails
//! both times (level 9 on a 503 knee at 8 fails with one error each time, which costs the
//! second wave). Likewise a level that passed by excusing its one slow response (below 100
//! samples) is measured once more and judged on both waves together: a second slow
//! response fails it. On a step knee the level `K + 1` has exactly one request past the
//! knee, so without this it would pass (K = 4 found 5 when level 4's fast count made the
//! next level 5); a transient outlier does not come back.
//!
//! # The reference schedules
//!
//! [`Schedule::Plain`] and [`Schedule::Adaptive`] are the original doubling searches, kept
//! for comparison (`benches/schedule.rs`) and for callers that relied on them. Both step the
//! concurrency up 1, 2, 4, 8, ... (capped at `max_probe_concurrency`) until a level fails,
//! each level sending `max(probe_min_requests, 2 x level)` requests, judged by the
//! nearest-rank p99.
//!
//! * [`Schedule::Plain`] is the plain binary search: every level sends its whole plan, and the
//!   search halves `[lo, hi]` until `hi - lo == 1`.
//! * [`Schedule::Adaptive`] finds the same knee to within a relative `tolerance` (10%) with
//!   fewer requests:
//!   1. a failing level stops issuing as soon as its failure is certain (see the `measure`
//!      module: the verdict is the one the whole plan would give) and drains its in-flight
//!      requests;
//!   2. *knee estimate*: at a failing level, the first wave's fast successes count how many
//!      requests the endpoint served without slowing down. That count is probed next (a
//!      *guess*), followed by one *confirmation* `tolerance` above it (when it passed) or
//!      below it (when it failed). A good estimate closes the interval in two levels; a bad
//!      one falls back to
//!   3. geometric bisection (`sqrt(lo * hi)`), which halves the *ratio* `hi / lo`;
//!   4. the search stops once `hi <= lo * (1 + tolerance)`, so the result is within
//!      `tolerance` below the true knee.
//!
//! Every step of every schedule keeps `lo` passing and `hi` failing, so estimates only change
//! which levels are measured, never the correctness of the interval.

use crate::config::ProbeConfig;
use crate::error::ProbeError;
use crate::measure::{run_level, LevelMeasurement, LevelPlan, Phase, Ramp};
use crate::target::{HttpTransport, ProbeClient, ProbeTarget, ProbeTransport, WarmConnector};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::time::Instant;

/// Which levels the prober measures (see the module docs of `prober.rs` for the algorithms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Doubling, then plain bisection to an exact answer; every level sends its whole plan.
    Plain,
    /// Doubling with early failure verdicts, knee-estimate guesses and geometric bisection,
    /// stopping once the interval is within `tolerance` (a fraction, e.g. `0.1`). The
    /// default until the gentle schedule replaced it.
    Adaptive {
        /// Relative width at which the search stops.
        tolerance: f64,
    },
    /// The default: a baseline that stops once settled, one wave per level growing by at
    /// most `probe_growth` (1.5) times the previous level's fast responses (the part above
    /// them ramped in, stopping once the wave fails), an outlier-tolerant latency statistic
    /// and a refinement that usually ends at the first failing level. Keeps the backend's
    /// in-flight requests within 1.5 x its knee and sends less than half the requests of
    /// [`Schedule::Adaptive`].
    Gentle {
        /// Relative width at which the search stops.
        tolerance: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Gentle { tolerance: 0.1 }
    }
}

impl Schedule {
    /// `"plain"`, `"adaptive"` or `"gentle"`.
    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Plain => "plain",
            Schedule::Adaptive { .. } => "adaptive",
            Schedule::Gentle { .. } => "gentle",
        }
    }
}

/// What limited the capacity found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeBound {
    /// The next level up exceeded `error_threshold`.
    Errors,
    /// The next level up exceeded only `latency_threshold_ms` (worth a warning: the
    /// endpoint still answered, just slowly).
    Latency,
    /// Every level passed up to `max_probe_concurrency`.
    MaxConcurrency,
}

/// Progress of a running probe, for a CLI progress bar or logs.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeEvent {
    /// A level starts.
    LevelStarted {
        /// Requests kept in flight.
        level: usize,
        /// Doubling or bisecting.
        phase: Phase,
        /// Requests planned for it.
        planned: usize,
    },
    /// A level finished; its req/s, p99 and error rate are in the measurement.
    LevelFinished(LevelMeasurement),
}

/// The result of probing one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The endpoint (`METHOD url`).
    pub target: String,
    /// `"gentle"`, `"adaptive"` or `"plain"`.
    pub schedule: String,
    /// The highest passing concurrency: use it as the endpoint's `capacity`. Under the gentle
    /// schedule it can also be the number of requests the first failing wave had answered
    /// successfully at near-baseline latency while they were all in flight together, when
    /// that is more than the last passing level (see the `prober` module docs).
    pub max_concurrency: usize,
    /// The passing level with the highest requests/s.
    pub best_rps_level: usize,
    /// Requests/s at `best_rps_level`.
    pub best_rps: f64,
    /// What bound `max_concurrency`.
    pub bound: ProbeBound,
    /// Every level measured, in order.
    pub levels: Vec<LevelMeasurement>,
    /// Requests sent over the whole probe.
    pub total_requests: usize,
    /// Wall time of the whole probe in seconds.
    pub elapsed_secs: f64,
}

impl ProbeReport {
    /// `true` when latency, not errors, bound the result: the endpoint kept answering
    /// correctly but too slowly past `max_concurrency`.
    pub fn latency_bound(&self) -> bool {
        self.bound == ProbeBound::Latency
    }

    /// Wall time of the whole probe.
    pub fn elapsed(&self) -> Duration {
        Duration::from_secs_f64(self.elapsed_secs)
    }

    /// A plain-text table of the levels plus a summary line, for a CLI.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.target);
        let _ = writeln!(
            s,
            "{:>6}  {:<9}  {:>6}  {:>9}  {:>9}  {:>10}  {:>7}  result",
            "level", "phase", "reqs", "req/s", "p50 ms", "p99 ms", "errors"
        );
        for m in &self.levels {
            let phase = match m.phase {
                Phase::Doubling => "doubling",
                Phase::Growing => "growing",
                Phase::Bisecting => "bisecting",
            };
            let result = match (m.passed, m.errors_exceeded, m.latency_exceeded) {
                (true, _, _) => "pass",
                (false, true, true) => "FAIL errors+latency",
                (false, true, false) => "FAIL errors",
                _ => "FAIL latency",
            };
            let _ = writeln!(
                s,
                "{:>6}  {:<9}  {:>6}  {:>9.1}  {:>9.1}  {:>10.1}  {:>6.1}%  {}",
                m.level,
                phase,
                m.requests,
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.error_rate * 100.0,
                result
            );
        }
        let bound = match self.bound {
            ProbeBound::Errors => "errors",
            ProbeBound::Latency => "latency (warning: the endpoint answered, but too slowly)",
            ProbeBound::MaxConcurrency => "max_probe_concurrency",
        };
        let _ = writeln!(
            s,
            "max_concurrency {} (bound by {}); best req/s {:.1} at {}; {} requests in {:.2} s",
            self.max_concurrency,
            bound,
            self.best_rps,
            self.best_rps_level,
            self.total_requests,
            self.elapsed_secs
        );
        s
    }
}

/// Finds how many concurrent requests an endpoint can take.
///
/// Holds one pooled `hyper-util` client shared by every probe (clones share it). The probe
/// futures are cancel-safe: dropping one drops every in-flight probe request.
#[derive(Debug, Clone)]
pub struct Prober {
    config: ProbeConfig,
    request_timeout: Duration,
    schedule: Schedule,
    client: ProbeClient,
    connector: WarmConnector,
}

impl Prober {
    /// A prober with `config`, a 30 s request timeout and the gentle schedule.
    pub fn new(config: ProbeConfig) -> Self {
        let request_timeout = Duration::from_secs(30);
        let (client, connector) = build_client(&config, request_timeout);
        Self {
            client,
            connector,
            config,
            request_timeout,
            schedule: Schedule::default(),
        }
    }

    /// Sets the per-request timeout (the gateway's `upstream_timeout`); a request that takes
    /// longer counts as an error (`"timeout"`).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        (self.client, self.connector) = build_client(&self.config, timeout);
        self
    }

    /// Sets the schedule ([`Schedule::Gentle`] by default).
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// The HTTP transport for `target` on this prober's pooled client.
    pub fn transport(&self, target: &ProbeTarget) -> Result<HttpTransport, ProbeError> {
        HttpTransport::new(self.client.clone(), self.connector.clone(), target)
    }

    /// Probes `target`.
    pub async fn probe(&self, target: &ProbeTarget) -> Result<ProbeReport, ProbeError> {
        self.probe_with_progress(target, |_| {}).await
    }

    /// Probes `target`, calling `on_event` as each level starts and finishes.
    pub async fn probe_with_progress<F>(
        &self,
        target: &ProbeTarget,
        on_event: F,
    ) -> Result<ProbeReport, ProbeError>
    where
        F: FnMut(&ProbeEvent) + Send,
    {
        let transport = self.transport(target)?;
        self.probe_transport(&transport, on_event).await
    }

    /// Probes through any [`ProbeTransport`] (e.g. the gateway's balanced upstreams).
    pub async fn probe_transport<T, F>(
        &self,
        transport: &T,
        mut on_event: F,
    ) -> Result<ProbeReport, ProbeError>
    where
        T: ProbeTransport + ?Sized,
        F: FnMut(&ProbeEvent) + Send,
    {
        let started = Instant::now();
        let cfg = &self.config;
        let max = cfg.max_probe_concurrency.max(1);
        let (adaptive, tolerance) = match self.schedule {
            Schedule::Plain => (false, 0.0),
            Schedule::Adaptive { tolerance } => (true, tolerance.max(0.0)),
            Schedule::Gentle { tolerance } => (true, tolerance.max(0.0)),
        };
        let gentle = matches!(self.schedule, Schedule::Gentle { .. });
        let mut levels: Vec<LevelMeasurement> = Vec::new();
        let measure = |level: usize, phase: Phase, fast_cutoff: Option<Duration>| LevelPlan {
            level,
            phase,
            planned: cfg.probe_min_requests.max(2 * level).max(1),
            request_timeout: self.request_timeout,
            error_threshold: cfg.error_threshold,
            latency_threshold: cfg.latency_threshold(),
            // Level 1 always stops once its failure is certain: a down endpoint (possibly
            // timing out every request) is reported after a few requests, not 32 timeouts.
            early_verdict: adaptive || level == 1,
            fast_cutoff,
            tolerant_latency: gentle,
            ramp: None,
            // The gentle baseline only (level 1 is the only level without a fast cutoff).
            settle: gentle && level == 1,
        };

        // Level 1: the baseline; failing here aborts.
        let first_phase = if gentle {
            Phase::Growing
        } else {
            Phase::Doubling
        };
        let first = run_reported(
            transport,
            measure(1, first_phase, None),
            |_| {},
            &mut on_event,
        )
        .await;
        if !first.passed {
            return Err(ProbeError::FirstLevelFailed {
                target: transport.describe(),
                reason: first.failure_description(cfg.error_threshold, cfg.latency_threshold_ms),
                seen: first.outcomes_summary(),
                measurement: Box::new(first),
            });
        }
        let baseline = Duration::from_secs_f64(first.p50_ms / 1000.0);
        let fast_cutoff = (baseline * 2)
            .max(baseline + Duration::from_millis(5))
            .min(cfg.latency_threshold());
        levels.push(first);

        let (lo, hi) = if gentle {
            // A wave's part above what the backend has shown it serves is sent within half
            // the baseline latency (see `Ramp`).
            let window = baseline / 2;
            let wave = |level: usize, phase: Phase, from: usize| LevelPlan {
                level,
                phase,
                planned: level,
                request_timeout: self.request_timeout,
                error_threshold: cfg.error_threshold,
                latency_threshold: cfg.latency_threshold(),
                early_verdict: true,
                fast_cutoff: Some(fast_cutoff),
                tolerant_latency: true,
                ramp: Some(Ramp { from, window }),
                settle: false,
            };
            gentle_search(
                transport,
                wave,
                max,
                cfg.probe_growth,
                tolerance,
                &mut levels,
                &mut on_event,
            )
            .await
        } else {
            self.doubling_search(
                transport,
                measure,
                max,
                adaptive,
                tolerance,
                fast_cutoff,
                &mut levels,
                &mut on_event,
            )
            .await
        };

        let bound = match &hi {
            None => ProbeBound::MaxConcurrency,
            Some((_, m)) if m.errors_exceeded => ProbeBound::Errors,
            Some(_) => ProbeBound::Latency,
        };
        let best = levels
            .iter()
            .filter(|m| m.passed)
            .fold(None::<&LevelMeasurement>, |best, m| match best {
                Some(b) if b.rps >= m.rps => Some(b),
                _ => Some(m),
            });
        let (best_rps_level, best_rps) = best.map(|m| (m.level, m.rps)).unwrap_or((lo, 0.0));
        Ok(ProbeReport {
            target: transport.describe(),
            schedule: self.schedule.name().to_string(),
            max_concurrency: lo,
            best_rps_level,
            best_rps,
            bound,
            total_requests: levels.iter().map(|m| m.requests).sum(),
            levels,
            elapsed_secs: started.elapsed().as_secs_f64(),
        })
    }
    /// The reference schedules: doubling, then plain or adaptive refinement.
    #[allow(clippy::too_many_arguments)]
    async fn doubling_search<T, F, M>(
        &self,
        transport: &T,
        measure: M,
        max: usize,
        adaptive: bool,
        tolerance: f64,
        fast_cutoff: Duration,
        levels: &mut Vec<LevelMeasurement>,
        on_event: &mut F,
    ) -> (usize, Option<(usize, LevelMeasurement)>)
    where
        T: ProbeTransport + ?Sized,
        F: FnMut(&ProbeEvent) + Send,
        M: Fn(usize, Phase, Option<Duration>) -> LevelPlan,
    {
        // Doubling.
        let mut lo = 1usize;
        let mut hi: Option<(usize, LevelMeasurement)> = None;
        let mut level = 1usize;
        while level < max {
            level = level.saturating_mul(2).min(max);
            let m = run_reported(
                transport,
                measure(level, Phase::Doubling, Some(fast_cutoff)),
                |_| {},
                on_event,
            )
            .await;
            levels.push(m.clone());
            if m.passed {
                lo = level;
            } else {
                hi = Some((level, m));
                break;
            }
        }

        // Refining.
        let mut last_step = Step::Bisect;
        let mut last_passed = true;
        let mut guessed_from: Option<usize> = None;
        while let Some((h, hi_m)) = &hi {
            let h = *h;
            if h - lo <= 1 || (adaptive && h as f64 <= lo as f64 * (1.0 + tolerance)) {
                break;
            }
            let (p, step) = if !adaptive {
                (lo + (h - lo) / 2, Step::Bisect)
            } else {
                next_adaptive(
                    lo,
                    h,
                    hi_m,
                    tolerance,
                    last_step,
                    last_passed,
                    &mut guessed_from,
                )
            };
            let p = p.clamp(lo + 1, h - 1);
            let m = run_reported(
                transport,
                measure(p, Phase::Bisecting, Some(fast_cutoff)),
                |_| {},
                on_event,
            )
            .await;
            levels.push(m.clone());
            last_step = step;
            last_passed = m.passed;
            if m.passed {
                lo = p;
            } else {
                hi = Some((p, m));
            }
        }

        (lo, hi)
    }
}

/// The gentle schedule after the baseline (see the module docs): growing by one wave per
/// level, then refining. Returns the capacity found and the first failing level.
async fn gentle_search<T, F, W>(
    transport: &T,
    wave: W,
    max: usize,
    growth: f64,
    tolerance: f64,
    levels: &mut Vec<LevelMeasurement>,
    on_event: &mut F,
) -> (usize, Option<(usize, LevelMeasurement)>)
where
    T: ProbeTransport + ?Sized,
    F: FnMut(&ProbeEvent) + Send,
    W: Fn(usize, Phase, usize) -> LevelPlan,
{
    let within = |lo: usize, x: usize| x as f64 <= lo as f64 * (1.0 + tolerance);
    // Growing. Level 1 was served one request at a time: one fast response.
    let mut lo = 1usize;
    let mut lo_fast = 1usize;
    let mut hi: Option<(usize, LevelMeasurement)> = None;
    while lo < max {
        // `growth x` the fast answers while latency is flat; `1 + tolerance` once it rose.
        let by_fast = (growth * lo_fast as f64).floor() as usize;
        let by_level = (lo as f64 * (1.0 + tolerance)).floor() as usize;
        let next = by_fast.max(by_level).max(lo + 1).min(max);
        let plan = wave(next, Phase::Growing, lo_fast);
        let m = measure_wave(transport, plan, levels, on_event).await;
        if m.passed {
            lo = lo.max(credited(next, &m));
            lo_fast = m.first_wave_fast.unwrap_or(0);
        } else {
            hi = Some((next, m));
            break;
        }
    }

    // Refining.
    while let Some((h, hi_m)) = &hi {
        let h = *h;
        if h - lo <= 1 || within(lo, h) {
            break;
        }
        let est = hi_m.first_wave_within_threshold.unwrap_or(0);
        if est > lo && est < h {
            // The failing wave had `h` requests in flight together, and `est` of them were
            // answered successfully within the latency threshold: the backend served `est` at
            // once within the thresholds, which is what a passing wave of `est` shows.
            lo = est;
            break;
        }
        if est == lo {
            break;
        }
        // The estimate says nothing usable (latency rose gradually, or noise): bisect.
        let p = (((lo as f64) * (h as f64)).sqrt().round() as usize).clamp(lo + 1, h - 1);
        let m = measure_wave(transport, wave(p, Phase::Bisecting, lo), levels, on_event).await;
        if m.passed {
            lo = lo.max(credited(p, &m));
        } else {
            hi = Some((p, m));
        }
    }
    (lo, hi)
}

/// What a passing wave of `level` shows the backend serves: `level`, or when some of its
/// requests failed (within the error threshold), the ones that succeeded within the latency
/// threshold, all in flight together. On a 503 knee at 100 a wave of 103 passes with 3 errors
/// (2.9% < 5%), and serving 103 at once is what it did not do.
fn credited(level: usize, m: &LevelMeasurement) -> usize {
    if m.errors == 0 {
        return level;
    }
    m.first_wave_within_threshold
        .map_or(level, |ok| ok.min(level))
}

/// Measures one gentle wave, once more when its verdict rests on a single sample (see the
/// module docs); every measurement is recorded in `levels`.
///
/// * A failure that rests on a single error: the second measurement decides.
/// * A pass that excused a single slow response (fewer than 100 samples, the worst one over
///   the threshold): the level is judged on both measurements together, whose second-worst
///   sample is over the threshold when the second measurement has a slow response too.
async fn measure_wave<T, F>(
    transport: &T,
    plan: LevelPlan,
    levels: &mut Vec<LevelMeasurement>,
    on_event: &mut F,
) -> LevelMeasurement
where
    T: ProbeTransport + ?Sized,
    F: FnMut(&ProbeEvent) + Send,
{
    prepare(transport, &plan).await;
    let m = run_reported(transport, plan.clone(), |_| {}, on_event).await;
    levels.push(m.clone());
    let threshold_ms = plan.latency_threshold.as_secs_f64() * 1000.0;
    let one_error = m.errors_exceeded && !m.latency_exceeded && m.errors == 1;
    // Below 100 samples the p99 is the worst sample.
    let one_slow_excused = m.passed && m.requests < 100 && m.p99_ms > threshold_ms;
    if !one_error && !one_slow_excused {
        return m;
    }
    let first_worst_ms = m.p99_ms;
    let judge = |again: &mut LevelMeasurement| {
        if one_slow_excused && again.p99_ms > threshold_ms {
            // Two slow responses in the level's 2 x `level` samples: the second-worst of
            // them, the smaller of the two worst, is over the threshold.
            again.verdict_latency_ms = first_worst_ms.min(again.p99_ms);
            again.latency_exceeded = true;
            again.passed = false;
        }
    };
    let again = run_reported(transport, plan, judge, on_event).await;
    levels.push(again.clone());
    again
}

/// Opens the connections a wave of `plan.level` needs before it starts (see
/// [`ProbeTransport::prepare`]), waiting at most the request timeout.
async fn prepare<T: ProbeTransport + ?Sized>(transport: &T, plan: &LevelPlan) {
    let _ = tokio::time::timeout(plan.request_timeout, transport.prepare(plan.level)).await;
}

/// How the adaptive search chose a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Guess,
    Confirm,
    Bisect,
}

/// The next adaptive level strictly inside `(lo, hi)` (the caller clamps).
fn next_adaptive(
    lo: usize,
    hi: usize,
    hi_m: &LevelMeasurement,
    tolerance: f64,
    last_step: Step,
    last_passed: bool,
    guessed_from: &mut Option<usize>,
) -> (usize, Step) {
    let up = |lo: usize| ((lo as f64 * (1.0 + tolerance)).floor() as usize).max(lo + 1);
    let down = |hi: usize| ((hi as f64 / (1.0 + tolerance)).ceil() as usize).min(hi - 1);
    if last_step == Step::Guess {
        // Confirm the guess: one step of `tolerance` on the open side.
        return if last_passed {
            (up(lo), Step::Confirm)
        } else {
            (down(hi), Step::Confirm)
        };
    }
    if *guessed_from != Some(hi) {
        if let Some(est) = hi_m.first_wave_fast {
            if est == lo {
                // The knee is at `lo` itself: confirm just above it.
                *guessed_from = Some(hi);
                return (up(lo), Step::Confirm);
            }
            if est > lo && est < hi {
                *guessed_from = Some(hi);
                return (est, Step::Guess);
            }
        }
    }
    let mid = ((lo as f64) * (hi as f64)).sqrt().round() as usize;
    (mid, Step::Bisect)
}

/// Runs one level, reporting its start and end; `judge` may revise the verdict first.
async fn run_reported<T, F>(
    transport: &T,
    plan: LevelPlan,
    judge: impl FnOnce(&mut LevelMeasurement),
    on_event: &mut F,
) -> LevelMeasurement
where
    T: ProbeTransport + ?Sized,
    F: FnMut(&ProbeEvent) + Send,
{
    on_event(&ProbeEvent::LevelStarted {
        level: plan.level,
        phase: plan.phase,
        planned: plan.planned,
    });
    let mut m = run_level(transport, &plan).await;
    judge(&mut m);
    tracing::debug!(
        level = m.level,
        requests = m.requests,
        rps = m.rps,
        p99_ms = m.p99_ms,
        error_rate = m.error_rate,
        passed = m.passed,
        "probe level measured"
    );
    on_event(&ProbeEvent::LevelFinished(m.clone()));
    m
}

fn build_client(config: &ProbeConfig, timeout: Duration) -> (ProbeClient, WarmConnector) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(timeout));
    let connector = WarmConnector::new(connector);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(config.max_probe_concurrency.max(1))
        .build(connector.clone());
    (client, connector)
}
