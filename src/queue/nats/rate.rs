//! The group's `rate` on JetStream, shared by every consumer of the
//! group, under one master or several: the I/O-free part (names, slots
//! and their tokens), unit tested; the bridge does the I/O.
//!
//! JetStream 2.9 cannot rate-limit pull consumers, so the tokens are
//! messages of a stream of their own (`<stream>_RATE`, in memory,
//! work-queue retention, **at most one message**, new ones refused while
//! it is full: the token bucket). Time is cut in *slots* of
//! [`tick`]`(rate)` (100 ms, or one token's time when that is longer);
//! slot `k` (counted from the Unix epoch) is worth [`tokens_of_slot`]
//! tokens, so that slots `0..k` are worth `floor(k × tick × rate)`
//! together. Every consumer publishes the current slot's message with
//! the message id [`slot_id`]: the stream's deduplication keeps one per
//! slot however many consumers (and masters) publish it, so the group
//! gets `rate` tokens per second whoever issues them. A consumer takes a
//! token message (one pull, then Ack) when it has credits and no token
//! left, and pulls at most as many jobs as it holds tokens.
//!
//! What holds: in any `N` seconds the group's consumers pull at most
//! `rate × N + (consumers + 2) × tokens per slot` jobs (the slots issued
//! in that time, one more at the edge, the message waiting in the stream,
//! and what each consumer holds). Masters on several machines need
//! clocks within the stream's duplicate window (2 minutes) of each other;
//! skew in that window only shifts which consumer issues a slot.

use std::time::Duration;

use crate::protocol::slave::JetStreamQueue;

/// The shortest slot.
pub const MIN_TICK: Duration = Duration::from_millis(100);

/// The rate stream of the queue: the work stream's name + `_RATE`.
pub fn token_stream(queue: &JetStreamQueue) -> String {
    format!("{}_RATE", queue.stream)
}

/// The subject of the rate tokens: the governor's subject + `.tokens`.
pub fn token_subject(queue: &JetStreamQueue) -> String {
    format!("{}.tokens", queue.governor_subject)
}

/// The length of a slot at `rate` jobs/s: 100 ms, or one token's time
/// when that is longer (at most an hour).
pub fn tick(rate: f64) -> Duration {
    let one = if rate.is_finite() && rate > 0.0 {
        Duration::from_secs_f64((1.0 / rate).min(3600.0))
    } else {
        Duration::from_secs(3600)
    };
    one.max(MIN_TICK)
}

/// The slot of a time (`unix_ms`, Unix milliseconds).
pub fn slot_of(unix_ms: u64, tick: Duration) -> u64 {
    let tick_ms = u64::try_from(tick.as_millis()).unwrap_or(u64::MAX).max(1);
    unix_ms / tick_ms
}

/// The tokens of slot `k`: `floor((k + 1) × tick × rate) − floor(k ×
/// tick × rate)`, so whole slots add up to the rate exactly (0 for a
/// slot that is worth less than one token).
pub fn tokens_of_slot(rate: f64, tick: Duration, k: u64) -> u64 {
    let per_slot = tick.as_secs_f64() * rate;
    let upto = |slot: u64| (slot as f64 * per_slot).floor();
    let tokens = upto(k + 1) - upto(k);
    if tokens.is_finite() && tokens > 0.0 {
        tokens as u64
    } else {
        0
    }
}

/// The message id of slot `k` (its deduplication among publishers).
pub fn slot_id(k: u64) -> String {
    format!("rate-{k}")
}

/// The tokens a token message carries (its body, a decimal number).
pub fn tokens_of_message(body: &[u8]) -> u64 {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_add_up_to_the_rate() {
        for rate in [0.5, 1.0, 3.0, 20.0, 33.3, 1000.0, 12345.0] {
            let tick = tick(rate);
            assert!(tick >= MIN_TICK);
            // Any run of slots is worth the rate over its length, within
            // one slot's tokens.
            let start = slot_of(1_796_601_802_080, tick);
            let slots = 600;
            let total: u64 = (start..start + slots)
                .map(|k| tokens_of_slot(rate, tick, k))
                .sum();
            let expected = slots as f64 * tick.as_secs_f64() * rate;
            let per_slot = (tick.as_secs_f64() * rate).ceil();
            assert!(
                (total as f64 - expected).abs() <= per_slot,
                "rate {rate}: {total} tokens, {expected} expected"
            );
            // Never more than a slot's worth (rounded up) in one slot.
            assert!(
                (start..start + slots).all(|k| tokens_of_slot(rate, tick, k) as f64 <= per_slot)
            );
        }
    }

    #[test]
    fn slow_rates_have_one_token_per_slot_and_fast_ones_100_ms_slots() {
        assert_eq!(tick(2.0), Duration::from_millis(500));
        assert_eq!(tokens_of_slot(2.0, tick(2.0), 7), 1);
        assert_eq!(tick(20.0), MIN_TICK);
        assert_eq!(tokens_of_slot(20.0, MIN_TICK, 7), 2);
        assert_eq!(slot_of(1050, MIN_TICK), 10);
        assert_eq!(slot_id(10), "rate-10");
        assert_eq!(tokens_of_message(b"12"), 12);
        assert_eq!(tokens_of_message(b"x"), 0);
    }
}
