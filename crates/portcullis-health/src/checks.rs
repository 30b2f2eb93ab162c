//! Pluggable background checks that keep a [`Component`]'s cached flags up to date.
//!
//! A [`Check`] is one async test of a dependency (a Redis `PING`, a database round trip,
//! ...). A [`CheckSet`] pairs each check with a component and a [`CheckPolicy`] and, once
//! spawned, runs one loop per check: check, record, sleep `interval`, repeat. The seed
//! `HealthServer`'s ping loop, generalised:
//!
//! * each check is bounded by its `timeout` (a check that takes longer failed);
//! * the component turns not ready only after `failure_threshold` **consecutive** failures,
//!   so one blip does not pull the instance out of rotation;
//! * it turns ready again on the **first** success.
//!
//! The loops are owned by the [`ChecksHandle`] returned by [`CheckSet::spawn`]: dropping
//! it (or [`ChecksHandle::stop`]) cancels them. Probe requests never wait on a check.
//!
//! Any async closure is a check through [`check_fn`]:
//!
//! ```
//! use portcullis_health::{check_fn, CheckPolicy, CheckSet, HealthRegistry};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let registry = HealthRegistry::new();
//! let mut checks = CheckSet::new();
//! checks.add(
//!     registry.register_ready("storage"),
//!     check_fn(|| async { Ok::<(), std::io::Error>(()) }), // e.g. a Redis PING
//!     CheckPolicy { interval: Duration::from_secs(5), failure_threshold: 3, ..Default::default() },
//! );
//! let handle = checks.spawn(); // the loops run until `handle` is dropped
//! # drop(handle);
//! # }
//! ```

use crate::readiness::Component;
use portcullis_core::BoxError;
use serde::Deserialize;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The future a [`Check`] returns: `Ok(())` when the dependency is healthy.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

/// One health check of one dependency. It must not block; its duration is bounded by the
/// policy's `timeout` anyway.
pub trait Check: Send + Sync + 'static {
    /// Runs the check once.
    fn check(&self) -> CheckFuture;
}

impl<C: Check + ?Sized> Check for Arc<C> {
    fn check(&self) -> CheckFuture {
        (**self).check()
    }
}

impl<C: Check + ?Sized> Check for Box<C> {
    fn check(&self) -> CheckFuture {
        (**self).check()
    }
}

/// A [`Check`] made of an async closure; see [`check_fn`].
#[derive(Clone)]
pub struct FnCheck<F> {
    f: F,
}

impl<F> fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCheck").finish_non_exhaustive()
    }
}

/// Turns an async closure returning `Result<(), E>` into a [`Check`].
pub fn check_fn<F, Fut, E>(f: F) -> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    FnCheck { f }
}

impl<F, Fut, E> Check for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn check(&self) -> CheckFuture {
        let fut = (self.f)();
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// How one check runs. In YAML, durations are seconds (`interval: 5.0`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckPolicy {
    /// Time between the starts of two checks (default 5 s, as the storage's `ping_interval`).
    #[serde(deserialize_with = "portcullis_core::seconds::deserialize")]
    pub interval: Duration,
    /// Bound of one check; a check that takes longer failed (default 2 s).
    #[serde(deserialize_with = "portcullis_core::seconds::deserialize")]
    pub timeout: Duration,
    /// Consecutive failures that make the component not ready (default 3, at least 1).
    pub failure_threshold: u32,
    /// When `true`, reaching the threshold also marks the component *wedged*, so that
    /// `/healthz` fails too; default `false`: readiness only.
    pub wedge_on_failure: bool,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            failure_threshold: 3,
            wedge_on_failure: false,
        }
    }
}

struct Entry {
    component: Component,
    check: Arc<dyn Check>,
    policy: CheckPolicy,
}

/// A set of checks, each bound to the component it updates (see the [module docs](self)).
#[derive(Default)]
pub struct CheckSet {
    entries: Vec<Entry>,
}

impl fmt::Debug for CheckSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.component.name(), e.policy)))
            .finish()
    }
}

impl CheckSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `check`, which will update `component` under `policy`.
    pub fn add(
        &mut self,
        component: Component,
        check: impl Check,
        policy: CheckPolicy,
    ) -> &mut Self {
        self.entries.push(Entry {
            component,
            check: Arc::new(check),
            policy,
        });
        self
    }

    /// The number of checks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when the set has no check.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Starts one loop per check (the first check runs at once). The loops stop when the
    /// returned handle is dropped or stopped. The set can be spawned again later.
    pub fn spawn(&self) -> ChecksHandle {
        let mut tasks = JoinSet::new();
        for e in &self.entries {
            tasks.spawn(run(e.component.clone(), Arc::clone(&e.check), e.policy));
        }
        ChecksHandle { tasks }
    }
}

