//! Starting a job's process the way `posix_spawn` does, with the
//! parent-death signal set: `clone(CLONE_VM | CLONE_VFORK)`, a few
//! async-signal-safe calls in the child, then `execve`.
//!
//! Why not [`std::process::Command`]: a job must die with its consumer
//! (`PR_SET_PDEATHSIG`), which only the child itself can set, so `Command`
//! needs a `pre_exec` hook, and a hook makes it `fork` instead of
//! `posix_spawn`. A consumer is a multi-threaded process: every `fork`
//! copies its page tables, write-protects its memory (a TLB shootdown on
//! every CPU running one of its threads) and takes copy-on-write faults
//! after, and the child's `execve` tears all of that down again. Measured
//! with `BENCH_ONLY=exec scripts/bench.sh` (10,000 `true` jobs), the fork
//! and its faults were about 60 % of the consumer's CPU and the exec
//! consumer ran at half the speed of `xargs -P`. With this spawn the
//! child borrows the consumer's memory until it execs, as `posix_spawn`'s
//! child does (the calling thread waits meanwhile), and none of that work
//! happens.
//!
//! Instances start the same way (`supervise::process`), with a hook that
//! adds their working directory, cgroup, limits, credentials and control
//! socket ([`SpawnOptions::in_child`]): the master and the agents are
//! multi-threaded too, and an agent's `fork` of each instance was about
//! 3 ms from fork to exec on the benchmark machine.
//!
//! The child runs only what `posix_spawn`'s runs: `setpgid`, `prctl`,
//! `getppid`, `dup2`, `sigaction`, `sigprocmask`, `execve`, `_exit`
//! (and the hook's calls, under the same rules), and first
//! `clock_gettime`. It allocates nothing and touches nothing of the
//! parent but two fields: the boot clock as it first read it (with the
//! parent's reading before the `clone`, that tells the child's start
//! time, its identity, without a read of `/proc` that would wait for its
//! `execve`), and the error of a failed step. All signals are blocked in
//! the calling thread across the `clone`, so no handler of the parent's
//! can run on the child's borrowed memory; the child sets every caught
//! signal (and `SIGPIPE`, which Rust programs ignore) back to its default
//! before it unblocks them, as `Command` does.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use libc::{c_char, c_int, c_void};
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, Signal, WaitOptions};

use crate::pidkiller::proc::{boot_clock_ns, start_time_between};
use crate::queue::child::wait_exited;

/// Stack of the child until it execs (it calls a handful of libc
/// functions; `posix_spawn` gives its child about as much).
const CHILD_STACK: usize = 64 * 1024;

/// Highest signal number on Linux (`_NSIG - 1`).
const MAX_SIGNAL: c_int = 64;

/// What to run: the program (found on `PATH` once, when it has no `/`),
/// its arguments and the base environment, ready for `execve`.
#[derive(Debug)]
pub(crate) struct JobCommand {
    /// Paths to try in turn (`execvp`'s search, done ahead).
    candidates: Vec<CString>,
    /// `argv`, the program as given first.
    argv: Vec<CString>,
    /// The environment every job gets (`KEY=value`), before its own.
    base_env: Vec<CString>,
}

/// A started job's process: its pid (also its process group id) and the
/// parent's ends of its stdin, stdout and stderr. It must be [`wait`]ed
/// for; dropped unwaited, it is killed and reaped.
///
/// [`wait`]: JobProcess::wait
#[derive(Debug)]
pub(crate) struct JobProcess {
    /// The process id, and the id of its process group.
    pid: u32,
    /// The job's stdin, to write to.
    pub(crate) stdin: Option<OwnedFd>,
    /// The job's stdout, to read from.
    pub(crate) stdout: Option<OwnedFd>,
    /// The job's stderr, to read from.
    pub(crate) stderr: Option<OwnedFd>,
    /// The boot clock read by the parent before the fork and by the
    /// child first thing (see [`JobProcess::start_time`]; instances
    /// register it, the slave-only build has none).
    #[cfg_attr(not(feature = "master"), allow(dead_code))]
    forked_between: (u64, u64),
    /// Reaped already.
    reaped: bool,
}

