//! The Windows service manager side of `authgate service`: registering the
//! service, starting, stopping and querying it, and `service run`, the process the
//! manager starts.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceSidType, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_dispatcher;
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use super::{exit_code, StartMode};
use crate::app::StartError;
use crate::config::Config;
use crate::win32::{self as ffi, EventKind};
use crate::App;

/// `authgate service install`'s choices.
#[derive(Debug)]
pub struct Install {
    /// Absolute path of the (already validated) config file.
    pub config: PathBuf,
    pub name: String,
    /// As given to `--account`; `None` is the virtual account.
    pub account: Option<String>,
    /// The user account's password (from `--password-env`). Never printed.
    pub password: Option<crate::secret::Secret>,
    pub start: StartMode,
}

/// Why a `service` command failed. Shown to the operator as one line: what was
/// being done, the system's reason with its causes, and a hint for the two reasons
/// an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{what}: {}", describe_manager_error(.reason))]
    Manager {
        what: String,
        reason: windows_service::Error,
    },
    #[error("cannot locate authgate.exe: {0}")]
    Exe(std::io::Error),
    #[error("service {name:?} stopped while starting ({exit}); see the Event Log (Application, source {name:?})")]
    StoppedWhileStarting { name: String, exit: String },
    #[error("the service is still {state:?} after {} s", .within.as_secs())]
    StillPending {
        state: ServiceState,
        within: Duration,
    },
    #[error("cannot connect to the service manager: {}; `service run` is started by the service manager (`authgate service start`); from a console use `authgate run`", describe_manager_error(.0))]
    NotStartedByManager(windows_service::Error),
}

fn failed(what: impl Into<String>) -> impl FnOnce(windows_service::Error) -> ServiceError {
    let what = what.into();
    move |reason| ServiceError::Manager { what, reason }
}

/// The system's reason with its causes, and a hint where the operator can act.
fn describe_manager_error(e: &windows_service::Error) -> String {
    let mut msg = crate::cause::chain(e);
    if let windows_service::Error::Winapi(io) = e {
        // ERROR_ACCESS_DENIED
        if io.raw_os_error() == Some(5) {
            msg.push_str(
                " (run it from an elevated prompt: managing services needs administrator rights)",
            );
        }
        // ERROR_SERVICE_DOES_NOT_EXIST
        if io.raw_os_error() == Some(1060) {
            msg.push_str(" (no such service: see `authgate service install --name`)");
        }
    }
    msg
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, ServiceError> {
    ServiceManager::local_computer(None::<&str>, access)
        .map_err(failed("cannot open the service manager"))
}

/// Registers the service: `service run` with the config's absolute path, the
/// account, the start mode, restart on failure after 5 s, 30 s and 60 s, and an
/// Event Log source named like the service.
pub fn install(opts: &Install) -> Result<(), ServiceError> {
    let scm = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let exe = std::env::current_exe().map_err(ServiceError::Exe)?;
    let info = ServiceInfo {
        name: OsString::from(&opts.name),
        display_name: OsString::from(format!("authgate ({})", opts.name)),
        service_type: ServiceType::OWN_PROCESS,
        start_type: match opts.start {
            StartMode::Auto | StartMode::Delayed => ServiceStartType::AutoStart,
            StartMode::Demand => ServiceStartType::OnDemand,
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: exe,
        launch_arguments: vec![
            "service".into(),
            "run".into(),
            "--config".into(),
            opts.config.clone().into_os_string(),
            "--name".into(),
            OsString::from(&opts.name),
        ],
        dependencies: vec![],
        account_name: super::account_name(opts.account.as_deref(), &opts.name).map(OsString::from),
        account_password: opts.password.as_ref().map(|p| OsString::from(p.expose())),
    };
    let service = scm
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::QUERY_CONFIG,
        )
        .map_err(failed(format!("cannot create service {:?}", opts.name)))?;
    service
        .set_description(
            "Outbound authenticating gateway: injects OAuth tokens into requests to third-party APIs",
        )
        .map_err(failed("cannot set the description"))?;
    if opts.start == StartMode::Delayed {
        optional(
            service.set_delayed_auto_start(true),
            "cannot set delayed start",
        )?;
    }
    if opts.account.is_none() {
        // The virtual account's SID is the service's own; unrestricted, so file
        // permissions can be granted to `NT SERVICE\<name>`.
        optional(
            service.set_config_service_sid_info(ServiceSidType::Unrestricted),
            "cannot set the service SID type",
        )?;
    }
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(30), restart(60)]),
        })
        .map_err(failed("cannot set the restart-on-failure actions"))?;
    // A stop with a service-specific exit code (a bad config, a port in use) is a
    // failure too, not only a crash.
    optional(
        service.set_failure_actions_on_non_crash_failures(true),
        "cannot apply the restart actions to failed stops",
    )?;
    if let Err(e) = ffi::register_event_source(&opts.name) {
        eprintln!(
            "warning: cannot register the Event Log source {:?} ({e}); events will still be written, without their message file",
            opts.name
        );
    }
    Ok(())
}

