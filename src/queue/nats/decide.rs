//! What a JetStream consumer does with a message and with an outcome: the
//! I/O-free part of the bridge ([`super::bridge`]), unit tested by events.
//!
//! JetStream counts deliveries, not attempts: a job delayed with
//! `Taskherd-Not-Before` is delivered once early and handed back (a Nak
//! with the time left), which is a delivery but not an attempt. So the
//! attempt of a delivery is its delivery count, less one for a delayed
//! job. The durable consumer's MaxDeliver is `max_attempts + 2`: a job is
//! dead-lettered by the consumer that receives it past `max_attempts`
//! (consumers that crashed or hung used its attempts up), so it normally
//! never reaches MaxDeliver; the MAX_DELIVERIES advisory is the backstop
//! (handled in `bridge.rs`).

use std::time::{Duration, SystemTime};

use crate::protocol::slave::QueueSettings;
use crate::retry::Decision;

/// What the bridge does with a message just received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Run it: this is its `attempt`.
    Run {
        /// Attempts so far, this one included.
        attempt: u32,
    },
    /// Not due yet: hand it back (Nak) for this long.
    NotYet(Duration),
    /// Its attempts are used up (its consumers crashed or hung): dead
    /// with this reason, without running it.
    Exhausted(String),
}

/// The attempt a delivery is: its delivery count, less the early
/// delivery of a delayed job.
pub(crate) fn attempt_of(delivered: i64, delayed: bool) -> u32 {
    let attempt = if delayed { delivered - 1 } else { delivered };
    u32::try_from(attempt.max(1)).unwrap_or(u32::MAX)
}

/// A message arrives, delivered for the `delivered`-th time, due at
/// `not_before` (Unix time, if the producer delayed it).
pub(crate) fn arrival(
    delivered: i64,
    not_before: Option<SystemTime>,
    max_attempts: u32,
    now: SystemTime,
) -> Arrival {
    if let Some(due) = not_before {
        if let Ok(left) = due.duration_since(now) {
            if !left.is_zero() {
                return Arrival::NotYet(left);
            }
        }
    }
    let attempt = attempt_of(delivered, not_before.is_some());
    if attempt > max_attempts {
        return Arrival::Exhausted(format!(
            "lost {} times (its consumers crashed, hung or were stopped): {} attempts, the limit",
            attempt - 1,
            max_attempts
        ));
    }
    Arrival::Run { attempt }
}

/// What the bridge does with a retry outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Nak with this delay (a plain Nak redelivers at once).
    After(Duration),
    /// Dead with this reason.
    Dead(String),
}

/// A consumer asks for a retry of `attempt` (first run at
/// `first_attempt_at`), after `requested` if it said: the group's retry
/// policy decides, as the feeder's core does.
pub(crate) fn retry(
    settings: &QueueSettings,
    attempt: u32,
    first_attempt_at: SystemTime,
    now: SystemTime,
    requested: Option<Duration>,
    reason: &str,
    random: f64,
) -> Retry {
    if attempt >= settings.max_attempts {
        return Retry::Dead(format!("{reason}: {attempt} attempts (the limit)"));
    }
    match settings
        .retry
        .next(attempt, first_attempt_at, now, requested, random)
    {
        decision @ Decision::RetryAt(_) => {
            Retry::After(decision.delay_from(now).unwrap_or_default())
        }
        Decision::GiveUp(why) => Retry::Dead(format!("{reason}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::RetryPolicy;

    fn settings(max_attempts: u32) -> QueueSettings {
        QueueSettings {
            lease: Duration::from_secs(30),
            max_attempts,
            retry: RetryPolicy::exponential(
                Duration::from_secs(1),
                Duration::from_secs(60),
                max_attempts,
            )
            .with_jitter(0.0),
            rate: None,
            progress_every: Duration::from_secs(10),
            joblog: None,
        }
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn first_deliveries_run_and_exhausted_ones_are_dead_unrun() {
        assert_eq!(arrival(1, None, 3, T0), Arrival::Run { attempt: 1 });
        assert_eq!(arrival(3, None, 3, T0), Arrival::Run { attempt: 3 });
        match arrival(4, None, 3, T0) {
            Arrival::Exhausted(reason) => assert!(reason.contains("3 attempts"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_delayed_job_is_handed_back_until_due_and_its_early_delivery_is_no_attempt() {
        let due = T0 + Duration::from_secs(10);
        assert_eq!(
            arrival(1, Some(due), 3, T0 + Duration::from_secs(4)),
            Arrival::NotYet(Duration::from_secs(6))
        );
        assert_eq!(arrival(2, Some(due), 3, due), Arrival::Run { attempt: 1 });
        assert_eq!(
            arrival(4, Some(due), 3, due + Duration::from_secs(1)),
            Arrival::Run { attempt: 3 }
        );
        assert!(matches!(
            arrival(5, Some(due), 3, due),
            Arrival::Exhausted(_)
        ));
        // Published already due (or a clock behind the producer's): runs.
        assert_eq!(arrival(1, Some(T0), 3, T0), Arrival::Run { attempt: 1 });
    }

    #[test]
    fn retries_follow_the_backoff_then_die_at_the_limit() {
        let s = settings(3);
        assert_eq!(
            retry(&s, 1, T0, T0, None, "boom", 0.5),
            Retry::After(Duration::from_secs(1))
        );
        assert_eq!(
            retry(&s, 2, T0, T0, None, "boom", 0.5),
            Retry::After(Duration::from_secs(2))
        );
        assert_eq!(
            retry(&s, 2, T0, T0, Some(Duration::from_millis(5)), "boom", 0.5),
            Retry::After(Duration::from_millis(5))
        );
        match retry(&s, 3, T0, T0, None, "boom", 0.5) {
            Retry::Dead(reason) => {
                assert!(reason.starts_with("boom: 3 attempts"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
