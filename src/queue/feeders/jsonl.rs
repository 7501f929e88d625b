//! [`JsonlFeeder`]: the lines of a JSON-lines file, durably, on a
//! [`FileFeeder`]'s journal.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::file::{FileFeeder, FileJob, QueueReport};
use crate::queue::durable::inbox::{self, Intake, Source};
use crate::queue::local::Result;
use crate::queue::{Feeder, Next};
use crate::retry::RetryPolicy;
// Names the docs link to.
#[cfg(doc)]
use crate::queue::local::LocalQueueError;

/// A durable feeder of the lines of a JSON-lines file: each line is a job
/// (a line that is not JSON is a dead job whose reason names the file and
/// the byte offset; blank lines are skipped).
///
/// It is a [`FileFeeder`] whose journal, `<file>.state`, takes the file in
/// instead of an inbox: the file is read from the intake mark on, in
/// batches, each written to the journal with how far the file was read,
/// and is never renamed or removed. So a restarted feeder neither serves
/// again what was done nor loses what was not, lines appended to the file
/// while it serves are taken in too, and `taskherd queue list
/// <file>.state` shows what is pending and dead. A last line without its
/// newline is taken in once the file has not changed for a second.
///
/// The mark also holds the file's inode: a file replaced by another one
/// (an editor that writes a new file, `mv`) or cut shorter than what was
/// taken in would have lines served twice or skipped, so it is refused
/// ([`LocalQueueError::JobsFile`], at [`open`](Self::open), or logged
/// while serving, which then takes nothing more in) until the file taken
/// in is put back or `<file>.state` is removed (then every line is served
/// again from the start).
///
/// Unlike a [`FileFeeder`] it says [`Next::Done`] once the whole file is
/// taken in and every job was served: the queue then finishes when every
/// job has its outcome.
///
/// ```
/// use taskherd::queue::{feeders::JsonlFeeder, Feeder, Next};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("jobs.jsonl");
/// std::fs::write(&path, "{\"file\": \"a.png\"}\n")?;
/// let mut feeder = JsonlFeeder::open(&path)?;
/// let job = loop {
///     // The file is taken in by a thread of the feeder.
///     match feeder.next() {
///         Next::Job(job) => break job,
///         _ => std::thread::sleep(std::time::Duration::from_millis(5)),
///     }
/// };
/// assert_eq!(job.payload().get(), r#"{"file": "a.png"}"#);
/// assert_eq!(feeder.next(), Next::Done, "the whole file was served");
/// # Ok(())
/// # }
/// ```
pub struct JsonlFeeder {
    /// The durable queue, taking the file in.
    inner: FileFeeder,
    /// The JSON-lines file.
    file: std::path::PathBuf,
}

impl fmt::Debug for JsonlFeeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlFeeder")
            .field("file", &self.file)
            .field("inner", &self.inner)
            .finish()
    }
}

impl JsonlFeeder {
    /// The journal that keeps the state of the JSON-lines file `file`:
    /// `<file>.state`.
    pub fn state_path(file: impl AsRef<Path>) -> std::path::PathBuf {
        crate::files::sibling(file.as_ref(), ".state")
    }

    /// Opens the feeder of the JSON-lines file `file`: locks and replays
    /// its journal ([`state_path`](Self::state_path), created if needed)
    /// and checks that the file is the one taken in so far. Jobs out when
    /// the last owner stopped or crashed are served again, with their
    /// attempts; the file is taken in from the mark on by a thread of the
    /// feeder once it serves.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::JobsFile`] when `file` does not exist, or was
    /// replaced or cut shorter since it was taken in; otherwise as
    /// [`FileFeeder::open`].
    pub fn open(file: impl AsRef<Path>) -> Result<JsonlFeeder> {
        let file = file.as_ref().to_path_buf();
        let state = Self::state_path(&file);
        let inner = FileFeeder::open_from(&state, Source::Lines(file.clone()))?;
        let mark = (inner.store.state.generation, inner.store.state.offset);
        inbox::lines_file(&file, &state, mark)?;
        Ok(JsonlFeeder { inner, file })
    }

    /// Calls `hook` with every job given up on and its reason (after it is
    /// recorded), as [`FileFeeder::with_dead_hook`].
    #[must_use]
    pub fn with_dead_hook(self, hook: impl FnMut(&FileJob, &str) + Send + 'static) -> Self {
        JsonlFeeder {
            inner: self.inner.with_dead_hook(hook),
            file: self.file,
        }
    }

    /// The JSON-lines file.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// What the journal holds now (its `inbox` is always 0: the lines of
    /// the file not taken in yet are not counted).
    ///
    /// # Errors
    ///
    /// As [`FileFeeder::report`].
    pub fn report(&self) -> Result<QueueReport> {
        self.inner.report()
    }

