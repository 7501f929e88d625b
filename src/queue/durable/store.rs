//! The journal's owner: replay at open, group commit on a writer thread,
//! compaction written aside while serving.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::watch;

use super::inbox;
use super::record::{Reader, Record};
use super::state::State;
use crate::backoff::Backoff;
use crate::error_text::error_chain;
use crate::files::{self, sibling, LockKind, Replacement};
use crate::queue::journal::{self, scan_frames, ScanEnd, COMPACT_SUFFIX};
use crate::queue::local::{LocalQueueError, Result};
use crate::queue::options::JobOptions;

/// The first bytes of a durable queue journal (binary records, format 1).
pub(crate) const MAGIC: &[u8; 8] = b"THQFEED1";

/// The first bytes of a journal of taskherd 0.1's file feeder (a
/// [`FileQueue`](crate::queue::local::FileQueue)): converted at open.
pub(crate) const V1_MAGIC: &[u8; 8] = b"THQJNL01";

/// First pause after a failed write (a full disk); it doubles up to
/// [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_millis(50);
/// Longest pause between two tries of a failing write.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// The pauses between tries of a failing write, without jitter (one
/// writer per journal: nothing to spread).
const WRITE_RETRY: Backoff = Backoff::doubling(RETRY_INITIAL, RETRY_MAX, 0.0);
/// How often the writer looks at a compaction running aside.
const SNAPSHOT_POLL: Duration = Duration::from_millis(20);
/// After a failed compaction, the next waits this long (or for the journal
/// to grow by half).
const COMPACT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The default of [`Store::set_compact_min_bytes`]: no compaction of a
/// journal smaller than this.
pub(crate) const DEFAULT_COMPACT_MIN_BYTES: u64 = 16 << 20;

