//! Egress proxy authentication (DESIGN.md, "Windows" -> egress proxy): the
//! CONNECT handshake answers the proxy's 407 with NTLM (raw or in Negotiate) or
//! Basic, on the same connection; a 407 it cannot answer fails fast, naming proxy
//! authentication; nothing secret shows anywhere.

use std::process::Command;
use std::sync::Arc;

use hyper::StatusCode;

use crate::support::metrics::scrape;
use crate::support::pki::{ca, leaf, write};
use crate::support::proxy::TestProxy;
use crate::support::{captured_logs, Client, MockIdp, MockUpstream, TestGateway};

const PASSWORD: &str = "Pr0xy-Passw0rd!";
const WRONG: &str = "Wr0ng-Pa55w0rd";

/// A provider and a route through `proxy`, with `outbound` lines appended.
fn config(idp: &MockIdp, up: &MockUpstream, proxy: &TestProxy, outbound: &str) -> String {
    config_with(idp, &up.url(), proxy, outbound)
}

/// The same, but the token endpoint (127.0.0.1) is reached directly and only
/// the upstream (as `localhost`) through the proxy.
fn config_direct_idp(
    idp: &MockIdp,
    up: &MockUpstream,
    proxy: &TestProxy,
    outbound: &str,
) -> String {
    let upstream = format!("http://localhost:{}", up.addr.port());
    config_with(
        idp,
        &upstream,
        proxy,
        &format!("{outbound}no_proxy = [\"127.0.0.1\"]\n"),
    )
}

fn config_with(idp: &MockIdp, upstream: &str, proxy: &TestProxy, outbound: &str) -> String {
    std::env::set_var("PA_CLIENT_SECRET", "client-secret-pa");
    std::env::set_var("PA_PROXY_PASSWORD", PASSWORD);
    std::env::set_var("PA_WRONG_PASSWORD", WRONG);
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[providers.crm]
grant = "client_credentials"
token_url = "{t}"
client_id = "pa"
client_secret_env = "PA_CLIENT_SECRET"

[[routes]]
name = "crm"
prefix = "/crm"
upstream = "{u}"
provider = "crm"
timeout = "10s"

[outbound]
proxy = "{p}"
{outbound}
"#,
        t = idp.token_url(),
        u = upstream,
        p = proxy.url(),
    )
}

const NTLM_ACCOUNT: &str =
    "proxy_username = 'CORP\\svc-gw'\nproxy_password_env = \"PA_PROXY_PASSWORD\"\n";

async fn metrics(c: &Client, gw: &TestGateway) -> String {
    c.get(&gw.admin_url("/metrics")).await.text()
}

/// `authgate_proxy_auth_failures_total` as the admin listener reports it now.
async fn failures(c: &Client, gw: &TestGateway) -> f64 {
    scrape(c, gw)
        .await
        .value("authgate_proxy_auth_failures_total", &[])
}

/// No response, log line, status or metric shows the password or its Basic form.
async fn assert_no_secret(c: &Client, gw: &TestGateway, also: &[&str]) {
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("CORP\\svc-gw:{PASSWORD}"));
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    let status = c.get(&gw.admin_url("/status")).await.text();
    let metrics = metrics(c, gw).await;
    for text in [logs.as_str(), &status, &metrics]
        .into_iter()
        .chain(also.iter().copied())
    {
        assert!(!text.contains(PASSWORD), "password leaked");
        assert!(!text.contains(&basic), "Basic credentials leaked");
    }
}

