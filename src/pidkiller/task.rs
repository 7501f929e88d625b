//! The task that owns the registry: deadlines, escalation, persistence.
//!
//! It sleeps until the earliest of: a command from a handle, the next
//! deadline, the end of a grace period, or the exit of a process in its
//! grace period (a pidfd). Commands that arrive together are applied
//! together and saved with one write; their replies are sent after the
//! write, so a caller whose `register` returned knows the entry is on disk.

use super::proc::{self, Delivery, ProcessIdentity, Signal, Target};
use super::store::{self, StateFile};
use super::{Entry, KillEvent, KillReason, PidKillerError};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// Most commands applied (and saved) together.
const MAX_BATCH: usize = 256;

/// A request from a [`super::PidKiller`] handle.
#[derive(Debug)]
pub(crate) enum Command {
    /// Add (or refresh) an entry.
    Register {
        entry: Entry,
        reply: oneshot::Sender<Result<ProcessIdentity, PidKillerError>>,
    },
    /// The process ended; forget it.
    Unregister {
        pid: u32,
        reply: oneshot::Sender<Result<(), PidKillerError>>,
    },
    /// Move or clear a deadline.
    SetDeadline {
        pid: u32,
        deadline: Option<SystemTime>,
        reply: oneshot::Sender<Result<(), PidKillerError>>,
    },
    /// Start the escalation now.
    KillNow {
        pid: u32,
        reply: oneshot::Sender<Result<(), PidKillerError>>,
    },
    /// A copy of the entries.
    List { reply: oneshot::Sender<Vec<Entry>> },
}

/// What `/proc` says about an entry right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The process, or what remains of its group, runs: signal this.
    Alive(Target),
    /// Nothing of it is left.
    Gone,
    /// The pid belongs to another process now: never signal it.
    Reused,
}

/// Identity-checks an entry and says what a signal should go to.
///
/// - The registered process runs with its recorded start time: its group if
///   it is still in it, else the process alone.
/// - The pid belongs to a process with another start time: [`Probe::Reused`].
///   (While a group has members its number cannot be given to a new
///   process, so for a group led by the registered pid this also means the
///   group is gone.)
/// - The process exited (gone or a zombie): if it led the group, the group
///   may live on (children that ignored SIGTERM, or a leader killed by its
///   parent-death signal). Members started no earlier than the leader are
///   signalled through the group; a group we cannot tie to the registered
///   leader is left alone.
pub(crate) fn probe(entry: &Entry) -> Probe {
    let id = entry.identity;
    match proc::read_stat(id.pid) {
        Ok(stat) if stat.start_time != id.start_time => Probe::Reused,
        Ok(stat) if stat.is_running() => {
            if stat.pgrp == entry.pgid {
                Probe::Alive(Target::Group(entry.pgid))
            } else {
                Probe::Alive(Target::Process(id.pid))
            }
        }
        // A zombie, or no such pid any more.
        Ok(_) | Err(_) => {
            if entry.pgid == id.pid && proc::group_has_members(entry.pgid, id.start_time) {
                Probe::Alive(Target::Group(entry.pgid))
            } else {
                Probe::Gone
            }
        }
    }
}

/// Where an entry is in its life.
#[derive(Debug)]
enum Phase {
    /// Waiting for its deadline (if any).
    Armed,
    /// SIGTERM went out; SIGKILL at `kill_at` unless it ends before.
    Terminating {
        /// End of the grace period.
        kill_at: Instant,
        /// The pidfd watcher that reports an early exit, if any.
        watcher: Option<AbortHandle>,
    },
    /// SIGKILL could not be delivered: kept (and saved, so a later run
    /// tries again), but not retried by this run unless asked.
    Failed,
}

#[derive(Debug)]
struct Tracked {
    entry: Entry,
    phase: Phase,
}

/// A reply held back until the change it answers is saved.
#[derive(Debug)]
enum Deferred {
    Register(
        oneshot::Sender<Result<ProcessIdentity, PidKillerError>>,
        ProcessIdentity,
    ),
    Unit(oneshot::Sender<Result<(), PidKillerError>>),
}

/// The state owned by the task.
pub(crate) struct Registry {
    path: PathBuf,
    me: ProcessIdentity,
    entries: HashMap<u32, Tracked>,
    events_tx: broadcast::Sender<KillEvent>,
    /// pidfd watchers of processes in their grace period; each yields the
    /// identity it watched.
    watchers: JoinSet<ProcessIdentity>,
    /// In-memory state differs from the file.
    dirty: bool,
    deferred: Vec<Deferred>,
}

