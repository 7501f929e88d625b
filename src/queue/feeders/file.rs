//! [`FileFeeder`]: the durable file-backed queue, with its jobs
//! ([`FileJob`]) and what it reports ([`QueueReport`], [`DeadJob`],
//! [`PendingJob`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error_text::error_chain;
use crate::protocol::millis;
use crate::queue::durable::{
    inbox::{self, Intake, Source},
    record::Record,
    state::State,
    store,
    store::Store,
};
use crate::queue::local::{LocalQueueError, Result};
use crate::queue::options::{envelope_text, JobOptions};
use crate::queue::{Feeder, Next};
use crate::retry::RetryPolicy;

/// How often an idle [`FileFeeder`] looks at its inbox again.
pub const FILE_FEEDER_RECHECK: Duration = Duration::from_millis(50);

/// How often a [`FileFeeder`] whose intake is under way asks for the next
/// batch.
const INTAKE_RECHECK: Duration = Duration::from_millis(5);

/// Batches a [`FileFeeder`] records per call at most (the rest waits for
/// the next call, so one call never holds the server for long).
const BATCHES_PER_CALL: usize = 4;

/// Longest wait of the `taskherd queue` commands for a sync.
const COMMAND_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// A hook called with every job given up on and why.
type DeadHook = Box<dyn FnMut(&FileJob, &str) + Send>;

/// A durable feeder: a journal with group commit, an inbox producers add
/// to while it runs, dead jobs kept with their reasons; see
/// [`durable`](crate::queue::durable) for the files and what a crash can do.
///
/// It never says [`Next::Done`]: with nothing to serve it says
/// [`Next::Empty`], and looks at its inbox again after
/// [`FILE_FEEDER_RECHECK`]. No method blocks on the disk: changes are
/// written and synced by a thread of its own, and the feeder server holds
/// back what depends on them until they are durable
/// ([`Feeder::commit`], [`Feeder::synced`]). Jobs added to the inbox are
/// taken in by another thread, in batches, as the feeder serves.
///
/// ```
/// use taskherd::queue::{feeders::FileFeeder, Feeder, Next};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("jobs.queue");
/// FileFeeder::push(&path, serde_json::json!({"file": "a.png"}))?;
/// let mut feeder = FileFeeder::open(&path)?;
/// feeder.take_inbox()?; // a server does not need this: its intake runs by itself
/// let Next::Job(job) = feeder.next() else { panic!("one job") };
/// assert_eq!(job.payload().get(), r#"{"file":"a.png"}"#);
/// feeder.success(job);
/// assert_eq!(feeder.next(), Next::Empty);
/// # Ok(())
/// # }
/// ```
pub struct FileFeeder {
    /// The intake thread, started at the first [`next`](Feeder::next).
    /// (Declared first: it stops before the journal's lock is let go.)
    pub(super) intake: Option<Intake>,
    /// Where the intake takes jobs from: the inbox, or a JSON-lines file
    /// ([`JsonlFeeder`]).
    source: Source,
    /// The journal and the state.
    pub(super) store: Store,
    /// A generation whose last batch went in the commit numbered `.1`:
    /// once that is durable, its file may go.
    finishing: Vec<(u64, u64)>,
    /// The generation of a last batch recorded since the last commit.
    finished_now: Option<u64>,
    /// Called with every job given up on.
    dead_hook: Option<DeadHook>,
    /// Whether the journal's writes were failing at the last commit.
    failing: bool,
}

impl fmt::Debug for FileFeeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileFeeder")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// A job of a [`FileFeeder`]: its payload (all a consumer sees: it
/// serializes as just the payload), its id and its attempts so far.
#[derive(Debug, Clone)]
pub struct FileJob {
    /// The journal's id of the job.
    id: u64,
    /// Attempts before this delivery.
    attempts: u32,
    /// The JSON text that was added.
    payload: Arc<RawValue>,
    /// Its options, if it was added with some.
    options: Option<Arc<JobOptions>>,
}

impl PartialEq for FileJob {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.attempts == other.attempts
            && self.payload.get() == other.payload.get()
    }
}

