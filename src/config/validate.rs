//! From `RawConfig` to `Config`: meaning, cross-references and defaults. Every error
//! carries the key path so `locate` can point at the line.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Uri};
use indexmap::IndexMap;
use toml::de::DeTable;

use super::locate::{line_col, offset_of, KeyPath};
use super::model::*;
use super::raw::*;
use crate::secret::SecretSource;

type Check<T> = Result<T, (KeyPath, String)>;

pub(super) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let at = |offset: Option<usize>, key: Option<String>, message: String| {
        let (line, column) = match offset {
            Some(o) => {
                let (l, c) = line_col(text, o);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: file.clone(),
            line,
            column,
            key,
            message,
        }
    };

    let doc = DeTable::parse(text).map_err(|e| {
        at(
            e.span().map(|s| s.start),
            None,
            e.message().trim().to_owned(),
        )
    })?;
    let de = toml::de::Deserializer::from(doc.clone());
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let span = e.inner().span();
        // serde_path_to_error's path already ends with an unknown key's name.
        let key = e.path().to_string();
        let message = e.inner().message().trim().to_owned();
        let key = (key != ".").then_some(key);
        at(span.map(|s| s.start), key, message)
    })?;

    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    build(raw, path, &dir).map_err(|(key, message)| {
        let offset = offset_of(doc.get_ref(), &key);
        let key = key.to_string();
        at(offset, (!key.is_empty()).then_some(key), message)
    })
}

