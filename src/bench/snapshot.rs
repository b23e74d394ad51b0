//! `berth bench snapshot`: how long a snapshot and a restore of one volume
//! holding data take, side by side with what tar-based drivers do with the
//! same data (csi-driver-host-path and csi-driver-nfs archive a directory
//! with `tar czf`; host-path copies a block volume's file with `cp`).
//!
//! It creates a volume, publishes it, fills it (`--files` files of equal
//! size for a filesystem volume; for a raw block volume, `--data` bytes in
//! 1 MiB pieces spread evenly over the device), then times CreateSnapshot
//! (until ready) and CreateVolume from the snapshot, then the same data
//! archived and extracted with tar (and copied with `cp --sparse` for a
//! block volume's backing file), and removes everything it made. Needs to
//! run on the driver's node, as root (it writes through the published
//! path). The driver must be Berth or another driver with snapshots.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::lifecycle::{self, Done, LifecycleArgs};
use super::report::Samples;
use super::VolumeArgs;
use crate::client::connect;
use crate::csi::v1 as csi;

#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Bytes of data to write into the volume.
    #[arg(long, default_value_t = 1 << 30)]
    pub data: u64,
    /// Number of files the data is written as (filesystem volumes).
    #[arg(long, default_value_t = 1)]
    pub files: u64,
    /// Snapshot while the volume is published (default: it is unpublished
    /// and unstaged first; a raw volume in use can be snapshotted only on a
    /// block root that clones files).
    #[arg(long)]
    pub in_use: bool,
    /// Directory for staging, target and tar archives (absolute; created).
    #[arg(long, default_value = "/tmp/berth-bench-snapshot")]
    pub work_dir: PathBuf,
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Runs a command, then flushes the filesystem it wrote to (`flush`; a
/// snapshot is durable before Berth answers, so the comparison includes
/// the flush); the wall time of both in seconds.
fn timed_command(cmd: &mut std::process::Command, flush: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    let f = std::fs::File::open(flush)?;
    nix::unistd::syncfs(&f)?;
    Ok(secs(t))
}

/// Writes `total` bytes as `files` files of equal size under `dir`.
fn fill_dir(dir: &Path, total: u64, files: u64) -> anyhow::Result<()> {
    let files = files.max(1);
    let each = (total / files) as usize;
    let block = vec![0x5au8; each.min(1 << 20)];
    for i in 0..files {
        let sub = dir.join(format!("d{}", i / 1000));
        std::fs::create_dir_all(&sub)?;
        let f = std::fs::File::create(sub.join(format!("f{i}")))?;
        let mut off = 0;
        while off < each {
            let n = block.len().min(each - off);
            f.write_all_at(&block[..n], off as u64)?;
            off += n;
        }
    }
    nix::unistd::sync();
    Ok(())
}

/// Writes `total` bytes in 1 MiB pieces spread evenly over the device.
fn fill_device(dev: &Path, total: u64, size: u64) -> anyhow::Result<()> {
    const PIECE: u64 = 1 << 20;
    let pieces = (total / PIECE).max(1);
    let stride = (size / pieces).max(PIECE) / PIECE * PIECE;
    let f = std::fs::OpenOptions::new().write(true).open(dev)?;
    let buf = vec![0xa5u8; PIECE as usize];
    for i in 0..pieces {
        let off = i * stride;
        if off + PIECE > size {
            break;
        }
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The backing file of the loop device behind a published raw volume.
fn backing_file(dev: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).ok()?.rdev();
    let name = format!("loop{}", nix::sys::stat::minor(rdev));
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim()))
}

pub async fn run(endpoint: &str, args: SnapshotArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(args.work_dir.is_absolute(), "--work-dir must be absolute");
    std::fs::create_dir_all(&args.work_dir)?;
    let mut c = connect(endpoint).await?;
    let plan = lifecycle::plan(
        &mut c,
        LifecycleArgs {
            count: 1,
            concurrency: 1,
            volume: args.volume.clone(),
            work_dir: args.work_dir.clone(),
            pid: None,
            json: false,
            node_endpoint: None,
            attach: lifecycle::Attach::Auto,
            floor: Default::default(),
        },
    )
    .await?;
    let staging = args.work_dir.join("staging");
    let target = args.work_dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let mut s = Samples::default();
    let mut done = Done::default();
    let r = measure(&mut c, &plan, &args, &mut s, &staging, &target, &mut done).await;
    let undo = lifecycle::backward(&mut c, &plan, &mut s, &staging, &target, &mut done).await;
    let _ = std::fs::remove_dir_all(&args.work_dir);
    if let Err(e) = undo {
        eprintln!("cleaning up: {e}");
    }
    match r {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("{e}");
            Ok(1)
        }
    }
}