/// Records one outcome into `component` (the threshold logic, separated for tests).
pub(crate) fn record(component: &Component, policy: &CheckPolicy, outcome: Result<(), String>) {
    match outcome {
        Ok(()) => {
            component.set_consecutive_failures(0);
            component.set_detail(None);
            component.set_ready(true);
            if policy.wedge_on_failure {
                component.set_wedged(false);
            }
        }
        Err(e) => {
            let n = component.consecutive_failures().saturating_add(1);
            component.set_consecutive_failures(n);
            component.set_detail(Some(e));
            if n >= policy.failure_threshold.max(1) {
                if component.is_ready() {
                    tracing::warn!(
                        component = component.name(),
                        failures = n,
                        "health check failing"
                    );
                }
                component.set_ready(false);
                if policy.wedge_on_failure {
                    component.set_wedged(true);
                }
            }
        }
    }
}

async fn run(component: Component, check: Arc<dyn Check>, policy: CheckPolicy) {
    let interval = policy.interval.max(Duration::from_millis(1));
    let mut next = Instant::now();
    loop {
        let outcome = match tokio::time::timeout(policy.timeout, check.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "timed out after {:.3}s",
                policy.timeout.as_secs_f64()
            )),
        };
        let was_ready = component.is_ready();
        record(&component, &policy, outcome);
        if !was_ready && component.is_ready() {
            tracing::info!(component = component.name(), "health check recovered");
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Owns the loops started by [`CheckSet::spawn`]; dropping it cancels them.
#[derive(Debug)]
pub struct ChecksHandle {
    tasks: JoinSet<()>,
}

impl ChecksHandle {
    /// Cancels every loop and waits until they are gone.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }

    /// The number of loops still running.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// `true` when no loop is running.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HealthRegistry;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[test]
    fn flips_after_threshold_and_back_on_first_success() {
        let r = HealthRegistry::new();
        let c = r.register_ready("storage");
        let p = CheckPolicy {
            failure_threshold: 3,
            ..Default::default()
        };
        record(&c, &p, Err("refused".into()));
        record(&c, &p, Err("refused".into()));
        assert!(c.is_ready());
        assert_eq!(c.consecutive_failures(), 2);
        record(&c, &p, Err("refused".into()));
        assert!(!c.is_ready());
        assert_eq!(c.detail().as_deref().map(String::as_str), Some("refused"));
        assert!(!c.is_wedged(), "readiness only by default");
        record(&c, &p, Ok(()));
        assert!(c.is_ready());
        assert_eq!(c.consecutive_failures(), 0);
        assert!(c.detail().is_none());
    }

    #[test]
    fn a_success_resets_the_streak() {
        let r = HealthRegistry::new();
        let c = r.register_ready("storage");
        let p = CheckPolicy {
            failure_threshold: 2,
            wedge_on_failure: true,
            ..Default::default()
        };
        record(&c, &p, Err("x".into()));
        record(&c, &p, Ok(()));
        record(&c, &p, Err("x".into()));
        assert!(c.is_ready());
        record(&c, &p, Err("x".into()));
        assert!(!c.is_ready() && c.is_wedged());
        record(&c, &p, Ok(()));
        assert!(c.is_ready() && !c.is_wedged());
    }

    #[tokio::test(start_paused = true)]
    async fn loop_runs_every_interval_times_out_and_stops_when_dropped() {
        let r = HealthRegistry::new();
        let calls = Arc::new(AtomicU32::new(0));
        let hang = Arc::new(AtomicBool::new(false));
        let mut set = CheckSet::new();
        let (c2, h2) = (calls.clone(), hang.clone());
        set.add(
            r.register_ready("dep"),
            check_fn(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                let hang = h2.load(Ordering::SeqCst);
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    Ok::<(), std::io::Error>(())
                }
            }),
            CheckPolicy {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                failure_threshold: 2,
                wedge_on_failure: false,
            },
        );
        let handle = set.spawn();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "first check at once");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        hang.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            r.is_ready(),
            "one timed-out check so far (the second is still running)"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!r.is_ready(), "two timed-out checks");
        assert!(r
            .get("dep")
            .unwrap()
            .detail()
            .unwrap()
            .contains("timed out"));
        drop(handle);
        let before = calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "loops stopped with the handle"
        );
    }
}
