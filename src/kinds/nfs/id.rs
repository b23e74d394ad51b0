//! NFS volume ids: `nfs#<onDelete>#<server>#<share>#<subdir>`, at most 128
//! bytes, for example `nfs#d#nfs.example.com#/exports/berth#team-a/pvc-1`.
//!
//! The id says everything a node or a controller without the record needs:
//! where the volume is and what DeleteVolume does with it (`d` delete, `r`
//! retain, `a` archive). It is parsed and checked on every use: the server
//! is a host name, an IPv4 address or a bracketed IPv6 address; the share an
//! absolute path; the subdirectory a relative path of one or more plain
//! components. No part may be empty, `.`, `..`, hold `#`, `/` where it does
//! not belong, or anything outside `[A-Za-z0-9._+@=~-]`, so no id can name
//! the share root or anything outside the share.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The CSI limit for a volume id.
pub const MAX_ID: usize = 128;
pub const PREFIX: &str = "nfs#";

/// What DeleteVolume does with the volume's subdirectory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// Remove it with everything in it.
    Delete,
    /// Leave it as it is.
    Retain,
    /// Move it to `.berth-archive/` at the share root (`share::ARCHIVE`),
    /// named `<subdir with / as ->-<unix time>-<hash of the id>`.
    Archive,
}

impl OnDelete {
    pub fn parse(s: &str) -> Option<OnDelete> {
        match s.to_ascii_lowercase().as_str() {
            "delete" => Some(OnDelete::Delete),
            "retain" => Some(OnDelete::Retain),
            "archive" => Some(OnDelete::Archive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        }
    }

    fn code(self) -> &'static str {
        match self {
            OnDelete::Delete => "d",
            OnDelete::Retain => "r",
            OnDelete::Archive => "a",
        }
    }

    fn from_code(c: &str) -> Option<OnDelete> {
        match c {
            "d" => Some(OnDelete::Delete),
            "r" => Some(OnDelete::Retain),
            "a" => Some(OnDelete::Archive),
            _ => None,
        }
    }
}

/// A parsed, valid NFS volume id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeId {
    pub on_delete: OnDelete,
    pub server: String,
    /// Absolute export path, no trailing slash (`/` itself is allowed).
    pub share: String,
    /// Relative path below the share, one or more components.
    pub subdir: String,
}

/// A character allowed in a share or subdirectory component.
fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '=' | '~')
}

/// One plain path component: not empty, not `.` or `..`, safe characters
/// only, at most 255 bytes.
pub fn check_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("an empty path component".into());
    }
    if c == "." || c == ".." {
        return Err(format!("the path component {c:?}"));
    }
    if c.len() > 255 {
        return Err("a path component longer than 255 bytes".into());
    }
    if let Some(bad) = c.chars().find(|ch| !path_char(*ch)) {
        return Err(format!(
            "the character {bad:?} (allowed: letters, digits and . _ - + @ = ~)"
        ));
    }
    Ok(())
}

/// A host name (RFC 1123 labels), an IPv4 address, or `[IPv6]`.
pub fn check_server(s: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "server {:?}: {why}",
            s.chars().take(64).collect::<String>()
        ))
    };
    if s.is_empty() {
        return bad("empty");
    }
    if let Some(inner) = s.strip_prefix('[') {
        let Some(addr) = inner.strip_suffix(']') else {
            return bad("an IPv6 address must be written in brackets, like [fd00::1]");
        };
        return match addr.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("not an IPv6 address"),
        };
    }
    if s.contains(':') {
        return bad("an IPv6 address must be written in brackets, like [fd00::1]");
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match s.parse::<std::net::Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("not an IPv4 address"),
        };
    }
    if s.len() > 253 {
        return bad("host name longer than 253 bytes");
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return bad("not a host name (letters, digits and '-' in dot-separated labels)");
        }
    }
    Ok(())
}

