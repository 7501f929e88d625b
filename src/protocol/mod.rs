//! Frames and the codec shared by every link.
//!
//! Every link of taskherd (master <-> slave over the control socket,
//! master <-> agent, feeder <-> consumer, and the master's control socket)
//! carries the same thing: length-delimited frames (a 4-byte big-endian
//! length, then the body) whose body is one JSON document. [`Connection`]
//! wraps any byte stream with that codec; [`FrameReader`] and
//! [`FrameWriter`] are its two halves for a stream split between a reading
//! and a writing task (the queue link). Each link has its own file with its
//! message enums (`slave`, `agent`, `queue`, `control`), and `instance`
//! holds the data about instances that the agent link carries and both its
//! ends supervise by.
//!
//! A frame that does not decode as the expected enum is re-read as a plain
//! JSON value so that the error says whether the peer sent valid JSON of an
//! unknown shape (version skew) or garbage (corruption).

#[cfg(feature = "master")]
pub mod agent;
#[cfg(feature = "master")]
pub mod control;
mod frame;
#[cfg(feature = "master")]
pub mod instance;
pub mod millis;
pub mod queue;
pub mod slave;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub use frame::{FrameReader, FrameWriter};

/// Version of the wire protocol, sent in the first frame of every link.
///
/// Bumped whenever a message changes in a way an older peer cannot read.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body accepted or sent, in bytes.
///
/// A length prefix above this closes the connection instead of making us
/// allocate whatever a corrupt or hostile peer asks for.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Errors of a framed link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("i/o error on the link")]
    Io(#[source] std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame too big (limit {limit} bytes)")]
    FrameTooBig {
        /// The limit in force.
        limit: usize,
    },
    /// The frame is valid JSON but not a message we know: most likely the
    /// peer runs another version of taskherd.
    #[error("unexpected message (version skew?): {snippet}")]
    UnexpectedMessage {
        /// The start of the frame, for the log.
        snippet: String,
        /// Why serde refused it.
        #[source]
        source: serde_json::Error,
    },
    /// The frame is not JSON at all.
    #[error("corrupt frame: {snippet}")]
    Corrupt {
        /// The start of the frame, for the log.
        snippet: String,
        /// Why it is not JSON.
        #[source]
        source: serde_json::Error,
    },
    /// A message could not be encoded (a bug, or a non-string map key).
    #[error("cannot encode message")]
    Encode(#[source] serde_json::Error),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`].
        ours: u32,
        /// The version the peer announced.
        theirs: u32,
    },
}

/// The codec of every link: length-delimited frames with an explicit limit.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Encodes one message as a frame body.
///
/// # Errors
/// [`ProtocolError::Encode`] if serde refuses the message, and
/// [`ProtocolError::FrameTooBig`] if it is larger than [`MAX_FRAME_LEN`].
pub fn encode<M: Serialize>(message: &M) -> Result<Bytes, ProtocolError> {
    let body = serde_json::to_vec(message).map_err(ProtocolError::Encode)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooBig {
            limit: MAX_FRAME_LEN,
        });
    }
    Ok(Bytes::from(body))
}

/// Decodes one frame body, telling version skew from corruption.
///
/// # Errors
/// [`ProtocolError::UnexpectedMessage`] for valid JSON of another shape,
/// [`ProtocolError::Corrupt`] for anything else.
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<M, ProtocolError> {
    serde_json::from_slice(body).map_err(|source| {
        let snippet = snippet(body);
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(_) => ProtocolError::UnexpectedMessage { snippet, source },
            Err(source) => ProtocolError::Corrupt { snippet, source },
        }
    })
}

fn snippet(body: &[u8]) -> String {
    const SNIPPET_LEN: usize = 120;
    let end = body.len().min(SNIPPET_LEN);
    let mut text = String::from_utf8_lossy(&body[..end]).into_owned();
    if body.len() > end {
        text.push('…');
    }
    text
}

/// Maps a read error of the codec: the one place that tells an oversized
/// frame from an I/O error.
fn map_codec_error(err: std::io::Error) -> ProtocolError {
    // LengthDelimitedCodec reports an oversized frame as InvalidData.
    if err.kind() == std::io::ErrorKind::InvalidData {
        ProtocolError::FrameTooBig {
            limit: MAX_FRAME_LEN,
        }
    } else {
        ProtocolError::Io(err)
    }
}

/// A framed JSON link over any byte stream.
///
/// `R` is the type of the messages read, `W` of those written: each link
/// file in this module defines the pair for each side.
#[derive(Debug)]
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a byte stream.
    pub fn new(stream: S) -> Self {
        Connection {
            framed: Framed::new(stream, codec()),
        }
    }

    /// Reads the next message; `Ok(None)` on a clean end of stream.
    ///
    /// # Errors
    /// I/O errors, oversized frames, and frames that do not decode as `M`.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is either returned whole or stays buffered.
    pub async fn read_frame<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtocolError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(err)) => Err(map_codec_error(err)),
            Some(Ok(body)) => decode(&body).map(Some),
        }
    }

    /// Writes one message and flushes it.
    ///
    /// # Errors
    /// I/O errors and messages that cannot be encoded.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled write may leave half a frame behind, so
    /// the connection must then be dropped.
    pub async fn write_frame<M: Serialize>(&mut self, message: &M) -> Result<(), ProtocolError> {
        let body = encode(message)?;
        self.framed.send(body).await.map_err(map_codec_error)
    }

    /// Writes one message into the buffer, without flushing it (the
    /// buffer is written out when it is full): [`Connection::flush`]
    /// after a batch.
    ///
    /// # Errors
    /// I/O errors and messages that cannot be encoded.
    ///
    /// # Cancel safety
    /// Not cancel safe, as [`Connection::write_frame`].
    pub async fn feed_frame<M: Serialize>(&mut self, message: &M) -> Result<(), ProtocolError> {
        let body = encode(message)?;
        self.framed.feed(body).await.map_err(map_codec_error)
    }

    /// Writes out what [`Connection::feed_frame`] buffered.
    ///
    /// # Errors
    /// I/O errors.
    ///
    /// # Cancel safety
    /// Not cancel safe, as [`Connection::write_frame`].
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        SinkExt::<Bytes>::flush(&mut self.framed)
            .await
            .map_err(map_codec_error)
    }

    /// Gives back the stream, dropping anything buffered.
    pub fn into_inner(self) -> S {
        self.framed.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum Msg {
        A { n: u32 },
    }

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (a, b) = tokio::io::duplex(64);
        let mut a = Connection::new(a);
        let mut b = Connection::new(b);
        a.write_frame(&Msg::A { n: 7 }).await.unwrap();
        drop(a);
        assert_eq!(b.read_frame::<Msg>().await.unwrap(), Some(Msg::A { n: 7 }));
        assert_eq!(b.read_frame::<Msg>().await.unwrap(), None);
    }

    #[test]
    fn tells_version_skew_from_corruption() {
        let skew = decode::<Msg>(br#"{"B":{}}"#).unwrap_err();
        assert!(
            matches!(skew, ProtocolError::UnexpectedMessage { .. }),
            "{skew}"
        );
        let corrupt = decode::<Msg>(b"\x00\x01garbage").unwrap_err();
        assert!(
            matches!(corrupt, ProtocolError::Corrupt { .. }),
            "{corrupt}"
        );
    }

    #[tokio::test]
    async fn oversized_frame_is_refused() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = Connection::new(b);
        a.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let err = b.read_frame::<Msg>().await.unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooBig { .. }), "{err}");
    }
}
