//! The audit log's request and token lines field by field, and no secret (token,
//! client secret, caller key, chain key) anywhere: logs, audit, metrics, status,
//! error bodies.

use std::path::Path;

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

const AUDIT_SECRET: &str = "sec-audit-client-secret-4c2f9a";
const AUDIT_STATIC: &str = "sec-static-api-key-91be37";
const AUDIT_CALLER_KEY: &str = "sec-caller-key-d80a61";
const AUDIT_CHAIN_KEY: &str = "sec-audit-chain-key-5e7b20";

fn scenario_config(idp: &MockIdp, up: &MockUpstream, plain: &MockUpstream, audit: &Path) -> String {
    std::env::set_var("SEC_AUDIT_SECRET", AUDIT_SECRET);
    std::env::set_var("SEC_AUDIT_STATIC", AUDIT_STATIC);
    std::env::set_var("SEC_AUDIT_CALLER_KEY", AUDIT_CALLER_KEY);
    std::env::set_var("SEC_AUDIT_CHAIN_KEY", AUDIT_CHAIN_KEY);
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[audit]
file = "{audit}"
key_env = "SEC_AUDIT_CHAIN_KEY"

[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "audit-test"
client_secret_env = "SEC_AUDIT_SECRET"
min_refresh_interval = "0s"
expose_to = ["svc"]

[providers.key]
grant = "static"
token_env = "SEC_AUDIT_STATIC"
header = "x-api-key"
scheme = ""

[callers.svc]
key_env = "SEC_AUDIT_CALLER_KEY"

[callers.local]
addrs = ["127.0.0.1/32"]

[callers.remote]
addrs = ["10.0.0.0/8"]

[[routes]]
prefix = "/crm"
upstream = "{u}"
provider = "crm"

[[routes]]
prefix = "/key"
upstream = "{p}"
provider = "key"

[[routes]]
prefix = "/forbidden"
upstream = "{u}"
allow = ["remote"]
"#,
        audit = audit.display(),
        idp = idp.token_url(),
        u = up.url(),
        p = plain.url()
    )
}

/// Runs requests of every outcome; answers the access tokens handed out.
async fn run_scenario(gw: &TestGateway, idp: &MockIdp) -> Vec<String> {
    let c = Client::new();
    let key = [("x-authgate-key", AUDIT_CALLER_KEY)];
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/a?q=query-secret"),
            &key,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c.get(&gw.url("/key/b")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        c.get(&gw.url("/nothing")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&gw.url("/forbidden/x")).await.status,
        StatusCode::FORBIDDEN
    );
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/a"),
            &[("x-authgate-key", "wrong")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "falls through to `local`");
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &key,
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let first = r.json()["access_token"].as_str().unwrap().to_owned();
    // Revocation: the next request gets a 401, a refresh and one replay.
    idp.revoke_all();
    let r = c
        .send(Method::POST, &gw.url("/crm/replayed"), &key, "payload")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c
        .send(
            Method::GET,
            &gw.url("/.authgate/token/crm"),
            &key,
            Bytes::new(),
        )
        .await;
    let second = r.json()["access_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    vec![first, second]
}

fn audit_lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    text.lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("not a JSON object line: {l:?} ({other:?})"),
        })
        .collect()
}

fn keys(m: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    let mut k: Vec<&str> = m.keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn assert_rfc3339(v: &serde_json::Value) {
    let s = v.as_str().expect("ts is a string");
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("ts {s:?}: {e}"));
}

