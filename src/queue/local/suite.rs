//! The behaviour every adapter must show, written once.
//!
//! Each function takes a constructor (options in, fresh empty queue out);
//! `behaviour_suite!(expr)` expands to one `#[test]` per function, where
//! `expr` evaluates to `(constructor, guard)` (the guard keeps, say, a temp
//! dir alive for the test's duration).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::{LocalQueue, LocalQueueError, MessageId, PushOptions, QueueOptions, QueueStats};

/// A constructor of empty queues.
pub(crate) type Make<'a> = &'a mut dyn FnMut(QueueOptions) -> Box<dyn LocalQueue>;

macro_rules! behaviour_suite {
    ($make:expr) => {
        $crate::queue::local::suite::behaviour_suite!(@tests $make;
            priority_then_fifo,
            delay_hides_until_due,
            expired_lease_is_delivered_again,
            stale_ack_after_expiry_keeps_message,
            unknown_lease_is_stale,
            dead_letter_after_max_receives,
            requeue_and_purge_dead,
            nack_with_delay,
            extend_keeps_hidden_longer,
            stats_and_next_visible_at,
            lease_ids_differ_per_receive,
            huge_durations_saturate
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let (mut make, _guard) = $make;
                $crate::queue::local::suite::$name(&mut make);
            }
        )*
    };
}
pub(crate) use behaviour_suite;

/// A fixed origin for explicit times.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn options(visibility_secs: u64, max_receives: u32) -> QueueOptions {
    QueueOptions {
        visibility_timeout: secs(visibility_secs),
        max_receives,
    }
}

fn prio(priority: i32) -> PushOptions {
    PushOptions {
        priority,
        ..PushOptions::default()
    }
}

fn push(
    queue: &mut dyn LocalQueue,
    name: &str,
    options: PushOptions,
    now: SystemTime,
) -> MessageId {
    queue
        .push_at(json!(name), options, now)
        .expect("push succeeds")
}

/// Receives one message, acks it, returns its payload name.
fn take(queue: &mut dyn LocalQueue, now: SystemTime) -> Option<String> {
    let lease = queue.receive(now).expect("receive succeeds")?;
    queue.ack_at(&lease.lease_id, now).expect("ack succeeds");
    lease.message.payload.as_str().map(str::to_owned)
}

pub(crate) fn priority_then_fifo(make: Make<'_>) {
    let mut q = make(QueueOptions::default());
    for (name, priority) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 5)] {
        push(&mut *q, name, prio(priority), at(0));
    }
    let order: Vec<String> = std::iter::from_fn(|| take(&mut *q, at(1))).collect();
    assert_eq!(order, ["b", "d", "f", "a", "c", "e"]);
    assert_eq!(q.stats_at(at(1)), QueueStats::default());
}

pub(crate) fn delay_hides_until_due(make: Make<'_>) {
    let mut q = make(QueueOptions::default());
    let delay = PushOptions {
        delay: secs(10),
        priority: 9,
    };
    push(&mut *q, "later", delay, at(0));
    push(&mut *q, "now", prio(0), at(0));
    assert_eq!(q.stats_at(at(0)).delayed, 1);
    assert_eq!(q.stats_at(at(0)).ready, 1);
    // The delayed one outranks the other, but is not visible yet.
    assert_eq!(take(&mut *q, at(9)).as_deref(), Some("now"));
    assert!(q.receive(at(9)).unwrap().is_none());
    assert_eq!(q.next_visible_at(), Some(at(10)));
    assert_eq!(q.stats_at(at(10)).ready, 1);
    assert_eq!(take(&mut *q, at(10)).as_deref(), Some("later"));
    assert_eq!(q.next_visible_at(), None);
}

pub(crate) fn expired_lease_is_delivered_again(make: Make<'_>) {
    let mut q = make(options(30, 5));
    let id = push(&mut *q, "job", prio(0), at(0));
    let first = q.receive(at(0)).unwrap().expect("ready");
    assert_eq!(first.message.id, id);
    assert_eq!(first.message.receive_count, 1);
    assert_eq!(first.expires_at, at(30));
    // Hidden while leased.
    assert!(q.receive(at(29)).unwrap().is_none());
    assert_eq!(q.stats_at(at(29)).in_flight, 1);
    // Visible again at the end of the lease, under a new lease id.
    let second = q.receive(at(30)).unwrap().expect("lease expired");
    assert_eq!(second.message.id, id);
    assert_eq!(second.message.receive_count, 2);
    assert_ne!(second.lease_id, first.lease_id);
    // The first worker's late ack is refused and deletes nothing.
    let err = q.ack_at(&first.lease_id, at(31)).unwrap_err();
    assert!(matches!(err, LocalQueueError::StaleLease { lease } if lease == first.lease_id));
    assert_eq!(q.stats_at(at(31)).in_flight, 1);
    assert!(q.nack_at(&first.lease_id, secs(0), at(31)).is_err());
    assert!(q.extend_at(&first.lease_id, secs(5), at(31)).is_err());
    assert_eq!(q.stats_at(at(31)).in_flight, 1);
    // The current holder's ack works.
    q.ack_at(&second.lease_id, at(31)).unwrap();
    assert_eq!(q.stats_at(at(1000)), QueueStats::default());
    assert!(q.receive(at(1000)).unwrap().is_none());
}

