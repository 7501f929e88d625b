//! The validated config: plain data, no runtime state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

// The restart policy travels to agents with each instance: wire data.
#[doc(inline)]
pub use crate::protocol::instance::{
    HealthProbe, HealthSpec, Limits, ReadyProbe, ReadySpec, RestartPolicy, RestartSpec,
};

/// A whole herd: master settings and groups, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (errors and relative paths refer to it).
    pub source: PathBuf,
    /// Settings of the master itself.
    pub master: MasterSpec,
    /// Where the herd's log goes and what it keeps (`[log]`).
    pub log: LogSpec,
    /// The groups, in config order (global ids follow this order).
    pub groups: Vec<GroupSpec>,
    /// The master's HTTP interface (`[http]`): off when `None` (boxed:
    /// configs travel in the master's events, kept small).
    pub http: Option<Box<HttpSpec>>,
    /// `[nats]`: the NATS servers of queue groups with `backend = "nats"`
    /// (boxed: most configs have none).
    pub nats: Option<Box<NatsSpec>>,
}

/// Default port of `http.bind`.
pub const DEFAULT_HTTP_PORT: u16 = 8470;

/// Default of `http.max_body`: 4 MiB.
pub const DEFAULT_HTTP_MAX_BODY: u64 = 4 << 20;

/// Default of `http.header_timeout`: 10 seconds.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Default of `http.max_connections`.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: u32 = 256;

/// The environment variable that gives the HTTP token when the config
/// sets neither `http.token` nor `http.token_file`.
pub const HTTP_TOKEN_ENV: &str = "TASKHERD_HTTP_TOKEN";

/// The `[http]` table: the master's HTTP interface (webhook, status,
/// events, metrics, dashboard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpec {
    /// Where it listens. Key `bind`, default `127.0.0.1:8470`
    /// ([`DEFAULT_HTTP_PORT`]); port 0 picks a free one.
    pub bind: std::net::SocketAddr,
    /// Where the bearer token comes from (needed for every write, and for
    /// everything on an address beyond loopback).
    pub token: HttpToken,
    /// Largest request body accepted, in bytes. Key `max_body`, a size
    /// such as `"4MiB"` (the default).
    pub max_body: u64,
    /// Longest wait for a request's headers, from when the connection is
    /// ready for one (new, or idle between requests): a connection that
    /// sends nothing, or trickles its headers, is closed after it. Key
    /// `header_timeout`, default 10 s ([`DEFAULT_HTTP_HEADER_TIMEOUT`]).
    pub header_timeout: std::time::Duration,
    /// Connections served at once, at most; more wait in the listen
    /// backlog until one closes. Key `max_connections`, default 256
    /// ([`DEFAULT_HTTP_MAX_CONNECTIONS`]).
    pub max_connections: u32,
}

/// Where the HTTP token comes from.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum HttpToken {
    /// Key `token`: written in the config (`"${VAR}"` works too).
    Text(String),
    /// Key `token_file`: the first line of this file (relative to the
    /// config file), read when the master starts.
    File(PathBuf),
    /// Neither: the [`HTTP_TOKEN_ENV`] environment variable when it is
    /// set and not empty, else no token (reads only, on loopback).
    #[default]
    Environment,
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never in a log.
            HttpToken::Text(_) => f.write_str("Text(..)"),
            HttpToken::File(path) => f.debug_tuple("File").field(path).finish(),
            HttpToken::Environment => f.write_str("Environment"),
        }
    }
}

/// `[nats]`: where the JetStream queues of queue groups with `[group.queue]
/// backend = "nats"` are, and how to log in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NatsSpec {
    /// `servers`: URLs such as `"nats://127.0.0.1:4222"` (a cluster's
    /// members, tried in turn). Default `["nats://127.0.0.1:4222"]`.
    pub servers: Vec<String>,
    /// `user` + `password`, `token`, `creds` (a credentials file) or
    /// `nkey` (a seed file): one of them at most.
    pub auth: crate::protocol::slave::NatsAuth,
    /// `tls_ca`: a CA file to verify the servers' certificates with (TLS
    /// is required then).
    pub tls_ca: Option<PathBuf>,
    /// `replicas`: replicas of the streams taskherd creates (3 in a
    /// cluster). Default 1.
    pub replicas: usize,
    /// `storage = "memory"`: streams taskherd creates are kept in memory.
    /// Default `"file"`.
    pub memory: bool,
}