#[tokio::test]
async fn ntlm_proxy_authenticates_each_tunnel_on_its_own_connection() {
    captured_logs();
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM", "Basic realm=\"corp\""])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &up, &proxy, NTLM_ACCOUNT)).await;
    let c = Client::new();
    // The counter exists from start-up.
    assert_eq!(failures(&c, &gw).await, 0.0);
    gw.ready().await;
    let r = c.get(&gw.url("/crm/invoices")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.last().uri, "/invoices");
    // The tunnel is pooled: a second request needs no new handshake.
    assert_eq!(c.get(&gw.url("/crm/again")).await.status, StatusCode::OK);

    let seen = proxy.seen();
    // Two tunnels (token endpoint, upstream), each: offer, challenge, accept,
    // all three on one connection; NTLM chosen over Basic, which never went out.
    assert_eq!(proxy.tunnels(), 2, "{seen:#?}");
    assert_eq!(proxy.connections(), 2, "{seen:#?}");
    for conn in 0..2 {
        let rounds: Vec<_> = seen.iter().filter(|s| s.conn == conn).collect();
        let statuses: Vec<u16> = rounds.iter().map(|s| s.status).collect();
        assert_eq!(statuses, [407, 407, 200], "{seen:#?}");
        assert!(rounds[0].auth.is_none());
        assert!(rounds[1]
            .auth
            .as_deref()
            .unwrap()
            .starts_with("NTLM TlRMTVNTUAAB"));
        assert!(rounds[2]
            .auth
            .as_deref()
            .unwrap()
            .starts_with("NTLM TlRMTVNTUAAD"));
    }
    assert!(seen
        .iter()
        .any(|s| s.line == format!("CONNECT {} HTTP/1.1", idp.addr)));
    assert!(seen
        .iter()
        .any(|s| s.line == format!("CONNECT {} HTTP/1.1", up.addr)));
    let status = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(status["proxy_auth"]["mode"], "auto");
    assert_eq!(status["proxy_auth"]["failures"], 0);
    assert_no_secret(&c, &gw, &[]).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_negotiate_only_proxy_gets_ntlm_in_spnego() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["Negotiate"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config(&idp, &up, &proxy, NTLM_ACCOUNT) + "proxy_auth = \"negotiate\"\n";
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let r = Client::new().get(&gw.url("/crm/n")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = proxy.seen();
    assert!(seen
        .iter()
        .filter_map(|s| s.auth.as_deref())
        .all(|a| a.starts_with("Negotiate ")));
    assert_eq!(proxy.tunnels(), 2, "{seen:#?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_user_principal_name_authenticates_too() {
    let proxy = TestProxy::ntlm("corp.example", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config(
        &idp,
        &up,
        &proxy,
        "proxy_username = \"svc-gw@corp.example\"\nproxy_password_env = \"PA_PROXY_PASSWORD\"\nproxy_auth = \"ntlm\"\n",
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    assert_eq!(
        Client::new().get(&gw.url("/crm/u")).await.status,
        StatusCode::OK
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_basic_proxy_gets_basic_only_after_it_asks() {
    let proxy = TestProxy::basic("svc-gw", PASSWORD).start().await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config(
        &idp,
        &up,
        &proxy,
        "proxy_username = \"svc-gw\"\nproxy_password_env = \"PA_PROXY_PASSWORD\"\n",
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let r = Client::new().get(&gw.url("/crm/b")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = proxy.seen();
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [407, 200, 407, 200], "{seen:#?}");
    assert!(seen[0].auth.is_none() && seen[2].auth.is_none());
    assert_eq!(proxy.connections(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_that_asks_nothing_never_sees_the_password() {
    let proxy = TestProxy::open().start().await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &up, &proxy, NTLM_ACCOUNT)).await;
    gw.ready().await;
    assert_eq!(
        Client::new().get(&gw.url("/crm/o")).await.status,
        StatusCode::OK
    );
    let seen = proxy.seen();
    assert_eq!(proxy.tunnels(), 2, "{seen:#?}");
    assert!(seen.iter().all(|s| s.auth.is_none()), "{seen:#?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_that_closes_after_its_offer_is_answered_on_a_new_connection() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .close_after_offer()
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &up, &proxy, NTLM_ACCOUNT)).await;
    gw.ready().await;
    let r = Client::new().get(&gw.url("/crm/c")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = proxy.seen();
    // Per tunnel: the offer on one connection, the NTLM rounds on the next.
    assert_eq!(proxy.tunnels(), 2, "{seen:#?}");
    assert_eq!(proxy.connections(), 4, "{seen:#?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_token_endpoint_behind_a_refusing_proxy_gives_503_naming_it() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config(
        &idp,
        &up,
        &proxy,
        "proxy_username = 'CORP\\svc-gw'\nproxy_password_env = \"PA_WRONG_PASSWORD\"\n",
    );
    let gw = TestGateway::start(&toml).await;
    let c = Client::new();
    let r = c.get(&gw.url("/crm/x")).await;
    let body = r.json();
    // The provider cannot get a token through the proxy: 503 naming it.
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "token_unavailable");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("proxy_authentication"), "{msg}");
    // Bounded: no more CONNECTs than one handshake needs per attempt.
    let rounds = proxy.seen().len();
    assert!(rounds <= 6, "{:#?}", proxy.seen());
    assert!(failures(&c, &gw).await >= 1.0);
    assert_eq!(idp.requests(), 0);
    assert!(!r.text().contains(WRONG));
    gw.stop().await;
}

#[tokio::test]
async fn a_wrong_password_fails_fast_naming_proxy_authentication() {
    captured_logs();
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    // The token endpoint is reached directly, the upstream through the proxy.
    let toml = config_direct_idp(
        &idp,
        &up,
        &proxy,
        "proxy_username = 'CORP\\svc-gw'\nproxy_password_env = \"PA_WRONG_PASSWORD\"\n",
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    let started = std::time::Instant::now();
    let r = c.get(&gw.url("/crm/w")).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "upstream_unreachable");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("proxy authentication"), "{msg}");
    assert!(msg.contains("rejected the NTLM credentials"), "{msg}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // One handshake: offer, challenge, refused AUTHENTICATE; never a loop.
    let seen = proxy.seen();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(proxy.tunnels(), 0);
    assert_eq!(failures(&c, &gw).await, 1.0);
    let status = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(status["proxy_auth"]["failures"], 1);
    assert_no_secret(&c, &gw, &[&r.text()]).await;
    assert!(!r.text().contains(WRONG));
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_asking_for_a_scheme_without_credentials_fails_fast() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["Negotiate", "NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config_direct_idp(&idp, &up, &proxy, "");
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    let r = c.get(&gw.url("/crm/n")).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("proxy authentication"), "{msg}");
    assert!(msg.contains("Negotiate, NTLM"), "{msg}");
    assert!(msg.contains("proxy_username"), "{msg}");
    // Plain http without a way to authenticate goes in absolute form: the 407
    // comes as the answer to the request itself, and is not passed on.
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen[0].line.starts_with("GET http://localhost:"),
        "{seen:#?}"
    );
    assert_eq!(failures(&c, &gw).await, 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_proxy_that_closes_after_the_ntlm_challenge_fails_in_bounded_rounds() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .close_after_every_407()
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config_direct_idp(&idp, &up, &proxy, NTLM_ACCOUNT);
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let r = Client::new().get(&gw.url("/crm/d")).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("proxy authentication"), "{msg}");
    // Offer, challenge (closed), started over once: challenge (closed), give up.
    assert_eq!(proxy.seen().len(), 3, "{:#?}", proxy.seen());
    gw.stop().await;
}

/// A TLS endpoint for `localhost` in front of the plain server at `to`.
async fn tls_front(to: std::net::SocketAddr, dir: &std::path::Path) -> (u16, String) {
    let authority = ca("proxy-auth test CA");
    let server = leaf(&authority, &["localhost"], false);
    let ca_path = write(dir, &format!("front-ca-{}.pem", to.port()), &authority.pem);
    let (certs, key) = server.identity();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut back) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            });
        }
    });
    (port, ca_path)
}

