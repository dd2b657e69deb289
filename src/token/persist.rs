//! Persistence and fleet reconciliation: tokens written to the store on refresh,
//! read back at start-up and under the fleet lease, and adopted from other
//! replicas' refreshes. Nothing here runs on the request path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;

use super::cell::Token;
use super::policy;
use super::provider::Provider;
use super::store_handle::{same_client, unix_now, Adopt, StoreFailure, STORE_TIMEOUT};
use crate::secret::Secret;
use crate::store::StoredToken;

impl Provider {
    /// Publishes the stored token when it is what `why` asks for and supersedes the
    /// cell: a newer generation, or the same generation with another token (two
    /// replicas that refreshed while the database was down converge on the stored
    /// row). Also takes the stored refresh token (the newest one always wins over
    /// the configured seed).
    pub(super) async fn adopt_stored(self: &Arc<Self>, why: Adopt) -> Option<Arc<Token>> {
        let startup = why == Adopt::Refresh { above: None };
        let stored = self.load_stored(startup).await?;
        {
            let mut st = self.state();
            st.max_generation = st.max_generation.max(stored.generation);
            // A row older than our token (ours refreshed while the store was
            // unreachable, not saved yet) holds a spent refresh token: keep ours.
            let older = self
                .current()
                .is_some_and(|c| stored.generation < c.generation);
            if let (Some(rt), false) = (&stored.refresh_token, older) {
                st.refresh_token = Some(rt.clone());
            }
        }
        if let Adopt::Refresh { above: Some(g) } = why {
            if stored.generation <= g {
                return None;
            }
        }
        let supersedes = |held: Option<&Token>| {
            held.is_none_or(|c| {
                stored.generation > c.generation
                    || (stored.generation == c.generation && stored.access_token != c.access_token)
            })
        };
        if !supersedes(self.current().as_deref()) {
            return None;
        }
        let now_wall = unix_now();
        let remaining = match stored.expires_at_unix {
            Some(exp) if exp <= now_wall => return None,
            Some(exp) => Some(Duration::from_secs((exp - now_wall) as u64)),
            None => None,
        };
        let lifetime = stored
            .expires_at_unix
            .map(|e| Duration::from_secs((e - stored.obtained_at_unix).max(1) as u64));
        // Instead of a fetch, a token about to need refreshing is not worth taking:
        // fetch now. A notified token is taken whenever it is still valid: ours is
        // older and may already be revoked.
        if why != Adopt::Notified {
            if let (Some(rem), Some(life)) = (remaining, lifetime) {
                if rem <= self.margin(life) {
                    return None;
                }
            }
        }
        let token = Token::new(
            &self.cfg.scheme,
            stored.access_token.clone(),
            remaining,
            stored.scope.clone(),
            stored.generation,
        )
        .ok()?;
        let token = Arc::new(Token { lifetime, ..token });
        if !self.publish(&token, supersedes) {
            return None;
        }
        self.metrics
            .set_expiry(token.expires_in(Instant::now()).map(|d| d.as_secs_f64()));
        // The refresher sleeps until the old token's refresh time; it must re-plan
        // for this one, or it would refresh early and ask the IdP for nothing.
        self.wake.notify_one();
        tracing::info!(provider = %self.name, generation = token.generation, "using stored token");
        Some(token)
    }

