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
//! It also measures the bind and unmount pair again while another thread
//! keeps a second CPU busy (yielding in a loop, as a polling thread or a
//! busy client does). That one is not part of the floor, but it shows what
//! the floor leaves out: an unmount waits for an expedited RCU grace
//! period, which is quick while every other CPU idles and needs an
//! interrupt to each CPU that runs something (on a virtual machine, tens
//! of microseconds), and during a real lifecycle the client, the driver's
//! other threads or other work run beside it.
//!
//! The floor of a local volume's lifecycle (create, stage, publish,
//! unpublish, unstage, delete, one at a time) is two bind/unmount pairs,
//! two durable appends, two mkdir/rmdir pairs and one directory flush;
//! nothing a driver does can make a cycle cheaper than that. Needs root (it
//! mounts) and a private mount namespace is best (bench/run.sh gives it
//! one); everything is made under --work-dir and removed.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Mean microseconds of one local lifecycle's floor (the module comment):
/// from the idle measures only, never the pair beside a busy CPU.
fn floor_us(s: &Samples) -> f64 {
    let m = |op: &str| mean(s.by_op.get(op).map(Vec::as_slice).unwrap_or(&[]));
    2.0 * m("bind + unmount")
        + 2.0 * m("append + fdatasync")
        + 2.0 * m("mkdir + rmdir")
        + m("fsync new dir + parent")
}

/// The name of the pair measured beside a busy CPU (not in the floor).
pub const BUSY: &str = "bind + unmount, CPU busy";

fn bind_pairs(
    source: &Path,
    target: &Path,
    count: usize,
    s: &mut Samples,
    name: &'static str,
) -> anyhow::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    for _ in 0..count {
        let t = Instant::now();
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        umount2(target, MntFlags::empty())?;
        s.add(name, t.elapsed());
    }
    Ok(())
}

fn measure(a: &FloorArgs) -> anyhow::Result<FloorReport> {
    let mut s = Samples::default();
    let source = a.work_dir.join("source");
    let target = a.work_dir.join("target");
    std::fs::create_dir_all(&source)?;
    std::fs::create_dir_all(&target)?;
    bind_pairs(&source, &target, a.count, &mut s, "bind + unmount")?;
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
            })
        };
        let r = bind_pairs(&source, &target, a.count, &mut s, BUSY);
        stop.store(true, Ordering::Relaxed);
        let _ = spinner.join();
        r?;
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
    let floor = floor_us(&s);
    Ok(FloorReport {
        operations: s.summary(),
        lifecycle_floor_us: floor,
        lifecycle_floor_per_second: if floor > 0.0 { 1e6 / floor } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_leaves_the_pair_beside_a_busy_cpu_out() {
        let mut s = Samples::default();
        let us = Duration::from_micros;
        s.add("bind + unmount", us(4));
        s.add("bind + unmount", us(6));
        s.add(BUSY, us(1000));
        s.add("append + fdatasync", us(200));
        s.add("mkdir + rmdir", us(60));
        s.add("fsync new dir + parent", us(400));
        let f = floor_us(&s);
        assert!(
            (f - (2.0 * 5.0 + 2.0 * 200.0 + 2.0 * 60.0 + 400.0)).abs() < 1e-6,
            "{f}"
        );
    }
}
