//! The whole-disk pool ("one PV, one disk"): `--disk-pool` names devices
//! by path, glob or directory of device links. A disk is free when no
//! record claims it, nothing mounts it, it is not one of Berth's own loop
//! devices, no other process holds it (it opens exclusively, O_EXCL, at
//! the time it is chosen), it can be read, `blkid -p` finds no signature
//! at all on it, and its sample (first and last MiB, 64 spaced 4 KiB
//! blocks: `os::blockdev::sample_ranges`) reads as zeros. A disk that
//! reads as anything else holds someone's data, signature or not: it is
//! never handed to a tenant (nor formatted) until it is erased.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{lock, BlockKind};
use crate::error::{Error, Result};
use crate::node::mounts;
use crate::os::blkid::{self, Probe};
use crate::os::DeviceInfo;
use crate::state::DiskRef;

/// A disk of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The path the pool names it by.
    pub listed: PathBuf,
    pub dev: DeviceInfo,
}

/// Paths the `--disk-pool` entries name, in a stable order.
pub fn expand(entries: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        if !e.starts_with('/') {
            tracing::warn!(entry = %e, "--disk-pool entries must be absolute paths; ignored");
            continue;
        }
        if e.contains(['*', '?', '[']) {
            out.extend(glob(e));
            continue;
        }
        let p = PathBuf::from(e);
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
                .map(|rd| rd.filter_map(|x| x.ok()).map(|x| x.path()).collect())
                .unwrap_or_default();
            v.sort();
            out.extend(v);
        } else {
            out.push(p);
        }
    }
    out
}

/// Expands `*`, `?` and `[...]` in the components of an absolute pattern.
/// Names starting with a dot match only a pattern starting with one.
pub fn glob(pattern: &str) -> Vec<PathBuf> {
    let mut current = vec![PathBuf::from("/")];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let wild = comp.contains(['*', '?', '[']);
        let mut next = Vec::new();
        for base in &current {
            if !wild {
                next.push(base.join(comp));
                continue;
            }
            let Ok(rd) = std::fs::read_dir(base) else {
                continue;
            };
            let mut names: Vec<_> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| {
                    let n = n.as_encoded_bytes();
                    (comp.starts_with('.') || !n.starts_with(b".")) && wildmatch(comp.as_bytes(), n)
                })
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| base.join(n)));
        }
        current = next;
    }
    current
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect()
}

