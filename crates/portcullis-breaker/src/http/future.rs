use super::FallbackBody;
use crate::breaker::Recorder;
use crate::Breaker;
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use portcullis_core::{codes, Rejection, RejectionBody};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tower_http::classify::{ClassifiedResponse, ClassifyResponse};

pin_project! {
    /// The response future of [`HttpFallback`](super::HttpFallback). Dropping it records
    /// nothing (and releases a half-open trial slot).
    pub struct HttpResponseFuture<PF, FF, C> {
        #[pin]
        kind: Kind<PF, FF, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<PF, FF, C> {
        Primary {
            #[pin]
            fut: PF,
            classifier: Option<C>,
            recorder: Option<Recorder>,
        },
        Fallback {
            #[pin]
            fut: FF,
            classifier: Option<C>,
            breaker: Breaker,
            grpc: bool,
        },
        Rejected {
            unavailable: bool,
            grpc: bool,
        },
    }
}

impl<PF, FF, C> HttpResponseFuture<PF, FF, C> {
    #[inline]
    pub(crate) fn primary(fut: PF, classifier: C, recorder: Recorder) -> Self {
        Self {
            kind: Kind::Primary {
                fut,
                classifier: Some(classifier),
                recorder: Some(recorder),
            },
        }
    }

    pub(crate) fn fallback(fut: FF, classifier: C, breaker: Breaker, grpc: bool) -> Self {
        Self {
            kind: Kind::Fallback {
                fut,
                classifier: Some(classifier),
                breaker,
                grpc,
            },
        }
    }

    pub(crate) fn rejected(unavailable: bool, grpc: bool) -> Self {
        Self {
            kind: Kind::Rejected { unavailable, grpc },
        }
    }
}

impl<PF, FF, C> fmt::Debug for HttpResponseFuture<PF, FF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture").finish_non_exhaustive()
    }
}

/// 503 when the fallback itself said 503 (it may come back soon), 502 otherwise.
fn fallback_unavailable(service_unavailable: bool) -> Rejection {
    if service_unavailable {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::FALLBACK_UNAVAILABLE,
            "the primary is unhealthy and the fallback is unavailable",
        )
        .with_retry_after(Duration::from_secs(1))
    } else {
        Rejection::fallback_unavailable()
    }
}

fn render<B>(r: &Rejection, grpc: bool) -> Response<RejectionBody<B>> {
    if grpc {
        r.to_grpc_response()
    } else {
        r.to_json_response()
    }
}

impl<PF, FF, C, PB, FB, PE, FE> Future for HttpResponseFuture<PF, FF, C>
where
    PF: Future<Output = Result<Response<PB>, PE>>,
    FF: Future<Output = Result<Response<FB>, FE>>,
    C: ClassifyResponse,
    PE: fmt::Display + 'static,
    FE: fmt::Display + 'static,
{
    type Output = Result<Response<RejectionBody<FallbackBody<PB, FB, C::ClassifyEos>>>, PE>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Primary {
                fut,
                classifier,
                recorder,
            } => {
                let out = ready!(fut.poll(cx));
                let (Some(classifier), Some(recorder)) = (classifier.take(), recorder.take())
                else {
                    panic!("HttpResponseFuture polled after completion");
                };
                match out {
                    Ok(resp) => {
                        let eos = match classifier.classify_response(&resp) {
                            ClassifiedResponse::Ready(class) => {
                                recorder.record(class.is_ok());
                                None
                            }
                            ClassifiedResponse::RequiresEos(eos) => Some((eos, recorder)),
                        };
                        Poll::Ready(Ok(
                            resp.map(|b| RejectionBody::inner(FallbackBody::primary(b, eos)))
                        ))
                    }
                    Err(e) => {
                        let _ = classifier.classify_error(&e);
                        recorder.record(false);
                        Poll::Ready(Err(e))
                    }
                }
            }
            KindProj::Fallback {
                fut,
                classifier,
                breaker,
                grpc,
            } => {
                let out = ready!(fut.poll(cx));
                let Some(classifier) = classifier.take() else {
                    panic!("HttpResponseFuture polled after completion");
                };
                match out {
                    Ok(resp) => match classifier.classify_response(&resp) {
                        ClassifiedResponse::Ready(Err(_)) => {
                            breaker.record_fallback(false);
                            tracing::debug!(status = %resp.status(), "fallback answered a failure");
                            let r = fallback_unavailable(
                                resp.status() == StatusCode::SERVICE_UNAVAILABLE,
                            );
                            Poll::Ready(Ok(render(&r, *grpc)))
                        }
                        _ => Poll::Ready(Ok(
                            resp.map(|b| RejectionBody::inner(FallbackBody::fallback(b)))
                        )),
                    },
                    Err(e) => {
                        let _ = classifier.classify_error(&e);
                        breaker.record_fallback(false);
                        tracing::debug!(error = %e, "fallback call failed");
                        Poll::Ready(Ok(render(&fallback_unavailable(false), *grpc)))
                    }
                }
            }
            KindProj::Rejected { unavailable, grpc } => {
                Poll::Ready(Ok(render(&fallback_unavailable(*unavailable), *grpc)))
            }
        }
    }
}