/// The IPv4 address a numeric host name stands for as the C library's
/// resolver reads it (`inet_aton`, which `mount.nfs` reaches through
/// `getaddrinfo`): one to four parts, each decimal, octal with a leading
/// `0` or hexadecimal with `0x`, the last filling the bytes left, so
/// `127.1`, `0x7f.1`, `0x7f000001` and `2130706433` are all 127.0.0.1.
/// None for anything else (a host name).
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let number = |p: &str| -> Option<u64> {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or(p.strip_prefix("0X")) {
            // `0x` alone is 0 to the C library.
            if h.is_empty() {
                return Some(0);
            }
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (p, 10)
        };
        if digits.is_empty() || digits.len() > 12 || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        u64::from_str_radix(digits, radix).ok()
    };
    let values = parts
        .iter()
        .map(|p| number(p))
        .collect::<Option<Vec<u64>>>()?;
    let (last, first) = values.split_last()?;
    if first.iter().any(|v| *v > 0xff) || *last >= 1u64 << (8 * (4 - first.len())) {
        return None;
    }
    let addr = first
        .iter()
        .enumerate()
        .fold(*last, |a, (i, v)| a | v << (24 - 8 * i));
    Some(Ipv4Addr::from(addr as u32))
}

/// The address a server (as `check_server` accepts it, or a numeric host
/// name the resolver reads as an address: `inet_aton`) names, IPv4-mapped
/// IPv6 addresses as IPv4; None for a host name.
pub fn server_ip(s: &str) -> Option<IpAddr> {
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| IpAddr::V6(a).to_canonical());
    }
    inet_aton(s).map(IpAddr::V4)
}

/// One spelling for each server, for comparing servers: an address in
/// its canonical form (`127.0.0.1` for `0x7f.1` or `[::ffff:127.0.0.1]`,
/// `[fd00::1]` for `[FD00:0::1]`), a host name in lower case. Host names
/// are never resolved: two names, or a name and an address, stay apart.
pub fn canonical_server(s: &str) -> String {
    match server_ip(s) {
        Some(IpAddr::V4(a)) => a.to_string(),
        Some(IpAddr::V6(a)) => format!("[{a}]"),
        None => s.to_ascii_lowercase(),
    }
}

/// Whether two spellings name the same server (`canonical_server`).
pub fn same_host(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || canonical_server(a) == canonical_server(b)
}

/// Why a server `check_server` accepts is still refused for a new volume:
/// an address written in another form than its plain one (a numeric host
/// name such as `0x7f.1`, or an IPv4-mapped IPv6 address), which would
/// make ids of one server differ in spelling only.
pub fn unusual_server(s: &str) -> Option<String> {
    let plain = |a: Ipv4Addr| {
        format!(
            "server {:?} is the IPv4 address {a} in another form: write it as {a}",
            s.chars().take(64).collect::<String>()
        )
    };
    if s.starts_with('[') {
        return match server_ip(s) {
            Some(IpAddr::V4(a)) => Some(plain(a)),
            _ => None,
        };
    }
    match inet_aton(s) {
        Some(a) if s.parse::<Ipv4Addr>().is_err() => Some(plain(a)),
        _ => None,
    }
}

/// Berth's areas at a share root (archives, snapshots): no share may lie
/// in one, so no volume id reaches what is kept there.
pub const AREAS: [&str; 2] = [".berth-archive", ".berth-snapshots"];

/// An absolute export path: `/` or `/a/b` with plain components, none of
/// them one of Berth's areas (`AREAS`).
pub fn check_share(s: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "share {:?}: {why}",
            s.chars().take(64).collect::<String>()
        ))
    };
    let Some(rest) = s.strip_prefix('/') else {
        return bad("must be an absolute path".into());
    };
    if rest.is_empty() {
        return Ok(());
    }
    for c in rest.split('/') {
        if let Err(e) = check_component(c) {
            return bad(format!("contains {e}"));
        }
        if AREAS.contains(&c) {
            return bad(format!(
                "{c} is where Berth keeps archives and snapshots on a share"
            ));
        }
    }
    Ok(())
}

/// Names Berth keeps for itself on a share (markers, archives, directories
/// being made): no subdirectory component may start with this, so no
/// volume name can reach them.
pub const RESERVED: &str = ".berth";

