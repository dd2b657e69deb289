//! Token lifecycle (DESIGN.md, "Token lifecycle"). Each provider holds its current
//! token in a lock-free cell with a generation number. Requests read the cell and
//! nothing else. Refreshes are single flight: one token request per provider at a
//! time, run in its own task (a waiter giving up never cancels it — a rotated
//! refresh token must never be lost mid-flight), every waiter sharing its result.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditSink;
use crate::config::{Grant, ProviderConfig};
use crate::metrics::ProviderMetrics;
use crate::secret::Secret;
use crate::store::{StoredToken, TokenStore};

mod authorize;
mod events;
pub mod oauth;
pub mod policy;
pub mod source;
#[cfg(test)]
mod tests;

pub use source::{OAuthSource, TokenSource};
mod view;

pub use events::{TokenEventRecord, TokenEvents, EVENTS_KEPT};
pub use view::{ProviderState, ProviderView};

use oauth::{GrantRequest, Retry, TokenError};
use policy::Policy;

const STORE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Why a request cannot have a token now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Startup,
    Expiry,
    Unauthorized,
    Manual,
    /// A new refresh token from the console's authorization flow.
    Authorization,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Expiry => "expiry",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Manual => "manual",
            Trigger::Authorization => "authorization",
        }
    }
}

/// Why the stored token is being read: what it must be to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adopt {
    /// As the result of a refresh, instead of asking the IdP (start-up, or under
    /// the fleet lease): must be of a generation above `above` (the one held when
    /// the refresh was asked for) and valid beyond the refresh margin.
    Refresh { above: Option<u64> },
    /// Another replica's refresh: must supersede ours and be valid.
    Notified,
}

/// Shared by every provider: where tokens are persisted and how health shows.
#[derive(Debug)]
pub struct StoreHandle {
    pub store: Arc<dyn TokenStore>,
    failing: std::sync::atomic::AtomicBool,
    /// Saves still being retried. While any is pending, a successful read does not
    /// mean the store is healthy (a rotated refresh token may not be on disk yet).
    pending_saves: std::sync::atomic::AtomicUsize,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl StoreHandle {
    pub fn new(store: Arc<dyn TokenStore>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            failing: false.into(),
            pending_saves: 0.into(),
            metrics,
        })
    }

    /// Whether durability is degraded: the last write failed, or the backend
    /// (fleet database) is unreachable.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) || !self.store.healthy()
    }

    /// A read succeeded: the store works again, unless a write is still pending.
    pub fn record_read_ok(&self) {
        if self.pending_saves.load(Ordering::SeqCst) == 0 {
            self.record(&Ok(()));
        }
    }

    /// Records an outcome; logs only when the state changes (not per attempt).
    pub fn record(&self, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(store = self.store.kind(), "token store recovered");
                }
            }
            Err(e) => {
                self.metrics.store_error();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(store = self.store.kind(), error = %e, "token store failing; serving from memory");
                }
            }
        }
    }
}

type Outcome = Result<Arc<Token>, TokenError>;

