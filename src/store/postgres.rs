//! The PostgreSQL store: fleet mode. Several gateways share one row per provider, take
//! a fleet-wide advisory lock before asking the IdP for a token, and learn of each
//! other's new tokens through LISTEN/NOTIFY, with a periodic re-read as a safety net.
//!
//! Connections (no pool: the store is off the request path and calls are rare):
//! - one *query* connection for `load`/`save`, reopened lazily when it breaks;
//! - one *listen* connection held by a background task that forwards notifications
//!   and polls generations; it reconnects with backoff;
//! - one short-lived *lock* connection per held refresh lease, because a session-level
//!   advisory lock lives exactly as long as its session: if the holder dies, PostgreSQL
//!   frees the lock with the connection.
//!
//! Each connection carries `application_name` = `{base}:{replica}:{role}` so operators
//! (and the tests) can find them in `pg_stat_activity`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::crypto::Cipher;
use super::token_store::{RefreshLease, StoreError, StoreFuture, StoredToken, TokenStore};
use crate::cause::chain;
use crate::secret::Secret;

mod listen;
mod schema;
mod session;
mod tls;
mod url;

use listen::listen_loop;
use schema::{read_generations, Names};
use session::Shared;
use tls::tls_connector;
use url::parse_url;

/// A secret as a query parameter. tokio-postgres logs every parameter's `Debug`
/// at debug level (`tokio_postgres::query`): this one prints a placeholder, so a
/// `RUST_LOG=debug` never writes a token to the log.
struct SecretParam<'a>(&'a str);

impl std::fmt::Debug for SecretParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl tokio_postgres::types::ToSql for SecretParam<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Applied when the URL sets no `connect_timeout`: an unreachable database must turn
/// into "store failing" quickly, not hang a refresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `lock_refresh` waits for another replica's refresh before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Shortest accepted poll interval (a zero interval would spin).
const POLL_MIN: Duration = Duration::from_millis(100);
const EVENTS_CAPACITY: usize = 256;

/// Opens the fleet store: parses the URL, sets up TLS per its `sslmode`, creates or
/// migrates the schema (when the database is reachable) and starts the listener.
///
/// An unreachable database is not an error here: the store starts unhealthy and
/// connects when it can (degraded mode). Only a bad URL, prefix or TLS setup is.
pub async fn open(
    url: &Secret,
    table_prefix: &str,
    poll_interval: Duration,
    cipher: Option<Arc<Cipher>>,
) -> Result<Arc<dyn TokenStore>, StoreError> {
    let store: Arc<dyn TokenStore> =
        PostgresStore::start(url, table_prefix, poll_interval, cipher, LOCK_WAIT).await?;
    Ok(store)
}

/// The fleet store. `Debug` shows the table prefix and TLS mode, never the URL.
pub struct PostgresStore {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table_prefix", &self.shared.names.prefix)
            .field("tls", &self.shared.tls_mode)
            .field("replica", &self.shared.app_name)
            .field("encrypted", &self.shared.cipher.is_some())
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Stops the listener task; its connection closes with it.
        self.shutdown.cancel();
    }
}

impl PostgresStore {
    /// Like [`open`], with the lock wait as a knob (tests shorten it).
    pub(crate) async fn start(
        url: &Secret,
        table_prefix: &str,
        poll_interval: Duration,
        cipher: Option<Arc<Cipher>>,
        lock_wait: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let names = Names::new(table_prefix)?;
        let parsed = parse_url(url.expose())?;
        let tls = tls_connector(parsed.mode, parsed.root_cert.as_deref())?;
        let mut config = parsed.config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let base = config
            .get_application_name()
            .unwrap_or("authgate")
            .to_owned();
        let app_name = format!("{base}:{:08x}", rand::random::<u32>());
        let shared = Arc::new(Shared {
            config,
            tls,
            tls_mode: parsed.mode,
            names,
            cipher,
            app_name,
            healthy: AtomicBool::new(false),
            query: tokio::sync::Mutex::new(None),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            listening: watch::channel(0).0,
            lock_wait,
            poll_interval: poll_interval.max(POLL_MIN),
        });

        // The first query connection runs the migration; its snapshot of generations
        // is the baseline the listener compares against.
        let baseline = match shared.run("start-up", |c| async move { Ok(c) }).await {
            Ok(client) => read_generations(&client, &shared.names)
                .await
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    table_prefix = %shared.names.prefix,
                    "token store: PostgreSQL unreachable at start-up; serving from memory until it returns"
                );
                HashMap::new()
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(listen_loop(shared.clone(), shutdown.clone(), baseline));
        Ok(Arc::new(Self { shared, shutdown }))
    }

