//! /proc/self/mountinfo: the kernel's table of what is mounted where.
//!
//! `stat` on a broken mount fails with EIO/ENOTCONN/ESTALE and comparing
//! device numbers misses bind mounts from the same filesystem, so Berth
//! decides mounts only from the kernel: from this table whenever it must
//! know *what* is mounted (which device and directory a mount shows, where
//! else a volume is mounted, how many mounts are stacked at a path), and
//! from the one-path mount-root probe (`mountpoint.rs`, statx
//! STATX_ATTR_MOUNT_ROOT) where "is anything mounted exactly here?" is the
//! whole question (stage on a free path, unpublish, unstage of nothing);
//! when the probe cannot tell, this table decides. Reading and parsing the
//! table costs time proportional to every mount on the node, so callers
//! read it once per decision and pass it along (`node::mounts::LazyTable`).
use std::borrow::Cow;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::OsError;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted here (differs from "/"
    /// for bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
    /// The peer group it is in (`shared:N`; 0: not shared). A mount made
    /// under a shared mount is copied onto the parent's peers, and it and
    /// its copies are peers.
    pub shared: u32,
    /// The peer group it receives mounts from (`master:N`; 0: none).
    pub master: u32,
}

impl MountEntry {
    pub fn readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    pub fn has_option(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }

    /// Same filesystem object (device and directory within it).
    pub fn same_object(&self, other: &MountEntry) -> bool {
        self.major == other.major && self.minor == other.minor && self.root == other.root
    }
}

/// Reads the mount table. Real: `ProcMountTable`; fake: `fake::FakeOs`.
pub trait MountTable: Send + Sync {
    fn mounts(&self) -> Result<Vec<MountEntry>, OsError>;
}

/// Reads /proc/self/mountinfo (or another file, for tests): opened once
/// and kept open, each read a pread(2) from its start until one returns
/// nothing (the kernel writes the table anew for a read at offset 0), into
/// a buffer the size the last table took. Two syscalls a read for a table
/// that fits, where opening it each time took six (open, fstat, lseek, two
/// reads, close): the table is read on most node RPCs. A read beside
/// another opens its own descriptor; a failed read drops the kept one (the
/// next read opens it again).
#[derive(Debug, Clone)]
pub struct ProcMountTable {
    pub path: PathBuf,
    open: Arc<Mutex<Option<File>>>,
    last_len: Arc<AtomicUsize>,
}

impl ProcMountTable {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProcMountTable {
            path: path.into(),
            open: Arc::default(),
            last_len: Arc::new(AtomicUsize::new(16 * 1024)),
        }
    }

    fn read(&self) -> Result<Vec<u8>, OsError> {
        let opened = || File::open(&self.path).map_err(|e| OsError::sys("open", &self.path, e));
        // The kept descriptor while no other read holds it; beside one (RPCs
        // in flight together) a descriptor of its own, as before: reads are
        // never queued behind each other (one of a large table takes long).
        let mut kept = match self.open.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let own;
        let f = match kept.as_deref_mut() {
            Some(Some(f)) => &*f,
            Some(slot) => &*slot.insert(opened()?),
            None => {
                own = opened()?;
                &own
            }
        };
        let r = self.read_all(f);
        if r.is_err() {
            if let Some(slot) = kept.as_deref_mut() {
                *slot = None;
            }
        }
        r
    }

    /// Reads `f` whole from its start.
    fn read_all(&self, f: &File) -> Result<Vec<u8>, OsError> {
        // Room for the last table and some more: the second pread then
        // only finds the end.
        let mut buf = vec![0u8; self.last_len.load(Ordering::Relaxed) + 4096];
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match f.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(OsError::sys("read", &self.path, e)),
            }
        }
        buf.truncate(len);
        self.last_len.store(len, Ordering::Relaxed);
        Ok(buf)
    }
}

impl Default for ProcMountTable {
    fn default() -> Self {
        ProcMountTable::new("/proc/self/mountinfo")
    }
}

impl MountTable for ProcMountTable {
    fn mounts(&self) -> Result<Vec<MountEntry>, OsError> {
        parse(&self.read()?)
    }
}

/// Parses the whole text of a mountinfo file. It is bytes, not text: a
/// mount point may have any name the kernel allows (not UTF-8 ones too);
/// paths keep their bytes, the other fields are shown lossily.
pub fn parse(text: &[u8]) -> Result<Vec<MountEntry>, OsError> {
    text.split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(parse_line)
        .collect()
}

