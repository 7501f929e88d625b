//! [`CommandFeeder`]: the lines a command prints on its stdout are the
//! jobs.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustix::process::{Pid, WaitId, WaitIdOptions};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::pidkiller::proc::{self, Signal, Target};
use crate::protocol::slave::CONTROL_FD_ENV;
use crate::queue::child::{command_text, die_with_parent};
use crate::queue::options::{split_envelope, JobOptions};
use crate::queue::{Feeder, Next};
use crate::retry::RetryPolicy;

/// Lines read ahead of the feeder at most: the reader thread stops reading
/// the command's stdout when this many wait, so a command that prints
/// faster than consumers take blocks on its pipe (back-pressure) instead
/// of filling memory.
pub const COMMAND_READ_AHEAD: usize = 16;

/// Longest line taken as a job (16 MiB, what a job's frame can carry at
/// most); a longer one is a dead job.
const MAX_JOB_LINE: usize = 16 << 20;

/// Characters of a line that is not JSON shown in its dead job's reason.
const SHOWN_CHARS: usize = 200;

/// How often a [`CommandFeeder`] with nothing to give is asked again.
const COMMAND_RECHECK: Duration = Duration::from_millis(10);

/// A feeder of the lines a command prints: it runs the command (stdin
/// from `/dev/null`, stderr shared with this process, in a process group
/// of its own that dies with this thread's process), and each line of its
/// stdout is a job, its JSON text as it is (blank lines are skipped). A
/// line that is not JSON, or longer than 16 MiB, is a dead job with the
/// reason (the feeder server dead-letters it at once: it is never sent).
///
/// It reads only as jobs are taken: at most [`COMMAND_READ_AHEAD`] lines
/// wait, then the command blocks on its full pipe until consumers take
/// more. When the command has exited and every line it printed was
/// served, it says [`Next::Done`]: the queue finishes once those jobs have
/// their outcomes. A command that fails (a non-zero exit status, a signal)
/// is logged at error level with its status; the jobs it printed are
/// served all the same, and the feeder finishes as well.
///
/// It lives in memory: a restarted feeder runs the command again, from
/// the start. Dropping it kills the command's process group (SIGKILL) if
/// it still runs.
///
/// ```
/// use taskherd::queue::{feeders::CommandFeeder, Feeder, Next};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut feeder = CommandFeeder::spawn("seq", &["1", "2"])?;
/// let mut jobs = Vec::new();
/// loop {
///     match feeder.next() {
///         Next::Job(job) => jobs.push(job.payload().map(|p| p.get().to_owned())),
///         Next::Empty => std::thread::sleep(feeder.recheck()),
///         Next::Done => break,
///     }
/// }
/// assert_eq!(jobs, [Some("1".to_owned()), Some("2".to_owned())]);
/// # Ok(())
/// # }
/// ```
pub struct CommandFeeder {
    /// Jobs read by the reader thread, then the command's end; bounded
    /// ([`COMMAND_READ_AHEAD`]).
    lines_rx: mpsc::Receiver<Line>,
    /// The command, unreaped while it may still run.
    child: Arc<ChildSlot>,
    /// Lines read from the command's stdout so far.
    lines_read: Arc<AtomicU64>,
    /// `program args...`, for the log and reasons.
    command: String,
    /// The command has ended and every line was given out.
    done: bool,
    /// The command has ended (or cannot be read any more).
    ended: bool,
    /// Jobs read whose start time (envelope option `delay` or `at`) has
    /// not come, by that time (Unix ms) and line: they wait in memory.
    delayed: BTreeMap<(u64, u64), CommandJob>,
    /// The unique keys of jobs served and without an outcome yet.
    unique: HashSet<String>,
}

impl fmt::Debug for CommandFeeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandFeeder")
            .field("command", &self.command)
            .field("lines_read", &self.lines_read())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// A job of a [`CommandFeeder`]: a line of the command's stdout. It
/// serializes as the line's JSON text; a line that is not JSON fails to
/// serialize with the reason, which makes the feeder server dead-letter
/// it without sending it.
#[derive(Debug, Clone)]
pub struct CommandJob {
    /// Its line number in the command's stdout (from 1).
    line: u64,
    /// The JSON text, or why the line is not a job.
    payload: Result<Arc<RawValue>, String>,
    /// Its options, for a line that is an envelope.
    options: Option<Arc<JobOptions>>,
}

