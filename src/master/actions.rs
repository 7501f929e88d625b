//! Operators' actions on a running herd: starting planned instances
//! (feeders first), suspend, resume, rolling restart, reload, and the
//! requests of the control socket.

use super::control::ControlRequest;
use super::herd::{is_final, Board, HerdCommand};
use super::instance::{self, EventKind, InstanceCommand, InstanceEnd, InstanceReport};
use super::launcher::stop_budget;
use super::log::LogSink;
use super::plan::{plan_groups, same_host, split_plan, FeederInfo, Plan};
use super::queue::FeederAddresses;
use super::remote::{self, AgentSettings, HostCommand, HostPlan};
use super::shutdown::Shutdown;
use crate::config::{Config, GroupSpec, HostSpec};
use crate::protocol::control::{FromMaster, InstanceState, ToMaster};
use crate::protocol::slave::Level;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Longest wait for a feeder's listening address before its consumers
/// start anyway.
const FEEDER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for a suspended group to stop or a resumed one to run,
/// beyond the stop budget.
const SETTLE_MARGIN: Duration = Duration::from_secs(30);

/// Longest wait for one instance of a rolling restart to run again.
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
}

impl Running {
    /// Starts every instance of `plan`: feeders first, consumers once
    /// their feeder listens.
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
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            self.routes.insert(spec.label.id, Route::Local(command_tx));
            self.tasks.spawn(async move {
                vec![instance::supervise(spec, context, Some(listening_tx), command_rx).await]
            });
        }
        for mut spec in plan.local {
            let context = self.context.clone();
            let addresses = self.addresses.clone();
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            self.routes.insert(spec.label.id, Route::Local(command_tx));
            self.tasks.spawn(async move {
                if let Some(group) = super::queue::consumer_of(&spec).map(str::to_string) {
                    tokio::select! {
                        address = addresses.wait(&group) => {
                            if let Some(address) = address {
                                super::queue::set_feeder_address(&mut spec, &address);
                            }
                        }
                        _ = context.shutdown.stopping() => {
                            let end = InstanceEnd::Stopped { killed: false };
                            let id = spec.label.id;
                            instance::emit(context.events.as_ref(), id, EventKind::Ended { end: end.clone() });
                            return vec![InstanceReport { label: spec.label.clone(), end }];
                        }
                    }
                }
                vec![instance::supervise(spec, context, None, command_rx).await]
            });
        }
        for host in plan.hosts {
            let known = self
                .hosts
                .iter()
                .find(|(spec, tx)| same_host(spec, &host.host) && !tx.is_closed())
                .map(|(_, tx)| tx.clone());
            let host_tx = match known {
                Some(tx) if tx.send(HostCommand::Add(host.instances.clone())).is_ok() => tx,
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let _ = tx.send(HostCommand::Add(host.instances.clone()));
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

    pub(crate) async fn command(&mut self, command: HerdCommand, waiters: &mut JoinSet<()>) {
        let (result, reply) = match command {
            HerdCommand::Suspend(group, reply) => (self.suspend_or_resume(&group, true), reply),
            HerdCommand::Resume(group, reply) => (self.suspend_or_resume(&group, false), reply),
            HerdCommand::Restart(group, reply) => (self.restart(&group), reply),
            HerdCommand::Reload(reply) => (self.reload().await, reply),
        };
        match result {
            Ok(settled) => {
                waiters.spawn(async move {
                    let outcome = settled.await;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                });
            }
            Err(message) => {
                self.context
                    .sink
                    .master_event(Level::Error, message.clone())
                    .await;
                if let Some(reply) = reply {
                    let _ = reply.send(Err(message));
                }
            }
        }
    }

    /// Carries out an operator's request from the control socket.
    pub(crate) async fn control_request(
        &mut self,
        request: ControlRequest,
        waiters: &mut JoinSet<()>,
        stop_replies: &mut Vec<mpsc::Sender<FromMaster>>,
    ) {
        let ControlRequest { request, reply } = request;
        let (reply_tx, reply_rx) = oneshot::channel();
        let command = match request {
            ToMaster::Status => {
                let _ = reply.send(FromMaster::Status(self.board.status())).await;
                return;
            }
            ToMaster::Stop { kill } => {
                let shutdown = &self.context.shutdown;
                if kill {
                    shutdown.kill_now("kill requested over the control socket");
                } else {
                    shutdown.request_stop("stop requested over the control socket");
                }
                stop_replies.push(reply);
                return;
            }
            ToMaster::Logs { group } => {
                let records = self.context.sink.subscribe();
                let filter = self.context.sink.filter().clone();
                waiters.spawn(stream_logs(records, group, filter, reply));
                return;
            }
            ToMaster::Suspend { group } => HerdCommand::Suspend(group, Some(reply_tx)),
            ToMaster::Resume { group } => HerdCommand::Resume(group, Some(reply_tx)),
            ToMaster::Restart { group } => HerdCommand::Restart(group, Some(reply_tx)),
            ToMaster::Reload => HerdCommand::Reload(Some(reply_tx)),
            other => {
                let message = format!("not a request: {other:?}");
                let _ = reply.send(FromMaster::Error { message }).await;
                return;
            }
        };
        self.command(command, waiters).await;
        waiters.spawn(async move {
            let frame = match reply_rx.await {
                Ok(Ok(message)) => FromMaster::Done { message },
                Ok(Err(message)) => FromMaster::Error { message },
                Err(_) => FromMaster::Error {
                    message: "the herd is ending".into(),
                },
            };
            let _ = reply.send(frame).await;
        });
    }

    /// Waits until `done` holds for the board, `limit` passes, or the herd
    /// stops.
    async fn settle(&self, limit: Duration, done: impl FnMut(&Board) -> bool) -> bool {
        tokio::select! {
            settled = self.board.wait_until(limit, done) => settled,
            _ = self.context.shutdown.stopping() => false,
        }
    }

    fn known_group(&self, group: &str) -> Result<(), String> {
        if self.board.has_group(group) {
            Ok(())
        } else {
            Err(format!("no group named {group:?}"))
        }
    }

    fn settle_limit(&self) -> Duration {
        stop_budget(&self.config) + SETTLE_MARGIN
    }

    /// Suspends (`suspend`) or resumes a group; settles once every live
    /// instance of it is suspended, or no longer is.
    fn suspend_or_resume(&mut self, group: &str, suspend: bool) -> Result<Settled, String> {
        self.known_group(group)?;
        self.board.set_suspended(group, suspend);
        let command = if suspend {
            InstanceCommand::Suspend
        } else {
            InstanceCommand::Resume
        };
        let count = self.send_to_group(group, command);
        let board = self.board.clone();
        let group = group.to_string();
        let limit = self.settle_limit();
        Ok(Box::pin(async move {
            let settled = board
                .wait_until(limit, |board| {
                    board.live_ids(&group).iter().all(|id| {
                        board
                            .entry(*id)
                            .is_some_and(|e| (e.state == InstanceState::Suspended) == suspend)
                    })
                })
                .await;
            let done = if suspend { "suspended" } else { "resumed" };
            if settled {
                Ok(format!("group {group} {done} ({count} instances)"))
            } else {
                Err(format!("group {group}: not every instance {done} in time"))
            }
        }))
    }

    /// A rolling restart: one instance at a time, the next once the
    /// previous one runs again.
    fn restart(&mut self, group: &str) -> Result<Settled, String> {
        self.known_group(group)?;
        let ids = self.board.live_ids(group);
        let routes: Vec<(u32, Route)> = ids
            .iter()
            .filter_map(|id| self.routes.get(id).map(|r| (*id, r.clone())))
            .collect();
        let board = self.board.clone();
        let group = group.to_string();
        Ok(Box::pin(async move {
            for (id, route) in &routes {
                let starts = board.entry(*id).map_or(0, |e| e.starts);
                match route {
                    Route::Local(tx) => {
                        let _ = tx.send(InstanceCommand::Restart);
                    }
                    Route::Remote(tx) => {
                        let command = InstanceCommand::Restart;
                        let _ = tx.send(HostCommand::Instance { id: *id, command });
                    }
                }
                let back = board
                    .wait_until(RESTART_STEP_TIMEOUT, |board| {
                        board.entry(*id).is_none_or(|e| {
                            is_final(e.state)
                                || (e.starts > starts && e.state == InstanceState::Running)
                        })
                    })
                    .await;
                if !back {
                    return Err(format!(
                        "group {group}: instance {id} did not run again within {}; rolling restart stopped",
                        humantime::format_duration(RESTART_STEP_TIMEOUT)
                    ));
                }
            }
            Ok(format!(
                "group {group} restarted ({} instances)",
                routes.len()
            ))
        }))
    }

    /// Re-reads the config: groups added are started, removed are stopped,
    /// changed are replaced one instance at a time. An invalid config
    /// changes nothing.
    async fn reload(&mut self) -> Result<Settled, String> {
        let source = self.config.source.clone();
        let new = Config::load(&source)
            .map_err(|err| format!("reload refused, the herd is unchanged:\n{err}"))?;
        let sink = self.context.sink.clone();
        let old_groups: BTreeMap<&str, &GroupSpec> = self
            .config
            .groups
            .iter()
            .map(|g| (g.name.as_str(), g))
            .collect();
        let new_names: Vec<&str> = new.groups.iter().map(|g| g.name.as_str()).collect();
        let removed: Vec<String> = self
            .config
            .groups
            .iter()
            .filter(|g| !new_names.contains(&g.name.as_str()))
            .map(|g| g.name.clone())
            .collect();
        let added: Vec<String> = new
            .groups
            .iter()
            .filter(|g| !old_groups.contains_key(g.name.as_str()))
            .map(|g| g.name.clone())
            .collect();
        let changed: Vec<String> = new
            .groups
            .iter()
            .filter(|g| {
                old_groups
                    .get(g.name.as_str())
                    .is_some_and(|old| *old != *g)
            })
            .map(|g| g.name.clone())
            .collect();
        if new.master != self.config.master || new.log != self.config.log {
            sink.master_event(
                Level::Warning,
                "reload: [master] and [log] settings take effect at the next start".into(),
            )
            .await;
        }
        for group in &removed {
            self.send_to_group(group, InstanceCommand::Remove);
        }
        // Added groups, and every changed queue group as a whole (its
        // feeder and consumers share a per-run secret and address).
        let mut fresh: Vec<String> = added.clone();
        let mut rolling = Vec::new();
        for group in &changed {
            let is_queue = new
                .groups
                .iter()
                .any(|g| &g.name == group && g.queue.is_some())
                || old_groups
                    .get(group.as_str())
                    .is_some_and(|g| g.queue.is_some());
            if is_queue {
                self.send_to_group(group, InstanceCommand::Remove);
                fresh.push(group.clone());
            } else {
                rolling.push(group.clone());
            }
        }
        let mut new_plan = plan_groups(&new, &fresh, &mut self.next_id);
        super::queue::prepare(&mut new_plan).map_err(|err| format!("reload refused: {err}"))?;
        let mut replacements = BTreeMap::new();
        for group in &rolling {
            let group_plan = plan_groups(&new, std::slice::from_ref(group), &mut self.next_id);
            replacements.insert(group.clone(), group_plan);
        }
        // Wait for the queue groups being replaced to be gone before their
        // new instances start (the feeder's port may be fixed).
        let old_queue_ids: Vec<u32> = changed
            .iter()
            .filter(|g| fresh.contains(g))
            .flat_map(|g| self.board.live_ids(g))
            .collect();
        if !old_queue_ids.is_empty() {
            let settled = self
                .settle(self.settle_limit(), |board| {
                    old_queue_ids
                        .iter()
                        .all(|id| board.entry(*id).is_none_or(|e| is_final(e.state)))
                })
                .await;
            if !settled {
                sink.master_event(
                    Level::Warning,
                    "reload: old queue instances still stopping; starting the new ones".into(),
                )
                .await;
            }
        }
        for group in fresh.iter().filter(|g| changed.contains(g)) {
            self.board.retire(&old_queue_ids);
            self.board.set_suspended(group, false);
        }
        self.addresses.add_groups(&new_plan);
        self.board
            .add(new_plan.instances().iter().map(|spec| spec.label.clone()));
        self.start(new_plan);
        // Rolling replacement: stop one old instance, start its successor,
        // wait until it runs, then the next.
        let mut steps = Vec::new();
        for group in &rolling {
            let old_ids = self.board.live_ids(group);
            let Some(group_plan) = replacements.remove(group) else {
                continue;
            };
            let mut new_specs = split_plan(group_plan);
            let extra: Vec<u32> = old_ids.iter().skip(new_specs.len()).copied().collect();
            for old in &extra {
                self.send(*old, InstanceCommand::Remove);
            }
            self.board.retire(&extra);
            for (index, part) in new_specs.drain(..).enumerate() {
                steps.push((old_ids.get(index).copied(), part));
            }
        }
        for (old, part) in steps {
            if let Some(old) = old {
                self.send(old, InstanceCommand::Remove);
                self.settle(self.settle_limit(), |board| {
                    board.entry(old).is_none_or(|e| is_final(e.state))
                })
                .await;
                self.board.retire(&[old]);
            }
            let ids: Vec<u32> = part.instances().iter().map(|s| s.label.id).collect();
            self.board
                .add(part.instances().iter().map(|spec| spec.label.clone()));
            self.start(part);
            self.settle(RESTART_STEP_TIMEOUT, |board| {
                ids.iter().all(|id| {
                    board
                        .entry(*id)
                        .is_none_or(|e| e.state == InstanceState::Running || is_final(e.state))
                })
            })
            .await;
        }
        for group in &removed {
            self.board.retire_group(group);
        }
        self.board
            .set_order(new_names.iter().map(|s| s.to_string()).collect());
        let message = format!(
            "reloaded {}: {} added, {} removed, {} changed",
            source.display(),
            list(&added),
            list(&removed),
            list(&changed)
        );
        sink.master_event(Level::Notice, message.clone()).await;
        self.config = new;
        Ok(Box::pin(async move { Ok(message) }))
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// What an operator's request settles into, once carried out.
type Settled = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

/// Streams the live log to an operator until they hang up.
async fn stream_logs(
    mut records: tokio::sync::broadcast::Receiver<Arc<super::log::LogRecord>>,
    group: Option<String>,
    filter: super::log::LogFilter,
    reply: mpsc::Sender<FromMaster>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let record = tokio::select! {
            record = records.recv() => record,
            _ = reply.closed() => return,
        };
        let frame = match record {
            Ok(record) => {
                // The same lines as the log, of one group if asked.
                let wanted = filter.enabled(&record)
                    && match (&group, &record.instance) {
                        (Some(group), Some(label)) => &label.group == group,
                        _ => true,
                    };
                if !wanted {
                    continue;
                }
                FromMaster::Log {
                    line: record.format(crate::config::LogFormat::Text),
                    level: record.level,
                }
            }
            Err(RecvError::Lagged(missed)) => FromMaster::Log {
                line: format!(
                    "[taskherd logs] {missed} lines skipped: this client reads too slowly"
                ),
                level: Level::Warning,
            },
            Err(RecvError::Closed) => return,
        };
        if reply.send(frame).await.is_err() {
            return;
        }
    }
}

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
