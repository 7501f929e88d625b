//! The consumer's connection to the feeder: connecting, the handshake,
//! reading frames and the task that writes them.

use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::error;

use super::{ConsumerError, HANDSHAKE_TIMEOUT};
use crate::protocol::queue::{
    proof, random_hex, verify, ToConsumer, ToFeeder, FEATURE_EXTEND, FEATURE_SETTLED,
};
use crate::protocol::{FrameReader, FrameWriter, ProtocolError, PROTOCOL_VERSION};

/// A failed connection attempt.
pub(super) enum Attempt {
    /// Try again later (unreachable, closed, timed out, garbage).
    Transient(String),
    /// Give up: see [`ConsumerError`].
    Fatal(ConsumerError),
}

/// Frames read from the job source: a feeder over TCP, or an in-process
/// source (the JetStream bridge) that speaks the same frames.
pub(super) enum FeederRx {
    /// A feeder's connection.
    Tcp(FrameReader<OwnedReadHalf, ToConsumer>),
    /// An in-process source; a closed channel is a closed connection.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Local(mpsc::UnboundedReceiver<ToConsumer>),
}

impl FeederRx {
    /// The next frame, `None` at the end (cancel safe).
    pub(super) async fn read(&mut self) -> Result<Option<ToConsumer>, ProtocolError> {
        match self {
            FeederRx::Tcp(reader) => reader.read().await,
            FeederRx::Local(frames) => Ok(frames.recv().await),
        }
    }
}

/// Frames written to the job source.
pub(super) enum FeederTx {
    /// A feeder's connection.
    Tcp(FrameWriter<OwnedWriteHalf, ToFeeder>),
    /// An in-process source, and its task: once the frames end, the
    /// writer waits for it to finish (its last outcomes sent).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Local(mpsc::UnboundedSender<ToFeeder>, tokio::task::JoinHandle<()>),
}

impl FeederTx {
    async fn send(&mut self, frame: ToFeeder) -> Result<(), ProtocolError> {
        match self {
            FeederTx::Tcp(writer) => writer.send(frame).await,
            FeederTx::Local(frames, _) => frames.send(frame).map_err(|_| closed()),
        }
    }
}

/// What a closed in-process source reads as.
fn closed() -> ProtocolError {
    ProtocolError::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the job source closed",
    ))
}

/// A connection past the handshake.
pub(super) struct Link {
    /// The read half, polled by the session loop.
    pub(super) feeder_rx: FeederRx,
    /// The write half, owned by the writer task.
    pub(super) feeder_tx: FeederTx,
    /// The feeder's lease time (zero: none).
    pub(super) lease: Duration,
    /// The feeder confirms durable outcomes ([`ToConsumer::Settled`]).
    pub(super) settles: bool,
    /// The feeder takes [`ToFeeder::Extend`].
    pub(super) extends: bool,
    /// The feeder keeps a joblog: outcomes carry their [`OutcomeMeta`].
    pub(super) meta: bool,
}

/// One frame read, classified.
pub(super) enum Read {
    /// A frame we know.
    Frame(ToConsumer),
    /// A frame of a newer feeder: skipped.
    Unknown(ProtocolError),
    /// The feeder closed the connection.
    Closed,
    /// The link is unusable.
    Broken(ProtocolError),
}

pub(super) fn classify(read: Result<Option<ToConsumer>, ProtocolError>) -> Read {
    match read {
        Ok(Some(frame)) => Read::Frame(frame),
        Ok(None) => Read::Closed,
        Err(err @ ProtocolError::UnexpectedMessage { .. }) => Read::Unknown(err),
        Err(err) => Read::Broken(err),
    }
}

/// Connects and runs the handshake.
pub(super) async fn connect(feeder: &str, secret: &str, name: &str) -> Result<Link, Attempt> {
    let connecting = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(feeder));
    let connected = connecting
        .await
        .map_err(|_| Attempt::Transient(format!("no connection within {HANDSHAKE_TIMEOUT:?}")))?;
    let stream = connected.map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidInput {
            Attempt::Fatal(ConsumerError::Address {
                feeder: feeder.to_string(),
                source,
            })
        } else {
            Attempt::Transient(format!("cannot connect: {source}"))
        }
    })?;
    // Small frames (outcomes, credits) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (read_half, write_half) = stream.into_split();
    let mut feeder_rx = FeederRx::Tcp(FrameReader::new(read_half));
    let mut feeder_tx = FeederTx::Tcp(FrameWriter::new(write_half));
    let (lease, settles, extends, meta) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut feeder_rx, &mut feeder_tx, feeder, secret, name),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Attempt::Transient(format!(
            "no handshake within {HANDSHAKE_TIMEOUT:?}"
        )))
    })?;
    Ok(Link {
        feeder_rx,
        feeder_tx,
        lease,
        settles,
        extends,
        meta,
    })
}

