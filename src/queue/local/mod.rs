//! A local queue with visibility timeout and dead letter.
//!
//! A producer [`push`](LocalQueue::push)es JSON payloads, optionally delayed
//! and with a priority. A worker [`receive`](LocalQueue::receive)s the
//! highest-priority visible message as a [`Lease`]: the message stays in the
//! queue, invisible to other receivers, until the lease is acknowledged
//! ([`ack`](LocalQueue::ack)), given back ([`nack`](LocalQueue::nack), with a
//! delay), or expires. A message delivered `max_receives` times without an
//! ack goes to the dead-letter list, where it can be listed, requeued or
//! purged.
//!
//! Two adapters implement the one [`LocalQueue`] trait:
//!
//! - [`MemoryQueue`]: state in memory only; lost with the process.
//! - [`FileQueue`]: the same state, journaled to a file with `fsync` before
//!   every operation returns, replayed on open. It survives a crash; see its
//!   docs for what happens to leases that were in flight.
//!
//! # How it works
//!
//! Both adapters share one state machine. Every operation is planned against
//! the current state as a short list of records (push, lease, ack, nack,
//! extend, dead, requeue, purge); the file adapter appends them to its
//! journal as one checksummed frame and syncs it; only then are they applied
//! to the in-memory state, through the same function the journal replay uses.
//! What was live before a crash is therefore exactly what a replay rebuilds.
//!
//! Time is passed in explicitly (`now`), so callers and tests control it; the
//! methods without an `_at` suffix use [`SystemTime::now`]. Expired leases and
//! delays that ran out are noticed lazily, by the next call that is given a
//! `now`: no background thread.
//!
//! The trait is synchronous: the file adapter blocks on `fsync`. From async
//! code, own the queue in one task and call it inside
//! `tokio::task::spawn_blocking`, or from a dedicated thread.
//!
//! # Semantics
//!
//! - Receive order: highest [`priority`](Message::priority) first, then
//!   oldest (lowest [`MessageId`]) first. A message given back keeps its id,
//!   hence its place.
//! - A lease lasts [`QueueOptions::visibility_timeout`] from the receive;
//!   [`extend`](LocalQueue::extend) pushes its end further. At the end of the
//!   lease the message is visible again.
//! - Each receive increments [`Message::receive_count`] and makes a new
//!   [`LeaseId`]. An ack, nack or extend with a lease id that is unknown,
//!   already used, or expired fails with [`LocalQueueError::StaleLease`] and
//!   changes nothing: a late ack never deletes a message that was leased to
//!   someone else since.
//! - A message whose `receive_count` already reached
//!   [`QueueOptions::max_receives`] when it would be delivered again (its
//!   lease expired, or its nack delay ran out) goes to the dead-letter list
//!   instead. [`requeue_dead`](LocalQueue::requeue_dead) puts it back with
//!   its count reset to zero.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use taskherd::queue::local::{LocalQueue, MemoryQueue, PushOptions, QueueOptions};
//!
//! # fn main() -> Result<(), taskherd::queue::local::LocalQueueError> {
//! let mut queue = MemoryQueue::new(QueueOptions {
//!     visibility_timeout: Duration::from_secs(30),
//!     max_receives: 3,
//! });
//! let now = SystemTime::now();
//! queue.push_at(serde_json::json!({"job": "low"}), PushOptions::default(), now)?;
//! queue.push_at(
//!     serde_json::json!({"job": "urgent"}),
//!     PushOptions { priority: 10, ..PushOptions::default() },
//!     now,
//! )?;
//!
//! let lease = queue.receive(now)?.expect("a message is ready");
//! assert_eq!(lease.message.payload["job"], "urgent");
//! queue.ack_at(&lease.lease_id, now)?;
//!
//! // Not acked in time: delivered again, under a new lease.
//! let first = queue.receive(now)?.expect("a message is ready");
//! let later = now + Duration::from_secs(31);
//! let second = queue.receive(later)?.expect("the lease expired");
//! assert_eq!(second.message.id, first.message.id);
//! assert_eq!(second.message.receive_count, 2);
//! // The first worker's late ack is refused; the message stays.
//! assert!(queue.ack_at(&first.lease_id, later).is_err());
//! queue.ack_at(&second.lease_id, later)?;
//! assert_eq!(queue.stats_at(later).ready, 0);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod file;
mod memory;
mod state;
#[cfg(test)]
mod suite;

pub use file::{FileQueue, DEFAULT_COMPACT_MIN_RECORDS};
pub use memory::MemoryQueue;

