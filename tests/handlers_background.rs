//! Start-up with the background thread on, as the serving binary has it
//! (`background::configure(true)` is process-wide: this binary's tests
//! are the only ones that turn it on). The other handler tests run the
//! background jobs where they are submitted.
mod common;

use std::sync::Arc;
use std::time::Duration;

use berth::csi::v1 as csi;
use berth::csi::v1::controller_server::Controller;
use berth::csi::v1::identity_server::Identity;
use berth::csi::v1::node_server::Node;
use berth::os::fake::FakeOs;
use berth::os::Os;
use common::*;
use tonic::Request;

const MIB: i64 = 1 << 20;

/// `background::configure` is process-wide: the tests that turn the
/// thread on run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn project(h: &Harness, id: &str) -> u32 {
    h.driver
        .store
        .get(id)
        .and_then(|r| r.project())
        .expect("a project in the record")
}

async fn available(h: &Harness) -> i64 {
    h.ctl
        .get_capacity(Request::new(csi::GetCapacityRequest::default()))
        .await
        .expect("get capacity")
        .into_inner()
        .available_capacity
}

/// The trash start-up finds (deleted volumes' directories whose removal
/// did not finish: a crash, a failed removal) is emptied on the
/// background thread once the socket is up, never before berth answers:
/// with its removal held (a tree of millions of files takes minutes),
/// start-up finishes, and Probe, NodeGetInfo, GetCapacity and CreateVolume
/// answer while the trash still holds it. Meanwhile its project id stays
/// held (a new volume gets another one), and GetCapacity counts only the
/// free space the filesystem reports (what the trash still takes is not
/// promised). Once it is removed, its id is let go. The same for the
/// trash of a delete a crash interrupted, which start-up finishes. Before,
/// start-up removed the one and waited (up to 10 minutes) for the other
/// before the driver was up: every RPC of every tenant waited for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_answers_while_the_trash_it_found_is_still_being_emptied() {
    let _one = ONE_AT_A_TIME.lock().await;
    berth::background::configure(false);
    let dir = tempfile::tempdir().unwrap();
    let (os, fake) = Os::fake();
    fake.enable_project_quotas();
    let h = build(dir, os, Some(fake.clone()), &["--local-spare-dirs", "0"]);
    set_free(&h, 200 * MIB, 100 * MIB);
    let a = created_id(
        h.ctl
            .create_volume(Request::new(create_req("a", 60 * MIB)))
            .await,
    );
    let pa = project(&h, &a);
    // a wrote 50 MiB; its delete moved it into the trash, whose emptying
    // failed: the next start finds it there, still taking its 50 MiB.
    fake.set_project_written(pa, 50 * MIB as u64);
    set_free(&h, 200 * MIB, 50 * MIB);
    fake.fail_next("remove tree", libc::EIO);
    delete(&h, &a).await;
    let trash = h.path("local/.trash");
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 1);
    // And a delete a crash interrupted before its record was removed:
    // start-up finishes it (its directory goes into the trash, its record
    // away) and empties its trash entry on the background thread too.
    let d = created_id(
        h.ctl
            .create_volume(Request::new(create_req("d", MIB)))
            .await,
    );
    let pd = project(&h, &d);
    let mut r = h.driver.store.get(&d).unwrap();
    h.driver
        .store
        .set_phase(&mut r, berth::state::Phase::Deleting)
        .unwrap();
    let dir = h.stop();

    berth::background::configure(true);
    let held = fake.hold_op_under("remove tree", &trash);
    let (tx, rx) = std::sync::mpsc::channel();
    let f: Arc<FakeOs> = fake.clone();
    std::thread::spawn(move || {
        let h = build(
            dir,
            Os::on_fake(&f),
            Some(f.clone()),
            &["--local-spare-dirs", "0"],
        );
        let _ = tx.send(h);
    });
    // Not a timing criterion: the old start-up never returned while the
    // removal was held; this only keeps the test from hanging then.
    let h = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(h) => h,
        Err(_) => {
            held.release();
            panic!("start-up did not finish while the removal of the trash it found was held: it empties the trash before serving");
        }
    };
    assert!(
        held.wait_reached(Duration::from_secs(60)),
        "the trash's removal never started"
    );
    // Served while the trash still holds a's directory.
    let p = h
        .ident
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(p.ready, Some(true));
    let info = h
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .expect("node get info")
        .into_inner();
    assert_eq!(info.node_id, NODE);
    // The 50 MiB the trash still takes are not free: GetCapacity answers
    // the free space the filesystem reports.
    assert_eq!(available(&h).await, 50 * MIB);
    let b = created_id(
        h.ctl
            .create_volume(Request::new(create_req("b", 10 * MIB)))
            .await,
    );
    assert_ne!(
        project(&h, &b),
        pa,
        "the trash entry's id was handed out while the entry is there"
    );
    assert!(h.driver.store.get(&d).is_none(), "the delete is finished");
    assert_eq!(
        std::fs::read_dir(&trash).unwrap().count(),
        2,
        "answered while the trash still held a's and d's directories"
    );
    assert!(fake.project_limits().contains_key(&pa));
    assert!(fake.project_limits().contains_key(&pd));

    held.release();
    assert!(berth::background::wait_idle(Duration::from_secs(60)));
    assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
    assert!(
        !fake.project_limits().contains_key(&pa),
        "the id is let go once its entry is removed"
    );
    assert!(!fake.project_limits().contains_key(&pd));
    assert!(fake.projects().values().all(|p| p.id != pa && p.id != pd));
    fake.set_project_written(pa, 0);
    let c = created_id(
        h.ctl
            .create_volume(Request::new(create_req("c", MIB)))
            .await,
    );
    assert_eq!(project(&h, &c), pa);
}

