//! Exec consumers: a queue group's consumer that runs a command once per
//! job, like GNU parallel, `xargs -P` or cmdstalk.
//!
//! `taskherd exec-consumer -- COMMAND ARGS...` (what a group with
//! `[group.consumer] run = "exec"` starts as each consumer instance) calls
//! [`run_exec_consumer`]: it pulls jobs from the group's feeder like any
//! [`HandlerQueue`] consumer, up to the consumer's `concurrency` at once,
//! and runs `COMMAND ARGS...` for each.
//!
//! # How it works
//!
//! - **Input.** The job's JSON payload, newline-terminated, on the
//!   command's stdin, which is then closed. The environment is the
//!   instance's (its identity: `TASKHERD_ID`, `TASKHERD_GROUP`, ...) plus
//!   [`JOB_ID_ENV`], [`JOB_ATTEMPT_ENV`] and [`JOB_DEADLINE_ENV`].
//! - **Output.** Each line the command writes on stdout (stderr) becomes a
//!   line `job <id>: <line>` of the instance's stdout (stderr), which the
//!   master logs as the instance's. A last line without a newline is
//!   kept; bytes that are not UTF-8 are passed on as they are; a line
//!   longer than [`MAX_LINE`] is cut into several.
//! - **Processes.** The command runs in a process group of its own. When
//!   it ends, whatever it left running in that group is killed (a job
//!   cannot leave processes behind). Past the lease deadline, or when the
//!   consumer stops and the job has not ended shortly before the
//!   consumer's stop grace runs out, the group gets SIGTERM, then SIGKILL
//!   after [`KILL_GRACE`] (less for a short stop grace). The command also
//!   gets SIGKILL if the consumer instance itself dies (its parent-death
//!   signal).
//! - **Outcome** from the exit status through an [`ExitMap`]: by default
//!   0 done; 75 (`EX_TEMPFAIL`) and 71 (`EX_OSERR`) retry; 126 (cannot
//!   run) and 127 (not found) dead, with an error line once per consumer
//!   saying that the group's command is broken; the other codes of 64 to
//!   78 (`sysexits.h`) dead; any other non-zero status retry (until the
//!   queue's `max_attempts`). Killed by a signal, past its lease or
//!   stopped with the consumer: retry. A command that cannot be started
//!   counts as 127 (not found) or 126 (any other reason). Retries carry no
//!   delay of their own: the feeder's backoff applies. A dead job's reason
//!   names the command and the status (`sh job.sh: exit status 65`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::pidkiller::proc::{self, Signal, Target};
use crate::protocol::slave::CONTROL_FD_ENV;
pub use crate::queue::child::MAX_LINE;
use crate::queue::child::{command_text, relay, unix_millis, NoFeeder, Stream};
use crate::queue::consumer::{JobInfo, JobResult};
use crate::queue::spawn::{JobCommand, JobProcess};
use crate::retry::Outcome;
use crate::slave::queue::consumer_grace;
use crate::slave::{Handler, HandlerQueue};

/// The job's id (stable across attempts), in the command's environment.
pub const JOB_ID_ENV: &str = "TASKHERD_JOB_ID";

/// The attempt, 1 on the first delivery, in the command's environment.
pub const JOB_ATTEMPT_ENV: &str = "TASKHERD_JOB_ATTEMPT";

/// When the job's lease ends, in milliseconds since the Unix epoch, in the
/// command's environment (absent when the lease has no time limit). The
/// command is killed then.
pub const JOB_DEADLINE_ENV: &str = "TASKHERD_JOB_DEADLINE";

/// Exit code of [`run_exec_consumer`] when it cannot play its part (not
/// started by a master, not a queue group, or given the feeder's part).
pub const EXIT_USAGE: u8 = 2;

/// Longest wait between SIGTERM and SIGKILL of a job's process group.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output still in the pipes is relayed after the job's process
/// group is gone (a process outside the group may hold them open).
const OUTPUT_LINGER: Duration = Duration::from_secs(1);

/// Exit code of a command that cannot run (`sh`'s and `bash`'s).
const CANNOT_RUN: u8 = 126;

