//! Handler logic of every RPC against the recording fake OS: idempotency,
//! error codes, and what reaches the OS. No root needed.
mod common;

use std::collections::HashMap;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::identity_server::Identity;
use berth::csi::v1::node_server::Node;
use berth::csi::v1::volume_capability::access_mode::Mode;
use berth::driver::{name_key, vol_key};
use berth::os::fake::Call;
use berth::os::FsUsage;
use common::*;
use tonic::{Code, Request};

async fn create(h: &Harness, name: &str, size: i64) -> csi::Volume {
    h.ctl
        .create_volume(Request::new(create_req(name, size)))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
}

/// Creates, stages and returns (id, staging path).
async fn staged(h: &Harness, name: &str) -> (String, std::path::PathBuf) {
    let id = create(h, name, 1 << 20).await.volume_id;
    let staging = h.path(&format!("stage-{name}"));
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .expect("stage");
    (id, staging)
}

// ---------------------------------------------------------------- Identity

#[tokio::test]
async fn identity_info_capabilities_probe() {
    let h = fake(&[]);
    let info = h
        .ident
        .get_plugin_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "berth.csi.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = h
        .ident
        .get_plugin_capabilities(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    let types: Vec<_> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    use csi::plugin_capability::service::Type;
    assert!(types.contains(&(Type::ControllerService as i32)));
    assert!(types.contains(&(Type::VolumeAccessibilityConstraints as i32)));
    let p = h
        .ident
        .probe(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.ready, Some(true));
}

#[tokio::test]
async fn probe_fails_when_not_ready() {
    let h = fake(&[]);
    std::fs::remove_dir_all(h.path("local")).unwrap();
    // statvfs of the missing root fails in the fake too.
    h.fake().fail_next("statvfs", libc::ENOENT);
    let r = h.ident.probe(Request::new(Default::default())).await;
    assert_eq!(code(r), Code::FailedPrecondition);
}

/// Probes at the same moment (the livenessprobe sidecar's and kubelet's
/// /healthz, or many at once) never fail each other: each check writes and
/// removes a file of its own. With one shared file, one check removed the
/// other's and answered FAILED_PRECONDITION ("... is not writable: unlink
/// ...: No such file or directory"). No check leaves a file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_probes_never_fail_each_other() {
    let h = fake(&[]);
    for round in 0..20 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let ident = berth::identity::IdentityService {
                driver: h.driver.clone(),
            };
            calls.spawn(async move { ident.probe(Request::new(Default::default())).await });
        }
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Ok(p) => assert_eq!(p.into_inner().ready, Some(true)),
                Err(e) => panic!("round {round}: a concurrent Probe failed: {e:?}"),
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(h.path("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".probe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn node_mode_does_not_advertise_controller() {
    let h = fake(&["--mode", "node"]);
    let caps = h
        .ident
        .get_plugin_capabilities(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    use csi::plugin_capability::service::Type;
    assert!(!caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(csi::plugin_capability::Type::Service(s)) if s.r#type == Type::ControllerService as i32)));
}

// ------------------------------------------------------------ CreateVolume

#[tokio::test]
async fn create_is_idempotent_by_name() {
    let h = fake(&[]);
    let a = create(&h, "pvc-1", 5 << 20).await;
    let b = create(&h, "pvc-1", 5 << 20).await;
    assert_eq!(a.volume_id, b.volume_id);
    assert_eq!(a.capacity_bytes, 5 << 20);
    assert_eq!(a.accessible_topology, vec![topo(NODE)]);
    assert!(h.path("local").join(&a.volume_id).is_dir());
    assert_eq!(h.driver.store.len(), 1);
}

#[tokio::test]
async fn create_same_name_different_request_is_already_exists() {
    let h = fake(&[]);
    create(&h, "pvc-1", 5 << 20).await;
    let r = h
        .ctl
        .create_volume(Request::new(create_req("pvc-1", 6 << 20)))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let mut req = create_req("pvc-1", 5 << 20);
    req.volume_capabilities = vec![mount_cap(Mode::SingleNodeSingleWriter)];
    assert_eq!(
        code(h.ctl.create_volume(Request::new(req)).await),
        Code::AlreadyExists
    );
    let mut req = create_req("pvc-1", 5 << 20);
    req.parameters.insert("kind".into(), "local".into());
    assert_eq!(
        code(h.ctl.create_volume(Request::new(req)).await),
        Code::AlreadyExists
    );
    assert_eq!(h.driver.store.len(), 1);
}

#[tokio::test]
async fn create_validates_input_and_changes_nothing() {
    let h = fake(&[]);
    let cases: Vec<(csi::CreateVolumeRequest, Code)> = vec![
        (create_req("", 1), Code::InvalidArgument),
        (create_req(&"n".repeat(129), 1), Code::InvalidArgument),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![],
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![mount_cap_flags(Mode::SingleNodeWriter, &["sync,exec"])],
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 10,
                    limit_bytes: 5,
                }),
                ..create_req("x", 1)
            },
            Code::OutOfRange,
        ),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                }),
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                volume_content_source: Some(Default::default()),
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                mutable_parameters: HashMap::from([("a".into(), "b".into())]),
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
        (
            csi::CreateVolumeRequest {
                parameters: HashMap::from([("kind".into(), "tape".into())]),
                ..create_req("x", 1)
            },
            Code::InvalidArgument,
        ),
    ];
    for (req, want) in cases {
        let name = req.name.chars().take(20).collect::<String>();
        let got = code(h.ctl.create_volume(Request::new(req)).await);
        assert_eq!(got, want, "request {name:?}");
    }
    assert!(h.driver.store.is_empty());
    assert_eq!(made_in(&h.path("local")), Vec::<std::ffi::OsString>::new());
}

/// A capability whose fs_type, volume_mount_group or a mount flag holds a
/// control character is INVALID_ARGUMENT in CreateVolume, NodeStageVolume
/// and NodePublishVolume, naming the character (never a flag's value), and
/// nothing is recorded or reaches the OS. Before, only NUL in a mount flag
/// was refused: a local volume took fs_type "ext4\n..." (written raw into
/// the debug log, a line of its own), a flag "ro\n" (a read-only publish)
/// and any volume_mount_group, and kept them in its record.
#[tokio::test]
async fn control_characters_in_a_capability_are_invalid_and_change_nothing() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let bad = |fs: &str, flags: &[&str], group: &str| {
        let mut c = mount_cap_flags(Mode::SingleNodeWriter, flags);
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.fs_type = fs.into();
            m.volume_mount_group = group.into();
        }
        c
    };
    let caps = [
        bad("ext4\nFORGED", &[], ""),
        bad("ext4\t", &[], ""),
        bad("", &["ro\n"], ""),
        bad("", &["noatime", "nodev\r"], ""),
        bad("", &["secret=x\u{1b}"], ""),
        bad("", &[], "1000\n"),
        bad("", &[], "g\u{85}"),
    ];
    h.fake().clear_calls();
    for (i, cap) in caps.iter().enumerate() {
        let e = h
            .ctl
            .create_volume(Request::new(csi::CreateVolumeRequest {
                volume_capabilities: vec![cap.clone()],
                ..create_req(&format!("c{i}"), 1 << 20)
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cap:?}: {e:?}");
        assert!(e.message().contains("control character U+"), "{e:?}");
        assert!(!e.message().contains("secret"), "{e:?}");
        let mut req = stage_req(&id, &staging);
        req.volume_capability = Some(cap.clone());
        let e = h
            .node
            .node_stage_volume(Request::new(req))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cap:?}: {e:?}");
        let mut req = publish_req(&id, &staging, &h.path("target"), false);
        req.volume_capability = Some(cap.clone());
        let e = h
            .node
            .node_publish_volume(Request::new(req))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cap:?}: {e:?}");
    }
    assert_eq!(h.driver.store.len(), 1);
    assert_eq!(h.fake().calls(), vec![], "nothing reaches the OS");
    assert!(!h.path("target").exists());
}

/// A target or staging path holding a control character (LF, CR, tab,
/// ESC, DEL, U+0085) is INVALID_ARGUMENT for every node RPC that takes
/// one, naming the character, and nothing reaches the OS: a kubelet never
/// sends one, and the kernel shows such a mount point escaped in
/// mountinfo. NodeGetVolumeStats' and NodeExpandVolume's volume_path is
/// NOT_FOUND, as for any path that cannot hold the volume. Before, only
/// NUL was refused: NodeStageVolume and NodePublishVolume mounted at
/// "<dir>\n..." and answered OK.
#[tokio::test]
async fn control_characters_in_a_node_path_are_invalid_and_touch_nothing() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .expect("publish");
    let other = create(&h, "b", 1 << 20).await.volume_id;
    let mounts = h.fake().table();
    h.fake().clear_calls();
    for c in ['\n', '\r', '\t', '\u{1b}', '\u{7f}', '\u{85}'] {
        let bad = |p: &std::path::Path| format!("{}{c}x", p.display());
        let named = format!("control character U+{:04X}", u32::from(c));
        let invalid = |what: &str, r: Result<(), tonic::Status>| {
            let e = r.expect_err(what);
            assert_eq!(e.code(), Code::InvalidArgument, "{what} {c:?}: {e:?}");
            assert!(e.message().contains(&named), "{what}: {e:?}");
        };
        let mut r = stage_req(&other, &h.path("s2"));
        r.staging_target_path = bad(&h.path("s2"));
        invalid(
            "stage",
            h.node.node_stage_volume(Request::new(r)).await.map(|_| ()),
        );
        let mut r = publish_req(&id, &staging, &target, false);
        r.target_path = bad(&h.path("t2"));
        invalid(
            "publish target",
            h.node
                .node_publish_volume(Request::new(r))
                .await
                .map(|_| ()),
        );
        let mut r = publish_req(&id, &staging, &h.path("t2"), false);
        r.staging_target_path = bad(&staging);
        invalid(
            "publish staging",
            h.node
                .node_publish_volume(Request::new(r))
                .await
                .map(|_| ()),
        );
        invalid(
            "unpublish",
            h.node
                .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: bad(&target),
                }))
                .await
                .map(|_| ()),
        );
        invalid(
            "unstage",
            h.node
                .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: bad(&staging),
                }))
                .await
                .map(|_| ()),
        );
        invalid(
            "stats staging",
            h.node
                .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: bad(&staging),
                }))
                .await
                .map(|_| ()),
        );
        let e = h
            .node
            .node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: bad(&target),
                staging_target_path: String::new(),
            }))
            .await
            .expect_err("stats volume_path");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        invalid(
            "expand staging",
            h.node
                .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: bad(&staging),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 2 << 20,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }))
                .await
                .map(|_| ()),
        );
    }
    assert_eq!(h.fake().calls(), vec![], "nothing reaches the OS");
    assert_eq!(h.fake().table(), mounts, "no mount made or taken down");
    assert!(h.path("s2").parent().unwrap().read_dir().unwrap().all(|e| {
        let n = e.unwrap().file_name();
        !n.to_string_lossy().chars().any(char::is_control)
    }));
    // The volume is still staged and published at its own paths.
    unpublish_as_kubelet(&h, &id, &target)
        .await
        .expect("unpublish");
    unstage_as_kubelet(&h, &id, &staging)
        .await
        .expect("unstage");
}

#[tokio::test]
async fn create_names_an_unknown_parameter() {
    let h = fake(&[]);
    let mut req = create_req("x", 1);
    req.parameters
        .insert("fsyncEverything".into(), "yes".into());
    // Keys the external-provisioner adds are accepted.
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    let e = h.ctl.create_volume(Request::new(req)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("fsyncEverything"), "{}", e.message());
    let mut req = create_req("y", 1);
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    assert_eq!(code(h.ctl.create_volume(Request::new(req)).await), Code::Ok);
}

#[tokio::test]
async fn create_accepts_128_byte_name() {
    let h = fake(&[]);
    let v = create(&h, &"n".repeat(128), 1).await;
    assert!(!v.volume_id.is_empty());
}

#[tokio::test]
async fn create_checks_space() {
    let h = fake(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 100 << 20,
            available_bytes: 10 << 20,
            ..Default::default()
        },
    );
    create(&h, "a", 6 << 20).await;
    // 10 MiB free, 6 promised: 5 more do not fit.
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 5 << 20)))
        .await;
    assert_eq!(code(r), Code::ResourceExhausted);
    // Larger than the whole filesystem: out of range.
    let r = h
        .ctl
        .create_volume(Request::new(create_req("c", 200 << 20)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    create(&h, "d", 4 << 20).await;
}

/// A name that exists, asked for again with a topology the volume does not
/// satisfy (its node is not among the requisite ones), is ALREADY_EXISTS,
/// not RESOURCE_EXHAUSTED; the same topology, or none, is a repeat that
/// returns the volume. A new name for another node is still
/// RESOURCE_EXHAUSTED.
#[tokio::test]
async fn create_existing_name_with_other_topology_is_already_exists() {
    let h = fake(&["--kinds", "local,block"]);
    let with = |name: &str, kind: &str, requisite: &[&str], preferred: &[&str]| {
        let mut req = create_req(name, 8 << 20);
        req.parameters.insert("kind".into(), kind.into());
        if !requisite.is_empty() || !preferred.is_empty() {
            req.accessibility_requirements = Some(csi::TopologyRequirement {
                requisite: requisite.iter().copied().map(topo).collect(),
                preferred: preferred.iter().copied().map(topo).collect(),
            });
        }
        req
    };
    for kind in ["local", "block"] {
        let name = format!("v-{kind}");
        let id = created_id(
            h.ctl
                .create_volume(Request::new(with(&name, kind, &[NODE], &[NODE])))
                .await,
        );
        // Repeats: the same topology, none, or a requisite this node is in.
        for (requisite, preferred) in [
            (&[NODE][..], &[NODE][..]),
            (&[][..], &[][..]),
            (&["node-b", NODE][..], &[NODE, "node-b"][..]),
        ] {
            let r = h
                .ctl
                .create_volume(Request::new(with(&name, kind, requisite, preferred)))
                .await;
            assert_eq!(created_id(r), id, "{kind} {requisite:?} {preferred:?}");
        }
        // Another node: the volume exists, incompatible.
        for (requisite, preferred) in [
            (&["node-b"][..], &["node-b"][..]),
            (&["node-b"][..], &[][..]),
        ] {
            let r = h
                .ctl
                .create_volume(Request::new(with(&name, kind, requisite, preferred)))
                .await;
            let e = r.expect_err("another node");
            assert_eq!(e.code(), Code::AlreadyExists, "{kind}: {}", e.message());
            assert!(e.message().contains("topolog"), "{}", e.message());
        }
        // A new name for another node: placed elsewhere, as before.
        let r = h
            .ctl
            .create_volume(Request::new(with(
                &format!("new-{kind}"),
                kind,
                &["node-b"],
                &["node-b"],
            )))
            .await;
        assert_eq!(code(r), Code::ResourceExhausted);
    }
    assert_eq!(h.driver.store.len(), 2);
}

#[tokio::test]
async fn create_follows_topology() {
    let h = fake(&[]);
    let with = |name: &str, requisite: Vec<&str>, preferred: Vec<&str>| {
        let mut req = create_req(name, 1);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: requisite.into_iter().map(topo).collect(),
            preferred: preferred.into_iter().map(topo).collect(),
        });
        req
    };
    // WaitForFirstConsumer, this node selected.
    let r = h
        .ctl
        .create_volume(Request::new(with(
            "a",
            vec!["node-b", NODE],
            vec![NODE, "node-b"],
        )))
        .await;
    assert_eq!(
        r.unwrap().into_inner().volume.unwrap().accessible_topology,
        vec![topo(NODE)]
    );
    // Another node selected.
    let r = h
        .ctl
        .create_volume(Request::new(with(
            "b",
            vec![NODE, "node-b"],
            vec!["node-b", NODE],
        )))
        .await;
    assert_eq!(code(r), Code::ResourceExhausted);
    // Not in requisite.
    let r = h
        .ctl
        .create_volume(Request::new(with("c", vec!["node-b"], vec![])))
        .await;
    assert_eq!(code(r), Code::ResourceExhausted);
    assert_eq!(h.driver.store.len(), 1);
}

/// A preferred list that puts this node first while the requisite ones
/// leave it out (the spec: preferred topologies must also be requisite;
/// a CO's mistake) creates nothing here: a volume on this node would be
/// accessible from none of the requisite topologies and would strand its
/// pod. RESOURCE_EXHAUSTED, as for any request placed elsewhere, for both
/// node-local kinds; with this node among the requisite ones as well, the
/// volume is made here.
#[tokio::test]
async fn a_preferred_node_left_out_of_the_requisite_ones_gets_no_volume() {
    let h = fake(&["--kinds", "local,block"]);
    let with = |name: &str, kind: &str, requisite: &[&str], preferred: &[&str]| {
        let mut req = create_req(name, 8 << 20);
        req.parameters.insert("kind".into(), kind.into());
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: requisite.iter().copied().map(topo).collect(),
            preferred: preferred.iter().copied().map(topo).collect(),
        });
        req
    };
    for kind in ["local", "block"] {
        for (requisite, preferred) in [
            (&["node-b"][..], &[NODE][..]),
            (&["node-b", "node-c"][..], &[NODE, "node-b"][..]),
        ] {
            let r = h
                .ctl
                .create_volume(Request::new(with(
                    &format!("out-{kind}"),
                    kind,
                    requisite,
                    preferred,
                )))
                .await;
            assert_eq!(code(r), Code::ResourceExhausted, "{kind} {requisite:?}");
        }
        // A requisite segment of another key only, or an empty one, does
        // not name this node either.
        let mut req = with(&format!("other-key-{kind}"), kind, &[], &[NODE]);
        let reqs = req.accessibility_requirements.as_mut().unwrap();
        reqs.requisite = vec![
            csi::Topology {
                segments: [("zone".to_string(), NODE.to_string())].into(),
            },
            csi::Topology::default(),
        ];
        let r = h.ctl.create_volume(Request::new(req)).await;
        assert_eq!(code(r), Code::ResourceExhausted, "{kind} other key");
        assert_eq!(h.driver.store.len(), 0, "{kind}");
    }
    let r = h
        .ctl
        .create_volume(Request::new(with(
            "in",
            "local",
            &["node-b", NODE],
            &[NODE],
        )))
        .await;
    assert_eq!(
        r.unwrap().into_inner().volume.unwrap().accessible_topology,
        vec![topo(NODE)]
    );
    assert_eq!(h.driver.store.len(), 1);
}

#[tokio::test]
async fn concurrent_operation_on_same_name_or_volume_is_aborted() {
    let h = fake(&[]);
    let g = h.driver.locks.try_lock(name_key("busy")).unwrap();
    let r = h
        .ctl
        .create_volume(Request::new(create_req("busy", 1)))
        .await;
    assert_eq!(code(r), Code::Aborted);
    drop(g);
    let id = create(&h, "busy", 1).await.volume_id;
    let g = h.driver.locks.try_lock(vol_key(&id)).unwrap();
    let r = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), Code::Aborted);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &h.path("s"))))
        .await;
    assert_eq!(code(r), Code::Aborted);
    drop(g);
}

