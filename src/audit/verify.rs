//! `authgate audit verify`: walks audit files in order and checks that every line
//! follows the one before it (`seq` one higher, `chain` recomputed from the previous
//! `chain` and the line's own bytes). It answers with the first line that does not,
//! and says what it looks like: altered, removed, reordered or inserted.

use std::fmt;
use std::path::{Path, PathBuf};

use super::chain::{self, ChainKey, Parsed, GENESIS};
use super::rotation;

/// The answer: every line verified, or the first that is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok {
        lines: u64,
        /// First and last `seq` verified; `None` when there was no line.
        seqs: Option<(u64, u64)>,
    },
    Failed {
        file: String,
        line: usize,
        kind: &'static str,
        detail: String,
    },
}

/// The outcome and what an auditor should know besides (a pruned start, a torn
/// last line, lines the writer recorded as lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub notes: Vec<String>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ok { lines, seqs } => {
                write!(f, "ok: {lines} lines")?;
                if let Some((a, b)) = seqs {
                    write!(f, ", seq {a}..{b}")?;
                }
            }
            Outcome::Failed {
                file,
                line,
                kind,
                detail,
            } => write!(f, "{file}:{line}: {kind}: {detail}")?,
        }
        for n in &self.notes {
            write!(f, "\nnote: {n}")?;
        }
        Ok(())
    }
}

/// The files of the log whose active file is `active`: rotated ones oldest first,
/// then the active one.
pub fn log_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = rotation::rotated_files(active)?;
    if active.exists() {
        files.push(active.to_path_buf());
    }
    Ok(by_first_seq(files))
}

/// Orders files by the `seq` of their first line, so a clock stepped back between
/// two rotations (names out of time order) is no false alarm. A file without one
/// (empty, or only a torn line) stays right after the file it followed by name.
fn by_first_seq(files: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut last = 0;
    let mut keyed: Vec<(u64, PathBuf)> = files
        .into_iter()
        .map(|p| {
            if let Some(seq) = first_seq(&p) {
                last = seq;
            }
            (last, p)
        })
        .collect();
    keyed.sort_by_key(|(seq, _)| *seq);
    keyed.into_iter().map(|(_, p)| p).collect()
}

fn first_seq(path: &Path) -> Option<u64> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(std::io::Read::take(f, 1 << 20))
        .read_until(b'\n', &mut line)
        .ok()?;
    let line = line.strip_suffix(b"\n")?;
    chain::parse(line).map(|p| p.seq)
}

/// Named files in the order they were written: by the `seq` of their first line,
/// else rotated names (`NAME.<UTC time>`) by their time and the rest (active
/// files) after them in the order given. A shell glob lists `audit.log` before
/// `audit.log.2026-…`; this puts it last.
pub fn in_written_order(files: Vec<PathBuf>) -> Vec<PathBuf> {
    // (rotation time and same-second number, position given, path)
    type Keyed = (Option<(String, u64)>, usize, PathBuf);
    let mut keyed: Vec<Keyed> = files
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let key = name.match_indices('.').find_map(|(dot, _)| {
                rotation::rotation_suffix(&name[..dot], &name).map(|s| {
                    let (stamp, n) = rotation::suffix_order(s);
                    (stamp.to_owned(), n)
                })
            });
            (key, i, p)
        })
        .collect();
    keyed.sort_by(|a, b| match (&a.0, &b.0) {
        (Some(x), Some(y)) => x.cmp(y).then(a.1.cmp(&b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(&b.1),
    });
    by_first_seq(keyed.into_iter().map(|(_, _, p)| p).collect())
}

/// Verifies `files`, in this order, as one log.
pub fn verify(files: &[PathBuf], key: &ChainKey) -> std::io::Result<Report> {
    let mut v = Verifier {
        key,
        prev: None,
        lines: 0,
        first_seq: None,
        notes: Vec::new(),
    };
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })?;
        if let Err(outcome) = v.file(&path.display().to_string(), &bytes) {
            return Ok(Report {
                outcome,
                notes: v.notes,
            });
        }
    }
    Ok(Report {
        outcome: Outcome::Ok {
            lines: v.lines,
            seqs: v.first_seq.zip(v.prev.map(|p| p.0)),
        },
        notes: v.notes,
    })
}

struct Verifier<'k> {
    key: &'k ChainKey,
    /// `seq` and `chain` of the last line verified.
    prev: Option<(u64, [u8; 64])>,
    lines: u64,
    first_seq: Option<u64>,
    notes: Vec<String>,
}

