//! A running herd as operators and embedding programs see it: the status
//! board fed by instance events, the [`Herd`] handle (status, suspend,
//! resume, restart, reload, stop), the [`Events`] callbacks, and the
//! [`Launcher`] that runs a config with them.

use super::launcher::RunReport;
use super::request::{HerdError, Reply, Request};
use crate::config::Config;
use crate::log::{InstanceLabel, LogSink};
use crate::protocol::control::{GroupStatus, HerdStatus, InstanceState, InstanceStatus};
use crate::protocol::slave::QueueProgress;
use crate::supervise::instance::{EventKind, InstanceEnd, InstanceEvent};
use crate::supervise::shutdown::Shutdown;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// How often [`Events::check`] is called while the herd runs.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Callbacks of a running herd, for programs that embed the master (the
/// original's EventsInterface). Every method has an empty default.
///
/// They are called in order from one task, for local and remote
/// instances alike; keep them short (hand long work to a thread). The
/// [`Herd`] they get can suspend, resume, restart and stop: those calls
/// only ask, and return at once.
///
/// ```no_run
/// use taskherd::master::{Events, Herd, InstanceLabel, Launcher};
///
/// struct SuspendWebOnStart;
///
/// impl Events for SuspendWebOnStart {
///     fn process_started(&self, herd: &Herd, instance: &InstanceLabel, pid: u32) {
///         println!("{instance} runs as pid {pid}");
///         if instance.group == "web" {
///             herd.suspend("web");
///         }
///     }
/// }
///
/// let config = taskherd::config::Config::load("herd.toml".as_ref()).expect("valid config");
/// let report = Launcher::new(config)
///     .events(SuspendWebOnStart)
///     .run_blocking()
///     .expect("master started");
/// assert!(report.success());
/// ```
#[allow(unused_variables)]
pub trait Events: Send + Sync + 'static {
    /// The herd is about to start its instances.
    fn starting(&self, herd: &Herd) {}
    /// Every instance of the config was handed to its supervisor.
    fn started(&self, herd: &Herd) {}
    /// Called every second while the herd runs.
    fn check(&self, herd: &Herd) {}
    /// The herd has ended: every instance is done.
    fn stopped(&self, report: &RunReport) {}
    /// An instance's process is about to be spawned.
    fn process_created(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// An instance's process runs.
    fn process_started(&self, herd: &Herd, instance: &InstanceLabel, pid: u32) {}
    /// An instance gave no sign of life within its timeout.
    fn process_timed_out(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// An instance's process ended (`how`: "exited with code 0", ...).
    fn process_stopped(&self, herd: &Herd, instance: &InstanceLabel, how: &str) {}
    /// An instance gave a sign of life (at most every few seconds).
    fn process_seen(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// Every event, including those above, for programs that want all.
    fn event(&self, herd: &Herd, instance: &InstanceLabel, event: &EventKind) {}
}

/// What the run loop is asked on its own queue: operators' requests (from
/// a [`Herd`] handle; with a reply when the asker waits), and the steps of
/// rolling changes.
#[derive(Debug)]
pub(crate) enum HerdCommand {
    /// An operator's request.
    Ask(Request, Option<Reply>),
    /// A step of a rolling change: start these instances.
    Start(super::plan::Plan),
    /// A step of a rolling change: command one instance.
    Instance(u32, crate::supervise::instance::InstanceCommand),
}

/// A handle on a running herd: its status, and the operator's actions.
///
/// Cheap to clone. Methods that act (suspend, ...) ask the run loop and
/// return at once; the `_and_wait` forms wait until it is done.
#[derive(Debug, Clone)]
pub struct Herd {
    board: Board,
    commands: mpsc::UnboundedSender<HerdCommand>,
}

impl Herd {
    pub(crate) fn new(board: Board, commands: mpsc::UnboundedSender<HerdCommand>) -> Self {
        Herd { board, commands }
    }

    /// Every group and instance, with their state.
    pub fn status(&self) -> HerdStatus {
        self.board.status()
    }

    /// Stops a group's instances and keeps them stopped (the original's
    /// suspendGroup).
    pub fn suspend(&self, group: &str) {
        self.tell(Request::Suspend {
            group: group.to_string(),
        });
    }

    /// Starts a suspended group's instances again (resumeGroup).
    pub fn resume(&self, group: &str) {
        self.tell(Request::Resume {
            group: group.to_string(),
        });
    }

    /// Restarts a group's instances one at a time.
    pub fn restart(&self, group: &str) {
        self.tell(Request::Restart {
            group: group.to_string(),
        });
    }

    /// Re-reads the config file and applies the differences.
    pub fn reload(&self) {
        self.tell(Request::Reload);
    }

    /// Stops the whole herd cleanly.
    pub fn stop(&self, reason: &str) {
        self.tell(Request::Stop {
            kill: false,
            reason: reason.to_string(),
        });
    }

    /// Suspends a group and waits until its instances are stopped.
    ///
    /// # Errors
    /// An unknown group, or a herd that is ending.
    pub async fn suspend_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.ask(Request::Suspend {
            group: group.to_string(),
        })
        .await
    }

    /// Resumes a group and waits until its instances run again.
    ///
    /// # Errors
    /// An unknown group, or a herd that is ending.
    pub async fn resume_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.ask(Request::Resume {
            group: group.to_string(),
        })
        .await
    }

    /// Restarts a group, one instance at a time, each once the previous one
    /// runs again; returns when the last one runs.
    ///
    /// # Errors
    /// An unknown group, an instance that did not come back, or a herd
    /// that is ending.
    pub async fn restart_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.ask(Request::Restart {
            group: group.to_string(),
        })
        .await
    }

    /// Reloads the config and waits until the changes are applied.
    ///
    /// # Errors
    /// An invalid config (with every error; the herd is untouched), or a
    /// herd that is ending.
    pub async fn reload_and_wait(&self) -> Result<String, HerdError> {
        self.ask(Request::Reload).await
    }

    /// Asks without waiting for the answer.
    fn tell(&self, request: Request) {
        let _ = self.commands.send(HerdCommand::Ask(request, None));
    }

    async fn ask(&self, request: Request) -> Result<String, HerdError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.commands
            .send(HerdCommand::Ask(request, Some(Reply::Handle(reply_tx))))
            .map_err(|_| HerdError::Ending)?;
        let answer = reply_rx.await.map_err(|_| HerdError::Ending)??;
        Ok(answer.into_message())
    }
}

