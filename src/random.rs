//! The crate's one source of randomness for jitter: [`unit`].
//!
//! Not for secrets: the per-run secret and the handshake nonces take their
//! bytes from the system (`getrandom`, through
//! [`random_hex`](crate::protocol::queue::random_hex)).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    /// Each thread's xorshift64* state, seeded once from the system.
    static STATE: Cell<u64> = Cell::new(seed());
}

/// A number uniform in [0, 1), to spread delays (backoff jitter). Cheap:
/// a small generator per thread, seeded from the system's randomness.
pub(crate) fn unit() -> f64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        let bits = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        // 53 bits: exact in an f64.
        bits as f64 / (1u64 << 53) as f64
    })
}

/// A seed from the system's randomness or, without it, from std's
/// per-process hash keys mixed with the time; never 0 (xorshift's fixed
/// point).
fn seed() -> u64 {
    let seed = getrandom::u64().unwrap_or_else(|_| {
        let mut hasher = RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        hasher.write_u128(nanos);
        hasher.finish()
    });
    seed | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_in_range_and_spread() {
        let draws: Vec<f64> = (0..1000).map(|_| unit()).collect();
        assert!(draws.iter().all(|r| (0.0..1.0).contains(r)));
        let low = draws.iter().filter(|&&r| r < 0.5).count();
        assert!((350..650).contains(&low), "{low} of 1000 below 0.5");
        assert_ne!(draws[0], draws[1]);
    }
}