async fn measure(
    c: &mut crate::client::CsiClient,
    plan: &lifecycle::Plan,
    args: &SnapshotArgs,
    s: &mut Samples,
    staging: &Path,
    target: &Path,
    done: &mut Done,
) -> anyhow::Result<()> {
    lifecycle::forward(c, plan, 0, s, staging, target, done)
        .await
        .map_err(anyhow::Error::msg)?;
    let id = done.volume.clone().unwrap_or_default();
    let t = Instant::now();
    if args.volume.block {
        fill_device(target, args.data, args.volume.size as u64)?;
    } else {
        fill_dir(target, args.data, args.files)?;
    }
    let fill = secs(t);
    // The tar way first, on the same data (reading it through the
    // published path, or the block volume's backing file).
    let backing = if args.volume.block {
        Some(backing_file(target).ok_or_else(|| {
            anyhow::anyhow!("cannot find the backing file of {}", target.display())
        })?)
    } else {
        None
    };
    let archive = args.work_dir.join("snapshot.tar");
    let out = args.work_dir.join("extracted");
    std::fs::create_dir_all(&out)?;
    let (tar_c, tar_x, gz_c, cp) = if let Some(file) = backing {
        let dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = file.file_name().unwrap_or_default().to_owned();
        let tc = timed_command(
            std::process::Command::new("tar")
                .arg("--sparse")
                .arg("-cf")
                .arg(&archive)
                .arg("-C")
                .arg(&dir)
                .arg(&name),
            &args.work_dir,
        )?;
        let tx = timed_command(
            std::process::Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&out),
            &args.work_dir,
        )?;
        let copy = args.work_dir.join("copy.img");
        let cp = timed_command(
            std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(&file)
                .arg(&copy),
            &args.work_dir,
        )?;
        (tc, tx, None, Some(cp))
    } else {
        let tc = timed_command(
            std::process::Command::new("tar")
                .arg("-cf")
                .arg(&archive)
                .arg("-C")
                .arg(target)
                .arg("."),
            &args.work_dir,
        )?;
        let tx = timed_command(
            std::process::Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&out),
            &args.work_dir,
        )?;
        let gz = timed_command(
            std::process::Command::new("tar")
                .arg("-czf")
                .arg(args.work_dir.join("snapshot.tgz"))
                .arg("-C")
                .arg(target)
                .arg("."),
            &args.work_dir,
        )?;
        (tc, tx, Some(gz), None)
    };
    if !args.in_use {
        lifecycle::release(c, plan, s, staging, target, done)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let name = format!("{}-snap", plan.run);
    let t = Instant::now();
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            name,
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .ok_or_else(|| anyhow::anyhow!("CreateSnapshot returned no snapshot"))?;
    let snap_secs = secs(t);
    anyhow::ensure!(snap.ready_to_use, "the snapshot is not ready");
    let mut req = args
        .volume
        .create(format!("{}-restored", plan.run), plan.topology.as_ref());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let t = Instant::now();
    let restored = c.controller.create_volume(req).await;
    let restore_secs = secs(t);
    let restored_id = restored
        .as_ref()
        .ok()
        .and_then(|r| r.get_ref().volume.as_ref().map(|v| v.volume_id.clone()));
    // Removed whatever happens next.
    if let Some(rid) = &restored_id {
        let _ = c
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: rid.clone(),
                ..Default::default()
            })
            .await;
    }
    let _ = c
        .controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    restored?;
    println!(
        "volume of {} bytes, {} bytes of data{} written in {:.2} s",
        args.volume.size,
        args.data,
        if args.volume.block {
            String::new()
        } else {
            format!(" in {} files", args.files)
        },
        fill
    );
    println!("| step | Berth | tar |");
    println!("|---|---|---|");
    println!(
        "| snapshot | {snap_secs:.3} s | {tar_c:.3} s (tar cf + flush){} |",
        gz_c.map(|g| format!(", {g:.3} s (tar czf + flush)"))
            .unwrap_or_default()
    );
    println!("| restore | {restore_secs:.3} s | {tar_x:.3} s (tar xf + flush) |");
    if let Some(cp) = cp {
        println!("| copy of the backing file | | {cp:.3} s (cp --sparse=always + flush) |");
    }
    Ok(())
}