/// What a start may add to a job's: stdin from `/dev/null`, and work the
/// child does before its parent-death signal is set (see
/// [`JobCommand::spawn_with`]).
#[derive(Default)]
pub(crate) struct SpawnOptions<'a> {
    /// stdin is `/dev/null` (no pipe): [`JobProcess::stdin`] is `None`.
    pub(crate) null_stdin: bool,
    /// Runs in the child after it has its process group and before its
    /// parent-death signal: it may change directory, limits, cgroup or
    /// credentials (a change of credentials clears the signal, which is
    /// set after). It runs on the parent's memory, like a `pre_exec` hook
    /// of a `vfork`: only async-signal-safe calls, no allocation, and an
    /// error only as an OS error (`io::Error::last_os_error`), whose errno
    /// becomes the start's error.
    pub(crate) in_child: Option<&'a (dyn Fn() -> io::Result<()> + Sync)>,
    /// A session of its own (`setsid`: a process group of its own too,
    /// whose id is its pid, and no controlling terminal) instead of only a
    /// process group of its own.
    pub(crate) new_session: bool,
    /// No parent-death signal: the process may outlive the calling thread
    /// (whoever started it stops it: an ssh connection the master closes).
    pub(crate) no_parent_death_signal: bool,
}

/// What the child needs, all built before the `clone`: it only reads
/// pointers and integers, and writes [`ChildSetup::error`].
struct ChildSetup<'a> {
    /// Null-terminated array of the paths to try.
    candidates: *const *const c_char,
    /// Null-terminated `argv`.
    argv: *const *const c_char,
    /// Null-terminated `envp`.
    envp: *const *const c_char,
    /// The child's ends of its stdin, stdout and stderr (all above 2).
    fds: [c_int; 3],
    /// The consumer's pid: the child checks it is still its parent once
    /// the parent-death signal is set.
    parent: libc::pid_t,
    /// [`SpawnOptions::in_child`].
    in_child: Option<&'a (dyn Fn() -> io::Result<()> + Sync)>,
    /// [`SpawnOptions::new_session`].
    new_session: bool,
    /// Whether to set the parent-death signal
    /// ([`SpawnOptions::no_parent_death_signal`]).
    parent_death_signal: bool,
    /// The errno of the step that failed; 0 while none has.
    error: AtomicI32,
    /// The boot clock as the child first read it (0 if it could not).
    forked_ns: AtomicU64,
}

