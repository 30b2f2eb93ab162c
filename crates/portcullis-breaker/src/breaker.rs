//! [`Breaker`]: the shared state machine behind both service forms.
//!
//! The state lives in atomics. The NORMAL request path reads one `AtomicU64` to route, and
//! on completion either reads (success) or increments (failure) the failure streak: no lock,
//! no allocation. The trip timestamp and the state are one word (`tripped_at`: 0 in NORMAL,
//! else nanoseconds since the breaker was built + 1), so "engage and remember when" is a
//! single compare-and-swap and exactly one caller wins each transition (and logs it).

use crate::config::Config;
use crate::prober::{self, RetryPolicy};
use crate::snapshot::{BreakerState, Counters, HealthReport, ProbeReport, Side, StatusSnapshot};
use arc_swap::ArcSwapOption;
use portcullis_core::HealthSource;
use portcullis_health::{HttpProbe, Probe};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The circuit breaker shared by every clone of a [`Fallback`](crate::Fallback) or
/// [`HttpFallback`](crate::HttpFallback) service: state, counters and the owned background
/// prober.
///
/// Cheap to clone (an `Arc`). The prober task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("primary", &self.shared.primary_target)
            .field("fallback", &self.shared.fallback_target)
            .finish()
    }
}

/// Builds a [`Breaker`] ([`Breaker::builder`]).
pub struct BreakerBuilder {
    config: Config,
    primary_target: String,
    fallback_target: Option<String>,
    /// `fallback_target(None)` was called: no fallback, even when a layer is given one.
    fallback_off: bool,
    health_endpoint: String,
    probe: Option<Arc<dyn Probe>>,
}

impl fmt::Debug for BreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBuilder")
            .field("config", &self.config)
            .field("primary_target", &self.primary_target)
            .field("fallback_target", &self.fallback_target)
            .field("fallback_off", &self.fallback_off)
            .field("health_endpoint", &self.health_endpoint)
            .field("probe", &self.probe.as_ref().map(|_| ".."))
            .finish()
    }
}

impl BreakerBuilder {
    /// The primary's probe target: its base URL for the HTTP probe (the probe sends
    /// `GET <primary><health_endpoint>`), any key for an injected probe. Default `"primary"`.
    pub fn primary_target(mut self, target: impl Into<String>) -> Self {
        self.primary_target = target.into();
        self
    }

    /// The fallback's probe target (what [`Breaker::force_health_check`] probes besides the
    /// primary). Defaults to `config.url`.
    ///
    /// `Some(target)` configures a fallback at once. An explicit `None` turns the fallback
    /// off: the breaker never routes to it, even when a layer is given a fallback service,
    /// and a trip only reports `primary_unhealthy`.
    ///
    /// Without this call and without `config.url`, the fallback is configured by the first
    /// [`FallbackLayer`](crate::FallbackLayer), [`HttpFallbackLayer`](crate::HttpFallbackLayer),
    /// [`Fallback`](crate::Fallback) or [`HttpFallback`](crate::HttpFallback) built with this
    /// breaker: a fallback *service* is a fallback, whether or not it has a URL (an
    /// in-process fallback). Only its URL probe is then missing from `force_health_check`.
    pub fn fallback_target(mut self, target: Option<String>) -> Self {
        self.fallback_off = target.is_none();
        self.fallback_target = target;
        self
    }

    /// The health path of the default [`HttpProbe`] (default `/healthz`).
    pub fn health_endpoint(mut self, path: impl Into<String>) -> Self {
        self.health_endpoint = path.into();
        self
    }

    /// Uses `probe` instead of the default [`HttpProbe`] (tests, non-HTTP targets, or a probe
    /// that asks the balancer whether any replica is healthy).
    pub fn probe(mut self, probe: impl Probe) -> Self {
        self.probe = Some(Arc::new(probe));
        self
    }

