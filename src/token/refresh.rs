//! A refresh from launch to its record: the flight's task, the decision where the
//! new token comes from (the cell, the store, the IdP), and what a finished
//! refresh leaves behind (`/status`, metrics, the event ring, the audit log).

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::cell::Token;
use super::flight::Waiter;
use super::oauth::{GrantRequest, Retry, TokenError};
use super::policy;
use super::provider::{LastRefresh, Outcome, Provider, State, Trigger};
use super::store_handle::{Adopt, StoreFailure};
use crate::audit::TokenEvent;
use crate::config::Grant;
use crate::store::StoredToken;

/// Ends a refresh flight whose task unwound (a panic) instead of finishing: a flight
/// left set would make every later request wait on a refresh that never comes and
/// stop the background refresher for good. Its waiters learn of it from the
/// flight's landing, dropped with the task.
pub(super) struct FlightGuard(pub(super) Option<Arc<Provider>>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            {
                let mut st = p.state();
                st.flight.end();
                st.failures = st.failures.saturating_add(1);
                let delay = policy::retry_delay(
                    Retry::Transient(None),
                    st.failures,
                    policy::backoff_fraction(),
                );
                st.retry_at = delay.map(|d| Instant::now() + d);
            }
            // A runtime shutting down drops the task too: nothing to report then.
            if !p.shutdown.is_cancelled() {
                tracing::error!(provider = %p.name, "token refresh task ended abnormally");
            }
            p.wake.notify_one();
        }
    }
}

