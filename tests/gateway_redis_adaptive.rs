//! One adaptive limit shared by two example-gateway processes through one Redis (issue 17):
//! both apply the same limit, which converges near the backend's knee; only one process
//! computes it at a time (the lease holder); killing it does not freeze the limit: the
//! other takes the lease over and the limit follows the knee when it moves.
//!
//! Starts its own `redis-server` (the test returns early when it is not installed, like
//! tests/gateway_redis.rs), a knee backend in the test process, and the `gateway` example
//! binary twice, on 127.0.0.1 only.

mod support;

use portcullis_redis::testing::RedisServer;
use std::time::{Duration, Instant};
use support::gateway_process::GatewayProcess;
use support::knee::{KneeBackend, KneeModel, Load};

/// `endpoints./work` of `g`'s stats.
async fn work(g: &GatewayProcess) -> serde_json::Value {
    g.stats().await["endpoints"]["/work"].clone()
}

/// Polls every 250 ms until, 8 times in a row, every process in `gs` reports the same limit
/// inside `range` and exactly one of them holds the lease; for at most `within`. Readings
/// while `min_rtt` is measured are skipped. Returns the last limit.
async fn settle(
    gs: &[&GatewayProcess],
    within: Duration,
    range: std::ops::RangeInclusive<u64>,
) -> u64 {
    let start = Instant::now();
    let (mut seen, mut inside) = (Vec::new(), 0);
    while start.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut limits = Vec::new();
        let (mut leaders, mut measuring) = (0, false);
        for g in gs {
            let s = work(g).await;
            limits.push(s["capacity"].as_u64().unwrap());
            leaders += usize::from(s["adaptive"]["leader"] == true);
            measuring |= s["adaptive"]["state"] == "measuring_min_rtt";
        }
        seen.push((limits.clone(), leaders));
        if measuring {
            continue;
        }
        let same = limits.windows(2).all(|w| w[0] == w[1]);
        inside = if same && leaders == 1 && range.contains(&limits[0]) {
            inside + 1
        } else {
            0
        };
        if inside >= 8 {
            return limits[0];
        }
    }
    panic!("no shared limit in {range:?} with one leader within {within:?}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_adaptive_limit_and_survive_the_leader() {
    let Some(redis) = RedisServer::start("two_processes_share_one_adaptive_limit") else {
        return;
    };
    let knee = KneeBackend::start(KneeModel::default()).await; // K = 16
    let yaml = format!(
        "storage: {{type: redis, url: \"{}\", lease_ttl: 2}}\nupstreams:\n  - {{url: \"{}\"}}\n\
         health_endpoint: /health\neject_after: 0\nqueue_timeout: 30\n\
         endpoints:\n  /work: {{capacity: 8}}\n\
         adaptive: {{min_capacity: 2, max_capacity: 100}}\n",
        redis.url(),
        knee.url()
    );
    let mut a = GatewayProcess::start("a", &yaml).await;
    let mut b = GatewayProcess::start("b", &yaml).await;
    let _ca = Load::start(a.url("/work"), 24);
    let _cb = Load::start(b.url("/work"), 24);

    let limit = settle(&[&a, &b], Duration::from_secs(20), 12..=24).await;
    // The backend's in-flight count stays within the shared limit plus what one process
    // can take in one window while the limit shrinks (half of it here, generously).
    knee.take_peak();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = work(&a).await["capacity"].as_u64().unwrap().max(limit);
        assert!(
            (knee.inflight() as u64) <= now + now / 2,
            "{} in flight, limit {now}",
            knee.inflight()
        );
    }

    // Kill the leader: the survivor takes the lease over and the limit follows the knee.
    let (dead, survivor) = if work(&a).await["adaptive"]["leader"] == true {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    dead.kill();
    knee.set(KneeModel {
        capacity: 6,
        ..KneeModel::default()
    });
    settle(&[&*survivor], Duration::from_secs(15), 4..=10).await;
    let s = work(survivor).await;
    assert_eq!(s["adaptive"]["leader"], true, "{s}");
    drop(redis);
}
