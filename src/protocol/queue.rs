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
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::Duration;

/// Frames from the feeder to a consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
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
        /// The job itself.
        payload: serde_json::Value,
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
}
