//! The launcher: runs a herd until every instance has ended or a stop is
//! requested (serving operators' requests meanwhile), and reports how it
//! went.

use super::actions::Running;
use super::herd::{pump_events, Board, Herd, Launcher};
use super::instance::{self, InstanceEnd, InstanceReport};
use super::log::LogSink;
use super::plan::plan;
use super::queue::FeederAddresses;
use super::remote::AgentSettings;
use super::shutdown::Shutdown;
use crate::config::Config;
use crate::protocol::control::{FromMaster, InstanceState};
use crate::protocol::slave::Level;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// What happened during a run, for the final message and the exit code.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Every instance's final word, in id order.
    pub instances: Vec<InstanceReport>,
    /// Why the run was stopped, if it was.
    pub stop_reason: Option<String>,
    /// Why the run could not start at all, if so.
    pub fatal: Option<String>,
}

impl RunReport {
    /// Instances given up after failing, or whose host was lost.
    pub fn failed(&self) -> impl Iterator<Item = &InstanceReport> {
        self.instances
            .iter()
            .filter(|r| matches!(r.end, InstanceEnd::Failed { .. } | InstanceEnd::Lost { .. }))
    }

    /// Instances that had to be SIGKILLed at stop.
    pub fn killed(&self) -> impl Iterator<Item = &InstanceReport> {
        self.instances
            .iter()
            .filter(|r| matches!(r.end, InstanceEnd::Stopped { killed: true }))
    }

    /// `true` when the run started and no instance was marked failed.
    pub fn success(&self) -> bool {
        self.fatal.is_none() && self.failed().next().is_none()
    }
}

/// Runs a herd until every instance has ended or `shutdown` stops it (a
/// clean stop also follows `max_running_time`).
///
/// Errors of single instances are logged and reported, never fatal.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use taskherd::config::Config;
/// use taskherd::master::{self, LogSink, Shutdown};
/// let config = Config::load("herd.toml".as_ref()).expect("valid config");
/// let (sink, writer) = LogSink::spawn(config.log.format, std::io::stdout())?;
/// let shutdown = Shutdown::new();
/// master::stop_on_signals(shutdown.clone())?;
/// let report = master::run(config, sink, shutdown).await;
/// writer.finish();
/// std::process::exit(if report.success() { 0 } else { 1 });
/// # }
/// ```
pub async fn run(config: Config, sink: LogSink, shutdown: Shutdown) -> RunReport {
    Launcher::new(config).run(sink, shutdown).await
}

