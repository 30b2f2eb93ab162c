//! [`AdaptiveCapacity`]: a [`CapacitySource`] wrapper whose limit follows what the
//! admitted requests show.

use super::clock::Timer;
use super::window::LatencyWindow;
use super::{AdaptiveConfig, Controller, LatencyMode, Observation, Phase, SampleClock};
use crate::local::LocalCapacity;
use crate::source::{AcquireError, CapacitySource, Outcome};
use crate::stats::AdaptiveStats;
use futures_util::future::BoxFuture;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

/// Who may move a limit shared by several processes.
///
/// With shared storage every process runs a controller over its own samples, but only the
/// one that holds the lease applies its limit (and so stores it for all); the others apply
/// the stored limit and keep their controllers in step with it, so that whichever takes
/// the lease over continues from the limit in force. A lease that is not renewed (its
/// holder died) expires, and another process takes it at its next window.
pub trait LimitLease: Send + Sync + 'static {
    /// Takes or renews the lease for the next few windows; `true` when this process holds
    /// it. Called once per window; a call that fails or does not answer within one window
    /// counts as `false`.
    fn renew(&self) -> BoxFuture<'static, bool>;
}

/// A [`CapacitySource`] whose limit adapts at run time (see the [module docs](super)).
///
/// Wraps another source (by default [`LocalCapacity`]), which keeps counting the slots and
/// queueing the waiters: a limit change is the inner source's
/// [`set_capacity`](CapacitySource::set_capacity), so waiters keep their place and granted
/// slots are never revoked. Each granted slot records when it was granted; the layer tells
/// it how the request ended ([`CapacitySource::record_outcome`]), and the sample goes into
/// the current window. A task owned by the source closes a window every
/// [`window`](AdaptiveConfig::window) and moves the limit, always inside
/// `[min_capacity, max_capacity]`.
///
/// A capacity of 0 (an endpoint whose capacity is being probed) pauses the controller;
/// the first non-zero [`set_capacity`](CapacitySource::set_capacity) starts it from that
/// value (clamped to the bounds). A capacity set from outside (a probe, an operator, another
/// process through shared storage) is adopted the same way: the controller continues from
/// it.
///
/// Must be built inside a tokio runtime (it spawns its task). Cheap to clone; clones share
/// the slots, the samples and the task, which stops when the last clone and the last slot
/// are gone.
///
/// ```
/// use portcullis_admission::adaptive::{AdaptiveCapacity, AdaptiveConfig};
/// use portcullis_admission::{CapacitySource, LocalCapacity, Outcome};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let config = AdaptiveConfig { min_capacity: 2, max_capacity: 64, ..Default::default() };
/// let source = AdaptiveCapacity::new(LocalCapacity::new(8), &config, "/predict");
/// let permit = source.try_acquire().unwrap();
/// AdaptiveCapacity::<LocalCapacity>::record_outcome(&permit, Outcome::Success);
/// drop(permit); // one 0 ms sample in the current window
/// assert_eq!(source.capacity(), 8); // the initial limit, until a window closes
/// assert_eq!(source.adaptive_stats().unwrap().max_capacity, 64);
/// # }
/// ```
pub struct AdaptiveCapacity<C = LocalCapacity> {
    inner: C,
    shared: Option<Arc<Shared>>,
}

impl<C: Clone> Clone for AdaptiveCapacity<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// What the slots, the task and the stats share.
struct Shared {
    window: LatencyWindow,
    mode: LatencyMode,
    config: AdaptiveConfig,
    /// Published by the task for stats.
    phase: AtomicU8,
    min_rtt_micros: AtomicU64,
    sample_rtt_micros: AtomicU64,
    changes: AtomicU64,
    /// 0: no lease (one process), 1: holds it, 2: follows.
    lease: AtomicU8,
    /// Times the samples (see [`SampleClock`]).
    timer: Timer,
    /// Samples of slots granted before this stamp of `timer` are not taken: set when a
    /// `min_rtt` measurement starts, so that the requests still in flight at the old limit
    /// do not count as measured at `min_capacity`.
    fresh_after: AtomicU64,
    /// One slot in `sample_every` is sampled (counted per thread); set by the task so that
    /// a window holds about [`SAMPLES_PER_WINDOW`] samples however busy the endpoint is.
    sample_every: AtomicU32,
    task: OnceLock<AbortOnDropHandle<()>>,
}

