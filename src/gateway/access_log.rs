//! Request ids and the access log.
//!
//! **Request ids.** Every request gets an `x-request-id`: the client's, when it sent a valid
//! one (1 to [`MAX_REQUEST_ID_LEN`] printable ASCII characters, `0x20..=0x7e`), or a new one
//! otherwise. A new id is this thread's random 64-bit prefix and its request counter
//! (`3f9a0c21d4e8b705-1c`): unique within the process (the counter) and across processes
//! and restarts (the prefix), with no lock and no UUID machinery. The id is sent to the
//! upstream, returned to the client, written in the access log line and the request's span,
//! and added as `request_id` to the JSON body of every rejection of that request.
//!
//! **Access log** (`access_log: {enable: true}`, off by default). One line per request,
//! JSON or the combined log format, with the time, method, path, status, upstream,
//! duration, bytes in and out, admission wait, the rejection `error` code and the request
//! id. The line is written when the response body ends (or the client goes away), by a
//! writer thread of its own: the request path hands the line's raw fields (a plain record
//! of times, numbers and reference-counted header values, no text) over a bounded channel
//! ([`LINE_BUFFER`] lines) with `try_send`, so a slow disk or a full pipe never blocks a
//! request; a line that does not fit is dropped and counted ([`AccessLog::dropped`]). The
//! writer thread formats the lines, by hand rather than through `serde_json` (the same
//! text, checked against it by a property test), a batch every [`DRAIN_EVERY`], and
//! [`AccessLog::flush`] writes out what was sent when the gateway shuts down. This is a
//! channel of our own rather than tracing-appender's `non_blocking` writer because the
//! access log must not depend on the user's tracing subscriber or its filter, and it needs
//! no extra dependency.
//!
//! **Spans.** Each request also runs in a `tracing` span named `request` (target
//! `portcullis::request`, level DEBUG) with the same fields, recorded as they become known.
//! It is created only when a subscriber is interested in it: with the default `info`
//! filter it costs one callsite check. Enable it with `RUST_LOG=info,portcullis::request=debug`
//! or a subscriber layer (OpenTelemetry) that wants it.

use super::config::{AccessLogConfig, AccessLogFormat};
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use portcullis_core::Rejection;
use std::cell::Cell;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Access log lines buffered between the request path and the writer thread.
pub const LINE_BUFFER: usize = 16 * 1024;

/// `true` when `id` is a request id the gateway keeps: 1 to 128 printable ASCII characters.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(|b| (0x20..=0x7e).contains(b))
}

thread_local! {
    /// This thread's id prefix (random) and request counter.
    static ID_SOURCE: (u64, Cell<u64>) = (random_u64(), Cell::new(0));
}

/// 64 random bits from the standard library's per-process random hash keys, mixed with the
/// time and the thread (no `rand` needed on the request path).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write(format!("{:?}", std::thread::current().id()).as_bytes());
    h.finish()
}

/// A new request id: this thread's prefix and the next value of its counter, in hex.
pub fn new_request_id() -> HeaderValue {
    let (prefix, n) = ID_SOURCE.with(|(prefix, counter)| {
        let n = counter.get().wrapping_add(1);
        counter.set(n);
        (*prefix, n)
    });
    let mut buf = [0u8; 33];
    let len = write_hex(&mut buf[..16], prefix, 16);
    buf[len] = b'-';
    let digits = if n == 0 {
        1
    } else {
        (67 - n.leading_zeros() as usize) / 4
    };
    let end = len + 1 + write_hex(&mut buf[len + 1..], n, digits);
    // Hex digits and '-' are always a valid header value.
    HeaderValue::from_bytes(&buf[..end]).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Writes the low `digits` hex digits of `v` into `out`; returns `digits`.
fn write_hex(out: &mut [u8], v: u64, digits: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[((v >> shift) & 0xf) as usize];
    }
    digits
}

/// The request's id: the client's valid `x-request-id`, or a new one, which is set on the
/// request so the upstream gets it.
pub(crate) fn request_id<B>(req: &mut Request<B>) -> HeaderValue {
    if let Some(id) = req.headers().get(X_REQUEST_ID) {
        if is_valid_request_id(id.as_bytes()) {
            return id.clone();
        }
    }
    let id = new_request_id();
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    id
}