/// A setting Windows has had since Vista but Wine's service manager refuses with
/// ERROR_INVALID_LEVEL: warned about, not fatal, so the rest of the service can
/// still be installed (and tested) there. Any other error is.
fn optional(r: windows_service::Result<()>, what: &str) -> Result<(), ServiceError> {
    match r {
        Err(windows_service::Error::Winapi(e)) if e.raw_os_error() == Some(124) => {
            eprintln!("warning: {what}: this service manager does not support the setting ({e})");
            Ok(())
        }
        r => r.map_err(failed(what)),
    }
}

/// Stops the service if it runs, then removes it and its Event Log source.
pub fn uninstall(name: &str) -> Result<(), ServiceError> {
    let scm = manager(ServiceManagerAccess::CONNECT)?;
    let service = scm
        .open_service(
            name,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .map_err(failed(format!("cannot open service {name:?}")))?;
    let status = service
        .query_status()
        .map_err(failed("cannot query the service"))?;
    if status.current_state != ServiceState::Stopped {
        service.stop().map_err(failed("cannot stop the service"))?;
        wait_for(&service, ServiceState::Stopped, STOP_WAIT)?;
    }
    service
        .delete()
        .map_err(failed("cannot delete the service"))?;
    ffi::unregister_event_source(name);
    Ok(())
}

/// How long `service start` waits for running and `service stop` for stopped.
const START_WAIT: Duration = Duration::from_secs(120);
const STOP_WAIT: Duration = Duration::from_secs(120);

/// Starts the service and waits until it runs; a service that stops instead
/// reports its exit code.
pub fn start(name: &str) -> Result<ServiceStatus, ServiceError> {
    let scm = manager(ServiceManagerAccess::CONNECT)?;
    let service = scm
        .open_service(name, ServiceAccess::QUERY_STATUS | ServiceAccess::START)
        .map_err(failed(format!("cannot open service {name:?}")))?;
    service
        .start::<&OsStr>(&[])
        .map_err(failed("cannot start the service"))?;
    let status = wait_for(&service, ServiceState::Running, START_WAIT)?;
    if status.current_state != ServiceState::Running {
        return Err(ServiceError::StoppedWhileStarting {
            name: name.to_owned(),
            exit: describe_exit(&status.exit_code),
        });
    }
    Ok(status)
}

/// Asks the service to stop (it drains like SIGTERM) and waits until it has.
pub fn stop(name: &str) -> Result<ServiceStatus, ServiceError> {
    let scm = manager(ServiceManagerAccess::CONNECT)?;
    let service = scm
        .open_service(name, ServiceAccess::QUERY_STATUS | ServiceAccess::STOP)
        .map_err(failed(format!("cannot open service {name:?}")))?;
    service.stop().map_err(failed("cannot stop the service"))?;
    wait_for(&service, ServiceState::Stopped, STOP_WAIT)
}

/// The service's state, process and last exit code, as one line.
pub fn status(name: &str) -> Result<String, ServiceError> {
    let scm = manager(ServiceManagerAccess::CONNECT)?;
    let service = scm
        .open_service(name, ServiceAccess::QUERY_STATUS)
        .map_err(failed(format!("cannot open service {name:?}")))?;
    let s = service
        .query_status()
        .map_err(failed("cannot query the service"))?;
    Ok(describe(name, &s))
}

/// `NAME: RUNNING (pid 1234)` or `NAME: STOPPED (exit: service-specific 2)`.
pub fn describe(name: &str, s: &ServiceStatus) -> String {
    let state = match s.current_state {
        ServiceState::Stopped => "STOPPED",
        ServiceState::StartPending => "START_PENDING",
        ServiceState::StopPending => "STOP_PENDING",
        ServiceState::Running => "RUNNING",
        ServiceState::ContinuePending => "CONTINUE_PENDING",
        ServiceState::PausePending => "PAUSE_PENDING",
        ServiceState::Paused => "PAUSED",
    };
    match (s.current_state, s.process_id) {
        (ServiceState::Stopped, _) => format!("{name}: {state} ({})", describe_exit(&s.exit_code)),
        (_, Some(pid)) => format!("{name}: {state} (pid {pid})"),
        (_, None) => format!("{name}: {state}"),
    }
}

fn describe_exit(code: &ServiceExitCode) -> String {
    match code {
        ServiceExitCode::Win32(0) => "exit: 0".into(),
        ServiceExitCode::Win32(c) => format!("exit: Win32 error {c}"),
        ServiceExitCode::ServiceSpecific(c) => {
            let why = match *c {
                exit_code::CONFIG => " (invalid configuration)",
                exit_code::BIND => " (cannot bind a listener)",
                exit_code::START_FAILED => " (start-up failed)",
                _ => "",
            };
            format!("exit: service-specific {c}{why}")
        }
    }
}

/// Polls until `want` (or, for a start, until stopped) or `within` passes.
fn wait_for(
    service: &windows_service::service::Service,
    want: ServiceState,
    within: Duration,
) -> Result<ServiceStatus, ServiceError> {
    let deadline = Instant::now() + within;
    loop {
        let s = service
            .query_status()
            .map_err(failed("cannot query the service"))?;
        if s.current_state == want || s.current_state == ServiceState::Stopped {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::StillPending {
                state: s.current_state,
                within,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where a service logs without `[log] file`: `%ProgramData%\authgate\logs\<name>.log`.
pub fn default_log_file(name: &str) -> PathBuf {
    let data = std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into());
    PathBuf::from(data)
        .join("authgate")
        .join("logs")
        .join(format!("{name}.log"))
}

/// What `service run` hands to the service's main thread.
#[derive(Debug)]
struct RunContext {
    name: String,
    config_path: PathBuf,
}

static RUN: OnceLock<RunContext> = OnceLock::new();

/// `authgate service run`: connects to the service manager, which then calls
/// [`service_main`] on its own thread; returns when the service has stopped.
/// Run from a console (not by the service manager), it fails with a hint.
pub fn run(name: String, config_path: PathBuf) -> Result<(), ServiceError> {
    let _ = RUN.set(RunContext {
        name: name.clone(),
        config_path,
    });
    service_dispatcher::start(&name, ffi::service_entry(service_main))
        .map_err(ServiceError::NotStartedByManager)
}

/// Reports status to the service manager; the checkpoint grows with every pending
/// report so the manager sees progress during a long drain.
struct Reporter {
    handle: service_control_handler::ServiceStatusHandle,
    checkpoint: AtomicU32,
}

impl Reporter {
    fn set(
        &self,
        state: ServiceState,
        accept: ServiceControlAccept,
        exit: ServiceExitCode,
        hint: Duration,
    ) {
        let pending = matches!(
            state,
            ServiceState::StartPending | ServiceState::StopPending
        );
        let checkpoint = if pending {
            self.checkpoint.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        let status = ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: exit,
            checkpoint,
            wait_hint: hint,
            process_id: None,
        };
        if let Err(e) = self.handle.set_service_status(status) {
            tracing::warn!(error = %describe_manager_error(&e), "cannot report the service status");
        }
    }

    fn pending(&self, state: ServiceState, hint: Duration) {
        self.set(
            state,
            ServiceControlAccept::empty(),
            ServiceExitCode::NO_ERROR,
            hint,
        );
    }
}

/// The service's main: start pending, the gateway, running, then on Stop,
/// Shutdown or Preshutdown the same drain as SIGTERM, then stopped.
pub(crate) fn service_main() {
    let Some(ctx) = RUN.get() else { return };
    let stop = CancellationToken::new();
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let handler = {
        let stop = stop.clone();
        let reload = reload.clone();
        move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
                stop.cancel();
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::ParamChange => {
                reload.notify_one();
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        }
    };
    let handle = match service_control_handler::register(&ctx.name, handler) {
        Ok(h) => h,
        Err(e) => {
            let msg = failed("cannot register the service control handler")(e).to_string();
            tracing::error!("{msg}");
            ffi::report_event(&ctx.name, EventKind::Error, 1, &msg);
            return;
        }
    };
    let reporter = Reporter {
        handle,
        checkpoint: AtomicU32::new(0),
    };
    reporter.pending(ServiceState::StartPending, Duration::from_secs(30));
    let exit = serve(ctx, &reporter, stop, reload);
    if exit != ServiceExitCode::NO_ERROR {
        tracing::error!(exit = %describe_exit(&exit), "service stopped with an error");
    }
    reporter.set(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        exit,
        Duration::ZERO,
    );
}

/// Runs the gateway until a stop control; the exit code to report.
fn serve(
    ctx: &RunContext,
    reporter: &Reporter,
    stop: CancellationToken,
    reload: std::sync::Arc<tokio::sync::Notify>,
) -> ServiceExitCode {
    let fatal = |code: u32, msg: &str| {
        tracing::error!("{msg}");
        ffi::report_event(&ctx.name, EventKind::Error, code, msg);
        ServiceExitCode::ServiceSpecific(code)
    };
    let config = match Config::load(&ctx.config_path) {
        Ok(c) => c,
        Err(e) => return fatal(exit_code::CONFIG, &format!("configuration rejected: {e}")),
    };
    let grace = config.listen.shutdown_grace;
    let mut rt = match config.runtime.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return fatal(
                exit_code::START_FAILED,
                &format!("cannot start the runtime: {e}"),
            )
        }
    };
    rt.block_on(async {
        let app = match App::start(config).await {
            Ok(app) => app,
            Err(e) => {
                let code = match &e {
                    StartError::Bind { .. } => exit_code::BIND,
                    e if e.exit_code() == 2 => exit_code::CONFIG,
                    _ => exit_code::START_FAILED,
                };
                return fatal(code, &format!("cannot start: {e}"));
            }
        };
        let watcher = match app.watch_config(&ctx.config_path) {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with `sc control NAME paramchange`");
                None
            }
        };
        reporter.set(
            ServiceState::Running,
            ServiceControlAccept::STOP | ServiceControlAccept::PRESHUTDOWN | ServiceControlAccept::PARAM_CHANGE,
            ServiceExitCode::NO_ERROR,
            Duration::ZERO,
        );
        let listening = format!(
            "started: listening on {}{}, config {}",
            app.addr,
            app.admin_addr.map(|a| format!(", admin on {a}")).unwrap_or_default(),
            ctx.config_path.display()
        );
        ffi::report_event(&ctx.name, EventKind::Info, 100, &listening);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = reload.notified() => {
                    if let Err(e) = app.reload(&ctx.config_path) {
                        let msg = format!("configuration rejected; keeping the running one: {e}");
                        ffi::report_event(&ctx.name, EventKind::Warning, 103, &msg);
                    }
                }
            }
        }
        if let Some(task) = watcher {
            task.abort();
        }
        tracing::info!("service stop requested: draining in-flight requests");
        ffi::report_event(&ctx.name, EventKind::Info, 101, "stopping: draining in-flight requests");
        // The manager waits as long as the checkpoint grows within each hint.
        let hint = Duration::from_secs(5);
        reporter.pending(ServiceState::StopPending, grace + hint);
        let ticker = async {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                reporter.pending(ServiceState::StopPending, hint);
            }
        };
        tokio::select! {
            _ = app.shutdown() => {}
            _ = ticker => {}
        }
        tracing::info!("stopped");
        ffi::report_event(&ctx.name, EventKind::Info, 102, "stopped");
        ServiceExitCode::NO_ERROR
    })
}
