//! The corporate egress proxy (DESIGN.md, `[outbound]`): every outbound connection,
//! to upstreams and token endpoints alike, goes through the proxy unless the
//! destination is in `no_proxy`. https destinations get an HTTP CONNECT tunnel
//! (TLS runs end to end through it); plain-http ones are sent in absolute form to
//! the proxy, except when authgate can authenticate to it, where they are
//! tunnelled too: authentication then belongs to the connection (the CONNECT
//! handshake, `tunnel`) rather than to every request, and the request path never
//! sees a `407`.

mod auth;
mod ntlm;
mod scheme;
mod spnego;
#[cfg(windows)]
mod sspi;
mod tunnel;

pub use auth::{unanswered, EgressConfigError};
pub use scheme::{ProxyAuthError, Scheme};
pub use tunnel::TunnelError;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tower_service::Service;

use super::body::BoxError;
use crate::config::Outbound;

/// Resolved `[outbound]` settings: which destinations use which proxy, and how
/// to authenticate to it. Cheap to clone.
#[derive(Clone, Default, Debug)]
pub struct EgressProxy {
    matcher: Option<Arc<Matcher>>,
    /// `proxy_auth` and the account (its `Debug` shows no secret).
    auth: Arc<auth::ProxyAuth>,
    /// Tunnels refused for want of authentication (`/metrics`, `/status`).
    failures: Counter,
}

impl EgressProxy {
    /// No proxy at all (tests, and the fallback when nothing is configured).
    pub fn direct() -> Self {
        Self::default()
    }

    /// `[outbound] proxy` when set, else `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` /
    /// `NO_PROXY` (curl's rules), else on Windows the machine's WinHTTP proxy with
    /// its bypass list. Loads the password secret now.
    pub fn from_config(o: &Outbound) -> Result<Self, EgressConfigError> {
        let matcher = match (&o.proxy, env_proxy(), winhttp_proxy()) {
            (Some(uri), _, _) => Matcher::builder()
                .all(uri.to_string())
                .no(o.no_proxy.join(","))
                .build(),
            (None, None, Some(w)) => {
                let mut b = Matcher::builder().no(w.no_proxy.clone());
                if let Some(p) = &w.http {
                    b = b.http(p.clone());
                }
                if let Some(p) = &w.https {
                    b = b.https(p.clone());
                }
                b.build()
            }
            (None, _, _) => Matcher::from_env(),
        };
        let password = match &o.proxy_password {
            Some(src) => Some(src.load().map_err(EgressConfigError::Password)?),
            None => None,
        };
        let auth = auth::ProxyAuth::new(o.proxy_auth, o.proxy_username.as_deref(), password)?;
        Ok(Self {
            matcher: Some(Arc::new(matcher)),
            auth: Arc::new(auth),
            failures: Counter::default(),
        })
    }

    /// Counts failed proxy authentications into `failures` (the gateway's
    /// metric, which outlives a config reload).
    pub fn counting_failures(mut self, failures: Counter) -> Self {
        self.failures = failures;
        self
    }
}

/// The proxy environment variables, in curl's order of precedence, that are set:
/// `(variable, value)` of the first.
fn env_proxy() -> Option<(&'static str, String)> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .find_map(|var| {
        let v = std::env::var(var).ok()?;
        let v = v.trim();
        (!v.is_empty()).then(|| (var, v.to_owned()))
    })
}

/// The machine's WinHTTP proxy (`netsh winhttp set proxy`), in the matcher's
/// terms.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WinHttpProxy {
    http: Option<String>,
    https: Option<String>,
    /// NO_PROXY syntax.
    no_proxy: String,
}

/// Read once: the machine setting changes rarely and is read again at restart.
#[cfg(windows)]
fn winhttp_proxy() -> Option<WinHttpProxy> {
    static WINHTTP: std::sync::OnceLock<Option<WinHttpProxy>> = std::sync::OnceLock::new();
    WINHTTP
        .get_or_init(|| {
            let (list, bypass) = crate::win32::winhttp_default_proxy()?;
            parse_winhttp(&list, &bypass)
        })
        .clone()
}

