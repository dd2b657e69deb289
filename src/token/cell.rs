//! The token cell and its generation fence. Requests load the cell and nothing
//! else; every new token is published through `publish`, which never lets an
//! older generation replace a newer one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use super::Provider;
use crate::secret::Secret;

/// A credential that cannot be sent: it has bytes a header value cannot carry.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("token has characters not allowed in a header")]
pub struct NotAHeaderValue;

/// One credential, as injected.
pub struct Token {
    pub generation: u64,
    /// The header value (`Bearer <token>` or the bare value), built once, sensitive.
    pub header_value: HeaderValue,
    pub access_token: Secret,
    pub scope: Option<String>,
    /// Monotonic expiry; `None` = used until a 401.
    pub expires_at: Option<Instant>,
    pub lifetime: Option<Duration>,
    pub obtained_at: SystemTime,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("header_value", &"***")
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Token {
    pub fn is_valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }

    pub fn expires_in(&self, now: Instant) -> Option<Duration> {
        self.expires_at.map(|e| e.saturating_duration_since(now))
    }
}

/// What a request injects: the header value and the generation it came from.
#[derive(Debug, Clone)]
pub struct Credential {
    pub header_value: HeaderValue,
    pub generation: u64,
}

impl Provider {
    /// The current token, whatever its validity.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.cell.load_full()
    }

    /// Whether the provider holds a valid token (readiness).
    pub fn is_ready(&self) -> bool {
        self.cell
            .load()
            .as_ref()
            .is_some_and(|t| t.is_valid(Instant::now()))
    }

    /// The current token if its generation is above `above` (any, when `None`) and
    /// it is valid beyond the refresh margin.
    pub(super) fn newer_than(&self, above: Option<u64>) -> Option<Arc<Token>> {
        let current = self.current()?;
        if above.is_some_and(|g| current.generation <= g) {
            return None;
        }
        let now = Instant::now();
        let fresh = match (current.expires_in(now), current.lifetime) {
            (Some(rem), Some(life)) => rem > self.margin(life),
            (Some(rem), None) => !rem.is_zero(),
            (None, _) => true,
        };
        fresh.then_some(current)
    }

    /// Stores `token` in the cell when `replaces` accepts the token held then. Under
    /// the state lock, so a refresh and an adoption landing together can never put
    /// an older generation back.
    pub(super) fn publish(
        &self,
        token: &Arc<Token>,
        replaces: impl FnOnce(Option<&Token>) -> bool,
    ) -> bool {
        let _st = self.state();
        let held = self.cell.load();
        if !replaces(held.as_deref()) {
            return false;
        }
        self.cell.store(Some(token.clone()));
        true
    }

    /// Publishes a token from the IdP; the one held then if that is newer (another
    /// replica's, adopted meanwhile: the fleet's token wins).
    pub(super) fn publish_fetched(&self, token: Arc<Token>) -> Arc<Token> {
        let generation = token.generation;
        if self.publish(&token, |held| {
            held.is_none_or(|h| h.generation <= generation)
        }) {
            return token;
        }
        self.current().unwrap_or(token)
    }

    pub(super) fn make_token(
        &self,
        value: Secret,
        lifetime: Option<Duration>,
        scope: Option<String>,
        generation: u64,
    ) -> Result<Token, NotAHeaderValue> {
        let text = if self.cfg.scheme.is_empty() {
            value.expose().to_owned()
        } else {
            format!("{} {}", self.cfg.scheme, value.expose())
        };
        let mut header_value =
            HeaderValue::from_maybe_shared(Bytes::from(text)).map_err(|_| NotAHeaderValue)?;
        header_value.set_sensitive(true);
        let now = Instant::now();
        Ok(Token {
            generation,
            header_value,
            access_token: value,
            scope,
            expires_at: lifetime.map(|l| now + l),
            lifetime,
            obtained_at: SystemTime::now(),
        })
    }
}
