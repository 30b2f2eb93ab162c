//! The admission state machine shared by the generic and the HTTP services.
//!
//! `call` decides synchronously what it can (health gate, fast-path slot); everything else
//! happens in the response future:
//!
//! ```text
//! call ──unhealthy──────────────────────────────────────────────▶ Refused(Unhealthy)
//!   │──slot free (try_acquire)─▶ Called{inner future, permit}
//!   └──otherwise──▶ Waiting{acquire future, deadline timer, ready service, request}
//!                      │── slot granted ─▶ Called{..}
//!                      │── source refused ─▶ Refused(QueueFull | Storage)
//!                      └── deadline ─▶ Refused(QueueTimeout)   (the acquire future is dropped
//!                                                                at once: it leaves the queue)
//! ```
//!
//! The timer is created only when the first poll finds no slot, so admissions that do not
//! wait never touch the timer wheel.

use crate::hold::{HeldSlot, HoldCounter};
use crate::limiter::Limiter;
use crate::source::{AcquireError, CapacitySource};
use crate::{QueueFull, QueueTimeout, StorageUnavailable, Unhealthy};
use pin_project_lite::pin_project;
use portcullis_core::{BoxError, HealthSource, Rejection};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// Why a request was not admitted.
pub(crate) enum Refusal {
    Unhealthy,
    QueueFull,
    QueueTimeout(Duration),
    /// The request's own deadline passed first (see [`crate::deadline`]).
    DeadlineExceeded(Duration),
    Storage(BoxError),
}

impl Refusal {
    pub(crate) fn into_error(self) -> BoxError {
        match self {
            Refusal::Unhealthy => Box::new(Unhealthy::new()),
            Refusal::QueueFull => Box::new(QueueFull::new()),
            Refusal::QueueTimeout(w) => Box::new(QueueTimeout::new(w)),
            Refusal::DeadlineExceeded(w) => Box::new(crate::DeadlineExceeded::new(w)),
            Refusal::Storage(e) => Box::new(StorageUnavailable::new(e)),
        }
    }

    pub(crate) fn to_rejection(&self) -> Rejection {
        match self {
            Refusal::Unhealthy => Rejection::backend_unhealthy(),
            Refusal::QueueFull => Rejection::queue_full(),
            Refusal::QueueTimeout(w) => Rejection::queue_timeout(*w),
            Refusal::DeadlineExceeded(w) => crate::deadline::deadline_rejection(*w),
            Refusal::Storage(_) => Rejection::storage_unavailable(),
        }
    }
}

impl From<AcquireError> for Refusal {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::QueueFull => Refusal::QueueFull,
            AcquireError::StorageUnavailable(e) => Refusal::Storage(e),
        }
    }
}

pin_project! {
    /// Waits for a slot of one limiter, up to its `queue_timeout`; counts the outcome.
    pub(crate) struct WaitForSlot<C: CapacitySource> {
        #[pin]
        acquire: C::Acquire,
        #[pin]
        sleep: Option<Sleep>,
        limiter: Arc<Limiter<C>>,
        started: Instant,
        timeout: Duration,
        // The request's own deadline, when it has one (see `crate::deadline`).
        deadline: Option<Instant>,
        done: bool,
    }

    impl<C: CapacitySource> PinnedDrop for WaitForSlot<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done {
                this.limiter.metrics.cancelled();
            }
        }
    }
}

impl<C: CapacitySource> WaitForSlot<C> {
    fn new(limiter: Arc<Limiter<C>>) -> Self {
        let acquire = limiter.source().acquire(limiter.max_queue());
        let timeout = limiter.queue_timeout();
        Self {
            acquire,
            sleep: None,
            limiter,
            started: Instant::now(),
            timeout,
            deadline: None,
            done: false,
        }
    }
}

impl<C: CapacitySource> WaitForSlot<C> {
    /// Ends the wait at `at` too (before the first poll: the timer is armed then).
    fn set_deadline(self: Pin<&mut Self>, at: Instant) {
        *self.project().deadline = Some(at);
    }
}

