//! Outcome classification for the generic form.
//!
//! The HTTP form uses tower-http's [`classify`](tower_http::classify) instead (5xx, timeouts
//! rendered as 504 and transport errors are failures by default). For gRPC it takes
//! [`GrpcFailures`] (the configurable failure codes of `grpc-status`, read from the headers
//! or, when the headers have none, from the trailers at the end of the body) or
//! [`ProtocolClassifier`](portcullis_core::classify::ProtocolClassifier) (gRPC or HTTP, per
//! request) through [`HttpFallback::with_classifier`](crate::HttpFallback::with_classifier).
//!
//! The generic form sees only the response, not its body: [`GrpcFailures`] used there
//! decides on the `grpc-status` of the headers (trailers-only responses, which is how tonic
//! answers a call refused before any message) and counts a response whose status is in its
//! trailers as a success.

use portcullis_core::classify::GrpcFailures;
use std::fmt;
use tower_http::classify::{ClassifiedResponse, ClassifyResponse};

/// Decides whether a primary call failed, for the generic [`Fallback`](crate::Fallback).
pub trait ClassifyOutcome<Res, E> {
    /// `true` when `outcome` counts as a failure of the primary.
    fn is_failure(&self, outcome: Result<&Res, &E>) -> bool;
}

/// The default: errors are failures, every response is a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAsFailures;

impl<Res, E> ClassifyOutcome<Res, E> for ErrorsAsFailures {
    fn is_failure(&self, outcome: Result<&Res, &E>) -> bool {
        outcome.is_err()
    }
}

impl<B, E> ClassifyOutcome<http::Response<B>, E> for GrpcFailures {
    fn is_failure(&self, outcome: Result<&http::Response<B>, &E>) -> bool {
        match outcome {
            Ok(resp) => matches!(
                self.clone().classify_response(resp),
                ClassifiedResponse::Ready(Err(_))
            ),
            Err(_) => true,
        }
    }
}

/// A classifier made of a function ([`classify_fn`]).
#[derive(Clone, Copy)]
pub struct ClassifyFn<F>(F);

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClassifyFn")
    }
}

/// A classifier from a function returning `true` for failures.
///
/// ```
/// use portcullis_breaker::{classify_fn, ClassifyOutcome};
/// let c = classify_fn(|r: Result<&u16, &std::io::Error>| r.map_or(true, |s| *s >= 500));
/// assert!(c.is_failure(Ok(&503)));
/// assert!(!c.is_failure(Ok(&200)));
/// ```
pub fn classify_fn<F, Res, E>(f: F) -> ClassifyFn<F>
where
    F: Fn(Result<&Res, &E>) -> bool,
{
    ClassifyFn(f)
}

impl<F, Res, E> ClassifyOutcome<Res, E> for ClassifyFn<F>
where
    F: Fn(Result<&Res, &E>) -> bool,
{
    fn is_failure(&self, outcome: Result<&Res, &E>) -> bool {
        (self.0)(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::classify::GrpcCodeSet;

    fn grpc(status: &str) -> http::Response<()> {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", status)
            .body(())
            .unwrap()
    }

    #[test]
    fn grpc_failures_in_the_generic_form() {
        let c = GrpcFailures::new(GrpcCodeSet::DEFAULT_FAILURES);
        let ok =
            |r: &http::Response<()>| !ClassifyOutcome::<_, std::io::Error>::is_failure(&c, Ok(r));
        assert!(!ok(&grpc("14")));
        assert!(!ok(&grpc("13")));
        assert!(ok(&grpc("0")));
        assert!(ok(&grpc("7")));
        // The status is in the trailers, which the generic form does not see.
        assert!(ok(&http::Response::new(())));
        let err = std::io::Error::other("reset");
        assert!(ClassifyOutcome::<http::Response<()>, _>::is_failure(
            &c,
            Err(&err)
        ));
    }
}
