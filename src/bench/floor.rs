//! `berth bench floor`: what this machine's kernel and disk allow for the
//! operations a volume's life is made of, measured without any driver, so
//! every other measure can be given as a ratio to it:
//! - a bind mount and its unmount (stage and publish are one each);
//! - an append of one journal-sized line with fdatasync (a durable record
//!   change: a create's Ready, a delete's removal);
//! - mkdir and rmdir (a volume's directory, a publish target);
//! - fsync of a new directory and of its parent (a local volume's
//!   directory made durable before its record says Ready).
//!
//! The floor of a local volume's lifecycle (create, stage, publish,
//! unpublish, unstage, delete, one at a time) is two bind/unmount pairs,
//! two durable appends, two mkdir/rmdir pairs and one directory flush;
//! nothing a driver does can make a cycle cheaper than that. Needs root (it
//! mounts) and a private mount namespace is best (bench/run.sh gives it
//! one); everything is made under --work-dir and removed.
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::report::{print_table, OpSummary, Samples};

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Repetitions of each operation.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub count: usize,
    /// Directory to work in (absolute; created, removed after). It should
    /// be on the filesystem of the driver's state and volumes.
    #[arg(long, default_value = "/tmp/berth-bench-floor")]
    pub work_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub operations: Vec<OpSummary>,
    /// Mean microseconds of one local lifecycle's floor (see the module
    /// comment) and the cycles per second one at a time that allows.
    pub lifecycle_floor_us: f64,
    pub lifecycle_floor_per_second: f64,
}

fn mean(v: &[Duration]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(|d| d.as_secs_f64()).sum::<f64>() / v.len() as f64 * 1e6
}

pub fn run(a: FloorArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.work_dir.is_absolute(), "--work-dir must be absolute");
    std::fs::create_dir_all(&a.work_dir)?;
    let r = measure(&a);
    let _ = nix::mount::umount2(&a.work_dir.join("target"), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&a.work_dir);
    let report = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report.operations);
        println!(
            "floor of one local lifecycle (2 bind/unmount, 2 durable appends, 2 mkdir/rmdir, 1 directory flush): {:.0} us, {:.0} cycles/s one at a time",
            report.lifecycle_floor_us, report.lifecycle_floor_per_second
        );
    }
    Ok(0)
}

fn measure(a: &FloorArgs) -> anyhow::Result<FloorReport> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let mut s = Samples::default();
    let source = a.work_dir.join("source");
    let target = a.work_dir.join("target");
    std::fs::create_dir_all(&source)?;
    std::fs::create_dir_all(&target)?;
    for _ in 0..a.count {
        let t = Instant::now();
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        umount2(&target, MntFlags::empty())?;
        s.add("bind + unmount", t.elapsed());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(a.work_dir.join("log"))?;
    let line = {
        let mut l = vec![b'x'; 511];
        l.push(b'\n');
        l
    };
    let mut off = 0u64;
    for _ in 0..a.count {
        let t = Instant::now();
        log.write_all_at(&line, off)?;
        log.sync_data()?;
        off += line.len() as u64;
        s.add("append + fdatasync", t.elapsed());
    }
    let dirs = a.work_dir.join("dirs");
    std::fs::create_dir_all(&dirs)?;
    for i in 0..a.count {
        let d = dirs.join(format!("d{i}"));
        let t = Instant::now();
        std::fs::create_dir(&d)?;
        std::fs::remove_dir(&d)?;
        s.add("mkdir + rmdir", t.elapsed());
    }
    for i in 0..a.count {
        let d = dirs.join(format!("s{i}"));
        std::fs::create_dir(&d)?;
        let t = Instant::now();
        std::fs::File::open(&d)?.sync_all()?;
        std::fs::File::open(&dirs)?.sync_all()?;
        s.add("fsync new dir + parent", t.elapsed());
    }
    let m = |op: &str| mean(s.by_op.get(op).map(Vec::as_slice).unwrap_or(&[]));
    let floor = 2.0 * m("bind + unmount")
        + 2.0 * m("append + fdatasync")
        + 2.0 * m("mkdir + rmdir")
        + m("fsync new dir + parent");
    Ok(FloorReport {
        operations: s.summary(),
        lifecycle_floor_us: floor,
        lifecycle_floor_per_second: if floor > 0.0 { 1e6 / floor } else { 0.0 },
    })
}