impl Verifier<'_> {
    fn file(&mut self, name: &str, bytes: &[u8]) -> Result<(), Outcome> {
        let ends_whole = bytes.last() == Some(&b'\n');
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let lines: Vec<&[u8]> = if bytes.is_empty() {
            Vec::new()
        } else {
            body.split(|&b| b == b'\n').collect()
        };
        let fail = |line: usize, kind: &'static str, detail: String| Outcome::Failed {
            file: name.to_owned(),
            line,
            kind,
            detail,
        };
        for (i, raw) in lines.iter().enumerate() {
            let lineno = i + 1;
            let Some(p) = chain::parse(raw) else {
                if i + 1 == lines.len() && !ends_whole {
                    self.notes.push(format!(
                        "{name}:{lineno}: torn last line (an incomplete write, e.g. a crash); not part of the chain"
                    ));
                    continue;
                }
                return Err(fail(
                    lineno,
                    "altered or inserted",
                    "not an audit line with seq and chain".into(),
                ));
            };
            let Some((prev_seq, prev_chain)) = self.prev else {
                if !self.start(name, lineno, &p) {
                    return Err(fail(lineno, "altered", "chain of seq 1 does not match (the line was changed, or this is not the key the log was written with)".into()));
                }
                continue;
            };
            let expected = prev_seq + 1;
            let rest = &lines[i + 1..];
            if p.seq == expected {
                if !p.follows(self.key, &prev_chain) {
                    let next_follows = rest
                        .first()
                        .and_then(|l| chain::parse(l))
                        .is_some_and(|n| n.seq == expected && n.follows(self.key, &prev_chain));
                    return Err(if next_follows {
                        fail(lineno, "inserted", format!("seq {} here is not part of the log; the next line follows seq {prev_seq}", p.seq))
                    } else if self.lines == 1 {
                        fail(lineno, "altered", format!("chain of seq {} does not match (the line was changed, or this is not the key the log was written with)", p.seq))
                    } else {
                        fail(
                            lineno,
                            "altered",
                            format!("chain of seq {} does not match its content", p.seq),
                        )
                    });
                }
            } else if p.seq > expected {
                let later = rest
                    .iter()
                    .any(|l| chain::parse(l).is_some_and(|n| n.seq == expected));
                return Err(if later {
                    fail(
                        lineno,
                        "reordered",
                        format!("seq {} comes before seq {expected}", p.seq),
                    )
                } else {
                    let missing = if p.seq - 1 == expected {
                        format!("seq {expected} is missing")
                    } else {
                        format!("seq {expected}..{} are missing", p.seq - 1)
                    };
                    fail(lineno, "removed", format!("{missing} before this line"))
                });
            } else {
                return Err(fail(
                    lineno,
                    "reordered or inserted",
                    format!("seq {} after seq {prev_seq}", p.seq),
                ));
            }
            self.accept(name, lineno, &p);
        }
        Ok(())
    }

    /// The first line: from the start of the chain, or where the oldest file
    /// present begins. False when it claims to be the start and its chain is not.
    fn start(&mut self, name: &str, lineno: usize, p: &Parsed<'_>) -> bool {
        if p.seq == 1 {
            if !p.follows(self.key, &GENESIS) {
                return false;
            }
        } else {
            self.notes.push(format!(
                "{name}:{lineno}: the oldest line present is seq {}; earlier files are gone (pruned by keep?), so its chain is taken as given",
                p.seq
            ));
        }
        self.first_seq = Some(p.seq);
        self.accept(name, lineno, p);
        true
    }

    fn accept(&mut self, name: &str, lineno: usize, p: &Parsed<'_>) {
        self.prev = Some((p.seq, p.chain));
        self.lines += 1;
        if memchr(p.head, br#""event":"audit_lines_lost""#) {
            #[derive(serde::Deserialize)]
            struct Gap {
                queue_full: u64,
                write_failed: u64,
            }
            let mut text = p.head.to_vec();
            text.push(b'}');
            if let Ok(g) = serde_json::from_slice::<Gap>(&text) {
                self.notes.push(format!(
                    "{name}:{lineno}: the gateway recorded lines it could not write before this one ({} with the queue full, {} on failed writes)",
                    g.queue_full, g.write_failed
                ));
            }
        }
    }
}

