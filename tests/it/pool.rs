//! The data path's upstream connection pool, seen from the upstream: how many TCP
//! connections the gateway opens, and which ones it reuses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{until, Client, TestGateway};

/// A bare HTTP/1.1 upstream (written by hand so that it can misbehave) counting
/// its connections and requests. `/close` answers with `connection: close`,
/// `/drop` answers and then closes without a word, `/big` answers 8 MiB, anything
/// else answers "ok".
#[derive(Debug, Clone)]
struct CountingUpstream {
    addr: SocketAddr,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

const BIG: usize = 8 << 20;

impl CountingUpstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = CountingUpstream {
            addr: listener.local_addr().unwrap(),
            opened: Arc::default(),
            closed: Arc::default(),
            requests: Arc::default(),
        };
        let counters = up.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counters.opened.fetch_add(1, Ordering::SeqCst);
                let counters = counters.clone();
                tokio::spawn(async move {
                    let _ = counters.serve(s).await;
                    counters.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        up
    }

    async fn serve(&self, mut s: tokio::net::TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::new();
        loop {
            // The gateway's requests here have no body: a head is a request.
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            self.requests.fetch_add(1, Ordering::SeqCst);
            let path = head.split(' ').nth(1).unwrap_or_default();
            match path {
                "/close" => {
                    s.write_all(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                    )
                    .await?;
                    return Ok(());
                }
                "/drop" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await?;
                    return Ok(());
                }
                "/big" => {
                    s.write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").as_bytes(),
                    )
                    .await?;
                    let chunk = vec![b'x'; 64 * 1024];
                    for _ in 0..BIG / chunk.len() {
                        s.write_all(&chunk).await?;
                    }
                }
                _ => {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await?;
                }
            }
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn gateway(up: &CountingUpstream) -> TestGateway {
    TestGateway::start(&format!(
        "[[routes]]\nprefix = \"/u\"\nupstream = \"http://{}\"\n\n[[routes]]\nprefix = \"/same-origin\"\nupstream = \"http://{}\"\n",
        up.addr, up.addr
    ))
    .await
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let c = Client::new();
    for i in 0..20 {
        // Routes to the same origin share the pool.
        let path = if i % 2 == 0 { "/u/x" } else { "/same-origin/x" };
        let r = c.get(&gw.url(path)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.requests(), 20);
    assert_eq!(up.opened(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_requests_each_get_a_connection_then_share_them() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let c = Client::new();
    let all = (0..16).map(|_| {
        let c = c.clone();
        let url = gw.url("/u/x");
        tokio::spawn(async move { c.get(&url).await })
    });
    for r in futures_util::future::join_all(all).await {
        assert_eq!(r.unwrap().status, StatusCode::OK);
    }
    let opened = up.opened();
    assert!((1..=16).contains(&opened), "{opened}");
    for _ in 0..16 {
        assert_eq!(c.get(&gw.url("/u/x")).await.status, StatusCode::OK);
    }
    assert_eq!(
        up.opened(),
        opened,
        "sequential requests opened connections"
    );
    assert_eq!(up.requests(), 32);
    gw.stop().await;
}

// Multi-threaded like the gateway: the connection task sees the close on another
// worker while the next request is checked out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_upstream_while_idle_is_not_used() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let c = Client::new();
    for n in 1..=3 {
        let r = c.get(&gw.url("/u/drop")).await;
        assert_eq!(r.status, StatusCode::OK);
        until("the upstream closed the connection", || async {
            up.closed() == n
        })
        .await;
    }
    let r = c.get(&gw.url("/u/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    assert_eq!(up.opened(), 4);
    assert_eq!(up.requests(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn connection_close_responses_are_not_pooled() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let c = Client::new();
    for _ in 0..3 {
        let r = c.get(&gw.url("/u/close")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.opened(), 3);
    // The next one gets a fresh connection, which is then kept.
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/u/x")).await.status, StatusCode::OK);
    }
    assert_eq!(up.opened(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn a_response_dropped_half_read_does_not_return_its_connection() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let caller: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = caller.get(gw.url("/u/big").parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| d.len() < BIG));
    drop(body);
    // The gateway closes the upstream connection rather than pooling it with
    // the rest of the body still unread.
    until("the half-read connection is closed", || async {
        up.closed() == 1
    })
    .await;
    let r = Client::new().get(&gw.url("/u/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    assert_eq!(up.opened(), 2);
    // A body read to its end does return it.
    let r = Client::new().get(&gw.url("/u/big")).await;
    assert_eq!(r.body.len(), BIG);
    let r = Client::new().get(&gw.url("/u/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.opened(), 2);
    gw.stop().await;
}

/// The pool's 90 s idle limit (the legacy client's): a connection idle longer is
/// not used again, and the reaper closes one that no request comes for. Time is
/// moved by hand (the gateway runs on this test's runtime), so the test takes no
/// 90 s; the sockets are real. With the clock jumped, the reaper's overdue rounds
/// run before the next request arrives, so the check at checkout is not what the
/// first half tells apart from the reaper.
#[tokio::test]
async fn idle_upstream_connections_are_not_reused_after_90_s_and_are_reaped() {
    let up = CountingUpstream::start().await;
    let gw = gateway(&up).await;
    let idle = std::time::Duration::from_secs(90);
    for _ in 0..2 {
        assert_eq!(
            Client::new().get(&gw.url("/u/x")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(up.opened(), 1);

    tokio::time::pause();
    tokio::time::advance(idle + std::time::Duration::from_secs(1)).await;
    tokio::time::resume();
    assert_eq!(
        Client::new().get(&gw.url("/u/x")).await.status,
        StatusCode::OK
    );
    assert_eq!(up.opened(), 2, "expired: a new connection");
    until("the expired connection is closed", || async {
        up.closed() == 1
    })
    .await;

    // No request comes now: the reaper's next rounds close the second one.
    tokio::time::pause();
    tokio::time::advance(idle + idle / 2).await;
    tokio::time::resume();
    until("the reaper closed the idle connection", || async {
        up.closed() == 2
    })
    .await;
    assert_eq!(up.opened(), 2);
    gw.stop().await;
}