pub(crate) fn stale_ack_after_expiry_keeps_message(make: Make<'_>) {
    let mut q = make(options(30, 5));
    push(&mut *q, "job", prio(0), at(0));
    let lease = q.receive(at(0)).unwrap().expect("ready");
    // Expired, not yet received by anyone else: still stale.
    assert!(matches!(
        q.ack_at(&lease.lease_id, at(30)),
        Err(LocalQueueError::StaleLease { .. })
    ));
    assert_eq!(q.stats_at(at(30)).ready, 1);
    let again = q.receive(at(30)).unwrap().expect("still there");
    assert_eq!(again.message.id, lease.message.id);
    // A lease can be acked once.
    q.ack_at(&again.lease_id, at(31)).unwrap();
    assert!(matches!(
        q.ack_at(&again.lease_id, at(31)),
        Err(LocalQueueError::StaleLease { .. })
    ));
}

pub(crate) fn unknown_lease_is_stale(make: Make<'_>) {
    let mut q = make(QueueOptions::default());
    let bogus = super::LeaseId(4242);
    assert!(matches!(
        q.ack_at(&bogus, at(0)),
        Err(LocalQueueError::StaleLease { .. })
    ));
    assert!(matches!(
        q.nack_at(&bogus, secs(1), at(0)),
        Err(LocalQueueError::StaleLease { .. })
    ));
    assert!(matches!(
        q.extend_at(&bogus, secs(1), at(0)),
        Err(LocalQueueError::StaleLease { .. })
    ));
}

pub(crate) fn dead_letter_after_max_receives(make: Make<'_>) {
    let mut q = make(options(10, 3));
    let poison = push(&mut *q, "poison", prio(1), at(0));
    push(&mut *q, "fine", prio(0), at(0));
    // Three deliveries, none acked (two expire, one is nacked).
    let mut now = at(0);
    for round in 1..=3 {
        let lease = q.receive(now).unwrap().expect("delivered");
        assert_eq!(lease.message.id, poison);
        assert_eq!(lease.message.receive_count, round);
        if round == 3 {
            q.nack_at(&lease.lease_id, secs(0), now).unwrap();
        } else {
            now += secs(10);
        }
    }
    // Due again, but out of receives: dead-lettered, "fine" comes instead.
    assert_eq!(q.stats_at(now).dead, 1);
    assert_eq!(take(&mut *q, now).as_deref(), Some("fine"));
    assert!(q.receive(now).unwrap().is_none());
    let dead = q.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    assert_eq!(dead[0].receive_count, 3);
    assert_eq!(
        q.stats_at(now),
        QueueStats {
            dead: 1,
            ..QueueStats::default()
        }
    );
    assert_eq!(q.next_visible_at(), None);
}

pub(crate) fn requeue_and_purge_dead(make: Make<'_>) {
    let mut q = make(options(10, 1));
    let a = push(&mut *q, "a", prio(0), at(0));
    let b = push(&mut *q, "b", prio(0), at(0));
    let live = push(&mut *q, "live", prio(0), at(0));
    for _ in 0..2 {
        let lease = q.receive(at(0)).unwrap().expect("ready");
        q.nack_at(&lease.lease_id, secs(0), at(0)).unwrap();
    }
    // Both a and b are due again with receive_count 1 == max: dead.
    let lease = q.receive(at(0)).unwrap().expect("live is left");
    assert_eq!(lease.message.id, live);
    let dead: Vec<MessageId> = q.dead_letters().iter().map(|m| m.id).collect();
    assert_eq!(dead, [a, b]);

    assert!(matches!(
        q.requeue_dead_at(live, at(1)),
        Err(LocalQueueError::NotDead { id }) if id == live
    ));
    assert!(matches!(
        q.requeue_dead_at(MessageId(999), at(1)),
        Err(LocalQueueError::NotDead { .. })
    ));

    // Requeued: visible from the requeue time, count reset, delivered again.
    q.requeue_dead_at(a, at(5)).unwrap();
    assert_eq!(q.dead_letters().len(), 1);
    assert!(q.receive(at(4)).unwrap().is_none());
    let again = q.receive(at(5)).unwrap().expect("requeued");
    assert_eq!(again.message.id, a);
    assert_eq!(again.message.receive_count, 1);
    q.ack_at(&again.lease_id, at(5)).unwrap();

    assert_eq!(q.purge_dead().unwrap(), 1);
    assert!(q.dead_letters().is_empty());
    assert_eq!(q.purge_dead().unwrap(), 0);
    assert!(matches!(
        q.requeue_dead_at(b, at(6)),
        Err(LocalQueueError::NotDead { .. })
    ));
    // The live lease is untouched by all this.
    q.ack_at(&lease.lease_id, at(6)).unwrap();
    assert_eq!(q.stats_at(at(100)), QueueStats::default());
}

