//! Token lifecycle: grants, single-flight refresh, replay, failures.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hyper::{Method, StatusCode};

use crate::support::idp::Failure;
use crate::support::{until, Client, MockIdp, MockUpstream, TestGateway};

const SECRET: &str = "cs-very-secret-123";

fn cc_config(idp: &MockIdp, up: &MockUpstream, extra_provider: &str, extra_route: &str) -> String {
    std::env::set_var("TOK_CLIENT_SECRET", SECRET);
    format!(
        r#"
[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "billing gw/1"
client_secret_env = "TOK_CLIENT_SECRET"
scope = "invoices.read"
min_refresh_interval = "0s"
{extra_provider}

[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"
{extra_route}
"#,
        idp = idp.token_url(),
        up = up.url()
    )
}

async fn setup(extra_provider: &str, extra_route: &str) -> (MockIdp, MockUpstream, TestGateway) {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up, extra_provider, extra_route)).await;
    gw.ready().await;
    (idp, up, gw)
}

async fn burst(gw: &TestGateway, n: usize) -> Vec<StatusCode> {
    let c = Client::new();
    let futs = (0..n).map(|i| {
        let c = c.clone();
        let url = gw.url(&format!("/crm/items/{i}"));
        async move { c.get(&url).await.status }
    });
    join_all(futs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_after_revocation_makes_one_token_request() {
    let (idp, up, gw) = setup("", "").await;
    assert_eq!(idp.requests(), 1, "one start-up fetch");
    idp.revoke_all();
    let statuses = burst(&gw, 1000).await;
    let bad: Vec<_> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(idp.requests(), 2, "exactly one refresh for 1000 requests");
    assert!(up.unauthorized() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_with_a_slow_idp_makes_one_token_request() {
    let (idp, _up, gw) = setup("", "").await;
    idp.set_delay(Duration::from_millis(500));
    idp.revoke_all();
    let statuses = burst(&gw, 1000).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(idp.requests(), 2);
}

#[tokio::test]
async fn an_older_generation_is_replayed_without_a_new_refresh() {
    let (idp, _up, gw) = setup("", "").await;
    let p = gw.provider("crm");
    let g1 = p.current().unwrap().generation;
    idp.revoke_all();
    let fresh = p
        .after_unauthorized(g1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(fresh.generation, g1 + 1);
    assert_eq!(idp.requests(), 2);
    // Another request that had sent g1 learns about g1+1 without a refresh.
    let again = p
        .after_unauthorized(g1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.generation, g1 + 1);
    assert_eq!(idp.requests(), 2);
}

#[tokio::test]
async fn post_body_is_identical_on_replay() {
    let (idp, up, gw) = setup("", "").await;
    idp.revoke_all();
    let body = "{\"amount\": 42, \"currency\": \"EUR\"}".repeat(100);
    let r = Client::new()
        .send(
            Method::POST,
            &gw.url("/crm/invoices"),
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "the original and the replay");
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(seen[1].body, body.as_bytes());
    assert_ne!(
        seen[0].headers["authorization"],
        seen[1].headers["authorization"]
    );
}

#[tokio::test]
async fn a_body_over_the_replay_limit_streams_and_its_401_is_returned() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = cc_config(&idp, &up, "", "").replace(
        "[providers.crm]",
        "[listen]\naddr = \"127.0.0.1:0\"\nmax_replay_body = \"1KiB\"\n\n[providers.crm]",
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    idp.revoke_all();
    let r = Client::new()
        .send(Method::POST, &gw.url("/crm/upload"), &[], vec![b'z'; 4096])
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "not replayable: the 401 goes back"
    );
    assert_eq!(
        up.last().body.len(),
        4096,
        "the body streamed through whole"
    );
    // The refresh still happened, for the requests after it.
    until("the 401-driven refresh", || async { idp.requests() >= 2 }).await;
    let r = Client::new()
        .send(Method::POST, &gw.url("/crm/upload"), &[], vec![b'z'; 4096])
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn replay_false_returns_the_401_but_still_refreshes() {
    let (idp, _up, gw) = setup("", "replay = false").await;
    idp.revoke_all();
    let r = Client::new().get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    until("the 401-driven refresh", || async { idp.requests() >= 2 }).await;
    assert_eq!(
        Client::new().get(&gw.url("/crm/x")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_401_naming_another_error_triggers_no_refresh() {
    let (idp, up, gw) = setup("", "").await;
    *up.state.challenge.lock().unwrap() = Some(r#"Bearer error="invalid_request""#.into());
    idp.revoke_all();
    let r = Client::new().get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.requests(), 1);
}

#[tokio::test]
async fn an_identical_token_is_not_replayed_with() {
    let (idp, up, gw) = setup("", "").await;
    *idp.state.fixed_token.lock().unwrap() = Some("tok-1".into());
    up.state
        .reject_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let g = gw.provider("crm").current().unwrap().generation;
    let r = Client::new().get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.requests(), 2, "refreshed once");
    assert_eq!(
        up.count(),
        1,
        "but not replayed: the IdP returned the same token"
    );
    assert_eq!(gw.provider("crm").current().unwrap().generation, g);
    // The refresh did not get past the rejected token: it says so, without backoff.
    let status = gw.provider("crm").status();
    let last = status.last_refresh.unwrap();
    assert_eq!(
        (last.outcome, last.error.as_deref()),
        ("error", Some("token_unchanged"))
    );
    assert_eq!(status.retry_in_s, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rejecting_every_token_causes_bounded_refreshes() {
    let (idp, up, gw) = setup("", "").await;
    // The default min_refresh_interval here.
    drop(gw);
    let gw = TestGateway::start(
        &cc_config(&idp, &up, "", "").replace("min_refresh_interval = \"0s\"", ""),
    )
    .await;
    gw.ready().await;
    up.state
        .reject_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let before = idp.requests();
    let started = std::time::Instant::now();
    // At least a second of traffic: a fast machine serves 500 requests inside the
    // first 100 ms spacing after the start-up fetch, where no refresh is due yet.
    let mut sent = 0;
    while sent < 500 || started.elapsed() < std::time::Duration::from_secs(1) {
        let statuses = burst(&gw, 100).await;
        assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
        sent += 100;
    }
    let secs = started.elapsed().as_secs_f64();
    let refreshes = idp.requests() - before;
    // 100 ms, then doubling after each refresh the API also rejected: the count
    // grows with the logarithm of time, not with the number of requests.
    let bound = 2.0 + (secs / 0.1 + 1.0).log2();
    assert!(
        refreshes >= 1 && refreshes as f64 <= bound,
        "{refreshes} refreshes in {secs:.1}s for {sent} requests"
    );
}

#[tokio::test]
async fn idp_down_fails_fast_with_503_and_bounded_token_requests() {
    let idp = MockIdp::start().await;
    idp.fail_with(Some(Failure::Status(503, "{}".into())));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up, "", "")).await;
    let c = Client::new();
    // The first request waits for the first fetch, which fails.
    let r = c.get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // Failing fast (no wait, at most one token request in flight) is timed on a
    // paused clock in the token core's unit tests; here, the answer's shape.
    for _ in 0..300 {
        let r = c.get(&gw.url("/crm/x")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.json()["error"], "token_unavailable");
        assert_eq!(r.json()["provider"], "crm");
        let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(ra >= 1);
    }
    assert!(idp.requests() <= 4, "{} token requests", idp.requests());
    assert_eq!(up.count(), 0);
    // Recovery: the background refresher retries with backoff.
    idp.fail_with(None);
    until("recovery", || async { gw.provider("crm").is_ready() }).await;
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
}

/// End to end: a token about to expire is replaced in the background, and no
/// request carries an expired one. When exactly the refresh comes (the margin and
/// its jitter) is timed on a paused clock in the token core's unit tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_refresh_keeps_short_lived_tokens_fresh() {
    let idp = MockIdp::start().await;
    // Tokens live 2 s: the refresh is due after about 1 s.
    idp.set_expires_in(Some(serde_json::json!(2)));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up, "", "")).await;
    gw.ready().await;
    let c = Client::new();
    let first = gw.provider("crm").current().unwrap().generation;
    until("a proactive refresh", || async {
        assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
        gw.provider("crm").current().unwrap().generation > first
    })
    .await;
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    assert_eq!(
        up.unauthorized(),
        0,
        "no request ever carried an expired token"
    );
    let refreshes = gw.app().gateway.metrics.render();
    assert!(refreshes.contains(
        r#"authgate_token_refreshes_total{provider="crm",trigger="expiry",outcome="ok"}"#
    ));
}

#[tokio::test]
async fn client_secret_basic_and_form_fields_follow_rfc6749() {
    let (idp, _up, _gw) = setup(
        "audience = \"api://crm\"\nresource = \"https://api.crm.example\"",
        "",
    )
    .await;
    let seen = &idp.seen()[0];
    assert_eq!(seen.get("grant_type"), Some("client_credentials"));
    assert_eq!(seen.get("scope"), Some("invoices.read"));
    assert_eq!(seen.get("audience"), Some("api://crm"));
    assert_eq!(seen.get("resource"), Some("https://api.crm.example"));
    assert_eq!(seen.get("client_secret"), None, "never by two methods");
    use base64::Engine as _;
    let b64 = seen
        .authorization
        .as_deref()
        .unwrap()
        .strip_prefix("Basic ")
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!("billing+gw%2F1:{SECRET}")
    );
}

#[tokio::test]
async fn client_secret_post_sends_the_secret_in_the_body_only() {
    let (idp, _up, _gw) = setup("client_auth = \"client_secret_post\"", "").await;
    let seen = &idp.seen()[0];
    assert_eq!(seen.get("client_id"), Some("billing gw/1"));
    assert_eq!(seen.get("client_secret"), Some(SECRET));
    assert!(seen.authorization.is_none());
}

#[tokio::test]
async fn private_key_jwt_assertion_verifies_with_the_public_key() {
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-key.pem"), key.serialize_pem()).unwrap();
    let idp = MockIdp::start().await;
    *idp.state.jwt_key.lock().unwrap() = Some((
        jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap(),
        jsonwebtoken::Algorithm::ES256,
    ));
    let up = MockUpstream::with_idp(&idp).await;
    let toml = format!(
        r#"
[providers.crm]
grant = "client_credentials"
token_url = "{}"
client_id = "jwt-client"
client_auth = "private_key_jwt"
client_key = "client-key.pem"
client_key_id = "k1"
client_key_alg = "ES256"

[[routes]]
prefix = "/crm"
upstream = "{}"
provider = "crm"
"#,
        idp.token_url(),
        up.url()
    );
    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    gw.ready().await;
    let seen = &idp.seen()[0];
    assert_eq!(
        seen.get("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let assertion = seen.get("client_assertion").unwrap();
    let header = jsonwebtoken::decode_header(assertion).unwrap();
    assert_eq!(header.kid.as_deref(), Some("k1"));
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[idp.token_url()]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["iss"], "jwt-client");
    assert_eq!(claims["sub"], "jwt-client");
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16));
    assert!(claims["exp"].as_u64().unwrap() <= claims["iat"].as_u64().unwrap() + 300);
    assert_eq!(
        Client::new().get(&gw.url("/crm/x")).await.status,
        StatusCode::OK
    );
}

fn rt_config(idp: &MockIdp, up: &MockUpstream, var: &str) -> String {
    format!(
        r#"
[providers.crm]
grant = "refresh_token"
token_url = "{}"
client_id = "public-app"
refresh_token_env = "{var}"
min_refresh_interval = "0s"

[[routes]]
prefix = "/crm"
upstream = "{}"
provider = "crm"
"#,
        idp.token_url(),
        up.url()
    )
}

#[tokio::test]
async fn rotation_always_keeps_the_newest_refresh_token() {
    std::env::set_var("TOK_RT_ROTATE", "rt-0");
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&rt_config(&idp, &up, "TOK_RT_ROTATE")).await;
    gw.ready().await;
    for _ in 0..4 {
        idp.revoke_all();
        assert_eq!(
            Client::new().get(&gw.url("/crm/x")).await.status,
            StatusCode::OK
        );
    }
    let seen = idp.seen();
    assert_eq!(seen.len(), 5);
    // Each refresh presented the refresh token issued by the one before.
    assert_eq!(seen[0].get("refresh_token"), Some("rt-0"));
    for w in seen.windows(2) {
        assert_ne!(w[0].get("refresh_token"), w[1].get("refresh_token"));
    }
    assert!(gw.provider("crm").status().last_refresh.unwrap().outcome == "ok");
}

#[tokio::test]
async fn invalid_grant_means_reauthorization_required_without_retries() {
    std::env::set_var("TOK_RT_BAD", "rt-unknown");
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&rt_config(&idp, &up, "TOK_RT_BAD")).await;
    let r = Client::new().get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("reauthorization required"));
    for _ in 0..50 {
        assert_eq!(
            Client::new().get(&gw.url("/crm/x")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(idp.requests(), 1, "no retry loop on invalid_grant");
    assert!(gw.provider("crm").status().reauth_required);
}

#[tokio::test]
async fn requests_before_the_first_token_wait_for_it() {
    let idp = MockIdp::start().await;
    idp.set_delay(Duration::from_millis(300));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up, "", "")).await;
    let statuses = burst(&gw, 50).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(idp.requests(), 1);
}

