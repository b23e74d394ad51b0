//! NodeExpandVolume: not advertised yet (EXPAND_VOLUME comes with block
//! volumes), so UNIMPLEMENTED as the spec asks.
use crate::csi::v1 as csi;
use crate::error::{Error, Result};

pub async fn handle() -> Result<csi::NodeExpandVolumeResponse> {
    Err(Error::Unimplemented(
        "volume expansion is not supported".into(),
    ))
}
