//! The master's core: a state machine without I/O that owns what the
//! master knows of its herd and decides what to do about it.
//!
//! The run loop (the shell, [`super::shell`]) feeds it [`Event`]s with
//! the time ([`Core::handle`]): instance events, feeders that listen,
//! hosts lost, operators' requests, deadlines passed, the stop; and
//! carries out the [`Effect`]s it returns: start these instances here,
//! command that instance, answer this request, log this line. It never
//! waits: what takes time (a rolling restart waits for each instance to
//! run again) is state, advanced by later events, with the next deadline
//! told by [`Core::next_deadline`].
//!
//! What it owns:
//!
//! - the instances by id, with their state and host ([`Table`]), the
//!   groups, suspended ones and queue counts;
//! - the feeders' addresses (one gate per queue group): consumers are
//!   held here until their feeder listens, obeying suspend and remove
//!   meanwhile, wherever they are placed;
//! - operators' waits (a suspend settles once every instance is
//!   suspended) and rolling changes ([`changes`]: restarts and reloads,
//!   one at a time, in the order asked);
//! - the stop: who waits for its end, and what no longer starts.

mod changes;
mod operate;
mod order;
mod reload;
mod table;
#[cfg(test)]
mod tests;

pub(crate) use table::{is_final, Table};

use self::changes::{Change, Wait};
use self::operate::{Await, Kept};
use self::order::Order;
use super::hooks::{hook_for, HookCall};
use super::plan::{same_host, Plan};
use super::queue::{consumer_of, set_feeder_address, FeederAddress};
use super::request::{Answer, HerdError, Request};
use crate::config::{Config, HostSpec, LoadError, SshOptions};
use crate::error_text::count;
use crate::log::InstanceLabel;
use crate::protocol::control::{HerdStatus, InstanceState};
use crate::protocol::slave::{Level, QueueProgress};
use crate::supervise::instance::{EventKind, InstanceCommand, InstanceEvent, InstanceSpec};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Longest wait for a feeder's listening address before its consumers
/// start anyway (a feeder on the master's host) or that is said (a
/// remote one: its consumers wait for it).
pub(crate) const FEEDER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The time an event happens at: the monotonic clock for deadlines, the
/// wall clock for the status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// For deadlines.
    pub(crate) at: Instant,
    /// For the status (uptimes, last signs of life).
    pub(crate) wall: SystemTime,
}

/// Names an operator waiting for an answer; the shell keeps where the
/// answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ReplyId(pub(crate) u64);

/// Where instances run.
#[derive(Debug, Clone)]
pub(crate) enum Place {
    /// On the master's host.
    Local,
    /// On a remote host, through its agent.
    Host {
        /// The host.
        host: HostSpec,
        /// How to reach it (boxed: the enum stays small for `Local`).
        ssh: Box<SshOptions>,
    },
}

/// What the core is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// Start the config's plan (prepared).
    Start(Plan),
    /// Something happened to an instance.
    Instance(InstanceEvent),
    /// A feeder listens at `address`.
    Listening {
        /// The feeder.
        id: u32,
        /// Where its consumers reach it.
        address: FeederAddress,
    },
    /// A host's agent was lost; its host tries again in `retry_in`.
    HostLost {
        /// The host.
        host: HostSpec,
        /// What happened.
        problem: String,
        /// When it reconnects.
        retry_in: Duration,
    },
    /// An operator's request; `reply` if the operator waits for the
    /// answer.
    Request {
        /// What is asked.
        request: Request,
        /// Who waits.
        reply: Option<ReplyId>,
    },
    /// The config file read for a reload ([`Effect::ReadConfig`]).
    ConfigRead {
        /// The config, or why not.
        result: Result<Config, LoadError>,
        /// Who waits for the reload.
        reply: Option<ReplyId>,
    },
    /// The queue groups of a reload prepared ([`Effect::Prepare`]).
    Prepared(Result<Plan, super::queue::QueuePrepareError>),
    /// The herd stops (an operator, a signal, the max running time).
    Stopping {
        /// Why.
        reason: String,
        /// How to kill at once, when there is a way.
        hint: Option<String>,
    },
    /// Every instance is killed now.
    Killing {
        /// Why.
        reason: String,
    },
    /// Time passed (a deadline of [`Core::next_deadline`]).
    Tick,
    /// The run ended: `outcome` is what operators who stopped it read.
    Ended {
        /// For the operators.
        outcome: String,
    },
}

