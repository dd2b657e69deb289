//! One configured provider: its token cell and the bookkeeping that keeps it
//! fresh, and its public face: the request path's `credential` and
//! `after_unauthorized`, the background refresher, `/status`. A refresh itself
//! (launch, the decision, its record) is in `refresh`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cell::{Credential, NotAHeaderValue, Token, TokenCell};
use super::events::TokenEvents;
use super::flight::SingleFlight;
use super::oauth::TokenError;
use super::policy::{self, Policy};
use super::source::{OAuthSource, SourceError, TokenSource};
use super::store_handle::{fingerprint, StoreHandle};
use crate::audit::AuditSink;
use crate::config::{Grant, ProviderConfig};
use crate::metrics::ProviderMetrics;
use crate::secret::Secret;

/// What a token request ends with, shared by all its waiters.
pub(super) type Outcome = Result<Arc<Token>, TokenError>;

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
pub(super) struct State {
    pub(super) flight: SingleFlight<Outcome>,
    pub(super) last_start: Option<Instant>,
    /// Set after a failure: the next attempt is not before this.
    pub(super) retry_at: Option<Instant>,
    pub(super) failures: u32,
    pub(super) reauth_required: bool,
    pub(super) last: Option<LastRefresh>,
    /// `refresh_token` grant: the newest refresh token (rotations replace it).
    pub(super) refresh_token: Option<Secret>,
    /// Highest generation seen anywhere (store, fleet), so new ones only grow.
    pub(super) max_generation: u64,
}

/// Why a provider cannot be built (start-up or reload).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error(transparent)]
    Token(#[from] NotAHeaderValue),
}

/// One configured provider: its token cell and the machinery that keeps it fresh.
pub struct Provider {
    pub name: Arc<str>,
    pub cfg: ProviderConfig,
    pub(super) cell: TokenCell,
    pub(super) state: Mutex<State>,
    pub(super) wake: Notify,
    /// `None` for a `static` provider: its token never changes.
    pub(super) source: Option<Arc<dyn TokenSource>>,
    pub(super) store: Arc<StoreHandle>,
    pub(super) metrics: ProviderMetrics,
    pub(super) audit: Option<AuditSink>,
    pub(super) events: Arc<TokenEvents>,
    pub(super) fingerprint: String,
    pub(super) refreshes_ok: AtomicU64,
    pub(super) refreshes_failed: AtomicU64,
    /// How many refreshes in a row the upstream rejected too (replay got 401):
    /// each one doubles the spacing of 401-driven refreshes.
    pub(super) useless_streak: AtomicU64,
    /// The generation last counted in `useless_streak` (counted once each).
    pub(super) useless_generation: AtomicU64,
    /// Highest generation handed to `persist`. A retried save of an older token
    /// checks it under `save_lock`, so it can never overwrite a newer record (for
    /// `refresh_token`, that would put a spent refresh token back on disk).
    pub(super) latest_save: AtomicU64,
    pub(super) save_lock: tokio::sync::Mutex<()>,
    pub(super) shutdown: CancellationToken,
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
            cell: TokenCell::default(),
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
            let t = Token::new(&provider.cfg.scheme, value, None, None, 1)?;
            provider.cell.publish(&Arc::new(t), |_| true);
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

    /// The current token, whatever its validity.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.cell.current()
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
        let now = Instant::now();
        self.cell
            .newer_than(above, |t| match (t.expires_in(now), t.lifetime) {
                (Some(rem), Some(life)) => rem > self.margin(life),
                (Some(rem), None) => !rem.is_zero(),
                (None, _) => true,
            })
    }

    /// Publishes `token` when `replaces` accepts the token held then. Also under
    /// the state lock: a 401 that checked the cell under it and found nothing newer
    /// starts a refresh knowing no adoption landed in between.
    pub(super) fn publish(
        &self,
        token: &Arc<Token>,
        replaces: impl FnMut(Option<&Token>) -> bool,
    ) -> bool {
        let _st = self.state();
        self.cell.publish(token, replaces)
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

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still consistent
        // enough to keep serving (every field is valid on its own).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_static(&self) -> bool {
        self.source.is_none()
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
            match st.flight.join() {
                Some((w, _)) => w,
                None if st.retry_at.is_some() => return Err(self.unavailable(&st)),
                None => self.launch(&mut st, self.background_trigger()),
            }
        };
        self.metrics.waiter();
        // Boxed: waiting is the rare path; inline it would size every request.
        match Box::pin(rx.wait(wait)).await {
            Some(Ok(t)) if t.is_valid(Instant::now()) => Ok(Credential {
                header_value: t.header_value.clone(),
                generation: t.generation,
            }),
            _ => Err(self.unavailable(&self.state())),
        }
    }

    pub(super) fn unavailable(&self, st: &State) -> Unavailable {
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
                match st.flight.join() {
                    // A refresh asked for while an older generation was held (the
                    // start-up fetch, say) may end with the very generation rejected
                    // here: wait for it, then ask for one of our own.
                    Some((w, above)) => (w, above.is_some_and(|g| g >= sent)),
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
            match rx.wait(left).await {
                Some(Ok(t)) => {
                    if let Some(c) = newer(&t) {
                        return Some(c);
                    }
                }
                // The wait is over (or the flight was abandoned).
                None => return None,
                Some(Err(_)) => {}
            }
            if covers {
                return None;
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
    pub(super) fn refresh_spacing(&self) -> Duration {
        self.policy()
            .spacing(self.useless_streak.load(Ordering::Relaxed))
    }

    pub(super) fn policy(&self) -> Policy {
        Policy {
            refresh_before: self.cfg.refresh_before,
            min_refresh_interval: self.cfg.min_refresh_interval,
        }
    }

    /// What a refresh not caused by a 401 is: the first fetch, or one for expiry.
    pub(super) fn background_trigger(&self) -> Trigger {
        if self.cell.load().is_none() {
            Trigger::Startup
        } else {
            Trigger::Expiry
        }
    }

    /// How long before expiry a token is refreshed.
    pub(super) fn margin(&self, lifetime: Duration) -> Duration {
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
                match st.flight.join() {
                    Some((w, _)) => w,
                    None => self.launch(&mut st, self.background_trigger()),
                }
            };
            tokio::select! {
                _ = rx.wait(Duration::from_secs(3600)) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let st = self.state();
        if st.flight.in_flight() {
            // finish() wakes us when it lands.
            return None;
        }
        if st.reauth_required {
            return None;
        }
        if let Some(at) = st.retry_at {
            return Some(at);
        }
        let token = self.cell.current();
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
            refreshing: st.flight.in_flight(),
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
