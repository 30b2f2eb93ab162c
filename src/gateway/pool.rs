//! The proxy's HTTP/1 upstream connections: a per-thread pool on
//! `hyper::client::conn::http1`.
//!
//! * **Per thread, no lock.** Idle connections live in a thread-local map, one LIFO stack per
//!   upstream. With the thread-per-core server a request takes a connection from, and gives it
//!   back to, the stack of the thread that serves it: no lock, no cross-thread wake-up. A
//!   request whose future moved to another thread (a multi-thread runtime) gives the
//!   connection back to that thread's stack.
//! * **LIFO.** The most recently used connection is taken first: it is the one least likely to
//!   have been closed by the upstream, and the ones at the bottom age out.
//! * **Back at the end of the body.** A connection returns to its stack the moment its
//!   response body ends (the last frame read, or an empty body), and only when the request
//!   body was sent whole too. Anything else (an error on either body, a body dropped early, a
//!   response that came before the upload finished) drops the connection: hyper then closes it
//!   once its exchange ends. A broken connection is never reused.
//! * **No connect race.** A request takes an idle connection when one is there and otherwise
//!   opens one; it does not race a connect against a connection that is about to come back. A
//!   taken connection that is still finishing its previous exchange (hyper has not yet read
//!   the end of it) is waited for, not replaced.
//! * **Bounded.** At most `upstream_max_idle` idle connections per upstream and thread (the
//!   oldest is closed when a newer one would exceed it); an idle connection is closed by its
//!   own connection task after `upstream_idle_timeout`, and a request never takes one older
//!   than that.
//! * **Drain.** [`Proxy::close_idle_connections`](super::Proxy::close_idle_connections)
//!   closes every idle connection at once and makes every busy one close when its exchange
//!   ends (called when the gateway shuts down).
//!
//! * **TLS.** An `https://` upstream's connections are TLS ([`UpstreamTls`]: the system roots
//!   or `upstream_tls`), the handshake inside `connect_timeout`; a certificate the roots do
//!   not vouch for is a connect error (502 `bad_gateway`). Pooled and reused like the rest.
//!
//! Each connection has one task (spawned when it is opened, not per request) that drives
//! hyper's connection and watches its idle time.
//!
//! HTTP/2 upstreams (gRPC, and pools with `http2: true`) share one multiplexed connection
//! per upstream and thread instead: see the `h2` module.

pub(crate) mod h2;

use super::bodies::ClientBody;
use super::tls::UpstreamTls;
use axum::body::Body;
use http::HeaderValue;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// The request body the proxy sends upstream: the client's watched body, or an empty one
/// passed through as it is.
pub(crate) type UpstreamRequestBody = http_body_util::Either<ClientBody<Body>, Body>;

/// The pool settings and the drain switch shared by every upstream of one proxy.
#[derive(Debug)]
pub(crate) struct Pools {
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    closing: watch::Sender<bool>,
    /// TLS to `https://` upstreams: set from `upstream_tls`, else made with the system
    /// roots on first use (`None`: that failed, and https connects fail).
    tls: OnceLock<Option<UpstreamTls>>,
}

impl Pools {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Self {
        Self {
            max_idle,
            idle_timeout,
            connect_timeout,
            closing: watch::Sender::new(false),
            tls: OnceLock::new(),
        }
    }

    /// Sets the TLS of `https://` upstreams; `false` when it was already set (or used).
    pub(crate) fn set_tls(&self, tls: UpstreamTls) -> bool {
        self.tls.set(Some(tls)).is_ok()
    }

    fn tls(&self) -> Option<&UpstreamTls> {
        self.tls
            .get_or_init(|| match UpstreamTls::from_config(None) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::error!(error = %e, "https:// upstreams cannot be reached");
                    None
                }
            })
            .as_ref()
    }

    /// Closes every idle connection now, and every busy one when its exchange ends; no
    /// connection is pooled after this.
    pub(crate) fn close_idle(&self) {
        self.closing.send_replace(true);
    }

    fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }
}

/// One upstream's connections (on every thread) and how to open new ones.
pub(crate) struct UpstreamPool {
    pools: Arc<Pools>,
    host: Box<str>,
    port: u16,
    /// `https://`: connections are TLS.
    tls: bool,
    /// The `Host` header of every request to this upstream.
    host_header: HeaderValue,
    /// The origin of the idle timestamps of this upstream's connections.
    epoch: Instant,
    opened: AtomicU64,
}

