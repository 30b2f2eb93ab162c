use crate::breaker::Recorder;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use portcullis_core::BoxError;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_http::classify::ClassifyEos;

pin_project! {
    /// The response body of [`HttpFallback`](super::HttpFallback): the primary's or the
    /// fallback's body, streamed through untouched. When the classifier needs the end of the
    /// stream (gRPC status in trailers), the primary's outcome is recorded there; a body
    /// dropped before its end records nothing.
    pub struct FallbackBody<PB, FB, E> {
        #[pin]
        kind: Kind<PB, FB, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<PB, FB, E> {
        Primary {
            #[pin]
            body: PB,
            eos: Option<(E, Recorder)>,
        },
        Fallback {
            #[pin]
            body: FB,
        },
    }
}

impl<PB, FB, E> FallbackBody<PB, FB, E> {
    #[inline]
    pub(crate) fn primary(body: PB, eos: Option<(E, Recorder)>) -> Self {
        Self {
            kind: Kind::Primary { body, eos },
        }
    }

    pub(crate) fn fallback(body: FB) -> Self {
        Self {
            kind: Kind::Fallback { body },
        }
    }

    /// `true` when this body comes from the fallback.
    pub fn is_fallback(&self) -> bool {
        matches!(self.kind, Kind::Fallback { .. })
    }
}

impl<PB, FB, E> fmt::Debug for FallbackBody<PB, FB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBody")
            .field("fallback", &self.is_fallback())
            .finish_non_exhaustive()
    }
}

fn finish<E: ClassifyEos>(eos: &mut Option<(E, Recorder)>, trailers: Option<&HeaderMap>) {
    if let Some((e, r)) = eos.take() {
        r.record(e.classify_eos(trailers).is_ok());
    }
}

impl<PB, FB, E> Body for FallbackBody<PB, FB, E>
where
    PB: Body<Data = Bytes>,
    PB::Error: Into<BoxError> + fmt::Display + 'static,
    FB: Body<Data = Bytes>,
    FB::Error: Into<BoxError>,
    E: ClassifyEos,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Primary { body, eos } => {
                let frame = ready!(body.poll_frame(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(t) = f.trailers_ref() {
                            finish(eos, Some(t));
                        }
                    }
                    Some(Err(e)) => {
                        if let Some((c, r)) = eos.take() {
                            let _ = c.classify_error(e);
                            r.record(false);
                        }
                    }
                    None => finish(eos, None),
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            KindProj::Fallback { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Primary { body, .. } => body.is_end_stream(),
            Kind::Fallback { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Primary { body, .. } => body.size_hint(),
            Kind::Fallback { body } => body.size_hint(),
        }
    }
}
