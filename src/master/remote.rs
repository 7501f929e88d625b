//! Remote placement: one task per host keeps one SSH connection and one
//! agent, hands the agent the host's instances, relays what it reports,
//! and reconnects (restarting the instances) when the host is lost.
//!
//! It speaks the interface of every host, the master's own too: it is
//! handed instances and commands as [`HostCommand`]s, and what it learns
//! goes to the run loop as [`HostReport`]s, in order, on one channel:
//! instance events, feeders listening, the host lost.

pub use super::host::{HostCommand, HostReport};
use super::links::{HostLinks, LinkState};
use super::queue::FeederAddress;
use super::ssh;
use crate::config::{HostSpec, RestartPolicy, RestartSpec, SshOptions};
use crate::log::{InstanceLabel, LogRecord, LogSink};
use crate::protocol::agent::{time_of, FromAgent, ToAgent};
use crate::protocol::slave::Level;
use crate::protocol::{Connection, PROTOCOL_VERSION};
use crate::supervise::instance::{
    event_now, pin_feeder_port, EventKind, InstanceCommand, InstanceEnd, InstanceReport,
    InstanceSpec,
};
use crate::supervise::restart::backoff_delay;
use crate::supervise::shutdown::Shutdown;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// Longest wait for the agent's hello.
const AGENT_HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything one host runs, and how to reach it: pure data.
#[derive(Debug, Clone)]
pub struct HostPlan {
    /// The host as written in the config.
    pub host: HostSpec,
    /// SSH settings (of the first placement naming this host).
    pub ssh: SshOptions,
    /// The instances placed on it, in id order.
    pub instances: Vec<InstanceSpec>,
}

/// Settings shared by every host of a run.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Heartbeat interval, both ways.
    pub heartbeat: Duration,
    /// Silence after which a side gives the other up.
    pub orphan_timeout: Duration,
    /// Remote cache dir of agents.
    pub agent_dir: String,
    /// A preinstalled agent, instead of uploading.
    pub agent_path: Option<String>,
    /// Local directory of the ControlMaster sockets (short: the socket path
    /// must fit 104/108 bytes).
    pub control_dir: PathBuf,
    /// The herd's longest stop grace ([`Config::longest_stop_grace`]; it
    /// only grows with reloads, since instances of a group a reload removed
    /// may still be stopping), to bound the wait for reports at stop.
    ///
    /// [`Config::longest_stop_grace`]: crate::config::Config::longest_stop_grace
    pub stop_grace: tokio::sync::watch::Receiver<Duration>,
    /// Turns to open an SSH connection (`master.max_handshakes`), shared
    /// by every host.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Turns of the hosts worked on at once (`master.max_active_hosts`),
    /// each held by a host's supervisor from a connection until its end,
    /// or until the host is down; `None`: every host at once.
    pub host_turns: Option<Arc<tokio::sync::Semaphore>>,
    /// Each host's connection state, noted by its supervisor (for the
    /// metrics and the dashboard).
    pub links: HostLinks,
}

/// Reconnection backoff: 1 s doubling to 30 s, ±20 %.
fn reconnect_backoff() -> RestartSpec {
    RestartSpec {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
        jitter: 0.2,
        ..RestartSpec::default()
    }
}

/// Retries of a host that refused the handshake (sshd's MaxStartups):
/// 200 ms doubling to 3 s, ±50 %, so that the refused ones spread out.
fn refused_backoff() -> RestartSpec {
    RestartSpec {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(3),
        jitter: 0.5,
        ..RestartSpec::default()
    }
}

/// How one connection to a host ended.
enum HostOutcome {
    /// Every instance is reported: the host is done.
    Done,
    /// The host was lost before that; reconnect and restart the rest.
    Lost(String),
    /// The host refused the handshake (sshd's MaxStartups): try again
    /// soon, quietly.
    Refused(String),
}

/// Where a host's supervisor reports.
#[derive(Debug, Clone)]
struct Reporter(mpsc::UnboundedSender<HostReport>);

impl Reporter {
    /// Sends one event of instance `id` (nobody listening any more is
    /// fine: the run is ending).
    fn emit(&self, id: u32, kind: EventKind) {
        let _ = self.0.send(HostReport::Event(event_now(id, kind)));
    }

    fn send(&self, report: HostReport) {
        let _ = self.0.send(report);
    }

    /// The report of an instance that ends without having run (removed,
    /// or stopped while held back), its `Ended` event sent.
    fn never_ran(&self, label: Arc<InstanceLabel>) -> InstanceReport {
        let end = InstanceEnd::Stopped { killed: false };
        self.emit(label.id, EventKind::Ended { end: end.clone() });
        InstanceReport { label, end }
    }
}

