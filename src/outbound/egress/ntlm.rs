//! NTLMv2 (MS-NLMP) as a client, for an egress proxy that asks for `NTLM` (or for
//! `Negotiate`, wrapped in SPNEGO by `super::spnego`) where no SSPI is at hand:
//! the account is `proxy_username` with `proxy_password_*`.
//!
//! Only NTLMv2 responses are ever sent (no LM, no NTLMv1: both crack in
//! seconds), without session-key exchange, signing or sealing: the proxy only
//! needs to know who connects, the tunnel's contents are TLS of their own.

use hmac::{KeyInit, Mac};
use md4::Digest;

use crate::secret::Secret;

type HmacMd5 = hmac::Hmac<md5::Md5>;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
const NEGOTIATE_OEM: u32 = 0x0000_0002;
const REQUEST_TARGET: u32 = 0x0000_0004;
const NEGOTIATE_NTLM: u32 = 0x0000_0200;
const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
const NEGOTIATE_128: u32 = 0x2000_0000;
const NEGOTIATE_56: u32 = 0x8000_0000;

const CLIENT_FLAGS: u32 = NEGOTIATE_UNICODE
    | NEGOTIATE_OEM
    | REQUEST_TARGET
    | NEGOTIATE_NTLM
    | NEGOTIATE_ALWAYS_SIGN
    | NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NEGOTIATE_128
    | NEGOTIATE_56;

/// AV pair ids in the challenge's target info (MS-NLMP 2.2.2.1).
const AV_EOL: u16 = 0;
const AV_TIMESTAMP: u16 = 7;

/// Why a challenge could not be answered. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum NtlmError {
    #[error("malformed NTLM challenge from the proxy")]
    Malformed,
    #[error("the proxy offers no NTLMv2 (target information missing)")]
    NoNtlmV2,
}

/// The account NTLM authenticates as. `Debug` never shows the password.
#[derive(Clone)]
pub(super) struct NtlmAccount {
    user: String,
    domain: String,
    password: Secret,
}

impl std::fmt::Debug for NtlmAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmAccount")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .field("password", &"***")
            .finish()
    }
}

impl NtlmAccount {
    /// `DOMAIN\user`, or `user@domain` (a UPN, sent whole with no domain, as
    /// Windows does), or a bare `user` of the proxy's own domain.
    pub(super) fn new(username: &str, password: Secret) -> Self {
        let (domain, user) = match username.split_once('\\') {
            Some((d, u)) => (d.to_owned(), u.to_owned()),
            None => (String::new(), username.to_owned()),
        };
        Self {
            user,
            domain,
            password,
        }
    }

    /// NTOWFv2: HMAC-MD5 keyed by the password's MD4, over UPPER(user) + domain.
    fn response_key(&self) -> [u8; 16] {
        let nt_hash = md4::Md4::digest(utf16le(self.password.expose()));
        let mut mac = hmac_md5(&nt_hash);
        mac.update(&utf16le(&self.user.to_uppercase()));
        mac.update(&utf16le(&self.domain));
        mac.finalize().into_bytes().into()
    }
}

/// The first message: which features the client speaks.
pub(super) fn negotiate_message() -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&CLIENT_FLAGS.to_le_bytes());
    // Empty domain and workstation fields: length, capacity, offset.
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&[0; 8]);
    m
}

/// The parts of the server's CHALLENGE message the answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Challenge {
    pub flags: u32,
    pub server_challenge: [u8; 8],
    pub target_info: Vec<u8>,
}

/// Whether `msg` is an NTLM message at all (a SPNEGO token is not).
pub(super) fn is_ntlm(msg: &[u8]) -> bool {
    msg.starts_with(SIGNATURE)
}

pub(super) fn parse_challenge(msg: &[u8]) -> Result<Challenge, NtlmError> {
    if !is_ntlm(msg) || read_u32(msg, 8) != Some(2) {
        return Err(NtlmError::Malformed);
    }
    let flags = read_u32(msg, 20).ok_or(NtlmError::Malformed)?;
    let server_challenge: [u8; 8] = msg
        .get(24..32)
        .and_then(|s| s.try_into().ok())
        .ok_or(NtlmError::Malformed)?;
    let target_info = if flags & NEGOTIATE_TARGET_INFO != 0 {
        field(msg, 40).ok_or(NtlmError::Malformed)?.to_vec()
    } else {
        Vec::new()
    };
    if target_info.is_empty() {
        return Err(NtlmError::NoNtlmV2);
    }
    Ok(Challenge {
        flags,
        server_challenge,
        target_info,
    })
}

