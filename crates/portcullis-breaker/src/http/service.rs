use super::{FallbackBody, HttpResponseFuture};
use crate::breaker::{poll_both_ready, Recorder, Route};
use crate::Breaker;
use http::{Request, Response};
use portcullis_core::{is_grpc_request, RejectionBody};
use std::fmt;
use std::task::{Context, Poll};
use tower_http::classify::{MakeClassifier, ServerErrorsAsFailures, SharedClassifier};
use tower_service::Service;

/// The default response classifier: 5xx responses and service errors are failures.
pub type DefaultClassifier = SharedClassifier<ServerErrorsAsFailures>;

/// The HTTP circuit-breaker service.
///
/// NORMAL: every request goes to the primary; its responses are classified by `M`
/// (tower-http `classify`; 5xx and errors by default — the gateway's proxy renders
/// transport errors as 502 and timeouts as 504, so those count too) and fed to the
/// [`Breaker`]. FALLBACK: every request goes to the fallback (except half-open trials). A
/// fallback response classified as a failure, or a fallback error, is replaced by
/// `fallback_unavailable` (503 when the fallback said 503, 502 otherwise; JSON, or gRPC
/// trailers-only for gRPC requests).
///
/// `poll_ready` makes both sides ready (only the primary when no fallback is configured), as
/// tower's `Steer` does, and `call` chooses the side from the breaker's state at that moment.
/// So a request that waited in the admission queue goes where the breaker says when it is
/// sent, not where it said when the request arrived.
pub struct HttpFallback<P, F, M = DefaultClassifier> {
    primary: P,
    fallback: F,
    breaker: Breaker,
    classifier: M,
    /// The fallback's `poll_ready` failed: the next request routed to it is refused.
    fallback_broken: bool,
}

impl<P, F> HttpFallback<P, F> {
    /// Routes between `primary` and `fallback` as `breaker` decides.
    pub fn new(primary: P, fallback: F, breaker: Breaker) -> Self {
        Self {
            primary,
            fallback,
            breaker,
            classifier: SharedClassifier::new(ServerErrorsAsFailures::new()),
            fallback_broken: false,
        }
    }
}

impl<P, F, M> HttpFallback<P, F, M> {
    /// Uses `classifier` to decide which responses are failures.
    pub fn with_classifier<M2>(self, classifier: M2) -> HttpFallback<P, F, M2> {
        HttpFallback {
            primary: self.primary,
            fallback: self.fallback,
            breaker: self.breaker,
            classifier,
            fallback_broken: false,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<P: Clone, F: Clone, M: Clone> Clone for HttpFallback<P, F, M> {
    fn clone(&self) -> Self {
        Self {
            primary: self.primary.clone(),
            fallback: self.fallback.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
            fallback_broken: false,
        }
    }
}

impl<P: fmt::Debug, F: fmt::Debug, M: fmt::Debug> fmt::Debug for HttpFallback<P, F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFallback")
            .field("primary", &self.primary)
            .field("fallback", &self.fallback)
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<P, F, M, B, PB, FB> Service<Request<B>> for HttpFallback<P, F, M>
where
    P: Service<Request<B>, Response = Response<PB>>,
    P::Error: fmt::Display + 'static,
    F: Service<Request<B>, Response = Response<FB>>,
    F::Error: fmt::Display + 'static,
    M: MakeClassifier,
{
    type Response = Response<RejectionBody<FallbackBody<PB, FB, M::ClassifyEos>>>;
    type Error = P::Error;
    type Future = HttpResponseFuture<P::Future, F::Future, M::Classifier>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both sides, so that `call` may route to either (see the type's docs).
        let primary = self.primary.poll_ready(cx)?;
        let broken = &mut self.fallback_broken;
        poll_both_ready(
            &self.breaker,
            primary,
            *broken,
            || self.fallback.poll_ready(cx),
            |e| {
                tracing::debug!(error = %e, "fallback not ready");
                *broken = true;
            },
        )
        .map(Ok)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = self.breaker.route();
        let classifier = self.classifier.make_classifier(&req);
        match route {
            Route::Primary => HttpResponseFuture::primary(
                self.primary.call(req),
                classifier,
                Recorder::Normal(self.breaker.clone()),
            ),
            Route::Trial(guard) => HttpResponseFuture::primary(
                self.primary.call(req),
                classifier,
                Recorder::Trial(guard),
            ),
            Route::Fallback => {
                let grpc = is_grpc_request(req.headers());
                if std::mem::take(&mut self.fallback_broken) {
                    self.breaker.record_fallback(false);
                    HttpResponseFuture::rejected(false, grpc)
                } else {
                    HttpResponseFuture::fallback(
                        self.fallback.call(req),
                        classifier,
                        self.breaker.clone(),
                        grpc,
                    )
                }
            }
        }
    }
}
