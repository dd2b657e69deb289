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
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::crypto::Cipher;
use super::token_store::{RefreshLease, StoreError, StoreFuture, StoredToken, TokenStore};
use crate::secret::Secret;

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

/// Schema version this build writes. A database at a newer version is refused rather
/// than misread.
const SCHEMA_VERSION: i32 = 1;
/// Applied when the URL sets no `connect_timeout`: an unreachable database must turn
/// into "store failing" quickly, not hang a refresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one load/save (connect + migrate + query).
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `lock_refresh` waits for another replica's refresh before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
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

struct Shared {
    /// Holds the password: never logged, never in `Debug`.
    config: Config,
    tls: Option<MakeRustlsConnect>,
    tls_mode: TlsMode,
    names: Names,
    cipher: Option<Arc<Cipher>>,
    /// `{base}:{replica}`; each connection appends its role.
    app_name: String,
    healthy: AtomicBool,
    /// `tokio` mutex: held across the (re)connect so only one caller reconnects.
    query: tokio::sync::Mutex<Option<Arc<Client>>>,
    events: broadcast::Sender<String>,
    /// Counts LISTEN sessions established, so tests can wait for a reconnect.
    listening: watch::Sender<u64>,
    lock_wait: Duration,
    poll_interval: Duration,
}

/// SQL names derived from the validated prefix. Tables are quoted so a prefix with
/// capitals means the same table in every statement.
struct Names {
    prefix: String,
    tokens: String,
    schema: String,
    /// The NOTIFY channel, unquoted (as `pg_notify` takes it).
    channel: String,
}

impl Names {
    fn new(prefix: &str) -> Result<Self, StoreError> {
        // Identifiers are spliced into SQL text, so only a plain identifier is allowed;
        // 63 bytes is PostgreSQL's identifier limit and "_schema" is the longest suffix.
        let valid = !prefix.is_empty()
            && prefix.len() <= 63 - "_schema".len()
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !prefix.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(StoreError::Config(format!(
                "table prefix {prefix:?} must be letters, digits and '_', at most 56 characters"
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            tokens: format!("\"{prefix}_tokens\""),
            schema: format!("\"{prefix}_schema\""),
            channel: format!("{prefix}_tokens"),
        })
    }
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
        let column_err = |e: tokio_postgres::Error| corrupt(describe(&e));
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
                tracing::debug!(error = %describe(&e), "token store: unlock failed; closing the session frees the lock");
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

impl Shared {
    /// A new connection in `role`. Its driver task forwards notifications to the
    /// returned receiver and ends when the connection does.
    async fn connect(
        &self,
        role: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), tokio_postgres::Error> {
        let mut config = self.config.clone();
        config.application_name(format!("{}:{role}", self.app_name));
        Ok(match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                (client, drive(connection))
            }
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                (client, drive(connection))
            }
        })
    }

    /// The query connection, reconnecting (and re-checking the schema) when it is
    /// missing or closed.
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.query.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        *slot = None;
        let (mut client, _notifications) = self
            .connect("query")
            .await
            .map_err(|e| self.failed("connect", &e))?;
        migrate(&mut client, &self.names)
            .await
            .map_err(|e| match e {
                Migration::Db(e) => self.failed("schema migration", &e),
                Migration::Store(e) => e,
            })?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `op` on the query connection, bounded by `OP_TIMEOUT`, retrying once on
    /// a connection that turned out closed (a database restart since the last call
    /// should not cost a failed save). Keeps `healthy` current.
    async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let attempt = async {
            let mut retried = false;
            loop {
                let client = self.client().await?;
                match op(client.clone()).await {
                    Ok(value) => {
                        self.healthy.store(true, Ordering::Relaxed);
                        return Ok(value);
                    }
                    Err(e) if connection_lost(&e) || client.is_closed() => {
                        self.forget(&client).await;
                        if retried {
                            return Err(self.failed(what, &e));
                        }
                        retried = true;
                    }
                    Err(e) => return Err(self.failed(what, &e)),
                }
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => {
                // A connection that hangs is as good as closed.
                *self.query.lock().await = None;
                self.healthy.store(false, Ordering::Relaxed);
                Err(StoreError::Database(format!(
                    "{what}: no answer from PostgreSQL within {OP_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Drops `client` from the slot (if still there) so the next call reconnects,
    /// even before its driver task has noticed the connection is gone.
    async fn forget(&self, client: &Arc<Client>) {
        let mut slot = self.query.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *slot = None;
        }
    }

    fn failed(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        self.healthy.store(false, Ordering::Relaxed);
        StoreError::Database(format!("{what}: {}", describe(e)))
    }

    fn publish(&self, provider: &str) {
        // No receiver yet is fine: nobody is interested.
        let _ = self.events.send(provider.to_owned());
    }
}

/// Drives a connection and forwards its notifications.
fn drive<S, T>(mut connection: Connection<S, T>) -> mpsc::UnboundedReceiver<Notification>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    // Non-listening connections drop their receiver: ignore.
                    let _ = tx.send(note);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %describe(&e), "token store: database connection ended");
                    break;
                }
            }
        }
    });
    rx
}

