//! The least a proxy built on hyper can do per request: the floor under authgate.
//!
//! `bench/dataplane.sh` runs it as the `hyper-floor` target beside nginx, HAProxy
//! and authgate, and `bench/instructions.sh` counts its instructions per request.
//! It answers one question: how close to nginx can *any* hyper-based gateway get
//! on one core? Everything authgate does on top of hyper is left out:
//!
//! - one upstream connection per caller connection, made when the caller
//!   connects, so there is no pool at all;
//! - no routing table, no header hygiene, no request id, no metrics, no
//!   deadline, no body wrapper: the request goes upstream with the prefix cut
//!   and one `authorization` header set, and the response comes back as it is.
//!
//! It is a measuring stick, not a gateway: it forwards credentials-free callers'
//! headers untouched and has no timeouts.
//!
//! Run: `cargo run --release --example hyper_floor -- LISTEN UPSTREAM [PREFIX]`,
//! e.g. `hyper_floor 127.0.0.1:18704 127.0.0.1:18701 /api`.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Sender = Arc<Mutex<Option<SendRequest<Incoming>>>>;
type BoxError = Box<dyn Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        return Err("usage: hyper_floor LISTEN UPSTREAM [PREFIX]".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    let prefix: &'static str = Box::leak(args.get(2).cloned().unwrap_or_default().into_boxed_str());
    // The same runtime authgate uses with `worker_threads = 1`.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream, prefix))
}

async fn serve(
    listen: SocketAddr,
    upstream: SocketAddr,
    prefix: &'static str,
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    let token = HeaderValue::from_static("Bearer static");
    loop {
        let Ok((caller, _)) = listener.accept().await else {
            continue;
        };
        let token = token.clone();
        tokio::spawn(async move {
            let _ = caller.set_nodelay(true);
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let sender: Sender = Arc::new(Mutex::new(Some(send)));
            let service =
                service_fn(move |req| forward(req, sender.clone(), prefix, token.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(caller), service)
                .await;
        });
    }
}

async fn forward(
    mut req: Request<Incoming>,
    sender: Sender,
    prefix: &'static str,
    token: HeaderValue,
) -> Result<hyper::Response<Incoming>, BoxError> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    *req.uri_mut() = Uri::try_from(rest)?;
    req.headers_mut().insert(http::header::AUTHORIZATION, token);
    // HTTP/1 callers send one request at a time, so the sender is always back
    // by the time the next request comes; the lock is never contended.
    let taken = sender.lock().unwrap_or_else(PoisonError::into_inner).take();
    let Some(mut send) = taken else {
        return Err("upstream connection busy".into());
    };
    let answer = async {
        send.ready().await?;
        send.send_request(req).await
    }
    .await;
    *sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(send);
    Ok(answer?)
}
