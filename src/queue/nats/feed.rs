//! Filling a JetStream queue from a JSON-lines file or from a command's
//! output: the built-in feeders of a queue group with `backend = "nats"`
//! (`[group.feeder] jsonl` or `command`; the master starts them as
//! `taskherd builtin-feeder --jetstream ...`, with the queue in the
//! environment variable [`JETSTREAM_QUEUE_ENV`]).
//!
//! # What is published, and what a crash can do
//!
//! Each line is a job published on the queue's subject, in batches of at
//! most [`BATCH`] lines; the feeder waits for the stream's ack of every
//! line of a batch, then records how far the source is published in its
//! *state file* (written aside, synced, renamed over): for a file, the
//! byte offset (and the file's device and inode); for a command, the
//! number of lines. A restarted feeder (after a SIGKILL of it or of its
//! master, a reboot, a new run) resumes after the recorded point.
//!
//! The lines of the batch under way when it died (at most [`BATCH`]) are
//! published again, each with the `Nats-Msg-Id` it had the first time
//! (for a file: `feed-<device>-<inode>-<byte offset>`; for a command:
//! `feed-cmd-<hash of the command>-<line number>`): the stream drops them
//! as duplicates when the restart comes within its duplicate window (2
//! minutes by default) of their first publication, so a restart within
//! the window publishes no line twice; a later one may publish those
//! lines twice (at least once). A line that is an envelope with a
//! `unique` key is published with that key as its message id instead.
//!
//! A line that is not JSON (or an envelope with wrong options) goes to the
//! dead stream with a reason naming the file and the byte offset (or the
//! command and the line number). Of the per-job options, `delay` and `at`
//! become the `Taskherd-Not-Before` header and `unique` the message id;
//! retry schedules and priorities do not apply on JetStream.
//!
//! A file is followed: lines appended later are published too (a last
//! line without its newline once the file has not grown for 1 s); a file
//! replaced by another (its inode changed) or cut shorter than what was
//! published is refused, logged at error level, until it is put back or
//! the state file is removed. A command is run again by a restarted
//! feeder, which skips the lines recorded as published (the command must
//! print the same lines in the same order); once the command has exited
//! with success and all its lines are published, the state file is
//! removed, so the next run starts over. Either feeder then stays, idle,
//! until the herd stops.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::bridge::{dead_headers, one_line};
use super::{NatsError, MSG_ID_HEADER, NOT_BEFORE_HEADER};
use crate::backoff::Backoff;
use crate::protocol::slave::JetStreamQueue;
pub use crate::protocol::slave::JETSTREAM_QUEUE_ENV;

/// Lines published (and acked) between two records of the state file.
pub const BATCH: usize = 256;
/// Longest wait for the stream's ack of a line.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a file is looked at again once all of it is published.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
/// A last line without its newline is published once the file has not
/// grown for this long.
const PARTIAL_LINE_AFTER: Duration = Duration::from_secs(1);
/// A command's lines are published at least this often while it prints.
const COMMAND_FLUSH: Duration = Duration::from_millis(200);

/// What fills the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The lines of a JSON-lines file.
    Jsonl(PathBuf),
    /// The lines a command prints.
    Command {
        /// The program.
        program: PathBuf,
        /// Its arguments.
        args: Vec<OsString>,
    },
}

/// The queue, from [`JETSTREAM_QUEUE_ENV`].
///
/// # Errors
/// The variable is missing or is not a queue.
pub fn queue_from_env() -> Result<JetStreamQueue, String> {
    let text = std::env::var(JETSTREAM_QUEUE_ENV).map_err(|_| {
        format!(
            "no {JETSTREAM_QUEUE_ENV}: the master starts this feeder for a JetStream queue group"
        )
    })?;
    serde_json::from_str(&text).map_err(|err| format!("{JETSTREAM_QUEUE_ENV}: {err}"))
}

/// What one line becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Publication {
    /// A blank line: nothing.
    Skip,
    /// A job.
    Job {
        /// The job's JSON.
        body: String,
        /// Its message id.
        msg_id: String,
        /// Not run before (Unix ms).
        not_before_ms: Option<u64>,
    },
    /// A line that cannot be a job: to the dead stream.
    Dead {
        /// The line.
        body: String,
        /// Why.
        reason: String,
        /// Its message id.
        msg_id: String,
    },
}

