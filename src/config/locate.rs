//! Turns a key path (`routes[2].provider`) into a line and column of the source, so
//! errors found after parsing point where the operator has to look.

use std::fmt;

use toml::de::{DeTable, DeValue};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path of keys and array indexes, displayed as `routes[2].provider`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_owned()));
        Self(v)
    }

    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// Byte offset of the deepest part of `path` present in the document: the key
/// itself where it exists, else the nearest enclosing table or array entry.
pub(crate) fn offset_of(doc: &DeTable<'_>, path: &KeyPath) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut table: Option<&DeTable<'_>> = Some(doc);
    let mut value: Option<&DeValue<'_>> = None;
    for seg in &path.0 {
        match seg {
            Seg::Key(k) => {
                let t = table.or(match value {
                    Some(DeValue::Table(t)) => Some(t),
                    _ => None,
                })?;
                let (key, val) = t
                    .iter()
                    .find(|(key, _)| key.get_ref().as_ref() == k.as_str())?;
                best = Some(key.span().start);
                value = Some(val.get_ref());
                table = None;
            }
            Seg::Index(i) => {
                let arr = match value {
                    Some(DeValue::Array(a)) => a,
                    _ => return best,
                };
                let item = arr.get(*i)?;
                best = Some(item.span().start);
                value = Some(item.get_ref());
                table = None;
            }
        }
    }
    best
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}
