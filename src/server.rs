//! Listeners: accept, (optionally) TLS, HTTP/1.1 + HTTP/2 (h2c prior knowledge or
//! ALPN), connection limits, graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Listen;
use crate::forward::body::GatewayBody;
use crate::forward::ConnInfo;

/// Connection-level limits of one listener.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    pub header_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl ServerOpts {
    pub fn from_listen(l: &Listen) -> Self {
        Self {
            header_timeout: l.header_timeout,
            max_header_size: l.max_header_size as usize,
            max_headers: l.max_headers,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            shutdown_grace: l.shutdown_grace,
        }
    }

    /// The admin listener: small, loopback, no caller limits beyond the basics.
    pub fn admin() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_size: 64 << 10,
            max_headers: 100,
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

fn builder(opts: &ServerOpts) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .max_buf_size(opts.max_header_size.max(8192))
        .max_headers(opts.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_size as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(opts.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts connections until `shutdown`, then stops accepting (the socket is
/// closed, so new connections are refused) and drains in-flight requests for up to
/// `shutdown_grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    opts: ServerOpts,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let builder = Arc::new(builder(&opts));
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    loop {
        // Backpressure: at the connection limit we stop accepting until one closes.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo {
            remote,
            local,
            cert_names: Arc::from(Vec::new()),
        });
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            serve_conn(stream, info, builder, watcher, handler).await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

async fn serve_conn<H, F>(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let fut = handler(req, info.clone());
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
