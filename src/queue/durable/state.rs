//! The durable queue's state, without I/O: what a replay of the journal
//! rebuilds, and what a snapshot writes back. Every change is a
//! [`Record`] applied with [`State::apply`], live and at replay alike.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::record::Record;
use crate::queue::journal;

/// Bytes a snapshot frame holds at most (a frame is read whole at replay).
const SNAPSHOT_FRAME: usize = 1 << 20;

/// A job without a final outcome.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Its JSON text.
    pub(crate) payload: Arc<RawValue>,
    /// Deliveries begun, handed-back ones not counted.
    pub(crate) attempts: u32,
}

/// A job given up on.
#[derive(Debug, Clone)]
pub(crate) struct Buried {
    /// Its JSON text.
    pub(crate) payload: Arc<RawValue>,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// When, in ms since the Unix epoch.
    pub(crate) at_ms: u64,
    /// Why.
    pub(crate) reason: String,
}

/// The state: pending jobs by id (which is their order), dead jobs, the
/// next id and the intake mark.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Jobs without a final outcome, served in id order.
    pub(crate) jobs: BTreeMap<u64, Pending>,
    /// Dead jobs, by id.
    pub(crate) dead: BTreeMap<u64, Buried>,
    /// The next job id (ids are never reused).
    pub(crate) next_id: u64,
    /// The inbox generation being (or last) taken in.
    pub(crate) generation: u64,
    /// Bytes of that generation taken in.
    pub(crate) offset: u64,
    /// Payload and reason bytes of every job held, for the compaction
    /// trigger.
    pub(crate) live_bytes: u64,
    /// Records that named a job the state does not hold (harmless; counted
    /// for tests and the log).
    pub(crate) strays: u64,
}

/// A payload that passed its frame's checksum but is not one JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadPayload {
    /// The job's id.
    pub(crate) id: u64,
}

/// Validates a payload read back from the journal.
fn parse(id: u64, payload: &[u8]) -> Result<Arc<RawValue>, BadPayload> {
    serde_json::from_slice::<Box<RawValue>>(payload)
        .map(Arc::from)
        .map_err(|_| BadPayload { id })
}

/// Bytes a job accounts for in [`State::live_bytes`].
fn cost(payload: &RawValue, reason: &str) -> u64 {
    (payload.get().len() + reason.len() + 16) as u64
}

impl State {
    /// An empty queue.
    pub(crate) fn new() -> State {
        State {
            next_id: 1,
            ..State::default()
        }
    }

    /// Applies a record read from the journal.
    ///
    /// # Errors
    /// A payload that is not one JSON value.
    pub(crate) fn apply(&mut self, record: &Record<'_>) -> Result<(), BadPayload> {
        match *record {
            Record::Push { id, payload } => {
                let payload = parse(id, payload)?;
                self.add(id, payload, 0);
            }
            Record::Job {
                id,
                attempts,
                payload,
            } => {
                let payload = parse(id, payload)?;
                self.add(id, payload, attempts);
            }
            Record::Buried {
                id,
                attempts,
                at_ms,
                reason,
                payload,
            } => {
                let payload = parse(id, payload)?;
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.live_bytes += cost(&payload, reason);
                let buried = Buried {
                    payload,
                    attempts,
                    at_ms,
                    reason: reason.to_owned(),
                };
                if let Some(old) = self.dead.insert(id, buried) {
                    self.live_bytes -= cost(&old.payload, &old.reason);
                }
            }
            _ => self.apply_change(record),
        }
        Ok(())
    }

    /// Applies a record that carries no payload (those never fail).
    pub(crate) fn apply_change(&mut self, record: &Record<'_>) {
        match *record {
            Record::Attempt { id } => match self.jobs.get_mut(&id) {
                Some(job) => job.attempts = job.attempts.saturating_add(1),
                None => self.strays += 1,
            },
            Record::Unattempt { id } => match self.jobs.get_mut(&id) {
                Some(job) => job.attempts = job.attempts.saturating_sub(1),
                None => self.strays += 1,
            },
            Record::Done { id } => match self.jobs.remove(&id) {
                Some(job) => self.live_bytes -= cost(&job.payload, ""),
                None => self.strays += 1,
            },
            Record::Dead { id, at_ms, reason } => match self.jobs.remove(&id) {
                Some(job) => {
                    self.live_bytes -= cost(&job.payload, "");
                    self.live_bytes += cost(&job.payload, reason);
                    self.dead.insert(
                        id,
                        Buried {
                            payload: job.payload,
                            attempts: job.attempts,
                            at_ms,
                            reason: reason.to_owned(),
                        },
                    );
                }
                None => self.strays += 1,
            },
            Record::Forget { id } => match self.dead.remove(&id) {
                Some(old) => self.live_bytes -= cost(&old.payload, &old.reason),
                None => self.strays += 1,
            },
            Record::Intake { generation, offset } => {
                self.generation = generation;
                self.offset = offset;
            }
            Record::Meta {
                next_id,
                generation,
                offset,
            } => {
                self.next_id = self.next_id.max(next_id);
                self.generation = generation;
                self.offset = offset;
            }
            // Records with payloads go through `apply`.
            Record::Push { .. } | Record::Job { .. } | Record::Buried { .. } => {}
        }
    }

    /// Adds a pending job whose payload is already known to be JSON.
    pub(crate) fn add(&mut self, id: u64, payload: Arc<RawValue>, attempts: u32) {
        self.next_id = self.next_id.max(id.saturating_add(1));
        self.live_bytes += cost(&payload, "");
        if let Some(old) = self.jobs.insert(id, Pending { payload, attempts }) {
            self.live_bytes -= cost(&old.payload, "");
        }
    }

