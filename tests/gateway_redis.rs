//! Several example-gateway processes sharing one Redis (issues 6 and 7): one global limit
//! per endpoint, slots of a SIGKILLed process reclaimed within `lease_ttl`, a Redis restart
//! under load, and `probe_on_startup` probing once across processes.
//!
//! ```text
//! cargo test --test gateway_redis
//! ```
//!
//! Every test starts its own private `redis-server` (skipped with a `SKIP` line when it is not
//! installed, failed under `CI=true`), one axum backend inside the test process, and the
//! `gateway` example binary as separate processes, each with its own config file and port.
//! Only 127.0.0.1 is used. Every child process is killed by PID when its guard drops, so a
//! failing assertion leaves nothing behind. The tests run one at a time (they measure
//! concurrency and latency, and the machine may have two cores), each bounded by
//! [`TEST_LIMIT`].

mod support;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::{any, get};
use axum::Router;
use http_body_util::BodyExt;
use portcullis_redis::testing::RedisServer;
use portcullis_testkit::eventually_async;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::gateway_process::GatewayProcess;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every test body is bounded by this.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// How long a gateway process may take to answer `/readyz` 200 after it is spawned.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// The latency of one ordinary `/work` request at the backend.
const WORK_DELAY: Duration = Duration::from_millis(50);
/// Requests with this header wait at the backend until the test releases them.
const HOLD_HEADER: &str = "x-test-hold";
/// The upper bound of a held request.
const HOLD_LIMIT: Duration = Duration::from_secs(30);
/// The capacity of `/work` in the fixed-capacity tests.
const CAPACITY: usize = 8;
/// Redis key of the slot holders of `/work` (default `key_prefix`).
const HOLDERS_KEY: &str = "{portcullis:/work}:holders";
/// Redis key of the stored capacity of `/work`.
const CAPACITY_KEY: &str = "{portcullis:/work}:capacity";

/// The tests measure concurrency and latency: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

// ---------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------

/// What the backend saw.
#[derive(Debug, Default)]
struct Counters {
    /// Ordinary `/work` requests in the handler now.
    inflight: AtomicUsize,
    /// The most ordinary `/work` requests seen in the handler at once.
    max_inflight: AtomicUsize,
    /// Ordinary `/work` requests received.
    requests: AtomicUsize,
    /// Held `/work` requests in the handler now.
    holding: AtomicUsize,
    /// Each ordinary request's arrival and the in-flight count it made (to tell in which
    /// phase of a test a peak came).
    arrivals: std::sync::Mutex<Vec<(Instant, usize)>>,
}

impl Counters {
    /// Restarts the maximum from the current concurrency.
    fn reset_max(&self) {
        self.max_inflight
            .store(self.inflight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn max(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }

    /// The most requests in flight in each 250 ms from `origin` on, as `(ms, max)` pairs
    /// (negative `ms` before `origin`).
    fn peaks(&self, origin: Instant) -> Vec<(i64, usize)> {
        let arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let mut peaks: std::collections::BTreeMap<i64, usize> = Default::default();
        for &(t, n) in arrivals.iter() {
            let ms = t.saturating_duration_since(origin).as_millis() as i64
                - origin.saturating_duration_since(t).as_millis() as i64;
            let bucket = ms.div_euclid(250) * 250;
            let max = peaks.entry(bucket).or_default();
            *max = (*max).max(n);
        }
        peaks.into_iter().collect()
    }
}

/// How `/work` behaves.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// Latency of a request.
    base: Duration,
    /// Past this many concurrent requests, each takes `base + penalty` instead.
    knee: Option<(usize, Duration)>,
}

#[derive(Debug, Clone)]
struct BackendState {
    counters: Arc<Counters>,
    behaviour: Behaviour,
    release: watch::Receiver<bool>,
}

/// Decrements a gauge when the handler ends or is dropped.
struct Gauge<'a>(&'a AtomicUsize);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn work(State(s): State<BackendState>, headers: HeaderMap) -> StatusCode {
    let c = &s.counters;
    if headers.contains_key(HOLD_HEADER) {
        c.holding.fetch_add(1, Ordering::SeqCst);
        let _gauge = Gauge(&c.holding);
        let mut release = s.release.clone();
        let _ = tokio::time::timeout(HOLD_LIMIT, release.wait_for(|r| *r)).await;
        return StatusCode::OK;
    }
    c.requests.fetch_add(1, Ordering::SeqCst);
    let now = c.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _gauge = Gauge(&c.inflight);
    c.max_inflight.fetch_max(now, Ordering::SeqCst);
    c.arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((Instant::now(), now));
    let delay = match s.behaviour.knee {
        Some((knee, penalty)) if now > knee => s.behaviour.base + penalty,
        _ => s.behaviour.base,
    };
    tokio::time::sleep(delay).await;
    StatusCode::OK
}

