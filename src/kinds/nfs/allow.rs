//! `--nfs-allowed-shares`: the exports an admin lets Berth use.
//!
//! Each entry is `server:/path` (that server only) or `/path` (any server).
//! A volume's share is allowed when it is a listed path or lies below one,
//! on a listed server (in any spelling of it: `id::canonical_server`). An empty list allows any share except `/` (an NFSv4
//! pseudo-root reaches every export of the server): `/` must be listed
//! explicitly, as `server:/` or `/`.
use super::id::{check_server, check_share, normalize_share, path_within, same_host};

/// One entry of `--nfs-allowed-shares`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedShare {
    /// None: any server.
    pub server: Option<String>,
    /// Absolute, normalised.
    pub path: String,
}

impl AllowedShare {
    /// Parses `server:/path` or `/path`.
    pub fn parse(s: &str) -> Result<AllowedShare, String> {
        let s = s.trim();
        let (server, path) = if s.starts_with('/') {
            (None, s)
        } else if let Some(i) = s.find("]:/") {
            (Some(&s[..=i]), &s[i + 2..])
        } else {
            match s.split_once(":/") {
                Some((h, _)) => (Some(h), &s[h.len() + 1..]),
                None => {
                    return Err(format!(
                        "NFS share {:?} must be server:/path or /path",
                        s.chars().take(64).collect::<String>()
                    ))
                }
            }
        };
        if let Some(h) = server {
            check_server(h)?;
        }
        let path = normalize_share(path);
        check_share(&path)?;
        Ok(AllowedShare {
            server: server.map(str::to_string),
            path,
        })
    }

    fn permits(&self, server: &str, share: &str) -> bool {
        self.server.as_deref().is_none_or(|h| same_host(h, server))
            && path_within(share, &self.path)
    }
}

/// The checked list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedShares(pub Vec<AllowedShare>);

impl AllowedShares {
    /// Whether Berth may use `share` (normalised) on `server`.
    pub fn permits(&self, server: &str, share: &str) -> bool {
        if self.0.is_empty() {
            return share != "/";
        }
        self.0.iter().any(|a| a.permits(server, share))
    }

    /// Why `server:share` is refused, for error messages.
    pub fn refusal(&self, server: &str, share: &str) -> String {
        if self.0.is_empty() {
            format!(
                "share / on {server} reaches every export of the server: list it in --nfs-allowed-shares (as {server}:/) to allow it"
            )
        } else {
            format!("share {share} on {server} is not in --nfs-allowed-shares")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries() {
        let p = |s| AllowedShare::parse(s).unwrap();
        assert_eq!(
            p("nfs.example.com:/exports/berth/"),
            AllowedShare {
                server: Some("nfs.example.com".into()),
                path: "/exports/berth".into()
            }
        );
        assert_eq!(p("[fd00::1]:/").server.as_deref(), Some("[fd00::1]"));
        assert_eq!(p("[fd00::1]:/").path, "/");
        assert_eq!(p("/data").server, None);
        for bad in [
            "",
            "export",
            "h:export",
            "-o:/x",
            "h:/a/../b",
            "fd00::1:/x",
            "h:/a b",
        ] {
            assert!(AllowedShare::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn permits_listed_shares_and_below() {
        let none = AllowedShares::default();
        assert!(none.permits("h", "/e"));
        assert!(!none.permits("h", "/"));
        let l = AllowedShares(vec![
            AllowedShare::parse("h:/e").unwrap(),
            AllowedShare::parse("/any").unwrap(),
            AllowedShare::parse("[fd00::1]:/").unwrap(),
        ]);
        assert!(l.permits("h", "/e"));
        assert!(l.permits("H", "/e/sub"));
        assert!(!l.permits("h", "/"));
        assert!(!l.permits("h", "/ex"));
        assert!(!l.permits("g", "/e"));
        assert!(l.permits("g", "/any/x"));
        assert!(l.permits("[fd00::1]", "/"));
        assert!(l.permits("[fd00::1]", "/x"));
        // Another spelling of a listed address is that address.
        let l = AllowedShares(vec![
            AllowedShare::parse("127.0.0.1:/e").unwrap(),
            AllowedShare::parse("[FD00::1]:/f").unwrap(),
        ]);
        assert!(l.permits("0x7f.1", "/e"));
        assert!(l.permits("[::ffff:127.0.0.1]", "/e/x"));
        assert!(l.permits("[fd00:0::1]", "/f"));
        assert!(!l.permits("127.0.0.2", "/e"));
        assert!(!l.permits("localhost", "/e"));
    }
}