    /// Builds the breaker and spawns its prober task.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime (like `tokio::spawn`).
    pub fn build(self) -> Breaker {
        let probe = self.probe.unwrap_or_else(|| {
            Arc::new(HttpProbe::new(
                self.health_endpoint.clone(),
                self.config.probe_timeout,
            ))
        });
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            has_fallback: AtomicBool::new(self.fallback_target.is_some()),
            fallback_off: self.fallback_off,
            primary_target: self.primary_target.into(),
            fallback_target: self.fallback_target.map(Into::into),
            policy: RetryPolicy::of(&self.config),
            config: self.config,
            probe,
            base: Instant::now(),
            tripped_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            recovery_successes: AtomicU32::new(0),
            half_open_counter: AtomicU64::new(0),
            trial_in_flight: AtomicBool::new(false),
            warned_no_fallback: AtomicBool::new(false),
            warned_fallback_failing: AtomicBool::new(false),
            last_probe: ArcSwapOption::empty(),
            counters: AtomicCounters::default(),
            wake: wake.clone(),
            prober: OnceLock::new(),
        });
        let task = tokio::spawn(prober::run(Arc::downgrade(&shared), wake));
        let _ = shared.prober.set(task.abort_handle());
        tracing::info!(
            primary = %shared.primary_target,
            fallback = shared.fallback_target.as_deref().unwrap_or("<none>"),
            failure_threshold = shared.config.failure_threshold,
            recheck_interval_s = shared.config.recheck_interval.as_secs_f64(),
            min_fallback_duration_s = shared.config.min_fallback_duration.as_secs_f64(),
            recovery_success_threshold = shared.config.recovery_success_threshold,
            probe_max_retries = shared.config.probe_max_retries,
            probe_backoff_base_s = shared.config.probe_backoff_base.as_secs_f64(),
            "circuit breaker ready"
        );
        Breaker { shared }
    }
}

pub(crate) struct Shared {
    config: Config,
    policy: RetryPolicy,
    /// A fallback is configured: a target was given, or a fallback service was attached
    /// ([`Breaker::attach_fallback`]).
    has_fallback: AtomicBool,
    /// The builder turned the fallback off: attaching a service does not configure one.
    fallback_off: bool,
    primary_target: Arc<str>,
    fallback_target: Option<Arc<str>>,
    probe: Arc<dyn Probe>,
    base: Instant,
    /// 0 = NORMAL; else nanoseconds since `base` at the trip, plus one.
    tripped_at: AtomicU64,
    failures: AtomicU32,
    recovery_successes: AtomicU32,
    half_open_counter: AtomicU64,
    trial_in_flight: AtomicBool,
    warned_no_fallback: AtomicBool,
    warned_fallback_failing: AtomicBool,
    last_probe: ArcSwapOption<ProbeReport>,
    counters: AtomicCounters,
    wake: Arc<Notify>,
    prober: OnceLock<AbortHandle>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(p) = self.prober.get() {
            p.abort();
        }
    }
}

#[derive(Default)]
struct AtomicCounters {
    fallback_engaged: AtomicU64,
    recovered: AtomicU64,
    primary_unhealthy: AtomicU64,
    primary_unhealthy_cleared: AtomicU64,
    primary_failures: AtomicU64,
    fallback_failures: AtomicU64,
    probes: AtomicU64,
    probe_failures: AtomicU64,
    probe_attempts: AtomicU64,
    forced_checks: AtomicU64,
    half_open_trials: AtomicU64,
    half_open_failures: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl AtomicCounters {
    fn read(&self) -> Counters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            fallback_engaged: r(&self.fallback_engaged),
            recovered: r(&self.recovered),
            primary_unhealthy: r(&self.primary_unhealthy),
            primary_unhealthy_cleared: r(&self.primary_unhealthy_cleared),
            primary_failures: r(&self.primary_failures),
            fallback_failures: r(&self.fallback_failures),
            probes: r(&self.probes),
            probe_failures: r(&self.probe_failures),
            probe_attempts: r(&self.probe_attempts),
            forced_checks: r(&self.forced_checks),
            half_open_trials: r(&self.half_open_trials),
            half_open_failures: r(&self.half_open_failures),
        }
    }
}

