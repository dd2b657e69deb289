//! The console's forced refresh, and what every action shares: the guard's
//! facts taken from the request, and its refusals as responses.

use std::time::Duration;

use http::header::{
    HeaderName, AUTHORIZATION, CACHE_CONTROL, HOST, LOCATION, ORIGIN, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};

use super::guard::{guard, Asker, Refusal};
use super::reply::json;
use super::state::Console;
use crate::body::GatewayBody;
use crate::gateway::Gateway;
use crate::server::ConnInfo;
use crate::token::Trigger;

/// How long a forced refresh is waited for before the answer goes back.
const REFRESH_WAIT: Duration = Duration::from_secs(30);

/// Runs the guard on `req`: the refusal as a response, `None` when allowed.
pub(super) fn refusal<B>(
    console: &Console,
    conn: &ConnInfo,
    req: &Request<B>,
) -> Option<Response<GatewayBody>> {
    let header = |name: HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header(HOST).or_else(|| req.uri().authority().map(|a| a.as_str()));
    let asker = Asker {
        remote: conn.remote.ip(),
        host,
        origin: header(ORIGIN),
        authorization: header(AUTHORIZATION),
        post: req.method() == Method::POST,
    };
    let refused = guard(console.key.as_ref(), &asker).err()?;
    Some(match refused {
        Refusal::Unauthorized => {
            let mut resp = json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "unauthorized", "message": "admin key required (HTTP Basic, user admin)"}),
            );
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"authgate admin\", charset=\"UTF-8\""),
            );
            resp
        }
        Refusal::Forbidden(why) => json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "forbidden", "message": why}),
        ),
    })
}

/// `POST /providers/{name}/refresh`: one refresh with trigger `manual` (joining
/// one already in flight), then back to the console (303) with its outcome in
/// the body for scripts.
pub(super) async fn refresh<B>(
    gw: &Gateway,
    console: &Console,
    conn: &ConnInfo,
    req: &Request<B>,
    name: &str,
) -> Response<GatewayBody> {
    if let Some(refused) = refusal(console, conn, req) {
        return refused;
    }
    let Some(provider) = gw.snapshot().providers.get(name).cloned() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "unknown_provider"}),
        );
    };
    if provider.is_static() {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"error": "not_refreshable", "message": "a static credential has nothing to refresh"}),
        );
    }
    tracing::info!(provider = %provider.name, client = %conn.remote, "refresh forced from the admin console");
    let body = match provider.refresh_now(Trigger::Manual, REFRESH_WAIT).await {
        Ok(t) => serde_json::json!({"provider": name, "outcome": "ok", "generation": t.generation}),
        Err(e) => serde_json::json!({"provider": name, "outcome": "error", "error": e.code()}),
    };
    let mut resp = json(StatusCode::SEE_OTHER, body);
    resp.headers_mut()
        .insert(LOCATION, HeaderValue::from_static("/"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
