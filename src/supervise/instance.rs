//! Supervision of one instance: start it, relay its output and control
//! frames, watch its liveness, stop it, and restart it per policy.
//!
//! One task per instance owns all of the instance's state; nothing polls
//! it. The task sleeps until the child exits, a control frame arrives, the
//! liveness deadline passes, or a stop is requested. Its output readers
//! (`relay`) and its control link (`control_link`) are tasks of their own
//! for each run of the process.

use super::activity::Activity;
use super::control_link::{control_link, ControlSummary, SlaveEvent, SLAVE_EVENTS};
use super::health::Verdict;
use super::process::{self, Spawned};
use super::relay::{relay_output, LineWatch};
use super::restart::{Decision, RestartTracker, RunOutcome};
use super::shutdown::Shutdown;
use crate::error_text::error_chain;
use crate::log::{InstanceLabel, LogSink, Stream};
use crate::pidkiller::{PidKiller, ProcessIdentity};
use crate::protocol::millis;
use crate::protocol::slave::{Level, QueueRole, ToSlave};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

// What travels to agents and back is wire data: `protocol::instance`.
pub use crate::protocol::instance::{
    EventKind, InstanceCommand, InstanceEnd, InstanceEvent, InstanceSpec,
};
use crate::protocol::instance::{ReadyProbe, ReadySpec};

/// Extra time, beyond max lifetime and grace, before the pid killer's record
/// of an instance would enforce the lifetime on its own.
const REGISTRY_BACKSTOP_MARGIN: Duration = Duration::from_secs(10);

/// How long output readers and the control link may take to drain after
/// the process group is gone (only a process that escaped the group can
/// hold a pipe open that long).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The final word on one instance.
#[derive(Debug, Clone)]
pub struct InstanceReport {
    /// Which instance.
    pub label: Arc<InstanceLabel>,
    /// How it ended.
    pub end: InstanceEnd,
}

/// How one run of the process ended.
struct RunEnd {
    outcome: RunOutcome,
    /// How long it ran healthily, for the restart tracker (a run that
    /// long starts the count of restarts in a row again): zero for a run
    /// stopped at its time limit, which hung rather than ran well.
    healthy_for: Duration,
    /// Ended because the master asked it to stop.
    stopped: bool,
    /// Had to be SIGKILLed after the stop grace.
    killed: bool,
    /// Stopped for this command.
    command: Option<InstanceCommand>,
}

/// Shared by every instance a master or agent supervises.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// Where log lines and events go.
    pub sink: LogSink,
    /// The run's stop and kill tokens.
    pub shutdown: Shutdown,
    /// The pid registry, when one could be opened.
    pub pids: Option<PidKiller>,
    /// Where the instance's life events go (status, events API), if
    /// anyone listens.
    pub events: Option<mpsc::UnboundedSender<InstanceEvent>>,
}

/// How often at most an instance's signs of life become a
/// [`EventKind::Seen`].
const SEEN_EVERY: Duration = Duration::from_secs(5);

/// The report of an instance that ends without having run (removed or
/// stopped while held back), its `Ended` event sent.
pub(crate) fn never_ran(
    label: Arc<InstanceLabel>,
    events: Option<&mpsc::UnboundedSender<InstanceEvent>>,
) -> InstanceReport {
    let end = InstanceEnd::Stopped { killed: false };
    emit(events, label.id, EventKind::Ended { end: end.clone() });
    InstanceReport { label, end }
}

/// Sends one event of instance `id`, if anyone listens.
pub(crate) fn emit(
    events: Option<&mpsc::UnboundedSender<InstanceEvent>>,
    id: u32,
    kind: EventKind,
) {
    if let Some(events) = events {
        // Nobody listening any more is fine: the run is ending.
        let _ = events.send(event_now(id, kind));
    }
}

/// An event of instance `id`, happening now.
pub(crate) fn event_now(id: u32, kind: EventKind) -> InstanceEvent {
    InstanceEvent {
        id,
        time_ms: millis::now(),
        kind,
    }
}