/// The identity of a message, unique within one queue and increasing in push
/// order (so it also orders messages of equal priority, oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The identity of one delivery of a message. Every receive makes a new one,
/// never reused by the same queue (the file adapter persists the counter), so
/// a stale lease can always be told from the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Its identity; increasing in push order.
    pub id: MessageId,
    /// What the producer pushed.
    pub payload: Value,
    /// Higher is delivered first.
    pub priority: i32,
    /// The earliest time it may be delivered: push time plus delay, or nack
    /// time plus delay. A lease, while it lasts, hides it further.
    pub visible_at: SystemTime,
    /// How many times it was delivered (leased), this one included for a
    /// message inside a [`Lease`]. Decides when it is dead-lettered.
    pub receive_count: u32,
    /// When it was pushed.
    pub enqueued_at: SystemTime,
}

/// A delivered message, hidden from other receivers until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The message, as of this delivery.
    pub message: Message,
    /// What to give [`LocalQueue::ack`], [`LocalQueue::nack`] and
    /// [`LocalQueue::extend`]; good only for this delivery.
    pub lease_id: LeaseId,
    /// When the lease ends and the message becomes visible again, unless it
    /// is acked, nacked or extended before.
    pub expires_at: SystemTime,
}

/// Settings shared by both adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// How long a receive hides the message (the lease length). Default 30 s.
    pub visibility_timeout: Duration,
    /// How many deliveries a message gets before it is dead-lettered instead
    /// of delivered again. Default 5; 0 acts as 1.
    pub max_receives: u32,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            visibility_timeout: Duration::from_secs(30),
            max_receives: 5,
        }
    }
}

/// How to push one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOptions {
    /// Keep the message invisible this long after the push. Default none.
    pub delay: Duration,
    /// Higher is delivered first. Default 0.
    pub priority: i32,
}

/// Counts of messages by state, as of a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// Visible: a receive would return one of these.
    pub ready: usize,
    /// Waiting for their delay (push or nack) to run out.
    pub delayed: usize,
    /// Leased and not expired.
    pub in_flight: usize,
    /// In the dead-letter list.
    pub dead: usize,
}

