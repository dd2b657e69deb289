//! Encryption at rest for stored secrets: AES-256-GCM (ring) with a random 96-bit
//! nonce per value. A sealed value is `v1:` + base64(nonce ‖ ciphertext ‖ tag); the
//! provider name is bound as associated data so a value cannot be moved to another
//! provider's record unnoticed. On Windows a store may instead be protected with
//! DPAPI under the service's account (`dpapi1:` + base64(blob), the provider name
//! as entropy): no key to keep, readable only by that account on that machine.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::token_store::StoreError;
use crate::secret::Secret;

const PREFIX: &str = "v1:";
/// A value protected by Windows DPAPI: `dpapi1:` + base64(the DPAPI blob).
const DPAPI_PREFIX: &str = "dpapi1:";

/// The store key, or DPAPI. `Debug` never shows a key.
pub struct Cipher {
    kind: Kind,
}

enum Kind {
    /// Boxed: the key schedule is half a kilobyte, DPAPI nothing.
    Aes {
        key: Box<LessSafeKey>,
        rng: SystemRandom,
    },
    /// Windows DPAPI under the process's account; the provider name is the
    /// entropy, binding each value to its provider like the AES associated data.
    #[cfg(windows)]
    Dpapi,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Aes { .. } => f.write_str("Cipher(AES-256-GCM, key: ***)"),
            #[cfg(windows)]
            Kind::Dpapi => f.write_str("Cipher(DPAPI)"),
        }
    }
}

impl Cipher {
    /// The key is 32 bytes written as 64 hex digits or as base64.
    pub fn from_key(key: &Secret) -> Result<Self, StoreError> {
        let text = key.expose().trim();
        let bytes = decode_hex(text)
            .or_else(|| B64.decode(text).ok())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                StoreError::Crypto(
                    "the store key must be 32 bytes, as 64 hex digits or base64 (e.g. `openssl rand -hex 32`)".into(),
                )
            })?;
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| StoreError::Crypto("invalid AES-256 key".into()))?;
        Ok(Self {
            kind: Kind::Aes {
                key: Box::new(LessSafeKey::new(unbound)),
                rng: SystemRandom::new(),
            },
        })
    }

    /// DPAPI under the account the process runs as (a service's account).
    #[cfg(windows)]
    pub fn dpapi() -> Self {
        Self { kind: Kind::Dpapi }
    }

    /// Encrypts `plaintext`, bound to `context` (the provider name).
    pub fn seal(&self, context: &str, plaintext: &str) -> Result<String, StoreError> {
        let (key, rng) = match &self.kind {
            Kind::Aes { key, rng } => (key, rng),
            #[cfg(windows)]
            Kind::Dpapi => {
                let blob = crate::win32::dpapi_protect(plaintext.as_bytes(), context.as_bytes())
                    .map_err(|e| StoreError::Crypto(format!("DPAPI cannot protect: {e}")))?;
                return Ok(format!("{DPAPI_PREFIX}{}", B64.encode(blob)));
            }
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce)
            .map_err(|_| StoreError::Crypto("no randomness for a nonce".into()))?;
        let mut buf = plaintext.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context.as_bytes()),
            &mut buf,
        )
        .map_err(|_| StoreError::Crypto("encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(format!("{PREFIX}{}", B64.encode(out)))
    }

    /// Decrypts a value made by `seal` with the same key and context. A wrong key
    /// and a tampered value look the same: an error that says so.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Secret, StoreError> {
        let key = match (&self.kind, sealed.strip_prefix(DPAPI_PREFIX)) {
            (Kind::Aes { key, .. }, None) => key,
            (Kind::Aes { .. }, Some(_)) => {
                return Err(StoreError::Crypto(
                    "stored token is protected with DPAPI, but this store is configured with a key"
                        .into(),
                ))
            }
            #[cfg(windows)]
            (Kind::Dpapi, Some(b64)) => {
                let blob = B64.decode(b64).map_err(|_| {
                    StoreError::Crypto("stored value is not encrypted in a known format".into())
                })?;
                let mut plain = crate::win32::dpapi_unprotect(&blob, context.as_bytes())
                    .map_err(|e| {
                        StoreError::Crypto(format!(
                            "DPAPI cannot decrypt stored token (another account or machine, or the data was altered): {e}"
                        ))
                    })?;
                let text = std::str::from_utf8(&plain)
                    .map_err(|_| StoreError::Crypto("decrypted value is not UTF-8".into()))?
                    .to_owned();
                zeroize::Zeroize::zeroize(&mut plain);
                return Ok(Secret::new(text));
            }
            #[cfg(windows)]
            (Kind::Dpapi, None) => return Err(StoreError::Crypto(
                "stored token is sealed with a store key, but this store is configured for DPAPI"
                    .into(),
            )),
        };
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| B64.decode(b).ok())
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or_else(|| {
                StoreError::Crypto("stored value is not encrypted in a known format".into())
            })?;
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| StoreError::Crypto("bad nonce".into()))?;
        let mut buf = ct.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| {
                StoreError::Crypto(
                    "cannot decrypt stored token: wrong store key, or the data was altered".into(),
                )
            })?;
        let text = std::str::from_utf8(plain)
            .map_err(|_| StoreError::Crypto("decrypted value is not UTF-8".into()))?
            .to_owned();
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(Secret::new(text))
    }

    /// Whether a stored string is a sealed value (as opposed to plaintext).
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX) || value.starts_with(DPAPI_PREFIX)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key(hex_byte: &str) -> Cipher {
        Cipher::from_key(&Secret::new(hex_byte.repeat(32))).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let c = key("ab");
        let sealed = c.seal("crm", "tok-123").unwrap();
        assert!(Cipher::is_sealed(&sealed));
        assert!(!sealed.contains("tok-123"));
        assert_eq!(c.open("crm", &sealed).unwrap().expose(), "tok-123");
        assert!(c.open("erp", &sealed).is_err(), "bound to its provider");
        assert!(key("cd").open("crm", &sealed).is_err(), "wrong key refused");
        assert_ne!(
            sealed,
            c.seal("crm", "tok-123").unwrap(),
            "fresh nonce each time"
        );
    }

    #[test]
    fn key_formats() {
        assert!(Cipher::from_key(&Secret::new("00".repeat(32))).is_ok());
        assert!(Cipher::from_key(&Secret::new(B64.encode([7u8; 32]))).is_ok());
        assert!(Cipher::from_key(&Secret::new("short")).is_err());
        assert!(format!("{:?}", key("ab")).contains("***"));
    }
}
