//! The one serialized form of a [`StoredToken`], shared by the file and postgres
//! stores so that encryption rules live in one place.
//!
//! With a store key the secrets (access and refresh token) are sealed, bound to the
//! provider name; the other fields stay readable so operators can inspect expiry and
//! generation without the key.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::crypto::Cipher;
use super::token_store::{StoreError, StoredToken};
use crate::secret::Secret;

/// Shown when a sealed record meets a gateway that has no key configured.
pub const NO_KEY: &str = "store is encrypted but no store.key_env/key_file is set";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Plaintext, or a sealed value when `encrypted`.
    pub access_token: String,
    /// Plaintext, or a sealed value when `encrypted`.
    #[serde(default)]
    pub refresh_token: Option<String>,
    pub token_type: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub expires_at_unix: Option<i64>,
    pub generation: u64,
    pub obtained_at_unix: i64,
    pub fingerprint: String,
    /// Written explicitly rather than guessed from the value's shape, so a plaintext
    /// token that happens to look sealed is never fed to the cipher.
    #[serde(default)]
    pub encrypted: bool,
}

impl TokenRecord {
    /// The record to write for `provider`. With a cipher the secrets are sealed.
    pub fn seal(
        provider: &str,
        t: &StoredToken,
        cipher: Option<&Cipher>,
    ) -> Result<TokenRecord, StoreError> {
        let protect = |s: &Secret| match cipher {
            Some(c) => c.seal(provider, s.expose()),
            None => Ok(s.expose().to_owned()),
        };
        Ok(TokenRecord {
            access_token: protect(&t.access_token)?,
            refresh_token: t.refresh_token.as_ref().map(protect).transpose()?,
            token_type: t.token_type.clone(),
            scope: t.scope.clone(),
            expires_at_unix: t.expires_at_unix,
            generation: t.generation,
            obtained_at_unix: t.obtained_at_unix,
            fingerprint: t.fingerprint.clone(),
            encrypted: cipher.is_some(),
        })
    }

    /// The token of `provider` back from its record.
    ///
    /// - sealed record, no key: a configuration error ([`NO_KEY`]);
    /// - sealed record, wrong key (or another provider's record): the cipher's error;
    /// - plaintext record with a key: accepted, so turning encryption on migrates an
    ///   existing store (the caller seals it on the next save).
    pub fn open(
        mut self,
        provider: &str,
        cipher: Option<&Cipher>,
    ) -> Result<StoredToken, StoreError> {
        let cipher = match (self.encrypted, cipher) {
            (false, _) => None,
            (true, Some(c)) => Some(c),
            (true, None) => return Err(StoreError::Config(NO_KEY.into())),
        };
        let reveal = |value: String| match cipher {
            Some(c) => c.open(provider, &value),
            None => Ok(Secret::new(value)),
        };
        let access_token = reveal(std::mem::take(&mut self.access_token))?;
        let refresh_token = self.refresh_token.take().map(reveal).transpose()?;
        Ok(StoredToken {
            access_token,
            refresh_token,
            token_type: std::mem::take(&mut self.token_type),
            scope: self.scope.take(),
            expires_at_unix: self.expires_at_unix,
            generation: self.generation,
            obtained_at_unix: self.obtained_at_unix,
            fingerprint: std::mem::take(&mut self.fingerprint),
        })
    }
}

impl Drop for TokenRecord {
    // An unencrypted record holds plaintext tokens; wipe them like `Secret` does.
    fn drop(&mut self) {
        self.access_token.zeroize();
        if let Some(r) = self.refresh_token.as_mut() {
            r.zeroize();
        }
    }
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("access_token", &"***")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "***"))
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .field("expires_at_unix", &self.expires_at_unix)
            .field("generation", &self.generation)
            .field("obtained_at_unix", &self.obtained_at_unix)
            .field("fingerprint", &self.fingerprint)
            .field("encrypted", &self.encrypted)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cipher(byte: &str) -> Cipher {
        Cipher::from_key(&Secret::new(byte.repeat(32))).unwrap()
    }

    pub(crate) fn token(gen: u64) -> StoredToken {
        StoredToken {
            access_token: Secret::new(format!("access-secret-{gen}")),
            refresh_token: Some(Secret::new(format!("refresh-secret-{gen}"))),
            token_type: "Bearer".into(),
            scope: Some("invoices.read".into()),
            expires_at_unix: Some(2_000_000_000),
            generation: gen,
            obtained_at_unix: 1_700_000_000,
            fingerprint: "fp-1".into(),
        }
    }

    #[test]
    fn plaintext_round_trip() {
        let r = TokenRecord::seal("crm", &token(1), None).unwrap();
        assert!(!r.encrypted);
        assert_eq!(r.access_token, "access-secret-1");
        assert_eq!(r.open("crm", None).unwrap(), token(1));
    }

    #[test]
    fn sealed_round_trip_hides_secrets() {
        let c = cipher("ab");
        let r = TokenRecord::seal("crm", &token(2), Some(&c)).unwrap();
        assert!(r.encrypted);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("secret"), "{json}");
        assert!(json.contains("invoices.read"), "metadata stays readable");
        assert_eq!(r.open("crm", Some(&c)).unwrap(), token(2));
    }

    #[test]
    fn sealed_without_key_is_a_clear_error() {
        let r = TokenRecord::seal("crm", &token(1), Some(&cipher("ab"))).unwrap();
        let err = r.open("crm", None).unwrap_err();
        assert!(matches!(err, StoreError::Config(_)));
        assert!(err.to_string().contains(NO_KEY));
    }

    #[test]
    fn wrong_key_or_provider_is_refused() {
        let r = TokenRecord::seal("crm", &token(1), Some(&cipher("ab"))).unwrap();
        let err = r.clone().open("crm", Some(&cipher("cd"))).unwrap_err();
        assert!(matches!(err, StoreError::Crypto(_)), "{err}");
        assert!(r.open("erp", Some(&cipher("ab"))).is_err());
    }

    #[test]
    fn plaintext_record_is_accepted_with_a_key() {
        let r = TokenRecord::seal("crm", &token(1), None).unwrap();
        assert_eq!(r.open("crm", Some(&cipher("ab"))).unwrap(), token(1));
    }

    #[test]
    fn missing_optional_fields_default() {
        let r: TokenRecord = serde_json::from_str(
            r#"{"access_token":"a","token_type":"Bearer","generation":1,
                "obtained_at_unix":5,"fingerprint":"f"}"#,
        )
        .unwrap();
        let t = r.open("crm", None).unwrap();
        assert_eq!(t.refresh_token, None);
        assert_eq!(t.expires_at_unix, None);
    }

    #[test]
    fn debug_is_redacted() {
        let r = TokenRecord::seal("crm", &token(1), None).unwrap();
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(dbg.contains("fp-1"));
    }
}
