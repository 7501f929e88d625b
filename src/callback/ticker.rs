//! Run a handler N times every T after an initial delay.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::guarded;
use super::Registry;
use crate::retry::Outcome;

/// Runs something periodically: first after `initial_delay`, then on every
/// `interval` boundary, `times` times in all (or until cancelled).
///
/// Runs never overlap: the next run starts only after the previous one has
/// finished. There are no catch-up bursts: ticks missed while a run
/// overran are skipped, and the next run starts at the first tick boundary
/// (`start + initial_delay + k * interval`) at or after the end of the
/// overrunning run. A zero `interval` runs back to back.
///
/// The outcome of a run does not change the schedule (a ticker is not a
/// retrying worker): failures are logged and counted in the
/// [`TickerSummary`].
///
/// ```
/// use std::time::Duration;
/// use taskherd::callback::Ticker;
/// use taskherd::retry::Outcome;
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ticker = Ticker::new(Duration::ZERO, Duration::from_millis(1), Some(3));
/// let summary = ticker
///     .run(CancellationToken::new(), "heartbeat", || async { Outcome::Done })
///     .await;
/// assert_eq!(summary.runs, 3);
/// assert_eq!(summary.done, 3);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticker {
    /// Wait before the first run (the D of "N times every T after D").
    pub initial_delay: Duration,
    /// Period between run starts (T).
    pub interval: Duration,
    /// Runs in all (N); `None` runs until cancelled.
    pub times: Option<u32>,
}

/// What a [`Ticker`] did.
///
/// Outcomes are counted, not stored: a ticker without a limit runs forever
/// and must not grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickerSummary {
    /// Runs made (started and finished).
    pub runs: u32,
    /// Runs that ended with [`Outcome::Done`].
    pub done: u32,
    /// Runs that ended with [`Outcome::Retry`] (or panicked).
    pub retried: u32,
    /// Runs that ended with [`Outcome::Dead`].
    pub dead: u32,
    /// Ticks skipped because a run overran them.
    pub skipped_ticks: u64,
    /// The outcome of the last run, if any.
    pub last_outcome: Option<Outcome>,
    /// Whether the ticker stopped on cancellation rather than after its
    /// `times` runs.
    pub cancelled: bool,
}

impl Ticker {
    /// A ticker: `times` runs (`None`: unlimited) every `interval`, the first
    /// after `initial_delay`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use taskherd::callback::Ticker;
    /// let ticker = Ticker::new(Duration::from_secs(5), Duration::from_secs(60), None);
    /// assert_eq!(ticker.times, None);
    /// ```
    pub fn new(initial_delay: Duration, interval: Duration, times: Option<u32>) -> Self {
        Ticker {
            initial_delay,
            interval,
            times,
        }
    }

