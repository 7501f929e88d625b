//! `/metrics`: the herd in the Prometheus text format (0.0.4), written by
//! the `prometheus-client` crate from a collector that reads the core's
//! status at each scrape (so the counts are those of `status --json`),
//! the counts of instance events the board keeps ([`EventTally`]), the
//! log's totals and the master's own CPU time and memory.

use super::enqueue::Intakes;
use crate::log::{InstanceLabel, LogSink, LogTotals};
use crate::master::herd::Herd;
use crate::master::links::{HostLinks, Link, LinkState};
use crate::protocol::control::{HerdStatus, InstanceState};
use crate::protocol::slave::{JobDurations, JOB_DURATION_BOUNDS};
use crate::supervise::instance::EventKind;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

/// Counts of instance events since the master started, by group.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventTally {
    /// Instances killed for giving no sign of life, by group.
    pub(crate) liveness_kills: BTreeMap<String, u64>,
    /// Processes that ended, by group and cause.
    pub(crate) exits: BTreeMap<(String, &'static str), u64>,
}

impl EventTally {
    /// Counts one event of `label`'s instance.
    pub(crate) fn count(&mut self, label: &InstanceLabel, kind: &EventKind) {
        match kind {
            EventKind::TimedOut => {
                *self.liveness_kills.entry(label.group.clone()).or_default() += 1;
            }
            EventKind::Exited { how, failed } => {
                let cause = exit_cause(how, *failed);
                *self.exits.entry((label.group.clone(), cause)).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// The `cause` label of an exit: `success`, `error` (a non-zero status),
/// `signal`, `host_lost` or `other` (it could not start, ...).
fn exit_cause(how: &str, failed: bool) -> &'static str {
    if how.starts_with("host lost") {
        "host_lost"
    } else if how.starts_with("killed by") {
        "signal"
    } else if how.starts_with("exited with code") {
        if failed {
            "error"
        } else {
            "success"
        }
    } else {
        "other"
    }
}

/// Everything one scrape shows, read once.
#[derive(Debug)]
struct Snapshot {
    status: HerdStatus,
    tally: EventTally,
    log: LogTotals,
    accepted: BTreeMap<String, u64>,
    process: Option<ProcessStats>,
    /// Each remote host's connection.
    links: BTreeMap<String, Link>,
}

/// The master's own CPU time and memory (from `/proc/self`).
#[derive(Debug, Clone, Copy)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times: Linux's USER_HZ,
/// fixed at 100 for user space.
const USER_HZ: f64 = 100.0;

fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / USER_HZ,
        resident_bytes: rss_kb * 1024,
    })
}

/// The text of `/metrics`.
pub(super) fn render(herd: &Herd, sink: &LogSink, intakes: &Intakes, links: &HostLinks) -> String {
    let snapshot = Snapshot {
        status: herd.status(),
        tally: herd.board().tally(),
        log: sink.totals(),
        accepted: intakes.accepted(),
        process: process_stats(),
        links: links.snapshot(),
    };
    encode(snapshot)
}

fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HerdCollector(snapshot)));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

#[derive(Debug)]
struct HerdCollector(Snapshot);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: name, help, type, and its samples.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        value.encode(sample)?;
    }
    Ok(())
}

/// One metric without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    value: M,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    value.encode(metric)
}

/// A feeder's [`JobDurations`] as a Prometheus histogram.
#[derive(Debug)]
struct JobHistogram(JobDurations);

impl EncodeMetric for JobHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = JOB_DURATION_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.buckets)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum_seconds, self.0.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every state, so that a state with no instance shows as 0.
const STATES: [InstanceState; 10] = [
    InstanceState::Pending,
    InstanceState::Waiting,
    InstanceState::Running,
    InstanceState::Stopping,
    InstanceState::Backoff,
    InstanceState::Suspended,
    InstanceState::Completed,
    InstanceState::Failed,
    InstanceState::Stopped,
    InstanceState::Lost,
];

