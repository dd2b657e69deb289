//! The listener task: one LISTEN session at a time, forwarding other replicas'
//! notifications and polling generations as a safety net; it reconnects with
//! backoff until the store drops.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::schema::read_generations;
use super::session::Shared;
use crate::store::token_store::StoreError;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The listener task: one LISTEN session at a time, reconnecting with capped,
/// jittered backoff (so a fleet does not reconnect in lockstep) until the store drops.
pub(super) async fn listen_loop(
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
