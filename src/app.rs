//! A whole running gateway: store, audit writer, providers, the main and admin
//! listeners, and the shutdown that drains them. `main.rs` and the tests both
//! start gateways through `App::start`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditError, AuditSink};
use crate::config::{Config, ConfigError, StoreKind};
use crate::gateway::{BuildError, Gateway};
use crate::metrics::Metrics;
use crate::server::{self, ServerOpts};
use crate::store::{self, StoreError, TokenStore};
use crate::token::StoreHandle;

/// Why a reload was rejected (the running config stays): the same message as
/// `check` for the file, or what its snapshot could not build.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Build(#[from] BuildError),
}

/// Why the gateway could not start. `Config` errors exit with 2 like `check`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The listener's TLS certificate or key.
    #[error("listen: {0}")]
    ListenTls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("{0}")]
    AdminKey(#[from] crate::admin::AdminKeyError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("token store: {0}")]
    Store(StoreError),
    #[error("audit log: {0}")]
    Audit(AuditError),
}

impl StartError {
    /// Exit code: 2 for anything in the configuration (including its secrets), 1
    /// for the environment (ports, disks).
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_)
            | StartError::ListenTls(_)
            | StartError::Build(_)
            | StartError::AdminKey(_)
            | StartError::Store(StoreError::Config(_) | StoreError::Crypto(_))
            | StartError::Audit(AuditError::Key(_)) => 2,
            _ => 1,
        }
    }
}

#[derive(Debug)]
pub struct App {
    pub gateway: Arc<Gateway>,
    /// Where the main listener is bound (port 0 in the config picks a free one).
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    listeners: Vec<JoinHandle<()>>,
    audit_task: Option<JoinHandle<()>>,
}

impl App {
    pub async fn start(config: Config) -> Result<App, StartError> {
        let store = open_store(&config).await?;
        Self::start_with_store(config, store).await
    }

    /// Starts with a store built by the caller instead of `config.store`: lets tests
    /// hold the store (e.g. a `MemoryStore` and its load/save counters) while the
    /// gateway runs.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn TokenStore>,
    ) -> Result<App, StartError> {
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let store = StoreHandle::new(store, metrics.clone());
        let (audit, audit_task) = match &config.audit {
            Some(a) => {
                let (sink, task) = AuditSink::start(a, metrics.clone())
                    .await
                    .map_err(StartError::Audit)?;
                (Some(sink), Some(task))
            }
            None => (None, None),
        };
        let main_listener = TcpListener::bind(config.listen.addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen.addr,
                source,
            })?;
        let admin_listener = match &config.admin {
            Some(a) => {
                Some(
                    TcpListener::bind(a.addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: a.addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let opts = ServerOpts::from_listen(&config.listen)?;
        let console = match &config.admin {
            Some(a) => Some(crate::admin::Console::new(a)?),
            None => None,
        };
        let gateway = Gateway::new(config, store, audit, metrics, shutdown.clone())?;

        let addr = main_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: opts_addr(&gateway),
                source,
            })?;
        let mut listeners = Vec::new();
        let gw = gateway.clone();
        listeners.push(tokio::spawn(server::serve(
            main_listener,
            opts,
            shutdown.clone(),
            move |req, conn| crate::forward::serve(gw.clone(), req, conn),
        )));
        let mut admin_addr = None;
        if let (Some(l), Some(console)) = (admin_listener, console) {
            admin_addr = l.local_addr().ok();
            let gw = gateway.clone();
            listeners.push(tokio::spawn(server::serve(
                l,
                ServerOpts::admin(),
                shutdown.clone(),
                move |req, conn| {
                    let gw = gw.clone();
                    let console = console.clone();
                    async move { crate::admin::serve(&gw, &console, &conn, req).await }
                },
            )));
        }
        tracing::info!(%addr, admin = ?admin_addr, routes = gateway.snapshot().routes.len(), "authgate listening");
        Ok(App {
            gateway,
            addr,
            admin_addr,
            shutdown,
            listeners,
            audit_task,
        })
    }

    /// What an operator's reload does (SIGHUP; the Windows service's reload
    /// control): reopens the audit file by its name, for external rotators, and
    /// re-reads the config file and swaps it in; the running config stays on error.
    pub fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        self.reopen_audit();
        reload_from(&self.gateway, path)
    }

    /// Closes and reopens the audit file before its next line.
    pub fn reopen_audit(&self) {
        if let Some(audit) = &self.gateway.audit {
            audit.reopen();
        }
    }

    /// Reloads whenever the config file changes (debounced), until shutdown. The
    /// folder is watched, not the file: editors and config managers replace the
    /// file (write a temporary, rename it over), which ends a watch on the file
    /// itself. Kubernetes ConfigMap mounts swap a `..data` symlink instead, so a
    /// change to that name counts too.
    pub fn watch_config(&self, path: &Path) -> Result<JoinHandle<()>, notify::Error> {
        use notify::Watcher;

        let path = path.to_path_buf();
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_os_string());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if ev.kind.is_access() {
                return;
            }
            let ours = ev.paths.iter().any(|p| {
                let n = p.file_name();
                n == name.as_deref() || n == Some(std::ffi::OsStr::new("..data"))
            });
            if ours {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(&folder, notify::RecursiveMode::NonRecursive)?;
        let gateway = self.gateway.clone();
        let shutdown = self.shutdown.clone();
        tracing::info!(config = %path.display(), "watching the config file for changes");
        Ok(tokio::spawn(async move {
            // Owned by the task: dropping it stops the OS watch.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = rx.recv() => if ev.is_none() { return },
                }
                // A save is often several events (truncate, write, rename): wait
                // for a quiet spell so the file is read once, complete.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RELOAD_DEBOUNCE) => break,
                        ev = rx.recv() => if ev.is_none() { return },
                    }
                }
                let _ = reload_from(&gateway, &path);
            }
        }))
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, drains in-flight requests, flushes the audit log.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for l in self.listeners {
            let _ = l.await;
        }
        let App {
            gateway,
            audit_task,
            ..
        } = self;
        drop(gateway);
        if let Some(task) = audit_task {
            // The writer ends once every sink clone is gone; providers' background
            // tasks hold clones until they observe the cancellation.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }
}