impl FileJob {
    /// The journal's id of the job (a dead job put back gets a new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Attempts the job had when it was taken from the journal.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The JSON text that was added.
    pub fn payload(&self) -> &RawValue {
        &self.payload
    }

    /// The options it was added with, if any.
    pub fn options(&self) -> Option<&JobOptions> {
        self.options.as_deref()
    }

    /// The payload as a [`Value`].
    ///
    /// # Errors
    /// Never for a payload read from the journal (it is valid JSON); the
    /// error type is serde's.
    pub fn to_value(&self) -> serde_json::Result<Value> {
        serde_json::from_str(self.payload.get())
    }
}

impl Serialize for FileJob {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.payload.serialize(serializer)
    }
}

/// A job in the dead-letter list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadJob {
    /// The journal's id it had.
    pub id: u64,
    /// Its payload.
    pub job: Value,
    /// Why it was given up on.
    pub reason: String,
    /// Attempts it had.
    #[serde(default)]
    pub attempts: u32,
    /// When, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at_ms: Option<u64>,
}

/// A pending job, as [`FileFeeder::inspect_jobs`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingJob {
    /// The journal's id.
    pub id: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// Its payload.
    pub job: Value,
    /// Its options (the envelope's `options` object, a delay already
    /// turned into an `at` time), if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
}

/// What a file queue holds, as [`FileFeeder::report`] or
/// [`FileFeeder::inspect`] tell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueReport {
    /// Jobs in the journal without a final outcome (served ones included).
    pub pending: usize,
    /// Of those, jobs served by this feeder and without an outcome yet
    /// (always 0 from [`inspect`](FileFeeder::inspect)).
    pub in_flight: usize,
    /// Jobs added to the inbox and not yet taken into the journal.
    pub inbox: u64,
    /// Jobs given up on, oldest first.
    pub dead: Vec<DeadJob>,
    /// The journal's size in bytes.
    pub journal_bytes: u64,
}

