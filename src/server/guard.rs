//! The IO wrapper under every connection, over any `Transport` (TCP or TLS): it
//! enforces the header and idle timeouts itself, and turns hyper's own bare
//! answers to heads it cannot parse into the contract's JSON errors.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;

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

/// Request counts of one connection, shared between the IO wrapper, the service
/// and the connection loop: a head is complete when hyper calls the service.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    pub(super) started: AtomicU64,
    pub(super) finished: AtomicU64,
    /// Set by `Guarded` when an idle HTTP/1 connection should hibernate.
    pub(super) hibernate: AtomicBool,
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
    pub(super) struct Guarded<S> {
        #[pin]
        inner: S,
        pub(super) state: Arc<ConnState>,
        http2: bool,
        header_timeout: Duration,
        idle_timeout: Duration,
        seen_started: u64,
        // Final response heads written for requests the service answered: a head
        // while none is owed (all started requests have theirs) is hyper's own.
        heads_written: u64,
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
    pub(super) fn new(
        inner: S,
        header_timeout: Duration,
        idle_timeout: Duration,
        http2: bool,
    ) -> Self {
        let now = Instant::now();
        let first = now + idle_timeout.min(header_timeout);
        Self {
            inner,
            state: Arc::new(ConnState::default()),
            http2,
            header_timeout,
            idle_timeout,
            seen_started: 0,
            heads_written: 0,
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
    pub(super) fn rewind(&mut self, bytes: Bytes) {
        self.prefix = bytes;
    }
}

impl<S: Transport> Guarded<S> {
    /// Hibernating: ready (`true`) when the caller sends again, `false` once the
    /// connection has been idle for `idle_timeout`.
    pub(super) fn poll_wake(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
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

/// hyper's own answer to a head it could not parse, as the contract's error.
/// `None` for any other status.
fn parse_error_answer(data: &[u8]) -> Option<Vec<u8>> {
    let err = match data.strip_prefix(b"HTTP/1.")?.get(2..5)? {
        b"400" => ProxyError::BadRequest("malformed request"),
        // A request line too long for hyper is a head over the size limit too.
        b"431" | b"414" => ProxyError::HeadersTooLarge,
        _ => return None,
    };
    Some(closing_answer(&err, None))
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
///
/// Every request the service was called for (`started`) gets one final head from
/// it; hyper writes its own only when none is owed. Counting heads, rather than
/// asking whether a request is in flight, matters for an answer with an empty
/// body: hyper finishes (and drops) that body before it writes the head.
fn swallowed(
    data: &[u8],
    closing: &mut Option<(Vec<u8>, usize)>,
    heads_written: &mut u64,
    state: &ConnState,
    http2: bool,
) -> bool {
    if closing.is_some() {
        return true;
    }
    // 1xx heads (100 Continue) are hyper's, ahead of the service's final head.
    if http2 || !data.starts_with(b"HTTP/1.") || data.get(9) == Some(&b'1') {
        return false;
    }
    let started = state.started.load(Ordering::SeqCst);
    if *heads_written < started {
        *heads_written += 1;
        return false;
    }
    // Not a head at all: the rest of a body still being written.
    if started != state.finished.load(Ordering::SeqCst) {
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
        if swallowed(
            data,
            this.closing,
            this.heads_written,
            this.state,
            *this.http2,
        ) {
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
        if swallowed(
            first,
            this.closing,
            this.heads_written,
            this.state,
            *this.http2,
        ) {
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
    use super::*;

    const BARE_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";

    #[test]
    fn only_hypers_own_bare_answers_become_the_contract_error() {
        let state = ConnState::default();
        let (mut closing, mut heads) = (None, 0);
        // Nothing asked of the service yet: a 400 is hyper's, for a head it
        // could not parse.
        assert!(swallowed(BARE_400, &mut closing, &mut heads, &state, false));
        assert!(closing.take().is_some());
        // The service answered a request with a bare 400 (its body already done
        // when the head goes out): it goes out as it is.
        state.started.store(1, Ordering::SeqCst);
        state.finished.store(1, Ordering::SeqCst);
        assert!(!swallowed(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            &mut closing,
            &mut heads,
            &state,
            false
        ));
        assert!(!swallowed(
            BARE_400,
            &mut closing,
            &mut heads,
            &state,
            false
        ));
        assert_eq!(heads, 1);
        // With the service's head written, the next bare 400 is hyper's again.
        assert!(swallowed(BARE_400, &mut closing, &mut heads, &state, false));
        assert!(parse_error_answer(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
    }
}
