//! Property: [`HealthState`] (active thresholds, passive ejection, the recovery lease, the
//! growing cooldown, the ejection count kept across a reinstatement, both settings of
//! `uneject_on_active_check`, a replica that starts unchecked) behaves exactly as a small reference model written here, under
//! random sequences of probe results, live responses, lease attempts and outcomes, lease
//! give-backs and clock advances.
//!
//! The model follows the state machine as the code implements it today. The cooldown growth
//! is the one function [`growth`]: `eject_for` doubled on each consecutive ejection.

use portcullis_health::{HealthPolicy, HealthState, Status, Transition};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The uncapped cooldown of the `k`-th consecutive ejection (k ≥ 1).
fn growth(eject_for: Duration, k: u32) -> Duration {
    (1..k).fold(eject_for, |d, _| d.saturating_mul(2))
}

fn cooldown(p: &HealthPolicy, k: u32) -> Duration {
    growth(p.eject_for, k.max(1)).min(p.eject_max.max(p.eject_for))
}

#[derive(Debug, Clone)]
enum Op {
    Probe(bool),
    Response(bool),
    TryLease,
    LeaseOutcome(bool),
    Abandon,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(Op::Probe),
        3 => any::<bool>().prop_map(Op::Response),
        2 => Just(Op::TryLease),
        2 => any::<bool>().prop_map(Op::LeaseOutcome),
        1 => Just(Op::Abandon),
        2 => (0u64..40).prop_map(Op::Advance),
    ]
}

#[derive(Debug)]
struct Model {
    p: HealthPolicy,
    status: Status,
    probe_failures: u32,
    probe_successes: u32,
    response_failures: u32,
    ejections: u32,
    deadline: Duration,
    lease_held: bool,
    uneject_on_active_check: bool,
    /// When the last ejection ended by a reinstatement.
    reinstated_at: Option<Duration>,
}

impl Model {
    fn force(&mut self, to: Status) -> Option<Transition> {
        let from = self.status;
        if from == to {
            return None;
        }
        self.status = to;
        self.deadline = Duration::ZERO;
        Some(Transition { from, to })
    }

    /// The count the next passive ejection grows from.
    fn recent_ejections(&self, now: Duration) -> u32 {
        let window = self.p.eject_max.max(self.p.eject_for);
        match self.reinstated_at {
            Some(at) if now - at < window => self.ejections,
            _ => 0,
        }
    }

    fn probe(&mut self, ok: bool, now: Duration) -> Option<Transition> {
        if ok {
            self.probe_failures = 0;
            self.probe_successes += 1;
            let enough = self.probe_successes >= self.p.recovery_threshold.max(1);
            let allowed = self.status == Status::Unknown
                || (enough && (self.uneject_on_active_check || !self.status.is_ejected()));
            if allowed {
                let t = self.force(Status::Healthy);
                if let Some(t) = t {
                    self.response_failures = 0;
                    if t.from.is_ejected() {
                        self.reinstated_at = Some(now);
                    }
                }
                return t;
            }
        } else {
            self.probe_successes = 0;
            self.probe_failures += 1;
            if self.probe_failures >= self.p.failure_threshold.max(1) {
                return self.force(Status::Unhealthy);
            }
        }
        None
    }

    fn response(&mut self, ok: bool, now: Duration) -> Option<Transition> {
        if ok {
            self.response_failures = 0;
            return None;
        }
        if self.p.eject_after == 0 {
            return None;
        }
        self.response_failures += 1;
        if self.response_failures < self.p.eject_after || self.status != Status::Healthy {
            return None;
        }
        let k = self.recent_ejections(now) + 1;
        self.status = Status::Ejected;
        self.deadline = now + cooldown(&self.p, k);
        self.ejections = k;
        self.response_failures = 0;
        self.probe_successes = 0;
        Some(Transition {
            from: Status::Healthy,
            to: Status::Ejected,
        })
    }

