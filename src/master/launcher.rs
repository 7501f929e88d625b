//! The launcher: turns a config into supervised instances, runs them until
//! they all end or a stop is requested, and reports how it went.

use super::instance::{self, InstanceEnd, InstanceReport, InstanceSpec};
use super::log::{InstanceLabel, LogSink};
use super::process::ProcessSpec;
use super::remote::{self, AgentSettings, HostPlan};
use super::shutdown::Shutdown;
use crate::config::{Config, GroupSpec, HostSpec, RemotePlacement, SshOptions};
use crate::protocol::slave::{Identity, Level};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Longest wait for a feeder's listening address before its consumers
/// start anyway.
const FEEDER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Host name of instances started by the master itself.
pub const LOCAL_HOST: &str = "localhost";

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

/// Where every instance of a config runs.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Feeders of queue groups: started first, on the master's host.
    pub feeders: Vec<InstanceSpec>,
    /// Instances the master starts itself.
    pub local: Vec<InstanceSpec>,
    /// One entry per remote host (all groups placed on it), in config order.
    pub hosts: Vec<HostPlan>,
}

impl Plan {
    /// Every instance, local and remote, in id order.
    pub fn instances(&self) -> Vec<&InstanceSpec> {
        let mut all: Vec<&InstanceSpec> = self
            .feeders
            .iter()
            .chain(self.local.iter())
            .chain(self.hosts.iter().flat_map(|host| host.instances.iter()))
            .collect();
        all.sort_by_key(|spec| spec.label.id);
        all
    }
}

/// Plans a config: global ids 1..N in config order (within a group: local
/// instances first, then each remote placement's hosts in order), group
/// ids 1..group_count within each group.
pub fn plan(config: &Config) -> Plan {
    let base_dir = config.base_dir();
    let mut plan = Plan::default();
    let mut next_id = 1;
    for group in &config.groups {
        let mut placed = GroupPlacer {
            group,
            config,
            group_count: group.instance_count(),
            next_group_id: 1,
        };
        if let Some(queue) = &group.queue {
            let process = process_spec(group, &base_dir);
            let mut feeder = placed.instance(&mut next_id, LOCAL_HOST, &process);
            feeder.identity.queue = Some(super::queue::feeder_role(queue));
            plan.feeders.push(feeder);
        }
        if let Some(local) = &group.local {
            let process = process_spec(group, &base_dir);
            for _ in 0..local.instances {
                let mut spec = placed.instance(&mut next_id, LOCAL_HOST, &process);
                if let Some(queue) = &group.queue {
                    spec.identity.queue =
                        Some(super::queue::consumer_role(queue, local.concurrency));
                }
                plan.local.push(spec);
            }
        }
        for placement in &group.remote {
            let process = remote_process_spec(group, placement);
            for host in &placement.hosts {
                let index = match plan.hosts.iter().position(|h| same_host(&h.host, host)) {
                    Some(index) => index,
                    None => {
                        plan.hosts.push(HostPlan {
                            host: host.clone(),
                            ssh: resolve_ssh(&placement.ssh, &base_dir),
                            instances: Vec::new(),
                        });
                        plan.hosts.len() - 1
                    }
                };
                for _ in 0..placement.instances {
                    let mut spec = placed.instance(&mut next_id, &host.label, &process);
                    if let Some(queue) = &group.queue {
                        spec.identity.queue =
                            Some(super::queue::consumer_role(queue, placement.concurrency));
                    }
                    plan.hosts[index].instances.push(spec);
                }
            }
        }
    }
    plan
}

/// One connection per host: entries naming the same login on the same
/// address and port are one host.
fn same_host(a: &HostSpec, b: &HostSpec) -> bool {
    a.name == b.name && a.port == b.port && a.user == b.user
}

/// Numbers the instances of one group.
struct GroupPlacer<'a> {
    group: &'a GroupSpec,
    config: &'a Config,
    group_count: u32,
    next_group_id: u32,
}

