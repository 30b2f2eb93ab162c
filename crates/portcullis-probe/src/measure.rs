//! Measuring one concurrency level.
//!
//! Under the reference schedules a level `L` is *planned* at `max(probe_min_requests, 2 * L)`
//! requests; under the gentle one at `L` (one wave, its part above the previous level's fast
//! answers ramped in: see [`Ramp`]), except the level-1 baseline at up to
//! `probe_min_requests` (it stops once settled). `L` requests are kept in flight continuously
//! (a new one starts as soon as one finishes) until the plan is sent, then the level waits
//! for the last responses. Error rate counts non-2xx responses,
//! timeouts and transport errors; p50/p99 are nearest-rank percentiles over every request;
//! requests/s is completed requests over the level's wall time.
//!
//! With `early_verdict`, a level stops *issuing* as soon as its failure is certain whatever
//! the remaining planned requests do: more than `error_threshold * planned` errors, or at
//! least `floor(planned / 100) + 1` requests slower than the latency threshold (counting
//! in-flight requests already older than it), which forces the p99 of the planned sample over
//! the threshold. The in-flight requests are then drained, not abandoned, so the next level
//! starts on a quiet backend. The verdict is always recomputed from the requests actually
//! sent, and equals the one the full plan would have given. A ramped gentle wave also stops
//! once it fails as sent so far (more than `error_threshold * sent` errors): it is then a
//! wave of the requests it sent, all in flight together.
//!
//! # The latency statistic
//!
//! The reference schedules ([`Schedule::Plain`](crate::Schedule::Plain) and
//! [`Schedule::Adaptive`](crate::Schedule::Adaptive)) compare the nearest-rank p99 with the
//! threshold. Below 100 samples that p99 *is* the worst sample, so one slow response (a GC
//! pause, a scheduler hiccup) fails the whole level: the probe once reported 14 for a knee of
//! 24-28. The gentle schedule ([`Schedule::Gentle`](crate::Schedule::Gentle)) therefore uses
//! a statistic that is defined for the sample size: the p99 when the level has at least 100
//! samples, the **second-worst sample** below that (a level of `n` requests fails on latency
//! when at least `max(2, floor(n / 100) + 1)` of them exceed the threshold; a one-request
//! level keeps its single sample). A single slow response can therefore never fail a level of
//! two or more requests. `LevelMeasurement::verdict_latency_ms` is the value compared.
//!
//! An error cannot be absorbed the same way on a small level (one error of 9 is 11%, above
//! any sensible `error_threshold`), so the gentle schedule re-measures, once, a level whose
//! failure rests on a single error (see the `prober` module).

use crate::target::{ProbeTransport, RequestOutcome};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;

/// Which part of the search a level belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Stepping up 1, 2, 4, 8, ... (the reference schedules).
    Doubling,
    /// Stepping up by at most `probe_growth` per level (the gentle schedule).
    Growing,
    /// Refining between the last passing and the first failing level.
    Bisecting,
}

/// The measurement of one concurrency level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelMeasurement {
    /// Requests kept in flight.
    pub level: usize,
    /// Part of the search this level belongs to.
    pub phase: Phase,
    /// Requests planned: `max(probe_min_requests, 2 * level)` under the reference schedules,
    /// `level` (one wave) under the gentle one past its baseline.
    pub planned: usize,
    /// Requests sent (all of them completed or timed out).
    pub requests: usize,
    /// Requests that failed (non-2xx, timeout, transport error).
    pub errors: usize,
    /// `errors / requests`.
    pub error_rate: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency in milliseconds (nearest rank; below 100 samples the worst
    /// one). The gentle schedule judges `verdict_latency_ms` instead.
    pub p99_ms: f64,
    /// Completed requests per second of the level's wall time.
    pub rps: f64,
    /// Wall time of the level in seconds.
    pub elapsed_secs: f64,
    /// `error_rate` was above `error_threshold`.
    pub errors_exceeded: bool,
    /// The latency statistic (`verdict_latency_ms`) was above `latency_threshold_ms`.
    pub latency_exceeded: bool,
    /// Neither threshold was exceeded.
    pub passed: bool,
    /// The level stopped issuing before its plan: its failure was already certain (for a
    /// gentle wave: as sent so far), or a gentle baseline had settled.
    pub stopped_early: bool,
    /// How many requests ended each way (`"200"`, `"503"`, `"timeout"`, `"connect error"`...).
    pub outcomes: BTreeMap<String, usize>,
    /// Of the first `level` requests (the first wave), how many succeeded at near-baseline
    /// latency: an estimate of the concurrency the endpoint serves without slowing down.
    /// `None` when no baseline was known (level 1).
    pub first_wave_fast: Option<usize>,
    /// Of the first `level` requests, how many succeeded within `latency_threshold_ms`: with
    /// the whole wave in flight together, that many were served within the thresholds at once
    /// (the gentle schedule's knee estimate). `None` at level 1; absent (`None`) in reports
    /// written before it existed.
    #[serde(default)]
    pub first_wave_within_threshold: Option<usize>,
    /// The latency compared with `latency_threshold_ms`: `p99_ms` under the reference
    /// schedules, and under the gentle one the p99 from 100 samples up and the second-worst
    /// sample below (see the module docs). Absent (0) in reports written before it existed.
    #[serde(default)]
    pub verdict_latency_ms: f64,
}

