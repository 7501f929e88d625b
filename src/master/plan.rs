//! Placement: which instance runs where, with which id, as pure data.

use super::remote::HostPlan;
use crate::config::{
    BuiltinFeeder, Config, ConsumerRun, GroupSpec, HostSpec, QueueSpec, RemotePlacement, SshOptions,
};
use crate::log::InstanceLabel;
use crate::protocol::slave::{Identity, QueueRole};
use crate::supervise::instance::InstanceSpec;
use crate::supervise::process::ProcessSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Host name of instances started by the master itself.
pub const LOCAL_HOST: &str = "localhost";

/// The command name in the log label of a built-in file feeder
/// (`[group.feeder] file`): `[jobs] [localhost] [file-feeder/1/1]`.
pub const FILE_FEEDER_LABEL: &str = "file-feeder";

/// The command name in the log label of a built-in JSON-lines feeder
/// (`[group.feeder] jsonl`): `[jobs] [localhost] [jsonl-feeder/1/1]`.
pub const JSONL_FEEDER_LABEL: &str = "jsonl-feeder";

/// The command name in the log label of a built-in command feeder
/// (`[group.feeder] command`): `[jobs] [localhost] [command-feeder/1/1]`.
pub const COMMAND_FEEDER_LABEL: &str = "command-feeder";

/// The subcommand of the `taskherd` binary that runs the built-in
/// feeders: `taskherd builtin-feeder --file PATH`, `--jsonl PATH` or
/// `--command -- PROGRAM ARGS...`.
pub const BUILTIN_FEEDER_COMMAND: &str = "builtin-feeder";

/// The subcommand of the `taskherd` binary that runs exec consumers:
/// `taskherd exec-consumer -- COMMAND ARGS...`.
pub const EXEC_CONSUMER_COMMAND: &str = "exec-consumer";

/// The subcommand of the `taskherd` binary that runs coprocess consumers:
/// `taskherd coprocess-consumer -- COMMAND ARGS...`.
pub const COPROCESS_CONSUMER_COMMAND: &str = "coprocess-consumer";

/// Where every instance of a config runs.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Feeders of queue groups on the master's host (a remote feeder is
    /// one of its host's instances).
    pub feeders: Vec<InstanceSpec>,
    /// Instances the master starts itself.
    pub local: Vec<InstanceSpec>,
    /// One entry per remote host (all groups placed on it), in config order.
    pub hosts: Vec<HostPlan>,
}

/// A feeder, for the start gate of its consumers.
pub(crate) struct FeederInfo {
    pub(crate) label: Arc<InstanceLabel>,
    /// Where it will listen, when known in advance (a feeder on the
    /// master's host, whose port was chosen by [`super::queue::prepare`]).
    pub(crate) known_address: Option<super::queue::FeederAddress>,
}