impl GroupPlacer<'_> {
    fn instance(&mut self, next_id: &mut u32, host: &str, process: &ProcessSpec) -> InstanceSpec {
        let group = self.group;
        let id = *next_id;
        let group_id = self.next_group_id;
        *next_id += 1;
        self.next_group_id += 1;
        let library_timeout = group.timeout.unwrap_or(self.config.master.timeout);
        let stop_grace = group.stop_grace.unwrap_or(self.config.master.stop_grace);
        InstanceSpec {
            label: Arc::new(InstanceLabel {
                group: group.name.clone(),
                host: host.to_string(),
                command: group.command_name().to_string(),
                id,
                group_id,
            }),
            process: process.clone(),
            identity: Identity {
                id,
                group_id,
                group_count: self.group_count,
                group: group.name.clone(),
                host: host.to_string(),
                params: group.params.clone(),
                timeout: Some(library_timeout).filter(|t| !t.is_zero()),
                stop_grace,
                max_jobs: group.max_jobs,
                queue: None,
            },
            plain_timeout: group.timeout,
            stop_grace,
            restart: group.restart.clone(),
            max_lifetime: group.max_lifetime,
        }
    }
}

fn process_spec(group: &GroupSpec, base_dir: &Path) -> ProcessSpec {
    // A bare name is looked up in PATH; anything with a slash is a path,
    // relative to the config file like every path in it.
    let program = if group.command.contains('/') {
        base_dir.join(&group.command)
    } else {
        PathBuf::from(&group.command)
    };
    ProcessSpec {
        program,
        args: group.args.clone(),
        env: group
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: group.cwd.as_ref().map(|cwd| base_dir.join(cwd)),
    }
}

/// On a remote host paths are the host's: relative ones are relative to
/// the remote cwd (or the login's home), never to the config file.
fn remote_process_spec(group: &GroupSpec, placement: &RemotePlacement) -> ProcessSpec {
    let mut env = group.env.clone();
    env.extend(placement.env.clone());
    ProcessSpec {
        program: PathBuf::from(placement.command.as_deref().unwrap_or(&group.command)),
        args: group.args.clone(),
        env: env.into_iter().collect(),
        cwd: placement.cwd.clone(),
    }
}

