//! The state machine both adapters share.
//!
//! An operation is planned against the current state as a list of
//! [`Record`]s, handed to a sink (the file adapter journals and syncs them,
//! the memory adapter does nothing), and only then applied with
//! [`State::apply`], the same function the journal replay uses. A failing
//! sink leaves the state as it was.
//!
//! Index sets cache which state each message is in. [`State::apply`] files a
//! message as delayed, in flight or dead; [`State::promote`] (given `now`)
//! moves delayed messages whose time came and messages whose lease expired
//! to ready, or to "doomed" when they reached `max_receives`. Doomed
//! messages are dead-lettered (a journaled `Dead` record) by the next
//! operation.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    later, Lease, LeaseId, LocalQueueError, Message, MessageId, PushOptions, QueueOptions,
    QueueStats, Result,
};

/// One change of state. The journal is a sequence of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Record {
    /// A new message.
    Push {
        /// The message, receive count 0.
        message: Message,
    },
    /// A delivery: the receive count goes up, the message is hidden.
    Lease {
        /// The message.
        id: MessageId,
        /// The new lease.
        lease: LeaseId,
        /// Its end.
        expires_at: SystemTime,
    },
    /// The message is deleted.
    Ack {
        /// The message.
        id: MessageId,
    },
    /// The lease ends early; the message is visible at `visible_at`.
    Nack {
        /// The message.
        id: MessageId,
        /// When it is visible again.
        visible_at: SystemTime,
    },
    /// The lease ends later. Not journaled: leases do not survive a reopen.
    Extend {
        /// The message.
        id: MessageId,
        /// The new end of its lease.
        expires_at: SystemTime,
    },
    /// The message moves to the dead-letter list.
    Dead {
        /// The message.
        id: MessageId,
    },
    /// A dead message is back, receive count 0.
    Requeue {
        /// The message.
        id: MessageId,
        /// When it is visible.
        visible_at: SystemTime,
    },
    /// Every dead message is deleted.
    Purge,
    /// Counters of a compacted journal (its first record).
    Meta {
        /// The next message id to hand out.
        next_id: u64,
        /// The next lease id to hand out.
        next_lease: u64,
    },
    /// A message of a compacted journal, as it was.
    Snapshot {
        /// The message.
        message: Message,
        /// Whether it is dead-lettered.
        dead: bool,
    },
}

impl Record {
    /// Whether the record changes what a replay must rebuild. Extends only
    /// change leases, which a reopen releases anyway.
    pub(super) fn is_durable(&self) -> bool {
        !matches!(self, Record::Extend { .. })
    }
}

/// Which index set a message is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// `delayed`, keyed by `visible_at` (possibly already due: see `promote`).
    Delayed,
    /// `ready`, keyed by priority then id.
    Ready,
    /// `in_flight`, keyed by the lease end (possibly already expired).
    InFlight,
    /// `doomed`: visible, but out of receives; dead-lettered next operation.
    Doomed,
    /// `dead`.
    Dead,
}

/// A current lease.
#[derive(Debug, Clone, Copy)]
struct LeaseSlot {
    /// Its id.
    id: LeaseId,
    /// Its end.
    expires_at: SystemTime,
}

/// One message and where it stands.
#[derive(Debug)]
struct Entry {
    /// The message.
    message: Message,
    /// Its lease, while leased.
    lease: Option<LeaseSlot>,
    /// Whether it is in the dead-letter list.
    dead: bool,
    /// Which index set holds it.
    slot: Slot,
}

/// What an operation hands its records to before they are applied.
pub(super) type Sink<'a> = &'a mut dyn FnMut(&[Record]) -> Result<()>;

/// The queue state.
#[derive(Debug)]
pub(super) struct State {
    /// Settings.
    options: QueueOptions,
    /// Every message, whatever its state.
    entries: HashMap<MessageId, Entry>,
    /// Current lease ids and their message.
    leases: HashMap<LeaseId, MessageId>,
    /// Deliverable now, best first.
    ready: BTreeSet<(Reverse<i32>, MessageId)>,
    /// Waiting for `visible_at`.
    delayed: BTreeSet<(SystemTime, MessageId)>,
    /// Leased, by lease end.
    in_flight: BTreeSet<(SystemTime, MessageId)>,
    /// Visible but out of receives, not yet dead-lettered.
    doomed: BTreeSet<MessageId>,
    /// Dead-lettered.
    dead: BTreeSet<MessageId>,
    /// The next message id.
    next_id: u64,
    /// The next lease id.
    next_lease: u64,
}

