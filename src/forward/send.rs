//! Sending a request upstream, bounded by the route's deadline, with the pool's
//! failures mapped to the contract's errors. Used by the first attempt and the
//! replay alike.

use std::future::Future;

use futures_util::FutureExt as _;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use tokio::time::Instant;

use crate::cause::find_in_chain;
use crate::error::ProxyError;
use crate::gateway::Route;
use crate::outbound::body::{BodyTooLarge, CallerBodyError, UpstreamBody};
use crate::outbound::pool::ResponseBody;
use crate::server::deadline::{Bounded, ConnDeadline};

pub(super) fn build_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// Not an `async fn`, which would keep `req` twice (as its argument and inside
/// the pool's future): this future is moved with every request's.
pub(super) fn send<'a>(
    route: &'a Route,
    req: Request<UpstreamBody>,
    now: Instant,
    deadline: Instant,
    watched: Option<&'a ConnDeadline>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    Bounded::new(route.upstream.send(req, now), deadline, watched).map(|sent| match sent {
        Err(_) => Err(ProxyError::UpstreamTimeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            if find_in_chain::<BodyTooLarge>(&e).is_some() {
                Err(ProxyError::BodyTooLarge)
            } else if find_in_chain::<CallerBodyError>(&e).is_some() {
                Err(ProxyError::BadRequest("request body could not be read"))
            } else {
                Err(ProxyError::UpstreamUnreachable(Box::new(e)))
            }
        }
    })
}
