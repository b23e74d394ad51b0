//! File system calls that may block forever (statvfs or stat of an NFS
//! mount whose server is gone) run on a helper thread with a deadline.
//!
//! A thread stuck in the kernel cannot be killed; on timeout it is left
//! behind and the caller gets `None`. At most one call per key is in flight:
//! while an earlier call on the same key is still stuck, a new one returns
//! `None` at once instead of stacking up another stuck thread.
use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct Bounded {
    inflight: Arc<Mutex<HashSet<String>>>,
}

impl Bounded {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on its own thread and waits at most `timeout` for it. `None`
    /// when it did not finish in time (or an earlier call on `key` is still
    /// running).
    pub fn run<T, F>(&self, key: &str, timeout: Duration, f: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        {
            let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(key.to_string()) {
                return None;
            }
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

    /// True while a call on `key` is still running.
    pub fn busy(&self, key: &str) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn returns_the_value_in_time() {
        let b = Bounded::new();
        assert_eq!(b.run("k", Duration::from_secs(5), || 7), Some(7));
        assert!(!b.busy("k"));
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
