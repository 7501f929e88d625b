//! Starting one instance process and signalling its process group.
//!
//! This is the part of local placement that the agent will reuse on remote
//! hosts: a child in its own process group, a control socketpair at a known
//! fd, the identity in the environment, stdout/stderr piped, stdin closed,
//! and a parent-death signal so that even a SIGKILLed master leaves no
//! plain program behind.

use crate::protocol::slave::{self as wire, Identity};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStderr, ChildStdout};

/// What to execute: pure data, resolved against the config directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessSpec {
    /// Program path (or bare name looked up in `PATH`).
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment, on top of the master's.
    pub env: Vec<(String, String)>,
    /// Working directory; the master's when `None`.
    pub cwd: Option<PathBuf>,
}

/// A started instance process with its pipes and control socket.
#[derive(Debug)]
pub struct Spawned {
    /// The child; always awaited by its supervisor (no zombies).
    pub child: Child,
    /// Its pid, which is also its process group id.
    pub pid: u32,
    /// The parent end of the control socketpair.
    pub control: UnixStream,
    /// The child's stdout.
    pub stdout: ChildStdout,
    /// The child's stderr.
    pub stderr: ChildStderr,
}

/// Errors of [`spawn`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The control socketpair could not be created.
    #[error("cannot create the control socket")]
    Socket(#[source] std::io::Error),
    /// The program could not be executed.
    #[error("cannot start {}", program.display())]
    Exec {
        /// The program.
        program: PathBuf,
        /// Why (not found, not executable, bad cwd...).
        #[source]
        source: std::io::Error,
    },
    /// Params could not be turned into JSON for the environment.
    #[error("cannot encode params")]
    Params(#[source] serde_json::Error),
}

/// Starts one instance.
///
/// The child runs in a new process group (its pid), gets the control
/// socket at the fd named by `TASKHERD_CONTROL_FD`, its identity in
/// `TASKHERD_*` variables, and SIGKILL as parent-death signal (the slave
/// library replaces that with its own orphan guard).
///
/// The parent-death signal fires when the *thread* that forked dies; the
/// master forks from tokio worker threads, which live as long as the
/// runtime, so it fires when the master process dies.
///
/// # Errors
/// [`SpawnError`] if the socket cannot be made or the program not started.
pub fn spawn(spec: &ProcessSpec, identity: &Identity) -> Result<Spawned, SpawnError> {
    let (parent_end, child_end) = StdUnixStream::pair().map_err(SpawnError::Socket)?;
    let child_end = OwnedFd::from(child_end);
    let child_fd = child_end.as_raw_fd();
    let params = serde_json::to_string(&identity.params).map_err(SpawnError::Params)?;
    let master_pid = std::process::id() as libc::pid_t;

    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .env(wire::CONTROL_FD_ENV, child_fd.to_string())
        .env(wire::ID_ENV, identity.id.to_string())
        .env(wire::GROUP_ID_ENV, identity.group_id.to_string())
        .env(wire::GROUP_COUNT_ENV, identity.group_count.to_string())
        .env(wire::GROUP_ENV, &identity.group)
        .env(wire::HOST_ENV, &identity.host)
        .env(wire::PARAMS_ENV, params)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    // SAFETY: the closure only calls async-signal-safe functions (prctl,
    // getppid, fcntl) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The master may have died between fork and prctl.
            if libc::getppid() != master_pid {
                return Err(std::io::Error::other("master exited during spawn"));
            }
            // The socketpair is close-on-exec; keep this one end open.
            if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| SpawnError::Exec {
        program: spec.program.clone(),
        source,
    })?;
    drop(child_end);

    let pid = child.id().ok_or_else(|| SpawnError::Exec {
        program: spec.program.clone(),
        source: std::io::Error::other("child exited before its pid was read"),
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("invariant: stdout and stderr are piped above");
    };
    parent_end
        .set_nonblocking(true)
        .map_err(SpawnError::Socket)?;
    let control = UnixStream::from_std(parent_end).map_err(SpawnError::Socket)?;
    Ok(Spawned {
        child,
        pid,
        control,
        stdout,
        stderr,
    })
}

/// Sends `signal` to the process group `pgid`; a group that is already
/// gone is not an error.
///
/// # Errors
/// Any other failure of `kill(2)` (e.g. permission denied).
pub fn signal_group(pgid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| std::io::Error::other(format!("pid {pgid} out of range")))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// The name of a signal number, for logs.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}