impl LevelMeasurement {
    /// A one-line description of why the level failed (empty when it passed).
    pub fn failure_description(&self, error_threshold: f64, latency_threshold_ms: f64) -> String {
        let mut parts = Vec::new();
        if self.errors_exceeded {
            parts.push(format!(
                "error rate {:.1}% > {:.1}%",
                self.error_rate * 100.0,
                error_threshold * 100.0
            ));
        }
        if self.latency_exceeded {
            // The statistic the verdict compared (see the module docs).
            let (name, ms) =
                if self.verdict_latency_ms > 0.0 && self.verdict_latency_ms != self.p99_ms {
                    ("second-worst latency", self.verdict_latency_ms)
                } else {
                    ("p99", self.p99_ms)
                };
            parts.push(format!("{name} {ms:.1} ms > {latency_threshold_ms} ms"));
        }
        parts.join(", ")
    }

    /// The outcome histogram as `"503 x32, connect error x2"`, most frequent first.
    pub fn outcomes_summary(&self) -> String {
        let mut v: Vec<_> = self.outcomes.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Everything a level run needs besides the transport.
#[derive(Debug, Clone)]
pub(crate) struct LevelPlan {
    pub(crate) level: usize,
    pub(crate) phase: Phase,
    pub(crate) planned: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) error_threshold: f64,
    pub(crate) latency_threshold: Duration,
    pub(crate) early_verdict: bool,
    /// Latency up to which a first-wave success counts as "fast".
    pub(crate) fast_cutoff: Option<Duration>,
    /// Use the outlier-tolerant latency statistic (see the module docs) instead of the
    /// nearest-rank p99.
    pub(crate) tolerant_latency: bool,
    /// A gentle wave sends its part above a proven count in steps (see [`Ramp`]).
    pub(crate) ramp: Option<Ramp>,
    /// The gentle baseline: stop issuing once the last [`SETTLE_SAMPLES`] requests all
    /// succeeded within 25% of each other (see the `prober` module docs).
    pub(crate) settle: bool,
}

/// Requests after which a settled baseline stops (see [`LevelPlan::settle`]).
pub(crate) const SETTLE_SAMPLES: usize = 8;

/// The last [`SETTLE_SAMPLES`] of `latencies` (in completion order) agree within 25%.
fn settled(latencies: &[Duration]) -> bool {
    let Some(last) = latencies
        .len()
        .checked_sub(SETTLE_SAMPLES)
        .map(|i| &latencies[i..])
    else {
        return false;
    };
    let (lo, hi) = last
        .iter()
        .fold((Duration::MAX, Duration::ZERO), |(lo, hi), &d| {
            (lo.min(d), hi.max(d))
        });
    hi <= lo.mul_f64(1.25)
}

/// How a gentle wave of `level` requests is sent: `from` of them at once (as many as the
/// previous level answered fast, a count the backend has shown it serves), the rest in
/// [`RAMP_STEPS`] equal steps spread over `window`.
///
/// The window is half the baseline latency: short enough that the first requests are still
/// in flight when the last ones arrive (the wave stays one concurrency level), and no
/// shorter, so that the 503s of one step are back before many more steps go out (a quarter
/// of the baseline in 8 steps, 625 µs apart, sent 118-124 of the failing wave at K = 100 on
/// the loaded benchmark machine).
///
/// While it ramps, the wave stops as soon as it fails *as sent so far*: more than
/// `error_threshold` of the requests sent have already failed. On a 503 knee the answers
/// past the knee come back at once, so the failing wave stops a few requests past the knee
/// instead of sending its whole size (106-109 of 141 at K = 100); a latency knee shows
/// nothing within the window, so there the wave is sent whole, as before.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ramp {
    pub(crate) from: usize,
    pub(crate) window: Duration,
}

