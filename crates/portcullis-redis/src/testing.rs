//! Test support (cargo feature `testing`): private `redis-server` processes.
//!
//! [`RedisServer`] starts a `redis-server` on a free 127.0.0.1 port with no persistence
//! (`--save "" --appendonly no`), waits until it answers PING, and kills it by PID when
//! dropped; [`stop`](RedisServer::stop) and [`start_again`](RedisServer::start_again)
//! restart it on the same port. [`RedisCluster`] starts three `--cluster-enabled yes` nodes
//! and joins them with `redis-cli --cluster create ... --cluster-replicas 0`.
//!
//! When `redis-server` is not installed, the constructors print a `SKIP` line and return
//! `None` (the test then returns early) — except when the environment has `CI=true`, where
//! they panic, so CI never passes by skipping.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `true` when `redis-server` can be run. Otherwise prints a skip line naming `test`, or
/// panics under `CI=true`.
pub fn redis_available(test: &str) -> bool {
    tool_available(test, "redis-server", "--version")
}

/// `true` when `program <arg>` runs and succeeds; otherwise the skip line, or the panic
/// under `CI=true`.
fn tool_available(test: &str, program: &str, arg: &str) -> bool {
    let ok = Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{program} is not installed, and CI=true: {test} must not be skipped");
        }
        eprintln!(
            "SKIP {test}: {program} is not installed \
             (scripts/test installs it and runs every test)"
        );
    }
    ok
}

/// Runs `cmd` to completion; panics, with its output, unless it succeeded.
fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port(with_bus: bool) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if !with_bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// A private `redis-server` on 127.0.0.1, killed (by PID) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    password: Option<String>,
    tls_port: Option<u16>,
}

impl RedisServer {
    /// Starts a server, or returns `None` after printing a skip line (see the module docs).
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments (for example
    /// `["--requirepass", "secret"]`).
    pub fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        if !redis_available(test) {
            return None;
        }
        Some(Self::spawn_new(extra, false))
    }

    fn spawn_new(extra: &[&str], cluster: bool) -> Self {
        let port = free_port(cluster);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-redis-{}-{port}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create redis temp dir");
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|s| s.to_string());
        let mut s = Self {
            port,
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
            password,
            tls_port: None,
        };
        s.start_again();
        s
    }

    /// Starts a server that also serves TLS (`--tls-port`, client certificates required)
    /// and requires `password`. The certificates are made with the `openssl` command in the
    /// server's temporary directory: a CA, a server certificate for `127.0.0.1` and a client
    /// certificate, both signed by the CA. The plain port stays open on 127.0.0.1 for
    /// [`cli`](Self::cli) and the start-up PING. `None` (after a skip line) when
    /// `redis-server` or `openssl` is missing, except under `CI=true`, where it panics.
    pub fn start_tls(test: &str, password: &str) -> Option<(Self, TlsFiles)> {
        if !redis_available(test) || !tool_available(test, "openssl", "version") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "portcullis-redis-tls-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the tls temp dir");
        let files = TlsFiles::generate(&dir);
        let tls_port = free_port(false);
        let port = tls_port.to_string();
        let (ca, cert, key) = (
            files.ca.display().to_string(),
            files.server_cert.display().to_string(),
            files.server_key.display().to_string(),
        );
        let mut server = Self::spawn_new(
            &[
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "yes",
                "--requirepass",
                password,
            ],
            false,
        );
        server.tls_port = Some(tls_port);
        Some((server, files))
    }

    /// `rediss://:<password>@127.0.0.1:<tls port>` of a [`start_tls`](Self::start_tls) server.
    pub fn tls_url(&self) -> Option<String> {
        let port = self.tls_port?;
        Some(match &self.password {
            Some(p) => format!("rediss://:{p}@127.0.0.1:{port}"),
            None => format!("rediss://127.0.0.1:{port}"),
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (with the password when one was set).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `true` while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL by PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the server on the same port, with an empty data set, and waits for PING.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new("redis-server");
            cmd.arg("--port")
                .arg(self.port.to_string())
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args([
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    "--loglevel",
                    "warning",
                ])
                .arg("--dir")
                .arg(&self.dir)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().expect("spawn redis-server");
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port in use?): retry
                }
                if ping(self.port) {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-cli -p <port> <args>` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The number of calls of `command` (lowercase, e.g. `evalsha`) in `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `true` when something on `port` answers `PING` like Redis (`+PONG`, or `-NOAUTH` when a
/// password is required).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => buf.starts_with(b"+PONG") || buf.starts_with(b"-NOAUTH"),
        _ => false,
    }
}

/// The PEM files of a [`RedisServer::start_tls`] server: a self-made CA, the server's
/// certificate and key (for `127.0.0.1`), and a client certificate and key; removed on drop.
#[derive(Debug)]
pub struct TlsFiles {
    dir: PathBuf,
    /// The CA certificate (signs both others).
    pub ca: PathBuf,
    /// The server certificate (subjectAltName IP 127.0.0.1).
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// A client certificate the server accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes the files in a fresh temporary directory (removed on drop), for any test that
    /// needs a private CA (the gateway's TLS tests too). `None` (after a skip line naming
    /// `test`) when `openssl` is missing, except under `CI=true`, where it panics.
    pub fn new(test: &str) -> Option<Self> {
        if !tool_available(test, "openssl", "version") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "portcullis-tls-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the tls temp dir");
        Some(Self::generate(&dir))
    }

    fn generate(dir: &std::path::Path) -> Self {
        let f = |name: &str| dir.join(name);
        let run = |args: &[&str]| {
            run_checked(Command::new("openssl").args(args).current_dir(dir));
        };
        let days = ["-days", "2"];
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=portcullis test CA",
            days[0],
            days[1],
        ]);
        // X.509 v3 certificates (webpki refuses v1): every one gets extensions.
        std::fs::write(
            f("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        std::fs::write(
            f("client.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .expect("write client.ext");
        for who in ["server", "client"] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN=portcullis test {who}"),
            ]);
            let ext = format!("{who}.ext");
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &ext,
                days[0],
                days[1],
            ]);
        }
        Self {
            dir: dir.to_owned(),
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server.key"),
            client_cert: f("client.pem"),
            client_key: f("client.key"),
        }
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local three-node Redis Cluster (no replicas), killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled yes` nodes and creates the cluster, waiting until
    /// every node reports `cluster_state:ok`; `None` after a skip line when `redis-server` is
    /// missing (panics under `CI=true`).
    pub fn start(test: &str) -> Option<Self> {
        if !redis_available(test) {
            return None;
        }
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::spawn_new(
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                    true,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        run_checked(
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { nodes })
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Every node's URL, comma-separated (the `storage.url` form of a Cluster).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
