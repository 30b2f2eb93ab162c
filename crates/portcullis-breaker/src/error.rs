//! Error types of the generic form.

use portcullis_core::{BoxError, IntoRejection, Rejection};
use std::fmt;

/// The fallback failed while it was engaged (its `poll_ready` or its call returned an
/// error). The source is the fallback's own error.
///
/// Renders as 502 `fallback_unavailable` through [`IntoRejection`].
#[derive(Debug)]
pub struct FallbackUnavailable {
    source: BoxError,
}

impl FallbackUnavailable {
    pub(crate) fn new(source: BoxError) -> Self {
        Self { source }
    }

    /// The fallback's error.
    pub fn inner(&self) -> &BoxError {
        &self.source
    }
}

impl fmt::Display for FallbackUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the primary is unhealthy and the fallback failed: {}",
            self.source
        )
    }
}

impl std::error::Error for FallbackUnavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

impl IntoRejection for FallbackUnavailable {
    fn to_rejection(&self) -> Rejection {
        Rejection::fallback_unavailable()
    }
}
