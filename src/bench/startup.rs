//! Start-up benchmark: spawns berth with the given arguments, measures the
//! time from spawn to the first successful Probe answer, then its idle RSS,
//! then stops it with SIGTERM.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::client::connect;
use crate::csi::v1 as csi;

#[derive(Debug, Clone, Args)]
pub struct StartupArgs {
    /// The berth binary (default: this one).
    #[arg(long)]
    pub berth: Option<PathBuf>,
    /// How long to let berth idle before reading its RSS.
    #[arg(long, default_value_t = 2000)]
    pub settle_ms: u64,
    #[arg(long)]
    pub json: bool,
    /// Arguments for berth (after `--`); --endpoint is added.
    #[arg(last = true)]
    pub berth_args: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StartupReport {
    pub first_probe_ms: f64,
    pub idle_rss_kib: Option<u64>,
}

pub async fn run(endpoint: &str, a: StartupArgs) -> anyhow::Result<i32> {
    let bin = match &a.berth {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .args(&a.berth_args)
        .arg("--endpoint")
        .arg(endpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("berth exited at once"))?;
    let deadline = t0 + Duration::from_secs(60);
    let first_probe = loop {
        anyhow::ensure!(Instant::now() < deadline, "no Probe answer within 60 s");
        if let Ok(Some(st)) = child.try_wait() {
            anyhow::bail!("berth exited with {st}");
        }
        if let Ok(mut c) = connect(endpoint).await {
            if let Ok(r) = c.identity.probe(csi::ProbeRequest {}).await {
                if r.into_inner().ready != Some(false) {
                    break t0.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    let rss = super::rss::rss_kib(pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let report = StartupReport {
        first_probe_ms: (first_probe.as_secs_f64() * 1e6).round() / 1e3,
        idle_rss_kib: rss,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "first Probe answered {:.1} ms after spawn",
            report.first_probe_ms
        );
        if let Some(r) = report.idle_rss_kib {
            println!(
                "idle RSS after {} ms: {:.2} MiB",
                a.settle_ms,
                r as f64 / 1024.0
            );
        }
    }
    Ok(0)
}
