use super::{Endpoints, ResponseFuture};
use crate::admit::{AdmissionSlot, Admit, Attach, DeadlineHook};
use crate::deadline::Deadline;
use crate::hold::HeldSlot;
use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use http::{Request, Response};
use portcullis_core::{HealthSource, RejectionBody};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

use super::AdmissionBody;

/// Per-endpoint admission control for HTTP; see the [module docs](super).
///
/// `poll_ready` forwards the inner service's readiness and never takes a slot: hyper calls
/// `poll_ready` on a connection's service before a request exists, so a slot taken there
/// would be held by every idle keep-alive connection.
pub struct HttpAdmission<S, C = LocalCapacity> {
    inner: S,
    endpoints: Endpoints<C>,
    health: Option<Arc<dyn HealthSource>>,
    hold: bool,
    /// Honour `x-request-timeout` as a deadline (`grpc-timeout` always is).
    honor_request_timeout: bool,
}

impl<S, C> HttpAdmission<S, C> {
    pub(crate) fn from_parts(
        inner: S,
        endpoints: Endpoints<C>,
        health: Option<Arc<dyn HealthSource>>,
        hold: bool,
    ) -> Self {
        Self {
            inner,
            endpoints,
            health,
            hold,
            honor_request_timeout: false,
        }
    }

    pub(crate) fn with_request_timeout(mut self, honor: bool) -> Self {
        self.honor_request_timeout = honor;
        self
    }

    /// The watched endpoints.
    pub fn endpoints(&self) -> &Endpoints<C> {
        &self.endpoints
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably. Changing it does not change which requests are watched
    /// or the slots already taken.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the admission service and returns the inner service. The watched endpoints
    /// live on in the layer and in other clones; slots held by requests in flight are
    /// released as those requests end.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C> Clone for HttpAdmission<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            endpoints: self.endpoints.clone(),
            health: self.health.clone(),
            hold: self.hold,
            honor_request_timeout: self.honor_request_timeout,
        }
    }
}

impl<S: fmt::Debug, C: CapacitySource + fmt::Debug> fmt::Debug for HttpAdmission<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAdmission")
            .field("inner", &self.inner)
            .field("endpoints", &self.endpoints)
            .field("hold_on_client_cancel", &self.hold)
            .finish()
    }
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for HttpAdmission<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    C: CapacitySource,
{
    type Response = Response<RejectionBody<AdmissionBody<ResBody, AdmissionSlot<C>>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let admit = match self.endpoints.lookup(req.uri().path(), req.method()) {
            Some(limiter) => {
                let attach = self.hold.then_some(attach_held::<ReqBody> as Attach<_>);
                let deadline = Deadline::of(req.headers(), self.honor_request_timeout);
                Admit::start(
                    limiter,
                    self.health.as_deref(),
                    &mut self.inner,
                    req,
                    attach,
                )
                .with_deadline(deadline.map(|deadline| DeadlineHook {
                    deadline,
                    propagate: Deadline::propagate::<ReqBody>,
                }))
            }
            None => Admit::called(self.inner.call(req), None),
        };
        ResponseFuture::new(admit)
    }
}

/// Shares a watched request's slot with a [`HoldOnCancel`](crate::HoldOnCancel) below.
fn attach_held<B>(req: &mut Request<B>, slot: HeldSlot) {
    req.extensions_mut().insert(slot);
}

#[cfg(test)]
mod tests {
    use crate::HttpAdmissionLayer;
    use tower_layer::Layer;

    #[test]
    fn hands_out_the_inner_service() {
        let layer = HttpAdmissionLayer::from_config(&crate::Config::default(), 4).unwrap();
        let mut svc = layer.layer(vec![1u32]);
        assert_eq!(svc.get_ref(), &[1]);
        svc.get_mut().push(2);
        assert_eq!(svc.get_ref(), &[1, 2]);
        assert_eq!(svc.into_inner(), [1, 2]);
    }
}
