//! The operator console on the admin listener: the page, `/events`, the forced
//! refresh, reauthorization (authorization code + PKCE) and the guard of the
//! actions. Browser-driven checks are in `browser.rs`.

use hyper::{Method, StatusCode};

use crate::support::idp::Failure;
use crate::support::{until, Client, MockIdp, MockUpstream, TestGateway};

const CLIENT_SECRET: &str = "console-client-secret-never-shown";
const ADMIN_KEY: &str = "console-admin-key-never-shown";

fn secrets() {
    std::env::set_var("CONSOLE_CLIENT_SECRET", CLIENT_SECRET);
    std::env::set_var("CONSOLE_ADMIN_KEY", ADMIN_KEY);
}

/// `crm` (client credentials, healthy) and `erp` (refresh token, `authorize_url`,
/// no refresh token yet), one route each; `admin` is the `[admin]` section.
fn config(idp: &MockIdp, up: &MockUpstream, admin: &str) -> String {
    secrets();
    format!(
        r#"
{admin}

[audit]
file = "{{dir}}/audit.log"

[store]
kind = "file"
path = "{{dir}}/state/tokens.json"

[providers.crm]
grant = "client_credentials"
token_url = "{t}"
client_id = "console"
client_secret_env = "CONSOLE_CLIENT_SECRET"
min_refresh_interval = "0s"

[providers.erp]
grant = "refresh_token"
token_url = "{t}"
authorize_url = "{a}"
client_id = "console-erp"
client_secret_env = "CONSOLE_CLIENT_SECRET"
scope = "erp.read offline_access"

[[routes]]
name = "crm"
prefix = "/crm"
upstream = "{u}"
provider = "crm"

[[routes]]
name = "erp"
prefix = "/erp"
upstream = "{u}"
provider = "erp"
"#,
        t = idp.token_url(),
        a = idp.authorize_url(),
        u = up.url()
    )
}

const OPEN_ADMIN: &str = "[admin]\naddr = \"127.0.0.1:0\"";

fn keyed_admin() -> String {
    "[admin]\naddr = \"127.0.0.1:0\"\nkey_env = \"CONSOLE_ADMIN_KEY\"".to_owned()
}

fn basic(password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"))
    )
}

/// Waits until `crm` holds a token and `erp` has found it has none.
async fn settled(gw: &TestGateway) {
    let crm = gw.provider("crm");
    let erp = gw.provider("erp");
    until("crm ready and erp waiting for reauthorization", || {
        let ok = crm.is_ready() && erp.status().reauth_required;
        async move { ok }
    })
    .await;
}

/// Everything a page or answer must never contain.
fn assert_no_secret(text: &str, idp: &MockIdp) {
    for secret in [
        CLIENT_SECRET,
        ADMIN_KEY,
        "tok-",
        "rt-0",
        "rt-auth-",
        "code-",
    ] {
        assert!(!text.contains(secret), "{secret:?} leaked into: {text}");
    }
    for rt in idp.current_refresh_tokens() {
        assert!(!text.contains(&rt), "refresh token leaked into: {text}");
    }
}

/// The `data-state` of `provider`'s row on the page.
fn row_state(html: &str, provider: &str) -> Option<String> {
    let row = html
        .split("<tr")
        .find(|r| r.contains(&format!("<span class=\"name\">{provider}</span>")))?;
    let at = row.find("data-state=\"")? + "data-state=\"".len();
    Some(row[at..].split('"').next()?.to_owned())
}

