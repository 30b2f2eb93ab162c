//! The health state machine of one replica, driven by active probes *and* live traffic.
//!
//! One [`HealthState`] per replica holds five statuses:
//!
//! ```text
//!                 failure_threshold failed probes
//!      ┌──────────────────────────────────────────────────────────┐
//!      │                                                          ▼
//!   HEALTHY ──(eject_after failed responses)──▶ EJECTED ──(N failed probes)──▶ UNHEALTHY
//!      ▲  ▲                                      │   ▲                            │
//!      │  │                     cooldown expired │   │ lease failed:              │
//!      │  │                     one CAS lease    ▼   │ re-eject, longer           │
//!      │  └────────(lease succeeded)─────────  PROBING                            │
//!      │                                                                          │
//!      └──(recovery_threshold consecutive good probes; from EJECTED/PROBING only──┘
//!      ▲           with uneject_on_active_check)
//!      └──(its first good probe)── UNKNOWN ──(failure_threshold failed probes)──▶ UNHEALTHY
//! ```
//!
//! * **Unknown** ([`HealthState::new_unknown`]): a replica added at run time has not been
//!   checked yet. It gets no traffic (except in panic mode, which routes to every replica)
//!   until its first good probe makes it healthy; `failure_threshold` failed probes make it
//!   unhealthy. Live failures never eject it (only a healthy replica is ejected).
//!
//! ```text
//! ```
//!
//! * **Active checks** (HAProxy's `rise`/`fall`): `failure_threshold` consecutive failed
//!   probes make the replica [`Status::Unhealthy`] from any state; `recovery_threshold`
//!   consecutive good probes make it [`Status::Healthy`] again. Each outcome resets the
//!   opposite counter. Good probes do not end a passive ejection unless
//!   [`set_uneject_on_active_check`](HealthState::set_uneject_on_active_check) is on
//!   (Envoy's `successful_active_health_check_uneject_host`): a replica that answers its
//!   health endpoint but fails live traffic would otherwise be back within
//!   `recovery_threshold` probe intervals, whatever `eject_for` says.
//! * **Passive outlier ejection** (Envoy's `consecutive_5xx`): `eject_after` consecutive failed
//!   live responses eject a healthy replica for `eject_for`. When the cooldown has expired,
//!   exactly one request is leased to it as a probe by a compare-and-swap
//!   ([`HealthState::try_lease`]); its success reinstates the replica, its failure re-ejects
//!   it for `eject_for × 2^(k-1)` (k = consecutive ejections: the cooldown doubles on each
//!   re-ejection, capped at `eject_max`). Envoy grows it linearly (`base_ejection_time ×
//!   ejection count`); doubling reaches the cap in a few steps, so a replica that keeps
//!   failing is soon tried only rarely.
//! * **Flapping**: the ejection count survives a reinstatement. A replica ejected again
//!   within `eject_max` (at least `eject_for`) of its last reinstatement gets the next,
//!   doubled cooldown; one that stayed in that long starts over at `eject_for`.
//! * Both signals drive the *same* status word, so a replica that active checks marked
//!   unhealthy is never reinstated by one lucky live request (only a lease from `EJECTED` can
//!   reinstate, and unhealthy replicas are never leased); with `uneject_on_active_check` an
//!   ejected replica can also earn its way back with `recovery_threshold` passing probes
//!   (counted from the ejection).
//!
//! The status and the ejection deadline are packed in one `AtomicU64` so that a transition
//! and its deadline change together in one compare-and-swap; every other field is an atomic
//! counter. Nothing here locks, allocates or does I/O, so the request path may call it.
//! Time is `tokio::time::Instant`, so tests drive it with tokio's paused clock.

use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The health status of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Serving traffic.
    Healthy,
    /// Marked down by `failure_threshold` failed active probes; needs `recovery_threshold`
    /// good probes to come back.
    Unhealthy,
    /// Ejected by passive outlier detection until its cooldown expires.
    Ejected,
    /// Ejected, cooldown expired, and one request is out as the recovery probe.
    Probing,
    /// Not checked yet (a replica added at run time): no traffic until its first good probe.
    Unknown,
}

impl Status {
    /// `true` for [`Status::Healthy`].
    pub const fn is_healthy(self) -> bool {
        matches!(self, Status::Healthy)
    }

