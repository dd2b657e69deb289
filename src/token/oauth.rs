//! One request to an OAuth token endpoint (RFC 6749 §4.4, §6) with the configured
//! client authentication, and the parsing of its answer (§5.1, §5.2). Response
//! bodies are size- and time-limited and never logged; redirects are failures.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::config::{ClientAuth, JwtAlg, OAuthClient};
use crate::outbound::client::HttpClient;
use crate::secret::Secret;

/// Largest token response read; anything bigger is not a token response.
const MAX_RESPONSE: usize = 64 * 1024;
/// Tokens claiming to live longer than this are refreshed at least this often.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why a token request failed. Carries no token, secret or response body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    /// The egress proxy wants authentication authgate cannot give: refused
    /// the tunnel (counted by the connector), or, `from_response`, answered
    /// `407` to a plain-http request sent to it in absolute form.
    #[error("token endpoint unreachable: {message}")]
    ProxyAuth {
        message: String,
        from_response: bool,
    },
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint answered HTTP {status}")]
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint refused the request: {code}{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    OAuth {
        code: String,
        description: Option<String>,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint redirected (HTTP {0}); redirects are never followed")]
    Redirect(u16),
    #[error("invalid token response: {0}")]
    InvalidResponse(String),
    #[error("client authentication: {0}")]
    ClientSetup(String),
    #[error("reauthorization required: the refresh token was rejected (invalid_grant); provide a new one and reload")]
    ReauthRequired,
    #[error("reauthorization required: no refresh token yet; authorize the provider from the admin console")]
    NoRefreshToken,
    #[error("gave up waiting for the token request")]
    Abandoned,
    #[error("the token endpoint returned the token the upstream had just rejected")]
    Unchanged,
}

/// How the refresher should react to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Network trouble, 5xx, 429: back off exponentially (honouring retry-after).
    Transient(Option<Duration>),
    /// The IdP says our client is wrong (invalid_client, ...): retry rarely, loudly.
    Slow,
    /// Only a person can fix it (invalid_grant on a refresh token).
    Never,
    /// The IdP answered, with the token we hold: asking again sooner would get the
    /// same answer, so the refresh schedule stays as it is (401-driven refreshes
    /// are spaced by `min_refresh_interval`).
    Unneeded,
}

impl TokenError {
    pub fn retry(&self) -> Retry {
        match self {
            TokenError::Transport(_) | TokenError::Timeout(_) | TokenError::Abandoned => {
                Retry::Transient(None)
            }
            TokenError::Http {
                status,
                retry_after,
            } if *status >= 500 || *status == 429 || *status == 408 => {
                Retry::Transient(*retry_after)
            }
            TokenError::ReauthRequired | TokenError::NoRefreshToken => Retry::Never,
            TokenError::Unchanged => Retry::Unneeded,
            // The status says "later" whatever the body calls it (a 429 may carry
            // `slow_down`, a 503 `temporarily_unavailable`): back off as told.
            TokenError::OAuth {
                code,
                status,
                retry_after,
                ..
            } if *status >= 500
                || *status == 429
                || code == "temporarily_unavailable"
                || code == "server_error"
                || code == "slow_down" =>
            {
                Retry::Transient(*retry_after)
            }
            _ => Retry::Slow,
        }
    }

    /// Short code for audit and status: the OAuth error code or the failure kind.
    pub fn code(&self) -> String {
        match self {
            TokenError::Transport(_) => "unreachable".into(),
            TokenError::ProxyAuth { .. } => "proxy_authentication_failed".into(),
            TokenError::Timeout(_) => "timeout".into(),
            TokenError::Http { status, .. } => format!("http_{status}"),
            TokenError::OAuth { code, .. } => code.clone(),
            TokenError::Redirect(_) => "redirect".into(),
            TokenError::InvalidResponse(_) => "invalid_response".into(),
            TokenError::ClientSetup(_) => "client_setup".into(),
            TokenError::ReauthRequired => "invalid_grant".into(),
            TokenError::NoRefreshToken => "no_refresh_token".into(),
            TokenError::Abandoned => "abandoned".into(),
            TokenError::Unchanged => "token_unchanged".into(),
        }
    }
}

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub token_type: String,
    /// `None`: the IdP gave no lifetime; the token is used until a 401.
    pub expires_in: Option<Duration>,
    pub scope: Option<String>,
}