/// Two volumes staged (or published) at one path by calls at the same
/// moment: one of them mounts there, the other is ABORTED or
/// ALREADY_EXISTS, as when they come one after the other. Before, each
/// call held only its own volume's guard: both looked at the empty path
/// before either mounted, both answered OK, and two volumes were mounted
/// on top of each other there (about one round in two).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_volumes_at_one_path_at_once_never_both_mount() {
    let h = fake(&[]);
    let node = || berth::node::NodeService {
        driver: h.driver.clone(),
    };
    let mounts_at = |p: &std::path::Path| {
        h.fake()
            .table()
            .iter()
            .filter(|e| e.mount_point == p)
            .count()
    };
    for round in 0..50 {
        let a = create(&h, &format!("a{round}"), 1 << 20).await.volume_id;
        let b = create(&h, &format!("b{round}"), 1 << 20).await.volume_id;
        // NodeStageVolume of both at one staging path.
        let s = h.path(&format!("s{round}"));
        let (n1, n2) = (node(), node());
        let (r1, r2) = tokio::join!(
            tokio::spawn({
                let req = stage_req(&a, &s);
                async move { n1.node_stage_volume(Request::new(req)).await }
            }),
            tokio::spawn({
                let req = stage_req(&b, &s);
                async move { n2.node_stage_volume(Request::new(req)).await }
            }),
        );
        let codes = [code(r1.unwrap()), code(r2.unwrap())];
        assert!(
            codes.contains(&Code::Ok)
                && codes
                    .iter()
                    .any(|c| matches!(c, Code::Aborted | Code::AlreadyExists)),
            "round {round}: stage answered {codes:?}"
        );
        assert_eq!(mounts_at(&s), 1, "round {round}");
        // NodePublishVolume of two others (staged apart) at one target.
        let (a, sa) = staged(&h, &format!("c{round}")).await;
        let (b, sb) = staged(&h, &format!("d{round}")).await;
        let t = h.path(&format!("t{round}"));
        let (n1, n2) = (node(), node());
        let (r1, r2) = tokio::join!(
            tokio::spawn({
                let req = publish_req(&a, &sa, &t, false);
                async move { n1.node_publish_volume(Request::new(req)).await }
            }),
            tokio::spawn({
                let req = publish_req(&b, &sb, &t, false);
                async move { n2.node_publish_volume(Request::new(req)).await }
            }),
        );
        let codes = [code(r1.unwrap()), code(r2.unwrap())];
        assert!(
            codes.contains(&Code::Ok)
                && codes
                    .iter()
                    .any(|c| matches!(c, Code::Aborted | Code::AlreadyExists)),
            "round {round}: publish answered {codes:?}"
        );
        assert_eq!(mounts_at(&t), 1, "round {round}");
    }
}

/// The same as `two_volumes_at_one_path_at_once_never_both_mount`, with the
/// second call naming the path through a symlinked parent: the path
/// guards key on the place the kernel mounts at, not on the spelling.
#[tokio::test]
async fn two_volumes_at_one_path_spelled_two_ways_never_both_mount() {
    let h = fake(&[]);
    let node = || berth::node::NodeService {
        driver: h.driver.clone(),
    };
    let real = h.path("real");
    std::fs::create_dir_all(&real).unwrap();
    let link = h.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let real = real.canonicalize().unwrap();
    let mounts_at = |p: &std::path::Path| {
        h.fake()
            .table()
            .iter()
            .filter(|e| e.mount_point == p)
            .count()
    };
    for round in 0..50 {
        let a = create(&h, &format!("a{round}"), 1 << 20).await.volume_id;
        let b = create(&h, &format!("b{round}"), 1 << 20).await.volume_id;
        let name = format!("s{round}");
        let (n1, n2) = (node(), node());
        let (r1, r2) = tokio::join!(
            tokio::spawn({
                let req = stage_req(&a, &real.join(&name));
                async move { n1.node_stage_volume(Request::new(req)).await }
            }),
            tokio::spawn({
                let req = stage_req(&b, &link.join(&name));
                async move { n2.node_stage_volume(Request::new(req)).await }
            }),
        );
        let codes = [code(r1.unwrap()), code(r2.unwrap())];
        assert!(
            codes.contains(&Code::Ok)
                && codes
                    .iter()
                    .any(|c| matches!(c, Code::Aborted | Code::AlreadyExists)),
            "round {round}: stage answered {codes:?}"
        );
        assert_eq!(mounts_at(&real.join(&name)), 1, "round {round}");
        let (a, sa) = staged(&h, &format!("c{round}")).await;
        let (b, sb) = staged(&h, &format!("d{round}")).await;
        let name = format!("t{round}");
        let (n1, n2) = (node(), node());
        let (r1, r2) = tokio::join!(
            tokio::spawn({
                let req = publish_req(&a, &sa, &real.join(&name), false);
                async move { n1.node_publish_volume(Request::new(req)).await }
            }),
            tokio::spawn({
                let req = publish_req(&b, &sb, &link.join(&name), false);
                async move { n2.node_publish_volume(Request::new(req)).await }
            }),
        );
        let codes = [code(r1.unwrap()), code(r2.unwrap())];
        assert!(
            codes.contains(&Code::Ok)
                && codes
                    .iter()
                    .any(|c| matches!(c, Code::Aborted | Code::AlreadyExists)),
            "round {round}: publish answered {codes:?}"
        );
        assert_eq!(mounts_at(&real.join(&name)), 1, "round {round}");
    }
}

/// A target that is the staging path (or inside it) through a symlinked
/// parent is refused as the same spellings are: INVALID_ARGUMENT, never a
/// mount of the volume into itself, and never an ABORTED the CO would retry
/// forever.
#[tokio::test]
async fn a_target_that_is_the_staging_path_through_a_symlink_is_invalid() {
    let h = fake(&[]);
    let real = h.path("real");
    std::fs::create_dir_all(&real).unwrap();
    let link = h.path("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let real = real.canonicalize().unwrap();
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let staging_real = real.join("s");
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging_real)))
        .await
        .expect("stage");
    for target in [link.join("s"), link.join("s").join("t")] {
        let before = h.fake().table().len();
        let r = h
            .node
            .node_publish_volume(Request::new(publish_req(
                &id,
                &staging_real,
                &target,
                false,
            )))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{}", target.display());
        assert_eq!(h.fake().table().len(), before, "{}", target.display());
    }
}

// ------------------------------------------------------------ DeleteVolume

#[tokio::test]
async fn delete_is_idempotent_and_removes_the_directory() {
    let h = fake(&[]);
    let id = create(&h, "a", 1).await.volume_id;
    std::fs::write(h.path("local").join(&id).join("data"), b"x").unwrap();
    for _ in 0..2 {
        let r = h
            .ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r), Code::Ok);
    }
    assert!(!h.path("local").join(&id).exists());
    assert!(h.driver.store.is_empty());
    // Name can be used again and gets a new id.
    let id2 = create(&h, "a", 1).await.volume_id;
    assert_ne!(id, id2);
}

#[tokio::test]
async fn delete_of_hostile_or_unknown_ids_touches_nothing() {
    let h = fake(&[]);
    let canary = h.path("canary");
    std::fs::write(&canary, b"keep").unwrap();
    for id in [
        "local-00000000000000000000000000000000",
        "../canary",
        "..",
        "/etc",
        "local-../../canary",
    ] {
        let r = h
            .ctl
            .delete_volume(Request::new(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r), Code::Ok, "{id}");
    }
    let r = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest::default()))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
}

#[tokio::test]
async fn delete_never_follows_a_symlink_out_of_the_root() {
    let h = fake(&[]);
    let id = create(&h, "a", 1).await.volume_id;
    let outside = h.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"keep").unwrap();
    let dir = h.path("local").join(&id);
    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&outside, &dir).unwrap();
    let r = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), Code::Ok);
    assert!(!dir.exists() && std::fs::symlink_metadata(&dir).is_err());
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
    // A symlink inside the volume is removed, not followed.
    let id = create(&h, "b", 1).await.volume_id;
    std::os::unix::fs::symlink(&outside, h.path("local").join(&id).join("link")).unwrap();
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
}

/// A volume's directory replaced by a symlink while berth runs (an
/// operator, or someone with host access on the node) is never followed:
/// NodeStageVolume, CreateSnapshot and a clone of it refuse
/// (FAILED_PRECONDITION, "missing"), a staged one publishes its staging
/// mount only, and DeleteVolume removes the symlink itself (guard, with
/// `delete_never_follows_a_symlink_out_of_the_root`). Nothing of what the
/// symlink leads to is bound, copied or removed.
#[tokio::test]
async fn a_volume_replaced_by_a_symlink_is_never_staged_copied_or_published_through_it() {
    let h = fake(&[]);
    let outside = h.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"keep").unwrap();
    let (staged_id, staging) = staged(&h, "staged").await;
    let id = create(&h, "a", 1).await.volume_id;
    let before = h.fake().calls().len();
    for v in [&id, &staged_id] {
        let dir = h.path("local").join(v);
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&outside, &dir).unwrap();
    }
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &h.path("stage-a"))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = h
        .ctl
        .create_snapshot(Request::new(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let clone = csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: id.clone(),
                },
            )),
        }),
        ..create_req("c", 1 << 20)
    };
    let e = h.ctl.create_volume(Request::new(clone)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The staged one: its pods get what is mounted at its staging path.
    let target = h.path("pod");
    let published = h
        .node
        .node_publish_volume(Request::new(publish_req(
            &staged_id, &staging, &target, false,
        )))
        .await;
    published.expect("publish of the staged volume");
    assert!(
        h.fake().calls()[before..].iter().any(
            |c| matches!(c, Call::Bind { source, target: t, .. } if *source == staging && *t == target)
        ),
        "the staging mount was not what got published"
    );
    for c in &h.fake().calls()[before..] {
        if let Call::Bind { source, .. } = c {
            assert!(
                !source.starts_with(&outside)
                    && !source.starts_with(h.path("local").join(&id))
                    && !source.starts_with(h.path("local").join(&staged_id)),
                "bound {} after the volumes were replaced by symlinks",
                source.display()
            );
        }
    }
    let copies = |area: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(h.path("local").join(area))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(copies(".snapshots"), Vec::<std::path::PathBuf>::new());
    assert!(copies(".creating")
        .iter()
        .all(|p| !p.join("precious").exists()));
    delete(&h, &id).await;
    assert!(std::fs::symlink_metadata(h.path("local").join(&id)).is_err());
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep");
}

#[tokio::test]
async fn delete_refuses_a_volume_in_use() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let del = || csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(h.ctl.delete_volume(Request::new(del())).await),
        Code::FailedPrecondition
    );
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: NODE.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    h.ctl
        .controller_publish_volume(Request::new(publish))
        .await
        .unwrap();
    assert_eq!(
        code(h.ctl.delete_volume(Request::new(del())).await),
        Code::FailedPrecondition
    );
    assert!(h.path("local").join(&id).is_dir());
}

/// A volume recorded by a berth with another node id (`--node-id`
/// changed over existing state) still lives in this node's root, and its
/// pods' mounts outlive the restart: its DeleteVolume refuses while it is
/// staged or published here, as any volume's does, and goes through once
/// they are torn down by its id. Before, the in-use check ran only for
/// volumes of this node id: the directory a pod was using went to the
/// trash and was emptied.
#[tokio::test]
async fn a_volume_of_a_former_node_id_in_use_is_never_deleted() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .expect("publish");
    let data = h.path("local").join(&id).join("data");
    std::fs::write(&data, b"tenant").unwrap();
    // The same node, its mounts, a new node id.
    let (os, f) = (h.driver.os.clone(), h.fake.clone());
    let h = build(h.stop(), os, f, &["--node-id", "node-b"]);
    let e = try_delete(&h, &id).await.expect_err("deleted while in use");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("mounted"), "{e:?}");
    assert_eq!(std::fs::read(&data).unwrap(), b"tenant");
    assert!(h.driver.store.get(&id).is_some());
    // Torn down by its id, it is deleted.
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &target)))
        .await
        .expect("unpublish");
    let e = try_delete(&h, &id).await.expect_err("deleted while staged");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(data.exists());
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .expect("unstage");
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!h.path("local").join(&id).exists());
}

/// The state records the CSI driver name it is served under: a berth
/// started on it under another `--driver-name` (a Helm value changed at an
/// upgrade) refuses to start while it holds volumes, naming both names,
/// and changes nothing; the old name starts and serves the volume. A state
/// without records takes a new name. `state check` run with the other name
/// warns of it (the state is sound; the operator may have left the flag
/// out). Before, the volumes were served under the new
/// name, which their PVs do not name: kubelet and the sidecars found no
/// driver for them.
#[tokio::test]
async fn a_changed_driver_name_is_refused_while_the_state_holds_volumes() {
    let h = fake(&["--driver-name", "first.berth.csi.io"]);
    // No volume yet: another name is taken.
    let (os, f) = (h.driver.os.clone(), h.fake.clone());
    let h = build(h.stop(), os, f, &["--driver-name", "local.berth.csi.io"]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let data = h.path("local").join(&id).join("data");
    std::fs::write(&data, b"tenant").unwrap();
    let (os, f) = (h.driver.os.clone(), h.fake.clone());
    let (dir, err) = match try_build(
        h.stop(),
        os.clone(),
        f.clone(),
        &["--driver-name", "other.berth.csi.io"],
    ) {
        Ok(_) => panic!("berth started under another driver name over its volumes"),
        Err(e) => e,
    };
    assert!(
        err.contains("served as CSI driver local.berth.csi.io")
            && err.contains("--driver-name other.berth.csi.io")
            && err.contains("run it with --driver-name local.berth.csi.io"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/driver-name")).unwrap(),
        "local.berth.csi.io\n"
    );
    // `state check` with the other name says so.
    let cli = <berth::config::Cli as clap::Parser>::try_parse_from(args(
        dir.path(),
        &["--driver-name", "other.berth.csi.io"],
    ))
    .unwrap();
    let mut out = Vec::new();
    let clean = berth::state::tools::check(&cli.config, &os, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        clean
            && out.contains("warning: the state's 1 volume and snapshot records are served as CSI driver local.berth.csi.io")
            && out.contains("given --driver-name other.berth.csi.io"),
        "{out}"
    );
    // Under its own name it serves the volume, as before.
    let h = build(dir, os, f, &["--driver-name", "local.berth.csi.io"]);
    assert!(h.driver.store.get(&id).is_some());
    assert_eq!(std::fs::read(&data).unwrap(), b"tenant");
    let (clean, out) = state_check(&h);
    assert!(clean && !out.contains("driver"), "{out}");
    delete(&h, &id).await;
}

/// A kind taken out of `--kinds` while volumes of it exist (here
/// `--kinds block` over local volumes): their records and storage stay,
/// and every RPC of them says why instead of answering as for an unknown
/// id. DeleteVolume is FAILED_PRECONDITION naming `--kinds` (the record
/// and the directory stay), NodeStageVolume's NOT_FOUND names it too;
/// with the kind served again the volume is staged and deleted as
/// before. Before, DeleteVolume answered OK and left the record and the
/// tenant's directory behind for good (the PV gone, nothing said), and
/// NodeStageVolume answered "volume ... does not exist".
#[tokio::test]
async fn volumes_of_a_kind_no_longer_served_are_never_taken_for_unknown() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let data = h.path("local").join(&id).join("data");
    std::fs::write(&data, b"tenant").unwrap();
    let h = build(
        h.stop(),
        berth::os::Os::fake().0,
        None,
        &["--kinds", "block"],
    );
    let e = try_delete(&h, &id)
        .await
        .expect_err("deleted while not served");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("--kinds") && e.message().contains("local"),
        "{e:?}"
    );
    assert!(h.driver.store.get(&id).is_some());
    assert_eq!(std::fs::read(&data).unwrap(), b"tenant");
    let staging = h.path("stage");
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .expect_err("staged while not served");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("--kinds"), "{e:?}");
    // `state check` names it.
    let (_, report) = state_check(&h);
    assert!(
        report.contains(&id) && report.contains("--kinds does not include local"),
        "{report}"
    );
    // An id without a record is still unknown: OK.
    try_delete(&h, "local-0123456789abcdef0123456789abcdef")
        .await
        .expect("unknown id");
    // Served again.
    let h = build(h.stop(), berth::os::Os::fake().0, None, &[]);
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!h.path("local").join(&id).exists());
}

/// A volume recorded here whose kind was taken out of --kinds exists, and
/// the controller's queries say so: ControllerGetVolume answers it (its
/// nodes) with an abnormal condition naming the flag, ListVolumes lists it
/// so, ValidateVolumeCapabilities confirms nothing and its message names
/// the flag (its kind's checks are not here; FAILED_PRECONDITION is not in
/// that RPC's error table), ControllerPublishVolume is FAILED_PRECONDITION
/// naming the flag, and ControllerUnpublishVolume forgets the attachment (only the record's:
/// nothing is touched), so that once the kind is served again the volume
/// is deleted. Before, ControllerGetVolume, ValidateVolumeCapabilities
/// and ControllerPublishVolume answered NOT_FOUND (the volume "does not
/// exist"), ListVolumes left it out (external-attacher then takes its
/// attachment for gone), and ControllerUnpublishVolume answered OK while
/// the record kept the node: DeleteVolume refused it ("still published")
/// for good once the kind was served again.
#[tokio::test]
async fn a_volume_of_a_kind_no_longer_served_is_reported_not_gone() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    h.ctl
        .controller_publish_volume(Request::new(publish(NODE)))
        .await
        .expect("publish");
    let h = build(
        h.stop(),
        berth::os::Os::fake().0,
        None,
        &["--kinds", "block"],
    );
    let v = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .expect("get while not served")
        .into_inner();
    assert_eq!(v.volume.unwrap().volume_id, id);
    let status = v.status.unwrap();
    assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
    let c = status.volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("--kinds"), "{c:?}");
    let listed = h
        .ctl
        .list_volumes(Request::new(csi::ListVolumesRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .entries;
    let e = listed
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == id)
        .expect("listed");
    let status = e.status.clone().unwrap();
    assert_eq!(status.published_node_ids, vec![NODE.to_string()]);
    let c = status.volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("--kinds"), "{c:?}");
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        }))
        .await
        .expect("answered while not served")
        .into_inner();
    assert!(r.confirmed.is_none(), "confirmed while not served");
    assert!(r.message.contains("--kinds"), "{r:?}");
    let e = h
        .ctl
        .controller_publish_volume(Request::new(publish("node-b")))
        .await
        .expect_err("published while not served");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--kinds"), "{e:?}");
    controller_unpublish(&h, &id, NODE)
        .await
        .expect("unpublish while not served");
    assert!(h.driver.store.get(&id).unwrap().published.is_empty());
    // Served again: nothing holds it.
    let h = build(h.stop(), berth::os::Os::fake().0, None, &[]);
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
}

// ------------------------------------------- Controller publish / unpublish

#[tokio::test]
async fn controller_publish_rules() {
    let h = fake(&["--max-volumes-per-node", "2"]);
    let id = create(&h, "a", 1).await.volume_id;
    let req = |vol: &str, node: &str, ro: bool| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        readonly: ro,
        ..Default::default()
    };
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&id, NODE, false)))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&id, NODE, false)))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&id, NODE, true)))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&id, "node-b", false)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(
                    "local-0123456789abcdef0123456789abcdef",
                    NODE,
                    false
                )))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&id, "", false)))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_cap = req(&id, NODE, false);
    no_cap.volume_capability = None;
    assert_eq!(
        code(h.ctl.controller_publish_volume(Request::new(no_cap)).await),
        Code::InvalidArgument
    );
    // Volume limit.
    let b = create(&h, "b", 1).await.volume_id;
    let c = create(&h, "c", 1).await.volume_id;
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&b, NODE, false)))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&c, NODE, false)))
                .await
        ),
        Code::ResourceExhausted
    );
    // Recorded, visible in ControllerGetVolume and ListVolumes.
    let v = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.status.unwrap().published_node_ids, vec![NODE.to_string()]);
    // Unpublish: idempotent, unknown volume OK.
    let un = |vol: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: NODE.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        assert_eq!(
            code(
                h.ctl
                    .controller_unpublish_volume(Request::new(un(&id)))
                    .await
            ),
            Code::Ok
        );
    }
    assert_eq!(
        code(
            h.ctl
                .controller_unpublish_volume(Request::new(un(
                    "local-0123456789abcdef0123456789abcdef"
                )))
                .await
        ),
        Code::Ok
    );
    assert!(h.driver.store.get(&id).unwrap().published.is_empty());
    // The freed slot can be used.
    assert_eq!(
        code(
            h.ctl
                .controller_publish_volume(Request::new(req(&c, NODE, false)))
                .await
        ),
        Code::Ok
    );
}

