//! The background writer: serializes, chains and writes the lines the request path
//! queued, rotates and prunes files, reopens on request, and survives a disk that
//! refuses writes. It runs on its own blocking thread, so file system calls (and a
//! slow disk) never touch the runtime's workers.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::chain::{self, ChainKey, ChainState};
use super::record::Line;
use super::rotation::{self, Clock};
use crate::config::Rotate;
use crate::metrics::Metrics;

/// What the request path and the writer share: counters and flags, no lock.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Lines refused because the queue was full.
    pub(super) dropped: AtomicU64,
    pub(super) reopen: AtomicBool,
}

/// A batch written in one system call stops growing here.
const BATCH_BYTES: usize = 256 * 1024;
/// How long the writer waits after a batch before it takes the next one.
const LINGER: Duration = Duration::from_millis(2);
/// Lines taken from the queue between two looks at the clock and the flags.
const BATCH_LINES: usize = 4096;
/// After a failed rename, rotation is not retried sooner than this.
const ROTATE_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(super) enum Target {
    Stdout,
    File {
        path: PathBuf,
        rotate: Rotate,
        keep: Option<usize>,
    },
}

#[derive(Debug)]
enum Out {
    Stdout(std::io::Stdout),
    File(File),
}

impl Out {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout(s) => {
                let mut lock = s.lock();
                lock.write_all(bytes)?;
                lock.flush()
            }
            Out::File(f) => f.write_all(bytes),
        }
    }
}

#[derive(Debug)]
pub(super) struct Writer {
    target: Target,
    key: ChainKey,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    /// Where the chain stands after the last line written.
    state: ChainState,
    /// `None` after a failed write: reopened before the next batch.
    out: Option<Out>,
    /// Bytes in the current file (all of them whole lines).
    file_len: u64,
    /// When the current file was started; names it once rotated.
    file_start: SystemTime,
    rotate_blocked_until: Option<SystemTime>,
    buf: Vec<u8>,
    /// Lines lost to write errors, and queue drops already seen, not yet recorded
    /// in the log itself.
    lost_write: u64,
    lost_queue: u64,
    queue_seen: u64,
    failing: bool,
}

impl Writer {
    /// Opens the target and finds where the chain stands: the last whole line of
    /// the newest file. A file whose last line is torn (a crash mid-write) is set
    /// aside under its rotated name, torn line and all, and a new file started.
    pub(super) fn open(
        target: Target,
        key: ChainKey,
        clock: Arc<dyn Clock>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Writer> {
        let now = clock.now();
        let mut w = Writer {
            target,
            key,
            clock,
            shared,
            metrics,
            state: ChainState::START,
            out: None,
            file_len: 0,
            file_start: now,
            rotate_blocked_until: None,
            buf: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
            lost_write: 0,
            lost_queue: 0,
            queue_seen: 0,
            failing: false,
        };
        if let Target::File { path, .. } = &w.target {
            let path = path.clone();
            if let Some(dir) = path.parent() {
                if !dir.as_os_str().is_empty() {
                    std::fs::create_dir_all(dir)?;
                }
            }
            if set_aside_unchained(&path, w.clock.now())? {
                tracing::warn!(file = %path.display(), "the audit log's last line carries no seq/chain (written before chaining); that file was set aside and a new chain starts at seq 1");
            }
            w.state = resume_state(&path)?;
        }
        w.open_out()?;
        Ok(w)
    }

    /// Runs until every sender is gone and the queue is drained.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Line>) {
        while let Some(first) = rx.blocking_recv() {
            let mut first = Some(first);
            let mut taken = 0;
            // Bounded, so that under a queue that never empties the flags, the
            // clock and the drop counter are still looked at between batches.
            let batch = std::iter::from_fn(|| {
                if taken == BATCH_LINES {
                    return None;
                }
                taken += 1;
                first.take().or_else(|| rx.try_recv().ok())
            });
            self.write_batch(batch);
            // Let lines gather before looking at the queue again: a writer that
            // finds it empty parks, and every sender after that pays a wake-up
            // system call on the request path. Under load this keeps it from
            // ever parking; idle, it parks after one linger.
            std::thread::sleep(LINGER);
        }
    }

