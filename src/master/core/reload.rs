//! A reload: the config read again is compared with the one running;
//! groups added are started, removed are stopped, changed are replaced
//! one instance at a time (a queue group as a whole: its feeder and
//! consumers share a per-run secret and address), and groups whose
//! instance counts alone changed are resized in place: their instances
//! keep running with their ids, the extra ones stop, the missing ones
//! start with new ids. A config that cannot be read or planned changes
//! nothing.
//!
//! Everything is planned before anything is touched: the config is read
//! ([`super::Effect::ReadConfig`]), planned here, its queue groups
//! prepared ([`super::Effect::Prepare`]), and only then applied; what is
//! rolling waits its turn among the changes ([`super::changes`]).

use super::changes::{Change, Reload, Replace, Step};
use super::{Core, Effect, ReplyId};
use crate::config::{Config, GroupSpec, LoadError};
use crate::error_text::count;
use crate::master::plan::{is_resize, plan_groups, plan_resize, Plan, Resize};
use crate::master::queue::QueuePrepareError;
use crate::master::request::HerdError;
use crate::protocol::slave::Level;
use crate::supervise::instance::InstanceCommand;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// A reload planned, waiting for its queue groups to be prepared.
#[derive(Debug)]
pub(super) struct Draft {
    /// The config read.
    new: Config,
    /// Who waits for the reload.
    reply: Option<ReplyId>,
    /// The next global id once the new instances are numbered.
    next_id: u32,
    /// Groups added.
    added: Vec<String>,
    /// Groups removed.
    removed: Vec<String>,
    /// Groups changed but not resized, for the message.
    changed: Vec<String>,
    /// Queue groups changed: replaced as a whole.
    replaced: Vec<String>,
    /// Groups resized in place.
    resizes: Vec<(String, Resize)>,
    /// Groups replaced one instance at a time, with their new instances.
    rolling: Vec<(String, Plan)>,
}

/// The names of groups of a list, or `none`.
fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

impl Core {
    /// Plans a reload to the config read; asks for its queue groups to be
    /// prepared.
    pub(super) fn config_read(
        &mut self,
        result: Result<Config, LoadError>,
        reply: Option<ReplyId>,
    ) {
        let new = match result {
            Ok(new) => new,
            Err(err) => return self.refuse(reply, HerdError::ConfigRefused(err)),
        };
        let old_groups: BTreeMap<&str, &GroupSpec> = self
            .config
            .groups
            .iter()
            .map(|g| (g.name.as_str(), g))
            .collect();
        let removed: Vec<String> = old_groups
            .keys()
            .filter(|name| !new.groups.iter().any(|g| g.name == **name))
            .map(|name| name.to_string())
            .collect();
        let added: Vec<String> = new
            .groups
            .iter()
            .filter(|g| !old_groups.contains_key(g.name.as_str()))
            .map(|g| g.name.clone())
            .collect();
        let changed: Vec<&GroupSpec> = new
            .groups
            .iter()
            .filter(|g| {
                old_groups
                    .get(g.name.as_str())
                    .is_some_and(|old| *old != *g)
            })
            .collect();
        let old_of = |group: &GroupSpec| old_groups.get(group.name.as_str()).copied();
        let is_queue = |group: &GroupSpec| {
            group.queue.is_some() || old_of(group).is_some_and(|old| old.queue.is_some())
        };
        let resizes = |group: &GroupSpec| old_of(group).is_some_and(|old| is_resize(old, group));
        let names = |keep: &dyn Fn(&GroupSpec) -> bool| -> Vec<String> {
            changed
                .iter()
                .filter(|g| keep(g))
                .map(|g| g.name.clone())
                .collect()
        };
        let replaced = names(&|g| is_queue(g));
        let resized = names(&|g| resizes(g));
        let rolling = names(&|g| !is_queue(g) && !resizes(g));
        let changed = names(&|g| !resizes(g));

        // A resize works on the instances as they are now: none may be on
        // their way in or out.
        if !resized.is_empty() && !self.changes.is_empty() {
            return self.refuse(reply, HerdError::ChangeUnderWay { resized });
        }

        let mut next_id = self.next_id;
        let fresh: Vec<String> = added.iter().chain(&replaced).cloned().collect();
        let fresh_plan = plan_groups(&new, &fresh, &mut next_id);
        let rolling = rolling
            .into_iter()
            .map(|group| {
                let plan = plan_groups(&new, std::slice::from_ref(&group), &mut next_id);
                (group, plan)
            })
            .collect();
        let resizes = resized
            .into_iter()
            .map(|group| {
                let existing: Vec<_> = self
                    .table
                    .all_ids(&group)
                    .into_iter()
                    .filter(|id| !self.table.retired_ever().contains(id))
                    .filter_map(|id| self.table.entry(id).map(|entry| entry.label.clone()))
                    .collect();
                let resize = plan_resize(&new, &group, &existing, &mut next_id);
                (group, resize)
            })
            .collect();
        self.draft = Some(Draft {
            new,
            reply,
            next_id,
            added,
            removed,
            changed,
            replaced,
            resizes,
            rolling,
        });
        self.out.push(Effect::Prepare(fresh_plan));
    }

