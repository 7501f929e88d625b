//! What the master and the agents exchange about instances: what to run
//! ([`InstanceSpec`]), what an operator asks of one ([`InstanceCommand`]),
//! what happens to it ([`InstanceEvent`]) and how it ended
//! ([`InstanceEnd`]), its restart policy ([`RestartSpec`]), and the
//! labels and streams of its log lines.
//!
//! Plain data only: supervision (`supervise`) gives it its behaviour, on the
//! master's host and on every agent's alike.

use super::slave::{Identity, QueueProgress};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where an instance runs and who it is, as shown in every log prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceLabel {
    /// Group name.
    pub group: String,
    /// Host name as the master knows it.
    pub host: String,
    /// Base name of the command.
    pub command: String,
    /// Global id.
    pub id: u32,
    /// Id within the group.
    pub group_id: u32,
}

impl std::fmt::Display for InstanceLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] [{}] [{}/{}/{}]",
            self.group, self.host, self.command, self.id, self.group_id
        )
    }
}

/// Which channel a line came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The instance's standard output.
    Stdout,
    /// The instance's standard error.
    Stderr,
    /// A structured record sent through the slave library.
    Control,
    /// An event of the master itself.
    Master,
}

/// What to execute: pure data, resolved against the config directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Program path (or bare name looked up in `PATH`). With
    /// `own_executable`, only a name for messages.
    pub program: PathBuf,
    /// Run the spawner's own executable ([`std::env::current_exe`])
    /// instead of `program`: taskherd's built-in roles (the file feeder,
    /// the exec consumer runner) are subcommands of the `taskherd`
    /// binary. On the master's host that is the master (a program that
    /// embeds the master runs itself, so built-in roles need the
    /// `taskherd` binary as the master); on a remote host it is the agent
    /// (uploaded, or `master.agent_path`), since the agent spawns with
    /// this same code. Absent in the frames of older masters: `false`.
    #[serde(default)]
    pub own_executable: bool,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment, on top of the master's.
    pub env: Vec<(String, String)>,
    /// Working directory; the master's when `None`.
    pub cwd: Option<PathBuf>,
}

/// Everything needed to run one instance: pure data (it travels to remote
/// agents as is).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Who it is, for log prefixes.
    pub label: Arc<InstanceLabel>,
    /// What to execute.
    pub process: ProcessSpec,
    /// What the instance is told about itself; `identity.timeout` is the
    /// liveness timeout once it proves it uses the library.
    pub identity: Identity,
    /// Liveness timeout from its first moment, library or not (set when the
    /// group configures `timeout`).
    #[serde(with = "super::millis::option")]
    pub plain_timeout: Option<Duration>,
    /// Time between Stop and SIGKILL.
    #[serde(with = "super::millis")]
    pub stop_grace: Duration,
    /// Restart policy.
    pub restart: RestartSpec,
    /// Recycle the instance after it ran this long.
    #[serde(default, with = "super::millis::option")]
    pub max_lifetime: Option<Duration>,
    /// Stop a run of the instance that lasts longer than this, as a
    /// failure (`time_limit`). Absent in the frames of older masters:
    /// none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::millis::option"
    )]
    pub time_limit: Option<Duration>,
    /// Its health check, run where it runs, beside liveness. Absent in the
    /// frames of older masters: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// Who it runs as and under which limits, applied on its host. Absent
    /// in the frames of older masters: none.
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    /// When its process counts as ready (`[group.ready]`), judged where
    /// it runs: [`EventKind::Ready`] then, or [`EventKind::NotReady`] past
    /// the timeout. `None`: ready once started. Absent in the frames of
    /// older masters: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadySpec>,
    /// Other groups start after this one (`after`): on the herd's stop
    /// it waits for the master's word (a [`InstanceCommand::Remove`],
    /// once its dependents have ended) before it stops, at most this
    /// long; then it stops anyway. `None`: it stops with the herd at
    /// once. Absent in the frames of older masters: none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::millis::option"
    )]
    pub stop_wait: Option<Duration>,
}