/// What the shell is told to do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Start these instances at `place`; those in `suspended` start
    /// suspended (their group is).
    Start {
        /// Where.
        place: Place,
        /// What, consumers with their feeder's address.
        instances: Vec<InstanceSpec>,
        /// Ids of those that start suspended.
        suspended: Vec<u32>,
    },
    /// Command one instance.
    Command {
        /// Which.
        id: u32,
        /// What.
        command: InstanceCommand,
    },
    /// An instance held back ends without having run: report it so.
    NeverRan(Arc<InstanceLabel>),
    /// Send this event of an instance, as its supervisor would.
    Emit {
        /// The instance.
        id: u32,
        /// What happened.
        kind: EventKind,
    },
    /// Run a hook of the instance's group (beside supervision, bounded).
    Hook(HookCall),
    /// Tell the events callbacks.
    Publish {
        /// The instance.
        label: Arc<InstanceLabel>,
        /// Its event.
        event: InstanceEvent,
    },
    /// Answer an operator.
    Answer {
        /// Who.
        reply: ReplyId,
        /// The answer.
        answer: Result<Answer, HerdError>,
    },
    /// Log a line: an instance's, or the master's own.
    Log {
        /// Its level.
        level: Level,
        /// The instance it is about.
        instance: Option<Arc<InstanceLabel>>,
        /// The line.
        message: String,
    },
    /// Read the config file again; then [`Event::ConfigRead`].
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Who waits for the reload.
        reply: Option<ReplyId>,
    },
    /// Prepare the queue groups of `plan` (feeder ports, secrets); then
    /// [`Event::Prepared`].
    Prepare(Plan),
    /// Stop the herd (`kill`: at once).
    Shutdown {
        /// Kill now.
        kill: bool,
        /// Why.
        reason: String,
    },
    /// The herd's longest stop grace grew (a reload).
    LongestGrace(Duration),
}

/// A queue group's feeder, as its consumers wait for it.
#[derive(Debug)]
struct Gate {
    /// The feeder.
    feeder: Arc<InstanceLabel>,
    /// Where a feeder on the master's host will listen (its port was
    /// chosen in advance).
    known: Option<FeederAddress>,
    /// Where it listens, once it said so.
    address: Option<FeederAddress>,
    /// When to say that it takes long.
    deadline: Option<Instant>,
}

/// A consumer held until its feeder listens.
#[derive(Debug)]
struct Held {
    /// It.
    spec: InstanceSpec,
    /// Where it will run.
    place: Place,
    /// An operator suspended it meanwhile.
    suspended: bool,
}

/// The master's state and decisions.
#[derive(Debug)]
pub(crate) struct Core {
    /// The config (the reloaded one after a reload).
    config: Config,
    /// Every instance.
    table: Table,
    /// The next global id (after a reload, new instances get new ids).
    next_id: u32,
    /// The longest stop grace so far (a reload never shortens it:
    /// instances of a removed group may still be stopping).
    longest_grace: Duration,
    /// Queue groups' feeders, by group.
    gates: BTreeMap<String, Gate>,
    /// Consumers waiting for their feeder, by id.
    held: BTreeMap<u32, Held>,
    /// Instances waiting for the groups their group starts after
    /// (`after`) to be ready, by id.
    waiting: BTreeMap<u32, Held>,
    /// The order between groups: ready instances, groups released, the
    /// ordered stop.
    order: Order,
    /// Suspends and resumes to answer once settled.
    waits: Vec<Wait>,
    /// Starts and stops of instances to answer once done.
    awaits: Vec<Await>,
    /// Every instance's spec and place, to start it again once it has
    /// ended.
    kept: BTreeMap<u32, Kept>,
    /// Rolling changes: the first is under way, the others wait.
    changes: VecDeque<Change>,
    /// A reload being planned (between [`Effect::Prepare`] and
    /// [`Event::Prepared`]).
    draft: Option<reload::Draft>,
    /// The herd stops.
    stopping: bool,
    /// Operators waiting for the end of the run.
    stop_waiters: Vec<ReplyId>,
    /// `master.max_running_time` and when it is reached.
    max_running: Option<(Duration, Instant)>,
    /// Effects of the event being handled.
    out: Vec<Effect>,
}