    /// Writes what arrived together, in as few system calls as the batch size and
    /// rotation allow.
    pub(super) fn write_batch(&mut self, lines: impl Iterator<Item = Line>) {
        if self.shared.reopen.swap(false, Ordering::AcqRel) {
            self.reopen();
        }
        if self.out.is_none() {
            if let Err(e) = self.open_out() {
                self.fail(
                    &e,
                    lines.filter(|l| !matches!(l, Line::Wake)).count() as u64,
                );
                return;
            }
        }
        let now = self.clock.now();
        self.maybe_rotate_by_time(now);
        if self.file_len == 0 {
            // A file is named by the time of its first line, not of its opening.
            self.file_start = now;
        }
        let queue_total = self.shared.dropped.load(Ordering::Relaxed);
        if queue_total != self.queue_seen {
            tracing::warn!(
                dropped = queue_total - self.queue_seen,
                total = queue_total,
                "audit writer fell behind; lines were dropped"
            );
            self.lost_queue += queue_total - self.queue_seen;
            self.queue_seen = queue_total;
        }

        let mut committed = self.state;
        let mut pending = 0u64;
        if self.lost_queue + self.lost_write > 0 {
            // Not counted in `pending`: if it cannot be written, it is written
            // later, with the larger numbers.
            self.push_gap(now);
        }
        let mut lines = lines.filter(|l| !matches!(l, Line::Wake));
        while self.out.is_some() {
            let Some(line) = lines.next() else { break };
            let start = self.buf.len();
            let before = self.state;
            if !self.push_line(&line) {
                continue;
            }
            pending += 1;
            if let Some(limit) = self.size_limit() {
                let len = self.buf.len() as u64;
                // Rotate before a line that would take a non-empty file past the
                // limit; a single line longer than the limit gets a file of its own.
                if self.file_len + len > limit && self.file_len + start as u64 > 0 {
                    if !self.flush(start, before, &mut committed, &mut pending) {
                        break;
                    }
                    self.rotate(now);
                }
            }
            if self.buf.len() >= BATCH_BYTES {
                let end = self.buf.len();
                if !self.flush(end, self.state, &mut committed, &mut pending) {
                    break;
                }
            }
        }
        if self.out.is_some() {
            let end = self.buf.len();
            self.flush(end, self.state, &mut committed, &mut pending);
        }
        if self.out.is_none() {
            // What was not written is lost with the failed write; the chain goes
            // on from the last line that was.
            let lost = pending + lines.count() as u64;
            self.state = committed;
            self.buf.clear();
            self.lost_write += lost;
            self.metrics.audit_dropped(lost);
        }
    }

    /// Writes `buf[..end]` (which ends after a whole line; `at_end` is the chain
    /// state there). On failure the chain goes back to the last line written and
    /// everything not written counts as lost.
    fn flush(
        &mut self,
        end: usize,
        at_end: ChainState,
        committed: &mut ChainState,
        pending: &mut u64,
    ) -> bool {
        if end == 0 {
            return true;
        }
        let Some(out) = self.out.as_mut() else {
            return false;
        };
        match out.write_all(&self.buf[..end]) {
            Ok(()) => {
                self.file_len += end as u64;
                self.buf.drain(..end);
                *committed = at_end;
                // Lines after `end` (at most the one that waits for a rotation).
                *pending = u64::from(!self.buf.is_empty());
                if self.failing {
                    self.failing = false;
                    tracing::warn!(
                        lost = self.lost_write,
                        "audit log writable again; the lines lost meanwhile are recorded in it"
                    );
                }
                self.lost_write = 0;
                self.lost_queue = 0;
                true
            }
            Err(e) => {
                // Take a half-written batch back out, so the file holds whole lines.
                if let Some(Out::File(f)) = &self.out {
                    let _ = f.set_len(self.file_len);
                }
                self.state = *committed;
                self.buf.clear();
                let lost = *pending;
                *pending = 0;
                self.fail(&e, lost);
                false
            }
        }
    }

