//! Placement: which instance runs where, with which id, as pure data.

use super::instance::InstanceSpec;
use super::log::InstanceLabel;
use super::process::ProcessSpec;
use super::remote::HostPlan;
use crate::config::{Config, GroupSpec, HostSpec, RemotePlacement, SshOptions};
use crate::protocol::slave::{Identity, QueueRole};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Host name of instances started by the master itself.
pub const LOCAL_HOST: &str = "localhost";

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
        if let Some(queue) = &group.queue {
            match &queue.feeder_host {
                None => {
                    let process = process_spec(group, &base_dir);
                    let mut feeder = placed.instance(&mut next_id, LOCAL_HOST, &process);
                    feeder.identity.queue = Some(super::queue::feeder_role(queue));
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
                    let process = remote_process_spec(group, placement);
                    let mut feeder = placed.instance(&mut next_id, &host.label, &process);
                    feeder.identity.queue = Some(super::queue::feeder_role(queue));
                    let index = host_index(&mut plan.hosts, host, || {
                        resolve_ssh(&queue.feeder_ssh, &base_dir)
                    });
                    plan.hosts[index].instances.push(feeder);
                }
            }
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
            let process = remote_process_spec(group, Some(placement));
            for host in &placement.hosts {
                let index = host_index(&mut plan.hosts, host, || {
                    resolve_ssh(&placement.ssh, &base_dir)
                });
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
fn remote_process_spec(group: &GroupSpec, placement: Option<&RemotePlacement>) -> ProcessSpec {
    let mut env = group.env.clone();
    if let Some(placement) = placement {
        env.extend(placement.env.clone());
    }
    let command = placement.and_then(|p| p.command.as_deref());
    ProcessSpec {
        program: PathBuf::from(command.unwrap_or(&group.command)),
        args: group.args.clone(),
        env: env.into_iter().collect(),
        cwd: placement.and_then(|p| p.cwd.clone()),
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
}
