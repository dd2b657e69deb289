//! The one place with `unsafe` code: Windows calls that no well-kept crate wraps.
//! Each function is a thin, checked wrapper over one Win32 API; everything above it
//! is safe Rust. Windows only.
//!
//! - The Event Log (`RegisterEventSourceW`, `ReportEventW`) and the registration of
//!   an event source under `HKLM\SYSTEM\CurrentControlSet\Services\EventLog\Application`.
//! - The service entry point: `windows_service::define_windows_service!` expands to an
//!   `extern "system"` function with an `unsafe` block that reads the arguments the
//!   service manager passes.
//! - DPAPI (`CryptProtectData`, `CryptUnprotectData`): the file store's protection
//!   under the service's account.
//! - The machine's WinHTTP proxy (`WinHttpGetDefaultProxyConfiguration`), the last
//!   egress proxy fallback before direct.

#![expect(unsafe_code)]

use std::ffi::OsStr;
use std::os::windows::ffi::OsStrExt;

use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Cryptography::{
    CryptProtectData, CryptUnprotectData, CRYPTPROTECT_UI_FORBIDDEN, CRYPT_INTEGER_BLOB,
};
use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, RegisterEventSourceW, ReportEventW, EVENTLOG_ERROR_TYPE,
    EVENTLOG_INFORMATION_TYPE, EVENTLOG_WARNING_TYPE,
};
use windows_sys::Win32::System::Registry::{
    RegCloseKey, RegCreateKeyExW, RegDeleteKeyW, RegSetValueExW, HKEY, HKEY_LOCAL_MACHINE,
    KEY_SET_VALUE, REG_DWORD, REG_EXPAND_SZ, REG_OPTION_NON_VOLATILE,
};

/// A NUL-terminated UTF-16 copy of `s`.
fn wide(s: impl AsRef<OsStr>) -> Vec<u16> {
    s.as_ref().encode_wide().chain(std::iter::once(0)).collect()
}

/// How an Event Log entry is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Info,
    Warning,
    Error,
}

/// Writes `message` to the Application log under `source`. Best effort: the Event
/// Log being unavailable must not stop the service, so failures are ignored.
pub(crate) fn report_event(source: &str, kind: EventKind, event_id: u32, message: &str) {
    let source = wide(source);
    let message = wide(message);
    let kind = match kind {
        EventKind::Info => EVENTLOG_INFORMATION_TYPE,
        EventKind::Warning => EVENTLOG_WARNING_TYPE,
        EventKind::Error => EVENTLOG_ERROR_TYPE,
    };
    // SAFETY: `source` is a NUL-terminated wide string that outlives the call; a
    // null server name means the local computer.
    let log = unsafe { RegisterEventSourceW(std::ptr::null(), source.as_ptr()) };
    if log.is_null() {
        return;
    }
    let strings = [message.as_ptr()];
    // SAFETY: `log` is the handle just opened; `strings` holds one pointer to a
    // NUL-terminated wide string alive for the call; no SID and no raw data.
    unsafe {
        ReportEventW(
            log,
            kind,
            0,
            event_id,
            std::ptr::null_mut(),
            1,
            0,
            strings.as_ptr(),
            std::ptr::null(),
        );
        DeregisterEventSource(log);
    }
}

const EVENTLOG_KEY: &str = r"SYSTEM\CurrentControlSet\Services\EventLog\Application\";

/// The message file every .NET-capable Windows has, whose messages are all "%1":
/// the Event Viewer then shows our text as it is instead of "the description for
/// Event ID … cannot be found".
const MESSAGE_FILE: &str =
    r"%SystemRoot%\Microsoft.NET\Framework64\v4.0.30319\EventLogMessages.dll";

/// Registers `source` in the Application log (needs administrator rights, as
/// installing a service does).
pub(crate) fn register_event_source(source: &str) -> std::io::Result<()> {
    let key_path = wide(format!("{EVENTLOG_KEY}{source}"));
    let mut key: HKEY = std::ptr::null_mut();
    // SAFETY: `key_path` is NUL-terminated and alive for the call; `key` receives
    // the opened handle, closed below.
    let rc = unsafe {
        RegCreateKeyExW(
            HKEY_LOCAL_MACHINE,
            key_path.as_ptr(),
            0,
            std::ptr::null(),
            REG_OPTION_NON_VOLATILE,
            KEY_SET_VALUE,
            std::ptr::null(),
            &mut key,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc as i32));
    }
    let file = wide(MESSAGE_FILE);
    let file_bytes: Vec<u8> = file.iter().flat_map(|c| c.to_le_bytes()).collect();
    let types: u32 = 7; // error, warning, information
    let name_file = wide("EventMessageFile");
    let name_types = wide("TypesSupported");
    // SAFETY: `key` is open with KEY_SET_VALUE; names and data are alive for the
    // calls and their lengths are given in bytes.
    let (rc1, rc2) = unsafe {
        let rc1 = RegSetValueExW(
            key,
            name_file.as_ptr(),
            0,
            REG_EXPAND_SZ,
            file_bytes.as_ptr(),
            file_bytes.len() as u32,
        );
        let rc2 = RegSetValueExW(
            key,
            name_types.as_ptr(),
            0,
            REG_DWORD,
            (&types as *const u32).cast(),
            4,
        );
        RegCloseKey(key);
        (rc1, rc2)
    };
    match (rc1, rc2) {
        (0, 0) => Ok(()),
        (0, rc) | (rc, _) => Err(std::io::Error::from_raw_os_error(rc as i32)),
    }
}

