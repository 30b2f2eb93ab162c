//! [`ReplayBuffer`]: reads the body of a request that may be retried after a 5xx
//! (`retry.on: [5xx]`) into memory, so that the balancer can send it again.
//!
//! A request qualifies when retries on 5xx are on, its method is idempotent (GET, HEAD,
//! OPTIONS, PUT, DELETE) and its body is known to fit in `retry.buffer_limit`: no body, or a
//! `Content-Length` (the body's exact size) of at most the limit. Its body is read whole
//! (with the same `client_body_timeout` between reads as a streamed one), handed on as one
//! `Bytes`, and a copy goes in the request's extensions as a [`ReplayBody`], which
//! [`RetryingHttpBalance`](portcullis_balance::RetryingHttpBalance) reads. Every other
//! request (a POST, a chunked upload, a body over the limit) is streamed as before and
//! never retried after a 5xx: once its bytes reached the upstream it is not sent again.
//!
//! A body that fails while it is read is the client's failure, answered as the proxy
//! answers it: 400 `bad_request`, 408 `client_timeout` or 499 `client_closed`.

use super::bodies::ClientBody;
use super::proxy::{client_rejection, rejection_response};
use axum::body::Body;
use futures_util::future::{BoxFuture, Either, MapOk};
use futures_util::TryFutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use portcullis_balance::retry::is_idempotent;
use portcullis_balance::{ReplayBody, Retries};
use portcullis_core::Rejection;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// Buffers the bodies of requests that may be retried after a 5xx (see the
/// [module docs](self)); passes every other request through untouched.
#[derive(Debug, Clone)]
pub(super) struct ReplayBuffer<S> {
    inner: S,
    retries: Arc<Retries>,
    client_body_timeout: Duration,
}

impl<S> ReplayBuffer<S> {
    /// Buffers for `inner` by the policy of `retries`, allowing the client
    /// `client_body_timeout` between two reads of its body.
    pub(super) fn new(inner: S, retries: Arc<Retries>, client_body_timeout: Duration) -> Self {
        Self {
            inner,
            retries,
            client_body_timeout,
        }
    }

    /// `true` when `req` is buffered: retries on 5xx, an idempotent method, and a body
    /// known to fit in the limit.
    fn qualifies(&self, req: &Request<Body>) -> bool {
        if !self.retries.on_server_errors() || !is_idempotent(req.method()) {
            return false;
        }
        let body = req.body();
        if http_body::Body::is_end_stream(body) {
            return true;
        }
        http_body::Body::size_hint(body)
            .exact()
            .is_some_and(|n| n <= self.retries.buffer_limit() as u64)
    }
}

/// The response of the inner service, or the client's rejection.
type Buffered<B> = http_body_util::Either<B, Body>;

impl<S, B> Service<Request<Body>> for ReplayBuffer<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Buffered<B>>;
    type Error = Infallible;
    type Future = Either<
        MapOk<S::Future, fn(Response<B>) -> Response<Buffered<B>>>,
        BoxFuture<'static, Result<Response<Buffered<B>>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let passed: fn(Response<B>) -> Response<Buffered<B>> = inner_response;
        if !self.qualifies(&req) {
            return Either::Left(self.inner.call(req).map_ok(passed));
        }
        // `self.inner` was made ready for this request: take it, leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let idle = self.client_body_timeout;
        Either::Right(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let grpc = portcullis_core::is_grpc_request(&parts.headers);
            let (body, watch) = ClientBody::new(body, idle);
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    let rej = client_rejection(&watch).unwrap_or_else(Rejection::malformed_body);
                    tracing::debug!(code = rej.code(), "request body failed while buffered");
                    let resp = rejection_response(&rej, grpc);
                    return Ok(resp.map(http_body_util::Either::Right));
                }
            };
            parts.extensions.insert(ReplayBody(bytes.clone()));
            let req = Request::from_parts(parts, Body::from(bytes));
            inner.call(req).await.map(inner_response)
        }))
    }
}

fn inner_response<B>(resp: Response<B>) -> Response<Buffered<B>> {
    resp.map(http_body_util::Either::Left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_balance::{RetryConfig, RetryOn};

    fn buffer(on: bool, limit: usize) -> ReplayBuffer<()> {
        let retries = Retries::new(&RetryConfig {
            on: if on {
                vec![RetryOn::ServerErrors]
            } else {
                vec![]
            },
            buffer_limit: limit,
            ..RetryConfig::default()
        });
        ReplayBuffer::new((), Arc::new(retries), Duration::from_secs(1))
    }

    fn req(method: &str, body: Body) -> Request<Body> {
        Request::builder().method(method).body(body).unwrap()
    }

    #[test]
    fn only_idempotent_requests_of_known_small_size_are_buffered() {
        let b = buffer(true, 4);
        assert!(b.qualifies(&req("GET", Body::empty())));
        assert!(b.qualifies(&req("PUT", Body::from("1234"))));
        assert!(b.qualifies(&req("DELETE", Body::from(""))));
        assert!(
            !b.qualifies(&req("PUT", Body::from("12345"))),
            "over the limit"
        );
        assert!(
            !b.qualifies(&req("POST", Body::empty())),
            "POST is never replayed"
        );
        let chunked = Body::from_stream(futures_util::stream::iter([Ok::<_, Infallible>(
            bytes::Bytes::from_static(b"1"),
        )]));
        assert!(!b.qualifies(&req("PUT", chunked)), "unknown length");
        assert!(
            !buffer(false, 4).qualifies(&req("GET", Body::empty())),
            "retry.on is empty"
        );
    }
}
