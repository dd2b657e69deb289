//! The contract every store backend keeps: the record that survives a restart,
//! the trait, its errors, and the fleet lease.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::secret::Secret;

/// What survives a restart for one provider. `Debug` is safe: `Secret` redacts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredToken {
    pub access_token: Secret,
    /// `refresh_token` grant: the newest (possibly rotated) refresh token.
    pub refresh_token: Option<Secret>,
    pub token_type: String,
    pub scope: Option<String>,
    /// Wall-clock expiry (Unix seconds); `None` = used until a 401.
    pub expires_at_unix: Option<i64>,
    /// Grows with every new token, across restarts and (fleet mode) across replicas.
    pub generation: u64,
    /// Wall-clock time the token was obtained (Unix seconds).
    pub obtained_at_unix: i64,
    /// Hash of the provider settings the token was obtained with (token_url,
    /// client_id, scope, ...): a token for other settings is never trusted.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("store encryption: {0}")]
    Crypto(String),
    #[error("database: {0}")]
    Database(String),
    #[error("store misconfigured: {0}")]
    Config(String),
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store backend. Calls are rare (start-up, refresh) so boxed futures are fine here;
/// nothing on the request path ever calls into a store.
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// Short name for logs and `/status` ("file", "memory", "postgres").
    fn kind(&self) -> &'static str;

    /// The stored token of `provider`, if any.
    fn load<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<StoredToken>>;

    /// Persists `token` as the current one for `provider` (durably, when this
    /// returns Ok).
    fn save<'a>(&'a self, provider: &'a str, token: &'a StoredToken) -> StoreFuture<'a, ()>;

    /// Fleet mode: takes the fleet-wide refresh lock for `provider`, held until the
    /// returned lease is dropped. Single-process stores return `Ok(None)`: the
    /// in-process single flight is all the coordination they need.
    fn lock_refresh<'a>(&'a self, _provider: &'a str) -> StoreFuture<'a, Option<RefreshLease>> {
        Box::pin(async { Ok(None) })
    }

    /// Fleet mode: a stream of provider names whose stored token another replica
    /// changed. `None` for single-process stores.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }

    /// Whether the store's backend answered its last call. `false` shows as
    /// `"store": "failing"`: durability is degraded, serving is not.
    fn healthy(&self) -> bool {
        true
    }
}

/// Holds a fleet-wide refresh lock; releases it when dropped.
pub struct RefreshLease {
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl RefreshLease {
    pub fn new(release: impl FnOnce() + Send + 'static) -> Self {
        Self {
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for RefreshLease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for RefreshLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshLease")
    }
}
