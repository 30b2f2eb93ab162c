//! The active health-check loop.
//!
//! [`HealthChecker::spawn`] starts one background task that, every `interval` (plus a random
//! `jitter` so that many gateways do not probe in lockstep), probes every target returned by
//! [`ProbeTargets::probe_targets`] — the set is read again each cycle, so replicas added or
//! removed at runtime are picked up. All probes of one cycle run concurrently (one future
//! each, polled by the task itself: no task per probe) on the one shared, pooled client of
//! the [`Probe`], and each is bounded by `timeout`, so a slow replica never stretches the
//! cycle beyond `timeout`. Each outcome feeds the target's [`HealthState`] as soon as it
//! arrives; a status change is reported through [`ProbeTargets::health_changed`].
//!
//! The task is owned by its [`CheckerHandle`]: dropping the handle stops it, as does
//! [`CheckerHandle::stop`] or the optional shutdown future given to
//! [`HealthChecker::spawn_until`]. Each cycle probes every replica concurrently, with a
//! pluggable probe and one shared client.

use crate::probe::{Probe, ProbeResult};
use crate::state::{HealthState, Transition};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One target of the health checker: a key (base URL) and the state its probes feed.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// What the probe is given (a base URL for [`HttpProbe`](crate::HttpProbe)).
    pub key: Arc<str>,
    /// The state machine the outcomes feed.
    pub state: Arc<HealthState>,
}

/// The set of targets a [`HealthChecker`] probes, read again every cycle.
pub trait ProbeTargets: Send + Sync + 'static {
    /// The current targets.
    fn probe_targets(&self) -> Vec<ProbeTarget>;

    /// Called after a probe outcome changed a target's status.
    fn health_changed(&self, _key: &str, _transition: Transition) {}
}

impl<T: ProbeTargets + ?Sized> ProbeTargets for Arc<T> {
    fn probe_targets(&self) -> Vec<ProbeTarget> {
        (**self).probe_targets()
    }

    fn health_changed(&self, key: &str, transition: Transition) {
        (**self).health_changed(key, transition)
    }
}

/// Timing of the active health checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckerConfig {
    /// Time between the starts of two cycles (`health_check_interval`).
    pub interval: Duration,
    /// Bound of each probe (`health_check_timeout`); a probe that takes longer failed.
    pub timeout: Duration,
    /// Up to this much random delay is added to every interval (`health_check_jitter`).
    pub jitter: Duration,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            jitter: Duration::ZERO,
        }
    }
}

/// Starts active health-check tasks (see the [module docs](self)).
#[derive(Debug, Clone, Copy)]
pub struct HealthChecker;

impl HealthChecker {
    /// Spawns the probe loop on the current tokio runtime. The first cycle starts at once.
    pub fn spawn<T, P>(targets: T, probe: P, config: CheckerConfig) -> CheckerHandle
    where
        T: ProbeTargets,
        P: Probe,
    {
        Self::spawn_until(targets, probe, config, std::future::pending())
    }

    /// Like [`spawn`](Self::spawn), and the task also stops when `shutdown` resolves.
    pub fn spawn_until<T, P, F>(
        targets: T,
        probe: P,
        config: CheckerConfig,
        shutdown: F,
    ) -> CheckerHandle
    where
        T: ProbeTargets,
        P: Probe,
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::select! {
                // Resolves on `stop()` and when the handle (the sender) is dropped.
                _ = stop_rx => {}
                _ = shutdown => {}
                _ = run(&targets, &probe, config) => {}
            }
        });
        CheckerHandle {
            stop: Some(stop_tx),
            task,
        }
    }

    /// Runs one cycle: probes every target concurrently and records the outcomes. Returns
    /// the number of probes made.
    pub async fn run_cycle<T, P>(targets: &T, probe: &P, timeout: Duration) -> usize
    where
        T: ProbeTargets + ?Sized,
        P: Probe + ?Sized,
    {
        let list = targets.probe_targets();
        let n = list.len();
        let mut pending: FuturesUnordered<_> = list
            .into_iter()
            .map(|t| {
                let fut = probe.probe(&t.key);
                async move {
                    let start = Instant::now();
                    let result = match tokio::time::timeout(timeout, fut).await {
                        Ok(r) => r,
                        Err(_) => ProbeResult::unhealthy(start.elapsed(), "timeout"),
                    };
                    (t, result)
                }
            })
            .collect();
        while let Some((t, result)) = pending.next().await {
            if let Some(tr) = t.state.record_probe(result.healthy, result.latency) {
                tracing::info!(target = %t.key, from = ?tr.from, to = ?tr.to, detail = %result.detail, "replica health changed");
                targets.health_changed(&t.key, tr);
            }
        }
        n
    }
}

async fn run<T: ProbeTargets, P: Probe>(targets: &T, probe: &P, config: CheckerConfig) {
    loop {
        let start = Instant::now();
        HealthChecker::run_cycle(targets, probe, config.timeout).await;
        let jitter = if config.jitter.is_zero() {
            Duration::ZERO
        } else {
            config.jitter.mul_f64(rand::random::<f64>())
        };
        tokio::time::sleep_until(start + config.interval + jitter).await;
    }
}

