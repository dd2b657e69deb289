//! Config errors name file, line, column and key path; `check` exits 2 on them.

use std::process::Command;

fn check(toml: &str) -> (i32, String, String) {
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
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const BASE: &str = r#"[listen]
addr = "127.0.0.1:0"

[providers.crm]
grant = "static"
token_env = "X"

[providers.erp]
grant = "static"
token_env = "Y"
"#;

#[test]
fn shipped_proxy_toml_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/crm"));
}

#[test]
fn unknown_provider_names_line_column_and_key() {
    let toml = format!(
        "{BASE}\n[[routes]]\nprefix = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n\n[[routes]]\nprefix = \"/b\"\nupstream = \"http://127.0.0.1:1\"\n\n[[routes]]\nprefix = \"/c\"\nupstream = \"http://127.0.0.1:1\"\nprovider = \"crn\"\n"
    );
    let (code, _, err) = check(&toml);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        r#"proxy.toml:23:1: routes[2].provider: unknown provider "crn" (known: crm, erp)"#
    );
}

#[test]
fn unknown_key_is_an_error() {
    let (code, _, err) = check("[listen]\naddr = \"127.0.0.1:0\"\nadress = \"x\"\n");
    assert_eq!(code, 2);
    assert!(
        err.starts_with("proxy.toml:3:1: listen.adress: unknown field `adress`"),
        "{err}"
    );
}

#[test]
fn bad_duration_and_size_are_located() {
    let (code, _, err) =
        check("[listen]\naddr = \"127.0.0.1:0\"\nheader_timeout = \"10 parsecs\"\n");
    assert_eq!(code, 2);
    assert!(
        err.starts_with("proxy.toml:3:18: listen.header_timeout: invalid duration"),
        "{err}"
    );
    let (code, _, err) = check("[listen]\naddr = \"127.0.0.1:0\"\nmax_body = \"lots\"\n");
    assert_eq!(code, 2);
    assert!(
        err.starts_with("proxy.toml:3:12: listen.max_body: invalid size"),
        "{err}"
    );
}

#[test]
fn plain_http_upstream_needs_loopback_or_allow_http() {
    let toml = "[listen]\naddr = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/a\"\nupstream = \"http://api.example\"\n";
    let (code, _, err) = check(toml);
    assert_eq!(code, 2);
    assert!(
        err.contains("routes[0].upstream: upstream \"http://api.example\" is plain http"),
        "{err}"
    );
    let (code, _, _) = check(&format!("{toml}allow_http = true\n"));
    assert_eq!(code, 0);
}

#[test]
fn duplicate_prefixes_and_unknown_callers_are_refused() {
    let toml = "[listen]\naddr = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/a\"\nupstream = \"https://x.example\"\n[[routes]]\nprefix = \"/a/\"\nupstream = \"https://y.example\"\n";
    let (code, _, err) = check(toml);
    assert_eq!(code, 2);
    assert!(
        err.contains("proxy.toml:7:1: routes[1].prefix: duplicate prefix \"/a\""),
        "{err}"
    );
    let toml = "[listen]\naddr = \"127.0.0.1:0\"\n[[routes]]\nprefix = \"/a\"\nupstream = \"https://x.example\"\nallow = [\"billing\"]\n[callers.reports]\naddrs = [\"10.0.0.0/8\"]\n";
    let (code, _, err) = check(toml);
    assert_eq!(code, 2);
    assert!(
        err.contains("routes[0].allow[0]: unknown caller \"billing\" (known: reports)"),
        "{err}"
    );
}

#[test]
fn secrets_cannot_be_written_in_the_file() {
    let (code, _, err) = check(
        "[listen]\naddr = \"127.0.0.1:0\"\n[providers.p]\ngrant = \"static\"\ntoken = \"abc\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("providers.p.token: unknown field `token`"),
        "{err}"
    );
    assert!(!err.contains("abc"));
}

