//! What a tree copy (snapshots, restores, clones of local volumes) and a
//! tree's removal (a deleted volume's trash) hold in memory, measured by a
//! counting allocator: the tenant controls the tree, so nothing they keep
//! may grow with one directory's size or with the length of its paths. The tests share the allocator's counters and run
//! one at a time (a lock), each measuring the peak of its own copy.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only
// the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The most bytes the Rust allocator held at once during `f`, beyond what
/// was held when it began.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

/// A name of `len` bytes for entry `n`.
fn name(n: usize, len: usize) -> String {
    let s = format!("{n:08}-");
    format!("{s}{}", "x".repeat(len - s.len()))
}

/// One directory of 20,000 entries with 200-byte names (4 MB of names): a
/// listing read whole is held while the directory is copied. Before
/// 2026-12-07 the copy collected and sorted each directory's listing: this
/// copy's peak was over 5 MB; streamed, it is what one entry at a time
/// needs.
#[test]
fn a_huge_directory_is_copied_without_holding_its_listing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let entries = 20_000;
    for n in 0..entries {
        std::fs::File::create(src.join(name(n, 200))).unwrap();
    }
    let dst = t.path().join("dst");
    let mut copied = None;
    let peak = peak_during(|| copied = Some(berth::os::copy::copy_tree(&src, &dst)));
    let st = copied.unwrap().unwrap();
    assert_eq!(st.copied + st.cloned, entries as u64);
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), entries);
    assert!(
        peak < 1 << 20,
        "the copy of one directory of {entries} entries held {peak} bytes at once"
    );
}

