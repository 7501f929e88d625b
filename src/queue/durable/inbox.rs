//! The inbox: where producers add jobs while a feeder owns the journal,
//! and how the owner takes them in exactly once.
//!
//! Producers append JSON lines to `<path>.inbox` under an exclusive
//! `flock`, and sync. The owner takes the inbox in generations: under the
//! same lock it renames `<path>.inbox` to `<path>.inbox.<g>` (the next
//! generation number) and syncs the directory, so no producer writes to
//! it any more (a producer that waited for the lock sees that the path
//! now names another file, and opens the new inbox). It then reads the
//! renamed file in batches; each batch's jobs go into the journal in one
//! frame together with an intake mark `(g, offset after the batch)`. A
//! restart resumes generation `g` after the mark, so every line is taken
//! in exactly once. Once the mark at the end of the file is durable, the
//! file is removed and the next generation may start.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::value::RawValue;

use super::record::Record;
use super::store::Store;
use crate::error_text::error_chain;
use crate::files::{self, sibling, LockKind};
use crate::queue::local::{LocalQueueError, Result};
use crate::queue::options::{split_envelope, JobOptions};

/// Jobs in one intake batch at most.
const BATCH_JOBS: usize = 8192;
/// Payload bytes in one intake batch at most.
const BATCH_BYTES: usize = 4 << 20;
/// How often an idle intake looks at the inbox.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Pause after an intake error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Batches read ahead of the feeder at most.
const READ_AHEAD: usize = 4;
/// How many times a producer reopens an inbox renamed under its feet.
const OPEN_ATTEMPTS: usize = 16;
/// Longest wait of the intake for the inbox's lock (a producer holds it
/// for one write).
const INBOX_LOCK_WAIT: Duration = Duration::from_secs(1);

fn io_error(path: &Path, source: io::Error) -> LocalQueueError {
    LocalQueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `<path>.inbox`.
pub(crate) fn inbox_path(path: &Path) -> PathBuf {
    sibling(path, ".inbox")
}

/// `<path>.inbox.<generation>`.
pub(crate) fn taking_path(path: &Path, generation: u64) -> PathBuf {
    sibling(path, &format!(".inbox.{generation}"))
}

/// `<path>.ids`: the next job id of the queue at `path`, reserved by
/// whoever adds jobs (producers, and the owner for jobs it makes itself)
/// under the inbox's lock.
pub(crate) fn ids_path(path: &Path) -> PathBuf {
    sibling(path, ".ids")
}

/// Width of the number in `<path>.ids` (always written whole, in one
/// write of a few bytes).
const IDS_WIDTH: usize = 20;

/// Runs `write` on the inbox of the queue at `path` under its exclusive
/// `flock`, with its length after any torn tail was cut. The lock also
/// guards `<path>.ids`: every producer holding it holds the inbox that the
/// path names now.
fn with_inbox<T>(path: &Path, mut write: impl FnMut(&File, u64) -> Result<T>) -> Result<T> {
    let inbox = inbox_path(path);
    let io = |source| io_error(&inbox, source);
    for _ in 0..OPEN_ATTEMPTS {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&inbox)
            .map_err(io)?;
        files::lock(&file, LockKind::Exclusive).map_err(io)?;
        let ours = file.metadata().map_err(io)?;
        match std::fs::metadata(&inbox) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
            // Taken in (renamed) while we waited for the lock.
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(io(source)),
        }
        let len = cut_torn_tail(&file, &inbox).map_err(io)?;
        return write(&file, len);
    }
    Err(io(io::Error::other("the inbox kept being replaced")))
}

