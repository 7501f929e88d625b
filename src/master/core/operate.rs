//! Operators' control of single instances and of ended ones: `start`
//! (failed, stopped, completed instances and those of an `autostart =
//! false` group run again), `stop` of a group or one instance (it stays
//! stopped until started; the herd goes on), and the revival of an
//! ended instance that a start or a restart does.
//!
//! An instance that has ended has no supervisor any more (its task
//! returned its final report). Starting it again starts a new one from
//! the spec the core kept, under a new global id (as a reload's new
//! instances get; ids are never reused, so a late word of the old
//! supervisor can never be taken for the new one's) and the same id
//! within its group, which is how operators name it (`web:2`). The old
//! entry is retired: its end is no longer the run's.

use super::changes::RESTART_STEP_TIMEOUT;
use super::table::is_final;
use super::{Core, Place, ReplyId};
use crate::error_text::count;
use crate::master::request::{Answer, HerdError};
use crate::protocol::control::{InstanceState, Target};
use crate::protocol::slave::Level;
use crate::supervise::instance::{InstanceCommand, InstanceSpec};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an instance started on request must run before the start
/// is answered as done (supervisord's `startsecs`): a program that exits
/// at once did not start.
pub(crate) const START_SETTLE: Duration = Duration::from_secs(1);

/// An instance's spec and place, kept to start it again once it ended.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    /// What it runs.
    pub(crate) spec: InstanceSpec,
    /// Where.
    pub(crate) place: Place,
}

/// A start or stop of instances to answer once they run, or have ended.
#[derive(Debug)]
pub(crate) struct Await {
    /// Who waits.
    reply: ReplyId,
    /// What was asked.
    target: Target,
    /// A start (else a stop).
    start: bool,
    /// The instances started (their new ids) or being stopped.
    ids: Vec<u32>,
    /// Instances left as they were (running already, or ended already).
    left: usize,
    /// When to give up.
    deadline: Instant,
    /// Since when each instance started is seen running.
    up_since: BTreeMap<u32, Instant>,
}

impl Await {
    /// When it must be looked at again: its deadline, or the end of an
    /// instance's [`START_SETTLE`].
    pub(crate) fn next_deadline(&self) -> Instant {
        self.up_since
            .values()
            .map(|since| *since + START_SETTLE)
            .chain([self.deadline])
            .min()
            .unwrap_or(self.deadline)
    }
}

/// `web:2`: how operators name an instance.
pub(crate) fn instance_name(group: &str, group_id: u32) -> String {
    format!("{group}:{group_id}")
}

impl Core {
    /// The instances `target` names, in id order: a group's (those a
    /// reload retired excepted), or the one with that id within the
    /// group (the latest, should a reload be replacing it).
    ///
    /// # Errors
    /// [`HerdError::UnknownGroup`], [`HerdError::UnknownInstance`].
    pub(super) fn target_ids(&self, target: &Target) -> Result<Vec<u32>, HerdError> {
        self.known_group(&target.group)?;
        let ids = self
            .table
            .all_ids(&target.group)
            .into_iter()
            .filter(|id| !self.table.retired_ever().contains(id));
        match target.id {
            None => Ok(ids.collect()),
            Some(group_id) => ids
                .filter(|id| {
                    self.table
                        .entry(*id)
                        .is_some_and(|e| e.label.group_id == group_id)
                })
                .max()
                .map(|id| vec![id])
                .ok_or_else(|| HerdError::UnknownInstance {
                    group: target.group.clone(),
                    id: group_id,
                }),
        }
    }

    /// Whether `group` is a queue group (its instances start and stop
    /// with the herd).
    pub(super) fn is_queue_group(&self, group: &str) -> bool {
        self.config
            .groups
            .iter()
            .any(|g| g.name == group && g.queue.is_some())
    }

    /// Whether `group`'s instances start with the herd.
    pub(super) fn autostarts(&self, group: &str) -> bool {
        self.config
            .groups
            .iter()
            .find(|g| g.name == group)
            .is_none_or(|g| g.autostart)
    }

