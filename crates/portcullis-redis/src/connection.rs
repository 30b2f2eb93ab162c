//! [`RedisClient`]: the connection to Redis (a single node or a Cluster, plain or TLS) and
//! every call through it, each bounded by `storage.timeout` and with the password scrubbed
//! from its errors.

use crate::config::StorageConfig;
use crate::error::{scrub, StorageError};
use crate::scripts::ScriptReply;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ScriptInvocation, Value};
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// The longest wait of a single node's connection between two reconnection attempts.
pub(crate) const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// A connection to a single Redis node (reconnecting by itself) or to a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// One process's connection to Redis: commands and scripts on a shared (multiplexed)
/// connection, and the client that opens the pub/sub connection.
pub(crate) struct RedisClient {
    conn: Conn,
    pubsub: redis::Client,
    /// The password, scrubbed from every error message.
    secret: Option<String>,
    cluster: bool,
    timeout: Duration,
}

impl RedisClient {
    /// Connects to the Redis of `config` (already validated, `type: redis`).
    ///
    /// A single node is connected lazily (it may be down at start). Several URLs, or one URL
    /// of a cluster-enabled node, are a Cluster, which must answer within `4 × timeout`.
    pub(crate) async fn connect(config: &StorageConfig) -> Result<Self, StorageError> {
        let urls: Vec<String> = config
            .url
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|u| u.trim().to_owned())
            .collect();
        let redact =
            |e: redis::RedisError| StorageError::Config(crate::config::redact_url(&e.to_string()));
        let tls = tls_certificates(config)?;
        if urls.iter().any(|u| u.starts_with("rediss://")) {
            install_crypto_provider();
        }
        let first = match &tls {
            Some(certs) => redis::Client::build_with_tls(urls[0].as_str(), certs.clone()),
            None => redis::Client::open(urls[0].as_str()),
        }
        .map_err(redact)?;
        let secret = first
            .get_connection_info()
            .redis_settings()
            .password()
            .map(str::to_owned);
        let t = config.timeout;
        let cluster = urls.len() > 1 || is_cluster_node(&first, t).await;
        let conn = if cluster {
            let mut builder = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(t)
                .response_timeout(t)
                .retries(1);
            if let Some(certs) = tls {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(redact)?;
            let c = tokio::time::timeout(t * 4, client.get_async_connection())
                .await
                .map_err(|_| StorageError::Timeout(t * 4))?
                .map_err(|e| StorageError::Redis(scrub(e.to_string(), secret.as_deref())))?;
            Conn::Cluster(c)
        } else {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(RECONNECT_MAX_DELAY);
            Conn::Single(
                ConnectionManager::new_lazy_with_config(first.clone(), cfg).map_err(redact)?,
            )
        };
        Ok(Self {
            conn,
            pubsub: first,
            secret,
            cluster,
            timeout: t,
        })
    }

    /// `true` when connected to a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The client of the pub/sub connection (the first URL).
    pub(crate) fn pubsub_client(&self) -> &redis::Client {
        &self.pubsub
    }

    fn redacted(&self, e: impl fmt::Display) -> String {
        scrub(e.to_string(), self.secret.as_deref())
    }

    /// Runs one Redis call bounded by `storage.timeout`.
    pub(crate) async fn call<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StorageError::Redis(self.redacted(e))),
            Err(_) => Err(StorageError::Timeout(self.timeout)),
        }
    }

    /// Invokes a script (EVALSHA, re-loaded on NOSCRIPT by the redis crate) with a timeout.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, StorageError> {
        let mut conn = self.conn.clone();
        self.call(inv.invoke_async(&mut conn)).await
    }

    /// Runs a plain command with a timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StorageError> {
        let mut conn = self.conn.clone();
        self.call(cmd.query_async(&mut conn)).await
    }

    /// Runs one of the endpoint scripts, which all answer `{n, count, capacity}`.
    pub(crate) async fn run_script(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<ScriptReply, StorageError> {
        let (n, count, capacity): (i64, i64, i64) = self.invoke(inv).await?;
        Ok(ScriptReply::new(n, count, capacity))
    }
}

/// Whether the node of `client` is cluster-enabled; an unreachable node counts as a single
/// node (it is connected lazily and may come up later).
async fn is_cluster_node(client: &redis::Client, timeout: Duration) -> bool {
    let info = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut c)
            .await
    };
    matches!(
        tokio::time::timeout(timeout, info).await,
        Ok(Ok(info)) if info.contains("cluster_enabled:1")
    )
}

/// The `tls_*` files of `config` read for the redis crate, or `None` when none is set (the
/// system trust store, no client certificate).
fn tls_certificates(
    config: &StorageConfig,
) -> Result<Option<redis::TlsCertificates>, StorageError> {
    let read = |field: &str, path: &Option<std::path::PathBuf>| {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| {
                    StorageError::Config(format!(
                        "storage.{field}: cannot read `{}`: {e}",
                        p.display()
                    ))
                })
            })
            .transpose()
    };
    let root_cert = read("tls_ca_file", &config.tls_ca_file)?;
    let client_cert = read("tls_cert_file", &config.tls_cert_file)?;
    let client_key = read("tls_key_file", &config.tls_key_file)?;
    let client_tls = match (client_cert, client_key) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// The redis crate runs TLS on rustls without choosing its crypto provider; without one the
/// first `rediss://` connection panics. Installs *ring* as the process default unless the
/// application installed one already.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
