//! The durable queue behind [`FileFeeder`](super::feeders::FileFeeder):
//! a journal of binary records with group commit, an inbox for producers
//! taken in exactly once, and compaction written aside while serving.
//!
//! # Files
//!
//! - `<path>`: the journal, owned (exclusive `flock`) by one process. The
//!   magic `THQFEED1`, then checksummed frames (length, CRC-32, payload), each
//!   a run of binary records: a job added (id and JSON text; with its
//!   options as compact JSON when it has some: a start time, a retry
//!   schedule, a priority, a unique key), a
//!   delivery begun (its attempt counted), a delivery handed back, done,
//!   dead (with its reason and time), a dead job forgotten, the intake
//!   mark. A compacted journal starts with the counters, then one record
//!   per job held: a pending job costs its JSON text plus 4 to 8 bytes.
//! - `<path>.inbox`: JSON lines appended by producers (`taskherd queue
//!   add`, [`FileFeeder::push_all`](super::feeders::FileFeeder::push_all),
//!   the master's webhook), under an exclusive `flock`, synced before they
//!   return; each line is `#<id> <job>`, its id reserved by the producer
//!   (a line without one, from an older taskherd, gets one when taken in).
//! - `<path>.ids`: the next job id (20 digits and a newline), taken by
//!   whoever adds jobs under the inbox's lock and synced before the lines
//!   that use it: producers and the owner share one sequence, and a
//!   producer knows its jobs' ids without a feeder. Without it, ids start
//!   after the journal's.
//! - `<path>.inbox.<g>`: generation `g` of the inbox, being taken in:
//!   the inbox is renamed so under its lock, then read in batches, each
//!   written to the journal with the mark of how far it was read.
//! - `<path>.compact.tmp`: a compaction being written.
//!
//! A [`JsonlFeeder`](super::feeders::JsonlFeeder) keeps its journal at
//! `<file>.state` and takes the JSON-lines file `<file>` in instead of an
//! inbox: as one generation that is never renamed or removed and may grow,
//! whose number in the intake mark is the file's inode (a file replaced
//! since is refused, as is one cut shorter than the mark).
//!
//! # What is synced when
//!
//! Every change of the state is a record, appended to a buffer as it
//! happens. Each turn of the feeder's server loop hands what it buffered
//! to a writer thread as one frame; the writer writes everything waiting
//! and syncs (`fdatasync`) once, so one sync covers every change that came
//! while the previous one ran (group commit). Nothing that depends on a
//! change leaves the feeder before the sync that covers it: a job is sent
//! to a consumer only once its delivery (its attempt) is durable, an
//! outcome is confirmed to its consumer only once it is durable, `queue
//! add` returns only after its lines are synced.
//!
//! # What a crash can and cannot do
//!
//! - A job added and acknowledged to its producer is taken in exactly once
//!   (the intake mark travels in the same frame as the jobs it took).
//! - A job whose outcome was confirmed never runs again. A job served
//!   whose outcome was not confirmed is served again (at least once).
//! - A job's attempts are counted durably before it is sent: a job that
//!   kills its feeder every time ends dead after `max_attempts`.
//! - A torn write at the end of the journal is dropped at the next open
//!   (it was never confirmed); damage anywhere else stops the open with the
//!   file and the offset: nothing good is dropped silently.
//! - A failing write (a full disk) is cut back and tried again: meanwhile
//!   no job is sent and nothing is confirmed; nothing is lost or doubled.

pub(crate) mod inbox;
pub(crate) mod record;
pub(crate) mod state;
pub(crate) mod store;
