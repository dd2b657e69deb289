//! The integration test kit: in-process mock IdP and upstreams on port 0, a
//! gateway started from a TOML string, and a small HTTP client. Mock servers are
//! plain hyper services; nothing here sleeps to wait for readiness (a bound
//! listener is ready when `bind` returns).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod db;
pub mod gateway;
pub mod idp;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod upstream;

pub use client::Client;
pub use gateway::TestGateway;
pub use idp::MockIdp;
pub use upstream::MockUpstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

pub fn full(data: impl Into<Bytes>) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves `handler` on 127.0.0.1:0 (HTTP/1.1 and h2c) until the test ends.
pub async fn serve<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(listener, handler)
}

pub fn serve_on<H, F>(listener: TcpListener, handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = handler(req);
                    async move { Ok::<_, Infallible>(f.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Installs a tracing subscriber once, writing into a buffer tests can search.
pub fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    use std::sync::{Mutex, OnceLock};
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let writer = move || LogWriter(buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_writer(writer)
            .with_ansi(false)
            .try_init();
        buf
    })
}

struct LogWriter(&'static std::sync::Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Polls `cond` until it holds, failing the test after 20 s, also when one poll
/// never returns (a request nobody answers). Tests wait on conditions, never on
/// fixed sleeps.
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, cond()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("timed out waiting for: {what}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
