//! Where the log goes: stderr, a file rotated daily, or both; human or JSON lines;
//! filtered by `RUST_LOG` (default `info`). Nothing on the request path logs, so
//! the file writer's queue sees start-up, refreshes and failures only.

use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pretty,
    Json,
}

/// Holds the file writer's thread: lines still queued are written when it drops,
/// so keep it until the process ends.
#[derive(Debug)]
#[must_use = "dropping the guard stops the file writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// The log file: `[log] file` with its `keep`.
#[derive(Debug, Clone, Copy)]
pub struct LogFile<'a> {
    pub path: &'a Path,
    pub keep: usize,
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// `plain`: never colour (a file); otherwise tracing-subscriber's default, which
/// colours a terminal unless `NO_COLOR` is set.
fn fmt_layer<W>(format: Format, writer: W, plain: bool) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let mut layer = tracing_subscriber::fmt::layer().with_writer(writer);
    if plain {
        layer = layer.with_ansi(false);
    }
    match format {
        Format::Json => layer.json().boxed(),
        Format::Pretty => layer.boxed(),
    }
}

/// Opens the daily-rotated file (its folder created if missing; rotated files,
/// oldest first, pruned to `keep`) and returns its writer.
fn rolling(file: LogFile<'_>) -> Result<RollingFileAppender, LogError> {
    let shown = || file.path.display().to_string();
    let dir = match file.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let stem = file
        .path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| LogError::NotAFileName(shown()))?;
    std::fs::create_dir_all(dir).map_err(|source| LogError::Folder {
        path: dir.display().to_string(),
        source,
    })?;
    let mut builder = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(stem)
        .max_log_files(file.keep);
    if let Some(ext) = file.path.extension().and_then(|e| e.to_str()) {
        builder = builder.filename_suffix(ext);
    }
    builder.build(dir).map_err(|source| LogError::Open {
        path: shown(),
        source,
    })
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}: not a file name")]
    NotAFileName(String),
    #[error("{path}: {source}")]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: tracing_appender::rolling::InitError,
    },
    #[error("{0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Installs the global subscriber: to stderr when `stderr`, and to `file` when
/// given. Fails when the file cannot be opened (nothing is installed then).
pub fn init(format: Format, stderr: bool, file: Option<LogFile<'_>>) -> Result<LogGuard, LogError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let mut layers: Vec<BoxedLayer> = Vec::new();
    if stderr {
        layers.push(fmt_layer(format, std::io::stderr, false));
    }
    let mut guard = None;
    if let Some(file) = file {
        let (writer, g) = tracing_appender::non_blocking(rolling(file)?);
        layers.push(fmt_layer(format, writer, true));
        guard = Some(g);
    }
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()?;
    Ok(LogGuard { _writer: guard })
}
