//! A mock upstream API that records what reaches it and, when tied to a MockIdp,
//! accepts only currently valid tokens (401 `invalid_token` otherwise).
//!
//! Paths with meaning: `/big/<bytes>` streams that many bytes in 64 KiB chunks,
//! `/slow/<ms>` answers after a delay, `/status/<code>` answers that status,
//! `/bare/<code>` answers that status with no body and no content type,
//! `/redirect` answers 302 to another host. Anything else answers 200 with the
//! request echoed as JSON.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Request, Response, StatusCode};

use super::{full, serve, MockIdp, TestBody};

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Default)]
pub struct UpstreamState {
    pub seen: Mutex<Vec<Seen>>,
    pub count: AtomicU64,
    pub unauthorized: AtomicU64,
    /// Reject every token (an API that is misconfigured against us).
    pub reject_all: AtomicBool,
    /// `WWW-Authenticate` of the 401s sent.
    pub challenge: Mutex<Option<String>>,
}

#[derive(Debug, Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl MockUpstream {
    /// An upstream that checks nothing.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// An upstream that accepts only tokens `idp` currently considers valid.
    pub async fn with_idp(idp: &MockIdp) -> Self {
        Self::start_with(Some(idp.clone())).await
    }

    async fn start_with(idp: Option<MockIdp>) -> Self {
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        let addr = serve(move |req| {
            let st = st.clone();
            let idp = idp.clone();
            async move { handle(st, idp, req).await }
        })
        .await;
        MockUpstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::SeqCst)
    }

    pub fn unauthorized(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("upstream saw no request")
    }
}

async fn handle(
    st: Arc<UpstreamState>,
    idp: Option<MockIdp>,
    req: Request<hyper::body::Incoming>,
) -> Response<TestBody> {
    st.count.fetch_add(1, Ordering::SeqCst);
    let method = req.method().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req.headers().clone();
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    st.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        uri: uri.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });

    if let Some(idp) = &idp {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if st.reject_all.load(Ordering::SeqCst) || !idp.is_valid(token) {
            st.unauthorized.fetch_add(1, Ordering::SeqCst);
            let challenge = st.challenge.lock().unwrap().clone();
            let mut r = Response::new(full("unauthorized"));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r.headers_mut().insert(
                "www-authenticate",
                challenge
                    .unwrap_or_else(|| r#"Bearer error="invalid_token""#.into())
                    .parse()
                    .unwrap(),
            );
            return r;
        }
    }
    let mut segs = path.trim_start_matches('/').split('/').skip_while(|s| {
        *s != "big" && *s != "slow" && *s != "status" && *s != "bare" && *s != "redirect"
    });
    match (segs.next(), segs.next()) {
        (Some("big"), Some(n)) => {
            let total: usize = n.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(0usize, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = chunk.len().min(total - sent);
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..n))),
                        sent + n,
                    ))
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-length", total.to_string().parse().unwrap());
            r
        }
        (Some("slow"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            Response::new(full("slow done"))
        }
        (Some("status"), Some(code)) => {
            let mut r = Response::new(full(format!("status {code}")));
            *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            r
        }
        (Some("bare"), Some(code)) => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
            r
        }
        (Some("redirect"), _) => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::FOUND;
            r.headers_mut()
                .insert("location", "http://elsewhere.example/x".parse().unwrap());
            r
        }
        _ => {
            let echo = serde_json::json!({
                "method": method,
                "uri": uri,
                "authorization": headers.get("authorization").and_then(|v| v.to_str().ok()),
                "body_len": body.len(),
            });
            let mut r = Response::new(full(echo.to_string()));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r.headers_mut()
                .insert("connection", "keep-alive, x-hop".parse().unwrap());
            r.headers_mut()
                .insert("x-hop", "should-be-stripped".parse().unwrap());
            r
        }
    }
}
