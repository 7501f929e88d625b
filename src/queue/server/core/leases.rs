//! The leases a feeder server has out, with their expiry order.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

/// A job leased to a consumer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    /// The job leased.
    pub(super) job: u64,
    /// The connection of the consumer holding it.
    pub(super) conn: u64,
    /// When it ends.
    pub(super) expires: Instant,
    /// When it was granted: the start of the attempt.
    pub(super) granted: Instant,
}

/// The leases out, by number, with an index of their expiry: leases last
/// the same time, but an extended one
/// ([`ToFeeder::Extend`](crate::protocol::queue::ToFeeder::Extend)) ends
/// after leases numbered after it.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// Leases by number.
    by_number: BTreeMap<u64, Lease>,
    /// Every lease of `by_number` as `(expires, number)`: the expiry order.
    expiry: BTreeSet<(Instant, u64)>,
}

impl Leases {
    pub(super) fn get(&self, number: &u64) -> Option<&Lease> {
        self.by_number.get(number)
    }

    pub(super) fn len(&self) -> usize {
        self.by_number.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Lease)> {
        self.by_number.iter()
    }

    /// Records a lease (replacing one of the same number).
    pub(super) fn insert(&mut self, number: u64, lease: Lease) {
        if let Some(old) = self.by_number.insert(number, lease) {
            self.expiry.remove(&(old.expires, number));
        }
        self.expiry.insert((lease.expires, number));
    }

    /// Forgets a lease.
    pub(super) fn remove(&mut self, number: u64) -> Option<Lease> {
        let lease = self.by_number.remove(&number)?;
        self.expiry.remove(&(lease.expires, number));
        Some(lease)
    }

    /// Moves the end of a lease (if it is still out).
    pub(super) fn set_expiry(&mut self, number: u64, expires: Instant) {
        if let Some(lease) = self.by_number.get_mut(&number) {
            self.expiry.remove(&(lease.expires, number));
            lease.expires = expires;
            self.expiry.insert((expires, number));
        }
    }

    /// When the first lease ends.
    pub(super) fn first_expiry(&self) -> Option<Instant> {
        self.expiry.first().map(|(expires, _)| *expires)
    }

    /// Removes and returns a lease that ended by `now`, the earliest first.
    pub(super) fn pop_expired(&mut self, now: Instant) -> Option<(u64, Lease)> {
        let &(expires, number) = self.expiry.first()?;
        if expires > now {
            return None;
        }
        self.expiry.pop_first();
        self.by_number.remove(&number).map(|lease| (number, lease))
    }
}

#[cfg(test)]
impl Leases {
    /// Entries in the expiry index (it must follow `by_number`).
    pub(super) fn index_len(&self) -> usize {
        debug_assert_eq!(self.expiry.len(), self.by_number.len());
        self.expiry.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lease(job: u64, expires: Instant) -> Lease {
        Lease {
            job,
            conn: 1,
            expires,
            granted: expires,
        }
    }

    #[test]
    fn leases_expire_in_expiry_order_not_number_order() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut leases = Leases::default();
        leases.insert(1, lease(10, start + s(10)));
        leases.insert(2, lease(20, start + s(10)));
        leases.insert(3, lease(30, start + s(12)));
        // Lease 1 extended past the others.
        leases.set_expiry(1, start + s(16));
        assert_eq!(leases.first_expiry(), Some(start + s(10)));
        assert!(leases.pop_expired(start + s(9)).is_none());
        let expired: Vec<u64> = std::iter::from_fn(|| leases.pop_expired(start + s(12)))
            .map(|(number, _)| number)
            .collect();
        assert_eq!(expired, [2, 3]);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases.first_expiry(), Some(start + s(16)));
        // A lease replaced or removed leaves the index with it.
        leases.insert(1, lease(10, start + s(20)));
        assert_eq!(leases.index_len(), 1);
        assert_eq!(leases.remove(1).map(|l| l.job), Some(10));
        assert!(leases.is_empty());
        assert_eq!(leases.index_len(), 0);
        assert!(leases.first_expiry().is_none());
        // Moving the end of a lease that is gone changes nothing.
        leases.set_expiry(1, start);
        assert_eq!(leases.index_len(), 0);
    }
}
