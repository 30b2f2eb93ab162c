//! The `--smoke` mode shared by the examples: each serves one request to itself through the
//! library's own [`UpstreamClient`] and exits 0 when the answer is the expected one
//! (`.ci/run` runs them so).

// Each example uses a part of it.
#![allow(dead_code)]

use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use portcullis::prelude::*;
use tower::ServiceExt;

/// `true` when the example was started with `--smoke`.
pub(crate) fn enabled() -> bool {
    std::env::args().any(|a| a == "--smoke")
}

/// The address to listen on: an ephemeral port in smoke mode, `port` otherwise.
pub(crate) fn listen_addr(port: u16) -> String {
    if enabled() {
        "127.0.0.1:0".into()
    } else {
        format!("127.0.0.1:{port}")
    }
}

/// Sends `method path` to `base` (`http://host:port`); the status and body.
pub(crate) async fn send(base: &str, method: Method, path: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("a valid request");
    let client = UpstreamClient::new();
    let Ok(resp) = client.oneshot((base.to_owned(), req)).await;
    let status = resp.status();
    let body = match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("<body error: {e}>"),
    };
    (status, body)
}

/// Exits 0 when `ok`, else prints `what` and exits 1.
pub(crate) fn finish(ok: bool, what: &str) -> ! {
    if ok {
        println!("smoke: ok ({what})");
        std::process::exit(0);
    }
    eprintln!("smoke: FAILED ({what})");
    std::process::exit(1);
}
