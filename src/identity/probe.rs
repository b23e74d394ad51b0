//! Probe: ready only when the state directory is writable, the state journal
//! accepts changes and every served kind's pool is present;
//! FAILED_PRECONDITION otherwise (the livenessprobe sidecar then has the
//! container restarted, which replays the journal). While start-up work
//! that runs after the socket is up is not done (interrupted NFS creates
//! and deletes, `Driver::start`), the answer is `ready: false`.
use std::sync::Arc;

use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};

pub async fn handle(d: Arc<Driver>) -> Result<csi::ProbeResponse> {
    let c = d.clone();
    tokio::task::spawn_blocking(move || check(&c))
        .await
        .map_err(|e| Error::Internal(format!("probe task failed: {e}")))??;
    Ok(csi::ProbeResponse {
        ready: Some(!d.reconciling()),
    })
}

pub fn check(d: &Driver) -> Result<()> {
    let dir = d.cfg.state_dir();
    let probe = dir.join(".probe.tmp");
    let f = d.os.files.as_ref();
    f.open(&probe, crate::os::files::Open::CreateOrTruncate)
        .and_then(|file| f.write_at(&file, &probe, b"ok", 0))
        .and_then(|_| f.remove_file(&probe))
        .map_err(|e| {
            Error::WrongState(format!(
                "state directory {} is not writable: {}",
                dir.display(),
                crate::error::chain(&e)
            ))
        })?;
    if let Some(why) = d.store.poisoned() {
        return Err(Error::WrongState(format!(
            "the state journal stopped accepting changes ({why}); restart berth"
        )));
    }
    for k in d.kinds() {
        k.pool_capacity().map_err(|e| {
            Error::WrongState(format!("{} pool is not ready: {}", k.kind(), e.render()))
        })?;
    }
    Ok(())
}
