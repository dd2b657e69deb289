//! The durable fallback for tokens: written when a token changes, read at start-up,
//! never on the request path. `file` is the embedded default, `memory` keeps nothing,
//! `postgres` lets a fleet of gateways share one token (fleet mode).

use std::sync::Arc;

use crate::config::{StoreConfig, StoreKind};

pub mod crypto;
pub mod file;
pub mod memory;
pub mod postgres;
pub mod record;
mod token_store;

pub use token_store::{RefreshLease, StoreError, StoreFuture, StoredToken, TokenStore};

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
