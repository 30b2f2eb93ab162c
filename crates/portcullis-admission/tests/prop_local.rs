//! Property: [`LocalCapacity`] under random acquire / cancel (drop the pending future) /
//! release sequences conserves its slots and grants waiters in FIFO order.
//!
//! After every step the waiters are polled (oldest first, with a no-op waker) and:
//! * the slots held never exceed the capacity, and `active()` is the number held;
//! * no slot stays free while a waiter is queued (the hand-off is immediate);
//! * a waiter is granted only if every older waiter still queued was granted too (FIFO);
//! * `queue_depth()` is the number of waiters still pending.
//!
//! After everything is released (and the pending waiters dropped) every slot is free.

use futures_util::task::noop_waker_ref;
use portcullis_admission::{CapacitySource, LocalCapacity, LocalPermit};
use proptest::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    /// Drop the pending waiter at this index (modulo the number pending).
    Cancel(prop::sample::Index),
    /// Drop the held permit at this index (modulo the number held).
    Release(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Acquire),
        1 => any::<prop::sample::Index>().prop_map(Op::Cancel),
        2 => any::<prop::sample::Index>().prop_map(Op::Release),
    ]
}

struct Waiter {
    id: usize,
    fut: portcullis_admission::LocalAcquire,
}

fn poll_waiters(pending: &mut Vec<Waiter>, held: &mut Vec<(usize, LocalPermit)>) -> Vec<usize> {
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut granted = Vec::new();
    let mut still = Vec::new();
    for mut w in pending.drain(..) {
        match Pin::new(&mut w.fut).poll(&mut cx) {
            Poll::Ready(Ok(p)) => {
                granted.push(w.id);
                held.push((w.id, p));
            }
            Poll::Ready(Err(e)) => panic!("waiter {} failed: {e}", w.id),
            Poll::Pending => still.push(w),
        }
    }
    // FIFO: every granted waiter is older than every waiter left pending.
    if let (Some(&last_granted), Some(first_pending)) = (granted.last(), still.first()) {
        assert!(
            last_granted < first_pending.id,
            "waiter {last_granted} granted before older waiter {}",
            first_pending.id
        );
    }
    *pending = still;
    granted
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fifo_and_slot_conservation(capacity in 1usize..4, ops in prop::collection::vec(op(), 1..60)) {
        let slots = LocalCapacity::new(capacity);
        let mut pending: Vec<Waiter> = Vec::new();
        let mut held: Vec<(usize, LocalPermit)> = Vec::new();
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Acquire => {
                    let fut = slots.acquire(None);
                    pending.push(Waiter { id: next_id, fut });
                    next_id += 1;
                }
                Op::Cancel(i) if !pending.is_empty() => {
                    drop(pending.remove(i.index(pending.len())));
                }
                Op::Release(i) if !held.is_empty() => {
                    drop(held.remove(i.index(held.len())));
                }
                Op::Cancel(_) | Op::Release(_) => {}
            }
            poll_waiters(&mut pending, &mut held);
            prop_assert!(held.len() <= capacity, "{} held > capacity {capacity}", held.len());
            prop_assert_eq!(slots.active(), held.len());
            prop_assert_eq!(slots.queue_depth(), pending.len());
            if !pending.is_empty() {
                prop_assert_eq!(held.len(), capacity, "a slot is free while a waiter queues");
            }
        }
        drop(pending);
        drop(held);
        prop_assert_eq!((slots.active(), slots.queue_depth()), (0, 0));
        prop_assert_eq!(slots.available(), capacity);
        let all: Vec<_> = (0..capacity).filter_map(|_| slots.try_acquire()).collect();
        prop_assert_eq!(all.len(), capacity);
        prop_assert!(slots.try_acquire().is_none());
    }
}
