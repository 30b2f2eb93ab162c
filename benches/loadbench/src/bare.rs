//! The `hyper-bare` target: the smallest correct reverse proxy on the hyper stack, to tell
//! what hyper and tokio cost from what Portcullis adds.
//!
//! A tokio multi-thread runtime (`--threads` workers), hyper's HTTP/1 server on one
//! listener, and one pooled `hyper-util` legacy client to the backends, chosen round robin.
//! It does what a correct proxy must and nothing more: the absolute upstream URI, the
//! request and response bodies streamed through as hyper's own body type (never boxed),
//! hop-by-hop headers removed both ways, `X-Forwarded-For`/`-Proto`/`-Host` added, and 502
//! on an upstream error. No timeouts beyond the client's connect timeout, no health checks,
//! no metrics.
//!
//! It runs as `portcullis-loadbench hyper-bare --port P --backends P1,P2` (a process of its
//! own, so its CPU is measured apart) and exits when its stdin closes or on a signal.

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

type ResBody = Either<Incoming, Empty<Bytes>>;

/// Serves the proxy on 127.0.0.1:`port` until stdin closes or a signal arrives.
pub(crate) fn run(port: u16, backends: Vec<u16>, threads: usize) -> ExitCode {
    if backends.is_empty() {
        eprintln!("hyper-bare: no backends");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper-bare: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("hyper-bare: cannot bind 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(512)
            .build(connector);
        let proxy = Arc::new(Bare {
            client,
            backends: backends.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            next: AtomicUsize::new(0),
        });
        tokio::spawn(accept_loop(listener, proxy));
        crate::backend::until_stdin_closes_or_signal().await;
        std::process::exit(0)
    })
}

struct Bare {
    client: Client<HttpConnector, Incoming>,
    backends: Vec<String>,
    next: AtomicUsize,
}

async fn accept_loop(listener: TcpListener, proxy: Arc<Bare>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { Ok::<_, std::convert::Infallible>(proxy.forward(req, peer).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Bare {
    async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ResBody> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len();
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let Ok(uri) = format!("http://{}{pq}", self.backends[i]).parse::<Uri>() else {
            return status(StatusCode::BAD_REQUEST);
        };
        parts.uri = uri;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some(host) = headers.remove(header::HOST) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
            headers.append(HeaderName::from_static("x-forwarded-for"), v);
        }
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(_) => status(StatusCode::BAD_GATEWAY),
        }
    }
}

fn status(code: StatusCode) -> Response<ResBody> {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = code;
    r
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.remove(header::CONNECTION) {
        if let Ok(conn) = conn.to_str() {
            for name in conn.split(',') {
                if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    headers.remove(n);
                }
            }
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
