//! What the operator console shows of one provider: its state in words, and the
//! numbers behind it. Read from the cell and the refresh bookkeeping; never a
//! secret.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::provider::{LastRefresh, Provider};

/// A provider's state as the console names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderState {
    Ready,
    Refreshing,
    Failing,
    Expired,
    ReauthorizationRequired,
}

impl ProviderState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderState::Ready => "ready",
            ProviderState::Refreshing => "refreshing",
            ProviderState::Failing => "failing",
            ProviderState::Expired => "expired",
            ProviderState::ReauthorizationRequired => "reauthorization required",
        }
    }

    /// Whether only a person can get the provider out of this state soon.
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            ProviderState::Failing | ProviderState::ReauthorizationRequired
        )
    }
}

#[derive(Debug, Clone)]
pub struct ProviderView {
    pub grant: &'static str,
    pub state: ProviderState,
    pub generation: Option<u64>,
    /// `None`: no token, or one used until a 401.
    pub expires_in: Option<Duration>,
    /// When the next token request is planned (proactive refresh or retry).
    pub next_refresh_in: Option<Duration>,
    pub last: Option<LastRefresh>,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    pub waiters: u64,
    /// Whether the console can start a reauthorization (`authorize_url` is set).
    pub authorizable: bool,
}

impl Provider {
    pub fn view(&self) -> ProviderView {
        let now = Instant::now();
        let token = self.current();
        let st = self.state();
        let valid = token.as_ref().is_some_and(|t| t.is_valid(now));
        let state = if st.reauth_required {
            ProviderState::ReauthorizationRequired
        } else if st.failures > 0 {
            ProviderState::Failing
        } else if st.flight.in_flight() {
            ProviderState::Refreshing
        } else if !valid {
            ProviderState::Expired
        } else {
            ProviderState::Ready
        };
        // The refresher adds up to a tenth of the margin as jitter: this is the
        // latest it will start.
        let next_refresh_in = if self.is_static() || st.reauth_required || st.flight.in_flight() {
            None
        } else if let Some(at) = st.retry_at {
            Some(at.saturating_duration_since(now))
        } else {
            token
                .as_ref()
                .and_then(|t| match (t.expires_at, t.lifetime) {
                    (Some(exp), Some(life)) => Some(
                        exp.checked_sub(self.margin(life))
                            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
                    ),
                    _ => None,
                })
        };
        ProviderView {
            grant: self.cfg.grant_kind().as_str(),
            state,
            generation: token.as_ref().map(|t| t.generation),
            expires_in: token.as_ref().and_then(|t| t.expires_in(now)),
            next_refresh_in,
            last: st.last.clone(),
            refreshes_ok: self.refreshes_ok.load(Ordering::Relaxed),
            refreshes_failed: self.refreshes_failed.load(Ordering::Relaxed),
            waiters: self.metrics.waiters_total(),
            authorizable: self.cfg.authorize().is_some(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::secret::Secret;
    use crate::token::tests::{unstarted_provider, FakeSource};
    use crate::token::Token;

    fn provider() -> Arc<Provider> {
        unstarted_provider(&FakeSource::new(Duration::ZERO, None), "")
    }

    fn token(p: &Provider) -> Token {
        let life = Some(Duration::from_secs(600));
        Token::new(&p.cfg.scheme, Secret::new("t"), life, None, 1).unwrap()
    }

    #[tokio::test]
    async fn states_in_the_order_a_person_needs_them() {
        let p = provider();
        assert_eq!(p.view().state, ProviderState::Expired, "no token yet");
        p.cell.publish(&Arc::new(token(&p)), |_| true);
        assert_eq!(p.view().state, ProviderState::Ready);
        let next = p.view().next_refresh_in.unwrap();
        // Refreshed a minute (the default margin) before expiry.
        assert!(
            next <= Duration::from_secs(540) && next > Duration::from_secs(530),
            "{next:?}"
        );
        let mut expired = token(&p);
        expired.expires_at = Instant::now().checked_sub(Duration::from_secs(1));
        p.cell.publish(&Arc::new(expired), |_| true);
        assert_eq!(p.view().state, ProviderState::Expired);
        p.state().failures = 1;
        assert_eq!(p.view().state, ProviderState::Failing);
        p.state().reauth_required = true;
        assert_eq!(p.view().state, ProviderState::ReauthorizationRequired);
        assert!(p.view().state.needs_attention());
    }
}
