//! The store as every provider shares it (health, failures logged once), and what
//! a stored token must be to be adopted. Nothing here runs on the request path.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::ProviderConfig;
use crate::store::TokenStore;

pub(super) const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the stored token is being read: what it must be to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Adopt {
    /// As the result of a refresh, instead of asking the IdP (start-up, or under
    /// the fleet lease): must be of a generation above `above` (the one held when
    /// the refresh was asked for) and valid beyond the refresh margin.
    Refresh { above: Option<u64> },
    /// Another replica's refresh: must supersede ours and be valid.
    Notified,
}

/// What went wrong with a store call, for the one log line a failure gets.
#[derive(Debug, Clone, Copy)]
pub enum StoreFailure<'a> {
    Error(&'a crate::store::StoreError),
    /// The call did not answer in time (`read`, `write`).
    TimedOut(&'static str),
}

impl std::fmt::Display for StoreFailure<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreFailure::Error(e) => e.fmt(f),
            StoreFailure::TimedOut(what) => write!(f, "store {what} timed out"),
        }
    }
}

/// Shared by every provider: where tokens are persisted and how health shows.
#[derive(Debug)]
pub struct StoreHandle {
    pub store: Arc<dyn TokenStore>,
    failing: std::sync::atomic::AtomicBool,
    /// Saves still being retried. While any is pending, a successful read does not
    /// mean the store is healthy (a rotated refresh token may not be on disk yet).
    pub(super) pending_saves: std::sync::atomic::AtomicUsize,
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
            self.record_ok();
        }
    }

    /// The store answered: logged only when that ends a failure.
    pub fn record_ok(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(store = self.store.kind(), "token store recovered");
        }
    }

    /// A store call failed: counted every time, logged only when that starts a
    /// failure (not per attempt).
    pub fn record_failure(&self, failure: StoreFailure<'_>) {
        self.metrics.store_error();
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(store = self.store.kind(), error = %failure, "token store failing; serving from memory");
        }
    }
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Identifies the settings a token was obtained with; a stored token for other
/// settings (another client, scope or IdP) is never used. Two halves: the client
/// (grant, token endpoint, client id), then what the token is for (scope, audience,
/// resource), so a refresh token can outlive a scope change.
pub(super) fn fingerprint(cfg: &ProviderConfig) -> String {
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
pub(super) fn same_client(a: &str, b: &str) -> bool {
    match (a.split_once('-'), b.split_once('-')) {
        (Some((x, _)), Some((y, _))) => x == y,
        _ => false,
    }
}
