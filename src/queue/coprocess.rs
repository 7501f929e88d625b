//! Coprocess consumers: a queue group's consumer that starts its command
//! once and speaks JSON lines with it, several jobs at once.
//!
//! `taskherd coprocess-consumer -- COMMAND ARGS...` (what a group with
//! `[group.consumer] run = "coprocess"` starts as each consumer instance)
//! calls [`run_coprocess_consumer`]: it pulls jobs from the group's feeder
//! like any [`HandlerQueue`] consumer, up to the consumer's `concurrency`
//! at once, and hands them to the one program it started.
//!
//! # The protocol, version [`PROTOCOL`]
//!
//! One JSON object per line (UTF-8, `\n`-terminated), each with a
//! `"type"`. Fields not listed here are ignored by both sides, so later
//! versions can add some.
//!
//! On the program's **stdin**, from taskherd:
//!
//! - `{"type":"hello","protocol":1,"concurrency":2,"group":"thumbs","id":2}`
//!   first, once.
//! - `{"type":"job","id":17,"attempt":1,"deadline_ms":1767225600000,"payload":{...}}`
//!   for each job; at most `concurrency` are outstanding (sent and not
//!   answered yet). `id` is stable across attempts; `deadline_ms` is the end
//!   of the job's lease in ms since the Unix epoch (`null` without a lease).
//!   The hello's and the job's fields come in this order, without spaces,
//!   `payload` (the job's JSON, on one line) last: a shell script can take
//!   them apart with `sed`.
//! - End of file: no more jobs will come; exit once the outstanding ones
//!   are answered.
//!
//! On the program's **stdout**, to taskherd (its **stderr** is free for
//! logs: each line becomes a log line of the instance):
//!
//! - `{"type":"ok","id":17}`: done.
//! - `{"type":"retry","id":17,"delay_ms":5000,"reason":"busy"}`: failed,
//!   run it again (after `delay_ms`, optional, or the queue's backoff).
//! - `{"type":"dead","id":17,"reason":"bad input"}`: can never succeed.
//! - `{"type":"progress","id":17}`: still working on it: its lease starts
//!   again (the feeder's whole lease time from now).
//! - `{"type":"slow_down"}`: the feeder halves its rate for a while.
//! - `{"type":"pause","ms":10000}`: the feeder sends no job to anyone for
//!   that long (at most 60 s).
//!
//!   These two reach the feeder while a job is outstanding (through its
//!   link); with none, they are dropped.
//! - `{"type":"log","level":"info","message":"..."}`: a log line of the
//!   instance (`level`: error, warn, info, debug or trace; info when
//!   absent).
//!
//! A job not answered by the end of its lease is given up here (a retry;
//! the feeder gives it to someone else): a later answer to it is ignored.
//! A line that is not one of these messages, an answer for a job id that
//! is not outstanding, the program closing its stdout or exiting: the
//! consumer logs an error naming the line (cut to [`QUOTE_LEN`] bytes) or
//! the exit status, kills the program's process group, reports its
//! outstanding jobs as retries and ends with a failure: the master
//! restarts it per the group's `restart` policy.
//!
//! # Processes
//!
//! The program runs in a process group of its own, with the parent-death
//! signal SIGKILL. At stop (drain, `max_jobs`, Ctrl-C) no new job is sent;
//! outstanding jobs get the consumer's grace to be answered; then the
//! program's stdin is closed, and its group gets SIGTERM if it has not
//! exited [`EOF_GRACE`] later, SIGKILL [`EOF_GRACE`] after that. Whatever
//! is left of its group is killed when it exits.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use crate::pidkiller::proc::{self, Signal, Target};
use crate::protocol::slave::{QueueRole, CONTROL_FD_ENV};
use crate::queue::child::{
    command_text, die_with_parent, relay, unix_millis, wait_exited, Lines, NoFeeder, Stream,
};
use crate::queue::consumer::{FeederControl, JobInfo};
use crate::retry::Outcome;
use crate::slave::{Handler, HandlerQueue};

/// The version of the protocol, in the hello line.
pub const PROTOCOL: u32 = 1;