#[tokio::test]
async fn audit_lines_match_the_contract_field_by_field() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let plain = MockUpstream::start().await;
    let gw = TestGateway::start(&scenario_config(&idp, &up, &plain, &audit_path)).await;
    gw.ready().await;
    run_scenario(&gw, &idp).await;
    gw.stop().await;

    let lines = audit_lines(&std::fs::read_to_string(&audit_path).unwrap());
    let requests: Vec<_> = lines.iter().filter(|m| !m.contains_key("event")).collect();
    let tokens: Vec<_> = lines
        .iter()
        .filter(|m| m.get("event").and_then(|e| e.as_str()) == Some("token_refresh"))
        .collect();

    const REQUEST_FIELDS: [&str; 16] = [
        "caller",
        "chain",
        "client_addr",
        "duration_ms",
        "error",
        "method",
        "path",
        "provider",
        "replayed",
        "request_id",
        "route",
        "seq",
        "status",
        "token_generation",
        "ts",
        "upstream_status",
    ];
    // Six proxied or refused requests, and the two broker calls (which also get a
    // `token_handout` line).
    assert_eq!(requests.len(), 8, "{requests:#?}");
    assert_eq!(
        requests
            .iter()
            .filter(|m| m["path"] == "/.authgate/token/crm")
            .count(),
        2
    );
    for m in &requests {
        assert_eq!(keys(m), REQUEST_FIELDS, "{m:?}");
        assert_rfc3339(&m["ts"]);
        assert!(m["request_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(m["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(m["method"].is_string());
        assert!(
            !m["path"].as_str().unwrap().contains('?'),
            "no query string"
        );
        assert!(m["status"].is_u64() && m["duration_ms"].is_u64());
        assert!(m["replayed"].is_boolean());
        assert!(m["error"].is_null() || m["error"].is_string());
    }
    let find = |path: &str, status: u64| {
        requests
            .iter()
            .find(|m| m["path"] == path && m["status"] == status)
            .unwrap_or_else(|| panic!("no line for {path} {status}: {requests:#?}"))
    };
    let ok = find("/crm/a", 200);
    assert_eq!(ok["caller"], "svc");
    assert_eq!(ok["route"], "/crm");
    assert_eq!(ok["provider"], "crm");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["upstream_status"], 200);
    assert_eq!(ok["token_generation"], 1);
    assert_eq!(ok["replayed"], false);
    assert!(ok["error"].is_null());

    let nf = find("/nothing", 404);
    assert_eq!(nf["error"], "no_route");
    assert!(nf["route"].is_null() && nf["provider"].is_null());
    assert!(nf["upstream_status"].is_null() && nf["token_generation"].is_null());

    let fb = find("/forbidden/x", 403);
    assert_eq!(fb["error"], "caller_forbidden");
    assert_eq!(fb["caller"], "local");
    assert!(fb["upstream_status"].is_null());

    let st = find("/key/b", 200);
    assert_eq!(st["provider"], "key");

    let rp = find("/crm/replayed", 200);
    assert_eq!(rp["method"], "POST");
    assert_eq!(rp["replayed"], true);
    assert_eq!(rp["upstream_status"], 200);
    assert_eq!(rp["token_generation"], 2, "generation of the last attempt");

    const TOKEN_FIELDS: [&str; 11] = [
        "chain",
        "duration_ms",
        "error",
        "event",
        "expires_in_s",
        "generation",
        "outcome",
        "provider",
        "seq",
        "trigger",
        "ts",
    ];
    assert!(tokens.len() >= 2, "{tokens:#?}");
    for m in &tokens {
        assert_eq!(keys(m), TOKEN_FIELDS, "{m:?}");
        assert_rfc3339(&m["ts"]);
        assert!(["startup", "expiry", "unauthorized", "manual"]
            .contains(&m["trigger"].as_str().unwrap()));
        assert!(["ok", "error"].contains(&m["outcome"].as_str().unwrap()));
        assert!(m["duration_ms"].is_u64());
    }
    let startup = tokens.iter().find(|m| m["trigger"] == "startup").unwrap();
    assert_eq!(startup["provider"], "crm");
    assert_eq!(startup["outcome"], "ok");
    assert_eq!(startup["generation"], 1);
    assert!(startup["expires_in_s"].is_u64());
    assert!(startup["error"].is_null());
    let unauth = tokens
        .iter()
        .find(|m| m["trigger"] == "unauthorized")
        .unwrap();
    assert_eq!(unauth["outcome"], "ok");
    assert_eq!(unauth["generation"], 2);
}

#[tokio::test]
async fn no_secret_in_logs_audit_metrics_status_or_errors() {
    let logs = crate::support::captured_logs();
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let keep = tempfile::tempdir().unwrap();
    let audit_path = keep.path().join("audit.log");
    let plain = MockUpstream::start().await;
    let gw = TestGateway::start(&scenario_config(&idp, &up, &plain, &audit_path)).await;
    gw.ready().await;
    let mut secrets = run_scenario(&gw, &idp).await;
    // Errors too: an IdP that now refuses, a forced refresh that fails.
    idp.fail_with(Some(crate::support::idp::Failure::Status(
        401,
        r#"{"error":"invalid_client"}"#.into(),
    )));
    idp.revoke_all();
    let c = Client::new();
    let r = c
        .send(
            Method::GET,
            &gw.url("/crm/after"),
            &[("x-authgate-key", AUDIT_CALLER_KEY)],
            Bytes::new(),
        )
        .await;
    let mut outputs = vec![r.text()];
    for path in ["/metrics", "/status", "/readyz"] {
        outputs.push(c.get(&gw.admin_url(path)).await.text());
    }
    outputs.push(format!("{:?}", gw.app().gateway.snapshot().config));
    gw.stop().await;
    outputs.push(std::fs::read_to_string(&audit_path).unwrap());
    outputs.push(String::from_utf8_lossy(&logs.lock().unwrap()).into_owned());

    // Every token the IdP issued, as the upstream saw it.
    for s in up.seen() {
        if let Some(t) = s.headers.get("authorization").and_then(|v| v.to_str().ok()) {
            secrets.push(t.trim_start_matches("Bearer ").to_owned());
        }
    }
    secrets.sort();
    secrets.dedup();
    secrets.extend([
        AUDIT_SECRET.to_owned(),
        AUDIT_STATIC.to_owned(),
        AUDIT_CALLER_KEY.to_owned(),
        AUDIT_CHAIN_KEY.to_owned(),
        "query-secret".to_owned(),
    ]);
    assert!(secrets.len() >= 6, "{secrets:?}");
    for (i, out) in outputs.iter().enumerate() {
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "output #{i} contains {s:?}");
        }
    }
    // The logs did capture the scenario (the search ran over something real).
    assert!(!outputs.last().unwrap().is_empty());
}
