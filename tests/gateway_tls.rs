//! TLS (issue 18), on a real gateway and real backends on 127.0.0.1, with certificates made
//! in the test (a private CA, a server certificate for 127.0.0.1):
//!
//! * the listener terminates TLS: a client that verifies the test CA gets answers over
//!   HTTP/1.1 and h2 (ALPN); a plain-HTTP client on the TLS port is closed and the gateway
//!   keeps serving; a handshake that never comes is cut at `tls.handshake_timeout`; failed
//!   handshakes are counted; the certificate is re-read by `reload_certs`;
//! * `https://` upstreams: a TLS backend behind the private CA works with
//!   `upstream_tls.ca_file`, and without it the request is a 502 `bad_gateway` and the
//!   health check fails.

mod support;

use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::gateway::config::UpstreamTlsConfig;
use portcullis::gateway::proxy::{Proxy, ProxySettings};
use portcullis::gateway::tls::UpstreamTls;
use portcullis::gateway::upstream_probe::UpstreamProbe;
use portcullis_health::Probe;
use portcullis_redis::testing::TlsFiles;
use portcullis_testkit::eventually_async;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::{backend, client, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts only the test CA and offers `alpn`.
fn connector(ca: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector(ca, alpn).connect(name, tcp).await.unwrap()
}

/// `GET path` over HTTP/1.1 on a fresh TLS connection: status, body.
async fn get_h1(addr: SocketAddr, ca: &Path, path: &str) -> (StatusCode, String) {
    let tls = tls_connect(addr, ca, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn yaml_tls(upstream: &str, files: &TlsFiles, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{upstream}\", primary: true}}\ntls: {{cert_file: \"{}\", key_file: \"{}\", handshake_timeout: 0.5}}\n{extra}",
        files.server_cert.display(),
        files.server_key.display()
    )
}

async fn echo_backend() -> support::Server {
    backend(Router::new().fallback(|req: AxumRequest| async move {
        let proto = req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        format!("backend:{} proto:{proto}", req.uri().path())
    }))
    .await
}

#[tokio::test]
async fn the_listener_serves_http1_and_h2_over_tls_and_closes_plain_http() {
    let Some(files) = TlsFiles::new("gateway_tls") else {
        return;
    };
    let be = echo_backend().await;
    let gw = TestGateway::start(&yaml_tls(&be.url(), &files, "")).await;
    let tls = gw.gateway.app().tls().cloned().expect("TLS is on");

    // HTTP/1.1, by ALPN.
    let (status, body) = get_h1(gw.addr, &files.ca, "/one").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "backend:/one proto:https");

    // h2, by ALPN.
    let stream = tls_connect(gw.addr, &files.ca, &[b"h2"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(format!("https://127.0.0.1:{}/two", gw.addr.port()))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"backend:/two proto:https");
    assert_eq!(tls.handshakes_failed(), 0);

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /plain HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut seen)).await;
    assert!(
        read.is_ok(),
        "the plain connection is closed, not left hanging"
    );
    assert!(
        !String::from_utf8_lossy(&seen).contains("HTTP/1.1"),
        "no HTTP answer on the TLS port: {seen:?}"
    );
    // A client that never starts its handshake is closed after handshake_timeout.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            tls.handshakes_failed() >= 2
        })
        .await,
        "both failed handshakes are counted: {}",
        tls.handshakes_failed()
    );
    // The gateway keeps serving TLS clients, and its stats and /metrics count the failures.
    let (status, _) = get_h1(gw.addr, &files.ca, "/after").await;
    assert_eq!(status, StatusCode::OK);
    let (_, stats) = get_h1(gw.addr, &files.ca, "/balancer/stats").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["tls_handshakes_failed"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    let (_, metrics) = get_h1(gw.addr, &files.ca, "/metrics").await;
    assert!(
        metrics.contains("portcullis_tls_handshakes_failed_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn reload_certs_rereads_the_files_and_keeps_the_old_certificate_on_error() {
    let Some(files) = TlsFiles::new("gateway_tls_reload") else {
        return;
    };
    let be = echo_backend().await;
    let gw = TestGateway::start(&yaml_tls(&be.url(), &files, "")).await;
    let tls = gw.gateway.app().tls().cloned().unwrap();
    tls.reload_certs().expect("the same files load again");
    let (status, _) = get_h1(gw.addr, &files.ca, "/x").await;
    assert_eq!(status, StatusCode::OK);
    // A key file that became garbage: refused naming the field, the old config serves on.
    std::fs::write(&files.server_key, "not a key").unwrap();
    let e = tls.reload_certs().unwrap_err();
    assert_eq!(e.field, "tls.key_file", "{e}");
    let (status, _) = get_h1(gw.addr, &files.ca, "/y").await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn bad_certificate_and_key_files_name_their_field() {
    let Some(files) = TlsFiles::new("gateway_tls_files") else {
        return;
    };
    let load = |cert: &Path, key: &Path, extra: &str| {
        portcullis::gateway::GatewayConfig::from_yaml(
            &format!(
                "upstreams:\n  - {{url: \"http://127.0.0.1:1\"}}\ntls: {{cert_file: \"{}\", key_file: \"{}\"{extra}}}\n",
                cert.display(),
                key.display()
            ),
            Path::new("t.yml"),
        )
    };
    let missing = files.ca.with_file_name("missing.pem");
    let (cert, key, m) = (
        files.server_cert.as_path(),
        files.server_key.as_path(),
        missing.as_path(),
    );
    let cases = [
        (m, key, "", "tls.cert_file"),
        (key, key, "", "tls.cert_file"),
        (cert, m, "", "tls.key_file"),
        (cert, cert, "", "tls.key_file"),
        // The client's key does not go with the server's certificate.
        (cert, files.client_key.as_path(), "", "tls.key_file"),
        (cert, key, ", handshake_timeout: 0", "tls.handshake_timeout"),
    ];
    for (cert, key, extra, field) in cases {
        let e = load(cert, key, extra).unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{cert:?} {key:?}: {e}");
    }
    let ok = load(&files.server_cert, &files.server_key, "").unwrap();
    assert_eq!(
        ok.tls.unwrap().handshake_timeout,
        Duration::from_secs(10),
        "the default handshake timeout"
    );
}

/// An axum backend served over TLS with the test server certificate.
async fn tls_backend(files: &TlsFiles) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let certs: Vec<_> = CertificateDer::pem_file_iter(&files.server_cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&files.server_key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let app = Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .fallback(|req: AxumRequest| async move { format!("tls-backend:{}", req.uri().path()) });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn get_plain(url: String) -> (StatusCode, String) {
    let resp = client()
        .request(Request::get(url).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_https_upstream_behind_a_private_ca_needs_its_ca_file() {
    let Some(files) = TlsFiles::new("gateway_upstream_tls") else {
        return;
    };
    let (addr, _backend) = tls_backend(&files).await;
    let upstream = format!("https://127.0.0.1:{}", addr.port());
    // A high failure_threshold keeps the replica in the pool, so the request itself meets
    // the certificate check.
    let base = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  - {{url: \"{upstream}\", primary: true}}\nfailure_threshold: 1000\n"
    );

    // With the CA: proxied, connection reused, health check healthy.
    let gw = TestGateway::start(&format!(
        "{base}upstream_tls: {{ca_file: \"{}\"}}\n",
        files.ca.display()
    ))
    .await;
    for i in 0..3 {
        let (status, body) = get_plain(gw.url(&format!("/r{i}"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, format!("tls-backend:/r{i}"));
    }
    let replica = gw.gateway.registry().replicas()[0].target().clone();
    assert_eq!(
        replica.connections_opened(),
        1,
        "the TLS connection is pooled"
    );

    // Without it (the system roots do not know the test CA): 502 bad_gateway.
    let gw = TestGateway::start(&base).await;
    let (status, body) = get_plain(gw.url("/r")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "bad_gateway", "{body}");

    // The health check fails on the same certificate, and passes with the CA.
    let default_tls = Proxy::new(ProxySettings::default());
    let probe = UpstreamProbe::new("/healthz", Duration::from_secs(5), &default_tls);
    let result = probe.probe(&upstream).await;
    assert!(!result.healthy, "{result:?}");
    assert_eq!(result.detail, "tls error");
    let with_ca = Proxy::new(ProxySettings::default());
    let config = UpstreamTlsConfig {
        ca_file: Some(files.ca.clone()),
        ..UpstreamTlsConfig::default()
    };
    assert!(with_ca.set_upstream_tls(UpstreamTls::from_config(Some(&config)).unwrap()));
    let probe = UpstreamProbe::new("/healthz", Duration::from_secs(5), &with_ca);
    let result = probe.probe(&upstream).await;
    assert!(result.healthy, "{result:?}");
    // A server name the certificate does not carry fails the handshake.
    let wrong_name = Proxy::new(ProxySettings::default());
    let config = UpstreamTlsConfig {
        server_name: Some("other.example".into()),
        ..config
    };
    wrong_name.set_upstream_tls(UpstreamTls::from_config(Some(&config)).unwrap());
    let probe = UpstreamProbe::new("/healthz", Duration::from_secs(5), &wrong_name);
    assert!(!probe.probe(&upstream).await.healthy);
    // And the gateway's own checker counts the failures.
    let failures = || async {
        let replicas = gw.gateway.registry().snapshot().replicas;
        replicas[0].counters.consecutive_probe_failures > 0
    };
    assert!(eventually_async(Duration::from_secs(10), failures).await);
}
