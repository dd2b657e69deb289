//! Callers: identification by address, key and certificate, route ACLs, and the
//! broker API that hands tokens to the callers a provider exposes them to.

use std::path::Path;

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

const BILLING_KEY: &str = "sec-billing-key-5b1d0e9c";

fn caller_config(up: &MockUpstream) -> String {
    std::env::set_var("SEC_BILLING_KEY", BILLING_KEY);
    format!(
        r#"
[callers.local]
addrs = ["127.0.0.1/32"]
key_env = "SEC_BILLING_KEY"

[callers.remote]
addrs = ["10.0.0.0/8"]

[callers.local_open]
addrs = ["127.0.0.1/32"]

[[routes]]
prefix = "/keyed"
upstream = "{u}"
allow = ["local"]

[[routes]]
prefix = "/any"
upstream = "{u}"

[[routes]]
prefix = "/remote-only"
upstream = "{u}"
allow = ["remote"]
"#,
        u = up.url()
    )
}

#[tokio::test]
async fn callers_by_address_and_key_and_route_acl() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&caller_config(&up)).await;
    let c = Client::new();

    // Right key from an allowed network: identified as `local`, allowed.
    let r = c
        .send(
            Method::GET,
            &gw.url("/keyed/a"),
            &[
                ("x-authgate-key", BILLING_KEY),
                ("authorization", "Bearer caller-own-credential"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.last();
    assert!(seen.headers.get("x-authgate-key").is_none());
    assert!(seen.headers.get("authorization").is_none());
    let raw = format!("{:?}", seen.headers);
    assert!(!raw.contains(BILLING_KEY) && !raw.contains("caller-own-credential"));

    // Wrong key: falls through to `local_open` (address only), not allowed here.
    let before = up.count();
    for key in [Some("wrong-key"), None] {
        let h: Vec<(&str, &str)> = key.map(|k| ("x-authgate-key", k)).into_iter().collect();
        let r = c
            .send(Method::GET, &gw.url("/keyed/a"), &h, Bytes::new())
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "key {key:?}");
        assert_eq!(r.json()["error"], "caller_forbidden");
        assert!(!r.text().contains("wrong-key"));
    }
    assert_eq!(up.count(), before);

    // A route open to every identified caller.
    let r = c.get(&gw.url("/any/b")).await;
    assert_eq!(r.status, StatusCode::OK);

    // Only 10.0.0.0/8 allowed: a loopback caller is refused.
    let r = c.get(&gw.url("/remote-only/c")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert_eq!(up.count(), before + 1);
}

#[tokio::test]
async fn unidentified_caller_is_forbidden() {
    let up = MockUpstream::start().await;
    let toml = format!(
        r#"
[callers.remote]
addrs = ["10.0.0.0/8"]

[[routes]]
prefix = "/any"
upstream = "{u}"
"#,
        u = up.url()
    );
    let gw = TestGateway::start(&toml).await;
    let r = Client::new().get(&gw.url("/any/x")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert_eq!(up.count(), 0);
}

const BROKER_SECRET: &str = "sec-broker-client-secret-77a1";

fn broker_config(idp: &MockIdp, up: &MockUpstream, audit: &Path) -> String {
    std::env::set_var("SEC_BROKER_SECRET", BROKER_SECRET);
    std::env::set_var("SEC_REPORTS_KEY", "sec-reports-key-0f3e");
    format!(
        r#"
[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "broker-test"
client_secret_env = "SEC_BROKER_SECRET"
expose_to = ["reports"]

[providers.erp]
grant = "client_credentials"
token_url = "{idp}"
client_id = "broker-test-2"
client_secret_env = "SEC_BROKER_SECRET"

[callers.reports]
key_env = "SEC_REPORTS_KEY"

[callers.billing]
addrs = ["127.0.0.1/32"]

[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"

[audit]
file = "{audit}"
"#,
        audit = audit.display(),
        idp = idp.token_url(),
        up = up.url()
    )
}

#[tokio::test]
async fn broker_api_hands_out_to_exposed_callers_only() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    // Outside the gateway's folder, which goes away with it.
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let gw = TestGateway::start(&broker_config(&idp, &up, &audit_path)).await;
    gw.ready().await;
    let c = Client::new();
    let reports = [("x-authgate-key", "sec-reports-key-0f3e")];

    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &reports,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    let token = j["access_token"].as_str().unwrap().to_owned();
    assert!(idp.is_valid(&token));
    assert_eq!(j["token_type"], "Bearer");
    assert!(j["expires_in"].as_u64().is_some());
    let mut keys: Vec<_> = j.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["access_token", "expires_in", "token_type"]);

    // Another identified caller: refused.
    let r = c.get(&gw.url("/.authgate/token/crm")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "caller_forbidden");
    assert!(!r.text().contains(&token));

    // A provider without expose_to: refused to everyone.
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/erp"),
            &reports,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // A burst: cell reads only, no token request.
    let before = idp.requests();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = c.clone();
        let url = gw.url("/.authgate/token/crm");
        tasks.push(tokio::spawn(async move {
            c.send(
                Method::GET,
                &url,
                &[("x-authgate-key", "sec-reports-key-0f3e")],
                Bytes::new(),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(idp.requests(), before);

    gw.stop().await;
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let handouts: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "token_handout")
        .collect();
    assert_eq!(
        handouts
            .iter()
            .filter(|v| v["status"] == 200 && v["caller"] == "reports")
            .count(),
        201
    );
    assert_eq!(handouts.iter().filter(|v| v["status"] == 403).count(), 2);
    assert!(!audit.contains(&token));
}