const NONE: u64 = u64::MAX;
const PHASES: [Phase; 7] = [
    Phase::Initial,
    Phase::MeasuringMinRtt,
    Phase::Increasing,
    Phase::Decreasing,
    Phase::Holding,
    Phase::Overloaded,
    Phase::Following,
];

impl<C: CapacitySource + Clone> AdaptiveCapacity<C> {
    /// An adaptive limit over `inner`, starting from its capacity (clamped to the bounds
    /// of `config`; 0 stays 0 and pauses until a capacity is set). `name` labels the log
    /// lines of limit changes (the endpoint key).
    ///
    /// Samples are timed with the CPU's time-stamp counter ([`SampleClock::Tsc`]); see
    /// [`with_clock`](Self::with_clock) for tests on tokio's paused clock.
    pub fn new(inner: C, config: &AdaptiveConfig, name: impl Into<String>) -> Self {
        Self::build(inner, config, name.into(), None, SampleClock::Tsc)
    }

    /// The same as [`new`](Self::new), timing the samples with `clock`:
    /// [`SampleClock::Tokio`] where a test drives its requests' latency with tokio's paused
    /// clock, which the time-stamp counter does not follow.
    pub fn with_clock(
        inner: C,
        config: &AdaptiveConfig,
        name: impl Into<String>,
        clock: SampleClock,
    ) -> Self {
        Self::build(inner, config, name.into(), None, clock)
    }

    /// The same, for a limit shared by several processes through `inner`'s storage: only
    /// the holder of `lease` moves it (see [`LimitLease`]).
    pub fn shared(
        inner: C,
        config: &AdaptiveConfig,
        name: impl Into<String>,
        lease: Arc<dyn LimitLease>,
    ) -> Self {
        Self::build(inner, config, name.into(), Some(lease), SampleClock::Tsc)
    }

    fn build(
        inner: C,
        config: &AdaptiveConfig,
        name: String,
        lease: Option<Arc<dyn LimitLease>>,
        clock: SampleClock,
    ) -> Self {
        let initial = inner.capacity();
        // Only when outside the bounds: for a shared source a set is a write for everyone.
        if initial > 0 && config.clamp(initial) != initial {
            inner.set_capacity(config.clamp(initial));
        }
        let seed = std::collections::hash_map::RandomState::new().hash_one(&name);
        let controller = Controller::new(config, initial.max(1), seed);
        let shared = Arc::new(Shared {
            window: LatencyWindow::new(),
            mode: config.latency,
            config: config.clone(),
            phase: AtomicU8::new(0),
            min_rtt_micros: AtomicU64::new(NONE),
            sample_rtt_micros: AtomicU64::new(NONE),
            changes: AtomicU64::new(0),
            lease: AtomicU8::new(if lease.is_some() { 2 } else { 0 }),
            timer: Timer::new(clock),
            fresh_after: AtomicU64::new(0),
            sample_every: AtomicU32::new(1),
            task: OnceLock::new(),
        });
        let task = Task {
            shared: Arc::downgrade(&shared),
            inner: inner.clone(),
            controller,
            lease,
            name,
            applied: inner.capacity(),
        };
        let _ = shared
            .task
            .set(AbortOnDropHandle::new(tokio::spawn(task.run())));
        Self {
            inner,
            shared: Some(shared),
        }
    }
}