/// Supervises the instances of one host until each has a final report.
///
/// Consumers of a queue group come with their feeder's address; a feeder
/// on this host reports where it listens on `reports_tx`, with the events
/// of every instance and the loss of the host.
///
/// `commands` brings more instances (a reload, consumers whose feeder
/// listens) and operators' commands for single instances; the host's
/// supervision ends once every instance has its final report.
pub async fn supervise_host(
    plan: HostPlan,
    settings: Arc<AgentSettings>,
    sink: LogSink,
    shutdown: Shutdown,
    reports_tx: mpsc::UnboundedSender<HostReport>,
    mut commands: mpsc::UnboundedReceiver<HostCommand>,
) -> Vec<InstanceReport> {
    let reporter = Reporter(reports_tx);
    let host = plan.host.label.clone();
    let mut state = HostState::default();
    state.add(plan.instances.clone());
    let mut reports = Vec::new();
    let mut failures = 0u32;
    let mut refusals = 0u32;
    // Connections lost in a row, for `ssh.give_up_after`.
    let mut lost_in_a_row = 0u32;
    let mut last_problem = String::from("never connected");
    // A turn among `master.max_active_hosts`: taken before a connection,
    // held while the host is worked on, given back while it is down.
    let mut turn: Option<tokio::sync::OwnedSemaphorePermit> = None;
    loop {
        while let Ok(command) = commands.try_recv() {
            state.apply_offline(command, &mut reports, &reporter);
        }
        if nothing_left(&mut commands, &mut state, &mut reports, &reporter) {
            break;
        }
        if let (Some(turns), None, false) = (&settings.host_turns, &turn, shutdown.is_stopping()) {
            settings.links.set(
                &host,
                LinkState::Connecting,
                Some("waiting for its turn (master.max_active_hosts)".into()),
            );
            let waited = wait_for_turn(
                Arc::clone(turns),
                &mut state,
                &mut reports,
                &mut commands,
                &reporter,
                &shutdown,
            );
            match waited.await {
                Some(taken) => turn = Some(taken),
                // Done before its turn came (removed, or the run stopping).
                None => break,
            }
        }
        if shutdown.is_stopping() {
            let reason = format!("never started on {host}: {last_problem}");
            report_lost(&mut state, &reason, &mut reports, &sink, &reporter).await;
            break;
        }
        let mut run = HostRun {
            plan: &plan,
            settings: &settings,
            sink: &sink,
            shutdown: &shutdown,
            state: &mut state,
            reports: &mut reports,
            commands: &mut commands,
            reporter: &reporter,
        };
        settings.links.set(&host, LinkState::Connecting, None);
        let outcome = run.connect_and_serve().await;
        let reached = std::mem::take(&mut state.reached);
        if let HostOutcome::Refused(problem) | HostOutcome::Lost(problem) = &outcome {
            settings
                .links
                .set(&host, LinkState::Down, Some(problem.clone()));
            // Another host works while this one is down.
            turn = None;
        }
        match outcome {
            HostOutcome::Done => {
                refusals = 0;
                continue;
            }
            HostOutcome::Refused(problem) => {
                let delay = backoff_delay(&refused_backoff(), refusals, crate::random::unit());
                refusals = refusals.saturating_add(1);
                // Said once per streak: hundreds of hosts behind one sshd
                // may each be refused a few times on their way in.
                if refusals == 1 {
                    sink.master_event(
                        Level::Info,
                        format!("host {host}: {problem}; retrying shortly"),
                    )
                    .await;
                }
                last_problem = problem;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.stopping() => {}
                }
            }
            HostOutcome::Lost(problem) => {
                refusals = 0;
                // A connection that reached the agent starts the count again.
                lost_in_a_row = if reached {
                    1
                } else {
                    lost_in_a_row.saturating_add(1)
                };
                if let Some(limit) = plan.ssh.give_up_after.filter(|l| lost_in_a_row >= *l) {
                    let given_up = format!(
                        "given up after {} in a row",
                        crate::error_text::count(limit, "lost connection")
                    );
                    let said = format!("host {host}: {problem}; {given_up} (ssh.give_up_after)");
                    sink.master_event(Level::Error, said).await;
                    // What is pending, and what came in until now, ends lost.
                    close_commands(&mut commands, &mut state, &mut reports, &reporter);
                    let reason = format!("{problem}; {given_up}");
                    report_lost(&mut state, &reason, &mut reports, &sink, &reporter).await;
                    // Shown down, and why, for the rest of the run (not
                    // forgotten as a host whose work is done).
                    settings.links.set(&host, LinkState::Down, Some(reason));
                    return reports;
                }
                let delay = backoff_delay(&reconnect_backoff(), failures, crate::random::unit());
                failures = failures.saturating_add(1);
                // Its instances are gone with it, until the next agent.
                reporter.send(HostReport::Lost {
                    host: plan.host.clone(),
                    problem: problem.clone(),
                    retry_in: delay,
                });
                last_problem = problem;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.stopping() => {}
                }
            }
        }
    }
    settings.links.forget(&host);
    reports
}

