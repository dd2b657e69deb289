//! `WWW-Authenticate` on an upstream 401, which the third-party API controls:
//! deciding whether it is worth a refresh never panics, and a challenge that names
//! no error at all always is (RFC 6750 §3.1).
#![no_main]

use authgate::forward::refresh_worthy;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for part in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(WWW_AUTHENTICATE, v);
        }
    }
    let worthy = refresh_worthy(&headers);
    let names_an_error = headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|s| s.to_ascii_lowercase().contains("error="));
    if !names_an_error {
        assert!(worthy);
    }
});
