//! `mount.nfs` and `umount` of NFS mounts, as external commands under a
//! timeout (`mount.nfs` resolves host names and negotiates the version; the
//! raw mount(2) call would need `addr=` and does neither).
//!
//! Berth runs the `mount.nfs` helper itself, with the arguments `mount -t
//! nfs` would give it, rather than `mount`: `mount` forks the helper, and a
//! forked process does not inherit the signal that kills every command when
//! berth dies (`command::die_with_parent`), so a killed berth left a
//! `mount.nfs` retrying against its server for minutes, free to mount over
//! a path the next berth had moved on from. Run directly, it dies with
//! berth.
//!
//! Mount options come from StorageClass `mountOptions` and are checked
//! against an allowlist of NFS and VFS option names with a strict grammar
//! for each value (`check_options`): nothing starts with `-`, and no value
//! holds a comma. The source (`host:/path`, never starting with `-`) and the
//! absolute target come first, where `mount.nfs` takes them as the source
//! and the target whatever they hold.
use std::path::Path;
use std::time::Duration;

use super::command::Runner;
use super::OsError;

pub const MOUNT: &str = "mount.nfs";
pub const UMOUNT: &str = "umount";

/// The NFS version used when the mount options name none. NFSv4.1 needs no
/// rpcbind/statd on the client and works through one TCP port.
pub const DEFAULT_VERSION: &str = "nfsvers=4.1";

#[derive(Clone, Copy)]
enum Value {
    /// No value (`hard`, `nolock`).
    Flag,
    /// Decimal number, at most 9 digits.
    Number,
    /// Decimal number, at most 9 digits, from `.0` to `.1`: the range the
    /// kernel accepts (fs/nfs/fs_context.c `nfs_fs_context_parse_param`,
    /// "Value for '...' out of range"). Beyond it the mount fails with
    /// EINVAL at every NodePublishVolume.
    Range(u32, u32),
    /// One of the listed words.
    Word(&'static [&'static str]),
}

const VERSIONS: &[&str] = &["3", "4", "4.0", "4.1", "4.2"];
const PROTOS: &[&str] = &["tcp", "udp", "rdma", "tcp6", "udp6", "rdma6"];

/// Every option Berth passes to `mount.nfs`. Options that name other
/// hosts or files (`clientaddr`, `mounthost`, `fsc=`, `context=`), run
/// helpers (`helper=`, `x-*`) or fork the mount into the background (`bg`)
/// are deliberately missing.
const ALLOWED: &[(&str, Value)] = &[
    // VFS flags.
    ("ro", Value::Flag),
    ("rw", Value::Flag),
    ("nosuid", Value::Flag),
    ("nodev", Value::Flag),
    ("noexec", Value::Flag),
    ("noatime", Value::Flag),
    ("nodiratime", Value::Flag),
    ("relatime", Value::Flag),
    ("strictatime", Value::Flag),
    ("sync", Value::Flag),
    ("async", Value::Flag),
    // NFS flags.
    ("hard", Value::Flag),
    ("soft", Value::Flag),
    ("softerr", Value::Flag),
    ("softreval", Value::Flag),
    ("nosoftreval", Value::Flag),
    ("intr", Value::Flag),
    ("nointr", Value::Flag),
    ("cto", Value::Flag),
    ("nocto", Value::Flag),
    ("ac", Value::Flag),
    ("noac", Value::Flag),
    ("lock", Value::Flag),
    ("nolock", Value::Flag),
    ("acl", Value::Flag),
    ("noacl", Value::Flag),
    ("rdirplus", Value::Flag),
    ("nordirplus", Value::Flag),
    ("sharecache", Value::Flag),
    ("nosharecache", Value::Flag),
    ("resvport", Value::Flag),
    ("noresvport", Value::Flag),
    ("tcp", Value::Flag),
    ("udp", Value::Flag),
    ("rdma", Value::Flag),
    ("posix", Value::Flag),
    ("noposix", Value::Flag),
    ("migration", Value::Flag),
    ("nomigration", Value::Flag),
    // NFS numbers. Ranges: nconnect 1 to NFS_MAX_CONNECTIONS (16),
    // max_connect 1 to NFS_MAX_TRANSPORTS (16), ports at most USHRT_MAX,
    // timeo at least 1, mountvers NFS_MNT_VERSION to NFS_MNT3_VERSION,
    // minorversion at most NFS4_MAX_MINOR_VERSION (2).
    ("timeo", Value::Range(1, u32::MAX)),
    ("retrans", Value::Number),
    ("retry", Value::Number),
    ("rsize", Value::Number),
    ("wsize", Value::Number),
    ("acregmin", Value::Number),
    ("acregmax", Value::Number),
    ("acdirmin", Value::Number),
    ("acdirmax", Value::Number),
    ("actimeo", Value::Number),
    ("port", Value::Range(0, 65535)),
    ("mountport", Value::Range(0, 65535)),
    ("mountvers", Value::Range(1, 3)),
    ("nconnect", Value::Range(1, 16)),
    ("max_connect", Value::Range(1, 16)),
    ("minorversion", Value::Range(0, 2)),
    // NFS words.
    ("vers", Value::Word(VERSIONS)),
    ("nfsvers", Value::Word(VERSIONS)),
    ("proto", Value::Word(PROTOS)),
    ("mountproto", Value::Word(PROTOS)),
    (
        "sec",
        Value::Word(&["sys", "krb5", "krb5i", "krb5p", "none"]),
    ),
    (
        "lookupcache",
        Value::Word(&["all", "none", "pos", "positive"]),
    ),
    (
        "local_lock",
        Value::Word(&["all", "flock", "posix", "none"]),
    ),
    ("write", Value::Word(&["eager", "lazy", "wait"])),
    ("xprtsec", Value::Word(&["none", "tls", "mtls"])),
];

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// How an option is named in an error message: `super::option_shown`
/// (its name, never its value).
fn shown(opt: &str) -> String {
    super::option_shown(opt)
}