/// Challenge, Hello, Welcome; returns the lease time, whether the feeder
/// settles and whether it takes Extend.
pub(super) async fn handshake(
    feeder_rx: &mut FeederRx,
    feeder_tx: &mut FeederTx,
    feeder: &str,
    secret: &str,
    name: &str,
) -> Result<(Duration, bool, bool, bool), Attempt> {
    let refused = |reason: String| {
        Attempt::Fatal(ConsumerError::Refused {
            feeder: feeder.to_string(),
            reason,
        })
    };
    let nonce = match read_handshake_frame(feeder_rx).await? {
        ToConsumer::Challenge { version, nonce } => {
            if version != PROTOCOL_VERSION {
                return Err(Attempt::Fatal(ConsumerError::VersionMismatch {
                    feeder: feeder.to_string(),
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                }));
            }
            nonce
        }
        ToConsumer::Refused { reason } => return Err(refused(reason)),
        other => {
            return Err(Attempt::Transient(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    let our_nonce = random_hex(16).map_err(|err| Attempt::Fatal(ConsumerError::Nonce(err)))?;
    let hello = ToFeeder::Hello {
        version: PROTOCOL_VERSION,
        name: name.to_string(),
        proof: proof(secret, &nonce),
        nonce: our_nonce.clone(),
        features: vec![FEATURE_SETTLED.to_owned(), FEATURE_EXTEND.to_owned()],
    };
    feeder_tx.send(hello).await.map_err(|err| match err {
        ProtocolError::Io(err) => Attempt::Transient(format!("cannot send hello: {err}")),
        err => Attempt::Transient(err.to_string()),
    })?;
    match read_handshake_frame(feeder_rx).await? {
        ToConsumer::Welcome {
            proof,
            lease,
            settles,
            extends,
            meta,
        } => {
            if verify(secret, &our_nonce, &proof) {
                Ok((lease, settles, extends, meta))
            } else {
                error!("the feeder failed to prove the queue secret: closing");
                Err(Attempt::Fatal(ConsumerError::Impostor {
                    feeder: feeder.to_string(),
                }))
            }
        }
        ToConsumer::Refused { reason } => Err(refused(reason)),
        other => Err(Attempt::Transient(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

pub(super) async fn read_handshake_frame(feeder_rx: &mut FeederRx) -> Result<ToConsumer, Attempt> {
    match classify(feeder_rx.read().await) {
        Read::Frame(frame) => Ok(frame),
        Read::Closed => Err(Attempt::Transient(
            "the feeder closed the connection during the handshake".into(),
        )),
        Read::Unknown(err) | Read::Broken(err) => {
            Err(Attempt::Transient(format!("handshake failed: {err}")))
        }
    }
}

/// Writes queued frames until the queue closes, feeding all that are ready
/// and flushing once; then shuts the write half down.
pub(super) async fn write_frames(
    feeder_tx: FeederTx,
    mut frames_rx: mpsc::UnboundedReceiver<ToFeeder>,
) -> Result<(), ProtocolError> {
    let mut feeder_tx = match feeder_tx {
        FeederTx::Tcp(writer) => writer,
        FeederTx::Local(source, task) => {
            while let Some(frame) = frames_rx.recv().await {
                source.send(frame).map_err(|_| closed())?;
            }
            drop(source);
            // The source ends with our frames: wait until it has acted
            // on the last ones.
            return task.await.map_err(|err| {
                ProtocolError::Io(std::io::Error::other(format!(
                    "the job source failed: {err}"
                )))
            });
        }
    };
    while let Some(first) = frames_rx.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            feeder_tx.feed(frame).await?;
            next = frames_rx.try_recv().ok();
        }
        feeder_tx.flush().await?;
    }
    feeder_tx.close().await
}
