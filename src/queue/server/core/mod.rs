//! The queue core of the feeder server: a state machine that owns the
//! [`Feeder`] and every piece of state (ready and delayed jobs, leases,
//! consumers and their credits, attempts, counts, the [`Governor`]).
//!
//! It does no I/O of its own and works at the time it is given (it reads
//! only the wall clock, for retry schedules): connection tasks hand it
//! [`Event`]s, it answers by sending [`ToConsumer`] frames on each
//! consumer's channel (progress reports and joblog lines go out on
//! channels too), and the server's loop (`drive` in the parent module)
//! calls [`Core::turn`] with the time for the work that time brings (lease
//! expiries, retries coming due, deliveries, progress), sleeping until
//! [`Core::next_wake`] or a durable feeder's sync
//! ([`Core::synced_changed`]).

use self::leases::{Lease, Leases};
use super::super::governor::Governor;
use super::super::joblog::Joblog;
use super::super::{Feeder, Next};
use super::{ServeReport, MAX_DRAIN};
use crate::error_text::count;
use crate::protocol::queue::{JobPayload, ToConsumer, ToFeeder};
use crate::protocol::slave::{JobDurations, QueueProgress, QueueSettings};
use crate::protocol::MAX_FRAME_LEN;
use crate::retry::RetryPolicy;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod leases;
mod outcomes;

/// Room in a frame for everything of a job frame except its payload.
const JOB_FRAME_OVERHEAD: usize = 128;

/// Frames from connection tasks to the core.
#[derive(Debug)]
pub(super) enum Event {
    /// A consumer passed the handshake.
    Joined {
        /// The connection's number.
        conn: u64,
        /// `group/id@host`, from its Hello.
        name: String,
        /// Its address.
        peer: SocketAddr,
        /// It is sent [`ToConsumer::Settled`].
        settles: bool,
        /// What the core sends it.
        out_tx: mpsc::UnboundedSender<ToConsumer>,
    },
    /// A frame from a joined consumer (never Hello, Heartbeat or Bye).
    Frame {
        /// The connection's number.
        conn: u64,
        /// The frame.
        frame: ToFeeder,
    },
    /// A joined consumer is gone; its leases are lost.
    Left {
        /// The connection's number.
        conn: u64,
    },
}

/// What is left to do at the end of serving; see [`Core::end`].
pub(super) struct End {
    /// The final counts.
    pub(super) report: ServeReport,
    /// Where the last progress report goes.
    pub(super) progress_tx: Option<mpsc::Sender<QueueProgress>>,
    /// The joblog, to close.
    pub(super) joblog: Option<Joblog>,
}

/// A job taken from the feeder, until its final outcome.
struct JobEntry<J> {
    /// Handed back to the feeder with the final outcome.
    job: J,
    /// The job as JSON, encoded once.
    payload: JobPayload,
    /// Deliveries so far, released ones not counted.
    attempts: u32,
    /// Start of the first attempt, for [`RetryPolicy::next`].
    first_attempt_at: Option<SystemTime>,
    /// The consumer of its last delivery, for the joblog line of a lost
    /// lease (kept only with a joblog).
    holder: Option<Arc<str>>,
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
    out: ToConsumer,
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
    out_tx: mpsc::UnboundedSender<ToConsumer>,
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
    /// How long the done ones took.
    durations: JobDurations,
}

