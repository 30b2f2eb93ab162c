//! The capacity-source trait: where admission slots come from.
//!
//! The admission layers ([`Admission`](crate::Admission),
//! [`HttpAdmission`](crate::HttpAdmission)) do not count slots themselves. They ask a
//! [`CapacitySource`] for one per request and hold the returned permit for as long as the
//! request is in flight. Two implementations exist:
//!
//! * [`LocalCapacity`](crate::LocalCapacity) (this crate): an in-process FIFO semaphore, the
//!   default;
//! * the Redis-shared source (`portcullis-redis`): one global limit per endpoint shared by
//!   every gateway process, each process keeping its own local FIFO of waiters woken by a
//!   cross-process release notification.
//!
//! [`AdaptiveCapacity`](crate::adaptive::AdaptiveCapacity) wraps either and moves its limit
//! at run time from the outcomes the layer reports ([`CapacitySource::record_outcome`]).
//!
//! # Division of work between a source and the layer
//!
//! | concern | owner |
//! |---|---|
//! | counting slots, granting them in strict FIFO order | the source |
//! | keeping the queue of waiters, waking the next one on release | the source |
//! | bounding the local queue (`max_queue`) | the source ([`AcquireError::QueueFull`]) |
//! | shared storage outages (`storage_unavailable` or falling back) | the source |
//! | health gate, queue timeout (504), statistics, holding the permit until the body ends | the layer |
//!
//! The layer applies `queue_timeout` by **dropping** the acquire future. Every implementation
//! must therefore make [`CapacitySource::Acquire`] *cancel-safe*:
//!
//! * a dropped future that was waiting leaves the queue at once (it holds no position and the
//!   next release goes to the next live waiter);
//! * a dropped future that had already been granted a slot, but had not yet returned it,
//!   gives the slot back (to the next waiter, or to the pool): no slot is ever granted to a
//!   dead waiter and kept.
//!
//! # Permits
//!
//! A [`CapacitySource::Permit`] is an RAII guard: dropping it releases the slot. There is no
//! other way to release, so a release happens exactly once per grant (idempotent by
//! construction: the layer keeps the permit in an `Option` and `take()`s it). `Drop` must not
//! block and must not panic; a source whose release needs I/O (Redis) hands the release to a
//! background task it owns (for example through a channel) and returns at once. Releasing
//! wakes the next waiter (locally at once; across processes through the source's
//! notification).
//!
//! # Capacity changes
//!
//! [`set_capacity`](CapacitySource::set_capacity) may be called at any time (the probe and
//! the adaptive limiter do). It never drops queued waiters and never revokes granted
//! permits: growing wakes as many waiters as there are new slots, in FIFO order; shrinking
//! below the number of active requests lets them finish and simply grants nothing until the
//! active count is below the new capacity. It is synchronous and must not block: a shared
//! source applies the change locally at once and propagates it in the background.
//!
//! # Statistics
//!
//! [`capacity`](CapacitySource::capacity), [`active`](CapacitySource::active) and
//! [`queue_depth`](CapacitySource::queue_depth) are read by `/balancer/stats` and must do no
//! I/O: an atomic load, or a cached value for a shared source (whose `active` is the global
//! count as of its last round trip).
//!
//! # Implementing a source
//!
//! ```
//! use portcullis_admission::{AcquireError, CapacitySource, LocalCapacity};
//! use std::future::Future;
//! use std::pin::Pin;
//!
//! /// A source that wraps another one and could, say, log every grant.
//! struct Logged(LocalCapacity);
//!
//! impl CapacitySource for Logged {
//!     type Permit = <LocalCapacity as CapacitySource>::Permit;
//!     type Acquire = Pin<Box<dyn Future<Output = Result<Self::Permit, AcquireError>> + Send>>;
//!
//!     fn acquire(&self, max_queue: Option<usize>) -> Self::Acquire {
//!         let fut = self.0.acquire(max_queue);
//!         Box::pin(async move { fut.await })
//!     }
//!     fn set_capacity(&self, capacity: usize) { self.0.set_capacity(capacity) }
//!     fn capacity(&self) -> usize { self.0.capacity() }
//!     fn active(&self) -> usize { self.0.active() }
//!     fn queue_depth(&self) -> usize { self.0.queue_depth() }
//! }
//! # let s = Logged(LocalCapacity::new(1));
//! # assert_eq!(s.capacity(), 1);
//! ```

