use super::Fallback;
use crate::classify::ErrorsAsFailures;
use crate::Breaker;
use tower_layer::Layer;

/// Wraps a primary service into a [`Fallback`] that routes to `fallback` while `breaker` is
/// tripped.
#[derive(Debug, Clone)]
pub struct FallbackLayer<F, C = ErrorsAsFailures> {
    fallback: F,
    breaker: Breaker,
    classifier: C,
}

impl<F> FallbackLayer<F> {
    /// A layer routing to `fallback` when `breaker` trips; primary errors are failures.
    /// `fallback` configures the breaker's fallback (see
    /// [`BreakerBuilder::fallback_target`](crate::BreakerBuilder::fallback_target)).
    pub fn new(fallback: F, breaker: Breaker) -> Self {
        breaker.attach_fallback();
        Self {
            fallback,
            breaker,
            classifier: ErrorsAsFailures,
        }
    }
}

impl<F, C> FallbackLayer<F, C> {
    /// Uses `classifier` to decide which primary outcomes are failures.
    pub fn with_classifier<C2>(self, classifier: C2) -> FallbackLayer<F, C2> {
        FallbackLayer {
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

impl<P, F: Clone, C: Clone> Layer<P> for FallbackLayer<F, C> {
    type Service = Fallback<P, F, C>;

    fn layer(&self, primary: P) -> Self::Service {
        Fallback::new(primary, self.fallback.clone(), self.breaker.clone())
            .with_classifier(self.classifier.clone())
    }
}
