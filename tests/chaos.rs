//! Chaos soak (hardening issue 13, item 7): the example gateway binary in front of three
//! backend processes under a client load with 20% cancels, while backends are SIGKILLed and
//! restarted, one backend's `/healthz` flaps, and (with Redis storage, two gateway processes
//! sharing the limit) Redis is killed and started again.
//!
//! ```text
//! cargo test --test chaos -- --nocapture
//! PORTCULLIS_CHAOS_SECS=600 cargo test --test chaos -- --nocapture   # the long form
//! ```
//!
//! Each test runs one [`CYCLE`] of chaos under load (about 60 s for both, with start-up), or
//! as many cycles as fit in `PORTCULLIS_CHAOS_SECS` seconds. It asserts:
//! - every request is answered (any HTTP status) or cancelled by its client: none is lost,
//!   neither to a hang past [`REQUEST_LIMIT`] nor to a broken connection without a response;
//! - the backends' true concurrency never exceeds the endpoint's capacity (global, across
//!   both gateways in Redis mode);
//! - afterwards every gateway process reports 0 active and 0 queued requests on the endpoint,
//!   and Redis holds no slot and no queue entry.
//!
//! **The backends** are processes of this test binary itself: [`backend_process`] (an ignored
//! test, started with an env var) serves `/work` and `/healthz` on a fixed port, so a backend
//! can be SIGKILLed and started again on the same address. A `/work` request's work runs in
//! its own task, so it runs for its full duration even when the gateway disconnects (like a
//! model server). Its start and its end are reported to the test's [`Concurrency`] counter
//! over one TCP connection per backend process, and each report waits for the counter's
//! acknowledgement: the count goes up before the work starts and down before the response
//! is sent, so a request is counted only while the gateway holds its admission slot, and the
//! count is exact across processes. A backend about to be SIGKILLed is first frozen: its
//! running requests are taken off the count and it gets no more acknowledgements, so none of
//! its requests can finish (and free a slot) before the kill.

mod support;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use portcullis_redis::testing::RedisServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::gateway_process::{free_port, GatewayProcess};
use support::temp_dir::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Seconds of load per test without `PORTCULLIS_CHAOS_SECS`.
const DEFAULT_SECS: u64 = 24;
/// The env var of the long form: seconds of load per test.
const SECS_ENV: &str = "PORTCULLIS_CHAOS_SECS";
/// The chaos events (two backend kills, a health flap, a Redis restart) repeat this often.
const CYCLE: Duration = Duration::from_secs(24);
/// The capacity of the watched endpoint `/work`.
const CAPACITY: usize = 4;
/// Backend processes behind every gateway.
const BACKENDS: usize = 3;
/// Concurrent clients, spread over the gateways.
const CLIENTS: usize = 12;
/// Requests per client at most (the load is bounded by time and by count).
const MAX_REQUESTS_PER_CLIENT: usize = 20_000;
/// The share of requests the client cancels (drops after a short random delay).
const CANCEL_SHARE: f64 = 0.2;
/// A request not cancelled and not answered within this is lost.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// The milliseconds of work of one request at the backend (random in this range).
const WORK_MS: std::ops::RangeInclusive<u64> = 20..=250;
/// A cancelled request is dropped after this many milliseconds (random in this range).
const CANCEL_AFTER_MS: std::ops::RangeInclusive<u64> = 5..=300;
/// How long a SIGKILLed backend stays down, and how long the flapping one fails `/healthz`.
const BACKEND_DOWN: Duration = Duration::from_millis(1500);
const FLAP_DOWN: Duration = Duration::from_millis(2500);
/// How long Redis stays down.
const REDIS_DOWN: Duration = Duration::from_secs(2);
/// How long the gateways get to settle after the load (hold-mode requests finish, slots and
/// queue entries are given back).
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// The header that tells the backend how long to work.
const WORK_HEADER: &str = "x-work-ms";
/// The env var that turns this binary into a backend process: `name;listen;counter;down file`.
const BACKEND_ENV: &str = "PORTCULLIS_CHAOS_BACKEND";
/// A backend's report waits this long for the counter's acknowledgement at most.
const ACK_LIMIT: Duration = Duration::from_secs(30);
/// Redis keys of `/work` (default `key_prefix`): slot holders and the cross-process queue.
const HOLDERS_KEY: &str = "{portcullis:/work}:holders";
const QUEUE_KEY: &str = "{portcullis:/work}:queue";

