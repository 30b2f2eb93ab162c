//! What happens to an admitted request whose client goes away: [`OnClientCancel`].

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::Deserialize;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;
use tower_service::Service;

/// What happens to an admitted request when its client goes away (drops the response
/// future, or the response body before its end).
///
/// Many backends (model servers among them) keep working on a request after its client
/// disconnects. Releasing the slot at the disconnect then lets the next request in while the
/// backend still works on the old one, so the backend runs more than `capacity` requests at
/// once. [`Hold`](OnClientCancel::Hold) keeps the upstream request running to its end in the
/// background (its response body read and discarded) and keeps the slot until then, so the
/// backend's real concurrency never exceeds the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClientCancel {
    /// Finish the upstream request in the background, bounded by a time limit, and release
    /// the slot when it ends (the default).
    #[default]
    Hold,
    /// Release the slot at once and drop the upstream request.
    Release,
}

/// A watched request's share of its admission slot, put in the request's extensions by
/// [`HttpAdmission`](crate::HttpAdmission) when it holds on client cancel, and taken out by
/// [`HoldOnCancel`]. The slot is released when the last share is dropped.
#[derive(Clone)]
pub struct HeldSlot {
    slot: Arc<dyn HoldCounter>,
}

impl HeldSlot {
    pub(crate) fn new(slot: Arc<dyn HoldCounter>) -> Self {
        Self { slot }
    }
}

impl fmt::Debug for HeldSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeldSlot")
    }
}

/// The counters a held slot reports to (its endpoint's limiter).
pub(crate) trait HoldCounter: Send + Sync {
    /// The client went away and the request is now held in the background.
    fn held(&self);
    /// A held request reached the hold time limit and was dropped.
    fn cut(&self);
}

/// Applies [`HoldOnCancel`]: place it directly below an
/// [`HttpAdmissionLayer`](crate::HttpAdmissionLayer) built with
/// [`hold_on_client_cancel`](crate::HttpAdmissionLayer::hold_on_client_cancel).
///
/// ```
/// use portcullis_admission::{Endpoints, HoldOnCancelLayer, HttpAdmissionLayer, Limiter};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// let endpoints = Endpoints::new().watch("/work", None, Arc::new(Limiter::local(4)));
/// let hold = HoldOnCancelLayer::new(Duration::from_secs(60));
/// let admission = HttpAdmissionLayer::new(endpoints).hold_on_client_cancel(true);
/// let stack = tower::ServiceBuilder::new().layer(admission).layer(hold.clone());
/// # let _ = stack;
/// assert_eq!(hold.held_now(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct HoldOnCancelLayer {
    shared: Arc<HoldShared>,
}

#[derive(Debug)]
struct HoldShared {
    limit: Duration,
    tracker: TaskTracker,
}

impl HoldOnCancelLayer {
    /// Holds requests whose client went away for at most `limit` after the client left.
    pub fn new(limit: Duration) -> Self {
        Self {
            shared: Arc::new(HoldShared {
                limit,
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The longest a held request runs on after its client went away.
    pub fn limit(&self) -> Duration {
        self.shared.limit
    }

    /// Requests running in the background now.
    pub fn held_now(&self) -> usize {
        self.shared.tracker.len()
    }

    /// Waits until every held request has ended, for at most `timeout`; `true` when none is
    /// left. Requests held after this call are still waited for.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let tracker = &self.shared.tracker;
        tracker.close();
        let done = tokio::time::timeout(timeout, tracker.wait()).await.is_ok();
        tracker.reopen();
        done
    }
}

impl<S> Layer<S> for HoldOnCancelLayer {
    type Service = HoldOnCancel<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HoldOnCancel {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Keeps a watched request running after its client went away, holding its admission slot
/// until the upstream response has ended (its body read and discarded), for at most the
/// layer's limit; see [`OnClientCancel::Hold`].
///
/// Requests that carry no [`HeldSlot`] (unwatched paths, or an admission layer that
/// releases on cancel) pass through untouched, at no cost beyond one extensions lookup. For
/// held requests the inner future and the response body are boxed so that they can be moved
/// to a background task when the client drops them; the task is spawned on the current
/// Tokio runtime and tracked, so [`HoldOnCancelLayer::drain`] can wait for it and a runtime
/// shutdown stops it.
pub struct HoldOnCancel<S> {
    inner: S,
    shared: Arc<HoldShared>,
}

impl<S: Clone> Clone for HoldOnCancel<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for HoldOnCancel<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldOnCancel")
            .field("inner", &self.inner)
            .field("limit", &self.shared.limit)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HoldOnCancel<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HoldableBody,
{
    type Response = Response<HoldBody<ResBody>>;
    type Error = S::Error;
    type Future = HoldFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let slot = req.extensions_mut().remove::<HeldSlot>();
        let fut = self.inner.call(req);
        match slot {
            None => HoldFuture {
                plain: Some(fut),
                held: None,
            },
            Some(slot) => HoldFuture {
                plain: None,
                held: Some(Held {
                    fut: Box::pin(fut),
                    slot,
                    shared: Arc::clone(&self.shared),
                }),
            },
        }
    }
}

/// A response body a background task can own and read to its end: `Send + 'static`, with
/// `Send` frames and errors.
pub trait HoldableBody: Body<Data: Send, Error: Send> + Send + 'static {}

impl<B> HoldableBody for B
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send,
{
}

/// A held request's future, with its slot share.
struct Held<F> {
    fut: Pin<Box<F>>,
    slot: HeldSlot,
    shared: Arc<HoldShared>,
}

pin_project! {
    /// The response future of [`HoldOnCancel`]. Dropped before it completes while it holds a
    /// slot, it moves the inner future to a background task that runs it to its end and
    /// discards the response body.
    pub struct HoldFuture<F, B, E>
    where
        F: Future<Output = Result<Response<B>, E>>,
        F: Send,
        F: 'static,
        B: HoldableBody,
        E: Send,
        E: 'static,
    {
        #[pin]
        plain: Option<F>,
        held: Option<Held<F>>,
    }

    impl<F, B, E> PinnedDrop for HoldFuture<F, B, E>
    where
        F: Future<Output = Result<Response<B>, E>>,
        F: Send,
        F: 'static,
        B: HoldableBody,
        E: Send,
        E: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(held) = this.project().held.take() {
                let Held { fut, slot, shared } = held;
                let deadline = Instant::now() + shared.limit;
                detach(&shared, slot, deadline, async move {
                    if let Ok(resp) = fut.await {
                        drain_body(Box::pin(resp.into_body())).await;
                    }
                });
            }
        }
    }
}

impl<F, B, E> Future for HoldFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: HoldableBody,
    E: Send + 'static,
{
    type Output = Result<Response<HoldBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(fut) = this.plain.as_pin_mut() {
            return fut.poll(cx).map_ok(|resp| resp.map(HoldBody::plain));
        }
        let Some(held) = this.held.as_mut() else {
            panic!("HoldFuture polled after completion");
        };
        let res = ready!(held.fut.as_mut().poll(cx));
        let held = this.held.take().expect("held is Some: checked above");
        Poll::Ready(res.map(|resp| {
            resp.map(|body| HoldBody {
                plain: None,
                held: Some(HeldBody {
                    body: Box::pin(body),
                    slot: held.slot,
                    shared: held.shared,
                }),
            })
        }))
    }
}

impl<F, B, E> fmt::Debug for HoldFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: HoldableBody,
    E: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldFuture")
            .field("holds_slot", &self.held.is_some())
            .finish()
    }
}

