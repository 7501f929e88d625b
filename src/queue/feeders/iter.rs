//! [`IterFeeder`]: the jobs of an iterator, in memory.

use serde::Serialize;

use crate::queue::{Feeder, Next};

/// A feeder serving the jobs of an iterator, in order, then
/// [`Next::Done`]. It counts the jobs acked and keeps the ones given up on
/// with their reasons.
///
/// ```
/// use taskherd::queue::{feeders::IterFeeder, Feeder, Next};
///
/// let mut feeder = IterFeeder::new(["a", "b"]);
/// let Next::Job(a) = feeder.next() else { unreachable!() };
/// let Next::Job(b) = feeder.next() else { unreachable!() };
/// assert_eq!(feeder.next(), Next::Done);
/// feeder.success(a);
/// feeder.error(b, "no such file");
/// assert_eq!(feeder.succeeded(), 1);
/// assert_eq!(feeder.failed()[0].job, "b");
/// assert_eq!(feeder.failed()[0].reason, "no such file");
/// ```
#[derive(Debug)]
pub struct IterFeeder<I: Iterator> {
    /// Where the jobs come from; fused, so it stays done once done.
    jobs: std::iter::Fuse<I>,
    /// Jobs acked so far.
    succeeded: u64,
    /// Jobs given up on, in the order their outcome came.
    failed: Vec<FailedJob<I::Item>>,
}

/// A job given up on, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedJob<J> {
    /// The job.
    pub job: J,
    /// Why (the consumer's reason, or the attempts running out).
    pub reason: String,
}

impl<I: Iterator> IterFeeder<I> {
    /// A feeder of the jobs of `jobs`.
    pub fn new<T: IntoIterator<IntoIter = I>>(jobs: T) -> Self {
        IterFeeder {
            jobs: jobs.into_iter().fuse(),
            succeeded: 0,
            failed: Vec::new(),
        }
    }

    /// How many jobs were acked.
    pub fn succeeded(&self) -> u64 {
        self.succeeded
    }

    /// The jobs given up on, in the order their outcome came.
    pub fn failed(&self) -> &[FailedJob<I::Item>] {
        &self.failed
    }

    /// The jobs given up on, by value.
    pub fn into_failed(self) -> Vec<FailedJob<I::Item>> {
        self.failed
    }
}

impl<I> Feeder for IterFeeder<I>
where
    I: Iterator + Send + 'static,
    I::Item: Serialize + Send + 'static,
{
    type Job = I::Item;

    fn next(&mut self) -> Next<I::Item> {
        match self.jobs.next() {
            Some(job) => Next::Job(job),
            None => Next::Done,
        }
    }

    fn success(&mut self, _job: I::Item) {
        self.succeeded += 1;
    }

    fn error(&mut self, job: I::Item, reason: &str) {
        self.failed.push(FailedJob {
            job,
            reason: reason.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn job<J>(next: Next<J>) -> J {
        match next {
            Next::Job(job) => job,
            Next::Empty => panic!("expected a job, got Empty"),
            Next::Done => panic!("expected a job, got Done"),
        }
    }

    #[test]
    fn iter_feeder_serves_in_order_then_done() {
        let mut feeder = IterFeeder::new(1..=3);
        let jobs: Vec<u32> = (0..3).map(|_| job(feeder.next())).collect();
        assert_eq!(jobs, [1, 2, 3]);
        assert_eq!(feeder.next(), Next::Done);
        assert_eq!(feeder.next(), Next::Done, "stays done");
        assert_eq!(feeder.recheck(), Duration::from_secs(1));
    }

    #[test]
    fn iter_feeder_counts_outcomes() {
        let mut feeder = IterFeeder::new(vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]);
        let one = job(feeder.next());
        let two = job(feeder.next());
        let three = job(feeder.next());
        feeder.success(two);
        feeder.error(three.clone(), "bad input");
        feeder.success(one);
        assert_eq!(feeder.succeeded(), 2);
        assert_eq!(
            feeder.failed(),
            [FailedJob {
                job: three,
                reason: "bad input".to_owned()
            }]
        );
        assert_eq!(feeder.into_failed().len(), 1);
    }
}