    /// Starts an ended instance again (see the module's docs); returns
    /// its new id, or `None` when its spec is not known (never placed).
    pub(super) fn revive(&mut self, id: u32) -> Option<u32> {
        let Kept { mut spec, place } = self.kept.remove(&id)?;
        let new_id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        let mut label = (*spec.label).clone();
        label.id = new_id;
        spec.label = Arc::new(label);
        spec.identity.id = new_id;
        let host = match &place {
            Place::Local => None,
            Place::Host { host, .. } => Some(host.clone()),
        };
        self.table.retire(&[id]);
        self.table.add([(spec.label.clone(), host)]);
        self.start_on(place, vec![spec]);
        Some(new_id)
    }

    /// Refuses a start or stop the core does not do: the herd is
    /// stopping, an unknown group or instance, a queue group.
    fn controllable(&self, target: &Target) -> Result<Vec<u32>, HerdError> {
        if self.stopping {
            return Err(HerdError::Stopping);
        }
        let ids = self.target_ids(target)?;
        if self.is_queue_group(&target.group) {
            return Err(HerdError::QueueGroup {
                group: target.group.clone(),
            });
        }
        Ok(ids)
    }

    /// `taskherd start`: the target's instances that have ended run
    /// again; answered once they run.
    pub(super) fn start_target(&mut self, target: Target, reply: Option<ReplyId>, now: Instant) {
        let ids = match self.controllable(&target) {
            Ok(ids) => ids,
            Err(err) => return self.refuse(reply, err),
        };
        let mut started = Vec::new();
        let mut left = Vec::new();
        for id in ids {
            let Some(entry) = self.table.entry(id) else {
                continue;
            };
            if !is_final(entry.state) {
                left.push(entry.state);
                continue;
            }
            if let Some(new_id) = self.revive(id) {
                started.push(new_id);
            }
        }
        if !started.is_empty() {
            let names: Vec<String> = started
                .iter()
                .filter_map(|id| self.table.entry(*id))
                .map(|e| instance_name(&e.label.group, e.label.group_id))
                .collect();
            self.log(
                Level::Notice,
                format!("starting {} on request", names.join(", ")),
            );
        }
        match reply {
            Some(reply) if !started.is_empty() => self.awaits.push(Await {
                reply,
                target,
                start: true,
                ids: started,
                left: left.len(),
                deadline: now + RESTART_STEP_TIMEOUT,
                up_since: BTreeMap::new(),
            }),
            Some(_) if started.is_empty() => {
                let message = match (target.id, left.as_slice()) {
                    (Some(_), [InstanceState::Suspended]) => {
                        format!("{target} is suspended with its group: resume the group to run it")
                    }
                    (Some(_), _) => format!("{target} was running already"),
                    (None, _) => format!(
                        "{target}: nothing to start, {} running already",
                        were(left.len())
                    ),
                };
                self.answer(reply, Ok(Answer::Done(message)));
            }
            _ => {}
        }
    }

    /// `taskherd stop GROUP[:ID]`: the target's instances stop and stay
    /// stopped until started; answered once they have ended.
    pub(super) fn stop_target(&mut self, target: Target, reply: Option<ReplyId>, now: Instant) {
        let ids = match self.controllable(&target) {
            Ok(ids) => ids,
            Err(err) => return self.refuse(reply, err),
        };
        let mut stopping = Vec::new();
        let mut left = Vec::new();
        for id in ids {
            let Some(entry) = self.table.entry(id) else {
                continue;
            };
            if is_final(entry.state) {
                left.push(entry.state);
                continue;
            }
            self.table.park(id);
            self.command(id, InstanceCommand::Remove);
            stopping.push(id);
        }
        if !stopping.is_empty() {
            self.log(Level::Notice, format!("stopping {target} on request"));
        }
        match reply {
            Some(reply) if !stopping.is_empty() => self.awaits.push(Await {
                reply,
                target,
                start: false,
                ids: stopping,
                left: left.len(),
                deadline: now + self.settle_limit(),
                up_since: BTreeMap::new(),
            }),
            Some(_) => {
                let message = match (target.id, left.as_slice()) {
                    (Some(_), [state]) => format!("{target} was not running ({state})"),
                    _ => format!(
                        "{target}: nothing to stop, {} not running",
                        were(left.len())
                    ),
                };
                self.answer(reply, Ok(Answer::Done(message)));
            }
            None => {}
        }
    }

