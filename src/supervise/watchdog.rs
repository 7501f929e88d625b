//! The watchdog: no orphans when a master or an agent dies by SIGKILL.
//!
//! The pid registry ([`crate::pidkiller`]) records every instance's
//! process group with the identity (pid and start time) of the master or
//! agent that started it; a later run stops what a dead owner left. The
//! watchdog does it at once: a small process (`taskherd watchdog`, started
//! before the first entry is registered, in a process group of its own;
//! an agent forks its own at its start) that holds the
//! read end of a pipe whose write end only its owner has. When the owner
//! ends, however it ends, the kernel closes that end. After a clean end
//! the owner has no entry left in the registry, and the watchdog exits at
//! once, having only read it. Otherwise it opens the registry, which takes
//! the dead owner's entries over and stops them (SIGTERM to each process
//! group, its stop grace, SIGKILL), waits until they are gone, and exits.
//!
//! It kills only what the registry recorded, each checked by pid and start
//! time (a reused pid is not ours), and only entries whose owner is dead.
//! Instances' children in their instance's process group die with it; a
//! process that left its group (`setsid`) is out of its reach.
//!
//! The taskherd binary turns it on with [`enable`]; a program that embeds
//! the master and wants it too calls [`enable`] with a program that runs
//! [`run`] when given the arguments `watchdog --state-file FILE`.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::pidkiller::proc::group_has_members;
use crate::pidkiller::PidKiller;

/// The subcommand that runs [`run`].
pub const WATCHDOG_COMMAND: &str = "watchdog";

/// Longest wait for a dead owner's processes beyond their stop grace.
const SETTLE: Duration = Duration::from_secs(5);

/// How often the watchdog looks whether they are gone.
const POLL: Duration = Duration::from_millis(100);

/// The program started as the watchdog, once [`enable`]d.
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// This process's watchdog, once started: one per process, alive as long
/// as the process.
static RUNNING: Mutex<Option<Running>> = Mutex::new(None);

/// Whether [`start`] failed (and said so): it does not try again.
static START_FAILED: AtomicBool = AtomicBool::new(false);

/// A started watchdog: its process and our end of its pipe.
struct Running {
    /// The watchdog process (reaped when it ends with us, by init); `None`
    /// for a [`fork_early`] one.
    _child: Option<Child>,
    /// The write end: closed by the kernel when we end (close-on-exec:
    /// no instance holds it).
    _pipe: OwnedFd,
    /// The registry it watches.
    state_file: PathBuf,
}

/// Turns the watchdog on for this process: `program watchdog --state-file
/// FILE` is started beside the first pid registry that gets an entry.
pub fn enable(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// Starts this process's watchdog for the registry `state_file`, if it is
/// [`enable`]d and not started (or tried) yet. `Ok(false)` when there is
/// nothing to do.
///
/// # Errors
/// The watchdog process could not be started (said once: later calls
/// return `Ok(false)`).
pub(crate) fn start(state_file: &Path) -> std::io::Result<bool> {
    let Some(program) = PROGRAM.get() else {
        return Ok(false);
    };
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    if running
        .as_ref()
        .is_some_and(|running| running.state_file == state_file)
        || START_FAILED.load(Ordering::Relaxed)
    {
        return Ok(false);
    }
    let started = Command::new(program)
        .arg(WATCHDOG_COMMAND)
        .arg("--state-file")
        .arg(state_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Out of our process group: a Ctrl-C meant for the master does
        // not end it before the master has stopped its instances.
        .process_group(0)
        .spawn()
        .and_then(|mut child| match child.stdin.take() {
            Some(pipe) => Ok((child, pipe)),
            None => Err(std::io::Error::other(
                "the watchdog started without its pipe",
            )),
        });
    let (child, pipe) = started.inspect_err(|_| START_FAILED.store(true, Ordering::Relaxed))?;
    *running = Some(Running {
        _child: Some(child),
        _pipe: OwnedFd::from(pipe),
        state_file: state_file.to_path_buf(),
    });
    Ok(true)
}

/// Starts this process's watchdog for the registry `state_file` by
/// `fork` alone, without the exec of `taskherd watchdog`: the child is a copy of
/// this process that does what `taskherd watchdog` does. An agent calls it
/// first thing, before its runtime starts threads: a host then pays no
/// second exec (and dynamic load) of the executable per agent. Does
/// nothing and returns `Ok(false)` unless the watchdog is [`enable`]d, if
/// one runs already, or if this process has more than one thread (a fork
/// is only sound while it has one); the watchdog is then started as a
/// program before the first entry is registered.
///
/// # Errors
/// The pipe or the fork failed.
pub fn fork_early(state_file: &Path) -> std::io::Result<bool> {
    if PROGRAM.get().is_none() || !single_threaded() {
        return Ok(false);
    }
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    if running.is_some() {
        return Ok(false);
    }
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let owner = std::process::id();
    // SAFETY: this process has one thread (checked just above, and nothing
    // starts one in between), so the child is a complete copy in which any
    // code may run; it never returns from this function.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(write);
            // As `start` does: a process group of its own, stdin and
            // stdout away from the owner's (an agent's link to its
            // master), stderr kept for its messages.
            let _ = rustix::process::setpgid(None, None);
            let _ = rustix::stdio::dup2_stdin(&null);
            let _ = rustix::stdio::dup2_stdout(&null);
            drop(null);
            let code = guard(owner, std::fs::File::from(read), state_file);
            std::process::exit(code);
        }
        _child => {
            *running = Some(Running {
                _child: None,
                _pipe: write,
                state_file: state_file.to_path_buf(),
            });
            Ok(true)
        }
    }
}