/// The instances of a host, across connections.
#[derive(Default)]
struct HostState {
    labels: BTreeMap<u32, Arc<InstanceLabel>>,
    /// Instances without a final report yet.
    pending: BTreeMap<u32, InstanceSpec>,
    /// Instances an operator suspended (suspended again after a
    /// reconnection).
    suspended: BTreeSet<u32>,
    /// Instances being removed: a reconnection must not start them again.
    removed: BTreeSet<u32>,
    /// The connection under way reached the agent (its hello came); read
    /// and cleared when it ends.
    reached: bool,
}

impl HostState {
    fn add(&mut self, instances: Vec<InstanceSpec>) {
        for spec in instances {
            self.labels.insert(spec.label.id, spec.label.clone());
            self.pending.insert(spec.label.id, spec);
        }
    }

    /// Remembers what a command changes for later connections.
    fn note(&mut self, id: u32, command: InstanceCommand) {
        match command {
            InstanceCommand::Suspend => {
                self.suspended.insert(id);
            }
            InstanceCommand::Resume => {
                self.suspended.remove(&id);
            }
            // Only a resume ends a suspend, as the instance's supervisor
            // says (a restart of a suspended instance leaves it so).
            InstanceCommand::Restart => {}
            InstanceCommand::Remove => {
                self.suspended.remove(&id);
                self.removed.insert(id);
            }
        }
    }

    /// A command while no agent runs: instances are added, removed ones
    /// end at once, the others take effect at the next connection.
    fn apply_offline(
        &mut self,
        command: HostCommand,
        reports: &mut Vec<InstanceReport>,
        reporter: &Reporter,
    ) {
        match command {
            HostCommand::Add(instances) => self.add(instances),
            HostCommand::Instance {
                id,
                command: InstanceCommand::Remove,
            } => {
                if let Some(spec) = self.pending.remove(&id) {
                    reports.push(reporter.never_ran(spec.label));
                }
            }
            HostCommand::Instance { id, command } => {
                self.note(id, command);
                if command == InstanceCommand::Suspend {
                    reporter.emit(id, EventKind::Suspended);
                }
            }
        }
    }
}

struct HostRun<'a> {
    plan: &'a HostPlan,
    settings: &'a AgentSettings,
    sink: &'a LogSink,
    shutdown: &'a Shutdown,
    state: &'a mut HostState,
    reports: &'a mut Vec<InstanceReport>,
    commands: &'a mut mpsc::UnboundedReceiver<HostCommand>,
    reporter: &'a Reporter,
}