    /// The `application_name` of this store's connections in one role
    /// (`query`, `listen`, `lock`), as seen in `pg_stat_activity`.
    pub fn application_name(&self, role: &str) -> String {
        format!("{}:{role}", self.shared.app_name)
    }

    async fn load_token(&self, provider: &str) -> Result<Option<StoredToken>, StoreError> {
        let shared = &*self.shared;
        let sql = format!(
            "SELECT access_token, refresh_token, token_type, scope, expires_at_unix, \
             generation, obtained_at_unix, fingerprint, encrypted \
             FROM {} WHERE provider = $1",
            shared.names.tokens
        );
        let row = shared
            .run("load", |c| {
                let sql = &sql;
                async move { c.query_opt(sql.as_str(), &[&provider]).await }
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: format!("{}[{provider}]", shared.names.tokens),
            reason,
        };
        let column_err = |e: tokio_postgres::Error| corrupt(chain(&e));
        let access: String = row.try_get(0).map_err(column_err)?;
        let refresh: Option<String> = row.try_get(1).map_err(column_err)?;
        let token_type: String = row.try_get(2).map_err(column_err)?;
        let scope: Option<String> = row.try_get(3).map_err(column_err)?;
        let expires_at_unix: Option<i64> = row.try_get(4).map_err(column_err)?;
        let generation: i64 = row.try_get(5).map_err(column_err)?;
        let obtained_at_unix: i64 = row.try_get(6).map_err(column_err)?;
        let fingerprint: String = row.try_get(7).map_err(column_err)?;
        let encrypted: bool = row.try_get(8).map_err(column_err)?;

        let reveal = |value: &str| -> Result<Secret, StoreError> {
            match (encrypted, shared.cipher.as_deref()) {
                (true, Some(cipher)) => cipher.open(provider, value),
                (true, None) => Err(StoreError::Crypto(
                    "the stored token is encrypted but no store key is configured".into(),
                )),
                // Plaintext rows stay readable after a key is added; the next save
                // writes them encrypted.
                (false, _) => Ok(Secret::new(value)),
            }
        };
        Ok(Some(StoredToken {
            access_token: reveal(&access)?,
            refresh_token: refresh.as_deref().map(reveal).transpose()?,
            token_type,
            scope,
            expires_at_unix,
            generation: u64::try_from(generation)
                .map_err(|_| corrupt(format!("negative generation {generation}")))?,
            obtained_at_unix,
            fingerprint,
        }))
    }

    async fn save_token(&self, provider: &str, token: &StoredToken) -> Result<(), StoreError> {
        let shared = &*self.shared;
        let seal = |value: &Secret| -> Result<String, StoreError> {
            match shared.cipher.as_deref() {
                Some(cipher) => cipher.seal(provider, value.expose()),
                None => Ok(value.expose().to_owned()),
            }
        };
        // Zeroized on drop like the secrets they came from.
        let access = zeroize::Zeroizing::new(seal(&token.access_token)?);
        let refresh = token
            .refresh_token
            .as_ref()
            .map(seal)
            .transpose()?
            .map(zeroize::Zeroizing::new);
        let generation = i64::try_from(token.generation)
            .map_err(|_| StoreError::Database("generation does not fit a bigint".into()))?;
        let encrypted = shared.cipher.is_some();
        // One statement = one transaction: the row and its notification commit
        // together. The WHERE keeps generations monotonic across the fleet (an equal
        // generation may overwrite: degraded replicas converge on the last writer).
        // pg_notify runs only when a row was written.
        let sql = format!(
            "WITH up AS ( \
               INSERT INTO {t} AS t (provider, access_token, refresh_token, token_type, scope, \
                 expires_at_unix, generation, obtained_at_unix, fingerprint, encrypted, updated_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now()) \
               ON CONFLICT (provider) DO UPDATE SET \
                 access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
                 token_type = excluded.token_type, scope = excluded.scope, \
                 expires_at_unix = excluded.expires_at_unix, generation = excluded.generation, \
                 obtained_at_unix = excluded.obtained_at_unix, fingerprint = excluded.fingerprint, \
                 encrypted = excluded.encrypted, updated_at = now() \
               WHERE t.generation <= excluded.generation \
               RETURNING provider) \
             SELECT pg_notify($11, provider) FROM up",
            t = shared.names.tokens
        );
        let rows = shared
            .run("save", |c| {
                let (sql, access, refresh) = (&sql, &access, &refresh);
                async move {
                    c.query(
                        sql.as_str(),
                        &[
                            &provider,
                            &SecretParam(access.as_str()),
                            &refresh.as_ref().map(|r| SecretParam(r.as_str())),
                            &token.token_type,
                            &token.scope,
                            &token.expires_at_unix,
                            &generation,
                            &token.obtained_at_unix,
                            &token.fingerprint,
                            &encrypted,
                            &shared.names.channel,
                        ],
                    )
                    .await
                }
            })
            .await?;
        if rows.is_empty() {
            // Not an error: another replica already stored a newer token, which every
            // replica (this one included) learns of through the usual notification.
            tracing::info!(
                provider,
                generation = token.generation,
                "token store: not saved, the fleet store already holds a newer generation"
            );
        }
        Ok(())
    }