/// A backend on 127.0.0.1 serving `/work` (any method) and `/healthz`.
struct TestBackend {
    server: support::Server,
    counters: Arc<Counters>,
    release: watch::Sender<bool>,
}

impl TestBackend {
    async fn start(behaviour: Behaviour) -> Self {
        let counters = Arc::new(Counters::default());
        let (release, release_rx) = watch::channel(false);
        let state = BackendState {
            counters: counters.clone(),
            behaviour,
            release: release_rx,
        };
        let app = Router::new()
            .route("/work", any(work))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(state);
        Self {
            server: support::backend(app).await,
            counters,
            release,
        }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// Lets every held request finish.
    fn release_holds(&self) {
        self.release.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------------
// Gateway processes
// ---------------------------------------------------------------------------------------

/// A gateway config (every field but `listen`) for one upstream and `storage`.
fn gateway_config(backend: &str, storage: &str, rest: &str) -> String {
    format!(
        "upstream_timeout: 60\n\
         drain_timeout: 1\n\
         storage: {storage}\n\
         upstreams:\n  - {{url: \"{backend}\", primary: true}}\n\
         health_endpoint: /healthz\n\
         health_check_interval: 0.25\n\
         health_check_timeout: 1\n\
         {rest}"
    )
}

/// One number of `endpoints["/work"]` in `g`'s stats.
async fn work_stat(g: &GatewayProcess, field: &str) -> u64 {
    let v = g.stats().await;
    v["endpoints"]["/work"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no endpoints./work.{field} in {v}", g.name()))
}

/// Spawns `n` gateways from one template (all at once) and waits until all are ready.
async fn start_gateways(n: usize, yaml: &str) -> Vec<GatewayProcess> {
    let mut gateways: Vec<GatewayProcess> = (0..n)
        .map(|i| GatewayProcess::spawn(&format!("gw{i}"), yaml))
        .collect();
    for g in &mut gateways {
        g.wait_ready().await;
    }
    gateways
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// What one request got.
#[derive(Debug, Clone)]
struct Reply {
    /// `None`: transport error or no answer within the client's limit.
    status: Option<StatusCode>,
    body: String,
    started: Instant,
    elapsed: Duration,
}

impl Reply {
    /// The `error` field of a JSON rejection body.
    fn error_code(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()?
            .get("error")?
            .as_str()
            .map(str::to_owned)
    }
}

async fn send(client: &HttpClient, url: &str, hold: bool, limit: Duration) -> Reply {
    let started = Instant::now();
    let mut req = Request::get(url);
    if hold {
        req = req.header(HOLD_HEADER, "1");
    }
    let req = req.body(Body::empty()).expect("a valid request");
    let answer = tokio::time::timeout(limit, async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .ok()
    .flatten();
    let (status, body) = match answer {
        Some((s, b)) => (Some(s), b),
        None => (None, String::new()),
    };
    Reply {
        status,
        body,
        started,
        elapsed: started.elapsed(),
    }
}

/// Concurrent clients, each sending `/work` requests one after the other.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Vec<Reply>>>,
}

impl Load {
    /// `per_url` clients per URL, each sending `requests` requests (`None`: until stopped),
    /// every request bounded by `limit`.
    fn start(
        client: &HttpClient,
        urls: &[String],
        per_url: usize,
        requests: Option<usize>,
        limit: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for url in urls {
            for _ in 0..per_url {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                clients.push(tokio::spawn(async move {
                    let mut replies = Vec::new();
                    while !stop.load(Ordering::SeqCst) && requests.is_none_or(|n| replies.len() < n)
                    {
                        let r = send(&client, &url, false, limit).await;
                        if r.status != Some(StatusCode::OK) {
                            // A fast refusal: do not spin on two cores.
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        replies.push(r);
                    }
                    replies
                }));
            }
        }
        Self { stop, clients }
    }

    /// Waits for every client to finish its requests.
    async fn join(self) -> Vec<Reply> {
        let mut all = Vec::new();
        for c in self.clients {
            all.extend(c.await.expect("a client task panicked"));
        }
        all
    }

    /// Stops the clients after their current request and collects the replies.
    async fn stop(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }
}

/// A count of replies by status, for messages.
fn status_summary(replies: &[Reply]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for r in replies {
        let key = match (r.status, r.error_code()) {
            (Some(s), Some(code)) => format!("{} {code}", s.as_u16()),
            (Some(s), None) => s.as_u16().to_string(),
            (None, _) => "no answer".to_owned(),
        };
        *counts.entry(key).or_default() += 1;
    }
    format!("{counts:?}")
}

// ---------------------------------------------------------------------------------------
// Redis and polling helpers
// ---------------------------------------------------------------------------------------

/// The global number of `/work` slots held, summed from Redis.
fn holders_sum(redis: &RedisServer) -> u64 {
    redis
        .cli(&["HVALS", HOLDERS_KEY])
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// After the load: every process reports no active or queued request, and Redis holds no
/// slot (the global count is back to 0).
async fn assert_settled(redis: &RedisServer, gateways: &[&GatewayProcess], limit: Duration) {
    let settled = eventually_async(limit, || async {
        for g in gateways {
            if work_stat(g, "active_requests").await != 0 || work_stat(g, "queue_depth").await != 0
            {
                return false;
            }
        }
        holders_sum(redis) == 0
    })
    .await;
    if !settled {
        let mut report = format!("redis holders sum {}\n", holders_sum(redis));
        for g in gateways {
            report.push_str(&format!(
                "{}: {}\n",
                g.name(),
                g.stats().await["endpoints"]["/work"]
            ));
        }
        panic!("the global count did not return to 0 within {limit:?}:\n{report}");
    }
}

/// Runs `body` bounded by [`TEST_LIMIT`], one test at a time.
async fn bounded(body: impl Future<Output = ()>) {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_LIMIT:?}"));
}

fn redis_storage(redis: &RedisServer, fields: &str) -> String {
    format!("{{type: redis, url: \"{}\", {fields}}}", redis.url())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Three processes, one Redis, `capacity: 8`: 3×32 concurrent clients never put more than 8
/// requests on the backend at once, use all 8, and every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_share_one_limit() {
    let Some(redis) = RedisServer::start("three_gateway_processes_share_one_limit") else {
        return;
    };
    bounded(async {
        let backend = TestBackend::start(Behaviour {
            base: WORK_DELAY,
            knee: None,
        })
        .await;
        let client = support::client();
        let template = gateway_config(
            &backend.url(),
            &redis_storage(&redis, "lease_ttl: 3, expected_workers: 3, timeout: 2"),
            &format!("queue_timeout: 30\nendpoints:\n  /work: {{capacity: {CAPACITY}}}\n"),
        );
        let gateways = start_gateways(3, &template).await;
        for g in &gateways {
            assert_eq!(work_stat(g, "capacity").await, CAPACITY as u64);
        }

        let urls: Vec<String> = gateways.iter().map(|g| g.url("/work")).collect();
        let started = Instant::now();
        let replies = Load::start(&client, &urls, 32, Some(5), Duration::from_secs(40))
            .join()
            .await;
        println!(
            "3x32 clients, {} requests in {:?}, backend max concurrency {}",
            replies.len(),
            started.elapsed(),
            backend.counters.max()
        );

        assert_eq!(replies.len(), 3 * 32 * 5);
        assert!(
            replies.iter().all(|r| r.status == Some(StatusCode::OK)),
            "not every request succeeded: {}",
            status_summary(&replies)
        );
        let max = backend.counters.max();
        assert!(max <= CAPACITY, "the backend saw {max} concurrent requests");
        assert_eq!(max, CAPACITY, "the shared limit was not used in full");
        assert_eq!(
            backend.counters.requests.load(Ordering::SeqCst),
            replies.len()
        );
        for g in &gateways {
            assert!(
                work_stat(g, "admitted").await >= 5 * 32,
                "{} did not admit its own clients",
                g.name()
            );
        }
        let refs: Vec<&GatewayProcess> = gateways.iter().collect();
        assert_settled(&redis, &refs, Duration::from_secs(5)).await;
    })
    .await;
}

/// One process holds all 8 slots and is SIGKILLed: the two others admit nothing while it
/// lives, and reach 8 concurrent requests at the backend within `lease_ttl` + one heartbeat
/// (+ a margin for a busy machine) after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_reclaims_slots_within_lease_ttl() {
    let Some(redis) = RedisServer::start("sigkill_reclaims_slots_within_lease_ttl") else {
        return;
    };
    bounded(async {
        let lease_ttl = Duration::from_secs(2);
        let heartbeat = lease_ttl / 3;
        let margin = Duration::from_millis(1500);
        let backend = TestBackend::start(Behaviour {
            base: WORK_DELAY,
            knee: None,
        })
        .await;
        let client = support::client();
        let template = gateway_config(
            &backend.url(),
            &redis_storage(
                &redis,
                &format!(
                    "lease_ttl: {}, expected_workers: 3, timeout: 1",
                    lease_ttl.as_secs_f64()
                ),
            ),
            &format!("queue_timeout: 30\nendpoints:\n  /work: {{capacity: {CAPACITY}}}\n"),
        );
        let mut gateways = start_gateways(3, &template).await;

        // The victim takes every slot with requests the backend holds.
        let victim_url = gateways[0].url("/work");
        let holds: Vec<JoinHandle<Reply>> = (0..CAPACITY)
            .map(|_| {
                let (client, url) = (client.clone(), victim_url.clone());
                tokio::spawn(async move { send(&client, &url, true, HOLD_LIMIT).await })
            })
            .collect();
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                backend.counters.holding.load(Ordering::SeqCst) == CAPACITY
            })
            .await,
            "the victim did not get its {CAPACITY} slots (holding {})",
            backend.counters.holding.load(Ordering::SeqCst)
        );
        assert_eq!(holders_sum(&redis), CAPACITY as u64);

        // The survivors queue: the limit is global, so nothing of theirs reaches the backend.
        let survivors: Vec<String> = gateways[1..].iter().map(|g| g.url("/work")).collect();
        let load = Load::start(&client, &survivors, 16, None, Duration::from_secs(40));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            backend.counters.max(),
            0,
            "a survivor admitted a request while the victim held every slot"
        );
        assert!(work_stat(&gateways[1], "queue_depth").await > 0);

        let victim_pid = gateways[0].pid();
        let killed = Instant::now();
        gateways[0].kill();
        let bound = lease_ttl + heartbeat + margin;
        let full = eventually_async(bound, || async {
            backend.counters.inflight.load(Ordering::SeqCst) >= CAPACITY
        })
        .await;
        let reclaimed_after = killed.elapsed();
        println!("SIGKILLed pid {victim_pid:?}; full capacity again after {reclaimed_after:?}");
        assert!(
            full,
            "the survivors had {} (max {}) concurrent requests at the backend {bound:?} after \
             the SIGKILL; redis holders {}",
            backend.counters.inflight.load(Ordering::SeqCst),
            backend.counters.max(),
            holders_sum(&redis)
        );

        // Keep the load a moment longer: still never above the limit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let replies = load.stop().await;
        backend.release_holds();
        for h in holds {
            let _ = h.await; // the victim is dead: its clients got transport errors
        }
        let max = backend.counters.max();
        assert!(max <= CAPACITY, "the backend saw {max} concurrent requests");
        assert!(
            replies.iter().all(|r| r.status == Some(StatusCode::OK)),
            "a survivor's request failed: {}",
            status_summary(&replies)
        );
        let refs: Vec<&GatewayProcess> = gateways[1..].iter().collect();
        assert_settled(&redis, &refs, Duration::from_secs(5)).await;
    })
    .await;
}

/// Redis is killed and started again (empty) while two processes serve load.
async fn redis_restart_mid_load(test: &str, on_error: &str) {
    let Some(mut redis) = RedisServer::start(test) else {
        return;
    };
    bounded(async {
        let queue_timeout = Duration::from_secs(2);
        let storage_timeout = Duration::from_millis(500);
        let margin = Duration::from_millis(1500);
        let backend = TestBackend::start(Behaviour {
            base: WORK_DELAY,
            knee: None,
        })
        .await;
        let client = support::client();
        let template = gateway_config(
            &backend.url(),
            &redis_storage(
                &redis,
                &format!(
                    "lease_ttl: 3, expected_workers: 2, on_error: {on_error}, timeout: {}, \
                     ping_interval: 0.5, failure_threshold: 3",
                    storage_timeout.as_secs_f64()
                ),
            ),
            &format!(
                "queue_timeout: {}\nendpoints:\n  /work: {{capacity: {CAPACITY}}}\n",
                queue_timeout.as_secs_f64()
            ),
        );
        let gateways = start_gateways(2, &template).await;
        let urls: Vec<String> = gateways.iter().map(|g| g.url("/work")).collect();

        // Load, then Redis down for 2 s, then back (with an empty data set), then load on.
        let load = Load::start(&client, &urls, 16, None, Duration::from_secs(20));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let down = Instant::now();
        tokio::task::block_in_place(|| redis.stop());
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| redis.start_again());
        let up = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let replies = load.stop().await;
        let slowest = replies.iter().map(|r| r.elapsed).max().unwrap_or_default();
        let back_ms = up.duration_since(down).as_millis();
        let peak_at = format!(
            "peaks per 250 ms from the outage's start (Redis back at {back_ms} ms): {:?}",
            backend.counters.peaks(down)
        );
        println!(
            "on_error: {on_error}: {} requests, {}; slowest {slowest:?}; backend max \
             concurrency {}; {peak_at}",
            replies.len(),
            status_summary(&replies),
            backend.counters.max()
        );

        // Nobody waited longer than queue_timeout + storage.timeout (+ margin), and every
        // answer is the configured behaviour.
        let bound = queue_timeout + storage_timeout + margin;
        assert!(
            slowest <= bound,
            "a client waited {slowest:?} (bound {bound:?})"
        );
        let during = |r: &Reply| r.started >= down && r.started < up;
        // The per-process outage limits (capacity / expected_workers) count the slots still
        // held from Redis when it went away, so the backend never saw more than the limit.
        assert!(
            backend.counters.max() <= CAPACITY,
            "on_error: {on_error}: the backend saw {} concurrent requests (limit {CAPACITY}); \
             {peak_at}; the gateways' storage lines:\n{}",
            backend.counters.max(),
            gateways
                .iter()
                .flat_map(|g| {
                    let name = g.name().to_string();
                    g.log()
                        .lines()
                        .filter(|l| l.contains("storage"))
                        .map(move |l| format!("{name}: {l}\n"))
                        .collect::<Vec<_>>()
                })
                .collect::<String>()
        );
        match on_error {
            "local" => {
                assert!(
                    replies.iter().all(|r| r.status == Some(StatusCode::OK)),
                    "on_error: local must keep serving: {}",
                    status_summary(&replies)
                );
                assert!(
                    replies.iter().filter(|r| during(r)).count() > 10,
                    "few requests were served while Redis was down"
                );
            }
            "reject" => {
                let rejected = replies
                    .iter()
                    .filter(|r| r.status == Some(StatusCode::SERVICE_UNAVAILABLE))
                    .count();
                assert!(
                    replies.iter().all(|r| r.status == Some(StatusCode::OK)
                        || (r.status == Some(StatusCode::SERVICE_UNAVAILABLE)
                            && r.error_code().as_deref() == Some("storage_unavailable"))),
                    "on_error: reject answers 200 or 503 storage_unavailable: {}",
                    status_summary(&replies)
                );
                assert!(rejected > 0, "nothing was rejected while Redis was down");
                // Recovery retries at most every lease_ttl / 3 = 1 s.
                let recovered = up + Duration::from_millis(1500);
                let late: Vec<&Reply> = replies.iter().filter(|r| r.started >= recovered).collect();
                assert!(!late.is_empty());
                assert!(
                    late.iter().all(|r| r.status == Some(StatusCode::OK)),
                    "still refused 1.5 s after Redis was back: {}",
                    status_summary(&late.into_iter().cloned().collect::<Vec<_>>())
                );
            }
            other => unreachable!("on_error {other}"),
        }
        for g in &gateways {
            let log = g.log();
            assert!(
                log.contains("redis storage unavailable"),
                "{} did not notice the outage:\n{log}",
                g.name()
            );
            assert!(
                log.contains("redis storage available again"),
                "{} did not recover:\n{log}",
                g.name()
            );
        }

        // The global count is true again: back to 0 once the load ended ...
        let refs: Vec<&GatewayProcess> = gateways.iter().collect();
        assert_settled(&redis, &refs, Duration::from_secs(5)).await;
        for g in &gateways {
            let storage = &g.stats().await["storage"];
            assert_eq!(storage["healthy"], true, "{}: {storage}", g.name());
            assert!(
                storage["last_ping_latency_ms"]
                    .as_f64()
                    .is_some_and(|ms| ms > 0.0),
                "{}: the readiness PING's round trip is reported: {storage}",
                g.name()
            );
        }
        // ... and the shared limit holds, in full, for new requests.
        backend.counters.reset_max();
        let replies = Load::start(&client, &urls, 16, Some(3), Duration::from_secs(20))
            .join()
            .await;
        assert!(
            replies.iter().all(|r| r.status == Some(StatusCode::OK)),
            "after the restart: {}",
            status_summary(&replies)
        );
        let max = backend.counters.max();
        assert!(
            max <= CAPACITY,
            "after the restart the backend saw {max} concurrent requests"
        );
        assert_eq!(
            max, CAPACITY,
            "after the restart the limit was not used in full"
        );
        assert_settled(&redis, &refs, Duration::from_secs(5)).await;
    })
    .await;
}