/// The NATS server of `[nats]` when it names none.
pub const DEFAULT_NATS_SERVER: &str = "nats://127.0.0.1:4222";

/// Where a queue group's jobs are (`[group.queue] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueBackend {
    /// `"feeder"` (the default): a feeder instance serves them.
    #[default]
    Feeder,
    /// `"nats"`: a NATS JetStream work stream (`[nats]`); no feeder
    /// instance.
    Nats,
}

/// SSH settings of a remote placement: the top-level `[ssh]` table gives
/// defaults, each `[[group.remote]]` may override any of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SshOptions {
    /// An ssh_config file used instead of `~/.ssh/config`. Key `ssh_config`.
    pub config_file: Option<PathBuf>,
    /// Private key to authenticate with (ssh-agent works without it). Key
    /// `identity_file`.
    pub identity_file: Option<PathBuf>,
    /// Host key policy. Key `known_hosts`, `"strict"` (default) or
    /// `"accept-new"`.
    pub known_hosts: KnownHostsPolicy,
    /// A jump host (`[user@]host[:port]`, as `ssh -J`). Key `jump_host`.
    pub jump_host: Option<String>,
    /// Longest wait for the TCP connection and the handshake. Key
    /// `connect_timeout`, default 10 s.
    pub connect_timeout: Option<Duration>,
    /// Connections in a row a host may lose (it could not be reached, or
    /// its agent was lost) before it is given up: its instances that have
    /// not ended end lost, and it is not tried again. A connection that
    /// reached the agent starts the count again. Key `give_up_after`;
    /// `None` (the default): never given up, reconnected with a backoff.
    /// Refusals that look like sshd's `MaxStartups` do not count.
    pub give_up_after: Option<u32>,
}

/// Default of `ssh.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How unknown or changed host keys are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KnownHostsPolicy {
    /// Only hosts whose key is already in known_hosts (`"strict"`).
    #[default]
    Strict,
    /// Unknown hosts are added on first connection; a changed key is still
    /// refused (`"accept-new"`).
    AcceptNew,
}

/// One host of a remote placement, as written: `[user@]name[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// The host as the master names it in logs: the entry without its
    /// `user@` part (`web2:2222`).
    pub label: String,
    /// Login user; ssh's default (ssh_config or the local user) when `None`.
    pub user: Option<String>,
    /// Host name or address, as given to ssh (aliases of ssh_config work).
    pub name: String,
    /// TCP port; ssh's default when `None`.
    pub port: Option<u16>,
    /// The values `[host_vars]` gives this host: in the environment and
    /// the identity of its instances. Empty when none applies.
    pub vars: BTreeMap<String, String>,
}

