//! The token side of reauthorization (DESIGN.md, "Reauthorization"): the
//! authorization code the browser brought back is exchanged at the token endpoint,
//! and the refresh and access token it yields become a new generation, persisted
//! like any refresh (so replicas adopt them through the store). The browser side
//! (state, PKCE, redirects) lives in the admin listener.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::cell::Token;
use super::oauth::{GrantRequest, TokenError};
use super::provider::{LastRefresh, Outcome, Provider, Trigger};
use super::refresh::FlightGuard;
use crate::secret::Secret;
use crate::store::StoredToken;

impl Provider {
    /// Exchanges an authorization `code` (with its PKCE `verifier` and the
    /// `redirect_uri` the authorization request named) for a new refresh and access
    /// token, and leaves "reauthorization required" when it works. Runs as the
    /// provider's one token request: a refresh in flight is waited for first, and
    /// requests without a valid token wait on this one. The exchange runs in its
    /// own task, so a browser that goes away never loses the new refresh token.
    pub async fn complete_authorization(
        self: &Arc<Self>,
        code: Secret,
        verifier: Secret,
        redirect_uri: String,
    ) -> Result<Arc<Token>, TokenError> {
        if self.is_static() {
            return Err(TokenError::ClientSetup("not an OAuth provider".into()));
        }
        let landing = loop {
            let pending = {
                let mut st = self.state();
                match st.flight.join() {
                    Some((w, _)) => w,
                    None => {
                        let held = self.current().map(|t| t.generation);
                        let (landing, _) = st.flight.begin(held);
                        st.last_start = Some(Instant::now());
                        break landing;
                    }
                }
            };
            let _ = pending.wait(Duration::from_secs(120)).await;
        };
        let this = self.clone();
        let task = tokio::spawn(async move {
            let mut guard = FlightGuard(Some(this.clone()));
            let started = Instant::now();
            let outcome = this.exchange_code(&code, &verifier, &redirect_uri).await;
            this.finish_authorization(started, &outcome);
            this.state().flight.end();
            guard.0 = None;
            landing.land(outcome.clone());
            outcome
        });
        task.await.unwrap_or(Err(TokenError::Abandoned))
    }

    async fn exchange_code(
        self: &Arc<Self>,
        code: &Secret,
        verifier: &Secret,
        redirect_uri: &str,
    ) -> Outcome {
        let Some(source) = &self.source else {
            return Err(TokenError::ClientSetup("not an OAuth provider".into()));
        };
        let grant = GrantRequest::AuthorizationCode {
            code,
            verifier,
            redirect_uri,
        };
        let resp = source.request(grant).await?;
        let Some(refresh_token) = resp.refresh_token else {
            return Err(TokenError::InvalidResponse(
                "no refresh_token in the answer to the authorization code (does the scope need offline_access?)".into(),
            ));
        };
        let current = self.current();
        let generation = {
            let mut st = self.state();
            let g = st
                .max_generation
                .max(current.as_ref().map_or(0, |c| c.generation))
                + 1;
            st.max_generation = g;
            st.refresh_token = Some(refresh_token.clone());
            g
        };
        let token = Arc::new(
            Token::new(
                &self.cfg.scheme,
                resp.access_token,
                resp.expires_in,
                resp.scope,
                generation,
            )
            .map_err(|e| TokenError::InvalidResponse(e.to_string()))?,
        );
        // As for a rotation: the refresh token is in the store before the access
        // token is served.
        let stored = StoredToken {
            refresh_token: Some(refresh_token),
            ..self.stored_record(&token, None)
        };
        self.persist(stored).await;
        Ok(self.publish_fetched(token))
    }

    /// Bookkeeping of an authorization. A failed one changes nothing about the
    /// provider's refreshes (a working provider keeps working); it is reported.
    fn finish_authorization(&self, started: Instant, outcome: &Outcome) {
        let now = Instant::now();
        let mut st = self.state();
        let error = match outcome {
            Ok(t) => {
                st.failures = 0;
                st.retry_at = None;
                st.reauth_required = false;
                self.refreshes_ok
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.metrics
                    .set_expiry(t.expires_in(now).map(|d| d.as_secs_f64()));
                tracing::info!(provider = %self.name, generation = t.generation,
                    expires_in_s = t.expires_in(now).map(|d| d.as_secs()), "provider authorized");
                None
            }
            Err(e) => {
                self.refreshes_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(provider = %self.name, error = %e, "authorization code exchange failed");
                Some(e.code())
            }
        };
        self.conclude(
            st,
            Trigger::Authorization,
            error,
            started.elapsed(),
            outcome,
        );
    }

    /// The IdP sent the browser back with an `error` instead of a code: shown on
    /// the console and in the audit log as a failed authorization; nothing is
    /// retried and the provider's refreshes are untouched.
    pub fn authorization_refused(&self, error: &str) {
        self.state().last = Some(LastRefresh {
            trigger: Trigger::Authorization,
            outcome: "error",
            at: SystemTime::now(),
            error: Some(error.to_owned()),
        });
        self.record_event(
            Trigger::Authorization,
            "error",
            self.current().map(|t| t.generation),
            None,
            Duration::ZERO,
            Some(error.to_owned()),
        );
    }

    /// Fleet mode: a newer token adopted from the store (another replica's refresh
    /// or authorization) comes with a refresh token that works, so this replica
    /// leaves "reauthorization required" too.
    pub(super) fn adopted_after_reauthorization(&self, before: Option<u64>) {
        if self.current().map(|t| t.generation) <= before {
            return;
        }
        let mut st = self.state();
        if st.reauth_required && st.refresh_token.is_some() {
            st.reauth_required = false;
            st.failures = 0;
            st.retry_at = None;
            drop(st);
            tracing::info!(provider = %self.name, "adopted another replica's token; reauthorization no longer required");
            self.wake.notify_one();
        }
    }
}
