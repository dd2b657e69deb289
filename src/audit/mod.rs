//! The audit log: one JSON object per line for every request and every token
//! refresh (DESIGN.md, "Audit log"). The request path only hands a record to a
//! bounded channel; a background writer on its own thread serializes, chains
//! (`chain`), writes and rotates (`rotation`). If the writer falls behind, or the
//! disk refuses writes, lines are dropped and counted, never waited for, and the
//! log itself records how many went missing. `verify` checks a log's chain.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Audit, AuditTarget};
use crate::metrics::Metrics;
use crate::secret::SecretError;

pub mod chain;
pub mod rotation;
pub mod verify;
mod writer;

pub use chain::ChainKey;
pub use rotation::{Clock, SystemClock};

/// One proxied (or refused) request.
#[derive(Debug, Serialize)]
pub struct RequestRecord {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    #[serde(serialize_with = "header_str")]
    pub request_id: http::HeaderValue,
    pub caller: Option<Arc<str>>,
    pub client_addr: std::net::SocketAddr,
    pub route: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    #[serde(serialize_with = "method_str")]
    pub method: http::Method,
    /// The caller's path, without the query string (queries may carry secrets).
    pub path: String,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub duration_ms: u64,
    pub token_generation: Option<u64>,
    pub replayed: bool,
    pub error: Option<&'static str>,
}

/// One token request to an IdP (or adoption of a stored one).
#[derive(Debug, Clone, Serialize)]
pub struct TokenEvent {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub event: &'static str,
    pub provider: Arc<str>,
    pub trigger: &'static str,
    pub outcome: &'static str,
    pub generation: Option<u64>,
    pub expires_in_s: Option<u64>,
    pub duration_ms: u64,
    /// OAuth error code or failure kind; never a token, secret or IdP body.
    pub error: Option<String>,
}

/// A token handed out by the broker API (`/.authgate/token/{provider}`).
#[derive(Debug, Serialize)]
pub struct HandOutEvent {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub event: &'static str,
    pub request_id: String,
    pub caller: Option<String>,
    pub client_addr: String,
    pub provider: Arc<str>,
    pub status: u16,
    pub token_generation: Option<u64>,
}

#[derive(Debug)]
enum Line {
    Request(Box<RequestRecord>),
    Token(TokenEvent),
    HandOut(HandOutEvent),
    /// Nothing to write: wakes the writer to look at its flags (reopen).
    Wake,
}

// The request path hands over what it already holds (header value, method, socket
// address); turning them into text is the writer task's job.
fn header_str<S: serde::Serializer>(v: &http::HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.to_str().unwrap_or_default())
}

fn method_str<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

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

/// What the request path and the writer share: counters and flags, no lock.
#[derive(Debug, Default)]
struct Shared {
    /// Lines refused because the queue was full.
    dropped: AtomicU64,
    reopen: AtomicBool,
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
