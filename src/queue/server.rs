//! The feeder server of queue groups: serves a [`Feeder`]'s jobs to
//! consumers over TCP ([`crate::protocol::queue`]).
//!
//! ```no_run
//! use taskherd::protocol::slave::QueueSettings;
//! use taskherd::queue::server::FeederServer;
//! use taskherd::queue::{Feeder, Next};
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//!
//! struct Numbers(u32);
//! impl Feeder for Numbers {
//!     type Job = u32;
//!     fn next(&mut self) -> Next<u32> {
//!         if self.0 == 0 { return Next::Done; }
//!         self.0 -= 1;
//!         Next::Job(self.0)
//!     }
//!     fn success(&mut self, _job: u32) {}
//!     fn error(&mut self, job: u32, reason: &str) { eprintln!("job {job} failed: {reason}"); }
//! }
//!
//! # async fn demo(secret: String) -> Result<(), Box<dyn std::error::Error>> {
//! let settings = QueueSettings {
//!     lease: Duration::from_secs(30),
//!     max_attempts: 5,
//!     retry: Default::default(),
//!     rate: None,
//!     progress_every: Duration::from_secs(10),
//!     joblog: None,
//! };
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let report = FeederServer::new(Numbers(1000), secret, settings)
//!     .run(listener, CancellationToken::new())
//!     .await?;
//! assert!(report.finished);
//! # Ok(()) }
//! ```
//!
//! # The wire, as this server plays it (for consumer clients)
//!
//! 1. **Handshake.** On accept the server sends
//!    [`ToConsumer::Challenge`]`{version, nonce}`. The consumer must answer
//!    [`ToFeeder::Hello`] within [`HELLO_TIMEOUT`] (10 s), with the same
//!    `version` and `proof = `[`proof`]`(secret, nonce)`. Anything else (a
//!    bad proof, another version, another frame, a malformed frame, no
//!    answer in time) gets [`ToConsumer::Refused`]`{reason}` and the link
//!    closes. Otherwise the server answers [`ToConsumer::Welcome`]`{proof:
//!    proof(secret, consumer_nonce), lease}`. Frames the consumer sends
//!    right after its Hello (credits) are kept, not lost.
//! 2. **Credits (explicit).** The consumer grants credits with
//!    [`ToFeeder::Credit`]`{n}`; each [`ToConsumer::Job`] uses one. The
//!    server never sends more jobs than the credits granted minus the jobs
//!    delivered. **An outcome (Ack, Retry, Dead, Release) does not give a
//!    credit back**: a consumer that wants another job after finishing one
//!    sends `Credit{1}` (best in the same write as the outcome). A consumer
//!    with prefetch `p` sends `Credit{p}` after the Welcome, then
//!    `Credit{1}` after each outcome. Unused credit is capped at
//!    [`MAX_CREDIT`]. (This rule replaces the sentence "An outcome frame
//!    gives the credit back" of the protocol module's overview.)
//! 3. **Leases.** Each Job carries a fresh `lease` (unique for the life of
//!    the server), the job `id` (assigned by the server, stable across
//!    attempts) and `attempt` (1 on the first delivery). The lease lasts
//!    [`QueueSettings::lease`] from the delivery and ends with one outcome
//!    naming it:
//!    - [`ToFeeder::Ack`]: done; [`Feeder::success`] is called.
//!    - [`ToFeeder::Retry`]`{delay, reason}`: a failed attempt. If the job
//!      had fewer than `max_attempts` attempts and the retry policy
//!      ([`RetryPolicy::next`], which honours the requested delay within
//!      its limits) allows it, it runs again after the delay; otherwise it
//!      is dead-lettered with this `reason` ([`Feeder::error`]).
//!    - [`ToFeeder::Dead`]`{reason}`: dead-lettered at once with `reason`.
//!    - [`ToFeeder::Release`]: handed back untouched: it goes to the front
//!      of the queue and the attempt is not counted.
//!
//!    A consumer that listed [`FEATURE_EXTEND`] in its Hello is told in
//!    the Welcome (`extends: true`) that it may send
//!    [`ToFeeder::Extend`]`{lease}`: the lease then lasts
//!    [`QueueSettings::lease`] from now (a lease not held by that consumer
//!    is left alone).
//!
//!    An outcome for a lease that is unknown, expired, already settled or
//!    held by another consumer is answered [`ToConsumer::Stale`]`{lease}`
//!    and changes nothing (the job may already be done elsewhere: it is
//!    never counted twice).
//! 4. **Lost leases.** A lease that expires, and every lease of a consumer
//!    that goes away (end of stream, error, malformed frame, heartbeat
//!    timeout, or Bye while still holding jobs), is lost: that counts as a
//!    failed attempt, and the job goes back to the front of the queue at
//!    once (dead-lettered instead once it had `max_attempts` attempts).
//! 5. **Heartbeats.** The server sends [`ToConsumer::Heartbeat`] every
//!    [`HEARTBEAT_INTERVAL`] (1 s). A consumer from which no frame at all
//!    came for [`HEARTBEAT_MISSES`] (3) intervals (the check runs at each
//!    interval, so between 3 and 4 s) is dropped. Consumers should send
//!    [`ToFeeder::Heartbeat`] every second.
//! 6. **Governor.** [`ToFeeder::SlowDown`] and
//!    [`ToFeeder::Pause`]`{duration}` act on the global rate governor
//!    ([`super::governor`]).
//! 7. **Errors.** A malformed frame (not JSON, an unknown message, a frame
//!    above [`MAX_FRAME_LEN`], a second Hello) closes that connection only:
//!    its leases are lost (rule 4). Every refused or closed connection
//!    (failed handshake, malformed frame, heartbeat timeout, failed write)
//!    is one warning naming the peer's address and the reason, at most 10
//!    per 10 s; the others of the window are summed up in one line when it
//!    ends. A Bye or an end of stream is an info line, not counted.
//! 8. **End.** When the server stops (shutdown) or is finished (the feeder
//!    said [`Next::Done`] and every job has a final outcome) it sends
//!    [`ToConsumer::Drain`] to every consumer. Consumers then finish or
//!    [`ToFeeder::Release`] what they hold, and say [`ToFeeder::Bye`]. The
//!    server ends once nothing is leased any more (or after at most
//!    `min(lease, 10 s)` at shutdown): it closes its side of every
//!    connection and waits up to half a second for the consumer to close
//!    its own. A consumer must take end of stream after Drain as a normal
//!    end; outcomes that come after the server ended are not recorded.
//!
//! 9. **Durable feeders.** With a feeder that keeps its jobs on disk
//!    ([`Feeder::synced`] is `Some`), a Job frame is sent only once the
//!    delivery (its attempt) is durable, and its lease starts then. A
//!    consumer that listed [`FEATURE_SETTLED`] in its Hello (`features`)
//!    is told so in the Welcome (`settles: true`) and gets
//!    [`ToConsumer::Settled`]`{leases}` once the Ack or Dead outcomes of
//!    those leases are durable: those jobs never run again. Other
//!    consumers get no Settled frame.
//!
//! # How it works
//!
//! One task, the *queue core* (the future of [`FeederServer::run`]
//! itself), owns the [`Feeder`] and all state: ready jobs, delayed jobs
//! (retry backoff), leases with their expiry, per-consumer credits, the
//! attempts of every job, the counts, and the [`Governor`]. It also accepts
//! connections. Each connection gets its own task that does the handshake,
//! then only decodes and encodes frames: it forwards the consumer's frames
//! to the core over one bounded channel shared by all connections, and
//! writes what the core sends it over its own unbounded channel (bounded in
//! practice by the credits the consumer granted), batching every frame
//! waiting into one write.
//!
//! The core sleeps until a frame arrives, a connection is accepted, or the
//! earliest of: a lease expiry, a delayed job becoming ready, a governor
//! token, the feeder's recheck time, the next progress report, the end of
//! the drain. Jobs are pulled from the feeder one at a time, only when a
//! consumer has credit and nothing is ready, so at most one job is ever
//! buffered beyond those leased, delayed or handed back.
//!
//! Leases are kept in a `BTreeMap` by number, with an expiry index (a
//! `BTreeSet` of `(expires, lease)`) beside it: a lease extended by its
//! consumer ([`ToFeeder::Extend`]) expires after leases delivered later.

use super::governor::Governor;
use super::joblog::{Joblog, JoblogError, JoblogLine, JoblogOutcome, JOBLOG_CLOSE_TIMEOUT};
use super::peer_warnings::PeerWarnings;
use super::{Feeder, Next};
use crate::error_text::{count, error_chain};
use crate::protocol::queue::OutcomeMeta;
use crate::protocol::queue::{
    proof, random_hex, verify, ToConsumer, ToFeeder, FEATURE_EXTEND, FEATURE_SETTLED,
};
use crate::protocol::slave::{QueueProgress, QueueSettings};
use crate::protocol::{self, ProtocolError, MAX_FRAME_LEN, PROTOCOL_VERSION};
use crate::retry::{Decision, RetryPolicy};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::{Encoder, FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How often the server sends a heartbeat to each consumer, and checks that
/// the consumer sent something.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Heartbeat intervals without any frame after which a consumer is
/// dropped.
pub const HEARTBEAT_MISSES: u32 = 3;

/// How long a new connection has to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait for outcomes at shutdown (the lease time, if shorter,
/// is used instead).
pub const MAX_DRAIN: Duration = Duration::from_secs(10);

/// Most unused credit a consumer can hold; grants beyond it are cut.
pub const MAX_CREDIT: u32 = 1 << 16;

/// Frames from all connections waiting for the core.
const EVENT_QUEUE: usize = 4096;
/// Frames the core takes from its queue at once.
const EVENT_BATCH: usize = 512;
/// Frames a connection writes at once (one flush).
const OUT_BATCH: usize = 512;
/// Random bytes in a nonce.
const NONCE_BYTES: usize = 16;
/// Pause of the accept loop after an accept error (out of descriptors...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Time given to connection tasks to write their last frames at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a connection closed by the server waits for the consumer to
/// close its side too (what it sends meanwhile is ignored).
const LINGER: Duration = Duration::from_millis(500);
/// Bound on writing a refusal to a peer that failed the handshake.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Room in a frame for everything of a job frame except its payload.
const JOB_FRAME_OVERHEAD: usize = 128;
/// Longest consumer name kept for the log.
const MAX_NAME_LEN: usize = 200;
/// Bound on sending the last progress report.
const FINAL_PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the wait for a durable feeder's last sync at the end.
const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that keep the feeder server from running.
///
/// Errors of one connection never end the server: they are logged and
/// that connection is closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// An empty secret would let anyone in.
    #[error("the per-run secret is empty")]
    EmptySecret,
    /// The queue settings cannot work.
    #[error("invalid queue settings: {reason}")]
    InvalidSettings {
        /// What is wrong.
        reason: String,
    },
    /// The joblog ([`QueueSettings::joblog`]) cannot be opened.
    #[error("cannot keep the joblog")]
    Joblog(#[source] JoblogError),
}

/// How the server ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeReport {
    /// The feeder said [`Next::Done`] and every job it gave has a final
    /// outcome (success or error): nothing is left to do.
    pub finished: bool,
    /// The final counts (the same as the last progress report).
    pub progress: QueueProgress,
    /// Jobs taken from the feeder that got no final outcome (in flight at
    /// the end, waiting, or waiting for a retry): not done. A durable
    /// feeder serves them again on its next run.
    pub unfinished: u64,
}

