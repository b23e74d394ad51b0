//! Filesystem tools run on block volumes: mkfs.ext4 / mkfs.xfs, resize2fs /
//! xfs_growfs, wipefs. Arguments are built here, every user-supplied option
//! checked against an allowlist first (`check_options`).
use std::path::Path;
use std::time::Duration;

use super::command::Runner;
use super::files::Files;
use super::OsError;

const MKFS_TIMEOUT: Duration = Duration::from_secs(600);
const GROW_TIMEOUT: Duration = Duration::from_secs(1800);
const WIPE_TIMEOUT: Duration = Duration::from_secs(120);

/// Filesystems Berth formats block volumes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filesystem {
    Ext4,
    Xfs,
}

impl Filesystem {
    pub const ALL: [Filesystem; 2] = [Filesystem::Ext4, Filesystem::Xfs];

    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }

    pub fn parse(s: &str) -> Option<Filesystem> {
        Filesystem::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Smallest device mkfs accepts (mkfs.xfs refuses below 300 MiB).
    pub fn min_bytes(self) -> i64 {
        match self {
            Filesystem::Ext4 => 1 << 20,
            Filesystem::Xfs => 300 << 20,
        }
    }

    pub fn mkfs_program(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "mkfs.ext4",
            Filesystem::Xfs => "mkfs.xfs",
        }
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The command line of a fast mkfs: no discard pass and no full inode table
/// or journal initialisation (the kernel does it lazily); ext4 without
/// reserved blocks, so the usable size is the requested size. `force` only
/// for redoing Berth's own interrupted mkfs (mkfs.xfs refuses to overwrite a
/// filesystem without it).
/// `uuid` is the filesystem UUID (pinned in the volume's record before
/// mkfs runs, so a retry can tell Berth's own filesystem).
pub fn mkfs_args(
    fs: Filesystem,
    device: &Path,
    options: &[String],
    force: bool,
    uuid: &str,
) -> Vec<String> {
    let mut a: Vec<String> = match fs {
        Filesystem::Ext4 => vec![
            "-q".into(),
            "-m".into(),
            "0".into(),
            "-E".into(),
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard".into(),
            "-U".into(),
            uuid.into(),
        ],
        Filesystem::Xfs => vec!["-q".into(), "-K".into()],
    };
    a.extend(options.iter().cloned());
    if fs == Filesystem::Xfs {
        // The UUID is a metadata (-m) suboption: added to an -m the
        // options already have (mkfs.xfs takes each option once).
        match a.iter().position(|x| x == "-m") {
            Some(i) if i + 1 < a.len() => a[i + 1] = format!("{},uuid={uuid}", a[i + 1]),
            _ => a.extend(["-m".to_string(), format!("uuid={uuid}")]),
        }
    }
    if force {
        a.push(match fs {
            Filesystem::Ext4 => "-F".into(),
            Filesystem::Xfs => "-f".into(),
        });
    }
    a.push("--".into());
    a.push(device.display().to_string());
    a
}

pub fn mkfs(
    cmd: &dyn Runner,
    fs: Filesystem,
    device: &Path,
    options: &[String],
    force: bool,
    uuid: &str,
) -> Result<(), OsError> {
    let p = fs.mkfs_program();
    cmd.run(
        p,
        &mkfs_args(fs, device, options, force, uuid),
        MKFS_TIMEOUT,
    )?
    .check(p)
    .map(|_| ())
}

/// Grows a mounted filesystem to the size of its device: resize2fs takes
/// the device, xfs_growfs a mount point. A filesystem that already fills
/// its device is success.
pub fn grow(
    cmd: &dyn Runner,
    fs: Filesystem,
    device: &Path,
    mount_point: &Path,
) -> Result<(), OsError> {
    let (p, target) = match fs {
        Filesystem::Ext4 => ("resize2fs", device),
        Filesystem::Xfs => ("xfs_growfs", mount_point),
    };
    let args = vec!["--".to_string(), target.display().to_string()];
    cmd.run(p, &args, GROW_TIMEOUT)?.check(p).map(|_| ())
}

/// Whether a failed online grow was refused by the kernel for want of
/// privilege (EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE; resize2fs says
/// "Permission denied to resize filesystem").
pub fn resize_not_permitted(e: &OsError) -> bool {
    matches!(e, OsError::Failed { program, stderr, .. }
        if program == "resize2fs"
            && (stderr.contains("Permission denied") || stderr.contains("Operation not permitted")))
}

/// Whether `grow_ext4_unmounted` failed because `e2fsck -p` found errors
/// it does not fix on its own (exit status with bit 4 set: "UNEXPECTED
/// INCONSISTENCY; RUN fsck MANUALLY").
pub fn fsck_left_errors(e: &OsError) -> bool {
    match e {
        OsError::Failed {
            program, status, ..
        } if program == "e2fsck" => status
            .strip_prefix("exit ")
            .and_then(|c| c.parse::<u32>().ok())
            .is_some_and(|c| c & 4 != 0),
        _ => false,
    }
}

/// Grows an unmounted ext4 filesystem to its device: `e2fsck -f -p` (which
/// resize2fs demands of a filesystem last mounted after its last check;
/// exit 1, errors corrected, is success), then `resize2fs`. Unlike the
/// online resize (EXT4_IOC_RESIZE_FS) it needs no CAP_SYS_RESOURCE.
///
/// An offline resize2fs stopped midway (killed at its deadline, or with
/// berth, whose commands die with it) leaves errors `e2fsck -p` does not
/// fix. So resize2fs first saves what it overwrites in `undo` (`-z`), and
/// an undo file found here is such an interrupted resize: its blocks are
/// put back first (`undo_interrupted_ext4_growth`), which leaves the
/// filesystem as it was before that resize, and the growth is done again.
/// The undo file is removed once the check passes (a consistent
/// filesystem needs none), and again once the resize has finished; one
/// that could not be applied stays while the check fails, for whoever
/// repairs the filesystem by hand.
pub fn grow_ext4_unmounted(
    cmd: &dyn Runner,
    files: &dyn Files,
    device: &Path,
    undo: &Path,
) -> Result<(), OsError> {
    undo_interrupted_ext4_growth(cmd, files, device, undo)?;
    let dev = device.display().to_string();
    let out = cmd.run(
        "e2fsck",
        &["-f".into(), "-p".into(), "--".into(), dev.clone()],
        GROW_TIMEOUT,
    )?;
    if out.code != Some(1) {
        out.check("e2fsck")?;
    }
    remove_undo(files, undo)?;
    let args = vec![
        "-z".to_string(),
        undo.display().to_string(),
        "--".into(),
        dev,
    ];
    cmd.run("resize2fs", &args, GROW_TIMEOUT)?
        .check("resize2fs")?;
    remove_undo(files, undo)
}

/// When `undo` (the undo file of `grow_ext4_unmounted`) is there, an
/// offline resize of the ext4 filesystem on `device` did not finish: its
/// blocks are put back (`e2undo`) and the undo file is removed; true then.
/// Call it before anything mounts the filesystem: e2undo refuses a
/// filesystem whose superblock changed since the undo file was written (a
/// mount changes it), so an undo file is never applied to a filesystem
/// used after it. A refusal (as when the resize was stopped before it
/// changed anything), or e2undo failing to run, is logged and the undo
/// file kept: the check that `grow_ext4_unmounted` runs next decides.
pub fn undo_interrupted_ext4_growth(
    cmd: &dyn Runner,
    files: &dyn Files,
    device: &Path,
    undo: &Path,
) -> Result<bool, OsError> {
    match files.lstat(undo) {
        Ok(_) => {}
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    }
    let args = vec![
        "--".to_string(),
        undo.display().to_string(),
        device.display().to_string(),
    ];
    // Not run (no e2undo), stopped or refused alike: the check decides.
    match cmd
        .run("e2undo", &args, GROW_TIMEOUT)
        .and_then(|o| o.check("e2undo"))
    {
        Ok(_) => {
            tracing::warn!(device = %device.display(), undo = %undo.display(),
                "an offline ext4 resize did not finish: the blocks it changed were put back, and it is done again");
            remove_undo(files, undo)?;
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(device = %device.display(), undo = %undo.display(), error = %e,
                "an offline ext4 resize did not finish, and its undo file does not apply (nothing changed, or the filesystem was used since); the filesystem check decides");
            Ok(false)
        }
    }
}

/// Removes the undo file `undo` of `grow_ext4_unmounted`, if it is there.
pub fn remove_undo(files: &dyn Files, undo: &Path) -> Result<(), OsError> {
    match files.lstat(undo) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    match files.remove_file(undo) {
        Err(e) if e.errno() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// Erases every signature blkid can find (`wipefs -a`); refuses a device
/// that is in use. wipefs opens the device exclusively, once: it is run
/// again after each of `BUSY_PAUSES` while it fails so, as a hold of
/// milliseconds is no user (see `blockdev::BUSY_PAUSES`).
pub fn wipe(cmd: &dyn Runner, device: &Path) -> Result<(), OsError> {
    let args = vec!["-a".to_string(), "--".into(), device.display().to_string()];
    let mut pauses = super::blockdev::BUSY_PAUSES.iter();
    loop {
        let r = cmd.run("wipefs", &args, WIPE_TIMEOUT)?.check("wipefs");
        let busy = matches!(&r, Err(OsError::Failed { stderr, .. })
            if stderr.contains("Device or resource busy"));
        match pauses.next() {
            Some(p) if busy => std::thread::sleep(*p),
            _ => return r.map(|_| ()),
        }
    }
}

/// Checks the `mkfsOptions` StorageClass parameter for `fs` against an
/// allowlist and returns the arguments. Only options that shape the new
/// filesystem (block and inode sizes, feature flags, for compatibility with
/// older node kernels) are accepted; anything that names a device or file,
/// sets a label or UUID, or changes how mkfs runs is refused.
pub fn check_options(fs: Filesystem, text: &str) -> Result<Vec<String>, String> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    if tokens.len() > 16 {
        return Err("mkfsOptions has more than 16 words".into());
    }
    let mut out = Vec::new();
    // xfs suboptions seen so far, as (option, key): mkfs.xfs refuses one
    // given twice ("option respecified"), also in two groups of one option.
    let mut seen: Vec<(&str, &str)> = Vec::new();
    let mut it = tokens.into_iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            return Err(format!("mkfsOptions: {flag:?} needs a value"));
        };
        let ok = match fs {
            Filesystem::Ext4 => ext4_option(flag, value),
            Filesystem::Xfs => xfs_option(flag, value, &mut seen),
        };
        ok.map_err(|why| format!("mkfsOptions for {fs}: {flag} {value}: {why}"))?;
        out.push(flag.to_string());
        out.push(value.to_string());
    }
    Ok(out)
}

