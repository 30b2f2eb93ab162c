use super::ResponseFuture;
use crate::breaker::{poll_both_ready, Recorder, Route};
use crate::classify::{ClassifyOutcome, ErrorsAsFailures};
use crate::Breaker;
use portcullis_core::BoxError;
use std::fmt;
use std::task::{Context, Poll};
use tower_service::Service;

/// Routes each request to the primary (NORMAL) or to the fallback (while the breaker is
/// tripped), and feeds the primary's outcomes to the [`Breaker`].
///
/// `poll_ready` makes both sides ready (only the primary when no fallback is configured), as
/// tower's `Steer` does, and `call` chooses the side from the breaker's state at that moment
/// (one atomic load in NORMAL). So a request that waited between the two, in an admission
/// queue say, goes where the breaker says when it is sent, not where it said when the
/// request arrived. Primary errors pass through (boxed); fallback errors, including a
/// fallback `poll_ready` error, become [`FallbackUnavailable`](crate::FallbackUnavailable) for the requests routed to
/// the fallback.
pub struct Fallback<P, F, C = ErrorsAsFailures> {
    primary: P,
    fallback: F,
    breaker: Breaker,
    classifier: C,
    /// The fallback's `poll_ready` error, answered to the next request routed to it.
    fallback_error: Option<BoxError>,
}

impl<P, F> Fallback<P, F> {
    /// Routes between `primary` and `fallback` as `breaker` decides; `fallback` configures
    /// the breaker's fallback (see [`BreakerBuilder::fallback_target`](crate::BreakerBuilder::fallback_target)).
    pub fn new(primary: P, fallback: F, breaker: Breaker) -> Self {
        breaker.attach_fallback();
        Self {
            primary,
            fallback,
            breaker,
            classifier: ErrorsAsFailures,
            fallback_error: None,
        }
    }
}

impl<P, F, C> Fallback<P, F, C> {
    /// Uses `classifier` to decide which primary outcomes are failures.
    pub fn with_classifier<C2>(self, classifier: C2) -> Fallback<P, F, C2> {
        Fallback {
            primary: self.primary,
            fallback: self.fallback,
            breaker: self.breaker,
            classifier,
            fallback_error: None,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<P: Clone, F: Clone, C: Clone> Clone for Fallback<P, F, C> {
    fn clone(&self) -> Self {
        Self {
            primary: self.primary.clone(),
            fallback: self.fallback.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            fallback_error: None,
        }
    }
}

impl<P: fmt::Debug, F: fmt::Debug, C: fmt::Debug> fmt::Debug for Fallback<P, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("primary", &self.primary)
            .field("fallback", &self.fallback)
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<P, F, C, Req> Service<Req> for Fallback<P, F, C>
where
    P: Service<Req>,
    F: Service<Req, Response = P::Response>,
    P::Error: Into<BoxError>,
    F::Error: Into<BoxError>,
    C: ClassifyOutcome<P::Response, P::Error> + Clone,
{
    type Response = P::Response;
    type Error = BoxError;
    type Future = ResponseFuture<P::Future, F::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both sides, so that `call` may route to either (see the type's docs).
        let primary = self.primary.poll_ready(cx).map_err(Into::into)?;
        let fallback_error = &mut self.fallback_error;
        poll_both_ready(
            &self.breaker,
            primary,
            fallback_error.is_some(),
            || self.fallback.poll_ready(cx),
            |e| *fallback_error = Some(e.into()),
        )
        .map(Ok)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.route() {
            Route::Primary => ResponseFuture::primary(
                self.primary.call(req),
                Recorder::Normal(self.breaker.clone()),
                self.classifier.clone(),
            ),
            Route::Trial(guard) => ResponseFuture::primary(
                self.primary.call(req),
                Recorder::Trial(guard),
                self.classifier.clone(),
            ),
            Route::Fallback => match self.fallback_error.take() {
                Some(e) => {
                    self.breaker.record_fallback(false);
                    ResponseFuture::unavailable(e)
                }
                None => ResponseFuture::fallback(self.fallback.call(req), self.breaker.clone()),
            },
        }
    }
}