#[tokio::test]
async fn console_page_shows_states_routes_and_events() {
    let idp = MockIdp::start().await;
    let failing = MockIdp::start().await;
    failing.fail_with(Some(Failure::Status(
        500,
        r#"{"error":"server_error"}"#.into(),
    )));
    let slow = MockIdp::start().await;
    slow.fail_with(Some(Failure::Hang));
    let up = MockUpstream::with_idp(&idp).await;
    let mut toml = config(&idp, &up, OPEN_ADMIN);
    toml.push_str(&format!(
        r#"
[providers.billing]
grant = "client_credentials"
token_url = "{f}"
client_id = "console"
client_secret_env = "CONSOLE_CLIENT_SECRET"

[providers.slow]
grant = "client_credentials"
token_url = "{s}"
client_id = "console"
client_secret_env = "CONSOLE_CLIENT_SECRET"
timeout = "60s"

[[routes]]
name = "<i>odd</i>"
prefix = "/odd"
upstream = "{u}"
"#,
        f = failing.token_url(),
        s = slow.token_url(),
        u = up.url()
    ));
    let gw = TestGateway::start(&toml).await;
    settled(&gw).await;
    let billing = gw.provider("billing");
    until("billing failed once", || {
        let failed = billing.status().refreshes_failed > 0;
        async move { failed }
    })
    .await;
    let c = Client::new();
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    }
    assert_eq!(
        c.get(&gw.url("/crm/status/404")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&gw.url("/crm/status/502")).await.status,
        StatusCode::BAD_GATEWAY
    );

    let page = c.get(&gw.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(html.contains(r#"<meta http-equiv="refresh" content="5">"#));
    // Self-contained: no script, nothing loaded from elsewhere, links stay here.
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("src="), "{html}");
    for href in html.split("href=\"").skip(1) {
        assert!(href.starts_with('/'), "external link: {href}");
    }
    assert_eq!(row_state(&html, "crm").as_deref(), Some("ready"));
    assert_eq!(
        row_state(&html, "erp").as_deref(),
        Some("reauthorization required")
    );
    assert_eq!(row_state(&html, "billing").as_deref(), Some("failing"));
    assert_eq!(row_state(&html, "slow").as_deref(), Some("refreshing"));
    // What needs a person comes first, with its way out.
    let attention = html.find("Needs attention").expect("no attention section");
    let providers = html.find("<h2>Providers</h2>").unwrap();
    assert!(attention < providers);
    let top = &html[attention..providers];
    assert!(
        top.contains("<b>erp</b>") && top.contains("/providers/erp/authorize"),
        "{top}"
    );
    assert!(
        top.contains("<b>billing</b>") && top.contains("server_error"),
        "{top}"
    );
    assert!(!top.contains("<b>crm</b>"));
    // Routes with their traffic: 5 requests, one 4xx, one 5xx.
    let crm_route = html
        .split("<tr>")
        .find(|r| r.starts_with("<td class=\"name\">crm</td>"))
        .expect("no crm route row");
    let cells: Vec<&str> = crm_route
        .split("<td class=\"num")
        .skip(1)
        .map(|c| c.split('>').nth(1).unwrap().split('<').next().unwrap())
        .collect();
    assert_eq!(&cells[..4], ["5", "1", "1", "0"], "{crm_route}");
    assert!(cells[4].ends_with("ms"), "p99: {crm_route}");
    // Store, egress proxy, version, config path.
    assert!(html.contains("Token store") && html.contains(">file "));
    assert!(html.contains("Egress proxy"));
    assert!(html.contains(env!("CARGO_PKG_VERSION")));
    assert!(html.contains(&gw.config_path.display().to_string()));
    // Events: crm's start-up fetch.
    let events = &html[html.find("token events</h2>").unwrap()..];
    assert!(
        events.contains("<td class=\"name\">crm</td><td>startup</td>"),
        "{events}"
    );
    // Everything is escaped.
    assert!(html.contains("&lt;i&gt;odd&lt;/i&gt;"));
    assert!(!html.contains("<i>odd</i>"));
    assert_no_secret(&html, &idp);
}

#[tokio::test]
async fn events_are_served_as_json_with_the_audit_fields() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&idp, &up, OPEN_ADMIN)).await;
    settled(&gw).await;
    let c = Client::new();
    let reply = c.get(&gw.admin_url("/events")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let events = reply.json();
    let events = events.as_array().expect("an array");
    let crm = events
        .iter()
        .find(|e| e["provider"] == "crm")
        .expect("crm's start-up event");
    let mut keys: Vec<&str> = crm
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "duration_ms",
            "error",
            "event",
            "expires_in_s",
            "generation",
            "outcome",
            "provider",
            "trigger",
            "ts"
        ]
    );
    assert_eq!(crm["event"], "token_refresh");
    assert_eq!(crm["trigger"], "startup");
    assert_eq!(crm["outcome"], "ok");
    assert_eq!(crm["generation"], 1);
    let erp = events.iter().find(|e| e["provider"] == "erp").unwrap();
    assert_eq!(erp["outcome"], "error");
    assert_eq!(erp["error"], "no_refresh_token");
    assert_no_secret(&reply.text(), &idp);
}