/// Exit code of a command not found (`sh`'s and `bash`'s).
const NOT_FOUND: u8 = 127;

/// What an exit status makes of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitClass {
    /// Done: acked.
    Done,
    /// Failed, may succeed later: retried after the feeder's backoff,
    /// until the queue's `max_attempts`.
    Retry,
    /// Can never succeed: dead-lettered at once.
    Dead,
}

impl fmt::Display for ExitClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExitClass::Done => "done",
            ExitClass::Retry => "retry",
            ExitClass::Dead => "dead",
        })
    }
}

/// A code given two classes in one [`ExitMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exit status {code} is given two outcomes: {first} and {second}")]
pub struct ExitMapError {
    /// The exit status.
    pub code: u8,
    /// The class it was given first.
    pub first: ExitClass,
    /// The other class.
    pub second: ExitClass,
}

/// Which exit statuses of a job's command mean done, retry or dead: the
/// defaults (see [`ExitMap::default_class`]) with overrides.
///
/// ```
/// use taskherd::queue::exec::{ExitClass, ExitMap};
///
/// let map = ExitMap::default()
///     .with(ExitClass::Done, &[1])? // grep's "no match" is fine
///     .with(ExitClass::Retry, &[65])?;
/// assert_eq!(map.class(0), ExitClass::Done);
/// assert_eq!(map.class(1), ExitClass::Done);
/// assert_eq!(map.class(65), ExitClass::Retry);
/// assert_eq!(map.class(66), ExitClass::Dead);
/// assert_eq!(map.class(2), ExitClass::Retry);
/// # Ok::<(), taskherd::queue::exec::ExitMapError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitMap {
    /// The codes whose class is not the default one.
    overrides: BTreeMap<u8, ExitClass>,
}

impl ExitMap {
    /// The defaults: 0 done; 75 (`EX_TEMPFAIL`) and 71 (`EX_OSERR`)
    /// retry; 126 (cannot run), 127 (not found) and the other codes of 64
    /// to 78 (`sysexits.h`: bad usage, bad data, no input, ...) dead; any
    /// other code retry.
    pub fn default_class(code: u8) -> ExitClass {
        match code {
            0 => ExitClass::Done,
            71 | 75 => ExitClass::Retry,
            64..=78 | CANNOT_RUN | NOT_FOUND => ExitClass::Dead,
            _ => ExitClass::Retry,
        }
    }

    /// The same map with `codes` in `class`.
    ///
    /// # Errors
    ///
    /// A code already given another class by an override (a code in two
    /// lists).
    pub fn with(mut self, class: ExitClass, codes: &[u8]) -> Result<ExitMap, ExitMapError> {
        for &code in codes {
            match self.overrides.insert(code, class) {
                Some(first) if first != class => {
                    return Err(ExitMapError {
                        code,
                        first,
                        second: class,
                    })
                }
                _ => {}
            }
        }
        Ok(self)
    }

    /// What exit status `code` makes of a job.
    pub fn class(&self, code: u8) -> ExitClass {
        self.overrides
            .get(&code)
            .copied()
            .unwrap_or_else(|| ExitMap::default_class(code))
    }

    /// Whether `code` keeps its default class.
    fn is_default(&self, code: u8) -> bool {
        !self.overrides.contains_key(&code)
    }

    /// The outcome of a job of `command` that ended as `end`.
    fn outcome(&self, end: &JobEnd, command: &str) -> Outcome {
        let class = match end {
            JobEnd::Exited(code) | JobEnd::CannotStart { code, .. } => self.class(*code),
            JobEnd::Signaled(_) | JobEnd::PastLease | JobEnd::Stopped => ExitClass::Retry,
        };
        match class {
            ExitClass::Done => Outcome::Done,
            ExitClass::Retry => Outcome::Retry(None),
            ExitClass::Dead => Outcome::Dead(format!("{command}: {end}")),
        }
    }

