//! [`LocalCapacity`]: the in-process capacity source.
//!
//! # Algorithm
//!
//! Slots are the permits of a [`tokio::sync::Semaphore`], which is *fair*: its waiters form
//! an intrusive FIFO list, and a released permit is handed directly to the oldest waiter
//! (under the semaphore's waiter lock) instead of being put back into the shared counter.
//! Consequently the counter of free permits is non-zero only while nobody is queued, and a
//! newcomer can never overtake a queued waiter: admission is strictly first-in, first-out.
//!
//! * **Fast path** (a slot is free): [`Semaphore::try_acquire`] is one compare-and-swap on
//!   the permit counter: no lock, no allocation. The permit is then detached from the
//!   semaphore (`forget`) and owned by a [`LocalPermit`], which holds an `Arc` to the shared
//!   state (the same reference-count bump tower's `ConcurrencyLimit` pays for its
//!   `OwnedSemaphorePermit`).
//! * **Slow path** (no slot free): the waiter is counted in `queue_depth`, checked against
//!   `max_queue`, and enqueued *at once* (the acquire future is polled one time inside
//!   [`acquire`](CapacitySource::acquire) with a no-op waker), so the FIFO position is the
//!   order of the `acquire` calls, not of the first polls. This path allocates one boxed
//!   future; it only runs when the request is going to wait anyway.
//! * **Cancel safety**: dropping the acquire future drops tokio's `Acquire`, which unlinks
//!   the waiter, and returns the permit to the next waiter if it had already been assigned
//!   one but not yet observed it.
//! * **Release**: dropping a [`LocalPermit`] returns the permit (`add_permits(1)`, which
//!   wakes the next waiter), unless a capacity shrink is still owed (see below).
//! * **Resizing**: growing pays off any outstanding shrink debt, then adds permits (which go
//!   to the queued waiters first, in order). Shrinking forgets as many *free* permits as it
//!   can (`forget_permits`) and records the rest as debt; each release while debt is owed
//!   retires its permit instead of returning it. Queued waiters are never dropped and active
//!   requests are never revoked. The invariant `free + active - debt = capacity` holds after
//!   every individual atomic step.

use crate::source::{AcquireError, CapacitySource};
use crate::sync::{AtomicUsize, Ordering};
use futures_util::task::noop_waker_ref;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::Semaphore;

/// The in-process [`CapacitySource`]: a fair (FIFO) semaphore with a lock-free fast path and
/// runtime resizing. Cloning shares the same slots.
///
/// ```
/// use portcullis_admission::{CapacitySource, LocalCapacity};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let slots = LocalCapacity::new(1);
/// let first = slots.acquire(None).await.unwrap();
/// assert_eq!(slots.active(), 1);
///
/// let waiting = tokio::spawn(slots.acquire(None));
/// tokio::task::yield_now().await;
/// assert_eq!(slots.queue_depth(), 1);
///
/// drop(first); // hands the slot to the waiter
/// let second = waiting.await.unwrap().unwrap();
/// assert_eq!((slots.active(), slots.queue_depth()), (1, 0));
/// drop(second);
/// assert_eq!(slots.active(), 0);
/// # }
/// ```
#[derive(Clone)]
pub struct LocalCapacity {
    shared: Arc<Shared>,
}

struct Shared {
    sem: Semaphore,
    capacity: AtomicUsize,
    /// Permits still to retire on release after a shrink that found too few free permits.
    debt: AtomicUsize,
    /// Callers in the slow path (queued, not yet resolved).
    queued: AtomicUsize,
}

impl LocalCapacity {
    /// A source with `capacity` slots (clamped to [`Semaphore::MAX_PERMITS`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(Shared {
                sem: Semaphore::new(capacity),
                capacity: AtomicUsize::new(capacity),
                debt: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
            }),
        }
    }

    fn try_take(&self) -> Option<LocalPermit> {
        match self.shared.sem.try_acquire() {
            Ok(p) => {
                p.forget();
                Some(LocalPermit {
                    shared: Some(Arc::clone(&self.shared)),
                })
            }
            Err(_) => None,
        }
    }
}

impl fmt::Debug for LocalCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCapacity")
            .field("capacity", &self.capacity())
            .field("active", &self.active())
            .field("queue_depth", &self.queue_depth())
            .finish()
    }
}

impl Shared {
    fn release(&self) {
        let mut debt = self.debt.load(Ordering::Acquire);
        while debt > 0 {
            match self.debt.compare_exchange_weak(
                debt,
                debt - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return, // retired: the capacity shrank while this permit was out
                Err(d) => debt = d,
            }
        }
        self.sem.add_permits(1);
    }

