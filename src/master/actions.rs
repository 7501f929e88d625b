//! Operators' actions on a running herd: starting planned instances
//! (feeders first), suspend, resume, rolling restart, reload, and the
//! requests of the control socket.
//!
//! The run loop only ever does quick work here: a rolling restart or the
//! rolling part of a reload runs as a task of its own, which asks the loop
//! to start and remove instances ([`HerdCommand::Start`],
//! [`HerdCommand::Instance`]) and waits on the status board, so status,
//! stop and logs are served meanwhile. One such change runs at a time.

use super::control::{stream_logs, ControlRequest};
use super::herd::{is_final, Board, HerdCommand};
use super::plan::{
    is_resize, plan_groups, plan_resize, same_host, split_plan, FeederInfo, Plan, Resize,
};
use super::queue::FeederAddresses;
use super::remote::{self, AgentSettings, HostCommand, HostPlan};
use super::request::{Answer, Asked, HerdError, Reply, Request};
use crate::config::{Config, GroupSpec, HostSpec};
use crate::error_text::count as count_of;
use crate::log::LogSink;
use crate::protocol::control::InstanceState;
use crate::protocol::slave::Level;
use crate::supervise::instance::{self, EventKind, InstanceCommand, InstanceReport};
use crate::supervise::shutdown::Shutdown;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Longest wait for a feeder's listening address before its consumers
/// start anyway.
const FEEDER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for a suspended group to stop or a resumed one to run,
/// beyond the stop budget.
const SETTLE_MARGIN: Duration = Duration::from_secs(30);

/// Longest wait for one instance of a rolling restart (or replacement) to
/// run.
const RESTART_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// How the run loop reaches one instance's supervisor.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Local(mpsc::UnboundedSender<InstanceCommand>),
    Remote(mpsc::UnboundedSender<HostCommand>),
}

/// The run loop's state: who runs where, and how to reach them.
pub(crate) struct Running {
    pub(crate) context: instance::Supervision,
    pub(crate) addresses: FeederAddresses,
    pub(crate) routes: BTreeMap<u32, Route>,
    /// Each host's supervisor (the latest one, if it had ended).
    pub(crate) hosts: Vec<(HostSpec, mpsc::UnboundedSender<HostCommand>)>,
    pub(crate) settings: Arc<AgentSettings>,
    /// The next global id (after a reload, new instances get new ids).
    pub(crate) next_id: u32,
    pub(crate) config: Config,
    pub(crate) board: Board,
    pub(crate) tasks: JoinSet<Vec<InstanceReport>>,
    /// Address relays and start gates: they end with the run.
    pub(crate) helpers: JoinSet<()>,
    /// The run loop's own queue, for the steps of rolling changes.
    pub(crate) commands: mpsc::UnboundedSender<HerdCommand>,
    /// Held by the rolling change under way: one at a time.
    pub(crate) changes: Arc<tokio::sync::Mutex<()>>,
    /// The herd's longest stop grace so far (never shorter after a reload:
    /// instances of a removed group may still be stopping); hosts bound
    /// their wait at stop with it.
    pub(crate) longest_grace: tokio::sync::watch::Sender<Duration>,
}

