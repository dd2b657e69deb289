//! `authgate service …`: the gateway as a native Windows service. The service
//! manager runs `authgate service run --config <absolute path> --name <name>`,
//! which reports start pending until the listeners are bound, then running, and
//! drains on Stop, Shutdown and Preshutdown exactly like SIGTERM.
//!
//! On other systems the commands exist (so `--help` reads the same everywhere) and
//! fail with [`UNSUPPORTED`].

#[cfg(windows)]
pub mod windows;

/// What the `service` commands say on systems without a Windows service manager.
pub const UNSUPPORTED: &str = "`authgate service` manages a Windows service and works only on Windows; elsewhere run `authgate run` under the system's service manager (e.g. a systemd unit)";

/// The service name when `--name` is not given.
pub const DEFAULT_NAME: &str = "authgate";

/// When the service manager starts the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// At boot.
    Auto,
    /// At boot, after the other automatic services (the default: the network and
    /// the proxy configuration are up by then).
    Delayed,
    /// Only when started by hand.
    Demand,
}

/// Service-specific exit codes `service run` reports to the service manager (shown
/// by `sc query` and `authgate service status`).
pub mod exit_code {
    /// The gateway stopped for a reason outside the configuration (e.g. the disk).
    pub const START_FAILED: u32 = 1;
    /// The configuration is invalid (the same message as `check`, in the Event Log).
    pub const CONFIG: u32 = 2;
    /// A listener address could not be bound (in use, or not permitted).
    pub const BIND: u32 = 3;
}

/// The account a service runs as, from `--account` (default: the virtual account
/// `NT SERVICE\<name>`). `None` is what the service manager calls LocalSystem.
pub fn account_name(account: Option<&str>, name: &str) -> Option<String> {
    match account {
        None => Some(format!(r"NT SERVICE\{name}")),
        Some(a) if a.eq_ignore_ascii_case("LocalSystem") => None,
        Some(a) if a.eq_ignore_ascii_case("LocalService") => {
            Some(r"NT AUTHORITY\LocalService".into())
        }
        Some(a) if a.eq_ignore_ascii_case("NetworkService") => {
            Some(r"NT AUTHORITY\NetworkService".into())
        }
        Some(a) => Some(a.to_owned()),
    }
}

/// Whether `account` (as given to `--account`) needs a password: a user account
/// does, the built-in and virtual accounts do not.
pub fn needs_password(account: Option<&str>) -> bool {
    match account {
        None => false,
        Some(a) => {
            !(a.eq_ignore_ascii_case("LocalSystem")
                || a.eq_ignore_ascii_case("LocalService")
                || a.eq_ignore_ascii_case("NetworkService")
                || a.len() > 11
                    && a.get(..11)
                        .is_some_and(|p| p.eq_ignore_ascii_case(r"NT SERVICE\")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_account_is_the_virtual_account_of_the_service() {
        assert_eq!(
            account_name(None, "authgate-crm").as_deref(),
            Some(r"NT SERVICE\authgate-crm")
        );
        assert_eq!(account_name(Some("localsystem"), "x"), None);
        assert_eq!(
            account_name(Some("NetworkService"), "x").as_deref(),
            Some(r"NT AUTHORITY\NetworkService")
        );
        assert_eq!(
            account_name(Some(r"CORP\svc-gw"), "x").as_deref(),
            Some(r"CORP\svc-gw")
        );
    }

    #[test]
    fn only_user_accounts_need_a_password() {
        assert!(!needs_password(None));
        assert!(!needs_password(Some("LocalService")));
        assert!(!needs_password(Some(r"NT SERVICE\other")));
        assert!(needs_password(Some(r"CORP\svc-gw")));
        assert!(needs_password(Some("svc@corp.example")));
        // Byte 11 inside a character: a user account, not a panic.
        assert!(needs_password(Some("CORP\\ab-äääää")));
    }
}
