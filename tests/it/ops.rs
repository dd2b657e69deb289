//! Operations: the admin listener, metrics, hot reload, the egress proxy.

use std::time::Duration;

use hyper::StatusCode;

use crate::support::idp::Failure;
use crate::support::metrics::{scrape, Scrape};
use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

const SECRET: &str = "ops-client-secret-do-not-leak";

/// One client-credentials provider `crm` and a route `crm` to `up`, with an admin
/// listener.
fn cc_config(idp: &MockIdp, up: &MockUpstream) -> String {
    std::env::set_var("OPS_CLIENT_SECRET", SECRET);
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[providers.crm]
grant = "client_credentials"
token_url = "{t}"
client_id = "ops"
client_secret_env = "OPS_CLIENT_SECRET"
min_refresh_interval = "0s"

[[routes]]
name = "crm"
prefix = "/crm"
upstream = "{u}"
provider = "crm"
"#,
        t = idp.token_url(),
        u = up.url()
    )
}

/// Polls `cond` every 20 ms until it holds; fails after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Admin endpoints

#[tokio::test]
async fn admin_healthz_is_200_and_unknown_paths_404() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up)).await;
    let c = Client::new();
    let r = c.get(&gw.admin_url("/healthz")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(
        c.get(&gw.admin_url("/nope")).await.status,
        StatusCode::NOT_FOUND
    );
    // The admin listener is not a route to upstreams, and the main one has no admin.
    assert_eq!(
        c.get(&gw.admin_url("/crm/x")).await.status,
        StatusCode::NOT_FOUND
    );
    gw.stop().await;
}

#[tokio::test]
async fn readyz_is_503_naming_the_provider_while_the_idp_is_down_then_200() {
    let idp = MockIdp::start().await;
    idp.fail_with(Some(Failure::Status(503, "{}".into())));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up)).await;
    let c = Client::new();

    // The first fetch fails (the IdP answers 503 from the start).
    eventually(10, "a failed token request", || async {
        idp.requests() >= 1
    })
    .await;
    let r = c.get(&gw.admin_url("/readyz")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let body = r.json();
    assert_eq!(body["provider"], "crm", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("crm"), "{body}");
    assert_eq!(body["store"], "ok");

    // The refresher retries with backoff; once the IdP recovers, ready.
    idp.fail_with(None);
    eventually(20, "/readyz 200 after the IdP recovered", || async {
        c.get(&gw.admin_url("/readyz")).await.status == StatusCode::OK
    })
    .await;
    let body = c.get(&gw.admin_url("/readyz")).await.json();
    assert_eq!(body["store"], "ok");
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test]
async fn readyz_reports_a_failing_store_without_failing_readiness() {
    std::env::set_var("OPS_STATIC", "static-ops-secret");
    let up = MockUpstream::start().await;
    let toml = format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[store]
kind = "file"
path = "/proc/self/x/tokens.json"

[providers.s]
grant = "static"
token_env = "OPS_STATIC"

[[routes]]
prefix = "/s"
upstream = "{u}"
provider = "s"
"#,
        u = up.url()
    );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    let r = c.get(&gw.admin_url("/readyz")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["store"], "failing");
    let st = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(st["store"]["state"], "failing", "{st}");
    gw.stop().await;
}

#[tokio::test]
async fn status_shows_each_provider_and_route_without_secrets() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up)).await;
    gw.ready().await;
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);

    let r = c.get(&gw.admin_url("/status")).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    let token = gw.provider("crm").current().unwrap();
    assert!(!text.contains(token.access_token.expose()), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    let body = r.json();
    let p = &body["providers"]["crm"];
    assert_eq!(p["generation"], token.generation, "{body}");
    assert_eq!(p["ready"], true);
    let exp = p["expires_in_s"].as_u64().unwrap();
    assert!((3000..=3600).contains(&exp), "{exp}");
    assert!(!p["last_refresh"].is_null(), "{body}");
    assert!(p["refreshes_ok"].as_u64().unwrap() >= 1, "{body}");
    assert_eq!(p["refreshes_failed"], 0);
    assert_eq!(body["routes"][0]["name"], "crm");
    assert_eq!(body["routes"][0]["provider"], "crm");
    gw.stop().await;
}