    /// `true` for [`Status::Ejected`] and [`Status::Probing`].
    pub const fn is_ejected(self) -> bool {
        matches!(self, Status::Ejected | Status::Probing)
    }

    const fn bits(self) -> u64 {
        match self {
            Status::Healthy => 0,
            Status::Unhealthy => 1,
            Status::Ejected => 2,
            Status::Probing => 3,
            Status::Unknown => 4,
        }
    }

    const fn from_bits(b: u64) -> Self {
        match b & 7 {
            0 => Status::Healthy,
            1 => Status::Unhealthy,
            2 => Status::Ejected,
            3 => Status::Probing,
            _ => Status::Unknown,
        }
    }
}

/// A status change reported by the [`HealthState`] methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The status before.
    pub from: Status,
    /// The status after.
    pub to: Status,
}

/// The thresholds of the state machine (shared by every replica of a pool).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    /// Consecutive failed probes that make a replica unhealthy (at least 1).
    pub failure_threshold: u32,
    /// Consecutive good probes that make it healthy again (at least 1).
    pub recovery_threshold: u32,
    /// Consecutive failed live responses that eject a healthy replica; 0 turns passive
    /// ejection off.
    pub eject_after: u32,
    /// The first ejection's cooldown.
    pub eject_for: Duration,
    /// The cap of the growing cooldown (`eject_for`, doubled on each consecutive ejection).
    pub eject_max: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            recovery_threshold: 2,
            eject_after: 5,
            eject_for: Duration::from_secs(30),
            eject_max: Duration::from_secs(300),
        }
    }
}

impl HealthPolicy {
    /// The cooldown of the `k`-th consecutive ejection (k ≥ 1): `eject_for × 2^(k-1)`, so it
    /// doubles on each consecutive re-ejection, at most `eject_max` (and never below
    /// `eject_for` when `eject_max` is smaller).
    pub fn cooldown(&self, k: u32) -> Duration {
        let doublings = k.max(1) - 1;
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        let grown = self.eject_for.saturating_mul(factor);
        grown.min(self.eject_max.max(self.eject_for))
    }

    /// How long a reinstated replica remembers its ejection count: `eject_max`, at least
    /// `eject_for`. Ejected again within it, the replica gets the next, doubled cooldown.
    pub fn flap_window(&self) -> Duration {
        self.eject_max.max(self.eject_for)
    }
}

/// The status takes the 3 high bits of the word, the deadline the 61 low ones (73 years of
/// nanoseconds).
const STATUS_SHIFT: u32 = 61;
const DEADLINE_MASK: u64 = (1 << STATUS_SHIFT) - 1;
const NO_LATENCY: u64 = u64::MAX;

fn pack(status: Status, deadline: u64) -> u64 {
    (status.bits() << STATUS_SHIFT) | (deadline & DEADLINE_MASK)
}

fn unpack(word: u64) -> (Status, u64) {
    (
        Status::from_bits(word >> STATUS_SHIFT),
        word & DEADLINE_MASK,
    )
}

/// A point-in-time copy of a [`HealthState`]'s counters (no I/O, no lock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCounters {
    /// The status.
    pub status: Status,
    /// Consecutive failed active probes.
    pub consecutive_probe_failures: u32,
    /// Consecutive good active probes.
    pub consecutive_probe_successes: u32,
    /// Consecutive failed live responses.
    pub consecutive_response_failures: u32,
    /// Consecutive ejections (the cooldown multiplier) while ejected or probing; 0 otherwise.
    pub ejections: u32,
    /// The ejection count the next cooldown grows from: `ejections` while ejected, and kept
    /// after a reinstatement for [`HealthPolicy::flap_window`], so a replica that flaps gets
    /// ever longer cooldowns; 0 once it stayed in that long.
    pub recent_ejections: u32,
    /// Time left before an ejected replica may be probed (0 when not ejected or expired).
    #[serde(serialize_with = "portcullis_core::seconds::serialize")]
    pub ejected_for: Duration,
    /// Latency of the last active probe, if any.
    #[serde(serialize_with = "portcullis_core::seconds::option::serialize")]
    pub last_probe_latency: Option<Duration>,
}