impl HostRun<'_> {
    async fn connect_and_serve(&mut self) -> HostOutcome {
        // The hello goes with the start command: the agent reads it as it
        // starts, without waiting for the master to see it start.
        let hello = ToAgent::Hello {
            version: PROTOCOL_VERSION,
            heartbeat: self.settings.heartbeat,
            orphan_timeout: self.settings.orphan_timeout,
        };
        let mut prelude = bytes::BytesMut::new();
        let encoded = crate::protocol::encode(&hello).and_then(|body| {
            tokio_util::codec::Encoder::encode(&mut crate::protocol::codec(), body, &mut prelude)
                .map_err(crate::protocol::ProtocolError::Io)
        });
        if let Err(err) = encoded {
            return HostOutcome::Lost(format!("cannot encode the hello: {err}"));
        }
        let how = ssh::AgentStart {
            host: &self.plan.host,
            options: &self.plan.ssh,
            control_dir: &self.settings.control_dir,
            keepalive: self.settings.orphan_timeout / 3,
            handshakes: &self.settings.handshakes,
            agent_dir: &self.settings.agent_dir,
            agent_path: self.settings.agent_path.as_deref(),
            prelude: &prelude,
        };
        let (mut connection, running) = tokio::select! {
            started = ssh::start_agent(&how) => match started {
                Ok(started) => started,
                Err(err @ ssh::RemoteError::Refused(_)) => {
                    return HostOutcome::Refused(format!("cannot connect: {err}"))
                }
                Err(err @ ssh::RemoteError::Connect(_)) => {
                    return HostOutcome::Lost(format!("cannot connect: {err}"))
                }
                Err(err) => return HostOutcome::Lost(err.to_string()),
            },
            _ = self.shutdown.stopping() => return HostOutcome::Lost("stopped while connecting".into()),
        };
        let outcome = self.serve(running).await;
        // A lost agent is given its 2 s before it is cut off. Every report
        // of a done one is in: it ends by itself as its link closes, and
        // its exit status says nothing more. Waiting for that status would
        // cost each host's end a round trip through sshd and ssh.
        if !matches!(outcome, HostOutcome::Done) {
            connection.wait_agent(Duration::from_secs(2)).await;
        }
        // Closing the ControlMaster ends whatever still runs over it.
        connection.close().await;
        outcome
    }

    async fn serve(&mut self, running: ssh::RunningAgent) -> HostOutcome {
        let label = self.plan.host.label.clone();
        let ssh::RunningAgent {
            stdin,
            stdout,
            stderr,
            path: agent_path,
            uploaded,
            through_sh,
        } = running;
        if through_sh {
            let message = format!(
                "host {label}: the login shell cannot run the agent's start command; \
                 it ran through sh -c (one more remote command per connection)"
            );
            self.sink.master_event(Level::Info, message).await;
        }
        if uploaded {
            let message = format!("host {label}: uploaded the agent to {agent_path}");
            self.sink.master_event(Level::Info, message).await;
        }
        tokio::spawn(relay_agent_stderr(stderr, label.clone(), self.sink.clone()));

        let (to_agent_tx, to_agent_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_to_agent(stdin, to_agent_rx));
        let mut from_agent = Connection::new(tokio::io::join(stdout, tokio::io::empty()));
        // Suspended instances are held here: a reconnection does not
        // start them, a resume does. The others are handed over at once,
        // behind the hello: an agent that turns out wrong below never
        // started them (it checks the hello first).
        let mut held = BTreeSet::new();
        let ids: Vec<u32> = self.state.pending.keys().copied().collect();
        let count = self.start(&ids, &mut held, &to_agent_tx);
        let hello =
            tokio::time::timeout(AGENT_HELLO_TIMEOUT, from_agent.read_frame::<FromAgent>()).await;
        let pid = match hello {
            Ok(Ok(Some(FromAgent::Hello { version, pid }))) if version == PROTOCOL_VERSION => pid,
            Ok(Ok(Some(FromAgent::Hello { version, .. }))) => {
                return HostOutcome::Lost(format!(
                    "agent {agent_path} speaks protocol {version}, the master {PROTOCOL_VERSION}"
                ))
            }
            Ok(Ok(Some(_))) => {
                return HostOutcome::Lost("agent's first frame is not a hello".into())
            }
            Ok(Ok(None)) => {
                return HostOutcome::Lost(format!("agent {agent_path} exited at start"))
            }
            Ok(Err(err)) => return HostOutcome::Lost(format!("agent link: {err}")),
            Err(_) => return HostOutcome::Lost("agent did not answer".into()),
        };
        self.settings.links.set(&label, LinkState::Up, None);
        self.state.reached = true;
        let held_back = match held.len() {
            0 => String::new(),
            n => format!(" ({n} suspended)"),
        };
        self.sink
            .master_event(
                Level::Info,
                format!(
                    "host {label}: connected, agent pid {pid} runs {}{held_back}",
                    crate::error_text::count(count, "instance")
                ),
            )
            .await;

        let outcome = self.relay(&mut from_agent, &to_agent_tx, held).await;
        drop(to_agent_tx);
        writer.abort();
        outcome
    }

    /// Hands instances `ids` to the agent, holding back suspended ones;
    /// returns how many were handed over.
    fn start(
        &mut self,
        ids: &[u32],
        held: &mut BTreeSet<u32>,
        to_agent_tx: &mpsc::UnboundedSender<ToAgent>,
    ) -> usize {
        let mut instances = Vec::new();
        for id in ids {
            if self.state.removed.contains(id) {
                self.never_started(&[*id]);
                continue;
            }
            let Some(spec) = self.state.pending.get(id) else {
                continue;
            };
            if self.state.suspended.contains(id) {
                held.insert(*id);
                self.reporter.emit(*id, EventKind::Suspended);
                continue;
            }
            instances.push(spec.clone());
        }
        let count = instances.len();
        if count > 0 {
            let _ = to_agent_tx.send(ToAgent::Start { instances });
        }
        count
    }

    async fn relay(
        &mut self,
        from_agent: &mut Connection<
            tokio::io::Join<tokio::io::BufReader<ssh::RemoteRead>, tokio::io::Empty>,
        >,
        to_agent_tx: &mpsc::UnboundedSender<ToAgent>,
        mut held: BTreeSet<u32>,
    ) -> HostOutcome {
        let orphan_timeout = self.settings.orphan_timeout;
        let mut ticker = tokio::time::interval(self.settings.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut stop_sent = self.shutdown.is_stopping();
        let mut kill_sent = false;
        // After a stop, reports are awaited this long at most.
        let mut stop_deadline = None;
        if stop_sent {
            let _ = to_agent_tx.send(ToAgent::Stop {
                reason: self.shutdown.reason().unwrap_or("stop").to_string(),
            });
            stop_deadline = Some(Instant::now() + self.stop_wait());
            let ids: Vec<u32> = std::mem::take(&mut held).into_iter().collect();
            self.never_started(&ids);
        }
        while !self.state.pending.is_empty() {
            tokio::select! {
                Some(command) = self.commands.recv() => match command {
                    HostCommand::Add(instances) => {
                        let ids: Vec<u32> = instances.iter().map(|s| s.label.id).collect();
                        self.state.add(instances);
                        if stop_sent {
                            self.never_started(&ids);
                        } else {
                            self.start(&ids, &mut held, to_agent_tx);
                        }
                    }
                    HostCommand::Instance { id, command } => {
                        self.state.note(id, command);
                        self.command(id, command, &mut held, to_agent_tx);
                    }
                },
                frame = from_agent.read_frame::<FromAgent>() => {
                    last_heard = Instant::now();
                    match frame {
                        Ok(Some(frame)) => self.handle(frame).await,
                        Ok(None) => return self.lost(stop_sent, "the agent's link closed".into()).await,
                        Err(err) => return self.lost(stop_sent, format!("agent link: {err}")).await,
                    }
                }
                _ = tokio::time::sleep_until(last_heard + orphan_timeout) => {
                    let problem = format!(
                        "no heartbeat from the agent for {}, host marked down",
                        humantime::format_duration(orphan_timeout)
                    );
                    return self.lost(stop_sent, problem).await;
                }
                _ = ticker.tick() => {
                    let _ = to_agent_tx.send(ToAgent::Heartbeat);
                }
                _ = self.shutdown.stopping(), if !stop_sent => {
                    stop_sent = true;
                    stop_deadline = Some(Instant::now() + self.stop_wait());
                    let _ = to_agent_tx.send(ToAgent::Stop {
                        reason: self.shutdown.reason().unwrap_or("stop").to_string(),
                    });
                    let ids: Vec<u32> = std::mem::take(&mut held).into_iter().collect();
                    self.never_started(&ids);
                }
                _ = self.shutdown.killing(), if !kill_sent => {
                    kill_sent = true;
                    let _ = to_agent_tx.send(ToAgent::Kill);
                }
                _ = crate::supervise::sleep_until_some(stop_deadline) => {
                    return self.lost(true, "no report from the agent within the stop deadline".to_string()).await;
                }
            }
        }
        HostOutcome::Done
    }

    /// Carries out an operator's command for one instance: the agent's
    /// business once it runs there; a suspended instance held here is
    /// started or given up here.
    fn command(
        &mut self,
        id: u32,
        command: InstanceCommand,
        held: &mut BTreeSet<u32>,
        to_agent_tx: &mpsc::UnboundedSender<ToAgent>,
    ) {
        if !held.contains(&id) {
            let _ = to_agent_tx.send(ToAgent::Command { id, command });
            return;
        }
        match command {
            InstanceCommand::Resume => {
                held.remove(&id);
                self.start(&[id], held, to_agent_tx);
            }
            InstanceCommand::Remove => {
                held.remove(&id);
                self.never_started(&[id]);
            }
            // Only a resume ends a suspend.
            InstanceCommand::Suspend | InstanceCommand::Restart => {}
        }
    }

    /// Instances held back when the herd stops end without having
    /// started.
    fn never_started(&mut self, ids: &[u32]) {
        for id in ids {
            if let Some(spec) = self.state.pending.remove(id) {
                self.reports.push(self.reporter.never_ran(spec.label));
            }
        }
    }

    /// The instances this agent ran whose restart policy is `never` end
    /// lost with it: the next agent must not run them a second time.
    /// (Suspended ones did not run; the others restart per their policy.)
    async fn end_never_restarted(&mut self, problem: &str) {
        let state = &mut *self.state;
        let ids: Vec<u32> = state
            .pending
            .iter()
            .filter(|(_, spec)| spec.restart.policy == RestartPolicy::Never)
            .map(|(id, _)| *id)
            .filter(|id| !state.suspended.contains(id) && !state.removed.contains(id))
            .collect();
        let reason = format!("{problem}; not run again (restart policy never)");
        for id in ids {
            if let Some(spec) = self.state.pending.remove(&id) {
                end_lost(spec.label, &reason, self.reports, self.sink, self.reporter).await;
            }
        }
    }

    /// The wait for reports after a stop: the grace plus a margin for the
    /// agent to kill and report.
    fn stop_wait(&self) -> Duration {
        *self.settings.stop_grace.borrow() + self.settings.orphan_timeout
    }

    async fn handle(&mut self, frame: FromAgent) {
        match frame {
            FromAgent::Log {
                id,
                time_ms,
                level,
                stream,
                message,
            } => {
                let instance = id.and_then(|id| self.state.labels.get(&id).cloned());
                let message = if instance.is_none() {
                    format!("host {}: agent: {message}", self.plan.host.label)
                } else {
                    message
                };
                self.sink
                    .send(LogRecord {
                        time: time_of(time_ms),
                        level,
                        instance,
                        stream,
                        message: message.into(),
                    })
                    .await;
            }
            FromAgent::Ended { id, end } => {
                if self.state.pending.remove(&id).is_some() {
                    self.state.suspended.remove(&id);
                    if let Some(label) = self.state.labels.get(&id) {
                        self.reports.push(InstanceReport {
                            label: label.clone(),
                            end,
                        });
                    }
                }
            }
            FromAgent::Event(event) => self.reporter.send(HostReport::Event(event)),
            FromAgent::Listening { id, addr } => {
                let Some(label) = self.state.labels.get(&id) else {
                    return;
                };
                // A feeder on port 0 binds the same port after a
                // reconnection: its consumers have the address.
                if let Some(spec) = self.state.pending.get_mut(&id) {
                    pin_feeder_port(spec.identity.queue.as_mut(), Some(&addr));
                }
                match addr.parse() {
                    Ok(listened) => self.reporter.send(HostReport::Listening {
                        id,
                        address: FeederAddress {
                            listened,
                            host: label.host.clone(),
                            dial_name: Some(self.plan.host.name.clone()),
                        },
                    }),
                    Err(_) => {
                        let message = format!("feeder reports a bad address {addr:?}");
                        self.sink.instance_event(label, Level::Error, message).await;
                    }
                }
            }
            FromAgent::Heartbeat | FromAgent::Hello { .. } => {}
        }
    }

    /// The link ended before every report: during a stop the rest is
    /// reported lost (the agent stops them itself), otherwise reconnect.
    async fn lost(&mut self, stopping: bool, problem: String) -> HostOutcome {
        if !stopping {
            self.end_never_restarted(&problem).await;
            return HostOutcome::Lost(problem);
        }
        report_lost(self.state, &problem, self.reports, self.sink, self.reporter).await;
        HostOutcome::Done
    }
}

