//! Roles the `taskherd` binary plays itself in a queue group, so that a
//! group needs no feeder program of its own. The master (or a remote
//! agent) starts them as `taskherd builtin-feeder ...` with the group's
//! environment and working directory.
//!
//! - [`run_file_feeder`]: the durable [`FileFeeder`] (`[group.feeder]
//!   file = "jobs.queue"`, `--file PATH`).
//! - [`run_jsonl_feeder`]: the lines of a JSON-lines file, durably
//!   ([`JsonlFeeder`], `[group.feeder] jsonl = "jobs.jsonl"`, `--jsonl
//!   PATH`).
//! - [`run_command_feeder`]: the lines a command prints ([`CommandFeeder`],
//!   `[group.feeder] command = "..."`, `--command -- PROGRAM ARGS...`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::feeders::{CommandFeeder, FileFeeder, JsonlFeeder};
use crate::error_text::error_chain;
use crate::retry::Outcome;
use crate::slave::{Handler, HandlerQueue};

/// Exit code of a built-in role that cannot start (not in a queue group,
/// the wrong role, a queue file that cannot be opened).
const EXIT_CANNOT_START: u8 = 2;

/// Connects to the master as a queue group's feeder, and sends this
/// process's `tracing` to the master as the instance's log; the exit code
/// when it cannot (said on stderr or in the instance's log).
fn connect(role: &str) -> Result<HandlerQueue, ExitCode> {
    let queue = match HandlerQueue::from_env() {
        Ok(queue) => queue,
        Err(err) => {
            eprintln!("taskherd builtin-feeder: {}", error_chain(&err));
            return Err(ExitCode::from(EXIT_CANNOT_START));
        }
    };
    if !queue.is_feeder() {
        queue.error(format!(
            "the built-in {role} feeder runs only as its queue group's feeder, not as a consumer"
        ));
        return Err(ExitCode::from(EXIT_CANNOT_START));
    }
    // Dead jobs are logged from the feeder's threads through `tracing`:
    // send it to the master as this instance's log. It fails only when a
    // subscriber is set already, which then gets them.
    let _ = queue.init_tracing();
    Ok(queue)
}

/// Says in the instance's log why the built-in `role` feeder cannot start.
fn cannot_start(queue: &HandlerQueue, role: &str, why: &dyn std::error::Error) -> ExitCode {
    queue.error(format!(
        "the built-in {role} feeder cannot start: {}",
        error_chain(why)
    ));
    ExitCode::from(EXIT_CANNOT_START)
}

/// Runs the built-in file feeder of a queue group on the durable queue at
/// `path` until the master stops it, and returns the exit code for
/// `main` (what `taskherd builtin-feeder --file PATH` does).
///
/// It connects to the master like [`HandlerQueue::from_env`], refuses to
/// run as a consumer, opens `path` with [`FileFeeder::open`] (a leading
/// `~/` is this host's home directory: a remote feeder's file arrives as
/// written in the config), logs each job given up on as a warning of the
/// instance with its id and reason, and serves the queue
/// ([`HandlerQueue::run_queue`]). Jobs are added with `taskherd queue add
/// PATH ...` while it serves.
///
/// Exit code 2, with the reason on stderr or in the instance's log, when
/// it is not started as a queue group's feeder or the queue cannot be
/// opened (locked by another process, not a journal, corrupt, ...);
/// otherwise that of [`HandlerQueue::run_queue`].
pub fn run_file_feeder(path: &Path) -> ExitCode {
    let queue = match connect("file") {
        Ok(queue) => queue,
        Err(code) => return code,
    };
    let feeder = match FileFeeder::open(expand_home(path)) {
        Ok(feeder) => feeder,
        Err(err) => return cannot_start(&queue, "file", &err),
    };
    let feeder = feeder.with_dead_hook(|job, reason| {
        tracing::warn!(id = job.id(), reason, "job dead");
    });
    queue.run_queue(no_consumer, feeder)
}

/// Runs the built-in JSON-lines feeder of a queue group on the file at
/// `path` (what `taskherd builtin-feeder --jsonl PATH` does): each line is
/// a job, served by a [`JsonlFeeder`] whose journal is `PATH.state`.
///
/// As [`run_file_feeder`] (`~/` expanded, dead jobs logged as warnings,
/// exit code 2 when it cannot start: also when the file is missing, or
/// was replaced or cut shorter since it was taken in), except that it
/// ends by itself, with success, once every line of the file has its
/// outcome.
pub fn run_jsonl_feeder(path: &Path) -> ExitCode {
    let queue = match connect("jsonl") {
        Ok(queue) => queue,
        Err(code) => return code,
    };
    let feeder = match JsonlFeeder::open(expand_home(path)) {
        Ok(feeder) => feeder,
        Err(err) => return cannot_start(&queue, "jsonl", &err),
    };
    let feeder = feeder.with_dead_hook(|job, reason| {
        tracing::warn!(id = job.id(), reason, "job dead");
    });
    queue.run_queue(no_consumer, feeder)
}