#[tokio::test]
async fn forced_refresh_makes_a_new_generation_and_a_manual_event() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let mut toml = config(&idp, &up, OPEN_ADMIN);
    toml.push_str(&format!(
        "\n[providers.\"hr team/x\"]\ngrant = \"client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"hr\"\nclient_secret_env = \"CONSOLE_CLIENT_SECRET\"\n",
        idp.token_url()
    ));
    let gw = TestGateway::start(&toml).await;
    settled(&gw).await;
    let crm = gw.provider("crm");
    let before = crm.current().unwrap().generation;
    let own_origin = format!("http://{}", gw.admin.unwrap());
    let c = Client::new();
    let reply = c
        .send(
            Method::POST,
            &gw.admin_url("/providers/crm/refresh"),
            &[("origin", &own_origin)],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.text());
    assert_eq!(reply.header("location"), Some("/"));
    assert_eq!(reply.json()["outcome"], "ok");
    assert_eq!(crm.current().unwrap().generation, before + 1);
    let events = c.get(&gw.admin_url("/events")).await.json();
    let manual: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["trigger"] == "manual")
        .collect();
    assert_eq!(manual.len(), 1, "{events}");
    assert_eq!(manual[0]["provider"], "crm");
    assert_eq!(manual[0]["generation"], before + 1);
    // Audited like any refresh.
    let audit = gw.dir.path().join("audit.log");
    until("the manual refresh in the audit log", || {
        let found = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(r#""trigger":"manual""#) && l.contains(r#""provider":"crm""#));
        async move { found }
    })
    .await;
    // And on the page.
    let html = c.get(&gw.admin_url("/")).await.text();
    assert!(
        html.contains("<td class=\"name\">crm</td><td>manual</td>"),
        "{html}"
    );
    // The page's form targets work for every provider name.
    let forms: Vec<&str> = html
        .split("action=\"")
        .skip(1)
        .filter_map(|a| a.split('"').next())
        .collect();
    assert!(forms.contains(&"/providers/crm/refresh"), "{forms:?}");
    let odd = "/providers/hr%20team%2Fx/refresh";
    assert!(forms.contains(&odd), "{forms:?}");
    let reply = c.send(Method::POST, &gw.admin_url(odd), &[], "").await;
    assert_eq!(reply.json()["outcome"], "ok", "{}", reply.text());
    assert_eq!(reply.json()["provider"], "hr team/x");
    // Unknown providers and static credentials have nothing to refresh.
    let reply = c
        .send(
            Method::POST,
            &gw.admin_url("/providers/nope/refresh"),
            &[],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = c.get(&gw.admin_url("/providers/crm/refresh")).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn actions_from_another_origin_are_refused() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&idp, &up, OPEN_ADMIN)).await;
    settled(&gw).await;
    let crm = gw.provider("crm");
    let before = crm.current().unwrap().generation;
    let asked = idp.requests();
    let c = Client::new();
    for origin in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let reply = c
            .send(
                Method::POST,
                &gw.admin_url("/providers/crm/refresh"),
                &[("origin", origin)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "origin {origin}");
    }
    assert_eq!(crm.current().unwrap().generation, before);
    assert_eq!(idp.requests(), asked);
}