fn number(v: &str) -> Result<(), String> {
    if !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err("expected a number".into())
    }
}

/// A decimal number from `min` to `max`, as mke2fs and mkfs.xfs read one:
/// digits only.
fn number_in(v: &str, min: u64, max: u64) -> Result<(), String> {
    number(v)?;
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(()),
        _ => Err(format!("expected a number from {min} to {max}")),
    }
}

const EXT4_FEATURES: &[&str] = &[
    "64bit",
    "dir_index",
    "dir_nlink",
    "ext_attr",
    "extent",
    "extents",
    "extra_isize",
    "filetype",
    "flex_bg",
    "has_journal",
    "huge_file",
    "inline_data",
    "large_dir",
    "large_file",
    "metadata_csum",
    "metadata_csum_seed",
    "orphan_file",
    "resize_inode",
    "sparse_super",
    "sparse_super2",
    "uninit_bg",
];

fn ext4_option(flag: &str, v: &str) -> Result<(), String> {
    match flag {
        "-b" => match v {
            "1024" | "2048" | "4096" => Ok(()),
            _ => Err("block size must be 1024, 2048 or 4096".into()),
        },
        "-I" => match v {
            "128" | "256" | "512" | "1024" => Ok(()),
            _ => Err("inode size must be 128, 256, 512 or 1024".into()),
        },
        // mke2fs: "invalid inode ratio" outside these; "too many inodes"
        // from 2^32.
        "-i" => number_in(v, 1024, 67_108_864),
        "-N" => number_in(v, 0, u64::from(u32::MAX)),
        "-O" => {
            for f in v.split(',') {
                let name = f.strip_prefix('^').unwrap_or(f);
                if !EXT4_FEATURES.contains(&name) {
                    return Err(format!(
                        "feature {name:?} is not allowed (allowed: {})",
                        EXT4_FEATURES.join(", ")
                    ));
                }
            }
            Ok(())
        }
        _ => Err("option not allowed (allowed: -b, -i, -I, -N, -O)".into()),
    }
}