enum Migration {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Migration {
    fn from(e: tokio_postgres::Error) -> Self {
        Migration::Db(e)
    }
}

/// Creates or upgrades the schema. A transaction-scoped advisory lock serialises
/// replicas that start together (concurrent `CREATE TABLE IF NOT EXISTS` can fail on
/// the catalog's unique index); the two-key lock form keeps it apart from the
/// one-key refresh locks.
async fn migrate(client: &mut Client, names: &Names) -> Result<(), Migration> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1), 0)",
        &[&names.prefix],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} (version int NOT NULL)",
        names.schema
    ))
    .await?;
    let current: Option<i32> = tx
        .query_one(&format!("SELECT max(version) FROM {}", names.schema), &[])
        .await?
        .try_get(0)?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(Migration::Store(StoreError::Config(format!(
            "table {} is at schema version {current}, newer than this authgate understands ({SCHEMA_VERSION}): upgrade authgate",
            names.schema
        ))));
    }
    for version in current + 1..=SCHEMA_VERSION {
        tx.batch_execute(&migration(names, version)).await?;
    }
    if current < SCHEMA_VERSION {
        tx.batch_execute(&format!(
            "DELETE FROM {s}; INSERT INTO {s} (version) VALUES ({SCHEMA_VERSION})",
            s = names.schema
        ))
        .await?;
        tracing::info!(table_prefix = %names.prefix, from = current, to = SCHEMA_VERSION, "token store: schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// The DDL that takes the schema from `version - 1` to `version`.
fn migration(names: &Names, version: i32) -> String {
    match version {
        // IF NOT EXISTS: a table created by hand (or by a crashed migration that
        // still committed the table) is adopted rather than an error.
        1 => format!(
            "CREATE TABLE IF NOT EXISTS {} ( \
               provider text PRIMARY KEY, \
               access_token text NOT NULL, \
               refresh_token text, \
               token_type text NOT NULL, \
               scope text, \
               expires_at_unix bigint, \
               generation bigint NOT NULL, \
               obtained_at_unix bigint NOT NULL, \
               fingerprint text NOT NULL, \
               encrypted bool NOT NULL DEFAULT false, \
               updated_at timestamptz NOT NULL DEFAULT now())",
            names.tokens
        ),
        _ => String::new(),
    }
}

async fn read_generations(
    client: &Client,
    names: &Names,
) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT provider, generation FROM {}", names.tokens),
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// The listener task: one LISTEN session at a time, reconnecting with capped,
/// jittered backoff (so a fleet does not reconnect in lockstep) until the store drops.
async fn listen_loop(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    mut known: HashMap<String, i64>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let mut established = false;
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = listen_session(&shared, &mut known, &mut established) => result,
        };
        if established {
            backoff = BACKOFF_MIN;
            failures = 0;
        }
        failures += 1;
        if let Err(e) = result {
            shared.healthy.store(false, Ordering::Relaxed);
            // Loud once per outage, quiet while it lasts.
            if failures == 1 {
                tracing::warn!(error = %e, "token store: lost the PostgreSQL notification connection; reconnecting");
            } else {
                tracing::debug!(error = %e, "token store: still reconnecting to PostgreSQL");
            }
        }
        let delay = backoff.mul_f64(rand::random_range(0.5..1.0));
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One LISTEN session. Returns only with an error (connection lost).
async fn listen_session(
    shared: &Shared,
    known: &mut HashMap<String, i64>,
    established: &mut bool,
) -> Result<(), StoreError> {
    // The query connection first: it creates the schema if the database was down at
    // start-up, so the polls below find the table.
    shared.run("reconnect", |_| async { Ok(()) }).await?;
    let (client, mut notifications) = shared
        .connect("listen")
        .await
        .map_err(|e| shared.failed("notification connection", &e))?;
    client
        .batch_execute(&format!("LISTEN \"{}\"", shared.names.channel))
        .await
        .map_err(|e| shared.failed("LISTEN", &e))?;
    *established = true;
    shared.healthy.store(true, Ordering::Relaxed);
    // Changes made while nobody listened show only in a re-read.
    let changed = poll(shared, &client, known).await?;
    if *shared.listening.borrow() > 0 {
        // A reconnect: replicas that refreshed on their own during the outage hold
        // tokens the row may not match even though its generation did not move, so
        // every provider is announced for them to reconcile.
        for provider in known.keys().filter(|p| !changed.contains(*p)) {
            shared.publish(provider);
        }
    }
    // Counted once caught up: from here on every change arrives as a notification.
    shared.listening.send_modify(|n| *n += 1);
    let start = tokio::time::Instant::now() + shared.poll_interval;
    let mut ticks = tokio::time::interval_at(start, shared.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = notifications.recv() => match note {
                Some(note) if note.channel() == shared.names.channel => shared.publish(note.payload()),
                Some(_) => {}
                None => return Err(StoreError::Database("notification connection closed".into())),
            },
            _ = ticks.tick() => {
                poll(shared, &client, known).await?;
            }
        }
    }
}

/// Safety net for lost notifications: emits every provider whose stored generation
/// differs from the last one seen, and returns them.
async fn poll(
    shared: &Shared,
    client: &Client,
    known: &mut HashMap<String, i64>,
) -> Result<Vec<String>, StoreError> {
    let current = read_generations(client, &shared.names)
        .await
        .map_err(|e| shared.failed("poll", &e))?;
    let mut changed = Vec::new();
    for (provider, generation) in current {
        if known.get(&provider) != Some(&generation) {
            shared.publish(&provider);
            known.insert(provider.clone(), generation);
            changed.push(provider);
        }
    }
    Ok(changed)
}

/// Whether `e` means the session is gone (rather than the statement failed): a
/// closed socket, or the server ending the session (restart, failover,
/// `pg_terminate_backend`) — SQLSTATE class 57P and class 08.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08"))
}

