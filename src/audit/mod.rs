//! The audit log: one JSON object per line for every request and every token
//! refresh (DESIGN.md, "Audit log"). The request path only hands a record to a
//! bounded channel; a background writer on its own thread serializes, chains
//! (`chain`), writes and rotates (`rotation`). If the writer falls behind, or the
//! disk refuses writes, lines are dropped and counted, never waited for, and the
//! log itself records how many went missing. `verify` checks a log's chain.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{Audit, AuditTarget};
use crate::metrics::Metrics;
use crate::secret::SecretError;

pub mod chain;
mod record;
pub mod rotation;
pub mod verify;
mod writer;

pub use chain::ChainKey;
pub use record::{HandOutEvent, RequestRecord, TokenEvent};
pub use rotation::{Clock, SystemClock};

use record::Line;
use writer::Shared;

/// Why the audit log could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("key: {0}")]
    Key(#[from] SecretError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The chain key `[audit] key_env`/`key_file` names, else plain SHA-256.
pub fn chain_key(cfg: &Audit) -> Result<ChainKey, SecretError> {
    match &cfg.key {
        Some(src) => Ok(ChainKey::hmac(src.load()?.expose().as_bytes())),
        None => Ok(ChainKey::plain()),
    }
}

/// Handle to the background writer. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<Line>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    /// Opens the target and starts the writer. The returned handle finishes when
    /// every sink clone is dropped and the last line is written.
    pub async fn start(
        cfg: &Audit,
        metrics: Arc<Metrics>,
    ) -> Result<(AuditSink, tokio::task::JoinHandle<()>), AuditError> {
        Self::start_with_clock(cfg, metrics, Arc::new(SystemClock)).await
    }

    /// As `start`, with the clock that decides time rotation.
    pub async fn start_with_clock(
        cfg: &Audit,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<(AuditSink, tokio::task::JoinHandle<()>), AuditError> {
        let key = chain_key(cfg)?;
        let target = match &cfg.target {
            AuditTarget::Stdout => writer::Target::Stdout,
            AuditTarget::File(path) => writer::Target::File {
                path: path.clone(),
                rotate: cfg.rotate,
                keep: cfg.keep,
            },
        };
        let shared = Arc::new(Shared::default());
        let (s, m) = (shared.clone(), metrics.clone());
        let w = tokio::task::spawn_blocking(move || writer::Writer::open(target, key, clock, s, m))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let (tx, rx) = mpsc::channel(cfg.buffer);
        let task = tokio::task::spawn_blocking(move || w.run(rx));
        Ok((
            AuditSink {
                tx,
                shared,
                metrics,
            },
            task,
        ))
    }

    pub fn request(&self, rec: RequestRecord) {
        self.send(Line::Request(Box::new(rec)));
    }

    pub fn token(&self, ev: TokenEvent) {
        self.send(Line::Token(ev));
    }

    pub fn hand_out(&self, ev: HandOutEvent) {
        self.send(Line::HandOut(ev));
    }

    /// Closes and reopens the file by its name before the next line (for external
    /// rotators: after they move the file, lines go to a new one at the path).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // A full queue wakes the writer anyway; it reads the flag first.
        let _ = self.tx.try_send(Line::Wake);
    }

    fn send(&self, line: Line) {
        if self.tx.try_send(line).is_err() {
            // Counted here; the writer records the gap in the log once it catches
            // up, so a burst of drops is one line, not one per request.
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.audit_dropped(1);
        }
    }
}

#[cfg(test)]
mod testutil;
