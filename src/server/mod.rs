//! Listeners: accept, (optionally) TLS, HTTP/1.1 + HTTP/2 (h2c prior knowledge or
//! ALPN), connection limits, graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

pub mod deadline;

use crate::body::GatewayBody;
use crate::config::Listen;
use crate::error::ProxyError;
use crate::tls::TlsError;
use deadline::{ConnDeadline, Watch};

/// What the listener knows about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// Names from a verified caller certificate (DNS SANs and CN).
    pub cert_names: Arc<[String]>,
    /// HTTP/1: where the request in flight leaves its route deadline for the
    /// connection to watch (see `deadline`). HTTP/2 requests keep their own timer.
    pub deadline: Option<ConnDeadline>,
}

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

/// hyper's protocol builders for one listener.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
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
        // past that allocates two arrays of about 6 KiB per request (the earlier
        // slack of twice the count cost about 1,200 instructions per request).
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

/// The listener's drain signal. Connections ask whether it has fired on every
/// poll, and `CancellationToken::is_cancelled` locks a mutex to answer; so the
/// fact is kept in an atomic flag as well, set before the token fires. A
/// connection that read `false` and registered its waker with the token is
/// woken by the token and reads `true` then.
#[derive(Debug, Clone, Default)]
struct Drain {
    token: CancellationToken,
    fired: Arc<AtomicBool>,
}