fn build(raw: RawConfig, path: &Path, dir: &Path) -> Check<Config> {
    let root = KeyPath::root();
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };

    // [callers] first: routes and providers refer to them.
    let callers = match raw.callers {
        None => None,
        Some(map) => {
            let at = root.key("callers");
            let mut out = Vec::new();
            for (name, c) in map {
                let at = at.key(&name);
                let key = secret_pair(&at, "key", c.key_env, c.key_file, &resolve)?;
                if c.addrs.is_empty() && c.cert_names.is_empty() && key.is_none() {
                    return Err((
                        at,
                        "a caller needs at least one of addrs, cert_names, key_env/key_file".into(),
                    ));
                }
                out.push(CallerConfig {
                    name,
                    addrs: c.addrs.into_iter().map(|n| n.0).collect(),
                    cert_names: c.cert_names,
                    key,
                });
            }
            Some(out)
        }
    };
    let caller_names: Vec<&str> = callers.iter().flatten().map(|c| c.name.as_str()).collect();
    let check_callers = |at: &KeyPath, names: &[String]| -> Check<()> {
        for (i, n) in names.iter().enumerate() {
            if !caller_names.contains(&n.as_str()) {
                let known = if caller_names.is_empty() {
                    "none defined".to_owned()
                } else {
                    caller_names.join(", ")
                };
                return Err((
                    at.index(i),
                    format!("unknown caller {n:?} (known: {known})"),
                ));
            }
        }
        Ok(())
    };

    let listen = listen(raw.listen, &root.key("listen"), &resolve)?;
    if listen
        .tls
        .as_ref()
        .and_then(|t| t.client_ca.as_ref())
        .is_none()
    {
        for c in callers.iter().flatten() {
            if !c.cert_names.is_empty() {
                return Err((root.key("callers").key(&c.name).key("cert_names"),
                    "cert_names needs listen.client_ca (callers present certificates only over TLS)".into()));
            }
        }
    }

    let admin = match raw.admin {
        Some(a) => {
            let at = root.key("admin");
            Some(Admin {
                addr: socket_addr(&a.addr).map_err(|e| (at.key("addr"), e.to_string()))?,
                key: secret_pair(&at, "key", a.key_env, a.key_file, &resolve)?,
            })
        }
        None => None,
    };
    let audit = match raw.audit {
        Some(a) => Some(audit(a, &root.key("audit"), &resolve)?),
        None => None,
    };
    let store = store(raw.store, &root.key("store"), &resolve)?;
    let outbound = outbound(raw.outbound, &root.key("outbound"), &resolve)?;
    let runtime = Runtime {
        worker_threads: raw.runtime.and_then(|r| r.worker_threads),
    };
    if runtime.worker_threads == Some(0) {
        return Err((
            root.key("runtime").key("worker_threads"),
            "must be at least 1".into(),
        ));
    }

    let log = match raw.log {
        None => Log::default(),
        Some(l) => {
            let keep = l.keep.unwrap_or(DEFAULT_LOG_KEEP);
            if keep == 0 {
                return Err((root.key("log").key("keep"), "must be at least 1".into()));
            }
            let file = match l.file.as_deref() {
                None => None,
                Some(f) if f.is_empty() || f.ends_with(['/', '\\']) => {
                    return Err((
                        root.key("log").key("file"),
                        "must name a file (its folder holds the rotated files)".into(),
                    ))
                }
                Some(f) => Some(resolve(f)),
            };
            Log { file, keep }
        }
    };

    let mut providers = IndexMap::new();
    for (name, p) in raw.providers {
        let at = root.key("providers").key(&name);
        if let Some(expose) = &p.expose_to {
            check_callers(&at.key("expose_to"), expose)?;
        }
        let cfg = provider(&name, p, &at, &resolve)?;
        if cfg.authorize().is_some() && admin.is_none() {
            // The IdP sends the browser back to the admin listener.
            return Err((
                at.key("authorize_url"),
                "authorize_url needs [admin] (the authorization callback is served there)".into(),
            ));
        }
        providers.insert(name, cfg);
    }

    let mut routes = Vec::new();
    let mut seen = HashSet::new();
    let mut names = HashSet::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = root.key("routes").index(i);
        if let Some(p) = &r.provider {
            if !providers.contains_key(p) {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                let known = if known.is_empty() {
                    "none defined".to_owned()
                } else {
                    known.join(", ")
                };
                return Err((
                    at.key("provider"),
                    format!("unknown provider {p:?} (known: {known})"),
                ));
            }
        }
        if let Some(allow) = &r.allow {
            check_callers(&at.key("allow"), allow)?;
        }
        let route = route(r, &at, &resolve)?;
        if !seen.insert(route.prefix.clone()) {
            return Err((
                at.key("prefix"),
                format!("duplicate prefix {:?}", route.prefix),
            ));
        }
        if !names.insert(route.name.clone()) {
            return Err((
                at.key("name"),
                format!("duplicate route name {:?}", route.name),
            ));
        }
        routes.push(route);
    }

    Ok(Config {
        path: path.to_path_buf(),
        listen,
        admin,
        audit,
        store,
        outbound,
        runtime,
        log,
        providers,
        routes,
        callers,
    })
}

/// A listen address that is neither an IP address with a port nor a name that
/// resolves to one.
#[derive(Debug, thiserror::Error)]
#[error("invalid address {0:?}; use host:port, e.g. \"127.0.0.1:8080\"")]
struct BadAddress(String);

fn socket_addr(s: &str) -> Result<SocketAddr, BadAddress> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| BadAddress(s.to_owned()))
}

