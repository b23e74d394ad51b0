//! Three berth processes as nodes a, b and c (separate sockets, state and
//! local roots, each root its own tmpfs of a different size), driven the way
//! external-provisioner (distributed mode, one per node) and kubelet drive
//! them. Needs root (tmpfs and bind mounts): run by tests/run-all.sh in a
//! private mount namespace.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth::client::{connect, CsiClient};
use berth::csi::v1 as csi;
use common::*;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_berth");
const KEY: &str = "topology.local.berth.csi.io/node";

struct Node {
    name: &'static str,
    child: Child,
    sock: PathBuf,
    root: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seg(n: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(KEY.to_string(), n.to_string())]),
    }
}

fn start_node(base: &Path, name: &'static str, size_mib: u64) -> Node {
    let dir = base.join(name);
    let root = dir.join("local");
    std::fs::create_dir_all(&root).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(ok.success());
    let sock = dir.join("csi.sock");
    let child = Command::new(BIN)
        .args([
            "--driver-name",
            "local.berth.csi.io",
            "--kinds",
            "local",
            "--node-id",
            name,
        ])
        .arg("--data-dir")
        .arg(&dir)
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "node {name} did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Node {
        name,
        child,
        sock,
        root,
    }
}

async fn client(n: &Node) -> CsiClient {
    connect(&n.sock.display().to_string()).await.unwrap()
}

/// What external-provisioner sends for a PVC.
fn provision(name: &str, requisite: &[&str], preferred: &[&str]) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, 16 << 20);
    r.parameters.insert("kind".into(), "local".into());
    r.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), name.into());
    r.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), "default".into());
    if !requisite.is_empty() || !preferred.is_empty() {
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: requisite.iter().map(|n| seg(n)).collect(),
            preferred: preferred.iter().map(|n| seg(n)).collect(),
        });
    }
    r
}

fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

#[tokio::test]
#[ignore = "needs root and a private mount namespace: run tests/run-all.sh"]
async fn three_nodes_follow_the_scheduler() {
    assert!(is_root());
    let base = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(base.path().to_path_buf());
    let nodes = [
        start_node(base.path(), "a", 64),
        start_node(base.path(), "b", 128),
        start_node(base.path(), "c", 256),
    ];
    let mut cl = Vec::new();
    for n in &nodes {
        cl.push(client(n).await);
    }
    // Each node reports its own segment under the driver's topology key.
    for (n, c) in nodes.iter().zip(cl.iter_mut()) {
        let info = c
            .node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, n.name);
        assert_eq!(info.accessible_topology, Some(seg(n.name)));
    }

    // WaitForFirstConsumer: the scheduler picked b; the provisioner of node
    // b sends b first in preferred, every node in requisite.
    let wffc = provision("pvc-wffc", &["a", "b", "c"], &["b", "c", "a"]);
    let v = cl[1]
        .controller
        .create_volume(wffc.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.accessible_topology, vec![seg("b")]);
    assert!(nodes[1].root.join(&v.volume_id).is_dir());
    // The same PVC reaching another node's controller is refused and
    // creates nothing there.
    for i in [0, 2] {
        assert_eq!(
            code_of(cl[i].controller.create_volume(wffc.clone()).await),
            Code::ResourceExhausted
        );
        assert_eq!(made_in(&nodes[i].root), Vec::<std::ffi::OsString>::new());
    }

    // --strict-topology: only the selected node in both lists.
    let strict = provision("pvc-strict", &["c"], &["c"]);
    let vs = cl[2]
        .controller
        .create_volume(strict.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vs.accessible_topology, vec![seg("c")]);
    assert_eq!(
        code_of(cl[0].controller.create_volume(strict).await),
        Code::ResourceExhausted
    );

    // Immediate binding with --immediate-topology=false: no requirements;
    // the node whose provisioner claimed the PVC creates it locally.
    let imm = cl[0]
        .controller
        .create_volume(provision("pvc-immediate", &[], &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(imm.accessible_topology, vec![seg("a")]);

    // GetCapacity per segment (what --enable-capacity publishes per node):
    // this node's tmpfs free space minus promises; 0 for other segments.
    for (i, n) in nodes.iter().enumerate() {
        let free = nix::sys::statvfs::statvfs(&n.root).unwrap();
        let free = free.blocks_available() as i64 * free.fragment_size() as i64;
        // One 16 MiB volume was created on each node above.
        let promised: i64 = 16 << 20;
        for other in &nodes {
            let r = cl[i]
                .controller
                .get_capacity(csi::GetCapacityRequest {
                    volume_capabilities: vec![rwo()],
                    parameters: HashMap::from([("kind".into(), "local".into())]),
                    accessible_topology: Some(seg(other.name)),
                })
                .await
                .unwrap()
                .into_inner();
            if other.name == n.name {
                assert_eq!(r.available_capacity, free - promised, "node {}", n.name);
            } else {
                assert_eq!(
                    r.available_capacity, 0,
                    "node {} asked for {}",
                    n.name, other.name
                );
            }
        }
    }

    // ControllerPublishVolume of b's volume to node a: NOT_FOUND from b's
    // controller (node a is not known to it) and from a's (volume unknown).
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    assert_eq!(
        code_of(
            cl[1]
                .controller
                .controller_publish_volume(publish("a"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            cl[0]
                .controller
                .controller_publish_volume(publish("a"))
                .await
        ),
        Code::NotFound
    );
    cl[1]
        .controller
        .controller_publish_volume(publish("b"))
        .await
        .unwrap();

    // kubelet on b stages and publishes; kubelet on a cannot.
    let staging = base.path().join("kubelet/globalmount");
    let target = base.path().join("kubelet/pod/mount");
    std::fs::create_dir_all(&staging).unwrap();
    // kubelet creates the target's parent (the pod's volume directory).
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let stage = csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    assert_eq!(
        code_of(cl[0].node.node_stage_volume(stage.clone()).await),
        Code::NotFound
    );
    cl[1].node.node_stage_volume(stage).await.unwrap();
    cl[1]
        .node
        .node_publish_volume(publish_req(&v.volume_id, &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"on b").unwrap();
    assert_eq!(
        std::fs::read(nodes[1].root.join(&v.volume_id).join("f")).unwrap(),
        b"on b"
    );
    cl[1]
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    cl[1]
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    drop(cl);
    drop(nodes);
}