/// A feeder server, configured; [`run`](FeederServer::run) serves.
///
/// The defaults follow the protocol: heartbeat every
/// [`HEARTBEAT_INTERVAL`], Hello within [`HELLO_TIMEOUT`], no progress
/// reports.
pub struct FeederServer<F: Feeder> {
    /// Where the jobs come from and their outcomes go.
    feeder: F,
    /// The per-run secret consumers prove they know.
    secret: String,
    /// Lease, attempts, retry policy, rate, progress interval.
    settings: QueueSettings,
    /// Where progress reports go, if anywhere.
    progress_tx: Option<mpsc::Sender<QueueProgress>>,
    /// Heartbeat interval (tests shorten it).
    heartbeat: Duration,
    /// Time allowed for the Hello (tests shorten it).
    hello_timeout: Duration,
}

impl<F: Feeder> std::fmt::Debug for FeederServer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeederServer")
            .field("settings", &self.settings)
            .field("heartbeat", &self.heartbeat)
            .field("hello_timeout", &self.hello_timeout)
            .finish_non_exhaustive()
    }
}

/// Serves `feeder`'s jobs on `listener` until it is finished or
/// `shutdown` is cancelled: the short form of [`FeederServer`].
///
/// # Errors
/// See [`FeederServer::run`].
pub async fn serve<F: Feeder>(
    listener: TcpListener,
    feeder: F,
    secret: String,
    settings: QueueSettings,
    progress_tx: Option<mpsc::Sender<QueueProgress>>,
    shutdown: CancellationToken,
) -> Result<ServeReport, ServerError> {
    let mut server = FeederServer::new(feeder, secret, settings);
    if let Some(progress_tx) = progress_tx {
        server = server.progress(progress_tx);
    }
    server.run(listener, shutdown).await
}

impl<F: Feeder> FeederServer<F> {
    /// A server for `feeder`, admitting consumers that know `secret`.
    pub fn new(feeder: F, secret: impl Into<String>, settings: QueueSettings) -> Self {
        FeederServer {
            feeder,
            secret: secret.into(),
            settings,
            progress_tx: None,
            heartbeat: HEARTBEAT_INTERVAL,
            hello_timeout: HELLO_TIMEOUT,
        }
    }

    /// Sends a [`QueueProgress`] every
    /// [`progress_every`](QueueSettings::progress_every) (zero: never) and
    /// once at the end. A report the receiver has no room for is skipped.
    pub fn progress(mut self, progress_tx: mpsc::Sender<QueueProgress>) -> Self {
        self.progress_tx = Some(progress_tx);
        self
    }

    /// Another heartbeat interval (the timeout stays [`HEARTBEAT_MISSES`]
    /// intervals). Consumers expect the default; this is for tests.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self
    }

    /// Another bound on the wait for the Hello.
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// Serves until the feeder is finished (see [`ServeReport::finished`])
    /// or `shutdown` is cancelled, then drains (see the module docs) and
    /// returns the final counts.
    ///
    /// A `max_attempts` of 0 is read as 1.
    ///
    /// # Errors
    /// [`ServerError::EmptySecret`], and [`ServerError::InvalidSettings`]
    /// for a zero lease or a rate that is not a positive number. Nothing
    /// that happens once serving can fail the server.
    ///
    /// # Panics
    /// Only if the feeder panics (its panic is not caught).
    ///
    /// # Cancel safety
    /// Dropping the future stops the server without draining: outcomes in
    /// flight are lost, connection tasks are cancelled. Cancel `shutdown`
    /// instead.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<ServeReport, ServerError> {
        if self.secret.is_empty() {
            return Err(ServerError::EmptySecret);
        }
        if self.settings.lease.is_zero() {
            return Err(ServerError::InvalidSettings {
                reason: "the lease time is zero".into(),
            });
        }
        if let Some(rate) = self.settings.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ServerError::InvalidSettings {
                    reason: format!(
                        "the rate ({rate}) is not a positive number of jobs per second"
                    ),
                });
            }
        }
        let joblog = match &self.settings.joblog {
            Some(path) => Some(Joblog::open(path).map_err(ServerError::Joblog)?),
            None => None,
        };
        let local = listener.local_addr().ok();
        debug!(address = ?local, "feeder server listening");
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let tracker = TaskTracker::new();
        let conns_cancel = CancellationToken::new();
        let handshakes = conns_cancel.child_token();
        // Whatever happens (even a feeder panic), connection tasks stop.
        let _stop_conns = conns_cancel.clone().drop_guard();
        let tuning = Tuning {
            heartbeat: self.heartbeat,
            hello_timeout: self.hello_timeout,
            lease: self.settings.lease,
            durable: self.feeder.synced().is_some(),
            joblog: joblog.is_some(),
        };
        let acceptor = Acceptor {
            listener,
            secret: Arc::from(self.secret.as_str()),
            tuning,
            event_tx,
            tracker: tracker.clone(),
            cancel: conns_cancel.clone(),
            handshakes: handshakes.clone(),
            warnings: PeerWarnings::spawn(&tracker),
            next_conn: 1,
            paused_until: None,
        };
        let now = Instant::now();
        let mut core = Core::new(self.feeder, self.settings, self.progress_tx, now);
        core.joblog = joblog;
        let report = core.run(acceptor, event_rx, shutdown).await;
        // Connections still in their handshake will never join.
        handshakes.cancel();

        // The core dropped every consumer's channel: connection tasks write
        // what is left (Drain) and close. Give them a moment, then cancel.
        tracker.close();
        if tokio::time::timeout(CLOSE_GRACE, tracker.wait())
            .await
            .is_err()
        {
            conns_cancel.cancel();
            let _ = tokio::time::timeout(CLOSE_GRACE, tracker.wait()).await;
        }
        info!(
            finished = report.finished,
            done = report.progress.done,
            dead = report.progress.dead,
            unfinished = report.unfinished,
            "feeder server stopped"
        );
        Ok(report)
    }
}

/// Connection settings, copied into every connection task.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    heartbeat: Duration,
    hello_timeout: Duration,
    lease: Duration,
    /// The feeder keeps its jobs on disk: consumers that ask are sent
    /// [`ToConsumer::Settled`].
    durable: bool,
    /// The feeder keeps a joblog: consumers are asked for the
    /// [`OutcomeMeta`] of their outcomes.
    joblog: bool,
}

/// The listening side, driven by the core's loop.
struct Acceptor {
    listener: TcpListener,
    secret: Arc<str>,
    tuning: Tuning,
    /// Cloned into each connection task.
    event_tx: mpsc::Sender<Event>,
    tracker: TaskTracker,
    /// Parent of every connection's token.
    cancel: CancellationToken,
    /// Cancelled when the core ends: handshakes in progress stop.
    handshakes: CancellationToken,
    /// Where connection tasks report a refused or closed connection.
    warnings: PeerWarnings,
    next_conn: u64,
    /// No accept before this (after an accept error).
    paused_until: Option<Instant>,
}

impl Acceptor {
    fn accepted(&mut self, result: std::io::Result<(TcpStream, SocketAddr)>, now: Instant) {
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

    fn ready(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|until| now >= until)
    }
}

// ---------------------------------------------------------------------------
// Connection tasks
// ---------------------------------------------------------------------------

/// What the core tells a connection task to write.
#[derive(Debug)]
enum Out {
    /// Any frame, encoded with serde.
    Frame(ToConsumer),
    /// A [`ToConsumer::Job`], with its payload already encoded (once per
    /// job, not once per delivery).
    Job {
        lease: u64,
        id: u64,
        attempt: u32,
        payload: Bytes,
    },
}

/// Writes [`Out`] as length-delimited JSON frames, straight into the
/// write buffer (the same wire format as [`protocol::codec`]).
#[derive(Debug, Default)]
struct OutCodec;

impl Encoder<Out> for OutCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let start = dst.len();
        dst.put_u32(0);
        match &item {
            Out::Frame(frame) => serde_json::to_writer(dst.writer(), frame)
                .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?,
            Out::Job {
                lease,
                id,
                attempt,
                payload,
            } => {
                use std::fmt::Write as _;
                dst.reserve(payload.len() + JOB_FRAME_OVERHEAD);
                write!(
                    dst,
                    r#"{{"type":"job","lease":{lease},"id":{id},"attempt":{attempt},"payload":"#
                )
                .map_err(|_| std::io::Error::other("cannot format a job frame"))?;
                dst.extend_from_slice(payload);
                dst.put_u8(b'}');
            }
        }
        let len = dst.len() - start - 4;
        let Ok(len32) = u32::try_from(len) else {
            dst.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame too big",
            ));
        };
        if len > MAX_FRAME_LEN {
            dst.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame too big",
            ));
        }
        dst[start..start + 4].copy_from_slice(&len32.to_be_bytes());
        Ok(())
    }
}

type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
type Writer = FramedWrite<OwnedWriteHalf, OutCodec>;

