//! The binary records of the durable queue's journal.
//!
//! A frame's payload is a run of records, each a tag byte then its fields:
//! unsigned integers as LEB128 varints, byte strings as a varint length
//! then the bytes. Payloads are the job's JSON text as it was added.

/// One change of the durable queue's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// A new job (from the inbox, or pushed back from the dead list).
    Push {
        /// Its id (ids only grow).
        id: u64,
        /// Its JSON text.
        payload: &'a [u8],
    },
    /// A delivery begins: the job's attempt count goes up.
    Attempt {
        /// The job.
        id: u64,
    },
    /// A delivery was handed back untouched: the attempt does not count.
    Unattempt {
        /// The job.
        id: u64,
    },
    /// The job is done: it is deleted.
    Done {
        /// The job.
        id: u64,
    },
    /// The job is given up on: it moves to the dead list.
    Dead {
        /// The job.
        id: u64,
        /// When, in ms since the Unix epoch.
        at_ms: u64,
        /// Why.
        reason: &'a str,
    },
    /// A dead job is deleted (put back under a new id, or purged).
    Forget {
        /// The dead job.
        id: u64,
    },
    /// How far the inbox has been taken in: generation `generation` of the
    /// inbox (the file `<path>.inbox.<generation>`) up to byte `offset`;
    /// for a JSON-lines file taken in instead, `generation` is its inode.
    /// Written in the same frame as the jobs it took in.
    Intake {
        /// The inbox generation.
        generation: u64,
        /// Bytes of it taken in.
        offset: u64,
    },
    /// The head of a compacted journal: the counters.
    Meta {
        /// The next job id.
        next_id: u64,
        /// The intake mark's generation.
        generation: u64,
        /// The intake mark's offset.
        offset: u64,
    },
    /// A pending job of a compacted journal (or a job added as is).
    Job {
        /// Its id.
        id: u64,
        /// Attempts so far.
        attempts: u32,
        /// Its JSON text.
        payload: &'a [u8],
    },
    /// A new job with options (see [`Push`](Record::Push)); the options
    /// as compact JSON (`JobOptions`), a delay already turned into a time.
    PushWith {
        /// Its id.
        id: u64,
        /// Its options.
        options: &'a [u8],
        /// Its JSON text.
        payload: &'a [u8],
    },
    /// A pending job with options of a compacted journal (see
    /// [`Job`](Record::Job)).
    JobWith {
        /// Its id.
        id: u64,
        /// Attempts so far.
        attempts: u32,
        /// Its options.
        options: &'a [u8],
        /// Its JSON text.
        payload: &'a [u8],
    },
    /// A dead job of a compacted journal, or an inbox line that is not a
    /// job (its text as a JSON string, and why).
    Buried {
        /// Its id.
        id: u64,
        /// Attempts made.
        attempts: u32,
        /// When, in ms since the Unix epoch.
        at_ms: u64,
        /// Why.
        reason: &'a str,
        /// Its JSON text.
        payload: &'a [u8],
    },
}

const PUSH: u8 = 1;
const ATTEMPT: u8 = 2;
const UNATTEMPT: u8 = 3;
const DONE: u8 = 4;
const DEAD: u8 = 5;
const FORGET: u8 = 6;
const INTAKE: u8 = 7;
const META: u8 = 8;
const JOB: u8 = 9;
const BURIED: u8 = 10;
const PUSH_WITH: u8 = 11;
const JOB_WITH: u8 = 12;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl Record<'_> {
    /// Appends the record to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Record::Push { id, payload } => {
                out.push(PUSH);
                put_varint(out, id);
                put_bytes(out, payload);
            }
            Record::Attempt { id } => {
                out.push(ATTEMPT);
                put_varint(out, id);
            }
            Record::Unattempt { id } => {
                out.push(UNATTEMPT);
                put_varint(out, id);
            }
            Record::Done { id } => {
                out.push(DONE);
                put_varint(out, id);
            }
            Record::Dead { id, at_ms, reason } => {
                out.push(DEAD);
                put_varint(out, id);
                put_varint(out, at_ms);
                put_bytes(out, reason.as_bytes());
            }
            Record::Forget { id } => {
                out.push(FORGET);
                put_varint(out, id);
            }
            Record::Intake { generation, offset } => {
                out.push(INTAKE);
                put_varint(out, generation);
                put_varint(out, offset);
            }
            Record::Meta {
                next_id,
                generation,
                offset,
            } => {
                out.push(META);
                put_varint(out, next_id);
                put_varint(out, generation);
                put_varint(out, offset);
            }
            Record::Job {
                id,
                attempts,
                payload,
            } => {
                out.push(JOB);
                put_varint(out, id);
                put_varint(out, u64::from(attempts));
                put_bytes(out, payload);
            }
            Record::PushWith {
                id,
                options,
                payload,
            } => {
                out.push(PUSH_WITH);
                put_varint(out, id);
                put_bytes(out, options);
                put_bytes(out, payload);
            }
            Record::JobWith {
                id,
                attempts,
                options,
                payload,
            } => {
                out.push(JOB_WITH);
                put_varint(out, id);
                put_varint(out, u64::from(attempts));
                put_bytes(out, options);
                put_bytes(out, payload);
            }
            Record::Buried {
                id,
                attempts,
                at_ms,
                reason,
                payload,
            } => {
                out.push(BURIED);
                put_varint(out, id);
                put_varint(out, u64::from(attempts));
                put_varint(out, at_ms);
                put_bytes(out, reason.as_bytes());
                put_bytes(out, payload);
            }
        }
    }
}

