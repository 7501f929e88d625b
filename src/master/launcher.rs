//! The launcher: runs a herd until every instance has ended or a stop is
//! requested (serving operators' requests meanwhile), and reports how it
//! went.

use super::core::{Core, Event, Now};
use super::herd::{pump_events, Board, Herd, Launcher};
use super::http::HttpServer;
use super::plan::plan;
use super::remote::AgentSettings;
use super::shell::{Inbox, Shell};
use crate::config::{BuiltinFeeder, Config};
use crate::error_text::count;
use crate::log::{LogSink, LogWriter};
use crate::protocol::control::{HerdStatus, InstanceState};
use crate::protocol::slave::Level;
use crate::supervise::instance::{self, InstanceEnd, InstanceReport};
use crate::supervise::shutdown::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// What happened during a run, for the final message and the exit code.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Every instance's final word, in id order.
    pub instances: Vec<InstanceReport>,
    /// Why the run was stopped, if it was.
    pub stop_reason: Option<String>,
    /// The signal (`SIGINT`, `SIGTERM`) that stopped the run, if one did
    /// ([`Shutdown::stop_signal`]).
    pub stop_signal: Option<i32>,
    /// Why the run could not start at all, if so.
    pub fatal: Option<String>,
    /// Ids of the instances SIGKILLed at once because a kill was asked
    /// for (a second Ctrl-C or SIGTERM, `taskherd stop --kill`) before
    /// their stop grace had passed; the others of [`RunReport::killed`]
    /// ignored the stop for their whole grace.
    pub killed_on_request: Vec<u32>,
    /// Queue groups whose jobs ended dead, in config order (from the last
    /// progress report of each feeder, sent when it stops).
    pub dead_jobs: Vec<DeadJobs>,
}

/// Jobs of a queue group that ended dead during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadJobs {
    /// The group.
    pub group: String,
    /// How many jobs ended dead (the feeder's `dead` count).
    pub count: u64,
    /// `[group.queue] fail_on_dead`: they fail the run (exit 1).
    pub fails_run: bool,
    /// Where to look at them: the joblog, or the file feeder's queue
    /// (`taskherd queue list PATH`), else the feeder's log.
    pub see: String,
}

impl DeadJobs {
    /// `3 jobs of group jobs ended dead (see ...)`.
    pub fn message(&self) -> String {
        format!(
            "{} of group {} ended dead (see {})",
            count(self.count as usize, "job"),
            self.group,
            self.see
        )
    }
}

impl RunReport {
    /// Instances given up after failing, or whose host was lost.
    pub fn failed(&self) -> impl Iterator<Item = &InstanceReport> {
        self.instances
            .iter()
            .filter(|r| matches!(r.end, InstanceEnd::Failed { .. } | InstanceEnd::Lost { .. }))
    }

    /// Instances that had to be SIGKILLed at stop (after their grace, or
    /// at once on request).
    pub fn killed(&self) -> impl Iterator<Item = &InstanceReport> {
        self.instances
            .iter()
            .filter(|r| matches!(r.end, InstanceEnd::Stopped { killed: true }))
    }

    /// Instances SIGKILLed because they still ran when their stop grace
    /// was over.
    pub fn killed_after_grace(&self) -> impl Iterator<Item = &InstanceReport> {
        self.killed()
            .filter(|r| !self.killed_on_request.contains(&r.label.id))
    }

