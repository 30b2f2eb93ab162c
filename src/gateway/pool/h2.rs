//! The proxy's HTTP/2 upstream connections (gRPC, and every request of a pool with
//! `http2: true`): h2c with prior knowledge on `hyper::client::conn::http2`.
//!
//! * **One connection per upstream and thread.** Every concurrent request to the upstream
//!   from this thread is a stream of that one connection, as HTTP/2 intends. It lives in a
//!   thread-local map: no lock.
//! * **Had before the request is rewritten.** A refused, reset or timed-out connect is an
//!   error before anything of the request was sent, so the proxy hands the request back
//!   unsent and the balancer retries it on another replica, as it does for HTTP/1.
//! * **One connect at a time.** Requests that arrive while this thread's connection is being
//!   opened wait for it (within `connect_timeout`) instead of each opening its own; if the
//!   request that opens it goes away, the next one takes over the connect.
//! * **Replaced when closed.** A connection the upstream closed (GOAWAY, reset, gone) is
//!   replaced by the next request; a request a closing connection refused before writing it
//!   is sent on a new one, once.
//! * **Idle timeout and drain.** A connection that took no new request for
//!   `upstream_idle_timeout`, or every connection when the pools drain, is let go: no new
//!   stream is opened on it, the streams in flight finish, and hyper closes it then.

use super::{millis, ConnectError, UpstreamPool, UpstreamRequestBody};
use hyper::client::conn::http2::{Builder, Connection, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A handle to send requests on one HTTP/2 connection (cheap to clone).
pub(crate) type H2Sender = SendRequest<UpstreamRequestBody>;

/// What requests waiting on a connect see: nothing yet, the connection, or why it failed.
type ConnectState = Option<Result<(H2Sender, Arc<Shared>), Arc<str>>>;

/// This thread's connection to one upstream, or the connect under way.
enum Slot {
    /// Open (or closed since: checked at each use).
    Ready { send: H2Sender, shared: Arc<Shared> },
    /// Being opened by the request holding the [`ConnectTurn`] of this id.
    Connecting {
        id: u64,
        state: watch::Receiver<ConnectState>,
    },
}

/// One entry of the thread-local map.
struct Entry {
    owner: Weak<UpstreamPool>,
    slot: Slot,
}

thread_local! {
    /// This thread's HTTP/2 connections, by upstream pool (its allocation's address).
    static H2: RefCell<HashMap<usize, Entry>> = RefCell::new(HashMap::new());
}

/// Ids of connects and connections (an entry is only ever removed by its own owner).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What a connection's task and its map entry share.
#[derive(Debug)]
struct Shared {
    id: u64,
    /// When the last request took this connection, in ms after the pool's epoch.
    last_used: AtomicU64,
}

/// The connection of this thread to `pool`'s upstream: the open one, the one being opened
/// (waited for), or a new one.
///
/// Nothing of a request has been sent when this fails, so its caller hands the request back
/// unsent.
pub(crate) async fn ready(pool: &Arc<UpstreamPool>) -> Result<H2Sender, ConnectError> {
    let deadline = Instant::now() + pool.pools.connect_timeout;
    loop {
        match step(pool) {
            Step::Have(send) => return Ok(send),
            Step::Wait(mut state) => {
                let waited =
                    tokio::time::timeout_at(deadline, state.wait_for(Option::is_some)).await;
                match waited {
                    Ok(Ok(done)) => match done.as_ref() {
                        Some(Ok((send, _))) => return Ok(send.clone()),
                        Some(Err(e)) => return Err(ConnectError::Shared(Arc::clone(e))),
                        None => unreachable!("waited for Some"),
                    },
                    // The request that was connecting went away: take the connect over.
                    Ok(Err(_)) => continue,
                    Err(_) => return Err(ConnectError::TimedOut),
                }
            }
            Step::Connect(turn) => {
                let opened = tokio::time::timeout_at(deadline, open(pool))
                    .await
                    .unwrap_or(Err(ConnectError::TimedOut));
                return turn.finish(opened);
            }
        }
    }
}

/// What [`ready`] does next.
enum Step {
    Have(H2Sender),
    Wait(watch::Receiver<ConnectState>),
    Connect(ConnectTurn),
}

/// Looks this thread's slot up; takes the connect turn when there is no usable connection
/// and no live connect.
fn step(pool: &Arc<UpstreamPool>) -> Step {
    let now = pool.millis();
    let max_age = millis(pool.pools.idle_timeout);
    let key = pool.key();
    let found = H2.try_with(|cell| {
        let mut map = cell.borrow_mut();
        if let Some(entry) = map.get_mut(&key) {
            if let Slot::Connecting { state, .. } = &entry.slot {
                let done = state.borrow().clone();
                match done {
                    // Opened, but published from another thread (the opening request's
                    // future moved): this thread's slot takes the connection.
                    Some(Ok((send, shared))) => entry.slot = Slot::Ready { send, shared },
                    // A connect whose turn is still held somewhere.
                    _ if state.has_changed().is_ok() => return Step::Wait(state.clone()),
                    // Its turn was dropped, or failed: a new connect.
                    _ => {}
                }
            }
            if let Slot::Ready { send, shared } = &entry.slot {
                let fresh = now.saturating_sub(shared.last_used.load(Ordering::Relaxed)) < max_age;
                if fresh && !send.is_closed() && !pool.pools.is_closing() {
                    shared.last_used.store(now, Ordering::Relaxed);
                    return Step::Have(send.clone());
                }
            }
        }
        if !map.contains_key(&key) {
            // Forget the connections of upstreams that are gone (their address may be reused).
            map.retain(|_, e| e.owner.strong_count() > 0);
        }
        let (tx, rx) = watch::channel(None);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        map.insert(
            key,
            Entry {
                owner: Arc::downgrade(pool),
                slot: Slot::Connecting { id, state: rx },
            },
        );
        Step::Connect(ConnectTurn {
            pool: Arc::clone(pool),
            id,
            tx: Some(tx),
        })
    });
    // The thread is going away: no map, a connection of its own for this request.
    found.unwrap_or_else(|_| {
        Step::Connect(ConnectTurn {
            pool: Arc::clone(pool),
            id: 0,
            tx: None,
        })
    })
}

/// The right (and duty) to open this thread's connection to one upstream. Dropped unfinished
/// (its request went away), it clears the slot, and a waiting request takes the turn over.
struct ConnectTurn {
    pool: Arc<UpstreamPool>,
    id: u64,
    tx: Option<watch::Sender<ConnectState>>,
}

impl ConnectTurn {
    /// Publishes the outcome of the connect to the waiting requests and the slot.
    fn finish(
        mut self,
        opened: Result<(H2Sender, Arc<Shared>), ConnectError>,
    ) -> Result<H2Sender, ConnectError> {
        let ready = opened.as_ref().ok().map(|(send, shared)| Slot::Ready {
            send: send.clone(),
            shared: Arc::clone(shared),
        });
        replace_own(self.pool.key(), self.id, ready);
        let tx = self.tx.take();
        let (published, outcome) = match opened {
            Ok((send, shared)) => (Ok((send.clone(), shared)), Ok(send)),
            Err(e) => (Err(e.to_string().into()), Err(e)),
        };
        if let Some(tx) = tx {
            tx.send_replace(Some(published));
        }
        outcome
    }
}

impl Drop for ConnectTurn {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Unfinished: dropping `tx` wakes the waiting requests, and one takes the turn.
            replace_own(self.pool.key(), self.id, None);
        }
    }
}

