//! Durations on the wire: whole milliseconds, for every link's frames.
//!
//! Use with `#[serde(with = "crate::protocol::millis")]` (or
//! `millis::option` for `Option<Duration>`). The crate's own conversions
//! of durations and times to milliseconds (`of`, `since_epoch`, `now`)
//! live here too.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `d` in whole milliseconds, saturating at `u64::MAX` (584 million
/// years).
pub(crate) fn of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `t` in milliseconds since the Unix epoch; 0 for a time before it.
pub(crate) fn since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, of)
}

/// Now, in milliseconds since the Unix epoch (0 with a clock before it).
pub(crate) fn now() -> u64 {
    since_epoch(SystemTime::now())
}

/// Serializes a duration as milliseconds (saturating).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(of(*d))
}

/// Deserializes milliseconds into a duration.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// The same for `Option<Duration>`.
pub mod option {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes an optional duration as milliseconds or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::of(*d)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes milliseconds or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate_and_floor() {
        assert_eq!(of(Duration::from_micros(1999)), 1);
        assert_eq!(of(Duration::MAX), u64::MAX);
        assert_eq!(since_epoch(UNIX_EPOCH + Duration::from_millis(1500)), 1500);
        assert_eq!(since_epoch(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(now() > 1_700_000_000_000);
    }
}