/// The form of an xfs suboption's value, as mkfs.xfs reads it.
#[derive(Clone, Copy)]
enum XfsValue {
    /// `0` or `1`.
    Bool,
    /// A number from the first bound to the second.
    Within(u64, u64),
    /// A number of bytes, optionally with a unit (`4096`, `4k`, `64M`).
    Size,
    /// A number of bytes without a unit (`-i size`: "Unit suffixes are
    /// not allowed").
    Bytes,
}

fn xfs_value(kind: XfsValue, v: &str) -> Result<(), String> {
    match kind {
        XfsValue::Bool => match v {
            "0" | "1" => Ok(()),
            _ => Err("expected 0 or 1".into()),
        },
        XfsValue::Within(min, max) => number_in(v, min, max),
        XfsValue::Size | XfsValue::Bytes => {
            let digits = match kind {
                XfsValue::Size => v
                    .strip_suffix(|c: char| "kmgtpeKMGTPE".contains(c))
                    .unwrap_or(v),
                _ => v,
            };
            // mkfs.xfs refuses a leading zero ("Not a valid value").
            if number(digits).is_ok() && !digits.starts_with('0') {
                Ok(())
            } else if matches!(kind, XfsValue::Size) {
                Err("expected a size: a number without leading zeros, optionally followed by k, m, g, t, p or e".into())
            } else {
                Err("expected a number of bytes without leading zeros and without a unit".into())
            }
        }
    }
}