    /// Why `command` is broken, when `end` says it cannot run at all and
    /// the map keeps the default meaning of that: the loud error.
    fn broken(&self, end: &JobEnd, command: &str) -> Option<String> {
        let why = match end {
            JobEnd::CannotStart { cause, .. } => cause.clone(),
            JobEnd::Exited(code @ (CANNOT_RUN | NOT_FOUND)) if self.is_default(*code) => {
                end.to_string()
            }
            _ => return None,
        };
        Some(format!(
            "command {command} cannot run ({why}): check the group's command"
        ))
    }
}

/// How a job's command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JobEnd {
    /// It exited with this status.
    Exited(u8),
    /// A signal killed it (not one of ours).
    Signaled(i32),
    /// It ran past its lease deadline: killed.
    PastLease,
    /// The consumer stopped while it ran: killed.
    Stopped,
    /// It could not be started: counted as `code` (127 not found, 126
    /// anything else).
    CannotStart {
        /// 126 or 127.
        code: u8,
        /// The error of the spawn, for the log and the dead letter.
        cause: String,
    },
}

impl JobEnd {
    /// A spawn error: 127 for a missing program, 126 for anything else.
    fn cannot_start(err: &std::io::Error) -> JobEnd {
        if err.kind() == std::io::ErrorKind::NotFound {
            JobEnd::CannotStart {
                code: NOT_FOUND,
                cause: format!("exit {NOT_FOUND}: not found"),
            }
        } else {
            JobEnd::CannotStart {
                code: CANNOT_RUN,
                cause: format!("exit {CANNOT_RUN}: {err}"),
            }
        }
    }

    /// `outcome` with what the joblog gets of this end: the exit status
    /// (126 or 127 for a command that could not start, as a shell says),
    /// the signal, and a retry's reason.
    fn result(&self, outcome: Outcome, command: &str) -> JobResult {
        let reason = matches!(outcome, Outcome::Retry(_)).then(|| format!("{command}: {self}"));
        let mut result = JobResult::new(outcome);
        result.reason = reason;
        match self {
            JobEnd::Exited(code) | JobEnd::CannotStart { code, .. } => {
                result.with_exit(i32::from(*code))
            }
            JobEnd::Signaled(signal) => result.with_signal(*signal),
            JobEnd::PastLease | JobEnd::Stopped => result,
        }
    }

    /// The end of an exit status.
    fn of_status(status: ExitStatus) -> JobEnd {
        match (status.code(), status.signal()) {
            (Some(code), _) => JobEnd::Exited(u8::try_from(code).unwrap_or(u8::MAX)),
            (None, Some(signal)) => JobEnd::Signaled(signal),
            // Neither: stopped or continued, which `wait` does not report.
            (None, None) => JobEnd::Signaled(0),
        }
    }
}

impl fmt::Display for JobEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEnd::Exited(code @ CANNOT_RUN) => write!(f, "exit status {code}: cannot run"),
            JobEnd::Exited(code @ NOT_FOUND) => write!(f, "exit status {code}: not found"),
            JobEnd::Exited(code) => write!(f, "exit status {code}"),
            JobEnd::Signaled(signal) => write!(f, "killed by signal {signal}"),
            JobEnd::PastLease => f.write_str("killed past its lease"),
            JobEnd::Stopped => f.write_str("killed when the consumer stopped"),
            JobEnd::CannotStart { cause, .. } => write!(f, "cannot run: {cause}"),
        }
    }
}

