//! Deadline registry and kill escalation, persisted so that it survives a
//! restart of the master or agent.
//!
//! Every spawned process is registered with its [`ProcessIdentity`] (pid
//! plus start time from `/proc`, so a reused pid is never signalled), its
//! process group, an optional deadline and a grace period. At the deadline
//! (or on [`PidKiller::kill_now`]) the escalation runs:
//!
//! 1. check the identity; if the pid now belongs to another process, drop
//!    the entry without signalling ([`KillEvent::IdentityChanged`]);
//! 2. `SIGTERM` to the process group ([`KillEvent::TermSent`]);
//! 3. wait the grace period (the task is not blocked: an exit seen through a
//!    pidfd ends it early with [`KillEvent::Terminated`]);
//! 4. check again; if anything of the group is left, `SIGKILL` to the group
//!    ([`KillEvent::Killed`]).
//!
//! A signal refused for another reason than "no such process" is tried
//! again a few times, logged, and reported as [`KillEvent::SignalFailed`];
//! it never counts as a success.
//!
//! # Persistence
//!
//! The registry lives in a JSON state file, rewritten atomically after
//! every change (`<file>.tmp`, rename) while holding a `flock` on
//! `<file>.lock`. It is not synced to disk: its entries are processes of
//! this boot (older ones are dropped by boot id), which a crash of the
//! machine ends too, and a file such a crash cut short (modified before
//! the boot) is taken for empty; the directory is created mode 0700
//! and refused if others can write to it. Several owners (masters, agents)
//! may share one file: each keeps the entries of the others that are alive.
//! Commands that arrive together are saved with one write, and a command
//! returns once its change is saved.
//!
//! ## Format
//!
//! One JSON document, rewritten whole on every change:
//!
//! ```json
//! {
//!   "version": 1,
//!   "boot_id": "1c4911f5-db0f-475b-a761-4c51d8583f64",
//!   "entries": [
//!     {
//!       "identity": { "pid": 4242, "start_time": 123456 },
//!       "pgid": 4242,
//!       "deadline": 1767225600000,
//!       "grace": 10000,
//!       "label": "workers#3",
//!       "owner": { "pid": 4000, "start_time": 120000 }
//!     }
//!   ]
//! }
//! ```
//!
//! `deadline` is milliseconds since the Unix epoch (or `null`), `grace` is
//! milliseconds. `boot_id` is the kernel's boot id: start times count from
//! boot, so entries written before a reboot mean nothing after it and are
//! ignored.
//!
//! ## After a restart
//!
//! [`PidKiller::open`] sorts what the file holds:
//! - entries registered by this very process (an earlier `PidKiller`) are
//!   taken back with their deadlines, which are then enforced;
//! - entries of an owner that is gone (a master or agent that crashed) whose
//!   process still runs are leftovers: taken over (owner := us) and stopped
//!   right away (SIGTERM, grace, SIGKILL), deadline or not, since nobody
//!   supervises them any more; listed by [`PidKiller::leftovers`];
//! - entries whose process is gone, or whose pid was reused, are dropped;
//! - entries of other live owners are left to them.
//!
//! Leftovers of an owner that dies while we run are found and stopped at
//! our next write.
//!
//! # Example
//!
//! ```no_run
//! use std::os::unix::process::CommandExt;
//! use std::time::{Duration, SystemTime};
//! use taskherd::pidkiller::{default_state_file, KillEvent, PidKiller};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let killer = PidKiller::open(default_state_file()).await?;
//! for leftover in killer.leftovers() {
//!     eprintln!("stopping {} left by a crashed run", leftover.label);
//! }
//! let mut events = killer.subscribe();
//! let mut child = std::process::Command::new("sleep")
//!     .arg("3600")
//!     .process_group(0)
//!     .spawn()?;
//! let deadline = SystemTime::now() + Duration::from_secs(60);
//! killer
//!     .register(child.id(), child.id(), Some(deadline), Duration::from_secs(5), "sleeper")
//!     .await?;
//! if let Ok(KillEvent::TermSent { entry, .. }) = events.recv().await {
//!     eprintln!("{} reached its max_lifetime", entry.label);
//! }
//! child.wait()?;
//! killer.unregister(child.id()).await?;
//! # Ok(())
//! # }
//! ```

pub(crate) mod proc;
mod store;
mod task;

pub use proc::{ProcessIdentity, Signal};

use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

/// Name of the state file in [`default_state_dir`].
pub const STATE_FILE_NAME: &str = "pids.json";

/// Capacity of the event channel; a subscriber that falls further behind
/// gets `RecvError::Lagged`.
pub const EVENT_CAPACITY: usize = 256;

/// Capacity of the command channel from handles to the task.
const COMMAND_CAPACITY: usize = 1024;

