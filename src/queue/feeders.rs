//! Built-in [`Feeder`]s: [`IterFeeder`] serves jobs from memory,
//! [`FileFeeder`] from a durable file-backed queue.
//!
//! # How the file feeder works
//!
//! A [`FileFeeder`] owns a [`FileQueue`] journal (`<path>`) and two files of
//! JSON lines next to it:
//!
//! - `<path>.inbox`: jobs added by other processes
//!   ([`FileFeeder::push`], `taskherd queue add`). The journal is locked by
//!   its one owner, so producers append here instead (under an `flock` of
//!   the inbox, synced), and the owner moves the lines into the journal
//!   when its queue runs empty and whenever it opens the journal.
//! - `<path>.dead`: the jobs given up on, each with its reason (synced).
//!
//! Every job served is a lease of the [`FileQueue`] that never expires on
//! its own: the TCP feeder's leases decide about redelivery while the
//! process lives, and if it dies, opening the journal again releases the
//! leases, so every job that had no final outcome is served again. An acked
//! or dead-lettered job never is.
//!
//! Delivery is at least once: a crash between two steps that must both
//! happen (writing a dead-letter line and acking its lease; pushing inbox
//! lines into the journal and emptying the inbox; pushing dead jobs back and
//! emptying the dead-letter file) leaves a job in both places, never in
//! neither.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::error_text::error_chain;

use super::local::{
    FileQueue, LeaseId, LocalQueue, LocalQueueError, MessageId, PushOptions, QueueOptions, Result,
};
use super::{Feeder, Next};

// ---- IterFeeder -------------------------------------------------------------

/// A feeder serving the jobs of an iterator, in order, then
/// [`Next::Done`]. It counts the jobs acked and keeps the ones given up on
/// with their reasons.
///
/// ```
/// use taskherd::queue::{feeders::IterFeeder, Feeder, Next};
///
/// let mut feeder = IterFeeder::new(["a", "b"]);
/// let Next::Job(a) = feeder.next() else { unreachable!() };
/// let Next::Job(b) = feeder.next() else { unreachable!() };
/// assert_eq!(feeder.next(), Next::Done);
/// feeder.success(a);
/// feeder.error(b, "no such file");
/// assert_eq!(feeder.succeeded(), 1);
/// assert_eq!(feeder.failed()[0].job, "b");
/// assert_eq!(feeder.failed()[0].reason, "no such file");
/// ```
#[derive(Debug)]
pub struct IterFeeder<I: Iterator> {
    /// Where the jobs come from; fused, so it stays done once done.
    jobs: std::iter::Fuse<I>,
    /// Jobs acked so far.
    succeeded: u64,
    /// Jobs given up on, in the order their outcome came.
    failed: Vec<FailedJob<I::Item>>,
}

/// A job given up on, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedJob<J> {
    /// The job.
    pub job: J,
    /// Why (the consumer's reason, or the attempts running out).
    pub reason: String,
}

impl<I: Iterator> IterFeeder<I> {
    /// A feeder of the jobs of `jobs`.
    pub fn new<T: IntoIterator<IntoIter = I>>(jobs: T) -> Self {
        IterFeeder {
            jobs: jobs.into_iter().fuse(),
            succeeded: 0,
            failed: Vec::new(),
        }
    }

    /// How many jobs were acked.
    pub fn succeeded(&self) -> u64 {
        self.succeeded
    }

    /// The jobs given up on, in the order their outcome came.
    pub fn failed(&self) -> &[FailedJob<I::Item>] {
        &self.failed
    }

    /// The jobs given up on, by value.
    pub fn into_failed(self) -> Vec<FailedJob<I::Item>> {
        self.failed
    }
}

impl<I> Feeder for IterFeeder<I>
where
    I: Iterator + Send + 'static,
    I::Item: Serialize + Send + 'static,
{
    type Job = I::Item;

    fn next(&mut self) -> Next<I::Item> {
        match self.jobs.next() {
            Some(job) => Next::Job(job),
            None => Next::Done,
        }
    }

    fn success(&mut self, _job: I::Item) {
        self.succeeded += 1;
    }

    fn error(&mut self, job: I::Item, reason: &str) {
        self.failed.push(FailedJob {
            job,
            reason: reason.to_owned(),
        });
    }
}

