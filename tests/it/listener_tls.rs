//! TLS for callers: the listener offers HTTP/1.1 and h2 by ALPN, a stalled
//! handshake is cut at the header timeout, and caller certificates identify
//! callers and are required when `listen.client_ca` is set.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::pki::{ca, leaf, leaf_cn, Ca, Leaf};
use crate::support::{MockUpstream, TestGateway};

/// Writes the CA and the gateway's certificate; returns the `[listen]` section.
fn tls_listen(dir: &Path, ca: &Ca, with_client_ca: bool) -> String {
    let server = leaf(ca, &["localhost"], false);
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    std::fs::write(dir.join("gw.pem"), &server.pem).unwrap();
    std::fs::write(dir.join("gw-key.pem"), &server.key_pem).unwrap();
    let d = dir.display();
    let client_ca = if with_client_ca {
        format!("client_ca = \"{d}/ca.pem\"\n")
    } else {
        String::new()
    };
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ntls_cert = \"{d}/gw.pem\"\ntls_key = \"{d}/gw-key.pem\"\n{client_ca}"
    )
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One GET over TLS, offering only `alpn`; answers status, version and body.
async fn tls_get(
    addr: SocketAddr,
    ca: &Ca,
    client: Option<&Leaf>,
    alpn: &[u8],
    path: &str,
) -> Result<(StatusCode, Version, Bytes), BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone())?;
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some(l) => {
            let (c, k) = l.identity();
            b.with_client_auth_cert(c, k)?
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let io = TokioIo::new(tls);
    let resp = if alpn == b"h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://localhost{path}")).body(Empty::<Bytes>::new())?;
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())?;
        send.send_request(req).await?
    };
    let status = resp.status();
    let version = resp.version();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, version, body))
}

fn json(b: &Bytes) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2_by_alpn() {
    let up = MockUpstream::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = ca("test CA");
    let toml = format!(
        "{}\n[[routes]]\nprefix = \"/open\"\nupstream = \"{}\"\n",
        tls_listen(pki.path(), &ca, false),
        up.url()
    );
    let gw = TestGateway::start(&toml).await;

    let (status, version, _) = tls_get(gw.addr, &ca, None, b"http/1.1", "/open/a")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(up.last().uri, "/a");

    let (status, version, _) = tls_get(gw.addr, &ca, None, b"h2", "/open/b").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(up.last().uri, "/b");

    // Plaintext on a TLS listener gets nowhere near the upstream.
    let before = up.count();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /open/c HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    assert_eq!(up.count(), before);
}

#[tokio::test]
async fn stalled_tls_handshake_is_cut_at_the_header_timeout() {
    let up = MockUpstream::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = ca("test CA");
    let toml = format!(
        "{}header_timeout = \"300ms\"\n\n[[routes]]\nprefix = \"/open\"\nupstream = \"{}\"\n",
        tls_listen(pki.path(), &ca, false),
        up.url()
    );
    let gw = TestGateway::start(&toml).await;
    let started = tokio::time::Instant::now();
    // Half a ClientHello record header, then nothing.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed at the timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    // Meanwhile the listener still serves.
    let (status, _, _) = tls_get(gw.addr, &ca, None, b"h2", "/open/x").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn caller_certificates_identify_and_are_required() {
    let up = MockUpstream::start().await;
    let pki = tempfile::tempdir().unwrap();
    let ca = ca("internal CA");
    let toml = format!(
        r#"{listen}
[callers.billing]
cert_names = ["billing.svc"]

[callers.reports]
cert_names = ["reports.svc"]

[callers.legacy]
cert_names = ["legacy-client"]

[[routes]]
prefix = "/open"
upstream = "{u}"
allow = ["billing", "legacy"]
"#,
        listen = tls_listen(pki.path(), &ca, true),
        u = up.url()
    );
    let gw = TestGateway::start(&toml).await;

    let billing = leaf(&ca, &["billing.svc"], true);
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let (status, _, body) = tls_get(gw.addr, &ca, Some(&billing), alpn, "/open/x")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
    }
    assert_eq!(up.count(), 2);

    // A name only in the subject's CN (no SAN) identifies too.
    let legacy = leaf_cn(&ca, &[], Some("legacy-client"), true);
    let (status, _, body) = tls_get(gw.addr, &ca, Some(&legacy), b"http/1.1", "/open/x")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(up.count(), 3);

    // A defined caller that the route does not allow.
    let reports = leaf(&ca, &["reports.svc"], true);
    let (status, _, body) = tls_get(gw.addr, &ca, Some(&reports), b"http/1.1", "/open/x")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json(&body)["error"], "caller_forbidden");

    // A valid certificate with a name no caller has.
    let stranger = leaf(&ca, &["stranger.svc"], true);
    let (status, _, body) = tls_get(gw.addr, &ca, Some(&stranger), b"http/1.1", "/open/x")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json(&body)["error"], "caller_forbidden");

    // No certificate, or one from another CA: the handshake is refused.
    assert!(tls_get(gw.addr, &ca, None, b"http/1.1", "/open/x")
        .await
        .is_err());
    let other_ca = self::ca("other CA");
    let forged = leaf(&other_ca, &["billing.svc"], true);
    assert!(tls_get(gw.addr, &ca, Some(&forged), b"http/1.1", "/open/x")
        .await
        .is_err());
    assert_eq!(up.count(), 3, "refused callers never reach the upstream");
}