#[tokio::test]
async fn with_an_admin_key_actions_need_http_basic() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&idp, &up, &keyed_admin())).await;
    settled(&gw).await;
    let crm = gw.provider("crm");
    let before = crm.current().unwrap().generation;
    let c = Client::new();
    let refresh = gw.admin_url("/providers/crm/refresh");
    let wrong = basic("not-the-key");
    for headers in [vec![], vec![("authorization", wrong.as_str())]] {
        let reply = c.send(Method::POST, &refresh, &headers, "").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert!(reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic ")));
        let reply = c
            .send(
                Method::GET,
                &gw.admin_url("/providers/erp/authorize"),
                &headers,
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(crm.current().unwrap().generation, before);
    let right = basic(ADMIN_KEY);
    let reply = c
        .send(Method::POST, &refresh, &[("authorization", &right)], "")
        .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(crm.current().unwrap().generation, before + 1);
    // The page and the events stay readable, and never show the key.
    let html = c.get(&gw.admin_url("/")).await.text();
    assert!(html.contains("the admin key (HTTP Basic, user admin)"));
    assert_no_secret(&html, &idp);
    assert_no_secret(&c.get(&gw.admin_url("/events")).await.text(), &idp);
}

/// Follows one redirect answer: the `location` it names.
fn location(reply: &crate::support::client::Reply) -> String {
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.text());
    reply.header("location").expect("no location").to_owned()
}

fn query(url: &str) -> Vec<(String, String)> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn reauthorization_round_trip_with_pkce() {
    let logs = crate::support::captured_logs();
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &up, OPEN_ADMIN)).await;
    settled(&gw).await;
    let c = Client::new();
    // Without a refresh token: 503, /readyz names it, and the IdP is not asked.
    let reply = c.get(&gw.url("/erp/x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"], "token_unavailable");
    let ready = c.get(&gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["provider"], "erp");
    assert!(ready.text().contains("reauthorization required"));
    assert!(idp
        .seen()
        .iter()
        .all(|s| s.get("grant_type") != Some("refresh_token")));

    // The console sends the browser to the IdP...
    let to_idp = location(&c.get(&gw.admin_url("/providers/erp/authorize")).await);
    assert!(
        to_idp.starts_with(&format!("{}?", idp.authorize_url())),
        "{to_idp}"
    );
    let q = query(&to_idp);
    let admin_port = gw.admin.unwrap().port();
    assert_eq!(param(&q, "response_type"), Some("code"));
    assert_eq!(param(&q, "client_id"), Some("console-erp"));
    assert_eq!(
        param(&q, "redirect_uri"),
        Some(format!("http://127.0.0.1:{admin_port}/oauth/callback").as_str())
    );
    assert_eq!(param(&q, "scope"), Some("erp.read offline_access"));
    assert_eq!(param(&q, "code_challenge_method"), Some("S256"));
    assert_eq!(param(&q, "state").map(str::len), Some(43));
    // ...which sends it back with a code...
    let callback = location(&c.get(&to_idp).await);
    assert!(callback.starts_with(&format!("http://127.0.0.1:{admin_port}/oauth/callback?")));
    // ...and the callback redeems it with the verifier.
    let done = c.get(&callback).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert!(done.text().contains("is authorized"), "{}", done.text());
    assert_no_secret(&done.text(), &idp);
    assert_eq!(idp.codes_redeemed(), 1);
    let exchange = idp
        .seen()
        .into_iter()
        .find(|s| s.get("grant_type") == Some("authorization_code"))
        .unwrap();
    assert_eq!(
        crate::support::idp::s256(exchange.get("code_verifier").unwrap()),
        param(&q, "code_challenge").unwrap()
    );
    // The provider's client authentication went with it.
    assert!(exchange
        .authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Basic ")));

    let erp = gw.provider("erp");
    assert!(erp.is_ready());
    assert!(!erp.status().reauth_required);
    assert_eq!(erp.current().unwrap().generation, 1);
    assert_eq!(c.get(&gw.url("/erp/x")).await.status, StatusCode::OK);
    assert_eq!(c.get(&gw.admin_url("/readyz")).await.status, StatusCode::OK);
    // The new refresh token works: a forced refresh rotates it.
    let reply = c
        .send(
            Method::POST,
            &gw.admin_url("/providers/erp/refresh"),
            &[],
            "",
        )
        .await;
    assert_eq!(reply.json()["outcome"], "ok", "{}", reply.text());
    assert_eq!(erp.current().unwrap().generation, 2);

    // Audited with trigger `authorization`, never with a secret.
    let events = c.get(&gw.admin_url("/events")).await;
    let auth = events
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["trigger"] == "authorization")
        .cloned()
        .expect("no authorization event");
    assert_eq!(auth["provider"], "erp");
    assert_eq!(auth["outcome"], "ok");
    assert_eq!(auth["generation"], 1);
    let audit = gw.dir.path().join("audit.log");
    until("the authorization in the audit log", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let found = text.contains(r#""trigger":"authorization""#);
        async move { found }
    })
    .await;
    assert_no_secret(&std::fs::read_to_string(&audit).unwrap(), &idp);

    // A state is good once.
    let again = c.get(&callback).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(idp.codes_redeemed(), 1);
    assert_no_secret(&again.text(), &idp);

    // Neither the code, the state, the verifier nor a token reached the log.
    let back = query(&callback);
    let mut never = vec![
        param(&back, "code").unwrap().to_owned(),
        param(&back, "state").unwrap().to_owned(),
        exchange.get("code_verifier").unwrap().to_owned(),
        erp.current().unwrap().access_token.expose().to_owned(),
    ];
    never.extend(idp.current_refresh_tokens());
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains("provider authorized"),
        "the log was not captured"
    );
    for secret in never {
        assert!(!logged.contains(&secret), "{secret:?} was logged");
    }
}