    /// The stored token for this provider, if any and obtained with our settings.
    pub(super) async fn load_stored(&self, startup: bool) -> Option<StoredToken> {
        let stored =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.store.load(&self.name)).await {
                // A successful read clears the failing state only when no write
                // is still being retried (a rotated refresh token not yet on disk).
                Ok(Ok(s)) => {
                    self.store.record_read_ok();
                    s?
                }
                Ok(Err(e)) => {
                    self.store.record_failure(StoreFailure::Error(&e));
                    return None;
                }
                Err(_) => {
                    self.store.record_failure(StoreFailure::TimedOut("read"));
                    return None;
                }
            };
        if stored.fingerprint != self.fingerprint {
            // Same client at the same IdP, other scope/audience/resource: the
            // access token does not fit, but the stored refresh token is still the
            // newest one the IdP knows (the configured seed may be spent).
            if startup && same_client(&stored.fingerprint, &self.fingerprint) {
                if let Some(rt) = &stored.refresh_token {
                    self.state().refresh_token = Some(rt.clone());
                }
            }
            if startup {
                tracing::info!(provider = %self.name, "stored token was obtained with other provider settings; not using its access token");
            }
            return None;
        }
        Some(stored)
    }

    /// Writes the token to the store; on failure keeps reconciling with the store
    /// in the background (with backoff) until ours lands or a stored one wins.
    pub(super) async fn persist(self: &Arc<Self>, stored: StoredToken) {
        self.latest_save
            .fetch_max(stored.generation, Ordering::SeqCst);
        if self.try_save(&stored).await {
            return;
        }
        let this = self.clone();
        self.store.pending_saves.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut attempt = 1;
            let mut agreed = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(policy::backoff(attempt, Duration::from_secs(1),
                        Duration::from_secs(60), policy::backoff_fraction())) => {}
                    _ = this.shutdown.cancelled() => break,
                }
                if this.reconcile(true).await {
                    agreed = true;
                    break;
                }
                attempt += 1;
            }
            this.store.pending_saves.fetch_sub(1, Ordering::SeqCst);
            // Store and cell agree again (our save landed, or a newer row was
            // adopted): the store is healthy unless another save is pending.
            if agreed {
                this.store.record_read_ok();
            }
        });
    }

    /// Brings the cell and the store to one token: a stored token that supersedes
    /// ours (newer generation, or the same generation with another token: the row
    /// wins) is adopted; a token of ours newer than the row (refreshed while the
    /// store was unreachable) is saved, and reaches the other replicas from there.
    /// Returns whether the two agree now. `ours_pending`: our save failed and must
    /// still land, even over a row obtained with other provider settings (as any
    /// save of a new token does); a mere notification never fights over such a row,
    /// or replicas running two configurations would overwrite each other forever.
    pub(super) async fn reconcile(self: &Arc<Self>, ours_pending: bool) -> bool {
        if self.is_static() {
            return true;
        }
        if self.adopt_stored(Adopt::Notified).await.is_some() {
            return true;
        }
        let Some(token) = self.current() else {
            return true;
        };
        let stored_generation =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.store.load(&self.name)).await {
                Ok(Ok(Some(s))) if s.fingerprint == self.fingerprint => {
                    if s.generation > token.generation
                        || (s.generation == token.generation
                            && s.access_token == token.access_token)
                    {
                        // In agreement, or a newer row we cannot use (expired): a
                        // refresh will follow either way; ours must not overwrite it.
                        return true;
                    }
                    Some(s.generation)
                }
                Ok(Ok(Some(_))) if !ours_pending => return true,
                Ok(Ok(_)) => None,
                // Unreachable: try the save anyway, it reports the failure.
                Ok(Err(_)) | Err(_) => None,
            };
        let refresh_token = self.state().refresh_token.clone();
        let stored = self.stored_record(&token, refresh_token);
        if stored_generation.is_some() {
            tracing::info!(provider = %self.name, generation = token.generation,
                "token store reachable again; saving the token refreshed while it was not");
        }
        self.try_save(&stored).await
    }

    /// The store's record of `token` (wall-clock times, for the next start-up).
    pub(super) fn stored_record(
        &self,
        token: &Token,
        refresh_token: Option<Secret>,
    ) -> StoredToken {
        let obtained_at_unix = token
            .obtained_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        StoredToken {
            access_token: token.access_token.clone(),
            refresh_token,
            token_type: "Bearer".into(),
            scope: token.scope.clone(),
            expires_at_unix: token
                .lifetime
                .map(|l| obtained_at_unix + l.as_secs() as i64),
            generation: token.generation,
            obtained_at_unix,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Saves `stored` unless a newer token was handed to `persist` meanwhile (then
    /// there is nothing left to do: true).
    pub(super) async fn try_save(&self, stored: &StoredToken) -> bool {
        let _saving = self.save_lock.lock().await;
        if self.latest_save.load(Ordering::SeqCst) > stored.generation {
            return true;
        }
        match tokio::time::timeout(STORE_TIMEOUT, self.store.store.save(&self.name, stored)).await {
            Ok(Ok(())) => {
                self.store.record_ok();
                true
            }
            Ok(Err(e)) => {
                self.store.record_failure(StoreFailure::Error(&e));
                false
            }
            Err(_) => {
                self.store.record_failure(StoreFailure::TimedOut("write"));
                false
            }
        }
    }

    /// Fleet mode: the stored token changed (another replica's refresh) or the
    /// store is reachable again after an outage: converge with it.
    pub async fn on_store_change(self: &Arc<Self>) {
        let before = self.current().map(|t| t.generation);
        let _ = self.reconcile(false).await;
        self.adopted_after_reauthorization(before);
    }
}
