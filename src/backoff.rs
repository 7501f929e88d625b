//! The crate's one exponential backoff, with jitter.
//!
//! Used by instance restarts (`supervise::restart`, also the master's
//! reconnects to a remote host), the queue consumer's reconnects to its
//! feeder (`queue::consumer`) and job retries
//! ([`crate::retry::Schedule::Exponential`]). Pure: the step and the
//! randomness are arguments.

use std::time::Duration;

/// An exponential backoff: the delay after step `n` (0 for the first) is
/// `initial * factor^n`, capped at `max`, spread by ±`jitter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    /// The delay of the first step, before jitter.
    pub(crate) initial: Duration,
    /// The cap; see [`Cap`] for what it bounds.
    pub(crate) max: Duration,
    /// Growth per step (2.0 doubles). Below 1.0, or not finite, it is 1.0
    /// (a constant delay).
    pub(crate) factor: f64,
    /// Relative spread of each delay, in [0, 1]: 0.1 means ±10 %. Keeps
    /// many waiters from waking in lockstep. Clamped to [0, 1]; not finite
    /// means none.
    pub(crate) jitter: f64,
    /// What `max` bounds.
    pub(crate) cap: Cap,
}

/// What [`Backoff::max`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cap {
    /// The delay before jitter: at the cap, delays still spread both ways
    /// around `max` (instance restarts and the master's reconnects).
    #[cfg_attr(not(feature = "master"), allow(dead_code))]
    Base,
    /// The delay itself, jitter included: never longer than `max` (job
    /// retries, the consumer's reconnects).
    Delay,
}

impl Backoff {
    /// Doubling from `initial` to `max`, ±`jitter`, with `max` bounding
    /// the delay itself ([`Cap::Delay`]).
    pub(crate) const fn doubling(initial: Duration, max: Duration, jitter: f64) -> Self {
        Backoff {
            initial,
            max,
            factor: 2.0,
            jitter,
            cap: Cap::Delay,
        }
    }

    /// The delay after step `step` (0 for the first), spread with `random`
    /// uniform in [0, 1] (0 gives the shortest delay, 1 the longest, 0.5
    /// none; out of range is clamped, not finite is 0.5). A delay too long
    /// for a [`Duration`] is `max`.
    pub(crate) fn delay(&self, step: u32, random: f64) -> Duration {
        let factor = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            1.0
        };
        let exponent = i32::try_from(step).unwrap_or(i32::MAX).min(1023);
        let max_secs = self.max.as_secs_f64();
        let base = (self.initial.as_secs_f64() * factor.powi(exponent)).min(max_secs);
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let spread = 1.0 + jitter * (2.0 * random - 1.0);
        let secs = match self.cap {
            Cap::Base => (base * spread).max(0.0),
            Cap::Delay => (base * spread).clamp(0.0, max_secs),
        };
        Duration::try_from_secs_f64(secs).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let backoff = Backoff::doubling(secs(1), secs(10), 0.0);
        let delays: Vec<_> = (0..6).map(|step| backoff.delay(step, 0.3)).collect();
        assert_eq!(
            delays,
            [secs(1), secs(2), secs(4), secs(8), secs(10), secs(10)]
        );
        assert_eq!(backoff.delay(u32::MAX, 0.5), secs(10));
    }

    #[test]
    fn jitter_spreads_both_ways_and_the_cap_decides_past_max() {
        let mut backoff = Backoff::doubling(secs(10), secs(20), 0.5);
        assert_eq!(backoff.delay(0, 0.0), secs(5));
        assert_eq!(backoff.delay(0, 0.5), secs(10));
        assert_eq!(backoff.delay(0, 1.0), secs(15));
        // At the cap: never past it, or spread around it.
        assert_eq!(backoff.delay(1, 1.0), secs(20));
        assert_eq!(backoff.delay(1, 0.0), secs(10));
        backoff.cap = Cap::Base;
        assert_eq!(backoff.delay(1, 1.0), secs(30));
        assert_eq!(backoff.delay(1, 0.0), secs(10));
    }

    #[test]
    fn odd_inputs_are_tamed() {
        let mut backoff = Backoff::doubling(secs(2), secs(60), 0.5);
        assert_eq!(backoff.delay(0, 7.0), secs(3));
        assert_eq!(backoff.delay(0, f64::NAN), secs(2));
        backoff.factor = 0.5;
        assert_eq!(backoff.delay(3, 0.5), secs(2));
        backoff.factor = f64::INFINITY;
        assert_eq!(backoff.delay(3, 0.5), secs(2));
        backoff.jitter = f64::NAN;
        assert_eq!(backoff.delay(0, 1.0), secs(2));
        let huge = Backoff {
            cap: Cap::Base,
            ..Backoff::doubling(Duration::MAX, Duration::MAX, 1.0)
        };
        assert_eq!(huge.delay(0, 1.0), Duration::MAX);
    }
}
