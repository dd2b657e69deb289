//! Listeners: accept, (optionally) TLS, HTTP/1.1 + HTTP/2 (h2c prior knowledge or
//! ALPN), connection limits, graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Listen;
use crate::forward::body::GatewayBody;
use crate::forward::ConnInfo;
use crate::tls::TlsError;

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

fn builder(opts: &ServerOpts) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // `Guarded` enforces the header timeout itself, answering 408 where hyper
        // would only close the connection.
        .header_read_timeout(None)
        // hyper answers a bare 431 (no body) past these; the service answers the
        // contract's JSON 431 for heads between the configured limit and this
        // slack, which covers the usual overshoot.
        .max_buf_size(opts.max_header_size.saturating_mul(2).max(8192))
        .max_headers(
            opts.max_headers
                .saturating_mul(2)
                .max(opts.max_headers + 32),
        )
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
    let tls = opts.tls.clone().map(TlsAcceptor::from);
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
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let limits = (opts.header_timeout, opts.idle_timeout);
        let head = HeadLimits {
            max_headers: opts.max_headers,
            max_size: opts.max_header_size,
        };
        tokio::spawn(async move {
            let _permit = permit;
            let mut info = ConnInfo {
                remote,
                local,
                cert_names: Arc::from(Vec::new()),
            };
            match tls {
                None => {
                    let io = Guarded::new(stream, limits.0, limits.1);
                    serve_conn(io, Arc::new(info), head, builder, watcher, handler).await
                }
                Some(acceptor) => {
                    // A caller that stalls the handshake is cut like one that
                    // stalls its headers.
                    let stream = match tokio::time::timeout(limits.0, acceptor.accept(stream)).await
                    {
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
                    info.cert_names = Arc::from(crate::tls::peer_names(
                        stream.get_ref().1.peer_certificates(),
                    ));
                    let io = Guarded::new(stream, limits.0, limits.1);
                    serve_conn(io, Arc::new(info), head, builder, watcher, handler).await
                }
            }
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

/// The configured head limits, checked on every request (HTTP/1 and HTTP/2).
#[derive(Debug, Clone, Copy)]
struct HeadLimits {
    max_headers: usize,
    max_size: usize,
}

impl HeadLimits {
    fn exceeded(&self, req: &Request<Incoming>) -> bool {
        let h = req.headers();
        if h.len() > self.max_headers {
            return true;
        }
        // Roughly the bytes on the wire: "name: value\r\n" per field, plus the
        // request line.
        let fields: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
        // The URI's length without formatting it (no allocation per request).
        let uri = req.uri();
        let uri_len = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(1, |p| p.as_str().len());
        let line = req.method().as_str().len() + uri_len + 11;
        fields + line > self.max_size
    }
}

async fn serve_conn<S, H, F>(
    io: Guarded<S>,
    info: Arc<ConnInfo>,
    head: HeadLimits,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    handler: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    let state = io.state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        state.started.fetch_add(1, Ordering::SeqCst);
        let fut = if head.exceeded(&req) {
            let id = crate::forward::headers::new_request_id();
            let mut resp = crate::error::ProxyError::HeadersTooLarge.to_response(
                id.to_str().unwrap_or_default(),
                None,
                None,
            );
            resp.headers_mut()
                .insert(crate::forward::headers::X_REQUEST_ID.clone(), id);
            futures_util::future::Either::Left(std::future::ready(resp))
        } else {
            futures_util::future::Either::Right(handler(req, info.clone()))
        };
        async move {
            // The request counts as finished when its response body is done (or
            // dropped), so a long-streaming response is never taken for idleness.
            let resp = fut.await.map(|inner| CountedBody { inner, state });
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks its request finished when dropped.
    struct CountedBody {
        #[pin]
        inner: GatewayBody,
        state: Arc<ConnState>,
    }

    impl PinnedDrop for CountedBody {
        fn drop(this: Pin<&mut Self>) {
            this.state.finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Request counts of one connection, shared between the IO wrapper and the service:
/// a head is complete when hyper calls the service.
#[derive(Debug, Default)]
struct ConnState {
    started: AtomicU64,
    finished: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unknown,
    Http1,
    /// HTTP/2 has its own framing and keep-alive; the wrapper stays out of it.
    Http2,
}

pin_project_lite::pin_project! {
    /// The connection's IO, watching HTTP/1 heads: once the first byte of a request
    /// head arrives, the head must be complete (hyper calls the service) within
    /// `header_timeout`, else a 408 with the contract's JSON body is written and the
    /// connection closed (hyper's own header timeout only closes, and would let a
    /// slowloris caller see no reason). Between requests, a connection with no
    /// traffic for `idle_timeout` is closed.
    struct Guarded<S> {
        #[pin]
        inner: S,
        state: Arc<ConnState>,
        mode: Mode,
        header_timeout: Duration,
        idle_timeout: Duration,
        seen_started: u64,
        head_deadline: Option<Instant>,
        last_activity: Instant,
        timer: Pin<Box<Sleep>>,
        timer_at: Instant,
        // The 408 being written, and how much of it went out.
        closing: Option<(Vec<u8>, usize)>,
        parked_busy: bool,
    }
}

impl<S> Guarded<S> {
    fn new(inner: S, header_timeout: Duration, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        let first = now + idle_timeout;
        Self {
            inner,
            state: Arc::new(ConnState::default()),
            mode: Mode::Unknown,
            header_timeout,
            idle_timeout,
            seen_started: 0,
            head_deadline: None,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(first)),
            timer_at: first,
            closing: None,
            parked_busy: false,
        }
    }
}

fn timeout_response() -> Vec<u8> {
    let err = crate::error::ProxyError::RequestTimeout;
    let id = crate::forward::headers::new_request_id();
    let body = serde_json::json!({
        "error": err.code(),
        "message": "request headers not complete in time",
        "request_id": id.to_str().unwrap_or_default(),
    })
    .to_string();
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n{}",
        body.len(),
        id.to_str().unwrap_or_default(),
        body
    )
    .into_bytes()
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some((msg, sent)) = this.closing.as_mut() {
            // Best effort: a caller that does not read its 408 just gets the close.
            while *sent < msg.len() {
                match ready!(this.inner.as_mut().poll_write(cx, &msg[*sent..])) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => *sent += n,
                }
            }
            let _ = this.inner.as_mut().poll_flush(cx);
            *sent = msg.len();
            return Poll::Ready(Ok(()));
        }
        let started = this.state.started.load(Ordering::SeqCst);
        if started != *this.seen_started {
            *this.seen_started = started;
            *this.head_deadline = None;
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    *this.last_activity = Instant::now();
                    if *this.mode == Mode::Unknown {
                        *this.mode = if got.starts_with(b"PRI ") {
                            Mode::Http2
                        } else {
                            Mode::Http1
                        };
                    }
                    let idle = started == this.state.finished.load(Ordering::SeqCst);
                    if *this.mode == Mode::Http1 && idle && this.head_deadline.is_none() {
                        *this.head_deadline = Some(Instant::now() + *this.header_timeout);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if *this.mode == Mode::Http2 {
                    return Poll::Pending;
                }
                let busy = started != this.state.finished.load(Ordering::SeqCst);
                let deadline = match (*this.head_deadline, busy) {
                    (Some(d), _) => d,
                    (None, false) => *this.last_activity + *this.idle_timeout,
                    // A request is being served: its own timeouts apply. hyper will
                    // not poll the read side again until the socket wakes it, so a
                    // write after the request ends re-polls us to arm the idle timer.
                    (None, true) => {
                        *this.parked_busy = true;
                        return Poll::Pending;
                    }
                };
                if deadline != *this.timer_at {
                    *this.timer_at = deadline;
                    this.timer.as_mut().reset(deadline);
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.head_deadline.is_some() {
                    tracing::debug!("request headers not complete in time; answering 408");
                    *this.closing = Some((timeout_response(), 0));
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // Idle keep-alive connection: end of stream, hyper closes it.
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// After a write: if the read side parked while a request was in flight and that
/// request is now done, wake the connection so the read side arms the idle timer.
fn unpark(parked_busy: &mut bool, state: &ConnState, cx: &mut Context<'_>) {
    if *parked_busy && state.started.load(Ordering::SeqCst) == state.finished.load(Ordering::SeqCst)
    {
        *parked_busy = false;
        cx.waker().wake_by_ref();
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            *this.last_activity = Instant::now();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        if r.is_ready() {
            unpark(this.parked_busy, this.state, cx);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            *this.last_activity = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
