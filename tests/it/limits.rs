//! Limits and framing: 408, 413, 431, the contract's 400 for heads hyper refuses,
//! idle keep-alive connections closed, and request-smuggling shapes refused or
//! passed on with one framing.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

use crate::support::raw::{open_gateway, raw, read_reply};

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