impl<C> AdaptiveCapacity<C> {
    /// `inner` as it is: a fixed limit, no sampling, no task (for the endpoints of a
    /// table where only some adapt).
    pub fn fixed(inner: C) -> Self {
        Self {
            inner,
            shared: None,
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// Whether the limit adapts (`false` for [`fixed`](Self::fixed)).
    pub fn is_adaptive(&self) -> bool {
        self.shared.is_some()
    }

    #[inline(always)]
    fn wrap<P>(&self, permit: P) -> AdaptivePermit<P> {
        AdaptivePermit {
            sample: self.shared.as_ref().and_then(Sample::start),
            _inner: permit,
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for AdaptiveCapacity<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveCapacity")
            .field("inner", &self.inner)
            .field("adaptive", &self.shared.as_ref().map(|s| &s.config))
            .finish()
    }
}

impl<C: CapacitySource> CapacitySource for AdaptiveCapacity<C> {
    type Permit = AdaptivePermit<C::Permit>;
    type Acquire = AdaptiveAcquire<C>;

    fn acquire(&self, max_queue: Option<usize>) -> Self::Acquire {
        AdaptiveAcquire {
            inner: Box::pin(self.inner.acquire(max_queue)),
            shared: self.shared.clone(),
        }
    }

    #[inline(always)]
    fn try_acquire(&self) -> Option<Self::Permit> {
        self.inner.try_acquire().map(|p| self.wrap(p))
    }

    /// Sets the limit: clamped to the bounds (0, "being probed", stays 0 and pauses the
    /// controller), which continues from it at its next window.
    fn set_capacity(&self, capacity: usize) {
        match &self.shared {
            Some(s) if capacity > 0 => self.inner.set_capacity(s.config.clamp(capacity)),
            _ => self.inner.set_capacity(capacity),
        }
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn active(&self) -> usize {
        self.inner.active()
    }

    fn local_active(&self) -> usize {
        self.inner.local_active()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    #[inline(always)]
    fn record_outcome(permit: &Self::Permit, outcome: Outcome) {
        if let Some(s) = &permit.sample {
            s.record(outcome);
        }
    }

    fn adaptive_stats(&self) -> Option<AdaptiveStats> {
        let s = self.shared.as_ref()?;
        let ms = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
            NONE => None,
            us => Some(us as f64 / 1e3),
        };
        Some(AdaptiveStats {
            algorithm: s.config.algorithm.as_str().to_owned(),
            min_capacity: s.config.min_capacity,
            max_capacity: s.config.max_capacity,
            min_rtt_ms: ms(&s.min_rtt_micros),
            sample_rtt_ms: ms(&s.sample_rtt_micros),
            state: phase_name(PHASES[usize::from(s.phase.load(Ordering::Relaxed)) % PHASES.len()]),
            changes: s.changes.load(Ordering::Relaxed),
            latency: match s.mode {
                LatencyMode::Headers => "headers",
                LatencyMode::Body => "body",
            }
            .to_owned(),
            leader: match s.lease.load(Ordering::Relaxed) {
                0 => None,
                n => Some(n == 1),
            },
        })
    }
}

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

const PENDING: u64 = 0;
const SUCCESS: u64 = 1;
const OVERLOAD: u64 = 2;
const RECORDED: u64 = 3;

impl Shared {
    /// Takes the sample of a slot granted at stamp `started` that ends now.
    #[inline]
    fn take(&self, started: u64, overloaded: bool) {
        if started >= self.fresh_after.load(Ordering::Relaxed) {
            let nanos = self.timer.nanos(started, self.timer.now());
            self.window.record_micros(nanos / 1000, overloaded);
        }
    }

    /// Only slots granted from now on are sampled, every one of them (the measurement
    /// window runs at `min_capacity`, at a low rate).
    fn sample_from_now(&self) {
        self.fresh_after.store(self.timer.now(), Ordering::Relaxed);
        self.sample_every.store(1, Ordering::Relaxed);
    }
}

/// Samples per window the sampling rate aims at (at least `4 × min_samples`).
const SAMPLES_PER_WINDOW: u64 = 100;
/// The sparsest sampling: one slot in 256.
const MAX_SAMPLE_EVERY: u64 = 256;

thread_local! {
    /// Slots granted on this thread, for 1-in-N sampling without a shared counter.
    static GRANTS: Cell<u32> = const { Cell::new(0) };
}

/// The sampling part of a granted slot: 16 bytes, so that a sampled permit (and the
/// response futures and bodies that carry it) stays small.
struct Sample {
    shared: Arc<Shared>,
    /// The grant, as a stamp of `shared.timer`, shifted left by 2; the low 2 bits are the
    /// outcome (`PENDING`, `SUCCESS`, `OVERLOAD`, `RECORDED`).
    state: AtomicU64,
}

/// The outcome bits of [`Sample::state`].
const OUTCOME: u64 = 0b11;

impl Sample {
    /// A sample of a slot granted now, or `None` when this slot is not one of the sampled.
    #[inline(always)]
    fn start(shared: &Arc<Shared>) -> Option<Self> {
        let every = shared.sample_every.load(Ordering::Relaxed);
        if every > 1 {
            let n = GRANTS.with(|g| {
                let n = g.get().wrapping_add(1);
                g.set(n);
                n
            });
            if n % every != 0 {
                return None;
            }
        }
        Some(Self {
            shared: Arc::clone(shared),
            state: AtomicU64::new((shared.timer.now() << 2) | PENDING),
        })
    }

    /// The first outcome of the slot counts. A load and a store rather than a
    /// read-modify-write: the layer reports a slot's outcome once, from the future that holds
    /// it, and a locked instruction costs about as much as the clock read (two calls racing
    /// on two threads could at worst both count: one duplicate sample).
    #[inline(always)]
    fn record(&self, outcome: Outcome) {
        let state = self.state.load(Ordering::Relaxed);
        if state & OUTCOME != PENDING {
            return;
        }
        let code = match outcome {
            Outcome::Success => SUCCESS,
            Outcome::Overload => OVERLOAD,
        };
        match self.shared.mode {
            // The sample is complete now: take it.
            LatencyMode::Headers => {
                self.state.store(state | RECORDED, Ordering::Relaxed);
                self.shared.take(state >> 2, code == OVERLOAD);
            }
            // Taken when the slot is released (the end of the body).
            LatencyMode::Body => self.state.store(state | code, Ordering::Relaxed),
        }
    }
}

impl Drop for Sample {
    fn drop(&mut self) {
        // A slot released without an outcome (the client went away first) is no sample.
        let state = *self.state.get_mut();
        match state & OUTCOME {
            SUCCESS => self.shared.take(state >> 2, false),
            OVERLOAD => self.shared.take(state >> 2, true),
            _ => {}
        }
    }
}

/// A slot of an [`AdaptiveCapacity`]: the inner source's permit, and when it was granted.
/// Dropping it releases the slot and, with `latency: body`, completes its sample.
pub struct AdaptivePermit<P> {
    // Dropped after `sample`: the sample is taken before the slot goes back.
    sample: Option<Sample>,
    _inner: P,
}

impl<P> fmt::Debug for AdaptivePermit<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptivePermit")
            .field("sampled", &self.sample.is_some())
            .finish()
    }
}

/// The acquire future of [`AdaptiveCapacity`]: the inner source's, stamping the grant.
/// Cancel-safe as the inner one is.
pub struct AdaptiveAcquire<C: CapacitySource> {
    inner: Pin<Box<C::Acquire>>,
    shared: Option<Arc<Shared>>,
}

impl<C: CapacitySource> Future for AdaptiveAcquire<C> {
    type Output = Result<AdaptivePermit<C::Permit>, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let permit = ready!(self.inner.as_mut().poll(cx))?;
        Poll::Ready(Ok(AdaptivePermit {
            sample: self.shared.take().as_ref().and_then(Sample::start),
            _inner: permit,
        }))
    }
}

impl<C: CapacitySource> fmt::Debug for AdaptiveAcquire<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveAcquire").finish_non_exhaustive()
    }
}

