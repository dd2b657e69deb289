//! The SPNEGO envelope (RFC 4178) around NTLM, for a proxy that offers only
//! `Negotiate` to a client without Kerberos (off Windows): the first token is a
//! NegTokenInit naming NTLM alone and carrying its NEGOTIATE message, each later
//! one a NegTokenResp. Just the DER this needs, nothing general.

use crate::tls::der_next;

/// SPNEGO's OID 1.3.6.1.5.5.2.
const SPNEGO_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
/// NTLMSSP's OID 1.3.6.1.4.1.311.2.2.10.
const NTLM_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a];

fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    out.push(tag);
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

/// `[APPLICATION 0] { SPNEGO OID, [0] NegTokenInit { [0] mechTypes { NTLM },
/// [2] mechToken } }`.
pub(super) fn init(ntlm_negotiate: &[u8]) -> Vec<u8> {
    let mech_types = tlv(0xa0, &tlv(0x30, &tlv(0x06, NTLM_OID)));
    let mech_token = tlv(0xa2, &tlv(0x04, ntlm_negotiate));
    let neg_token_init = tlv(0xa0, &tlv(0x30, &[mech_types, mech_token].concat()));
    tlv(0x60, &[tlv(0x06, SPNEGO_OID), neg_token_init].concat())
}

/// `[1] NegTokenResp { [2] responseToken }`.
pub(super) fn response(ntlm_authenticate: &[u8]) -> Vec<u8> {
    tlv(0xa1, &tlv(0x30, &tlv(0xa2, &tlv(0x04, ntlm_authenticate))))
}

/// The mechanism token inside a server's NegTokenResp, if it carries one.
pub(super) fn response_token(token: &[u8]) -> Option<&[u8]> {
    let (0xa1, resp, _) = der_next(token)? else {
        return None;
    };
    let (0x30, mut fields, _) = der_next(resp)? else {
        return None;
    };
    while let Some((tag, value, rest)) = der_next(fields) {
        if tag == 0xa2 {
            let (0x04, inner, _) = der_next(value)? else {
                return None;
            };
            return Some(inner);
        }
        fields = rest;
    }
    None
}

/// Whether a NegTokenResp says `reject` (negState 2).
pub(super) fn rejected(token: &[u8]) -> bool {
    let Some((0xa1, resp, _)) = der_next(token) else {
        return false;
    };
    let Some((0x30, fields, _)) = der_next(resp) else {
        return false;
    };
    matches!(der_next(fields), Some((0xa0, state, _)) if state == [0x0a, 0x01, 0x02])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn init_wraps_the_token_and_names_ntlm() {
        let t = init(b"NTLMSSP\0abc");
        assert_eq!(t[0], 0x60);
        assert!(t.windows(NTLM_OID.len()).any(|w| w == NTLM_OID));
        assert!(t.ends_with(b"NTLMSSP\0abc"));
        let (_, body, rest) = der_next(&t).unwrap();
        assert!(rest.is_empty());
        assert_eq!(body.len() + 2, t.len());
    }

    #[test]
    fn a_response_round_trips_also_with_long_lengths() {
        let long = vec![7u8; 300];
        assert_eq!(response_token(&response(&long)).unwrap(), &long[..]);
        assert_eq!(response_token(&response(b"x")).unwrap(), b"x");
        // accept-incomplete, supportedMech NTLM, responseToken
        let mut fields = tlv(0xa0, &[0x0a, 0x01, 0x01]);
        fields.extend(tlv(0xa1, &tlv(0x06, NTLM_OID)));
        fields.extend(tlv(0xa2, &tlv(0x04, b"challenge")));
        let server = tlv(0xa1, &tlv(0x30, &fields));
        assert_eq!(response_token(&server).unwrap(), b"challenge");
        assert!(!rejected(&server));
        let reject = tlv(0xa1, &tlv(0x30, &tlv(0xa0, &[0x0a, 0x01, 0x02])));
        assert!(rejected(&reject));
        assert_eq!(response_token(&reject), None);
        for cut in 0..server.len() {
            let _ = response_token(&server[..cut]);
        }
    }
}