impl Core {
    /// The core of a herd running `config`, from `now`.
    pub(crate) fn new(config: Config, now: Now) -> Self {
        let table = Table::new(
            config.source.display().to_string(),
            config.groups.iter().map(|g| g.name.clone()).collect(),
            now.wall,
        );
        Core {
            longest_grace: config.longest_stop_grace(),
            max_running: config
                .master
                .max_running_time
                .map(|limit| (limit, now.at + limit)),
            config,
            table,
            next_id: 1,
            gates: BTreeMap::new(),
            held: BTreeMap::new(),
            waiting: BTreeMap::new(),
            order: Order::default(),
            waits: Vec::new(),
            awaits: Vec::new(),
            kept: BTreeMap::new(),
            changes: VecDeque::new(),
            draft: None,
            stopping: false,
            stop_waiters: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Handles one event at `now`; returns what to do, in order.
    pub(crate) fn handle(&mut self, event: Event, now: Now) -> Vec<Effect> {
        match event {
            Event::Start(plan) => {
                let total = u32::try_from(plan.instances().len()).unwrap_or(u32::MAX);
                self.next_id = self.next_id.max(total.saturating_add(1));
                self.start(plan, now.at);
            }
            Event::Instance(event) => {
                if let Some(group) = self.table.entry(event.id).map(|e| e.label.group.clone()) {
                    self.order.apply(&self.config, &group, &event);
                }
                if let EventKind::NotReady { why } = &event.kind {
                    self.still_waiting(event.id, why);
                }
                // A reload's retired instance leaves the table with its
                // end: its counts, for its hook, are read before.
                let counts = self.table.entry(event.id).map(|e| (e.starts, e.restarts));
                if let Some(label) = self.table.apply(&event) {
                    self.hook(&label, &event, counts);
                    self.out.push(Effect::Publish { label, event });
                }
            }
            Event::Listening { id, address } => self.listening(id, address),
            Event::HostLost {
                host,
                problem,
                retry_in,
            } => self.host_lost(&host, &problem, retry_in),
            Event::Request { request, reply } => self.request(request, reply, now),
            Event::ConfigRead { result, reply } => self.config_read(result, reply),
            Event::Prepared(result) => self.prepared(result, now.at),
            Event::Stopping { reason, hint } => self.stopping(&reason, hint.as_deref()),
            Event::Killing { reason } => {
                self.log(
                    Level::Warning,
                    format!("killing every instance now: {reason}"),
                );
            }
            Event::Tick => {}
            Event::Ended { outcome } => {
                for reply in std::mem::take(&mut self.stop_waiters) {
                    let answer = Ok(Answer::Done(outcome.clone()));
                    self.out.push(Effect::Answer { reply, answer });
                }
            }
        }
        self.advance(now.at);
        std::mem::take(&mut self.out)
    }

    /// The next time something is due (a deadline, the max running time),
    /// for an [`Event::Tick`] then.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let gates = self
            .gates
            .values()
            .filter_map(|gate| gate.deadline)
            .filter(|_| !self.stopping);
        let max_running = self
            .max_running
            .map(|(_, at)| at)
            .filter(|_| !self.stopping);
        let waits = self.waits.iter().map(|wait| wait.deadline);
        let awaits = self.awaits.iter().map(Await::next_deadline);
        let change = self.changes.front().and_then(Change::deadline);
        gates
            .chain(max_running)
            .chain(waits)
            .chain(awaits)
            .chain(change)
            .min()
    }

    /// Whether consumers are held for their feeder, or instances are
    /// stopped until an operator starts them (the run is not over while
    /// they are, supervised or not, until the herd stops).
    pub(crate) fn holds_instances(&self) -> bool {
        !self.held.is_empty()
            || !self.waiting.is_empty()
            || (!self.stopping && self.table.any_parked())
    }

    /// Every group and instance, with their state, `now`.
    pub(crate) fn status(&self, now: SystemTime) -> HerdStatus {
        self.table.status(now)
    }

    /// The config as it is now (reloaded, for the end of the run).
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Every instance a reload retired: their ends are not the run's.
    pub(crate) fn retired_ever(&self) -> &BTreeSet<u32> {
        self.table.retired_ever()
    }

    /// The last counts each queue group's feeder reported.
    pub(crate) fn queue_counts(&self) -> &BTreeMap<String, QueueProgress> {
        self.table.queue_counts()
    }

    /// Whether `group` is one of the herd's.
    ///
    /// # Errors
    /// [`HerdError::UnknownGroup`].
    pub(crate) fn known_group(&self, group: &str) -> Result<(), HerdError> {
        if self.table.has_group(group) {
            Ok(())
        } else {
            Err(HerdError::UnknownGroup {
                group: group.to_string(),
            })
        }
    }

    /// Calls the hook of `label`'s group that `event` (just applied)
    /// calls, if any; `before` are the instance's starts and restarts
    /// before the event, for one the event took out of the table (a
    /// reload retired it).
    fn hook(
        &mut self,
        label: &Arc<InstanceLabel>,
        event: &InstanceEvent,
        before: Option<(u32, u32)>,
    ) {
        let Some(group) = self.config.groups.iter().find(|g| g.name == label.group) else {
            return;
        };
        let (starts, restarts) = self
            .table
            .entry(label.id)
            .map(|e| (e.starts, e.restarts))
            .or(before)
            .unwrap_or((1, 0));
        let dir = self
            .config
            .source
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| std::path::Path::new("."));
        if let Some(call) = hook_for(&group.hooks, dir, label, event, starts, restarts) {
            self.out.push(Effect::Hook(call));
        }
    }

