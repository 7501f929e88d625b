//! The feeder's joblog (`[group.queue] joblog`): one JSON line per
//! outcome of a job's run, like GNU parallel's `--joblog`.
//!
//! A line is written for every attempt that ended: `done` (acked),
//! `retry` (a failed attempt that runs again: the consumer asked, its
//! lease expired or its consumer was lost) and `dead` (the job's final
//! failure). A job that reached a final outcome therefore has exactly
//! one `done` or `dead` line, after the `retry` lines of its earlier
//! attempts. Jobs handed back untouched at a stop (not an attempt) have
//! none.
//!
//! ```text
//! {"id":3,"attempt":1,"outcome":"retry","reason":"sh job.sh: exit status 75","host":"web1","instance":4,"exit":75,"signal":null,"start_ms":1767225600123,"duration_ms":85}
//! {"id":3,"attempt":2,"outcome":"done","reason":null,"host":"localhost","instance":2,"exit":0,"signal":null,"start_ms":1767225601310,"duration_ms":80}
//! ```
//!
//! Every key is on every line (`null` when not known): `host`,
//! `instance` (the consumer's global id), `start_ms` (Unix time in ms)
//! and `duration_ms` come from the consumer (a consumer of an older
//! version sends none; `host` and `instance` are then read from its
//! name), `exit` and `signal` from exec consumers. A lost lease has no
//! timing.
//!
//! # How it works
//!
//! The queue core hands each line to a thread of the joblog over a
//! bounded channel and never waits: when the disk is so slow that the
//! channel is full, the line is dropped and counted (a warning at the
//! end says how many). The thread appends each line with one write
//! (`O_APPEND`, buffered: a line is never split between writes), flushes
//! whenever it has nothing more to write, and syncs the file at the end.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::protocol::queue::OutcomeMeta;

/// Lines waiting for the joblog's thread before new ones are dropped.
const JOBLOG_QUEUE: usize = 65_536;

/// Buffer of the joblog's writes (one line is never split between two).
const JOBLOG_BUFFER: usize = 64 * 1024;

/// Longest wait for the joblog's thread to write its last lines at stop.
pub const JOBLOG_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How an attempt ended, in the joblog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoblogOutcome {
    /// Acked: the job is done.
    Done,
    /// A failed attempt; the job runs again.
    Retry,
    /// Given up on: the job's final failure.
    Dead,
}

/// One line of the joblog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JoblogLine {
    /// The job's id (the one consumers see; a durable feeder's own).
    pub id: u64,
    /// Which attempt this was (1 for the first delivery).
    pub attempt: u32,
    /// How it ended.
    pub outcome: JoblogOutcome,
    /// Why it failed (`retry` and `dead`); `null` for `done`.
    pub reason: Option<String>,
    /// The consumer's host, as the master names it.
    pub host: Option<String>,
    /// The consumer instance's global id.
    pub instance: Option<u32>,
    /// The exit status of the job's process (exec consumers).
    pub exit: Option<i32>,
    /// The signal that killed the job's process (exec consumers).
    pub signal: Option<i32>,
    /// When the run started on the consumer, Unix time in ms.
    pub start_ms: Option<u64>,
    /// How long the run took, in ms.
    pub duration_ms: Option<u64>,
}

impl JoblogLine {
    /// The line of attempt `attempt` of job `id`, with what the consumer
    /// said about it (`meta`); its `host` and `instance`, when `meta`
    /// lacks them, are read from the consumer's name (`group/id@host`).
    pub fn new(
        id: u64,
        attempt: u32,
        outcome: JoblogOutcome,
        reason: Option<&str>,
        meta: Option<OutcomeMeta>,
        consumer: Option<&str>,
    ) -> JoblogLine {
        let meta = meta.unwrap_or_default();
        let (named_host, named_instance) = consumer.map(origin_of).unwrap_or_default();
        JoblogLine {
            id,
            attempt,
            outcome,
            reason: reason.map(str::to_string),
            host: meta.host.or(named_host),
            instance: meta.instance.or(named_instance),
            exit: meta.exit,
            signal: meta.signal,
            start_ms: meta.start_ms,
            duration_ms: meta.duration_ms,
        }
    }
}

/// The host and the instance id in a consumer's name (`group/id@host`).
fn origin_of(name: &str) -> (Option<String>, Option<u32>) {
    let Some((who, host)) = name.rsplit_once('@') else {
        return (None, None);
    };
    let instance = who
        .rsplit_once('/')
        .and_then(|(_, id)| id.parse::<u32>().ok());
    let host = Some(host.to_string()).filter(|host| !host.is_empty());
    (host, instance)
}

/// Why a joblog cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoblogError {
    /// The file cannot be opened for appending.
    #[error("cannot open the joblog {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its thread cannot be started.
    #[error("cannot start the joblog's thread")]
    Thread(#[source] std::io::Error),
}

/// An open joblog: its writer thread and the channel to it.
#[derive(Debug)]
pub(crate) struct Joblog {
    /// The file, for messages.
    path: PathBuf,
    /// Lines (each with its newline) for the writer thread.
    lines_tx: SyncSender<String>,
    /// The writer thread; it ends when `lines_tx` is dropped.
    thread: JoinHandle<std::io::Result<()>>,
    /// Lines dropped: the thread was behind (or gone).
    dropped: u64,
}