impl Plan {
    /// The feeders, local and remote, with their address when known.
    pub(crate) fn instances_of_feeders(&self) -> Vec<FeederInfo> {
        let local: Vec<u32> = self.feeders.iter().map(|spec| spec.label.id).collect();
        self.instances()
            .into_iter()
            .filter_map(|spec| match &spec.identity.queue {
                Some(QueueRole::Feeder { bind, .. }) => Some(FeederInfo {
                    label: spec.label.clone(),
                    known_address: bind
                        .parse()
                        .ok()
                        .filter(|_| local.contains(&spec.label.id))
                        .map(super::queue::FeederAddress::local),
                }),
                _ => None,
            })
            .collect()
    }

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
        // A JetStream queue has no feeder instance.
        let jetstream = config.jetstream_queue(&group.name).map(Box::new);
        if let Some(queue) = group.queue.as_ref().filter(|queue| queue.has_feeder()) {
            match &queue.feeder_host {
                None => {
                    let process = feeder_process(queue, process_spec(group, &base_dir), |file| {
                        base_dir.join(file)
                    });
                    let mut feeder = placed.instance(&mut next_id, LOCAL_HOST, &process);
                    let joblog = queue.joblog.as_ref().map(|joblog| base_dir.join(joblog));
                    feeder.identity.queue = Some(super::queue::feeder_role(queue, joblog));
                    as_feeder(&mut feeder, queue);
                    plan.feeders.push(feeder);
                }
                Some(host) => {
                    // The feeder runs like the group's consumers on that
                    // host (or its first remote placement's) would.
                    let placement = group
                        .remote
                        .iter()
                        .find(|p| p.hosts.iter().any(|h| same_host(h, host)))
                        .or(group.remote.first());
                    // A built-in feeder's file is a path on that host.
                    let process = feeder_process(
                        queue,
                        remote_process_spec(group, placement),
                        Path::to_path_buf,
                    );
                    let mut feeder = placed.instance(&mut next_id, &host.label, &process);
                    with_host_vars(&mut feeder, host);
                    // So is its joblog.
                    let joblog = queue.joblog.clone();
                    feeder.identity.queue = Some(super::queue::feeder_role(queue, joblog));
                    as_feeder(&mut feeder, queue);
                    let index = host_index(&mut plan.hosts, host, || {
                        resolve_ssh(&queue.feeder_ssh, &base_dir)
                    });
                    plan.hosts[index].instances.push(feeder);
                }
            }
        }
        if let (Some(queue), Some(jetstream)) = (
            group.queue.as_ref().filter(|queue| queue.fills_jetstream()),
            &jetstream,
        ) {
            let process = jetstream_feeder_process(
                queue,
                jetstream,
                process_spec(group, &base_dir),
                &base_dir,
                &group.name,
            );
            let mut feeder = placed.instance(&mut next_id, LOCAL_HOST, &process);
            as_feeder(&mut feeder, queue);
            plan.local.push(feeder);
        }
        if let Some(local) = &group.local {
            let process = consumer_process(group, process_spec(group, &base_dir));
            for _ in 0..local.instances {
                let mut spec = placed.instance(&mut next_id, LOCAL_HOST, &process);
                if let Some(queue) = &group.queue {
                    spec.identity.queue = Some(super::queue::consumer_role(
                        queue,
                        local.concurrency,
                        jetstream.clone(),
                    ));
                }
                plan.local.push(spec);
            }
        }
        for placement in &group.remote {
            let process = consumer_process(group, remote_process_spec(group, Some(placement)));
            for host in &placement.hosts {
                let index = host_index(&mut plan.hosts, host, || {
                    resolve_ssh(&placement.ssh, &base_dir)
                });
                for _ in 0..placement.instances {
                    let mut spec = placed.instance(&mut next_id, &host.label, &process);
                    with_host_vars(&mut spec, host);
                    if let Some(queue) = &group.queue {
                        spec.identity.queue = Some(super::queue::consumer_role(
                            queue,
                            placement.concurrency,
                            jetstream.clone(),
                        ));
                    }
                    plan.hosts[index].instances.push(spec);
                }
            }
        }
    }
    plan
}

/// Gives an instance of `host` the host's `[host_vars]`: in its
/// environment (over the group's and the placement's `env`) and its
/// identity.
fn with_host_vars(spec: &mut InstanceSpec, host: &HostSpec) {
    if host.vars.is_empty() {
        return;
    }
    let env = &mut spec.process.env;
    env.retain(|(key, _)| !host.vars.contains_key(key));
    env.extend(host.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    spec.identity.vars = host.vars.clone();
}

/// The index of `host` in `hosts`, added (with `ssh`) if new.
fn host_index(
    hosts: &mut Vec<HostPlan>,
    host: &HostSpec,
    ssh: impl FnOnce() -> SshOptions,
) -> usize {
    match hosts.iter().position(|h| same_host(&h.host, host)) {
        Some(index) => index,
        None => {
            hosts.push(HostPlan {
                host: host.clone(),
                ssh: ssh(),
                instances: Vec::new(),
            });
            hosts.len() - 1
        }
    }
}

/// One connection per host: entries naming the same login on the same
/// address and port are one host.
pub(crate) fn same_host(a: &HostSpec, b: &HostSpec) -> bool {
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
        let stop_grace = self.config.stop_grace(&group.name);
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
                vars: Default::default(),
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
            time_limit: group.time_limit,
            health: group.health.clone(),
            limits: group.limits.clone(),
            ready: group.ready.clone(),
            stop_wait: self.config.stop_wait(&group.name),
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
        env: with_default_env(&group.env),
        cwd: group.cwd.as_ref().map(|cwd| base_dir.join(cwd)),
        own_executable: false,
    }
}

/// The feeder of a queue group: the group's `process`, or with a built-in
/// feeder (`[group.feeder] file`, `jsonl`, `command`) taskherd's own
/// executable playing it, with the group's environment and working
/// directory; `locate` places its file (or its command, when that is a
/// path) on the feeder's host.
fn feeder_process(
    queue: &QueueSpec,
    process: ProcessSpec,
    locate: impl FnOnce(&Path) -> PathBuf,
) -> ProcessSpec {
    let Some(builtin) = &queue.builtin_feeder else {
        return process;
    };
    let mut args = vec![BUILTIN_FEEDER_COMMAND.to_string()];
    match builtin {
        BuiltinFeeder::File(file) | BuiltinFeeder::Jsonl(file) => {
            args.push(format!("--{}", builtin.key()));
            args.push(locate(file).to_string_lossy().into_owned());
        }
        BuiltinFeeder::Command {
            program,
            args: command_args,
        } => {
            // A bare name is looked up in PATH; a path is placed like the
            // group's command.
            let program = if program.contains('/') {
                locate(Path::new(program)).to_string_lossy().into_owned()
            } else {
                program.clone()
            };
            args.extend(["--command".to_string(), "--".to_string(), program]);
            args.extend(command_args.iter().cloned());
        }
    }
    ProcessSpec {
        program: PathBuf::from("taskherd"),
        args,
        own_executable: true,
        ..process
    }
}

