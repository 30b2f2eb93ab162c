//! Every client connection is bounded (hardening issue 13, item 2), against the real gateway
//! binary (the thread-per-core server) and the in-process `serve_with_limits`:
//! slowloris heads are cut at `client_header_timeout` with a 408 while a normal client is
//! served throughout, idle keep-alive connections close after `client_idle_timeout`, and
//! `max_connections` holds.

mod support;

use axum::routing::get;
use axum::Router;
use portcullis::gateway::server::ConnectionLimits;
use portcullis::gateway::{app::serve_with_limits, Gateway, GatewayConfig};
use std::path::Path;
use std::time::{Duration, Instant};
use support::backend;
use support::gateway_process::GatewayProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn app() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/hello", get(|| async { "hello" }))
}

/// Starts the gateway binary with `extra` YAML lines; returns it (ready) and its address.
async fn start_binary(be: &support::Server, extra: &str) -> (GatewayProcess, String) {
    let yaml = format!(
        "workers: 2\ndrain_timeout: 2\n{extra}upstreams:\n  - {{url: \"{}\"}}\n",
        be.url()
    );
    let proc = GatewayProcess::start("limits", &yaml).await;
    let addr = proc.addr();
    (proc, addr)
}

/// One raw `GET /hello` on `conn`; the bytes of the response head and body (read until the
/// body "hello" arrived, bounded by 2 s).
async fn get_hello(conn: &mut TcpStream) -> Option<String> {
    conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !got.ends_with(b"hello") {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// How a slowloris connection ended.
#[derive(Debug)]
struct Slowloris {
    /// Seconds from its first byte to the gateway's close (`None`: still open at the end).
    closed_after: Option<f64>,
    answer: String,
}

/// Sends a partial head, then one more header line every 200 ms, until the gateway closes
/// the connection or `give_up` passes.
async fn slowloris(addr: String, give_up: Duration) -> Slowloris {
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while start.elapsed() < give_up {
        match tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Slowloris {
                    closed_after: Some(start.elapsed().as_secs_f64()),
                    answer: String::from_utf8_lossy(&answer).into_owned(),
                }
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {
                // A write to a connection the gateway already closed may fail: the read
                // reports that next.
                let _ = conn.write_all(b"X-Trickle: 1\r\n").await;
            }
        }
    }
    Slowloris {
        closed_after: None,
        answer: String::from_utf8_lossy(&answer).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_at_the_header_timeout_while_a_normal_client_is_served() {
    let be = backend(app()).await;
    let (_proc, addr) =
        start_binary(&be, "client_header_timeout: 1\nclient_idle_timeout: 30\n").await;
    let give_up = Duration::from_secs(6);
    let attackers: Vec<_> = (0..50)
        .map(|_| tokio::spawn(slowloris(addr.clone(), give_up)))
        .collect();
    // A silent connection (nothing sent) is closed too, without an answer.
    let silent = tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut conn = TcpStream::connect(&addr).await.unwrap();
            let start = Instant::now();
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(give_up, conn.read(&mut buf)).await;
            (
                start.elapsed().as_secs_f64(),
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            )
        }
    });
    // A normal keep-alive client is served throughout (every 100 ms for 2.5 s).
    let mut normal = TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        let r = get_hello(&mut normal).await;
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "normal client not served: {r:?}"
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 15, "{served}");
    let mut survived = 0;
    let mut answered_408 = 0;
    for a in attackers {
        let r = a.await.unwrap();
        match r.closed_after {
            // Timeout 1 s; the slack covers scheduling on a loaded machine.
            Some(t) if t <= 2.0 => {}
            _ => survived += 1,
        }
        if r.answer.starts_with("HTTP/1.1 408") {
            assert!(
                r.answer.contains(r#""error":"client_timeout""#),
                "{}",
                r.answer
            );
            answered_408 += 1;
        } else {
            assert!(r.answer.is_empty(), "unexpected answer {}", r.answer);
        }
    }
    assert_eq!(
        survived, 0,
        "slowloris connections survived the header timeout"
    );
    // The 408 is best effort (a write racing the close may reset the socket first).
    assert!(answered_408 >= 45, "only {answered_408} of 50 got the 408");
    let (t, closed) = silent.await.unwrap();
    assert!(
        closed && t <= 2.0,
        "silent connection: closed {closed} after {t} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_and_waiting_connections_are_served_as_others_close() {
    let be = backend(app()).await;
    // Per process: the two workers share the 4 slots.
    let (_proc, addr) = start_binary(&be, "max_connections: 4\nclient_idle_timeout: 30\n").await;
    // Let the readiness connections' slots be freed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut first = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        assert!(
            get_hello(&mut c).await.is_some(),
            "one of the first 4 not served"
        );
        first.push(c);
    }
    // Two more: the kernel completes the handshake (backlog), the gateway does not accept.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let addr = addr.clone();
        waiting.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(&addr).await.unwrap();
            let start = Instant::now();
            let r = get_hello(&mut c).await;
            (start.elapsed(), r, c)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for w in &waiting {
        assert!(
            !w.is_finished(),
            "a 5th/6th connection was served at the limit"
        );
    }
    // The 4 served ones still work.
    for c in &mut first {
        assert!(get_hello(c).await.is_some());
    }
    // Two close: the waiting two are accepted and served.
    first.truncate(2);
    for w in waiting {
        let (waited, r, _c) = w.await.unwrap();
        assert!(
            r.is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "not served after slots freed"
        );
        assert!(
            waited >= Duration::from_millis(900),
            "served too early: {waited:?}"
        );
    }
}

/// An in-process gateway with `limits`, on an ephemeral port.
async fn in_process(
    be: &support::Server,
    limits: ConnectionLimits,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{}\"}}\n",
        be.url()
    );
    let config = GatewayConfig::from_yaml(&yaml, Path::new("test.yml")).unwrap();
    let gateway = Gateway::build(config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = gateway.router();
    tokio::spawn(async move {
        let _gateway = gateway;
        let _ = serve_with_limits(
            listener,
            router,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(1),
            limits,
        )
        .await;
    });
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_the_idle_timeout_not_the_header_timeout() {
    let be = backend(app()).await;
    let limits = ConnectionLimits {
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(2000),
        max_connections: 100,
    };
    let (addr, _stop) = in_process(&be, limits).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    // Requests 300 ms apart keep it open well past both timeouts.
    for _ in 0..8 {
        assert!(get_hello(&mut conn).await.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(get_hello(&mut conn).await.is_some());
    let idle_since = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
    let closed_after = idle_since.elapsed();
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    assert!(
        closed_after >= Duration::from_millis(1800) && closed_after <= Duration::from_millis(3000),
        "idle connection closed after {closed_after:?} (idle timeout 2 s, header timeout 0.5 s)"
    );
}