    /// `true` when the run started, no instance was marked failed and no
    /// job of a queue group with `fail_on_dead` (the default) ended dead.
    pub fn success(&self) -> bool {
        self.fatal.is_none()
            && self.failed().next().is_none()
            && !self.dead_jobs.iter().any(|dead| dead.fails_run)
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
        end_summary,
    } = launcher;
    let mut plan = plan(&config);
    if let Err(err) = super::queue::prepare(&mut plan) {
        return cannot_start(&sink, err.to_string()).await;
    }
    if let Err(err) = super::queue::setup_jetstream(&config, &sink).await {
        return cannot_start(&sink, err).await;
    }
    let http = match config
        .http
        .as_ref()
        .map(|spec| HttpServer::bind(spec, &config.base_dir()))
    {
        Some(Ok(server)) => Some(server),
        Some(Err(err)) => {
            return cannot_start(&sink, crate::error_text::error_chain(&err)).await;
        }
        None => None,
    };
    let total = plan.instances().len();
    let hosts = placement_phrase(
        plan.hosts.len(),
        !plan.local.is_empty() || !plan.feeders.is_empty(),
    );
    sink.master_event(
        Level::Info,
        format!(
            "starting {} in {}{hosts} from {}",
            count(total, "instance"),
            count(config.groups.len(), "group"),
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
    let pids = crate::supervise::open_pid_killer(state_file, &sink).await;
    let control_dir = match ControlDir::create() {
        Ok(dir) => Some(dir),
        Err(err) => {
            sink.master_event(Level::Error, format!("{err}; using /tmp"))
                .await;
            None
        }
    };
    let now = Now {
        at: tokio::time::Instant::now().into_std(),
        wall: std::time::SystemTime::now(),
    };
    let (longest_grace, longest_grace_rx) = watch::channel(config.longest_stop_grace());
    let settings = Arc::new(AgentSettings {
        heartbeat: config.master.heartbeat,
        orphan_timeout: config.master.orphan_timeout,
        agent_dir: config.master.agent_dir.clone(),
        agent_path: config.master.agent_path.clone(),
        control_dir: control_dir
            .as_ref()
            .map_or_else(std::env::temp_dir, |dir| dir.path.clone()),
        stop_grace: longest_grace_rx,
        handshakes: Arc::new(turns(config.master.max_handshakes)),
        host_turns: config.master.max_active_hosts.map(|n| Arc::new(turns(n))),
        links: super::links::HostLinks::default(),
    });
    let board = Board::new(Core::new(config.clone(), now));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (asks_tx, asks_rx) = mpsc::unbounded_channel();
    let (publish_tx, publish_rx) = mpsc::unbounded_channel();
    let herd = Herd::new(board.clone(), asks_tx);
    if let Some(callbacks) = &callbacks {
        callbacks.starting(&herd);
    }
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let pump = tokio::spawn(pump_events(
        publish_rx,
        herd.clone(),
        callbacks.clone(),
        started_rx,
    ));
    let (control_tx, control_rx) = mpsc::channel(16);
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
    let http_stop = tokio_util::sync::CancellationToken::new();
    let http_task = match http {
        Some(server) => {
            if let Some(address) = server.local_addr() {
                sink.master_event(Level::Info, format!("http: listening on http://{address}/"))
                    .await;
            }
            let serve = server.serve(
                herd.clone(),
                sink.clone(),
                settings.links.clone(),
                http_stop.clone(),
            );
            Some(tokio::spawn(serve))
        }
        None => None,
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
    duties.spawn(show_progress(board.clone(), sink.clone()));

    let context = instance::Supervision {
        sink: sink.clone(),
        shutdown: shutdown.clone(),
        pids: pids.clone(),
        events: Some(events_tx),
    };
    let mut shell = Shell::new(
        board.clone(),
        context,
        settings,
        reports_tx,
        publish_tx,
        longest_grace,
    );
    shell.handle(Event::Start(plan)).await;
    let _ = started_tx.send(());
    let mut inbox = Inbox {
        events: events_rx,
        reports: reports_rx,
        asks: asks_rx,
        control: control_rx,
    };
    shell.run(&mut inbox).await;
    drop(duties);
    sink.status_line(None);
    // Every event for the callbacks is sent: the pump ends once it has
    // called back for the last one.
    shell.stop_publishing();
    drop(herd);
    let _ = pump.await;

    let (config, retired, counts) = {
        let core = board.lock();
        let counts = core.queue_counts().clone();
        (core.config().clone(), core.retired_ever().clone(), counts)
    };
    // Instances a reload replaced or removed are not the herd's any more.
    let mut reports = std::mem::take(&mut shell.reports);
    reports.retain(|r| !retired.contains(&r.label.id));
    reports.sort_by_key(|r| r.label.id);
    let killed_on_request = reports
        .iter()
        .filter(|r| matches!(r.end, InstanceEnd::Stopped { killed: true }))
        .filter(|r| killed_on_request(config.stop_grace(&r.label.group), &shutdown))
        .map(|r| r.label.id)
        .collect();
    let dead_jobs = queue_outcomes(&config)
        .into_iter()
        .filter_map(|(group, fails_run, see)| {
            let count = counts.get(&group).map_or(0, |progress| progress.dead);
            (count > 0).then_some(DeadJobs {
                group,
                count,
                fails_run,
                see,
            })
        })
        .collect();
    let report = RunReport {
        instances: reports,
        stop_reason: shutdown.reason().map(str::to_string),
        stop_signal: shutdown.stop_signal(),
        fatal: None,
        killed_on_request,
        dead_jobs,
    };
    if end_summary {
        announce_end(&report, &sink).await;
    }
    if let Some(callbacks) = &callbacks {
        callbacks.stopped(&report);
    }
    // The stop worked, whatever happened before it: instances that had
    // failed are the run's outcome (its exit code), not the request's.
    shell.finish(stop_outcome(&report)).await;
    drop(shell);
    // The server ends once every connection has: no request can be
    // handed over any more, and every reply sender is gone.
    drop(inbox);
    control_stop.cancel();
    if let Some(task) = control_task {
        let _ = task.await;
    }
    http_stop.cancel();
    if let Some(mut task) = http_task {
        if tokio::time::timeout(super::http::SHUTDOWN_WAIT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    drop(control_dir);
    report
}

/// How often the progress line (on a terminal) is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Shortest time between two redraws of the progress line: a burst of
/// changes (a whole herd starting) is drawn once.
const PROGRESS_REDRAW_GAP: Duration = Duration::from_millis(100);

/// Keeps the progress line up to date: redrawn as soon as an instance
/// changes state (at most every [`PROGRESS_REDRAW_GAP`]), and every
/// [`PROGRESS_EVERY`] for the queue counts.
async fn show_progress(board: Board, sink: LogSink) {
    // Without a terminal there is no line to keep: no status to build.
    if !sink.has_status_line() {
        return;
    }
    let mut changed = board.watch();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        changed.mark_unchanged();
        sink.status_line(Some(progress_line(&board.status())));
        tokio::select! {
            _ = tick.tick() => {}
            seen = changed.changed() => {
                if seen.is_err() {
                    return;
                }
                // Not a wait for an event: a bound on the redraw rate.
                tokio::time::sleep(PROGRESS_REDRAW_GAP).await;
            }
        }
    }
}

/// One line for the whole herd, labeled: `taskherd: 7 running, 0 failed ·
/// web 4/4 · jobs 3/3, 1200 done, 350/s` (instances running of each
/// group; counts of the other states when there are some).
pub fn progress_line(status: &HerdStatus) -> String {
    let instances = || status.groups.iter().flat_map(|g| g.instances.iter());
    let of = |state| instances().filter(|i| i.state == state).count();
    let mut line = format!(
        "taskherd: {} running, {} failed",
        of(InstanceState::Running),
        of(InstanceState::Failed)
    );
    for (state, word) in [
        (InstanceState::Backoff, "restarting"),
        (InstanceState::Pending, "pending"),
        (InstanceState::Waiting, "waiting for their dependencies"),
        (InstanceState::Stopping, "stopping"),
        (InstanceState::Suspended, "suspended"),
        (InstanceState::Lost, "lost"),
    ] {
        let n = of(state);
        if n > 0 {
            line.push_str(&format!(", {n} {word}"));
        }
    }
    for group in &status.groups {
        let running = group
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count();
        line.push_str(&format!(
            " · {} {running}/{}",
            group.name,
            group.instances.len()
        ));
        if group.suspended {
            line.push_str(" suspended");
        }
        if let Some(queue) = &group.queue {
            line.push_str(&format!(", {} done, {:.0}/s", queue.done, queue.rate));
        }
    }
    line
}

/// Whether an instance whose stop grace is `grace`, SIGKILLed at the
/// stop, was killed because a kill was asked for before its grace had
/// passed.
fn killed_on_request(grace: Duration, shutdown: &Shutdown) -> bool {
    match (shutdown.stop_requested_at(), shutdown.kill_requested_at()) {
        (Some(stop), Some(kill)) => kill.saturating_duration_since(stop) < grace,
        _ => false,
    }
}

/// Each queue group of `config` in order: its name, whether dead jobs
/// fail the run, and where to look at them.
fn queue_outcomes(config: &Config) -> Vec<(String, bool, String)> {
    let base_dir = config.base_dir();
    config
        .groups
        .iter()
        .filter_map(|group| {
            let queue = group.queue.as_ref()?;
            let see = match (&queue.joblog, &queue.feeder_host, &queue.builtin_feeder) {
                (Some(joblog), None, _) => {
                    format!("the joblog {}", base_dir.join(joblog).display())
                }
                (Some(joblog), Some(host), _) => {
                    format!("the joblog {} on {}", joblog.display(), host.label)
                }
                (None, None, Some(BuiltinFeeder::File(file))) => {
                    format!("taskherd queue list {}", base_dir.join(file).display())
                }
                _ => "the feeder's log".to_string(),
            };
            Some((group.name.clone(), queue.fail_on_dead, see))
        })
        .collect()
}

/// What `taskherd stop` prints once the herd has stopped: how many
/// instances ended, and how many of them had failed before or had to be
/// killed.
fn stop_outcome(report: &RunReport) -> String {
    let mut message = format!(
        "stopped: {} ended",
        count(report.instances.len(), "instance")
    );
    let on_request = report.killed_on_request.len();
    if on_request > 0 {
        message.push_str(&format!("; {on_request} killed at once, as requested"));
    }
    let after_grace = report.killed_after_grace().count();
    if after_grace > 0 {
        message.push_str(&format!("; {after_grace} killed after the stop grace"));
    }
    let failed = report.failed().count();
    if failed > 0 {
        message.push_str(&format!(
            "; {failed} had failed before the stop (see the master's log)"
        ));
    }
    for dead in &report.dead_jobs {
        message.push_str("; ");
        message.push_str(&dead.message());
    }
    message
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
    let (sink, writer) =
        LogSink::start(&config.log, &config.base_dir()).map_err(std::io::Error::other)?;
    run_blocking_to(launcher, sink, writer, Shutdown::new())
}

pub(crate) fn run_blocking_to(
    launcher: Launcher,
    sink: LogSink,
    writer: LogWriter,
    shutdown: Shutdown,
) -> std::io::Result<RunReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taskherd")
        .build();
    let report = match runtime {
        Ok(runtime) => {
            let report = runtime.block_on(async move {
                crate::supervise::shutdown::stop_on_signals(shutdown.clone())?;
                std::io::Result::Ok(launcher.run(sink, shutdown).await)
            });
            // The runtime's tasks hold the last sink clones: once they are
            // gone the writer drains what is left and ends.
            drop(runtime);
            report
        }
        Err(err) => {
            drop(sink);
            Err(err)
        }
    };
    writer.finish();
    report
}

/// The run could not start, for `why`: said, and the report of a run
/// that never started.
async fn cannot_start(sink: &LogSink, why: String) -> RunReport {
    sink.master_event(Level::Critical, format!("cannot start: {why}"))
        .await;
    RunReport {
        stop_reason: Some(why.clone()),
        fatal: Some(why),
        ..RunReport::default()
    }
}

async fn announce_end(report: &RunReport, sink: &LogSink) {
    let labels = |reports: Vec<&InstanceReport>| {
        reports
            .iter()
            .map(|r| r.label.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let after_grace: Vec<_> = report.killed_after_grace().collect();
    if !after_grace.is_empty() {
        let message = format!(
            "had to kill {} after the stop grace: {}",
            count(after_grace.len(), "instance"),
            labels(after_grace)
        );
        sink.master_event(Level::Warning, message).await;
    }
    let on_request: Vec<_> = report
        .killed()
        .filter(|r| report.killed_on_request.contains(&r.label.id))
        .collect();
    if !on_request.is_empty() {
        let message = format!(
            "killed {} at once, as requested: {}",
            count(on_request.len(), "instance"),
            labels(on_request)
        );
        sink.master_event(Level::Notice, message).await;
    }
    let failed: Vec<_> = report.failed().collect();
    if !failed.is_empty() {
        let message = format!(
            "{} marked failed: {}",
            count(failed.len(), "instance"),
            labels(failed)
        );
        sink.master_event(Level::Error, message).await;
    }
    for dead in &report.dead_jobs {
        let (level, message) = if dead.fails_run {
            (Level::Error, dead.message())
        } else {
            // `fail_on_dead = false`: said, but not a failure of the run.
            (Level::Warning, dead.message())
        };
        sink.master_event(level, message).await;
    }
    let how = if report.stop_reason.is_some() {
        "stopped"
    } else {
        "all instances ended"
    };
    sink.master_event(
        Level::Info,
        format!(
            "{how}: {}, exiting",
            count(report.instances.len(), "instance")
        ),
    )
    .await;
}

/// The duration a test or caller should allow for a clean stop of
/// `config`: its [longest stop grace](Config::longest_stop_grace).
pub fn stop_budget(config: &Config) -> Duration {
    config.longest_stop_grace()
}

/// The local directory of the run's ControlMaster sockets: short (socket
/// paths must fit 104/108 bytes), private, removed at the end of the run.
struct ControlDir {
    path: PathBuf,
}

impl ControlDir {
    /// Longest base directory that keeps the socket path
    /// (`<base>/taskherd-<pid>/<n>.sock`) well under
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

/// A semaphore of `n` turns (at most tokio's limit, which `Semaphore::new`
/// would panic beyond).
fn turns(n: u32) -> tokio::sync::Semaphore {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    tokio::sync::Semaphore::new(n.min(tokio::sync::Semaphore::MAX_PERMITS))
}

/// Where the start line says the instances run: " on 2 remote hosts",
/// " on 2 remote hosts and locally", or nothing when all are local.
fn placement_phrase(remote_hosts: usize, local: bool) -> String {
    match (remote_hosts, local) {
        (0, _) => String::new(),
        (n, true) => format!(" on {} and locally", count(n, "remote host")),
        (n, false) => format!(" on {}", count(n, "remote host")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::InstanceLabel;
    use crate::protocol::control::{GroupStatus, InstanceStatus};

    fn instance(id: u32, state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            id,
            group_id: id,
            host: "localhost".into(),
            command: "w".into(),
            state,
            pid: None,
            uptime_ms: None,
            restarts: 0,
            last_exit: None,
            seen_ms_ago: None,
            health: None,
        }
    }

    #[test]
    fn the_start_line_says_locally_only_when_something_runs_here() {
        assert_eq!(placement_phrase(0, true), "");
        assert_eq!(placement_phrase(0, false), "");
        assert_eq!(placement_phrase(1, false), " on 1 remote host");
        assert_eq!(placement_phrase(3, true), " on 3 remote hosts and locally");
    }

    #[test]
    fn the_progress_line_is_labeled_and_counts_states() {
        let status = HerdStatus {
            groups: vec![
                GroupStatus {
                    name: "web".into(),
                    instances: vec![
                        instance(1, InstanceState::Running),
                        instance(2, InstanceState::Backoff),
                    ],
                    ..GroupStatus::default()
                },
                GroupStatus {
                    name: "batch".into(),
                    suspended: true,
                    instances: vec![instance(3, InstanceState::Suspended)],
                    ..GroupStatus::default()
                },
            ],
            ..HerdStatus::default()
        };
        assert_eq!(
            progress_line(&status),
            "taskherd: 1 running, 0 failed, 1 restarting, 1 suspended · web 1/2 · batch 0/1 suspended"
        );
    }

    fn report(group: &str, id: u32, end: InstanceEnd) -> InstanceReport {
        InstanceReport {
            label: Arc::new(InstanceLabel {
                group: group.into(),
                host: "localhost".into(),
                command: "w".into(),
                id,
                group_id: id,
            }),
            end,
        }
    }

    #[test]
    fn kills_on_request_and_after_the_grace_are_told_apart() {
        let config = Config::parse(
            "[master]\nstop_grace = \"10s\"\n\
             [[group]]\nname = \"quick\"\ncommand = \"true\"\nstop_grace = \"1s\"\n[group.local]\ninstances = 1\n\
             [[group]]\nname = \"slow\"\ncommand = \"true\"\n[group.local]\ninstances = 1\n",
            Path::new("herd.toml"),
        )
        .unwrap();
        let grace = |group| config.stop_grace(group);
        assert_eq!(grace("quick"), Duration::from_secs(1));
        assert_eq!(grace("gone"), Duration::from_secs(10));
        assert_eq!(stop_budget(&config), Duration::from_secs(10));
        // A stop, then a kill at once: within every grace.
        let shutdown = Shutdown::new();
        assert!(!killed_on_request(grace("slow"), &shutdown));
        shutdown.request_stop("test");
        assert!(!killed_on_request(grace("slow"), &shutdown), "no kill yet");
        shutdown.kill_now("again");
        assert!(killed_on_request(grace("slow"), &shutdown));
        assert!(killed_on_request(grace("quick"), &shutdown));
        assert!(killed_on_request(grace("gone"), &shutdown));
        // A grace of zero had passed by then.
        assert!(!killed_on_request(Duration::ZERO, &shutdown));

        let stopped = |killed| InstanceEnd::Stopped { killed };
        let run = RunReport {
            instances: vec![
                report("quick", 1, stopped(true)),
                report("slow", 2, stopped(true)),
                report("slow", 3, stopped(false)),
                report("slow", 4, InstanceEnd::Failed { reason: "x".into() }),
            ],
            stop_reason: Some("test".into()),
            stop_signal: None,
            fatal: None,
            killed_on_request: vec![2],
            dead_jobs: Vec::new(),
        };
        assert_eq!(
            stop_outcome(&run),
            "stopped: 4 instances ended; 1 killed at once, as requested; \
             1 killed after the stop grace; 1 had failed before the stop (see the master's log)"
        );
        let ids: Vec<u32> = run.killed_after_grace().map(|r| r.label.id).collect();
        assert_eq!(ids, [1]);
        let one = RunReport {
            instances: vec![report("slow", 3, stopped(false))],
            ..RunReport::default()
        };
        assert_eq!(stop_outcome(&one), "stopped: 1 instance ended");
        assert!(one.success());

        // Dead jobs fail the run unless the group says otherwise; the stop
        // itself worked either way (its message says so).
        let dead = |fails_run| DeadJobs {
            group: "jobs".into(),
            count: 3,
            fails_run,
            see: "taskherd queue list /q/jobs.queue".into(),
        };
        let failing = RunReport {
            dead_jobs: vec![dead(true)],
            ..one.clone()
        };
        assert!(!failing.success());
        assert_eq!(
            stop_outcome(&failing),
            "stopped: 1 instance ended; 3 jobs of group jobs ended dead \
             (see taskherd queue list /q/jobs.queue)"
        );
        let lenient = RunReport {
            dead_jobs: vec![dead(false)],
            ..one
        };
        assert!(lenient.success());
    }
}