/// The AUTHENTICATE message answering `challenge` as `account`, with a fresh
/// client challenge and the current time (the server's own when it sent one).
pub(super) fn authenticate_message(
    account: &NtlmAccount,
    challenge: &Challenge,
    workstation: &str,
) -> Vec<u8> {
    let client_challenge: [u8; 8] = rand::random();
    let server_time = av_pair(&challenge.target_info, AV_TIMESTAMP)
        .and_then(|t| <[u8; 8]>::try_from(t).ok())
        .map(u64::from_le_bytes);
    let time = server_time.unwrap_or_else(filetime_now);
    let key = account.response_key();
    let nt = ntlmv2_response(&key, challenge, &client_challenge, time);
    // With a server timestamp, MS-NLMP 3.1.5.1.2 wants no LMv2 response: zeros.
    let lm = if server_time.is_some() {
        vec![0; 24]
    } else {
        lmv2_response(&key, &challenge.server_challenge, &client_challenge)
    };
    let flags = (CLIENT_FLAGS & challenge.flags) | NEGOTIATE_UNICODE | NEGOTIATE_NTLM;
    let domain = utf16le(&account.domain);
    let user = utf16le(&account.user);
    let host = utf16le(workstation);

    const HEADER: usize = 64;
    let mut m = Vec::with_capacity(HEADER + lm.len() + nt.len() + domain.len() + user.len());
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&3u32.to_le_bytes());
    let mut payload = Vec::new();
    let mut put = |m: &mut Vec<u8>, bytes: &[u8]| {
        let offset = HEADER + payload.len();
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
        payload.extend_from_slice(bytes);
    };
    put(&mut m, &lm);
    put(&mut m, &nt);
    put(&mut m, &domain);
    put(&mut m, &user);
    put(&mut m, &host);
    put(&mut m, &[]); // no session key exchange
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&payload);
    m
}

/// NTProofStr followed by the blob it proves (MS-NLMP 3.3.2).
fn ntlmv2_response(
    key: &[u8; 16],
    challenge: &Challenge,
    client_challenge: &[u8; 8],
    time: u64,
) -> Vec<u8> {
    let mut blob = Vec::with_capacity(32 + challenge.target_info.len());
    blob.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    blob.extend_from_slice(&time.to_le_bytes());
    blob.extend_from_slice(client_challenge);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(&challenge.target_info);
    blob.extend_from_slice(&[0; 4]);
    let mut mac = hmac_md5(key);
    mac.update(&challenge.server_challenge);
    mac.update(&blob);
    let proof = mac.finalize().into_bytes();
    let mut out = proof.to_vec();
    out.extend_from_slice(&blob);
    out
}

