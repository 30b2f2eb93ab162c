//! Runtime management of the upstream pool (`upstream_admin: true`):
//!
//! * `GET /balancer/upstreams`: the pool's snapshot (policy, healthy count, every replica);
//! * `POST /balancer/upstreams` with `{"url": "http://host:port", "primary": false}`: adds a
//!   replica (201; 409 `upstream_exists`; 400 `bad_request` for a bad body or URL);
//! * `DELETE /balancer/upstreams?url=http://host:port`: removes one (200; 404 `not_found`).
//!   Requests already sent to it finish normally; no new request picks it.
//!
//! New replicas start healthy and are probed by the health checker from its next cycle.
//! The routes are off by default (they change where traffic goes); when on, they sit behind
//! the same Basic auth as the other operator routes (`ui.username` / `ui.password`).

use super::proxy::{Proxy, ProxyTo, Upstream};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use portcullis_balance::{ReplicaRegistry, Tier};
use portcullis_core::{codes, Rejection};
use serde::Deserialize;

/// The path of the upstream admin routes.
pub const UPSTREAMS_PATH: &str = "/balancer/upstreams";

/// `409`: `POST /balancer/upstreams` named a replica that is already in the pool.
pub const UPSTREAM_EXISTS: &str = "upstream_exists";

#[derive(Debug, Deserialize)]
struct RemoveUpstream {
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddUpstream {
    url: String,
    #[serde(default)]
    primary: bool,
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    Rejection::new(status, code, message.into())
        .to_json_response::<Body>()
        .into_response()
}

/// The admin routes over `registry`; new replicas are proxied with `proxy`.
pub fn routes(registry: ReplicaRegistry<ProxyTo>, proxy: Proxy) -> Router {
    let list = registry.clone();
    let add = registry.clone();
    let remove = registry;
    Router::new().route(
        UPSTREAMS_PATH,
        get(move || {
            let snapshot = list.snapshot();
            async move { Json(snapshot).into_response() }
        })
        .post(move |body: Bytes| {
            let registry = add.clone();
            let proxy = proxy.clone();
            async move {
                let req: AddUpstream = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        return refuse(
                            StatusCode::BAD_REQUEST,
                            codes::BAD_REQUEST,
                            format!(
                            "expected {{\"url\": \"http://host:port\", \"primary\": false}}: {e}"
                        ),
                        )
                    }
                };
                let upstream = match Upstream::parse(&req.url) {
                    Ok(u) => u,
                    Err(e) => return refuse(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, e.0),
                };
                let key = upstream.url().to_owned();
                let added = registry.add(
                    key.clone(),
                    Tier::from_primary(req.primary),
                    proxy.to(upstream),
                );
                if added {
                    tracing::info!(upstream = %key, primary = req.primary, "upstream added");
                    let body = serde_json::json!({"added": key, "primary": req.primary});
                    (StatusCode::CREATED, Json(body)).into_response()
                } else {
                    refuse(
                        StatusCode::CONFLICT,
                        UPSTREAM_EXISTS,
                        format!("`{key}` is already in the pool"),
                    )
                }
            }
        })
        .delete(
            move |query: Result<Query<RemoveUpstream>, QueryRejection>| {
                let registry = remove.clone();
                async move {
                    let Ok(Query(RemoveUpstream { url })) = query else {
                        return refuse(
                            StatusCode::BAD_REQUEST,
                            codes::BAD_REQUEST,
                            "expected ?url=http://host:port",
                        );
                    };
                    let key = Upstream::parse(&url)
                        .map(|u| u.url().to_owned())
                        .unwrap_or(url);
                    if registry.remove(&key) {
                        tracing::info!(upstream = %key, "upstream removed");
                        Json(serde_json::json!({"removed": key})).into_response()
                    } else {
                        refuse(
                            StatusCode::NOT_FOUND,
                            codes::NOT_FOUND,
                            format!("`{key}` is not in the pool"),
                        )
                    }
                }
            },
        ),
    )
}
