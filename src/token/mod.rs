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
use http_body_util::Full;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditSink, TokenEvent};
use crate::config::{Grant, ProviderConfig};
use crate::forward::client::HttpClient;
use crate::metrics::ProviderMetrics;
use crate::secret::Secret;
use crate::store::{StoredToken, TokenStore};

pub mod oauth;

use oauth::{ClientCredential, GrantRequest, Retry, TokenError};

/// Default proactive margin: refresh this long before expiry, or at half the
/// lifetime for short-lived tokens.
const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
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
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Expiry => "expiry",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Manual => "manual",
        }
    }
}

/// Shared by every provider: where tokens are persisted and how health shows.
#[derive(Debug)]
pub struct StoreHandle {
    pub store: Arc<dyn TokenStore>,
    failing: std::sync::atomic::AtomicBool,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl StoreHandle {
    pub fn new(store: Arc<dyn TokenStore>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            failing: false.into(),
            metrics,
        })
    }

    /// Whether durability is degraded: the last write failed, or the backend
    /// (fleet database) is unreachable.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) || !self.store.healthy()
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
    flight: Option<watch::Receiver<Option<Outcome>>>,
    last_start: Option<Instant>,
    /// Set after a failure: the next attempt is not before this.
    retry_at: Option<Instant>,
    failures: u32,
    reauth_required: bool,
    last: Option<LastRefresh>,
    /// `refresh_token` grant: the newest refresh token (rotations replace it).
    refresh_token: Option<Secret>,
    /// Whether the store was consulted (start-up) yet.
    store_checked: bool,
    /// Highest generation seen anywhere (store, fleet), so new ones only grow.
    max_generation: u64,
}

/// One configured provider: its token cell and the machinery that keeps it fresh.
pub struct Provider {
    pub name: Arc<str>,
    pub cfg: ProviderConfig,
    cell: ArcSwapOption<Token>,
    state: Mutex<State>,
    wake: Notify,
    credential: ClientCredential,
    http: Option<HttpClient<Full<Bytes>>>,
    store: Arc<StoreHandle>,
    metrics: ProviderMetrics,
    audit: Option<AuditSink>,
    fingerprint: String,
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
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
    pub proxy: crate::egress::EgressProxy,
}

impl Provider {
    /// Loads the provider's secrets and builds its token-endpoint client. A
    /// `static` provider holds its token from here on.
    pub fn new(cfg: ProviderConfig, deps: ProviderDeps) -> Result<Arc<Self>, String> {
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        let (credential, http, seed) = match &cfg.grant {
            Grant::Static { .. } => (ClientCredential::None, None, None),
            Grant::ClientCredentials(c) | Grant::RefreshToken { client: c, .. } => {
                let credential = ClientCredential::load(&c.auth)?;
                let client_cert = match &c.auth {
                    crate::config::ClientAuth::TlsClientAuth { cert, key } => {
                        Some((cert.as_path(), key.as_path()))
                    }
                    _ => None,
                };
                let http =
                    crate::forward::client::build(c.ca.as_deref(), client_cert, false, &deps.proxy)
                        .map_err(|e| format!("token endpoint TLS: {e}"))?;
                let seed = match &cfg.grant {
                    Grant::RefreshToken {
                        initial_refresh_token,
                        ..
                    } => Some(initial_refresh_token.load().map_err(|e| e.to_string())?),
                    _ => None,
                };
                (credential, Some(http), seed)
            }
        };
        let fingerprint = fingerprint(&cfg);
        let provider = Arc::new(Provider {
            name,
            credential,
            http,
            store: deps.store,
            metrics: deps.metrics,
            audit: deps.audit,
            fingerprint,
            cell: ArcSwapOption::empty(),
            state: Mutex::new(State {
                refresh_token: seed,
                ..State::default()
            }),
            wake: Notify::new(),
            refreshes_ok: AtomicU64::new(0),
            refreshes_failed: AtomicU64::new(0),
            shutdown: deps.shutdown,
            cfg,
        });
        if let Grant::Static { token } = &provider.cfg.grant {
            let value = token.load().map_err(|e| e.to_string())?;
            let t = provider.make_token(value, None, None, 1)?;
            provider.cell.store(Some(Arc::new(t)));
            provider.metrics.set_expiry(None);
        }
        Ok(provider)
    }