/// The lock-free health state machine of one replica (see the [module docs](self)).
#[derive(Debug)]
pub struct HealthState {
    /// Status (3 high bits) and ejection deadline (nanoseconds since `base`, 61 low bits).
    word: AtomicU64,
    probe_failures: AtomicU32,
    probe_successes: AtomicU32,
    response_failures: AtomicU32,
    /// Consecutive ejections, kept after a reinstatement (see `recent_ejections`).
    ejections: AtomicU32,
    /// When the last ejection ended by a reinstatement (nanoseconds as the deadline; 0: never).
    reinstated_at: AtomicU64,
    uneject_on_active_check: AtomicBool,
    last_probe_latency_ns: AtomicU64,
    base: Instant,
    policy: Arc<HealthPolicy>,
}

fn bump(c: &AtomicU32) -> u32 {
    c.fetch_add(1, Ordering::AcqRel).saturating_add(1)
}

impl HealthState {
    /// A healthy replica under `policy`.
    pub fn new(policy: Arc<HealthPolicy>) -> Self {
        Self::with_status(Status::Healthy, policy)
    }

    /// A replica that is not checked yet ([`Status::Unknown`]): it becomes healthy with its
    /// first good probe.
    pub fn new_unknown(policy: Arc<HealthPolicy>) -> Self {
        Self::with_status(Status::Unknown, policy)
    }

    fn with_status(status: Status, policy: Arc<HealthPolicy>) -> Self {
        Self {
            word: AtomicU64::new(pack(status, 0)),
            probe_failures: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            response_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            reinstated_at: AtomicU64::new(0),
            uneject_on_active_check: AtomicBool::new(false),
            last_probe_latency_ns: AtomicU64::new(NO_LATENCY),
            base: Instant::now(),
            policy,
        }
    }

    /// The policy this state runs under.
    pub fn policy(&self) -> &HealthPolicy {
        &self.policy
    }

    /// With `true`, `recovery_threshold` good active probes also end a passive ejection
    /// (Envoy's `successful_active_health_check_uneject_host`). Off by default: an ejected
    /// replica then stays out until its cooldown ends and a live request leased to it
    /// succeeds, since a replica can answer its health endpoint and still fail real requests.
    pub fn set_uneject_on_active_check(&self, on: bool) {
        self.uneject_on_active_check.store(on, Ordering::Relaxed);
    }

    /// See [`set_uneject_on_active_check`](Self::set_uneject_on_active_check).
    pub fn uneject_on_active_check(&self) -> bool {
        self.uneject_on_active_check.load(Ordering::Relaxed)
    }

    /// The current status (one atomic load).
    #[inline]
    pub fn status(&self) -> Status {
        unpack(self.word.load(Ordering::Acquire)).0
    }