/// Exit code of [`run_coprocess_consumer`] when it cannot play its part
/// (not started by a master, not a queue group, or given the feeder's
/// part).
pub const EXIT_USAGE: u8 = 2;

/// At stop, how long the program has to exit after the end of its stdin,
/// and then after SIGTERM.
pub const EOF_GRACE: Duration = Duration::from_secs(2);

/// How much of a bad line the error quotes.
pub const QUOTE_LEN: usize = 200;

/// A message of the program, from its stdout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Answer {
    /// The job is done.
    Ok {
        /// The job.
        id: u64,
        /// The attempt answered (optional: an answer naming another
        /// attempt than the one outstanding is a late one, ignored).
        #[serde(default)]
        attempt: Option<u32>,
    },
    /// The job failed; run it again.
    Retry {
        /// The job.
        id: u64,
        /// The attempt answered (optional).
        #[serde(default)]
        attempt: Option<u32>,
        /// Wanted delay, in ms.
        #[serde(default)]
        delay_ms: Option<u64>,
        /// What went wrong, for the log.
        #[serde(default)]
        reason: Option<String>,
    },
    /// The job can never succeed.
    Dead {
        /// The job.
        id: u64,
        /// The attempt answered (optional).
        #[serde(default)]
        attempt: Option<u32>,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
    /// Still working on the job: extend its lease.
    Progress {
        /// The job.
        id: u64,
    },
    /// The feeder should lower its rate.
    SlowDown,
    /// The feeder should send nothing for a while.
    Pause {
        /// How long, in ms.
        ms: u64,
    },
    /// A log line.
    Log {
        /// error, warn, info, debug or trace.
        #[serde(default)]
        level: Option<String>,
        /// The line.
        message: String,
    },
}

/// Reads one line of the program's stdout.
///
/// # Errors
///
/// Why the line is not a message of the protocol (for the log).
fn parse_answer(line: &[u8]) -> Result<Answer, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|err| format!("not JSON ({err})"))?;
    let kind = match value.get("type") {
        Some(serde_json::Value::String(kind)) => kind.clone(),
        Some(_) => return Err("\"type\" is not a string".into()),
        None => return Err("no \"type\"".into()),
    };
    serde_json::from_value(value).map_err(|err| match kind.as_str() {
        "ok" | "retry" | "dead" | "progress" | "slow_down" | "pause" | "log" => {
            format!("bad {kind:?} message ({err})")
        }
        _ => format!("unknown message type {kind:?}"),
    })
}

/// `line` for an error message: lossy UTF-8, cut to [`QUOTE_LEN`] bytes.
fn quote(line: &[u8]) -> String {
    let cut = &line[..line.len().min(QUOTE_LEN)];
    let text = String::from_utf8_lossy(cut);
    if cut.len() < line.len() {
        format!("{text:?}... ({} bytes)", line.len())
    } else {
        format!("{text:?}")
    }
}