impl<C: CapacitySource> Future for WaitForSlot<C> {
    type Output = Result<C::Permit, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // A grant wins over a deadline that passed at the same time.
        if let Poll::Ready(res) = this.acquire.poll(cx) {
            *this.done = true;
            let m = &this.limiter.metrics;
            return Poll::Ready(match res {
                Ok(permit) => {
                    m.admitted_after(this.started.elapsed());
                    Ok(permit)
                }
                Err(e) => {
                    m.rejected();
                    Err(e.into())
                }
            });
        }
        let queue_deadline = *this.started + *this.timeout;
        if this.sleep.is_none() {
            let until = this
                .deadline
                .map_or(queue_deadline, |d| d.min(queue_deadline));
            this.sleep.set(Some(tokio::time::sleep_until(until)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
        }
        *this.done = true;
        let waited = this.started.elapsed();
        if this.deadline.is_some_and(|d| d < queue_deadline) {
            this.limiter.metrics.deadline_exceeded();
            return Poll::Ready(Err(Refusal::DeadlineExceeded(waited)));
        }
        this.limiter.metrics.timed_out();
        Poll::Ready(Err(Refusal::QueueTimeout(waited)))
    }
}

/// What an admitted request's future ends with when it does not produce a response.
pub(crate) enum AdmitError<E, Req> {
    /// Refused before reaching the inner service; the request is handed back.
    Refused(Refusal, Req),
    /// The inner service failed.
    Inner(E),
}

/// An admitted request's slot: dropping it releases the slot (for a slot shared with a
/// [`HoldOnCancel`](crate::hold::HoldOnCancel) below, when the last holder drops it).
pub struct AdmissionSlot<C: CapacitySource> {
    inner: SlotRef<C>,
}

enum SlotRef<C: CapacitySource> {
    /// The common case: the permit alone, no allocation.
    Owned(C::Permit),
    /// Shared with the request's [`HeldSlot`].
    Shared(Arc<Granted<C>>),
}

/// A permit shared with a [`HeldSlot`], and the limiter whose hold counters it reports to.
pub(crate) struct Granted<C: CapacitySource> {
    permit: C::Permit,
    limiter: Arc<Limiter<C>>,
}

impl<C: CapacitySource> HoldCounter for Granted<C> {
    fn held(&self) {
        self.limiter.metrics.held_after_cancel();
    }

    fn cut(&self) {
        self.limiter.metrics.held_cut();
    }
}

impl<C: CapacitySource> AdmissionSlot<C> {
    /// Wraps `permit`; with `attach`, also hands a [`HeldSlot`] sharing it to `req`.
    #[inline]
    fn grant<Req>(
        permit: C::Permit,
        limiter: &Arc<Limiter<C>>,
        attach: Option<Attach<Req>>,
        req: &mut Req,
    ) -> Self {
        let inner = match attach {
            None => SlotRef::Owned(permit),
            Some(attach) => {
                let shared = Arc::new(Granted {
                    permit,
                    limiter: Arc::clone(limiter),
                });
                attach(
                    req,
                    HeldSlot::new(Arc::clone(&shared) as Arc<dyn HoldCounter>),
                );
                SlotRef::Shared(shared)
            }
        };
        Self { inner }
    }
}

impl<C: CapacitySource> AdmissionSlot<C> {
    /// Tells the source how the request went ([`CapacitySource::record_outcome`]).
    #[inline]
    pub(crate) fn record_outcome(&self, outcome: crate::source::Outcome) {
        match &self.inner {
            SlotRef::Owned(p) => C::record_outcome(p, outcome),
            SlotRef::Shared(g) => C::record_outcome(&g.permit, outcome),
        }
    }
}

impl<C: CapacitySource> fmt::Debug for AdmissionSlot<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = matches!(self.inner, SlotRef::Shared(_));
        f.debug_struct("AdmissionSlot")
            .field("shared_with_hold", &shared)
            .finish()
    }
}

/// Hands a request's [`HeldSlot`] to it (the HTTP form puts it in the extensions).
pub(crate) type Attach<Req> = fn(&mut Req, HeldSlot);

/// A queued request's deadline, and how to tell the upstream the time left once it is
/// admitted (the HTTP form rewrites `grpc-timeout`; see [`crate::deadline`]).
pub(crate) struct DeadlineHook<Req> {
    pub(crate) deadline: crate::deadline::Deadline,
    pub(crate) propagate: fn(&mut Req, crate::deadline::Deadline),
}