/// Local files named by ssh settings are relative to the config file
/// (`~/` is left to ssh).
fn resolve_ssh(options: &SshOptions, base_dir: &Path) -> SshOptions {
    let resolve = |path: &Option<PathBuf>| {
        path.as_ref().map(|p| {
            if p.is_absolute() || p.starts_with("~") {
                p.clone()
            } else {
                base_dir.join(p)
            }
        })
    };
    SshOptions {
        config_file: resolve(&options.config_file),
        identity_file: resolve(&options.identity_file),
        ..options.clone()
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
/// let (sink, writer) = LogSink::spawn(config.master.log_format, std::io::stdout())?;
/// let shutdown = Shutdown::new();
/// master::stop_on_signals(shutdown.clone())?;
/// let report = master::run(config, sink, shutdown).await;
/// writer.finish();
/// std::process::exit(if report.success() { 0 } else { 1 });
/// # }
/// ```
pub async fn run(config: Config, sink: LogSink, shutdown: Shutdown) -> RunReport {
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
    let grace = config.master.stop_grace;
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
    let control_dir = ControlDir::create();
    let context = instance::Supervision {
        sink: sink.clone(),
        shutdown: shutdown.clone(),
        pids: pids.clone(),
    };
    let mut tasks: JoinSet<Vec<InstanceReport>> = JoinSet::new();
    // Feeders first: their consumers start once they listen.
    let mut listening = Vec::new();
    for spec in plan.feeders {
        let (listening_tx, listening_rx) = tokio::sync::watch::channel(None);
        listening.push((spec.label.clone(), listening_rx));
        let context = context.clone();
        tasks.spawn(
            async move { vec![instance::supervise(spec, context, Some(listening_tx)).await] },
        );
    }
    for (label, mut listening_rx) in listening {
        let listened = tokio::select! {
            listened = tokio::time::timeout(FEEDER_START_TIMEOUT, listening_rx.wait_for(Option::is_some)) => {
                matches!(listened, Ok(Ok(_)))
            }
            _ = shutdown.stopping() => true,
        };
        if !listened {
            let message = format!(
                "feeder did not listen within {}; starting its consumers anyway (they connect when it does)",
                humantime::format_duration(FEEDER_START_TIMEOUT)
            );
            sink.instance_event(&label, Level::Error, message).await;
        }
    }
    for spec in plan.local {
        let context = context.clone();
        tasks.spawn(async move { vec![instance::supervise(spec, context, None).await] });
    }
    if !plan.hosts.is_empty() {
        let control_dir = match &control_dir {
            Ok(dir) => dir.path.clone(),
            Err(err) => {
                sink.master_event(Level::Error, format!("{err}; using /tmp"))
                    .await;
                std::env::temp_dir()
            }
        };
        let settings = Arc::new(AgentSettings {
            heartbeat: config.master.heartbeat,
            orphan_timeout: config.master.orphan_timeout,
            agent_dir: config.master.agent_dir.clone(),
            agent_path: config.master.agent_path.clone(),
            control_dir,
            stop_grace: stop_budget(&config),
        });
        for host in plan.hosts {
            tasks.spawn(remote::supervise_host(
                host,
                settings.clone(),
                sink.clone(),
                shutdown.clone(),
            ));
        }
    }
    let deadline = config
        .master
        .max_running_time
        .map(|limit| (limit, tokio::time::Instant::now() + limit));

    let mut reports = Vec::new();
    let mut stop_announced = false;
    let mut kill_announced = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(done)) => reports.extend(done),
                Some(Err(err)) => {
                    sink.master_event(Level::Critical, format!("an instance supervisor crashed: {err}")).await;
                }
            },
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
    reports.sort_by_key(|r| r.label.id);
    let report = RunReport {
        instances: reports,
        stop_reason: shutdown.reason().map(str::to_string),
        fatal: None,
    };
    announce_end(&report, &sink).await;
    report
}

/// Runs a herd from a plain (non-async) program: owns a runtime, logs to
/// stdout in the config's format, stops cleanly on SIGTERM/SIGINT (a second
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
/// If the runtime, the log writer or the signal handlers cannot be set up;
/// nothing was started then.
pub fn run_blocking(config: Config) -> std::io::Result<RunReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taskherd")
        .build()?;
    let (sink, writer) = LogSink::spawn(config.master.log_format, std::io::stdout())?;
    let report = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        super::stop_on_signals(shutdown.clone())?;
        std::io::Result::Ok(run(config, sink, shutdown).await)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_global_and_group_ids_restart() {
        let text = r#"
[[group]]
name = "a"
command = "./bin/a"
[group.local]
instances = 2

[[group]]
name = "b"
command = "sh"
timeout = "5s"
[group.local]
instances = 1
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let specs = plan(&config)
            .instances()
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        let ids: Vec<_> = specs
            .iter()
            .map(|s| {
                (
                    s.label.group.as_str(),
                    s.identity.id,
                    s.identity.group_id,
                    s.identity.group_count,
                )
            })
            .collect();
        assert_eq!(ids, [("a", 1, 1, 2), ("a", 2, 2, 2), ("b", 3, 1, 1)]);
        assert_eq!(specs[0].process.program, PathBuf::from("/etc/herd/./bin/a"));
        assert_eq!(specs[2].process.program, PathBuf::from("sh"));
        assert_eq!(specs[0].plain_timeout, None);
        assert_eq!(specs[0].identity.timeout, Some(Duration::from_secs(30)));
        assert_eq!(specs[2].plain_timeout, Some(Duration::from_secs(5)));
    }
}
