//! The sections that say how the gateway is operated rather than what it balances: the
//! admin listener (`admin`), TLS on the listener (`tls`) and to the upstreams
//! (`upstream_tls`), and the access log (`access_log`). Each validates itself and names
//! its fields from the top (`admin.listen`, `tls.cert_file`, ...).

use portcullis_core::ConfigError as FieldError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `admin:`: a listener of its own for the operator routes.
///
/// With `listen` set, `/healthz`, `/readyz`, `/metrics`, `/balancer/*` and the dashboard
/// are served there only, and the data-plane port proxies every path to the upstreams.
/// Without it they stay on the data-plane port, as before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin listener's address (`127.0.0.1:9901`); absent = no admin listener.
    pub listen: Option<String>,
}

impl AdminConfig {
    /// The admin listener's address, when one is configured (validated in `validate`).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.as_deref().and_then(|l| l.parse().ok())
    }

    /// Checks `listen`. `state_changing` names the state-changing operator routes the
    /// config serves (the fallback check, the upstream admin routes); they may sit on a
    /// non-loopback admin listener only behind credentials.
    pub(crate) fn validate(
        &self,
        data_listen: &str,
        state_changing: &[&str],
        has_credentials: bool,
    ) -> Result<(), FieldError> {
        let Some(text) = &self.listen else {
            return Ok(());
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            FieldError::new(
                "admin.listen",
                format!("`{text}` is not an address like 127.0.0.1:9901"),
            )
        })?;
        if addr.port() != 0 && data_listen.parse::<SocketAddr>().ok() == Some(addr) {
            return Err(FieldError::new(
                "admin.listen",
                format!("`{text}` is also `listen`: the admin listener needs its own address"),
            ));
        }
        if !addr.ip().is_loopback() && !has_credentials && !state_changing.is_empty() {
            return Err(FieldError::new(
                "admin.listen",
                format!(
                    "`{text}` is not a loopback address and the state-changing operator routes ({}) would be open to anyone who reaches it: set ui.username and ui.password, or bind the admin listener to 127.0.0.1",
                    state_changing.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// `tls:`: TLS termination on the listener (see [`super::super::tls`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The PEM certificate chain served to clients (leaf first).
    pub cert_file: PathBuf,
    /// The PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// Time a client has to finish the TLS handshake (default 10 s); the connection is
    /// closed and counted in `tls_handshakes_failed` after it.
    #[serde(
        with = "portcullis_core::seconds",
        default = "default_handshake_timeout"
    )]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

impl TlsConfig {
    /// Checks the timeout and that the files hold a certificate and its key (each error
    /// names `tls.cert_file` or `tls.key_file`).
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        FieldError::require_positive("tls.handshake_timeout", self.handshake_timeout)?;
        super::super::tls::server_config(self).map(drop)
    }
}

/// `upstream_tls:`: how `https://` upstreams are reached (see [`super::super::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// A PEM file of the CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate chain presented to the upstreams (mutual TLS); needs
    /// `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name sent in SNI and checked against the upstream's certificate, instead of
    /// the URL's host.
    pub server_name: Option<String>,
}

impl UpstreamTlsConfig {
    /// Checks that the files load and `server_name` is a name (each error names its field).
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        super::super::tls::UpstreamTls::from_config(Some(self)).map(drop)
    }
}

/// The format of the access log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line (the default).
    #[default]
    Json,
    /// The combined log format of Apache and nginx, then `key=value` fields for the rest.
    Combined,
}

/// `access_log:`: one line per request (see [`super::super::access_log`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write the access log (default `false`).
    pub enable: bool,
    /// `json` (default) or `combined`.
    pub format: AccessLogFormat,
    /// `stderr` (default), `stdout`, or a file appended to.
    pub path: String,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enable: false,
            format: AccessLogFormat::Json,
            path: "stderr".into(),
        }
    }
}

impl AccessLogConfig {
    /// Checks `path`: `stderr`, `stdout`, or a file whose directory exists.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if matches!(self.path.as_str(), "stderr" | "stdout") {
            return Ok(());
        }
        let path = std::path::Path::new(&self.path);
        if self.path.is_empty() || path.is_dir() {
            return Err(FieldError::new(
                "access_log.path",
                format!("`{}` is not a file path (or stderr, stdout)", self.path),
            ));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(FieldError::new(
                "access_log.path",
                format!("the directory {} does not exist", dir.display()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_listen_is_an_address_of_its_own_and_guarded_off_loopback() {
        let admin = |l: &str| AdminConfig {
            listen: Some(l.into()),
        };
        let data = "127.0.0.1:8080";
        assert!(AdminConfig::default().validate(data, &["x"], false).is_ok());
        assert!(admin("127.0.0.1:9901")
            .validate(data, &["x"], false)
            .is_ok());
        assert!(admin("[::1]:9901").validate(data, &["x"], false).is_ok());
        assert!(admin("0.0.0.0:9901").validate(data, &[], false).is_ok());
        assert!(admin("0.0.0.0:9901").validate(data, &["x"], true).is_ok());
        for (cfg, changing) in [
            (admin("nope"), &[][..]),
            (admin("127.0.0.1:8080"), &[][..]),
            (
                admin("0.0.0.0:9901"),
                &["POST /balancer/fallback/check"][..],
            ),
        ] {
            let e = cfg.validate(data, changing, false).unwrap_err();
            assert_eq!(e.field, "admin.listen", "{cfg:?}: {e}");
        }
        assert_eq!(
            admin("127.0.0.1:9901").listen_addr(),
            Some("127.0.0.1:9901".parse().unwrap())
        );
    }
}