#[test]
fn syntax_errors_have_a_position() {
    let (code, _, err) = check("[listen\naddr = 1\n");
    assert_eq!(code, 2);
    assert!(err.starts_with("proxy.toml:1:"), "{err}");
}

#[test]
fn run_exits_2_on_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[listen]\naddr = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_authgate"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen.addr"));
}

#[test]
fn a_grant_without_its_secret_is_located_at_the_grant() {
    let (code, _, err) =
        check("[listen]\naddr = \"127.0.0.1:0\"\n[providers.k]\ngrant = \"static\"\n");
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        r#"proxy.toml:4:1: providers.k.grant: grant = "static" needs token_env or token_file"#
    );
    let (code, _, err) = check(
        "[listen]\naddr = \"127.0.0.1:0\"\n[providers.r]\ngrant = \"refresh_token\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"c\"\n",
    );
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        r#"proxy.toml:4:1: providers.r.grant: grant = "refresh_token" needs refresh_token_env or refresh_token_file"#
    );
}

/// `--config`, else `$AUTHGATE_CONFIG`, else `./proxy.toml`.
#[test]
fn the_config_path_comes_from_the_flag_the_env_or_the_working_folder() {
    let dir = tempfile::tempdir().unwrap();
    let good = "[listen]\naddr = \"127.0.0.1:0\"\n";
    std::fs::write(dir.path().join("proxy.toml"), good).unwrap();
    std::fs::write(dir.path().join("other.toml"), "[listen]\naddr = 1\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_authgate");
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir.path())
            .env_remove("AUTHGATE_CONFIG");
        if let Some(v) = env {
            cmd.env("AUTHGATE_CONFIG", v);
        }
        cmd.output().unwrap()
    };
    // ./proxy.toml in the working folder.
    assert_eq!(run(&["check"], None).status.code(), Some(0));
    // $AUTHGATE_CONFIG wins over it.
    let out = run(&["check"], Some("other.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("other.toml:2:"));
    // --config wins over both.
    assert_eq!(
        run(&["check", "--config", "proxy.toml"], Some("other.toml"))
            .status
            .code(),
        Some(0)
    );
}

/// With no subcommand, `authgate` serves.
#[test]
fn run_is_the_default_command() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!("[listen]\naddr = \"127.0.0.1:{port}\"\n[store]\nkind = \"memory\"\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_authgate"))
        .current_dir(dir.path())
        .env_remove("AUTHGATE_CONFIG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let listening = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "authgate with no subcommand did not serve");
}

#[test]
fn log_keep_of_zero_and_unknown_log_keys_are_errors() {
    let (code, _, err) = check(&format!(
        "{BASE}\n[log]\nfile = \"logs/authgate.log\"\nkeep = 0\n"
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxy.toml:14:1: log.keep: must be at least 1"),
        "{err}"
    );
    let (code, _, err) = check(&format!("{BASE}\n[log]\nrotate = \"hourly\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("log.rotate"), "{err}");
    let (code, _, err) = check(&format!("{BASE}\n[log]\nfile = \"logs/\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("log.file: must name a file"), "{err}");
}

#[test]
fn store_protect_is_checked_and_dpapi_is_windows_only() {
    let (code, _, err) = check(&format!("{BASE}\n[store]\nprotect = \"dpapi\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxy.toml:13:1: store.protect: \"dpapi\" is Windows only"),
        "{err}"
    );
    let (code, _, err) = check(&format!("{BASE}\n[store]\nprotect = \"key\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("store.protect: protect = \"key\" needs key_env"),
        "{err}"
    );
    let (code, _, err) = check(&format!(
        "{BASE}\n[store]\nprotect = \"none\"\nkey_env = \"K\"\n"
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("store.protect: \"none\" with key_env"),
        "{err}"
    );
    let (code, _, err) = check(&format!("{BASE}\n[store]\nprotect = \"rot13\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown protection \"rot13\""), "{err}");
    let (code, _, err) = check(&format!("{BASE}\n[store]\nprotect = \"none\"\n"));
    assert_eq!(code, 0, "{err}");
}