    fn log(&mut self, level: Level, message: String) {
        self.out.push(Effect::Log {
            level,
            instance: None,
            message,
        });
    }

    fn answer(&mut self, reply: Option<ReplyId>, answer: Result<Answer, HerdError>) {
        if let Some(reply) = reply {
            self.out.push(Effect::Answer { reply, answer });
        }
    }

    /// Refuses a request: said in the log, and to the operator.
    fn refuse(&mut self, reply: Option<ReplyId>, err: HerdError) {
        self.log(Level::Error, err.to_string());
        self.answer(reply, Err(err));
    }

    /// Starts every instance of `plan`: feeders first, each consumer once
    /// its feeder listens; instances of a suspended group start
    /// suspended.
    fn start(&mut self, plan: Plan, now: Instant) {
        let local = plan
            .feeders
            .iter()
            .chain(&plan.local)
            .map(|spec| (spec, None));
        let remote = plan.hosts.iter().flat_map(|host| {
            let on = &host.host;
            host.instances
                .iter()
                .map(move |spec| (spec, Some(on.clone())))
        });
        self.table.add(
            local
                .chain(remote)
                .map(|(spec, host)| (spec.label.clone(), host)),
        );
        for feeder in plan.instances_of_feeders() {
            let gate = Gate {
                feeder: feeder.label,
                known: feeder.known_address,
                address: None,
                deadline: Some(now + FEEDER_START_TIMEOUT),
            };
            self.gates.insert(gate.feeder.group.clone(), gate);
        }
        let Plan {
            feeders,
            local,
            hosts,
        } = plan;
        self.start_on(Place::Local, feeders);
        let local = self.park_unstarted(Place::Local, local);
        self.start_on(Place::Local, local);
        for host in hosts {
            let place = Place::Host {
                host: host.host,
                ssh: Box::new(host.ssh),
            };
            let instances = self.park_unstarted(place.clone(), host.instances);
            self.start_on(place, instances);
        }
    }

    /// Keeps back the instances of `autostart = false` groups, listed
    /// stopped until an operator starts them; returns the others.
    fn park_unstarted(&mut self, place: Place, specs: Vec<InstanceSpec>) -> Vec<InstanceSpec> {
        let (start, park): (Vec<_>, Vec<_>) = specs
            .into_iter()
            .partition(|spec| self.autostarts(&spec.label.group));
        let mut groups: Vec<String> = Vec::new();
        for spec in park {
            let id = spec.label.id;
            if !groups.contains(&spec.label.group) {
                groups.push(spec.label.group.clone());
            }
            self.table.park_unstarted(id);
            let place = place.clone();
            self.kept.insert(id, Kept { spec, place });
        }
        for group in groups {
            self.log(
                Level::Notice,
                format!("group {group} not started (autostart = false): `taskherd start {group}` starts it"),
            );
        }
        start
    }

