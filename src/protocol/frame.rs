//! The typed frame reader and writer of a link whose stream is split in
//! two halves, one read by a task while another writes (both ends of the
//! queue link). [`Connection`](super::Connection) is the same thing over
//! one stream.
//!
//! Frames are those of every link ([`super::codec`]): a 4-byte big-endian
//! length, then one JSON document. A [`FrameWriter`] encodes each message
//! with serde straight into its write buffer; a [`FrameReader`] decodes
//! each frame with [`super::decode`], so a frame that does not decode is
//! one error and the next read goes on with the next frame.

use std::io;
use std::marker::PhantomData;

use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Encoder, FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{codec, decode, map_codec_error, ProtocolError, MAX_FRAME_LEN};

/// Reads frames from a byte stream as messages of type `M`.
#[derive(Debug)]
pub struct FrameReader<R, M> {
    /// The frames, undecoded.
    framed: FramedRead<R, LengthDelimitedCodec>,
    /// The type of the messages read.
    _message: PhantomData<fn() -> M>,
}

impl<R: AsyncRead + Unpin, M: DeserializeOwned> FrameReader<R, M> {
    /// Reads frames from `reader`.
    pub fn new(reader: R) -> Self {
        FrameReader {
            framed: FramedRead::new(reader, codec()),
            _message: PhantomData,
        }
    }

    /// Reads the next message; `Ok(None)` at a clean end of stream.
    ///
    /// # Errors
    /// [`ProtocolError::Io`] and [`ProtocolError::FrameTooBig`]: the
    /// stream is unusable. [`ProtocolError::UnexpectedMessage`] and
    /// [`ProtocolError::Corrupt`]: that frame only, the next read takes
    /// the next frame.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is either returned whole or stays buffered.
    pub async fn read(&mut self) -> Result<Option<M>, ProtocolError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(err)) => Err(map_codec_error(err)),
            Some(Ok(body)) => decode(&body).map(Some),
        }
    }

    /// Reads the next frame and drops it undecoded: `Ok(false)` at a clean
    /// end of stream.
    ///
    /// # Errors
    /// [`ProtocolError::Io`] and [`ProtocolError::FrameTooBig`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn skip(&mut self) -> Result<bool, ProtocolError> {
        match self.framed.next().await {
            None => Ok(false),
            Some(Err(err)) => Err(map_codec_error(err)),
            Some(Ok(_)) => Ok(true),
        }
    }
}

/// Writes messages of type `M` to a byte stream as frames.
///
/// Each message is encoded straight into the write buffer when it is
/// fed; the buffer goes out at [`flush`](Self::flush) (or before, once
/// it is large).
#[derive(Debug)]
pub struct FrameWriter<W, M> {
    /// The stream, with its buffer and the encoder.
    framed: FramedWrite<W, MessageEncoder<M>>,
}

impl<W: AsyncWrite + Unpin, M: Serialize> FrameWriter<W, M> {
    /// Writes frames to `writer`.
    pub fn new(writer: W) -> Self {
        FrameWriter {
            framed: FramedWrite::new(writer, MessageEncoder(PhantomData)),
        }
    }

    /// Encodes `message` into the write buffer, writing out what is
    /// buffered first if the buffer is large.
    ///
    /// # Errors
    /// [`ProtocolError::Encode`] and [`ProtocolError::FrameTooBig`] for a
    /// message that cannot be sent (nothing of it is buffered), and
    /// [`ProtocolError::Io`].
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled write may leave half a frame behind,
    /// so the stream must then be dropped. The same goes for every method
    /// below.
    pub async fn feed(&mut self, message: M) -> Result<(), ProtocolError> {
        self.framed
            .feed(message)
            .await
            .map_err(EncodeError::into_inner)
    }

    /// Writes out everything buffered.
    ///
    /// # Errors
    /// [`ProtocolError::Io`].
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        SinkExt::<M>::flush(&mut self.framed)
            .await
            .map_err(EncodeError::into_inner)
    }

    /// [`feed`](Self::feed), then [`flush`](Self::flush).
    ///
    /// # Errors
    /// As theirs.
    pub async fn send(&mut self, message: M) -> Result<(), ProtocolError> {
        self.framed
            .send(message)
            .await
            .map_err(EncodeError::into_inner)
    }

    /// Flushes, then shuts the stream down (its end of stream for the
    /// peer).
    ///
    /// # Errors
    /// [`ProtocolError::Io`].
    pub async fn close(&mut self) -> Result<(), ProtocolError> {
        SinkExt::<M>::close(&mut self.framed)
            .await
            .map_err(EncodeError::into_inner)
    }
}