/// Takes `count` ids from `<path>.ids`, durably, under the inbox's lock
/// (held by the caller); returns the first. Without the file, ids start
/// after those of the journal (read without locking it) and `floor` (the
/// owner's next id).
fn reserve_locked(path: &Path, count: u64, floor: Option<u64>) -> Result<u64> {
    let ids = ids_path(path);
    let io = |source| io_error(&ids, source);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&ids)
        .map_err(io)?;
    let mut text = Vec::new();
    (&file).read_to_end(&mut text).map_err(io)?;
    let stored = if text.is_empty() {
        None
    } else {
        let number = std::str::from_utf8(&text)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|&next| next > 0);
        match number {
            Some(next) => Some(next),
            None => {
                return Err(io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a job id counter (a number of up to 20 digits); \
                     remove it only if the queue's journal and inbox are gone too",
                )))
            }
        }
    };
    let first = match (stored, floor) {
        (Some(next), floor) => next.max(floor.unwrap_or(1)),
        (None, Some(floor)) => floor.max(1),
        (None, None) => match super::store::read_only(path) {
            Ok(state) => state.next_id.max(1),
            // A journal of taskherd 0.1: its conversion reserves its ids.
            Err(LocalQueueError::NotAJournal { .. }) => 1,
            Err(err) => return Err(err),
        },
    };
    let next = first
        .checked_add(count)
        .ok_or_else(|| io(io::Error::other("job ids ran out")))?;
    let line = format!("{next:0IDS_WIDTH$}\n");
    file.write_all_at(line.as_bytes(), 0)
        .and_then(|()| file.set_len(line.len() as u64))
        .and_then(|()| file.sync_data())
        .and_then(|()| {
            if stored.is_none() {
                files::sync_dir(&ids)
            } else {
                Ok(())
            }
        })
        .map_err(io)?;
    Ok(first)
}

/// Reserves `count` job ids of the queue at `path` (for jobs its owner
/// makes itself: dead jobs put back, lines added without an id, a
/// converted journal); returns the first. `floor`: the owner's next id.
///
/// # Errors
/// [`LocalQueueError::Io`]; a damaged `<path>.ids`.
pub(crate) fn reserve(path: &Path, count: u64, floor: Option<u64>) -> Result<u64> {
    with_inbox(path, |_, _| reserve_locked(path, count, floor))
}

/// Appends whole JSON lines (one job each, compact) to the inbox of the
/// queue at `path`, each under the id it gets (reserved from
/// `<path>.ids`, synced first), and syncs; returns the ids. All or
/// nothing: after an error (a full disk) the inbox is cut back to where it
/// was (ids reserved then are never used).
///
/// # Errors
/// [`LocalQueueError::Io`]; a damaged `<path>.ids`.
pub(crate) fn append(path: &Path, lines: &[u8]) -> Result<std::ops::Range<u64>> {
    let count = memchr::memchr_iter(b'\n', lines).count() as u64;
    if count == 0 {
        return Ok(1..1);
    }
    let inbox = inbox_path(path);
    with_inbox(path, |file, len| {
        let first = reserve_locked(path, count, None)?;
        let mut numbered = Vec::with_capacity(lines.len() + lines.len() / 8 + 32);
        for (id, line) in (first..).zip(lines.split_inclusive(|&b| b == b'\n')) {
            numbered.push(b'#');
            numbered.extend_from_slice(id.to_string().as_bytes());
            numbered.push(b' ');
            numbered.extend_from_slice(line);
        }
        let written = file
            .write_all_at(&numbered, len)
            .and_then(|()| file.sync_data())
            .and_then(|()| {
                if len == 0 {
                    // Possibly a new file: make its name durable too.
                    files::sync_dir(&inbox)
                } else {
                    Ok(())
                }
            });
        if let Err(err) = written {
            let _ = file.set_len(len);
            let _ = file.sync_data();
            return Err(io_error(&inbox, err));
        }
        Ok(first..first + count)
    })
}

/// Truncates `file` after its last newline if it does not end with one
/// (a line cut short by a producer that died); returns its length.
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
    // Look back for the last newline, a block at a time.
    let mut end = len;
    let mut cut = 0;
    let mut block = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            cut = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(
        path = %path.display(),
        bytes = len - cut,
        "dropping a line cut short by a producer that died"
    );
    file.set_len(cut)?;
    Ok(cut)
}