/// Supervises one instance until it completes, fails for good, or the
/// master stops it.
///
/// Each process is registered with `pids` (when given) while it runs, so
/// that a master or agent that dies leaves a record the next run reaps;
/// with `max_lifetime` or `time_limit` the record carries a backstop
/// deadline.
///
/// A feeder's listening address is published on `listening` each time it
/// starts, so that consumers start after it.
///
/// `commands` suspends, resumes, restarts or removes it (a closed channel
/// is fine: it then runs by its policy alone); with `suspended` it starts
/// suspended (its group is), and runs once resumed.
pub async fn supervise(
    spec: InstanceSpec,
    context: Supervision,
    listening: Option<tokio::sync::watch::Sender<Option<String>>>,
    mut commands: mpsc::UnboundedReceiver<InstanceCommand>,
    suspended: bool,
) -> InstanceReport {
    let Supervision {
        sink,
        shutdown,
        pids,
        events,
    } = context;
    let span = tracing::info_span!("instance", id = spec.label.id, group = %spec.label.group);
    async move {
        let mut spec = spec;
        let id = spec.label.id;
        let mut tracker = RestartTracker::new(spec.restart.clone());
        let mut suspended = suspended;
        // The memory cap's mechanism is said once.
        let mut cap_said = false;
        let end = loop {
            if shutdown.is_stopping() {
                break InstanceEnd::Stopped { killed: false };
            }
            if suspended {
                emit(events.as_ref(), id, EventKind::Suspended);
                sink.instance_event(&spec.label, Level::Notice, "suspended".into())
                    .await;
                let command = tokio::select! {
                    command = next_command(&mut commands) => command,
                    _ = shutdown.stopping() => break InstanceEnd::Stopped { killed: false },
                };
                match command {
                    InstanceCommand::Remove => break InstanceEnd::Stopped { killed: false },
                    // Only a resume ends a suspend.
                    InstanceCommand::Suspend | InstanceCommand::Restart => continue,
                    InstanceCommand::Resume => {
                        suspended = false;
                        tracker = RestartTracker::new(spec.restart.clone());
                        sink.instance_event(&spec.label, Level::Notice, "resumed".into())
                            .await;
                    }
                }
                if shutdown.is_stopping() {
                    break InstanceEnd::Stopped { killed: false };
                }
            }
            if let Some(listening) = &listening {
                pin_feeder_port(spec.identity.queue.as_mut(), listening.borrow().as_deref());
            }
            emit(events.as_ref(), id, EventKind::Created);
            let around = Around {
                sink: &sink,
                shutdown: &shutdown,
                pids: pids.as_ref(),
                events: events.as_ref(),
            };
            let run = run_once(
                &spec,
                around,
                listening.as_ref(),
                &mut commands,
                &mut cap_said,
            )
            .await;
            if run.stopped {
                break InstanceEnd::Stopped { killed: run.killed };
            }
            match run.command {
                Some(InstanceCommand::Remove) => break InstanceEnd::Stopped { killed: run.killed },
                Some(InstanceCommand::Suspend) => {
                    suspended = true;
                    continue;
                }
                Some(InstanceCommand::Restart) => continue,
                Some(InstanceCommand::Resume) | None => {}
            }
            match tracker.decide(&run.outcome, run.healthy_for, crate::random::unit()) {
                Decision::Finished => match run.outcome {
                    // Recycling always restarts: only a clean end finishes.
                    RunOutcome::Success | RunOutcome::Recycled(_) => break InstanceEnd::Completed,
                    RunOutcome::Failure(reason) => {
                        let message = format!("marked failed: {reason} (restart policy never)");
                        sink.instance_event(&spec.label, Level::Error, message)
                            .await;
                        break InstanceEnd::Failed { reason };
                    }
                },
                Decision::GiveUp { restarts } => {
                    let reason = match run.outcome {
                        RunOutcome::Failure(reason) => reason,
                        RunOutcome::Success | RunOutcome::Recycled(_) => "exited".to_string(),
                    };
                    let message = format!(
                        "marked failed after {} in a row: {reason}",
                        crate::error_text::count(restarts, "restart")
                    );
                    sink.instance_event(&spec.label, Level::Error, message)
                        .await;
                    break InstanceEnd::Failed { reason };
                }
                Decision::Restart { delay, attempt } => {
                    let delay_text = humantime::format_duration(round_ms(delay));
                    let message = match (attempt, spec.restart.limit) {
                        (0, _) => format!("restarting in {delay_text}"),
                        (_, Some(limit)) => {
                            format!("restarting in {delay_text} (restart {attempt} of {limit})")
                        }
                        (_, None) => format!("restarting in {delay_text} (restart {attempt})"),
                    };
                    sink.instance_event(&spec.label, Level::Info, message).await;
                    let delay_ms = millis::of(delay);
                    emit(events.as_ref(), id, EventKind::Backoff { delay_ms });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.stopping() => break InstanceEnd::Stopped { killed: false },
                        command = next_command(&mut commands) => match command {
                            InstanceCommand::Remove => break InstanceEnd::Stopped { killed: false },
                            InstanceCommand::Suspend => suspended = true,
                            InstanceCommand::Resume | InstanceCommand::Restart => {}
                        },
                    }
                }
            }
        };
        emit(events.as_ref(), id, EventKind::Ended { end: end.clone() });
        InstanceReport {
            label: spec.label.clone(),
            end,
        }
    }
    .instrument(span)
    .await
}

