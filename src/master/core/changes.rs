//! What operators wait for: suspends and resumes that settle, and rolling
//! changes (restarts, the rolling part of reloads) that go one instance
//! at a time, one change at a time, in the order asked.
//!
//! A change is state the core advances after every event: each step
//! commands or starts instances and waits for a condition on the table
//! (this instance runs again, those have ended), up to a deadline.

use super::operate::instance_name;
use super::table::is_final;
use super::{Core, ReplyId};
use crate::error_text::count;
use crate::master::plan::{split_plan, Plan};
use crate::master::request::{Answer, HerdError};
use crate::protocol::control::{InstanceState, Target};
use crate::protocol::slave::Level;
use crate::supervise::instance::InstanceCommand;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest wait for a suspended group to stop or a resumed one to run,
/// beyond the stop grace.
pub(crate) const SETTLE_MARGIN: Duration = Duration::from_secs(30);

/// Longest wait for one instance of a rolling restart (or replacement) to
/// run.
pub(crate) const RESTART_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A suspend or resume to answer once every live instance of its group is
/// suspended, or no longer is.
#[derive(Debug)]
pub(crate) struct Wait {
    /// Who waits.
    pub(crate) reply: ReplyId,
    /// The group.
    pub(crate) group: String,
    /// A suspend (else a resume).
    pub(crate) suspend: bool,
    /// Instances commanded, for the answer.
    pub(crate) count: usize,
    /// When to give up.
    pub(crate) deadline: Instant,
}

/// A rolling change and who waits for it.
#[derive(Debug)]
pub(crate) struct Change {
    /// Who waits.
    reply: Option<ReplyId>,
    /// What it does.
    kind: ChangeKind,
}

#[derive(Debug)]
enum ChangeKind {
    Restart(Restart),
    Reload(Reload),
}

/// A rolling restart: one instance at a time, the next once the previous
/// one runs again; suspended instances stay suspended; ended ones (not
/// in a queue group) are started again.
#[derive(Debug)]
struct Restart {
    /// The group, or one of its instances.
    target: Target,
    /// The instances left, taken when the restart begins.
    todo: Option<VecDeque<u32>>,
    /// The instance restarting: its id, its starts before, the deadline,
    /// and whether it had ended (started again under a new id).
    current: Option<(u32, u32, Instant, bool)>,
    /// How many were restarted.
    restarted: usize,
    /// How many of them had ended and were started again.
    revived: usize,
}

/// The rolling part of a reload (its immediate part was done when it was
/// asked).
#[derive(Debug)]
pub(crate) struct Reload {
    /// What the answer says once every step is done.
    pub(crate) message: String,
    /// The steps left.
    pub(crate) steps: VecDeque<Step>,
    /// The deadline of the step under way, once begun.
    pub(crate) deadline: Option<Instant>,
}

/// A step of a reload.
#[derive(Debug)]
pub(crate) enum Step {
    /// Wait until these instances have ended (or the settle limit
    /// passed), then retire them if `retire`.
    Ended {
        /// The instances.
        ids: Vec<u32>,
        /// Retire them once ended.
        retire: bool,
    },
    /// Start these instances (the groups added and replaced).
    Start(Plan),
    /// Replace a group's instances by the plan's, one at a time.
    Replace(Replace),
}

/// Replaces a group's instances one at a time: start a successor, wait
/// until it runs, then stop the old instance it replaces. A successor
/// that fails to run is removed and the replacement stops there, keeping
/// the old instances left.
#[derive(Debug)]
pub(crate) struct Replace {
    /// The group.
    pub(crate) group: String,
    /// Its new instances, one plan each, taken apart when it begins.
    pub(crate) plan: Option<Plan>,
    /// The old instances, taken when it begins.
    pub(crate) old: Vec<u32>,
    /// The successors left to start.
    pub(crate) parts: VecDeque<Plan>,
    /// The index of the successor under way.
    pub(crate) index: usize,
    /// What it waits for.
    pub(crate) phase: Phase,
}