/// Waits for one of the `turns` of `master.max_active_hosts`, serving
/// the host's commands offline meanwhile: the turn to hold. `None` when
/// the host ended before its turn came (its instances all removed, or the
/// run stopping: they end stopped, never having run), its reports in
/// `reports`.
async fn wait_for_turn(
    turns: Arc<tokio::sync::Semaphore>,
    state: &mut HostState,
    reports: &mut Vec<InstanceReport>,
    commands: &mut mpsc::UnboundedReceiver<HostCommand>,
    reporter: &Reporter,
    shutdown: &Shutdown,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let turn = turns.acquire_owned();
    tokio::pin!(turn);
    let mut commands_open = true;
    loop {
        tokio::select! {
            // A stop wins over a turn that comes at the same time.
            biased;
            () = shutdown.stopping() => break,
            turn = &mut turn => match turn {
                Ok(turn) if !shutdown.is_stopping() => return Some(turn),
                // Closed (it never is), or the run stopping meanwhile.
                _ => break,
            },
            command = commands.recv(), if commands_open => match command {
                Some(command) => state.apply_offline(command, reports, reporter),
                None => commands_open = false,
            },
        }
        if nothing_left(commands, state, reports, reporter) {
            return None;
        }
    }
    close_commands(commands, state, reports, reporter);
    for (_, spec) in std::mem::take(&mut state.pending) {
        reports.push(reporter.never_ran(spec.label));
    }
    None
}

