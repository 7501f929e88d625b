//! The instances of a herd as the core knows them: who they are, where
//! they run and where they are in their life, kept up to date by their
//! events; the groups in config order, the suspended ones, the queue
//! counts; and the status built from it all.

use crate::config::HostSpec;
use crate::log::InstanceLabel;
use crate::protocol::control::{GroupStatus, HerdStatus, InstanceState, InstanceStatus};
use crate::protocol::instance::InstanceCommand;
use crate::protocol::slave::QueueProgress;
use crate::supervise::instance::{EventKind, InstanceEnd, InstanceEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every instance of the herd, and what operators see of the groups.
#[derive(Debug)]
pub(crate) struct Table {
    /// The config file, for the status.
    config: String,
    /// When the run started, for the status.
    started: SystemTime,
    /// Group names in config order.
    groups: Vec<String>,
    /// Groups an operator suspended.
    suspended: BTreeSet<String>,
    /// The last counts of each queue group's feeder.
    queues: BTreeMap<String, QueueProgress>,
    /// Every instance still listed, by id.
    instances: BTreeMap<u32, Entry>,
    /// Instances that left the config: forgotten once they end.
    retired: BTreeSet<u32>,
    /// Groups that left the config: forgotten once their last instance is.
    leaving: BTreeSet<String>,
    /// Every id ever retired: their ends are not the run's.
    retired_ever: BTreeSet<u32>,
}

/// One instance.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Who it is.
    pub(crate) label: Arc<InstanceLabel>,
    /// Where it runs: `None` on the master's host.
    pub(crate) host: Option<HostSpec>,
    /// Where it is in its life.
    pub(crate) state: InstanceState,
    /// Its process, while one runs.
    pub(crate) pid: Option<u32>,
    /// When its process started, while one runs.
    pub(crate) since: Option<SystemTime>,
    /// Processes started so far.
    pub(crate) starts: u32,
    /// Starts of a new process that no operator asked for: by the restart
    /// policy, or after the host was lost. What `status` and the metrics
    /// call restarts.
    pub(crate) restarts: u32,
    /// An operator's restart or resume is under way: the next start is
    /// theirs, not a restart.
    pub(crate) operator_start: bool,
    /// How its last process ended.
    pub(crate) last_exit: Option<String>,
    /// Its last sign of life.
    pub(crate) seen: Option<SystemTime>,
    /// Its health check's last verdict on the running process.
    pub(crate) health: Option<String>,
    /// Stopped on purpose until an operator starts it: an operator
    /// stopped it, or its group has `autostart = false`. The herd runs
    /// on (until stopped) while an instance is parked.
    pub(crate) parked: bool,
}

/// States an instance never leaves.
pub(crate) fn is_final(state: InstanceState) -> bool {
    matches!(
        state,
        InstanceState::Completed
            | InstanceState::Failed
            | InstanceState::Stopped
            | InstanceState::Lost
    )
}

impl Table {
    /// An empty table of the config `config` (its file name), with its
    /// `groups` in order, started `now`.
    pub(crate) fn new(config: String, groups: Vec<String>, now: SystemTime) -> Self {
        Table {
            config,
            started: now,
            groups,
            suspended: BTreeSet::new(),
            queues: BTreeMap::new(),
            instances: BTreeMap::new(),
            retired: BTreeSet::new(),
            leaving: BTreeSet::new(),
            retired_ever: BTreeSet::new(),
        }
    }

    /// Adds instances (pending), and their groups if new.
    pub(crate) fn add(
        &mut self,
        placed: impl IntoIterator<Item = (Arc<InstanceLabel>, Option<HostSpec>)>,
    ) {
        for (label, host) in placed {
            if !self.groups.contains(&label.group) {
                self.groups.push(label.group.clone());
            }
            self.instances.insert(
                label.id,
                Entry {
                    label,
                    host,
                    state: InstanceState::Pending,
                    pid: None,
                    since: None,
                    starts: 0,
                    restarts: 0,
                    operator_start: false,
                    last_exit: None,
                    seen: None,
                    health: None,
                    parked: false,
                },
            );
        }
    }

    /// Notes that an operator's `command` goes to instance `id`: after a
    /// restart of a live instance, or a suspend (its process starts again
    /// only at the resume, however soon that comes), or a resume of a
    /// suspended one, its next process is the operator's, not counted as a
    /// restart.
    pub(crate) fn operator_command(&mut self, id: u32, command: InstanceCommand) {
        if let Some(entry) = self.instances.get_mut(&id) {
            let starts_again = match command {
                InstanceCommand::Restart | InstanceCommand::Suspend => !is_final(entry.state),
                InstanceCommand::Resume => entry.state == InstanceState::Suspended,
                InstanceCommand::Remove => false,
            };
            entry.operator_start |= starts_again;
        }
    }

    /// Parks instance `id`: an operator stops it, and it stays stopped
    /// until started.
    pub(crate) fn park(&mut self, id: u32) {
        if let Some(entry) = self.instances.get_mut(&id) {
            entry.parked = true;
        }
    }

