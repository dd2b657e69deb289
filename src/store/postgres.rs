//! Temporary stub so this branch compiles; the postgres store is written on another
//! branch and replaces this file at merge.

use std::sync::Arc;
use std::time::Duration;

use super::crypto::Cipher;
use super::{StoreError, TokenStore};
use crate::secret::Secret;

pub async fn open(
    _url: &Secret,
    _table_prefix: &str,
    _poll_interval: Duration,
    _cipher: Option<Arc<Cipher>>,
) -> Result<Arc<dyn TokenStore>, StoreError> {
    Err(StoreError::Config("postgres store not built yet".into()))
}