/// Jobs read from one generation of the inbox.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The generation.
    pub(crate) generation: u64,
    /// The offset of its first line.
    pub(crate) start: u64,
    /// The offset just after the last line of the batch.
    pub(crate) end: u64,
    /// The jobs, in order, with the id reserved for them (a line of the
    /// inbox; none for a line of a JSON-lines file, numbered by its feeder)
    /// and their options (from an envelope; a delay not yet turned into a
    /// time).
    pub(crate) jobs: Vec<(Option<u64>, Arc<RawValue>, Option<JobOptions>)>,
    /// Lines that are not jobs: their id, their text (as a JSON string)
    /// and why.
    pub(crate) rejects: Vec<(Option<u64>, Arc<RawValue>, String)>,
    /// Whether the generation ends with this batch.
    pub(crate) last: bool,
}

/// The generation to take in next and where to start: a file left by an
/// earlier owner (resumed after the journal's mark), else the inbox,
/// renamed to the next generation. `None` when there is nothing to take.
///
/// # Errors
/// [`LocalQueueError::Io`].
pub(crate) fn next_generation(
    path: &Path,
    mark: (u64, u64),
    scan_leftovers: bool,
) -> Result<Option<(u64, u64)>> {
    let (marked, offset) = mark;
    let mut leftovers = if scan_leftovers {
        leftover_generations(path)?
    } else {
        Vec::new()
    };
    leftovers.sort_unstable();
    for generation in leftovers {
        if generation < marked {
            // Fully taken in before (its removal did not last).
            let stale = taking_path(path, generation);
            files::remove_if_exists(&stale).map_err(|source| io_error(&stale, source))?;
            continue;
        }
        let from = if generation == marked { offset } else { 0 };
        return Ok(Some((generation, from)));
    }
    let inbox = inbox_path(path);
    let file = match OpenOptions::new().read(true).write(true).open(&inbox) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(&inbox, source)),
    };
    if file
        .metadata()
        .map_err(|source| io_error(&inbox, source))?
        .len()
        == 0
    {
        return Ok(None);
    }
    // Bounded: a producer stopped while holding the lock must not hold
    // the intake (and the feeder's stop) forever; it is tried again later.
    match files::lock_within(&file, LockKind::Exclusive, INBOX_LOCK_WAIT) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(source) => return Err(io_error(&inbox, source)),
    }
    let ours = file.metadata().map_err(|source| io_error(&inbox, source))?;
    match std::fs::metadata(&inbox) {
        Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() && now.len() > 0 => {}
        _ => return Ok(None),
    }
    let generation = marked + 1;
    let taking = taking_path(path, generation);
    if taking.exists() {
        // Never replace a generation not taken in: it is resumed first.
        return Err(io_error(
            &taking,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "an inbox generation is in the way",
            ),
        ));
    }
    std::fs::rename(&inbox, &taking)
        .and_then(|()| files::sync_dir(&taking))
        .map_err(|source| io_error(&taking, source))?;
    drop(file);
    Ok(Some((generation, 0)))
}

/// The generations of `<path>.inbox.<g>` files in the directory.
fn leftover_generations(path: &Path) -> Result<Vec<u64>> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.inbox.");
    let entries = std::fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_error(dir, source))?;
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if let Ok(generation) = rest.parse::<u64>() {
            found.push(generation);
        }
    }
    Ok(found)
}

/// Reads generation `generation` from `from` on, in batches; `each` gets
/// every batch, the last one flagged (possibly with no job). A line cut
/// short at the end (its producer died before its sync) is dropped.
///
/// # Errors
/// [`LocalQueueError::Io`], or what `each` returned.
pub(crate) fn read_generation(
    path: &Path,
    generation: u64,
    from: u64,
    each: impl FnMut(Batch) -> Result<()>,
) -> Result<()> {
    let taking = taking_path(path, generation);
    let inbox = inbox_path(path);
    let reason = |start: u64, err: &serde_json::Error| {
        format!(
            "a line added to {} is not JSON: {err} (byte {start} of {}, the inbox as taken in)",
            inbox.display(),
            taking.display()
        )
    };
    let mut each = each;
    read_lines(
        &taking,
        generation,
        from,
        Tail::DropCutShort,
        reason,
        |mut batch| {
            number_unnumbered(path, &mut batch)?;
            each(batch)
        },
    )
}

