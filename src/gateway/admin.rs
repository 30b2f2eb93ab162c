//! Runtime management of the upstream pool (`upstream_admin: true`):
//!
//! * `GET /balancer/upstreams`: the pool's snapshot (policy, healthy count, every replica);
//! * `POST /balancer/upstreams` with `{"url": "http://host:port", "primary": false}`: adds a
//!   replica (201; 409 `upstream_exists`; 400 `bad_request` for a bad body or URL);
//! * `DELETE /balancer/upstreams?url=http://host:port`: removes one (200; 404 `not_found`).
//!   Requests already sent to it finish normally; no new request picks it.
//!
//! Each route takes an optional `pool` (`?pool=gpu` on `GET` and `DELETE`, `"pool": "gpu"` in
//! the `POST` body; default `default`, the top-level `upstreams`): a pool the gateway does
//! not have answers 404 `unknown_pool` (as `POST /balancer/fallback/check?pool=`
//! does).
//!
//! New replicas start `unknown` and get no traffic (except in panic mode) until their first
//! good health check, from the checker's next cycle.
//! The routes are off by default (they change where traffic goes); when on, they sit behind
//! the same Basic auth as the other operator routes (`ui.username` / `ui.password`), and
//! the config is refused without those credentials.
//!
//! Every state-changing operator route (`POST`/`DELETE` here, `POST
//! /balancer/fallback/check`) also passes [`same_site_json`]: it needs `Content-Type:
//! application/json` (415 `unsupported_media_type`) and refuses a cross-site browser
//! request (403 `cross_site_request`), so a web page the operator visits cannot forge one (a
//! form or `text/plain` "simple request" carries no JSON content type, and a browser always
//! sends `Origin` / `Sec-Fetch-Site` on the rest).
//!
//! An added URL must pass [`validate_upstream_url`] (port 1..=65535, host at most 253
//! characters, no userinfo) and, when `upstream_admin_allow` is set, resolve only into its
//! CIDRs (403 `upstream_not_allowed`).

use super::config::DEFAULT_POOL;
use super::proxy::{Proxy, ProxyTo, Upstream};
use super::upstream_url::{validate_upstream_url, AdminAllowlist, AllowlistError};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::{header, HeaderMap, Method, StatusCode};
use portcullis_balance::{ReplicaRegistry, Tier};
use portcullis_core::{codes, Rejection};
use serde::Deserialize;
use std::sync::Arc;

/// The path of the upstream admin routes.
pub const UPSTREAMS_PATH: &str = "/balancer/upstreams";

/// `409`: `POST /balancer/upstreams` named a replica that is already in the pool.
pub const UPSTREAM_EXISTS: &str = "upstream_exists";

#[derive(Debug, Deserialize)]
struct RemoveUpstream {
    url: String,
    #[serde(default)]
    pool: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddUpstream {
    url: String,
    #[serde(default)]
    primary: bool,
    #[serde(default)]
    pool: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ListUpstreams {
    #[serde(default)]
    pool: Option<String>,
}

/// One pool the admin routes manage: its name, its registry, and how its replicas are
/// reached (`http2`).
#[derive(Debug, Clone)]
pub struct AdminPool {
    name: String,
    registry: ReplicaRegistry<ProxyTo>,
    http2: bool,
}

impl AdminPool {
    /// The pool `name` over `registry`; replicas added to it go over h2c when `http2`.
    pub fn new(name: &str, registry: ReplicaRegistry<ProxyTo>, http2: bool) -> Self {
        Self {
            name: name.to_owned(),
            registry,
            http2,
        }
    }
}

/// The pool named `name` (`None`: `default`), or the 404 `unknown_pool` refusal (boxed:
/// the refusal is the rare case).
fn find_pool<'a>(
    pools: &'a [AdminPool],
    name: Option<&str>,
) -> Result<&'a AdminPool, Box<Response>> {
    let name = name.unwrap_or(DEFAULT_POOL);
    pools
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Box::new(unknown_pool(name, pools.iter().map(|p| p.name.as_str()))))
}