/// A feeder that bound port 0 binds the same port again when restarted:
/// its consumers were given that address.
pub(crate) fn pin_feeder_port(role: Option<&mut QueueRole>, listened: Option<&str>) {
    let Some(listened) = listened.and_then(|a| a.parse::<std::net::SocketAddr>().ok()) else {
        return;
    };
    if let Some(QueueRole::Feeder { bind, .. }) = role {
        if let Ok(mut addr) = bind.parse::<std::net::SocketAddr>() {
            if addr.port() == 0 {
                addr.set_port(listened.port());
                *bind = addr.to_string();
            }
        }
    }
}

/// The next command; never completes once the channel is closed (nobody
/// can command the instance any more).
async fn next_command(commands: &mut mpsc::UnboundedReceiver<InstanceCommand>) -> InstanceCommand {
    match commands.recv().await {
        Some(command) => command,
        None => std::future::pending().await,
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(millis::of(d))
}

/// Why the wait for the process ended.
enum Wake {
    Exited(std::io::Result<ExitStatus>),
    Timeout(Duration),
    Stop,
    Lifetime(Duration),
    /// It ran past its `time_limit`.
    TimeLimit(Duration),
    Command(InstanceCommand),
    /// Its health check failed this many times in a row (the last: why).
    Unhealthy(u32, String),
}

/// What one run of an instance's process shares with its supervisor.
struct Around<'a> {
    /// Where log lines go.
    sink: &'a LogSink,
    /// The run's stop and kill.
    shutdown: &'a Shutdown,
    /// The pid registry.
    pids: Option<&'a PidKiller>,
    /// Where its events go.
    events: Option<&'a mpsc::UnboundedSender<InstanceEvent>>,
}