/// A decimal number of 1 to 9 digits.
fn is_number(v: &str) -> bool {
    !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit())
}

/// Checks one option (no commas inside).
fn check_option(opt: &str) -> Result<(), String> {
    let (name, value) = match opt.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (opt, None),
    };
    let Some((_, kind)) = ALLOWED.iter().find(|(n, _)| *n == name) else {
        return Err(format!("NFS mount option {} is not supported", shown(opt)));
    };
    let ok = match (kind, value) {
        (Value::Flag, None) => true,
        (Value::Number, Some(v)) => is_number(v),
        (Value::Range(lo, hi), Some(v)) => {
            is_number(v) && v.parse::<u32>().is_ok_and(|n| (*lo..=*hi).contains(&n))
        }
        (Value::Word(words), Some(v)) => words.contains(&v),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = match kind {
        Value::Flag => "takes no value".to_string(),
        Value::Number => "takes a decimal number of at most 9 digits".to_string(),
        Value::Range(lo, u32::MAX) => format!("takes a decimal number of at least {lo}"),
        Value::Range(lo, hi) => format!("takes a decimal number from {lo} to {hi}"),
        Value::Word(words) => format!("takes one of {}", words.join(", ")),
    };
    Err(format!(
        "NFS mount option {name} has an invalid value (not shown): it {want}"
    ))
}

/// Splits mount flags (each may hold several comma-separated options) into
/// single options and checks each: known name, value of the right form, no
/// option twice, the version given once. Empty items are skipped.
pub fn check_options(flags: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for flag in flags {
        for opt in flag.split(',') {
            let opt = opt.trim();
            if opt.is_empty() {
                continue;
            }
            check_option(opt)?;
            let name = opt.split('=').next().unwrap_or(opt);
            let is_version = |o: &str| o.starts_with("vers=") || o.starts_with("nfsvers=");
            if out.iter().any(|o| o.split('=').next() == Some(name))
                || (is_version(opt) && out.iter().any(|o| is_version(o)))
            {
                if out.iter().any(|o| o == opt) {
                    continue;
                }
                return Err(format!("NFS mount option {name} is given twice"));
            }
            out.push(opt.to_string());
        }
    }
    for (a, b) in CONFLICTS {
        if out.iter().any(|o| o == a) && out.iter().any(|o| o == b) {
            return Err(format!("NFS mount options {a} and {b} conflict"));
        }
    }
    Ok(out)
}

