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
//! writer thread of its own: the request path formats the line and hands it over a bounded
//! channel ([`LINE_BUFFER`] lines) with `try_send`, so a slow disk or a full pipe never
//! blocks a request; a line that does not fit is dropped and counted
//! ([`AccessLog::dropped`]). This is a channel of our own rather than tracing-appender's
//! `non_blocking` writer because the access log must not depend on the user's tracing
//! subscriber or its filter, and it needs no extra dependency.
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
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

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
/// (the end of the admission wait). Put in the request's extensions by the front only
/// while the access log or the request span is on.
#[derive(Debug, Default)]
pub struct DispatchNote {
    upstream: OnceLock<Arc<str>>,
    at: OnceLock<Instant>,
}

impl DispatchNote {
    /// The proxy sends the request to `upstream` now.
    pub fn dispatched(&self, upstream: &Arc<str>) {
        let _ = self.upstream.set(Arc::clone(upstream));
        let _ = self.at.set(Instant::now());
    }
}

/// Notes `upstream` on `req`'s [`DispatchNote`], when it has one (the proxy calls it).
pub fn note_dispatch<B>(req: &Request<B>, upstream: &Arc<str>) {
    if let Some(note) = req.extensions().get::<Arc<DispatchNote>>() {
        note.dispatched(upstream);
    }
}

/// The access log: its format and the writer thread's channel. Clones share both.
#[derive(Debug, Clone)]
pub struct AccessLog {
    inner: Arc<Writer>,
}