async fn run_once(
    spec: &InstanceSpec,
    around: Around<'_>,
    listening: Option<&tokio::sync::watch::Sender<Option<String>>>,
    commands: &mut mpsc::UnboundedReceiver<InstanceCommand>,
    cap_said: &mut bool,
) -> RunEnd {
    let Around {
        sink,
        shutdown,
        pids,
        events,
    } = around;
    let started = Instant::now();
    let label = &spec.label;
    let cgroup = memory_cgroup(spec, sink, cap_said).await;
    let spawned = process::spawn_in(
        &spec.process,
        &spec.identity,
        &spec.limits,
        cgroup.as_ref().map(|c| c.procs.clone()),
    );
    let Spawned {
        mut child,
        pid,
        start_time,
        control,
        stdout,
        stderr,
    } = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            if let Some(cgroup) = cgroup {
                let _ = cgroup.remove().await;
            }
            let reason = error_chain(&err);
            sink.instance_event(label, Level::Error, reason.clone())
                .await;
            emit(
                events,
                label.id,
                EventKind::Exited {
                    how: reason.clone(),
                    failed: true,
                },
            );
            return RunEnd {
                outcome: RunOutcome::Failure(reason),
                healthy_for: Duration::ZERO,
                stopped: false,
                killed: false,
                command: None,
            };
        }
    };
    sink.instance_event(label, Level::Debug, format!("started (pid {pid})"))
        .await;
    emit(events, label.id, EventKind::Started { pid });
    if let Some(pids) = pids {
        super::guard_registry(pids, sink).await;
        // The supervisor stops the instance itself at its max lifetime or
        // time limit (the earlier); the record's deadline only matters if
        // this supervisor is gone by then.
        let backstop = [spec.max_lifetime, spec.time_limit]
            .into_iter()
            .flatten()
            .min()
            .map(|limit| SystemTime::now() + limit + spec.stop_grace + REGISTRY_BACKSTOP_MARGIN);
        let registered = match start_time {
            Some(start_time) => {
                let identity = ProcessIdentity { pid, start_time };
                pids.register_started(identity, pid, backstop, spec.stop_grace, label.to_string())
                    .await
            }
            None => {
                pids.register(pid, pid, backstop, spec.stop_grace, label.to_string())
                    .await
            }
        };
        match registered {
            Ok(_) => {}
            // A short-lived command (`true`, `echo`) may be done before it
            // is registered: nothing is left to watch, nothing went wrong.
            Err(err) if err.is_process_gone() => {
                tracing::debug!(pid, "the instance ended before its pid killer registration");
            }
            Err(err) => {
                tracing::warn!(pid, cause = %err, "cannot register the instance with the pid killer");
            }
        }
    }

    let activity = Arc::new(Activity::new());
    // Readiness (`[group.ready]`): results until the first success.
    let (ready_tx, mut ready_rx) = mpsc::channel(4);
    let mut ready = Readiness::new(spec.ready.as_ref(), started);
    let watch = match spec.ready.as_ref().map(|r| &r.probe) {
        Some(ReadyProbe::Log(pattern)) => match regex::Regex::new(pattern) {
            Ok(pattern) => Some(LineWatch {
                pattern: Arc::new(pattern),
                found_tx: ready_tx.clone(),
            }),
            Err(err) => {
                let _ = ready_tx.try_send(Err(format!("bad log pattern: {err}")));
                None
            }
        },
        _ => None,
    };
    let ready_task = match &spec.ready {
        Some(ReadySpec {
            probe: ReadyProbe::Probe(probe),
            timeout,
            interval,
        }) => Some(tokio::spawn(super::health::until_ready(
            probe.clone(),
            *interval,
            *timeout,
            spec.process.clone(),
            ready_tx.clone(),
        ))),
        _ => None,
    };
    let readers = [
        tokio::spawn(relay_output(
            stdout,
            Stream::Stdout,
            label.clone(),
            sink.clone(),
            activity.clone(),
            watch.clone(),
        )),
        tokio::spawn(relay_output(
            stderr,
            Stream::Stderr,
            label.clone(),
            sink.clone(),
            activity.clone(),
            watch,
        )),
    ];
    drop(ready_tx);
    // Room for the progress reports of a feeder that drains at stop (read
    // once it has exited, below).
    let (events_tx, mut events_rx) = mpsc::channel(SLAVE_EVENTS);
    let (command_tx, command_rx) = mpsc::channel(4);
    let control_task = tokio::spawn(control_link(
        control,
        spec.identity.clone(),
        label.clone(),
        sink.clone(),
        activity.clone(),
        events_tx,
        command_rx,
    ));

    let mut timeout = spec.plain_timeout.filter(|t| !t.is_zero());
    let mut uses_library = false;
    let end_of_life = spec.max_lifetime.map(|limit| (limit, started + limit));
    let time_limit = spec.time_limit.map(|limit| (limit, started + limit));
    // Signs of life are reported at a slow pace, and only to a listener.
    let mut seen_tick = tokio::time::interval_at(started + SEEN_EVERY, SEEN_EVERY);
    seen_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen_reported = activity.last();
    // The health check, while the process runs.
    let (health_tx, mut health_rx) = mpsc::channel(1);
    let health_task = spec.health.clone().map(|health| {
        tokio::spawn(super::health::check(
            health,
            spec.process.clone(),
            health_tx,
        ))
    });
    let mut tally = super::health::Tally::default();
    let herd_stop = herd_stop(shutdown, spec.stop_wait);
    tokio::pin!(herd_stop);
    let wake = loop {
        let deadline = timeout.map(|t| activity.last() + t);
        tokio::select! {
            status = child.wait() => break Wake::Exited(status),
            Some(event) = events_rx.recv() => match event {
                SlaveEvent::Hello => {
                    uses_library = true;
                    timeout = spec.identity.timeout.filter(|t| !t.is_zero());
                }
                SlaveEvent::Listening(addr) => {
                    if let Some(listening) = listening {
                        listening.send_replace(Some(addr));
                    }
                }
                SlaveEvent::Progress(progress) => {
                    emit(events, label.id, EventKind::Progress { progress });
                }
                SlaveEvent::Ready => {
                    if matches!(spec.ready.as_ref().map(|r| &r.probe), Some(ReadyProbe::Notify)) {
                        ready.passed(label, sink, events).await;
                    }
                }
            },
            Some(result) = ready_rx.recv(), if ready.waits() => match result {
                Ok(()) => ready.passed(label, sink, events).await,
                Err(why) => ready.last_failure = Some(why),
            },
            _ = super::sleep_until_some(ready.deadline) => ready.late(label, sink, events).await,
            command = next_command(commands) => match command {
                InstanceCommand::Resume => {}
                // The master's word in the herd's ordered stop.
                InstanceCommand::Remove if shutdown.is_stopping() => break Wake::Stop,
                command => break Wake::Command(command),
            },
            _ = seen_tick.tick(), if events.is_some() => {
                let last = activity.last();
                if last > seen_reported {
                    seen_reported = last;
                    emit(events, label.id, EventKind::Seen);
                }
            }
            _ = super::sleep_until_some(deadline) => {
                let Some(limit) = timeout else { continue };
                // Output may have arrived while we slept: only a deadline
                // computed from the latest activity counts.
                if activity.last() + limit <= Instant::now() {
                    break Wake::Timeout(limit);
                }
            }
            Some(result) = health_rx.recv() => {
                let limit = spec.health.as_ref().map_or(1, |h| h.failures);
                match tally.count(result, limit) {
                    Verdict::Same => {}
                    Verdict::Healthy => {
                        sink.instance_event(label, Level::Info, "healthy".into()).await;
                        emit(events, label.id, EventKind::Health { healthy: true, why: None });
                    }
                    Verdict::Failing { failed, limit, why } => {
                        let message = format!("health check failed ({failed} of {limit} in a row): {why}");
                        sink.instance_event(label, Level::Warning, message).await;
                    }
                    Verdict::Unhealthy { failed, why } => break Wake::Unhealthy(failed, why),
                }
            }
            _ = &mut herd_stop => break Wake::Stop,
            _ = super::sleep_until_some(end_of_life.map(|(_, at)| at)) => {
                if let Some((limit, _)) = end_of_life {
                    break Wake::Lifetime(limit);
                }
            }
            _ = super::sleep_until_some(time_limit.map(|(_, at)| at)) => {
                if let Some((limit, _)) = time_limit {
                    break Wake::TimeLimit(limit);
                }
            }
        }
    };

    if let Some(task) = health_task {
        task.abort();
    }
    if let Some(task) = ready_task {
        task.abort();
    }
    let stopper = Stopper {
        pid,
        uses_library,
        command_tx: &command_tx,
        grace: spec.stop_grace,
        label,
        sink,
        shutdown,
    };
    let mut killed = false;
    let mut timed_out = None;
    let mut unhealthy = None;
    let mut recycled = None;
    let mut over_time = None;
    let mut command = None;
    let stopped = matches!(wake, Wake::Stop);
    if matches!(
        wake,
        Wake::Stop | Wake::Command(_) | Wake::Lifetime(_) | Wake::TimeLimit(_)
    ) {
        emit(events, label.id, EventKind::Stopping);
    }
    let status = match wake {
        Wake::Exited(status) => status,
        Wake::Timeout(limit) => {
            timed_out = Some(limit);
            let message = format!(
                "liveness timeout: no ping or output for {}, killing it",
                humantime::format_duration(limit)
            );
            sink.instance_event(label, Level::Warning, message).await;
            emit(events, label.id, EventKind::TimedOut);
            kill_group(pid, label, sink).await;
            child.wait().await
        }
        Wake::Unhealthy(failed, why) => {
            let message = format!(
                "unhealthy: {} failed in a row, the last: {why}; killing it",
                crate::error_text::count(failed, "health check")
            );
            sink.instance_event(label, Level::Warning, message).await;
            emit(
                events,
                label.id,
                EventKind::Health {
                    healthy: false,
                    why: Some(why.clone()),
                },
            );
            unhealthy = Some(why);
            kill_group(pid, label, sink).await;
            child.wait().await
        }
        Wake::Command(asked) => {
            let verb = match asked {
                InstanceCommand::Suspend => "suspending it",
                InstanceCommand::Restart => "restarting it",
                InstanceCommand::Remove => "removing it",
                InstanceCommand::Resume => "resuming it",
            };
            sink.instance_event(label, Level::Notice, verb.into()).await;
            command = Some(asked);
            let (status, was_killed) = stopper.stop(&mut child).await;
            killed = was_killed;
            status
        }
        Wake::Lifetime(limit) => {
            let reason = format!(
                "reached its max lifetime of {}",
                humantime::format_duration(limit)
            );
            sink.instance_event(label, Level::Info, format!("{reason}: recycling it"))
                .await;
            recycled = Some(reason);
            let (status, was_killed) = stopper.stop(&mut child).await;
            killed = was_killed;
            status
        }
        Wake::TimeLimit(limit) => {
            let reason = format!(
                "ran longer than its time limit of {}",
                humantime::format_duration(limit)
            );
            sink.instance_event(label, Level::Warning, format!("{reason}: stopping it"))
                .await;
            over_time = Some(reason);
            let (status, was_killed) = stopper.stop(&mut child).await;
            killed = was_killed;
            status
        }
        Wake::Stop => {
            let (status, was_killed) = stopper.stop(&mut child).await;
            killed = was_killed;
            status
        }
    };
    let ran_for = started.elapsed();

    // The leader is gone; whatever it left in its group goes too, so no
    // grandchild outlives its instance.
    if let Err(err) = process::signal_group(pid, libc::SIGKILL) {
        tracing::warn!(pid, cause = %err, "cannot kill the rest of the process group");
    }
    // Over its cgroup's memory cap, the kernel killed it: said so.
    let mut out_of_memory = None;
    if let Some(cgroup) = cgroup {
        if cgroup.oom_kills() > 0 {
            let cap = spec.limits.memory.unwrap_or_default();
            out_of_memory = Some(format!(
                "out of memory: OOM-killed at its memory cap of {} ({})",
                size_text(cap),
                cgroup.describe()
            ));
        }
        if let Err(why) = cgroup.remove().await {
            sink.instance_event(label, Level::Warning, why).await;
        }
    }
    if let Some(pids) = pids {
        if let Err(err) = pids.unregister(pid).await {
            tracing::warn!(pid, cause = %err, "cannot unregister the instance from the pid killer");
        }
    }
    drop(command_tx);
    for reader in readers {
        drain(reader, &activity).await;
    }
    let summary = drain(control_task, &activity).await.unwrap_or_default();
    // A feeder's last counts come as it stops, after the loop above: they
    // are the queue's final word (dead jobs fail the run).
    let mut last_progress = None;
    while let Ok(event) = events_rx.try_recv() {
        if let SlaveEvent::Progress(progress) = event {
            last_progress = Some(progress);
        }
    }
    if let Some(progress) = last_progress {
        emit(events, label.id, EventKind::Progress { progress });
    }

    let recycled = recycled.or(summary.recycle.clone());
    let healthy_for = if over_time.is_some() {
        Duration::ZERO
    } else {
        ran_for
    };
    let how = match (&out_of_memory, &over_time) {
        (Some(oom), _) => format!("{} ({oom})", describe_status(&status)),
        (None, Some(reason)) => format!("{} ({reason})", describe_status(&status)),
        (None, None) => describe_status(&status),
    };
    let outcome = match (unhealthy, over_time, &out_of_memory) {
        (Some(why), _, _) => RunOutcome::Failure(format!("unhealthy: {why}")),
        (None, Some(reason), _) => RunOutcome::Failure(reason),
        (None, None, Some(oom)) if !stopped && command.is_none() => {
            RunOutcome::Failure(format!("{} ({oom})", describe_status(&status)))
        }
        (None, None, _) => classify(&status, timed_out, recycled, &summary),
    };
    let (level, text) = match (&status, &outcome) {
        (_, RunOutcome::Success | RunOutcome::Recycled(_)) => {
            (Level::Info, describe_status(&status))
        }
        _ if stopped || command.is_some() => (Level::Info, describe_status(&status)),
        (_, RunOutcome::Failure(reason)) => (Level::Warning, reason.clone()),
    };
    let text = if stopped || command.is_some() {
        format!("stopped: {text}")
    } else {
        text
    };
    emit(
        events,
        label.id,
        EventKind::Exited {
            how,
            failed: matches!(outcome, RunOutcome::Failure(_)) && !stopped && command.is_none(),
        },
    );
    sink.instance_event(label, level, text).await;
    RunEnd {
        outcome,
        healthy_for,
        stopped,
        killed,
        command,
    }
}