/// `[[group.remote]]`: instances started on each of some hosts over SSH.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePlacement {
    /// The hosts. Key `hosts`, a non-empty array of `[user@]name[:port]`.
    pub hosts: Vec<HostSpec>,
    /// Instances on each host (at least 1). Key `instances`.
    pub instances: u32,
    /// The command's path on these hosts, when it differs from the group's
    /// `command`. Relative paths are relative to the remote `cwd` (or the
    /// user's home). Key `command`.
    pub command: Option<String>,
    /// Working directory on these hosts, as written (`~` is expanded on
    /// the host). Key `cwd`, default the user's home.
    pub cwd: Option<PathBuf>,
    /// Environment added on these hosts, over the group's `env`. Key `env`.
    pub env: BTreeMap<String, String>,
    /// In a queue group: jobs each consumer runs at once. Key
    /// `concurrency`, default 1.
    pub concurrency: Option<u32>,
    /// SSH settings (keys `ssh_config`, `identity_file`, `known_hosts`,
    /// `jump_host`, `connect_timeout`), merged over the `[ssh]` defaults.
    pub ssh: SshOptions,
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
    /// How often master and agents tell each other they are alive. Key
    /// `heartbeat`, default 1 s.
    pub heartbeat: Duration,
    /// An agent that hears nothing from the master for this long stops its
    /// instances and exits; a master that hears nothing from an agent for
    /// this long marks the host down and reconnects. Key `orphan_timeout`,
    /// default 10 s.
    pub orphan_timeout: Duration,
    /// Where agents are cached on remote hosts (one file per version and
    /// build); relative to the remote user's home. Key `agent_dir`, default
    /// `.cache/taskherd`.
    pub agent_dir: String,
    /// Use this `taskherd` on every remote host instead of uploading the
    /// master's own executable. Key `agent_path`.
    pub agent_path: Option<String>,
    /// Where the pid killer keeps its registry (relative to the config
    /// file). Key `state_dir`, default `$XDG_STATE_HOME/taskherd` (or
    /// `~/.local/state/taskherd`).
    pub state_dir: Option<PathBuf>,
    /// SSH handshakes to remote hosts under way at once (more hosts wait
    /// their turn), so that hundreds of hosts behind one sshd or bastion
    /// stay within its `MaxStartups` (10:30:60 by default). Key
    /// `max_handshakes`, default 32 (pdsh's fan-out).
    pub max_handshakes: u32,
    /// Remote hosts worked on at once, for one-shot runs such as rolling
    /// restarts (pdsh's `-f`): a host takes a turn when its connection
    /// starts and gives it back once every instance on it has ended (or
    /// while it is down, until it reconnects), so the other hosts wait
    /// until then. Key `max_active_hosts`, default
    /// none (every host at once). Hosts whose instances never end keep
    /// their turn for the whole run.
    pub max_active_hosts: Option<u32>,
}

impl Default for MasterSpec {
    fn default() -> Self {
        MasterSpec {
            timeout: DEFAULT_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            max_running_time: None,
            heartbeat: DEFAULT_HEARTBEAT,
            orphan_timeout: DEFAULT_ORPHAN_TIMEOUT,
            agent_dir: DEFAULT_AGENT_DIR.to_string(),
            agent_path: None,
            state_dir: None,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_active_hosts: None,
        }
    }
}

/// Default of `master.max_handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 32;
/// Default of `master.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `master.stop_grace`.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default of `master.heartbeat`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Default of `master.orphan_timeout`.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `master.agent_dir`.
pub const DEFAULT_AGENT_DIR: &str = ".cache/taskherd";

/// The `[log]` table: the herd's log (every instance's lines and the
/// master's events).
#[derive(Debug, Clone, PartialEq)]
pub struct LogSpec {
    /// How lines are written. Key `format`, `"text"` (default) or
    /// `"json"`; `[master] log_format` is its older name.
    pub format: LogFormat,
    /// Write the log to this file (relative to the config file), rotated
    /// by size; standard output then only shows the master's own events.
    /// Key `file`, default none (everything to standard output).
    pub file: Option<PathBuf>,
    /// Size in bytes after which the file is rotated. Key `max_size`,
    /// such as `"100MiB"` (the default), `"500MB"` or a number of bytes.
    pub max_size: u64,
    /// Rotated files kept (`herd.log.1` ... `herd.log.N`, the oldest
    /// dropped). Key `keep`, default 5, from 1 to [`MAX_LOG_KEEP`].
    pub keep: u32,
    /// Which records are written: a default level and levels per group,
    /// such as `"info,web=debug"`. Key `filter`, default `"info"`.
    pub filter: super::LogFilter,
    /// Colors by level on the terminal. Key `color`, `"auto"` (default:
    /// when standard output is a terminal), `"always"` or `"never"`.
    pub color: LogColor,
}

impl Default for LogSpec {
    fn default() -> Self {
        LogSpec {
            format: LogFormat::Text,
            file: None,
            max_size: DEFAULT_LOG_MAX_SIZE,
            keep: DEFAULT_LOG_KEEP,
            filter: super::LogFilter::default(),
            color: LogColor::Auto,
        }
    }
}

/// Default of `log.max_size`: 100 MiB.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// Default of `log.keep`.
pub const DEFAULT_LOG_KEEP: u32 = 5;
/// Largest `log.keep` (each rotation renames every kept file).
pub const MAX_LOG_KEEP: u32 = 1000;