impl CommandJob {
    /// Its line number in the command's stdout (from 1, blank lines
    /// counted).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The line's JSON text; `None` for a line that is not JSON.
    pub fn payload(&self) -> Option<&RawValue> {
        self.payload.as_deref().ok()
    }

    /// The options of a line that is an envelope (`{"job": ..., "options":
    /// {...}}`, see [`options`](crate::queue::options)).
    pub fn options(&self) -> Option<&JobOptions> {
        self.options.as_deref()
    }

    /// Why the line is not a job, for one that is not JSON.
    pub fn problem(&self) -> Option<&str> {
        self.payload.as_ref().err().map(String::as_str)
    }
}

impl Serialize for CommandJob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.payload {
            Ok(payload) => payload.serialize(serializer),
            Err(reason) => Err(serde::ser::Error::custom(reason)),
        }
    }
}

/// What the reader thread hands the feeder.
enum Line {
    /// A job (or a line that is not one).
    Job(CommandJob),
    /// The command's stdout ended and the command exited so (or cannot be
    /// waited for); nothing comes after.
    End(io::Result<ExitStatus>),
    /// Reading the command's stdout failed; the command was then waited
    /// for.
    ReadFailed(io::Error, io::Result<ExitStatus>),
}

/// The command's process while it is not reaped: its pid is then its
/// process group id, and ours to signal.
#[derive(Debug)]
struct ChildSlot {
    /// The process group id (the command's pid).
    pgid: u32,
    /// The child, until it is reaped.
    child: Mutex<Option<Child>>,
}

impl ChildSlot {
    /// Waits until the command has exited, kills what is left of its
    /// process group, and reaps it.
    fn reap(&self) -> io::Result<ExitStatus> {
        wait_exited(self.pgid)?;
        let mut slot = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut child) = slot.take() else {
            return Err(io::Error::other("the command was reaped already"));
        };
        // Not reaped yet: the group id cannot be anybody else's.
        let _ = proc::send_once(Target::Group(self.pgid), Signal::Kill);
        child.wait()
    }

    /// Kills the command's process group if the command is not reaped.
    fn kill(&self) {
        let slot = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            if let Err(err) = proc::send_once(Target::Group(self.pgid), Signal::Kill) {
                tracing::warn!(pid = self.pgid, cause = %err, "cannot kill the feeder's command");
            }
        }
    }
}

/// Waits (blocking) until our child `pid` has exited, without reaping it.
fn wait_exited(pid: u32) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::INVAL)?;
    // WNOWAIT leaves the child to be reaped by `Child::wait`.
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
    loop {
        match rustix::process::waitid(WaitId::Pid(pid), options) {
            Err(rustix::io::Errno::INTR) => {}
            done => return done.map(drop).map_err(io::Error::from),
        }
    }
}