// ---- FileFeeder -------------------------------------------------------------

/// How often an idle [`FileFeeder`] looks at its inbox again.
pub const FILE_FEEDER_RECHECK: Duration = Duration::from_secs(1);

/// Options of the journal: a lease lasts "forever" (the TCP feeder's own
/// leases govern redelivery; a reopen releases them), and the journal
/// never dead-letters by itself (the TCP feeder counts attempts).
const JOURNAL_OPTIONS: QueueOptions = QueueOptions {
    visibility_timeout: Duration::MAX,
    max_receives: u32::MAX,
};

/// A durable feeder: a [`FileQueue`] journal with an inbox for producers and
/// a dead-letter file; see the [module docs](self#how-the-file-feeder-works).
///
/// It never says [`Next::Done`]: with nothing to serve it says
/// [`Next::Empty`], and looks at its inbox again after
/// [`FILE_FEEDER_RECHECK`].
///
/// Its methods block on `fsync`: one per job served, one per outcome. If
/// the journal fails (a write error, a full disk), the failure is logged and
/// the next [`next`](Feeder::next) opens it again, which serves again
/// every job that was out (their late outcomes are then logged and dropped:
/// the jobs are out a second time).
///
/// ```
/// use taskherd::queue::{feeders::FileFeeder, Feeder, Next};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("jobs.queue");
/// FileFeeder::push(&path, serde_json::json!({"file": "a.png"}))?;
/// let mut feeder = FileFeeder::open(&path)?;
/// let Next::Job(job) = feeder.next() else { panic!("one job") };
/// assert_eq!(serde_json::to_value(&job)?, serde_json::json!({"file": "a.png"}));
/// feeder.success(job);
/// assert_eq!(feeder.next(), Next::Empty);
/// # Ok(())
/// # }
/// ```
pub struct FileFeeder {
    /// The journal's path, for reopening it.
    path: PathBuf,
    /// `<path>.inbox`.
    inbox: PathBuf,
    /// `<path>.dead`.
    dead: PathBuf,
    /// The open journal; `None` after it failed, until reopened.
    queue: Option<FileQueue>,
}

impl fmt::Debug for FileFeeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileFeeder")
            .field("path", &self.path)
            .field("open", &self.queue.is_some())
            .finish()
    }
}

/// A job of a [`FileFeeder`]: its payload (all a consumer sees: it
/// serializes as just the payload) and the local lease it is held under.
#[derive(Debug, Clone, PartialEq)]
pub struct FileJob {
    /// The journal's id of the message.
    id: MessageId,
    /// The journal's lease, acked at the outcome.
    lease: LeaseId,
    /// What was pushed.
    payload: Value,
}

impl FileJob {
    /// The journal's id of the job (a dead job pushed back gets a new one).
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The JSON value that was pushed.
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// The payload, by value.
    pub fn into_payload(self) -> Value {
        self.payload
    }
}

impl Serialize for FileJob {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.payload.serialize(serializer)
    }
}

/// A job in the dead-letter list, one line of `<path>.dead`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadJob {
    /// The journal's id it had.
    pub id: u64,
    /// Its payload.
    pub job: Value,
    /// Why it was given up on.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch; unknown for jobs the
    /// journal dead-lettered by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at_ms: Option<u64>,
}

/// What a file queue holds, as [`FileFeeder::report`] tells it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueReport {
    /// Jobs waiting to be served (visible now or delayed).
    pub pending: usize,
    /// Jobs served and without an outcome yet (always 0 right after
    /// [`FileFeeder::open`], which takes them all back).
    pub in_flight: usize,
    /// Jobs given up on, oldest first.
    pub dead: Vec<DeadJob>,
}

impl FileFeeder {
    /// Opens (creating it if needed) the queue at `path` and moves its
    /// inbox in. Jobs that were out when the last owner stopped or crashed
    /// are served again.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Locked`] if another feeder (or `taskherd queue`)
    /// has it open; the errors of [`FileQueue::open`]; [`LocalQueueError::Io`]
    /// if the inbox cannot be read or emptied.
    pub fn open(path: impl AsRef<Path>) -> Result<FileFeeder> {
        let path = path.as_ref().to_path_buf();
        let queue = FileQueue::open(&path, JOURNAL_OPTIONS)?;
        let mut feeder = FileFeeder {
            inbox: sibling(&path, ".inbox"),
            dead: sibling(&path, ".dead"),
            path,
            queue: Some(queue),
        };
        feeder.take_inbox()?;
        Ok(feeder)
    }