/// Owns a health-check task: dropping it stops the task.
#[derive(Debug)]
pub struct CheckerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl CheckerHandle {
    /// Stops the task and waits for it to finish (it stops at its next await point).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// `true` once the task has finished (stopped by its shutdown future, or panicked).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CheckerHandle {
    fn drop(&mut self) {
        // Dropping the sender wakes the task, which returns; abort as a belt and braces.
        self.stop.take();
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeFuture;
    use crate::state::{HealthPolicy, Status};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A deterministic probe: each target's health is a flag, and a target can be made slow.
    #[derive(Default)]
    struct ScriptedProbe {
        healthy: Mutex<HashMap<String, bool>>,
        slow: Mutex<HashMap<String, Duration>>,
        calls: AtomicUsize,
    }

    impl ScriptedProbe {
        fn set(&self, key: &str, healthy: bool) {
            self.healthy.lock().unwrap().insert(key.into(), healthy);
        }
    }

    impl Probe for ScriptedProbe {
        fn probe(&self, target: &str) -> ProbeFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let healthy = *self.healthy.lock().unwrap().get(target).unwrap_or(&true);
            let delay = self
                .slow
                .lock()
                .unwrap()
                .get(target)
                .copied()
                .unwrap_or(Duration::from_millis(5));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if healthy {
                    ProbeResult::healthy(delay, "200 OK")
                } else {
                    ProbeResult::unhealthy(delay, "503 Service Unavailable")
                }
            })
        }
    }

    struct Targets {
        list: Vec<ProbeTarget>,
        changes: AtomicUsize,
    }

    impl ProbeTargets for Targets {
        fn probe_targets(&self) -> Vec<ProbeTarget> {
            self.list.clone()
        }
        fn health_changed(&self, _key: &str, _t: Transition) {
            self.changes.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn targets(keys: &[&str]) -> Arc<Targets> {
        let policy = Arc::new(HealthPolicy {
            failure_threshold: 3,
            recovery_threshold: 2,
            ..HealthPolicy::default()
        });
        Arc::new(Targets {
            list: keys
                .iter()
                .map(|k| ProbeTarget {
                    key: (*k).into(),
                    state: Arc::new(HealthState::new(policy.clone())),
                })
                .collect(),
            changes: AtomicUsize::new(0),
        })
    }

    const CFG: CheckerConfig = CheckerConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        jitter: Duration::ZERO,
    };

    #[tokio::test(start_paused = true)]
    async fn transitions_at_the_expected_cycles() {
        let t = targets(&["a", "b"]);
        let probe = Arc::new(ScriptedProbe::default());
        probe.set("a", false);
        let _h = HealthChecker::spawn(t.clone(), probe.clone(), CFG);
        // Cycles start at 0 s, 1 s, 2 s; each probe takes 5 ms.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(t.list[0].state.status(), Status::Healthy, "2 failures");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            t.list[0].state.status(),
            Status::Unhealthy,
            "3rd failure at t=2s"
        );
        assert_eq!(t.list[1].state.status(), Status::Healthy);
        probe.set("a", true);
        tokio::time::sleep(Duration::from_millis(1000)).await; // probe at 3 s
        assert_eq!(t.list[0].state.status(), Status::Unhealthy, "1 success");
        tokio::time::sleep(Duration::from_millis(1000)).await; // probe at 4 s
        assert_eq!(t.list[0].state.status(), Status::Healthy, "2nd success");
        assert_eq!(t.changes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_target_does_not_stretch_the_cycle() {
        let t = targets(&["fast", "slow"]);
        let probe = Arc::new(ScriptedProbe::default());
        probe
            .slow
            .lock()
            .unwrap()
            .insert("slow".into(), Duration::from_secs(60));
        let start = Instant::now();
        let n = HealthChecker::run_cycle(&*t, &*probe, Duration::from_millis(500)).await;
        assert_eq!(n, 2);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "bounded by the timeout"
        );
        let c = t.list[1].state.counters(Instant::now());
        assert_eq!(c.consecutive_probe_failures, 1, "a timeout is a failure");
        assert_eq!(
            t.list[0]
                .state
                .counters(Instant::now())
                .consecutive_probe_successes,
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_the_handle_is_dropped_or_stopped_or_signalled() {
        let t = targets(&["a"]);
        let probe = Arc::new(ScriptedProbe::default());
        let h = HealthChecker::spawn(t.clone(), probe.clone(), CFG);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), 3);
        drop(h);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            probe.calls.load(Ordering::SeqCst),
            3,
            "no probe after the handle dropped"
        );

        let h = HealthChecker::spawn(t.clone(), probe.clone(), CFG);
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.stop().await;
        let calls = probe.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), calls);

        let (tx, rx) = oneshot::channel::<()>();
        let h = HealthChecker::spawn_until(t.clone(), probe.clone(), CFG, async move {
            let _ = rx.await;
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(h.is_finished());
        let calls = probe.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), calls);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_delays_cycles_within_bounds() {
        let t = targets(&["a"]);
        let probe = Arc::new(ScriptedProbe::default());
        let cfg = CheckerConfig {
            jitter: Duration::from_millis(500),
            ..CFG
        };
        let _h = HealthChecker::spawn(t.clone(), probe.clone(), cfg);
        tokio::time::sleep(Duration::from_millis(10_050)).await;
        let calls = probe.calls.load(Ordering::SeqCst);
        // Cycles are 1.0–1.5 s apart: between 7 and 11 cycles in 10 s.
        assert!((7..=11).contains(&calls), "{calls} cycles");
    }
}
