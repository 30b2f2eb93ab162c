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
//!
//! # Connection limits
//!
//! Every client connection is bounded by [`ConnectionLimits`] (the config's
//! `client_header_timeout`, `client_idle_timeout` and `max_connections`):
//!
//! - **Request head.** An HTTP/1 client has `client_header_timeout` to send a complete
//!   request head, counted from the accept (first request) or from the first byte after a
//!   keep-alive pause. After it the gateway answers 408 `client_timeout` (when the client
//!   sent part of a head; a connection that sent nothing is just closed) and closes. A
//!   trickle of bytes does not extend it: slowloris connections are closed on time.
//! - **Idle.** A connection with no request in flight (HTTP/1 keep-alive between requests,
//!   or HTTP/2 with no open stream; HTTP/2 PINGs do not count as activity) is closed after
//!   `client_idle_timeout`: HTTP/1 at once, HTTP/2 with a GOAWAY. HTTP/2 connections are
//!   also PINGed after `client_idle_timeout` of silence and dropped when the PING is not
//!   answered within `client_header_timeout` (a peer that vanished while streams were open).
//! - **Count.** At `max_connections` open connections per process the accept loops stop
//!   accepting: new connections wait in the kernel's accept backlog (`listen(1024)`) and are
//!   accepted as earlier ones close. The slot is an RAII permit owned by the socket, so it
//!   is freed exactly when the socket is closed.
//!
//! hyper's own `http1::Builder::header_read_timeout` is not used: in hyper 1.x its timer
//! starts when the connection begins waiting for a head, which includes the idle time
//! between keep-alive requests (`Conn::poll_read_head` arms it right after the previous
//! response), so it cannot tell a slow head from an idle connection, and it closes without
//! an answer. The connection state machine here (`ConnState`) tells the two apart.

use super::front::{App, AppConn, AppFuture};
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use portcullis_health::{Component, HealthRegistry};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::task::AbortOnDropHandle;

use super::config::GatewayConfig;

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

/// Serves `app` (a [`Router`](axum::Router), or [`Gateway::app`](super::Gateway::app)) on
/// `listeners`, one thread and one current-thread runtime per listener,
/// until `shutdown` resolves; then every thread stops accepting and in-flight requests get
/// up to `drain` to finish.
///
/// Returns `Ok(true)` when every connection drained in time, `Ok(false)` when the drain
/// timeout cut some off. Must be awaited on a tokio runtime (the caller's), which keeps
/// running the gateway's background tasks meanwhile.
pub async fn serve_sharded(
    listeners: Vec<std::net::TcpListener>,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> io::Result<bool> {
    serve_sharded_watched(
        listeners,
        app,
        shutdown,
        drain,
        None,
        ConnectionLimits::default(),
    )
    .await
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
///
/// Every connection is bounded by `limits`; `max_connections` counts the connections of all
/// the workers together.
pub async fn serve_sharded_watched(
    listeners: Vec<std::net::TcpListener>,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    health: Option<HealthRegistry>,
    limits: ConnectionLimits,
) -> io::Result<bool> {
    let epoch = Instant::now();
    let beats: Arc<Vec<AtomicU64>> =
        Arc::new((0..listeners.len()).map(|_| AtomicU64::new(0)).collect());
    let watchdog = health.map(|h| {
        let component = h.register_ready("event_loop");
        tokio::spawn(watch_workers(epoch, Arc::clone(&beats), component))
    });
    let result = serve_inner(listeners, app.into(), shutdown, drain, epoch, beats, limits).await;
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
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    epoch: Instant,
    beats: Arc<Vec<AtomicU64>>,
    limits: ConnectionLimits,
) -> io::Result<bool> {
    let permits = ConnectionPermits::new(limits.max_connections);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<io::Result<bool>>(listeners.len());
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, std_listener) in listeners.into_iter().enumerate() {
        let app = app.clone();
        let stop = stop_rx.clone();
        let permits = permits.clone();
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
                        let _stop_heartbeat = AbortOnDropHandle::new(heartbeat);
                        std_listener.set_nonblocking(true)?;
                        let listener = TcpListener::from_std(std_listener)?;
                        accept_loop(listener, app, limits, permits, stop).await;
                        Ok(true)
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

/// The limits every client connection is held to (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    /// `client_header_timeout`: time to send a complete HTTP/1 request head.
    pub header_timeout: Duration,
    /// `client_idle_timeout`: time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// `max_connections`: connections open at once per process (0 = unlimited).
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The limits of `config`.
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            header_timeout: config.client_header_timeout,
            idle_timeout: config.client_idle_timeout,
            max_connections: config.max_connections,
        }
    }
}

