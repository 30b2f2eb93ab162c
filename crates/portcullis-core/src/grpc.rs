use http::{header::CONTENT_TYPE, HeaderMap, StatusCode};

/// The gRPC status codes Portcullis emits (a subset of `google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GrpcCode {
    /// 1: the client went away.
    Cancelled = 1,
    /// 2: unknown error.
    Unknown = 2,
    /// 3: the request is malformed.
    InvalidArgument = 3,
    /// 4: a deadline (queue or upstream timeout) passed.
    DeadlineExceeded = 4,
    /// 5: no such route.
    NotFound = 5,
    /// 8: a limit was hit.
    ResourceExhausted = 8,
    /// 13: an internal error.
    Internal = 13,
    /// 14: the service is unavailable right now; the client may retry.
    Unavailable = 14,
    /// 16: missing or wrong credentials.
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The numeric value sent in `grpc-status`.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }
}

/// Maps an HTTP status to the gRPC status a tonic client should see.
///
/// Follows the gRPC HTTP-to-gRPC mapping, with the two statuses that matter for Portcullis
/// spelled out: 502 and 503 become `UNAVAILABLE`, 504 becomes `DEADLINE_EXCEEDED`.
pub fn grpc_status_for(status: StatusCode) -> GrpcCode {
    match status.as_u16() {
        400 => GrpcCode::InvalidArgument,
        401 => GrpcCode::Unauthenticated,
        404 => GrpcCode::NotFound,
        // The client stopped sending its request (`client_timeout`): its own doing, so not a
        // code that counts against the upstream.
        408 => GrpcCode::Cancelled,
        429 => GrpcCode::ResourceExhausted,
        499 => GrpcCode::Cancelled,
        502..=503 => GrpcCode::Unavailable,
        504 => GrpcCode::DeadlineExceeded,
        500 => GrpcCode::Internal,
        _ => GrpcCode::Unknown,
    }
}

/// The gRPC status of a rejection with HTTP `status` and `error` code: `queue_full` is
/// `RESOURCE_EXHAUSTED` (a bound was hit: the client should back off, not fail over at
/// once), everything else follows [`grpc_status_for`].
pub(crate) fn grpc_code_of(status: StatusCode, code: &str) -> GrpcCode {
    if code == crate::codes::QUEUE_FULL {
        GrpcCode::ResourceExhausted
    } else {
        grpc_status_for(status)
    }
}

/// `true` when the request headers say this is a gRPC call (`content-type: application/grpc*`).
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .map(|v| v.as_bytes().starts_with(b"application/grpc"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_statuses_portcullis_uses() {
        assert_eq!(
            grpc_status_for(StatusCode::BAD_GATEWAY),
            GrpcCode::Unavailable
        );
        assert_eq!(
            grpc_status_for(StatusCode::SERVICE_UNAVAILABLE),
            GrpcCode::Unavailable
        );
        assert_eq!(
            grpc_status_for(StatusCode::GATEWAY_TIMEOUT),
            GrpcCode::DeadlineExceeded
        );
        assert_eq!(
            grpc_status_for(StatusCode::UNAUTHORIZED),
            GrpcCode::Unauthenticated
        );
    }

    #[test]
    fn queue_full_is_resource_exhausted() {
        let s = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            grpc_code_of(s, crate::codes::QUEUE_FULL),
            GrpcCode::ResourceExhausted
        );
        assert_eq!(
            grpc_code_of(s, crate::codes::NO_HEALTHY_UPSTREAM),
            GrpcCode::Unavailable
        );
        assert_eq!(
            grpc_status_for(StatusCode::REQUEST_TIMEOUT),
            GrpcCode::Cancelled
        );
    }

    #[test]
    fn detects_grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc_request(&h));
        h.insert(CONTENT_TYPE, "application/grpc+proto".parse().unwrap());
        assert!(is_grpc_request(&h));
        h.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_grpc_request(&h));
    }
}