/// Options that say opposite things: given both, which one the kernel
/// keeps depends on their order (the last wins), so neither is what the
/// admin can be sure to get.
const CONFLICTS: &[(&str, &str)] = &[
    ("ro", "rw"),
    ("sync", "async"),
    ("hard", "soft"),
    ("hard", "softerr"),
    ("soft", "softerr"),
    ("softreval", "nosoftreval"),
    ("intr", "nointr"),
    ("cto", "nocto"),
    ("ac", "noac"),
    ("lock", "nolock"),
    ("acl", "noacl"),
    ("rdirplus", "nordirplus"),
    ("sharecache", "nosharecache"),
    ("resvport", "noresvport"),
    ("posix", "noposix"),
    ("migration", "nomigration"),
    ("tcp", "udp"),
    ("tcp", "rdma"),
    ("udp", "rdma"),
    ("noatime", "relatime"),
    ("noatime", "strictatime"),
    ("relatime", "strictatime"),
];

/// True when the options choose the NFS version.
pub fn has_version(opts: &[String]) -> bool {
    opts.iter()
        .any(|o| o.starts_with("vers=") || o.starts_with("nfsvers="))
}

/// Mount options for a publish: the checked options, the default version
/// when none is given, and `ro` instead of `rw` when read-only.
pub fn with_defaults(mut opts: Vec<String>, readonly: bool) -> Vec<String> {
    if !has_version(&opts) {
        opts.push(DEFAULT_VERSION.to_string());
    }
    if readonly {
        opts.retain(|o| o != "rw");
        if !opts.iter().any(|o| o == "ro") {
            opts.push("ro".to_string());
        }
    }
    opts
}

/// `mount.nfs <source> <target> -n -o <opts>` (`-n`: no /etc/mtab entry,
/// as `mount` asks of its helpers where mtab is the kernel's). `source` must have the
/// form `host:/path` and never start with `-`; every option is checked again.
pub fn mount_args(source: &str, target: &Path, opts: &[String]) -> Result<Vec<String>, String> {
    if source.starts_with('-') || !source.contains(":/") {
        return Err(format!(
            "NFS source {:?} is not host:/path",
            shorten(source)
        ));
    }
    if !target.is_absolute() {
        return Err(format!("mount point {} is not absolute", target.display()));
    }
    for o in opts {
        if o.contains(',') {
            return Err(format!("NFS mount option {} holds a comma", shown(o)));
        }
        check_option(o)?;
    }
    let mut a = vec![
        source.to_string(),
        target.display().to_string(),
        "-n".to_string(),
    ];
    if !opts.is_empty() {
        a.push("-o".into());
        a.push(opts.join(","));
    }
    Ok(a)
}

/// Runs `mount.nfs`; on timeout the whole process group is killed.
pub fn mount(
    runner: &dyn Runner,
    source: &str,
    target: &Path,
    opts: &[String],
    timeout: Duration,
) -> Result<(), OsError> {
    let args = mount_args(source, target, opts).map_err(|e| OsError::Failed {
        program: MOUNT.into(),
        status: "not run".into(),
        stderr: e,
    })?;
    runner.run(MOUNT, &args, timeout)?.check(MOUNT).map(|_| ())
}

/// Why `mount.nfs` refused a mount for good: the request itself cannot
/// work, and running the same mount again cannot change that (unlike a
/// server that does not answer, or refuses connections for now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The kernel or `mount.nfs` does not accept an option (EINVAL: "an
    /// incorrect mount option was specified"), e.g. `xprtsec=tls` on a
    /// kernel before 6.5, which passes Berth's allowlist but not the
    /// kernel's.
    Option,
    /// The server has no such export ("mounting h:/x failed, reason given
    /// by server: No such file or directory"; a missing local mount point
    /// is reported otherwise: "mount point ... does not exist").
    NoExport,
    /// The server does not let this node mount the export ("access denied
    /// by server while mounting h:/x": its export list leaves this client
    /// out, or the `sec=` flavour is not one it exports with).
    Denied,
}

impl Refusal {
    /// What it means, for the message of the error.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Option => "the kernel does not accept the mount options",
            Refusal::NoExport => {
                "the server has no such export (over NFSv4, also one it does not export to this node)"
            }
            Refusal::Denied => "the server denies this node access to the export (check the export's client list and sec= flavour)",
        }
    }
}

