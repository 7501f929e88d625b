//! The validated config: plain data, no runtime state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A whole herd: master settings and groups, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (errors and relative paths refer to it).
    pub source: PathBuf,
    /// Settings of the master itself.
    pub master: MasterSpec,
    /// The groups, in config order (global ids follow this order).
    pub groups: Vec<GroupSpec>,
}

/// The `[master]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterSpec {
    /// Liveness timeout of instances that use the slave library, unless
    /// their group sets its own. Key `timeout`, default 30 s.
    pub timeout: Duration,
    /// Time between the Stop request and SIGKILL. Key `stop_grace`, default 10 s.
    pub stop_grace: Duration,
    /// After this long the master stops everything cleanly. Key
    /// `max_running_time`, default none (run until stopped or all ended).
    pub max_running_time: Option<Duration>,
    /// How log lines are written. Key `log_format`, `"text"` (default) or `"json"`.
    pub log_format: LogFormat,
}

impl Default for MasterSpec {
    fn default() -> Self {
        MasterSpec {
            timeout: DEFAULT_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            max_running_time: None,
            log_format: LogFormat::Text,
        }
    }
}

/// Default of `master.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `master.stop_grace`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Format of the master's log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `time level [group] [host] [command/id/group_id] message`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// One `[[group]]`: a program and where to run how many of it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    /// Unique name, used in logs and commands. Key `name`.
    pub name: String,
    /// The program to run. A relative path containing `/` is resolved
    /// against the config file's directory; a bare name is looked up in
    /// `PATH`. Key `command`.
    pub command: String,
    /// Arguments (never the params: those go over the control channel and
    /// the environment, not where `ps` shows them). Key `args`, default empty.
    pub args: Vec<String>,
    /// Any JSON-compatible table, delivered to every instance. Key
    /// `params`, default empty table.
    pub params: serde_json::Value,
    /// Extra environment variables. Key `env`, default empty.
    pub env: BTreeMap<String, String>,
    /// Working directory, relative to the config file's directory. Key
    /// `cwd`, default the master's working directory.
    pub cwd: Option<PathBuf>,
    /// What to do when an instance ends. Key `restart`.
    pub restart: RestartSpec,
    /// Liveness timeout for this group; applies to every instance, plain
    /// programs included (any output counts). `Some(ZERO)` disables the
    /// check. Key `timeout`, default `master.timeout` for library instances
    /// and none for plain programs.
    pub timeout: Option<Duration>,
    /// Stop grace for this group. Key `stop_grace`, default `master.stop_grace`.
    pub stop_grace: Option<Duration>,
    /// Instances on the master's host. Table `[group.local]`.
    pub local: Option<LocalPlacement>,
}

/// `[group.local]`: instances started by the master itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPlacement {
    /// How many instances (at least 1). Key `instances`.
    pub instances: u32,
}

/// The `restart` table of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartSpec {
    /// When to restart. Key `policy`, default `"on-failure"`.
    pub policy: RestartPolicy,
    /// First backoff delay. Key `initial`, default 1 s.
    pub initial: Duration,
    /// Backoff cap: the delay doubles up to this. Key `max`, default 30 s.
    pub max: Duration,
    /// Random spread of each delay, as a fraction (0.1 = ±10 %). Key
    /// `jitter`, default 0.1, between 0 and 1.
    pub jitter: f64,
    /// An instance that ran this long is healthy: its restart count and
    /// backoff start over. Key `reset_after`, default 60 s.
    pub reset_after: Duration,
    /// Restarts in a row (without a healthy period) after which the next
    /// failure marks the instance failed. `None` is unlimited. Key `limit`,
    /// default 10, or `"unlimited"`.
    pub limit: Option<u32>,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartPolicy::OnFailure,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            jitter: 0.1,
            reset_after: Duration::from_secs(60),
            limit: Some(10),
        }
    }
}

/// When an instance that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Never: an ended instance stays ended (`"never"`).
    Never,
    /// After a failure: non-zero exit, death by signal, liveness timeout,
    /// or a failure reported by the slave library (`"on-failure"`).
    #[default]
    OnFailure,
    /// Whatever the outcome, until the master stops (`"always"`).
    Always,
}

impl GroupSpec {
    /// Total number of instances of the group over all placements.
    pub fn instance_count(&self) -> u32 {
        self.local.as_ref().map_or(0, |local| local.instances)
    }

    /// The command's base name, as shown in log prefixes.
    pub fn command_name(&self) -> &str {
        self.command
            .rsplit('/')
            .find(|part| !part.is_empty())
            .unwrap_or(&self.command)
    }
}
