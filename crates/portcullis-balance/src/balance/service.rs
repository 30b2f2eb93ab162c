use super::ResponseFuture;
use crate::registry::ReplicaRegistry;
use portcullis_core::BoxError;
use std::fmt;
use std::task::{Context, Poll};
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

/// Balances requests over the replicas of a [`ReplicaRegistry`].
///
/// `call` picks a replica (lock-free, O(1)), takes its in-flight slot and hands the request,
/// with a clone of the replica's payload `T`, to the dispatch service `P`:
/// `P: Service<(T, Req)>`. With [`CallReplica`] (the default of [`Balance::new`]) the payload
/// is itself the replica's tower service and the request is sent to it. The slot is held by
/// the [`ResponseFuture`] and released when it completes or is dropped; `Ok` is recorded as a
/// success and `Err` as a failure for passive ejection.
///
/// With no usable replica the future fails with
/// [`NoHealthyReplica`](crate::NoHealthyReplica) (boxed).
pub struct Balance<P, T> {
    dispatch: P,
    registry: ReplicaRegistry<T>,
}

impl<T> Balance<CallReplica, T> {
    /// Balances over `registry`, whose payloads are the replicas' tower services.
    pub fn new(registry: ReplicaRegistry<T>) -> Self {
        Self::with_dispatch(CallReplica, registry)
    }
}

impl<P, T> Balance<P, T> {
    /// Balances over `registry`, sending `(payload, request)` to `dispatch`.
    pub fn with_dispatch(dispatch: P, registry: ReplicaRegistry<T>) -> Self {
        Self { dispatch, registry }
    }

    /// The registry.
    pub fn registry(&self) -> &ReplicaRegistry<T> {
        &self.registry
    }
}

impl<P: Clone, T> Clone for Balance<P, T> {
    fn clone(&self) -> Self {
        Self {
            dispatch: self.dispatch.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<P: fmt::Debug, T> fmt::Debug for Balance<P, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("dispatch", &self.dispatch)
            .field("registry", &self.registry)
            .finish()
    }
}

impl<P, T, Req> Service<Req> for Balance<P, T>
where
    P: Service<(T, Req)>,
    P::Error: Into<BoxError>,
    T: Clone,
{
    type Response = P::Response;
    type Error = BoxError;
    type Future = ResponseFuture<P::Future, T>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.dispatch.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.registry.pick() {
            Ok(guard) => {
                let target = guard.target().clone();
                ResponseFuture::called(self.dispatch.call((target, req)), guard)
            }
            Err(e) => ResponseFuture::failed(e),
        }
    }
}

/// The dispatch service of [`Balance::new`]: sends the request to the chosen replica's own
/// tower service (driving its readiness first, inside the response future).
#[derive(Debug, Clone, Copy, Default)]
pub struct CallReplica;

impl<S, Req> Service<(S, Req)> for CallReplica
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Oneshot<S, Req>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (svc, req): (S, Req)) -> Self::Future {
        svc.oneshot(req)
    }
}
