//! TLS configuration for outbound connections (upstreams, token endpoints) and the
//! caller-facing listener. One rustls crypto provider (ring) everywhere.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The OS trust store for the webpki fallback, loaded once per process (it can
/// take tens of milliseconds).
fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let res = rustls_native_certs::load_native_certs();
        for e in &res.errors {
            tracing::warn!(error = %e, "some OS trust roots could not be loaded");
        }
        res.certs
    })
}

/// The OS trust roots (read once) and `extra`.
fn os_roots_and(extra: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native_roots().iter().cloned());
    for cert in extra {
        roots.add(cert)?;
    }
    Ok(roots)
}

pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |reason: String| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err("no PEM certificate found".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A client config that verifies through the operating system's verifier (on
/// Windows the certificate store with its enterprise and TLS-inspection roots,
/// revocation as Windows checks it; elsewhere webpki over the system's CA bundle,
/// read once per process), trusting
/// `extra_ca` too, presenting `client` (cert, key) when set, offering h2 and
/// http/1.1 by ALPN when `h2` is true.
pub fn client_config(
    extra_ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
    h2: bool,
) -> Result<ClientConfig, TlsError> {
    let extra = match extra_ca {
        Some(ca) => load_certs(ca, "CA certificate")?,
        None => Vec::new(),
    };
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    #[cfg(windows)]
    let builder = match rustls_platform_verifier::Verifier::new_with_extra_roots(
        extra.iter().cloned(),
        provider(),
    ) {
        Ok(verifier) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier)),
        // Extra roots on Windows need a chain engine with an exclusive root
        // store (Windows 8 and later); where that is missing (e.g. Wine), the
        // OS store's roots plus the extra ones are verified by webpki instead.
        Err(e) => {
            tracing::warn!(error = %e, "the OS verifier cannot take extra roots here; verifying with the OS roots and `ca` through webpki");
            builder.with_root_certificates(os_roots_and(extra)?)
        }
    };
    // Elsewhere the OS verifier is webpki over the system's CA bundle, which it
    // would read again for every config: the bundle read once is the same trust.
    #[cfg(not(windows))]
    let builder = builder.with_root_certificates(os_roots_and(extra)?);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert, "client certificate")?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    // ALPN (h2, http/1.1) is set by the connector that uses this config.
    let _ = h2;
    Ok(cfg)
}

/// The caller-facing listener's config: our certificate, h2 and http/1.1 by ALPN,
/// and with `client_ca` a verifier that requires a caller certificate signed by it
/// (a caller without one fails the handshake).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca, "client CA certificate")? {
                roots.add(c)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(load_certs(cert, "TLS certificate")?, load_key(key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The DNS names (subject alternative names) of a verified caller certificate.
/// Only called after the handshake, so the chain has already been verified.
pub fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(ee) => {
            let mut names: Vec<String> = ee.valid_dns_names().map(str::to_owned).collect();
            names.extend(common_names(ee.subject()));
            names
        }
        Err(_) => Vec::new(),
    }
}

/// One DER element at the start of `der`: (tag, contents, rest). Short and long
/// length forms; anything malformed ends the walk.
pub(crate) fn der_next(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The commonName attributes (OID 2.5.4.3) of a subject Name's contents (the
/// SEQUENCE OF RelativeDistinguishedName without its outer tag).
fn common_names(mut subject: &[u8]) -> Vec<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut out = Vec::new();
    while let Some((_set, mut rdn, rest)) = der_next(subject) {
        subject = rest;
        while let Some((_seq, atv, more)) = der_next(rdn) {
            rdn = more;
            let Some((0x06, oid, value)) = der_next(atv) else {
                continue;
            };
            // UTF8String, PrintableString, IA5String.
            if let (true, Some((0x0c | 0x13 | 0x16, v, _))) = (oid == CN, der_next(value)) {
                if let Ok(s) = std::str::from_utf8(v) {
                    out.push(s.to_owned());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_from_a_subject_and_garbage_is_harmless() {
        // SET { SEQ { OID 2.5.4.3, UTF8String "svc" } }, then SET { SEQ { OID 2.5.4.10, "org" } }
        let subject = [
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b's', b'v', b'c',
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x03, b'o', b'r', b'g',
        ];
        assert_eq!(common_names(&subject), ["svc"]);
        for cut in 0..subject.len() {
            let _ = common_names(&subject[..cut]);
        }
        assert!(common_names(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(peer_names(None).is_empty());
    }
}
