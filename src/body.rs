//! The body of every answer the gateway gives: an upstream's body as it arrives
//! (never collected whole), or a small body of its own (errors, admin pages).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::outbound::pool::ResponseBody;

pin_project_lite::pin_project! {
    /// What the gateway sends back: the upstream's body as it arrives, or a small
    /// body of its own (errors, admin answers).
    #[project = GatewayBodyProj]
    #[derive(Debug)]
    pub enum GatewayBody {
        Upstream { #[pin] inner: ResponseBody },
        Full { data: Option<Bytes> },
    }
}

impl GatewayBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        GatewayBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> Self {
        GatewayBody::Full { data: None }
    }

    pub fn upstream(inner: ResponseBody) -> Self {
        GatewayBody::Upstream { inner }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            GatewayBodyProj::Upstream { inner } => inner.poll_frame(cx),
            GatewayBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Upstream { inner } => inner.is_end_stream(),
            GatewayBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Upstream { inner } => inner.size_hint(),
            GatewayBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
