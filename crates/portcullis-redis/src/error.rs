//! [`StorageError`]: why a Redis storage operation failed.

use portcullis_core::BoxError;
use std::fmt;
use std::time::Duration;

/// Why a Redis storage operation failed. Messages never contain the password.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// The configuration is invalid (the message names the field).
    Config(String),
    /// Redis answered with an error or the connection failed (message redacted).
    Redis(String),
    /// A Redis call did not answer within `storage.timeout`.
    Timeout(Duration),
    /// The storage is in an outage (`on_error: reject`).
    Unavailable,
    /// The capacity probe failed.
    Probe(BoxError),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(m) => write!(f, "invalid storage configuration: {m}"),
            Self::Redis(m) => write!(f, "redis error: {m}"),
            Self::Timeout(d) => write!(f, "redis call timed out after {:.3}s", d.as_secs_f64()),
            Self::Unavailable => f.write_str("redis storage unavailable"),
            Self::Probe(e) => write!(f, "capacity probe failed: {e}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Probe(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// Removes every occurrence of `secret` from `msg`.
pub(crate) fn scrub(msg: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && msg.contains(s) => msg.replace(s, "***"),
        _ => msg,
    }
}