    /// Starts the background refresher (OAuth grants only): the first token is
    /// fetched now, then kept fresh before it expires.
    pub fn start(self: &Arc<Self>) {
        if self.http.is_none() {
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
        self.http.is_none()
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
    /// fetch), bounded by `wait`, or fails fast while the IdP is failing.
    pub async fn credential(self: &Arc<Self>, wait: Duration) -> Result<Credential, Unavailable> {
        {
            let guard = self.cell.load();
            if let Some(t) = guard.as_ref() {
                if t.is_valid(Instant::now()) {
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
                Some(rx) => rx.clone(),
                None if st.retry_at.is_some() => return Err(self.unavailable(&st)),
                None => {
                    let trigger = if self.cell.load().is_none() {
                        Trigger::Startup
                    } else {
                        Trigger::Expiry
                    };
                    self.launch(&mut st, trigger)
                }
            }
        };
        self.metrics.waiter();
        match wait_outcome(rx, wait).await {
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
        let rx = {
            let mut st = self.state();
            // Re-check under the lock: a refresh may have landed since.
            if let Some(c) = self.cell.load().as_deref().and_then(newer) {
                return Some(c);
            }
            match &st.flight {
                Some(rx) => rx.clone(),
                None => {
                    if st.reauth_required {
                        return None;
                    }
                    let recent = st
                        .last_start
                        .is_some_and(|t| t.elapsed() < self.cfg.min_refresh_interval);
                    if recent {
                        return None;
                    }
                    self.launch(&mut st, Trigger::Unauthorized)
                }
            }
        };
        self.metrics.waiter();
        match wait_outcome(rx, wait).await {
            Ok(t) => newer(&t),
            Err(_) => None,
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
                Some(rx) => rx.clone(),
                None => self.launch(&mut st, trigger),
            }
        };
        wait_outcome(rx, wait).await
    }

    /// Starts a refresh task. Called with the state lock held, so two callers can
    /// never both start one.
    fn launch(
        self: &Arc<Self>,
        st: &mut State,
        trigger: Trigger,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        st.flight = Some(rx.clone());
        st.last_start = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = this.obtain(trigger).await;
            this.finish(trigger, started, &outcome);
            // Clear the flight before publishing the outcome: a waiter that wakes
            // and immediately needs another refresh must be able to start one.
            this.state().flight = None;
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
                st.failures = st.failures.saturating_add(1);
                self.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                let delay = match e.retry() {
                    Retry::Transient(after) => after.unwrap_or_else(|| backoff(st.failures, 1, 60)),
                    Retry::Slow => backoff(st.failures, 30, 600),
                    Retry::Never => {
                        st.reauth_required = true;
                        Duration::from_secs(3600)
                    }
                };
                st.retry_at = Some(now + delay);
                match e.retry() {
                    Retry::Transient(_) => {
                        tracing::warn!(provider = %self.name, trigger = trigger.as_str(),
                        error = %e, retry_in_s = delay.as_secs(), "token request failed")
                    }
                    Retry::Slow => {
                        tracing::error!(provider = %self.name, trigger = trigger.as_str(),
                        error = %e, retry_in_s = delay.as_secs(),
                        "token endpoint rejected the client; check the provider's credentials")
                    }
                    Retry::Never => tracing::error!(provider = %self.name, error = %e,
                        "refresh token rejected: reauthorization required"),
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
        self.metrics.refresh(trigger.as_str(), outcome_str);
        if let Some(audit) = &self.audit {
            let (generation, expires_in_s) = match outcome {
                Ok(t) => (Some(t.generation), t.expires_in(now).map(|d| d.as_secs())),
                Err(_) => (self.current().map(|t| t.generation), None),
            };
            audit.token(TokenEvent {
                ts: SystemTime::now(),
                event: "token_refresh",
                provider: self.name.clone(),
                trigger: trigger.as_str(),
                outcome: outcome_str,
                generation,
                expires_in_s,
                duration_ms: elapsed.as_millis() as u64,
                error,
            });
        }
        self.wake.notify_one();
    }

    /// Gets a new token: from the store when it holds a usable one (start-up, or
    /// another replica's refresh in fleet mode), else from the IdP.
    async fn obtain(self: &Arc<Self>, trigger: Trigger) -> Outcome {
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
        let first = !std::mem::replace(&mut self.state().store_checked, true);
        if first || lease.is_some() {
            if let Some(t) = self.adopt_stored(first).await {
                return Ok(t);
            }
        }
        let result = self.fetch(trigger).await;
        drop(lease);
        result
    }

    /// Publishes the stored token if it is newer than ours and valid for longer
    /// than the refresh margin. Also takes the stored refresh token (the newest one
    /// always wins over the configured seed).
    async fn adopt_stored(self: &Arc<Self>, startup: bool) -> Option<Arc<Token>> {
        let stored =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.store.load(&self.name)).await {
                Ok(Ok(s)) => {
                    self.store.record(&Ok(()));
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
            if startup {
                tracing::info!(provider = %self.name, "stored token was obtained with other provider settings; ignoring it");
            }
            return None;
        }
        {
            let mut st = self.state();
            st.max_generation = st.max_generation.max(stored.generation);
            if let Some(rt) = &stored.refresh_token {
                st.refresh_token = Some(rt.clone());
            }
        }
        let current_gen = self.current().map_or(0, |t| t.generation);
        if stored.generation <= current_gen && !startup {
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
        if let (Some(rem), Some(life)) = (remaining, lifetime) {
            if rem <= self.margin(life) {
                return None;
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
        self.cell.store(Some(token.clone()));
        tracing::info!(provider = %self.name, generation = token.generation, "using stored token");
        Some(token)
    }

    async fn fetch(self: &Arc<Self>, trigger: Trigger) -> Outcome {
        let (Some(http), Some(client)) = (&self.http, self.cfg.oauth()) else {
            return Err(TokenError::ClientSetup("not an OAuth provider".into()));
        };
        let refresh_token = self.state().refresh_token.clone();
        let grant = match (&self.cfg.grant, &refresh_token) {
            (Grant::RefreshToken { .. }, Some(rt)) => GrantRequest::RefreshToken(rt),
            (Grant::RefreshToken { .. }, None) => return Err(TokenError::ReauthRequired),
            _ => GrantRequest::ClientCredentials,
        };
        let is_refresh = matches!(grant, GrantRequest::RefreshToken(_));
        let resp = match oauth::request_token(http, client, &self.credential, grant).await {
            Ok(r) => r,
            Err(TokenError::OAuth { code, .. }) if is_refresh && code == "invalid_grant" => {
                return Err(TokenError::ReauthRequired)
            }
            Err(e) => return Err(e),
        };
        let _ = trigger;

        let current = self.current();
        let same = current
            .as_ref()
            .is_some_and(|c| c.access_token == resp.access_token);
        let generation = {
            let mut st = self.state();
            let base = st
                .max_generation
                .max(current.as_ref().map_or(0, |c| c.generation));
            let g = if same { base.max(1) } else { base + 1 };
            st.max_generation = g;
            g
        };
        let token = Arc::new(
            self.make_token(resp.access_token, resp.expires_in, resp.scope, generation)
                .map_err(TokenError::InvalidResponse)?,
        );
        let stored = StoredToken {
            access_token: token.access_token.clone(),
            refresh_token: None,
            token_type: "Bearer".into(),
            scope: token.scope.clone(),
            expires_at_unix: resp.expires_in.map(|d| unix_now() + d.as_secs() as i64),
            generation,
            obtained_at_unix: unix_now(),
            fingerprint: self.fingerprint.clone(),
        };
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
        } else {
            let this = self.clone();
            tokio::spawn(async move { this.persist(stored).await });
        }
        if !same {
            self.cell.store(Some(token.clone()));
        } else {
            // The IdP handed back the token we have: extend its expiry, keep the
            // generation (nothing new to replay with).
            self.cell.store(Some(token.clone()));
        }
        Ok(token)
    }

    /// Writes the token to the store; on failure keeps retrying in the background
    /// (with backoff) until it lands or a newer token supersedes it.
    async fn persist(self: &Arc<Self>, stored: StoredToken) {
        if self.try_save(&stored).await {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut attempt = 1;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt, 1, 60)) => {}
                    _ = this.shutdown.cancelled() => return,
                }
                if this
                    .current()
                    .is_some_and(|t| t.generation > stored.generation)
                {
                    return;
                }
                if this.try_save(&stored).await {
                    return;
                }
                attempt += 1;
            }
        });
    }

    async fn try_save(&self, stored: &StoredToken) -> bool {
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
        self.cfg
            .refresh_before
            .unwrap_or(DEFAULT_REFRESH_BEFORE)
            .min(lifetime / 2)
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
                    Some(rx) => rx.clone(),
                    None => {
                        let trigger = if self.cell.load().is_none() {
                            Trigger::Startup
                        } else {
                            Trigger::Expiry
                        };
                        self.launch(&mut st, trigger)
                    }
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
            }) => {
                let margin = self.margin(*life);
                // Jitter so a fleet of gateways does not refresh in lockstep.
                let jitter = margin.mul_f64(rand::random_range(0.0..0.1));
                Some(
                    exp.checked_sub(margin + jitter)
                        .unwrap_or_else(Instant::now),
                )
            }
            Some(_) => None,
        }
    }

    /// Fleet mode: another replica stored a new token; adopt it if newer.
    pub async fn on_store_change(self: &Arc<Self>) {
        let _ = self.adopt_stored(false).await;
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

async fn wait_outcome(mut rx: watch::Receiver<Option<Outcome>>, wait: Duration) -> Outcome {
    match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(v)) => v.clone().unwrap_or(Err(TokenError::Abandoned)),
        _ => Err(TokenError::Abandoned),
    }
}

/// Exponential backoff with full jitter between half and all of the step.
fn backoff(attempt: u32, base_secs: u64, cap_secs: u64) -> Duration {
    let step = base_secs
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(cap_secs);
    Duration::from_secs_f64(step as f64 * rand::random_range(0.5..=1.0))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Identifies the settings a token was obtained with; a stored token for other
/// settings (another client, scope or IdP) is never used.
fn fingerprint(cfg: &ProviderConfig) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(cfg.grant_kind().as_str().as_bytes());
    if let Some(c) = cfg.oauth() {
        for part in [
            c.token_url.to_string().as_str(),
            &c.client_id,
            c.scope.as_deref().unwrap_or(""),
            c.audience.as_deref().unwrap_or(""),
            c.resource.as_deref().unwrap_or(""),
        ] {
            ctx.update(b"\0");
            ctx.update(part.as_bytes());
        }
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}
