//! The durable fallback for tokens: written when a token changes, read at start-up,
//! never on the request path. `file` is the embedded default, `memory` keeps nothing,
//! `postgres` lets a fleet of gateways share one token (fleet mode).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::{StoreConfig, StoreKind};
use crate::secret::Secret;

pub mod crypto;
pub mod file;
pub mod memory;
pub mod postgres;
pub mod record;

/// Builds the configured store: loads the key (when set) and opens the backend.
///
/// Every error is meant for a start-up message and names what is wrong (a key
/// source, a path, a provider) without any secret value. A file-store `Io` error
/// (folder not writable, file unreadable) may be treated by the caller as
/// non-fatal: log it and fall back to a `MemoryStore`; a `Crypto` or `Config`
/// error means the configuration is wrong and should stop the start-up.
pub async fn open(cfg: &StoreConfig) -> Result<Arc<dyn TokenStore>, StoreError> {
    let cipher = match (&cfg.key, cfg.protect) {
        #[cfg(windows)]
        (None, crate::config::Protect::Dpapi) => Some(Arc::new(crypto::Cipher::dpapi())),
        (None, _) => None,
        (Some(source), _) => {
            let key = source
                .load()
                .map_err(|e| StoreError::Config(format!("cannot load the store key: {e}")))?;
            let cipher = crypto::Cipher::from_key(&key).map_err(|e| match e {
                StoreError::Crypto(msg) => {
                    StoreError::Config(format!("store key from {}: {msg}", source.describe()))
                }
                other => other,
            })?;
            Some(Arc::new(cipher))
        }
    };
    match &cfg.kind {
        StoreKind::Memory => Ok(Arc::new(memory::MemoryStore::new())),
        StoreKind::File { path } => {
            let at = path.clone();
            let store = tokio::task::spawn_blocking(move || file::FileStore::open(&at, cipher))
                .await
                .map_err(|e| StoreError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::other(format!("store open task failed: {e}")),
                })??;
            Ok(Arc::new(store))
        }
        StoreKind::Postgres {
            url,
            table_prefix,
            poll_interval,
        } => {
            let url = url
                .load()
                .map_err(|e| StoreError::Config(format!("cannot load the database URL: {e}")))?;
            postgres::open(&url, table_prefix, *poll_interval, cipher).await
        }
    }
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;
    use std::time::Duration;

    fn config(kind: StoreKind, key: Option<SecretSource>) -> StoreConfig {
        let protect = if key.is_some() {
            crate::config::Protect::Key
        } else {
            crate::config::Protect::None
        };
        StoreConfig { kind, key, protect }
    }

    #[tokio::test]
    async fn opens_each_kind() {
        let memory = open(&config(StoreKind::Memory, None)).await.unwrap();
        assert_eq!(memory.kind(), "memory");

        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
        let path = dir.path().join("state/tokens.json");
        let file = open(&config(
            StoreKind::File { path: path.clone() },
            Some(SecretSource::File(key_file)),
        ))
        .await
        .unwrap();
        assert_eq!(file.kind(), "file");
        file.save("crm", &record::tests::token(1)).await.unwrap();
        assert!(!String::from_utf8(std::fs::read(&path).unwrap())
            .unwrap()
            .contains("access-secret"));
    }

    #[tokio::test]
    async fn bad_key_is_a_config_error_without_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("store.key");
        std::fs::write(&key_file, "too-short-key-value").unwrap();
        let cfg = config(
            StoreKind::Memory,
            Some(SecretSource::File(key_file.clone())),
        );
        let msg = open(&cfg).await.unwrap_err().to_string();
        assert!(msg.contains("store.key"), "{msg}");
        assert!(!msg.contains("too-short-key-value"), "{msg}");

        let missing = dir.path().join("absent.key");
        let cfg = config(StoreKind::Memory, Some(SecretSource::File(missing)));
        let err = open(&cfg).await.unwrap_err();
        assert!(matches!(err, StoreError::Config(_)));
        assert!(err.to_string().contains("absent.key"), "{err}");
    }

    #[tokio::test]
    async fn postgres_dispatches_to_its_backend() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("db.url");
        std::fs::write(&url_file, "postgres://u:pw@localhost/db").unwrap();
        let cfg = config(
            StoreKind::Postgres {
                url: SecretSource::File(url_file),
                table_prefix: "authgate".into(),
                poll_interval: Duration::from_secs(30),
            },
            None,
        );
        // Whatever the backend answers (the stub, or no database here), the URL and
        // its password never show.
        if let Err(e) = open(&cfg).await {
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
    }
}