impl Default for ConnectionLimits {
    /// The config's defaults: 10 s head, 75 s idle, 10,000 connections.
    fn default() -> Self {
        Self::from_config(&GatewayConfig::default())
    }
}

/// The `max_connections` slots of one process, shared by its accept loops.
#[derive(Debug, Clone)]
struct ConnectionPermits(Option<Arc<Semaphore>>);

impl ConnectionPermits {
    /// `max` slots; 0 = unlimited.
    fn new(max: usize) -> Self {
        Self((max > 0).then(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))))
    }

    /// Waits for a free slot (at once when unlimited). `None` in the permit means unlimited.
    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        match &self.0 {
            // The semaphore is never closed, so `acquire_owned` cannot fail.
            Some(s) => Arc::clone(s).acquire_owned().await.ok(),
            None => None,
        }
    }
}

/// Serves `listener` on the current runtime until `stop` turns true (or its sender is
/// dropped); then stops accepting, asks every connection to shut down gracefully, and
/// returns once all of them have ended. The caller bounds that wait (the drain timeout).
async fn accept_loop(
    listener: TcpListener,
    app: App,
    limits: ConnectionLimits,
    permits: ConnectionPermits,
    stop: watch::Receiver<bool>,
) {
    // Every connection task holds a clone of `open_rx`; `open_tx.closed()` resolves when the
    // last one ended.
    let (open_tx, open_rx) = watch::channel(());
    let mut stopping = stop.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    // Readiness first, then a slot, then the accept: a worker whose listener has nothing
    // pending holds no slot (with SO_REUSEPORT the kernel picks the listener), and at the
    // limit a pending connection stays in the kernel's backlog, not accepted.
    // `AsyncFd::new` is deprecated because a `T: AsRawFd` may not own its descriptor; here
    // it owns it (a std TcpListener moved in), which is the sound case, and its replacement
    // `register` is `unsafe` (forbidden in this crate).
    #[allow(deprecated)]
    let watched = listener.into_std().and_then(AsyncFd::new);
    let listener = match watched {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the listener");
            return;
        }
    };
    loop {
        let mut ready = tokio::select! {
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "listener failed");
                    break;
                }
            },
            () = &mut stopped => break,
        };
        let permit = tokio::select! {
            p = permits.acquire() => p,
            () = &mut stopped => break,
        };
        let accepted = match ready.try_io(|l| l.get_ref().accept()) {
            Ok(r) => r.and_then(|(s, peer)| {
                s.set_nonblocking(true)?;
                Ok((TcpStream::from_std(s)?, peer))
            }),
            // Nothing pending after all (another thread took it): wait again.
            Err(_would_block) => continue,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                drop(permit);
                if accept_error_is_fatal_to_the_loop(&e) {
                    // Out of file descriptors (or similar): let connections close before
                    // trying again, instead of spinning on the error.
                    tracing::error!(error = %e, "accept failed; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut stopped => break,
                    }
                }
                continue;
            }
        };
        let serving = Serving {
            peer,
            app: app.connection(),
            limits,
            permit,
            stop: stop.clone(),
            _open: open_rx.clone(),
        };
        match app.tls() {
            None => {
                tokio::spawn(serve_connection(stream, serving, false));
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    // The handshake holds the connection's slot and is bounded by
                    // `tls.handshake_timeout`; a stop cuts it short.
                    let mut stop = serving.stop.clone();
                    let handshake = tokio::select! {
                        s = tls.accept(stream) => s,
                        _ = stop.wait_for(|s| *s) => None,
                    };
                    if let Some(stream) = handshake {
                        serve_connection(stream, serving, true).await;
                    }
                });
            }
        }
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
}