/// The refresh in flight: where its outcome will be published, and the generation
/// held when it was asked for (its result is above that generation, or an error).
#[derive(Debug)]
struct Flight {
    outcome: watch::Receiver<Option<Outcome>>,
    above: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastRefresh {
    pub trigger: Trigger,
    pub outcome: &'static str,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub error: Option<String>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

/// Mutable refresh bookkeeping. Touched by refreshes, `/status` and requests whose
/// token is missing or expired — never by a request holding a valid token.
#[derive(Debug, Default)]
struct State {
    flight: Option<Flight>,
    last_start: Option<Instant>,
    /// Set after a failure: the next attempt is not before this.
    retry_at: Option<Instant>,
    failures: u32,
    reauth_required: bool,
    last: Option<LastRefresh>,
    /// `refresh_token` grant: the newest refresh token (rotations replace it).
    refresh_token: Option<Secret>,
    /// Highest generation seen anywhere (store, fleet), so new ones only grow.
    max_generation: u64,
}

/// Why a provider cannot be built (start-up or reload).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("{0}")]
    Token(String),
}

/// One configured provider: its token cell and the machinery that keeps it fresh.
pub struct Provider {
    pub name: Arc<str>,
    pub cfg: ProviderConfig,
    cell: ArcSwapOption<Token>,
    state: Mutex<State>,
    wake: Notify,
    /// `None` for a `static` provider: its token never changes.
    source: Option<Arc<dyn TokenSource>>,
    store: Arc<StoreHandle>,
    metrics: ProviderMetrics,
    audit: Option<AuditSink>,
    events: Arc<TokenEvents>,
    fingerprint: String,
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
    /// How many refreshes in a row the upstream rejected too (replay got 401):
    /// each one doubles the spacing of 401-driven refreshes.
    useless_streak: AtomicU64,
    /// The generation last counted in `useless_streak` (counted once each).
    useless_generation: AtomicU64,
    /// Highest generation handed to `persist`. A retried save of an older token
    /// checks it under `save_lock`, so it can never overwrite a newer record (for
    /// `refresh_token`, that would put a spent refresh token back on disk).
    latest_save: AtomicU64,
    save_lock: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Everything a provider needs besides its config.
#[derive(Debug, Clone)]
pub struct ProviderDeps {
    pub store: Arc<StoreHandle>,
    pub metrics: ProviderMetrics,
    pub audit: Option<AuditSink>,
    pub shutdown: CancellationToken,
    /// `[outbound]`: token endpoints go through the egress proxy too.
    pub proxy: crate::outbound::egress::EgressProxy,
    /// The console's ring of recent token events.
    pub events: Arc<TokenEvents>,
}

impl Provider {
    /// Loads the provider's secrets and builds its token-endpoint client. A
    /// `static` provider holds its token from here on.
    pub fn new(cfg: ProviderConfig, deps: ProviderDeps) -> Result<Arc<Self>, ProviderError> {
        let source = match cfg.oauth() {
            Some(client) => {
                Some(Arc::new(OAuthSource::new(client, &deps.proxy)?) as Arc<dyn TokenSource>)
            }
            None => None,
        };
        Self::with_source(cfg, deps, source)
    }

    /// A provider asking `source` for its tokens (`None`: a `static` provider).
    pub fn with_source(
        cfg: ProviderConfig,
        deps: ProviderDeps,
        source: Option<Arc<dyn TokenSource>>,
    ) -> Result<Arc<Self>, ProviderError> {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let seed = match &cfg.grant {
            Grant::RefreshToken {
                initial_refresh_token: Some(src),
                ..
            } => Some(src.load()?),
            _ => None,
        };
        let fingerprint = fingerprint(&cfg);
        let provider = Arc::new(Provider {
            name,
            source,
            store: deps.store,
            metrics: deps.metrics,
            audit: deps.audit,
            events: deps.events,
            fingerprint,
            cell: ArcSwapOption::empty(),
            state: Mutex::new(State {
                refresh_token: seed,
                ..State::default()
            }),
            wake: Notify::new(),
            refreshes_ok: AtomicU64::new(0),
            refreshes_failed: AtomicU64::new(0),
            useless_streak: AtomicU64::new(0),
            useless_generation: AtomicU64::new(0),
            latest_save: AtomicU64::new(0),
            save_lock: tokio::sync::Mutex::new(()),
            shutdown: deps.shutdown,
            cfg,
        });
        if let Grant::Static { token } = &provider.cfg.grant {
            let value = token.load()?;
            let t = provider
                .make_token(value, None, None, 1)
                .map_err(ProviderError::Token)?;
            provider.cell.store(Some(Arc::new(t)));
            provider.metrics.set_expiry(None);
        }
        Ok(provider)
    }

    /// Starts the background refresher (OAuth grants only): the first token is
    /// fetched now, then kept fresh before it expires.
    pub fn start(self: &Arc<Self>) {
        if self.source.is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move { this.run().await });
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still consistent
        // enough to keep serving (every field is valid on its own).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_static(&self) -> bool {
        self.source.is_none()
    }

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