/// The tests measure concurrency on a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// The backend process
// ---------------------------------------------------------------------------------------

/// The entry of a backend process (see the module docs); started by [`BackendProcess`] with
/// [`BACKEND_ENV`] set. Without it, it returns at once: it is not a test.
#[test]
#[ignore = "the backend process of the chaos tests, started by them"]
fn backend_process() {
    let Ok(spec) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(';').collect();
    let [name, listen, counter, down_file] = parts[..] else {
        panic!("{BACKEND_ENV}={spec}: want name;listen;counter;down file");
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(serve_backend(
            name,
            listen.parse().expect("listen address"),
            counter.parse().expect("counter address"),
            PathBuf::from(down_file),
        ));
}

/// A backend process's side of the counter link.
struct Reporter {
    lines: mpsc::Sender<String>,
    acks: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_id: AtomicU64,
}

impl Reporter {
    /// Sends `<kind> <id>` and waits for the counter's `ok <id>`; `None` when none came.
    async fn report(&self, kind: &str, id: u64) -> Option<()> {
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap().insert(id, tx);
        self.lines.send(format!("{kind} {id}\n")).await.ok()?;
        tokio::time::timeout(ACK_LIMIT, rx).await.ok()?.ok()
    }
}

#[derive(Clone)]
struct BackendState {
    reporter: Arc<Reporter>,
    down_file: Arc<PathBuf>,
}

async fn serve_backend(name: &str, listen: SocketAddr, counter: SocketAddr, down_file: PathBuf) {
    let link = TcpStream::connect(counter)
        .await
        .expect("connect the counter");
    let (rd, mut wr) = link.into_split();
    wr.write_all(format!("hello {name}\n").as_bytes())
        .await
        .expect("greet the counter");
    let (lines, mut outbox) = mpsc::channel::<String>(1024);
    let reporter = Arc::new(Reporter {
        lines,
        acks: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
    });
    // The process lives as long as its link to the test: when the test is gone, so is it.
    tokio::spawn(async move {
        while let Some(line) = outbox.recv().await {
            if wr.write_all(line.as_bytes()).await.is_err() {
                std::process::exit(0);
            }
        }
    });
    let acks = reporter.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let id = line
                .strip_prefix("ok ")
                .and_then(|id| id.parse::<u64>().ok());
            let waiter = id.and_then(|id| acks.acks.lock().unwrap().remove(&id));
            if let Some(waiter) = waiter {
                let _ = waiter.send(());
            }
        }
        std::process::exit(0);
    });
    // The port of a SIGKILLed predecessor is free at once, but retry a moment anyway.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) if Instant::now() >= deadline => panic!("backend {name}: bind {listen}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let state = BackendState {
        reporter,
        down_file: Arc::new(down_file),
    };
    let app = Router::new()
        .route("/work", post(work))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app).await.expect("serve the backend");
}

async fn work(State(s): State<BackendState>, headers: HeaderMap) -> (StatusCode, &'static str) {
    let ms = headers
        .get(WORK_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100);
    let reporter = s.reporter.clone();
    // Its own task: the work goes on when the gateway disconnects.
    let job = tokio::spawn(async move {
        let id = reporter.next_id.fetch_add(1, Ordering::SeqCst);
        reporter.report("start", id).await?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        reporter.report("end", id).await
    });
    match job.await {
        Ok(Some(())) => (StatusCode::OK, "done"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "not acknowledged"),
    }
}