#[cfg(not(windows))]
fn winhttp_proxy() -> Option<WinHttpProxy> {
    None
}

/// WinHTTP's lists as `netsh winhttp set proxy` stores them: the proxy is
/// `host:port` for every scheme or `http=host:port;https=host:port`; the bypass
/// list is `;`-separated host names, `*.` wildcards, `10.*`-style address
/// wildcards and `<local>` (names without a dot).
#[cfg_attr(
    not(any(windows, test)),
    expect(dead_code, reason = "WinHTTP exists on Windows only")
)]
fn parse_winhttp(list: &str, bypass: &str) -> Option<WinHttpProxy> {
    let url = |p: &str| {
        let p = p.trim();
        if p.contains("://") {
            p.to_owned()
        } else {
            format!("http://{p}")
        }
    };
    let entries: Vec<&str> = list
        .split([';', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let (mut http, mut https) = (None, None);
    for e in &entries {
        match e.split_once('=') {
            Some((scheme, p)) if scheme.eq_ignore_ascii_case("http") => http = Some(url(p)),
            Some((scheme, p)) if scheme.eq_ignore_ascii_case("https") => https = Some(url(p)),
            Some(_) => {}
            None => {
                http.get_or_insert_with(|| url(e));
                https.get_or_insert_with(|| url(e));
            }
        }
    }
    if http.is_none() && https.is_none() {
        return None;
    }
    let mut no = Vec::new();
    for e in bypass
        .split([';', ' ', ','])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        if e.eq_ignore_ascii_case("<local>") {
            // Names without a dot have no NO_PROXY form; loopback is what they
            // usually mean for a gateway.
            no.extend([
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ]);
        } else if let Some(net) = address_wildcard(e) {
            no.push(net);
        } else if let Some(domain) = e.strip_prefix("*.") {
            no.push(format!(".{domain}"));
        } else if !e.contains('*') {
            no.push(e.to_owned());
        } else {
            tracing::warn!(
                entry = e,
                "WinHTTP bypass entry with a wildcard authgate cannot apply; ignored"
            );
        }
    }
    Some(WinHttpProxy {
        http,
        https,
        no_proxy: no.join(","),
    })
}

/// `10.*` / `192.168.*` / `10.1.2.*` as a network (`10.0.0.0/8`).
fn address_wildcard(e: &str) -> Option<String> {
    let parts: Vec<&str> = e.split('.').collect();
    let fixed = parts.iter().take_while(|p| **p != "*").count();
    if fixed == 0 || fixed > 3 || parts.len() > 4 || parts[fixed..].iter().any(|p| *p != "*") {
        return None;
    }
    let mut octets = [0u8; 4];
    for (i, p) in parts[..fixed].iter().enumerate() {
        octets[i] = p.parse().ok()?;
    }
    let [a, b, c, d] = octets;
    Some(format!("{a}.{b}.{c}.{d}/{}", fixed * 8))
}

/// The egress proxy in use and where it came from, in DESIGN's order: `[outbound]
/// proxy`, the proxy environment variables, the machine's WinHTTP proxy
/// (Windows), direct. No credentials are shown.
pub fn describe(o: &Outbound) -> (String, String) {
    if let Some(p) = &o.proxy {
        return (display_url(&p.to_string()), "[outbound] proxy".into());
    }
    if let Some((var, v)) = env_proxy() {
        return (display_url(&v), format!("${var}"));
    }
    if let Some(w) = winhttp_proxy() {
        let shown = w.https.as_deref().or(w.http.as_deref()).unwrap_or_default();
        return (display_url(shown), "WinHTTP (netsh winhttp)".into());
    }
    ("direct".into(), "no proxy configured".into())
}

/// A proxy URL without user information, query or fragment.
pub fn display_url(s: &str) -> String {
    let (scheme, rest) = s.split_once("://").unwrap_or(("", s));
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path = path.split(['?', '#']).next().unwrap_or("");
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// The TCP connector under the TLS layer: direct, tunnelled, or to the proxy.
#[derive(Clone, Debug)]
pub struct ProxyConnector {
    http: HttpConnector,
    proxy: EgressProxy,
}

impl ProxyConnector {
    pub fn new(http: HttpConnector, proxy: EgressProxy) -> Self {
        Self { http, proxy }
    }
}

/// A TCP stream that tells the client whether it leads to a forward proxy (then
/// requests go in absolute form).
#[derive(Debug)]
pub struct ProxyStream {
    inner: TokioIo<TcpStream>,
    proxied: bool,
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // HttpConnector is always ready; readiness of clones is checked per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let intercept = self.proxy.matcher.as_ref().and_then(|m| m.intercept(&dst));
        let auth = self.proxy.auth.clone();
        let failures = self.proxy.failures.clone();
        Box::pin(async move {
            let Some(intercept) = intercept else {
                let inner = http.call(dst).await.map_err(BoxError::from)?;
                return Ok(ProxyStream {
                    inner,
                    proxied: false,
                });
            };
            let proxy_uri = intercept.uri().clone();
            // Credentials in the proxy URL (`http://user:pass@proxy`) count too.
            let url_basic = intercept.basic_auth();
            let https = dst.scheme() == Some(&http::uri::Scheme::HTTPS);
            if https || url_basic.is_some() || auth.can_authenticate() {
                let target = with_explicit_port(&dst, https)?;
                let opened = tunnel::open(&mut http, &proxy_uri, &target, &auth, url_basic).await;
                let stream = opened.inspect_err(|e| {
                    if crate::cause::find_in_chain::<ProxyAuthError>(e.as_ref()).is_some() {
                        failures.inc();
                    }
                })?;
                Ok(ProxyStream {
                    inner: TokioIo::new(stream),
                    proxied: false,
                })
            } else {
                let inner = http.call(proxy_uri).await.map_err(BoxError::from)?;
                Ok(ProxyStream {
                    inner,
                    proxied: true,
                })
            }
        })
    }
}

/// The CONNECT target, `host:port`, with the scheme's default port spelt out.
fn with_explicit_port(dst: &Uri, https: bool) -> Result<String, BoxError> {
    let host = dst.host().ok_or("destination without host")?;
    let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.inner.connected().proxy(self.proxied)
    }
}