/// The instance that fills a JetStream queue from its `[group.feeder]`
/// `jsonl` file or `command` (on the master's host): `taskherd
/// builtin-feeder --jetstream --state PATH ...`, the queue in its
/// environment ([`JETSTREAM_QUEUE_ENV`]). The state file of a command's
/// feed is `.<group>.command-feed` beside the config file; a file's is
/// beside the file (`<file>.jetstream`).
///
/// [`JETSTREAM_QUEUE_ENV`]: crate::protocol::slave::JETSTREAM_QUEUE_ENV
fn jetstream_feeder_process(
    queue: &QueueSpec,
    jetstream: &crate::protocol::slave::JetStreamQueue,
    process: ProcessSpec,
    base_dir: &Path,
    group: &str,
) -> ProcessSpec {
    let mut process = feeder_process(queue, process, |file| base_dir.join(file));
    let state = match &queue.builtin_feeder {
        Some(BuiltinFeeder::Jsonl(file)) => {
            crate::files::sibling(&base_dir.join(file), ".jetstream")
        }
        _ => base_dir.join(format!(".{group}.command-feed")),
    };
    process.args.splice(
        1..1,
        [
            "--jetstream".to_string(),
            "--state".to_string(),
            state.to_string_lossy().into_owned(),
        ],
    );
    // The queue's JSON (a serde_json value of plain fields: it cannot fail).
    let json = serde_json::to_string(jetstream).unwrap_or_default();
    process.env.push((
        crate::protocol::slave::JETSTREAM_QUEUE_ENV.to_string(),
        json,
    ));
    process
}

/// Makes `feeder`, placed like an instance of its queue group, the
/// group's feeder: the group's `[group.ready]`, `[group.health]` and
/// `time_limit` are its consumers' (a feeder never answers the first two:
/// it would hold the groups after it, or be restarted as unhealthy; and
/// it lives as long as its queue, which a consumer's time limit does not
/// bound), and a built-in feeder gets its label.
fn as_feeder(feeder: &mut InstanceSpec, queue: &QueueSpec) {
    feeder.ready = None;
    feeder.health = None;
    feeder.time_limit = None;
    label_builtin_feeder(feeder, queue);
}

/// A built-in feeder is named for what it is in the log, not for the
/// group's command (which it does not run).
fn label_builtin_feeder(feeder: &mut InstanceSpec, queue: &QueueSpec) {
    let Some(builtin) = &queue.builtin_feeder else {
        return;
    };
    let mut label = (*feeder.label).clone();
    label.command = match builtin {
        BuiltinFeeder::File(_) => FILE_FEEDER_LABEL,
        BuiltinFeeder::Jsonl(_) => JSONL_FEEDER_LABEL,
        BuiltinFeeder::Command { .. } => COMMAND_FEEDER_LABEL,
    }
    .to_string();
    feeder.label = Arc::new(label);
}

/// A consumer of `group` (a placement's `process`): with `[group.consumer]
/// run = "exec"`, taskherd's own exec consumer runner, which runs the
/// command and its arguments once per job; with `run = "coprocess"`, its
/// coprocess consumer runner, which starts them once.
fn consumer_process(group: &GroupSpec, process: ProcessSpec) -> ProcessSpec {
    let Some(queue) = group.queue.as_ref() else {
        return process;
    };
    let subcommand = match queue.consumer_run {
        ConsumerRun::Library => return process,
        ConsumerRun::Exec => EXEC_CONSUMER_COMMAND,
        ConsumerRun::Coprocess => COPROCESS_CONSUMER_COMMAND,
    };
    let mut args = vec![subcommand.to_string()];
    for (flag, codes) in [
        ("--done-codes", &queue.exit_codes.done),
        ("--retry-codes", &queue.exit_codes.retry),
        ("--dead-codes", &queue.exit_codes.dead),
    ] {
        if !codes.is_empty() {
            let list: Vec<String> = codes.iter().map(u8::to_string).collect();
            args.push(flag.to_string());
            args.push(list.join(","));
        }
    }
    args.push("--".to_string());
    args.push(process.program.to_string_lossy().into_owned());
    args.extend(process.args.iter().cloned());
    ProcessSpec {
        program: PathBuf::from("taskherd"),
        args,
        own_executable: true,
        ..process
    }
}