/// The refusal a failed `mount.nfs` reported, read from its message (its
/// exit status is 32 for every mount failure); None for anything else,
/// timeouts included.
pub fn refusal(e: &OsError) -> Option<Refusal> {
    let OsError::Failed {
        program, stderr, ..
    } = e
    else {
        return None;
    };
    if program != MOUNT {
        return None;
    }
    if stderr.contains("an incorrect mount option was specified") {
        Some(Refusal::Option)
    } else if stderr.contains("No such file or directory") {
        Some(Refusal::NoExport)
    } else if stderr.contains("access denied by server") {
        Some(Refusal::Denied)
    } else {
        None
    }
}

/// How to unmount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmount {
    /// A plain unmount.
    Normal,
    /// `umount -f`: aborts the RPCs in flight to a dead server.
    Force,
    /// `umount -l`: detaches the mount now, the kernel finishes later.
    Lazy,
}

/// `umount [-f|-l] -i -c -- <target>`. `-c` (no canonicalization) keeps
/// umount from stat-ing a path on a dead mount. `-i` skips the
/// `umount.nfs` helper: `umount` makes the umount2(2) call itself. The
/// helper first sends a v3 server an UMNT (bookkeeping for the server's
/// rmtab, which is all a v3 server is told) and waits for its answer, so a
/// dead server held a plain unmount until the timeout; and `umount` forks
/// the helper, out of reach of the signal that kills every command when
/// berth dies (`command::die_with_parent`): a killed berth left it to
/// unmount the target whenever the server answered, maybe after the next
/// berth had mounted there again.
pub fn umount_args(target: &Path, how: Unmount) -> Vec<String> {
    let mut a: Vec<String> = match how {
        Unmount::Normal => vec![],
        Unmount::Force => vec!["-f".into()],
        Unmount::Lazy => vec!["-l".into()],
    };
    a.push("-i".into());
    a.push("-c".into());
    a.push("--".into());
    a.push(target.display().to_string());
    a
}

