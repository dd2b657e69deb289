//! The admin listener (DESIGN.md, "Admin listener" and "Operator console"):
//! `/healthz`, `/readyz`, `/status`, `/metrics`, the console page (`/`) and its
//! events (`/events`), and the console's actions: a forced refresh and the
//! reauthorization flow. Never a secret in any answer.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};

use crate::body::GatewayBody;
use crate::gateway::Gateway;
use crate::server::ConnInfo;

mod actions;
mod console;
mod guard;
mod pending;
mod reauth;
mod reply;
mod state;

pub use state::{AdminKeyError, Console};

use reply::json;

pub async fn serve<B>(
    gw: &Arc<Gateway>,
    console: &Console,
    conn: &ConnInfo,
    req: Request<B>,
) -> Response<GatewayBody> {
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/providers/") {
        // The page writes provider names percent-encoded, as one path segment.
        let decode = |name: &str| {
            percent_encoding::percent_decode_str(name)
                .decode_utf8_lossy()
                .into_owned()
        };
        return match rest.split_once('/') {
            Some((name, "refresh")) if req.method() == Method::POST => {
                actions::refresh(gw, console, conn, &req, &decode(name)).await
            }
            Some((name, "authorize")) if req.method() == Method::GET => {
                reauth::authorize(gw, console, conn, &req, &decode(name))
            }
            Some((_, "refresh" | "authorize")) => method_not_allowed(),
            _ => not_found(),
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    // The fixed paths first: a `redirect_uri` naming one of them must not take it.
    match path {
        "/" => console::page(gw, console),
        "/events" => json(
            StatusCode::OK,
            serde_json::to_value(gw.events.oldest_first()).unwrap_or_default(),
        ),
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => readyz(gw),
        "/status" => status(gw),
        "/metrics" => {
            // Seconds to expiry change continuously: computed at scrape time.
            for p in gw.snapshot().providers.values() {
                p.export_expiry();
            }
            let mut resp = Response::new(GatewayBody::full(Bytes::from(gw.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        _ if reauth::is_callback_path(gw, path) => reauth::callback(gw, console, &req).await,
        _ => not_found(),
    }
}

fn not_found() -> Response<GatewayBody> {
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": "not_found"}),
    )
}

fn method_not_allowed() -> Response<GatewayBody> {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        serde_json::json!({"error": "method_not_allowed"}),
    )
}

pub(crate) fn store_state(gw: &Gateway) -> &'static str {
    if gw.store.is_failing() {
        "failing"
    } else {
        "ok"
    }
}

/// 200 when every provider holds a valid token. A failing store shows in the body
/// but does not fail readiness: durability is degraded, serving is not.
fn readyz(gw: &Gateway) -> Response<GatewayBody> {
    let snap = gw.snapshot();
    let not_ready: Vec<serde_json::Value> = snap
        .providers
        .values()
        .filter_map(|p| {
            p.not_ready_reason()
                .map(|r| serde_json::json!({"provider": &*p.name, "reason": r}))
        })
        .collect();
    let store = store_state(gw);
    if not_ready.is_empty() {
        json(
            StatusCode::OK,
            serde_json::json!({"status": "ready", "store": store}),
        )
    } else {
        let first = not_ready
            .first()
            .and_then(|v| v["provider"].as_str())
            .unwrap_or_default()
            .to_owned();
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "not_ready",
                "reason": format!("provider {first} has no valid token"),
                "provider": first,
                "providers": not_ready,
                "store": store,
            }),
        )
    }
}

fn status(gw: &Gateway) -> Response<GatewayBody> {
    let snap = gw.snapshot();
    let (proxy, proxy_source) = crate::outbound::egress::describe(&snap.config.outbound);
    let providers: serde_json::Map<String, serde_json::Value> = snap
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                serde_json::to_value(p.status()).unwrap_or_default(),
            )
        })
        .collect();
    let routes: Vec<serde_json::Value> = snap
        .routes
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": &*r.name,
                "prefix": r.cfg.prefix,
                "upstream": r.cfg.upstream.to_string(),
                "provider": r.cfg.provider,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({
            "providers": providers,
            "routes": routes,
            "store": {"kind": gw.store.store.kind(), "state": store_state(gw)},
            "proxy_auth": {
                "mode": snap.config.outbound.proxy_auth.as_str(),
                "failures": gw.metrics.proxy_auth_failures().get(),
            },
            "egress": {"proxy": proxy, "source": proxy_source},
        }),
    )
}