impl Running {
    /// Starts every instance of `plan`: feeders first, consumers once
    /// their feeder listens; instances of a suspended group start
    /// suspended.
    pub(crate) fn start(&mut self, plan: Plan) {
        let sink = &self.context.sink;
        for feeder in plan.instances_of_feeders() {
            self.helpers.spawn(gate_consumers(
                feeder,
                self.addresses.clone(),
                sink.clone(),
                self.context.shutdown.clone(),
            ));
        }
        for spec in plan.feeders {
            let (listening_tx, listening_rx) = tokio::sync::watch::channel(None);
            self.helpers.spawn(publish_local_feeder(
                spec.label.group.clone(),
                listening_rx,
                self.addresses.clone(),
            ));
            let context = self.context.clone();
            let suspended = self.board.is_suspended(&spec.label.group);
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            self.routes.insert(spec.label.id, Route::Local(command_tx));
            self.tasks.spawn(async move {
                let listening = Some(listening_tx);
                vec![instance::supervise(spec, context, listening, command_rx, suspended).await]
            });
        }
        for spec in plan.local {
            let suspended = self.board.is_suspended(&spec.label.group);
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            self.routes.insert(spec.label.id, Route::Local(command_tx));
            self.tasks.spawn(run_local(
                spec,
                self.context.clone(),
                self.addresses.clone(),
                command_rx,
                suspended,
            ));
        }
        for host in plan.hosts {
            let known = self
                .hosts
                .iter()
                .find(|(spec, tx)| same_host(spec, &host.host) && !tx.is_closed())
                .map(|(_, tx)| tx.clone());
            // A suspended group's instances are noted suspended before
            // they arrive, so the host holds them back.
            let mut work: Vec<HostCommand> = host
                .instances
                .iter()
                .filter(|spec| self.board.is_suspended(&spec.label.group))
                .map(|spec| HostCommand::Instance {
                    id: spec.label.id,
                    command: InstanceCommand::Suspend,
                })
                .collect();
            work.push(HostCommand::Add(host.instances.clone()));
            let delivered = |tx: &mpsc::UnboundedSender<HostCommand>| {
                work.iter().all(|command| tx.send(command.clone()).is_ok())
            };
            let host_tx = match known {
                Some(tx) if delivered(&tx) => tx,
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    delivered(&tx);
                    self.hosts.retain(|(spec, _)| !same_host(spec, &host.host));
                    self.hosts.push((host.host.clone(), tx.clone()));
                    self.tasks.spawn(remote::supervise_host(
                        HostPlan {
                            instances: Vec::new(),
                            ..host.clone()
                        },
                        self.settings.clone(),
                        self.context.clone(),
                        self.addresses.clone(),
                        rx,
                    ));
                    tx
                }
            };
            for spec in &host.instances {
                self.routes
                    .insert(spec.label.id, Route::Remote(host_tx.clone()));
            }
        }
    }

    /// Sends `command` to every live instance of `group`; returns how many.
    fn send_to_group(&self, group: &str, command: InstanceCommand) -> usize {
        let ids = self.board.live_ids(group);
        for id in &ids {
            self.send(*id, command);
        }
        ids.len()
    }

    fn send(&self, id: u32, command: InstanceCommand) {
        match self.routes.get(&id) {
            Some(Route::Local(tx)) => {
                let _ = tx.send(command);
            }
            Some(Route::Remote(tx)) => {
                let _ = tx.send(HostCommand::Instance { id, command });
            }
            None => {}
        }
    }

    pub(crate) async fn command(
        &mut self,
        command: HerdCommand,
        waiters: &mut JoinSet<()>,
        stop_replies: &mut Vec<Reply>,
    ) {
        match command {
            HerdCommand::Ask(request, reply) => {
                self.request(request, reply, waiters, stop_replies).await;
            }
            // The steps of a change under way: quick, and moot once the
            // herd stops.
            HerdCommand::Start(plan) => {
                if !self.context.shutdown.is_stopping() {
                    self.board
                        .add(plan.instances().iter().map(|spec| spec.label.clone()));
                    self.start(plan);
                }
            }
            HerdCommand::Instance(id, command) => self.send(id, command),
        }
    }

    /// Carries out an operator's request from the control socket.
    pub(crate) async fn control_request(
        &mut self,
        request: ControlRequest,
        waiters: &mut JoinSet<()>,
        stop_replies: &mut Vec<Reply>,
    ) {
        let ControlRequest { request, reply } = request;
        match Request::from_wire(request) {
            Ok(Asked::Herd(request)) => {
                let reply = Some(Reply::Control(reply));
                self.request(request, reply, waiters, stop_replies).await;
            }
            Ok(Asked::Logs(request)) => {
                if let Some(group) = &request.group {
                    if let Err(err) = self.known_group(group) {
                        Reply::Control(reply).send(Err(err));
                        return;
                    }
                }
                waiters.spawn(stream_logs(&self.context.sink, request, reply));
            }
            Err(err) => Reply::Control(reply).send(Err(err)),
        }
    }

    /// Carries out an operator's request; answers `reply` (if the asker
    /// waits) once it is done.
    async fn request(
        &mut self,
        request: Request,
        reply: Option<Reply>,
        waiters: &mut JoinSet<()>,
        stop_replies: &mut Vec<Reply>,
    ) {
        let stopping = self.context.shutdown.is_stopping();
        let result = match request {
            Request::Status => {
                if let Some(reply) = reply {
                    reply.send(Ok(Answer::Status(self.board.status())));
                }
                return;
            }
            Request::Stop { kill, reason } => {
                let shutdown = &self.context.shutdown;
                if kill {
                    shutdown.kill_now(reason);
                } else {
                    shutdown.request_stop(reason);
                }
                stop_replies.extend(reply);
                return;
            }
            _ if stopping => Err(HerdError::Stopping),
            Request::Suspend { group } => self.suspend_or_resume(&group, true),
            Request::Resume { group } => self.suspend_or_resume(&group, false),
            Request::Restart { group } => self.restart(&group),
            Request::Reload => self.reload().await,
        };
        match result {
            Ok(settled) => {
                waiters.spawn(async move {
                    let outcome = settled.await;
                    if let Some(reply) = reply {
                        reply.send(outcome.map(Answer::Done));
                    }
                });
            }
            Err(err) => {
                self.context
                    .sink
                    .master_event(Level::Error, err.to_string())
                    .await;
                if let Some(reply) = reply {
                    reply.send(Err(err));
                }
            }
        }
    }

    fn known_group(&self, group: &str) -> Result<(), HerdError> {
        if self.board.has_group(group) {
            Ok(())
        } else {
            Err(HerdError::UnknownGroup {
                group: group.to_string(),
            })
        }
    }

    fn settle_limit(&self) -> Duration {
        *self.longest_grace.borrow() + SETTLE_MARGIN
    }

    /// What the tasks of rolling changes need.
    fn stepper(&self) -> Stepper {
        Stepper {
            board: self.board.clone(),
            commands: self.commands.clone(),
            shutdown: self.context.shutdown.clone(),
            changes: self.changes.clone(),
            settle_limit: self.settle_limit(),
        }
    }

    /// Suspends (`suspend`) or resumes a group; settles once every live
    /// instance of it is suspended, or no longer is.
    fn suspend_or_resume(&mut self, group: &str, suspend: bool) -> Result<Settled, HerdError> {
        self.known_group(group)?;
        self.board.set_suspended(group, suspend);
        let command = if suspend {
            InstanceCommand::Suspend
        } else {
            InstanceCommand::Resume
        };
        let count = self.send_to_group(group, command);
        let stepper = self.stepper();
        let group = group.to_string();
        Ok(Box::pin(async move {
            let settled = stepper
                .settle(stepper.settle_limit, |board| {
                    board.live_ids(&group).iter().all(|id| {
                        board
                            .entry(*id)
                            .is_some_and(|e| (e.state == InstanceState::Suspended) == suspend)
                    })
                })
                .await;
            let done = if suspend { "suspended" } else { "resumed" };
            if settled {
                Ok(format!(
                    "group {group} {done} ({})",
                    count_of(count, "instance")
                ))
            } else {
                Err(HerdError::NotSettled { group, suspend })
            }
        }))
    }

    /// A rolling restart: one instance at a time, the next once the
    /// previous one runs again; suspended instances stay suspended.
    fn restart(&mut self, group: &str) -> Result<Settled, HerdError> {
        self.known_group(group)?;
        let stepper = self.stepper();
        let group = group.to_string();
        Ok(Box::pin(async move {
            let _one_change = stepper.changes.lock().await;
            let mut restarted = 0;
            for id in stepper.board.live_ids(&group) {
                let Some(entry) = stepper.board.entry(id) else {
                    continue;
                };
                if entry.state == InstanceState::Suspended {
                    continue;
                }
                stepper.instance(id, InstanceCommand::Restart);
                let back = stepper
                    .settle(RESTART_STEP_TIMEOUT, |board| {
                        board.entry(id).is_none_or(|e| {
                            is_final(e.state)
                                || e.state == InstanceState::Suspended
                                || (e.starts > entry.starts && e.state == InstanceState::Running)
                        })
                    })
                    .await;
                stepper.still_running()?;
                if !back {
                    return Err(HerdError::RestartStalled {
                        group,
                        id,
                        limit: RESTART_STEP_TIMEOUT,
                    });
                }
                restarted += 1;
            }
            Ok(format!(
                "group {group} restarted ({})",
                count_of(restarted, "instance")
            ))
        }))
    }

    /// Re-reads the config: groups added are started, removed are stopped,
    /// changed are replaced one instance at a time (a queue group as a
    /// whole: its feeder and consumers share a per-run secret and
    /// address), and groups whose instance counts alone changed are
    /// resized in place: their instances keep running with their ids, the
    /// extra ones stop, the missing ones start with new ids. A config that
    /// cannot be read or planned changes nothing.
    async fn reload(&mut self) -> Result<Settled, HerdError> {
        let source = self.config.source.clone();
        let new = Config::load(&source).map_err(HerdError::ConfigRefused)?;
        let old_groups: BTreeMap<&str, &GroupSpec> = self
            .config
            .groups
            .iter()
            .map(|g| (g.name.as_str(), g))
            .collect();
        let new_names: Vec<String> = new.groups.iter().map(|g| g.name.clone()).collect();
        let removed: Vec<String> = old_groups
            .keys()
            .filter(|name| !new_names.iter().any(|n| n == *name))
            .map(|name| name.to_string())
            .collect();
        let added: Vec<String> = new
            .groups
            .iter()
            .filter(|g| !old_groups.contains_key(g.name.as_str()))
            .map(|g| g.name.clone())
            .collect();
        let changed: Vec<&GroupSpec> = new
            .groups
            .iter()
            .filter(|g| {
                old_groups
                    .get(g.name.as_str())
                    .is_some_and(|old| *old != *g)
            })
            .collect();
        let is_queue = |group: &GroupSpec| {
            group.queue.is_some()
                || old_groups
                    .get(group.name.as_str())
                    .is_some_and(|old| old.queue.is_some())
        };
        let is_resize = |group: &GroupSpec| {
            old_groups
                .get(group.name.as_str())
                .is_some_and(|old| is_resize(old, group))
        };
        let replaced: Vec<String> = changed
            .iter()
            .filter(|g| is_queue(g))
            .map(|g| g.name.clone())
            .collect();
        let resized: Vec<String> = changed
            .iter()
            .filter(|g| is_resize(g))
            .map(|g| g.name.clone())
            .collect();
        let rolling: Vec<String> = changed
            .iter()
            .filter(|g| !is_queue(g) && !is_resize(g))
            .map(|g| g.name.clone())
            .collect();
        let changed: Vec<String> = changed
            .iter()
            .filter(|g| !is_resize(g))
            .map(|g| g.name.clone())
            .collect();

        // A resize works on the instances as they are now: none may be on
        // their way in or out. The guard of this reload's change is taken
        // here, so that no later change starts before it.
        let guard = self.changes.clone().try_lock_owned().ok();
        if guard.is_none() && !resized.is_empty() {
            return Err(HerdError::ChangeUnderWay { resized });
        }

        // Plan everything before touching anything: a plan that cannot be
        // prepared (no port, no randomness) leaves the herd as it is.
        let mut next_id = self.next_id;
        let fresh: Vec<String> = added.iter().chain(&replaced).cloned().collect();
        let mut fresh_plan = plan_groups(&new, &fresh, &mut next_id);
        super::queue::prepare(&mut fresh_plan).map_err(HerdError::Unprepared)?;
        let rolling_plans: Vec<(String, Plan)> = rolling
            .iter()
            .map(|group| {
                let plan = plan_groups(&new, std::slice::from_ref(group), &mut next_id);
                (group.clone(), plan)
            })
            .collect();
        let retired = self.board.retired_ever();
        let resizes: Vec<(String, Resize)> = resized
            .iter()
            .map(|group| {
                let existing: Vec<_> = self
                    .board
                    .all_ids(group)
                    .into_iter()
                    .filter(|id| !retired.contains(id))
                    .filter_map(|id| self.board.entry(id).map(|entry| entry.label))
                    .collect();
                let resize = plan_resize(&new, group, &existing, &mut next_id);
                (group.clone(), resize)
            })
            .collect();
        self.next_id = next_id;

        let sink = self.context.sink.clone();
        if new.master != self.config.master {
            sink.master_event(
                Level::Warning,
                "reload: [master] settings take effect at the next start".into(),
            )
            .await;
        }
        for group in &removed {
            self.send_to_group(group, InstanceCommand::Remove);
            self.board.retire_group(group);
        }
        let old_queue_ids: Vec<u32> = replaced
            .iter()
            .flat_map(|group| self.board.all_ids(group))
            .collect();
        for group in &replaced {
            self.send_to_group(group, InstanceCommand::Remove);
        }
        // Resized groups: the instances kept go on as they are, the extra
        // ones stop (highest group id first), the missing ones start.
        let mut stopping: Vec<u32> = Vec::new();
        let mut sizes: Vec<String> = Vec::new();
        for (group, resize) in resizes {
            for id in &resize.stop {
                self.send(*id, InstanceCommand::Remove);
            }
            self.board.retire(&resize.stop);
            stopping.extend(&resize.stop);
            self.board.add(
                resize
                    .start
                    .instances()
                    .iter()
                    .map(|spec| spec.label.clone()),
            );
            self.start(resize.start);
            sizes.push(format!(
                "{group} ({} -> {})",
                resize.from,
                count_of(resize.to, "instance")
            ));
        }
        self.addresses.add_groups(&fresh_plan);
        self.board.set_order(new_names);
        let longest = new.longest_stop_grace();
        self.longest_grace
            .send_if_modified(|grace| std::mem::replace(grace, longest.max(*grace)) < longest);
        self.config = new;

        let message = format!(
            "reloaded {}: groups added: {}; removed: {}; changed: {}; resized: {}",
            source.display(),
            list(&added),
            list(&removed),
            list(&changed),
            list(&sizes)
        );
        let stepper = self.stepper();
        Ok(Box::pin(async move {
            let _one_change = match guard {
                Some(guard) => guard,
                None => stepper.changes.clone().lock_owned().await,
            };
            // The extra instances of resized groups have stopped.
            if !stopping.is_empty() {
                stepper
                    .settle(stepper.settle_limit, |board| {
                        stopping
                            .iter()
                            .all(|id| board.entry(*id).is_none_or(|e| is_final(e.state)))
                    })
                    .await;
                stepper.still_running()?;
            }
            // Replaced queue groups: the old ones end first (the feeder's
            // port may be fixed), then the new ones start with the added
            // groups.
            if !old_queue_ids.is_empty() {
                stepper
                    .settle(stepper.settle_limit, |board| {
                        old_queue_ids
                            .iter()
                            .all(|id| board.entry(*id).is_none_or(|e| is_final(e.state)))
                    })
                    .await;
                stepper.still_running()?;
                stepper.board.retire(&old_queue_ids);
            }
            stepper.start(fresh_plan);
            for (group, plan) in rolling_plans {
                stepper.replace(&group, plan).await?;
            }
            sink.master_event(Level::Notice, message.clone()).await;
            Ok(message)
        }))
    }
}

