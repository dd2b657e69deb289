//! The hash chain that makes the audit log tamper-evident.
//!
//! A written line is `{…record…,"seq":N,"chain":"<64 hex>"}`: `seq` and `chain` are
//! always its last two fields, so the bytes the chain covers are the line itself
//! with `,"chain":"<64 hex>"` taken out (and without the newline). Its `chain` is
//! HMAC-SHA256 (keyed) or SHA-256 (no key) over the previous line's `chain`, as 64
//! lowercase hex characters, followed by those bytes. The first line ever follows
//! 64 zeros.

use ring::{digest, hmac};

/// `chain` before the first line ever.
pub const GENESIS: [u8; 64] = [b'0'; 64];

/// `,"chain":"` + 64 hex + `"}`: what is cut from a line to get the chained bytes.
const CHAIN_FIELD_LEN: usize = 10 + 64 + 2;

/// The chain key: HMAC-SHA256 with the configured key, else plain SHA-256.
#[derive(Clone)]
pub struct ChainKey(Option<hmac::Key>);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ChainKey(hmac-sha256, ***)"
        } else {
            "ChainKey(sha256)"
        })
    }
}

impl ChainKey {
    pub fn hmac(key: &[u8]) -> Self {
        ChainKey(Some(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    pub fn plain() -> Self {
        ChainKey(None)
    }

    /// The `chain` of a line whose chained bytes are `parts` concatenated.
    pub fn link(&self, prev: &[u8; 64], parts: &[&[u8]]) -> [u8; 64] {
        let mut out = [0u8; 64];
        match &self.0 {
            Some(key) => {
                let mut ctx = hmac::Context::with_key(key);
                ctx.update(prev);
                for p in parts {
                    ctx.update(p);
                }
                hex(ctx.sign().as_ref(), &mut out);
            }
            None => {
                let mut ctx = digest::Context::new(&digest::SHA256);
                ctx.update(prev);
                for p in parts {
                    ctx.update(p);
                }
                hex(ctx.finish().as_ref(), &mut out);
            }
        }
        out
    }
}

fn hex(bytes: &[u8], out: &mut [u8; 64]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// Where the chain stands: the last line's `seq` (0 before the first) and `chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    pub seq: u64,
    pub chain: [u8; 64],
}

impl ChainState {
    pub const START: ChainState = ChainState {
        seq: 0,
        chain: GENESIS,
    };

    /// Finishes the line that starts at `buf[start]` with one serialized JSON object
    /// (ending in `}`): appends `seq` and `chain` and the newline, and advances.
    pub fn seal(&mut self, key: &ChainKey, buf: &mut Vec<u8>, start: usize) {
        if buf.last() == Some(&b'}') {
            buf.pop();
        }
        let seq = self.seq + 1;
        let empty = buf.len() == start + 1;
        buf.extend_from_slice(if empty { b"\"seq\":" } else { b",\"seq\":" });
        buf.extend_from_slice(itoa(seq, &mut [0u8; 20]));
        let chain = key.link(&self.chain, &[&buf[start..], b"}"]);
        buf.extend_from_slice(b",\"chain\":\"");
        buf.extend_from_slice(&chain);
        buf.extend_from_slice(b"\"}\n");
        *self = ChainState { seq, chain };
    }
}

fn itoa(mut n: u64, scratch: &mut [u8; 20]) -> &[u8] {
    let mut i = scratch.len();
    loop {
        i -= 1;
        scratch[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &scratch[i..];
        }
    }
}

/// A line (without its newline) taken apart: its `seq`, its `chain`, and the
/// bytes the chain covers (the line without the chain field), as two parts.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub seq: u64,
    pub chain: [u8; 64],
    pub head: &'a [u8],
}

impl Parsed<'_> {
    /// Whether this line follows `prev` under `key`.
    pub fn follows(&self, key: &ChainKey, prev: &[u8; 64]) -> bool {
        key.link(prev, &[self.head, b"}"]) == self.chain
    }
}

/// Splits a line as the writer wrote it; `None` when it is not one.
pub fn parse(line: &[u8]) -> Option<Parsed<'_>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < CHAIN_FIELD_LEN + 2 || line.first() != Some(&b'{') {
        return None;
    }
    let (head, tail) = line.split_at(line.len() - CHAIN_FIELD_LEN);
    let hexpart = tail.strip_prefix(b",\"chain\":\"")?.strip_suffix(b"\"}")?;
    let chain: [u8; 64] = hexpart.try_into().ok()?;
    if !chain
        .iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    {
        return None;
    }
    // `seq` is the last field of the head: `…,"seq":123` or `{"seq":123`.
    let digits = head.len() - head.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let (before, num) = head.split_at(digits);
    if !(before.ends_with(b",\"seq\":") || before == b"{\"seq\":") || num.is_empty() {
        return None;
    }
    let seq = std::str::from_utf8(num).ok()?.parse().ok()?;
    // The whole line must be one JSON object, so nothing hides after a field.
    serde_json::from_slice::<serde::de::IgnoredAny>(line).ok()?;
    Some(Parsed { seq, chain, head })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_line_parses_back_and_follows_its_predecessor() {
        for key in [ChainKey::plain(), ChainKey::hmac(b"k")] {
            let mut st = ChainState::START;
            let mut buf = br#"{"a":1}"#.to_vec();
            st.seal(&key, &mut buf, 0);
            let line = buf.strip_suffix(b"\n").unwrap();
            let p = parse(line).unwrap();
            assert_eq!(p.seq, 1);
            assert!(p.follows(&key, &GENESIS));
            assert_eq!(p.chain, st.chain);
            let text = std::str::from_utf8(line).unwrap();
            assert!(text.starts_with(r#"{"a":1,"seq":1,"chain":""#), "{text}");
        }
    }

    #[test]
    fn the_chain_is_sha256_or_hmac_over_prev_hex_and_the_line_without_chain() {
        let mut st = ChainState::START;
        let mut buf = br#"{"a":1}"#.to_vec();
        st.seal(&ChainKey::plain(), &mut buf, 0);
        let mut msg = GENESIS.to_vec();
        msg.extend_from_slice(br#"{"a":1,"seq":1}"#);
        let d = digest::digest(&digest::SHA256, &msg);
        let mut want = [0u8; 64];
        hex(d.as_ref(), &mut want);
        assert_eq!(st.chain, want);

        let mut st = ChainState::START;
        let mut buf = br#"{"a":1}"#.to_vec();
        st.seal(&ChainKey::hmac(b"secret"), &mut buf, 0);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"secret"), &msg);
        hex(tag.as_ref(), &mut want);
        assert_eq!(st.chain, want);
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        assert_eq!(
            format!("{:?}", ChainKey::hmac(b"hunter2")),
            "ChainKey(hmac-sha256, ***)"
        );
    }

    #[test]
    fn lines_that_are_not_sealed_do_not_parse() {
        assert!(parse(br#"{"a":1}"#).is_none());
        assert!(parse(br#"{"a":1,"seq":1,"chain":"00"}"#).is_none());
        let mut buf = br#"{"a":1}"#.to_vec();
        let mut st = ChainState::START;
        st.seal(&ChainKey::plain(), &mut buf, 0);
        let line = &buf[..buf.len() - 1];
        assert!(parse(&line[..line.len() - 3]).is_none(), "torn");
        let mut bad = line.to_vec();
        bad[1] = b'!';
        assert!(parse(&bad).is_none(), "not JSON");
    }
}