/// The status of every instance, kept up to date by the events.
#[derive(Debug, Clone)]
pub(crate) struct Board {
    inner: Arc<Mutex<BoardState>>,
    changed: Arc<watch::Sender<u64>>,
}

#[derive(Debug)]
struct BoardState {
    config: String,
    started: SystemTime,
    /// Group names in config order.
    groups: Vec<String>,
    suspended: BTreeMap<String, bool>,
    queues: BTreeMap<String, QueueProgress>,
    instances: BTreeMap<u32, Entry>,
    /// Instances that left the config: forgotten once they end.
    retired: std::collections::BTreeSet<u32>,
    /// Groups that left the config: forgotten once their last instance is.
    leaving: std::collections::BTreeSet<String>,
    /// Every id ever retired.
    retired_ever: std::collections::BTreeSet<u32>,
}

impl BoardState {
    fn drop_group_if_gone(&mut self, group: &str) {
        let listed = self.instances.values().any(|e| e.label.group == group);
        if !listed && self.leaving.remove(group) {
            self.groups.retain(|g| g != group);
            self.suspended.remove(group);
            self.queues.remove(group);
        }
    }
}

/// One instance on the board.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) label: Arc<InstanceLabel>,
    pub(crate) state: InstanceState,
    pub(crate) pid: Option<u32>,
    pub(crate) since: Option<SystemTime>,
    /// Processes started so far.
    pub(crate) starts: u32,
    pub(crate) last_exit: Option<String>,
    pub(crate) seen: Option<SystemTime>,
}

