use super::ResponseFuture;
use crate::breaker::{Recorder, Route};
use crate::classify::{ClassifyOutcome, ErrorsAsFailures};
use crate::error::FallbackUnavailable;
use crate::Breaker;
use portcullis_core::BoxError;
use std::fmt;
use std::task::{Context, Poll};
use tower_service::Service;

/// Routes each request to the primary (NORMAL) or to the fallback (while the breaker is
/// tripped), and feeds the primary's outcomes to the [`Breaker`].
///
/// The side is chosen in `poll_ready` (one atomic load in NORMAL) and only that side's
/// readiness is polled; `call` uses the side that was made ready. Primary errors pass
/// through (boxed); fallback errors become [`FallbackUnavailable`].
pub struct Fallback<P, F, C = ErrorsAsFailures> {
    primary: P,
    fallback: F,
    breaker: Breaker,
    classifier: C,
    route: Option<Route>,
}

impl<P, F> Fallback<P, F> {
    /// Routes between `primary` and `fallback` as `breaker` decides.
    pub fn new(primary: P, fallback: F, breaker: Breaker) -> Self {
        Self {
            primary,
            fallback,
            breaker,
            classifier: ErrorsAsFailures,
            route: None,
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
            route: None,
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
            route: None,
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
        // A trial slot already taken is kept across `Pending`; otherwise decide again.
        let route = match self.route.take() {
            Some(r @ Route::Trial(_)) => r,
            _ => self.breaker.route(),
        };
        let ready = match route {
            Route::Primary | Route::Trial(_) => self.primary.poll_ready(cx).map_err(Into::into),
            Route::Fallback => self
                .fallback
                .poll_ready(cx)
                .map_err(|e| FallbackUnavailable::new(e.into()).into()),
        };
        self.route = Some(route);
        ready
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.route.take().unwrap_or_else(|| self.breaker.route()) {
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
            Route::Fallback => {
                ResponseFuture::fallback(self.fallback.call(req), self.breaker.clone())
            }
        }
    }
}