impl CommandFeeder {
    /// Starts `program` with `args` (a bare name is looked up in `PATH`,
    /// in this process's working directory and environment) and a thread
    /// reading its stdout. Call it from a thread that lives as long as the
    /// feeder (`main`'s): the command gets SIGKILL when that thread ends.
    ///
    /// # Errors
    ///
    /// The command cannot be started (not found, not executable, ...), or
    /// the thread cannot.
    pub fn spawn<P: AsRef<OsStr>, A: AsRef<OsStr>>(
        program: P,
        args: &[A],
    ) -> io::Result<CommandFeeder> {
        let program = program.as_ref();
        let args: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
        let command_line = command_text(program, &args);
        let mut command = Command::new(program);
        command
            .args(&args)
            .env_remove(CONTROL_FD_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        let Some(stdout) = child.stdout.take() else {
            unreachable!("invariant: stdout is piped above");
        };
        let child = Arc::new(ChildSlot {
            pgid: child.id(),
            child: Mutex::new(Some(child)),
        });
        let lines_read = Arc::new(AtomicU64::new(0));
        let (lines_tx, lines_rx) = mpsc::sync_channel(COMMAND_READ_AHEAD);
        let reader = {
            let child = Arc::clone(&child);
            let lines_read = Arc::clone(&lines_read);
            let command_line = command_line.clone();
            std::thread::Builder::new()
                .name("taskherd-command-feeder".into())
                .spawn(move || {
                    let end = read_jobs(stdout, &command_line, &lines_tx, &lines_read);
                    let status = child.reap();
                    let _ = lines_tx.send(match end {
                        Ok(()) => Line::End(status),
                        Err(err) => Line::ReadFailed(err, status),
                    });
                })
        };
        if let Err(err) = reader {
            child.kill();
            let _ = child.reap();
            return Err(err);
        }
        Ok(CommandFeeder {
            lines_rx,
            child,
            lines_read,
            command: command_line,
            done: false,
            ended: false,
            delayed: BTreeMap::new(),
            unique: HashSet::new(),
        })
    }

    /// The command, as a line of the log.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Lines read from the command's stdout so far (blank ones included).
    pub fn lines_read(&self) -> u64 {
        self.lines_read.load(Ordering::Relaxed)
    }

    /// Logs how the command ended.
    fn ended(&self, status: &io::Result<ExitStatus>) {
        let lines = self.lines_read();
        match status {
            Ok(status) if status.success() => {
                tracing::info!(command = %self.command, lines, "the feeder's command ended: no more jobs");
            }
            Ok(status) => tracing::error!(
                command = %self.command,
                %status,
                lines,
                "the feeder's command failed: the jobs it printed are served, no more come"
            ),
            Err(err) => tracing::error!(
                command = %self.command,
                cause = %err,
                lines,
                "cannot wait for the feeder's command: the jobs it printed are served, no more come"
            ),
        }
    }
}

impl Drop for CommandFeeder {
    fn drop(&mut self) {
        // The reader thread then sees the end of the pipe (or that we are
        // gone), reaps the command and ends.
        self.child.kill();
    }
}

/// Reads the lines of `stdout` and sends each as a job (blocking while
/// [`COMMAND_READ_AHEAD`] wait), until its end or until the feeder is
/// gone.
///
/// # Errors
/// Reading the pipe failed.
fn read_jobs(
    stdout: ChildStdout,
    command: &str,
    lines_tx: &mpsc::SyncSender<Line>,
    lines_read: &AtomicU64,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 << 10, stdout);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let limit = MAX_JOB_LINE as u64 + 1;
        let n = match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if n == 0 {
            return Ok(());
        }
        number += 1;
        lines_read.fetch_add(1, Ordering::Relaxed);
        let payload = if line.last() != Some(&b'\n') && line.len() > MAX_JOB_LINE {
            skip_line(&mut reader)?;
            Err(format!(
                "line {number} of the output of {command} is longer than {MAX_JOB_LINE} bytes"
            ))
        } else {
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            job_payload(text, number, command)
        };
        let (payload, options) = match payload {
            Ok(payload) => match split_envelope(payload.get()) {
                Ok(None) => (Ok(payload), None),
                Ok(Some((job, options))) => {
                    let options = options.resolved(crate::protocol::millis::now());
                    (Ok(Arc::from(job)), Some(Arc::new(options)))
                }
                Err(why) => (
                    Err(format!(
                        "line {number} of the output of {command} is a job envelope that is refused: {why}"
                    )),
                    None,
                ),
            },
            Err(why) => (Err(why), None),
        };
        let job = CommandJob {
            line: number,
            payload,
            options,
        };
        if lines_tx.send(Line::Job(job)).is_err() {
            // The feeder is gone.
            return Ok(());
        }
    }
}

/// The JSON text of a line, or why it is not a job.
fn job_payload(text: &[u8], number: u64, command: &str) -> Result<Arc<RawValue>, String> {
    match serde_json::from_slice::<Box<RawValue>>(text) {
        Ok(payload) => Ok(Arc::from(payload)),
        Err(err) => {
            let shown: String = String::from_utf8_lossy(text)
                .chars()
                .take(SHOWN_CHARS)
                .collect();
            Err(format!(
                "line {number} of the output of {command} is not JSON: {err}: {shown:?}"
            ))
        }
    }
}

