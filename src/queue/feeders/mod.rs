//! Built-in [`Feeder`]s: [`IterFeeder`] serves jobs from memory,
//! [`FileFeeder`] from a durable file-backed queue (its files, what is
//! synced when and what a crash can do: [`durable`]), [`JsonlFeeder`]
//! the lines of a JSON-lines file (durably, on the same journal) and
//! [`CommandFeeder`] the lines a command prints (in memory).
//!
//! One file each: `iter.rs`, `file.rs` (with the jobs and reports of a
//! file queue), `jsonl.rs`, `command.rs`.

mod command;
mod file;
mod iter;
mod jsonl;

pub use command::{CommandFeeder, CommandJob, COMMAND_READ_AHEAD};
pub use file::{DeadJob, FileFeeder, FileJob, PendingJob, QueueReport, FILE_FEEDER_RECHECK};
pub use iter::{FailedJob, IterFeeder};
pub use jsonl::JsonlFeeder;

// Names the docs above link to.
#[cfg(doc)]
use super::{durable, Feeder};

/// What the tests of the feeders share.
#[cfg(test)]
mod test_util {
    use super::{FileFeeder, FileJob};
    use crate::queue::{Feeder, Next};
    use std::time::Duration;

    /// Serves until `n` jobs came (the intake runs on its own thread).
    pub(super) fn serve(feeder: &mut impl Feeder<Job = FileJob>, n: usize) -> Vec<FileJob> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut jobs = Vec::new();
        while jobs.len() < n {
            match feeder.next() {
                Next::Job(job) => jobs.push(job),
                _ => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "only {} jobs",
                        jobs.len()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        jobs
    }

    /// Commits and waits until it is durable.
    pub(super) fn sync(feeder: &mut FileFeeder) {
        let seq = feeder.commit();
        feeder
            .store
            .wait_synced(seq, Duration::from_secs(20))
            .expect("synced");
    }
}
