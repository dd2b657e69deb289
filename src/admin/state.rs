//! What the admin listener keeps besides the gateway.

use std::sync::Arc;

use super::pending::Pending;

/// What the admin listener keeps besides the gateway: the actions' key, when it
/// started, and the reauthorizations under way.
#[derive(Debug)]
pub struct Console {
    pub(super) key: Option<crate::secret::Secret>,
    pub(super) started: std::time::SystemTime,
    pub(super) started_mono: std::time::Instant,
    pub(super) pending: Pending,
}

/// `[admin] key_env`/`key_file` could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("admin.key: {0}")]
pub struct AdminKeyError(#[source] crate::secret::SecretError);

impl Console {
    /// Loads `[admin] key_env`/`key_file` now: a missing key stops the start-up.
    pub fn new(admin: &crate::config::Admin) -> Result<Arc<Self>, AdminKeyError> {
        let key = match &admin.key {
            Some(src) => Some(src.load().map_err(AdminKeyError)?),
            None => None,
        };
        Ok(Arc::new(Self {
            key,
            started: std::time::SystemTime::now(),
            started_mono: std::time::Instant::now(),
            pending: Pending::default(),
        }))
    }
}