/// Where one request goes, decided in `call`.
#[derive(Debug)]
pub(crate) enum Route {
    Primary,
    Fallback,
    /// A half-open trial of the primary while the fallback is engaged.
    Trial(TrialGuard),
}

/// The readiness of a service that routes between the two sides (both `Fallback` forms):
/// the primary's (`primary`, already polled) and, when a fallback is configured and has not
/// already failed, the fallback's. A fallback `poll_ready` error goes to `failed`, to be
/// answered to the next request routed there, and counts as ready: a broken fallback must
/// not stop the primary's traffic.
pub(crate) fn poll_both_ready<E>(
    breaker: &Breaker,
    primary: Poll<()>,
    fallback_failed: bool,
    poll_fallback: impl FnOnce() -> Poll<Result<(), E>>,
    failed: impl FnOnce(E),
) -> Poll<()> {
    let fallback = if breaker.has_fallback() && !fallback_failed {
        match poll_fallback() {
            Poll::Ready(Err(e)) => {
                failed(e);
                Poll::Ready(())
            }
            ready => ready.map(drop),
        }
    } else {
        Poll::Ready(())
    };
    if primary.is_ready() && fallback.is_ready() {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

/// Holds the single half-open trial slot; released on drop (a cancelled trial counts for
/// nothing).
#[derive(Debug)]
pub(crate) struct TrialGuard {
    breaker: Breaker,
}

impl Drop for TrialGuard {
    fn drop(&mut self) {
        self.breaker
            .shared
            .trial_in_flight
            .store(false, Ordering::Release);
    }
}

impl TrialGuard {
    fn record(self, ok: bool) {
        let s = &self.breaker.shared;
        if ok {
            s.on_recovery_success("half-open trial");
        } else {
            inc(&s.counters.half_open_failures);
            s.on_recovery_failure("half-open trial");
        }
    }
}

/// Records the outcome of a primary call: the failure streak for normal calls, the recovery
/// count for half-open trials.
#[derive(Debug)]
pub(crate) enum Recorder {
    Normal(Breaker),
    Trial(TrialGuard),
}

impl Recorder {
    #[inline]
    pub(crate) fn record(self, ok: bool) {
        match self {
            Recorder::Normal(b) => {
                if ok {
                    b.record_success()
                } else {
                    b.record_failure()
                }
            }
            Recorder::Trial(g) => g.record(ok),
        }
    }
}

impl Shared {
    fn now_tag(&self) -> u64 {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        nanos.saturating_add(1)
    }

    fn age(&self, tag: u64) -> Duration {
        let now = self.now_tag();
        Duration::from_nanos(now.saturating_sub(tag))
    }

    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped_at.load(Ordering::Acquire) != 0
    }

    fn has_fallback(&self) -> bool {
        self.has_fallback.load(Ordering::Acquire)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn probe(&self) -> &Arc<dyn Probe> {
        &self.probe
    }

    pub(crate) fn primary_target(&self) -> &str {
        &self.primary_target
    }

    fn trip(&self, failures: u32) {
        let tag = self.now_tag();
        if self
            .tripped_at
            .compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.recovery_successes.store(0, Ordering::Relaxed);
        self.half_open_counter.store(0, Ordering::Relaxed);
        self.warned_fallback_failing.store(false, Ordering::Relaxed);
        if self.has_fallback() {
            inc(&self.counters.fallback_engaged);
            tracing::warn!(
                consecutive_failures = failures,
                failure_threshold = self.config.failure_threshold,
                primary = %self.primary_target,
                fallback = self.fallback_target.as_deref().unwrap_or(""),
                "primary failed {failures} consecutive times: engaging the fallback"
            );
        } else {
            inc(&self.counters.primary_unhealthy);
            if !self.warned_no_fallback.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    consecutive_failures = failures,
                    primary = %self.primary_target,
                    "primary unhealthy after {failures} consecutive failures but no fallback is \
                     configured: requests keep going to the primary (logged once)"
                );
            } else {
                tracing::debug!(
                    consecutive_failures = failures,
                    "primary unhealthy again (no fallback)"
                );
            }
        }
        self.wake.notify_one();
    }

    fn recover(&self, tag: u64, reason: &str) {
        if self
            .tripped_at
            .compare_exchange(tag, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.recovery_successes.store(0, Ordering::Relaxed);
        let held = self.age(tag).as_secs_f64();
        if self.has_fallback() {
            inc(&self.counters.recovered);
            tracing::info!(
                primary = %self.primary_target,
                held_s = held,
                "switching back to the primary: {reason}"
            );
        } else {
            inc(&self.counters.primary_unhealthy_cleared);
            tracing::info!(primary = %self.primary_target, "primary healthy again: {reason}");
        }
    }

    pub(crate) fn on_recovery_success(&self, via: &str) {
        let tag = self.tripped_at.load(Ordering::Acquire);
        if tag == 0 {
            return;
        }
        let n = self.recovery_successes.fetch_add(1, Ordering::AcqRel) + 1;
        let age = self.age(tag);
        let hold = self.config.min_fallback_duration;
        let needed = self.config.recovery_success_threshold;
        if age >= hold && n >= needed {
            self.recover(
                tag,
                &format!(
                    "both recovery gates hold ({n} consecutive successes, last by {via}; \
                     {:.1}s on the fallback >= min_fallback_duration {:.1}s)",
                    age.as_secs_f64(),
                    hold.as_secs_f64()
                ),
            );
        } else {
            tracing::debug!(
                via,
                consecutive_successes = n,
                recovery_success_threshold = needed,
                hold_remaining_s = hold.saturating_sub(age).as_secs_f64(),
                "primary recheck ok; recovery gates not yet satisfied"
            );
        }
    }

    pub(crate) fn on_recovery_failure(&self, via: &str) {
        let before = self.recovery_successes.swap(0, Ordering::AcqRel);
        if before > 0 {
            tracing::info!(
                via,
                reset_from = before,
                "primary recheck failed; recovery count reset"
            );
        } else {
            tracing::debug!(via, "primary still unhealthy");
        }
    }

    fn apply_primary_probe(&self, report: &ProbeReport) {
        self.counters
            .probe_attempts
            .fetch_add(u64::from(report.attempts), Ordering::Relaxed);
        if self.is_tripped() {
            if report.healthy {
                self.on_recovery_success("probe");
            } else {
                self.on_recovery_failure("probe");
            }
        } else if report.healthy {
            self.failures.store(0, Ordering::Relaxed);
        } else {
            let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.config.failure_threshold {
                self.trip(n);
            }
        }
    }

    pub(crate) fn apply_background_probe(&self, report: ProbeReport) {
        inc(&self.counters.probes);
        if !report.healthy {
            inc(&self.counters.probe_failures);
        }
        tracing::debug!(
            healthy = report.healthy,
            attempts = report.attempts,
            elapsed_s = report.elapsed_seconds,
            detail = %report.detail,
            "background probe of the primary"
        );
        let report = Arc::new(report);
        self.last_probe.store(Some(report.clone()));
        self.apply_primary_probe(&report);
    }
}

impl Breaker {
    /// A builder for a breaker configured by `config` (the fallback target defaults to
    /// `config.url`).
    pub fn builder(config: Config) -> BreakerBuilder {
        BreakerBuilder {
            fallback_target: config.url.clone(),
            fallback_off: false,
            config,
            primary_target: "primary".into(),
            health_endpoint: "/healthz".into(),
            probe: None,
        }
    }

    /// The HTTP breaker: probes `GET <primary_base_url><health_endpoint>` with the pooled
    /// [`HttpProbe`] (timeout `probe_timeout`); the fallback is `config.url`.
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime.
    pub fn http(config: Config, primary_base_url: &str, health_endpoint: &str) -> Self {
        Self::builder(config)
            .primary_target(primary_base_url)
            .health_endpoint(health_endpoint)
            .build()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// `true` when a fallback is configured: a fallback target was given (`config.url` or
    /// [`BreakerBuilder::fallback_target`]), or a fallback service was given to a layer or
    /// service built with this breaker (unless the builder turned the fallback off).
    pub fn has_fallback(&self) -> bool {
        self.shared.has_fallback()
    }

    /// Records that a fallback service routes with this breaker, which configures the
    /// fallback (see [`BreakerBuilder::fallback_target`]). Called by the constructors of
    /// every fallback layer and service.
    pub(crate) fn attach_fallback(&self) {
        let s = &self.shared;
        if s.fallback_off || s.has_fallback() {
            return;
        }
        if !s.has_fallback.swap(true, Ordering::AcqRel) {
            tracing::debug!(
                primary = %s.primary_target,
                "fallback service attached: the breaker routes to it once tripped"
            );
        }
    }

    /// The current state (one atomic load).
    pub fn state(&self) -> BreakerState {
        match (self.shared.is_tripped(), self.shared.has_fallback()) {
            (false, _) => BreakerState::Normal,
            (true, true) => BreakerState::Fallback,
            (true, false) => BreakerState::PrimaryUnhealthy,
        }
    }

    /// `true` while traffic goes to the fallback.
    pub fn is_using_fallback(&self) -> bool {
        self.state() == BreakerState::Fallback
    }

    /// The transition and probe counters.
    pub fn counters(&self) -> Counters {
        self.shared.counters.read()
    }

    #[inline]
    pub(crate) fn route(&self) -> Route {
        let tag = self.shared.tripped_at.load(Ordering::Acquire);
        if tag == 0 || !self.shared.has_fallback() {
            return Route::Primary;
        }
        self.route_tripped(tag)
    }

    #[cold]
    fn route_tripped(&self, tag: u64) -> Route {
        let s = &self.shared;
        let ho = &s.config.half_open;
        if ho.enabled && s.age(tag) >= s.config.min_fallback_duration {
            let n = s.half_open_counter.fetch_add(1, Ordering::Relaxed) + 1;
            if n % u64::from(ho.one_in.max(1)) == 0
                && !s.trial_in_flight.swap(true, Ordering::AcqRel)
            {
                inc(&s.counters.half_open_trials);
                tracing::debug!("half-open: one live request tries the primary");
                return Route::Trial(TrialGuard {
                    breaker: self.clone(),
                });
            }
        }
        Route::Fallback
    }

    /// Records a successful primary response: resets the failure streak (no-op while the
    /// fallback is engaged; clears `primary_unhealthy` when no fallback is configured).
    #[inline]
    pub fn record_success(&self) {
        let s = &self.shared;
        let tag = s.tripped_at.load(Ordering::Acquire);
        if tag != 0 {
            if !s.has_fallback() {
                s.recover(tag, "a live request to the primary succeeded");
            }
            return;
        }
        if s.failures.load(Ordering::Relaxed) != 0 {
            s.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed primary response: after `failure_threshold` consecutive failures the
    /// fallback engages (no-op while it is engaged).
    pub fn record_failure(&self) {
        let s = &self.shared;
        inc(&s.counters.primary_failures);
        if s.is_tripped() {
            return;
        }
        let n = s.failures.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::debug!(
            consecutive_failures = n,
            failure_threshold = s.config.failure_threshold,
            "primary failure"
        );
        if n >= s.config.failure_threshold {
            s.trip(n);
        }
    }

    /// Records the outcome of a fallback call (counted; a failure is logged once per
    /// engagement).
    pub(crate) fn record_fallback(&self, ok: bool) {
        if ok {
            return;
        }
        let s = &self.shared;
        inc(&s.counters.fallback_failures);
        if !s.warned_fallback_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                fallback = s.fallback_target.as_deref().unwrap_or(""),
                "the fallback failed while engaged: answering fallback_unavailable \
                 (logged once per engagement)"
            );
        }
    }

    /// The breaker's state, read from atomics: no I/O, no lock (serialize it for
    /// `/balancer/stats`).
    pub fn status_snapshot(&self) -> StatusSnapshot {
        let s = &self.shared;
        let tag = s.tripped_at.load(Ordering::Acquire);
        let state = self.state();
        let using_fallback = state == BreakerState::Fallback;
        let age = (tag != 0).then(|| s.age(tag));
        let hold = s.config.min_fallback_duration;
        let last = s.last_probe.load_full();
        let active_url = if using_fallback {
            s.fallback_target.as_deref().unwrap_or_default()
        } else {
            &s.primary_target
        };
        StatusSnapshot {
            state,
            active: if using_fallback {
                Side::Fallback
            } else {
                Side::Primary
            },
            active_url: active_url.to_owned(),
            using_fallback,
            fallback_configured: s.has_fallback(),
            consecutive_failures: s.failures.load(Ordering::Relaxed),
            failure_threshold: s.config.failure_threshold,
            consecutive_recovery_successes: s.recovery_successes.load(Ordering::Relaxed),
            recovery_threshold: s.config.recovery_success_threshold,
            fallback_age_seconds: age.map(|a| a.as_secs_f64()),
            min_hold_remaining_seconds: age.map(|a| hold.saturating_sub(a).as_secs_f64()),
            min_fallback_duration_seconds: hold.as_secs_f64(),
            last_probe_latency_seconds: last.as_ref().map(|p| p.latency_seconds),
            last_probe_attempts: last.as_ref().map(|p| p.attempts),
            last_probe_healthy: last.as_ref().map(|p| p.healthy),
            counters: s.counters.read(),
        }
    }

    /// Probes both sides now (concurrently, each with its retries), applies the primary's
    /// result to the state machine, and returns the status plus both probe results.
    ///
    /// The forced check is evidence like any other, counted the same way: in NORMAL a failed
    /// check is a primary failure (counted in `primary_failures` and toward
    /// `failure_threshold`, so repeated failed checks trip the breaker as failed requests
    /// would) and a good one resets the failure streak; while tripped a good check counts
    /// toward recovery (still gated by `min_fallback_duration`) and a failed one resets the
    /// recovery count. So the status a check returns is the one the next request meets.
    /// Each call is counted in `forced_checks`.
    ///
    /// Bounded: at most `(probe_max_retries + 1) × probe_timeout` plus the back-off delays.
    /// It runs in the caller's task, independently of the background prober.
    pub async fn force_health_check(&self) -> HealthReport {
        let s = &self.shared;
        let primary = prober::probe_with_retries(&*s.probe, &s.primary_target, s.policy);
        let fallback = async {
            match &s.fallback_target {
                Some(t) => Some(prober::probe_with_retries(&*s.probe, t, s.policy).await),
                None => None,
            }
        };
        let (primary, fallback) = tokio::join!(primary, fallback);
        if let Some(f) = &fallback {
            s.counters
                .probe_attempts
                .fetch_add(u64::from(f.attempts), Ordering::Relaxed);
        }
        inc(&s.counters.forced_checks);
        if !primary.healthy {
            inc(&s.counters.primary_failures);
        }
        s.last_probe.store(Some(Arc::new(primary.clone())));
        s.apply_primary_probe(&primary);
        HealthReport {
            status: self.status_snapshot(),
            primary,
            fallback,
        }
    }

    /// `true` while the background prober task is running.
    pub fn prober_running(&self) -> bool {
        self.shared.prober.get().is_some_and(|p| !p.is_finished())
    }
}

/// Can a request be served now: the primary is usable (NORMAL), or the fallback is engaged
/// (and configured). `false` only in `primary_unhealthy` (tripped with no fallback).
impl HealthSource for Breaker {
    fn can_serve(&self) -> bool {
        !self.shared.is_tripped() || self.shared.has_fallback()
    }
}
