use super::Admission;
use crate::limiter::Limiter;
use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use portcullis_core::HealthSource;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// Applies [`Admission`] to a service: every service built from one layer (and its clones)
/// shares the same [`Limiter`], hence the same slots and queue.
///
/// ```
/// use portcullis_admission::{AdmissionLayer, QueueTimeout};
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let layer = AdmissionLayer::new(1).with_queue_timeout(Duration::from_secs(2));
/// let svc = ServiceBuilder::new().layer(layer.clone()).service(service_fn(|ms: u64| async move {
///     tokio::time::sleep(Duration::from_millis(ms)).await;
///     Ok::<_, std::convert::Infallible>(ms)
/// }));
/// let slow = tokio::spawn(svc.clone().oneshot(10_000));
/// tokio::task::yield_now().await;
/// let err = svc.oneshot(1).await.unwrap_err(); // waited 2 s for the only slot
/// assert!(err.is::<QueueTimeout>());
/// assert_eq!(layer.limiter().stats().timed_out_504, 1);
/// # slow.abort();
/// # }
/// ```
pub struct AdmissionLayer<C = LocalCapacity> {
    limiter: Arc<Limiter<C>>,
    health: Option<Arc<dyn HealthSource>>,
}

impl AdmissionLayer<LocalCapacity> {
    /// An in-process limiter with `capacity` slots, `queue_timeout` 30 s, unbounded queue,
    /// no health gate.
    pub fn new(capacity: usize) -> Self {
        Self::with_source(LocalCapacity::new(capacity))
    }
}

impl<C: CapacitySource> AdmissionLayer<C> {
    /// A layer over any capacity source (for example the Redis-shared one).
    pub fn with_source(source: C) -> Self {
        Self::from_limiter(Arc::new(Limiter::new(source)))
    }

    /// A layer over an existing, possibly shared, limiter.
    pub fn from_limiter(limiter: Arc<Limiter<C>>) -> Self {
        Self {
            limiter,
            health: None,
        }
    }

    /// Sets how long a request may wait for a slot (default 30 s).
    pub fn with_queue_timeout(self, timeout: Duration) -> Self {
        self.limiter.set_queue_timeout(timeout);
        self
    }

    /// Bounds the queue (default `None`: unbounded).
    pub fn with_max_queue(self, max_queue: Option<usize>) -> Self {
        self.limiter.set_max_queue(max_queue);
        self
    }

    /// Refuses requests (with [`Unhealthy`](crate::Unhealthy)) before queueing while
    /// `health` says nothing can serve.
    pub fn with_health(mut self, health: impl HealthSource) -> Self {
        self.health = Some(Arc::new(health));
        self
    }

    /// The shared limiter: stats, runtime capacity and settings.
    pub fn limiter(&self) -> &Arc<Limiter<C>> {
        &self.limiter
    }
}

impl<C> Clone for AdmissionLayer<C> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            health: self.health.clone(),
        }
    }
}

impl<C: CapacitySource + fmt::Debug> fmt::Debug for AdmissionLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionLayer")
            .field("limiter", &self.limiter)
            .field("health_gate", &self.health.is_some())
            .finish()
    }
}

impl<S, C: CapacitySource> Layer<S> for AdmissionLayer<C> {
    type Service = Admission<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::from_parts(inner, Arc::clone(&self.limiter), self.health.clone())
    }
}