/// What a rolling change works with, away from the run loop.
struct Stepper {
    board: Board,
    commands: mpsc::UnboundedSender<HerdCommand>,
    shutdown: Shutdown,
    changes: Arc<tokio::sync::Mutex<()>>,
    settle_limit: Duration,
}

impl Stepper {
    fn instance(&self, id: u32, command: InstanceCommand) {
        let _ = self.commands.send(HerdCommand::Instance(id, command));
    }

    fn start(&self, plan: Plan) {
        let _ = self.commands.send(HerdCommand::Start(plan));
    }

    /// Waits until `done` holds for the board, `limit` passes, or the herd
    /// stops.
    async fn settle(&self, limit: Duration, done: impl FnMut(&Board) -> bool) -> bool {
        tokio::select! {
            settled = self.board.wait_until(limit, done) => settled,
            _ = self.shutdown.stopping() => false,
        }
    }

    fn still_running(&self) -> Result<(), HerdError> {
        if self.shutdown.is_stopping() {
            Err(HerdError::StoppedMidway)
        } else {
            Ok(())
        }
    }

    /// Replaces `group`'s instances by `plan`'s, one at a time: start a
    /// successor, wait until it runs, then stop the old instance it
    /// replaces. A successor that fails to run is removed and the
    /// replacement stops there, keeping the old instances left.
    async fn replace(&self, group: &str, plan: Plan) -> Result<(), HerdError> {
        let old_ids = self.board.all_ids(group);
        let parts = split_plan(plan);
        let extra: Vec<u32> = old_ids.iter().skip(parts.len()).copied().collect();
        for old in &extra {
            self.instance(*old, InstanceCommand::Remove);
        }
        self.board.retire(&extra);
        for (index, part) in parts.into_iter().enumerate() {
            let ids: Vec<u32> = part.instances().iter().map(|s| s.label.id).collect();
            self.start(part);
            let mut failed = None;
            self.settle(RESTART_STEP_TIMEOUT, |board| {
                ids.iter().all(|id| {
                    let Some(e) = board.entry(*id) else {
                        return false;
                    };
                    // Ended or exited before it ever ran: it does not work.
                    if e.state == InstanceState::Failed || (e.starts == 0 && e.last_exit.is_some())
                    {
                        failed = e.last_exit.clone().or(Some("failed".into()));
                        return true;
                    }
                    matches!(
                        e.state,
                        InstanceState::Running
                            | InstanceState::Suspended
                            | InstanceState::Completed
                    )
                })
            })
            .await;
            self.still_running()?;
            let ran = failed.is_none()
                && ids.iter().all(|id| {
                    self.board.entry(*id).is_some_and(|e| {
                        matches!(
                            e.state,
                            InstanceState::Running
                                | InstanceState::Suspended
                                | InstanceState::Completed
                        )
                    })
                });
            if !ran {
                for id in &ids {
                    self.instance(*id, InstanceCommand::Remove);
                }
                self.board.retire(&ids);
                self.settle(self.settle_limit, |board| {
                    ids.iter().all(|id| board.entry(*id).is_none())
                })
                .await;
                let why = failed.unwrap_or_else(|| {
                    format!(
                        "not running within {}",
                        humantime::format_duration(RESTART_STEP_TIMEOUT)
                    )
                });
                return Err(HerdError::ReplacementFailed {
                    group: group.to_string(),
                    why,
                    kept: old_ids.len().saturating_sub(index),
                });
            }
            if let Some(&old) = old_ids.get(index) {
                self.instance(old, InstanceCommand::Remove);
                self.settle(self.settle_limit, |board| {
                    board.entry(old).is_none_or(|e| is_final(e.state))
                })
                .await;
                self.still_running()?;
                self.board.retire(&[old]);
            }
        }
        Ok(())
    }
}