/// The 404 `unknown_pool` refusal of an operator route's `pool` that names none of
/// `known`; the message lists them.
pub(super) fn unknown_pool<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Response {
    let known: Vec<&str> = known.collect();
    refuse(
        StatusCode::NOT_FOUND,
        codes::UNKNOWN_POOL,
        format!("no pool named `{name}` (pools: {})", known.join(", ")),
    )
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    Rejection::new(status, code, message.into())
        .to_json_response::<Body>()
        .into_response()
}

/// `true` when `headers` carry `Content-Type: application/json` (parameters such as
/// `; charset=utf-8` allowed, case-insensitive).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// `host[:port]` split into a lowercase host and its port (`default` when absent).
fn host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    let authority: http::uri::Authority = authority.parse().ok()?;
    let port = match authority.port() {
        Some(p) => p.as_u16(),
        None => default,
    };
    Some((authority.host().to_ascii_lowercase(), port))
}

/// Why a request is cross-site, or `None` when it is not: `Sec-Fetch-Site: cross-site`, an
/// `Origin` of `null`, or an `Origin` whose host:port differs from the request's `Host`
/// (the URI's authority for HTTP/2). No `Origin` is fine (curl, scripts, same-origin
/// `GET`-initiated navigations); browsers send it on every cross-origin `POST`/`DELETE`.
fn cross_site(req: &Request) -> Option<String> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        if site.as_bytes().eq_ignore_ascii_case(b"cross-site") {
            return Some("Sec-Fetch-Site: cross-site".into());
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("null");
    let Ok(uri) = origin.parse::<http::Uri>() else {
        return Some(format!("Origin `{origin}` is not a URL"));
    };
    let default = match uri.scheme_str() {
        Some("https") => 443,
        Some("http") => 80,
        _ => return Some(format!("Origin `{origin}` is not an http(s) origin")),
    };
    let Some(from) = uri.authority().and_then(|a| host_port(a.as_str(), default)) else {
        return Some(format!("Origin `{origin}` has no host"));
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    // A `Host` without a port takes the origin's default (a TLS terminator in front).
    match host.and_then(|h| host_port(h, default)) {
        Some(to) if to == from => None,
        Some((h, p)) => Some(format!("Origin `{origin}` is not this host ({h}:{p})")),
        None => Some(format!("Origin `{origin}` with no usable Host header")),
    }
}

/// Middleware of every state-changing operator route (mount it with `route_layer`, inside
/// the Basic auth): `GET`/`HEAD` pass; any other method needs `Content-Type:
/// application/json` (415 `unsupported_media_type`) and must not be cross-site (403
/// `cross_site_request`, see the [module docs](self)).
pub async fn same_site_json(req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    if let Some(why) = cross_site(&req) {
        return refuse(
            StatusCode::FORBIDDEN,
            codes::CROSS_SITE_REQUEST,
            format!("cross-site request refused ({why})"),
        );
    }
    if !is_json(req.headers()) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            "this operator route needs Content-Type: application/json",
        );
    }
    next.run(req).await
}

/// Checks an added URL: syntax (`Upstream::parse`), the limits of
/// [`validate_upstream_url`] (400 `bad_request`) and the allowlist (403
/// `upstream_not_allowed`; 400 when the host does not resolve).
async fn check_new_upstream(
    url: &str,
    allow: Option<&AdminAllowlist>,
) -> Result<Upstream, Response> {
    let upstream = Upstream::parse(url)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.0))?;
    validate_upstream_url(url)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.0))?;
    if let Some(allow) = allow {
        let uri: http::Uri = upstream
            .url()
            .parse()
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, "bad URL"))?;
        let host = uri.host().unwrap_or_default();
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        allow.check(host, port).await.map_err(|e| match e {
            AllowlistError::NotAllowed(m) => {
                refuse(StatusCode::FORBIDDEN, codes::UPSTREAM_NOT_ALLOWED, m)
            }
            AllowlistError::Unresolvable(m) => {
                refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, m)
            }
        })?;
    }
    Ok(upstream)
}

