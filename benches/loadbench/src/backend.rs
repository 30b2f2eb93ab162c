//! The test backends: tiny hyper HTTP/1.1 servers that answer `200 ok` at once (or after a
//! fixed latency), keep-alive on.
//!
//! They run in their own process (`portcullis-loadbench backend`, spawned by the harness) so
//! the proxies' CPU is measured apart from the backends'. The process prints
//! `PORTS <p1> <p2> ...` on stdout once every listener is bound, and exits when its stdin
//! closes (the harness died), on SIGINT or on SIGTERM.
//!
//! `GET /__loadbench/accepted` answers the number of TCP connections all the backends of
//! the process accepted so far (the proxies' upstream connections, counted per run).

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// Runs `count` backends on ephemeral 127.0.0.1 ports until stdin closes or a signal arrives.
pub(crate) fn run(count: usize, latency: Duration, threads: usize) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backend: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut ports = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("backend: cannot bind 127.0.0.1:0: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match listener.local_addr() {
                Ok(a) => ports.push(a.port().to_string()),
                Err(e) => {
                    eprintln!("backend: no local address: {e}");
                    return ExitCode::FAILURE;
                }
            }
            tokio::spawn(accept_loop(listener, latency));
        }
        let mut out = std::io::stdout().lock();
        if writeln!(out, "PORTS {}", ports.join(" ")).is_err() || out.flush().is_err() {
            return ExitCode::FAILURE;
        }
        drop(out);
        until_stdin_closes_or_signal().await;
        // Do not wait for the blocked stdin reader: exit now.
        std::process::exit(0)
    })
}

/// Returns when stdin closes (the harness died), on SIGINT or on SIGTERM.
pub(crate) async fn until_stdin_closes_or_signal() {
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// The path that answers [`ACCEPTED`].
pub(crate) const ACCEPTED_PATH: &str = "/__loadbench/accepted";

/// Connections accepted by every backend of this process.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

pub(crate) async fn accept_loop(listener: TcpListener, latency: Duration) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors or similar: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        ACCEPTED.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                if req.uri().path() == ACCEPTED_PATH {
                    let n = ACCEPTED.load(Ordering::Relaxed).to_string();
                    return Ok(Response::new(Full::new(Bytes::from(n))));
                }
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let mut resp = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_200_with_keep_alive_and_latency() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(accept_loop(listener, Duration::from_millis(30)));
        let (status, took) = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            (crate::http_status(port, "/bench"), t.elapsed())
        })
        .await
        .unwrap();
        server.abort();
        assert_eq!(status, Some(200));
        assert!(
            took >= Duration::from_millis(30),
            "latency not applied: {took:?}"
        );
    }
}