/// What the request asks for.
#[derive(Debug)]
pub enum GrantRequest<'a> {
    ClientCredentials,
    RefreshToken(&'a Secret),
    /// RFC 6749 §4.1.3 with RFC 7636 §4.5: the code the browser brought back, the
    /// PKCE verifier, and the redirect URI the authorization request named.
    AuthorizationCode {
        code: &'a Secret,
        verifier: &'a Secret,
        redirect_uri: &'a str,
    },
}

/// The client's credential, loaded once when the provider is built.
pub enum ClientCredential {
    None,
    Secret(Secret),
    Jwt {
        key: jsonwebtoken::EncodingKey,
        key_id: Option<String>,
        alg: jsonwebtoken::Algorithm,
    },
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientCredential::None => f.write_str("None"),
            ClientCredential::Secret(_) => f.write_str("Secret(***)"),
            ClientCredential::Jwt { key_id, alg, .. } => {
                write!(f, "Jwt {{ key: ***, key_id: {key_id:?}, alg: {alg:?} }}")
            }
        }
    }
}

/// Why the client's credential could not be loaded (start-up or reload).
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("cannot read client_key {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("client_key is not a usable {alg:?} private key: {source}")]
    Key {
        alg: jsonwebtoken::Algorithm,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

impl ClientCredential {
    pub fn load(auth: &ClientAuth) -> Result<Self, CredentialError> {
        Ok(match auth {
            ClientAuth::None | ClientAuth::TlsClientAuth { .. } => ClientCredential::None,
            ClientAuth::SecretBasic(src) | ClientAuth::SecretPost(src) => {
                ClientCredential::Secret(src.load()?)
            }
            ClientAuth::PrivateKeyJwt { key, key_id, alg } => {
                let pem = std::fs::read(key).map_err(|source| CredentialError::KeyFile {
                    path: key.display().to_string(),
                    source,
                })?;
                let (key, alg) = match alg {
                    JwtAlg::RS256 => (
                        jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
                        jsonwebtoken::Algorithm::RS256,
                    ),
                    JwtAlg::PS256 => (
                        jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
                        jsonwebtoken::Algorithm::PS256,
                    ),
                    JwtAlg::ES256 => (
                        jsonwebtoken::EncodingKey::from_ec_pem(&pem),
                        jsonwebtoken::Algorithm::ES256,
                    ),
                };
                let key = key.map_err(|source| CredentialError::Key { alg, source })?;
                ClientCredential::Jwt {
                    key,
                    key_id: key_id.clone(),
                    alg,
                }
            }
        })
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1 and
/// Appendix B: each of client id and secret is encoded before joining with ':').
fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The `Authorization: Basic` value for `client_secret_basic`.
pub fn basic_auth(client_id: &str, secret: &str) -> String {
    let joined = format!("{}:{}", form_encode(client_id), form_encode(secret));
    format!("Basic {}", B64.encode(joined))
}

#[derive(serde::Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: String,
    iat: u64,
    exp: u64,
    jti: String,
}

fn client_assertion(
    client: &OAuthClient,
    key: &jsonwebtoken::EncodingKey,
    key_id: Option<&str>,
    alg: jsonwebtoken::Algorithm,
) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = key_id.map(str::to_owned);
    let claims = AssertionClaims {
        iss: &client.client_id,
        sub: &client.client_id,
        aud: client.token_url.to_string(),
        iat: now,
        // Short-lived: RFC 7523 §3 wants an expiry, RFC 9700 a short one.
        exp: now + 60,
        jti: format!("{:032x}", rand::random::<u128>()),
    };
    jsonwebtoken::encode(&header, &claims, key)
        .map_err(|e| TokenError::ClientSetup(format!("cannot sign client assertion: {e}")))
}

/// The form body and, for `client_secret_basic`, the `Authorization` value.
/// Synchronous so the (non-`Send`) serializer never lives across an await.
fn build_form(
    client: &OAuthClient,
    credential: &ClientCredential,
    grant: GrantRequest<'_>,
) -> Result<(zeroize::Zeroizing<String>, Option<String>), TokenError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    let is_code = matches!(grant, GrantRequest::AuthorizationCode { .. });
    match grant {
        GrantRequest::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
        GrantRequest::RefreshToken(rt) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", rt.expose());
        }
        GrantRequest::AuthorizationCode {
            code,
            verifier,
            redirect_uri,
        } => {
            form.append_pair("grant_type", "authorization_code");
            form.append_pair("code", code.expose());
            form.append_pair("redirect_uri", redirect_uri);
            form.append_pair("code_verifier", verifier.expose());
        }
    }
    // The code already carries the scope granted in the browser (RFC 6749 §4.1.3).
    if let (Some(scope), false) = (&client.scope, is_code) {
        form.append_pair("scope", scope);
    }
    if let Some(aud) = &client.audience {
        form.append_pair("audience", aud);
    }
    if let Some(res) = &client.resource {
        form.append_pair("resource", res);
    }
    let mut authorization = None;
    match (&client.auth, credential) {
        (ClientAuth::SecretBasic(_), ClientCredential::Secret(s)) => {
            authorization = Some(basic_auth(&client.client_id, s.expose()));
        }
        (ClientAuth::SecretPost(_), ClientCredential::Secret(s)) => {
            form.append_pair("client_id", &client.client_id);
            form.append_pair("client_secret", s.expose());
        }
        (ClientAuth::PrivateKeyJwt { .. }, ClientCredential::Jwt { key, key_id, alg }) => {
            form.append_pair("client_id", &client.client_id);
            form.append_pair("client_assertion_type", ASSERTION_TYPE);
            form.append_pair(
                "client_assertion",
                &client_assertion(client, key, key_id.as_deref(), *alg)?,
            );
        }
        // tls_client_auth (RFC 8705 §2): the certificate authenticates; the id still goes in the body.
        (ClientAuth::TlsClientAuth { .. } | ClientAuth::None, _) => {
            form.append_pair("client_id", &client.client_id);
        }
        _ => {
            return Err(TokenError::ClientSetup(
                "client credential does not match client_auth".into(),
            ))
        }
    }
    Ok((zeroize::Zeroizing::new(form.finish()), authorization))
}

