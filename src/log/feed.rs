//! What `taskherd logs` reads: the recent records the master keeps (the
//! backlog of `--tail N` and `--no-follow`) and the live feed, both
//! unfiltered.
//!
//! The writer publishes each batch under one lock, and a follower takes
//! its backlog and subscribes under the same lock: it gets every record
//! once, none twice and none missed between the two.

use super::LogRecord;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::broadcast;

/// Lines the backlog keeps at most (the most `logs --tail N` can give).
pub const BACKLOG_LINES: usize = 1000;

/// Bytes of messages the backlog keeps at most, so that long lines cannot
/// make it big: with lines of more than about 1 KiB it holds fewer than
/// [`BACKLOG_LINES`].
pub const BACKLOG_BYTES: usize = 1 << 20;

/// The backlog and the live feed, shared by the writer (which publishes)
/// and every sink (whose callers follow).
#[derive(Debug)]
pub(super) struct Feed {
    /// The recent records, oldest first.
    backlog: Mutex<Backlog>,
    /// Live subscribers.
    live_tx: broadcast::Sender<Arc<LogRecord>>,
    /// Whether records are kept at all (not for a sink whose records go
    /// elsewhere, such as an agent's).
    keep: bool,
    /// Lines of instances' output published so far (not the master's
    /// events), for the master's metrics.
    output_lines: AtomicU64,
    /// Their bytes (the messages' text, without newlines).
    output_bytes: AtomicU64,
}

/// How much instances' output the log has relayed so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogTotals {
    /// Lines of output (the master's own events are not counted).
    pub lines: u64,
    /// Their bytes, without newlines.
    pub bytes: u64,
}

/// The recent records and what they add up to.
#[derive(Debug, Default)]
struct Backlog {
    /// Each record with its number of lines.
    records: VecDeque<(Arc<LogRecord>, usize)>,
    /// Lines in `records`.
    lines: usize,
    /// Message bytes in `records`.
    bytes: usize,
}

impl Backlog {
    fn push(&mut self, record: Arc<LogRecord>) {
        let lines = record.message.line_count();
        self.lines += lines;
        self.bytes += record.message.len();
        self.records.push_back((record, lines));
        // Whole records go: the oldest as long as the rest still holds
        // the lines kept, or while the bytes are over.
        while let Some((front, front_lines)) = self.records.front() {
            let over_lines = self.lines - front_lines >= BACKLOG_LINES;
            if !over_lines && self.bytes <= BACKLOG_BYTES {
                break;
            }
            self.lines -= front_lines;
            self.bytes -= front.message.len();
            self.records.pop_front();
        }
    }
}

/// What a follower gets: the last lines of the backlog it asked for, and
/// the live records after them.
#[derive(Debug)]
pub struct Follow {
    /// Records of the backlog, oldest first; only the last
    /// `lines - skip` lines of them are wanted: skip the first `skip`
    /// lines of the first record.
    pub backlog: Vec<Arc<LogRecord>>,
    /// Lines of the first backlog record that are older than asked for.
    pub skip: usize,
    /// Every record published after the backlog, if asked for.
    pub live: Option<broadcast::Receiver<Arc<LogRecord>>>,
}

