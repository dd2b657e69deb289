//! One accepted connection: what the request path learns about it (`ConnInfo`),
//! the listener's drain signal, the HTTP/1 loop (keep-alive, hibernation of idle
//! connections, the route deadline of the request in flight) and the HTTP/2 one,
//! with the head limits and request counting both share.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::deadline::{ConnDeadline, Watch};
use super::guard::{ConnState, Guarded, Transport};
use crate::body::GatewayBody;

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

/// hyper's protocol builders for one listener.
pub(super) struct Protocols {
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
}

/// The listener's drain signal. Connections ask whether it has fired on every
/// poll, and `CancellationToken::is_cancelled` locks a mutex to answer; so the
/// fact is kept in an atomic flag as well, set before the token fires. A
/// connection that read `false` and registered its waker with the token is
/// woken by the token and reads `true` then.
#[derive(Debug, Clone, Default)]
pub(super) struct Drain {
    token: CancellationToken,
    fired: Arc<AtomicBool>,
}

impl Drain {
    pub(super) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// One plain load: no lock, no read-modify-write.
    pub(super) fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    pub(super) fn wait(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// One accepted connection and what serving it needs.
pub(super) struct Conn {
    pub(super) info: ConnInfo,
    pub(super) head: HeadLimits,
    pub(super) header_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) protocols: Arc<Protocols>,
    pub(super) drain: Drain,
}

impl Conn {
    pub(super) async fn run<S, H, F>(self, stream: S, h2: bool, handler: H)
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
            Counted {
                inner: fut,
                state: Some(state),
            }
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
/// connection (see `deadline`).
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
pub(super) struct HeadLimits {
    pub(super) max_headers: usize,
    pub(super) max_size: usize,
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
        // Handed on to the response body: one reference per request, not two.
        state: Option<Arc<ConnState>>,
    }
}

impl<F: Future<Output = Response<GatewayBody>>> Future for Counted<F> {
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = ready!(this.inner.poll(cx));
        // The request counts as finished when its response body is done (or
        // dropped), so a long-streaming response is never taken for idleness.
        // Polled again after it answered (hyper never does), it stays pending.
        let Some(state) = this.state.take() else {
            return Poll::Pending;
        };
        Poll::Ready(Ok(resp.map(|inner| CountedBody { inner, state })))
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

#[cfg(test)]
mod tests {
    use super::Drain;

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