    /// Starts `specs` at `place`, holding consumers whose feeder does not
    /// listen yet.
    fn start_on(&mut self, place: Place, specs: Vec<InstanceSpec>) {
        let specs = specs.into_iter().map(|spec| (spec, false)).collect();
        self.start_marked(place, specs);
    }

    /// [`Core::start_on`], each spec with whether it starts suspended
    /// even if its group is not (suspended alone while it waited).
    fn start_marked(&mut self, place: Place, specs: Vec<(InstanceSpec, bool)>) {
        let mut instances = Vec::new();
        let mut suspended = Vec::new();
        for (mut spec, suspended_alone) in specs {
            let kept = Kept {
                spec: spec.clone(),
                place: place.clone(),
            };
            self.kept.insert(spec.label.id, kept);
            self.order.note(spec.label.id, spec.ready.is_some());
            let group_suspended = suspended_alone || self.table.is_suspended(&spec.label.group);
            if self.must_wait(&spec.label.group) {
                self.table.set_waiting(spec.label.id, true);
                let waiting = Held {
                    spec,
                    place: place.clone(),
                    suspended: group_suspended,
                };
                self.waiting.insert(waiting.spec.label.id, waiting);
                continue;
            }
            if let Some(gate) = consumer_of(&spec).and_then(|group| self.gates.get(group)) {
                match &gate.address {
                    Some(address) => set_feeder_address(&mut spec, address),
                    None => {
                        let held = Held {
                            spec,
                            place: place.clone(),
                            suspended: group_suspended,
                        };
                        self.held.insert(held.spec.label.id, held);
                        continue;
                    }
                }
            }
            if group_suspended {
                suspended.push(spec.label.id);
            }
            instances.push(spec);
        }
        if !instances.is_empty() {
            self.out.push(Effect::Start {
                place,
                instances,
                suspended,
            });
        }
    }

    /// A feeder listens: its consumers held start.
    fn listening(&mut self, id: u32, address: FeederAddress) {
        let Some(group) = self.table.entry(id).map(|e| e.label.group.clone()) else {
            return;
        };
        let Some(gate) = self.gates.get_mut(&group) else {
            return;
        };
        gate.address = Some(address);
        gate.deadline = None;
        self.release(&group);
    }

    /// Starts the consumers of `group` held for its feeder, which listens
    /// (or is known where it will): one start per place.
    fn release(&mut self, group: &str) {
        let address = self.gates.get(group).and_then(|g| g.address.clone());
        let ids: Vec<u32> = self
            .held
            .values()
            .filter(|held| held.spec.label.group == group)
            .map(|held| held.spec.label.id)
            .collect();
        let mut starts: Vec<(Place, Vec<InstanceSpec>, Vec<u32>)> = Vec::new();
        for id in ids {
            let Some(held) = self.held.remove(&id) else {
                continue;
            };
            let mut spec = held.spec;
            if let Some(address) = &address {
                set_feeder_address(&mut spec, address);
            }
            let same = |place: &Place| match (place, &held.place) {
                (Place::Local, Place::Local) => true,
                (Place::Host { host: a, .. }, Place::Host { host: b, .. }) => same_host(a, b),
                _ => false,
            };
            let index = match starts.iter().position(|(place, _, _)| same(place)) {
                Some(index) => index,
                None => {
                    starts.push((held.place, Vec::new(), Vec::new()));
                    starts.len() - 1
                }
            };
            let (_, instances, suspended) = &mut starts[index];
            if held.suspended {
                suspended.push(id);
            }
            instances.push(spec);
        }
        for (place, instances, suspended) in starts {
            self.out.push(Effect::Start {
                place,
                instances,
                suspended,
            });
        }
    }

