//! `blkid -p` (low-level probe, no cache): what is on a device.
//!
//! blkid exits 2 both for "nothing found" and for some failures (a device it
//! cannot open or read yields exit 2 and no output), so only exit 2 with no
//! output at all counts as blank, and callers prove the device readable
//! first (`BlockDevices::read_head`). Every other outcome is either a
//! signature or an error; neither may lead to a format.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::command::Runner;
use super::OsError;

pub const PROGRAM: &str = "blkid";
const TIMEOUT: Duration = Duration::from_secs(60);

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem, partition table or other signature.
    Blank,
    /// The `KEY=value` pairs blkid printed (TYPE, USAGE, PTTYPE, ...).
    Signature(BTreeMap<String, String>),
}

impl Probe {
    /// A short description for messages: "ext4 filesystem", "gpt partition
    /// table", ...
    pub fn describe(&self) -> String {
        match self {
            Probe::Blank => "nothing".into(),
            Probe::Signature(m) => {
                let mut parts = Vec::new();
                if let Some(t) = m.get("TYPE") {
                    let usage = m.get("USAGE").map(String::as_str).unwrap_or("signature");
                    parts.push(format!("{t} {usage}"));
                }
                if let Some(pt) = m.get("PTTYPE") {
                    parts.push(format!("{pt} partition table"));
                }
                if parts.is_empty() {
                    parts.push("an unknown signature".into());
                }
                parts.join(" and ")
            }
        }
    }

    /// The filesystem UUID blkid reported, if any.
    pub fn uuid(&self) -> Option<&str> {
        match self {
            Probe::Blank => None,
            Probe::Signature(m) => m.get("UUID").map(String::as_str),
        }
    }

    /// True when the only thing found is a `fs_type` filesystem.
    pub fn is_only_filesystem(&self, fs_type: &str) -> bool {
        match self {
            Probe::Blank => false,
            Probe::Signature(m) => {
                m.get("TYPE").map(String::as_str) == Some(fs_type)
                    && m.get("USAGE").is_none_or(|u| u == "filesystem")
                    && !m.contains_key("PTTYPE")
                    && !m.contains_key("PART_ENTRY_TYPE")
            }
        }
    }
}

/// Probes `device` with `blkid -p -o export`.
pub fn probe(cmd: &dyn Runner, device: &Path) -> Result<Probe, OsError> {
    let args = vec![
        "-p".to_string(),
        "-o".into(),
        "export".into(),
        "--".into(),
        device.display().to_string(),
    ];
    let out = cmd.run(PROGRAM, &args, TIMEOUT)?;
    parse(out.code, &out.stdout, &out.stderr)
}

/// Interprets blkid's exit code and output.
pub fn parse(code: Option<i32>, stdout: &str, stderr: &str) -> Result<Probe, OsError> {
    let failed = |why: &str| OsError::Failed {
        program: PROGRAM.into(),
        status: match code {
            Some(c) => format!("exit {c}, {why}"),
            None => format!("killed by signal, {why}"),
        },
        stderr: stderr.trim().chars().take(500).collect(),
    };
    match code {
        Some(2) if stdout.trim().is_empty() && stderr.trim().is_empty() => Ok(Probe::Blank),
        Some(2) => Err(failed("output on a 'nothing found' exit")),
        Some(0) => {
            let mut m = BTreeMap::new();
            for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| failed("unparsable output"))?;
                if k != "DEVNAME" {
                    m.insert(k.to_string(), v.to_string());
                }
            }
            if m.is_empty() {
                return Err(failed("success without any signature"));
            }
            Ok(Probe::Signature(m))
        }
        // 4: usage or device error, 8: ambivalent (several signatures).
        _ => Err(failed("probe failed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_inputs() {
        assert_eq!(parse(Some(2), "", "").unwrap(), Probe::Blank);
        assert_eq!(parse(Some(2), "\n", " ").unwrap(), Probe::Blank);
        assert!(parse(Some(2), "", "error: /dev/x: No such device").is_err());
        assert!(parse(Some(2), "TYPE=ext4\n", "").is_err());
        assert!(parse(Some(4), "", "").is_err());
        assert!(parse(Some(8), "", "ambivalent result").is_err());
        assert!(parse(None, "", "").is_err());
        assert!(parse(Some(0), "", "").is_err());
        assert!(parse(Some(0), "garbage", "").is_err());
        let p = parse(
            Some(0),
            "DEVNAME=/dev/loop0\nUUID=1\nTYPE=ext4\nUSAGE=filesystem\n",
            "",
        )
        .unwrap();
        assert!(p.is_only_filesystem("ext4"));
        assert!(!p.is_only_filesystem("xfs"));
        assert_eq!(p.describe(), "ext4 filesystem");
        let pt = parse(Some(0), "PTUUID=a\nPTTYPE=gpt\n", "").unwrap();
        assert!(!pt.is_only_filesystem("ext4"));
        assert_eq!(pt.describe(), "gpt partition table");
        let luks = parse(Some(0), "TYPE=crypto_LUKS\nUSAGE=crypto\n", "").unwrap();
        assert!(!luks.is_only_filesystem("crypto_LUKS"));
        assert_eq!(luks.describe(), "crypto_LUKS crypto");
    }
}