/// An error and its causes on one line (`tokio_postgres::Error`'s `Display` alone
/// says only "db error").
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------------
// URL and TLS

/// libpq's `sslmode` values. tokio-postgres knows only disable/prefer/require, so
/// the verifying modes are taken out of the URL and handled by the verifier here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    /// TLS when the server offers it, plaintext otherwise; certificate not checked.
    Prefer,
    /// TLS or nothing; certificate not checked (libpq semantics).
    Require,
    /// Certificate chain checked against the trust roots; host name not checked.
    VerifyCa,
    /// Chain and host name checked.
    VerifyFull,
}

/// `Debug` is safe: `Config`'s own `Debug` redacts the password.
#[derive(Debug)]
struct ParsedUrl {
    config: Config,
    mode: TlsMode,
    root_cert: Option<String>,
}

fn parse_url(url: &str) -> Result<ParsedUrl, StoreError> {
    let (rest, params) = take_tls_params(url);
    let mut sslmode = None;
    let mut root_cert = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            _ => root_cert = Some(value),
        }
    }
    let mode = match sslmode.as_deref() {
        Some("disable") => TlsMode::Disable,
        // tokio-postgres has no "allow" (plaintext first); prefer is the safer near
        // equivalent.
        None | Some("allow" | "prefer") => TlsMode::Prefer,
        // libpq: require with a root certificate behaves as verify-ca.
        Some("require") if root_cert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => {
            return Err(StoreError::Config(format!(
                "database URL: unknown sslmode {other:?} (known: disable, allow, prefer, require, verify-ca, verify-full)"
            )))
        }
    };
    // The parse error names the option, never its value, so the password stays out.
    let mut config = Config::from_str(&rest)
        .map_err(|e| StoreError::Config(format!("database URL: {}", describe(&e))))?;
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    Ok(ParsedUrl {
        config,
        mode,
        root_cert,
    })
}