/// What the line `line` (without its newline) becomes; `what` names it
/// for a reason ("the line at byte 12 of jobs.jsonl"), `msg_id` is its
/// message id unless it has a unique key.
pub(crate) fn publication(
    line: &[u8],
    what: &dyn Fn() -> String,
    msg_id: String,
    now_ms: u64,
) -> Publication {
    let text = match std::str::from_utf8(line) {
        Ok(text) => text.trim_end_matches('\r'),
        Err(err) => {
            return Publication::Dead {
                body: String::from_utf8_lossy(line).into_owned(),
                reason: format!("{} is not UTF-8: {err}", what()),
                msg_id,
            }
        }
    };
    if text.trim().is_empty() {
        return Publication::Skip;
    }
    if let Err(err) = serde_json::from_str::<&serde_json::value::RawValue>(text) {
        return Publication::Dead {
            body: text.to_string(),
            reason: format!("{} is not JSON: {err}", what()),
            msg_id,
        };
    }
    match super::super::options::split_envelope(text) {
        Ok(None) => Publication::Job {
            body: text.to_string(),
            msg_id,
            not_before_ms: None,
        },
        Ok(Some((job, options))) => Publication::Job {
            body: job.get().to_string(),
            msg_id: options.unique_key().map_or(msg_id, str::to_string),
            not_before_ms: options.not_before_ms(now_ms),
        },
        Err(why) => Publication::Dead {
            body: text.to_string(),
            reason: format!("{}: {why}", what()),
            msg_id,
        },
    }
}

/// How far the source is published (the state file, JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// A file: bytes published.
    #[serde(default)]
    offset: u64,
    /// A file: its device.
    #[serde(default)]
    dev: u64,
    /// A file: its inode (0 before anything was published).
    #[serde(default)]
    ino: u64,
    /// A command: lines published.
    #[serde(default)]
    lines: u64,
}