impl JobCommand {
    /// `program` with `args` in the environment `env` (jobs add their own
    /// variables at [`spawn`](Self::spawn)). A program without a `/` is
    /// looked for in `env`'s `PATH`, as `execvp` does.
    pub(crate) fn new(
        program: &OsStr,
        args: &[OsString],
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> io::Result<JobCommand> {
        let program_c = c_string(program.as_bytes())?;
        let mut base_env = Vec::new();
        let mut path = None;
        for (key, value) in env {
            if key == "PATH" {
                path = Some(value.clone());
            }
            base_env.push(env_entry(key.as_bytes(), value.as_bytes())?);
        }
        let candidates = if program.as_bytes().contains(&b'/') {
            vec![program_c.clone()]
        } else {
            let path = path.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
            let mut candidates = Vec::new();
            for dir in path.as_bytes().split(|&byte| byte == b':') {
                let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
                let mut full = dir.to_vec();
                full.push(b'/');
                full.extend_from_slice(program.as_bytes());
                candidates.push(c_string(&full)?);
            }
            candidates
        };
        let mut argv = vec![program_c];
        for arg in args {
            argv.push(c_string(arg.as_bytes())?);
        }
        Ok(JobCommand {
            candidates,
            argv,
            base_env,
        })
    }

    /// Starts the command in a process group of its own, with its stdin,
    /// stdout and stderr on pipes, SIGKILL as its parent-death signal
    /// (unless [`spawn_with`](Self::spawn_with)'s options say otherwise), and
    /// `env` added to the base environment. An error is the one of the
    /// `execve` (`NotFound` when no candidate exists) or of a step before.
    ///
    /// The calling thread waits until the child has exec'd or failed.
    /// The parent-death signal comes when that thread ends: it must
    /// outlive the job (it waits for it).
    pub(crate) fn spawn(&self, env: &[(&str, String)]) -> io::Result<JobProcess> {
        self.spawn_with(env, &SpawnOptions::default())
    }

    /// [`spawn`](Self::spawn) with `options`.
    pub(crate) fn spawn_with(
        &self,
        env: &[(&str, String)],
        options: &SpawnOptions<'_>,
    ) -> io::Result<JobProcess> {
        let mut env_entries = Vec::with_capacity(env.len());
        for (key, value) in env {
            env_entries.push(env_entry(key.as_bytes(), value.as_bytes())?);
        }
        let (stdin_read, stdin_write) = if options.null_stdin {
            let null = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
            (above_stdio(OwnedFd::from(null))?, None)
        } else {
            let (read, write) = pipe()?;
            (read, Some(write))
        };
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        let candidates = null_terminated(self.candidates.iter());
        let argv = null_terminated(self.argv.iter());
        let envp = null_terminated(
            self.base_env
                .iter()
                .filter(|entry| !env.iter().any(|(key, _)| is_entry_of(entry, key)))
                .chain(env_entries.iter()),
        );
        let setup = ChildSetup {
            candidates: candidates.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            fds: [
                stdin_read.as_raw_fd(),
                stdout_write.as_raw_fd(),
                stderr_write.as_raw_fd(),
            ],
            parent: rustix::process::getpid().as_raw_pid(),
            in_child: options.in_child,
            new_session: options.new_session,
            parent_death_signal: !options.no_parent_death_signal,
            error: AtomicI32::new(0),
            forked_ns: AtomicU64::new(0),
        };
        // Not zeroed: a stack needs no initial contents.
        let mut stack: Vec<MaybeUninit<u8>> = Vec::with_capacity(CHILD_STACK);
        stack.resize_with(CHILD_STACK, MaybeUninit::uninit);
        let before_fork = boot_clock_ns();
        let pid = clone_vfork(&setup, &mut stack)?;
        // The child has exec'd or ended: its ends of the pipes are its own.
        drop((stdin_read, stdout_write, stderr_write));
        let pid = u32::try_from(pid).map_err(|_| io::Error::other("clone returned a bad pid"))?;
        let mut process = JobProcess {
            pid,
            stdin: stdin_write,
            stdout: Some(stdout_read),
            stderr: Some(stderr_read),
            forked_between: (before_fork, setup.forked_ns.load(Ordering::SeqCst)),
            reaped: false,
        };
        match setup.error.load(Ordering::SeqCst) {
            0 => Ok(process),
            errno => {
                // The child failed before or at its exec, and has exited.
                process.reap()?;
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }
}

impl JobProcess {
    /// The process id, also its process group id. Until [`wait`](Self::wait)
    /// it cannot be anybody else's.
    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// Its start time (field 22 of `/proc/<pid>/stat`), when the clock read
    /// around its fork tells it for certain (nearly always): its identity
    /// without a read of `/proc`, which would wait for its `execve`.
    #[cfg_attr(not(feature = "master"), allow(dead_code))]
    pub(crate) fn start_time(&self) -> Option<u64> {
        let (before, after) = self.forked_between;
        start_time_between(before, after)
    }

    /// Waits until the process has ended, without reaping it (until
    /// [`wait`](Self::wait), its pid and process group id stay ours).
    pub(crate) async fn exited(&self) {
        wait_exited(self.pid).await;
    }

    /// The pid as rustix takes it.
    fn rustix_pid(&self) -> io::Result<Pid> {
        i32::try_from(self.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::other("pid out of range"))
    }

    /// Waits for the process to end (blocking) and reaps it.
    pub(crate) fn wait(mut self) -> io::Result<ExitStatus> {
        self.reap()
    }

    /// `waitpid` until it answers.
    fn reap(&mut self) -> io::Result<ExitStatus> {
        let pid = self.rustix_pid()?;
        loop {
            match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
                Ok(Some((got, status))) if got == pid => {
                    self.reaped = true;
                    return Ok(ExitStatus::from_raw(status.as_raw()));
                }
                Err(rustix::io::Errno::INTR) => {}
                // Without WNOHANG only our child answers; anything else is
                // as good as ECHILD: somebody else reaped it, nothing left
                // to do.
                Ok(_) => {
                    self.reaped = true;
                    return Err(io::Error::other("waitpid answered for another process"));
                }
                Err(err) => {
                    self.reaped = true;
                    return Err(err.into());
                }
            }
        }
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !self.reaped {
            // Not reaped: the pid is still ours.
            if let Ok(pid) = self.rustix_pid() {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            let _ = self.reap();
        }
    }
}

/// Runs the child of `setup` on `stack` with `clone(CLONE_VM |
/// CLONE_VFORK)`, all signals blocked in this thread meanwhile. Returns
/// when the child has exec'd or exited.
fn clone_vfork(setup: &ChildSetup<'_>, stack: &mut [MaybeUninit<u8>]) -> io::Result<libc::pid_t> {
    // The stack grows down from its 16-byte aligned top.
    let top = stack.as_mut_ptr_range().end as usize & !15;
    // SAFETY: sigset_t is a plain C bit set: all zeros is a valid value.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset/pthread_sigmask write sigset_t values we own.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the child runs `child_main` on its own stack (`stack`, alive
    // until this returns: CLONE_VFORK suspends us until the child execs
    // or exits), sharing our memory; `child_main` only reads `setup`
    // (alive as long) and writes its atomic `error`, and calls only
    // async-signal-safe functions. No signal handler can run in it before
    // it resets them: all signals are blocked.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            ptr::from_ref(setup).cast_mut().cast::<c_void>(),
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

/// The child: the clock, process group, parent-death signal, stdio,
/// signals, exec.
/// Leaves the errno of the failing step in `setup.error` and exits 127.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildSetup` the parent keeps alive (and does
    // not touch) until we exec or exit; only async-signal-safe libc
    // functions are called, on pointers and arrays built by the parent.
    unsafe {
        let setup = &*(arg as *const ChildSetup<'_>);
        // First: the kernel stamped our start just before we run.
        setup.forked_ns.store(boot_clock_ns(), Ordering::SeqCst);
        let fail = |errno: c_int| -> c_int {
            setup.error.store(
                if errno == 0 { libc::EINVAL } else { errno },
                Ordering::SeqCst,
            );
            libc::_exit(127)
        };
        let errno = || *libc::__errno_location();
        let grouped = if setup.new_session {
            libc::setsid() >= 0
        } else {
            libc::setpgid(0, 0) == 0
        };
        if !grouped {
            return fail(errno());
        }
        if let Some(in_child) = setup.in_child {
            // An OS error only (see `SpawnOptions::in_child`): nothing to
            // free when it is dropped.
            if let Err(err) = in_child() {
                return fail(err.raw_os_error().unwrap_or(libc::EINVAL));
            }
        }
        if setup.parent_death_signal {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return fail(errno());
            }
            // The consumer may have died before the signal was set.
            if libc::getppid() != setup.parent {
                return fail(libc::ESRCH);
            }
        }
        for (target, &fd) in setup.fds.iter().enumerate() {
            // Our ends are above 2: dup2 leaves them as they are (to be
            // closed at exec) and gives the copy no close-on-exec flag.
            if libc::dup2(fd, target as c_int) < 0 {
                return fail(errno());
            }
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=MAX_SIGNAL {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            // Signals glibc reserves refuse: nothing to reset there.
            if libc::sigaction(signal, ptr::null(), &mut current) != 0 {
                continue;
            }
            let caught =
                current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if caught || signal == libc::SIGPIPE {
                libc::sigaction(signal, &default, ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut());
        // execvp's search: go on past a missing or unreadable candidate;
        // report EACCES when one was found but not runnable.
        let mut denied = false;
        let mut last = libc::ENOENT;
        let mut candidate = setup.candidates;
        while !(*candidate).is_null() {
            libc::execve(*candidate, setup.argv, setup.envp);
            last = errno();
            match last {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return fail(last),
            }
            candidate = candidate.add(1);
        }
        fail(if denied { libc::EACCES } else { last })
    }
}

/// A pipe, both ends close-on-exec and above 2 (so that the child's
/// `dup2` onto 0, 1 and 2 cannot overwrite one).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// `fd`, moved above 2 if it is 0, 1 or 2 (`try_clone` duplicates to 3
/// or more, close-on-exec).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        Ok(fd)
    } else {
        fd.try_clone()
    }
}

/// `bytes` as a C string; a NUL byte is an error.
fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} holds a NUL byte", String::from_utf8_lossy(bytes)),
        )
    })
}

