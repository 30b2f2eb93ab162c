//! TLS with rustls (the ring provider, no OpenSSL): termination on the listener (`tls:`) and
//! the client side of `https://` upstreams (`upstream_tls:`).
//!
//! * **Listener.** [`TlsTerminator`] holds the server config behind an `ArcSwap`: every new
//!   connection takes the current one, and [`TlsTerminator::reload_certs`] re-reads the
//!   certificate and key files and swaps the new config in (connections already open keep
//!   theirs). ALPN offers `h2` and `http/1.1`. A handshake has `tls.handshake_timeout`
//!   to finish; a handshake that fails or times out closes the connection and is counted
//!   ([`TlsTerminator::handshakes_failed`], `tls_handshakes_failed` in the stats and
//!   `/metrics`). A client speaking plain HTTP to the TLS port fails the handshake the same
//!   way: its connection is closed, nothing else.
//! * **Upstreams.** [`UpstreamTls`] opens TLS connections for the proxy's HTTP/1 pool and
//!   the health checks. The trusted roots are the system's (rustls-native-certs), or only
//!   `upstream_tls.ca_file` when set (a private CA); `cert_file` + `key_file` present a client
//!   certificate (mutual TLS); `server_name` overrides the name sent in SNI and checked
//!   against the upstream's certificate (the URL's host otherwise). ALPN offers `http/1.1`
//!   only: the pool speaks HTTP/1. A certificate the roots do not vouch for fails the
//!   connect, which the proxy answers with 502 `bad_gateway`.