fn listen(l: RawListen, at: &KeyPath, resolve: &dyn Fn(&str) -> PathBuf) -> Check<Listen> {
    let addr = socket_addr(&l.addr).map_err(|e| (at.key("addr"), e.to_string()))?;
    let tls = match (l.tls_cert, l.tls_key) {
        (Some(c), Some(k)) => Some(ListenTls {
            cert: resolve(&c),
            key: resolve(&k),
            client_ca: l.client_ca.as_deref().map(resolve),
        }),
        (None, None) => {
            if l.client_ca.is_some() {
                return Err((
                    at.key("client_ca"),
                    "client_ca needs tls_cert and tls_key".into(),
                ));
            }
            None
        }
        (Some(_), None) => return Err((at.key("tls_cert"), "tls_cert needs tls_key".into())),
        (None, Some(_)) => return Err((at.key("tls_key"), "tls_key needs tls_cert".into())),
    };
    let max_headers = l.max_headers.unwrap_or(DEFAULT_MAX_HEADERS);
    if max_headers == 0 {
        return Err((at.key("max_headers"), "must be at least 1".into()));
    }
    Ok(Listen {
        addr,
        max_body: l.max_body.map(|s| s.0),
        max_replay_body: l.max_replay_body.map_or(DEFAULT_MAX_REPLAY_BODY, |s| s.0),
        header_timeout: l.header_timeout.map_or(DEFAULT_HEADER_TIMEOUT, |d| d.0),
        max_header_size: l
            .max_header_size
            .map_or(DEFAULT_MAX_HEADER_SIZE, |s| s.0)
            .max(1024),
        max_headers,
        idle_timeout: l.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
        max_connections: l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS).max(1),
        shutdown_grace: l.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
        tls,
    })
}

fn audit(a: RawAudit, at: &KeyPath, resolve: &dyn Fn(&str) -> PathBuf) -> Check<Audit> {
    let target = if a.file == "-" {
        AuditTarget::Stdout
    } else {
        AuditTarget::File(resolve(&a.file))
    };
    let rotate = match a.rotate.as_deref().map(str::trim) {
        None => Rotate::Never,
        Some("daily") => Rotate::Daily,
        Some("hourly") => Rotate::Hourly,
        Some(other) => match parse_size(other) {
            Some(n) if n > 0 => Rotate::Size(n),
            _ => {
                return Err((
                    at.key("rotate"),
                    format!(
                    "invalid rotate {other:?}; use \"daily\", \"hourly\" or a size like \"100MiB\""
                ),
                ))
            }
        },
    };
    if target == AuditTarget::Stdout {
        if rotate != Rotate::Never {
            return Err((
                at.key("rotate"),
                "file = \"-\" (stdout) cannot be rotated".into(),
            ));
        }
        if a.keep.is_some() {
            return Err((
                at.key("keep"),
                "file = \"-\" (stdout) has no rotated files".into(),
            ));
        }
    }
    let key = secret_pair(at, "key", a.key_env, a.key_file, resolve)?;
    Ok(Audit {
        target,
        buffer: a.buffer.unwrap_or(65_536).max(1),
        rotate,
        keep: a.keep,
        key,
    })
}

fn store(
    s: Option<RawStore>,
    at: &KeyPath,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Check<StoreConfig> {
    let Some(s) = s else {
        return Ok(StoreConfig {
            kind: StoreKind::File {
                path: resolve("state/tokens.json"),
            },
            key: None,
            protect: default_protect(true),
        });
    };
    let key = secret_pair(at, "key", s.key_env, s.key_file, resolve)?;
    let kind = match s.kind.as_deref().unwrap_or("file") {
        "file" => StoreKind::File {
            path: resolve(s.path.as_deref().unwrap_or("state/tokens.json")),
        },
        "memory" => StoreKind::Memory,
        "postgres" => {
            let url = secret_pair(at, "url", s.url_env, s.url_file, resolve)?.ok_or_else(|| {
                (
                    at.key("kind"),
                    "kind = \"postgres\" needs url_env or url_file".to_owned(),
                )
            })?;
            let table_prefix = s.table_prefix.unwrap_or_else(|| "authgate".into());
            if table_prefix.is_empty()
                || !table_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                || table_prefix.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err((
                    at.key("table_prefix"),
                    "must be letters, digits and '_' (an SQL identifier)".into(),
                ));
            }
            StoreKind::Postgres {
                url,
                table_prefix,
                poll_interval: s.poll_interval.map_or(Duration::from_secs(30), |d| d.0),
            }
        }
        other => {
            return Err((
                at.key("kind"),
                format!("unknown store kind {other:?} (known: file, memory, postgres)"),
            ))
        }
    };
    let file = matches!(kind, StoreKind::File { .. });
    let at_protect = || at.key("protect");
    let protect = match (s.protect.as_deref(), key.is_some()) {
        (None, true) | (Some("key"), true) => Protect::Key,
        (None, false) => default_protect(file),
        (Some("key"), false) => {
            return Err((
                at_protect(),
                "protect = \"key\" needs key_env or key_file".into(),
            ))
        }
        (Some("dpapi"), _) if !cfg!(windows) => {
            return Err((
                at_protect(),
                "\"dpapi\" is Windows only; here use protect = \"key\" with key_env or key_file"
                    .into(),
            ))
        }
        (Some("dpapi"), true) => {
            return Err((
                at_protect(),
                "\"dpapi\" takes no key: remove key_env/key_file, or use protect = \"key\"".into(),
            ))
        }
        (Some("dpapi"), false) if !file => {
            return Err((
                at_protect(),
                "\"dpapi\" protects the file store only (another machine cannot read it back)"
                    .into(),
            ))
        }
        (Some("dpapi"), false) => Protect::Dpapi,
        (Some("none"), true) => {
            return Err((
                at_protect(),
                "\"none\" with key_env/key_file set: remove the key, or use protect = \"key\""
                    .into(),
            ))
        }
        (Some("none"), false) => Protect::None,
        (Some(other), _) => {
            return Err((
                at_protect(),
                format!("unknown protection {other:?} (known: dpapi, key, none)"),
            ))
        }
    };
    Ok(StoreConfig { kind, key, protect })
}

