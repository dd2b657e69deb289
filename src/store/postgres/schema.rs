//! The store's tables: their names from the configured prefix, the schema and its
//! migrations, and the one query the listener polls with.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::store::token_store::StoreError;

/// Schema version this build writes. A database at a newer version is refused rather
/// than misread.
pub(super) const SCHEMA_VERSION: i32 = 1;

/// SQL names derived from the validated prefix. Tables are quoted so a prefix with
/// capitals means the same table in every statement.
pub(super) struct Names {
    pub(super) prefix: String,
    pub(super) tokens: String,
    pub(super) schema: String,
    /// The NOTIFY channel, unquoted (as `pg_notify` takes it).
    pub(super) channel: String,
}

impl Names {
    pub(super) fn new(prefix: &str) -> Result<Self, StoreError> {
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

pub(super) enum Migration {
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
pub(super) async fn migrate(client: &mut Client, names: &Names) -> Result<(), Migration> {
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

pub(super) async fn read_generations(
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