// ------------------------------------------------ Validate / List / Get

#[tokio::test]
async fn validate_volume_capabilities() {
    let h = fake(&[]);
    let id = create(&h, "a", 1).await.volume_id;
    let req = |caps: Vec<csi::VolumeCapability>, id: &str| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = h
        .ctl
        .validate_volume_capabilities(Request::new(req(vec![rwo()], &id)))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = h
        .ctl
        .validate_volume_capabilities(Request::new(req(
            vec![block_cap(Mode::SingleNodeWriter)],
            &id,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    assert_eq!(
        code(
            h.ctl
                .validate_volume_capabilities(Request::new(req(vec![], &id)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            h.ctl
                .validate_volume_capabilities(Request::new(req(
                    vec![rwo()],
                    "local-0123456789abcdef0123456789abcdef"
                )))
                .await
        ),
        Code::NotFound
    );
}

/// ValidateVolumeCapabilities confirms parameters only when they describe
/// the volume: a `kind` naming another kind (or one not served) is not
/// confirmed. A volume_context must be the volume's own (what CreateVolume
/// returned): anything else is not confirmed.
#[tokio::test]
async fn validate_checks_kind_parameter_and_volume_context() {
    let h = fake(&["--kinds", "local,block"]);
    let mut req = create_req("l", 8 << 20);
    req.parameters.insert("kind".into(), "local".into());
    let local = created_id_and_context(h.ctl.create_volume(Request::new(req)).await);
    let mut req = create_req("b", 8 << 20);
    req.parameters.insert("kind".into(), "block".into());
    let block = created_id_and_context(h.ctl.create_volume(Request::new(req)).await);
    let validate = |id: &str, params: &[(&str, &str)], ctx: &HashMap<String, String>| {
        csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: vec![rwo()],
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volume_context: ctx.clone(),
            ..Default::default()
        }
    };
    let none = HashMap::new();
    let garbage = HashMap::from([("foo".to_string(), "bar".to_string())]);
    // Parameters without a kind describe a volume of the default kind
    // (local, served first): a block volume's own parameters are not
    // confirmed without `kind: block` (before, they were). What Kubernetes
    // adds names no kind and describes either.
    let co = ("csi.storage.k8s.io/pvc/name", "claim");
    let mut req = create_req("b2", 8 << 20);
    req.parameters.insert("kind".into(), "block".into());
    req.parameters.insert("allocation".into(), "thick".into());
    let thick = created_id_and_context(h.ctl.create_volume(Request::new(req)).await).0;
    for (id, params, ok) in [
        (&thick, &[("allocation", "thick")][..], false),
        (
            &thick,
            &[("kind", "block"), ("allocation", "thick")][..],
            true,
        ),
        (&block.0, &[co][..], true),
        (&local.0, &[co][..], true),
    ] {
        let r = h
            .ctl
            .validate_volume_capabilities(Request::new(validate(id, params, &none)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.confirmed.is_some(), ok, "{id} {params:?}: {}", r.message);
        if !ok {
            assert!(r.message.contains("default kind (local)"), "{}", r.message);
        }
    }
    for ((id, ctx), own, other) in [(&local, "local", "block"), (&block, "block", "local")] {
        for (params, ctx, ok) in [
            (&[("kind", own)][..], &none, true),
            (&[("kind", &own.to_uppercase()[..])][..], &none, true),
            (&[][..], ctx, true),
            (&[("kind", own)][..], ctx, true),
            (&[("kind", other)][..], &none, false),
            (&[("kind", "nfs")][..], &none, false),
            (&[("kind", "tape")][..], &none, false),
            (&[][..], &garbage, false),
            (&[("kind", own)][..], &garbage, false),
        ] {
            let r = h
                .ctl
                .validate_volume_capabilities(Request::new(validate(id, params, ctx)))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                r.confirmed.is_some(),
                ok,
                "{own} volume, parameters {params:?}, context {ctx:?}: {}",
                r.message
            );
            assert_eq!(r.message.is_empty(), ok, "{}", r.message);
            if let Some(c) = r.confirmed {
                assert_eq!(&c.volume_context, ctx);
            }
        }
    }
}

/// The id and volume_context of the volume a CreateVolume answered with.
fn created_id_and_context(
    r: Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status>,
) -> (String, HashMap<String, String>) {
    let v = r.expect("create").into_inner().volume.expect("volume");
    (v.volume_id, v.volume_context)
}

#[tokio::test]
async fn list_volumes_pages_and_rejects_bad_tokens() {
    let h = fake(&[]);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&h, &format!("v{i}"), 1).await.volume_id);
    }
    let list = |max: i32, token: &str| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    let p1 = h
        .ctl
        .list_volumes(Request::new(list(2, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    // Delete the last volume of the page, add a new one: nothing is lost.
    h.ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: ids[1].clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    ids.push(create(&h, "v5", 1).await.volume_id);
    let mut seen: Vec<String> = p1
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    let mut token = p1.next_token;
    while !token.is_empty() {
        let p = h
            .ctl
            .list_volumes(Request::new(list(2, &token)))
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            p.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        token = p.next_token;
    }
    // Page one still showed the deleted volume; every other volume, the new
    // one included, appears exactly once.
    assert_eq!(seen, ids);
    assert_eq!(
        code(h.ctl.list_volumes(Request::new(list(0, "bogus"))).await),
        Code::Aborted
    );
    assert_eq!(
        code(h.ctl.list_volumes(Request::new(list(0, "999"))).await),
        Code::Aborted
    );
    // Tokens that parse to a valid sequence number but were never handed
    // out in that form.
    for t in ["+1", "01", " 1"] {
        assert_eq!(
            code(h.ctl.list_volumes(Request::new(list(0, t))).await),
            Code::Aborted,
            "{t:?}"
        );
    }
    assert_eq!(
        code(h.ctl.list_volumes(Request::new(list(-1, ""))).await),
        Code::InvalidArgument
    );
    let all = h
        .ctl
        .list_volumes(Request::new(list(0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
}

/// ListVolumes looks at each listed volume's storage (its condition: an
/// lstat of the local directory or the block file) on an operation's
/// thread, through the OS layer, never on the thread that reads and
/// answers every call: a root whose disk stopped answering holds up that
/// ListVolumes only. Before, the look ran in the handler itself (a
/// `std::fs::symlink_metadata` the fake could not see), and while it waited
/// no other call (Probe, GetPluginInfo, any node call) was answered. No
/// clock is read: the biased select polls ListVolumes first, and only a
/// handler that did the look inline is done on that first poll (the
/// delayed lstat cannot have answered on another thread by then).
#[tokio::test(flavor = "current_thread")]
async fn list_volumes_never_waits_on_the_disk_in_the_thread_answering_calls() {
    const HUNG: std::time::Duration = std::time::Duration::from_secs(2);
    for kind in ["local", "block"] {
        let h = fake(&["--kinds", kind]);
        let id = create(&h, "v", 1 << 20).await.volume_id;
        let storage = match kind {
            "local" => h.path("local").join(&id),
            _ => h.path("block").join(format!("{id}.img")),
        };
        h.fake().set_lstat_delay(&storage, Some(HUNG));
        let list = h
            .ctl
            .list_volumes(Request::new(csi::ListVolumesRequest::default()));
        tokio::pin!(list);
        tokio::select! {
            biased;
            _ = &mut list => panic!(
                "{kind}: ListVolumes looked at the disk on the thread answering calls"
            ),
            info = h.ident.get_plugin_info(Request::new(csi::GetPluginInfoRequest {})) => {
                assert!(!info.expect("plugin info").into_inner().name.is_empty());
            }
        }
        let listed = list.await.expect("list").into_inner();
        assert_eq!(listed.entries.len(), 1, "{kind}");
        let e = &listed.entries[0];
        assert_eq!(e.volume.as_ref().unwrap().volume_id, id, "{kind}");
        let c = e
            .status
            .as_ref()
            .unwrap()
            .volume_condition
            .as_ref()
            .unwrap();
        assert!(!c.abnormal, "{kind}: {c:?}");
        assert!(
            h.fake().lstats().contains(&storage),
            "{kind}: the volume's storage was looked at through the OS layer"
        );
    }
}

#[tokio::test]
async fn get_volume_reports_condition() {
    let h = fake(&[]);
    let id = create(&h, "a", 1).await.volume_id;
    let get = || csi::ControllerGetVolumeRequest {
        volume_id: id.clone(),
    };
    let v = h
        .ctl
        .controller_get_volume(Request::new(get()))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.status.unwrap().volume_condition.unwrap().abnormal);
    std::fs::remove_dir(h.path("local").join(&id)).unwrap();
    let v = h
        .ctl
        .controller_get_volume(Request::new(get()))
        .await
        .unwrap()
        .into_inner();
    let c = v.status.unwrap().volume_condition.unwrap();
    assert!(c.abnormal && c.message.contains("missing"), "{c:?}");
    assert_eq!(
        code(
            h.ctl
                .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
                    volume_id: "nope".into()
                }))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn get_capacity_subtracts_promises_and_honours_topology() {
    let h = fake(&[]);
    h.fake().set_usage(
        None,
        FsUsage {
            total_bytes: 100 << 20,
            available_bytes: 50 << 20,
            ..Default::default()
        },
    );
    let cap = |t: Option<csi::Topology>| csi::GetCapacityRequest {
        accessible_topology: t,
        ..Default::default()
    };
    let c = h
        .ctl
        .get_capacity(Request::new(cap(None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.available_capacity, 50 << 20);
    create(&h, "a", 20 << 20).await;
    let c = h
        .ctl
        .get_capacity(Request::new(cap(Some(topo(NODE)))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.available_capacity, 30 << 20);
    assert_eq!(c.maximum_volume_size, Some(30 << 20));
    let c = h
        .ctl
        .get_capacity(Request::new(cap(Some(topo("node-b")))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.available_capacity, 0);
    let mut block = cap(None);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    let c = h
        .ctl
        .get_capacity(Request::new(block))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.available_capacity, 0);
}

#[tokio::test]
async fn unadvertised_rpcs_are_unimplemented() {
    // Every kind makes snapshots (their capabilities are advertised in
    // every mode: handlers_nfs, handlers_snapshots); modification and
    // expansion without an expandable kind are not.
    use csi::controller_service_capability::rpc::Type;
    let h = fake(&[]);
    let caps = controller_rpcs(&h).await;
    let has = |t: Type| caps.contains(&(t as i32));
    assert!(
        has(Type::CreateDeleteVolume)
            && has(Type::PublishUnpublishVolume)
            && has(Type::GetCapacity)
    );
    assert!(
        has(Type::CreateDeleteSnapshot)
            && has(Type::ListSnapshots)
            && has(Type::GetSnapshot)
            && has(Type::CloneVolume)
    );
    // Local volumes grow (their promise, and their project's limits where
    // the local root enforces them); nothing modifies volumes.
    assert!(has(Type::ExpandVolume) && !has(Type::ModifyVolume));
}

// --------------------------------------------------------------- Node

#[tokio::test]
async fn node_info_and_capabilities() {
    let h = fake(&["--max-volumes-per-node", "7"]);
    let i = h
        .node
        .node_get_info(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.node_id, NODE);
    assert_eq!(i.max_volumes_per_node, 7);
    assert_eq!(i.accessible_topology, Some(topo(NODE)));
    let c = h
        .node
        .node_get_capabilities(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner();
    // Stage, stats, condition, multi-writer and expansion.
    assert_eq!(c.capabilities.len(), 5);
}

#[tokio::test]
async fn stage_is_idempotent_and_detects_conflicts() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let binds = |h: &Harness| {
        h.fake()
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Bind { .. }))
            .count()
    };
    assert_eq!(binds(&h), 1);
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(binds(&h), 1, "a repeated stage must not mount again");
    // Another volume at the same staging path.
    let other = create(&h, "b", 1).await.volume_id;
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&other, &staging)))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(
            "local-0123456789abcdef0123456789abcdef",
            &h.path("x"),
        )))
        .await;
    assert_eq!(code(r), Code::NotFound);
    let mut bad = stage_req(&id, &staging);
    bad.staging_target_path = "relative/path".into();
    assert_eq!(
        code(h.node.node_stage_volume(Request::new(bad)).await),
        Code::InvalidArgument
    );
    let mut bad = stage_req(&id, &staging);
    bad.volume_capability = None;
    assert_eq!(
        code(h.node.node_stage_volume(Request::new(bad)).await),
        Code::InvalidArgument
    );
}

/// A local volume's staging mount is a bind of its directory that takes
/// no mount flags and no read-only setting (NodePublishVolume applies
/// them at the target). So NodeStageVolume repeated at the same path with
/// other mount flags or another single-node access mode is OK and mounts
/// nothing: the staging mount there is the one that request would make,
/// compatible with its capability (the spec's ALREADY_EXISTS is for a
/// staged volume incompatible with it). A block volume's filesystem is
/// mounted at the staging path with the flags, and there the same repeat
/// is ALREADY_EXISTS (handlers_block
/// `restage_with_another_capability_is_already_exists`).
#[tokio::test]
async fn a_local_restage_with_other_mount_flags_is_ok_as_its_staging_mount_takes_none() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let staging = h.path("stage-a");
    let stage = |cap: csi::VolumeCapability| csi::NodeStageVolumeRequest {
        volume_capability: Some(cap),
        ..stage_req(&id, &staging)
    };
    let at_staging = |h: &Harness| -> Vec<berth::os::mountinfo::MountEntry> {
        h.fake()
            .table()
            .into_iter()
            .filter(|m| m.mount_point == staging)
            .collect()
    };
    h.node
        .node_stage_volume(Request::new(stage(mount_cap_flags(
            Mode::SingleNodeWriter,
            &["noexec", "nosuid"],
        ))))
        .await
        .unwrap();
    let first = at_staging(&h);
    assert_eq!(first.len(), 1);
    assert!(
        !first[0].has_option("noexec") && !first[0].has_option("nosuid") && !first[0].readonly(),
        "{first:?}"
    );
    for cap in [
        rwo(),
        mount_cap_flags(Mode::SingleNodeWriter, &["ro", "nodev"]),
        mount_cap(Mode::SingleNodeReaderOnly),
        mount_cap(Mode::SingleNodeMultiWriter),
    ] {
        let r = h
            .node
            .node_stage_volume(Request::new(stage(cap.clone())))
            .await;
        assert_eq!(code(r), Code::Ok, "{cap:?}");
        assert_eq!(at_staging(&h), first, "{cap:?}");
    }
    // The flags are the publish's.
    let target = h.path("t");
    h.node
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest {
            volume_capability: Some(mount_cap_flags(Mode::SingleNodeWriter, &["noexec"])),
            ..publish_req(&id, &staging, &target, false)
        }))
        .await
        .unwrap();
    let t = h.fake().table();
    let published = t.iter().find(|m| m.mount_point == target).unwrap();
    assert!(published.has_option("noexec"), "{published:?}");
}

#[tokio::test]
async fn publish_binds_readonly_once_and_detects_conflicts() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.fake().clear_calls();
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, true)))
        .await
        .unwrap();
    let calls = h.fake().calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    match &calls[0] {
        Call::Bind {
            source,
            target: t,
            flags,
        } => {
            assert_eq!(source, &staging);
            assert_eq!(t, &target);
            assert!(flags.readonly);
        }
        c => panic!("unexpected {c:?}"),
    }
    assert!(target.is_dir(), "the driver creates the target");
    // Same again: OK, no second mount.
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, true)))
        .await
        .unwrap();
    assert_eq!(h.fake().calls().len(), 1);
    // Same target, different read-only flag.
    let r = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    // No staging path although STAGE_UNSTAGE_VOLUME is advertised: the
    // spec's NodePublishVolume table says FAILED_PRECONDITION.
    let mut r = publish_req(&id, &staging, &h.path("t2"), false);
    r.staging_target_path.clear();
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(r)).await),
        Code::FailedPrecondition
    );
    // Not staged there.
    let r = publish_req(&id, &h.path("elsewhere"), &h.path("t2"), false);
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(r)).await),
        Code::FailedPrecondition
    );
    // The staging path as the target: INVALID_ARGUMENT, nothing mounted.
    let r = publish_req(&id, &staging, &staging, false);
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(r)).await),
        Code::InvalidArgument
    );
    // Mount flags outside the allowlist never reach mount.
    let mut r = publish_req(&id, &staging, &h.path("t3"), false);
    r.volume_capability = Some(mount_cap_flags(
        Mode::SingleNodeWriter,
        &["ro,x-mount.mkdir"],
    ));
    assert_eq!(
        code(h.node.node_publish_volume(Request::new(r)).await),
        Code::InvalidArgument
    );
    // Flags in the allowlist reach it.
    let mut r = publish_req(&id, &staging, &h.path("t4"), false);
    r.volume_capability = Some(mount_cap_flags(
        Mode::SingleNodeWriter,
        &["noexec", "nosuid"],
    ));
    h.node.node_publish_volume(Request::new(r)).await.unwrap();
    assert!(h.fake().calls().iter().any(|c| matches!(c,
        Call::Bind { flags, .. } if flags.noexec && flags.nosuid && !flags.readonly)));
    assert_eq!(
        h.fake()
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Bind { .. }))
            .count(),
        2
    );
}

#[tokio::test]
async fn single_writer_volume_gets_one_target() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let req = |t: &str, mode: Mode| {
        let mut r = publish_req(&id, &staging, &h.path(t), false);
        r.volume_capability = Some(mount_cap(mode));
        r
    };
    h.node
        .node_publish_volume(Request::new(req("t1", Mode::SingleNodeSingleWriter)))
        .await
        .unwrap();
    let r = h
        .node
        .node_publish_volume(Request::new(req("t2", Mode::SingleNodeSingleWriter)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    // SINGLE_NODE_WRITER allows several pods on this node.
    let h2 = fake(&[]);
    let (id2, staging2) = staged(&h2, "b").await;
    for t in ["t1", "t2"] {
        h2.node
            .node_publish_volume(Request::new(publish_req(
                &id2,
                &staging2,
                &h2.path(t),
                false,
            )))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn unpublish_unmounts_stacked_mounts_and_removes_target() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    // Simulate mounts stacked by an earlier, buggy publish.
    use berth::os::Mounter;
    h.fake()
        .bind(&staging, &target, Default::default())
        .unwrap();
    let un = || csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    h.fake().clear_calls();
    h.node
        .node_unpublish_volume(Request::new(un()))
        .await
        .unwrap();
    let unmounts = h
        .fake()
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Unmount { .. }))
        .count();
    assert_eq!(unmounts, 2);
    assert!(!target.exists());
    assert!(!h.fake().table().iter().any(|m| m.mount_point == target));
    // Again: OK, nothing to do.
    h.node
        .node_unpublish_volume(Request::new(un()))
        .await
        .unwrap();
    // A target that was never there: OK.
    let r = csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: h.path("never").display().to_string(),
    };
    h.node.node_unpublish_volume(Request::new(r)).await.unwrap();
    // A volume without a record: OK, from the path (kubelet retries a
    // NOT_FOUND forever and the pod stays Terminating).
    let r = csi::NodeUnpublishVolumeRequest {
        volume_id: "local-0123456789abcdef0123456789abcdef".into(),
        target_path: target.display().to_string(),
    };
    h.node.node_unpublish_volume(Request::new(r)).await.unwrap();
}