/// Gives ids (reserved now) to the lines of an inbox batch written
/// without one (by an older taskherd): every job of an inbox has an id
/// from `<path>.ids`.
fn number_unnumbered(path: &Path, batch: &mut Batch) -> Result<()> {
    let missing = batch.jobs.iter().filter(|job| job.0.is_none()).count()
        + batch
            .rejects
            .iter()
            .filter(|reject| reject.0.is_none())
            .count();
    if missing == 0 {
        return Ok(());
    }
    let first = reserve(path, missing as u64, None)?;
    let ids = batch
        .jobs
        .iter_mut()
        .map(|job| &mut job.0)
        .chain(batch.rejects.iter_mut().map(|reject| &mut reject.0))
        .filter(|id| id.is_none());
    for (next, id) in (first..).zip(ids) {
        *id = Some(next);
    }
    Ok(())
}

/// What [`read_lines`] does with a last line without its newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Drop it with a warning: its producer died before its sync (an inbox
    /// generation, which nobody writes to any more).
    DropCutShort,
    /// Leave it for later: its writer may still be writing it (a
    /// JSON-lines file that may grow).
    Wait,
    /// Take it as a whole line: the file has not changed for a while, its
    /// last line just has no newline (a JSON-lines file).
    Take,
}

/// Reads the JSON lines of `file` from byte `from` on, in batches marked
/// as generation `generation`; `each` gets every batch, the last one
/// flagged (possibly with no job). A line that is not JSON becomes a
/// reject with `reason(offset, error)`; `tail` says what becomes of a last
/// line without its newline (not read, unless [`Tail::Take`]).
///
/// # Errors
/// [`LocalQueueError::Io`], or what `each` returned.
pub(crate) fn read_lines(
    file: &Path,
    generation: u64,
    from: u64,
    tail: Tail,
    reason: impl Fn(u64, &serde_json::Error) -> String,
    mut each: impl FnMut(Batch) -> Result<()>,
) -> Result<()> {
    let io = |source| io_error(file, source);
    let mut opened = File::open(file).map_err(io)?;
    opened.seek(SeekFrom::Start(from)).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 20, opened);
    let mut offset = from;
    let mut line = Vec::new();
    let new_batch = |end| Batch {
        generation,
        start: end,
        end,
        jobs: Vec::new(),
        rejects: Vec::new(),
        last: false,
    };
    let mut batch = new_batch(from);
    let mut bytes = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            match tail {
                Tail::DropCutShort => {
                    tracing::warn!(
                        path = %file.display(),
                        offset,
                        bytes = n,
                        "dropping a line cut short by a producer that died"
                    );
                    break;
                }
                Tail::Wait => break,
                Tail::Take => {}
            }
        }
        let start = offset;
        offset += n as u64;
        let (id, text) = split_id(line.trim_ascii());
        if !text.is_empty() {
            match serde_json::from_slice::<Box<RawValue>>(text) {
                Ok(job) => match split_envelope(job.get()) {
                    Ok(None) => {
                        bytes += text.len();
                        batch.jobs.push((id, Arc::from(job), None));
                    }
                    Ok(Some((job, options))) => {
                        bytes += text.len();
                        batch.jobs.push((id, Arc::from(job), Some(options)));
                    }
                    Err(why) => {
                        let reason = format!(
                            "the job envelope at byte {start} of {} is refused: {why}",
                            file.display()
                        );
                        tracing::warn!(path = %file.display(), offset = start, cause = %why, "a job envelope is refused: kept as a dead job");
                        batch.rejects.push((id, Arc::from(job), reason));
                    }
                },
                Err(err) => {
                    let shown = String::from_utf8_lossy(text);
                    let reason = reason(start, &err);
                    tracing::warn!(path = %file.display(), offset = start, cause = %err, "a line is not JSON: kept as a dead job");
                    if let Ok(text) = serde_json::value::to_raw_value(&shown) {
                        batch.rejects.push((id, Arc::from(text), reason));
                    }
                }
            }
        }
        batch.end = offset;
        if batch.jobs.len() >= BATCH_JOBS || bytes >= BATCH_BYTES {
            each(std::mem::replace(&mut batch, new_batch(offset)))?;
            bytes = 0;
        }
    }
    batch.last = true;
    each(batch)
}

