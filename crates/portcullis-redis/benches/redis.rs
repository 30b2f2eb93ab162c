//! Redis-shared capacity source: acquire+release pairs/s, round trips per admitted request
//! and cross-process hand-off latency, side by side with the in-process `LocalCapacity`
//! (tower `ConcurrencyLimit`'s semaphore design) and raw `INCR` on the same server.
//!
//! ```text
//! cargo bench -p portcullis-redis --bench redis -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Needs `redis-server` and `redis-benchmark` on PATH (a private server is started).

use criterion::{BenchmarkId, Criterion, Throughput};
use portcullis_admission::{CapacitySource, LocalCapacity};
use portcullis_redis::testing::RedisServer;
use portcullis_redis::{RedisCapacity, RedisStorage, StorageConfig};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// The commands a client sends (the readiness PING is off during the runs). `INFO
/// commandstats` also counts the commands a script runs inside the server (`GET`, `SET`,
/// `PUBLISH`, ...), which are not round trips, so those are left out.
const CLIENT_COMMANDS: &[&str] = &["evalsha", "eval", "script|load", "ping"];

fn total_calls(server: &RedisServer) -> u64 {
    CLIENT_COMMANDS
        .iter()
        .map(|c| server.command_calls(c))
        .sum()
}

async fn source(server: &RedisServer, endpoint: &str, cap: usize) -> (RedisStorage, RedisCapacity) {
    let mut cfg = StorageConfig::redis(server.url());
    // Keep the readiness PINGs out of the round-trip count.
    cfg.ping_interval = Duration::from_secs(3600);
    let s = RedisStorage::connect(&cfg).await.unwrap();
    let src = s.capacity_source(endpoint, cap);
    tokio::time::sleep(Duration::from_millis(100)).await;
    (s, src)
}

/// Round trips per admitted request, from `INFO commandstats` around a run: `processes`
/// storages (separate instance ids, as separate gateway processes) × `tasks` tasks each.
fn round_trips(rt: &Runtime, server: &RedisServer) {
    rt.block_on(async {
        for (label, cap, processes, tasks) in [
            ("uncontended (cap 64, 1 process x 16 tasks)", 64, 1, 16),
            ("contended (cap 4, 1 process x 16 tasks)", 4, 1, 16),
            ("contended (cap 4, 4 processes x 4 tasks)", 4, 4, 4),
        ] {
            let endpoint = format!("/rt-{cap}-{processes}");
            let mut sources = Vec::new();
            for _ in 0..processes {
                sources.push(source(server, &endpoint, cap).await);
            }
            let per_task = 200;
            let before = total_calls(server);
            let handles: Vec<_> = (0..processes * tasks)
                .map(|i| {
                    let src = sources[i % processes].1.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            let p = src.acquire(None).await.unwrap();
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            drop(p);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let calls = total_calls(server) - before;
            let admitted = (processes * tasks * per_task) as f64;
            println!(
                "round trips per admitted request, {label}: {:.2} ({calls} calls / {admitted} requests)",
                calls as f64 / admitted
            );
        }
    });
}

/// Cross-process hand-off: a release in one storage wakes a waiter of another.
fn handoff(rt: &Runtime, server: &RedisServer) {
    rt.block_on(async {
        let (_a, sa) = source(server, "/handoff", 1).await;
        let (_b, sb) = source(server, "/handoff", 1).await;
        let mut lat = Vec::new();
        for _ in 0..200 {
            let held = sa.acquire(None).await.unwrap();
            let waiter = tokio::spawn(sb.acquire(None));
            tokio::time::sleep(Duration::from_millis(2)).await;
            let t0 = Instant::now();
            drop(held);
            let p = waiter.await.unwrap().unwrap();
            lat.push(t0.elapsed());
            drop(p);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.sort();
        println!(
            "cross-process hand-off (200 runs): p50 {:?}, p90 {:?}, p99 {:?}",
            lat[100], lat[180], lat[198]
        );
    });
}

fn redis_benchmark(server: &RedisServer) {
    for clients in ["1", "50"] {
        let out = Command::new("redis-benchmark")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port().to_string(),
                "-t",
                "incr",
                "-n",
                "100000",
                "-c",
                clients,
                "-q",
            ])
            .output();
        match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout);
                let last = text
                    .split(['\r', '\n'])
                    .map(str::trim)
                    .rfind(|l| !l.is_empty())
                    .unwrap_or_default()
                    .to_owned();
                println!("redis-benchmark -t incr -n 100000 -c {clients}: {last}")
            }
            Err(e) => println!("redis-benchmark not run: {e}"),
        }
    }
}

fn pairs(c: &mut Criterion, rt: &Runtime, server: &RedisServer) {
    let (_s, redis_src) = rt.block_on(source(server, "/pairs", 1_000_000));
    let local = LocalCapacity::new(1_000_000);
    let mut conn = rt.block_on(async {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let mut g = c.benchmark_group("acquire_release");
    for conc in [1usize, 32] {
        g.throughput(Throughput::Elements(conc as u64));
        g.bench_with_input(
            BenchmarkId::new("redis_capacity", conc),
            &conc,
            |b, &conc| {
                b.to_async(rt).iter(|| {
                    let src = redis_src.clone();
                    async move {
                        let ps =
                            futures_util::future::join_all((0..conc).map(|_| src.acquire(None)))
                                .await;
                        drop(ps);
                    }
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("local_capacity", conc),
            &conc,
            |b, &conc| {
                b.to_async(rt).iter(|| {
                    let src = local.clone();
                    async move {
                        let ps =
                            futures_util::future::join_all((0..conc).map(|_| src.acquire(None)))
                                .await;
                        drop(ps);
                    }
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("raw_incr_decr", conc),
            &conc,
            |b, &conc| {
                b.to_async(rt).iter(|| {
                    let conn = conn.clone();
                    async move {
                        futures_util::future::join_all((0..conc).map(|_| {
                            let mut c = conn.clone();
                            async move {
                                let _: i64 = redis::cmd("INCR")
                                    .arg("bench:incr")
                                    .query_async(&mut c)
                                    .await
                                    .unwrap();
                                let _: i64 = redis::cmd("DECR")
                                    .arg("bench:incr")
                                    .query_async(&mut c)
                                    .await
                                    .unwrap();
                            }
                        }))
                        .await;
                    }
                })
            },
        );
    }
    g.finish();
    let _ = &mut conn;
}

fn main() {
    let Some(server) = RedisServer::start("bench redis") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    round_trips(&rt, &server);
    handoff(&rt, &server);
    redis_benchmark(&server);
    let mut c = Criterion::default().configure_from_args();
    pairs(&mut c, &rt, &server);
    c.final_summary();
    drop(rt);
    drop(server);
}