/// Frames from connection tasks to the core.
#[derive(Debug)]
enum Event {
    /// A consumer passed the handshake.
    Joined {
        conn: u64,
        name: String,
        peer: SocketAddr,
        /// It is sent [`ToConsumer::Settled`].
        settles: bool,
        out_tx: mpsc::UnboundedSender<Out>,
    },
    /// A frame from a joined consumer (never Hello, Heartbeat or Bye).
    Frame { conn: u64, frame: ToFeeder },
    /// A joined consumer is gone; its leases are lost.
    Left { conn: u64 },
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

/// Maps a read error of the codec, as [`protocol::Connection`] does.
fn read_error(err: std::io::Error) -> ProtocolError {
    if err.kind() == std::io::ErrorKind::InvalidData {
        ProtocolError::FrameTooBig {
            limit: MAX_FRAME_LEN,
        }
    } else {
        ProtocolError::Io(err)
    }
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
    let mut reader = FramedRead::new(read_half, protocol::codec());
    let mut writer = FramedWrite::new(write_half, OutCodec);

    let handshake = tokio::select! {
        _ = handshakes.cancelled() => return,
        result = handshake(&mut reader, &mut writer, &secret, tuning) => result,
    };
    let (name, settles) = match handshake {
        Ok(joined) => joined,
        Err(refusal) => {
            warnings.refused(id, peer, &refusal.reason).await;
            if refusal.tell {
                let refused = Out::Frame(ToConsumer::Refused {
                    reason: refusal.reason,
                });
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
    let challenge = Out::Frame(ToConsumer::Challenge {
        version: PROTOCOL_VERSION,
        nonce: nonce.clone(),
    });
    match tokio::time::timeout(tuning.hello_timeout, writer.send(challenge)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            return Err(Refusal {
                reason: format!("cannot send the challenge: {err}"),
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
    let body = match tokio::time::timeout(tuning.hello_timeout, reader.next()).await {
        Err(_) => {
            return Err(Refusal::tell(format!(
                "no hello within {:?}",
                tuning.hello_timeout
            )))
        }
        Ok(None) => {
            return Err(Refusal {
                reason: "connection closed before the hello".into(),
                tell: false,
            })
        }
        Ok(Some(Err(err))) => return Err(Refusal::tell(error_chain(&read_error(err)))),
        Ok(Some(Ok(body))) => body,
    };
    match protocol::decode::<ToFeeder>(&body) {
        Ok(ToFeeder::Hello {
            version,
            name,
            proof: their_proof,
            nonce: their_nonce,
            features,
        }) => {
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
            let welcome = Out::Frame(ToConsumer::Welcome {
                proof: proof(secret, &their_nonce),
                lease: tuning.lease,
                settles,
                extends,
                meta: tuning.joblog,
            });
            match tokio::time::timeout(tuning.hello_timeout, writer.send(welcome)).await {
                Ok(Ok(())) => Ok((truncate(name, MAX_NAME_LEN), settles)),
                _ => Err(Refusal {
                    reason: "cannot send the welcome".into(),
                    tell: false,
                }),
            }
        }
        Ok(_) => Err(Refusal::tell("expected a hello")),
        Err(err) => Err(Refusal::tell(error_chain(&err))),
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
    mut out_rx: mpsc::UnboundedReceiver<Out>,
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
                        while let Some(Ok(_)) = reader.next().await {}
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
                    Ok(Err(err)) => return Leave::Write(err.to_string()),
                    Err(_) => return Leave::Write(format!("no progress for {write_timeout:?}")),
                }
            }
            frame = reader.next(), if !core_gone => {
                quiet = 0;
                let body = match frame {
                    None => return Leave::Eof,
                    Some(Err(err)) => return Leave::Protocol(read_error(err)),
                    Some(Ok(body)) => body,
                };
                match protocol::decode::<ToFeeder>(&body) {
                    Err(err) => return Leave::Protocol(err),
                    Ok(ToFeeder::Heartbeat) => {}
                    Ok(ToFeeder::Bye) => return Leave::Bye,
                    Ok(ToFeeder::Hello { .. }) => return Leave::Violation("hello after the handshake"),
                    Ok(frame) => {
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
                let beat = writer.send(Out::Frame(ToConsumer::Heartbeat));
                match tokio::time::timeout(write_timeout, beat).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return Leave::Write(err.to_string()),
                    Err(_) => return Leave::Write(format!("no progress for {write_timeout:?}")),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The queue core
// ---------------------------------------------------------------------------

/// A job taken from the feeder, until its final outcome.
struct JobEntry<J> {
    /// Handed back to the feeder with the final outcome.
    job: J,
    /// The job as JSON, encoded once.
    payload: Bytes,
    /// Deliveries so far, released ones not counted.
    attempts: u32,
    /// Start of the first attempt, for [`RetryPolicy::next`].
    first_attempt_at: Option<SystemTime>,
    /// The consumer of its last delivery, for the joblog line of a lost
    /// lease (kept only with a joblog).
    holder: Option<Arc<str>>,
}

/// A job leased to a consumer.
#[derive(Debug, Clone, Copy)]
struct Lease {
    job: u64,
    conn: u64,
    expires: Instant,
}

/// The leases out, by number, with an index of their expiry: leases last
/// the same time, but an extended one ([`ToFeeder::Extend`]) ends after
/// leases numbered after it.
#[derive(Debug, Default)]
struct Leases {
    /// Leases by number.
    by_number: BTreeMap<u64, Lease>,
    /// Every lease of `by_number` as `(expires, number)`: the expiry order.
    expiry: BTreeSet<(Instant, u64)>,
}

impl Leases {
    fn get(&self, number: &u64) -> Option<&Lease> {
        self.by_number.get(number)
    }

    fn len(&self) -> usize {
        self.by_number.len()
    }

    fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Lease)> {
        self.by_number.iter()
    }

    /// Records a lease (replacing one of the same number).
    fn insert(&mut self, number: u64, lease: Lease) {
        if let Some(old) = self.by_number.insert(number, lease) {
            self.expiry.remove(&(old.expires, number));
        }
        self.expiry.insert((lease.expires, number));
    }

    /// Forgets a lease.
    fn remove(&mut self, number: u64) -> Option<Lease> {
        let lease = self.by_number.remove(&number)?;
        self.expiry.remove(&(lease.expires, number));
        Some(lease)
    }

    /// Moves the end of a lease (if it is still out).
    fn set_expiry(&mut self, number: u64, expires: Instant) {
        if let Some(lease) = self.by_number.get_mut(&number) {
            self.expiry.remove(&(lease.expires, number));
            lease.expires = expires;
            self.expiry.insert((expires, number));
        }
    }

    /// When the first lease ends.
    fn first_expiry(&self) -> Option<Instant> {
        self.expiry.first().map(|(expires, _)| *expires)
    }

    /// Removes and returns a lease that ended by `now`, the earliest first.
    fn pop_expired(&mut self, now: Instant) -> Option<(u64, Lease)> {
        let &(expires, number) = self.expiry.first()?;
        if expires > now {
            return None;
        }
        self.expiry.pop_first();
        self.by_number.remove(&number).map(|lease| (number, lease))
    }
}

/// Marks a held frame made since the last commit.
const UNSEALED: u64 = u64::MAX;

/// The lease of a job held back until its delivery is durable, until it
/// is sent (then it gets the real lease time).
const HELD_LEASE: Duration = Duration::from_secs(86_400 * 365);

/// A frame held back until the commit it depends on is durable.
struct Held {
    /// The commit number (or [`UNSEALED`]).
    seq: u64,
    /// For this consumer.
    conn: u64,
    out: Out,
}

/// Waits for a durable feeder's next sync (never, for other feeders).
async fn wait_synced(
    synced_rx: &mut Option<watch::Receiver<u64>>,
) -> Result<(), watch::error::RecvError> {
    match synced_rx {
        Some(synced_rx) => synced_rx.changed().await,
        None => std::future::pending().await,
    }
}

/// A joined consumer.
struct Consumer {
    /// `group/id@host`, from its Hello.
    name: Arc<str>,
    peer: SocketAddr,
    out_tx: mpsc::UnboundedSender<Out>,
    /// Jobs it may still be sent.
    credit: u32,
    /// Leases it holds.
    held: u32,
    /// Whether it is in the round-robin queue of consumers with credit.
    queued: bool,
    /// Whether it is sent [`ToConsumer::Settled`].
    settles: bool,
}

/// What the feeder said last.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// Ask it.
    Open,
    /// Nothing for now: ask again at this time, or when a credit comes.
    Empty { recheck_at: Instant },
    /// Nothing ever again.
    Done,
}

/// A small PRNG for retry jitter (xorshift64*).
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let mut bytes = [0u8; 8];
        let seed = if getrandom::fill(&mut bytes).is_ok() {
            u64::from_le_bytes(bytes)
        } else {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        };
        Rng(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// The counts behind [`QueueProgress`].
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    done: u64,
    failed: u64,
    retried: u64,
    dead: u64,
}

/// The queue core: owns the feeder and every piece of state.
struct Core<F: Feeder> {
    feeder: F,
    lease_time: Duration,
    max_attempts: u32,
    retry: RetryPolicy,
    progress_every: Option<Duration>,
    progress_tx: Option<mpsc::Sender<QueueProgress>>,

    /// Every job taken from the feeder without a final outcome yet; each
    /// is in exactly one of `ready`, `delayed`, `leases`.
    jobs: HashMap<u64, JobEntry<F::Job>>,
    /// Jobs to deliver, in order.
    ready: VecDeque<u64>,
    /// Jobs waiting for a retry, by time.
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Leases by number, with their expiry order.
    leases: Leases,
    consumers: HashMap<u64, Consumer>,
    /// Consumers with credit, in delivery order (round robin); stale
    /// entries are skipped.
    credited: VecDeque<u64>,
    governor: Governor,
    /// When the governor allows the next delivery, if it held one back.
    governor_wake: Option<Instant>,
    source: Source,
    /// The feeder said Empty or Done since it last gave a job ("queue
    /// empty" is logged when this turns true).
    empty: bool,
    next_job: u64,
    next_lease: u64,
    rng: Rng,
    counts: Counts,

    /// Where each attempt's outcome is written, if anywhere.
    joblog: Option<Joblog>,

    /// A durable feeder's sync progress (`None`: changes are final at
    /// once, frames go out as they are made).
    synced_rx: Option<watch::Receiver<u64>>,
    /// The highest commit number known durable.
    synced: u64,
    /// Frames waiting for the sync of the commit they depend on, in order;
    /// those made since the last commit have `seq == UNSEALED`.
    held: VecDeque<Held>,
    /// Leases settled since the last commit, by consumer: confirmed
    /// ([`ToConsumer::Settled`]) once durable.
    settled: HashMap<u64, Vec<u64>>,

    /// Deliveries stopped; waiting for outcomes until `drain_deadline`.
    draining: bool,
    drain_deadline: Option<Instant>,
    next_progress: Option<Instant>,
    last_report_at: Instant,
    done_at_last_report: u64,
}

impl<F: Feeder> Core<F> {
    fn new(
        mut feeder: F,
        settings: QueueSettings,
        progress_tx: Option<mpsc::Sender<QueueProgress>>,
        now: Instant,
    ) -> Self {
        let progress_every = Some(settings.progress_every).filter(|every| !every.is_zero());
        let synced_rx = feeder.synced();
        // Changes made before serving (a durable feeder's open) count as
        // committed already.
        let _ = feeder.commit();
        Core {
            feeder,
            lease_time: settings.lease,
            max_attempts: settings.max_attempts.max(1),
            retry: settings.retry,
            progress_every,
            next_progress: match (&progress_tx, progress_every) {
                (Some(_), Some(every)) => Some(after(now, every)),
                _ => None,
            },
            progress_tx,
            jobs: HashMap::new(),
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            leases: Leases::default(),
            consumers: HashMap::new(),
            credited: VecDeque::new(),
            governor: Governor::new(settings.rate, now.into_std()),
            governor_wake: None,
            source: Source::Open,
            empty: false,
            next_job: 1,
            next_lease: 1,
            rng: Rng::seeded(),
            counts: Counts::default(),
            joblog: None,
            synced_rx,
            synced: 0,
            held: VecDeque::new(),
            settled: HashMap::new(),
            draining: false,
            drain_deadline: None,
            last_report_at: now,
            done_at_last_report: 0,
        }
    }

    async fn run(
        mut self,
        mut acceptor: Acceptor,
        mut event_rx: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> ServeReport {
        let mut events = Vec::with_capacity(EVENT_BATCH);
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            let now = Instant::now();
            self.tick(now);
            if !self.draining {
                if shutdown.is_cancelled() {
                    self.start_drain(now, "shutdown");
                } else {
                    self.pump(now);
                    if self.finished() {
                        self.start_drain(now, "finished");
                    }
                }
            }
            self.flush();
            if self.draining && (self.leases.is_empty() || self.drain_over(now)) {
                break;
            }
            let wake = self.next_wake(now, &acceptor);
            if armed != Some(wake) {
                sleep.as_mut().reset(wake);
                armed = Some(wake);
            }
            let accepting = !self.draining && acceptor.ready(now);
            let holding = !self.held.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !self.draining => {}
                changed = wait_synced(&mut self.synced_rx), if holding => {
                    if changed.is_err() {
                        // The feeder's writer is gone: nothing more becomes
                        // durable. Hold on; the drain deadline ends it.
                        self.synced_rx = None;
                        warn!("the feeder's journal writer stopped: frames held back are dropped");
                        self.held.clear();
                    }
                }
                accepted = acceptor.listener.accept(), if accepting => {
                    acceptor.accepted(accepted, Instant::now());
                }
                _ = event_rx.recv_many(&mut events, EVENT_BATCH) => {
                    let now = Instant::now();
                    self.expire(now);
                    for event in events.drain(..) {
                        self.handle(event, now);
                    }
                }
                _ = &mut sleep => {
                    armed = None;
                }
            }
        }

        // Outcomes already read from the sockets count too.
        let now = Instant::now();
        for _ in 0..EVENT_QUEUE {
            match event_rx.try_recv() {
                Ok(event) => self.handle(event, now),
                Err(_) => break,
            }
        }
        drop(event_rx);
        // Make the last outcomes durable (and confirm them) before leaving.
        self.flush();
        let _ = tokio::time::timeout(FINAL_SYNC_TIMEOUT, async {
            while !self.held.is_empty() && self.synced_rx.is_some() {
                if wait_synced(&mut self.synced_rx).await.is_err() {
                    break;
                }
                self.release_held();
            }
        })
        .await;
        let progress = self.snapshot(now);
        if let Some(progress_tx) = &self.progress_tx {
            let _ = tokio::time::timeout(FINAL_PROGRESS_TIMEOUT, progress_tx.send(progress)).await;
        }
        if !self.leases.is_empty() {
            warn!(
                in_flight = self.leases.len(),
                "stopping with jobs still leased: they count as not done"
            );
        }
        if let Some(joblog) = self.joblog.take() {
            let closing = tokio::task::spawn_blocking(move || joblog.close());
            if tokio::time::timeout(JOBLOG_CLOSE_TIMEOUT, closing)
                .await
                .is_err()
            {
                warn!("the joblog's last lines were not written in time");
            }
        }
        ServeReport {
            finished: self.finished(),
            progress,
            unfinished: self.jobs.len() as u64,
        }
        // Dropping `self` drops every consumer's channel: their tasks write
        // what is queued (Drain) and close.
    }

    fn finished(&self) -> bool {
        self.source == Source::Done && self.jobs.is_empty()
    }

    fn drain_over(&self, now: Instant) -> bool {
        self.drain_deadline.is_some_and(|deadline| now >= deadline)
    }

    /// The earliest time the core has something to do without a frame.
    fn next_wake(&self, now: Instant, acceptor: &Acceptor) -> Instant {
        let mut wake = after(now, Duration::from_secs(3600));
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = wake.min(at);
            }
        };
        consider(self.leases.first_expiry());
        consider(self.next_progress);
        consider(acceptor.paused_until.filter(|until| *until > now));
        if self.draining {
            consider(self.drain_deadline);
        } else {
            consider(self.delayed.peek().map(|Reverse((at, _))| *at));
            if !self.credited.is_empty() {
                consider(self.governor_wake);
                if let Source::Empty { recheck_at } = self.source {
                    consider(Some(recheck_at));
                }
            }
        }
        wake
    }

    /// Time-driven work: expiries, retries coming due, progress.
    fn tick(&mut self, now: Instant) {
        self.expire(now);
        while let Some(Reverse((at, job))) = self.delayed.peek().copied() {
            if at > now {
                break;
            }
            self.delayed.pop();
            self.ready.push_back(job);
        }
        if let Some(at) = self.next_progress {
            if now >= at {
                let progress = self.snapshot(now);
                if let Some(progress_tx) = &self.progress_tx {
                    if progress_tx.try_send(progress).is_err() {
                        debug!("progress report skipped: receiver full or gone");
                    }
                }
                self.next_progress = self.progress_every.map(|every| after(now, every));
            }
        }
    }

    /// Leases whose time is up: their jobs are lost.
    fn expire(&mut self, now: Instant) {
        while let Some((lease_id, lease)) = self.leases.pop_expired(now) {
            if let Some(consumer) = self.consumers.get_mut(&lease.conn) {
                consumer.held = consumer.held.saturating_sub(1);
            }
            debug!(lease = lease_id, job = lease.job, "lease expired");
            self.lost(lease.job, "lease expired");
        }
    }

    /// The current counts; resets the rate measurement.
    fn snapshot(&mut self, now: Instant) -> QueueProgress {
        let elapsed = now
            .saturating_duration_since(self.last_report_at)
            .as_secs_f64();
        let acks = self.counts.done - self.done_at_last_report;
        let rate = if elapsed > 0.0 {
            acks as f64 / elapsed
        } else {
            0.0
        };
        self.last_report_at = now;
        self.done_at_last_report = self.counts.done;
        let in_flight = self.leases.len() as u64;
        QueueProgress {
            done: self.counts.done,
            failed: self.counts.failed,
            retried: self.counts.retried,
            dead: self.counts.dead,
            in_flight,
            pending: (self.jobs.len() as u64).saturating_sub(in_flight),
            consumers: u32::try_from(self.consumers.len()).unwrap_or(u32::MAX),
            rate,
            empty: self.empty,
        }
    }

    fn start_drain(&mut self, now: Instant, why: &'static str) {
        self.draining = true;
        self.drain_deadline = Some(after(now, self.lease_time.min(MAX_DRAIN)));
        for consumer in self.consumers.values() {
            let _ = consumer.out_tx.send(Out::Frame(ToConsumer::Drain));
        }
        info!(
            why,
            in_flight = self.leases.len(),
            consumers = self.consumers.len(),
            "draining consumers"
        );
    }

    /// Delivers jobs while consumers have credit, jobs are there and the
    /// governor allows.
    fn pump(&mut self, now: Instant) {
        self.governor_wake = None;
        let mut first_attempt_at: Option<SystemTime> = None;
        while let Some(&conn) = self.credited.front() {
            let credit = self.consumers.get(&conn).map_or(0, |c| c.credit);
            if credit == 0 {
                self.credited.pop_front();
                if let Some(consumer) = self.consumers.get_mut(&conn) {
                    consumer.queued = false;
                }
                continue;
            }
            if self.ready.is_empty() && !self.pull(now) {
                break;
            }
            if let Err(at) = self.governor.acquire(now.into_std()) {
                self.governor_wake = Some(Instant::from_std(at));
                break;
            }
            let Some(job) = self.ready.pop_front() else {
                break;
            };
            self.deliver(conn, job, now, &mut first_attempt_at);
            self.credited.pop_front();
            if let Some(consumer) = self.consumers.get_mut(&conn) {
                if consumer.credit > 0 {
                    self.credited.push_back(conn);
                } else {
                    consumer.queued = false;
                }
            }
        }
    }

    /// Takes one job from the feeder into `ready`; `false` if it has none
    /// now.
    fn pull(&mut self, now: Instant) -> bool {
        loop {
            match self.source {
                Source::Done => return false,
                Source::Empty { recheck_at } if now < recheck_at => return false,
                _ => {}
            }
            match self.feeder.next() {
                Next::Job(job) => {
                    self.source = Source::Open;
                    self.empty = false;
                    let attempts = self.feeder.attempts(&job);
                    if attempts >= self.max_attempts {
                        // Its earlier deliveries never got an outcome (the
                        // feeder stopped or died each time).
                        warn!(
                            attempts,
                            "job out of attempts before this run: dead-lettered"
                        );
                        self.counts.dead += 1;
                        let reason = format!(
                            "{} (the limit) without an outcome: the feeder stopped during each",
                            count(attempts, "attempt")
                        );
                        let id = self.feeder.job_id(&job);
                        self.feeder.error(job, &reason);
                        if let Some(id) = id {
                            self.joblog_unsent(id, attempts, &reason);
                        }
                        continue;
                    }
                    match encode_payload(&job) {
                        Ok(payload) => {
                            let id = self.feeder.job_id(&job).unwrap_or_else(|| {
                                self.next_job += 1;
                                self.next_job - 1
                            });
                            self.jobs.insert(
                                id,
                                JobEntry {
                                    job,
                                    payload,
                                    attempts,
                                    first_attempt_at: None,
                                    holder: None,
                                },
                            );
                            self.ready.push_back(id);
                            return true;
                        }
                        Err(reason) => {
                            warn!(%reason, "job cannot be sent: dead-lettered");
                            self.counts.dead += 1;
                            let id = self.feeder.job_id(&job);
                            self.feeder.error(job, &reason);
                            if let Some(id) = id {
                                self.joblog_unsent(id, attempts, &reason);
                            }
                        }
                    }
                }
                Next::Empty => {
                    self.source = Source::Empty {
                        recheck_at: after(now, self.feeder.recheck()),
                    };
                    if !self.empty {
                        self.empty = true;
                        info!("queue empty");
                    }
                    return false;
                }
                Next::Done => {
                    self.source = Source::Done;
                    self.empty = true;
                    info!(outstanding = self.jobs.len(), "feeder has no more jobs");
                    return false;
                }
            }
        }
    }

    fn deliver(
        &mut self,
        conn: u64,
        job_id: u64,
        now: Instant,
        first_attempt_at: &mut Option<SystemTime>,
    ) {
        let (Some(entry), Some(consumer)) =
            (self.jobs.get_mut(&job_id), self.consumers.get_mut(&conn))
        else {
            // Invariant: callers pass a ready job and a consumer with credit.
            return;
        };
        entry.attempts = entry.attempts.saturating_add(1);
        if entry.first_attempt_at.is_none() {
            entry.first_attempt_at = Some(*first_attempt_at.get_or_insert_with(SystemTime::now));
        }
        let lease = self.next_lease;
        self.next_lease += 1;
        // A job held back until its attempt is durable starts its lease
        // when it is sent (see `release_held`): a slow disk never expires
        // a lease the consumer has not even seen. Held jobs are the newest
        // leases and are sent in order, so lease numbers stay in expiry
        // order.
        let expires = if self.synced_rx.is_some() {
            after(now, HELD_LEASE)
        } else {
            after(now, self.lease_time)
        };
        self.leases.insert(
            lease,
            Lease {
                job: job_id,
                conn,
                expires,
            },
        );
        consumer.credit -= 1;
        consumer.held += 1;
        if self.joblog.is_some() {
            entry.holder = Some(Arc::clone(&consumer.name));
        }
        self.feeder.attempt(&entry.job);
        let out = Out::Job {
            lease,
            id: job_id,
            attempt: entry.attempts,
            payload: entry.payload.clone(),
        };
        if self.synced_rx.is_some() {
            self.held.push_back(Held {
                seq: UNSEALED,
                conn,
                out,
            });
        } else {
            // A closed channel means a Left event is on its way: the lease
            // will be lost with the others.
            let _ = consumer.out_tx.send(out);
        }
    }

    /// Ends a turn: confirms the outcomes settled, commits the feeder's
    /// changes, and sends what is durable.
    fn flush(&mut self) {
        if self.synced_rx.is_none() {
            return;
        }
        for (conn, leases) in self.settled.drain() {
            self.held.push_back(Held {
                seq: UNSEALED,
                conn,
                out: Out::Frame(ToConsumer::Settled { leases }),
            });
        }
        let seq = self.feeder.commit();
        for held in self.held.iter_mut().rev() {
            if held.seq != UNSEALED {
                break;
            }
            held.seq = seq;
        }
        self.release_held();
    }

    /// Sends the held frames whose commit is durable.
    fn release_held(&mut self) {
        if let Some(synced_rx) = &self.synced_rx {
            self.synced = *synced_rx.borrow();
        }
        while let Some(held) = self.held.front() {
            if held.seq == UNSEALED || held.seq > self.synced {
                break;
            }
            let Some(held) = self.held.pop_front() else {
                break;
            };
            if let Out::Job { lease, .. } = &held.out {
                self.leases
                    .set_expiry(*lease, after(Instant::now(), self.lease_time));
            }
            if let Some(consumer) = self.consumers.get(&held.conn) {
                let _ = consumer.out_tx.send(held.out);
            }
        }
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Joined {
                conn,
                name,
                peer,
                settles,
                out_tx,
            } => {
                info!(conn, %peer, name = %name, "consumer joined");
                if self.draining {
                    let _ = out_tx.send(Out::Frame(ToConsumer::Drain));
                }
                self.consumers.insert(
                    conn,
                    Consumer {
                        name: name.into(),
                        peer,
                        out_tx,
                        credit: 0,
                        held: 0,
                        queued: false,
                        settles,
                    },
                );
            }
            Event::Left { conn } => self.remove_consumer(conn),
            Event::Frame { conn, frame } => self.frame(conn, frame, now),
        }
    }

    fn frame(&mut self, conn: u64, frame: ToFeeder, now: Instant) {
        match frame {
            ToFeeder::Credit { n } => self.credit(conn, n),
            ToFeeder::Ack { lease, meta } => {
                if let Some(job) = self.settle(conn, lease) {
                    self.confirm(conn, lease);
                    if let Some(entry) = self.jobs.remove(&job) {
                        self.counts.done += 1;
                        let attempt = entry.attempts;
                        self.feeder.success(entry.job);
                        self.joblog_outcome(conn, job, attempt, None, meta);
                    }
                }
            }
            ToFeeder::Retry {
                lease,
                delay,
                reason,
                meta,
            } => {
                if let Some(job) = self.settle(conn, lease) {
                    let attempt = self.jobs.get(&job).map_or(0, |entry| entry.attempts);
                    self.retry(job, delay, &reason, now);
                    self.joblog_outcome(conn, job, attempt, Some(&reason), meta);
                }
            }
            ToFeeder::Dead {
                lease,
                reason,
                meta,
            } => {
                if let Some(job) = self.settle(conn, lease) {
                    self.confirm(conn, lease);
                    self.counts.failed += 1;
                    let attempt = self.jobs.get(&job).map_or(0, |entry| entry.attempts);
                    self.bury(job, &reason, "the consumer said dead");
                    self.joblog_outcome(conn, job, attempt, Some(&reason), meta);
                }
            }
            ToFeeder::Release { lease } => {
                if let Some(job) = self.settle(conn, lease) {
                    if let Some(entry) = self.jobs.get_mut(&job) {
                        self.feeder.release(&entry.job);
                        entry.attempts = entry.attempts.saturating_sub(1);
                        if entry.attempts == 0 {
                            entry.first_attempt_at = None;
                        }
                        self.ready.push_front(job);
                    }
                }
            }
            ToFeeder::Extend { lease } => self.extend(conn, lease, now),
            ToFeeder::SlowDown => {
                if self.governor.slow_down(now.into_std()) {
                    info!(
                        conn,
                        rate = ?self.governor.rate(now.into_std()),
                        "a consumer asked to slow down: rate lowered"
                    );
                }
            }
            ToFeeder::Pause { duration } => {
                self.governor.pause(duration, now.into_std());
                info!(conn, ?duration, "a consumer asked for a pause");
            }
            // The connection task keeps these to itself.
            ToFeeder::Hello { .. } | ToFeeder::Bye | ToFeeder::Heartbeat => {}
        }
    }

    fn credit(&mut self, conn: u64, n: u32) {
        let Some(consumer) = self.consumers.get_mut(&conn) else {
            return;
        };
        consumer.credit = consumer.credit.saturating_add(n).min(MAX_CREDIT);
        if consumer.credit > 0 && !consumer.queued {
            consumer.queued = true;
            self.credited.push_back(conn);
        }
        if n > 0 && matches!(self.source, Source::Empty { .. }) {
            // New room: ask the feeder again now.
            self.source = Source::Open;
        }
    }

    /// `conn` is still working on its `lease`: the lease starts again. A
    /// lease that is not `conn`'s (expired, settled, another's) stays as
    /// it is; the outcome that follows will be called stale.
    fn extend(&mut self, conn: u64, lease: u64, now: Instant) {
        match self.leases.get(&lease) {
            Some(held) if held.conn == conn => {
                // A delivery still held back for its sync keeps its long
                // lease: it starts for real when sent.
                if held.expires < after(now, self.lease_time) {
                    self.leases.set_expiry(lease, after(now, self.lease_time));
                }
                debug!(conn, lease, "lease extended");
            }
            _ => debug!(conn, lease, "extend of a lease not held: ignored"),
        }
    }

    /// A final outcome of `conn`'s `lease`, to be confirmed once durable.
    fn confirm(&mut self, conn: u64, lease: u64) {
        if self.synced_rx.is_some() && self.consumers.get(&conn).is_some_and(|c| c.settles) {
            self.settled.entry(conn).or_default().push(lease);
        }
    }

    /// Ends `conn`'s lease `lease` and gives its job, or answers Stale.
    fn settle(&mut self, conn: u64, lease: u64) -> Option<u64> {
        let consumer = self.consumers.get_mut(&conn)?;
        match self.leases.get(&lease) {
            Some(held) if held.conn == conn => {
                let job = held.job;
                self.leases.remove(lease);
                consumer.held = consumer.held.saturating_sub(1);
                Some(job)
            }
            _ => {
                debug!(conn, lease, "stale outcome");
                let _ = consumer
                    .out_tx
                    .send(Out::Frame(ToConsumer::Stale { lease }));
                None
            }
        }
    }

    /// A failed attempt the consumer wants retried.
    fn retry(&mut self, job: u64, requested: Option<Duration>, reason: &str, now: Instant) {
        self.counts.failed += 1;
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        let attempts = entry.attempts;
        if attempts >= self.max_attempts {
            let why = format!("{} (the limit)", count(attempts, "attempt"));
            self.bury(job, reason, &why);
            return;
        }
        let wall = SystemTime::now();
        let first = entry.first_attempt_at.unwrap_or(wall);
        let random = self.rng.unit();
        let own = self.feeder.retry_policy(&entry.job, first);
        let policy = own.as_ref().unwrap_or(&self.retry);
        match policy.next(attempts, first, wall, requested, random) {
            decision @ Decision::RetryAt(_) => {
                let delay = decision.delay_from(wall).unwrap_or_default();
                self.counts.retried += 1;
                if delay.is_zero() {
                    self.ready.push_back(job);
                } else {
                    self.delayed.push(Reverse((after(now, delay), job)));
                }
            }
            Decision::GiveUp(why) => self.bury(job, reason, &why),
        }
    }

    /// A lease ended without an outcome: a failed attempt; the job goes
    /// back to the front of the queue, or is dead after `max_attempts`.
    fn lost(&mut self, job: u64, why: &str) {
        self.counts.failed += 1;
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        let (attempt, holder) = (entry.attempts, entry.holder.clone());
        let (outcome, reason) = if entry.attempts >= self.max_attempts {
            let reason = format!("{why} ({})", count(entry.attempts, "attempt"));
            self.bury(job, &reason, "attempt limit reached");
            (JoblogOutcome::Dead, reason)
        } else {
            self.counts.retried += 1;
            self.ready.push_front(job);
            (JoblogOutcome::Retry, why.to_string())
        };
        if let Some(joblog) = &mut self.joblog {
            joblog.write(&JoblogLine::new(
                job,
                attempt,
                outcome,
                Some(&reason),
                None,
                holder.as_deref(),
            ));
        }
    }

    /// The joblog line of `conn`'s outcome of attempt `attempt` of `job`:
    /// `done` without a `reason`; with one, `retry` while the job waits
    /// for another attempt, `dead` once it is gone.
    fn joblog_outcome(
        &mut self,
        conn: u64,
        job: u64,
        attempt: u32,
        reason: Option<&str>,
        meta: Option<OutcomeMeta>,
    ) {
        let Some(joblog) = &mut self.joblog else {
            return;
        };
        let outcome = match reason {
            None => JoblogOutcome::Done,
            Some(_) if self.jobs.contains_key(&job) => JoblogOutcome::Retry,
            Some(_) => JoblogOutcome::Dead,
        };
        let consumer = self.consumers.get(&conn).map(|c| &*c.name);
        joblog.write(&JoblogLine::new(
            job, attempt, outcome, reason, meta, consumer,
        ));
    }

    /// The joblog line of a job dead before any delivery (out of attempts
    /// before this run, or one that cannot be sent).
    fn joblog_unsent(&mut self, job: u64, attempt: u32, reason: &str) {
        if let Some(joblog) = &mut self.joblog {
            joblog.write(&JoblogLine::new(
                job,
                attempt,
                JoblogOutcome::Dead,
                Some(reason),
                None,
                None,
            ));
        }
    }

    /// Final failure: the feeder's error hook gets `reason`.
    fn bury(&mut self, job: u64, reason: &str, why: &str) {
        if let Some(entry) = self.jobs.remove(&job) {
            self.counts.dead += 1;
            debug!(job, reason, why, "job dead-lettered");
            self.feeder.error(entry.job, reason);
        }
    }

    fn remove_consumer(&mut self, conn: u64) {
        let Some(consumer) = self.consumers.remove(&conn) else {
            return;
        };
        info!(
            conn,
            peer = %consumer.peer,
            name = %consumer.name,
            held = consumer.held,
            "consumer gone"
        );
        if consumer.held == 0 {
            return;
        }
        let lost: Vec<(u64, u64)> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.conn == conn)
            .map(|(id, lease)| (*id, lease.job))
            .collect();
        // Pushed to the front in reverse so they keep their order.
        for (lease, job) in lost.into_iter().rev() {
            self.leases.remove(lease);
            self.lost(job, "consumer lost");
        }
    }
}

/// A job as the JSON of its frame's payload, or why it cannot be sent.
fn encode_payload<J: serde::Serialize>(job: &J) -> Result<Bytes, String> {
    let body = serde_json::to_vec(job).map_err(|err| format!("cannot encode the job: {err}"))?;
    if body.len() > MAX_FRAME_LEN - JOB_FRAME_OVERHEAD {
        return Err(format!(
            "job too big to send ({} bytes, limit {})",
            body.len(),
            MAX_FRAME_LEN - JOB_FRAME_OVERHEAD
        ));
    }
    Ok(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Connection;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    const SECRET: &str = "s3cret";
    /// Bound on every wait that should succeed.
    const WAIT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// What the feeder was told.
    #[derive(Debug, Default)]
    struct Log {
        successes: Vec<u32>,
        errors: Vec<(u32, String)>,
        nexts: u64,
    }

    /// Jobs from a shared queue; `Done` or `Empty` when it is empty.
    struct TestFeeder {
        queue: Arc<Mutex<VecDeque<u32>>>,
        done_when_empty: bool,
        recheck: Duration,
        log: Arc<Mutex<Log>>,
        /// Every job's own retry policy, if any.
        own_retry: Option<RetryPolicy>,
    }

    impl Feeder for TestFeeder {
        type Job = u32;

        fn next(&mut self) -> Next<u32> {
            self.log.lock().unwrap().nexts += 1;
            match self.queue.lock().unwrap().pop_front() {
                Some(job) => Next::Job(job),
                None if self.done_when_empty => Next::Done,
                None => Next::Empty,
            }
        }

        fn success(&mut self, job: u32) {
            self.log.lock().unwrap().successes.push(job);
        }

        fn error(&mut self, job: u32, reason: &str) {
            self.log
                .lock()
                .unwrap()
                .errors
                .push((job, reason.to_string()));
        }

        fn recheck(&self) -> Duration {
            self.recheck
        }

        fn retry_policy(&self, _job: &u32, _first: SystemTime) -> Option<RetryPolicy> {
            self.own_retry.clone()
        }
    }

    fn settings() -> QueueSettings {
        QueueSettings {
            lease: Duration::from_secs(30),
            max_attempts: 3,
            retry: RetryPolicy::exponential(ms(10), ms(50), 10).with_jitter(0.0),
            rate: None,
            progress_every: Duration::ZERO,
            joblog: None,
        }
    }

    struct Harness {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<Result<ServeReport, ServerError>>,
        log: Arc<Mutex<Log>>,
        queue: Arc<Mutex<VecDeque<u32>>>,
    }

    impl Harness {
        async fn start(
            jobs: impl IntoIterator<Item = u32>,
            done_when_empty: bool,
            settings: QueueSettings,
            configure: impl FnOnce(FeederServer<TestFeeder>) -> FeederServer<TestFeeder>,
        ) -> Harness {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let log = Arc::new(Mutex::new(Log::default()));
            let queue = Arc::new(Mutex::new(jobs.into_iter().collect::<VecDeque<_>>()));
            let feeder = TestFeeder {
                queue: queue.clone(),
                done_when_empty,
                recheck: ms(50),
                log: log.clone(),
                own_retry: None,
            };
            let shutdown = CancellationToken::new();
            let server = configure(FeederServer::new(feeder, SECRET, settings));
            let task = tokio::spawn(server.run(listener, shutdown.clone()));
            Harness {
                addr,
                shutdown,
                task,
                log,
                queue,
            }
        }

        async fn simple(jobs: impl IntoIterator<Item = u32>) -> Harness {
            Harness::start(jobs, true, settings(), |s| s).await
        }

        async fn report(self) -> (ServeReport, Log) {
            let report = tokio::time::timeout(WAIT, self.task)
                .await
                .expect("the server ends in time")
                .expect("the server does not panic")
                .expect("the server runs");
            let log = std::mem::take(&mut *self.log.lock().unwrap());
            (report, log)
        }

        async fn stop(self) -> (ServeReport, Log) {
            self.shutdown.cancel();
            self.report().await
        }
    }

    /// A consumer built on [`Connection`], one frame at a time.
    struct Client {
        conn: Connection<TcpStream>,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Job {
        lease: u64,
        id: u64,
        attempt: u32,
        payload: u32,
    }

    impl Client {
        async fn raw(addr: SocketAddr) -> Connection<TcpStream> {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            Connection::new(stream)
        }

        async fn challenge(conn: &mut Connection<TcpStream>) -> String {
            match tokio::time::timeout(WAIT, conn.read_frame::<ToConsumer>()).await {
                Ok(Ok(Some(ToConsumer::Challenge { version, nonce }))) => {
                    assert_eq!(version, PROTOCOL_VERSION);
                    nonce
                }
                other => panic!("expected a challenge, got {other:?}"),
            }
        }

        fn hello(secret: &str, nonce: &str) -> ToFeeder {
            ToFeeder::Hello {
                version: PROTOCOL_VERSION,
                name: "test/1@here".into(),
                proof: proof(secret, nonce),
                nonce: "c0ffee".into(),
                features: vec![FEATURE_SETTLED.into()],
            }
        }

        async fn connect(addr: SocketAddr) -> Client {
            let mut conn = Client::raw(addr).await;
            let nonce = Client::challenge(&mut conn).await;
            conn.write_frame(&Client::hello(SECRET, &nonce))
                .await
                .unwrap();
            let mut client = Client { conn };
            match client.recv().await {
                Some(ToConsumer::Welcome { proof: p, .. }) => {
                    assert!(verify(SECRET, "c0ffee", &p), "the server proves itself");
                }
                other => panic!("expected a welcome, got {other:?}"),
            }
            client
        }

        async fn send(&mut self, frame: ToFeeder) {
            self.conn.write_frame(&frame).await.unwrap();
        }

        /// The next frame other than a heartbeat (answered), within `wait`;
        /// `Ok(None)` at the end of the link.
        async fn recv_within(
            &mut self,
            wait: Duration,
        ) -> Result<Option<ToConsumer>, tokio::time::error::Elapsed> {
            let deadline = Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, self.conn.read_frame::<ToConsumer>())
                    .await?
                {
                    Ok(Some(ToConsumer::Heartbeat)) => {
                        let _ = self.conn.write_frame(&ToFeeder::Heartbeat).await;
                    }
                    Ok(frame) => return Ok(frame),
                    Err(_) => return Ok(None),
                }
            }
        }

        async fn recv(&mut self) -> Option<ToConsumer> {
            self.recv_within(WAIT).await.expect("a frame in time")
        }

        async fn job(&mut self) -> Job {
            match self.recv().await {
                Some(ToConsumer::Job {
                    lease,
                    id,
                    attempt,
                    payload,
                }) => Job {
                    lease,
                    id,
                    attempt,
                    payload: serde_json::from_value(payload).unwrap(),
                },
                other => panic!("expected a job, got {other:?}"),
            }
        }

        /// Nothing but heartbeats for `wait`.
        async fn quiet_for(&mut self, wait: Duration) {
            if let Ok(frame) = self.recv_within(wait).await {
                panic!("expected nothing, got {frame:?}");
            }
        }

        async fn ack(&mut self, lease: u64) {
            self.send(ToFeeder::Ack { lease, meta: None }).await;
            self.send(ToFeeder::Credit { n: 1 }).await;
        }

        /// Reads until the end of the link (the server closed it).
        async fn closed(self) {
            let mut stream = self.conn.into_inner();
            let mut buf = [0u8; 4096];
            let end = tokio::time::timeout(WAIT, async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(end.is_ok(), "the server closes the connection");
        }
    }

    /// A feeder that says its changes are durable only when the test
    /// says so, and counts the deliveries it was told of.
    struct DurableFeeder {
        jobs: VecDeque<u32>,
        /// Attempts each job had before (job -> attempts).
        before: HashMap<u32, u32>,
        log: Arc<Mutex<Log>>,
        /// Deliveries begun, in order.
        attempts: Arc<Mutex<Vec<u32>>>,
        committed: Arc<Mutex<u64>>,
        synced_rx: watch::Receiver<u64>,
    }

    impl Feeder for DurableFeeder {
        type Job = u32;

        fn next(&mut self) -> Next<u32> {
            self.jobs.pop_front().map_or(Next::Empty, Next::Job)
        }

        fn success(&mut self, job: u32) {
            self.log.lock().unwrap().successes.push(job);
        }

        fn error(&mut self, job: u32, reason: &str) {
            self.log.lock().unwrap().errors.push((job, reason.into()));
        }

        fn attempts(&self, job: &u32) -> u32 {
            self.before.get(job).copied().unwrap_or(0)
        }

        fn attempt(&mut self, job: &u32) {
            self.attempts.lock().unwrap().push(*job);
        }

        fn commit(&mut self) -> u64 {
            let mut committed = self.committed.lock().unwrap();
            *committed += 1;
            *committed
        }

        fn synced(&self) -> Option<watch::Receiver<u64>> {
            Some(self.synced_rx.clone())
        }
    }

    #[tokio::test]
    async fn a_durable_feeder_s_jobs_and_confirmations_wait_for_its_sync() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (synced_tx, synced_rx) = watch::channel(0);
        let committed = Arc::new(Mutex::new(0));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Log::default()));
        let feeder = DurableFeeder {
            jobs: [1, 2, 3].into(),
            before: HashMap::from([(3, 3)]),
            log: log.clone(),
            attempts: attempts.clone(),
            committed: committed.clone(),
            synced_rx,
        };
        let shutdown = CancellationToken::new();
        let mut settings = settings();
        settings.lease = ms(1000);
        let task = tokio::spawn(
            FeederServer::new(feeder, SECRET, settings).run(listener, shutdown.clone()),
        );
        let mut client = Client::connect(addr).await;
        client.send(ToFeeder::Credit { n: 2 }).await;
        // Delivered in memory, recorded, but not durable yet: nothing sent;
        // and a lease does not run while its job is held (a slow disk
        // would have the job lost and delivered again).
        client.quiet_for(ms(1500)).await;
        assert_eq!(*attempts.lock().unwrap(), [1, 2]);
        let sync_now = || synced_tx.send_replace(*committed.lock().unwrap());
        sync_now();
        let one = client.job().await;
        let two = client.job().await;
        assert_eq!((one.payload, two.payload), (1, 2));
        assert_eq!((one.attempt, two.attempt), (1, 1));
        // Job 3 already had its 3 attempts (the limit): dead at once,
        // never sent.
        client.ack(one.lease).await;
        client.quiet_for(ms(300)).await;
        sync_now();
        assert_eq!(
            client.recv().await,
            Some(ToConsumer::Settled {
                leases: vec![one.lease]
            })
        );
        shutdown.cancel();
        let task_report = tokio::spawn(async move {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("ends")
                .expect("no panic")
                .expect("runs")
        });
        // The consumer hands job 2 back at the drain.
        assert_eq!(client.recv().await, Some(ToConsumer::Drain));
        client.send(ToFeeder::Release { lease: two.lease }).await;
        client.send(ToFeeder::Bye).await;
        sync_now();
        let report = task_report.await.expect("report");
        assert_eq!(report.progress.done, 1);
        let log = log.lock().unwrap();
        assert_eq!(log.successes, [1]);
        assert_eq!(log.errors.len(), 1);
        assert_eq!(log.errors[0].0, 3);
        assert!(
            log.errors[0].1.contains("3 attempts"),
            "{}",
            log.errors[0].1
        );
    }

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

    #[tokio::test]
    async fn three_jobs_to_one_consumer_then_finished() {
        let harness = Harness::simple([10, 20, 30]).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 3 }).await;
        let mut jobs = Vec::new();
        for _ in 0..3 {
            jobs.push(client.job().await);
        }
        assert_eq!(
            jobs.iter().map(|j| j.payload).collect::<Vec<_>>(),
            [10, 20, 30]
        );
        assert!(jobs.iter().all(|j| j.attempt == 1));
        let leases: HashSet<_> = jobs.iter().map(|j| j.lease).collect();
        let ids: HashSet<_> = jobs.iter().map(|j| j.id).collect();
        assert_eq!((leases.len(), ids.len()), (3, 3));
        for job in &jobs {
            client.ack(job.lease).await;
        }
        assert_eq!(client.recv().await, Some(ToConsumer::Drain));
        let (report, log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.unfinished, 0);
        assert_eq!(report.progress.done, 3);
        assert_eq!(report.progress.in_flight, 0);
        assert_eq!(log.successes, [10, 20, 30]);
        assert!(log.errors.is_empty());
        client.closed().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_consumers_get_disjoint_jobs_each_done_once() {
        const JOBS: u32 = 400;
        let harness = Harness::simple(0..JOBS).await;
        let mut consumers = Vec::new();
        for _ in 0..4 {
            let addr = harness.addr;
            consumers.push(tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                client.send(ToFeeder::Credit { n: 4 }).await;
                let mut got = Vec::new();
                loop {
                    match client.recv().await {
                        Some(ToConsumer::Job {
                            lease,
                            id,
                            payload,
                            attempt,
                        }) => {
                            assert_eq!(attempt, 1);
                            got.push((id, serde_json::from_value::<u32>(payload).unwrap()));
                            client.ack(lease).await;
                        }
                        Some(ToConsumer::Drain) => {
                            client.send(ToFeeder::Bye).await;
                            break;
                        }
                        None => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                got
            }));
        }
        let mut ids = HashSet::new();
        let mut payloads = Vec::new();
        for consumer in consumers {
            for (id, payload) in tokio::time::timeout(WAIT, consumer).await.unwrap().unwrap() {
                assert!(ids.insert(id), "job {id} delivered twice");
                payloads.push(payload);
            }
        }
        payloads.sort_unstable();
        assert_eq!(payloads, (0..JOBS).collect::<Vec<_>>());
        let (report, mut log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.progress.done, u64::from(JOBS));
        log.successes.sort_unstable();
        assert_eq!(log.successes, (0..JOBS).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_consumer_that_dies_mid_job_has_it_redelivered_at_once() {
        let harness = Harness::simple([7]).await;
        let mut a = Client::connect(harness.addr).await;
        a.send(ToFeeder::Credit { n: 1 }).await;
        let first = a.job().await;
        let mut b = Client::connect(harness.addr).await;
        b.send(ToFeeder::Credit { n: 1 }).await;
        b.quiet_for(ms(100)).await;
        let died = Instant::now();
        drop(a);
        let again = b.job().await;
        assert!(
            died.elapsed() < Duration::from_secs(2),
            "not after the lease"
        );
        assert_eq!((again.id, again.payload, again.attempt), (first.id, 7, 2));
        assert_ne!(again.lease, first.lease);
        b.ack(again.lease).await;
        assert_eq!(b.recv().await, Some(ToConsumer::Drain));
        let (report, log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.progress.done, 1);
        assert_eq!(report.progress.failed, 1);
        assert_eq!(report.progress.retried, 1);
        assert_eq!(log.successes, [7]);
    }

    #[tokio::test]
    async fn an_expired_lease_is_redelivered_and_its_late_ack_is_stale() {
        let settings = QueueSettings {
            lease: ms(300),
            ..settings()
        };
        let harness = Harness::start([5], true, settings, |s| s).await;
        let mut a = Client::connect(harness.addr).await;
        a.send(ToFeeder::Credit { n: 1 }).await;
        let first = a.job().await;
        let mut b = Client::connect(harness.addr).await;
        b.send(ToFeeder::Credit { n: 1 }).await;
        let again = b.job().await;
        assert_eq!((again.id, again.attempt), (first.id, 2));
        a.send(ToFeeder::Ack {
            lease: first.lease,
            meta: None,
        })
        .await;
        assert_eq!(
            a.recv().await,
            Some(ToConsumer::Stale { lease: first.lease })
        );
        // A lease that never existed is stale too.
        a.send(ToFeeder::Ack {
            lease: 999,
            meta: None,
        })
        .await;
        assert_eq!(a.recv().await, Some(ToConsumer::Stale { lease: 999 }));
        // Another consumer's lease is not yours.
        a.send(ToFeeder::Ack {
            lease: again.lease,
            meta: None,
        })
        .await;
        assert_eq!(
            a.recv().await,
            Some(ToConsumer::Stale { lease: again.lease })
        );
        b.ack(again.lease).await;
        let (report, log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.progress.done, 1, "never counted twice");
        assert_eq!(log.successes, [5]);
    }

    #[tokio::test]
    async fn retry_then_success() {
        let harness = Harness::simple([3]).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let first = client.job().await;
        client
            .send(ToFeeder::Retry {
                lease: first.lease,
                // Within the policy's cap of 50 ms.
                delay: Some(ms(40)),
                reason: "busy".into(),
                meta: None,
            })
            .await;
        let asked = Instant::now();
        client.send(ToFeeder::Credit { n: 1 }).await;
        let again = client.job().await;
        assert!(asked.elapsed() >= ms(35), "the requested delay is honoured");
        assert_eq!((again.id, again.attempt, again.payload), (first.id, 2, 3));
        client.ack(again.lease).await;
        let (report, log) = harness.report().await;
        assert!(report.finished);
        let p = report.progress;
        assert_eq!((p.done, p.failed, p.retried, p.dead), (1, 1, 1, 0));
        assert_eq!(log.successes, [3]);
        assert!(log.errors.is_empty());
    }

    #[tokio::test]
    async fn a_job_s_own_retry_schedule_replaces_the_group_s() {
        // The group's policy retries within 50 ms, 10 times; the job's own
        // schedule waits 150 ms once, then gives up.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let feeder = TestFeeder {
            queue: Arc::new(Mutex::new([6].into_iter().collect())),
            done_when_empty: true,
            recheck: ms(50),
            log: log.clone(),
            own_retry: Some(RetryPolicy::schedule([ms(150)])),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            FeederServer::new(feeder, SECRET, settings()).run(listener, shutdown.clone()),
        );
        let mut client = Client::connect(addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let first = client.job().await;
        assert_eq!(first.attempt, 1);
        client
            .send(ToFeeder::Retry {
                lease: first.lease,
                delay: None,
                reason: "fail 1".into(),
                meta: None,
            })
            .await;
        let failed = Instant::now();
        client.send(ToFeeder::Credit { n: 1 }).await;
        let again = client.job().await;
        assert_eq!(again.attempt, 2);
        assert!(
            failed.elapsed() >= ms(140),
            "the job's own 150 ms delay, not the group's 10 ms"
        );
        client
            .send(ToFeeder::Retry {
                lease: again.lease,
                delay: None,
                reason: "fail 2".into(),
                meta: None,
            })
            .await;
        let report = tokio::time::timeout(WAIT, task)
            .await
            .expect("ends in time")
            .expect("no panic")
            .expect("runs");
        assert!(report.finished);
        assert_eq!(
            report.progress.dead, 1,
            "its schedule is used up after 2 attempts"
        );
        assert_eq!(log.lock().unwrap().errors, [(6, "fail 2".to_string())]);
    }

    #[tokio::test]
    async fn max_attempts_then_dead_with_the_reason() {
        let settings = QueueSettings {
            max_attempts: 2,
            ..settings()
        };
        let harness = Harness::start([4], true, settings, |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let mut last_attempt = 0;
        for reason in ["first", "boom"] {
            let job = client.job().await;
            last_attempt = job.attempt;
            client
                .send(ToFeeder::Retry {
                    lease: job.lease,
                    delay: None,
                    reason: reason.into(),
                    meta: None,
                })
                .await;
            client.send(ToFeeder::Credit { n: 1 }).await;
        }
        assert_eq!(last_attempt, 2);
        let (report, log) = harness.report().await;
        assert!(report.finished);
        let p = report.progress;
        assert_eq!((p.done, p.failed, p.retried, p.dead), (0, 2, 1, 1));
        assert_eq!(log.errors, [(4, "boom".to_string())]);
        assert!(log.successes.is_empty());
    }

    /// The core alone, with one consumer (conn 1) that got jobs 1 and 2
    /// at `start` (leases 1 and 2), and what it is sent.
    fn core_with_two_leases(
        lease: Duration,
        start: Instant,
    ) -> (
        Core<TestFeeder>,
        mpsc::UnboundedReceiver<Out>,
        Arc<Mutex<Log>>,
    ) {
        let log = Arc::new(Mutex::new(Log::default()));
        let feeder = TestFeeder {
            queue: Arc::new(Mutex::new([1, 2].into_iter().collect())),
            done_when_empty: false,
            recheck: Duration::from_secs(1),
            log: Arc::clone(&log),
            own_retry: None,
        };
        let settings = QueueSettings {
            lease,
            max_attempts: 1,
            ..settings()
        };
        let mut core = Core::new(feeder, settings, None, start);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        core.handle(
            Event::Joined {
                conn: 1,
                name: "c".into(),
                peer: "127.0.0.1:1".parse().unwrap(),
                settles: false,
                out_tx,
            },
            start,
        );
        core.handle(
            Event::Frame {
                conn: 1,
                frame: ToFeeder::Credit { n: 2 },
            },
            start,
        );
        core.pump(start);
        assert_eq!(
            core.leases.by_number.keys().copied().collect::<Vec<_>>(),
            [1, 2]
        );
        (core, out_rx, log)
    }

    #[tokio::test(start_paused = true)]
    async fn an_extended_lease_expires_after_the_later_ones() {
        let lease = Duration::from_secs(10);
        let start = Instant::now();
        let (mut core, _out_rx, log) = core_with_two_leases(lease, start);
        // Lease 1 is extended at 6 s: it now ends at 16 s, after lease 2
        // (10 s), which must still expire on time although its number is
        // higher.
        let at = start + Duration::from_secs(6);
        core.handle(
            Event::Frame {
                conn: 1,
                frame: ToFeeder::Extend { lease: 1 },
            },
            at,
        );
        assert_eq!(
            core.leases.first_expiry(),
            Some(start + lease),
            "lease 2 is first"
        );
        core.expire(start + lease);
        assert_eq!(
            core.leases.by_number.keys().copied().collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(log.lock().unwrap().errors.len(), 1, "job 2 lost, dead");
        assert_eq!(log.lock().unwrap().errors[0].0, 2);
        core.expire(start + Duration::from_secs(15));
        assert_eq!(core.leases.len(), 1, "lease 1 runs to 16 s");
        // Extending it again moves it once more; an Extend of a lease not
        // held (2 is gone) changes nothing.
        core.handle(
            Event::Frame {
                conn: 1,
                frame: ToFeeder::Extend { lease: 2 },
            },
            start + Duration::from_secs(15),
        );
        core.handle(
            Event::Frame {
                conn: 1,
                frame: ToFeeder::Extend { lease: 1 },
            },
            start + Duration::from_secs(15),
        );
        core.expire(start + Duration::from_secs(24));
        assert_eq!(core.leases.len(), 1, "lease 1 runs to 25 s");
        core.expire(start + Duration::from_secs(25));
        assert!(core.leases.is_empty());
        assert!(
            core.leases.expiry.is_empty(),
            "the index follows the leases"
        );
        assert_eq!(log.lock().unwrap().errors.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn settled_and_lost_leases_leave_the_expiry_index() {
        let lease = Duration::from_secs(10);
        let start = Instant::now();
        let (mut core, _out_rx, log) = core_with_two_leases(lease, start);
        core.handle(
            Event::Frame {
                conn: 1,
                frame: ToFeeder::Ack {
                    lease: 2,
                    meta: None,
                },
            },
            start,
        );
        assert_eq!(core.leases.expiry.len(), 1);
        core.handle(Event::Left { conn: 1 }, start);
        assert!(core.leases.is_empty() && core.leases.expiry.is_empty());
        assert_eq!(log.lock().unwrap().successes, [2]);
    }

    #[tokio::test]
    async fn dead_outcome_calls_the_error_hook_at_once() {
        let harness = Harness::simple([8]).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let job = client.job().await;
        client
            .send(ToFeeder::Dead {
                lease: job.lease,
                reason: "bad input".into(),
                meta: None,
            })
            .await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let (report, log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.progress.dead, 1);
        assert_eq!(log.errors, [(8, "bad input".to_string())]);
    }

    #[tokio::test]
    async fn a_lost_lease_counts_as_an_attempt() {
        let settings = QueueSettings {
            lease: ms(100),
            max_attempts: 2,
            ..settings()
        };
        let harness = Harness::start([9], true, settings, |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 5 }).await;
        let first = client.job().await;
        let second = client.job().await;
        assert_eq!((second.id, second.attempt), (first.id, 2));
        // Both leases expire: dead after 2 attempts.
        let (report, log) = harness.report().await;
        assert!(report.finished);
        assert_eq!(report.progress.dead, 1);
        assert_eq!(log.errors.len(), 1);
        assert!(
            log.errors[0].1.contains("lease expired"),
            "{:?}",
            log.errors
        );
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
    async fn credits_are_respected_and_outcomes_do_not_return_them() {
        let harness = Harness::simple(0..10).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 2 }).await;
        let a = client.job().await;
        let b = client.job().await;
        client.quiet_for(ms(300)).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let c = client.job().await;
        client.quiet_for(ms(200)).await;
        for job in [a, b, c] {
            client
                .send(ToFeeder::Ack {
                    lease: job.lease,
                    meta: None,
                })
                .await;
        }
        client.quiet_for(ms(300)).await;
        let (report, log) = harness.stop().await;
        assert_eq!(report.progress.done, 3);
        assert!(
            log.nexts <= 4,
            "at most one job beyond the credits pulled: {}",
            log.nexts
        );
        assert_eq!(report.unfinished, 0);
    }

    /// Jobs received during `window` after granting plenty of credit.
    async fn count_jobs(client: &mut Client, window: Duration) -> u32 {
        let end = Instant::now() + window;
        let mut count = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match client.recv_within(left).await {
                Ok(Some(ToConsumer::Job { .. })) => count += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => return count,
            }
        }
    }

    #[tokio::test]
    async fn the_governor_limits_the_rate() {
        let settings = QueueSettings {
            rate: Some(50.0),
            ..settings()
        };
        let harness = Harness::start(0..10_000, true, settings, |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 10_000 }).await;
        // 5 of burst, then 50/s: about 105 in 2 s.
        let count = count_jobs(&mut client, Duration::from_secs(2)).await;
        assert!((70..=140).contains(&count), "{count} jobs in 2 s at 50/s");
        drop(client);
        harness.stop().await;
    }

    #[tokio::test]
    async fn slow_down_lowers_the_rate() {
        let settings = QueueSettings {
            rate: Some(100.0),
            ..settings()
        };
        let harness = Harness::start(0..10_000, true, settings, |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 10_000 }).await;
        let before = count_jobs(&mut client, Duration::from_secs(1)).await;
        client.send(ToFeeder::SlowDown).await;
        let after = count_jobs(&mut client, Duration::from_secs(1)).await;
        // About 110 then about 55.
        assert!(before >= 80, "{before}");
        assert!(
            f64::from(after) < 0.8 * f64::from(before),
            "{before} then {after}"
        );
        drop(client);
        harness.stop().await;
    }

    #[tokio::test]
    async fn pause_stops_deliveries_for_a_while() {
        let harness = Harness::simple(0..100).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        let job = client.job().await;
        client.send(ToFeeder::Pause { duration: ms(400) }).await;
        let paused = Instant::now();
        client.ack(job.lease).await;
        let _ = client.job().await;
        assert!(paused.elapsed() >= ms(350), "{:?}", paused.elapsed());
        drop(client);
        harness.stop().await;
    }

    #[tokio::test]
    async fn shutdown_drains_and_records_outcomes() {
        let harness = Harness::start(0..10, true, settings(), |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 3 }).await;
        let (a, b, c) = (client.job().await, client.job().await, client.job().await);
        harness.shutdown.cancel();
        assert_eq!(client.recv().await, Some(ToConsumer::Drain));
        client
            .send(ToFeeder::Ack {
                lease: a.lease,
                meta: None,
            })
            .await;
        client
            .send(ToFeeder::Dead {
                lease: b.lease,
                reason: "nope".into(),
                meta: None,
            })
            .await;
        client.send(ToFeeder::Release { lease: c.lease }).await;
        client.send(ToFeeder::Bye).await;
        let (report, log) = harness.report().await;
        assert!(!report.finished);
        assert_eq!(report.progress.done, 1);
        assert_eq!(report.progress.dead, 1);
        assert_eq!(report.progress.in_flight, 0);
        assert_eq!(report.unfinished, 1, "the released job");
        assert_eq!(log.successes, [a.payload]);
        assert_eq!(log.errors, [(b.payload, "nope".to_string())]);
    }