impl Registry {
    pub(crate) fn new(
        path: PathBuf,
        me: ProcessIdentity,
        own: Vec<Entry>,
        events_tx: broadcast::Sender<KillEvent>,
    ) -> Self {
        let entries = own
            .into_iter()
            .map(|entry| {
                (
                    entry.identity.pid,
                    Tracked {
                        entry,
                        phase: Phase::Armed,
                    },
                )
            })
            .collect();
        Self {
            path,
            me,
            entries,
            events_tx,
            watchers: JoinSet::new(),
            dirty: false,
            deferred: Vec::new(),
        }
    }

    /// Runs until every handle is gone and no escalation is under way.
    /// `leftovers` (already in the file, owned by us) are stopped first.
    pub(crate) async fn run(mut self, leftovers: Vec<Entry>, mut cmd_rx: mpsc::Receiver<Command>) {
        self.adopt(leftovers).await;
        self.flush().await;
        let mut accepting = true;
        loop {
            if !accepting && !self.escalating() {
                break;
            }
            let wake = self.next_wake(accepting);
            tokio::select! {
                cmd = cmd_rx.recv(), if accepting => match cmd {
                    Some(cmd) => {
                        self.handle(cmd).await;
                        // Apply what else is queued (bounded, so timers are
                        // not starved), then save once.
                        for _ in 1..MAX_BATCH {
                            let Ok(cmd) = cmd_rx.try_recv() else { break };
                            self.handle(cmd).await;
                        }
                    }
                    None => accepting = false,
                },
                () = sleep_until(wake) => self.on_timer(accepting).await,
                Some(joined) = self.watchers.join_next(), if !self.watchers.is_empty() => {
                    // An aborted watcher belongs to an entry that is gone.
                    if let Ok(identity) = joined {
                        self.on_exit(identity);
                    }
                }
            }
            self.flush().await;
        }
        tracing::debug!(state_file = %self.path.display(), "pid killer stopped");
    }

    /// Whether some escalation must still be seen through.
    fn escalating(&self) -> bool {
        self.entries
            .values()
            .any(|t| matches!(t.phase, Phase::Terminating { .. }))
    }