    /// Parks instance `id` before it ever ran (`autostart = false`): it
    /// is listed stopped.
    pub(crate) fn park_unstarted(&mut self, id: u32) {
        if let Some(entry) = self.instances.get_mut(&id) {
            entry.parked = true;
            entry.state = InstanceState::Stopped;
        }
    }

    /// Lists instance `id` waiting for the groups its group starts after
    /// (`waiting`), or pending again once released.
    pub(crate) fn set_waiting(&mut self, id: u32, waiting: bool) {
        if let Some(entry) = self.instances.get_mut(&id) {
            entry.state = if waiting {
                InstanceState::Waiting
            } else {
                InstanceState::Pending
            };
        }
    }

    /// Whether an instance is parked (see [`Entry::parked`]).
    pub(crate) fn any_parked(&self) -> bool {
        self.instances.values().any(|e| e.parked)
    }

    fn drop_group_if_gone(&mut self, group: &str) {
        let listed = self.instances.values().any(|e| e.label.group == group);
        if !listed && self.leaving.remove(group) {
            self.groups.retain(|g| g != group);
            self.suspended.remove(group);
            self.queues.remove(group);
        }
    }

    /// Forgets instances that left the config, each once it has ended.
    pub(crate) fn retire(&mut self, ids: &[u32]) {
        self.retired_ever.extend(ids);
        for id in ids {
            let Some(entry) = self.instances.get(id) else {
                continue;
            };
            let group = entry.label.group.clone();
            if is_final(entry.state) {
                self.instances.remove(id);
                self.drop_group_if_gone(&group);
            } else {
                self.retired.insert(*id);
            }
        }
    }

    /// Forgets a group that left the config, once its instances ended.
    pub(crate) fn retire_group(&mut self, group: &str) {
        self.leaving.insert(group.to_string());
        let ids = self.all_ids(group);
        self.retire(&ids);
        self.drop_group_if_gone(group);
    }

    /// Orders the groups as the (reloaded) config does; groups that left
    /// it stay listed after them while they have instances.
    pub(crate) fn set_order(&mut self, groups: Vec<String>) {
        let mut order = groups;
        for group in &self.groups {
            if !order.contains(group) {
                order.push(group.clone());
            }
        }
        self.groups = order;
    }

    /// Notes that an operator suspended `group` (or resumed it).
    pub(crate) fn set_suspended(&mut self, group: &str, suspended: bool) {
        if suspended {
            self.suspended.insert(group.to_string());
        } else {
            self.suspended.remove(group);
        }
    }

    /// Whether an operator suspended `group`.
    pub(crate) fn is_suspended(&self, group: &str) -> bool {
        self.suspended.contains(group)
    }

    /// Applies an event; returns the instance's label, if known.
    pub(crate) fn apply(&mut self, event: &InstanceEvent) -> Option<Arc<InstanceLabel>> {
        let at = UNIX_EPOCH + Duration::from_millis(event.time_ms);
        let entry = self.instances.get_mut(&event.id)?;
        let label = entry.label.clone();
        match &event.kind {
            EventKind::Created => {}
            EventKind::Started { pid } => {
                entry.state = InstanceState::Running;
                entry.pid = Some(*pid);
                entry.since = Some(at);
                entry.seen = Some(at);
                if entry.starts > 0 && !entry.operator_start {
                    entry.restarts += 1;
                }
                entry.operator_start = false;
                entry.starts += 1;
                entry.health = None;
            }
            EventKind::Health { healthy: true, .. } => entry.health = Some("healthy".into()),
            EventKind::Health { why, .. } => {
                entry.health = Some(match why {
                    Some(why) => format!("unhealthy: {why}"),
                    None => "unhealthy".into(),
                });
            }
            // Told in the status until a health verdict says more.
            EventKind::NotReady { why } => {
                if entry
                    .health
                    .as_ref()
                    .is_none_or(|h| h.starts_with("not ready"))
                {
                    entry.health = Some(format!("not ready: {why}"));
                }
            }
            EventKind::Ready => {
                if entry
                    .health
                    .as_ref()
                    .is_some_and(|h| h.starts_with("not ready"))
                {
                    entry.health = None;
                }
            }
            EventKind::Seen => entry.seen = Some(at),
            EventKind::TimedOut | EventKind::Stopping => entry.state = InstanceState::Stopping,
            EventKind::Exited { how, .. } => {
                entry.pid = None;
                entry.since = None;
                entry.last_exit = Some(how.clone());
                entry.state = InstanceState::Backoff;
            }
            EventKind::Backoff { .. } => entry.state = InstanceState::Backoff,
            EventKind::Suspended => entry.state = InstanceState::Suspended,
            EventKind::Progress { progress } => {
                self.queues.insert(label.group.clone(), *progress);
            }
            EventKind::Ended { end } => {
                entry.pid = None;
                entry.since = None;
                entry.state = match end {
                    InstanceEnd::Completed => InstanceState::Completed,
                    InstanceEnd::Failed { .. } => InstanceState::Failed,
                    InstanceEnd::Stopped { .. } => InstanceState::Stopped,
                    InstanceEnd::Lost { .. } => InstanceState::Lost,
                };
                if self.retired.remove(&event.id) {
                    self.instances.remove(&event.id);
                    self.drop_group_if_gone(&label.group);
                }
            }
        }
        Some(label)
    }