/// Finishes a response: the request id header, and `request_id` in a rejection's JSON body.
/// Returns the rejection's `error` code, if the response is one.
pub(crate) fn stamp_response(resp: &mut Response<Body>, id: &HeaderValue) -> Option<&'static str> {
    resp.headers_mut().insert(X_REQUEST_ID, id.clone());
    let rejection = resp.extensions_mut().remove::<Rejection>()?;
    let body = serde_json::json!({
        "error": rejection.code(),
        "message": rejection.message(),
        "request_id": id.to_str().unwrap_or_default(),
    });
    if let Ok(bytes) = serde_json::to_vec(&body) {
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        *resp.body_mut() = Body::from(bytes);
    }
    Some(rejection.code())
}

/// What the proxy tells the access log about a request: the upstream it went to and when
/// (the end of the admission wait), and the bytes of the request body as they stream. Put
/// in the request's extensions by the front only while the access log or the request span
/// is on.
#[derive(Debug, Default)]
pub struct DispatchNote {
    upstream: OnceLock<&'static str>,
    at: OnceLock<quanta::Instant>,
    bytes_in: AtomicU64,
}

impl DispatchNote {
    /// The proxy sends the request to `upstream` now.
    pub fn dispatched(&self, upstream: &'static str) {
        let _ = self.upstream.set(upstream);
        let _ = self.at.set(quanta::Instant::now());
    }
}

/// Notes `upstream` on `req`'s [`DispatchNote`], when it has one (the proxy calls it).
pub fn note_dispatch<B>(req: &Request<B>, upstream: &'static str) {
    if let Some(note) = req.extensions().get::<Arc<DispatchNote>>() {
        note.dispatched(upstream);
    }
}

/// The access log: the writer thread's channel and the dropped-line count. Clones share both.
#[derive(Debug, Clone)]
pub struct AccessLog {
    inner: Arc<Handle>,
}

/// One holder's way to the writer. The clones of an [`AccessLog`] share one; each client
/// connection gets its own ([`AccessLog::for_connection`]), so the reference count a request
/// takes and drops is written by that connection's thread only, not by every serving thread
/// on every request.
#[derive(Debug)]
struct Handle {
    writer: Arc<Writer>,
}

#[derive(Debug)]
struct Writer {
    lines: SyncSender<Message>,
    dropped: AtomicU64,
}

