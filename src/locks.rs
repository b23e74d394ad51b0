//! One operation per volume at a time. A second concurrent operation on the
//! same volume (or name) gets ABORTED, as the CSI spec asks; different
//! volumes proceed in parallel. The guard is owned by the spawned operation,
//! so a client that gives up cannot release it before the work is done.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Default)]
pub struct OpLocks {
    held: Mutex<HashSet<String>>,
}

/// Releases its keys when dropped.
pub struct OpGuard {
    locks: Arc<OpLocks>,
    keys: Vec<String>,
}

impl OpLocks {
    pub fn new() -> Arc<Self> {
        Arc::new(OpLocks::default())
    }

    /// Takes `key` or fails at once with ABORTED.
    pub fn try_lock(self: &Arc<Self>, key: String) -> Result<OpGuard> {
        let mut g = OpGuard {
            locks: self.clone(),
            keys: Vec::with_capacity(2),
        };
        g.also(key)?;
        Ok(g)
    }

    pub fn is_held(&self, key: &str) -> bool {
        self.held.lock().map(|h| h.contains(key)).unwrap_or(true)
    }
}

impl OpGuard {
    /// Adds another key to this guard (e.g. a volume's name after its id).
    pub fn also(&mut self, key: String) -> Result<()> {
        if self.keys.contains(&key) {
            return Ok(());
        }
        let mut held = self
            .locks
            .held
            .lock()
            .map_err(|_| Error::Internal("operation lock poisoned".into()))?;
        if !held.insert(key.clone()) {
            return Err(Error::Busy(format!(
                "an operation on {key} is already in progress"
            )));
        }
        self.keys.push(key);
        Ok(())
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_aborts_until_released() {
        let l = OpLocks::new();
        let g = l.try_lock("vol/a".into()).unwrap();
        assert!(matches!(l.try_lock("vol/a".into()), Err(Error::Busy(_))));
        let _other = l.try_lock("vol/b".into()).unwrap();
        drop(g);
        assert!(l.try_lock("vol/a".into()).is_ok());
    }

    #[test]
    fn also_adds_keys_and_fails_cleanly() {
        let l = OpLocks::new();
        let _b = l.try_lock("name/x".into()).unwrap();
        let mut g = l.try_lock("vol/x".into()).unwrap();
        assert!(g.also("name/x".into()).is_err());
        assert!(g.also("vol/x".into()).is_ok());
        drop(g);
        assert!(!l.is_held("vol/x"));
        assert!(l.is_held("name/x"));
    }
}