/// The source's task: closes a window every `window`, runs the controller, applies the
/// limit.
struct Task<C> {
    shared: Weak<Shared>,
    inner: C,
    controller: Controller,
    lease: Option<Arc<dyn LimitLease>>,
    name: String,
    /// The capacity this task last applied; anything else in force was set from outside.
    applied: usize,
}

impl<C: CapacitySource> Task<C> {
    async fn run(mut self) {
        let Some(window) = self.shared.upgrade().map(|s| s.config.window) else {
            return;
        };
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut opened = Instant::now();
        loop {
            tick.tick().await;
            let holds_lease = match &self.lease {
                None => true,
                Some(lease) => tokio::time::timeout(window, lease.renew())
                    .await
                    .unwrap_or(false),
            };
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            if self.lease.is_some() {
                shared
                    .lease
                    .store(if holds_lease { 1 } else { 2 }, Ordering::Relaxed);
            }
            if shared.window.count() < shared.config.min_samples && holds_lease {
                continue; // too few samples yet: the window goes on
            }
            let now = Instant::now();
            let every = u64::from(shared.sample_every.load(Ordering::Relaxed));
            let obs = shared
                .window
                .close(
                    shared.config.latency_quantile,
                    now - opened,
                    self.inner.queue_depth(),
                )
                .map(|mut o| {
                    // Little's law over the sampled slots only: scale to all of them.
                    o.inflight *= every as f64;
                    o
                });
            opened = now;
            // About SAMPLES_PER_WINDOW samples in the next window at this window's rate.
            let target = SAMPLES_PER_WINDOW.max(4 * shared.config.min_samples);
            let granted = obs.map_or(0, |o| o.samples) * every;
            let next_every = (granted / target).clamp(1, MAX_SAMPLE_EVERY) as u32;
            shared.sample_every.store(next_every, Ordering::Relaxed);
            self.step(&shared, now, obs, holds_lease);
        }
    }

