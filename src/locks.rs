//! One operation per volume at a time. A second concurrent operation on the
//! same volume (or name) gets ABORTED, as the CSI spec asks; different
//! volumes proceed in parallel. The guard is owned by the spawned operation,
//! so a client that gives up cannot release it before the work is done.
//! A key can also be held shared, by operations that only read what it
//! names (restores of one snapshot): together, never with an operation
//! that holds it alone (its DeleteSnapshot), which gets ABORTED.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// How a key is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    /// By one operation alone.
    Alone,
    /// By this many operations that share it.
    Shared(usize),
}

#[derive(Default)]
pub struct OpLocks {
    held: Mutex<HashMap<String, Hold>>,
}

/// Releases its keys when dropped.
pub struct OpGuard {
    locks: Arc<OpLocks>,
    /// Each key, and whether this guard shares it.
    keys: Vec<(String, bool)>,
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

    /// Whether any operation holds `key` (alone or shared).
    pub fn is_held(&self, key: &str) -> bool {
        self.held
            .lock()
            .map(|h| h.contains_key(key))
            .unwrap_or(true)
    }
}

impl OpGuard {
    /// Adds another key to this guard (e.g. a volume's name after its id),
    /// held alone: ABORTED while any other operation holds it.
    pub fn also(&mut self, key: String) -> Result<()> {
        self.take(key, false)
    }

    /// Adds `key` shared: with other operations that share it, ABORTED
    /// while one holds it alone.
    pub fn also_shared(&mut self, key: String) -> Result<()> {
        self.take(key, true)
    }

    fn take(&mut self, key: String, shared: bool) -> Result<()> {
        let mut held = self
            .locks
            .held
            .lock()
            .map_err(|_| Error::Internal("operation lock poisoned".into()))?;
        let busy = || {
            Err(Error::Busy(format!(
                "an operation on {key} is already in progress"
            )))
        };
        if let Some(i) = self.keys.iter().position(|(k, _)| *k == key) {
            // Held by this guard already: alone covers shared; shared
            // becomes alone only if no other operation shares it.
            if shared || !self.keys[i].1 {
                return Ok(());
            }
            if held.get(&key) != Some(&Hold::Shared(1)) {
                return busy();
            }
            held.insert(key, Hold::Alone);
            self.keys[i].1 = false;
            return Ok(());
        }
        match (held.get(&key).copied(), shared) {
            (None, false) => {
                held.insert(key.clone(), Hold::Alone);
            }
            (None, true) => {
                held.insert(key.clone(), Hold::Shared(1));
            }
            (Some(Hold::Shared(n)), true) => {
                held.insert(key.clone(), Hold::Shared(n + 1));
            }
            _ => return busy(),
        }
        self.keys.push((key, shared));
        Ok(())
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        for (k, _) in &self.keys {
            match held.get(k).copied() {
                Some(Hold::Shared(n)) if n > 1 => {
                    held.insert(k.clone(), Hold::Shared(n - 1));
                }
                _ => {
                    held.remove(k);
                }
            }
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

    #[test]
    fn a_shared_key_is_shared_and_never_held_alone_meanwhile() {
        let l = OpLocks::new();
        let mut a = l.try_lock("vol/a".into()).unwrap();
        a.also_shared("snap/s".into()).unwrap();
        let mut b = l.try_lock("vol/b".into()).unwrap();
        b.also_shared("snap/s".into()).unwrap();
        assert!(matches!(l.try_lock("snap/s".into()), Err(Error::Busy(_))));
        // Not alone while another shares it.
        assert!(b.also("snap/s".into()).is_err());
        drop(a);
        assert!(l.is_held("snap/s"));
        assert!(l.try_lock("snap/s".into()).is_err());
        drop(b);
        assert!(!l.is_held("snap/s"));
        let alone = l.try_lock("snap/s".into()).unwrap();
        let mut c = l.try_lock("vol/c".into()).unwrap();
        assert!(matches!(
            c.also_shared("snap/s".into()),
            Err(Error::Busy(_))
        ));
        drop(alone);
        c.also_shared("snap/s".into()).unwrap();
        // The only one sharing it may hold it alone.
        c.also("snap/s".into()).unwrap();
        let mut d = l.try_lock("vol/d".into()).unwrap();
        assert!(d.also_shared("snap/s".into()).is_err());
        drop(c);
        assert!(!l.is_held("snap/s"));
    }
}