/// Whether the accept loop should back off after `e` (a resource error) rather than go on
/// at once (an error of that one connection, such as a reset before it was accepted).
fn accept_error_is_fatal_to_the_loop(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// What one accepted connection is served with.
struct Serving {
    peer: SocketAddr,
    app: AppConn,
    limits: ConnectionLimits,
    /// The connection's `max_connections` slot.
    permit: Option<OwnedSemaphorePermit>,
    stop: watch::Receiver<bool>,
    /// Tells the accept loop the connection is still open.
    _open: watch::Receiver<()>,
}

/// Serves one client connection (HTTP/1 or HTTP/2, by ALPN or prior knowledge) with
/// `limits`, until the client or the limits close it, or `stop` turns true and it has shut
/// down gracefully. `stream` is the TCP socket, or the TLS stream over it (`tls`).
async fn serve_connection<S>(stream: S, serving: Serving, tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Serving {
        peer,
        app,
        limits,
        permit,
        mut stop,
        _open,
    } = serving;
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(TimedIo::new(stream, Arc::clone(&state), permit));
    let service = ConnService {
        app,
        peer,
        state: Arc::clone(&state),
        tls,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The head timeout is ConnState's (see the module docs for why not hyper's).
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        // CONNECT protocol for HTTP/2 websockets, as axum::serve enables it.
        .enable_connect_protocol()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.header_timeout);
    let conn = Limited::new(
        builder.serve_connection_with_upgrades(io, service),
        state,
        limits,
    );
    tokio::pin!(conn);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                break;
            }
            () = &mut stopped, if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The phase of a connection, packed with the instant it began into one atomic word:
/// `(milliseconds since the accept) << 2 | phase`.
const PHASE_HEAD: u64 = 0;
const PHASE_BUSY: u64 = 1;
const PHASE_IDLE: u64 = 2;

/// What a connection is doing, shared by its socket wrapper ([`TimedIo`]), its requests
/// ([`RequestGuard`]) and its watchdog ([`Limited`]).
///
/// The states:
/// - *head*: waiting for a request head; began at the accept, or at the first byte after
///   an idle pause (HTTP/1). Ends after `client_header_timeout`.
/// - *busy*: at least one request in flight (from its head to the end of its response
///   body, or until it is dropped). No connection timeout: the request's own timeouts apply.
/// - *idle*: no request in flight; began when the last one ended, or when an HTTP/2 client
///   finished its preface. Ends after `client_idle_timeout`.
///
/// A request in flight always wins over the packed phase (`in_flight > 0` is *busy*), so
/// HTTP/2 streams ending and starting on other threads never make a busy connection idle.
#[derive(Debug)]
struct ConnState {
    accepted: Instant,
    phase: AtomicU64,
    in_flight: AtomicUsize,
    /// The client spoke the HTTP/2 preface: its streams run on other tasks, so the last one
    /// ending must wake the watchdog.
    h2: AtomicBool,
    /// The head timeout passed: the socket reports end-of-file (after a 408) from now on.
    timed_out: AtomicBool,
    watchdog: AtomicWaker,
}

impl ConnState {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            phase: AtomicU64::new(PHASE_HEAD),
            in_flight: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            watchdog: AtomicWaker::new(),
        }
    }

    fn pack(&self, phase: u64) -> u64 {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX >> 2);
        (ms.min(u64::MAX >> 2) << 2) | phase
    }

    fn enter(&self, phase: u64) {
        self.phase.store(self.pack(phase), Ordering::Release);
    }

    /// An HTTP/1 byte arrived: an idle connection starts waiting for a head.
    fn on_h1_bytes(&self) {
        if self.phase.load(Ordering::Relaxed) & 3 == PHASE_IDLE {
            self.enter(PHASE_HEAD);
        }
    }

    /// The client finished the HTTP/2 preface: idle until its first stream.
    fn on_h2_preface(&self) {
        self.h2.store(true, Ordering::Release);
        self.enter(PHASE_IDLE);
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.phase.store(PHASE_BUSY, Ordering::Release);
    }

    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.enter(PHASE_IDLE);
            if self.h2.load(Ordering::Acquire) {
                // The stream ended on its own task; the watchdog may be parked as busy.
                self.watchdog.wake();
            }
        }
    }

    /// The phase now and when it ends (`None`: busy, no deadline).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(u64, Instant)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let word = self.phase.load(Ordering::Acquire);
        let since = self.accepted + Duration::from_millis(word >> 2);
        match word & 3 {
            PHASE_HEAD => Some((PHASE_HEAD, since + limits.header_timeout)),
            PHASE_IDLE => Some((PHASE_IDLE, since + limits.idle_timeout)),
            _ => None,
        }
    }
}

