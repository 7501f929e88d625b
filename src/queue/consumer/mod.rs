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
//!
//! The files: this one has the options, results and errors, and
//! [`consume`] with its reconnect loop and backoff; `link.rs` the
//! connection (connect, handshake, the frame reader and the writer task);
//! `session.rs` one connection's life (credits, jobs, outcomes,
//! heartbeats, drain); `runner.rs` the jobs' tasks and the outcome of each
//! run.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::protocol::queue::ToFeeder;
use crate::retry::Outcome;
// Names the docs link to.
#[cfg(doc)]
use crate::protocol::{queue::ToConsumer, PROTOCOL_VERSION};

use self::link::{connect, Attempt};
use self::runner::Runner;
use self::session::{session, SessionEnd};

mod link;
mod runner;
mod session;

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
    /// NATS refused us (credentials): retrying cannot help.
    #[cfg(feature = "nats")]
    #[error(transparent)]
    Nats(crate::queue::nats::NatsError),
    /// The group's queue is on JetStream and this program was built
    /// without taskherd's `nats` feature.
    #[error(
        "the queue group is on NATS JetStream: build this program with taskherd's `nats` feature"
    )]
    NoNats,
}

/// Where a consumer's jobs come from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum JobSource {
    /// The group's feeder at `address` (`host:port`), to whom we prove
    /// the per-run `secret`.
    Feeder {
        /// The feeder's address.
        address: String,
        /// The per-run secret.
        secret: String,
    },
    /// The group's queue on NATS JetStream.
    #[cfg(feature = "nats")]
    JetStream(std::sync::Arc<crate::protocol::slave::JetStreamQueue>),
}

impl fmt::Display for JobSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobSource::Feeder { address, .. } => f.write_str(address),
            #[cfg(feature = "nats")]
            JobSource::JetStream(queue) => write!(
                f,
                "{} stream {}",
                crate::queue::nats::servers_text(&queue.servers),
                queue.stream
            ),
        }
    }
}

/// What a source keeps across its sessions.
#[derive(Default)]
struct SourceState {
    /// The NATS connection, made once.
    #[cfg(feature = "nats")]
    nats: Option<crate::queue::nats::bridge::Connection>,
}

impl JobSource {
    /// Connects (or opens a session of the JetStream bridge).
    async fn connect(&self, name: &str, state: &mut SourceState) -> Result<link::Link, Attempt> {
        #[cfg(not(feature = "nats"))]
        let SourceState {} = state;
        match self {
            JobSource::Feeder { address, secret } => connect(address, secret, name).await,
            #[cfg(feature = "nats")]
            JobSource::JetStream(queue) => {
                use crate::queue::nats::{bridge, NatsError};
                let classify = |err: NatsError| {
                    if err.is_transient() {
                        Attempt::Transient(err.to_string())
                    } else {
                        Attempt::Fatal(ConsumerError::Nats(err))
                    }
                };
                bridge::connection(queue, name, &mut state.nats)
                    .await
                    .map_err(classify)?;
                let Some(connection) = &state.nats else {
                    return Err(Attempt::Transient("no NATS connection".into()));
                };
                let (from_bridge, to_bridge, task) =
                    bridge::open(queue, connection).await.map_err(classify)?;
                Ok(link::Link {
                    feeder_rx: link::FeederRx::Local(from_bridge),
                    feeder_tx: link::FeederTx::Local(to_bridge, task),
                    lease: queue.settings.lease,
                    settles: false,
                    extends: true,
                    meta: false,
                })
            }
        }
    }
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
    let source = JobSource::Feeder {
        address: feeder_addr.to_string(),
        secret: secret.to_string(),
    };
    consume_from(&source, name, options, run, shutdown).await
}

/// [`consume`] from any [`JobSource`]: the group's feeder, or its
/// JetStream queue (feature `nats`), with the same rules and outcomes.
///
/// # Errors
/// As [`consume`]; on JetStream, credentials the server refuses
/// ([`ConsumerError::Nats`]). A server that is down or lost is waited
/// for (logged once per outage).
#[tracing::instrument(name = "consumer", skip_all, fields(feeder = %source, name = %name))]
pub async fn consume_from<J, F, Fut>(
    source: &JobSource,
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
    let mut state = SourceState::default();
    let mut runner = Runner::new(run, &options);
    let mut reconnects = Reconnects::default();
    // When the feeder became unreachable, so an outage is logged once.
    let mut outage: Option<Instant> = None;
    let mut stop = Stop::default();

    loop {
        let link = {
            let attempt = source.connect(name, &mut state);
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
                    let delay = reconnects.next_delay();
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
        reconnects.reset();
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

/// Connection backoff: the crate's one backoff, doubling from
/// [`RECONNECT_INITIAL`] to [`RECONNECT_MAX`], ±25 % jitter.
#[derive(Debug, Default)]
struct Reconnects {
    /// Failed attempts since the last connection: the backoff's step.
    failures: u32,
}

impl Reconnects {
    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.failures;
        self.failures = self.failures.saturating_add(1);
        Backoff::doubling(RECONNECT_INITIAL, RECONNECT_MAX, 0.25).delay(step, crate::random::unit())
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
pub(crate) mod tests;