/// Steps of a [`Ramp`].
pub(crate) const RAMP_STEPS: u32 = 16;

impl Ramp {
    /// Requests of a wave of `level` that may have been sent `elapsed` after its start, and
    /// when that number next grows (`None`: the whole wave may be sent).
    fn allowed(&self, level: usize, elapsed: Duration) -> (usize, Option<Duration>) {
        let from = self.from.min(level);
        let step = self.window / RAMP_STEPS;
        let done = if step.is_zero() {
            RAMP_STEPS
        } else {
            (elapsed.as_nanos() / step.as_nanos()).min(u128::from(RAMP_STEPS)) as u32 + 1
        };
        if done >= RAMP_STEPS {
            return (level, None);
        }
        let extra = (level - from) * done as usize;
        (
            from + extra.div_ceil(RAMP_STEPS as usize),
            Some(step * done),
        )
    }
}

/// Requests of `n` that must exceed the threshold for the nearest-rank p99 to exceed it.
pub(crate) fn slow_needed(n: usize) -> usize {
    n / 100 + 1
}

/// Requests of `n` that must exceed the threshold to fail a level under the outlier-tolerant
/// statistic: as many as the p99 needs, and never fewer than two (one for a single sample).
pub(crate) fn slow_needed_tolerant(n: usize) -> usize {
    slow_needed(n).max(2).min(n.max(1))
}

