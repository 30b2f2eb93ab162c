//! The two bodies the proxy streams through, each watched so that a failure is blamed on the
//! side that caused it.
//!
//! * [`ClientBody`] wraps the client's request body on its way to the upstream. It records in
//!   a shared [`BodyWatch`] how the body ended: complete, malformed (bad chunked or length
//!   framing), cut off by the client, or stalled past `client_body_timeout`. When the upstream
//!   request then fails, the proxy reads the watch and answers for the client's side (400,
//!   499, 408) instead of a 502 that would count against the upstream.
//! * [`UpstreamBody`] wraps the upstream's response body on its way to the client and ends it
//!   with an error when the upstream sends nothing for `upstream_body_timeout`, so a trickling
//!   upstream cannot hold an admission slot forever. The client sees the truncation: hyper
//!   aborts the connection (or resets the HTTP/2 stream) on a body error. It also holds the
//!   pooled upstream connection of the exchange and gives it back to the pool the moment the
//!   body ends cleanly (see [`super::pool`]); on any other end the connection is dropped.
//!
//! Both timers are armed lazily, only when a read would wait, and re-armed after each frame:
//! a body that is already buffered costs no timer.

use super::pool::PooledConn;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// A boxed body error, as axum and hyper use.
type BoxError = Box<dyn StdError + Send + Sync>;

/// How a client's request body ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOutcome {
    /// Still being read from the client.
    Streaming,
    /// Read to its end.
    Complete,
    /// The client sent bad framing: an invalid chunk size line, a chunk without its CRLF,
    /// more data than its `Content-Length`.
    Malformed,
    /// The client went away (closed or reset the connection, reset the HTTP/2 stream) before
    /// the body was complete.
    ClientClosed,
    /// The client sent nothing for `client_body_timeout`.
    TimedOut,
}

impl BodyOutcome {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Complete,
            2 => Self::Malformed,
            3 => Self::ClientClosed,
            4 => Self::TimedOut,
            _ => Self::Streaming,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Streaming => 0,
            Self::Complete => 1,
            Self::Malformed => 2,
            Self::ClientClosed => 3,
            Self::TimedOut => 4,
        }
    }

    /// `true` for the outcomes that are the client's fault (not the upstream's).
    pub fn is_client_failure(self) -> bool {
        matches!(self, Self::Malformed | Self::ClientClosed | Self::TimedOut)
    }
}

/// What the proxy learns about a request body it forwards: its [`BodyOutcome`] and when it
/// was complete. Shared (one `Arc`) between the [`ClientBody`] and the proxy's response
/// future; atomics only.
#[derive(Debug)]
pub struct BodyWatch {
    outcome: AtomicU8,
    /// Microseconds from `base` to the body's end (`u64::MAX` while streaming).
    completed_at: AtomicU64,
    base: Instant,
    /// The body's `client_body_timeout`.
    idle: Duration,
}

impl BodyWatch {
    fn new(idle: Duration) -> Self {
        Self {
            outcome: AtomicU8::new(BodyOutcome::Streaming.to_u8()),
            completed_at: AtomicU64::new(u64::MAX),
            base: Instant::now(),
            idle,
        }
    }

    /// The longest pause allowed between two reads of the body (`client_body_timeout`).
    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// How the body ended so far.
    pub fn outcome(&self) -> BodyOutcome {
        BodyOutcome::from_u8(self.outcome.load(Ordering::Acquire))
    }

    /// When the body was read to its end (`None` while it streams or when it failed).
    pub fn completed_at(&self) -> Option<Instant> {
        match self.completed_at.load(Ordering::Acquire) {
            u64::MAX => None,
            micros => Some(self.base + Duration::from_micros(micros)),
        }
    }

    /// Records the first outcome only: a body ends once.
    fn finish(&self, outcome: BodyOutcome) {
        if outcome == BodyOutcome::Complete {
            let micros = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            self.completed_at.store(micros, Ordering::Release);
        }
        let _ = self.outcome.compare_exchange(
            BodyOutcome::Streaming.to_u8(),
            outcome.to_u8(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// Decides which side a request-body read error came from.
///
/// hyper reports bad framing as an `io::Error` of kind `InvalidData` or `InvalidInput` inside
/// its body error, and a connection that ended mid-body as `UnexpectedEof` (or as a plain
/// "connection error"); an HTTP/2 client resetting its stream is an `h2` error. Everything
/// that is not recognisably bad framing means the client is gone.
pub fn classify_body_error(err: &(dyn StdError + 'static)) -> BodyOutcome {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<ClientBodyTimeout>() {
            return BodyOutcome::TimedOut;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                    BodyOutcome::Malformed
                }
                _ => BodyOutcome::ClientClosed,
            };
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() {
                return BodyOutcome::Malformed;
            }
        }
        cur = e.source();
    }
    BodyOutcome::ClientClosed
}

/// The error a [`ClientBody`] ends with when the client sent nothing for
/// `client_body_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct ClientBodyTimeout(pub Duration);

impl fmt::Display for ClientBodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client sent no request body data for {:.3}s",
            self.0.as_secs_f64()
        )
    }
}

impl StdError for ClientBodyTimeout {}

/// The error an [`UpstreamBody`] ends with when the upstream sent nothing for
/// `upstream_body_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamBodyTimeout(pub Duration);

impl fmt::Display for UpstreamBodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream sent no response body data for {:.3}s",
            self.0.as_secs_f64()
        )
    }
}

impl StdError for UpstreamBodyTimeout {}

/// A timer between body reads: armed when a read would wait, pushed back after each frame.
#[derive(Debug)]
struct IdleTimer {
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the timer was last armed: push it back before waiting again.
    progressed: bool,
}

