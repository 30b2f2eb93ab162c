//! The reusable parts of the example gateway: its config, the reverse proxy, and the
//! assembly of the layers into one axum router.
//!
//! The `gateway` example (`examples/gateway/`) is a thin command-line front end over this
//! module; copy either as the template of your own gateway.

pub mod access_log;
pub mod admin;
pub mod admin_listener;
pub mod app;
pub mod bodies;
pub mod config;
pub mod front;
mod grpc_outcome;
pub mod pool;
pub mod proxy;
pub mod reload;
mod replay_buffer;
pub mod routes;
pub mod server;
mod stack;
pub mod startup;
pub mod stats;
pub mod tls;
pub mod upstream_probe;
pub mod upstream_url;

pub use app::{BuildError, Gateway, GatewayService};
pub use config::{ConfigError, GatewayConfig};
pub use front::App;
pub use proxy::{Proxy, ProxyBody, ProxySettings, ProxyTo, Upstream};
pub use server::{bind_reuseport, serve, serve_sharded, serve_sharded_watched};