fn lmv2_response(
    key: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> Vec<u8> {
    let mut mac = hmac_md5(key);
    mac.update(server_challenge);
    mac.update(client_challenge);
    let mut out = mac.finalize().into_bytes().to_vec();
    out.extend_from_slice(client_challenge);
    out
}

fn hmac_md5(key: &[u8]) -> HmacMd5 {
    // HMAC takes keys of any length: this never fails.
    <HmacMd5 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| HmacMd5::new(&Default::default()))
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Windows FILETIME: 100 ns ticks since 1601-01-01.
fn filetime_now() -> u64 {
    const EPOCH_DIFF_SECS: u64 = 11_644_473_600;
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (since_unix.as_secs() + EPOCH_DIFF_SECS) * 10_000_000
        + u64::from(since_unix.subsec_nanos() / 100)
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A (length, capacity, offset) field of a message, as the bytes it points at.
fn field(msg: &[u8], at: usize) -> Option<&[u8]> {
    let len = usize::from(read_u16(msg, at)?);
    let offset = usize::try_from(read_u32(msg, at + 4)?).ok()?;
    msg.get(offset..offset.checked_add(len)?)
}

/// The value of AV pair `id` in a target info list.
fn av_pair(mut info: &[u8], id: u16) -> Option<&[u8]> {
    while let (Some(kind), Some(len)) = (read_u16(info, 0), read_u16(info, 2)) {
        if kind == AV_EOL {
            return None;
        }
        let value = info.get(4..4 + usize::from(len))?;
        if kind == id {
            return Some(value);
        }
        info = &info[4 + usize::from(len)..];
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// MS-NLMP 4.2.4: user "User", domain "Domain", password "Password".
    fn spec_account() -> NtlmAccount {
        NtlmAccount::new("Domain\\User", Secret::new("Password"))
    }

    pub(in crate::outbound::egress) fn spec_challenge() -> Challenge {
        // MsvAvNbDomainName "Domain", MsvAvNbComputerName "Server", MsvAvEOL.
        let mut info = vec![2, 0, 12, 0];
        info.extend(utf16le("Domain"));
        info.extend([1, 0, 12, 0]);
        info.extend(utf16le("Server"));
        info.extend([0, 0, 0, 0]);
        Challenge {
            flags: 0xe28a_8233,
            server_challenge: hex("0123456789abcdef").try_into().unwrap(),
            target_info: info,
        }
    }

    /// The type-2 (CHALLENGE) message a proxy would send for `c`.
    pub(in crate::outbound::egress) fn challenge_message(c: &Challenge) -> Vec<u8> {
        let mut msg = SIGNATURE.to_vec();
        msg.extend(2u32.to_le_bytes());
        msg.extend([0; 8]); // target name
        msg.extend((c.flags | NEGOTIATE_TARGET_INFO).to_le_bytes());
        msg.extend(c.server_challenge);
        msg.extend([0; 8]);
        let len = c.target_info.len() as u16;
        msg.extend(len.to_le_bytes());
        msg.extend(len.to_le_bytes());
        msg.extend(48u32.to_le_bytes());
        msg.extend(&c.target_info);
        msg
    }

    #[test]
    fn md4_and_hmac_md5_match_their_rfcs() {
        assert_eq!(
            md4::Md4::digest(b"abc").to_vec(),
            hex("a448017aaf21d8525fc10ae87aa6729d")
        );
        let mut mac = hmac_md5(b"Jefe");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            mac.finalize().into_bytes().to_vec(),
            hex("750c783e6ab0b503eaa86e310a5db738")
        );
    }

    #[test]
    fn ntlmv2_matches_the_specification_example() {
        let key = spec_account().response_key();
        assert_eq!(key.to_vec(), hex("0c868a403bfd7a93a3001ef22ef02e3f"));
        let client = [0xaa; 8];
        let resp = ntlmv2_response(&key, &spec_challenge(), &client, 0);
        assert_eq!(resp[..16].to_vec(), hex("68cd0ab851e51c96aabc927bebef6a1c"));
        let lm = lmv2_response(&key, &spec_challenge().server_challenge, &client);
        assert_eq!(lm, hex("86c35097ac9cec102554764a57cccc19 aaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn upn_and_bare_names_have_no_domain() {
        let upn = NtlmAccount::new("svc@corp.example", Secret::new("x"));
        assert_eq!(
            (upn.user.as_str(), upn.domain.as_str()),
            ("svc@corp.example", "")
        );
        let bare = NtlmAccount::new("svc", Secret::new("x"));
        assert_eq!((bare.user.as_str(), bare.domain.as_str()), ("svc", ""));
    }

    #[test]
    fn a_challenge_round_trips_and_the_answer_names_the_account() {
        let c = spec_challenge();
        let parsed = parse_challenge(&challenge_message(&c)).unwrap();
        assert_eq!(parsed.server_challenge, c.server_challenge);
        assert_eq!(parsed.target_info, c.target_info);

        let auth = authenticate_message(&spec_account(), &parsed, "WS");
        assert_eq!(read_u32(&auth, 8), Some(3));
        assert_eq!(field(&auth, 28).unwrap(), utf16le("Domain"));
        assert_eq!(field(&auth, 36).unwrap(), utf16le("User"));
        // NTProofStr, then the blob carrying the server's target info.
        let nt = field(&auth, 20).unwrap();
        assert!(nt[16..]
            .windows(c.target_info.len())
            .any(|w| w == c.target_info));
        assert!(!auth.windows(16).any(|w| w == utf16le("Password")));
    }

    #[test]
    fn garbage_challenges_are_refused_without_panicking() {
        let mut msg = SIGNATURE.to_vec();
        msg.extend(2u32.to_le_bytes());
        for cut in 0..msg.len() {
            assert!(parse_challenge(&msg[..cut]).is_err());
        }
        msg.extend([0xff; 40]);
        assert!(parse_challenge(&msg).is_err());
        assert_eq!(av_pair(&[7, 0, 0xff, 0xff], AV_TIMESTAMP), None);
        assert!(!format!("{:?}", spec_account()).contains("Password"));
    }
}