#[tokio::test]
async fn unpublish_surfaces_busy_without_lazy_unmount() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    h.fake().fail_next("unmount", libc::EBUSY);
    let un = csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    let e = h
        .node
        .node_unpublish_volume(Request::new(un.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().contains("busy"), "{}", e.message());
    assert!(h.fake().table().iter().any(|m| m.mount_point == target));
    // The retry succeeds.
    h.node
        .node_unpublish_volume(Request::new(un))
        .await
        .unwrap();
}

#[tokio::test]
async fn unstage_refuses_while_published() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    let un = || csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    assert_eq!(
        code(h.node.node_unstage_volume(Request::new(un())).await),
        Code::FailedPrecondition
    );
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        }))
        .await
        .unwrap();
    for _ in 0..2 {
        h.node
            .node_unstage_volume(Request::new(un()))
            .await
            .unwrap();
    }
    assert!(!h.fake().table().iter().any(|m| m.mount_point == staging));
}

/// An id without a record (a `local-` id never created) or one no served
/// kind owns never unmounts another volume's staging path or target:
/// FAILED_PRECONDITION and the mount stays (found by the hostile-input
/// probe: NodeUnstageVolume of such an id took down a live staging mount,
/// NodeUnpublishVolume of a made-up id a live target).
#[tokio::test]
async fn ids_without_a_record_never_unmount_another_volumes_mounts() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    let unknown = format!("{}{}", &id[..14], "0".repeat(24));
    let mounted = |p: &std::path::Path| h.fake().table().iter().any(|m| m.mount_point == p);
    let refused =
        |r: Result<(), tonic::Status>| r.map_err(|e| e.code()) == Err(Code::FailedPrecondition);
    for other in [
        unknown.as_str(),
        "local-00000000000000000000000000000000",
        "foo-bar",
    ] {
        assert!(
            refused(unstage_as_kubelet(&h, other, &staging).await),
            "unstage as {other}"
        );
        assert!(mounted(&staging), "unstage as {other}");
    }
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    for other in [unknown.as_str(), "foo-bar"] {
        assert!(
            refused(unpublish_as_kubelet(&h, other, &target).await),
            "unpublish as {other}"
        );
        assert!(mounted(&target), "unpublish as {other}");
    }
    // The volume's own id still tears down, and an unknown id at a path
    // where nothing is mounted is OK.
    unpublish_as_kubelet(&h, &id, &target).await.unwrap();
    unstage_as_kubelet(&h, &id, &staging).await.unwrap();
    for other in [unknown.as_str(), "foo-bar"] {
        unstage_as_kubelet(&h, other, &staging).await.unwrap();
    }
    assert!(!mounted(&staging) && !mounted(&target));
}

/// A target at or below the staging path is inside the volume itself, and
/// a staging path below the target would be hidden: INVALID_ARGUMENT,
/// nothing made or mounted.
#[tokio::test]
async fn publish_target_inside_the_staging_path_is_invalid() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let before = h.fake().table().len();
    for target in [staging.join("inner"), staging.join("a/b")] {
        let r = h
            .node
            .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{}", target.display());
    }
    assert!(!staging.join("inner").exists());
    assert_eq!(h.fake().table().len(), before);
}

/// A capability a local volume does not offer (raw block, an access mode
/// for several nodes) is the spec's "Exceeds capabilities" row of
/// NodeStageVolume and NodePublishVolume: FAILED_PRECONDITION (it was
/// INVALID_ARGUMENT), and nothing is mounted. A mount flag Berth never
/// passes stays INVALID_ARGUMENT (an invalid value for any volume), and so
/// does such a capability where the spec's table has no such row
/// (CreateVolume, ControllerPublishVolume).
#[tokio::test]
async fn a_capability_the_volume_does_not_offer_is_failed_precondition_at_stage_and_publish() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let staging = h.path("stage-a");
    let target = h.path("t");
    let unfit = [
        block_cap(Mode::SingleNodeWriter),
        mount_cap(Mode::MultiNodeMultiWriter),
        mount_cap(Mode::MultiNodeReaderOnly),
    ];
    let bogus = mount_cap_flags(Mode::SingleNodeWriter, &["bogus"]);
    let stage_with = |cap: &csi::VolumeCapability| csi::NodeStageVolumeRequest {
        volume_capability: Some(cap.clone()),
        ..stage_req(&id, &staging)
    };
    for cap in &unfit {
        let r = h
            .node
            .node_stage_volume(Request::new(stage_with(cap)))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{cap:?}");
    }
    let r = h
        .node
        .node_stage_volume(Request::new(stage_with(&bogus)))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    assert_eq!(mounted_at(&h, &staging), 0);
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    let publish_with = |cap: &csi::VolumeCapability| csi::NodePublishVolumeRequest {
        volume_capability: Some(cap.clone()),
        ..publish_req(&id, &staging, &target, false)
    };
    for cap in &unfit {
        let r = h
            .node
            .node_publish_volume(Request::new(publish_with(cap)))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "{cap:?}");
    }
    let r = h
        .node
        .node_publish_volume(Request::new(publish_with(&bogus)))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    assert_eq!(mounted_at(&h, &target), 0);
    assert!(!target.exists());
    for cap in &unfit {
        let r = h
            .ctl
            .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
        let r = h
            .ctl
            .create_volume(Request::new(csi::CreateVolumeRequest {
                volume_capabilities: vec![cap.clone()],
                ..create_req("b", 1 << 20)
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
    }
}

/// A volume_capability a local volume does not offer (raw block, an
/// access mode for several nodes) is the spec's "Exceeds capabilities" row
/// of ControllerExpandVolume and NodeExpandVolume: INVALID_ARGUMENT, and
/// the volume keeps its size. Before, both checked only the capability's
/// form and grew the volume.
#[tokio::test]
async fn an_expansion_with_a_capability_the_volume_does_not_offer_is_invalid() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    for cap in [
        block_cap(Mode::SingleNodeWriter),
        mount_cap(Mode::MultiNodeMultiWriter),
    ] {
        let r = h
            .ctl
            .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 << 20,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
        let r = h
            .node
            .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 << 20,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{cap:?}");
        assert_eq!(h.driver.store.get(&id).unwrap().capacity_bytes, 1 << 20);
    }
}

/// Hostile input an error names (a 4,000-byte relative path of two-byte
/// characters, at most what a path may have) gives a status message of at
/// most `MAX_MESSAGE` bytes that says it was cut, with the spec's code: the
/// message travels in a header, and a client refusing an oversized header
/// list answers its own error in place of INVALID_ARGUMENT. Before, the cut
/// was made only by `Error::status_in`, which no RPC called:
/// NodeStageVolume and NodePublishVolume answered 4,046 bytes.
#[tokio::test]
async fn error_messages_naming_hostile_input_are_cut() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let cut = |s: &tonic::Status| {
        assert!(
            s.message().len() <= berth::error::MAX_MESSAGE,
            "{:?}: {} bytes",
            s.code(),
            s.message().len()
        );
        assert!(s.message().contains(" bytes cut) ... "), "{}", s.message());
    };
    let hostile = std::path::PathBuf::from("é".repeat(2000));
    let e = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &hostile)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    cut(&e);
    let e = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &hostile, false)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    cut(&e);
}

/// How often each RPC of a local-volume lifecycle reads the whole mount
/// table: publish and unpublish decide from the mount-root and identity
/// probes alone; stage (is the volume mounted anywhere else?), unstage and
/// DeleteVolume read it once each.
#[tokio::test]
async fn local_lifecycle_reads_the_mount_table_three_times() {
    let h = fake(&[]);
    let f = h.fake();
    let mut reads = Vec::new();
    f.clear_calls();
    let id = create(&h, "a", 1 << 20).await.volume_id;
    reads.push(("create", f.table_reads()));
    let (staging, target) = (h.path("stage-a"), h.path("target"));
    reads.extend(mount_table_reads(&h, &id, &staging, &target).await);
    assert_eq!(
        reads,
        vec![
            ("create", 0),
            ("stage", 1),
            ("publish", 0),
            ("unpublish", 0),
            ("unstage", 1),
            ("delete", 1),
        ]
    );
    assert!(!h.path("local").join(&id).exists());
    assert!(!target.exists());
    assert!(f
        .table()
        .iter()
        .all(|m| m.mount_point == std::path::Path::new("/")));
}

/// NodeUnstage of a local volume asks the kernel what is mounted at the
/// staging path (the mount-id probe, one statx on a node) once, for its
/// checks and its unmount alike: it asked three times before, a statx
/// each, on every lifecycle; and until 2026-12-07 a mount-root probe (a
/// statx of its own) came before it, to return early when nothing is
/// mounted there, which the mount-id probe tells as well.
#[tokio::test]
async fn local_unstage_probes_the_staging_path_once() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let f = h.fake();
    f.clear_calls();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    assert_eq!(
        (f.table_reads(), f.mount_id_probes(), f.probes()),
        (1, 1, 0)
    );
    assert!(!f.table().iter().any(|m| m.mount_point == staging));
    // Nothing mounted there any more: the one probe answers, no table read.
    f.clear_calls();
    h.node
        .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        }))
        .await
        .unwrap();
    assert_eq!(
        (f.table_reads(), f.mount_id_probes(), f.probes()),
        (0, 1, 0)
    );
}

/// NodePublish of a local volume looks at the staging path once (one
/// statx on a node) for both what it needs to know there: that a mount is
/// there, and that it shows the volume's directory. It looked twice before
/// (the mount-root probe, then the identity probe), on every lifecycle.
/// A target it makes itself (kubelet leaves it to the driver) is not
/// probed: nothing is mounted on a directory just made (until 2026-12-07
/// its mount-root probe came before the mkdir, a statx answering ENOENT).
/// A target that is there is still probed, and a publish again at a
/// mounted target still answers from the mount table.
#[tokio::test]
async fn local_publish_looks_at_the_staging_path_once() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    let f = h.fake();
    let mkdirs = |p: &std::path::Path| {
        f.file_ops()
            .iter()
            .filter(|o| o.op == "mkdir" && o.path == p)
            .count()
    };
    // Each publish with the counts cleared before it.
    let publish = |t: std::path::PathBuf| {
        f.clear_calls();
        h.node
            .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
    };
    f.clear_file_ops();
    publish(target.clone()).await.unwrap();
    // The staging path's one look and the identity of the volume's
    // directory; no probe of the target it made.
    assert_eq!(
        (f.table_reads(), f.probes(), f.identity_probes()),
        (0, 1, 1)
    );
    assert_eq!(mkdirs(&target), 1);
    assert!(f.table().iter().any(|m| m.mount_point == target));
    // Again at the same target: it is there and mounted, so it is probed
    // and the mount table decides (the same publication: OK).
    publish(target.clone()).await.unwrap();
    assert_eq!((f.table_reads(), f.probes()), (1, 2));
    assert_eq!(
        f.table().iter().filter(|m| m.mount_point == target).count(),
        1
    );
    // At a target that is there and empty: probed, then mounted.
    let there = h.path("target-there");
    std::fs::create_dir(&there).unwrap();
    publish(there.clone()).await.unwrap();
    assert_eq!((f.table_reads(), f.probes()), (0, 2));
    assert!(f.table().iter().any(|m| m.mount_point == there));
}

/// NodeUnpublish of a local volume asks whether anything is mounted at the
/// target (the mount-root probe, one statx on a node) once before its
/// unmount, for its refusal of another volume's mount and its unmounts
/// alike, and once after (nothing stacked beneath): it asked twice before
/// the unmount before, on every lifecycle. The same look tells what the
/// target shows (its identity, for the refusal: until 2026-12-07 a statx
/// of its own), and the target goes with one rmdir, without an lstat
/// first.
#[tokio::test]
async fn local_unpublish_probes_the_target_once_before_its_unmount() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    let f = h.fake();
    f.clear_calls();
    h.node
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        }))
        .await
        .unwrap();
    // The identity probe left is the volume directory's.
    assert_eq!(
        (f.table_reads(), f.probes(), f.identity_probes()),
        (0, 2, 1)
    );
    assert!(!f.table().iter().any(|m| m.mount_point == target));
    assert!(!target.exists());
    assert!(!f.lstats().contains(&target), "{:?}", f.lstats());
}

/// NodeStage of a local volume at a staging path that is there (kubelet
/// makes it before NodeStageVolume) looks at it (one lstat) and makes no
/// mkdir: until 2026-12-07 a mkdir that failed with EEXIST came first,
/// then the same look. A staging path that is missing is still made, and
/// one that is not a directory is still refused.
#[tokio::test]
async fn local_stage_at_a_staging_path_that_is_there_makes_no_mkdir() {
    let h = fake(&[]);
    let f = h.fake();
    let mkdirs = |p: &std::path::Path| {
        f.file_ops()
            .iter()
            .filter(|o| o.op == "mkdir" && o.path == p)
            .count()
    };
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let staging = h.path("stage-a");
    std::fs::create_dir(&staging).unwrap();
    f.clear_file_ops();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(mkdirs(&staging), 0, "{:?}", f.file_ops());
    assert!(f.lstats().contains(&staging));
    assert!(f.table().iter().any(|m| m.mount_point == staging));
    // Missing: made, once.
    let id = create(&h, "b", 1 << 20).await.volume_id;
    let staging = h.path("stage-b");
    f.clear_file_ops();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(mkdirs(&staging), 1);
    assert!(f.table().iter().any(|m| m.mount_point == staging));
    // A file there: refused, left as it is.
    let id = create(&h, "c", 1 << 20).await.volume_id;
    let staging = h.path("stage-c");
    std::fs::write(&staging, b"x").unwrap();
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(staging.is_file());
    assert!(!f.table().iter().any(|m| m.mount_point == staging));
}

/// DeleteVolume of a local volume looks at the trash (one lstat) before it
/// moves the directory there, and makes no mkdir of it when it is there
/// (until 2026-12-07 a mkdir that failed with EEXIST came first, then the
/// same look). A trash that is missing is made again.
#[tokio::test]
async fn local_delete_makes_no_mkdir_of_a_trash_that_is_there() {
    let h = fake(&[]);
    let f = h.fake();
    let trash = h.path("local/.trash");
    let delete = |id: String| {
        h.ctl.delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        }))
    };
    let mkdirs = || {
        f.file_ops()
            .iter()
            .filter(|o| o.op == "mkdir" && o.path == trash)
            .count()
    };
    for (name, trash_there) in [("a", true), ("b", false)] {
        let id = create(&h, name, 1 << 20).await.volume_id;
        if trash_there {
            std::fs::create_dir_all(&trash).unwrap();
        } else if trash.exists() {
            std::fs::remove_dir_all(&trash).unwrap();
        }
        f.clear_file_ops();
        assert_eq!(code(delete(id.clone()).await), Code::Ok);
        assert_eq!(
            mkdirs(),
            usize::from(!trash_there),
            "{name}: {:?}",
            f.file_ops()
        );
        assert!(f.lstats().contains(&trash));
        assert!(!h.path("local").join(&id).exists());
    }
}

/// DeleteVolume's "in use?" check and the kind's own check share one read,
/// also when they refuse.
#[tokio::test]
async fn delete_of_a_volume_in_use_reads_the_table_once() {
    let h = fake(&[]);
    let (id, _staging) = staged(&h, "a").await;
    h.fake().clear_calls();
    let r = h
        .ctl
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(h.fake().table_reads(), 1);
    assert!(h.path("local").join(&id).is_dir());
}

/// With a probe that cannot tell (statx failing, an old kernel), every
/// decision falls back to mountinfo and the lifecycle still works.
#[tokio::test]
async fn lifecycle_works_when_the_probe_cannot_tell() {
    let h = fake(&[]);
    let staging = h.path("stage-a");
    let target = h.path("target");
    for p in [&staging, &target] {
        h.fake().set_probe_unknown(p, true);
    }
    let id = create(&h, "a", 1 << 20).await.volume_id;
    for _ in 0..2 {
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &staging)))
            .await
            .unwrap();
    }
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    // A buggy earlier publish left a second mount stacked on the target.
    use berth::os::Mounter;
    h.fake()
        .bind(&staging, &target, Default::default())
        .unwrap();
    h.fake().clear_calls();
    let un = csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    h.node
        .node_unpublish_volume(Request::new(un.clone()))
        .await
        .unwrap();
    // One read to tell whose mount it is, one to unmount by.
    assert_eq!(h.fake().table_reads(), 2);
    assert!(!h.fake().table().iter().any(|m| m.mount_point == target));
    assert!(!target.exists());
    h.node
        .node_unpublish_volume(Request::new(un))
        .await
        .unwrap();
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    for _ in 0..2 {
        h.node
            .node_unstage_volume(Request::new(unstage.clone()))
            .await
            .unwrap();
    }
    assert!(!h.fake().table().iter().any(|m| m.mount_point == staging));
    delete(&h, &id).await;
    assert!(!h.path("local").join(&id).exists());
}

#[tokio::test]
async fn volume_stats() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    let stats = |path: &str, vid: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: vid.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    let s = h
        .node
        .node_get_volume_stats(Request::new(stats(&target.display().to_string(), &id)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.len(), 2);
    assert!(s.usage[0].total > 0 && s.usage[1].total > 0);
    assert!(!s.volume_condition.unwrap().abnormal);
    let other = h.path("other").display().to_string();
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(&other, &id)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats("some/path", &id)))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats("", &id)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(
                    &target.display().to_string(),
                    "local-nope"
                )))
                .await
        ),
        Code::NotFound
    );
    // Backing directory gone: abnormal, with a message.
    std::fs::remove_dir_all(h.path("local").join(&id)).unwrap();
    let s = h
        .node
        .node_get_volume_stats(Request::new(stats(&target.display().to_string(), &id)))
        .await
        .unwrap()
        .into_inner();
    let c = s.volume_condition.unwrap();
    assert!(c.abnormal && !c.message.is_empty());
}

// ------------------------------------------------------- State and restart

#[tokio::test]
async fn state_survives_restart() {
    let h = fake(&[]);
    let id = create(&h, "a", 3 << 20).await.volume_id;
    controller_publish(&h, &id, NODE).await.unwrap();
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    let again = create(&h, "a", 3 << 20).await;
    assert_eq!(again.volume_id, id);
    let rec = h.driver.store.get(&id).unwrap();
    assert!(rec.published.contains_key(NODE));
}

