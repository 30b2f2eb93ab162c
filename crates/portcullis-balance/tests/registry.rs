//! Registry and selection behaviour: tiers, every policy's choice, P2C spread, panic mode,
//! ejection with a single recovery lease, runtime add/remove, create-once `ensure`,
//! snapshot. Health is driven through the real probe path (`HealthChecker::run_cycle`) with
//! an injected probe.

use portcullis_balance::{
    Config, NoHealthyReplica, ReplicaRegistry, RoutingStrategy, Status, Tier,
};
use portcullis_core::HealthSource;
use portcullis_health::{HealthChecker, Probe, ProbeFuture, ProbeResult};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

/// A probe whose answer per key is set by the test.
#[derive(Default)]
struct FlagProbe(Mutex<HashSet<String>>);

impl FlagProbe {
    fn down(&self, key: &str) {
        self.0.lock().unwrap().insert(key.into());
    }
    fn up(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

impl Probe for FlagProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        let down = self.0.lock().unwrap().contains(target);
        Box::pin(async move {
            if down {
                ProbeResult::unhealthy(Duration::from_millis(1), "503")
            } else {
                ProbeResult::healthy(Duration::from_millis(1), "200")
            }
        })
    }
}

fn registry(strategy: RoutingStrategy, replicas: &[(&str, bool)]) -> ReplicaRegistry<String> {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: strategy,
        failure_threshold: 1,
        recovery_threshold: 1,
        ..Config::default()
    });
    for (k, primary) in replicas {
        assert!(r.add(*k, Tier::from_primary(*primary), k.to_string()));
    }
    r
}

async fn cycle(r: &ReplicaRegistry<String>, probe: &FlagProbe) {
    HealthChecker::run_cycle(&r.probe_targets(), probe, Duration::from_secs(1)).await;
}

fn pick(r: &ReplicaRegistry<String>) -> String {
    r.pick().expect("a replica").target().clone()
}

#[tokio::test]
async fn first_healthy_prefers_primaries_in_insertion_order() {
    let r = registry(
        RoutingStrategy::FirstHealthy,
        &[("s1", false), ("p1", true), ("s2", false), ("p2", true)],
    );
    let probe = FlagProbe::default();
    assert_eq!(pick(&r), "p1");
    probe.down("p1");
    cycle(&r, &probe).await;
    assert_eq!(pick(&r), "p2");
    probe.down("p2");
    cycle(&r, &probe).await;
    assert_eq!(
        pick(&r),
        "s1",
        "no healthy primary: first healthy secondary"
    );
    probe.down("s1");
    cycle(&r, &probe).await;
    assert_eq!(pick(&r), "s2");
    probe.down("s2");
    cycle(&r, &probe).await;
    assert_eq!(r.pick().unwrap_err(), NoHealthyReplica);
    assert!(!r.can_serve());
    probe.up("p2");
    cycle(&r, &probe).await;
    assert_eq!(pick(&r), "p2");
    assert!(HealthSource::can_serve(&r));
}

#[tokio::test]
async fn round_robin_cycles_over_the_best_tier() {
    let r = registry(
        RoutingStrategy::RoundRobin,
        &[("p1", true), ("p2", true), ("p3", true), ("s1", false)],
    );
    let picks: Vec<String> = (0..6).map(|_| pick(&r)).collect();
    assert_eq!(picks, ["p1", "p2", "p3", "p1", "p2", "p3"]);
    let probe = FlagProbe::default();
    probe.down("p2");
    cycle(&r, &probe).await;
    let picks: HashSet<String> = (0..10).map(|_| pick(&r)).collect();
    assert_eq!(picks, HashSet::from(["p1".to_string(), "p3".to_string()]));
    for p in ["p1", "p3"] {
        probe.down(p);
    }
    cycle(&r, &probe).await;
    assert!((0..5).all(|_| pick(&r) == "s1"));
}

