//! TLS upstreams: the route's `ca` is trusted, HTTP/2 is used when the upstream
//! offers it by ALPN, and a client certificate is presented for mTLS.

use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;

use crate::support::pki::{ca, leaf, write, Ca, Leaf};
use crate::support::{full, Client, TestGateway};

#[derive(Debug, Default)]
pub(crate) struct Seen {
    connections: usize,
    versions: Vec<String>,
    client_cert: Vec<bool>,
    /// Per request: the `:authority` (h2) or the URI's authority, and how many
    /// `host` fields came with it.
    authorities: Vec<(String, usize)>,
}

/// A TLS upstream offering h2 and http/1.1, optionally requiring client certs.
pub(crate) async fn tls_upstream(
    server: &Leaf,
    client_ca: Option<&Ca>,
) -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = vec![server.der.clone()];
    let (_, key) = server.identity();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut cfg = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .unwrap()
        }
        None => builder
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            seen.lock().unwrap().connections += 1;
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let has_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty());
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let mut s = seen.lock().unwrap();
                            s.versions.push(format!("{:?}", req.version()));
                            s.client_cert.push(has_cert);
                            s.authorities.push((
                                req.uri()
                                    .authority()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default(),
                                req.headers().get_all("host").iter().count(),
                            ));
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(full(
                                auth.unwrap_or_default(),
                            )))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn tls_upstream_with_route_ca_speaks_http2_by_alpn() {
    let ca = ca("upstream test CA");
    let server = leaf(&ca, &["localhost"], false);
    let (addr, seen) = tls_upstream(&server, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    std::env::set_var("TLS_UP_TOKEN", "tls-token-1");
    let toml = format!(
        r#"
[providers.p]
grant = "static"
token_env = "TLS_UP_TOKEN"

[[routes]]
prefix = "/secure"
upstream = "https://localhost:{port}/base"
provider = "p"
ca = "{ca_path}"

[[routes]]
prefix = "/untrusted"
upstream = "https://localhost:{port}/base"
"#,
        port = addr.port()
    );
    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    let c = Client::new();
    let r = c.get(&gw.url("/secure/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "Bearer tls-token-1");
    assert_eq!(seen.lock().unwrap().versions, vec!["HTTP/2.0"]);
    // The authority travels as `:authority` alone: nginx refuses an h2 request
    // that also carries a `host` field.
    assert_eq!(
        seen.lock().unwrap().authorities,
        vec![(format!("localhost:{}", addr.port()), 0)]
    );
    // Without the route's CA the upstream's certificate is not trusted.
    let r = c.get(&gw.url("/untrusted/x")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_unreachable");
}

#[tokio::test]
async fn an_h2_upstream_gets_one_connection_for_sequential_and_concurrent_requests() {
    let ca = ca("h2 pool CA");
    let server = leaf(&ca, &["localhost"], false);
    let (addr, seen) = tls_upstream(&server, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    let toml = format!(
        "[[routes]]\nprefix = \"/h2\"\nupstream = \"https://localhost:{port}\"\nca = \"{ca_path}\"\n",
        port = addr.port()
    );
    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    let c = Client::new();
    for _ in 0..5 {
        assert_eq!(c.get(&gw.url("/h2/x")).await.status, StatusCode::OK);
    }
    let all = (0..10).map(|_| {
        let c = c.clone();
        let url = gw.url("/h2/y");
        tokio::spawn(async move { c.get(&url).await.status })
    });
    for status in futures_util::future::join_all(all).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.versions.len(), 15);
    assert!(
        seen.versions.iter().all(|v| v == "HTTP/2.0"),
        "{:?}",
        seen.versions
    );
    assert_eq!(seen.connections, 1);
}

#[tokio::test]
async fn mtls_upstream_receives_the_route_client_certificate() {
    let ca = ca("mtls CA");
    let server = leaf(&ca, &["localhost"], false);
    let client = leaf(&ca, &["authgate.client"], true);
    let (addr, seen) = tls_upstream(&server, Some(&ca)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write(dir.path(), "ca.pem", &ca.pem);
    write(dir.path(), "client.pem", &client.pem);
    write(dir.path(), "client-key.pem", &client.key_pem);
    let toml = format!(
        r#"
[[routes]]
prefix = "/m"
upstream = "https://localhost:{port}"
ca = "{ca_path}"
client_cert = "client.pem"
client_key = "client-key.pem"

[[routes]]
prefix = "/nocert"
upstream = "https://localhost:{port}"
ca = "{ca_path}"
"#,
        port = addr.port()
    );
    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/m/x")).await.status, StatusCode::OK);
    assert_eq!(seen.lock().unwrap().client_cert, vec![true]);
    assert_eq!(
        c.get(&gw.url("/nocert/x")).await.status,
        StatusCode::BAD_GATEWAY
    );
}