    /// Adds a dead job whose payload is already known to be JSON.
    pub(crate) fn bury_new(&mut self, id: u64, payload: Arc<RawValue>, at_ms: u64, reason: &str) {
        self.next_id = self.next_id.max(id.saturating_add(1));
        self.live_bytes += cost(&payload, reason);
        self.dead.insert(
            id,
            Buried {
                payload,
                attempts: 0,
                at_ms,
                reason: reason.to_owned(),
            },
        );
    }

    /// The whole state as journal frames (after the magic): a Meta record,
    /// then every pending and dead job, in frames of about 1 MiB.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.live_bytes as usize + 64);
        let mut records = Vec::with_capacity(SNAPSHOT_FRAME + 4096);
        Record::Meta {
            next_id: self.next_id,
            generation: self.generation,
            offset: self.offset,
        }
        .encode(&mut records);
        let flush = |records: &mut Vec<u8>, out: &mut Vec<u8>, force: bool| {
            if !records.is_empty() && (force || records.len() >= SNAPSHOT_FRAME) {
                // Frames of about 1 MiB never reach the 4 GiB limit.
                let _ = journal::encode_frame(records, out);
                records.clear();
            }
        };
        for (&id, job) in &self.jobs {
            Record::Job {
                id,
                attempts: job.attempts,
                payload: job.payload.get().as_bytes(),
            }
            .encode(&mut records);
            flush(&mut records, &mut out, false);
        }
        for (&id, dead) in &self.dead {
            Record::Buried {
                id,
                attempts: dead.attempts,
                at_ms: dead.at_ms,
                reason: &dead.reason,
                payload: dead.payload.get().as_bytes(),
            }
            .encode(&mut records);
            flush(&mut records, &mut out, false);
        }
        flush(&mut records, &mut out, true);
        // A last small frame: damage anywhere in the snapshot is then
        // followed by data, so it is reported, never taken for a write
        // torn at the end. (It repeats the counters: harmless.)
        Record::Meta {
            next_id: self.next_id,
            generation: self.generation,
            offset: self.offset,
        }
        .encode(&mut records);
        flush(&mut records, &mut out, true);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::durable::record::Reader;
    use crate::queue::journal::{scan_frames, ScanEnd};

    fn raw(text: &str) -> Arc<RawValue> {
        Arc::from(RawValue::from_string(text.to_owned()).unwrap())
    }

    fn replay(frames: &[u8]) -> State {
        let mut state = State::new();
        let end = scan_frames::<()>(frames, 0, |_, payload| {
            let mut reader = Reader::new(payload);
            while let Some(record) = reader.next_record().unwrap() {
                state.apply(&record).unwrap();
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(end, ScanEnd::Clean);
        state
    }

    /// Everything a replay must rebuild, comparable.
    type Summary = (
        Vec<(u64, String, u32)>,
        Vec<(u64, String, String)>,
        u64,
        u64,
        u64,
    );

    fn summary(state: &State) -> Summary {
        (
            state
                .jobs
                .iter()
                .map(|(id, job)| (*id, job.payload.get().to_owned(), job.attempts))
                .collect(),
            state
                .dead
                .iter()
                .map(|(id, dead)| (*id, dead.payload.get().to_owned(), dead.reason.clone()))
                .collect(),
            state.next_id,
            state.generation,
            state.offset,
        )
    }

    #[test]
    fn events_move_jobs_and_a_snapshot_keeps_everything() {
        let mut state = State::new();
        for id in 1..=4 {
            state.add(id, raw(&format!("{{\"n\":{id}}}")), 0);
        }
        state.apply_change(&Record::Attempt { id: 1 });
        state.apply_change(&Record::Attempt { id: 1 });
        state.apply_change(&Record::Unattempt { id: 1 });
        state.apply_change(&Record::Attempt { id: 2 });
        state.apply_change(&Record::Done { id: 2 });
        state.apply_change(&Record::Dead {
            id: 3,
            at_ms: 10,
            reason: "broken",
        });
        state.apply_change(&Record::Intake {
            generation: 2,
            offset: 40,
        });
        state.apply_change(&Record::Done { id: 99 });
        assert_eq!(state.strays, 1);
        assert_eq!(state.jobs[&1].attempts, 1);
        assert_eq!(state.jobs.keys().copied().collect::<Vec<_>>(), [1, 4]);
        assert_eq!(state.dead[&3].reason, "broken");

        let before = summary(&state);
        let again = replay(&state.snapshot());
        assert_eq!(summary(&again), before);
        assert_eq!(again.live_bytes, state.live_bytes);
        // Ids are never reused, even when the newest job is gone.
        state.apply_change(&Record::Done { id: 4 });
        assert_eq!(replay(&state.snapshot()).next_id, 5);
    }

    #[test]
    fn a_bad_payload_names_its_job() {
        let mut state = State::new();
        assert_eq!(
            state.apply(&Record::Push {
                id: 7,
                payload: b"{not json"
            }),
            Err(BadPayload { id: 7 })
        );
    }

    #[test]
    fn a_snapshot_is_small() {
        let mut state = State::new();
        for id in 1..=100_000u64 {
            state.add(id, raw(&id.to_string()), 0);
        }
        let snapshot = state.snapshot();
        let payloads: usize = (1..=100_000u64).map(|id| id.to_string().len()).sum();
        let overhead = (snapshot.len() - payloads) as f64 / 100_000.0;
        assert!(
            overhead < 8.0,
            "{overhead} bytes per job beyond its payload"
        );
    }
}
