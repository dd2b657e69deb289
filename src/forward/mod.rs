//! The request path, in phases: check the request, identify the caller, pick the
//! route, take the credential from the provider's cell, edit the request, send it,
//! on a refresh-worthy 401 replay once, edit the response, record.
//! No lock, no store access, no log line per successful request.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::audit::RequestRecord;
use crate::caller::{allowed, Identity};
use crate::error::ProxyError;
use crate::gateway::{Gateway, Route, Snapshot};

mod broker;
mod replay;
mod send;

pub use replay::refresh_worthy;
use replay::{read_body, Kept};
use send::send;

use crate::body::GatewayBody;
use crate::headers::{
    self, strip_caller_credentials, strip_hop_by_hop, X_AUTHGATE_KEY, X_REQUEST_ID,
};
use crate::outbound::body::UpstreamBody;
use crate::server::deadline::Bounded;
use crate::server::ConnInfo;

/// Facts gathered along the way, for metrics and the audit line.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<usize>,
    caller: Option<Arc<str>>,
    generation: Option<u64>,
    upstream_status: Option<u16>,
    replayed: bool,
}

/// Serves one caller request. Never fails: errors become the contract's responses.
/// Takes its handles by value so that the listener can return this future as it is:
/// a wrapping `async` block would hold a second, moved-from copy of the request in
/// a future hyper moves on every request. For the same reason this is not an
/// `async fn`: one keeps each argument twice in its state (as passed, and moved
/// into a local), while an `async move` block keeps what it captures once
/// (`proxy` is written the same way; `future_size` below holds the bound).
#[allow(clippy::manual_async_fn)]
pub fn serve(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> impl Future<Output = Response<GatewayBody>> + Send {
    async move {
        let (gw, conn) = (&gw, &*conn);
        let started = Instant::now();
        let snap = gw.snapshot();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if headers::acceptable_request_id(v) => v.clone(),
            _ => headers::new_request_id(),
        };
        // Only what the audit line needs, and only when there is an audit log.
        let audit_info = gw
            .audit
            .as_ref()
            .map(|_| (req.method().clone(), req.uri().path().to_owned()));

        let mut out = Outcome::default();
        let result = proxy(gw, &snap, req, conn, &request_id, started, &mut out).await;
        let (mut resp, error) = match result {
            Ok(r) => (r, None),
            Err(e) => {
                let route = out.route.map(|i| &snap.routes[i]);
                log_error(&e, route, &request_id);
                let resp = e.to_response(
                    request_id.to_str().unwrap_or_default(),
                    route.map(|r| &*r.name),
                    route.and_then(|r| r.cfg.provider.as_deref()),
                );
                (resp, Some(e.code()))
            }
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());

        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        let route = out.route.map(|i| &snap.routes[i]);
        match route {
            Some(r) => &r.metrics,
            None => &snap.unrouted,
        }
        .observe(status, elapsed);
        if let (Some(audit), Some((method, path))) = (&gw.audit, audit_info) {
            audit.request(RequestRecord {
                ts: SystemTime::now(),
                request_id,
                caller: out.caller,
                client_addr: conn.remote,
                route: route.map(|r| r.name.clone()),
                provider: route.and_then(|r| r.provider.as_ref().map(|p| p.name.clone())),
                method,
                path,
                status,
                upstream_status: out.upstream_status,
                duration_ms: elapsed.as_millis() as u64,
                token_generation: out.generation,
                replayed: out.replayed,
                error,
            });
        }
        resp
    }
}

/// Errors are logged once, at a level matching whose fault they are.
fn log_error(e: &ProxyError, route: Option<&Route>, request_id: &HeaderValue) {
    let route = route.map_or("", |r| &r.name);
    let id = request_id.to_str().unwrap_or_default();
    match e {
        ProxyError::UpstreamUnreachable(cause) => {
            tracing::warn!(route, request_id = id, error = %crate::cause::chain(cause.as_ref()), "upstream unreachable")
        }
        ProxyError::UpstreamTimeout => {
            tracing::warn!(route, request_id = id, error = %e, "request failed")
        }
        // The refresh failure behind it is logged once by the provider; a line per
        // refused request would flood the log during an IdP outage.
        _ => tracing::debug!(route, request_id = id, error = %e, "request refused"),
    }
}

