//! The example gateway binary itself: the thread-per-core server answers on every worker's
//! listener, and SIGTERM drains in-flight requests before a clean exit.

mod support;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{backend, client, gateway_binary};

/// A child process killed on drop unless it exited.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn fetch(url: &str) -> Option<(StatusCode, String)> {
    let resp = client()
        .request(Request::get(url).body(Body::empty()).unwrap())
        .await
        .ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_and_sigterm_drains_in_flight_requests() {
    let be = backend(
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    "finished"
                }),
            )
            .route("/fast", get(|| async { "fast" })),
    )
    .await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("portcullis-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gw.yml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nworkers: 2\ndrain_timeout: 5\nupstreams:\n  - {{url: \"{}\"}}\n",
            be.url()
        ),
    )
    .unwrap();
    let child = Command::new(gateway_binary())
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    loop {
        if let Some((StatusCode::OK, _)) = fetch(&format!("{base}/readyz")).await {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "gateway never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Many fresh connections: the kernel spreads them over both workers' listeners; every
    // one is answered.
    for _ in 0..40 {
        let c = support::client();
        let resp = c
            .request(
                Request::get(format!("{base}/fast"))
                    .header("connection", "close")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    let slow = tokio::spawn({
        let url = format!("{base}/slow");
        async move { fetch(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_signal(proc.0.id(), "TERM");
    assert_eq!(
        slow.await.unwrap(),
        Some((StatusCode::OK, "finished".to_owned())),
        "the in-flight request finished during the drain"
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    // Stopped accepting: the port is closed.
    assert!(fetch(&format!("{base}/fast")).await.is_none());
}

/// Sends `SIG<name>` to our child `pid` with the `kill` command (the workspace forbids
/// `unsafe`, so no `libc::kill`).
fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}
