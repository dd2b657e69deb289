//! Header hygiene between caller and upstream (RFC 9110 §7.6.1).

use http::header::{self, HeaderMap, HeaderName};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_AUTHGATE_KEY: HeaderName = HeaderName::from_static("x-authgate-key");

/// Field names to look for in a message. Every message passes here twice and most
/// carry none of them: one scan of its few fields costs less than a hashed lookup
/// per name, and most fields are ruled out by their length alone (a bit per length).
struct NameSet<const N: usize> {
    strs: [&'static str; N],
    names: [HeaderName; N],
    lens: u64,
}

macro_rules! name_set {
    ($($name:literal),+ $(,)?) => {
        NameSet {
            strs: [$($name),+],
            names: [$(HeaderName::from_static($name)),+],
            lens: len_mask(&[$($name),+]),
        }
    };
}

const fn len_mask(strs: &[&str]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < strs.len() {
        mask |= 1 << bit(strs[i].len());
        i += 1;
    }
    mask
}

/// Lengths of 63 and more share the last bit.
const fn bit(len: usize) -> usize {
    if len > 63 {
        63
    } else {
        len
    }
}

impl<const N: usize> NameSet<N> {
    /// The position of `name` in the set.
    #[inline]
    fn position(&self, name: &str) -> Option<usize> {
        if self.lens & (1 << bit(name.len())) == 0 {
            return None;
        }
        self.strs.iter().position(|s| *s == name)
    }

    /// Removes the fields whose positions are set in `found`.
    fn remove(&self, headers: &mut HeaderMap, found: u32) {
        for (i, name) in self.names.iter().enumerate() {
            if found & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), plus the obsolete `proxy-connection`.
/// `connection` first: its position is bit 0 of what `strip_hop_by_hop` finds.
static HOP_BY_HOP: NameSet<9> = name_set![
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "trailer",
];

/// Caller fields that never travel upstream: its own credentials and `forwarded`
/// (third parties learn nothing of our network). The caller's `host` is not
/// listed: the route's own replaces it in place, which costs one hashed update
/// where a removal and an insertion cost two.
static CALLER_ONLY: NameSet<3> = name_set!["authorization", "x-authgate-key", "forwarded"];

/// Removes hop-by-hop fields: the fixed list and every field named in `connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found = 0u32;
    // `connection` fields seen, and whether each was just `keep-alive` or `close`:
    // nearly every upstream sends one of those alone, and they name nothing more
    // to strip (`keep-alive` is on the fixed list), so that case skips the token
    // split.
    let mut connections = 0;
    let mut names_nothing = true;
    for (name, value) in headers.iter() {
        let Some(i) = HOP_BY_HOP.position(name.as_str()) else {
            continue;
        };
        found |= 1 << i;
        if i == 0 {
            connections += 1;
            let v = value.as_bytes();
            names_nothing &=
                v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close");
        }
    }
    if found == 0 {
        return;
    }
    if connections > 1 || !names_nothing {
        // Names listed in `connection` are hop-by-hop too. Collecting them is the
        // one allocation here, and only for the rare message that names any.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for name in named {
            // Never let `connection: x-request-id` strip our own correlation id.
            if name != X_REQUEST_ID {
                headers.remove(name);
            }
        }
    }
    HOP_BY_HOP.remove(headers, found);
}

/// Caller-side fields that never travel upstream: its own credentials and
/// `x-forwarded-*`/`forwarded` (third parties learn nothing of our network).
/// `host` is left for the caller of this to overwrite with the route's.
pub fn strip_caller_credentials(headers: &mut HeaderMap) {
    let mut found = 0u32;
    let mut forwarded = false;
    for key in headers.keys() {
        let k = key.as_str();
        if let Some(i) = CALLER_ONLY.position(k) {
            found |= 1 << i;
        }
        forwarded |= k.starts_with("x-forwarded-");
    }
    CALLER_ONLY.remove(headers, found);
    if forwarded {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-forwarded-"))
            .cloned()
            .collect();
        for k in names {
            headers.remove(k);
        }
    }
}

/// A caller-supplied request id is kept when it is short and printable; anything
/// else is replaced (it ends up in logs and audit lines).
pub fn acceptable_request_id(v: &http::HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

pub fn new_request_id() -> http::HeaderValue {
    // 128 random bits as 32 hex digits, formatted on the stack a byte (two
    // digits) at a time from a table (cheaper than shifting the whole `u128` per
    // digit). The id goes into the upstream request,
    // the response and the audit line: owned by a `Bytes` built with
    // `from_owner`, its one allocation is shared by every clone (a `Bytes` made
    // from a `Vec` allocates again on its first clone).
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(hex_id(rand::random())))
        .unwrap_or_else(|_| http::HeaderValue::from_static("invalid"))
}

fn hex_id(n: u128) -> [u8; 32] {
    let mut buf = [0u8; 32];
    for (pair, byte) in buf.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    buf
}

/// Each byte's two lowercase hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    table
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The field names left, sorted.
    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        left
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "keep-alive, x-secret-hop, X-Request-Id".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept", "x-request-id"]);
    }

    #[test]
    fn a_second_connection_field_is_not_missed_by_the_keep_alive_shortcut() {
        let mut h = HeaderMap::new();
        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", "x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept"]);

        let mut h = HeaderMap::new();
        h.insert("connection", "Close".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept"]);
    }

    #[test]
    fn removes_caller_credentials_and_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer caller".parse().unwrap());
        h.insert("x-authgate-key", "k".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-forwarded-proto", "http".parse().unwrap());
        h.insert("forwarded", "for=10.0.0.1".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_caller_credentials(&mut h);
        assert_eq!(names(&h), ["accept"]);
    }

    #[test]
    fn name_sets_find_their_names_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.strs.iter().enumerate() {
            assert_eq!(HOP_BY_HOP.position(name), Some(i));
            assert_eq!(HOP_BY_HOP.names[i].as_str(), *name);
        }
        // Same lengths as members, and lengths past the mask's last bit.
        for other in ["x-connect!", "tx", "content-type", &"x".repeat(70)] {
            assert_eq!(HOP_BY_HOP.position(other), None, "{other}");
        }
        assert_eq!(CALLER_ONLY.position("x-authgate-key"), Some(1));
        assert_eq!(CALLER_ONLY.position("x-authgate-kex"), None);
    }

    #[test]
    fn request_ids() {
        assert!(acceptable_request_id(&"abc-123".parse().unwrap()));
        assert!(!acceptable_request_id(&"has space".parse().unwrap()));
        assert!(!acceptable_request_id(&"x".repeat(200).parse().unwrap()));
        assert_eq!(
            &hex_id(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            b"0123456789abcdeffedcba9876543210"
        );
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
