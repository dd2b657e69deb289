//! The checked configuration the gateway runs on: every setting with its default
//! applied, and the error that names where a file went wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Uri};
use indexmap::IndexMap;

use crate::secret::SecretSource;

/// Where a request body limit is absent: no limit.
pub const DEFAULT_MAX_REPLAY_BODY: u64 = 1 << 20;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 64 << 10;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The base spacing of 401-driven refreshes. Short, so a token revoked a moment
/// after start-up is replaced at once; storms are stopped by doubling it each time
/// a refresh proves useless (the replay is rejected too), see `token::Provider`.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// A checked configuration: everything the gateway needs, nothing left to parse.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from, and its folder (relative paths are resolved there).
    pub path: PathBuf,
    pub listen: Listen,
    pub admin: Option<Admin>,
    pub audit: Option<Audit>,
    pub store: StoreConfig,
    pub outbound: Outbound,
    pub runtime: Runtime,
    /// `[log]`: where the log goes besides (for a console run) stderr.
    pub log: Log,
    pub providers: IndexMap<String, ProviderConfig>,
    pub routes: Vec<RouteConfig>,
    /// `None`: no `[callers]` section, everyone is allowed (anonymously).
    pub callers: Option<Vec<CallerConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub max_body: Option<u64>,
    pub max_replay_body: u64,
    pub header_timeout: Duration,
    pub max_header_size: u64,
    pub max_headers: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub tls: Option<ListenTls>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub addr: SocketAddr,
    /// `key_env` / `key_file`: HTTP Basic password of the console's actions; without
    /// one, actions are accepted from loopback clients only.
    pub key: Option<SecretSource>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    pub target: AuditTarget,
    /// Lines buffered between the request path and the writer before loss is counted.
    pub buffer: usize,
    pub rotate: Rotate,
    /// Rotated files kept; `None` keeps them all.
    pub keep: Option<usize>,
    /// Keys the HMAC of the chain; without one the chain is plain SHA-256.
    pub key: Option<SecretSource>,
}

/// When the audit file is closed and renamed to its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    Never,
    Hourly,
    Daily,
    /// Before a line would take the file past this many bytes.
    Size(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    Memory,
    File {
        path: PathBuf,
    },
    Postgres {
        url: SecretSource,
        table_prefix: String,
        poll_interval: Duration,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub key: Option<SecretSource>,
    pub protect: Protect,
}

/// `[store] protect`: how stored tokens are sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protect {
    /// Plaintext (the file is still private to the account).
    None,
    /// AES-256-GCM with `key_env`/`key_file`.
    Key,
    /// Windows DPAPI under the process's account (file store only).
    Dpapi,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outbound {
    /// Explicit proxy; `None` falls back to HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
    pub proxy: Option<Uri>,
    pub no_proxy: Vec<String>,
    pub proxy_username: Option<String>,
    pub proxy_password: Option<SecretSource>,
    pub proxy_auth: ProxyAuthMode,
}

/// `[outbound] proxy_auth`: how to answer the egress proxy's `407`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyAuthMode {
    /// The strongest scheme the proxy offers that can be used.
    #[default]
    Auto,
    Negotiate,
    Ntlm,
    Basic,
    /// Never answer a `407`.
    None,
}

impl ProxyAuthMode {
    pub const NAMES: &'static str = "auto, negotiate, ntlm, basic, none";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "negotiate" => Self::Negotiate,
            "ntlm" => Self::Ntlm,
            "basic" => Self::Basic,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Negotiate => "negotiate",
            Self::Ntlm => "ntlm",
            Self::Basic => "basic",
            Self::None => "none",
        }
    }
}

/// `[log]`. Without `file`, a console run logs to stderr only and a Windows
/// service to its default folder (`%ProgramData%\authgate\logs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// The log file; rotated daily into `<stem>.<YYYY-MM-DD>.<extension>` beside it.
    pub file: Option<PathBuf>,
    /// Rotated files kept, the current one included.
    pub keep: usize,
}

/// Log files kept when `[log] keep` is not set: two weeks of daily files.
pub const DEFAULT_LOG_KEEP: usize = 14;

impl Default for Log {
    fn default() -> Self {
        Log {
            file: None,
            keep: DEFAULT_LOG_KEEP,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Runtime {
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    ClientCredentials,
    RefreshToken,
    Static,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::ClientCredentials => "client_credentials",
            GrantKind::RefreshToken => "refresh_token",
            GrantKind::Static => "static",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlg {
    RS256,
    ES256,
    PS256,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// Public client: `client_id` in the form body, no secret.
    None,
    SecretBasic(SecretSource),
    SecretPost(SecretSource),
    PrivateKeyJwt {
        key: PathBuf,
        key_id: Option<String>,
        alg: JwtAlg,
    },
    TlsClientAuth {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// How a provider gets its credential.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Grant {
    Static {
        token: SecretSource,
    },
    ClientCredentials(OAuthClient),
    RefreshToken {
        client: OAuthClient,
        /// The first refresh token; optional with `authorize`, where the provider
        /// can be authorized from the console instead.
        initial_refresh_token: Option<SecretSource>,
        authorize: Option<Box<Authorize>>,
    },
}

/// Reauthorization settings of a `refresh_token` provider (authorization code +
/// PKCE, started from the admin console).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authorize {
    pub url: Uri,
    /// `None`: `http://127.0.0.1:<admin port>/oauth/callback`, known once the admin
    /// listener is bound.
    pub redirect_uri: Option<Uri>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OAuthClient {
    pub token_url: Uri,
    pub client_id: String,
    pub auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    pub grant: Grant,
    /// `None`: the default margin, which adapts to the token's lifetime.
    pub refresh_before: Option<Duration>,
    pub min_refresh_interval: Duration,
    pub header: HeaderName,
    pub scheme: String,
    pub expose_to: Vec<String>,
}

impl ProviderConfig {
    pub fn grant_kind(&self) -> GrantKind {
        match self.grant {
            Grant::Static { .. } => GrantKind::Static,
            Grant::ClientCredentials(_) => GrantKind::ClientCredentials,
            Grant::RefreshToken { .. } => GrantKind::RefreshToken,
        }
    }

    /// The reauthorization settings, when the provider has them.
    pub fn authorize(&self) -> Option<&Authorize> {
        match &self.grant {
            Grant::RefreshToken { authorize, .. } => authorize.as_deref(),
            _ => None,
        }
    }

    pub fn oauth(&self) -> Option<&OAuthClient> {
        match &self.grant {
            Grant::Static { .. } => None,
            Grant::ClientCredentials(c) | Grant::RefreshToken { client: c, .. } => Some(c),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Label in metrics, audit and errors: the `name` key, else the prefix.
    pub name: String,
    /// Normalized: starts with '/', no trailing '/' (except the root route "/").
    pub prefix: String,
    pub upstream: Uri,
    pub provider: Option<String>,
    /// `None`: every identified caller.
    pub allow: Option<Vec<String>>,
    pub timeout: Duration,
    pub replay: bool,
    pub tls: UpstreamTls,
}

/// What a route adds to the OS trust store and presents to its upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UpstreamTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallerConfig {
    pub name: String,
    pub addrs: Vec<ipnet::IpNet>,
    pub cert_names: Vec<String>,
    pub key: Option<SecretSource>,
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(line), Some(col)) = (self.line, self.column) {
            write!(f, ":{line}:{col}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}
