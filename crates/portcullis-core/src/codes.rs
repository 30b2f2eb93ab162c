//! The stable `error` codes of every rejection Portcullis renders.
//!
//! These strings are part of the public contract: clients and dashboards match on them.

/// 504: the request waited in the admission queue longer than `queue_timeout`.
pub const QUEUE_TIMEOUT: &str = "queue_timeout";
/// 503: the admission queue is at `max_queue`.
pub const QUEUE_FULL: &str = "queue_full";
/// 503: the health source says nothing can serve this request.
pub const BACKEND_UNHEALTHY: &str = "backend_unhealthy";
/// 503: no replica of the pool is healthy.
pub const NO_HEALTHY_UPSTREAM: &str = "no_healthy_upstream";
/// 502/503: the circuit breaker routed to the fallback and the fallback failed too.
pub const FALLBACK_UNAVAILABLE: &str = "fallback_unavailable";
/// 503: the shared (Redis) storage is unreachable and `storage.on_error` is `reject`.
pub const STORAGE_UNAVAILABLE: &str = "storage_unavailable";
/// 502: the upstream could not be reached or broke the connection.
pub const BAD_GATEWAY: &str = "bad_gateway";
/// 504: the upstream did not answer within `upstream_timeout`.
pub const UPSTREAM_TIMEOUT: &str = "upstream_timeout";
/// 503: the gateway is starting up (startup probing not finished) or shutting down.
pub const NOT_READY: &str = "not_ready";
/// 401: the route requires HTTP Basic credentials.
pub const UNAUTHORIZED: &str = "unauthorized";
/// 404: no route.
pub const NOT_FOUND: &str = "not_found";
/// 400: the request itself is malformed.
pub const BAD_REQUEST: &str = "bad_request";
/// 500: an internal error (a panic caught in a handler, a bug).
pub const INTERNAL: &str = "internal";
/// 405: the method is not supported by the proxy (`CONNECT`: no tunnels).
pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
/// 499 (nginx's "client closed request"): the client went away before its request was
/// complete. Nobody reads the response; the code is counted in the stats.
pub const CLIENT_CLOSED: &str = "client_closed";
/// 408: the client sent nothing for `client_body_timeout` while its request body was
/// incomplete (or did not finish its request head within `client_header_timeout`).
pub const CLIENT_TIMEOUT: &str = "client_timeout";
/// 415: a state-changing operator route (upstream admin, fallback check) was sent without
/// `Content-Type: application/json`.
pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
/// 403: a state-changing operator route was called cross-site (an `Origin` other than the
/// request's `Host`, or `Sec-Fetch-Site: cross-site`): a browser page's forged request.
pub const CROSS_SITE_REQUEST: &str = "cross_site_request";
/// 403: `POST /balancer/upstreams` named a host that resolves outside
/// `upstream_admin_allow`.
pub const UPSTREAM_NOT_ALLOWED: &str = "upstream_not_allowed";
/// 504: the request's own deadline (`grpc-timeout`, or `x-request-timeout` where honoured)
/// passed while it waited in the admission queue.
pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
/// 400: `POST /balancer/reload` read a config that is invalid; the message names the field,
/// as `--check` does, and the old config keeps running.
pub const INVALID_CONFIG: &str = "invalid_config";
/// 409: `POST /balancer/reload` on a gateway that was not started from a config file (built
/// in code), so there is nothing to re-read.
pub const RELOAD_UNAVAILABLE: &str = "reload_unavailable";
/// 500: a valid config could not be applied by a reload (the old one keeps running).
pub const RELOAD_FAILED: &str = "reload_failed";
/// `404`: an operator route named an upstream pool the gateway does not have
/// (`POST`/`DELETE /balancer/upstreams` with `pool`).
pub const UNKNOWN_POOL: &str = "unknown_pool";