/// Runs `umount`; on timeout the whole process group is killed.
pub fn umount(
    runner: &dyn Runner,
    target: &Path,
    how: Unmount,
    timeout: Duration,
) -> Result<(), OsError> {
    runner
        .run(UMOUNT, &umount_args(target, how), timeout)?
        .check(UMOUNT)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn allowed_options_pass_and_split() {
        assert_eq!(
            check_options(&v(&["nfsvers=4.1,hard", "timeo=600", " noatime "])).unwrap(),
            v(&["nfsvers=4.1", "hard", "timeo=600", "noatime"])
        );
        assert_eq!(
            check_options(&v(&["vers=3", "nolock", ""])).unwrap(),
            v(&["vers=3", "nolock"])
        );
        // The same option twice with the same value is kept once.
        assert_eq!(check_options(&v(&["hard", "hard"])).unwrap(), v(&["hard"]));
    }

    #[test]
    fn hostile_options_are_rejected() {
        for bad in [
            "-o",
            "--bind",
            "-t",
            "helper=evil",
            "x-mount.mkdir",
            "addr=1.2.3.4",
            "clientaddr=1.2.3.4",
            "mounthost=evil",
            "context=system_u:object_r:x",
            "bg",
            "vers=2",
            "vers=4.1 x",
            "timeo=1a",
            "timeo=",
            "timeo=1234567890",
            "hard=1",
            "sec=krb5,helper=x",
            "nfsvers=4.1\nro",
            "nfsvers=4.1;ro",
            "rsize=-1",
            "ro\0",
            "UPPER",
        ] {
            assert!(check_options(&v(&[bad])).is_err(), "{bad:?}");
        }
        // Conflicts.
        assert!(check_options(&v(&["vers=3", "nfsvers=4.1"])).is_err());
        assert!(check_options(&v(&["timeo=1", "timeo=2"])).is_err());
        assert!(check_options(&v(&["ro", "rw"])).is_err());
        // Opposites, in either order and spread over flags (before, only
        // ro and rw were caught).
        for (a, b) in [
            ("lock", "nolock"),
            ("hard", "soft"),
            ("softerr", "hard"),
            ("ac", "noac"),
            ("sync", "async"),
            ("tcp", "udp"),
            ("strictatime", "noatime"),
        ] {
            for pair in [v(&[&format!("{a},{b}")]), v(&[b, a])] {
                let e = check_options(&pair).unwrap_err();
                assert!(e.contains("conflict"), "{pair:?}: {e}");
            }
        }
        // Options that only look alike pass.
        assert!(check_options(&v(&["hard", "nolock", "noac", "nocto", "tcp"])).is_ok());
    }

    /// An error names the option, never its value (which may be a
    /// secret); a known option's error says what its value must be.
    #[test]
    fn errors_never_show_an_options_value() {
        for (opt, named) in [
            ("password=hunter2", "\"password\" (value not shown)"),
            ("sec=hunter2", "sec has an invalid value"),
            ("timeo=hunter2", "decimal number"),
            ("hard=hunter2", "takes no value"),
        ] {
            let e = check_options(&v(&[opt])).unwrap_err();
            assert!(!e.contains("hunter2"), "{opt}: {e}");
            assert!(e.contains(named), "{opt}: {e}");
        }
        let e = check_options(&v(&["sec=hunter2"])).unwrap_err();
        assert!(e.contains("krb5p"), "{e}");
        let e =
            mount_args("h:/x", Path::new("/t"), &v(&["sec=krb5,password=hunter2"])).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        // A bare word has no value to hide: it is named.
        let e = check_options(&v(&["bogus"])).unwrap_err();
        assert!(e.contains("\"bogus\""), "{e}");
    }

    #[test]
    fn defaults_and_readonly() {
        assert_eq!(with_defaults(vec![], false), v(&["nfsvers=4.1"]));
        assert_eq!(
            with_defaults(v(&["vers=3", "rw"]), true),
            v(&["vers=3", "ro"])
        );
        assert_eq!(with_defaults(v(&["ro"]), true), v(&["ro", "nfsvers=4.1"]));
    }

    #[test]
    fn mount_arguments() {
        let a = mount_args(
            "10.0.0.1:/exports/a",
            Path::new("/t"),
            &v(&["nfsvers=4.1", "ro"]),
        )
        .unwrap();
        assert_eq!(
            a,
            v(&["10.0.0.1:/exports/a", "/t", "-n", "-o", "nfsvers=4.1,ro"])
        );
        let a = mount_args("[fd00::1]:/e", Path::new("/t"), &[]).unwrap();
        assert_eq!(a, v(&["[fd00::1]:/e", "/t", "-n"]));
        assert!(mount_args("-oremount:/x", Path::new("/t"), &[]).is_err());
        assert!(mount_args("host", Path::new("/t"), &[]).is_err());
        assert!(mount_args("h:/x", Path::new("t"), &[]).is_err());
        // An option smuggling a second one behind a comma never gets through.
        assert!(mount_args("h:/x", Path::new("/t"), &v(&["ro,helper=x"])).is_err());
        assert!(mount_args("h:/x", Path::new("/t"), &v(&["helper=x"])).is_err());
    }

    #[test]
    fn refusals_are_read_from_the_message() {
        let failed = |program: &str, stderr: &str| OsError::Failed {
            program: program.into(),
            status: "exit status: 32".into(),
            stderr: stderr.into(),
        };
        assert_eq!(
            refusal(&failed(
                MOUNT,
                "mount.nfs: an incorrect mount option was specified"
            )),
            Some(Refusal::Option)
        );
        assert_eq!(
            refusal(&failed(
                MOUNT,
                "mount.nfs: mounting 10.0.0.1:/nope failed, reason given by server: No such file or directory"
            )),
            Some(Refusal::NoExport)
        );
        assert_eq!(
            refusal(&failed(
                MOUNT,
                "mount.nfs: access denied by server while mounting 127.0.0.1:/srv/private"
            )),
            Some(Refusal::Denied)
        );
        for other in [
            failed(MOUNT, "mount.nfs: Connection refused"),
            failed(MOUNT, "mount.nfs: mount point /w/x does not exist"),
            failed(UMOUNT, "umount: No such file or directory"),
            OsError::Timeout {
                program: MOUNT.into(),
                secs: 5,
            },
        ] {
            assert_eq!(refusal(&other), None, "{other}");
        }
    }

    #[test]
    fn umount_arguments() {
        assert_eq!(
            umount_args(Path::new("/t"), Unmount::Normal),
            v(&["-i", "-c", "--", "/t"])
        );
        assert_eq!(
            umount_args(Path::new("/t"), Unmount::Force),
            v(&["-f", "-i", "-c", "--", "/t"])
        );
        assert_eq!(
            umount_args(Path::new("/t"), Unmount::Lazy),
            v(&["-l", "-i", "-c", "--", "/t"])
        );
    }
}