#[tokio::test]
async fn https_upstream_and_token_endpoint_through_an_ntlm_proxy() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["Negotiate", "NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let (idp_port, idp_ca) = tls_front(idp.addr, dir.path()).await;
    let (up_port, up_ca) = tls_front(up.addr, dir.path()).await;
    std::env::set_var("PA_CLIENT_SECRET", "client-secret-pa");
    std::env::set_var("PA_PROXY_PASSWORD", PASSWORD);
    let toml = format!(
        r#"
[providers.crm]
grant = "client_credentials"
token_url = "https://localhost:{idp_port}/token"
client_id = "pa"
client_secret_env = "PA_CLIENT_SECRET"
ca = "{idp_ca}"

[[routes]]
name = "crm"
prefix = "/crm"
upstream = "https://localhost:{up_port}"
provider = "crm"
ca = "{up_ca}"

[outbound]
proxy = "{p}"
{NTLM_ACCOUNT}"#,
        p = proxy.url()
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let r = Client::new().get(&gw.url("/crm/tls")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.last().uri, "/tls");
    let seen = proxy.seen();
    for port in [idp_port, up_port] {
        let line = format!("CONNECT localhost:{port} HTTP/1.1");
        let statuses: Vec<u16> = seen
            .iter()
            .filter(|s| s.line == line)
            .map(|s| s.status)
            .collect();
        assert_eq!(statuses, [407, 407, 200], "{seen:#?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn authgate_token_fetches_through_the_ntlm_proxy() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let toml = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n{}",
        config(&idp, &up, &proxy, NTLM_ACCOUNT)
    );
    std::fs::write(&path, toml).unwrap();
    let run = |password: &str| {
        let path = path.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_authgate"))
                .args(["token", "crm", "--config"])
                .arg(&path)
                .env("PA_PROXY_PASSWORD", password)
                .output()
                .unwrap()
        })
    };
    let ok = run(PASSWORD).await.unwrap();
    let out =
        String::from_utf8_lossy(&ok.stdout).into_owned() + &String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{out}");
    assert_eq!(proxy.tunnels(), 1);

    let bad = run(WRONG).await.unwrap();
    let out =
        String::from_utf8_lossy(&bad.stdout).into_owned() + &String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{out}");
    assert!(out.contains("proxy authentication"), "{out}");
    assert!(!out.contains(WRONG), "{out}");
}