/// Runs a local instance; a consumer first waits for its feeder's address,
/// obeying commands meanwhile (removed, it ends without running; suspended,
/// it starts suspended).
async fn run_local(
    mut spec: instance::InstanceSpec,
    context: instance::Supervision,
    addresses: FeederAddresses,
    mut commands: mpsc::UnboundedReceiver<InstanceCommand>,
    mut suspended: bool,
) -> Vec<InstanceReport> {
    if let Some(group) = super::queue::consumer_of(&spec).map(str::to_string) {
        let wait = addresses.wait(&group);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                address = &mut wait => {
                    if let Some(address) = address {
                        super::queue::set_feeder_address(&mut spec, &address);
                    }
                    break;
                }
                Some(command) = commands.recv() => match command {
                    InstanceCommand::Remove => {
                        return vec![instance::never_ran(spec.label, context.events.as_ref())];
                    }
                    InstanceCommand::Suspend => {
                        suspended = true;
                        instance::emit(context.events.as_ref(), spec.label.id, EventKind::Suspended);
                    }
                    InstanceCommand::Resume => suspended = false,
                    InstanceCommand::Restart => {}
                },
                _ = context.shutdown.stopping() => {
                    return vec![instance::never_ran(spec.label, context.events.as_ref())];
                }
            }
        }
    }
    vec![instance::supervise(spec, context, None, commands, suspended).await]
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// What an operator's request settles into, once carried out.
type Settled =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, HerdError>> + Send>>;

