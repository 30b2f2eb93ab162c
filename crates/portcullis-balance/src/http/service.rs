use super::{BalanceBody, HttpResponseFuture};
use crate::registry::ReplicaRegistry;
use http::{Request, Response};
use portcullis_core::{Rejection, RejectionBody};
use std::fmt;
use std::task::{Context, Poll};
use tower_http::classify::{MakeClassifier, ServerErrorsAsFailures, SharedClassifier};
use tower_service::Service;

/// The default response classifier: 5xx responses and errors are failures.
pub type DefaultClassifier = SharedClassifier<ServerErrorsAsFailures>;

/// The HTTP balancer.
///
/// `call` picks a replica and sends `(payload, request)` to the shared proxy service
/// `P: Service<(T, Request<B>)>` — the payload is whatever identifies the upstream to the
/// proxy (a base URL, a parsed upstream, a per-replica client). Responses are classified by
/// `M` (tower-http's `classify`; 5xx and errors by default, gRPC status via trailers with
/// `GrpcErrorsAsFailures`) to drive passive outlier ejection. The in-flight slot lives until
/// the response body ends or is dropped (a dropped response future releases it too).
///
/// With no usable replica it answers 503 `no_healthy_upstream` (JSON, or gRPC
/// trailers-only `UNAVAILABLE` for gRPC requests) with `Retry-After`, without calling `P`.
///
/// # Example
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use portcullis_balance::{Config, HttpBalance, ReplicaRegistry, Tier};
/// use tower::{service_fn, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::convert::Infallible> {
/// let registry = ReplicaRegistry::new(&Config::default());
/// registry.add("http://10.0.0.1:8000", Tier::Primary, "replica one");
/// // The shared proxy: gets the picked replica's payload with the request.
/// let proxy = service_fn(|(name, _req): (&'static str, Request<String>)| async move {
///     Ok::<_, std::convert::Infallible>(Response::new(format!("served by {name}")))
/// });
/// let mut balance = HttpBalance::new(proxy, registry.clone());
/// let resp = balance.ready().await?.call(Request::new(String::new())).await?;
/// assert_eq!(resp.status(), StatusCode::OK);
///
/// // Nothing left to pick: 503 `no_healthy_upstream`, and the proxy is not called.
/// registry.remove("http://10.0.0.1:8000");
/// let resp = balance.ready().await?.call(Request::new(String::new())).await?;
/// assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
/// # Ok(())
/// # }
/// ```
pub struct HttpBalance<P, T, M = DefaultClassifier> {
    proxy: P,
    registry: ReplicaRegistry<T>,
    classifier: M,
}

impl<P, T> HttpBalance<P, T> {
    /// Balances over `registry`, forwarding through `proxy`.
    pub fn new(proxy: P, registry: ReplicaRegistry<T>) -> Self {
        Self {
            proxy,
            registry,
            classifier: SharedClassifier::new(ServerErrorsAsFailures::new()),
        }
    }
}

impl<P, T, M> HttpBalance<P, T, M> {
    /// Uses `classifier` to decide which responses are failures.
    pub fn with_classifier<M2>(self, classifier: M2) -> HttpBalance<P, T, M2> {
        HttpBalance {
            proxy: self.proxy,
            registry: self.registry,
            classifier,
        }
    }

    /// The registry.
    pub fn registry(&self) -> &ReplicaRegistry<T> {
        &self.registry
    }

    /// The inner proxy service.
    pub fn get_ref(&self) -> &P {
        &self.proxy
    }

    /// The inner proxy service, mutably.
    pub fn get_mut(&mut self) -> &mut P {
        &mut self.proxy
    }

    /// Consumes the balancer and returns the inner proxy service. The registry lives on in
    /// its other clones; requests in flight keep their replica's slot until they end.
    pub fn into_inner(self) -> P {
        self.proxy
    }
}

impl<P: Clone, T, M: Clone> Clone for HttpBalance<P, T, M> {
    fn clone(&self) -> Self {
        Self {
            proxy: self.proxy.clone(),
            registry: self.registry.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<P: fmt::Debug, T, M: fmt::Debug> fmt::Debug for HttpBalance<P, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBalance")
            .field("proxy", &self.proxy)
            .field("registry", &self.registry)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<P, T, M, B, ResB> Service<Request<B>> for HttpBalance<P, T, M>
where
    P: Service<(T, Request<B>), Response = Response<ResB>>,
    P::Error: fmt::Display + 'static,
    M: MakeClassifier,
    T: Clone,
{
    type Response = Response<RejectionBody<BalanceBody<ResB, M::ClassifyEos, T>>>;
    type Error = P::Error;
    type Future = HttpResponseFuture<P::Future, M::Classifier, M::ClassifyEos, T, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.proxy.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.registry.pick() {
            Ok(guard) => {
                let classifier = self.classifier.make_classifier(&req);
                let target = guard.target().clone();
                HttpResponseFuture::called(self.proxy.call((target, req)), classifier, guard)
            }
            Err(_) => {
                tracing::debug!(uri = %req.uri(), "no healthy upstream");
                let rejection =
                    Rejection::no_healthy_upstream().with_retry_after(self.registry.retry_after());
                HttpResponseFuture::rejected(rejection.to_response(req.headers()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HttpBalance;
    use crate::{Config, ReplicaRegistry};

    #[tokio::test]
    async fn hands_out_the_inner_proxy() {
        let registry: ReplicaRegistry<String> = ReplicaRegistry::new(&Config::default());
        let mut svc = HttpBalance::new(vec![1u32], registry);
        assert_eq!(svc.get_ref(), &[1]);
        svc.get_mut().push(2);
        assert_eq!(svc.get_ref(), &[1, 2]);
        assert_eq!(svc.into_inner(), [1, 2]);
    }
}