/// What the writer thread receives.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a line travels by value: boxing it would cost the allocation per request the record avoids"
)]
enum Message {
    /// A request's line, to format and write.
    Line(Record),
    /// Write and flush everything received so far, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl AccessLog {
    /// Opens `config.path` (`stderr`, `stdout` or a file, appended to) and starts the writer
    /// thread, which ends once every clone is dropped and the lines are written.
    pub fn start(config: &AccessLogConfig) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stderr" => Box::new(io::stderr()),
            "stdout" => Box::new(io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (lines, rx) = std::sync::mpsc::sync_channel(LINE_BUFFER);
        let format = config.format;
        std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || LineWriter::new(format, out).run(&rx))?;
        Ok(Self {
            inner: Arc::new(Handle {
                writer: Arc::new(Writer {
                    lines,
                    dropped: AtomicU64::new(0),
                }),
            }),
        })
    }

    /// A handle to the same writer for one client connection: its requests' records hold
    /// it, so their reference counting stays on that connection's thread.
    pub fn for_connection(&self) -> Self {
        Self {
            inner: Arc::new(Handle {
                writer: Arc::clone(&self.inner.writer),
            }),
        }
    }

    /// Lines dropped because the writer fell [`LINE_BUFFER`] lines behind.
    pub fn dropped(&self) -> u64 {
        self.inner.writer.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every line sent before the call is written and the
    /// output flushed; `false` if the time ran out or the writer is gone. The gateway calls
    /// it at shutdown, after the last request, so the log is complete when the process exits.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = tokio::sync::oneshot::channel();
        let flushed = async {
            let mut message = Message::Flush(done);
            // The channel may be full: the writer empties it every `DRAIN_EVERY`.
            loop {
                match self.inner.writer.lines.try_send(message) {
                    Ok(()) => break,
                    Err(TrySendError::Full(m)) => {
                        message = m;
                        tokio::time::sleep(DRAIN_EVERY / 4).await;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            wait.await.is_ok()
        };
        tokio::time::timeout(timeout, flushed)
            .await
            .unwrap_or(false)
    }

    fn send(&self, record: Record) {
        match self.inner.writer.lines.try_send(Message::Line(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.inner.writer.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// How often the busy writer thread drains the channel (a line reaches the output within
/// about this long).
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// Bytes of formatted lines the writer collects before a `write`.
const WRITE_BUFFER: usize = 64 * 1024;

/// The writer thread's state: the format, the output and the lines formatted but not yet
/// written.
struct LineWriter {
    format: AccessLogFormat,
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    clock: TimeText,
    wall: WallClock,
}

/// Turns the request path's counter readings into wall-clock times: one reading of both
/// clocks, taken again every [`WallClock::REFRESH`], and each line's time by the counter's
/// distance from it.
struct WallClock {
    wall: SystemTime,
    counter: quanta::Instant,
}

impl WallClock {
    const REFRESH: Duration = Duration::from_millis(100);

    fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            counter: quanta::Instant::now(),
        }
    }

    /// The wall-clock time at which the counter read `t`.
    fn of(&mut self, t: quanta::Instant) -> SystemTime {
        if quanta::Instant::now().saturating_duration_since(self.counter) >= Self::REFRESH {
            *self = Self::now();
        }
        match t.checked_duration_since(self.counter) {
            Some(after) => self.wall + after,
            None => self
                .wall
                .checked_sub(self.counter.saturating_duration_since(t))
                .unwrap_or(self.wall),
        }
    }
}

/// Calibrates the counter the access log and the request span time requests with (up to
/// 200 ms, once per process), so that no request pays for it. The gateway calls it when it
/// is built.
pub fn prepare_clock() {
    let _ = quanta::Instant::now();
}

impl LineWriter {
    fn new(format: AccessLogFormat, out: Box<dyn Write + Send>) -> Self {
        Self {
            format,
            out,
            buf: Vec::with_capacity(WRITE_BUFFER + 1024),
            clock: TimeText::default(),
            wall: WallClock::now(),
        }
    }

    /// Idle, it blocks on the channel; once a line arrives it sleeps [`DRAIN_EVERY`],
    /// formats every line that came meanwhile into a 64 KiB buffer, writes and flushes,
    /// and goes on so until a tick finds the channel empty. While it sleeps no sender has
    /// to wake it, so a request costs a channel push, not a futex wake and a `write`; and
    /// the line is formatted here, not on the request path. It ends when every sender is
    /// gone, after writing what they sent.
    fn run(mut self, rx: &Receiver<Message>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            loop {
                let mut got = false;
                while let Some(message) = next.take() {
                    got = true;
                    if self.take(message).is_err() {
                        return;
                    }
                    next = match rx.try_recv() {
                        Ok(message) => Some(message),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => {
                            let _ = self.flush();
                            return;
                        }
                    };
                }
                if self.flush().is_err() {
                    return;
                }
                if !got {
                    break;
                }
                std::thread::sleep(DRAIN_EVERY);
                next = match rx.try_recv() {
                    Ok(message) => Some(message),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                };
            }
        }
        let _ = self.flush();
    }

    fn take(&mut self, message: Message) -> io::Result<()> {
        match message {
            Message::Line(mut record) => {
                record.time = self.wall.of(record.started);
                match self.format {
                    AccessLogFormat::Json => json_line(&record, &mut self.clock, &mut self.buf),
                    AccessLogFormat::Combined => combined_line(&record, &mut self.buf),
                }
                if self.buf.len() >= WRITE_BUFFER {
                    self.out.write_all(&self.buf)?;
                    self.buf.clear();
                }
            }
            Message::Flush(done) => {
                self.flush()?;
                let _ = done.send(());
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        self.out.flush()
    }
}

/// One request's line in raw fields, as the request path hands it to the writer thread:
/// plain values and reference counts, no text formatted and no allocation (a path longer
/// than [`LogText`]'s inline room is the exception).
#[derive(Debug)]
struct Record {
    /// The wall-clock time of `started`, filled in by the writer thread (the request path
    /// reads no system clock).
    time: SystemTime,
    started: quanta::Instant,
    duration: Duration,
    admission_wait: Option<Duration>,
    bytes_in: u64,
    bytes_out: u64,
    method: Method,
    path: LogText,
    version: http::Version,
    remote: Option<IpAddr>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    request_id: LogText,
    upstream: Option<&'static str>,
    status: StatusCode,
    error: Option<&'static str>,
}

/// Bytes of a text kept inline in a [`Record`]; a longer one is copied to the heap.
const INLINE_TEXT: usize = 62;

/// A text copied out of the request (its path, its id). A clone of its `Uri` or header value
/// would keep the connection's read buffer alive until the writer thread gets to the line,
/// and the writer thread would drop a reference count the serving thread writes too.
#[derive(Debug)]
enum LogText {
    Inline { len: u8, bytes: [u8; INLINE_TEXT] },
    Heap(Box<str>),
}

impl LogText {
    fn new(path: &str) -> Self {
        match u8::try_from(path.len()) {
            Ok(len) if path.len() <= INLINE_TEXT => {
                let mut bytes = [0; INLINE_TEXT];
                bytes[..path.len()].copy_from_slice(path.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(path.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `&str`, so it is UTF-8.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Self::Heap(path) => path,
        }
    }
}

/// One request on its way: what its log line and span need, gathered from the request, the
/// proxy ([`DispatchNote`]) and the response.
#[derive(Debug)]
pub(crate) struct Pending {
    log: Option<AccessLog>,
    span: Option<tracing::Span>,
    /// When the request came: the line's time, its duration and admission wait are measured
    /// from it (the CPU's time-stamp counter through `quanta`, a few ns a read where the
    /// system clock costs tens; see [`prepare_clock`]).
    started: quanta::Instant,
    note: Arc<DispatchNote>,
    record: Record,
}

impl Pending {
    /// Starts the record of `req` (`None` when neither the access log nor the span is on).
    /// Notes the dispatch and counts the request body as it streams.
    pub(crate) fn start(
        log: Option<&AccessLog>,
        req: &mut Request<Body>,
        request_id: &HeaderValue,
    ) -> Option<Self> {
        let span = tracing::debug_span!(
            target: "portcullis::request",
            "request",
            method = %req.method(),
            path = req.uri().path(),
            request_id = request_id.to_str().unwrap_or_default(),
            status = tracing::field::Empty,
            upstream = tracing::field::Empty,
            error = tracing::field::Empty,
            admission_wait_ms = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
            bytes_in = tracing::field::Empty,
            bytes_out = tracing::field::Empty,
        );
        let span = (!span.is_disabled()).then_some(span);
        if log.is_none() && span.is_none() {
            return None;
        }
        let note = Arc::new(DispatchNote::default());
        req.extensions_mut().insert(Arc::clone(&note));
        if !http_body::Body::is_end_stream(req.body()) {
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::new(Counted::request(body, Arc::clone(&note)));
        }
        let started = quanta::Instant::now();
        let headers = req.headers();
        let record = Record {
            time: SystemTime::UNIX_EPOCH,
            started,
            duration: Duration::ZERO,
            admission_wait: None,
            bytes_in: 0,
            bytes_out: 0,
            method: req.method().clone(),
            path: LogText::new(req.uri().path()),
            version: req.version(),
            remote: req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            referer: headers.get(http::header::REFERER).cloned(),
            request_id: LogText::new(request_id.to_str().unwrap_or_default()),
            upstream: None,
            status: StatusCode::OK,
            error: None,
        };
        Some(Self {
            log: log.cloned(),
            span,
            started,
            note,
            record,
        })
    }

    /// The span to run the request's future in.
    pub(crate) fn span(&self) -> Option<&tracing::Span> {
        self.span.as_ref()
    }

    /// The response head is known: records it and wraps the body, whose end writes the line.
    pub(crate) fn respond(
        mut self,
        resp: Response<Body>,
        error: Option<&'static str>,
    ) -> Response<Body> {
        self.record.status = resp.status();
        self.record.error = error;
        if let Some(span) = &self.span {
            span.record("status", self.record.status.as_u16());
            if let Some(u) = self.note.upstream.get() {
                span.record("upstream", *u);
            }
            if let Some(e) = error {
                span.record("error", e);
            }
            if let Some(w) = self.admission_wait() {
                span.record("admission_wait_ms", millis(w));
            }
        }
        resp.map(|body| Body::new(Counted::response(body, self)))
    }

    /// The client went away before the response head: the line says 499 `client_closed`.
    pub(crate) fn abandoned(mut self) {
        self.record.status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
        self.record.error = Some(portcullis_core::codes::CLIENT_CLOSED);
        self.finish(0);
    }

    fn admission_wait(&self) -> Option<Duration> {
        self.note
            .at
            .get()
            .map(|at| at.saturating_duration_since(self.started))
    }

    /// Sends the line (and closes the span's fields) with `bytes_out` sent.
    fn finish(mut self, bytes_out: u64) {
        let duration = quanta::Instant::now().saturating_duration_since(self.started);
        let bytes_in = self.note.bytes_in.load(Ordering::Relaxed);
        if let Some(span) = &self.span {
            span.record("duration_ms", millis(duration));
            span.record("bytes_in", bytes_in);
            span.record("bytes_out", bytes_out);
        }
        let Some(log) = self.log.take() else {
            return;
        };
        self.record.admission_wait = self.admission_wait();
        self.record.upstream = self.note.upstream.get().copied();
        self.record.duration = duration;
        self.record.bytes_in = bytes_in;
        self.record.bytes_out = bytes_out;
        log.send(self.record);
    }
}

/// `d` in milliseconds.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `d` in milliseconds rounded to the microsecond, as a count of microseconds (the value
/// the log writes).
fn rounded_micros(d: Duration) -> f64 {
    (millis(d) * 1000.0).round()
}

/// A body that counts the bytes of its data frames: a request body's into the request's
/// note; with `pending` (a response body), the request's line is written when the body is
/// done with (sent whole, failed, or dropped).
struct Counted {
    inner: Body,
    bytes: u64,
    note: Option<Arc<DispatchNote>>,
    pending: Option<Pending>,
}

impl Counted {
    fn request(inner: Body, note: Arc<DispatchNote>) -> Self {
        Self {
            inner,
            bytes: 0,
            note: Some(note),
            pending: None,
        }
    }

    fn response(inner: Body, pending: Pending) -> Self {
        Self {
            inner,
            bytes: 0,
            note: None,
            pending: Some(pending),
        }
    }

    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bytes);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    let len = data.len() as u64;
                    this.bytes += len;
                    if let Some(note) = &this.note {
                        note.bytes_in.fetch_add(len, Ordering::Relaxed);
                    }
                }
            }
            // The end, or an error that ends it: the line goes now.
            None | Some(Err(_)) => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Appends `record`'s JSON line: the fields in the order of their names, as `serde_json`
/// writes an object (the format the log had when it was built with `serde_json::json!`).
fn json_line(r: &Record, clock: &mut TimeText, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"admission_wait_ms\":");
    match r.admission_wait {
        Some(w) => json_millis(out, w),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"bytes_in\":");
    write_u64(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    write_u64(out, r.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    json_millis(out, r.duration);
    out.extend_from_slice(b",\"error\":");
    json_opt_str(out, r.error);
    out.extend_from_slice(b",\"method\":");
    json_str(out, r.method.as_str());
    out.extend_from_slice(b",\"path\":");
    json_str(out, r.path.as_str());
    out.extend_from_slice(b",\"remote\":");
    match r.remote {
        Some(ip) => {
            out.push(b'"');
            let _ = write!(out, "{ip}");
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"request_id\":");
    json_str(out, r.request_id.as_str());
    out.extend_from_slice(b",\"status\":");
    write_u64(out, u64::from(r.status.as_u16()));
    out.extend_from_slice(b",\"time\":\"");
    clock.rfc3339(r.time, out);
    out.extend_from_slice(b"\",\"upstream\":");
    json_opt_str(out, r.upstream);
    out.extend_from_slice(b",\"user_agent\":");
    json_opt_str(out, r.user_agent.as_ref().and_then(|v| v.to_str().ok()));
    out.extend_from_slice(b"}\n");
}

/// Appends `record`'s line in the combined log format, with the gateway's fields after it.
fn combined_line(r: &Record, out: &mut Vec<u8>) {
    let quoted = |v: &Option<HeaderValue>| {
        v.as_ref()
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "-".to_owned(), |s| s.replace('"', "\\\""))
    };
    let _ = writeln!(
        out,
        "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" request_id={} upstream={} duration_ms={:.3} admission_wait_ms={} bytes_in={} error={}",
        r.remote.map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
        clf_time(r.time),
        r.method,
        r.path.as_str().replace('"', "%22"),
        r.version,
        r.status.as_u16(),
        r.bytes_out,
        quoted(&r.referer),
        quoted(&r.user_agent),
        r.request_id.as_str(),
        r.upstream.unwrap_or("-"),
        millis(r.duration),
        r.admission_wait
            .map_or_else(|| "-".to_owned(), |w| format!("{:.3}", millis(w))),
        r.bytes_in,
        r.error.unwrap_or("-"),
    );
}

/// `d` in milliseconds rounded to the microsecond, as `serde_json` writes that `f64`: the
/// shortest decimal that reads back as it, which for a whole number of microseconds below
/// 10^15 is the number itself with its trailing zeros dropped (`12.5`, `0.001`, `3.0`).
fn json_millis(out: &mut Vec<u8>, d: Duration) {
    let micros = rounded_micros(d);
    if micros >= 1e15 {
        // Over 31 years: leave the digits to serde_json.
        let _ = serde_json::to_writer(&mut *out, &(micros / 1000.0));
        return;
    }
    let micros = micros as u64;
    write_u64(out, micros / 1000);
    out.push(b'.');
    let mut frac = micros % 1000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let mut digits = 3;
    while frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    let mut text = [b'0'; 3];
    for slot in text[..digits].iter_mut().rev() {
        *slot = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    out.extend_from_slice(&text[..digits]);
}

/// Appends `v` in decimal.
fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut text = [0u8; 20];
    let mut at = text.len();
    loop {
        at -= 1;
        text[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&text[at..]);
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it: `"` and `\`, and the
/// control characters below 0x20 (`\b \f \n \r \t` by name, the rest as `\u00XX`); every
/// other character as it is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[from..i]);
        from = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

/// The writer's clock text: the RFC 3339 date and time up to the second, kept for the
/// second it was made for (lines come in bursts from the same second).
#[derive(Debug, Default)]
struct TimeText {
    second: Option<u64>,
    text: String,
}

impl TimeText {
    /// Appends `2026-12-02T18:03:53.123Z`.
    fn rfc3339(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            let (y, mo, d, h, mi, s, _) = civil(t);
            self.text.clear();
            let _ = write!(self.text, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            self.second = Some(second);
        }
        out.extend_from_slice(self.text.as_bytes());
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// Civil UTC date and time of `t`: (year, month, day, hour, minute, second, millisecond).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
        d.subsec_millis(),
    )
}

/// `02/Dec/2026:18:03:53 +0000` (the combined log format's `%t`).
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = civil(t);
    let month = MONTHS[(mo as usize).clamp(1, 12) - 1];
    format!("{d:02}/{month}/{y:04}:{h:02}:{mi:02}:{s:02} +0000")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_writer_turns_counter_readings_into_wall_clock_times() {
        let mut wall = WallClock::now();
        let off = |t: SystemTime, want: SystemTime| match t.duration_since(want) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        let now = quanta::Instant::now();
        assert!(off(wall.of(now), SystemTime::now()) < Duration::from_millis(50));
        let earlier = now.checked_sub(Duration::from_secs(3)).unwrap();
        let want = SystemTime::now() - Duration::from_secs(3);
        assert!(off(wall.of(earlier), want) < Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(20));
        let later = quanta::Instant::now();
        assert!(off(wall.of(later), SystemTime::now()) < Duration::from_millis(50));
    }

    #[test]
    fn request_ids_are_checked_and_generated_unique() {
        assert!(is_valid_request_id(b"abc-123"));
        assert!(is_valid_request_id(&[b'x'; 128]));
        assert!(!is_valid_request_id(&[b'x'; 129]));
        assert!(!is_valid_request_id(b""));
        assert!(!is_valid_request_id(b"tab\there"));
        assert!(!is_valid_request_id("caf\u{e9}".as_bytes()));
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let other = std::thread::spawn(new_request_id).join().unwrap();
        assert!(!ids.contains(&other));
        let id = new_request_id();
        let text = id.to_str().unwrap();
        assert!(is_valid_request_id(text.as_bytes()), "{text}");
        assert_eq!(text.split('-').next().unwrap().len(), 16, "{text}");
    }

    fn rfc3339(t: SystemTime) -> String {
        let mut out = Vec::new();
        TimeText::default().rfc3339(t, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn times_are_utc_civil_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_698_633_123);
        assert_eq!(rfc3339(t), "2025-12-02T18:03:53.123Z");
        assert_eq!(clf_time(t), "02/Dec/2025:18:03:53 +0000");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // The kept text of one second is not reused for the next.
        let mut clock = TimeText::default();
        let mut out = Vec::new();
        clock.rfc3339(t, &mut out);
        clock.rfc3339(t + Duration::from_millis(5), &mut out);
        clock.rfc3339(t + Duration::from_millis(900), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-12-02T18:03:53.123Z2025-12-02T18:03:53.128Z2025-12-02T18:03:54.023Z"
        );
    }

    /// The line as the log wrote it before it formatted lines by hand: `serde_json::json!`.
    fn serde_json_line(r: &Record) -> String {
        let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let mut line = serde_json::json!({
            "time": rfc3339(r.time),
            "request_id": r.request_id.as_str(),
            "remote": r.remote.map(|ip| ip.to_string()),
            "method": r.method.as_str(),
            "path": r.path.as_str(),
            "status": r.status.as_u16(),
            "upstream": r.upstream,
            "duration_ms": round3(millis(r.duration)),
            "admission_wait_ms": r.admission_wait.map(|w| round3(millis(w))),
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
            "error": r.error,
            "user_agent": r.user_agent.as_ref().and_then(|v| v.to_str().ok()),
        })
        .to_string();
        line.push('\n');
        line
    }

    fn record() -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_698_633_123),
            started: quanta::Instant::now(),
            duration: Duration::from_micros(1_500),
            admission_wait: Some(Duration::from_micros(20)),
            bytes_in: 5,
            bytes_out: 2,
            method: Method::GET,
            path: LogText::new("/bench"),
            version: http::Version::HTTP_11,
            remote: Some(IpAddr::from([127, 0, 0, 1])),
            user_agent: None,
            referer: None,
            request_id: LogText::new("3f9a0c21d4e8b705-1c"),
            upstream: Some("http://127.0.0.1:9000"),
            status: StatusCode::OK,
            error: None,
        }
    }

    fn json(r: &Record) -> String {
        let mut out = Vec::new();
        json_line(r, &mut TimeText::default(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_json_line_is_what_serde_json_wrote() {
        let r = record();
        assert_eq!(
            json(&r),
            "{\"admission_wait_ms\":0.02,\"bytes_in\":5,\"bytes_out\":2,\"duration_ms\":1.5,\"error\":null,\"method\":\"GET\",\"path\":\"/bench\",\"remote\":\"127.0.0.1\",\"request_id\":\"3f9a0c21d4e8b705-1c\",\"status\":200,\"time\":\"2025-12-02T18:03:53.123Z\",\"upstream\":\"http://127.0.0.1:9000\",\"user_agent\":null}\n"
        );
        assert_eq!(json(&r), serde_json_line(&r));
        for micros in [
            0,
            1,
            10,
            100,
            999,
            1_000,
            1_001,
            10_000_000,
            999_999_999_999,
        ] {
            let r = Record {
                duration: Duration::from_micros(micros),
                admission_wait: None,
                ..record()
            };
            assert_eq!(json(&r), serde_json_line(&r), "{micros} us");
        }
    }

    #[test]
    fn paths_long_and_short_are_kept_whole() {
        for len in [0, 1, INLINE_TEXT - 1, INLINE_TEXT, INLINE_TEXT + 1, 300] {
            let path = format!("/{}", "é".repeat(len / 2));
            assert_eq!(LogText::new(&path).as_str(), path);
        }
    }

    #[test]
    fn a_flush_returns_once_every_line_sent_before_it_is_written() {
        let dir = std::env::temp_dir().join(format!("portcullis-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let config = AccessLogConfig {
            enable: true,
            format: AccessLogFormat::Json,
            path: path.display().to_string(),
        };
        let log = AccessLog::start(&config).unwrap();
        let count = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .inspect(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap();
                })
                .count()
        };
        for _ in 0..1000 {
            log.send(record());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // Flushed: every line sent before is in the file, at once.
        assert!(rt.block_on(log.flush(Duration::from_secs(5))));
        assert_eq!(count(&path), 1000);
        assert_eq!(log.dropped(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn header(text: String) -> Option<HeaderValue> {
            HeaderValue::from_str(&text).ok()
        }

        prop_compose! {
            fn records()(
                time_ms in 0u64..8_000_000_000_000,
                duration_ns in prop_oneof![0u64..10_000_000, 0u64..u64::MAX / 4],
                wait_ns in proptest::option::of(0u64..100_000_000_000),
                bytes in any::<(u64, u64)>(),
                method in prop_oneof![
                    Just(Method::GET), Just(Method::POST), Just(Method::DELETE),
                    Just(Method::from_bytes(b"PURGE").unwrap()),
                ],
                path in any::<String>(),
                remote in proptest::option::of(prop_oneof![
                    any::<[u8; 4]>().prop_map(IpAddr::from),
                    any::<[u8; 16]>().prop_map(IpAddr::from),
                ]),
                user_agent in proptest::option::of("[\\t\\x20-\\x7e\\u{80}-\\u{ff}]{0,40}"),
                request_id in "[\\x20-\\x7e]{1,40}",
                upstream in proptest::option::of(any::<String>()),
                status in 100u16..1000,
                error in proptest::option::of(prop_oneof![Just("bad_gateway"), Just("overloaded")]),
            ) -> Record {
                Record {
                    time: SystemTime::UNIX_EPOCH + Duration::from_millis(time_ms),
                    started: quanta::Instant::now(),
                    duration: Duration::from_nanos(duration_ns),
                    admission_wait: wait_ns.map(Duration::from_nanos),
                    bytes_in: bytes.0,
                    bytes_out: bytes.1,
                    method,
                    path: LogText::new(&path),
                    version: http::Version::HTTP_11,
                    remote,
                    user_agent: user_agent.and_then(header),
                    referer: None,
                    request_id: LogText::new(&request_id),
                    upstream: upstream.map(|u| &*Box::leak(u.into_boxed_str())),
                    status: StatusCode::from_u16(status).unwrap(),
                    error,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            /// The hand-written line is byte for byte the line `serde_json` wrote: the same
            /// field order, escaping and number text.
            #[test]
            fn json_lines_are_serde_jsons(r in records()) {
                prop_assert_eq!(json(&r), serde_json_line(&r));
            }

            #[test]
            fn strings_are_escaped_as_serde_json_escapes_them(s in any::<String>()) {
                let mut out = Vec::new();
                json_str(&mut out, &s);
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
            }
        }
    }
}