/// Where a replacement is.
#[derive(Debug, Default)]
pub(crate) enum Phase {
    /// Start the next successor.
    #[default]
    Next,
    /// Wait until the successor runs.
    Starting(Vec<u32>),
    /// The successor did not run: wait until it is gone, then fail.
    Dropping {
        /// The successor.
        ids: Vec<u32>,
        /// How it ended, or that it did not run in time.
        why: String,
    },
    /// Wait until the old instance it replaces has ended.
    Retiring(u32),
}

/// What a change's step came to.
enum Progress {
    /// Waiting (for events, or the deadline).
    Waiting,
    /// The change is done, with its answer.
    Done(Result<String, HerdError>),
}

impl Restart {
    /// What the answer of a restart done says.
    fn said(&self) -> String {
        let target = &self.target;
        match (target.id, self.revived) {
            (Some(_), 0) => format!("{target} restarted"),
            (Some(_), _) => format!("{target} had ended: started again"),
            (None, 0) => format!("{target} restarted ({})", count(self.restarted, "instance")),
            (None, revived) => format!(
                "{target} restarted ({}; {revived} of them had ended and started again)",
                count(self.restarted, "instance")
            ),
        }
    }
}

impl Change {
    /// A rolling restart of `target`.
    pub(crate) fn restart(target: Target, reply: Option<ReplyId>) -> Self {
        Change {
            reply,
            kind: ChangeKind::Restart(Restart {
                target,
                todo: None,
                current: None,
                restarted: 0,
                revived: 0,
            }),
        }
    }

    /// The rolling part of a reload.
    pub(crate) fn reload(reload: Reload, reply: Option<ReplyId>) -> Self {
        Change {
            reply,
            kind: ChangeKind::Reload(reload),
        }
    }

    /// When the step under way gives up waiting.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.kind {
            ChangeKind::Restart(restart) => restart.current.map(|(_, _, at, _)| at),
            ChangeKind::Reload(reload) => reload.deadline,
        }
    }
}

impl Core {
    /// Answers the suspends and resumes that settled (or could not).
    pub(super) fn settle_waits(&mut self, now: Instant) {
        let mut waits = std::mem::take(&mut self.waits);
        waits.retain(|wait| {
            let settled = self.table.live_ids(&wait.group).iter().all(|id| {
                self.table
                    .entry(*id)
                    .is_some_and(|e| (e.state == InstanceState::Suspended) == wait.suspend)
            });
            let answer = if settled {
                Ok(Answer::Done(Core::settled(
                    &wait.group,
                    wait.suspend,
                    wait.count,
                )))
            } else if self.stopping || now >= wait.deadline {
                Err(HerdError::NotSettled {
                    group: wait.group.clone(),
                    suspend: wait.suspend,
                })
            } else {
                return true;
            };
            self.out.push(super::Effect::Answer {
                reply: wait.reply,
                answer,
            });
            false
        });
        self.waits.extend(waits);
    }

    /// Moves the change under way on, and the next ones once it is done.
    pub(super) fn advance_changes(&mut self, now: Instant) {
        while let Some(mut change) = self.changes.pop_front() {
            let progress = match &mut change.kind {
                ChangeKind::Restart(restart) => self.advance_restart(restart, now),
                ChangeKind::Reload(reload) => self.advance_reload(reload, now),
            };
            match progress {
                Progress::Waiting => {
                    self.changes.push_front(change);
                    return;
                }
                Progress::Done(result) => self.answer(change.reply, result.map(Answer::Done)),
            }
        }
    }