/// Runs this consumer instance of a queue group as a coprocess consumer:
/// `program` with `args` started once, its jobs sent as JSON lines (see
/// the [module docs](self)). Returns the exit code for `main`.
///
/// It connects to the master with [`HandlerQueue::from_env`] and runs the
/// jobs with [`HandlerQueue::run_queue_with_info`], up to the consumer's
/// `concurrency` outstanding at once. It refuses to play the feeder,
/// returning [`EXIT_USAGE`], as it does when it was not started by a master
/// of a queue group. It fails when the program cannot start or breaks the
/// protocol.
///
/// Call it from `main`'s thread.
pub fn run_coprocess_consumer<A: AsRef<OsStr>>(program: &OsStr, args: &[A]) -> ExitCode {
    let queue = match HandlerQueue::from_env() {
        Ok(queue) => queue,
        Err(err) => {
            eprintln!("taskherd coprocess-consumer: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let concurrency = match queue.role() {
        QueueRole::Consumer { concurrency, .. } => (*concurrency).max(1),
        _ => {
            let message = "taskherd coprocess-consumer runs the consumers of a queue group, \
                           not its feeder (instance 1): give the group a feeder of its own";
            eprintln!("taskherd coprocess-consumer: {message}");
            let _ = queue.handler().report_outcome(Err(message.to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let args: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
    let command = command_text(program, &args);
    let mut spawn = Command::new(program);
    spawn
        .args(&args)
        .env_remove(CONTROL_FD_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_parent(&mut spawn);
    let child = match spawn.spawn() {
        Ok(child) => child,
        Err(err) => {
            let message = format!("cannot start the coprocess {command}: {err}");
            error!("{message}");
            return queue.handler().report_outcome(Err(message));
        }
    };
    let hello = format!(
        "{{\"type\":\"hello\",\"protocol\":{PROTOCOL},\"concurrency\":{concurrency},\"group\":{},\"id\":{}}}",
        serde_json::Value::from(queue.group()),
        queue.id()
    );
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();
    let finish = CancellationToken::new();
    let broken = Arc::new(Mutex::new(None::<String>));
    let manager = Manager {
        command: command.clone(),
        stop: queue.handler().stop_root(),
        broken: Arc::clone(&broken),
    };
    let manager_finish = finish.clone();
    let managed = std::thread::Builder::new()
        .name("taskherd-coprocess".into())
        .spawn(move || manager.run(child, hello, requests_rx, manager_finish));
    let managed = match managed {
        Ok(managed) => managed,
        Err(err) => {
            let message = format!("cannot start the coprocess thread: {err}");
            error!("{message}");
            return queue.handler().report_outcome(Err(message));
        }
    };
    let code = queue.run_queue_then(
        move |_handler: &Handler, payload: serde_json::Value, info: JobInfo| {
            let (answer_tx, answer_rx) = oneshot::channel();
            let request = Request {
                info,
                payload,
                answer_tx,
            };
            if requests_tx.send(request).is_err() {
                return Outcome::Retry(None);
            }
            answer_rx.blocking_recv().unwrap_or(Outcome::Retry(None))
        },
        NoFeeder,
        |played| {
            // The queue is over: the program gets its end of file, and
            // the consumer fails if the program broke the protocol.
            finish.cancel();
            if managed.join().is_err() {
                return Err("the coprocess thread panicked".into());
            }
            let broken = broken.lock().unwrap_or_else(PoisonError::into_inner).take();
            match broken {
                Some(why) => Err(why),
                None => played,
            }
        },
    );
    code
}

/// A job for the program, from a thread of the consumer's.
struct Request {
    /// Its id, attempt, deadline, lease.
    info: JobInfo,
    /// The job itself.
    payload: serde_json::Value,
    /// Where its outcome goes.
    answer_tx: oneshot::Sender<Outcome>,
}

/// A job sent to the program and not answered yet.
struct Outstanding {
    /// Its id, attempt, lease.
    info: JobInfo,
    /// Where its outcome goes.
    answer_tx: oneshot::Sender<Outcome>,
    /// The end of its lease, moved on by progress.
    deadline: Option<Instant>,
}

/// Owns the program: writes its jobs, reads its answers.
struct Manager {
    /// `program args...`, for the log.
    command: String,
    /// The consumer's stop: cancelled when the program breaks the
    /// protocol, so the consumer drains and ends.
    stop: CancellationToken,
    /// Why the program was killed, if it broke the protocol.
    broken: Arc<Mutex<Option<String>>>,
}

/// How the conversation with the program ended.
enum End {
    /// The consumer is done: stop the program. Its stdout, still read
    /// until it ends (a program may log on its way out).
    Finish(StdoutTail),
    /// The program broke the protocol (or closed its stdout): why.
    Broken(String),
    /// The program exited (not reaped yet).
    Exited,
}

impl Manager {
    /// The program's whole life, on its own thread and runtime.
    fn run(
        self,
        mut child: Child,
        hello: String,
        requests_rx: mpsc::UnboundedReceiver<Request>,
        finish: CancellationToken,
    ) {
        let pid = child.id();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build();
        match runtime {
            Ok(runtime) => runtime.block_on(self.converse(&mut child, hello, requests_rx, finish)),
            Err(err) => {
                self.broke(format!("cannot start a runtime for the coprocess: {err}"));
                let _ = proc::send_once(Target::Group(pid), Signal::Kill);
            }
        }
        if let Err(err) = child.wait() {
            warn!(cause = %err, "cannot wait for the coprocess");
        }
    }

    /// Records why the program is being killed and stops the consumer.
    fn broke(&self, why: String) {
        error!("{why}");
        let mut broken = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        broken.get_or_insert(why);
        self.stop.cancel();
    }

    /// Talks with the program until the consumer finishes or the program
    /// breaks the protocol; then ends it (its whole process group).
    async fn converse(
        &self,
        child: &mut Child,
        hello: String,
        mut requests_rx: mpsc::UnboundedReceiver<Request>,
        finish: CancellationToken,
    ) {
        let pid = child.id();
        let stdin = child.stdin.take().map(OwnedFd::from);
        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        let (lines_tx, lines_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(write_lines(stdin, lines_rx));
        let stderr_relay = tokio::spawn(async move { relay(stderr, b"", Stream::Stderr).await });
        let mut conversation = Conversation {
            command: &self.command,
            lines_tx: Some(lines_tx),
            outstanding: HashMap::new(),
            given_up: HashSet::new(),
        };
        conversation.send_line(hello);
        let end = conversation
            .run(pid, stdout, &mut requests_rx, &finish)
            .await;
        let mut tail_task = None;
        let broken = match end {
            End::Broken(why) => Some(why),
            End::Exited => {
                // Its group dies before the leader is reaped: the group id
                // is still its own.
                let _ = proc::signal(Target::Group(pid), Signal::Kill, "coprocess").await;
                let status = match child.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    Ok(None) => "still running".to_string(),
                    Err(err) => format!("cannot wait for it: {err}"),
                };
                Some(format!("coprocess {} ended ({status})", self.command))
            }
            End::Finish(tail) => {
                tail_task = Some(tokio::spawn(tail.read()));
                None
            }
        };
        match broken {
            Some(why) => {
                let _ = proc::signal(Target::Group(pid), Signal::Kill, "coprocess").await;
                self.broke(why.clone());
                conversation.fail_all(&why);
                // Jobs still coming (the consumer drains) are retried.
                tokio::select! {
                    () = async {
                        while let Some(request) = requests_rx.recv().await {
                            let _ = request.answer_tx.send(Outcome::Retry(None));
                        }
                    } => {}
                    () = finish.cancelled() => {}
                }
            }
            None => {
                // The end of its stdin is the program's cue to exit.
                conversation.lines_tx = None;
                conversation.outstanding.clear();
                let exited = wait_exited(pid);
                tokio::pin!(exited);
                if tokio::time::timeout(EOF_GRACE, &mut exited).await.is_err() {
                    info!(
                        "coprocess {} still running {EOF_GRACE:?} after the end of its input: SIGTERM",
                        self.command
                    );
                    let _ = proc::signal(Target::Group(pid), Signal::Term, "coprocess").await;
                    if tokio::time::timeout(EOF_GRACE, &mut exited).await.is_err() {
                        warn!("coprocess {} ignored SIGTERM: SIGKILL", self.command);
                    }
                }
            }
        }
        // Whatever is left of its group dies now.
        let _ = proc::signal(Target::Group(pid), Signal::Kill, "coprocess").await;
        wait_exited(pid).await;
        drop(conversation);
        let _ = tokio::time::timeout(EOF_GRACE, writer).await;
        let _ = tokio::time::timeout(EOF_GRACE, stderr_relay).await;
        if let Some(tail_task) = tail_task {
            let _ = tokio::time::timeout(EOF_GRACE, tail_task).await;
        }
    }
}

/// The program's stdout once the consumer is done: read to its end so
/// that the program can still write (a last `log` line) on its way out.
struct StdoutTail {
    /// The program's stdout.
    stdout: pipe::Receiver,
    /// The part of a line read so far.
    lines: Lines,
    /// Lines read so far.
    number: u64,
    /// `program args...`, for the log.
    command: String,
}

impl StdoutTail {
    /// Reads to the end: `log` lines are logged; answers are ignored (the
    /// jobs were retried when the consumer finished), anything else is
    /// said once.
    async fn read(mut self) {
        let mut buf = vec![0u8; 8192];
        let mut said = false;
        loop {
            let mut complete = Vec::new();
            let ended = match self.stdout.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    self.lines
                        .finish(&mut |line: &[u8]| complete.push(line.to_vec()));
                    true
                }
                Ok(n) => {
                    self.lines
                        .push(&buf[..n], &mut |line: &[u8]| complete.push(line.to_vec()));
                    false
                }
            };
            for line in complete {
                self.number += 1;
                match parse_answer(&line) {
                    Ok(Answer::Log { level, message }) => log_message(level.as_deref(), &message),
                    Ok(_) => debug!("coprocess {}: answer after the end: ignored", self.command),
                    Err(why) if !said => {
                        said = true;
                        warn!(
                            "coprocess {}: line {} of its stdout, after the end of its input, \
                             is {why}: {}: ignored",
                            self.command,
                            self.number,
                            quote(&line)
                        );
                    }
                    Err(_) => {}
                }
            }
            if ended {
                return;
            }
        }
    }
}

/// Logs a `log` message of the program at its level.
fn log_message(level: Option<&str>, message: &str) {
    match level {
        Some("error") => error!("{message}"),
        Some("warn" | "warning") => warn!("{message}"),
        Some("debug") => debug!("{message}"),
        Some("trace") => trace!("{message}"),
        _ => info!("{message}"),
    }
}

/// The state of the talk with the program.
struct Conversation<'a> {
    /// `program args...`, for the log.
    command: &'a str,
    /// Lines for the program's stdin; `None` closes it.
    lines_tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Jobs sent and not answered, by id.
    outstanding: HashMap<u64, Outstanding>,
    /// Jobs given up at the end of their lease: late answers are ignored.
    given_up: HashSet<u64>,
}

impl Conversation<'_> {
    /// Writes one line to the program.
    fn send_line(&self, line: String) {
        if let Some(lines_tx) = &self.lines_tx {
            let mut line = line.into_bytes();
            line.push(b'\n');
            let _ = lines_tx.send(line);
        }
    }

    /// The feeder's controls, through a job outstanding: none is kept
    /// longer (the consumer's link waits for them all to go at its end).
    fn feeder(&self) -> Option<&FeederControl> {
        self.outstanding.values().next().map(|job| &job.info.feeder)
    }

    /// Answers every outstanding job with a retry.
    fn fail_all(&mut self, why: &str) {
        for (id, job) in self.outstanding.drain() {
            debug!("job {id}: {why}: retry");
            let _ = job.answer_tx.send(Outcome::Retry(None));
        }
    }

    /// The loop: jobs in, answers out, deadlines, the program's end.
    async fn run(
        &mut self,
        pid: u32,
        stdout: Option<OwnedFd>,
        requests_rx: &mut mpsc::UnboundedReceiver<Request>,
        finish: &CancellationToken,
    ) -> End {
        let command = self.command;
        let Some(mut stdout) = stdout.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()) else {
            return End::Broken(format!("coprocess {command}: cannot read its stdout"));
        };
        let exited = wait_exited(pid);
        tokio::pin!(exited);
        let mut lines = Lines::default();
        let mut buf = vec![0u8; 8192];
        let mut number = 0u64;
        loop {
            let next_deadline = self
                .outstanding
                .values()
                .filter_map(|job| job.deadline)
                .min();
            tokio::select! {
                biased;
                () = finish.cancelled() => {
                    return End::Finish(StdoutTail {
                        stdout,
                        lines,
                        number,
                        command: command.to_string(),
                    });
                }
                read = stdout.read(&mut buf) => {
                    let chunk: &[u8] = match read {
                        Ok(0) | Err(_) => {
                            // Most likely it is exiting: say how.
                            if tokio::time::timeout(EOF_GRACE, &mut exited).await.is_ok() {
                                return End::Exited;
                            }
                            return End::Broken(format!(
                                "coprocess {command} closed its stdout: killed"
                            ));
                        }
                        Ok(n) => &buf[..n],
                    };
                    let mut complete = Vec::new();
                    lines.push(chunk, &mut |line: &[u8]| complete.push(line.to_vec()));
                    for line in complete {
                        number += 1;
                        if let Err(why) = self.answer(&line) {
                            return End::Broken(format!(
                                "coprocess {command} broke the protocol: line {number} of its \
                                 stdout {why}: {}; killed",
                                quote(&line)
                            ));
                        }
                    }
                }
                Some(request) = requests_rx.recv() => self.job(request),
                () = &mut exited => return End::Exited,
                () = sleep_until_some(next_deadline), if next_deadline.is_some() => {
                    self.give_up_late(Instant::now());
                }
            }
        }
    }

    /// Sends a job to the program.
    fn job(&mut self, request: Request) {
        let Request {
            info,
            payload,
            answer_tx,
        } = request;
        let id = info.id;
        let deadline_ms = info.deadline.map_or_else(
            || "null".to_string(),
            |deadline| unix_millis(deadline).to_string(),
        );
        // By hand, to keep the order documented (payload last).
        self.send_line(format!(
            "{{\"type\":\"job\",\"id\":{id},\"attempt\":{},\"deadline_ms\":{deadline_ms},\"payload\":{payload}}}",
            info.attempt
        ));
        let deadline = info.deadline;
        if let Some(old) = self.outstanding.insert(
            id,
            Outstanding {
                info,
                answer_tx,
                deadline,
            },
        ) {
            // The same job again: the feeder gave up on the first one
            // (its lease ended before our own deadline for it fired). A
            // late answer to it is ignored from now on.
            warn!(
                "job {id}: no answer from the coprocess within its lease (attempt {}): retry",
                old.info.attempt
            );
            self.given_up.insert(id);
            let _ = old.answer_tx.send(Outcome::Retry(None));
        }
    }

    /// Jobs past their lease: retried, their late answers ignored.
    fn give_up_late(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, job)| job.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(job) = self.outstanding.remove(&id) {
                warn!(
                    attempt = job.info.attempt,
                    "job {id}: no answer from the coprocess within its lease: retry"
                );
                let _ = job.answer_tx.send(Outcome::Retry(None));
                self.given_up.insert(id);
            }
        }
    }

    /// Acts on one line of the program's stdout.
    ///
    /// # Errors
    ///
    /// Why the line breaks the protocol (not a message, or an answer for
    /// a job that is not outstanding).
    fn answer(&mut self, line: &[u8]) -> Result<(), String> {
        let answer = parse_answer(line).map_err(|why| format!("is {why}"))?;
        let (id, attempt, outcome) = match answer {
            Answer::Ok { id, attempt } => (id, attempt, Outcome::Done),
            Answer::Retry {
                id,
                attempt,
                delay_ms,
                reason,
            } => {
                if let Some(reason) = reason {
                    info!("job {id}: retry: {reason}");
                }
                (
                    id,
                    attempt,
                    Outcome::Retry(delay_ms.map(Duration::from_millis)),
                )
            }
            Answer::Dead {
                id,
                attempt,
                reason,
            } => (
                id,
                attempt,
                Outcome::Dead(reason.unwrap_or_else(|| "the coprocess said dead".into())),
            ),
            Answer::Progress { id } => {
                let Some(job) = self.outstanding.get_mut(&id) else {
                    return self.unknown(id);
                };
                match job.info.extend_lease() {
                    Some(deadline) => {
                        job.deadline = Some(deadline);
                        debug!("job {id}: progress: lease extended");
                    }
                    None => debug!("job {id}: progress: the feeder cannot extend leases"),
                }
                return Ok(());
            }
            Answer::SlowDown => {
                if let Some(feeder) = self.feeder() {
                    feeder.slow_down();
                }
                return Ok(());
            }
            Answer::Pause { ms } => {
                if let Some(feeder) = self.feeder() {
                    feeder.pause(Duration::from_millis(ms));
                }
                return Ok(());
            }
            Answer::Log { level, message } => {
                log_message(level.as_deref(), &message);
                return Ok(());
            }
        };
        let current = self
            .outstanding
            .get(&id)
            .is_some_and(|job| attempt.is_none_or(|a| a == job.info.attempt));
        if !current {
            return self.unknown(id);
        }
        if let Some(job) = self.outstanding.remove(&id) {
            let _ = job.answer_tx.send(outcome);
        }
        Ok(())
    }

    /// An answer for job `id`, which is not outstanding: ignored when it
    /// was given up, a breach otherwise.
    fn unknown(&self, id: u64) -> Result<(), String> {
        if self.given_up.contains(&id) {
            debug!("job {id}: answer after its lease: ignored");
            Ok(())
        } else {
            Err(format!("answers job {id}, which it does not hold"))
        }
    }
}

