//! The replay after a 401 (DESIGN.md, "Token lifecycle"): which 401s are worth a
//! refresh, the body kept so the request can be sent again, and the one replay with
//! the new credential. Rare by design: a request only comes here on a 401.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::send::{build_request, send};
use crate::error::ProxyError;
use crate::gateway::Route;
use crate::metrics::ReplayOutcome;
use crate::outbound::body::UpstreamBody;
use crate::outbound::pool::ResponseBody;
use crate::server::deadline::ConnDeadline;
use crate::token::{Credential, Provider};

/// A request kept for one replay: its head and its whole (small) body.
#[derive(Debug)]
pub(super) struct Kept {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
    pub(super) data: Bytes,
}

/// The answer after a 401: the replay's, or the 401 itself.
pub(super) struct Replayed {
    pub(super) resp: Response<ResponseBody>,
    /// The generation the request was replayed with, if it was.
    pub(super) with: Option<u64>,
}

/// After a refresh-worthy 401 to a request that sent generation `sent`: asks the
/// provider for a newer credential (joining or starting one refresh) and replays
/// the kept request once with it; without a kept request (body streamed, or
/// `replay = false`) the 401 goes back, but the refresh still happens for the
/// requests after it. `until`: the route's deadline and the connection's watch.
pub(super) async fn after_unauthorized(
    route: &Route,
    provider: &Arc<Provider>,
    sent: u64,
    kept: Option<Kept>,
    resp: Response<ResponseBody>,
    until: (Instant, Option<&ConnDeadline>),
) -> Result<Replayed, ProxyError> {
    let (deadline, watched) = until;
    let Some(kept) = kept else {
        route.metrics.replay(ReplayOutcome::Skipped);
        let provider = provider.clone();
        let wait = route.cfg.timeout;
        tokio::spawn(async move { provider.after_unauthorized(sent, wait).await });
        return Ok(Replayed { resp, with: None });
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let Some(fresh) = provider.after_unauthorized(sent, remaining).await else {
        route.metrics.replay(ReplayOutcome::Skipped);
        return Ok(Replayed { resp, with: None });
    };
    // Its connection goes back to the pool only if the 401's body was already
    // over; else it closes.
    drop(resp);
    let replay = with_credential(kept, &provider.cfg.header, &fresh);
    let resp = send(route, replay, Instant::now(), deadline, watched).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        provider.replay_rejected(fresh.generation);
        route.metrics.replay(ReplayOutcome::Unauthorized);
    } else {
        route.metrics.replay(ReplayOutcome::Ok);
    }
    Ok(Replayed {
        resp,
        with: Some(fresh.generation),
    })
}

fn with_credential(
    kept: Kept,
    header: &http::HeaderName,
    cred: &Credential,
) -> Request<UpstreamBody> {
    let Kept {
        method,
        uri,
        mut headers,
        data,
    } = kept;
    headers.insert(header.clone(), cred.header_value.clone());
    build_request(method, uri, headers, UpstreamBody::buffered(data))
}

/// Keeps the body whole when a replay may need it and it fits `max_replay`;
/// otherwise streams it (a prefix already read, then the rest).
pub(super) async fn read_body(
    mut incoming: Incoming,
    declared: Option<u64>,
    max_replay: u64,
    max_body: Option<u64>,
    replay_possible: bool,
) -> Result<UpstreamBody, ProxyError> {
    if !replay_possible || declared.is_some_and(|n| n > max_replay) {
        return Ok(UpstreamBody::streaming(
            VecDeque::new(),
            incoming,
            0,
            max_body,
        ));
    }
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut seen = 0u64;
    loop {
        match incoming.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    seen += data.len() as u64;
                    if max_body.is_some_and(|m| seen > m) {
                        return Err(ProxyError::BodyTooLarge);
                    }
                    chunks.push_back(data);
                    if seen > max_replay {
                        // Outgrew the replay buffer midway: send what we have, then the rest.
                        return Ok(UpstreamBody::streaming(chunks, incoming, seen, max_body));
                    }
                }
            }
            Some(Err(_)) => return Err(ProxyError::BadRequest("request body could not be read")),
        }
    }
    let data = if chunks.len() == 1 {
        chunks.pop_front().unwrap_or_default()
    } else {
        let mut buf = bytes::BytesMut::with_capacity(seen as usize);
        for c in chunks {
            buf.extend_from_slice(&c);
        }
        buf.freeze()
    };
    Ok(UpstreamBody::buffered(data))
}

/// RFC 6750 §3.1: refresh on `invalid_token`, or when the 401 names no error at
/// all; other errors (`invalid_request`, `insufficient_scope`) are not about the
/// token's freshness.
pub fn refresh_worthy(h: &HeaderMap) -> bool {
    let mut saw_error = false;
    for v in h.get_all(WWW_AUTHENTICATE) {
        let Ok(s) = v.to_str() else { continue };
        let lower = s.to_ascii_lowercase();
        if let Some(pos) = lower.find("error=") {
            saw_error = true;
            let rest = lower[pos + 6..].trim_start_matches('"');
            if rest.starts_with("invalid_token") {
                return true;
            }
        }
    }
    !saw_error
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(WWW_AUTHENTICATE, v.parse().unwrap());
        m
    }

    #[test]
    fn which_401s_are_worth_a_refresh() {
        assert!(refresh_worthy(&HeaderMap::new()));
        assert!(refresh_worthy(&h(
            r#"Bearer realm="x", error="invalid_token", error_description="expired""#
        )));
        assert!(refresh_worthy(&h(r#"Bearer error=invalid_token"#)));
        assert!(refresh_worthy(&h(r#"Bearer realm="api""#)));
        assert!(!refresh_worthy(&h(r#"Bearer error="invalid_request""#)));
        assert!(!refresh_worthy(&h(r#"Bearer error="insufficient_scope""#)));
    }
}