/// Not an `async fn`, for the reason given at `serve`: the request it takes would
/// be kept twice.
#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    gw: &'a Arc<Gateway>,
    snap: &'a Snapshot,
    req: Request<Incoming>,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
    started: Instant,
    out: &'a mut Outcome,
) -> impl Future<Output = Result<Response<GatewayBody>, ProxyError>> + Send + 'a {
    async move {
        // 1. The request itself: never an open proxy, never a path that climbs out.
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: authgate is not an open proxy",
            ));
        }
        if let Some(why) = ambiguous_framing(&req) {
            return Err(ProxyError::BadRequest(why));
        }
        if req.version() != Version::HTTP_2
            && req.uri().authority().is_some()
            && !is_self(req.uri(), conn)
        {
            return Err(ProxyError::BadRequest(
                "absolute-form request to another host: authgate is not an open proxy",
            ));
        }
        let path = req.uri().path();
        if !crate::route::path_is_safe(path) {
            return Err(ProxyError::BadRequest(
                "path has dot segments or encoded separators",
            ));
        }

        // 2. Who is calling.
        let who = snap.callers.identify(
            conn.remote.ip(),
            req.headers().get(&X_AUTHGATE_KEY),
            &conn.cert_names,
        );
        if let Identity::Named(name) = &who {
            out.caller = Some(name.clone());
        }

        if path.starts_with("/.authgate/") {
            return broker::serve(gw, snap, &req, &who, conn, request_id);
        }

        // 3. Which route.
        let (idx, rest) = snap.table.find(path).ok_or(ProxyError::NoRoute)?;
        out.route = Some(idx);
        let route = &snap.routes[idx];
        if who == Identity::Unknown {
            return Err(ProxyError::CallerUnknown);
        }
        if !allowed(&who, route.allow.as_deref()) {
            return Err(ProxyError::CallerForbidden(
                who.name().unwrap_or("anonymous").to_owned(),
            ));
        }
        let listen = &snap.config.listen;
        // Read once: the limit check and the body reader both need it.
        let declared = content_length(req.headers());
        if let (Some(max), Some(len)) = (listen.max_body, declared) {
            if len > max {
                return Err(ProxyError::BodyTooLarge);
            }
        }
        // The route's timeout counts from the request's arrival (and it saves a clock read).
        let deadline = started + route.cfg.timeout;
        let watched = conn.deadline.as_ref();
        // Cleared when this function returns: the response's body streams unbounded.
        let _armed = watched.map(|d| d.arm(deadline));

        // 4. The credential: from the cell, or wait for the first fetch (bounded).
        let credential = match &route.provider {
            Some(p) => Some(
                p.credential(started, route.cfg.timeout)
                    .await
                    .map_err(|u| ProxyError::TokenUnavailable {
                        reason: u.reason,
                        retry_after_secs: u.retry_after.as_secs(),
                    })?,
            ),
            None => None,
        };

        // 5. The upstream request.
        let uri = upstream_uri(route, rest, req.uri().query())?;
        // The caller's request becomes the upstream's, edited in place: its URI and
        // extensions end here rather than living on in this future's state.
        let (mut parts, incoming) = req.into_parts();
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.extensions.clear();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        strip_caller_credentials(headers);
        // Replaces the caller's `host` in place (see `strip_caller_credentials`).
        headers.insert(HOST, route.host_header.clone());
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if let (Some(p), Some(c)) = (&route.provider, &credential) {
            headers.insert(p.cfg.header.clone(), c.header_value.clone());
            out.generation = Some(c.generation);
        }
        let replay_possible =
            route.cfg.replay && route.provider.as_ref().is_some_and(|p| !p.is_static());
        let body = if incoming.is_end_stream() {
            // Nothing to read (most requests): no future to build and poll for it.
            UpstreamBody::buffered(Bytes::new())
        } else {
            // A body kept for replay is read before sending: a caller that trickles
            // it is bounded by the route's deadline like everything else.
            Bounded::new(
                read_body(
                    incoming,
                    declared,
                    listen.max_replay_body,
                    listen.max_body,
                    replay_possible,
                ),
                deadline,
                watched,
            )
            .await
            .map_err(|_| ProxyError::RequestTimeout)??
        };
        // A copy for the replay, only when one could happen.
        let kept = match (&body, replay_possible) {
            (UpstreamBody::Buffered { data }, true) => Some(Kept {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                data: data.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        let resp = {
            // Scoped: the request moves into the send future, and its own slot in
            // this future's state ends before the await.
            let first = Request::from_parts(parts, body);
            send(route, first, started, deadline, watched)
        }
        .await?;

        // 6. A 401 that a new token may fix.
        let resp = match (&route.provider, &credential) {
            (Some(provider), Some(sent))
                if resp.status() == StatusCode::UNAUTHORIZED && refresh_worthy(resp.headers()) =>
            {
                // Boxed: the replay path is rare, and inline its futures would size
                // every request's future.
                let replayed = Box::pin(replay::after_unauthorized(
                    route,
                    provider,
                    sent.generation,
                    kept,
                    resp,
                    (deadline, watched),
                ))
                .await?;
                if let Some(generation) = replayed.with {
                    out.replayed = true;
                    out.generation = Some(generation);
                }
                replayed.resp
            }
            (Some(provider), Some(_)) => {
                if resp.status().is_success() {
                    provider.token_accepted();
                }
                resp
            }
            _ => resp,
        };

        // 7. The response, streamed back.
        out.upstream_status = Some(resp.status().as_u16());
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, GatewayBody::upstream(incoming)))
    }
}

