//! A mock OAuth token endpoint that counts requests and can expire, revoke,
//! delay, fail and rotate. Tokens are `tok-<n>`; the upstream asks `is_valid`.
//! `/authorize` is an authorization endpoint that consents at once: it sends the
//! browser back with a code (or the error set by `refuse_authorization`), and the
//! token endpoint redeems that code once, only with the PKCE verifier whose S256
//! challenge came with it (RFC 7636 §4.6).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};

use super::{full, serve, TestBody};

#[derive(Debug, Clone)]
pub enum Failure {
    /// Answer with this status and body.
    Status(u16, String),
    /// Close the connection without answering... approximated by a long hang.
    Hang,
}

#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub form: Vec<(String, String)>,
    pub authorization: Option<String>,
}

impl SeenRequest {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub struct IdpState {
    pub requests: AtomicU64,
    issued: AtomicU64,
    /// Valid tokens and when each expires (from `expires_in`, if numeric).
    valid: Mutex<HashMap<String, Option<std::time::Instant>>>,
    pub expires_in: Mutex<Option<serde_json::Value>>,
    pub delay: Mutex<Duration>,
    pub failure: Mutex<Option<Failure>>,
    /// `retry-after` (seconds) sent with `Failure::Status` answers.
    pub retry_after: Mutex<Option<u64>>,
    /// Rotate refresh tokens: each refresh returns a new one, the old one dies.
    pub rotate: bool,
    refresh_tokens: Mutex<HashSet<String>>,
    /// Rotated-out refresh tokens. Presenting one again is a reuse: like real
    /// rotating IdPs (RFC 9700 §4.14.2), the whole family is revoked then.
    spent_refresh_tokens: Mutex<HashSet<String>>,
    pub refresh_token_reuses: AtomicU64,
    /// Token requests being answered now, and the most there ever were at once.
    in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// The token every response carries, if set (to test "same token again").
    pub fixed_token: Mutex<Option<String>>,
    /// Revoke older tokens whenever a new one is issued.
    pub revoke_on_issue: Mutex<bool>,
    pub seen: Mutex<Vec<SeenRequest>>,
    pub expected_basic: Mutex<Option<String>>,
    pub jwt_key: Mutex<Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Algorithm)>>,
    /// Codes issued by `/authorize` and not redeemed yet.
    codes: Mutex<HashMap<String, IssuedCode>>,
    /// The query of every `/authorize` request.
    pub authorize_seen: Mutex<Vec<Vec<(String, String)>>>,
    /// `/authorize` answers with this `error` instead of a code.
    pub authorize_error: Mutex<Option<String>>,
    /// Codes redeemed with the right verifier.
    pub codes_redeemed: AtomicU64,
}

#[derive(Debug, Clone)]
struct IssuedCode {
    challenge: String,
    redirect_uri: String,
    client_id: String,
}

#[derive(Debug, Clone)]
pub struct MockIdp {
    pub addr: SocketAddr,
    pub state: Arc<IdpState>,
}

