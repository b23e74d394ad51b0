//! Spare directories: empty volume directories made and flushed ahead of
//! the creates that take them, so that a create's answer waits for one
//! durable write (its record) instead of three (its directory, the
//! directory's entry, its record).
//!
//! A spare is exactly what a create makes before it writes its record: an
//! empty directory `.creating/<id>`, mode 0777, flushed with its entry,
//! named by the id of the volume that will have it. So a crash leaves
//! nothing new behind: start-up removes a spare as it removes any create
//! that never became Ready (no record names it), and moves one whose
//! record says Ready into place. Its id is chosen when it is made, so a
//! create that takes it takes its id too (`LocalKind::take_spare_id`),
//! and gives it back when the id went unused (`give_back`: the name
//! existed, the create was refused before it made anything).
//!
//! Only creates without a content source take spares: a restore or clone
//! copies into a directory of its own. The spares are made on the
//! background thread (`crate::background`) once fewer than half of the
//! target are left, as a create's operation finds (`top_up`: never in
//! `take`, which runs on the async thread); a create that finds none
//! makes its directory itself, as before. A spare that is gone when its
//! create comes (removed by hand) is made again by the create.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::os::files::ensure_dir;
use crate::os::{Files, OsError};

/// The mode of a new volume's directory: world-writable like a fresh
/// emptyDir, so that pods running as any user can write (the local root
/// itself is private).
pub const VOLUME_DIR_MODE: u32 = 0o777;

/// Makes the directory `dir` of a new volume (mkdir, then chmod: the
/// umask does not apply), not flushed.
pub fn make_volume_dir(files: &dyn Files, dir: &Path) -> Result<(), OsError> {
    ensure_dir(files, dir, 0o700)?;
    files.set_mode(dir, VOLUME_DIR_MODE)
}

#[derive(Default)]
struct State {
    /// Ids whose directories are made and flushed, not yet taken.
    free: Vec<String>,
    /// Ids taken by a create that has not yet used or given them back.
    taken: HashSet<String>,
    /// A refill is queued or running.
    refilling: bool,
}

pub struct Spares {
    /// `<local root>/.creating`.
    area: PathBuf,
    files: Arc<dyn Files>,
    /// How many to keep ready (0: none are made).
    target: usize,
    new_id: Box<dyn Fn() -> String + Send + Sync>,
    state: Mutex<State>,
}