impl FileFeeder {
    /// Opens (creating it if needed) the queue at `path`: locks and
    /// replays its journal. Jobs that were out when the last owner stopped
    /// or crashed are served again, with their attempts. The inbox is
    /// taken in by a thread of the feeder once it serves
    /// ([`next`](Feeder::next)), or now with [`take_inbox`](Self::take_inbox).
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Locked`] if another feeder (or `taskherd queue`)
    /// has it open; [`LocalQueueError::NotAJournal`] for a file that is not
    /// a queue journal; [`LocalQueueError::Corrupt`] with the offset of the
    /// damage; [`LocalQueueError::Io`].
    pub fn open(path: impl AsRef<Path>) -> Result<FileFeeder> {
        Self::open_from(path.as_ref(), Source::Inbox)
    }

    /// [`open`](Self::open), with the intake taking jobs from `source`.
    pub(super) fn open_from(path: &Path, source: Source) -> Result<FileFeeder> {
        let store = Store::open(path)?;
        Ok(FileFeeder {
            source,
            store,
            intake: None,
            finishing: Vec::new(),
            finished_now: None,
            dead_hook: None,
            failing: false,
        })
    }

    /// Calls `hook` with every job given up on and its reason (after it is
    /// recorded), for a log or a notification.
    #[must_use]
    pub fn with_dead_hook(mut self, hook: impl FnMut(&FileJob, &str) + Send + 'static) -> Self {
        self.dead_hook = Some(Box::new(hook));
        self
    }

    /// Adds a job to the queue at `path`, whether or not a feeder has it
    /// open: the job goes to its inbox, synced before this returns; returns
    /// its id (the one the queue, its consumers and `taskherd queue list`
    /// know it by), reserved in `<path>.ids`.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] if the inbox cannot be written.
    pub fn push(path: impl AsRef<Path>, payload: Value) -> Result<u64> {
        let mut line = serde_json::to_vec(&payload).map_err(LocalQueueError::Encode)?;
        line.push(b'\n');
        inbox::append(path.as_ref(), &line).map(|ids| ids.start)
    }

    /// Adds a job with options (a delay or start time, its own retry
    /// schedule, a priority, a unique key), whether or not a feeder has
    /// the queue open: it goes to the inbox as an envelope
    /// (`{"job": ..., "options": {...}}`, see [`options`](crate::queue::options)),
    /// a delay already turned into a start time, synced before this
    /// returns; returns its id. A job whose unique key a pending or running
    /// job holds is not added when the feeder takes it in (logged at info
    /// level; its id is never used).
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::queue::{feeders::FileFeeder, options::JobOptions};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("jobs.queue");
    /// let options = JobOptions::new().priority(10).retry([Duration::from_secs(1)]);
    /// FileFeeder::push_with(&path, serde_json::json!({"file": "a.png"}), options)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn push_with(path: impl AsRef<Path>, payload: Value, options: JobOptions) -> Result<u64> {
        let job = serde_json::value::to_raw_value(&payload).map_err(LocalQueueError::Encode)?;
        let options = options.resolved(millis::now());
        let text = envelope_text(&job, &options).map_err(LocalQueueError::Encode)?;
        let mut line = text.into_bytes();
        line.push(b'\n');
        inbox::append(path.as_ref(), &line).map(|ids| ids.start)
    }

    /// Adds jobs at once (one write, one sync); returns how many. All or
    /// nothing: after an error none of them was added.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn push_all(
        path: impl AsRef<Path>,
        payloads: impl IntoIterator<Item = Value>,
    ) -> Result<usize> {
        let mut buf = Vec::new();
        let mut count = 0;
        for payload in payloads {
            // Compact JSON has no raw newline: one value, one line.
            serde_json::to_writer(&mut buf, &payload).map_err(LocalQueueError::Encode)?;
            buf.push(b'\n');
            count += 1;
        }
        if count > 0 {
            inbox::append(path.as_ref(), &buf)?;
        }
        Ok(count)
    }

    /// Adds jobs given as JSON texts (checked already, as `taskherd queue
    /// add` does), one write and one sync; returns how many. All or nothing.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn push_raw<'a>(
        path: impl AsRef<Path>,
        payloads: impl IntoIterator<Item = &'a RawValue>,
    ) -> Result<usize> {
        Self::add_raw(path, payloads).map(|ids| (ids.end - ids.start) as usize)
    }

    /// [`push_raw`](Self::push_raw), returning the ids of the jobs (one
    /// after the other, in their order; empty when there was none).
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn add_raw<'a>(
        path: impl AsRef<Path>,
        payloads: impl IntoIterator<Item = &'a RawValue>,
    ) -> Result<std::ops::Range<u64>> {
        let mut buf = Vec::new();
        for payload in payloads {
            let text = payload.get();
            if text.contains('\n') {
                // Pretty JSON: make it one line.
                let value: Value = serde_json::from_str(text).map_err(LocalQueueError::Encode)?;
                serde_json::to_writer(&mut buf, &value).map_err(LocalQueueError::Encode)?;
            } else {
                buf.extend_from_slice(text.as_bytes());
            }
            buf.push(b'\n');
        }
        inbox::append(path.as_ref(), &buf)
    }

    /// Whether there is a queue at `path`: its journal, or an inbox that
    /// jobs were pushed to.
    pub fn exists(path: impl AsRef<Path>) -> bool {
        let path = path.as_ref();
        path.exists() || inbox::inbox_path(path).exists()
    }

    /// What the queue at `path` holds, read without taking it over (a
    /// feeder may be serving it).
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::NotAJournal`] (a journal of taskherd 0.1 is
    /// converted by [`open`](Self::open) only), [`LocalQueueError::Corrupt`],
    /// [`LocalQueueError::Io`].
    pub fn inspect(path: impl AsRef<Path>) -> Result<QueueReport> {
        let path = path.as_ref();
        let state = store::read_only(path)?;
        let journal_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Ok(QueueReport {
            pending: state.jobs.len(),
            in_flight: 0,
            inbox: inbox::waiting(path, (state.generation, state.offset))?,
            dead: dead_jobs(&state),
            journal_bytes,
        })
    }

    /// The pending jobs of the queue at `path` in the order they are
    /// served, read without taking it over (the inbox is not included).
    ///
    /// # Errors
    ///
    /// As [`inspect`](Self::inspect).
    pub fn inspect_jobs(path: impl AsRef<Path>) -> Result<Vec<PendingJob>> {
        let state = store::read_only(path.as_ref())?;
        let now = millis::now();
        let mut jobs: Vec<_> = state.jobs.iter().collect();
        // Due jobs by priority (higher first), then id; then the ones not
        // due yet, by time.
        jobs.sort_by_key(|(id, job)| {
            let options = job.options.as_deref();
            let due = options
                .and_then(JobOptions::due_ms)
                .filter(|&due| due > now);
            let priority = options.map_or(0, JobOptions::priority_value);
            (due.is_some(), due, std::cmp::Reverse(priority), **id)
        });
        Ok(jobs
            .into_iter()
            .map(|(id, job)| PendingJob {
                id: *id,
                attempts: job.attempts,
                job: serde_json::from_str(job.payload.get()).unwrap_or(Value::Null),
                options: job.options.as_deref().map(JobOptions::to_json),
            })
            .collect())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// What the queue holds now.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] if the inbox cannot be read.
    pub fn report(&self) -> Result<QueueReport> {
        let state = &self.store.state;
        Ok(QueueReport {
            pending: state.jobs.len(),
            in_flight: state.jobs.len() - state.untaken(),
            inbox: inbox::waiting(self.path(), (state.generation, state.offset))?,
            dead: dead_jobs(state),
            journal_bytes: self.store.journal_len(),
        })
    }

    /// Takes the whole inbox in now, on this thread, durably; returns how
    /// many jobs came in. Does nothing once the feeder serves (its intake
    /// thread does it).
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`].
    pub fn take_inbox(&mut self) -> Result<u64> {
        if self.intake.is_some() {
            return Ok(0);
        }
        inbox::take_all(&mut self.store, COMMAND_SYNC_TIMEOUT)
    }

    /// Rewrites the journal as a snapshot of what it holds now, and waits
    /// for it.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] if it cannot be written (the old journal
    /// stays in use).
    pub fn compact(&mut self) -> Result<()> {
        self.store.compact_and_wait(COMMAND_SYNC_TIMEOUT)
    }

    /// The journal size below which it is never compacted while serving
    /// (default 16 MiB); above it, it is compacted when it holds more than
    /// twice what its jobs need.
    pub fn set_compact_min_bytes(&mut self, bytes: u64) {
        self.store.set_compact_min_bytes(bytes);
    }

    /// Puts every dead job back in the queue under a new id, with its
    /// attempts cleared, durably; returns how many.
    ///
    /// # Errors
    ///
    /// [`LocalQueueError::Io`] if it cannot be synced.
    pub fn requeue_dead(&mut self) -> Result<usize> {
        let dead: Vec<(u64, Arc<RawValue>)> = self
            .store
            .state
            .dead
            .iter()
            .map(|(id, dead)| (*id, Arc::clone(&dead.payload)))
            .collect();
        // The ids of an inbox queue come from its counter, as producers'.
        let mut next = match self.source {
            Source::Inbox if !dead.is_empty() => Some(inbox::reserve(
                self.store.path(),
                dead.len() as u64,
                Some(self.store.state.next_id),
            )?),
            _ => None,
        };
        for (id, payload) in &dead {
            self.store.change(&Record::Forget { id: *id });
            match &mut next {
                Some(next) => {
                    self.store.push_as(*next, Arc::clone(payload), None);
                    *next += 1;
                }
                None => {
                    self.store.push(Arc::clone(payload));
                }
            }
        }
        let seq = self.store.commit();
        self.store.wait_synced(seq, COMMAND_SYNC_TIMEOUT)?;
        Ok(dead.len())
    }

    /// Records batches the intake read, and lets go of generations whose
    /// end is durable.
    fn absorb_intake(&mut self) {
        let synced = self.store.synced();
        let intake = match &mut self.intake {
            Some(intake) => intake,
            None => match Intake::spawn(
                self.store.path(),
                (self.store.state.generation, self.store.state.offset),
                &self.source,
            ) {
                Ok(intake) => self.intake.insert(intake),
                Err(err) => {
                    tracing::error!(cause = %error_chain(&err), "cannot start the intake of the inbox");
                    return;
                }
            },
        };
        self.finishing.retain(|&(generation, seq)| {
            if seq <= synced {
                intake.done(generation);
                false
            } else {
                true
            }
        });
        for _ in 0..BATCHES_PER_CALL {
            let Ok(batch) = intake.batches_rx.try_recv() else {
                break;
            };
            // A batch must continue the journal's own mark; anything else
            // would take lines in twice (or skip some).
            let (generation, offset) = (self.store.state.generation, self.store.state.offset);
            let continues = (batch.generation == generation && batch.start == offset)
                || (batch.generation > generation && batch.start == 0);
            if !continues {
                tracing::error!(
                    generation = batch.generation,
                    start = batch.start,
                    mark_generation = generation,
                    mark_offset = offset,
                    "an inbox batch does not follow the intake mark: dropped"
                );
                continue;
            }
            if batch.last && self.source == Source::Inbox {
                self.finished_now = Some(batch.generation);
            }
            inbox::absorb(&mut self.store, batch);
        }
    }
}

