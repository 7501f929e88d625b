//! The link between a feeder and its consumers: TCP, the common codec.
//!
//! 1. The feeder speaks first: [`ToConsumer::Challenge`] with a random
//!    nonce.
//! 2. The consumer answers [`ToFeeder::Hello`] with its proof
//!    (HMAC-SHA256 of the feeder's nonce under the per-run secret, see
//!    [`proof`]) and a nonce of its own; the secret never travels.
//! 3. The feeder checks the proof and answers [`ToConsumer::Welcome`] with
//!    its own proof over the consumer's nonce, or [`ToConsumer::Refused`]
//!    and closes.
//! 4. The consumer grants credits ([`ToFeeder::Credit`]); each
//!    [`ToConsumer::Job`] uses one. Each job is leased: the lease ends with
//!    [`ToFeeder::Ack`], [`ToFeeder::Retry`] or [`ToFeeder::Dead`]; a
//!    consumer that goes away or lets its lease expire has the job
//!    redelivered to another one, and its late answer is refused
//!    ([`ToConsumer::Stale`]). An outcome does not give the credit back:
//!    the consumer grants a new one when a slot frees up, so the feeder
//!    never has more jobs out to a consumer than it was granted.
//! 5. Both sides send heartbeats; [`ToFeeder::SlowDown`] and
//!    [`ToFeeder::Pause`] ask the feeder's governor to lower its rate.
//! 6. At stop the feeder sends [`ToConsumer::Drain`]: consumers finish or
//!    hand back ([`ToFeeder::Release`]) what they hold, then say
//!    [`ToFeeder::Bye`].

use crate::error_text::hex;
use hmac::{Hmac, Mac};
use serde::de::{DeserializeOwned, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Frames from the feeder to a consumer.
///
/// Its serde form is the wire's: a JSON object tagged by `type`. The
/// payload of a [`ToConsumer::Job`] is written as it is (the text of its
/// [`JobPayload`]) and read as it came, so it is neither rewritten by the
/// feeder nor decoded twice by the consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// `remote = "Self"`: the derived code becomes `ToConsumer::serialize` and
// `ToConsumer::deserialize`, which the trait impls below wrap.
#[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToConsumer {
    /// First frame: prove you know the secret.
    Challenge {
        /// [`super::PROTOCOL_VERSION`] of the feeder.
        version: u32,
        /// Random, hex.
        nonce: String,
    },
    /// The consumer is in.
    Welcome {
        /// The feeder's proof over the consumer's nonce.
        proof: String,
        /// Lease time of every job, so the consumer can tell a job it is
        /// too late for.
        #[serde(with = "super::millis")]
        lease: Duration,
        /// The feeder will confirm durable outcomes ([`ToConsumer::Settled`]):
        /// it keeps its jobs on disk and the consumer asked for it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        settles: bool,
        /// The feeder takes [`ToFeeder::Extend`]: the consumer listed
        /// [`FEATURE_EXTEND`] in its Hello and the feeder knows the frame.
        /// A consumer sends no Extend to a feeder that does not say so.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        extends: bool,
        /// The feeder keeps a joblog: send [`OutcomeMeta`] with every
        /// outcome (`meta` of [`ToFeeder::Ack`], [`ToFeeder::Retry`] and
        /// [`ToFeeder::Dead`]). Without it a consumer sends none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        meta: bool,
    },
    /// The consumer is not in (bad proof, version); the link closes.
    Refused {
        /// Why.
        reason: String,
    },
    /// A job, leased to this consumer.
    Job {
        /// The lease, named in the outcome.
        lease: u64,
        /// The job's id, stable across attempts.
        id: u64,
        /// Attempts so far, this one included (1 on first delivery).
        attempt: u32,
        /// The job itself, as JSON.
        payload: JobPayload,
    },
    /// An outcome came for a lease that is no longer this consumer's (it
    /// expired and the job went elsewhere): it was ignored.
    Stale {
        /// The lease named in the outcome.
        lease: u64,
    },
    /// The final outcomes (Ack, Dead) of these leases are recorded durably:
    /// those jobs will never be served again. Sent by feeders that keep
    /// their jobs on disk, once the sync covering the outcomes is done, to
    /// consumers that listed [`FEATURE_SETTLED`] in their Hello.
    Settled {
        /// The leases named in the outcomes.
        leases: Vec<u64>,
    },
    /// The feeder is stopping: finish or release what you hold, then Bye.
    Drain,
    /// "I am still here".
    Heartbeat,
}

