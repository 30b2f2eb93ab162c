//! The Redis-shared capacity source against real, private `redis-server` processes.
//!
//! Every test starts its own server (skipped with a `SKIP` line when `redis-server` is not
//! installed, failing instead under `CI=true`).

use portcullis_admission::{AcquireError, CapacitySource};
use portcullis_redis::testing::{RedisCluster, RedisServer};
use portcullis_redis::{OnError, RedisCapacity, RedisStorage, StorageConfig};
use portcullis_testkit::eventually;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn storage(url: &str, tweak: impl FnOnce(&mut StorageConfig)) -> RedisStorage {
    let mut c = StorageConfig::redis(url);
    tweak(&mut c);
    RedisStorage::connect(&c).await.expect("connect")
}

/// Waits (up to `within`) until Redis counts no slot of `endpoint`.
async fn released(server: &RedisServer, endpoint: &str, within: Duration) -> bool {
    eventually(within, || holders_sum(server, endpoint) == 0).await
}

fn holders_sum(server: &RedisServer, endpoint: &str) -> i64 {
    let out = server.cli(&["HVALS", &format!("{{portcullis:{endpoint}}}:holders")]);
    out.lines()
        .filter_map(|l| l.trim().parse::<i64>().ok())
        .sum()
}

/// 200 concurrent acquire/release calls through 4 connections (4 storages, 4 instance
/// ids): the global count never exceeds the capacity nor drops below 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_scripts_are_atomic_under_200_calls_from_4_connections() {
    let Some(server) = RedisServer::start("lua_scripts_are_atomic") else {
        return;
    };
    const CAP: usize = 5;
    let mut sources = Vec::new();
    let mut storages = Vec::new();
    for _ in 0..4 {
        let s = storage(&server.url(), |_| {}).await;
        sources.push(s.capacity_source("/work", CAP));
        storages.push(s);
    }
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let src = sources[i % 4].clone();
        let (inside, max_inside) = (inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            let p = tokio::time::timeout(Duration::from_secs(20), src.acquire(None))
                .await
                .expect("acquire bounded")
                .expect("granted");
            let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
            max_inside.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            drop(p);
        }));
    }
    // Watch the server-side count while the load runs.
    let mut seen_max = 0i64;
    let mut seen_min = i64::MAX;
    while !tasks.iter().all(|t| t.is_finished()) {
        let n = holders_sum(&server, "/work");
        seen_max = seen_max.max(n);
        seen_min = seen_min.min(n);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        max_inside.load(Ordering::SeqCst) <= CAP,
        "more than {CAP} permits at once"
    );
    assert!(
        max_inside.load(Ordering::SeqCst) >= 2,
        "no concurrency at all"
    );
    assert!(
        seen_max <= CAP as i64 && seen_min >= 0,
        "count left [0, {CAP}]: {seen_min}..{seen_max}"
    );
    assert!(
        released(&server, "/work", Duration::from_secs(2)).await,
        "slots leaked: {}",
        holders_sum(&server, "/work")
    );
    assert_eq!(sources[0].refresh().await.unwrap(), 0);
}