/// A node reboot under staged and published local volumes: every mount is
/// gone (a new fake), the directories stay (or kubelet removed some).
/// kubelet tears down the pod of one volume, whose paths hold nothing now
/// or are gone with their parents, and stages and publishes the other
/// again at its paths; reconstruction unpublishes a target never
/// published again. Nothing is stranded, the stats are the volume's only
/// where it is mounted, and the torn-down volume can be deleted.
#[tokio::test]
async fn a_reboot_under_local_volumes_strands_nothing() {
    let h = fake(&[]);
    let a = create(&h, "a", 1 << 20).await.volume_id;
    let b = create(&h, "b", 1 << 20).await.volume_id;
    let kubelet = h.path("kubelet");
    let (sa, ta) = (kubelet.join("stage-a"), kubelet.join("pod-a/mount"));
    let (sb, tb) = (kubelet.join("stage-b"), kubelet.join("pod-b/mount"));
    let tb2 = kubelet.join("pod-b2/mount");
    for d in [&sa, &sb] {
        std::fs::create_dir_all(d).unwrap();
    }
    for t in [&ta, &tb, &tb2] {
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    }
    stage_and_publish(&h, &a, &sa, &ta).await;
    stage_and_publish(&h, &b, &sb, &tb).await;
    h.node
        .node_publish_volume(Request::new(publish_req(&b, &sb, &tb2, true)))
        .await
        .unwrap();

    // The reboot; kubelet removed pod a's directory meanwhile.
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    std::fs::remove_dir_all(kubelet.join("pod-a")).unwrap();
    std::fs::remove_dir(&sa).unwrap();
    unpublish_as_kubelet(&h, &a, &ta).await.unwrap();
    unstage_as_kubelet(&h, &a, &sa).await.unwrap();
    delete(&h, &a).await;
    // b: stage and publish again at the same paths.
    stage_and_publish(&h, &b, &sb, &tb).await;
    let stats = |p: &std::path::Path| csi::NodeGetVolumeStatsRequest {
        volume_id: b.clone(),
        volume_path: p.display().to_string(),
        staging_target_path: sb.display().to_string(),
    };
    let st = h
        .node
        .node_get_volume_stats(Request::new(stats(&tb)))
        .await
        .unwrap()
        .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            h.node
                .node_get_volume_stats(Request::new(stats(&tb2)))
                .await
        ),
        Code::NotFound
    );
    // The read-only target of before, never published again.
    unpublish_as_kubelet(&h, &b, &tb2).await.unwrap();
    assert!(!tb2.exists());
    unpublish_as_kubelet(&h, &b, &tb).await.unwrap();
    unstage_as_kubelet(&h, &b, &sb).await.unwrap();
    delete(&h, &b).await;
    assert!(h
        .fake()
        .table()
        .iter()
        .all(|m| !m.mount_point.starts_with(h.dir.path())));
}

#[tokio::test]
async fn interrupted_operations_are_reconciled_at_start() {
    use berth::state::Phase;
    let h = fake(&[]);
    let creating = create(&h, "creating", 1).await.volume_id;
    let deleting = create(&h, "deleting", 1).await.volume_id;
    let ready = create(&h, "ready", 1).await.volume_id;
    let mut r = h.driver.store.get(&creating).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Creating).unwrap();
    let mut r = h.driver.store.get(&deleting).unwrap();
    h.driver.store.set_phase(&mut r, Phase::Deleting).unwrap();
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    assert!(h.driver.store.get(&creating).is_none());
    assert!(h.driver.store.get(&deleting).is_none());
    assert!(!h.path("local").join(&creating).exists());
    assert!(!h.path("local").join(&deleting).exists());
    assert!(h.path("local").join(&ready).is_dir());
    // The CO's retry of the interrupted create makes it again.
    let v = create(&h, "creating", 1).await;
    assert!(h.path("local").join(&v.volume_id).is_dir());
}

/// Records whose ids are not ids of their kind (forged into the journal
/// with valid checksums: a path in the id, another kind's id, a control
/// character) are damage: berth starts and serves the rest, but never
/// acts on them (no delete retried at start-up or every minute, nothing
/// looked at or touched under their ids, not listed, not found), keeps
/// them in the journal (through a compaction too), and `state check`
/// reports each as an error. Before, start-up and every minute retried
/// the "interrupted delete" of `local-../../victim` with an error each
/// time, ListVolumes listed them, and check reported only a warning.
#[tokio::test]
async fn records_whose_ids_are_not_of_their_kind_are_damage_never_acted_on() {
    use berth::state::Phase;
    let h = fake(&[]);
    let real = create(&h, "real", 1 << 20).await.volume_id;
    let snap = snapshot_id(&h, "snap", &real).await;
    let template = h.driver.store.get(&real).unwrap();
    let snap_template = h.driver.store.snapshot_get(&snap).unwrap();
    let dir = h.stop();
    std::fs::create_dir(dir.path().join("victim")).unwrap();
    std::fs::write(dir.path().join("victim/file"), b"precious").unwrap();
    let forged = |id: &str, phase: Phase, seq: u64| berth::state::VolumeRecord {
        id: id.into(),
        name: format!("forged-{seq}"),
        phase,
        seq,
        ..template.clone()
    };
    let other_kind = format!("block-{}", &real["local-".len()..]);
    let vols = [
        forged("local-../../victim", Phase::Deleting, 100),
        forged("local-../victim", Phase::Creating, 101),
        forged(&other_kind, Phase::Deleting, 102),
        forged("local-0123\u{7}", Phase::Ready, 103),
    ];
    let snaps = [berth::state::SnapshotRecord {
        id: "local-snap-../../victim".into(),
        name: "forged-snap".into(),
        phase: Phase::Deleting,
        seq: 100,
        ..snap_template
    }];
    forge_records(dir.path(), &vols, &snaps);

    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &[]);
    for r in &vols {
        assert!(h.driver.store.get(&r.id).is_none(), "{:?} is served", r.id);
    }
    assert!(h.driver.store.snapshot_get(&snaps[0].id).is_none());
    let listed: Vec<String> = h
        .ctl
        .list_volumes(Request::new(Default::default()))
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert_eq!(listed, std::slice::from_ref(&real));
    for _ in 0..3 {
        retry_pending_and_wait(&h).await;
    }
    let touched: Vec<String> = h
        .fake()
        .lstats()
        .into_iter()
        .chain(h.fake().file_ops().into_iter().map(|o| o.path))
        .map(|p| p.display().to_string())
        .filter(|p| p.contains("victim") || p.contains(&other_kind))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    assert_eq!(
        std::fs::read(h.path("victim/file")).unwrap(),
        b"precious".to_vec()
    );
    // `state check`: an error for each, naming it.
    let (clean, out) = state_check(&h);
    assert!(!clean, "{out}");
    for id in vols.iter().map(|r| &r.id).chain([&snaps[0].id]) {
        assert!(
            out.lines()
                .any(|l| l.starts_with("error:") && l.contains(&format!("{id:?}"))),
            "{id:?} not reported as an error:\n{out}"
        );
    }
    // The rest of the state works.
    let new = create(&h, "new", 1 << 20).await.volume_id;
    delete(&h, &new).await;
    assert!(h.driver.store.get(&real).is_some());
    // Kept, through a compaction too.
    assert!(h.driver.store.checkpoint(0).unwrap());
    let dir = h.stop();
    let scan =
        berth::state::journal::scan(&berth::os::RealFiles, &dir.path().join("state/journal"))
            .unwrap();
    assert!(scan.damage.is_empty(), "{:?}", scan.damage);
    for r in &vols {
        assert!(scan.records.contains_key(&r.id), "{:?} was dropped", r.id);
    }
    assert!(scan.snapshots.contains_key(&snaps[0].id));
    // And still never acted on after that restart.
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &[]);
    assert!(h.driver.store.get(&vols[0].id).is_none());
    assert!(h.driver.store.get(&real).is_some());
}

/// A local volume whose record says its create never answered
/// (`Creating`) but whose directory is in place (a create moves it there
/// only once its record says Ready: the record lost its Ready) is kept
/// aside in `.orphaned/` when it holds anything, never deleted; `state
/// check` names it first. An empty one is rolled back as before.
#[tokio::test]
async fn rollback_of_an_unanswered_create_keeps_a_directory_that_holds_data() {
    let h = fake(&[]);
    let used = create(&h, "used", 1).await.volume_id;
    let blank = create(&h, "blank", 1).await.volume_id;
    std::fs::write(h.path("local").join(&used).join("data"), b"tenant a").unwrap();
    unanswered_and_checked(&h, &used, &blank);
    let dir = h.stop();

    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &[]);
    let local = h.path("local");
    for id in [&used, &blank] {
        assert!(h.driver.store.get(id).is_none(), "{id} was not rolled back");
        assert!(!local.join(id).exists());
    }
    let aside = local.join(".orphaned");
    assert_eq!(
        std::fs::read(aside.join(&used).join("data")).unwrap(),
        b"tenant a"
    );
    let names: Vec<_> = std::fs::read_dir(&aside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from(&used)]);
}

#[tokio::test]
async fn orphans_and_trash_are_reconciled_at_start() {
    let h = fake(&[]);
    let keep = create(&h, "keep", 1).await.volume_id;
    let local = h.path("local");
    // A crash after mkdir, before the record: creates make their
    // directories under .creating/, where start-up removes them.
    let empty = local.join(".creating/local-0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&empty).unwrap();
    // An empty directory in the root without a record: a volume whose
    // record was lost (never made so by a create): kept aside too.
    let lost = local.join("local-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    std::fs::create_dir(&lost).unwrap();
    // A directory with data but no record (e.g. state restored from an old
    // backup): kept aside, never deleted.
    let full = local.join("local-fedcba9876543210fedcba9876543210");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("data"), b"precious").unwrap();
    // A delete interrupted after the rename into the trash.
    std::fs::create_dir_all(local.join(".trash/local-x-1/sub")).unwrap();
    // Something else an admin put there is left alone.
    std::fs::create_dir(local.join("not-ours")).unwrap();
    // Storage without a record stops start-up (nothing moved) until the
    // operator says the records are gone for good.
    let fresh = || {
        let (os, f) = berth::os::Os::fake();
        (os, Some(f))
    };
    let h = h.restart_past_lost_records("local-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &fresh, &[]);
    let local = h.path("local");
    assert!(local.join(&keep).is_dir());
    assert!(!empty.exists());
    assert!(!lost.exists());
    assert!(local
        .join(".orphaned/local-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        .is_dir());
    assert!(!local
        .join("local-fedcba9876543210fedcba9876543210")
        .exists());
    assert_eq!(
        std::fs::read(local.join(".orphaned/local-fedcba9876543210fedcba9876543210/data")).unwrap(),
        b"precious"
    );
    assert_eq!(std::fs::read_dir(local.join(".trash")).unwrap().count(), 0);
    assert!(local.join("not-ours").is_dir());
    // The same name again: the earlier orphan is kept as it is (the rename
    // failed, and start-up with it).
    let full = local.join("local-fedcba9876543210fedcba9876543210");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("data"), b"second").unwrap();
    // And a volume whose delete set it aside in the trash but could not
    // remove its record: it comes back.
    std::fs::rename(local.join(&keep), local.join(format!(".trash/{keep}-5"))).unwrap();
    let h = h.restart_past_lost_records("local-fedcba9876543210fedcba9876543210", &fresh, &[]);
    let local = h.path("local");
    assert!(local.join(&keep).is_dir(), "the volume was not put back");
    // Moved into the trash by hand under its own name (no `-<time>`): its
    // record is there, so it comes back with its data, never emptied.
    std::fs::write(local.join(&keep).join("data"), b"mine").unwrap();
    std::fs::rename(local.join(&keep), local.join(".trash").join(&keep)).unwrap();
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    let local = h.path("local");
    assert_eq!(
        std::fs::read(local.join(&keep).join("data")).unwrap(),
        b"mine"
    );
    assert_eq!(
        std::fs::read(local.join(".orphaned/local-fedcba9876543210fedcba9876543210/data")).unwrap(),
        b"precious"
    );
    assert_eq!(
        std::fs::read(local.join(".orphaned/local-fedcba9876543210fedcba9876543210.1/data"))
            .unwrap(),
        b"second"
    );
    assert!(local.join(&keep).is_dir(), "the volume was not put back");
}

/// `.trash`, `.creating` and `.snapshots`, whose contents start-up removes,
/// replaced by symlinks to a directory outside the root: start-up removes
/// nothing there (it removed every subdirectory of the target).
#[tokio::test]
async fn start_up_never_empties_what_a_symlinked_trash_leads_to() {
    let h = fake(&[]);
    let keep = create(&h, "keep", 1).await.volume_id;
    let local = h.path("local");
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path();
    for sub in [
        "precious",
        "local-0123456789abcdef0123456789abcdef",
        ".partial-x",
    ] {
        std::fs::create_dir_all(o.join(sub)).unwrap();
        std::fs::write(o.join(sub).join("data"), b"keep me").unwrap();
    }
    for name in [".trash", ".creating", ".snapshots"] {
        let p = local.join(name);
        if p.exists() {
            // `.creating` holds the spare directories made after the
            // create.
            std::fs::remove_dir_all(&p).unwrap();
        }
        std::os::unix::fs::symlink(o, &p).unwrap();
    }
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    for sub in [
        "precious",
        "local-0123456789abcdef0123456789abcdef",
        ".partial-x",
    ] {
        assert_eq!(
            std::fs::read(o.join(sub).join("data")).unwrap(),
            b"keep me",
            "{sub} outside the root was touched"
        );
    }
    assert!(h.path("local").join(&keep).is_dir());
}

/// A local volume's directory is made under .creating/ and durable there,
/// with its entry, before the record that says Ready is written; only then
/// is it moved into the root.
#[tokio::test]
async fn a_local_directory_is_synced_before_its_record_says_ready() {
    let h = fake(&[]);
    let f = h.fake();
    f.clear_file_ops();
    let id = create(&h, "a", 1).await.volume_id;
    let dir = h.path("local/.creating").join(&id);
    let ops: Vec<(&str, std::path::PathBuf)> =
        f.file_ops().into_iter().map(|o| (o.op, o.path)).collect();
    let at = |op: &str, p: &std::path::Path| {
        ops.iter()
            .position(|(o, q)| *o == op && q == p)
            .unwrap_or_else(|| panic!("no {op} of {} in {ops:?}", p.display()))
    };
    let log = h.path("state/journal/log-0.jsonl");
    let ready = at("write", &log);
    assert!(at("mkdir", &dir) < at("fsync", &dir));
    assert!(at("fsync", &dir) < ready);
    assert!(at("fsync", &h.path("local/.creating")) < ready);
    assert!(ready < at("rename", &dir));
    assert!(h.path("local").join(&id).is_dir());
}

#[tokio::test]
async fn an_abandoned_call_still_finishes_and_holds_its_guard_until_done() {
    let h = fake(&[]);
    let marker = h.path("done");
    let m = marker.clone();
    let guard = h.driver.locks.try_lock(vol_key("slow")).unwrap();
    // The client gives up after 20 ms; the operation takes 300 ms.
    let call = h.driver.run(guard, move |_| {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(&m, b"finished").map_err(|e| berth::error::Error::io("marker", e))
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(20), call)
            .await
            .is_err()
    );
    // Still running: a retry is told so instead of racing it.
    assert!(h.driver.locks.try_lock(vol_key("slow")).is_err());
    assert!(!marker.exists());
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(std::fs::read(&marker).unwrap(), b"finished");
    assert!(h.driver.locks.try_lock(vol_key("slow")).is_ok());
}

/// A stage whose mount fails removes the staging directory it created; one
/// the CO made stays.
#[tokio::test]
async fn a_failed_stage_leaves_no_staging_directory_behind() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let staging = h.path("stage");
    h.fake().fail_next("bind", libc::EPERM);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::Internal);
    assert!(
        !staging.exists(),
        "the staging directory the driver made is removed"
    );
    std::fs::create_dir(&staging).unwrap();
    h.fake().fail_next("bind", libc::EPERM);
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::Internal);
    assert!(staging.is_dir());
}

#[tokio::test]
async fn a_failed_publish_leaves_no_target_behind() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.fake().fail_next("bind", libc::EPERM);
    let r = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await;
    assert_eq!(code(r), Code::Internal);
    assert!(!target.exists(), "the target the driver created is removed");
    // A target the CO made itself is left in place.
    std::fs::create_dir(&target).unwrap();
    h.fake().fail_next("bind", libc::EPERM);
    let r = h
        .node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await;
    assert_eq!(code(r), Code::Internal);
    assert!(target.is_dir());
}

// ------------------------------------------------------------ node by path

fn unstage_req(id: &str, staging: &std::path::Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

fn unpublish_req(id: &str, target: &std::path::Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn mounted_at(h: &Harness, p: &std::path::Path) -> usize {
    h.fake()
        .table()
        .iter()
        .filter(|m| m.mount_point == p)
        .count()
}

/// Without a record (the volume deleted from under the node, the state
/// lost) NodeUnpublishVolume and NodeUnstageVolume work from the paths:
/// they unmount, remove what Berth made and answer OK (unstage still
/// refuses while the volume is published); so does unpublish of an id no
/// served kind has.
#[tokio::test]
async fn unpublish_and_unstage_without_a_record_work_from_the_paths() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "gone").await;
    let t = h.path("t");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &t, false)))
        .await
        .unwrap();
    h.driver.store.remove(&id).unwrap();
    let r = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "still published");
    for _ in 0..2 {
        h.node
            .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
            .await
            .unwrap();
        h.node
            .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
            .await
            .unwrap();
    }
    assert_eq!((mounted_at(&h, &t), mounted_at(&h, &staging)), (0, 0));
    assert!(!t.exists());
    // An id of no served kind: what is mounted at the target goes too.
    let t2 = h.path("t2");
    std::fs::create_dir(&t2).unwrap();
    let src = h.path("src");
    std::fs::create_dir(&src).unwrap();
    use berth::os::Mounter;
    h.fake().bind(&src, &t2, Default::default()).unwrap();
    h.node
        .node_unpublish_volume(Request::new(unpublish_req("not-a-berth-id", &t2)))
        .await
        .unwrap();
    assert_eq!(mounted_at(&h, &t2), 0);
    assert!(!t2.exists());
}

/// Staging and target paths under a symlinked parent: the mount table
/// shows resolved paths, so mounts are matched by mount id: a repeated
/// stage or publish adds no mount, and unpublish and unstage unmount.
#[tokio::test]
async fn paths_under_a_symlinked_parent_are_matched_by_mount_id() {
    let h = fake(&[]);
    let real = h.path("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, h.path("link")).unwrap();
    let id = create(&h, "sym", 1 << 20).await.volume_id;
    let (staging, t) = (h.path("link/s"), h.path("link/t"));
    for _ in 0..2 {
        stage_and_publish(&h, &id, &staging, &t).await;
    }
    assert_eq!(mounted_at(&h, &real.join("s")), 1);
    assert_eq!(mounted_at(&h, &real.join("t")), 1);
    let r = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "still published");
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &t)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(mounted_at(&h, &real.join("s")), 0);
    assert_eq!(mounted_at(&h, &real.join("t")), 0);
}

