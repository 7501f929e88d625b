//! What a consumer's frames do to the core's state: credits, outcomes
//! (ack, retry, dead, release), lease extensions and the governor's
//! requests; and what follows an attempt that failed or was lost (another
//! attempt or a dead letter, the joblog line).

use super::Core;
use crate::error_text::count;
use crate::protocol::queue::{OutcomeMeta, ToConsumer, ToFeeder};
use crate::queue::joblog::{JoblogLine, JoblogOutcome};
use crate::queue::server::MAX_CREDIT;
use crate::queue::Feeder;
use crate::retry::Decision;
use std::cmp::Reverse;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{debug, info};

use super::{after, Source};

impl<F: Feeder> Core<F> {
    /// What a frame of a joined consumer does.
    pub(super) fn frame(&mut self, conn: u64, frame: ToFeeder, now: Instant) {
        match frame {
            ToFeeder::Credit { n } => self.credit(conn, n),
            ToFeeder::Ack { lease, meta } => {
                let granted = self.leases.get(&lease).map(|held| held.granted);
                if let Some(job) = self.settle(conn, lease) {
                    self.confirm(conn, lease);
                    if let Some(entry) = self.jobs.remove(&job) {
                        self.counts.done += 1;
                        if let Some(granted) = granted {
                            let took = now.saturating_duration_since(granted);
                            self.counts.durations.observe(took);
                        }
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
                let _ = consumer.out_tx.send(ToConsumer::Stale { lease });
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
        let random = crate::random::unit();
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
    pub(super) fn lost(&mut self, job: u64, why: &str) {
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
    pub(super) fn joblog_unsent(&mut self, job: u64, attempt: u32, reason: &str) {
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
}
