//! The admin listener's JSON answers.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

use crate::body::GatewayBody;

pub(super) fn json(status: StatusCode, body: serde_json::Value) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