/// Reads and drops the rest of a line (through its newline).
fn skip_line(reader: &mut BufReader<ChildStdout>) -> io::Result<()> {
    loop {
        let (found, used) = {
            let buf = match reader.fill_buf() {
                Ok(buf) => buf,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            if buf.is_empty() {
                return Ok(());
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(at) => (true, at + 1),
                None => (false, buf.len()),
            }
        };
        reader.consume(used);
        if found {
            return Ok(());
        }
    }
}

impl CommandFeeder {
    /// `job` if it may be served now: not while a job with its unique key
    /// is served and has no outcome (then it is dropped, logged).
    fn admit(&mut self, job: CommandJob) -> Option<CommandJob> {
        if let Some(key) = job.options.as_ref().and_then(|o| o.unique_key()) {
            if !self.unique.insert(key.to_owned()) {
                tracing::info!(
                    key,
                    line = job.line,
                    "job not added: its unique key is held by a running job"
                );
                return None;
            }
        }
        Some(job)
    }

    /// `job` has its outcome: its unique key is free again.
    fn let_go(&mut self, job: &CommandJob) {
        if let Some(key) = job.options.as_ref().and_then(|o| o.unique_key()) {
            self.unique.remove(key);
        }
    }
}

impl Feeder for CommandFeeder {
    type Job = CommandJob;

    fn next(&mut self) -> Next<CommandJob> {
        if self.done {
            return Next::Done;
        }
        let now = crate::protocol::millis::now();
        if let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 <= now {
                let job = entry.remove();
                if let Some(job) = self.admit(job) {
                    return Next::Job(job);
                }
            }
        }
        while !self.ended {
            match self.lines_rx.try_recv() {
                Ok(Line::Job(job)) => {
                    let due = job.options.as_ref().and_then(|o| o.due_ms());
                    match due {
                        Some(due) if due > now => {
                            self.delayed.insert((due, job.line), job);
                        }
                        _ => {
                            if let Some(job) = self.admit(job) {
                                return Next::Job(job);
                            }
                        }
                    }
                }
                Ok(Line::End(status)) => {
                    self.ended(&status);
                    self.ended = true;
                }
                Ok(Line::ReadFailed(err, status)) => {
                    tracing::error!(command = %self.command, cause = %err, "cannot read the output of the feeder's command");
                    self.ended(&status);
                    self.ended = true;
                }
                Err(mpsc::TryRecvError::Empty) => return Next::Empty,
                Err(mpsc::TryRecvError::Disconnected) => {
                    // The reader thread is gone without a word (it panicked).
                    tracing::error!(command = %self.command, "the reader of the feeder's command is gone");
                    self.ended = true;
                }
            }
        }
        if self.delayed.is_empty() {
            self.done = true;
            Next::Done
        } else {
            Next::Empty
        }
    }

    fn success(&mut self, job: CommandJob) {
        self.let_go(&job);
    }

    fn error(&mut self, job: CommandJob, _reason: &str) {
        self.let_go(&job);
    }

    fn recheck(&self) -> Duration {
        match self.delayed.first_key_value() {
            Some((&(due, _), _)) => COMMAND_RECHECK.min(Duration::from_millis(
                due.saturating_sub(crate::protocol::millis::now()),
            )),
            None => COMMAND_RECHECK,
        }
    }

    fn retry_policy(&self, job: &CommandJob, first_attempt_at: SystemTime) -> Option<RetryPolicy> {
        job.options.as_ref()?.retry_policy(first_attempt_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Takes every job until Done (bounded).
    fn drain(feeder: &mut CommandFeeder) -> Vec<CommandJob> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut jobs = Vec::new();
        loop {
            match feeder.next() {
                Next::Job(job) => jobs.push(job),
                Next::Empty => {
                    assert!(Instant::now() < deadline, "no Done; {} jobs", jobs.len());
                    std::thread::sleep(Duration::from_millis(2));
                }
                Next::Done => return jobs,
            }
        }
    }

    /// Takes `n` jobs (bounded).
    fn take(feeder: &mut CommandFeeder, n: usize) -> Vec<CommandJob> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut jobs = Vec::new();
        while jobs.len() < n {
            match feeder.next() {
                Next::Job(job) => jobs.push(job),
                Next::Empty => {
                    assert!(Instant::now() < deadline, "only {} jobs", jobs.len());
                    std::thread::sleep(Duration::from_millis(2));
                }
                Next::Done => panic!("Done after {} jobs", jobs.len()),
            }
        }
        jobs
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(false)
    }

    #[test]
    fn lines_are_jobs_then_done_after_the_exit() {
        let mut feeder = CommandFeeder::spawn(
            "sh",
            &["-c", r#"printf '1\n\n{"a": [1, 2]}\n"three"\nnot json\n4'"#],
        )
        .expect("spawn sh");
        let jobs = drain(&mut feeder);
        let texts: Vec<Option<&str>> = jobs
            .iter()
            .map(|j| j.payload().map(RawValue::get))
            .collect();
        assert_eq!(
            texts,
            [
                Some("1"),
                Some(r#"{"a": [1, 2]}"#),
                Some(r#""three""#),
                None,
                Some("4")
            ],
            "blank lines skipped, a last line without newline kept"
        );
        assert_eq!(
            jobs.iter().map(CommandJob::line).collect::<Vec<_>>(),
            [1, 3, 4, 5, 6]
        );
        let problem = jobs[3].problem().expect("not JSON");
        assert!(problem.contains("line 5 of the output of sh"), "{problem}");
        assert!(problem.contains("is not JSON"), "{problem}");
        assert!(problem.contains("\"not json\""), "{problem}");
        // The server dead-letters it: it does not serialize.
        let err = serde_json::to_string(&jobs[3]).expect_err("not a job");
        assert!(err.to_string().contains("is not JSON"), "{err}");
        assert_eq!(serde_json::to_string(&jobs[0]).expect("JSON"), "1");
        assert!(matches!(feeder.next(), Next::Done), "stays done");
        assert_eq!(feeder.lines_read(), 6);
    }

    #[test]
    fn envelope_lines_carry_options_and_a_bad_option_is_named() {
        let script = r#"printf '%s\n' '{"job": 1, "options": {"unique": "k", "retry": ["1s"]}}' '{"job": 2, "options": {"unique": "k"}}' '{"job": 3, "options": {"delay": "300ms"}}' '{"job": 4, "options": {"at": "yesterday"}}' 5"#;
        let mut feeder = CommandFeeder::spawn("sh", &["-c", script]).expect("spawn sh");
        let started = Instant::now();
        let mut jobs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match feeder.next() {
                Next::Job(job) => {
                    if job.line() == 1 {
                        // Its key is held while it runs: line 2 is dropped.
                        assert!(feeder.retry_policy(&job, SystemTime::now()).is_some());
                    }
                    jobs.push(job);
                }
                Next::Empty => {
                    assert!(Instant::now() < deadline, "never done");
                    std::thread::sleep(feeder.recheck());
                }
                Next::Done => break,
            }
        }
        let lines: Vec<u64> = jobs.iter().map(CommandJob::line).collect();
        assert_eq!(
            lines,
            [1, 4, 5, 3],
            "the duplicate dropped, the delayed one last"
        );
        assert_eq!(jobs[0].payload().map(RawValue::get), Some("1"));
        assert_eq!(jobs[0].options().and_then(|o| o.unique_key()), Some("k"));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "the delay held it"
        );
        let problem = jobs[1].problem().expect("a bad option");
        assert!(
            problem.contains("line 4") && problem.contains("option \"at\""),
            "{problem}"
        );
    }

    #[test]
    fn a_failing_command_still_gives_its_jobs_then_done() {
        let mut feeder =
            CommandFeeder::spawn("sh", &["-c", "echo 1; echo 2; exit 3"]).expect("spawn");
        assert_eq!(drain(&mut feeder).len(), 2);
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error() {
        let err = CommandFeeder::spawn("/nonexistent/taskherd-feeder", &[] as &[&str])
            .expect_err("no such program");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn output_is_read_only_as_jobs_are_taken() {
        // `yes` prints forever: without back-pressure the reader would
        // read millions of lines meanwhile.
        let mut feeder = CommandFeeder::spawn("yes", &["{}"]).expect("spawn yes");
        let pid = feeder.child.pgid;
        let jobs = take(&mut feeder, 3);
        assert_eq!(jobs[2].payload().map(RawValue::get), Some("{}"));
        // Watch a while: the reader stays blocked on the full channel.
        let limit = 3 + COMMAND_READ_AHEAD as u64 + 1;
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            assert!(
                feeder.lines_read() <= limit,
                "{} lines read",
                feeder.lines_read()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let more = take(&mut feeder, 100);
        assert_eq!(more.len(), 100);
        assert!(
            feeder.lines_read() <= limit + 100,
            "{}",
            feeder.lines_read()
        );
        assert!(alive(pid), "yes still runs, blocked on its pipe");
        drop(feeder);
        // Killed with its group, and reaped by the reader thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "yes outlived its feeder");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
