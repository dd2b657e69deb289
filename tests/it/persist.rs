//! The durable token store: restarts cost no refresh, a crash never loses
//! a rotated refresh token, a broken store degrades durability but not serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use authgate::store::memory::MemoryStore;
use authgate::store::TokenStore;
use authgate::{App, Config};
use hyper::StatusCode;
use tokio::time::Instant;

use crate::support::{captured_logs, Client, MockIdp, MockUpstream, TestGateway};

const SECRET_ENV: &str = "PERSIST_CLIENT_SECRET";

/// A `client_credentials` provider `crm` behind route `/crm`, with `store` (a TOML
/// `[store]` section, `{dir}` allowed) and `extra` appended.
fn cc_config(idp: &MockIdp, up: &MockUpstream, store: &str, extra: &str) -> String {
    std::env::set_var(SECRET_ENV, "s3cret");
    format!(
        r#"
{store}

[providers.crm]
grant = "client_credentials"
token_url = "{token_url}"
client_id = "billing"
client_secret_env = "{SECRET_ENV}"

[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"

{extra}
"#,
        token_url = idp.token_url(),
        up = up.url(),
    )
}

const FILE_STORE: &str = "[store]\nkind = \"file\"\npath = \"{dir}/state/tokens.json\"";

/// Polls `cond` every few milliseconds until it holds or `within` passes.
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops the gateway but keeps its folder, so the next one starts on the same store.
async fn stop_keep_dir(gw: TestGateway) -> tempfile::TempDir {
    let TestGateway { app, dir, .. } = gw;
    if let Some(app) = app {
        app.shutdown().await;
    }
    dir
}

fn store_file(dir: &Path) -> PathBuf {
    dir.join("state/tokens.json")
}

fn file_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn persist_restart_with_valid_stored_token_makes_no_idp_request() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = cc_config(&idp, &up, FILE_STORE, "");
    let c = Client::new();

    let gw = TestGateway::start(&toml).await;
    assert_eq!(c.get(&gw.url("/crm/a")).await.status, StatusCode::OK);
    assert_eq!(idp.requests(), 1);
    let generation = gw.provider("crm").current().unwrap().generation;
    // Non-rotating grants are written in the background: wait for the write.
    let file = store_file(gw.dir.path());
    eventually("the token on disk", Duration::from_secs(10), || {
        file_text(&file).contains("tok-1")
    })
    .await;
    let dir = stop_keep_dir(gw).await;

    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    let r = c.get(&gw.url("/crm/b")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(idp.requests(), 1, "the restart fetched a token");
    assert_eq!(up.last().headers["authorization"], "Bearer tok-1");
    assert_eq!(
        gw.provider("crm").current().unwrap().generation,
        generation,
        "the generation survives the restart"
    );
    gw.stop().await;
}

#[tokio::test]
async fn persist_corrupt_file_is_set_aside_and_a_fresh_token_fetched() {
    let logs = captured_logs();
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let file = store_file(dir.path());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "{\"version\": 1, \"providers\": {\"crm\": tru").unwrap();

    let gw = TestGateway::start_in(dir, &cc_config(&idp, &up, FILE_STORE, ""))
        .await
        .unwrap();
    assert_eq!(c_get(&gw, "/crm/x").await, StatusCode::OK);
    assert_eq!(
        idp.requests(),
        1,
        "a fresh token replaces the unreadable one"
    );

    let aside: Vec<String> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("tokens.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "set-aside files: {aside:?}");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&file.display().to_string())),
        "no warning naming {}",
        file.display()
    );
    // The new token is written over the set-aside one's old place.
    eventually("the new token on disk", Duration::from_secs(10), || {
        file_text(&file).contains("tok-1")
    })
    .await;
    gw.stop().await;
}

async fn c_get(gw: &TestGateway, path: &str) -> StatusCode {
    Client::new().get(&gw.url(path)).await.status
}

