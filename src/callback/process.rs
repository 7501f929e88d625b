//! Running a handler in a process of its own, with a lifetime limit that
//! the pid killer enforces.
//!
//! The program that owns the [`Registry`] starts a copy of itself (or
//! another program built with the same handlers) with the job on stdin.
//! The child runs the handler and prints its outcome; if it outlives its
//! lifetime, the pid killer sends SIGTERM to its process group, then
//! SIGKILL after the grace, and the outcome is a retry. A crash, a hang or
//! a memory leak in a handler thus never takes the parent down with it.
//!
//! The child side is one call at the top of `main`:
//!
//! ```no_run
//! use std::process::ExitCode;
//! use taskherd::callback::{self, Registry};
//! use taskherd::retry::Outcome;
//!
//! fn registry() -> Registry {
//!     let mut registry = Registry::new();
//!     registry
//!         .register_blocking("resize", |path: String| {
//!             println!("resizing {path}");
//!             Outcome::Done
//!         })
//!         .expect("unique name");
//!     registry
//! }
//!
//! fn main() -> ExitCode {
//!     if let Some(code) = callback::serve_child(&registry()) {
//!         return code; // we were started by a ProcessRunner
//!     }
//!     // ... the parent: ProcessRunner::new(pid_killer, lifetime).run(&job).await
//!     ExitCode::SUCCESS
//! }
//! ```

use super::{CallbackError, Job, Registry};
use crate::pidkiller::PidKiller;
use crate::retry::Outcome;
use std::io::{BufRead, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Environment variable that tells a program it runs as a handler child.
pub const CALLBACK_CHILD_ENV: &str = "TASKHERD_CALLBACK_CHILD";

/// Prefix of the line carrying the child's outcome on its stdout (the
/// handler may print lines of its own).
const OUTCOME_MARK: &str = "taskherd-callback-outcome ";

/// Default grace between SIGTERM and SIGKILL of a child past its lifetime.
pub const DEFAULT_CHILD_GRACE: Duration = Duration::from_secs(5);

/// How a handler run in a child process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOutcome {
    /// The handler's outcome; a retry when the child died or was killed
    /// before it could say.
    pub outcome: Outcome,
    /// The child outlived its lifetime and was stopped by the pid killer.
    pub lifetime_exceeded: bool,
    /// How the child process ended.
    pub status: ExitStatus,
}

/// Starts handler children and enforces their lifetime.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    pids: PidKiller,
    lifetime: Duration,
    grace: Duration,
    program: PathBuf,
    args: Vec<String>,
}

impl ProcessRunner {
    /// A runner that starts this very program (which must call
    /// [`serve_child`] first thing in `main`) for each job, each allowed
    /// `lifetime` before the pid killer stops it.
    ///
    /// # Errors
    /// If the path of the current executable cannot be found.
    pub fn new(pids: PidKiller, lifetime: Duration) -> Result<ProcessRunner, CallbackError> {
        let program = std::env::current_exe().map_err(CallbackError::Spawn)?;
        Ok(ProcessRunner {
            pids,
            lifetime,
            grace: DEFAULT_CHILD_GRACE,
            program,
            args: Vec::new(),
        })
    }

    /// Starts `program` with `args` instead of the current executable.
    pub fn with_program(mut self, program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        self.program = program.into();
        self.args = args;
        self
    }

    /// Sets the grace between SIGTERM and SIGKILL at the end of a lifetime.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Runs `job` in a child process and waits for its outcome.
    ///
    /// # Errors
    /// If the child cannot be started or registered with the pid killer;
    /// whatever happens to the handler in the child is an [`Outcome`].
    pub async fn run(&self, job: &Job) -> Result<ProcessOutcome, CallbackError> {
        let input = serde_json::to_vec(job).map_err(|source| CallbackError::Serialize {
            handler: job.handler.clone(),
            source,
        })?;
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env(CALLBACK_CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group: the pid killer stops whatever it started too.
            .process_group(0)
            .spawn()
            .map_err(CallbackError::Spawn)?;
        let started = Instant::now();
        let pid = child.id();
        let label = format!("callback {} (pid {pid})", job.handler);
        if let Err(err) = self
            .pids
            .register(
                pid,
                pid,
                Some(SystemTime::now() + self.lifetime),
                self.grace,
                label,
            )
            .await
        {
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            return Err(CallbackError::Register(err));
        }
        let output = tokio::task::spawn_blocking(move || {
            if let Some(mut stdin) = child.stdin.take() {
                // A child that dies at once closes its stdin: its exit
                // status tells the story, not this write.
                let _ = stdin.write_all(&input);
            }
            child.wait_with_output()
        })
        .await
        .map_err(|err| CallbackError::Spawn(std::io::Error::other(err)))?
        .map_err(CallbackError::Spawn)?;
        // Already gone from the registry if the pid killer stopped it.
        let _ = self.pids.unregister(pid).await;

        let status = output.status;
        let reported = output
            .stdout
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| {
                line.strip_prefix(OUTCOME_MARK)
                    .and_then(|json| serde_json::from_str::<Outcome>(json).ok())
            })
            .last();
        let lifetime_exceeded = status.signal().is_some() && started.elapsed() >= self.lifetime;
        let outcome = match reported {
            Some(outcome) if !lifetime_exceeded => outcome,
            _ => {
                let why = if lifetime_exceeded {
                    format!(
                        "exceeded its lifetime of {:?} and was stopped",
                        self.lifetime
                    )
                } else {
                    format!("ended without an outcome ({status})")
                };
                tracing::warn!(handler = %job.handler, pid, "handler child {why}");
                Outcome::Retry(None)
            }
        };
        Ok(ProcessOutcome {
            outcome,
            lifetime_exceeded,
            status,
        })
    }
}