impl Spares {
    pub fn new(
        area: PathBuf,
        files: Arc<dyn Files>,
        target: usize,
        new_id: Box<dyn Fn() -> String + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Spares {
            area,
            files,
            target,
            new_id,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of a spare, now the caller's (None when none is ready).
    /// Touches no file: its caller is CreateVolume's async handler, on the
    /// one async thread, which must never wait for a disk (`top_up` asks
    /// for more, from the create's operation).
    pub fn take(&self) -> Option<String> {
        if self.target == 0 {
            return None;
        }
        let mut s = self.lock();
        let id = s.free.pop();
        if let Some(id) = &id {
            s.taken.insert(id.clone());
        }
        id
    }

    /// Asks for a refill when fewer than half of the target are left and
    /// none is asked for yet. Only from an operation's thread: the refill
    /// runs where it is asked for when the background thread is off, could
    /// not start or has a full queue (`background::submit`).
    pub fn top_up(self: &Arc<Self>) {
        if self.target == 0 {
            return;
        }
        let refill = {
            let mut s = self.lock();
            let refill = !s.refilling && s.free.len() * 2 < self.target;
            if refill {
                s.refilling = true;
            }
            refill
        };
        if refill {
            let me = self.clone();
            crate::background::submit(move || me.refill());
        }
    }

    /// Whether `id` is a spare taken and not yet used or given back; it is
    /// used from now on (never given back).
    pub fn use_taken(&self, id: &str) -> bool {
        self.lock().taken.remove(id)
    }

    /// A taken spare whose id went unused: free again (its directory is
    /// still there, empty and flushed). Nothing for any other id.
    pub fn give_back(&self, id: &str) {
        let mut s = self.lock();
        if s.taken.remove(id) {
            s.free.push(id.to_string());
        }
    }

    /// Removes the spares not taken (at a clean exit, once no create is in
    /// flight and no refill runs).
    pub fn drop_free(&self) {
        let free = std::mem::take(&mut self.lock().free);
        // Never through a symlink put in place of `.creating` by hand
        // (`files::read_own_dir`): what it leads to is not Berth's.
        if !self.files.is_dir(&self.area) {
            return;
        }
        for id in free {
            let dir = self.area.join(&id);
            if let Err(e) = self.files.remove_dir(&dir) {
                tracing::warn!(error = %e, "could not remove a spare volume directory; the next start does");
            }
        }
    }

    /// How many are ready.
    pub fn ready(&self) -> usize {
        self.lock().free.len()
    }

    /// Makes spares up to the target: every directory, then each one's
    /// flush (the first commits them all on a journaling filesystem), then
    /// the flush of their entries. A failure removes what this refill made
    /// and says so; the creates then make their own directories until the
    /// next refill.
    pub fn refill(&self) {
        // The request is over however the refill ends, a panic included
        // (the background thread catches it): a later `top_up` asks again
        // instead of finding one asked for for ever.
        struct Over<'a>(&'a Spares);
        impl Drop for Over<'_> {
            fn drop(&mut self) {
                self.0.lock().refilling = false;
            }
        }
        let _over = Over(self);
        let want = self.target.saturating_sub(self.ready());
        let mut made = Vec::with_capacity(want);
        let r = self.make(want, &mut made);
        let mut s = self.lock();
        match r {
            Ok(()) => s.free.extend(made),
            Err(e) => {
                drop(s);
                tracing::warn!(error = %e, "could not make spare volume directories; creates make their own");
                for id in made {
                    let _ = self.files.remove_dir(&self.area.join(id));
                }
            }
        }
    }

    fn make(&self, want: usize, made: &mut Vec<String>) -> Result<(), OsError> {
        if want == 0 {
            return Ok(());
        }
        ensure_dir(self.files.as_ref(), &self.area, 0o700)?;
        for _ in 0..want {
            let id = (self.new_id)();
            let dir = self.area.join(&id);
            // Recorded before it is made: a failure half way removes it.
            made.push(id);
            make_volume_dir(self.files.as_ref(), &dir)?;
        }
        for id in made.iter() {
            self.files.sync_dir(&self.area.join(id))?;
        }
        self.files.sync_dir(&self.area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::Os;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn spares(dir: &Path, files: Arc<dyn Files>, target: usize) -> Arc<Spares> {
        let n = Arc::new(AtomicUsize::new(0));
        Spares::new(
            dir.join(".creating"),
            files,
            target,
            Box::new(move || format!("local-{:032x}", n.fetch_add(1, Ordering::SeqCst))),
        )
    }

    #[test]
    fn a_refill_makes_flushed_world_writable_directories_and_take_hands_them_out_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (os, fake) = Os::fake();
        let s = spares(tmp.path(), os.files.clone(), 4);
        // None yet, and the take touches no file (it runs on the async
        // thread); the top-up asks for a refill, which runs in the caller
        // here (the background thread is off in tests).
        assert_eq!(s.take(), None);
        assert!(fake.file_ops().is_empty(), "{:?}", fake.file_ops());
        s.top_up();
        assert_eq!(s.ready(), 4);
        let area = tmp.path().join(".creating");
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&area).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            assert!(m.is_dir());
            assert_eq!(m.permissions().mode() & 0o7777, VOLUME_DIR_MODE);
            assert_eq!(std::fs::read_dir(e.path()).unwrap().count(), 0);
            ids.push(e.file_name().to_string_lossy().into_owned());
        }
        ids.sort();
        assert_eq!(ids.len(), 4);
        // Every directory and then the area were flushed, after they were
        // all made.
        let ops = fake.file_ops();
        let synced: Vec<_> = ops.iter().filter(|o| o.op == "fsync").collect();
        assert_eq!(synced.len(), 5);
        assert_eq!(synced.last().unwrap().path, area);
        let last_mkdir = ops.iter().rposition(|o| o.op == "mkdir").unwrap();
        let first_sync = ops.iter().position(|o| o.op == "fsync").unwrap();
        assert!(last_mkdir < first_sync);