    fn fail(&mut self, e: &std::io::Error, lost: u64) {
        self.out = None;
        self.lost_write += lost;
        self.metrics.audit_dropped(lost);
        if !self.failing {
            self.failing = true;
            tracing::error!(
                error = %e,
                file = %self.describe(),
                "audit log cannot be written; lines are counted as dropped until it can"
            );
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Stdout => "-".into(),
            Target::File { path, .. } => path.display().to_string(),
        }
    }

    /// Serializes and seals one record; false for a record serde refuses.
    fn push_line(&mut self, line: &Line) -> bool {
        let start = self.buf.len();
        let res = match line {
            Line::Request(r) => serde_json::to_writer(&mut self.buf, r),
            Line::Token(t) => serde_json::to_writer(&mut self.buf, t),
            Line::HandOut(h) => serde_json::to_writer(&mut self.buf, h),
            Line::Wake => return false,
        };
        if res.is_err() {
            self.buf.truncate(start);
            return false;
        }
        self.state.seal(&self.key, &mut self.buf, start);
        true
    }

    /// A line that says how many lines are missing before it, and why.
    fn push_gap(&mut self, now: SystemTime) {
        let start = self.buf.len();
        let gap = Gap {
            ts: now,
            event: "audit_lines_lost",
            queue_full: self.lost_queue,
            write_failed: self.lost_write,
        };
        if serde_json::to_writer(&mut self.buf, &gap).is_ok() {
            self.state.seal(&self.key, &mut self.buf, start);
        } else {
            self.buf.truncate(start);
        }
    }

    fn size_limit(&self) -> Option<u64> {
        match self.target {
            Target::File {
                rotate: Rotate::Size(n),
                ..
            } => Some(n),
            _ => None,
        }
    }

    fn maybe_rotate_by_time(&mut self, now: SystemTime) {
        let Target::File { rotate, .. } = self.target else {
            return;
        };
        if !matches!(rotate, Rotate::Hourly | Rotate::Daily) {
            return;
        }
        if rotation::period_start(rotate, now) == rotation::period_start(rotate, self.file_start) {
            return;
        }
        if self.file_len == 0 {
            self.file_start = now;
        } else {
            self.rotate(now);
        }
    }

    /// Renames the current file to its start time and starts a new one.
    fn rotate(&mut self, now: SystemTime) {
        let Target::File { path, rotate, keep } = &self.target else {
            return;
        };
        if self.rotate_blocked_until.is_some_and(|t| now < t) {
            return;
        }
        let (path, rotate, keep) = (path.clone(), *rotate, *keep);
        self.out = None;
        let to = rotation::rotated_name(&path, rotation::period_start(rotate, self.file_start));
        if let Err(e) = std::fs::rename(&path, &to) {
            tracing::error!(error = %e, file = %path.display(), "cannot rotate the audit log; writing on to the same file");
            self.rotate_blocked_until = Some(now + ROTATE_RETRY);
        } else {
            self.rotate_blocked_until = None;
            if let Some(keep) = keep {
                if let Err(e) = rotation::prune(&path, keep) {
                    tracing::warn!(error = %e, file = %path.display(), "cannot delete old audit files");
                }
            }
        }
        if let Err(e) = self.open_out() {
            self.fail(&e, 0);
        }
    }

    /// Closes and opens the file again by its name: after an external rotator
    /// moved it, lines go to a new file at the configured path.
    fn reopen(&mut self) {
        if matches!(self.target, Target::Stdout) {
            return;
        }
        self.out = None;
        match self.open_out() {
            Ok(()) => tracing::info!(file = %self.describe(), "audit log reopened"),
            Err(e) => self.fail(&e, 0),
        }
    }

    fn open_out(&mut self) -> std::io::Result<()> {
        let path = match &self.target {
            Target::Stdout => {
                self.out = Some(Out::Stdout(std::io::stdout()));
                return Ok(());
            }
            Target::File { path, rotate, .. } => {
                let (path, rotate) = (path.clone(), *rotate);
                if set_aside_torn(&path, rotate)? {
                    tracing::warn!(file = %path.display(), "the audit log's last line was torn (a crash mid-write); that file was set aside and a new one started");
                }
                path
            }
        };
        let file = open_append(&path)?;
        let meta = file.metadata()?;
        self.file_len = if meta.is_file() { meta.len() } else { 0 };
        self.file_start = if self.file_len > 0 {
            first_line_ts(&path).unwrap_or_else(|| self.clock.now())
        } else {
            self.clock.now()
        };
        self.out = Some(Out::File(file));
        Ok(())
    }
}