/// Environment every instance gets unless its group's `env` (or its
/// placement's) sets the variable: `PYTHONUNBUFFERED=1`, since Python
/// block-buffers stdout into a pipe and loses the buffer at SIGTERM, so a
/// Python worker's prints would show up late or never.
pub const DEFAULT_ENV: &[(&str, &str)] = &[("PYTHONUNBUFFERED", "1")];

/// `env` over [`DEFAULT_ENV`].
fn with_default_env(env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut all: BTreeMap<String, String> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.into_iter().collect()
}

/// On a remote host paths are the host's: relative ones are relative to
/// the remote cwd (or the login's home), never to the config file.
fn remote_process_spec(group: &GroupSpec, placement: Option<&RemotePlacement>) -> ProcessSpec {
    let mut env = group.env.clone();
    if let Some(placement) = placement {
        env.extend(placement.env.clone());
    }
    let command = placement.and_then(|p| p.command.as_deref());
    ProcessSpec {
        program: PathBuf::from(command.unwrap_or(&group.command)),
        args: group.args.clone(),
        env: with_default_env(&env),
        cwd: placement.and_then(|p| p.cwd.clone()),
        own_executable: false,
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

/// Plans the instances of some groups of `config`, numbered from
/// `next_id` on.
pub(crate) fn plan_groups(config: &Config, groups: &[String], next_id: &mut u32) -> Plan {
    let subset = Config {
        groups: config
            .groups
            .iter()
            .filter(|g| groups.contains(&g.name))
            .cloned()
            .collect(),
        ..config.clone()
    };
    let mut plan = plan(&subset);
    let offset = *next_id - 1;
    let renumber = |spec: &mut InstanceSpec| {
        let mut label = (*spec.label).clone();
        label.id += offset;
        spec.label = Arc::new(label);
        spec.identity.id += offset;
    };
    plan.feeders.iter_mut().for_each(renumber);
    plan.local.iter_mut().for_each(renumber);
    plan.hosts
        .iter_mut()
        .flat_map(|h| h.instances.iter_mut())
        .for_each(renumber);
    *next_id += u32::try_from(plan.instances().len()).unwrap_or(u32::MAX);
    plan
}

/// Whether a reload can resize `old` into `new` in place: they differ in
/// how many instances they place (`local.instances`, a remote placement's
/// `instances`) and in nothing else, they are not queue groups (whose
/// feeder and consumers are replaced together), and each of their places
/// (the local placement, each remote host) has a log name of its own, so
/// that an instance's label tells which place it belongs to.
pub(crate) fn is_resize(old: &GroupSpec, new: &GroupSpec) -> bool {
    if old == new || old.queue.is_some() || new.queue.is_some() {
        return false;
    }
    if old.local.is_some() != new.local.is_some() || old.remote.len() != new.remote.len() {
        return false;
    }
    let mut same_counts = new.clone();
    if let (Some(resized), Some(old)) = (&mut same_counts.local, &old.local) {
        resized.instances = old.instances;
    }
    for (resized, old) in same_counts.remote.iter_mut().zip(&old.remote) {
        resized.instances = old.instances;
    }
    same_counts == *old && places_have_own_names(new)
}

/// Whether the places of `group` (local, each remote host) have distinct
/// labels.
fn places_have_own_names(group: &GroupSpec) -> bool {
    let mut names = BTreeSet::new();
    let local = group.local.iter().map(|_| LOCAL_HOST);
    let remote = group
        .remote
        .iter()
        .flat_map(|p| p.hosts.iter().map(|h| h.label.as_str()));
    local.chain(remote).all(|name| names.insert(name))
}

/// A group resized in place by a reload.
#[derive(Debug, Default)]
pub(crate) struct Resize {
    /// The instances to add, with new ids.
    pub(crate) start: Plan,
    /// The instances to stop: on each place, those with the highest group
    /// ids beyond its new count; highest group id first.
    pub(crate) stop: Vec<u32>,
    /// How many instances the group had.
    pub(crate) from: usize,
    /// How many it has once resized.
    pub(crate) to: usize,
}

/// An instance a resized place should have: the index of its host in the
/// plan's `hosts` (`None` on the master's host) and its spec.
type Wanted<'a> = (Option<usize>, &'a InstanceSpec);

/// Plans the resize of `group` (see [`is_resize`]) to its count in
/// `config`, given its `existing` instances: on each place they keep
/// running with their ids (the lowest group ids first); the place's extra
/// ones are stopped, and missing ones are added with ids from `next_id` on
/// and the lowest group ids not in use. The instances kept keep the
/// identity they started with (their `group_count` included).
pub(crate) fn plan_resize(
    config: &Config,
    group: &str,
    existing: &[Arc<InstanceLabel>],
    next_id: &mut u32,
) -> Resize {
    let mut scratch_id = 1;
    let full = plan_groups(config, &[group.to_string()], &mut scratch_id);
    let group_count = u32::try_from(full.instances().len()).unwrap_or(u32::MAX);
    // The wanted instances of each place, in plan order.
    let mut places: Vec<(String, Vec<Wanted<'_>>)> = Vec::new();
    let mut place =
        |name: &str, host: Option<usize>, spec| match places.iter_mut().find(|(n, _)| n == name) {
            Some((_, specs)) => specs.push((host, spec)),
            None => places.push((name.to_string(), vec![(host, spec)])),
        };
    for spec in &full.local {
        place(&spec.label.host, None, spec);
    }
    for (index, host) in full.hosts.iter().enumerate() {
        for spec in &host.instances {
            place(&spec.label.host, Some(index), spec);
        }
    }

    let mut kept = BTreeSet::new();
    let mut stop: Vec<&InstanceLabel> = Vec::new();
    let mut missing: Vec<Wanted<'_>> = Vec::new();
    for (name, wanted) in &places {
        let mut here: Vec<&InstanceLabel> = existing
            .iter()
            .filter(|label| label.host == *name)
            .map(|label| &**label)
            .collect();
        here.sort_by_key(|label| label.group_id);
        let keep = here.len().min(wanted.len());
        kept.extend(here[..keep].iter().map(|label| label.group_id));
        stop.extend(&here[keep..]);
        missing.extend(&wanted[keep..]);
    }
    // Instances of a place the group no longer has (none, for a resize).
    stop.extend(
        existing
            .iter()
            .filter(|label| !places.iter().any(|(name, _)| *name == label.host))
            .map(|label| &**label),
    );
    stop.sort_by_key(|label| std::cmp::Reverse(label.group_id));

    let mut free_group_ids = (1..).filter(|group_id| !kept.contains(group_id));
    let mut start = Plan::default();
    let mut hosts: Vec<Option<HostPlan>> = vec![None; full.hosts.len()];
    for (host, spec) in missing {
        let mut spec = spec.clone();
        let id = *next_id;
        *next_id += 1;
        let group_id = free_group_ids.next().unwrap_or(u32::MAX);
        let mut label = (*spec.label).clone();
        label.id = id;
        label.group_id = group_id;
        spec.label = Arc::new(label);
        spec.identity.id = id;
        spec.identity.group_id = group_id;
        spec.identity.group_count = group_count;
        match host {
            None => start.local.push(spec),
            Some(index) => hosts[index]
                .get_or_insert_with(|| HostPlan {
                    host: full.hosts[index].host.clone(),
                    ssh: full.hosts[index].ssh.clone(),
                    instances: Vec::new(),
                })
                .instances
                .push(spec),
        }
    }
    start.hosts = hosts.into_iter().flatten().collect();
    Resize {
        start,
        stop: stop.iter().map(|label| label.id).collect(),
        from: existing.len(),
        to: full.instances().len(),
    }
}

/// One plan per instance, in id order (a rolling replacement starts them
/// one at a time).
pub(crate) fn split_plan(plan: Plan) -> Vec<Plan> {
    let mut parts: Vec<(u32, Plan)> = Vec::new();
    for spec in plan.local {
        let id = spec.label.id;
        parts.push((
            id,
            Plan {
                local: vec![spec],
                ..Plan::default()
            },
        ));
    }
    for host in plan.hosts {
        for spec in host.instances.iter().cloned() {
            let id = spec.label.id;
            let host = HostPlan {
                instances: vec![spec],
                ..host.clone()
            };
            parts.push((
                id,
                Plan {
                    hosts: vec![host],
                    ..Plan::default()
                },
            ));
        }
    }
    parts.sort_by_key(|(id, _)| *id);
    parts.into_iter().map(|(_, plan)| plan).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    fn env_of(spec: &InstanceSpec, key: &str) -> Vec<String> {
        spec.process
            .env
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    #[test]
    fn host_vars_reach_the_environment_and_the_identity_of_that_host_only() {
        let text = r#"
[host_vars]
web1 = { REGION = "eu", ROLE = "front" }

[[group]]
name = "app"
command = "w"
env = { REGION = "group", OTHER = "g" }
[group.local]
instances = 1
[[group.remote]]
hosts = ["web1", "web2"]
instances = 1
env = { ROLE = "placement" }
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        let specs = plan.instances();
        let (local, web1, web2) = (specs[0], specs[1], specs[2]);
        assert_eq!(web1.label.host, "web1");
        // The host's values over the placement's and the group's, once.
        assert_eq!(env_of(web1, "REGION"), ["eu"]);
        assert_eq!(env_of(web1, "ROLE"), ["front"]);
        assert_eq!(env_of(web1, "OTHER"), ["g"]);
        assert_eq!(
            web1.identity
                .vars
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["REGION=eu", "ROLE=front"]
        );
        assert_eq!(env_of(web2, "REGION"), ["group"]);
        assert_eq!(env_of(web2, "ROLE"), ["placement"]);
        assert!(web2.identity.vars.is_empty());
        assert_eq!(env_of(local, "REGION"), ["group"]);
        assert!(local.identity.vars.is_empty());
    }

    #[test]
    fn python_output_is_unbuffered_unless_the_group_says_otherwise() {
        let text = r#"
[[group]]
name = "py"
command = "python3"
[group.local]
instances = 1

[[group]]
name = "buffered"
command = "python3"
env = { PYTHONUNBUFFERED = "", OTHER = "x" }
[group.local]
instances = 1
[[group.remote]]
hosts = ["web1"]
instances = 1

[[group]]
name = "remote"
command = "python3"
[[group.remote]]
hosts = ["web1"]
instances = 1
env = { PYTHONUNBUFFERED = "0" }
[[group.remote]]
hosts = ["web2"]
instances = 1
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        let specs = plan.instances();
        let env: Vec<(&str, &str, Vec<String>)> = specs
            .iter()
            .map(|s| {
                (
                    s.label.group.as_str(),
                    s.label.host.as_str(),
                    env_of(s, "PYTHONUNBUFFERED"),
                )
            })
            .collect();
        assert_eq!(
            env,
            [
                ("py", "localhost", vec!["1".to_string()]),
                ("buffered", "localhost", vec![String::new()]),
                ("buffered", "web1", vec![String::new()]),
                ("remote", "web1", vec!["0".to_string()]),
                ("remote", "web2", vec!["1".to_string()]),
            ]
        );
        assert_eq!(env_of(specs[1], "OTHER"), ["x"]);
    }

    #[test]
    fn coprocess_consumers_run_taskherd_itself() {
        let text = r#"
[[group]]
name = "co"
command = "python3"
args = ["thumb.py"]
[group.feeder]
file = "jobs.queue"
[group.consumer]
run = "coprocess"
[group.local]
instances = 1
concurrency = 2
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        let consumer = plan
            .instances()
            .iter()
            .find(|s| s.label.command != FILE_FEEDER_LABEL)
            .map(|s| (s.process.own_executable, s.process.args.clone()))
            .unwrap();
        assert_eq!(
            consumer,
            (
                true,
                vec![
                    "coprocess-consumer".to_string(),
                    "--".into(),
                    "python3".into(),
                    "thumb.py".into()
                ]
            )
        );
    }

    #[test]
    fn built_in_feeders_and_exec_consumers_run_taskherd_itself() {
        let text = r#"
[[group]]
name = "local"
command = "./bin/handle"
args = ["--fast"]
env = { A = "1" }
cwd = "work"
time_limit = "5m"
[group.feeder]
file = "q/jobs.queue"
[group.consumer]
run = "exec"
[group.local]
instances = 1
concurrency = 3
[[group.remote]]
hosts = ["web1"]
instances = 1
command = "/srv/handle"
cwd = "/srv"

[[group]]
name = "remote"
command = "./bin/worker"
[group.feeder]
host = "web1"
file = "~/jobs.queue"
[[group.remote]]
hosts = ["web1"]
instances = 1
cwd = "/srv"
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        let specs = plan.instances();
        // The group's time limit bounds its consumers, not its feeder.
        let limits: Vec<(u32, Option<Duration>)> = specs
            .iter()
            .filter(|s| s.label.group == "local")
            .map(|s| (s.label.id, s.time_limit))
            .collect();
        let five_minutes = Some(Duration::from_secs(300));
        assert_eq!(limits, [(1, None), (2, five_minutes), (3, five_minutes)]);
        let run: Vec<(&str, &str, bool, Vec<&str>)> = specs
            .iter()
            .map(|s| {
                (
                    s.label.host.as_str(),
                    s.label.command.as_str(),
                    s.process.own_executable,
                    s.process.args.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            run,
            [
                (
                    "localhost",
                    FILE_FEEDER_LABEL,
                    true,
                    vec!["builtin-feeder", "--file", "/etc/herd/q/jobs.queue"]
                ),
                (
                    "localhost",
                    "handle",
                    true,
                    vec!["exec-consumer", "--", "/etc/herd/./bin/handle", "--fast"]
                ),
                (
                    "web1",
                    "handle",
                    true,
                    vec!["exec-consumer", "--", "/srv/handle", "--fast"]
                ),
                (
                    "web1",
                    FILE_FEEDER_LABEL,
                    true,
                    vec!["builtin-feeder", "--file", "~/jobs.queue"]
                ),
                ("web1", "worker", false, vec![]),
            ]
        );
        // The group's environment and working directory, roles as before.
        assert_eq!(env_of(specs[0], "A"), ["1"]);
        assert_eq!(specs[0].process.cwd, Some(PathBuf::from("/etc/herd/work")));
        assert_eq!(env_of(specs[1], "A"), ["1"]);
        assert_eq!(specs[1].process.cwd, Some(PathBuf::from("/etc/herd/work")));
        assert_eq!(specs[2].process.cwd, Some(PathBuf::from("/srv")));
        assert_eq!(specs[3].process.cwd, Some(PathBuf::from("/srv")));
        assert!(matches!(
            specs[0].identity.queue,
            Some(QueueRole::Feeder { .. })
        ));
        assert!(matches!(
            specs[1].identity.queue,
            Some(QueueRole::Consumer { concurrency: 3, .. })
        ));
        assert!(matches!(
            specs[3].identity.queue,
            Some(QueueRole::Feeder { .. })
        ));
        assert_eq!(specs[4].process.program, PathBuf::from("./bin/worker"));
    }

    #[test]
    fn jsonl_and_command_feeders_run_taskherd_itself() {
        let text = r#"
[[group]]
name = "lines"
command = "./bin/handle"
[group.feeder]
jsonl = "q/jobs.jsonl"
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "generated"
command = "./bin/handle"
cwd = "work"
[group.feeder]
command = "./bin/list"
args = ["--all"]
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "bare"
command = "./bin/handle"
[group.feeder]
command = "seq"
args = ["1", "5"]
[group.consumer]
run = "exec"
[group.local]
instances = 1
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        let feeders: Vec<(&str, Vec<&str>)> = plan
            .feeders
            .iter()
            .map(|s| {
                assert!(s.process.own_executable);
                (
                    s.label.command.as_str(),
                    s.process.args.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            feeders,
            [
                (
                    JSONL_FEEDER_LABEL,
                    vec!["builtin-feeder", "--jsonl", "/etc/herd/q/jobs.jsonl"]
                ),
                (
                    COMMAND_FEEDER_LABEL,
                    vec![
                        "builtin-feeder",
                        "--command",
                        "--",
                        "/etc/herd/./bin/list",
                        "--all"
                    ]
                ),
                (
                    COMMAND_FEEDER_LABEL,
                    vec!["builtin-feeder", "--command", "--", "seq", "1", "5"]
                ),
            ]
        );
        // The command runs where the group's command would.
        assert_eq!(
            plan.feeders[1].process.cwd,
            Some(PathBuf::from("/etc/herd/work"))
        );
    }

    #[test]
    fn a_jetstream_group_s_feeder_publishes_with_the_queue_in_its_environment() {
        let text = r#"
[nats]
servers = ["nats://10.0.0.5:4222"]
token = "t"

[[group]]
name = "lines"
command = "./bin/handle"
[group.queue]
backend = "nats"
[group.feeder]
jsonl = "q/jobs.jsonl"
[group.local]
instances = 2

[[group]]
name = "generated"
command = "./bin/handle"
[group.queue]
backend = "nats"
[group.feeder]
command = "seq"
args = ["1", "5"]
[group.local]
instances = 1
"#;
        let config = Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap();
        let plan = plan(&config);
        assert!(plan.feeders.is_empty(), "no feeder serves consumers");
        let feeders: Vec<&InstanceSpec> = plan
            .local
            .iter()
            .filter(|spec| spec.process.own_executable)
            .collect();
        let args: Vec<Vec<&str>> = feeders
            .iter()
            .map(|spec| spec.process.args.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(
            args,
            [
                vec![
                    "builtin-feeder",
                    "--jetstream",
                    "--state",
                    "/etc/herd/q/jobs.jsonl.jetstream",
                    "--jsonl",
                    "/etc/herd/q/jobs.jsonl"
                ],
                vec![
                    "builtin-feeder",
                    "--jetstream",
                    "--state",
                    "/etc/herd/.generated.command-feed",
                    "--command",
                    "--",
                    "seq",
                    "1",
                    "5"
                ],
            ]
        );
        for (spec, group) in feeders.iter().zip(["lines", "generated"]) {
            assert!(spec.identity.queue.is_none(), "a plain instance");
            let json = env_of(spec, crate::protocol::slave::JETSTREAM_QUEUE_ENV);
            let queue: crate::protocol::slave::JetStreamQueue =
                serde_json::from_str(&json[0]).expect("the queue's JSON");
            assert_eq!(Some(queue), config.jetstream_queue(group));
        }
        // Ids: the feeder first, then the consumers.
        assert_eq!(feeders[0].label.group_id, 1);
        assert_eq!(feeders[0].identity.group_count, 3);
    }

    /// `web`: `local` instances on the master's host and `remote` on each
    /// of two remote hosts; `other`: one local instance.
    fn sized(local: u32, remote: u32) -> String {
        format!(
            r#"
[[group]]
name = "other"
command = "sh"
[group.local]
instances = 1

[[group]]
name = "web"
command = "sh"
params = {{ message = "hi" }}
[group.local]
instances = {local}
[[group.remote]]
hosts = ["web1", "deploy@web2"]
instances = {remote}
"#
        )
    }

    fn group<'a>(config: &'a Config, name: &str) -> &'a GroupSpec {
        config.groups.iter().find(|g| g.name == name).unwrap()
    }

    fn config(text: &str) -> Config {
        Config::parse(text, "/etc/herd/herd.toml".as_ref()).unwrap()
    }

    #[test]
    fn only_a_change_of_counts_is_a_resize() {
        let old = config(&sized(2, 2));
        let is = |text: &str| is_resize(group(&old, "web"), group(&config(text), "web"));
        assert!(!is(&sized(2, 2)), "unchanged");
        assert!(is(&sized(5, 2)));
        assert!(is(&sized(2, 1)));
        assert!(is(&sized(1, 3)));
        assert!(!is(&sized(5, 2).replace("\"hi\"", "\"ho\"")), "params too");
        assert!(!is(&sized(2, 2).replace("\"web1\", ", "")), "a host less");
        // Two places of one name (a remote host named like the master's):
        // an instance's label does not tell which.
        let twice = |local| sized(local, 2).replace("\"deploy@web2\"", "\"localhost\"");
        let old = config(&twice(2));
        assert!(!is_resize(
            group(&old, "web"),
            group(&config(&twice(3)), "web")
        ));
    }

    #[test]
    fn a_resize_keeps_the_instances_it_can_and_numbers_the_new_ones_after_the_rest() {
        let old = plan(&config(&sized(2, 2)));
        let labels = |plan: &Plan| -> Vec<Arc<InstanceLabel>> {
            plan.instances()
                .iter()
                .filter(|s| s.label.group == "web")
                .map(|s| s.label.clone())
                .collect()
        };
        let existing = labels(&old);
        let ids: Vec<(u32, u32, &str)> = existing
            .iter()
            .map(|l| (l.id, l.group_id, l.host.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                (2, 1, "localhost"),
                (3, 2, "localhost"),
                (4, 3, "web1"),
                (5, 4, "web1"),
                (6, 5, "web2"),
                (7, 6, "web2"),
            ]
        );

        // One more local instance, one less on each remote host.
        let new = config(&sized(3, 1));
        let mut next_id = 8;
        let resize = plan_resize(&new, "web", &existing, &mut next_id);
        assert_eq!((resize.from, resize.to), (6, 5));
        assert_eq!(resize.stop, [7, 5], "the highest group ids first");
        assert_eq!(next_id, 9);
        let started: Vec<(u32, u32, u32, &str)> = resize
            .start
            .instances()
            .iter()
            .map(|s| {
                assert_eq!(s.label.id, s.identity.id);
                assert_eq!(s.label.group_id, s.identity.group_id);
                assert_eq!(s.identity.params["message"], "hi");
                (
                    s.identity.id,
                    s.identity.group_id,
                    s.identity.group_count,
                    s.label.host.as_str(),
                )
            })
            .collect();
        // The lowest group id free: 4 (web1's second went).
        assert_eq!(started, [(8, 4, 5, "localhost")]);
        assert!(resize.start.hosts.is_empty());

        // And back: the new remote instances go to their hosts, with the
        // group ids free again.
        let mut now: Vec<Arc<InstanceLabel>> = existing
            .iter()
            .filter(|l| !resize.stop.contains(&l.id))
            .cloned()
            .collect();
        now.extend(labels(&resize.start));
        let back = plan_resize(&config(&sized(2, 2)), "web", &now, &mut next_id);
        assert_eq!((back.from, back.to), (5, 6));
        assert_eq!(back.stop, [8], "the local instance added last");
        let started: Vec<(u32, u32, u32, &str)> = back
            .start
            .instances()
            .iter()
            .map(|s| {
                (
                    s.identity.id,
                    s.identity.group_id,
                    s.identity.group_count,
                    s.label.host.as_str(),
                )
            })
            .collect();
        // Group ids 4 (freed by the local instance) and 6.
        assert_eq!(started, [(9, 4, 6, "web1"), (10, 6, 6, "web2")]);
        let hosts: Vec<&str> = back
            .start
            .hosts
            .iter()
            .map(|h| h.host.label.as_str())
            .collect();
        assert_eq!(hosts, ["web1", "web2"]);
        assert_eq!(back.start.hosts[1].host.user.as_deref(), Some("deploy"));
    }
}
