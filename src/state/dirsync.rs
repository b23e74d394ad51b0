//! Group commit for directory fsyncs. A record is durable only once the
//! directory holding its renamed file is fsynced; concurrent writers share
//! one fsync instead of queueing one each. A writer takes a ticket after its
//! rename and returns once an fsync that started after that ticket has
//! finished.
use std::fs::File;
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    next_ticket: u64,
    /// Every ticket below this is durable.
    synced_below: u64,
    syncing: bool,
    /// Set when an fsync failed; the waiters of that round get the error.
    failed_round: Option<(u64, String)>,
}

pub struct DirSync {
    dir: File,
    state: Mutex<State>,
    cv: Condvar,
}

impl DirSync {
    pub fn new(dir: File) -> Self {
        DirSync {
            dir,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    /// Makes every rename/unlink this thread completed before the call
    /// durable.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        loop {
            if g.synced_below > ticket {
                return Ok(());
            }
            if let Some((below, msg)) = &g.failed_round {
                if *below > ticket {
                    return Err(std::io::Error::other(msg.clone()));
                }
            }
            if !g.syncing {
                g.syncing = true;
                let round = g.next_ticket;
                drop(g);
                let r = self.dir.sync_all();
                g = self.state.lock().unwrap_or_else(|e| e.into_inner());
                g.syncing = false;
                match &r {
                    Ok(()) => g.synced_below = g.synced_below.max(round),
                    Err(e) => g.failed_round = Some((round, e.to_string())),
                }
                self.cv.notify_all();
                if r.is_err() && round > ticket {
                    return r;
                }
                continue;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_all_return() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(DirSync::new(File::open(d.path()).unwrap()));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (s, p) = (s.clone(), d.path().to_path_buf());
                std::thread::spawn(move || {
                    for j in 0..20 {
                        std::fs::write(p.join(format!("{i}-{j}")), b"x").unwrap();
                        s.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let g = s.state.lock().unwrap();
        assert_eq!(g.next_ticket, 320);
        assert!(g.synced_below >= 320);
    }
}
