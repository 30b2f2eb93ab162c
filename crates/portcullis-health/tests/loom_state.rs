//! Loom models of [`HealthState`]'s status word and its compare-and-swap recovery lease.
//!
//! Run with (as `.ci/run` does):
//!
//! ```text
//! RUSTFLAGS="--cfg portcullis_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p portcullis-health --test loom_state
//! ```
//!
//! What is modelled: the real `HealthState` code, whose atomics are loom's under `--cfg
//! portcullis_loom` (`src/sync.rs`); loom runs every interleaving of the threads below (up to
//! the preemption bound) and the stale reads its memory model allows. The clock is not modelled: the
//! cooldown is 0, so an ejected replica may be leased at once, and `Instant::now()` is the real
//! clock (it only has to be monotonic).
#![cfg(portcullis_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use portcullis_health::{HealthPolicy, HealthState, Status};
use std::time::Duration;
use tokio::time::Instant;

fn ejected(failure_threshold: u32) -> Arc<HealthState> {
    let policy = std::sync::Arc::new(HealthPolicy {
        failure_threshold,
        recovery_threshold: 1,
        eject_after: 1,
        eject_for: Duration::ZERO,
        eject_max: Duration::ZERO,
    });
    let s = HealthState::new(policy);
    s.record_response(false, false, Instant::now());
    assert_eq!(s.status(), Status::Ejected);
    Arc::new(s)
}

/// Of three concurrent takers exactly one gets the lease, and the word says `Probing`.
#[test]
fn exactly_one_lease_among_concurrent_takers() {
    loom::model(|| {
        let s = ejected(3);
        let wins = Arc::new(AtomicUsize::new(0));
        let takers: Vec<_> = (0..3)
            .map(|_| {
                let (s, wins) = (s.clone(), wins.clone());
                thread::spawn(move || {
                    if s.try_lease(Instant::now()) {
                        wins.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in takers {
            t.join().unwrap();
        }
        assert_eq!(wins.load(Ordering::Relaxed), 1);
        assert_eq!(s.status(), Status::Probing);
    });
}

/// Two requests that each take a lease, hold it, and end it (a failed probe that re-ejects,
/// or a cancelled one that gives the lease back): the lease is never held twice at once, and
/// afterwards the replica is ejected again with no lease out.
#[test]
fn a_lease_is_never_held_twice_through_re_ejection_and_abandon() {
    loom::model(|| {
        let s = ejected(3);
        let holders = Arc::new(AtomicUsize::new(0));
        let requests: Vec<_> = [false, true]
            .into_iter()
            .map(|abandon| {
                let (s, holders) = (s.clone(), holders.clone());
                thread::spawn(move || {
                    if !s.try_lease(Instant::now()) {
                        return;
                    }
                    assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two leases");
                    // Give up the count first: the word still says PROBING until the end below.
                    holders.fetch_sub(1, Ordering::SeqCst);
                    if abandon {
                        s.abandon_lease();
                    } else {
                        let t = s.record_response(false, true, Instant::now());
                        assert_eq!(t.map(|t| t.to), Some(Status::Ejected));
                    }
                })
            })
            .collect();
        for r in requests {
            r.join().unwrap();
        }
        assert_eq!(s.status(), Status::Ejected);
    });
}

/// Active checks mark the replica down while its lease is out: neither the lease's lucky
/// success nor a cancelled lease may bring it back from `Unhealthy`.
#[test]
fn active_failure_wins_over_a_racing_lease() {
    for lease_succeeds in [true, false] {
        loom::model(move || {
            let s = ejected(1);
            assert!(s.try_lease(Instant::now()));
            let lease = {
                let s = s.clone();
                thread::spawn(move || {
                    if lease_succeeds {
                        s.record_response(true, true, Instant::now());
                    } else {
                        s.abandon_lease();
                    }
                })
            };
            let checker = {
                let s = s.clone();
                thread::spawn(move || {
                    s.record_probe(false, Duration::from_millis(1));
                })
            };
            lease.join().unwrap();
            checker.join().unwrap();
            // The probe's failure came last in some orders and first in others; the status
            // ends unhealthy either way, since the lease only acts on a PROBING word.
            assert_eq!(s.status(), Status::Unhealthy);
            assert!(
                !s.try_lease(Instant::now()),
                "unhealthy replicas are never leased"
            );
        });
    }
}

/// Live failures racing on a healthy replica eject it exactly once (one `Healthy → Ejected`
/// transition), with the first cooldown multiplier.
#[test]
fn concurrent_failures_eject_once() {
    loom::model(|| {
        let policy = std::sync::Arc::new(HealthPolicy {
            eject_after: 2,
            eject_for: Duration::from_secs(3600),
            eject_max: Duration::from_secs(3600),
            ..HealthPolicy::default()
        });
        let s = Arc::new(HealthState::new(policy));
        let ejections = Arc::new(AtomicUsize::new(0));
        let failures: Vec<_> = (0..3)
            .map(|_| {
                let (s, ejections) = (s.clone(), ejections.clone());
                thread::spawn(move || {
                    if s.record_response(false, false, Instant::now()).is_some() {
                        ejections.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for f in failures {
            f.join().unwrap();
        }
        assert_eq!(ejections.load(Ordering::Relaxed), 1);
        let c = s.counters(Instant::now());
        assert_eq!((c.status, c.ejections), (Status::Ejected, 1));
    });
}

/// With `uneject_on_active_check` off (the default), a good health check racing the lease
/// never reinstates the replica: it stays ejected (re-ejected by the failed lease, with the
/// next ejection count) whichever runs first.
#[test]
fn a_good_check_does_not_undo_an_ejection_racing_its_lease() {
    loom::model(|| {
        let s = ejected(3);
        let lease = {
            let s = s.clone();
            thread::spawn(move || {
                assert!(s.try_lease(Instant::now()));
                s.record_response(false, true, Instant::now());
            })
        };
        let checker = {
            let s = s.clone();
            thread::spawn(move || {
                assert_eq!(s.record_probe(true, Duration::from_millis(1)), None);
            })
        };
        lease.join().unwrap();
        checker.join().unwrap();
        let c = s.counters(Instant::now());
        assert_eq!((c.status, c.ejections), (Status::Ejected, 2));
    });
}

/// A replica added unchecked: its first good check races a live failure (panic mode sends it
/// traffic). The check always admits it from `Unknown`; the failure ejects it only if it
/// came after (only a healthy replica is ejected); nothing ever leases an unknown replica.
#[test]
fn an_unknown_replica_is_admitted_by_its_first_good_check() {
    loom::model(|| {
        let policy = std::sync::Arc::new(HealthPolicy {
            failure_threshold: 3,
            recovery_threshold: 3,
            eject_after: 1,
            eject_for: Duration::ZERO,
            eject_max: Duration::ZERO,
        });
        let s = Arc::new(HealthState::new_unknown(policy));
        let checker = {
            let s = s.clone();
            thread::spawn(move || {
                let t = s.record_probe(true, Duration::from_millis(1));
                assert_eq!(
                    t.map(|t| (t.from, t.to)),
                    Some((Status::Unknown, Status::Healthy))
                );
            })
        };
        let traffic = {
            let s = s.clone();
            thread::spawn(move || {
                assert!(
                    !s.try_lease(Instant::now()),
                    "an unknown replica is never leased"
                );
                s.record_response(false, false, Instant::now()).is_some()
            })
        };
        checker.join().unwrap();
        let ejected = traffic.join().unwrap();
        let want = if ejected {
            Status::Ejected
        } else {
            Status::Healthy
        };
        assert_eq!(s.status(), want);
    });
}
