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
    Rig::remove(&a.work_dir);
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
pub fn floor_us(s: &Samples) -> f64 {
    let m = |op: &str| mean(s.by_op.get(op).map(Vec::as_slice).unwrap_or(&[]));
    2.0 * m("bind + unmount")
        + 2.0 * m("append + fdatasync")
        + 2.0 * m("mkdir + rmdir")
        + m("fsync new dir + parent")
}

/// The name of the pair measured beside a busy CPU (not in the floor).
pub const BUSY: &str = "bind + unmount, CPU busy";

/// What the floor's operations work on, under one directory: a source and
/// a target for the binds, a log for the appends, a directory for the
/// mkdirs. Kept for a run, so a lifecycle can measure the floor in blocks
/// between its own (`lifecycle --floor`); the caller removes the directory
/// (and any bind left on `target` by an error) with `remove`.
pub struct Rig {
    source: PathBuf,
    target: PathBuf,
    log: std::fs::File,
    off: u64,
    dirs: PathBuf,
    /// Names of the directories made so far (each new, as a volume's is).
    made: usize,
}

impl Rig {
    /// Makes the rig under `work_dir` (absolute; created).
    pub fn new(work_dir: &Path) -> anyhow::Result<Rig> {
        anyhow::ensure!(
            work_dir.is_absolute(),
            "the floor's directory must be absolute"
        );
        let source = work_dir.join("source");
        let target = work_dir.join("target");
        let dirs = work_dir.join("dirs");
        for d in [&source, &target, &dirs] {
            std::fs::create_dir_all(d)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(work_dir.join("log"))?;
        Ok(Rig {
            source,
            target,
            log,
            off: 0,
            dirs,
            made: 0,
        })
    }

    /// Takes down what the rig made under `work_dir` (a bind an error
    /// left on its target too).
    pub fn remove(work_dir: &Path) {
        let _ = nix::mount::umount2(&work_dir.join("target"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(work_dir);
    }

    /// A bind mount of the source on the target and its unmount.
    pub fn bind_pair(&mut self) -> anyhow::Result<Duration> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let t = Instant::now();
        mount(
            Some(&self.source),
            &self.target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        umount2(&self.target, MntFlags::empty())?;
        Ok(t.elapsed())
    }

    /// One journal-sized line appended and flushed with fdatasync.
    pub fn append(&mut self) -> anyhow::Result<Duration> {
        const LINE: [u8; 512] = {
            let mut l = [b'x'; 512];
            l[511] = b'\n';
            l
        };
        let t = Instant::now();
        self.log.write_all_at(&LINE, self.off)?;
        self.log.sync_data()?;
        self.off += LINE.len() as u64;
        Ok(t.elapsed())
    }

    /// A new directory made and removed.
    pub fn mkdir_rmdir(&mut self) -> anyhow::Result<Duration> {
        let d = self.dirs.join(format!("d{}", self.made));
        self.made += 1;
        let t = Instant::now();
        std::fs::create_dir(&d)?;
        std::fs::remove_dir(&d)?;
        Ok(t.elapsed())
    }

    /// A new directory (made untimed, kept) flushed with its parent.
    pub fn dir_flush(&mut self) -> anyhow::Result<Duration> {
        let d = self.dirs.join(format!("s{}", self.made));
        self.made += 1;
        std::fs::create_dir(&d)?;
        let t = Instant::now();
        std::fs::File::open(&d)?.sync_all()?;
        std::fs::File::open(&self.dirs)?.sync_all()?;
        Ok(t.elapsed())
    }

    /// The operations of one local lifecycle's floor (the module comment),
    /// in a lifecycle's order, each added to `s` under the names
    /// `floor_us` sums.
    pub fn cycle(&mut self, s: &mut Samples) -> anyhow::Result<()> {
        s.add("fsync new dir + parent", self.dir_flush()?);
        s.add("append + fdatasync", self.append()?);
        s.add("mkdir + rmdir", self.mkdir_rmdir()?);
        s.add("bind + unmount", self.bind_pair()?);
        s.add("mkdir + rmdir", self.mkdir_rmdir()?);
        s.add("bind + unmount", self.bind_pair()?);
        s.add("append + fdatasync", self.append()?);
        Ok(())
    }
}

fn measure(a: &FloorArgs) -> anyhow::Result<FloorReport> {
    let mut s = Samples::default();
    let mut rig = Rig::new(&a.work_dir)?;
    for _ in 0..a.count {
        s.add("bind + unmount", rig.bind_pair()?);
    }
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
        let mut r = Ok(());
        for _ in 0..a.count {
            match rig.bind_pair() {
                Ok(d) => s.add(BUSY, d),
                Err(e) => {
                    r = Err(e);
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = spinner.join();
        r?;
    }
    for _ in 0..a.count {
        s.add("append + fdatasync", rig.append()?);
    }
    for _ in 0..a.count {
        s.add("mkdir + rmdir", rig.mkdir_rmdir()?);
    }
    for _ in 0..a.count {
        s.add("fsync new dir + parent", rig.dir_flush()?);
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
