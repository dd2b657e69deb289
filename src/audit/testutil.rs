//! Writers on a temp folder with a hand-moved clock, for the writer and verify tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::chain::ChainKey;
use super::record::{Line, TokenEvent};
use super::rotation::Clock;
use super::writer::{Shared, Target, Writer};
use crate::config::Rotate;
use crate::metrics::Metrics;

#[derive(Debug)]
pub(crate) struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub(crate) fn at(rfc3339: &str) -> Arc<Self> {
        Arc::new(ManualClock(Mutex::new(
            humantime::parse_rfc3339(rfc3339).unwrap(),
        )))
    }

    pub(crate) fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

pub(crate) struct Log {
    pub(crate) path: PathBuf,
    pub(crate) rotate: Rotate,
    pub(crate) keep: Option<usize>,
    pub(crate) key: ChainKey,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Log {
    pub(crate) fn new(dir: &Path, rotate: Rotate) -> Log {
        Log {
            path: dir.join("audit.log"),
            rotate,
            keep: None,
            key: ChainKey::hmac(b"test-audit-key"),
            clock: ManualClock::at("2026-12-05T10:00:00Z"),
            shared: Arc::new(Shared::default()),
            metrics: Metrics::new(),
        }
    }

    /// A writer as the gateway starts one (reads where the chain stands).
    pub(crate) fn writer(&self) -> Writer {
        Writer::open(
            Target::File {
                path: self.path.clone(),
                rotate: self.rotate,
                keep: self.keep,
            },
            self.key.clone(),
            self.clock.clone(),
            self.shared.clone(),
            self.metrics.clone(),
        )
        .unwrap()
    }

    pub(crate) fn dropped(&self) -> u64 {
        let text = self.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("authgate_audit_dropped_total "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The files of the log, oldest first.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        super::verify::log_files(&self.path).unwrap()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

impl Log {
    /// `n` token events stamped with the clock's time, numbered from `from` in
    /// their `provider` field.
    pub(crate) fn events(&self, from: usize, n: usize) -> impl Iterator<Item = Line> {
        let ts = self.clock.now();
        (from..from + n).map(move |i| {
            Line::Token(TokenEvent {
                ts,
                event: "token_refresh",
                provider: format!("p{i}").into(),
                trigger: "startup",
                outcome: "ok",
                generation: Some(i as u64),
                expires_in_s: Some(3600),
                duration_ms: 1,
                error: None,
            })
        })
    }
}
