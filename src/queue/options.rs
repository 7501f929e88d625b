//! Per-job options: a delay or a start time, a retry schedule of the
//! job's own, a priority and a unique key.
//!
//! A job carries options in an *envelope*: a JSON object with exactly the
//! two keys `job` (the payload consumers get) and `options`:
//!
//! ```json
//! {"job": {"path": "a.png"}, "options": {"delay": "10s", "priority": 5, "unique": "a.png"}}
//! ```
//!
//! Any other JSON value (an object with other keys too, a number, ...) is
//! a plain job. A plain job that happens to be an object of exactly `job`
//! and `options` is wrapped in an envelope of its own:
//! `{"job": {"job": ..., "options": ...}, "options": {}}`.
//!
//! | option | value | means |
//! | --- | --- | --- |
//! | `delay` | `"10s"`, `"1m 30s"` or ms as a number | not served before this long after it is taken in |
//! | `at` | RFC 3339 (`"2026-12-24T18:00:00Z"`) or Unix ms | not served before then |
//! | `retry` | `["1s", "10s", "1m"]` (or ms numbers) | retried after each delay in turn, then dead |
//! | `retry_every` | `"30s"` or ms | retried at that interval ... |
//! | `retry_until` | RFC 3339 or Unix ms | ... while the retry starts before then |
//! | `priority` | integer, default 0 | higher first (among due jobs) |
//! | `unique` | string | not added while a job with the same key is pending or running |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::protocol::millis;
use crate::retry::RetryPolicy;