#[derive(serde::Serialize)]
struct Gap {
    #[serde(serialize_with = "super::record::rfc3339")]
    ts: SystemTime,
    event: &'static str,
    queue_full: u64,
    write_failed: u64,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// The last whole line of a regular file, and whether bytes follow it (a torn
/// line). `None` for an empty file, one that is not a regular file, or none at all.
pub(super) fn last_line(path: &Path) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let len = meta.len();
    let mut window = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(window);
        f.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::with_capacity((len - from) as usize);
        Read::take(&mut f, len - from).read_to_end(&mut tail)?;
        let torn = tail.last() != Some(&b'\n');
        let body = if torn {
            // Up to and including the last newline: the whole lines.
            match tail.iter().rposition(|&b| b == b'\n') {
                Some(i) => &tail[..=i],
                None if from == 0 => return Ok(Some((Vec::new(), true))),
                None => {
                    window *= 4;
                    continue;
                }
            }
        } else {
            &tail[..]
        };
        let body = &body[..body.len() - 1];
        match body.iter().rposition(|&b| b == b'\n') {
            Some(i) => return Ok(Some((body[i + 1..].to_vec(), torn))),
            None if from == 0 => return Ok(Some((body.to_vec(), torn))),
            None => window *= 4,
        }
    }
}

/// Where the chain stands on disk: after the last whole line of the active file,
/// else of the newest rotated file; the start when there is none.
fn resume_state(path: &Path) -> std::io::Result<ChainState> {
    let mut candidates = vec![path.to_path_buf()];
    candidates.extend(rotation::rotated_files(path)?.into_iter().rev());
    for file in candidates {
        let Some((line, _torn)) = last_line(&file)? else {
            continue;
        };
        if line.is_empty() {
            continue;
        }
        return Ok(match chain::parse(&line) {
            Some(p) => ChainState {
                seq: p.seq,
                chain: p.chain,
            },
            // A rotated file from before chaining: the chain starts anew.
            None => ChainState::START,
        });
    }
    Ok(ChainState::START)
}

