//! Outbound connections: HTTP/1.1 and HTTP/2 (by ALPN) over rustls, through the
//! egress proxy where it applies. The token endpoints use hyper-util's pooled
//! client built here; the data path pools its own connections (`outbound::pool`).

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::outbound::egress::{EgressProxy, ProxyConnector};
use crate::tls::{client_config, TlsError};

pub type Connector = HttpsConnector<ProxyConnector>;
pub type HttpClient<B> = Client<Connector, B>;

/// Builds a client trusting the OS roots plus `ca`, presenting `client_cert` when
/// set, connecting through `proxy` (the egress proxy) where it applies. The data
/// path uses [`connector`] with its own pool (`outbound::pool`) instead.
pub fn build<B>(
    ca: Option<&std::path::Path>,
    client_cert: Option<(&std::path::Path, &std::path::Path)>,
    h2: bool,
    proxy: &EgressProxy,
) -> Result<HttpClient<B>, TlsError>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector(ca, client_cert, h2, proxy)?))
}

/// TCP (direct or through the egress proxy), then TLS for https destinations;
/// offers h2 by ALPN when `h2`.
pub fn connector(
    ca: Option<&std::path::Path>,
    client_cert: Option<(&std::path::Path, &std::path::Path)>,
    h2: bool,
    proxy: &EgressProxy,
) -> Result<Connector, TlsError> {
    let tls = client_config(ca, client_cert, h2)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let http = ProxyConnector::new(http, proxy.clone());
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(if h2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    })
}