/// The cgroup that caps the memory of this run of `spec`'s instance
/// (`[group.limits] memory`), if this host lets us make one; the
/// mechanism is said once (`said`), the fallback to `RLIMIT_AS` with why.
async fn memory_cgroup(
    spec: &InstanceSpec,
    sink: &LogSink,
    said: &mut bool,
) -> Option<super::cgroup::InstanceCgroup> {
    let bytes = spec.limits.memory?;
    let label = &spec.label;
    let name = format!("{}.{}", label.group, label.id);
    let (cgroup, message) = match super::cgroup::InstanceCgroup::make(&name, bytes) {
        Ok(cgroup) => {
            let message = format!(
                "memory cap {}: {} (the whole instance)",
                size_text(bytes),
                cgroup.describe()
            );
            (Some(cgroup), message)
        }
        Err(why) => (
            None,
            format!(
                "memory cap {}: RLIMIT_AS of each process (no cgroup: {why})",
                size_text(bytes)
            ),
        ),
    };
    if !*said {
        *said = true;
        sink.instance_event(label, Level::Info, message).await;
    }
    cgroup
}

/// A size as the log says it: `64 MiB`, or bytes.
fn size_text(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB && bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Completes when the process is to stop with the herd: at the herd's
/// stop, or, for a group that other groups start after (`wait`), once
/// that much more time has passed (the master says when earlier, with a
/// [`InstanceCommand::Remove`], once the groups after it have ended) or
/// a kill is asked for.
async fn herd_stop(shutdown: &Shutdown, wait: Option<Duration>) {
    shutdown.stopping().await;
    if let Some(wait) = wait {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.killing() => {}
        }
    }
}