    /// Rewrites the journal as a snapshot of what it holds now (the mark
    /// of how far the file was taken in included), as
    /// [`FileFeeder::compact`].
    ///
    /// # Errors
    ///
    /// As [`FileFeeder::compact`].
    pub fn compact(&mut self) -> Result<()> {
        self.inner.compact()
    }

    /// Puts every dead line back in the queue, as
    /// [`FileFeeder::requeue_dead`]; returns how many.
    ///
    /// # Errors
    ///
    /// As [`FileFeeder::requeue_dead`].
    pub fn requeue_dead(&mut self) -> Result<usize> {
        self.inner.requeue_dead()
    }

    /// The JSON-lines file whose state `path` is, when it is one:
    /// `path` ends with `.state` and the file it names without that
    /// ending exists.
    pub fn file_of_state(path: impl AsRef<Path>) -> Option<std::path::PathBuf> {
        let path = path.as_ref();
        let name = path.file_name()?.to_str()?;
        let file = path.with_file_name(name.strip_suffix(".state")?);
        (file.is_file() && Self::state_path(&file) == path).then_some(file)
    }

    /// Whether the whole file is in the journal, every job in it was
    /// served (the caller saw [`Next::Empty`] from the inner feeder), and
    /// no last line waits for its newline.
    fn all_taken(&self) -> bool {
        if self.inner.intake.as_ref().is_none_or(Intake::busy) {
            return false;
        }
        let state = &self.inner.store.state;
        let mark = (state.generation, state.offset);
        matches!(
            inbox::lines_file(&self.file, self.inner.path(), mark),
            Ok((_, len)) if len == state.offset
        )
    }
}

impl Feeder for JsonlFeeder {
    type Job = FileJob;

    fn next(&mut self) -> Next<FileJob> {
        match self.inner.next() {
            Next::Empty if self.all_taken() => Next::Done,
            next => next,
        }
    }

    fn success(&mut self, job: FileJob) {
        self.inner.success(job);
    }

    fn error(&mut self, job: FileJob, reason: &str) {
        self.inner.error(job, reason);
    }

    fn recheck(&self) -> Duration {
        self.inner.recheck()
    }

    fn retry_policy(&self, job: &FileJob, first_attempt_at: SystemTime) -> Option<RetryPolicy> {
        self.inner.retry_policy(job, first_attempt_at)
    }

    fn job_id(&self, job: &FileJob) -> Option<u64> {
        self.inner.job_id(job)
    }

    fn attempts(&self, job: &FileJob) -> u32 {
        self.inner.attempts(job)
    }

    fn attempt(&mut self, job: &FileJob) {
        self.inner.attempt(job);
    }

    fn release(&mut self, job: &FileJob) {
        self.inner.release(job);
    }

    fn commit(&mut self) -> u64 {
        self.inner.commit()
    }

    fn synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.synced()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{serve, sync};
    use super::*;
    use crate::queue::local::LocalQueueError;
    use serde_json::json;