    /// The next moment something is due. Deadlines only count while
    /// handles exist: without them the task only finishes escalations, and
    /// the file keeps the deadlines for the next run.
    fn next_wake(&self, accepting: bool) -> Option<Instant> {
        let now_sys = SystemTime::now();
        let now = Instant::now();
        self.entries
            .values()
            .filter_map(|t| match t.phase {
                Phase::Armed if accepting => t
                    .entry
                    .deadline
                    // Out of range means never, in practice.
                    .and_then(|deadline| {
                        now.checked_add(deadline.duration_since(now_sys).unwrap_or_default())
                    }),
                Phase::Terminating { kill_at, .. } => Some(kill_at),
                Phase::Armed | Phase::Failed => None,
            })
            .min()
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Register { entry, reply } => {
                let identity = entry.identity;
                match self.entries.get_mut(&identity.pid) {
                    Some(tracked) if tracked.entry.identity == identity => {
                        // Refresh; an escalation under way continues.
                        tracked.entry.pgid = entry.pgid;
                        tracked.entry.deadline = entry.deadline;
                        tracked.entry.grace = entry.grace;
                        tracked.entry.label = entry.label;
                        if matches!(tracked.phase, Phase::Failed) {
                            tracked.phase = Phase::Armed;
                        }
                    }
                    _ => {
                        // A stale entry for the same pid (its process ended
                        // without an unregister) is replaced.
                        self.remove(identity.pid);
                        self.entries.insert(
                            identity.pid,
                            Tracked {
                                entry,
                                phase: Phase::Armed,
                            },
                        );
                    }
                }
                self.dirty = true;
                self.deferred.push(Deferred::Register(reply, identity));
            }
            Command::Unregister { pid, reply } => {
                match self.entries.get(&pid).map(|t| &t.phase) {
                    // The group may still have members: finish the job.
                    Some(Phase::Terminating { .. }) => {}
                    Some(Phase::Armed | Phase::Failed) => self.remove(pid),
                    None => {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
                self.deferred.push(Deferred::Unit(reply));
            }
            Command::SetDeadline {
                pid,
                deadline,
                reply,
            } => {
                let Some(tracked) = self.entries.get_mut(&pid) else {
                    let _ = reply.send(Err(PidKillerError::NotRegistered { pid }));
                    return;
                };
                tracked.entry.deadline = deadline;
                if matches!(tracked.phase, Phase::Failed) {
                    tracked.phase = Phase::Armed;
                }
                self.dirty = true;
                self.deferred.push(Deferred::Unit(reply));
            }
            Command::KillNow { pid, reply } => {
                match self.entries.get(&pid).map(|t| &t.phase) {
                    Some(Phase::Terminating { .. }) => {}
                    Some(Phase::Armed | Phase::Failed) => {
                        self.escalate(pid, KillReason::KillNow).await;
                    }
                    None => {
                        let _ = reply.send(Err(PidKillerError::NotRegistered { pid }));
                        return;
                    }
                }
                self.deferred.push(Deferred::Unit(reply));
            }
            Command::List { reply } => {
                let mut entries: Vec<Entry> =
                    self.entries.values().map(|t| t.entry.clone()).collect();
                entries.sort_by_key(|e| e.identity.pid);
                let _ = reply.send(entries);
            }
        }
    }

    async fn on_timer(&mut self, accepting: bool) {
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let mut due_deadline = Vec::new();
        let mut due_kill = Vec::new();
        for (pid, tracked) in &self.entries {
            match tracked.phase {
                Phase::Armed
                    if accepting && tracked.entry.deadline.is_some_and(|d| d <= now_sys) =>
                {
                    due_deadline.push(*pid);
                }
                Phase::Terminating { kill_at, .. } if kill_at <= now => due_kill.push(*pid),
                _ => {}
            }
        }
        for pid in due_deadline {
            self.escalate(pid, KillReason::Deadline).await;
        }
        for pid in due_kill {
            self.finish(pid).await;
        }
    }

    /// Takes over leftovers of dead owners and starts stopping them.
    async fn adopt(&mut self, leftovers: Vec<Entry>) {
        for entry in leftovers {
            let pid = entry.identity.pid;
            if self.entries.contains_key(&pid) {
                continue;
            }
            self.entries.insert(
                pid,
                Tracked {
                    entry,
                    phase: Phase::Armed,
                },
            );
            self.escalate(pid, KillReason::Leftover).await;
        }
    }

    /// First step: identity check, SIGTERM, then the grace period.
    async fn escalate(&mut self, pid: u32, reason: KillReason) {
        let Some(entry) = self.entries.get(&pid).map(|t| t.entry.clone()) else {
            return;
        };
        let target = match probe(&entry) {
            Probe::Alive(target) => target,
            Probe::Gone => {
                tracing::debug!(pid, label = %entry.label, ?reason, "already gone");
                self.remove(pid);
                self.emit(KillEvent::Gone { entry });
                return;
            }
            Probe::Reused => {
                self.identity_changed(entry);
                return;
            }
        };
        // Opened before the signal: a process that dies at once must still
        // be seen exiting (there is none to open when only its group is left).
        let exit_fd = proc::pidfd_open(entry.identity).ok();
        match proc::signal(target, Signal::Term, &entry.label).await {
            Ok(Delivery::Sent) => {
                tracing::info!(
                    pid, %target, label = %entry.label, ?reason,
                    grace_ms = crate::protocol::millis::of(entry.grace),
                    "sent SIGTERM"
                );
                self.start_grace(&entry, exit_fd);
                self.emit(KillEvent::TermSent { entry, reason });
            }
            Ok(Delivery::NoSuchProcess) => {
                self.remove(pid);
                self.emit(KillEvent::Gone { entry });
            }
            Err(error) => {
                // Not a success: say so, and still try SIGKILL after the
                // grace period.
                self.start_grace(&entry, exit_fd);
                self.emit(KillEvent::SignalFailed {
                    entry,
                    signal: Signal::Term,
                    error: Arc::new(error),
                });
            }
        }
    }

    /// Starts the grace period; `exit_fd` (a pidfd of the registered
    /// process) ends it early when the process exits.
    fn start_grace(&mut self, entry: &Entry, exit_fd: Option<OwnedFd>) {
        let watcher = exit_fd.map(|fd| {
            let identity = entry.identity;
            self.watchers.spawn(async move {
                if let Err(err) = proc::wait_exit(fd).await {
                    // Then the grace period just runs to its end.
                    tracing::debug!(pid = identity.pid, cause = %err, "cannot watch exit");
                    std::future::pending::<()>().await;
                }
                identity
            })
        });
        if let Some(tracked) = self.entries.get_mut(&entry.identity.pid) {
            tracked.phase = Phase::Terminating {
                kill_at: grace_end(entry),
                watcher,
            };
        } else if let Some(watcher) = watcher {
            watcher.abort();
        }
    }

    /// The registered process exited during its grace period: done, unless
    /// its group still has members (then SIGKILL at the end of the grace).
    fn on_exit(&mut self, identity: ProcessIdentity) {
        let Some(tracked) = self.entries.get_mut(&identity.pid) else {
            return;
        };
        if tracked.entry.identity != identity {
            return;
        }
        if let Phase::Terminating { watcher, .. } = &mut tracked.phase {
            *watcher = None;
        } else {
            return;
        }
        if probe(&tracked.entry) == Probe::Gone {
            let entry = tracked.entry.clone();
            self.terminated(entry);
        }
    }

    /// Second step, at the end of the grace period.
    async fn finish(&mut self, pid: u32) {
        let Some(entry) = self.entries.get(&pid).map(|t| t.entry.clone()) else {
            return;
        };
        let target = match probe(&entry) {
            Probe::Alive(target) => target,
            Probe::Gone => return self.terminated(entry),
            Probe::Reused => return self.identity_changed(entry),
        };
        match proc::signal(target, Signal::Kill, &entry.label).await {
            Ok(Delivery::Sent) => {
                tracing::warn!(pid, %target, label = %entry.label, "grace period over: sent SIGKILL");
                self.remove(pid);
                self.emit(KillEvent::Killed { entry });
            }
            Ok(Delivery::NoSuchProcess) => self.terminated(entry),
            Err(error) => {
                tracing::error!(
                    pid, %target, label = %entry.label, cause = %error,
                    "cannot kill: the process may still run"
                );
                self.abort_watcher(pid);
                if let Some(tracked) = self.entries.get_mut(&pid) {
                    tracked.phase = Phase::Failed;
                }
                self.emit(KillEvent::SignalFailed {
                    entry,
                    signal: Signal::Kill,
                    error: Arc::new(error),
                });
            }
        }
    }

    fn terminated(&mut self, entry: Entry) {
        tracing::info!(pid = entry.identity.pid, label = %entry.label, "ended after SIGTERM");
        self.remove(entry.identity.pid);
        self.emit(KillEvent::Terminated { entry });
    }

    fn identity_changed(&mut self, entry: Entry) {
        tracing::warn!(
            pid = entry.identity.pid, label = %entry.label,
            recorded_start = entry.identity.start_time,
            "pid now belongs to another process: not signalled"
        );
        self.remove(entry.identity.pid);
        self.emit(KillEvent::IdentityChanged { entry });
    }

    fn abort_watcher(&mut self, pid: u32) {
        if let Some(Tracked {
            phase: Phase::Terminating { watcher, .. },
            ..
        }) = self.entries.get_mut(&pid)
        {
            if let Some(watcher) = watcher.take() {
                watcher.abort();
            }
        }
    }

    fn remove(&mut self, pid: u32) {
        self.abort_watcher(pid);
        if self.entries.remove(&pid).is_some() {
            self.dirty = true;
        }
    }

    fn emit(&self, event: KillEvent) {
        // No subscriber is fine.
        let _ = self.events_tx.send(event);
    }

    /// Saves the entries if they changed, takes over leftovers that the
    /// merge found, and sends the replies held back.
    async fn flush(&mut self) {
        let mut result = Ok(());
        while self.dirty {
            self.dirty = false;
            let path = self.path.clone();
            let me = self.me;
            let ours: Vec<Entry> = self.entries.values().map(|t| t.entry.clone()).collect();
            let saved = file_work(move |wait| save(&path, me, ours.clone(), wait)).await;
            match saved {
                Ok(orphans) => self.adopt(orphans).await,
                Err(err) => {
                    tracing::warn!(
                        state_file = %self.path.display(), cause = %err,
                        "cannot save the pid registry; will try again at the next change"
                    );
                    self.dirty = true;
                    result = Err(Arc::new(err));
                    break;
                }
            }
        }
        for deferred in self.deferred.drain(..) {
            let saved = result.clone().map_err(|source| PidKillerError::NotSaved {
                path: self.path.clone(),
                source,
            });
            // A caller that stopped waiting is fine.
            match deferred {
                Deferred::Register(reply, identity) => {
                    let _ = reply.send(saved.map(|()| identity));
                }
                Deferred::Unit(reply) => {
                    let _ = reply.send(saved);
                }
            }
        }
    }
}

/// End of the grace period of `entry` started now (a grace too long to
/// represent waits for about a century).
fn grace_end(entry: &Entry) -> Instant {
    let now = Instant::now();
    now.checked_add(entry.grace)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400))
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(wake) => tokio::time::sleep_until(wake).await,
        None => std::future::pending().await,
    }
}

