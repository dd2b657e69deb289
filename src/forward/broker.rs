//! The broker API (DESIGN.md, "Broker API"): `GET /.authgate/token/{provider}`
//! hands the current token to callers named in the provider's `expose_to`, for
//! services that cannot route through the gateway. Served from the same cell as
//! the request path: a burst of calls is a burst of cell reads, never of refreshes.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::audit::HandOutEvent;
use crate::body::GatewayBody;
use crate::caller::Identity;
use crate::error::ProxyError;
use crate::gateway::{Gateway, Snapshot};
use crate::server::ConnInfo;

pub(super) fn serve(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    req: &Request<Incoming>,
    who: &Identity,
    conn: &ConnInfo,
    request_id: &HeaderValue,
) -> Result<Response<GatewayBody>, ProxyError> {
    let name = req
        .uri()
        .path()
        .strip_prefix("/.authgate/token/")
        .filter(|n| !n.is_empty() && !n.contains('/'));
    let (Some(name), true) = (name, req.method() == Method::GET) else {
        return Err(ProxyError::NoRoute);
    };
    let provider = snap.providers.get(name);
    let exposed = match (provider, who.name()) {
        (Some(p), Some(caller)) => p.cfg.expose_to.iter().any(|c| c == caller),
        _ => false,
    };
    let audit = |status: u16, generation: Option<u64>| {
        if let Some(a) = &gw.audit {
            a.hand_out(HandOutEvent {
                ts: SystemTime::now(),
                event: "token_handout",
                request_id: request_id.to_str().unwrap_or_default().to_owned(),
                caller: who.name().map(str::to_owned),
                client_addr: conn.remote.to_string(),
                provider: Arc::from(name),
                status,
                token_generation: generation,
            });
        }
    };
    // An unknown provider and a hidden one look the same to the caller.
    let Some(provider) = provider.filter(|_| exposed) else {
        audit(403, None);
        return Err(ProxyError::CallerForbidden(
            who.name().unwrap_or("anonymous").to_owned(),
        ));
    };
    let now = Instant::now();
    let Some(token) = provider.current().filter(|t| t.is_valid(now)) else {
        audit(503, None);
        return Err(ProxyError::TokenUnavailable {
            reason: "no valid token".into(),
            retry_after_secs: 1,
        });
    };
    let mut body = serde_json::json!({
        "access_token": token.access_token.expose(),
        "token_type": "Bearer",
    });
    if let Some(left) = token.expires_in(now) {
        body["expires_in"] = left.as_secs().into();
    }
    audit(200, Some(token.generation));
    let mut resp = Response::new(GatewayBody::full(Bytes::from(body.to_string())));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