    async fn lock(&self, provider: &str) -> Result<RefreshLease, StoreError> {
        let shared = &*self.shared;
        let key = format!("{}:{provider}", shared.names.prefix);
        let wait_ms = shared.lock_wait.as_millis().max(1);
        let attempt = async {
            let (client, _notifications) = shared
                .connect("lock")
                .await
                .map_err(|e| shared.failed("refresh lock connection", &e))?;
            // The server bounds the wait itself, so an abandoned wait never lingers
            // in PostgreSQL after we give up.
            let sql = format!("SET lock_timeout = {wait_ms}");
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| shared.failed("refresh lock", &e))?;
            match client
                .execute("SELECT pg_advisory_lock(hashtext($1))", &[&key])
                .await
            {
                Ok(_) => Ok(client),
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    Err(StoreError::Database(format!(
                        "refresh lock for {provider} still held by another replica after {:?}",
                        shared.lock_wait
                    )))
                }
                Err(e) => Err(shared.failed("refresh lock", &e)),
            }
        };
        // Client-side bound too, for a server that stops answering altogether.
        let client = match tokio::time::timeout(shared.lock_wait + CONNECT_TIMEOUT, attempt).await {
            Ok(result) => result?,
            Err(_) => {
                shared.healthy.store(false, Ordering::Relaxed);
                return Err(StoreError::Database(format!(
                    "refresh lock for {provider}: no answer from PostgreSQL"
                )));
            }
        };
        shared.healthy.store(true, Ordering::Relaxed);
        Ok(RefreshLease::new(move || release_lock(client, key)))
    }
}

/// Unlocks on the lease's own connection, then closes it. Closing alone would free
/// the lock too, but only once the server notices; the explicit unlock hands the lock
/// to the next replica at once.
fn release_lock(client: Client, key: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = client
                .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
                .await
            {
                tracing::debug!(error = %chain(&e), "token store: unlock failed; closing the session frees the lock");
            }
        });
    }
}

impl TokenStore for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn load<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<StoredToken>> {
        Box::pin(self.load_token(provider))
    }

    fn save<'a>(&'a self, provider: &'a str, token: &'a StoredToken) -> StoreFuture<'a, ()> {
        Box::pin(self.save_token(provider, token))
    }

    fn lock_refresh<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<RefreshLease>> {
        Box::pin(async move { self.lock(provider).await.map(Some) })
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.shared.events.subscribe())
    }

    fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
