//! The TOML file as serde sees it: every key of DESIGN.md, unknown keys rejected.
//! Values are checked for shape here (durations, sizes, networks) and for meaning in
//! `validate`.

use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) listen: RawListen,
    pub(crate) admin: Option<RawAdmin>,
    pub(crate) audit: Option<RawAudit>,
    pub(crate) store: Option<RawStore>,
    pub(crate) outbound: Option<RawOutbound>,
    pub(crate) runtime: Option<RawRuntime>,
    pub(crate) log: Option<RawLog>,
    #[serde(default)]
    pub(crate) providers: IndexMap<String, RawProvider>,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    pub(crate) callers: Option<IndexMap<String, RawCaller>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListen {
    pub(crate) addr: String,
    pub(crate) max_body: Option<Size>,
    pub(crate) max_replay_body: Option<Size>,
    pub(crate) header_timeout: Option<Dur>,
    pub(crate) max_header_size: Option<Size>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) idle_timeout: Option<Dur>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) shutdown_grace: Option<Dur>,
    pub(crate) tls_cert: Option<String>,
    pub(crate) tls_key: Option<String>,
    pub(crate) client_ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) addr: String,
    /// The password of the console's actions (HTTP Basic, user `admin`).
    pub(crate) key_env: Option<String>,
    pub(crate) key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub(crate) file: Option<String>,
    pub(crate) keep: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    pub(crate) file: String,
    pub(crate) buffer: Option<usize>,
    /// "daily", "hourly" or a size ("100MiB").
    pub(crate) rotate: Option<String>,
    pub(crate) keep: Option<usize>,
    pub(crate) key_env: Option<String>,
    pub(crate) key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) kind: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) url_env: Option<String>,
    pub(crate) url_file: Option<String>,
    pub(crate) key_env: Option<String>,
    pub(crate) key_file: Option<String>,
    pub(crate) protect: Option<String>,
    /// postgres: table-name prefix, so several fleets (or test runs) share a database.
    pub(crate) table_prefix: Option<String>,
    /// postgres: how often a replica re-reads stored tokens besides LISTEN/NOTIFY.
    pub(crate) poll_interval: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbound {
    pub(crate) proxy: Option<String>,
    pub(crate) no_proxy: Option<Vec<String>>,
    pub(crate) proxy_username: Option<String>,
    pub(crate) proxy_password_env: Option<String>,
    pub(crate) proxy_password_file: Option<String>,
    pub(crate) proxy_auth: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    pub(crate) worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    pub(crate) grant: String,
    pub(crate) token_url: Option<String>,
    pub(crate) client_id: Option<String>,
    pub(crate) client_secret_env: Option<String>,
    pub(crate) client_secret_file: Option<String>,
    pub(crate) client_auth: Option<String>,
    pub(crate) scope: Option<String>,
    pub(crate) audience: Option<String>,
    pub(crate) resource: Option<String>,
    pub(crate) refresh_before: Option<Dur>,
    pub(crate) min_refresh_interval: Option<Dur>,
    pub(crate) header: Option<String>,
    pub(crate) scheme: Option<String>,
    pub(crate) refresh_token_env: Option<String>,
    pub(crate) refresh_token_file: Option<String>,
    /// `refresh_token` grant: the IdP's authorization endpoint, for reauthorization
    /// from the console (authorization code + PKCE).
    pub(crate) authorize_url: Option<String>,
    pub(crate) redirect_uri: Option<String>,
    pub(crate) token_env: Option<String>,
    pub(crate) token_file: Option<String>,
    pub(crate) client_key: Option<String>,
    pub(crate) client_key_id: Option<String>,
    pub(crate) client_key_alg: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) expose_to: Option<Vec<String>>,
    pub(crate) allow_http: Option<bool>,
    /// Extra trust roots for the token endpoint.
    pub(crate) ca: Option<String>,
    /// Time limit of one token request.
    pub(crate) timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) prefix: String,
    pub(crate) upstream: String,
    pub(crate) name: Option<String>,
    pub(crate) provider: Option<String>,
    pub(crate) allow: Option<Vec<String>>,
    pub(crate) timeout: Option<Dur>,
    pub(crate) replay: Option<bool>,
    pub(crate) allow_http: Option<bool>,
    pub(crate) ca: Option<String>,
    pub(crate) client_cert: Option<String>,
    pub(crate) client_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCaller {
    #[serde(default)]
    pub(crate) addrs: Vec<Net>,
    #[serde(default)]
    pub(crate) cert_names: Vec<String>,
    pub(crate) key_env: Option<String>,
    pub(crate) key_file: Option<String>,
}

/// A duration written as a string: "500ms", "60s", "5m".
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dur(pub(crate) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"500ms\", \"60s\", \"5m\""
            ))
        })
    }
}

/// A size written as a string: "64KiB", "1MiB", "512" (bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Size(pub(crate) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s).map(Size).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}; use e.g. \"64KiB\", \"1MiB\", \"10MB\" or a number of bytes"
            ))
        })
    }
}

pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A source network: CIDR ("10.1.0.0/16") or a single address ("127.0.0.1").
#[derive(Debug, Clone, Copy)]
pub(crate) struct Net(pub(crate) ipnet::IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Net(net.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Net(ipnet::IpNet::from(ip)))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid network {s:?}; use CIDR like \"10.1.0.0/16\""
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("10MB"), Some(10_000_000));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }
}