/// `on_error: local`: requests keep being served through the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_on_error_local() {
    redis_restart_mid_load("redis_restart_mid_load_on_error_local", "local").await;
}

/// `on_error: reject`: 503 `storage_unavailable` during the outage, 200 after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_on_error_reject() {
    redis_restart_mid_load("redis_restart_mid_load_on_error_reject", "reject").await;
}

/// The knee of the probed backend: past `KNEE` concurrent requests, each takes 500 ms more.
const KNEE: usize = 4;
const KNEE_BACKEND: Behaviour = Behaviour {
    base: Duration::from_millis(20),
    knee: Some((KNEE, Duration::from_millis(500))),
};

/// A config template probing `/work` (no `capacity`) at startup, with small probe settings.
fn probe_config(backend: &TestBackend, redis: &RedisServer) -> String {
    gateway_config(
        &backend.url(),
        &redis_storage(redis, "lease_ttl: 3, timeout: 2"),
        "queue_timeout: 30\n\
         probe_on_startup: true\n\
         max_probe_concurrency: 16\n\
         probe_min_requests: 8\n\
         latency_threshold_ms: 200\n\
         error_threshold: 0.05\n\
         endpoints:\n  /work: {}\n",
    )
}

/// Two processes with `probe_on_startup` on one Redis, started at once: exactly one probes
/// the backend, and both use the capacity it found (within 1 of the backend's knee).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_on_startup_two_processes_one_probes() {
    let Some(redis) = RedisServer::start("probe_on_startup_two_processes_one_probes") else {
        return;
    };
    bounded(async {
        let backend = TestBackend::start(KNEE_BACKEND).await;
        let template = probe_config(&backend, &redis);
        let gateways = start_gateways(2, &template).await;

        let probers: Vec<&str> = gateways
            .iter()
            .filter(|g| g.log().contains("probing capacity"))
            .map(|g| g.name())
            .collect();
        assert_eq!(
            probers.len(),
            1,
            "processes that probed: {probers:?}\n{}",
            gateways
                .iter()
                .map(|g| format!("--- {}:\n{}", g.name(), g.log()))
                .collect::<String>()
        );
        let mut capacities = Vec::new();
        for g in &gateways {
            capacities.push(work_stat(g, "capacity").await);
        }
        println!("capacities {capacities:?}, probed by {probers:?}");
        for g in &gateways {
            for line in g.log().lines().filter(|l| l.contains("capacity")) {
                println!("{}: {line}", g.name());
            }
        }
        assert_eq!(capacities[0], capacities[1], "the processes disagree");
        assert!(
            capacities[0].abs_diff(KNEE as u64) <= 1,
            "probed capacity {} for a knee at {KNEE}",
            capacities[0]
        );
        let stored = redis.cli(&["GET", CAPACITY_KEY]);
        assert_eq!(stored.trim(), capacities[0].to_string(), "stored capacity");
    })
    .await;
}