/// One process's readiness (`[group.ready]`): told once it passes, or
/// said late once, past its timeout.
struct Readiness {
    /// Still to be told (a check is configured and has not passed).
    pending: bool,
    /// When it is late, until it was said.
    deadline: Option<Instant>,
    /// The timeout, for the message.
    timeout: Duration,
    /// The last failure of a probe, for the message.
    last_failure: Option<String>,
}

impl Readiness {
    fn new(spec: Option<&ReadySpec>, started: Instant) -> Self {
        Readiness {
            pending: spec.is_some(),
            deadline: spec.map(|spec| started + spec.timeout),
            timeout: spec.map_or(Duration::ZERO, |spec| spec.timeout),
            last_failure: None,
        }
    }

    /// Whether it waits for a result.
    fn waits(&self) -> bool {
        self.pending
    }

    /// The check passed: told once.
    async fn passed(
        &mut self,
        label: &Arc<InstanceLabel>,
        sink: &LogSink,
        events: Option<&mpsc::UnboundedSender<InstanceEvent>>,
    ) {
        if !self.pending {
            return;
        }
        self.pending = false;
        self.deadline = None;
        sink.instance_event(label, Level::Info, "ready".into())
            .await;
        emit(events, label.id, EventKind::Ready);
    }

    /// The timeout passed: said once (it may still pass later).
    async fn late(
        &mut self,
        label: &Arc<InstanceLabel>,
        sink: &LogSink,
        events: Option<&mpsc::UnboundedSender<InstanceEvent>>,
    ) {
        self.deadline = None;
        let limit = humantime::format_duration(self.timeout);
        let why = match &self.last_failure {
            Some(failure) => format!("not ready within {limit} (last check: {failure})"),
            None => format!("not ready within {limit}"),
        };
        let message = format!("{why}; the groups after it do not start until it is ready");
        sink.instance_event(label, Level::Error, message).await;
        emit(events, label.id, EventKind::NotReady { why });
    }
}