/// Moves an active file whose last whole line carries no chain (a log written
/// before chaining) aside under its rotated name, so the new chain starts in a
/// file of its own; true when it did.
fn set_aside_unchained(path: &Path, now: SystemTime) -> std::io::Result<bool> {
    match last_line(path)? {
        Some((line, _)) if !line.is_empty() && chain::parse(&line).is_none() => {
            let start = first_line_ts(path).unwrap_or(now);
            std::fs::rename(path, rotation::rotated_name(path, start))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Moves a file whose last line is torn aside under its rotated name; true when
/// it did. Appending to it would glue the next line onto the torn one.
fn set_aside_torn(path: &Path, rotate: Rotate) -> std::io::Result<bool> {
    match last_line(path)? {
        Some((_, true)) => {
            let start = first_line_ts(path).unwrap_or_else(SystemTime::now);
            let to = rotation::rotated_name(path, rotation::period_start(rotate, start));
            std::fs::rename(path, to)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The `ts` of a file's first line: when the file was started.
fn first_line_ts(path: &Path) -> Option<SystemTime> {
    let f = File::open(path).ok()?;
    let mut head = Vec::new();
    f.take(64 * 1024).read_to_end(&mut head).ok()?;
    let end = head.iter().position(|&b| b == b'\n')?;
    #[derive(serde::Deserialize)]
    struct Ts<'a> {
        ts: &'a str,
    }
    let ts: Ts<'_> = serde_json::from_slice(&head[..end]).ok()?;
    humantime::parse_rfc3339_weak(ts.ts).ok()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Log;
    use super::super::verify::{verify, Outcome};
    use super::*;

    fn text(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    fn assert_verifies(log: &Log, lines: u64, seqs: (u64, u64)) -> Vec<String> {
        let report = verify(&log.files(), &log.key).unwrap();
        assert_eq!(
            report.outcome,
            Outcome::Ok {
                lines,
                seqs: Some(seqs)
            },
            "{report}"
        );
        report.notes
    }

    #[test]
    fn lines_carry_seq_and_chain_last_and_a_restart_continues_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        log.writer().write_batch(log.events(0, 3));
        let first = text(&log.path);
        let line1: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(line1["seq"], 1);
        assert_eq!(line1["provider"], "p0");
        assert!(first.lines().all(|l| l.contains(",\"seq\":")
            && l.ends_with("\"}")
            && l.rfind(",\"chain\":\"") == Some(l.len() - 76)));
        // A restart: a new writer on the same file.
        log.writer().write_batch(log.events(3, 2));
        let lines: Vec<serde_json::Value> = text(&log.path)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seqs: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert!(assert_verifies(&log, 5, (1, 5)).is_empty());
        assert!(!text(&log.path).contains("test-audit-key"));
    }

    #[test]
    fn size_rotation_keeps_lines_whole_and_the_chain_runs_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Size(1000));
        let mut w = log.writer();
        w.write_batch(log.events(0, 10));
        log.clock.advance(Duration::from_secs(1));
        w.write_batch(log.events(10, 10));
        let files = log.files();
        assert!(files.len() >= 4, "{:?}", log.names());
        for f in &files {
            let t = text(f);
            assert!(t.len() <= 1000, "{} is {} bytes", f.display(), t.len());
            assert!(t.ends_with('\n'));
        }
        assert!(log.names()[0].starts_with("audit.log.2026-12-05T10-00-00Z"));
        assert_eq!(log.names().last().unwrap(), "audit.log");
        assert_verifies(&log, 20, (1, 20));
        // A restart picks up the size of the active file.
        let before = log.files().len();
        log.writer().write_batch(log.events(20, 10));
        assert!(log.files().len() > before);
        assert_verifies(&log, 30, (1, 30));
    }

    #[test]
    fn time_rotation_names_files_by_the_utc_start_of_their_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::new(dir.path(), Rotate::Hourly);
        log.clock = super::super::testutil::ManualClock::at("2026-12-05T10:59:59Z");
        let mut w = log.writer();
        w.write_batch(log.events(0, 2));
        log.clock.advance(Duration::from_secs(1));
        w.write_batch(log.events(2, 2));
        // An hour with no line makes no file.
        log.clock.advance(Duration::from_secs(2 * 3600));
        w.write_batch(log.events(4, 1));
        assert_eq!(
            log.names(),
            [
                "audit.log.2026-12-05T10-00-00Z",
                "audit.log.2026-12-05T11-00-00Z",
                "audit.log"
            ]
        );
        assert_eq!(text(&log.files()[0]).lines().count(), 2);
        assert_verifies(&log, 5, (1, 5));

        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::new(dir.path(), Rotate::Daily);
        log.clock = super::super::testutil::ManualClock::at("2026-12-05T23:59:00Z");
        log.writer().write_batch(log.events(0, 1));
        // A restart on the next day rotates yesterday's file before the first line.
        log.clock.advance(Duration::from_secs(120));
        log.writer().write_batch(log.events(1, 1));
        assert_eq!(log.names(), ["audit.log.2026-12-05T00-00-00Z", "audit.log"]);
        assert_verifies(&log, 2, (1, 2));
    }

    #[test]
    fn keep_prunes_the_oldest_and_verify_starts_at_the_oldest_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::new(dir.path(), Rotate::Hourly);
        log.keep = Some(2);
        let mut w = log.writer();
        for i in 0..5 {
            w.write_batch(log.events(i * 3, 3));
            log.clock.advance(Duration::from_secs(3600));
        }
        assert_eq!(
            log.names(),
            [
                "audit.log.2026-12-05T12-00-00Z",
                "audit.log.2026-12-05T13-00-00Z",
                "audit.log"
            ]
        );
        let notes = assert_verifies(&log, 9, (7, 15));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("seq 7") && notes[0].contains("taken as given"));
    }

    #[test]
    fn a_torn_last_line_is_set_aside_and_the_chain_goes_on_from_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        log.writer().write_batch(log.events(0, 3));
        let whole = text(&log.path);
        // A crash in the middle of the third line.
        let cut = whole.len() - 40;
        std::fs::write(&log.path, &whole[..cut]).unwrap();
        log.writer().write_batch(log.events(3, 2));
        let names = log.names();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(text(&log.files()[0]).ends_with(&whole[cut - 10..cut]));
        let lines: Vec<serde_json::Value> = text(&log.path)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["seq"], 3, "the torn seq 3 was never written whole");
        let notes = assert_verifies(&log, 4, (1, 4));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains(":3: torn last line"), "{notes:?}");
    }

    #[test]
    fn reopen_follows_an_external_rotator() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        let mut w = log.writer();
        w.write_batch(log.events(0, 2));
        let moved = dir.path().join("audit.log.1");
        std::fs::rename(&log.path, &moved).unwrap();
        w.write_batch(log.events(2, 1));
        assert_eq!(text(&moved).lines().count(), 3, "still the open file");
        log.shared.reopen.store(true, Ordering::Release);
        w.write_batch(std::iter::once(Line::Wake).chain(log.events(3, 2)));
        assert_eq!(text(&log.path).lines().count(), 2);
        let report = verify(&[moved, log.path.clone()], &log.key).unwrap();
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn the_run_loop_writes_every_queued_line_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        let n = 3 * BATCH_LINES + 7;
        let (tx, rx) = mpsc::channel(n);
        for line in log.events(0, n) {
            tx.try_send(line).unwrap();
        }
        drop(tx);
        log.writer().run(rx);
        assert_eq!(text(&log.path).lines().count(), n);
        assert_verifies(&log, n as u64, (1, n as u64));
    }

    #[test]
    fn lines_dropped_on_a_full_queue_are_recorded_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        let mut w = log.writer();
        w.write_batch(log.events(0, 1));
        // What `AuditSink::send` does when the queue is full.
        log.shared.dropped.fetch_add(5, Ordering::Relaxed);
        w.write_batch(log.events(1, 1));
        w.write_batch(log.events(2, 1));
        let lines: Vec<serde_json::Value> = text(&log.path)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "one record of the gap, once");
        assert_eq!(lines[1]["event"], "audit_lines_lost");
        assert_eq!(lines[1]["queue_full"], 5);
        assert_eq!(lines[1]["write_failed"], 0);
        let notes = assert_verifies(&log, 4, (1, 4));
        assert!(notes[0].contains("5 with the queue full"), "{notes:?}");
    }

    #[test]
    fn a_log_from_before_chaining_is_set_aside_and_a_new_chain_starts() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        std::fs::write(
            &log.path,
            "{\"ts\":\"2026-12-01T08:00:00Z\",\"status\":200}\n",
        )
        .unwrap();
        log.writer().write_batch(log.events(0, 2));
        assert_eq!(log.names(), ["audit.log.2026-12-01T08-00-00Z", "audit.log"]);
        let report = verify(std::slice::from_ref(&log.path), &log.key).unwrap();
        assert_eq!(report.to_string(), "ok: 2 lines, seq 1..2");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn write_errors_count_drops_and_the_log_recovers_and_records_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path(), Rotate::Never);
        let mut w = log.writer();
        w.write_batch(log.events(0, 2));
        // A full disk: every write fails with ENOSPC.
        let good = dir.path().join("good.log");
        std::fs::rename(&log.path, &good).unwrap();
        std::os::unix::fs::symlink("/dev/full", &log.path).unwrap();
        log.shared.reopen.store(true, Ordering::Release);
        w.write_batch(log.events(2, 3));
        w.write_batch(log.events(5, 4));
        assert_eq!(log.dropped(), 7);
        // Space returns.
        std::fs::remove_file(&log.path).unwrap();
        std::fs::rename(&good, &log.path).unwrap();
        w.write_batch(log.events(9, 1));
        assert_eq!(log.dropped(), 7);
        let lines: Vec<serde_json::Value> = text(&log.path)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2]["event"], "audit_lines_lost");
        assert_eq!(lines[2]["write_failed"], 7);
        assert_eq!(lines[2]["seq"], 3);
        assert_eq!(lines[3]["provider"], "p9");
        let notes = assert_verifies(&log, 4, (1, 4));
        assert!(notes[0].contains("0 with the queue full, 7 on failed writes"));
    }
}
