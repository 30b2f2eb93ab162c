//! The gRPC health checking protocol as a [`Probe`]: `grpc.health.v1.Health/Check`, as
//! served by `tonic-health` (and by grpc-go, grpc-java, Envoy's gRPC health checks).
//!
//! [`GrpcHealthProbe`] sends one unary `Check` call with a service name (`""` asks about the
//! server as a whole) over h2c, on one shared pooled HTTP/2 client, bounded by a per-probe
//! timeout. The answer is healthy only when the call succeeds (`grpc-status: 0`) and the
//! reply's status is `SERVING`; `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`, any other
//! `grpc-status` (a server without the health service answers `UNIMPLEMENTED`, an unknown
//! service name `NOT_FOUND`), a transport error or a timeout is a failure. The result feeds
//! the same consecutive `failure_threshold` / `recovery_threshold` state machine as the HTTP
//! check ([`HealthState`](crate::HealthState)).
//!
//! ```no_run
//! use portcullis_health::{GrpcHealthProbe, Probe};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let probe = GrpcHealthProbe::new("portcullis.test.Greeter", Duration::from_secs(1));
//! let result = probe.probe("http://127.0.0.1:50051").await;
//! println!("healthy: {} ({})", result.healthy, result.detail);
//! # }
//! ```

use crate::probe::{Probe, ProbeFuture, ProbeResult};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The method path of the health check.
pub const GRPC_HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// `message HealthCheckRequest { string service = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `message HealthCheckResponse { ServingStatus status = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `HealthCheckResponse.ServingStatus`.
const SERVING: i32 = 1;

/// The name of a `ServingStatus` value, for the probe's detail.
fn serving_status_name(status: i32) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown status",
    }
}

/// A [`Probe`] speaking `grpc.health.v1.Health/Check` (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct GrpcHealthProbe {
    client: Client<HttpConnector, Full<Bytes>>,
    request: Bytes,
    service: Arc<str>,
    timeout: Duration,
}

impl GrpcHealthProbe {
    /// Checks `service` (`""`: the whole server); each probe may take `timeout`.
    pub fn new(service: impl Into<String>, timeout: Duration) -> Self {
        let service = service.into();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        let message = HealthCheckRequest {
            service: service.clone(),
        }
        .encode_to_vec();
        Self {
            client,
            request: frame(&message),
            service: service.into(),
            timeout,
        }
    }

    /// The service name checked.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The time one probe may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// One gRPC length-prefixed message: no compression, 4-byte big-endian length.
fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message);
    buf.freeze()
}

/// The `grpc-status` of `headers` (`None` when absent), with its `grpc-message`.
fn grpc_status(headers: &HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?;
    let code = code.to_str().ok()?.trim().parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((code, message))
}

/// The outcome of a finished call: the reply's serving status, or why there is none.
fn outcome(mut data: Bytes, trailers: Option<&HeaderMap>) -> Result<i32, String> {
    match trailers.and_then(grpc_status) {
        Some((0, _)) => {}
        Some((code, message)) => return Err(format!("grpc-status {code}: {message}")),
        None => return Err("no grpc-status".into()),
    }
    if data.len() < 5 || data[0] != 0 {
        return Err("no reply message".into());
    }
    data.advance(1);
    let len = data.get_u32() as usize;
    if data.len() < len {
        return Err("truncated reply".into());
    }
    HealthCheckResponse::decode(data.slice(..len))
        .map(|r| r.status)
        .map_err(|_| "malformed reply".into())
}

impl Probe for GrpcHealthProbe {
    fn probe(&self, target: &str) -> ProbeFuture {
        let url = format!("{}{GRPC_HEALTH_CHECK_PATH}", target.trim_end_matches('/'));
        let client = self.client.clone();
        let body = self.request.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let start = Instant::now();
            let Ok(uri) = url.parse::<Uri>() else {
                return ProbeResult::unhealthy(start.elapsed(), "invalid url");
            };
            let req = Request::post(uri)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                )
                .header(header::TE, HeaderValue::from_static("trailers"))
                .body(Full::new(body));
            let Ok(req) = req else {
                return ProbeResult::unhealthy(start.elapsed(), "invalid request");
            };
            let call = async {
                let resp = client.request(req).await.map_err(|e| {
                    if e.is_connect() {
                        "connect error".to_owned()
                    } else {
                        "transport error".to_owned()
                    }
                })?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP {}", resp.status()));
                }
                // Trailers-only: the call failed before any reply.
                if let Some((code, message)) = grpc_status(resp.headers()) {
                    if code != 0 {
                        return Err(format!("grpc-status {code}: {message}"));
                    }
                }
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|_| "transport error".to_owned())?;
                let trailers = collected.trailers().cloned();
                outcome(collected.to_bytes(), trailers.as_ref())
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(SERVING)) => ProbeResult::healthy(start.elapsed(), "SERVING"),
                Ok(Ok(status)) => {
                    ProbeResult::unhealthy(start.elapsed(), serving_status_name(status))
                }
                Ok(Err(why)) => ProbeResult::unhealthy(start.elapsed(), why),
                Err(_) => ProbeResult::unhealthy(start.elapsed(), "timeout"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t
    }

    #[test]
    fn decodes_the_reply() {
        let reply = HealthCheckResponse { status: 2 }.encode_to_vec();
        assert_eq!(outcome(frame(&reply), Some(&ok_trailers())), Ok(2));
        let serving = HealthCheckResponse { status: SERVING }.encode_to_vec();
        assert_eq!(outcome(frame(&serving), Some(&ok_trailers())), Ok(1));
        // proto3 leaves a zero field out: an empty message is UNKNOWN.
        assert_eq!(outcome(frame(&[]), Some(&ok_trailers())), Ok(0));
    }

    #[test]
    fn a_failed_call_or_a_broken_reply_is_an_error() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("5"));
        t.insert("grpc-message", HeaderValue::from_static("unknown service"));
        let e = outcome(Bytes::new(), Some(&t)).unwrap_err();
        assert!(
            e.contains("grpc-status 5") && e.contains("unknown service"),
            "{e}"
        );
        assert!(outcome(Bytes::new(), None).is_err());
        assert!(outcome(Bytes::from_static(b"\0\0\0"), Some(&ok_trailers())).is_err());
        assert!(outcome(
            Bytes::from_static(b"\0\0\0\0\x09\x08"),
            Some(&ok_trailers())
        )
        .is_err());
    }

    #[test]
    fn the_request_is_one_framed_message() {
        let p = GrpcHealthProbe::new("pkg.Svc", Duration::from_secs(1));
        assert_eq!(&p.request[..5], &[0, 0, 0, 0, 9]);
        let decoded = HealthCheckRequest::decode(&p.request[5..]).unwrap();
        assert_eq!(decoded.service, "pkg.Svc");
        assert_eq!(p.service(), "pkg.Svc");
    }
}