/// Whether the host is done: nothing pending, and nothing more can come
/// (its commands are closed once nothing is pending; what came in before
/// is still served, and may add instances).
fn nothing_left(
    commands: &mut mpsc::UnboundedReceiver<HostCommand>,
    state: &mut HostState,
    reports: &mut Vec<InstanceReport>,
    reporter: &Reporter,
) -> bool {
    if !state.pending.is_empty() {
        return false;
    }
    close_commands(commands, state, reports, reporter);
    state.pending.is_empty()
}

/// Closes a host's commands: nothing more comes in, and what came in
/// before is applied.
fn close_commands(
    commands: &mut mpsc::UnboundedReceiver<HostCommand>,
    state: &mut HostState,
    reports: &mut Vec<InstanceReport>,
    reporter: &Reporter,
) {
    commands.close();
    while let Ok(command) = commands.try_recv() {
        state.apply_offline(command, reports, reporter);
    }
}

/// Gives up on the instances still pending, saying why for each.
async fn report_lost(
    state: &mut HostState,
    reason: &str,
    reports: &mut Vec<InstanceReport>,
    sink: &LogSink,
    reporter: &Reporter,
) {
    for (id, spec) in std::mem::take(&mut state.pending) {
        let label = spec.label;
        if state.suspended.contains(&id) || state.removed.contains(&id) {
            // Not meant to run anyway: stopped, not lost.
            reports.push(reporter.never_ran(label));
            continue;
        }
        end_lost(label, reason, reports, sink, reporter).await;
    }
}