fn io_error(path: &Path, source: io::Error) -> LocalQueueError {
    LocalQueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the feeder hands the writer thread.
enum Item {
    /// Journal frames, durable once written and synced.
    Frames {
        /// Covers every change up to this sequence number.
        seq: u64,
        /// The encoded frames.
        bytes: Vec<u8>,
    },
    /// Write this snapshot (magic included) aside and switch to it.
    Compact {
        /// The whole file.
        snapshot: Vec<u8>,
    },
}

/// What the feeder and the writer share.
struct Inner {
    /// Waiting for the writer, in order.
    items: Vec<Item>,
    /// The highest sequence number known durable.
    synced: u64,
    /// The feeder is gone: write what is left, then end.
    stop: bool,
    /// A compaction was asked for and has not ended.
    compacting: bool,
    /// Compactions that ended (well or not).
    compactions: u64,
    /// Why writes fail right now (a full disk), if they do.
    failing: Option<String>,
    /// Why the last compaction failed, if it did.
    compaction_failed: Option<String>,
    /// Compactions that failed.
    compaction_failures: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writer.
    wake: Condvar,
    /// Wakes threads waiting for a sync or a compaction.
    done: Condvar,
    /// The same as `Inner::synced`, for async waiters.
    synced_tx: watch::Sender<u64>,
    /// The journal's length on disk.
    journal_len: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain counters behind:
        // keep going with them.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits (on `done`) while `blocked` holds, until `deadline`; says
    /// whether it stopped holding.
    fn wait_while(
        &self,
        deadline: Instant,
        blocked: impl Fn(&Inner) -> bool,
    ) -> (MutexGuard<'_, Inner>, bool) {
        let mut inner = self.lock();
        while blocked(&inner) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (inner, false);
            }
            inner = self
                .done
                .wait_timeout(inner, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        (inner, true)
    }
}

/// The open, locked journal of a durable queue: the state it replays to,
/// records not yet handed to the writer, and the writer thread.
pub(crate) struct Store {
    path: PathBuf,
    /// The state, with every change applied (durable or not yet).
    pub(crate) state: State,
    /// Records since the last [`commit`](Self::commit).
    buf: Vec<u8>,
    /// The sequence number of the last commit.
    seq: u64,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// No automatic compaction of a journal smaller than this.
    compact_min_bytes: u64,
    /// After a failed compaction: the journal's length and the time then.
    compact_retry: Option<(u64, Instant)>,
    /// Failed compactions already taken into account.
    failures_seen: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("jobs", &self.state.jobs.len())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it if needed) and locks the journal at `path`,
    /// replays it, and starts the writer thread. A journal of taskherd 0.1
    /// is converted first.
    ///
    /// # Errors
    /// [`LocalQueueError::Locked`] when another process holds it;
    /// [`LocalQueueError::NotAJournal`]; [`LocalQueueError::Corrupt`] with
    /// the offset of the damage; [`LocalQueueError::Io`].
    pub(crate) fn open(path: &Path) -> Result<Store> {
        convert_v1_if_needed(path)?;
        let file = open_locked(path)?;
        let tmp = compact_tmp_path(path);
        files::remove_if_exists(&tmp).map_err(|source| io_error(&tmp, source))?;
        let mut data = Vec::new();
        (&file)
            .read_to_end(&mut data)
            .map_err(|source| io_error(path, source))?;
        if data.len() < MAGIC.len() && MAGIC.starts_with(&data) {
            // New, or its creation was cut short.
            file.write_all_at(MAGIC, 0)
                .and_then(|()| file.set_len(MAGIC.len() as u64))
                .and_then(|()| file.sync_all())
                .and_then(|()| files::sync_dir(path))
                .map_err(|source| io_error(path, source))?;
            data = MAGIC.to_vec();
        }
        let (state, end) = replay(path, &data)?;
        let len = match end {
            ScanEnd::Clean => data.len() as u64,
            ScanEnd::Torn { offset, reason } => {
                if journal::sound_frame_after(&data, offset).is_some() {
                    return Err(LocalQueueError::Corrupt {
                        path: path.to_path_buf(),
                        offset,
                        reason: "damaged frame followed by sound ones",
                    });
                }
                let tail = usize::try_from(offset).map_or(&data[..0], |at| &data[at..]);
                if tail.iter().any(|&b| b != 0) {
                    // Kept aside, never just dropped.
                    let aside = sibling(path, &format!(".torn-{offset}"));
                    std::fs::write(&aside, tail)
                        .and_then(|()| File::open(&aside)?.sync_all())
                        .map_err(|source| io_error(&aside, source))?;
                    tracing::warn!(
                        path = %path.display(),
                        offset,
                        dropped = tail.len(),
                        kept = %aside.display(),
                        reason,
                        "dropping a write torn by a crash at the end of the queue journal"
                    );
                }
                file.set_len(offset)
                    .and_then(|()| file.sync_all())
                    .map_err(|source| io_error(path, source))?;
                offset
            }
            ScanEnd::Corrupt { offset, reason } => {
                return Err(LocalQueueError::Corrupt {
                    path: path.to_path_buf(),
                    offset,
                    reason,
                })
            }
        };
        if state.strays > 0 {
            tracing::debug!(path = %path.display(), strays = state.strays, "journal records of jobs not held");
        }
        let (synced_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                items: Vec::new(),
                synced: 0,
                stop: false,
                compacting: false,
                compactions: 0,
                failing: None,
                compaction_failed: None,
                compaction_failures: 0,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            synced_tx,
            journal_len: AtomicU64::new(len),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            let owned = path.to_path_buf();
            std::thread::Builder::new()
                .name("taskherd-journal".into())
                .spawn(move || Writer::new(owned, file, len, shared).run())
                .map_err(|source| io_error(path, source))?
        };
        Ok(Store {
            path: path.to_path_buf(),
            state,
            buf: Vec::new(),
            seq: 0,
            shared,
            writer: Some(writer),
            compact_min_bytes: DEFAULT_COMPACT_MIN_BYTES,
            compact_retry: None,
            failures_seen: 0,
        })
    }

    /// The journal's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records a change without a payload: applied now, durable at the
    /// sync that covers the next [`commit`](Self::commit).
    pub(crate) fn change(&mut self, record: &Record<'_>) {
        self.state.apply_change(record);
        record.encode(&mut self.buf);
    }

    /// Records a new pending job (its id is the next one); returns the id.
    pub(crate) fn push(&mut self, payload: Arc<RawValue>) -> u64 {
        let id = self.state.next_id;
        self.push_as(id, payload, None);
        id
    }

    /// Records a new pending job with options (a delay already turned
    /// into a time); returns its id. Empty options are written as
    /// [`push`](Self::push) writes a job (a smaller record).
    pub(crate) fn push_with(&mut self, payload: Arc<RawValue>, options: JobOptions) -> u64 {
        let id = self.state.next_id;
        self.push_as(id, payload, Some(options));
        id
    }

    /// Records a new pending job under the id reserved for it (an inbox
    /// line), with its options if it has some (a delay already turned into
    /// a time).
    pub(crate) fn push_as(&mut self, id: u64, payload: Arc<RawValue>, options: Option<JobOptions>) {
        match options.filter(|options| !options.is_empty()) {
            None => {
                Record::Push {
                    id,
                    payload: payload.get().as_bytes(),
                }
                .encode(&mut self.buf);
                self.state.add(id, payload, 0);
            }
            Some(options) => {
                Record::PushWith {
                    id,
                    options: &options.encode(),
                    payload: payload.get().as_bytes(),
                }
                .encode(&mut self.buf);
                self.state.add_with(id, payload, 0, Some(Arc::new(options)));
            }
        }
    }

    /// Records a new dead job (a line that is not a job), under the id
    /// reserved for it if it has one; returns its id.
    pub(crate) fn bury_new(
        &mut self,
        id: Option<u64>,
        payload: Arc<RawValue>,
        at_ms: u64,
        reason: &str,
    ) -> u64 {
        let id = id.unwrap_or(self.state.next_id);
        Record::Buried {
            id,
            attempts: 0,
            at_ms,
            reason,
            payload: payload.get().as_bytes(),
        }
        .encode(&mut self.buf);
        self.state.bury_new(id, payload, at_ms, reason);
        id
    }

    /// Hands the changes recorded since the last call to the writer (as
    /// one frame: they become durable together); returns the sequence
    /// number whose sync covers them (and everything before).
    pub(crate) fn commit(&mut self) -> u64 {
        if self.buf.is_empty() {
            return self.seq;
        }
        let mut bytes = Vec::with_capacity(self.buf.len() + journal::FRAME_HEADER_LEN);
        if let Err(len) = journal::encode_frame(&self.buf, &mut bytes) {
            // Over 4 GiB of changes between two commits: split by record
            // would be needed; callers commit far more often than that.
            tracing::error!(len, "journal frame too large");
        }
        self.buf.clear();
        self.seq += 1;
        let seq = self.seq;
        let mut inner = self.shared.lock();
        inner.items.push(Item::Frames { seq, bytes });
        drop(inner);
        self.shared.wake.notify_one();
        seq
    }

    /// A receiver of the highest sequence number known durable.
    pub(crate) fn synced_rx(&self) -> watch::Receiver<u64> {
        self.shared.synced_tx.subscribe()
    }

    /// The highest sequence number known durable.
    pub(crate) fn synced(&self) -> u64 {
        *self.shared.synced_tx.borrow()
    }

    /// Why writes fail right now, if they do, and why the last
    /// compaction failed, if it did (taken: reported once).
    pub(crate) fn troubles(&self) -> (Option<String>, Option<String>) {
        let mut inner = self.shared.lock();
        let compaction = if inner.compacting {
            None
        } else {
            inner.compaction_failed.take()
        };
        (inner.failing.clone(), compaction)
    }

    /// Blocks until `seq` is durable, or `timeout` passed.
    ///
    /// # Errors
    /// [`LocalQueueError::Io`] (timed out) with why writes fail, if they do.
    pub(crate) fn wait_synced(&self, seq: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let (inner, done) = self.shared.wait_while(deadline, |inner| inner.synced < seq);
        if done {
            return Ok(());
        }
        let why = inner
            .failing
            .clone()
            .unwrap_or_else(|| "no sync in time".into());
        Err(io_error(
            &self.path,
            io::Error::new(io::ErrorKind::TimedOut, why),
        ))
    }

    /// The journal's length on disk.
    pub(crate) fn journal_len(&self) -> u64 {
        self.shared.journal_len.load(Ordering::Relaxed)
    }

    /// Sets the size below which the journal is never compacted by
    /// [`maybe_compact`](Self::maybe_compact).
    pub(crate) fn set_compact_min_bytes(&mut self, bytes: u64) {
        self.compact_min_bytes = bytes;
    }

    /// Starts a compaction when the journal is more than twice what the
    /// live jobs need (and at least the minimum), and none is running.
    /// Returns whether it started one.
    pub(crate) fn maybe_compact(&mut self) -> bool {
        let len = self.journal_len();
        let live = self.state.live_bytes + MAGIC.len() as u64;
        if len < self.compact_min_bytes || len <= live.saturating_mul(2) {
            return false;
        }
        if let Some((at_len, at)) = self.compact_retry {
            // After a failure: not again before the journal grew by half
            // or a minute passed.
            if len < at_len.saturating_add(at_len / 2) && at.elapsed() < COMPACT_RETRY_AFTER {
                return false;
            }
        }
        {
            let inner = self.shared.lock();
            if inner.compacting {
                return false;
            }
            if inner.compaction_failures > self.failures_seen {
                self.failures_seen = inner.compaction_failures;
                self.compact_retry = Some((len, Instant::now()));
                return false;
            }
        }
        self.compact_retry = None;
        self.start_compaction();
        true
    }

    /// Commits, then asks the writer to write the state aside and switch
    /// to it; serving goes on meanwhile.
    fn start_compaction(&mut self) {
        self.commit();
        let mut snapshot = MAGIC.to_vec();
        snapshot.extend_from_slice(&self.state.snapshot());
        let mut inner = self.shared.lock();
        inner.compacting = true;
        inner.items.push(Item::Compact { snapshot });
        drop(inner);
        self.shared.wake.notify_one();
    }

    /// Compacts now and waits for the switch (or its failure).
    ///
    /// # Errors
    /// [`LocalQueueError::Io`] if it did not happen within `timeout` or
    /// failed (the old journal stays in use).
    pub(crate) fn compact_and_wait(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // One at a time: let a compaction already running end first.
        let before = self
            .shared
            .wait_while(deadline, |inner| inner.compacting)
            .0
            .compactions;
        self.start_compaction();
        let (inner, done) = self
            .shared
            .wait_while(deadline, |inner| inner.compactions <= before);
        if !done {
            return Err(io_error(
                &self.path,
                io::Error::new(io::ErrorKind::TimedOut, "compaction did not end in time"),
            ));
        }
        if let Some(why) = inner.compaction_failed.clone().or(inner.failing.clone()) {
            return Err(io_error(&self.path, io::Error::other(why)));
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.commit();
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// `<path>.compact.tmp`.
fn compact_tmp_path(path: &Path) -> PathBuf {
    sibling(path, COMPACT_SUFFIX)
}

/// Opens and locks the journal (see [`journal::open_locked`]).
fn open_locked(path: &Path) -> Result<File> {
    journal::open_locked(path).map_err(|err| match err {
        journal::OpenLockedError::Locked => LocalQueueError::Locked {
            path: path.to_path_buf(),
        },
        journal::OpenLockedError::Io(source) => io_error(path, source),
    })
}

/// Replays `data` (a whole journal, magic included) into a state.
///
/// # Errors
/// [`LocalQueueError::NotAJournal`], or [`LocalQueueError::Corrupt`] for a
/// record that passed its checksum but does not decode.
pub(crate) fn replay(path: &Path, data: &[u8]) -> Result<(State, ScanEnd)> {
    if !data.starts_with(MAGIC) {
        return Err(LocalQueueError::NotAJournal {
            path: path.to_path_buf(),
        });
    }
    let mut state = State::new();
    let end = scan_frames(data, MAGIC.len(), |offset, payload| {
        let corrupt = |reason| LocalQueueError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        let mut reader = Reader::new(payload);
        while let Some(record) = reader.next_record().map_err(corrupt)? {
            state
                .apply(&record)
                .map_err(|_| corrupt("a job's payload is not JSON"))?;
        }
        Ok(())
    })?;
    Ok((state, end))
}

/// Reads the journal at `path` without locking it (a feeder may be
/// writing it): the state of its sound frames.
///
/// # Errors
/// As [`replay`]; [`LocalQueueError::Io`] if it cannot be read. A torn
/// tail is not an error (it may be a write in progress).
pub(crate) fn read_only(path: &Path) -> Result<State> {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(State::new()),
        Err(source) => return Err(io_error(path, source)),
    };
    if data.is_empty() || (data.len() < MAGIC.len() && MAGIC.starts_with(&data)) {
        return Ok(State::new());
    }
    if data.starts_with(V1_MAGIC) {
        return Err(LocalQueueError::NotAJournal {
            path: path.to_path_buf(),
        });
    }
    match replay(path, &data)? {
        (_, ScanEnd::Corrupt { offset, reason }) => Err(LocalQueueError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        }),
        (state, _) => Ok(state),
    }
}

/// Converts a journal of taskherd 0.1's file feeder (and its `.dead`
/// file) into the current format, once.
fn convert_v1_if_needed(path: &Path) -> Result<()> {
    let mut head = [0u8; 8];
    match File::open(path) {
        Ok(file) => match file.read_exact_at(&mut head, 0) {
            Ok(()) if &head == V1_MAGIC => {}
            _ => return Ok(()),
        },
        Err(_) => return Ok(()),
    }
    use crate::queue::local::{FileQueue, LocalQueue, QueueOptions};
    let options = QueueOptions {
        visibility_timeout: Duration::MAX,
        max_receives: u32::MAX,
    };
    let mut old = FileQueue::open(path, options)?;
    let now_ms = crate::protocol::millis::now();
    // Its jobs, then numbered from ids reserved like any producer's.
    let mut dead = Vec::new();
    let mut pending = Vec::new();
    for message in old.dead_letters() {
        if let Ok(payload) = serde_json::value::to_raw_value(&message.payload) {
            dead.push((
                Arc::from(payload),
                now_ms,
                "dead in taskherd 0.1".to_owned(),
            ));
        }
    }
    while let Some(lease) = old.receive_now()? {
        if let Ok(payload) = serde_json::value::to_raw_value(&lease.message.payload) {
            let attempts = lease.message.receive_count.saturating_sub(1);
            pending.push((Arc::from(payload), attempts));
        }
    }
    let dead_path = sibling(path, ".dead");
    if let Ok(text) = std::fs::read_to_string(&dead_path) {
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let reason = entry["reason"]
                .as_str()
                .unwrap_or("dead in taskherd 0.1")
                .to_owned();
            let at_ms = entry["dead_at_ms"].as_u64().unwrap_or(now_ms);
            if let Ok(payload) = serde_json::value::to_raw_value(&entry["job"]) {
                dead.push((Arc::from(payload), at_ms, reason));
            }
        }
    }
    let mut state = State::new();
    state.next_id = inbox::reserve(path, (dead.len() + pending.len()) as u64, Some(1))?;
    for (payload, at_ms, reason) in dead {
        state.bury_new(state.next_id, payload, at_ms, &reason);
    }
    for (payload, attempts) in pending {
        state.add(state.next_id, payload, attempts);
    }
    let mut data = MAGIC.to_vec();
    data.extend_from_slice(&state.snapshot());
    let written = Replacement::create(path, COMPACT_SUFFIX, 0o666)
        .and_then(|new| {
            new.file()
                .write_all_at(&data, 0)
                .and_then(|()| new.commit())
        })
        .and_then(|_converted| files::remove_if_exists(&dead_path))
        .and_then(|()| files::sync_dir(path));
    drop(old);
    written.map_err(|source| io_error(path, source))?;
    tracing::info!(
        path = %path.display(),
        pending = state.jobs.len(),
        dead = state.dead.len(),
        "converted a queue journal of taskherd 0.1"
    );
    Ok(())
}