/// Read-modify-write of the state file under its lock (waited for if
/// `wait`, see [`open`]): entries of live foreign owners are kept, our
/// entries replaced by `ours`, and entries of dead owners that still run
/// are taken over and returned.
fn save(
    path: &Path,
    me: ProcessIdentity,
    ours: Vec<Entry>,
    wait: bool,
) -> Result<Vec<Entry>, PidKillerError> {
    let _lock = store::lock(path, wait)?;
    let loaded = store::load(path)?;
    let merged = store::merge(loaded.state.entries, me);
    let orphans: Vec<Entry> = merged
        .orphans
        .into_iter()
        .filter(|o| !ours.iter().any(|e| e.identity.pid == o.identity.pid))
        .collect();
    let mut entries = merged.foreign;
    entries.extend(ours);
    entries.extend(orphans.iter().cloned());
    store::write(
        path,
        &StateFile {
            version: store::STATE_VERSION,
            boot_id: loaded.state.boot_id,
            entries,
        },
        loaded.text.as_deref(),
    )?;
    Ok(orphans)
}

/// Runs the registry's file work (a lock, a read, maybe a write: well
/// under a millisecond): on the blocking pool of a multi-threaded
/// runtime, but in place on a current-thread one (an agent's), whose one
/// thread would only wait for the pool's, after starting it. `work` is
/// given whether it may wait for the file's lock: in place it may not (a
/// lock held long by another process, stopped or on a slow file system,
/// would stall everything on that thread), and a lock that is taken
/// sends the work to the pool after all.
///
/// # Errors
/// `work`'s, and [`PidKillerError::Closed`] if the pool's task failed.
pub(crate) async fn file_work<T, F>(work: F) -> Result<T, PidKillerError>
where
    T: Send + 'static,
    F: Fn(bool) -> Result<T, PidKillerError> + Send + 'static,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        match work(false) {
            Err(PidKillerError::Lock { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock => {}
            done => return done,
        }
    }
    tokio::task::spawn_blocking(move || work(true))
        .await
        .unwrap_or(Err(PidKillerError::Closed))
}

