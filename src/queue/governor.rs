//! The rate governor of the feeder server: a token bucket that consumers
//! can slow down and pause (the publisher-pulsar idea, done centrally).
//!
//! # Rules
//!
//! - **Configured rate** `r` (jobs/s, [`QueueSettings::rate`]): a token
//!   bucket filled at the current rate, holding at most
//!   `burst = max(1, current / 10)` tokens; it starts full. One delivery
//!   takes one token.
//! - **No configured rate**: no limit at all, until a consumer asks to slow
//!   down (below).
//! - **[`slow_down`](Governor::slow_down)** halves the current rate, never
//!   below the *floor*: 1 % of the configured rate ([`FLOOR_FRACTION`]), or
//!   [`UNLIMITED_FLOOR`] (1 job/s) without a configured rate. Without a
//!   configured rate the governor starts limiting at half the delivery rate
//!   it measured over the last second (sliding window), and that measured
//!   rate (at least `2 × UNLIMITED_FLOOR`) becomes the target it recovers
//!   to. Requests closer than [`SLOW_DOWN_DEBOUNCE`] to the last applied one
//!   are ignored, so that several consumers (or several jobs of one
//!   consumer) complaining about the same overload halve the rate once, not
//!   once each.
//! - **Recovery**: the current rate grows by [`RECOVERY_PER_SEC`] (10 %) of
//!   the target per second, linearly, up to the target (the configured
//!   rate; without one, the measured rate, after which the limit is lifted
//!   again).
//! - **[`pause`](Governor::pause)**`(d)` allows no delivery for `d`
//!   (capped at [`MAX_PAUSE`]); overlapping pauses end at the latest end.
//!
//! Everything is pure and time-injected: every method takes `now`, so the
//! governor is tested without sleeping.
//!
//! [`QueueSettings::rate`]: crate::protocol::slave::QueueSettings::rate

use std::time::{Duration, Instant};

/// Share of the target rate regained per second after a slow-down.
pub const RECOVERY_PER_SEC: f64 = 0.10;

/// The lowest rate a slow-down reaches, as a share of the configured rate.
pub const FLOOR_FRACTION: f64 = 0.01;

/// The lowest rate a slow-down reaches without a configured rate, jobs/s.
pub const UNLIMITED_FLOOR: f64 = 1.0;

/// The longest pause a consumer can ask for; longer asks are cut to this.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Slow-down requests closer than this to the last applied one are ignored.
pub const SLOW_DOWN_DEBOUNCE: Duration = Duration::from_millis(200);

/// Length of the window over which deliveries are measured (for a
/// slow-down without a configured rate).
const WINDOW: Duration = Duration::from_secs(1);

/// The longest wait [`Governor::acquire`] ever asks for: a guard against
/// absurd float values, never reached with a positive floor.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A token bucket with slow-down, pause and recovery. See the module docs.
#[derive(Debug, Clone)]
pub struct Governor {
    /// The rate from the settings, if any: the target of recovery.
    configured: Option<f64>,
    /// The limit in force; `None` means unlimited.
    limit: Option<Limit>,
    /// Tokens in the bucket (fractional between refills).
    tokens: f64,
    /// When `tokens` and the recovery were last brought up to date.
    refilled_at: Instant,
    /// No delivery before this.
    paused_until: Option<Instant>,
    /// When the last slow-down was applied, for the debounce.
    last_slow_down: Option<Instant>,
    /// Recent deliveries, to know what "half the rate" is without a
    /// configured rate.
    meter: Meter,
}

/// The limit in force.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit {
    /// Jobs/s allowed now.
    current: f64,
    /// Jobs/s the limit recovers to.
    target: f64,
    /// Jobs/s a slow-down never goes below.
    floor: f64,
}

/// Deliveries per second over a sliding window of [`WINDOW`].
#[derive(Debug, Clone)]
struct Meter {
    /// Start of the current window.
    window_start: Instant,
    /// Deliveries in the current window.
    count: u64,
    /// Deliveries in the window before (0 if it was not the one just
    /// before).
    previous: u64,
}