/// The stop sequence of one running process: Stop frame (library) or
/// SIGTERM to the group (plain program), the grace, then SIGKILL.
struct Stopper<'a> {
    pid: u32,
    uses_library: bool,
    command_tx: &'a mpsc::Sender<ToSlave>,
    grace: Duration,
    label: &'a Arc<InstanceLabel>,
    sink: &'a LogSink,
    shutdown: &'a Shutdown,
}

impl Stopper<'_> {
    /// Stops the process; returns its status and whether it was killed.
    async fn stop(&self, child: &mut process::Child) -> (std::io::Result<ExitStatus>, bool) {
        let (pid, label, sink) = (self.pid, self.label, self.sink);
        if self.uses_library {
            // Dropped only if the link is already gone, and then the
            // library stops on its own.
            let _ = self.command_tx.send(ToSlave::Stop).await;
        } else if let Err(err) = process::signal_group(pid, libc::SIGTERM) {
            let message = format!("cannot send SIGTERM: {err}");
            sink.instance_event(label, Level::Error, message).await;
        }
        tokio::select! {
            status = child.wait() => (status, false),
            _ = tokio::time::sleep(self.grace) => {
                let message = format!(
                    "still running {} after stop: killing it",
                    humantime::format_duration(self.grace)
                );
                sink.instance_event(label, Level::Warning, message).await;
                kill_group(pid, label, sink).await;
                (child.wait().await, true)
            }
            _ = self.shutdown.killing() => {
                sink.instance_event(label, Level::Warning, "killing it now".into()).await;
                kill_group(pid, label, sink).await;
                (child.wait().await, true)
            }
        }
    }
}

