//! A thread-per-core server: `workers` threads, each with its own current-thread tokio
//! runtime and its own `SO_REUSEPORT` listener on the same address, all serving clones of
//! one router.
//!
//! Why: on a multi-thread runtime every accepted connection, every upstream response and
//! every pooled connection hand-off may wake a task on the other worker (a futex and a
//! cross-core cache miss each). With one runtime per core the kernel spreads connections
//! over the listeners, a request is served start to end on one thread, and the proxy's
//! per-thread connection pool (see [`Proxy`](super::Proxy)) keeps upstream connections
//! on the thread that uses them. The layers' shared state (the replica registry, the
//! admission limiters, the breaker) is atomics and `ArcSwap` snapshots, so it is shared by
//! all threads without locks. Background tasks (health checks, probes, Redis) stay on the
//! runtime that built the [`Gateway`](super::Gateway).
//!
//! BENCHMARKS.md has the measurements that motivated this.

use axum::Router;
use portcullis_health::{Component, HealthRegistry};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::time::Instant;

/// Binds `workers` listeners on `addr` with `SO_REUSEPORT` (the first one picks the port when
/// `addr` has port 0; the others bind the same port).
pub fn bind_reuseport(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(workers.max(1));
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// Serves `router` on `listeners`, one thread and one current-thread runtime per listener,
/// until `shutdown` resolves; then every thread stops accepting and in-flight requests get
/// up to `drain` to finish.
///
/// Returns `Ok(true)` when every connection drained in time, `Ok(false)` when the drain
/// timeout cut some off. Must be awaited on a tokio runtime (the caller's), which keeps
/// running the gateway's background tasks meanwhile.
pub async fn serve_sharded(
    listeners: Vec<std::net::TcpListener>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> io::Result<bool> {
    serve_sharded_watched(listeners, router, shutdown, drain, None).await
}

/// How often each worker's runtime proves it still runs tasks.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// A worker whose runtime has not run its heartbeat task for this long is wedged.
pub const WEDGED_AFTER: Duration = Duration::from_secs(5);

/// [`serve_sharded`] with an event-loop watchdog: each worker's runtime ticks a heartbeat
/// every 250 ms; when one has not ticked for [`WEDGED_AFTER`] (a handler blocking its thread,
/// a busy loop), the `event_loop` component of `health` is marked wedged, so `GET /healthz`
/// (answered by the other workers, or the standalone health server) turns 503 and the
/// orchestrator can restart the process. It recovers by itself when the worker ticks again.
pub async fn serve_sharded_watched(
    listeners: Vec<std::net::TcpListener>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    health: Option<HealthRegistry>,
) -> io::Result<bool> {
    let epoch = Instant::now();
    let beats: Arc<Vec<AtomicU64>> =
        Arc::new((0..listeners.len()).map(|_| AtomicU64::new(0)).collect());
    let watchdog = health.map(|h| {
        let component = h.register_ready("event_loop");
        tokio::spawn(watch_workers(epoch, Arc::clone(&beats), component))
    });
    let result = serve_inner(listeners, router, shutdown, drain, epoch, beats).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    result
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn watch_workers(epoch: Instant, beats: Arc<Vec<AtomicU64>>, component: Component) {
    let mut tick = tokio::time::interval(HEARTBEAT * 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = u64::try_from(WEDGED_AFTER.as_millis()).unwrap_or(u64::MAX);
    loop {
        tick.tick().await;
        let now = millis_since(epoch);
        let stalled: Vec<String> = beats
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let last = b.load(Ordering::Relaxed);
                let age = now.saturating_sub(last);
                (last > 0 && age > limit).then(|| format!("worker {i} stalled for {age} ms"))
            })
            .collect();
        let wedged = !stalled.is_empty();
        if wedged != component.is_wedged() {
            if wedged {
                tracing::error!(stalled = ?stalled, "event loop wedged: /healthz answers 503");
            } else {
                tracing::info!("event loops run again: /healthz answers 200");
            }
        }
        component.set_wedged(wedged);
        component.set_detail(wedged.then(|| stalled.join(", ")));
    }
}

async fn serve_inner(
    listeners: Vec<std::net::TcpListener>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    epoch: Instant,
    beats: Arc<Vec<AtomicU64>>,
) -> io::Result<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<io::Result<bool>>(listeners.len());
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        let beats = Arc::clone(&beats);
        let thread = std::thread::Builder::new()
            .name(format!("portcullis-worker-{i}"))
            .spawn(move || {
                let result = (|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let heartbeat = tokio::spawn(async move {
                            loop {
                                beats[i].store(millis_since(epoch).max(1), Ordering::Relaxed);
                                tokio::time::sleep(HEARTBEAT).await;
                            }
                        });
                        let _stop_heartbeat = AbortOnDrop(heartbeat);
                        std_listener.set_nonblocking(true)?;
                        let listener = TcpListener::from_std(std_listener)?;
                        let server = axum::serve(
                            listener,
                            router.into_make_service_with_connect_info::<SocketAddr>(),
                        )
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        });
                        server.await.map(|()| true)
                    })
                })();
                let _ = done.blocking_send(result);
            })?;
        threads.push(thread);
    }
    drop(done_tx);
    let workers = threads.len();
    let mut finished = 0;
    let mut first_error = None;
    tokio::pin!(shutdown);
    // Serve until the shutdown signal (or until a worker dies on an error).
    tokio::select! {
        () = &mut shutdown => {}
        r = done_rx.recv() => {
            finished += 1;
            if let Some(Err(e)) = r {
                first_error = Some(e);
            }
        }
    }
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + drain;
    let mut drained = true;
    while finished < workers {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(Ok(_))) => finished += 1,
            Ok(Some(Err(e))) => {
                finished += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                drained = false;
                break;
            }
        }
    }
    if drained {
        for t in threads {
            let _ = t.join();
        }
    }
    // Threads still draining past the deadline are left to the process exit.
    match first_error {
        Some(e) => Err(e),
        None => Ok(drained),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_stops_ticking_wedges_liveness_until_it_ticks_again() {
        let health = HealthRegistry::new();
        let component = health.register_ready("event_loop");
        let epoch = Instant::now();
        let beats = Arc::new(vec![AtomicU64::new(1), AtomicU64::new(1)]);
        let task = tokio::spawn(watch_workers(epoch, Arc::clone(&beats), component.clone()));
        // Worker 0 keeps ticking, worker 1 stops after its first beat.
        let ticker = {
            let beats = Arc::clone(&beats);
            tokio::spawn(async move {
                loop {
                    beats[0].store(millis_since(epoch).max(1), Ordering::Relaxed);
                    tokio::time::sleep(HEARTBEAT).await;
                }
            })
        };
        tokio::time::sleep(WEDGED_AFTER - Duration::from_millis(600)).await;
        assert!(health.is_live(), "not wedged before {WEDGED_AFTER:?}");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!health.is_live(), "worker 1 stalled past {WEDGED_AFTER:?}");
        assert!(component.detail().unwrap().contains("worker 1"));
        // Worker 1 runs again.
        beats[1].store(millis_since(epoch), Ordering::Relaxed);
        tokio::time::sleep(HEARTBEAT * 3).await;
        assert!(health.is_live());
        task.abort();
        ticker.abort();
    }
}
