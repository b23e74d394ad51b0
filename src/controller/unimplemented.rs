//! RPCs of capabilities Berth does not advertise (yet): UNIMPLEMENTED, as the
//! spec asks.
use crate::error::{Error, Result};

pub async fn modify<T>() -> Result<T> {
    Err(Error::Unsupported(
        "volume modification is not supported".into(),
    ))
}