/// A relative subdirectory: one or more plain components, none starting
/// with `.berth` (Berth's own names on the share).
pub fn check_subdir(s: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "subdirectory {:?}: {why}",
            s.chars().take(64).collect::<String>()
        ))
    };
    if s.is_empty() {
        return bad("empty (the share root is never a volume)".into());
    }
    if s.starts_with('/') {
        return bad("must be relative to the share".into());
    }
    for c in s.split('/') {
        if let Err(e) = check_component(c) {
            return bad(format!("contains {e}"));
        }
        if c.starts_with(RESERVED) {
            return bad(format!(
                "the component {c:?} starts with {RESERVED:?}, which Berth keeps for its own names on the share"
            ));
        }
    }
    Ok(())
}

/// True when the absolute path `inner` is `outer` or lies below it.
pub fn path_within(inner: &str, outer: &str) -> bool {
    outer == "/"
        || inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Normalises a share path: trailing slashes go (`/exports/` is
/// `/exports`), anything else must already be clean.
pub fn normalize_share(s: &str) -> String {
    let t = s.trim_end_matches('/');
    if t.is_empty() && s.starts_with('/') {
        "/".to_string()
    } else {
        t.to_string()
    }
}

/// The `#`-separated parts of a `what` id (`volume`, `snapshot`) after
/// its `prefix`: exactly `N` of them (`form` shows which), the id at most
/// `MAX_ID` bytes. Each part is still to be checked.
fn id_parts<'a, const N: usize>(
    id: &'a str,
    what: &str,
    prefix: &str,
    form: &str,
) -> Result<[&'a str; N], String> {
    if id.len() > MAX_ID {
        return Err(format!("{what} id is longer than {MAX_ID} bytes"));
    }
    let rest = id
        .strip_prefix(prefix)
        .ok_or_else(|| format!("{what} id does not start with {prefix:?}"))?;
    <[&str; N]>::try_from(rest.split('#').collect::<Vec<_>>())
        .map_err(|_| format!("{what} id must be {form}"))
}

/// The server and share parts of an id (a volume's or a snapshot's): a
/// server `check_server` accepts, and a share `check_share` accepts,
/// without a trailing slash.
fn check_location(server: &str, share: &str) -> Result<(), String> {
    check_server(server)?;
    check_share(share)?;
    if share != "/" && share.ends_with('/') {
        return Err("share has a trailing slash".into());
    }
    Ok(())
}

impl VolumeId {
    /// Checks every part and the length; the encoded id on success.
    pub fn encode(&self) -> Result<String, String> {
        check_server(&self.server)?;
        check_share(&self.share)?;
        check_subdir(&self.subdir)?;
        let id = self.to_string();
        if id.len() > MAX_ID {
            return Err(format!(
                "the volume id would be {} bytes, more than the {MAX_ID} a CSI volume id may have: use a shorter server, share or subDir",
                id.len()
            ));
        }
        Ok(id)
    }

    /// Parses and checks an id; the error says why it is not an NFS id.
    pub fn parse(id: &str) -> Result<VolumeId, String> {
        let [code, server, share, subdir] =
            id_parts(id, "volume", PREFIX, "nfs#<mode>#<server>#<share>#<subdir>")?;
        let on_delete =
            OnDelete::from_code(code).ok_or_else(|| format!("unknown delete mode {code:?}"))?;
        check_location(server, share)?;
        check_subdir(subdir)?;
        Ok(VolumeId {
            on_delete,
            server: server.to_string(),
            share: share.to_string(),
            subdir: subdir.to_string(),
        })
    }

    /// The volume's directory as an NFS source: `server:/share/subdir`.
    pub fn source(&self) -> String {
        format!("{}:{}", self.server, self.path())
    }

    /// The export as an NFS source: `server:/share`.
    pub fn share_source(&self) -> String {
        format!("{}:{}", self.server, self.share)
    }

    /// `/share/subdir` on the server.
    pub fn path(&self) -> String {
        if self.share == "/" {
            format!("/{}", self.subdir)
        } else {
            format!("{}/{}", self.share, self.subdir)
        }
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.subdir.split('/')
    }

    /// True when the two volumes' directories are the same or one holds the
    /// other on the server: decided on the resolved export path (share and
    /// subdirectory together), so `share=/e, subDir=a/b` and `share=/e/a,
    /// subDir=b` are the same directory. Servers compare by
    /// `canonical_server`: host names without case, addresses in any
    /// spelling (`127.0.0.1`, `0x7f.1`, `[::ffff:127.0.0.1]`).
    pub fn overlaps(&self, other: &VolumeId) -> bool {
        if !same_host(&self.server, &other.server) {
            return false;
        }
        let (a, b) = (self.path(), other.path());
        path_within(&a, &b) || path_within(&b, &a)
    }

    /// The key of the volume's directory in the store's index of storage
    /// (`Store`'s `overlapping`): the server (`canonical_server`), a NUL, and the
    /// resolved export path (`path`, never `/` itself: a subdirectory has
    /// a component). Two volumes `overlaps` exactly when one key is the
    /// other or the other followed by `/` and more, so the check for
    /// nested storage is a few lookups, not a walk of every record.
    pub fn storage_key(&self) -> String {
        format!("{}\0{}", canonical_server(&self.server), self.path())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}#{}#{}#{}",
            self.on_delete.code(),
            self.server,
            self.share,
            self.subdir
        )
    }
}