/// Whether the registry `state_file` holds something for a watchdog to
/// do: an entry of the process `owner` (by pid: one of an earlier process
/// with the same pid counts too), or of any owner that is no longer alive
/// (an exec'd watchdog that first looked after its owner had died took
/// init for its owner), or it cannot be read (then [`PidKiller::open`]
/// says why).
fn has_work(owner: u32, state_file: &Path) -> bool {
    match crate::pidkiller::read_state(state_file) {
        Ok(entries) => {
            let owners: std::collections::HashSet<_> =
                entries.iter().map(|entry| entry.owner).collect();
            owners
                .iter()
                .any(|entry_owner| entry_owner.pid == owner || !entry_owner.is_alive_same())
        }
        Err(_) => true,
    }
}

/// Whether this process has a single thread (from /proc; `false` when it
/// cannot tell).
fn single_threaded() -> bool {
    crate::pidkiller::proc::read_small("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // After the command name: state is field 3, num_threads 20.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(17)?.parse::<u32>().ok()
        })
        == Some(1)
}

/// The watchdog process: waits for the end of its stdin (its owner has
/// ended), then stops what the owner left in the registry `state_file`
/// and waits (bounded) until it is gone. Call it from `main`.
pub fn run(state_file: &Path) -> ExitCode {
    let owner = std::os::unix::process::parent_id();
    match guard(owner, std::io::stdin().lock(), state_file) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// What a watchdog does, exec'd or forked: waits for the end of `pipe`
/// (its `owner` has ended), stops what the owner left in the registry
/// `state_file`, waits (bounded) until it is gone. Returns the exit code.
fn guard(owner: u32, mut pipe: impl std::io::Read, state_file: &Path) -> i32 {
    // Nothing comes on the pipe: a read returns 0 (or fails) once the
    // owner has ended.
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(&mut pipe, &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // The pipe closed when the owner's last thread was gone: its last
    // save is in the registry (or never will be). After a clean end it
    // has no entry left there, and there is nothing to do: no runtime, no
    // registry write (which its end would hold up: the watchdog keeps the
    // owner's stderr, an agent's SSH session, open).
    if !has_work(owner, state_file) {
        return 0;
    }
    // The pipe closes while the owner exits, before it is dead: until we
    // are its child no more, the registry would take it for alive (and
    // its entries for someone else's).
    let deadline = Instant::now() + SETTLE;
    while std::os::unix::process::parent_id() == owner && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("taskherd watchdog: cannot start a runtime: {err}");
            return 1;
        }
    };
    runtime.block_on(async {
        // Opening takes the dead owner's entries over and stops them.
        let killer = match PidKiller::open(state_file.to_path_buf()).await {
            Ok(killer) => killer,
            Err(err) => {
                eprintln!(
                    "taskherd watchdog: cannot open the pid registry {}: {err}",
                    state_file.display()
                );
                return 1;
            }
        };
        let leftovers = killer.leftovers().to_vec();
        let grace = leftovers
            .iter()
            .map(|entry| entry.grace)
            .max()
            .unwrap_or_default();
        // The registry stops them (SIGTERM, grace, SIGKILL) on its task:
        // wait until no process is left in their groups.
        let deadline = Instant::now() + grace + SETTLE;
        while Instant::now() < deadline
            && leftovers
                .iter()
                .any(|entry| group_has_members(entry.pgid, entry.identity.start_time))
        {
            tokio::time::sleep(POLL).await;
        }
        drop(killer);
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pidkiller::proc::ProcessIdentity;
    use crate::pidkiller::{read_state, write_entries, Entry};
    use std::os::unix::fs::MetadataExt;

    /// The pid of a process that has ended and been reaped.
    fn gone_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    fn entry_of(owner: u32) -> Entry {
        let pid = gone_pid();
        Entry {
            identity: ProcessIdentity { pid, start_time: 1 },
            pgid: pid,
            deadline: None,
            grace: Duration::from_millis(100),
            label: "left".into(),
            owner: ProcessIdentity {
                pid: owner,
                start_time: 1,
            },
        }
    }

    #[test]
    fn after_a_clean_end_the_registry_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pids.json");
        // Another owner's entry, and that owner (this test) runs on.
        let mut other = entry_of(gone_pid());
        other.owner = ProcessIdentity::current().expect("own identity");
        write_entries(&path, vec![other]);
        let inode = fs_inode(&path);
        // The owner (another ended process) has no entry: done at once.
        assert_eq!(guard(gone_pid(), std::io::empty(), &path), 0);
        assert_eq!(fs_inode(&path), inode, "the registry was written");
    }

    #[test]
    fn entries_of_the_owner_are_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pids.json");
        let owner = gone_pid();
        write_entries(&path, vec![entry_of(owner)]);
        assert_eq!(guard(owner, std::io::empty(), &path), 0);
        // The registry was opened: the dead owner's entry, whose process
        // is gone, was dropped.
        assert_eq!(read_state(&path).expect("read"), Vec::new());
    }

    #[test]
    fn a_dead_owner_s_entries_are_taken_over_whoever_the_owner_was_taken_for() {
        // An exec'd watchdog that first looks after its owner has died was
        // reparented already: it takes init (or a subreaper) for its owner.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pids.json");
        write_entries(&path, vec![entry_of(gone_pid())]);
        assert_eq!(guard(1, std::io::empty(), &path), 0);
        assert_eq!(read_state(&path).expect("read"), Vec::new());
    }

    fn fs_inode(path: &Path) -> u64 {
        std::fs::metadata(path).expect("metadata").ino()
    }
}