pin_project! {
    /// Health gate + slot + inner call; yields the inner response and its permit.
    pub(crate) struct Admit<S: Service<Req>, Req, C: CapacitySource> {
        #[pin]
        state: State<S, Req, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req, C: CapacitySource> {
        Refused {
            refusal: Option<Refusal>,
            req: Option<Req>,
        },
        Waiting {
            // Boxed: the timer makes it large, and only requests that queue need it, so the
            // fast path's future stays small.
            wait: Pin<Box<WaitForSlot<C>>>,
            svc: Option<S>,
            req: Option<Req>,
            attach: Option<Attach<Req>>,
            deadline: Option<DeadlineHook<Req>>,
        },
        Called {
            #[pin]
            fut: S::Future,
            permit: Option<AdmissionSlot<C>>,
        },
        Done,
    }
}

impl<S, Req, C> Admit<S, Req, C>
where
    S: Service<Req> + Clone,
    C: CapacitySource,
{
    /// Starts admitting `req` to `inner`, which must be ready (its `poll_ready` returned
    /// `Ready(Ok)`). On the fast path `inner` is called now; otherwise the ready service is
    /// moved into the future (a fresh clone is left in its place) and called once admitted.
    /// With `attach`, the granted slot is shared with the request through it (see
    /// [`HoldOnCancel`](crate::hold::HoldOnCancel)).
    #[inline]
    pub(crate) fn start(
        limiter: &Arc<Limiter<C>>,
        health: Option<&dyn HealthSource>,
        inner: &mut S,
        mut req: Req,
        attach: Option<Attach<Req>>,
    ) -> Self {
        // Fast path, inlined into the caller: healthy and a slot free.
        if health.is_none_or(|h| h.can_serve()) {
            if let Some(permit) = limiter.source().try_acquire() {
                limiter.metrics.admitted_now();
                let slot = AdmissionSlot::grant(permit, limiter, attach, &mut req);
                return Self::called(inner.call(req), Some(slot));
            }
        }
        Self::start_slow(limiter, health, inner, req, attach)
    }

    /// The rest of [`start`](Self::start): refuse (unhealthy), or queue (no slot free).
    // Not `#[cold]`: under load, queueing is common. Kept out of line so that the fast
    // path stays small enough to inline.
    #[inline(never)]
    fn start_slow(
        limiter: &Arc<Limiter<C>>,
        health: Option<&dyn HealthSource>,
        inner: &mut S,
        req: Req,
        attach: Option<Attach<Req>>,
    ) -> Self {
        if let Some(h) = health {
            if !h.can_serve() {
                limiter.metrics.rejected();
                return Self::refused(Refusal::Unhealthy, req);
            }
        }
        let clone = inner.clone();
        let svc = std::mem::replace(inner, clone);
        Self {
            state: State::Waiting {
                wait: Box::pin(WaitForSlot::new(Arc::clone(limiter))),
                svc: Some(svc),
                req: Some(req),
                attach,
                deadline: None,
            },
        }
    }
}

impl<S: Service<Req>, Req, C: CapacitySource> Admit<S, Req, C> {
    /// A request that is not subject to admission (an unwatched path): no slot.
    #[inline]
    pub(crate) fn called(fut: S::Future, permit: Option<AdmissionSlot<C>>) -> Self {
        Self {
            state: State::Called { fut, permit },
        }
    }

    /// Bounds a queued request's wait by its own deadline (no effect on a request that was
    /// admitted or refused at once).
    pub(crate) fn with_deadline(mut self, hook: Option<DeadlineHook<Req>>) -> Self {
        if let (Some(hook), State::Waiting { wait, deadline, .. }) = (hook, &mut self.state) {
            wait.as_mut().set_deadline(hook.deadline.at);
            *deadline = Some(hook);
        }
        self
    }

    fn refused(refusal: Refusal, req: Req) -> Self {
        Self {
            state: State::Refused {
                refusal: Some(refusal),
                req: Some(req),
            },
        }
    }
}

type AdmitOutput<S, Req, C> = Result<
    (<S as Service<Req>>::Response, Option<AdmissionSlot<C>>),
    AdmitError<<S as Service<Req>>::Error, Req>,
>;

impl<S: Service<Req>, Req, C: CapacitySource> Future for Admit<S, Req, C> {
    type Output = AdmitOutput<S, Req, C>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Refused { refusal, req } => {
                    let out = match (refusal.take(), req.take()) {
                        (Some(r), Some(q)) => AdmitError::Refused(r, q),
                        _ => panic!("admission future polled after completion"),
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(Err(out));
                }
                StateProj::Waiting {
                    wait,
                    svc,
                    req,
                    attach,
                    deadline,
                } => {
                    let granted = ready!(wait.as_mut().poll(cx));
                    let (mut svc, mut req) = match (svc.take(), req.take()) {
                        (Some(s), Some(q)) => (s, q),
                        _ => panic!("admission future polled after completion"),
                    };
                    match granted {
                        Ok(permit) => {
                            if let Some(hook) = deadline.take() {
                                (hook.propagate)(&mut req, hook.deadline);
                            }
                            let permit =
                                AdmissionSlot::grant(permit, &wait.limiter, *attach, &mut req);
                            // If `call` panics, unwinding drops `permit`: the slot is released.
                            let fut = svc.call(req);
                            this.state.set(State::Called {
                                fut,
                                permit: Some(permit),
                            });
                        }
                        Err(refusal) => {
                            // Leave the queue now, not when the caller drops this future.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(AdmitError::Refused(refusal, req)));
                        }
                    }
                }
                StateProj::Called { fut, permit } => {
                    let res = ready!(fut.poll(cx));
                    let permit = permit.take();
                    this.state.set(State::Done);
                    return Poll::Ready(match res {
                        Ok(resp) => Ok((resp, permit)),
                        Err(e) => {
                            if let Some(p) = &permit {
                                p.record_outcome(crate::source::Outcome::Overload);
                            }
                            Err(AdmitError::Inner(e))
                        }
                    });
                }
                StateProj::Done => panic!("admission future polled after completion"),
            }
        }
    }
}

impl<S: Service<Req>, Req, C: CapacitySource> fmt::Debug for Admit<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Refused { .. } => "refused",
            State::Waiting { .. } => "waiting",
            State::Called { .. } => "called",
            State::Done => "done",
        };
        f.debug_struct("Admit").field("state", &state).finish()
    }
}