/// Snapshot ids start with this.
pub const SNAP_PREFIX: &str = "nfssnap#";
/// Hex digits of a snapshot's key.
const KEY_LEN: usize = 16;

/// A parsed, valid NFS snapshot id: `nfssnap#<server>#<share>#<key>`, at
/// most 128 bytes, for example `nfssnap#10.0.0.1#/exports#0123456789abcdef`.
/// The snapshot lives on that share in `.berth-snapshots/<key>`; the key is
/// 16 lower-case hex digits (a hash of the share, the snapshot's name and
/// its source volume, so a retry after the controller lost its records
/// finds the same copy), never anything else, so no snapshot id reaches
/// outside `.berth-snapshots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    pub server: String,
    pub share: String,
    pub key: String,
}

impl SnapshotId {
    /// The id of the snapshot named `name` of the volume `source`.
    pub fn derive(source: &VolumeId, name: &str) -> SnapshotId {
        let text = format!(
            "{}\0{}\0{name}\0{source}",
            source.server.to_ascii_lowercase(),
            source.share
        );
        SnapshotId {
            server: source.server.clone(),
            share: source.share.clone(),
            key: format!("{:016x}", super::params::fnv64(text.as_bytes())),
        }
    }

    /// Checks the length; the encoded id on success.
    pub fn encode(&self) -> Result<String, String> {
        let id = self.to_string();
        if id.len() > MAX_ID {
            return Err(format!(
                "the snapshot id would be {} bytes, more than the {MAX_ID} a CSI snapshot id may have: use a shorter server or share",
                id.len()
            ));
        }
        Ok(id)
    }

