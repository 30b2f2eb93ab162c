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
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

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
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<io::Result<bool>>(listeners.len());
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("portcullis-worker-{i}"))
            .spawn(move || {
                let result = (|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
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
        match tokio::time::timeout_at(deadline.into(), done_rx.recv()).await {
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