#[tokio::test]
async fn p2c_picks_the_less_loaded_of_the_best_tier() {
    let r = registry(
        RoutingStrategy::P2c,
        &[("a", true), ("b", true), ("s", false)],
    );
    let held: Vec<_> = (0..3).map(|_| r.pick().unwrap()).collect();
    let busy = r.snapshot();
    let loaded: Vec<&str> = busy
        .replicas
        .iter()
        .filter(|x| x.inflight > 0)
        .map(|x| x.url.as_str())
        .collect();
    assert!(
        !loaded.contains(&"s"),
        "the secondary tier is not used while primaries are healthy"
    );
    drop(held);
    // One request in flight on `a`: every pick goes to `b` (two choices out of two).
    let mut a_guards = Vec::new();
    while a_guards.is_empty() {
        let g = r.pick().unwrap();
        if g.target() == "a" {
            a_guards.push(g);
        }
    }
    for _ in 0..50 {
        assert_eq!(pick(&r), "b");
    }
}

#[test]
fn p2c_spreads_10k_requests_over_4_replicas() {
    let r = registry(
        RoutingStrategy::P2c,
        &[("a", true), ("b", true), ("c", true), ("d", true)],
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut window = VecDeque::new();
    for i in 0..10_000 {
        let g = r.pick().unwrap();
        *counts.entry(g.target().clone()).or_default() += 1;
        window.push_back(g);
        // Requests complete out of order, 1..16 in flight.
        if window.len() > 1 + i % 16 {
            window.pop_front();
        }
    }
    assert_eq!(counts.len(), 4);
    for (k, c) in &counts {
        assert!(*c <= 3_500, "{k} got {c} of 10000 ({counts:?})");
    }
}

#[tokio::test]
async fn panic_mode_routes_to_all_when_too_few_are_healthy() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        failure_threshold: 1,
        panic_threshold: 50.0,
        ..Config::default()
    });
    for k in ["a", "b", "c", "d"] {
        r.add(k, Tier::Primary, k.to_string());
    }
    let probe = FlagProbe::default();
    probe.down("a");
    probe.down("b");
    cycle(&r, &probe).await;
    // 2 of 4 healthy = 50 %: not below the threshold.
    assert!(!r.snapshot().panic);
    let picks: HashSet<String> = (0..8).map(|_| pick(&r)).collect();
    assert_eq!(picks.len(), 2);
    probe.down("c");
    cycle(&r, &probe).await;
    // 25 % < 50 %: panic, every replica gets traffic.
    assert!(r.snapshot().panic);
    let picks: HashSet<String> = (0..8).map(|_| pick(&r)).collect();
    assert_eq!(picks.len(), 4);
    // Without panic mode nothing would route at 0 %; with it, everything still does.
    probe.down("d");
    cycle(&r, &probe).await;
    assert_eq!((0..8).map(|_| pick(&r)).collect::<HashSet<_>>().len(), 4);
}