impl Read for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl Write for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod winhttp_tests {
    use super::*;

    #[test]
    fn a_winhttp_proxy_for_every_scheme_and_its_bypass_list() {
        let w = parse_winhttp(
            "proxy.corp:8080",
            "<local>;*.corp.example;10.*;192.168.1.*;api.partner.example",
        )
        .unwrap();
        assert_eq!(w.http.as_deref(), Some("http://proxy.corp:8080"));
        assert_eq!(w.https.as_deref(), Some("http://proxy.corp:8080"));
        assert_eq!(
            w.no_proxy,
            "localhost,127.0.0.1,::1,.corp.example,10.0.0.0/8,192.168.1.0/24,api.partner.example"
        );
    }

    #[test]
    fn a_winhttp_proxy_per_scheme() {
        let w = parse_winhttp("http=web.corp:80;https=secure.corp:8443", "").unwrap();
        assert_eq!(w.http.as_deref(), Some("http://web.corp:80"));
        assert_eq!(w.https.as_deref(), Some("http://secure.corp:8443"));
        assert_eq!(w.no_proxy, "");
        assert_eq!(parse_winhttp("", "<local>"), None);
        assert_eq!(parse_winhttp("ftp=x:21", ""), None);
    }

    #[test]
    fn the_source_is_named_and_credentials_are_not_shown() {
        let o = Outbound {
            proxy: Some("http://u:p@proxy.corp:3128".parse().unwrap()),
            ..Outbound::default()
        };
        assert_eq!(
            describe(&o),
            ("http://proxy.corp:3128/".into(), "[outbound] proxy".into())
        );
    }
}