/// Runs this consumer instance of a queue group as an exec consumer:
/// `program` with `args` once per job, the outcome from its exit status
/// through `map` (see the [module docs](self)). Returns the exit code for
/// `main`.
///
/// It connects to the master with [`HandlerQueue::from_env`] and runs the
/// jobs with [`HandlerQueue::run_queue_with_info`], up to the consumer's
/// `concurrency` at once. It refuses to play the feeder: it says why (on
/// stderr and to the master) and returns [`EXIT_USAGE`], as it does when
/// it was not started by a master of a queue group.
///
/// Call it from `main`'s thread.
pub fn run_exec_consumer<A: AsRef<OsStr>>(program: &OsStr, args: &[A], map: ExitMap) -> ExitCode {
    let queue = match HandlerQueue::from_env() {
        Ok(queue) => queue,
        Err(err) => {
            eprintln!("taskherd exec-consumer: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if queue.is_feeder() {
        let message = "taskherd exec-consumer runs the consumers of a queue group, not its \
                       feeder (instance 1): give the group a feeder of its own";
        eprintln!("taskherd exec-consumer: {message}");
        let _ = queue.handler().report_outcome(Err(message.to_string()));
        return ExitCode::from(EXIT_USAGE);
    }
    let args: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
    let exec = Arc::new(Exec {
        command: command_text(program, &args),
        // The instance's environment (its identity) without the control
        // channel, which is the consumer's alone.
        spawn: JobCommand::new(
            program,
            &args,
            std::env::vars_os().filter(|(key, _)| {
                ![
                    CONTROL_FD_ENV,
                    JOB_ID_ENV,
                    JOB_ATTEMPT_ENV,
                    JOB_DEADLINE_ENV,
                ]
                .iter()
                .any(|name| key == name)
            }),
        )
        .map_err(|err| err.to_string()),
        map,
        stop_grace: consumer_grace(queue.identity().stop_grace),
        broken_said: AtomicBool::new(false),
        groups: Mutex::new(Groups::default()),
    });
    let run = Arc::clone(&exec);
    let code = queue.run_queue_with_info(
        move |handler: &Handler, payload: serde_json::Value, info: JobInfo| {
            run.run_job(handler, &payload, &info)
        },
        NoFeeder,
    );
    // The consumer abandons jobs still running after its stop grace: their
    // process groups must not outlive us.
    exec.kill_abandoned();
    code
}

/// The process groups of the jobs running, for the last sweep.
#[derive(Debug, Default)]
struct Groups {
    /// Process group ids (the jobs' pids), each of a child not reaped yet:
    /// the id cannot be anybody else's.
    running: HashSet<u32>,
    /// The consumer has ended: a job starting now is killed at once.
    closed: bool,
}

/// What every job of this consumer shares.
#[derive(Debug)]
struct Exec {
    /// The command ready to spawn, or why it cannot be (a NUL byte in
    /// it).
    spawn: Result<JobCommand, String>,
    /// `program args...`, for the log and dead letters.
    command: String,
    /// Exit status to outcome.
    map: ExitMap,
    /// The consumer's stop grace: a job still running this long after the
    /// stop is abandoned by the consumer.
    stop_grace: Duration,
    /// The "command cannot run" error was logged (once per consumer).
    broken_said: AtomicBool,
    /// The jobs' process groups.
    groups: Mutex<Groups>,
}

impl Exec {
    /// Runs one job to its outcome (on a thread of the consumer's), with
    /// its exit status for the feeder's joblog.
    fn run_job(&self, handler: &Handler, payload: &serde_json::Value, info: &JobInfo) -> JobResult {
        let end = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime.block_on(self.run_process(handler, payload, info)),
            Err(err) => {
                warn!(job = info.id, cause = %err, "cannot start a runtime for the job: retry");
                return JobResult::new(Outcome::Retry(None))
                    .with_reason(format!("cannot start a runtime for the job: {err}"));
            }
        };
        if let Some(message) = self.map.broken(&end, &self.command) {
            if !self.broken_said.swap(true, Ordering::SeqCst) {
                error!("{message}");
            }
        }
        let outcome = self.map.outcome(&end, &self.command);
        let (id, attempt) = (info.id, info.attempt);
        match &outcome {
            Outcome::Done => debug!(attempt, "job {id}: done"),
            Outcome::Retry(_) if matches!(end, JobEnd::Stopped) => {
                info!(attempt, "job {id}: {end}: retry");
            }
            Outcome::Retry(_) => warn!(attempt, "job {id}: {end}: retry"),
            Outcome::Dead(reason) => warn!(attempt, "job {id}: {reason}: dead"),
        }
        end.result(outcome, &self.command)
    }

    /// Starts the command, feeds it, relays its output, and waits for its
    /// end, killing its group past the deadline or at stop.
    async fn run_process(
        &self,
        handler: &Handler,
        payload: &serde_json::Value,
        info: &JobInfo,
    ) -> JobEnd {
        let mut env = vec![
            (JOB_ID_ENV, info.id.to_string()),
            (JOB_ATTEMPT_ENV, info.attempt.to_string()),
        ];
        if let Some(deadline) = info.deadline {
            env.push((JOB_DEADLINE_ENV, unix_millis(deadline).to_string()));
        }
        let command = match &self.spawn {
            Ok(command) => command,
            Err(cause) => {
                return JobEnd::CannotStart {
                    code: CANNOT_RUN,
                    cause: format!("exit {CANNOT_RUN}: {cause}"),
                }
            }
        };
        let mut child = match command.spawn(&env) {
            Ok(child) => child,
            Err(err) => return JobEnd::cannot_start(&err),
        };
        let pid = child.id();
        if !self.register(pid) {
            // The consumer is gone: nobody waits for this job.
            let _ = proc::signal(Target::Group(pid), Signal::Kill, "exec job").await;
            let _ = child.wait();
            return JobEnd::Stopped;
        }
        let prefix = format!("job {}: ", info.id).into_bytes();
        let input = {
            let mut text = payload.to_string().into_bytes();
            text.push(b'\n');
            text
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let output = async {
            tokio::join!(
                feed(stdin, &input),
                relay(stdout, &prefix, Stream::Stdout),
                relay(stderr, &prefix, Stream::Stderr),
            )
        };
        let supervised = self.supervise(&child, info, handler.stop_token());
        let (end, output_done) = run_beside(supervised, output).await;
        if !output_done {
            debug!(
                job = info.id,
                "job output still open after its end (held by a process outside its group): \
                 no longer relayed"
            );
        }
        self.unregister(pid);
        match child.wait() {
            Ok(status) => end.unwrap_or_else(|| JobEnd::of_status(status)),
            Err(err) => {
                warn!(job = info.id, cause = %err, "cannot wait for the job's process");
                end.unwrap_or(JobEnd::Signaled(0))
            }
        }
    }

    /// Waits for the job's process to end; kills its group at the lease
    /// deadline or at stop. Returns `None` when the process ended by
    /// itself, or why it was killed. Either way the process has ended (not
    /// reaped yet) and its group has had SIGKILL.
    async fn supervise(
        &self,
        child: &JobProcess,
        info: &JobInfo,
        stop: CancellationToken,
    ) -> Option<JobEnd> {
        let pid = child.id();
        let exited = child.exited();
        tokio::pin!(exited);
        let lease_over = sleep_until_std(info.deadline);
        let stopped = async {
            stop.cancelled().await;
            // Let the job finish while the consumer waits for it, then end
            // it in time for its outcome to be sent.
            let (term_after, _) = stop_schedule(self.stop_grace);
            tokio::time::sleep(term_after).await;
        };
        let mut ended = false;
        let killed = tokio::select! {
            () = &mut exited => {
                ended = true;
                None
            }
            () = lease_over => Some(JobEnd::PastLease),
            () = stopped => Some(JobEnd::Stopped),
        };
        if let Some(why) = &killed {
            let grace = match why {
                JobEnd::Stopped => stop_schedule(self.stop_grace).1,
                _ => KILL_GRACE,
            };
            debug!(
                job = info.id,
                pid, "job {why}: SIGTERM to its process group"
            );
            let _ = proc::signal(Target::Group(pid), Signal::Term, "exec job").await;
            ended = tokio::time::timeout(grace, &mut exited).await.is_ok();
        }
        // Whatever is left of the group (the job's own background
        // processes, or all of it after the grace) dies now.
        let _ = proc::signal(Target::Group(pid), Signal::Kill, "exec job").await;
        if !ended {
            exited.await;
        }
        killed
    }

    /// Records a job's process group; `false` when the consumer has ended.
    fn register(&self, pgid: u32) -> bool {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if groups.closed {
            return false;
        }
        groups.running.insert(pgid);
        true
    }

    /// Forgets a job's process group, before its process is reaped.
    fn unregister(&self, pgid: u32) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.running.remove(&pgid);
    }

    /// The consumer has ended: SIGKILL to the groups of the jobs it
    /// abandoned (still running after the stop grace).
    fn kill_abandoned(&self) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.closed = true;
        for &pgid in &groups.running {
            warn!(
                pid = pgid,
                "job still running when the consumer ended: killed"
            );
            // The lock is held: the job's thread cannot reap its process
            // meanwhile, so the group id is still the job's.
            if let Err(err) = proc::send_once(Target::Group(pgid), Signal::Kill) {
                warn!(pid = pgid, cause = %err, "cannot kill an abandoned job");
            }
        }
    }
}