    fn advance_restart(&mut self, restart: &mut Restart, now: Instant) -> Progress {
        let group = restart.target.group.clone();
        // A queue group's ended instances stay so: they start with the herd.
        let revive = !self.is_queue_group(&group);
        if restart.todo.is_none() {
            let ids = match self.target_ids(&restart.target) {
                Ok(ids) => ids,
                Err(err) => return Progress::Done(Err(err)),
            };
            restart.todo = Some(ids.into());
        }
        loop {
            if let Some((id, starts, deadline, revived)) = restart.current {
                if self.stopping {
                    return Progress::Done(Err(HerdError::StoppedMidway));
                }
                let entry = self.table.entry(id);
                if revived {
                    if let Some(e) = entry.filter(|e| {
                        matches!(
                            e.state,
                            InstanceState::Failed | InstanceState::Lost | InstanceState::Stopped
                        )
                    }) {
                        return Progress::Done(Err(HerdError::NotStarted {
                            instance: instance_name(&e.label.group, e.label.group_id),
                            why: e.last_exit.clone().unwrap_or_else(|| e.state.to_string()),
                        }));
                    }
                }
                let back = entry.is_none_or(|e| {
                    is_final(e.state)
                        || e.state == InstanceState::Suspended
                        || (e.starts > starts
                            && e.state == InstanceState::Running
                            && self.order.is_ready(id))
                });
                if !back {
                    if now < deadline {
                        return Progress::Waiting;
                    }
                    return Progress::Done(Err(HerdError::RestartStalled {
                        group,
                        id: entry.map_or(id, |e| e.label.group_id),
                        limit: RESTART_STEP_TIMEOUT,
                    }));
                }
                restart.restarted += 1;
                restart.revived += usize::from(revived);
                restart.current = None;
            }
            let todo = restart.todo.get_or_insert_with(VecDeque::new);
            let Some(id) = todo.pop_front() else {
                return Progress::Done(Ok(restart.said()));
            };
            let Some(entry) = self.table.entry(id) else {
                continue;
            };
            if entry.state == InstanceState::Suspended {
                continue;
            }
            if is_final(entry.state) {
                if !revive {
                    continue;
                }
                if let Some(new_id) = self.revive(id) {
                    restart.current = Some((new_id, 0, now + RESTART_STEP_TIMEOUT, true));
                }
                continue;
            }
            restart.current = Some((id, entry.starts, now + RESTART_STEP_TIMEOUT, false));
            self.command(id, InstanceCommand::Restart);
        }
    }

    fn advance_reload(&mut self, reload: &mut Reload, now: Instant) -> Progress {
        while let Some(step) = reload.steps.front_mut() {
            let waited = match step {
                Step::Ended { ids, retire } => {
                    let deadline = *reload.deadline.get_or_insert(now + self.settle_limit());
                    let ended = ids
                        .iter()
                        .all(|id| self.table.entry(*id).is_none_or(|e| is_final(e.state)));
                    if !ended && now < deadline && !self.stopping {
                        return Progress::Waiting;
                    }
                    if self.stopping {
                        return Progress::Done(Err(HerdError::StoppedMidway));
                    }
                    if *retire {
                        self.table.retire(ids);
                    }
                    true
                }
                Step::Start(plan) => {
                    let plan = std::mem::take(plan);
                    self.start_step(plan, now);
                    true
                }
                Step::Replace(replace) => {
                    match self.advance_replace(replace, &mut reload.deadline, now) {
                        Progress::Waiting => return Progress::Waiting,
                        Progress::Done(Err(err)) => return Progress::Done(Err(err)),
                        Progress::Done(Ok(_)) => true,
                    }
                }
            };
            if waited {
                reload.steps.pop_front();
                reload.deadline = None;
            }
        }
        // The specs of instances the reload retired are of no more use.
        let table = &self.table;
        self.kept.retain(|id, _| table.entry(*id).is_some());
        self.log(Level::Notice, reload.message.clone());
        Progress::Done(Ok(reload.message.clone()))
    }

    /// Starts the instances of a step (moot once the herd stops).
    fn start_step(&mut self, plan: Plan, now: Instant) {
        if !self.stopping {
            self.start(plan, now);
        }
    }