impl Collector for HerdCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Snapshot {
            status,
            tally,
            log,
            accepted,
            process,
            links: _,
        } = &self.0;
        let groups = &status.groups;
        let gauge = |n: u64| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        family(
            &mut encoder,
            "taskherd_instances",
            "Instances by group and state (as taskherd status shows them)",
            MetricType::Gauge,
            groups.iter().flat_map(|group| {
                STATES.iter().map(move |state| {
                    let n = group.instances.iter().filter(|i| i.state == *state).count();
                    (
                        vec![("group", group.name.as_str()), ("state", state.as_str())],
                        gauge(n as u64),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "taskherd_group_suspended",
            "1 when an operator suspended the group",
            MetricType::Gauge,
            groups.iter().map(|g| {
                (
                    vec![("group", g.name.as_str())],
                    gauge(u64::from(g.suspended)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "taskherd_instance_restarts",
            "Restarts of the group's current instances since the master started them",
            MetricType::Counter,
            groups.iter().map(|g| {
                let restarts: u64 = g.instances.iter().map(|i| u64::from(i.restarts)).sum();
                (
                    vec![("group", g.name.as_str())],
                    ConstCounter::new(restarts),
                )
            }),
        )?;
        family(
            &mut encoder,
            "taskherd_liveness_kills",
            "Instances killed for giving no sign of life within their timeout",
            MetricType::Counter,
            groups.iter().map(|g| {
                let n = tally.liveness_kills.get(&g.name).copied().unwrap_or(0);
                (vec![("group", g.name.as_str())], ConstCounter::new(n))
            }),
        )?;
        family(
            &mut encoder,
            "taskherd_instance_exits",
            "Processes of instances that ended, by cause (success, error, signal, host_lost, other)",
            MetricType::Counter,
            tally.exits.iter().map(|((group, cause), n)| {
                (vec![("group", group.as_str()), ("cause", *cause)], ConstCounter::new(*n))
            }),
        )?;
        let queues = || {
            groups
                .iter()
                .filter_map(|g| Some((g.name.as_str(), g.queue.as_ref()?)))
        };
        family(
            &mut encoder,
            "taskherd_queue_jobs",
            "Jobs of a queue group's feeder now: pending (ready or delayed) and in_flight (leased)",
            MetricType::Gauge,
            queues().flat_map(|(group, q)| {
                [
                    (
                        vec![("group", group), ("state", "pending")],
                        gauge(q.pending),
                    ),
                    (
                        vec![("group", group), ("state", "in_flight")],
                        gauge(q.in_flight),
                    ),
                ]
            }),
        )?;
        for (name, help, value) in [
            (
                "taskherd_queue_jobs_done",
                "Jobs acked by consumers (the feeder's count)",
                (|q| q.done) as fn(&crate::protocol::slave::QueueProgress) -> u64,
            ),
            (
                "taskherd_queue_jobs_failed",
                "Failed attempts: retry or dead outcomes and lost leases",
                |q| q.failed,
            ),
            (
                "taskherd_queue_jobs_retried",
                "Jobs put back for another attempt",
                |q| q.retried,
            ),
            ("taskherd_queue_jobs_dead", "Jobs dead-lettered", |q| q.dead),
        ] {
            family(
                &mut encoder,
                name,
                help,
                MetricType::Counter,
                queues().map(|(group, q)| (vec![("group", group)], ConstCounter::new(value(q)))),
            )?;
        }
        family(
            &mut encoder,
            "taskherd_job_duration_seconds",
            "How long the jobs done took, from the lease to the ack (the attempt that succeeded)",
            MetricType::Histogram,
            queues().map(|(group, q)| (vec![("group", group)], JobHistogram(q.durations))),
        )?;
        family(
            &mut encoder,
            "taskherd_queue_consumers",
            "Consumers connected to the group's feeder",
            MetricType::Gauge,
            queues().map(|(group, q)| (vec![("group", group)], gauge(u64::from(q.consumers)))),
        )?;
        family(
            &mut encoder,
            "taskherd_http_jobs_accepted",
            "Jobs accepted by POST /v1/queues/{group}/jobs",
            MetricType::Counter,
            accepted
                .iter()
                .map(|(group, n)| (vec![("group", group.as_str())], ConstCounter::new(*n))),
        )?;
        single(
            &mut encoder,
            "taskherd_log_lines",
            "Lines of instances' output relayed to the log",
            MetricType::Counter,
            ConstCounter::new(log.lines),
        )?;
        single(
            &mut encoder,
            "taskherd_log_bytes",
            "Bytes of instances' output relayed to the log (without newlines)",
            MetricType::Counter,
            ConstCounter::new(log.bytes),
        )?;
        let hosts = host_states(status, &self.0.links);
        family(
            &mut encoder,
            "taskherd_host_up",
            "1 when the host is reachable: the master's own, or a remote host whose agent is connected; else 0",
            MetricType::Gauge,
            hosts.iter().map(|(host, state)| {
                (
                    vec![("host", host.as_str())],
                    gauge(u64::from(*state == LinkState::Up)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "taskherd_host_state",
            "The connection state of each host: 1 for its state (connecting, up, down), 0 for the others",
            MetricType::Gauge,
            hosts.iter().flat_map(|(host, state)| {
                [LinkState::Connecting, LinkState::Up, LinkState::Down]
                    .into_iter()
                    .map(move |each| {
                        (
                            vec![("host", host.as_str()), ("state", each.name())],
                            gauge(u64::from(*state == each)),
                        )
                    })
            }),
        )?;
        single(
            &mut encoder,
            "taskherd_uptime_seconds",
            "How long the master has run",
            MetricType::Gauge,
            ConstGauge::new(status.uptime_ms as f64 / 1000.0),
        )?;
        if let Some(process) = process {
            single(
                &mut encoder,
                "process_cpu_seconds",
                "CPU time of the master process (user and system)",
                MetricType::Counter,
                ConstCounter::new(process.cpu_seconds),
            )?;
            single(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory of the master process",
                MetricType::Gauge,
                gauge(process.resident_bytes),
            )?;
        }
        Ok(())
    }
}

/// Each host of the herd (the master's own is `local`) and its
/// connection: a remote host as its supervisor last noted it (`links`),
/// or connecting while its supervisor has not started yet; the master's
/// own is up. A remote host whose supervisor ended with its every
/// instance (nothing runs there any more) is not listed.
pub(crate) fn host_states(
    status: &HerdStatus,
    links: &BTreeMap<String, Link>,
) -> BTreeMap<String, LinkState> {
    let mut hosts: BTreeMap<String, LinkState> = links
        .iter()
        .map(|(host, link)| (host.clone(), link.state))
        .collect();
    for instance in status.groups.iter().flat_map(|g| g.instances.iter()) {
        let state = if instance.host == crate::master::plan::LOCAL_HOST {
            LinkState::Up
        } else if crate::master::core::is_final(instance.state) {
            continue;
        } else {
            LinkState::Connecting
        };
        hosts.entry(instance.host.clone()).or_insert(state);
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::control::{GroupStatus, InstanceStatus};
    use crate::protocol::slave::QueueProgress;

    fn instance(id: u32, host: &str, state: InstanceState, restarts: u32) -> InstanceStatus {
        InstanceStatus {
            id,
            group_id: id,
            host: host.into(),
            command: "w".into(),
            state,
            pid: None,
            uptime_ms: None,
            restarts,
            last_exit: None,
            seen_ms_ago: None,
            health: None,
        }
    }

    #[test]
    fn hosts_are_listed_while_something_runs_there_or_their_supervisor_says_how_they_are() {
        let status = HerdStatus {
            config: "herd.toml".into(),
            pid: 1,
            uptime_ms: 1,
            groups: vec![GroupStatus {
                name: "web".into(),
                suspended: false,
                instances: vec![
                    instance(1, "localhost", InstanceState::Completed, 0),
                    instance(2, "new1", InstanceState::Pending, 0),
                    instance(3, "done1", InstanceState::Completed, 0),
                    instance(4, "gone1", InstanceState::Lost, 0),
                ],
                queue: None,
            }],
        };
        let down = Link {
            state: LinkState::Down,
            since_ms: 1,
            problem: Some("refused; given up after 1 lost connection in a row".into()),
        };
        let links = BTreeMap::from([("gone1".to_string(), down)]);
        assert_eq!(
            host_states(&status, &links),
            BTreeMap::from([
                // Given up: down, as its supervisor left it.
                ("gone1".to_string(), LinkState::Down),
                // The master's own, whatever its instances.
                ("localhost".to_string(), LinkState::Up),
                // Its supervisor has not started yet.
                ("new1".to_string(), LinkState::Connecting),
            ]),
            "done1 ran all it had: not listed"
        );
    }

    #[test]
    fn the_scrape_follows_prometheus_conventions_and_the_status() {
        let status = HerdStatus {
            config: "herd.toml".into(),
            pid: 1,
            uptime_ms: 2500,
            groups: vec![
                GroupStatus {
                    name: "web".into(),
                    suspended: false,
                    instances: vec![
                        instance(1, "localhost", InstanceState::Running, 2),
                        instance(2, "db1", InstanceState::Backoff, 1),
                    ],
                    queue: None,
                },
                GroupStatus {
                    name: "jobs".into(),
                    suspended: true,
                    instances: vec![instance(3, "localhost", InstanceState::Suspended, 0)],
                    queue: Some(QueueProgress {
                        done: 7,
                        pending: 3,
                        dead: 1,
                        ..QueueProgress::default()
                    }),
                },
            ],
        };
        let mut tally = EventTally::default();
        let label = InstanceLabel {
            group: "web".into(),
            host: "localhost".into(),
            command: "w".into(),
            id: 1,
            group_id: 1,
        };
        tally.count(&label, &EventKind::TimedOut);
        for (how, failed) in [
            ("exited with code 0", false),
            ("exited with code 3", true),
            ("killed by SIGKILL", true),
            ("host lost: ssh", true),
        ] {
            let how = how.to_string();
            tally.count(&label, &EventKind::Exited { how, failed });
        }
        let text = encode(Snapshot {
            status,
            tally,
            log: LogTotals {
                lines: 10,
                bytes: 80,
            },
            accepted: BTreeMap::from([("jobs".to_string(), 5)]),
            process: process_stats(),
            links: BTreeMap::from([(
                "db1".to_string(),
                Link {
                    state: LinkState::Down,
                    since_ms: 1,
                    problem: Some("agent link: closed".into()),
                },
            )]),
        });
        for line in [
            "# TYPE taskherd_instances gauge",
            "taskherd_instances{group=\"web\",state=\"running\"} 1",
            "taskherd_instances{group=\"web\",state=\"backoff\"} 1",
            "taskherd_instances{group=\"web\",state=\"failed\"} 0",
            "taskherd_instances{group=\"jobs\",state=\"suspended\"} 1",
            "taskherd_group_suspended{group=\"jobs\"} 1",
            "# TYPE taskherd_instance_restarts_total counter",
            "taskherd_instance_restarts_total{group=\"web\"} 3",
            "taskherd_liveness_kills_total{group=\"web\"} 1",
            "taskherd_instance_exits_total{group=\"web\",cause=\"success\"} 1",
            "taskherd_instance_exits_total{group=\"web\",cause=\"error\"} 1",
            "taskherd_instance_exits_total{group=\"web\",cause=\"signal\"} 1",
            "taskherd_instance_exits_total{group=\"web\",cause=\"host_lost\"} 1",
            "taskherd_queue_jobs{group=\"jobs\",state=\"pending\"} 3",
            "taskherd_queue_jobs_done_total{group=\"jobs\"} 7",
            "taskherd_queue_jobs_dead_total{group=\"jobs\"} 1",
            "taskherd_http_jobs_accepted_total{group=\"jobs\"} 5",
            "taskherd_log_lines_total 10",
            "taskherd_log_bytes_total 80",
            "taskherd_host_up{host=\"db1\"} 0",
            "taskherd_host_up{host=\"localhost\"} 1",
            "taskherd_host_state{host=\"db1\",state=\"down\"} 1",
            "taskherd_host_state{host=\"db1\",state=\"up\"} 0",
            "taskherd_host_state{host=\"localhost\",state=\"up\"} 1",
            "taskherd_uptime_seconds 2.5",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
