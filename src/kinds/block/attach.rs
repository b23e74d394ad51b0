//! Loop attachments of volume files. Attachments are found from what the
//! kernel reports (sysfs, confirmed by device and inode of the backing
//! file), so a restarted Berth reuses the device it attached before instead
//! of attaching the file twice; a detach counts only once sysfs shows the
//! device unbound.
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::os::{AttachOptions, LoopInfo, Os};

/// How long a detach waits for a device that was busy at LOOP_CLR_FD (udev
/// probing it, say) to go away by itself before reporting it busy.
const SETTLE: Duration = Duration::from_millis(500);
const SETTLE_STEP: Duration = Duration::from_millis(20);

/// The loop devices `file` is attached to.
pub fn attachments(os: &Os, file: &Path) -> Result<Vec<LoopInfo>> {
    let id = os
        .files
        .lstat(file)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| (m.dev(), m.ino()));
    let list = os
        .loops
        .list()
        .map_err(|e| Error::os("listing loop devices", e))?;
    let name = file.file_name();
    Ok(list
        .into_iter()
        .filter(|l| {
            let same_path = l.backing_file == file;
            // Another mount namespace may show another path for the same
            // file; the name and the inode decide then.
            if !same_path && l.backing_file.file_name() != name {
                return false;
            }
            match (id, os.loops.backing_id(&l.device)) {
                (Some(id), Ok(b)) => id == b,
                // The file is gone: only an exact path of a deleted file.
                (None, _) => same_path && l.backing_deleted,
                (Some(_), Err(_)) => same_path && !l.backing_deleted,
            }
        })
        .collect())
}

/// The loop device of `file`, attaching it if it has none; true when this
/// call attached it. An attachment left by an earlier run is reused (its
/// autoclear, which Berth never sets but a busy detach does, is cleared).
pub fn ensure_attached(os: &Os, file: &Path, read_only: bool) -> Result<(LoopInfo, bool)> {
    let found = attachments(os, file)?;
    match found.as_slice() {
        [] => os
            .loops
            .attach(
                file,
                AttachOptions {
                    read_only,
                    direct_io: true,
                },
            )
            .map(|l| (l, true))
            .map_err(|e| Error::os(format!("attaching {} to a loop device", file.display()), e)),
        [one] => {
            if one.read_only != read_only {
                return Err(Error::WrongState(format!(
                    "{} is attached to {} {}; unstage the volume first",
                    file.display(),
                    one.device.display(),
                    if one.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            if one.autoclear {
                os.loops
                    .clear_autoclear(&one.device)
                    .map_err(|e| Error::os("clearing autoclear", e))?;
            }
            Ok((one.clone(), false))
        }
        many => Err(Error::WrongState(format!(
            "{} is attached to several loop devices ({}); detach all but one",
            file.display(),
            many.iter()
                .map(|l| l.device.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn still_bound(os: &Os, l: &LoopInfo) -> Result<Option<LoopInfo>> {
    Ok(os
        .loops
        .list()
        .map_err(|e| Error::os("listing loop devices", e))?
        .into_iter()
        .find(|x| x.device == l.device && x.backing_file == l.backing_file))
}

/// Detaches `l` and checks through sysfs that it is gone. LOOP_CLR_FD on a
/// device someone holds open only sets autoclear; if the device is still
/// bound after a short wait, the flag is cleared again (Berth never leaves
/// autoclear set) and the detach fails, to be retried.
pub fn detach_verified(os: &Os, l: &LoopInfo) -> Result<()> {
    os.loops
        .detach(&l.device)
        .map_err(|e| Error::os(format!("detaching {}", l.device.display()), e))?;
    let mut waited = Duration::ZERO;
    loop {
        let Some(left) = still_bound(os, l)? else {
            return Ok(());
        };
        if waited >= SETTLE {
            let _ = os.loops.clear_autoclear(&left.device);
            return Err(Error::WrongState(format!(
                "loop device {} of {} is still in use by another process and stays attached; retry once it is closed",
                l.device.display(),
                l.backing_file.display()
            )));
        }
        std::thread::sleep(SETTLE_STEP);
        waited += SETTLE_STEP;
    }
}
