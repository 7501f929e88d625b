//! The durable queue's state, without I/O: what a replay of the journal
//! rebuilds, and what a snapshot writes back. Every change is a
//! [`Record`] applied with [`State::apply`], live and at replay alike.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::value::RawValue;

use super::record::Record;
use crate::queue::journal;
use crate::queue::options::JobOptions;

/// Bytes a snapshot frame holds at most (a frame is read whole at replay).
const SNAPSHOT_FRAME: usize = 1 << 20;

/// A job without a final outcome.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Its JSON text.
    pub(crate) payload: Arc<RawValue>,
    /// Deliveries begun, handed-back ones not counted.
    pub(crate) attempts: u32,
    /// Its options, if it has any (a delay already turned into a time).
    pub(crate) options: Option<Arc<JobOptions>>,
}

impl Pending {
    /// Its priority (0 without options).
    fn priority(&self) -> i64 {
        self.options.as_ref().map_or(0, |o| o.priority_value())
    }

    /// When it is due, Unix ms, if it has a start time.
    fn due_ms(&self) -> Option<u64> {
        self.options.as_ref().and_then(|o| o.due_ms())
    }
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

/// The state: pending jobs by id, the order they are served in, the
/// unique keys they hold, dead jobs, the next id and the intake mark.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Jobs without a final outcome, by id.
    pub(crate) jobs: BTreeMap<u64, Pending>,
    /// Pending jobs due and not taken yet ([`take_next`](Self::take_next))
    /// by this process, in serving order: priority (higher first), then id.
    ready: BTreeSet<(Reverse<i64>, u64)>,
    /// Pending jobs not taken yet that have a start time: by that time
    /// (Unix ms), then id. They move to `ready` once due.
    not_due: BTreeSet<(u64, u64)>,
    /// The unique keys of pending jobs (running ones included), with the
    /// job that holds each.
    unique: HashMap<String, u64>,
    /// Jobs not added because their unique key was held (this process).
    pub(crate) duplicates: u64,
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

/// Bytes a pending job accounts for (its options included).
fn pending_cost(job: &Pending) -> u64 {
    cost(&job.payload, "") + if job.options.is_some() { 48 } else { 0 }
}

/// Options read back from the journal.
fn parse_options(id: u64, options: &[u8]) -> Result<Arc<JobOptions>, BadPayload> {
    JobOptions::decode(options)
        .map(Arc::new)
        .ok_or(BadPayload { id })
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
            Record::PushWith {
                id,
                options,
                payload,
            } => {
                let payload = parse(id, payload)?;
                let options = parse_options(id, options)?;
                self.add_with(id, payload, 0, Some(options));
            }
            Record::JobWith {
                id,
                attempts,
                options,
                payload,
            } => {
                let payload = parse(id, payload)?;
                let options = parse_options(id, options)?;
                self.add_with(id, payload, attempts, Some(options));
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
            Record::Done { id } => match self.remove_pending(id) {
                Some(_) => {}
                None => self.strays += 1,
            },
            Record::Dead { id, at_ms, reason } => match self.remove_pending(id) {
                Some(job) => {
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
            Record::Push { .. }
            | Record::Job { .. }
            | Record::PushWith { .. }
            | Record::JobWith { .. }
            | Record::Buried { .. } => {}
        }
    }

    /// Adds a pending job whose payload is already known to be JSON.
    pub(crate) fn add(&mut self, id: u64, payload: Arc<RawValue>, attempts: u32) {
        self.add_with(id, payload, attempts, None);
    }

    /// Adds a pending job with its options (if any).
    pub(crate) fn add_with(
        &mut self,
        id: u64,
        payload: Arc<RawValue>,
        attempts: u32,
        options: Option<Arc<JobOptions>>,
    ) {
        self.next_id = self.next_id.max(id.saturating_add(1));
        // A job added again under its id (harmless at replay) replaces it.
        self.remove_pending(id);
        let job = Pending {
            payload,
            attempts,
            options,
        };
        self.live_bytes += pending_cost(&job);
        match job.due_ms() {
            Some(due) => self.not_due.insert((due, id)),
            None => self.ready.insert((Reverse(job.priority()), id)),
        };
        if let Some(key) = job.options.as_ref().and_then(|o| o.unique_key()) {
            self.unique.insert(key.to_owned(), id);
        }
        self.jobs.insert(id, job);
    }

    /// Removes a pending job from every index; returns it.
    fn remove_pending(&mut self, id: u64) -> Option<Pending> {
        let job = self.jobs.remove(&id)?;
        self.live_bytes -= pending_cost(&job);
        self.ready.remove(&(Reverse(job.priority()), id));
        if let Some(due) = job.due_ms() {
            self.not_due.remove(&(due, id));
        }
        if let Some(key) = job.options.as_ref().and_then(|o| o.unique_key()) {
            if self.unique.get(key) == Some(&id) {
                self.unique.remove(key);
            }
        }
        Some(job)
    }

    /// Whether a pending (or running) job holds the unique key `key`.
    pub(crate) fn holds_key(&self, key: &str) -> bool {
        self.unique.contains_key(key)
    }

    /// The best job due at `now_ms` not taken yet (the highest priority,
    /// then the lowest id); it is not offered again by this state.
    pub(crate) fn take_next(&mut self, now_ms: u64) -> Option<u64> {
        while let Some(&(due, id)) = self.not_due.first() {
            if due > now_ms {
                break;
            }
            self.not_due.pop_first();
            let priority = self.jobs.get(&id).map_or(0, Pending::priority);
            self.ready.insert((Reverse(priority), id));
        }
        self.ready.pop_first().map(|(_, id)| id)
    }

    /// When the next job not taken yet becomes due, Unix ms (`None`: none
    /// waits for its time).
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.not_due.first().map(|&(due, _)| due)
    }

    /// Pending jobs not taken yet by this state (due or not).
    pub(crate) fn untaken(&self) -> usize {
        self.ready.len() + self.not_due.len()
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
            match &job.options {
                None => Record::Job {
                    id,
                    attempts: job.attempts,
                    payload: job.payload.get().as_bytes(),
                }
                .encode(&mut records),
                Some(options) => Record::JobWith {
                    id,
                    attempts: job.attempts,
                    options: &options.encode(),
                    payload: job.payload.get().as_bytes(),
                }
                .encode(&mut records),
            }
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

    fn with(options: JobOptions) -> Option<Arc<JobOptions>> {
        Some(Arc::new(options))
    }

    #[test]
    fn jobs_are_served_by_priority_then_id_once_due() {
        let mut state = State::new();
        state.add(1, raw("1"), 0);
        state.add_with(2, raw("2"), 0, with(JobOptions::new().priority(5)));
        state.add_with(3, raw("3"), 0, with(JobOptions::new().priority(-1)));
        // Due at 100: the best of all then, but not before.
        state.add_with(
            4,
            raw("4"),
            0,
            with(
                JobOptions::new()
                    .priority(9)
                    .resolved(0)
                    .at(std::time::UNIX_EPOCH + std::time::Duration::from_millis(100)),
            ),
        );
        state.add_with(5, raw("5"), 0, with(JobOptions::new().priority(5)));
        assert_eq!(state.next_due_ms(), Some(100));
        assert_eq!(state.take_next(50), Some(2));
        assert_eq!(state.take_next(50), Some(5));
        assert_eq!(state.untaken(), 3);
        assert_eq!(state.take_next(100), Some(4));
        assert_eq!(state.next_due_ms(), None);
        assert_eq!(state.take_next(100), Some(1));
        assert_eq!(state.take_next(100), Some(3));
        assert_eq!(state.take_next(100), None);
    }

    #[test]
    fn unique_keys_are_freed_when_a_job_is_done_or_dead() {
        let mut state = State::new();
        state.add_with(1, raw("1"), 0, with(JobOptions::new().unique("a")));
        state.add_with(2, raw("2"), 0, with(JobOptions::new().unique("b")));
        assert!(state.holds_key("a") && state.holds_key("b"));
        assert_eq!(state.take_next(0), Some(1));
        // Running still holds it.
        assert!(state.holds_key("a"));
        state.apply_change(&Record::Done { id: 1 });
        assert!(!state.holds_key("a"));
        state.apply_change(&Record::Dead {
            id: 2,
            at_ms: 1,
            reason: "x",
        });
        assert!(!state.holds_key("b"));
        assert_eq!(state.take_next(0), None, "a dead job is not served");
    }

    #[test]
    fn options_survive_a_snapshot_and_a_replay() {
        let mut state = State::new();
        let options = JobOptions::new()
            .priority(3)
            .unique("k")
            .retry([std::time::Duration::from_secs(1)])
            .delay(std::time::Duration::from_millis(500))
            .resolved(1000);
        state.add(1, raw("1"), 0);
        state.add_with(2, raw("2"), 1, with(options.clone()));
        let again = replay(&state.snapshot());
        assert_eq!(again.jobs[&2].options.as_deref(), Some(&options));
        assert_eq!(again.jobs[&2].attempts, 1);
        assert!(again.holds_key("k"));
        assert_eq!(again.next_due_ms(), Some(1500));
        assert_eq!(again.live_bytes, state.live_bytes);

        // And from the records a live journal holds.
        let mut records = Vec::new();
        Record::Push {
            id: 1,
            payload: b"1",
        }
        .encode(&mut records);
        Record::PushWith {
            id: 2,
            options: &options.encode(),
            payload: b"2",
        }
        .encode(&mut records);
        let mut frames = Vec::new();
        journal::encode_frame(&records, &mut frames).unwrap();
        let mut again = replay(&frames);
        assert_eq!(again.jobs[&2].options.as_deref(), Some(&options));
        assert_eq!(again.take_next(1499), Some(1));
        assert_eq!(again.take_next(1499), None);
        assert_eq!(again.take_next(1500), Some(2));
    }
}