        // Taken once each: two takes leave two (not below half: no refill).
        let a = s.take().unwrap();
        s.top_up();
        let b = s.take().unwrap();
        s.top_up();
        assert_ne!(a, b);
        assert!(ids.contains(&a) && ids.contains(&b));
        assert_eq!(s.ready(), 2);
        // A third take leaves one, below half: refilled to the target.
        let c = s.take().unwrap();
        assert_eq!(s.ready(), 1);
        s.top_up();
        assert_eq!(s.ready(), 4);
        assert_eq!(std::fs::read_dir(&area).unwrap().count(), 7);
        // Given back: free again; used: never given back.
        s.give_back(&a);
        assert_eq!(s.ready(), 5);
        assert!(s.use_taken(&b));
        assert!(!s.use_taken(&b), "used once");
        s.give_back(&b);
        assert_eq!(s.ready(), 5, "a used id is not given back");
        assert!(!s.use_taken("local-ffffffffffffffffffffffffffffffff"));
        s.give_back("local-ffffffffffffffffffffffffffffffff");
        assert_eq!(s.ready(), 5, "an id never taken is not a spare");
        assert!(s.use_taken(&c));
        // At exit: the free ones are removed, the used ones stay.
        s.drop_free();
        assert_eq!(s.ready(), 0);
        let mut left: Vec<String> = std::fs::read_dir(&area)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut used = vec![b, c];
        used.sort();
        assert_eq!(left, used);
    }

    #[test]
    fn a_failed_refill_removes_what_it_made_and_the_next_take_tries_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (os, fake) = Os::fake();
        let s = spares(tmp.path(), os.files.clone(), 3);
        let area = tmp.path().join(".creating");
        std::fs::create_dir(&area).unwrap();
        // The second directory's flush fails.
        fake.fail_op_under("fsync", &area.join(format!("local-{:032x}", 1)), libc::EIO);
        assert_eq!(s.take(), None);
        s.top_up();
        assert_eq!(s.ready(), 0);
        assert_eq!(
            std::fs::read_dir(&area).unwrap().count(),
            0,
            "what the failed refill made is removed"
        );
        fake.clear_file_faults();
        assert_eq!(s.take(), None);
        s.top_up();
        assert_eq!(s.ready(), 3, "none were ready; this top-up refills");
    }

    #[test]
    fn a_refill_that_panics_does_not_stop_later_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let (os, _fake) = Os::fake();
        let n = Arc::new(AtomicUsize::new(0));
        let calls = n.clone();
        let s = Spares::new(
            tmp.path().join(".creating"),
            os.files.clone(),
            2,
            Box::new(move || {
                let i = calls.fetch_add(1, Ordering::SeqCst);
                assert_ne!(i, 0, "the first id panics");
                format!("local-{i:032x}")
            }),
        );
        // The refill runs in the caller here (the background thread is
        // off in tests), so its panic comes up here.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.top_up()));
        assert!(r.is_err());
        assert_eq!(s.ready(), 0);
        s.top_up();
        assert_eq!(s.ready(), 2, "a later top-up refills");
    }

    #[test]
    fn drop_free_removes_nothing_through_a_symlink_in_place_of_the_area() {
        let tmp = tempfile::tempdir().unwrap();
        let (os, _fake) = Os::fake();
        let s = spares(tmp.path(), os.files.clone(), 2);
        s.top_up();
        assert_eq!(s.ready(), 2);
        let area = tmp.path().join(".creating");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::rename(&area, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &area).unwrap();
        s.drop_free();
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 2);
    }

    #[test]
    fn a_target_of_zero_makes_none() {
        let tmp = tempfile::tempdir().unwrap();
        let (os, fake) = Os::fake();
        let s = spares(tmp.path(), os.files.clone(), 0);
        assert_eq!(s.take(), None);
        s.top_up();
        assert_eq!(s.ready(), 0);
        assert!(fake.file_ops().is_empty());
        assert!(!tmp.path().join(".creating").exists());
    }
}
