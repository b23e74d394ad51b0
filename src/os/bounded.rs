//! File system calls that may block forever (statvfs or stat of an NFS
//! mount whose server is gone) run on a helper thread with a deadline.
//!
//! A thread stuck in the kernel cannot be killed; on timeout it is left
//! behind and the caller gets `None`. At most one call per key is in flight:
//! while an earlier call on the same key is stuck (it ran past its own
//! deadline), a new one returns `None` at once instead of stacking up
//! another stuck thread; an earlier call still within its deadline (one
//! made beside this one: kubelet's stats of a path an unpublish probes) is
//! waited for, and then the new call is made: a call in flight is not an
//! answer that never comes.
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a call waiting for an earlier one on its key looks again.
const WAIT_STEP: Duration = Duration::from_millis(5);

#[derive(Debug, Default, Clone)]
pub struct Bounded {
    /// The keys of the calls in flight, with each one's deadline.
    inflight: Arc<Mutex<HashMap<String, Instant>>>,
    /// Calls of `run_unless_stuck` that did not finish in time and still
    /// run, by key.
    stuck: Arc<Mutex<HashMap<String, usize>>>,
}

impl Bounded {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on its own thread and waits at most `timeout` for it. `None`
    /// when it did not finish in time, or an earlier call on `key` is still
    /// running past its own deadline (stuck). An earlier call on `key` that
    /// is still within its deadline is waited for first (at most until that
    /// deadline, and at most `timeout`): the whole call takes at most twice
    /// `timeout`.
    pub fn run<T, F>(&self, key: &str, timeout: Duration, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let wait_until = Instant::now() + timeout;
        loop {
            {
                let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                match set.get(key) {
                    None => {
                        set.insert(key.to_string(), now + timeout);
                        break;
                    }
                    Some(due) if now >= *due || now >= wait_until => return None,
                    Some(_) => {}
                }
            }
            std::thread::sleep(WAIT_STEP);
        }
        let (tx, rx) = mpsc::channel();
        let inflight = self.inflight.clone();
        let k = key.to_string();
        let spawned = std::thread::Builder::new()
            .name("berth-bounded".into())
            .spawn(move || {
                let v = f();
                inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&k);
                let _ = tx.send(v);
            });
        if spawned.is_err() {
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// Runs `f` on its own thread and waits at most `timeout` for it, as
    /// `run`, but calls on one key may run side by side (a device looked
    /// at by two RPCs at once): only while an earlier call on `key` that
    /// did not finish in time is still running does a new one return
    /// `None` at once, so a device stuck in the kernel strands one thread,
    /// not one per call.
    pub fn run_unless_stuck<T, F>(&self, key: &str, timeout: Duration, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self
            .stuck
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
        {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        // Whether the caller gave up on this call; read and written under
        // the `stuck` lock only.
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stuck, k, gave_up) = (self.stuck.clone(), key.to_string(), abandoned.clone());
        std::thread::Builder::new()
            .name("berth-bounded".into())
            .spawn(move || {
                let v = f();
                let mut m = stuck.lock().unwrap_or_else(|e| e.into_inner());
                if gave_up.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(n) = m.get_mut(&k) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&k);
                        }
                    }
                }
                let _ = tx.send(v);
            })
            .ok()?;
        if let Ok(v) = rx.recv_timeout(timeout) {
            return Some(v);
        }
        let mut m = self.stuck.lock().unwrap_or_else(|e| e.into_inner());
        // Finished between the timeout and the lock: its answer counts.
        if let Ok(v) = rx.try_recv() {
            return Some(v);
        }
        abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
        *m.entry(key.to_string()).or_insert(0) += 1;
        None
    }

    /// True while a call on `key` is still running.
    pub fn busy(&self, key: &str) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn calls_unless_stuck_run_side_by_side_until_one_is_stuck() {
        let b = Bounded::new();
        // Two slow calls on one key at once: both answer.
        let b2 = b.clone();
        let other = std::thread::spawn(move || {
            b2.run_unless_stuck("k", Duration::from_secs(5), || {
                std::thread::sleep(Duration::from_millis(200));
                1
            })
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            b.run_unless_stuck("k", Duration::from_secs(5), || {
                std::thread::sleep(Duration::from_millis(200));
                2
            }),
            Some(2)
        );
        assert_eq!(other.join().unwrap(), Some(1));
        // One that does not finish in time: the key is stuck, and a new
        // call returns at once, until the stuck one ends.
        let t0 = Instant::now();
        let r = b.run_unless_stuck("k", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(400));
            3
        });
        assert_eq!(r, None);
        assert!(t0.elapsed() < Duration::from_millis(300));
        let t1 = Instant::now();
        assert_eq!(b.run_unless_stuck("k", Duration::from_secs(5), || 4), None);
        assert!(t1.elapsed() < Duration::from_millis(100));
        assert_eq!(
            b.run_unless_stuck("other", Duration::from_secs(5), || 5),
            Some(5)
        );
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            b.run_unless_stuck("k", Duration::from_secs(5), || 6),
            Some(6)
        );
    }

    #[test]
    fn returns_the_value_in_time() {
        let b = Bounded::new();
        assert_eq!(b.run("k", Duration::from_secs(5), || 7), Some(7));
        assert!(!b.busy("k"));
    }

    /// A second call on a key whose first call is still within its
    /// deadline waits for it and is then made: before, it answered `None`
    /// at once, as if the first were stuck (an NFS server that answers
    /// taken for one that does not).
    #[test]
    fn a_second_call_beside_one_within_its_deadline_is_made() {
        let b = Bounded::new();
        let first = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.run("k", Duration::from_secs(5), || {
                    std::thread::sleep(Duration::from_millis(200));
                    1
                })
            })
        };
        while !b.busy("k") {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        assert_eq!(b.run("k", Duration::from_secs(5), || 2), Some(2));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(first.join().unwrap(), Some(1));
        // Waited for at most its own timeout.
        let b = Bounded::new();
        let slow = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.run("k", Duration::from_secs(5), || {
                    std::thread::sleep(Duration::from_millis(600));
                })
            })
        };
        while !b.busy("k") {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        assert_eq!(b.run("k", Duration::from_millis(100), || 3), None);
        assert!(
            t0.elapsed() < Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
        slow.join().unwrap();
    }

    #[test]
    fn times_out_and_refuses_a_second_stuck_call() {
        let b = Bounded::new();
        let t0 = Instant::now();
        let r = b.run("k", Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(400));
            1
        });
        assert_eq!(r, None);
        assert!(t0.elapsed() < Duration::from_millis(300));
        assert!(b.busy("k"));
        // While the first is stuck, a second call on the key returns at once.
        let t1 = Instant::now();
        assert_eq!(b.run("k", Duration::from_secs(5), || 2), None);
        assert!(t1.elapsed() < Duration::from_millis(100));
        // Another key is independent.
        assert_eq!(b.run("other", Duration::from_secs(5), || 3), Some(3));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.busy("k"));
        assert_eq!(b.run("k", Duration::from_secs(5), || 4), Some(4));
    }
}