use portcullis_core::BoxError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// A source of admission slots for one endpoint: counts them, queues waiters in strict FIFO
/// order, and grants RAII permits.
///
/// See the [module documentation](self) for the full contract (cancel safety, permits,
/// capacity changes, statistics).
pub trait CapacitySource: Send + Sync + 'static {
    /// The RAII slot: dropping it releases the slot and wakes the next waiter.
    ///
    /// `Drop` must be cheap, must not block and must not panic.
    type Permit: Send + Sync + 'static;

    /// The future returned by [`acquire`](CapacitySource::acquire).
    ///
    /// It must be cancel-safe (see the [module documentation](self)): dropping it at any point
    /// leaves the queue at once and never keeps a slot. It owns everything it needs
    /// (`'static`), so the layer can store it in its response future.
    type Acquire: Future<Output = Result<Self::Permit, AcquireError>> + Send + 'static;

    /// Asks for one slot.
    ///
    /// The returned future resolves to a permit as soon as a slot is granted. Slots are
    /// granted in strict FIFO order of the calls to `acquire` (a source may take the slot
    /// synchronously inside this call when one is free; the future then resolves on its
    /// first poll). The future never times out by itself: the layer bounds the wait by
    /// dropping it.
    ///
    /// `max_queue` bounds the number of waiters of this source: when no slot is free and
    /// `max_queue` waiters are already queued, the future resolves at once to
    /// [`AcquireError::QueueFull`]. `None` means unbounded.
    fn acquire(&self, max_queue: Option<usize>) -> Self::Acquire;

    /// Takes a slot synchronously if one is free right now and nobody is queued, without
    /// queueing; `None` otherwise.
    ///
    /// This is the layer's fast path (it skips building the acquire future and its timer).
    /// It must never overtake a queued waiter. Sources that cannot answer without I/O keep
    /// the default, which always returns `None`.
    fn try_acquire(&self) -> Option<Self::Permit> {
        None
    }

    /// Changes the capacity (the maximum number of permits granted at once) at runtime.
    ///
    /// Never drops queued waiters nor revokes permits; see the
    /// [module documentation](self#capacity-changes).
    fn set_capacity(&self, capacity: usize);

    /// The current capacity (no I/O).
    fn capacity(&self) -> usize;

    /// The number of permits currently granted (no I/O; may exceed
    /// [`capacity`](CapacitySource::capacity) for a while after a shrink).
    fn active(&self) -> usize;

    /// Slots held by this process now (no I/O). Equal to [`active`](Self::active) for an
    /// in-process source, the default; a shared source returns its own share, which is what
    /// may be summed across processes.
    fn local_active(&self) -> usize {
        self.active()
    }

    /// The number of callers currently waiting for a slot in this source's queue (no I/O).
    fn queue_depth(&self) -> usize;

    /// The number of free slots: `capacity - active`, saturating at 0.
    fn available(&self) -> usize {
        self.capacity().saturating_sub(self.active())
    }

    /// Tells the source how the request holding `permit` went, once it is known: the HTTP
    /// layer calls it when the response head arrives (a 5xx or 429 status is an
    /// [`Overload`](Outcome::Overload)), the generic layer when the inner future resolves,
    /// both with `Overload` when the inner service fails (a transport error). A slot
    /// released without a call (the client went away first) had no outcome. Must be
    /// cheap; sources that do not learn from outcomes keep the default, which does
    /// nothing. [`AdaptiveCapacity`](crate::adaptive::AdaptiveCapacity) samples it.
    #[inline]
    fn record_outcome(permit: &Self::Permit, outcome: Outcome)
    where
        Self: Sized,
    {
        let _ = (permit, outcome);
    }

    /// The state of the source's adaptive limit, when it has one (no I/O): its bounds,
    /// the last `min_rtt` and `sample_rtt`, what its controller did. `None` by default.
    fn adaptive_stats(&self) -> Option<crate::stats::AdaptiveStats> {
        None
    }
}

/// How an admitted request went, as far as the backend's load is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer that is not an overload signal.
    Success,
    /// A 5xx or 429 answer, or a transport error: the backend is (or may be) overloaded.
    Overload,
}

impl Outcome {
    /// The outcome of an HTTP status: [`Overload`](Outcome::Overload) for 5xx and 429.
    #[inline]
    pub fn of_status(status: http::StatusCode) -> Self {
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            Self::Overload
        } else {
            Self::Success
        }
    }
}

impl<C: CapacitySource> CapacitySource for Arc<C> {
    type Permit = C::Permit;
    type Acquire = C::Acquire;

    fn acquire(&self, max_queue: Option<usize>) -> Self::Acquire {
        (**self).acquire(max_queue)
    }
    fn try_acquire(&self) -> Option<Self::Permit> {
        (**self).try_acquire()
    }
    fn set_capacity(&self, capacity: usize) {
        (**self).set_capacity(capacity)
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn active(&self) -> usize {
        (**self).active()
    }
    fn local_active(&self) -> usize {
        (**self).local_active()
    }
    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }
    fn available(&self) -> usize {
        (**self).available()
    }
    #[inline]
    fn record_outcome(permit: &Self::Permit, outcome: Outcome) {
        C::record_outcome(permit, outcome)
    }
    fn adaptive_stats(&self) -> Option<crate::stats::AdaptiveStats> {
        (**self).adaptive_stats()
    }
}

/// Why a [`CapacitySource`] could not grant a slot.
///
/// The layer turns these into its typed errors: [`QueueFull`](crate::QueueFull) (503
/// `queue_full`) and [`StorageUnavailable`](crate::StorageUnavailable) (503
/// `storage_unavailable`).
#[non_exhaustive]
pub enum AcquireError {
    /// No slot was free and `max_queue` callers were already waiting.
    QueueFull,
    /// The source's shared storage is unreachable and its policy is to reject (for the Redis
    /// source: `storage.on_error: reject`). A source whose policy is to fall back (serve with
    /// a local limit, or allow) does not return this; it grants a permit instead.
    StorageUnavailable(BoxError),
}

impl AcquireError {
    /// A [`StorageUnavailable`](AcquireError::StorageUnavailable) error with `cause`.
    pub fn storage_unavailable(cause: impl Into<BoxError>) -> Self {
        Self::StorageUnavailable(cause.into())
    }
}

impl fmt::Debug for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull => f.write_str("QueueFull"),
            Self::StorageUnavailable(e) => f
                .debug_tuple("StorageUnavailable")
                .field(&format_args!("{e}"))
                .finish(),
        }
    }
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull => f.write_str("admission queue is full"),
            Self::StorageUnavailable(e) => write!(f, "capacity storage unavailable: {e}"),
        }
    }
}

impl std::error::Error for AcquireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::QueueFull => None,
            Self::StorageUnavailable(e) => Some(e.as_ref()),
        }
    }
}
