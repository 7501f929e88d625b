//! Queues.
//!
//! - [`local`]: a local queue with visibility timeout and dead letter
//!   (memory and file adapters), for programs on one host.
//! - The job queue of queue groups: a feeder instance serves jobs over TCP
//!   ([`crate::protocol::queue`]) to consumer instances on any host. The
//!   jobs come from a [`Feeder`]: the user's own type (the original's
//!   FeederInterface: next / success / error) or a built-in one
//!   ([`feeders`]); [`builtin`] runs the durable file feeder as the
//!   `taskherd` binary's own feeder role.
//! - [`exec`]: a consumer that runs a command once per job (the
//!   `taskherd exec-consumer` subcommand).
//! - [`coprocess`]: a consumer that starts a command once and speaks JSON
//!   lines with it (the `taskherd coprocess-consumer` subcommand).

pub mod builtin;
pub(crate) mod child;
pub mod consumer;
pub mod coprocess;
pub mod durable;
pub mod exec;
pub mod feeders;
pub mod governor;
pub mod joblog;
pub(crate) mod journal;
pub mod local;
#[cfg(feature = "nats")]
pub mod nats;
pub mod options;
mod peer_warnings;
pub mod server;
pub(crate) mod spawn;

pub use governor::Governor;
pub use server::{serve, FeederServer, ServeReport, ServerError};

use std::time::{Duration, SystemTime};

use crate::retry::RetryPolicy;

/// What a [`Feeder`] has to give right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next<J> {
    /// A job to serve.
    Job(J),
    /// Nothing now; ask again after [`Feeder::recheck`] (or sooner when
    /// told new jobs arrived).
    Empty,
    /// Nothing ever again: once every job served has an outcome, the
    /// queue is finished.
    Done,
}

/// The source and sink of a queue group's jobs, on the feeder's side.
///
/// The feeder server pulls jobs with [`next`](Feeder::next) as consumers
/// have room, and hands each one back exactly once with its final outcome:
/// [`success`](Feeder::success) when a consumer acked it, or
/// [`error`](Feeder::error) when it was dead-lettered (a consumer said so,
/// or it failed `max_attempts` times). A job a consumer lost (crash,
/// expired lease) is not final: it is served again.
///
/// ```
/// use taskherd::queue::{Feeder, Next};
///
/// /// Jobs 1..=n, remembering what failed.
/// struct Numbers { next: u32, last: u32, failed: Vec<u32> }
///
/// impl Feeder for Numbers {
///     type Job = u32;
///     fn next(&mut self) -> Next<u32> {
///         if self.next > self.last {
///             return Next::Done;
///         }
///         self.next += 1;
///         Next::Job(self.next - 1)
///     }
///     fn success(&mut self, _job: u32) {}
///     fn error(&mut self, job: u32, _reason: &str) {
///         self.failed.push(job);
///     }
/// }
/// ```
pub trait Feeder: Send + 'static {
    /// A job, as consumers receive it (JSON on the wire).
    type Job: serde::Serialize + Send + 'static;

    /// The next job, if there is one.
    fn next(&mut self) -> Next<Self::Job>;

    /// A consumer acked `job`.
    fn success(&mut self, job: Self::Job);

    /// `job` was dead-lettered, for `reason`.
    fn error(&mut self, job: Self::Job, reason: &str);

    /// How long to wait before asking again after [`Next::Empty`].
    fn recheck(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// A stable id of `job` (a durable feeder's own, kept across
    /// restarts), sent to consumers as the job's id. `None` (the default):
    /// the server numbers jobs itself, 1, 2, ... in each run. Ids must be
    /// unique among the jobs of a run.
    fn job_id(&self, _job: &Self::Job) -> Option<u64> {
        None
    }

    /// Attempts `job` already had before this run (a durable feeder keeps
    /// them across restarts); the server counts on from there and
    /// dead-letters at once a job that already reached `max_attempts`.
    fn attempts(&self, _job: &Self::Job) -> u32 {
        0
    }

    /// The retry policy of `job` itself (per-job options), used instead
    /// of the group's for its failed attempts; `first_attempt_at` is when
    /// its first attempt (in this run) started. `max_attempts` still caps.
    /// `None` (the default): the group's policy.
    fn retry_policy(&self, _job: &Self::Job, _first_attempt_at: SystemTime) -> Option<RetryPolicy> {
        None
    }

    /// A delivery of `job` begins (its attempt counts). Durable feeders
    /// record it.
    fn attempt(&mut self, _job: &Self::Job) {}

    /// A delivery of `job` was handed back untouched (it does not count).
    fn release(&mut self, _job: &Self::Job) {}

    /// Durable feeders: hands every change made since the last call to
    /// the disk, and returns the number that [`synced`](Feeder::synced)
    /// reaches once they are durable. The server calls it once per turn
    /// of its loop and holds back every frame that depends on those
    /// changes (a job's delivery, an outcome's confirmation) until then.
    fn commit(&mut self) -> u64 {
        0
    }

    /// Durable feeders: the highest [`commit`](Feeder::commit) number that
    /// is durable. `None` (the default) when changes are final at once.
    fn synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}
