use super::BalanceBody;
use crate::guard::InflightGuard;
use http::Response;
use pin_project_lite::pin_project;
use portcullis_core::RejectionBody;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_http::classify::{ClassifiedResponse, ClassifyResponse};

pin_project! {
    /// The response future of [`HttpBalance`](super::HttpBalance).
    pub struct HttpResponseFuture<F, C, Eos, T, ResB> {
        #[pin]
        kind: Kind<F, C, Eos, T, ResB>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C, Eos, T, ResB> {
        Called {
            #[pin]
            inner: F,
            classifier: Option<C>,
            guard: Option<InflightGuard<T>>,
        },
        Rejected {
            response: Option<Response<RejectionBody<BalanceBody<ResB, Eos, T>>>>,
        },
    }
}

impl<F, C, Eos, T, ResB> HttpResponseFuture<F, C, Eos, T, ResB> {
    pub(crate) fn called(inner: F, classifier: C, guard: InflightGuard<T>) -> Self {
        Self {
            kind: Kind::Called {
                inner,
                classifier: Some(classifier),
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn rejected(response: Response<RejectionBody<BalanceBody<ResB, Eos, T>>>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, C, Eos, T, ResB> fmt::Debug for HttpResponseFuture<F, C, Eos, T, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, T, ResB, E> Future for HttpResponseFuture<F, C, C::ClassifyEos, T, ResB>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    C: ClassifyResponse,
    E: fmt::Display + 'static,
{
    type Output = Result<Response<RejectionBody<BalanceBody<ResB, C::ClassifyEos, T>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Rejected { response } => {
                let resp = response
                    .take()
                    .expect("HttpResponseFuture polled after completion");
                Poll::Ready(Ok(resp))
            }
            KindProj::Called {
                inner,
                classifier,
                guard,
            } => {
                let out = ready!(inner.poll(cx));
                let classifier = classifier
                    .take()
                    .expect("HttpResponseFuture polled after completion");
                let mut guard = guard
                    .take()
                    .expect("HttpResponseFuture polled after completion");
                match out {
                    Ok(resp) => {
                        let eos = match classifier.classify_response(&resp) {
                            ClassifiedResponse::Ready(class) => {
                                guard.record(class.is_ok());
                                None
                            }
                            ClassifiedResponse::RequiresEos(eos) => Some(eos),
                        };
                        Poll::Ready(Ok(
                            resp.map(|b| RejectionBody::inner(BalanceBody::new(b, guard, eos)))
                        ))
                    }
                    Err(e) => {
                        let _ = classifier.classify_error(&e);
                        guard.record(false);
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}