    /// `true` when the status is [`Status::Healthy`] (one atomic load).
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.word.load(Ordering::Acquire) >> STATUS_SHIFT == 0
    }

    fn nanos(&self, now: Instant) -> u64 {
        // +1 so that a deadline is never 0 (0 means "none").
        let n = now.saturating_duration_since(self.base).as_nanos();
        (n.min(u128::from(DEADLINE_MASK - 1)) as u64) + 1
    }

    /// `true` when the replica is ejected and its cooldown has expired, i.e. a
    /// [`try_lease`](Self::try_lease) at `now` could succeed.
    pub fn lease_available(&self, now: Instant) -> bool {
        let (status, deadline) = unpack(self.word.load(Ordering::Acquire));
        status == Status::Ejected && self.nanos(now) >= deadline
    }

    /// Leases the single recovery probe of an ejected replica whose cooldown has expired.
    ///
    /// A compare-and-swap `EJECTED → PROBING`: of any number of concurrent callers at most
    /// one gets `true`. The winner must report its request with
    /// [`record_response`](Self::record_response)`(_, true, _)` or give the lease back with
    /// [`abandon_lease`](Self::abandon_lease).
    pub fn try_lease(&self, now: Instant) -> bool {
        let cur = self.word.load(Ordering::Acquire);
        let (status, deadline) = unpack(cur);
        if status != Status::Ejected || self.nanos(now) < deadline {
            return false;
        }
        self.word
            .compare_exchange(
                cur,
                pack(Status::Probing, deadline),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Gives back a lease whose request ended with no verdict (cancelled): `PROBING →
    /// EJECTED` with the (expired) deadline unchanged, so the next request may probe.
    pub fn abandon_lease(&self) {
        let cur = self.word.load(Ordering::Acquire);
        let (status, deadline) = unpack(cur);
        if status == Status::Probing {
            let _ = self.word.compare_exchange(
                cur,
                pack(Status::Ejected, deadline),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Moves to `to` from any status but `to` that `from_ok` accepts; returns the transition
    /// made.
    fn force(
        &self,
        to: Status,
        deadline: u64,
        from_ok: impl Fn(Status) -> bool,
    ) -> Option<Transition> {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            let (from, _) = unpack(cur);
            if from == to || !from_ok(from) {
                return None;
            }
            match self.word.compare_exchange_weak(
                cur,
                pack(to, deadline),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Transition { from, to }),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Records one active probe outcome and its latency, now.
    ///
    /// `failure_threshold` consecutive failures make the replica unhealthy (from any status);
    /// `recovery_threshold` consecutive successes make it healthy (from an ejection only with
    /// [`uneject_on_active_check`](Self::set_uneject_on_active_check)), and so does the first
    /// success of a [`Status::Unknown`] replica. Each outcome resets the opposite streak.
    pub fn record_probe(&self, healthy: bool, latency: Duration) -> Option<Transition> {
        self.record_probe_at(healthy, latency, Instant::now())
    }

    /// [`record_probe`](Self::record_probe) at `now` (the time a reinstatement is
    /// remembered at).
    pub fn record_probe_at(
        &self,
        healthy: bool,
        latency: Duration,
        now: Instant,
    ) -> Option<Transition> {
        self.last_probe_latency_ns.store(
            u64::try_from(latency.as_nanos()).unwrap_or(NO_LATENCY - 1),
            Ordering::Relaxed,
        );
        if healthy {
            self.probe_failures.store(0, Ordering::Release);
            let ok = bump(&self.probe_successes);
            let enough = ok >= self.policy.recovery_threshold.max(1);
            let uneject = self.uneject_on_active_check();
            let t = self.force(Status::Healthy, 0, |from| {
                from == Status::Unknown || (enough && (uneject || !from.is_ejected()))
            });
            if let Some(t) = t {
                self.response_failures.store(0, Ordering::Release);
                if t.from.is_ejected() {
                    self.reinstated_at.store(self.nanos(now), Ordering::Release);
                }
            }
            return t;
        } else {
            self.probe_successes.store(0, Ordering::Release);
            let failed = bump(&self.probe_failures);
            if failed >= self.policy.failure_threshold.max(1) {
                return self.force(Status::Unhealthy, 0, |_| true);
            }
        }
        None
    }

    /// The ejection count a passive ejection at `now` grows from: the stored count while the
    /// last reinstatement is within [`HealthPolicy::flap_window`], else 0.
    fn recent_ejections(&self, now: Instant) -> u32 {
        let at = self.reinstated_at.load(Ordering::Acquire);
        let window = u64::try_from(self.policy.flap_window().as_nanos()).unwrap_or(u64::MAX);
        if at != 0 && self.nanos(now).saturating_sub(at) < window {
            self.ejections.load(Ordering::Acquire)
        } else {
            0
        }
    }

    /// Records the outcome of one live response.
    ///
    /// `lease` says whether this request was the recovery probe obtained from
    /// [`try_lease`](Self::try_lease). A lease's success reinstates the replica, its failure
    /// re-ejects it with a longer cooldown; both are no-ops if the status moved on meanwhile
    /// (e.g. active checks marked it unhealthy). Other requests only feed the consecutive
    /// failure streak that ejects a *healthy* replica at `eject_after`.
    pub fn record_response(&self, success: bool, lease: bool, now: Instant) -> Option<Transition> {
        if lease {
            let cur = self.word.load(Ordering::Acquire);
            if unpack(cur).0 != Status::Probing {
                return None;
            }
            let next = if success {
                pack(Status::Healthy, 0)
            } else {
                let k = self.ejections.load(Ordering::Acquire).saturating_add(1);
                pack(Status::Ejected, self.nanos(now + self.policy.cooldown(k)))
            };
            if self
                .word
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return None;
            }
            if success {
                self.response_failures.store(0, Ordering::Release);
                self.reinstated_at.store(self.nanos(now), Ordering::Release);
                return Some(Transition {
                    from: Status::Probing,
                    to: Status::Healthy,
                });
            }
            bump(&self.ejections);
            self.probe_successes.store(0, Ordering::Release);
            return Some(Transition {
                from: Status::Probing,
                to: Status::Ejected,
            });
        }
        if success {
            self.record_success();
            return None;
        }
        let eject_after = self.policy.eject_after;
        if eject_after == 0 {
            return None;
        }
        let failed = bump(&self.response_failures);
        if failed < eject_after {
            return None;
        }
        let cur = self.word.load(Ordering::Acquire);
        if unpack(cur).0 != Status::Healthy {
            return None;
        }
        let k = self.recent_ejections(now).saturating_add(1);
        let deadline = self.nanos(now + self.policy.cooldown(k));
        if self
            .word
            .compare_exchange(
                cur,
                pack(Status::Ejected, deadline),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return None;
        }
        self.ejections.store(k, Ordering::Release);
        self.response_failures.store(0, Ordering::Release);
        self.probe_successes.store(0, Ordering::Release);
        Some(Transition {
            from: Status::Healthy,
            to: Status::Ejected,
        })
    }

    /// Records a successful live response that was not a lease: resets the failure streak
    /// (the same as `record_response(true, false, _)`, without needing the time).
    #[inline]
    pub fn record_success(&self) {
        // Avoid a shared write on the hot path when there is nothing to reset.
        if self.response_failures.load(Ordering::Relaxed) != 0 {
            self.response_failures.store(0, Ordering::Release);
        }
    }

    /// A copy of the counters at `now`.
    pub fn counters(&self, now: Instant) -> HealthCounters {
        let (status, deadline) = unpack(self.word.load(Ordering::Acquire));
        let ejected_for = if status == Status::Ejected {
            Duration::from_nanos(deadline.saturating_sub(self.nanos(now)))
        } else {
            Duration::ZERO
        };
        let lat = self.last_probe_latency_ns.load(Ordering::Relaxed);
        let recent_ejections = if status.is_ejected() {
            self.ejections.load(Ordering::Acquire)
        } else {
            self.recent_ejections(now)
        };
        HealthCounters {
            status,
            consecutive_probe_failures: self.probe_failures.load(Ordering::Acquire),
            consecutive_probe_successes: self.probe_successes.load(Ordering::Acquire),
            consecutive_response_failures: self.response_failures.load(Ordering::Acquire),
            ejections: if status.is_ejected() {
                self.ejections.load(Ordering::Acquire)
            } else {
                0
            },
            recent_ejections,
            ejected_for,
            last_probe_latency: (lat != NO_LATENCY).then(|| Duration::from_nanos(lat)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(n: u32, m: u32, eject_after: u32) -> Arc<HealthPolicy> {
        Arc::new(HealthPolicy {
            failure_threshold: n,
            recovery_threshold: m,
            eject_after,
            eject_for: Duration::from_secs(10),
            eject_max: Duration::from_secs(25),
        })
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn goes_down_at_exactly_n_and_up_at_exactly_m() {
        let s = HealthState::new(policy(3, 2, 0));
        assert_eq!(s.record_probe(false, MS), None);
        assert_eq!(s.record_probe(false, MS), None);
        assert!(s.is_healthy());
        assert_eq!(
            s.record_probe(false, MS),
            Some(Transition {
                from: Status::Healthy,
                to: Status::Unhealthy
            })
        );
        assert_eq!(s.record_probe(false, MS), None, "already unhealthy");
        assert_eq!(s.record_probe(true, MS), None);
        assert_eq!(s.status(), Status::Unhealthy);
        assert_eq!(
            s.record_probe(true, MS),
            Some(Transition {
                from: Status::Unhealthy,
                to: Status::Healthy
            })
        );
    }

    #[test]
    fn opposite_outcome_resets_the_streak() {
        let s = HealthState::new(policy(3, 2, 0));
        s.record_probe(false, MS);
        s.record_probe(false, MS);
        s.record_probe(true, MS); // resets failures
        assert_eq!(s.counters(Instant::now()).consecutive_probe_failures, 0);
        s.record_probe(false, MS);
        s.record_probe(false, MS);
        assert!(s.is_healthy(), "2 failures after a success are not 3");
        s.record_probe(false, MS);
        assert_eq!(s.status(), Status::Unhealthy);
        s.record_probe(true, MS);
        s.record_probe(false, MS); // resets successes
        s.record_probe(true, MS);
        assert_eq!(
            s.status(),
            Status::Unhealthy,
            "1 success after a failure is not 2"
        );
        s.record_probe(true, MS);
        assert!(s.is_healthy());
        let c = s.counters(Instant::now());
        assert_eq!(c.consecutive_probe_successes, 2);
        assert_eq!(c.last_probe_latency, Some(MS));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_cooldown_lease_and_growth() {
        let s = HealthState::new(policy(3, 2, 2));
        let now = Instant::now();
        assert_eq!(s.record_response(false, false, now), None);
        assert_eq!(
            s.record_response(true, false, now),
            None,
            "success resets the streak"
        );
        assert_eq!(s.record_response(false, false, now), None);
        assert_eq!(
            s.record_response(false, false, now),
            Some(Transition {
                from: Status::Healthy,
                to: Status::Ejected
            })
        );
        assert!(!s.try_lease(Instant::now()), "cooldown not expired");
        assert_eq!(
            s.counters(Instant::now()).ejected_for,
            Duration::from_secs(10)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.try_lease(Instant::now()));
        assert!(!s.try_lease(Instant::now()), "only one lease");
        assert_eq!(s.status(), Status::Probing);
        // The lease fails: re-ejected for 10 s × 2.
        assert_eq!(
            s.record_response(false, true, Instant::now()),
            Some(Transition {
                from: Status::Probing,
                to: Status::Ejected
            })
        );
        assert_eq!(
            s.counters(Instant::now()).ejected_for,
            Duration::from_secs(20)
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(s.try_lease(Instant::now()));
        s.record_response(false, true, Instant::now());
        // 10 s × 4 = 40 s, capped at 25 s.
        assert_eq!(
            s.counters(Instant::now()).ejected_for,
            Duration::from_secs(25)
        );
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(s.try_lease(Instant::now()));
        // A cancelled probe gives the lease back at once.
        s.abandon_lease();
        assert_eq!(s.status(), Status::Ejected);
        assert!(s.try_lease(Instant::now()));
        assert_eq!(
            s.record_response(true, true, Instant::now()),
            Some(Transition {
                from: Status::Probing,
                to: Status::Healthy
            })
        );
        assert_eq!(s.counters(Instant::now()).ejections, 0);
    }

    #[test]
    fn cooldown_doubles_on_each_re_ejection_up_to_the_cap() {
        let p = HealthPolicy {
            eject_for: Duration::from_secs(2),
            eject_max: Duration::from_secs(20),
            ..HealthPolicy::default()
        };
        let secs: Vec<u64> = (1..=6).map(|k| p.cooldown(k).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 20, 20]);
        assert_eq!(
            p.cooldown(0),
            Duration::from_secs(2),
            "k = 0 counts as the first"
        );
        assert_eq!(p.cooldown(u32::MAX), Duration::from_secs(20), "no overflow");
        let small_cap = HealthPolicy {
            eject_max: Duration::from_secs(1),
            ..p
        };
        assert_eq!(
            small_cap.cooldown(3),
            Duration::from_secs(2),
            "never below eject_for"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_failed_lease_doubles_the_ejection() {
        let s = HealthState::new(Arc::new(HealthPolicy {
            eject_after: 1,
            eject_for: Duration::from_secs(2),
            eject_max: Duration::from_secs(300),
            ..HealthPolicy::default()
        }));
        s.record_response(false, false, Instant::now());
        let mut seen = vec![s.counters(Instant::now()).ejected_for.as_secs()];
        for _ in 0..3 {
            tokio::time::advance(s.counters(Instant::now()).ejected_for).await;
            assert!(s.try_lease(Instant::now()));
            s.record_response(false, true, Instant::now());
            seen.push(s.counters(Instant::now()).ejected_for.as_secs());
        }
        assert_eq!(seen, [2, 4, 8, 16], "2 s doubled on each re-ejection");
    }

    #[tokio::test(start_paused = true)]
    async fn active_unhealthy_is_not_reinstated_by_a_live_request() {
        let s = HealthState::new(policy(2, 2, 1));
        s.record_response(false, false, Instant::now());
        assert_eq!(s.status(), Status::Ejected);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.try_lease(Instant::now()));
        // While the probe request is out, active checks mark it unhealthy.
        s.record_probe(false, MS);
        s.record_probe(false, MS);
        assert_eq!(s.status(), Status::Unhealthy);
        // The lucky live request does not bring it back.
        assert_eq!(s.record_response(true, true, Instant::now()), None);
        assert_eq!(s.record_response(true, false, Instant::now()), None);
        assert_eq!(s.status(), Status::Unhealthy);
        assert!(
            !s.try_lease(Instant::now()),
            "unhealthy replicas are never leased"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_replica_recovers_by_m_good_probes() {
        let s = HealthState::new(policy(3, 2, 1));
        s.set_uneject_on_active_check(true);
        // It was healthy for a long time: a high success streak must not count.
        for _ in 0..10 {
            s.record_probe(true, MS);
        }
        s.record_response(false, false, Instant::now());
        assert_eq!(s.status(), Status::Ejected);
        assert_eq!(s.record_probe(true, MS), None);
        assert_eq!(
            s.record_probe(true, MS),
            Some(Transition {
                from: Status::Ejected,
                to: Status::Healthy
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn good_probes_do_not_end_a_passive_ejection_by_default() {
        let s = HealthState::new(policy(3, 2, 1));
        assert!(!s.uneject_on_active_check());
        s.record_response(false, false, Instant::now());
        for _ in 0..20 {
            assert_eq!(s.record_probe(true, MS), None);
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        // 10 s of passing probes: still ejected until the lease succeeds.
        assert_eq!(s.status(), Status::Ejected);
        assert!(s.try_lease(Instant::now()));
        assert_eq!(s.record_probe(true, MS), None, "nor while its lease is out");
        s.record_response(true, true, Instant::now());
        assert_eq!(s.status(), Status::Healthy);
        // Failed probes still mark an ejected replica down.
        s.record_response(false, false, Instant::now());
        for _ in 0..3 {
            s.record_probe(false, MS);
        }
        assert_eq!(s.status(), Status::Unhealthy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_replica_keeps_its_ejection_count() {
        // eject_for 10 s, cap 25 s: the count is kept for 25 s after a reinstatement.
        for uneject in [false, true] {
            let s = HealthState::new(policy(3, 1, 1));
            s.set_uneject_on_active_check(uneject);
            let mut cooldowns = Vec::new();
            for _ in 0..3 {
                s.record_response(false, false, Instant::now());
                let c = s.counters(Instant::now());
                cooldowns.push(c.ejected_for.as_secs());
                assert_eq!(c.ejections, c.recent_ejections);
                tokio::time::advance(c.ejected_for).await;
                if uneject {
                    assert!(s.record_probe(true, MS).is_some(), "a good check un-ejects");
                } else {
                    assert!(s.try_lease(Instant::now()));
                    s.record_response(true, true, Instant::now());
                }
                assert_eq!(s.status(), Status::Healthy);
                let c = s.counters(Instant::now());
                assert_eq!(
                    (c.ejections, c.recent_ejections),
                    (0, cooldowns.len() as u32)
                );
                tokio::time::advance(Duration::from_secs(5)).await;
            }
            assert_eq!(
                cooldowns,
                [10, 20, 25],
                "uneject_on_active_check: {uneject}"
            );
            // In for the whole window: the next ejection starts over.
            tokio::time::advance(Duration::from_secs(25)).await;
            assert_eq!(s.counters(Instant::now()).recent_ejections, 0);
            s.record_response(false, false, Instant::now());
            let c = s.counters(Instant::now());
            assert_eq!((c.ejected_for.as_secs(), c.ejections), (10, 1));
        }
    }

    #[test]
    fn passive_ejection_off_when_eject_after_is_zero() {
        let s = HealthState::new(policy(3, 2, 0));
        for _ in 0..100 {
            assert_eq!(s.record_response(false, false, Instant::now()), None);
        }
        assert!(s.is_healthy());
    }

    #[test]
    fn exactly_one_lease_among_64_threads() {
        let p = Arc::new(HealthPolicy {
            eject_after: 1,
            eject_for: Duration::ZERO,
            ..HealthPolicy::default()
        });
        for _ in 0..20 {
            let s = Arc::new(HealthState::new(p.clone()));
            s.record_response(false, false, Instant::now());
            assert_eq!(s.status(), Status::Ejected);
            let barrier = Arc::new(std::sync::Barrier::new(64));
            let wins: usize = (0..64)
                .map(|_| {
                    let s = s.clone();
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        b.wait();
                        usize::from(s.try_lease(Instant::now()))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum();
            assert_eq!(wins, 1);
        }
    }
}
