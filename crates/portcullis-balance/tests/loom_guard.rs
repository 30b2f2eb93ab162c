//! Loom models of the in-flight guards ([`InflightGuard`]) and of the registry's view refresh
//! under concurrent picks, outcomes, lease give-backs and removal.
//!
//! Run with (as `.ci/run` does):
//!
//! ```text
//! RUSTFLAGS="--cfg portcullis_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p portcullis-balance --test loom_guard
//! ```
//!
//! What is modelled: the real `ReplicaRegistry::pick`, `InflightGuard` and `Replica` code and
//! the `HealthState` under them, whose atomics (in-flight counts, `removed` flags, the status
//! word, the refresh counters) are loom's under `--cfg portcullis_loom` (`src/sync.rs`). Not
//! modelled: `arc_swap` (the published view and member list) and the admin `Mutex` of
//! `add`/`remove` are plain std types, so loom sees each load/store of them as one indivisible
//! step (only one thread here calls `remove`, since a std lock cannot be interleaved). The
//! routing strategy is `round-robin`: p2c draws from a per-OS-thread generator, which loom's
//! threads (all on one OS thread) would share, making the runs non-deterministic.
#![cfg(portcullis_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use portcullis_balance::{HealthPolicy, ReplicaRegistry, RoutingStrategy, Status, Tier};
use portcullis_health::ProbeTargets;
use std::time::Duration;

fn registry(eject_after: u32, keys: &[&'static str]) -> ReplicaRegistry<&'static str> {
    let policy = HealthPolicy {
        failure_threshold: 1,
        recovery_threshold: 1,
        eject_after,
        eject_for: Duration::ZERO,
        eject_max: Duration::ZERO,
    };
    let r = ReplicaRegistry::with_policy(
        RoutingStrategy::RoundRobin,
        policy,
        0.0,
        Duration::from_secs(1),
    );
    for k in keys {
        r.add(*k, Tier::Primary, *k);
    }
    r
}

/// Two requests pick, record and drop their guards while a third thread removes one of the
/// replicas: every in-flight count (the removed replica's too) returns to 0, so no slot was
/// released twice (it would wrap below 0) or not at all.
#[test]
fn inflight_counts_return_to_zero_through_a_removal() {
    loom::model(|| {
        let reg = registry(0, &["a", "b"]);
        let replicas = reg.replicas();
        let requests: Vec<_> = [true, false]
            .into_iter()
            .map(|success| {
                let reg = reg.clone();
                thread::spawn(move || {
                    if let Ok(mut g) = reg.pick() {
                        assert!(!g.replica().is_removed() || g.key().as_ref() == "a");
                        g.record(success);
                        g.record(!success); // ignored: the first outcome wins
                    }
                })
            })
            .collect();
        let remover = {
            let reg = reg.clone();
            thread::spawn(move || assert!(reg.remove("a")))
        };
        for r in requests {
            r.join().unwrap();
        }
        remover.join().unwrap();
        for r in &replicas {
            assert_eq!(r.inflight(), 0, "replica {}", r.key());
        }
        assert_eq!(reg.len(), 1);
    });
}

/// An ejected replica is leased to one of two concurrent requests; the lease holder drops its
/// guard without an outcome (a cancelled request). The lease is given back exactly once: the
/// replica ends ejected with no lease out, and every count is 0.
#[test]
fn a_dropped_lease_guard_gives_the_lease_back_once() {
    loom::model(|| {
        let reg = registry(1, &["a", "b"]);
        let a = reg.get("a").unwrap();
        // Eject "a" through a live failure (eject_after 1, cooldown 0: leasable at once).
        let mut g = loop {
            let g = reg.pick().unwrap();
            if g.key().as_ref() == "a" {
                break g;
            }
        };
        g.record(false);
        drop(g);
        assert_eq!(a.health().status(), Status::Ejected);
        let leases = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let requests: Vec<_> = (0..2)
            .map(|_| {
                let (reg, leases, probes) = (reg.clone(), leases.clone(), probes.clone());
                thread::spawn(move || {
                    let g = reg.pick().unwrap();
                    if g.is_probe() {
                        probes.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(leases.fetch_add(1, Ordering::SeqCst), 0, "two leases");
                        // Give up the count before the guard: the word says PROBING until then.
                        leases.fetch_sub(1, Ordering::SeqCst);
                    }
                    drop(g);
                })
            })
            .collect();
        for r in requests {
            r.join().unwrap();
        }
        assert!(
            probes.load(Ordering::SeqCst) >= 1,
            "the expired ejection was leased"
        );
        assert_eq!(a.health().status(), Status::Ejected, "lease given back");
        for r in reg.replicas() {
            assert_eq!(r.inflight(), 0, "replica {}", r.key());
        }
    });
}

/// Two replicas go down at the same moment and each change refreshes the view: no refresh is
/// lost, so afterwards the pool reports that it cannot serve (a stale view would still list a
/// healthy replica, and the admission layer's fast 503 would not fire).
#[test]
fn concurrent_health_changes_leave_no_stale_view() {
    loom::model(|| {
        let reg = registry(0, &["a", "b"]);
        let changes: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|key| {
                let reg = reg.clone();
                thread::spawn(move || {
                    let r = reg.get(key).unwrap();
                    let t = r.health().record_probe(false, Duration::from_millis(1));
                    reg.probe_targets().health_changed(key, t.unwrap());
                })
            })
            .collect();
        for c in changes {
            c.join().unwrap();
        }
        assert!(!reg.can_serve(), "a lost refresh left a stale view");
        assert!(reg.pick().is_err());
    });
}