/// Waits for a helper task of a run, aborting it if it does not end in time.
///
/// A task still relaying lines (the log writer may be slow) is waited for:
/// only one that relayed nothing for [`DRAIN_TIMEOUT`] is given up, since
/// then a process outside the group holds the pipe open.
async fn drain<T>(mut task: JoinHandle<T>, activity: &Activity) -> Option<T> {
    loop {
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
            Ok(joined) => return joined.ok(),
            Err(_) if activity.last().elapsed() < DRAIN_TIMEOUT => continue,
            Err(_) => {
                task.abort();
                return None;
            }
        }
    }
}

async fn kill_group(pid: u32, label: &Arc<InstanceLabel>, sink: &LogSink) {
    if let Err(err) = process::signal_group(pid, libc::SIGKILL) {
        sink.instance_event(label, Level::Error, format!("cannot send SIGKILL: {err}"))
            .await;
    }
}

/// How a process ended, as the log says it ("exited with code 3", "killed by
/// SIGKILL").
pub(crate) fn describe_status(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by {}", process::signal_name(signal)),
            (None, None) => format!("ended ({status})"),
        },
        Err(err) => format!("cannot wait for it: {err}"),
    }
}

fn classify(
    status: &std::io::Result<ExitStatus>,
    timed_out: Option<Duration>,
    recycled: Option<String>,
    summary: &ControlSummary,
) -> RunOutcome {
    if let Some(reason) = recycled {
        // A recycled instance is restarted whatever it ended with; a
        // failure on its way out is still worth a line.
        if !matches!(status, Ok(status) if status.success()) {
            tracing::debug!(status = %describe_status(status), "recycled instance ended badly");
        }
        return RunOutcome::Recycled(reason);
    }
    if let Some(limit) = timed_out {
        return RunOutcome::Failure(format!(
            "liveness timeout after {}",
            humantime::format_duration(limit)
        ));
    }
    if let Some((false, message)) = &summary.outcome {
        let message = message.as_deref().unwrap_or("no reason given");
        return RunOutcome::Failure(format!("failed: {message} ({})", describe_status(status)));
    }
    match status {
        Ok(status) if status.success() => RunOutcome::Success,
        _ => RunOutcome::Failure(describe_status(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feeder_on_port_0_keeps_the_port_it_got_first() {
        let mut role = QueueRole::Feeder {
            bind: "127.0.0.1:0".into(),
            secret: String::new(),
            settings: crate::protocol::slave::QueueSettings {
                lease: Duration::from_secs(30),
                max_attempts: 3,
                retry: crate::retry::RetryPolicy::exponential(
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                    3,
                ),
                rate: None,
                progress_every: Duration::from_secs(5),
                joblog: None,
            },
        };
        pin_feeder_port(Some(&mut role), None);
        pin_feeder_port(Some(&mut role), Some("127.0.0.1:4711"));
        pin_feeder_port(Some(&mut role), Some("127.0.0.1:4712"));
        let QueueRole::Feeder { bind, .. } = role else {
            panic!("not a feeder");
        };
        assert_eq!(bind, "127.0.0.1:4711");
    }
}