/// The admin routes over `registry` (the pool `default` alone); new replicas are proxied
/// with `proxy` and, with `allow`, must resolve into its CIDRs. The caller adds the Basic
/// auth; the routes carry [`same_site_json`] themselves.
pub fn routes(
    registry: ReplicaRegistry<ProxyTo>,
    proxy: Proxy,
    allow: Option<AdminAllowlist>,
) -> Router {
    let http2 = proxy.settings().http2;
    pool_routes(
        vec![AdminPool::new(DEFAULT_POOL, registry, http2)],
        proxy,
        allow,
    )
}

/// The admin routes over `pools` (the request's `pool` picks one, `default` when absent);
/// otherwise as [`routes`].
pub fn pool_routes(pools: Vec<AdminPool>, proxy: Proxy, allow: Option<AdminAllowlist>) -> Router {
    let pools: Arc<[AdminPool]> = pools.into();
    let (list, add, remove) = (Arc::clone(&pools), Arc::clone(&pools), pools);
    Router::new()
        .route(
            UPSTREAMS_PATH,
            get(
                move |query: Result<Query<ListUpstreams>, QueryRejection>| {
                    let pools = Arc::clone(&list);
                    async move {
                        let name = query.ok().and_then(|Query(q)| q.pool);
                        match find_pool(&pools, name.as_deref()) {
                            Ok(pool) => Json(pool.registry.snapshot()).into_response(),
                            Err(refused) => *refused,
                        }
                    }
                },
            )
            .post(move |body: Bytes| {
                let pools = Arc::clone(&add);
                let proxy = proxy.clone();
                let allow = allow.clone();
                async move {
                    let req: AddUpstream = match serde_json::from_slice(&body) {
                        Ok(r) => r,
                        Err(e) => {
                            return refuse(
                                StatusCode::BAD_REQUEST,
                                codes::BAD_REQUEST,
                                format!(
                            "expected {{\"url\": \"http://host:port\", \"primary\": false, \"pool\": \"default\"}}: {e}"
                        ),
                            )
                        }
                    };
                    let pool = match find_pool(&pools, req.pool.as_deref()) {
                        Ok(p) => p,
                        Err(refused) => return *refused,
                    };
                    let upstream = match check_new_upstream(&req.url, allow.as_ref()).await {
                        Ok(u) => u,
                        Err(refused) => return refused,
                    };
                    let key = upstream.url().to_owned();
                    let added = pool.registry.add_awaiting_check(
                        key.clone(),
                        Tier::from_primary(req.primary),
                        proxy.to_over(upstream, pool.http2),
                    );
                    if added {
                        tracing::info!(upstream = %key, primary = req.primary, pool = %pool.name, "upstream added");
                        let body = serde_json::json!({"added": key, "primary": req.primary, "pool": pool.name});
                        (StatusCode::CREATED, Json(body)).into_response()
                    } else {
                        refuse(
                            StatusCode::CONFLICT,
                            UPSTREAM_EXISTS,
                            format!("`{key}` is already in the pool `{}`", pool.name),
                        )
                    }
                }
            })
            .delete(
                move |query: Result<Query<RemoveUpstream>, QueryRejection>| {
                    let pools = Arc::clone(&remove);
                    async move {
                        let Ok(Query(RemoveUpstream { url, pool })) = query else {
                            return refuse(
                                StatusCode::BAD_REQUEST,
                                codes::BAD_REQUEST,
                                "expected ?url=http://host:port (and &pool=name)",
                            );
                        };
                        let pool = match find_pool(&pools, pool.as_deref()) {
                            Ok(p) => p,
                            Err(refused) => return *refused,
                        };
                        let key = Upstream::parse(&url)
                            .map(|u| u.url().to_owned())
                            .unwrap_or(url);
                        if pool.registry.remove(&key) {
                            tracing::info!(upstream = %key, pool = %pool.name, "upstream removed");
                            Json(serde_json::json!({"removed": key, "pool": pool.name}))
                                .into_response()
                        } else {
                            refuse(
                                StatusCode::NOT_FOUND,
                                codes::NOT_FOUND,
                                format!("`{key}` is not in the pool `{}`", pool.name),
                            )
                        }
                    }
                },
            ),
        )
        .route_layer(axum::middleware::from_fn(same_site_json))
}
