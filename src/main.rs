//! The `authgate` command: argument parsing, logging, exit codes. The work is in
//! the library.

#![cfg_attr(not(windows), forbid(unsafe_code))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use authgate::config::{self, Config};
use authgate::logging;

#[derive(Parser, Debug)]
#[command(
    name = "authgate",
    version,
    about = "Outbound authenticating gateway: one owner of each OAuth token"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (default: $AUTHGATE_CONFIG, else ./proxy.toml)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default)
    Run {
        /// Do not reload when the config file changes (SIGHUP still reloads)
        #[arg(long)]
        no_watch: bool,
    },
    /// Validate the config and print the routes; exit 0 when valid, 2 when not
    Check,
    /// Start a demo IdP, API and gateway on loopback and show a token's life
    Demo,
    /// Obtain a token once through PROVIDER and print its metadata
    Token {
        provider: String,
        /// Also print the token itself
        #[arg(long)]
        reveal: bool,
    },
    /// The audit log
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage authgate as a Windows service (Windows only)
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the audit log's chain: exit 0 when whole, 1 at the first line
    /// altered, removed, reordered or inserted, 2 when it cannot be read
    Verify {
        /// Audit files (default: the config's [audit] file and its rotated files);
        /// the key still comes from the config
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ServiceAction {
    /// Validate the config (as `check`) and register the service
    Install {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
        /// LocalSystem, LocalService, NetworkService, NT SERVICE\<name> or a user
        /// account (default: the virtual account NT SERVICE\<name>)
        #[arg(long)]
        account: Option<String>,
        /// Environment variable holding the user account's password
        #[arg(long)]
        password_env: Option<String>,
        /// When the service starts
        #[arg(long, value_enum, default_value_t = StartArg::Delayed)]
        start: StartArg,
    },
    /// Stop and remove the service
    Uninstall {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
    },
    /// Start the service and wait until it runs
    Start {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
    },
    /// Stop the service (in-flight requests drain) and wait until it has stopped
    Stop {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
    },
    /// Print the service's state
    Status {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
    },
    /// Serve as the service (started by the service manager, not by hand)
    Run {
        #[arg(long, default_value = authgate::service::DEFAULT_NAME)]
        name: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StartArg {
    Auto,
    Delayed,
    Demand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

impl From<LogFormat> for logging::Format {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Pretty => logging::Format::Pretty,
            LogFormat::Json => logging::Format::Json,
        }
    }
}

/// Logs to stderr only (commands other than `run`).
fn init_logging(format: LogFormat) -> Option<logging::LogGuard> {
    logging::init(format.into(), true, None).ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Service { action }) = cli.command {
        return service(action, cli.config, cli.log_format);
    }
    // `run` also logs to `[log] file`, known once the config is loaded.
    let _log = match cli.command {
        None | Some(Command::Run { .. }) => None,
        _ => init_logging(cli.log_format),
    };
    if matches!(cli.command, Some(Command::Demo)) {
        return with_default_runtime(async {
            match authgate::demo::run().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::from(1)
                }
            }
        });
    }
    if let Some(Command::Audit {
        command: AuditCommand::Verify { files },
    }) = &cli.command
    {
        return audit_verify(cli.config.clone(), files.clone());
    }
    let path = config::resolve_path(cli.config.clone());
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run { no_watch: false }) {
        Command::Check => check(&config),
        Command::Run { no_watch } => {
            let file = config.log.file.as_deref().map(|path| logging::LogFile {
                path,
                keep: config.log.keep,
            });
            let _log = match logging::init(cli.log_format.into(), true, file) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("{}: log.file: {e}", config.path.display());
                    return ExitCode::from(1);
                }
            };
            with_runtime(&config, run(config.clone(), path, !no_watch))
        }
        // Needs no config: served before the config is loaded.
        Command::Demo => ExitCode::SUCCESS,
        Command::Token { provider, reveal } => {
            with_runtime(&config, token(config.clone(), provider, reveal))
        }
        // Served before the config is loaded.
        Command::Audit { .. } => ExitCode::SUCCESS,
        Command::Service { .. } => ExitCode::SUCCESS,
    }
}