/// A local root that holds none of the volumes recorded for it (a changed
/// --local-root, a data disk not mounted yet at boot) stops start-up before
/// anything is changed, with a message that names the root, the volumes and
/// the way out; --allow-missing-storage starts anyway (the volumes report
/// their storage missing); a root that lacks only some of its volumes
/// starts.
#[tokio::test]
async fn a_local_root_holding_none_of_its_volumes_stops_start_up() {
    use berth::config::Cli;
    use berth::driver::Driver;
    use berth::os::Os;
    use clap::Parser;
    let h = fake(&[]);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create(&h, &format!("v{i}"), 1 << 20).await.volume_id);
    }
    let dir = h.stop();
    let journal = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d.join("state/journal"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (p.clone(), std::fs::read(&p).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let before = journal(dir.path());
    let other = dir.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let open = |extra: &[&str]| {
        let mut a = vec!["--local-root", other.to_str().unwrap()];
        a.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args(dir.path(), &a)).unwrap();
        Driver::new(cli.config, Os::fake().0)
    };
    let msg = match open(&[]) {
        Ok(_) => panic!("berth started on a local root that holds none of its volumes"),
        Err(e) => e.to_string(),
    };
    for want in [
        "holds none of the 3 volumes",
        other.to_str().unwrap(),
        "--local-root",
        "--allow-missing-storage",
    ] {
        assert!(msg.contains(want), "{want:?} not in: {msg}");
    }
    assert!(ids.iter().any(|id| msg.contains(id.as_str())), "{msg}");
    // Nothing changed: the records, the volumes' directories, the other root.
    assert_eq!(journal(dir.path()), before);
    for id in &ids {
        assert!(dir.path().join("local").join(id).is_dir(), "{id}");
    }
    let made: Vec<_> = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".berth.lock")
        .collect();
    assert!(made.is_empty(), "{made:?}");

    // Told that the storage is gone for good: starts, and says so per volume.
    let d = open(&["--allow-missing-storage"]).expect("allowed");
    assert_eq!(d.store.len(), 3);
    drop(d);

    // The right root again; then one directory removed by hand: starts.
    let h = build(dir, Os::fake().0, None, &[]);
    std::fs::remove_dir(h.path("local").join(&ids[0])).unwrap();
    let h = h.restart(Os::fake().0, None);
    let v = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: ids[0].clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(v.status.unwrap().volume_condition.unwrap().abnormal);
}

/// The mirror of the guard above: a state directory with no record of a
/// local volume beside a local root that holds volumes (another
/// --state-dir, the journal removed by hand) stops start-up before anything
/// is moved, naming the way out; --allow-missing-storage starts and keeps
/// every directory aside in .orphaned, empty or not, never deleted. A
/// directory left under .creating/ by a create that never said Ready
/// stops nothing.
#[tokio::test]
async fn a_state_without_records_beside_a_full_root_stops_start_up() {
    use berth::os::Os;
    use clap::Parser;
    let h = fake(&[]);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create(&h, &format!("v{i}"), 1 << 20).await.volume_id);
    }
    std::fs::write(h.path("local").join(&ids[0]).join("data"), b"kept").unwrap();
    let dir = h.stop();
    std::fs::remove_dir_all(dir.path().join("state/journal")).unwrap();
    let open = |extra: &[&str]| {
        let cli = berth::config::Cli::try_parse_from(args(dir.path(), extra)).unwrap();
        berth::driver::Driver::new(cli.config, Os::fake().0)
    };
    let msg = match open(&[]) {
        Ok(_) => panic!("berth started with no records beside a root of volumes"),
        Err(e) => e.to_string(),
    };
    for want in [
        "no record",
        "3 volumes",
        "--state-dir",
        "--allow-missing-storage",
    ] {
        assert!(msg.contains(want), "{want:?} not in: {msg}");
    }
    for id in &ids {
        assert!(dir.path().join("local").join(id).is_dir(), "{id} moved");
    }
    let d = open(&["--allow-missing-storage"]).expect("allowed");
    assert_eq!(d.store.len(), 0);
    drop(d);
    for id in &ids {
        assert!(
            dir.path().join("local/.orphaned").join(id).is_dir(),
            "{id} not kept aside"
        );
    }
    assert_eq!(
        std::fs::read(
            dir.path()
                .join("local/.orphaned")
                .join(&ids[0])
                .join("data")
        )
        .unwrap(),
        b"kept"
    );
    // An unfinished create's directory is no reason to stop.
    let unfinished = dir
        .path()
        .join("local/.creating/local-0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&unfinished).unwrap();
    let d = open(&[]).expect("an unfinished create stops nothing");
    drop(d);
    assert!(!unfinished.exists());
}

/// A move into place that fails after the record said Ready fails the
/// call; the CO's retry finishes it and answers OK with the same volume.
#[tokio::test]
async fn a_failed_move_into_place_is_finished_by_the_retry() {
    let h = fake(&[]);
    h.fake().fail_next("rename", libc::EIO);
    let r = h
        .ctl
        .create_volume(Request::new(create_req("a", 1 << 20)))
        .await;
    assert_eq!(code(r), Code::Internal);
    let v = create(&h, "a", 1 << 20).await;
    assert!(h.path("local").join(&v.volume_id).is_dir());
    assert!(!h.path("local/.creating").join(&v.volume_id).exists());
}

/// The state directory and the roots must be apart: a root inside the
/// state directory (or the other way round, also through `..` or a
/// symlink), two kinds on one root, a root at /, in a system directory or
/// at a directory the host shares is refused before anything is made.
#[test]
fn overlapping_directories_are_refused() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    std::os::unix::fs::symlink("/etc", d.join("to-etc")).unwrap();
    std::os::unix::fs::symlink(&state, d.join("to-state")).unwrap();
    for extra in [
        vec![
            "--local-root".to_string(),
            state.join("v").display().to_string(),
        ],
        vec![
            "--state-dir".to_string(),
            d.join("local/s").display().to_string(),
        ],
        vec![
            "--kinds".into(),
            "local,block".into(),
            "--block-root".into(),
            d.join("local").display().to_string(),
        ],
        vec!["--local-root".into(), "/".into()],
        vec!["--local-root".into(), "/etc/berth".into()],
        vec!["--state-dir".into(), "/proc/self/berth".into()],
        vec!["--local-root".into(), "/tmp".into()],
        vec!["--local-root".into(), "/var/lib/kubelet/".into()],
        vec![
            "--local-root".to_string(),
            d.join("to-etc/berth").display().to_string(),
        ],
        vec![
            "--local-root".to_string(),
            d.join("to-state/v").display().to_string(),
        ],
        vec![
            "--local-root".to_string(),
            d.join("local/../state/v").display().to_string(),
        ],
        vec![
            "--local-root".to_string(),
            d.join("nothing/../../..").display().to_string(),
        ],
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cli = berth::config::Cli::try_parse_from(args(d, &extra)).unwrap();
        let r = berth::driver::Driver::new(cli.config, berth::os::Os::fake().0);
        let e = match r {
            Ok(_) => panic!("{extra:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("overlap")
                || e.contains("must not be /")
                || e.contains("system directory")
                || e.contains("the whole host shares"),
            "{extra:?}: {e}"
        );
    }
    assert!(!state.exists(), "nothing made");
    assert!(!d.join("local").exists(), "nothing made");
}

/// A create interrupted after its record said Ready but before its
/// directory was moved out of .creating/ is finished at start-up: the
/// volume is where it belongs, with what it holds.
#[tokio::test]
async fn a_ready_volume_left_under_creating_is_moved_into_place() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let local = h.path("local");
    assert!(local.join(&id).is_dir());
    assert!(!local.join(".creating").join(&id).exists());
    std::fs::rename(local.join(&id), local.join(".creating").join(&id)).unwrap();
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    assert!(h.path("local").join(&id).is_dir());
    assert!(!h.path("local/.creating").join(&id).exists());
    assert!(!h.path("local/.orphaned").exists());
}

// ------------------------------------------- Node paths and whose mount it is

/// Berth's own directories are never a node RPC's path: a target or staging
/// path in (or above) the state directory or a root is INVALID_ARGUMENT
/// for publish, stage, unpublish and unstage alike, and nothing there is
/// mounted or removed (the journal, the lock and a volume's directory stay).
#[tokio::test]
async fn node_paths_in_berths_own_directories_are_invalid_and_touch_nothing() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let other = create(&h, "b", 1 << 20).await.volume_id;
    let before = std::fs::read_dir(h.path("state")).unwrap().count();
    let vol_dir = h.path("local").join(&other);
    let targets = [
        h.path("state"),
        h.path("state").join(".berth.lock"),
        vol_dir.clone(),
        h.path("local"),
        h.dir.path().to_path_buf(),
    ];
    h.fake().clear_calls();
    for t in &targets {
        let r = h
            .node
            .node_unpublish_volume(Request::new(unpublish_req(&id, t)))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "unpublish {}", t.display());
        let r = h
            .node
            .node_publish_volume(Request::new(publish_req(&id, &staging, t, false)))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "publish {}", t.display());
        let r = h
            .node
            .node_stage_volume(Request::new(stage_req(&other, t)))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "stage {}", t.display());
        let r = h
            .node
            .node_unstage_volume(Request::new(unstage_req(&other, t)))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "unstage {}", t.display());
    }
    assert!(h.fake().calls().is_empty(), "{:?}", h.fake().calls());
    assert!(vol_dir.is_dir());
    assert_eq!(std::fs::read_dir(h.path("state")).unwrap().count(), before);
    // A symlink to the state directory does not get around it.
    let link = h.path("link");
    std::os::unix::fs::symlink(h.path("state"), &link).unwrap();
    let r = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &link.join("x"))))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
}

/// NodeUnpublishVolume removes only what it unmounted or an empty
/// directory: a file that nothing was mounted on stays.
#[tokio::test]
async fn unpublish_never_removes_a_file_nothing_was_mounted_on() {
    let h = fake(&[]);
    let (id, _staging) = staged(&h, "a").await;
    let f = h.path("precious");
    std::fs::write(&f, b"data").unwrap();
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &f)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
    // Also with an id no kind knows.
    h.node
        .node_unpublish_volume(Request::new(unpublish_req("x", &f)))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
}

/// Another volume's mounts are not this volume's to unmount: NodeUnpublish
/// and NodeUnstage with volume A's id at volume B's target or staging path
/// are FAILED_PRECONDITION, and B stays mounted (B's own guard was never
/// taken, so nothing of B may change).
#[tokio::test]
async fn unpublish_and_unstage_refuse_another_volumes_mounts() {
    let h = fake(&[]);
    let (a, _sa) = staged(&h, "a").await;
    let (b, sb) = staged(&h, "b").await;
    let tb = h.path("tb");
    h.node
        .node_publish_volume(Request::new(publish_req(&b, &sb, &tb, false)))
        .await
        .unwrap();
    let r = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(&a, &tb)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    let r = h
        .node
        .node_unpublish_volume(Request::new(unpublish_req(&a, &sb)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    let r = h
        .node
        .node_unstage_volume(Request::new(unstage_req(&a, &sb)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!((mounted_at(&h, &tb), mounted_at(&h, &sb)), (1, 1));
    assert!(tb.is_dir());
    // B's own id unpublishes and unstages as ever.
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&b, &tb)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&b, &sb)))
        .await
        .unwrap();
    assert_eq!((mounted_at(&h, &tb), mounted_at(&h, &sb)), (0, 0));
}

/// A repeat of NodePublishVolume at the same target asking for other mount
/// flags is ALREADY_EXISTS (the mount keeps the flags it has), in both
/// directions; the same flags again are OK.
#[tokio::test]
async fn republish_with_other_mount_flags_is_already_exists() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let with = |flags: &[&str]| {
        let mut r = publish_req(&id, &staging, &h.path("t"), false);
        r.volume_capability = Some(mount_cap_flags(Mode::SingleNodeWriter, flags));
        r
    };
    h.node
        .node_publish_volume(Request::new(with(&[])))
        .await
        .unwrap();
    let r = h
        .node
        .node_publish_volume(Request::new(with(&["noexec", "nosuid"])))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    h.node
        .node_publish_volume(Request::new(with(&[])))
        .await
        .unwrap();
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &h.path("t"))))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(with(&["noexec", "nosuid"])))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(with(&["noexec", "nosuid"])))
        .await
        .unwrap();
    let r = h.node.node_publish_volume(Request::new(with(&[]))).await;
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(mounted_at(&h, &h.path("t")), 1);
}

/// A volume is staged at one path at a time: NodeStageVolume at a second
/// path is FAILED_PRECONDITION and mounts nothing, so the volume can always
/// be unstaged (two staging paths would each count the other as a
/// publication).
#[tokio::test]
async fn a_second_staging_path_is_failed_precondition() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let s2 = h.path("stage-2");
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &s2)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(mounted_at(&h, &s2), 0);
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &s2)))
        .await
        .unwrap();
    assert_eq!(mounted_at(&h, &s2), 1);
}

/// An operator's `umount` of the staging path while a pod still uses the
/// volume (or `umount -l`, or the directory removed after it): kubelet
/// stages again at the same path after its restart and retries forever.
/// That stage re-makes the staging mount (the publications are this
/// volume's own, from this staging path), and the pod's teardown then
/// finishes; another staging path is still refused while the volume is
/// mounted, before and after. Before, every re-stage was
/// FAILED_PRECONDITION ("already mounted at <target>") until the pod went.
#[tokio::test]
async fn a_staging_mount_taken_off_by_hand_is_staged_again() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    // Known across a restart (the fake's mount table is the kernel's).
    let f = h.fake.clone().unwrap();
    let h = h.restart(berth::os::Os::on_fake(&f), Some(f));
    for remove_dir in [false, true] {
        h.driver.os.mounter.unmount(&staging).unwrap();
        if remove_dir {
            std::fs::remove_dir(&staging).unwrap();
            std::fs::create_dir(&staging).unwrap();
        }
        assert_eq!(mounted_at(&h, &staging), 0);
        let other = h.path("stage-other");
        let r = h
            .node
            .node_stage_volume(Request::new(stage_req(&id, &other)))
            .await;
        assert_eq!(code(r), Code::FailedPrecondition, "a second staging path");
        assert_eq!(mounted_at(&h, &other), 0);
        for _ in 0..2 {
            h.node
                .node_stage_volume(Request::new(stage_req(&id, &staging)))
                .await
                .unwrap();
            h.node
                .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
                .await
                .unwrap();
        }
        assert_eq!((mounted_at(&h, &staging), mounted_at(&h, &target)), (1, 1));
    }
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &target)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!((mounted_at(&h, &staging), mounted_at(&h, &target)), (0, 0));
    // Unstaged: the path is forgotten. The volume mounted by someone else
    // at that path's old publication no longer lets a stage there through.
    let by_hand = h.path("by-hand");
    std::fs::create_dir(&by_hand).unwrap();
    h.driver
        .os
        .mounter
        .bind(
            &h.path("local").join(&id),
            &by_hand,
            berth::os::MountFlags::default(),
        )
        .unwrap();
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    h.driver.os.mounter.unmount(&by_hand).unwrap();
    delete(&h, &id).await;
    assert_eq!(h.driver.staged.path(&id), None);
}

/// A change to the staging-path record that could not be written (the
/// state filesystem full: ENOSPC) must not leave the old record to be read
/// back after a restart. Staged at P, the log fills up, unstaged at P and
/// staged at Q and published from there (each OK, the record only in
/// memory); after a restart, a stage at P took P for the volume's own
/// staging path and mounted it while the volume was staged at Q: two
/// staging paths, each unstage refused (each counted the other as a
/// publication) and DeleteVolume refused, for good. Now the log that a
/// change could not reach is removed: the stage at P is refused.
#[tokio::test]
async fn a_record_change_that_could_not_be_written_is_not_read_back() {
    let h = fake(&[]);
    let (id, p) = staged(&h, "a").await;
    h.fake()
        .fail_op_under("write", &h.path("state"), libc::ENOSPC);
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &p)))
        .await
        .unwrap();
    let q = h.path("stage-q");
    let target = h.path("target");
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &q)))
        .await
        .unwrap();
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &q, &target, false)))
        .await
        .unwrap();
    h.fake().clear_file_faults();
    let f = h.fake.clone().unwrap();
    let h = h.restart(berth::os::Os::on_fake(&f), Some(f));
    let r = h
        .node
        .node_stage_volume(Request::new(stage_req(&id, &p)))
        .await;
    assert_eq!(code(r), Code::FailedPrecondition, "a second staging path");
    assert_eq!(mounted_at(&h, &p), 0);
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &target)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &q)))
        .await
        .unwrap();
    assert_eq!((mounted_at(&h, &q), mounted_at(&h, &target)), (0, 0));
    delete(&h, &id).await;
}

/// A published volume's directory removed (or moved away) by hand and made
/// again (`rm -rf <root>/<id>; mkdir <root>/<id>`): the pod's teardown
/// finishes; the empty directory born after the volume is handed out by
/// the next NodeStage (an empty volume's directory copied to another
/// filesystem looks the same, and must not strand its pods), but the
/// volume's condition is abnormal saying what happened and what to do, and
/// `state check` warns; before, nothing told. The volume's own directory
/// put back, or this one taken for it by the operator (the extended
/// attribute), is normal again; a late directory that holds data
/// (restored from a backup) is not reported.
/// The volume's condition as ControllerGetVolume reports it.
async fn condition_of(h: &Harness, id: &str) -> csi::VolumeCondition {
    h.ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
}