#[tokio::test]
async fn token_values_never_reach_logs_errors_or_debug() {
    let logs = crate::support::captured_logs();
    let (idp, up, gw) = setup("", "").await;
    idp.revoke_all();
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    up.state
        .reject_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = c.get(&gw.url("/crm/x")).await;
    let p = gw.provider("crm");
    let debug = format!("{:?} {:?} {:?}", p.current(), p, p.status());
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    for secret in ["tok-1", "tok-2", SECRET] {
        assert!(!text.contains(secret), "{secret} in logs");
        assert!(!debug.contains(secret), "{secret} in Debug");
        assert!(!r.text().contains(secret), "{secret} in an error body");
    }
}

#[tokio::test]
async fn token_command_prints_metadata_and_hides_the_token() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let toml = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{}",
        cc_config(&idp, &up, "", "")
    );
    std::fs::write(&path, toml).unwrap();
    let bin = env!("CARGO_BIN_EXE_authgate");
    let run = |reveal: bool| {
        let path = path.clone();
        async move {
            let mut cmd = tokio::process::Command::new(bin);
            cmd.args(["token", "crm", "--config"])
                .arg(&path)
                .env("TOK_CLIENT_SECRET", SECRET);
            if reveal {
                cmd.arg("--reveal");
            }
            cmd.output().await.unwrap()
        }
    };
    let out = run(false).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("generation: 1")
            && stdout.contains("expires_in: 3")
            && stdout.contains("scope:")
    );
    assert!(!stdout.contains("tok-"));
    let out = run(true).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("token:      tok-2"));
    // Refused by the IdP: the OAuth error code is named.
    idp.fail_with(Some(Failure::Status(
        401,
        r#"{"error":"invalid_client"}"#.into(),
    )));
    let out = run(false).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_client"));
    let _ = Arc::new(());
}

