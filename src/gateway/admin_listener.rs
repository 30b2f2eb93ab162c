//! The admin listener (`admin: {listen: 127.0.0.1:9901}`): the operator routes (`/healthz`,
//! `/readyz`, `/metrics`, `/balancer/*`, the dashboard) on an address of their own, so the
//! data-plane port can proxy every path, those included, to the upstreams.
//!
//! It runs on the runtime that built the [`Gateway`](super::Gateway) (operator traffic is
//! light, and that runtime already runs the background tasks), with the same connection
//! limits as the data plane. Dropping the [`AdminListener`] stops it: it stops accepting,
//! and its open connections get [`ADMIN_DRAIN`] to finish.

use super::front::App;
use super::server::{serve_listener, ConnectionLimits};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

/// How long the admin listener's open connections get to finish once it is stopped.
pub const ADMIN_DRAIN: Duration = Duration::from_secs(1);

/// A running admin listener; dropping it stops it.
#[derive(Debug)]
pub struct AdminListener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<AbortOnDropHandle<()>>,
}

impl AdminListener {
    /// Binds `addr` and serves `app` on it (on the current runtime): a `Router`, or an
    /// [`App`] whose router a reload swaps.
    pub async fn start(
        addr: SocketAddr,
        app: impl Into<App>,
        limits: ConnectionLimits,
    ) -> io::Result<Self> {
        let app = app.into();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender stops the listener too.
            let _ = stopped.await;
        };
        let task = tokio::spawn(async move {
            if let Err(e) = serve_listener(listener, app, shutdown, ADMIN_DRAIN, limits).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task: Some(AbortOnDropHandle::new(task)),
        })
    }

    /// The bound address (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits (at most [`ADMIN_DRAIN`] and a little) for the open
    /// connections to finish.
    pub async fn stop(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(ADMIN_DRAIN * 2, task).await;
        }
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        // Ask for the graceful stop; the task handle, dropped right after, would abort a
        // listener still serving, so let it go on by itself for its bounded drain.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            if let Some(task) = self.task.take() {
                task.detach();
            }
        }
    }
}
