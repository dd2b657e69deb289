//! The data path's upstream connections, on hyper's connection-level client.
//!
//! One [`Upstream`] per origin (scheme, host, port, TLS settings). HTTP/1.1
//! connections wait in a lock-free queue; a response body hands its connection back
//! when it reaches its end, so a request costs no lock, no spawned task and no
//! boxed future. An origin that negotiates h2 by ALPN gets one shared connection,
//! multiplexed. hyper-util's pooled client does the same with a mutex per checkout
//! and return and a task per HTTP/1 request; it stays for the token endpoints,
//! where a request a minute does not matter.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::header::CONNECTION;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use super::body::{BoxError, UpstreamBody};
use super::client::Connector;

/// Longer idle and the upstream has likely dropped it (the legacy client's setting).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1 connections kept per origin; more are closed when they come back.
const MAX_IDLE: usize = 256;

/// Why a request got no response from the upstream. Errors of the request body
/// (too large, the caller's stream broke) are in the cause chain of `Request`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the upstream")]
    Connect(#[source] BoxError),
    #[error("upstream connection handshake")]
    Handshake(#[source] hyper::Error),
    #[error("sending the request upstream")]
    Request(#[source] hyper::Error),
}

/// The connections to one origin. Cheap to clone; routes to the same origin with
/// the same TLS settings share one.
#[derive(Clone)]
pub struct Upstream {
    origin: Arc<Origin>,
}

struct Origin {
    connector: Connector,
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority/`: what the connector dials.
    dst: Uri,
    idle: ArrayQueue<H1>,
    h2: ArcSwapOption<http2::SendRequest<UpstreamBody>>,
    /// Set while the origin answers ALPN with h2: the per-request check of `h2` is
    /// skipped for the (common) HTTP/1 origins, and reconnects go one at a time
    /// so that a burst after a GOAWAY makes one connection, not one per request.
    speaks_h2: AtomicBool,
    connecting: tokio::sync::Mutex<()>,
    reaper_started: AtomicBool,
    /// Counts a `407` from a forward proxy (the tunnelled case counts in the
    /// connector).
    proxy_auth_failures: prometheus_client::metrics::counter::Counter,
}

/// An HTTP/1 connection: idle in the queue, or checked out for one request.
struct H1 {
    tx: http1::SendRequest<UpstreamBody>,
    /// Leads to a forward proxy: requests go in absolute form.
    proxied: bool,
    /// When the request it carries (or, idle, last carried) arrived at the
    /// gateway. Its idle time counts from then rather than from the end of the
    /// response: a little early, which errs towards a fresh connection, and a
    /// clock read per request saved.
    used: Instant,
}

enum Fresh {
    H1(H1),
    H2(http2::SendRequest<UpstreamBody>),
}

/// A connection that failed before the request was written gives the request
/// back: from a pooled connection it is sent once more on a fresh one.
type Attempt = Result<Response<ResponseBody>, (SendError, Option<Request<UpstreamBody>>)>;

/// What hyper's `try_send_request` resolves to, on either protocol.
type Answer = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpstreamBody>>>;

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("origin", &self.origin.dst)
            .field("idle", &self.origin.idle.len())
            .field("h2", &self.origin.speaks_h2.load(Ordering::Relaxed))
            .finish()
    }
}

impl Upstream {
    pub fn new(connector: Connector, scheme: Scheme, authority: Authority) -> Self {
        let dst = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        Upstream {
            origin: Arc::new(Origin {
                connector,
                scheme,
                authority,
                dst,
                idle: ArrayQueue::new(MAX_IDLE),
                h2: ArcSwapOption::empty(),
                speaks_h2: AtomicBool::new(false),
                connecting: tokio::sync::Mutex::new(()),
                reaper_started: AtomicBool::new(false),
                proxy_auth_failures: Default::default(),
            }),
        }
    }

    /// Counts the egress proxy's `407`s into `failures` (the gateway's metric).
    pub fn counting_proxy_auth_failures(
        mut self,
        failures: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        if let Some(o) = Arc::get_mut(&mut self.origin) {
            o.proxy_auth_failures = failures;
        }
        self
    }

    /// Sends `req` (origin- or absolute-form; either is fixed up per connection)
    /// and returns the response as soon as its head arrives. `now` is when the
    /// request arrived: the request path reads the clock once.
    ///
    /// Not an `async fn`: the common cases (a pooled HTTP/1 connection, the
    /// shared h2 one) are decided here and awaited by [`Exchange`], which holds
    /// little more than hyper's own future. An `async fn` would hold every case's
    /// future at once, and hyper moves the whole request future (this one inside)
    /// into place on every request.
    pub fn send(
        &self,
        req: Request<UpstreamBody>,
        now: Instant,
    ) -> impl Future<Output = Result<Response<ResponseBody>, SendError>> + Send + '_ {
        if let Some(mut tx) = self.live_h2() {
            return Exchange::H2 {
                up: self,
                answer: self.start_h2(&mut tx, req),
            };
        }
        while let Some(mut conn) = self.origin.idle.pop() {
            if conn.tx.is_closed() || now.saturating_duration_since(conn.used) > IDLE_TIMEOUT {
                continue;
            }
            conn.used = now;
            if !conn.tx.is_ready() {
                // Handed back at the end of a body it has not finished reading:
                // wait for it (briefly), off the common path.
                return Exchange::Slow {
                    fut: Box::pin(self.send_when_ready(conn, req)),
                };
            }
            return Exchange::H1 {
                up: self,
                answer: self.start_h1(&mut conn, req),
                conn: Some(conn),
            };
        }
        Exchange::Slow {
            fut: Box::pin(self.send_fresh(req)),
        }
    }

    /// On a pooled connection that was still finishing its previous exchange.
    async fn send_when_ready(
        &self,
        mut conn: H1,
        req: Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        if conn.tx.ready().await.is_ok() {
            match self.send_h1(conn, req).await {
                Err((_, Some(unsent))) => self.send_fresh(unsent).await,
                done => done.map_err(|(e, _)| e),
            }
        } else {
            // It closed meanwhile: the next idle one, or a fresh one.
            let now = conn.used;
            self.send(req, now).await
        }
    }

    /// On a new connection: none was idle, or the one tried closed before it
    /// wrote the request.
    async fn send_fresh(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let sent = match self.connect().await? {
            Fresh::H1(conn) => {
                // A request first tried on h2 gave its `host` up for `:authority`
                // (see `start_h2`); HTTP/1.1 needs it back.
                if !req.headers().contains_key(http::header::HOST) {
                    if let Ok(host) = http::HeaderValue::from_str(self.origin.authority.as_str()) {
                        req.headers_mut().insert(http::header::HOST, host);
                    }
                }
                self.send_h1(conn, req).await
            }
            Fresh::H2(tx) => self.send_h2(tx, req).await,
        };
        sent.map_err(|(e, _)| e)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        if !self.origin.speaks_h2.load(Ordering::Relaxed) {
            return None;
        }
        self.origin
            .h2
            .load()
            .as_deref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    async fn send_h1(&self, mut conn: H1, req: Request<UpstreamBody>) -> Attempt {
        let answer = self.start_h1(&mut conn, req).await;
        self.answered(Some(conn), answer)
    }

    async fn send_h2(
        &self,
        mut tx: http2::SendRequest<UpstreamBody>,
        req: Request<UpstreamBody>,
    ) -> Attempt {
        let answer = self.start_h2(&mut tx, req).await;
        self.answered(None, answer)
    }

    /// Hands `req` to an HTTP/1 connection, in the form that connection needs.
    // `#[inline]` on both: left to itself the compiler keeps these calls on the
    // request path (bench/instructions.sh shows the difference).
    #[inline]
    fn start_h1(
        &self,
        conn: &mut H1,
        mut req: Request<UpstreamBody>,
    ) -> impl Future<Output = Answer> {
        self.set_form(req.uri_mut(), conn.proxied);
        conn.tx.try_send_request(req)
    }

    /// Hands `req` to the h2 connection (always absolute-form: see `set_form`).
    /// Its `:authority` is the origin's, so the `host` field goes: RFC 9113
    /// §8.3.1 lets the two coexist only when equal, and nginx refuses a request
    /// carrying both ("duplicate host header", 400).
    #[inline]
    fn start_h2(
        &self,
        tx: &mut http2::SendRequest<UpstreamBody>,
        mut req: Request<UpstreamBody>,
    ) -> impl Future<Output = Answer> {
        self.set_form(req.uri_mut(), true);
        req.headers_mut().remove(http::header::HOST);
        tx.try_send_request(req)
    }

    /// hyper's answer, as an attempt. The HTTP/1 connection (`None` for h2) goes
    /// with the body, back to the pool when it ends, unless the upstream said it
    /// closes it. A request hyper never wrote comes back for another try.
    // The large error carries the unsent request back for its retry: moved once,
    // on a rare path, where boxing would add an allocation.
    #[allow(clippy::result_large_err)]
    fn answered(&self, conn: Option<H1>, answer: Answer) -> Attempt {
        let resp = match answer {
            Ok(resp) => resp,
            Err(mut e) => {
                let unsent = e.take_message();
                return Err((SendError::Request(e.into_error()), unsent));
            }
        };
        let Some(conn) = conn else {
            return Ok(resp.map(|inner| ResponseBody {
                inner,
                checkin: None,
            }));
        };
        if resp.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED && conn.proxied {
            // A forward proxy that wants credentials authgate does not have: the
            // contract's 502 naming proxy authentication, not the proxy's page.
            self.origin.proxy_auth_failures.inc();
            let err = crate::outbound::egress::unanswered(resp.headers());
            return Err((SendError::Connect(Box::new(err)), None));
        }
        let (parts, inner) = resp.into_parts();
        let mut checkin = (!asks_close(&parts.headers)).then(|| Checkin {
            origin: self.origin.clone(),
            conn,
        });
        // Nothing will poll a body that is already over (HEAD, 204, length 0).
        if inner.is_end_stream() {
            if let Some(c) = checkin.take() {
                c.put_back();
            }
        }
        Ok(Response::from_parts(parts, ResponseBody { inner, checkin }))
    }

    /// HTTP/1 sends the URI as given: origin-form to the upstream itself,
    /// absolute-form to a forward proxy (plain http through the egress proxy) and
    /// for h2, whose `:scheme` and `:authority` come from it.
    fn set_form(&self, uri: &mut Uri, absolute: bool) {
        if uri.authority().is_some() == absolute {
            return;
        }
        let pq = uri.path_and_query().cloned();
        *uri = if absolute {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.origin.scheme.clone());
            parts.authority = Some(self.origin.authority.clone());
            parts.path_and_query =
                Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
            Uri::from_parts(parts).unwrap_or_default()
        } else {
            pq.map(Uri::from).unwrap_or_default()
        };
    }

    /// A new connection, HTTP/1.1 or h2 as ALPN decides, its connection task
    /// spawned (one per connection). Known h2 origins connect one at a time.
    async fn connect(&self) -> Result<Fresh, SendError> {
        let o = &self.origin;
        let _one_at_a_time = if o.speaks_h2.load(Ordering::Relaxed) {
            let guard = o.connecting.lock().await;
            if let Some(tx) = self.live_h2() {
                return Ok(Fresh::H2(tx));
            }
            Some(guard)
        } else {
            None
        };
        if !o.reaper_started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(o)));
        }
        let mut connector = o.connector.clone();
        futures_util::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(o.dst.clone())
            .await
            .map_err(SendError::Connect)?;
        let connected = io.connected();
        if connected.is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(SendError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection failed");
                }
            });
            o.h2.store(Some(Arc::new(tx.clone())));
            o.speaks_h2.store(true, Ordering::Relaxed);
            return Ok(Fresh::H2(tx));
        }
        o.speaks_h2.store(false, Ordering::Relaxed);
        let (mut tx, conn) = http1::handshake(io).await.map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection failed");
            }
        });
        tx.ready().await.map_err(SendError::Handshake)?;
        Ok(Fresh::H1(H1 {
            tx,
            proxied: connected.is_proxied(),
            used: Instant::now(),
        }))
    }
}