    /// Adds a job to the queue at `path`, whether or not a feeder has it
    /// open: the job goes to its inbox, synced before this returns.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] if the inbox cannot be written.
    pub fn push(path: impl AsRef<Path>, payload: Value) -> Result<()> {
        Self::push_all(path, [payload]).map(|_| ())
    }

    /// Adds jobs at once (one write, one sync); returns how many.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push). Some of the jobs may have been added all
    /// the same, if the write or the sync failed midway.
    pub fn push_all(
        path: impl AsRef<Path>,
        payloads: impl IntoIterator<Item = Value>,
    ) -> Result<usize> {
        let inbox = sibling(path.as_ref(), ".inbox");
        let mut buf = Vec::new();
        let mut count = 0;
        for payload in payloads {
            // Compact JSON has no raw newline: one value, one line.
            serde_json::to_writer(&mut buf, &payload).map_err(LocalQueueError::Encode)?;
            buf.push(b'\n');
            count += 1;
        }
        if count > 0 {
            append_lines(&inbox, &buf)?;
        }
        Ok(count)
    }

    /// Whether there is a queue at `path`: its journal, or an inbox that
    /// jobs were pushed to.
    pub fn exists(path: impl AsRef<Path>) -> bool {
        let path = path.as_ref();
        path.exists() || sibling(path, ".inbox").exists()
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dead-letter file's path (`<path>.dead`).
    pub fn dead_path(&self) -> &Path {
        &self.dead
    }

    /// What the queue holds now. The inbox is not counted: it is moved in
    /// by [`open`](Self::open) and when the queue runs empty.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] or [`LocalQueueError::Decode`] if the
    /// dead-letter file cannot be read.
    pub fn report(&mut self) -> Result<QueueReport> {
        let queue = self.queue()?;
        let stats = queue.stats();
        let mut dead: Vec<DeadJob> = queue
            .dead_letters()
            .into_iter()
            .map(|message| DeadJob {
                id: message.id.0,
                reason: format!("delivered {} times without an ack", message.receive_count),
                job: message.payload,
                dead_at_ms: None,
            })
            .collect();
        dead.extend(read_dead(&self.dead)?);
        Ok(QueueReport {
            pending: stats.ready + stats.delayed,
            in_flight: stats.in_flight,
            dead,
        })
    }

    /// Puts every dead job back in the queue, to be served again; returns
    /// how many.
    ///
    /// # Errors
    ///
    /// As [`report`](Self::report), and the journal's errors. After a
    /// failure, the jobs not yet pushed back are still in the dead-letter
    /// list (and the ones pushed back may be too).
    pub fn requeue_dead(&mut self) -> Result<usize> {
        let dead_path = self.dead.clone();
        let queue = self.queue()?;
        let mut count = 0;
        // Left by journals used with a dead-lettering `max_receives`.
        for message in queue.dead_letters() {
            queue.requeue_dead(message.id)?;
            count += 1;
        }
        let dead = read_dead(&dead_path)?;
        if dead.is_empty() {
            return Ok(count);
        }
        for entry in dead {
            queue.push(entry.job, PushOptions::default())?;
            count += 1;
        }
        truncate(&dead_path)?;
        Ok(count)
    }

    /// The open journal, opened again if it failed before.
    fn queue(&mut self) -> Result<&mut FileQueue> {
        if self.queue.is_none() {
            let queue = FileQueue::open(&self.path, JOURNAL_OPTIONS)?;
            tracing::warn!(
                path = %self.path.display(),
                "queue journal opened again; every job that was out is served again"
            );
            self.queue = Some(queue);
        }
        Ok(self.queue.as_mut().expect("invariant: opened above"))
    }

    /// Moves the inbox's lines into the journal and empties it; returns how
    /// many jobs came in.
    fn take_inbox(&mut self) -> Result<usize> {
        let file = match OpenOptions::new().read(true).write(true).open(&self.inbox) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(io_error(&self.inbox, source)),
        };
        let io = |source| io_error(&self.inbox, source);
        lock(&file).map_err(io)?;
        let data = read_all(&file).map_err(io)?;
        if data.is_empty() {
            return Ok(0);
        }
        let inbox = self.inbox.clone();
        let queue = self.queue()?;
        let mut count = 0;
        for line in complete_lines(&data, &inbox) {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(line) {
                Ok(payload) => {
                    queue.push(payload, PushOptions::default())?;
                    count += 1;
                }
                Err(err) => tracing::warn!(
                    path = %inbox.display(),
                    line = %String::from_utf8_lossy(line),
                    cause = %err,
                    "dropping an inbox line that is not JSON"
                ),
            }
        }
        file.set_len(0)
            .and_then(|()| file.sync_data())
            .map_err(|source| io_error(&inbox, source))?;
        tracing::debug!(path = %self.path.display(), jobs = count, "took in the inbox");
        Ok(count)
    }

