//! HTTP framing at the edges, as raw bytes: raw requests at the real gateway, and raw
//! responses from a raw TCP upstream on 127.0.0.1. Nothing ambiguous is ever forwarded.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::TestGateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw upstream: answers `/healthz` with 200, a path listed in `canned` with its bytes,
/// anything else with a small 200; records every request head it got (test-only Mutex).
struct RawUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream(canned: Vec<(&'static str, &'static [u8])>) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let heads = Arc::clone(&h);
            let canned = canned.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read one request head (bodies are small in these tests).
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let end = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .unwrap_or(buf.len());
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                if path != "/healthz" {
                    heads.lock().unwrap().push(head);
                }
                let resp: &[u8] = canned
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, r)| *r)
                    .unwrap_or(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    RawUpstream { addr, heads, task }
}

async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> Option<u16> {
    resp.split(' ').nth(1)?.parse().ok()
}

async fn gateway_for(up: &RawUpstream) -> TestGateway {
    TestGateway::start(&format!(
        "listen: 127.0.0.1:0\nhealth_check_interval: 0.2\neject_after: 0\nupstreams:\n  - {{url: \"http://{}\"}}\n",
        up.addr
    ))
    .await
}

/// Each forwarded request head has at most one framing header, so the upstream cannot read
/// a body boundary other than the gateway's (a pipelined follow-up, as in CL.TE, is then a
/// request of its own for both).
fn assert_unambiguous(heads: &[String], case: &str) {
    for h in heads {
        let lower = h.to_ascii_lowercase();
        let cl = lower.matches("\r\ncontent-length:").count();
        let te = lower.matches("\r\ntransfer-encoding:").count();
        assert!(
            cl + te <= 1,
            "{case}: ambiguous framing forwarded upstream:\n{h}"
        );
    }
}

#[tokio::test]
async fn raw_requests_are_refused_or_forwarded_unambiguously() {
    let up = raw_upstream(vec![]).await;
    let gw = gateway_for(&up).await;
    let big_header = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    // (case, raw request, statuses accepted; None: the connection may be closed unanswered)
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "CL.TE",
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[200, 400],
        ),
        (
            "TE.CL",
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec(),
            &[200, 400],
        ),
        (
            "duplicate CL",
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            &[400],
        ),
        (
            "xchunked",
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            &[400, 501],
        ),
        (
            "NUL in a header",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "bare CR in a header",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "obs-fold",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            &[400],
        ),
        ("1 MiB header", big_header.into_bytes(), &[400, 431]),
        (
            "two Host headers",
            b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "CONNECT",
            b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n".to_vec(),
            &[405, 400],
        ),
    ];
    for (case, bytes, ok) in &cases {
        let before = up.heads.lock().unwrap().len();
        let resp = send_raw(gw.addr, bytes).await;
        let status = status_of(&resp);
        // hyper may close a connection on a head it cannot parse without answering; that is
        // safe (nothing forwarded), but an answer must be one of the expected ones.
        if let Some(st) = status {
            assert!(ok.contains(&st), "{case}: answered {st}:\n{resp:.300}");
        } else {
            assert!(resp.is_empty(), "{case}: not HTTP: {resp:.300}");
        }
        let heads = up.heads.lock().unwrap().clone();
        assert_unambiguous(&heads[before..], case);
        if status != Some(200) {
            assert_eq!(
                heads.len(),
                before,
                "{case}: refused, yet forwarded:\n{:?}",
                &heads[before..]
            );
        }
    }
    // The refusals were the client's: the upstream is still healthy.
    let snap = gw.gateway.registry().snapshot();
    assert!(snap.replicas[0].healthy, "{:?}", snap.replicas[0]);
}

#[tokio::test]
async fn raw_upstream_responses_are_never_relayed_ambiguously() {
    let up = raw_upstream(vec![
        (
            "/cl-te",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
        ),
        (
            "/101",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ),
        (
            "/status-700",
            b"HTTP/1.1 700 Weird\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        ),
    ])
    .await;
    let gw = gateway_for(&up).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");

    // CL + TE: Transfer-Encoding wins; the whole body reaches the client, no stale length.
    let resp = send_raw(gw.addr, get("/cl-te").as_bytes()).await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert_eq!(status_of(head), Some(200), "{resp}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length: 3"),
        "stale Content-Length relayed:\n{head}"
    );
    assert!(body.contains("hello world"), "body truncated: {resp:?}");

    // An unasked 101 and a status outside 100..=599 are 502s.
    for path in ["/101", "/status-700"] {
        let resp = send_raw(gw.addr, get(path).as_bytes()).await;
        // hyper's client may itself refuse a 3-digit status above 599 as a parse error: the
        // result is a 502 either way.
        assert_eq!(status_of(&resp), Some(502), "{path}: {resp}");
        assert!(resp.contains(r#""error":"bad_gateway""#), "{path}: {resp}");
    }
}