impl fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("opened", &self.opened.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The host did not resolve, or the TCP connect failed.
    Io(io::Error),
    /// No TCP connection within `connect_timeout`.
    TimedOut,
    /// The TLS handshake failed (a certificate not trusted, a name mismatch, ...).
    Tls(io::Error),
    /// The HTTP/1 or HTTP/2 handshake failed.
    Handshake(hyper::Error),
    /// Another request's connect to the same upstream failed, with this error.
    Shared(Arc<str>),
    /// The upstream cannot be reached this way.
    Unsupported(&'static str),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connect failed: {e}"),
            Self::TimedOut => f.write_str("connect timed out"),
            Self::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Self::Handshake(e) => write!(f, "handshake failed: {e}"),
            Self::Shared(e) => f.write_str(e),
            Self::Unsupported(e) => f.write_str(e),
        }
    }
}

impl UpstreamPool {
    /// The pool of the upstream at `authority`; `tls` for an `https://` one (port 443 by
    /// default, 80 otherwise).
    pub(crate) fn new(pools: Arc<Pools>, authority: &http::uri::Authority, tls: bool) -> Self {
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Self {
            pools,
            host: host.into(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            host_header: HeaderValue::from_str(authority.as_str())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            epoch: Instant::now(),
            opened: AtomicU64::new(0),
        }
    }

    /// The `Host` header for requests to this upstream.
    pub(crate) fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Connections opened to this upstream so far (all threads).
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// The most recently returned idle connection of this thread that is still open and not
    /// older than the idle timeout.
    pub(crate) fn checkout(self: &Arc<Self>) -> Option<PooledConn> {
        let now = self.millis();
        let max_age = millis(self.pools.idle_timeout);
        IDLE.try_with(|cell| {
            let mut map = cell.borrow_mut();
            let stack = map.get_mut(&self.key())?;
            while let Some(idle) = stack.conns.pop() {
                if !idle.send.is_closed() && idle.mark.take(now, max_age) {
                    return Some(PooledConn {
                        send: idle.send,
                        mark: idle.mark,
                        pool: Arc::clone(self),
                        reused: true,
                    });
                }
            }
            None
        })
        .ok()
        .flatten()
    }

    /// Opens a new connection and spawns its task.
    pub(crate) async fn connect(self: &Arc<Self>) -> Result<PooledConn, ConnectError> {
        let timeout = self.pools.connect_timeout;
        let stream = tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| ConnectError::TimedOut)??;
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpstreamRequestBody>(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let mark = Arc::new(IdleMark::busy());
        tokio::spawn(drive(
            conn,
            Arc::clone(&mark),
            Arc::downgrade(self),
            self.pools.closing.subscribe(),
        ));
        Ok(PooledConn {
            send,
            mark,
            pool: Arc::clone(self),
            reused: false,
        })
    }

    /// Opens the TCP connection and, for `https://`, runs the TLS handshake over it.
    async fn open(&self) -> Result<UpstreamIo, ConnectError> {
        let tcp = self.open_tcp().await.map_err(ConnectError::Io)?;
        if !self.tls {
            return Ok(UpstreamIo::Plain(tcp));
        }
        let Some(tls) = self.pools.tls() else {
            return Err(ConnectError::Tls(io::Error::other(
                "no TLS client config (see the log at startup)",
            )));
        };
        let stream = tls
            .connect(&self.host, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }

    async fn open_tcp(&self) -> io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((&*self.host, self.port))
                .await?
                .collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host resolved to nothing");
        for addr in addrs {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_nodelay(true)?;
            socket.set_keepalive(true)?;
            match socket.connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn millis(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// Puts `conn` back on this thread's stack (or drops it: draining, closed, no room).
    fn release(self: &Arc<Self>, send: SendRequest<UpstreamRequestBody>, mark: Arc<IdleMark>) {
        let max_idle = self.pools.max_idle;
        if max_idle == 0 || self.pools.is_closing() || send.is_closed() {
            return;
        }
        mark.set_idle(self.millis());
        let owner = Arc::downgrade(self);
        let _ = IDLE.try_with(|cell| {
            let mut map = cell.borrow_mut();
            if !map.contains_key(&self.key()) {
                // Forget the stacks of upstreams that are gone (their address may be reused).
                map.retain(|_, s| s.owner.strong_count() > 0);
            }
            let stack = map.entry(self.key()).or_insert_with(|| IdleStack {
                owner,
                conns: Vec::new(),
            });
            if stack.conns.len() >= max_idle {
                stack.conns.retain(|c| !c.send.is_closed());
                if stack.conns.len() >= max_idle {
                    // The oldest goes: dropping its sender lets hyper close it.
                    stack.conns.remove(0);
                }
            }
            stack.conns.push(Idle { send, mark });
        });
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

/// A connection taken for one exchange. Dropping it (instead of [`PooledConn::release`])
/// closes the connection once hyper is done with it.
pub(crate) struct PooledConn {
    send: SendRequest<UpstreamRequestBody>,
    mark: Arc<IdleMark>,
    pool: Arc<UpstreamPool>,
    reused: bool,
}

impl fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConn")
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl PooledConn {
    /// Whether this connection came from the idle stack (it served a request before).
    pub(crate) fn is_reused(&self) -> bool {
        self.reused
    }

    /// hyper's sender for this connection.
    pub(crate) fn sender(&mut self) -> &mut SendRequest<UpstreamRequestBody> {
        &mut self.send
    }

    /// The exchange ended cleanly: the connection goes back to this thread's idle stack.
    pub(crate) fn release(self) {
        let Self {
            send, mark, pool, ..
        } = self;
        pool.release(send, mark);
    }
}

/// One idle connection on a stack.
struct Idle {
    send: SendRequest<UpstreamRequestBody>,
    mark: Arc<IdleMark>,
}

/// One upstream's idle connections on one thread (most recent last).
struct IdleStack {
    owner: Weak<UpstreamPool>,
    conns: Vec<Idle>,
}

thread_local! {
    /// This thread's idle connections, by upstream pool (its allocation's address).
    static IDLE: RefCell<HashMap<usize, IdleStack>> = RefCell::new(HashMap::new());
}

/// Whether a connection is idle (and since when), busy, or closed by its task: one atomic
/// word shared by the pool and the connection's task, so the task never closes a connection
/// a request has just taken.
#[derive(Debug)]
struct IdleMark(AtomicU64);

const BUSY: u64 = u64::MAX;
const CLOSED: u64 = u64::MAX - 1;

impl IdleMark {
    fn busy() -> Self {
        Self(AtomicU64::new(BUSY))
    }

    fn set_idle(&self, now: u64) {
        self.0.store(now, Ordering::Release);
    }

    /// Idle since this many milliseconds after the pool's epoch (`None`: busy or closed).
    fn idle_since(&self) -> Option<u64> {
        match self.0.load(Ordering::Acquire) {
            BUSY | CLOSED => None,
            since => Some(since),
        }
    }

    /// Takes an idle connection not older than `max_age` (fails if its task closed it).
    fn take(&self, now: u64, max_age: u64) -> bool {
        match self.idle_since() {
            Some(since) if now.saturating_sub(since) < max_age => self
                .0
                .compare_exchange(since, BUSY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
            _ => false,
        }
    }

    /// Marks the connection closed if it has been idle for `max_age` (fails if a request
    /// took it meanwhile).
    fn close_if_idle_for(&self, now: u64, max_age: u64) -> bool {
        match self.idle_since() {
            Some(since) if now.saturating_sub(since) >= max_age => self
                .0
                .compare_exchange(since, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok(),
            _ => false,
        }
    }
}

/// An upstream connection's socket: plain TCP, or TLS over it (`https://`).
#[derive(Debug)]
pub(crate) enum UpstreamIo {
    /// `http://`.
    Plain(TcpStream),
    /// `https://` (boxed: the TLS state is large, and rare next to plain connections).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection's task: drives hyper's connection until it ends, closes it once it has been
/// idle for the idle timeout, and closes it at once when the pools drain while it is idle.
async fn drive(
    conn: hyper::client::conn::http1::Connection<TokioIo<UpstreamIo>, UpstreamRequestBody>,
    mark: Arc<IdleMark>,
    pool: Weak<UpstreamPool>,
    mut closing: watch::Receiver<bool>,
) {
    tokio::pin!(conn);
    let Some((epoch, idle_timeout)) = pool.upgrade().map(|p| (p.epoch, p.pools.idle_timeout))
    else {
        return;
    };
    let max_age = millis(idle_timeout);
    let now = || millis(epoch.elapsed());
    let mut draining = *closing.borrow_and_update();
    loop {
        if draining && mark.close_if_idle_for(now(), 0) {
            return;
        }
        let wake = match mark.idle_since() {
            Some(since) => epoch + Duration::from_millis(since) + idle_timeout,
            None => Instant::now() + idle_timeout,
        };
        // Biased: the connection first (it is what wakes this task on every exchange), and no
        // random branch order to draw on each wake.
        tokio::select! {
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                if mark.close_if_idle_for(now(), max_age) {
                    tracing::trace!("idle upstream connection closed after upstream_idle_timeout");
                    return;
                }
            }
            changed = closing.changed(), if !draining => {
                draining = changed.is_err() || *closing.borrow_and_update();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_mark_is_taken_or_closed_once() {
        let m = IdleMark::busy();
        assert!(!m.take(0, 10), "a busy connection is not idle");
        assert!(!m.close_if_idle_for(100, 10));
        m.set_idle(5);
        assert!(!m.close_if_idle_for(10, 10), "idle for 5 ms only");
        assert!(m.take(10, 10));
        assert!(!m.take(10, 10), "taken once");
        m.set_idle(20);
        assert!(!m.take(30, 10), "too old to take");
        assert!(m.close_if_idle_for(30, 10));
        assert!(!m.take(30, 1000), "closed by its task");
        assert!(m.idle_since().is_none());
    }
}