#[tokio::test]
async fn persist_unusable_store_folder_keeps_serving_and_shows_failing() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    // The store's folder is a regular file: no permission trick needed (tests may
    // run as root, where a read-only folder is still writable).
    std::fs::write(dir.path().join("not-a-folder"), "x").unwrap();
    let store = "[store]\nkind = \"file\"\npath = \"{dir}/not-a-folder/tokens.json\"";
    let toml = cc_config(&idp, &up, store, "[admin]\naddr = \"127.0.0.1:0\"");
    let gw = TestGateway::start_in(dir, &toml).await.unwrap();
    let c = Client::new();

    for i in 0..3 {
        assert_eq!(
            c.get(&gw.url(&format!("/crm/{i}"))).await.status,
            StatusCode::OK
        );
    }
    let ready = c.get(&gw.admin_url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["store"], "failing");
    let status = c.get(&gw.admin_url("/status")).await.json();
    assert_eq!(status["store"]["state"], "failing", "{status}");
    // The background write of the token fails against the stand-in store; the
    // counter shows it (the write may still be on its way when we first look).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = c.get(&gw.admin_url("/metrics")).await.text();
        let errors = metrics
            .lines()
            .find(|l| l.starts_with("authgate_store_errors_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if errors >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no store error counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn persist_encrypted_store_round_trip_and_another_key_sets_it_aside() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    std::env::set_var("PERSIST_KEY_GOOD", "5a".repeat(32));
    std::env::set_var("PERSIST_KEY_WRONG", "a5".repeat(32));
    let with_key = |env: &str| {
        let store = format!("{FILE_STORE}\nkey_env = \"{env}\"");
        cc_config(&idp, &up, &store, "")
    };
    let c = Client::new();

    let gw = TestGateway::start(&with_key("PERSIST_KEY_GOOD")).await;
    assert_eq!(c.get(&gw.url("/crm/a")).await.status, StatusCode::OK);
    let file = store_file(gw.dir.path());
    eventually("the token on disk", Duration::from_secs(10), || {
        file_text(&file).contains("\"crm\"")
    })
    .await;
    let on_disk = file_text(&file);
    assert!(!on_disk.contains("tok-1"), "plaintext token on disk");
    let dir = stop_keep_dir(gw).await;

    let gw = TestGateway::start_in(dir, &with_key("PERSIST_KEY_GOOD"))
        .await
        .unwrap();
    assert_eq!(c.get(&gw.url("/crm/b")).await.status, StatusCode::OK);
    assert_eq!(idp.requests(), 1, "the stored token was not reused");
    assert_eq!(up.last().headers["authorization"], "Bearer tok-1");
    let dir = stop_keep_dir(gw).await;

    // Another key cannot read the store back: it is set aside (not deleted),
    // reported, and the provider fetches a new token.
    let logs = captured_logs();
    let gw = TestGateway::start_in(dir, &with_key("PERSIST_KEY_WRONG"))
        .await
        .expect("a store that cannot be read back does not stop the start-up");
    gw.ready().await;
    assert_eq!(
        idp.requests(),
        2,
        "a new token instead of the unreadable one"
    );
    assert_eq!(c.get(&gw.url("/crm/c")).await.status, StatusCode::OK);
    let aside: Vec<String> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("tokens.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let reports = text
        .lines()
        .filter(|l| l.contains("token store cannot be read back") && l.contains(&aside[0]))
        .count();
    assert_eq!(reports, 1, "reported once");
    assert!(!text.contains("tok-1") && !text.contains(&"a5".repeat(32)));
    gw.stop().await;
}

#[tokio::test]
async fn persist_request_path_never_reads_the_store() {
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{}",
        cc_config(&idp, &up, "[store]\nkind = \"memory\"", "")
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let store = Arc::new(MemoryStore::new());
    let app = App::start_with_store(Config::load(&path).unwrap(), store.clone())
        .await
        .unwrap();
    let url = format!("http://{}/crm/load", app.addr);
    let c = Client::new();
    assert_eq!(c.get(&url).await.status, StatusCode::OK);
    let loads = store.loads();
    assert_eq!(loads, 1, "start-up reads the store once");

    // 2,000 requests, 50 at a time.
    let workers: Vec<_> = (0..50)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    assert_eq!(c.get(&url).await.status, StatusCode::OK);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    assert!(up.count() >= 2_001);
    assert_eq!(store.loads(), loads, "the request path read the store");
    assert_eq!(idp.requests(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn persist_failing_write_still_serves_and_lands_after_recovery() {
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    std::env::set_var("PERSIST_RT_SEED_MEM", "rt-0");
    std::env::set_var(SECRET_ENV, "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"[listen]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[store]
kind = "memory"

[providers.crm]
grant = "refresh_token"
token_url = "{}"
client_id = "billing"
client_secret_env = "{SECRET_ENV}"
refresh_token_env = "PERSIST_RT_SEED_MEM"

[[routes]]
prefix = "/crm"
upstream = "{}"
provider = "crm"
"#,
        idp.token_url(),
        up.url()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let store = Arc::new(MemoryStore::new());
    store.set_failing(true);
    let app = App::start_with_store(Config::load(&path).unwrap(), store.clone())
        .await
        .unwrap();
    let c = Client::new();
    let r = c.get(&format!("http://{}/crm/x", app.addr)).await;
    assert_eq!(r.status, StatusCode::OK, "a failing store blocked serving");
    assert_eq!(up.last().headers["authorization"], "Bearer tok-1");
    assert!(app.gateway.store.is_failing());
    let admin = app.admin_addr.unwrap();
    let ready = c.get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["store"], "failing");
    assert!(store.peek("crm").is_none());

    store.set_failing(false);
    // The retry backs off from about a second; give it a few rounds.
    eventually("the retried write", Duration::from_secs(15), || {
        store.peek("crm").is_some()
    })
    .await;
    let saved = store.peek("crm").unwrap();
    assert_eq!(saved.refresh_token.unwrap().expose(), "rt-1");
    eventually("the store to recover", Duration::from_secs(5), || {
        !app.gateway.store.is_failing()
    })
    .await;
    assert_eq!(store.kind(), "memory");
    app.shutdown().await;
}

/// The real binary as a child process, killed (SIGKILL on Unix) when dropped so a
/// failing test never leaks it.
struct Child(std::process::Child);

impl Child {
    fn spawn(config: &Path, log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_authgate"))
            .args(["run", "--config"])
            .arg(config)
            // The configured seed stays `rt-0` for every start: the stored, newer
            // refresh token must win over it.
            .env("PERSIST_CHILD_RT", "rt-0")
            .env("PERSIST_CHILD_SECRET", "s3cret")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Child(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free right now (the child binds it itself).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until the child listens on `port`, then sends one GET to `url`.
async fn first_answer(port: u16, url: &str, child: &mut Child, log: &Path) -> StatusCode {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(exit) = child.0.try_wait().unwrap() {
            panic!("gateway exited with {exit}: {}", file_text(log));
        }
        assert!(
            Instant::now() < deadline,
            "gateway not listening in 20 s: {}",
            file_text(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Client::new().get(url).await.status
}

#[tokio::test]
async fn persist_sigkill_after_rotation_restarts_with_the_newest_refresh_token() {
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"[listen]
addr = "127.0.0.1:{port}"

[store]
kind = "file"
path = "state/tokens.json"

[providers.crm]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "billing"
client_secret_env = "PERSIST_CHILD_SECRET"
refresh_token_env = "PERSIST_CHILD_RT"
# A 401 right after start-up must still refresh (the rotation under test). Not
# "1ms": the second refresh can come within a millisecond of the first one's start
# on a fast machine, and would then be refused as too soon (seen once in CI).
min_refresh_interval = "0s"

[[routes]]
prefix = "/crm"
upstream = "{up}"
provider = "crm"
"#,
            token_url = idp.token_url(),
            up = up.url()
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/crm/x");
    let log = dir.path().join("child.log");

    let mut child = Child::spawn(&config, &log);
    assert_eq!(
        first_answer(port, &url, &mut child, &log).await,
        StatusCode::OK
    );
    assert_eq!(idp.current_refresh_tokens(), ["rt-1"]);

    // Rotate once more: every token revoked, the next request gets a 401, the
    // gateway refreshes with rt-1 (getting rt-2) and replays.
    idp.revoke_all();
    let c = Client::new();
    assert_eq!(c.get(&url).await.status, StatusCode::OK);
    assert_eq!(idp.current_refresh_tokens(), ["rt-2"]);
    // The replay was served with the new access token, so rt-2 is already on disk:
    // kill without any grace.
    child.kill();
    let stored = file_text(&dir.path().join("state/tokens.json"));
    assert!(stored.contains("rt-2"), "rotated refresh token not on disk");

    // Force a refresh after the restart, so the IdP must accept the stored token.
    idp.revoke_all();
    let before = idp.requests();
    let mut child = Child::spawn(&config, &log);
    let status = first_answer(port, &url, &mut child, &log).await;
    assert_eq!(status, StatusCode::OK, "{}", file_text(&log));
    let seen = idp.seen();
    let presented: Vec<&str> = seen.iter().filter_map(|s| s.get("refresh_token")).collect();
    assert_eq!(presented, ["rt-0", "rt-1", "rt-2"], "after {before}");
    assert_eq!(idp.current_refresh_tokens(), ["rt-3"]);
    child.kill();
}

#[tokio::test]
async fn persist_older_stored_record_never_replaces_the_newest_refresh_token() {
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    std::env::set_var("PERSIST_RT_SEED_OLD", "rt-0");
    std::env::set_var(SECRET_ENV, "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"[listen]
addr = "127.0.0.1:0"
[store]
kind = "memory"

[providers.crm]
grant = "refresh_token"
token_url = "{}"
client_id = "billing"
client_secret_env = "{SECRET_ENV}"
refresh_token_env = "PERSIST_RT_SEED_OLD"
# No spacing: the 401 below may come within a millisecond of the first refresh.
min_refresh_interval = "0s"

[[routes]]
prefix = "/crm"
upstream = "{}"
provider = "crm"
"#,
        idp.token_url(),
        up.url()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let store = Arc::new(MemoryStore::new());
    let app = App::start_with_store(Config::load(&path).unwrap(), store.clone())
        .await
        .unwrap();
    let url = format!("http://{}/crm/x", app.addr);
    let c = Client::new();
    assert_eq!(c.get(&url).await.status, StatusCode::OK);
    let mut older = store.peek("crm").expect("rotated token persisted");
    assert_eq!(older.refresh_token.as_ref().unwrap().expose(), "rt-1");

    // The store goes back to a record older than the provider's token (as when our
    // newer write is still being retried, or another replica lags), and the
    // provider is told the store changed.
    older.generation = 0;
    older.refresh_token = Some(authgate::secret::Secret::new("rt-0"));
    store.insert("crm", older);
    let provider = app.gateway.snapshot().providers["crm"].clone();
    provider.on_store_change().await;

    // The next refresh still presents the newest refresh token.
    idp.revoke_all();
    assert_eq!(c.get(&url).await.status, StatusCode::OK);
    let presented: Vec<String> = idp
        .seen()
        .iter()
        .filter_map(|s| s.get("refresh_token").map(str::to_owned))
        .collect();
    assert_eq!(presented, ["rt-0", "rt-1"]);
    app.shutdown().await;
}