    /// Runs `run` on the schedule until it has run `times` times or `cancel`
    /// fires. `name` labels the runs in logs. A panic in `run` counts as
    /// [`Outcome::Retry`]`(None)` and is logged; the ticker goes on.
    ///
    /// # Cancel safety
    ///
    /// Cancellation is seen while waiting for the next tick: it ends the
    /// ticker at once. A run in progress is not interrupted (handlers are
    /// not assumed cancel safe): the ticker returns when it finishes.
    /// Dropping the returned future drops a run in progress.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use taskherd::callback::Ticker;
    /// use taskherd::retry::Outcome;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let count = Arc::new(AtomicU32::new(0));
    /// let counter = Arc::clone(&count);
    /// let ticker = Ticker::new(Duration::from_millis(1), Duration::from_millis(1), Some(2));
    /// ticker
    ///     .run(CancellationToken::new(), "count", move || {
    ///         counter.fetch_add(1, Ordering::SeqCst);
    ///         async { Outcome::Done }
    ///     })
    ///     .await;
    /// assert_eq!(count.load(Ordering::SeqCst), 2);
    /// # }
    /// ```
    pub async fn run<F, Fut>(&self, cancel: CancellationToken, name: &str, run: F) -> TickerSummary
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        self.run_on(&TokioClock, cancel, name, run).await
    }

    /// [`run`](Self::run) on any clock (tests use a virtual one).
    async fn run_on<C, F, Fut>(
        &self,
        clock: &C,
        cancel: CancellationToken,
        name: &str,
        mut run: F,
    ) -> TickerSummary
    where
        C: Clock,
        F: FnMut() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        let mut summary = TickerSummary::default();
        if self.times == Some(0) {
            return summary;
        }
        let anchor = clock.now() + self.initial_delay;
        let mut deadline = anchor;
        let mut tick: u64 = 0;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    summary.cancelled = true;
                    return summary;
                }
                _ = clock.sleep_until(deadline) => {}
            }
            // Called inside the guarded future, so that a closure panicking
            // before returning its future is caught too.
            let outcome = guarded(name, async { run().await }).await;
            summary.runs += 1;
            match &outcome {
                Outcome::Done => summary.done += 1,
                Outcome::Retry(_) => {
                    summary.retried += 1;
                    tracing::warn!(
                        handler = %name, run = summary.runs, outcome = ?outcome,
                        "ticker run failed"
                    );
                }
                Outcome::Dead(reason) => {
                    summary.dead += 1;
                    tracing::error!(
                        handler = %name, run = summary.runs, reason = %reason,
                        "ticker run failed for good"
                    );
                }
            }
            summary.last_outcome = Some(outcome);
            if self.times.is_some_and(|times| summary.runs >= times) {
                return summary;
            }
            let next = next_tick(anchor, self.interval, tick, clock.now());
            summary.skipped_ticks += next - tick - 1;
            tick = next;
            deadline = tick_time(anchor, self.interval, tick);
        }
    }

    /// Runs the registered handler `name` with `payload` on the schedule;
    /// see [`run`](Self::run). An unknown name or a bad payload gives
    /// [`Outcome::Dead`] on every run, as [`Registry::call`] does.
    ///
    /// # Cancel safety
    ///
    /// As [`run`](Self::run).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use taskherd::callback::{Registry, Ticker};
    /// use taskherd::retry::Outcome;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut registry = Registry::new();
    /// registry.register("cleanup", |_dir: String| async { Outcome::Done }).unwrap();
    /// let ticker = Ticker::new(Duration::ZERO, Duration::from_millis(1), Some(2));
    /// let summary = ticker
    ///     .run_handler(
    ///         CancellationToken::new(),
    ///         Arc::new(registry),
    ///         "cleanup",
    ///         serde_json::json!("/tmp/cache"),
    ///     )
    ///     .await;
    /// assert_eq!(summary.done, 2);
    /// # }
    /// ```
    pub async fn run_handler(
        &self,
        cancel: CancellationToken,
        registry: Arc<Registry>,
        name: &str,
        payload: Value,
    ) -> TickerSummary {
        self.run(cancel, name, || {
            let registry = Arc::clone(&registry);
            let payload = payload.clone();
            async move { registry.call(name, payload).await }
        })
        .await
    }
}

/// Where the ticker reads the time and waits: tokio's clock, or a virtual
/// one in tests (tokio's paused clock needs the `test-util` feature).
trait Clock {
    /// The current time.
    fn now(&self) -> Instant;
    /// Completes at `deadline`.
    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()>;
}

/// tokio's clock.
struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> {
        tokio::time::sleep_until(deadline)
    }
}

/// The number of the first tick after `previous` that is not in the past
/// at `now`.
fn next_tick(anchor: Instant, interval: Duration, previous: u64, now: Instant) -> u64 {
    let interval_nanos = interval.as_nanos();
    if interval_nanos == 0 {
        return previous + 1;
    }
    let elapsed = now.saturating_duration_since(anchor).as_nanos();
    let due = u64::try_from(elapsed.div_ceil(interval_nanos)).unwrap_or(u64::MAX);
    due.max(previous.saturating_add(1))
}

/// When tick number `tick` is due.
fn tick_time(anchor: Instant, interval: Duration, tick: u64) -> Instant {
    let offset = u32::try_from(tick)
        .ok()
        .and_then(|tick| interval.checked_mul(tick))
        .unwrap_or(Duration::MAX);
    anchor.checked_add(offset).unwrap_or_else(far_future)
}

