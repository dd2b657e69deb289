//! Request-path cost, measured: heap allocations per proxied request, and store
//! reads under load (must be zero). Run with
//!
//!     cargo run --release --example request_path
//!
//! Method: an in-process upstream, an in-process IdP and the real gateway; a
//! keep-alive client sends N sequential requests directly to the upstream, then N
//! through the gateway (static credential, then an OAuth token). The difference in
//! allocations per request is what the gateway adds (its HTTP server and client
//! included). The store is a `MemoryStore` whose reads are counted.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark program: failing loudly is right

use std::alloc::System;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

use authgate::store::memory::MemoryStore;
use authgate::{App, Config};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 20_000;

async fn serve(body: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            body.as_bytes(),
                        ))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Allocations per request for N sequential keep-alive GETs to `url`.
async fn measure(url: &str) -> (f64, f64) {
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let get = |client: &hyper_util::client::legacy::Client<_, Empty<Bytes>>| {
        let req = Request::get(url).body(Empty::new()).expect("request");
        let fut = client.request(req);
        async move {
            let resp = fut.await.expect("response");
            assert!(resp.status().is_success(), "status {}", resp.status());
            resp.into_body().collect().await.expect("body");
        }
    };
    for _ in 0..1_000 {
        get(&client).await;
    }
    let region = Region::new(GLOBAL);
    for _ in 0..N {
        get(&client).await;
    }
    let stats = region.change();
    (
        stats.allocations as f64 / N as f64,
        stats.bytes_allocated as f64 / N as f64,
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let upstream = serve("ok").await;
    let idp =
        serve(r#"{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}"#).await;
    std::env::set_var("BENCH_STATIC_TOKEN", "static-bench-token");
    std::env::set_var("BENCH_SECRET", "bench-secret");
    let toml = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[providers.key]
grant = "static"
token_env = "BENCH_STATIC_TOKEN"
[providers.oauth]
grant = "client_credentials"
token_url = "http://{idp}/token"
client_id = "bench"
client_secret_env = "BENCH_SECRET"
[[routes]]
prefix = "/static"
upstream = "http://{upstream}"
provider = "key"
[[routes]]
prefix = "/oauth"
upstream = "http://{upstream}"
provider = "oauth"
"#
    );
    let config = Config::parse(std::path::Path::new("bench.toml"), &toml).expect("config");
    let store = Arc::new(MemoryStore::new());
    let app = App::start_with_store(config, store.clone())
        .await
        .expect("gateway");
    let gw = app.addr;

    let (direct, direct_b) = measure(&format!("http://{upstream}/x")).await;
    let loads_before = store.loads();
    let (stat, stat_b) = measure(&format!("http://{gw}/static/x")).await;
    let (oauth, oauth_b) = measure(&format!("http://{gw}/oauth/x")).await;
    let loads = store.loads() - loads_before;

    println!("| path ({N} sequential keep-alive GETs) | allocations/request | bytes/request | added by authgate |");
    println!("|---|---:|---:|---:|");
    println!("| client -> upstream (direct) | {direct:.1} | {direct_b:.0} | - |");
    println!(
        "| client -> authgate (static) -> upstream | {stat:.1} | {stat_b:.0} | {:.1} allocs |",
        stat - direct
    );
    println!(
        "| client -> authgate (OAuth) -> upstream | {oauth:.1} | {oauth_b:.0} | {:.1} allocs |",
        oauth - direct
    );
    println!();
    println!(
        "store reads during {} proxied requests: {loads}",
        2 * (N + 1_000)
    );
    assert_eq!(loads, 0, "the request path must never read the store");
    app.shutdown().await;
}