impl Drain {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// One plain load: no lock, no read-modify-write.
    fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    fn wait(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
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

/// The socket under a connection, whatever is layered on it: hibernation waits on
/// its readiness.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// One accepted connection and what serving it needs.
struct Conn {
    info: ConnInfo,
    head: HeadLimits,
    header_timeout: Duration,
    idle_timeout: Duration,
    protocols: Arc<Protocols>,
    drain: Drain,
}

impl Conn {
    async fn run<S, H, F>(self, stream: S, h2: bool, handler: H)
    where
        S: Transport,
        H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + Unpin + 'static,
        F: Future<Output = Response<GatewayBody>> + Send + 'static,
    {
        let io = Guarded::new(stream, self.header_timeout, self.idle_timeout, h2);
        let state = io.state.clone();
        let mut info = self.info;
        if !h2 {
            info.deadline = Some(ConnDeadline::new());
        }
        let info = Arc::new(info);
        let conn_info = info.clone();
        let head = self.head;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            state.started.fetch_add(1, Ordering::SeqCst);
            let fut = if head.exceeded(&req) {
                let id = crate::headers::new_request_id();
                let mut resp = crate::error::ProxyError::HeadersTooLarge.to_response(
                    id.to_str().unwrap_or_default(),
                    None,
                    None,
                );
                resp.headers_mut()
                    .insert(crate::headers::X_REQUEST_ID.clone(), id);
                futures_util::future::Either::Left(std::future::ready(resp))
            } else {
                futures_util::future::Either::Right(handler(req, info.clone()))
            };
            Counted { inner: fut, state }
        });
        let result = if h2 {
            let conn = self
                .protocols
                .http2
                .serve_connection(TokioIo::new(io), service);
            let mut conn = Box::pin(conn);
            let mut draining = std::pin::pin!(self.drain.wait());
            let mut registered = None;
            let mut asked = false;
            std::future::poll_fn(|cx| {
                if !asked && drain_fired(draining.as_mut(), &self.drain, &mut registered, cx) {
                    asked = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await
        } else {
            serve_http1(io, service, &self.protocols.http1, &self.drain, &conn_info).await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
}

/// Whether the drain signal has fired, at the cost of an atomic load per poll.
/// Polling tokio's `Notified` takes the lock of its waiter list every time, and a
/// connection's task is polled several times per request. So the signal is polled
/// to register a waker, and after that only once `Drain`'s flag says it has fired
/// (the token's wake-up brings the task back here) or the waker is not the
/// registered one (a task's waker does not change; this keeps it right if a
/// wrapper's ever does).
fn drain_fired(
    draining: Pin<&mut WaitForCancellationFuture<'_>>,
    drain: &Drain,
    registered: &mut Option<Waker>,
    cx: &mut Context<'_>,
) -> bool {
    let same = registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
    if same && !drain.has_fired() {
        return false;
    }
    if !same {
        *registered = Some(cx.waker().clone());
    }
    draining.poll(cx).is_ready()
}

/// Serves HTTP/1 requests on one connection. A keep-alive connection left idle
/// hibernates: hyper's connection state (two 8 KiB buffers and the request's
/// future) is dropped and only the socket is kept, to be woken by the caller's next
/// bytes; 10,000 idle callers then cost little more than their sockets.
/// The route deadline of the request in flight is watched here, by one timer per
/// connection (see `forward::deadline`).
async fn serve_http1<S, Svc>(
    mut io: Guarded<S>,
    mut service: Svc,
    builder: &http1::Builder,
    drain: &Drain,
    info: &ConnInfo,
) -> Result<(), hyper::Error>
where
    S: Transport,
    Svc: hyper::service::HttpService<Incoming, ResBody = CountedBody> + Unpin,
{
    let state = io.state.clone();
    let remote = info.remote;
    let mut watch = Watch::default();
    loop {
        // Boxed, so that a hibernating connection's task does not keep room for it.
        let mut conn = Box::new(builder.serve_connection(TokioIo::new(io), service));
        let mut draining = std::pin::pin!(drain.wait());
        let mut registered = None;
        let mut closing = false;
        std::future::poll_fn(|cx| {
            if !closing && drain_fired(draining.as_mut(), drain, &mut registered, cx) {
                closing = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            loop {
                let polled = Pin::new(&mut *conn).poll(cx);
                if polled.is_ready() {
                    return polled;
                }
                if !closing && state.hibernate.load(Ordering::Relaxed) {
                    // Idle between requests (see `Guarded`): hyper closes at once,
                    // without touching the socket, and hands back what it had read.
                    closing = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                    return Pin::new(&mut *conn).poll(cx);
                }
                // After hyper: a request it just started may have armed a deadline.
                // One that passed needs the request polled again, to answer 504.
                let expired = info
                    .deadline
                    .as_ref()
                    .is_some_and(|d| watch.poll_expired(d, cx));
                if !expired {
                    return polled;
                }
            }
        })
        .await?;
        if !state.hibernate.swap(false, Ordering::Relaxed) || drain.has_fired() {
            return Ok(());
        }
        let parts = (*conn).into_parts();
        tracing::trace!(%remote, buffered = parts.read_buf.len(), "connection hibernating");
        io = parts.io.into_inner();
        service = parts.service;
        let leftover = parts.read_buf;
        if leftover.is_empty() {
            // Even empty, it holds hyper's whole read buffer.
            drop(leftover);
            let woken = tokio::select! {
                r = std::future::poll_fn(|cx| Pin::new(&mut io).poll_wake(cx)) => r,
                _ = drain.wait() => false,
            };
            if !woken {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                return Ok(());
            }
        } else {
            // Bytes of a next request that hyper had read: served before the socket.
            io.rewind(leftover);
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

pin_project_lite::pin_project! {
    /// A request's future, its response body counted (see `CountedBody`).
    /// Written out rather than an `async` block, which would keep the request's
    /// future twice (as its capture, and as the future it awaits): hyper moves
    /// the whole of it into place on every request.
    struct Counted<F> {
        #[pin]
        inner: F,
        state: Arc<ConnState>,
    }
}

impl<F: Future<Output = Response<GatewayBody>>> Future for Counted<F> {
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = ready!(this.inner.poll(cx));
        // The request counts as finished when its response body is done (or
        // dropped), so a long-streaming response is never taken for idleness.
        Poll::Ready(Ok(resp.map(|inner| CountedBody {
            inner,
            state: this.state.clone(),
        })))
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

/// Request counts of one connection, shared between the IO wrapper, the service
/// and the connection loop: a head is complete when hyper calls the service.
#[derive(Debug, Default)]
struct ConnState {
    started: AtomicU64,
    finished: AtomicU64,
    /// Set by `Guarded` when an idle HTTP/1 connection should hibernate.
    hibernate: AtomicBool,
}

/// How long an idle HTTP/1 keep-alive connection keeps hyper's state before it
/// hibernates. Short, because waking costs about a microsecond, while a busy
/// caller never waits this long between requests.
const HIBERNATE_AFTER: Duration = Duration::from_millis(100);

/// What an expired deadline of the read side means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A head started and did not finish: 408.
    Head,
    /// Idle for `idle_timeout`: closed.
    Idle,
    /// Idle for `HIBERNATE_AFTER`: hyper's state is let go.
    Nap,
}

pin_project_lite::pin_project! {
    /// The connection's IO, watching HTTP/1 heads: once the first byte of a request
    /// head arrives, the head must be complete (hyper calls the service) within
    /// `header_timeout`, else a 408 with the contract's JSON body is written and the
    /// connection closed (hyper's own header timeout only closes, and would let a
    /// slowloris caller see no reason). Between requests, a connection with no
    /// traffic hibernates after `HIBERNATE_AFTER` and is closed after
    /// `idle_timeout`. HTTP/2 has its own framing and keep-alive; the wrapper stays
    /// out of it.
    struct Guarded<S> {
        #[pin]
        inner: S,
        state: Arc<ConnState>,
        http2: bool,
        header_timeout: Duration,
        idle_timeout: Duration,
        seen_started: u64,
        head_deadline: Option<Instant>,
        last_activity: Instant,
        // Armed lazily: it may fire before the deadline of the moment, which is
        // then re-armed, so that a busy connection does not move a timer per
        // request.
        timer: Pin<Box<Sleep>>,
        timer_at: Instant,
        // The 408 being written, and how much of it went out.
        closing: Option<(Vec<u8>, usize)>,
        parked_busy: bool,
        // Written since the last completed flush: hyper may still hold bytes.
        unflushed: bool,
        // Bytes read by a hibernated connection's hyper state, served first.
        prefix: Bytes,
    }
}

impl<S> Guarded<S> {
    fn new(inner: S, header_timeout: Duration, idle_timeout: Duration, http2: bool) -> Self {
        let now = Instant::now();
        let first = now + idle_timeout.min(header_timeout);
        Self {
            inner,
            state: Arc::new(ConnState::default()),
            http2,
            header_timeout,
            idle_timeout,
            seen_started: 0,
            head_deadline: None,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(first)),
            timer_at: first,
            closing: None,
            parked_busy: false,
            unflushed: false,
            prefix: Bytes::new(),
        }
    }

    /// Hands back bytes hyper had read before hibernating.
    fn rewind(&mut self, bytes: Bytes) {
        self.prefix = bytes;
    }
}

impl<S: Transport> Guarded<S> {
    /// Hibernating: ready (`true`) when the caller sends again, `false` once the
    /// connection has been idle for `idle_timeout`.
    fn poll_wake(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.project();
        if this
            .inner
            .as_ref()
            .get_ref()
            .tcp()
            .poll_read_ready(cx)
            .is_ready()
        {
            // An error, too, is for hyper to find and report.
            return Poll::Ready(true);
        }
        let deadline = *this.last_activity + *this.idle_timeout;
        if poll_deadline(this.timer, this.timer_at, deadline, cx) {
            return Poll::Ready(false);
        }
        Poll::Pending
    }
}

/// Whether `deadline` has passed, with the timer armed for it otherwise. The timer
/// is only moved earlier; one that fires early is re-armed.
fn poll_deadline(
    timer: &mut Pin<Box<Sleep>>,
    timer_at: &mut Instant,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    if deadline < *timer_at {
        *timer_at = deadline;
        timer.as_mut().reset(deadline);
    }
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if *timer_at >= deadline {
            return true;
        }
        *timer_at = deadline;
        timer.as_mut().reset(deadline);
    }
}

/// The contract's JSON answer to a request that never reached the service, with a
/// request id of its own.
fn closing_answer(err: &ProxyError, message: Option<&str>) -> Vec<u8> {
    let id = crate::headers::new_request_id();
    err.to_closing_bytes(id.to_str().unwrap_or_default(), message)
}

/// hyper's own answer to a head it could not parse (written while no request is
/// in flight, so it can be nothing else), as the contract's error. `None` for
/// anything else.
fn parse_error_answer(data: &[u8]) -> Option<Vec<u8>> {
    let err = match data.strip_prefix(b"HTTP/1.")?.get(2..5)? {
        b"400" => ProxyError::BadRequest("malformed request"),
        // A request line too long for hyper is a head over the size limit too.
        b"431" | b"414" => ProxyError::HeadersTooLarge,
        _ => return None,
    };
    // A small response body is done (and its request counted finished) before
    // hyper writes the head, so "no request in flight" also fits the service's
    // own answers; those always name their content type, hyper's never do.
    if has_content_type(data) {
        return None;
    }
    Some(closing_answer(&err, None))
}

/// Whether the response head at the start of `data` has a `content-type` field.
fn has_content_type(data: &[u8]) -> bool {
    let head_end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len());
    data[..head_end]
        .split(|b| *b == b'\n')
        .any(|line| line.len() > 13 && line[..13].eq_ignore_ascii_case(b"content-type:"))
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if this.closing.is_some() {
            ready!(poll_closing(this.inner.as_mut(), this.closing, cx));
            return Poll::Ready(Ok(()));
        }
        let started = this.state.started.load(Ordering::SeqCst);
        if started != *this.seen_started {
            *this.seen_started = started;
            *this.head_deadline = None;
        }
        let before = buf.filled().len();
        let polled = if this.prefix.is_empty() {
            this.inner.as_mut().poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            Poll::Ready(Ok(()))
        };
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let now = Instant::now();
                    *this.last_activity = now;
                    let idle = started == this.state.finished.load(Ordering::SeqCst);
                    if !*this.http2 && idle && this.head_deadline.is_none() {
                        *this.head_deadline = Some(now + *this.header_timeout);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if *this.http2 {
                    return Poll::Pending;
                }
                // A request is being served (its own timeouts apply), or hyper still
                // holds response bytes. hyper will not poll the read side again until
                // the socket wakes it, so a flush after the request ends re-polls us
                // to arm the timer.
                let busy = started != this.state.finished.load(Ordering::SeqCst);
                if this.head_deadline.is_none() && (busy || *this.unflushed) {
                    *this.parked_busy = true;
                    return Poll::Pending;
                }
                let (deadline, expiry) = match *this.head_deadline {
                    Some(d) => (d, Expiry::Head),
                    None => {
                        let nap = *this.last_activity + HIBERNATE_AFTER;
                        let idle = *this.last_activity + *this.idle_timeout;
                        if nap < idle {
                            (nap, Expiry::Nap)
                        } else {
                            (idle, Expiry::Idle)
                        }
                    }
                };
                if !poll_deadline(this.timer, this.timer_at, deadline, cx) {
                    return Poll::Pending;
                }
                match expiry {
                    Expiry::Head => {
                        tracing::debug!("request headers not complete in time; answering 408");
                        *this.closing = Some((
                            closing_answer(
                                &ProxyError::RequestTimeout,
                                Some("request headers not complete in time"),
                            ),
                            0,
                        ));
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    // Idle keep-alive connection: end of stream, hyper closes it.
                    Expiry::Idle => Poll::Ready(Ok(())),
                    Expiry::Nap => {
                        this.state.hibernate.store(true, Ordering::Relaxed);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
        }
    }
}

/// Writes the gateway's own closing answer (see `Guarded::closing`). Best effort:
/// a caller that does not read it just gets the close.
fn poll_closing<S: AsyncWrite>(
    mut inner: Pin<&mut S>,
    closing: &mut Option<(Vec<u8>, usize)>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if let Some((msg, sent)) = closing.as_mut() {
        while *sent < msg.len() {
            match ready!(inner.as_mut().poll_write(cx, &msg[*sent..])) {
                Ok(0) | Err(_) => break,
                Ok(n) => *sent += n,
            }
        }
        *sent = msg.len();
        let _ = ready!(inner.poll_flush(cx));
    }
    Poll::Ready(())
}

/// After a flush: if the read side parked while a request was in flight or bytes
/// were unflushed, and the connection is now idle, wake it so the read side arms
/// its timer.
fn unpark(parked_busy: &mut bool, state: &ConnState, cx: &mut Context<'_>) {
    if *parked_busy && state.started.load(Ordering::SeqCst) == state.finished.load(Ordering::SeqCst)
    {
        *parked_busy = false;
        cx.waker().wake_by_ref();
    }
}

/// Whether hyper's bytes are kept from the caller: once the gateway writes its
/// own closing answer, and for hyper's own answer to a head it could not parse,
/// which becomes the contract's JSON error (hyper's has no body).
fn swallowed(
    data: &[u8],
    closing: &mut Option<(Vec<u8>, usize)>,
    state: &ConnState,
    http2: bool,
) -> bool {
    if closing.is_some() {
        return true;
    }
    // A response with no request in flight can only be hyper's own.
    if http2
        || !data.starts_with(b"HTTP/1.")
        || state.started.load(Ordering::SeqCst) != state.finished.load(Ordering::SeqCst)
    {
        return false;
    }
    *closing = parse_error_answer(data).map(|msg| (msg, 0));
    closing.is_some()
}

/// After a write: hyper may now hold bytes until its flush, and bytes that went
/// out count as activity.
fn wrote(r: &Poll<io::Result<usize>>, unflushed: &mut bool, last_activity: &mut Instant) {
    *unflushed = true;
    if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
        *last_activity = Instant::now();
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if swallowed(data, this.closing, this.state, *this.http2) {
            return Poll::Ready(Ok(data.len()));
        }
        let r = this.inner.poll_write(cx, data);
        wrote(&r, this.unflushed, this.last_activity);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if this.closing.is_some() {
            ready!(poll_closing(this.inner.as_mut(), this.closing, cx));
        }
        let r = this.inner.poll_flush(cx);
        if r.is_ready() {
            // hyper flushes the socket only once its own buffer is written out.
            *this.unflushed = false;
            unpark(this.parked_busy, this.state, cx);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if this.closing.is_some() {
            ready!(poll_closing(this.inner.as_mut(), this.closing, cx));
        }
        if this.state.hibernate.load(Ordering::Relaxed) {
            // hyper ends its part of a hibernating connection; the socket stays.
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if swallowed(first, this.closing, this.state, *this.http2) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = this.inner.poll_write_vectored(cx, bufs);
        wrote(&r, this.unflushed, this.last_activity);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_error_answer, Drain};

    #[test]
    fn only_hypers_own_bare_answers_become_the_contract_error() {
        // hyper's answer to a head it could not parse: no content type.
        assert!(
            parse_error_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").is_some()
        );
        // The service's own 400 (a page, a JSON error) goes out as it is.
        assert!(parse_error_answer(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html; charset=utf-8\r\ncontent-length: 5\r\n\r\nhello"
        )
        .is_none());
        assert!(parse_error_answer(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn the_drain_flag_is_set_by_the_time_its_waiters_wake() {
        let drain = Drain::default();
        let seen = drain.clone();
        assert!(!seen.has_fired());
        let waiter = tokio::spawn(async move {
            seen.wait().await;
            seen.has_fired()
        });
        tokio::task::yield_now().await;
        drain.fire();
        assert!(waiter.await.unwrap_or(false));
        assert!(drain.has_fired());
    }
}