fn snap_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

fn from_snapshot(name: &str, size: i64, snap: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.into(),
                },
            )),
        }),
        ..create_req(name, size)
    }
}

/// The files named `marker-*` anywhere under `dir`.
fn markers(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            } else if name.starts_with("marker-") {
                found.push(name);
            }
        }
    }
    found.sort();
    found
}

/// What a crash leaves of copies and creates that never became Ready
/// (a restore whose copy was whole but not yet Ready, under
/// `.creating/<id>` with a record still Creating; a restore interrupted
/// mid-copy, its copy in its holder `.creating/.partial-<id>`; a
/// snapshot's copy `.snapshots/.partial-<id>` under a record still
/// Creating; a plain create's directory and a snapshot's copy without
/// records) is moved into the trash at start-up and removed on the
/// background thread once the socket is up, never before berth answers:
/// with every removal held (a tree of millions of files takes minutes),
/// start-up finishes, the records are rolled back, and Probe,
/// NodeGetInfo and CreateVolume answer while all of it is still on the
/// disk; the restores' project ids stay held until their copies are gone
/// (a new volume gets another one), then are let go. Before, start-up
/// removed each of them in place before it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_answers_while_unfinished_copies_it_found_are_still_being_removed() {
    let _one = ONE_AT_A_TIME.lock().await;
    berth::background::configure(false);
    let dir = tempfile::tempdir().unwrap();
    let (os, fake) = Os::fake();
    fake.enable_project_quotas();
    let h = build(dir, os, Some(fake.clone()), &["--local-spare-dirs", "0"]);
    set_free(&h, 500 * MIB, 400 * MIB);
    let src = created_id(
        h.ctl
            .create_volume(Request::new(create_req("src", 10 * MIB)))
            .await,
    );
    std::fs::write(h.path("local").join(&src).join("data"), b"src").unwrap();
    let snap = h
        .ctl
        .create_snapshot(Request::new(snap_req("s", &src)))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let whole = created_id(
        h.ctl
            .create_volume(Request::new(from_snapshot("whole", 10 * MIB, &snap)))
            .await,
    );
    let midway = created_id(
        h.ctl
            .create_volume(Request::new(from_snapshot("midway", 10 * MIB, &snap)))
            .await,
    );
    let (pw, pm) = (project(&h, &whole), project(&h, &midway));
    let later = h
        .ctl
        .create_snapshot(Request::new(snap_req("later", &src)))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    // The crash: both restores and the second snapshot never said Ready.
    let files = h.driver.os.files.clone();
    let local = h.path("local");
    let creating = local.join(".creating");
    for id in [&whole, &midway] {
        let mut r = h.driver.store.get(id).unwrap();
        h.driver
            .store
            .set_phase(&mut r, berth::state::Phase::Creating)
            .unwrap();
    }
    files
        .rename_noreplace(&local.join(&whole), &creating.join(&whole))
        .unwrap();
    files
        .rename_noreplace(
            &local.join(&midway),
            &creating.join(format!(".partial-{midway}")),
        )
        .unwrap();
    let mut s = h.driver.store.snapshot_get(&later).unwrap();
    s.phase = berth::state::Phase::Creating;
    h.driver.store.snapshot_put(&s).unwrap();
    let snaps = local.join(".snapshots");
    files
        .rename_noreplace(
            &snaps.join(&later),
            &snaps.join(format!(".partial-{later}")),
        )
        .unwrap();
    // And leftovers without records: a plain create's directory, a
    // snapshot's copy.
    let lost_create = creating.join(format!("local-{:032x}", 7));
    let lost_copy = snaps.join(format!(".partial-local-snap-{:032x}", 8));
    for d in [&lost_create, &lost_copy] {
        std::fs::create_dir_all(d).unwrap();
    }
    let planted = [
        (creating.join(&whole), "marker-whole"),
        (creating.join(format!(".partial-{midway}")), "marker-midway"),
        (snaps.join(format!(".partial-{later}")), "marker-later"),
        (lost_create.clone(), "marker-lost-create"),
        (lost_copy.clone(), "marker-lost-copy"),
    ];
    for (d, m) in &planted {
        std::fs::write(d.join(m), b"x").unwrap();
    }
    let mut all: Vec<String> = planted.iter().map(|(_, m)| m.to_string()).collect();
    all.sort();
    let dir = h.stop();

    berth::background::configure(true);
    // Every removal under the local root waits until the test lets it go.
    let held = fake.hold_op_under("remove tree", &local);
    let (tx, rx) = std::sync::mpsc::channel();
    let f: Arc<FakeOs> = fake.clone();
    std::thread::spawn(move || {
        let h = build(
            dir,
            Os::on_fake(&f),
            Some(f.clone()),
            &["--local-spare-dirs", "0"],
        );
        let _ = tx.send(h);
    });
    // Not a timing criterion: the old start-up never returned while the
    // removals were held; this only keeps the test from hanging then.
    let h = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(h) => h,
        Err(_) => {
            held.release();
            berth::background::configure(false);
            panic!("start-up did not finish while the removal of what it found was held: it removes unfinished copies before serving");
        }
    };
    let p = h
        .ident
        .probe(Request::new(csi::ProbeRequest {}))
        .await
        .expect("probe")
        .into_inner();
    assert_eq!(p.ready, Some(true));
    let info = h
        .node
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .expect("node get info")
        .into_inner();
    assert_eq!(info.node_id, NODE);
    // Rolled back: the records are gone.
    assert!(h.driver.store.get(&whole).is_none());
    assert!(h.driver.store.get(&midway).is_none());
    assert!(h.driver.store.snapshot_get(&later).is_none());
    assert_eq!(
        markers(&local.join(".trash")),
        all,
        "answered while the trash still holds everything start-up found"
    );
    assert_eq!(markers(&creating), Vec::<String>::new());
    assert_eq!(markers(&snaps), Vec::<String>::new());
    let n = created_id(
        h.ctl
            .create_volume(Request::new(create_req("new", MIB)))
            .await,
    );
    let pn = project(&h, &n);
    assert!(
        pn != pw && pn != pm,
        "a project id of a copy still on the disk was handed out"
    );
    assert!(fake.project_limits().contains_key(&pw));
    assert!(fake.project_limits().contains_key(&pm));
    // The volumes that are Ready are untouched.
    assert_eq!(
        std::fs::read(local.join(&src).join("data")).unwrap(),
        b"src"
    );
    assert!(snaps.join(&snap).join("data").exists());

    held.release();
    assert!(berth::background::wait_idle(Duration::from_secs(60)));
    berth::background::configure(false);
    assert_eq!(markers(&local), Vec::<String>::new());
    assert_eq!(std::fs::read_dir(local.join(".trash")).unwrap().count(), 0);
    assert!(
        !fake.project_limits().contains_key(&pw),
        "the id is let go once its copy is removed"
    );
    assert!(!fake.project_limits().contains_key(&pm));
    assert_eq!(
        std::fs::read(local.join(&src).join("data")).unwrap(),
        b"src"
    );
}

