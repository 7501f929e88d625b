//! `GET /v1/events`: the herd's server-sent event stream.
//!
//! Events (each `data` is one JSON object):
//!
//! - `status`: the whole status (as `GET /v1/status`), first on connect,
//!   then at most every [`STATUS_EVERY`] while something changed;
//! - `instance`: one instance event as it happens (`created`, `started`,
//!   `stopping`, `exited`, `backoff`, `timed_out`, `suspended`, `ended`,
//!   with the instance's `id`, `group`, `group_id`, `host`, `time_ms`);
//! - `queue`: a feeder's latest counts (`group`, `progress`);
//! - `stats`: every [`STATS_EVERY`], the totals a chart turns into rates
//!   (`time_ms`, `jobs_done`, `log_lines`, `log_bytes`);
//! - `hosts`: each host's connection (as `GET /v1/hosts`), first on
//!   connect, then when it changes (looked at every [`STATS_EVERY`]);
//! - `lagged`: this client fell behind and missed `missed` events (a
//!   `status` follows).
//!
//! A slow client never slows the herd: its events wait in a bounded
//! channel and the oldest are dropped when it is full.

use crate::log::LogSink;
use crate::master::herd::{Herd, Published};
use crate::master::links::HostLinks;
use crate::protocol::millis;
use crate::supervise::instance::EventKind;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Shortest time between two `status` events.
pub(crate) const STATUS_EVERY: Duration = Duration::from_millis(250);

/// Time between two `stats` events.
pub(crate) const STATS_EVERY: Duration = Duration::from_secs(1);

/// The stream of one client.
pub(super) fn stream(
    herd: &Herd,
    sink: &LogSink,
    links: &HostLinks,
    stop: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut hosts_tick = tokio::time::interval(STATS_EVERY);
    hosts_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stats_tick = tokio::time::interval_at(Instant::now() + STATS_EVERY, STATS_EVERY);
    stats_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let feed = Feed {
        events: herd.board().subscribe(),
        changed: herd.board().watch(),
        herd: herd.clone(),
        sink: sink.clone(),
        status_tick,
        stats_tick,
        dirty: true,
        stop,
        links: links.clone(),
        hosts_tick,
        hosts_sent: None,
    };
    let events = futures::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok::<Event, Infallible>(event), feed))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

struct Feed {
    herd: Herd,
    sink: LogSink,
    events: broadcast::Receiver<Published>,
    changed: watch::Receiver<u64>,
    status_tick: Interval,
    stats_tick: Interval,
    /// The status changed since the last `status` event.
    dirty: bool,
    stop: CancellationToken,
    links: HostLinks,
    hosts_tick: Interval,
    /// The hosts of the last `hosts` event.
    hosts_sent: Option<Value>,
}

impl Feed {
    /// The next event, or `None` once the master stops serving.
    async fn next(&mut self) -> Option<Event> {
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return None,
                received = self.events.recv() => match received {
                    Ok(published) => return Some(instance_event(&published)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.dirty = true;
                        return Some(json_event("lagged", &json!({ "missed": missed })));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.dirty = true;
                }
                _ = self.status_tick.tick(), if self.dirty => {
                    self.dirty = false;
                    self.changed.mark_unchanged();
                    let status = self.herd.status();
                    return Some(json_event("status", &status));
                }
                _ = self.stats_tick.tick() => return Some(self.stats()),
                _ = self.hosts_tick.tick() => {
                    let hosts = hosts_json(&self.herd, &self.links);
                    if self.hosts_sent.as_ref() != Some(&hosts) {
                        let event = json_event("hosts", &hosts);
                        self.hosts_sent = Some(hosts);
                        return Some(event);
                    }
                }
            }
        }
    }

    fn stats(&self) -> Event {
        let status = self.herd.status();
        let jobs_done: u64 = status
            .groups
            .iter()
            .filter_map(|g| g.queue.as_ref())
            .map(|q| q.done)
            .sum();
        let log = self.sink.totals();
        json_event(
            "stats",
            &json!({
                "time_ms": millis::since_epoch(SystemTime::now()),
                "jobs_done": jobs_done,
                "log_lines": log.lines,
                "log_bytes": log.bytes,
            }),
        )
    }
}

/// Each host's connection: `{"hosts": [{"host", "state", "since_ms",
/// "problem"}]}` (`GET /v1/hosts`, the `hosts` event).
pub(super) fn hosts_json(herd: &Herd, links: &HostLinks) -> Value {
    let links = links.snapshot();
    let states = super::metrics::host_states(&herd.status(), &links);
    let hosts: Vec<Value> = states
        .iter()
        .map(|(host, state)| {
            let link = links.get(host);
            json!({
                "host": host,
                "state": state.name(),
                "since_ms": link.map(|link| link.since_ms),
                "problem": link.and_then(|link| link.problem.clone()),
            })
        })
        .collect();
    json!({ "hosts": hosts })
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    Event::default().event(name).data(data)
}

/// An `instance` (or, for a feeder's counts, `queue`) event.
fn instance_event(published: &Published) -> Event {
    let (label, event) = published.as_ref();
    if let EventKind::Progress { progress } = &event.kind {
        let data = json!({
            "group": label.group,
            "id": label.id,
            "time_ms": event.time_ms,
            "progress": progress,
        });
        return json_event("queue", &data);
    }
    let mut data = serde_json::to_value(&event.kind).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut data {
        map.insert("id".into(), label.id.into());
        map.insert("group".into(), label.group.clone().into());
        map.insert("group_id".into(), label.group_id.into());
        map.insert("host".into(), label.host.clone().into());
        map.insert("time_ms".into(), event.time_ms.into());
    }
    json_event("instance", &data)
}