/// A process started while another one is probing waits for that probe and uses its
/// result (the capacity store's contract), instead of starting with a made-up capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_on_startup_late_process_waits_for_the_probe() {
    let Some(redis) = RedisServer::start("probe_on_startup_late_process_waits_for_the_probe")
    else {
        return;
    };
    bounded(async {
        let backend = TestBackend::start(KNEE_BACKEND).await;
        let template = probe_config(&backend, &redis);
        let mut first = GatewayProcess::spawn("first", &template);
        assert!(
            eventually_async(READY_LIMIT, || async {
                first.log().contains("probing capacity")
            })
            .await,
            "the first process did not probe:\n{}",
            first.log()
        );
        let mut late = GatewayProcess::spawn("late", &template);
        late.wait_ready().await;
        let late_capacity = work_stat(&late, "capacity").await;
        assert!(
            first.log().contains("probed capacity"),
            "the late process was ready with capacity {late_capacity} (stored: {:?}) while the \
             first one was still probing",
            redis.cli(&["GET", CAPACITY_KEY]).trim()
        );
        first.wait_ready().await;
        let first_capacity = work_stat(&first, "capacity").await;
        assert_eq!(late_capacity, first_capacity);
        assert!(
            first_capacity.abs_diff(KNEE as u64) <= 1,
            "capacity {first_capacity}"
        );
        assert!(
            !late.log().contains("probing capacity"),
            "both processes probed"
        );
    })
    .await;
}