/// Writes the lines to the program's stdin until the sender is gone
/// (then closes it: end of file). A program that stopped reading is the
/// reader's business (it is then killed anyway).
async fn write_lines(stdin: Option<OwnedFd>, mut lines_rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let Some(fd) = stdin else { return };
    let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    while let Some(line) = lines_rx.recv().await {
        if pipe.write_all(&line).await.is_err() {
            break;
        }
    }
}

/// Sleeps until `deadline`, forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_answer(br#"{"type":"ok","id":3}"#),
            Ok(Answer::Ok {
                id: 3,
                attempt: None
            })
        );
        assert_eq!(
            parse_answer(br#"{"type":"ok","id":3,"attempt":2}"#),
            Ok(Answer::Ok {
                id: 3,
                attempt: Some(2)
            })
        );
        assert_eq!(
            parse_answer(br#"{"type":"retry","id":3,"delay_ms":250,"reason":"busy","extra":1}"#),
            Ok(Answer::Retry {
                id: 3,
                attempt: None,
                delay_ms: Some(250),
                reason: Some("busy".into())
            })
        );
        assert_eq!(
            parse_answer(br#"{"type":"retry","id":4}"#),
            Ok(Answer::Retry {
                id: 4,
                attempt: None,
                delay_ms: None,
                reason: None
            })
        );
        assert_eq!(
            parse_answer(br#"{"type":"dead","id":5,"reason":"bad input"}"#),
            Ok(Answer::Dead {
                id: 5,
                attempt: None,
                reason: Some("bad input".into())
            })
        );
        assert_eq!(
            parse_answer(br#"{"type":"progress","id":6}"#),
            Ok(Answer::Progress { id: 6 })
        );
        assert_eq!(
            parse_answer(br#"{"type":"slow_down"}"#),
            Ok(Answer::SlowDown)
        );
        assert_eq!(
            parse_answer(br#"{"type":"pause","ms":1000}"#),
            Ok(Answer::Pause { ms: 1000 })
        );
        assert_eq!(
            parse_answer(br#"{"type":"log","message":"hi"}"#),
            Ok(Answer::Log {
                level: None,
                message: "hi".into()
            })
        );
    }

    #[test]
    fn protocol_breaches_say_why() {
        let why = |line: &[u8]| parse_answer(line).expect_err("a breach");
        assert!(why(b"hello there").starts_with("not JSON"), "{}", why(b"x"));
        assert_eq!(why(b"{\"id\":1}"), "no \"type\"");
        assert_eq!(why(b"{\"type\":7}"), "\"type\" is not a string");
        assert_eq!(
            why(br#"{"type":"done","id":1}"#),
            "unknown message type \"done\""
        );
        assert!(why(br#"{"type":"ok"}"#).starts_with("bad \"ok\" message (missing field `id`"));
        assert!(why(br#"{"type":"ok","id":"x"}"#).starts_with("bad \"ok\" message"));
        assert!(why(br#"{"type":"pause"}"#).starts_with("bad \"pause\" message"));
        assert_eq!(why(b"\xff{}"), "not UTF-8");
        assert_eq!(why(b"[1]"), "no \"type\"");
    }

    #[test]
    fn bad_lines_are_quoted_short() {
        assert_eq!(quote(b"garbage"), "\"garbage\"");
        let long = vec![b'x'; QUOTE_LEN + 50];
        let quoted = quote(&long);
        assert!(quoted.ends_with(&format!("... ({} bytes)", QUOTE_LEN + 50)));
        assert!(quoted.len() < QUOTE_LEN + 30);
    }
}