    fn try_next(&mut self) -> Result<Option<FileJob>> {
        if let Some(job) = self.receive()? {
            return Ok(Some(job));
        }
        if self.take_inbox()? == 0 {
            return Ok(None);
        }
        self.receive()
    }

    fn receive(&mut self) -> Result<Option<FileJob>> {
        Ok(self.queue()?.receive_now()?.map(|lease| FileJob {
            id: lease.message.id,
            lease: lease.lease_id,
            payload: lease.message.payload,
        }))
    }

    /// Logs a failure of the journal; any failure but a stale lease makes
    /// the next call open it again.
    fn log_failure(&mut self, err: &LocalQueueError, job: Option<MessageId>, doing: &str) {
        let path = self.path.display();
        let job = job.map(|id| id.0);
        match err {
            LocalQueueError::StaleLease { .. } => tracing::warn!(
                path = %path,
                job = ?job,
                "{doing}: the job was served again since (journal reopened); outcome dropped"
            ),
            _ => {
                tracing::error!(path = %path, job = ?job, cause = %error_chain(err), "{doing}");
                self.queue = None;
            }
        }
    }
}

impl Feeder for FileFeeder {
    type Job = FileJob;

    fn next(&mut self) -> Next<FileJob> {
        match self.try_next() {
            Ok(Some(job)) => Next::Job(job),
            Ok(None) => Next::Empty,
            Err(err) => {
                self.log_failure(&err, None, "cannot take a job from the queue");
                Next::Empty
            }
        }
    }

    fn success(&mut self, job: FileJob) {
        let acked = self.queue().and_then(|queue| queue.ack(&job.lease));
        if let Err(err) = acked {
            self.log_failure(&err, Some(job.id), "cannot ack a job");
        }
    }

    /// Writes the dead-letter line first and acks after: a crash in
    /// between leaves the job in both the dead-letter file and the queue,
    /// never in neither.
    fn error(&mut self, job: FileJob, reason: &str) {
        let entry = DeadJob {
            id: job.id.0,
            job: job.payload,
            reason: reason.to_owned(),
            dead_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .and_then(|since| u64::try_from(since.as_millis()).ok()),
        };
        let mut line = match serde_json::to_vec(&entry) {
            Ok(line) => line,
            Err(err) => {
                let err = LocalQueueError::Encode(err);
                self.log_failure(&err, Some(job.id), "cannot dead-letter a job");
                return;
            }
        };
        line.push(b'\n');
        if let Err(err) = append_lines(&self.dead, &line) {
            // Not acked either: the job comes back when the journal is
            // opened again.
            self.log_failure(&err, Some(job.id), "cannot dead-letter a job");
            return;
        }
        let acked = self.queue().and_then(|queue| queue.ack(&job.lease));
        if let Err(err) = acked {
            self.log_failure(&err, Some(job.id), "cannot ack a dead-lettered job");
        }
    }

    fn recheck(&self) -> Duration {
        FILE_FEEDER_RECHECK
    }
}

// ---- files of JSON lines ------------------------------------------------------

/// `<path><suffix>`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

