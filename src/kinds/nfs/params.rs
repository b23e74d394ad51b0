//! StorageClass parameters of NFS volumes (keys case-insensitive):
//!
//! | key | value |
//! |---|---|
//! | `server` | host name, IPv4 address, or IPv6 address in brackets |
//! | `share` | absolute export path |
//! | `subDir` | optional template of the volume's subdirectory; default: the volume name |
//! | `mountPermissions` | optional octal mode of the subdirectory (`0` or absent: left as made) |
//! | `onDelete` | `delete` (default), `retain` or `archive` |
//!
//! `subDir` may use `${pvc.metadata.name}`, `${pvc.metadata.namespace}` and
//! `${pv.metadata.name}`, filled from the `csi.storage.k8s.io/pvc/name`,
//! `.../pvc/namespace` and `.../pv/name` parameters that external-provisioner
//! adds with `--extra-create-metadata`.
use std::collections::BTreeMap;

use super::id::{self, OnDelete, VolumeId, MAX_ID};
use crate::error::{Error, Result};

const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Template variables and the parameter each is filled from.
pub const VARIABLES: &[(&str, &str)] = &[
    ("pvc.metadata.name", "csi.storage.k8s.io/pvc/name"),
    ("pvc.metadata.namespace", "csi.storage.k8s.io/pvc/namespace"),
    ("pv.metadata.name", "csi.storage.k8s.io/pv/name"),
];

/// The parameters of one NFS StorageClass, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub server: String,
    pub share: String,
    pub sub_dir: Option<String>,
    pub mount_permissions: Option<u32>,
    pub on_delete: OnDelete,
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

impl Params {
    /// Parses the kind's parameters (without `kind` and the
    /// `csi.storage.k8s.io/` keys, which are skipped if present).
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Params> {
        let mut server = None;
        let mut share = None;
        let mut sub_dir = None;
        let mut perms = None;
        let mut on_delete = None;
        for (k, v) in params {
            if k.starts_with(CO_PREFIX) || k == "kind" {
                continue;
            }
            let slot = match k.to_ascii_lowercase().as_str() {
                "server" => &mut server,
                "share" => &mut share,
                "subdir" => &mut sub_dir,
                "mountpermissions" => &mut perms,
                "ondelete" => &mut on_delete,
                _ => {
                    return Err(invalid(format!(
                        "unknown parameter {:?} for NFS volumes (known: server, share, subDir, mountPermissions, onDelete)",
                        k.chars().take(64).collect::<String>()
                    )))
                }
            };
            if slot.replace(v.clone()).is_some() {
                return Err(invalid(format!(
                    "parameter {k:?} is given twice (keys are case-insensitive)"
                )));
            }
        }
        let server =
            server.ok_or_else(|| invalid("parameter server is required for NFS volumes".into()))?;
        id::check_server(&server).map_err(|e| invalid(format!("parameter {e}")))?;
        if let Some(why) = id::unusual_server(&server) {
            return Err(invalid(format!("parameter {why}")));
        }
        let share =
            share.ok_or_else(|| invalid("parameter share is required for NFS volumes".into()))?;
        let share = id::normalize_share(&share);
        id::check_share(&share).map_err(|e| invalid(format!("parameter {e}")))?;
        if let Some(t) = &sub_dir {
            check_template(t)?;
        }
        let mount_permissions = match perms {
            None => None,
            Some(p) => parse_mode(&p)?,
        };
        let on_delete = match on_delete {
            None => OnDelete::Delete,
            Some(s) => OnDelete::parse(&s).ok_or_else(|| {
                invalid(format!(
                    "parameter onDelete {:?} must be delete, retain or archive",
                    s.chars().take(32).collect::<String>()
                ))
            })?,
        };
        Ok(Params {
            server,
            share,
            sub_dir,
            mount_permissions,
            on_delete,
        })
    }

    /// The volume id for a volume named `name` created with all of
    /// `params` (the CO's `csi.storage.k8s.io/` keys included).
    pub fn volume_id(&self, name: &str, params: &BTreeMap<String, String>) -> Result<String> {
        let mut v = VolumeId {
            on_delete: self.on_delete,
            server: self.server.clone(),
            share: self.share.clone(),
            subdir: String::new(),
        };
        v.subdir = match &self.sub_dir {
            Some(t) => expand(t, params)?,
            None => {
                // What the id has room for once everything else is in it.
                let room = MAX_ID.saturating_sub(v.to_string().len());
                default_subdir(name, room).ok_or_else(|| {
                    invalid(format!(
                        "server and share leave no room in the {MAX_ID}-byte volume id for a subdirectory"
                    ))
                })?
            }
        };
        v.encode().map_err(invalid)
    }
}

