//! The database URL: libpq's TLS options (`sslmode`, `sslrootcert`) taken out and
//! handled here, the rest given to tokio-postgres. No error quotes the URL's values.

use std::str::FromStr;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode;
use tokio_postgres::Config;

use crate::cause::chain;
use crate::store::token_store::StoreError;

/// libpq's `sslmode` values. tokio-postgres knows only disable/prefer/require, so
/// the verifying modes are taken out of the URL and handled by the verifier here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsMode {
    Disable,
    /// TLS when the server offers it, plaintext otherwise; certificate not checked.
    Prefer,
    /// TLS or nothing; certificate not checked (libpq semantics).
    Require,
    /// Certificate chain checked against the trust roots; host name not checked.
    VerifyCa,
    /// Chain and host name checked.
    VerifyFull,
}

/// `Debug` is safe: `Config`'s own `Debug` redacts the password.
#[derive(Debug)]
pub(super) struct ParsedUrl {
    pub(super) config: Config,
    pub(super) mode: TlsMode,
    pub(super) root_cert: Option<String>,
}

pub(super) fn parse_url(url: &str) -> Result<ParsedUrl, StoreError> {
    let (rest, params) = take_tls_params(url);
    let mut sslmode = None;
    let mut root_cert = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            _ => root_cert = Some(value),
        }
    }
    let mode = match sslmode.as_deref() {
        Some("disable") => TlsMode::Disable,
        // tokio-postgres has no "allow" (plaintext first); prefer is the safer near
        // equivalent.
        None | Some("allow" | "prefer") => TlsMode::Prefer,
        // libpq: require with a root certificate behaves as verify-ca.
        Some("require") if root_cert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Require,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => {
            return Err(StoreError::Config(format!(
                "database URL: unknown sslmode {other:?} (known: disable, allow, prefer, require, verify-ca, verify-full)"
            )))
        }
    };
    // The parse error names the option, never its value, so the password stays out.
    let mut config = Config::from_str(&rest)
        .map_err(|e| StoreError::Config(format!("database URL: {}", chain(&e))))?;
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    Ok(ParsedUrl {
        config,
        mode,
        root_cert,
    })
}

/// Removes `sslmode` and `sslrootcert` from a URL (`postgres://…?sslmode=…`) or a
/// key/value string (`host=… sslmode=…`), returning the rest and what was removed.
pub(super) fn take_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    const KEYS: [&str; 2] = ["sslmode", "sslrootcert"];
    let mut taken = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if KEYS.contains(&key) {
                taken.push((
                    key.to_owned(),
                    percent_decode_str(value).decode_utf8_lossy().into_owned(),
                ));
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, taken)
    } else {
        // Key/value form: only `key=value` words without quotes are recognised,
        // which is how these two options are written in practice.
        let mut rest = String::with_capacity(url.len());
        for word in url.split_inclusive(char::is_whitespace) {
            let trimmed = word.trim_end();
            match trimmed.split_once('=') {
                Some((key, value)) if KEYS.contains(&key) && !value.starts_with('\'') => {
                    taken.push((key.to_owned(), value.to_owned()));
                }
                _ => rest.push_str(word),
            }
        }
        (rest, taken)
    }
}
