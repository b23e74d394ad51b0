//! RPCs of capabilities Berth does not advertise (yet): UNIMPLEMENTED, as the
//! spec asks.
use crate::error::{Error, Result};

pub async fn snapshots<T>() -> Result<T> {
    Err(Error::Unimplemented("snapshots are not supported".into()))
}

pub async fn modify<T>() -> Result<T> {
    Err(Error::Unimplemented(
        "volume modification is not supported".into(),
    ))
}
