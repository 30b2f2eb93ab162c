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
    /// Routes between `primary` and `fallback` as `breaker` decides; `fallback` configures
    /// the breaker's fallback, with or without a `url` (see
    /// [`BreakerBuilder::fallback_target`](crate::BreakerBuilder::fallback_target)).
    pub fn new(primary: P, fallback: F, breaker: Breaker) -> Self {
        breaker.attach_fallback();
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

    /// The inner primary service (the one [`HttpFallbackLayer`](super::HttpFallbackLayer)
    /// wraps).
    pub fn get_ref(&self) -> &P {
        &self.primary
    }

    /// The inner primary service, mutably.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.primary
    }

    /// Consumes the service and returns the inner primary service; the fallback service is
    /// dropped (see [`into_parts`](Self::into_parts) to keep it). The breaker lives on in its
    /// other clones.
    pub fn into_inner(self) -> P {
        self.primary
    }

    /// The fallback service.
    pub fn fallback_ref(&self) -> &F {
        &self.fallback
    }

    /// The fallback service, mutably.
    pub fn fallback_mut(&mut self) -> &mut F {
        &mut self.fallback
    }

    /// Consumes the service and returns the primary and fallback services.
    pub fn into_parts(self) -> (P, F) {
        (self.primary, self.fallback)
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

#[cfg(test)]
mod tests {
    use super::HttpFallback;
    use crate::{Breaker, Config};

    fn fallback_over(primary: Vec<u32>, fallback: Vec<u32>) -> HttpFallback<Vec<u32>, Vec<u32>> {
        HttpFallback::new(
            primary,
            fallback,
            Breaker::builder(Config::default()).build(),
        )
    }

    #[tokio::test]
    async fn hands_out_the_primary_and_the_fallback() {
        let mut svc = fallback_over(vec![1], vec![10]);
        assert_eq!(svc.get_ref(), &[1]);
        assert_eq!(svc.fallback_ref(), &[10]);
        svc.get_mut().push(2);
        svc.fallback_mut().push(20);
        assert_eq!(svc.get_ref(), &[1, 2]);
        assert_eq!(svc.fallback_ref(), &[10, 20]);
        assert_eq!(svc.into_parts(), (vec![1, 2], vec![10, 20]));

        let mut svc = fallback_over(vec![3], vec![30]);
        svc.get_mut().push(4);
        assert_eq!(svc.into_inner(), [3, 4]);
    }
}