    fn advance_replace(
        &mut self,
        replace: &mut Replace,
        deadline: &mut Option<Instant>,
        now: Instant,
    ) -> Progress {
        if let Some(plan) = replace.plan.take() {
            replace.old = self.table.all_ids(&replace.group);
            replace.parts = split_plan(plan).into();
            let extra: Vec<u32> = replace
                .old
                .iter()
                .skip(replace.parts.len())
                .copied()
                .collect();
            for old in &extra {
                self.command(*old, InstanceCommand::Remove);
            }
            self.table.retire(&extra);
        }
        loop {
            match std::mem::take(&mut replace.phase) {
                Phase::Next => {
                    let Some(part) = replace.parts.pop_front() else {
                        return Progress::Done(Ok(String::new()));
                    };
                    let ids = part.instances().iter().map(|s| s.label.id).collect();
                    self.start_step(part, now);
                    *deadline = Some(now + RESTART_STEP_TIMEOUT);
                    replace.phase = Phase::Starting(ids);
                }
                Phase::Starting(ids) => {
                    let (ran, failed) = self.successor(&ids);
                    let over = deadline.is_none_or(|at| now >= at);
                    if !ran && failed.is_none() && !over && !self.stopping {
                        replace.phase = Phase::Starting(ids);
                        return Progress::Waiting;
                    }
                    if self.stopping {
                        return Progress::Done(Err(HerdError::StoppedMidway));
                    }
                    if !ran {
                        for id in &ids {
                            self.command(*id, InstanceCommand::Remove);
                        }
                        self.table.retire(&ids);
                        let why = failed.unwrap_or_else(|| {
                            format!(
                                "not running within {}",
                                humantime::format_duration(RESTART_STEP_TIMEOUT)
                            )
                        });
                        *deadline = Some(now + self.settle_limit());
                        replace.phase = Phase::Dropping { ids, why };
                        continue;
                    }
                    match replace.old.get(replace.index).copied() {
                        Some(old) => {
                            self.command(old, InstanceCommand::Remove);
                            *deadline = Some(now + self.settle_limit());
                            replace.phase = Phase::Retiring(old);
                        }
                        None => replace.index += 1,
                    }
                }
                Phase::Dropping { ids, why } => {
                    let gone = ids.iter().all(|id| self.table.entry(*id).is_none());
                    let over = deadline.is_none_or(|at| now >= at);
                    if !gone && !over && !self.stopping {
                        replace.phase = Phase::Dropping { ids, why };
                        return Progress::Waiting;
                    }
                    return Progress::Done(Err(HerdError::ReplacementFailed {
                        group: replace.group.clone(),
                        why,
                        kept: replace.old.len().saturating_sub(replace.index),
                    }));
                }
                Phase::Retiring(old) => {
                    let ended = self.table.entry(old).is_none_or(|e| is_final(e.state));
                    let over = deadline.is_none_or(|at| now >= at);
                    if !ended && !over && !self.stopping {
                        replace.phase = Phase::Retiring(old);
                        return Progress::Waiting;
                    }
                    if self.stopping {
                        return Progress::Done(Err(HerdError::StoppedMidway));
                    }
                    self.table.retire(&[old]);
                    replace.index += 1;
                }
            }
        }
    }

    /// Whether a successor runs (or has run: completed, or suspended with
    /// its group), and how it ended if it ended before it ever ran.
    fn successor(&self, ids: &[u32]) -> (bool, Option<String>) {
        let mut failed = None;
        let mut ran = true;
        for id in ids {
            let Some(e) = self.table.entry(*id) else {
                ran = false;
                continue;
            };
            if e.state == InstanceState::Failed || (e.starts == 0 && e.last_exit.is_some()) {
                failed = e.last_exit.clone().or(Some("failed".into()));
            }
            // Running is not enough for a group with `[group.ready]`:
            // the groups after it wait for it to be ready.
            ran &= matches!(
                e.state,
                InstanceState::Running | InstanceState::Suspended | InstanceState::Completed
            ) && (e.state != InstanceState::Running || self.order.is_ready(*id));
        }
        (ran && failed.is_none(), failed)
    }
}
