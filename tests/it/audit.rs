//! The audit log as an auditor meets it: seq and chain on every line of a real
//! gateway's log, rotation, a restart that continues the chain, `authgate audit
//! verify` on the result, a disk that refuses writes, and SIGHUP reopening.

use std::path::{Path, PathBuf};
use std::process::Output;

use hyper::StatusCode;

use crate::support::{until, Client, MockUpstream, TestGateway};

const CHAIN_KEY: &str = "it-audit-chain-key-0b93c1";

fn config(up: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
[admin]
addr = "127.0.0.1:0"

[audit]
file = "{{dir}}/audit.log"
key_file = "{{dir}}/audit.key"
{extra}

[[routes]]
name = "api"
prefix = "/api"
upstream = "{u}"
"#,
        u = up.url()
    )
}

/// A temp folder holding the chain key, for `TestGateway::start_in`.
fn folder_with_key() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit.key"), format!("{CHAIN_KEY}\n")).unwrap();
    dir
}

fn verify_cmd(config: &Path, files: &[PathBuf]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(["audit", "verify", "--config"])
        .arg(config)
        .args(files)
        .env_remove("AUTHGATE_CONFIG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

async fn requests(c: &Client, gw: &TestGateway, n: usize) {
    for i in 0..n {
        let r = c.get(&gw.url(&format!("/api/item/{i}"))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

fn audit_files(dir: &Path) -> Vec<PathBuf> {
    authgate::audit::verify::log_files(&dir.join("audit.log")).unwrap()
}

#[tokio::test]
async fn a_rotated_and_restarted_log_verifies_and_tampering_is_named() {
    let up = MockUpstream::start().await;
    let toml = config(&up, "rotate = \"2KiB\"");
    let mut gw = TestGateway::start_in(folder_with_key(), &toml)
        .await
        .unwrap();
    let dir = gw.dir.path().to_path_buf();
    let c = Client::new();
    requests(&c, &gw, 12).await;
    gw.app.take().unwrap().shutdown().await;

    // A restart continues seq and chain from the last line written.
    let config = authgate::Config::load(&gw.config_path).unwrap();
    gw.app = Some(authgate::App::start(config).await.unwrap());
    gw.addr = gw.app().addr;
    requests(&c, &gw, 8).await;
    gw.app.take().unwrap().shutdown().await;

    let files = audit_files(&dir);
    assert!(files.len() >= 3, "rotated by size: {files:?}");
    let mut seqs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.len() <= 2048, "{} is over 2KiB", f.display());
        assert!(!text.contains(CHAIN_KEY));
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            seqs.push(v["seq"].as_u64().unwrap());
            assert_eq!(v["chain"].as_str().unwrap().len(), 64);
        }
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());

    let out = verify_cmd(&gw.config_path, &[]);
    assert_eq!(stdout(&out), "ok: 20 lines, seq 1..20\n");
    assert_eq!(out.status.code(), Some(0));
    // Named files, in any order (a shell glob puts the active file first).
    let mut named = files.clone();
    named.reverse();
    let out = verify_cmd(&gw.config_path, &named);
    assert_eq!(stdout(&out), "ok: 20 lines, seq 1..20\n");

    // Another key (the config names the key; here a different one).
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&gw.config_path)
            .unwrap()
            .replace("audit.key", "other.key"),
    )
    .unwrap();
    std::fs::write(dir.join("other.key"), "not-the-key").unwrap();
    let out = verify_cmd(&other, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with(&format!("{}:1: altered:", files[0].display())),
        "{}",
        stdout(&out)
    );

    // One edited line in the second file.
    let second = &files[1];
    let mut lines: Vec<String> = std::fs::read_to_string(second)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines[1] = lines[1].replacen("\"status\":200", "\"status\":201", 1);
    std::fs::write(second, lines.join("\n") + "\n").unwrap();
    let out = verify_cmd(&gw.config_path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with(&format!("{}:2: altered:", second.display())),
        "{}",
        stdout(&out)
    );
    gw.stop().await;
}

