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
//!
//! The files: this one has the entry points and the core's loop (it only
//! waits, accepts and hands over); `conn.rs` the connection tasks
//! (accept, handshake, frames both ways); `core/` the core itself, a state
//! machine without I/O driven by events and time (`core/mod.rs`: its
//! state, deliveries and durability; `core/outcomes.rs`: what consumers'
//! frames do; `core/leases.rs`: the leases and their expiry index).

mod conn;
mod core;

use self::conn::{Acceptor, Tuning};
use self::core::{Core, End, Event};
use super::joblog::{Joblog, JoblogError, JOBLOG_CLOSE_TIMEOUT};
use super::peer_warnings::PeerWarnings;
use super::Feeder;
use crate::protocol::slave::{QueueProgress, QueueSettings};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

// Names the docs above link to.
#[cfg(doc)]
use {
    super::{governor::Governor, Next},
    crate::protocol::queue::{proof, ToConsumer, ToFeeder, FEATURE_EXTEND, FEATURE_SETTLED},
    crate::protocol::MAX_FRAME_LEN,
    crate::retry::RetryPolicy,
};

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
/// Time given to connection tasks to write their last frames at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
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
        let core = Core::new(self.feeder, self.settings, self.progress_tx, joblog, now);
        let report = drive(core, acceptor, event_rx, shutdown).await;
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

/// The core's loop: runs its turns, sleeps until its next wake, takes in
/// connections and frames, then ends it (see [`Core::end`]).
async fn drive<F: Feeder>(
    mut core: Core<F>,
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
        if core.turn(now, shutdown.is_cancelled()) {
            break;
        }
        let wake = core.next_wake(now, acceptor.paused_until);
        if armed != Some(wake) {
            sleep.as_mut().reset(wake);
            armed = Some(wake);
        }
        let draining = core.draining();
        let accepting = !draining && acceptor.ready(now);
        let holding = core.holding();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !draining => {}
            changed = core.synced_changed(), if holding => {
                if changed.is_err() {
                    core.writer_gone();
                }
            }
            accepted = acceptor.listener.accept(), if accepting => {
                acceptor.accepted(accepted, Instant::now());
            }
            _ = event_rx.recv_many(&mut events, EVENT_BATCH) => {
                let now = Instant::now();
                core.expire(now);
                for event in events.drain(..) {
                    core.handle(event, now);
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
            Ok(event) => core.handle(event, now),
            Err(_) => break,
        }
    }
    drop(event_rx);
    // Make the last outcomes durable (and confirm them) before leaving.
    core.flush(Instant::now());
    let _ = tokio::time::timeout(FINAL_SYNC_TIMEOUT, async {
        while core.holding() && core.durable() {
            if core.synced_changed().await.is_err() {
                break;
            }
            core.release_held(Instant::now());
        }
    })
    .await;
    let End {
        report,
        progress_tx,
        joblog,
    } = core.end(now);
    if let Some(progress_tx) = &progress_tx {
        let _ =
            tokio::time::timeout(FINAL_PROGRESS_TIMEOUT, progress_tx.send(report.progress)).await;
    }
    if let Some(joblog) = joblog {
        let closing = tokio::task::spawn_blocking(move || joblog.close());
        if tokio::time::timeout(JOBLOG_CLOSE_TIMEOUT, closing)
            .await
            .is_err()
        {
            warn!("the joblog's last lines were not written in time");
        }
    }
    // Dropping the core drops every consumer's channel: their tasks write
    // what is queued (Drain) and close.
    drop(core);
    report
}

#[cfg(test)]
mod tests;
