//! How many lines per second the audit writer sustains: queues `LINES` request
//! records (a queue that holds them all, so none is dropped) and times until the
//! writer has chained and written the last one, with and without a chain key.
//!
//! `cargo run --release --example audit_writer [LINES] [DIR]` (default 1,000,000
//! lines, a temp folder). Each line is a typical request record, about 400 bytes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use authgate::audit::{AuditSink, RequestRecord};
use authgate::config::{Audit, AuditTarget, Rotate};
use authgate::secret::SecretSource;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let lines: usize = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let tmp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map_or_else(|| tmp.path().to_path_buf(), Into::into);
    std::env::set_var("AUDIT_BENCH_KEY", "bench-chain-key");
    for (name, key, rotate) in [
        ("sha256", None, Rotate::Never),
        (
            "hmac",
            Some(SecretSource::Env("AUDIT_BENCH_KEY".into())),
            Rotate::Never,
        ),
        (
            "hmac+rotate 100MiB",
            Some(SecretSource::Env("AUDIT_BENCH_KEY".into())),
            Rotate::Size(100 << 20),
        ),
    ] {
        let path = dir.join(format!("bench-{}.log", name.replace(['+', ' '], "-")));
        let cfg = Audit {
            target: AuditTarget::File(path.clone()),
            buffer: lines,
            rotate,
            keep: None,
            key,
        };
        let metrics = authgate::metrics::Metrics::new();
        let (sink, task) = AuditSink::start(&cfg, metrics.clone()).await?;
        let start = Instant::now();
        for i in 0..lines {
            sink.request(record(i));
        }
        let queued = start.elapsed();
        drop(sink);
        task.await?;
        let took = start.elapsed();
        let prefix = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mut bytes = 0;
        for f in std::fs::read_dir(&dir)? {
            let f = f?;
            if f.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                bytes += f.metadata()?.len();
            }
        }
        let dropped = metrics
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix("authgate_audit_dropped_total ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        println!(
            "{name:<20} {lines} lines in {:.2} s: {:.0} lines/s, {:.0} MB/s written ({} bytes/line; queueing took {:.0} ns/line on the sending side; dropped {dropped})",
            took.as_secs_f64(),
            lines as f64 / took.as_secs_f64(),
            bytes as f64 / took.as_secs_f64() / 1e6,
            bytes / lines.max(1) as u64,
            queued.as_nanos() as f64 / lines as f64,
        );
        for f in std::fs::read_dir(&dir)? {
            let p = f?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bench-"))
            {
                std::fs::remove_file(p)?;
            }
        }
    }
    Ok(())
}

fn record(i: usize) -> RequestRecord {
    RequestRecord {
        ts: SystemTime::now(),
        request_id: http::HeaderValue::from_static("0196f1a2-7c4e-7d1a-9b3e-5f2c8a1d4e6b"),
        caller: Some(Arc::from("billing")),
        client_addr: "10.1.2.3:54321"
            .parse()
            .unwrap_or(([127, 0, 0, 1], 0).into()),
        route: Some(Arc::from("/crm")),
        provider: Some(Arc::from("crm")),
        method: http::Method::GET,
        path: format!("/crm/invoices/{i}"),
        status: 200,
        upstream_status: Some(200),
        duration_ms: Duration::from_micros(1234).as_millis() as u64,
        token_generation: Some(3),
        replayed: false,
        error: None,
    }
}
