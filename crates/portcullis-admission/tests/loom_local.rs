//! Loom models of [`LocalCapacity`]'s hand-off of a released slot to a queued waiter, its
//! cancellation and its resizing.
//!
//! Run with (as `.ci/run` does):
//!
//! ```text
//! RUSTFLAGS="--cfg portcullis_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p portcullis-admission --test loom_local
//! ```
//!
//! What is modelled, honestly:
//! * **Modelled**: `LocalCapacity`'s own protocol, the real code — the `queued` counter, the
//!   shrink `debt` and its settling, `capacity`, the release path that retires or returns a
//!   permit — whose atomics are loom's under `--cfg portcullis_loom` (`src/sync.rs`), and the
//!   waker hand-off: waiters run in `loom::future::block_on`, so a lost wake-up leaves a loom
//!   thread parked for ever and loom reports the deadlock.
//! * **Not modelled**: the inside of `tokio::sync::Semaphore` (its permit counter, waiter list
//!   and lock are plain std atomics, invisible to loom). Loom treats each semaphore call as one
//!   indivisible step, i.e. it assumes tokio's semaphore is linearizable and FIFO, which is
//!   what tokio's own loom suite checks. A bug *inside* tokio's semaphore is out of reach here.
#![cfg(portcullis_loom)]

use loom::future::block_on;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use portcullis_admission::{CapacitySource, LocalCapacity};

/// Counts the slots held at once and fails on more than `max`.
struct Held {
    now: AtomicUsize,
    max: usize,
}

impl Held {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            now: AtomicUsize::new(0),
            max,
        })
    }

    fn enter(&self) {
        let before = self.now.fetch_add(1, Ordering::SeqCst);
        assert!(
            before < self.max,
            "{} slots held, capacity {}",
            before + 1,
            self.max
        );
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn assert_all_free(slots: &LocalCapacity, capacity: usize) {
    assert_eq!(slots.capacity(), capacity);
    assert_eq!((slots.active(), slots.queue_depth()), (0, 0));
    assert_eq!(slots.available(), capacity);
    let all: Vec<_> = (0..capacity).map(|_| slots.try_acquire()).collect();
    assert!(all.iter().all(Option::is_some), "a slot was lost");
    assert!(slots.try_acquire().is_none(), "a slot was created");
}

/// A slot released while a waiter queues reaches the waiter: no lost wake-up (the waiter
/// would stay parked and loom would report a deadlock), and the slot is back afterwards.
#[test]
fn released_slot_reaches_the_queued_waiter() {
    loom::model(|| {
        let slots = LocalCapacity::new(1);
        let held = slots.try_acquire().unwrap();
        let waiter = {
            let slots = slots.clone();
            thread::spawn(move || drop(block_on(slots.acquire(None)).unwrap()))
        };
        let releaser = thread::spawn(move || drop(held));
        waiter.join().unwrap();
        releaser.join().unwrap();
        assert_all_free(&slots, 1);
    });
}

/// Two waiters and a releaser on one slot: never two holders at once, both waiters are
/// served, nothing leaks.
#[test]
fn one_slot_is_never_granted_twice() {
    loom::model(|| {
        let slots = LocalCapacity::new(1);
        let held = Held::new(1);
        let first = slots.try_acquire().unwrap();
        held.enter();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (slots, held) = (slots.clone(), held.clone());
                thread::spawn(move || {
                    let p = block_on(slots.acquire(None)).unwrap();
                    held.enter();
                    held.leave();
                    drop(p);
                })
            })
            .collect();
        let releaser = {
            let held = held.clone();
            thread::spawn(move || {
                held.leave();
                drop(first);
            })
        };
        for w in waiters {
            w.join().unwrap();
        }
        releaser.join().unwrap();
        assert_all_free(&slots, 1);
    });
}

/// A waiter dropped (cancelled) while the slot is being released to it: the slot is not lost
/// with the dropped waiter, and a second waiter still gets it.
#[test]
fn cancelled_waiter_passes_the_slot_on() {
    loom::model(|| {
        let slots = LocalCapacity::new(1);
        let held = slots.try_acquire().unwrap();
        let cancelled = slots.acquire(None); // queued first, at once
        let next = {
            let slots = slots.clone();
            thread::spawn(move || drop(block_on(slots.acquire(None)).unwrap()))
        };
        let canceller = thread::spawn(move || drop(cancelled));
        let releaser = thread::spawn(move || drop(held));
        canceller.join().unwrap();
        releaser.join().unwrap();
        next.join().unwrap();
        assert_all_free(&slots, 1);
    });
}

/// A shrink racing releases and an acquire: the holders never exceed the larger of the two
/// capacities, the debt is paid exactly, and after everything is released the free slots are
/// the new capacity.
#[test]
fn shrink_racing_releases_conserves_slots() {
    loom::model(|| {
        let slots = LocalCapacity::new(2);
        let a = slots.try_acquire().unwrap();
        let b = slots.try_acquire().unwrap();
        let held = Held::new(2);
        held.enter();
        held.enter();
        let shrinker = {
            let slots = slots.clone();
            thread::spawn(move || slots.set_capacity(1))
        };
        let releaser = {
            let held = held.clone();
            thread::spawn(move || {
                held.leave();
                drop(a);
            })
        };
        let taker = {
            let (slots, held) = (slots.clone(), held.clone());
            thread::spawn(move || {
                if let Some(p) = slots.try_acquire() {
                    held.enter();
                    held.leave();
                    drop(p);
                }
            })
        };
        shrinker.join().unwrap();
        releaser.join().unwrap();
        taker.join().unwrap();
        held.leave();
        drop(b);
        assert_all_free(&slots, 1);
    });
}

/// A grow racing a shrink and a release (two resizes at once, as a reload racing the
/// capacity search would do): the result is the capacity of whichever resize came last.
#[test]
fn racing_resizes_settle_on_the_last_capacity() {
    loom::model(|| {
        let slots = LocalCapacity::new(2);
        let a = slots.try_acquire().unwrap();
        let shrink = {
            let slots = slots.clone();
            thread::spawn(move || slots.set_capacity(1))
        };
        let grow = {
            let slots = slots.clone();
            thread::spawn(move || slots.set_capacity(3))
        };
        let release = thread::spawn(move || drop(a));
        shrink.join().unwrap();
        grow.join().unwrap();
        release.join().unwrap();
        let last = slots.capacity();
        assert!(last == 1 || last == 3, "capacity {last}");
        assert_all_free(&slots, last);
    });
}