impl Serialize for ToConsumer {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ToConsumer::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for ToConsumer {
    /// Reads the frame as raw JSON, then as [`ToConsumer::from_json`]
    /// does: a Job keeps its payload as it came.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        ToConsumer::from_json(raw.get().as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// A [`ToConsumer::Job`] as it is read, its payload kept raw.
#[derive(Deserialize)]
struct JobFrame {
    /// Always `job`.
    #[serde(rename = "type")]
    _type: JobTag,
    lease: u64,
    id: u64,
    attempt: u32,
    payload: Box<RawValue>,
}

/// The tag of a Job frame, and only that one.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum JobTag {
    Job,
}

/// The tag of any frame.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    tag: Option<Cow<'a, str>>,
}

impl ToConsumer {
    /// Decodes one frame body. A Job is read straight into its fields
    /// with its payload kept as it came (the feeder puts `type` first, so
    /// any other frame is told apart at its first field); the others
    /// through their serde derive.
    ///
    /// # Errors
    /// serde's, for a body that is not JSON or not a frame of this enum.
    pub fn from_json(body: &[u8]) -> Result<ToConsumer, serde_json::Error> {
        let job_error = match serde_json::from_slice::<JobFrame>(body) {
            Ok(job) => {
                return Ok(ToConsumer::Job {
                    lease: job.lease,
                    id: job.id,
                    attempt: job.attempt,
                    payload: JobPayload::from(job.payload),
                })
            }
            Err(err) => err,
        };
        let is_job = serde_json::from_slice::<Tag<'_>>(body)
            .is_ok_and(|tag| tag.tag.as_deref() == Some("job"));
        if is_job {
            return Err(job_error);
        }
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let frame = ToConsumer::deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(frame)
    }
}

/// A job as JSON, the payload of a [`ToConsumer::Job`]: the text the
/// feeder encoded, once per job, shared by its deliveries. It is written
/// to the wire as it is and decoded by the consumer once, into its own
/// job type ([`JobPayload::decode`]).
///
/// ```
/// use taskherd::protocol::queue::JobPayload;
/// let payload = JobPayload::encode(&vec![1, 2])?;
/// assert_eq!(payload.get(), "[1,2]");
/// assert_eq!(payload.decode::<Vec<u32>>()?, [1, 2]);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone)]
pub struct JobPayload(Arc<RawValue>);

impl JobPayload {
    /// Encodes a job as JSON.
    ///
    /// # Errors
    /// serde's, for a job that JSON cannot carry (a map whose keys are not
    /// strings, a failing `Serialize` impl).
    pub fn encode<J: Serialize + ?Sized>(job: &J) -> Result<JobPayload, serde_json::Error> {
        serde_json::value::to_raw_value(job).map(JobPayload::from)
    }

    /// The JSON text, as the feeder encoded it.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Decodes the job into the consumer's type.
    ///
    /// # Errors
    /// serde's, for a job that does not fit `J`.
    pub fn decode<J: DeserializeOwned>(&self) -> Result<J, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl From<Box<RawValue>> for JobPayload {
    /// Takes JSON text that is known valid as it is.
    fn from(raw: Box<RawValue>) -> JobPayload {
        JobPayload(Arc::from(raw))
    }
}

impl PartialEq for JobPayload {
    /// The same text.
    fn eq(&self, other: &JobPayload) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for JobPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JobPayload").field(&self.get()).finish()
    }
}

impl Serialize for JobPayload {
    /// The text as it is.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JobPayload {
    /// The text as it is (like [`RawValue`], this needs the JSON itself:
    /// it does not work inside buffered input such as an internally
    /// tagged enum; [`ToConsumer`] reads its jobs without that).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(JobPayload::from)
    }
}