/// Quiet time after the last file event before the config is re-read.
const RELOAD_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(300);

/// Loads and validates `path` exactly like `check`, then swaps it in; counted and
/// logged either way.
fn reload_from(gateway: &Gateway, path: &Path) -> Result<(), ReloadError> {
    let result = Config::load(path).map_err(ReloadError::from).and_then(|c| {
        warn_restart_only(&gateway.snapshot().config, &c);
        Ok(gateway.reload(c)?)
    });
    gateway.metrics.reload(result.is_ok());
    match &result {
        Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "configuration rejected; keeping the running one")
        }
    }
    result
}

/// Sections bound at start-up (sockets, the store, the audit file) keep running
/// as they are; say so rather than let an operator believe they changed.
fn warn_restart_only(old: &Config, new: &Config) {
    let changed: Vec<&str> = [
        ("listen", old.listen != new.listen),
        ("admin", old.admin != new.admin),
        ("store", old.store != new.store),
        ("audit", old.audit != new.audit),
        ("runtime", old.runtime != new.runtime),
        ("log", old.log != new.log),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    if !changed.is_empty() {
        tracing::warn!(
            sections = %changed.join(", "),
            "these sections changed but take effect only after a restart"
        );
    }
}

fn opts_addr(gw: &Gateway) -> SocketAddr {
    gw.snapshot().config.listen.addr
}

/// Opens the configured store. A file store whose folder cannot be written does
/// not stop the gateway (tokens still live in memory); it is reported loudly and
/// shows as failing. Key and configuration problems do stop it.
async fn open_store(config: &Config) -> Result<Arc<dyn TokenStore>, StartError> {
    match store::open(&config.store).await {
        Ok(s) => Ok(s),
        Err(e @ StoreError::Io { .. }) if matches!(config.store.kind, StoreKind::File { .. }) => {
            tracing::error!(error = %e, "token store unusable; tokens will be kept in memory only");
            let mem = store::memory::MemoryStore::new();
            mem.set_failing(true);
            Ok(Arc::new(mem))
        }
        Err(e) => Err(StartError::Store(e)),
    }
}
