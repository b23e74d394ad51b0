//! Measurements of block volumes, printed, never asserted on (timings
//! depend on the machine). Not part of tests/run-all.sh; run as root:
//!
//!   unshare --mount --propagation private -- \
//!     cargo test --release --test measure_block -- --ignored --nocapture
//!
//! 1. NodeStageVolume of a new 100 GiB sparse volume, ext4 and xfs (attach,
//!    blkid, mkfs, mount), three runs each. A thin volume must fit the free
//!    space of the block root when it is created, so this part uses a block
//!    root on a 1 TiB sparse ext4 filesystem made for the purpose (on a loop
//!    device over a file next to the host's block root);
//! 2. dd with direct I/O (1 GiB, 1 MiB blocks) through a filesystem volume,
//!    through a raw block volume, and on the host filesystem that holds the
//!    block root.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::os::LoopDevices;
use common::*;
use tonic::Request;

const GIB: i64 = 1 << 30;

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.insert("kind".into(), "block".into());
    m
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        drop(UnmountOnDrop(self.0.clone()));
        let l = berth::os::RealLoopDevices::default();
        for i in l.list().unwrap_or_default() {
            if i.backing_file.starts_with(&self.0) {
                let _ = l.detach(&i.device);
            }
        }
    }
}

async fn create(
    h: &Harness,
    name: &str,
    size: i64,
    kv: &[(&str, &str)],
    cap: csi::VolumeCapability,
) -> String {
    h.ctl
        .create_volume(Request::new(csi::CreateVolumeRequest {
            parameters: params(kv),
            volume_capabilities: vec![cap],
            ..create_req(name, size)
        }))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn teardown(h: &Harness, id: &str, s: &Path, t: Option<&Path>) {
    if let Some(t) = t {
        h.node
            .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: t.display().to_string(),
            }))
            .await
            .unwrap();
    }
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: s.display().to_string(),
        }))
        .await
        .unwrap();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
}

/// Runs dd and returns its summary line ("... copied, 1.2 s, 890 MB/s").
fn dd(args: &[&str]) -> String {
    let o = std::process::Command::new("dd")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "dd {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn dd_pair(label: &str, path: &Path, raw: bool) {
    let p = format!("of={}", path.display());
    let mut w = vec!["if=/dev/zero", &p, "bs=1M", "count=1024", "oflag=direct"];
    if !raw {
        w.push("conv=fsync");
    }
    let write = dd(&w);
    let i = format!("if={}", path.display());
    let read = dd(&[&i, "of=/dev/null", "bs=1M", "count=1024", "iflag=direct"]);
    println!("dd {label}: write {write}");
    println!("dd {label}: read  {read}");
}

#[tokio::test]
#[ignore = "measurement: needs root; run by hand (see the file's header)"]
async fn measure() {
    assert!(is_root());
    let dir = tempfile::tempdir().unwrap();
    let _c = Cleanup(dir.path().to_path_buf());
    // The big pool for the 100 GiB volumes.
    let pool_img = dir.path().join("pool.img");
    std::fs::File::create(&pool_img)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let pool_dev = berth::os::RealLoopDevices::default()
        .attach(
            &pool_img,
            berth::os::AttachOptions {
                read_only: false,
                direct_io: true,
            },
        )
        .unwrap()
        .device;
    let st = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(&pool_dev)
        .status()
        .unwrap();
    assert!(st.success());
    let pool_root = dir.path().join("bigpool");
    std::fs::create_dir(&pool_root).unwrap();
    nix::mount::mount(
        Some(&pool_dev),
        &pool_root,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let root_arg = pool_root.join("block").display().to_string();
    let h = build(
        dir,
        berth::os::Os::real(),
        None,
        &["--kinds", "block", "--block-root", &root_arg],
    );
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    println!(
        "100 GiB volumes: block root on a 1 TiB sparse ext4 on {}",
        pool_dev.display()
    );

    for fs in ["ext4", "xfs"] {
        let mut times = Vec::new();
        for run in 0..3 {
            let id = create(
                &h,
                &format!("{fs}{run}"),
                100 * GIB,
                &[("fsType", fs)],
                rwo(),
            )
            .await;
            let s = h.path(&format!("stage-{fs}{run}"));
            let t0 = Instant::now();
            h.node
                .node_stage_volume(Request::new(stage_req(&id, &s)))
                .await
                .unwrap();
            times.push(t0.elapsed());
            let used =
                std::fs::metadata(pool_root.join("block").join(format!("{id}.img"))).map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                });
            println!(
                "NodeStageVolume, new 100 GiB sparse volume, {fs}: {:.3} s (backing file allocates {} MiB after mkfs)",
                times[run].as_secs_f64(),
                used.unwrap_or(0) >> 20
            );
            teardown(&h, &id, &s, None).await;
        }
        times.sort();
        println!(
            "NodeStageVolume {fs}: median {:.3} s",
            times[1].as_secs_f64()
        );
    }

    // Throughput, with the block root on the host filesystem: a 4 GiB ext4
    // volume, a 2 GiB raw volume, and the host filesystem itself.
    let dir = h.stop();
    nix::mount::umount(&pool_root).unwrap();
    berth::os::RealLoopDevices::default()
        .detach(&pool_dev)
        .unwrap();
    std::fs::remove_file(&pool_img).unwrap();
    let h = build(dir, berth::os::Os::real(), None, &["--kinds", "block"]);
    let host = std::process::Command::new("findmnt")
        .args(["-no", "SOURCE,FSTYPE", "-T"])
        .arg(h.path("block"))
        .output()
        .unwrap();
    println!(
        "throughput: block root {} on {}",
        h.path("block").display(),
        String::from_utf8_lossy(&host.stdout).trim()
    );
    let id = create(&h, "dd", 4 * GIB, &[], rwo()).await;
    let (s, t) = (h.path("dd-stage"), h.path("dd-pod"));
    stage_and_publish(&h, &id, &s, &t).await;
    let dev = berth::os::RealLoopDevices::default()
        .list()
        .unwrap()
        .into_iter()
        .find(|l| l.backing_file.starts_with(h.dir.path()))
        .unwrap();
    println!(
        "loop device {} direct_io={}",
        dev.device.display(),
        dev.direct_io
    );
    dd_pair("through an ext4 block volume", &t.join("dd.bin"), false);
    teardown(&h, &id, &s, Some(&t)).await;

    let raw = block_cap(Mode::SingleNodeWriter);
    let id = create(&h, "ddraw", 2 * GIB, &[], raw.clone()).await;
    let (s, t) = (h.path("raw-stage"), h.path("raw-dev"));
    std::fs::create_dir(&s).unwrap();
    h.node
        .node_stage_volume(Request::new(csi::NodeStageVolumeRequest {
            volume_capability: Some(raw.clone()),
            ..stage_req(&id, &s)
        }))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(raw),
            ..publish_req(&id, &s, &t, false)
        }))
        .await
        .unwrap();
    dd_pair("through a raw block volume", &t, true);
    teardown(&h, &id, &s, Some(&t)).await;

    let f = h.path("host-dd.bin");
    dd_pair("on the host filesystem (block root)", &f, false);
    std::fs::remove_file(&f).unwrap();
    std::thread::sleep(Duration::from_millis(10));
}
