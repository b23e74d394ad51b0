//! Input hygiene: every id, name, path and map from a request is checked here
//! before any handler uses it.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The CSI spec's size limit for strings.
pub const MAX_STRING: usize = 128;
/// The CSI spec's size limit for a map (all keys and values together).
pub const MAX_MAP: usize = 4096;
/// Paths are limited by the kernel, not by the CSI string limit.
pub const MAX_PATH: usize = 4096;

fn plain_string(field: &str, v: &str) -> Result<()> {
    string_of(field, v, char::is_control)
}

/// The characters the CSI spec bans in a name (CreateVolume's,
/// CreateSnapshot's): U+0000-U+0008, U+000B, U+000C, U+000E-U+001F and
/// U+007F-U+009F, "control characters other than commonly used
/// whitespace". Tab, LF and CR are allowed there.
fn banned_in_name(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// A non-empty string of at most `MAX_STRING` bytes without a character
/// `banned` refuses.
fn string_of(field: &str, v: &str, banned: impl Fn(char) -> bool) -> Result<()> {
    string_up_to(field, v, MAX_STRING, banned)
}

/// `string_of` for a field whose limit is `max` bytes.
fn string_up_to(field: &str, v: &str, max: usize, banned: impl Fn(char) -> bool) -> Result<()> {
    if v.is_empty() {
        return Err(Error::Invalid(format!("{field} is required")));
    }
    if v.len() > max {
        return Err(Error::Invalid(format!(
            "{field} is {} bytes long, more than the {max} bytes allowed",
            v.len()
        )));
    }
    if let Some(c) = v.chars().find(|&c| banned(c)) {
        return Err(Error::Invalid(format!(
            "{field} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

/// A volume id as received; the kind's own parser checks its structure.
pub fn volume_id(v: &str) -> Result<&str> {
    plain_string("volume_id", v).map(|_| v)
}

/// A snapshot id.
pub fn snapshot_id(v: &str) -> Result<&str> {
    plain_string("snapshot_id", v).map(|_| v)
}

/// A volume or snapshot name (CreateVolume, CreateSnapshot): tab, LF and
/// CR are allowed, as the spec has it (`banned_in_name`).
pub fn name(v: &str) -> Result<&str> {
    string_of("name", v, banned_in_name).map(|_| v)
}

/// A node id (this node's own: at most `MAX_STRING` bytes, the limit the
/// spec recommends).
pub fn node_id(v: &str) -> Result<&str> {
    plain_string("node_id", v).map(|_| v)
}

/// The CSI spec's limit for a node id: NodeGetInfoResponse's `node_id`
/// "overrides the general CSI size limit" and "SHALL NOT exceed 256
/// bytes"; a CO passes it back to ControllerPublishVolume and
/// ControllerUnpublishVolume.
pub const MAX_NODE_ID: usize = 256;

/// A node id in a request (ControllerPublishVolume,
/// ControllerUnpublishVolume): at most `MAX_NODE_ID` bytes, as the spec
/// allows. One longer than berth's own (`node_id`) names no node of
/// berth's, which is the RPC's answer for an unknown node, not
/// INVALID_ARGUMENT.
pub fn request_node_id(v: &str) -> Result<&str> {
    string_up_to("node_id", v, MAX_NODE_ID, char::is_control).map(|_| v)
}

/// The CSI spec's limit for a topology value (Kubernetes' for a label
/// value).
pub const MAX_TOPOLOGY_VALUE: usize = 63;

/// A topology segment's value, as the CSI spec has it: at most 63
/// characters, beginning and ending with an alphanumeric character, with
/// only `-`, `_`, `.` and alphanumerics between (ASCII; Kubernetes' label
/// value rules: kubelet puts it on the node as a label). Err says what is
/// wrong.
pub fn topology_value(v: &str) -> std::result::Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if v.is_empty() {
        return Err("a topology value must not be empty".into());
    }
    if v.chars().count() > MAX_TOPOLOGY_VALUE {
        return Err(format!(
            "it is {} characters long, and a topology value is at most {MAX_TOPOLOGY_VALUE}",
            v.chars().count()
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|&c| !alnum(c) && !matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "it contains {c:?}; a topology value has only letters and digits (ASCII), '-', '_' and '.'"
        ));
    }
    if !v.starts_with(alnum) || !v.ends_with(alnum) {
        return Err("a topology value begins and ends with a letter or digit".into());
    }
    Ok(())
}

/// An absolute, normalised path from the CO (target or staging path): no
/// `..` or `.` components, no control character (NUL, LF, CR, tab, ESC,
/// U+0080-U+009F, ...), not `/` itself. A kubelet never sends a control
/// character in a path (its paths are made of pod UIDs and volume names);
/// one in a path would be a mount point the kernel shows escaped in
/// mountinfo (`\012`) and that log lines and error messages carry.
pub fn abs_path(field: &str, v: &str) -> Result<PathBuf> {
    if v.is_empty() {
        return Err(Error::Invalid(format!("{field} is required")));
    }
    if v.len() >= MAX_PATH {
        return Err(Error::Invalid(format!(
            "{field} is too long: {} bytes (a path the kernel takes has at most {} bytes)",
            v.len(),
            MAX_PATH - 1
        )));
    }
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "{field} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    let p = Path::new(v);
    if !p.is_absolute() {
        return Err(Error::Invalid(format!(
            "{field} {v:?} is not an absolute path"
        )));
    }
    let mut normal = 0;
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::Invalid(format!(
                    "{field} {v:?} contains '.' or '..'"
                )))
            }
        }
    }
    // `Path::components` drops "." silently; check the raw text as well.
    if v.split('/').any(|s| s == "." || s == "..") {
        return Err(Error::Invalid(format!(
            "{field} {v:?} contains '.' or '..'"
        )));
    }
    if normal == 0 {
        return Err(Error::Invalid(format!("{field} must not be /")));
    }
    Ok(p.components().collect())
}

/// One path component made from an id: no `/`, `..`, `.`, NUL, or empty.
pub fn path_component(field: &str, v: &str) -> Result<()> {
    if v.is_empty() || v == "." || v == ".." || v.contains('/') || v.contains('\0') {
        return Err(Error::Invalid(format!(
            "{field} {v:?} is not a safe path component"
        )));
    }
    Ok(())
}

/// A string map from a request (parameters, volume context): size limit and
/// no empty or control-character keys. Secrets maps are never passed here,
/// so their contents cannot reach an error message.
pub fn map(
    field: &str,
    m: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let total: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_MAP {
        return Err(Error::Invalid(format!(
            "{field} is {total} bytes, more than the {MAX_MAP} bytes allowed"
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_STRING || k.chars().any(|c| c.is_control()) {
            return Err(Error::Invalid(format!(
                "{field} has an invalid key {:?}",
                k.chars().take(MAX_STRING).collect::<String>()
            )));
        }
        if v.contains('\0') {
            return Err(Error::Invalid(format!(
                "{field} key {k:?} has a value containing NUL"
            )));
        }
    }
    Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// A request's `secrets` (the spec's Secrets Requirements and Size
/// Limits): each key made of ASCII letters and digits, '-', '_' and '.'
/// (as a Kubernetes Secret's keys are), the map at most `MAX_MAP` bytes,
/// keys and values together (a map's limit; the spec sets none for one
/// value). Berth uses no secret; it only refuses a map the spec does not
/// allow. INVALID_ARGUMENT names the field only: never a value, nor a key
/// that breaks the rule (it may be a value put in the wrong place), nor
/// the map's size.
pub fn secrets(m: &std::collections::HashMap<String, String>) -> Result<()> {
    let total: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_MAP {
        return Err(Error::Invalid(format!(
            "secrets are more than the {MAX_MAP} bytes (keys and values together) the CSI spec allows a map"
        )));
    }
    let key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if m.keys().any(|k| k.is_empty() || !k.chars().all(key_char)) {
        return Err(Error::Invalid(
            "secrets have a key that is empty or has a character other than ASCII letters and digits, '-', '_' and '.' (the CSI spec's rule for a secret's key)".into(),
        ));
    }
    Ok(())
}

/// The CSI rule for plugin names, plus what csi-sanity and Kubernetes expect:
/// at most 63 characters, domain-name characters, starts and ends with a
/// letter.
pub fn driver_name(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || v.len() > 63 {
        return Err(format!("driver name {v:?} must be 1 to 63 characters"));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
    {
        return Err(format!(
            "driver name {v:?} may contain only lower-case letters, digits, '.' and '-'"
        ));
    }
    let first = v.chars().next().unwrap_or('0');
    let last = v.chars().last().unwrap_or('0');
    if !first.is_ascii_alphabetic() || !last.is_ascii_alphabetic() {
        return Err(format!(
            "driver name {v:?} must start and end with a letter"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_limits() {
        assert!(volume_id(&"a".repeat(128)).is_ok());
        assert!(volume_id(&"a".repeat(129)).is_err());
        assert!(volume_id("").is_err());
        assert!(node_id("node-1").is_ok());
        assert!(volume_id("a\nb").is_err());
    }

    /// Names follow the spec's own list of banned characters: every
    /// control character but tab, LF and CR (the "commonly used
    /// whitespace" it allows); the error names the character.
    #[test]
    fn names_allow_the_whitespace_the_spec_allows() {
        for ok in ["a\tb", "a\nb", "a\rb", "pvc-1 copy", "ü"] {
            assert!(name(ok).is_ok(), "{ok:?}");
        }
        for c in (0u32..=0x9f).filter_map(char::from_u32) {
            let banned = matches!(u32::from(c), 0..=8 | 0x0b | 0x0c | 0x0e..=0x1f | 0x7f..=0x9f);
            let v = format!("a{c}b");
            let r = name(&v);
            assert_eq!(r.is_err(), banned, "U+{:04X}", u32::from(c));
            if let Err(e) = r {
                assert!(
                    e.to_string().contains(&format!("U+{:04X}", u32::from(c))),
                    "{e}"
                );
            }
        }
        assert!(name(&"\t".repeat(128)).is_ok());
        assert!(name(&"\t".repeat(129)).is_err());
    }

    #[test]
    fn topology_values() {
        for ok in ["n", "node-1", "a.b_c-d", "0", &"a".repeat(63), "Node1"] {
            assert_eq!(topology_value(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "bad/node",
            "node 1",
            "-a",
            "a-",
            ".a",
            "a_",
            "nöde",
            "a:b",
            &"a".repeat(64),
        ] {
            assert!(topology_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(abs_path("p", "/a/b/").unwrap(), PathBuf::from("/a/b"));
        for bad in [
            "", "a/b", "/a/../b", "/a/./b", "/", "/a\0b", "//..", "/a/..",
        ] {
            assert!(abs_path("p", bad).is_err(), "{bad:?}");
        }
        // Control characters are refused, naming the character; spaces,
        // backslashes and text that looks like mountinfo's escapes are not.
        for (bad, c) in [
            ("/a\nb", "U+000A"),
            ("/a\rb", "U+000D"),
            ("/a\tb", "U+0009"),
            ("/a/\u{1b}[31m", "U+001B"),
            ("/a\u{7f}", "U+007F"),
            ("/a\u{85}", "U+0085"),
            ("/a\0b", "U+0000"),
        ] {
            let e = abs_path("target_path", bad).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{bad:?}: {e:?}");
            assert!(
                e.to_string()
                    .starts_with(&format!("target_path contains the control character {c}")),
                "{bad:?}: {e}"
            );
        }
        for ok in ["/pods/a b/mount", "/pods/a\\b", "/pods/a\\040b", "/pods/ü"] {
            assert_eq!(abs_path("p", ok).unwrap(), PathBuf::from(ok), "{ok:?}");
        }
        // PATH_MAX (4096) counts the terminating NUL: 4095 bytes at most.
        let at_most = format!("/{}", "a/".repeat(2047));
        assert_eq!(at_most.len(), 4095);
        assert!(abs_path("p", &at_most).is_ok());
        let over = format!("{at_most}b");
        let e = abs_path("p", &over).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    }

    #[test]
    fn components() {
        assert!(path_component("id", "local-abc").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(path_component("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn driver_names() {
        assert!(driver_name("berth.csi.io").is_ok());
        assert!(driver_name("local.berth.csi.io").is_ok());
        for bad in [
            "",
            "1berth",
            "berth.io1",
            "Berth.io",
            "a_b.io",
            &"a".repeat(64),
        ] {
            assert!(driver_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maps() {
        let mut m = std::collections::HashMap::new();
        m.insert("k".to_string(), "v".repeat(4000));
        assert!(map("parameters", &m).is_ok());
        m.insert("k2".to_string(), "v".repeat(200));
        assert!(map("parameters", &m).is_err());
    }

    proptest::proptest! {
        #[test]
        fn accepted_paths_have_no_dot_components(s in "(/[a-z.]{0,3}){1,5}") {
            if let Ok(p) = abs_path("p", &s) {
                for c in p.components() {
                    proptest::prop_assert!(matches!(c, Component::RootDir | Component::Normal(_)));
                    if let Component::Normal(n) = c {
                        proptest::prop_assert!(n != "." && n != "..");
                    }
                }
            }
        }
    }
}