/// Within one process, waiters are served in the order they called `acquire`, and a
/// dropped waiter never keeps a slot.
#[tokio::test]
async fn local_fifo_and_cancel_safety() {
    let Some(server) = RedisServer::start("local_fifo_and_cancel_safety") else {
        return;
    };
    let s = storage(&server.url(), |_| {}).await;
    let src = s.capacity_source("/fifo", 1);
    let first = src.acquire(None).await.unwrap();
    // One source per endpoint and process: asking again returns the same slots.
    let same = s.capacity_source("/fifo", 99);
    assert_eq!((same.capacity(), same.held_locally()), (1, 1));
    drop(same);
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..5 {
        let (src, order) = (src.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let p = src.acquire(None).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(p);
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A cancelled waiter in the middle of the queue.
    let cancelled = tokio::time::timeout(Duration::from_millis(20), src.acquire(None)).await;
    assert!(cancelled.is_err());
    assert_eq!(src.queue_depth(), 5);
    drop(first);
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    assert!(released(&server, "/fifo", Duration::from_secs(2)).await);
    // max_queue: with the slot taken and one waiter queued, a second waiter is refused.
    let _p = src.acquire(Some(1)).await.unwrap();
    let w = tokio::spawn(src.acquire(Some(1)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(
        src.acquire(Some(1)).await,
        Err(AcquireError::QueueFull)
    ));
    drop(_p);
    tokio::time::timeout(Duration::from_secs(2), w)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A release in one process wakes a waiter of another process (pub/sub), faster than the
/// 50 ms safety-net poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_handoff() {
    let Some(server) = RedisServer::start("cross_process_handoff") else {
        return;
    };
    let a = storage(&server.url(), |_| {}).await;
    let b = storage(&server.url(), |_| {}).await;
    let (sa, sb) = (a.capacity_source("/h", 1), b.capacity_source("/h", 1));
    // Let both subscribe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut lat = Vec::new();
    for _ in 0..30 {
        let held = sa.acquire(None).await.unwrap();
        let waiter = tokio::spawn(sb.acquire(None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "granted while the only slot was held elsewhere"
        );
        let t0 = Instant::now();
        drop(held);
        let p = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("hand-off within 2 s")
            .unwrap()
            .unwrap();
        lat.push(t0.elapsed());
        drop(p);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.sort();
    let median = lat[lat.len() / 2];
    eprintln!(
        "cross-process hand-off median {median:?}, max {:?}",
        lat[lat.len() - 1]
    );
    assert!(
        median < portcullis_redis::POLL_INTERVAL,
        "hand-off median {median:?} is not faster than the poll safety net"
    );
}

/// A process that drops its source right after its last permit (the end of its last
/// request, an endpoint removed by a reload) still gives the slot back to Redis at once, and
/// so does a permit that outlives its source: another process gets the slot long before
/// the lease would expire. The source's task stops once both are gone.
///
/// Regression: the source's task used to be aborted with its last clone, discarding the
/// releases it had not run yet; the slot stayed counted until `lease_ttl` (10 s) and
/// the other processes' waiters timed out (504 `queue_timeout` in `tests/admission.rs`).
#[tokio::test]
async fn releases_reach_redis_after_the_source_is_dropped() {
    let Some(server) = RedisServer::start("releases_reach_redis_after_the_source_is_dropped")
    else {
        return;
    };
    let slow_ok = |c: &mut StorageConfig| c.timeout = Duration::from_secs(2);
    let a = storage(&server.url(), slow_ok).await;
    let b = storage(&server.url(), slow_ok).await;
    let sb = b.capacity_source("/drop", 1);
    // Connections are opened lazily (their driver tasks count as alive tasks).
    a.stored_capacity("/drop").await.unwrap();
    sb.refresh().await.unwrap();
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let within = Duration::from_secs(2);
    assert!(within < portcullis_redis::DEFAULT_LEASE_TTL);

    // The permit, then the source at once: on this current-thread runtime nothing else
    // runs in between, so the release is still queued when the last clone goes.
    let sa = a.capacity_source("/drop", 1);
    let p = sa.acquire(None).await.unwrap();
    drop(p);
    drop(sa);
    let q = tokio::time::timeout(within, sb.acquire(None))
        .await
        .expect("the released slot is free again well before the lease expires")
        .unwrap();
    drop(q);
    assert!(released(&server, "/drop", within).await);

    // The permit outlives its source (a request still in flight).
    let sa = a.capacity_source("/drop", 1);
    let p = sa.acquire(None).await.unwrap();
    drop(sa);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        holders_sum(&server, "/drop"),
        1,
        "the live permit keeps its slot"
    );
    // Meanwhile, asking for the endpoint again gives the same slots, not a second count.
    let again = a.capacity_source("/drop", 99);
    assert_eq!((again.capacity(), again.held_locally()), (1, 1));
    drop(again);
    let waiter = tokio::spawn(sb.acquire(None));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "granted while the only slot was held"
    );
    drop(p);
    let q = tokio::time::timeout(within, waiter)
        .await
        .expect("the released slot is free again well before the lease expires")
        .unwrap()
        .unwrap();
    drop(q);
    assert!(released(&server, "/drop", within).await);
    // Nothing of the dropped sources keeps running.
    assert!(
        eventually(within, || tasks() == before).await,
        "{} tasks alive, {before} before the sources",
        tasks()
    );
}

/// Slots of a process that stops heart-beating (dropped without releasing) are reclaimed
/// within lease_ttl + one heartbeat; a live process keeps a slot longer than lease_ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reclaim_after_dead_process() {
    let Some(server) = RedisServer::start("lease_reclaim_after_dead_process") else {
        return;
    };
    let ttl = Duration::from_millis(1000);
    let dead = storage(&server.url(), |c| {
        c.lease_ttl = ttl;
        // A loaded CI box must not turn a slow call into an outage here.
        c.timeout = Duration::from_secs(2);
    })
    .await;
    let live = storage(&server.url(), |c| {
        c.lease_ttl = ttl;
        // A loaded CI box must not turn a slow call into an outage here.
        c.timeout = Duration::from_secs(2);
    })
    .await;
    let sd = dead.capacity_source("/lease", 2);
    let sl = live.capacity_source("/lease", 2);

    // The live process holds one slot for 2.5 × lease_ttl: it must keep it.
    let long = sl.acquire(None).await.unwrap();
    // The "dead" process takes the other slot and vanishes without releasing.
    let leaked = sd.acquire(None).await.unwrap();
    std::mem::forget(leaked);
    drop(sd);
    drop(dead);
    let t0 = Instant::now();
    let p = tokio::time::timeout(ttl * 3, sl.acquire(None))
        .await
        .expect("reclaimed within lease_ttl + heartbeat")
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took <= ttl + ttl / 3 + Duration::from_millis(700),
        "took {took:?}"
    );
    tokio::time::sleep(ttl * 3 / 2).await;
    // Both slots are this live process's: nobody else can get one.
    let other = storage(&server.url(), |c| {
        c.lease_ttl = ttl;
        // A loaded CI box must not turn a slow call into an outage here.
        c.timeout = Duration::from_secs(2);
    })
    .await;
    let so = other.capacity_source("/lease", 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), so.acquire(None))
            .await
            .is_err()
    );
    assert_eq!(holders_sum(&server, "/lease"), 2);
    drop((long, p));
    assert!(released(&server, "/lease", Duration::from_secs(2)).await);
}