#[tokio::test]
async fn the_authorized_refresh_token_is_persisted_for_the_next_start() {
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let store = tempfile::tempdir().unwrap();
    let tokens = store.path().join("tokens.json");
    let toml = config(&idp, &up, OPEN_ADMIN)
        .replace("{dir}/state/tokens.json", &tokens.display().to_string());
    let gw = TestGateway::start(&toml).await;
    settled(&gw).await;
    let c = Client::new();
    let to_idp = location(&c.get(&gw.admin_url("/providers/erp/authorize")).await);
    let callback = location(&c.get(&to_idp).await);
    assert_eq!(c.get(&callback).await.status, StatusCode::OK);
    let stored = std::fs::read_to_string(&tokens).unwrap();
    assert!(stored.contains("rt-auth-"), "refresh token not persisted");
    gw.stop().await;
    // The next start with the same store needs no reauthorization.
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let erp = gw.provider("erp");
    assert!(!erp.status().reauth_required);
    assert_eq!(erp.current().unwrap().generation, 1);
    assert_eq!(idp.codes_redeemed(), 1);
}

#[tokio::test]
async fn an_idp_error_on_the_callback_is_shown_and_not_retried() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&idp, &up, OPEN_ADMIN)).await;
    settled(&gw).await;
    idp.refuse_authorization(Some("access_denied"));
    let asked = idp.requests();
    let c = Client::new();
    let to_idp = location(&c.get(&gw.admin_url("/providers/erp/authorize")).await);
    let callback = location(&c.get(&to_idp).await);
    let page = c.get(&callback).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{callback}");
    let html = page.text();
    assert!(
        html.contains("<code>access_denied</code>"),
        "{html} {callback}"
    );
    // The IdP's description is shown escaped.
    assert!(
        html.contains("the &lt;user&gt; said no &amp; left"),
        "{html}"
    );
    assert!(!html.contains("<user>"));
    // Nothing was exchanged or retried; the provider still waits for a person.
    assert_eq!(idp.requests(), asked);
    assert_eq!(idp.authorize_seen().len(), 1);
    assert!(gw.provider("erp").status().reauth_required);
    let events = c.get(&gw.admin_url("/events")).await.json();
    assert!(events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["trigger"] == "authorization"
            && e["outcome"] == "error"
            && e["error"] == "access_denied"));
    // The same state again is refused.
    assert_eq!(c.get(&callback).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(idp.requests(), asked);
}