pin_project_lite::pin_project! {
    /// [`Upstream::send`] in flight: hyper's answer on a pooled HTTP/1 connection
    /// or on the shared h2 one, or, boxed, anything rarer (connecting, waiting
    /// for a busy connection, retrying on a fresh one).
    #[project = ExchangeProj]
    enum Exchange<'a, A, B> {
        H1 { up: &'a Upstream, conn: Option<H1>, #[pin] answer: A },
        H2 { up: &'a Upstream, #[pin] answer: B },
        Slow { fut: Pin<Box<dyn Future<Output = Sent> + Send + 'a>> },
    }
}

type Sent = Result<Response<ResponseBody>, SendError>;

impl<'a, A, B> Future for Exchange<'a, A, B>
where
    A: Future<Output = Answer>,
    B: Future<Output = Answer>,
{
    type Output = Result<Response<ResponseBody>, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (up, attempt) = match self.as_mut().project() {
            ExchangeProj::Slow { fut } => return fut.as_mut().poll(cx),
            ExchangeProj::H1 { up, conn, answer } => {
                let answer = ready!(answer.poll(cx));
                (*up, up.answered(conn.take(), answer))
            }
            ExchangeProj::H2 { up, answer } => {
                let answer = ready!(answer.poll(cx));
                (*up, up.answered(None, answer))
            }
        };
        match attempt {
            // The connection closed before it wrote the request: once more, fresh.
            Err((_, Some(unsent))) => {
                self.set(Exchange::Slow {
                    fut: Box::pin(up.send_fresh(unsent)),
                });
                self.poll(cx)
            }
            done => Poll::Ready(done.map_err(|(e, _)| e)),
        }
    }
}

/// The response announced it closes the connection after itself.
fn asks_close(h: &HeaderMap) -> bool {
    h.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Drops idle connections past their timeout even when no request comes to pop
/// them, as the legacy client's pool timer did. Ends with the origin.
async fn reap(origin: Weak<Origin>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(o) = origin.upgrade() else { return };
        for _ in 0..o.idle.len() {
            let Some(conn) = o.idle.pop() else { break };
            if !conn.tx.is_closed() && conn.used.elapsed() <= IDLE_TIMEOUT {
                // Full only if requests refilled it meanwhile: then this one can go.
                let _ = o.idle.push(conn);
            }
        }
    }
}

/// What goes back to the idle queue when a response body ends cleanly.
struct Checkin {
    origin: Arc<Origin>,
    conn: H1,
}

impl Checkin {
    fn put_back(self) {
        if self.conn.tx.is_closed() {
            return;
        }
        // A full queue refuses it: dropping the sender closes the connection.
        let _ = self.origin.idle.push(self.conn);
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body. For HTTP/1 it holds the connection, which goes
    /// back to the pool at a clean end of stream; an error, or a body dropped
    /// before its end, closes the connection instead (its unread rest would be
    /// read as the next response).
    pub struct ResponseBody {
        #[pin]
        inner: Incoming,
        checkin: Option<Checkin>,
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("pooled", &self.checkin.is_some())
            .finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            None => true,
            // A body of known length ends with its last byte; hyper's server then
            // stops polling without asking for the `None`.
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => {
                this.checkin.take();
                false
            }
        };
        if ended {
            if let Some(c) = this.checkin.take() {
                c.put_back();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::outbound::egress::EgressProxy;

    #[test]
    fn connection_close_is_found_among_other_tokens() {
        let mut h = HeaderMap::new();
        assert!(!asks_close(&h));
        h.insert(CONNECTION, "keep-alive, x-hop".parse().unwrap());
        assert!(!asks_close(&h));
        h.append(CONNECTION, "x-other ,  Close".parse().unwrap());
        assert!(asks_close(&h));
        h.insert(CONNECTION, "closed".parse().unwrap());
        assert!(!asks_close(&h));
    }

    fn upstream(authority: &str) -> Upstream {
        let connector =
            super::super::client::connector(None, None, false, &EgressProxy::direct()).unwrap();
        Upstream::new(connector, Scheme::HTTP, authority.parse().unwrap())
    }

    #[tokio::test]
    async fn uris_take_the_form_each_connection_needs() {
        let up = upstream("api.example:8080");
        let mut uri = Uri::from_static("/v2/x?q=1");
        up.set_form(&mut uri, false);
        assert_eq!(uri, "/v2/x?q=1");
        up.set_form(&mut uri, true);
        assert_eq!(uri, "http://api.example:8080/v2/x?q=1");
        up.set_form(&mut uri, true);
        assert_eq!(uri, "http://api.example:8080/v2/x?q=1");
        up.set_form(&mut uri, false);
        assert_eq!(uri, "/v2/x?q=1");
    }

    // The paths below run when a pooled connection is not what it seemed at
    // checkout. A real upstream makes them races; here the pooled connection is
    // hyper's, on an in-memory pipe, and its task is driven (or dropped) by the
    // test, so each path is taken every time.

    /// The request heads an upstream of these tests received, lowercased.
    type Heads = Arc<std::sync::Mutex<Vec<String>>>;

    /// Answers every request head on `io` with `200 ok`, until it closes.
    async fn answer_ok<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut io: S,
        heads: Heads,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = seen.drain(..end + 4).collect::<Vec<u8>>();
                heads
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).to_ascii_lowercase());
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if io.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    }

    /// An upstream on loopback for fresh connections; counts them and keeps
    /// the request heads.
    async fn fresh_upstream() -> (String, Arc<std::sync::atomic::AtomicUsize>, Heads) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heads = Heads::default();
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer_ok(s, seen.clone()));
            }
        });
        (addr, accepted, heads)
    }

    /// A connection in the idle queue whose task the test holds; the other end
    /// of its pipe answers `200 ok`.
    async fn pooled(
        up: &Upstream,
    ) -> http1::Connection<hyper_util::rt::TokioIo<tokio::io::DuplexStream>, UpstreamBody> {
        let (ours, theirs) = tokio::io::duplex(4096);
        tokio::spawn(answer_ok(theirs, Heads::default()));
        let (tx, conn) = http1::handshake(hyper_util::rt::TokioIo::new(ours))
            .await
            .unwrap();
        let idle = H1 {
            tx,
            proxied: false,
            used: Instant::now(),
        };
        assert!(up.origin.idle.push(idle).is_ok());
        conn
    }

    fn get() -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::buffered(Bytes::new()));
        *req.uri_mut() = Uri::from_static("/x");
        req
    }

    fn poll_once<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// What a test does with the pooled connection's task once the exchange has
    /// started on it.
    enum Then {
        Drive,
        Drop,
    }

    /// Sends a GET through an upstream whose one idle connection is a `pooled`
    /// one, polled once beforehand when `ready` (a connection asks for a request
    /// when polled, and checkout then finds it ready); then drives or drops that
    /// connection's task. The request must be answered: returns how many fresh
    /// connections that took.
    async fn exchange_on_pooled(ready: bool, then: Then) -> usize {
        let (addr, fresh, _) = fresh_upstream().await;
        let up = upstream(&addr);
        let mut conn = pooled(&up).await;
        if ready {
            assert!(poll_once(Pin::new(&mut conn)).is_pending());
        }
        let mut exchange = std::pin::pin!(up.send(get(), Instant::now()));
        assert!(poll_once(exchange.as_mut()).is_pending());
        match then {
            Then::Drive => drop(tokio::spawn(conn)),
            Then::Drop => drop(conn),
        }
        let resp = exchange.await.unwrap();
        assert_eq!(resp.status(), 200);
        fresh.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_request_without_host_gets_it_back_on_a_fresh_http1_connection() {
        // What an h2 attempt hands back has no `host` (see `start_h2`).
        let (addr, _, heads) = fresh_upstream().await;
        let up = upstream(&addr);
        let resp = up.send_fresh(get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 1);
        assert!(
            heads[0].contains(&format!("\r\nhost: {addr}\r\n")),
            "{heads:?}"
        );
    }

    #[tokio::test]
    async fn a_request_a_pooled_connection_took_but_never_wrote_goes_out_on_a_fresh_one() {
        // The task ends with the request still queued: hyper hands it back.
        assert_eq!(exchange_on_pooled(true, Then::Drop).await, 1);
    }

    #[tokio::test]
    async fn a_pooled_connection_not_yet_ready_is_waited_for() {
        assert_eq!(exchange_on_pooled(false, Then::Drive).await, 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_that_closes_while_waited_for_is_replaced() {
        assert_eq!(exchange_on_pooled(false, Then::Drop).await, 1);
    }
}