#[tokio::test]
async fn metrics_expose_the_contract_names_from_startup_and_move() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&cc_config(&idp, &up)).await;
    gw.ready().await;
    let c = Client::new();

    let r = c.get(&gw.admin_url("/metrics")).await;
    let ct = r.header("content-type").unwrap_or_default().to_owned();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "{ct}"
    );
    let m = Scrape::parse(&r.text());
    // Counters appear as `<name>_total`, at 0 before any request.
    for (name, ty) in [
        ("authgate_requests", "counter"),
        ("authgate_request_duration_seconds", "histogram"),
        ("authgate_token_refreshes", "counter"),
        ("authgate_refresh_waiters", "counter"),
        ("authgate_replays", "counter"),
        ("authgate_token_expiry_seconds", "gauge"),
        ("authgate_store_errors", "counter"),
        ("authgate_config_reloads", "counter"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    let crm = [("route", "crm")];
    assert_eq!(
        m.value(
            "authgate_requests_total",
            &[("route", "crm"), ("status", "200")]
        ),
        0.0
    );
    assert_eq!(
        m.value("authgate_request_duration_seconds_count", &crm),
        0.0
    );
    assert_eq!(
        m.value(
            "authgate_request_duration_seconds_bucket",
            &[("route", "crm"), ("le", "+Inf")]
        ),
        0.0
    );
    for outcome in ["ok", "unauthorized", "skipped"] {
        assert_eq!(
            m.value(
                "authgate_replays_total",
                &[("route", "crm"), ("outcome", outcome)]
            ),
            0.0
        );
    }
    assert_eq!(
        m.value("authgate_refresh_waiters_total", &[("provider", "crm")]),
        0.0
    );
    assert_eq!(m.value("authgate_store_errors_total", &[]), 0.0);
    assert_eq!(
        m.value("authgate_config_reloads_total", &[("outcome", "ok")]),
        0.0
    );
    assert_eq!(
        m.value(
            "authgate_token_refreshes_total",
            &[
                ("provider", "crm"),
                ("trigger", "unauthorized"),
                ("outcome", "ok")
            ]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "authgate_token_refreshes_total",
            &[
                ("provider", "crm"),
                ("trigger", "startup"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    let expiry = m.value("authgate_token_expiry_seconds", &[("provider", "crm")]);
    assert!((3000.0..=3600.0).contains(&expiry), "{expiry}");

    // Requests move the request counter (numeric status label) and the histogram.
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    }
    assert_eq!(
        c.get(&gw.url("/crm/status/404")).await.status,
        StatusCode::NOT_FOUND
    );
    // A revoked token: 401, refresh (trigger unauthorized), replay ok.
    idp.revoke_all();
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);

    let m = scrape(&c, &gw).await;
    assert_eq!(
        m.value(
            "authgate_requests_total",
            &[("route", "crm"), ("status", "200")]
        ),
        4.0
    );
    assert_eq!(
        m.value(
            "authgate_requests_total",
            &[("route", "crm"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        m.value("authgate_request_duration_seconds_count", &crm),
        5.0
    );
    assert_eq!(
        m.value(
            "authgate_request_duration_seconds_bucket",
            &[("route", "crm"), ("le", "+Inf")]
        ),
        5.0
    );
    assert!(m.value("authgate_request_duration_seconds_sum", &crm) > 0.0);
    assert_eq!(
        m.value(
            "authgate_replays_total",
            &[("route", "crm"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "authgate_token_refreshes_total",
            &[
                ("provider", "crm"),
                ("trigger", "unauthorized"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    // Nothing secret in the exposition.
    let text = c.get(&gw.admin_url("/metrics")).await.text();
    assert!(!text.contains("tok-") && !text.contains(SECRET), "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn metrics_count_store_errors() {
    std::env::set_var("OPS_STATIC", "static-ops-secret");
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml =
        cc_config(&idp, &up) + "\n[store]\nkind = \"file\"\npath = \"/proc/self/x/tokens.json\"\n";
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    // The refresh's write to the failing store is counted.
    eventually(10, "a counted store error", || async {
        scrape(&c, &gw)
            .await
            .value("authgate_store_errors_total", &[])
            >= 1.0
    })
    .await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Hot reload

/// The config body the reload tests swap between: provider `crm` unchanged, route
/// `crm` to `crm_up`, and optionally a credential-less route `open` to `open_up`.
fn reload_config(idp: &MockIdp, crm_up: &MockUpstream, open_up: Option<&MockUpstream>) -> String {
    let mut text = cc_config(idp, crm_up);
    if let Some(o) = open_up {
        text.push_str(&format!(
            "\n[[routes]]\nname = \"open\"\nprefix = \"/open\"\nupstream = \"{}\"\n",
            o.url()
        ));
    }
    text
}

/// Rewrites the gateway's config file the way `TestGateway::start` wrote it. With
/// `atomic`, like an editor: write a temporary file and rename it over.
fn rewrite(gw: &TestGateway, body: &str, atomic: bool) {
    let text = format!("[listen]\naddr = \"127.0.0.1:0\"\n{body}\n[store]\nkind = \"memory\"\n");
    if atomic {
        let tmp = gw.dir.path().join(".proxy.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &gw.config_path).unwrap();
    } else {
        std::fs::write(&gw.config_path, text).unwrap();
    }
}

async fn reloads(c: &Client, gw: &TestGateway, outcome: &str) -> f64 {
    scrape(c, gw)
        .await
        .value("authgate_config_reloads_total", &[("outcome", outcome)])
}

#[tokio::test]
async fn reload_adds_a_route_moves_an_upstream_and_keeps_unchanged_providers() {
    let idp = MockIdp::start().await;
    let up1 = MockUpstream::with_idp(&idp).await;
    let up2 = MockUpstream::with_idp(&idp).await;
    let open = MockUpstream::start().await;
    let gw = TestGateway::start(&reload_config(&idp, &up1, None)).await;
    gw.ready().await;
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/crm/a")).await.status, StatusCode::OK);
    assert_eq!(up1.count(), 1);
    assert_eq!(
        c.get(&gw.url("/open/a")).await.status,
        StatusCode::NOT_FOUND
    );
    let generation = gw.provider("crm").current().unwrap().generation;
    let idp_requests = idp.requests();

    rewrite(&gw, &reload_config(&idp, &up2, Some(&open)), false);
    gw.app().reload(&gw.config_path).unwrap();

    assert_eq!(c.get(&gw.url("/crm/b")).await.status, StatusCode::OK);
    assert_eq!(up2.count(), 1, "the changed upstream gets the request");
    assert_eq!(up1.count(), 1);
    assert_eq!(c.get(&gw.url("/open/c")).await.status, StatusCode::OK);
    assert_eq!(open.last().uri, "/c");
    assert_eq!(gw.provider("crm").current().unwrap().generation, generation);
    assert_eq!(
        idp.requests(),
        idp_requests,
        "an unchanged provider keeps its token"
    );
    assert_eq!(reloads(&c, &gw, "ok").await, 1.0);
    assert_eq!(reloads(&c, &gw, "error").await, 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn reload_rejects_an_invalid_file_with_the_check_message_and_keeps_serving() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&reload_config(&idp, &up, None)).await;
    gw.ready().await;
    let c = Client::new();

    let broken =
        reload_config(&idp, &up, None).replace("provider = \"crm\"\n", "provider = \"crn\"\n");
    rewrite(&gw, &broken, false);
    let err = gw.app().reload(&gw.config_path).unwrap_err().to_string();
    let check = authgate::Config::load(&gw.config_path)
        .unwrap_err()
        .to_string();
    assert_eq!(err, check);
    assert!(err.contains("proxy.toml:") && err.contains("crn"), "{err}");

    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    assert_eq!(reloads(&c, &gw, "error").await, 1.0);
    assert_eq!(reloads(&c, &gw, "ok").await, 0.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_changed_file_is_reloaded_by_the_watcher() {
    let idp = MockIdp::start().await;
    let up1 = MockUpstream::with_idp(&idp).await;
    let up2 = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&reload_config(&idp, &up1, None)).await;
    gw.ready().await;
    let open = MockUpstream::start().await;
    let watcher = gw.app().watch_config(&gw.config_path).unwrap();
    let c = Client::new();
    let generation = gw.provider("crm").current().unwrap().generation;

    // Editor-style save (rename over): the new route becomes routable.
    rewrite(&gw, &reload_config(&idp, &up2, Some(&open)), true);
    eventually(10, "the new route after a file change", || async {
        c.get(&gw.url("/open/x")).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(c.get(&gw.url("/crm/x")).await.status, StatusCode::OK);
    assert_eq!(up2.count(), 1);

    // In-place write of an invalid file: rejected, the running config stays.
    rewrite(&gw, "[[routes]]\nprefix = \"nope\"\n", false);
    eventually(10, "the invalid file to be rejected", || async {
        reloads(&c, &gw, "error").await >= 1.0
    })
    .await;
    assert_eq!(c.get(&gw.url("/open/y")).await.status, StatusCode::OK);
    assert_eq!(c.get(&gw.url("/crm/y")).await.status, StatusCode::OK);
    assert_eq!(gw.provider("crm").current().unwrap().generation, generation);
    watcher.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_concurrent_load_fail_no_request() {
    let idp = MockIdp::start().await;
    let up1 = MockUpstream::with_idp(&idp).await;
    let up2 = MockUpstream::with_idp(&idp).await;
    let open = MockUpstream::start().await;
    let gw = TestGateway::start(&reload_config(&idp, &up1, None)).await;
    gw.ready().await;

    let mut load = Vec::new();
    for _ in 0..4 {
        let url = gw.url("/crm/load");
        load.push(tokio::spawn(async move {
            let c = Client::new();
            let mut failed = 0;
            for _ in 0..200 {
                if c.get(&url).await.status != StatusCode::OK {
                    failed += 1;
                }
            }
            failed
        }));
    }
    for i in 0..10 {
        let up = if i % 2 == 0 { &up2 } else { &up1 };
        rewrite(&gw, &reload_config(&idp, up, Some(&open)), false);
        gw.app().reload(&gw.config_path).unwrap();
        tokio::task::yield_now().await;
    }
    let mut failed = 0;
    for t in load {
        failed += t.await.unwrap();
    }
    assert_eq!(failed, 0);
    assert_eq!(up1.count() + up2.count(), 800);
    let c = Client::new();
    assert_eq!(reloads(&c, &gw, "ok").await, 10.0);
    assert_eq!(idp.requests(), 1, "the provider was never rebuilt");
    gw.stop().await;
}

/// The real binary: SIGHUP reloads, SIGTERM drains and exits 0.
#[cfg(unix)]
#[tokio::test]
async fn the_binary_reloads_on_sighup_and_exits_0_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n\n[[routes]]\nname = \"a\"\nprefix = \"/a\"\nupstream = \"{}\"\n",
        up.url()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &base).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authgate"))
        .arg("run")
        .arg("--no-watch")
        .arg("--log-format")
        .arg("json")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    // Port 0 in the config; the start-up log line says where it listens (picking
    // a free port here and passing it would race with other tests' listeners).
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "authgate listening" {
                let addr: std::net::SocketAddr =
                    v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                return addr.port();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary did not listen within 20 s");
    // Keep draining its logs so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let c = Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(c.get(&url("/a/x")).await.status, StatusCode::OK);
    assert_eq!(c.get(&url("/b/x")).await.status, StatusCode::NOT_FOUND);

    std::fs::write(
        &path,
        format!(
            "{base}\n[[routes]]\nname = \"b\"\nprefix = \"/b\"\nupstream = \"{}\"\n",
            up.url()
        ),
    )
    .unwrap();
    let kill = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(st.success());
    };
    kill("-HUP");
    eventually(10, "the route added by SIGHUP", || async {
        c.get(&url("/b/x")).await.status == StatusCode::OK
    })
    .await;

    kill("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Logs

/// Nothing is logged per successful request (the audit log has those); errors are.
#[tokio::test]
async fn successful_requests_log_nothing_and_errors_log_one_line() {
    let logs = crate::support::captured_logs();
    let up = MockUpstream::start().await;
    let toml = format!(
        "[[routes]]\nname = \"quietroute\"\nprefix = \"/quiet\"\nupstream = \"{}\"\n\n[[routes]]\nname = \"deadroute\"\nprefix = \"/dead\"\nupstream = \"http://127.0.0.1:9\"\n",
        up.url()
    );
    let gw = TestGateway::start(&toml).await;
    let c = Client::new();
    for _ in 0..5 {
        assert_eq!(c.get(&gw.url("/quiet/x")).await.status, StatusCode::OK);
    }
    assert_eq!(
        c.get(&gw.url("/dead/x")).await.status,
        StatusCode::BAD_GATEWAY
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let quiet: Vec<&str> = text.lines().filter(|l| l.contains("quietroute")).collect();
    assert!(quiet.is_empty(), "{quiet:#?}");
    let dead = text
        .lines()
        .filter(|l| l.contains("deadroute") && l.contains("WARN"))
        .count();
    assert_eq!(dead, 1, "{text}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Corporate egress proxy

/// What the in-process proxy saw: request lines (`CONNECT host:port HTTP/1.1` or
/// `GET http://host:port/path HTTP/1.1`) and their `Proxy-Authorization`.
#[derive(Debug, Clone, Default)]
struct ProxyLog(std::sync::Arc<std::sync::Mutex<Vec<Seen>>>);

/// A request line and its `Proxy-Authorization`.
type Seen = (String, Option<String>);

impl ProxyLog {
    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(l, _)| l.clone())
            .collect()
    }
    fn auths(&self) -> Vec<Option<String>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, a)| a.clone())
            .collect()
    }
}

/// A minimal forward proxy: CONNECT tunnels, and absolute-form requests relayed to
/// their host. Records each connection's first request line.
async fn start_proxy() -> (std::net::SocketAddr, ProxyLog) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = ProxyLog::default();
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = client.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let line = text.lines().next().unwrap_or_default().to_owned();
                let auth = text.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("proxy-authorization")
                        .then(|| v.trim().to_owned())
                });
                seen.0.lock().unwrap().push((line.clone(), auth));
                let mut parts = line.split(' ');
                let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
                if method == "CONNECT" {
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                } else {
                    let uri: hyper::Uri = target.parse().unwrap();
                    let host = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap_or(80));
                    let mut up = tokio::net::TcpStream::connect(host).await.unwrap();
                    up.write_all(&head).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn with_proxy_credentials_upstream_and_token_endpoint_are_tunnelled() {
    std::env::set_var("OPS_PROXY_PASSWORD", "proxy-pw-1");
    let (proxy, log) = start_proxy().await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = cc_config(&idp, &up)
        + &format!(
            "\n[outbound]\nproxy = \"http://{proxy}\"\nproxy_username = \"svc\"\nproxy_password_env = \"OPS_PROXY_PASSWORD\"\nproxy_auth = \"basic\"\n"
        );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    let r = c.get(&gw.url("/crm/through")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(up.last().uri, "/through");

    let lines = log.lines();
    assert!(
        lines.contains(&format!("CONNECT {} HTTP/1.1", idp.addr)),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!("CONNECT {} HTTP/1.1", up.addr)),
        "{lines:?}"
    );
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("svc:proxy-pw-1")
    );
    assert!(
        log.auths()
            .iter()
            .all(|a| a.as_deref() == Some(expected.as_str())),
        "{:?}",
        log.auths()
    );
    // The proxy password is no more visible than any other secret.
    let status = c.get(&gw.admin_url("/status")).await.text();
    assert!(!status.contains("proxy-pw-1"));
    gw.stop().await;
}

#[tokio::test]
async fn plain_http_goes_in_absolute_form_and_no_proxy_goes_direct() {
    let (proxy, log) = start_proxy().await;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let direct = MockUpstream::start().await;
    let toml = cc_config(&idp, &up)
        + &format!(
            "\n[[routes]]\nname = \"direct\"\nprefix = \"/direct\"\nupstream = \"http://localhost:{}\"\n\n[outbound]\nproxy = \"http://{proxy}\"\nno_proxy = [\"localhost\"]\n",
            direct.addr.port()
        );
    let gw = TestGateway::start(&toml).await;
    gw.ready().await;
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/crm/abs?q=1")).await.status, StatusCode::OK);
    assert_eq!(c.get(&gw.url("/direct/d")).await.status, StatusCode::OK);
    assert_eq!(direct.last().uri, "/d");

    let lines = log.lines();
    assert!(
        lines.contains(&format!("POST http://{}/token HTTP/1.1", idp.addr)),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!("GET http://{}/abs?q=1 HTTP/1.1", up.addr)),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("localhost")), "{lines:?}");
    assert!(log.auths().iter().all(Option::is_none));
    gw.stop().await;
}

/// An https upstream with its own CA, on `localhost`.
async fn start_tls_upstream(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca = dir.join("upstream-ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("tls-upstream saw {}", req.uri());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            crate::support::full(body),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca)
}

#[tokio::test]
async fn an_https_upstream_is_reached_through_a_connect_tunnel() {
    let (proxy, log) = start_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, ca) = start_tls_upstream(dir.path()).await;
    let toml = format!(
        "[[routes]]\nname = \"tls\"\nprefix = \"/tls\"\nupstream = \"https://localhost:{port}\"\nca = \"{}\"\n\n[outbound]\nproxy = \"http://{proxy}\"\n",
        ca.display()
    );
    let gw = TestGateway::start(&toml).await;
    let c = Client::new();
    let r = c.get(&gw.url("/tls/secure")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "tls-upstream saw /secure");
    assert_eq!(
        log.lines(),
        vec![format!("CONNECT localhost:{port} HTTP/1.1")]
    );
    gw.stop().await;
}

/// `[log] file`: the real binary logs to a daily file beside the configured
/// name, prunes older ones to `keep`, and never writes a secret there.
#[cfg(unix)]
#[tokio::test]
async fn the_binary_logs_to_a_rotated_file_and_keeps_keep_files() {
    use tokio::io::AsyncBufReadExt;
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // Older rotated files, as earlier days would have left them.
    for day in 1..=5 {
        std::fs::write(logs.join(format!("authgate.2026-11-0{day}.log")), "old\n").unwrap();
    }
    std::fs::write(dir.path().join("secret"), "log-file-secret-77").unwrap();
    let toml = format!(
        r#"[listen]
addr = "127.0.0.1:0"
[store]
kind = "memory"
[log]
file = "logs/authgate.log"
keep = 3
[providers.crm]
grant = "client_credentials"
token_url = "{idp}"
client_id = "billing"
client_secret_file = "secret"
[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"
"#,
        idp = idp.token_url(),
        up = up.url()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(["run", "--no-watch", "--log-format", "json", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let today = logs.join(format!("authgate.{}.log", utc_today()));
    eventually(20, "the refresh logged to today's file", || async {
        std::fs::read_to_string(&today).is_ok_and(|t| t.contains("token refreshed"))
    })
    .await;
    let text = std::fs::read_to_string(&today).unwrap();
    assert!(text.contains("authgate listening"), "{text}");
    assert!(
        !text.contains("log-file-secret-77") && !text.contains("tok-1"),
        "{text}"
    );
    let kept: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("authgate.") && n.ends_with(".log"))
        .collect();
    assert_eq!(kept.len(), 3, "keep = 3, today's included: {kept:?}");
    assert!(kept.iter().any(|n| today.ends_with(n)), "{kept:?}");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Today's UTC date as `YYYY-MM-DD` (the rotated files' names).
fn utc_today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()[..10].to_owned()
}

/// `/status` names the egress proxy in use and where it came from.
#[tokio::test]
async fn status_names_the_egress_proxy_and_its_source() {
    let up = MockUpstream::start().await;
    let route = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/a\"\nupstream = \"{}\"\n",
        up.url()
    );
    let c = Client::new();
    let gw = TestGateway::start(&format!(
        "[outbound]\nproxy = \"http://proxy.corp.example:3128\"\nno_proxy = [\"127.0.0.1\"]\n{route}"
    ))
    .await;
    let st = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(st["egress"]["proxy"], "http://proxy.corp.example:3128/");
    assert_eq!(st["egress"]["source"], "[outbound] proxy");
    gw.stop().await;

    // No proxy anywhere (this test binary sets no proxy variable).
    let gw = TestGateway::start(&route).await;
    let st = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(st["egress"]["proxy"], "direct");
    gw.stop().await;
}