#[tokio::test]
async fn a_volume_directory_made_again_by_hand_is_reported() {
    let h = fake(&[]);
    let (id, staging) = staged(&h, "a").await;
    let target = h.path("target");
    h.node
        .node_publish_volume(Request::new(publish_req(&id, &staging, &target, false)))
        .await
        .unwrap();
    let dir = h.path("local").join(&id);
    let saved = h.path("saved");
    std::fs::rename(&dir, &saved).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    h.fake().set_born(&dir, later);
    h.node
        .node_unpublish_volume(Request::new(unpublish_req(&id, &target)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    assert_eq!(mounted_at(&h, &staging), 1);
    let cond = condition_of(&h, &id).await;
    assert!(
        cond.abnormal
            && cond.message.contains("may not be the one Berth made")
            && cond.message.contains("setfattr"),
        "{cond:?}"
    );
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    let (ok, report) = state_check(&h);
    assert!(
        ok && report.contains(&id) && report.contains("may not be the one Berth made"),
        "{report}"
    );
    let reported = |h: &Harness| state_check(h).1.contains("may not be the one Berth made");
    // Data in it (restored from a backup): not reported.
    std::fs::write(dir.join("restored"), b"x").unwrap();
    assert!(!condition_of(&h, &id).await.abnormal && !reported(&h));
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
    h.node
        .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
        .await
        .unwrap();
    std::fs::remove_file(dir.join("restored")).unwrap();
    if is_root() {
        // Taken for the volume by the operator.
        xattr::set(&dir, "trusted.berth.volume", id.as_bytes()).unwrap();
        assert!(!condition_of(&h, &id).await.abnormal && !reported(&h));
        h.node
            .node_stage_volume(Request::new(stage_req(&id, &staging)))
            .await
            .unwrap();
        h.node
            .node_unstage_volume(Request::new(unstage_req(&id, &staging)))
            .await
            .unwrap();
        xattr::remove(&dir, "trusted.berth.volume").unwrap();
    }
    // The volume's own directory put back.
    std::fs::remove_dir(&dir).unwrap();
    std::fs::rename(&saved, &dir).unwrap();
    h.fake().set_born(&dir, std::time::SystemTime::now());
    assert!(!condition_of(&h, &id).await.abnormal && !reported(&h));
    h.node
        .node_stage_volume(Request::new(stage_req(&id, &staging)))
        .await
        .unwrap();
}

/// A published volume's directory moved away by hand (out of the root, or
/// beside it and made again): the mounts follow the move. NodeUnpublish and
/// NodeUnstage of the volume take them down (its recorded staging path
/// shows the moved directory), those of other volumes made before and
/// after it are refused, a re-stage says what happened instead of
/// ALREADY_EXISTS, and DeleteVolume waits for the mounts; before, the
/// volume's own teardown was refused forever, and DeleteVolume of the
/// volume moved out of the root removed the record under its mounts.
#[tokio::test]
async fn a_volume_directory_moved_away_by_hand_strands_no_pod() {
    let h = fake(&[]);
    let (before, s_before) = staged(&h, "before").await;
    let root = h.path("local");
    for beside in [false, true] {
        let (a, sa) = staged(&h, &format!("a-{beside}")).await;
        let ta = h.path(&format!("t-{beside}"));
        h.node
            .node_publish_volume(Request::new(publish_req(&a, &sa, &ta, false)))
            .await
            .unwrap();
        let (after, s_after) = staged(&h, &format!("after-{beside}")).await;
        let moved = if beside {
            root.join(format!("{a}.old"))
        } else {
            h.path(&format!("elsewhere-{beside}"))
        };
        std::fs::rename(root.join(&a), &moved).unwrap();
        h.fake().follow_rename(&root.join(&a), &moved);
        if beside {
            std::fs::create_dir(root.join(&a)).unwrap();
        } else {
            let e = try_delete(&h, &a).await.unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        }
        for other in [&before, &after] {
            let r = h
                .node
                .node_unpublish_volume(Request::new(unpublish_req(other, &ta)))
                .await;
            assert_eq!(code(r), Code::FailedPrecondition);
            let r = h
                .node
                .node_unstage_volume(Request::new(unstage_req(other, &sa)))
                .await;
            assert_eq!(code(r), Code::FailedPrecondition);
        }
        assert_eq!((mounted_at(&h, &ta), mounted_at(&h, &sa)), (1, 1));
        if beside {
            let e = h
                .node
                .node_stage_volume(Request::new(stage_req(&a, &sa)))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition);
            assert!(
                e.message().contains("moved away by hand"),
                "{}",
                e.message()
            );
        }
        for _ in 0..2 {
            h.node
                .node_unpublish_volume(Request::new(unpublish_req(&a, &ta)))
                .await
                .unwrap();
            h.node
                .node_unstage_volume(Request::new(unstage_req(&a, &sa)))
                .await
                .unwrap();
        }
        assert_eq!((mounted_at(&h, &ta), mounted_at(&h, &sa)), (0, 0));
        delete(&h, &a).await;
        h.node
            .node_unstage_volume(Request::new(unstage_req(&after, &s_after)))
            .await
            .unwrap();
    }
    h.node
        .node_unstage_volume(Request::new(unstage_req(&before, &s_before)))
        .await
        .unwrap();
}

/// The spare directories of `.creating` (every entry there, after creates
/// that finished).
fn spares_in(h: &Harness) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(h.path("local/.creating"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A local create takes a spare directory made ahead (empty, mode 0777,
/// flushed with its entry under `.creating/`, named by the new volume's
/// id): it writes its record and moves the directory into place, with no
/// directory made or flushed of its own.
#[tokio::test]
async fn a_local_create_takes_a_spare_made_ahead_and_flushes_only_its_record() {
    let h = fake(&[]);
    // None were ready: this create makes its own directory, then the
    // spares are made (in the caller here: the background thread is off
    // in tests).
    create(&h, "a", 1).await;
    let spares = spares_in(&h);
    assert_eq!(spares.len(), 16, "the default target: {spares:?}");
    let f = h.fake();
    f.clear_file_ops();
    let id = create(&h, "b", 1).await.volume_id;
    assert!(spares.contains(&id), "{id} is not one of the spares");
    let ops: Vec<(&str, std::path::PathBuf)> =
        f.file_ops().into_iter().map(|o| (o.op, o.path)).collect();
    let local = h.path("local");
    assert!(
        !ops.iter()
            .any(|(o, p)| matches!(*o, "mkdir" | "chmod" | "fsync") && p.starts_with(&local)),
        "{ops:?}"
    );
    let at = |op: &str, p: &std::path::Path| {
        ops.iter()
            .position(|(o, q)| *o == op && q == p)
            .unwrap_or_else(|| panic!("no {op} of {} in {ops:?}", p.display()))
    };
    assert!(
        at("write", &h.path("state/journal/log-0.jsonl"))
            < at("rename", &local.join(".creating").join(&id))
    );
    let dir = local.join(&id);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o777
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(spares_in(&h).len(), 15);
}

/// A spare id whose create made nothing goes back to the spares: a repeat
/// of an existing name takes none, and one refused for its size gives its
/// back. Eight creates after those take eight of the sixteen spares, and
/// leave eight (no refill: half are left).
#[tokio::test]
async fn a_spare_whose_create_made_nothing_goes_back() {
    let h = fake(&[]);
    create(&h, "a", 1).await;
    let spares = spares_in(&h);
    create(&h, "a", 1).await;
    let r = h
        .ctl
        .create_volume(Request::new(create_req("huge", i64::MAX / 2)))
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    assert!(h.driver.store.get_by_name("huge").is_none());
    assert_eq!(spares_in(&h), spares);
    for i in 0..8 {
        let id = create(&h, &format!("v{i}"), 1).await.volume_id;
        assert!(spares.contains(&id));
    }
    let left = spares_in(&h);
    assert_eq!(left.len(), 8, "{left:?}");
    assert!(left.iter().all(|s| spares.contains(s)));
}

/// A spare's volume whose move into place failed after its record said
/// Ready is moved by start-up; the spares left unused are removed.
#[tokio::test]
async fn start_up_places_a_ready_spare_and_removes_the_unused_ones() {
    let h = fake(&[]);
    create(&h, "a", 1).await;
    h.fake().fail_next("rename", libc::EIO);
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 1 << 20)))
        .await;
    assert_eq!(code(r), Code::Internal);
    let b = h
        .driver
        .store
        .get_by_name("b")
        .expect("b's record is Ready");
    assert!(h.path("local/.creating").join(&b.id).is_dir());
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    assert!(h.path("local").join(&b.id).is_dir());
    assert_eq!(spares_in(&h), Vec::<String>::new());
}

/// A spare that is not empty when its create comes (something was put
/// into `.creating` by hand) is never handed out: the create fails and
/// leaves no record; the next one takes another spare.
#[tokio::test]
async fn a_spare_that_is_not_empty_is_never_handed_out() {
    let h = fake(&[]);
    create(&h, "a", 1).await;
    let spares = spares_in(&h);
    for s in &spares {
        std::fs::write(h.path("local/.creating").join(s).join("planted"), b"x").unwrap();
    }
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 1 << 20)))
        .await;
    assert_eq!(code(r), Code::Internal);
    assert!(h.driver.store.get_by_name("b").is_none());
    let left = spares_in(&h);
    assert_eq!(left.len(), 15, "the create took one: {left:?}");
    for s in &left {
        std::fs::remove_file(h.path("local/.creating").join(s).join("planted")).unwrap();
    }
    let id = create(&h, "b", 1 << 20).await.volume_id;
    assert!(left.contains(&id));
    assert_eq!(
        std::fs::read_dir(h.path("local").join(&id))
            .unwrap()
            .count(),
        0
    );
}

/// A spare that is not empty (something was put into `.creating` by hand)
/// whose create's rollback could not remove it: the retry of that create
/// finds the name's record still Creating and makes its storage again,
/// and never hands out what was put there either.
#[tokio::test]
async fn a_planted_spare_whose_rollback_failed_is_not_handed_out_by_the_retry() {
    let h = fake(&[]);
    create(&h, "a", 1).await;
    let creating = h.path("local/.creating");
    for s in spares_in(&h) {
        std::fs::write(creating.join(&s).join("planted"), b"x").unwrap();
    }
    h.fake().fail_op_under("remove tree", &creating, libc::EIO);
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 1 << 20)))
        .await;
    assert_eq!(code(r), Code::Internal);
    h.fake().clear_file_faults();
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 1 << 20)))
        .await;
    if let Ok(v) = &r {
        let id = &v.get_ref().volume.as_ref().unwrap().volume_id;
        panic!(
            "handed out {id} holding {:?}",
            std::fs::read_dir(h.path("local").join(id))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(code(r), Code::Internal);
    assert!(h
        .driver
        .store
        .get_by_name("b")
        .is_none_or(|b| b.phase != berth::state::Phase::Ready));
}

/// `.creating` moved away by hand while berth runs and a symlink to it put
/// in its place: a create refuses it, as it did before spares existed
/// (`ensure_dir`), instead of handing out a spare through the symlink and
/// moving it from outside Berth's directories into the root; its rollback
/// removes nothing it leads to.
#[tokio::test]
async fn a_creating_area_replaced_by_a_symlink_is_refused_and_nothing_it_leads_to_is_touched() {
    let h = fake(&[]);
    create(&h, "a", 1).await;
    let creating = h.path("local/.creating");
    let elsewhere = h.path("elsewhere");
    std::fs::rename(&creating, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &creating).unwrap();
    let there = made_in(&elsewhere);
    assert_eq!(there.len(), 16);
    let r = h
        .ctl
        .create_volume(Request::new(create_req("b", 1 << 20)))
        .await;
    assert_ne!(code(r), Code::Ok);
    assert!(h.driver.store.get_by_name("b").is_none());
    assert_eq!(made_in(&elsewhere), there, "nothing there moved or removed");
}

/// A create a crash interrupted (its record still Creating, its directory
/// under `.creating/<id>`, holding data) whose rollback at start-up fails
/// (neither moved into the trash nor removed): its directory stays under
/// `.creating/` (it was never handed out), and the next retry, once the
/// filesystem works again, removes it with its record. Before, start-up's
/// orphan pass moved the directory of any id with a record into the root,
/// also one still Creating: the retry then took it for a directory a
/// create whose Ready record was lost may have handed out and kept it in
/// `.orphaned/`, never deleted.
#[tokio::test]
async fn a_failed_rollback_at_start_up_leaves_the_unfinished_create_out_of_the_root() {
    use berth::os::Os;
    let h = fake(&["--local-spare-dirs", "0"]);
    let fake = h.fake.clone().expect("fake os");
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let local = h.path("local");
    let unfinished = local.join(".creating").join(&id);
    // The crash: the record never said Ready, the directory was never
    // moved into the root.
    let mut r = h.driver.store.get(&id).unwrap();
    h.driver
        .store
        .set_phase(&mut r, berth::state::Phase::Creating)
        .unwrap();
    h.driver
        .os
        .files
        .rename_noreplace(&local.join(&id), &unfinished)
        .unwrap();
    std::fs::write(unfinished.join("data"), b"x").unwrap();
    let dir = h.stop();
    // The rollback cannot move it into the trash nor remove it.
    fake.fail_op_under("mkdir", &local.join(".trash"), libc::EIO);
    fake.fail_op_under("remove tree", &local.join(".creating"), libc::EIO);
    let h = build(
        dir,
        Os::on_fake(&fake),
        Some(fake.clone()),
        &["--local-spare-dirs", "0"],
    );
    assert_eq!(
        h.driver.store.get(&id).map(|r| r.phase),
        Some(berth::state::Phase::Creating),
        "the rollback failed: the record stays"
    );
    assert!(
        !local.join(&id).exists(),
        "the directory of a create still Creating was moved into the root"
    );
    assert!(unfinished.join("data").exists());
    fake.clear_file_faults();
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&id).is_none(), "the retry rolls it back");
    assert!(!local.join(&id).exists());
    assert!(!unfinished.exists());
    assert!(
        !local.join(".orphaned").join(&id).exists(),
        "a directory never handed out was kept aside as an orphan"
    );
}

/// The same for a snapshot: a copy a crash interrupted (its record still
/// Creating, its copy whole under `.snapshots/.partial-<id>`) whose
/// rollback at start-up fails stays where it is, never under the
/// snapshot's name, and the next retry removes it with its record.
/// Before, start-up moved the copy of any snapshot with a record into
/// place, also one still Creating: the retry then kept it in
/// `.orphaned/`, never deleted.
#[tokio::test]
async fn a_failed_snapshot_rollback_at_start_up_leaves_its_copy_unplaced() {
    use berth::os::Os;
    let h = fake(&["--local-spare-dirs", "0"]);
    let fake = h.fake.clone().expect("fake os");
    let src = create(&h, "src", 1 << 20).await.volume_id;
    std::fs::write(h.path("local").join(&src).join("data"), b"x").unwrap();
    let sid = snapshot_id(&h, "s", &src).await;
    let snaps = h.path("local/.snapshots");
    let partial = snaps.join(format!(".partial-{sid}"));
    // The crash: the record never said Ready, the copy was never moved.
    let mut s = h.driver.store.snapshot_get(&sid).unwrap();
    s.phase = berth::state::Phase::Creating;
    h.driver.store.snapshot_put(&s).unwrap();
    h.driver
        .os
        .files
        .rename_noreplace(&snaps.join(&sid), &partial)
        .unwrap();
    let local = h.path("local");
    let dir = h.stop();
    // The rollback cannot move it into the trash nor remove it.
    fake.fail_op_under("mkdir", &local.join(".trash"), libc::EIO);
    fake.fail_op_under("remove tree", &snaps, libc::EIO);
    let h = build(
        dir,
        Os::on_fake(&fake),
        Some(fake.clone()),
        &["--local-spare-dirs", "0"],
    );
    assert_eq!(
        h.driver.store.snapshot_get(&sid).map(|s| s.phase),
        Some(berth::state::Phase::Creating),
        "the rollback failed: the record stays"
    );
    assert!(
        !snaps.join(&sid).exists(),
        "the copy of a snapshot still Creating was moved into place"
    );
    assert!(partial.exists());
    fake.clear_file_faults();
    retry_pending_and_wait(&h).await;
    assert!(
        h.driver.store.snapshot_get(&sid).is_none(),
        "the retry rolls it back"
    );
    assert!(!snaps.join(&sid).exists());
    assert!(!partial.exists());
    assert!(
        !local.join(".orphaned").join(&sid).exists(),
        "a copy never handed out was kept aside as an orphan"
    );
}

/// Marks the record of `id` Deleting, as a DeleteVolume that failed half
/// way leaves it (or a journal of a version whose DeleteVolume began
/// before what it did not see was taken down).
fn mark_deleting(h: &Harness, id: &str) {
    let mut rec = h.driver.store.get(id).expect("record");
    h.driver
        .store
        .set_phase(&mut rec, berth::state::Phase::Deleting)
        .expect("set phase");
}

/// The retry of an unfinished delete (start-up and every minute) does
/// DeleteVolume's check of mounts: a local volume whose record says
/// Deleting and that is still staged and published to a pod here is left
/// in place (its directory and data, its record), and finished once the
/// pod's mounts are gone. Before, the retry went straight to the kind's
/// removal, which looks only for mounts inside the directory: the
/// directory a pod had mounted was moved into the trash and emptied.
#[tokio::test]
async fn the_retry_of_a_delete_leaves_a_volume_mounted_here_in_place() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let (staging, target) = (h.path("stage"), h.path("target"));
    stage_and_publish(&h, &id, &staging, &target).await;
    let data = h.path("local").join(&id).join("data");
    std::fs::write(&data, b"x").unwrap();
    mark_deleting(&h, &id);
    retry_pending_and_wait(&h).await;
    assert_eq!(
        h.driver.store.get(&id).map(|r| r.phase),
        Some(berth::state::Phase::Deleting)
    );
    assert!(data.exists(), "a pod's volume was deleted under it");
    // Not stranded: once the pod is gone, the retry finishes it.
    unpublish_as_kubelet(&h, &id, &target)
        .await
        .expect("unpublish");
    unstage_as_kubelet(&h, &id, &staging)
        .await
        .expect("unstage");
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!h.path("local").join(&id).exists());
}

/// The retry of an unfinished delete does DeleteVolume's check of the
/// record's attachments: a volume whose record says Deleting and still
/// names a node it is published to (ControllerPublishVolume recorded it)
/// is left in place until ControllerUnpublishVolume takes the node away,
/// then finished. Before, the retry deleted it with the node still
/// recorded, as DeleteVolume never would.
#[tokio::test]
async fn the_retry_of_a_delete_leaves_a_volume_still_published_in_place() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    controller_publish(&h, &id, NODE).await.expect("publish");
    let data = h.path("local").join(&id).join("data");
    std::fs::write(&data, b"x").unwrap();
    mark_deleting(&h, &id);
    retry_pending_and_wait(&h).await;
    let rec = h.driver.store.get(&id).expect("record kept");
    assert!(rec.published.contains_key(NODE));
    assert!(data.exists(), "a published volume was deleted");
    controller_unpublish(&h, &id, NODE)
        .await
        .expect("unpublish");
    retry_pending_and_wait(&h).await;
    assert!(h.driver.store.get(&id).is_none());
    assert!(!h.path("local").join(&id).exists());
}

/// A ListVolumes answer holds at most the page's bytes
/// (`Config::list_page_bytes`, 3 MiB: a gRPC client refuses an answer over
/// 4 MiB by default), with or without `max_entries`; the rest follows in
/// the next pages, and a walk by token lists every volume once. Before, one
/// page held every volume asked for: at about 11,000 NFS volumes the answer
/// was over 4 MiB and the CO's listing failed. Here the limit is lowered
/// to 2 KiB, so 60 volumes page as 30,000 would.
#[tokio::test]
async fn a_list_of_many_volumes_pages_under_the_limit_in_bytes() {
    use prost::Message;
    let limit = 2048;
    let (os, f) = berth::os::Os::fake();
    let h = try_build_with(tempfile::tempdir().unwrap(), os, Some(f), &[], |c| {
        c.list_page_bytes = limit
    })
    .unwrap_or_else(|(_, e)| panic!("{e}"));
    let n = 60;
    for i in 0..n {
        create(&h, &format!("v{i}"), 1).await;
    }
    for max in [0, 1000] {
        let (seen, pages) = walk_pages(|token| {
            let h = &h;
            async move {
                let p = h
                    .ctl
                    .list_volumes(Request::new(csi::ListVolumesRequest {
                        max_entries: max,
                        starting_token: token,
                    }))
                    .await
                    .unwrap()
                    .into_inner();
                let bytes: usize = p.entries.iter().map(|e| e.encoded_len() + 2).sum();
                assert!(bytes <= limit, "max {max}: page of {bytes} bytes");
                let ids = p.entries.iter();
                let ids = ids.map(|e| e.volume.as_ref().unwrap().volume_id.clone());
                (ids.collect(), p.next_token)
            }
        })
        .await;
        assert!(seen.len() == n && each_once(&seen), "max {max}: {seen:?}");
        assert!(pages >= 3, "max {max}: {pages} pages");
    }
}

/// A new local volume's directory that cannot be read (no descriptor
/// left) fails the create saying so, not as a directory someone put files
/// into by hand; the retry then makes the volume. Before, the failed read
/// counted as "not empty": CreateVolume answered that the directory "is
/// not empty" and the log blamed a hand in `.creating`.
#[tokio::test]
async fn a_new_directory_that_cannot_be_read_is_no_planted_one() {
    let h = fake(&[]);
    let f = h.fake.as_ref().unwrap();
    // A create takes a spare directory made ahead, once there is one.
    create(&h, "first", 1 << 20).await;
    let area = h.path("local/.creating");
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&area).unwrap().count() == 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no spare made"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    f.fail_op_under("read_dir", &area, libc::EMFILE);
    let e = h
        .ctl
        .create_volume(Request::new(create_req("v", 1 << 20)))
        .await
        .expect_err("created without reading its directory");
    assert!(
        e.message().contains("reading new volume") && !e.message().contains("not empty"),
        "{e:?}"
    );
    f.clear_file_faults();
    let v = create(&h, "v", 1 << 20).await;
    assert!(h.path("local").join(&v.volume_id).is_dir());
}

