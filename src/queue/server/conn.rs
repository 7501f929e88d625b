//! The feeder server's side of each connection: accepting, the
//! handshake, then frames both ways between the consumer and the core.
//!
//! Each connection gets its own task. It does the handshake, then only
//! decodes and encodes frames: it forwards the consumer's frames to the
//! core as [`Event`]s over one bounded channel shared by all connections,
//! and writes what the core sends it over its own unbounded channel
//! (bounded in practice by the credits the consumer granted), batching
//! every frame waiting into one write.

use super::super::peer_warnings::PeerWarnings;
use super::core::Event;
use super::HEARTBEAT_MISSES;
use crate::error_text::error_chain;
use crate::protocol::queue::{
    proof, random_hex, verify, ToConsumer, ToFeeder, FEATURE_EXTEND, FEATURE_SETTLED,
};
use crate::protocol::{FrameReader, FrameWriter, ProtocolError, PROTOCOL_VERSION};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Frames a connection writes at once (one flush).
const OUT_BATCH: usize = 512;
/// Random bytes in a nonce.
const NONCE_BYTES: usize = 16;
/// Pause of the accept loop after an accept error (out of descriptors...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection closed by the server waits for the consumer to
/// close its side too (what it sends meanwhile is ignored).
const LINGER: Duration = Duration::from_millis(500);
/// Bound on writing a refusal to a peer that failed the handshake.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest consumer name kept for the log.
const MAX_NAME_LEN: usize = 200;

/// Connection settings, copied into every connection task.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    /// Heartbeat interval.
    pub(super) heartbeat: Duration,
    /// Time allowed for the Hello.
    pub(super) hello_timeout: Duration,
    /// Lease time, told in the Welcome.
    pub(super) lease: Duration,
    /// The feeder keeps its jobs on disk: consumers that ask are sent
    /// [`ToConsumer::Settled`].
    pub(super) durable: bool,
    /// The feeder keeps a joblog: consumers are asked for the
    /// [`OutcomeMeta`] of their outcomes.
    pub(super) joblog: bool,
}

/// The listening side, driven by the core's loop.
pub(super) struct Acceptor {
    /// Where consumers connect.
    pub(super) listener: TcpListener,
    /// The per-run secret.
    pub(super) secret: Arc<str>,
    /// Copied into each connection task.
    pub(super) tuning: Tuning,
    /// Cloned into each connection task.
    pub(super) event_tx: mpsc::Sender<Event>,
    /// Runs the connection tasks.
    pub(super) tracker: TaskTracker,
    /// Parent of every connection's token.
    pub(super) cancel: CancellationToken,
    /// Cancelled when the core ends: handshakes in progress stop.
    pub(super) handshakes: CancellationToken,
    /// Where connection tasks report a refused or closed connection.
    pub(super) warnings: PeerWarnings,
    /// The number of the next connection.
    pub(super) next_conn: u64,
    /// No accept before this (after an accept error).
    pub(super) paused_until: Option<Instant>,
}

impl Acceptor {
    /// Starts the task of an accepted connection, or pauses accepting
    /// after an error.
    pub(super) fn accepted(
        &mut self,
        result: std::io::Result<(TcpStream, SocketAddr)>,
        now: Instant,
    ) {
        match result {
            Ok((stream, peer)) => {
                let id = self.next_conn;
                self.next_conn += 1;
                debug!(conn = id, %peer, "connection accepted");
                let link = Link {
                    secret: self.secret.clone(),
                    tuning: self.tuning,
                    event_tx: self.event_tx.clone(),
                    cancel: self.cancel.child_token(),
                    handshakes: self.handshakes.clone(),
                    warnings: self.warnings.clone(),
                };
                self.tracker.spawn(connection(id, stream, peer, link));
            }
            Err(err) => {
                warn!(cause = %err, "accept failed");
                self.paused_until = Some(now + ACCEPT_BACKOFF);
            }
        }
    }