/// `audit verify`: the key from the config found as for `run`; the files named,
/// else the config's audit file and its rotated files. Named files with no config
/// anywhere (none given, no `$AUTHGATE_CONFIG`, no `./proxy.toml`) are verified as
/// a chain without a key.
fn audit_verify(flag: Option<PathBuf>, files: Vec<PathBuf>) -> ExitCode {
    use authgate::audit::{self, verify};

    let explicit = flag.is_some() || std::env::var_os("AUTHGATE_CONFIG").is_some();
    let path = config::resolve_path(flag);
    let config = if files.is_empty() || explicit || path.exists() {
        match Config::load(&path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let audit_cfg = config.as_ref().and_then(|c| c.audit.as_ref());
    let key = match audit_cfg.map(audit::chain_key).transpose() {
        Ok(k) => k.unwrap_or_else(audit::ChainKey::plain),
        Err(e) => {
            eprintln!("{}: audit.key: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let files = if files.is_empty() {
        let active = match audit_cfg.map(|a| &a.target) {
            Some(config::AuditTarget::File(p)) => p.clone(),
            _ => {
                eprintln!(
                    "{}: no [audit] file to verify (name the files to check)",
                    path.display()
                );
                return ExitCode::from(2);
            }
        };
        match verify::log_files(&active) {
            Ok(f) if !f.is_empty() => f,
            Ok(_) => {
                eprintln!("{}: no audit file there", active.display());
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("{}: {e}", active.display());
                return ExitCode::from(2);
            }
        }
    } else {
        verify::in_written_order(files)
    };
    match verify::verify(&files, &key) {
        Ok(mut report) => {
            if config.is_none() {
                report.notes.push(format!(
                    "no config ({} not found): verified as a chain without a key (SHA-256)",
                    path.display()
                ));
            }
            println!("{report}");
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(not(windows))]
fn service(_action: ServiceAction, _config: Option<PathBuf>, _format: LogFormat) -> ExitCode {
    eprintln!("{}", authgate::service::UNSUPPORTED);
    ExitCode::from(2)
}

#[cfg(windows)]
fn service(action: ServiceAction, config: Option<PathBuf>, format: LogFormat) -> ExitCode {
    use authgate::service::{self, windows as svc, StartMode};

    if let ServiceAction::Run { name } = action {
        // A service has no console: it logs to `[log] file`, else to
        // %ProgramData%\authgate\logs\<name>.log. A config that does not load
        // is reported by the service itself (Event Log, exit code).
        let path = config::resolve_path(config);
        let loaded = Config::load(&path).ok();
        let default_file = svc::default_log_file(&name);
        let file = logging::LogFile {
            path: loaded
                .as_ref()
                .and_then(|c| c.log.file.as_deref())
                .unwrap_or(&default_file),
            keep: loaded
                .as_ref()
                .map_or(config::DEFAULT_LOG_KEEP, |c| c.log.keep),
        };
        let _log = logging::init(format.into(), false, Some(file)).ok();
        return match svc::run(name, path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let _log = init_logging(format);

    let done = |r: Result<String, svc::ServiceError>| match r {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    };
    match action {
        ServiceAction::Install {
            name,
            account,
            password_env,
            start,
        } => {
            let path = config::resolve_path(config);
            let path = match std::path::absolute(&path) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = Config::load(&path) {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            let password = match (service::needs_password(account.as_deref()), password_env) {
                (true, Some(var)) => match std::env::var(&var) {
                    Ok(p) => Some(authgate::secret::Secret::new(p)),
                    Err(_) => {
                        eprintln!("--password-env: environment variable {var} is not set");
                        return ExitCode::from(2);
                    }
                },
                (true, None) => {
                    eprintln!(
                        "--account names a user account: give its password with --password-env VAR"
                    );
                    return ExitCode::from(2);
                }
                (false, Some(_)) => {
                    eprintln!("--password-env is only for user accounts; built-in and virtual accounts have no password");
                    return ExitCode::from(2);
                }
                (false, None) => None,
            };
            let start = match start {
                StartArg::Auto => StartMode::Auto,
                StartArg::Delayed => StartMode::Delayed,
                StartArg::Demand => StartMode::Demand,
            };
            let install = svc::Install {
                config: path,
                name,
                account,
                password,
                start,
            };
            done(svc::install(&install).map(|()| {
                format!(
                    "installed service {:?} (config {}); start it with `authgate service start --name {}`",
                    install.name,
                    install.config.display(),
                    install.name
                )
            }))
        }
        ServiceAction::Uninstall { name } => {
            done(svc::uninstall(&name).map(|()| format!("removed service {name:?}")))
        }
        ServiceAction::Start { name } => done(svc::start(&name).map(|s| svc::describe(&name, &s))),
        ServiceAction::Stop { name } => done(svc::stop(&name).map(|s| svc::describe(&name, &s))),
        ServiceAction::Status { name } => done(svc::status(&name)),
        // Handled above.
        ServiceAction::Run { .. } => ExitCode::SUCCESS,
    }
}

fn with_default_runtime(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

fn with_runtime(config: &Config, fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    // One worker: the current-thread scheduler does the same work without the
    // multi-thread scheduler's cross-thread queues and wake-ups.
    let mut rt = match config.runtime.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    match rt.build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(config: &Config) -> ExitCode {
    println!("{}: OK", config.path.display());
    println!("routes:");
    for r in &config.routes {
        let provider = r
            .provider
            .as_deref()
            .map(|p| format!("provider {p}"))
            .unwrap_or_else(|| "no credential".into());
        println!("  {:<20} -> {}  ({provider})", r.prefix, r.upstream);
    }
    if !config.providers.is_empty() {
        println!("providers:");
        for (name, p) in &config.providers {
            let target = p
                .oauth()
                .map(|c| c.token_url.to_string())
                .unwrap_or_default();
            println!("  {name:<20} {} {target}", p.grant_kind().as_str());
        }
    }
    ExitCode::SUCCESS
}

async fn run(config: Config, path: PathBuf, watch: bool) -> ExitCode {
    let signals = Signals::install();
    let app = match authgate::App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    // Reload on file change on every platform (the only trigger on Windows).
    let watcher = match watch.then(|| app.watch_config(&path)) {
        None => None,
        Some(Ok(task)) => Some(task),
        Some(Err(e)) => {
            tracing::warn!(error = %e, config = %path.display(), "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    signals.wait(&app, &path).await;
    if let Some(task) = watcher {
        task.abort();
    }
    tracing::info!("shutting down: draining in-flight requests");
    app.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The process signals, installed before the listeners open: a SIGHUP that
/// arrives between "listening" and the handler would otherwise kill the process
/// (its default action).
struct Signals {
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    /// Ctrl-Break, the console closing, log-off and system shutdown stop a
    /// console-run gateway like Ctrl-C (Windows has no SIGTERM).
    #[cfg(windows)]
    windows: Option<(
        tokio::signal::windows::CtrlBreak,
        tokio::signal::windows::CtrlClose,
        tokio::signal::windows::CtrlShutdown,
    )>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(term), Ok(hup)) => Some((term, hup)),
                _ => {
                    tracing::error!("cannot install signal handlers");
                    None
                }
            };
            Signals { unix }
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};
            let windows = match (ctrl_break(), ctrl_close(), ctrl_shutdown()) {
                (Ok(b), Ok(c), Ok(s)) => Some((b, c, s)),
                _ => {
                    tracing::error!("cannot install console control handlers");
                    None
                }
            };
            Signals { windows }
        }
        #[cfg(not(any(unix, windows)))]
        Signals {}
    }

    /// Returns on SIGTERM / Ctrl-C; reloads the config on SIGHUP.
    async fn wait(self, app: &authgate::App, path: &std::path::Path) {
        #[cfg(unix)]
        if let Some((mut term, mut hup)) = self.unix {
            loop {
                tokio::select! {
                    _ = term.recv() => return,
                    _ = tokio::signal::ctrl_c() => return,
                    _ = hup.recv() => { let _ = app.reload(path); }
                }
            }
        }
        #[cfg(windows)]
        if let Some((mut brk, mut close, mut shut)) = self.windows {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = brk.recv() => {}
                _ = close.recv() => {}
                _ = shut.recv() => {}
            }
            return;
        }
        let _ = (app, path);
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn token(config: Config, name: String, reveal: bool) -> ExitCode {
    let Some(pcfg) = config.providers.get(&name).cloned() else {
        let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        eprintln!("unknown provider {name:?} (known: {})", known.join(", "));
        return ExitCode::from(2);
    };
    let metrics = authgate::metrics::Metrics::new();
    let store = authgate::token::StoreHandle::new(
        std::sync::Arc::new(authgate::store::memory::MemoryStore::new()),
        metrics.clone(),
    );
    let deps = authgate::token::ProviderDeps {
        store,
        metrics: metrics.provider(&name),
        audit: None,
        shutdown: tokio_util::sync::CancellationToken::new(),
        events: authgate::token::TokenEvents::new(),
        proxy: match authgate::outbound::egress::EgressProxy::from_config(&config.outbound) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{}: {e}", config.path.display());
                return ExitCode::from(2);
            }
        },
    };
    let provider = match authgate::token::Provider::new(pcfg, deps) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: providers.{name}: {e}", config.path.display());
            return ExitCode::from(2);
        }
    };
    match provider
        .refresh_now(authgate::token::Trigger::Manual, Duration::from_secs(60))
        .await
    {
        Ok(t) => {
            let now = tokio::time::Instant::now();
            println!("provider:   {name}");
            println!("grant:      {}", provider.cfg.grant_kind().as_str());
            println!("generation: {}", t.generation);
            match t.expires_in(now) {
                Some(d) => println!("expires_in: {}s", d.as_secs()),
                None => println!("expires_in: unknown (used until a 401)"),
            }
            println!("scope:      {}", t.scope.as_deref().unwrap_or("-"));
            if reveal {
                println!("token:      {}", t.access_token.expose());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("provider {name}: {e}");
            ExitCode::from(1)
        }
    }
}