    fn try_lease(&mut self, now: Duration) -> bool {
        if self.status == Status::Ejected && now >= self.deadline {
            self.status = Status::Probing;
            self.lease_held = true;
            return true;
        }
        false
    }

    fn lease_outcome(&mut self, ok: bool, now: Duration) -> Option<Transition> {
        self.lease_held = false;
        if self.status != Status::Probing {
            return None;
        }
        if ok {
            self.status = Status::Healthy;
            self.deadline = Duration::ZERO;
            self.response_failures = 0;
            self.reinstated_at = Some(now);
            return Some(Transition {
                from: Status::Probing,
                to: Status::Healthy,
            });
        }
        self.ejections += 1;
        self.status = Status::Ejected;
        self.deadline = now + cooldown(&self.p, self.ejections);
        self.probe_successes = 0;
        Some(Transition {
            from: Status::Probing,
            to: Status::Ejected,
        })
    }

    fn abandon(&mut self) {
        self.lease_held = false;
        if self.status == Status::Probing {
            self.status = Status::Ejected;
        }
    }
}

fn policy() -> impl Strategy<Value = HealthPolicy> {
    (1u32..4, 1u32..4, 0u32..4, 0u64..30, 0u64..100).prop_map(|(n, m, e, f, max)| HealthPolicy {
        failure_threshold: n,
        recovery_threshold: m,
        eject_after: e,
        eject_for: Duration::from_millis(f),
        eject_max: Duration::from_millis(max),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn health_state_matches_the_reference_model(
        p in policy(),
        uneject in any::<bool>(),
        unchecked in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let s = if unchecked {
            HealthState::new_unknown(Arc::new(p.clone()))
        } else {
            HealthState::new(Arc::new(p.clone()))
        };
        s.set_uneject_on_active_check(uneject);
        let t0 = Instant::now();
        let mut now = Duration::ZERO;
        let mut m = Model {
            p,
            status: if unchecked { Status::Unknown } else { Status::Healthy },
            probe_failures: 0,
            probe_successes: 0,
            response_failures: 0,
            ejections: 0,
            deadline: Duration::ZERO,
            lease_held: false,
            uneject_on_active_check: uneject,
            reinstated_at: None,
        };
        for op in ops {
            let at = t0 + now;
            match op {
                Op::Probe(ok) => {
                    prop_assert_eq!(
                        s.record_probe_at(ok, Duration::from_millis(1), at),
                        m.probe(ok, now)
                    );
                }
                Op::Response(ok) => {
                    prop_assert_eq!(s.record_response(ok, false, at), m.response(ok, now));
                }
                Op::TryLease => prop_assert_eq!(s.try_lease(at), m.try_lease(now)),
                Op::LeaseOutcome(ok) if m.lease_held => {
                    prop_assert_eq!(s.record_response(ok, true, at), m.lease_outcome(ok, now));
                }
                Op::Abandon if m.lease_held => {
                    s.abandon_lease();
                    m.abandon();
                }
                Op::LeaseOutcome(_) | Op::Abandon => {}
                Op::Advance(ms) => now += Duration::from_millis(ms),
            }
            let at = t0 + now;
            let c = s.counters(at);
            prop_assert_eq!(c.status, m.status);
            prop_assert_eq!(c.consecutive_probe_failures, m.probe_failures);
            prop_assert_eq!(c.consecutive_probe_successes, m.probe_successes);
            prop_assert_eq!(c.consecutive_response_failures, m.response_failures);
            let ejected = m.status.is_ejected();
            prop_assert_eq!(c.ejections, if ejected { m.ejections } else { 0 });
            let recent = if ejected { m.ejections } else { m.recent_ejections(now) };
            prop_assert_eq!(c.recent_ejections, recent);
            let left = if m.status == Status::Ejected {
                m.deadline.saturating_sub(now)
            } else {
                Duration::ZERO
            };
            prop_assert_eq!(c.ejected_for, left);
            prop_assert_eq!(s.lease_available(at), m.status == Status::Ejected && now >= m.deadline);
        }
    }
}
