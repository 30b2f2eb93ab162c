//! The example gateway binary (`target/debug/examples/gateway`, built by `cargo test`) as a
//! child process: a YAML config on a free 127.0.0.1 port in its own temporary directory, its
//! stdout and stderr in a log file there, readiness polled on `GET /readyz`, and SIGKILL (by
//! PID) when dropped.

use super::gateway_binary;
use super::temp_dir::TempDir;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a gateway process may take to answer `/readyz` 200 after it is spawned.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// A free 127.0.0.1 port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// One `gateway --config FILE` process; killed (SIGKILL, by PID) when dropped, then its
/// temporary directory removed.
pub struct GatewayProcess {
    name: String,
    yaml: String,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    launches: u32,
    env: Vec<(String, String)>,
}

impl GatewayProcess {
    /// Spawns the binary with `yaml` (every field but `listen`, which the process gets on a
    /// free port); does not wait for it to be ready.
    pub fn spawn(name: &str, yaml: &str) -> Self {
        Self::spawn_with_env(name, yaml, &[])
    }

    /// [`spawn`](Self::spawn) with these environment variables set for the process.
    pub fn spawn_with_env(name: &str, yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(&format!("gw-{name}"));
        let mut p = Self {
            name: name.to_owned(),
            yaml: yaml.to_owned(),
            dir,
            port: 0,
            child: None,
            launches: 0,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        p.launch();
        p
    }

    /// [`start`](Self::start) with these environment variables set for the process.
    pub async fn start_with_env(name: &str, yaml: &str, env: &[(&str, &str)]) -> Self {
        let mut p = Self::spawn_with_env(name, yaml, env);
        p.wait_ready().await;
        p
    }

    /// Spawns the binary and waits until it is ready (see [`wait_ready`](Self::wait_ready)).
    pub async fn start(name: &str, yaml: &str) -> Self {
        let mut p = Self::spawn(name, yaml);
        p.wait_ready().await;
        p
    }

    fn launch(&mut self) {
        self.port = free_port();
        self.launches += 1;
        let config = self.dir.path().join("gw.yml");
        std::fs::write(
            &config,
            format!("listen: 127.0.0.1:{}\n{}", self.port, self.yaml),
        )
        .expect("write the gateway config");
        // The binary logs with tracing's default writer (stdout); keep both streams.
        let log = File::create(self.log_path()).expect("create the gateway log");
        let log2 = log.try_clone().expect("clone the log file handle");
        let child = Command::new(gateway_binary())
            .arg("--config")
            .arg(&config)
            // `GW_LOG` sets the gateways' log filter (e.g. `info,portcullis_redis=debug`).
            .env(
                "RUST_LOG",
                std::env::var("GW_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn the gateway binary");
        self.child = Some(child);
    }

    /// The config file the process reads (and re-reads on a reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gw.yml")
    }

    /// Replaces the config file with `yaml` (every field but `listen`, which stays), for
    /// the next reload.
    pub fn rewrite_config(&self, yaml: &str) {
        let text = format!("listen: 127.0.0.1:{}\n{yaml}", self.port);
        // Written next to it, then renamed: a reload never reads half a file.
        let tmp = self.dir.path().join("gw.yml.new");
        std::fs::write(&tmp, text).expect("write the new gateway config");
        std::fs::rename(&tmp, self.config_path()).expect("replace the gateway config");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gw.log")
    }

    /// Its name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 (within [`READY_LIMIT`]). Spawns the process again
    /// on a fresh port when it lost the race for its port; panics with its log when it exits
    /// or takes too long.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let child = self.child.as_mut().expect("the process runs");
            if let Some(status) = child.try_wait().expect("poll the gateway process") {
                let log = self.log();
                if log.contains("cannot listen on") && self.launches < 3 {
                    self.launch();
                    continue;
                }
                panic!(
                    "gateway {} exited ({status}) before it was ready:\n{log}",
                    self.name
                );
            }
            if ready(&self.addr()).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} not ready after {READY_LIMIT:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /balancer/stats` (no credentials), within 5 s.
    pub async fn stats(&self) -> serde_json::Value {
        let (status, body) = get_close(&self.addr(), "/balancer/stats")
            .await
            .unwrap_or_else(|| panic!("{}: no answer to GET /balancer/stats", self.name));
        assert_eq!(status, 200, "{}: stats {body}", self.name);
        serde_json::from_str(&body).expect("stats are JSON")
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL by PID, then reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /readyz` answers 200 (on a fresh connection the gateway closes after answering, so
/// it holds no `max_connections` slot afterwards).
pub async fn ready(addr: &str) -> bool {
    matches!(get_close(addr, "/readyz").await, Some((200, _)))
}

/// `GET <path>` with `Connection: close` on a fresh connection: the status and the body,
/// read to the close, within 5 s.
async fn get_close(addr: &str, path: &str) -> Option<(u16, String)> {
    let attempt = async {
        let mut c = TcpStream::connect(addr).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(head.as_bytes()).await.ok()?;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.ok()?;
        let text = String::from_utf8_lossy(&got).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}
