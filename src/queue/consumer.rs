//! The consumer side of a queue group: connect to the feeder, prove the
//! secret, pull jobs within the granted credits, run them, report outcomes.
//!
//! [`consume`] is the async core; the slave library's
//! [`HandlerQueue`](crate::slave::HandlerQueue) wraps it for synchronous
//! user functions.
//!
//! # How it works
//!
//! - **Connection.** The consumer connects to the feeder, retrying with
//!   backoff ([`RECONNECT_INITIAL`] doubling to [`RECONNECT_MAX`], with
//!   jitter) for as long as it is not shut down: a feeder that restarts is
//!   reconnected to. An outage is logged once at warn, not per attempt.
//! - **Handshake** ([`crate::protocol::queue`]): the feeder's challenge is
//!   answered with our proof and our own nonce; the feeder must prove the
//!   secret back. A feeder that cannot (an impostor) or that refuses us
//!   ends [`consume`] with an error: those never heal by retrying.
//! - **Credits.** At the start of each connection the consumer grants
//!   [`ConsumerOptions::credits`] (minus the jobs of a lost connection still
//!   running). Each job received uses one; an outcome does not give it back
//!   by itself: a [`ToFeeder::Credit`] follows each freed slot (batched when
//!   several free up together). So the jobs held (running or waiting here)
//!   plus the credits the feeder has left never exceed
//!   [`ConsumerOptions::credits`].
//! - **Jobs.** At most [`ConsumerOptions::concurrency`] run at once, each
//!   in its own task; the others wait here in arrival order. A payload that
//!   does not deserialize is dead-lettered at once with serde's error; a
//!   job whose run panics is retried (never acked) with the panic text. A
//!   job that waited here longer than its lease is not started (the feeder
//!   has given it to someone else).
//! - **Liveness.** A heartbeat goes out every [`ConsumerOptions::heartbeat`];
//!   a feeder silent for [`ConsumerOptions::silence`] is lost: the
//!   connection is dropped and made again. Jobs still running then finish,
//!   but their outcomes are not sent on the new connection (the feeder
//!   redelivers those jobs): they are counted as lost.
//! - **Stop.** On [`ToConsumer::Drain`] or shutdown, no new job starts:
//!   jobs waiting here are handed back ([`ToFeeder::Release`]), running
//!   ones get [`ConsumerOptions::grace`] to finish and have their outcomes
//!   sent (those still running after it are reported as retries and
//!   abandoned), then [`ToFeeder::Bye`] and the connection closes.
//! - **I/O.** The socket is split: the read half is polled in one select
//!   loop (reads are cancel safe); a writer task drains a queue of frames,
//!   feeding all that are ready and flushing once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt as _;
use serde::de::DeserializeOwned;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::error_text::panic_text;
use crate::protocol::queue::{
    proof, random_hex, verify, OutcomeMeta, ToConsumer, ToFeeder, FEATURE_EXTEND, FEATURE_SETTLED,
};
use crate::protocol::{FrameReader, FrameWriter, ProtocolError, PROTOCOL_VERSION};
use crate::retry::Outcome;

/// First delay before reconnecting to the feeder; it doubles per failed
/// attempt up to [`RECONNECT_MAX`].
pub const RECONNECT_INITIAL: Duration = Duration::from_millis(100);

/// Longest delay between two connection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Longest wait for a TCP connection, and then for the feeder's side of
/// the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`ConsumerOptions::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Default of [`ConsumerOptions::heartbeat`].
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// Default of [`ConsumerOptions::silence`].
pub const DEFAULT_SILENCE: Duration = Duration::from_secs(3);

/// Longest wait for the last frames (outcomes, Bye) to be written at stop.
const BYE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a consumer pulls and runs jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Jobs run at once (0 is taken as 1).
    pub concurrency: u32,
    /// Jobs the feeder may send ahead (prefetch), running ones included;
    /// raised to `concurrency` when lower.
    pub credits: u32,
    /// At stop (drain or shutdown), how long running jobs have to finish
    /// before they are reported as retries and abandoned.
    pub grace: Duration,
    /// How often a heartbeat goes to the feeder (the feeder drops a
    /// consumer it has not heard from for 3 s).
    pub heartbeat: Duration,
    /// A feeder that sends nothing for this long is lost: reconnect.
    pub silence: Duration,
    /// This consumer's host as the master names it, sent with each
    /// outcome to a feeder that keeps a joblog.
    pub host: Option<String>,
    /// This consumer instance's global id, sent likewise.
    pub instance: Option<u32>,
}

impl ConsumerOptions {
    /// `concurrency` jobs at once, `credits` of prefetch, and the default
    /// grace, heartbeat and silence.
    pub fn new(concurrency: u32, credits: u32) -> Self {
        ConsumerOptions {
            concurrency,
            credits,
            ..ConsumerOptions::default()
        }
    }

    /// The same options with another [`grace`](Self::grace).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The same options naming this consumer to the feeder's joblog: its
    /// `host` and its instance's global id.
    pub fn with_origin(mut self, host: impl Into<String>, instance: u32) -> Self {
        self.host = Some(host.into());
        self.instance = Some(instance);
        self
    }

    /// The concurrency actually used (at least 1).
    fn slots(&self) -> u32 {
        self.concurrency.max(1)
    }

    /// The credits actually granted (at least the concurrency).
    fn prefetch(&self) -> u32 {
        self.credits.max(self.slots())
    }
}

impl Default for ConsumerOptions {
    /// One job at a time, no prefetch beyond it, [`DEFAULT_GRACE`],
    /// [`DEFAULT_HEARTBEAT`], [`DEFAULT_SILENCE`].
    fn default() -> Self {
        ConsumerOptions {
            concurrency: 1,
            credits: 1,
            grace: DEFAULT_GRACE,
            heartbeat: DEFAULT_HEARTBEAT,
            silence: DEFAULT_SILENCE,
            host: None,
            instance: None,
        }
    }
}

/// A job's [`Outcome`] with what the consumer's function observed about
/// its run, for the feeder's joblog. A function given to [`consume`]
/// returns either (an `Outcome` is a result without observations).
///
/// ```
/// use taskherd::queue::consumer::JobResult;
/// use taskherd::retry::Outcome;
/// let result = JobResult::new(Outcome::Retry(None))
///     .with_exit(75)
///     .with_reason("job.sh: exit status 75");
/// assert_eq!(result.exit, Some(75));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobResult {
    /// What the feeder does with the job.
    pub outcome: Outcome,
    /// Why a retry was asked for (a dead outcome has its own reason).
    pub reason: Option<String>,
    /// The exit status of the job's process, if it ran one.
    pub exit: Option<i32>,
    /// The signal that killed the job's process, if one did.
    pub signal: Option<i32>,
}

impl JobResult {
    /// `outcome`, with nothing observed.
    pub fn new(outcome: Outcome) -> JobResult {
        JobResult {
            outcome,
            reason: None,
            exit: None,
            signal: None,
        }
    }

