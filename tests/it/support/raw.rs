//! Raw sockets for the tests that need bytes a client library would not send, or
//! that must see exactly what comes back (status, head, body, close).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{MockUpstream, TestGateway};

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    /// The server closed the connection after this response.
    pub closed: bool,
}

impl RawReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (content-length framed, or up to EOF). `None` when the
/// server closed without answering.
pub async fn read_reply(s: &mut TcpStream) -> Option<RawReply> {
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

pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<RawReply> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_reply(&mut s).await
}

/// A gateway with `listen` added to its `[listen]` table and one open route,
/// `/open`, to a fresh mock upstream.
pub async fn open_gateway(listen: &str) -> (MockUpstream, TestGateway) {
    let up = MockUpstream::start().await;
    let toml = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{listen}\n[[routes]]\nprefix = \"/open\"\nupstream = \"{}\"\n",
        up.url()
    );
    let gw = TestGateway::start(&toml).await;
    (up, gw)
}

/// Writes a bodiless GET for `path` on a raw connection.
pub async fn send_get(s: &mut TcpStream, path: &str) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
}
