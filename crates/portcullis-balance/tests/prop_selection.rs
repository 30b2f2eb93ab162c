//! Property: every routing strategy only returns healthy replicas of the best tier with a
//! healthy member — or, in panic mode (fewer than `panic_threshold` % healthy), any replica —
//! apart from the single recovery lease of an ejected replica whose cooldown expired.
//!
//! Random pools (1..6 replicas, random tiers), random health (active probes marking replicas
//! up or down, reported to the registry as the checker does), random strategy and panic
//! threshold; then a burst of picks, some held at once.

use portcullis_balance::{HealthPolicy, ReplicaRegistry, RoutingStrategy, Status, Tier};
use portcullis_health::ProbeTargets;
use proptest::prelude::*;
use std::time::Duration;

fn strategy() -> impl Strategy<Value = RoutingStrategy> {
    prop_oneof![
        Just(RoutingStrategy::P2c),
        Just(RoutingStrategy::RoundRobin),
        Just(RoutingStrategy::FirstHealthy),
        Just(RoutingStrategy::LeastConnections),
        Just(RoutingStrategy::Weighted),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn picks_are_healthy_replicas_of_the_best_tier(
        strategy in strategy(),
        primaries in prop::collection::vec(any::<bool>(), 1..6),
        downs in prop::collection::vec(any::<bool>(), 6),
        panic_threshold in prop_oneof![Just(0.0), 1.0f64..100.0],
        picks in 1usize..24,
        hold in 0usize..6,
    ) {
        let policy = HealthPolicy {
            failure_threshold: 1,
            recovery_threshold: 1,
            eject_after: 0,
            eject_for: Duration::from_secs(3600),
            eject_max: Duration::from_secs(3600),
        };
        let reg = ReplicaRegistry::with_policy(strategy, policy, panic_threshold, Duration::from_secs(1));
        for (i, &primary) in primaries.iter().enumerate() {
            reg.add(format!("r{i}"), Tier::from_primary(primary), i);
        }
        let targets = reg.probe_targets();
        for (i, r) in reg.replicas().iter().enumerate() {
            if downs[i] {
                let t = r.health().record_probe(false, Duration::from_millis(1)).unwrap();
                targets.health_changed(r.key(), t);
            }
        }
        let replicas = reg.replicas();
        let healthy: Vec<_> = replicas.iter().filter(|r| r.health().status() == Status::Healthy).collect();
        let panic = panic_threshold > 0.0
            && (healthy.len() as f64) * 100.0 < panic_threshold * replicas.len() as f64;
        let best_tier = if healthy.iter().any(|r| r.tier() == Tier::Primary) {
            Some(Tier::Primary)
        } else if healthy.is_empty() {
            None
        } else {
            Some(Tier::Secondary)
        };
        let mut held = Vec::new();
        for _ in 0..picks {
            match reg.pick() {
                Ok(g) => {
                    prop_assert!(!g.is_probe(), "no replica is ejected");
                    if !panic {
                        prop_assert_eq!(g.replica().health().status(), Status::Healthy, "picked {}", g.key());
                        prop_assert_eq!(Some(g.tier()), best_tier, "picked {}", g.key());
                    }
                    if strategy == RoutingStrategy::FirstHealthy && !panic {
                        let first = healthy.iter().find(|r| Some(r.tier()) == best_tier).unwrap();
                        prop_assert_eq!(g.key(), first.key());
                    }
                    if held.len() < hold {
                        held.push(g);
                    }
                }
                Err(_) => prop_assert!(!panic && healthy.is_empty(), "refused with a healthy replica"),
            }
        }
        let inflight: usize = replicas.iter().map(|r| r.inflight()).sum();
        prop_assert_eq!(inflight, held.len());
        drop(held);
        prop_assert!(replicas.iter().all(|r| r.inflight() == 0));
    }

    /// An ejected replica whose cooldown expired is leased to exactly one pick at a time, and
    /// only if its tier could serve (a primary, or a secondary while no primary is healthy);
    /// the other picks go to the healthy replicas of the best tier.
    #[test]
    fn an_expired_ejection_is_leased_once(
        strategy in strategy(),
        primaries in prop::collection::vec(any::<bool>(), 2..6),
        ejected in any::<prop::sample::Index>(),
        picks in 1usize..12,
    ) {
        let policy = HealthPolicy {
            failure_threshold: 1,
            recovery_threshold: 1,
            eject_after: 1,
            eject_for: Duration::ZERO,
            eject_max: Duration::ZERO,
        };
        let reg = ReplicaRegistry::with_policy(strategy, policy, 0.0, Duration::from_secs(1));
        for (i, &primary) in primaries.iter().enumerate() {
            reg.add(format!("r{i}"), Tier::from_primary(primary), i);
        }
        let victim = reg.replicas()[ejected.index(primaries.len())].clone();
        // Eject it by a failed live response, reported to the registry as a pick's outcome is.
        let t = victim
            .health()
            .record_response(false, false, tokio::time::Instant::now())
            .unwrap();
        reg.probe_targets().health_changed(victim.key(), t);
        prop_assert_eq!(victim.health().status(), Status::Ejected);
        let mut held = Vec::new();
        for _ in 0..picks {
            let g = reg.pick().unwrap();
            if g.is_probe() {
                prop_assert_eq!(g.key(), victim.key());
                prop_assert!(held.iter().all(|h: &portcullis_balance::InflightGuard<usize>| !h.is_probe()), "two leases");
            } else {
                prop_assert_eq!(g.replica().health().status(), Status::Healthy);
                let best = if reg.replicas().iter().any(|r| r.tier() == Tier::Primary && r.health().is_healthy()) {
                    Tier::Primary
                } else {
                    Tier::Secondary
                };
                prop_assert_eq!(g.tier(), best);
            }
            held.push(g);
        }
        let primary_healthy = reg
            .replicas()
            .iter()
            .any(|r| r.tier() == Tier::Primary && r.health().is_healthy());
        let leasable = victim.tier() == Tier::Primary || !primary_healthy;
        prop_assert_eq!(
            held.iter().filter(|g| g.is_probe()).count(),
            usize::from(leasable),
            "the first pick leases it when its tier could serve"
        );
    }
}