impl IdleTimer {
    fn new(idle: Duration) -> Self {
        Self {
            idle,
            sleep: None,
            progressed: false,
        }
    }

    /// Called when the inner body returned `Pending`: `true` when the idle time ran out.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::mem::take(&mut self.progressed) {
            sleep.as_mut().reset(Instant::now() + idle);
        }
        sleep.as_mut().poll(cx).is_ready()
    }

    fn progress(&mut self) {
        if self.sleep.is_some() {
            self.progressed = true;
        }
    }
}

pin_project! {
    /// The client's request body on its way upstream, watched (see the module docs).
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        watch: Arc<BodyWatch>,
        timer: IdleTimer,
    }
}

impl<B> fmt::Debug for ClientBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBody")
            .field("outcome", &self.watch.outcome())
            .finish_non_exhaustive()
    }
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; the client may pause at most `idle` between reads.
    pub fn new(inner: B, idle: Duration) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::new(idle));
        (
            Self {
                inner,
                watch: Arc::clone(&watch),
                timer: IdleTimer::new(idle),
            },
            watch,
        )
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.progress();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.watch.finish(classify_body_error(e.as_ref()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.watch.finish(BodyOutcome::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timer.poll_expired(cx) {
                    this.watch.finish(BodyOutcome::TimedOut);
                    return Poll::Ready(Some(Err(Box::new(ClientBodyTimeout(this.timer.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The upstream's response body on its way to the client (see the module docs).
    ///
    /// When the client's request body failed (its [`BodyWatch`] says so), an error of the
    /// response body is the echo of that failure, not the upstream's: the body then ends
    /// without an error, so the layers above do not count it against the upstream.
    pub struct UpstreamBody<B> {
        #[pin]
        inner: B,
        timer: IdleTimer,
        request: Option<Arc<BodyWatch>>,
        conn: Option<PooledConn>,
    }
}

impl<B> fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl<B> UpstreamBody<B> {
    /// Wraps `inner`; the upstream may pause at most `idle` between reads. `request` is the
    /// watch of the request body, when it had one.
    pub fn new(inner: B, idle: Duration, request: Option<Arc<BodyWatch>>) -> Self {
        Self {
            inner,
            timer: IdleTimer::new(idle),
            request,
            conn: None,
        }
    }
}

impl<B: Body> UpstreamBody<B> {
    /// Gives `conn` back to its pool when the body ends cleanly (at once for an empty body).
    pub(crate) fn with_connection(mut self, conn: Option<PooledConn>) -> Self {
        self.conn = conn;
        if self.inner.is_end_stream() {
            release(&mut self.conn, self.request.as_deref());
        }
        self
    }
}

/// Gives the connection back once the response ended, when the request body went out whole
/// too (a request body still streaming would hold the connection).
fn release(conn: &mut Option<PooledConn>, request: Option<&BodyWatch>) {
    if let Some(conn) = conn.take() {
        if request.is_none_or(|w| w.outcome() == BodyOutcome::Complete) {
            conn.release();
        }
    }
}

impl<B> Body for UpstreamBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.progress();
                if this.conn.is_some() && this.inner.is_end_stream() {
                    release(this.conn, this.request.as_deref());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is broken: never reused.
                this.conn.take();
                if this
                    .request
                    .as_ref()
                    .is_some_and(|w| w.outcome().is_client_failure())
                {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "response body cut short by the client's failed request body");
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                release(this.conn, this.request.as_deref());
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timer.poll_expired(cx) {
                    this.conn.take();
                    tracing::debug!(idle = ?this.timer.idle, "upstream body stalled: cut off");
                    return Poll::Ready(Some(Err(Box::new(UpstreamBodyTimeout(this.timer.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn io(kind: std::io::ErrorKind) -> BoxError {
        Box::new(std::io::Error::new(kind, "x"))
    }

    #[test]
    fn body_errors_are_classified_by_side() {
        use std::io::ErrorKind::*;
        assert_eq!(
            classify_body_error(io(InvalidData).as_ref()),
            BodyOutcome::Malformed
        );
        assert_eq!(
            classify_body_error(io(InvalidInput).as_ref()),
            BodyOutcome::Malformed
        );
        assert_eq!(
            classify_body_error(io(UnexpectedEof).as_ref()),
            BodyOutcome::ClientClosed
        );
        assert_eq!(
            classify_body_error(io(ConnectionReset).as_ref()),
            BodyOutcome::ClientClosed
        );
        let t: BoxError = Box::new(ClientBodyTimeout(Duration::from_secs(1)));
        assert_eq!(classify_body_error(t.as_ref()), BodyOutcome::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_client_body_times_out_and_a_complete_one_is_recorded() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = tokio_stream_from(rx);
        let (mut body, watch) = ClientBody::new(StreamBody::new(stream), Duration::from_secs(5));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .await
            .unwrap();
        // 4 s after the first frame: still within the idle time, measured between frames.
        assert!(body.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<ClientBodyTimeout>());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(watch.outcome(), BodyOutcome::TimedOut);
        drop(tx);

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let (body, watch) = ClientBody::new(
            StreamBody::new(tokio_stream_from(rx)),
            Duration::from_secs(5),
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        drop(tx);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abc");
        assert_eq!(watch.outcome(), BodyOutcome::Complete);
        assert!(watch.completed_at().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_upstream_body_is_cut_off() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let mut body = UpstreamBody::new(
            StreamBody::new(tokio_stream_from(rx)),
            Duration::from_secs(2),
            None,
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<UpstreamBodyTimeout>());
        drop(tx);
    }

    /// A stream over an mpsc receiver (no tokio-stream dependency needed).
    fn tokio_stream_from<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        let mut rx = rx;
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