/// Removes the registration made by [`register_event_source`]; a missing key is
/// not an error.
pub(crate) fn unregister_event_source(source: &str) {
    let key_path = wide(format!("{EVENTLOG_KEY}{source}"));
    // SAFETY: `key_path` is NUL-terminated and alive for the call.
    unsafe {
        RegDeleteKeyW(HKEY_LOCAL_MACHINE, key_path.as_ptr());
    }
}

windows_service::define_windows_service!(ffi_service_main, service_main);

/// What the service runs, set by the service module before it starts the
/// dispatcher (so this module, below it, never imports it back).
static SERVICE_BODY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Called by the service manager on its own thread once the dispatcher started.
fn service_main(_arguments: Vec<std::ffi::OsString>) {
    if let Some(body) = SERVICE_BODY.get() {
        body();
    }
}

/// The entry point handed to `service_dispatcher::start`, which calls `body` on the
/// service manager's thread.
pub(crate) fn service_entry(body: fn()) -> extern "system" fn(u32, *mut *mut u16) {
    let _ = SERVICE_BODY.set(body);
    ffi_service_main
}

/// A blob pointing into `data` (read only by the API despite its `*mut`).
fn blob(data: &[u8]) -> Result<CRYPT_INTEGER_BLOB, std::io::Error> {
    Ok(CRYPT_INTEGER_BLOB {
        cbData: u32::try_from(data.len()).map_err(|_| std::io::Error::other("value too large"))?,
        pbData: data.as_ptr().cast_mut(),
    })
}

/// Copies the API-allocated output out and frees it with `LocalFree`, as the API
/// requires.
fn take_output(out: CRYPT_INTEGER_BLOB) -> Vec<u8> {
    if out.pbData.is_null() {
        return Vec::new();
    }
    // SAFETY: on success the API set `pbData` to `cbData` bytes it allocated with
    // LocalAlloc; they are copied before being freed once.
    unsafe {
        let bytes = std::slice::from_raw_parts(out.pbData, out.cbData as usize).to_vec();
        std::ptr::write_bytes(out.pbData, 0, out.cbData as usize);
        LocalFree(out.pbData.cast());
        bytes
    }
}

/// Encrypts `plain` for the current account (DPAPI), with `entropy` bound to it:
/// the same entropy is needed to decrypt.
pub(crate) fn dpapi_protect(plain: &[u8], entropy: &[u8]) -> std::io::Result<Vec<u8>> {
    // SAFETY: the blobs point into live slices for the call; no description,
    // reserved or prompt arguments; `out` receives an allocation `dpapi` takes.
    dpapi(plain, entropy, |input, entropy, out| unsafe {
        CryptProtectData(
            input,
            std::ptr::null(),
            entropy,
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_UI_FORBIDDEN,
            out,
        )
    })
}

/// Decrypts what [`dpapi_protect`] made, under the same account (and machine),
/// with the same entropy; anything else (another account, altered data) fails.
pub(crate) fn dpapi_unprotect(sealed: &[u8], entropy: &[u8]) -> std::io::Result<Vec<u8>> {
    // SAFETY: as in `dpapi_protect`; no description is asked for.
    dpapi(sealed, entropy, |input, entropy, out| unsafe {
        CryptUnprotectData(
            input,
            std::ptr::null_mut(),
            entropy,
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_UI_FORBIDDEN,
            out,
        )
    })
}

/// One DPAPI call over `data` and `entropy`: `call` returns the API's BOOL and
/// fills its output blob, which is copied out and freed.
fn dpapi(
    data: &[u8],
    entropy: &[u8],
    call: impl FnOnce(&CRYPT_INTEGER_BLOB, &CRYPT_INTEGER_BLOB, &mut CRYPT_INTEGER_BLOB) -> i32,
) -> std::io::Result<Vec<u8>> {
    let input = blob(data)?;
    let entropy = blob(entropy)?;
    let mut out = CRYPT_INTEGER_BLOB {
        cbData: 0,
        pbData: std::ptr::null_mut(),
    };
    if call(&input, &entropy, &mut out) == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(take_output(out))
}

/// The machine's WinHTTP proxy (`netsh winhttp set proxy`): the proxy list and
/// the bypass list as Windows stores them, or `None` when it is direct.
pub(crate) fn winhttp_default_proxy() -> Option<(String, String)> {
    use windows_sys::Win32::Foundation::GlobalFree;
    use windows_sys::Win32::Networking::WinHttp::{
        WinHttpGetDefaultProxyConfiguration, WINHTTP_ACCESS_TYPE_NAMED_PROXY, WINHTTP_PROXY_INFO,
    };

    let mut info = WINHTTP_PROXY_INFO {
        dwAccessType: 0,
        lpszProxy: std::ptr::null_mut(),
        lpszProxyBypass: std::ptr::null_mut(),
    };
    // SAFETY: `info` is a valid out-structure; the strings it receives are
    // GlobalAlloc'd by WinHTTP and freed below, once each.
    let ok = unsafe { WinHttpGetDefaultProxyConfiguration(&mut info) };
    if ok == 0 {
        return None;
    }
    let take = |p: *mut u16| -> String {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: a NUL-terminated wide string from WinHTTP, read then freed.
        unsafe {
            let len = (0..).take_while(|&i| *p.add(i) != 0).count();
            let s = String::from_utf16_lossy(std::slice::from_raw_parts(p, len));
            GlobalFree(p.cast());
            s
        }
    };
    let proxy = take(info.lpszProxy);
    let bypass = take(info.lpszProxyBypass);
    (info.dwAccessType == WINHTTP_ACCESS_TYPE_NAMED_PROXY && !proxy.trim().is_empty())
        .then_some((proxy, bypass))
}