    #[test]
    fn a_jsonl_file_of_envelopes_is_served_by_priority() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(
            &path,
            "1\n{\"job\": 2, \"options\": {\"priority\": 1}}\n{\"job\": 3, \"options\": {\"priority\": 2}}\n{\"job\": 4, \"options\": {\"priority\": \"high\"}}\n",
        )
        .expect("write");
        let mut feeder = JsonlFeeder::open(&path).expect("open");
        assert_eq!(numbers(&serve(&mut feeder, 3)), [3, 2, 1]);
        let report = feeder.report().expect("report");
        assert_eq!(report.dead.len(), 1);
        assert!(report.dead[0].reason.contains("option \"priority\""));
        assert!(report.dead[0].reason.contains("jobs.jsonl"));
    }

    /// The payloads of `jobs`, as numbers.
    fn numbers(jobs: &[FileJob]) -> Vec<u64> {
        jobs.iter()
            .map(|job| job.payload().get().parse().expect("a number"))
            .collect()
    }

    /// Commits a JSONL feeder's changes and waits until they are durable.
    fn sync_jsonl(feeder: &mut JsonlFeeder) {
        sync(&mut feeder.inner);
    }

    /// Asks until the feeder says Done (bounded); no job may come.
    fn wait_done(feeder: &mut JsonlFeeder) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match feeder.next() {
                Next::Done => return,
                Next::Job(job) => panic!("a job more: {}", job.payload().get()),
                Next::Empty => {
                    assert!(std::time::Instant::now() < deadline, "never Done");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    fn append(path: &Path, text: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open to append");
        file.write_all(text.as_bytes()).expect("append");
    }

    #[test]
    fn a_restarted_jsonl_feeder_resumes_after_its_mark() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "1\n2\n3\n4\n5\n").expect("write");
        let mut feeder = JsonlFeeder::open(&path).expect("open");
        let jobs = serve(&mut feeder, 3);
        assert_eq!(numbers(&jobs), [1, 2, 3]);
        for job in &jobs {
            feeder.attempt(job);
        }
        feeder.success(jobs[0].clone());
        feeder.success(jobs[1].clone());
        sync_jsonl(&mut feeder);
        // A crash: job 3 is out, without an outcome.
        drop(feeder);

        let mut feeder = JsonlFeeder::open(&path).expect("reopen");
        let jobs = serve(&mut feeder, 3);
        assert_eq!(numbers(&jobs), [3, 4, 5], "done ones not again, none lost");
        assert_eq!(jobs[0].attempts(), 1);
        wait_done(&mut feeder);
        for job in jobs {
            feeder.success(job);
        }
        sync_jsonl(&mut feeder);
        drop(feeder);
        let state = JsonlFeeder::state_path(&path);
        assert_eq!(state, dir.path().join("jobs.jsonl.state"));
        let report = FileFeeder::inspect(&state).expect("inspect the state");
        assert_eq!((report.pending, report.dead.len()), (0, 0));
        // Everything done: a feeder started again has nothing to serve.
        let mut feeder = JsonlFeeder::open(&path).expect("reopen");
        wait_done(&mut feeder);
    }

    #[test]
    fn lines_added_to_a_jsonl_file_later_are_taken() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "1\n2\n").expect("write");
        let mut feeder = JsonlFeeder::open(&path).expect("open");
        assert_eq!(numbers(&serve(&mut feeder, 2)), [1, 2]);
        append(&path, "3\n4\n");
        assert_eq!(numbers(&serve(&mut feeder, 2)), [3, 4]);
        wait_done(&mut feeder);
        sync_jsonl(&mut feeder);
        drop(feeder);
        // Grown while no feeder ran: only the new lines (and the ones
        // without an outcome) are served.
        append(&path, "5\n");
        let mut feeder = JsonlFeeder::open(&path).expect("reopen");
        assert_eq!(numbers(&serve(&mut feeder, 5)), [1, 2, 3, 4, 5]);
        let jobs = serve(&mut feeder, 0);
        assert!(jobs.is_empty());
        wait_done(&mut feeder);
        let report = feeder.report().expect("report");
        assert_eq!(report.pending, 5, "no outcome yet for any");
    }

    #[test]
    fn a_jsonl_line_that_is_not_json_is_dead_and_a_last_line_waits_for_its_newline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "1\nnot json\n\n  \n3\n4").expect("write");
        let mut feeder = JsonlFeeder::open(&path).expect("open");
        let started = std::time::Instant::now();
        // "4" has no newline: taken once the file has not changed for a
        // while (its writer may still be writing it).
        assert_eq!(numbers(&serve(&mut feeder, 3)), [1, 3, 4]);
        assert!(started.elapsed() >= inbox::TAIL_SETTLE);
        wait_done(&mut feeder);
        let dead = feeder.report().expect("report").dead;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].job, json!("not json"));
        let reason = &dead[0].reason;
        assert!(
            reason.contains(&format!("a line of {} is not JSON", path.display())),
            "{reason}"
        );
        assert!(reason.contains("(byte 2)"), "{reason}");
    }

    #[test]
    fn a_replaced_or_shortened_jsonl_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "1\n2\n3\n").expect("write");
        let mut feeder = JsonlFeeder::open(&path).expect("open");
        let jobs = serve(&mut feeder, 3);
        feeder.success(jobs[0].clone());
        sync_jsonl(&mut feeder);
        drop(feeder);

        // Rewritten by an editor: a new file under the same name.
        let new = dir.path().join("jobs.jsonl.new");
        std::fs::write(&new, "1\n2\n3\n4\n").expect("write");
        let old = dir.path().join("jobs.jsonl.old");
        std::fs::rename(&path, &old).expect("move aside");
        std::fs::rename(&new, &path).expect("replace");
        let err = JsonlFeeder::open(&path).expect_err("replaced");
        let text = err.to_string();
        assert!(matches!(err, LocalQueueError::JobsFile { .. }), "{err:?}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains("replaced by another file since 6 bytes"),
            "{text}"
        );
        assert!(text.contains("jobs.jsonl.state"), "{text}");

        // The one taken in, back but cut shorter.
        std::fs::rename(&old, &path).expect("put back");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(2))
            .expect("truncate");
        let err = JsonlFeeder::open(&path).expect_err("shorter");
        assert!(
            err.to_string()
                .contains("2 bytes long, but 6 bytes of it were taken in"),
            "{err}"
        );

        // Missing altogether.
        std::fs::remove_file(&path).expect("remove");
        let err = JsonlFeeder::open(&path).expect_err("missing");
        assert!(err.to_string().contains("no such file"), "{err}");
    }
}