/// When log lines on the terminal are colored by level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogColor {
    /// When standard output is a terminal and `NO_COLOR` is not set
    /// (`"auto"`).
    #[default]
    Auto,
    /// Always, even into a pipe (`"always"`).
    Always,
    /// Never (`"never"`).
    Never,
}

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
    /// `PATH`. `~/` is expanded when the config is read, and a relative
    /// path written in an included file is made absolute against that
    /// file's directory. Key `command`.
    pub command: String,
    /// Arguments (never the params: those go over the control channel and
    /// the environment, not where `ps` shows them). Key `args`, default empty.
    pub args: Vec<String>,
    /// Any JSON-compatible table, delivered to every instance. Key
    /// `params`, default empty table.
    pub params: serde_json::Value,
    /// Extra environment variables. Key `env`, default empty.
    pub env: BTreeMap<String, String>,
    /// Working directory, relative to the config file's directory (`~`
    /// expanded, and absolute when written in an included file, as for
    /// `command`). Key `cwd`, default the master's working directory.
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
    /// Recycling: an instance running this long is stopped (Stop, grace,
    /// SIGKILL) and started again, whatever its restart policy. Key
    /// `max_lifetime`, default none.
    pub max_lifetime: Option<Duration>,
    /// An instance still running this long after its start is stopped
    /// (Stop, grace, SIGKILL) and the run counts as a failure (`ran
    /// longer than its time limit of 5m`), which its restart policy then
    /// sees: a bound on one-shot work that hangs (GNU parallel's and
    /// pdsh's timeouts, systemd's `RuntimeMaxSec`). Key `time_limit`,
    /// default none.
    pub time_limit: Option<Duration>,
    /// Recycling: an instance that reported this many jobs done (through
    /// the slave library) is asked to stop, and started again. Key
    /// `max_jobs`, default none.
    pub max_jobs: Option<u64>,
    /// Instances on the master's host. Table `[group.local]`.
    pub local: Option<LocalPlacement>,
    /// Instances on remote hosts. Array of tables `[[group.remote]]`.
    pub remote: Vec<RemotePlacement>,
    /// Set for a queue group (`[group.feeder]`, `[group.queue]`,
    /// `[group.consumer]`).
    pub queue: Option<QueueSpec>,
    /// Start the group's instances with the herd. With `false` they are
    /// listed as stopped until an operator starts them (`taskherd start
    /// GROUP`), and the herd runs until stopped. Key `autostart`, default
    /// `true`; not in queue groups.
    pub autostart: bool,
    /// Programs run on the master's host when something happens to an
    /// instance of the group. Table `[group.hooks]`.
    pub hooks: HooksSpec,
    /// A health check of each instance, beside liveness. Table
    /// `[group.health]`, default none.
    pub health: Option<HealthSpec>,
    /// Groups this one starts after: its instances start once every
    /// instance of each of them is ready (`[group.ready]`, or started
    /// when they have none), and on the herd's stop this group stops
    /// first. Key `after`, default none; no cycles.
    pub after: Vec<String>,
    /// When an instance of the group counts as ready, for the groups
    /// that start after it. Table `[group.ready]`, default none (ready
    /// once started).
    pub ready: Option<ReadySpec>,
    /// Who the instances run as (keys `user`, `group`) and their
    /// resource limits (table `[group.limits]`).
    pub limits: Limits,
}

/// Default of `[group.ready] timeout`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `[group.ready] interval`.
pub const DEFAULT_READY_INTERVAL: Duration = Duration::from_millis(250);
/// Time allowed, on the herd's ordered stop, beyond the stop grace of the
/// groups after a group, before it stops anyway (their reports travel).
pub const STOP_ORDER_MARGIN: Duration = Duration::from_secs(5);

/// Default of `[group.health] interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Default of `[group.health] timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `[group.health] failures`.
pub const DEFAULT_HEALTH_FAILURES: u32 = 3;