fn load(path: &Path) -> Result<State, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
            format!(
                "the feeder's state file {} is damaged ({err}): remove it to publish everything again",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

fn save(path: &Path, state: &State) -> Result<(), String> {
    let bytes = serde_json::to_vec(state).map_err(|err| err.to_string())?;
    crate::files::write_atomic(path, &bytes, 0o644).map_err(|err| {
        format!(
            "cannot record the feeder's progress in {}: {err}",
            path.display()
        )
    })
}

/// Publishes what `source` holds on the queue until `stop`, recording its
/// progress in `state_path`.
///
/// # Errors
/// What cannot get better by waiting: credentials the server refuses, a
/// damaged state file, a command that cannot be started, a state file
/// that cannot be written.
pub async fn feed(
    queue: &JetStreamQueue,
    source: &Source,
    state_path: &Path,
    stop: CancellationToken,
) -> Result<(), String> {
    let state = load(state_path)?;
    let Some(client) = connect(queue, &stop).await? else {
        return Ok(());
    };
    let mut publisher = Publisher {
        js: jetstream::new(client.clone()),
        queue,
        outage: false,
        failures: 0,
    };
    let result = match source {
        Source::Jsonl(path) => feed_file(&mut publisher, path, state_path, state, &stop).await,
        Source::Command { program, args } => {
            feed_command(&mut publisher, program, args, state_path, state, &stop).await
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    result
}

/// Connects, waiting for a server that is down (`None`: stopped
/// meanwhile).
async fn connect(
    queue: &JetStreamQueue,
    stop: &CancellationToken,
) -> Result<Option<async_nats::Client>, String> {
    let mut step = 0;
    loop {
        match super::connect(queue, "taskherd feeder").await {
            Ok(client) => {
                if step > 0 {
                    info!(nats = %super::servers_text(&queue.servers), "connected to the NATS server");
                }
                return Ok(Some(client));
            }
            Err(err @ NatsError::Unreachable { .. }) => {
                if step == 0 {
                    warn!("{err}; waiting for it");
                }
                let delay =
                    Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5), 0.25)
                        .delay(step, crate::random::unit());
                step = step.saturating_add(1);
                if !pause(stop, delay).await {
                    return Ok(None);
                }
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// Waits `delay`; `false` when stopped meanwhile.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

struct Publisher<'a> {
    js: jetstream::Context,
    queue: &'a JetStreamQueue,
    /// A failure was logged (once per outage).
    outage: bool,
    failures: u32,
}

impl Publisher<'_> {
    /// Publishes `batch` until the stream took all of it (`false`: stopped
    /// first). Returns `(added, dead)`; logs the lines the stream dropped as
    /// duplicates (published before a restart).
    async fn publish_all(
        &mut self,
        batch: &[Publication],
        stop: &CancellationToken,
    ) -> Option<(u64, u64)> {
        loop {
            match self.publish(batch).await {
                Ok((added, duplicates, dead)) => {
                    if duplicates > 0 {
                        info!(
                            duplicates,
                            "lines published before a restart were dropped as duplicates"
                        );
                    }
                    if self.outage {
                        info!(stream = %self.queue.stream, "publishing jobs again");
                    }
                    self.outage = false;
                    self.failures = 0;
                    return Some((added, dead));
                }
                Err(err) => {
                    if !self.outage {
                        warn!(stream = %self.queue.stream, cause = %err, "cannot publish jobs, retrying");
                        self.outage = true;
                    } else {
                        debug!(cause = %err, "publishing failed again");
                    }
                    let delay =
                        Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2), 0.25)
                            .delay(self.failures, crate::random::unit());
                    self.failures = self.failures.saturating_add(1);
                    if !pause(stop, delay).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(u64, u64, u64), String> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut dead: u64 = 0;
        for publication in batch {
            let (subject, headers, body) = match publication {
                Publication::Skip => continue,
                Publication::Job {
                    body,
                    msg_id,
                    not_before_ms,
                } => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(MSG_ID_HEADER, msg_id.as_str());
                    if let Some(ms) = not_before_ms {
                        headers.insert(NOT_BEFORE_HEADER, ms.to_string().as_str());
                    }
                    (self.queue.subject.clone(), headers, body)
                }
                Publication::Dead {
                    body,
                    reason,
                    msg_id,
                } => {
                    dead += 1;
                    warn!(reason = %one_line(reason), "job dead");
                    // Never in the work stream: sequence 0, no attempt.
                    let headers = dead_headers(reason, 0, 0, msg_id);
                    (self.queue.dead_subject.clone(), headers, body)
                }
            };
            let ack = self
                .js
                .publish_with_headers(subject, headers, body.clone().into())
                .await
                .map_err(|err| err.to_string())?;
            acks.push(ack);
        }
        let (mut added, mut duplicates): (u64, u64) = (0, 0);
        for ack in acks {
            match tokio::time::timeout(ACK_TIMEOUT, async move { ack.await }).await {
                Ok(Ok(ack)) if ack.duplicate => duplicates += 1,
                Ok(Ok(_)) => added += 1,
                Ok(Err(err)) => return Err(err.to_string()),
                Err(_) => return Err(format!("no ack within {ACK_TIMEOUT:?}")),
            }
        }
        Ok((added.saturating_sub(dead), duplicates, dead))
    }
}

/// Complaints about the source, logged when they change.
#[derive(Default)]
struct Complaint(Option<String>);

impl Complaint {
    fn say(&mut self, text: String) {
        if self.0.as_deref() != Some(text.as_str()) {
            error!("{text}");
            self.0 = Some(text);
        }
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

async fn feed_file(
    publisher: &mut Publisher<'_>,
    path: &Path,
    state_path: &Path,
    mut state: State,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut complaint = Complaint::default();
    // The length at which a last line without its newline was first seen.
    let mut partial: Option<(u64, Instant)> = None;
    let mut caught_up = false;
    let shown = path.display().to_string();
    info!(file = %shown, "publishing the file from byte {}", state.offset);
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(err) => {
                complaint.say(format!("jobs file {shown}: {err}"));
                if !pause(stop, FOLLOW_EVERY).await {
                    return Ok(());
                }
                continue;
            }
        };
        if state.ino != 0 && (meta.dev(), meta.ino()) != (state.dev, state.ino) {
            complaint.say(format!(
                "jobs file {shown}: replaced by another file since {} bytes of it were published: \
                 put it back, or remove {} to publish the new one from its start",
                state.offset,
                state_path.display()
            ));
            if !pause(stop, FOLLOW_EVERY).await {
                return Ok(());
            }
            continue;
        }
        if meta.len() < state.offset {
            complaint.say(format!(
                "jobs file {shown}: cut shorter ({} bytes) than what was published ({} bytes): \
                 put it back, or remove {}",
                meta.len(),
                state.offset,
                state_path.display()
            ));
            if !pause(stop, FOLLOW_EVERY).await {
                return Ok(());
            }
            continue;
        }
        complaint.clear();
        let (lines, end) = read_lines(path, state.offset, &mut partial, meta.len())
            .map_err(|err| format!("cannot read {shown}: {err}"))?;
        if lines.is_empty() {
            if !caught_up {
                info!(
                    file = %shown,
                    bytes = state.offset,
                    "all of the file is published; lines appended are published too"
                );
                caught_up = true;
            }
            if !pause(stop, FOLLOW_EVERY).await {
                return Ok(());
            }
            continue;
        }
        caught_up = false;
        let now_ms = crate::protocol::millis::now();
        let batch: Vec<Publication> = lines
            .iter()
            .map(|(offset, line)| {
                publication(
                    line,
                    &|| format!("the line at byte {offset} of {shown}"),
                    format!("feed-{}-{}-{offset}", meta.dev(), meta.ino()),
                    now_ms,
                )
            })
            .collect();
        let Some((added, dead)) = publisher.publish_all(&batch, stop).await else {
            return Ok(());
        };
        debug!(added, dead, offset = end, "lines published");
        state = State {
            offset: end,
            dev: meta.dev(),
            ino: meta.ino(),
            lines: 0,
        };
        save(state_path, &state)?;
    }
}

/// A line (without its newline) and where it starts: its byte offset in a
/// file, its number in a command's output.
type Line = (u64, Vec<u8>);

/// Up to [`BATCH`] lines of `path` from `offset`, each with its offset,
/// and the offset after them. A last line without its newline is taken
/// once the file has stayed `len` long for [`PARTIAL_LINE_AFTER`].
fn read_lines(
    path: &Path,
    offset: u64,
    partial: &mut Option<(u64, Instant)>,
    len: u64,
) -> std::io::Result<(Vec<Line>, u64)> {
    use std::io::{BufRead as _, Seek as _, SeekFrom};
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    file.seek(SeekFrom::Start(offset))?;
    let mut lines = Vec::new();
    let mut at = offset;
    while lines.len() < BATCH {
        let mut line = Vec::new();
        let n = file.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else {
            // The last line, without its newline yet.
            let stale = match *partial {
                Some((seen, since)) if seen == len => since.elapsed() >= PARTIAL_LINE_AFTER,
                _ => {
                    *partial = Some((len, Instant::now()));
                    false
                }
            };
            if !stale {
                break;
            }
            *partial = None;
        }
        lines.push((at, line));
        at += n as u64;
    }
    Ok((lines, at))
}

/// A stable hash of a command (FNV-1a), for its lines' message ids.
fn command_hash(program: &Path, args: &[OsString]) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for byte in bytes.iter().chain(std::iter::once(&0)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(program.as_os_str().as_bytes());
    for arg in args {
        eat(arg.as_bytes());
    }
    hash
}

/// Kills the command's process group when dropped.
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        // The process group this feeder started (the command is its
        // leader); gone already is fine.
        let group = self
            .0
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

async fn feed_command(
    publisher: &mut Publisher<'_>,
    program: &Path,
    args: &[OsString],
    state_path: &Path,
    mut state: State,
    stop: &CancellationToken,
) -> Result<(), String> {
    let shown = program.display().to_string();
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot run {shown}: {err}"))?;
    let mut group = Group(child.id());
    let Some(stdout) = child.stdout.take() else {
        return Err(format!("no output of {shown}"));
    };
    let mut stdout = tokio::io::BufReader::new(stdout);
    let hash = command_hash(program, args);
    let skip = state.lines;
    if skip > 0 {
        info!(
            lines = skip,
            "the command runs again: its lines published before are skipped"
        );
    }
    let mut read: u64 = 0;
    let mut ended = false;
    // The line being read: it lives across batches, because a read cut by
    // the flush timer has already taken the line's first bytes from the
    // pipe (`read_until` appends to it and goes on where it stopped).
    let mut line = Vec::new();
    while !ended {
        // Up to BATCH lines, or what came within COMMAND_FLUSH.
        let mut lines: Vec<Line> = Vec::new();
        let flush_at = tokio::time::Instant::now() + COMMAND_FLUSH;
        while lines.len() < BATCH {
            let got = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(flush_at), if !lines.is_empty() => break,
                got = stdout.read_until(b'\n', &mut line) => got,
            };
            match got {
                Ok(0) if line.is_empty() => {
                    ended = true;
                    break;
                }
                Ok(count) => {
                    // Ok(0) with bytes kept from a cut read: the last line,
                    // without its newline.
                    ended = count == 0;
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    read += 1;
                    let whole = std::mem::take(&mut line);
                    if read > skip {
                        lines.push((read, whole));
                    }
                    if ended {
                        break;
                    }
                }
                Err(err) => return Err(format!("cannot read the output of {shown}: {err}")),
            }
        }
        if lines.is_empty() {
            continue;
        }
        let now_ms = crate::protocol::millis::now();
        let batch: Vec<Publication> = lines
            .iter()
            .map(|(n, line)| {
                publication(
                    line,
                    &|| format!("line {n} of the output of {shown}"),
                    format!("feed-cmd-{hash:016x}-{n}"),
                    now_ms,
                )
            })
            .collect();
        let Some((added, dead)) = publisher.publish_all(&batch, stop).await else {
            return Ok(());
        };
        debug!(added, dead, lines = read, "lines published");
        state.lines = read;
        save(state_path, &state)?;
    }
    let status = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        status = child.wait() => status,
    };
    group.0 = None;
    match status {
        Ok(status) if status.success() => {
            info!(lines = read, "{shown} exited; all its lines are published");
            crate::files::remove_if_exists(state_path)
                .map_err(|err| format!("cannot remove {}: {err}", state_path.display()))?;
        }
        Ok(status) => error!(
            lines = read,
            "{shown} failed ({status}); the lines it printed are published, and a restarted feeder \
             runs it again after them"
        ),
        Err(err) => error!("cannot wait for {shown}: {err}"),
    }
    stop.cancelled().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what() -> String {
        "the line at byte 7 of jobs.jsonl".into()
    }

    #[test]
    fn lines_become_jobs_dead_jobs_or_nothing() {
        let id = || "feed-1-2-7".to_string();
        assert_eq!(publication(b"  ", &what, id(), 0), Publication::Skip);
        assert_eq!(
            publication(b"{\"n\": 1}\r", &what, id(), 0),
            Publication::Job {
                body: "{\"n\": 1}".into(),
                msg_id: id(),
                not_before_ms: None
            }
        );
        match publication(b"oops", &what, id(), 0) {
            Publication::Dead { reason, body, .. } => {
                assert!(
                    reason.starts_with("the line at byte 7 of jobs.jsonl is not JSON"),
                    "{reason}"
                );
                assert_eq!(body, "oops");
            }
            other => panic!("{other:?}"),
        }
        let envelope = br#"{"job": 5, "options": {"delay": "10s", "unique": "five"}}"#;
        assert_eq!(
            publication(envelope, &what, id(), 1000),
            Publication::Job {
                body: "5".into(),
                msg_id: "five".into(),
                not_before_ms: Some(11_000)
            }
        );
        match publication(
            br#"{"job": 5, "options": {"delay": "soon"}}"#,
            &what,
            id(),
            0,
        ) {
            Publication::Dead { reason, .. } => assert!(reason.contains("delay"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn complete_lines_are_read_from_an_offset_and_a_last_partial_one_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs.jsonl");
        std::fs::write(&path, "1\n2\n3").expect("write");
        let mut partial = None;
        let (lines, end) = read_lines(&path, 2, &mut partial, 5).expect("read");
        assert_eq!(lines, vec![(2, b"2".to_vec())]);
        assert_eq!(end, 4);
        assert!(partial.is_some(), "the last line waits");
        // Stale: taken.
        partial = Some((5, Instant::now() - PARTIAL_LINE_AFTER));
        let (lines, end) = read_lines(&path, 4, &mut partial, 5).expect("read");
        assert_eq!(lines, vec![(4, b"3".to_vec())]);
        assert_eq!(end, 5);
    }

    #[test]
    fn the_state_survives_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs.jsonl.jetstream");
        assert_eq!(load(&path).expect("missing"), State::default());
        let state = State {
            offset: 10,
            dev: 1,
            ino: 2,
            lines: 0,
        };
        save(&path, &state).expect("save");
        assert_eq!(load(&path).expect("load"), state);
        std::fs::write(&path, "{").expect("damage");
        assert!(load(&path).expect_err("damaged").contains("damaged"));
        assert_ne!(
            command_hash(Path::new("seq"), &["1".into(), "5".into()]),
            command_hash(Path::new("seq"), &["15".into()])
        );
    }
}
