//! The protobuf codec of the API: prost's, except that a message that does not
//! decode is the caller's fault and answered with INVALID_ARGUMENT (prost's
//! codec says INTERNAL, which would blame the server).

use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

#[derive(Debug, Clone)]
pub struct ValidatingCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ValidatingCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ValidatingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

#[derive(Debug)]
pub struct ValidatingDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ValidatingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            let mut status =
                Status::invalid_argument(format!("message is not a valid protobuf message: {}", s.message()));
            status.metadata_mut().insert(
                super::ERROR_KIND_HEADER,
                tonic::metadata::MetadataValue::from_static(crate::scheduler::ErrorKind::BadProtobuf.as_str()),
            );
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
