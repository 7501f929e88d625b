//! Starting one instance process and signalling its process group.
//!
//! The master spawns its local instances with it, and every agent the
//! instances of its remote host: a child in its own process group, a
//! control socketpair at a known fd, the identity in the environment,
//! stdout/stderr piped, stdin closed, and a parent-death signal so that
//! even a SIGKILLed master leaves no plain program behind.
//!
//! The child is started as exec jobs are (`queue::spawn`: `clone` with
//! `CLONE_VM | CLONE_VFORK`, the child on the parent's memory until it
//! execs), with a hook for the instance's working directory, cgroup,
//! limits, credentials and control socket. A `fork` (what a `pre_exec`
//! hook forces on `std::process::Command`) copied the page tables of a
//! multi-threaded master or agent for every instance: about 3 ms from
//! fork to exec for each of an agent's instances on the benchmark
//! machine, and 13 % of the CPU of an agent and its 4 instances.

use crate::config::probe::{self, DirProblem, ProgramProblem};
use crate::protocol::slave::{self as wire, Identity};
use crate::queue::spawn::{JobCommand, JobProcess, SpawnOptions};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

pub use crate::protocol::instance::{Limits, ProcessSpec};

/// A started instance process with its pipes and control socket.
#[derive(Debug)]
pub struct Spawned {
    /// The child; always awaited by its supervisor (no zombies).
    pub child: Child,
    /// Its pid, which is also its process group id.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`), when the spawn
    /// could tell it without reading `/proc`: with `pid`, its
    /// [`ProcessIdentity`](crate::pidkiller::ProcessIdentity) for
    /// [`PidKiller::register_started`](crate::pidkiller::PidKiller::register_started).
    pub start_time: Option<u64>,
    /// The parent end of the control socketpair.
    pub control: UnixStream,
    /// The child's stdout.
    pub stdout: pipe::Receiver,
    /// The child's stderr.
    pub stderr: pipe::Receiver,
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
    /// `user` or `group` asked of a master or agent that is not root.
    #[error("{what}: only a master (or agent) running as root can run instances as another user or group; this one runs as uid {uid}")]
    NotRoot {
        /// The key and value (`user = "www-data"`).
        what: String,
        /// Our effective uid.
        uid: u32,
    },
    /// No such user or group on this host.
    #[error("{what}: no such {kind} on this host")]
    NoSuchName {
        /// The key and value (`user = "www-data"`).
        what: String,
        /// `user` or `group`.
        kind: &'static str,
    },
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
/// The parent-death signal fires when the *thread* that started the
/// child dies; the master starts instances from tokio worker threads
/// (an agent from its one thread), which live as long as the runtime, so
/// it fires when the master process dies.
///
/// # Errors
/// [`SpawnError`] if the socket cannot be made or the program not started;
/// a missing working directory or program is named as such.
pub fn spawn(
    spec: &ProcessSpec,
    identity: &Identity,
    limits: &Limits,
) -> Result<Spawned, SpawnError> {
    spawn_in(spec, identity, limits, None)
}

/// [`spawn`], the child joining the cgroup whose `cgroup.procs` is
/// `cgroup` first (then the memory cap is the cgroup's: no
/// `RLIMIT_AS`).
pub(crate) fn spawn_in(
    spec: &ProcessSpec,
    identity: &Identity,
    limits: &Limits,
    cgroup: Option<std::ffi::CString>,
) -> Result<Spawned, SpawnError> {
    let credentials = credentials(limits)?;
    let mut rlimits = rlimits(limits);
    if cgroup.is_some() {
        rlimits.retain(|(resource, _)| *resource != rustix::process::Resource::As);
    }
    let (parent_end, child_end) = StdUnixStream::pair().map_err(SpawnError::Socket)?;
    let child_end = OwnedFd::from(child_end);
    let child_fd = child_end.as_raw_fd();
    let params = serde_json::to_string(&identity.params).map_err(SpawnError::Params)?;

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

    // The environment: ours, then the spec's (its last value of a
    // variable), then the identity, which the spawn sets over both.
    let spec_env = spec
        .env
        .iter()
        .enumerate()
        .filter(|(i, (key, _))| !spec.env[i + 1..].iter().any(|(k, _)| k == key))
        .map(|(_, (key, value))| (OsString::from(key), OsString::from(value)));
    let base_env = std::env::vars_os()
        .filter(|(key, _)| !spec.env.iter().any(|(k, _)| key.as_os_str() == k.as_str()))
        .chain(spec_env);
    let identity_env = [
        (wire::CONTROL_FD_ENV, child_fd.to_string()),
        (wire::ID_ENV, identity.id.to_string()),
        (wire::GROUP_ID_ENV, identity.group_id.to_string()),
        (wire::GROUP_COUNT_ENV, identity.group_count.to_string()),
        (wire::GROUP_ENV, identity.group.clone()),
        (wire::HOST_ENV, identity.host.clone()),
        (wire::PARAMS_ENV, params),
    ];
    let exec_error = |source| SpawnError::Exec {
        program: program.clone(),
        source,
    };
    let args: Vec<OsString> = spec.args.iter().map(OsString::from).collect();
    let command = JobCommand::new(program.as_os_str(), &args, base_env).map_err(exec_error)?;
    let cwd_c =
        match &cwd {
            Some(cwd) => Some(std::ffi::CString::new(cwd.as_os_str().as_bytes()).map_err(
                |err| exec_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, err)),
            )?),
            None => None,
        };
    // Runs in the child, on our memory (see `SpawnOptions::in_child`):
    // only async-signal-safe calls on what is built above, no allocation,
    // OS errors only.
    let in_child = move || -> std::io::Result<()> {
        // SAFETY: plain system calls on C strings, integers and arrays
        // made before the clone, which outlive the child's exec.
        unsafe {
            if let Some(cwd) = &cwd_c {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Into its cgroup first: as root still, and before anything
            // it allocates.
            if let Some(procs) = &cgroup {
                super::cgroup::join_in_child(procs)?;
            }
            // The open-file limit the master was given, not the one it
            // raised for itself (a configured `nofile` comes after).
            super::limits::restore_in_child()?;
            for (resource, value) in &rlimits {
                let limit = rustix::process::Rlimit {
                    current: Some(*value),
                    maximum: Some(*value),
                };
                rustix::process::setrlimit(*resource, limit)?;
            }
            // Groups, then the group, then the user: each needs root.
            // (Before the parent-death signal, which the spawn sets after
            // this: a change of credentials clears it.) The system calls
            // themselves, not glibc's wrappers: those change every thread
            // of the process they believe they are in, which here, on the
            // parent's memory, are the parent's threads. The kernel's
            // calls change the calling thread, the child's only one.
            if let Some(credentials) = &credentials {
                if let Some(groups) = &credentials.groups {
                    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(gid) = credentials.gid {
                    if libc::syscall(libc::SYS_setgid, gid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(uid) = credentials.uid {
                    if libc::syscall(libc::SYS_setuid, uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            // The socketpair is close-on-exec; keep this one end open
            // (the child's descriptor table is its own).
            if libc::fcntl(child_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    let options = SpawnOptions {
        null_stdin: true,
        in_child: Some(&in_child),
        ..SpawnOptions::default()
    };
    let mut process = command
        .spawn_with(&identity_env, &options)
        .map_err(|source| explain(source, &program, cwd.as_deref(), &spec.env))?;
    drop(child_end);

    let pid = process.id();
    let start_time = process.start_time();
    let (Some(stdout), Some(stderr)) = (process.stdout.take(), process.stderr.take()) else {
        unreachable!("invariant: stdout and stderr are piped by the spawn");
    };
    let stdout = pipe::Receiver::from_owned_fd(stdout).map_err(exec_error)?;
    let stderr = pipe::Receiver::from_owned_fd(stderr).map_err(exec_error)?;
    parent_end
        .set_nonblocking(true)
        .map_err(SpawnError::Socket)?;
    let control = UnixStream::from_std(parent_end).map_err(SpawnError::Socket)?;
    Ok(Spawned {
        child: Child::of(process),
        pid,
        start_time,
        control,
        stdout,
        stderr,
    })
}

/// An instance's process, started by [`spawn`]. Its pid (also its process
/// group id) stays its own until [`Child::wait`] has reaped it. Dropped
/// unwaited, it is killed and reaped.
#[derive(Debug)]
pub struct Child {
    /// Until reaped.
    process: Option<JobProcess>,
    /// Once reaped.
    status: Option<ExitStatus>,
}

impl Child {
    /// A process started by [`JobCommand`], awaited as an instance's is.
    pub(crate) fn of(process: JobProcess) -> Child {
        Child {
            process: Some(process),
            status: None,
        }
    }

    /// Its pid while it is not reaped (until then it cannot be another
    /// process's); `None` once [`wait`](Self::wait) has reaped it.
    pub fn id(&self) -> Option<u32> {
        self.process.as_ref().map(JobProcess::id)
    }

    /// Waits until the process has ended and reaps it; again, the same
    /// status. Cancel-safe: dropped before it ends, nothing has changed.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let Some(process) = &self.process else {
            return Err(std::io::Error::other("the process was reaped already"));
        };
        process.exited().await;
        let Some(process) = self.process.take() else {
            return Err(std::io::Error::other("the process was reaped already"));
        };
        // It has ended: `waitpid` answers at once.
        let status = process.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

/// Who an instance runs as, resolved on this host before the fork.
#[derive(Debug)]
struct Credentials {
    /// The user's id.
    uid: Option<libc::uid_t>,
    /// The primary group's id.
    gid: Option<libc::gid_t>,
    /// The supplementary groups (the user's), when a user is set.
    groups: Option<Vec<libc::gid_t>>,
}

/// Resolves `limits.user` and `limits.group` (none: `None`).
///
/// # Errors
/// Not root, or no such user or group here.
fn credentials(limits: &Limits) -> Result<Option<Credentials>, SpawnError> {
    if limits.user.is_none() && limits.group.is_none() {
        return Ok(None);
    }
    let what = match (&limits.user, &limits.group) {
        (Some(user), _) => format!("user = {user:?}"),
        (None, Some(group)) => format!("group = {group:?}"),
        (None, None) => String::new(),
    };
    let uid = rustix::process::geteuid().as_raw();
    if uid != 0 {
        return Err(SpawnError::NotRoot { what, uid });
    }
    let mut credentials = Credentials {
        uid: None,
        gid: None,
        groups: None,
    };
    if let Some(user) = &limits.user {
        let (uid, gid) = user_ids(user).ok_or_else(|| SpawnError::NoSuchName {
            what: format!("user = {user:?}"),
            kind: "user",
        })?;
        credentials.uid = Some(uid);
        credentials.gid = Some(gid);
        credentials.groups = Some(group_list(user, gid));
    }
    if let Some(group) = &limits.group {
        let gid = group_id(group).ok_or_else(|| SpawnError::NoSuchName {
            what: format!("group = {group:?}"),
            kind: "group",
        })?;
        credentials.gid = Some(gid);
        if let Some(groups) = &mut credentials.groups {
            if !groups.contains(&gid) {
                groups.push(gid);
            }
        }
    }
    Ok(Some(credentials))
}

/// The rlimits to set, as `setrlimit` takes them.
fn rlimits(limits: &Limits) -> Vec<(rustix::process::Resource, u64)> {
    use rustix::process::Resource;
    [
        (Resource::Nofile, limits.nofile),
        (Resource::Nproc, limits.nproc),
        (Resource::Core, limits.core),
        (Resource::As, limits.memory),
    ]
    .into_iter()
    .filter_map(|(resource, value)| value.map(|value| (resource, value)))
    .collect()
}

/// Size of the buffer of `getpwnam_r` and `getgrnam_r`.
const NSS_BUFFER: usize = 16 * 1024;

/// The uid and primary gid of `user`, if it exists.
fn user_ids(user: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let name = std::ffi::CString::new(user).ok()?;
    let mut buf = vec![0 as libc::c_char; NSS_BUFFER];
    let mut entry = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is a C
    // string, the entry and the buffer (of the length given) are ours;
    // `found` is set to the entry or null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: `found` is not null: the entry was filled in.
    let entry = unsafe { entry.assume_init() };
    Some((entry.pw_uid, entry.pw_gid))
}

/// The gid of `group`, if it exists.
fn group_id(group: &str) -> Option<libc::gid_t> {
    let name = std::ffi::CString::new(group).ok()?;
    let mut buf = vec![0 as libc::c_char; NSS_BUFFER];
    let mut entry = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user_ids`.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: `found` is not null: the entry was filled in.
    let entry = unsafe { entry.assume_init() };
    Some(entry.gr_gid)
}

/// The groups of `user` (with `gid`), as `initgroups` would set them.
fn group_list(user: &str, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let Ok(name) = std::ffi::CString::new(user) else {
        return vec![gid];
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the name is a C string; `groups` has room for `count`
        // ids, and `count` is updated to how many there are.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return groups;
        }
        if count <= groups.len() || groups.len() >= 65536 {
            return vec![gid];
        }
        groups.resize(count, 0);
    }
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

    #[test]
    fn users_and_groups_resolve_on_this_host_and_need_root() {
        assert!(credentials(&Limits::default())
            .expect("nothing to resolve")
            .is_none());
        let root = Limits {
            user: Some("root".into()),
            group: Some("root".into()),
            ..Limits::default()
        };
        let nobody = Limits {
            user: Some("taskherd-surely-no-such-user".into()),
            ..Limits::default()
        };
        match credentials(&root) {
            Ok(Some(found)) => {
                assert_eq!((found.uid, found.gid), (Some(0), Some(0)));
                assert!(found.groups.is_some_and(|groups| groups.contains(&0)));
                let err = credentials(&nobody).expect_err("no such user");
                assert_eq!(
                    err.to_string(),
                    "user = \"taskherd-surely-no-such-user\": no such user on this host"
                );
            }
            // Not root: refused, and said so.
            Err(err @ SpawnError::NotRoot { .. }) => {
                assert!(err.to_string().starts_with(
                    "user = \"root\": only a master (or agent) running as root can run instances"
                ));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn spawn_errors_name_the_real_cause() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing_dir = dir.path().join("gone");
        let err = spawn(
            &spec("sh", &[], Some(missing_dir.to_str().unwrap())),
            &identity(),
            &Limits::default(),
        )
        .expect_err("no such cwd");
        assert_eq!(
            err.to_string(),
            format!("working directory {} does not exist", missing_dir.display())
        );

        let program = format!("{}/./bin/./worker", dir.path().display());
        let err = spawn(&spec(&program, &[], None), &identity(), &Limits::default())
            .expect_err("no program");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot start {}/bin/worker: no such file",
                dir.path().display()
            )
        );

        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        let err = spawn(
            &spec(script.to_str().unwrap(), &[], None),
            &identity(),
            &Limits::default(),
        )
        .expect_err("not executable");
        assert!(
            err.to_string()
                .ends_with("permission denied: it is not executable (chmod +x it)"),
            "{err}"
        );

        let err = spawn(
            &spec("surely-not-a-program-7f3a", &[], None),
            &identity(),
            &Limits::default(),
        )
        .expect_err("not in PATH");
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }

    #[tokio::test]
    async fn own_executable_runs_the_spawner_itself() {
        // The test binary, asked to list its tests: it prints this test.
        let mut own = spec("not-run", &["--list", "own_executable_runs"], None);
        own.own_executable = true;
        let mut spawned =
            spawn(&own, &identity(), &Limits::default()).expect("spawn own executable");
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
        let mut spawned = spawn(
            &spec("sh", &["-c", "pwd -P"], Some("~")),
            &identity(),
            &Limits::default(),
        )
        .expect("spawn in ~");
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
