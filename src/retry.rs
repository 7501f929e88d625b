//! Retry policies: when a failed job runs again, and when it is given up.
//!
//! The semantics come from async-caller: a delay before the first run, a
//! retry schedule (a list of delays), a retry interval until a stop time,
//! exponential backoff up to a number of attempts, and an at-most-once mode
//! (the job is acknowledged before it runs, so it is never run twice).
//!
//! Everything here is pure: [`RetryPolicy::next`] takes the clock and the
//! randomness as arguments, so the schedule is tested without waiting. The
//! same types are used by the local worker ([`crate::callback`]) and by the
//! TCP job queue.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use taskherd::retry::{Decision, RetryPolicy};
//!
//! let policy = RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60), 3)
//!     .with_jitter(0.0);
//! let t0 = SystemTime::UNIX_EPOCH;
//! // After the first failed attempt: retry in 1 s, then 2 s, then give up.
//! assert_eq!(policy.next(1, t0, t0, None, 0.5), Decision::RetryAt(t0 + Duration::from_secs(1)));
//! assert_eq!(policy.next(2, t0, t0, None, 0.5), Decision::RetryAt(t0 + Duration::from_secs(2)));
//! assert!(matches!(policy.next(3, t0, t0, None, 0.5), Decision::GiveUp(_)));
//! ```

use crate::backoff::{Backoff, Cap};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// How one run of a job ended, as reported by its handler.
///
/// On the wire (externally tagged, durations in milliseconds): `"done"`,
/// `{"retry": 1500}`, `{"retry": null}`, `{"dead": "reason"}`.
///
/// ```
/// use std::time::Duration;
/// use taskherd::retry::Outcome;
///
/// let retry = Outcome::Retry(Some(Duration::from_millis(1500)));
/// assert_eq!(serde_json::to_string(&retry).unwrap(), r#"{"retry":1500}"#);
/// assert_eq!(serde_json::to_string(&Outcome::Done).unwrap(), r#""done""#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The job succeeded: acknowledge it.
    Done,
    /// The job failed and may succeed later. `Some(delay)` asks for that
    /// delay (see [`RetryPolicy::next`] for how the policy bounds it);
    /// `None` lets the policy decide.
    Retry(#[serde(with = "crate::protocol::millis::option")] Option<Duration>),
    /// The job can never succeed (bad input, ...): bury it. The text says
    /// why, for the log and the dead letter.
    Dead(String),
}

impl Outcome {
    /// Whether this outcome is [`Outcome::Done`].
    ///
    /// ```
    /// use taskherd::retry::Outcome;
    /// assert!(Outcome::Done.is_done());
    /// assert!(!Outcome::Dead("bad input".into()).is_done());
    /// ```
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done)
    }
}

/// What follows a failed attempt, as decided by [`RetryPolicy::next`].
///
/// (An instance's restart is decided by `supervise::restart`'s own
/// `Decision`: it has more cases and no wall-clock time.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the job again at this time.
    RetryAt(SystemTime),
    /// Do not run it again; the text says why (for the log and the dead
    /// letter).
    GiveUp(String),
}

impl Decision {
    /// The delay from `now` until the retry (zero if the time has passed),
    /// or `None` for [`Decision::GiveUp`].
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use taskherd::retry::Decision;
    ///
    /// let now = SystemTime::UNIX_EPOCH;
    /// let at = Decision::RetryAt(now + Duration::from_secs(3));
    /// assert_eq!(at.delay_from(now), Some(Duration::from_secs(3)));
    /// assert_eq!(Decision::GiveUp("no".into()).delay_from(now), None);
    /// ```
    pub fn delay_from(&self, now: SystemTime) -> Option<Duration> {
        match self {
            Decision::RetryAt(at) => Some(at.duration_since(now).unwrap_or(Duration::ZERO)),
            Decision::GiveUp(_) => None,
        }
    }
}