pub(crate) async fn run_launcher(
    launcher: Launcher,
    sink: LogSink,
    shutdown: Shutdown,
) -> RunReport {
    let Launcher {
        config,
        events: callbacks,
        control,
        reload_on_sighup,
    } = launcher;
    let mut plan = plan(&config);
    if let Err(err) = super::queue::prepare(&mut plan) {
        sink.master_event(Level::Critical, format!("cannot start: {err}"))
            .await;
        return RunReport {
            instances: Vec::new(),
            stop_reason: Some(err.to_string()),
            fatal: Some(err.to_string()),
        };
    }
    let grace = stop_budget(&config);
    let total = plan.instances().len();
    let hosts = if plan.hosts.is_empty() {
        String::new()
    } else {
        format!(" on {} remote hosts and locally", plan.hosts.len())
    };
    sink.master_event(
        Level::Info,
        format!(
            "starting {total} instances in {} groups{hosts} from {}",
            config.groups.len(),
            config.source.display()
        ),
    )
    .await;

    let state_file = match &config.master.state_dir {
        Some(dir) => config
            .base_dir()
            .join(dir)
            .join(crate::pidkiller::STATE_FILE_NAME),
        None => crate::pidkiller::default_state_file(),
    };
    let pids = super::open_pid_killer(state_file, &sink).await;
    let control_dir = match ControlDir::create() {
        Ok(dir) => Some(dir),
        Err(err) => {
            sink.master_event(Level::Error, format!("{err}; using /tmp"))
                .await;
            None
        }
    };
    let board = Board::new(&config);
    board.add(plan.instances().iter().map(|spec| spec.label.clone()));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (commands_tx, mut commands_rx) = mpsc::unbounded_channel();
    let herd = Herd::new(board.clone(), commands_tx.clone(), shutdown.clone());
    if let Some(callbacks) = &callbacks {
        callbacks.starting(&herd);
    }
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let pump = tokio::spawn(pump_events(
        events_rx,
        herd.clone(),
        callbacks.clone(),
        started_rx,
    ));
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let control_stop = tokio_util::sync::CancellationToken::new();
    let control_task = match control {
        Some(socket) => {
            sink.master_event(
                Level::Debug,
                format!("control socket {}", socket.path().display()),
            )
            .await;
            Some(tokio::spawn(socket.serve(control_tx, control_stop.clone())))
        }
        None => {
            drop(control_tx);
            None
        }
    };
    // Background duties of the run, ended with it.
    let mut duties: JoinSet<()> = JoinSet::new();
    if reload_on_sighup {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                let herd = herd.clone();
                duties.spawn(async move {
                    while hangup.recv().await.is_some() {
                        herd.reload();
                    }
                });
            }
            Err(err) => {
                let message = format!("cannot watch SIGHUP ({err}): reload with `taskherd reload`");
                sink.master_event(Level::Warning, message).await;
            }
        }
    }
    duties.spawn(show_progress(herd.clone(), sink.clone()));

    let settings = Arc::new(AgentSettings {
        heartbeat: config.master.heartbeat,
        orphan_timeout: config.master.orphan_timeout,
        agent_dir: config.master.agent_dir.clone(),
        agent_path: config.master.agent_path.clone(),
        control_dir: control_dir
            .as_ref()
            .map_or_else(std::env::temp_dir, |dir| dir.path.clone()),
        stop_grace: grace,
    });
    let mut running = Running {
        context: instance::Supervision {
            sink: sink.clone(),
            shutdown: shutdown.clone(),
            pids: pids.clone(),
            events: Some(events_tx),
        },
        addresses: FeederAddresses::new(&plan),
        routes: BTreeMap::new(),
        hosts: Vec::new(),
        settings,
        next_id: u32::try_from(total).unwrap_or(u32::MAX).saturating_add(1),
        config,
        board: board.clone(),
        tasks: JoinSet::new(),
        helpers: JoinSet::new(),
        commands: commands_tx,
        changes: Arc::default(),
    };
    running.start(plan);
    let _ = started_tx.send(());
    let deadline = running
        .config
        .master
        .max_running_time
        .map(|limit| (limit, tokio::time::Instant::now() + limit));

    let mut reports = Vec::new();
    let mut stop_announced = false;
    let mut kill_announced = false;
    let mut stop_replies = Vec::new();
    // Operators' requests being carried out (waits for states, rolling
    // restarts, reloads): they end with the run.
    let mut waiters: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            joined = running.tasks.join_next() => match joined {
                None => break,
                Some(Ok(done)) => reports.extend(done),
                Some(Err(err)) => {
                    sink.master_event(Level::Critical, format!("an instance supervisor crashed: {err}")).await;
                }
            },
            Some(command) = commands_rx.recv() => {
                running.command(command, &mut waiters).await;
            }
            Some(request) = control_rx.recv() => {
                running
                    .control_request(request, &mut waiters, &mut stop_replies)
                    .await;
            }
            Some(_) = waiters.join_next(), if !waiters.is_empty() => {}
            _ = super::sleep_until_some(deadline.map(|(_, at)| at)), if !shutdown.is_stopping() => {
                if let Some((limit, _)) = deadline {
                    shutdown.request_stop(format!(
                        "max running time of {} reached",
                        humantime::format_duration(limit)
                    ));
                }
            }
            _ = shutdown.stopping(), if !stop_announced => {
                stop_announced = true;
                let reason = shutdown.reason().unwrap_or("stop requested");
                let message = format!(
                    "stopping every instance: {reason} (grace {}; signal again to kill at once)",
                    humantime::format_duration(grace)
                );
                sink.master_event(Level::Notice, message).await;
            }
            _ = shutdown.killing(), if !kill_announced => {
                kill_announced = true;
                let reason = shutdown.reason().unwrap_or("kill requested");
                sink.master_event(Level::Warning, format!("killing every instance now: {reason}")).await;
            }
        }
    }
    drop(duties);
    sink.status_line(None);
    drop(running);
    // Every event sender is gone with the supervisors: the pump ends once
    // it has called back for the last one.
    let _ = pump.await;
    // Instances a reload replaced or removed are not the herd's any more.
    let retired = board.retired_ever();
    reports.retain(|r| !retired.contains(&r.label.id));
    reports.sort_by_key(|r| r.label.id);
    let report = RunReport {
        instances: reports,
        stop_reason: shutdown.reason().map(str::to_string),
        fatal: None,
    };
    announce_end(&report, &sink).await;
    if let Some(callbacks) = &callbacks {
        callbacks.stopped(&report);
    }
    let outcome = if report.success() {
        FromMaster::Done {
            message: format!("stopped: {} instances ended", report.instances.len()),
        }
    } else {
        FromMaster::Error {
            message: format!("stopped; {} instances failed", report.failed().count()),
        }
    };
    // Log followers had the end too; requests still pending end here.
    drop(waiters);
    for reply in stop_replies {
        let _ = reply.send(outcome.clone()).await;
    }
    // The server ends once every connection has: no request can be
    // handed over any more, and every reply sender is gone.
    drop(control_rx);
    control_stop.cancel();
    if let Some(task) = control_task {
        let _ = task.await;
    }
    drop(control_dir);
    report
}