/// `[group.hooks]`: shell commands (`sh -c`) run on the master's host on
/// an instance's events, with the event as JSON on their stdin; each is
/// bounded by `timeout` and never holds supervision up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HooksSpec {
    /// An instance's process failed (non-zero exit, signal, liveness
    /// timeout), whether or not it is restarted. Key `on_failure`.
    pub on_failure: Option<String>,
    /// An instance's process started again (a restart, by its policy or an
    /// operator). Key `on_restart`.
    pub on_restart: Option<String>,
    /// An instance was given up: its restart policy has no restart left
    /// (it is marked failed). Key `on_exhausted`.
    pub on_exhausted: Option<String>,
    /// An instance was stopped (with the herd, by an operator, by a
    /// reload). Key `on_stop`.
    pub on_stop: Option<String>,
    /// Longest run of one hook; then its process group is killed. Key
    /// `timeout`, default 10 s.
    pub timeout: Duration,
}

/// Default of `[group.hooks] timeout`.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

impl HooksSpec {
    /// No hook, the default timeout.
    pub fn none() -> Self {
        HooksSpec {
            timeout: DEFAULT_HOOK_TIMEOUT,
            ..HooksSpec::default()
        }
    }
}

/// `[group.local]`: instances started by the master itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPlacement {
    /// How many instances (at least 1). Key `instances`.
    pub instances: u32,
    /// In a queue group: jobs each of these consumers runs at once. Key
    /// `concurrency`, default 1; only allowed in queue groups.
    pub concurrency: Option<u32>,
}

/// What makes a group a queue group: `[group.feeder]`, with
/// `[group.queue]` and `[group.consumer]`.
///
/// The group's instance 1 is the feeder; every placement (`[group.local]`,
/// `[[group.remote]]`) holds consumers.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// `[group.feeder] host`: `None` (written `"local"`, the default) runs
    /// the feeder on the master's host; a `[user@]name[:port]` runs it
    /// there over SSH. A wildcard `bind` is then reached at that host's
    /// name, from the master's view.
    pub feeder_host: Option<HostSpec>,
    /// SSH settings for a remote feeder's host: the `[ssh]` defaults (a
    /// placement naming the same host shares its connection and settings).
    pub feeder_ssh: SshOptions,
    /// `[group.feeder] bind`: the feeder's listening address, default
    /// `127.0.0.1:0` (loopback, a free port chosen at start). A feeder
    /// bound beyond loopback still requires the per-run secret.
    pub bind: String,
    /// `[group.queue] lease`: a job not answered within this long goes
    /// back to the queue. Default 30 s.
    pub lease: Duration,
    /// `[group.queue] max_attempts`: a job failing this many times is
    /// dead-lettered. Default 5.
    pub max_attempts: u32,
    /// `[group.queue] retry_initial` / `retry_max`: backoff of retried
    /// jobs, doubling from the first to the second. Defaults 1 s and 5 min.
    pub retry_initial: Duration,
    /// See `retry_initial`.
    pub retry_max: Duration,
    /// `[group.queue] credits`: jobs a consumer may hold ahead (prefetch).
    /// Default twice its concurrency.
    pub credits: Option<u32>,
    /// `[group.queue] rate`: global limit in jobs per second, written
    /// `"200/s"`, `"5/m"` or `"1000/h"`. Default none.
    pub rate: Option<f64>,
    /// `[group.queue] progress_every`: how often the feeder's counts are
    /// logged. Default 10 s.
    pub progress_every: Duration,
    /// `[group.feeder] file`, `jsonl` or `command` (one of them at most):
    /// the feeder instance runs one of taskherd's built-in feeders instead
    /// of the group's `command` (which then only serves the consumers).
    /// Default none.
    pub builtin_feeder: Option<BuiltinFeeder>,
    /// `[group.consumer] run`: how the consumers run the group's command.
    /// Default [`ConsumerRun::Library`].
    pub consumer_run: ConsumerRun,
    /// `[group.consumer] done_codes`, `retry_codes`, `dead_codes`: exit
    /// statuses of exec consumers' jobs mapped otherwise than by default.
    pub exit_codes: ExitCodes,
    /// `[group.queue] joblog`: the file the feeder appends one JSON line
    /// to per outcome of a job's run. For a feeder on the master's host,
    /// as written (`~` expanded; relative to the config file's directory,
    /// resolved when planned); for a remote feeder, a path on that host
    /// (relative to the feeder's `cwd` there, `~` expanded by the
    /// feeder). Default none.
    pub joblog: Option<PathBuf>,
    /// `[group.queue] fail_on_dead`: `taskherd run` exits 1 when jobs of
    /// this group ended dead. Default `true`.
    pub fail_on_dead: bool,
    /// `[group.queue] backend`: a feeder instance (the default) or NATS
    /// JetStream.
    pub backend: QueueBackend,
    /// `[group.queue] stream`: the JetStream work stream's name. Default
    /// `TASKHERD_<GROUP>`; the dead stream is its name + `_DEAD`.
    pub stream: Option<String>,
    /// `[group.queue] subject`: the subject jobs are published on.
    /// Default `taskherd.<group>.jobs`.
    pub subject: Option<String>,
}

