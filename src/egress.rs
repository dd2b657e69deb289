//! The corporate egress proxy (DESIGN.md, `[outbound]`): every outbound connection,
//! to upstreams and token endpoints alike, goes through the proxy unless the
//! destination is in `no_proxy`. https destinations get an HTTP CONNECT tunnel
//! (TLS runs end to end through it); plain-http ones are sent in absolute form to
//! the proxy, except with proxy credentials, where they are tunnelled too: the
//! credentials then belong to the connection (one `Proxy-Authorization` on the
//! CONNECT) rather than to every request, which the shared client cannot add.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::Outbound;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Resolved `[outbound]` settings: which destinations use which proxy, and the
/// proxy credentials. Cheap to clone.
#[derive(Clone, Default)]
pub struct EgressProxy {
    matcher: Option<Arc<Matcher>>,
    /// `Basic …` from `proxy_username` + `proxy_password`, marked sensitive.
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("matcher", &self.matcher)
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .finish()
    }
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
        let auth = match &o.proxy_username {
            Some(user) => {
                let password = match &o.proxy_password {
                    Some(src) => Some(
                        src.load()
                            .map_err(|e| format!("outbound.proxy_password: {e}"))?,
                    ),
                    None => None,
                };
                let raw = format!(
                    "{user}:{}",
                    password.as_ref().map(|p| p.expose()).unwrap_or_default()
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| "outbound.proxy_username: not a valid header value".to_owned())?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            matcher: Some(Arc::new(matcher)),
            auth,
        })
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
            let auth = auth.or_else(|| intercept.basic_auth().cloned());
            let https = dst.scheme() == Some(&http::uri::Scheme::HTTPS);
            if https || auth.is_some() {
                let target = with_explicit_port(&dst, https)?;
                let mut tunnel = Tunnel::new(proxy_uri, http);
                if let Some(a) = auth {
                    tunnel = tunnel.with_auth(a);
                }
                futures_util::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                let inner = tunnel.call(target).await?;
                Ok(ProxyStream {
                    inner,
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

/// The tunnel assumes 443 when the URI has no port; plain http needs 80.
fn with_explicit_port(dst: &Uri, https: bool) -> Result<Uri, BoxError> {
    let host = dst.host().ok_or("destination without host")?;
    let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(Uri::builder()
        .scheme(dst.scheme_str().unwrap_or("https"))
        .authority(format!("{host}:{port}"))
        .path_and_query("/")
        .build()?)
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