/// When retries happen, after a failed attempt.
///
/// On the wire (externally tagged, durations in milliseconds): `"never"`,
/// `{"fixed": [1000, 5000]}`, `{"every": {"interval": 1000, "until": 60000}}`,
/// `{"exponential": {"initial": 1000, "max": 300000, "factor": 2.0,
/// "max_attempts": 5, "jitter": 0.1}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Never retry: the first failure is final.
    Never,
    /// Retry after each of these delays in turn: the first delay follows
    /// attempt 1, the second attempt 2, and so on; when the list is used up
    /// the job is given up. `Fixed(vec![a, b])` allows 3 attempts.
    Fixed(#[serde(with = "millis_vec")] Vec<Duration>),
    /// Retry every `interval` as long as the retry starts no later than
    /// `until` after the first attempt started.
    ///
    /// `until` is an elapsed time, not a wall-clock time, so that one policy
    /// serves every job (an absolute stop time would tie the policy to a
    /// single job); "stop at 18:00" is `until = 18:00 - first attempt`.
    Every {
        /// Delay between the end of an attempt and the next one.
        #[serde(with = "crate::protocol::millis")]
        interval: Duration,
        /// Latest start of a retry, counted from the start of the first
        /// attempt.
        #[serde(with = "crate::protocol::millis")]
        until: Duration,
    },
    /// Exponential backoff: after attempt `n` wait `initial * factor^(n-1)`,
    /// capped at `max`, spread by ±`jitter`; give up after `max_attempts`
    /// attempts in all.
    Exponential {
        /// Delay after the first attempt.
        #[serde(with = "crate::protocol::millis")]
        initial: Duration,
        /// Hard cap on any delay, jitter included.
        #[serde(with = "crate::protocol::millis")]
        max: Duration,
        /// Growth of the delay per attempt (2.0 doubles it). Values below
        /// 1.0 are treated as 1.0 (a constant delay).
        factor: f64,
        /// Attempts in all, the first one included; 0 and 1 both mean "no
        /// retry".
        max_attempts: u32,
        /// Relative spread of each delay, in [0, 1]: 0.1 means ±10 %. It
        /// keeps failed jobs from retrying in lockstep.
        jitter: f64,
    },
}

/// How a job is retried: delay before the first run, retry schedule,
/// at-most-once mode.
///
/// Serialized with durations in milliseconds; missing fields take their
/// [`Default`] values.
///
/// ```
/// use std::time::Duration;
/// use taskherd::retry::RetryPolicy;
///
/// // Runs 10 s after it is queued; retried 1 s, 10 s and 1 min after
/// // failures; given up after the 4th attempt.
/// let policy = RetryPolicy::schedule([
///     Duration::from_secs(1),
///     Duration::from_secs(10),
///     Duration::from_secs(60),
/// ])
/// .with_first_delay(Duration::from_secs(10));
/// let json = serde_json::to_string(&policy).unwrap();
/// assert_eq!(
///     json,
///     r#"{"first_delay":10000,"schedule":{"fixed":[1000,10000,60000]},"at_most_once":false}"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Delay between queuing a job and its first run, applied by whoever
    /// enqueues the job (the worker's push helper, the feeder).
    #[serde(with = "crate::protocol::millis")]
    pub first_delay: Duration,
    /// When failed attempts are retried.
    pub schedule: Schedule,
    /// Acknowledge the job before running it: it runs at most once, and is
    /// never retried, whatever its outcome.
    pub at_most_once: bool,
}

impl Default for RetryPolicy {
    /// Exponential backoff from 1 s to 5 min by doubling, 5 attempts in
    /// all, ±10 % jitter; no first delay; at-least-once.
    fn default() -> Self {
        RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(300), 5)
    }
}

