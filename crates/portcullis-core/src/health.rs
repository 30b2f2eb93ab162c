use std::sync::Arc;

/// Answers, without I/O, whether anything can serve a request right now.
///
/// The admission layer asks this before it queues a request, so that a request which cannot be
/// served is refused at once with 503 instead of waiting for a slot it could never use. The
/// balancer (any healthy replica?) and the circuit breaker (primary or fallback usable?)
/// implement it over their cached state; implementations must be cheap (an atomic load or an
/// `ArcSwap` read) because they run on every request.
pub trait HealthSource: Send + Sync + 'static {
    /// `true` when a request arriving now could be served.
    fn can_serve(&self) -> bool;
}

/// A [`HealthSource`] that is always healthy; the default when no source is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

impl HealthSource for AlwaysHealthy {
    fn can_serve(&self) -> bool {
        true
    }
}

impl<T: HealthSource + ?Sized> HealthSource for Arc<T> {
    fn can_serve(&self) -> bool {
        (**self).can_serve()
    }
}

impl<F> HealthSource for F
where
    F: Fn() -> bool + Send + Sync + 'static,
{
    fn can_serve(&self) -> bool {
        self()
    }
}