impl Meter {
    fn new(now: Instant) -> Self {
        Meter {
            window_start: now,
            count: 0,
            previous: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= 2 * WINDOW {
            self.previous = 0;
            self.count = 0;
            self.window_start = now;
        } else if elapsed >= WINDOW {
            self.previous = self.count;
            self.count = 0;
            self.window_start += WINDOW;
        }
    }

    fn record(&mut self, now: Instant) {
        self.roll(now);
        self.count += 1;
    }

    /// Sliding-window estimate: the part of the previous window still
    /// inside the last second, plus the current window.
    fn rate(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let elapsed = now.saturating_duration_since(self.window_start);
        let fraction = (elapsed.as_secs_f64() / WINDOW.as_secs_f64()).clamp(0.0, 1.0);
        (self.previous as f64 * (1.0 - fraction) + self.count as f64) / WINDOW.as_secs_f64()
    }
}

/// Most tokens the bucket holds at `rate`.
fn burst(rate: f64) -> f64 {
    (rate / 10.0).max(1.0)
}

/// `now + d`, saturating far in the future instead of overflowing.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

impl Governor {
    /// A governor at `rate` jobs/s, or unlimited with `None`.
    ///
    /// A rate that is not a positive finite number is read as `None`
    /// (the feeder server refuses such settings before getting here).
    pub fn new(rate: Option<f64>, now: Instant) -> Self {
        let configured = rate.filter(|r| r.is_finite() && *r > 0.0);
        let limit = configured.map(|rate| Limit {
            current: rate,
            target: rate,
            floor: rate * FLOOR_FRACTION,
        });
        Governor {
            configured,
            limit,
            tokens: configured.map_or(0.0, burst),
            refilled_at: now,
            paused_until: None,
            last_slow_down: None,
            meter: Meter::new(now),
        }
    }