/// The child side: when this process was started by a [`ProcessRunner`],
/// reads the job from stdin, runs it with `registry`, prints the outcome,
/// and returns the exit code for `main` to return. Returns `None` in any
/// other process.
pub fn serve_child(registry: &Registry) -> Option<ExitCode> {
    std::env::var_os(CALLBACK_CHILD_ENV)?;
    let mut input = String::new();
    if let Err(err) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
        eprintln!("taskherd callback child: cannot read the job: {err}");
        return Some(ExitCode::from(2));
    }
    let job: Job = match serde_json::from_str(&input) {
        Ok(job) => job,
        Err(err) => {
            eprintln!("taskherd callback child: not a job: {err}");
            return Some(ExitCode::from(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("taskherd callback child: cannot start a runtime: {err}");
            return Some(ExitCode::from(2));
        }
    };
    let outcome = runtime.block_on(registry.call_job(job));
    let line = match serde_json::to_string(&outcome) {
        Ok(json) => format!("{OUTCOME_MARK}{json}"),
        Err(err) => {
            eprintln!("taskherd callback child: cannot encode the outcome: {err}");
            return Some(ExitCode::from(2));
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return Some(ExitCode::from(2));
    }
    Some(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut registry = Registry::new();
        registry
            .register_blocking("add", |numbers: Vec<i64>| {
                println!("sum {}", numbers.iter().sum::<i64>());
                Outcome::Done
            })
            .expect("unique");
        registry
            .register_blocking("hang", |seconds: u64| {
                std::thread::sleep(Duration::from_secs(seconds));
                Outcome::Done
            })
            .expect("unique");
        registry
            .register_blocking("give_up", |reason: String| Outcome::Dead(reason))
            .expect("unique");
        registry
    }

    /// The child role: the test binary started again by the runner.
    #[test]
    #[ignore = "run as a child by the process runner tests"]
    fn callback_child_role() {
        // Only the runner sets it; `cargo test -- --ignored` by hand skips.
        if std::env::var_os(CALLBACK_CHILD_ENV).is_none() {
            return;
        }
        let code = serve_child(&registry());
        std::process::exit(if code == Some(ExitCode::SUCCESS) {
            0
        } else {
            2
        });
    }

    async fn runner(lifetime: Duration) -> (ProcessRunner, PidKiller, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let pids = PidKiller::open(dir.path().join("pids.json"))
            .await
            .expect("pid killer");
        let exe = std::env::current_exe().expect("test binary");
        let runner = ProcessRunner::new(pids.clone(), lifetime)
            .expect("runner")
            .with_program(
                exe,
                vec![
                    "--exact".into(),
                    "callback::process::tests::callback_child_role".into(),
                    "--ignored".into(),
                    "--nocapture".into(),
                ],
            )
            .with_grace(Duration::from_millis(200));
        (runner, pids, dir)
    }

    fn job(handler: &str, payload: serde_json::Value) -> Job {
        Job::new(handler, payload).expect("job")
    }

    #[tokio::test]
    async fn outcomes_come_back_from_the_child() {
        let (runner, pids, _dir) = runner(Duration::from_secs(60)).await;
        let done = runner
            .run(&job("add", serde_json::json!([1, 2, 3])))
            .await
            .expect("run");
        assert_eq!(done.outcome, Outcome::Done);
        assert!(!done.lifetime_exceeded);
        let dead = runner
            .run(&job("give_up", serde_json::json!("no such file")))
            .await
            .expect("run");
        assert_eq!(dead.outcome, Outcome::Dead("no such file".into()));
        assert!(
            pids.list().await.expect("list").is_empty(),
            "children unregistered"
        );
    }

    #[tokio::test]
    async fn a_child_past_its_lifetime_is_stopped_and_retried() {
        let (runner, _pids, _dir) = runner(Duration::from_millis(500)).await;
        let started = Instant::now();
        let hung = runner
            .run(&job("hang", serde_json::json!(60)))
            .await
            .expect("run");
        assert!(hung.lifetime_exceeded, "{hung:?}");
        assert_eq!(hung.outcome, Outcome::Retry(None));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stopped long before the hang ends"
        );
    }
}
