//! Listeners: accept, (optionally) TLS, HTTP/1.1 + HTTP/2 (h2c prior knowledge or
//! ALPN), connection limits, graceful drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod conn;
pub mod deadline;
mod guard;

use crate::body::GatewayBody;
use crate::config::Listen;
use crate::tls::TlsError;
pub use conn::ConnInfo;
use conn::{Conn, Drain, HeadLimits, Protocols};

/// Connection-level limits of one listener.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    pub header_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// TLS for callers (`listen.tls_cert`); plaintext when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServerOpts {
    /// Reads the listener's certificates, so a broken one stops the start-up.
    pub fn from_listen(l: &Listen) -> Result<Self, TlsError> {
        let tls = match &l.tls {
            Some(t) => Some(Arc::new(crate::tls::server_config(
                &t.cert,
                &t.key,
                t.client_ca.as_deref(),
            )?)),
            None => None,
        };
        Ok(Self {
            header_timeout: l.header_timeout,
            max_header_size: l.max_header_size as usize,
            max_headers: l.max_headers,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            shutdown_grace: l.shutdown_grace,
            tls,
        })
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
            tls: None,
        }
    }
}

fn protocols(opts: &ServerOpts) -> Protocols {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        // `Guarded` enforces the header timeout itself, answering 408 where hyper
        // would only close the connection.
        .header_read_timeout(None)
        // hyper answers a bare 431 (no body) past these, which `Guarded` turns
        // into the contract's JSON answer. The service checks the configured size
        // itself, for heads between it and this buffer. The count is hyper's
        // exactly: up to 100 it keeps a parse's header slots on the stack, and
        // past that allocates two arrays of about 6 KiB per request.
        .max_buf_size(opts.max_header_size.saturating_mul(2).max(8192))
        .max_headers(opts.max_headers)
        .keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_size as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(opts.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    Protocols {
        http1: h1,
        http2: h2,
    }
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
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let protocols = Arc::new(protocols(&opts));
    let tls = opts.tls.clone().map(TlsAcceptor::from);
    let connections = TaskTracker::new();
    let drain = Drain::default();
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
        let conn = Conn {
            info: ConnInfo {
                remote,
                local,
                cert_names: Arc::from(Vec::new()),
                deadline: None,
            },
            head: HeadLimits {
                max_headers: opts.max_headers,
                max_size: opts.max_header_size,
            },
            header_timeout: opts.header_timeout,
            idle_timeout: opts.idle_timeout,
            protocols: protocols.clone(),
            drain: drain.clone(),
        };
        let handler = handler.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let Some(h2) = sniff_h2c(&stream, conn.header_timeout, &conn.drain).await
                    else {
                        return;
                    };
                    conn.run(stream, h2, handler).await
                }
                Some(acceptor) => {
                    // Boxed: the TLS state would otherwise size every connection's task,
                    // plaintext ones included.
                    Box::pin(async move {
                        // A caller that stalls the handshake is cut like one that
                        // stalls its headers.
                        let accept =
                            tokio::time::timeout(conn.header_timeout, acceptor.accept(stream));
                        let stream = match accept.await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        };
                        let mut conn = conn;
                        conn.info.cert_names = Arc::from(crate::tls::peer_names(
                            stream.get_ref().1.peer_certificates(),
                        ));
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        conn.run(stream, h2, handler).await
                    })
                    .await
                }
            }
        });
    }
    drop(listener);
    connections.close();
    drain.fire();
    tokio::select! {
        _ = connections.wait() => {}
        _ = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

/// HTTP/2 with prior knowledge starts with this preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plaintext caller speaks h2c (prior knowledge), judged from the first
/// bytes without consuming them. `None`: the caller left, or sent nothing in time.
async fn sniff_h2c(stream: &TcpStream, within: Duration, drain: &Drain) -> Option<bool> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4];
    loop {
        let n = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.peek(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                _ => return None,
            },
            _ = drain.wait() => return None,
        };
        if n == 0 {
            return None;
        }
        // "PRI " is no method an HTTP/1 caller may use (RFC 9113 §3.4), and four
        // bytes tell it from POST, PUT and PATCH.
        if buf[..n] != H2_PREFACE[..n] || n == buf.len() {
            return Some(buf[..n] == H2_PREFACE[..buf.len()]);
        }
        // A preface split across packets: peeking again at once would spin on the
        // same bytes. Rare enough that a short pause is the simple answer.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
