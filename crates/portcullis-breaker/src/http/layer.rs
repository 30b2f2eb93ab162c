use super::{DefaultClassifier, HttpFallback};
use crate::Breaker;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_layer::Layer;

/// Wraps a primary HTTP service (the gateway's balanced upstream pool) into an
/// [`HttpFallback`] that routes to `fallback` (e.g. a proxy to `fallback.url`) while
/// `breaker` is tripped.
#[derive(Debug, Clone)]
pub struct HttpFallbackLayer<F, M = DefaultClassifier> {
    fallback: F,
    breaker: Breaker,
    classifier: M,
}

impl<F> HttpFallbackLayer<F> {
    /// 5xx responses (including a proxy's 502/504 for transport errors and timeouts) and
    /// service errors are failures.
    ///
    /// `fallback` configures the breaker's fallback: an in-process service works without
    /// `Config::url`, which only names a URL to probe (see
    /// [`BreakerBuilder::fallback_target`](crate::BreakerBuilder::fallback_target)).
    pub fn new(fallback: F, breaker: Breaker) -> Self {
        breaker.attach_fallback();
        Self {
            fallback,
            breaker,
            classifier: SharedClassifier::new(ServerErrorsAsFailures::new()),
        }
    }
}

impl<F, M> HttpFallbackLayer<F, M> {
    /// Uses `classifier` (a tower-http `MakeClassifier`, e.g.
    /// `GrpcErrorsAsFailures::make_classifier()` or a `StatusInRangeAsFailures`).
    pub fn with_classifier<M2>(self, classifier: M2) -> HttpFallbackLayer<F, M2> {
        HttpFallbackLayer {
            fallback: self.fallback,
            breaker: self.breaker,
            classifier,
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<P, F: Clone, M: Clone> Layer<P> for HttpFallbackLayer<F, M> {
    type Service = HttpFallback<P, F, M>;

    fn layer(&self, primary: P) -> Self::Service {
        HttpFallback::new(primary, self.fallback.clone(), self.breaker.clone())
            .with_classifier(self.classifier.clone())
    }
}