impl MockIdp {
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    pub async fn start_with(rotate: bool) -> Self {
        let state = Arc::new(IdpState {
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            valid: Mutex::new(HashMap::new()),
            expires_in: Mutex::new(Some(serde_json::json!(3600))),
            delay: Mutex::new(Duration::ZERO),
            failure: Mutex::new(None),
            retry_after: Mutex::new(None),
            rotate,
            refresh_tokens: Mutex::new(HashSet::from(["rt-0".to_owned()])),
            spent_refresh_tokens: Mutex::new(HashSet::new()),
            refresh_token_reuses: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            fixed_token: Mutex::new(None),
            revoke_on_issue: Mutex::new(false),
            seen: Mutex::new(Vec::new()),
            expected_basic: Mutex::new(None),
            jwt_key: Mutex::new(None),
            codes: Mutex::new(HashMap::new()),
            authorize_seen: Mutex::new(Vec::new()),
            authorize_error: Mutex::new(None),
            codes_redeemed: AtomicU64::new(0),
        });
        let st = state.clone();
        let addr = serve(move |req| {
            let st = st.clone();
            async move { handle(st, req).await }
        })
        .await;
        MockIdp { addr, state }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn authorize_url(&self) -> String {
        format!("http://{}/authorize", self.addr)
    }

    /// `/authorize` sends the browser back with `error` instead of a code.
    pub fn refuse_authorization(&self, error: Option<&str>) {
        *self.state.authorize_error.lock().unwrap() = error.map(str::to_owned);
    }

    pub fn authorize_seen(&self) -> Vec<Vec<(String, String)>> {
        self.state.authorize_seen.lock().unwrap().clone()
    }

    pub fn codes_redeemed(&self) -> u64 {
        self.state.codes_redeemed.load(Ordering::SeqCst)
    }

    /// Token requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Issued, not revoked, not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        match self.state.valid.lock().unwrap().get(token) {
            Some(Some(exp)) => std::time::Instant::now() < *exp,
            Some(None) => true,
            None => false,
        }
    }

    /// Every token issued so far stops working.
    pub fn revoke_all(&self) {
        self.state.valid.lock().unwrap().clear();
    }

    pub fn set_expires_in(&self, v: Option<serde_json::Value>) {
        *self.state.expires_in.lock().unwrap() = v;
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    pub fn fail_with(&self, f: Option<Failure>) {
        *self.state.failure.lock().unwrap() = f;
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn current_refresh_tokens(&self) -> Vec<String> {
        self.state
            .refresh_tokens
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    }

    /// Spent refresh tokens presented again (each revoked the whole family).
    pub fn refresh_token_reuses(&self) -> u64 {
        self.state.refresh_token_reuses.load(Ordering::SeqCst)
    }

    /// The most token requests this IdP was ever answering at once.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Forgets the high-water mark of concurrent token requests.
    pub fn reset_max_in_flight(&self) {
        self.state.max_in_flight.store(0, Ordering::SeqCst);
    }

    pub fn set_refresh_tokens(&self, tokens: &[&str]) {
        *self.state.refresh_tokens.lock().unwrap() = tokens.iter().map(|s| s.to_string()).collect();
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<TestBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn query_get<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

/// RFC 7636 §4.2 S256, computed independently of the gateway's own code.
pub fn s256(verifier: &str) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// The authorization endpoint: checks the request, then redirects back at once.
fn authorize(st: &IdpState, query: &str) -> Response<TestBody> {
    let q: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    st.authorize_seen.lock().unwrap().push(q.clone());
    let (Some(redirect_uri), Some(state)) = (query_get(&q, "redirect_uri"), query_get(&q, "state"))
    else {
        let mut r = Response::new(full("missing redirect_uri or state"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let mut back = form_urlencoded::Serializer::new(String::new());
    let error = st.authorize_error.lock().unwrap().clone();
    let valid = query_get(&q, "response_type") == Some("code")
        && query_get(&q, "code_challenge_method") == Some("S256")
        && query_get(&q, "code_challenge").is_some_and(|c| c.len() == 43)
        && query_get(&q, "client_id").is_some();
    match (error, valid) {
        (Some(e), _) => {
            back.append_pair("error", &e)
                .append_pair("error_description", "the <user> said no & left");
        }
        (None, false) => {
            back.append_pair("error", "invalid_request");
        }
        (None, true) => {
            let code = format!("code-{}", rand::random::<u64>());
            st.codes.lock().unwrap().insert(
                code.clone(),
                IssuedCode {
                    challenge: query_get(&q, "code_challenge").unwrap().to_owned(),
                    redirect_uri: redirect_uri.to_owned(),
                    client_id: query_get(&q, "client_id").unwrap().to_owned(),
                },
            );
            back.append_pair("code", &code);
        }
    }
    back.append_pair("state", state);
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut().insert(
        "location",
        format!("{redirect_uri}?{}", back.finish()).parse().unwrap(),
    );
    r
}

async fn handle(st: Arc<IdpState>, req: Request<hyper::body::Incoming>) -> Response<TestBody> {
    if req.uri().path() == "/authorize" {
        return authorize(&st, req.uri().query().unwrap_or(""));
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Counted down also when the client goes away mid-answer.
    let _answering = InFlight(&st.in_flight);
    answer(&st, req).await
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(st: &IdpState, req: Request<hyper::body::Incoming>) -> Response<TestBody> {
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let seen = SeenRequest {
        form,
        authorization,
    };
    st.seen.lock().unwrap().push(seen.clone());

    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let failure = st.failure.lock().unwrap().clone();
    match failure {
        Some(Failure::Status(code, body)) => {
            let mut r = Response::new(full(body));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            if let Some(secs) = *st.retry_after.lock().unwrap() {
                r.headers_mut().insert("retry-after", secs.into());
            }
            return r;
        }
        Some(Failure::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        None => {}
    }
    if let Some(expected) = st.expected_basic.lock().unwrap().clone() {
        if seen.authorization.as_deref() != Some(expected.as_str()) {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client"}),
            );
        }
    }
    if let Some((key, alg)) = st.jwt_key.lock().unwrap().clone() {
        let Some(assertion) = seen.get("client_assertion") else {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client"}),
            );
        };
        let mut v = jsonwebtoken::Validation::new(alg);
        v.set_audience(&[format!("http://{}/token", "placeholder")]);
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        if jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v).is_err() {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client"}),
            );
        }
    }
    let mut new_refresh = None;
    if seen.get("grant_type") == Some("authorization_code") {
        let issued = st
            .codes
            .lock()
            .unwrap()
            .remove(seen.get("code").unwrap_or_default());
        let ok = issued.is_some_and(|c| {
            Some(c.redirect_uri.as_str()) == seen.get("redirect_uri")
                && seen.get("code_verifier").map(s256).as_deref() == Some(c.challenge.as_str())
                && (seen.get("client_id").is_none_or(|id| id == c.client_id))
        });
        if !ok {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_grant"}),
            );
        }
        st.codes_redeemed.fetch_add(1, Ordering::SeqCst);
        let n = format!("rt-auth-{}", rand::random::<u32>());
        st.refresh_tokens.lock().unwrap().insert(n.clone());
        new_refresh = Some(n);
    }
    if seen.get("grant_type") == Some("refresh_token") {
        let presented = seen.get("refresh_token").unwrap_or_default().to_owned();
        let mut rts = st.refresh_tokens.lock().unwrap();
        let mut spent = st.spent_refresh_tokens.lock().unwrap();
        if spent.contains(&presented) {
            st.refresh_token_reuses.fetch_add(1, Ordering::SeqCst);
            spent.extend(rts.drain());
        }
        if !rts.contains(&presented) {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_grant"}),
            );
        }
        if st.rotate {
            rts.remove(&presented);
            spent.insert(presented.clone());
            let n = format!("rt-{}", st.issued.load(Ordering::SeqCst) + 1);
            rts.insert(n.clone());
            new_refresh = Some(n);
        }
    }
    let n = st.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let token = st
        .fixed_token
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| format!("tok-{n}"));
    let expires_in = st.expires_in.lock().unwrap().clone();
    let lifetime = expires_in
        .as_ref()
        .and_then(|e| e.as_f64().or_else(|| e.as_str()?.parse().ok()));
    {
        let mut valid = st.valid.lock().unwrap();
        if *st.revoke_on_issue.lock().unwrap() {
            valid.clear();
        }
        let exp = lifetime.map(|l| std::time::Instant::now() + Duration::from_secs_f64(l.max(0.0)));
        valid.insert(token.clone(), exp);
    }
    let mut body = serde_json::json!({"access_token": token, "token_type": "Bearer"});
    if let Some(e) = expires_in {
        body["expires_in"] = e;
    }
    if let Some(rt) = new_refresh {
        body["refresh_token"] = rt.into();
    }
    json(StatusCode::OK, body)
}
