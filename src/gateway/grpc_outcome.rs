//! The per-upstream `failures` of gRPC calls.
//!
//! A gRPC call that fails is an HTTP `200` whose `grpc-status` (in the response headers for a
//! trailers-only response, else in the trailers) is one of `grpc_failure_codes`. The proxy
//! hands each gRPC response it relays to [`count`], which classifies it with
//! [`GrpcFailures`]: a status in the headers is counted at once; otherwise the body is
//! wrapped in a [`GrpcOutcomeBody`] that reads the trailers when they pass and counts the
//! failure then. A body dropped before its end counts nothing (the client went away).
//!
//! The wrapped body is boxed into [`ProxyBody::Right`]: one allocation per gRPC response
//! whose status is in the trailers, and none for plain HTTP.

use super::proxy::ProxyBody;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use portcullis_core::classify::{GrpcFailures, GrpcFailuresEos};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse};

/// Where a failed gRPC call is counted (an upstream's metrics).
pub(super) trait CountFailure: Send + Sync + 'static {
    /// Counts one failed call.
    fn count_failure(&self);
}

/// Classifies the gRPC response `resp` and counts a failure on `counter`, now or when the
/// trailers pass.
pub(super) fn count<C: CountFailure>(
    classifier: &GrpcFailures,
    resp: Response<ProxyBody>,
    counter: Arc<C>,
) -> Response<ProxyBody> {
    match classifier.clone().classify_response(&resp) {
        ClassifiedResponse::Ready(outcome) => {
            if outcome.is_err() {
                counter.count_failure();
            }
            resp
        }
        ClassifiedResponse::RequiresEos(eos) => resp.map(|inner| {
            ProxyBody::Right(Body::new(GrpcOutcomeBody {
                inner,
                eos: Some((eos, counter)),
            }))
        }),
    }
}

pin_project! {
    /// A gRPC response body that counts a failed call when its trailers (or its error) pass.
    pub(super) struct GrpcOutcomeBody<B, C> {
        #[pin]
        inner: B,
        eos: Option<(GrpcFailuresEos, Arc<C>)>,
    }
}

impl<B, C> fmt::Debug for GrpcOutcomeBody<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcOutcomeBody")
            .field("pending", &self.eos.is_some())
            .finish_non_exhaustive()
    }
}

fn finish<C: CountFailure>(
    eos: &mut Option<(GrpcFailuresEos, Arc<C>)>,
    trailers: Option<&HeaderMap>,
) {
    if let Some((eos, counter)) = eos.take() {
        if eos.classify_eos(trailers).is_err() {
            counter.count_failure();
        }
    }
}

impl<B, C> http_body::Body for GrpcOutcomeBody<B, C>
where
    B: http_body::Body<Data = Bytes>,
    C: CountFailure,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    finish(this.eos, Some(trailers));
                }
            }
            // The upstream broke the stream: the call failed.
            Some(Err(_)) => {
                if let Some((_, counter)) = this.eos.take() {
                    counter.count_failure();
                }
            }
            None => finish(this.eos, None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Count(AtomicU64);

    impl CountFailure for Count {
        fn count_failure(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn with_trailers(status: &str) -> Response<ProxyBody> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", status.parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(t)),
        ]);
        Response::new(ProxyBody::Right(Body::new(
            http_body_util::StreamBody::new(frames),
        )))
    }

    #[tokio::test]
    async fn counts_failures_in_headers_and_trailers() {
        let c = GrpcFailures::default();
        let counter = Arc::new(Count::default());
        // Trailers-only.
        let resp = Response::builder()
            .header("grpc-status", "14")
            .body(ProxyBody::Right(Body::empty()))
            .unwrap();
        let _ = count(&c, resp, counter.clone());
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        // In the trailers: counted once the body has been read to its end.
        let resp = count(&c, with_trailers("13"), counter.clone());
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        resp.into_body().collect().await.unwrap();
        assert_eq!(counter.0.load(Ordering::Relaxed), 2);
        // A success, and a code outside the set.
        for ok in ["0", "5"] {
            let resp = count(&c, with_trailers(ok), counter.clone());
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(counter.0.load(Ordering::Relaxed), 2);
    }
}