use super::config::{TlsConfig, UpstreamTlsConfig};
use arc_swap::ArcSwap;
use portcullis_core::ConfigError as FieldError;
use rustls::client::ClientConfig;
use rustls::server::ServerConfig;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The crypto provider of every TLS config made here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the PEM certificate chain of `file`; the error names `field`.
fn read_certs(field: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let pem = std::fs::read(file)
        .map_err(|e| FieldError::new(field, format!("cannot read {}: {e}", file.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            FieldError::new(
                field,
                format!("{} is not a PEM certificate file: {e}", file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(FieldError::new(
            field,
            format!("{} holds no PEM certificate", file.display()),
        ));
    }
    Ok(certs)
}

/// Reads the PEM private key of `file` (PKCS#8, PKCS#1 or SEC1); the error names `field`
/// and never shows the file's content.
fn read_key(field: &str, file: &Path) -> Result<PrivateKeyDer<'static>, FieldError> {
    let pem = std::fs::read(file)
        .map_err(|e| FieldError::new(field, format!("cannot read {}: {e}", file.display())))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        FieldError::new(
            field,
            format!("{} holds no PEM private key", file.display()),
        )
    })
}

/// The listener's server config from `tls`: the certificate chain, its key and ALPN `h2`,
/// `http/1.1`. A key that does not match the certificate is refused naming `tls.key_file`.
pub fn server_config(tls: &TlsConfig) -> Result<ServerConfig, FieldError> {
    let certs = read_certs("tls.cert_file", &tls.cert_file)?;
    let key = read_key("tls.key_file", &tls.key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FieldError::new("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            FieldError::new(
                "tls.key_file",
                format!("the key does not go with tls.cert_file: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS termination on the listener; clones share the config and the failure counter.
#[derive(Clone)]
pub struct TlsTerminator {
    config: Arc<ArcSwap<ServerConfig>>,
    files: Arc<TlsConfig>,
    failed: Arc<AtomicU64>,
}

impl fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("cert_file", &self.files.cert_file)
            .field("handshake_timeout", &self.files.handshake_timeout)
            .field("handshakes_failed", &self.handshakes_failed())
            .finish_non_exhaustive()
    }
}

impl TlsTerminator {
    /// Loads the certificate and key of `tls`.
    pub fn from_config(tls: &TlsConfig) -> Result<Self, FieldError> {
        let config = server_config(tls)?;
        Ok(Self {
            config: Arc::new(ArcSwap::from_pointee(config)),
            files: Arc::new(tls.clone()),
            failed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Re-reads the certificate and key files: new connections get the new certificate,
    /// open ones keep theirs. On an error the old certificate stays in use.
    pub fn reload_certs(&self) -> Result<(), FieldError> {
        let certs = self.read_certs()?;
        self.install_certs(certs);
        Ok(())
    }

    /// The first half of [`reload_certs`](Self::reload_certs): reads and checks both files,
    /// changing nothing (a config reload reads them before it applies anything).
    pub fn read_certs(&self) -> Result<Arc<ServerConfig>, FieldError> {
        server_config(&self.files).map(Arc::new)
    }

    /// The second half of [`reload_certs`](Self::reload_certs): new connections get
    /// `certs` (from [`read_certs`](Self::read_certs)).
    pub fn install_certs(&self, certs: Arc<ServerConfig>) {
        self.config.store(certs);
    }

    /// Handshakes that failed or timed out so far.
    pub fn handshakes_failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// `tls.handshake_timeout`.
    pub fn handshake_timeout(&self) -> Duration {
        self.files.handshake_timeout
    }

    /// Runs the server handshake on `tcp` within the handshake timeout; `None` (counted)
    /// when it failed or timed out. Cancellation-safe: dropping the future drops the socket.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        let outcome = tokio::time::timeout(self.handshake_timeout(), acceptor.accept(tcp)).await;
        match outcome {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(timeout = ?self.handshake_timeout(), "TLS handshake timed out");
                None
            }
        }
    }
}

/// The client config for upstreams from `tls` (`None`: system roots, no client certificate).
pub fn client_config(tls: Option<&UpstreamTlsConfig>) -> Result<ClientConfig, FieldError> {
    let default = UpstreamTlsConfig::default();
    let tls = tls.unwrap_or(&default);
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err(FieldError::new(
                "upstream_tls.key_file",
                "a client certificate (upstream_tls.cert_file) needs its key",
            ))
        }
        (None, Some(_)) => {
            return Err(FieldError::new(
                "upstream_tls.cert_file",
                "a client key (upstream_tls.key_file) needs its certificate",
            ))
        }
        _ => {}
    }
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in read_certs("upstream_tls.ca_file", ca)? {
                roots.add(cert).map_err(|e| {
                    FieldError::new(
                        "upstream_tls.ca_file",
                        format!("{}: not a usable CA certificate: {e}", ca.display()),
                    )
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                tracing::warn!(
                    errors = ?native.errors,
                    "no system root certificate found: https:// upstreams need upstream_tls.ca_file"
                );
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FieldError::new("upstream_tls", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs("upstream_tls.cert_file", cert)?,
                read_key("upstream_tls.key_file", key)?,
            )
            .map_err(|e| {
                FieldError::new(
                    "upstream_tls.key_file",
                    format!("the key does not go with upstream_tls.cert_file: {e}"),
                )
            })?,
        // Both or neither: checked above.
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Parses `upstream_tls.server_name` (a DNS name or an IP address).
pub fn parse_server_name(name: &str) -> Result<ServerName<'static>, FieldError> {
    ServerName::try_from(name.to_owned()).map_err(|_| {
        FieldError::new(
            "upstream_tls.server_name",
            format!("`{name}` is not a DNS name or an IP address"),
        )
    })
}

/// TLS to `https://` upstreams; clones share the client config.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The client side of `tls` (see [`client_config`]).
    pub fn from_config(tls: Option<&UpstreamTlsConfig>) -> Result<Self, FieldError> {
        let server_name = tls
            .and_then(|t| t.server_name.as_deref())
            .map(parse_server_name)
            .transpose()?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config(tls)?)),
            server_name,
        })
    }

    /// Runs the client handshake on `tcp` for the upstream `host` (or the configured
    /// `server_name`). The caller bounds its duration.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_owned()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{host}` is not a TLS server name"),
                )
            })?,
        };
        self.connector.connect(name, tcp).await
    }
}