fn number<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(b).into_owned()))
}

fn text(b: &[u8]) -> String {
    // One copy, checked once (a lossy copy only when it is not UTF-8).
    String::from_utf8(unescape(b).into_owned())
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn parse_line(line: &[u8]) -> Result<MountEntry, OsError> {
    let bad = || {
        OsError::MountInfo(format!(
            "malformed line: {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    let mut it = line.split(|b| *b == b' ');
    let id = it.next().and_then(number).ok_or_else(bad)?;
    let parent = it.next().and_then(number).ok_or_else(bad)?;
    let (major, minor) = it
        .next()
        .and_then(|s| {
            let i = s.iter().position(|b| *b == b':')?;
            Some((number(&s[..i])?, number(&s[i + 1..])?))
        })
        .ok_or_else(bad)?;
    let root = path(it.next().ok_or_else(bad)?);
    let mount_point = path(it.next().ok_or_else(bad)?);
    let options = text(it.next().ok_or_else(bad)?);
    // Optional fields end at a lone "-".
    let (mut shared, mut master) = (0, 0);
    loop {
        match it.next() {
            Some(b"-") => break,
            Some(f) => {
                if let Some(n) = f.strip_prefix(b"shared:") {
                    shared = number(n).ok_or_else(bad)?;
                } else if let Some(n) = f.strip_prefix(b"master:") {
                    master = number(n).ok_or_else(bad)?;
                }
            }
            None => return Err(bad()),
        }
    }
    let fs_type = text(it.next().ok_or_else(bad)?);
    let source = text(it.next().ok_or_else(bad)?);
    let super_options = it.next().map(text).unwrap_or_default();
    Ok(MountEntry {
        id,
        parent,
        major,
        minor,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
        shared,
        master,
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash). Borrows a field without escapes (nearly
/// all of them): the table is read on every unstage and delete.
pub fn unescape(b: &[u8]) -> Cow<'_, [u8]> {
    if !b.contains(&b'\\') {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64
                    + (oct[1] - b'0') as u32 * 8
                    + (oct[2] - b'0') as u32;
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// All entries mounted exactly at `path`, bottom first (mount order).
pub fn at<'a>(table: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    table.iter().filter(|m| m.mount_point == path).collect()
}

/// The entry whose mount point is the longest prefix of `path`: the mount
/// that `path` lives on (the last one, if several are stacked).
pub fn containing<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    // Later entries are mounted on top of earlier ones at the same point.
    table
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.as_os_str().len(), *i))
        .map(|(_, m)| m)
}

/// What a bind mount of `path` would show in mountinfo: the device and the
/// directory within that device's filesystem.
pub fn object_of(table: &[MountEntry], path: &Path) -> Option<(u32, u32, PathBuf)> {
    let m = containing(table, path)?;
    let rel = path.strip_prefix(&m.mount_point).ok()?;
    let root = if rel.as_os_str().is_empty() {
        m.root.clone()
    } else {
        m.root.join(rel)
    };
    Some((m.major, m.minor, root))
}

/// Mount entries showing the filesystem object `obj` (device and directory).
pub fn mounts_of<'a>(table: &'a [MountEntry], obj: &(u32, u32, PathBuf)) -> Vec<&'a MountEntry> {
    table
        .iter()
        .filter(|m| m.major == obj.0 && m.minor == obj.1 && m.root == obj.2)
        .collect()
}

/// Where in its filesystem the mount point of `m` is: its parent's root
/// joined with its path below the parent's mount point (None: the parent
/// is not in `table`).
fn place_in_parent<'a>(
    table: &'a [MountEntry],
    m: &MountEntry,
) -> Option<(&'a MountEntry, PathBuf)> {
    let parent = table.iter().find(|p| p.id == m.parent && p.id != m.id)?;
    let rel = m.mount_point.strip_prefix(&parent.mount_point).ok()?;
    Some((parent, parent.root.join(rel)))
}

/// Whether `m` is a copy the kernel made of the mount `of` by propagation,
/// not a mount of its own (a bind a user made): it shows the same object,
/// and it sits on a mount that is a peer of the one `of` sits on (or
/// receives its mounts), at the same place in that filesystem. Such a
/// copy goes when `of` is unmounted. Example: `/var/lib/kubelet` bound
/// from `/data/kubelet`, shared: a staging mount under one appears under
/// the other too. A bind of `of` elsewhere (a publication) sits at another
/// place, so it is never taken for a copy.
pub fn propagated_copy_of(table: &[MountEntry], m: &MountEntry, of: &MountEntry) -> bool {
    if m.id == of.id || !m.same_object(of) {
        return false;
    }
    let (Some((pm, place_m)), Some((po, place_o))) =
        (place_in_parent(table, m), place_in_parent(table, of))
    else {
        return false;
    };
    let receives = po.shared != 0 && (pm.shared == po.shared || pm.master == po.shared);
    receives && pm.id != po.id && (pm.major, pm.minor) == (po.major, po.minor) && place_m == place_o
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
30 22 0:25 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
41 22 8:1 /var/lib/berth/local/v1 /mnt/stage\\040dir rw,relatime shared:1 - ext4 /dev/sda1 rw
42 22 8:1 /var/lib/berth/local/v1 /mnt/target ro,relatime shared:1 - ext4 /dev/sda1 rw
";

    /// `/var/lib/kubelet` bound from `/data/kubelet`, shared; a peer of it
    /// for a subdirectory (`/plugins`) and a slave (`/slave`); a private
    /// bind (`/private`). Volume 7:0 staged (60) and published (62).
    const PEERS: &str = "\
22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw
50 22 8:1 /data/kubelet /var/lib/kubelet rw shared:7 - ext4 /dev/sda1 rw
51 22 8:1 /data/kubelet /data/kubelet rw shared:7 - ext4 /dev/sda1 rw
52 22 8:1 /data/kubelet/plugins /plugins rw shared:7 - ext4 /dev/sda1 rw
53 22 8:1 /data/kubelet /slave rw master:7 - ext4 /dev/sda1 rw
54 22 8:1 /data/kubelet /private rw - ext4 /dev/sda1 rw
60 50 7:0 / /var/lib/kubelet/plugins/csi/x/globalmount rw shared:9 - ext4 /dev/loop0 rw
61 51 7:0 / /data/kubelet/plugins/csi/x/globalmount rw shared:9 - ext4 /dev/loop0 rw
62 50 7:0 / /var/lib/kubelet/pods/u/mount rw shared:9 - ext4 /dev/loop0 rw
63 51 7:0 / /data/kubelet/pods/u/mount rw shared:9 - ext4 /dev/loop0 rw
64 52 7:0 / /plugins/csi/x/globalmount rw shared:9 - ext4 /dev/loop0 rw
65 53 7:0 / /slave/plugins/csi/x/globalmount rw master:9 - ext4 /dev/loop0 rw
66 54 7:0 / /private/plugins/csi/x/globalmount rw shared:9 - ext4 /dev/loop0 rw
67 51 7:0 /lost+found /data/kubelet/plugins/csi/x/globalmount rw shared:9 - ext4 /dev/loop0 rw
";

    #[test]
    fn reads_peer_groups() {
        let t = parse(PEERS.as_bytes()).unwrap();
        let by = |id| t.iter().find(|m| m.id == id).unwrap();
        assert_eq!((by(50).shared, by(50).master), (7, 0));
        assert_eq!((by(53).shared, by(53).master), (0, 7));
        assert_eq!((by(54).shared, by(54).master), (0, 0));
        assert!(parse(b"1 2 8:1 / / rw shared:x - ext4 /dev/x rw\n").is_err());
    }

    #[test]
    fn copies_made_by_propagation_are_told_from_binds() {
        let t = parse(PEERS.as_bytes()).unwrap();
        let by = |id| t.iter().find(|m| m.id == id).unwrap();
        let copy = |m, of| propagated_copy_of(&t, by(m), by(of));
        // The staging mount's copies: under the peer, under the peer of a
        // subdirectory, under the slave.
        assert!(copy(61, 60) && copy(64, 60) && copy(65, 60));
        // Not copies: the mount itself, the publication and its copy, a
        // mount under a private bind, another directory of the volume.
        assert!(!copy(60, 60) && !copy(62, 60) && !copy(63, 60));
        assert!(!copy(66, 60) && !copy(67, 60));
        // The publication's copy is its copy; the staging mount is not.
        assert!(copy(63, 62) && !copy(60, 62));
    }

    #[test]
    fn parses_fields_and_escapes() {
        let t = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[2].mount_point, PathBuf::from("/mnt/stage dir"));
        assert_eq!(t[2].root, PathBuf::from("/var/lib/berth/local/v1"));
        assert_eq!((t[2].major, t[2].minor), (8, 1));
        assert!(t[3].readonly());
        assert!(!t[2].readonly());
        assert_eq!(t[1].fs_type, "proc");
        assert!(t[1].has_option("nosuid"));
    }

    #[test]
    fn object_and_mounts_of() {
        let t = parse(SAMPLE.as_bytes()).unwrap();
        let obj = object_of(&t, Path::new("/var/lib/berth/local/v1")).unwrap();
        assert_eq!(obj, (8, 1, PathBuf::from("/var/lib/berth/local/v1")));
        let m = mounts_of(&t, &obj);
        assert_eq!(m.len(), 2);
        // Inside a bind mount, the object is relative to the bind's root.
        let inner = object_of(&t, Path::new("/mnt/target/sub")).unwrap();
        assert_eq!(inner.2, PathBuf::from("/var/lib/berth/local/v1/sub"));
    }

    #[test]
    fn each_read_is_the_table_as_it_is_then() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mountinfo");
        std::fs::write(&file, SAMPLE).unwrap();
        let table = ProcMountTable::new(&file);
        assert_eq!(table.mounts().unwrap().len(), 4);
        // Longer than the buffer the last read sized (grown while read),
        // then shorter again: the open descriptor reads each from its start.
        let line = "50 22 8:1 /x /mnt/many rw - ext4 /dev/sda1 rw\n";
        let long = format!("{SAMPLE}{}", line.repeat(2000));
        std::fs::write(&file, &long).unwrap();
        assert!(long.len() > 64 * 1024);
        assert_eq!(table.mounts().unwrap().len(), 2004);
        std::fs::write(&file, SAMPLE).unwrap();
        assert_eq!(table.mounts().unwrap().len(), 4);
        // The kernel's own table, twice from the kept descriptor: whole
        // each time (others may mount beside this test: not compared).
        let own = ProcMountTable::default();
        for _ in 0..2 {
            let t = own.mounts().unwrap();
            assert!(t.iter().any(|m| m.mount_point == Path::new("/")), "{t:?}");
        }
        // A read beside another (which holds the kept descriptor) is not
        // queued behind it: it reads with a descriptor of its own.
        let held = table.open.lock().unwrap();
        std::fs::write(&file, &long).unwrap();
        assert_eq!(table.mounts().unwrap().len(), 2004);
        drop(held);
        assert_eq!(table.mounts().unwrap().len(), 2004);
    }

    #[test]
    fn mount_points_that_are_not_utf8_are_read_as_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mountinfo");
        let mut text = SAMPLE.as_bytes().to_vec();
        text.extend_from_slice(
            b"43 22 8:1 /x /mnt/odd-\xff\\040\xfe rw shared:1 - ext4 /dev/sda1 rw\n",
        );
        std::fs::write(&file, &text).unwrap();
        let t = ProcMountTable::new(file).mounts().unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(
            t[4].mount_point.as_os_str().as_bytes(),
            b"/mnt/odd-\xff \xfe"
        );
        assert_eq!(t[2].mount_point, PathBuf::from("/mnt/stage dir"));
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse(b"1 2 3\n").is_err());
        assert!(parse(b"1 2 8:1 / / rw shared:1 ext4 /dev/x rw\n").is_err());
    }

    #[test]
    fn unescape_cases() {
        assert_eq!(&*unescape(b"a\\040b\\011c\\012d\\134e"), b"a b\tc\nd\\e");
        assert_eq!(&*unescape(b"trailing\\04"), b"trailing\\04");
        assert_eq!(&*unescape(b"\\999"), b"\\999");
        assert_eq!(&*unescape(b"\\777"), b"\\777", "above 255: kept as it is");
    }

    proptest::proptest! {
        #[test]
        fn unescape_never_panics(s in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = unescape(&s);
            let _ = parse(&s);
        }

        #[test]
        fn escaped_paths_roundtrip(s in "[a-z \\t\\\\]{1,20}") {
            let esc: String = s.chars().map(|c| match c {
                ' ' => "\\040".to_string(),
                '\t' => "\\011".to_string(),
                '\\' => "\\134".to_string(),
                c => c.to_string(),
            }).collect();
            proptest::prop_assert_eq!(&*unescape(esc.as_bytes()), s.as_bytes());
        }
    }
}
