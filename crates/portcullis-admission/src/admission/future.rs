use crate::admit::{Admit, AdmitError};
use crate::source::{CapacitySource, Outcome};
use pin_project_lite::pin_project;
use portcullis_core::BoxError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_service::Service;

pin_project! {
    /// The response future of [`Admission`](super::Admission): waits for a slot, calls the
    /// inner service, holds the slot until the inner future completes. Dropping it at any
    /// point leaves the queue or releases the slot.
    pub struct ResponseFuture<S: Service<Req>, Req, C: CapacitySource> {
        #[pin]
        admit: Admit<S, Req, C>,
    }
}

impl<S: Service<Req>, Req, C: CapacitySource> ResponseFuture<S, Req, C> {
    pub(crate) fn new(admit: Admit<S, Req, C>) -> Self {
        Self { admit }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: CapacitySource,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().admit.poll(cx)) {
            Ok((resp, permit)) => {
                if let Some(p) = &permit {
                    p.record_outcome(Outcome::Success);
                }
                Ok(resp)
            }
            Err(AdmitError::Refused(refusal, _req)) => Err(refusal.into_error()),
            Err(AdmitError::Inner(e)) => Err(e.into()),
        })
    }
}

impl<S: Service<Req>, Req, C: CapacitySource> fmt::Debug for ResponseFuture<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admit", &self.admit)
            .finish()
    }
}