pub(crate) fn nack_with_delay(make: Make<'_>) {
    let mut q = make(options(30, 5));
    push(&mut *q, "job", prio(0), at(0));
    let lease = q.receive(at(0)).unwrap().expect("ready");
    q.nack_at(&lease.lease_id, secs(10), at(1)).unwrap();
    assert_eq!(q.stats_at(at(1)).delayed, 1);
    assert_eq!(q.next_visible_at(), Some(at(11)));
    // The lease is over: a second nack or an ack is stale.
    assert!(q.nack_at(&lease.lease_id, secs(0), at(2)).is_err());
    assert!(q.ack_at(&lease.lease_id, at(2)).is_err());
    assert!(q.receive(at(10)).unwrap().is_none());
    let again = q.receive(at(11)).unwrap().expect("delay over");
    assert_eq!(again.message.receive_count, 2);
    assert_eq!(again.message.visible_at, at(11));
    // nack without delay: visible at once.
    q.nack_at(&again.lease_id, secs(0), at(12)).unwrap();
    assert!(q.receive(at(12)).unwrap().is_some());
}

pub(crate) fn extend_keeps_hidden_longer(make: Make<'_>) {
    let mut q = make(options(30, 5));
    push(&mut *q, "job", prio(0), at(0));
    let lease = q.receive(at(0)).unwrap().expect("ready");
    let end = q.extend_at(&lease.lease_id, secs(60), at(20)).unwrap();
    assert_eq!(end, at(90));
    assert!(q.receive(at(60)).unwrap().is_none());
    assert_eq!(q.stats_at(at(89)).in_flight, 1);
    assert_eq!(q.next_visible_at(), Some(at(90)));
    q.ack_at(&lease.lease_id, at(80)).unwrap();
    assert_eq!(q.stats_at(at(80)), QueueStats::default());

    // An expired lease cannot be extended.
    push(&mut *q, "other", prio(0), at(100));
    let lease = q.receive(at(100)).unwrap().expect("ready");
    assert!(matches!(
        q.extend_at(&lease.lease_id, secs(60), at(130)),
        Err(LocalQueueError::StaleLease { .. })
    ));
    assert!(q.receive(at(130)).unwrap().is_some());
}

pub(crate) fn stats_and_next_visible_at(make: Make<'_>) {
    let mut q = make(options(30, 1));
    assert_eq!(q.stats_at(at(0)), QueueStats::default());
    assert_eq!(q.next_visible_at(), None);
    push(&mut *q, "ready", prio(0), at(0));
    push(
        &mut *q,
        "delayed",
        PushOptions {
            delay: secs(50),
            priority: 0,
        },
        at(0),
    );
    let lease = q.receive(at(0)).unwrap().expect("ready");
    assert_eq!(
        q.stats_at(at(0)),
        QueueStats {
            ready: 0,
            delayed: 1,
            in_flight: 1,
            dead: 0
        }
    );
    // The in-flight one is out of receives: its expiry is not a delivery.
    assert_eq!(q.next_visible_at(), Some(at(50)));
    // Seen from later, without changing anything: the lease expired into
    // the dead letters, the delay ran out.
    assert_eq!(
        q.stats_at(at(60)),
        QueueStats {
            ready: 1,
            delayed: 0,
            in_flight: 0,
            dead: 1
        }
    );
    assert!(q.dead_letters().is_empty());
    assert!(matches!(
        q.ack_at(&lease.lease_id, at(60)),
        Err(LocalQueueError::StaleLease { .. })
    ));
    assert_eq!(q.dead_letters().len(), 1);
    assert_eq!(q.next_visible_at(), Some(at(50)));
}

pub(crate) fn lease_ids_differ_per_receive(make: Make<'_>) {
    let mut q = make(options(1, 100));
    push(&mut *q, "a", prio(0), at(0));
    push(&mut *q, "b", prio(0), at(0));
    let mut seen = std::collections::HashSet::new();
    for n in 0..20 {
        let lease = q.receive(at(n)).unwrap().expect("ready");
        assert!(seen.insert(lease.lease_id), "lease id reused");
    }
}

pub(crate) fn huge_durations_saturate(make: Make<'_>) {
    let mut q = make(options(30, 5));
    let never = PushOptions {
        delay: Duration::MAX,
        priority: 0,
    };
    push(&mut *q, "never", never, at(0));
    push(&mut *q, "now", prio(0), at(0));
    let lease = q.receive(at(0)).unwrap().expect("ready");
    let end = q.extend_at(&lease.lease_id, Duration::MAX, at(0)).unwrap();
    assert!(end > at(100 * 365 * 24 * 3600));
    q.nack_at(&lease.lease_id, Duration::MAX, at(1)).unwrap();
    assert!(q.receive(at(1_000_000_000)).unwrap().is_none());
    assert_eq!(q.stats_at(at(1_000_000_000)).delayed, 2);
}