impl Joblog {
    /// Opens `path` for appending (created if missing; a leading `~/` is
    /// this host's home) and starts its writer thread.
    ///
    /// # Errors
    /// The file cannot be opened, or the thread cannot start.
    pub(crate) fn open(path: &Path) -> Result<Joblog, JoblogError> {
        let path = super::builtin::expand_home(path);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| JoblogError::Open {
                path: path.clone(),
                source,
            })?;
        let (lines_tx, lines_rx) = mpsc::sync_channel(JOBLOG_QUEUE);
        let shown = path.clone();
        let thread = std::thread::Builder::new()
            .name("taskherd-joblog".into())
            .spawn(move || write_lines(file, lines_rx, &shown))
            .map_err(JoblogError::Thread)?;
        Ok(Joblog {
            path,
            lines_tx,
            thread,
            dropped: 0,
        })
    }

    /// Hands `line` to the writer thread, never waiting: a line it has no
    /// room for is dropped and counted.
    pub(crate) fn write(&mut self, line: &JoblogLine) {
        let Ok(mut text) = serde_json::to_string(line) else {
            self.dropped += 1;
            return;
        };
        text.push('\n');
        match self.lines_tx.try_send(text) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped += 1,
        }
    }

    /// Writes what is left, syncs and closes the file (blocking: call it
    /// off the async threads).
    pub(crate) fn close(self) {
        let Joblog {
            path,
            lines_tx,
            thread,
            dropped,
        } = self;
        drop(lines_tx);
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(path = %path.display(), cause = %err, "joblog write failed"),
            Err(_) => warn!(path = %path.display(), "the joblog's thread panicked"),
        }
        if dropped > 0 {
            warn!(
                path = %path.display(),
                dropped,
                "joblog lines dropped: the disk could not keep up"
            );
        }
    }
}

/// The writer thread: appends each line with one write, flushes when the
/// queue is empty, syncs at the end. A failed write ends it (the core
/// then counts its lines as dropped).
fn write_lines(file: File, lines_rx: Receiver<String>, path: &Path) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(JOBLOG_BUFFER, file);
    let written = (|| {
        loop {
            let line = match lines_rx.try_recv() {
                Ok(line) => line,
                Err(TryRecvError::Empty) => {
                    out.flush()?;
                    match lines_rx.recv() {
                        Ok(line) => line,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
        out.get_ref().sync_data()
    })();
    if let Err(err) = &written {
        warn!(path = %path.display(), cause = %err, "cannot write the joblog: lines from now on are lost");
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_every_key_and_fall_back_on_the_consumer_name() {
        let meta = OutcomeMeta {
            start_ms: Some(1_767_225_600_123),
            duration_ms: Some(85),
            exit: Some(65),
            ..OutcomeMeta::default()
        };
        let line = JoblogLine::new(
            3,
            1,
            JoblogOutcome::Dead,
            Some("sh job.sh: exit status 65"),
            Some(meta),
            Some("jobs/4@web1"),
        );
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"id":3,"attempt":1,"outcome":"dead","reason":"sh job.sh: exit status 65","host":"web1","instance":4,"exit":65,"signal":null,"start_ms":1767225600123,"duration_ms":85}"#
        );
        // What the consumer says wins over its name.
        let meta = OutcomeMeta {
            host: Some("localhost".into()),
            instance: Some(2),
            ..OutcomeMeta::default()
        };
        let line = JoblogLine::new(
            3,
            2,
            JoblogOutcome::Done,
            None,
            Some(meta),
            Some("jobs/4@web1"),
        );
        assert_eq!(
            (line.host.as_deref(), line.instance),
            (Some("localhost"), Some(2))
        );
        // A lost lease: the name only.
        let line = JoblogLine::new(
            9,
            5,
            JoblogOutcome::Retry,
            Some("lease expired"),
            None,
            None,
        );
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"id":9,"attempt":5,"outcome":"retry","reason":"lease expired","host":null,"instance":null,"exit":null,"signal":null,"start_ms":null,"duration_ms":null}"#
        );
        let back: JoblogLine =
            serde_json::from_str(&serde_json::to_string(&line).unwrap()).unwrap();
        assert_eq!(back, line);
    }

    #[test]
    fn consumer_names_give_host_and_instance() {
        assert_eq!(
            origin_of("jobs/3@localhost"),
            (Some("localhost".into()), Some(3))
        );
        assert_eq!(
            origin_of("a/b/12@web1:22"),
            (Some("web1:22".into()), Some(12))
        );
        assert_eq!(origin_of("no-host"), (None, None));
        assert_eq!(origin_of("jobs/x@h"), (Some("h".into()), None));
    }

    #[test]
    fn every_line_is_appended_whole_and_flushed_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.log");
        std::fs::write(&path, "an earlier run\n").unwrap();
        let mut joblog = Joblog::open(&path).unwrap();
        for id in 1..=1000 {
            joblog.write(&JoblogLine::new(
                id,
                1,
                JoblogOutcome::Done,
                None,
                None,
                Some("jobs/2@localhost"),
            ));
        }
        joblog.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("an earlier run"), "appended");
        let ids: Vec<u64> = lines
            .map(|line| serde_json::from_str::<JoblogLine>(line).unwrap().id)
            .collect();
        assert_eq!(ids, (1..=1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_joblog_in_a_missing_directory_is_an_error_naming_it() {
        let err = Joblog::open(Path::new("/nonexistent-dir/jobs.log")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/jobs.log"),
            "{err}"
        );
    }
}