/// Bytes allocated to the journal's current log (its reserve past its
/// end included).
fn log_allocated(h: &Harness) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let dir = h.path("state/journal");
    let log = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .max()
        .expect("a log");
    let m = std::fs::metadata(&log).unwrap();
    (m.len(), m.blocks() * 512)
}

/// On a filesystem a tenant keeps full, the journal's reserve (the space
/// kept past the end of its log, which lets deletes be recorded there) is
/// refilled as soon as a delete's storage is removed, not at the next
/// change: by then the tenant may have taken the freed space again, and
/// the deletes after it ran on what was left of the reserve. Here the
/// filesystem is full (no reserve can be taken) while berth starts, while
/// a volume is made and while its delete is recorded; the delete's
/// removal frees space, and the reserve is whole again before any other
/// change. Before, it stayed empty until the next change was written.
#[tokio::test]
async fn a_delete_that_frees_space_refills_the_journals_reserve_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    berth::background::configure(false);
    let dir = tempfile::tempdir().unwrap();
    let (os, fake) = Os::fake();
    let h = build(dir, os, Some(fake.clone()), &["--local-spare-dirs", "0"]);
    let v = created_id(
        h.ctl
            .create_volume(Request::new(create_req("tenant", MIB)))
            .await,
    );
    std::fs::write(h.path("local").join(&v).join("data"), vec![7u8; 1 << 16]).unwrap();
    // Full: nothing can be kept past the end of the log.
    let h = restart_without_reserve(h, &fake);
    let (len, allocated) = log_allocated(&h);
    assert!(
        allocated < len + berth::state::journal::RESERVE / 2,
        "no reserve on the full filesystem: {allocated} bytes for a log of {len}"
    );
    // The delete's own record is written while the filesystem is still
    // full; removing the volume frees its space.
    fake.clear_file_faults();
    fake.fail_next("reserve", libc::ENOSPC);
    delete(&h, &v).await;
    assert!(h.driver.store.get(&v).is_none());
    assert!(!h.path("local").join(&v).exists());
    let (len, allocated) = log_allocated(&h);
    assert!(
        allocated >= len + berth::state::journal::RESERVE,
        "the reserve is taken again once the delete freed space: {allocated} bytes allocated for a log of {len}"
    );
}