#[tokio::test]
async fn an_unknown_state_is_refused() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&idp, &up, OPEN_ADMIN)).await;
    settled(&gw).await;
    let c = Client::new();
    let asked = idp.requests();
    for q in [
        "?code=abc&state=forged",
        "?code=abc",
        "?state=&code=abc",
        "",
    ] {
        let reply = c.get(&gw.admin_url(&format!("/oauth/callback{q}"))).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(!reply.text().contains("abc"));
    }
    assert_eq!(idp.requests(), asked);
    // A provider without authorize_url cannot be reauthorized.
    let reply = c.get(&gw.admin_url("/providers/crm/authorize")).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn authorize_settings_are_checked_like_the_rest_of_the_config() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let good = config(&idp, &up, OPEN_ADMIN);
    let cases = [
        (
            good.replace(
                "client_id = \"console\"\n",
                "client_id = \"console\"\nauthorize_url = \"http://127.0.0.1:1/a\"\n",
            ),
            "providers.crm.authorize_url: authorize_url is for grant = \"refresh_token\" only",
        ),
        (
            good.replace(OPEN_ADMIN, ""),
            "providers.erp.authorize_url: authorize_url needs [admin]",
        ),
        (
            good.replace("authorize_url = ", "redirect_uri = \"ftp://x/cb\"\nauthorize_url = "),
            "providers.erp.redirect_uri: redirect_uri must be an absolute http:// or https:// URL",
        ),
        (
            good.replace("authorize_url = ", "authorize_urll = "),
            "unknown field `authorize_urll`",
        ),
        (
            good.replace(&format!("authorize_url = \"{}\"\n", idp.authorize_url()), ""),
            "providers.erp.grant: grant = \"refresh_token\" needs refresh_token_env or refresh_token_file",
        ),
    ];
    for (toml, expected) in cases {
        let err = TestGateway::try_start(&toml).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
        assert!(err.contains("proxy.toml:"), "{err}");
        assert!(
            err.split(':')
                .nth(1)
                .is_some_and(|l| l.parse::<u32>().is_ok()),
            "no line: {err}"
        );
    }
}

#[tokio::test]
async fn replicas_adopt_a_reauthorization_through_the_store() {
    let Some(db) = crate::support::db::Db::new().await else {
        return;
    };
    std::env::set_var("CONSOLE_DATABASE_URL", &db.url);
    let logs = crate::support::captured_logs();
    let prefix = &db.prefix;
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = config(&idp, &up, OPEN_ADMIN).replace(
        "kind = \"file\"\npath = \"{dir}/state/tokens.json\"",
        &format!(
            "kind = \"postgres\"\nurl_env = \"CONSOLE_DATABASE_URL\"\ntable_prefix = \"{prefix}\"\npoll_interval = \"500ms\""
        ),
    );
    let a = TestGateway::start(&toml).await;
    let b = TestGateway::start(&toml).await;
    settled(&a).await;
    settled(&b).await;
    // Authorized on replica a...
    let c = Client::new();
    let to_idp = location(&c.get(&a.admin_url("/providers/erp/authorize")).await);
    let callback = location(&c.get(&to_idp).await);
    assert_eq!(c.get(&callback).await.status, StatusCode::OK);
    // ...replica b adopts the stored token and its refresh token.
    let erp = b.provider("erp");
    until("replica b adopts the authorization", || {
        let ok = erp.is_ready() && !erp.status().reauth_required;
        async move { ok }
    })
    .await;
    assert_eq!(erp.current().unwrap().generation, 1);
    assert_eq!(c.get(&b.url("/erp/x")).await.status, StatusCode::OK);
    assert_eq!(c.get(&b.admin_url("/readyz")).await.status, StatusCode::OK);
    // And it can refresh with it: the refresher runs again.
    let reply = c
        .send(
            Method::POST,
            &b.admin_url("/providers/erp/refresh"),
            &[],
            "",
        )
        .await;
    assert_eq!(reply.json()["outcome"], "ok", "{}", reply.text());
    assert_eq!(idp.codes_redeemed(), 1);
    // Written to the database, never to the log (tokio-postgres logs query
    // parameters at debug level).
    let mut never: Vec<String> = idp.current_refresh_tokens();
    never.push(erp.current().unwrap().access_token.expose().to_owned());
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged.contains("executing statement"),
        "tokio-postgres not captured"
    );
    for secret in never {
        assert!(!logged.contains(&secret), "{secret:?} was logged");
    }
    // The replicas go before the database slice drops their tables.
    drop((a, b));
}

