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
