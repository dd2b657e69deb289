//! The console in a real browser: Debian's headless Chromium renders the page
//! (a screenshot, and the DOM checked for the providers' states) and drives the
//! whole reauthorization round trip through the mock IdP's authorization
//! endpoint. Without `/usr/bin/chromium` these tests say so and pass, except in
//! CI (`CI=true`), where they fail: `.ci/run` installs it.
//!
//! `AUTHGATE_UPDATE_SCREENSHOT=1` copies the screenshot to
//! `docs/console.png`, the one the README shows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::StatusCode;

use crate::support::idp::Failure;
use crate::support::{until, Client, MockIdp, MockUpstream, TestGateway};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser, or `None` (with a message) where it may be missing.
fn chromium() -> Option<&'static str> {
    if Path::new(CHROMIUM).exists() {
        return Some(CHROMIUM);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium"
    );
    eprintln!("skipped: {CHROMIUM} not installed (apt-get install chromium)");
    None
}

/// Runs headless Chromium with `args` and a fresh profile; its stdout.
async fn run_chromium(browser: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                &format!("--user-data-dir={}", profile.path().display()),
            ])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish in 60 s")
    .expect("chromium did not start");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(idp: &MockIdp, failing: &MockIdp, up: &MockUpstream) -> String {
    std::env::set_var("BROWSER_CLIENT_SECRET", "browser-client-secret-never-shown");
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[providers.crm]
grant = "client_credentials"
token_url = "{t}"
client_id = "browser"
client_secret_env = "BROWSER_CLIENT_SECRET"
scope = "invoices.read"

[providers.erp]
grant = "refresh_token"
token_url = "{t}"
authorize_url = "{a}"
client_id = "browser-erp"
client_secret_env = "BROWSER_CLIENT_SECRET"
scope = "erp.read offline_access"

[providers.billing]
grant = "client_credentials"
token_url = "{f}"
client_id = "browser"
client_secret_env = "BROWSER_CLIENT_SECRET"

[[routes]]
name = "crm"
prefix = "/crm"
upstream = "{u}/v2"
provider = "crm"

[[routes]]
name = "erp"
prefix = "/erp"
upstream = "{u}/erp"
provider = "erp"

[[routes]]
name = "billing"
prefix = "/billing"
upstream = "{u}/billing"
provider = "billing"
"#,
        t = idp.token_url(),
        a = idp.authorize_url(),
        f = failing.token_url(),
        u = up.url()
    )
}

async fn start() -> (MockIdp, MockIdp, MockUpstream, TestGateway) {
    let idp = MockIdp::start_with(true).await;
    let failing = MockIdp::start().await;
    failing.fail_with(Some(Failure::Status(
        503,
        r#"{"error":"temporarily_unavailable"}"#.into(),
    )));
    let up = MockUpstream::with_idp(&idp).await;
    let gw = TestGateway::start(&config(&idp, &failing, &up)).await;
    let (crm, erp, billing) = (
        gw.provider("crm"),
        gw.provider("erp"),
        gw.provider("billing"),
    );
    until(
        "crm ready, erp waiting for reauthorization, billing failing",
        || {
            let ok = crm.is_ready()
                && erp.status().reauth_required
                && billing.status().refreshes_failed > 0;
            async move { ok }
        },
    )
    .await;
    (idp, failing, up, gw)
}

fn docs_screenshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")
}

#[tokio::test]
async fn console_renders_in_a_real_browser() {
    let Some(browser) = chromium() else { return };
    let (_idp, _failing, _up, gw) = start().await;
    let c = Client::new();
    for path in [
        "/crm/invoices",
        "/crm/invoices?page=2",
        "/crm/status/404",
        "/erp/x",
        "/billing/y",
    ] {
        let _ = c.get(&gw.url(path)).await;
    }
    assert_eq!(
        c.send(
            hyper::Method::POST,
            &gw.admin_url("/providers/crm/refresh"),
            &[],
            ""
        )
        .await
        .status,
        StatusCode::SEE_OTHER
    );
    let url = gw.admin_url("/");

    let dom = run_chromium(browser, &["--dump-dom", &url]).await;
    for state in ["ready", "reauthorization required", "failing"] {
        assert!(
            dom.contains(&format!("data-state=\"{state}\"")),
            "no provider {state} in the rendered page: {dom}"
        );
    }
    assert!(dom.contains("Needs attention"));
    assert!(dom.contains("temporarily_unavailable"));
    assert!(!dom.contains("browser-client-secret-never-shown"));

    let shot = gw.dir.path().join("console.png");
    run_chromium(
        browser,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            &url,
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("no screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a blank page? {} bytes", png.len());
    if std::env::var("AUTHGATE_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        std::fs::copy(&shot, docs_screenshot()).unwrap();
        eprintln!("updated {}", docs_screenshot().display());
    }
}

#[tokio::test]
async fn reauthorization_round_trip_in_a_real_browser() {
    let Some(browser) = chromium() else { return };
    let (idp, _failing, _up, gw) = start().await;
    let erp = gw.provider("erp");
    assert!(erp.current().is_none());
    // The browser follows the console's redirect to the IdP, is sent back to the
    // callback, and shows its answer.
    let dom = run_chromium(
        browser,
        &["--dump-dom", &gw.admin_url("/providers/erp/authorize")],
    )
    .await;
    assert!(dom.contains("Provider authorized"), "{dom}");
    assert!(
        dom.contains("<b>erp</b> is authorized: generation 1"),
        "{dom}"
    );
    assert!(!dom.contains("rt-auth-") && !dom.contains("tok-") && !dom.contains("code-"));
    assert_eq!(idp.codes_redeemed(), 1);
    assert!(erp.is_ready());
    assert_eq!(erp.current().unwrap().generation, 1);
    assert!(!erp.status().reauth_required);
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/erp/x")).await.status, StatusCode::OK);
    // The console shows it ready, and the event that made it so.
    let dom = run_chromium(browser, &["--dump-dom", &gw.admin_url("/")]).await;
    let row = dom
        .split("<tr")
        .find(|r| r.contains("<span class=\"name\">erp</span>"))
        .unwrap();
    assert!(row.contains("data-state=\"ready\""), "{row}");
    assert!(dom.contains("<td>authorization</td>"), "{dom}");
}
