//! Deadline-aware queueing: a request that carries a deadline never waits in the admission
//! queue past it.
//!
//! * The deadline comes from `grpc-timeout` (always, for every request that carries it: the
//!   gRPC wire format, `{1..8 digits}{H|M|S|m|u|n}`), or from `x-request-timeout` (seconds, a
//!   float) when the layer honours it
//!   ([`HttpAdmissionLayer::honor_request_timeout`](crate::HttpAdmissionLayer::honor_request_timeout),
//!   `honor_request_timeout: true` in config; off by default, since a plain HTTP client may
//!   not expect its header to be acted on).
//! * A queued request's wait ends at `min(queue_timeout, deadline)`. When the deadline comes
//!   first the request is answered at once with 504 `deadline_exceeded` (`DEADLINE_EXCEEDED`
//!   for gRPC), without waiting out `queue_timeout`; the endpoint counts it in
//!   `deadline_exceeded`, apart from `timed_out_504`.
//! * A request admitted after waiting goes upstream with the time it has left: its
//!   `grpc-timeout` (or `x-request-timeout`) is rewritten to the remaining time, so the
//!   upstream does not work on an answer nobody will wait for.
//!
//! The deadline is read once, when the request arrives: the time it spent before the layer
//! (in the client, on the network) is already out of the header's budget.

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use portcullis_core::{codes, IntoRejection, Rejection};
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout");

/// Where a request's deadline came from, which is also the header rewritten upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    GrpcTimeout,
    RequestTimeout,
}

/// A request's deadline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    source: Source,
}

impl Deadline {
    /// The deadline `headers` carry, counted from now (`None` without one, or with a
    /// malformed one: a header we cannot read does not shorten anything).
    pub(crate) fn of(headers: &HeaderMap, honor_request_timeout: bool) -> Option<Self> {
        let (timeout, source) = match headers.get(GRPC_TIMEOUT) {
            Some(v) => (parse_grpc_timeout(v.as_bytes())?, Source::GrpcTimeout),
            None if honor_request_timeout => (
                parse_seconds(headers.get(REQUEST_TIMEOUT)?.to_str().ok()?)?,
                Source::RequestTimeout,
            ),
            None => return None,
        };
        Some(Self {
            at: Instant::now().checked_add(timeout)?,
            source,
        })
    }

    /// Rewrites the deadline's header of `req` to the time left.
    pub(crate) fn propagate<B>(req: &mut Request<B>, deadline: Deadline) {
        let left = deadline.at.saturating_duration_since(Instant::now());
        let (name, value) = match deadline.source {
            Source::GrpcTimeout => (GRPC_TIMEOUT, format_grpc_timeout(left)),
            Source::RequestTimeout => (
                REQUEST_TIMEOUT,
                HeaderValue::from_str(&format!("{:.3}", left.as_secs_f64()))
                    .unwrap_or(HeaderValue::from_static("0")),
            ),
        };
        req.headers_mut().insert(name, value);
    }
}

/// Parses a `grpc-timeout` value: at most 8 ASCII digits and a unit.
pub(crate) fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `d` as a `grpc-timeout`, in the finest unit whose value fits in 8 digits
/// (rounded down: the upstream is never given more time than is left).
pub(crate) fn format_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let candidates = [
        (d.as_nanos(), 'n'),
        (d.as_micros(), 'u'),
        (d.as_millis(), 'm'),
        (u128::from(d.as_secs()), 'S'),
        (u128::from(d.as_secs() / 60), 'M'),
        (u128::from(d.as_secs() / 3600), 'H'),
    ];
    let (n, unit) = candidates
        .into_iter()
        .find(|(n, _)| *n <= MAX)
        .unwrap_or((MAX, 'H'));
    HeaderValue::from_str(&format!("{n}{unit}")).unwrap_or(HeaderValue::from_static("0n"))
}

/// Parses `x-request-timeout`: non-negative, finite seconds.
fn parse_seconds(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// The request's deadline passed while it waited for a slot (504 `deadline_exceeded`).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineExceeded {
    waited: Duration,
}

impl DeadlineExceeded {
    pub(crate) fn new(waited: Duration) -> Self {
        Self { waited }
    }

    /// How long the request waited.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request's deadline passed after {:.3}s in the admission queue",
            self.waited.as_secs_f64()
        )
    }
}

impl std::error::Error for DeadlineExceeded {}

impl IntoRejection for DeadlineExceeded {
    fn to_rejection(&self) -> Rejection {
        deadline_rejection(self.waited)
    }
}

/// 504 `deadline_exceeded` (gRPC `DEADLINE_EXCEEDED`).
pub(crate) fn deadline_rejection(waited: Duration) -> Rejection {
    Rejection::new(
        http::StatusCode::GATEWAY_TIMEOUT,
        codes::DEADLINE_EXCEEDED,
        DeadlineExceeded::new(waited).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trips() {
        assert_eq!(
            parse_grpc_timeout(b"200m"),
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1m", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        for d in [
            Duration::from_millis(187),
            Duration::from_secs(30),
            Duration::from_secs(86_400 * 30),
            Duration::ZERO,
        ] {
            let v = format_grpc_timeout(d);
            let back = parse_grpc_timeout(v.as_bytes()).unwrap();
            assert!(back <= d, "{v:?} says more than {d:?}");
            assert!(v.len() <= 9, "{v:?}");
        }
        assert_eq!(format_grpc_timeout(Duration::from_millis(187)), "187000u");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_and_its_header() {
        let mut h = HeaderMap::new();
        h.insert("x-request-timeout", HeaderValue::from_static("1.5"));
        assert!(Deadline::of(&h, false).is_none(), "off by default for HTTP");
        let d = Deadline::of(&h, true).unwrap();
        assert_eq!(d.at - Instant::now(), Duration::from_millis(1500));
        h.insert("grpc-timeout", HeaderValue::from_static("200m"));
        let d = Deadline::of(&h, false).expect("grpc-timeout is always read");
        assert_eq!(d.source, Source::GrpcTimeout);

        tokio::time::advance(Duration::from_millis(150)).await;
        let mut req = Request::new(());
        *req.headers_mut() = h;
        Deadline::propagate(&mut req, d);
        assert_eq!(req.headers()["grpc-timeout"], "50000000n");
        let mut bad = HeaderMap::new();
        bad.insert("x-request-timeout", HeaderValue::from_static("soon"));
        assert!(Deadline::of(&bad, true).is_none());
        bad.insert("x-request-timeout", HeaderValue::from_static("-1"));
        assert!(Deadline::of(&bad, true).is_none());
    }
}