impl RetryPolicy {
    /// Exponential backoff: `initial`, doubling, capped at `max`, with
    /// `max_attempts` attempts in all and ±10 % jitter (change it with
    /// [`with_jitter`](Self::with_jitter)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::retry::RetryPolicy;
    /// let policy = RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(30), 8);
    /// assert!(!policy.at_most_once);
    /// ```
    pub fn exponential(initial: Duration, max: Duration, max_attempts: u32) -> Self {
        RetryPolicy {
            first_delay: Duration::ZERO,
            schedule: Schedule::Exponential {
                initial,
                max,
                factor: 2.0,
                max_attempts,
                jitter: 0.1,
            },
            at_most_once: false,
        }
    }

    /// Retry after each of these delays in turn, then give up.
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::retry::{RetryPolicy, Schedule};
    /// let policy = RetryPolicy::schedule([Duration::from_secs(1), Duration::from_secs(5)]);
    /// assert_eq!(
    ///     policy.schedule,
    ///     Schedule::Fixed(vec![Duration::from_secs(1), Duration::from_secs(5)])
    /// );
    /// ```
    pub fn schedule(delays: impl IntoIterator<Item = Duration>) -> Self {
        RetryPolicy {
            first_delay: Duration::ZERO,
            schedule: Schedule::Fixed(delays.into_iter().collect()),
            at_most_once: false,
        }
    }

    /// Retry every `interval` while the retry starts within `until` of the
    /// first attempt.
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::retry::RetryPolicy;
    /// // Every 30 s for an hour.
    /// let policy = RetryPolicy::every(Duration::from_secs(30), Duration::from_secs(3600));
    /// # let _ = policy;
    /// ```
    pub fn every(interval: Duration, until: Duration) -> Self {
        RetryPolicy {
            first_delay: Duration::ZERO,
            schedule: Schedule::Every { interval, until },
            at_most_once: false,
        }
    }

    /// Never retry: a failure is final (the job is still acknowledged only
    /// after it ran; see [`at_most_once`](Self::at_most_once) for the
    /// other way round).
    ///
    /// ```
    /// use taskherd::retry::{RetryPolicy, Schedule};
    /// assert_eq!(RetryPolicy::none().schedule, Schedule::Never);
    /// ```
    pub fn none() -> Self {
        RetryPolicy {
            first_delay: Duration::ZERO,
            schedule: Schedule::Never,
            at_most_once: false,
        }
    }

    /// The same policy with a delay before the first run.
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::retry::RetryPolicy;
    /// let policy = RetryPolicy::none().with_first_delay(Duration::from_secs(5));
    /// assert_eq!(policy.first_delay, Duration::from_secs(5));
    /// ```
    pub fn with_first_delay(mut self, delay: Duration) -> Self {
        self.first_delay = delay;
        self
    }

    /// The same policy in at-most-once mode: the job is acknowledged before
    /// it runs and never retried.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use taskherd::retry::{Decision, RetryPolicy};
    /// let policy = RetryPolicy::default().at_most_once();
    /// let t0 = SystemTime::UNIX_EPOCH;
    /// assert!(matches!(policy.next(1, t0, t0, None, 0.5), Decision::GiveUp(_)));
    /// ```
    pub fn at_most_once(mut self) -> Self {
        self.at_most_once = true;
        self
    }

    /// The same policy with another jitter, if its schedule is
    /// [`Schedule::Exponential`] (other schedules have none: they are
    /// unchanged).
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::retry::{RetryPolicy, Schedule};
    /// let policy = RetryPolicy::default().with_jitter(0.0);
    /// assert!(matches!(policy.schedule, Schedule::Exponential { jitter, .. } if jitter == 0.0));
    /// ```
    pub fn with_jitter(mut self, new_jitter: f64) -> Self {
        if let Schedule::Exponential { jitter, .. } = &mut self.schedule {
            *jitter = new_jitter;
        }
        self
    }