impl Slot {
    /// The id of the connect or the connection (unique across both: one counter).
    fn id(&self) -> u64 {
        match self {
            Self::Ready { shared, .. } => shared.id,
            Self::Connecting { id, .. } => *id,
        }
    }
}

/// Replaces this thread's slot for `key` by `with` (or removes it) if it is still the one
/// of id `id`: a slot is only ever changed by its own connect or connection, and a thread
/// that does not hold it (the future moved) leaves it alone.
fn replace_own(key: usize, id: u64, with: Option<Slot>) {
    let _ = H2.try_with(|cell| {
        let mut map = cell.borrow_mut();
        let Some(entry) = map.get_mut(&key).filter(|e| e.slot.id() == id) else {
            return;
        };
        match with {
            Some(slot) => entry.slot = slot,
            None => {
                map.remove(&key);
            }
        }
    });
}

/// Opens a connection (TCP, then the HTTP/2 preface) and spawns its task.
async fn open(pool: &Arc<UpstreamPool>) -> Result<(H2Sender, Arc<Shared>), ConnectError> {
    if pool.tls {
        return Err(ConnectError::Unsupported(
            "HTTP/2 to an https:// upstream is not supported (h2c only)",
        ));
    }
    let tcp = pool.open_tcp().await.map_err(ConnectError::Io)?;
    let (send, conn) = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, UpstreamRequestBody>(TokioIo::new(tcp))
        .await
        .map_err(ConnectError::Handshake)?;
    pool.opened.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        last_used: AtomicU64::new(pool.millis()),
    });
    tokio::spawn(drive(
        conn,
        Arc::clone(&shared),
        Arc::downgrade(pool),
        pool.pools.closing.subscribe(),
    ));
    Ok((send, shared))
}

/// A connection's task: drives hyper's connection until it ends; lets it go (removes it
/// from this thread's map, so that no new stream is opened on it) once it took no new
/// request for the idle timeout, or when the pools drain. hyper closes it when its last
/// stream ends.
async fn drive(
    conn: Connection<TokioIo<tokio::net::TcpStream>, UpstreamRequestBody, TokioExecutor>,
    shared: Arc<Shared>,
    pool: Weak<UpstreamPool>,
    mut closing: watch::Receiver<bool>,
) {
    tokio::pin!(conn);
    let Some((key, epoch, idle_timeout)) = pool
        .upgrade()
        .map(|p| (p.key(), p.epoch, p.pools.idle_timeout))
    else {
        return;
    };
    let mut kept = !*closing.borrow_and_update();
    loop {
        let wake =
            epoch + Duration::from_millis(shared.last_used.load(Ordering::Relaxed)) + idle_timeout;
        tokio::select! {
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
                replace_own(key, shared.id, None);
                return;
            }
            () = tokio::time::sleep_until(wake), if kept => {
                let last_used = Duration::from_millis(shared.last_used.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last_used) >= idle_timeout {
                    tracing::trace!("idle upstream HTTP/2 connection let go after upstream_idle_timeout");
                    replace_own(key, shared.id, None);
                    kept = false;
                }
            }
            changed = closing.changed(), if kept => {
                if changed.is_err() || *closing.borrow_and_update() {
                    replace_own(key, shared.id, None);
                    kept = false;
                }
            }
        }
    }
}