/// Splits the id a producer reserved for an inbox line (`#<id> <job>`)
/// from its job; a line without one (a JSON-lines file, or an inbox line
/// of an older taskherd) has none.
fn split_id(line: &[u8]) -> (Option<u64>, &[u8]) {
    let Some(rest) = line.strip_prefix(b"#") else {
        return (None, line);
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let id = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|digits| digits.parse::<u64>().ok())
        .filter(|&id| id > 0);
    match (id, rest.get(digits)) {
        (Some(id), Some(b' ')) => (Some(id), rest[digits + 1..].trim_ascii_start()),
        // Not an id: the line is read as it is (and refused as not JSON).
        _ => (None, line),
    }
}

/// Records a batch in the store: its jobs, its rejected lines, the mark.
/// The caller commits (one frame: all or nothing).
pub(crate) fn absorb(store: &mut Store, batch: Batch) -> usize {
    let now = crate::protocol::millis::now();
    let mut count = 0;
    for (id, job, options) in batch.jobs {
        if let Some(key) = options.as_ref().and_then(JobOptions::unique_key) {
            if store.state.holds_key(key) {
                store.state.duplicates += 1;
                tracing::info!(
                    key,
                    id,
                    duplicates = store.state.duplicates,
                    "job not added: its unique key is held by a pending or running job"
                );
                continue;
            }
        }
        let options = options.map(|options| options.resolved(now));
        match id {
            Some(id) => store.push_as(id, job, options),
            None => {
                store.push_with(job, options.unwrap_or_default());
            }
        }
        count += 1;
    }
    for (id, text, reason) in batch.rejects {
        store.bury_new(id, text, now, &reason);
    }
    store.change(&Record::Intake {
        generation: batch.generation,
        offset: batch.end,
    });
    count
}

/// Takes the whole inbox in now, on this thread (for `taskherd queue`
/// commands): returns how many jobs came in.
///
/// # Errors
/// [`LocalQueueError::Io`], or a sync that did not come within `timeout`.
pub(crate) fn take_all(store: &mut Store, timeout: Duration) -> Result<u64> {
    let path = store.path().to_path_buf();
    let mut taken = 0;
    while let Some((generation, from)) =
        next_generation(&path, (store.state.generation, store.state.offset), true)?
    {
        read_generation(&path, generation, from, |batch| {
            taken += absorb(store, batch) as u64;
            let seq = store.commit();
            store.wait_synced(seq, timeout)
        })?;
        let taking = taking_path(&path, generation);
        files::remove_if_exists(&taking).map_err(|source| io_error(&taking, source))?;
    }
    Ok(taken)
}

/// The intake thread of a running feeder: reads generations ahead of the
/// feeder, which records them ([`absorb`]) and says when a generation's
/// last mark is durable.
pub(crate) struct Intake {
    /// Batches read.
    pub(crate) batches_rx: mpsc::Receiver<Batch>,
    /// Generations whose end is durable: their file may go.
    done_tx: mpsc::Sender<u64>,
    stop: Arc<AtomicBool>,
    /// Whether a generation is being read now.
    busy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("busy", &self.busy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Where the jobs a feeder takes into its journal come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// The inbox producers add to (`<path>.inbox`), taken in generations
    /// (the durable file queue).
    Inbox,
    /// A JSON-lines file, taken in as one generation that is never renamed
    /// or removed and may grow: the generation of its mark is the file's
    /// inode, so a file replaced since is told from the one taken in.
    Lines(PathBuf),
}

impl Intake {
    /// Starts the intake of the queue at `path` from `source`, from the
    /// journal's mark.
    ///
    /// # Errors
    /// [`LocalQueueError::Io`] if the thread cannot start.
    pub(crate) fn spawn(path: &Path, mark: (u64, u64), source: &Source) -> Result<Intake> {
        let (batches_tx, batches_rx) = mpsc::sync_channel(READ_AHEAD);
        let (done_tx, done_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        let thread = {
            let owned = path.to_path_buf();
            let source = source.clone();
            let stop = Arc::clone(&stop);
            let busy = Arc::clone(&busy);
            // Its log goes where the feeder's goes.
            let dispatch = tracing::dispatcher::get_default(Clone::clone);
            std::thread::Builder::new()
                .name("taskherd-intake".into())
                .spawn(move || {
                    let _log = tracing::dispatcher::set_default(&dispatch);
                    match &source {
                        Source::Inbox => {
                            intake_loop(&owned, mark, &batches_tx, &done_rx, &stop, &busy);
                        }
                        Source::Lines(file) => {
                            lines_loop(file, &owned, mark, &batches_tx, &stop, &busy);
                        }
                    }
                })
                .map_err(|source| io_error(path, source))?
        };
        Ok(Intake {
            batches_rx,
            done_tx,
            stop,
            busy,
            thread: Some(thread),
        })
    }

    /// Says that generation `generation` is all in, durably.
    pub(crate) fn done(&self, generation: u64) {
        let _ = self.done_tx.send(generation);
    }

    /// Whether the intake is reading a generation now.
    pub(crate) fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock a send waiting for room, and a wait for `done`.
        let (_, empty_rx) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.batches_rx, empty_rx));
        let (empty_tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.done_tx, empty_tx));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Why the intake loop stops early.