/// 503 while the test's down file exists (the health flap), 200 otherwise.
async fn healthz(State(s): State<BackendState>) -> StatusCode {
    if s.down_file.exists() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

// ---------------------------------------------------------------------------------------
// The counter (in the test process)
// ---------------------------------------------------------------------------------------

/// The backends' true concurrency, over every backend process.
#[derive(Debug, Default)]
struct Concurrency {
    current: AtomicUsize,
    max: AtomicUsize,
    started: AtomicUsize,
    links: Mutex<Vec<Arc<Mutex<Link>>>>,
}

/// One backend process's link.
#[derive(Debug)]
struct Link {
    name: String,
    /// Requests started and not ended.
    running: HashSet<u64>,
    /// About to be SIGKILLed: not counted, not acknowledged.
    frozen: bool,
}

impl Concurrency {
    fn start(&self) {
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self, n: usize) {
        self.current.fetch_sub(n, Ordering::SeqCst);
    }

    /// Takes the running requests of `name`'s link off the count and stops acknowledging it.
    fn freeze(&self, name: &str) {
        for link in self.links.lock().unwrap().iter() {
            let mut l = link.lock().unwrap();
            if l.name == name && !l.frozen {
                l.frozen = true;
                self.end(l.running.len());
                l.running.clear();
            }
        }
    }
}

/// The counter's listener; its tasks stop when it drops.
struct Counter {
    addr: SocketAddr,
    state: Arc<Concurrency>,
    task: JoinHandle<()>,
}

impl Counter {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Concurrency::default());
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                // The links' tasks live in the set, and stop with this task.
                let mut links = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    links.spawn(serve_link(state.clone(), stream));
                    while links.try_join_next().is_some() {}
                }
            }
        });
        Self { addr, state, task }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_link(state: Arc<Concurrency>, stream: TcpStream) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let Ok(Some(hello)) = lines.next_line().await else {
        return;
    };
    let link = Arc::new(Mutex::new(Link {
        name: hello.strip_prefix("hello ").unwrap_or(&hello).to_owned(),
        running: HashSet::new(),
        frozen: false,
    }));
    state.links.lock().unwrap().push(link.clone());
    while let Ok(Some(line)) = lines.next_line().await {
        let Some((kind, id)) = line.split_once(' ') else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        let ack = {
            let mut l = link.lock().unwrap();
            if !l.frozen {
                match kind {
                    "start" if l.running.insert(id) => state.start(),
                    "end" if l.running.remove(&id) => state.end(1),
                    _ => {}
                }
            }
            !l.frozen
        };
        if ack && wr.write_all(format!("ok {id}\n").as_bytes()).await.is_err() {
            break;
        }
    }
    // The process is gone: its running requests ended with it.
    let mut l = link.lock().unwrap();
    if !l.frozen {
        state.end(l.running.len());
        l.running.clear();
    }
}

// ---------------------------------------------------------------------------------------
// Backend processes, seen from the test
// ---------------------------------------------------------------------------------------

/// A backend process on a fixed port; SIGKILLed (by PID) when dropped.
struct BackendProcess {
    name: String,
    port: u16,
    counter: SocketAddr,
    down_file: PathBuf,
    child: Option<Child>,
}