impl LevelPlan {
    fn slow_needed(&self, n: usize) -> usize {
        if self.tolerant_latency {
            slow_needed_tolerant(n)
        } else {
            slow_needed(n)
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

type Timed = Pin<Box<dyn Future<Output = (u64, Duration, RequestOutcome)> + Send>>;

/// Runs one level against `transport`. Cancel-safe: dropping the future drops every in-flight
/// request future.
pub(crate) async fn run_level<T: ProbeTransport + ?Sized>(
    transport: &T,
    plan: &LevelPlan,
) -> LevelMeasurement {
    let level = plan.level.max(1);
    let planned = plan.planned.max(1);
    let thr = plan.latency_threshold;
    let started = Instant::now();

    let mut inflight: FuturesUnordered<Timed> = FuturesUnordered::new();
    // id -> issue time of in-flight requests; ids increase with issue time.
    let mut issued_at: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut latencies: Vec<Duration> = Vec::with_capacity(planned);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut sent = 0usize;
    let mut errors = 0usize;
    let mut slow_done = 0usize;
    let mut first_wave_fast = 0usize;
    let mut first_wave_ok = 0usize;
    let mut stop_issuing = false;
    // A settled baseline's successes in a row (an error restarts the count).
    let mut ok_run: Vec<Duration> = Vec::new();

    loop {
        // A ramped wave: how many may be sent by now, and when more may.
        let (allowed, next_step) = match plan.ramp {
            Some(ramp) => ramp.allowed(level, started.elapsed()),
            None => (planned, None),
        };
        let next_step = next_step.map(|d| started + d);
        while !stop_issuing && inflight.len() < level && sent < planned.min(allowed) {
            let id = sent as u64;
            let now = Instant::now();
            issued_at.insert(id, now);
            let fut = transport.send();
            let timeout = plan.request_timeout;
            inflight.push(Box::pin(async move {
                let outcome = match tokio::time::timeout(timeout, fut).await {
                    Ok(o) => o,
                    Err(_) => RequestOutcome::Timeout,
                };
                (id, now.elapsed(), outcome)
            }));
            sent += 1;
        }
        let ramp_at = next_step.filter(|_| !stop_issuing && sent < planned);
        if inflight.is_empty() {
            match ramp_at {
                // Everything sent so far has answered before the ramp's next step.
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                None => break,
            }
        }

        // While a failure is still undecided, wake up when the oldest in-flight request
        // that is not yet slow becomes slow.
        let slow_at = if plan.early_verdict && !stop_issuing {
            issued_at
                .values()
                .map(|t| *t + thr + Duration::from_millis(1))
                .find(|deadline| *deadline > Instant::now())
        } else {
            None
        };
        // ... and when a ramped wave may send its next step.
        let wake = match (slow_at, ramp_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };

        tokio::select! {
            biased;
            done = inflight.next() => {
                if let Some((id, latency, outcome)) = done {
                    issued_at.remove(&id);
                    let ok = outcome.is_success();
                    if !ok {
                        errors += 1;
                    }
                    if latency > thr {
                        slow_done += 1;
                    }
                    if let Some(cut) = plan.fast_cutoff {
                        if ok && (id as usize) < level && latency <= cut {
                            first_wave_fast += 1;
                        }
                        if ok && (id as usize) < level && latency <= thr {
                            first_wave_ok += 1;
                        }
                    }
                    *outcomes.entry(outcome.label()).or_default() += 1;
                    latencies.push(latency);
                    if plan.settle {
                        if ok {
                            ok_run.push(latency);
                        } else {
                            ok_run.clear();
                        }
                        if settled(&ok_run) {
                            stop_issuing = true;
                        }
                    }
                }
            }
            _ = sleep_until_opt(wake), if wake.is_some() => {}
        }

        if plan.early_verdict && !stop_issuing && sent < planned {
            let now = Instant::now();
            let slow_inflight = issued_at
                .values()
                .take_while(|t| now.saturating_duration_since(**t) > thr)
                .count();
            // A ramped wave that stops now is a wave of the requests sent so far.
            let of = if plan.ramp.is_some() { sent } else { planned };
            let errors_certain = errors as f64 > plan.error_threshold * of as f64;
            let latency_certain = slow_done + slow_inflight >= plan.slow_needed(planned);
            if errors_certain || latency_certain {
                stop_issuing = true;
            }
        }
    }

    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let n = latencies.len().max(1);
    let error_rate = errors as f64 / n as f64;
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let errors_exceeded = error_rate > plan.error_threshold;
    // The k-th worst sample, k = the number of slow requests that fails the level: it
    // exceeds the threshold exactly when at least k samples do.
    let verdict = if latencies.is_empty() {
        Duration::ZERO
    } else {
        let k = plan.slow_needed(latencies.len());
        latencies[latencies.len() - k]
    };
    let latency_exceeded = verdict > thr;
    let secs = elapsed.as_secs_f64();
    LevelMeasurement {
        level,
        phase: plan.phase,
        planned,
        requests: latencies.len(),
        errors,
        error_rate,
        p50_ms: p50.as_secs_f64() * 1000.0,
        p99_ms: p99.as_secs_f64() * 1000.0,
        rps: if secs > 0.0 {
            latencies.len() as f64 / secs
        } else {
            0.0
        },
        elapsed_secs: secs,
        errors_exceeded,
        latency_exceeded,
        passed: !errors_exceeded && !latency_exceeded,
        stopped_early: stop_issuing,
        outcomes: outcomes.into_iter().collect(),
        first_wave_fast: plan.fast_cutoff.map(|_| first_wave_fast),
        first_wave_within_threshold: plan.fast_cutoff.map(|_| first_wave_ok),
        verdict_latency_ms: verdict.as_secs_f64() * 1000.0,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_slow_count_matches_nearest_rank() {
        let ms = Duration::from_millis;
        for n in [1usize, 2, 31, 32, 99, 100, 101, 199, 200, 256, 1000] {
            let need = slow_needed(n);
            // exactly `need` slow values push p99 over, one fewer does not
            let mut v = vec![ms(1); n - need];
            v.extend(std::iter::repeat_n(ms(100), need));
            assert_eq!(percentile(&v, 0.99), ms(100), "n={n}");
            if need > 0 {
                let mut w = vec![ms(1); n - need + 1];
                w.extend(std::iter::repeat_n(ms(100), need - 1));
                assert_eq!(percentile(&w, 0.99), ms(1), "n={n}");
            }
        }
    }

    #[test]
    fn tolerant_statistic_absorbs_one_outlier() {
        assert_eq!(slow_needed_tolerant(1), 1);
        assert_eq!(slow_needed_tolerant(2), 2);
        assert_eq!(slow_needed_tolerant(32), 2);
        assert_eq!(slow_needed_tolerant(99), 2);
        // from 100 samples on it is the p99 itself
        for n in [100usize, 199, 200, 256, 1000] {
            assert_eq!(slow_needed_tolerant(n), slow_needed(n), "n={n}");
        }
    }
}
