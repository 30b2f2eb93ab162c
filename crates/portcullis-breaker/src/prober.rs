//! The background recovery prober and the retrying probe.
//!
//! One task per [`Breaker`](crate::Breaker). It sleeps until the primary trips, then probes
//! the primary every `recheck_interval` until the breaker is back to NORMAL. Probes run one
//! after another inside this task, so at most one background probe is ever in flight, and no
//! client request ever waits for one. The task holds only a `Weak` reference to the breaker
//! and is aborted when the breaker's last clone is dropped.

use crate::breaker::Shared;
use crate::snapshot::ProbeReport;
use crate::Config;
use portcullis_core::backoff::{Backoff, Delays};
use portcullis_health::Probe;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The retry policy of one probe (a `Copy` extract of [`Config`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub(crate) max_retries: u32,
    /// The waits between attempts; `None` when `probe_backoff_base` is zero (retry at once).
    pub(crate) backoff: Option<Backoff>,
    pub(crate) timeout: Duration,
}

impl RetryPolicy {
    pub(crate) fn of(cfg: &Config) -> Self {
        Self {
            max_retries: cfg.probe_max_retries,
            backoff: cfg.probe_backoff(),
            timeout: cfg.probe_timeout,
        }
    }
}

/// Probes `target` with up to `max_retries` retries, waiting `probe_backoff_base × 2^n`
/// before retry `n` (0-based): 0.5 s, 1 s, 2 s, ... with the default 0.5 s base, no wait
/// with a zero base. Each attempt is bounded by `timeout` (on top of the probe's own), so the
/// whole call is bounded. The probe fails only when every attempt failed.
pub(crate) async fn probe_with_retries(
    probe: &dyn Probe,
    target: &str,
    policy: RetryPolicy,
) -> ProbeReport {
    let start = Instant::now();
    let mut attempts = 0;
    let mut last = None;
    let mut delays = policy.backoff.map(|b| b.delays());
    for attempt in 0..=policy.max_retries {
        if attempt > 0 {
            let delay = delays.as_mut().map_or(Duration::ZERO, Delays::next_delay);
            tracing::debug!(
                target = %target,
                retry = attempt,
                max_retries = policy.max_retries,
                delay_s = delay.as_secs_f64(),
                "probe retry after back-off"
            );
            tokio::time::sleep(delay).await;
        }
        attempts += 1;
        let began = Instant::now();
        let result = match tokio::time::timeout(policy.timeout, probe.probe(target)).await {
            Ok(r) => r,
            Err(_) => portcullis_health::ProbeResult::unhealthy(began.elapsed(), "timeout"),
        };
        let healthy = result.healthy;
        last = Some(result);
        if healthy {
            break;
        }
    }
    let last = last
        .unwrap_or_else(|| portcullis_health::ProbeResult::unhealthy(Duration::ZERO, "no attempt"));
    ProbeReport {
        target: target.to_owned(),
        healthy: last.healthy,
        attempts,
        latency_seconds: last.latency.as_secs_f64(),
        elapsed_seconds: start.elapsed().as_secs_f64(),
        detail: last.detail,
    }
}

/// The prober task body.
pub(crate) async fn run(weak: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        // Sleep until the primary trips (a permit left by `notify_one` is never lost).
        loop {
            let notified = wake.notified();
            {
                let Some(shared) = weak.upgrade() else { return };
                if shared.is_tripped() {
                    break;
                }
            }
            notified.await;
        }
        let interval = match weak.upgrade() {
            Some(shared) => shared.config().recheck_interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let (probe, target, policy) = {
            let Some(shared) = weak.upgrade() else { return };
            if !shared.is_tripped() {
                continue;
            }
            (
                shared.probe().clone(),
                shared.primary_target().to_owned(),
                RetryPolicy::of(shared.config()),
            )
        };
        let report = probe_with_retries(&*probe, &target, policy).await;
        let Some(shared) = weak.upgrade() else { return };
        shared.apply_background_probe(report);
    }
}