fn io_error(path: &Path, source: io::Error) -> LocalQueueError {
    LocalQueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes an exclusive `flock`, waiting for it; released when `file` is
/// closed.
fn lock(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor is owned by `file`, open for this call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn read_all(mut file: &File) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// The newline-terminated lines of `data`. An unterminated last line is a
/// write cut short by a crash, before its sync: its writer never heard it
/// succeed, so it is dropped (with a warning).
fn complete_lines<'d>(data: &'d [u8], path: &Path) -> impl Iterator<Item = &'d [u8]> {
    let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if end < data.len() {
        tracing::warn!(
            path = %path.display(),
            bytes = data.len() - end,
            "dropping a line cut short by a crash"
        );
    }
    data[..end]
        .split_inclusive(|&b| b == b'\n')
        .map(|line| &line[..line.len() - 1])
}

/// Appends whole lines to `path` (created if needed) under an exclusive
/// `flock`, and syncs. A line cut short by an earlier crash is cut off
/// first, so it cannot swallow the first new line.
fn append_lines(path: &Path, lines: &[u8]) -> Result<()> {
    let io = |source| io_error(path, source);
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io)?;
    lock(&file).map_err(io)?;
    let len = cut_torn_tail(&file, path).map_err(io)?;
    file.write_all(lines)
        .and_then(|()| file.sync_data())
        .map_err(io)?;
    if len == 0 {
        // Possibly a new file: make its name durable too.
        sync_dir(path).map_err(io)?;
    }
    Ok(())
}

/// Truncates `file` after its last newline if it does not end with one;
/// returns its length.
fn cut_torn_tail(file: &File, path: &Path) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(len);
    }
    let data = read_all(file)?;
    let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        path = %path.display(),
        bytes = data.len() - end,
        "dropping a line cut short by a crash"
    );
    file.set_len(end as u64)?;
    Ok(end as u64)
}

/// Empties `path`, if it exists, and syncs.
fn truncate(path: &Path) -> Result<()> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io_error(path, source)),
    };
    file.set_len(0)
        .and_then(|()| file.sync_data())
        .map_err(|source| io_error(path, source))
}

/// The entries of a dead-letter file (none if it does not exist).
fn read_dead(path: &Path) -> Result<Vec<DeadJob>> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io_error(path, source)),
    };
    let mut offset = 0;
    let mut dead = Vec::new();
    for line in complete_lines(&data, path) {
        let start = offset as u64;
        offset += line.len() + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let entry = serde_json::from_slice(line).map_err(|source| LocalQueueError::Decode {
            path: path.to_path_buf(),
            offset: start,
            source,
        })?;
        dead.push(entry);
    }
    Ok(dead)
}

