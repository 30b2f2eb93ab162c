use http::Response;
use pin_project_lite::pin_project;
use portcullis_core::RejectionBody;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    /// The response future of [`BasicAuth`](super::BasicAuth): the inner service's, or a
    /// ready 401.
    #[derive(Debug)]
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<RejectionBody<B>>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(super) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(super) fn rejected(response: Response<RejectionBody<B>>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<RejectionBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let resp = ready!(future.poll(cx))?;
                Poll::Ready(Ok(resp.map(RejectionBody::inner)))
            }
            KindProj::Rejected { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Polled after completion: a contract violation by the caller; answer with
                // the same 401 shape rather than panic.
                None => Poll::Ready(Ok(super::unauthorized().to_json_response())),
            },
        }
    }
}