/// The options of one job; see the [module docs](self) for the envelope
/// that carries them in JSON.
///
/// ```
/// use std::time::Duration;
/// use taskherd::queue::options::JobOptions;
///
/// let options = JobOptions::new()
///     .delay(Duration::from_secs(10))
///     .retry([Duration::from_secs(1), Duration::from_secs(10)])
///     .priority(5)
///     .unique("image-a.png");
/// assert_eq!(options.priority_value(), 5);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobOptions {
    /// Not served before this long after it is taken in (folded into
    /// `at_ms` when the job is recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    /// Not served before this time, Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    at_ms: Option<u64>,
    /// Its own retry schedule: delays in ms, in turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_ms: Option<Vec<u64>>,
    /// Its own retry interval, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_every_ms: Option<u64>,
    /// Retries start no later than this time, Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_until_ms: Option<u64>,
    /// Higher first.
    #[serde(skip_serializing_if = "is_zero")]
    priority: i64,
    /// Not added while a job with this key is pending or running.
    #[serde(skip_serializing_if = "Option::is_none")]
    unique: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl JobOptions {
    /// No option: served in its turn, the group's retry policy, priority 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Not served before `delay` after it is added.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(millis::of(delay));
        self
    }

    /// Not served before `at`.
    #[must_use]
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at_ms = Some(millis::since_epoch(at));
        self
    }

    /// Its own retry schedule: after a failed attempt it runs again after
    /// each delay in turn, then is dead (`max_attempts` still caps).
    #[must_use]
    pub fn retry(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_ms = Some(delays.into_iter().map(millis::of).collect());
        self
    }

    /// Its own retry interval (until [`retry_until`](Self::retry_until),
    /// or for good: `max_attempts` still caps).
    #[must_use]
    pub fn retry_every(mut self, interval: Duration) -> Self {
        self.retry_every_ms = Some(millis::of(interval));
        self
    }

    /// With [`retry_every`](Self::retry_every): no retry starts after `until`.
    #[must_use]
    pub fn retry_until(mut self, until: SystemTime) -> Self {
        self.retry_until_ms = Some(millis::since_epoch(until));
        self
    }

    /// Its priority: among the jobs due, higher ones are served first
    /// (default 0; negative ones after those).
    #[must_use]
    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }

    /// Its unique key: a job added while another with the same key is
    /// pending or running is not added.
    #[must_use]
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.unique = Some(key.into());
        self
    }

    /// Its priority.
    pub fn priority_value(&self) -> i64 {
        self.priority
    }

    /// Its unique key, if any.
    pub fn unique_key(&self) -> Option<&str> {
        self.unique.as_deref()
    }

    /// When it is due, Unix ms, once resolved.
    pub(crate) fn due_ms(&self) -> Option<u64> {
        self.at_ms
    }

    /// Whether it has no option at all.
    pub fn is_empty(&self) -> bool {
        *self == JobOptions::default()
    }

    /// The same options with a delay turned into a start time counted
    /// from `now_ms` (the later of the two, with `at`).
    #[must_use]
    pub(crate) fn resolved(mut self, now_ms: u64) -> Self {
        if let Some(delay) = self.delay_ms.take() {
            let due = now_ms.saturating_add(delay);
            self.at_ms = Some(self.at_ms.map_or(due, |at| at.max(due)));
        }
        self
    }

    /// What a job on a JetStream queue keeps of these options: its start
    /// time (Unix ms, a delay counted from `now_ms`) and its unique key.
    ///
    /// # Errors
    /// The option a JetStream queue does not take (the group's retry
    /// settings apply there, and jobs run in order): its name.
    #[cfg(all(feature = "nats", feature = "master"))]
    pub(crate) fn jetstream(
        &self,
        now_ms: u64,
    ) -> Result<(Option<u64>, Option<&str>), &'static str> {
        let unsupported = [
            ("retry", self.retry_ms.is_some()),
            ("retry_every", self.retry_every_ms.is_some()),
            ("retry_until", self.retry_until_ms.is_some()),
            ("priority", self.priority != 0),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, given)| *given) {
            return Err(name);
        }
        Ok((self.not_before_ms(now_ms), self.unique.as_deref()))
    }

    /// The same options with a delay turned into a start time counted
    /// from now (what [`FileFeeder::push_with`](super::feeders::FileFeeder::push_with)
    /// does before it writes them).
    #[must_use]
    pub fn resolved_now(self) -> Self {
        self.resolved(millis::now())
    }

    /// When it may run, Unix ms, if it says (its `at`, or its `delay`
    /// counted from `now_ms`: the later of the two). For the feeders that
    /// fill a JetStream queue.
    #[cfg(all(feature = "nats", feature = "master"))]
    pub(crate) fn not_before_ms(&self, now_ms: u64) -> Option<u64> {
        self.clone().resolved(now_ms).at_ms
    }

    /// Its own retry policy, if it has one; `first_attempt_at` is when its
    /// first attempt started (a `retry_until` time is counted from it).
    pub fn retry_policy(&self, first_attempt_at: SystemTime) -> Option<RetryPolicy> {
        if let Some(delays) = &self.retry_ms {
            return Some(RetryPolicy::schedule(
                delays.iter().map(|&ms| Duration::from_millis(ms)),
            ));
        }
        let every = Duration::from_millis(self.retry_every_ms?);
        let until = match self.retry_until_ms {
            Some(until) => UNIX_EPOCH
                .checked_add(Duration::from_millis(until))
                .and_then(|until| until.duration_since(first_attempt_at).ok())
                .unwrap_or(Duration::ZERO),
            None => Duration::MAX,
        };
        Some(RetryPolicy::every(every, until))
    }

    /// The options as an envelope's `options` object (the JSON form).
    pub fn to_json(&self) -> Value {
        let mut map = serde_json::Map::new();
        if let Some(ms) = self.delay_ms {
            map.insert("delay".into(), ms.into());
        }
        if let Some(ms) = self.at_ms {
            map.insert("at".into(), ms.into());
        }
        if let Some(delays) = &self.retry_ms {
            map.insert("retry".into(), delays.clone().into());
        }
        if let Some(ms) = self.retry_every_ms {
            map.insert("retry_every".into(), ms.into());
        }
        if let Some(ms) = self.retry_until_ms {
            map.insert("retry_until".into(), ms.into());
        }
        if self.priority != 0 {
            map.insert("priority".into(), self.priority.into());
        }
        if let Some(key) = &self.unique {
            map.insert("unique".into(), key.clone().into());
        }
        Value::Object(map)
    }

    /// Reads an envelope's `options` object.
    ///
    /// # Errors
    /// What is wrong, naming the option (`option "delay": ...`).
    pub fn from_json(value: &Value) -> Result<JobOptions, String> {
        let Value::Object(map) = value else {
            return Err("\"options\" is not an object".into());
        };
        let mut options = JobOptions::default();
        for (key, value) in map {
            let named = |why: String| format!("option \"{key}\": {why}");
            match key.as_str() {
                "delay" => options.delay_ms = Some(duration_ms(value).map_err(named)?),
                "at" => options.at_ms = Some(time_ms(value).map_err(named)?),
                "retry" => {
                    let Value::Array(items) = value else {
                        return Err(named("not a list of delays".into()));
                    };
                    let delays = items
                        .iter()
                        .map(duration_ms)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(named)?;
                    options.retry_ms = Some(delays);
                }
                "retry_every" => options.retry_every_ms = Some(duration_ms(value).map_err(named)?),
                "retry_until" => options.retry_until_ms = Some(time_ms(value).map_err(named)?),
                "priority" => {
                    options.priority = value
                        .as_i64()
                        .ok_or_else(|| named(format!("{value} is not an integer")))?;
                }
                "unique" => match value {
                    Value::String(key) => options.unique = Some(key.clone()),
                    other => return Err(named(format!("{other} is not a string"))),
                },
                _ => return Err(format!("unknown option \"{key}\"")),
            }
        }
        if options.retry_until_ms.is_some() && options.retry_every_ms.is_none() {
            return Err("option \"retry_until\" needs \"retry_every\"".into());
        }
        if options.retry_ms.is_some() && options.retry_every_ms.is_some() {
            return Err("options \"retry\" and \"retry_every\" exclude each other".into());
        }
        Ok(options)
    }

    /// The options as the journal keeps them (compact JSON).
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads options the journal kept.
    pub(crate) fn decode(bytes: &[u8]) -> Option<JobOptions> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A duration: `"10s"`, `"1m 30s"`, `"250ms"` or ms as a number.
///
/// # Errors
/// What is wrong with it.
pub fn duration_ms(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a number of milliseconds")),
        Value::String(text) => parse_duration(text).map(millis::of),
        other => Err(format!("{other} is not a duration (\"10s\" or ms)")),
    }
}