    /// Pays debt from free permits (closes the window where a release raced a shrink).
    fn settle(&self) {
        loop {
            let debt = self.debt.load(Ordering::Acquire);
            if debt == 0 {
                return;
            }
            let forgotten = self.sem.forget_permits(debt);
            if forgotten == 0 {
                return;
            }
            // `forgotten <= debt` and only releases/grows decrease debt; subtract what we
            // forgot, giving back any excess if the debt was paid meanwhile.
            let mut cur = self.debt.load(Ordering::Acquire);
            loop {
                let pay = forgotten.min(cur);
                match self.debt.compare_exchange_weak(
                    cur,
                    cur - pay,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        if forgotten > pay {
                            self.sem.add_permits(forgotten - pay);
                        }
                        break;
                    }
                    Err(c) => cur = c,
                }
            }
        }
    }
}

impl CapacitySource for LocalCapacity {
    type Permit = LocalPermit;
    type Acquire = LocalAcquire;

    fn acquire(&self, max_queue: Option<usize>) -> LocalAcquire {
        // Fast path: one CAS.
        if let Some(p) = self.try_take() {
            return LocalAcquire::ready(Ok(p));
        }
        // Slow path: count, bound, enqueue now.
        let prev = self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = max_queue {
            if prev >= max {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                // A slot may have been freed since the fast path looked.
                return LocalAcquire::ready(self.try_take().ok_or(AcquireError::QueueFull));
            }
        }
        let shared = Arc::clone(&self.shared);
        let mut fut: Pin<Box<dyn Future<Output = Result<LocalPermit, AcquireError>> + Send>> =
            Box::pin(async move {
                let queued = QueuedGuard(&shared.queued);
                let granted = match shared.sem.acquire().await {
                    Ok(p) => {
                        p.forget();
                        Ok(())
                    }
                    // The semaphore is never closed.
                    Err(e) => Err(AcquireError::storage_unavailable(e)),
                };
                drop(queued);
                granted.map(|()| LocalPermit {
                    shared: Some(shared),
                })
            });
        // Take the FIFO position now; the real waker replaces the no-op one on the next poll.
        let mut cx = Context::from_waker(noop_waker_ref());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(res) => LocalAcquire::ready(res),
            Poll::Pending => LocalAcquire {
                state: State::Waiting(fut),
            },
        }
    }

    fn try_acquire(&self) -> Option<LocalPermit> {
        self.try_take()
    }

    fn set_capacity(&self, capacity: usize) {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        let old = self.shared.capacity.swap(capacity, Ordering::AcqRel);
        let s = &self.shared;
        if capacity > old {
            let mut grow = capacity - old;
            let mut debt = s.debt.load(Ordering::Acquire);
            while debt > 0 && grow > 0 {
                let pay = debt.min(grow);
                match s.debt.compare_exchange_weak(
                    debt,
                    debt - pay,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        grow -= pay;
                        break;
                    }
                    Err(d) => debt = d,
                }
            }
            if grow > 0 {
                s.sem.add_permits(grow);
            }
        } else if old > capacity {
            let shrink = old - capacity;
            let forgotten = s.sem.forget_permits(shrink);
            if shrink > forgotten {
                s.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
                s.settle();
            }
        }
    }

    fn capacity(&self) -> usize {
        self.shared.capacity.load(Ordering::Acquire)
    }

    fn active(&self) -> usize {
        let s = &self.shared;
        let total = s.capacity.load(Ordering::Acquire) + s.debt.load(Ordering::Acquire);
        total.saturating_sub(s.sem.available_permits())
    }

    fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A slot of a [`LocalCapacity`]; dropping it releases the slot (and wakes the next waiter).
pub struct LocalPermit {
    shared: Option<Arc<Shared>>,
}

impl LocalPermit {
    /// Releases the slot now. Idempotent: later calls, and the drop, do nothing.
    pub fn release(&mut self) {
        if let Some(s) = self.shared.take() {
            s.release();
        }
    }
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        self.release();
    }
}

impl fmt::Debug for LocalPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPermit")
            .field("held", &self.shared.is_some())
            .finish()
    }
}

/// The acquire future of [`LocalCapacity`]; cancel-safe (see the [module docs](self)).
pub struct LocalAcquire {
    state: State,
}

enum State {
    Ready(Option<Result<LocalPermit, AcquireError>>),
    Waiting(Pin<Box<dyn Future<Output = Result<LocalPermit, AcquireError>> + Send>>),
}

impl LocalAcquire {
    fn ready(res: Result<LocalPermit, AcquireError>) -> Self {
        Self {
            state: State::Ready(Some(res)),
        }
    }
}