    /// Parses and checks an id; the error says why it is not an NFS
    /// snapshot id.
    pub fn parse(id: &str) -> Result<SnapshotId, String> {
        let [server, share, key] = id_parts(
            id,
            "snapshot",
            SNAP_PREFIX,
            "nfssnap#<server>#<share>#<key>",
        )?;
        check_location(server, share)?;
        let hex = key.len() == KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(format!(
                "the snapshot key must be {KEY_LEN} lower-case hex digits"
            ));
        }
        Ok(SnapshotId {
            server: server.to_string(),
            share: share.to_string(),
            key: key.to_string(),
        })
    }

    /// Whether the volume `v` is on this snapshot's share (servers compare
    /// by `canonical_server`).
    pub fn same_share(&self, v: &VolumeId) -> bool {
        same_host(&self.server, &v.server) && self.share == v.share
    }

    /// The share as an NFS source: `server:/share`.
    pub fn share_source(&self) -> String {
        format!("{}:{}", self.server, self.share)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SNAP_PREFIX}{}#{}#{}",
            self.server, self.share, self.key
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vid(server: &str, share: &str, subdir: &str) -> VolumeId {
        VolumeId {
            on_delete: OnDelete::Delete,
            server: server.into(),
            share: share.into(),
            subdir: subdir.into(),
        }
    }

    #[test]
    fn round_trip() {
        for (server, share, subdir) in [
            ("127.0.0.1", "/export", "pvc-1"),
            ("nfs.example.com", "/exports/berth", "team-a/pvc-1"),
            ("[fd00::1]", "/", "v"),
            ("NAS-1", "/srv/nfs_data", "a.b/c_d/e+f@g=h~i"),
        ] {
            for m in [OnDelete::Delete, OnDelete::Retain, OnDelete::Archive] {
                let v = VolumeId {
                    on_delete: m,
                    ..vid(server, share, subdir)
                };
                let id = v.encode().unwrap();
                assert_eq!(VolumeId::parse(&id).unwrap(), v, "{id}");
            }
        }
        let v = vid("[fd00::1]", "/", "v");
        assert_eq!(v.to_string(), "nfs#d#[fd00::1]#/#v");
        assert_eq!(v.source(), "[fd00::1]:/v");
        assert_eq!(v.share_source(), "[fd00::1]:/");
        let v = vid("h", "/e/x", "a/b");
        assert_eq!(v.source(), "h:/e/x/a/b");
        assert_eq!(v.share_source(), "h:/e/x");
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let long = format!("nfs#d#h#/e#{}", "a".repeat(130));
        for bad in [
            "",
            "nfs",
            "nfs#",
            "nfs#d#h#/e#",          // empty subdir: the share root
            "nfs#d#h#/e#.",         // the share root again
            "nfs#d#h#/e#..",        // outside the share
            "nfs#d#h#/e#a/..",      // back up to the root
            "nfs#d#h#/e#../x",      // outside
            "nfs#d#h#/e#a/../../x", // outside
            "nfs#d#h#/e#/abs",      // absolute
            "nfs#d#h#/e#a//b",      // empty component
            "nfs#d#h#/e#a/",        // trailing slash
            "nfs#d#h#/e#a/./b",     // dot component
            "nfs#d#h#/e#a#b",       // extra #
            "nfs#d#h#/e#a\0b",      // NUL
            "nfs#d#h#/e#a b",       // space
            "nfs#d#h#/e#a\nb",      // newline
            "nfs#d#h#/e#a,b",       // comma
            "nfs#d#h#/e#a:b",       // colon
            "nfs#x#h#/e#a",         // unknown mode
            "nfs#dd#h#/e#a",        // unknown mode
            "nfs#d#h#e#a",          // relative share
            "nfs#d#h#/e/#a",        // trailing slash in share
            "nfs#d#h#/e/../x#a",    // .. in share
            "nfs#d#h#/e//x#a",      // empty share component
            "nfs#d#-o#/e#a",        // option-like server
            "nfs#d#h:x#/e#a",       // colon in server
            "nfs#d#::1#/e#a",       // unbracketed IPv6
            "nfs#d#[::1#/e#a",      // unclosed bracket
            "nfs#d#[zz::1]#/e#a",   // not IPv6
            "nfs#d#1.2.3#/e#a",     // not IPv4
            "nfs#d#1.2.3.256#/e#a", // not IPv4
            "nfs#d#a..b#/e#a",      // empty label
            "nfs#d#a_b#/e#a",       // underscore
            "nfs#d##/e#a",          // empty server
            "NFS#d#h#/e#a",         // exact prefix only
            " nfs#d#h#/e#a",        // exact prefix only
            "local-0123456789abcdef0123456789abcdef",
            &long,
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn length_limit() {
        let ok = vid("h", "/e", &"a".repeat(MAX_ID - "nfs#d#h#/e#".len()));
        assert_eq!(ok.encode().unwrap().len(), MAX_ID);
        let over = vid("h", "/e", &"a".repeat(MAX_ID + 1 - "nfs#d#h#/e#".len()));
        let e = over.encode().unwrap_err();
        assert!(e.contains("129 bytes"), "{e}");
    }

    #[test]
    fn reserved_names_and_resolved_paths() {
        for bad in [
            "nfs#d#h#/e#.berth-archive",
            "nfs#d#h#/e#a/.berth-volume",
            "nfs#d#h#/e#.berthx",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad}");
        }
        VolumeId::parse("nfs#d#h#/.berth#a").unwrap();
        VolumeId::parse("nfs#d#h#/e#a.berth").unwrap();
        let p = |s: &str| VolumeId::parse(s).unwrap();
        assert!(p("nfs#d#h#/e#a/b").overlaps(&p("nfs#r#H#/e/a#b")));
        assert!(p("nfs#d#h#/e#a").overlaps(&p("nfs#d#h#/e/a#b")));
        assert!(p("nfs#d#h#/e/a/b#c").overlaps(&p("nfs#d#h#/e#a")));
        assert!(p("nfs#d#h#/#e").overlaps(&p("nfs#d#h#/e#x")));
        assert!(!p("nfs#d#h#/e#a").overlaps(&p("nfs#d#h#/e#ab")));
        assert!(!p("nfs#d#h#/e#a").overlaps(&p("nfs#d#h#/ea#b")));
        assert!(!p("nfs#d#h#/e#a").overlaps(&p("nfs#d#g#/e#a")));
        // The index's keys nest exactly when the ids overlap.
        let ids = [
            "nfs#d#h#/e#a/b",
            "nfs#r#H#/e/a#b",
            "nfs#d#h#/e#a",
            "nfs#d#h#/e/a#b",
            "nfs#d#h#/e/a/b#c",
            "nfs#d#h#/#e",
            "nfs#d#h#/e#x",
            "nfs#d#h#/e#ab",
            "nfs#d#h#/ea#b",
            "nfs#d#g#/e#a",
            "nfs#d#hx#/e#a",
            "nfs#d#h.x#/e#a",
            "nfs#d#[fd00::1]#/e#a",
            "nfs#d#[FD00::1]#/e#a/b",
            "nfs#d#[fd00:0::1]#/e/a#c",
            "nfs#d#0x7f.1#/e/a#b",
            "nfs#d#127.0.0.1#/e#a",
            "nfs#d#[::ffff:127.0.0.1]#/e#a/b/c",
        ];
        let nest =
            |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
        for a in ids {
            for b in ids {
                let (ka, kb) = (p(a).storage_key(), p(b).storage_key());
                assert_eq!(
                    nest(&ka, &kb) || nest(&kb, &ka),
                    p(a).overlaps(&p(b)),
                    "{a} {b}"
                );
            }
        }
        assert!(path_within("/a/b", "/"));
        assert!(!path_within("/ab", "/a"));
    }

    #[test]
    fn snapshot_ids_round_trip_and_stay_in_their_area() {
        let v = VolumeId::parse("nfs#d#NAS-1#/exports/b#ns/pvc-1").unwrap();
        let s = SnapshotId::derive(&v, "snapshot-1");
        let id = s.encode().unwrap();
        assert!(id.starts_with("nfssnap#NAS-1#/exports/b#"), "{id}");
        assert_eq!(SnapshotId::parse(&id).unwrap(), s);
        assert!(s.same_share(&VolumeId::parse("nfs#r#nas-1#/exports/b#x").unwrap()));
        assert!(!s.same_share(&VolumeId::parse("nfs#r#nas-1#/exports#b").unwrap()));
        assert!(!s.same_share(&VolumeId::parse("nfs#r#nas-2#/exports/b#x").unwrap()));
        // The same name and source give the same id; any difference another.
        assert_eq!(SnapshotId::derive(&v, "snapshot-1"), s);
        assert_ne!(SnapshotId::derive(&v, "snapshot-2").key, s.key);
        let w = VolumeId::parse("nfs#d#NAS-1#/exports/b#ns/pvc-2").unwrap();
        assert_ne!(SnapshotId::derive(&w, "snapshot-1").key, s.key);
        let long = VolumeId {
            on_delete: OnDelete::Delete,
            server: "h".repeat(60),
            share: format!("/{}", "s".repeat(60)),
            subdir: "v".into(),
        };
        assert!(SnapshotId::derive(&long, "n").encode().is_err());
        for bad in [
            "",
            "nfssnap#",
            "nfssnap#h#/e",
            "nfssnap#h#/e#",
            "nfssnap#h#/e#0123456789abcde",   // short
            "nfssnap#h#/e#0123456789abcdef0", // long
            "nfssnap#h#/e#0123456789ABCDEF",  // upper case
            "nfssnap#h#/e#../../../etc/xxxx",
            "nfssnap#h#/e#0123456789abcde/",
            "nfssnap#h#/e#0123456789abcdef#x",
            "nfssnap#h#e#0123456789abcdef",
            "nfssnap#h#/e/#0123456789abcdef",
            "nfssnap#h#/e/..#0123456789abcdef",
            "nfssnap#h#/e/.berth-snapshots#0123456789abcdef",
            "nfssnap#-o#/e#0123456789abcdef",
            "nfssnap#h:x#/e#0123456789abcdef",
            "NFSSNAP#h#/e#0123456789abcdef",
            "nfs#d#h#/e#a",
            "local-snap-0123456789abcdef0123456789abcdef",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad:?} accepted");
        }
        // No share lies in Berth's areas, so no volume id reaches them.
        for bad in [
            "nfs#d#h#/e/.berth-snapshots#0123456789abcdef",
            "nfs#d#h#/e/.berth-archive#x",
            "nfs#d#h#/.berth-snapshots/a#b",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Every spelling the resolver reads as one address is that address
    /// (`mount.nfs` would reach the same server with it), for the overlap
    /// check and the index of storage as much as for anything else.
    #[test]
    fn aliases_of_one_address_are_one_server() {
        let lo = Some(Ipv4Addr::new(127, 0, 0, 1));
        for s in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "0x7f.1",
            "0X7F.0.0.1",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "017700000001",
        ] {
            assert_eq!(inet_aton(s), lo, "{s}");
        }
        assert_eq!(inet_aton("0x"), Some(Ipv4Addr::UNSPECIFIED));
        for s in [
            "",
            "h",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.2.65536",
            "1.16777216",
            "4294967296",
            "08.1.1.1",
            "0x1g",
            "1..2",
            "+1.2.3.4",
            "0x7f.example",
            "nas-1",
        ] {
            assert_eq!(inet_aton(s), None, "{s:?}");
        }
        for (a, b) in [
            ("127.0.0.1", "0x7f.1"),
            ("127.0.0.1", "[::ffff:127.0.0.1]"),
            ("127.0.0.1", "[::FFFF:7f00:1]"),
            ("[fd00::1]", "[FD00:0:0::1]"),
            ("nas.example", "NAS.Example"),
        ] {
            assert!(same_host(a, b), "{a} {b}");
            assert_eq!(canonical_server(a), canonical_server(b), "{a} {b}");
        }
        for (a, b) in [
            ("127.0.0.1", "127.0.0.2"),
            ("127.0.0.1", "localhost"),
            ("[fd00::1]", "[fd00::2]"),
            ("[::1]", "127.0.0.1"),
            ("nas", "nas.example"),
        ] {
            assert!(!same_host(a, b), "{a} {b}");
        }
        assert_eq!(canonical_server("[FD00:0::1]"), "[fd00::1]");
        let p = |s: &str| VolumeId::parse(s).unwrap();
        let outer = p("nfs#d#127.0.0.1#/e#a");
        for inner in [
            "nfs#d#0x7f.1#/e/a#b",
            "nfs#d#0x7f000001#/e#a/b",
            "nfs#d#[::ffff:127.0.0.1]#/e/a#b",
        ] {
            assert!(outer.overlaps(&p(inner)), "{inner}");
            assert!(p(inner)
                .storage_key()
                .starts_with(&format!("{}/", outer.storage_key())));
        }
        assert!(p("nfs#d#[fd00::1]#/e#a").overlaps(&p("nfs#d#[FD00:0::1]#/e/a#b")));
        // A plain address needs no other form; the others are refused for
        // new volumes (`Params`), with the plain form named.
        for plain in [
            "127.0.0.1",
            "[fd00::1]",
            "[FD00:0::1]",
            "nas-1",
            "0x7f.example",
        ] {
            assert_eq!(unusual_server(plain), None, "{plain}");
        }
        for (odd, named) in [
            ("0x7f.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("[::ffff:10.0.0.1]", "10.0.0.1"),
        ] {
            let why = unusual_server(odd).expect(odd);
            assert!(why.contains(&format!("write it as {named}")), "{why}");
        }
    }

    #[test]
    fn shares_normalise() {
        assert_eq!(normalize_share("/exports/"), "/exports");
        assert_eq!(normalize_share("/"), "/");
        assert_eq!(normalize_share("//"), "/");
        assert_eq!(normalize_share("/a/b"), "/a/b");
    }

    proptest::proptest! {
        #[test]
        fn parsed_ids_stay_inside_the_share(s in "nfs#[dra]#[a-z0-9.\\[\\]:-]{1,12}#/[a-z./]{0,12}#[a-z./#]{0,16}") {
            if let Ok(v) = VolumeId::parse(&s) {
                proptest::prop_assert!(!v.subdir.is_empty());
                for c in v.components() {
                    proptest::prop_assert!(c != "." && c != ".." && !c.is_empty());
                }
                proptest::prop_assert_eq!(v.to_string(), s);
            }
        }
    }

    use proptest::prelude::*;

    /// A server as `check_server` takes it: a host name (its first label
    /// starts with a letter, so it is never all digits and dots), an IPv4
    /// address, or a bracketed IPv6 address (mapped ones included).
    fn server() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?){0,3}",
            any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
            any::<[u16; 8]>().prop_map(|w| format!("[{}]", Ipv6Addr::from(w))),
        ]
    }

    /// A plain path component (`check_component`).
    fn component() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._+@=~-]{1,14}".prop_filter("not . or ..", |c| c != "." && c != "..")
    }

    fn share() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            component().prop_filter("not an area", |c| !AREAS.contains(&c.as_str())),
            0..4,
        )
        .prop_map(|cs| format!("/{}", cs.join("/")))
    }

    fn subdir() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            component().prop_filter("not reserved", |c| !c.starts_with(RESERVED)),
            1..4,
        )
        .prop_map(|cs| cs.join("/"))
    }

    fn on_delete() -> impl Strategy<Value = OnDelete> {
        prop_oneof![
            Just(OnDelete::Delete),
            Just(OnDelete::Retain),
            Just(OnDelete::Archive)
        ]
    }

    proptest::proptest! {
        /// Every id Berth encodes parses back to the same parts, volume and
        /// snapshot ids alike; encoding fails only for the length.
        #[test]
        fn encoded_ids_parse_back_to_themselves(
            on_delete in on_delete(),
            server in server(),
            share in share(),
            subdir in subdir(),
            name in "\\PC{0,40}",
        ) {
            let v = VolumeId { on_delete, server, share, subdir };
            match v.encode() {
                Ok(id) => {
                    prop_assert!(id.len() <= MAX_ID);
                    prop_assert_eq!(VolumeId::parse(&id), Ok(v.clone()));
                }
                Err(e) => prop_assert!(v.to_string().len() > MAX_ID, "{}", e),
            }
            let s = SnapshotId::derive(&v, &name);
            match s.encode() {
                Ok(id) => prop_assert_eq!(SnapshotId::parse(&id), Ok(s)),
                Err(e) => prop_assert!(s.to_string().len() > MAX_ID, "{}", e),
            }
        }

        /// Anything at all (and anything behind the right prefix) is parsed
        /// without a panic, and what parses is exactly what it encodes to.
        #[test]
        fn any_text_parses_without_panic_and_only_as_itself(
            text in "\\PC{0,140}",
            tail in "[a-z0-9A-Z#/.:\\[\\]_~+@=-]{0,130}",
        ) {
            for s in [
                text.clone(),
                format!("{PREFIX}{tail}"),
                format!("{PREFIX}d#{tail}"),
                format!("{SNAP_PREFIX}{tail}"),
            ] {
                if let Ok(v) = VolumeId::parse(&s) {
                    prop_assert_eq!(v.encode(), Ok(s.clone()));
                }
                if let Ok(sn) = SnapshotId::parse(&s) {
                    prop_assert_eq!(sn.encode(), Ok(s.clone()));
                }
            }
        }
    }
}