/// Ends one instance lost with its host: said, its `Ended` event sent,
/// its final report kept.
async fn end_lost(
    label: Arc<InstanceLabel>,
    reason: &str,
    reports: &mut Vec<InstanceReport>,
    sink: &LogSink,
    reporter: &Reporter,
) {
    sink.instance_event(&label, Level::Error, format!("lost: {reason}"))
        .await;
    let end = InstanceEnd::Lost {
        reason: reason.to_string(),
    };
    reporter.emit(label.id, EventKind::Ended { end: end.clone() });
    reports.push(InstanceReport { label, end });
}

async fn write_to_agent(
    stdin: ssh::RemoteWrite,
    mut to_agent_rx: mpsc::UnboundedReceiver<ToAgent>,
) {
    let mut link = Connection::new(tokio::io::join(tokio::io::empty(), stdin));
    while let Some(frame) = to_agent_rx.recv().await {
        if link.write_frame(&frame).await.is_err() {
            return;
        }
    }
}

/// The agent's own diagnostics (and the remote shell's errors, such as a
/// missing binary) become warnings of the host.
async fn relay_agent_stderr(stderr: ssh::RemoteRead, host: String, sink: LogSink) {
    let mut lines = FramedRead::new(stderr, crate::supervise::output::LineDecoder::default());
    while let Some(Ok(line)) = lines.next().await {
        sink.master_event(Level::Warning, format!("host {host}: agent: {line}"))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RestartSpec;
    use crate::protocol::slave::Identity;
    use crate::supervise::process::ProcessSpec;

    fn spec(id: u32) -> InstanceSpec {
        InstanceSpec {
            label: Arc::new(InstanceLabel {
                group: "g".into(),
                host: "web1".into(),
                command: "w".into(),
                id,
                group_id: id,
            }),
            process: ProcessSpec {
                program: "w".into(),
                args: vec![],
                env: vec![],
                cwd: None,
                own_executable: false,
            },
            identity: Identity {
                vars: Default::default(),
                id,
                group_id: id,
                group_count: 3,
                group: "g".into(),
                host: "web1".into(),
                params: serde_json::json!({}),
                timeout: None,
                stop_grace: Duration::from_secs(5),
                max_jobs: None,
                queue: None,
            },
            plain_timeout: None,
            stop_grace: Duration::from_secs(5),
            restart: RestartSpec::default(),
            max_lifetime: None,
            time_limit: None,
            health: None,
            limits: Default::default(),
            ready: None,
            stop_wait: None,
        }
    }

    /// The events reported so far, as `(id, kind)`.
    fn events(reports_rx: &mut mpsc::UnboundedReceiver<HostReport>) -> Vec<(u32, EventKind)> {
        let mut events = Vec::new();
        while let Ok(report) = reports_rx.try_recv() {
            if let HostReport::Event(event) = report {
                events.push((event.id, event.kind));
            }
        }
        events
    }

    #[tokio::test]
    async fn offline_commands_wait_for_the_next_agent_and_a_stop_tells_lost_from_stopped() {
        let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
        let reporter = Reporter(reports_tx);
        let mut state = HostState::default();
        let mut reports = Vec::new();
        state.apply_offline(
            HostCommand::Add(vec![spec(1), spec(2), spec(3)]),
            &mut reports,
            &reporter,
        );
        // Suspended while no agent runs: noted for the next one, and said.
        let suspend = HostCommand::Instance {
            id: 2,
            command: InstanceCommand::Suspend,
        };
        state.apply_offline(suspend, &mut reports, &reporter);
        assert!(state.suspended.contains(&2));
        // A restart does not end the suspend (only a resume does), online
        // or not: the next agent holds it back still.
        let restart = HostCommand::Instance {
            id: 2,
            command: InstanceCommand::Restart,
        };
        state.apply_offline(restart, &mut reports, &reporter);
        assert!(state.suspended.contains(&2));
        // Removed while no agent runs: it ends at once, never having run.
        let remove = HostCommand::Instance {
            id: 3,
            command: InstanceCommand::Remove,
        };
        state.apply_offline(remove, &mut reports, &reporter);
        let stopped = InstanceEnd::Stopped { killed: false };
        assert_eq!(
            events(&mut reports_rx),
            [
                (2, EventKind::Suspended),
                (
                    3,
                    EventKind::Ended {
                        end: stopped.clone()
                    }
                )
            ]
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(state.pending.keys().copied().collect::<Vec<_>>(), [1, 2]);

        // The herd stops before an agent ran them: the suspended one was
        // not meant to run (stopped), the other is lost, and said so.
        let (sink, mut records) = LogSink::channel();
        report_lost(
            &mut state,
            "never started on web1: refused",
            &mut reports,
            &sink,
            &reporter,
        )
        .await;
        let ends: Vec<(u32, InstanceEnd)> = reports
            .iter()
            .map(|r| (r.label.id, r.end.clone()))
            .collect();
        let lost = InstanceEnd::Lost {
            reason: "never started on web1: refused".into(),
        };
        assert_eq!(
            ends,
            [
                (3, stopped.clone()),
                (1, lost.clone()),
                (2, stopped.clone())
            ]
        );
        assert_eq!(
            events(&mut reports_rx),
            [
                (1, EventKind::Ended { end: lost }),
                (2, EventKind::Ended { end: stopped })
            ]
        );
        let line = records.try_recv().expect("a log line");
        assert_eq!(line.message, "lost: never started on web1: refused");
        assert!(state.pending.is_empty());
    }

    /// A host of instances `ids` waiting for one of `turns`: its turn (if
    /// it got one) and its instances' final reports.
    async fn turn_of(
        turns: &Arc<tokio::sync::Semaphore>,
        ids: &[u32],
        commands: &mut mpsc::UnboundedReceiver<HostCommand>,
        shutdown: &Shutdown,
    ) -> (
        Option<tokio::sync::OwnedSemaphorePermit>,
        Vec<(u32, InstanceEnd)>,
    ) {
        let (reports_tx, _reports_rx) = mpsc::unbounded_channel();
        let mut state = HostState::default();
        state.add(ids.iter().map(|id| spec(*id)).collect());
        let mut reports = Vec::new();
        let reporter = Reporter(reports_tx);
        let turns = Arc::clone(turns);
        let turn = wait_for_turn(
            turns,
            &mut state,
            &mut reports,
            commands,
            &reporter,
            shutdown,
        )
        .await;
        let ends = reports
            .iter()
            .map(|r| (r.label.id, r.end.clone()))
            .collect();
        (turn, ends)
    }

    #[tokio::test]
    async fn a_host_waiting_for_its_turn_serves_commands_and_ends_stopped_at_a_stop() {
        let never_ran = InstanceEnd::Stopped { killed: false };
        let (commands_tx, mut commands) = mpsc::unbounded_channel();
        let shutdown = Shutdown::new();
        let turns = Arc::new(tokio::sync::Semaphore::new(1));
        let held = Arc::clone(&turns).acquire_owned().await.expect("a turn");

        // Its turn comes once the other host gives it back.
        let given_back = async {
            tokio::task::yield_now().await;
            drop(held);
        };
        let ((turn, ends), ()) =
            tokio::join!(turn_of(&turns, &[1], &mut commands, &shutdown), given_back);
        assert!(turn.is_some(), "the turn is taken");
        assert!(ends.is_empty());
        let held = turn;

        // Every instance removed while it waits: done, without a turn.
        let remove = HostCommand::Instance {
            id: 2,
            command: InstanceCommand::Remove,
        };
        commands_tx.send(remove).expect("sent");
        let (turn, ends) = turn_of(&turns, &[2], &mut commands, &shutdown).await;
        assert!(turn.is_none(), "ended without a turn");
        assert_eq!(ends, [(2, never_ran.clone())]);

        // The run stops while it waits: its instances end stopped, never
        // run (not lost).
        shutdown.request_stop("SIGINT received");
        let (turn, ends) = turn_of(&turns, &[3, 4], &mut commands, &shutdown).await;
        assert!(turn.is_none());
        assert_eq!(ends, [(3, never_ran.clone()), (4, never_ran.clone())]);

        // A turn free when the run has stopped: the stop wins, the
        // instance never runs.
        drop(held);
        let (turn, ends) = turn_of(&turns, &[5], &mut commands, &shutdown).await;
        assert!(turn.is_none());
        assert_eq!(ends, [(5, never_ran)]);
    }
}