/// How long a connection that timed out may take to close before it is dropped outright.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What [`Limited`] has done to its connection.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Enforcement {
    /// Nothing: the connection serves.
    Serving,
    /// The head timeout passed; the connection is dropped if still open at this instant.
    TimedOut(Instant),
    /// The idle timeout passed and a graceful shutdown began; the connection is dropped if
    /// still open and idle at this instant.
    Closing(Instant),
}

/// A connection that shuts down gracefully on request (hyper's connection types).
trait GracefulShutdown {
    /// Stop taking requests; finish those in flight, then end.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulShutdown for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

pin_project_lite::pin_project! {
    /// A connection future with its watchdog: one timer, set to the end of the current
    /// phase of [`ConnState`] and moved only when that end moves earlier (a later end is
    /// found when the timer fires, and the timer is set again).
    struct Limited<C> {
        #[pin]
        conn: C,
        #[pin]
        timer: Sleep,
        // The instant `timer` is set to; `None` once it fired (or before it is first set).
        armed: Option<Instant>,
        state: Arc<ConnState>,
        limits: ConnectionLimits,
        enforcement: Enforcement,
    }
}

impl<C> Limited<C> {
    fn new(conn: C, state: Arc<ConnState>, limits: ConnectionLimits) -> Self {
        Self {
            conn,
            timer: tokio::time::sleep_until(Instant::now()),
            armed: None,
            state,
            limits,
            enforcement: Enforcement::Serving,
        }
    }
}

impl<C: GracefulShutdown> Limited<C> {
    /// Starts the connection's graceful shutdown (the drain); its timeouts still apply.
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.project().conn.graceful_shutdown();
    }
}