/// Shapes hyper accepts but that another HTTP implementation could frame or route
/// differently (request smuggling): refused rather than normalized.
fn ambiguous_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    let mut te = h.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some("transfer-encoding other than one \"chunked\"");
        }
        if h.contains_key(CONTENT_LENGTH) {
            return Some("both content-length and transfer-encoding");
        }
    }
    let mut hosts = h.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one host header");
    }
    if let (Some(auth), Some(host), false) = (
        req.uri().authority(),
        host,
        req.version() == Version::HTTP_2,
    ) {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(auth.as_str().as_bytes())
        {
            return Some("host header differs from the request target");
        }
    }
    None
}

/// An absolute-form request naming the gateway's own address is allowed (some
/// clients always send absolute-form); any other host is an open-proxy attempt.
fn is_self(uri: &Uri, conn: &ConnInfo) -> bool {
    let Some(auth) = uri.authority() else {
        return true;
    };
    let port = auth.port_u16().unwrap_or(80);
    if port != conn.local.port() {
        return false;
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == conn.local.ip())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Origin-form (`/path?query`): what HTTP/1 sends to the upstream itself; the pool
/// adds scheme and authority where the connection needs them.
fn upstream_uri(route: &Route, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let path = crate::route::join_path(&route.base_path, rest, query);
    PathAndQuery::from_maybe_shared(Bytes::from(path))
        .map(Uri::from)
        .map_err(|_| ProxyError::BadRequest("invalid path"))
}

/// hyper moves a request's whole future into place on every request (and each
/// wrapper moves it again), so its size is paid per request. These bounds catch
/// a change that balloons it.
#[cfg(test)]
mod future_size {
    use std::sync::Arc;

    use http::Request;
    use hyper::body::Incoming;

    use super::{ConnInfo, UpstreamBody};
    use crate::gateway::{Gateway, Route};

    /// The size of what `f` returns, without calling it.
    fn returned<A, B, R>(_: impl Fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn request_futures_stay_small() {
        let upstream = returned(|r: &'static Route, req: Request<UpstreamBody>| {
            r.upstream.send(req, tokio::time::Instant::now())
        });
        assert!(upstream <= 512, "Upstream::send future is {upstream} bytes");
        let whole = returned(|gw: Arc<Gateway>, x: (Request<Incoming>, Arc<ConnInfo>)| {
            super::serve(gw, x.0, x.1)
        });
        assert!(whole <= 2304, "request future is {whole} bytes");
    }
}