/// Runs the built-in command feeder of a queue group (what `taskherd
/// builtin-feeder --command -- PROGRAM ARGS...` does): a [`CommandFeeder`]
/// runs `program` with `args` in the feeder's working directory and
/// environment, each line of its stdout is a job, its stderr lines are
/// the instance's log lines. Dead jobs (lines that are not JSON included)
/// are logged as warnings.
///
/// It ends by itself, with success, once the command has exited and every
/// job it printed has its outcome (a command that failed is logged at
/// error level with its status). A restarted one runs the command again.
/// Exit code 2 when it cannot start (not a queue group's feeder, or the
/// command cannot be started).
pub fn run_command_feeder(program: &OsStr, args: &[impl AsRef<OsStr>]) -> ExitCode {
    let queue = match connect("command") {
        Ok(queue) => queue,
        Err(code) => return code,
    };
    let program = expand_home(Path::new(program));
    let feeder = match CommandFeeder::spawn(&program, args) {
        Ok(feeder) => feeder,
        Err(err) => {
            let err = CommandError {
                program,
                source: err,
            };
            return cannot_start(&queue, "command", &err);
        }
    };
    queue.run_queue(no_consumer, DeadLogged(feeder))
}

/// Fills a JetStream queue group's queue from a JSON-lines file or a
/// command's output (what `taskherd builtin-feeder --jetstream --state
/// STATE --jsonl PATH` or `... --command -- PROGRAM ARGS...` does; see
/// [`nats::feed`](super::nats::feed) for what is published when, and what
/// a crash can do), recording its progress in `state`, until the master
/// stops it.
///
/// It connects to the master as a plain instance (its log goes there)
/// and takes the queue from the environment
/// ([`JETSTREAM_QUEUE_ENV`](crate::protocol::slave::JETSTREAM_QUEUE_ENV)).
/// Exit code 2 when it cannot start; a failure (credentials refused, a
/// damaged state file, a command that cannot run) is the instance's
/// failure, with the reason.
#[cfg(all(feature = "nats", feature = "master"))]
pub fn run_jetstream_feeder(source: super::nats::feed::Source, state: &Path) -> ExitCode {
    use super::nats::feed;
    let handler = match Handler::from_env() {
        Ok(handler) => handler,
        Err(err) => {
            eprintln!("taskherd builtin-feeder: {}", error_chain(&err));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    let _ = handler.init_tracing();
    let queue = match feed::queue_from_env() {
        Ok(queue) => queue,
        Err(why) => {
            handler.error(format!("the built-in JetStream feeder cannot start: {why}"));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    let source = match source {
        feed::Source::Jsonl(path) => feed::Source::Jsonl(expand_home(&path)),
        feed::Source::Command { program, args } => feed::Source::Command {
            program: expand_home(&program),
            args,
        },
    };
    let state = expand_home(state);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            handler.error(format!("the built-in JetStream feeder cannot start: {err}"));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    let stop = handler.stop_token();
    handler.run(|_| runtime.block_on(feed::feed(&queue, &source, &state, stop)))
}

/// The feeder's command cannot be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {}", program.display())]
struct CommandError {
    /// The program.
    program: PathBuf,
    /// Why.
    #[source]
    source: std::io::Error,
}

/// A [`CommandFeeder`] that logs each job given up on as a warning.
struct DeadLogged(CommandFeeder);

impl super::Feeder for DeadLogged {
    type Job = super::feeders::CommandJob;

    fn next(&mut self) -> super::Next<Self::Job> {
        self.0.next()
    }

    fn success(&mut self, job: Self::Job) {
        self.0.success(job);
    }

    fn error(&mut self, job: Self::Job, reason: &str) {
        tracing::warn!(line = job.line(), reason, "job dead");
        self.0.error(job, reason);
    }

    fn recheck(&self) -> std::time::Duration {
        self.0.recheck()
    }
}

/// The consumer part of [`HandlerQueue::run_queue`], never called: the
/// built-in feeder refuses the consumer role before it serves.
fn no_consumer(_: &Handler, _: serde_json::Value) -> Outcome {
    Outcome::Dead("a built-in feeder does not consume jobs".to_string())
}

/// `path` with a leading `~` or `~/` made this host's home (`HOME`); as it
/// is without one, or when `HOME` is not set.
pub(crate) fn expand_home(path: &Path) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty());
    match (home, path.strip_prefix("~")) {
        (Some(home), Ok(rest)) => Path::new(&home).join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_is_this_hosts_home() {
        let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) else {
            return;
        };
        let home = PathBuf::from(home);
        assert_eq!(expand_home(Path::new("~")), home);
        assert_eq!(expand_home(Path::new("~/q/jobs")), home.join("q/jobs"));
        assert_eq!(expand_home(Path::new("jobs")), PathBuf::from("jobs"));
        assert_eq!(expand_home(Path::new("/q/~/j")), PathBuf::from("/q/~/j"));
        assert_eq!(expand_home(Path::new("~user/j")), PathBuf::from("~user/j"));
    }
}