impl Board {
    pub(crate) fn new(config: &Config) -> Self {
        Board {
            inner: Arc::new(Mutex::new(BoardState {
                config: config.source.display().to_string(),
                started: SystemTime::now(),
                groups: config.groups.iter().map(|g| g.name.clone()).collect(),
                suspended: BTreeMap::new(),
                queues: BTreeMap::new(),
                instances: BTreeMap::new(),
                retired: Default::default(),
                leaving: Default::default(),
                retired_ever: Default::default(),
            })),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BoardState> {
        // A panic while holding the lock leaves plain data behind: keep
        // serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Changes each time the board does (the status line redraws then).
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Adds instances (pending) and the config's group order.
    pub(crate) fn add(&self, labels: impl IntoIterator<Item = Arc<InstanceLabel>>) {
        let mut state = self.lock();
        for label in labels {
            if !state.groups.contains(&label.group) {
                state.groups.push(label.group.clone());
            }
            state.instances.insert(
                label.id,
                Entry {
                    label,
                    state: InstanceState::Pending,
                    pid: None,
                    since: None,
                    starts: 0,
                    last_exit: None,
                    seen: None,
                },
            );
        }
        drop(state);
        self.bump();
    }

    /// Forgets instances that left the config, each once it has ended.
    pub(crate) fn retire(&self, ids: &[u32]) {
        let mut state = self.lock();
        state.retired_ever.extend(ids);
        for id in ids {
            let Some(entry) = state.instances.get(id) else {
                continue;
            };
            let group = entry.label.group.clone();
            if is_final(entry.state) {
                state.instances.remove(id);
                state.drop_group_if_gone(&group);
            } else {
                state.retired.insert(*id);
            }
        }
        drop(state);
        self.bump();
    }

    /// Forgets a group that left the config, once its instances ended.
    pub(crate) fn retire_group(&self, group: &str) {
        let ids: Vec<u32> = {
            let mut state = self.lock();
            state.leaving.insert(group.to_string());
            state
                .instances
                .values()
                .filter(|e| e.label.group == group)
                .map(|e| e.label.id)
                .collect()
        };
        self.retire(&ids);
        let mut state = self.lock();
        state.drop_group_if_gone(group);
    }

    /// Orders the groups as the (reloaded) config does; groups that left
    /// it stay listed after them while they have instances.
    pub(crate) fn set_order(&self, groups: Vec<String>) {
        let mut state = self.lock();
        let mut order = groups;
        for group in &state.groups {
            if !order.contains(group) {
                order.push(group.clone());
            }
        }
        state.groups = order;
        drop(state);
        self.bump();
    }

    pub(crate) fn set_suspended(&self, group: &str, suspended: bool) {
        self.lock().suspended.insert(group.to_string(), suspended);
        self.bump();
    }

    /// Applies an event; returns the instance's label, if known.
    pub(crate) fn apply(&self, event: &InstanceEvent) -> Option<Arc<InstanceLabel>> {
        let at = UNIX_EPOCH + Duration::from_millis(event.time_ms);
        let mut state = self.lock();
        let entry = state.instances.get_mut(&event.id)?;
        let label = entry.label.clone();
        match &event.kind {
            EventKind::Created => {}
            EventKind::Started { pid } => {
                entry.state = InstanceState::Running;
                entry.pid = Some(*pid);
                entry.since = Some(at);
                entry.seen = Some(at);
                entry.starts += 1;
            }
            EventKind::Seen => entry.seen = Some(at),
            EventKind::TimedOut | EventKind::Stopping => entry.state = InstanceState::Stopping,
            EventKind::Exited { how, .. } => {
                entry.pid = None;
                entry.since = None;
                entry.last_exit = Some(how.clone());
                entry.state = InstanceState::Backoff;
            }
            EventKind::Backoff { .. } => entry.state = InstanceState::Backoff,
            EventKind::Suspended => entry.state = InstanceState::Suspended,
            EventKind::Progress { progress } => {
                state.queues.insert(label.group.clone(), *progress);
            }
            EventKind::Ended { end } => {
                entry.pid = None;
                entry.since = None;
                entry.state = match end {
                    InstanceEnd::Completed => InstanceState::Completed,
                    InstanceEnd::Failed { .. } => InstanceState::Failed,
                    InstanceEnd::Stopped { .. } => InstanceState::Stopped,
                    InstanceEnd::Lost { .. } => InstanceState::Lost,
                };
                if state.retired.remove(&event.id) {
                    state.instances.remove(&event.id);
                    state.drop_group_if_gone(&label.group);
                }
            }
        }
        drop(state);
        self.bump();
        Some(label)
    }

    /// Ids of a group's instances still supervised, in order.
    pub(crate) fn live_ids(&self, group: &str) -> Vec<u32> {
        self.lock()
            .instances
            .values()
            .filter(|e| e.label.group == group && !is_final(e.state))
            .map(|e| e.label.id)
            .collect()
    }

    /// Ids of all of a group's instances on the board, ended ones too.
    pub(crate) fn all_ids(&self, group: &str) -> Vec<u32> {
        self.lock()
            .instances
            .values()
            .filter(|e| e.label.group == group)
            .map(|e| e.label.id)
            .collect()
    }

    /// Whether an operator suspended `group`.
    pub(crate) fn is_suspended(&self, group: &str) -> bool {
        self.lock().suspended.get(group).copied().unwrap_or(false)
    }

    /// Every instance a reload retired: their ends are not the run's.
    pub(crate) fn retired_ever(&self) -> std::collections::BTreeSet<u32> {
        self.lock().retired_ever.clone()
    }

    /// The last counts each queue group's feeder reported, by group.
    pub(crate) fn queue_counts(&self) -> BTreeMap<String, QueueProgress> {
        self.lock().queues.clone()
    }

    /// Whether the board knows `group`.
    pub(crate) fn has_group(&self, group: &str) -> bool {
        self.lock().groups.iter().any(|g| g == group)
    }

    /// A copy of one instance's entry.
    pub(crate) fn entry(&self, id: u32) -> Option<Entry> {
        self.lock().instances.get(&id).cloned()
    }

    /// Waits until `done` holds for the board, or `limit` passes; returns
    /// whether it holds.
    pub(crate) async fn wait_until(
        &self,
        limit: Duration,
        mut done: impl FnMut(&Board) -> bool,
    ) -> bool {
        let mut changed = self.changed.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                if done(self) {
                    return;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        waited.is_ok()
    }

    pub(crate) fn status(&self) -> HerdStatus {
        let state = self.lock();
        let now = SystemTime::now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let since =
            |t: Option<SystemTime>| t.map(|t| ms(now.duration_since(t).unwrap_or_default()));
        let groups = state
            .groups
            .iter()
            .map(|name| GroupStatus {
                name: name.clone(),
                suspended: state.suspended.get(name).copied().unwrap_or(false),
                instances: state
                    .instances
                    .values()
                    .filter(|e| &e.label.group == name)
                    .map(|e| InstanceStatus {
                        id: e.label.id,
                        group_id: e.label.group_id,
                        host: e.label.host.clone(),
                        command: e.label.command.clone(),
                        state: e.state,
                        pid: e.pid,
                        uptime_ms: since(e.since),
                        restarts: e.starts.saturating_sub(1),
                        last_exit: e.last_exit.clone(),
                        seen_ms_ago: since(e.seen).filter(|_| e.pid.is_some()),
                    })
                    .collect(),
                queue: state.queues.get(name).cloned(),
            })
            .collect();
        HerdStatus {
            config: state.config.clone(),
            pid: std::process::id(),
            uptime_ms: ms(now.duration_since(state.started).unwrap_or_default()),
            groups,
        }
    }
}

/// States an instance never leaves.
pub(crate) fn is_final(state: InstanceState) -> bool {
    matches!(
        state,
        InstanceState::Completed
            | InstanceState::Failed
            | InstanceState::Stopped
            | InstanceState::Lost
    )
}

/// Applies every instance event to the board and calls the user's
/// callbacks, in order, until every sender is gone.
///
/// [`Events::started`] is called from here too when `started` fires, so
/// that every callback runs on this one task ([`Events::starting`] is
/// called before this task exists).
pub(crate) async fn pump_events(
    mut events_rx: mpsc::UnboundedReceiver<InstanceEvent>,
    herd: Herd,
    callbacks: Option<Arc<dyn Events>>,
    mut started: oneshot::Receiver<()>,
) {
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut started_called = false;
    loop {
        tokio::select! {
            fired = &mut started, if !started_called => {
                started_called = true;
                if let (Ok(()), Some(callbacks)) = (fired, &callbacks) {
                    callbacks.started(&herd);
                }
            }
            event = events_rx.recv() => {
                let Some(event) = event else { return };
                let Some(label) = herd.board.apply(&event) else { continue };
                if let Some(callbacks) = &callbacks {
                    call(callbacks.as_ref(), &herd, &label, &event.kind);
                }
            }
            _ = check.tick(), if callbacks.is_some() => {
                if let Some(callbacks) = &callbacks {
                    callbacks.check(&herd);
                }
            }
        }
    }
}

fn call(callbacks: &dyn Events, herd: &Herd, label: &InstanceLabel, kind: &EventKind) {
    match kind {
        EventKind::Created => callbacks.process_created(herd, label),
        EventKind::Started { pid } => callbacks.process_started(herd, label, *pid),
        EventKind::TimedOut => callbacks.process_timed_out(herd, label),
        EventKind::Exited { how, .. } => callbacks.process_stopped(herd, label, how),
        EventKind::Seen => callbacks.process_seen(herd, label),
        _ => {}
    }
    callbacks.event(herd, label, kind);
}

/// Runs a config with events callbacks and a control socket: the master
/// as a library.
///
/// ```no_run
/// use taskherd::master::Launcher;
/// let config = taskherd::config::Config::load("herd.toml".as_ref()).expect("valid config");
/// let report = Launcher::new(config).run_blocking().expect("master started");
/// std::process::exit(if report.success() { 0 } else { 1 });
/// ```
pub struct Launcher {
    pub(crate) config: Config,
    pub(crate) events: Option<Arc<dyn Events>>,
    pub(crate) control: Option<super::control::ControlSocket>,
    pub(crate) reload_on_sighup: bool,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("config", &self.config.source)
            .field("events", &self.events.is_some())
            .field(
                "control",
                &self.control.as_ref().map(|c| c.path().to_path_buf()),
            )
            .finish()
    }
}

impl Launcher {
    /// A launcher for `config`, without callbacks or control socket.
    pub fn new(config: Config) -> Self {
        Launcher {
            config,
            events: None,
            control: None,
            reload_on_sighup: false,
        }
    }

    /// Reloads the config file on SIGHUP (as `taskherd run` does).
    pub fn reload_on_sighup(mut self) -> Self {
        self.reload_on_sighup = true;
        self
    }

    /// Calls `events` as the herd runs.
    pub fn events(mut self, events: impl Events) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// Serves operators' commands (`taskherd status`, ...) on `socket`.
    pub fn control_socket(mut self, socket: super::control::ControlSocket) -> Self {
        self.control = Some(socket);
        self
    }

    /// Runs the herd until every instance has ended or `shutdown` stops it.
    pub async fn run(self, sink: LogSink, shutdown: Shutdown) -> RunReport {
        super::launcher::run_launcher(self, sink, shutdown).await
    }

    /// Runs the herd from a plain program: see [`super::run_blocking`].
    ///
    /// # Errors
    /// If the runtime, the log writer or the signal handlers cannot be set
    /// up; nothing was started then.
    pub fn run_blocking(self) -> std::io::Result<RunReport> {
        super::launcher::run_blocking_with(self)
    }
}