impl InstanceSpec {
    /// Instance `id` (of `group_count`) of `group` on `host` that runs
    /// `sh -c script` once (restart policy `never`), with a config's
    /// defaults otherwise: a 5 s stop grace, no timeout, no parameters,
    /// no health check, no limits. For programs and tests that supervise a
    /// shell command without a config.
    pub fn shell(group: &str, host: &str, id: u32, group_count: u32, script: &str) -> Self {
        const STOP_GRACE: Duration = Duration::from_secs(5);
        InstanceSpec {
            label: Arc::new(InstanceLabel {
                group: group.into(),
                host: host.into(),
                command: "sh".into(),
                id,
                group_id: id,
            }),
            process: ProcessSpec {
                program: "sh".into(),
                args: vec!["-c".into(), script.into()],
                env: vec![],
                cwd: None,
                own_executable: false,
            },
            identity: Identity {
                vars: Default::default(),
                id,
                group_id: id,
                group_count,
                group: group.into(),
                host: host.into(),
                params: serde_json::json!({}),
                timeout: None,
                stop_grace: STOP_GRACE,
                max_jobs: None,
                queue: None,
            },
            plain_timeout: None,
            stop_grace: STOP_GRACE,
            restart: RestartSpec {
                policy: RestartPolicy::Never,
                ..RestartSpec::default()
            },
            max_lifetime: None,
            time_limit: None,
            health: None,
            limits: Limits::default(),
            ready: None,
            stop_wait: None,
        }
    }
}

/// When an instance counts as ready (`[group.ready]`): the groups that
/// start `after` its group wait for that. The check runs where the
/// instance runs (the master's host, or the agent on a remote host),
/// from each start of its process until it passes or `timeout` passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadySpec {
    /// What tells that it is ready.
    pub probe: ReadyProbe,
    /// Longest wait from the start of its process: past it the instance
    /// is said not ready ([`EventKind::NotReady`], logged) and the groups
    /// after it do not start (until it is ready after all). Key
    /// `timeout`, default 60 s.
    #[serde(with = "super::millis")]
    pub timeout: Duration,
    /// Time between two probes (`tcp`, `http`, `command`). Key
    /// `interval`, default 250 ms.
    #[serde(with = "super::millis")]
    pub interval: Duration,
}

/// What makes an instance ready (one of the keys of `[group.ready]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyProbe {
    /// The program says so through the slave library
    /// (`Handler::ready`). Key `notify = true`.
    Notify,
    /// A health probe passes once (`tcp`, `http`, `command`).
    Probe(HealthProbe),
    /// A line of its output (stdout or stderr) matches this regular
    /// expression. Key `log`.
    Log(String),
}

impl std::fmt::Display for ReadyProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyProbe::Notify => write!(f, "its ready call"),
            ReadyProbe::Probe(probe) => write!(f, "{probe}"),
            ReadyProbe::Log(pattern) => write!(f, "a line matching /{pattern}/"),
        }
    }
}

/// Who an instance runs as and the resource limits it runs under (keys
/// `user` and `group` of a group, and its `[group.limits]`), applied on
/// the instance's host at each start. Switching user or group needs the
/// master (or the agent) to run as root.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Run as this user (name), with its groups. Key `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run with this group (name) as the primary group (the user's own
    /// otherwise). Key `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `RLIMIT_NOFILE`: open files. Key `nofile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC`: processes of the user. Key `nproc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    /// `RLIMIT_CORE`: core file size in bytes (0: no core files). Key
    /// `core`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core: Option<u64>,
    /// Memory cap in bytes: of the whole instance as a cgroup memory
    /// limit (v2, else v1) where its host allows one, else `RLIMIT_AS`
    /// (address space) of each process. Key `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
}

impl Limits {
    /// Nothing set: the master's user and limits.
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// A group's health check (`[group.health]`), as each of its instances is
/// checked: one probe every `interval`, each bounded by `timeout`;
/// `failures` failed in a row and the instance is killed (its process
/// group) and restarted per its policy, as after a liveness timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// What is probed.
    pub probe: HealthProbe,
    /// Time between two probes (and before the first). Key `interval`,
    /// default 10 s.
    #[serde(with = "super::millis")]
    pub interval: Duration,
    /// Longest wait for one probe. Key `timeout`, default 5 s.
    #[serde(with = "super::millis")]
    pub timeout: Duration,
    /// Probes failed in a row that make the instance unhealthy. Key
    /// `failures`, default 3.
    pub failures: u32,
}