impl QueueSpec {
    /// Whether the group has a feeder instance (not on JetStream).
    pub fn has_feeder(&self) -> bool {
        self.backend == QueueBackend::Feeder
    }

    /// Whether the group's queue is on JetStream and a built-in feeder
    /// (`[group.feeder] jsonl` or `command`) fills it: an instance of its
    /// own on the master's host, which publishes rather than serves.
    pub fn fills_jetstream(&self) -> bool {
        self.backend == QueueBackend::Nats
            && matches!(
                self.builtin_feeder,
                Some(BuiltinFeeder::Jsonl(_) | BuiltinFeeder::Command { .. })
            )
    }
}

/// A built-in feeder of a queue group (`[group.feeder] file`, `jsonl` or
/// `command`): the feeder instance is taskherd's own executable playing
/// that role, so the group needs no feeder program.
///
/// Paths: for a feeder on the master's host, as written (`~` expanded;
/// relative to the config file's directory, resolved when planned); for a
/// remote feeder, a path on that host (relative to the feeder's `cwd`
/// there, `~` expanded by the feeder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuiltinFeeder {
    /// `file = "jobs.queue"`: the durable file queue at this path, fed
    /// with `taskherd queue add`; it never finishes by itself.
    File(PathBuf),
    /// `jsonl = "jobs.jsonl"`: each line of this JSON-lines file is a job;
    /// what was done is kept in `<path>.state`, so a restarted feeder does
    /// not serve it again. Finishes once every line has an outcome.
    Jsonl(PathBuf),
    /// `command = "..."` with `args`: each line of the command's stdout
    /// is a job (in memory: a restarted feeder runs it again). Finishes
    /// once the command has exited and every job has an outcome.
    Command {
        /// The program: a bare name is looked up in `PATH`; a path is
        /// relative to the config file (local feeder) or to the feeder's
        /// `cwd` (remote feeder).
        program: String,
        /// Its arguments (`[group.feeder] args`).
        args: Vec<String>,
    },
}

impl BuiltinFeeder {
    /// The key that names it in `[group.feeder]`: `file`, `jsonl` or
    /// `command`.
    pub fn key(&self) -> &'static str {
        match self {
            BuiltinFeeder::File(_) => "file",
            BuiltinFeeder::Jsonl(_) => "jsonl",
            BuiltinFeeder::Command { .. } => "command",
        }
    }
}

/// Exit statuses an exec consumer maps to an outcome otherwise than by
/// default (`[group.consumer] done_codes`, `retry_codes`, `dead_codes`;
/// a status is in one list at most).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitCodes {
    /// Statuses that mean done.
    pub done: Vec<u8>,
    /// Statuses that mean retry.
    pub retry: Vec<u8>,
    /// Statuses that mean dead.
    pub dead: Vec<u8>,
}

/// How the consumers of a queue group run its `command`
/// (`[group.consumer] run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsumerRun {
    /// The command is a program using the slave library's
    /// `HandlerQueue`, started once per consumer instance (`"library"`).
    #[default]
    Library,
    /// Each consumer instance is taskherd's exec consumer runner, which
    /// runs the command once per job (`"exec"`).
    Exec,
    /// Each consumer instance is taskherd's coprocess consumer runner,
    /// which starts the command once and speaks JSON lines with it
    /// (`"coprocess"`).
    Coprocess,
}

