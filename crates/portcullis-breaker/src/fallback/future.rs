use crate::breaker::Recorder;
use crate::classify::ClassifyOutcome;
use crate::error::FallbackUnavailable;
use crate::Breaker;
use pin_project_lite::pin_project;
use portcullis_core::BoxError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    /// The response future of [`Fallback`](super::Fallback). Dropping it before it completes
    /// records nothing (and releases a half-open trial slot).
    pub struct ResponseFuture<PF, FF, C> {
        #[pin]
        kind: Kind<PF, FF, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<PF, FF, C> {
        Primary {
            #[pin]
            fut: PF,
            recorder: Option<Recorder>,
            classifier: C,
        },
        Fallback {
            #[pin]
            fut: FF,
            breaker: Breaker,
        },
        /// The fallback was routed to but its `poll_ready` had failed.
        Unavailable {
            error: Option<BoxError>,
        },
    }
}

impl<PF, FF, C> ResponseFuture<PF, FF, C> {
    pub(crate) fn primary(fut: PF, recorder: Recorder, classifier: C) -> Self {
        Self {
            kind: Kind::Primary {
                fut,
                recorder: Some(recorder),
                classifier,
            },
        }
    }

    pub(crate) fn fallback(fut: FF, breaker: Breaker) -> Self {
        Self {
            kind: Kind::Fallback { fut, breaker },
        }
    }

    pub(crate) fn unavailable(error: BoxError) -> Self {
        Self {
            kind: Kind::Unavailable { error: Some(error) },
        }
    }
}

impl<PF, FF, C> fmt::Debug for ResponseFuture<PF, FF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<PF, FF, C, Res, PE, FE> Future for ResponseFuture<PF, FF, C>
where
    PF: Future<Output = Result<Res, PE>>,
    FF: Future<Output = Result<Res, FE>>,
    PE: Into<BoxError>,
    FE: Into<BoxError>,
    C: ClassifyOutcome<Res, PE>,
{
    type Output = Result<Res, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Primary {
                fut,
                recorder,
                classifier,
            } => {
                let out = ready!(fut.poll(cx));
                if let Some(r) = recorder.take() {
                    r.record(!classifier.is_failure(out.as_ref()));
                }
                Poll::Ready(out.map_err(Into::into))
            }
            KindProj::Fallback { fut, breaker } => {
                let out = ready!(fut.poll(cx));
                breaker.record_fallback(out.is_ok());
                Poll::Ready(out.map_err(|e| FallbackUnavailable::new(e.into()).into()))
            }
            KindProj::Unavailable { error } => {
                let e = error
                    .take()
                    .expect("fallback response future polled after completion");
                Poll::Ready(Err(FallbackUnavailable::new(e).into()))
            }
        }
    }
}
