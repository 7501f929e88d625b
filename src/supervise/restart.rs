//! Restart decisions: policy, exponential backoff with jitter, limit.

use crate::backoff::{Backoff, Cap};
use crate::config::{RestartPolicy, RestartSpec};
use std::time::Duration;

/// How one run of an instance ended, as far as restarting is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Exit code 0 and no failure reported by the library.
    Success,
    /// Anything else; the text says what, for the log.
    Failure(String),
    /// Stopped on purpose to start afresh (`max_lifetime`, `max_jobs`).
    Recycled(String),
}

/// What the supervisor does after a run ended.
///
/// Not the same thing as a job's [`retry::Decision`](crate::retry::Decision):
/// an instance can also be done for good (its policy says so after a clean
/// end), its delay is relative and counts restarts in a row, and giving
/// up counts restarts rather than naming a reason for a dead letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The instance is done (policy says no restart).
    Finished,
    /// Start it again after this delay.
    Restart {
        /// Backoff delay before the next start.
        delay: Duration,
        /// Restarts after failures in a row so far, this one included; 0
        /// for a restart after a clean end (policy `always`).
        attempt: u32,
    },
    /// Too many restarts in a row: give up and mark it failed.
    GiveUp {
        /// Restarts made before giving up.
        restarts: u32,
    },
}

/// The restart state of one instance: restarts made since it was last
/// healthy.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    spec: RestartSpec,
    restarts_in_a_row: u32,
}

impl RestartTracker {
    /// A tracker for a fresh instance.
    pub fn new(spec: RestartSpec) -> Self {
        RestartTracker {
            spec,
            restarts_in_a_row: 0,
        }
    }

    /// Decides what follows a run that lasted `ran_for` and ended with
    /// `outcome`; `random` is uniform in [0, 1) and spreads the delay.
    pub fn decide(&mut self, outcome: &RunOutcome, ran_for: Duration, random: f64) -> Decision {
        if ran_for >= self.spec.reset_after {
            self.restarts_in_a_row = 0;
        }
        if let RunOutcome::Recycled(_) = outcome {
            // Recycling is no failure and follows no policy: start afresh now.
            self.restarts_in_a_row = 0;
            return Decision::Restart {
                delay: Duration::ZERO,
                attempt: 0,
            };
        }
        let restart = match self.spec.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => matches!(outcome, RunOutcome::Failure(_)),
            RestartPolicy::Always => true,
        };
        if !restart {
            return Decision::Finished;
        }
        if *outcome == RunOutcome::Success {
            // Under `always`, a clean end is no failure: it does not count
            // toward the limit, and the backoff starts over.
            self.restarts_in_a_row = 0;
            return Decision::Restart {
                delay: backoff_delay(&self.spec, 0, random),
                attempt: 0,
            };
        }
        if let Some(limit) = self.spec.limit {
            if self.restarts_in_a_row >= limit {
                return Decision::GiveUp {
                    restarts: self.restarts_in_a_row,
                };
            }
        }
        let delay = backoff_delay(&self.spec, self.restarts_in_a_row, random);
        self.restarts_in_a_row += 1;
        Decision::Restart {
            delay,
            attempt: self.restarts_in_a_row,
        }
    }
}

/// Delay before restart number `previous + 1`: `initial * 2^previous`,
/// capped at `max`, then spread by ±`jitter` with `random` in [0, 1) (so
/// at the cap it spreads around `max`): the crate's one backoff, with its
/// cap on the delay before jitter.
pub fn backoff_delay(spec: &RestartSpec, previous: u32, random: f64) -> Duration {
    Backoff {
        cap: Cap::Base,
        ..Backoff::doubling(spec.initial, spec.max, spec.jitter)
    }
    .delay(previous, random)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: RestartPolicy, limit: Option<u32>) -> RestartSpec {
        RestartSpec {
            policy,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
            limit,
        }
    }

    const SHORT: Duration = Duration::from_millis(10);
    fn failure() -> RunOutcome {
        RunOutcome::Failure("boom".into())
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut tracker = RestartTracker::new(spec(RestartPolicy::Always, None));
        let delays: Vec<_> = (0..6)
            .map(|_| match tracker.decide(&failure(), SHORT, 0.5) {
                Decision::Restart { delay, .. } => delay.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn jitter_spreads_both_ways() {
        let mut s = spec(RestartPolicy::Always, None);
        s.jitter = 0.5;
        assert_eq!(backoff_delay(&s, 1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(&s, 1, 1.0), Duration::from_secs(3));
    }

    #[test]
    fn limit_gives_up_after_that_many_restarts() {
        let mut tracker = RestartTracker::new(spec(RestartPolicy::OnFailure, Some(3)));
        for attempt in 1..=3 {
            assert!(matches!(
                tracker.decide(&failure(), SHORT, 0.5),
                Decision::Restart { attempt: a, .. } if a == attempt
            ));
        }
        assert_eq!(
            tracker.decide(&failure(), SHORT, 0.5),
            Decision::GiveUp { restarts: 3 }
        );
    }

    #[test]
    fn healthy_run_resets_the_count() {
        let mut tracker = RestartTracker::new(spec(RestartPolicy::OnFailure, Some(1)));
        assert!(matches!(
            tracker.decide(&failure(), SHORT, 0.5),
            Decision::Restart { .. }
        ));
        let healthy = Duration::from_secs(61);
        assert_eq!(
            tracker.decide(&failure(), healthy, 0.5),
            Decision::Restart {
                delay: Duration::from_secs(1),
                attempt: 1
            }
        );
    }

    #[test]
    fn policies() {
        let ok = RunOutcome::Success;
        let mut never = RestartTracker::new(spec(RestartPolicy::Never, None));
        assert_eq!(never.decide(&failure(), SHORT, 0.5), Decision::Finished);
        let mut on_failure = RestartTracker::new(spec(RestartPolicy::OnFailure, None));
        assert_eq!(on_failure.decide(&ok, SHORT, 0.5), Decision::Finished);
        let mut always = RestartTracker::new(spec(RestartPolicy::Always, None));
        assert!(matches!(
            always.decide(&ok, SHORT, 0.5),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn recycling_restarts_at_once_under_any_policy() {
        for policy in [
            RestartPolicy::Never,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
        ] {
            let mut tracker = RestartTracker::new(spec(policy, Some(0)));
            assert_eq!(
                tracker.decide(&RunOutcome::Recycled("old".into()), SHORT, 0.5),
                Decision::Restart {
                    delay: Duration::ZERO,
                    attempt: 0
                }
            );
        }
    }

    #[test]
    fn clean_ends_under_always_never_exhaust_the_limit() {
        let mut tracker = RestartTracker::new(spec(RestartPolicy::Always, Some(1)));
        for _ in 0..5 {
            assert_eq!(
                tracker.decide(&RunOutcome::Success, SHORT, 0.5),
                Decision::Restart {
                    delay: Duration::from_secs(1),
                    attempt: 0
                }
            );
        }
        assert!(matches!(
            tracker.decide(&failure(), SHORT, 0.5),
            Decision::Restart { attempt: 1, .. }
        ));
        assert_eq!(
            tracker.decide(&failure(), SHORT, 0.5),
            Decision::GiveUp { restarts: 1 }
        );
    }
}