/// Without a key: DPAPI for a file store on Windows, nothing elsewhere.
fn default_protect(file_store: bool) -> Protect {
    if cfg!(windows) && file_store {
        Protect::Dpapi
    } else {
        Protect::None
    }
}

fn outbound(
    o: Option<RawOutbound>,
    at: &KeyPath,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Check<Outbound> {
    let Some(o) = o else {
        return Ok(Outbound::default());
    };
    let proxy = match o.proxy {
        Some(p) => {
            let uri: Uri = p
                .parse()
                .map_err(|_| (at.key("proxy"), format!("invalid proxy URL {p:?}")))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err((
                    at.key("proxy"),
                    format!("proxy must be http://host:port, got {p:?}"),
                ));
            }
            Some(uri)
        }
        None => None,
    };
    let proxy_auth = match o.proxy_auth.as_deref() {
        None => ProxyAuthMode::Auto,
        Some(s) => ProxyAuthMode::parse(s).ok_or_else(|| {
            (
                at.key("proxy_auth"),
                format!("unknown proxy_auth {s:?} (known: {})", ProxyAuthMode::NAMES),
            )
        })?,
    };
    let proxy_password = secret_pair(
        at,
        "proxy_password",
        o.proxy_password_env,
        o.proxy_password_file,
        resolve,
    )?;
    match o.proxy_username.as_deref() {
        Some(u) if u.trim().is_empty() || u.contains(':') || u.chars().any(char::is_control) => {
            return Err((
                at.key("proxy_username"),
                "must be DOMAIN\\user, user@domain or user (no ':')".into(),
            ))
        }
        Some(u)
            if u.contains('\\')
                && u.split_once('\\')
                    .is_some_and(|(d, n)| d.is_empty() || n.is_empty()) =>
        {
            return Err((
                at.key("proxy_username"),
                format!("{u:?}: DOMAIN\\user needs both a domain and a user"),
            ))
        }
        Some(_) if proxy_password.is_none() => {
            return Err((
                at.key("proxy_username"),
                "needs proxy_password_env or proxy_password_file".into(),
            ))
        }
        None if proxy_password.is_some() => {
            return Err((
                at.key(if proxy_password_is_env(&proxy_password) {
                    "proxy_password_env"
                } else {
                    "proxy_password_file"
                }),
                "needs proxy_username".into(),
            ))
        }
        _ => {}
    }
    // Off Windows there is no logon to authenticate as: an explicit scheme
    // needs the account, or a proxy URL that carries one (Basic only).
    let url_has_user = proxy
        .as_ref()
        .and_then(Uri::authority)
        .is_some_and(|a| a.as_str().contains('@'));
    let needs_account = match proxy_auth {
        ProxyAuthMode::Negotiate | ProxyAuthMode::Ntlm => !cfg!(windows),
        ProxyAuthMode::Basic => !url_has_user,
        ProxyAuthMode::Auto | ProxyAuthMode::None => false,
    };
    if needs_account && o.proxy_username.is_none() {
        return Err((
            at.key("proxy_auth"),
            format!(
                "proxy_auth = {:?} needs proxy_username and proxy_password_env or proxy_password_file{}",
                proxy_auth.as_str(),
                if proxy_auth == ProxyAuthMode::Basic {
                    ""
                } else {
                    " (only on Windows does authgate authenticate as its own account)"
                }
            ),
        ));
    }
    Ok(Outbound {
        proxy,
        no_proxy: o.no_proxy.unwrap_or_default(),
        proxy_username: o.proxy_username,
        proxy_password,
        proxy_auth,
    })
}