    fn step(&mut self, shared: &Shared, now: Instant, obs: Option<Observation>, holds_lease: bool) {
        let current = self.inner.capacity();
        if current == 0 {
            self.applied = 0; // being probed: paused
            return;
        }
        if current != self.applied || !holds_lease {
            // Set from outside (a probe, an operator, the lease holder): continue from it.
            self.controller.follow(current);
            self.applied = current;
            if !holds_lease {
                self.publish(shared);
                return;
            }
        }
        let Some(mut obs) = obs else {
            return;
        };
        // With shared storage `active` is the global count: the slots in use by all.
        obs.inflight = obs.inflight.max(self.inner.active() as f64);
        let next = self.controller.update(now, &obs);
        if self.controller.state().phase == Phase::MeasuringMinRtt {
            shared.sample_from_now();
        }
        if next != current {
            self.inner.set_capacity(next);
            shared.changes.fetch_add(1, Ordering::Relaxed);
            if next.abs_diff(current) * 5 > current {
                let s = self.controller.state();
                tracing::info!(
                    endpoint = %self.name,
                    from = current,
                    to = next,
                    state = %phase_name(s.phase),
                    min_rtt_ms = s.min_rtt.map(|d| d.as_secs_f64() * 1e3),
                    sample_rtt_ms = s.sample_rtt.map(|d| d.as_secs_f64() * 1e3),
                    "adaptive capacity changed by more than 20%"
                );
            }
        }
        self.applied = next;
        self.publish(shared);
    }

    fn publish(&self, shared: &Shared) {
        let s = self.controller.state();
        let micros = |d: Option<Duration>| {
            d.map_or(NONE, |d| u64::try_from(d.as_micros()).unwrap_or(NONE - 1))
        };
        let phase = PHASES.iter().position(|&p| p == s.phase).unwrap_or(0);
        shared.phase.store(phase as u8, Ordering::Relaxed);
        shared
            .min_rtt_micros
            .store(micros(s.min_rtt), Ordering::Relaxed);
        shared
            .sample_rtt_micros
            .store(micros(s.sample_rtt), Ordering::Relaxed);
    }
}