/// The dead jobs of a state, oldest first.
fn dead_jobs(state: &State) -> Vec<DeadJob> {
    state
        .dead
        .iter()
        .map(|(id, dead)| DeadJob {
            id: *id,
            job: serde_json::from_str(dead.payload.get()).unwrap_or(Value::Null),
            reason: dead.reason.clone(),
            attempts: dead.attempts,
            dead_at_ms: Some(dead.at_ms),
        })
        .collect()
}

impl Feeder for FileFeeder {
    type Job = FileJob;

    fn next(&mut self) -> Next<FileJob> {
        self.absorb_intake();
        let state = &mut self.store.state;
        let Some(id) = state.take_next(millis::now()) else {
            return Next::Empty;
        };
        let Some(job) = state.jobs.get(&id) else {
            // Invariant: the serving order holds pending jobs only.
            return Next::Empty;
        };
        Next::Job(FileJob {
            id,
            attempts: job.attempts,
            payload: Arc::clone(&job.payload),
            options: job.options.clone(),
        })
    }

    fn success(&mut self, job: FileJob) {
        self.store.change(&Record::Done { id: job.id });
    }

    fn error(&mut self, job: FileJob, reason: &str) {
        self.store.change(&Record::Dead {
            id: job.id,
            at_ms: millis::now(),
            reason,
        });
        if let Some(hook) = &mut self.dead_hook {
            hook(&job, reason);
        }
    }

