//! The security boundary: TLS and caller certificates, caller
//! identification and ACLs, the broker API, limits, smuggling shapes, audit, leaks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::pki::{ca, leaf, leaf_cn, Ca, Leaf};
use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

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

// ---------------------------------------------------------------- TLS

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

// ---------------------------------------------------------------- callers and ACLs

const BILLING_KEY: &str = "sec-billing-key-5b1d0e9c";

fn caller_config(up: &MockUpstream) -> String {
    std::env::set_var("SEC_BILLING_KEY", BILLING_KEY);
    format!(
        r#"
[callers.local]
addrs = ["127.0.0.1/32"]
key_env = "SEC_BILLING_KEY"

[callers.remote]
addrs = ["10.0.0.0/8"]

[callers.local_open]
addrs = ["127.0.0.1/32"]

[[routes]]
prefix = "/keyed"
upstream = "{u}"
allow = ["local"]

[[routes]]
prefix = "/any"
upstream = "{u}"

[[routes]]
prefix = "/remote-only"
upstream = "{u}"
allow = ["remote"]
"#,
        u = up.url()
    )
}

#[tokio::test]
async fn callers_by_address_and_key_and_route_acl() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&caller_config(&up)).await;
    let c = Client::new();

    // Right key from an allowed network: identified as `local`, allowed.
    let r = c
        .send(
            Method::GET,
            &gw.url("/keyed/a"),
            &[
                ("x-authgate-key", BILLING_KEY),
                ("authorization", "Bearer caller-own-credential"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.last();
    assert!(seen.headers.get("x-authgate-key").is_none());
    assert!(seen.headers.get("authorization").is_none());
    let raw = format!("{:?}", seen.headers);
    assert!(!raw.contains(BILLING_KEY) && !raw.contains("caller-own-credential"));

    // Wrong key: falls through to `local_open` (address only), not allowed here.
    let before = up.count();
    for key in [Some("wrong-key"), None] {
        let h: Vec<(&str, &str)> = key.map(|k| ("x-authgate-key", k)).into_iter().collect();
        let r = c
            .send(Method::GET, &gw.url("/keyed/a"), &h, Bytes::new())
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "key {key:?}");
        assert_eq!(r.json()["error"], "caller_forbidden");
        assert!(!r.text().contains("wrong-key"));
    }
    assert_eq!(up.count(), before);

    // A route open to every identified caller.
    let r = c.get(&gw.url("/any/b")).await;
    assert_eq!(r.status, StatusCode::OK);

    // Only 10.0.0.0/8 allowed: a loopback caller is refused.
    let r = c.get(&gw.url("/remote-only/c")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert_eq!(up.count(), before + 1);
}

#[tokio::test]
async fn unidentified_caller_is_forbidden() {
    let up = MockUpstream::start().await;
    let toml = format!(
        r#"
[callers.remote]
addrs = ["10.0.0.0/8"]

[[routes]]
prefix = "/any"
upstream = "{u}"
"#,
        u = up.url()
    );
    let gw = TestGateway::start(&toml).await;
    let r = Client::new().get(&gw.url("/any/x")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert_eq!(up.count(), 0);
}

// ---------------------------------------------------------------- broker API

const BROKER_SECRET: &str = "sec-broker-client-secret-77a1";

fn broker_config(idp: &MockIdp, up: &MockUpstream, audit: &Path) -> String {
    std::env::set_var("SEC_BROKER_SECRET", BROKER_SECRET);
    std::env::set_var("SEC_REPORTS_KEY", "sec-reports-key-0f3e");
    format!(
        r#"
[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "broker-test"
client_secret_env = "SEC_BROKER_SECRET"
expose_to = ["reports"]

[providers.erp]
grant = "client_credentials"
token_url = "{idp}"
client_id = "broker-test-2"
client_secret_env = "SEC_BROKER_SECRET"

[callers.reports]
key_env = "SEC_REPORTS_KEY"

[callers.billing]
addrs = ["127.0.0.1/32"]

[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"

[audit]
file = "{audit}"
"#,
        audit = audit.display(),
        idp = idp.token_url(),
        up = up.url()
    )
}

#[tokio::test]
async fn broker_api_hands_out_to_exposed_callers_only() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    // Outside the gateway's folder, which goes away with it.
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let gw = TestGateway::start(&broker_config(&idp, &up, &audit_path)).await;
    gw.ready().await;
    let c = Client::new();
    let reports = [("x-authgate-key", "sec-reports-key-0f3e")];

    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &reports,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    let token = j["access_token"].as_str().unwrap().to_owned();
    assert!(idp.is_valid(&token));
    assert_eq!(j["token_type"], "Bearer");
    assert!(j["expires_in"].as_u64().is_some());
    let mut keys: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["access_token", "expires_in", "token_type"]);

    // Another identified caller: refused.
    let r = c.get(&gw.url("/.authgate/token/crm")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert!(!r.text().contains(&token));

    // A provider without expose_to: refused to everyone.
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/erp"),
            &reports,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // A burst: cell reads only, no token request.
    let before = idp.requests();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = c.clone();
        let url = gw.url("/.authgate/token/crm");
        tasks.push(tokio::spawn(async move {
            c.send(
                Method::GET,
                &url,
                &[("x-authgate-key", "sec-reports-key-0f3e")],
                Bytes::new(),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(idp.requests(), before);

    gw.stop().await;
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let handouts: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "token_handout")
        .collect();
    assert_eq!(
        handouts
            .iter()
            .filter(|v| v["status"] == 200 && v["caller"] == "reports")
            .count(),
        201
    );
    assert_eq!(handouts.iter().filter(|v| v["status"] == 403).count(), 2);
    assert!(!audit.contains(&token));
}

// ---------------------------------------------------------------- raw sockets

/// A response read off a raw socket.
#[derive(Debug)]
struct RawReply {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The server closed the connection after this response.
    closed: bool,
}

impl RawReply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (content-length framed, or up to EOF). `None` when the
/// server closed without answering.
async fn read_reply(s: &mut TcpStream) -> Option<RawReply> {
    let deadline = tokio::time::Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let len = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
        let mut body = buf[head_end..].to_vec();
        let mut closed = false;
        loop {
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        if !closed && head.to_ascii_lowercase().contains("connection: close") {
            closed = matches!(s.read(&mut chunk).await, Ok(0) | Err(_));
        }
        Some(RawReply {
            status,
            head,
            body,
            closed,
        })
    })
    .await
    .expect("no answer within 10 s")
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<RawReply> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_reply(&mut s).await
}

// ---------------------------------------------------------------- limits

fn limits_config(up: &MockUpstream, idp: &MockIdp) -> String {
    limits_config2(up, up, idp)
}

fn limits_config2(up: &MockUpstream, up_crm: &MockUpstream, idp: &MockIdp) -> String {
    std::env::set_var("SEC_LIMITS_SECRET", "sec-limits-secret");
    format!(
        r#"
[listen]
addr = "127.0.0.1:0"
max_body = "1KiB"
max_header_size = "4KiB"
max_headers = 20
header_timeout = "400ms"
idle_timeout = "400ms"

[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "limits"
client_secret_env = "SEC_LIMITS_SECRET"

[[routes]]
prefix = "/open"
upstream = "{u}"

[[routes]]
prefix = "/crm"
upstream = "{c}"
provider = "crm"
"#,
        u = up.url(),
        c = up_crm.url(),
        idp = idp.token_url()
    )
}

#[tokio::test]
async fn body_over_max_body_is_413_declared_or_chunked() {
    let idp = MockIdp::start().await;
    let open = MockUpstream::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&limits_config2(&open, &up, &idp)).await;
    gw.ready().await;
    let c = Client::new();

    for prefix in ["/open", "/crm"] {
        let r = c
            .send(
                Method::POST,
                &gw.url(&format!("{prefix}/x")),
                &[],
                vec![b'a'; 2000],
            )
            .await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{prefix}");
        assert_eq!(r.json()["error"], "body_too_large");

        // Within the limit: served.
        let r = c
            .send(
                Method::POST,
                &gw.url(&format!("{prefix}/x")),
                &[],
                vec![b'a'; 1000],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{prefix}");

        // Chunked, no declared length, growing past the limit: the streaming path
        // (`/open`, no replay) and the buffering one (`/crm`, replay kept).
        let chunk = format!("{:x}\r\n{}\r\n", 600, "b".repeat(600));
        let req = format!(
            "POST {prefix}/y HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
        );
        let r = raw(gw.addr, req.as_bytes()).await.expect("an answer");
        assert_eq!(r.status, 413, "{prefix}: {}", r.head);
        assert_eq!(r.json()["error"], "body_too_large");
    }
    // No upstream ever received a whole over-limit body.
    assert!(up.seen().iter().all(|s| s.body.len() <= 1024));
    assert!(open.seen().iter().all(|s| s.body.len() <= 1024));
}

#[tokio::test]
async fn too_large_or_too_many_headers_are_431() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&limits_config(&up, &idp)).await;

    let big = format!(
        "GET /open/x HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n",
        "a".repeat(8 << 10)
    );
    // Past hyper's read buffer: hyper's own 431, as the contract's JSON.
    let r = raw(gw.addr, big.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"], "headers_too_large");
    assert!(r.head.contains("application/json"), "{}", r.head);
    assert!(r.closed);
    // Just over the limit: the contract's JSON body.
    let over = format!(
        "GET /open/x HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n",
        "a".repeat(5 << 10)
    );
    let r = raw(gw.addr, over.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"], "headers_too_large");

    let mut many = String::from("GET /open/x HTTP/1.1\r\nhost: gw\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(gw.addr, many.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"], "headers_too_large");
    let mut lots = String::from("GET /open/x HTTP/1.1\r\nhost: gw\r\n");
    for i in 0..200 {
        lots.push_str(&format!("x-h{i}: v\r\n"));
    }
    lots.push_str("\r\n");
    let r = raw(gw.addr, lots.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"], "headers_too_large");
    assert_eq!(up.count(), 0);

    // Within both limits: served.
    let r = raw(gw.addr, b"GET /open/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// hyper answers a head it cannot parse itself, with a bare status; the caller
/// gets the contract's JSON error instead, and the connection closes.
#[tokio::test]
async fn malformed_heads_get_the_contracts_400() {
    let (up, gw) = open_gateway("").await;
    for bad in [
        &b"GET /open/x HTTP/1.1\r\nhost: gw\r\nno colon here\r\n\r\n"[..],
        b"G@T /open/x HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /open/x HTTP/9.9\r\nhost: gw\r\n\r\n",
    ] {
        let r = raw(gw.addr, bad).await.expect("an answer");
        let shown = String::from_utf8_lossy(bad);
        assert_eq!(r.status, 400, "{shown}: {}", r.head);
        assert_eq!(r.json()["error"], "bad_request", "{shown}");
        assert!(r.json()["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()));
        assert!(r.closed, "{shown}");
    }
    // A good request on a fresh connection is still served.
    let r = raw(gw.addr, b"GET /open/x HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
}

/// A request line longer than hyper takes (its own 414) is a head over the size
/// limit: the contract's 431.
#[tokio::test]
async fn an_overlong_request_line_gets_the_contracts_431() {
    let (up, gw) = open_gateway("").await;
    let line = format!(
        "GET /open/{} HTTP/1.1\r\nhost: gw\r\n\r\n",
        "a".repeat(70_000)
    );
    let r = raw(gw.addr, line.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"], "headers_too_large");
    assert!(r.closed);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn slow_headers_get_408_while_others_are_served() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&limits_config(&up, &idp)).await;

    // A head that starts and stops.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /open/x HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    let r = read_reply(&mut s).await.expect("a 408");
    assert_eq!(r.status, 408, "{}", r.head);
    assert_eq!(r.json()["error"], "request_timeout");
    assert!(r.head.contains("application/json"));
    assert!(r.closed);

    // Slowloris: a byte at a time, each well within any per-read timeout.
    let addr = gw.addr;
    let loris = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /open/x HTTP/1.1\r\nhost: gw\r\nx-slow: {}\r\n\r\n",
            "z".repeat(200)
        );
        for b in head.as_bytes() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        (read_reply(&mut s).await, started.elapsed())
    });
    // Meanwhile a normal caller is served, repeatedly.
    let c = Client::new();
    for _ in 0..5 {
        assert_eq!(c.get(&gw.url("/open/ok")).await.status, StatusCode::OK);
    }
    let (reply, took) = loris.await.unwrap();
    let reply = reply.expect("the slow caller is answered 408");
    assert_eq!(reply.status, 408);
    assert!(
        took < std::time::Duration::from_secs(4),
        "cut at the timeout, not after the whole head: {took:?}"
    );
    assert!(up.seen().iter().all(|s| s.uri == "/ok"));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&limits_config(&up, &idp)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /open/x HTTP/1.1\r\nhost: gw\r\n\r\n")
            .await
            .unwrap();
        let r = read_reply(&mut s).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.closed);
    }
    // A slow answer (longer than the idle timeout) is not idleness.
    s.write_all(b"GET /open/slow/900 HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let r = read_reply(&mut s).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.closed);
    // Then silence: the gateway closes without a response (no request was begun).
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("idle connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
}

// ---------------------------------------------------------------- smuggling

/// An upstream on a raw socket that records every request byte for byte. It frames
/// requests strictly (CRLF, one content-length or chunked) and answers `200 ok`.
#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let st = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(req) = Self::one(&mut s, &mut buf).await {
                        st.lock().unwrap().push(req);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, seen }
    }

    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Option<()> {
        let mut chunk = [0u8; 4096];
        while buf.len() < want {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        Some(())
    }

    async fn until(s: &mut TcpStream, buf: &mut Vec<u8>, from: usize, pat: &[u8]) -> Option<usize> {
        loop {
            if let Some(i) = buf[from..].windows(pat.len()).position(|w| w == pat) {
                return Some(from + i + pat.len());
            }
            let want = buf.len() + 1;
            Self::fill(s, buf, want).await?;
        }
    }

    /// One request off the connection, exactly as it arrived.
    async fn one(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let head_end = Self::until(s, buf, 0, b"\r\n\r\n").await?;
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let cl = head.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        });
        let end = if head.contains("\r\ntransfer-encoding: chunked\r\n") {
            let mut at = head_end;
            loop {
                let line_end = Self::until(s, buf, at, b"\r\n").await?;
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&buf[at..line_end - 2]).trim(),
                    16,
                )
                .unwrap();
                if size == 0 {
                    break Self::until(s, buf, line_end, b"\r\n").await?;
                }
                Self::fill(s, buf, line_end + size + 2).await?;
                at = line_end + size + 2;
            }
        } else {
            let end = head_end + cl.unwrap_or(0);
            Self::fill(s, buf, end).await?;
            end
        };
        let req = buf[..end].to_vec();
        buf.drain(..end);
        Some(req)
    }

    fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

async fn smuggling_setup() -> (RawUpstream, TestGateway) {
    let up = RawUpstream::start().await;
    let toml = format!(
        "[[routes]]\nprefix = \"/raw\"\nupstream = \"http://{}\"\n",
        up.addr
    );
    (up.clone(), TestGateway::start(&toml).await)
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused() {
    let (up, gw) = smuggling_setup().await;
    let self_uri = format!("http://{}/raw/x", gw.addr);
    let shapes: Vec<(&str, String)> = vec![
        ("duplicate cl", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".into()),
        ("cl list", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 5, 6\r\n\r\nhello!".into()),
        ("plus cl", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ncontent-length: +5\r\n\r\nhello".into()),
        ("negative cl", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ncontent-length: -1\r\n\r\nhello".into()),
        ("obs-fold", "GET /raw/x HTTP/1.1\r\nhost: gw\r\nx-a: 1\r\n  folded\r\n\r\n".into()),
        ("te chunked, chunked", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ("te gzip, chunked", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ("te twice", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ("te identity", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: identity\r\n\r\nhello".into()),
        ("te xchunked", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        ("header without colon", "GET /raw/x HTTP/1.1\r\nhost: gw\r\nx-bad\r\n\r\n".into()),
        ("space before colon", "GET /raw/x HTTP/1.1\r\nhost: gw\r\nx-a : 1\r\n\r\n".into()),
        ("space before colon te", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding : chunked\r\ncontent-length: 5\r\n\r\nhello".into()),
        ("two hosts", "GET /raw/x HTTP/1.1\r\nhost: gw\r\nhost: other\r\n\r\n".into()),
        ("host differs from absolute uri", format!("GET {self_uri} HTTP/1.1\r\nhost: other.example\r\n\r\n")),
        ("absolute uri to another host", "GET http://other.example/raw/x HTTP/1.1\r\nhost: other.example\r\n\r\n".into()),
        ("bad request line", "GET /raw/x HTTP/1.1 extra\r\nhost: gw\r\n\r\n".into()),
        ("lowercase method version", "GET /raw/x http/1.1\r\nhost: gw\r\n\r\n".into()),
        ("no version", "GET /raw/x\r\nhost: gw\r\n\r\n".into()),
        ("space in target", "GET /raw/x y HTTP/1.1\r\nhost: gw\r\n\r\n".into()),
        ("nul in header", "GET /raw/x HTTP/1.1\r\nhost: gw\r\nx-a: a\0b\r\n\r\n".into()),
        ("bad chunk size", "POST /raw/x HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into()),
    ];
    let mut failures = Vec::new();
    for (name, req) in &shapes {
        let r = raw(gw.addr, req.as_bytes()).await;
        match r {
            Some(r) if (400..500).contains(&r.status) => {}
            Some(r) => failures.push(format!("{name}: {}", r.head.lines().next().unwrap_or(""))),
            None => failures.push(format!("{name}: closed without an answer")),
        }
    }
    assert!(failures.is_empty(), "not refused with a 4xx: {failures:#?}");
    assert_eq!(
        up.seen(),
        Vec::<String>::new(),
        "the upstream saw something"
    );
}

#[tokio::test]
async fn lenient_shapes_reach_the_upstream_with_one_framing() {
    let (up, gw) = smuggling_setup().await;
    let host = up.addr.to_string();
    // Bare LF line endings: accepted by the parser, re-framed with CRLF.
    let r = raw(
        gw.addr,
        b"POST /raw/lf HTTP/1.1\nhost: gw\nx-request-id: req-lf\ncontent-length: 5\n\nhello",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    // A chunked body re-framed toward the upstream.
    let r = raw(
        gw.addr,
        b"POST /raw/ch HTTP/1.1\r\nhost: gw\r\nx-request-id: req-ch\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        seen[0],
        format!("POST /lf HTTP/1.1\r\nhost: {host}\r\nx-request-id: req-lf\r\ncontent-length: 5\r\n\r\nhello")
    );
    assert_eq!(
        seen[1],
        format!("POST /ch HTTP/1.1\r\nhost: {host}\r\nx-request-id: req-ch\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n")
    );

    // Both content-length and chunked (either order): hyper frames by chunked and
    // drops the content-length (RFC 9112 §6.3), so the upstream sees one framing.
    for (i, head) in [
        "content-length: 5\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 5",
    ]
    .iter()
    .enumerate()
    {
        let req = format!("POST /raw/both{i} HTTP/1.1\r\nhost: gw\r\nx-request-id: req-both{i}\r\n{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        let r = raw(gw.addr, req.as_bytes()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(
            up.seen().last().unwrap(),
            &format!("POST /both{i} HTTP/1.1\r\nhost: {host}\r\nx-request-id: req-both{i}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        );
    }
}

// ---------------------------------------------------------------- audit and leaks

const AUDIT_SECRET: &str = "sec-audit-client-secret-4c2f9a";
const AUDIT_STATIC: &str = "sec-static-api-key-91be37";
const AUDIT_CALLER_KEY: &str = "sec-caller-key-d80a61";
const AUDIT_CHAIN_KEY: &str = "sec-audit-chain-key-5e7b20";

fn scenario_config(idp: &MockIdp, up: &MockUpstream, plain: &MockUpstream, audit: &Path) -> String {
    std::env::set_var("SEC_AUDIT_SECRET", AUDIT_SECRET);
    std::env::set_var("SEC_AUDIT_STATIC", AUDIT_STATIC);
    std::env::set_var("SEC_AUDIT_CALLER_KEY", AUDIT_CALLER_KEY);
    std::env::set_var("SEC_AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY);
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[audit]
file = "{audit}"
key_env = "SEC_AUDIT_CHAIN_KEY"

[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "audit-test"
client_secret_env = "SEC_AUDIT_SECRET"
min_refresh_interval = "0s"
expose_to = ["svc"]

[providers.key]
grant = "static"
token_env = "SEC_AUDIT_STATIC"
header = "x-api-key"
scheme = ""

[callers.svc]
key_env = "SEC_AUDIT_CALLER_KEY"

[callers.local]
addrs = ["127.0.0.1/32"]

[callers.remote]
addrs = ["10.0.0.0/8"]

[[routes]]
prefix = "/crm"
upstream = "{u}"
provider = "crm"

[[routes]]
prefix = "/key"
upstream = "{p}"
provider = "key"

[[routes]]
prefix = "/forbidden"
upstream = "{u}"
allow = ["remote"]
"#,
        audit = audit.display(),
        idp = idp.token_url(),
        u = up.url(),
        p = plain.url()
    )
}

/// Runs requests of every outcome; answers the access tokens handed out.
async fn run_scenario(gw: &TestGateway, idp: &MockIdp) -> Vec<String> {
    let c = Client::new();
    let key = [("x-authgate-key", AUDIT_CALLER_KEY)];
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/a?q=query-secret"),
            &key,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c.get(&gw.url("/key/b")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        c.get(&gw.url("/nothing")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&gw.url("/forbidden/x")).await.status,
        StatusCode::FORBIDDEN
    );
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/a"),
            &[("x-authgate-key", "wrong")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "falls through to `local`");
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &key,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let first = r.json()["access_token"].as_str().unwrap().to_owned();
    // Revocation: the next request gets a 401, a refresh and one replay.
    idp.revoke_all();
    let r = c
        .send(Method::POST, &gw.url("/crm/replayed"), &key, "payload")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &key,
            Bytes::new(),
        )
        .await;
    let second = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    vec![first, second]
}

fn audit_lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    text.lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("not a JSON object line: {l:?} ({other:?})"),
        })
        .collect()
}

fn keys(m: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut k: Vec<&str> = m.keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn assert_rfc3339(v: &serde_json::Value) {
    let s = v.as_str().expect("ts is a string");
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("ts {s:?}: {e}"));
}

#[tokio::test]
async fn audit_lines_match_the_contract_field_by_field() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let plain = MockUpstream::start().await;
    let gw = TestGateway::start(&scenario_config(&idp, &up, &plain, &audit_path)).await;
    gw.ready().await;
    run_scenario(&gw, &idp).await;
    gw.stop().await;

    let lines = audit_lines(&std::fs::read_to_string(&audit_path).unwrap());
    let requests: Vec<_> = lines.iter().filter(|m| !m.contains_key("event")).collect();
    let tokens: Vec<_> = lines
        .iter()
        .filter(|m| m.get("event").and_then(|e| e.as_str()) == Some("token_refresh"))
        .collect();

    const REQUEST_FIELDS: [&str; 16] = [
        "caller",
        "chain",
        "client_addr",
        "duration_ms",
        "error",
        "method",
        "path",
        "provider",
        "replayed",
        "request_id",
        "route",
        "seq",
        "status",
        "token_generation",
        "ts",
        "upstream_status",
    ];
    // Six proxied or refused requests, and the two broker calls (which also get a
    // `token_handout` line).
    assert_eq!(requests.len(), 8, "{requests:#?}");
    assert_eq!(
        requests
            .iter()
            .filter(|m| m["path"] == "/.authgate/token/crm")
            .count(),
        2
    );
    for m in &requests {
        assert_eq!(keys(m), REQUEST_FIELDS, "{m:?}");
        assert_rfc3339(&m["ts"]);
        assert!(m["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(m["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(m["method"].is_string());
        assert!(
            !m["path"].as_str().unwrap().contains('?'),
            "no query string"
        );
        assert!(m["status"].is_u64() && m["duration_ms"].is_u64());
        assert!(m["replayed"].is_boolean());
        assert!(m["error"].is_null() || m["error"].is_string());
    }
    let find = |path: &str, status: u64| {
        requests
            .iter()
            .find(|m| m["path"] == path && m["status"] == status)
            .unwrap_or_else(|| panic!("no line for {path} {status}: {requests:#?}"))
    };
    let ok = find("/crm/a", 200);
    assert_eq!(ok["caller"], "svc");
    assert_eq!(ok["route"], "/crm");
    assert_eq!(ok["provider"], "crm");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["upstream_status"], 200);
    assert_eq!(ok["token_generation"], 1);
    assert_eq!(ok["replayed"], false);
    assert!(ok["error"].is_null());

    let nf = find("/nothing", 404);
    assert_eq!(nf["error"], "no_route");
    assert!(nf["route"].is_null() && nf["provider"].is_null());
    assert!(nf["upstream_status"].is_null() && nf["token_generation"].is_null());

    let fb = find("/forbidden/x", 403);
    assert_eq!(fb["error"], "caller_forbidden");
    assert_eq!(fb["caller"], "local");
    assert!(fb["upstream_status"].is_null());

    let st = find("/key/b", 200);
    assert_eq!(st["provider"], "key");

    let rp = find("/crm/replayed", 200);
    assert_eq!(rp["method"], "POST");
    assert_eq!(rp["replayed"], true);
    assert_eq!(rp["upstream_status"], 200);
    assert_eq!(rp["token_generation"], 2, "generation of the last attempt");

    const TOKEN_FIELDS: [&str; 11] = [
        "chain",
        "duration_ms",
        "error",
        "event",
        "expires_in_s",
        "generation",
        "outcome",
        "provider",
        "seq",
        "trigger",
        "ts",
    ];
    assert!(tokens.len() >= 2, "{tokens:#?}");
    for m in &tokens {
        assert_eq!(keys(m), TOKEN_FIELDS, "{m:?}");
        assert_rfc3339(&m["ts"]);
        assert!(["startup", "expiry", "unauthorized", "manual"]
            .contains(&m["trigger"].as_str().unwrap()));
        assert!(["ok", "error"].contains(&m["outcome"].as_str().unwrap()));
        assert!(m["duration_ms"].is_u64());
    }
    let startup = tokens.iter().find(|m| m["trigger"] == "startup").unwrap();
    assert_eq!(startup["provider"], "crm");
    assert_eq!(startup["outcome"], "ok");
    assert_eq!(startup["generation"], 1);
    assert!(startup["expires_in_s"].is_u64());
    assert!(startup["error"].is_null());
    let unauth = tokens
        .iter()
        .find(|m| m["trigger"] == "unauthorized")
        .unwrap();
    assert_eq!(unauth["outcome"], "ok");
    assert_eq!(unauth["generation"], 2);
}

#[tokio::test]
async fn no_secret_in_logs_audit_metrics_status_or_errors() {
    let logs = crate::support::captured_logs();
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let plain = MockUpstream::start().await;
    let gw = TestGateway::start(&scenario_config(&idp, &up, &plain, &audit_path)).await;
    gw.ready().await;
    let mut secrets = run_scenario(&gw, &idp).await;
    // Errors too: an IdP that now refuses, a forced refresh that fails.
    idp.fail_with(Some(crate::support::idp::Failure::Status(
        401,
        r#"{"error":"invalid_client"}"#.into(),
    )));
    idp.revoke_all();
    let c = Client::new();
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/after"),
            &[("x-authgate-key", AUDIT_CALLER_KEY)],
            Bytes::new(),
        )
        .await;
    let mut outputs = vec![r.text()];
    for path in ["/metrics", "/status", "/readyz"] {
        outputs.push(c.get(&gw.admin_url(path)).await.text());
    }
    outputs.push(format!("{:?}", gw.app().gateway.snapshot().config));
    gw.stop().await;
    outputs.push(std::fs::read_to_string(&audit_path).unwrap());
    outputs.push(String::from_utf8_lossy(&logs.lock().unwrap()).into_owned());

    // Every token the IdP issued, as the upstream saw it.
    for s in up.seen() {
        if let Some(t) = s.headers.get("authorization").and_then(|v| v.to_str().ok()) {
            secrets.push(t.trim_start_matches("Bearer ").to_owned());
        }
    }
    secrets.sort();
    secrets.dedup();
    secrets.extend([
        AUDIT_SECRET.to_owned(),
        AUDIT_STATIC.to_owned(),
        AUDIT_CALLER_KEY.to_owned(),
        AUDIT_CHAIN_KEY.to_owned(),
        "query-secret".to_owned(),
    ]);
    assert!(secrets.len() >= 6, "{secrets:?}");
    for (i, out) in outputs.iter().enumerate() {
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "output #{i} contains {s:?}");
        }
    }
    // The logs did capture the scenario (the search ran over something real).
    assert!(!outputs.last().unwrap().is_empty());
}

/// A gateway with `listen` added to its `[listen]` table and one open route,
/// `/open`, to a fresh mock upstream.
async fn open_gateway(listen: &str) -> (MockUpstream, TestGateway) {
    let up = MockUpstream::start().await;
    let toml = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{listen}\n[[routes]]\nprefix = \"/open\"\nupstream = \"{}\"\n",
        up.url()
    );
    let gw = TestGateway::start(&toml).await;
    (up, gw)
}

/// Writes a bodiless GET for `path` on a raw connection.
async fn send_get(s: &mut TcpStream, path: &str) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
}

#[tokio::test]
async fn connections_over_max_connections_wait_for_a_free_slot() {
    let (_up, gw) = open_gateway("max_connections = 2\n").await;
    let req = b"GET /open/x HTTP/1.1\r\nhost: gw\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(req).await.unwrap();
        assert_eq!(read_reply(&mut s).await.unwrap().status, 200);
        held.push(s);
    }
    // The third connection is not accepted while two are open...
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third.write_all(req).await.unwrap();
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        read_reply(&mut third),
    )
    .await;
    assert!(early.is_err(), "served over the limit");
    // ...and is served as soon as one closes.
    drop(held.pop());
    assert_eq!(read_reply(&mut third).await.unwrap().status, 200);
}

// ---------------------------------------------------------------- hibernation

/// Waits until the gateway logs that the connection from `local` hibernated for
/// the `nth` time (the signal that hyper's state was let go).
async fn hibernated(local: SocketAddr, nth: usize) {
    let logs = crate::support::captured_logs();
    let needle = format!("remote={local}");
    crate::support::until("the connection hibernates", || {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        let n = text
            .lines()
            .filter(|l| l.contains("connection hibernating") && l.contains(&needle))
            .count();
        async move { n >= nth }
    })
    .await;
}

#[tokio::test]
async fn a_hibernated_connection_keeps_the_bytes_it_had_read() {
    let _ = crate::support::captured_logs();
    let (up, gw) = open_gateway("idle_timeout = \"30s\"\n").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let local = s.local_addr().unwrap();

    // One request and the first half of the next, in one write: hyper reads both.
    s.write_all(b"GET /open/a HTTP/1.1\r\nhost: gw\r\n\r\nGET /open/b HTTP/1.1\r\nhos")
        .await
        .unwrap();
    let r = read_reply(&mut s).await.expect("first answer");
    assert_eq!(r.status, 200);
    hibernated(local, 1).await;
    // The half-read head survived hibernation: the rest completes it.
    s.write_all(b"t: gw\r\n\r\n").await.unwrap();
    let r = read_reply(&mut s).await.expect("second answer");
    assert_eq!(r.status, 200);
    assert!(!r.closed);
    hibernated(local, 2).await;
    // And a hibernated connection wakes for a whole new request.
    send_get(&mut s, "/open/c").await;
    let r = read_reply(&mut s).await.expect("third answer");
    assert_eq!(r.status, 200);
    let paths: Vec<String> = up.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
}

#[tokio::test]
async fn shutdown_does_not_wait_for_hibernated_connections() {
    let _ = crate::support::captured_logs();
    let (_up, gw) = open_gateway("idle_timeout = \"60s\"\nshutdown_grace = \"30s\"\n").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let local = s.local_addr().unwrap();
    send_get(&mut s, "/open/a").await;
    assert_eq!(read_reply(&mut s).await.expect("an answer").status, 200);
    hibernated(local, 1).await;
    // The drain ends an idle connection at once, rather than after the grace period.
    tokio::time::timeout(std::time::Duration::from_secs(10), gw.stop())
        .await
        .expect("shutdown finished without waiting for the idle connection");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// The drain reaches a keep-alive connection that has served requests since it
/// first registered for the signal: its in-flight answer says `connection: close`
/// and the connection ends, long before the grace period would.
#[tokio::test]
async fn a_busy_keep_alive_connection_closes_after_its_answer_when_the_gateway_drains() {
    let (up, gw) = open_gateway("idle_timeout = \"60s\"\nshutdown_grace = \"30s\"\n").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for _ in 0..3 {
        send_get(&mut s, "/open/a").await;
        let r = read_reply(&mut s).await.expect("an answer");
        assert_eq!((r.status, r.closed), (200, false));
    }
    send_get(&mut s, "/open/slow/300").await;
    crate::support::until("the upstream has the slow request", || {
        let n = up.count();
        async move { n >= 4 }
    })
    .await;
    let stopping = tokio::spawn(gw.stop());
    let r = read_reply(&mut s).await.expect("the in-flight answer");
    assert_eq!(r.status, 200);
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "the answer must announce the close: {}",
        r.head
    );
    assert!(r.closed, "the connection must end after its answer");
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("the drain finished without the grace period")
        .unwrap();
}

/// The same for an h2c caller: its connection is asked to close (GOAWAY) once its
/// stream in flight is answered, so the drain does not wait out the grace period
/// for a connection the caller's pool would keep open.
#[tokio::test]
async fn an_h2c_connection_closes_after_its_streams_when_the_gateway_drains() {
    let (up, gw) = open_gateway("idle_timeout = \"60s\"\nshutdown_grace = \"30s\"\n").await;
    let c = Client::h2c();
    assert_eq!(c.get(&gw.url("/open/a")).await.status, StatusCode::OK);
    let url = gw.url("/open/slow/300");
    // The client stays alive, and with it its pooled connection.
    let inflight = tokio::spawn({
        let c = c.clone();
        async move { c.get(&url).await }
    });
    crate::support::until("the upstream has the slow request", || {
        let n = up.count();
        async move { n >= 2 }
    })
    .await;
    let stopping = tokio::spawn(gw.stop());
    let r = inflight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("the drain finished without the grace period")
        .unwrap();
    drop(c);
}

#[tokio::test]
async fn a_slow_reader_gets_its_whole_response_across_idle_time() {
    let _ = crate::support::captured_logs();
    let (up, gw) = open_gateway("idle_timeout = \"30s\"\n").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let local = s.local_addr().unwrap();
    // More than the socket buffers hold: the end of the body waits in the
    // gateway while the caller reads nothing.
    let size: usize = 32 << 20;
    s.write_all(format!("GET /open/big/{size} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
    crate::support::until("the upstream answered", || {
        let n = up.count();
        async move { n >= 1 }
    })
    .await;
    // Idle well past the hibernation delay, with a response still unsent.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut buf = Vec::with_capacity(size + 4096);
    let mut chunk = vec![0u8; 1 << 16];
    let body_len = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the response ended");
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() >= size {
                if let Some(len) = payload_len(&buf) {
                    return len;
                }
            }
        }
    })
    .await;
    let tail = &buf[buf.len().saturating_sub(40)..];
    let body_len = body_len.unwrap_or_else(|_| {
        panic!(
            "got {} bytes, ending {:?}",
            buf.len(),
            String::from_utf8_lossy(tail)
        )
    });
    assert_eq!(body_len, size);
    // The connection still serves, and hibernates once truly idle.
    send_get(&mut s, "/open/x").await;
    assert_eq!(read_reply(&mut s).await.expect("an answer").status, 200);
    hibernated(local, 1).await;
}

/// The payload length of a complete HTTP/1.1 response (content-length or
/// chunked), or `None` if it is not complete yet.
fn payload_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        let n: usize = cl.trim().parse().ok()?;
        return (buf.len() >= head_end + n).then_some(n);
    }
    let (mut at, mut total) = (head_end, 0);
    loop {
        let line = buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&buf[at..at + line]).ok()?.trim(), 16)
            .ok()?;
        at += line + 2;
        if size == 0 {
            return Some(total);
        }
        total += size;
        at += size + 2;
        if at > buf.len() {
            return None;
        }
    }
}

// ---------------------------------------------------------------- route deadlines

/// Two routes to one upstream, with a long and a short timeout.
async fn deadline_gateway() -> (MockUpstream, TestGateway) {
    let up = MockUpstream::start().await;
    let toml = format!(
        r#"
[listen]
addr = "127.0.0.1:0"

[[routes]]
prefix = "/long"
upstream = "{u}"
timeout = "60s"

[[routes]]
prefix = "/short"
upstream = "{u}"
timeout = "300ms"
"#,
        u = up.url()
    );
    let gw = TestGateway::start(&toml).await;
    (up, gw)
}

/// An HTTP/1 connection keeps one timer for the deadlines of its requests (see
/// `server::deadline`): each request still gets its own, whether it comes after
/// quick ones (a later deadline), after one that timed out (a fired timer), or
/// with a shorter timeout than the one before (an earlier deadline).
#[tokio::test]
async fn each_request_on_a_keep_alive_connection_gets_its_own_route_deadline() {
    let (_up, gw) = deadline_gateway().await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let s = &mut s;
    // The 60 s deadline of this one is armed first; the next, 300 ms, is earlier.
    assert_eq!(ask(s, "/long/x").await.status, 200);
    let r = ask(s, "/short/slow/5000").await;
    assert_eq!(r.status, 504, "{}", r.head);
    assert_eq!(r.json()["error"], "upstream_timeout");
    // Quick requests after it, then a slow one again: its own deadline holds.
    for _ in 0..3 {
        assert_eq!(ask(s, "/short/x").await.status, 200);
    }
    let r = ask(s, "/short/slow/5000").await;
    assert_eq!(r.status, 504, "{}", r.head);
    // A request slower than the deadline before it, within its own, is served.
    assert_eq!(ask(s, "/long/slow/600").await.status, 200);
}

/// One request on the raw connection `s`, which must stay open after it.
async fn ask(s: &mut TcpStream, path: &str) -> RawReply {
    send_get(s, path).await;
    let r = read_reply(s).await.expect("an answer");
    assert!(!r.closed, "the connection stays open after {path}");
    r
}

/// HTTP/2 requests are tasks of their own, each with its own timer.
#[tokio::test]
async fn h2c_requests_time_out_at_the_route_deadline() {
    let (_up, gw) = deadline_gateway().await;
    let c = Client::h2c();
    let r = c.get(&gw.url("/short/slow/5000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "upstream_timeout");
    let r = c.get(&gw.url("/long/slow/600")).await;
    assert_eq!(r.status, StatusCode::OK);
}