#[test]
fn audit_config_errors_name_the_key() {
    let bad = |audit: &str| {
        let text = format!("[listen]\naddr = \"127.0.0.1:0\"\n[audit]\n{audit}\n");
        authgate::Config::parse(Path::new("proxy.toml"), &text)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        bad("file = \"a.log\"\nrotate = \"weekly\""),
        "proxy.toml:5:1: audit.rotate: invalid rotate \"weekly\"; use \"daily\", \"hourly\" or a size like \"100MiB\""
    );
    assert!(bad("file = \"-\"\nrotate = \"daily\"").contains("audit.rotate: file = \"-\""));
    assert!(bad("file = \"a.log\"\nkey_env = \"A\"\nkey_file = \"k\"")
        .contains("audit.key_file: set key_env or key_file, not both"));
    assert!(bad("file = \"a.log\"\nkeep = \"x\"").contains("audit.keep"));
    assert!(bad("file = \"a.log\"\nrotat = \"daily\"").contains("rotat"));
}

#[tokio::test]
async fn a_missing_key_stops_the_start_as_a_config_error() {
    let up = MockUpstream::start().await;
    let err = TestGateway::start_in(tempfile::tempdir().unwrap(), &config(&up, ""))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("audit.key"), "{err}");
}

/// A disk that refuses every write (`/dev/full`): lines are counted as dropped,
/// the failure is reported once, requests are served, and once the file can be
/// written again the log records how many lines it lost and still verifies.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn unwritable_audit_file_counts_drops_keeps_serving_and_recovers() {
    let logs = crate::support::captured_logs();
    let up = MockUpstream::start().await;
    let dir = folder_with_key();
    let path = dir.path().join("audit.log");
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let gw = TestGateway::start_in(dir, &config(&up, "")).await.unwrap();
    let c = Client::new();
    requests(&c, &gw, 5).await;
    let dropped = || async {
        let m = c.get(&gw.admin_url("/metrics")).await.text();
        m.lines()
            .find_map(|l| l.strip_prefix("authgate_audit_dropped_total "))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    until("5 lines counted as dropped", || async {
        dropped().await >= 5.0
    })
    .await;
    requests(&c, &gw, 3).await;
    until("8 lines counted as dropped", || async {
        dropped().await >= 8.0
    })
    .await;
    let reported = String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| {
            l.contains("audit log cannot be written") && l.contains(&path.display().to_string())
        })
        .count();
    assert_eq!(reported, 1, "reported once");

    // Space returns.
    std::fs::remove_file(&path).unwrap();
    requests(&c, &gw, 1).await;
    until("the log written again", || async { line_count(&path) >= 2 }).await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "audit_lines_lost");
    assert_eq!(lines[0]["write_failed"], 8);
    assert_eq!(lines[1]["path"], "/api/item/0");
    assert_eq!(dropped().await, 8.0);
    let out = verify_cmd(&gw.config_path, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).starts_with("ok: 2 lines, seq 1..2\n"));
    gw.stop().await;
}

/// The real binary: after an external rotator moves the file, SIGHUP makes the
/// gateway write to a new file at the configured path.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reopens_the_audit_file() {
    use tokio::io::AsyncBufReadExt;
    let up = MockUpstream::start().await;
    let dir = folder_with_key();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[store]\nkind = \"memory\"\n{}",
        config(&up, "").replace("{dir}", &dir.path().display().to_string())
    );
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(["run", "--no-watch", "--log-format", "json", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap().to_string();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let port = tokio::time::timeout(std::time::Duration::from_secs(20), async {
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
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let c = Client::new();
    let url = format!("http://127.0.0.1:{port}/api/x");
    let path = dir.path().join("audit.log");
    assert_eq!(c.get(&url).await.status, StatusCode::OK);
    until("the first line", || async { line_count(&path) == 1 }).await;
    let moved = dir.path().join("audit.log.moved");
    std::fs::rename(&path, &moved).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    // Requests until one lands in the new file (the reopen happens before the
    // writer's next line after the signal is handled).
    let sent = std::sync::atomic::AtomicUsize::new(1);
    until("a line in a new audit.log", || async {
        assert_eq!(c.get(&url).await.status, StatusCode::OK);
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        line_count(&path) >= 1
    })
    .await;
    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
    until("every request's line written", || async {
        line_count(&path) + line_count(&moved) == n
    })
    .await;
    let out = verify_cmd(&cfg, &[path.clone(), moved.clone()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with(&format!("ok: {n} lines, seq 1..{n}")),
        "{}",
        stdout(&out)
    );

    // The writer thread ends with the gateway: SIGTERM still exits 0, promptly.
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