/// Publishes a local feeder's address each time it listens.
async fn publish_local_feeder(
    group: String,
    mut listening: tokio::sync::watch::Receiver<Option<String>>,
    addresses: FeederAddresses,
) {
    while listening.changed().await.is_ok() {
        let listened = listening.borrow_and_update().clone();
        if let Some(addr) = listened.and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
            addresses.publish(&group, super::queue::FeederAddress::local(addr));
        }
    }
}

/// Says so when a feeder takes long to listen; a local feeder's consumers
/// then start anyway (its port is known: they connect once it listens),
/// a remote feeder's wait for it.
async fn gate_consumers(
    feeder: FeederInfo,
    addresses: FeederAddresses,
    sink: LogSink,
    shutdown: Shutdown,
) {
    let waited = tokio::select! {
        waited = tokio::time::timeout(FEEDER_START_TIMEOUT, addresses.wait(&feeder.label.group)) => waited,
        _ = shutdown.stopping() => return,
    };
    if waited.is_ok() {
        return;
    }
    let limit = humantime::format_duration(FEEDER_START_TIMEOUT);
    let message = match feeder.known_address {
        Some(address) => {
            addresses.publish(&feeder.label.group, address);
            format!("feeder did not listen within {limit}; starting its consumers anyway (they connect when it does)")
        }
        None => format!("feeder did not listen within {limit}; its consumers wait for it"),
    };
    sink.instance_event(&feeder.label, Level::Error, message)
        .await;
}