fn memchr(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::super::testutil::Log;
    use super::*;
    use crate::config::Rotate;

    /// Three files: seq 1-5, 6-10 (rotated hourly) and 11-15, the active one,
    /// with a restart of the gateway between seq 12 and 13.
    fn three_files(dir: &Path) -> Log {
        let log = Log::new(dir, Rotate::Hourly);
        let mut w = log.writer();
        w.write_batch(log.events(0, 5));
        log.clock.advance(Duration::from_secs(3600));
        w.write_batch(log.events(5, 5));
        log.clock.advance(Duration::from_secs(3600));
        w.write_batch(log.events(10, 2));
        drop(w);
        log.writer().write_batch(log.events(12, 3));
        assert_eq!(log.files().len(), 3);
        log
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn put(p: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(p, text).unwrap();
    }

    /// Verifies after `tamper`, expecting a failure of `kind` at file #`file`, `line`.
    fn detects(tamper: impl FnOnce(&[PathBuf]), file: usize, line: usize, kind: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let files = log.files();
        assert!(verify(&files, &log.key).unwrap().is_ok());
        tamper(&files);
        let report = verify(&log.files(), &log.key).unwrap();
        match &report.outcome {
            Outcome::Failed {
                file: f,
                line: l,
                kind: k,
                ..
            } => {
                assert_eq!(
                    (f.as_str(), *l, *k),
                    (files[file].display().to_string().as_str(), line, kind),
                    "{report}"
                );
            }
            Outcome::Ok { .. } => panic!("not detected: {report}"),
        }
        report.to_string()
    }

    #[test]
    fn an_untouched_log_verifies_across_rotation_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let report = verify(&log.files(), &log.key).unwrap();
        assert_eq!(report.to_string(), "ok: 15 lines, seq 1..15");
    }

    #[test]
    fn an_altered_line_is_named() {
        detects(
            |f| {
                let mut l = lines(&f[0]);
                l[2] = l[2].replace("\"p2\"", "\"pX\"");
                put(&f[0], &l);
            },
            0,
            3,
            "altered",
        );
        // After the restart, in the active file.
        detects(
            |f| {
                let mut l = lines(&f[2]);
                l[2] = l[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"no\"");
                put(&f[2], &l);
            },
            2,
            3,
            "altered",
        );
    }

    #[test]
    fn a_removed_line_is_named_also_at_a_rotation_boundary() {
        let r = detects(
            |f| {
                let mut l = lines(&f[0]);
                l.remove(3);
                put(&f[0], &l);
            },
            0,
            4,
            "removed",
        );
        assert!(r.contains("seq 4 is missing"), "{r}");
        // The first line of the second file.
        detects(
            |f| {
                let mut l = lines(&f[1]);
                l.remove(0);
                put(&f[1], &l);
            },
            1,
            1,
            "removed",
        );
        // The last line of the first file.
        detects(
            |f| {
                let mut l = lines(&f[0]);
                l.pop();
                put(&f[0], &l);
            },
            1,
            1,
            "removed",
        );
        // The line written last before the restart.
        detects(
            |f| {
                let mut l = lines(&f[2]);
                l.remove(1);
                put(&f[2], &l);
            },
            2,
            2,
            "removed",
        );
    }

    #[test]
    fn a_removed_file_in_the_middle_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let files = log.files();
        std::fs::remove_file(&files[1]).unwrap();
        let report = verify(&log.files(), &log.key).unwrap();
        assert_eq!(
            report.to_string(),
            format!(
                "{}:1: removed: seq 6..10 are missing before this line",
                files[2].display()
            )
        );
    }

    #[test]
    fn reordered_lines_are_named() {
        detects(
            |f| {
                let mut l = lines(&f[2]);
                l.swap(1, 2);
                put(&f[2], &l);
            },
            2,
            2,
            "reordered",
        );
    }

    #[test]
    fn inserted_lines_are_named() {
        // A copy of an earlier line.
        detects(
            |f| {
                let mut l = lines(&f[1]);
                let copy = l[1].clone();
                l.insert(4, copy);
                put(&f[1], &l);
            },
            1,
            5,
            "reordered or inserted",
        );
        // A forged line with the expected seq.
        detects(
            |f| {
                let mut l = lines(&f[0]);
                let forged = l[2].replace("\"p2\"", "\"forged\"");
                l.insert(2, forged);
                put(&f[0], &l);
            },
            0,
            3,
            "inserted",
        );
        // Something that is no audit line at all.
        detects(
            |f| {
                let mut l = lines(&f[1]);
                l.insert(2, r#"{"event":"token_refresh"}"#.into());
                put(&f[1], &l);
            },
            1,
            3,
            "altered or inserted",
        );
    }

    #[test]
    fn the_wrong_key_fails_at_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let report = verify(&log.files(), &ChainKey::hmac(b"another-key")).unwrap();
        let text = report.to_string();
        assert!(
            text.starts_with(&format!("{}:1: altered:", log.files()[0].display())),
            "{text}"
        );
        assert!(
            text.contains("not the key the log was written with"),
            "{text}"
        );
        let report = verify(&log.files(), &ChainKey::plain()).unwrap();
        assert!(
            !report.is_ok(),
            "a keyed log does not verify as plain SHA-256"
        );
    }

    #[test]
    fn a_torn_last_line_is_reported_as_such_not_as_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let active = log.files()[2].clone();
        let text = std::fs::read_to_string(&active).unwrap();
        std::fs::write(&active, &text[..text.len() - 30]).unwrap();
        let report = verify(&log.files(), &log.key).unwrap();
        assert_eq!(
            report.to_string(),
            format!(
                "ok: 14 lines, seq 1..14\nnote: {}:5: torn last line (an incomplete write, e.g. a crash); not part of the chain",
                active.display()
            )
        );
    }

    #[test]
    fn named_files_are_walked_in_written_order_whatever_order_they_are_given_in() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_files(dir.path());
        let mut files = log.files();
        files.reverse();
        let ordered = in_written_order(files);
        assert_eq!(ordered, log.files());
        assert!(verify(&ordered, &log.key).unwrap().is_ok());
    }
}