impl crate::Endpoints<AdaptiveCapacity<LocalCapacity>> {
    /// In-process limiters for every endpoint of `config`, adaptive where an `adaptive:`
    /// block applies ([`Config::adaptive_for`](crate::Config::adaptive_for)), fixed
    /// elsewhere. `initial(path, endpoint)` is each endpoint's starting capacity (its
    /// `capacity`, a probed or default one; 0 while it is being probed).
    ///
    /// Must be called inside a tokio runtime. Fails like
    /// [`Endpoints::from_config`](crate::Endpoints::from_config).
    pub fn adaptive_from_config(
        config: &crate::Config,
        mut initial: impl FnMut(&str, &crate::EndpointConfig) -> usize,
    ) -> Result<Self, String> {
        Self::from_config_with(config, |path, ep| {
            let local = LocalCapacity::new(initial(path, ep));
            match config.adaptive_for(ep) {
                Some(a) => AdaptiveCapacity::new(local, a, path),
                None => AdaptiveCapacity::fixed(local),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// `clients` loops sending to a simulated backend: 20 ms, +5 ms per request in flight
    /// above `knee` (read from `knee` at each request), through `source`.
    fn clients(
        source: &AdaptiveCapacity,
        knee: &Arc<AtomicUsize>,
        n: usize,
    ) -> Vec<AbortOnDropHandle<()>> {
        let inflight = Arc::new(AtomicUsize::new(0));
        (0..n)
            .map(|_| {
                let (source, knee, inflight) = (source.clone(), knee.clone(), inflight.clone());
                AbortOnDropHandle::new(tokio::spawn(async move {
                    loop {
                        let permit = source.acquire(None).await.unwrap();
                        let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
                        let over = now.saturating_sub(knee.load(Ordering::SeqCst));
                        tokio::time::sleep(Duration::from_millis(20 + 5 * over as u64)).await;
                        AdaptiveCapacity::<LocalCapacity>::record_outcome(
                            &permit,
                            Outcome::Success,
                        );
                        inflight.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    }
                }))
            })
            .collect()
    }

    async fn settled(
        source: &AdaptiveCapacity,
        within: Duration,
        range: std::ops::RangeInclusive<usize>,
    ) -> Vec<usize> {
        let mut seen = Vec::new();
        let end = Instant::now() + within;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(250)).await;
            seen.push(source.capacity());
        }
        let tail = &seen[seen.len() - 8..];
        assert!(
            tail.iter().all(|c| range.contains(c)),
            "{range:?}: {seen:?}"
        );
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn follows_a_moving_knee_inside_the_bounds() {
        let config = AdaptiveConfig {
            min_capacity: 2,
            max_capacity: 64,
            // One measurement, at the start (the schedule is tested with the controller).
            min_rtt_interval: Duration::from_secs(120),
            ..Default::default()
        };
        let source =
            AdaptiveCapacity::with_clock(LocalCapacity::new(8), &config, "/t", SampleClock::Tokio);
        let knee = Arc::new(AtomicUsize::new(16));
        let _clients = clients(&source, &knee, 48);
        settled(&source, Duration::from_secs(10), 12..=24).await;
        let s = source.adaptive_stats().unwrap();
        assert!((19.0..=22.0).contains(&s.min_rtt_ms.unwrap()), "{s:?}");
        assert!(s.sample_rtt_ms.unwrap() > 20.0 && s.changes > 3, "{s:?}");
        knee.store(6, Ordering::SeqCst);
        settled(&source, Duration::from_secs(10), 4..=10).await;
        knee.store(40, Ordering::SeqCst);
        let seen = settled(&source, Duration::from_secs(15), 30..=60).await;
        assert!(seen.iter().all(|&c| (2..=64).contains(&c)));
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_hold_and_zero_pauses() {
        let config = AdaptiveConfig {
            min_capacity: 4,
            max_capacity: 10,
            ..Default::default()
        };
        let source =
            AdaptiveCapacity::with_clock(LocalCapacity::new(0), &config, "/t", SampleClock::Tokio);
        assert_eq!(source.capacity(), 0, "being probed");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(source.capacity(), 0, "paused");
        source.set_capacity(500);
        assert_eq!(source.capacity(), 10, "clamped");
        let knee = Arc::new(AtomicUsize::new(40));
        let _clients = clients(&source, &knee, 48);
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!((4..=10).contains(&source.capacity()));
        }
        assert_eq!(source.capacity(), 10);
        // Everything fails, fast: down to min_capacity, never below.
        drop(_clients);
        let failing: Vec<_> = (0..16)
            .map(|_| {
                let source = source.clone();
                AbortOnDropHandle::new(tokio::spawn(async move {
                    loop {
                        let p = source.acquire(None).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        AdaptiveCapacity::<LocalCapacity>::record_outcome(&p, Outcome::Overload);
                    }
                }))
            })
            .collect();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(source.capacity() >= 4);
        }
        assert_eq!(source.capacity(), 4);
        assert_eq!(source.adaptive_stats().unwrap().state, "overloaded");
        drop(failing);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_keep_their_place_when_the_limit_changes() {
        let config = AdaptiveConfig {
            min_capacity: 1,
            max_capacity: 8,
            ..Default::default()
        };
        let source = AdaptiveCapacity::new(LocalCapacity::new(1), &config, "/t");
        let first = source.try_acquire().unwrap();
        let mut waiters: Vec<_> = (0..4).map(|_| Box::pin(source.acquire(None))).collect();
        assert_eq!(source.queue_depth(), 4);
        // Polls every waiter once, keeping the slots granted: which ones were granted.
        let mut held = Vec::new();
        let mut poll_all = |waiters: &mut Vec<Pin<Box<AdaptiveAcquire<LocalCapacity>>>>| {
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            waiters
                .iter_mut()
                .map(|w| match w.as_mut().poll(&mut cx) {
                    Poll::Ready(p) => {
                        held.push(p.unwrap());
                        true
                    }
                    Poll::Pending => false,
                })
                .collect::<Vec<_>>()
        };
        // Growing by 2 admits the two oldest waiters, in order; the others stay queued.
        source.set_capacity(3);
        assert_eq!(poll_all(&mut waiters), [true, true, false, false]);
        waiters.drain(..2);
        // Shrinking revokes nothing and drops no waiter; then the next slot goes to the
        // oldest of them.
        source.set_capacity(1);
        assert_eq!((source.active(), source.queue_depth()), (3, 2));
        drop(first);
        source.set_capacity(3);
        assert_eq!(poll_all(&mut waiters), [true, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_without_an_outcome_is_no_sample_and_fixed_samples_nothing() {
        let source = AdaptiveCapacity::new(LocalCapacity::new(4), &AdaptiveConfig::default(), "/t");
        let shared = source.shared.clone().unwrap();
        drop(source.try_acquire().unwrap());
        assert_eq!(shared.window.count(), 0);
        let p = source.try_acquire().unwrap();
        AdaptiveCapacity::<LocalCapacity>::record_outcome(&p, Outcome::Success);
        AdaptiveCapacity::<LocalCapacity>::record_outcome(&p, Outcome::Overload);
        drop(p);
        assert_eq!(shared.window.count(), 1, "one sample per slot");
        assert_eq!(std::mem::size_of::<Option<Sample>>(), 16, "a small permit");
        let fixed = AdaptiveCapacity::fixed(LocalCapacity::new(2));
        assert!(fixed.adaptive_stats().is_none() && !fixed.is_adaptive());
        assert!(fixed.try_acquire().unwrap().sample.is_none());
    }
}