    /// Accepting is not paused.
    pub(super) fn ready(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|until| now >= until)
    }
}

/// The consumer's frames.
type Reader = FrameReader<OwnedReadHalf, ToFeeder>;
/// Frames to the consumer.
type Writer = FrameWriter<OwnedWriteHalf, ToConsumer>;

/// What a failed write says in the log: the I/O error's own text.
fn write_cause(err: &ProtocolError) -> String {
    match err {
        ProtocolError::Io(err) => err.to_string(),
        ProtocolError::Encode(err) => err.to_string(),
        ProtocolError::FrameTooBig { .. } => "frame too big".into(),
        other => other.to_string(),
    }
}

/// Why a handshake failed.
#[derive(Debug)]
struct Refusal {
    /// For the log and, if `tell`, for the peer.
    reason: String,
    /// Whether to send [`ToConsumer::Refused`] (not when the peer left).
    tell: bool,
}

impl Refusal {
    fn tell(reason: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            tell: true,
        }
    }
}

/// Why a joined consumer's connection ended.
#[derive(Debug)]
enum Leave {
    /// The consumer closed the stream.
    Eof,
    /// The consumer said Bye.
    Bye,
    /// A bad frame or a read error.
    Protocol(ProtocolError),
    /// A frame that has no place after the handshake.
    Violation(&'static str),
    /// Nothing heard for too long.
    Silent,
    /// A write failed or took too long.
    Write(String),
    /// The core closed the channel (the server ends).
    Closed,
    /// The server is stopping.
    Stopping,
}

/// What a connection task gets from the server besides its stream.
struct Link {
    /// The per-run secret.
    secret: Arc<str>,
    tuning: Tuning,
    /// To the core.
    event_tx: mpsc::Sender<Event>,
    /// Stops the task (end of the server).
    cancel: CancellationToken,
    /// Stops the handshake (the core no longer takes consumers).
    handshakes: CancellationToken,
    /// The rate-limited log of refused and closed connections.
    warnings: PeerWarnings,
}

/// One consumer's connection: handshake, then frames both ways.
#[tracing::instrument(name = "consumer", skip_all, fields(conn = id, peer = %peer))]
async fn connection(id: u64, stream: TcpStream, peer: SocketAddr, link: Link) {
    let Link {
        secret,
        tuning,
        event_tx,
        cancel,
        handshakes,
        warnings,
    } = link;
    // Small frames both ways: do not let Nagle hold them.
    let _ = stream.set_nodelay(true);
    let (read_half, write_half) = stream.into_split();
    let mut reader = Reader::new(read_half);
    let mut writer = Writer::new(write_half);

    let handshake = tokio::select! {
        _ = handshakes.cancelled() => return,
        result = handshake(&mut reader, &mut writer, &secret, tuning) => result,
    };
    let (name, settles) = match handshake {
        Ok(joined) => joined,
        Err(refusal) => {
            warnings.refused(id, peer, &refusal.reason).await;
            if refusal.tell {
                let refused = ToConsumer::Refused {
                    reason: refusal.reason,
                };
                let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
                    writer.send(refused).await?;
                    writer.close().await
                })
                .await;
            }
            return;
        }
    };

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let joined = Event::Joined {
        conn: id,
        name,
        peer,
        settles,
        out_tx,
    };
    if event_tx.send(joined).await.is_err() {
        return;
    }
    let leave = session(
        id,
        &mut reader,
        &mut writer,
        out_rx,
        &event_tx,
        &cancel,
        tuning.heartbeat,
    )
    .await;
    // Clean ends are not warnings (nor counted by the warnings' limit).
    let closed_for = match leave {
        Leave::Eof => {
            info!(%peer, "consumer closed the connection");
            None
        }
        Leave::Bye => {
            info!(%peer, "consumer left");
            None
        }
        Leave::Closed | Leave::Stopping => {
            debug!(%peer, "consumer connection closed");
            None
        }
        Leave::Protocol(err) => Some(format!("bad frame or read error: {}", error_chain(&err))),
        Leave::Violation(what) => Some(what.to_string()),
        Leave::Silent => Some(format!(
            "heartbeat timeout ({:?})",
            tuning.heartbeat * HEARTBEAT_MISSES
        )),
        Leave::Write(cause) => Some(format!("write failed: {cause}")),
    };
    if let Some(reason) = closed_for {
        warnings.closed(id, peer, &reason).await;
    }
    let _ = event_tx.send(Event::Left { conn: id }).await;
}