    /// The request path: the current credential if valid — a load from the cell and
    /// nothing else. Without one, waits on the refresh in flight (or the first
    /// fetch), bounded by `wait`, or fails fast while the IdP is failing. `now` is
    /// when the request arrived: its path reads the clock once.
    pub async fn credential(
        self: &Arc<Self>,
        now: Instant,
        wait: Duration,
    ) -> Result<Credential, Unavailable> {
        {
            let guard = self.cell.load();
            if let Some(t) = guard.as_ref() {
                if t.is_valid(now) {
                    return Ok(Credential {
                        header_value: t.header_value.clone(),
                        generation: t.generation,
                    });
                }
            }
        }
        let rx = {
            let mut st = self.state();
            if st.reauth_required {
                return Err(self.unavailable(&st));
            }
            match &st.flight {
                Some(f) => f.outcome.clone(),
                None if st.retry_at.is_some() => return Err(self.unavailable(&st)),
                None => self.launch(&mut st, self.background_trigger()),
            }
        };
        self.metrics.waiter();
        // Boxed: waiting is the rare path; inline it would size every request.
        match Box::pin(wait_outcome(rx, wait)).await {
            Ok(t) if t.is_valid(Instant::now()) => Ok(Credential {
                header_value: t.header_value.clone(),
                generation: t.generation,
            }),
            _ => Err(self.unavailable(&self.state())),
        }
    }

    fn unavailable(&self, st: &State) -> Unavailable {
        let now = Instant::now();
        let retry_after = st
            .retry_at
            .map_or(Duration::from_secs(1), |r| r.saturating_duration_since(now));
        let reason = if st.reauth_required {
            "reauthorization required".to_owned()
        } else if let Some(last) = st.last.as_ref().filter(|l| l.outcome == "error") {
            format!(
                "token request failed ({})",
                last.error.as_deref().unwrap_or("error")
            )
        } else {
            "token not obtained yet".to_owned()
        };
        Unavailable {
            reason,
            retry_after: retry_after.max(Duration::from_secs(1)),
        }
    }