#[tokio::test]
async fn retry_after_from_the_idp_is_honoured() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    // A 429 with an OAuth body and `retry-after: 7`: transient, and the next
    // attempt waits as told (not the 1 s first backoff, nor a client-error pause).
    idp.fail_with(Some(Failure::Status(
        429,
        r#"{"error":"slow_down"}"#.into(),
    )));
    *idp.state.retry_after.lock().unwrap() = Some(7);
    let gw = TestGateway::start(&cc_config(&idp, &up, "", "")).await;
    let r = Client::new().get(&gw.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((6..=7).contains(&ra), "retry-after {ra}");
    let status = gw.provider("crm").status();
    assert_eq!(
        status.last_refresh.as_ref().unwrap().error.as_deref(),
        Some("slow_down")
    );
    assert!(
        status.retry_in_s.is_some_and(|s| (5..=7).contains(&s)),
        "{:?}",
        status.retry_in_s
    );
    assert_eq!(idp.requests(), 1);
}

#[tokio::test]
async fn invalid_client_is_reported_and_not_hammered() {
    let idp = MockIdp::start().await;
    idp.fail_with(Some(Failure::Status(
        401,
        r#"{"error":"invalid_client","error_description":"bad secret"}"#.into(),
    )));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up, "", "")).await;
    let c = Client::new();
    for _ in 0..100 {
        let r = c.get(&gw.url("/crm/x")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.json()["message"]
            .as_str()
            .unwrap()
            .contains("invalid_client"));
        let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(ra >= 10, "slow retry for a client error: retry-after {ra}");
    }
    assert_eq!(idp.requests(), 1);
    let st = gw.provider("crm").status();
    assert_eq!(
        st.last_refresh.unwrap().error.as_deref(),
        Some("invalid_client")
    );
}

#[tokio::test]
async fn token_expiry_gauge_counts_down_at_scrape_time() {
    let idp = MockIdp::start().await;
    idp.set_expires_in(Some(serde_json::json!(30)));
    let up = MockUpstream::with_idp(&idp).await;
    let toml = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\n{}",
        cc_config(&idp, &up, "", "")
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let value = |text: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(r#"authgate_token_expiry_seconds{provider="crm"}"#))
            .unwrap()
            .to_owned();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let text = Client::new().get(&gw.admin_url("/metrics")).await.text();
    assert!(
        !text.contains(r#"authgate_replays_total{route="""#),
        "requests without a route are never replayed: no series for them"
    );
    let first = value(&text);
    assert!(first > 25.0 && first <= 30.0, "{first}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = value(&Client::new().get(&gw.admin_url("/metrics")).await.text());
    assert!(later < first, "{later} !< {first}");
}

#[tokio::test]
async fn a_trickled_body_is_bounded_by_the_route_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_idp, up, gw) = setup("", "timeout = \"300ms\"").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Promise 100 bytes, send 10, then stall.
    s.write_all(b"POST /crm/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"));
    assert_eq!(up.count(), 0, "nothing half-sent upstream");
}