async fn restart_mid_load(mode: OnError) {
    let Some(mut server) = RedisServer::start(&format!("restart_mid_load_{mode:?}")) else {
        return;
    };
    const CAP: usize = 4;
    let storage_timeout = Duration::from_millis(300);
    let queue_timeout = Duration::from_millis(800);
    let s = storage(&server.url(), |c| {
        c.on_error = mode;
        c.timeout = storage_timeout;
        c.expected_workers = 2;
        c.lease_ttl = Duration::from_secs(3);
    })
    .await;
    let src = s.capacity_source("/r", CAP);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let inside = Arc::new(AtomicUsize::new(0));
    let max_outage = Arc::new(AtomicUsize::new(0));
    let (ok, unavailable, timed_out) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let worst = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let stop_at = Instant::now() + Duration::from_millis(2500);
    let mut clients = Vec::new();
    for _ in 0..12 {
        let src: RedisCapacity = src.clone();
        let (inside, max_outage, ok, unavailable, timed_out, worst) = (
            inside.clone(),
            max_outage.clone(),
            ok.clone(),
            unavailable.clone(),
            timed_out.clone(),
            worst.clone(),
        );
        clients.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let t0 = Instant::now();
                let r = tokio::time::timeout(queue_timeout, src.acquire(None)).await;
                let waited = t0.elapsed();
                {
                    let mut w = worst.lock().unwrap();
                    *w = (*w).max(waited);
                }
                match r {
                    Ok(Ok(p)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        // Only requests admitted during the outage count against the
                        // per-process limit (requests admitted by Redis just before it
                        // went away finish normally).
                        let in_outage = src.is_degraded();
                        if in_outage {
                            let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            max_outage.fetch_max(n, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if in_outage {
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                        drop(p);
                    }
                    Ok(Err(AcquireError::StorageUnavailable(_))) => {
                        unavailable.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(Err(e)) => panic!("unexpected {e}"),
                    Err(_) => {
                        timed_out.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.stop();
    assert!(
        eventually(Duration::from_secs(2), || src.is_degraded()).await,
        "outage not detected"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.start_again();
    assert!(
        eventually(Duration::from_secs(3), || !src.is_degraded()).await,
        "did not recover"
    );
    // Right after recovery the global count equals this process's live slots.
    let live = src.held_locally() as i64;
    let in_redis = holders_sum(&server, "/r");
    assert!(
        (in_redis - live).abs() <= 1,
        "redis {in_redis} vs live {live}"
    );
    for c in clients {
        c.await.unwrap();
    }
    let worst = *worst.lock().unwrap();
    assert!(
        worst <= queue_timeout + storage_timeout + Duration::from_millis(100),
        "a client waited {worst:?}"
    );
    assert!(ok.load(Ordering::SeqCst) > 0);
    match mode {
        OnError::Local => {
            assert_eq!(unavailable.load(Ordering::SeqCst), 0);
            // ceil(4 / 2) = 2 per process during the outage.
            assert!(
                max_outage.load(Ordering::SeqCst) <= 2,
                "{}",
                max_outage.load(Ordering::SeqCst)
            );
        }
        OnError::Reject => assert!(unavailable.load(Ordering::SeqCst) > 0),
        OnError::Allow => {
            assert_eq!(unavailable.load(Ordering::SeqCst), 0);
            assert!(
                max_outage.load(Ordering::SeqCst) > CAP,
                "allow did not lift the limit"
            );
        }
    }
    assert!(released(&server, "/r", Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_on_error_local() {
    restart_mid_load(OnError::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_on_error_reject() {
    restart_mid_load(OnError::Reject).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_load_on_error_allow() {
    restart_mid_load(OnError::Allow).await;
}

/// The first process probes; the others wait and reuse the stored capacity;
/// `force_reprobe` probes again; a runtime change reaches every process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_store_probes_once_and_propagates() {
    let Some(server) = RedisServer::start("capacity_store") else {
        return;
    };
    let probes = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut storages = Vec::new();
    for _ in 0..3 {
        let s = storage(&server.url(), |_| {}).await;
        storages.push(s.clone());
        let probes = probes.clone();
        tasks.push(tokio::spawn(async move {
            s.get_or_probe("/p", false, || async move {
                probes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(7)
            })
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 7);
    }
    assert_eq!(probes.load(Ordering::SeqCst), 1, "probed more than once");
    let again = storages[1]
        .get_or_probe("/p", true, || async { Ok::<_, std::io::Error>(9) })
        .await
        .unwrap();
    assert_eq!(again, 9);
    assert_eq!(storages[2].stored_capacity("/p").await.unwrap(), Some(9));

    // Sources read the stored value, and a runtime change propagates.
    let a = storages[0].capacity_source("/p", 1);
    let b = storages[1].capacity_source("/p", 1);
    assert!(
        eventually(Duration::from_secs(2), || a.capacity() == 9
            && b.capacity() == 9)
        .await
    );
    a.set_capacity(3);
    assert!(
        eventually(Duration::from_secs(2), || b.capacity() == 3).await,
        "b sees {}",
        b.capacity()
    );
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| b.acquire(None)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.acquire(None))
            .await
            .is_err()
    );
    // Growing wakes the waiter.
    let w = tokio::spawn(a.acquire(None));
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.set_capacity(4);
    tokio::time::timeout(Duration::from_secs(1), w)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(held);
}

/// Readiness turns false only after failure_threshold consecutive failed PINGs, and back on
/// the first success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_ping_with_threshold() {
    let Some(mut server) = RedisServer::start("readiness") else {
        return;
    };
    let s = storage(&server.url(), |c| {
        c.ping_interval = Duration::from_millis(100);
        c.failure_threshold = 3;
        c.timeout = Duration::from_millis(100);
    })
    .await;
    let ready = s.readiness();
    assert!(eventually(Duration::from_secs(1), || ready.pings() >= 2).await);
    assert!(ready.is_ready());
    let rtt = ready
        .last_ping_latency()
        .expect("a successful PING's round trip");
    assert!(
        rtt > Duration::ZERO && rtt < Duration::from_millis(100),
        "{rtt:?}"
    );
    server.stop();
    assert!(eventually(Duration::from_secs(1), || ready.consecutive_failures() >= 1).await);
    if ready.consecutive_failures() < 3 {
        assert!(ready.is_ready(), "not ready before 3 failures");
    }
    assert!(eventually(Duration::from_secs(3), || !ready.is_ready()).await);
    assert!(ready.consecutive_failures() >= 3);
    server.start_again();
    assert!(eventually(Duration::from_secs(3), || ready.is_ready()).await);
}

/// Passwords work and never show in Debug output or errors.
#[tokio::test]
async fn password_is_used_and_never_shown() {
    let Some(server) = RedisServer::start_with("password", &["--requirepass", "s3cr3t-pw"]) else {
        return;
    };
    assert!(server.url().contains("s3cr3t-pw"));
    let s = storage(&server.url(), |_| {}).await;
    let src = s.capacity_source("/pw", 2);
    let p = tokio::time::timeout(Duration::from_secs(2), src.acquire(None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(src.refresh().await.unwrap(), 1);
    drop(p);
    for text in [
        format!("{s:?}"),
        format!("{src:?}"),
        format!("{:?}", s.config()),
        format!("{:?}", s.readiness()),
    ] {
        assert!(!text.contains("s3cr3t-pw"), "{text}");
    }
    // A wrong password: the error does not echo it.
    let bad = storage(&server.url().replace("s3cr3t-pw", "wrong-pw-123"), |c| {
        c.on_error = OnError::Reject;
    })
    .await;
    let src = bad.capacity_source("/pw", 2);
    let e = tokio::time::timeout(Duration::from_secs(2), src.acquire(None))
        .await
        .unwrap()
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("wrong-pw-123"));
}

/// `rediss://` with a password against a real TLS `redis-server` that requires client
/// certificates: with the CA and the client certificate configured the shared limit works
/// (the count lands in Redis), the password shows nowhere, and without the CA file the
/// server's certificate is refused (the call fails, `on_error: reject` answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password_and_client_certificate() {
    let Some((server, files)) =
        RedisServer::start_tls("tls_with_password_and_client_certificate", "tls-pw-42")
    else {
        return;
    };
    let url = server.tls_url().unwrap();
    assert!(url.starts_with("rediss://") && url.contains("tls-pw-42"));
    let s = storage(&url, |c| {
        c.tls_ca_file = Some(files.ca.clone());
        c.tls_cert_file = Some(files.client_cert.clone());
        c.tls_key_file = Some(files.client_key.clone());
        c.timeout = Duration::from_secs(2);
        c.on_error = OnError::Reject;
    })
    .await;
    let src = s.capacity_source("/tls", 2);
    let p = tokio::time::timeout(Duration::from_secs(5), src.acquire(None))
        .await
        .expect("acquire bounded")
        .expect("granted over TLS");
    assert_eq!(
        holders_sum(&server, "/tls"),
        1,
        "the slot is counted in Redis"
    );
    assert_eq!(src.refresh().await.unwrap(), 1);
    drop(p);
    assert!(released(&server, "/tls", Duration::from_secs(3)).await);
    for text in [
        format!("{s:?}"),
        format!("{src:?}"),
        format!("{:?}", s.config()),
    ] {
        assert!(!text.contains("tls-pw-42"), "{text}");
    }

    // The system trust store does not know the test CA: the handshake fails, and the error
    // does not echo the password.
    let untrusted = storage(&url, |c| {
        c.tls_cert_file = Some(files.client_cert.clone());
        c.tls_key_file = Some(files.client_key.clone());
        c.on_error = OnError::Reject;
    })
    .await;
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        untrusted.capacity_source("/tls", 2).acquire(None),
    )
    .await
    .expect("answered")
    .unwrap_err();
    assert!(matches!(e, AcquireError::StorageUnavailable(_)), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("tls-pw-42"));
    assert_eq!(holders_sum(&server, "/tls"), 0);
}

/// A real three-node Redis Cluster: every key of an endpoint hashes to one slot, and the
/// shared limit works across two processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let Some(cluster) = RedisCluster::start("redis_cluster") else {
        return;
    };
    // One seed URL: the cluster is detected.
    let slow = |c: &mut StorageConfig| c.timeout = Duration::from_secs(2);
    let a = storage(&cluster.nodes()[0].url(), slow).await;
    let b = storage(&cluster.url(), slow).await;
    assert!(a.is_cluster() && b.is_cluster());
    for ep in ["/work", "/embed", "/predict"] {
        let (sa, sb) = (a.capacity_source(ep, 2), b.capacity_source(ep, 2));
        let p1 = sa.acquire(None).await.unwrap();
        let p2 = sb.acquire(None).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sb.acquire(None))
                .await
                .is_err()
        );
        let w = tokio::spawn(sb.acquire(None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p1);
        tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(p2);
        let slots: std::collections::BTreeSet<String> =
            ["holders", "leases", "capacity", "queue", "queue_ttl"]
                .iter()
                .map(|k| {
                    cluster.nodes()[0]
                        .cli(&["CLUSTER", "KEYSLOT", &format!("{{portcullis:{ep}}}:{k}")])
                        .trim()
                        .to_owned()
                })
                .collect();
        assert_eq!(slots.len(), 1, "{ep}: keys on several slots {slots:?}");
    }
}

/// `on_error: local`: the requests Redis admitted before the outage still run, so they take
/// their share of the per-process limit: with capacity 4 and 2 expected workers (2 slots
/// each), a process that holds 2 slots from Redis when Redis goes away admits nobody more
/// until one of them ends, and the freed slot goes to the queued fallback waiter at once.
///
/// Regression: the fallback gave 2 more slots on top of the 2 held (4 in this process alone,
/// the whole capacity, while every other process did the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_limit_counts_slots_held_from_redis() {
    let Some(mut server) = RedisServer::start("fallback_limit_counts_slots_held_from_redis") else {
        return;
    };
    let s = storage(&server.url(), |c| {
        c.on_error = OnError::Local;
        c.expected_workers = 2;
        c.timeout = Duration::from_millis(300);
    })
    .await;
    let src = s.capacity_source("/share", 4);
    let p1 = src.acquire(None).await.unwrap();
    let p2 = src.acquire(None).await.unwrap();
    server.stop();
    // This acquire meets the outage and re-routes to the fallback.
    let first = tokio::spawn(src.acquire(None));
    assert!(
        eventually(Duration::from_secs(3), || src.is_degraded()).await,
        "outage not detected"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished(),
        "admitted beyond the local share: 2 slots from redis still run"
    );
    let second = tokio::spawn(src.acquire(None));
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(p1);
    let q1 = tokio::time::timeout(Duration::from_secs(1), first)
        .await
        .expect("the freed slot goes to the fallback waiter")
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished(), "3 slots in a local share of 2");
    drop(p2);
    let q2 = tokio::time::timeout(Duration::from_secs(1), second)
        .await
        .expect("the freed slot goes to the fallback waiter")
        .unwrap()
        .unwrap();
    assert!(src.is_degraded());
    assert!(eventually(Duration::from_secs(1), || src.held_locally() == 2).await);
    // Back to Redis: the fallback's permits are registered, then released.
    server.start_again();
    assert!(eventually(Duration::from_secs(5), || !src.is_degraded()).await);
    assert!(
        eventually(Duration::from_secs(2), || holders_sum(&server, "/share")
            == 2)
        .await
    );
    drop((q1, q2));
    assert!(released(&server, "/share", Duration::from_secs(2)).await);
}

/// Two processes (two storages, two instance ids) each run 8 clients in a loop against a
/// capacity of 4: both get a fair part of the slots, and the global limit holds.
///
/// Regression: a process batches its releases into its next acquire (one call gives back
/// and takes again), so a busy process handed its own freed slots to its own waiters and
/// the other process got next to none (its clients then hit their queue timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_process_does_not_starve_another() {
    let Some(server) = RedisServer::start("busy_process_does_not_starve_another") else {
        return;
    };
    const CAP: usize = 4;
    let (a, b) = (
        storage(&server.url(), |_| {}).await,
        storage(&server.url(), |_| {}).await,
    );
    let sources = [
        a.capacity_source("/fair", CAP),
        b.capacity_source("/fair", CAP),
    ];
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let grants = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let longest = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        for _ in 0..8 {
            let src = src.clone();
            let (inside, max_inside, grants, longest) = (
                inside.clone(),
                max_inside.clone(),
                grants.clone(),
                longest.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let asked = Instant::now();
                    let p = tokio::time::timeout(Duration::from_secs(10), src.acquire(None))
                        .await
                        .expect("acquire bounded")
                        .expect("granted");
                    longest.fetch_max(asked.elapsed().as_millis() as usize, Ordering::SeqCst);
                    grants[i].fetch_add(1, Ordering::SeqCst);
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(p);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ga, gb) = (
        grants[0].load(Ordering::SeqCst),
        grants[1].load(Ordering::SeqCst),
    );
    let total = ga + gb;
    println!(
        "grants: process A {ga}, process B {gb}; longest wait {} ms",
        longest.load(Ordering::SeqCst)
    );
    assert!(max_inside.load(Ordering::SeqCst) <= CAP);
    assert!(total > 50, "only {total} grants in 2 s");
    for (name, g) in [("A", ga), ("B", gb)] {
        assert!(
            g * 4 >= total,
            "process {name} got {g} of {total} grants (under a quarter)"
        );
    }
    assert!(released(&server, "/fair", Duration::from_secs(3)).await);
}

/// `on_error: local`, Redis restarted empty: the process that notices first keeps to its
/// local share until the others (which also served their share during the outage, unknown
/// to the new Redis) have had time to re-register. Capacity 4, 2 expected workers: A and B
/// each run 2 through the outage; B recovers fast (lease_ttl 0.3 s: retries every 100 ms),
/// A slowly (retries up to every second). B's 4 clients never run more than 2 at once, and
/// once A re-registered, A + B stay within 4.
///
/// Regression: B re-registered its 2, saw 2 free in the empty Redis, and ran 4 next to A's
/// 2 (the gateway test saw 12 against a limit of 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_to_recover_keeps_to_its_share_until_others_re_register() {
    let Some(mut server) = RedisServer::start("first_to_recover_keeps_to_its_share") else {
        return;
    };
    let local = |ttl: u64| {
        move |c: &mut StorageConfig| {
            c.on_error = OnError::Local;
            c.expected_workers = 2;
            c.timeout = Duration::from_millis(300);
            c.lease_ttl = Duration::from_millis(ttl);
        }
    };
    let a = storage(&server.url(), local(3000)).await;
    let b = storage(&server.url(), local(300)).await;
    let (sa, sb) = (
        a.capacity_source("/grace", 4),
        b.capacity_source("/grace", 4),
    );
    // Learn the capacity before the outage.
    sa.refresh().await.unwrap();
    sb.refresh().await.unwrap();
    server.stop();
    // Each runs its local share of 2 through the outage.
    assert!(
        eventually(Duration::from_secs(3), || {
            let (a, b) = (sa.clone(), sb.clone());
            tokio::spawn(async move { (a.refresh().await, b.refresh().await) });
            sa.is_degraded() && sb.is_degraded()
        })
        .await
    );
    let pa = vec![
        sa.acquire(None).await.unwrap(),
        sa.acquire(None).await.unwrap(),
    ];
    let inside_b = Arc::new(AtomicUsize::new(0));
    let max_b = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (src, inside, max, stop) = (sb.clone(), inside_b.clone(), max_b.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok(Ok(p)) =
                    tokio::time::timeout(Duration::from_secs(10), src.acquire(None)).await
                else {
                    panic!("B's acquire failed or hung");
                };
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                drop(p);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.start_again();
    // B is back within its 100 ms retry; A within a second or so (its retries back off).
    assert!(eventually(Duration::from_secs(3), || !sb.is_degraded()).await);
    assert!(eventually(Duration::from_secs(5), || !sa.is_degraded()).await);
    // Load on for a while after both re-registered.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let max = max_b.load(Ordering::SeqCst);
    println!("B ran at most {max} at once; A held {}", pa.len());
    assert!(
        max <= 2,
        "B ran {max} at once while A still held its share of 2 (capacity 4)"
    );
    drop(pa);
    assert!(released(&server, "/grace", Duration::from_secs(3)).await);
}

/// `on_error: local`, uneven holdings when Redis goes away: capacity 4, 2 expected workers
/// (share 2). A holds 1 slot, B holds 3. During the outage A does not add its whole share on
/// top of B's 3 (A may run only what B left free, 1, which its own request fills) until A's
/// own pre-outage request has ended; B, over its share, admits nobody new.
///
/// Regression: A admitted 1 more at once (share 2 minus its 1), and the backend saw 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_start_counts_what_other_processes_held() {
    let Some(mut server) = RedisServer::start("outage_start_counts_other_processes") else {
        return;
    };
    let cfg = |c: &mut StorageConfig| {
        c.on_error = OnError::Local;
        c.expected_workers = 2;
        c.timeout = Duration::from_millis(300);
        c.lease_ttl = Duration::from_millis(600);
    };
    let (a, b) = (
        storage(&server.url(), cfg).await,
        storage(&server.url(), cfg).await,
    );
    let (sa, sb) = (
        a.capacity_source("/uneven", 4),
        b.capacity_source("/uneven", 4),
    );
    let pa = sa.acquire(None).await.unwrap();
    let mut pb = Vec::new();
    for _ in 0..3 {
        pb.push(sb.acquire(None).await.unwrap());
    }
    assert_eq!(holders_sum(&server, "/uneven"), 4);
    // One heartbeat of A (every 200 ms) after B's grants: A has seen B's 3.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.stop();
    assert!(
        eventually(Duration::from_secs(3), || sa.is_degraded()
            && sb.is_degraded())
        .await
    );
    let a_next = tokio::spawn(sa.acquire(None));
    let b_next = tokio::spawn(sb.acquire(None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !a_next.is_finished(),
        "A admitted a second request while B still ran its 3 (capacity 4)"
    );
    assert!(
        !b_next.is_finished(),
        "B admitted a 4th request over its share"
    );
    // A's own pre-outage request ends: B's are taken to have ended too; A gets its share.
    drop(pa);
    let qa = tokio::time::timeout(Duration::from_secs(1), a_next)
        .await
        .expect("A admits once its own pre-outage request ended")
        .unwrap()
        .unwrap();
    drop(pb);
    let qb = tokio::time::timeout(Duration::from_secs(1), b_next)
        .await
        .expect("B admits once below its share")
        .unwrap()
        .unwrap();
    drop((qa, qb));
}

/// A source outlives the storage handle that built it: the pub/sub listener keeps running
/// for it, so a capacity stored by another process reaches it by notification, long before
/// its next heartbeat (every 10 s here) would read it.
///
/// Regression: the listener's subscription channel closed with the last storage handle,
/// and the listener stopped while its sources were still serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_a_source_whose_storage_was_dropped() {
    let Some(server) = RedisServer::start("notifications_reach_a_source_whose_storage_was_dropped")
    else {
        return;
    };
    let slow_heartbeat = |c: &mut StorageConfig| c.lease_ttl = Duration::from_secs(30);
    let a = storage(&server.url(), slow_heartbeat).await;
    let src = a.capacity_source("/notified", 3);
    drop(a);
    let channel = "{portcullis:/notified}:events";
    let subscribed = || {
        let out = server.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines().nth(1).map(str::trim) == Some("1")
    };
    assert!(
        eventually(Duration::from_secs(5), subscribed).await,
        "the listener subscribed"
    );
    assert!(eventually(Duration::from_secs(2), || src.capacity() == 3).await);

    let b = storage(&server.url(), slow_heartbeat).await;
    b.store_capacity("/notified", 7).await.unwrap();
    assert!(
        eventually(Duration::from_secs(3), || src.capacity() == 7).await,
        "the capacity change reached the source (capacity {})",
        src.capacity()
    );
    assert!(subscribed(), "still subscribed");
}
