//! The master's shell: the run loop around the [core](super::core). It
//! only does I/O: it hands the core what happens (instance events, hosts'
//! reports, operators' requests, deadlines, the stop) and carries out
//! what the core decides (hand instances to their host's supervisor, the
//! master's own host's as a remote one's, command them, answer
//! operators, log).

use super::control::{stream_logs, ControlRequest};
use super::core::{Effect, Event, Place, ReplyId};
use super::herd::{Ask, Board};
use super::hooks::Hooks;
use super::host::{HostHandle, HostReport};
use super::local;
use super::remote::{self, AgentSettings, HostPlan};
use super::request::{Asked, Reply, Request};
use crate::config::Config;
use crate::log::InstanceLabel;
use crate::protocol::slave::Level;
use crate::supervise::instance::{
    self, InstanceCommand, InstanceEvent, InstanceReport, InstanceSpec,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// What comes into the run loop.
pub(crate) struct Inbox {
    /// Events of local instances (and those the core emits).
    pub(crate) events: mpsc::UnboundedReceiver<InstanceEvent>,
    /// Reports of hosts (and local feeders' addresses).
    pub(crate) reports: mpsc::UnboundedReceiver<HostReport>,
    /// Requests of [`Herd`](super::Herd) handles.
    pub(crate) asks: mpsc::UnboundedReceiver<Ask>,
    /// Requests of the control socket.
    pub(crate) control: mpsc::Receiver<ControlRequest>,
}

/// The run loop's I/O: supervisors, hosts, operators waiting.
pub(crate) struct Shell {
    /// The core.
    pub(crate) board: Board,
    /// What every local instance's supervisor shares.
    pub(crate) context: instance::Supervision,
    /// What every host's supervisor shares.
    pub(crate) settings: Arc<AgentSettings>,
    /// Where hosts and local feeders report.
    pub(crate) reports_tx: mpsc::UnboundedSender<HostReport>,
    /// Where the events callbacks are told, until the run has ended.
    publish_tx: Option<mpsc::UnboundedSender<(Arc<InstanceLabel>, InstanceEvent)>>,
    /// The herd's longest stop grace, followed by hosts.
    pub(crate) longest_grace: watch::Sender<Duration>,
    /// Each instance's host.
    routes: BTreeMap<u32, HostHandle>,
    /// Each host's supervisor (the latest one, if it had ended).
    hosts: Vec<HostHandle>,
    /// Hosts' supervisors, the master's own host's too.
    tasks: JoinSet<Vec<InstanceReport>>,
    /// Log streams of `taskherd logs`: they end with the run.
    streams: JoinSet<()>,
    /// Hooks running.
    hooks: Hooks,
    /// Operators waiting for an answer.
    replies: BTreeMap<ReplyId, Reply>,
    /// The next reply's id.
    next_reply: u64,
    /// Every instance's final word so far.
    pub(crate) reports: Vec<InstanceReport>,
    /// The run loop has ended: nothing starts any more.
    ended: bool,
}

impl Shell {
    pub(crate) fn new(
        board: Board,
        context: instance::Supervision,
        settings: Arc<AgentSettings>,
        reports_tx: mpsc::UnboundedSender<HostReport>,
        publish_tx: mpsc::UnboundedSender<(Arc<InstanceLabel>, InstanceEvent)>,
        longest_grace: watch::Sender<Duration>,
    ) -> Self {
        let hooks = Hooks::new(context.sink.clone());
        Shell {
            hooks,
            board,
            context,
            settings,
            reports_tx,
            publish_tx: Some(publish_tx),
            longest_grace,
            routes: BTreeMap::new(),
            hosts: Vec::new(),
            tasks: JoinSet::new(),
            streams: JoinSet::new(),
            replies: BTreeMap::new(),
            next_reply: 0,
            reports: Vec::new(),
            ended: false,
        }
    }

    /// Runs the herd until every supervisor has ended and the core holds
    /// no instance back.
    pub(crate) async fn run(&mut self, inbox: &mut Inbox) {
        let shutdown = self.context.shutdown.clone();
        let mut stop_announced = false;
        let mut kill_announced = false;
        loop {
            // A stop (or kill) is told to the core before anything that
            // came with it, and before the loop may end: the last
            // supervisors can end in the same instant (said even then).
            if shutdown.is_stopping() && !stop_announced {
                stop_announced = true;
                let event = Event::Stopping {
                    reason: shutdown.reason().unwrap_or("stop requested").to_string(),
                    hint: shutdown.kill_hint().map(str::to_string),
                };
                self.handle(event).await;
            }
            if shutdown.is_killing() && !kill_announced {
                kill_announced = true;
                let event = Event::Killing {
                    reason: shutdown.reason().unwrap_or("kill requested").to_string(),
                };
                self.handle(event).await;
            }
            if self.tasks.is_empty() && !self.board.lock().holds_instances() {
                break;
            }
            let deadline = self.board.lock().next_deadline();
            let event = tokio::select! {
                Some(joined) = self.tasks.join_next() => {
                    match joined {
                        Ok(done) => self.reports.extend(done),
                        Err(err) => {
                            let message = format!("an instance supervisor crashed: {err}");
                            self.context.sink.master_event(Level::Critical, message).await;
                        }
                    }
                    continue;
                }
                Some(event) = inbox.events.recv() => Event::Instance(event),
                Some(report) = inbox.reports.recv() => Self::event_of(report),
                Some((request, reply)) = inbox.asks.recv() => self.request(request, reply),
                Some(request) = inbox.control.recv() => match self.control(request) {
                    Some(event) => event,
                    None => continue,
                },
                Some(_) = self.streams.join_next(), if !self.streams.is_empty() => continue,
                _ = sleep_until(deadline) => Event::Tick,
                // Wakes the loop, whose top tells the core.
                _ = shutdown.stopping(), if !stop_announced => continue,
                _ = shutdown.killing(), if !kill_announced => continue,
            };
            self.handle(event).await;
        }
        // The last events of supervisors that ended are still queued; what
        // they would start (the next step of a change) is too late.
        self.ended = true;
        while let Ok(event) = inbox.events.try_recv() {
            self.handle(Event::Instance(event)).await;
        }
        while let Ok(report) = inbox.reports.try_recv() {
            self.handle(Self::event_of(report)).await;
        }
    }

    /// The run's events are all told: the events callbacks' task can end.
    pub(crate) fn stop_publishing(&mut self) {
        self.publish_tx = None;
    }

    /// The run has ended: operators who stopped it read `outcome`; log
    /// streams end.
    pub(crate) async fn finish(&mut self, outcome: String) {
        // Log followers had the end too; requests still pending end here.
        self.streams.abort_all();
        // The stop's own hooks (on_stop) run to their end, each bounded.
        self.hooks.finish().await;
        self.handle(Event::Ended { outcome }).await;
        self.replies.clear();
    }

    fn event_of(report: HostReport) -> Event {
        match report {
            HostReport::Event(event) => Event::Instance(event),
            HostReport::Listening { id, address } => Event::Listening { id, address },
            HostReport::Lost {
                host,
                problem,
                retry_in,
            } => Event::HostLost {
                host,
                problem,
                retry_in,
            },
        }
    }

    /// An operator's request, its answer to go to `reply`.
    fn request(&mut self, request: Request, reply: Option<Reply>) -> Event {
        let reply = reply.map(|reply| {
            let id = ReplyId(self.next_reply);
            self.next_reply += 1;
            self.replies.insert(id, reply);
            id
        });
        Event::Request { request, reply }
    }

    /// A request of the control socket: the herd's, or a log stream
    /// (served here, beside the core).
    fn control(&mut self, request: ControlRequest) -> Option<Event> {
        let ControlRequest { request, reply } = request;
        match Request::from_wire(request) {
            Ok(Asked::Herd(request)) => Some(self.request(request, Some(Reply::Control(reply)))),
            Ok(Asked::Logs(request)) => {
                let known = match &request.group {
                    Some(group) => self.board.lock().known_group(group),
                    None => Ok(()),
                };
                match known {
                    Ok(()) => {
                        let stream = stream_logs(&self.context.sink, request, reply);
                        self.streams.spawn(stream);
                    }
                    Err(err) => Reply::Control(reply).send(Err(err)),
                }
                None
            }
            Err(err) => {
                Reply::Control(reply).send(Err(err));
                None
            }
        }
    }

    /// Hands `event` to the core and carries out its effects (and those
    /// of the events they lead to).
    pub(crate) async fn handle(&mut self, event: Event) {
        let mut effects: VecDeque<Effect> = self.board.handle(event).into();
        while let Some(effect) = effects.pop_front() {
            if let Some(next) = self.carry_out(effect).await {
                effects.extend(self.board.handle(next));
            }
        }
    }

    /// Carries out one effect; returns the event it leads to, if any.
    async fn carry_out(&mut self, effect: Effect) -> Option<Event> {
        let sink = &self.context.sink;
        match effect {
            Effect::Start { .. } if self.ended => {}
            Effect::Start {
                place,
                instances,
                suspended,
            } => self.start(place, instances, &suspended),
            Effect::Command { id, command } => self.send(id, command),
            Effect::NeverRan(label) => {
                let report = instance::never_ran(label, self.context.events.as_ref());
                self.reports.push(report);
            }
            Effect::Emit { id, kind } => instance::emit(self.context.events.as_ref(), id, kind),
            Effect::Hook(call) => self.hooks.call(call).await,
            Effect::Publish { label, event } => {
                if let Some(publish_tx) = &self.publish_tx {
                    let _ = publish_tx.send((label, event));
                }
            }
            Effect::Answer { reply, answer } => {
                if let Some(reply) = self.replies.remove(&reply) {
                    reply.send(answer);
                }
            }
            Effect::Log {
                level,
                instance: Some(label),
                message,
            } => sink.instance_event(&label, level, message).await,
            Effect::Log {
                level,
                instance: None,
                message,
            } => sink.master_event(level, message).await,
            Effect::ReadConfig { path, reply } => {
                let result = Config::load(&path);
                return Some(Event::ConfigRead { result, reply });
            }
            Effect::Prepare(mut plan) => {
                let result = super::queue::prepare(&mut plan).map(|()| plan);
                return Some(Event::Prepared(result));
            }
            Effect::Shutdown { kill: true, reason } => self.context.shutdown.kill_now(reason),
            Effect::Shutdown {
                kill: false,
                reason,
            } => self.context.shutdown.request_stop(reason),
            Effect::LongestGrace(grace) => {
                self.longest_grace.send_replace(grace);
            }
        }
        None
    }

    /// Hands instances to the supervisor of their host (started if it
    /// has none running); those in `suspended` start suspended.
    fn start(&mut self, place: Place, instances: Vec<InstanceSpec>, suspended: &[u32]) {
        let ids: Vec<u32> = instances.iter().map(|spec| spec.label.id).collect();
        let running = self
            .hosts
            .iter()
            .find(|host| host.is(&place) && host.is_open())
            .cloned();
        let instances = match running {
            Some(host) => match host.add(instances, suspended) {
                Ok(()) => {
                    self.route(&ids, &host);
                    return;
                }
                Err(instances) => instances,
            },
            None => instances,
        };
        // Handed over before the supervisor runs: it ends at once when it
        // has nothing to supervise.
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let host = HostHandle::new(place.clone(), commands_tx);
        let _ = host.add(instances, suspended);
        match place {
            Place::Local => {
                self.tasks.spawn(local::supervise_local(
                    self.context.clone(),
                    self.reports_tx.clone(),
                    commands_rx,
                ));
            }
            Place::Host { host, ssh } => {
                self.tasks.spawn(remote::supervise_host(
                    HostPlan {
                        host,
                        ssh: *ssh,
                        instances: Vec::new(),
                    },
                    self.settings.clone(),
                    self.context.sink.clone(),
                    self.context.shutdown.clone(),
                    self.reports_tx.clone(),
                    commands_rx,
                ));
            }
        }
        self.hosts.retain(|known| !known.is(host.place()));
        self.hosts.push(host.clone());
        self.route(&ids, &host);
    }

    fn route(&mut self, ids: &[u32], host: &HostHandle) {
        for id in ids {
            self.routes.insert(*id, host.clone());
        }
    }

    fn send(&self, id: u32, command: InstanceCommand) {
        if let Some(host) = self.routes.get(&id) {
            host.command(id, command);
        }
    }
}

/// Sleeps until `deadline` (a std instant on tokio's clock), or forever.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    crate::supervise::sleep_until_some(deadline.map(tokio::time::Instant::from_std)).await;
}