/// Stops `h` and starts it again on a filesystem that filled up meanwhile
/// (the space kept past the journal's log let go, and none to take again:
/// every reserve refused until `clear_file_faults`).
fn restart_without_reserve(h: Harness, fake: &Arc<FakeOs>) -> Harness {
    let journal = h.path("state/journal");
    let dir = h.stop();
    for e in std::fs::read_dir(&journal).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "jsonl") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .unwrap();
            let len = f.metadata().unwrap().len();
            // (a truncation to its own size lets go of what is kept past it)
            f.set_len(len).unwrap();
        }
    }
    fake.fail_op_under("reserve", dir.path(), libc::ENOSPC);
    build(
        dir,
        Os::on_fake(fake),
        Some(fake.clone()),
        &["--local-spare-dirs", "0"],
    )
}

/// On a full filesystem the journal's reserve is kept for the changes that
/// give space back: once less than half of it is left and it cannot be
/// taken again, CreateVolume and CreateSnapshot are RESOURCE_EXHAUSTED
/// before they write anything, while DeleteVolume still works; once there
/// is room again they work without a restart. Before, a CreateSnapshot
/// that failed copying on the full filesystem wrote its record and its
/// removal (356 bytes; the snapshot controller retries it), and about
/// 2,900 such retries used the whole reserve up (root test run on an
/// 8 MiB tmpfs), after which the deletes that would free space failed
/// with ENOSPC.
#[tokio::test]
async fn a_full_filesystem_keeps_the_journals_reserve_for_deletes() {
    let _one = ONE_AT_A_TIME.lock().await;
    berth::background::configure(false);
    let dir = tempfile::tempdir().unwrap();
    let (os, fake) = Os::fake();
    let h = build(dir, os, Some(fake.clone()), &["--local-spare-dirs", "0"]);
    let v = created_id(
        h.ctl
            .create_volume(Request::new(create_req("v", MIB)))
            .await,
    );
    std::fs::write(h.path("local").join(&v).join("data"), b"v").unwrap();
    let w = created_id(
        h.ctl
            .create_volume(Request::new(create_req("w", MIB)))
            .await,
    );
    // The filesystem filled up and the reserve was used: nothing is kept
    // past the log, and no room to keep any.
    let h = restart_without_reserve(h, &fake);
    let (len, _) = log_allocated(&h);
    let snap = h.ctl.create_snapshot(Request::new(snap_req("s", &v))).await;
    assert_eq!(
        snap.as_ref().map(|_| ()).map_err(|e| e.code()),
        Err(tonic::Code::ResourceExhausted),
        "{snap:?}"
    );
    let r = h
        .ctl
        .create_volume(Request::new(create_req("x", MIB)))
        .await;
    assert_eq!(
        r.as_ref().map(|_| ()).map_err(|e| e.code()),
        Err(tonic::Code::ResourceExhausted),
        "{r:?}"
    );
    assert_eq!(log_allocated(&h).0, len, "nothing written for them");
    assert!(h.driver.store.snapshot_by_name("s").is_none());
    // A delete still goes through.
    delete(&h, &w).await;
    assert!(h.driver.store.get(&w).is_none());
    // Room again (a tenant freed space): they work, no restart needed.
    fake.clear_file_faults();
    h.ctl
        .create_snapshot(Request::new(snap_req("s", &v)))
        .await
        .expect("snapshot once there is room");
    created_id(
        h.ctl
            .create_volume(Request::new(create_req("x", MIB)))
            .await,
    );
}
