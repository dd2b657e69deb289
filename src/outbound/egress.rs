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

pub use auth::unanswered;
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

use crate::config::Outbound;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    /// `NO_PROXY` (curl's rules). Loads the password secret now.
    pub fn from_config(o: &Outbound) -> Result<Self, String> {
        let matcher = match &o.proxy {
            Some(uri) => Matcher::builder()
                .all(uri.to_string())
                .no(o.no_proxy.join(","))
                .build(),
            None => Matcher::from_env(),
        };
        let password = match &o.proxy_password {
            Some(src) => Some(
                src.load()
                    .map_err(|e| format!("outbound.proxy_password: {e}"))?,
            ),
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