/// A held response body, with its slot share.
struct HeldBody<B> {
    body: Pin<Box<B>>,
    slot: HeldSlot,
    shared: Arc<HoldShared>,
}

pin_project! {
    /// The response body of [`HoldOnCancel`]. Dropped before its end while it holds a slot,
    /// it moves the rest of the body to a background task that reads and discards it; the
    /// slot share is released when the body ends there, or at the hold time limit.
    pub struct HoldBody<B>
    where
        B: HoldableBody,
    {
        #[pin]
        plain: Option<B>,
        held: Option<HeldBody<B>>,
    }

    impl<B> PinnedDrop for HoldBody<B>
    where
        B: HoldableBody,
    {
        fn drop(this: Pin<&mut Self>) {
            if let Some(held) = this.project().held.take() {
                let HeldBody { body, slot, shared } = held;
                if body.is_end_stream() {
                    return;
                }
                let deadline = Instant::now() + shared.limit;
                detach(&shared, slot, deadline, drain_body(body));
            }
        }
    }
}

impl<B> HoldBody<B>
where
    B: HoldableBody,
{
    fn plain(body: B) -> Self {
        Self {
            plain: Some(body),
            held: None,
        }
    }

    /// `true` while the body still holds a share of its request's slot.
    pub fn holds_slot(&self) -> bool {
        self.held.is_some()
    }
}

impl<B> Body for HoldBody<B>
where
    B: HoldableBody,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(body) = this.plain.as_pin_mut() {
            return body.poll_frame(cx);
        }
        let Some(held) = this.held.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(held.body.as_mut().poll_frame(cx));
        if crate::http::ends_body(&frame, &*held.body) {
            // The response is complete: drop the share now, nothing is left to hold.
            this.held.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match (&self.plain, &self.held) {
            (Some(b), _) => b.is_end_stream(),
            (None, Some(h)) => h.body.is_end_stream(),
            (None, None) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.plain, &self.held) {
            (Some(b), _) => b.size_hint(),
            (None, Some(h)) => h.body.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

impl<B> fmt::Debug for HoldBody<B>
where
    B: HoldableBody,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldBody")
            .field("holds_slot", &self.held.is_some())
            .finish()
    }
}

/// Runs `work` in a tracked background task holding `slot` until it ends or `deadline`
/// passes. Outside a Tokio runtime (nothing could poll the task) the slot is released at
/// once.
fn detach(
    shared: &HoldShared,
    slot: HeldSlot,
    deadline: Instant,
    work: impl Future<Output = ()> + Send + 'static,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    slot.slot.held();
    shared.tracker.spawn_on(
        async move {
            if tokio::time::timeout_at(deadline, work).await.is_err() {
                slot.slot.cut();
            }
            drop(slot);
        },
        &handle,
    );
}

/// Reads `body` to its end (or first error), discarding every frame.
async fn drain_body<B: Body>(mut body: Pin<Box<B>>) {
    while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
}
