//! Caller connections: the connection limit, idle connections hibernating and
//! waking with their bytes, draining on shutdown (HTTP/1 and h2c), slow readers,
//! and the route deadline of each request on a keep-alive connection.

use std::net::SocketAddr;

use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Client, MockUpstream, TestGateway};

use crate::support::raw::{open_gateway, read_reply, send_get, RawReply};

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