/// Frames from a consumer to the feeder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToFeeder {
    /// Answer to the challenge.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the consumer.
        version: u32,
        /// Who is asking, for the feeder's log (`group/id@host`).
        name: String,
        /// HMAC-SHA256 of the feeder's nonce under the secret, hex.
        proof: String,
        /// Random, hex: the feeder proves itself over it.
        nonce: String,
        /// Optional frames the consumer understands ([`FEATURE_SETTLED`])
        /// or may send ([`FEATURE_EXTEND`]); a feeder sends none of those
        /// to a consumer that did not list it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Room for `n` more jobs.
    Credit {
        /// How many.
        n: u32,
    },
    /// The job is done.
    Ack {
        /// Its lease.
        lease: u64,
        /// How the run went, for the feeder's joblog (only when the
        /// feeder asked for it in its Welcome; feeders that do not know
        /// the field ignore it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<OutcomeMeta>,
    },
    /// The job failed; run it again later (after `delay`, or per the
    /// feeder's retry policy when `None`).
    Retry {
        /// Its lease.
        lease: u64,
        /// Wanted delay.
        #[serde(default, with = "super::millis::option")]
        delay: Option<Duration>,
        /// What went wrong, for the feeder's error hook and log.
        reason: String,
        /// How the run went (see [`ToFeeder::Ack`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<OutcomeMeta>,
    },
    /// The job can never succeed: dead-letter it.
    Dead {
        /// Its lease.
        lease: u64,
        /// Why.
        reason: String,
        /// How the run went (see [`ToFeeder::Ack`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<OutcomeMeta>,
    },
    /// The job is still being worked on: its lease starts again, for the
    /// feeder's whole lease time from now. Sent only to feeders that said
    /// so in their Welcome (`extends`); an Extend for a lease that is not
    /// this consumer's (any more) changes nothing.
    Extend {
        /// Its lease.
        lease: u64,
    },
    /// Hand the job back untouched (not an attempt): at stop.
    Release {
        /// Its lease.
        lease: u64,
    },
    /// The consumer is overloaded: the feeder lowers its rate.
    SlowDown,
    /// Send nothing for this long.
    Pause {
        /// How long.
        #[serde(with = "super::millis")]
        duration: Duration,
    },
    /// The consumer leaves cleanly (nothing held any more).
    Bye,
    /// "I am still here".
    Heartbeat,
}

/// The feature a consumer lists in its Hello to be sent
/// [`ToConsumer::Settled`].
pub const FEATURE_SETTLED: &str = "settled";

/// What a consumer observed about one run of a job, sent with its
/// outcome to a feeder that keeps a joblog ([`ToConsumer::Welcome`]
/// `meta`). Every field is optional: a consumer fills in what it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OutcomeMeta {
    /// The consumer's host, as the master names it (`localhost` for a
    /// local instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The consumer instance's global id (`TASKHERD_ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// When the run started on the consumer, Unix time in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    /// How long the run took, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The exit status of the job's process (exec consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
    /// The signal that killed the job's process (exec consumers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// The feature a consumer lists in its Hello when it may send
/// [`ToFeeder::Extend`]; a feeder that takes it says so in its Welcome
/// (`extends`).
pub const FEATURE_EXTEND: &str = "extend";

/// Proof of the secret over a nonce: HMAC-SHA256, hex.
pub fn proof(secret: &str, nonce: &str) -> String {
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(nonce.as_bytes());
            hex(&mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => String::new(),
    }
}

/// Checks a proof in constant time.
pub fn verify(secret: &str, nonce: &str, proof: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(nonce.as_bytes());
    match unhex(proof) {
        Some(bytes) => mac.verify_slice(&bytes).is_ok(),
        None => false,
    }
}