/// One registered process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The process: pid and start time, checked before every signal.
    pub identity: ProcessIdentity,
    /// Its process group, which the signals go to so grandchildren die too.
    pub pgid: u32,
    /// When to stop it (`max_lifetime`); never when `None`. Stored as
    /// milliseconds since the Unix epoch so it survives a restart.
    #[serde(with = "epoch_ms")]
    pub deadline: Option<SystemTime>,
    /// Time between SIGTERM and SIGKILL, in milliseconds in the file.
    #[serde(with = "crate::protocol::millis")]
    pub grace: Duration,
    /// What to call it in logs and in `taskherd pids` (group and instance).
    pub label: String,
    /// The process that registered it: a later run tells leftovers of a
    /// dead owner from processes of a live one.
    pub owner: ProcessIdentity,
}

impl Entry {
    /// Whether the process, or what is left of its process group, still
    /// runs (identity-checked against `/proc`).
    pub fn is_running(&self) -> bool {
        store::still_running(self)
    }
}

/// Why an escalation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KillReason {
    /// The deadline was reached (`max_lifetime`).
    Deadline,
    /// [`PidKiller::kill_now`] (a stop path).
    KillNow,
    /// A leftover of a crashed run, found by [`PidKiller::open`] or by a
    /// later write.
    Leftover,
}

/// What the escalation did, for the supervisor's log.
///
/// A normal escalation is `TermSent` then one of `Terminated` (it ended
/// within the grace period) or `Killed` (SIGKILL was needed).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KillEvent {
    /// SIGTERM went to the process group; the grace period runs.
    TermSent {
        /// The entry.
        entry: Entry,
        /// Deadline, kill_now or leftover.
        reason: KillReason,
    },
    /// It ended after SIGTERM; no SIGKILL was needed. The entry is gone.
    Terminated {
        /// The entry.
        entry: Entry,
    },
    /// Something of it was left at the end of the grace period and got
    /// SIGKILL. The entry is gone.
    Killed {
        /// The entry.
        entry: Entry,
    },
    /// The kernel refused a signal (after retries). After a failed SIGTERM
    /// SIGKILL is still tried at the end of the grace period; after a failed
    /// SIGKILL the entry stays registered (and saved, so a later run tries
    /// again) and may be retried with [`PidKiller::kill_now`].
    SignalFailed {
        /// The entry.
        entry: Entry,
        /// The signal that could not be sent.
        signal: Signal,
        /// Why (EPERM, ...).
        error: Arc<io::Error>,
    },
    /// The pid belongs to another process now: nothing was signalled and
    /// the entry is gone.
    IdentityChanged {
        /// The entry.
        entry: Entry,
    },
    /// The process had already ended when its escalation was due (it was
    /// never unregistered); nothing was signalled and the entry is gone.
    Gone {
        /// The entry.
        entry: Entry,
    },
}

impl KillEvent {
    /// The entry the event is about.
    pub fn entry(&self) -> &Entry {
        match self {
            KillEvent::TermSent { entry, .. }
            | KillEvent::Terminated { entry }
            | KillEvent::Killed { entry }
            | KillEvent::SignalFailed { entry, .. }
            | KillEvent::IdentityChanged { entry }
            | KillEvent::Gone { entry } => entry,
        }
    }
}