    #[tokio::test]
    async fn shutdown_waits_at_most_the_lease() {
        let settings = QueueSettings {
            lease: ms(500),
            ..settings()
        };
        let harness = Harness::start(0..10, true, settings, |s| s).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 2 }).await;
        let _ = (client.job().await, client.job().await);
        let stopped = Instant::now();
        harness.shutdown.cancel();
        assert_eq!(client.recv().await, Some(ToConsumer::Drain));
        // No answer at all.
        let (report, log) = harness.report().await;
        assert!(stopped.elapsed() < Duration::from_secs(3));
        assert_eq!(report.unfinished, 2);
        assert_eq!(report.progress.done, 0);
        assert!(log.successes.is_empty() && log.errors.is_empty());
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

    #[tokio::test]
    async fn empty_feeder_is_asked_again_after_recheck() {
        let settings = QueueSettings {
            progress_every: ms(50),
            ..settings()
        };
        let (progress_tx, mut progress_rx) = mpsc::channel(100);
        let harness = Harness::start([], false, settings, |s| s.progress(progress_tx)).await;
        let mut client = Client::connect(harness.addr).await;
        client.send(ToFeeder::Credit { n: 1 }).await;
        client.quiet_for(ms(300)).await;
        let asked = harness.log.lock().unwrap().nexts;
        assert!(
            (2..=20).contains(&asked),
            "asked {asked} times in 300 ms (recheck 50 ms)"
        );
        harness.queue.lock().unwrap().push_back(42);
        let job = client.job().await;
        assert_eq!(job.payload, 42);
        client.ack(job.lease).await;
        client.quiet_for(ms(150)).await;
        let (report, log) = harness.stop().await;
        assert!(!report.finished, "empty is not done");
        assert!(report.progress.empty);
        assert_eq!(log.successes, [42]);
        let mut reports = Vec::new();
        while let Ok(progress) = progress_rx.try_recv() {
            reports.push(progress);
        }
        assert!(reports.len() >= 3, "{reports:?}");
        assert!(reports.iter().any(|p| p.empty && p.done == 0));
        assert_eq!(reports.last(), Some(&report.progress));
        assert_eq!(report.progress.consumers, 1);
    }

    #[test]
    fn job_frames_decode_as_the_protocol_says() {
        let mut buf = BytesMut::new();
        let payload = encode_payload(&serde_json::json!({"a": [1, "x"]})).unwrap();
        OutCodec
            .encode(
                Out::Job {
                    lease: 7,
                    id: 3,
                    attempt: 2,
                    payload,
                },
                &mut buf,
            )
            .unwrap();
        OutCodec
            .encode(Out::Frame(ToConsumer::Stale { lease: 9 }), &mut buf)
            .unwrap();
        let mut codec = protocol::codec();
        let mut frames = Vec::new();
        while let Some(body) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
            frames.push(protocol::decode::<ToConsumer>(&body).unwrap());
        }
        assert_eq!(
            frames,
            [
                ToConsumer::Job {
                    lease: 7,
                    id: 3,
                    attempt: 2,
                    payload: serde_json::json!({"a": [1, "x"]}),
                },
                ToConsumer::Stale { lease: 9 },
            ]
        );
    }

    #[test]
    fn jobs_that_cannot_be_sent_are_refused() {
        let mut map = HashMap::new();
        map.insert((1u8, 2u8), 3u8);
        assert!(encode_payload(&map).is_err());
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(encode_payload(&big).unwrap_err().contains("too big"));
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let feeder = TestFeeder {
            queue: Default::default(),
            done_when_empty: true,
            recheck: ms(50),
            log: Default::default(),
            own_retry: None,
        };
        let err = serve(
            listener,
            feeder,
            String::new(),
            settings(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ServerError::EmptySecret));
        for (lease, rate) in [
            (Duration::ZERO, None),
            (ms(10), Some(0.0)),
            (ms(10), Some(f64::NAN)),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let feeder = TestFeeder {
                queue: Default::default(),
                done_when_empty: true,
                recheck: ms(50),
                log: Default::default(),
                own_retry: None,
            };
            let settings = QueueSettings {
                lease,
                rate,
                ..settings()
            };
            let err = FeederServer::new(feeder, SECRET, settings)
                .run(listener, CancellationToken::new())
                .await
                .unwrap_err();
            assert!(matches!(err, ServerError::InvalidSettings { .. }), "{err}");
        }
    }

    /// No-op jobs through 4 consumers on loopback:
    /// `cargo test --release --lib -- --ignored throughput --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "benchmark"]
    async fn throughput() {
        use futures::FutureExt;
        const JOBS: u32 = 400_000;
        let harness = Harness::simple(0..JOBS).await;
        let started = std::time::Instant::now();
        let mut consumers = Vec::new();
        for _ in 0..4 {
            let addr = harness.addr;
            consumers.push(tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                client.send(ToFeeder::Credit { n: 256 }).await;
                let mut framed =
                    tokio_util::codec::Framed::new(client.conn.into_inner(), protocol::codec());
                let mut done = 0u64;
                loop {
                    let Some(Ok(body)) = framed.next().await else {
                        return done;
                    };
                    let mut next = Some(body);
                    let mut freed = 0;
                    while let Some(body) = next.take() {
                        match protocol::decode::<ToConsumer>(&body).unwrap() {
                            ToConsumer::Job { lease, .. } => {
                                let ack =
                                    protocol::encode(&ToFeeder::Ack { lease, meta: None }).unwrap();
                                framed.feed(ack).await.unwrap();
                                freed += 1;
                                done += 1;
                            }
                            ToConsumer::Drain => return done,
                            _ => {}
                        }
                        if let Some(Some(Ok(body))) = framed.next().now_or_never() {
                            next = Some(body);
                        }
                    }
                    if freed > 0 {
                        let credit = protocol::encode(&ToFeeder::Credit { n: freed }).unwrap();
                        framed.feed(credit).await.unwrap();
                    }
                    SinkExt::<Bytes>::flush(&mut framed).await.unwrap();
                }
            }));
        }
        let mut total = 0;
        for consumer in consumers {
            total += consumer.await.unwrap();
        }
        let (report, _) = harness.report().await;
        let elapsed = started.elapsed();
        assert!(report.finished);
        assert_eq!(total, u64::from(JOBS));
        println!(
            "{JOBS} jobs in {elapsed:?}: {:.0} jobs/s",
            f64::from(JOBS) / elapsed.as_secs_f64()
        );
    }
}