/// Sends one token request and parses the answer.
pub async fn request_token(
    http: &HttpClient<Full<Bytes>>,
    client: &OAuthClient,
    credential: &ClientCredential,
    grant: GrantRequest<'_>,
) -> Result<TokenResponse, TokenError> {
    let (body, authorization) = build_form(client, credential, grant)?;

    let mut req = Request::builder()
        .method(Method::POST)
        .uri(client.token_url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|e| TokenError::ClientSetup(e.to_string()))?;
    if let Some(auth) = authorization {
        let mut v = HeaderValue::from_str(&auth)
            .map_err(|_| TokenError::ClientSetup("invalid client credentials".into()))?;
        v.set_sensitive(true);
        req.headers_mut().insert(AUTHORIZATION, v);
    }

    let exchange = async {
        let resp = http.request(req).await.map_err(|e| {
            match crate::cause::find_in_chain::<crate::outbound::egress::ProxyAuthError>(&e) {
                Some(auth) => TokenError::ProxyAuth {
                    message: auth.to_string(),
                    from_response: false,
                },
                None => TokenError::Transport(crate::cause::chain(&e)),
            }
        })?;
        let status = resp.status();
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            return Err::<(StatusCode, Option<Duration>, Bytes), _>(TokenError::ProxyAuth {
                message: crate::outbound::egress::unanswered(resp.headers()).to_string(),
                from_response: true,
            });
        }
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|_| {
                TokenError::InvalidResponse("response body too large or cut short".into())
            })?
            .to_bytes();
        Ok::<_, TokenError>((status, retry_after, body))
    };
    let (status, retry_after, body) = tokio::time::timeout(client.timeout, exchange)
        .await
        .map_err(|_| TokenError::Timeout(client.timeout))??;
    parse_response(status, retry_after, &body)
}

/// `retry-after` as delay-seconds or an HTTP date.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when = httpdate::parse_http_date(s).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(3600)),
    )
}

#[derive(serde::Deserialize)]
struct RawSuccess {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<String>,
}

#[derive(serde::Deserialize)]
struct RawError {
    error: String,
    error_description: Option<String>,
}

