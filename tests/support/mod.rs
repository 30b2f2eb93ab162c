//! Test support: real axum backends and an in-process gateway on 127.0.0.1 ephemeral ports.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod env_check;
pub mod gateway_process;
pub mod knee;
pub mod temp_dir;

use axum::Router;
use portcullis::gateway::{serve, Gateway, GatewayConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running on 127.0.0.1; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// A server on `addr` run by `task` (aborted when dropped).
    pub fn new(addr: SocketAddr, task: JoinHandle<()>) -> Self {
        Self { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on an ephemeral 127.0.0.1 port.
pub async fn backend(app: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { addr, task }
}

/// A port with nothing listening on it (bound, then closed).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// An in-process gateway built from YAML text.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<std::io::Result<bool>>>,
}

impl TestGateway {
    pub async fn start(yaml: &str) -> Self {
        let config =
            GatewayConfig::from_yaml(yaml, Path::new("test.yml")).expect("valid test config");
        let drain = config.drain_timeout;
        let gateway = Gateway::build(config).await.expect("gateway builds");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let app = gateway.app();
        let task = tokio::spawn(serve(
            listener,
            app,
            async move {
                let _ = rx.await;
            },
            drain,
        ));
        Self {
            addr,
            gateway,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Fires the graceful shutdown; returns the server task.
    pub fn shutdown(&mut self) -> JoinHandle<std::io::Result<bool>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }
}

/// A plain HTTP/1 client for tests.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    axum::body::Body,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

/// The example gateway binary, built by `cargo test` / `cargo nextest run` with the tests.
pub fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "example binary {} not found: build it with `cargo build --example gateway`",
        bin.display()
    );
    bin
}