/// How often the progress line (on a terminal) is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Keeps the progress line up to date: instances running per group, and
/// a queue group's counts.
async fn show_progress(herd: Herd, sink: LogSink) {
    // Without a terminal there is no line to keep: no status to build.
    if !sink.has_status_line() {
        return;
    }
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sink.status_line(Some(progress_line(&herd.status())));
    }
}

/// One line for the whole herd: `web 4/4 · jobs 3/3, 1200 done, 350/s`.
pub fn progress_line(status: &crate::protocol::control::HerdStatus) -> String {
    let parts: Vec<String> = status
        .groups
        .iter()
        .map(|group| {
            let running = group
                .instances
                .iter()
                .filter(|i| i.state == InstanceState::Running)
                .count();
            let mut part = format!("{} {running}/{}", group.name, group.instances.len());
            if group.suspended {
                part.push_str(" suspended");
            }
            if let Some(queue) = &group.queue {
                part.push_str(&format!(", {} done, {:.0}/s", queue.done, queue.rate));
            }
            part
        })
        .collect();
    parts.join(" · ")
}

/// Runs a herd from a plain (non-async) program: owns a runtime, logs as
/// the config's `[log]` table says (stdout, file), stops cleanly on SIGTERM/SIGINT (a second
/// signal kills at once), and returns once every instance has ended and
/// every log line is written.
///
/// ```no_run
/// use taskherd::config::Config;
/// let config = Config::load("herd.toml".as_ref()).expect("valid config");
/// let report = taskherd::master::run_blocking(config).expect("master started");
/// std::process::exit(if report.success() { 0 } else { 1 });
/// ```
///
/// # Errors
/// If the runtime, the log writer (or its file) or the signal handlers
/// cannot be set up; nothing was started then.
pub fn run_blocking(config: Config) -> std::io::Result<RunReport> {
    Launcher::new(config).run_blocking()
}

pub(crate) fn run_blocking_with(launcher: Launcher) -> std::io::Result<RunReport> {
    let config = &launcher.config;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taskherd")
        .build()?;
    let (sink, writer) =
        LogSink::start(&config.log, &config.base_dir()).map_err(std::io::Error::other)?;
    let report = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        super::stop_on_signals(shutdown.clone())?;
        std::io::Result::Ok(launcher.run(sink, shutdown).await)
    });
    // The runtime's tasks hold the last sink clones: once they are gone the
    // writer drains what is left and ends.
    drop(runtime);
    writer.finish();
    report
}

async fn announce_end(report: &RunReport, sink: &LogSink) {
    let labels = |reports: Vec<&InstanceReport>| {
        reports
            .iter()
            .map(|r| r.label.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let killed: Vec<_> = report.killed().collect();
    if !killed.is_empty() {
        let message = format!(
            "had to kill {} instances after the stop grace: {}",
            killed.len(),
            labels(killed)
        );
        sink.master_event(Level::Warning, message).await;
    }
    let failed: Vec<_> = report.failed().collect();
    if !failed.is_empty() {
        let message = format!(
            "{} instances marked failed: {}",
            failed.len(),
            labels(failed)
        );
        sink.master_event(Level::Error, message).await;
    }
    let how = if report.stop_reason.is_some() {
        "stopped"
    } else {
        "all instances ended"
    };
    sink.master_event(
        Level::Info,
        format!("{how}: {} instances, exiting", report.instances.len()),
    )
    .await;
}

/// The duration a test or caller should allow for a clean stop of `config`.
pub fn stop_budget(config: &Config) -> Duration {
    let group_max = config
        .groups
        .iter()
        .filter_map(|g| g.stop_grace)
        .max()
        .unwrap_or_default();
    config.master.stop_grace.max(group_max)
}

/// The local directory of the run's ControlMaster sockets: short (socket
/// paths must fit 104/108 bytes), private, removed at the end of the run.
struct ControlDir {
    path: PathBuf,
}

impl ControlDir {
    /// Longest base directory that keeps the socket path
    /// (`<base>/taskherd-<pid>/.ssh-connectionXXXXXX/master`) well under
    /// the 104-byte limit of some systems.
    const MAX_BASE_LEN: usize = 48;

    fn create() -> Result<ControlDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > Self::MAX_BASE_LEN {
            base = PathBuf::from("/tmp");
        }
        Self::sweep_stale(&base);
        let path = base.join(format!("taskherd-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&path)
            .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
        Ok(ControlDir { path })
    }
}

impl ControlDir {
    /// Removes the directories of earlier runs that were killed before
    /// they could clean up (their pid is gone).
    fn sweep_stale(base: &Path) {
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("taskherd-"))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