impl State {
    /// An empty queue.
    pub(super) fn new(options: QueueOptions) -> State {
        State {
            options,
            entries: HashMap::new(),
            leases: HashMap::new(),
            ready: BTreeSet::new(),
            delayed: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            doomed: BTreeSet::new(),
            dead: BTreeSet::new(),
            next_id: 1,
            next_lease: 1,
        }
    }

    /// How many messages it holds, dead ones included.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn max_receives(&self) -> u32 {
        self.options.max_receives.max(1)
    }

    // ---- operations -------------------------------------------------------

    pub(super) fn push(
        &mut self,
        payload: Value,
        options: PushOptions,
        now: SystemTime,
        sink: Sink<'_>,
    ) -> Result<MessageId> {
        self.promote(now);
        let mut records = self.doomed_records();
        let id = MessageId(self.next_id);
        records.push(Record::Push {
            message: Message {
                id,
                payload,
                priority: options.priority,
                visible_at: later(now, options.delay),
                receive_count: 0,
                enqueued_at: now,
            },
        });
        self.commit(records, sink)?;
        Ok(id)
    }

    pub(super) fn receive(&mut self, now: SystemTime, sink: Sink<'_>) -> Result<Option<Lease>> {
        self.promote(now);
        let mut records = self.doomed_records();
        let Some(&(_, id)) = self.ready.first() else {
            if !records.is_empty() {
                self.commit(records, sink)?;
            }
            return Ok(None);
        };
        let lease_id = LeaseId(self.next_lease);
        let expires_at = later(now, self.options.visibility_timeout);
        records.push(Record::Lease {
            id,
            lease: lease_id,
            expires_at,
        });
        self.commit(records, sink)?;
        let message = self
            .entries
            .get(&id)
            .map(|entry| entry.message.clone())
            .expect("invariant: a message just leased is in the table");
        Ok(Some(Lease {
            message,
            lease_id,
            expires_at,
        }))
    }

    pub(super) fn ack(&mut self, lease: &LeaseId, now: SystemTime, sink: Sink<'_>) -> Result<()> {
        self.promote(now);
        let id = self.current(lease)?;
        let mut records = self.doomed_records();
        records.push(Record::Ack { id });
        self.commit(records, sink)
    }

    pub(super) fn nack(
        &mut self,
        lease: &LeaseId,
        delay: Duration,
        now: SystemTime,
        sink: Sink<'_>,
    ) -> Result<()> {
        self.promote(now);
        let id = self.current(lease)?;
        let mut records = self.doomed_records();
        records.push(Record::Nack {
            id,
            visible_at: later(now, delay),
        });
        self.commit(records, sink)
    }

    pub(super) fn extend(
        &mut self,
        lease: &LeaseId,
        by: Duration,
        now: SystemTime,
        sink: Sink<'_>,
    ) -> Result<SystemTime> {
        self.promote(now);
        let id = self.current(lease)?;
        let current = self
            .entries
            .get(&id)
            .and_then(|entry| entry.lease)
            .map(|slot| slot.expires_at)
            .expect("invariant: a current lease id points to a leased message");
        let expires_at = later(current, by);
        let mut records = self.doomed_records();
        records.push(Record::Extend { id, expires_at });
        self.commit(records, sink)?;
        Ok(expires_at)
    }

    pub(super) fn requeue_dead(
        &mut self,
        id: MessageId,
        now: SystemTime,
        sink: Sink<'_>,
    ) -> Result<()> {
        self.promote(now);
        let is_dead = self
            .entries
            .get(&id)
            .is_some_and(|entry| matches!(entry.slot, Slot::Dead | Slot::Doomed));
        if !is_dead {
            return Err(LocalQueueError::NotDead { id });
        }
        let mut records = self.doomed_records();
        records.push(Record::Requeue {
            id,
            visible_at: now,
        });
        self.commit(records, sink)
    }

    pub(super) fn purge_dead(&mut self, sink: Sink<'_>) -> Result<usize> {
        let count = self.dead.len() + self.doomed.len();
        if count == 0 {
            return Ok(0);
        }
        let mut records = self.doomed_records();
        records.push(Record::Purge);
        self.commit(records, sink)?;
        Ok(count)
    }

    pub(super) fn dead_letters(&self) -> Vec<Message> {
        let mut ids: Vec<MessageId> = self.dead.iter().chain(&self.doomed).copied().collect();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| self.entries.get(id))
            .map(|entry| entry.message.clone())
            .collect()
    }

    pub(super) fn stats_at(&self, now: SystemTime) -> QueueStats {
        let max = self.max_receives();
        let mut stats = QueueStats {
            ready: self.ready.len(),
            delayed: self.delayed.len(),
            in_flight: self.in_flight.len(),
            dead: self.dead.len() + self.doomed.len(),
        };
        // What `promote(now)` would move, without moving it.
        let due = |set: &BTreeSet<(SystemTime, MessageId)>| {
            set.range(..=(now, MessageId(u64::MAX)))
                .map(|&(_, id)| id)
                .collect::<Vec<_>>()
        };
        for id in due(&self.delayed) {
            stats.delayed -= 1;
            self.count_visible(id, max, &mut stats);
        }
        for id in due(&self.in_flight) {
            stats.in_flight -= 1;
            self.count_visible(id, max, &mut stats);
        }
        stats
    }

    fn count_visible(&self, id: MessageId, max: u32, stats: &mut QueueStats) {
        match self.entries.get(&id) {
            Some(entry) if entry.message.receive_count >= max => stats.dead += 1,
            _ => stats.ready += 1,
        }
    }

    pub(super) fn next_visible_at(&self) -> Option<SystemTime> {
        if let Some((_, id)) = self.ready.first() {
            return self.entries.get(id).map(|entry| entry.message.visible_at);
        }
        let max = self.max_receives();
        let deliverable = |set: &BTreeSet<(SystemTime, MessageId)>| {
            set.iter()
                .find(|(_, id)| {
                    self.entries
                        .get(id)
                        .is_some_and(|entry| entry.message.receive_count < max)
                })
                .map(|&(at, _)| at)
        };
        match (deliverable(&self.delayed), deliverable(&self.in_flight)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Releases every lease: their messages are visible again at their own
    /// `visible_at` (already past). Used after a replay.
    pub(super) fn release_leases(&mut self) {
        let ids: Vec<MessageId> = self.in_flight.iter().map(|&(_, id)| id).collect();
        for id in ids {
            self.unplace(id);
            self.drop_lease(id);
            self.place(id);
        }
    }

    /// The records of a compacted journal: counters, then every message by
    /// id. Leases are left out (a reopen releases them anyway); records
    /// appended later that refer to them (ack, nack) still apply.
    pub(super) fn snapshot(&self) -> Vec<Record> {
        let mut ids: Vec<MessageId> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        let mut records = Vec::with_capacity(ids.len() + 1);
        records.push(Record::Meta {
            next_id: self.next_id,
            next_lease: self.next_lease,
        });
        records.extend(
            ids.iter()
                .filter_map(|id| self.entries.get(id))
                .map(|entry| Record::Snapshot {
                    message: entry.message.clone(),
                    dead: entry.dead,
                }),
        );
        records
    }

    // ---- internals --------------------------------------------------------

    /// The message of a current (known, unexpired) lease. Call after
    /// `promote(now)`, which forgets expired leases.
    fn current(&self, lease: &LeaseId) -> Result<MessageId> {
        self.leases
            .get(lease)
            .copied()
            .ok_or(LocalQueueError::StaleLease { lease: *lease })
    }

    fn doomed_records(&self) -> Vec<Record> {
        self.doomed.iter().map(|&id| Record::Dead { id }).collect()
    }

    fn commit(&mut self, records: Vec<Record>, sink: Sink<'_>) -> Result<()> {
        sink(&records)?;
        for record in records {
            self.apply(record);
        }
        Ok(())
    }

    /// Moves what became visible by `now` to `ready` (or `doomed`), and
    /// forgets expired leases. Changes nothing a replay must know: only time
    /// passed.
    fn promote(&mut self, now: SystemTime) {
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            self.make_visible(id);
        }
        while let Some(&(at, id)) = self.in_flight.first() {
            if at > now {
                break;
            }
            self.in_flight.pop_first();
            self.drop_lease(id);
            self.make_visible(id);
        }
    }

    /// Files a message that just left `delayed` or `in_flight`.
    fn make_visible(&mut self, id: MessageId) {
        let max = self.max_receives();
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if entry.message.receive_count >= max {
            entry.slot = Slot::Doomed;
            self.doomed.insert(id);
        } else {
            entry.slot = Slot::Ready;
            self.ready.insert((Reverse(entry.message.priority), id));
        }
    }

    /// Files a message by its own fields: dead, in flight or delayed.
    fn place(&mut self, id: MessageId) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.slot = if entry.dead {
            self.dead.insert(id);
            Slot::Dead
        } else if let Some(lease) = entry.lease {
            self.in_flight.insert((lease.expires_at, id));
            Slot::InFlight
        } else {
            self.delayed.insert((entry.message.visible_at, id));
            Slot::Delayed
        };
    }

    /// Takes a message out of its index set, before its fields change.
    fn unplace(&mut self, id: MessageId) {
        let Some(entry) = self.entries.get(&id) else {
            return;
        };
        match entry.slot {
            Slot::Delayed => self.delayed.remove(&(entry.message.visible_at, id)),
            Slot::Ready => self.ready.remove(&(Reverse(entry.message.priority), id)),
            Slot::InFlight => match entry.lease {
                Some(lease) => self.in_flight.remove(&(lease.expires_at, id)),
                None => false,
            },
            Slot::Doomed => self.doomed.remove(&id),
            Slot::Dead => self.dead.remove(&id),
        };
    }

    fn drop_lease(&mut self, id: MessageId) {
        if let Some(lease) = self.entries.get_mut(&id).and_then(|e| e.lease.take()) {
            self.leases.remove(&lease.id);
        }
    }

    fn insert(&mut self, message: Message, dead: bool) {
        let id = message.id;
        self.next_id = self.next_id.max(id.0.saturating_add(1));
        if self.entries.contains_key(&id) {
            tracing::warn!(id = %id, "queue journal pushes a message twice; keeping the first");
            return;
        }
        self.entries.insert(
            id,
            Entry {
                message,
                lease: None,
                dead,
                slot: Slot::Delayed,
            },
        );
        self.place(id);
    }

    /// Applies one record. Tolerates records about unknown messages (they
    /// are skipped), so a replay never panics on an odd journal.
    pub(super) fn apply(&mut self, record: Record) {
        match record {
            Record::Push { message } => self.insert(message, false),
            Record::Snapshot { message, dead } => self.insert(message, dead),
            Record::Meta {
                next_id,
                next_lease,
            } => {
                self.next_id = self.next_id.max(next_id);
                self.next_lease = self.next_lease.max(next_lease);
            }
            Record::Lease {
                id,
                lease,
                expires_at,
            } => {
                self.next_lease = self.next_lease.max(lease.0.saturating_add(1));
                if !self.entries.contains_key(&id) {
                    return;
                }
                self.unplace(id);
                self.drop_lease(id);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.lease = Some(LeaseSlot {
                        id: lease,
                        expires_at,
                    });
                    entry.dead = false;
                    entry.message.receive_count = entry.message.receive_count.saturating_add(1);
                    self.leases.insert(lease, id);
                }
                self.place(id);
            }
            Record::Ack { id } => {
                self.unplace(id);
                self.drop_lease(id);
                self.entries.remove(&id);
            }
            Record::Nack { id, visible_at } => {
                self.unplace(id);
                self.drop_lease(id);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.message.visible_at = visible_at;
                }
                self.place(id);
            }
            Record::Extend { id, expires_at } => {
                let leased = self.entries.get(&id).is_some_and(|e| e.lease.is_some());
                if !leased {
                    return;
                }
                self.unplace(id);
                if let Some(lease) = self.entries.get_mut(&id).and_then(|e| e.lease.as_mut()) {
                    lease.expires_at = expires_at;
                }
                self.place(id);
            }
            Record::Dead { id } => {
                self.unplace(id);
                self.drop_lease(id);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.dead = true;
                }
                self.place(id);
            }
            Record::Requeue { id, visible_at } => {
                let dead = self.entries.get(&id).is_some_and(|e| e.dead);
                if !dead {
                    return;
                }
                self.unplace(id);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.dead = false;
                    entry.message.receive_count = 0;
                    entry.message.visible_at = visible_at;
                }
                self.place(id);
            }
            Record::Purge => {
                for id in std::mem::take(&mut self.dead) {
                    self.entries.remove(&id);
                }
            }
        }
    }

    /// Every message with its dead flag, by id: what a replay must rebuild.
    #[cfg(test)]
    pub(super) fn dump(&self) -> Vec<(Message, bool)> {
        let mut all: Vec<(Message, bool)> = self
            .entries
            .values()
            .map(|entry| (entry.message.clone(), entry.dead))
            .collect();
        all.sort_by_key(|(message, _)| message.id);
        all
    }
}