/// Appends `message` as one frame (its length, then its JSON) to `dst`.
///
/// # Errors
/// [`ProtocolError::Encode`] if serde refuses the message and
/// [`ProtocolError::FrameTooBig`] if it is larger than [`MAX_FRAME_LEN`];
/// `dst` is then as it was.
fn encode_frame<M: Serialize + ?Sized>(
    message: &M,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0);
    if let Err(err) = serde_json::to_writer(dst.writer(), message) {
        dst.truncate(start);
        return Err(ProtocolError::Encode(err));
    }
    let len = dst.len() - start - 4;
    match u32::try_from(len) {
        Ok(len32) if len <= MAX_FRAME_LEN => {
            dst[start..start + 4].copy_from_slice(&len32.to_be_bytes());
            Ok(())
        }
        _ => {
            dst.truncate(start);
            Err(ProtocolError::FrameTooBig {
                limit: MAX_FRAME_LEN,
            })
        }
    }
}

/// The encoder of a [`FrameWriter`]: [`encode_frame`].
#[derive(Debug)]
struct MessageEncoder<M>(PhantomData<fn(M)>);

impl<M: Serialize> Encoder<M> for MessageEncoder<M> {
    type Error = EncodeError;

    fn encode(&mut self, message: M, dst: &mut BytesMut) -> Result<(), EncodeError> {
        encode_frame(&message, dst).map_err(EncodeError)
    }
}

/// An error of a [`FrameWriter`]'s sink: what the encoder says, or the
/// stream's I/O error (the sink needs a `From<io::Error>`).
#[derive(Debug)]
struct EncodeError(ProtocolError);

impl EncodeError {
    fn into_inner(self) -> ProtocolError {
        self.0
    }
}

impl From<io::Error> for EncodeError {
    fn from(err: io::Error) -> Self {
        EncodeError(ProtocolError::Io(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use tokio::io::AsyncWriteExt;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum Msg {
        A { n: u32 },
    }

    #[tokio::test]
    async fn messages_go_through_and_a_bad_frame_is_one_error() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::<_, Msg>::new(b);
        let mut reader = FrameReader::<_, Msg>::new(a);
        writer.feed(Msg::A { n: 1 }).await.unwrap();
        writer.send(Msg::A { n: 2 }).await.unwrap();
        assert_eq!(reader.read().await.unwrap(), Some(Msg::A { n: 1 }));
        assert_eq!(reader.read().await.unwrap(), Some(Msg::A { n: 2 }));
        writer.close().await.unwrap();
        assert_eq!(reader.read().await.unwrap(), None);

        // A frame of another shape, then a message.
        let (a, mut b) = tokio::io::duplex(256);
        let mut reader = FrameReader::<_, Msg>::new(a);
        let mut bytes = BytesMut::new();
        let skew = br#"{"B":{}}"#;
        bytes.put_u32(skew.len() as u32);
        bytes.extend_from_slice(skew);
        encode_frame(&Msg::A { n: 3 }, &mut bytes).unwrap();
        b.write_all(&bytes).await.unwrap();
        drop(b);
        let err = reader.read().await.unwrap_err();
        assert!(
            matches!(err, ProtocolError::UnexpectedMessage { .. }),
            "{err}"
        );
        assert_eq!(reader.read().await.unwrap(), Some(Msg::A { n: 3 }));
        assert!(!reader.skip().await.unwrap());
    }

    #[test]
    fn frames_are_a_length_then_json_and_oversized_ones_are_not_written() {
        let mut bytes = BytesMut::from(&b"kept"[..]);
        encode_frame(&Msg::A { n: 7 }, &mut bytes).unwrap();
        let body = br#"{"A":{"n":7}}"#;
        assert_eq!(&bytes[4..8], &(body.len() as u32).to_be_bytes());
        assert_eq!(&bytes[8..], body);
        let big = "x".repeat(MAX_FRAME_LEN);
        let err = encode_frame(&big, &mut bytes).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooBig { .. }), "{err}");
        let mut map = std::collections::HashMap::new();
        map.insert((1u8, 2u8), 3u8);
        let err = encode_frame(&map, &mut bytes).unwrap_err();
        assert!(matches!(err, ProtocolError::Encode(_)), "{err}");
        assert_eq!(bytes.len(), 8 + body.len(), "nothing of them is left");
    }

    #[tokio::test]
    async fn an_oversized_frame_breaks_the_reader() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut reader = FrameReader::<_, Msg>::new(a);
        b.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let err = reader.read().await.unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooBig { .. }), "{err}");
    }
}
