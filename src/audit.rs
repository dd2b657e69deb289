//! The audit log: one JSON object per line for every request and every token
//! refresh (DESIGN.md, "Audit log"). The request path only hands a record to a
//! bounded channel; a background task serializes and writes. If the writer falls
//! behind, lines are dropped, counted and logged, never waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::{Audit, AuditTarget};
use crate::metrics::Metrics;

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
#[derive(Debug, Serialize)]
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

/// Handle to the background writer. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<Line>,
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    /// Opens the target and starts the writer. The returned handle finishes when
    /// every sink clone is dropped and the last line is flushed.
    pub async fn start(
        cfg: &Audit,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(AuditSink, tokio::task::JoinHandle<()>)> {
        let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &cfg.target {
            AuditTarget::Stdout => Box::new(tokio::io::stdout()),
            AuditTarget::File(path) => {
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() {
                        tokio::fs::create_dir_all(dir).await?;
                    }
                }
                let mut opts = tokio::fs::OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                opts.mode(0o600);
                Box::new(opts.open(path).await?)
            }
        };
        let (tx, rx) = mpsc::channel(cfg.buffer);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_lines(rx, out, dropped.clone()));
        Ok((
            AuditSink {
                tx,
                dropped,
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

    fn send(&self, line: Line) {
        if self.tx.try_send(line).is_err() {
            // Counted here; the writer reports the gap once it catches up, so a
            // burst of drops is one log line, not one per request.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.audit_dropped(1);
        }
    }
}

async fn write_lines(
    mut rx: mpsc::Receiver<Line>,
    mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut reported = 0u64;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch whatever is queued into one write.
        while let Some(line) = next {
            let res = match &line {
                Line::Request(r) => serde_json::to_writer(&mut buf, r),
                Line::Token(t) => serde_json::to_writer(&mut buf, t),
                Line::HandOut(h) => serde_json::to_writer(&mut buf, h),
            };
            if res.is_ok() {
                buf.push(b'\n');
            }
            next = if buf.len() < 256 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = out.write_all(&buf).await {
            tracing::error!(error = %e, "audit log write failed; lines lost");
        }
        let _ = out.flush().await;
        buf.clear();
        let now = dropped.load(Ordering::Relaxed);
        if now != reported {
            tracing::warn!(
                dropped = now - reported,
                total = now,
                "audit writer fell behind; lines were dropped"
            );
            reported = now;
        }
    }
    let _ = out.flush().await;
}