struct Stopped;

fn intake_loop(
    path: &Path,
    mut mark: (u64, u64),
    batches_tx: &mpsc::SyncSender<Batch>,
    done_rx: &mpsc::Receiver<u64>,
    stop: &AtomicBool,
    busy: &AtomicBool,
) {
    let mut failing = false;
    // Leftover generations can only be there at the start: afterwards only
    // this loop makes them.
    let mut scan_leftovers = true;
    while !stop.load(Ordering::Relaxed) {
        let next = next_generation(path, mark, scan_leftovers);
        scan_leftovers = next.is_err();
        let (generation, from) = match next {
            Ok(Some(next)) => next,
            Ok(None) => {
                std::thread::sleep(IDLE_POLL);
                continue;
            }
            Err(err) => {
                if !failing {
                    tracing::error!(cause = %error_chain(&err), "cannot take the inbox in; trying again");
                    failing = true;
                }
                std::thread::sleep(ERROR_PAUSE);
                continue;
            }
        };
        busy.store(true, Ordering::Relaxed);
        // The mark follows every batch handed over: a generation is never
        // read twice from an earlier point (after a read error, or a
        // removal that failed).
        let read = read_generation(path, generation, from, |batch| {
            let end = batch.end;
            batches_tx
                .send(batch)
                .map_err(|_| io_error(path, io::Error::other("the feeder is gone")))?;
            mark = (generation, end);
            Ok(())
        });
        if let Err(err) = read {
            busy.store(false, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if !failing {
                tracing::error!(cause = %error_chain(&err), "cannot read the inbox; trying again");
                failing = true;
            }
            std::thread::sleep(ERROR_PAUSE);
            continue;
        }
        failing = false;
        // Wait until the feeder says the end of it is durable.
        let finished = loop {
            match done_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(done) if done == generation => break Ok(()),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
                Err(_) => break Err(Stopped),
            }
        };
        busy.store(false, Ordering::Relaxed);
        if finished.is_err() {
            return;
        }
        let taking = taking_path(path, generation);
        if let Err(err) = files::remove_if_exists(&taking) {
            // Resumed at its end (nothing more is read from it) next time.
            tracing::warn!(path = %taking.display(), cause = %err, "cannot remove an inbox taken in");
            scan_leftovers = true;
        }
    }
}

/// How long the last line of a JSON-lines file may stay without its
/// newline before it is taken in as it is (its writer may still be
/// writing it until then).
pub(crate) const TAIL_SETTLE: Duration = Duration::from_secs(1);