/// A volume whose record says Deleting (a DeleteVolume that did not
/// finish, which the CO's retry and the retry every minute finish) is a
/// volume the CO asked gone: ValidateVolumeCapabilities and
/// ControllerGetVolume answer NOT_FOUND for it, as ControllerPublish,
/// the node calls and ControllerExpandVolume do, and ListVolumes leaves it
/// out; a page of `max_entries` is still full while volumes follow, and
/// its token still leads to the rest, each once. Before, it was confirmed,
/// described and listed as a live volume.
#[tokio::test]
async fn a_volume_whose_delete_did_not_finish_is_not_described_or_listed() {
    use berth::state::Phase;
    let h = fake(&[]);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&h, &format!("v{i}"), 1).await.volume_id);
    }
    for id in [&ids[1], &ids[2]] {
        let mut r = h.driver.store.get(id).unwrap();
        h.driver.store.set_phase(&mut r, Phase::Deleting).unwrap();
    }
    let e = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: ids[1].clone(),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        }))
        .await
        .expect_err("capabilities of a volume being deleted answered");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("being deleted"), "{e:?}");
    let e = h
        .ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: ids[1].clone(),
        }))
        .await
        .expect_err("a volume being deleted described");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // A live volume is still answered.
    h.ctl
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: ids[0].clone(),
        }))
        .await
        .expect("a live volume");
    let live = vec![ids[0].clone(), ids[3].clone(), ids[4].clone()];
    for max in [0, 1, 2] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let p = h
                .ctl
                .list_volumes(Request::new(csi::ListVolumesRequest {
                    max_entries: max,
                    starting_token: token.clone(),
                }))
                .await
                .expect("list")
                .into_inner();
            let page: Vec<String> = p
                .entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
                .collect();
            if !p.next_token.is_empty() {
                // A page is short only at the end.
                assert_eq!(page.len(), max as usize, "max {max}: {page:?}");
            }
            seen.extend(page);
            if p.next_token.is_empty() {
                break;
            }
            token = p.next_token;
        }
        assert_eq!(seen, live, "max {max}");
    }
    // Its delete still finishes.
    delete(&h, &ids[1]).await;
    assert!(h.driver.store.get(&ids[1]).is_none());
}

/// DeleteVolume whose record's removal the journal cannot write for want
/// of space (ENOSPC at the append: the state's filesystem full, the log's
/// reserve used up). A volume holding data is emptied first, and the
/// removal written in the room that made: the delete works. One with
/// nothing to free, or whose removal still cannot be written, is
/// RESOURCE_EXHAUSTED naming the full filesystem, and is as it was
/// (record, directory in place; emptied if its data was removed); a retry
/// once there is room works. Before, all three were INTERNAL, the
/// directory left in the trash under the record, its space never given
/// back (root test on a real full tmpfs:
/// `a_delete_without_room_for_its_record_frees_the_volumes_own_space`).
#[tokio::test]
async fn a_delete_without_room_for_its_record_frees_the_volumes_own_space() {
    let h = fake(&[]);
    std::fs::write(h.path("outside"), b"not the volume's").unwrap();
    let dir = |id: &str| h.path("local").join(id);
    let in_trash = |id: &str| {
        std::fs::read_dir(h.path("local/.trash")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(id))
                .count()
        })
    };
    let with_data = |id: &str| {
        std::fs::write(dir(id).join("data"), b"the tenant's").unwrap();
        std::fs::create_dir(dir(id).join("sub")).unwrap();
        std::fs::write(dir(id).join("sub/more"), b"x").unwrap();
        std::os::unix::fs::symlink(h.path("outside"), dir(id).join("link")).unwrap();
    };
    // Data to free: the removal is written at the second attempt.
    let full = create(&h, "full", 1 << 20).await.volume_id;
    with_data(&full);
    h.fake().fail_next("write", libc::ENOSPC);
    delete(&h, &full).await;
    assert!(h.driver.store.get(&full).is_none());
    assert!(!dir(&full).exists());
    // Nothing to free: refused, as it was.
    let empty = create(&h, "empty", 1 << 20).await.volume_id;
    h.fake().fail_next("write", libc::ENOSPC);
    let e = try_delete(&h, &empty).await.unwrap_err();
    assert_refused_for_room(&e, false);
    assert!(h.driver.store.get(&empty).is_some());
    assert!(dir(&empty).is_dir());
    assert_eq!(in_trash(&empty), 0);
    delete(&h, &empty).await;
    assert!(h.driver.store.get(&empty).is_none());
    // Data freed, and still no room: refused, emptied, in place.
    let stuck = create(&h, "stuck", 1 << 20).await.volume_id;
    with_data(&stuck);
    h.fake()
        .fail_op_under("write", &h.path("state"), libc::ENOSPC);
    let e = try_delete(&h, &stuck).await.unwrap_err();
    assert_refused_for_room(&e, true);
    assert!(h.driver.store.get(&stuck).is_some());
    assert_eq!(std::fs::read_dir(dir(&stuck)).unwrap().count(), 0);
    assert_eq!(in_trash(&stuck), 0);
    assert_eq!(
        std::fs::read(h.path("outside")).unwrap(),
        b"not the volume's"
    );
    h.fake().clear_file_faults();
    delete(&h, &stuck).await;
    assert!(h.driver.store.get(&stuck).is_none());
    assert!(!dir(&stuck).exists());
}

/// A field a newer berth wrote into a volume's record, which this version
/// does not know, is kept when this version rewrites the record (a
/// ControllerPublishVolume, then a ControllerUnpublishVolume), through a
/// restart (the journal replayed) and through a compaction (the snapshot
/// file) and the restart after it. Before, serde dropped it on read, and
/// the first rewrite wrote the record without it: a downgrade and an
/// upgrade back lost what the newer berth had recorded.
#[tokio::test]
async fn a_field_a_newer_berth_recorded_survives_a_rewrite_by_this_one() {
    use berth::state::journal::EntryRef;
    const FIELD: &str = r#""newer_field":{"x":[1,"a\"b"],"y":null}"#;
    let h = fake(&[]);
    let id = create(&h, "v", 1 << 20).await.volume_id;
    let rec = h.driver.store.get(&id).unwrap();
    let dir = h.stop();
    // The record as a newer berth writes it: one field more, appended to
    // the log with its checksum.
    let json = serde_json::to_string(&EntryRef::Put(&rec)).unwrap();
    let json = json.strip_suffix("}}").expect("a put line");
    let json = format!("{json},{FIELD}}}}}");
    append_change(dir.path(), &json);
    let kept = |h: &Harness, when: &str| {
        let r = h.driver.store.get(&id).expect("the record");
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(FIELD), "{when}: {text}");
        r
    };
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &[]);
    kept(&h, "read");
    controller_publish(&h, &id, NODE).await.expect("publish");
    let r = kept(&h, "after publish");
    assert!(r.published.contains_key(NODE));
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    let r = kept(&h, "after publish and a restart");
    assert!(r.published.contains_key(NODE));
    controller_unpublish(&h, &id, NODE)
        .await
        .expect("unpublish");
    assert!(h.driver.store.checkpoint(0).unwrap());
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    let r = kept(&h, "after unpublish, a compaction and a restart");
    assert!(r.published.is_empty());
    // The field is the newer berth's: this one writes it back as it was,
    // and the record still reads as before otherwise.
    assert_eq!(r.capacity_bytes, rec.capacity_bytes);
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
}

/// Fields a newer berth wrote inside the values of a volume's record (a
/// capability of its list, its publication, the capability of that
/// publication, and the `mount` section of each capability's access
/// type) are kept when this version rewrites the record (an expand, an
/// unpublish), through a restart and a compaction (the snapshot file) and
/// the restart after it, the `mount` section's byte for byte; and a retry
/// of the publish and of the create, which carry none of them, are the
/// same requests still. Before, serde dropped them on read and the first
/// rewrite lost them (the `mount` section's until 2026-12-07, after the
/// others were kept).
#[tokio::test]
async fn fields_a_newer_berth_recorded_inside_capabilities_and_publications_survive() {
    use berth::state::journal::EntryRef;
    // (spaced, a number as written and an escape: kept as text, not
    // parsed and written anew)
    const MOUNT_NEW: &str = r#""mount_new":{"m": [2.50,"\u00e9"]}"#;
    let h = fake(&[]);
    let id = create(&h, "v", 1 << 20).await.volume_id;
    let publish = || csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: NODE.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    h.ctl
        .controller_publish_volume(Request::new(publish()))
        .await
        .expect("publish");
    let rec = h.driver.store.get(&id).unwrap();
    let dir = h.stop();
    let json = serde_json::to_string(&EntryRef::Put(&rec)).unwrap();
    let forged = json
        .replace(
            r#""access_mode":"SINGLE_NODE_WRITER"}"#,
            r#""access_mode":"SINGLE_NODE_WRITER","cap_new":[1,"a\"b"]}"#,
        )
        .replace(
            r#""readonly":false,"#,
            r#""readonly":false,"grant_new":{"g":null},"#,
        )
        .replace(
            r#""mount_flags":[]"#,
            &format!(r#""mount_flags":[],{MOUNT_NEW}"#),
        );
    assert_eq!(forged.matches("cap_new").count(), 2, "{json}");
    assert_eq!(forged.matches(MOUNT_NEW).count(), 2, "{json}");
    assert!(forged.contains("grant_new"), "{json}");
    append_change(dir.path(), &forged);
    // Where each field is, in the record as this version writes it.
    let kept = |h: &Harness, when: &str, published: bool| {
        let r = h.driver.store.get(&id).expect("the record");
        // the mount section's, as written: byte for byte, in the list's
        // capability and the publication's
        let text = serde_json::to_string(&r).unwrap();
        let mounts = if published { 2 } else { 1 };
        assert_eq!(text.matches(MOUNT_NEW).count(), mounts, "{when}: {text}");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let cap_new = serde_json::json!([1, "a\"b"]);
        assert_eq!(v["capabilities"][0]["cap_new"], cap_new, "{when}: {v}");
        let grant = &v["published"][NODE];
        if published {
            assert_eq!(
                grant["grant_new"],
                serde_json::json!({"g": null}),
                "{when}: {v}"
            );
            assert_eq!(grant["capability"]["cap_new"], cap_new, "{when}: {v}");
        } else {
            assert!(grant.is_null(), "{when}: {v}");
        }
        r
    };
    let (os, f) = berth::os::Os::fake();
    let h = build(dir, os, Some(f), &[]);
    kept(&h, "read", true);
    // Retries: the same requests, whatever was recorded beside them.
    h.ctl
        .controller_publish_volume(Request::new(publish()))
        .await
        .expect("the publish retried");
    let again = create(&h, "v", 1 << 20).await;
    assert_eq!(again.volume_id, id);
    kept(&h, "after the retries", true);
    h.ctl
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 << 20,
                limit_bytes: 0,
            }),
            volume_capability: Some(rwo()),
            ..Default::default()
        }))
        .await
        .expect("expand");
    let r = kept(&h, "after an expand", true);
    assert_eq!(r.capacity_bytes, 2 << 20);
    assert!(h.driver.store.checkpoint(0).unwrap());
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    kept(&h, "after a compaction and a restart", true);
    controller_unpublish(&h, &id, NODE)
        .await
        .expect("unpublish");
    kept(&h, "after unpublish", false);
    assert!(h.driver.store.checkpoint(0).unwrap());
    let (os, f) = berth::os::Os::fake();
    let h = h.restart(os, Some(f));
    kept(&h, "after unpublish, a compaction and a restart", false);
    delete(&h, &id).await;
    assert!(h.driver.store.get(&id).is_none());
}

/// Secrets are held to the CSI spec: a secrets map of more than 4 KiB
/// (keys and values together: a map's limit) or with a key outside the
/// spec's characters (letters and digits, '-', '_', '.') is
/// INVALID_ARGUMENT at every RPC that carries secrets, whose message names
/// the field but holds neither a value nor the key, and nothing is done.
/// A value longer than 128 bytes within the 4 KiB (a Kubernetes Secret's
/// certificate) is accepted. Before, secrets were not looked at: any size
/// and any key passed.
#[tokio::test]
async fn secrets_are_held_to_the_spec_limits_and_never_echoed() {
    use std::collections::HashMap;
    let h = fake(&[]);
    let value = "v".repeat(3000);
    let fits = HashMap::from([
        ("ca.crt".to_string(), value.clone()),
        ("pass_word-2".to_string(), "p".repeat(1000)),
    ]);
    let mut req = create_req("fits", 1 << 20);
    req.secrets = fits;
    let id = created_id(h.ctl.create_volume(Request::new(req)).await);
    let over = HashMap::from([
        ("ca.crt".to_string(), value.clone()),
        ("key.pem".to_string(), "k".repeat(1100)),
    ]);
    let bad_key = HashMap::from([("pass word=".to_string(), "hunter2".to_string())]);
    let (s, t) = (h.path("s"), h.path("t"));
    for (what, secrets) in [("over 4 KiB", &over), ("a bad key", &bad_key)] {
        let sec = || secrets.clone();
        let mut create = create_req("over", 1 << 20);
        create.secrets = sec();
        let mut stage = stage_req(&id, &s);
        stage.secrets = sec();
        let mut publish = publish_req(&id, &s, &t, false);
        publish.secrets = sec();
        let answers: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "CreateVolume",
                h.ctl.create_volume(Request::new(create)).await.map(|_| ()),
            ),
            (
                "DeleteVolume",
                h.ctl
                    .delete_volume(Request::new(csi::DeleteVolumeRequest {
                        volume_id: id.clone(),
                        secrets: sec(),
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "ControllerPublishVolume",
                h.ctl
                    .controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
                        volume_id: id.clone(),
                        node_id: NODE.into(),
                        volume_capability: Some(rwo()),
                        secrets: sec(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "ControllerUnpublishVolume",
                h.ctl
                    .controller_unpublish_volume(Request::new(
                        csi::ControllerUnpublishVolumeRequest {
                            volume_id: id.clone(),
                            node_id: NODE.into(),
                            secrets: sec(),
                        },
                    ))
                    .await
                    .map(|_| ()),
            ),
            (
                "ValidateVolumeCapabilities",
                h.ctl
                    .validate_volume_capabilities(Request::new(
                        csi::ValidateVolumeCapabilitiesRequest {
                            volume_id: id.clone(),
                            volume_capabilities: vec![rwo()],
                            secrets: sec(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(|_| ()),
            ),
            (
                "ControllerExpandVolume",
                h.ctl
                    .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
                        volume_id: id.clone(),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: 2 << 20,
                            limit_bytes: 0,
                        }),
                        secrets: sec(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "CreateSnapshot",
                h.ctl
                    .create_snapshot(Request::new(csi::CreateSnapshotRequest {
                        source_volume_id: id.clone(),
                        name: "snap".into(),
                        secrets: sec(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "DeleteSnapshot",
                h.ctl
                    .delete_snapshot(Request::new(csi::DeleteSnapshotRequest {
                        snapshot_id: "no-such-snapshot".into(),
                        secrets: sec(),
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "ListSnapshots",
                h.ctl
                    .list_snapshots(Request::new(csi::ListSnapshotsRequest {
                        secrets: sec(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "GetSnapshot",
                h.ctl
                    .get_snapshot(Request::new(csi::GetSnapshotRequest {
                        snapshot_id: "no-such-snapshot".into(),
                        secrets: sec(),
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "NodeStageVolume",
                h.node
                    .node_stage_volume(Request::new(stage))
                    .await
                    .map(|_| ()),
            ),
            (
                "NodePublishVolume",
                h.node
                    .node_publish_volume(Request::new(publish))
                    .await
                    .map(|_| ()),
            ),
            (
                "NodeExpandVolume",
                h.node
                    .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
                        volume_id: id.clone(),
                        volume_path: t.display().to_string(),
                        secrets: sec(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
        ];
        for (rpc, r) in answers {
            let e = r.expect_err(&format!("{rpc} took secrets with {what}"));
            assert_eq!(e.code(), Code::InvalidArgument, "{rpc}, {what}: {e:?}");
            let m = e.message();
            assert!(m.contains("secrets"), "{rpc}, {what}: {m}");
            for v in secrets.values() {
                assert!(!m.contains(v.as_str()), "{rpc}, {what}: a value in {m}");
            }
            assert!(
                !m.contains("pass word") && !m.contains("hunter2"),
                "{rpc}: {m}"
            );
        }
    }
    // Nothing was done: no volume made, none deleted, published or grown.
    assert!(h.driver.store.get_by_name("over").is_none());
    let rec = h.driver.store.get(&id).expect("still there");
    assert!(rec.published.is_empty());
    assert_eq!(rec.capacity_bytes, 1 << 20);
    assert!(!s.exists() && !t.exists());
}

/// The CSI spec: "The total size of this repeated field [mount_flags]
/// SHALL NOT exceed 4 KiB". A capability whose flags are more is
/// INVALID_ARGUMENT, naming the field but no flag (one may be a secret),
/// here at ValidateVolumeCapabilities and CreateVolume. Before, 64 flags of
/// 128 bytes each (8 KiB) passed the capability's checks: at
/// ValidateVolumeCapabilities an answer that only did not confirm them.
#[tokio::test]
async fn mount_flags_of_more_than_4_kib_in_total_are_invalid() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let flags = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("opt{i:03}={}", "x".repeat(113)))
            .collect()
    };
    assert_eq!(flags(1)[0].len(), 120);
    let cap = |n: usize| {
        let mut c = rwo();
        if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.mount_flags = flags(n);
        }
        c
    };
    // 35 flags: 4,200 bytes.
    let e = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![cap(35)],
            ..Default::default()
        }))
        .await
        .expect_err("4,200 bytes of mount flags taken");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("mount_flags"), "{e:?}");
    assert!(!e.message().contains("xxxx"), "{e:?}");
    let mut req = create_req("b", 1 << 20);
    req.volume_capabilities = vec![cap(35)];
    let e = h
        .ctl
        .create_volume(Request::new(req))
        .await
        .expect_err("4,200 bytes of mount flags taken");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("mount_flags"), "{e:?}");
    assert!(h.driver.store.get_by_name("b").is_none());
    // 34 flags (4,080 bytes) are within the limit: answered, not refused
    // for their size (berth's allowlist does not confirm them).
    let r = h
        .ctl
        .validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![cap(34)],
            ..Default::default()
        }))
        .await
        .expect("4,080 bytes of mount flags answered")
        .into_inner();
    assert!(!r.message.contains("mount_flags are"), "{r:?}");
}

/// A node id may be up to 256 bytes (NodeGetInfoResponse's node_id
/// "overrides the general CSI size limit"), and a CO passes it back to
/// ControllerPublishVolume and ControllerUnpublishVolume. One longer than
/// any of berth's (at most 128 bytes) names no node of berth's: NOT_FOUND
/// for publishing a volume local to this node there, OK for an unpublish
/// (nothing published there), the answers for an unknown node; 257 bytes
/// is INVALID_ARGUMENT. Before, anything over 128 bytes was
/// INVALID_ARGUMENT.
#[tokio::test]
async fn node_ids_up_to_256_bytes_are_answered_as_unknown_nodes() {
    let h = fake(&[]);
    let id = create(&h, "a", 1 << 20).await.volume_id;
    let long = "n".repeat(256);
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    let unpublish = |node: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        ..Default::default()
    };
    let e = h
        .ctl
        .controller_publish_volume(Request::new(publish(&long)))
        .await
        .expect_err("published to a node that is not the volume's");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    h.ctl
        .controller_unpublish_volume(Request::new(unpublish(&long)))
        .await
        .expect("unpublish from an unknown node of 256 bytes");
    let over = "n".repeat(257);
    for r in [
        code(
            h.ctl
                .controller_publish_volume(Request::new(publish(&over)))
                .await,
        ),
        code(
            h.ctl
                .controller_unpublish_volume(Request::new(unpublish(&over)))
                .await,
        ),
    ] {
        assert_eq!(r, Code::InvalidArgument);
    }
    assert!(h.driver.store.get(&id).unwrap().published.is_empty());
}
