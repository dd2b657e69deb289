//! The store's connections to PostgreSQL: a new one per role (its driver task
//! forwards notifications), and the shared *query* connection, reconnected (and the
//! schema re-checked) when it breaks, each call bounded by a timeout.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, NoTls, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::schema::{migrate, Migration, Names};
use super::url::TlsMode;
use crate::cause::chain;
use crate::store::crypto::Cipher;
use crate::store::token_store::StoreError;

/// Upper bound on one load/save (connect + migrate + query).
const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the store, its listener task and its leases share.
pub(super) struct Shared {
    /// Holds the password: never logged, never in `Debug`.
    pub(super) config: Config,
    pub(super) tls: Option<MakeRustlsConnect>,
    pub(super) tls_mode: TlsMode,
    pub(super) names: Names,
    pub(super) cipher: Option<Arc<Cipher>>,
    /// `{base}:{replica}`; each connection appends its role.
    pub(super) app_name: String,
    pub(super) healthy: AtomicBool,
    /// `tokio` mutex: held across the (re)connect so only one caller reconnects.
    pub(super) query: tokio::sync::Mutex<Option<Arc<Client>>>,
    pub(super) events: broadcast::Sender<String>,
    /// Counts LISTEN sessions established, so tests can wait for a reconnect.
    pub(super) listening: watch::Sender<u64>,
    pub(super) lock_wait: Duration,
    pub(super) poll_interval: Duration,
}

impl Shared {
    /// A new connection in `role`. Its driver task forwards notifications to the
    /// returned receiver and ends when the connection does.
    pub(super) async fn connect(
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
    pub(super) async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
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

    pub(super) fn failed(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        self.healthy.store(false, Ordering::Relaxed);
        StoreError::Database(format!("{what}: {}", chain(e)))
    }

    pub(super) fn publish(&self, provider: &str) {
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
                    tracing::debug!(error = %chain(&e), "token store: database connection ended");
                    break;
                }
            }
        }
    });
    rx
}

/// Whether `e` means the session is gone (rather than the statement failed): a
/// closed socket, or the server ending the session (restart, failover,
/// `pg_terminate_backend`) — SQLSTATE class 57P and class 08.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08"))
}