fn proxy_password_is_env(p: &Option<SecretSource>) -> bool {
    matches!(p, Some(SecretSource::Env(_)))
}

/// `<name>_env` / `<name>_file`: at most one of them.
fn secret_pair(
    at: &KeyPath,
    name: &str,
    env: Option<String>,
    file: Option<String>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Check<Option<SecretSource>> {
    match (env, file) {
        (Some(_), Some(_)) => Err((
            at.key(&format!("{name}_file")),
            format!("set {name}_env or {name}_file, not both"),
        )),
        (Some(e), None) if e.is_empty() => {
            Err((at.key(&format!("{name}_env")), "empty variable name".into()))
        }
        (Some(e), None) => Ok(Some(SecretSource::Env(e))),
        (None, Some(f)) => Ok(Some(SecretSource::File(resolve(&f)))),
        (None, None) => Ok(None),
    }
}

/// A secret the grant cannot do without; the error points at `grant`.
fn required_secret(
    at: &KeyPath,
    name: &str,
    env: Option<String>,
    file: Option<String>,
    resolve: &dyn Fn(&str) -> PathBuf,
    grant: &str,
) -> Check<SecretSource> {
    secret_pair(at, name, env, file, resolve)?.ok_or_else(|| {
        (
            at.key("grant"),
            format!("grant = {grant:?} needs {name}_env or {name}_file"),
        )
    })
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") || h.ends_with(".localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// An absolute http(s) URL; plain http only for loopback hosts or with `allow_http`.
fn endpoint(at: &KeyPath, s: &str, allow_http: bool, what: &str) -> Check<Uri> {
    let uri: Uri = s
        .parse()
        .map_err(|_| (at.clone(), format!("invalid URL {s:?}")))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_http || is_loopback_host(host) => {}
        Some("http") => {
            return Err((at.clone(), format!(
                "{what} {s:?} is plain http to a non-loopback host; use https:// or set allow_http = true"
            )))
        }
        _ => return Err((at.clone(), format!("{what} must be an absolute http:// or https:// URL, got {s:?}"))),
    }
    if host.is_empty() {
        return Err((at.clone(), format!("{what} {s:?} has no host")));
    }
    Ok(uri)
}

fn provider(
    name: &str,
    p: RawProvider,
    at: &KeyPath,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Check<ProviderConfig> {
    let allow_http = p.allow_http.unwrap_or(false);
    let oauth = |p: &RawProvider| -> Check<OAuthClient> {
        let url = p.token_url.as_deref().ok_or_else(|| {
            (
                at.key("grant"),
                format!("grant = {:?} needs token_url", p.grant),
            )
        })?;
        let token_url = endpoint(&at.key("token_url"), url, allow_http, "token_url")?;
        let client_id = p.client_id.clone().ok_or_else(|| {
            (
                at.key("grant"),
                format!("grant = {:?} needs client_id", p.grant),
            )
        })?;
        let secret = secret_pair(
            at,
            "client_secret",
            p.client_secret_env.clone(),
            p.client_secret_file.clone(),
            resolve,
        )?;
        let default_auth = if secret.is_some() || p.grant != "refresh_token" {
            "client_secret_basic"
        } else {
            "none"
        };
        let auth = match p.client_auth.as_deref().unwrap_or(default_auth) {
            m @ ("client_secret_basic" | "client_secret_post") => {
                let s = secret.ok_or_else(|| (at.key("client_auth"), format!("client_auth = {m:?} needs client_secret_env or client_secret_file")))?;
                if m == "client_secret_basic" { ClientAuth::SecretBasic(s) } else { ClientAuth::SecretPost(s) }
            }
            "private_key_jwt" => {
                let key = p.client_key.as_deref().ok_or_else(|| (at.key("client_auth"), "private_key_jwt needs client_key".to_owned()))?;
                let alg = match p.client_key_alg.as_deref().unwrap_or("RS256") {
                    "RS256" => JwtAlg::RS256,
                    "ES256" => JwtAlg::ES256,
                    "PS256" => JwtAlg::PS256,
                    other => return Err((at.key("client_key_alg"), format!("unsupported algorithm {other:?} (known: RS256, ES256, PS256)"))),
                };
                ClientAuth::PrivateKeyJwt { key: resolve(key), key_id: p.client_key_id.clone(), alg }
            }
            "tls_client_auth" => match (&p.client_cert, &p.client_key) {
                (Some(c), Some(k)) => ClientAuth::TlsClientAuth { cert: resolve(c), key: resolve(k) },
                _ => return Err((at.key("client_auth"), "tls_client_auth needs client_cert and client_key".into())),
            },
            "none" => ClientAuth::None,
            other => return Err((at.key("client_auth"), format!(
                "unknown client_auth {other:?} (known: client_secret_basic, client_secret_post, private_key_jwt, tls_client_auth, none)"
            ))),
        };
        if !matches!(auth, ClientAuth::SecretBasic(_) | ClientAuth::SecretPost(_))
            && (p.client_secret_env.is_some() || p.client_secret_file.is_some())
        {
            // Never send the secret by two methods, nor keep one that is not used.
            return Err((
                at.key("client_auth"),
                "a client secret is set but client_auth does not use it".into(),
            ));
        }
        Ok(OAuthClient {
            token_url,
            client_id,
            auth,
            scope: p.scope.clone(),
            audience: p.audience.clone(),
            resource: p.resource.clone(),
            ca: p.ca.as_deref().map(resolve),
            timeout: p.timeout.map_or(DEFAULT_TOKEN_TIMEOUT, |d| d.0),
        })
    };
    if p.grant != "refresh_token" {
        for (key, set) in [
            ("authorize_url", p.authorize_url.is_some()),
            ("redirect_uri", p.redirect_uri.is_some()),
        ] {
            if set {
                return Err((
                    at.key(key),
                    format!("{key} is for grant = \"refresh_token\" only"),
                ));
            }
        }
    }
    let grant = match p.grant.as_str() {
        "static" => {
            let token = required_secret(
                at,
                "token",
                p.token_env.clone(),
                p.token_file.clone(),
                resolve,
                "static",
            )?;
            Grant::Static { token }
        }
        "client_credentials" => Grant::ClientCredentials(oauth(&p)?),
        "refresh_token" => {
            let authorize = authorize(&p, at, allow_http)?;
            let initial = if authorize.is_some() {
                secret_pair(
                    at,
                    "refresh_token",
                    p.refresh_token_env.clone(),
                    p.refresh_token_file.clone(),
                    resolve,
                )?
            } else {
                Some(required_secret(
                    at,
                    "refresh_token",
                    p.refresh_token_env.clone(),
                    p.refresh_token_file.clone(),
                    resolve,
                    "refresh_token",
                )?)
            };
            Grant::RefreshToken {
                client: oauth(&p)?,
                initial_refresh_token: initial,
                authorize,
            }
        }
        other => {
            return Err((
                at.key("grant"),
                format!(
                    "unknown grant {other:?} (known: client_credentials, refresh_token, static)"
                ),
            ))
        }
    };
    let header_name = p.header.as_deref().unwrap_or("authorization");
    let header = HeaderName::from_bytes(header_name.as_bytes()).map_err(|_| {
        (
            at.key("header"),
            format!("invalid header name {header_name:?}"),
        )
    })?;
    let scheme = p.scheme.unwrap_or_else(|| "Bearer".into());
    if scheme.chars().any(|c| c.is_control() || c == ' ') {
        return Err((at.key("scheme"), format!("invalid scheme {scheme:?}")));
    }
    Ok(ProviderConfig {
        name: name.to_owned(),
        grant,
        refresh_before: p.refresh_before.map(|d| d.0),
        min_refresh_interval: p
            .min_refresh_interval
            .map_or(DEFAULT_MIN_REFRESH_INTERVAL, |d| d.0),
        header,
        scheme,
        expose_to: p.expose_to.unwrap_or_default(),
    })
}

/// `authorize_url` and `redirect_uri` of a `refresh_token` provider.
fn authorize(p: &RawProvider, at: &KeyPath, allow_http: bool) -> Check<Option<Box<Authorize>>> {
    let Some(url) = p.authorize_url.as_deref() else {
        if p.redirect_uri.is_some() {
            return Err((
                at.key("redirect_uri"),
                "redirect_uri needs authorize_url".into(),
            ));
        }
        return Ok(None);
    };
    let url = endpoint(&at.key("authorize_url"), url, allow_http, "authorize_url")?;
    let redirect_uri = match p.redirect_uri.as_deref() {
        // Where the browser is sent back to: the admin listener, often on loopback,
        // so plain http is accepted here whatever the host.
        Some(r) => {
            let at = at.key("redirect_uri");
            let uri: Uri = r
                .parse()
                .map_err(|_| (at.clone(), format!("invalid URL {r:?}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https"))
                || uri.host().unwrap_or_default().is_empty()
            {
                return Err((
                    at,
                    format!("redirect_uri must be an absolute http:// or https:// URL, got {r:?}"),
                ));
            }
            Some(uri)
        }
        None => None,
    };
    Ok(Some(Box::new(Authorize { url, redirect_uri })))
}

fn route(r: RawRoute, at: &KeyPath, resolve: &dyn Fn(&str) -> PathBuf) -> Check<RouteConfig> {
    let prefix =
        crate::route::normalize_prefix(&r.prefix).map_err(|e| (at.key("prefix"), e.to_string()))?;
    let upstream = endpoint(
        &at.key("upstream"),
        &r.upstream,
        r.allow_http.unwrap_or(false),
        "upstream",
    )?;
    if upstream.query().is_some() {
        return Err((
            at.key("upstream"),
            "upstream must not have a query string".into(),
        ));
    }
    if r.client_cert.is_some() != r.client_key.is_some() {
        return Err((
            at.key("client_cert"),
            "client_cert and client_key go together".into(),
        ));
    }
    Ok(RouteConfig {
        name: r.name.unwrap_or_else(|| prefix.clone()),
        prefix,
        upstream,
        provider: r.provider,
        allow: r.allow,
        timeout: r.timeout.map_or(DEFAULT_ROUTE_TIMEOUT, |d| d.0),
        replay: r.replay.unwrap_or(true),
        tls: UpstreamTls {
            ca: r.ca.as_deref().map(resolve),
            client_cert: r.client_cert.as_deref().map(resolve),
            client_key: r.client_key.as_deref().map(resolve),
        },
    })
}
