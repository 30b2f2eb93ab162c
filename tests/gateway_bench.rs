//! `gateway bench` end to end: the example binary probes real axum backends on 127.0.0.1
//! whose latency (or error rate) jumps past a known knee, reports the knee as the capacity,
//! and writes a config that loads back with it while keeping the user's other fields and
//! comments. A backend that is down, a misconfigured endpoint, a bad config and Ctrl-C all
//! exit with their documented status and write nothing.

mod support;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use portcullis::gateway::config::GatewayConfig;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// Latency of a request within the knee.
const BASE: Duration = Duration::from_millis(20);
/// Latency of a request past the knee: well above the 200 ms threshold of the test configs.
const SLOW: Duration = Duration::from_millis(600);
/// No bench run in these tests may take longer than this.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// What an endpoint does with requests beyond its knee.
#[derive(Debug, Clone, Copy)]
enum PastKnee {
    /// Answers 200, but after [`SLOW`].
    Slow,
    /// Answers 503 at once.
    Reject,
}

/// An endpoint that serves `knee` concurrent requests at [`BASE`] latency.
#[derive(Debug, Clone)]
struct Knee {
    in_flight: Arc<AtomicUsize>,
    knee: usize,
    past: PastKnee,
}

impl Knee {
    fn new(knee: usize, past: PastKnee) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            knee,
            past,
        }
    }

    async fn serve(&self) -> StatusCode {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _done = InFlight(self.in_flight.clone());
        if n <= self.knee {
            tokio::time::sleep(BASE).await;
            return StatusCode::OK;
        }
        match self.past {
            PastKnee::Slow => {
                tokio::time::sleep(SLOW).await;
                StatusCode::OK
            }
            PastKnee::Reject => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Decrements the in-flight count when the handler ends (or is cancelled).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `/work`: latency knee at 8, requires the `x-api-key` header from the config.
/// `/batch`: 503 knee at 4, requires the JSON body from the config.
/// `/slow`: every request takes [`SLOW`] (for the Ctrl-C test).
fn knee_backend() -> Router {
    let work = Knee::new(8, PastKnee::Slow);
    let batch = Knee::new(4, PastKnee::Reject);
    Router::new()
        .route(
            "/work",
            post(|State(k): State<Knee>, headers: HeaderMap| async move {
                if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("secret") {
                    return StatusCode::UNAUTHORIZED;
                }
                k.serve().await
            })
            .with_state(work),
        )
        .route(
            "/batch",
            post(
                |State(k): State<Knee>, Json(body): Json<serde_json::Value>| async move {
                    if body != serde_json::json!({"n": 1}) {
                        return StatusCode::UNPROCESSABLE_ENTITY;
                    }
                    k.serve().await
                },
            )
            .with_state(batch),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(SLOW).await;
                "slow"
            }),
        )
}

/// A fresh path under the temp dir; the file is not created.
fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{:016x}-{name}", rand::random::<u64>()))
}

fn write_config(yaml: &str) -> PathBuf {
    let path = temp_path("gateway.yml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// How a bench run ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn assert_no_panic(&self) {
        for text in [&self.stdout, &self.stderr] {
            assert!(!text.contains("panicked"), "panic:\n{self:#?}");
            assert!(!text.contains("stack backtrace"), "backtrace:\n{self:#?}");
        }
    }
}

/// The example binary, refusing one older than its sources: `cargo test --test gateway_bench`
/// does not rebuild examples, so run `cargo build --example gateway` first.
fn gateway_binary() -> PathBuf {
    let bin = support::gateway_binary();
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let newest = ["examples/gateway", "src", "crates/portcullis-probe/src"]
        .iter()
        .filter_map(|dir| newest_rs(&root.join(dir)))
        .max();
    if let (Some(built), Some((changed, file))) = (built, newest) {
        assert!(
            changed <= built,
            "{} is older than {}: rebuild it with `cargo build --example gateway`",
            bin.display(),
            file.display()
        );
    }
    bin
}

/// The most recently modified `.rs` file under `dir` (bounded depth).
fn newest_rs(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest = None;
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() && depth < 8 {
                stack.push((path, depth + 1));
            } else if path.extension().is_some_and(|x| x == "rs") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                        newest = Some((t, path));
                    }
                }
            }
        }
    }
    newest
}

fn bench_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(gateway_binary());
    cmd.arg("bench")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs `gateway bench ARGS` to completion (bounded by [`RUN_LIMIT`]).
async fn run_bench(args: &[&str]) -> Run {
    let child = bench_command(args)
        .spawn()
        .expect("the example binary starts");
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("bench finishes in time")
        .expect("bench output");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    run.assert_no_panic();
    run
}

fn endpoint<'a>(doc: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    doc["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["path"] == path))
        .unwrap_or_else(|| panic!("no endpoint {path} in {doc:#}"))
}

fn capacity_of(doc: &serde_json::Value, path: &str) -> usize {
    let ep = endpoint(doc, path);
    assert_eq!(ep["status"], "ok", "{ep:#}");
    ep["capacity"].as_u64().expect("a capacity") as usize
}