/// The length of the JSON-lines file `file` and its inode (the generation
/// of its intake mark), checked against the journal's `mark`: the file
/// taken in so far must still be there, the same file (same inode) and
/// at least as long as what was taken.
///
/// # Errors
/// [`LocalQueueError::JobsFile`] when it is gone, was replaced or was cut
/// shorter; [`LocalQueueError::Io`] when it cannot be looked at.
pub(crate) fn lines_file(file: &Path, state: &Path, mark: (u64, u64)) -> Result<(u64, u64)> {
    let problem = |problem: String| LocalQueueError::JobsFile {
        path: file.to_path_buf(),
        problem,
    };
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(problem(format!(
                "no such file (its state is kept in {})",
                state.display()
            )))
        }
        Err(source) => return Err(io_error(file, source)),
    };
    let (generation, taken) = mark;
    let restore = || {
        format!(
            "put the file taken in back, or remove {} to serve the new one from its start (lines done before would run again)",
            state.display()
        )
    };
    if generation != 0 && meta.ino() != generation {
        return Err(problem(format!(
            "replaced by another file since {taken} bytes of it were taken in (inode {} then, {} now): {}",
            generation,
            meta.ino(),
            restore()
        )));
    }
    if meta.len() < taken {
        return Err(problem(format!(
            "{} bytes long, but {taken} bytes of it were taken in already (cut shorter or rewritten): {}",
            meta.len(),
            restore()
        )));
    }
    Ok((meta.ino(), meta.len()))
}

/// Takes the JSON-lines file `file` in after `mark` (into the journal at
/// `state`), as it grows, until stopped: every batch of new whole lines
/// goes to the feeder; a last line without its newline waits until the
/// file has not changed for [`TAIL_SETTLE`]. A file gone, replaced or cut
/// shorter is logged (once) and looked at again: nothing more is taken in.
fn lines_loop(
    file: &Path,
    state: &Path,
    mut mark: (u64, u64),
    batches_tx: &mpsc::SyncSender<Batch>,
    stop: &AtomicBool,
    busy: &AtomicBool,
) {
    let mut failing = false;
    // A last line without its newline: the file's length then, and since
    // when it has been so.
    let mut tail_since: Option<(u64, std::time::Instant)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (inode, len) = match lines_file(file, state, mark) {
            Ok(found) => found,
            Err(err) => {
                if !failing {
                    tracing::error!(cause = %error_chain(&err), "cannot take the jobs file in; trying again");
                    failing = true;
                }
                std::thread::sleep(ERROR_PAUSE);
                continue;
            }
        };
        if failing {
            tracing::info!(path = %file.display(), "the jobs file can be taken in again");
            failing = false;
        }
        if len == mark.1 {
            tail_since = None;
            std::thread::sleep(IDLE_POLL);
            continue;
        }
        let tail = match tail_since {
            Some((at_len, since)) if at_len == len && since.elapsed() >= TAIL_SETTLE => Tail::Take,
            _ => Tail::Wait,
        };
        busy.store(true, Ordering::Relaxed);
        let reason = |start: u64, err: &serde_json::Error| {
            format!(
                "a line of {} is not JSON: {err} (byte {start})",
                file.display()
            )
        };
        let read = read_lines(file, inode, mark.1, tail, reason, |batch| {
            if batch.end == batch.start {
                // Nothing new (a last line still without its newline).
                return Ok(());
            }
            let end = batch.end;
            batches_tx
                .send(batch)
                .map_err(|_| io_error(file, io::Error::other("the feeder is gone")))?;
            mark = (inode, end);
            Ok(())
        });
        busy.store(false, Ordering::Relaxed);
        if let Err(err) = read {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tracing::error!(cause = %error_chain(&err), "cannot read the jobs file; trying again");
            std::thread::sleep(ERROR_PAUSE);
            continue;
        }
        if mark.1 < len {
            // A last line without its newline (or lines added meanwhile).
            if tail_since.is_none_or(|(at_len, _)| at_len != len) {
                tail_since = Some((len, std::time::Instant::now()));
            }
            std::thread::sleep(IDLE_POLL);
        } else {
            tail_since = None;
        }
    }
}