/// Errors of the pid killer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidKillerError {
    /// The state file exists but cannot be read.
    #[error("cannot read the pid state file {}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state file is not a pid registry.
    #[error("corrupt pid state file {} (move it away to start afresh)", path.display())]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The state file was written by a newer taskherd.
    #[error("pid state file {} has format version {version}, newer than this taskherd knows", path.display())]
    UnsupportedVersion {
        /// The state file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The state file could not be written.
    #[error("cannot write the pid state file {}", path.display())]
    Write {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state directory could not be created or inspected.
    #[error("cannot create the state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state directory is not ours alone: someone else could replace
    /// the file and make us signal their choice of processes.
    #[error("state directory {} must be a directory owned by this user and not writable by others", path.display())]
    InsecureStateDir {
        /// The directory.
        path: PathBuf,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/stat` could not be read.
    #[error("cannot read the identity of this process")]
    OwnIdentity(#[source] io::Error),
    /// The pid to register does not exist (or is a zombie).
    #[error("no running process {pid} to register")]
    NoSuchProcess {
        /// The pid.
        pid: u32,
        /// What `/proc` said.
        #[source]
        source: io::Error,
    },
    /// The process group would hit every process, init, or ourselves.
    #[error("refusing process group {pgid} for process {pid}")]
    InvalidGroup {
        /// The pid.
        pid: u32,
        /// The group refused.
        pgid: u32,
    },
    /// The process is not in the group given for it.
    #[error("process {pid} is in process group {actual}, not {pgid}")]
    WrongGroup {
        /// The pid.
        pid: u32,
        /// The group given.
        pgid: u32,
        /// The group it is in.
        actual: u32,
    },
    /// No entry for this pid.
    #[error("process {pid} is not registered")]
    NotRegistered {
        /// The pid.
        pid: u32,
    },
    /// The change is in effect (deadlines are enforced by this run) but
    /// could not be saved, so a restart would not know it.
    #[error("change not saved to {}", path.display())]
    NotSaved {
        /// The state file.
        path: PathBuf,
        /// Why the save failed (shared by the changes saved together).
        #[source]
        source: Arc<PidKillerError>,
    },
    /// The task has stopped (it panicked or its runtime is shutting down).
    #[error("the pid killer task has stopped")]
    Closed,
}

impl PidKillerError {
    /// Whether the error says that the process to register had already
    /// ended ([`PidKillerError::NoSuchProcess`]: gone, or a zombie not yet
    /// reaped). A supervisor that registers the child it has just started
    /// meets this whenever the child exits at once (`true`, `echo`): the
    /// child needs no watching then, and that is not a failure.
    pub fn is_process_gone(&self) -> bool {
        matches!(self, PidKillerError::NoSuchProcess { .. })
    }
}

/// Handle to the registry; cheap to clone. The task that owns the registry
/// runs while a handle exists, and then until the escalations already
/// started are done; deadlines not reached by then stay in the state file
/// for the next [`PidKiller::open`].
///
/// One `PidKiller` per state file per process: two in the same process
/// would each take the other's entries for its own.
#[derive(Debug, Clone)]
pub struct PidKiller {
    cmd_tx: mpsc::Sender<task::Command>,
    events_tx: broadcast::Sender<KillEvent>,
    leftovers: Arc<[Entry]>,
    owner: ProcessIdentity,
    state_file: Arc<Path>,
}

impl PidKiller {
    /// Opens (or creates) the registry saved in `state_file` and spawns its
    /// task on the current tokio runtime (which needs time and I/O enabled).
    ///
    /// Leftovers of crashed runs are stopped by the task right away: their
    /// events may come before a [`PidKiller::subscribe`]; they are listed by
    /// [`PidKiller::leftovers`] and logged.
    ///
    /// # Errors
    /// The state file is corrupt or unreadable ([`PidKillerError::Corrupt`],
    /// [`PidKillerError::Read`], ...), its directory cannot be created or is
    /// open to others, or the file cannot be written.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn open(state_file: PathBuf) -> Result<PidKiller, PidKillerError> {
        let path = state_file.clone();
        let opened = task::file_work(move |wait| task::open(&path, wait)).await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        let registry =
            task::Registry::new(state_file.clone(), opened.me, opened.own, events_tx.clone());
        let span = tracing::info_span!("pidkiller", state_file = %state_file.display());
        tokio::spawn(
            registry
                .run(opened.leftovers.clone(), cmd_rx)
                .instrument(span),
        );
        Ok(PidKiller {
            cmd_tx,
            events_tx,
            leftovers: opened.leftovers.into(),
            owner: opened.me,
            state_file: state_file.into(),
        })
    }

    /// Processes left by a crashed run that [`PidKiller::open`] found alive
    /// and is stopping.
    pub fn leftovers(&self) -> &[Entry] {
        &self.leftovers
    }

    /// The state file.
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Registers `pid` (in process group `pgid`) with an optional deadline
    /// and the grace between SIGTERM and SIGKILL. Its identity is read now.
    /// Registering the same process again updates its entry. Returns once
    /// the entry is saved.
    ///
    /// # Errors
    /// [`PidKillerError::NoSuchProcess`] if `pid` does not run (or is a
    /// zombie); [`PidKillerError::InvalidGroup`] for group 0, 1 or our own;
    /// [`PidKillerError::WrongGroup`] if `pid` is not in `pgid`;
    /// [`PidKillerError::NotSaved`] if the entry is in effect but could not
    /// be saved.
    ///
    /// # Cancel safety
    /// Not cancel safe: once sent, the registration happens even if the
    /// future is dropped.
    pub async fn register(
        &self,
        pid: u32,
        pgid: u32,
        deadline: Option<SystemTime>,
        grace: Duration,
        label: impl Into<String>,
    ) -> Result<ProcessIdentity, PidKillerError> {
        check_group(pid, pgid)?;
        let stat =
            proc::read_stat(pid).map_err(|source| PidKillerError::NoSuchProcess { pid, source })?;
        if !stat.is_running() {
            return Err(PidKillerError::NoSuchProcess {
                pid,
                source: io::Error::new(io::ErrorKind::NotFound, "the process is a zombie"),
            });
        }
        if stat.pgrp != pgid {
            return Err(PidKillerError::WrongGroup {
                pid,
                pgid,
                actual: stat.pgrp,
            });
        }
        let identity = ProcessIdentity {
            pid,
            start_time: stat.start_time,
        };
        self.register_started(identity, pgid, deadline, grace, label)
            .await
    }

    /// [`register`](Self::register) for a process this program has just
    /// started and not reaped yet, whose `identity` it knows (see
    /// [`crate::supervise::process::Spawned::start_time`]): nothing is read
    /// from `/proc`, which would wait while the process is still in
    /// `execve`. It may have exited already (a zombie until reaped): its
    /// entry is dropped when it is [`unregister`](Self::unregister)ed.
    ///
    /// # Errors
    /// [`PidKillerError::InvalidGroup`] for group 0, 1 or our own;
    /// [`PidKillerError::NotSaved`] if the entry is in effect but could not
    /// be saved.
    ///
    /// # Cancel safety
    /// As [`register`](Self::register).
    pub async fn register_started(
        &self,
        identity: ProcessIdentity,
        pgid: u32,
        deadline: Option<SystemTime>,
        grace: Duration,
        label: impl Into<String>,
    ) -> Result<ProcessIdentity, PidKillerError> {
        check_group(identity.pid, pgid)?;
        let entry = Entry {
            identity,
            pgid,
            deadline,
            grace,
            label: label.into(),
            owner: self.owner,
        };
        self.request(|reply| task::Command::Register { entry, reply })
            .await?
    }

    /// Forgets `pid`: its process ended. Idempotent. An escalation already
    /// under way is finished first (the group may still have members).
    ///
    /// # Errors
    /// [`PidKillerError::NotSaved`] if the change could not be saved.
    pub async fn unregister(&self, pid: u32) -> Result<(), PidKillerError> {
        self.request(|reply| task::Command::Unregister { pid, reply })
            .await?
    }

    /// Sets or clears the deadline of `pid`.
    ///
    /// # Errors
    /// [`PidKillerError::NotRegistered`], or [`PidKillerError::NotSaved`].
    pub async fn set_deadline(
        &self,
        pid: u32,
        deadline: Option<SystemTime>,
    ) -> Result<(), PidKillerError> {
        self.request(|reply| task::Command::SetDeadline {
            pid,
            deadline,
            reply,
        })
        .await?
    }

    /// Starts the escalation of `pid` now (identity check, SIGTERM, grace,
    /// SIGKILL). Returns once SIGTERM went out (or the entry turned out to
    /// be gone); the rest is reported by events. Does nothing if an
    /// escalation is already under way.
    ///
    /// # Errors
    /// [`PidKillerError::NotRegistered`], or [`PidKillerError::NotSaved`].
    pub async fn kill_now(&self, pid: u32) -> Result<(), PidKillerError> {
        self.request(|reply| task::Command::KillNow { pid, reply })
            .await?
    }

    /// The entries of this registry, by pid (entries of other owners
    /// sharing the file are not included; see [`read_state`]).
    ///
    /// # Errors
    /// [`PidKillerError::Closed`] if the task has stopped.
    pub async fn list(&self) -> Result<Vec<Entry>, PidKillerError> {
        self.request(|reply| task::Command::List { reply }).await
    }

    /// Events of escalations from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<KillEvent> {
        self.events_tx.subscribe()
    }

    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> task::Command,
    ) -> Result<T, PidKillerError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.cmd_tx
            .send(command(reply_tx))
            .await
            .map_err(|_| PidKillerError::Closed)?;
        reply_rx.await.map_err(|_| PidKillerError::Closed)
    }
}

/// Refuses the process groups no entry may name: 0, 1 (init's) and our
/// own, which a signal to the entry's group would hit.
fn check_group(pid: u32, pgid: u32) -> Result<(), PidKillerError> {
    if pgid <= 1 || pgid == proc::own_pgrp() {
        return Err(PidKillerError::InvalidGroup { pid, pgid });
    }
    Ok(())
}

/// Reads the entries saved in a state file, of every owner, for display
/// (`taskherd pids`). A missing file has none; entries of a previous boot
/// are left out.
///
/// # Errors
/// [`PidKillerError::Read`], [`PidKillerError::Corrupt`] or
/// [`PidKillerError::UnsupportedVersion`].
pub fn read_state(path: impl AsRef<Path>) -> Result<Vec<Entry>, PidKillerError> {
    store::read_entries(path.as_ref())
}

/// Writes a state file by hand with `entries`, as a previous run would
/// have (tests of the registry and of its watchdog).
#[cfg(test)]
pub(crate) fn write_entries(path: &Path, entries: Vec<Entry>) {
    let _lock = store::lock(path, true).expect("lock");
    let mut state = store::empty_state();
    state.entries = entries;
    store::write(path, &state, None).expect("write state");
}

/// Where state lives: `$XDG_STATE_HOME/taskherd`, else
/// `$HOME/.local/state/taskherd`, else `/tmp/taskherd-state-<uid>`
/// (relative values are ignored).
pub fn default_state_dir() -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    store::state_dir_from(
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
        uid,
    )
}

/// [`STATE_FILE_NAME`] in [`default_state_dir`]: the registry shared by
/// the masters and agents of this user.
pub fn default_state_file() -> PathBuf {
    default_state_dir().join(STATE_FILE_NAME)
}

/// `Option<SystemTime>` as milliseconds since the Unix epoch, or null.
mod epoch_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub(super) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&crate::protocol::millis::since_epoch(*t)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        match Option::<u64>::deserialize(d)? {
            None => Ok(None),
            Some(ms) => UNIX_EPOCH
                .checked_add(Duration::from_millis(ms))
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("deadline out of range")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a current-thread runtime (an agent's) the registry's file work
    /// runs in place while the lock is free, and goes to the blocking pool
    /// to wait for it when another holder has it, the runtime free
    /// meanwhile.
    #[tokio::test]
    async fn file_work_runs_in_place_unless_the_lock_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join(STATE_FILE_NAME);
        let work = |path: PathBuf| move |wait: bool| store::lock(&path, wait).map(|_lock| wait);
        let in_place = task::file_work(work(path.clone()))
            .await
            .expect("free lock");
        assert!(!in_place, "the free lock was waited for on the pool");
        let held = store::lock(&path, true).expect("hold the lock");
        let waiting = tokio::spawn(task::file_work(work(path.clone())));
        // The runtime's one thread is free while the work waits: this
        // task runs, and the work has not ended.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the work did not wait for the lock");
        drop(held);
        let on_pool = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the work ends once the lock is free")
            .expect("join")
            .expect("locked");
        assert!(on_pool, "the taken lock was not waited for on the pool");
    }
    use proc::Target;
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use tokio::sync::broadcast::error::RecvError;

    /// Generous bound for anything the tests wait for.
    const BOUND: Duration = Duration::from_secs(20);

    /// A child in its own process group, killed (group) and reaped on drop
    /// if a test fails half-way.
    struct Victim {
        child: Option<Child>,
        pid: u32,
        /// First line it printed (a readiness mark or a pid).
        first_line: String,
    }

    impl Victim {
        /// Runs `sh -c script`; the script must print one line when ready.
        fn spawn(script: &str) -> Victim {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .process_group(0)
                .spawn()
                .expect("spawn sh");
            let stdout = child.stdout.take().expect("piped stdout");
            let mut first_line = String::new();
            BufReader::new(stdout)
                .read_line(&mut first_line)
                .expect("read the first line");
            assert!(!first_line.is_empty(), "the script printed nothing");
            let pid = child.id();
            Victim {
                child: Some(child),
                pid,
                first_line: first_line.trim().to_owned(),
            }
        }

        fn identity(&self) -> ProcessIdentity {
            ProcessIdentity::of(self.pid).expect("identity of a victim")
        }

        fn is_running(&mut self) -> bool {
            let child = self.child.as_mut().expect("not reaped yet");
            matches!(child.try_wait(), Ok(None))
                && proc::read_stat(self.pid).is_ok_and(|s| s.is_running())
        }

        /// Waits (pidfd, bounded) until it exits, and reaps it.
        async fn exit_status(&mut self) -> ExitStatus {
            if let Ok(identity) = ProcessIdentity::of(self.pid) {
                // Fails when it is already a zombie: then wait() returns at once.
                if let Ok(fd) = proc::pidfd_open(identity) {
                    tokio::time::timeout(BOUND, proc::wait_exit(fd))
                        .await
                        .expect("victim exits in time")
                        .expect("pidfd wait");
                }
            }
            let mut child = self.child.take().expect("not reaped yet");
            child.wait().expect("reap")
        }
    }

    impl Drop for Victim {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                if matches!(child.try_wait(), Ok(None)) {
                    // The group is our unreaped child's.
                    let _ = proc::send_once(Target::Group(self.pid), Signal::Kill);
                }
                let _ = child.wait();
            }
        }
    }

    /// The next event about `pid`, within [`BOUND`].
    async fn next_event(events: &mut broadcast::Receiver<KillEvent>, pid: u32) -> KillEvent {
        tokio::time::timeout(BOUND, async {
            loop {
                match events.recv().await {
                    Ok(event) if event.entry().identity.pid == pid => return event,
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => panic!("event channel closed"),
                }
            }
        })
        .await
        .expect("event in time")
    }

    fn state_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("state").join(STATE_FILE_NAME)
    }

    fn soon(ms: u64) -> Option<SystemTime> {
        Some(SystemTime::now() + Duration::from_millis(ms))
    }

    /// The identity of a process that has exited and been reaped.
    fn dead_identity() -> ProcessIdentity {
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn cat");
        let identity = ProcessIdentity::of(child.id()).expect("identity");
        drop(child.stdin.take());
        child.wait().expect("reap cat");
        assert!(!identity.is_alive_same());
        identity
    }

    #[tokio::test]
    async fn kills_at_the_deadline_when_sigterm_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let killer = PidKiller::open(path.clone()).await.expect("open");
        let mut events = killer.subscribe();
        let mut victim = Victim::spawn("trap '' TERM; echo ready; exec sleep 60");
        let pid = victim.pid;
        let deadline = soon(300);
        killer
            .register(pid, pid, deadline, Duration::from_millis(300), "stubborn")
            .await
            .expect("register");

        match next_event(&mut events, pid).await {
            KillEvent::TermSent { entry, reason } => {
                assert_eq!(reason, KillReason::Deadline);
                assert_eq!(entry.label, "stubborn");
            }
            other => panic!("expected TermSent, got {other:?}"),
        }
        assert!(SystemTime::now() >= deadline.expect("deadline"));
        assert!(matches!(
            next_event(&mut events, pid).await,
            KillEvent::Killed { .. }
        ));
        assert_eq!(victim.exit_status().await.signal(), Some(libc::SIGKILL));
        assert!(killer.list().await.expect("list").is_empty());
        assert!(read_state(&path).expect("state").is_empty());
        assert!(!proc::group_has_members(pid, 0));
    }

    #[tokio::test]
    async fn a_process_that_honours_sigterm_is_not_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killer = PidKiller::open(state_path(&dir)).await.expect("open");
        let mut events = killer.subscribe();
        let mut victim = Victim::spawn("echo ready; exec sleep 60");
        let pid = victim.pid;
        // A grace longer than the bound: the exit is seen through the pidfd.
        killer
            .register(pid, pid, soon(200), Duration::from_secs(600), "polite")
            .await
            .expect("register");

        assert!(matches!(
            next_event(&mut events, pid).await,
            KillEvent::TermSent { .. }
        ));
        assert!(matches!(
            next_event(&mut events, pid).await,
            KillEvent::Terminated { .. }
        ));
        assert_eq!(victim.exit_status().await.signal(), Some(libc::SIGTERM));
        assert!(killer.list().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn never_signals_a_pid_with_another_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let killer = PidKiller::open(path.clone()).await.expect("open");
        let mut events = killer.subscribe();
        let mut victim = Victim::spawn("echo ready; exec sleep 60");
        let real = victim.identity();
        // As if the registered process had died and its pid been reused.
        let recorded = ProcessIdentity {
            start_time: real.start_time.saturating_sub(1),
            ..real
        };
        killer
            .register_started(
                recorded,
                real.pid,
                soon(200),
                Duration::from_millis(100),
                "reused",
            )
            .await
            .expect("register");

        match next_event(&mut events, real.pid).await {
            KillEvent::IdentityChanged { entry } => assert_eq!(entry.identity, recorded),
            other => panic!("expected IdentityChanged, got {other:?}"),
        }
        assert!(victim.is_running(), "the other process was signalled");
        assert!(real.is_alive_same());
        assert!(killer.list().await.expect("list").is_empty());
        assert!(read_state(&path).expect("state").is_empty());
    }

    #[tokio::test]
    async fn deadlines_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let mut victim = Victim::spawn("echo ready; exec sleep 60");
        let pid = victim.pid;
        let deadline = soon(1000);
        {
            let killer = PidKiller::open(path.clone()).await.expect("open");
            let mut events = killer.subscribe();
            killer
                .register(pid, pid, deadline, Duration::from_secs(5), "lifetime")
                .await
                .expect("register");
            drop(killer);
            // The task ends once the last handle is gone.
            let closed = tokio::time::timeout(BOUND, events.recv())
                .await
                .expect("task ends in time");
            assert!(matches!(closed, Err(RecvError::Closed)), "{closed:?}");
        }
        assert!(victim.is_running());
        assert_eq!(read_state(&path).expect("state").len(), 1);

        let killer = PidKiller::open(path.clone()).await.expect("reopen");
        assert!(
            killer.leftovers().is_empty(),
            "own entries are not leftovers"
        );
        let listed = killer.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].deadline, deadline.map(round_to_ms));
        assert_eq!(victim.exit_status().await.signal(), Some(libc::SIGTERM));
        assert!(SystemTime::now() >= deadline.expect("deadline"));
    }

    #[tokio::test]
    async fn a_started_process_is_registered_on_the_identity_its_starter_gives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let killer = PidKiller::open(path.clone()).await.expect("open");
        // Ended and not reaped yet, as a short command can be by the time
        // its starter registers it.
        let mut victim = Victim::spawn("echo ready");
        let deadline = std::time::Instant::now() + BOUND;
        while proc::read_stat(victim.pid).is_ok_and(|stat| stat.is_running()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the victim did not exit"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let identity = victim.identity();
        let grace = Duration::from_secs(1);
        let err = killer
            .register(victim.pid, victim.pid, None, grace, "read")
            .await
            .expect_err("a zombie, read from /proc, is refused");
        assert!(err.is_process_gone(), "{err}");
        let registered = killer
            .register_started(identity, victim.pid, None, grace, "started")
            .await
            .expect("registered on the identity given");
        assert_eq!(registered, identity);
        let saved = read_state(&path).expect("state");
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].identity, identity);
        assert_eq!(saved[0].label, "started");
        // Its starter unregisters it when it reaps it.
        victim.exit_status().await;
        killer.unregister(identity.pid).await.expect("unregister");
        assert!(read_state(&path).expect("state").is_empty());
        // The groups nobody may be given stay refused.
        let err = killer
            .register_started(identity, 1, None, grace, "init's group")
            .await
            .expect_err("group 1");
        assert!(matches!(err, PidKillerError::InvalidGroup { .. }), "{err}");
    }

    /// What a deadline looks like after a round trip through the file.
    fn round_to_ms(t: SystemTime) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(crate::protocol::millis::since_epoch(t))
    }

    #[tokio::test]
    async fn stops_leftovers_of_a_crashed_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let mut stubborn = Victim::spawn("trap '' TERM; echo ready; exec sleep 60");
        let mut gone = Victim::spawn("echo ready; exec sleep 60");
        let gone_identity = gone.identity();
        // Our own unreaped child.
        proc::send_once(Target::Process(gone.pid), Signal::Kill).expect("kill");
        gone.exit_status().await;
        let dead_owner = dead_identity();
        let entry = |identity: ProcessIdentity, label: &str| Entry {
            identity,
            pgid: identity.pid,
            deadline: None,
            grace: Duration::from_millis(200),
            label: label.into(),
            owner: dead_owner,
        };
        write_entries(
            &path,
            vec![
                entry(stubborn.identity(), "leftover"),
                entry(gone_identity, "gone"),
            ],
        );

        let killer = PidKiller::open(path.clone()).await.expect("open");
        let leftovers = killer.leftovers();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        assert_eq!(leftovers[0].label, "leftover");
        assert_eq!(leftovers[0].owner, killer.owner, "adopted");
        assert_eq!(stubborn.exit_status().await.signal(), Some(libc::SIGKILL));
        assert!(killer.list().await.expect("list").is_empty());
        assert!(read_state(&path).expect("state").is_empty());
    }

    #[tokio::test]
    async fn leaves_live_owners_alone_and_adopts_them_when_they_die() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let mut owner = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn owner");
        let owner_identity = ProcessIdentity::of(owner.id()).expect("owner identity");
        let mut foreign = Victim::spawn("echo ready; exec sleep 60");
        let foreign_entry = Entry {
            identity: foreign.identity(),
            pgid: foreign.pid,
            // Past, but not ours to enforce while its owner lives.
            deadline: Some(round_to_ms(SystemTime::now() - Duration::from_secs(1))),
            grace: Duration::from_millis(200),
            label: "foreign".into(),
            owner: owner_identity,
        };
        write_entries(&path, vec![foreign_entry.clone()]);

        let killer = PidKiller::open(path.clone()).await.expect("open");
        assert!(killer.leftovers().is_empty());
        assert!(killer.list().await.expect("list").is_empty());
        let mine = Victim::spawn("echo ready; exec sleep 60");
        killer
            .register(mine.pid, mine.pid, None, Duration::from_secs(1), "mine")
            .await
            .expect("register");
        let saved = read_state(&path).expect("state");
        assert_eq!(saved.len(), 2, "{saved:?}");
        assert!(saved.contains(&foreign_entry));
        assert!(foreign.is_running());

        // The owner dies: our next write takes its entry over and stops it.
        drop(owner.stdin.take());
        owner.wait().expect("reap owner");
        killer
            .set_deadline(mine.pid, soon(600_000))
            .await
            .expect("set deadline");
        assert_eq!(foreign.exit_status().await.signal(), Some(libc::SIGTERM));
        killer.unregister(mine.pid).await.expect("unregister");
    }

    #[tokio::test]
    async fn stops_the_group_of_a_leader_that_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killer = PidKiller::open(state_path(&dir)).await.expect("open");
        let mut events = killer.subscribe();
        // The leader prints the pid of a child in its group, then waits.
        let mut leader = Victim::spawn("sleep 60 & echo $!; wait");
        let pid = leader.pid;
        let member_pid: u32 = leader.first_line.parse().expect("member pid");
        let member = ProcessIdentity::of(member_pid).expect("member identity");
        let _cleanup = KillOnDrop(member);
        killer
            .register(pid, pid, None, Duration::from_millis(300), "leader")
            .await
            .expect("register");
        // The leader dies alone (as with a parent-death signal).
        // Our own unreaped child.
        proc::send_once(Target::Process(pid), Signal::Kill).expect("kill");
        leader.exit_status().await;
        assert!(member.is_alive_same());

        killer.kill_now(pid).await.expect("kill now");
        assert!(matches!(
            next_event(&mut events, pid).await,
            KillEvent::TermSent {
                reason: KillReason::KillNow,
                ..
            }
        ));
        assert!(matches!(
            next_event(&mut events, pid).await,
            KillEvent::Terminated { .. }
        ));
        assert!(!member.is_alive_same());
        assert!(!proc::group_has_members(pid, 0));
    }

    /// SIGKILLs a process that is not our child, if it still runs.
    struct KillOnDrop(ProcessIdentity);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if self.0.is_alive_same() {
                // Identity checked just before.
                let _ = proc::send_once(Target::Process(self.0.pid), Signal::Kill);
            }
        }
    }

    #[tokio::test]
    async fn registration_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killer = PidKiller::open(state_path(&dir)).await.expect("open");
        let victim = Victim::spawn("echo ready; exec sleep 60");
        let pid = victim.pid;
        let grace = Duration::from_secs(1);

        let gone = dead_identity().pid;
        let err = killer
            .register(gone, gone, None, grace, "gone")
            .await
            .expect_err("gone");
        assert!(
            matches!(err, PidKillerError::NoSuchProcess { .. }),
            "{err:?}"
        );
        assert!(err.is_process_gone());
        // A child that exited at once and is not reaped yet (a zombie): the
        // race of a supervisor registering a short-lived command.
        let mut short = Victim::spawn("echo ready");
        let zombie = short.pid;
        let waited = tokio::task::spawn_blocking(move || {
            // WNOWAIT leaves our child unreaped (a zombie) for `exit_status`.
            let pid = rustix::process::Pid::from_raw(zombie as i32).expect("a pid");
            rustix::process::waitid(
                rustix::process::WaitId::Pid(pid),
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
            )
        });
        tokio::time::timeout(BOUND, waited)
            .await
            .expect("the short-lived child exits in time")
            .expect("waitid task")
            .expect("waitid");
        let err = killer
            .register(zombie, zombie, None, grace, "short")
            .await
            .expect_err("zombie");
        assert!(err.is_process_gone(), "{err:?}");
        assert!(short.exit_status().await.success());
        for pgid in [0, 1, proc::own_pgrp()] {
            let err = killer
                .register(pid, pgid, None, grace, "x")
                .await
                .expect_err("bad group");
            assert!(
                matches!(err, PidKillerError::InvalidGroup { .. }),
                "{err:?}"
            );
        }
        let err = killer
            .register(pid, pid + 1, None, grace, "x")
            .await
            .expect_err("wrong group");
        assert!(matches!(err, PidKillerError::WrongGroup { .. }), "{err:?}");
        let err = killer.kill_now(pid).await.expect_err("unknown");
        assert!(matches!(err, PidKillerError::NotRegistered { pid: p } if p == pid));
        let err = killer.set_deadline(pid, None).await.expect_err("unknown");
        assert!(matches!(err, PidKillerError::NotRegistered { .. }));
        killer.unregister(pid).await.expect("idempotent");
    }

    #[tokio::test]
    async fn the_state_file_is_valid_after_each_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        let killer = PidKiller::open(path.clone()).await.expect("open");
        let saved = || {
            let text = std::fs::read_to_string(&path).expect("state file");
            serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
            read_state(&path).expect("state")
        };
        assert!(saved().is_empty());
        let victim = Victim::spawn("echo ready; exec sleep 60");
        let pid = victim.pid;
        let identity = killer
            .register(pid, pid, None, Duration::from_millis(1500), "w#1")
            .await
            .expect("register");
        assert_eq!(identity, victim.identity());
        let entries = saved();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].identity, identity);
        assert_eq!(entries[0].deadline, None);
        assert_eq!(entries[0].grace, Duration::from_millis(1500));
        assert_eq!(entries[0].label, "w#1");
        assert_eq!(entries[0].owner, ProcessIdentity::current().expect("me"));
        assert!(entries[0].is_running());

        let deadline = soon(3_600_000);
        killer.set_deadline(pid, deadline).await.expect("set");
        assert_eq!(saved()[0].deadline, deadline.map(round_to_ms));
        killer.unregister(pid).await.expect("unregister");
        assert!(saved().is_empty());
        killer.unregister(pid).await.expect("again");
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(&dir);
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, "{\"version\": 1, \"entries\": [{\"pid\"").expect("write");
        let err = PidKiller::open(path.clone()).await.expect_err("corrupt");
        assert!(matches!(err, PidKillerError::Corrupt { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(std::error::Error::source(&err).is_some());
        // Left untouched for a human to look at.
        assert!(std::fs::read_to_string(&path)
            .expect("still there")
            .starts_with("{\"version\""));
    }
}