    /// Decides what follows a failed attempt.
    ///
    /// - `attempt`: attempts made so far, the failed one included (1 after
    ///   the first run; 0 is read as 1).
    /// - `first_attempt_at`: when the first attempt started (used by
    ///   [`Schedule::Every`]).
    /// - `now`: the current time; the retry time is `now + delay`.
    /// - `requested`: the delay the handler asked for
    ///   ([`Outcome::Retry`]`(Some(..))`), if any.
    /// - `random`: uniform in [0, 1], spreads exponential delays.
    ///
    /// A requested delay replaces the schedule's delay but never its limits:
    /// the attempt limit of [`Schedule::Fixed`] and
    /// [`Schedule::Exponential`] still applies, a retry of
    /// [`Schedule::Every`] must still start within `until` (a requested delay
    /// that would land past it gives up), an exponential retry is capped at
    /// `max`, and [`Schedule::Never`] and at-most-once never retry. No jitter
    /// is added to a requested delay.
    ///
    /// In at-most-once mode the answer is always [`Decision::GiveUp`]: the
    /// caller acknowledged the job before running it.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use taskherd::retry::{Decision, RetryPolicy};
    ///
    /// let policy = RetryPolicy::every(Duration::from_secs(10), Duration::from_secs(25));
    /// let t0 = SystemTime::UNIX_EPOCH;
    /// let at = |s| t0 + Duration::from_secs(s);
    /// assert_eq!(policy.next(1, t0, at(1), None, 0.0), Decision::RetryAt(at(11)));
    /// assert_eq!(policy.next(2, t0, at(12), None, 0.0), Decision::RetryAt(at(22)));
    /// assert!(matches!(policy.next(3, t0, at(23), None, 0.0), Decision::GiveUp(_)));
    /// ```
    pub fn next(
        &self,
        attempt: u32,
        first_attempt_at: SystemTime,
        now: SystemTime,
        requested: Option<Duration>,
        random: f64,
    ) -> Decision {
        let attempt = attempt.max(1);
        if self.at_most_once {
            return Decision::GiveUp("at-most-once: never retried".to_string());
        }
        let delay = match &self.schedule {
            Schedule::Never => {
                return Decision::GiveUp("retry policy never retries".to_string());
            }
            Schedule::Fixed(delays) => {
                let index = usize::try_from(attempt - 1).unwrap_or(usize::MAX);
                match delays.get(index) {
                    Some(scheduled) => requested.unwrap_or(*scheduled),
                    None => {
                        return Decision::GiveUp(format!(
                            "retry schedule used up after {attempt} attempts"
                        ));
                    }
                }
            }
            Schedule::Every { interval, until } => {
                let delay = requested.unwrap_or(*interval);
                let elapsed = now
                    .checked_add(delay)
                    .and_then(|at| at.duration_since(first_attempt_at).ok())
                    .unwrap_or(Duration::ZERO);
                if elapsed > *until {
                    return Decision::GiveUp(format!(
                        "retry window of {until:?} after the first attempt is over \
                         ({attempt} attempts)"
                    ));
                }
                delay
            }
            Schedule::Exponential {
                initial,
                max,
                factor,
                max_attempts,
                jitter,
            } => {
                if attempt >= *max_attempts {
                    return Decision::GiveUp(format!(
                        "gave up after {attempt} attempts (limit {max_attempts})"
                    ));
                }
                match requested {
                    Some(requested) => requested.min(*max),
                    None => Backoff {
                        initial: *initial,
                        max: *max,
                        factor: *factor,
                        jitter: *jitter,
                        cap: Cap::Delay,
                    }
                    .delay(attempt - 1, random),
                }
            }
        };
        match now.checked_add(delay) {
            Some(at) => Decision::RetryAt(at),
            None => Decision::GiveUp(format!("retry delay {delay:?} is out of range")),
        }
    }
}