    /// A host's agent was lost: its instances are gone with it until the
    /// next agent.
    fn host_lost(&mut self, host: &HostSpec, problem: &str, retry_in: Duration) {
        let delay_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX);
        let gone: Vec<u32> = self
            .table
            .entries()
            .filter(|e| e.host.as_ref().is_some_and(|h| same_host(h, host)))
            .filter(|e| !is_final(e.state) && e.state != InstanceState::Suspended)
            .filter(|e| !self.held.contains_key(&e.label.id))
            .filter(|e| !self.waiting.contains_key(&e.label.id))
            .map(|e| e.label.id)
            .collect();
        for id in gone {
            let how = format!("host lost: {problem}");
            self.out.push(Effect::Emit {
                id,
                kind: EventKind::Exited { how, failed: true },
            });
            self.out.push(Effect::Emit {
                id,
                kind: EventKind::Backoff { delay_ms },
            });
        }
        self.log(
            Level::Error,
            format!(
                "host {}: {problem}; retrying in {}",
                host.label,
                humantime::format_duration(Duration::from_millis(delay_ms))
            ),
        );
    }

    /// Commands one instance: its supervisor's business once it is
    /// placed; a held consumer obeys here.
    fn command(&mut self, id: u32, command: InstanceCommand) {
        self.table.operator_command(id, command);
        let held = match self.held.get_mut(&id) {
            Some(held) => held,
            None => match self.waiting.get_mut(&id) {
                Some(waiting) => waiting,
                None => {
                    self.out.push(Effect::Command { id, command });
                    return;
                }
            },
        };
        match command {
            InstanceCommand::Remove => {
                if let Some(held) = self.held.remove(&id).or_else(|| self.waiting.remove(&id)) {
                    self.out.push(Effect::NeverRan(held.spec.label));
                }
            }
            InstanceCommand::Suspend => {
                if !held.suspended {
                    held.suspended = true;
                    let kind = EventKind::Suspended;
                    self.out.push(Effect::Emit { id, kind });
                }
            }
            InstanceCommand::Resume => held.suspended = false,
            // Not running: nothing to restart.
            InstanceCommand::Restart => {}
        }
    }

    /// Commands every live instance of `group`; returns how many.
    fn command_group(&mut self, group: &str, command: InstanceCommand) -> usize {
        let ids = self.table.live_ids(group);
        for id in &ids {
            self.command(*id, command);
        }
        ids.len()
    }

    /// Carries out an operator's request.
    fn request(&mut self, request: Request, reply: Option<ReplyId>, now: Now) {
        match request {
            Request::Status => {
                let status = self.table.status(now.wall);
                self.answer(reply, Ok(Answer::Status(status)));
            }
            Request::Stop { kill, reason } => {
                self.out.push(Effect::Shutdown { kill, reason });
                self.stop_waiters.extend(reply);
            }
            Request::Suspend { .. }
            | Request::Resume { .. }
            | Request::Restart { .. }
            | Request::Start { .. }
            | Request::StopInstances { .. }
                if self.stopping =>
            {
                self.refuse(reply, HerdError::Stopping);
            }
            Request::Reload if self.stopping => self.refuse(reply, HerdError::Stopping),
            Request::Suspend { group } => self.suspend_or_resume(group, true, reply, now.at),
            Request::Resume { group } => self.suspend_or_resume(group, false, reply, now.at),
            Request::Restart { target } => match self.target_ids(&target) {
                Ok(_) => self.changes.push_back(Change::restart(target, reply)),
                Err(err) => self.refuse(reply, err),
            },
            Request::Start { target } => self.start_target(target, reply, now.at),
            Request::StopInstances { target } => self.stop_target(target, reply, now.at),
            Request::Reload => {
                let path = self.config.source.clone();
                self.out.push(Effect::ReadConfig { path, reply });
            }
        }
    }

    /// Suspends (`suspend`) or resumes a group; answered once every live
    /// instance of it is suspended, or no longer is.
    fn suspend_or_resume(
        &mut self,
        group: String,
        suspend: bool,
        reply: Option<ReplyId>,
        now: Instant,
    ) {
        if let Err(err) = self.known_group(&group) {
            self.refuse(reply, err);
            return;
        }
        if self.table.is_suspended(&group) == suspend {
            // Said as it is: nothing was done.
            let live = self.table.live_ids(&group).len();
            let message = if suspend {
                format!("group {group} was suspended already")
            } else {
                format!(
                    "group {group} was not suspended: nothing to resume ({} running)",
                    count(live, "instance")
                )
            };
            self.answer(reply, Ok(Answer::Done(message)));
            return;
        }
        self.table.set_suspended(&group, suspend);
        let command = if suspend {
            InstanceCommand::Suspend
        } else {
            InstanceCommand::Resume
        };
        let count = self.command_group(&group, command);
        if let Some(reply) = reply {
            self.waits.push(Wait {
                reply,
                group,
                suspend,
                count,
                deadline: now + self.settle_limit(),
            });
        }
    }

    /// Longest wait for instances to stop (or a suspended group to run
    /// again): the stop grace and a margin.
    fn settle_limit(&self) -> Duration {
        self.longest_grace + changes::SETTLE_MARGIN
    }

    /// The herd stops: held consumers never start, nothing settles.
    fn stopping(&mut self, reason: &str, hint: Option<&str>) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let hint = hint.map(|hint| format!("; {hint}")).unwrap_or_default();
        self.out.push(Effect::Log {
            level: Level::Notice,
            instance: None,
            message: format!(
                "stopping every instance: {reason} (grace {}{hint})",
                humantime::format_duration(self.longest_grace)
            ),
        });
        for (_, held) in std::mem::take(&mut self.held) {
            self.out.push(Effect::NeverRan(held.spec.label));
        }
        for (_, waiting) in std::mem::take(&mut self.waiting) {
            self.out.push(Effect::NeverRan(waiting.spec.label));
        }
    }

    /// Moves on with what waits for time or events: feeders that take
    /// long, the max running time, operators' waits, rolling changes.
    fn advance(&mut self, now: Instant) {
        if !self.stopping {
            self.late_feeders(now);
            if let Some((limit, _)) = self.max_running.filter(|(_, at)| *at <= now) {
                self.max_running = None;
                self.out.push(Effect::Shutdown {
                    kill: false,
                    reason: format!(
                        "max running time of {} reached",
                        humantime::format_duration(limit)
                    ),
                });
            }
        }
        if self.stopping {
            self.stop_in_order();
        } else {
            self.release_waiting();
        }
        self.settle_waits(now);
        self.settle_awaits(now);
        self.advance_changes(now);
    }

    /// Whether instances of `group` wait for the groups it starts after
    /// (`after`): one of them is not ready, and it was never released.
    /// Said once in the log.
    fn must_wait(&mut self, group: &str) -> bool {
        let table = &self.table;
        let blockers = self
            .order
            .blockers(&self.config, group, |g| table.live_ids(g));
        if blockers.is_empty() {
            self.order.release(group);
            return false;
        }
        if self.order.first_wait(group) {
            self.log(
                Level::Notice,
                format!(
                    "group {group} waits for {} to be ready (after = [{}])",
                    blockers.join(", "),
                    blockers
                        .iter()
                        .map(|b| format!("{b:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        true
    }

    /// Says which waiting groups an instance not ready in time holds
    /// back.
    fn still_waiting(&mut self, id: u32, why: &str) {
        let Some(label) = self.table.entry(id).map(|e| e.label.clone()) else {
            return;
        };
        let held: BTreeSet<String> = self
            .waiting
            .values()
            .map(|w| w.spec.label.group.clone())
            .filter(|group| {
                self.config
                    .groups
                    .iter()
                    .any(|g| g.name == *group && g.after.contains(&label.group))
            })
            .collect();
        for group in held {
            self.log(
                Level::Error,
                format!(
                    "group {group} still waits for {}: instance {} {why}",
                    label.group, label.group_id
                ),
            );
        }
    }

    /// The groups waited for that ended before they were ready: one
    /// whose every instance completed (a one-shot job) is ready for good;
    /// one that ended otherwise (failed, stopped, lost) never will be, so
    /// the groups waiting for it are given up, said in the log, and the
    /// run can end.
    fn ended_dependencies(&mut self) {
        let groups: BTreeSet<String> = self
            .waiting
            .values()
            .map(|w| w.spec.label.group.clone())
            .collect();
        for group in groups {
            let after = self
                .config
                .groups
                .iter()
                .find(|g| g.name == group)
                .map(|g| g.after.clone())
                .unwrap_or_default();
            for dependency in after {
                let pending = |held: &BTreeMap<u32, Held>| {
                    held.values().any(|h| h.spec.label.group == dependency)
                };
                let ids = self.table.all_ids(&dependency);
                let entries: Vec<&table::Entry> =
                    ids.iter().filter_map(|id| self.table.entry(*id)).collect();
                if entries.is_empty()
                    || pending(&self.held)
                    || pending(&self.waiting)
                    || entries.iter().any(|e| e.parked || !is_final(e.state))
                {
                    continue;
                }
                if entries.iter().all(|e| e.state == InstanceState::Completed) {
                    self.order.completed(&dependency);
                    continue;
                }
                let given_up: Vec<u32> = self
                    .waiting
                    .values()
                    .filter(|w| w.spec.label.group == group)
                    .map(|w| w.spec.label.id)
                    .collect();
                self.log(
                    Level::Error,
                    format!(
                        "group {group} will not start: {dependency}, which it starts after, \
                         ended without being ready"
                    ),
                );
                for id in given_up {
                    if let Some(waiting) = self.waiting.remove(&id) {
                        self.table.set_waiting(id, false);
                        self.out.push(Effect::NeverRan(waiting.spec.label));
                    }
                }
                break;
            }
        }
    }

    /// Starts the instances waiting for groups that are now ready.
    fn release_waiting(&mut self) {
        self.ended_dependencies();
        let groups: BTreeSet<String> = self
            .waiting
            .values()
            .map(|w| w.spec.label.group.clone())
            .collect();
        for group in groups {
            let table = &self.table;
            let blockers = self
                .order
                .blockers(&self.config, &group, |g| table.live_ids(g));
            if !blockers.is_empty() {
                continue;
            }
            self.order.release(&group);
            let after = self
                .config
                .groups
                .iter()
                .find(|g| g.name == group)
                .map(|g| g.after.join(", "))
                .unwrap_or_default();
            self.log(
                Level::Notice,
                format!("group {group} starts: {after} ready"),
            );
            let ids: Vec<u32> = self
                .waiting
                .values()
                .filter(|w| w.spec.label.group == group)
                .map(|w| w.spec.label.id)
                .collect();
            for id in ids {
                let Some(waiting) = self.waiting.remove(&id) else {
                    continue;
                };
                self.table.set_waiting(id, false);
                self.start_marked(waiting.place, vec![(waiting.spec, waiting.suspended)]);
            }
        }
    }

    /// On the herd's stop, tells the groups others start after to stop
    /// once those have ended (they wait for this word, bounded by their
    /// `stop_wait`); the others stopped with the herd at once.
    fn stop_in_order(&mut self) {
        let table = &self.table;
        let held = &self.held;
        let groups = self.order.may_stop(&self.config, |group| {
            table.live_ids(group).is_empty() && !held.values().any(|h| h.spec.label.group == group)
        });
        for group in groups {
            let ids = self.table.live_ids(&group);
            if ids.is_empty() {
                continue;
            }
            self.log(
                Level::Notice,
                format!("stopping group {group}: the groups after it have ended"),
            );
            for id in ids {
                self.out.push(Effect::Command {
                    id,
                    command: InstanceCommand::Remove,
                });
            }
        }
    }

    /// Says so of feeders that do not listen in time; a local feeder's
    /// consumers then start anyway (its port is known: they connect once
    /// it listens), a remote feeder's wait for it.
    fn late_feeders(&mut self, now: Instant) {
        let late: Vec<String> = self
            .gates
            .iter()
            .filter(|(_, gate)| gate.deadline.is_some_and(|at| at <= now))
            .map(|(group, _)| group.clone())
            .collect();
        for group in late {
            let Some(gate) = self.gates.get_mut(&group) else {
                continue;
            };
            gate.deadline = None;
            let limit = humantime::format_duration(FEEDER_START_TIMEOUT);
            let known = gate.known.clone();
            let message = match &known {
                Some(_) => format!("feeder did not listen within {limit}; starting its consumers anyway (they connect when it does)"),
                None => format!("feeder did not listen within {limit}; its consumers wait for it"),
            };
            self.out.push(Effect::Log {
                level: Level::Error,
                instance: Some(gate.feeder.clone()),
                message,
            });
            if known.is_some() {
                gate.address = known;
                self.release(&group);
            }
        }
    }

    /// The message of a group's suspend or resume that settled.
    fn settled(group: &str, suspend: bool, instances: usize) -> String {
        let done = if suspend { "suspended" } else { "resumed" };
        format!("group {group} {done} ({})", count(instances, "instance"))
    }
}