#[tokio::test]
async fn a_failing_store_stands_out_at_the_top() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    // The store's folder would be inside a file: unusable, even for root.
    let toml = config(&idp, &up, OPEN_ADMIN).replace(
        "{dir}/state/tokens.json",
        "{dir}/proxy.toml/state/tokens.json",
    );
    let gw = TestGateway::start(&toml).await;
    settled(&gw).await;
    assert!(gw.app().gateway.store.is_failing());
    let html = Client::new().get(&gw.admin_url("/")).await.text();
    let top = &html[..html.find("<h2>Providers</h2>").unwrap()];
    assert!(top.contains("store failing"), "{top}");
    assert!(top.contains("token store is failing"), "{top}");
}

#[tokio::test]
async fn the_egress_proxy_in_use_is_shown_without_credentials() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::start().await;
    let toml = format!(
        "{}\n[outbound]\nproxy = \"http://proxyuser:proxy-pass-never-shown@127.0.0.1:3128\"\nno_proxy = [\"127.0.0.1\"]\n",
        config(&idp, &up, OPEN_ADMIN)
    );
    let gw = TestGateway::start(&toml).await;
    settled(&gw).await;
    let html = Client::new().get(&gw.admin_url("/")).await.text();
    let card = &html[html.find("Egress proxy").unwrap()..];
    let card = &card[..card.find("</div></div>").unwrap()];
    assert!(card.contains("http://127.0.0.1:3128/"), "{card}");
    assert!(card.contains("[outbound] proxy"), "{card}");
    assert!(!html.contains("proxy-pass-never-shown"));
    assert!(!html.contains("proxyuser"));
}

#[tokio::test]
async fn a_redirect_uri_path_reaches_the_callback_but_never_takes_a_fixed_path() {
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let custom = config(&idp, &up, OPEN_ADMIN).replace(
        "scope = \"erp.read offline_access\"",
        "scope = \"erp.read offline_access\"\nredirect_uri = \"https://gw.example/sso/back\"",
    );
    let gw = TestGateway::start(&custom).await;
    settled(&gw).await;
    let c = Client::new();
    // The IdP sends the browser to the configured address; behind the reverse
    // proxy that is this listener, at the same path.
    let to_idp = location(&c.get(&gw.admin_url("/providers/erp/authorize")).await);
    let back = location(&c.get(&to_idp).await);
    let path_and_query = back.strip_prefix("https://gw.example").expect(&back);
    assert!(path_and_query.starts_with("/sso/back?"), "{back}");
    let done = c.get(&gw.admin_url(path_and_query)).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert_eq!(idp.codes_redeemed(), 1);

    // A redirect_uri naming a fixed path leaves that path as it is.
    let taken = config(&idp, &up, OPEN_ADMIN).replace(
        "scope = \"erp.read offline_access\"",
        "scope = \"erp.read offline_access\"\nredirect_uri = \"https://gw.example/readyz\"",
    );
    let gw2 = TestGateway::start(&taken).await;
    settled(&gw2).await;
    let ready = c.get(&gw2.admin_url("/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    assert_eq!(ready.json()["provider"], "erp");
    gw.stop().await;
    gw2.stop().await;
}