/// The queue core: owns the feeder and every piece of state.
pub(super) struct Core<F: Feeder> {
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
    /// A core serving `feeder`'s jobs per `settings`, sending progress
    /// reports to `progress_tx` and each outcome to `joblog`.
    pub(super) fn new(
        mut feeder: F,
        settings: QueueSettings,
        progress_tx: Option<mpsc::Sender<QueueProgress>>,
        joblog: Option<Joblog>,
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
            counts: Counts::default(),
            joblog,
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

    /// One turn of the loop: time-driven work, then deliveries (or the
    /// start of the drain, at `shutdown` or once finished), then the
    /// feeder's commit. `true` when the core is done: draining, and
    /// nothing leased any more or the drain's time is up.
    pub(super) fn turn(&mut self, now: Instant, shutdown: bool) -> bool {
        self.tick(now);
        if !self.draining {
            if shutdown {
                self.start_drain(now, "shutdown");
            } else {
                self.pump(now);
                if self.finished() {
                    self.start_drain(now, "finished");
                }
            }
        }
        self.flush(now);
        self.draining && (self.leases.is_empty() || self.drain_over(now))
    }

    /// Deliveries stopped: no new consumer is taken in.
    pub(super) fn draining(&self) -> bool {
        self.draining
    }

    /// Frames are held back for a durable feeder's sync.
    pub(super) fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Waits for a durable feeder's next sync (never, for other
    /// feeders); then [`release_held`](Self::release_held) sends what it
    /// made durable.
    ///
    /// # Errors
    /// The feeder's journal writer is gone: see
    /// [`writer_gone`](Self::writer_gone).
    pub(super) async fn synced_changed(&mut self) -> Result<(), watch::error::RecvError> {
        wait_synced(&mut self.synced_rx).await
    }

    /// The feeder's journal writer is gone: nothing more becomes durable.
    /// The frames held back are dropped; the drain deadline ends it.
    pub(super) fn writer_gone(&mut self) {
        self.synced_rx = None;
        warn!("the feeder's journal writer stopped: frames held back are dropped");
        self.held.clear();
    }

    /// The feeder keeps its changes on disk: frames wait for its syncs.
    pub(super) fn durable(&self) -> bool {
        self.synced_rx.is_some()
    }

    /// The end of serving: the final counts, and what the caller still has
    /// to do without holding up the core: send the last progress report,
    /// close the joblog.
    pub(super) fn end(&mut self, now: Instant) -> End {
        let progress = self.snapshot(now);
        if !self.leases.is_empty() {
            warn!(
                in_flight = self.leases.len(),
                "stopping with jobs still leased: they count as not done"
            );
        }
        End {
            report: ServeReport {
                finished: self.finished(),
                progress,
                unfinished: self.jobs.len() as u64,
            },
            progress_tx: self.progress_tx.clone(),
            joblog: self.joblog.take(),
        }
    }

    fn finished(&self) -> bool {
        self.source == Source::Done && self.jobs.is_empty()
    }

    fn drain_over(&self, now: Instant) -> bool {
        self.drain_deadline.is_some_and(|deadline| now >= deadline)
    }

    /// The earliest time the core has something to do without a frame.
    pub(super) fn next_wake(&self, now: Instant, paused_until: Option<Instant>) -> Instant {
        let mut wake = after(now, Duration::from_secs(3600));
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = wake.min(at);
            }
        };
        consider(self.leases.first_expiry());
        consider(self.next_progress);
        consider(paused_until.filter(|until| *until > now));
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
    pub(super) fn expire(&mut self, now: Instant) {
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
            durations: self.counts.durations,
        }
    }

    fn start_drain(&mut self, now: Instant, why: &'static str) {
        self.draining = true;
        self.drain_deadline = Some(after(now, self.lease_time.min(MAX_DRAIN)));
        for consumer in self.consumers.values() {
            let _ = consumer.out_tx.send(ToConsumer::Drain);
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
                granted: now,
            },
        );
        consumer.credit -= 1;
        consumer.held += 1;
        if self.joblog.is_some() {
            entry.holder = Some(Arc::clone(&consumer.name));
        }
        self.feeder.attempt(&entry.job);
        let out = ToConsumer::Job {
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
    pub(super) fn flush(&mut self, now: Instant) {
        if self.synced_rx.is_none() {
            return;
        }
        for (conn, leases) in self.settled.drain() {
            self.held.push_back(Held {
                seq: UNSEALED,
                conn,
                out: ToConsumer::Settled { leases },
            });
        }
        let seq = self.feeder.commit();
        for held in self.held.iter_mut().rev() {
            if held.seq != UNSEALED {
                break;
            }
            held.seq = seq;
        }
        self.release_held(now);
    }

    /// Sends the held frames whose commit is durable; the leases of the
    /// jobs among them start `now`.
    pub(super) fn release_held(&mut self, now: Instant) {
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
            if let ToConsumer::Job { lease, .. } = &held.out {
                self.leases.set_expiry(*lease, after(now, self.lease_time));
            }
            if let Some(consumer) = self.consumers.get(&held.conn) {
                let _ = consumer.out_tx.send(held.out);
            }
        }
    }

    pub(super) fn handle(&mut self, event: Event, now: Instant) {
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
                    let _ = out_tx.send(ToConsumer::Drain);
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
pub(super) fn encode_payload<J: serde::Serialize>(job: &J) -> Result<JobPayload, String> {
    let payload = JobPayload::encode(job).map_err(|err| format!("cannot encode the job: {err}"))?;
    let len = payload.get().len();
    if len > MAX_FRAME_LEN - JOB_FRAME_OVERHEAD {
        return Err(format!(
            "job too big to send ({len} bytes, limit {})",
            MAX_FRAME_LEN - JOB_FRAME_OVERHEAD
        ));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::slave::JOB_DURATION_BOUNDS;
    use crate::queue::server::tests::{settings, DurableFeeder, Log, TestFeeder};
    use std::sync::Mutex;

    /// The core alone, with one consumer (conn 1) that got jobs 1 and 2
    /// at `start` (leases 1 and 2), and what it is sent.
    fn core_with_two_leases(
        lease: Duration,
        start: Instant,
    ) -> (
        Core<TestFeeder>,
        mpsc::UnboundedReceiver<ToConsumer>,
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
        let mut core = Core::new(feeder, settings, None, None, start);
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
            core.leases.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
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
        assert_eq!(core.leases.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1]);
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
        assert_eq!(core.leases.index_len(), 0, "the index follows the leases");
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
        assert_eq!(core.leases.index_len(), 1);
        core.handle(Event::Left { conn: 1 }, start);
        assert!(core.leases.is_empty() && core.leases.index_len() == 0);
        assert_eq!(log.lock().unwrap().successes, [2]);
    }

    #[test]
    fn jobs_that_cannot_be_sent_are_refused() {
        let mut map = HashMap::new();
        map.insert((1u8, 2u8), 3u8);
        assert!(encode_payload(&map).is_err());
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(encode_payload(&big).unwrap_err().contains("too big"));
    }

    // ---- The core driven by events and time, without sockets or runtime.

    const SECOND: Duration = Duration::from_secs(1);

    /// A job as a consumer got it.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Sent {
        lease: u64,
        id: u64,
        attempt: u32,
        payload: u32,
    }

    /// A core serving `jobs` (then Done) with `settings`, and what its
    /// feeder is told.
    fn core_of(
        jobs: impl IntoIterator<Item = u32>,
        settings: QueueSettings,
        start: Instant,
    ) -> (Core<TestFeeder>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let feeder = TestFeeder {
            queue: Arc::new(Mutex::new(jobs.into_iter().collect())),
            done_when_empty: true,
            recheck: SECOND,
            log: Arc::clone(&log),
            own_retry: None,
        };
        (Core::new(feeder, settings, None, None, start), log)
    }

    /// Consumer `conn` joins and grants `credit`; its outbox.
    fn join<F: Feeder>(
        core: &mut Core<F>,
        conn: u64,
        credit: u32,
        now: Instant,
    ) -> mpsc::UnboundedReceiver<ToConsumer> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        core.handle(
            Event::Joined {
                conn,
                name: format!("test/{conn}@here"),
                peer: SocketAddr::from(([127, 0, 0, 1], 40_000 + conn as u16)),
                settles: true,
                out_tx,
            },
            now,
        );
        if credit > 0 {
            send(core, conn, ToFeeder::Credit { n: credit }, now);
        }
        out_rx
    }

    /// A frame from consumer `conn`.
    fn send<F: Feeder>(core: &mut Core<F>, conn: u64, frame: ToFeeder, now: Instant) {
        core.handle(Event::Frame { conn, frame }, now);
    }

    fn ack(lease: u64) -> ToFeeder {
        ToFeeder::Ack { lease, meta: None }
    }

    /// Everything sent to a consumer since the last look; jobs with their
    /// payload decoded.
    fn sent(out_rx: &mut mpsc::UnboundedReceiver<ToConsumer>) -> Vec<Result<Sent, ToConsumer>> {
        std::iter::from_fn(|| out_rx.try_recv().ok())
            .map(|out| match out {
                ToConsumer::Job {
                    lease,
                    id,
                    attempt,
                    payload,
                } => Ok(Sent {
                    lease,
                    id,
                    attempt,
                    payload: payload.decode().expect("a number"),
                }),
                frame => Err(frame),
            })
            .collect()
    }

    /// The jobs sent to a consumer since the last look (nothing else may
    /// have been sent).
    fn jobs(out_rx: &mut mpsc::UnboundedReceiver<ToConsumer>) -> Vec<Sent> {
        sent(out_rx)
            .into_iter()
            .map(|sent| sent.unwrap_or_else(|frame| panic!("expected a job, got {frame:?}")))
            .collect()
    }

    fn payloads(jobs: &[Sent]) -> Vec<u32> {
        jobs.iter().map(|job| job.payload).collect()
    }

    #[test]
    fn a_consumer_joining_with_credits_is_served_that_many_jobs() {
        let start = Instant::now();
        let (mut core, log) = core_of([10, 20, 30], settings(), start);
        let mut out_rx = join(&mut core, 1, 2, start);
        assert!(!core.turn(start, false));
        let got = jobs(&mut out_rx);
        assert_eq!(
            got,
            [
                Sent {
                    lease: 1,
                    id: 1,
                    attempt: 1,
                    payload: 10
                },
                Sent {
                    lease: 2,
                    id: 2,
                    attempt: 1,
                    payload: 20
                },
            ]
        );
        assert_eq!(
            log.lock().unwrap().nexts,
            2,
            "nothing pulled beyond the credits"
        );
        // Without credit nothing more goes out, turn after turn.
        assert!(!core.turn(start + SECOND, false));
        assert!(jobs(&mut out_rx).is_empty());
        // An outcome does not give the credit back; a Credit does.
        send(&mut core, 1, ack(1), start + SECOND);
        assert!(!core.turn(start + SECOND, false));
        assert!(jobs(&mut out_rx).is_empty());
        send(&mut core, 1, ToFeeder::Credit { n: 1 }, start + SECOND);
        core.turn(start + SECOND, false);
        assert_eq!(payloads(&jobs(&mut out_rx)), [30]);
        let progress = core.snapshot(start + SECOND);
        assert_eq!((progress.done, progress.in_flight), (1, 2));
        assert_eq!(progress.consumers, 1);
        // The job done took a second, from its lease to its ack.
        assert_eq!(progress.durations.count(), 1);
        let one_second = JOB_DURATION_BOUNDS
            .iter()
            .position(|bound| *bound == 1.0)
            .expect("a bound of 1 s");
        assert_eq!(progress.durations.buckets[one_second], 1);
        assert!((progress.durations.sum_seconds - 1.0).abs() < 1e-9);
    }

    #[test]
    fn an_ack_calls_success_once_and_a_second_one_is_stale() {
        let start = Instant::now();
        let (mut core, log) = core_of([7], settings(), start);
        let mut out_rx = join(&mut core, 1, 1, start);
        core.turn(start, false);
        let [job] = jobs(&mut out_rx)[..] else {
            panic!("one job")
        };
        send(&mut core, 1, ack(job.lease), start);
        send(&mut core, 1, ack(job.lease), start);
        // A lease that never was is stale too.
        send(&mut core, 1, ack(99), start);
        assert_eq!(
            sent(&mut out_rx),
            [
                Err(ToConsumer::Stale { lease: job.lease }),
                Err(ToConsumer::Stale { lease: 99 })
            ]
        );
        assert_eq!(log.lock().unwrap().successes, [7]);
        assert_eq!(core.snapshot(start).done, 1, "counted once");
    }

    #[test]
    fn a_retry_waits_its_delay_then_the_job_is_served_again() {
        let start = Instant::now();
        let (mut core, log) = core_of([5], settings(), start);
        let mut out_rx = join(&mut core, 1, 2, start);
        core.turn(start, false);
        let [first] = jobs(&mut out_rx)[..] else {
            panic!("one job")
        };
        let delay = Duration::from_millis(40);
        let retry = ToFeeder::Retry {
            lease: first.lease,
            delay: Some(delay),
            reason: "busy".into(),
            meta: None,
        };
        send(&mut core, 1, retry, start);
        core.turn(start, false);
        assert!(jobs(&mut out_rx).is_empty(), "not before its delay");
        // The policy (10 ms doubling, jitter 0) honours the 40 ms asked.
        let wake = core.next_wake(start, None);
        assert!(wake > start && wake <= start + delay, "{wake:?}");
        core.turn(start + delay, false);
        let [again] = jobs(&mut out_rx)[..] else {
            panic!("the job again")
        };
        assert_eq!((again.id, again.attempt, again.payload), (first.id, 2, 5));
        assert_ne!(again.lease, first.lease);
        send(&mut core, 1, ack(again.lease), start + delay);
        let progress = core.snapshot(start + delay);
        assert_eq!(
            (
                progress.done,
                progress.failed,
                progress.retried,
                progress.dead
            ),
            (1, 1, 1, 0)
        );
        assert_eq!(log.lock().unwrap().successes, [5]);
    }

    #[test]
    fn an_expired_lease_is_served_again_and_its_late_outcome_is_stale() {
        let start = Instant::now();
        let lease = 10 * SECOND;
        let settings = QueueSettings {
            lease,
            ..settings()
        };
        let (mut core, log) = core_of([1, 2], settings, start);
        let mut a = join(&mut core, 1, 1, start);
        core.turn(start, false);
        let [first] = jobs(&mut a)[..] else {
            panic!("one job")
        };
        let mut b = join(&mut core, 2, 1, start);
        core.turn(start, false);
        let [second] = jobs(&mut b)[..] else {
            panic!("one job")
        };
        assert_eq!(core.next_wake(start, None), start + lease);
        // B still works on its job: its lease starts again.
        send(
            &mut core,
            2,
            ToFeeder::Extend {
                lease: second.lease,
            },
            start + SECOND,
        );
        assert!(!core.turn(start + lease, false));
        // A's lease is over: its job goes to the front, for the next
        // consumer with credit.
        assert!(jobs(&mut a).is_empty());
        send(&mut core, 2, ToFeeder::Credit { n: 1 }, start + lease);
        core.turn(start + lease, false);
        let [again] = jobs(&mut b)[..] else {
            panic!("A's job")
        };
        assert_eq!((again.id, again.attempt), (first.id, 2));
        // A's answer comes too late.
        send(&mut core, 1, ack(first.lease), start + lease);
        assert_eq!(
            sent(&mut a),
            [Err(ToConsumer::Stale { lease: first.lease })]
        );
        send(&mut core, 2, ack(again.lease), start + lease);
        send(&mut core, 2, ack(second.lease), start + lease);
        assert_eq!(log.lock().unwrap().successes, [1, 2]);
        let progress = core.snapshot(start + lease);
        assert_eq!(
            (progress.done, progress.failed, progress.retried),
            (2, 1, 1)
        );
    }

    #[test]
    fn a_consumer_leaving_with_jobs_in_flight_has_them_served_again_in_order() {
        let start = Instant::now();
        let (mut core, log) = core_of([1, 2, 3, 4], settings(), start);
        let mut a = join(&mut core, 1, 3, start);
        let mut b = join(&mut core, 2, 0, start);
        core.turn(start, false);
        let held = jobs(&mut a);
        assert_eq!(payloads(&held), [1, 2, 3]);
        send(&mut core, 1, ack(held[1].lease), start);
        core.handle(Event::Left { conn: 1 }, start);
        send(&mut core, 2, ToFeeder::Credit { n: 3 }, start);
        core.turn(start, false);
        let again = jobs(&mut b);
        assert_eq!(payloads(&again), [1, 3, 4], "the lost ones first, in order");
        assert_eq!(
            again
                .iter()
                .map(|job| (job.id, job.attempt))
                .collect::<Vec<_>>(),
            [(held[0].id, 2), (held[2].id, 2), (4, 1)]
        );
        let progress = core.snapshot(start);
        assert_eq!(
            (progress.done, progress.failed, progress.retried),
            (1, 2, 2)
        );
        assert_eq!(progress.consumers, 1);
        assert_eq!(log.lock().unwrap().successes, [2]);
    }

    #[test]
    fn a_lost_job_out_of_attempts_is_dead_lettered() {
        let start = Instant::now();
        let settings = QueueSettings {
            max_attempts: 1,
            ..settings()
        };
        let (mut core, log) = core_of([9], settings, start);
        let _a = join(&mut core, 1, 1, start);
        core.turn(start, false);
        core.handle(Event::Left { conn: 1 }, start);
        assert_eq!(
            log.lock().unwrap().errors,
            [(9, "consumer lost (1 attempt)".to_string())]
        );
        let progress = core.snapshot(start);
        assert_eq!((progress.failed, progress.dead), (1, 1));
        assert_eq!((progress.in_flight, progress.pending), (0, 0));
    }

    #[test]
    fn drain_at_stop_stops_deliveries_and_ends_once_nothing_is_leased() {
        let start = Instant::now();
        let (mut core, log) = core_of(1..=5, settings(), start);
        let mut a = join(&mut core, 1, 2, start);
        core.turn(start, false);
        let held = jobs(&mut a);
        assert_eq!(held.len(), 2);
        assert!(!core.turn(start, true), "jobs are still leased");
        assert!(core.draining());
        assert_eq!(sent(&mut a), [Err(ToConsumer::Drain)]);
        // A consumer that joins now is drained at once, and served nothing.
        let mut b = join(&mut core, 2, 5, start);
        assert!(!core.turn(start, true));
        assert_eq!(sent(&mut b), [Err(ToConsumer::Drain)]);
        // A finishes one job and hands the other back (not an attempt).
        send(&mut core, 1, ack(held[0].lease), start);
        send(
            &mut core,
            1,
            ToFeeder::Release {
                lease: held[1].lease,
            },
            start,
        );
        send(&mut core, 1, ToFeeder::Credit { n: 1 }, start);
        assert!(core.turn(start, true), "nothing leased any more");
        assert!(sent(&mut a).is_empty() && sent(&mut b).is_empty());
        let end = core.end(start);
        assert!(!end.report.finished);
        assert_eq!(end.report.progress.done, 1);
        assert_eq!(end.report.progress.failed, 0, "a release is no attempt");
        assert_eq!(end.report.unfinished, 1, "the job handed back");
        assert_eq!(log.lock().unwrap().successes, [1]);
    }

    #[test]
    fn drain_at_stop_ends_at_its_deadline_with_jobs_still_leased() {
        let start = Instant::now();
        let (mut core, log) = core_of([1, 2], settings(), start);
        let mut a = join(&mut core, 1, 1, start);
        core.turn(start, false);
        assert_eq!(jobs(&mut a).len(), 1);
        assert!(!core.turn(start, true));
        // The lease (30 s) is longer than MAX_DRAIN: that is the deadline.
        assert_eq!(core.next_wake(start, None), start + MAX_DRAIN);
        assert!(!core.turn(start + MAX_DRAIN - SECOND, true));
        assert!(core.turn(start + MAX_DRAIN, true));
        let end = core.end(start + MAX_DRAIN);
        assert_eq!(end.report.unfinished, 1);
        assert_eq!(end.report.progress.in_flight, 1);
        let log = log.lock().unwrap();
        assert!(log.successes.is_empty() && log.errors.is_empty());
    }

    #[test]
    fn the_core_drains_by_itself_once_every_job_has_its_outcome() {
        let start = Instant::now();
        let (mut core, _log) = core_of([1], settings(), start);
        let mut a = join(&mut core, 1, 5, start);
        core.turn(start, false);
        let [job] = jobs(&mut a)[..] else {
            panic!("one job")
        };
        assert!(!core.finished(), "the job has no outcome yet");
        send(&mut core, 1, ack(job.lease), start);
        assert!(core.turn(start, false), "finished: drained, nothing leased");
        assert_eq!(sent(&mut a), [Err(ToConsumer::Drain)]);
        assert!(core.end(start).report.finished);
    }

    #[test]
    fn a_durable_feeder_s_frames_wait_for_its_sync() {
        let start = Instant::now();
        let (synced_tx, synced_rx) = watch::channel(0);
        let committed = Arc::new(Mutex::new(0));
        let log = Arc::new(Mutex::new(Log::default()));
        let feeder = DurableFeeder {
            jobs: [1, 2].into(),
            before: HashMap::new(),
            log: Arc::clone(&log),
            attempts: Arc::default(),
            committed: Arc::clone(&committed),
            synced_rx,
        };
        let lease = 10 * SECOND;
        let settings = QueueSettings {
            lease,
            ..settings()
        };
        let mut core = Core::new(feeder, settings, None, None, start);
        assert!(core.durable());
        let mut a = join(&mut core, 1, 1, start);
        core.turn(start, false);
        assert!(core.holding() && jobs(&mut a).is_empty(), "not durable yet");
        // A slow disk does not expire a lease the consumer has not seen.
        assert!(!core.turn(start + 2 * lease, false));
        assert!(jobs(&mut a).is_empty());
        synced_tx.send_replace(*committed.lock().unwrap());
        let synced_at = start + 2 * lease;
        core.release_held(synced_at);
        let [job] = jobs(&mut a)[..] else {
            panic!("the job, once durable")
        };
        assert!(!core.holding());
        assert_eq!(
            core.next_wake(synced_at, None),
            synced_at + lease,
            "its lease starts now"
        );
        // The ack is confirmed (Settled) only once durable too.
        send(&mut core, 1, ack(job.lease), synced_at);
        core.turn(synced_at, false);
        assert!(sent(&mut a).is_empty());
        synced_tx.send_replace(*committed.lock().unwrap());
        core.release_held(synced_at);
        assert_eq!(
            sent(&mut a),
            [Err(ToConsumer::Settled {
                leases: vec![job.lease]
            })]
        );
        assert_eq!(log.lock().unwrap().successes, [1]);
        // A journal writer that is gone drops what is held.
        send(&mut core, 1, ToFeeder::Credit { n: 1 }, synced_at);
        core.turn(synced_at, false);
        assert!(core.holding());
        core.writer_gone();
        assert!(!core.holding() && !core.durable());
        assert!(jobs(&mut a).is_empty());
    }
}