/// `n` random bytes, hex: nonces and per-run secrets.
///
/// # Errors
/// If the system has no randomness to give.
pub fn random_hex(n: usize) -> Result<String, std::io::Error> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|err| std::io::Error::other(err.to_string()))?;
    Ok(hex(&bytes))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_secret() {
        let p = proof("s3cret", "abcd");
        assert!(verify("s3cret", "abcd", &p));
        assert!(!verify("other", "abcd", &p));
        assert!(!verify("s3cret", "abce", &p));
        assert!(!verify("s3cret", "abcd", "zz"));
    }

    #[test]
    fn random_hex_is_random() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16).unwrap());
    }

    #[test]
    fn frames_round_trip() {
        let frame = ToFeeder::Retry {
            lease: 3,
            delay: Some(Duration::from_millis(250)),
            reason: "busy".into(),
            meta: None,
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(serde_json::from_str::<ToFeeder>(&text).unwrap(), frame);
    }

    #[test]
    fn outcome_meta_is_optional_both_ways() {
        // A frame of an older consumer, without meta, still decodes.
        let old: ToFeeder = serde_json::from_str(r#"{"type":"ack","lease":4}"#).unwrap();
        assert_eq!(
            old,
            ToFeeder::Ack {
                lease: 4,
                meta: None
            }
        );
        let old: ToFeeder =
            serde_json::from_str(r#"{"type":"dead","lease":5,"reason":"no"}"#).unwrap();
        assert_eq!(
            old,
            ToFeeder::Dead {
                lease: 5,
                reason: "no".into(),
                meta: None
            }
        );
        // Without meta, the frame is what it always was.
        let text = serde_json::to_string(&ToFeeder::Ack {
            lease: 4,
            meta: None,
        })
        .unwrap();
        assert_eq!(text, r#"{"type":"ack","lease":4}"#);
        // With it, an older feeder (that knows no `meta`) reads the frame
        // all the same: serde skips fields it does not know.
        let meta = OutcomeMeta {
            host: Some("web1".into()),
            instance: Some(3),
            start_ms: Some(1_700_000_000_000),
            duration_ms: Some(42),
            exit: Some(65),
            signal: None,
        };
        let frame = ToFeeder::Retry {
            lease: 6,
            delay: None,
            reason: "exit status 65".into(),
            meta: Some(meta.clone()),
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert!(
            text.contains(r#""meta":{"host":"web1","instance":3,"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<ToFeeder>(&text).unwrap(), frame);
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum OldToFeeder {
            Retry { lease: u64, reason: String },
        }
        assert_eq!(
            serde_json::from_str::<OldToFeeder>(&text).unwrap(),
            OldToFeeder::Retry {
                lease: 6,
                reason: "exit status 65".into()
            }
        );
        // An old Welcome has no meta flag: no meta is sent then.
        let welcome: ToConsumer =
            serde_json::from_str(r#"{"type":"welcome","proof":"ab","lease":1000}"#).unwrap();
        assert!(matches!(welcome, ToConsumer::Welcome { meta: false, .. }));
    }

    #[test]
    fn job_frames_have_the_wire_s_shape_and_keep_their_payload_as_it_came() {
        // A payload as a feeder may hold it: its own spacing and key order.
        let raw = r#"{"b": [1, "x"], "a":{}}"#;
        let payload = JobPayload::from(RawValue::from_string(raw.to_string()).unwrap());
        let frame = ToConsumer::Job {
            lease: 7,
            id: 3,
            attempt: 2,
            payload,
        };
        let text = serde_json::to_string(&frame).unwrap();
        // The shape every consumer parses (what the feeder used to write by
        // hand), the payload spliced in as it is.
        assert_eq!(
            text,
            format!(r#"{{"type":"job","lease":7,"id":3,"attempt":2,"payload":{raw}}}"#)
        );
        let read = [
            ToConsumer::from_json(text.as_bytes()).unwrap(),
            serde_json::from_str::<ToConsumer>(&text).unwrap(),
            crate::protocol::decode::<ToConsumer>(text.as_bytes()).unwrap(),
        ];
        for read in read {
            assert_eq!(read, frame);
            let ToConsumer::Job { payload, .. } = read else {
                panic!("a job")
            };
            assert_eq!(payload.get(), raw, "kept as it came");
            assert_eq!(
                payload.decode::<serde_json::Value>().unwrap(),
                serde_json::json!({"a": {}, "b": [1, "x"]})
            );
        }
        // Another feeder's field order reads the same.
        let reordered = format!(r#"{{"payload":{raw},"attempt":2,"id":3,"lease":7,"type":"job"}}"#);
        assert_eq!(ToConsumer::from_json(reordered.as_bytes()).unwrap(), frame);
        // The other frames are serde's, both ways.
        assert_eq!(
            serde_json::to_string(&ToConsumer::Stale { lease: 9 }).unwrap(),
            r#"{"type":"stale","lease":9}"#
        );
        for frame in [
            ToConsumer::Challenge {
                version: 1,
                nonce: "ab".into(),
            },
            ToConsumer::Welcome {
                proof: "cd".into(),
                lease: Duration::from_secs(30),
                settles: true,
                extends: false,
                meta: true,
            },
            ToConsumer::Refused {
                reason: "no".into(),
            },
            ToConsumer::Stale { lease: 9 },
            ToConsumer::Settled { leases: vec![1, 2] },
            ToConsumer::Drain,
            ToConsumer::Heartbeat,
        ] {
            let text = serde_json::to_string(&frame).unwrap();
            assert_eq!(ToConsumer::from_json(text.as_bytes()).unwrap(), frame);
            assert_eq!(serde_json::from_str::<ToConsumer>(&text).unwrap(), frame);
        }
    }

    #[test]
    fn a_bad_job_frame_says_what_is_wrong() {
        use crate::protocol::{decode, ProtocolError};
        let cause = |err: ProtocolError| match err {
            ProtocolError::UnexpectedMessage { source, .. } => source.to_string(),
            other => panic!("expected an unexpected message, got {other}"),
        };
        let err = decode::<ToConsumer>(br#"{"type":"job","lease":1,"id":2,"payload":3}"#);
        assert!(cause(err.unwrap_err()).contains("missing field `attempt`"));
        let err = decode::<ToConsumer>(br#"{"type":"launch"}"#);
        assert!(cause(err.unwrap_err()).contains("unknown variant `launch`"));
        let err = decode::<ToConsumer>(br#"{"lease":1}"#);
        assert!(cause(err.unwrap_err()).contains("missing field `type`"));
        let err = decode::<ToConsumer>(b"\x00\x01garbage").unwrap_err();
        assert!(matches!(err, ProtocolError::Corrupt { .. }), "{err}");
    }
}