/// Within ±10% of `knee`, or ±1 for small knees.
fn near(found: usize, knee: usize) -> bool {
    let slack = (knee as f64 * 0.1).max(1.0);
    (found as f64 - knee as f64).abs() <= slack
}

const PROBED_CONFIG: &str = "\
# Bench test config: comments must survive.
listen: 127.0.0.1:8099   # not used by bench
upstream_timeout: 5
upstreams:
  - {url: \"http://127.0.0.1:9\", primary: true}
queue_timeout: 7
max_probe_concurrency: 32
probe_min_requests: 16
latency_threshold_ms: 200
endpoints:
  # The model endpoint.
  /work: {method: POST, queue_timeout: 3, headers: {x-api-key: secret}}   # keep me
  /batch:
    method: POST
    # batch jobs
    body: {n: 1}
    capacity: 99
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_finds_the_knees_and_writes_a_config_that_loads_back() {
    let backend = support::backend(knee_backend()).await;
    let config = write_config(PROBED_CONFIG);
    let out = temp_path("probed.yml");
    let run = run_bench(&[
        "--config",
        config.to_str().unwrap(),
        "--base-url",
        &backend.url(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");

    // One JSON document on stdout.
    let doc: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{run:#?}"));
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["written"], out.display().to_string());
    assert_eq!(doc["yaml_layout"], "edited", "{doc:#}");
    let work = capacity_of(&doc, "/work");
    let batch = capacity_of(&doc, "/batch");
    assert!(near(work, 8), "/work capacity {work}, knee 8:\n{doc:#}");
    assert!(near(batch, 4), "/batch capacity {batch}, knee 4:\n{doc:#}");
    // The latency knee is reported as latency-bound, with a warning; the 503 knee is not.
    let w = endpoint(&doc, "/work");
    assert_eq!(w["bound"], "latency", "{w:#}");
    assert_eq!(w["latency_bound"], true);
    assert!(
        w["warnings"][0]
            .as_str()
            .is_some_and(|s| s.contains("latency")),
        "{w:#}"
    );
    let b = endpoint(&doc, "/batch");
    assert_eq!(b["bound"], "errors", "{b:#}");
    assert_eq!(b["latency_bound"], false);
    assert_eq!(b["previous_capacity"], 99);
    // Never more in flight than max_probe_concurrency.
    for ep in [w, b] {
        for level in ep["report"]["levels"].as_array().unwrap() {
            assert!(level["level"].as_u64().unwrap() <= 32, "{level:#}");
        }
    }

    // The written config loads back with the probed capacities and nothing else changed.
    let written = GatewayConfig::load(&out).expect("the written config loads");
    let mut expected = GatewayConfig::load(&config).unwrap();
    expected
        .admission
        .endpoints
        .get_mut("/work")
        .unwrap()
        .capacity = Some(work as usize);
    expected
        .admission
        .endpoints
        .get_mut("/batch")
        .unwrap()
        .capacity = Some(batch as usize);
    assert_eq!(written, expected);
    assert_eq!(written.admission.queue_timeout, Duration::from_secs(7));
    assert_eq!(
        written.admission.endpoints["/work"]
            .headers
            .as_ref()
            .unwrap()["x-api-key"],
        "secret"
    );
    assert_eq!(
        written.admission.endpoints["/work"].queue_timeout,
        Some(Duration::from_secs(3))
    );

    // Comments and layout are kept: only the capacity lines differ.
    let text = std::fs::read_to_string(&out).unwrap();
    for comment in [
        "# Bench test config: comments must survive.",
        "# not used by bench",
        "# The model endpoint.",
        "# keep me",
        "# batch jobs",
    ] {
        assert!(text.contains(comment), "lost {comment:?}:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "/work: {{method: POST, capacity: {work}, queue_timeout: 3, headers: {{x-api-key: secret}}}}   # keep me"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("\n    capacity: {batch}\n")),
        "{text}"
    );
    let changed: Vec<_> = PROBED_CONFIG
        .lines()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 2, "{changed:#?}");
    assert_eq!(PROBED_CONFIG.lines().count(), text.lines().count());
    // The input config itself is untouched.
    assert_eq!(std::fs::read_to_string(&config).unwrap(), PROBED_CONFIG);

    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_without_out_prints_the_updated_yaml_and_a_table() {
    let backend = support::backend(knee_backend()).await;
    let config = write_config(
        "max_probe_concurrency: 32\nprobe_min_requests: 16\nlatency_threshold_ms: 200\nupstream_timeout: 5\nendpoints:\n  /batch: {body: {n: 1}}  # no method: POST because of the body\n",
    );
    let run = run_bench(&[
        "--config",
        config.to_str().unwrap(),
        "--base-url",
        &backend.url(),
    ])
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    // stdout is exactly the updated YAML; the table goes to stderr.
    let cfg = GatewayConfig::from_yaml(&run.stdout, Path::new("stdout.yml"))
        .unwrap_or_else(|e| panic!("stdout does not load ({e}):\n{run:#?}"));
    let cap = cfg.admission.endpoints["/batch"]
        .capacity
        .expect("a capacity");
    assert!(near(cap, 4), "capacity {cap}:\n{run:#?}");
    assert!(run.stdout.contains("# no method: POST"), "{run:#?}");
    assert!(run.stderr.contains("max_concurrency"), "{run:#?}");
    assert!(run.stderr.contains("best req/s"), "{run:#?}");
    assert_eq!(cfg.admission.endpoints["/batch"].method, None);
    let _ = std::fs::remove_file(&config);
}

#[tokio::test]
async fn a_backend_that_is_down_exits_2_and_writes_nothing() {
    let port = support::closed_port().await;
    let base = format!("http://127.0.0.1:{port}");
    let config =
        write_config("upstream_timeout: 2\nendpoints:\n  /work: {method: POST}\n  /other: {}\n");
    let out = temp_path("never.yml");
    let started = std::time::Instant::now();
    let run = run_bench(&[
        "--config",
        config.to_str().unwrap(),
        "--base-url",
        &base,
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains(&format!(
            "cannot connect to {base}: is the backend running?"
        )),
        "{run:#?}"
    );
    assert!(run.stderr.contains("connect error"), "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(!out.exists(), "a config was written");
    // A down backend is reported at once, not after probing every endpoint.
    assert!(started.elapsed() < Duration::from_secs(20), "{run:#?}");
    let _ = std::fs::remove_file(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_at_concurrency_1_reports_the_statuses_seen() {
    let backend = support::backend(knee_backend()).await;
    let config = write_config(
        "probe_min_requests: 16\nendpoints:\n  /missing: {method: POST}\n  /work: {method: POST}\n",
    );
    let run = run_bench(&[
        "--config",
        config.to_str().unwrap(),
        "--base-url",
        &backend.url(),
        "--json",
    ])
    .await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    let doc: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{run:#?}"));
    assert_eq!(doc["ok"], false);
    assert!(doc["written"].is_null(), "{doc:#}");
    let missing = endpoint(&doc, "/missing");
    assert_eq!(missing["status"], "failed", "{missing:#}");
    assert!(missing["first_level_outcomes"]["404"].as_u64().unwrap() > 0);
    // `/work` without its api key: 401 at concurrency 1.
    let work = endpoint(&doc, "/work");
    assert_eq!(work["status"], "failed", "{work:#}");
    assert!(work["error"].as_str().unwrap().contains("401"), "{work:#}");
    assert!(
        run.stderr.contains("already fails at concurrency 1"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("404 x"), "{run:#?}");
    let _ = std::fs::remove_file(&config);
}

#[tokio::test]
async fn bad_config_or_arguments_exit_2_with_a_message() {
    let bad = write_config("endpoints:\n  /w: {capacity: 0}\n");
    let empty = write_config("listen: 127.0.0.1:8080\n");
    let good = write_config("endpoints:\n  /w: {}\n");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--config",
                bad.to_str().unwrap(),
                "--base-url",
                "http://127.0.0.1:1",
            ],
            "`endpoints./w.capacity`",
        ),
        (
            vec![
                "--config",
                empty.to_str().unwrap(),
                "--base-url",
                "http://127.0.0.1:1",
            ],
            "nothing to probe",
        ),
        (vec!["--base-url", "http://127.0.0.1:1"], "--config"),
        (
            vec![
                "--config",
                good.to_str().unwrap(),
                "--base-url",
                "https://example.invalid",
            ],
            "http://",
        ),
        (
            vec![
                "--config",
                good.to_str().unwrap(),
                "--base-url",
                "not a url",
            ],
            "not a URL",
        ),
    ];
    for (args, needle) in cases {
        let run = run_bench(&args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        assert!(run.stderr.contains(needle), "{args:?}: {run:#?}");
    }
    for p in [bad, empty, good] {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_cleanly_and_writes_nothing() {
    let backend = support::backend(knee_backend()).await;
    // Every request is slow but passes, so the probe would run for many levels.
    let config = write_config(
        "upstream_timeout: 5\nlatency_threshold_ms: 2000\nprobe_min_requests: 4\nendpoints:\n  /slow: {method: POST}\n",
    );
    let out = temp_path("interrupted.yml");
    let mut child = bench_command(&[
        "--config",
        config.to_str().unwrap(),
        "--base-url",
        &backend.url(),
        "--out",
        out.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let pid = child.id().expect("running").to_string();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());

    // Wait until the probe is under way (stderr is not a terminal: plain progress lines),
    // then give it time to have requests in flight.
    let mut seen = String::new();
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        let mut line = String::new();
        while stderr.read_line(&mut line).await.unwrap_or(0) > 0 {
            seen.push_str(&line);
            if line.starts_with("probing ") {
                return true;
            }
            line.clear();
        }
        false
    })
    .await;
    assert_eq!(started, Ok(true), "no progress seen:\n{seen}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let interrupted_at = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("bench stops after Ctrl-C")
        .unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest).await;
    seen.push_str(&rest);
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(interrupted_at.elapsed() < Duration::from_secs(5), "{seen}");
    assert!(seen.contains("interrupted; nothing written"), "{seen}");
    assert!(!seen.contains("panicked"), "{seen}");
    assert!(!out.exists(), "a config was written");
    let _ = std::fs::remove_file(&config);
}