impl Default for QueueSpec {
    fn default() -> Self {
        QueueSpec {
            feeder_host: None,
            feeder_ssh: SshOptions::default(),
            bind: "127.0.0.1:0".to_string(),
            lease: Duration::from_secs(30),
            max_attempts: 5,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            credits: None,
            rate: None,
            progress_every: Duration::from_secs(10),
            builtin_feeder: None,
            consumer_run: ConsumerRun::Library,
            exit_codes: ExitCodes::default(),
            joblog: None,
            fail_on_dead: true,
            backend: QueueBackend::Feeder,
            stream: None,
            subject: None,
        }
    }
}

impl GroupSpec {
    /// Total number of instances of the group over all placements.
    pub fn instance_count(&self) -> u32 {
        let feeder = u32::from(
            self.queue
                .as_ref()
                .is_some_and(|queue| queue.has_feeder() || queue.fills_jetstream()),
        );
        let local = self.local.as_ref().map_or(0, |local| local.instances);
        let remote: u32 = self
            .remote
            .iter()
            .map(|placement| {
                placement
                    .instances
                    .saturating_mul(placement.hosts.len() as u32)
            })
            .sum();
        feeder.saturating_add(local).saturating_add(remote)
    }

    /// The command's base name, as shown in log prefixes.
    pub fn command_name(&self) -> &str {
        self.command
            .rsplit('/')
            .find(|part| !part.is_empty())
            .unwrap_or(&self.command)
    }
}

/// Whether `name` is a valid group name: letters, digits, `_`, `.` and `-`
/// (what logs, filters and commands can name without quoting).
pub fn is_valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Config {
    /// The JetStream queue of the group named `group`, if it is a queue
    /// group with `backend = "nats"`: the `[nats]` servers and
    /// credentials, the stream and subject names (derived from the
    /// group's name unless given), the group's leases and retries.
    pub fn jetstream_queue(&self, group: &str) -> Option<crate::protocol::slave::JetStreamQueue> {
        let spec = self.groups.iter().find(|g| g.name == group)?;
        let queue = spec.queue.as_ref()?;
        if queue.backend != QueueBackend::Nats {
            return None;
        }
        let nats = self.nats.as_deref().cloned().unwrap_or_default();
        let stream = queue
            .stream
            .clone()
            .unwrap_or_else(|| crate::protocol::slave::nats_names::stream(group));
        let token = crate::protocol::slave::nats_names::subject_token(group);
        Some(crate::protocol::slave::JetStreamQueue {
            servers: if nats.servers.is_empty() {
                vec![DEFAULT_NATS_SERVER.to_string()]
            } else {
                nats.servers
            },
            auth: nats.auth,
            tls_ca: nats.tls_ca,
            subject: queue
                .subject
                .clone()
                .unwrap_or_else(|| format!("taskherd.{token}.jobs")),
            consumer: "taskherd".to_string(),
            dead_stream: format!("{stream}_DEAD"),
            dead_subject: format!("taskherd.{token}.dead"),
            governor_subject: format!("taskherd.{token}.governor"),
            stream,
            settings: crate::protocol::slave::QueueSettings {
                lease: queue.lease,
                max_attempts: queue.max_attempts,
                retry: crate::retry::RetryPolicy::exponential(
                    queue.retry_initial,
                    queue.retry_max,
                    queue.max_attempts,
                ),
                rate: queue.rate,
                progress_every: queue.progress_every,
                joblog: None,
            },
            replicas: nats.replicas.max(1),
            memory: nats.memory,
        })
    }

    /// Checks that every group `filter` names is a group of this config.
    ///
    /// # Errors
    /// The first unknown group, with the closest name when one is near.
    pub fn check_log_filter(&self, filter: &super::LogFilter) -> Result<(), String> {
        let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
        match filter.groups().find(|name| !names.contains(name)) {
            Some(unknown) => Err(super::parse::unknown_filter_group(unknown, &names)),
            None => Ok(()),
        }
    }
}