fn check(toml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "proxy.toml");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn proxy_auth_settings_are_checked_with_file_line_and_key() {
    let base =
        "[listen]\naddr = \"127.0.0.1:0\"\n\n[outbound]\nproxy = \"http://proxy.corp:3128\"\n";
    let (code, err) = check(&format!("{base}proxy_auth = \"kerberos\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxy.toml:6:1: outbound.proxy_auth: unknown proxy_auth \"kerberos\" (known: auto, negotiate, ntlm, basic, none)"),
        "{err}"
    );
    let (code, err) = check(&format!("{base}proxy_username = \"CORP\\\\svc\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("outbound.proxy_username: needs proxy_password_env or proxy_password_file"),
        "{err}"
    );
    let (code, err) = check(&format!("{base}proxy_auth_scheme = \"ntlm\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("proxy_auth_scheme"), "{err}");
    let (code, err) = check(&format!("{base}proxy_password_env = \"X\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("outbound.proxy_password_env: needs proxy_username"),
        "{err}"
    );
    if cfg!(not(windows)) {
        let (code, err) = check(&format!("{base}proxy_auth = \"ntlm\"\n"));
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("outbound.proxy_auth: proxy_auth = \"ntlm\" needs proxy_username"),
            "{err}"
        );
    }
    let (code, err) = check(&format!(
        "{base}proxy_auth = \"ntlm\"\nproxy_username = 'CORP\\svc'\nproxy_password_env = \"X\"\n"
    ));
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn a_plain_http_token_endpoint_behind_a_proxy_without_credentials_gives_503() {
    let proxy = TestProxy::ntlm("CORP", "svc-gw", PASSWORD)
        .offering(&["NTLM"])
        .start()
        .await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &up, &proxy, "")).await;
    let c = Client::new();
    let r = c.get(&gw.url("/crm/t")).await;
    let body = r.json();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("proxy_authentication_failed"), "{msg}");
    assert_eq!(idp.requests(), 0);
    let seen = proxy.seen();
    assert!(
        seen[0].line.starts_with("POST http://127.0.0.1:"),
        "{seen:#?}"
    );
    assert!(failures(&c, &gw).await >= 1.0);
    gw.stop().await;
}