/// About thirty years from now, tokio's own "never" for a deadline.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A virtual clock: sleeping jumps to the deadline at once, a run
    /// "takes time" by advancing it. With `cancel_at`, the first sleep that
    /// would pass that time stops there and cancels the token instead.
    #[derive(Clone)]
    struct VirtualClock {
        start: Instant,
        now: Arc<Mutex<Instant>>,
        cancel_at: Option<(Instant, CancellationToken)>,
    }

    impl VirtualClock {
        fn new() -> Self {
            let start = Instant::now();
            VirtualClock {
                start,
                now: Arc::new(Mutex::new(start)),
                cancel_at: None,
            }
        }

        fn cancelling_at(mut self, at: Duration, token: &CancellationToken) -> Self {
            self.cancel_at = Some((self.start + at, token.clone()));
            self
        }

        fn advance(&self, by: Duration) {
            *self.now.lock().expect("clock") += by;
        }

        fn elapsed(&self) -> Duration {
            self.now() - self.start
        }
    }

    impl Clock for VirtualClock {
        fn now(&self) -> Instant {
            *self.now.lock().expect("clock")
        }

        fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> {
            let mut now = self.now.lock().expect("clock");
            if let Some((at, token)) = &self.cancel_at {
                if deadline > *at {
                    *now = (*now).max(*at);
                    token.cancel();
                    return futures::future::pending().left_future();
                }
            }
            *now = (*now).max(deadline);
            futures::future::ready(()).right_future()
        }
    }

    use futures::FutureExt;

    /// A run that records its start (ms since the clock's start) and takes
    /// `run_time(index)` of virtual time.
    fn recorder(
        clock: &VirtualClock,
        log: &Arc<Mutex<Vec<u128>>>,
        run_time: impl Fn(usize) -> Duration,
    ) -> impl FnMut() -> futures::future::Ready<Outcome> {
        let clock = clock.clone();
        let log = Arc::clone(log);
        move || {
            let index = {
                let mut log = log.lock().expect("log");
                log.push(clock.elapsed().as_millis());
                log.len() - 1
            };
            clock.advance(run_time(index));
            futures::future::ready(Outcome::Done)
        }
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn starts(log: &Arc<Mutex<Vec<u128>>>) -> Vec<u128> {
        log.lock().expect("log").clone()
    }

    #[tokio::test]
    async fn runs_n_times_every_t_after_d() {
        let clock = VirtualClock::new();
        let log = Arc::default();
        let ticker = Ticker::new(ms(500), ms(1000), Some(4));
        let summary = ticker
            .run_on(
                &clock,
                CancellationToken::new(),
                "t",
                recorder(&clock, &log, |_| ms(10)),
            )
            .await;
        assert_eq!(starts(&log), [500, 1500, 2500, 3500]);
        assert_eq!(summary.runs, 4);
        assert_eq!(summary.done, 4);
        assert_eq!(summary.skipped_ticks, 0);
        assert!(!summary.cancelled);
        assert_eq!(summary.last_outcome, Some(Outcome::Done));
        // It returns right after the last run: no trailing wait.
        assert_eq!(clock.elapsed(), ms(3510));
    }

    #[tokio::test]
    async fn overrun_skips_missed_ticks_without_overlap_or_burst() {
        let clock = VirtualClock::new();
        let log = Arc::default();
        // Run 2 (index 1) takes 2.5 intervals; the others are quick.
        let ticker = Ticker::new(Duration::ZERO, ms(100), Some(5));
        let summary = ticker
            .run_on(
                &clock,
                CancellationToken::new(),
                "t",
                recorder(&clock, &log, |i| if i == 1 { ms(250) } else { ms(5) }),
            )
            .await;
        // Run 2 starts at 100 and ends at 350: ticks 200 and 300 are
        // skipped, the next run is at 400, then back on schedule.
        assert_eq!(starts(&log), [0, 100, 400, 500, 600]);
        assert_eq!(summary.skipped_ticks, 2);
        assert_eq!(summary.runs, 5);
    }

    #[tokio::test]
    async fn run_ending_on_a_boundary_starts_the_next_at_once() {
        let clock = VirtualClock::new();
        let log = Arc::default();
        let ticker = Ticker::new(Duration::ZERO, ms(100), Some(3));
        let summary = ticker
            .run_on(
                &clock,
                CancellationToken::new(),
                "t",
                recorder(&clock, &log, |i| if i == 0 { ms(200) } else { ms(1) }),
            )
            .await;
        assert_eq!(starts(&log), [0, 200, 300]);
        assert_eq!(summary.skipped_ticks, 1);
    }

    #[tokio::test]
    async fn zero_interval_runs_back_to_back() {
        let clock = VirtualClock::new();
        let log = Arc::default();
        let ticker = Ticker::new(ms(7), Duration::ZERO, Some(3));
        ticker
            .run_on(
                &clock,
                CancellationToken::new(),
                "t",
                recorder(&clock, &log, |_| ms(2)),
            )
            .await;
        assert_eq!(starts(&log), [7, 9, 11]);
    }

    #[tokio::test]
    async fn cancel_while_waiting_stops_at_once() {
        let cancel = CancellationToken::new();
        let clock = VirtualClock::new().cancelling_at(ms(2500), &cancel);
        let log = Arc::default();
        let ticker = Ticker::new(ms(100), ms(1000), None);
        let summary = ticker
            .run_on(&clock, cancel, "t", recorder(&clock, &log, |_| ms(1)))
            .await;
        assert_eq!(starts(&log), [100, 1100, 2100]);
        assert_eq!(summary.runs, 3);
        assert!(summary.cancelled);
        assert_eq!(clock.elapsed(), ms(2500));
    }

    #[tokio::test]
    async fn cancel_during_a_run_lets_it_finish() {
        let clock = VirtualClock::new();
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        let ticker = Ticker::new(Duration::ZERO, ms(10), None);
        let run_clock = clock.clone();
        let summary = ticker
            .run_on(&clock, cancel, "t", move || {
                let stopper = stopper.clone();
                let run_clock = run_clock.clone();
                async move {
                    stopper.cancel();
                    tokio::task::yield_now().await;
                    run_clock.advance(ms(50));
                    Outcome::Done
                }
            })
            .await;
        assert_eq!(summary.runs, 1);
        assert_eq!(summary.done, 1);
        assert!(summary.cancelled);
        assert_eq!(clock.elapsed(), ms(50));
    }

    #[tokio::test]
    async fn zero_times_never_runs() {
        let ticker = Ticker::new(ms(5), ms(5), Some(0));
        let mut calls = 0;
        let summary = ticker
            .run(CancellationToken::new(), "t", || {
                calls += 1;
                futures::future::ready(Outcome::Done)
            })
            .await;
        assert_eq!(calls, 0);
        assert_eq!(summary, TickerSummary::default());
    }

    #[tokio::test]
    async fn failures_and_panics_are_counted_and_do_not_stop_it() {
        let clock = VirtualClock::new();
        let mut n = 0;
        let ticker = Ticker::new(Duration::ZERO, ms(10), Some(5));
        let summary = ticker
            .run_on(&clock, CancellationToken::new(), "flaky", move || {
                n += 1;
                if n == 2 {
                    panic!("before the future");
                }
                let this = n;
                async move {
                    match this {
                        1 => Outcome::Dead("no".into()),
                        3 => panic!("inside the future"),
                        4 => Outcome::Retry(Some(ms(1))),
                        _ => Outcome::Done,
                    }
                }
            })
            .await;
        assert_eq!(summary.runs, 5);
        assert_eq!(summary.dead, 1);
        assert_eq!(summary.retried, 3);
        assert_eq!(summary.done, 1);
        assert_eq!(summary.last_outcome, Some(Outcome::Done));
    }

    /// The real clock, briefly: spacing within generous bounds.
    #[tokio::test]
    async fn real_clock_spacing() {
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&log);
        let ticker = Ticker::new(ms(20), ms(30), Some(3));
        let summary = ticker
            .run(CancellationToken::new(), "real", move || {
                seen.lock().expect("log").push(start.elapsed());
                futures::future::ready(Outcome::Done)
            })
            .await;
        assert_eq!(summary.runs, 3);
        let starts = starts_of(&log);
        assert!(starts[0] >= ms(20), "{starts:?}");
        assert!(starts[1] >= ms(50), "{starts:?}");
        assert!(starts[2] >= ms(80), "{starts:?}");
    }

    fn starts_of(log: &Arc<Mutex<Vec<Duration>>>) -> Vec<Duration> {
        log.lock().expect("log").clone()
    }

    #[tokio::test]
    async fn runs_a_registered_handler() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut registry = Registry::new();
        let seen = Arc::clone(&calls);
        registry
            .register("note", move |text: String| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().expect("calls").push(text);
                    Outcome::Done
                }
            })
            .expect("register");
        let registry = Arc::new(registry);
        let ticker = Ticker::new(ms(1), ms(2), Some(2));
        let summary = ticker
            .run_handler(
                CancellationToken::new(),
                Arc::clone(&registry),
                "note",
                Value::from("hi"),
            )
            .await;
        assert_eq!(summary.done, 2);
        assert_eq!(*calls.lock().expect("calls"), ["hi", "hi"]);
        let summary = ticker
            .run_handler(CancellationToken::new(), registry, "nope", Value::Null)
            .await;
        assert_eq!(summary.dead, 2);
    }

    #[test]
    fn tick_arithmetic() {
        let anchor = Instant::now();
        let t = ms(100);
        assert_eq!(next_tick(anchor, t, 0, anchor + ms(5)), 1);
        assert_eq!(next_tick(anchor, t, 0, anchor + ms(100)), 1);
        assert_eq!(next_tick(anchor, t, 0, anchor + ms(101)), 2);
        assert_eq!(next_tick(anchor, t, 3, anchor + ms(350)), 4);
        assert_eq!(next_tick(anchor, Duration::ZERO, 7, anchor + ms(350)), 8);
        assert_eq!(tick_time(anchor, t, 3), anchor + ms(300));
        assert_eq!(tick_time(anchor, Duration::ZERO, 3), anchor);
    }
}
