//! Starting one instance process and signalling its process group.
//!
//! The master spawns its local instances with it, and every agent the
//! instances of its remote host: a child in its own process group, a
//! control socketpair at a known fd, the identity in the environment,
//! stdout/stderr piped, stdin closed, and a parent-death signal so that
//! even a SIGKILLed master leaves no plain program behind.

use crate::config::probe::{self, DirProblem, ProgramProblem};
use crate::protocol::slave::{self as wire, Identity};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStderr, ChildStdout};

pub use crate::protocol::instance::ProcessSpec;

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
    /// The working directory is missing or not a directory (`exec` would
    /// only say "No such file or directory", as for a missing program).
    #[error("working directory {} {problem}", cwd.display())]
    WorkingDir {
        /// The directory.
        cwd: PathBuf,
        /// What is wrong with it.
        problem: DirProblem,
    },
    /// The program is missing or cannot be run.
    #[error("cannot start {}: {problem}", program.display())]
    Program {
        /// The program, as given (a bare name, or a path).
        program: PathBuf,
        /// Why, with a hint.
        problem: ProgramProblem,
    },
    /// The program could not be executed for another reason.
    #[error("cannot start {}", program.display())]
    Exec {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spawner's own executable (for a built-in role) could not be
    /// found.
    #[error("cannot find taskherd's own executable for a built-in role")]
    OwnExecutable(#[source] std::io::Error),
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
/// A leading `~/` in the program or the working directory is this host's
/// home directory (remote paths arrive as written); `.` components are
/// dropped, so that errors name clean paths.
///
/// The parent-death signal fires when the *thread* that forked dies; the
/// master forks from tokio worker threads, which live as long as the
/// runtime, so it fires when the master process dies.
///
/// # Errors
/// [`SpawnError`] if the socket cannot be made or the program not started;
/// a missing working directory or program is named as such.
pub fn spawn(spec: &ProcessSpec, identity: &Identity) -> Result<Spawned, SpawnError> {
    let (parent_end, child_end) = StdUnixStream::pair().map_err(SpawnError::Socket)?;
    let child_end = OwnedFd::from(child_end);
    let child_fd = child_end.as_raw_fd();
    let params = serde_json::to_string(&identity.params).map_err(SpawnError::Params)?;
    let master_pid = std::process::id() as libc::pid_t;

    // `~` is this host's home (a remote path reaches here as written);
    // `.` components only make error messages harder to read.
    let home = probe::home_dir();
    let local_path = |path: &Path| {
        let path = match path.to_str() {
            Some(text) => probe::expand_home(text, home.as_deref()),
            None => None,
        };
        path.as_deref().map(probe::clean_path)
    };
    let program = if spec.own_executable {
        std::env::current_exe().map_err(SpawnError::OwnExecutable)?
    } else {
        local_path(&spec.program).unwrap_or_else(|| spec.program.clone())
    };
    let cwd = spec
        .cwd
        .as_ref()
        .map(|cwd| local_path(cwd).unwrap_or_else(|| cwd.clone()));

    let mut command = tokio::process::Command::new(&program);
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
    if let Some(cwd) = &cwd {
        command.current_dir(cwd);
    }
    // SAFETY: the closure only calls async-signal-safe functions (prctl,
    // getppid, fcntl, setrlimit) and allocates nothing.
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
            // The open-file limit the master was given, not the one it
            // raised for itself.
            super::limits::restore_in_child()
        });
    }
    let mut child = command
        .spawn()
        .map_err(|source| explain(source, &program, cwd.as_deref(), &spec.env))?;
    drop(child_end);

    let pid = child.id().ok_or_else(|| SpawnError::Exec {
        program: program.clone(),
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

/// Why `exec` failed, in the user's terms: `exec` reports a missing working
/// directory, a missing program and a missing interpreter alike, so what
/// is there is looked at (only after a failure: the happy path pays
/// nothing).
fn explain(
    source: std::io::Error,
    program: &Path,
    cwd: Option<&Path>,
    env: &[(String, String)],
) -> SpawnError {
    let lookup_failure = matches!(
        source.raw_os_error(),
        Some(libc::ENOENT | libc::EACCES | libc::ENOTDIR)
    );
    if !lookup_failure {
        return SpawnError::Exec {
            program: program.to_path_buf(),
            source,
        };
    }
    if let Some(cwd) = cwd {
        if let Err(problem) = probe::probe_dir(cwd) {
            return SpawnError::WorkingDir {
                cwd: cwd.to_path_buf(),
                problem,
            };
        }
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| std::ffi::OsStr::new(value));
    match probe::probe_program(program, cwd, path_var) {
        Err(problem) => SpawnError::Program {
            program: program.to_path_buf(),
            problem,
        },
        Ok(found) if source.raw_os_error() == Some(libc::ENOENT) => SpawnError::Program {
            program: program.to_path_buf(),
            problem: ProgramProblem::NoInterpreter(Some(found).filter(|found| found != program)),
        },
        Ok(_) => SpawnError::Exec {
            program: program.to_path_buf(),
            source,
        },
    }
}

/// Sends `signal` to the process group `pgid`; a group that is already
/// gone is not an error.
///
/// # Errors
/// Any other failure of `kill(2)` (e.g. permission denied).
pub fn signal_group(pgid: u32, signal: libc::c_int) -> std::io::Result<()> {
    // Not 0 either: kill(2) would take it for our own group.
    let pgid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("pid {pgid} out of range")))?;
    let signal = rustix::process::Signal::from_named_raw(signal).ok_or(rustix::io::Errno::INVAL)?;
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(err) => Err(err.into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn identity() -> Identity {
        Identity {
            vars: Default::default(),
            id: 1,
            group_id: 1,
            group_count: 1,
            group: "g".into(),
            host: "localhost".into(),
            params: serde_json::json!({}),
            timeout: None,
            stop_grace: Duration::from_secs(1),
            max_jobs: None,
            queue: None,
        }
    }

    fn spec(program: &str, args: &[&str], cwd: Option<&str>) -> ProcessSpec {
        ProcessSpec {
            program: program.into(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            env: Vec::new(),
            cwd: cwd.map(PathBuf::from),
            own_executable: false,
        }
    }

    #[tokio::test]
    async fn spawn_errors_name_the_real_cause() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing_dir = dir.path().join("gone");
        let err = spawn(
            &spec("sh", &[], Some(missing_dir.to_str().unwrap())),
            &identity(),
        )
        .expect_err("no such cwd");
        assert_eq!(
            err.to_string(),
            format!("working directory {} does not exist", missing_dir.display())
        );

        let program = format!("{}/./bin/./worker", dir.path().display());
        let err = spawn(&spec(&program, &[], None), &identity()).expect_err("no program");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot start {}/bin/worker: no such file",
                dir.path().display()
            )
        );

        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        let err = spawn(&spec(script.to_str().unwrap(), &[], None), &identity())
            .expect_err("not executable");
        assert!(
            err.to_string()
                .ends_with("permission denied: it is not executable (chmod +x it)"),
            "{err}"
        );

        let err = spawn(&spec("surely-not-a-program-7f3a", &[], None), &identity())
            .expect_err("not in PATH");
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }

    #[tokio::test]
    async fn own_executable_runs_the_spawner_itself() {
        // The test binary, asked to list its tests: it prints this test.
        let mut own = spec("not-run", &["--list", "own_executable_runs"], None);
        own.own_executable = true;
        let mut spawned = spawn(&own, &identity()).expect("spawn own executable");
        let mut out = String::new();
        spawned
            .stdout
            .read_to_string(&mut out)
            .await
            .expect("read stdout");
        spawned.child.wait().await.expect("wait");
        assert!(
            out.contains("own_executable_runs_the_spawner_itself"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn tilde_is_this_hosts_home() {
        let Some(home) = probe::home_dir() else {
            return;
        };
        let mut spawned =
            spawn(&spec("sh", &["-c", "pwd -P"], Some("~")), &identity()).expect("spawn in ~");
        let mut out = String::new();
        spawned
            .stdout
            .read_to_string(&mut out)
            .await
            .expect("read stdout");
        spawned.child.wait().await.expect("wait");
        let home = std::fs::canonicalize(home).expect("home exists");
        assert_eq!(out.trim_end(), home.display().to_string());
    }
}
