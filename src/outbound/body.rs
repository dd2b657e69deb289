//! What the gateway sends upstream: a caller's body, kept whole for a possible
//! replay or streamed, and the errors it can break with.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The error a body yields when it grows past `listen.max_body`; found again in the
/// upstream client's cause chain to answer 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured max_body")]
pub struct BodyTooLarge;

/// The caller's body broke while streaming to the upstream (bad chunk framing, a
/// cut connection): the caller's fault, a 400, not an upstream failure.
#[derive(Debug, thiserror::Error)]
#[error("request body could not be read")]
pub struct CallerBodyError(#[source] pub hyper::Error);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// What the gateway sends upstream.
    #[project = UpstreamBodyProj]
    #[derive(Debug)]
    pub enum UpstreamBody {
        /// A body kept whole for a possible replay (cheap to clone: `Bytes`).
        Buffered { data: Option<Bytes> },
        /// A body too large (or of unknown size) to keep: a buffered prefix, then the
        /// rest as it arrives, counted against `max_body`.
        Streaming {
            prefix: VecDeque<Bytes>,
            #[pin]
            rest: Incoming,
            seen: u64,
            max: u64,
        },
    }
}

impl UpstreamBody {
    pub fn buffered(data: Bytes) -> Self {
        UpstreamBody::Buffered {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn streaming(prefix: VecDeque<Bytes>, rest: Incoming, seen: u64, max: Option<u64>) -> Self {
        UpstreamBody::Streaming {
            prefix,
            rest,
            seen,
            max: max.unwrap_or(u64::MAX),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            UpstreamBodyProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            UpstreamBodyProj::Streaming {
                prefix,
                rest,
                seen,
                max,
            } => {
                if let Some(chunk) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                match rest.poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            *seen += d.len() as u64;
                            if *seen > *max {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        Poll::Ready(Some(Err(Box::new(CallerBodyError(e)))))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Buffered { data } => data.is_none(),
            UpstreamBody::Streaming { prefix, rest, .. } => {
                prefix.is_empty() && rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Streaming { prefix, rest, .. } => {
                let buffered: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(u) = inner.upper() {
                    hint.set_upper(u + buffered);
                }
                hint
            }
        }
    }
}
