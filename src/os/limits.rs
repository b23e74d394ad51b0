//! The process's own resource limits.
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft and hard limits of open files berth was started with, once
/// `raise_open_files` raised the soft one (0, 0 before: nothing to give
/// back to commands).
static GIVEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Raises the soft limit of open file descriptors (`RLIMIT_NOFILE`) to
/// the hard one, as Go programs do at start (kubelet, the CSI sidecars):
/// the soft limit a container or a shell gives is often 1,024, while
/// berth holds a descriptor per connection to its socket (kubelet's, the
/// sidecars', and an idle one's: about 16 KiB each; at most half the soft
/// limit, `server::connection_limit`) and per pool disk
/// claimed for an unstaged volume, and each external command it runs
/// takes a few. The commands berth runs get the limit berth was given
/// (`restore_in_child`), as Go does for its children: some programs walk
/// every descriptor number up to the soft limit. Returns the soft limit
/// before and after; an error leaves the limits as they were.
pub fn raise_open_files() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `l`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = l.rlim_cur;
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        GIVEN[0].store(before, Ordering::SeqCst);
        GIVEN[1].store(l.rlim_max, Ordering::SeqCst);
    }
    Ok((before, l.rlim_cur))
}

/// The soft limit of open files now (after `raise_open_files`).
pub fn open_files() -> std::io::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes `l`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l.rlim_cur)
}

/// In a command's child, between fork and exec: the soft limit of open
/// files back to what berth was started with, if it raised it. Only
/// async-signal-safe calls (setrlimit), nothing allocated.
pub fn restore_in_child() -> std::io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: GIVEN[0].load(Ordering::SeqCst),
        rlim_max: GIVEN[1].load(Ordering::SeqCst),
    };
    if l.rlim_max == 0 {
        return Ok(());
    }
    // SAFETY: setrlimit only reads `l`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raised to the hard limit, and a child (here a forked process, as
    /// between fork and exec) gets the soft limit back; the test process
    /// keeps the hard limit it had (only the soft one moves).
    #[test]
    fn the_soft_limit_goes_up_and_commands_get_the_old_one() {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into `l`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        if l.rlim_max < 2 {
            return;
        }
        let low = libc::rlimit {
            rlim_cur: l.rlim_max / 2,
            rlim_max: l.rlim_max,
        };
        // SAFETY: sets this test process's soft limit only.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let (before, now) = raise_open_files().unwrap();
        assert_eq!((before, now), (l.rlim_max / 2, l.rlim_max));
        let out = {
            use std::os::unix::process::CommandExt;
            let mut c = std::process::Command::new("sh");
            c.args(["-c", "ulimit -Sn"]);
            // SAFETY: restore_in_child makes one async-signal-safe call.
            unsafe {
                c.pre_exec(restore_in_child);
            }
            c.output().unwrap()
        };
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (l.rlim_max / 2).to_string()
        );
    }
}