/// Hard-link groups are kept (one inode stays one inode), which needs, for
/// every inode with more than one name, where its first copy is until its
/// other names are reached. A tenant can put many such inodes deep down (a
/// path some 3,000 bytes long), every name of each there. Before
/// 2026-12-07 the copy kept each first copy's whole path: 5,000 groups
/// there held over 15 MB (a million: 3 GB); now each directory's path is
/// kept once, shared, and each group holds its name.
#[test]
fn hard_link_groups_deep_down_do_not_hold_their_paths() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    // Deep: 30 levels of 100-byte names.
    let mut deep = src.clone();
    for n in 0..30 {
        deep.push(name(n, 100));
    }
    let (one, other) = (deep.join("one"), deep.join("other"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir(&other).unwrap();
    let groups = 5_000;
    for n in 0..groups {
        let f = one.join(name(n, 20));
        std::fs::File::create(&f).unwrap();
        std::fs::hard_link(&f, other.join(name(n, 20))).unwrap();
    }
    let dst = t.path().join("dst");
    let mut copied = None;
    let peak = peak_during(|| copied = Some(berth::os::copy::copy_tree(&src, &dst)));
    let st = copied.unwrap().unwrap();
    assert_eq!(st.links, groups as u64);
    let rel = deep.strip_prefix(&src).unwrap();
    let first = std::fs::metadata(dst.join(rel).join("one").join(name(7, 20))).unwrap();
    let second = std::fs::metadata(dst.join(rel).join("other").join(name(7, 20))).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(first.ino(), second.ino(), "one inode stays one inode");
    assert!(
        peak < 2 << 20,
        "{groups} hard-link groups {} bytes deep held {peak} bytes at once",
        path_len(&deep)
    );
}

fn path_len(p: &Path) -> usize {
    p.as_os_str().len()
}

/// A sparse file is copied range of data by range (SEEK_DATA, SEEK_HOLE),
/// holes left holes. A tenant's file can hold as many ranges as it has
/// blocks of data, one block every other: here 20,000. Before 2026-12-07
/// the copy listed every range of the file before copying any (16 bytes
/// each: a 100 GiB volume written so held 400 MB); now each is copied as
/// it is found.
#[test]
fn a_file_of_many_data_ranges_is_copied_without_listing_them() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let f = std::fs::File::create(&src).unwrap();
    let ranges = 20_000u64;
    for n in 0..ranges {
        f.write_all_at(b"d", n * 8192).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let dst = t.path().join("dst");
    let mut copied = None;
    let peak = peak_during(|| copied = Some(berth::os::copy::copy_file(&src, &dst)));
    let st = copied.unwrap().unwrap();
    let d = std::fs::File::open(&dst).unwrap();
    let byte_at = |off: u64| {
        let mut b = [9u8];
        d.read_exact_at(&mut b, off).unwrap();
        b[0]
    };
    for n in 1..ranges {
        assert_eq!((byte_at(n * 8192 - 4096), byte_at(n * 8192)), (0, b'd'));
    }
    let (a, b) = (
        std::fs::metadata(&src).unwrap(),
        std::fs::metadata(&dst).unwrap(),
    );
    assert!(b.blocks() <= a.blocks() + 64, "holes stay holes");
    assert!(
        peak < 64 << 10,
        "the copy of a file of {ranges} data ranges held {peak} bytes at once ({st:?})"
    );
}

/// A deleted volume's tree is removed (`Files::remove_tree`) one directory
/// at a time, and a directory's subdirectories are gone into one after
/// another. Before 2026-12-07 each directory's subdirectories' names were
/// all collected first: one directory of 20,000 subdirectories with
/// 200-byte names held over 4 MB (on xfs an empty directory takes no
/// block: a tenant's million held hundreds of MB); now at most a batch of
/// them is held, the directory read again for the next.
#[test]
fn a_directory_of_many_subdirectories_is_removed_without_holding_their_names() {
    use berth::os::Files;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let subdirs = 20_000;
    for n in 0..subdirs {
        std::fs::create_dir(tree.join(name(n, 200))).unwrap();
    }
    // Some not empty, and a file beside them.
    for n in (0..subdirs).step_by(1000) {
        std::fs::write(tree.join(name(n, 200)).join("f"), b"x").unwrap();
    }
    std::fs::write(tree.join("f"), b"x").unwrap();
    let mut removed = None;
    let peak = peak_during(|| removed = Some(berth::os::RealFiles.remove_tree(&tree)));
    removed.unwrap().unwrap();
    assert!(!tree.exists());
    assert!(
        peak < 2 << 20,
        "removing one directory of {subdirs} subdirectories held {peak} bytes at once"
    );
}

/// A tenant's 100,000 empty files (a million is too slow to make here):
/// the free-space walk before a copy (`tree_copy_need`), the copy and the
/// removal of the tree each hold what one entry at a time needs, never a
/// list of every path (guard: none of them collects the tree).
#[test]
fn a_hundred_thousand_files_are_walked_copied_and_removed_in_bounded_memory() {
    use berth::os::Files;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let files = 100_000;
    for d in 0..10 {
        let dir = src.join(name(d, 20));
        std::fs::create_dir_all(&dir).unwrap();
        for n in 0..files / 10 {
            std::fs::File::create(dir.join(name(n, 40))).unwrap();
        }
    }
    let mut need = None;
    let walk = peak_during(|| need = Some(berth::os::copy::tree_copy_need(&src)));
    need.unwrap().unwrap();
    let dst = t.path().join("dst");
    let mut copied = None;
    let copy = peak_during(|| copied = Some(berth::os::copy::copy_tree(&src, &dst)));
    let st = copied.unwrap().unwrap();
    assert_eq!(st.copied + st.cloned, files as u64);
    let mut removed = None;
    let removal = peak_during(|| removed = Some(berth::os::RealFiles.remove_tree(&dst)));
    removed.unwrap().unwrap();
    assert!(!dst.exists());
    for (what, peak) in [
        ("the walk", walk),
        ("the copy", copy),
        ("the removal", removal),
    ] {
        assert!(
            peak < 1 << 20,
            "{what} of {files} files held {peak} bytes at once"
        );
    }
}