impl<C, E> Future for Limited<C>
where
    C: Future<Output = Result<(), E>> + GracefulShutdown,
{
    type Output = Result<(), E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        this.state.watchdog.register(cx.waker());
        loop {
            if let Poll::Ready(r) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            let current = this.state.deadline(this.limits);
            let deadline = match *this.enforcement {
                Enforcement::Serving => current.map(|(_, at)| at),
                Enforcement::TimedOut(at) => Some(at),
                // A request that slipped in before the shutdown finishes.
                Enforcement::Closing(at) => current.map(|_| at),
            };
            let Some(deadline) = deadline else {
                // Busy: the request's end (or the timer, if set) polls us again.
                return Poll::Pending;
            };
            if this.armed.is_none_or(|armed| deadline < armed) {
                this.timer.as_mut().reset(deadline);
                *this.armed = Some(deadline);
            }
            ready!(this.timer.as_mut().poll(cx));
            *this.armed = None;
            let now = Instant::now();
            if deadline > now {
                // The timer was set for an earlier end that has moved: set it again.
                continue;
            }
            match (*this.enforcement, current) {
                (Enforcement::Serving, Some((PHASE_HEAD, _))) => {
                    tracing::debug!(
                        timeout = ?this.limits.header_timeout,
                        "client_header_timeout: closing the connection"
                    );
                    // The socket answers 408 and reports end-of-file on hyper's next read,
                    // which the loop makes at once.
                    this.state.timed_out.store(true, Ordering::Release);
                    *this.enforcement = Enforcement::TimedOut(now + CLOSE_GRACE);
                }
                (Enforcement::Serving, _) => {
                    this.conn.as_mut().graceful_shutdown();
                    *this.enforcement = Enforcement::Closing(now + CLOSE_GRACE);
                }
                (Enforcement::TimedOut(_) | Enforcement::Closing(_), _) => {
                    // It did not close in time: drop it.
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the socket wrapper knows of the protocol.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface have arrived, and nothing else yet.
    Sniffing(usize),
    Http1,
    Http2,
}

/// A client socket that feeds [`ConnState`] (bytes of a new HTTP/1 head, the HTTP/2
/// preface), answers 408 and reports end-of-file once the head timeout passed, and owns the
/// connection's `max_connections` slot (freed when the socket is closed, upgraded
/// connections included).
#[derive(Debug)]
struct TimedIo<S> {
    inner: S,
    state: Arc<ConnState>,
    protocol: Protocol,
    /// Bytes read from the client so far.
    received: u64,
    /// The 408 was written (or could not be).
    answered: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<S: AsyncWrite + Unpin> TimedIo<S> {
    fn new(inner: S, state: Arc<ConnState>, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            inner,
            state,
            protocol: Protocol::Sniffing(0),
            received: 0,
            answered: false,
            _permit: permit,
        }
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        self.received += bytes.len() as u64;
        match self.protocol {
            Protocol::Http1 => self.state.on_h1_bytes(),
            Protocol::Http2 => {}
            Protocol::Sniffing(seen) => {
                let want = &H2_PREFACE[seen..];
                let n = want.len().min(bytes.len());
                self.protocol = if bytes[..n] != want[..n] {
                    Protocol::Http1
                } else if seen + n == H2_PREFACE.len() {
                    self.state.on_h2_preface();
                    Protocol::Http2
                } else {
                    Protocol::Sniffing(seen + n)
                };
            }
        }
    }

    /// Writes the 408 once, best effort (a client that does not read gets the close only).
    fn answer_timeout(&mut self, cx: &mut Context<'_>) {
        if self.answered {
            return;
        }
        self.answered = true;
        if self.protocol != Protocol::Http1 || self.received == 0 {
            return;
        }
        let body = format!(
            r#"{{"error":"{}","message":"the request head was not complete within client_header_timeout"}}"#,
            portcullis_core::codes::CLIENT_TIMEOUT
        );
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = Pin::new(&mut self.inner).poll_write(cx, response.as_bytes());
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.timed_out.load(Ordering::Acquire) {
            this.answer_timeout(cx);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let filled = buf.filled();
        if filled.len() > before {
            this.on_bytes(&filled[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `X-Forwarded-Proto`, set by the server on TLS connections (the client's own is replaced).
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");

/// The app as one connection's hyper service: each request gets the client's address as
/// `ConnectInfo<SocketAddr>` (as `into_make_service_with_connect_info` gives it) and a
/// [`RequestGuard`] that keeps the connection busy until its response body ends.
#[derive(Debug)]
struct ConnService {
    app: AppConn,
    peer: SocketAddr,
    state: Arc<ConnState>,
    /// The connection is TLS: requests go upstream with `X-Forwarded-Proto: https`.
    tls: bool,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<GuardedBody>;
    type Error = Infallible;
    type Future = ConnFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if self.tls {
            req.headers_mut()
                .insert(X_FORWARDED_PROTO, http::HeaderValue::from_static("https"));
        }
        let guard = RequestGuard::new(Arc::clone(&self.state));
        let inner = self.app.call(req.map(Body::new));
        ConnFuture {
            inner,
            guard: Some(guard),
        }
    }
}

/// Keeps its connection busy while alive (one per request).
#[derive(Debug)]
struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    fn new(state: Arc<ConnState>) -> Self {
        state.request_started();
        Self(state)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// The app's response future; hands its [`RequestGuard`] to the response body.
    struct ConnFuture {
        #[pin]
        inner: AppFuture,
        guard: Option<RequestGuard>,
    }
}

impl Future for ConnFuture {
    type Output = Result<Response<GuardedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| GuardedBody {
            body,
            _guard: guard,
        })))
    }
}

/// A response body holding its request's [`RequestGuard`]: the request ends when hyper is
/// done with the body (sent or dropped).
#[derive(Debug)]
struct GuardedBody {
    body: Body,
    _guard: Option<RequestGuard>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `drain` to finish. Connections get the default
/// [`ConnectionLimits`]; [`serve_with_limits`] takes a config's.
///
/// Returns `Ok(true)` when every connection drained in time, `Ok(false)` when the drain
/// timeout cut some off.
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<bool> {
    serve_with_limits(listener, app, shutdown, drain, ConnectionLimits::default()).await
}

/// [`serve`] with every client connection bounded by `limits`
/// (`ConnectionLimits::from_config(gateway.config())`): the request-head and idle timeouts
/// and `max_connections`. See [`server`](self) for the behaviour.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    limits: ConnectionLimits,
) -> std::io::Result<bool> {
    serve_listener(listener, app, shutdown, drain, limits).await
}

/// Serves `app` on one `listener` (on the current runtime) until `shutdown` resolves,
/// then stops accepting and gives the open connections up to `drain` to finish; every
/// connection is bounded by `limits`.
///
/// Returns `Ok(true)` when every connection closed in time, `Ok(false)` when the drain
/// timeout cut some off.
pub async fn serve_listener(
    listener: TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    limits: ConnectionLimits,
) -> io::Result<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = ConnectionPermits::new(limits.max_connections);
    let server = accept_loop(listener, app.into(), limits, permits, stop_rx);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => return Ok(true),
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    Ok(tokio::time::timeout(drain, server).await.is_ok())
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