/// Shell-style match of one name against one pattern component.
pub fn wildmatch(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((hit, len)) = class(&p[pi..], s[si]) {
                        if hit {
                            pi += len;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p`: whether `c` is in it and the
/// class's length; None when it has no closing bracket.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            if p[i] <= c && c <= p[i + 2] {
                hit = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                hit = true;
            }
            i += 1;
        }
    }
    None
}

/// The warning for a pool disk whose sample does not read as zeros.
fn holds_data(listed: &Path) -> String {
    format!(
        "pool disk {} has no signature but does not read as zeros (its first and last MiB and {} spaced 4 KiB blocks are read): it may hold someone's data, so it is not offered; to offer it, erase it, e.g. `blkdiscard -z {}` or zeroing it whole with dd",
        listed.display(),
        crate::os::blockdev::SAMPLE_BLOCKS,
        listed.display()
    )
}

impl BlockKind {
    /// Every block device the pool names (duplicates by device number
    /// dropped); entries that are not block devices are skipped.
    pub(super) fn pool_disks(&self) -> Vec<Disk> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for listed in expand(&self.disk_pool) {
            match self.os.devices.inspect(&listed) {
                Ok(dev) => {
                    if seen.insert((dev.major, dev.minor)) {
                        out.push(Disk { listed, dev });
                    }
                }
                Err(e) => {
                    tracing::debug!(path = %listed.display(), error = %e, "not a disk; skipped")
                }
            }
        }
        out
    }

    /// The disks of the pool nobody uses, smallest first.
    pub(super) fn free_disks(&self) -> Result<Vec<Disk>> {
        let mut claimed_numbers = HashSet::new();
        let mut claimed_paths = HashSet::new();
        for rec in self
            .store
            .filter(|r| r.block.as_ref().is_some_and(|b| b.disk.is_some()))
        {
            if let Some(d) = rec.block.and_then(|b| b.disk) {
                claimed_numbers.insert((d.major, d.minor));
                claimed_paths.insert(d.device.clone());
                for p in [Some(&d.path), d.by_id.as_ref()].into_iter().flatten() {
                    if let Ok(now) = self.os.devices.inspect(p) {
                        claimed_numbers.insert((now.major, now.minor));
                        claimed_paths.insert(now.path);
                    }
                }
            }
        }
        let t = mounts::table(&self.os)?;
        let mounted: HashSet<(u32, u32)> = t.iter().map(|m| (m.major, m.minor)).collect();
        let own_loops: HashSet<PathBuf> = self
            .os
            .loops
            .list()
            .map_err(|e| Error::os("listing loop devices", e))?
            .into_iter()
            .filter(|l| l.backing_file.starts_with(&self.root))
            .map(|l| l.device)
            .collect();
        let mut free = Vec::new();
        for d in self.pool_disks() {
            let n = (d.dev.major, d.dev.minor);
            if claimed_numbers.contains(&n)
                || claimed_paths.contains(&d.dev.path)
                || mounted.contains(&n)
                || own_loops.contains(&d.dev.path)
            {
                continue;
            }
            match self.os.devices.held(&d.dev.path) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::debug!(disk = %d.listed.display(), "pool disk is held open exclusively by another process; not offered");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "pool disk cannot be opened exclusively; not offered");
                    continue;
                }
            }
            if self.os.devices.read_head(&d.dev.path).is_err() {
                tracing::warn!(disk = %d.listed.display(), "pool disk cannot be read; not offered");
                continue;
            }
            match blkid::probe(self.os.cmd.as_ref(), &d.dev.path) {
                Ok(Probe::Blank) => {}
                Ok(p) => {
                    tracing::debug!(disk = %d.listed.display(), found = %p.describe(), "pool disk has a signature; not offered");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %e, "pool disk could not be probed; not offered");
                    continue;
                }
            }
            match self.os.devices.reads_zero(&d.dev.path, d.dev.size_bytes) {
                Ok(true) => {
                    lock(&self.data_warned).remove(&d.listed);
                    free.push(d);
                }
                Ok(false) => {
                    if lock(&self.data_warned).insert(d.listed.clone()) {
                        tracing::warn!(disk = %d.listed.display(), device = %d.dev.path.display(), "{}", holds_data(&d.listed));
                    } else {
                        tracing::debug!(disk = %d.listed.display(), "pool disk holds data; not offered");
                    }
                }
                Err(e) => {
                    tracing::warn!(disk = %d.listed.display(), error = %crate::error::chain(&e), "pool disk's sample could not be read; not offered");
                }
            }
        }
        free.sort_by_key(|d| (d.dev.size_bytes, d.listed.clone()));
        Ok(free)
    }

    /// The size of the disk a new volume of at least `wanted` and at most
    /// `limit` bytes gets: the smallest free disk that fits. When none fits
    /// the answer is RESOURCE_EXHAUSTED (another node may have one: the
    /// external-provisioner then lets the scheduler pick again).
    pub(super) fn disk_size_for(&self, wanted: i64, limit: i64) -> Result<i64> {
        let fits = |size: u64| {
            let s = i64::try_from(size).unwrap_or(i64::MAX);
            s >= wanted && (limit == 0 || s <= limit)
        };
        if let Some(d) = self
            .free_disks()?
            .into_iter()
            .find(|d| fits(d.dev.size_bytes))
        {
            return Ok(i64::try_from(d.dev.size_bytes).unwrap_or(i64::MAX));
        }
        let range = if limit > 0 {
            format!("of {wanted} to {limit} bytes")
        } else {
            format!("of {wanted} bytes or more")
        };
        Err(Error::NoSpace(if self.disk_pool.is_empty() {
            "this node offers no disks (no --disk-pool)".to_string()
        } else if self.pool_disks().iter().any(|d| fits(d.dev.size_bytes)) {
            format!("no free disk {range} on this node: every fitting disk is in use, held by another process, or not blank (a signature, or data where a blank disk reads as zeros)")
        } else {
            format!("this node's disk pool has no disk {range}")
        }))
    }

    /// Claims a free disk of exactly `size` bytes.
    pub(super) fn claim_disk(&self, size: i64) -> Result<DiskRef> {
        let d = self
            .free_disks()?
            .into_iter()
            .find(|d| i64::try_from(d.dev.size_bytes).ok() == Some(size))
            .ok_or_else(|| {
                // A concurrent create took it; a retry chooses again.
                Error::Busy(format!(
                    "the free disk of {size} bytes chosen for this volume was taken by a concurrent create; retry"
                ))
            })?;
        let by_id = self
            .os
            .devices
            .stable_link(&d.dev)
            .filter(|l| l != &d.listed);
        Ok(DiskRef {
            path: d.listed,
            device: d.dev.path,
            by_id,
            major: d.dev.major,
            minor: d.dev.minor,
            size_bytes: d.dev.size_bytes,
        })
    }

    /// The device of a recorded disk, if it is still the same disk: found
    /// by its by-id link (or pool path) with the recorded size, and with
    /// the recorded device number unless a by-id link found it.
    /// NOT_FOUND when it is gone, FAILED_PRECONDITION when another device is
    /// there now.
    pub(super) fn resolve_disk(&self, d: &DiskRef) -> Result<DeviceInfo> {
        let path: &Path = d.by_id.as_deref().unwrap_or(&d.path);
        let dev = self.os.devices.inspect(path).map_err(|e| {
            Error::NotFound(format!(
                "disk {} of the volume is missing: {}",
                path.display(),
                e
            ))
        })?;
        let same_number = (dev.major, dev.minor) == (d.major, d.minor);
        if dev.size_bytes != d.size_bytes || (d.by_id.is_none() && !same_number) {
            return Err(Error::WrongState(format!(
                "{} is now {} ({}:{}, {} bytes), not the disk the volume was created on ({}:{}, {} bytes); refusing to use it",
                path.display(),
                dev.path.display(),
                dev.major,
                dev.minor,
                dev.size_bytes,
                d.major,
                d.minor,
                d.size_bytes
            )));
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let m = |p: &str, s: &str| wildmatch(p.as_bytes(), s.as_bytes());
        assert!(m("nvme-*", "nvme-Samsung_123"));
        assert!(!m("nvme-*", "ata-x"));
        assert!(m("loop?", "loop7"));
        assert!(!m("loop?", "loop12"));
        assert!(m("sd[b-d]", "sdc"));
        assert!(!m("sd[b-d]", "sda"));
        assert!(m("sd[!a]", "sdb"));
        assert!(!m("sd[!a]", "sda"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("[", "["));
        assert!(m("x[]]", "x]"));
    }

    #[test]
    fn expands_globs_and_directories() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("disks");
        std::fs::create_dir(&d).unwrap();
        for n in ["d2", "d1", ".hidden", "other"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        let base = d.display().to_string();
        assert_eq!(
            expand(&[format!("{base}/d*")]),
            vec![d.join("d1"), d.join("d2")]
        );
        assert_eq!(
            expand(std::slice::from_ref(&base)),
            vec![
                d.join(".hidden"),
                d.join("d1"),
                d.join("d2"),
                d.join("other")
            ]
        );
        assert_eq!(
            expand(&[format!("{base}/other"), " ".into(), "relative/x".into()]),
            vec![d.join("other")]
        );
        assert!(expand(&[format!("{base}/nothing*")]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn literal_patterns_match_themselves(s in "[a-z0-9_.-]{0,12}") {
            proptest::prop_assert!(wildmatch(s.as_bytes(), s.as_bytes()));
            proptest::prop_assert!(wildmatch(b"*", s.as_bytes()));
        }

        #[test]
        fn never_panics(p in "[a-c*?\\[\\]!^-]{0,10}", s in "[a-c\\[\\]-]{0,10}") {
            let _ = wildmatch(p.as_bytes(), s.as_bytes());
        }
    }
}