/// The writer thread: group commit and the switch to compacted journals.
struct Writer {
    path: PathBuf,
    file: File,
    /// Bytes of valid data; the next frame goes here.
    len: u64,
    shared: Arc<Shared>,
    /// Frames that failed to be written, with the sequence they cover.
    retry: Vec<u8>,
    retry_seq: u64,
    /// Writes failed in a row: the [`WRITE_RETRY`] step of the pause
    /// before the next try of `retry`.
    failures: u32,
    /// The directory was not synced after a compaction's rename.
    dir_unsynced: bool,
    /// A compaction in progress: the snapshot's writer, its length, and
    /// the frames that came after it.
    compaction: Option<(JoinHandle<io::Result<Replacement>>, u64, Vec<u8>)>,
}

impl Writer {
    fn new(path: PathBuf, file: File, len: u64, shared: Arc<Shared>) -> Self {
        Writer {
            path,
            file,
            len,
            shared,
            retry: Vec::new(),
            retry_seq: 0,
            failures: 0,
            dir_unsynced: false,
            compaction: None,
        }
    }

    fn run(mut self) {
        loop {
            let (items, stop) = {
                let mut inner = self.shared.lock();
                if inner.items.is_empty() && !inner.stop {
                    if self.retry.is_empty() && self.compaction.is_none() {
                        inner = self
                            .shared
                            .wake
                            .wait_while(inner, |inner| inner.items.is_empty() && !inner.stop)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    } else {
                        let pause = if self.retry.is_empty() {
                            SNAPSHOT_POLL
                        } else {
                            WRITE_RETRY.delay(self.failures, 0.5)
                        };
                        inner = self
                            .shared
                            .wake
                            .wait_timeout(inner, pause)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
                (std::mem::take(&mut inner.items), inner.stop)
            };
            let mut out = std::mem::take(&mut self.retry);
            let mut last = self.retry_seq;
            for item in items {
                match item {
                    Item::Frames { seq, bytes } => {
                        if let Some((_, _, tail)) = &mut self.compaction {
                            tail.extend_from_slice(&bytes);
                        }
                        out.extend_from_slice(&bytes);
                        last = seq;
                    }
                    Item::Compact { snapshot } => self.start_compaction(snapshot),
                }
            }
            let wrote = out.is_empty() || self.write(out, last);
            self.finish_compaction(stop);
            if stop && (self.retry.is_empty() || !wrote) && self.compaction.is_none() {
                if !self.retry.is_empty() {
                    tracing::error!(
                        path = %self.path.display(),
                        bytes = self.retry.len(),
                        "queue journal: the last changes could not be written; they were never confirmed"
                    );
                }
                return;
            }
        }
    }

    /// Writes and syncs `out`; on failure keeps it for the next try.
    fn write(&mut self, out: Vec<u8>, last: u64) -> bool {
        let result = self
            .file
            .write_all_at(&out, self.len)
            .and_then(|()| self.file.sync_data())
            .and_then(|()| {
                // The compacted journal's name must be durable before
                // anything written to it is confirmed.
                if self.dir_unsynced {
                    files::sync_dir(&self.path)?;
                    self.dir_unsynced = false;
                }
                Ok(())
            });
        match result {
            Ok(()) => {
                self.len += out.len() as u64;
                self.shared.journal_len.store(self.len, Ordering::Relaxed);
                self.failures = 0;
                let mut inner = self.shared.lock();
                inner.failing = None;
                inner.synced = last;
                drop(inner);
                self.shared.synced_tx.send_replace(last);
                self.shared.done.notify_all();
                true
            }
            Err(err) => {
                // Nothing after `len` counts: cut what may have reached the
                // file, and write it all again at the next try.
                let _ = self.file.set_len(self.len);
                let why = format!(
                    "cannot write the queue journal {}: {err}",
                    self.path.display()
                );
                let mut inner = self.shared.lock();
                inner.failing = Some(why);
                drop(inner);
                self.shared.done.notify_all();
                self.retry = out;
                self.retry_seq = last;
                self.failures = self.failures.saturating_add(1);
                false
            }
        }
    }

    fn start_compaction(&mut self, snapshot: Vec<u8>) {
        if self.compaction.is_some() {
            self.compaction_ended();
            return;
        }
        let path = self.path.clone();
        let len = snapshot.len() as u64;
        let spawned = std::thread::Builder::new()
            .name("taskherd-compact".into())
            .spawn(move || -> io::Result<Replacement> {
                let new = Replacement::create(&path, COMPACT_SUFFIX, 0o666)?;
                // Locked before it takes the journal's place, so no opener
                // can slip in between.
                files::try_lock(new.file(), LockKind::Exclusive)?;
                new.file().write_all_at(&snapshot, 0)?;
                new.file().sync_data()?;
                Ok(new)
            });
        match spawned {
            Ok(handle) => {
                self.shared.lock().compaction_failed = None;
                self.compaction = Some((handle, len, Vec::new()));
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot start a compaction");
                self.compaction_ended();
            }
        }
    }

    /// Switches to the compacted journal once it is written (or drops it
    /// if it failed, or at stop).
    fn finish_compaction(&mut self, stop: bool) {
        let finished = self
            .compaction
            .as_ref()
            .is_some_and(|(handle, _, _)| handle.is_finished());
        if !finished && !stop {
            return;
        }
        let Some((handle, snapshot_len, tail)) = self.compaction.take() else {
            return;
        };
        // A compaction dropped unfinished removes its file.
        let written = match handle.join() {
            Ok(result) => result,
            Err(_) => Err(io::Error::other("the compaction thread panicked")),
        };
        let switched = written.and_then(|new| {
            if stop || !self.retry.is_empty() {
                return Err(io::Error::other("not switched: stopping or writes failing"));
            }
            new.file().write_all_at(&tail, snapshot_len)?;
            new.commit()
        });
        match switched {
            Ok(file) => {
                let before = self.len;
                self.file = file;
                self.len = snapshot_len + tail.len() as u64;
                self.shared.journal_len.store(self.len, Ordering::Relaxed);
                if files::sync_dir(&self.path).is_err() {
                    // Tried again before the next confirmation.
                    self.dir_unsynced = true;
                }
                tracing::debug!(
                    path = %self.path.display(),
                    before,
                    after = self.len,
                    "compacted queue journal"
                );
            }
            Err(err) => {
                if !stop {
                    let mut inner = self.shared.lock();
                    inner.compaction_failures += 1;
                    inner.compaction_failed = Some(format!(
                        "cannot compact the queue journal {}: {}",
                        self.path.display(),
                        error_chain(&err)
                    ));
                }
            }
        }
        self.compaction_ended();
    }

    fn compaction_ended(&self) {
        let mut inner = self.shared.lock();
        inner.compacting = false;
        inner.compactions += 1;
        drop(inner);
        self.shared.done.notify_all();
    }
}
