use crate::grpc::grpc_code_of;
use crate::{codes, is_grpc_request, BoxError, RejectionBody};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A refusal made by a Portcullis layer, renderable as an HTTP or gRPC response.
///
/// `Rejection` is also an error type, so the generic (non-HTTP) forms of the layers can return
/// it through a `BoxError` and an outer HTTP adapter can find it again with
/// [`Rejection::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    retry_after: Option<Duration>,
}

/// Converts a layer's own error type into the [`Rejection`] that the HTTP form renders.
pub trait IntoRejection {
    /// The rejection describing this error.
    fn to_rejection(&self) -> Rejection;
}

impl IntoRejection for Rejection {
    fn to_rejection(&self) -> Rejection {
        self.clone()
    }
}

impl Rejection {
    /// A rejection with the given status, stable `error` code and human message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` hint (rounded up to whole seconds when rendered).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 504 `queue_timeout`: the request waited `waited` in the admission queue.
    pub fn queue_timeout(waited: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            codes::QUEUE_TIMEOUT,
            format!(
                "request waited {:.3}s in the admission queue without getting a slot",
                waited.as_secs_f64()
            ),
        )
    }

    /// 503 `queue_full`: the admission queue is at its `max_queue` bound.
    pub fn queue_full() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::QUEUE_FULL,
            "the admission queue is full",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    /// 503 `backend_unhealthy`: nothing can serve this request right now.
    pub fn backend_unhealthy() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::BACKEND_UNHEALTHY,
            "the backend is unhealthy",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    /// 503 `no_healthy_upstream`: no replica of the pool is healthy.
    pub fn no_healthy_upstream() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::NO_HEALTHY_UPSTREAM,
            "no healthy upstream replica",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    /// 502 `fallback_unavailable`: the fallback failed while it was engaged.
    pub fn fallback_unavailable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            codes::FALLBACK_UNAVAILABLE,
            "the primary is unhealthy and the fallback failed",
        )
    }

    /// 503 `storage_unavailable`: shared storage is down and `on_error` is `reject`.
    pub fn storage_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::STORAGE_UNAVAILABLE,
            "shared storage is unavailable",
        )
        .with_retry_after(Duration::from_secs(1))
    }

    /// 502 `bad_gateway`: the upstream could not be reached.
    pub fn bad_gateway() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            codes::BAD_GATEWAY,
            "the upstream could not be reached",
        )
    }

    /// 400 `bad_request`: the client's request body had malformed framing (a bad chunk
    /// size line, a truncated chunk). The client's fault, never the upstream's.
    pub fn malformed_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            "the request body is malformed (bad chunked or length framing)",
        )
    }

    /// 499 `client_closed`: the client went away before its request was complete. Nobody
    /// reads this response; it exists so the outcome is counted (nginx logs 499 the same way).
    pub fn client_closed() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            codes::CLIENT_CLOSED,
            "the client closed the connection before its request was complete",
        )
    }

    /// 408 `client_timeout`: the client sent nothing for `idle` while its request was
    /// incomplete.
    pub fn client_timeout(idle: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            codes::CLIENT_TIMEOUT,
            format!(
                "the client sent nothing for {:.3}s while its request was incomplete",
                idle.as_secs_f64()
            ),
        )
    }

    /// 504 `upstream_timeout`: the upstream did not answer within `timeout`.
    pub fn upstream_timeout(timeout: Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            codes::UPSTREAM_TIMEOUT,
            format!(
                "the upstream did not answer within {:.3}s",
                timeout.as_secs_f64()
            ),
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable machine-readable code (see [`codes`]).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `Retry-After` hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Finds a `Rejection` in a boxed error (directly, or as the source of a wrapper error).
    pub fn find(err: &BoxError) -> Option<&Rejection> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<Rejection>() {
                return Some(r);
            }
            cur = e.source();
        }
        None
    }

    /// The JSON body `{"error": "<code>", "message": "..."}`.
    pub fn json_body(&self) -> Bytes {
        let v = serde_json::json!({ "error": self.code, "message": self.message });
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }

    fn retry_after_value(&self) -> Option<HeaderValue> {
        self.retry_after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            HeaderValue::from(secs.max(1))
        })
    }

    /// Renders the rejection as a response to a request with `request_headers`: a gRPC
    /// trailers-only response for gRPC requests, a JSON body otherwise.
    pub fn to_response<B>(&self, request_headers: &HeaderMap) -> Response<RejectionBody<B>> {
        if is_grpc_request(request_headers) {
            self.to_grpc_response()
        } else {
            self.to_json_response()
        }
    }

    /// Renders the JSON form, whatever the request was. The response's extensions carry
    /// the rejection itself, so an outer layer can tell it from an upstream's answer (the
    /// gateway adds the request id to the body from it).
    pub fn to_json_response<B>(&self) -> Response<RejectionBody<B>> {
        let mut resp = Response::new(RejectionBody::full(self.json_body()));
        *resp.status_mut() = self.status;
        resp.extensions_mut().insert(self.clone());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(v) = self.retry_after_value() {
            h.insert(header::RETRY_AFTER, v);
        }
        resp
    }

    /// Renders the gRPC trailers-only form: HTTP 200, `grpc-status` and `grpc-message` in the
    /// headers, empty body.
    pub fn to_grpc_response<B>(&self) -> Response<RejectionBody<B>> {
        let mut resp = Response::new(RejectionBody::empty());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(grpc_code_of(self.status, self.code).as_i32()),
        );
        let msg = format!("{}: {}", self.code, self.message);
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&msg)) {
            h.insert("grpc-message", v);
        }
        if let Some(v) = self.retry_after_value() {
            h.insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Percent-encodes a grpc-message as the gRPC HTTP/2 spec asks (printable ASCII except `%`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code,
            self.status.as_u16(),
            self.message
        )
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[test]
    fn json_form_has_code_message_and_retry_after() {
        let r = Rejection::no_healthy_upstream();
        let resp = r.to_response::<http_body_util::Empty<Bytes>>(&HeaderMap::new());
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body: serde_json::Value = serde_json::from_slice(&r.json_body()).unwrap();
        assert_eq!(body["error"], "no_healthy_upstream");
        assert!(body["message"].as_str().unwrap().contains("healthy"));
        assert_eq!(
            resp.body().size_hint().exact(),
            Some(r.json_body().len() as u64)
        );
    }

    #[test]
    fn grpc_form_is_trailers_only() {
        let mut req = HeaderMap::new();
        req.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let resp = Rejection::queue_timeout(Duration::from_millis(1500))
            .to_response::<http_body_util::Empty<Bytes>>(&req);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert!(resp.body().is_end_stream());
        let resp = Rejection::bad_gateway().to_response::<http_body_util::Empty<Bytes>>(&req);
        assert_eq!(resp.headers()["grpc-status"], "14");
    }

    #[test]
    fn found_through_a_box_error() {
        let e: BoxError = Box::new(Rejection::queue_full());
        assert_eq!(Rejection::find(&e).unwrap().code(), codes::QUEUE_FULL);
        let other: BoxError = "nope".into();
        assert!(Rejection::find(&other).is_none());
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a%b é"), "a%25b %C3%A9");
    }
}