#[derive(Debug)]
struct Writer {
    format: AccessLogFormat,
    lines: SyncSender<String>,
    dropped: AtomicU64,
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
        std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(Self {
            inner: Arc::new(Writer {
                format: config.format,
                lines,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// Lines dropped because the writer fell [`LINE_BUFFER`] lines behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn send(&self, line: String) {
        match self.inner.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread: writes lines as they come, flushing whenever it has caught up.
/// How often the busy writer thread drains the channel (a line reaches the output within
/// about this long).
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// The writer thread. Idle, it blocks on the channel; once a line arrives it sleeps
/// [`DRAIN_EVERY`], writes every line that came meanwhile through a 64 KiB buffer and
/// flushes, and goes on so until a tick finds the channel empty. While it sleeps no sender
/// has to wake it, so a request costs a channel push, not a futex wake and a `write`
/// (which cost the gateway about a quarter of its req/s in the loadbench).
fn write_lines(rx: &Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            let mut wrote = false;
            while let Some(line) = next.take() {
                if out.write_all(line.as_bytes()).is_err() {
                    return;
                }
                wrote = true;
                next = match rx.try_recv() {
                    Ok(line) => Some(line),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                };
            }
            if out.flush().is_err() {
                return;
            }
            if !wrote {
                break;
            }
            std::thread::sleep(DRAIN_EVERY);
            next = match rx.try_recv() {
                Ok(line) => Some(line),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            };
        }
    }
    let _ = out.flush();
}

/// One request on its way: what its log line and span need, gathered from the request, the
/// proxy ([`DispatchNote`]) and the response.
#[derive(Debug)]
pub(crate) struct Pending {
    log: Option<AccessLog>,
    span: Option<tracing::Span>,
    started: Instant,
    time: SystemTime,
    method: Method,
    path: Box<str>,
    version: http::Version,
    peer: Option<SocketAddr>,
    user_agent: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    request_id: HeaderValue,
    note: Arc<DispatchNote>,
    bytes_in: Arc<AtomicU64>,
    status: StatusCode,
    error: Option<&'static str>,
}

impl Pending {
    /// Starts the record of `req` (`None` when neither the access log nor the span is on).
    /// Notes the dispatch and counts the request body as it streams.
    pub(crate) fn start(
        log: Option<&AccessLog>,
        req: &mut Request<Body>,
        request_id: &HeaderValue,
    ) -> Option<Box<Self>> {
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
        let bytes_in = Arc::new(AtomicU64::new(0));
        if !http_body::Body::is_end_stream(req.body()) {
            let counted = Arc::clone(&bytes_in);
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::new(Counted {
                inner: body,
                count: counted,
                pending: None,
            });
        }
        let headers = req.headers();
        Some(Box::new(Self {
            log: log.cloned(),
            span,
            started: Instant::now(),
            time: SystemTime::now(),
            method: req.method().clone(),
            path: req.uri().path().into(),
            version: req.version(),
            peer: req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            referer: headers.get(http::header::REFERER).cloned(),
            request_id: request_id.clone(),
            note,
            bytes_in,
            status: StatusCode::OK,
            error: None,
        }))
    }

    /// The span to run the request's future in.
    pub(crate) fn span(&self) -> Option<&tracing::Span> {
        self.span.as_ref()
    }

    /// The response head is known: records it and wraps the body, whose end writes the line.
    pub(crate) fn respond(
        mut self: Box<Self>,
        resp: Response<Body>,
        error: Option<&'static str>,
    ) -> Response<Body> {
        self.status = resp.status();
        self.error = error;
        if let Some(span) = &self.span {
            span.record("status", self.status.as_u16());
            if let Some(u) = self.note.upstream.get() {
                span.record("upstream", &**u);
            }
            if let Some(e) = error {
                span.record("error", e);
            }
            if let Some(w) = self.admission_wait_ms() {
                span.record("admission_wait_ms", w);
            }
        }
        resp.map(|body| {
            Body::new(Counted {
                inner: body,
                count: Arc::new(AtomicU64::new(0)),
                pending: Some(self),
            })
        })
    }

    /// The client went away before the response head: the line says 499 `client_closed`.
    pub(crate) fn abandoned(mut self: Box<Self>) {
        self.status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
        self.error = Some(portcullis_core::codes::CLIENT_CLOSED);
        self.finish(0);
    }

    fn admission_wait_ms(&self) -> Option<f64> {
        self.note
            .at
            .get()
            .map(|at| at.saturating_duration_since(self.started).as_secs_f64() * 1e3)
    }

    /// Writes the line (and closes the span's fields) with `bytes_out` sent.
    fn finish(self: Box<Self>, bytes_out: u64) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        if let Some(span) = &self.span {
            span.record("duration_ms", duration_ms);
            span.record("bytes_in", bytes_in);
            span.record("bytes_out", bytes_out);
        }
        let Some(log) = &self.log else {
            return;
        };
        let line = match log.inner.format {
            AccessLogFormat::Json => self.json_line(duration_ms, bytes_in, bytes_out),
            AccessLogFormat::Combined => self.combined_line(duration_ms, bytes_in, bytes_out),
        };
        log.send(line);
    }

    fn json_line(&self, duration_ms: f64, bytes_in: u64, bytes_out: u64) -> String {
        let text =
            |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut line = serde_json::json!({
            "time": rfc3339(self.time),
            "request_id": self.request_id.to_str().unwrap_or_default(),
            "remote": self.peer.map(|p| p.ip().to_string()),
            "method": self.method.as_str(),
            "path": &*self.path,
            "status": self.status.as_u16(),
            "upstream": self.note.upstream.get().map(|u| &**u),
            "duration_ms": round3(duration_ms),
            "admission_wait_ms": self.admission_wait_ms().map(round3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "error": self.error,
            "user_agent": text(&self.user_agent),
        })
        .to_string();
        line.push('\n');
        line
    }

    fn combined_line(&self, duration_ms: f64, bytes_in: u64, bytes_out: u64) -> String {
        let quoted = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "-".to_owned(), |s| s.replace('"', "\\\""))
        };
        let mut line = String::with_capacity(256);
        let _ = writeln!(
            line,
            "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" request_id={} upstream={} duration_ms={:.3} admission_wait_ms={} bytes_in={} error={}",
            self.peer.map_or_else(|| "-".to_owned(), |p| p.ip().to_string()),
            clf_time(self.time),
            self.method,
            self.path.replace('"', "%22"),
            self.version,
            self.status.as_u16(),
            bytes_out,
            quoted(&self.referer),
            quoted(&self.user_agent),
            self.request_id.to_str().unwrap_or("-"),
            self.note.upstream.get().map_or("-", |u| &**u),
            duration_ms,
            self.admission_wait_ms()
                .map_or_else(|| "-".to_owned(), |w| format!("{w:.3}")),
            bytes_in,
            self.error.unwrap_or("-"),
        );
        line
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A body that counts the bytes of its data frames; with `pending` (a response body), the
/// request's line is written when the body is done with (sent whole, failed, or dropped).
struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
    pending: Option<Box<Pending>>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.count.load(Ordering::Relaxed));
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
                    this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
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

/// `2026-12-02T18:03:53.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = civil(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
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

    #[test]
    fn times_are_utc_civil_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_698_633_123);
        assert_eq!(rfc3339(t), "2025-12-02T18:03:53.123Z");
        assert_eq!(clf_time(t), "02/Dec/2025:18:03:53 +0000");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