/// Challenge, Hello, Welcome: the consumer's name, or why not.
async fn handshake(
    reader: &mut Reader,
    writer: &mut Writer,
    secret: &str,
    tuning: Tuning,
) -> Result<(String, bool), Refusal> {
    let nonce = random_hex(NONCE_BYTES).map_err(|err| Refusal {
        reason: format!("no randomness for a nonce: {err}"),
        tell: false,
    })?;
    let challenge = ToConsumer::Challenge {
        version: PROTOCOL_VERSION,
        nonce: nonce.clone(),
    };
    match tokio::time::timeout(tuning.hello_timeout, writer.send(challenge)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            return Err(Refusal {
                reason: format!("cannot send the challenge: {}", write_cause(&err)),
                tell: false,
            })
        }
        Err(_) => {
            return Err(Refusal {
                reason: "cannot send the challenge in time".into(),
                tell: false,
            })
        }
    }
    let hello = match tokio::time::timeout(tuning.hello_timeout, reader.read()).await {
        Err(_) => {
            return Err(Refusal::tell(format!(
                "no hello within {:?}",
                tuning.hello_timeout
            )))
        }
        Ok(Ok(None)) => {
            return Err(Refusal {
                reason: "connection closed before the hello".into(),
                tell: false,
            })
        }
        Ok(Err(err)) => return Err(Refusal::tell(error_chain(&err))),
        Ok(Ok(Some(hello))) => hello,
    };
    match hello {
        ToFeeder::Hello {
            version,
            name,
            proof: their_proof,
            nonce: their_nonce,
            features,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Refusal::tell(
                    ProtocolError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }
                    .to_string(),
                ));
            }
            if !verify(secret, &nonce, &their_proof) {
                return Err(Refusal::tell("authentication failed"));
            }
            let settles = tuning.durable && features.iter().any(|f| f == FEATURE_SETTLED);
            let extends = features.iter().any(|f| f == FEATURE_EXTEND);
            let welcome = ToConsumer::Welcome {
                proof: proof(secret, &their_nonce),
                lease: tuning.lease,
                settles,
                extends,
                meta: tuning.joblog,
            };
            match tokio::time::timeout(tuning.hello_timeout, writer.send(welcome)).await {
                Ok(Ok(())) => Ok((truncate(name, MAX_NAME_LEN), settles)),
                _ => Err(Refusal {
                    reason: "cannot send the welcome".into(),
                    tell: false,
                }),
            }
        }
        _ => Err(Refusal::tell("expected a hello")),
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Frames both ways until the consumer or the server ends the link.
async fn session(
    id: u64,
    reader: &mut Reader,
    writer: &mut Writer,
    mut out_rx: mpsc::UnboundedReceiver<ToConsumer>,
    event_tx: &mpsc::Sender<Event>,
    cancel: &CancellationToken,
    heartbeat: Duration,
) -> Leave {
    let write_timeout = heartbeat * HEARTBEAT_MISSES;
    let mut ticks = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeat checks since the last frame from the consumer.
    let mut quiet: u32 = 0;
    // Set once the core is gone: only our queued frames are left to write.
    let mut core_gone = false;
    let mut outbox = Vec::with_capacity(OUT_BATCH);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Leave::Stopping,
            n = out_rx.recv_many(&mut outbox, OUT_BATCH) => {
                if n == 0 {
                    let _ = tokio::time::timeout(write_timeout, writer.close()).await;
                    // Let the consumer read the last frames (Drain) and
                    // leave: closing with its frames unread would reset the
                    // connection under its feet.
                    let _ = tokio::time::timeout(LINGER, async {
                        while let Ok(true) = reader.skip().await {}
                    })
                    .await;
                    return Leave::Closed;
                }
                let write = async {
                    for out in outbox.drain(..) {
                        writer.feed(out).await?;
                    }
                    writer.flush().await
                };
                match tokio::time::timeout(write_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return Leave::Write(write_cause(&err)),
                    Err(_) => return Leave::Write(format!("no progress for {write_timeout:?}")),
                }
            }
            frame = reader.read(), if !core_gone => {
                quiet = 0;
                match frame {
                    Ok(None) => return Leave::Eof,
                    Err(err) => return Leave::Protocol(err),
                    Ok(Some(ToFeeder::Heartbeat)) => {}
                    Ok(Some(ToFeeder::Bye)) => return Leave::Bye,
                    Ok(Some(ToFeeder::Hello { .. })) => return Leave::Violation("hello after the handshake"),
                    Ok(Some(frame)) => {
                        if event_tx.send(Event::Frame { conn: id, frame }).await.is_err() {
                            // The core has finished: write what it queued
                            // for us (its Drain), then close and linger,
                            // as when our queue closes.
                            core_gone = true;
                        }
                    }
                }
            }
            _ = ticks.tick() => {
                quiet += 1;
                if quiet > HEARTBEAT_MISSES {
                    return Leave::Silent;
                }
                let beat = writer.send(ToConsumer::Heartbeat);
                match tokio::time::timeout(write_timeout, beat).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return Leave::Write(write_cause(&err)),
                    Err(_) => return Leave::Write(format!("no progress for {write_timeout:?}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ms, settings, Client, Harness, SECRET, WAIT};
    use super::*;
    use crate::protocol::{Connection, MAX_FRAME_LEN};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn auth_ok() {
        let harness = Harness::start([], false, settings(), |s| s).await;
        let mut conn = Client::raw(harness.addr).await;
        let nonce = Client::challenge(&mut conn).await;
        conn.write_frame(&Client::hello(SECRET, &nonce))
            .await
            .unwrap();
        match conn.read_frame::<ToConsumer>().await.unwrap() {
            Some(ToConsumer::Welcome {
                proof: p, lease, ..
            }) => {
                assert_eq!(p, proof(SECRET, "c0ffee"));
                assert_eq!(lease, settings().lease);
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
        let (report, _) = harness.stop().await;
        assert!(!report.finished);
    }

    async fn refused(mut conn: Connection<TcpStream>) -> String {
        let reason = match tokio::time::timeout(WAIT, conn.read_frame::<ToConsumer>())
            .await
            .expect("an answer in time")
        {
            Ok(Some(ToConsumer::Refused { reason })) => reason,
            Ok(Some(ToConsumer::Job { .. })) => panic!("a job for an outsider"),
            other => panic!("expected a refusal, got {other:?}"),
        };
        Client { conn }.closed().await;
        reason
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_and_never_gets_a_job() {
        let harness = Harness::simple(0..10).await;
        let mut conn = Client::raw(harness.addr).await;
        let nonce = Client::challenge(&mut conn).await;
        conn.write_frame(&Client::hello("guess", &nonce))
            .await
            .unwrap();
        // Pipelined credit: must not count.
        let _ = conn.write_frame(&ToFeeder::Credit { n: 5 }).await;
        assert_eq!(refused(conn).await, "authentication failed");
        // A proof over another nonce (replay) fails too.
        let mut conn = Client::raw(harness.addr).await;
        let _ = Client::challenge(&mut conn).await;
        conn.write_frame(&Client::hello(SECRET, "old-nonce"))
            .await
            .unwrap();
        assert_eq!(refused(conn).await, "authentication failed");
        let (report, log) = harness.stop().await;
        assert_eq!(report.progress.consumers, 0);
        assert_eq!(log.nexts, 0, "no job was even pulled");
    }

    #[tokio::test]
    async fn no_hello_in_time_is_refused() {
        let harness = Harness::start(0..10, true, settings(), |s| s.hello_timeout(ms(200))).await;
        let mut conn = Client::raw(harness.addr).await;
        let _ = Client::challenge(&mut conn).await;
        let started = Instant::now();
        let reason = refused(conn).await;
        assert!(reason.contains("no hello"), "{reason}");
        assert!(started.elapsed() >= ms(150));
        harness.stop().await;
    }

    #[tokio::test]
    async fn other_version_or_other_first_frame_is_refused() {
        let harness = Harness::simple(0..10).await;
        let mut conn = Client::raw(harness.addr).await;
        let nonce = Client::challenge(&mut conn).await;
        conn.write_frame(&ToFeeder::Hello {
            version: PROTOCOL_VERSION + 1,
            name: "future".into(),
            proof: proof(SECRET, &nonce),
            nonce: "ab".into(),
            features: Vec::new(),
        })
        .await
        .unwrap();
        assert!(refused(conn).await.contains("version"));

        let mut conn = Client::raw(harness.addr).await;
        let _ = Client::challenge(&mut conn).await;
        conn.write_frame(&ToFeeder::Credit { n: 1 }).await.unwrap();
        assert_eq!(refused(conn).await, "expected a hello");
        harness.stop().await;
    }

    async fn bad_frame_closes_only_that_connection(bytes: Vec<u8>) {
        let harness = Harness::simple([1, 2]).await;
        let mut a = Client::connect(harness.addr).await;
        a.send(ToFeeder::Credit { n: 1 }).await;
        let held = a.job().await;
        let mut b = Client::connect(harness.addr).await;
        b.send(ToFeeder::Credit { n: 1 }).await;
        let other = b.job().await;
        let mut stream = a.conn.into_inner();
        stream.write_all(&bytes).await.unwrap();
        Client {
            conn: Connection::new(stream),
        }
        .closed()
        .await;
        // A's job comes back to B, which is still served.
        b.send(ToFeeder::Credit { n: 1 }).await;
        let again = b.job().await;
        assert_eq!((again.id, again.attempt), (held.id, 2));
        b.ack(other.lease).await;
        b.ack(again.lease).await;
        let (report, mut log) = harness.report().await;
        assert!(report.finished);
        log.successes.sort_unstable();
        assert_eq!(log.successes, [1, 2]);
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[tokio::test]
    async fn a_corrupt_frame_closes_only_that_connection() {
        bad_frame_closes_only_that_connection(frame(b"\x00\x01garbage")).await;
    }

    #[tokio::test]
    async fn an_unknown_message_closes_only_that_connection() {
        bad_frame_closes_only_that_connection(frame(br#"{"type":"launch"}"#)).await;
    }

    #[tokio::test]
    async fn an_oversized_frame_closes_only_that_connection() {
        let prefix = (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
        bad_frame_closes_only_that_connection(prefix).await;
    }

    #[tokio::test]
    async fn a_second_hello_closes_the_connection() {
        let hello = serde_json::to_vec(&Client::hello(SECRET, "x")).unwrap();
        bad_frame_closes_only_that_connection(frame(&hello)).await;
    }

    #[tokio::test]
    async fn a_silent_consumer_is_dropped_and_its_job_redelivered() {
        let harness = Harness::start([6], true, settings(), |s| s.heartbeat(ms(100))).await;
        let mut a = Client::connect(harness.addr).await;
        a.send(ToFeeder::Credit { n: 1 }).await;
        let first = a.job().await;
        // A says nothing from now on; B answers heartbeats while it waits.
        let mut b = Client::connect(harness.addr).await;
        b.send(ToFeeder::Credit { n: 1 }).await;
        let again = b.job().await;
        assert_eq!((again.id, again.attempt), (first.id, 2));
        b.ack(again.lease).await;
        let (report, _) = harness.report().await;
        assert!(report.finished);
        a.closed().await;
    }
}
