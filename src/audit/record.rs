//! What the log holds: a line per request, per token event and per token handed
//! out, in the form the writer serializes.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

/// One proxied (or refused) request.
#[derive(Debug, Serialize)]
pub struct RequestRecord {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    #[serde(serialize_with = "header_str")]
    pub request_id: http::HeaderValue,
    pub caller: Option<Arc<str>>,
    pub client_addr: std::net::SocketAddr,
    pub route: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    #[serde(serialize_with = "method_str")]
    pub method: http::Method,
    /// The caller's path, without the query string (queries may carry secrets).
    pub path: String,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub duration_ms: u64,
    pub token_generation: Option<u64>,
    pub replayed: bool,
    pub error: Option<&'static str>,
}

/// One token request to an IdP (or adoption of a stored one).
#[derive(Debug, Clone, Serialize)]
pub struct TokenEvent {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub event: &'static str,
    pub provider: Arc<str>,
    pub trigger: &'static str,
    pub outcome: &'static str,
    pub generation: Option<u64>,
    pub expires_in_s: Option<u64>,
    pub duration_ms: u64,
    /// OAuth error code or failure kind; never a token, secret or IdP body.
    pub error: Option<String>,
}

/// A token handed out by the broker API (`/.authgate/token/{provider}`).
#[derive(Debug, Serialize)]
pub struct HandOutEvent {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub event: &'static str,
    pub request_id: String,
    pub caller: Option<String>,
    pub client_addr: String,
    pub provider: Arc<str>,
    pub status: u16,
    pub token_generation: Option<u64>,
}

#[derive(Debug)]
pub(super) enum Line {
    Request(Box<RequestRecord>),
    Token(TokenEvent),
    HandOut(HandOutEvent),
    /// Nothing to write: wakes the writer to look at its flags (reopen).
    Wake,
}

// The request path hands over what it already holds (header value, method, socket
// address); turning them into text is the writer task's job.
fn header_str<S: serde::Serializer>(v: &http::HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.to_str().unwrap_or_default())
}

fn method_str<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

pub(super) fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}