/// A duration written like `10s`, `1m 30s`, `250ms`.
///
/// # Errors
/// What is wrong with it.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("\"{text}\" is not a duration: {err}"))
}

/// A time: RFC 3339 text or Unix ms as a number.
///
/// # Errors
/// What is wrong with it.
pub fn time_ms(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a Unix time in ms")),
        Value::String(text) => parse_time(text).map(millis::since_epoch),
        other => Err(format!("{other} is not a time (RFC 3339 or Unix ms)")),
    }
}

/// A time written in RFC 3339 (`2026-12-24T18:00:00Z`).
///
/// # Errors
/// What is wrong with it.
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim())
        .map_err(|err| format!("\"{text}\" is not an RFC 3339 time: {err}"))
}

/// The two parts of an envelope, borrowed from its text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    job: &'a RawValue,
    #[serde(borrow)]
    options: &'a RawValue,
}

/// Splits a job's JSON text: an envelope gives its job and options, any
/// other value is a plain job (`Ok(None)`).
///
/// # Errors
/// An envelope whose options are wrong: the reason names the option.
pub fn split_envelope(text: &str) -> Result<Option<(Box<RawValue>, JobOptions)>, String> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') || !text.contains("\"options\"") {
        return Ok(None);
    }
    let Ok(envelope) = serde_json::from_str::<Envelope<'_>>(text) else {
        return Ok(None);
    };
    let options: Value = serde_json::from_str(envelope.options.get())
        .map_err(|err| format!("\"options\" is not JSON: {err}"))?;
    let options = JobOptions::from_json(&options)?;
    Ok(Some((envelope.job.to_owned(), options)))
}

/// The JSON text of an envelope of `job` with `options`.
///
/// # Errors
/// A payload that cannot be written as JSON.
pub fn envelope_text(job: &RawValue, options: &JobOptions) -> serde_json::Result<String> {
    let options = serde_json::to_string(&options.to_json())?;
    Ok(format!("{{\"job\":{},\"options\":{options}}}", job.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_told_from_plain_jobs() {
        assert!(split_envelope("1").unwrap().is_none());
        assert!(split_envelope(r#"{"job": 1}"#).unwrap().is_none());
        assert!(split_envelope(r#"{"job": 1, "options": {}, "x": 2}"#)
            .unwrap()
            .is_none());
        let (job, options) =
            split_envelope(r#"{"job": {"a": 1}, "options": {"delay": "10s", "at": "2026-01-01T00:00:00Z", "retry": ["1s", 500], "priority": -3, "unique": "k"}}"#)
                .unwrap()
                .unwrap();
        assert_eq!(job.get(), r#"{"a": 1}"#);
        assert_eq!(options.delay_ms, Some(10_000));
        assert_eq!(options.at_ms, Some(1_767_225_600_000));
        assert_eq!(options.retry_ms, Some(vec![1000, 500]));
        assert_eq!(options.priority, -3);
        assert_eq!(options.unique_key(), Some("k"));
        // A plain job shaped like an envelope travels wrapped.
        let inner = r#"{"job":1,"options":{}}"#;
        let wrapped = envelope_text(
            &RawValue::from_string(inner.into()).unwrap(),
            &JobOptions::new(),
        )
        .unwrap();
        let (job, options) = split_envelope(&wrapped).unwrap().unwrap();
        assert_eq!(job.get(), inner);
        assert!(options.is_empty());
    }

    #[test]
    fn a_bad_option_is_named() {
        let err = |text: &str| split_envelope(text).unwrap_err();
        assert!(err(r#"{"job":1,"options":{"delay":"soon"}}"#).contains("option \"delay\""));
        assert!(err(r#"{"job":1,"options":{"at":"tomorrow"}}"#).contains("option \"at\""));
        assert!(err(r#"{"job":1,"options":{"priority":1.5}}"#).contains("option \"priority\""));
        assert!(err(r#"{"job":1,"options":{"colour":1}}"#).contains("unknown option \"colour\""));
        assert!(err(r#"{"job":1,"options":{"retry_until":5}}"#).contains("retry_every"));
        assert!(err(r#"{"job":1,"options":7}"#).contains("not an object"));
    }

    #[test]
    fn a_delay_becomes_a_start_time_and_retry_options_a_policy() {
        let options = JobOptions::new()
            .delay(Duration::from_secs(2))
            .resolved(1000);
        assert_eq!(options.due_ms(), Some(3000));
        let t0 = UNIX_EPOCH + Duration::from_secs(100);
        let every = JobOptions::new()
            .retry_every(Duration::from_secs(10))
            .retry_until(t0 + Duration::from_secs(25));
        assert_eq!(
            every.retry_policy(t0),
            Some(RetryPolicy::every(
                Duration::from_secs(10),
                Duration::from_secs(25)
            ))
        );
        assert_eq!(JobOptions::new().retry_policy(t0), None);
        let stored = JobOptions::new().priority(2).unique("u").resolved(5);
        assert_eq!(JobOptions::decode(&stored.encode()), Some(stored));
    }
}