/// Syncs the directory holding `path`, making a creation durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job<J>(next: Next<J>) -> J {
        match next {
            Next::Job(job) => job,
            Next::Empty => panic!("expected a job, got Empty"),
            Next::Done => panic!("expected a job, got Done"),
        }
    }

    fn payload(job: &FileJob) -> i64 {
        job.payload()["n"].as_i64().expect("a job of the test")
    }

    #[test]
    fn iter_feeder_serves_in_order_then_done() {
        let mut feeder = IterFeeder::new(1..=3);
        let jobs: Vec<u32> = (0..3).map(|_| job(feeder.next())).collect();
        assert_eq!(jobs, [1, 2, 3]);
        assert_eq!(feeder.next(), Next::Done);
        assert_eq!(feeder.next(), Next::Done, "stays done");
        assert_eq!(feeder.recheck(), Duration::from_secs(1));
    }

    #[test]
    fn iter_feeder_counts_outcomes() {
        let mut feeder = IterFeeder::new(vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]);
        let one = job(feeder.next());
        let two = job(feeder.next());
        let three = job(feeder.next());
        feeder.success(two);
        feeder.error(three.clone(), "bad input");
        feeder.success(one);
        assert_eq!(feeder.succeeded(), 2);
        assert_eq!(
            feeder.failed(),
            [FailedJob {
                job: three,
                reason: "bad input".to_owned()
            }]
        );
        assert_eq!(feeder.into_failed().len(), 1);
    }

    #[test]
    fn file_job_serializes_as_its_payload() {
        let job = FileJob {
            id: MessageId(7),
            lease: LeaseId(9),
            payload: json!({"file": "a.png", "n": [1, 2]}),
        };
        assert_eq!(
            serde_json::to_string(&job).expect("serializable"),
            r#"{"file":"a.png","n":[1,2]}"#
        );
    }

    #[test]
    fn file_feeder_survives_a_crash() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        for n in 1..=5 {
            FileFeeder::push(&path, json!({ "n": n })).expect("push");
        }

        let mut feeder = FileFeeder::open(&path).expect("open");
        let one = job(feeder.next());
        let two = job(feeder.next());
        let three = job(feeder.next());
        assert_eq!([payload(&one), payload(&two), payload(&three)], [1, 2, 3]);
        feeder.success(one);
        feeder.error(two, "cannot parse");
        let report = feeder.report().expect("report");
        assert_eq!((report.pending, report.in_flight), (2, 1));
        // A crash: the third job is out, without an outcome.
        drop(feeder);

        let mut feeder = FileFeeder::open(&path).expect("reopen");
        let mut served = Vec::new();
        while let Next::Job(job) = feeder.next() {
            served.push(payload(&job));
        }
        assert_eq!(served, [3, 4, 5], "acked and dead jobs never come back");
        assert_eq!(feeder.next(), Next::Empty, "never Done");

        let report = feeder.report().expect("report");
        assert_eq!((report.pending, report.in_flight), (0, 3));
        assert_eq!(report.dead.len(), 1);
        assert_eq!(report.dead[0].job, json!({"n": 2}));
        assert_eq!(report.dead[0].reason, "cannot parse");
        assert!(report.dead[0].dead_at_ms.is_some());

        let text = std::fs::read_to_string(sibling(&path, ".dead")).expect("dead file");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["job"], json!({"n": 2}));
        assert_eq!(line["reason"], "cannot parse");
        assert_eq!(feeder.dead_path(), sibling(&path, ".dead"));
    }

    #[test]
    fn jobs_pushed_while_the_feeder_runs_are_served() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let mut feeder = FileFeeder::open(&path).expect("open");
        assert_eq!(feeder.next(), Next::Empty);
        assert_eq!(feeder.recheck(), FILE_FEEDER_RECHECK);
        let added = FileFeeder::push_all(&path, (1..=3).map(|n| json!({ "n": n }))).expect("push");
        assert_eq!(added, 3);
        let served: Vec<i64> = (0..3).map(|_| payload(&job(feeder.next()))).collect();
        assert_eq!(served, [1, 2, 3]);
        assert_eq!(feeder.next(), Next::Empty);
        let inbox = std::fs::read(sibling(&path, ".inbox")).expect("inbox");
        assert!(inbox.is_empty(), "taken in");
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let inbox = sibling(&path, ".inbox");
        FileFeeder::push(&path, json!({"n": 1})).expect("push");
        // A producer that died in the middle of its write.
        let mut file = OpenOptions::new().append(true).open(&inbox).expect("inbox");
        file.write_all(br#"{"n": 2"#).expect("write");
        drop(file);
        FileFeeder::push(&path, json!({"n": 3})).expect("push after the torn line");
        let mut feeder = FileFeeder::open(&path).expect("open");
        let served: Vec<i64> = (0..2).map(|_| payload(&job(feeder.next()))).collect();
        assert_eq!(served, [1, 3]);
        assert_eq!(feeder.next(), Next::Empty);
    }

    #[test]
    fn requeue_dead_serves_dead_jobs_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push_all(&path, [json!({"n": 1}), json!({"n": 2})]).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        let one = job(feeder.next());
        let two = job(feeder.next());
        feeder.error(one, "first");
        feeder.error(two, "second");
        let reasons: Vec<String> = feeder
            .report()
            .expect("report")
            .dead
            .into_iter()
            .map(|dead| dead.reason)
            .collect();
        assert_eq!(reasons, ["first", "second"]);

        assert_eq!(feeder.requeue_dead().expect("requeue"), 2);
        let report = feeder.report().expect("report");
        assert_eq!((report.pending, report.dead.len()), (2, 0));
        let served: Vec<i64> = (0..2).map(|_| payload(&job(feeder.next()))).collect();
        assert_eq!(served, [1, 2]);
        assert_eq!(feeder.requeue_dead().expect("nothing to requeue"), 0);
    }

    #[test]
    fn a_queue_has_one_owner() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let _feeder = FileFeeder::open(&path).expect("open");
        let err = FileFeeder::open(&path).expect_err("locked");
        assert!(matches!(err, LocalQueueError::Locked { .. }), "{err}");
        // Producers are not locked out.
        FileFeeder::push(&path, json!({"n": 1})).expect("push while open");
    }
}
