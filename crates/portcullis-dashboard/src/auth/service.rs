use super::{unauthorized, Credentials, ResponseFuture, CHALLENGE};
use http::{header, HeaderValue, Request, Response};
use portcullis_core::RejectionBody;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

/// The service made by [`BasicAuthLayer`](super::BasicAuthLayer): forwards authorized
/// requests, answers the others with 401.
#[derive(Debug, Clone)]
pub struct BasicAuth<S> {
    inner: S,
    credentials: Arc<Credentials>,
}

impl<S> BasicAuth<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, credentials: Arc<Credentials>) -> Self {
        Self { inner, credentials }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BasicAuth<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<RejectionBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.credentials.verify(req.headers()) {
            return ResponseFuture::inner(self.inner.call(req));
        }
        tracing::debug!(
            path = req.uri().path(),
            "operator route: missing or wrong credentials"
        );
        let mut resp = unauthorized().to_response::<ResB>(req.headers());
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
        ResponseFuture::rejected(resp)
    }
}
