use super::{DefaultClassifier, HttpFallback};
use crate::Breaker;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_layer::Layer;

/// Wraps a primary HTTP service (the gateway's balanced upstream pool) into an
/// [`HttpFallback`] that routes to `fallback` (e.g. a proxy to `fallback.url`) while
/// `breaker` is tripped.
///
/// # Example
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use portcullis_breaker::{Breaker, BreakerState, Config, HttpFallbackLayer};
/// use portcullis_health::{Probe, ProbeFuture, ProbeResult};
/// use std::time::Duration;
/// use tower::{service_fn, Layer, Service, ServiceExt};
///
/// struct StillDown;
/// impl Probe for StillDown {
///     fn probe(&self, _target: &str) -> ProbeFuture {
///         Box::pin(async { ProbeResult::unhealthy(Duration::ZERO, "down") })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::convert::Infallible> {
/// let config = Config { failure_threshold: 2, ..Config::default() };
/// let breaker = Breaker::builder(config).primary_target("primary").probe(StillDown).build();
/// let primary = service_fn(|_: Request<String>| async {
///     let mut resp = Response::new(String::new());
///     *resp.status_mut() = StatusCode::BAD_GATEWAY;
///     Ok::<_, std::convert::Infallible>(resp)
/// });
/// let fallback = service_fn(|_: Request<String>| async {
///     Ok::<_, std::convert::Infallible>(Response::new("cached answer".to_string()))
/// });
/// let mut svc = HttpFallbackLayer::new(fallback, breaker.clone()).layer(primary);
/// for _ in 0..2 {
///     let resp = svc.ready().await?.call(Request::new(String::new())).await?;
///     assert_eq!(resp.status(), StatusCode::BAD_GATEWAY); // two 5xx: the breaker trips
/// }
/// assert_eq!(breaker.state(), BreakerState::Fallback);
/// let resp = svc.ready().await?.call(Request::new(String::new())).await?;
/// assert_eq!(resp.status(), StatusCode::OK); // served by the fallback
/// # Ok(())
/// # }
/// ```
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
