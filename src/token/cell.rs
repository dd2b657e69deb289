//! The token, and the lock-free cell that holds a provider's current one.
//! Requests load the cell and nothing else; every new token goes in through
//! `TokenCell::publish`, a compare-and-swap that only replaces the token its
//! caller's rule accepts, so an older generation can never be put back.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwapOption, Guard};
use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

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
    /// A token obtained now: its header value (`scheme` and the value, or the bare
    /// value when `scheme` is empty) built once and marked sensitive.
    pub fn new(
        scheme: &str,
        value: Secret,
        lifetime: Option<Duration>,
        scope: Option<String>,
        generation: u64,
    ) -> Result<Token, NotAHeaderValue> {
        let text = if scheme.is_empty() {
            value.expose().to_owned()
        } else {
            format!("{scheme} {}", value.expose())
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

/// A provider's current token, read lock-free by every request.
#[derive(Debug, Default)]
pub struct TokenCell(ArcSwapOption<Token>);

impl TokenCell {
    /// The request path's read: one atomic load, no reference count taken.
    pub fn load(&self) -> Guard<Option<Arc<Token>>> {
        self.0.load()
    }

    /// The current token, whatever its validity.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.0.load_full()
    }

    /// Stores `token` if `replaces` accepts the token held at that moment; retried
    /// when another publisher got in between, so the rule always judges the token
    /// actually replaced.
    pub fn publish(
        &self,
        token: &Arc<Token>,
        mut replaces: impl FnMut(Option<&Token>) -> bool,
    ) -> bool {
        let mut held = self.0.load();
        loop {
            if !replaces(held.as_deref()) {
                return false;
            }
            let prev = self.0.compare_and_swap(&held, Some(token.clone()));
            if same(&prev, &held) {
                return true;
            }
            held = prev;
        }
    }

    /// The current token if its generation is above `above` (any, when `None`) and
    /// `fresh` accepts it.
    pub fn newer_than(
        &self,
        above: Option<u64>,
        fresh: impl FnOnce(&Token) -> bool,
    ) -> Option<Arc<Token>> {
        let current = self.current()?;
        if above.is_some_and(|g| current.generation <= g) || !fresh(&current) {
            return None;
        }
        Some(current)
    }
}

fn same(a: &Option<Arc<Token>>, b: &Option<Arc<Token>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token(generation: u64) -> Arc<Token> {
        let t = Token::new(
            "Bearer",
            Secret::new(format!("t{generation}")),
            None,
            None,
            generation,
        );
        Arc::new(t.unwrap())
    }

    #[test]
    fn publish_keeps_the_newest_generation() {
        let cell = TokenCell::default();
        let newer = |t: &Arc<Token>| {
            let g = t.generation;
            move |held: Option<&Token>| held.is_none_or(|h| h.generation < g)
        };
        let two = token(2);
        assert!(cell.publish(&two, newer(&two)));
        let one = token(1);
        assert!(
            !cell.publish(&one, newer(&one)),
            "an older generation never goes back"
        );
        assert_eq!(cell.current().unwrap().generation, 2);
        assert!(cell.newer_than(Some(1), |_| true).is_some());
        assert!(cell.newer_than(Some(2), |_| true).is_none());
        assert!(cell.newer_than(None, |_| false).is_none());
    }

    #[test]
    fn a_publisher_overtaken_mid_way_judges_the_token_actually_replaced() {
        let cell = TokenCell::default();
        assert!(cell.publish(&token(1), |_| true));
        let (two, three) = (token(2), token(3));
        let mut judged = Vec::new();
        let published = cell.publish(&two, |held| {
            let g = held.map(|h| h.generation);
            if judged.is_empty() {
                // Another publisher lands between this look and the swap.
                assert!(cell.publish(&three, |_| true));
            }
            judged.push(g);
            g.is_none_or(|g| g < 2)
        });
        assert!(!published, "generation 3 landed first and stays");
        assert_eq!(judged, [Some(1), Some(3)]);
        assert_eq!(cell.current().unwrap().generation, 3);
    }

    #[test]
    fn a_header_value_is_built_once_and_sensitive() {
        let t = token(7);
        assert_eq!(t.header_value, "Bearer t7");
        assert!(t.header_value.is_sensitive());
        let bare = Token::new("", Secret::new("k"), None, None, 1).unwrap();
        assert_eq!(bare.header_value, "k");
        assert!(Token::new("Bearer", Secret::new("a\nb"), None, None, 1).is_err());
        assert!(!format!("{t:?}").contains("t7"), "Debug hides the token");
    }
}