    /// With the exit status of the job's process.
    pub fn with_exit(mut self, code: i32) -> JobResult {
        self.exit = Some(code);
        self
    }

    /// With the signal that killed the job's process.
    pub fn with_signal(mut self, signal: i32) -> JobResult {
        self.signal = Some(signal);
        self
    }

    /// With the reason of a retry (for the feeder's error hook, log and
    /// joblog).
    pub fn with_reason(mut self, reason: impl Into<String>) -> JobResult {
        self.reason = Some(reason.into());
        self
    }
}

impl From<Outcome> for JobResult {
    fn from(outcome: Outcome) -> JobResult {
        JobResult::new(outcome)
    }
}

/// What the consumer's function learns about a job besides its payload.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id, stable across attempts (for logs and idempotence).
    pub id: u64,
    /// Attempts so far, this one included (1 on first delivery).
    pub attempt: u32,
    /// When the feeder's lease of this attempt ends, reckoned from the
    /// job's arrival here (`None` when the feeder leases without a time
    /// limit). An outcome sent later is refused as stale and the job runs
    /// again elsewhere: work past it is wasted.
    pub deadline: Option<std::time::Instant>,
    /// Asks the feeder to send less: the consumer's side of the rate
    /// governor.
    pub feeder: FeederControl,
    /// The lease of this attempt, for [`JobInfo::extend_lease`].
    lease: u64,
    /// The feeder's lease time (zero: no time limit).
    lease_time: Duration,
    /// The feeder takes [`ToFeeder::Extend`].
    extends: bool,
}

impl JobInfo {
    /// Tells the feeder the job is still being worked on: its lease starts
    /// again for the feeder's whole lease time. Returns the new end of the
    /// lease, reckoned from now (the feeder's clock starts a little later),
    /// or `None` when nothing was sent: the feeder leases without a time
    /// limit, or it is too old to take the frame (then the lease keeps its
    /// [`deadline`](Self::deadline)). A lost connection drops it silently
    /// (the job is redelivered anyway).
    pub fn extend_lease(&self) -> Option<std::time::Instant> {
        if !self.extends || self.lease_time.is_zero() {
            return None;
        }
        let _ = self
            .feeder
            .frames_tx
            .send(ToFeeder::Extend { lease: self.lease });
        Some(std::time::Instant::now() + self.lease_time)
    }
}

/// Lets a consumer tell the feeder it is overloaded (the feeder's rate
/// governor halves its rate, then recovers gradually) or must not get
/// anything for a while.
///
/// ```no_run
/// # fn job(info: taskherd::queue::consumer::JobInfo) {
/// use std::time::Duration;
/// // The database answers slowly: ease off.
/// info.feeder.slow_down();
/// // It is down for maintenance: nothing for a minute.
/// info.feeder.pause(Duration::from_secs(60));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FeederControl {
    frames_tx: mpsc::UnboundedSender<ToFeeder>,
}

impl FeederControl {
    /// Sends SlowDown. A lost connection drops it silently: the next
    /// connection starts at the feeder's current rate.
    pub fn slow_down(&self) {
        let _ = self.frames_tx.send(ToFeeder::SlowDown);
    }

    /// Sends Pause: the feeder sends no job to anyone for `duration`
    /// (capped by the feeder).
    pub fn pause(&self, duration: Duration) {
        let _ = self.frames_tx.send(ToFeeder::Pause { duration });
    }
}

/// What a consumer did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Jobs acked.
    pub done: u64,
    /// Jobs reported as retries (the function asked, it panicked, or it
    /// was still running after the stop grace).
    pub retried: u64,
    /// Jobs reported dead (the function said so, or the payload did not
    /// deserialize).
    pub dead: u64,
    /// Jobs handed back unstarted at stop.
    pub released: u64,
    /// Jobs held when their connection was lost: outcomes not sent, or
    /// never started. The feeder redelivers them.
    pub lost: u64,
    /// Of `retried`: jobs still running when the stop grace ran out.
    pub interrupted: u64,
    /// Jobs not started because they waited here longer than their lease.
    pub expired: u64,
    /// Outcomes the feeder called stale (the lease had expired).
    pub stale: u64,
    /// Outcomes a durable feeder confirmed as recorded
    /// ([`ToConsumer::Settled`]): those jobs never run again.
    pub settled: u64,
    /// Connections made (handshakes that succeeded).
    pub connections: u64,
}