/// Removes `sslmode` and `sslrootcert` from a URL (`postgres://…?sslmode=…`) or a
/// key/value string (`host=… sslmode=…`), returning the rest and what was removed.
fn take_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    const KEYS: [&str; 2] = ["sslmode", "sslrootcert"];
    let mut taken = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if KEYS.contains(&key) {
                taken.push((key.to_owned(), percent_decode(value)));
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, taken)
    } else {
        // Key/value form: only `key=value` words without quotes are recognised,
        // which is how these two options are written in practice.
        let mut rest = String::with_capacity(url.len());
        for word in url.split_inclusive(char::is_whitespace) {
            let trimmed = word.trim_end();
            match trimmed.split_once('=') {
                Some((key, value)) if KEYS.contains(&key) && !value.starts_with('\'') => {
                    taken.push((key.to_owned(), value.to_owned()));
                }
                _ => rest.push_str(word),
            }
        }
        (rest, taken)
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tls_connector(
    mode: TlsMode,
    root_cert: Option<&str>,
) -> Result<Option<MakeRustlsConnect>, StoreError> {
    if mode == TlsMode::Disable {
        return Ok(None);
    }
    // An explicit ring provider: no dependence on a process-wide default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_err = |e: &dyn std::error::Error| StoreError::Config(format!("database TLS: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?;
    let mut config = match mode {
        TlsMode::Prefer | TlsMode::Require | TlsMode::Disable => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = trust_roots(root_cert)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err(&e))?;
            if mode == TlsMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    // PostgreSQL 17+ checks this ALPN id; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(MakeRustlsConnect::new(config)))
}

/// `sslrootcert=PATH` (PEM) when given, else the operating system's trust store
/// (also for libpq's `sslrootcert=system`).
fn trust_roots(root_cert: Option<&str>) -> Result<rustls::RootCertStore, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) if path != "system" => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    StoreError::Config(format!("database TLS: sslrootcert {path}: {e}"))
                })?;
            roots.add_parsable_certificates(certs);
        }
        _ => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "token store: skipping an unreadable OS trust root");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Config(
            "database TLS: no trust roots for sslmode=verify-ca/verify-full".into(),
        ));
    }
    Ok(roots)
}

/// `sslmode=prefer`/`require`: encryption without authentication, as in libpq. The
/// certificate is accepted as it is, but the handshake signatures are still checked,
/// so the session is bound to whatever key the server presented.
#[derive(Debug)]
struct AnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the full webpki check, except that a certificate for another
/// host name is accepted (webpki checks the chain before the name, so reaching the
/// name error means the chain was good).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
#[path = "postgres/tests.rs"]
mod tests;