    fn recheck(&self) -> Duration {
        let intake_busy = self.intake.as_ref().is_some_and(Intake::busy);
        let recheck = if intake_busy || !self.finishing.is_empty() {
            INTAKE_RECHECK
        } else {
            FILE_FEEDER_RECHECK
        };
        match self.store.state.next_due_ms() {
            Some(due) => recheck.min(Duration::from_millis(due.saturating_sub(millis::now()))),
            None => recheck,
        }
    }

    fn retry_policy(&self, job: &FileJob, first_attempt_at: SystemTime) -> Option<RetryPolicy> {
        job.options.as_ref()?.retry_policy(first_attempt_at)
    }

    fn job_id(&self, job: &FileJob) -> Option<u64> {
        Some(job.id)
    }

    fn attempts(&self, job: &FileJob) -> u32 {
        job.attempts
    }

    fn attempt(&mut self, job: &FileJob) {
        self.store.change(&Record::Attempt { id: job.id });
    }

    fn release(&mut self, job: &FileJob) {
        self.store.change(&Record::Unattempt { id: job.id });
    }

    fn commit(&mut self) -> u64 {
        let seq = self.store.commit();
        if let Some(generation) = self.finished_now.take() {
            self.finishing.push((generation, seq));
        }
        if self.store.maybe_compact() {
            tracing::debug!(path = %self.path().display(), "compacting the queue journal");
        }
        // The writer's troubles are logged here, on the server's thread
        // (whose log reaches the master), once per change.
        let (failing, compaction) = self.store.troubles();
        match (&failing, self.failing) {
            (Some(why), false) => tracing::error!(
                path = %self.path().display(),
                cause = %why,
                "queue journal writes fail: no job is served or confirmed until they work again"
            ),
            (None, true) => tracing::warn!(
                path = %self.path().display(),
                "queue journal writable again: serving resumes"
            ),
            _ => {}
        }
        self.failing = failing.is_some();
        if let Some(why) = compaction {
            tracing::warn!(cause = %why, "the old journal stays in use");
        }
        seq
    }