impl Provider {
    /// Starts a refresh task. Called with the state lock held, so two callers can
    /// never both start one.
    pub(super) fn launch(self: &Arc<Self>, st: &mut State, trigger: Trigger) -> Waiter<Outcome> {
        let held = self.current();
        let (landing, waiter) = st.flight.begin(held.as_ref().map(|t| t.generation));
        st.last_start = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            let mut guard = FlightGuard(Some(this.clone()));
            let started = Instant::now();
            let outcome = this.obtain(trigger, held).await;
            this.finish(trigger, started, &outcome);
            // Clear the flight before publishing the outcome: a waiter that wakes
            // and immediately needs another refresh must be able to start one.
            this.state().flight.end();
            guard.0 = None;
            landing.land(outcome);
        });
        waiter
    }

    /// Asks for a refresh now (admin or CLI); returns its outcome.
    pub async fn refresh_now(
        self: &Arc<Self>,
        trigger: Trigger,
        wait: Duration,
    ) -> Result<Arc<Token>, TokenError> {
        if self.is_static() {
            return self.current().ok_or(TokenError::Abandoned);
        }
        let waiter = {
            let mut st = self.state();
            match st.flight.join() {
                Some((w, _)) => w,
                None => self.launch(&mut st, trigger),
            }
        };
        waiter
            .wait(wait)
            .await
            .unwrap_or(Err(TokenError::Abandoned))
    }

    /// Gets a new token for a refresh asked for while `held` was in the cell (none
    /// at start-up): from the cell or the store when another replica's refresh got
    /// there first (fleet mode), or from a stored token at start-up, else from the
    /// IdP.
    ///
    /// The refresh's invariant: its result is a token of a generation above
    /// `held`'s, or an error. Adopting from the cell or the store only ever takes a
    /// higher generation, so a refresh can never "succeed" with the token it was
    /// asked to replace. The IdP alone may answer with the very token held (it
    /// caches tokens): that renews an expiring token, but a refresh asked for
    /// because the upstream rejected that token ends with `TokenError::Unchanged`,
    /// and no caller is replayed with the rejected token.
    async fn obtain(self: &Arc<Self>, trigger: Trigger, held: Option<Arc<Token>>) -> Outcome {
        let above = held.as_ref().map(|t| t.generation);
        // Fleet mode: one refresh across all replicas. A store that cannot lock
        // (database down) must not stop us: refresh locally, degraded.
        let lease = match tokio::time::timeout(
            Duration::from_secs(35),
            self.store.store.lock_refresh(&self.name),
        )
        .await
        {
            Ok(Ok(lease)) => lease,
            Ok(Err(e)) => {
                self.store.record_failure(StoreFailure::Error(&e));
                tracing::warn!(provider = %self.name, error = %e, "fleet lock unavailable; refreshing locally (degraded)");
                None
            }
            Err(_) => {
                tracing::warn!(provider = %self.name, "fleet lock timed out; refreshing locally (degraded)");
                None
            }
        };
        // While we waited for the lease, another replica's token may have reached
        // the cell by notification: the refresh we were asked for has happened.
        if let Some(t) = self.newer_than(above) {
            return Ok(t);
        }
        // The store is worth a read when we hold nothing yet (a restart keeps its
        // token) and under the fleet lease (the last holder saved its token before
        // letting go of it).
        if above.is_none() || lease.is_some() {
            if let Some(t) = self.adopt_stored(Adopt::Refresh { above }).await {
                return Ok(t);
            }
            // A notification may have adopted the same stored token just before
            // our read: then it did not supersede the cell, yet it is our result.
            if let Some(t) = self.newer_than(above) {
                return Ok(t);
            }
        }
        tracing::debug!(provider = %self.name, trigger = trigger.as_str(), leased = lease.is_some(),
            held = above, current = self.current().map(|t| t.generation),
            "asking the IdP for a token");
        // Holding the fleet lease, the new token must be in the store before the
        // lease goes: the next replica to take it re-reads the store and would
        // otherwise ask the IdP again.
        let result = self.fetch(lease.is_some()).await;
        drop(lease);
        match result {
            Ok(t)
                if trigger == Trigger::Unauthorized && above.is_some_and(|g| t.generation <= g) =>
            {
                Err(TokenError::Unchanged)
            }
            other => other,
        }
    }

    /// Asks the IdP. `leased`: we hold the fleet lease, so the first save is awaited
    /// before returning (the lease is released after).
    async fn fetch(self: &Arc<Self>, leased: bool) -> Outcome {
        let Some(source) = &self.source else {
            return Err(TokenError::ClientSetup("not an OAuth provider".into()));
        };
        let refresh_token = self.state().refresh_token.clone();
        let grant = match (&self.cfg.grant, &refresh_token) {
            (Grant::RefreshToken { .. }, Some(rt)) => GrantRequest::RefreshToken(rt),
            (Grant::RefreshToken { .. }, None) => return Err(TokenError::NoRefreshToken),
            _ => GrantRequest::ClientCredentials,
        };
        let is_refresh = matches!(grant, GrantRequest::RefreshToken(_));
        let resp = match source.request(grant).await {
            Ok(r) => r,
            Err(TokenError::OAuth { code, .. }) if is_refresh && code == "invalid_grant" => {
                return Err(TokenError::ReauthRequired)
            }
            Err(e) => {
                if let TokenError::ProxyAuth {
                    from_response: true,
                    ..
                } = e
                {
                    self.metrics.proxy_auth_failure();
                }
                return Err(e);
            }
        };
        let current = self.current();
        let same = current
            .as_ref()
            .is_some_and(|c| c.access_token == resp.access_token);
        let generation = {
            let mut st = self.state();
            let base = st
                .max_generation
                .max(current.as_ref().map_or(0, |c| c.generation));
            // The same token keeps its generation: nothing new to replay with.
            let g = match &current {
                Some(c) if same => c.generation,
                _ => base + 1,
            };
            st.max_generation = st.max_generation.max(g);
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
        let stored = self.stored_record(&token, None);
        if is_refresh {
            // Rotation: the newest refresh token replaces the old one, and is
            // persisted before the access token is served — a crash after this
            // point must not leave only a spent refresh token on disk.
            let newest = {
                let mut st = self.state();
                if let Some(rt) = resp.refresh_token {
                    st.refresh_token = Some(rt);
                }
                st.refresh_token.clone()
            };
            let stored = StoredToken {
                refresh_token: newest,
                ..stored
            };
            self.persist(stored).await;
            return Ok(self.publish_fetched(token));
        }
        let token = self.publish_fetched(token);
        if leased {
            self.persist(stored).await;
        } else {
            let this = self.clone();
            tokio::spawn(async move { this.persist(stored).await });
        }
        Ok(token)
    }

    fn finish(&self, trigger: Trigger, started: Instant, outcome: &Outcome) {
        let elapsed = started.elapsed();
        let now = Instant::now();
        let mut st = self.state();
        let error = match outcome {
            Ok(t) => {
                st.failures = 0;
                st.retry_at = None;
                st.reauth_required = false;
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .set_expiry(t.expires_in(now).map(|d| d.as_secs_f64()));
                tracing::info!(provider = %self.name, trigger = trigger.as_str(), generation = t.generation,
                    expires_in_s = t.expires_in(now).map(|d| d.as_secs()), "token refreshed");
                None
            }
            Err(e) => {
                self.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                let retry = e.retry();
                // `None`: the IdP works and the token it holds is still ours.
                let delay = policy::retry_delay(retry, st.failures + 1, policy::backoff_fraction());
                match delay {
                    Some(delay) => {
                        st.failures = st.failures.saturating_add(1);
                        st.retry_at = Some(now + delay);
                    }
                    None => {
                        st.failures = 0;
                        st.retry_at = None;
                    }
                }
                let retry_in_s = delay.map(|d| d.as_secs());
                match retry {
                    Retry::Transient(_) => {
                        tracing::warn!(provider = %self.name, trigger = trigger.as_str(),
                        error = %e, retry_in_s, "token request failed")
                    }
                    Retry::Slow => {
                        tracing::error!(provider = %self.name, trigger = trigger.as_str(),
                        error = %e, retry_in_s,
                        "token endpoint rejected the client; check the provider's credentials")
                    }
                    Retry::Never => {
                        st.reauth_required = true;
                        tracing::error!(provider = %self.name, error = %e,
                            "reauthorization required")
                    }
                    Retry::Unneeded => {
                        tracing::warn!(provider = %self.name, trigger = trigger.as_str(),
                        error = %e, "not replaying")
                    }
                }
                Some(e.code())
            }
        };
        self.conclude(st, trigger, error, elapsed, outcome);
    }

    /// The record of a refresh that ended: `/status`'s last refresh (`st` is released
    /// before anything else), the metric, the event ring and the audit line; then
    /// the background refresher re-plans.
    pub(super) fn conclude(
        &self,
        mut st: MutexGuard<'_, State>,
        trigger: Trigger,
        error: Option<String>,
        elapsed: Duration,
        outcome: &Outcome,
    ) {
        let outcome_str = if outcome.is_ok() { "ok" } else { "error" };
        let now = Instant::now();
        st.last = Some(LastRefresh {
            trigger,
            outcome: outcome_str,
            at: SystemTime::now(),
            error: error.clone(),
        });
        drop(st);
        let (generation, expires_in_s) = match outcome {
            Ok(t) => (Some(t.generation), t.expires_in(now).map(|d| d.as_secs())),
            Err(_) => (self.current().map(|t| t.generation), None),
        };
        self.record_event(
            trigger,
            outcome_str,
            generation,
            expires_in_s,
            elapsed,
            error,
        );
        self.wake.notify_one();
    }

    /// Reports one token event: metrics, the console's ring, the audit log.
    pub(super) fn record_event(
        &self,
        trigger: Trigger,
        outcome: &'static str,
        generation: Option<u64>,
        expires_in_s: Option<u64>,
        elapsed: Duration,
        error: Option<String>,
    ) {
        self.metrics.refresh(trigger.as_str(), outcome);
        let ev = TokenEvent {
            ts: SystemTime::now(),
            event: "token_refresh",
            provider: self.name.clone(),
            trigger: trigger.as_str(),
            outcome,
            generation,
            expires_in_s,
            duration_ms: elapsed.as_millis() as u64,
            error,
        };
        if let Some(audit) = &self.audit {
            audit.token(ev.clone());
        }
        self.events.push(ev);
    }
}