    /// Answers the starts and stops that are done (or cannot be).
    pub(super) fn settle_awaits(&mut self, now: Instant) {
        let awaits = std::mem::take(&mut self.awaits);
        for mut wait in awaits {
            match self.await_outcome(&mut wait, now) {
                None => self.awaits.push(wait),
                Some(answer) => {
                    if let Err(err) = &answer {
                        self.log(Level::Error, err.to_string());
                    }
                    self.answer(Some(wait.reply), answer.map(Answer::Done));
                }
            }
        }
    }

    /// The answer of a start or stop, once it has one.
    fn await_outcome(&self, wait: &mut Await, now: Instant) -> Option<Result<String, HerdError>> {
        let target = &wait.target;
        if wait.start {
            let mut waiting = false;
            for id in &wait.ids {
                let Some(entry) = self.table.entry(*id) else {
                    return Some(Err(HerdError::StoppedMidway));
                };
                let name = instance_name(&entry.label.group, entry.label.group_id);
                let ran = match entry.state {
                    InstanceState::Running => {
                        let since = *wait.up_since.entry(*id).or_insert(now);
                        now >= since + START_SETTLE
                    }
                    InstanceState::Suspended | InstanceState::Completed => true,
                    // It ran, and its process failed: it did not start
                    // (its restart policy goes on).
                    InstanceState::Backoff | InstanceState::Stopping
                        if entry.starts > 0 && entry.last_exit.is_some() =>
                    {
                        let why = entry.last_exit.clone().unwrap_or_default();
                        return Some(Err(HerdError::NotStarted {
                            instance: name,
                            why,
                        }));
                    }
                    InstanceState::Failed | InstanceState::Lost | InstanceState::Stopped => {
                        let why = entry
                            .last_exit
                            .clone()
                            .unwrap_or_else(|| entry.state.to_string());
                        return Some(Err(HerdError::NotStarted {
                            instance: name,
                            why,
                        }));
                    }
                    _ => false,
                };
                if !ran {
                    if self.stopping {
                        return Some(Err(HerdError::StoppedMidway));
                    }
                    if now >= wait.deadline {
                        let why = format!(
                            "not running within {}",
                            humantime::format_duration(RESTART_STEP_TIMEOUT)
                        );
                        return Some(Err(HerdError::NotStarted {
                            instance: name,
                            why,
                        }));
                    }
                    waiting = true;
                }
            }
            if waiting {
                return None;
            }
            let suspended = wait
                .ids
                .iter()
                .filter(|id| {
                    self.table
                        .entry(**id)
                        .is_some_and(|e| e.state == InstanceState::Suspended)
                })
                .count();
            let mut message = match target.id {
                Some(_) => format!("{target} started"),
                None => format!("{target}: {} started", count(wait.ids.len(), "instance")),
            };
            if suspended > 0 {
                message.push_str(" (suspended: its group is)");
            }
            if wait.left > 0 {
                message.push_str(&format!(", {} running already", were(wait.left)));
            }
            Some(Ok(message))
        } else {
            let ended = wait
                .ids
                .iter()
                .all(|id| self.table.entry(*id).is_none_or(|e| is_final(e.state)));
            if !ended {
                if now >= wait.deadline {
                    return Some(Err(HerdError::NotStopped {
                        target: target.clone(),
                        limit: self.settle_limit(),
                    }));
                }
                return None;
            }
            let mut message = match target.id {
                Some(_) => format!("{target} stopped"),
                None => format!("{target}: {} stopped", count(wait.ids.len(), "instance")),
            };
            if wait.left > 0 {
                message.push_str(&format!(", {} not running", were(wait.left)));
            }
            Some(Ok(message))
        }
    }
}

/// `1 was`, `3 were`.
fn were(n: usize) -> String {
    if n == 1 {
        "1 was".to_string()
    } else {
        format!("{n} were")
    }
}
