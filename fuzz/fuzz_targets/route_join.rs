//! Routing and path joining: the first line is the request path, the other lines
//! route prefixes. For a path the gateway accepts, the upstream path must stay
//! under the route's base and carry no dot segment.
#![no_main]

use authgate::route::{is_dot_segment, join_path, normalize_prefix, path_is_safe, RouteTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let path = lines.next().unwrap_or_default();
    let prefixes: Vec<String> = lines.filter_map(|p| normalize_prefix(p).ok()).collect();
    let table = RouteTable::new(prefixes.iter().map(String::as_str));
    // The gateway takes the path from a parsed URI: it never holds the query.
    if path.contains(['?', '#']) || !path_is_safe(path) {
        return;
    }
    let Some((idx, rest)) = table.find(path) else {
        return;
    };
    assert!(idx < prefixes.len());
    assert!(path.ends_with(rest));
    assert!(rest.is_empty() || rest.starts_with('/'));
    let base = "/base/v2";
    let out = join_path(base, rest, Some("q=1"));
    assert!(out.starts_with(base));
    let joined = out.split('?').next().unwrap_or_default();
    assert!(
        !joined.split('/').any(is_dot_segment),
        "dot segment escaped: {path:?} -> {out:?}"
    );
});