impl BackendProcess {
    fn spawn(name: &str, counter: SocketAddr, dir: &Path) -> Self {
        let mut b = Self {
            name: name.to_owned(),
            port: free_port(),
            counter,
            down_file: dir.join(format!("{name}.down")),
            child: None,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let spec = format!(
            "{};127.0.0.1:{};{};{}",
            self.name,
            self.port,
            self.counter,
            self.down_file.display()
        );
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["backend_process", "--exact", "--ignored", "--nocapture"])
            .env(BACKEND_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a backend process");
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freezes its link (see the module docs), then SIGKILL by PID and reap.
    fn kill(&mut self, counter: &Concurrency) {
        counter.freeze(&self.name);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn set_healthy(&self, healthy: bool) {
        if healthy {
            let _ = std::fs::remove_file(&self.down_file);
        } else {
            std::fs::write(&self.down_file, b"down").expect("write the down file");
        }
    }

    /// Waits until it accepts connections.
    async fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "backend {} never up", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client load
// ---------------------------------------------------------------------------------------

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    /// A response head arrived; `truncated` when its body then broke off.
    Answered { status: u16, truncated: bool },
    /// The client dropped it (its choice, before any answer).
    Cancelled,
    /// Not cancelled, and no response: a broken connection or a hang.
    Lost(String),
}

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// `POST url` asking for `work_ms` of work; the status and whether the body was cut off.
async fn send(client: &HttpClient, url: &str, work_ms: u64) -> Result<(u16, bool), String> {
    let req = Request::post(url)
        .header(WORK_HEADER, work_ms.to_string())
        .body(Body::empty())
        .expect("a valid request");
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let truncated = resp.into_body().collect().await.is_err();
    Ok((status, truncated))
}

/// One client: requests one after another to its gateway until `until` (or its count), a
/// [`CANCEL_SHARE`] of them dropped after a short random delay.
async fn client_loop(url: String, until: Instant, seed: u64) -> Vec<Outcome> {
    let client = support::client();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes = Vec::new();
    while Instant::now() < until && outcomes.len() < MAX_REQUESTS_PER_CLIENT {
        let work_ms = rng.random_range(WORK_MS);
        let request = send(&client, &url, work_ms);
        let outcome = if rng.random_bool(CANCEL_SHARE) {
            let after = Duration::from_millis(rng.random_range(CANCEL_AFTER_MS));
            match tokio::time::timeout(after, request).await {
                Err(_) => Outcome::Cancelled,
                Ok(r) => answered(r),
            }
        } else {
            match tokio::time::timeout(REQUEST_LIMIT, request).await {
                Err(_) => Outcome::Lost(format!("no answer within {REQUEST_LIMIT:?}")),
                Ok(r) => answered(r),
            }
        };
        if !matches!(
            outcome,
            Outcome::Answered { status: 200, .. } | Outcome::Cancelled
        ) {
            // A fast refusal: do not spin on two cores.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        outcomes.push(outcome);
    }
    outcomes
}

fn answered(r: Result<(u16, bool), String>) -> Outcome {
    match r {
        Ok((status, truncated)) => Outcome::Answered { status, truncated },
        Err(e) => Outcome::Lost(e),
    }
}

/// The figures of a run.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    by_status: BTreeMap<u16, usize>,
    truncated: usize,
    cancelled: usize,
    lost: Vec<String>,
}

impl Tally {
    fn new(outcomes: &[Outcome]) -> Self {
        let mut t = Self {
            requests: outcomes.len(),
            ..Self::default()
        };
        for o in outcomes {
            match o {
                Outcome::Answered { status, truncated } => {
                    *t.by_status.entry(*status).or_default() += 1;
                    t.truncated += usize::from(*truncated);
                }
                Outcome::Cancelled => t.cancelled += 1,
                Outcome::Lost(why) => t.lost.push(why.clone()),
            }
        }
        t
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Cycles of load per test: [`SECS_ENV`] (or [`DEFAULT_SECS`]) seconds in whole [`CYCLE`]s,
/// at least one.
fn cycles() -> u32 {
    let secs = std::env::var(SECS_ENV)
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{SECS_ENV}={v}: want whole seconds"))
        })
        .unwrap_or(DEFAULT_SECS);
    u32::try_from(secs / CYCLE.as_secs())
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The gateway config (without `listen`) over `backends` with `storage`. `on_client_cancel:
/// hold` (the default, spelled out) keeps a cancelled client's upstream request and its slot
/// until the backend answers; with `release` the backends run more than `capacity`.
fn gateway_yaml(backends: &[BackendProcess], storage: &str) -> String {
    let upstreams: String = backends
        .iter()
        .map(|b| format!("  - {{url: \"{}\"}}\n", b.url()))
        .collect();
    format!(
        "workers: 2\n\
         upstream_timeout: 10\n\
         connect_timeout: 1\n\
         drain_timeout: 1\n\
         storage: {storage}\n\
         upstreams:\n{upstreams}\
         routing_strategy: p2c\n\
         health_endpoint: /healthz\n\
         health_check_interval: 0.25\n\
         health_check_timeout: 0.5\n\
         failure_threshold: 2\n\
         recovery_threshold: 2\n\
         eject_after: 3\n\
         eject_for: 1\n\
         eject_max: 4\n\
         queue_timeout: 5\n\
         on_client_cancel: hold\n\
         endpoints:\n  /work: {{method: POST, capacity: {CAPACITY}}}\n"
    )
}

/// The numbers of `endpoints["/work"]` in a gateway's stats that must return to 0.
const SETTLING_FIELDS: [&str; 3] = ["active_requests", "queue_depth", "local_active"];

/// What is still held after the load: per gateway the non-zero settling fields, and Redis's
/// slot holders and queue entries.
async fn leftovers(gateways: &[GatewayProcess], redis: Option<&RedisServer>) -> Vec<String> {
    let mut held = Vec::new();
    for g in gateways {
        let stats = g.stats().await;
        let work = &stats["endpoints"]["/work"];
        for field in SETTLING_FIELDS {
            // `local_active` exists only in newer stats; the others always.
            match work[field].as_u64() {
                Some(0) => {}
                Some(n) => held.push(format!("{} {field} {n}", g.name())),
                None if field == "local_active" => {}
                None => held.push(format!("{} has no {field}: {work}", g.name())),
            }
        }
    }
    if let Some(redis) = redis {
        let (holders, queued) = tokio::task::block_in_place(|| {
            let holders: u64 = redis
                .cli(&["HVALS", HOLDERS_KEY])
                .lines()
                .filter_map(|l| l.trim().parse::<u64>().ok())
                .sum();
            let queued: u64 = redis.cli(&["ZCARD", QUEUE_KEY]).trim().parse().unwrap_or(0);
            (holders, queued)
        });
        if holders > 0 {
            held.push(format!("redis holders {holders}"));
        }
        if queued > 0 {
            held.push(format!("redis queue {queued}"));
        }
    }
    held
}

/// Runs the soak: `gateways` processes (with Redis storage when `redis` is given) over
/// three backend processes, the load, and the chaos events; then the assertions.
async fn soak(test: &str, gateways: usize, mut redis: Option<RedisServer>) {
    let _serial = SERIAL.lock().await;
    let cycles = cycles();
    let duration = CYCLE * cycles;
    let bound = duration + Duration::from_secs(120);
    tokio::time::timeout(bound, async {
        let dir = TempDir::new(&format!("chaos-{test}"));
        let counter = Counter::start().await;
        let mut backends: Vec<BackendProcess> = (0..BACKENDS)
            .map(|i| BackendProcess::spawn(&format!("b{i}"), counter.addr, dir.path()))
            .collect();
        for b in &backends {
            b.wait_up().await;
        }
        let storage = match &redis {
            Some(r) => format!(
                "{{type: redis, url: \"{}\", lease_ttl: 3, expected_workers: {gateways}, \
                 timeout: 1, ping_interval: 0.5}}",
                r.url()
            ),
            None => "{type: memory}".to_owned(),
        };
        let yaml = gateway_yaml(&backends, &storage);
        let mut procs = Vec::new();
        for i in 0..gateways {
            procs.push(GatewayProcess::spawn(&format!("{test}-gw{i}"), &yaml));
        }
        for g in &mut procs {
            g.wait_ready().await;
        }

        let seed = rand::random::<u64>();
        let started = Instant::now();
        let until = started + duration;
        let clients: Vec<JoinHandle<Vec<Outcome>>> = (0..CLIENTS)
            .map(|i| {
                let url = procs[i % procs.len()].url("/work");
                tokio::spawn(client_loop(url, until, seed.wrapping_add(i as u64)))
            })
            .collect();

        // The chaos: every cycle kills two backends, flaps the third, and restarts Redis.
        let mut events = Vec::new();
        for cycle in 0..cycles {
            let at = |share: f64| started + CYCLE * cycle + CYCLE.mul_f64(share);
            let c = cycle as usize;
            let (kill1, flap, kill2) = (c % BACKENDS, (c + 1) % BACKENDS, (c + 2) % BACKENDS);
            tokio::time::sleep_until(at(0.15).into()).await;
            backends[kill1].kill(&counter.state);
            tokio::time::sleep(BACKEND_DOWN).await;
            backends[kill1].launch();
            events.push(format!("SIGKILL + restart {}", backends[kill1].name));

            tokio::time::sleep_until(at(0.35).into()).await;
            backends[flap].set_healthy(false);
            tokio::time::sleep(FLAP_DOWN).await;
            backends[flap].set_healthy(true);
            events.push(format!("health flap {}", backends[flap].name));

            tokio::time::sleep_until(at(0.55).into()).await;
            backends[kill2].kill(&counter.state);
            tokio::time::sleep(BACKEND_DOWN).await;
            backends[kill2].launch();
            events.push(format!("SIGKILL + restart {}", backends[kill2].name));

            if let Some(r) = redis.as_mut() {
                tokio::time::sleep_until(at(0.75).into()).await;
                tokio::task::block_in_place(|| r.stop());
                tokio::time::sleep(REDIS_DOWN).await;
                tokio::task::block_in_place(|| r.start_again());
                events.push("redis SIGKILL + restart".to_owned());
            }
        }

        let mut outcomes = Vec::new();
        for c in clients {
            outcomes.extend(c.await.expect("a client task panicked"));
        }
        let load_secs = started.elapsed().as_secs_f64();

        // Settle: the held (cancelled) requests finish, and every slot is given back.
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut leaked = leftovers(&procs, redis.as_ref()).await;
        while !leaked.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            leaked = leftovers(&procs, redis.as_ref()).await;
        }
        let backend_running = counter.state.current.load(Ordering::SeqCst);

        let tally = Tally::new(&outcomes);
        let max = counter.state.max.load(Ordering::SeqCst);
        println!(
            "chaos {test}: {} gateway(s), capacity {CAPACITY}, {CLIENTS} clients, {load_secs:.1} s \
             (seed {seed})\n  events: {events:?}\n  requests {}, answered by status {:?} \
             (bodies cut off {}), cancelled {}, lost {}\n  backend work started {}, max \
             concurrency {max}, still running after the settle {backend_running}\n  leaked \
             (active or queued after the settle, in the gateways and in Redis) {}",
            procs.len(),
            tally.requests,
            tally.by_status,
            tally.truncated,
            tally.cancelled,
            tally.lost.len(),
            counter.state.started.load(Ordering::SeqCst),
            if leaked.is_empty() {
                "0".to_owned()
            } else {
                leaked.join(", ")
            },
        );
        for g in &procs {
            let stats = g.stats().await;
            let work = &stats["endpoints"]["/work"];
            let fields = [
                "admitted",
                "rejected_503",
                "timed_out_504",
                "cancelled",
                "active_requests",
                "local_active",
                "queue_depth",
            ];
            let figures: Vec<String> = fields
                .iter()
                .filter(|f| !work[**f].is_null())
                .map(|f| format!("{f} {}", work[*f]))
                .collect();
            println!("  {}: /work {}", g.name(), figures.join(", "));
        }

        assert!(
            tally.lost.is_empty(),
            "{} requests lost, first: {:?}",
            tally.lost.len(),
            &tally.lost[..tally.lost.len().min(5)]
        );
        assert!(
            max <= CAPACITY,
            "the backends ran {max} requests at once (capacity {CAPACITY})"
        );
        assert!(leaked.is_empty(), "held after the load: {leaked:?}");
        assert_eq!(backend_running, 0, "backend work still running");
        // The run did what it says: load was served, and the clients did cancel.
        assert!(
            tally.by_status.get(&200).copied().unwrap_or(0) > 50,
            "few requests served: {:?}",
            tally.by_status
        );
        assert!(tally.cancelled > 0, "no request was cancelled");
        assert!(
            events.len() >= 3 * cycles as usize,
            "the chaos did not run: {events:?}"
        );
        drop(backends);
    })
    .await
    .unwrap_or_else(|_| panic!("{test} took longer than {bound:?}"));
}

/// One gateway process with memory storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_memory_storage_one_gateway() {
    soak("memory", 1, None).await;
}

/// Two gateway processes sharing the limit through Redis, which is restarted once a cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_storage_two_gateways() {
    let Some(redis) = RedisServer::start("chaos_redis_storage_two_gateways") else {
        return;
    };
    soak("redis", 2, Some(redis)).await;
}
