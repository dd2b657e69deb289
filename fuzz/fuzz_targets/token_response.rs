//! Token endpoint answers (RFC 6749 §5.1/§5.2), which the IdP controls: the first
//! two bytes pick the status, the rest is the body. Any answer yields a token or
//! an error, never a panic; an accepted token is one a header can carry, with a
//! clamped lifetime.
#![no_main]

use std::time::Duration;

use authgate::token::oauth::parse_response;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data {
        [a, b, rest @ ..] => (100 + u16::from_be_bytes([*a, *b]) % 500, rest),
        _ => return,
    };
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    match parse_response(status, None, body) {
        Ok(t) => {
            assert!(status.is_success());
            let token = t.access_token.expose();
            assert!(!token.is_empty());
            assert!(token.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            if let Some(life) = t.expires_in {
                assert!(life >= Duration::from_secs(1));
                assert!(life <= Duration::from_secs(366 * 24 * 3600));
            }
        }
        Err(e) => {
            // The error is logged and audited: it must stay short and printable.
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            let _ = e.retry();
            let _ = e.code();
        }
    }
});