/// Errors of the local queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalQueueError {
    /// The lease id is unknown, was already acked or nacked, or expired.
    #[error("lease {lease} is unknown or expired")]
    StaleLease {
        /// The lease id given.
        lease: LeaseId,
    },
    /// [`LocalQueue::requeue_dead`] of a message that is not dead-lettered.
    #[error("message {id} is not in the dead-letter list")]
    NotDead {
        /// The message id given.
        id: MessageId,
    },
    /// Another process (or another [`FileQueue`] in this one) has the
    /// journal open.
    #[error("queue journal {} is locked by another process", path.display())]
    Locked {
        /// The journal.
        path: PathBuf,
    },
    /// Reading, writing or syncing the journal failed.
    #[error("i/o error on queue journal {}", path.display())]
    Io {
        /// The journal (or its compaction file, or its directory).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start like a queue journal.
    #[error("{} is not a taskherd queue journal", path.display())]
    NotAJournal {
        /// The file.
        path: PathBuf,
    },
    /// A record before the end of the journal is damaged. A damaged record at
    /// the very end (a write torn by a crash) is not an error: it is dropped.
    #[error("queue journal {} is corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A record passed its checksum but could not be decoded (written by an
    /// incompatible version?).
    #[error("cannot decode record at byte {offset} of queue journal {}", path.display())]
    Decode {
        /// The journal.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded (for example a time before 1970).
    #[error("cannot encode a queue journal record")]
    Encode(#[source] serde_json::Error),
    /// One operation's record is larger than a journal frame can hold (4 GiB).
    #[error("queue record of {len} bytes is too large")]
    RecordTooLarge {
        /// Its encoded size.
        len: usize,
    },
    /// The JSON-lines file of a JSONL feeder cannot be taken in further:
    /// it is gone, or it was replaced or cut shorter than what was taken
    /// in already (which would serve lines twice, or skip some).
    #[error("jobs file {}: {problem}", path.display())]
    JobsFile {
        /// The JSON-lines file.
        path: PathBuf,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// An earlier write or sync of the journal failed, so what is on disk is
    /// unknown; the queue refuses further changes. Drop it and open the file
    /// again, which replays what reached the disk.
    #[error("queue journal {} failed earlier; open it again", path.display())]
    Broken {
        /// The journal.
        path: PathBuf,
    },
}

/// The result type of this module.
pub type Result<T, E = LocalQueueError> = std::result::Result<T, E>;

/// A queue with leases and a dead-letter list; see the [module docs](self).
///
/// Object safe: `Box<dyn LocalQueue>` holds either adapter. Methods ending in
/// `_at` (and [`receive`](Self::receive)) take the current time; the others
/// use [`SystemTime::now`].
///
/// # Errors
///
/// The lease methods fail with [`LocalQueueError::StaleLease`] for a lease id
/// that is not current. [`MemoryQueue`] fails for no other reason;
/// [`FileQueue`] also fails when the journal cannot be written, in which case
/// the outcome is unknown until the file is opened again (see
/// [`LocalQueueError::Broken`]).
pub trait LocalQueue: Send {
    /// Adds a message, visible at `now + options.delay`, and returns its id.
    fn push_at(
        &mut self,
        payload: Value,
        options: PushOptions,
        now: SystemTime,
    ) -> Result<MessageId>;

    /// Leases the highest-priority message visible at `now` (oldest first
    /// among equals) until `now + visibility_timeout`, or returns `None`.
    /// Messages due for the dead-letter list are moved there on the way.
    fn receive(&mut self, now: SystemTime) -> Result<Option<Lease>>;

    /// Deletes the leased message for good.
    fn ack_at(&mut self, lease: &LeaseId, now: SystemTime) -> Result<()>;

    /// Ends the lease without deleting the message; it becomes visible again
    /// at `now + delay`. Its receive count is kept.
    fn nack_at(&mut self, lease: &LeaseId, delay: Duration, now: SystemTime) -> Result<()>;

    /// Moves the end of a current lease `by` later and returns the new end.
    fn extend_at(&mut self, lease: &LeaseId, by: Duration, now: SystemTime) -> Result<SystemTime>;

    /// The dead-lettered messages, by id.
    fn dead_letters(&self) -> Vec<Message>;

    /// Puts a dead-lettered message back in the queue, visible at `now`, with
    /// its receive count reset to zero.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::NotDead`] if it is not dead-lettered.
    fn requeue_dead_at(&mut self, id: MessageId, now: SystemTime) -> Result<()>;

    /// Deletes every dead-lettered message and returns how many there were.
    fn purge_dead(&mut self) -> Result<usize>;

    /// Counts messages by state as of `now` (counting expired leases and
    /// ended delays as what they turn into, without changing anything).
    fn stats_at(&self, now: SystemTime) -> QueueStats;

    /// The earliest time a receive may return a message: a time at or before
    /// the last `now` seen if one is ready, `None` if nothing is waiting.
    /// Counts the ends of current leases (an ack may come first), so waking
    /// up at this time may find nothing.
    fn next_visible_at(&self) -> Option<SystemTime>;

    /// [`push_at`](Self::push_at) at the current time.
    fn push(&mut self, payload: Value, options: PushOptions) -> Result<MessageId> {
        self.push_at(payload, options, SystemTime::now())
    }

    /// [`receive`](Self::receive) at the current time.
    fn receive_now(&mut self) -> Result<Option<Lease>> {
        self.receive(SystemTime::now())
    }

    /// [`ack_at`](Self::ack_at) at the current time.
    fn ack(&mut self, lease: &LeaseId) -> Result<()> {
        self.ack_at(lease, SystemTime::now())
    }

    /// [`nack_at`](Self::nack_at) at the current time.
    fn nack(&mut self, lease: &LeaseId, delay: Duration) -> Result<()> {
        self.nack_at(lease, delay, SystemTime::now())
    }

    /// [`extend_at`](Self::extend_at) at the current time.
    fn extend(&mut self, lease: &LeaseId, by: Duration) -> Result<SystemTime> {
        self.extend_at(lease, by, SystemTime::now())
    }

    /// [`requeue_dead_at`](Self::requeue_dead_at) at the current time.
    fn requeue_dead(&mut self, id: MessageId) -> Result<()> {
        self.requeue_dead_at(id, SystemTime::now())
    }

    /// [`stats_at`](Self::stats_at) at the current time.
    fn stats(&self) -> QueueStats {
        self.stats_at(SystemTime::now())
    }
}

/// `t + d`, saturating at the year 9999 instead of overflowing (a "delay" of
/// `Duration::MAX` means "practically never").
fn later(t: SystemTime, d: Duration) -> SystemTime {
    let sum = t.checked_add(d);
    match UNIX_EPOCH.checked_add(Duration::from_secs(253_402_300_799)) {
        Some(cap) => match sum {
            Some(sum) if sum <= cap => sum,
            _ => cap.max(t),
        },
        None => sum.unwrap_or(t),
    }
}