#[test]
fn ejection_then_exactly_one_recovery_probe_among_64_callers() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::FirstHealthy,
        eject_after: 3,
        eject_for: Duration::from_millis(50),
        eject_max: Duration::from_secs(1),
        ..Config::default()
    });
    r.add("a", Tier::Primary, "a".to_string());
    r.add("b", Tier::Secondary, "b".to_string());
    for _ in 0..3 {
        let mut g = r.pick().unwrap();
        assert_eq!(g.target(), "a");
        g.record(false);
    }
    assert_eq!(r.get("a").unwrap().health().status(), Status::Ejected);
    assert_eq!(pick(&r), "b", "ejected: traffic moves to the secondary");
    assert!(r.snapshot().replicas[0].ejected);
    std::thread::sleep(Duration::from_millis(80));

    let barrier = Arc::new(Barrier::new(64));
    let results: Vec<(String, bool)> = (0..64)
        .map(|_| {
            let r = r.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                let g = r.pick().unwrap();
                let out = (g.target().clone(), g.is_probe());
                // Hold the slot a moment so all 64 overlap.
                std::thread::sleep(Duration::from_millis(300));
                drop(g);
                out
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let probes: Vec<_> = results.iter().filter(|(_, p)| *p).collect();
    assert_eq!(probes.len(), 1, "exactly one recovery probe");
    assert_eq!(probes[0].0, "a");
    assert_eq!(results.iter().filter(|(k, _)| k == "a").count(), 1);
    // The probe's guard was dropped with no verdict: the lease is given back.
    let mut g = r.pick().unwrap();
    assert!(g.is_probe() && g.target() == "a");
    g.record(true);
    drop(g);
    assert_eq!(r.get("a").unwrap().health().status(), Status::Healthy);
    assert_eq!(pick(&r), "a");
}

#[test]
fn failed_probe_re_ejects_and_unrelated_requests_do_not_reinstate() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::FirstHealthy,
        eject_after: 1,
        eject_for: Duration::from_millis(30),
        eject_max: Duration::from_millis(200),
        ..Config::default()
    });
    r.add("a", Tier::Primary, "a".to_string());
    r.add("b", Tier::Primary, "b".to_string());
    r.pick().unwrap().record(false);
    std::thread::sleep(Duration::from_millis(40));
    let mut probe = r.pick().unwrap();
    assert!(probe.is_probe());
    probe.record(false);
    drop(probe);
    let c = &r.snapshot().replicas[0].counters;
    assert_eq!(c.status, Status::Ejected);
    assert_eq!(c.ejections, 2);
    assert!(c.ejected_for > Duration::from_millis(40), "2 × 30 ms");
    assert_eq!(pick(&r), "b");
}

#[test]
fn removing_a_replica_mid_flight_is_safe() {
    let r = registry(RoutingStrategy::RoundRobin, &[("a", true), ("b", true)]);
    let in_flight = r.pick().unwrap();
    assert_eq!(in_flight.target(), "a");
    let a = r.get("a").unwrap();
    assert!(r.remove("a"));
    assert!(!r.remove("a"), "already gone");
    assert_eq!(r.len(), 1);
    for _ in 0..20 {
        assert_eq!(pick(&r), "b");
    }
    assert_eq!(a.inflight(), 1);
    let mut in_flight = in_flight;
    in_flight.record(false); // no-op: the replica is gone
    drop(in_flight);
    assert_eq!(a.inflight(), 0);
    assert_eq!(
        a.health()
            .counters(tokio::time::Instant::now())
            .consecutive_response_failures,
        0
    );
    assert!(r.snapshot().replicas.iter().all(|x| x.url != "a"));
    // Runtime add works, and a duplicate key is refused.
    assert!(r.add("c", Tier::Primary, "c".into()));
    assert!(!r.add("c", Tier::Primary, "c2".into()));
    let picks: HashSet<String> = (0..4).map(|_| pick(&r)).collect();
    assert_eq!(picks, HashSet::from(["b".to_string(), "c".to_string()]));
}

#[test]
fn ensure_seeds_once_and_never_re_adds_a_removed_replica() {
    let r: ReplicaRegistry<String> = ReplicaRegistry::new(&Config::default());
    let seed = || {
        ["a", "b"]
            .into_iter()
            .map(|k| (k, Tier::Primary, k.to_string()))
    };
    assert!(r.ensure(seed()));
    assert_eq!(r.len(), 2);
    r.remove("a");
    assert!(!r.ensure(seed()), "already seeded: no-op");
    assert_eq!(r.len(), 1);
    assert!(r.get("a").is_none());
    let r2: ReplicaRegistry<String> = ReplicaRegistry::new(&Config::default());
    r2.add("x", Tier::Primary, "x".into());
    assert!(!r2.ensure(seed()), "a pool created by add is seeded too");
}

