use crate::error::NoHealthyReplica;
use crate::guard::InflightGuard;
use pin_project_lite::pin_project;
use portcullis_core::BoxError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    /// The response future of [`Balance`](super::Balance): holds the in-flight slot until
    /// the response arrives or the future is dropped.
    pub struct ResponseFuture<F, T> {
        #[pin]
        inner: Option<F>,
        guard: Option<InflightGuard<T>>,
    }
}

impl<F, T> ResponseFuture<F, T> {
    pub(crate) fn called(inner: F, guard: InflightGuard<T>) -> Self {
        Self {
            inner: Some(inner),
            guard: Some(guard),
        }
    }

    pub(crate) fn failed(_e: NoHealthyReplica) -> Self {
        Self {
            inner: None,
            guard: None,
        }
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<F, T, R, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(NoHealthyReplica.into()));
        };
        let out = ready!(inner.poll(cx));
        if let Some(mut guard) = this.guard.take() {
            guard.record(out.is_ok());
        }
        Poll::Ready(out.map_err(Into::into))
    }
}