fn xfs_option<'a>(
    flag: &'a str,
    v: &'a str,
    seen: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), String> {
    use XfsValue::{Bool, Bytes, Size, Within};
    let keys: &[(&str, XfsValue)] = match flag {
        "-b" | "-s" => &[("size", Size)],
        "-i" => &[
            ("size", Bytes),
            ("maxpct", Within(0, 100)),
            ("sparse", Bool),
            ("nrext64", Bool),
            ("attr", Within(0, 2)),
            ("projid32bit", Bool),
        ],
        "-m" => &[
            ("crc", Bool),
            ("finobt", Bool),
            ("rmapbt", Bool),
            ("reflink", Bool),
            ("inobtcount", Bool),
            ("bigtime", Bool),
        ],
        "-n" => &[("size", Size), ("ftype", Bool)],
        "-l" => &[
            ("size", Size),
            ("version", Within(1, 2)),
            ("lazy-count", Bool),
        ],
        _ => return Err("option not allowed (allowed: -b, -s, -i, -m, -n, -l)".into()),
    };
    for kv in v.split(',') {
        let (k, val) = kv
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
        let Some((_, kind)) = keys.iter().find(|(name, _)| *name == k) else {
            return Err(format!(
                "key {k:?} is not allowed (allowed: {})",
                keys.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ));
        };
        if val.is_empty() || val.len() > 12 || !val.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("value {val:?} must be a number or a size like 4k"));
        }
        xfs_value(*kind, val).map_err(|why| format!("{k}={val}: {why}"))?;
        if seen.contains(&(flag, k)) {
            return Err(format!(
                "{flag} {k} is given twice (mkfs.xfs takes each once)"
            ));
        }
        seen.push((flag, k));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(program: &str, status: &str, stderr: &str) -> OsError {
        OsError::Failed {
            program: program.into(),
            status: status.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn refusals_of_the_online_resize_and_errors_fsck_left_are_told_apart() {
        assert!(resize_not_permitted(&failed(
            "resize2fs",
            "exit 1",
            "resize2fs 1.47.0\nresize2fs: Permission denied to resize filesystem"
        )));
        assert!(!resize_not_permitted(&failed(
            "resize2fs",
            "exit 1",
            "resize2fs: No space left on device"
        )));
        assert!(!resize_not_permitted(&failed(
            "e2fsck",
            "exit 8",
            "Permission denied"
        )));
        // e2fsck's exit status is a bit mask: 4 is errors left uncorrected.
        for status in ["exit 4", "exit 5", "exit 12"] {
            assert!(fsck_left_errors(&failed("e2fsck", status, "")), "{status}");
        }
        for status in ["exit 1", "exit 8", "exit 14x", "killed by signal"] {
            assert!(!fsck_left_errors(&failed("e2fsck", status, "")), "{status}");
        }
        assert!(!fsck_left_errors(&failed("resize2fs", "exit 4", "")));
    }

    #[test]
    fn fast_mkfs_arguments() {
        let u = "0b3c1f53-4a44-4d2c-9d3e-8f7c2b4a1e01";
        let a = mkfs_args(Filesystem::Ext4, Path::new("/dev/loop3"), &[], false, u);
        assert_eq!(
            a.join(" "),
            format!(
                "-q -m 0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard -U {u} -- /dev/loop3"
            )
        );
        let a = mkfs_args(
            Filesystem::Xfs,
            Path::new("/dev/loop3"),
            &["-m".into(), "bigtime=0".into()],
            true,
            u,
        );
        assert_eq!(
            a.join(" "),
            format!("-q -K -m bigtime=0,uuid={u} -f -- /dev/loop3")
        );
        let a = mkfs_args(Filesystem::Xfs, Path::new("/dev/loop3"), &[], false, u);
        assert_eq!(a.join(" "), format!("-q -K -m uuid={u} -- /dev/loop3"));
    }

    #[test]
    fn options_allowlist() {
        assert_eq!(
            check_options(Filesystem::Xfs, " -m bigtime=0,inobtcount=0  -i sparse=0 ").unwrap(),
            ["-m", "bigtime=0,inobtcount=0", "-i", "sparse=0"]
        );
        assert!(check_options(
            Filesystem::Ext4,
            "-O ^metadata_csum_seed,^orphan_file -b 4096"
        )
        .is_ok());
        assert!(check_options(Filesystem::Ext4, "").unwrap().is_empty());
        for bad in [
            "-d file=1",
            "-m uuid=abc",
            "-L label",
            "-m",
            "-b size=4k;rm",
            "-p /etc/passwd",
            "-i size=../x",
        ] {
            assert!(check_options(Filesystem::Xfs, bad).is_err(), "{bad}");
        }
        for bad in [
            "-E offset=1",
            "-O ^has_journal,evil",
            "-b 8192",
            "-F x",
            "-U clear",
            "-N -1",
        ] {
            assert!(check_options(Filesystem::Ext4, bad).is_err(), "{bad}");
        }
        let many = "-b 4096 ".repeat(9);
        assert!(check_options(Filesystem::Ext4, &many).is_err());
    }
}
