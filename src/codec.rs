//! The gRPC codec of the CSI services: prost's, except that a request that
//! does not decode is INVALID_ARGUMENT, not INTERNAL.
//!
//! A string field that is not UTF-8 (proto3 strings must be), a message cut
//! short or a field of the wrong wire type never reaches a handler: prost
//! refuses it while decoding, and tonic-prost's codec answers INTERNAL
//! (gRPC's advice for a parse failure). For a CSI plugin such a request is
//! a bad argument from the caller, which the spec answers with
//! INVALID_ARGUMENT, and INTERNAL would say the plugin failed. The message
//! names the field, never its bytes (prost's decode errors carry no data).
//! build.rs makes the generated services and clients use this codec.
use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// `tonic_prost::ProstCodec` with decode failures as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct CsiCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decodes as prost does; a failure is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct CsiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            Status::invalid_argument(format!(
                "the message does not decode as CSI's ({})",
                s.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