/// Reads the records of one frame's payload, in order.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over one frame's payload.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        let byte = *self.data.get(self.pos).ok_or("record cut short")?;
        self.pos += 1;
        Ok(byte)
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("number too long")
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        u32::try_from(self.varint()?).map_err(|_| "count out of range")
    }

    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        let end = self.pos.checked_add(len).ok_or("length out of range")?;
        let bytes = self.data.get(self.pos..end).ok_or("record cut short")?;
        self.pos = end;
        Ok(bytes)
    }

    fn text(&mut self) -> Result<&'a str, &'static str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "text is not UTF-8")
    }

    /// The next record, `None` at the end of the payload.
    ///
    /// # Errors
    /// What is wrong with the record (an unknown tag, a field cut short).
    pub(crate) fn next_record(&mut self) -> Result<Option<Record<'a>>, &'static str> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let record = match self.byte()? {
            PUSH => Record::Push {
                id: self.varint()?,
                payload: self.bytes()?,
            },
            ATTEMPT => Record::Attempt { id: self.varint()? },
            UNATTEMPT => Record::Unattempt { id: self.varint()? },
            DONE => Record::Done { id: self.varint()? },
            DEAD => Record::Dead {
                id: self.varint()?,
                at_ms: self.varint()?,
                reason: self.text()?,
            },
            FORGET => Record::Forget { id: self.varint()? },
            INTAKE => Record::Intake {
                generation: self.varint()?,
                offset: self.varint()?,
            },
            META => Record::Meta {
                next_id: self.varint()?,
                generation: self.varint()?,
                offset: self.varint()?,
            },
            JOB => Record::Job {
                id: self.varint()?,
                attempts: self.u32()?,
                payload: self.bytes()?,
            },
            BURIED => Record::Buried {
                id: self.varint()?,
                attempts: self.u32()?,
                at_ms: self.varint()?,
                reason: self.text()?,
                payload: self.bytes()?,
            },
            PUSH_WITH => Record::PushWith {
                id: self.varint()?,
                options: self.bytes()?,
                payload: self.bytes()?,
            },
            JOB_WITH => Record::JobWith {
                id: self.varint()?,
                attempts: self.u32()?,
                options: self.bytes()?,
                payload: self.bytes()?,
            },
            _ => return Err("unknown record type"),
        };
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Push {
                id: 1,
                payload: b"{\"n\":1}",
            },
            Record::Attempt { id: 300 },
            Record::Unattempt { id: 300 },
            Record::Done { id: u64::MAX },
            Record::Dead {
                id: 7,
                at_ms: 1_700_000_000_000,
                reason: "no such file",
            },
            Record::Forget { id: 7 },
            Record::Intake {
                generation: 3,
                offset: 1 << 40,
            },
            Record::Meta {
                next_id: 9,
                generation: 3,
                offset: 12,
            },
            Record::Job {
                id: 8,
                attempts: 2,
                payload: b"[]",
            },
            Record::PushWith {
                id: 10,
                options: b"{\"priority\":3}",
                payload: b"1",
            },
            Record::JobWith {
                id: 11,
                attempts: 1,
                options: b"{}",
                payload: b"2",
            },
            Record::Buried {
                id: 9,
                attempts: 0,
                at_ms: 5,
                reason: "not JSON",
                payload: b"\"x\"",
            },
        ];
        let mut out = Vec::new();
        for record in &records {
            record.encode(&mut out);
        }
        let mut reader = Reader::new(&out);
        for record in &records {
            assert_eq!(reader.next_record().unwrap().as_ref(), Some(record));
        }
        assert_eq!(reader.next_record().unwrap(), None);
    }

    #[test]
    fn a_pending_job_costs_a_few_bytes_beyond_its_payload() {
        let mut out = Vec::new();
        Record::Job {
            id: 1_000_000,
            attempts: 0,
            payload: b"1000000",
        }
        .encode(&mut out);
        // Tag, 3-byte id, attempts, length.
        assert_eq!(out.len(), 7 + 6);
    }

    #[test]
    fn damage_is_named() {
        assert_eq!(Reader::new(&[99]).next_record(), Err("unknown record type"));
        assert_eq!(
            Reader::new(&[PUSH, 1, 5, b'x']).next_record(),
            Err("record cut short")
        );
        assert_eq!(
            Reader::new(&[DONE, 0xff]).next_record(),
            Err("record cut short")
        );
    }
}
