//! Walking an error's cause chain: one line for logs, or the first cause of a
//! given type (how a 413, a caller's broken body or a proxy authentication failure
//! is recognised inside the HTTP client's error). A leaf: every layer uses it.

use std::error::Error as StdError;

/// The whole cause chain on one line, for logs.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// Whether `err` or anything in its cause chain is an `E`.
pub fn find_in_chain<'a, E: StdError + 'static>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}