#[test]
fn snapshot_is_serializable_and_complete() {
    let r = registry(
        RoutingStrategy::P2c,
        &[("http://a:1", true), ("http://b:2", false)],
    );
    let _g = r.pick().unwrap();
    let snap = r.snapshot();
    assert_eq!((snap.total, snap.healthy), (2, 2));
    let v = serde_json::to_value(&snap).unwrap();
    assert_eq!(v["strategy"], "p2c");
    let a = &v["replicas"][0];
    assert_eq!(a["url"], "http://a:1");
    assert_eq!(a["tier"], "primary");
    assert_eq!(a["primary"], true);
    assert_eq!(a["healthy"], true);
    assert_eq!(a["ejected"], false);
    assert_eq!(a["inflight"], 1);
    assert_eq!(a["status"], "healthy");
    for field in [
        "consecutive_probe_failures",
        "consecutive_probe_successes",
        "consecutive_response_failures",
        "ejections",
        "ejected_for",
        "last_probe_latency",
    ] {
        assert!(a.get(field).is_some(), "missing {field}: {a}");
    }
    assert_eq!(v["replicas"][1]["tier"], "secondary");
}

#[tokio::test]
async fn good_health_checks_end_a_passive_ejection_only_when_asked_to() {
    for uneject in [false, true] {
        let r = ReplicaRegistry::new(&Config {
            routing_strategy: RoutingStrategy::FirstHealthy,
            eject_after: 1,
            eject_for: Duration::from_secs(30),
            recovery_threshold: 2,
            uneject_on_active_check: uneject,
            ..Config::default()
        });
        r.add("a", Tier::Primary, "a".to_string());
        r.add("b", Tier::Primary, "b".to_string());
        // `a` answers its health check but failed a live request.
        r.pick().unwrap().record(false);
        assert_eq!(pick(&r), "b");
        let probe = FlagProbe::default();
        for _ in 0..5 {
            cycle(&r, &probe).await;
        }
        let a = &r.snapshot().replicas[0];
        if uneject {
            assert_eq!(a.counters.status, Status::Healthy);
            assert_eq!(pick(&r), "a", "back by its health checks");
        } else {
            assert_eq!(a.counters.status, Status::Ejected, "out for its cooldown");
            assert!(a.counters.ejected_for > Duration::from_secs(29));
            assert!((0..10).all(|_| pick(&r) == "b"));
        }
    }
}

#[tokio::test]
async fn an_ejected_secondary_is_not_probed_while_a_primary_is_healthy() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::FirstHealthy,
        failure_threshold: 1,
        recovery_threshold: 1,
        eject_after: 1,
        eject_for: Duration::from_millis(20),
        eject_max: Duration::from_millis(20),
        ..Config::default()
    });
    r.add("p", Tier::Primary, "p".to_string());
    r.add("s", Tier::Secondary, "s".to_string());
    let probe = FlagProbe::default();
    // The primary is down: the secondary serves, fails, and is ejected.
    probe.down("p");
    cycle(&r, &probe).await;
    let mut g = r.pick().unwrap();
    assert_eq!(g.target(), "s");
    g.record(false);
    drop(g);
    assert_eq!(r.get("s").unwrap().health().status(), Status::Ejected);
    // The primary is back, and the secondary's cooldown ends.
    probe.up("p");
    cycle(&r, &probe).await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    for _ in 0..20 {
        let g = r.pick().unwrap();
        assert_eq!((g.target().as_str(), g.is_probe()), ("p", false));
    }
    assert_eq!(r.get("s").unwrap().health().status(), Status::Ejected);
    assert!(r.can_serve());
    // Once no primary is healthy, the secondary's tier is selected: it gets its lease.
    probe.down("p");
    cycle(&r, &probe).await;
    let mut g = r.pick().unwrap();
    assert_eq!((g.target().as_str(), g.is_probe()), ("s", true));
    g.record(true);
    drop(g);
    assert_eq!(pick(&r), "s");
}