    /// Applies a reload whose queue groups were prepared: what is
    /// immediate now, the rest as a rolling change.
    pub(super) fn prepared(&mut self, result: Result<Plan, QueuePrepareError>, now: Instant) {
        let Some(draft) = self.draft.take() else {
            return;
        };
        let fresh_plan = match result {
            Ok(plan) => plan,
            Err(err) => return self.refuse(draft.reply, HerdError::Unprepared(err)),
        };
        let Draft {
            new,
            reply,
            next_id,
            added,
            removed,
            changed,
            replaced,
            resizes,
            rolling,
        } = draft;
        self.next_id = next_id;
        // Groups are replaced in their order: a group after the groups it
        // starts after (each waits until the previous one is ready).
        let names = rolling.iter().map(|(group, _)| group.clone()).collect();
        let mut rolling = rolling;
        let order = super::order::Order::sorted(&new, names);
        rolling.sort_by_key(|(group, _)| order.iter().position(|g| g == group));
        if new.master != self.config.master {
            let message = "reload: [master] settings take effect at the next start";
            self.log(Level::Warning, message.into());
        }
        for group in &removed {
            self.command_group(group, InstanceCommand::Remove);
            self.table.retire_group(group);
        }
        let old_queue_ids: Vec<u32> = replaced
            .iter()
            .flat_map(|group| self.table.all_ids(group))
            .collect();
        for group in &replaced {
            self.command_group(group, InstanceCommand::Remove);
        }
        // Resized groups: the instances kept go on as they are, the extra
        // ones stop (highest group id first), the missing ones start.
        let mut stopping: Vec<u32> = Vec::new();
        let mut sizes: Vec<String> = Vec::new();
        for (group, resize) in resizes {
            for id in &resize.stop {
                self.command(*id, InstanceCommand::Remove);
            }
            self.table.retire(&resize.stop);
            stopping.extend(&resize.stop);
            self.start(resize.start, now);
            sizes.push(format!(
                "{group} ({} -> {})",
                resize.from,
                count(resize.to, "instance")
            ));
        }
        self.table
            .set_order(new.groups.iter().map(|g| g.name.clone()).collect());
        let longest = new.longest_stop_grace();
        if longest > self.longest_grace {
            self.longest_grace = longest;
            self.out.push(Effect::LongestGrace(longest));
        }
        let message = format!(
            "reloaded {}: groups added: {}; removed: {}; changed: {}; resized: {}",
            new.source.display(),
            list(&added),
            list(&removed),
            list(&changed),
            list(&sizes)
        );
        self.config = new;

        let mut steps = VecDeque::new();
        // The extra instances of resized groups have stopped.
        if !stopping.is_empty() {
            steps.push_back(Step::Ended {
                ids: stopping,
                retire: false,
            });
        }
        // Replaced queue groups: the old ones end first (the feeder's
        // port may be fixed), then the new ones start with the added
        // groups.
        if !old_queue_ids.is_empty() {
            steps.push_back(Step::Ended {
                ids: old_queue_ids,
                retire: true,
            });
        }
        steps.push_back(Step::Start(fresh_plan));
        for (group, plan) in rolling {
            steps.push_back(Step::Replace(Replace {
                group,
                plan: Some(plan),
                old: Vec::new(),
                parts: VecDeque::new(),
                index: 0,
                phase: Default::default(),
            }));
        }
        let reload = Reload {
            message,
            steps,
            deadline: None,
        };
        self.changes.push_back(Change::reload(reload, reply));
    }
}
