use super::ResponseFuture;
use crate::admit::Admit;
use crate::limiter::Limiter;
use crate::local::LocalCapacity;
use crate::source::CapacitySource;
use portcullis_core::{BoxError, HealthSource};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

/// Admission control for any request type; see the [module docs](super).
///
/// `poll_ready` forwards the inner service's readiness and never takes a slot (see the
/// crate docs for why). `call` checks the health gate and takes a free slot at once when
/// there is one; otherwise the response future queues for one. While it waits, the future
/// owns the ready inner service (a clone is left in its place, so `S: Clone`).
pub struct Admission<S, C = LocalCapacity> {
    inner: S,
    limiter: Arc<Limiter<C>>,
    health: Option<Arc<dyn HealthSource>>,
}

impl<S> Admission<S, LocalCapacity> {
    /// Wraps `inner` with an in-process limiter of `capacity` slots (default settings).
    pub fn new(inner: S, capacity: usize) -> Self {
        Self::from_parts(inner, Arc::new(Limiter::local(capacity)), None)
    }
}

impl<S, C> Admission<S, C> {
    pub(crate) fn from_parts(
        inner: S,
        limiter: Arc<Limiter<C>>,
        health: Option<Arc<dyn HealthSource>>,
    ) -> Self {
        Self {
            inner,
            limiter,
            health,
        }
    }

    /// The shared limiter.
    pub fn limiter(&self) -> &Arc<Limiter<C>> {
        &self.limiter
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, C> Clone for Admission<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: Arc::clone(&self.limiter),
            health: self.health.clone(),
        }
    }
}

impl<S: fmt::Debug, C: CapacitySource + fmt::Debug> fmt::Debug for Admission<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, Req, C> Service<Req> for Admission<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: CapacitySource,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture::new(Admit::start(
            &self.limiter,
            self.health.as_deref(),
            &mut self.inner,
            req,
            None,
        ))
    }
}
