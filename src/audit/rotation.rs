//! Which file a line goes to: rotation by time or size, the names of rotated files
//! (`audit.log.2026-12-05T00-00-00Z`, the UTC time the file was started) and the
//! pruning of the oldest beyond `keep`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Rotate;

/// Wall-clock time for rotation; injected so tests cross hour and day boundaries
/// without waiting.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The start of the rotation period holding `t` (UTC hours and days); for size
/// rotation and none, `t` to the second.
pub fn period_start(rotate: Rotate, t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let floored = match rotate {
        Rotate::Hourly => secs - secs % 3600,
        Rotate::Daily => secs - secs % 86_400,
        Rotate::Size(_) | Rotate::Never => secs,
    };
    UNIX_EPOCH + Duration::from_secs(floored)
}

/// `2026-12-05T00-00-00Z`: RFC 3339 in UTC with `-` for `:` (valid in file names
/// on every OS), so names sort in time order.
pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace(':', "-")
}

/// The name a file started at `start` takes when rotated; a `-N` suffix when that
/// name is taken (two size rotations within one second).
pub fn rotated_name(active: &Path, start: SystemTime) -> PathBuf {
    let base = format!("{}.{}", active.display(), stamp(start));
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// The rotation suffix of `name` relative to the active file's name, if it has one.
pub fn rotation_suffix<'a>(active_name: &str, name: &'a str) -> Option<&'a str> {
    let suffix = name.strip_prefix(active_name)?.strip_prefix('.')?;
    let (stamp, extra) = suffix.split_at(suffix.len().min(20));
    let b = stamp.as_bytes();
    let shape = b.len() == 20
        && b[19] == b'Z'
        && b[10] == b'T'
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 | 13 | 16 => *c == b'-',
            10 | 19 => true,
            _ => c.is_ascii_digit(),
        });
    let extra_ok = extra.is_empty()
        || extra
            .strip_prefix('-')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    (shape && extra_ok).then_some(suffix)
}

/// Sort key of a rotation suffix: time, then the `-N` of same-second rotations.
pub fn suffix_order(suffix: &str) -> (&str, u64) {
    let (stamp, extra) = suffix.split_at(suffix.len().min(20));
    let n = extra
        .strip_prefix('-')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (stamp, n)
}

/// The rotated files of `active`, oldest first.
pub fn rotated_files(active: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(name) = active.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(other) = file_name.to_str() else {
            continue;
        };
        if let Some(suffix) = rotation_suffix(name, other) {
            found.push((suffix.to_owned(), entry.path()));
        }
    }
    found.sort_by(|a, b| suffix_order(&a.0).cmp(&suffix_order(&b.0)));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Deletes the oldest rotated files beyond `keep`; returns how many went.
pub fn prune(active: &Path, keep: usize) -> std::io::Result<usize> {
    let files = rotated_files(active)?;
    let excess = files.len().saturating_sub(keep);
    for old in &files[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(excess)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn periods_start_on_utc_hours_and_days() {
        let t = at("2026-12-05T13:47:09Z");
        assert_eq!(
            stamp(period_start(Rotate::Daily, t)),
            "2026-12-05T00-00-00Z"
        );
        assert_eq!(
            stamp(period_start(Rotate::Hourly, t)),
            "2026-12-05T13-00-00Z"
        );
        assert_eq!(
            stamp(period_start(Rotate::Size(10), t)),
            "2026-12-05T13-47-09Z"
        );
    }

    #[test]
    fn rotated_names_are_recognised_and_sorted_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.log");
        for name in [
            "audit.log.2026-12-05T10-00-00Z-1",
            "audit.log.2026-12-05T10-00-00Z",
            "audit.log.2026-12-04T23-00-00Z",
            "audit.log.2026-12-05T10-00-00Z-10",
            "audit.log.2026-12-05T10-00-00Z-2",
            "audit.log.bak",
            "audit.log",
            "other.log.2026-12-05T10-00-00Z",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names: Vec<String> = rotated_files(&active)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.log.2026-12-04T23-00-00Z",
                "audit.log.2026-12-05T10-00-00Z",
                "audit.log.2026-12-05T10-00-00Z-1",
                "audit.log.2026-12-05T10-00-00Z-2",
                "audit.log.2026-12-05T10-00-00Z-10",
            ]
        );
        let start = at("2026-12-05T10:00:00Z");
        assert_eq!(
            rotated_name(&active, start).file_name().unwrap(),
            "audit.log.2026-12-05T10-00-00Z-3"
        );
        assert_eq!(prune(&active, 2).unwrap(), 3);
        assert_eq!(rotated_files(&active).unwrap().len(), 2);
        assert!(dir.path().join("audit.log").exists());
        assert!(dir.path().join("audit.log.bak").exists());
    }
}
