//! The browser side of reauthorization (DESIGN.md, "Reauthorization"): the
//! redirect to the IdP's authorization endpoint with a random single-use `state`
//! and an RFC 7636 S256 code challenge, and the callback that checks the state and
//! hands the code to the provider. The state lives here, in memory, for ten
//! minutes; the verifier never leaves this process except to the token endpoint.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use http::header::{CACHE_CONTROL, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;

use super::actions;
use super::console::{esc, html_page};
use super::pending::Started;
use super::reply::json;
use super::state::Console;
use crate::body::GatewayBody;
use crate::gateway::Gateway;
use crate::secret::Secret;
use crate::server::ConnInfo;

const DEFAULT_CALLBACK_PATH: &str = "/oauth/callback";

/// 32 random bytes, base64url: a `state` or a PKCE verifier (43 characters of
/// RFC 7636's unreserved set).
fn random_token() -> String {
    B64URL.encode(rand::random::<[u8; 32]>())
}

/// RFC 7636 §4.2 S256: BASE64URL(SHA256(ASCII(code_verifier))).
fn pkce_challenge(verifier: &str) -> String {
    B64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// The redirect URI of `provider`: configured, else the admin listener's default
/// on the port it is bound to.
fn redirect_uri(cfg: &crate::config::Authorize, conn: &ConnInfo) -> String {
    match &cfg.redirect_uri {
        Some(u) => u.to_string(),
        None => format!(
            "http://127.0.0.1:{}{DEFAULT_CALLBACK_PATH}",
            conn.local.port()
        ),
    }
}

/// Whether `path` is where the IdP sends the browser back: the default path, or
/// the path of a configured `redirect_uri` (behind a reverse proxy it may differ).
pub(super) fn is_callback_path(gw: &Gateway, path: &str) -> bool {
    path == DEFAULT_CALLBACK_PATH
        || gw.snapshot().providers.values().any(|p| {
            p.cfg
                .authorize()
                .and_then(|a| a.redirect_uri.as_ref())
                .is_some_and(|u| u.path() == path)
        })
}

/// `GET /providers/{name}/authorize`: 302 to the IdP.
pub(super) fn authorize<B>(
    gw: &Gateway,
    console: &Console,
    conn: &ConnInfo,
    req: &Request<B>,
    name: &str,
) -> Response<GatewayBody> {
    if let Some(refused) = actions::refusal(console, conn, req) {
        return refused;
    }
    let snap = gw.snapshot();
    let Some(provider) = snap.providers.get(name) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "unknown_provider"}),
        );
    };
    let (Some(auth), Some(client)) = (provider.cfg.authorize(), provider.cfg.oauth()) else {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"error": "not_authorizable", "message": "the provider has no authorize_url"}),
        );
    };
    let state = random_token();
    let verifier = random_token();
    let redirect = redirect_uri(auth, conn);
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("response_type", "code")
        .append_pair("client_id", &client.client_id)
        .append_pair("redirect_uri", &redirect);
    if let Some(scope) = &client.scope {
        query.append_pair("scope", scope);
    }
    query
        .append_pair("state", &state)
        .append_pair("code_challenge", &pkce_challenge(&verifier))
        .append_pair("code_challenge_method", "S256");
    let base = auth.url.to_string();
    let sep = if auth.url.query().is_some() { '&' } else { '?' };
    let location = format!("{base}{sep}{}", query.finish());
    let Ok(location) = HeaderValue::from_str(&location) else {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "bad_authorize_url"}),
        );
    };
    console.pending.insert(
        state,
        Started {
            provider: name.to_owned(),
            verifier: Secret::new(verifier),
            redirect_uri: redirect,
            at: Instant::now(),
        },
    );
    tracing::info!(provider = name, client = %conn.remote, "reauthorization started from the admin console");
    let mut resp = Response::new(GatewayBody::empty());
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(LOCATION, location);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /oauth/callback?code=…&state=…`: the state is checked and spent, then the
/// code exchanged. An IdP `error` is shown and never retried.
pub(super) async fn callback<B>(
    gw: &Gateway,
    console: &Console,
    req: &Request<B>,
) -> Response<GatewayBody> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "code" => code = Some(Secret::new(v.into_owned())),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(printable(&v, 64)),
            "error_description" => description = Some(printable(&v, 200)),
            _ => {}
        }
    }
    let started = state.as_deref().and_then(|s| console.pending.take(s));
    let Some(started) = started else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Authorization not accepted",
            "<p class=\"bad\">Unknown, expired or already used authorization <code>state</code>.</p>\
             <p>Start again from the console: each authorization link is good once, for ten minutes.</p>",
        );
    };
    let name = started.provider;
    if let Some(error) = error {
        tracing::warn!(provider = %name, error = %error, "the identity provider refused the authorization");
        if let Some(p) = gw.snapshot().providers.get(&name) {
            p.authorization_refused(&error);
        }
        let detail = description
            .map(|d| format!(" ({})", esc(&d)))
            .unwrap_or_default();
        return html_page(
            StatusCode::BAD_REQUEST,
            "Authorization refused",
            &format!(
                "<p class=\"bad\">The identity provider refused to authorize <b>{}</b>: <code>{}</code>{detail}.</p>\
                 <p>Nothing was retried. Fix the cause at the identity provider, then start again from the console.</p>",
                esc(&name),
                esc(&error)
            ),
        );
    }
    let Some(code) = code else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Authorization not accepted",
            "<p class=\"bad\">The callback carried no authorization <code>code</code>.</p>",
        );
    };
    let Some(provider) = gw.snapshot().providers.get(&name).cloned() else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Authorization not accepted",
            &format!(
                "<p class=\"bad\">Provider <b>{}</b> is no longer configured.</p>",
                esc(&name)
            ),
        );
    };
    match provider
        .complete_authorization(code, started.verifier, started.redirect_uri)
        .await
    {
        Ok(t) => {
            let expiry = t
                .expires_in(tokio::time::Instant::now())
                .map(|d| format!(", valid for {}", super::console::duration(d)))
                .unwrap_or_default();
            html_page(
                StatusCode::OK,
                "Provider authorized",
                &format!(
                    "<p class=\"good\">Provider <b>{}</b> is authorized: generation {}{expiry}. \
                     The new refresh token is stored; every replica sharing the store adopts it.</p>",
                    esc(&name),
                    t.generation
                ),
            )
        }
        Err(e) => html_page(
            StatusCode::BAD_GATEWAY,
            "Authorization failed",
            &format!(
                "<p class=\"bad\">The token endpoint did not accept the authorization code for <b>{}</b>: <code>{}</code>.</p>\
                 <p>Start again from the console.</p>",
                esc(&name),
                esc(&e.to_string())
            ),
        ),
    }
}

/// IdP-provided text: printable ASCII, bounded (escaped again where shown).
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s256_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn states_and_verifiers_are_random_and_rfc7636_sized() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token());
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