    fn synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.store.synced_rx())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{serve, sync};
    use super::*;
    use serde_json::json;

    fn payload(job: &FileJob) -> i64 {
        job.to_value().expect("JSON")["n"]
            .as_i64()
            .expect("a job of the test")
    }

    fn raw(text: &str) -> Arc<RawValue> {
        Arc::from(RawValue::from_string(text.to_owned()).expect("JSON"))
    }

    #[test]
    fn file_job_serializes_as_its_payload() {
        let job = FileJob {
            id: 7,
            attempts: 0,
            payload: raw(r#"{"file":"a.png","n":[1,2]}"#),
            options: None,
        };
        assert_eq!(
            serde_json::to_string(&job).expect("serializable"),
            r#"{"file":"a.png","n":[1,2]}"#
        );
        assert_eq!(
            job.to_value().expect("value"),
            json!({"file": "a.png", "n": [1, 2]})
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
        let jobs = serve(&mut feeder, 3);
        let [one, two, three] = [jobs[0].clone(), jobs[1].clone(), jobs[2].clone()];
        assert_eq!([payload(&one), payload(&two), payload(&three)], [1, 2, 3]);
        for job in &jobs {
            feeder.attempt(job);
        }
        feeder.success(one);
        feeder.error(two, "cannot parse");
        sync(&mut feeder);
        let report = feeder.report().expect("report");
        assert_eq!((report.pending, report.in_flight), (3, 1));
        // A crash: the third job is out, without an outcome.
        drop(feeder);

        let mut feeder = FileFeeder::open(&path).expect("reopen");
        let served = serve(&mut feeder, 3);
        assert_eq!(
            served.iter().map(payload).collect::<Vec<_>>(),
            [3, 4, 5],
            "acked and dead jobs never come back"
        );
        assert_eq!(served[0].attempts(), 1, "the interrupted attempt counts");
        assert_eq!(feeder.next(), Next::Empty, "never Done");

        let report = feeder.report().expect("report");
        assert_eq!((report.pending, report.in_flight), (3, 3));
        assert_eq!(report.dead.len(), 1);
        assert_eq!(report.dead[0].job, json!({"n": 2}));
        assert_eq!(report.dead[0].reason, "cannot parse");
        assert_eq!(report.dead[0].attempts, 1);
        assert!(report.dead[0].dead_at_ms.is_some());
        drop(feeder);
        let outside = FileFeeder::inspect(&path).expect("inspect");
        assert_eq!(
            (outside.pending, outside.dead.len(), outside.inbox),
            (3, 1, 0)
        );
    }

    #[test]
    fn released_deliveries_do_not_count() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push(&path, json!({"n": 1})).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        let job = serve(&mut feeder, 1).remove(0);
        feeder.attempt(&job);
        feeder.attempt(&job);
        feeder.release(&job);
        sync(&mut feeder);
        drop(feeder);
        let mut feeder = FileFeeder::open(&path).expect("reopen");
        assert_eq!(serve(&mut feeder, 1)[0].attempts(), 1);
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
        let served: Vec<i64> = serve(&mut feeder, 3).iter().map(payload).collect();
        assert_eq!(served, [1, 2, 3]);
        // The generation goes once its mark is durable.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while feeder.report().expect("report").inbox > 0 || inbox::taking_path(&path, 1).exists() {
            sync(&mut feeder);
            let _ = feeder.next();
            assert!(
                std::time::Instant::now() < deadline,
                "generation 1 never removed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        FileFeeder::push(&path, json!({"n": 4})).expect("push again");
        assert_eq!(payload(&serve(&mut feeder, 1)[0]), 4);
    }

    #[test]
    fn envelopes_order_by_priority_hold_unique_keys_and_delays() {
        use crate::queue::options::JobOptions;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push(&path, json!({"n": 1})).expect("push");
        FileFeeder::push_with(&path, json!({"n": 2}), JobOptions::new().priority(5)).expect("push");
        let unique = JobOptions::new().priority(5).unique("u");
        FileFeeder::push_with(&path, json!({"n": 3}), unique.clone()).expect("push");
        FileFeeder::push_with(&path, json!({"n": 4}), unique.clone()).expect("duplicate");
        let bad = RawValue::from_string(r#"{"job":{"n":5},"options":{"delay":"soon"}}"#.into())
            .expect("json");
        FileFeeder::push_raw(&path, [&*bad]).expect("push");
        let later = JobOptions::new()
            .delay(Duration::from_secs(3600))
            .priority(99);
        FileFeeder::push_with(&path, json!({"n": 6}), later).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        feeder.take_inbox().expect("intake");
        assert_eq!(
            feeder.store.state.duplicates, 1,
            "the duplicate was not added"
        );
        let report = feeder.report().expect("report");
        assert_eq!(report.pending, 4);
        assert_eq!(report.dead.len(), 1);
        assert!(
            report.dead[0].reason.contains("option \"delay\""),
            "{}",
            report.dead[0].reason
        );
        let served: Vec<FileJob> = (0..3)
            .map(|_| match feeder.next() {
                Next::Job(job) => job,
                other => panic!("a job, got {other:?}"),
            })
            .collect();
        assert_eq!(served.iter().map(payload).collect::<Vec<_>>(), [2, 3, 1]);
        // Job 6 is not due for an hour: nothing now, and asked again soon.
        assert_eq!(feeder.next(), Next::Empty);
        assert!(feeder.recheck() <= FILE_FEEDER_RECHECK);
        assert_eq!(feeder.report().expect("report").in_flight, 3);
        assert!(feeder.retry_policy(&served[0], SystemTime::now()).is_none());
        // Once job 3 is done its key is free: a new job with it is added.
        feeder.success(served[1].clone());
        FileFeeder::push_with(&path, json!({"n": 7}), unique).expect("push");
        assert_eq!(payload(&serve(&mut feeder, 1)[0]), 7);
    }

    #[test]
    fn a_job_s_retry_options_are_its_retry_policy() {
        use crate::queue::options::JobOptions;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let options = JobOptions::new().retry([Duration::from_secs(1), Duration::from_secs(10)]);
        FileFeeder::push_with(&path, json!(1), options).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        let job = serve(&mut feeder, 1).remove(0);
        assert_eq!(job.payload().get(), "1", "consumers get the job only");
        assert_eq!(
            feeder.retry_policy(&job, SystemTime::now()),
            Some(RetryPolicy::schedule([
                Duration::from_secs(1),
                Duration::from_secs(10)
            ]))
        );
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_dropped_and_garbage_kept_dead() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let inbox = inbox::inbox_path(&path);
        FileFeeder::push(&path, json!({"n": 1})).expect("push");
        // A producer that died in the middle of its write.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&inbox)
            .expect("inbox");
        file.write_all(br#"{"n": 2"#).expect("write");
        drop(file);
        FileFeeder::push(&path, json!({"n": 3})).expect("push after the torn line");
        // A line written by hand that is not JSON.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&inbox)
            .expect("inbox");
        file.write_all(b"not json\n").expect("write");
        drop(file);
        let mut feeder = FileFeeder::open(&path).expect("open");
        assert_eq!(feeder.take_inbox().expect("take"), 2);
        let served: Vec<i64> = serve(&mut feeder, 2).iter().map(payload).collect();
        assert_eq!(served, [1, 3]);
        assert_eq!(feeder.next(), Next::Empty);
        let dead = feeder.report().expect("report").dead;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].job, json!("not json"));
        assert!(dead[0].reason.contains("is not JSON"), "{}", dead[0].reason);
    }

    #[test]
    fn requeue_dead_serves_dead_jobs_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push_all(&path, [json!({"n": 1}), json!({"n": 2})]).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        let jobs = serve(&mut feeder, 2);
        feeder.error(jobs[0].clone(), "first");
        feeder.error(jobs[1].clone(), "second");
        sync(&mut feeder);
        drop(feeder);
        let mut feeder = FileFeeder::open(&path).expect("open");
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
        let served: Vec<i64> = serve(&mut feeder, 2).iter().map(payload).collect();
        assert_eq!(served, [1, 2]);
        assert!(served.iter().all(|_| true));
        assert_eq!(feeder.requeue_dead().expect("nothing to requeue"), 0);
    }

    #[test]
    fn compaction_keeps_the_state_and_shrinks_the_journal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push_all(&path, (1..=2000).map(|n| json!(n))).expect("push");
        let mut feeder = FileFeeder::open(&path).expect("open");
        assert_eq!(feeder.take_inbox().expect("take"), 2000);
        feeder.set_compact_min_bytes(0);
        let jobs = serve(&mut feeder, 1500);
        for job in jobs {
            feeder.attempt(&job);
            feeder.success(job);
            // The automatic compaction runs aside while this goes on.
            let _ = feeder.commit();
        }
        sync(&mut feeder);
        feeder.compact().expect("compact");
        let report = feeder.report().expect("report");
        assert_eq!(report.pending, 500);
        // 500 numbers of 4 digits plus a few bytes each.
        assert!(
            report.journal_bytes < 500 * 12 + 64,
            "{}",
            report.journal_bytes
        );
        drop(feeder);
        let mut feeder = FileFeeder::open(&path).expect("reopen");
        let served: Vec<u64> = serve(&mut feeder, 500)
            .iter()
            .map(|job| job.payload().get().parse().expect("number"))
            .collect();
        assert_eq!(served, (1501..=2000).collect::<Vec<u64>>());
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

    #[test]
    fn damage_names_the_file_and_offset_and_keeps_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        FileFeeder::push_all(&path, (1..=3).map(|n| json!(n))).expect("push");
        {
            let mut feeder = FileFeeder::open(&path).expect("open");
            feeder.take_inbox().expect("take");
            FileFeeder::push(&path, json!(4)).expect("push");
            feeder.take_inbox().expect("take");
        }
        let mut data = std::fs::read(&path).expect("read");
        data[store::MAGIC.len() + 9] ^= 0x40;
        std::fs::write(&path, &data).expect("write");
        let err = FileFeeder::open(&path).expect_err("damaged");
        assert!(
            matches!(&err, LocalQueueError::Corrupt { offset, .. } if *offset == store::MAGIC.len() as u64),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), data, "left as it was");
        std::fs::write(&path, b"something else entirely").expect("write");
        assert!(matches!(
            FileFeeder::open(&path),
            Err(LocalQueueError::NotAJournal { .. })
        ));
    }

    #[test]
    fn a_journal_of_taskherd_0_1_is_converted() {
        use crate::queue::local::{FileQueue, LocalQueue, QueueOptions};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        {
            let options = QueueOptions {
                visibility_timeout: Duration::MAX,
                max_receives: u32::MAX,
            };
            let mut old = FileQueue::open(&path, options).expect("v1");
            for n in 1..=3 {
                old.push(json!({ "n": n }), Default::default())
                    .expect("push");
            }
            let lease = old.receive_now().expect("receive").expect("a job");
            old.ack(&lease.lease_id).expect("ack");
        }
        std::fs::write(
            crate::files::sibling(&path, ".dead"),
            "{\"id\":9,\"job\":{\"n\":9},\"reason\":\"old\"}\n",
        )
        .expect("dead file");
        let mut feeder = FileFeeder::open(&path).expect("converted");
        let served: Vec<i64> = serve(&mut feeder, 2).iter().map(payload).collect();
        assert_eq!(served, [2, 3]);
        let dead = feeder.report().expect("report").dead;
        assert_eq!((dead.len(), dead[0].reason.as_str()), (1, "old"));
        assert!(!crate::files::sibling(&path, ".dead").exists());
    }
}