impl Feed {
    /// A feed whose live channel holds `capacity` records per subscriber;
    /// `keep`: whether a backlog is kept.
    pub(super) fn new(capacity: usize, keep: bool) -> Feed {
        Feed {
            backlog: Mutex::new(Backlog::default()),
            live_tx: broadcast::channel(capacity).0,
            keep,
            output_lines: AtomicU64::new(0),
            output_bytes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Backlog> {
        // Plain data: a panic while it was held leaves nothing half done
        // that matters more than losing the log.
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a batch of records to the backlog and to live subscribers
    /// (leaving `batch` empty).
    pub(super) fn publish(&self, batch: &mut Vec<Arc<LogRecord>>) {
        if batch.is_empty() {
            return;
        }
        let (lines, bytes) = batch
            .iter()
            .filter(|record| record.stream != crate::protocol::instance::Stream::Master)
            .fold((0, 0), |(lines, bytes), record| {
                (
                    lines + record.message.line_count() as u64,
                    bytes + record.message.len() as u64,
                )
            });
        self.output_lines.fetch_add(lines, Ordering::Relaxed);
        self.output_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut backlog = self.lock();
        let live = self.live_tx.receiver_count() > 0;
        for record in batch.drain(..) {
            if live {
                // Fails only if the last subscriber just left.
                let _ = self.live_tx.send(Arc::clone(&record));
            }
            if self.keep {
                backlog.push(record);
            }
        }
    }

    /// What has been published so far.
    pub(super) fn totals(&self) -> LogTotals {
        LogTotals {
            lines: self.output_lines.load(Ordering::Relaxed),
            bytes: self.output_bytes.load(Ordering::Relaxed),
        }
    }

    /// A live subscription, from the next published batch on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        let _backlog = self.lock();
        self.live_tx.subscribe()
    }

    /// The last `lines` lines of the backlog among the records `wanted`
    /// keeps, and (with `follow`) a subscription to every record after
    /// them.
    pub(super) fn follow(
        &self,
        lines: usize,
        wanted: impl Fn(&LogRecord) -> bool,
        follow: bool,
    ) -> Follow {
        let backlog = self.lock();
        let mut taken = Vec::new();
        let mut found = 0;
        if lines > 0 {
            for (record, count) in backlog.records.iter().rev() {
                if !wanted(record) {
                    continue;
                }
                taken.push(Arc::clone(record));
                found += count;
                if found >= lines {
                    break;
                }
            }
        }
        taken.reverse();
        let live = follow.then(|| self.live_tx.subscribe());
        drop(backlog);
        Follow {
            backlog: taken,
            skip: found.saturating_sub(lines),
            live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{InstanceLabel, Stream};
    use crate::protocol::slave::Level;
    use std::time::SystemTime;

    fn record(group: &str, message: &str) -> Arc<LogRecord> {
        Arc::new(LogRecord {
            time: SystemTime::now(),
            level: Level::Info,
            instance: Some(Arc::new(InstanceLabel {
                group: group.into(),
                host: "localhost".into(),
                command: "w".into(),
                id: 1,
                group_id: 1,
            })),
            stream: Stream::Stdout,
            message: message.into(),
        })
    }

    fn lines_of(follow: &Follow) -> Vec<String> {
        let mut lines: Vec<String> = follow
            .backlog
            .iter()
            .flat_map(|r| r.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        lines.drain(..follow.skip);
        lines
    }

    #[test]
    fn the_last_lines_of_the_wanted_records() {
        let feed = Feed::new(16, true);
        let mut batch = vec![
            record("a", "a1\na2\na3"),
            record("b", "b1"),
            record("a", "a4"),
        ];
        feed.publish(&mut batch);
        assert!(batch.is_empty());
        let all = feed.follow(3, |_| true, false);
        assert_eq!(lines_of(&all), ["a3", "b1", "a4"]);
        assert!(all.live.is_none());
        let of_a = feed.follow(2, |r| r.instance.as_ref().unwrap().group == "a", false);
        assert_eq!(lines_of(&of_a), ["a3", "a4"]);
        let more = feed.follow(100, |_| true, false);
        assert_eq!(lines_of(&more), ["a1", "a2", "a3", "b1", "a4"]);
        assert!(feed.follow(0, |_| true, false).backlog.is_empty());
    }

    #[test]
    fn a_follower_gets_each_record_once() {
        let feed = Feed::new(16, true);
        feed.publish(&mut vec![record("a", "old")]);
        let mut follow = feed.follow(10, |_| true, true);
        feed.publish(&mut vec![record("a", "new")]);
        assert_eq!(lines_of(&follow), ["old"]);
        let live = follow.live.as_mut().unwrap();
        assert_eq!(live.try_recv().unwrap().message, "new");
        assert!(live.try_recv().is_err());
    }

    #[test]
    fn the_backlog_is_bounded_by_lines_and_bytes() {
        let feed = Feed::new(16, true);
        for n in 0..BACKLOG_LINES * 2 {
            feed.publish(&mut vec![record("a", &format!("line {n}"))]);
        }
        let kept = feed.follow(usize::MAX, |_| true, false);
        assert_eq!(kept.backlog.len(), BACKLOG_LINES);
        assert_eq!(kept.backlog[0].message, format!("line {BACKLOG_LINES}"));

        let long = "x".repeat(64 * 1024);
        for _ in 0..40 {
            feed.publish(&mut vec![record("a", &long)]);
        }
        let backlog = feed.lock();
        assert!(backlog.bytes <= BACKLOG_BYTES, "{}", backlog.bytes);
        assert_eq!(backlog.records.len(), BACKLOG_BYTES / long.len());
    }

    #[test]
    fn a_feed_that_keeps_nothing_still_feeds_subscribers() {
        let feed = Feed::new(16, false);
        let mut live = feed.subscribe();
        feed.publish(&mut vec![record("a", "x")]);
        assert_eq!(live.try_recv().unwrap().message, "x");
        assert!(feed.follow(10, |_| true, false).backlog.is_empty());
    }
}
