//! What happens to an admitted request whose client goes away: [`OnClientCancel`].

use serde::Deserialize;

/// What happens to an admitted request when its client goes away (drops the response
/// future, or the response body before its end).
///
/// Many backends (model servers among them) keep working on a request after its client
/// disconnects. Releasing the slot at the disconnect then lets the next request in while the
/// backend still works on the old one, so the backend runs more than `capacity` requests at
/// once. [`Hold`](OnClientCancel::Hold) keeps the upstream request running to its end in the
/// background (its response body read and discarded) and keeps the slot until then, so the
/// backend's real concurrency never exceeds the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClientCancel {
    /// Finish the upstream request in the background, bounded by a time limit, and release
    /// the slot when it ends (the default).
    #[default]
    Hold,
    /// Release the slot at once and drop the upstream request.
    Release,
}