/// Why [`consume`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The feeder refused us (wrong secret, version): retrying cannot help.
    #[error("feeder {feeder} refused this consumer: {reason}")]
    Refused {
        /// The feeder's address.
        feeder: String,
        /// The feeder's reason.
        reason: String,
    },
    /// The peer does not know the secret: it is not our feeder.
    #[error("{feeder} failed to prove the queue secret: not our feeder")]
    Impostor {
        /// The address we connected to.
        feeder: String,
    },
    /// The feeder speaks another protocol version.
    #[error(
        "protocol version mismatch: this consumer speaks {ours}, feeder {feeder} speaks {theirs}"
    )]
    VersionMismatch {
        /// The feeder's address.
        feeder: String,
        /// Our [`PROTOCOL_VERSION`].
        ours: u32,
        /// The feeder's version.
        theirs: u32,
    },
    /// The feeder address is not a `host:port`.
    #[error("bad feeder address {feeder:?}")]
    Address {
        /// The address given.
        feeder: String,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// No randomness for the handshake nonce.
    #[error("cannot make a handshake nonce")]
    Nonce(#[source] std::io::Error),
}

/// Pulls jobs from the feeder at `feeder_addr` and runs them with `run`
/// until the feeder drains us or `shutdown` is cancelled.
///
/// `name` tells the feeder's log who we are (`group/id@host`). Each job's
/// payload is deserialized into `J` and given to `run` with its
/// [`JobInfo`]; the [`Outcome`] of the future is sent to the feeder (`Done`
/// as an ack, `Retry` as a retry, `Dead` as a dead letter). See the
/// [module docs](self) for the rules.
///
/// # Errors
///
/// Only what retrying cannot fix: the feeder refused us
/// ([`ConsumerError::Refused`]), did not prove the secret
/// ([`ConsumerError::Impostor`]), speaks another version, the address is
/// malformed, or there is no randomness. An unreachable or lost feeder is
/// retried forever (until shutdown).
///
/// # Cancel safety
///
/// Not cancel safe: dropping the future drops the connection without
/// handing back the jobs held (the feeder redelivers them when their
/// leases expire or it sees the connection close). Cancel `shutdown`
/// instead.
#[tracing::instrument(name = "consumer", skip_all, fields(feeder = %feeder_addr, name = %name))]
pub async fn consume<J, F, Fut>(
    feeder_addr: &str,
    secret: &str,
    name: &str,
    options: ConsumerOptions,
    run: F,
    shutdown: CancellationToken,
) -> Result<ConsumerReport, ConsumerError>
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<JobResult>,
{
    let mut runner = Runner {
        run: Arc::new(run),
        running: JoinSet::new(),
        in_progress: HashMap::new(),
        report: ConsumerReport::default(),
        host: options.host.clone(),
        instance: options.instance,
        _job: PhantomData,
    };
    let mut backoff = Backoff::new();
    // When the feeder became unreachable, so an outage is logged once.
    let mut outage: Option<Instant> = None;
    let mut stop = Stop::default();

    loop {
        let link = {
            let attempt = connect(feeder_addr, secret, name);
            tokio::pin!(attempt);
            let outcome = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break None,
                    Some(joined) = runner.running.join_next_with_id(), if !runner.running.is_empty() => {
                        runner.finished_unsent(joined);
                    }
                    result = &mut attempt => break Some(result),
                }
            };
            match outcome {
                None => break,
                Some(Ok(link)) => link,
                Some(Err(Attempt::Fatal(err))) => {
                    runner.abandon();
                    return Err(err);
                }
                Some(Err(Attempt::Transient(cause))) => {
                    if outage.is_none() {
                        warn!(cause = %cause, "feeder unreachable, retrying");
                        outage = Some(Instant::now());
                    } else {
                        debug!(cause = %cause, "feeder still unreachable");
                    }
                    let delay = backoff.next_delay();
                    let wake = Instant::now() + delay;
                    let stopped = loop {
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break true,
                            Some(joined) = runner.running.join_next_with_id(), if !runner.running.is_empty() => {
                                runner.finished_unsent(joined);
                            }
                            () = tokio::time::sleep_until(wake) => break false,
                        }
                    };
                    if stopped {
                        break;
                    }
                    continue;
                }
            }
        };
        backoff.reset();
        runner.report.connections += 1;
        match outage.take() {
            Some(since) => info!(after = ?since.elapsed(), "connected to the feeder again"),
            None => debug!("connected to the feeder"),
        }
        match session(&mut runner, link, &options, &shutdown, &mut stop).await {
            SessionEnd::Finished => break,
            SessionEnd::Lost(cause) => {
                warn!(cause = %cause, "feeder lost, reconnecting");
                outage = Some(Instant::now());
            }
        }
    }

    // No connection any more: let the jobs still running finish within the
    // grace; their outcomes cannot be sent.
    let deadline = stop.begin(&options);
    while !runner.running.is_empty() {
        tokio::select! {
            Some(joined) = runner.running.join_next_with_id() => runner.finished_unsent(joined),
            () = tokio::time::sleep_until(deadline) => {
                warn!(
                    jobs = runner.running.len(),
                    "jobs still running after the stop grace: abandoned"
                );
                runner.abandon();
            }
        }
    }
    Ok(runner.report)
}

/// When the stop (drain or shutdown) began, for the grace.
#[derive(Debug, Default)]
struct Stop {
    /// End of the grace, once a stop began.
    deadline: Option<Instant>,
}

impl Stop {
    /// Starts the grace if not started yet; returns its end.
    fn begin(&mut self, options: &ConsumerOptions) -> Instant {
        *self
            .deadline
            .get_or_insert_with(|| Instant::now() + options.grace)
    }
}

/// Connection backoff: doubling from [`RECONNECT_INITIAL`] to
/// [`RECONNECT_MAX`], ±25 % jitter.
#[derive(Debug)]
struct Backoff {
    /// The delay before jitter of the next wait.
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: RECONNECT_INITIAL,
        }
    }

    fn reset(&mut self) {
        self.next = RECONNECT_INITIAL;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(RECONNECT_MAX);
        // Without randomness the delay is just not spread.
        let unit = getrandom::u32().map_or(0.5, |r| f64::from(r) / f64::from(u32::MAX));
        base.mul_f64(0.75 + 0.5 * unit).min(RECONNECT_MAX)
    }
}

/// A failed connection attempt.
enum Attempt {
    /// Try again later (unreachable, closed, timed out, garbage).
    Transient(String),
    /// Give up: see [`ConsumerError`].
    Fatal(ConsumerError),
}

/// Frames read from the feeder.
type FeederRx = FrameReader<OwnedReadHalf, ToConsumer>;
/// Frames written to the feeder.
type FeederTx = FrameWriter<OwnedWriteHalf, ToFeeder>;

/// A connection past the handshake.
struct Link {
    /// The read half, polled by the session loop.
    feeder_rx: FeederRx,
    /// The write half, owned by the writer task.
    feeder_tx: FeederTx,
    /// The feeder's lease time (zero: none).
    lease: Duration,
    /// The feeder confirms durable outcomes ([`ToConsumer::Settled`]).
    settles: bool,
    /// The feeder takes [`ToFeeder::Extend`].
    extends: bool,
    /// The feeder keeps a joblog: outcomes carry their [`OutcomeMeta`].
    meta: bool,
}

/// One frame read, classified.
enum Read {
    /// A frame we know.
    Frame(ToConsumer),
    /// A frame of a newer feeder: skipped.
    Unknown(ProtocolError),
    /// The feeder closed the connection.
    Closed,
    /// The link is unusable.
    Broken(ProtocolError),
}

fn classify(read: Result<Option<ToConsumer>, ProtocolError>) -> Read {
    match read {
        Ok(Some(frame)) => Read::Frame(frame),
        Ok(None) => Read::Closed,
        Err(err @ ProtocolError::UnexpectedMessage { .. }) => Read::Unknown(err),
        Err(err) => Read::Broken(err),
    }
}