impl Future for LocalAcquire {
    type Output = Result<LocalPermit, AcquireError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Ready(res) => {
                Poll::Ready(res.take().expect("LocalAcquire polled after completion"))
            }
            State::Waiting(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for LocalAcquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready(_) => "ready",
            State::Waiting(_) => "waiting",
        };
        f.debug_struct("LocalAcquire")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn is_pending(fut: &mut LocalAcquire) -> bool {
        let mut cx = Context::from_waker(noop_waker_ref());
        Pin::new(fut).poll(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn fifo_order_is_call_order() {
        let s = LocalCapacity::new(1);
        let first = s.acquire(None).await.unwrap();
        let mut waiters: Vec<_> = (0..5).map(|_| s.acquire(None)).collect();
        assert_eq!(s.queue_depth(), 5);
        let mut held = Some(first);
        for i in 0..5 {
            drop(held.take());
            for (j, w) in waiters.iter_mut().enumerate().skip(i + 1) {
                assert!(is_pending(w), "waiter {j} overtook waiter {i}");
            }
            held = Some((&mut waiters[i]).await.unwrap());
            // A newcomer cannot overtake the queue either.
            if i < 4 {
                assert!(s.try_acquire().is_none());
            }
        }
        drop(held);
        drop(waiters);
        assert_eq!((s.active(), s.queue_depth()), (0, 0));
    }

    #[tokio::test]
    async fn dropped_waiter_leaves_queue_and_is_never_granted() {
        let s = LocalCapacity::new(1);
        let p = s.acquire(None).await.unwrap();
        let a = s.acquire(None);
        let b = s.acquire(None);
        assert_eq!(s.queue_depth(), 2);
        drop(a);
        assert_eq!(s.queue_depth(), 1);
        drop(p);
        let pb = b.await.unwrap();
        assert_eq!(s.active(), 1);
        drop(pb);
        // Granted-but-unobserved waiter gives the slot back when dropped.
        let p = s.acquire(None).await.unwrap();
        let c = s.acquire(None);
        drop(p); // assigns the permit to `c`
        assert_eq!(s.active(), 1);
        drop(c);
        assert_eq!((s.active(), s.queue_depth()), (0, 0));
        assert!(s.try_acquire().is_some());
    }

    #[tokio::test]
    async fn max_queue_rejects_at_once() {
        let s = LocalCapacity::new(1);
        let _p = s.acquire(Some(1)).await.unwrap();
        let _w = s.acquire(Some(1));
        assert!(matches!(
            s.acquire(Some(1)).await,
            Err(AcquireError::QueueFull)
        ));
        assert_eq!(s.queue_depth(), 1);
        let z = LocalCapacity::new(0);
        assert!(matches!(
            z.acquire(Some(0)).await,
            Err(AcquireError::QueueFull)
        ));
    }

    #[tokio::test]
    async fn shrink_waits_for_active_then_grow_wakes_waiters() {
        let s = LocalCapacity::new(4);
        let mut held: Vec<_> = Vec::new();
        for _ in 0..4 {
            held.push(s.acquire(None).await.unwrap());
        }
        let mut w = s.acquire(None);
        s.set_capacity(2);
        assert_eq!((s.capacity(), s.active()), (2, 4));
        held.pop();
        held.pop();
        assert_eq!(s.active(), 2);
        assert!(is_pending(&mut w), "granted while active == capacity");
        held.pop();
        let p = tokio::time::timeout(Duration::from_secs(1), &mut w)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.active(), 2);
        // Grow: queued waiters get the new slots, in order.
        let w1 = s.acquire(None);
        let w2 = s.acquire(None);
        s.set_capacity(4);
        let (p1, p2) = (w1.await.unwrap(), w2.await.unwrap());
        assert_eq!((s.active(), s.available()), (4, 0));
        drop((p, p1, p2, held));
        assert_eq!((s.active(), s.available()), (0, 4));
    }

    #[tokio::test]
    async fn shrink_then_grow_before_release_pays_debt() {
        let s = LocalCapacity::new(3);
        let held: Vec<_> = (0..3).map(|_| s.try_acquire().unwrap()).collect();
        s.set_capacity(1);
        s.set_capacity(5);
        assert_eq!((s.capacity(), s.active(), s.available()), (5, 3, 2));
        drop(held);
        assert_eq!((s.active(), s.available()), (0, 5));
        let all: Vec<_> = (0..5).map(|_| s.try_acquire().unwrap()).collect();
        assert!(s.try_acquire().is_none());
        drop(all);
    }

    #[test]
    fn release_is_idempotent() {
        let s = LocalCapacity::new(1);
        let mut p = s.try_acquire().unwrap();
        p.release();
        p.release();
        drop(p);
        assert_eq!(s.active(), 0);
        assert_eq!(s.available(), 1);
    }
}
