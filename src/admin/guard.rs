//! Who may use the console's actions (DESIGN.md, "Operator console"): with an
//! admin key, HTTP Basic (user `admin`, password the key); without one, loopback
//! clients only. A POST from another origin is refused either way, so a page on
//! another site cannot make a logged-in browser press the buttons.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Why an action is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 401: the admin key is required and was missing or wrong.
    Unauthorized,
    /// 403: not allowed from here (foreign origin, or not loopback without a key).
    Forbidden(&'static str),
}

/// What the guard looks at in a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asker<'a> {
    pub(super) remote: IpAddr,
    /// `Host` (or the HTTP/2 authority) the request was sent to.
    pub(super) host: Option<&'a str>,
    pub(super) origin: Option<&'a str>,
    pub(super) authorization: Option<&'a str>,
    /// Only state-changing requests are checked for their origin.
    pub(super) post: bool,
}

/// The decision, a pure function of the request's facts and the key.
pub(super) fn guard(key: Option<&Secret>, asker: &Asker<'_>) -> Result<(), Refusal> {
    if asker.post {
        if let Some(origin) = asker.origin {
            // The listener serves plain http; its own origin is the one the
            // browser used to reach it.
            let own = asker
                .host
                .is_some_and(|h| origin.eq_ignore_ascii_case(&format!("http://{h}")));
            if !own {
                return Err(Refusal::Forbidden("cross-origin request refused"));
            }
        }
    }
    match key {
        Some(key) => {
            if basic_matches(asker.authorization, key) {
                Ok(())
            } else {
                Err(Refusal::Unauthorized)
            }
        }
        None => {
            let remote_loopback = match asker.remote {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
                IpAddr::V4(v4) => v4.is_loopback(),
            };
            // A loopback name too: a page whose DNS name was rebound to 127.0.0.1
            // reaches the listener from loopback, but under its own name.
            let host_loopback = asker.host.is_none_or(host_is_loopback);
            if remote_loopback && host_loopback {
                Ok(())
            } else {
                Err(Refusal::Forbidden(
                    "actions are accepted from loopback only unless [admin] key_env or key_file is set",
                ))
            }
        }
    }
}

/// `host[:port]` names this machine.
fn host_is_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:9090`, `127.0.0.1:9090`, `localhost:9090`; a bare `::1` has no port.
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    crate::config::is_loopback_host(name)
}

/// HTTP Basic with user `admin` and the key as password, compared in constant
/// time (over digests, so the key's length does not show either).
fn basic_matches(authorization: Option<&str>, key: &Secret) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let Some((scheme, creds)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = B64.decode(creds.trim()) else {
        return false;
    };
    let decoded = zeroize::Zeroizing::new(decoded);
    let Some(colon) = decoded.iter().position(|b| *b == b':') else {
        return false;
    };
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let user_ok = user.ct_eq(b"admin");
    let password_ok = digest(password)
        .as_ref()
        .ct_eq(digest(key.expose().as_bytes()).as_ref());
    (user_ok & password_ok).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker<'a>(remote: &str, host: Option<&'a str>) -> Asker<'a> {
        Asker {
            remote: remote.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            host,
            origin: None,
            authorization: None,
            post: true,
        }
    }

    fn basic(user: &str, password: &str) -> String {
        format!("Basic {}", B64.encode(format!("{user}:{password}")))
    }

    #[test]
    fn without_a_key_only_loopback_clients_act() {
        assert_eq!(
            guard(None, &asker("127.0.0.1", Some("127.0.0.1:9090"))),
            Ok(())
        );
        assert_eq!(guard(None, &asker("::1", Some("[::1]:9090"))), Ok(()));
        assert_eq!(
            guard(None, &asker("::ffff:127.0.0.1", Some("localhost:9090"))),
            Ok(())
        );
        assert!(matches!(
            guard(None, &asker("10.1.2.3", Some("10.0.0.1:9090"))),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            guard(None, &asker("192.168.1.9", Some("127.0.0.1:9090"))),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn without_a_key_a_rebound_dns_name_is_refused() {
        assert!(matches!(
            guard(None, &asker("127.0.0.1", Some("evil.example:9090"))),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn with_a_key_basic_auth_is_required_from_anywhere() {
        let key = Secret::new("s3cret-admin-key");
        let mut a = asker("10.1.2.3", Some("gw.corp:9090"));
        assert_eq!(guard(Some(&key), &a), Err(Refusal::Unauthorized));
        let wrong = basic("admin", "nope");
        a.authorization = Some(&wrong);
        assert_eq!(guard(Some(&key), &a), Err(Refusal::Unauthorized));
        let other_user = basic("root", "s3cret-admin-key");
        a.authorization = Some(&other_user);
        assert_eq!(guard(Some(&key), &a), Err(Refusal::Unauthorized));
        let right = basic("admin", "s3cret-admin-key");
        a.authorization = Some(&right);
        assert_eq!(guard(Some(&key), &a), Ok(()));
        let garbage = "Basic !!!".to_owned();
        a.authorization = Some(&garbage);
        assert_eq!(guard(Some(&key), &a), Err(Refusal::Unauthorized));
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        let key = Secret::new("k");
        let right = basic("admin", "k");
        let mut a = asker("127.0.0.1", Some("127.0.0.1:9090"));
        a.authorization = Some(&right);
        a.origin = Some("http://127.0.0.1:9090");
        assert_eq!(guard(Some(&key), &a), Ok(()));
        assert_eq!(guard(None, &a), Ok(()));
        for foreign in ["https://evil.example", "null", "http://127.0.0.1:9091"] {
            a.origin = Some(foreign);
            assert!(matches!(guard(Some(&key), &a), Err(Refusal::Forbidden(_))));
            assert!(matches!(guard(None, &a), Err(Refusal::Forbidden(_))));
        }
        // A GET is not checked for its origin.
        a.post = false;
        assert_eq!(guard(None, &a), Ok(()));
    }
}