/// What a health check probes (one of the keys `tcp`, `http`,
/// `command`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthProbe {
    /// A TCP connection to `host:port` is accepted.
    Tcp(String),
    /// A `GET` of an `http://` URL answers with a 2xx status.
    Http(String),
    /// `sh -c COMMAND` exits with 0 (in the instance's directory and
    /// environment).
    Command(String),
}

impl std::fmt::Display for HealthProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthProbe::Tcp(addr) => write!(f, "tcp {addr}"),
            HealthProbe::Http(url) => write!(f, "http {url}"),
            HealthProbe::Command(command) => write!(f, "command `{command}`"),
        }
    }
}

/// The `restart` table of a group (config keys below), as each of its
/// instances is supervised by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartSpec {
    /// When to restart. Key `policy`, default `"on-failure"`.
    pub policy: RestartPolicy,
    /// First backoff delay. Key `initial`, default 1 s.
    #[serde(with = "super::millis")]
    pub initial: Duration,
    /// Backoff cap: the delay doubles up to this. Key `max`, default 30 s.
    #[serde(with = "super::millis")]
    pub max: Duration,
    /// Random spread of each delay, as a fraction (0.1 = ±10 %). Key
    /// `jitter`, default 0.1, between 0 and 1.
    pub jitter: f64,
    /// An instance that ran this long is healthy: its restart count and
    /// backoff start over. Key `reset_after`, default 60 s.
    #[serde(with = "super::millis")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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

/// How an instance's supervision ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum InstanceEnd {
    /// It ended and its policy does not restart it.
    Completed,
    /// It was given up: restart limit reached, or failed with policy never.
    Failed {
        /// The last failure.
        reason: String,
    },
    /// The master stopped it.
    Stopped {
        /// Whether it had to be SIGKILLed.
        killed: bool,
    },
    /// Its host was lost during a stop, or never reached: nobody can say
    /// how it ended.
    Lost {
        /// What happened to the host.
        reason: String,
    },
}

/// What an operator (or an embedding program) asks of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceCommand {
    /// Stop it cleanly and keep it stopped until resumed.
    Suspend,
    /// Start it again after a suspend.
    Resume,
    /// Stop it cleanly and start it again at once.
    Restart,
    /// Stop it cleanly and end its supervision (it left the config).
    Remove,
}

/// Something that happened to an instance, as status and events see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceEvent {
    /// Global id of the instance.
    pub id: u32,
    /// When, in ms since the Unix epoch.
    pub time_ms: u64,
    /// What.
    pub kind: EventKind,
}

/// The kinds of [`InstanceEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// About to spawn its process.
    Created,
    /// Its process runs.
    Started {
        /// Its pid (on its host).
        pid: u32,
    },
    /// A sign of life since the last one (sent at most every few seconds).
    Seen,
    /// No sign of life within its timeout: it is being killed.
    TimedOut,
    /// It is being stopped.
    Stopping,
    /// Its process ended.
    Exited {
        /// How ("exited with code 0", "killed by SIGKILL").
        how: String,
        /// Whether that counts as a failure.
        failed: bool,
    },
    /// It will be restarted after this delay.
    Backoff {
        /// The delay, in ms.
        delay_ms: u64,
    },
    /// Stopped by a suspend; waits for a resume.
    Suspended,
    /// Its feeder's latest counts (queue groups).
    Progress {
        /// The counts.
        progress: QueueProgress,
    },
    /// Its health check's verdict changed (the first verdict of each
    /// process too).
    Health {
        /// Healthy (else unhealthy).
        healthy: bool,
        /// The last failure, while unhealthy or failing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        why: Option<String>,
    },
    /// Its process is ready (`[group.ready]`; without it, being started
    /// is being ready).
    Ready,
    /// Its process was not ready within its `[group.ready] timeout`: the
    /// groups after it wait (they start if it becomes ready after all).
    NotReady {
        /// Why (the last probe's failure, or the timeout).
        why: String,
    },
    /// Its supervision is over.
    Ended {
        /// How.
        end: InstanceEnd,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_of_older_masters_are_not_own_executable() {
        let old = r#"{"program":"sh","args":[],"env":[],"cwd":null}"#;
        let spec: ProcessSpec = serde_json::from_str(old).expect("decode");
        assert!(!spec.own_executable);
    }
}
