//! The one place where failures become the contract's responses (DESIGN.md,
//! "Errors"): a status, a stable code, a message safe to show, and the request id.
//! Internals (cause chains, addresses, secrets) go to the log, never to the caller.

use std::error::Error as StdError;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::GatewayBody;
use crate::cause::find_in_chain;

/// Why the gateway answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("caller is not identified")]
    CallerUnknown,
    #[error("caller {0:?} is not allowed here")]
    CallerForbidden(String),
    #[error("no route matches the path")]
    NoRoute,
    #[error("request not received in time")]
    RequestTimeout,
    #[error("request body is larger than the limit")]
    BodyTooLarge,
    #[error("request headers are too large")]
    HeadersTooLarge,
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] Box<dyn StdError + Send + Sync>),
    #[error("no valid token: {reason}")]
    TokenUnavailable {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("upstream did not answer within the route timeout")]
    UpstreamTimeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::CallerUnknown | ProxyError::CallerForbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The contract's error code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::CallerUnknown | ProxyError::CallerForbidden(_) => "caller_forbidden",
            ProxyError::NoRoute => "no_route",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// What the caller is told: never a cause chain (it may name internal hosts).
    fn public_message(&self) -> String {
        match self {
            // The one cause worth naming to the caller: only the operator can fix
            // it, and the message carries schemes, never an account.
            ProxyError::UpstreamUnreachable(cause) => {
                match find_in_chain::<crate::outbound::egress::ProxyAuthError>(cause.as_ref()) {
                    Some(auth) => format!("the upstream could not be reached: {auth}"),
                    None => "the upstream could not be reached".to_owned(),
                }
            }
            ProxyError::TokenUnavailable { reason, .. } => {
                format!("no valid token for the upstream: {reason}")
            }
            other => other.to_string(),
        }
    }

    /// The contract's JSON body; `message` in place of the variant's own.
    fn json_body(
        &self,
        message: Option<&str>,
        request_id: &str,
        route: Option<&str>,
        provider: Option<&str>,
    ) -> String {
        let mut body = serde_json::json!({
            "error": self.code(),
            "message": message.map_or_else(|| self.public_message(), str::to_owned),
            "request_id": request_id,
        });
        if let Some(r) = route {
            body["route"] = r.into();
        }
        if let Some(p) = provider {
            body["provider"] = p.into();
        }
        body.to_string()
    }

    /// The JSON response of the contract.
    pub fn to_response(
        &self,
        request_id: &str,
        route: Option<&str>,
        provider: Option<&str>,
    ) -> Response<GatewayBody> {
        let body = self.json_body(None, request_id, route, provider);
        let mut resp = Response::new(GatewayBody::full(Bytes::from(body)));
        *resp.status_mut() = self.status();
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let ProxyError::TokenUnavailable {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from((*retry_after_secs).max(1)));
        }
        resp
    }

    /// The contract's answer as bytes on an HTTP/1 connection that closes after
    /// it, for a request the gateway answers before hyper hands it over (a head
    /// that is late, or that hyper could not parse). `message` in place of the
    /// variant's own.
    pub fn to_closing_bytes(&self, request_id: &str, message: Option<&str>) -> Vec<u8> {
        let body = self.json_body(message, request_id, None, None);
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n{body}",
            status.as_str(),
            status.canonical_reason().unwrap_or_default(),
            body.len(),
        )
        .into_bytes()
    }
}
