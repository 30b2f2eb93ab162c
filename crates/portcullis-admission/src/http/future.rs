use super::AdmissionBody;
use crate::admit::{AdmissionSlot, Admit, AdmitError};
use crate::source::{CapacitySource, Outcome};
use http::{Request, Response};
use pin_project_lite::pin_project;
use portcullis_core::RejectionBody;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_service::Service;

pin_project! {
    /// The response future of [`HttpAdmission`](super::HttpAdmission): waits for a slot
    /// (watched paths only), calls the inner service, and moves the slot into the response
    /// body. Refusals resolve to a rendered rejection response, never to an error.
    pub struct ResponseFuture<S: Service<Request<ReqBody>>, ReqBody, C: CapacitySource> {
        #[pin]
        admit: Admit<S, Request<ReqBody>, C>,
    }
}

impl<S: Service<Request<ReqBody>>, ReqBody, C: CapacitySource> ResponseFuture<S, ReqBody, C> {
    pub(crate) fn new(admit: Admit<S, Request<ReqBody>, C>) -> Self {
        Self { admit }
    }
}

impl<S, ReqBody, ResBody, C> Future for ResponseFuture<S, ReqBody, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    C: CapacitySource,
{
    type Output =
        Result<Response<RejectionBody<AdmissionBody<ResBody, AdmissionSlot<C>>>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().admit.poll(cx)) {
            Ok((resp, permit)) => {
                if let Some(p) = &permit {
                    p.record_outcome(Outcome::of_status(resp.status()));
                }
                Ok(resp.map(|body| RejectionBody::inner(AdmissionBody::new(body, permit))))
            }
            Err(AdmitError::Refused(refusal, req)) => {
                Ok(refusal.to_rejection().to_response(req.headers()))
            }
            Err(AdmitError::Inner(e)) => Err(e),
        })
    }
}

impl<S: Service<Request<ReqBody>>, ReqBody, C: CapacitySource> fmt::Debug
    for ResponseFuture<S, ReqBody, C>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admit", &self.admit)
            .finish()
    }
}
