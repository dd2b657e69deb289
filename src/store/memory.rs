//! A store that keeps nothing across restarts: for tests, and for deployments that
//! accept a fresh token fetch at every start. It also counts its calls so tests can
//! prove the request path never reads a store.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::token_store::{StoreError, StoreFuture, StoredToken, TokenStore};

#[derive(Default)]
pub struct MemoryStore {
    // A std mutex is enough: stores are never on the request path and the lock is
    // never held across an await.
    tokens: Mutex<HashMap<String, StoredToken>>,
    loads: AtomicU64,
    saves: AtomicU64,
    fail_saves: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of `load` calls so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Number of successful `save` calls so far.
    pub fn saves(&self) -> u64 {
        self.saves.load(Ordering::Relaxed)
    }

    /// Seeds a token without counting it as a save (test set-up).
    pub fn insert(&self, provider: &str, token: StoredToken) {
        self.lock().insert(provider.to_owned(), token);
    }

    /// The stored token without counting it as a load (test assertions).
    pub fn peek(&self, provider: &str) -> Option<StoredToken> {
        self.lock().get(provider).cloned()
    }

    /// While set, every `save` fails: lets tests drive the "store failing" state
    /// (`/readyz`, `/status`, metrics) without a real broken disk or database.
    pub fn set_failing(&self, failing: bool) {
        self.fail_saves.store(failing, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, StoredToken>> {
        // A panic elsewhere cannot leave a plain map half-updated, so a poisoned lock
        // is still safe to use.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("providers", &self.lock().len())
            .field("loads", &self.loads())
            .field("saves", &self.saves())
            .finish()
    }
}

impl TokenStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// A store set failing (also the fallback for an unusable file store) is
    /// reported as such from the start, not only after its first failed save.
    fn healthy(&self) -> bool {
        !self.fail_saves.load(Ordering::Relaxed)
    }

    fn load<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<StoredToken>> {
        Box::pin(async move {
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok(self.lock().get(provider).cloned())
        })
    }

    fn save<'a>(&'a self, provider: &'a str, token: &'a StoredToken) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if self.fail_saves.load(Ordering::Relaxed) {
                return Err(StoreError::Io {
                    path: "memory".into(),
                    source: std::io::Error::other("simulated store failure"),
                });
            }
            self.lock().insert(provider.to_owned(), token.clone());
            self.saves.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn token(gen: u64) -> StoredToken {
        StoredToken {
            access_token: Secret::new(format!("at-{gen}")),
            refresh_token: Some(Secret::new("rt")),
            token_type: "Bearer".into(),
            scope: None,
            expires_at_unix: Some(2_000_000_000),
            generation: gen,
            obtained_at_unix: 1_700_000_000,
            fingerprint: "fp".into(),
        }
    }

    #[tokio::test]
    async fn round_trip_and_counts_loads() {
        let store = MemoryStore::new();
        assert_eq!(store.load("crm").await.unwrap(), None);
        store.save("crm", &token(3)).await.unwrap();
        assert_eq!(store.load("crm").await.unwrap(), Some(token(3)));
        assert_eq!(store.load("erp").await.unwrap(), None);
        assert_eq!(store.loads(), 3);
        assert_eq!(store.saves(), 1);
        assert_eq!(store.peek("crm"), Some(token(3)));
        assert_eq!(store.loads(), 3, "peek is not a load");
    }

    #[tokio::test]
    async fn failing_saves_keep_the_old_token() {
        let store = MemoryStore::new();
        store.insert("crm", token(1));
        store.set_failing(true);
        assert!(store.save("crm", &token(2)).await.is_err());
        store.set_failing(false);
        assert_eq!(store.peek("crm"), Some(token(1)));
        assert!(!format!("{store:?}").contains("at-1"));
    }
}
