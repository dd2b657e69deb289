//! `authgate demo`: a demo IdP and a demo API on loopback with a gateway in front,
//! a burst of requests across a revoked and an expiring token, and a summary of
//! what happened. For newcomers: no config, no network, one command.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::App;

/// Token lifetime the demo IdP hands out: short, so a proactive refresh shows.
const LIFETIME_S: u64 = 4;

#[derive(Debug, Default)]
struct DemoState {
    token_requests: AtomicU64,
    issued: AtomicU64,
    valid: Mutex<HashSet<String>>,
    api_requests: AtomicU64,
    api_rejected: AtomicU64,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo servers: {0}")]
    Listen(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] crate::app::StartError),
}

async fn serve_demo<F, Fut>(f: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = f(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Runs the demo and prints its summary. Returns an error message on failure.
pub async fn run() -> Result<(), DemoError> {
    let st = Arc::new(DemoState::default());

    let idp_state = st.clone();
    let idp = serve_demo(move |_req| {
        let st = idp_state.clone();
        async move {
            st.token_requests.fetch_add(1, Ordering::SeqCst);
            // A little latency, as real IdPs have: waiters pile up behind it.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let n = st.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let token = format!("demo-token-{n}");
            st.valid.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone());
            reply(
                StatusCode::OK,
                format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{LIFETIME_S}}}"#),
            )
        }
    })
    .await
    .map_err(DemoError::Listen)?;

    let api_state = st.clone();
    let api = serve_demo(move |req| {
        let st = api_state.clone();
        async move {
            st.api_requests.fetch_add(1, Ordering::SeqCst);
            let token = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            if st
                .valid
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&token)
            {
                reply(StatusCode::OK, r#"{"invoices":[]}"#.into())
            } else {
                st.api_rejected.fetch_add(1, Ordering::SeqCst);
                let mut r = reply(StatusCode::UNAUTHORIZED, String::new());
                r.headers_mut().insert(
                    "www-authenticate",
                    http::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
                r
            }
        }
    })
    .await
    .map_err(DemoError::Listen)?;

    std::env::set_var("AUTHGATE_DEMO_SECRET", "demo-secret");
    let dir = std::env::temp_dir().join(format!("authgate-demo-{}", std::process::id()));
    let toml = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[store]
kind = "memory"
[providers.demo]
grant = "client_credentials"
token_url = "http://{idp}/token"
client_id = "demo"
client_secret_env = "AUTHGATE_DEMO_SECRET"
[[routes]]
prefix = "/api"
upstream = "http://{api}"
provider = "demo"
"#
    );
    let config = Config::parse(&dir.join("demo.toml"), &toml)?;
    let app = App::start(config).await?;
    let base = format!("http://{}", app.addr);
    println!(
        "authgate demo: IdP on {idp}, API on {api}, gateway on {}",
        app.addr
    );

    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let sent = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let burst = |n: usize| {
        let client = client.clone();
        let base = base.clone();
        let sent = sent.clone();
        let ok = ok.clone();
        async move {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let client = client.clone();
                let uri = format!("{base}/api/invoices?page={i}");
                let sent = sent.clone();
                let ok = ok.clone();
                tasks.push(tokio::spawn(async move {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let Ok(req) = Request::get(uri).body(Empty::new()) else {
                        return;
                    };
                    if let Ok(resp) = client.request(req).await {
                        let good = resp.status() == StatusCode::OK;
                        let _ = resp.into_body().collect().await;
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    };

    println!("1. 200 requests; the first ones wait for the start-up token");
    burst(200).await;
    println!("2. the IdP revokes every token; 500 concurrent requests follow");
    st.valid.lock().unwrap_or_else(|e| e.into_inner()).clear();
    burst(500).await;
    println!("3. {} s of steady traffic while the {LIFETIME_S} s token expires and is refreshed ahead of time", LIFETIME_S + 2);
    let until = tokio::time::Instant::now() + Duration::from_secs(LIFETIME_S + 2);
    while tokio::time::Instant::now() < until {
        burst(20).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let metrics = app.gateway.metrics.render();
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    println!();
    println!("requests sent:           {}", sent.load(Ordering::Relaxed));
    println!("requests succeeded:      {}", ok.load(Ordering::Relaxed));
    println!(
        "IdP token requests:      {}",
        st.token_requests.load(Ordering::SeqCst)
    );
    println!(
        "waiters coalesced:       {}",
        metric("authgate_refresh_waiters_total")
    );
    println!(
        "replays after a 401:     {}",
        metric("authgate_replays_total{route=\"/api\",outcome=\"ok\"}")
    );
    println!(
        "401s seen by the API:    {} (none reached a caller)",
        st.api_rejected.load(Ordering::SeqCst)
    );
    app.shutdown().await;
    Ok(())
}