#[tokio::test]
async fn a_replica_added_at_run_time_waits_for_its_first_good_check() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        failure_threshold: 2,
        recovery_threshold: 3,
        ..Config::default()
    });
    r.add("a", Tier::Primary, "a".to_string());
    assert!(r.add_awaiting_check("b", Tier::Primary, "b".to_string()));
    assert!(
        !r.add_awaiting_check("b", Tier::Primary, "b2".to_string()),
        "a duplicate"
    );
    let snap = r.snapshot();
    let b = &snap.replicas[1];
    assert_eq!(b.counters.status, Status::Unknown);
    assert!(!b.healthy && !b.ejected);
    assert_eq!((snap.healthy, snap.total), (1, 2));
    let v = serde_json::to_value(&snap).unwrap();
    assert_eq!(v["replicas"][1]["status"], "unknown");
    assert!(
        (0..10).all(|_| pick(&r) == "a"),
        "no traffic before a check"
    );
    // A failed check (of failure_threshold 2) leaves it unknown, still without traffic.
    let probe = FlagProbe::default();
    probe.down("b");
    cycle(&r, &probe).await;
    assert_eq!(r.get("b").unwrap().health().status(), Status::Unknown);
    assert!((0..10).all(|_| pick(&r) == "a"));
    // Its first good check (not recovery_threshold of them) lets it in.
    probe.up("b");
    cycle(&r, &probe).await;
    assert_eq!(r.get("b").unwrap().health().status(), Status::Healthy);
    let picks: HashSet<String> = (0..4).map(|_| pick(&r)).collect();
    assert_eq!(picks, HashSet::from(["a".to_string(), "b".to_string()]));
}

#[tokio::test]
async fn an_unchecked_replica_that_fails_its_checks_is_unhealthy() {
    let r = registry(RoutingStrategy::RoundRobin, &[("a", true)]);
    r.add_awaiting_check("b", Tier::Primary, "b".to_string());
    let probe = FlagProbe::default();
    probe.down("b");
    cycle(&r, &probe).await;
    assert_eq!(r.get("b").unwrap().health().status(), Status::Unhealthy);
    assert!((0..10).all(|_| pick(&r) == "a"));
}

#[test]
fn panic_mode_routes_to_unchecked_replicas_too() {
    let r = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        panic_threshold: 50.0,
        ..Config::default()
    });
    r.add("a", Tier::Primary, "a".to_string());
    r.add_awaiting_check("b", Tier::Primary, "b".to_string());
    r.add_awaiting_check("c", Tier::Primary, "c".to_string());
    // 1 of 3 healthy is below 50 %: every replica gets traffic, checked or not.
    assert!(r.snapshot().panic);
    let picks: HashSet<String> = (0..6).map(|_| pick(&r)).collect();
    assert_eq!(picks.len(), 3);
}

/// A retry's pick: never a tried replica, under every policy, and none when all were tried;
/// it does not move the round-robin rotation of first attempts.
#[test]
fn pick_excluding_skips_the_tried_replicas_under_every_policy() {
    for strategy in [
        RoutingStrategy::P2c,
        RoutingStrategy::RoundRobin,
        RoutingStrategy::FirstHealthy,
        RoutingStrategy::LeastConnections,
        RoutingStrategy::Weighted,
    ] {
        let registry = ReplicaRegistry::new(&Config {
            routing_strategy: strategy,
            ..Config::default()
        });
        for key in ["a", "b", "c"] {
            registry.add(key, Tier::Primary, key);
        }
        let all = registry.replicas();
        for _ in 0..50 {
            let tried = vec![Arc::clone(&all[0]), Arc::clone(&all[2])];
            let g = registry.pick_excluding(&tried).unwrap();
            assert_eq!(**g.key(), *"b", "{strategy:?}");
            let tried = vec![Arc::clone(&all[1])];
            let g = registry.pick_excluding(&tried).unwrap();
            assert_ne!(**g.key(), *"b", "{strategy:?}");
        }
        assert_eq!(
            registry.pick_excluding(&all).unwrap_err(),
            NoHealthyReplica,
            "{strategy:?}"
        );
    }
    let registry = ReplicaRegistry::new(&Config {
        routing_strategy: RoutingStrategy::RoundRobin,
        ..Config::default()
    });
    for key in ["a", "b"] {
        registry.add(key, Tier::Primary, key);
    }
    let first: Vec<String> = (0..4)
        .map(|_| {
            let g = registry.pick().unwrap();
            let key = g.key().to_string();
            let _retry = registry.pick_excluding(&[Arc::clone(g.replica())]).unwrap();
            key
        })
        .collect();
    assert_eq!(first, ["a", "b", "a", "b"]);
}
