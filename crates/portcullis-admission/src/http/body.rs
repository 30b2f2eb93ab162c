use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    /// A response body that holds an admission slot until it ends.
    ///
    /// The slot is released as soon as the body reports its end (a `None` frame, an error,
    /// or `is_end_stream()` after a frame) or when the body is dropped (the client went
    /// away, the connection broke, a panic unwound): whichever comes first. Bodies of
    /// unwatched paths carry no slot.
    pub struct AdmissionBody<B, P> {
        #[pin]
        inner: B,
        permit: Option<P>,
    }
}

impl<B, P> AdmissionBody<B, P> {
    /// Wraps `inner`, holding `permit` until it ends.
    pub fn new(inner: B, permit: Option<P>) -> Self {
        Self { inner, permit }
    }

    /// `true` while the body still holds its slot.
    pub fn holds_slot(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: Body, P> Body for AdmissionBody<B, P> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if ends_body(&frame, &*this.inner) {
            this.permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug, P> fmt::Debug for AdmissionBody<B, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionBody")
            .field("inner", &self.inner)
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}

/// Whether `frame`, just read from `body`, is its last: the end (`None`), an error, or a
/// frame after which the body reports its end.
pub(crate) fn ends_body<B: Body + ?Sized>(
    frame: &Option<Result<Frame<B::Data>, B::Error>>,
    body: &B,
) -> bool {
    match frame {
        Some(Ok(_)) => body.is_end_stream(),
        None | Some(Err(_)) => true,
    }
}
