//! `least-connections` and `weighted` through the registry: the exact minimum with ties
//! taking turns, tiers and health still deciding the candidates, nginx's smooth weighted
//! sequence, exact shares per round, and shares by weight under concurrent picks.

use portcullis_balance::{Config, InflightGuard, ReplicaRegistry, RoutingStrategy, Tier};
use portcullis_health::{HealthChecker, Probe, ProbeFuture, ProbeResult};
use std::collections::HashMap;
use std::time::Duration;

fn pool(strategy: RoutingStrategy, replicas: &[(&str, Tier, u32)]) -> ReplicaRegistry<String> {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: strategy,
        failure_threshold: 1,
        recovery_threshold: 1,
        ..Config::default()
    });
    for (k, tier, weight) in replicas {
        assert!(r.add_weighted(*k, *tier, *weight, k.to_string()));
    }
    r
}

fn take(r: &ReplicaRegistry<String>) -> InflightGuard<String> {
    r.pick().expect("a replica")
}

fn inflight(r: &ReplicaRegistry<String>) -> Vec<(String, usize)> {
    r.replicas()
        .iter()
        .map(|x| (x.key().to_string(), x.inflight()))
        .collect()
}

#[test]
fn least_connections_picks_the_exact_minimum() {
    let keys = ["a", "b", "c", "d"];
    let r = pool(
        RoutingStrategy::LeastConnections,
        &keys.map(|k| (k, Tier::Primary, 1)),
    );
    // 12 held requests spread 3 / 3 / 3 / 3: each pick went to a least loaded replica.
    let mut held: Vec<_> = (0..12).map(|_| take(&r)).collect();
    assert!(
        inflight(&r).iter().all(|(_, n)| *n == 3),
        "{:?}",
        inflight(&r)
    );
    // Free two of c's: c (1 in flight) is the only minimum, whatever the rotation.
    for _ in 0..2 {
        let i = held.iter().position(|g| g.target() == "c").unwrap();
        held.swap_remove(i);
    }
    for _ in 0..5 {
        let g = take(&r);
        assert_eq!(g.target(), "c", "{:?}", inflight(&r));
    }
    // Free all of b's: b (0) wins, then b and c (1 each) fill up to the others' 3.
    held.retain(|g| g.target() != "b");
    held.push(take(&r));
    assert_eq!(held.last().unwrap().target(), "b", "{:?}", inflight(&r));
    held.extend((0..4).map(|_| take(&r)));
    assert!(
        inflight(&r).iter().all(|(_, n)| *n == 3),
        "{:?}",
        inflight(&r)
    );
}

#[test]
fn least_connections_ties_take_turns() {
    let r = pool(
        RoutingStrategy::LeastConnections,
        &["a", "b", "c"].map(|k| (k, Tier::Primary, 1)),
    );
    let mut seen = HashMap::new();
    for _ in 0..300 {
        // Each guard is dropped at once: every pick sees three idle replicas.
        *seen.entry(take(&r).target().clone()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| *n == 100), "{seen:?}");
}

#[test]
fn weighted_follows_the_smooth_sequence_and_exact_shares() {
    let r = pool(
        RoutingStrategy::Weighted,
        &[
            ("a", Tier::Primary, 5),
            ("b", Tier::Primary, 1),
            ("c", Tier::Primary, 1),
        ],
    );
    let seq: Vec<String> = (0..7).map(|_| take(&r).target().clone()).collect();
    assert_eq!(seq, ["a", "a", "b", "a", "c", "a", "a"]);
    let mut seen = HashMap::new();
    for _ in 0..700 {
        *seen.entry(take(&r).target().clone()).or_insert(0) += 1;
    }
    assert_eq!(
        (seen["a"], seen["b"], seen["c"]),
        (500, 100, 100),
        "{seen:?}"
    );
}

#[test]
fn weighted_shares_hold_under_concurrent_picks() {
    let r = pool(
        RoutingStrategy::Weighted,
        &[
            ("a", Tier::Primary, 1),
            ("b", Tier::Primary, 3),
            ("c", Tier::Primary, 6),
        ],
    );
    let threads = 4;
    let per_thread = 25_000;
    let counts: Vec<HashMap<String, usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let r = r.clone();
                s.spawn(move || {
                    let mut seen = HashMap::new();
                    for _ in 0..per_thread {
                        *seen.entry(take(&r).target().clone()).or_insert(0) += 1;
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = (threads * per_thread) as f64;
    for (key, weight) in [("a", 1.0), ("b", 3.0), ("c", 6.0)] {
        let got: usize = counts
            .iter()
            .map(|m| m.get(key).copied().unwrap_or(0))
            .sum();
        let share = got as f64 / total;
        assert!(
            (share - weight / 10.0).abs() < 0.01,
            "{key}: {share} of the picks for weight {weight}/10 ({counts:?})"
        );
    }
}

/// A probe that fails one key.
struct Down(&'static str);

impl Probe for Down {
    fn probe(&self, target: &str) -> ProbeFuture {
        let down = target == self.0;
        Box::pin(async move {
            if down {
                ProbeResult::unhealthy(Duration::from_millis(1), "503")
            } else {
                ProbeResult::healthy(Duration::from_millis(1), "200")
            }
        })
    }
}

#[tokio::test]
async fn both_keep_to_the_healthy_replicas_of_the_best_tier() {
    for strategy in [RoutingStrategy::LeastConnections, RoutingStrategy::Weighted] {
        let r = pool(
            strategy,
            &[
                ("p1", Tier::Primary, 1),
                ("p2", Tier::Primary, 4),
                ("s1", Tier::Secondary, 100),
            ],
        );
        HealthChecker::run_cycle(&r.probe_targets(), &Down("p2"), Duration::from_secs(1)).await;
        // p2 is down: every pick is p1, however loaded, never the secondary.
        let held: Vec<_> = (0..20).map(|_| take(&r)).collect();
        assert!(
            held.iter().all(|g| g.target() == "p1"),
            "{strategy:?}: {:?}",
            inflight(&r)
        );
    }
}

#[test]
fn weight_defaults_to_one_and_zero_counts_as_one() {
    let r = pool(RoutingStrategy::Weighted, &[("a", Tier::Primary, 0)]);
    assert!(r.add("b", Tier::Primary, "b".into()));
    let w: Vec<u32> = r.replicas().iter().map(|x| x.weight()).collect();
    assert_eq!(w, [1, 1]);
    let mut seen = HashMap::new();
    for _ in 0..10 {
        *seen.entry(take(&r).target().clone()).or_insert(0) += 1;
    }
    assert_eq!((seen["a"], seen["b"]), (5, 5));
}