/// An octal mode: 1 to 4 octal digits after an optional leading 0, at most
/// 07777. `0` means "leave the mode as made".
pub fn parse_mode(s: &str) -> Result<Option<u32>> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let ok = !digits.is_empty()
        && digits.len() <= 5
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    let mode = if ok {
        u32::from_str_radix(digits, 8).ok()
    } else {
        None
    };
    match mode {
        Some(m) if m <= 0o7777 => Ok((m != 0).then_some(m)),
        _ => Err(invalid(format!(
            "parameter mountPermissions {:?} must be an octal mode such as 0777",
            s.chars().take(32).collect::<String>()
        ))),
    }
}

/// Splits a template into literal text and `${variable}` names.
fn pieces(t: &str) -> Result<Vec<(bool, &str)>> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find("${") {
        if i > 0 {
            out.push((false, &rest[..i]));
        }
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| invalid(format!("parameter subDir {t:?} has an unclosed ${{")))?;
        out.push((true, &after[..end]));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push((false, rest));
    }
    Ok(out)
}

/// Checks a subDir template: known variables only, and the literal text
/// must be a valid relative path once the variables are filled with plain
/// names.
pub fn check_template(t: &str) -> Result<()> {
    let mut sample = String::new();
    for (var, text) in pieces(t)? {
        if var {
            if !VARIABLES.iter().any(|(v, _)| *v == text) {
                return Err(invalid(format!(
                    "parameter subDir uses ${{{}}}; known: ${{pvc.metadata.name}}, ${{pvc.metadata.namespace}}, ${{pv.metadata.name}}",
                    text.chars().take(64).collect::<String>()
                )));
            }
            sample.push('x');
        } else {
            sample.push_str(text);
        }
    }
    id::check_subdir(&sample).map_err(|e| invalid(format!("parameter subDir: {e}")))
}

/// Fills a subDir template from the CO's parameters; every value must be
/// one plain path component (Kubernetes names are).
pub fn expand(t: &str, params: &BTreeMap<String, String>) -> Result<String> {
    check_template(t)?;
    let mut out = String::new();
    for (var, text) in pieces(t)? {
        if !var {
            out.push_str(text);
            continue;
        }
        let key = VARIABLES
            .iter()
            .find(|(v, _)| *v == text)
            .map(|(_, k)| *k)
            .unwrap_or_default();
        let value = params.get(key).ok_or_else(|| {
            invalid(format!(
                "parameter subDir uses ${{{text}}} but the request has no {key} (run the external-provisioner with --extra-create-metadata)"
            ))
        })?;
        id::check_component(value).map_err(|e| {
            invalid(format!(
                "{key} {value:?} cannot be used in subDir: it contains {e}"
            ))
        })?;
        out.push_str(value);
    }
    id::check_subdir(&out)
        .map_err(|e| invalid(format!("parameter subDir expands to a bad path: {e}")))?;
    Ok(out)
}