/// `KEY=value` as a C string.
fn env_entry(key: &[u8], value: &[u8]) -> io::Result<CString> {
    let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
    entry.extend_from_slice(key);
    entry.push(b'=');
    entry.extend_from_slice(value);
    c_string(&entry)
}

/// Whether `entry` (`KEY=value`) sets `key`.
fn is_entry_of(entry: &CString, key: &str) -> bool {
    let bytes = entry.as_bytes();
    bytes.len() > key.len() && bytes.starts_with(key.as_bytes()) && bytes[key.len()] == b'='
}

/// Pointers to `strings`, then a null pointer.
fn null_terminated<'a>(strings: impl Iterator<Item = &'a CString>) -> Vec<*const c_char> {
    strings
        .map(|string| string.as_ptr())
        .chain([ptr::null()])
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn run(
        command: &JobCommand,
        env: &[(&str, String)],
        input: &[u8],
    ) -> (ExitStatus, String, String) {
        let mut process = command.spawn(env).expect("spawn");
        let mut stdin = std::fs::File::from(process.stdin.take().expect("stdin"));
        stdin.write_all(input).expect("write stdin");
        drop(stdin);
        let mut out = String::new();
        std::fs::File::from(process.stdout.take().expect("stdout"))
            .read_to_string(&mut out)
            .expect("read stdout");
        let mut err = String::new();
        std::fs::File::from(process.stderr.take().expect("stderr"))
            .read_to_string(&mut err)
            .expect("read stderr");
        let status = process.wait().expect("wait");
        (status, out, err)
    }

    /// The test process's environment with `extra` added.
    fn env_with(extra: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        std::env::vars_os()
            .chain(extra.iter().map(|(key, value)| (key.into(), value.into())))
            .collect()
    }

    fn sh(script: &str, extra: &[(&str, &str)]) -> JobCommand {
        JobCommand::new(
            OsStr::new("sh"),
            &["-c".into(), script.into()],
            env_with(extra),
        )
        .expect("command")
    }

    #[test]
    fn the_start_time_told_is_the_one_proc_shows() {
        // Waits on its stdin: running while /proc is read.
        let command = sh("read line", &[]);
        let mut told = 0;
        for _ in 0..20 {
            let mut process = command.spawn(&[]).expect("spawn");
            let from_proc = crate::pidkiller::ProcessIdentity::of(process.id()).expect("identity");
            if let Some(start_time) = process.start_time() {
                assert_eq!(start_time, from_proc.start_time);
                told += 1;
            }
            drop(process.stdin.take());
            process.wait().expect("wait");
        }
        // The child reads the clock right after its fork: only a fork
        // across a tick's edge (10 ms) leaves its start time to /proc.
        assert!(told >= 10, "told the start time of {told} of 20 spawns");
    }

    #[test]
    fn runs_with_stdio_env_and_its_own_group() {
        let command = sh(
            "read line; echo \"in=$line id=$JOB_ID base=$BASE\"; echo err >&2; \
             read -r _ _ _ _ group _ < /proc/$$/stat; echo \"$group $$\" >&2; exit 3",
            &[("BASE", "b")],
        );
        let (status, out, err) = run(&command, &[("JOB_ID", "7".to_string())], b"payload\n");
        assert_eq!(status.code(), Some(3));
        assert_eq!(out, "in=payload id=7 base=b\n");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "stderr: {err}");
        assert_eq!(lines[0], "err");
        // Its own process group: the group id is its pid.
        let (group, pid) = lines[1].split_once(' ').expect("group and pid");
        assert_eq!(group, pid, "stderr: {err}");
        assert_ne!(pid, std::process::id().to_string());
    }

    #[test]
    fn a_job_variable_replaces_a_base_one() {
        let command = sh(
            "echo \"$TASKHERD_SPAWN_TEST_VAR\"",
            &[("TASKHERD_SPAWN_TEST_VAR", "base")],
        );
        let (_, out, _) = run(
            &command,
            &[("TASKHERD_SPAWN_TEST_VAR", "job".to_string())],
            b"",
        );
        assert_eq!(out, "job\n");
    }

    #[test]
    fn sigpipe_is_default_in_the_child() {
        // Rust ignores SIGPIPE; a job must not inherit that (`yes | head`
        // would never end).
        let command = sh("sed -n 's/^SigIgn:[[:space:]]*//p' /proc/$$/status", &[]);
        let (_, out, _) = run(&command, &[], b"");
        let ignored = u64::from_str_radix(out.trim(), 16).expect("SigIgn");
        assert_eq!(
            ignored & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE ignored in the job: {out}"
        );
    }

    #[test]
    fn the_end_is_seen_without_reaping() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let running = sh("exec sleep 30", &[]).spawn(&[]).expect("spawn");
        assert!(!crate::queue::child::has_exited(running.id()));
        let quick = sh("exit 5", &[]).spawn(&[]).expect("spawn");
        runtime.block_on(quick.exited());
        assert!(crate::queue::child::has_exited(quick.id()));
        // Not reaped yet: still a zombie of ours.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", quick.id())).expect("stat");
        assert!(stat.contains(") Z "), "{stat}");
        assert_eq!(quick.wait().expect("wait").code(), Some(5));
        drop(running);
    }

    #[test]
    fn an_unwaited_job_is_killed_and_reaped_on_drop() {
        // (The parent-death signal is checked by the integration tests,
        // which SIGKILL a consumer with jobs running.)
        let command = sh("exec sleep 30", &[]);
        let process = command.spawn(&[]).expect("spawn");
        let pid = process.id();
        drop(process);
        let dead = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err();
        assert!(dead, "dropping an unwaited job must kill and reap it");
    }

    #[test]
    fn a_missing_program_is_not_found_and_reaped() {
        let command = JobCommand::new(OsStr::new("taskherd-no-such-program"), &[], env_with(&[]))
            .expect("command");
        let err = command.spawn(&[]).expect_err("spawned a missing program");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let command = JobCommand::new(OsStr::new("/nonexistent/dir/prog"), &[], env_with(&[]))
            .expect("command");
        let err = command.spawn(&[]).expect_err("spawned a missing path");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_that_cannot_run_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-executable");
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").expect("write");
        let command = JobCommand::new(path.as_os_str(), &[], env_with(&[])).expect("command");
        let err = command
            .spawn(&[])
            .expect_err("ran a file without the x bit");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn a_nul_byte_is_refused_up_front() {
        let err = JobCommand::new(OsStr::new("sh"), &["a\0b".into()], env_with(&[]))
            .expect_err("NUL accepted");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
