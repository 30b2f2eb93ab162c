//! Outcome classification for the generic form.
//!
//! The HTTP form uses tower-http's [`classify`](tower_http::classify) instead (5xx, timeouts
//! rendered as 504 and transport errors are failures by default).

use std::fmt;

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