/// `Vec<Duration>` as a list of milliseconds.
mod millis_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(delays: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(delays.iter().map(|d| crate::protocol::millis::of(*d)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<u64>::deserialize(d).map(|ms| ms.into_iter().map(Duration::from_millis).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn at(s: u64) -> SystemTime {
        T0 + secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    /// The delays chosen after attempts 1, 2, ... until the policy gives up,
    /// each decided at `now = T0`.
    fn delays(policy: &RetryPolicy, random: f64) -> Vec<Duration> {
        let mut out = Vec::new();
        for attempt in 1..=100 {
            match policy.next(attempt, T0, T0, None, random) {
                Decision::RetryAt(t) => out.push(t.duration_since(T0).expect("after T0")),
                Decision::GiveUp(_) => return out,
            }
        }
        panic!("policy never gave up: {out:?}");
    }

    #[test]
    fn exponential_doubles_up_to_the_cap_then_gives_up() {
        let policy = RetryPolicy::exponential(secs(1), secs(10), 7).with_jitter(0.0);
        assert_eq!(
            delays(&policy, 0.3),
            [secs(1), secs(2), secs(4), secs(8), secs(10), secs(10)]
        );
        assert_eq!(
            policy.next(7, T0, T0, None, 0.5),
            Decision::GiveUp("gave up after 7 attempts (limit 7)".into())
        );
    }

    #[test]
    fn exponential_with_another_factor() {
        let mut policy = RetryPolicy::exponential(ms(100), secs(60), 4).with_jitter(0.0);
        if let Schedule::Exponential { factor, .. } = &mut policy.schedule {
            *factor = 3.0;
        }
        assert_eq!(delays(&policy, 0.0), [ms(100), ms(300), ms(900)]);
    }

    #[test]
    fn exponential_factor_below_one_is_constant() {
        let mut policy = RetryPolicy::exponential(secs(2), secs(60), 4).with_jitter(0.0);
        if let Schedule::Exponential { factor, .. } = &mut policy.schedule {
            *factor = 0.5;
        }
        assert_eq!(delays(&policy, 0.0), [secs(2), secs(2), secs(2)]);
    }

    #[test]
    fn exponential_jitter_bounds() {
        let policy = RetryPolicy::exponential(secs(10), secs(100), 3).with_jitter(0.5);
        // attempt 1: base 10 s, ±50 %.
        let low = policy.next(1, T0, T0, None, 0.0).delay_from(T0);
        let mid = policy.next(1, T0, T0, None, 0.5).delay_from(T0);
        let high = policy.next(1, T0, T0, None, 1.0).delay_from(T0);
        assert_eq!(low, Some(secs(5)));
        assert_eq!(mid, Some(secs(10)));
        assert_eq!(high, Some(secs(15)));
        for i in 0..=100 {
            let r = f64::from(i) / 100.0;
            let d = policy
                .next(2, T0, T0, None, r)
                .delay_from(T0)
                .expect("retry");
            assert!(d >= secs(10) && d <= secs(30), "{d:?} for {r}");
        }
        // Out-of-range randomness is clamped.
        assert_eq!(
            policy.next(1, T0, T0, None, 7.0).delay_from(T0),
            Some(secs(15))
        );
        assert_eq!(
            policy.next(1, T0, T0, None, f64::NAN).delay_from(T0),
            Some(secs(10))
        );
    }

    #[test]
    fn exponential_jitter_never_exceeds_the_cap() {
        let policy = RetryPolicy::exponential(secs(10), secs(10), 5).with_jitter(0.2);
        assert_eq!(
            policy.next(3, T0, T0, None, 1.0).delay_from(T0),
            Some(secs(10))
        );
        assert_eq!(
            policy.next(3, T0, T0, None, 0.0).delay_from(T0),
            Some(secs(8))
        );
    }

    #[test]
    fn exponential_huge_attempt_saturates_at_the_cap() {
        let policy = RetryPolicy::exponential(secs(1), secs(300), u32::MAX).with_jitter(0.0);
        assert_eq!(
            policy.next(5000, T0, T0, None, 0.5).delay_from(T0),
            Some(secs(300))
        );
    }

    #[test]
    fn exponential_requested_delay_is_capped_at_max_and_unjittered() {
        let policy = RetryPolicy::exponential(secs(1), secs(30), 3).with_jitter(0.5);
        assert_eq!(
            policy.next(1, T0, at(100), Some(secs(7)), 1.0),
            Decision::RetryAt(at(107))
        );
        assert_eq!(
            policy.next(1, T0, at(100), Some(secs(3600)), 0.0),
            Decision::RetryAt(at(130))
        );
        // The attempt limit still holds.
        assert!(matches!(
            policy.next(3, T0, T0, Some(secs(1)), 0.5),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn exponential_with_one_or_zero_attempts_never_retries() {
        for max_attempts in [0, 1] {
            let policy = RetryPolicy::exponential(secs(1), secs(2), max_attempts);
            assert!(matches!(
                policy.next(1, T0, T0, None, 0.5),
                Decision::GiveUp(_)
            ));
        }
    }

    #[test]
    fn retry_time_is_relative_to_now() {
        let policy = RetryPolicy::exponential(secs(1), secs(10), 5).with_jitter(0.0);
        assert_eq!(
            policy.next(3, T0, at(50), None, 0.5),
            Decision::RetryAt(at(54))
        );
    }

    #[test]
    fn fixed_schedule_follows_the_list_then_gives_up() {
        let policy = RetryPolicy::schedule([secs(1), secs(10), secs(60)]);
        assert_eq!(delays(&policy, 0.9), [secs(1), secs(10), secs(60)]);
        assert_eq!(
            policy.next(4, T0, T0, None, 0.5),
            Decision::GiveUp("retry schedule used up after 4 attempts".into())
        );
        // Randomness has no effect on a fixed schedule.
        assert_eq!(delays(&policy, 0.0), delays(&policy, 1.0));
    }

    #[test]
    fn fixed_schedule_honours_a_requested_delay_within_its_length() {
        let policy = RetryPolicy::schedule([secs(1), secs(10)]);
        assert_eq!(
            policy.next(2, T0, at(5), Some(secs(100)), 0.5),
            Decision::RetryAt(at(105))
        );
        assert!(matches!(
            policy.next(3, T0, at(5), Some(secs(1)), 0.5),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn empty_fixed_schedule_never_retries() {
        let policy = RetryPolicy::schedule([]);
        assert!(delays(&policy, 0.5).is_empty());
    }

    #[test]
    fn every_retries_until_the_window_closes() {
        let policy = RetryPolicy::every(secs(10), secs(30));
        // Attempts start at 0, 10, 20, 30 (instant runs): 30 is still in the
        // window (inclusive), 40 is not.
        assert_eq!(
            policy.next(1, T0, at(0), None, 0.5),
            Decision::RetryAt(at(10))
        );
        assert_eq!(
            policy.next(2, T0, at(10), None, 0.5),
            Decision::RetryAt(at(20))
        );
        assert_eq!(
            policy.next(3, T0, at(20), None, 0.5),
            Decision::RetryAt(at(30))
        );
        assert!(matches!(
            policy.next(4, T0, at(30), None, 0.5),
            Decision::GiveUp(_)
        ));
        // A slow attempt that ends at 25 s cannot retry at 35 s.
        assert!(matches!(
            policy.next(2, T0, at(25), None, 0.5),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn every_requested_delay_must_fit_the_window() {
        let policy = RetryPolicy::every(secs(10), secs(30));
        assert_eq!(
            policy.next(1, T0, at(1), Some(secs(2)), 0.5),
            Decision::RetryAt(at(3))
        );
        assert_eq!(
            policy.next(1, T0, at(1), Some(secs(29)), 0.5),
            Decision::RetryAt(at(30))
        );
        assert!(matches!(
            policy.next(1, T0, at(1), Some(secs(30)), 0.5),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn every_with_a_clock_before_the_first_attempt_still_retries() {
        // A clock that stepped back: elapsed counts as zero.
        let policy = RetryPolicy::every(secs(1), secs(5));
        assert_eq!(
            policy.next(1, at(100), at(10), None, 0.5),
            Decision::RetryAt(at(11))
        );
    }

    #[test]
    fn never_and_at_most_once_give_up_even_when_asked() {
        let none = RetryPolicy::none();
        assert_eq!(
            none.next(1, T0, T0, Some(secs(1)), 0.5),
            Decision::GiveUp("retry policy never retries".into())
        );
        for policy in [
            RetryPolicy::default(),
            RetryPolicy::schedule([secs(1)]),
            RetryPolicy::every(secs(1), secs(100)),
        ] {
            let policy = policy.at_most_once();
            assert_eq!(
                policy.next(1, T0, T0, Some(secs(1)), 0.5),
                Decision::GiveUp("at-most-once: never retried".into())
            );
        }
    }

    #[test]
    fn attempt_zero_reads_as_one() {
        let policy = RetryPolicy::schedule([secs(4)]);
        assert_eq!(policy.next(0, T0, T0, None, 0.5), Decision::RetryAt(at(4)));
    }

    #[test]
    fn default_is_exponential_one_second_to_five_minutes() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.schedule,
            Schedule::Exponential {
                initial: secs(1),
                max: secs(300),
                factor: 2.0,
                max_attempts: 5,
                jitter: 0.1,
            }
        );
        assert_eq!(policy.first_delay, Duration::ZERO);
        assert!(!policy.at_most_once);
        assert_eq!(delays(&policy, 0.5), [secs(1), secs(2), secs(4), secs(8)]);
    }

    #[test]
    fn builders() {
        let policy = RetryPolicy::every(secs(1), secs(2))
            .with_first_delay(secs(3))
            .at_most_once()
            .with_jitter(0.7);
        assert_eq!(
            policy,
            RetryPolicy {
                first_delay: secs(3),
                schedule: Schedule::Every {
                    interval: secs(1),
                    until: secs(2)
                },
                at_most_once: true,
            }
        );
    }

    #[test]
    fn serde_round_trips_in_milliseconds() {
        let policies = [
            RetryPolicy::default(),
            RetryPolicy::none(),
            RetryPolicy::schedule([ms(1500), secs(2)]).with_first_delay(ms(250)),
            RetryPolicy::every(secs(1), secs(60)).at_most_once(),
        ];
        for policy in policies {
            let json = serde_json::to_string(&policy).expect("serialize");
            let back: RetryPolicy = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, policy, "{json}");
        }
        let json = serde_json::to_value(RetryPolicy::every(secs(1), secs(60))).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "first_delay": 0,
                "schedule": {"every": {"interval": 1000, "until": 60000}},
                "at_most_once": false
            })
        );
        let json = serde_json::to_value(RetryPolicy::default()).expect("json");
        assert_eq!(
            json["schedule"],
            serde_json::json!({"exponential": {
                "initial": 1000, "max": 300000, "factor": 2.0, "max_attempts": 5, "jitter": 0.1
            }})
        );
    }

    #[test]
    fn serde_missing_fields_take_defaults() {
        let policy: RetryPolicy =
            serde_json::from_str(r#"{"at_most_once": true}"#).expect("deserialize");
        assert_eq!(policy, RetryPolicy::default().at_most_once());
        let policy: RetryPolicy =
            serde_json::from_str(r#"{"schedule": "never"}"#).expect("deserialize");
        assert_eq!(policy, RetryPolicy::none());
    }

    #[test]
    fn outcome_serde() {
        let cases = [
            (Outcome::Done, r#""done""#),
            (Outcome::Retry(None), r#"{"retry":null}"#),
            (Outcome::Retry(Some(ms(1500))), r#"{"retry":1500}"#),
            (Outcome::Dead("bad input".into()), r#"{"dead":"bad input"}"#),
        ];
        for (outcome, json) in cases {
            assert_eq!(serde_json::to_string(&outcome).expect("serialize"), json);
            let back: Outcome = serde_json::from_str(json).expect("deserialize");
            assert_eq!(back, outcome);
        }
    }
}