/// When a job still running at stop gets SIGTERM (after the stop) and how
/// long it then has before SIGKILL: both within the consumer's grace
/// `grace`, leaving time for the outcome to be sent.
fn stop_schedule(grace: Duration) -> (Duration, Duration) {
    let kill_grace = KILL_GRACE.min(grace / 4);
    (grace.saturating_sub(kill_grace * 2), kill_grace)
}

/// Runs `main` and `beside` together until `main` ends, then gives
/// `beside` [`OUTPUT_LINGER`] more. Returns `main`'s output and whether
/// `beside` finished.
async fn run_beside<M, B>(main: M, beside: B) -> (M::Output, bool)
where
    M: Future,
    B: Future,
{
    tokio::pin!(main);
    tokio::pin!(beside);
    let mut beside_done = false;
    let output = loop {
        tokio::select! {
            output = &mut main => break output,
            _ = &mut beside, if !beside_done => beside_done = true,
        }
    };
    if !beside_done {
        beside_done = tokio::time::timeout(OUTPUT_LINGER, &mut beside)
            .await
            .is_ok();
    }
    (output, beside_done)
}

/// Sleeps until `deadline`, forever when there is none.
async fn sleep_until_std(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Writes `input` to the command's stdin, then closes it. A command that
/// does not read it (or has ended) is its own business.
async fn feed(stdin: Option<OwnedFd>, input: &[u8]) {
    let Some(fd) = stdin else { return };
    let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    let _ = pipe.write_all(input).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_map() {
        let map = ExitMap::default();
        assert_eq!(map.class(0), ExitClass::Done);
        for code in [75, 71] {
            assert_eq!(map.class(code), ExitClass::Retry, "{code}");
        }
        for code in [64, 65, 66, 70, 72, 74, 76, 77, 78, 126, 127] {
            assert_eq!(map.class(code), ExitClass::Dead, "{code}");
        }
        for code in [1, 2, 63, 79, 125, 128, 137, 255] {
            assert_eq!(map.class(code), ExitClass::Retry, "{code}");
        }
    }

    #[test]
    fn overrides_win_and_must_not_conflict() {
        let map = ExitMap::default()
            .with(ExitClass::Done, &[1, 0])
            .and_then(|map| map.with(ExitClass::Retry, &[65, 127]))
            .and_then(|map| map.with(ExitClass::Dead, &[75, 3]))
            .expect("no conflict");
        assert_eq!(map.class(1), ExitClass::Done);
        assert_eq!(map.class(65), ExitClass::Retry);
        assert_eq!(map.class(75), ExitClass::Dead);
        assert_eq!(map.class(3), ExitClass::Dead);
        assert_eq!(map.class(71), ExitClass::Retry, "defaults stay");
        assert_eq!(map.class(66), ExitClass::Dead, "defaults stay");
        let err = map
            .clone()
            .with(ExitClass::Done, &[2, 65])
            .expect_err("65 is a retry already");
        assert_eq!(
            err,
            ExitMapError {
                code: 65,
                first: ExitClass::Retry,
                second: ExitClass::Done
            }
        );
        assert_eq!(
            err.to_string(),
            "exit status 65 is given two outcomes: retry and done"
        );
        assert!(
            map.with(ExitClass::Dead, &[3]).is_ok(),
            "the same class again"
        );
    }

    #[test]
    fn results_carry_the_exit_status_and_the_reason_of_a_retry() {
        let cmd = "sh job.sh";
        let done = JobEnd::Exited(0).result(Outcome::Done, cmd);
        assert_eq!((done.exit, done.signal, done.reason), (Some(0), None, None));
        let retry = JobEnd::Exited(75).result(Outcome::Retry(None), cmd);
        assert_eq!(retry.exit, Some(75));
        assert_eq!(retry.reason.as_deref(), Some("sh job.sh: exit status 75"));
        let killed = JobEnd::Signaled(9).result(Outcome::Retry(None), cmd);
        assert_eq!((killed.exit, killed.signal), (None, Some(9)));
        let missing = JobEnd::CannotStart {
            code: NOT_FOUND,
            cause: "exit 127: not found".into(),
        }
        .result(Outcome::Dead("x".into()), cmd);
        assert_eq!((missing.exit, missing.reason), (Some(127), None));
        let late = JobEnd::PastLease.result(Outcome::Retry(None), cmd);
        assert_eq!((late.exit, late.signal), (None, None));
    }

    #[test]
    fn outcomes_of_the_ends() {
        let map = ExitMap::default();
        let cmd = "sh job.sh";
        assert_eq!(map.outcome(&JobEnd::Exited(0), cmd), Outcome::Done);
        assert_eq!(map.outcome(&JobEnd::Exited(75), cmd), Outcome::Retry(None));
        assert_eq!(map.outcome(&JobEnd::Exited(1), cmd), Outcome::Retry(None));
        assert_eq!(
            map.outcome(&JobEnd::Exited(65), cmd),
            Outcome::Dead("sh job.sh: exit status 65".into())
        );
        assert_eq!(
            map.outcome(&JobEnd::Exited(127), cmd),
            Outcome::Dead("sh job.sh: exit status 127: not found".into())
        );
        for end in [JobEnd::Signaled(9), JobEnd::PastLease, JobEnd::Stopped] {
            assert_eq!(map.outcome(&end, cmd), Outcome::Retry(None), "{end}");
        }
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let end = JobEnd::cannot_start(&missing);
        assert!(matches!(end, JobEnd::CannotStart { code: 127, .. }));
        assert!(
            matches!(map.outcome(&end, "nope"), Outcome::Dead(reason) if reason.starts_with("nope: cannot run: exit 127")),
        );
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(matches!(
            JobEnd::cannot_start(&denied),
            JobEnd::CannotStart { code: 126, .. }
        ));
        // Mapped otherwise, a spawn failure follows the map.
        let lenient = ExitMap::default()
            .with(ExitClass::Retry, &[127])
            .expect("map");
        assert_eq!(lenient.outcome(&end, "nope"), Outcome::Retry(None));
    }

    #[test]
    fn a_broken_command_is_said_unless_remapped() {
        let map = ExitMap::default();
        let said = map.broken(&JobEnd::Exited(127), "nope").expect("broken");
        assert_eq!(
            said,
            "command nope cannot run (exit status 127: not found): check the group's command"
        );
        assert!(map.broken(&JobEnd::Exited(126), "x").is_some());
        assert!(map.broken(&JobEnd::Exited(65), "x").is_none());
        assert!(map.broken(&JobEnd::Signaled(9), "x").is_none());
        let remapped = ExitMap::default()
            .with(ExitClass::Dead, &[127])
            .expect("map");
        assert!(remapped.broken(&JobEnd::Exited(127), "x").is_none());
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(remapped
            .broken(&JobEnd::cannot_start(&missing), "x")
            .is_some_and(|said| said.contains("exit 127")));
    }

    #[test]
    fn stop_schedule_fits_the_grace() {
        assert_eq!(
            stop_schedule(Duration::from_secs(8)),
            (Duration::from_secs(4), KILL_GRACE)
        );
        let (term, kill) = stop_schedule(Duration::from_millis(800));
        assert_eq!(kill, Duration::from_millis(200));
        assert_eq!(term, Duration::from_millis(400));
        assert_eq!(
            stop_schedule(Duration::ZERO),
            (Duration::ZERO, Duration::ZERO)
        );
    }
}