    /// Ids of a group's instances still supervised, in order.
    pub(crate) fn live_ids(&self, group: &str) -> Vec<u32> {
        self.instances
            .values()
            .filter(|e| e.label.group == group && !is_final(e.state))
            .map(|e| e.label.id)
            .collect()
    }

    /// Ids of all of a group's instances listed, ended ones too.
    pub(crate) fn all_ids(&self, group: &str) -> Vec<u32> {
        self.instances
            .values()
            .filter(|e| e.label.group == group)
            .map(|e| e.label.id)
            .collect()
    }

    /// The instances listed, in id order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.instances.values()
    }

    /// Every instance a reload retired: their ends are not the run's.
    pub(crate) fn retired_ever(&self) -> &BTreeSet<u32> {
        &self.retired_ever
    }

    /// The last counts each queue group's feeder reported, by group.
    pub(crate) fn queue_counts(&self) -> &BTreeMap<String, QueueProgress> {
        &self.queues
    }

    /// Whether the table lists `group`.
    pub(crate) fn has_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// One instance's entry.
    pub(crate) fn entry(&self, id: u32) -> Option<&Entry> {
        self.instances.get(&id)
    }

    /// A group's instances listed, by id within the group (an instance
    /// started again has a new global id, and keeps its id within the
    /// group).
    fn in_group_order(&self, group: &str) -> Vec<&Entry> {
        let mut entries: Vec<&Entry> = self
            .instances
            .values()
            .filter(|e| e.label.group == group)
            .collect();
        entries.sort_by_key(|e| (e.label.group_id, e.label.id));
        entries
    }

    /// Every group and instance with their state, `now`.
    pub(crate) fn status(&self, now: SystemTime) -> HerdStatus {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let since =
            |t: Option<SystemTime>| t.map(|t| ms(now.duration_since(t).unwrap_or_default()));
        let groups = self
            .groups
            .iter()
            .map(|name| GroupStatus {
                name: name.clone(),
                suspended: self.suspended.contains(name),
                instances: self
                    .in_group_order(name)
                    .into_iter()
                    .map(|e| InstanceStatus {
                        id: e.label.id,
                        group_id: e.label.group_id,
                        host: e.label.host.clone(),
                        command: e.label.command.clone(),
                        state: e.state,
                        pid: e.pid,
                        uptime_ms: since(e.since),
                        restarts: e.restarts,
                        last_exit: e.last_exit.clone(),
                        seen_ms_ago: since(e.seen).filter(|_| e.pid.is_some()),
                        health: e.health.clone().filter(|_| e.pid.is_some()),
                    })
                    .collect(),
                queue: self.queues.get(name).cloned(),
            })
            .collect();
        HerdStatus {
            config: self.config.clone(),
            pid: std::process::id(),
            uptime_ms: ms(now.duration_since(self.started).unwrap_or_default()),
            groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(group: &str, id: u32) -> Arc<InstanceLabel> {
        Arc::new(InstanceLabel {
            group: group.into(),
            host: "localhost".into(),
            command: "w".into(),
            id,
            group_id: id,
        })
    }

    fn event(id: u32, kind: EventKind) -> InstanceEvent {
        InstanceEvent {
            id,
            time_ms: 1_000,
            kind,
        }
    }

    #[test]
    fn retired_instances_and_groups_go_once_they_end() {
        let now = UNIX_EPOCH + Duration::from_secs(10);
        let mut table = Table::new("herd.toml".into(), vec!["a".into(), "b".into()], now);
        table.add([
            (label("a", 1), None),
            (label("b", 2), None),
            (label("b", 3), None),
        ]);
        table.apply(&event(2, EventKind::Started { pid: 42 }));
        let status = table.status(now);
        assert_eq!(status.groups[1].instances[0].state, InstanceState::Running);
        assert_eq!(status.groups[1].instances[0].uptime_ms, Some(9_000));

        // b leaves the config: listed while its instances run, gone once
        // they ended.
        table.retire_group("b");
        let end = InstanceEnd::Stopped { killed: false };
        table.apply(&event(3, EventKind::Ended { end: end.clone() }));
        assert_eq!(table.all_ids("b"), [2]);
        assert!(table.has_group("b"));
        table.apply(&event(2, EventKind::Ended { end }));
        assert!(!table.has_group("b"));
        assert_eq!(
            table.retired_ever().iter().copied().collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(table.live_ids("a"), [1]);
        // A new group is listed after the others.
        table.add([(label("c", 4), None)]);
        table.set_order(vec!["c".into(), "a".into()]);
        let names: Vec<String> = table
            .status(now)
            .groups
            .into_iter()
            .map(|g| g.name)
            .collect();
        assert_eq!(names, ["c", "a"]);
    }
}