/// What [`open`] found in the file.
pub(crate) struct Opened {
    pub(crate) me: ProcessIdentity,
    pub(crate) own: Vec<Entry>,
    pub(crate) leftovers: Vec<Entry>,
}

/// Loads and sorts the state file under its lock, and writes it back
/// without what is gone (blocking; waiting for the lock if `wait`, else
/// failing with a [`PidKillerError::Lock`] of kind `WouldBlock`).
pub(crate) fn open(path: &Path, wait: bool) -> Result<Opened, PidKillerError> {
    let me = store::me()?;
    let _lock = store::lock(path, wait)?;
    let loaded = store::load(path)?;
    let merged = store::merge(loaded.state.entries, me);
    let own: Vec<Entry> = merged
        .own
        .into_iter()
        .filter(|entry| match probe(entry) {
            Probe::Alive(_) => true,
            Probe::Gone => false,
            Probe::Reused => {
                tracing::warn!(
                    pid = entry.identity.pid, label = %entry.label,
                    "dropping entry: pid now belongs to another process"
                );
                false
            }
        })
        .collect();
    let mut entries = merged.foreign;
    entries.extend(own.iter().cloned());
    entries.extend(merged.orphans.iter().cloned());
    store::write(
        path,
        &StateFile {
            version: store::STATE_VERSION,
            boot_id: loaded.state.boot_id,
            entries,
        },
        loaded.text.as_deref(),
    )?;
    Ok(Opened {
        me,
        own,
        leftovers: merged.orphans,
    })
}