/// Connects and runs the handshake.
async fn connect(feeder: &str, secret: &str, name: &str) -> Result<Link, Attempt> {
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
    let mut feeder_rx = FeederRx::new(read_half);
    let mut feeder_tx = FeederTx::new(write_half);
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
async fn handshake(
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

async fn read_handshake_frame(feeder_rx: &mut FeederRx) -> Result<ToConsumer, Attempt> {
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
async fn write_frames(
    mut feeder_tx: FeederTx,
    mut frames_rx: mpsc::UnboundedReceiver<ToFeeder>,
) -> Result<(), ProtocolError> {
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

/// How a session ended.
enum SessionEnd {
    /// Drained or shut down: stop consuming.
    Finished,
    /// The connection broke or the feeder went silent: reconnect.
    Lost(String),
}

/// A job received and not started yet.
struct Queued<J> {
    /// Its lease, named in the outcome.
    lease: u64,
    /// For the user function.
    info: JobInfo,
    /// The payload, deserialized.
    job: J,
    /// When it arrived, to skip it once its lease is over.
    received: Instant,
}

/// How a job's run ended.
enum JobEnd {
    /// The function returned.
    Returned(JobResult),
    /// The function panicked, with this text.
    Panicked(String),
}

/// A job running in a task.
#[derive(Debug, Clone, Copy)]
struct Running {
    /// The connection it came on: its outcome is sent only on that one.
    session: u64,
    /// Its lease.
    lease: u64,
    /// When it started (wall clock), for the feeder's joblog.
    started: SystemTime,
    /// When it started, for its duration.
    began: Instant,
}

impl Running {
    /// What the feeder's joblog gets about this run, ended now.
    fn meta(&self, host: &Option<String>, instance: Option<u32>) -> OutcomeMeta {
        let mut meta = OutcomeMeta::default();
        meta.host.clone_from(host);
        meta.instance = instance;
        meta.start_ms = self
            .started
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|since| u64::try_from(since.as_millis()).ok());
        meta.duration_ms = u64::try_from(self.began.elapsed().as_millis()).ok();
        meta
    }
}

/// The jobs running, across connections, and the counts.
struct Runner<J, F> {
    /// The user function.
    run: Arc<F>,
    /// One task per running job.
    running: JoinSet<JobEnd>,
    /// What each task runs.
    in_progress: HashMap<task::Id, Running>,
    /// What happened so far.
    report: ConsumerReport,
    /// This consumer's host, for the feeder's joblog.
    host: Option<String>,
    /// This consumer instance's id, for the feeder's joblog.
    instance: Option<u32>,
    /// The job type, for the methods.
    _job: PhantomData<fn() -> J>,
}

impl<J, F, Fut> Runner<J, F>
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<JobResult>,
{
    /// Runs a job in a task.
    fn start(&mut self, session: u64, queued: Queued<J>) {
        let run = Arc::clone(&self.run);
        let Queued {
            lease, info, job, ..
        } = queued;
        let abort = self.running.spawn(async move {
            let ran = AssertUnwindSafe(async move { run(job, info).await })
                .catch_unwind()
                .await;
            match ran {
                Ok(result) => JobEnd::Returned(result.into()),
                Err(payload) => JobEnd::Panicked(panic_text(payload.as_ref())),
            }
        });
        self.in_progress.insert(
            abort.id(),
            Running {
                session,
                lease,
                started: SystemTime::now(),
                began: Instant::now(),
            },
        );
    }

    /// A task ended: which job, and how (`None` for a job cancelled or a
    /// task we no longer know).
    fn take(&mut self, joined: Result<(task::Id, JobEnd), JoinError>) -> Option<(Running, JobEnd)> {
        match joined {
            Ok((id, end)) => self.in_progress.remove(&id).map(|running| (running, end)),
            Err(err) => {
                let running = self.in_progress.remove(&err.id())?;
                if err.is_panic() {
                    let text = panic_text(err.into_panic().as_ref());
                    Some((running, JobEnd::Panicked(text)))
                } else {
                    None
                }
            }
        }
    }

    /// A job ended with no connection to report on.
    fn finished_unsent(&mut self, joined: Result<(task::Id, JobEnd), JoinError>) {
        if let Some((running, _)) = self.take(joined) {
            debug!(
                lease = running.lease,
                "job finished after its connection was lost: outcome not sent"
            );
            self.report.lost += 1;
        }
    }

    /// Gives up on every running job (their tasks are aborted; blocking
    /// work inside them runs on unobserved).
    fn abandon(&mut self) {
        self.report.lost += self.in_progress.len() as u64;
        self.in_progress.clear();
        self.running.abort_all();
        self.running.detach_all();
    }

    /// What the feeder's joblog gets about `running`, ended now (`None`
    /// when the feeder keeps no joblog).
    fn meta(&self, running: &Running, wanted: bool) -> Option<OutcomeMeta> {
        wanted.then(|| running.meta(&self.host, self.instance))
    }

    /// The outcome frame of a job of the current session, counted; with
    /// its [`OutcomeMeta`] when the feeder wants it.
    fn outcome_frame(&mut self, running: &Running, end: JobEnd, wanted: bool) -> ToFeeder {
        let lease = running.lease;
        let mut meta = self.meta(running, wanted);
        match end {
            JobEnd::Returned(result) => {
                if let Some(meta) = &mut meta {
                    meta.exit = result.exit;
                    meta.signal = result.signal;
                }
                match result.outcome {
                    Outcome::Done => {
                        self.report.done += 1;
                        ToFeeder::Ack { lease, meta }
                    }
                    Outcome::Retry(delay) => {
                        self.report.retried += 1;
                        ToFeeder::Retry {
                            lease,
                            delay,
                            reason: result
                                .reason
                                .unwrap_or_else(|| "the consumer asked for a retry".into()),
                            meta,
                        }
                    }
                    Outcome::Dead(reason) => {
                        self.report.dead += 1;
                        ToFeeder::Dead {
                            lease,
                            reason,
                            meta,
                        }
                    }
                }
            }
            JobEnd::Panicked(text) => {
                warn!(lease, panic = %text, "job panicked: retry");
                self.report.retried += 1;
                ToFeeder::Retry {
                    lease,
                    delay: None,
                    reason: format!("panicked: {text}"),
                    meta,
                }
            }
        }
    }
}

/// One connection's life: credits, jobs, outcomes, heartbeats, drain.
async fn session<J, F, Fut>(
    runner: &mut Runner<J, F>,
    link: Link,
    options: &ConsumerOptions,
    shutdown: &CancellationToken,
    stop: &mut Stop,
) -> SessionEnd
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<JobResult>,
{
    let session = runner.report.connections;
    let Link {
        mut feeder_rx,
        feeder_tx,
        lease,
        settles,
        extends,
        meta,
    } = link;
    let (frames_tx, frames_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_frames(feeder_tx, frames_rx));
    let send = |frame: ToFeeder| {
        // A closed queue means the writer failed: the select sees it.
        let _ = frames_tx.send(frame);
    };

    // Jobs of a lost connection still running keep their slots.
    let held = u32::try_from(runner.running.len()).unwrap_or(u32::MAX);
    let initial = options.prefetch().saturating_sub(held);
    if initial > 0 {
        send(ToFeeder::Credit { n: initial });
    }
    let mut queued: VecDeque<Queued<J>> = VecDeque::new();
    // Job ids and attempts by lease, for the log of outcomes a durable
    // feeder settles.
    let mut job_ids: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut draining = false;
    let mut last_heard = Instant::now();
    // A zero period would make the interval panic.
    let every = options.heartbeat.max(Duration::from_millis(1));
    let mut heartbeat = tokio::time::interval_at(last_heard + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = loop {
        // Slots freed by this turn, granted back as one credit frame.
        let mut freed = 0u32;
        // A job may have asked for the stop (max jobs): no new job then.
        if !draining && shutdown.is_cancelled() {
            info!("shutdown: draining");
            draining = true;
            stop.begin(options);
            release_all(&mut queued, runner, &send);
        }
        if !draining {
            while runner.running.len() < options.slots() as usize {
                let Some(job) = queued.pop_front() else { break };
                if !lease.is_zero() && job.received.elapsed() >= lease {
                    debug!(
                        lease = job.lease,
                        "job waited longer than its lease: not started"
                    );
                    runner.report.expired += 1;
                    freed += 1;
                    continue;
                }
                runner.start(session, job);
            }
        } else if runner.running.is_empty() {
            break SessionEnd::Finished;
        }
        if freed > 0 {
            send(ToFeeder::Credit { n: freed });
            freed = 0;
        }
        let silent_at = last_heard + options.silence;
        let grace_over = stop.deadline.filter(|_| draining);

        tokio::select! {
            biased;
            Some(joined) = runner.running.join_next_with_id(), if !runner.running.is_empty() => {
                let mut next = Some(joined);
                while let Some(joined) = next.take() {
                    if let Some((running, end)) = runner.take(joined) {
                        if running.session == session {
                            let frame = runner.outcome_frame(&running, end, meta);
                            if matches!(frame, ToFeeder::Retry { .. }) {
                                // Not final: never settled.
                                job_ids.remove(&running.lease);
                            }
                            send(frame);
                        } else {
                            debug!(
                                lease = running.lease,
                                "job of a lost connection finished: outcome not sent"
                            );
                            runner.report.lost += 1;
                        }
                        freed += 1;
                    }
                    next = runner.running.try_join_next_with_id();
                }
                if !draining && !shutdown.is_cancelled() && freed > 0 {
                    send(ToFeeder::Credit { n: freed });
                }
            }
            item = feeder_rx.read() => {
                last_heard = Instant::now();
                match classify(item) {
                    Read::Frame(ToConsumer::Job { lease: job_lease, id, attempt, payload }) => {
                        if settles {
                            job_ids.insert(job_lease, (id, attempt));
                        }
                        if draining {
                            send(ToFeeder::Release { lease: job_lease });
                            runner.report.released += 1;
                            continue;
                        }
                        match payload.decode::<J>() {
                            Ok(job) => {
                                let received = Instant::now();
                                queued.push_back(Queued {
                                    lease: job_lease,
                                    info: JobInfo {
                                        id,
                                        attempt,
                                        deadline: (!lease.is_zero())
                                            .then(|| (received + lease).into_std()),
                                        feeder: FeederControl { frames_tx: frames_tx.clone() },
                                        lease: job_lease,
                                        lease_time: lease,
                                        extends,
                                    },
                                    job,
                                    received,
                                });
                            }
                            Err(err) => {
                                let err = payload_error(&err);
                                warn!(
                                    job = id,
                                    lease = job_lease,
                                    cause = %err,
                                    "job payload does not fit the job type: dead"
                                );
                                runner.report.dead += 1;
                                let mut origin = OutcomeMeta::default();
                                origin.host.clone_from(&runner.host);
                                origin.instance = runner.instance;
                                send(ToFeeder::Dead {
                                    lease: job_lease,
                                    reason: format!("bad payload: {err}"),
                                    meta: meta.then_some(origin),
                                });
                                send(ToFeeder::Credit { n: 1 });
                            }
                        }
                    }
                    Read::Frame(ToConsumer::Stale { lease }) => {
                        debug!(lease, "the feeder called an outcome stale");
                        runner.report.stale += 1;
                    }
                    Read::Frame(ToConsumer::Settled { leases }) => {
                        for lease in leases {
                            let (job, attempt) = job_ids.remove(&lease).unzip();
                            debug!(lease, job, attempt, "outcome recorded durably by the feeder");
                            runner.report.settled += 1;
                        }
                    }
                    Read::Frame(ToConsumer::Drain) => {
                        if !draining {
                            info!("the feeder drains us: stopping");
                            draining = true;
                            stop.begin(options);
                            release_all(&mut queued, runner, &send);
                        }
                    }
                    Read::Frame(ToConsumer::Heartbeat) => {}
                    Read::Frame(ToConsumer::Refused { reason }) => {
                        break lost_or_finished(draining, format!("the feeder refused us: {reason}"));
                    }
                    Read::Frame(other) => {
                        warn!(frame = ?other, "unexpected frame from the feeder: ignored");
                    }
                    Read::Unknown(err) => {
                        warn!(cause = %err, "unknown frame from the feeder: ignored");
                    }
                    Read::Closed => {
                        break lost_or_finished(draining, "the feeder closed the connection".into());
                    }
                    Read::Broken(err) => {
                        break lost_or_finished(draining, format!("read failed: {err}"));
                    }
                }
            }
            // The drain begins at the top of the loop.
            () = shutdown.cancelled(), if !draining => {}
            _ = heartbeat.tick() => send(ToFeeder::Heartbeat),
            () = tokio::time::sleep_until(silent_at) => {
                let cause = format!("the feeder was silent for {:?}", options.silence);
                break lost_or_finished(draining, cause);
            }
            () = sleep_until_some(grace_over), if grace_over.is_some() => {
                let late: Vec<(u64, Option<OutcomeMeta>)> = runner
                    .in_progress
                    .values()
                    .filter(|running| running.session == session)
                    .map(|running| (running.lease, runner.meta(running, meta)))
                    .collect();
                warn!(
                    jobs = late.len(),
                    grace = ?options.grace,
                    "jobs still running after the stop grace: reported as retries"
                );
                for (lease, meta) in late {
                    send(ToFeeder::Retry {
                        lease,
                        delay: None,
                        reason: format!(
                            "still running after the stop grace of {:?}",
                            options.grace
                        ),
                        meta,
                    });
                    runner.report.retried += 1;
                    runner.report.interrupted += 1;
                }
                runner.in_progress.retain(|_, running| running.session != session);
                runner.abandon();
                break SessionEnd::Finished;
            }
            written = &mut writer => {
                let cause = match written {
                    Ok(Ok(())) => "the writer stopped".to_string(),
                    Ok(Err(err)) => format!("write failed: {err}"),
                    Err(err) => format!("the writer task failed: {err}"),
                };
                // The writer is gone: nothing more can be sent.
                runner.report.lost += queued.len() as u64;
                return lost_or_finished(draining, cause);
            }
        }
    };

    match end {
        SessionEnd::Finished => {
            send(ToFeeder::Bye);
            drop(frames_tx);
            match tokio::time::timeout(BYE_TIMEOUT, &mut writer).await {
                Ok(Ok(Ok(()))) => debug!("said bye to the feeder"),
                Ok(Ok(Err(err))) => debug!(cause = %err, "could not say bye to the feeder"),
                Ok(Err(_)) => {}
                Err(_) => {
                    writer.abort();
                    debug!("the feeder does not read: bye not sent");
                }
            }
        }
        SessionEnd::Lost(_) => {
            writer.abort();
            runner.report.lost += queued.len() as u64;
        }
    }
    end
}

/// A broken link ends the session: lost, or finished when we were
/// draining anyway.
fn lost_or_finished(draining: bool, cause: String) -> SessionEnd {
    if draining {
        debug!(cause = %cause, "connection ended while draining");
        SessionEnd::Finished
    } else {
        SessionEnd::Lost(cause)
    }
}

/// serde's complaint about a payload that does not fit the job type, as
/// it reads for a payload decoded from a JSON value: without the position
/// in the payload's text (the same reason whichever way the payload came).
fn payload_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    if err.line() == 0 {
        return text;
    }
    let position = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&position) {
        Some(message) => message.to_string(),
        None => text,
    }
}

/// Hands back every job not started.
fn release_all<J, F>(
    queued: &mut VecDeque<Queued<J>>,
    runner: &mut Runner<J, F>,
    send: &impl Fn(ToFeeder),
) {
    for job in queued.drain(..) {
        send(ToFeeder::Release { lease: job.lease });
        runner.report.released += 1;
    }
}

/// Sleeps until `deadline`, forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl fmt::Display for ConsumerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} done, {} retried, {} dead, {} released, {} lost",
            self.done, self.retried, self.dead, self.released, self.lost
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::queue::JobPayload;
    use crate::protocol::Connection;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    pub(crate) const SECRET: &str = "s3cret";
    /// Longest wait for anything in these tests.
    const WAIT: Duration = Duration::from_secs(10);

    /// The feeder's end of a connection.
    pub(crate) type FeederConn = Connection<TcpStream>;

    /// A feeder on 127.0.0.1 scripted by the test.
    pub(crate) struct FakeFeeder {
        listener: TcpListener,
        secret: String,
    }

    impl FakeFeeder {
        pub(crate) async fn bind(secret: &str) -> (FakeFeeder, String) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let feeder = FakeFeeder {
                listener,
                secret: secret.to_string(),
            };
            (feeder, addr)
        }

        /// The next connection, before any handshake.
        pub(crate) async fn accept_raw(&self) -> FeederConn {
            let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
                .await
                .expect("a consumer connects")
                .unwrap();
            Connection::new(stream)
        }

        /// The next connection after an honest handshake (Refused when the
        /// consumer's proof is wrong); returns it and the consumer's hello.
        pub(crate) async fn accept(&self) -> (FeederConn, ToFeeder) {
            let mut conn = self.accept_raw().await;
            let nonce = random_hex(16).unwrap();
            conn.write_frame(&ToConsumer::Challenge {
                version: PROTOCOL_VERSION,
                nonce: nonce.clone(),
            })
            .await
            .unwrap();
            let hello = recv(&mut conn).await.expect("a hello");
            let ToFeeder::Hello {
                proof: their_proof,
                nonce: their_nonce,
                ..
            } = &hello
            else {
                panic!("expected a hello, got {hello:?}");
            };
            let answer = if verify(&self.secret, &nonce, their_proof) {
                ToConsumer::Welcome {
                    proof: proof(&self.secret, their_nonce),
                    lease: Duration::from_secs(30),
                    settles: false,
                    extends: false,
                    meta: false,
                }
            } else {
                ToConsumer::Refused {
                    reason: "bad proof".into(),
                }
            };
            conn.write_frame(&answer).await.unwrap();
            (conn, hello)
        }
    }

    /// The next frame from the consumer that is not a heartbeat; `None`
    /// at the end of the stream.
    pub(crate) async fn recv(conn: &mut FeederConn) -> Option<ToFeeder> {
        loop {
            let frame = tokio::time::timeout(WAIT, conn.read_frame::<ToFeeder>())
                .await
                .expect("a frame from the consumer in time");
            match frame {
                Ok(Some(ToFeeder::Heartbeat)) => continue,
                Ok(other) => return other,
                // A reset counts as the end here.
                Err(_) => return None,
            }
        }
    }

    pub(crate) async fn send_job(conn: &mut FeederConn, lease: u64, payload: serde_json::Value) {
        conn.write_frame(&ToConsumer::Job {
            lease,
            id: lease * 100,
            attempt: 1,
            payload: JobPayload::encode(&payload).unwrap(),
        })
        .await
        .unwrap();
    }

    type Consumer = JoinHandle<Result<ConsumerReport, ConsumerError>>;

    fn spawn_consumer<J, F, Fut>(
        addr: &str,
        secret: &str,
        options: ConsumerOptions,
        run: F,
        shutdown: &CancellationToken,
    ) -> Consumer
    where
        J: DeserializeOwned + Send + 'static,
        F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let addr = addr.to_string();
        let secret = secret.to_string();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            consume(&addr, &secret, "jobs/3@localhost", options, run, shutdown).await
        })
    }

    async fn finished(consumer: Consumer) -> Result<ConsumerReport, ConsumerError> {
        tokio::time::timeout(WAIT, consumer)
            .await
            .expect("the consumer ends in time")
            .unwrap()
    }

    async fn drain_and_bye(conn: &mut FeederConn) {
        conn.write_frame(&ToConsumer::Drain).await.unwrap();
        assert_eq!(recv(conn).await, Some(ToFeeder::Bye));
        assert_eq!(recv(conn).await, None);
    }

    async fn done(_job: serde_json::Value, _info: JobInfo) -> Outcome {
        Outcome::Done
    }

    #[test]
    fn consume_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let future = consume(
            "127.0.0.1:1",
            SECRET,
            "n",
            ConsumerOptions::default(),
            done,
            CancellationToken::new(),
        );
        assert_send(&future);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(
            first >= Duration::from_millis(75) && first <= Duration::from_millis(125),
            "{first:?}"
        );
        let second = backoff.next_delay();
        assert!(second >= Duration::from_millis(150), "{second:?}");
        for _ in 0..20 {
            assert!(backoff.next_delay() <= RECONNECT_MAX);
        }
        assert!(backoff.next_delay() >= RECONNECT_MAX.mul_f64(0.75));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }

    #[tokio::test]
    async fn handshake_grants_the_credits_and_drain_says_bye() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(2, 5), done, &shutdown);
        let (mut conn, hello) = feeder.accept().await;
        let ToFeeder::Hello { version, name, .. } = hello else {
            unreachable!()
        };
        assert_eq!(
            (version, name.as_str()),
            (PROTOCOL_VERSION, "jobs/3@localhost")
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 5 }));
        drain_and_bye(&mut conn).await;
        let report = finished(consumer).await.unwrap();
        assert_eq!(report.connections, 1);
        assert_eq!(report.done, 0);
    }

    #[tokio::test]
    async fn credits_are_at_least_the_concurrency() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(3, 1), done, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 3 }));
        shutdown.cancel();
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
        finished(consumer).await.unwrap();
    }

    #[tokio::test]
    async fn a_feeder_refusing_our_proof_is_a_permanent_error() {
        let (feeder, addr) = FakeFeeder::bind("another secret").await;
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&ran);
        let run = move |_: serde_json::Value, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Outcome::Done }
        };
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), run, &shutdown);
        let (_conn, _) = feeder.accept().await;
        let err = finished(consumer).await.unwrap_err();
        assert!(
            matches!(&err, ConsumerError::Refused { reason, .. } if reason == "bad proof"),
            "{err}"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_feeder_without_the_secret_is_refused() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&ran);
        let run = move |_: serde_json::Value, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Outcome::Done }
        };
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), run, &shutdown);

        // An impostor: welcomes anyone, proves with the wrong secret, and
        // sends a job right away.
        let mut conn = feeder.accept_raw().await;
        conn.write_frame(&ToConsumer::Challenge {
            version: PROTOCOL_VERSION,
            nonce: "abcd".into(),
        })
        .await
        .unwrap();
        let Some(ToFeeder::Hello { nonce, .. }) = recv(&mut conn).await else {
            panic!("expected a hello")
        };
        conn.write_frame(&ToConsumer::Welcome {
            proof: proof("not the secret", &nonce),
            lease: Duration::from_secs(30),
            settles: false,
            extends: false,
            meta: false,
        })
        .await
        .unwrap();
        send_job(&mut conn, 1, serde_json::json!("payload")).await;

        let err = finished(consumer).await.unwrap_err();
        assert!(matches!(err, ConsumerError::Impostor { .. }), "{err}");
        assert_eq!(recv(&mut conn).await, None, "no credit, the link is closed");
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn concurrency_is_respected_and_credits_come_back_per_job() {
        const JOBS: u64 = 12;
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let now = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (now_in, max_in) = (Arc::clone(&now), Arc::clone(&max));
        let run = move |_: u64, _| {
            let (now, max) = (Arc::clone(&now_in), Arc::clone(&max_in));
            async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Outcome::Done
            }
        };
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(2, 4), run, &shutdown);
        let (mut conn, _) = feeder.accept().await;

        let (mut credit, mut granted, mut sent, mut acked) = (0u32, 0u32, 0u64, 0u64);
        while acked < JOBS {
            while credit > 0 && sent < JOBS {
                sent += 1;
                send_job(&mut conn, sent, serde_json::json!(sent)).await;
                credit -= 1;
            }
            match recv(&mut conn).await {
                Some(ToFeeder::Credit { n }) => {
                    credit += n;
                    granted += n;
                }
                Some(ToFeeder::Ack { .. }) => acked += 1,
                other => panic!("unexpected {other:?}"),
            }
            assert!(
                u64::from(granted) <= 4 + acked,
                "credits only come back for jobs done"
            );
        }
        conn.write_frame(&ToConsumer::Drain).await.unwrap();
        loop {
            match recv(&mut conn).await {
                Some(ToFeeder::Credit { n }) => granted += n,
                Some(ToFeeder::Bye) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(granted, 4 + 12);
        assert_eq!(max.load(Ordering::SeqCst), 2);
        let report = finished(consumer).await.unwrap();
        assert_eq!(report.done, JOBS);
    }

    #[tokio::test]
    async fn outcomes_are_mapped() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let run = |job: String, _info: JobInfo| async move {
            match job.as_str() {
                "ack" => Outcome::Done,
                "retry" => Outcome::Retry(Some(Duration::from_millis(250))),
                "dead" => Outcome::Dead("nope".into()),
                _ => panic!("boom {}", 7),
            }
        };
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 5), run, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 5 }));
        for (lease, payload) in [
            (1, serde_json::json!("ack")),
            (2, serde_json::json!("retry")),
            (3, serde_json::json!("dead")),
            (4, serde_json::json!("panic")),
            (5, serde_json::json!(42)),
        ] {
            send_job(&mut conn, lease, payload).await;
        }
        let mut outcomes = HashMap::new();
        let mut credits = 0;
        while outcomes.len() < 5 || credits < 5 {
            let frame = recv(&mut conn).await.expect("a frame");
            match &frame {
                ToFeeder::Credit { n } => credits += n,
                ToFeeder::Ack { lease, .. }
                | ToFeeder::Retry { lease, .. }
                | ToFeeder::Dead { lease, .. } => {
                    outcomes.insert(*lease, frame.clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(credits, 5, "one credit back per job");
        assert_eq!(
            outcomes[&1],
            ToFeeder::Ack {
                lease: 1,
                meta: None
            }
        );
        assert!(
            matches!(&outcomes[&2], ToFeeder::Retry { delay: Some(d), .. } if *d == Duration::from_millis(250)),
            "{:?}",
            outcomes[&2]
        );
        assert_eq!(
            outcomes[&3],
            ToFeeder::Dead {
                lease: 3,
                reason: "nope".into(),
                meta: None
            }
        );
        assert!(
            matches!(&outcomes[&4], ToFeeder::Retry { delay: None, reason, .. } if reason.contains("boom 7")),
            "a panic is a retry with its text: {:?}",
            outcomes[&4]
        );
        assert!(
            matches!(&outcomes[&5], ToFeeder::Dead { reason, .. } if reason == "bad payload: invalid type: integer `42`, expected a string"),
            "a bad payload is dead with serde's error: {:?}",
            outcomes[&5]
        );
        drain_and_bye(&mut conn).await;
        let report = finished(consumer).await.unwrap();
        assert_eq!((report.done, report.retried, report.dead), (1, 2, 2));
    }

    /// A run function for jobs named by their payload: `"slow"` sleeps
    /// `slow`, and each start is told on `started_tx`.
    fn scripted(
        slow: Duration,
    ) -> (
        impl Fn(String, JobInfo) -> futures::future::BoxFuture<'static, Outcome> + Send + Sync + 'static,
        mpsc::UnboundedReceiver<u64>,
    ) {
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let run = move |job: String, info: JobInfo| {
            let _ = started_tx.send(info.id);
            async move {
                if job == "slow" {
                    tokio::time::sleep(slow).await;
                }
                Outcome::Done
            }
            .boxed()
        };
        (run, started_rx)
    }

    async fn started(started_rx: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
        tokio::time::timeout(WAIT, started_rx.recv())
            .await
            .expect("a job starts in time")
            .expect("the consumer is alive")
    }

    #[tokio::test]
    async fn reconnects_after_the_feeder_closes() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), done, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        send_job(&mut conn, 1, serde_json::json!("x")).await;
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Ack {
                lease: 1,
                meta: None
            })
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        drop(conn);

        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        send_job(&mut conn, 7, serde_json::json!("y")).await;
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Ack {
                lease: 7,
                meta: None
            })
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        drain_and_bye(&mut conn).await;
        let report = finished(consumer).await.unwrap();
        assert_eq!((report.connections, report.done, report.lost), (2, 2, 0));
    }

    #[tokio::test]
    async fn outcomes_of_a_lost_connection_are_not_sent_on_the_next() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let (run, mut started_rx) = scripted(Duration::from_millis(600));
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 2), run, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 2 }));
        send_job(&mut conn, 1, serde_json::json!("slow")).await;
        send_job(&mut conn, 2, serde_json::json!("fast")).await;
        assert_eq!(started(&mut started_rx).await, 100);
        drop(conn);

        // The slow job still runs and holds its slot: one credit now, one
        // more when it ends, and never its outcome.
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        send_job(&mut conn, 3, serde_json::json!("fast")).await;
        assert_eq!(started(&mut started_rx).await, 300);
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Ack {
                lease: 3,
                meta: None
            })
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        drain_and_bye(&mut conn).await;
        let report = finished(consumer).await.unwrap();
        // Job 1 finished unreported, job 2 was dropped unstarted.
        assert_eq!((report.done, report.lost, report.connections), (1, 2, 2));
        assert!(started_rx.try_recv().is_err(), "job 2 never ran");
    }

    #[tokio::test]
    async fn drain_finishes_running_jobs_and_releases_the_rest() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let (run, mut started_rx) = scripted(Duration::from_millis(200));
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 3), run, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 3 }));
        send_job(&mut conn, 1, serde_json::json!("slow")).await;
        send_job(&mut conn, 2, serde_json::json!("fast")).await;
        send_job(&mut conn, 3, serde_json::json!("fast")).await;
        assert_eq!(started(&mut started_rx).await, 100);
        conn.write_frame(&ToConsumer::Drain).await.unwrap();
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 2 }));
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 3 }));
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Ack {
                lease: 1,
                meta: None
            })
        );
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Bye),
            "no credit while draining"
        );
        assert_eq!(recv(&mut conn).await, None);
        let report = finished(consumer).await.unwrap();
        assert_eq!((report.done, report.released, report.lost), (1, 2, 0));
        assert!(started_rx.try_recv().is_err(), "released jobs never ran");
    }

    #[tokio::test]
    async fn shutdown_drains_too() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let (run, mut started_rx) = scripted(Duration::from_millis(200));
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 2), run, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 2 }));
        send_job(&mut conn, 1, serde_json::json!("slow")).await;
        send_job(&mut conn, 2, serde_json::json!("fast")).await;
        assert_eq!(started(&mut started_rx).await, 100);
        shutdown.cancel();
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 2 }));
        assert_eq!(
            recv(&mut conn).await,
            Some(ToFeeder::Ack {
                lease: 1,
                meta: None
            })
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
        let report = finished(consumer).await.unwrap();
        assert_eq!((report.done, report.released), (1, 1));
    }

    #[tokio::test]
    async fn jobs_past_the_grace_are_reported_as_retries() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let (run, mut started_rx) = scripted(Duration::from_secs(3600));
        let shutdown = CancellationToken::new();
        let options = ConsumerOptions::new(1, 1).with_grace(Duration::from_millis(100));
        let consumer = spawn_consumer(&addr, SECRET, options, run, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        send_job(&mut conn, 1, serde_json::json!("slow")).await;
        assert_eq!(started(&mut started_rx).await, 100);
        conn.write_frame(&ToConsumer::Drain).await.unwrap();
        let frame = recv(&mut conn).await;
        assert!(
            matches!(&frame, Some(ToFeeder::Retry { lease: 1, reason, .. }) if reason.contains("grace")),
            "{frame:?}"
        );
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
        let report = finished(consumer).await.unwrap();
        assert_eq!((report.retried, report.interrupted, report.done), (1, 1, 0));
    }

    #[tokio::test]
    async fn a_silent_feeder_is_lost_and_reconnected() {
        let (feeder, addr) = FakeFeeder::bind(SECRET).await;
        let shutdown = CancellationToken::new();
        let mut options = ConsumerOptions::new(1, 1);
        options.heartbeat = Duration::from_millis(50);
        options.silence = Duration::from_millis(300);
        let consumer = spawn_consumer(&addr, SECRET, options, done, &shutdown);
        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        // Heartbeats come, and we answer none: the consumer hangs up.
        let mut heartbeats = 0;
        loop {
            match tokio::time::timeout(WAIT, conn.read_frame::<ToFeeder>()).await {
                Ok(Ok(Some(ToFeeder::Heartbeat))) => heartbeats += 1,
                Ok(Ok(None)) | Ok(Err(_)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(heartbeats >= 2, "{heartbeats} heartbeats");

        let (mut conn, _) = feeder.accept().await;
        assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
        drain_and_bye(&mut conn).await;
        assert_eq!(finished(consumer).await.unwrap().connections, 2);
    }

    #[tokio::test]
    async fn an_unreachable_feeder_is_retried_until_shutdown() {
        // A port nobody listens on.
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), done, &shutdown);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!consumer.is_finished());
        shutdown.cancel();
        let report = finished(consumer).await.unwrap();
        assert_eq!(report.connections, 0);
    }

    #[tokio::test]
    async fn a_malformed_address_is_an_error() {
        let shutdown = CancellationToken::new();
        let consumer = spawn_consumer(
            "no port here",
            SECRET,
            ConsumerOptions::new(1, 1),
            done,
            &shutdown,
        );
        let err = finished(consumer).await.unwrap_err();
        assert!(matches!(err, ConsumerError::Address { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn works_with_the_real_server() {
        use crate::protocol::slave::QueueSettings;
        use crate::queue::{Feeder, Next};
        use std::sync::Mutex;

        struct Numbers {
            next: u64,
            succeeded: Arc<Mutex<Vec<u64>>>,
        }
        impl Feeder for Numbers {
            type Job = u64;
            fn next(&mut self) -> Next<u64> {
                if self.next > 60 {
                    return Next::Done;
                }
                self.next += 1;
                Next::Job(self.next - 1)
            }
            fn success(&mut self, job: u64) {
                self.succeeded.lock().unwrap().push(job);
            }
            fn error(&mut self, job: u64, reason: &str) {
                panic!("job {job} dead: {reason}");
            }
        }

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let succeeded = Arc::new(Mutex::new(Vec::new()));
        let settings = QueueSettings {
            lease: Duration::from_secs(30),
            max_attempts: 3,
            retry: crate::retry::RetryPolicy::schedule([Duration::ZERO, Duration::ZERO]),
            rate: None,
            progress_every: Duration::ZERO,
            joblog: None,
        };
        let server = tokio::spawn(crate::queue::server::serve(
            listener,
            Numbers {
                next: 1,
                succeeded: Arc::clone(&succeeded),
            },
            SECRET.to_string(),
            settings,
            None,
            CancellationToken::new(),
        ));
        // Every 7th job fails its first attempt; every 10th panics on it.
        let run = |n: u64, info: JobInfo| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if info.attempt == 1 && n % 10 == 0 {
                panic!("job {n} panics");
            }
            if info.attempt == 1 && n % 7 == 0 {
                return Outcome::Retry(Some(Duration::ZERO));
            }
            Outcome::Done
        };
        let shutdown = CancellationToken::new();
        let consumers: Vec<_> = (0..3)
            .map(|_| spawn_consumer(&addr, SECRET, ConsumerOptions::new(4, 8), run, &shutdown))
            .collect();
        let report = tokio::time::timeout(WAIT, server)
            .await
            .expect("the server finishes")
            .unwrap()
            .unwrap();
        assert!(report.finished, "{report:?}");
        let mut done = 0;
        for consumer in consumers {
            let report = finished(consumer).await.unwrap();
            done += report.done;
            assert_eq!(report.lost, 0, "{report:?}");
        }
        assert_eq!(done, 60);
        let mut succeeded = succeeded.lock().unwrap().clone();
        succeeded.sort_unstable();
        assert_eq!(succeeded, (1..=60).collect::<Vec<_>>());
    }
}
