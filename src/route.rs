//! Prefix routing: longest whole-segment match, dot-segment refusal, and joining the
//! rest of the path onto the upstream's base path. Pure functions, no I/O.

/// Why a configured prefix is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("prefix {0:?} must start with '/'")]
    NoLeadingSlash(String),
    #[error("prefix {0:?} must not contain '?' or '#'")]
    QueryOrFragment(String),
    #[error("prefix {0:?} has an empty or dot segment")]
    BadSegment(String),
}

/// Normalizes a configured prefix: leading '/', no trailing '/', no empty, `.` or
/// `..` segments.
pub fn normalize_prefix(p: &str) -> Result<String, PrefixError> {
    if !p.starts_with('/') {
        return Err(PrefixError::NoLeadingSlash(p.to_owned()));
    }
    if p.contains(['?', '#']) {
        return Err(PrefixError::QueryOrFragment(p.to_owned()));
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_owned());
    }
    if trimmed[1..]
        .split('/')
        .any(|s| s.is_empty() || is_dot_segment(s))
    {
        return Err(PrefixError::BadSegment(p.to_owned()));
    }
    Ok(trimmed.to_owned())
}

/// `.` and `..`, also percent-encoded (`%2e`, `.%2E`, ...).
pub fn is_dot_segment(seg: &str) -> bool {
    let b = seg.as_bytes();
    let mut dots = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b[i] == b'%' && i + 2 < b.len() && b[i + 1] == b'2' && (b[i + 2] | 0x20) == b'e' {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// Whether a request path is one the gateway will forward: absolute, and free of dot
/// segments (raw or percent-encoded), and of encoded slashes or backslashes that an
/// upstream might decode into a path separator.
pub fn path_is_safe(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    // Most API paths hold none of the bytes a dot segment or an encoded separator
    // needs: one pass over the bytes settles them without splitting segments.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    for seg in path[1..].split('/') {
        if is_dot_segment(seg) || seg.contains('\\') {
            return false;
        }
        let lower = seg.as_bytes();
        for w in lower.windows(3) {
            if w[0] == b'%' && w[1] == b'2' && (w[2] | 0x20) == b'f' {
                return false;
            }
            if w[0] == b'%' && w[1] == b'5' && (w[2] | 0x20) == b'c' {
                return false;
            }
        }
    }
    true
}

/// Prefixes sorted longest first; a match is on whole path segments.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// (prefix, index into the config's routes), longest prefix first.
    entries: Vec<(String, usize)>,
}

impl RouteTable {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut entries: Vec<(String, usize)> = prefixes
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p.to_owned(), i))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        Self { entries }
    }

    /// The matching route's index and the rest of the path after the prefix (either
    /// empty or starting with '/').
    pub fn find<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        for (prefix, idx) in &self.entries {
            if prefix == "/" {
                return Some((*idx, path));
            }
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Some((*idx, rest));
                }
            }
        }
        None
    }
}

/// Joins the upstream base path and the rest of the request path, keeping the query.
/// `base` has no trailing '/' unless it is "/" or empty. The string is allocated at
/// its exact length, so that it becomes a `Bytes` without a second allocation.
pub fn join_path(base: &str, rest: &str, query: Option<&str>) -> String {
    let base = base.trim_end_matches('/');
    let path = match (rest.is_empty(), base.is_empty()) {
        (false, _) => rest,
        (true, true) => "/",
        (true, false) => "",
    };
    let mut out = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    out.push_str(base);
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(["/crm", "/crm/v2", "/erp", "/"])
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = RouteTable::new(["/crm", "/crm/v2", "/erp"]);
        assert_eq!(t.find("/crm"), Some((0, "")));
        assert_eq!(t.find("/crm/"), Some((0, "/")));
        assert_eq!(t.find("/crm/x"), Some((0, "/x")));
        assert_eq!(t.find("/crm/v2/x"), Some((1, "/x")));
        assert_eq!(t.find("/crm/v2x"), Some((0, "/v2x")));
        assert_eq!(t.find("/crmx"), None);
        assert_eq!(t.find("/er"), None);
        assert_eq!(t.find("/"), None);
        assert_eq!(table().find("/other"), Some((3, "/other")));
    }

    #[test]
    fn prefixes_are_normalized() {
        assert_eq!(normalize_prefix("/crm/").as_deref(), Ok("/crm"));
        assert_eq!(normalize_prefix("/").as_deref(), Ok("/"));
        assert!(normalize_prefix("crm").is_err());
        assert!(normalize_prefix("/a//b").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
        assert!(normalize_prefix("/a?x").is_err());
    }

    #[test]
    fn dot_segments_in_any_encoding_are_refused() {
        for bad in [
            "/crm/../x",
            "/crm/./x",
            "/crm/%2e%2e/x",
            "/crm/.%2E/x",
            "/crm/%2E",
            "/crm/..",
            "/crm/%2fetc",
            "/crm/a%5c..",
            "/crm\\..",
            "crm/x",
        ] {
            assert!(!path_is_safe(bad), "{bad} should be refused");
        }
        for ok in [
            "/crm/x",
            "/crm/...",
            "/crm/.well-known",
            "/crm/a.b",
            "/crm/%2e%2e%2e",
            "/",
        ] {
            assert!(path_is_safe(ok), "{ok} should pass");
        }
    }

    #[test]
    fn joins_base_rest_and_query() {
        let j = |b: &str, r: &str, q: Option<&str>| {
            let s = join_path(b, r, q);
            assert_eq!(s.len(), s.capacity(), "exact length of {s:?}");
            s
        };
        assert_eq!(j("/v2", "/invoices", Some("page=2")), "/v2/invoices?page=2");
        assert_eq!(j("/v2/", "/invoices", None), "/v2/invoices");
        assert_eq!(j("/v2", "", None), "/v2");
        assert_eq!(j("", "", None), "/");
        assert_eq!(j("/", "", Some("a")), "/?a");
        assert_eq!(j("", "/x/", None), "/x/");
    }
}