/// RFC 6749 §5.1 / §5.2, leniently where the RFC allows and strictly where it matters.
pub fn parse_response(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<TokenResponse, TokenError> {
    if status.is_redirection() {
        return Err(TokenError::Redirect(status.as_u16()));
    }
    if !status.is_success() {
        if let Ok(err) = serde_json::from_slice::<RawError>(body) {
            return Err(TokenError::OAuth {
                code: sanitize(&err.error),
                description: err.error_description.as_deref().map(sanitize),
                status: status.as_u16(),
                retry_after,
            });
        }
        return Err(TokenError::Http {
            status: status.as_u16(),
            retry_after,
        });
    }
    let raw: RawSuccess = serde_json::from_slice(body)
        .map_err(|_| TokenError::InvalidResponse("body is not a JSON token response".into()))?;
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
    if access_token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(TokenError::InvalidResponse(
            "access_token has characters not allowed in a header".into(),
        ));
    }
    let token_type = raw.token_type.unwrap_or_else(|| "Bearer".into());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::InvalidResponse(format!(
            "token_type {:?} is not Bearer",
            sanitize(&token_type)
        )));
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| TokenError::InvalidResponse("expires_in is not a number".into()))?,
        ),
        Some(_) => {
            return Err(TokenError::InvalidResponse(
                "expires_in is not a number".into(),
            ))
        }
    }
    .map(clamp_lifetime);
    Ok(TokenResponse {
        access_token: Secret::new(access_token),
        refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
        token_type: "Bearer".into(),
        expires_in,
        scope: raw.scope,
    })
}

/// Absurd lifetimes are clamped: below a second (or negative, NaN) to one second,
/// above a year to a year.
fn clamp_lifetime(secs: f64) -> Duration {
    if !secs.is_finite() || secs < 1.0 {
        return Duration::from_secs(1);
    }
    // Clamp before converting: `from_secs_f64` panics on values past `Duration::MAX`
    // (an IdP answering `1e30` would otherwise kill the refresh task).
    Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64()))
}

/// IdP-provided text shown in logs: printable ASCII, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(120)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_matches_rfc6749_vector() {
        assert_eq!(
            basic_auth("1PpG/Q 1", "z/tZ9VwFZqApmIQ+ZH1I5pLk/uB4ud:X2/8bL+wfFTt1rFw="),
            "Basic MVBwRyUyRlErMTp6JTJGdFo5VndGWnFBcG1JUSUyQlpIMUk1cExrJTJGdUI0dWQlM0FYMiUyRjhiTCUyQndmRlR0MXJGdyUzRA=="
        );
    }

    fn ok(body: &str) -> Result<TokenResponse, TokenError> {
        parse_response(StatusCode::OK, None, body.as_bytes())
    }

    #[test]
    fn token_type_is_case_insensitive_and_only_bearer() {
        assert!(ok(r#"{"access_token":"a","token_type":"bEaReR"}"#).is_ok());
        assert!(ok(r#"{"access_token":"a","token_type":"mac"}"#).is_err());
        assert!(ok(r#"{"token_type":"Bearer"}"#).is_err());
    }

    #[test]
    fn expires_in_as_number_or_string_and_clamped() {
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":"3600"}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":120.5}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs_f64(120.5)));
        let t = ok(r#"{"access_token":"a","token_type":"Bearer"}"#).unwrap();
        assert_eq!(t.expires_in, None);
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":-5}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(1)));
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":1e30}"#).unwrap();
        assert_eq!(t.expires_in, Some(MAX_LIFETIME));
        assert!(ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":"soon"}"#).is_err());
    }

    #[test]
    fn errors_are_classified() {
        let e = parse_response(
            StatusCode::UNAUTHORIZED,
            None,
            br#"{"error":"invalid_client"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), "invalid_client");
        assert_eq!(e.retry(), Retry::Slow);
        let e = parse_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(7)),
            b"oops",
        )
        .unwrap_err();
        assert_eq!(e.retry(), Retry::Transient(Some(Duration::from_secs(7))));
        let e = parse_response(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(7)),
            br#"{"error":"slow_down"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), "slow_down");
        assert_eq!(e.retry(), Retry::Transient(Some(Duration::from_secs(7))));
        let e = parse_response(StatusCode::FOUND, None, b"").unwrap_err();
        assert_eq!(e.code(), "redirect");
    }

    #[test]
    fn error_text_never_contains_the_body() {
        let e = parse_response(StatusCode::BAD_GATEWAY, None, b"secret-body-text").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("secret-body-text"));
    }
}
