use crate::guard::InflightGuard;
use bytes::Buf;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_http::classify::ClassifyEos;

pin_project! {
    /// The response body of [`HttpBalance`](super::HttpBalance): the upstream's body,
    /// streamed through untouched, holding the replica's in-flight slot until the body ends,
    /// fails or is dropped. When the classifier needs the end of the stream (gRPC status in
    /// trailers), the outcome is recorded there.
    pub struct BalanceBody<B, E, T> {
        #[pin]
        inner: B,
        guard: Option<InflightGuard<T>>,
        eos: Option<E>,
    }
}

impl<B, E, T> BalanceBody<B, E, T> {
    pub(crate) fn new(inner: B, guard: InflightGuard<T>, eos: Option<E>) -> Self {
        Self {
            inner,
            guard: Some(guard),
            eos,
        }
    }

    /// A body that holds no slot: its attempt's outcome was already recorded and its slot
    /// released (a 5xx passed on after the retries ran out).
    pub(crate) fn unguarded(inner: B) -> Self {
        Self {
            inner,
            guard: None,
            eos: None,
        }
    }

    /// `true` while the body still holds its in-flight slot.
    pub fn holds_slot(&self) -> bool {
        self.guard.is_some()
    }
}

impl<B: fmt::Debug, E, T> fmt::Debug for BalanceBody<B, E, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceBody")
            .field("inner", &self.inner)
            .field("guard", &self.guard)
            .finish()
    }
}

fn finish<E: ClassifyEos, T>(
    guard: &mut Option<InflightGuard<T>>,
    eos: &mut Option<E>,
    trailers: Option<&HeaderMap>,
) {
    if let Some(mut g) = guard.take() {
        if let Some(eos) = eos.take() {
            g.record(eos.classify_eos(trailers).is_ok());
        }
    }
}

impl<B, E, T> Body for BalanceBody<B, E, T>
where
    B: Body,
    B::Data: Buf,
    B::Error: fmt::Display + 'static,
    E: ClassifyEos,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    finish(this.guard, this.eos, Some(trailers));
                }
            }
            Some(Err(e)) => {
                if let Some(mut g) = this.guard.take() {
                    if let Some(eos) = this.eos.take() {
                        let _ = eos.classify_error(e);
                    }
                    g.record(false);
                }
            }
            None => finish(this.guard, this.eos, None),
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