/// 64-bit FNV-1a: a stable hash for names (not for security).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The default subdirectory: the volume name, with characters outside
/// `[A-Za-z0-9._-]` replaced by `_`. When that does not fit in `room`
/// bytes, a prefix of it and a hash of the whole name: `<prefix>-<16 hex>`.
/// None when `room` cannot hold even the hash.
pub fn default_subdir(name: &str, room: usize) -> Option<String> {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        s = format!("vol{s}");
    }
    if s.len() <= room.min(255) {
        return Some(s);
    }
    let hash = format!("{:016x}", fnv64(name.as_bytes()));
    let keep = room.min(255).checked_sub(hash.len())?;
    if keep <= 1 {
        return Some(hash);
    }
    Some(format!("{}-{hash}", &s[..keep - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_case_insensitive_keys() {
        let p = Params::parse(&m(&[
            ("SERVER", "nfs.example.com"),
            ("Share", "/exports/berth/"),
            ("subdir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
            ("MountPermissions", "0775"),
            ("onDelete", "Archive"),
            ("kind", "nfs"),
            ("csi.storage.k8s.io/pvc/name", "p"),
        ]))
        .unwrap();
        assert_eq!(p.server, "nfs.example.com");
        assert_eq!(p.share, "/exports/berth");
        assert_eq!(p.mount_permissions, Some(0o775));
        assert_eq!(p.on_delete, OnDelete::Archive);
        let p = Params::parse(&m(&[("server", "10.0.0.1"), ("share", "/e")])).unwrap();
        assert_eq!(p.on_delete, OnDelete::Delete);
        assert_eq!(p.mount_permissions, None);
        assert_eq!(p.sub_dir, None);
    }

    #[test]
    fn rejects_bad_parameters() {
        let base = [("server", "h"), ("share", "/e")];
        let with = |k: &str, v: &str| {
            let mut x = m(&base);
            x.insert(k.into(), v.into());
            Params::parse(&x)
        };
        let e = with("color", "blue").unwrap_err().to_string();
        assert!(e.contains("\"color\""), "{e}");
        assert!(with("Server", "other")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        for (k, v) in [
            ("onDelete", "shred"),
            ("mountPermissions", "rwx"),
            ("mountPermissions", "0999"),
            ("mountPermissions", "17777"),
            ("mountPermissions", ""),
            ("subDir", "/abs"),
            ("subDir", "../x"),
            ("subDir", "a/../../b"),
            ("subDir", "."),
            ("subDir", ""),
            ("subDir", "${pvc.metadata.labels}"),
            ("subDir", "${pvc.metadata.name"),
            ("subDir", "a b"),
            ("subDir", "a#b"),
        ] {
            assert!(with(k, v).is_err(), "{k}={v:?}");
        }
        for (server, share) in [
            ("", "/e"),
            ("-o", "/e"),
            ("h", "e"),
            ("h", "/e/../f"),
            ("fd00::1", "/e"),
            ("h,ro", "/e"),
        ] {
            assert!(
                Params::parse(&m(&[("server", server), ("share", share)])).is_err(),
                "{server} {share}"
            );
        }
        assert!(Params::parse(&m(&[("share", "/e")])).is_err());
        assert!(Params::parse(&m(&[("server", "h")])).is_err());
        assert!(Params::parse(&m(&[("server", "[fd00::1]"), ("share", "/")])).is_ok());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0777").unwrap(), Some(0o777));
        assert_eq!(parse_mode("777").unwrap(), Some(0o777));
        assert_eq!(parse_mode("2775").unwrap(), Some(0o2775));
        assert_eq!(parse_mode("0").unwrap(), None);
        assert_eq!(parse_mode("00000").unwrap(), None);
        assert!(parse_mode("-1").is_err());
        assert!(parse_mode("0x1ff").is_err());
    }

    #[test]
    fn templates() {
        let co = m(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "team-a"),
            ("csi.storage.k8s.io/pv/name", "pvc-123"),
        ]);
        assert_eq!(
            expand("${pvc.metadata.namespace}/${pvc.metadata.name}", &co).unwrap(),
            "team-a/data"
        );
        assert_eq!(
            expand("vols/${pv.metadata.name}-x", &co).unwrap(),
            "vols/pvc-123-x"
        );
        assert_eq!(expand("fixed", &co).unwrap(), "fixed");
        // A variable the request does not carry.
        let e = expand("${pvc.metadata.name}", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--extra-create-metadata"), "{e}");
        // Values that would escape or reach the share root.
        for bad in ["..", ".", "", "a/b", "a b", "x#y"] {
            let co = m(&[("csi.storage.k8s.io/pvc/name", bad)]);
            assert!(expand("${pvc.metadata.name}", &co).is_err(), "{bad:?}");
            assert!(expand("d/${pvc.metadata.name}", &co).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn volume_ids() {
        let p = Params::parse(&m(&[("server", "127.0.0.1"), ("share", "/export")])).unwrap();
        assert_eq!(
            p.volume_id("pvc-1", &BTreeMap::new()).unwrap(),
            "nfs#d#127.0.0.1#/export#pvc-1"
        );
        // A 128-byte name is shortened deterministically to fit.
        let long = "n".repeat(128);
        let a = p.volume_id(&long, &BTreeMap::new()).unwrap();
        assert_eq!(a.len(), MAX_ID);
        assert_eq!(a, p.volume_id(&long, &BTreeMap::new()).unwrap());
        let other = format!("{}m", "n".repeat(127));
        assert_ne!(a, p.volume_id(&other, &BTreeMap::new()).unwrap());
        VolumeId::parse(&a).unwrap();
        // Names that are not path components are made into one.
        assert_eq!(
            p.volume_id("a/b c", &BTreeMap::new()).unwrap(),
            "nfs#d#127.0.0.1#/export#a_b_c"
        );
        assert_eq!(
            p.volume_id("..", &BTreeMap::new()).unwrap(),
            "nfs#d#127.0.0.1#/export#vol.."
        );
        // An explicit subDir that does not fit is an error naming the limit.
        let mut q = p.clone();
        q.sub_dir = Some("d".repeat(120));
        let e = q.volume_id("x", &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("128"), "{e}");
    }

    #[test]
    fn default_subdir_shortens_with_hash() {
        assert_eq!(default_subdir("pvc-1", 100).unwrap(), "pvc-1");
        let s = default_subdir(&"x".repeat(50), 30).unwrap();
        assert_eq!(s.len(), 30);
        assert!(s.starts_with("xxxxxxxxxxxxx-"));
        assert_eq!(default_subdir("abc", 16).unwrap(), "abc");
        assert_eq!(default_subdir(&"x".repeat(20), 16).unwrap().len(), 16);
        assert_eq!(default_subdir(&"x".repeat(20), 15), None);
    }
}