    /// After an upstream 401 (with `invalid_token`, or no error named) for a request
    /// that sent generation `sent`: the credential to replay with, if any. A newer
    /// token is returned at once; otherwise one refresh is started or joined, unless
    /// one ran within `min_refresh_interval`.
    pub async fn after_unauthorized(
        self: &Arc<Self>,
        sent: u64,
        wait: Duration,
    ) -> Option<Credential> {
        if self.is_static() {
            return None;
        }
        let newer = |t: &Token| {
            (t.generation > sent && t.is_valid(Instant::now())).then(|| Credential {
                header_value: t.header_value.clone(),
                generation: t.generation,
            })
        };
        if let Some(c) = self.cell.load().as_deref().and_then(newer) {
            return Some(c);
        }
        let deadline = Instant::now() + wait;
        let mut waiting = false;
        loop {
            let (rx, covers) = {
                let mut st = self.state();
                // Re-check under the lock: a refresh may have landed since.
                if let Some(c) = self.cell.load().as_deref().and_then(newer) {
                    return Some(c);
                }
                match &st.flight {
                    // A refresh asked for while an older generation was held (the
                    // start-up fetch, say) may end with the very generation rejected
                    // here: wait for it, then ask for one of our own.
                    Some(f) => (f.outcome.clone(), f.above.is_some_and(|g| g >= sent)),
                    None => {
                        if st.reauth_required {
                            return None;
                        }
                        let recent = st
                            .last_start
                            .is_some_and(|t| t.elapsed() < self.refresh_spacing());
                        if recent {
                            return None;
                        }
                        tracing::debug!(provider = %self.name, sent, "refresh after a 401");
                        (self.launch(&mut st, Trigger::Unauthorized), true)
                    }
                }
            };
            if !std::mem::replace(&mut waiting, true) {
                self.metrics.waiter();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_outcome(rx, left).await {
                Ok(t) if newer(&t).is_some() => return newer(&t),
                Err(TokenError::Abandoned) => return None,
                _ if covers => return None,
                _ => {}
            }
        }
    }

    /// The upstream rejected a replay made with `generation`: the refresh did not
    /// help (the API rejects every token), so 401s wait longer before the next one.
    pub fn replay_rejected(&self, generation: u64) {
        if self.useless_generation.swap(generation, Ordering::Relaxed) != generation {
            self.useless_streak.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The upstream accepted a token: 401-driven refreshes are back to normal
    /// spacing. A relaxed load per request; a store only after a streak.
    pub fn token_accepted(&self) {
        if self.useless_streak.load(Ordering::Relaxed) != 0 {
            self.useless_streak.store(0, Ordering::Relaxed);
        }
    }

    /// How far apart 401-driven refreshes must be now (see `Policy::spacing`).
    fn refresh_spacing(&self) -> Duration {
        self.policy()
            .spacing(self.useless_streak.load(Ordering::Relaxed))
    }

    fn policy(&self) -> Policy {
        Policy {
            refresh_before: self.cfg.refresh_before,
            min_refresh_interval: self.cfg.min_refresh_interval,
        }
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
        let rx = {
            let mut st = self.state();
            match &st.flight {
                Some(f) => f.outcome.clone(),
                None => self.launch(&mut st, trigger),
            }
        };
        wait_outcome(rx, wait).await
    }

    /// What a refresh not caused by a 401 is: the first fetch, or one for expiry.
    fn background_trigger(&self) -> Trigger {
        if self.cell.load().is_none() {
            Trigger::Startup
        } else {
            Trigger::Expiry
        }
    }

    /// Starts a refresh task. Called with the state lock held, so two callers can
    /// never both start one.
    fn launch(
        self: &Arc<Self>,
        st: &mut State,
        trigger: Trigger,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        let held = self.current();
        st.flight = Some(Flight {
            outcome: rx.clone(),
            above: held.as_ref().map(|t| t.generation),
        });
        st.last_start = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            let mut guard = FlightGuard(Some(this.clone()));
            let started = Instant::now();
            let outcome = this.obtain(trigger, held).await;
            this.finish(trigger, started, &outcome);
            // Clear the flight before publishing the outcome: a waiter that wakes
            // and immediately needs another refresh must be able to start one.
            this.state().flight = None;
            guard.0 = None;
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    fn finish(&self, trigger: Trigger, started: Instant, outcome: &Outcome) {
        let elapsed = started.elapsed();
        let now = Instant::now();
        let mut st = self.state();
        let (outcome_str, error) = match outcome {
            Ok(t) => {
                st.failures = 0;
                st.retry_at = None;
                st.reauth_required = false;
                self.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .set_expiry(t.expires_in(now).map(|d| d.as_secs_f64()));
                tracing::info!(provider = %self.name, trigger = trigger.as_str(), generation = t.generation,
                    expires_in_s = t.expires_in(now).map(|d| d.as_secs()), "token refreshed");
                ("ok", None)
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
                ("error", Some(e.code()))
            }
        };
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
                self.store.record(&Err(e.to_string()));
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

    /// Publishes the stored token when it is what `why` asks for and supersedes the
    /// cell: a newer generation, or the same generation with another token (two
    /// replicas that refreshed while the database was down converge on the stored
    /// row). Also takes the stored refresh token (the newest one always wins over
    /// the configured seed).
    async fn adopt_stored(self: &Arc<Self>, why: Adopt) -> Option<Arc<Token>> {
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
        let token = self
            .make_token(
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

    /// The current token if its generation is above `above` (any, when `None`) and
    /// it is valid beyond the refresh margin.
    fn newer_than(&self, above: Option<u64>) -> Option<Arc<Token>> {
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
    fn publish(&self, token: &Arc<Token>, replaces: impl FnOnce(Option<&Token>) -> bool) -> bool {
        let _st = self.state();
        let held = self.cell.load();
        if !replaces(held.as_deref()) {
            return false;
        }
        self.cell.store(Some(token.clone()));
        true
    }

    /// The stored token for this provider, if any and obtained with our settings.
    async fn load_stored(&self, startup: bool) -> Option<StoredToken> {
        let stored =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.store.load(&self.name)).await {
                // A successful read clears the failing state only when no write
                // is still being retried (a rotated refresh token not yet on disk).
                Ok(Ok(s)) => {
                    self.store.record_read_ok();
                    s?
                }
                Ok(Err(e)) => {
                    self.store.record(&Err(e.to_string()));
                    return None;
                }
                Err(_) => {
                    self.store.record(&Err("store read timed out".into()));
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
            self.make_token(resp.access_token, resp.expires_in, resp.scope, generation)
                .map_err(TokenError::InvalidResponse)?,
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

    /// Publishes a token from the IdP; the one held then if that is newer (another
    /// replica's, adopted meanwhile: the fleet's token wins).
    fn publish_fetched(&self, token: Arc<Token>) -> Arc<Token> {
        let generation = token.generation;
        if self.publish(&token, |held| {
            held.is_none_or(|h| h.generation <= generation)
        }) {
            return token;
        }
        self.current().unwrap_or(token)
    }

    /// Writes the token to the store; on failure keeps reconciling with the store
    /// in the background (with backoff) until ours lands or a stored one wins.
    async fn persist(self: &Arc<Self>, stored: StoredToken) {
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
    async fn reconcile(self: &Arc<Self>, ours_pending: bool) -> bool {
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
    fn stored_record(&self, token: &Token, refresh_token: Option<Secret>) -> StoredToken {
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
    async fn try_save(&self, stored: &StoredToken) -> bool {
        let _saving = self.save_lock.lock().await;
        if self.latest_save.load(Ordering::SeqCst) > stored.generation {
            return true;
        }
        let res =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.store.save(&self.name, stored))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("store write timed out".to_owned()),
            };
        let ok = res.is_ok();
        self.store.record(&res);
        ok
    }

    fn make_token(
        &self,
        value: Secret,
        lifetime: Option<Duration>,
        scope: Option<String>,
        generation: u64,
    ) -> Result<Token, String> {
        let text = if self.cfg.scheme.is_empty() {
            value.expose().to_owned()
        } else {
            format!("{} {}", self.cfg.scheme, value.expose())
        };
        let mut header_value = HeaderValue::from_maybe_shared(Bytes::from(text))
            .map_err(|_| "token has characters not allowed in a header".to_owned())?;
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

    /// How long before expiry a token is refreshed.
    fn margin(&self, lifetime: Duration) -> Duration {
        self.policy().margin(lifetime)
    }

    /// The background refresher: fetch at start-up, then before each expiry, and
    /// retry failures with backoff. Requests never wait for it unless they have no
    /// valid token.
    async fn run(self: Arc<Self>) {
        loop {
            let due = self.next_due();
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.wake.notified() => continue,
                _ = self.shutdown.cancelled() => return,
            }
            let rx = {
                let mut st = self.state();
                if st.reauth_required {
                    continue;
                }
                match &st.flight {
                    Some(f) => f.outcome.clone(),
                    None => self.launch(&mut st, self.background_trigger()),
                }
            };
            tokio::select! {
                _ = wait_outcome(rx, Duration::from_secs(3600)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let st = self.state();
        if st.flight.is_some() {
            // finish() wakes us when it lands.
            return None;
        }
        if st.reauth_required {
            return None;
        }
        if let Some(at) = st.retry_at {
            return Some(at);
        }
        let token = self.cell.load_full();
        match token.as_deref() {
            None => Some(Instant::now()),
            Some(Token {
                expires_at: Some(exp),
                lifetime: Some(life),
                ..
            }) => Some(
                self.policy()
                    .refresh_at(*exp, *life, policy::refresh_jitter()),
            ),
            Some(_) => None,
        }
    }

    /// Sets `authgate_token_expiry_seconds` to the seconds left now (-1 when the
    /// token has no known expiry, or there is none).
    pub fn export_expiry(&self) {
        let left = self.current().and_then(|t| t.expires_in(Instant::now()));
        self.metrics.set_expiry(left.map(|d| d.as_secs_f64()));
    }

    /// Stops the background refresher of a provider a reload replaced, so two
    /// refreshers never rotate the same refresh token.
    pub fn retire(&self) {
        self.shutdown.cancel();
    }

    /// Fleet mode: the stored token changed (another replica's refresh) or the
    /// store is reachable again after an outage: converge with it.
    pub async fn on_store_change(self: &Arc<Self>) {
        let before = self.current().map(|t| t.generation);
        let _ = self.reconcile(false).await;
        self.adopted_after_reauthorization(before);
    }

    pub fn status(&self) -> ProviderStatus {
        let now = Instant::now();
        let token = self.current();
        let st = self.state();
        ProviderStatus {
            grant: self.cfg.grant_kind().as_str(),
            ready: token.as_ref().is_some_and(|t| t.is_valid(now)),
            generation: token.as_ref().map(|t| t.generation),
            expires_in_s: token
                .as_ref()
                .and_then(|t| t.expires_in(now))
                .map(|d| d.as_secs()),
            scope: token.as_ref().and_then(|t| t.scope.clone()),
            refreshing: st.flight.is_some(),
            reauth_required: st.reauth_required,
            retry_in_s: st
                .retry_at
                .map(|r| r.saturating_duration_since(now).as_secs()),
            last_refresh: st.last.clone(),
            refreshes_ok: self.refreshes_ok.load(Ordering::Relaxed),
            refreshes_failed: self.refreshes_failed.load(Ordering::Relaxed),
        }
    }

    /// Why the provider is not ready, for `/readyz`.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        Some(self.unavailable(&self.state()).reason)
    }
}

/// `/status` view of one provider. Never a secret.
#[derive(Debug, Serialize)]
pub struct ProviderStatus {
    pub grant: &'static str,
    pub ready: bool,
    pub generation: Option<u64>,
    pub expires_in_s: Option<u64>,
    pub scope: Option<String>,
    pub refreshing: bool,
    pub reauth_required: bool,
    pub retry_in_s: Option<u64>,
    pub last_refresh: Option<LastRefresh>,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
}

/// Ends a refresh flight whose task unwound (a panic) instead of finishing: a flight
/// left set would make every later request wait on a refresh that never comes and
/// stop the background refresher for good.
struct FlightGuard(Option<Arc<Provider>>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            {
                let mut st = p.state();
                st.flight = None;
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

async fn wait_outcome(mut rx: watch::Receiver<Option<Outcome>>, wait: Duration) -> Outcome {
    match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(v)) => v.clone().unwrap_or(Err(TokenError::Abandoned)),
        _ => Err(TokenError::Abandoned),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Identifies the settings a token was obtained with; a stored token for other
/// settings (another client, scope or IdP) is never used. Two halves: the client
/// (grant, token endpoint, client id), then what the token is for (scope, audience,
/// resource), so a refresh token can outlive a scope change.
fn fingerprint(cfg: &ProviderConfig) -> String {
    let hash = |parts: &[&str]| -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in parts {
            ctx.update(part.as_bytes());
            ctx.update(b"\0");
        }
        ctx.finish()
            .as_ref()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let (client, purpose) = match cfg.oauth() {
        Some(c) => (
            hash(&[
                cfg.grant_kind().as_str(),
                &c.token_url.to_string(),
                &c.client_id,
            ]),
            hash(&[
                c.scope.as_deref().unwrap_or(""),
                c.audience.as_deref().unwrap_or(""),
                c.resource.as_deref().unwrap_or(""),
            ]),
        ),
        None => (hash(&[cfg.grant_kind().as_str()]), hash(&[])),
    };
    format!("{client}-{purpose}")
}

/// Whether two fingerprints name the same client (their first halves match).
fn same_client(a: &str, b: &str) -> bool {
    match (a.split_once('-'), b.split_once('-')) {
        (Some((x, _)), Some((y, _))) => x == y,
        _ => false,
    }
}
