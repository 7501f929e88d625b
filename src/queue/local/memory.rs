//! The in-memory adapter.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::state::{Record, State};
use super::{
    Lease, LeaseId, LocalQueue, Message, MessageId, PushOptions, QueueOptions, QueueStats, Result,
};

/// A [`LocalQueue`] kept in memory only: fast, and lost with the process.
///
/// Its operations fail only with [`StaleLease`](super::LocalQueueError::StaleLease)
/// and [`NotDead`](super::LocalQueueError::NotDead).
#[derive(Debug)]
pub struct MemoryQueue {
    /// The queue state; nothing else to keep.
    state: State,
}

/// The memory adapter keeps nothing but the state.
fn discard(_: &[Record]) -> Result<()> {
    Ok(())
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new(options: QueueOptions) -> MemoryQueue {
        MemoryQueue {
            state: State::new(options),
        }
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new(QueueOptions::default())
    }
}

impl LocalQueue for MemoryQueue {
    fn push_at(
        &mut self,
        payload: Value,
        options: PushOptions,
        now: SystemTime,
    ) -> Result<MessageId> {
        self.state.push(payload, options, now, &mut discard)
    }

    fn receive(&mut self, now: SystemTime) -> Result<Option<Lease>> {
        self.state.receive(now, &mut discard)
    }

    fn ack_at(&mut self, lease: &LeaseId, now: SystemTime) -> Result<()> {
        self.state.ack(lease, now, &mut discard)
    }

    fn nack_at(&mut self, lease: &LeaseId, delay: Duration, now: SystemTime) -> Result<()> {
        self.state.nack(lease, delay, now, &mut discard)
    }

    fn extend_at(&mut self, lease: &LeaseId, by: Duration, now: SystemTime) -> Result<SystemTime> {
        self.state.extend(lease, by, now, &mut discard)
    }

    fn dead_letters(&self) -> Vec<Message> {
        self.state.dead_letters()
    }

    fn requeue_dead_at(&mut self, id: MessageId, now: SystemTime) -> Result<()> {
        self.state.requeue_dead(id, now, &mut discard)
    }

    fn purge_dead(&mut self) -> Result<usize> {
        self.state.purge_dead(&mut discard)
    }

    fn stats_at(&self, now: SystemTime) -> QueueStats {
        self.state.stats_at(now)
    }

    fn next_visible_at(&self) -> Option<SystemTime> {
        self.state.next_visible_at()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::local::suite::behaviour_suite;

    behaviour_suite!({
        let make =
            |options: QueueOptions| -> Box<dyn LocalQueue> { Box::new(MemoryQueue::new(options)) };
        (make, ())
    });
}