    /// Takes the permission to deliver one job now: `Ok(())`, or
    /// `Err(when)` with the earliest time to ask again.
    pub fn acquire(&mut self, now: Instant) -> Result<(), Instant> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until);
            }
            self.paused_until = None;
        }
        self.update(now);
        if let Some(limit) = &self.limit {
            if self.tokens < 1.0 {
                let wait = (1.0 - self.tokens) / limit.current;
                let wait = Duration::try_from_secs_f64(wait)
                    .unwrap_or(MAX_WAIT)
                    .clamp(Duration::from_micros(1), MAX_WAIT);
                return Err(after(now, wait));
            }
            self.tokens -= 1.0;
        }
        self.meter.record(now);
        Ok(())
    }

    /// A consumer is overloaded: halves the current rate (see the module
    /// docs for the floor and the case without a configured rate).
    ///
    /// Returns whether the request was applied (`false` when debounced).
    pub fn slow_down(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last_slow_down {
            if now.saturating_duration_since(last) < SLOW_DOWN_DEBOUNCE {
                return false;
            }
        }
        self.last_slow_down = Some(now);
        self.update(now);
        match &mut self.limit {
            Some(limit) => {
                limit.current = (limit.current / 2.0).max(limit.floor);
                self.tokens = self.tokens.min(burst(limit.current));
            }
            None => {
                let target = self.meter.rate(now).max(2.0 * UNLIMITED_FLOOR);
                let current = (target / 2.0).max(UNLIMITED_FLOOR);
                self.limit = Some(Limit {
                    current,
                    target,
                    floor: UNLIMITED_FLOOR,
                });
                // Leaving "unlimited": start with an empty bucket.
                self.tokens = 0.0;
            }
        }
        true
    }

    /// A consumer asks for no deliveries during `duration` (at most
    /// [`MAX_PAUSE`]) from `now`.
    pub fn pause(&mut self, duration: Duration, now: Instant) {
        let until = after(now, duration.min(MAX_PAUSE));
        self.paused_until = Some(self.paused_until.map_or(until, |old| old.max(until)));
    }

    /// The rate allowed now, jobs/s; `None` when unlimited.
    pub fn rate(&mut self, now: Instant) -> Option<f64> {
        self.update(now);
        self.limit.map(|limit| limit.current)
    }

    /// The rate from the settings, if any.
    pub fn configured(&self) -> Option<f64> {
        self.configured
    }

    /// The end of the pause in force at `now`, if any.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|until| *until > now)
    }

    /// Brings recovery and tokens up to `now`.
    fn update(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        if now > self.refilled_at {
            self.refilled_at = now;
        }
        let Some(limit) = &mut self.limit else {
            return;
        };
        let before = limit.current;
        if limit.current < limit.target {
            limit.current =
                (limit.current + RECOVERY_PER_SEC * limit.target * elapsed).min(limit.target);
        }
        let average = (before + limit.current) / 2.0;
        self.tokens = (self.tokens + average * elapsed).min(burst(limit.current));
        if self.configured.is_none() && limit.current >= limit.target {
            // Recovered from a slow-down without a configured rate.
            self.limit = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Deliveries a greedy caller gets in `[start, start + span)`; returns
    /// the count and the time the caller reached.
    fn greedy(governor: &mut Governor, start: Instant, span: Duration) -> (u64, Instant) {
        let end = start + span;
        let mut now = start;
        let mut count = 0;
        while now < end {
            match governor.acquire(now) {
                Ok(()) => count += 1,
                Err(at) => {
                    assert!(at > now, "a wait must move time forward");
                    now = at;
                }
            }
        }
        (count, now)
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut governor = Governor::new(None, t0);
        for _ in 0..10_000 {
            assert_eq!(governor.acquire(t0), Ok(()));
        }
        assert_eq!(governor.rate(t0), None);
    }

    #[test]
    fn invalid_rates_mean_unlimited() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut governor = Governor::new(Some(rate), t0);
            assert_eq!(governor.configured(), None);
            assert_eq!(governor.rate(t0), None);
        }
    }

    #[test]
    fn configured_rate_with_burst() {
        let t0 = Instant::now();
        // 100/s: burst of 10, then one every 10 ms.
        let mut governor = Governor::new(Some(100.0), t0);
        for _ in 0..10 {
            assert_eq!(governor.acquire(t0), Ok(()));
        }
        let at = governor.acquire(t0).unwrap_err();
        let wait = at - t0;
        assert!(wait >= ms(9) && wait <= ms(11), "{wait:?}");
        assert_eq!(governor.acquire(at), Ok(()));
    }

    #[test]
    fn small_rates_have_a_burst_of_one() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(2.0), t0);
        assert_eq!(governor.acquire(t0), Ok(()));
        let at = governor.acquire(t0).unwrap_err();
        assert!((at - t0) >= ms(499) && (at - t0) <= ms(501));
    }

    #[test]
    fn rate_holds_over_a_window() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(50.0), t0);
        let (count, _) = greedy(&mut governor, t0, Duration::from_secs(10));
        // 5 of burst + 50/s for 10 s.
        assert!((500..=506).contains(&count), "{count}");
    }

    #[test]
    fn slow_down_halves_down_to_the_floor() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(1000.0), t0);
        assert!(governor.slow_down(t0));
        assert_eq!(governor.rate(t0), Some(500.0));
        let mut now = t0;
        for _ in 0..20 {
            now += SLOW_DOWN_DEBOUNCE;
            governor.slow_down(now);
        }
        // The floor is 1 % of the configured rate (recovery adds a little
        // between the requests, so allow for it).
        let rate = governor.rate(now).unwrap();
        assert!((10.0..=30.0).contains(&rate), "{rate}");
    }

    #[test]
    fn slow_down_requests_are_debounced() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(1000.0), t0);
        assert!(governor.slow_down(t0));
        assert!(!governor.slow_down(t0 + ms(10)));
        assert!(!governor.slow_down(t0 + ms(199)));
        assert_eq!(governor.rate(t0 + ms(199)).map(f64::round), Some(520.0));
        assert!(governor.slow_down(t0 + SLOW_DOWN_DEBOUNCE));
    }

    #[test]
    fn rate_recovers_ten_percent_of_the_target_per_second() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(100.0), t0);
        governor.slow_down(t0);
        assert_eq!(governor.rate(t0), Some(50.0));
        let rate = governor.rate(t0 + Duration::from_secs(2)).unwrap();
        assert!((rate - 70.0).abs() < 1e-6, "{rate}");
        let rate = governor.rate(t0 + Duration::from_secs(5)).unwrap();
        assert!((rate - 100.0).abs() < 1e-6, "{rate}");
        // Never above the configured rate.
        assert_eq!(governor.rate(t0 + Duration::from_secs(60)), Some(100.0));
    }

    #[test]
    fn slowed_rate_limits_deliveries() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(100.0), t0);
        for _ in 0..10 {
            governor.acquire(t0).unwrap();
        }
        governor.slow_down(t0);
        // 1 s at 50/s recovering to 60/s: about 55 deliveries.
        let (count, _) = greedy(&mut governor, t0, Duration::from_secs(1));
        assert!((50..=60).contains(&count), "{count}");
    }

    #[test]
    fn pause_stops_deliveries_then_resumes() {
        let t0 = Instant::now();
        let mut governor = Governor::new(None, t0);
        governor.pause(ms(500), t0);
        assert_eq!(governor.acquire(t0), Err(t0 + ms(500)));
        assert_eq!(governor.acquire(t0 + ms(499)), Err(t0 + ms(500)));
        assert_eq!(governor.paused_until(t0 + ms(100)), Some(t0 + ms(500)));
        assert_eq!(governor.acquire(t0 + ms(500)), Ok(()));
        assert_eq!(governor.paused_until(t0 + ms(500)), None);
    }

    #[test]
    fn pauses_overlap_to_the_latest_end_and_are_capped() {
        let t0 = Instant::now();
        let mut governor = Governor::new(Some(10.0), t0);
        governor.pause(ms(800), t0);
        governor.pause(ms(100), t0 + ms(10));
        assert_eq!(governor.acquire(t0 + ms(200)), Err(t0 + ms(800)));
        governor.pause(Duration::from_secs(86_400), t0);
        assert_eq!(governor.acquire(t0), Err(t0 + MAX_PAUSE));
    }

    #[test]
    fn slow_down_without_a_configured_rate_uses_the_measured_rate() {
        let t0 = Instant::now();
        let mut governor = Governor::new(None, t0);
        // 1000 deliveries/s for 2 s.
        for i in 0..2000u64 {
            governor
                .acquire(t0 + Duration::from_micros(i * 1000))
                .unwrap();
        }
        let now = t0 + Duration::from_secs(2);
        assert!(governor.slow_down(now));
        let rate = governor.rate(now).unwrap();
        assert!((450.0..=550.0).contains(&rate), "{rate}");
        // It limits now...
        let (count, now) = greedy(&mut governor, now, Duration::from_secs(1));
        assert!((450..=650).contains(&count), "{count}");
        // ...and lifts the limit once recovered (10 %/s of ~1000/s: 5 s).
        assert_eq!(governor.rate(now + Duration::from_secs(6)), None);
        assert_eq!(governor.acquire(now + Duration::from_secs(6)), Ok(()));
    }

    #[test]
    fn slow_down_when_idle_without_a_configured_rate_uses_the_floor() {
        let t0 = Instant::now();
        let mut governor = Governor::new(None, t0);
        assert!(governor.slow_down(t0));
        assert_eq!(governor.rate(t0), Some(UNLIMITED_FLOOR));
        // Floor 1/s: the first token comes after 1 s.
        assert_eq!(governor.acquire(t0), Err(t0 + Duration::from_secs(1)));
    }
}