/// Jobs waiting in the inbox and in a generation not all taken in yet,
/// for `taskherd queue list` (lines counted, not parsed).
///
/// # Errors
/// [`LocalQueueError::Io`].
pub(crate) fn waiting(path: &Path, mark: (u64, u64)) -> Result<u64> {
    let mut count = 0;
    let mut files = vec![(inbox_path(path), 0)];
    for generation in leftover_generations(path)? {
        if generation >= mark.0 {
            let from = if generation == mark.0 { mark.1 } else { 0 };
            files.push((taking_path(path, generation), from));
        }
    }
    for (file, from) in files {
        let opened = File::open(&file).and_then(|mut opened| {
            opened.seek(SeekFrom::Start(from))?;
            Ok(opened)
        });
        let opened = match opened {
            Ok(opened) => opened,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(io_error(&file, source)),
        };
        // Whole lines with something in them, read a block at a time.
        let mut reader = BufReader::with_capacity(1 << 20, opened);
        let mut blank = true;
        loop {
            let block = reader
                .fill_buf()
                .map_err(|source| io_error(&file, source))?;
            if block.is_empty() {
                break;
            }
            for &byte in block {
                if byte == b'\n' {
                    count += u64::from(!blank);
                    blank = true;
                } else if !byte.is_ascii_whitespace() {
                    blank = false;
                }
            }
            let len = block.len();
            reader.consume(len);
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn take_in(path: &Path) -> BTreeMap<u64, String> {
        let mut store = Store::open(path).expect("open");
        take_all(&mut store, Duration::from_secs(30)).expect("take in");
        store
            .state
            .jobs
            .iter()
            .map(|(id, job)| (*id, job.payload.get().to_string()))
            .collect()
    }

    #[test]
    fn producers_at_once_get_distinct_ids_that_the_queue_keeps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        // Jobs taken in earlier: the counter starts after the journal's.
        append(&path, b"\"first\"\n").expect("append");
        assert_eq!(take_in(&path).into_keys().collect::<Vec<_>>(), [1]);
        std::fs::remove_file(ids_path(&path)).expect("counter gone");

        // Four producers, 50 writes of 1 to 3 jobs each, all at once, with
        // nobody taking the inbox in.
        let threads: Vec<_> = (0..4)
            .map(|producer| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut given = Vec::new();
                    for write in 0..50 {
                        let jobs: Vec<String> = (0..=write % 3)
                            .map(|n| format!("\"{producer}-{write}-{n}\""))
                            .collect();
                        let lines: String = jobs.iter().map(|job| format!("{job}\n")).collect();
                        let ids = append(&path, lines.as_bytes()).expect("append");
                        assert_eq!(ids.end - ids.start, jobs.len() as u64);
                        given.extend(ids.zip(jobs));
                    }
                    given
                })
            })
            .collect();
        let mut given: BTreeMap<u64, String> = BTreeMap::new();
        for thread in threads {
            for (id, job) in thread.join().expect("producer") {
                assert!(given.insert(id, job).is_none(), "id {id} given twice");
            }
        }
        // 17 writes of 1 job, 17 of 2, 16 of 3, per producer.
        assert_eq!(given.len(), 4 * (17 + 34 + 48));
        assert!(
            !given.contains_key(&1),
            "the journal's id is not given again"
        );
        // The queue keeps every job under the id its producer was given.
        let mut kept = take_in(&path);
        kept.remove(&1);
        assert_eq!(kept, given);
    }

    #[test]
    fn lines_written_without_an_id_are_numbered_from_the_same_counter() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        let first = append(&path, b"1\n2\n").expect("append");
        assert_eq!(first, 1..3);
        // A line of an older taskherd (no id), then a new producer's.
        std::fs::OpenOptions::new()
            .append(true)
            .open(inbox_path(&path))
            .and_then(|mut file| std::io::Write::write_all(&mut file, b"\"old\"\n"))
            .expect("old line");
        assert_eq!(append(&path, b"3\n").expect("append"), 3..4);
        let kept = take_in(&path);
        assert_eq!(kept.get(&1).map(String::as_str), Some("1"));
        assert_eq!(kept.get(&3).map(String::as_str), Some("3"));
        assert_eq!(kept.get(&4).map(String::as_str), Some("\"old\""));
        // And the next producer goes on after it.
        assert_eq!(append(&path, b"5\n").expect("append"), 5..6);
    }

    #[test]
    fn a_damaged_counter_is_an_error_not_a_restart_from_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("jobs.queue");
        append(&path, b"1\n").expect("append");
        std::fs::write(ids_path(&path), "x7\n").expect("damage");
        let err = append(&path, b"2\n").expect_err("refused");
        assert!(err.to_string().contains("jobs.queue.ids"), "{err}");
    }
}
