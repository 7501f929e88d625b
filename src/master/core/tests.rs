//! The core driven by events, without processes: start, instance events
//! and exits, hosts lost, feeders listening, suspend and resume, rolling
//! restarts, reloads, the stop.

use super::*;
use crate::master::plan::plan;
use crate::protocol::control::Target;
use crate::supervise::instance::InstanceEnd;
use std::time::UNIX_EPOCH;

fn config(text: &str) -> Config {
    Config::parse(text, "/etc/herd/herd.toml".as_ref()).expect("valid config")
}

/// A core and its clock.
struct Herd {
    core: Core,
    start: Instant,
    elapsed: Duration,
}

impl Herd {
    /// A core of `text`, its plan started.
    fn started(text: &str) -> (Herd, Vec<Effect>) {
        let config = config(text);
        let plan = plan(&config);
        let start = Instant::now();
        let mut herd = Herd {
            core: Core::new(config, Herd::now_at(start, Duration::ZERO)),
            start,
            elapsed: Duration::ZERO,
        };
        let effects = herd.handle(Event::Start(plan));
        (herd, effects)
    }

    fn now_at(start: Instant, elapsed: Duration) -> Now {
        Now {
            at: start + elapsed,
            wall: UNIX_EPOCH + Duration::from_secs(1_000_000) + elapsed,
        }
    }

    fn handle(&mut self, event: Event) -> Vec<Effect> {
        self.core
            .handle(event, Herd::now_at(self.start, self.elapsed))
    }

    /// Lets `time` pass, then ticks.
    fn wait(&mut self, time: Duration) -> Vec<Effect> {
        self.elapsed += time;
        self.handle(Event::Tick)
    }

    fn instance(&mut self, id: u32, kind: EventKind) -> Vec<Effect> {
        let time_ms = 1_000_000_000 + u64::try_from(self.elapsed.as_millis()).unwrap();
        self.handle(Event::Instance(InstanceEvent { id, time_ms, kind }))
    }

    /// Instance `id` runs (again).
    fn runs(&mut self, id: u32) -> Vec<Effect> {
        self.instance(id, EventKind::Started { pid: 1000 + id })
    }

    /// Instance `id` has stopped for good.
    fn stopped(&mut self, id: u32) -> Vec<Effect> {
        let end = InstanceEnd::Stopped { killed: false };
        self.instance(id, EventKind::Ended { end })
    }

    fn ask(&mut self, request: Request, reply: u64) -> Vec<Effect> {
        let reply = Some(ReplyId(reply));
        self.handle(Event::Request { request, reply })
    }

    fn state(&self, id: u32) -> Option<InstanceState> {
        self.core.table.entry(id).map(|e| e.state)
    }

    /// Feeds back what the shell would: events emitted by the core, the
    /// config read, the plan prepared (unchanged: no ports, no secrets).
    fn feed_back(&mut self, effects: Vec<Effect>, read: &Config) -> Vec<Effect> {
        let mut seen = Vec::new();
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let next = match &effect {
                Effect::Emit { id, kind } => Some(Event::Instance(InstanceEvent {
                    id: *id,
                    time_ms: 0,
                    kind: kind.clone(),
                })),
                Effect::NeverRan(label) => Some(Event::Instance(InstanceEvent {
                    id: label.id,
                    time_ms: 0,
                    kind: EventKind::Ended {
                        end: InstanceEnd::Stopped { killed: false },
                    },
                })),
                Effect::ReadConfig { reply, .. } => Some(Event::ConfigRead {
                    result: Ok(read.clone()),
                    reply: *reply,
                }),
                Effect::Prepare(plan) => Some(Event::Prepared(Ok(plan.clone()))),
                _ => None,
            };
            seen.push(effect);
            if let Some(event) = next {
                queue.extend(self.handle(event));
            }
        }
        seen
    }
}

/// `place: ids (suspended ids)` of every start.
fn starts(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Start {
                place,
                instances,
                suspended,
            } => {
                let place = match place {
                    Place::Local => "local".to_string(),
                    Place::Host { host, .. } => host.label.clone(),
                };
                let ids: Vec<String> = instances.iter().map(|s| s.label.id.to_string()).collect();
                let mut text = format!("{place}: {}", ids.join(" "));
                if !suspended.is_empty() {
                    text.push_str(&format!(" (suspended {suspended:?})"));
                }
                Some(text)
            }
            _ => None,
        })
        .collect()
}

fn commands(effects: &[Effect]) -> Vec<(u32, InstanceCommand)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Command { id, command } => Some((*id, *command)),
            _ => None,
        })
        .collect()
}

/// Every answer: `Ok(message)` or `Err(text)`.
fn answers(effects: &[Effect]) -> Vec<(u64, Result<String, String>)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Answer { reply, answer } => Some((
                reply.0,
                match answer {
                    Ok(answer) => Ok(answer.clone().into_message()),
                    Err(err) => Err(err.to_string()),
                },
            )),
            _ => None,
        })
        .collect()
}

fn logs(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Log { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn emitted(effects: &[Effect]) -> Vec<(u32, EventKind)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Emit { id, kind } => Some((*id, kind.clone())),
            _ => None,
        })
        .collect()
}

fn never_ran(effects: &[Effect]) -> Vec<u32> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::NeverRan(label) => Some(label.id),
            _ => None,
        })
        .collect()
}

const WEB: &str = r#"
[master]
stop_grace = "5s"

[[group]]
name = "web"
command = "w"
[group.local]
instances = 3

[[group]]
name = "batch"
command = "b"
[group.local]
instances = 1
"#;

/// A queue group whose feeder runs on web1, with consumers here and on
/// web2; and one whose feeder runs here.
const QUEUES: &str = r#"
[[group]]
name = "far"
command = "q"
[group.feeder]
host = "web1"
[group.local]
instances = 1
[[group.remote]]
hosts = ["web2"]
instances = 2

[[group]]
name = "near"
command = "q"
[group.feeder]
bind = "127.0.0.1:4700"
[group.local]
instances = 1
[[group.remote]]
hosts = ["web1"]
instances = 1

[[group]]
name = "plain"
command = "p"
[[group.remote]]
hosts = ["web2"]
instances = 1
"#;

#[test]
fn start_places_every_instance_and_events_reach_the_status_and_the_callbacks() {
    let (mut herd, effects) = Herd::started(WEB);
    assert_eq!(starts(&effects), ["local: 1 2 3 4"]);
    assert_eq!(herd.state(1), Some(InstanceState::Pending));
    let effects = herd.runs(1);
    assert!(
        matches!(&effects[..], [Effect::Publish { label, event }] if label.id == 1 && event.id == 1),
        "{effects:?}"
    );
    assert_eq!(herd.state(1), Some(InstanceState::Running));
    herd.instance(
        2,
        EventKind::Exited {
            how: "exited with code 1".into(),
            failed: true,
        },
    );
    let status = herd
        .core
        .status(UNIX_EPOCH + Duration::from_secs(1_000_010));
    let web = &status.groups[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.instances[0].pid, Some(1001));
    assert_eq!(web.instances[0].uptime_ms, Some(10_000));
    assert_eq!(web.instances[1].state, InstanceState::Backoff);
    assert_eq!(
        web.instances[1].last_exit.as_deref(),
        Some("exited with code 1")
    );
    // An unknown instance is nobody's business.
    assert!(herd.runs(99).is_empty());
    assert!(!herd.core.holds_instances());
}

#[test]
fn consumers_are_held_until_their_feeder_listens_obeying_meanwhile() {
    let (mut herd, effects) = Herd::started(QUEUES);
    // far: feeder 1 on web1, consumers 2 (local), 3 and 4 (web2); near:
    // feeder 5 here, consumers 6 (local) and 7 (web1); plain: 8 (web2).
    assert_eq!(starts(&effects), ["local: 5", "web1: 1", "web2: 8"]);
    assert!(herd.core.holds_instances());

    // Meanwhile a held consumer is suspended with its group, and another
    // one is removed: neither reaches a host, both obey.
    let effects = herd.ask(
        Request::Suspend {
            group: "far".into(),
        },
        1,
    );
    assert_eq!(commands(&effects), [(1, InstanceCommand::Suspend)]);
    assert_eq!(
        emitted(&effects),
        [
            (2, EventKind::Suspended),
            (3, EventKind::Suspended),
            (4, EventKind::Suspended)
        ]
    );
    herd.core.command(4, InstanceCommand::Remove);
    let effects = herd.handle(Event::Tick);
    assert_eq!(never_ran(&effects), [4]);
    // The near feeder listens: its consumers start with its address.
    let address = FeederAddress::local("127.0.0.1:4700".parse().unwrap());
    let effects = herd.handle(Event::Listening { id: 5, address });
    assert_eq!(starts(&effects), ["local: 6", "web1: 7"]);
    let Some(Effect::Start { instances, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    assert_eq!(
        instances[0].identity.queue,
        Some(crate::protocol::slave::QueueRole::Consumer {
            feeder: "127.0.0.1:4700".into(),
            secret: String::new(),
            concurrency: 1,
            credits: 2,
            jetstream: None,
        })
    );
    // The far feeder listens on web1: its consumers left start,
    // suspended as their group is.
    let address = FeederAddress {
        listened: "0.0.0.0:4800".parse().unwrap(),
        host: "web1".into(),
        dial_name: Some("web1".into()),
    };
    let effects = herd.handle(Event::Listening { id: 1, address });
    assert_eq!(
        starts(&effects),
        ["local: 2 (suspended [2])", "web2: 3 (suspended [3])"]
    );
    let Some(Effect::Start { instances, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    assert!(matches!(
        &instances[0].identity.queue,
        Some(crate::protocol::slave::QueueRole::Consumer { feeder, .. }) if feeder == "web1:4800"
    ));
    assert!(!herd.core.holds_instances());
}

#[test]
fn a_feeder_late_to_listen_is_said_and_its_local_consumers_start_anyway() {
    let (mut herd, _) = Herd::started(QUEUES);
    assert_eq!(
        herd.core.next_deadline(),
        Some(herd.start + FEEDER_START_TIMEOUT)
    );
    assert!(herd.wait(Duration::from_secs(29)).is_empty());
    let effects = herd.wait(Duration::from_secs(1));
    assert_eq!(
        logs(&effects),
        [
            "feeder did not listen within 30s; its consumers wait for it",
            "feeder did not listen within 30s; starting its consumers anyway (they connect when it does)",
        ]
    );
    // near's consumers, at the address planned for its feeder.
    assert_eq!(starts(&effects), ["local: 6", "web1: 7"]);
    assert_eq!(herd.core.next_deadline(), None);
    // far's wait on until their feeder listens, or the herd stops.
    assert!(herd.core.holds_instances());
    let effects = herd.handle(Event::Stopping {
        reason: "test".into(),
        hint: None,
    });
    assert_eq!(never_ran(&effects), [2, 3, 4]);
    assert!(!herd.core.holds_instances());
}

#[test]
fn a_lost_host_takes_its_instances_with_it_but_not_the_suspended_ones() {
    let (mut herd, _) = Herd::started(QUEUES);
    herd.runs(8);
    let effects = herd.handle(Event::Listening {
        id: 5,
        address: FeederAddress::local("127.0.0.1:4700".parse().unwrap()),
    });
    herd.feed_back(effects, &config(QUEUES));
    herd.runs(7);
    herd.instance(1, EventKind::Suspended);
    let web1 = herd.core.table.entry(1).unwrap().host.clone().unwrap();
    let effects = herd.handle(Event::HostLost {
        host: web1,
        problem: "agent link: broken pipe".into(),
        retry_in: Duration::from_millis(1500),
    });
    let how = "host lost: agent link: broken pipe".to_string();
    assert_eq!(
        emitted(&effects),
        [
            (7, EventKind::Exited { how, failed: true }),
            (7, EventKind::Backoff { delay_ms: 1500 })
        ]
    );
    assert_eq!(
        logs(&effects),
        ["host web1: agent link: broken pipe; retrying in 1s 500ms"]
    );
    herd.feed_back(effects, &config(QUEUES));
    assert_eq!(herd.state(7), Some(InstanceState::Backoff));
    assert_eq!(herd.state(8), Some(InstanceState::Running), "on web2");
    // Started again once its host answers: a restart (no operator's).
    herd.runs(7);
    assert_eq!(herd.core.table.entry(7).map(|e| e.restarts), Some(1));
}

#[test]
fn suspend_and_resume_settle_once_every_instance_has() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let effects = herd.ask(
        Request::Suspend {
            group: "web".into(),
        },
        1,
    );
    assert_eq!(
        commands(&effects),
        [
            (1, InstanceCommand::Suspend),
            (2, InstanceCommand::Suspend),
            (3, InstanceCommand::Suspend)
        ]
    );
    assert!(answers(&effects).is_empty());
    herd.instance(1, EventKind::Suspended);
    assert!(answers(&herd.instance(2, EventKind::Suspended)).is_empty());
    // An instance that ends for good no longer counts.
    let effects = herd.instance(
        3,
        EventKind::Ended {
            end: InstanceEnd::Completed,
        },
    );
    assert_eq!(
        answers(&effects),
        [(1, Ok("group web suspended (3 instances)".into()))]
    );
    assert!(herd.core.status(UNIX_EPOCH).groups[0].suspended);

    // A resume that does not settle in time says so.
    let effects = herd.ask(
        Request::Resume {
            group: "web".into(),
        },
        2,
    );
    assert_eq!(
        commands(&effects),
        [(1, InstanceCommand::Resume), (2, InstanceCommand::Resume)]
    );
    herd.runs(1);
    // The stop grace (5 s) and a margin of 30 s.
    assert!(answers(&herd.wait(Duration::from_secs(34))).is_empty());
    assert_eq!(
        answers(&herd.wait(Duration::from_secs(1))),
        [(
            2,
            Err("group web: not every instance resumed in time".into())
        )]
    );

    // An unknown group is refused, in the log and to the operator.
    let effects = herd.ask(
        Request::Suspend {
            group: "nope".into(),
        },
        3,
    );
    assert_eq!(logs(&effects), ["no group named \"nope\""]);
    assert_eq!(
        answers(&effects),
        [(3, Err("no group named \"nope\"".into()))]
    );
}

#[test]
fn a_rolling_restart_goes_one_instance_at_a_time_and_the_next_change_waits_its_turn() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    herd.instance(2, EventKind::Suspended);
    let effects = herd.ask(
        Request::Restart {
            target: Target::group("web"),
        },
        1,
    );
    assert_eq!(commands(&effects), [(1, InstanceCommand::Restart)]);
    // A second restart, of another group, waits for the first.
    let effects = herd.ask(
        Request::Restart {
            target: Target::group("batch"),
        },
        2,
    );
    assert!(commands(&effects).is_empty());
    // Stopping is not running again.
    assert!(commands(&herd.instance(1, EventKind::Stopping)).is_empty());
    herd.instance(
        1,
        EventKind::Exited {
            how: "stopped".into(),
            failed: false,
        },
    );
    // Running again: the next one (2 is suspended: it stays so).
    let effects = herd.runs(1);
    assert_eq!(commands(&effects), [(3, InstanceCommand::Restart)]);
    let effects = herd.runs(3);
    assert_eq!(
        answers(&effects),
        [(1, Ok("group web restarted (2 instances)".into()))]
    );
    assert_eq!(commands(&effects), [(4, InstanceCommand::Restart)]);

    // One that does not come back within a minute stops the restart.
    assert!(answers(&herd.wait(Duration::from_secs(59))).is_empty());
    assert_eq!(
        answers(&herd.wait(Duration::from_secs(1))),
        [(
            2,
            Err(
                "group batch: instance 1 did not run again within 1m; rolling restart stopped"
                    .into()
            )
        )]
    );
}

/// `WEB` reloaded: web changed (a new message) and one instance more,
/// batch removed, extra added.
const WEB_RELOADED: &str = r#"
[master]
stop_grace = "5s"

[[group]]
name = "web"
command = "w"
params = { message = "v2" }
[group.local]
instances = 4

[[group]]
name = "extra"
command = "e"
stop_grace = "20s"
[group.local]
instances = 1
"#;

#[test]
fn a_reload_starts_added_groups_stops_removed_ones_and_replaces_changed_ones_one_by_one() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let new = config(WEB_RELOADED);
    let effects = herd.ask(Request::Reload, 1);
    assert!(matches!(
        &effects[..],
        [Effect::ReadConfig {
            reply: Some(ReplyId(1)),
            ..
        }]
    ));
    let effects = herd.feed_back(effects, &new);
    // batch goes at once; extra (id 5) starts; web's first successor (6)
    // starts; the longest grace grew for the hosts.
    assert_eq!(commands(&effects), [(4, InstanceCommand::Remove)]);
    assert_eq!(starts(&effects), ["local: 5", "local: 6"]);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::LongestGrace(grace) if *grace == Duration::from_secs(20))));
    // Once 6 runs, the old 1 goes; once 1 has ended, 7 starts, ...
    assert_eq!(commands(&herd.runs(6)), [(1, InstanceCommand::Remove)]);
    assert_eq!(starts(&herd.stopped(1)), ["local: 7"]);
    assert_eq!(commands(&herd.runs(7)), [(2, InstanceCommand::Remove)]);
    assert_eq!(starts(&herd.stopped(2)), ["local: 8"]);
    assert_eq!(commands(&herd.runs(8)), [(3, InstanceCommand::Remove)]);
    let effects = herd.stopped(3);
    // ... and the one more has no old instance to replace.
    assert_eq!(starts(&effects), ["local: 9"]);
    let effects = herd.runs(9);
    let message = "reloaded /etc/herd/herd.toml: groups added: extra; removed: batch; \
                   changed: web; resized: none";
    assert_eq!(logs(&effects), [message]);
    assert_eq!(answers(&effects), [(1, Ok(message.into()))]);
    let status = herd.core.status(UNIX_EPOCH);
    let names: Vec<&str> = status.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["web", "extra", "batch"], "batch until 4 has ended");
    herd.stopped(4);
    let status = herd.core.status(UNIX_EPOCH);
    let names: Vec<&str> = status.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["web", "extra"]);
    let web: Vec<u32> = status.groups[0].instances.iter().map(|i| i.id).collect();
    assert_eq!(web, [6, 7, 8, 9]);
    assert_eq!(
        herd.core.retired_ever().iter().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
}

#[test]
fn a_successor_that_does_not_run_ends_the_replacement_and_the_old_instances_stay() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let new = config(&WEB.replace("command = \"w\"", "command = \"w-typo\""));
    let effects = herd.ask(Request::Reload, 1);
    let effects = herd.feed_back(effects, &new);
    assert_eq!(starts(&effects), ["local: 5"]);
    let how = "cannot spawn w-typo: No such file or directory".to_string();
    let effects = herd.instance(
        5,
        EventKind::Exited {
            how: how.clone(),
            failed: true,
        },
    );
    assert_eq!(commands(&effects), [(5, InstanceCommand::Remove)]);
    assert!(answers(&effects).is_empty(), "not before it is gone");
    let effects = herd.stopped(5);
    assert_eq!(
        answers(&effects),
        [(
            1,
            Err(format!(
                "reload: group web: a new instance did not run ({how}); replacement stopped, \
                 3 old instances kept"
            ))
        )]
    );
    assert_eq!(herd.core.table.live_ids("web"), [1, 2, 3]);
}

#[test]
fn a_reload_that_resizes_keeps_the_instances_and_is_refused_during_another_change() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let bigger = config(&WEB.replace("instances = 3", "instances = 5"));
    // Refused while a restart is under way: nothing changes.
    herd.ask(
        Request::Restart {
            target: Target::group("batch"),
        },
        1,
    );
    let effects = herd.ask(Request::Reload, 2);
    let effects = herd.feed_back(effects, &bigger);
    assert_eq!(
        answers(&effects),
        [(
            2,
            Err(
                "reload refused, the herd is unchanged: a rolling restart or reload is under way; \
                 reload again once it is done (to resize web)"
                    .into()
            )
        )]
    );
    assert!(starts(&effects).is_empty());
    herd.runs(4);

    // Then: two more, with new ids, the instances kept as they are.
    let effects = herd.ask(Request::Reload, 3);
    let effects = herd.feed_back(effects, &bigger);
    assert_eq!(starts(&effects), ["local: 5 6"]);
    assert!(commands(&effects).is_empty());
    assert_eq!(
        answers(&effects),
        [(
            3,
            Ok(
                "reloaded /etc/herd/herd.toml: groups added: none; removed: none; \
                changed: none; resized: web (3 -> 5 instances)"
                    .into()
            )
        )]
    );
    // And back to 2: the highest group ids stop, the answer once they
    // have.
    let smaller = config(&WEB.replace("instances = 3", "instances = 2"));
    let effects = herd.ask(Request::Reload, 4);
    let effects = herd.feed_back(effects, &smaller);
    assert_eq!(
        commands(&effects),
        [
            (6, InstanceCommand::Remove),
            (5, InstanceCommand::Remove),
            (3, InstanceCommand::Remove)
        ]
    );
    herd.stopped(6);
    herd.stopped(5);
    let effects = herd.stopped(3);
    assert!(
        matches!(&answers(&effects)[..], [(4, Ok(message))] if message.ends_with("resized: web (5 -> 2 instances)"))
    );
    assert_eq!(herd.core.table.live_ids("web"), [1, 2]);
}

#[test]
fn a_reload_of_a_broken_config_changes_nothing() {
    let (mut herd, _) = Herd::started(WEB);
    let effects = herd.ask(Request::Reload, 1);
    assert_eq!(effects.len(), 1);
    let result = Config::load("/nonexistent/herd.toml".as_ref());
    let effects = herd.handle(Event::ConfigRead {
        result,
        reply: Some(ReplyId(1)),
    });
    let refused =
        "reload refused, the herd is unchanged:\ncannot read config /nonexistent/herd.toml";
    assert_eq!(logs(&effects), [refused]);
    assert_eq!(answers(&effects), [(1, Err(refused.into()))]);
    assert!(starts(&effects).is_empty() && commands(&effects).is_empty());
}

#[test]
fn the_stop_ends_what_waits_refuses_changes_and_is_answered_at_the_end() {
    let (mut herd, _) = Herd::started(QUEUES);
    herd.runs(8);
    let effects = herd.ask(
        Request::Stop {
            kill: false,
            reason: "stop requested over the control socket".into(),
        },
        1,
    );
    assert!(matches!(
        &effects[..],
        [Effect::Shutdown { kill: false, reason }] if reason.contains("control socket")
    ));
    herd.ask(
        Request::Restart {
            target: Target::group("plain"),
        },
        2,
    );
    let effects = herd.handle(Event::Stopping {
        reason: "stop requested over the control socket".into(),
        hint: Some("Ctrl-C again to kill at once".into()),
    });
    assert_eq!(
        logs(&effects),
        [
            "stopping every instance: stop requested over the control socket \
          (grace 10s; Ctrl-C again to kill at once)"
        ]
    );
    // Consumers held for their feeder never start; the restart ends.
    assert_eq!(never_ran(&effects), [2, 3, 4, 6, 7]);
    assert_eq!(
        answers(&effects),
        [(
            2,
            Err("the herd stopped before the change was complete".into())
        )]
    );
    let effects = herd.ask(Request::Reload, 3);
    assert_eq!(answers(&effects), [(3, Err("the herd is stopping".into()))]);
    let effects = herd.handle(Event::Killing {
        reason: "kill requested".into(),
    });
    assert_eq!(
        logs(&effects),
        ["killing every instance now: kill requested"]
    );
    let effects = herd.handle(Event::Ended {
        outcome: "stopped: 8 instances ended".into(),
    });
    assert_eq!(
        answers(&effects),
        [(1, Ok("stopped: 8 instances ended".into()))]
    );
}

#[test]
fn the_max_running_time_stops_the_herd() {
    let text = WEB.replace("stop_grace = \"5s\"", "max_running_time = \"1h\"");
    let (mut herd, _) = Herd::started(&text);
    assert_eq!(
        herd.core.next_deadline(),
        Some(herd.start + Duration::from_secs(3600))
    );
    let effects = herd.wait(Duration::from_secs(3600));
    assert!(matches!(
        &effects[..],
        [Effect::Shutdown { kill: false, reason }] if reason == "max running time of 1h reached"
    ));
    assert_eq!(herd.core.next_deadline(), None);
    let effects = herd.ask(Request::Status, 1);
    assert!(matches!(
        &effects[..],
        [Effect::Answer { answer: Ok(Answer::Status(status)), .. }] if status.groups.len() == 2
    ));
}

/// Instance `id` has exited (`how`) and is given up.
fn fails(herd: &mut Herd, id: u32, how: &str) -> Vec<Effect> {
    let how = how.to_string();
    herd.instance(
        id,
        EventKind::Exited {
            how: how.clone(),
            failed: true,
        },
    );
    let end = InstanceEnd::Failed { reason: how };
    herd.instance(id, EventKind::Ended { end })
}

/// `id:group_id` of a group's instances, as the status lists them.
fn listed(herd: &Herd, group: &str) -> Vec<String> {
    let status = herd.core.status(UNIX_EPOCH);
    status
        .groups
        .iter()
        .filter(|g| g.name == group)
        .flat_map(|g| &g.instances)
        .map(|i| format!("{}:{} {}", i.id, i.group_id, i.state))
        .collect()
}

#[test]
fn one_instance_stops_stays_stopped_and_starts_again_under_a_new_id() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let effects = herd.ask(
        Request::StopInstances {
            target: Target::instance("web", 2),
        },
        1,
    );
    assert_eq!(commands(&effects), [(2, InstanceCommand::Remove)]);
    assert_eq!(logs(&effects), ["stopping web:2 on request"]);
    assert!(answers(&effects).is_empty());
    let effects = herd.stopped(2);
    assert_eq!(answers(&effects), [(1, Ok("web:2 stopped".into()))]);
    assert_eq!(herd.state(2), Some(InstanceState::Stopped));
    // The herd runs on while an instance is stopped so.
    assert!(herd.core.holds_instances());
    let effects = herd.ask(
        Request::StopInstances {
            target: Target::instance("web", 2),
        },
        2,
    );
    assert_eq!(
        answers(&effects),
        [(2, Ok("web:2 was not running (stopped)".into()))]
    );

    // Started again: the same spec, a new global id, the same id within
    // the group; answered once it runs.
    let effects = herd.ask(
        Request::Start {
            target: Target::instance("web", 2),
        },
        3,
    );
    assert_eq!(starts(&effects), ["local: 5"]);
    assert_eq!(logs(&effects), ["starting web:2 on request"]);
    assert!(answers(&effects).is_empty());
    assert_eq!(herd.state(2), None);
    assert_eq!(
        herd.core.retired_ever().iter().copied().collect::<Vec<_>>(),
        [2]
    );
    // Answered once it has run for a second (one that ends at once did
    // not start).
    assert!(answers(&herd.runs(5)).is_empty());
    assert!(answers(&herd.wait(Duration::from_millis(999))).is_empty());
    let effects = herd.wait(Duration::from_millis(1));
    assert_eq!(answers(&effects), [(3, Ok("web:2 started".into()))]);
    assert_eq!(
        listed(&herd, "web"),
        ["1:1 running", "5:2 running", "3:3 running"]
    );
    assert!(!herd.core.holds_instances());
    let effects = herd.ask(
        Request::Start {
            target: Target::instance("web", 2),
        },
        4,
    );
    assert_eq!(
        answers(&effects),
        [(4, Ok("web:2 was running already".into()))]
    );
    assert!(starts(&effects).is_empty());

    // A whole group: those not running are counted.
    let effects = herd.ask(
        Request::StopInstances {
            target: Target::group("web"),
        },
        5,
    );
    assert_eq!(
        commands(&effects),
        [
            (1, InstanceCommand::Remove),
            (3, InstanceCommand::Remove),
            (5, InstanceCommand::Remove)
        ]
    );
    herd.stopped(1);
    herd.stopped(3);
    let effects = herd.stopped(5);
    assert_eq!(
        answers(&effects),
        [(5, Ok("group web: 3 instances stopped".into()))]
    );
}

#[test]
fn start_revives_failed_instances_and_says_what_was_running() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    fails(&mut herd, 3, "exited with code 1");
    assert_eq!(herd.state(3), Some(InstanceState::Failed));
    let effects = herd.ask(
        Request::Start {
            target: Target::group("web"),
        },
        1,
    );
    assert_eq!(starts(&effects), ["local: 5"]);
    herd.runs(5);
    let effects = herd.wait(Duration::from_secs(1));
    assert_eq!(
        answers(&effects),
        [(
            1,
            Ok("group web: 1 instance started, 2 were running already".into())
        )]
    );
    let effects = herd.ask(
        Request::Start {
            target: Target::group("web"),
        },
        2,
    );
    assert_eq!(
        answers(&effects),
        [(
            2,
            Ok("group web: nothing to start, 3 were running already".into())
        )]
    );

    // One that fails again before it runs: the answer says how.
    fails(&mut herd, 5, "exited with code 1");
    let effects = herd.ask(
        Request::Start {
            target: Target::instance("web", 3),
        },
        3,
    );
    assert_eq!(starts(&effects), ["local: 6"]);
    let effects = fails(&mut herd, 6, "exited with code 2");
    assert_eq!(
        answers(&effects),
        [(3, Err("web:3 did not start: exited with code 2".into()))]
    );
    // One that does not run within a minute.
    let effects = herd.ask(
        Request::Start {
            target: Target::instance("web", 3),
        },
        4,
    );
    assert_eq!(starts(&effects), ["local: 7"]);
    assert!(answers(&herd.wait(Duration::from_secs(59))).is_empty());
    assert_eq!(
        answers(&herd.wait(Duration::from_secs(1))),
        [(4, Err("web:3 did not start: not running within 1m".into()))]
    );

    // What cannot be started is refused, and says why.
    let effects = herd.ask(
        Request::Start {
            target: Target::instance("web", 9),
        },
        5,
    );
    assert_eq!(
        answers(&effects),
        [(5, Err("group web has no instance 9".into()))]
    );
    let (mut queues, _) = Herd::started(QUEUES);
    let effects = queues.ask(
        Request::StopInstances {
            target: Target::group("far"),
        },
        1,
    );
    assert!(commands(&effects).is_empty());
    assert_eq!(
        answers(&effects),
        [(
            1,
            Err(
                "group far is a queue group: its instances start and stop with the herd \
                 (suspend, resume or restart it instead)"
                    .into()
            )
        )]
    );
}

#[test]
fn a_restart_starts_ended_instances_again_one_at_a_time() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    fails(&mut herd, 2, "exited with code 1");
    let effects = herd.ask(
        Request::Restart {
            target: Target::group("web"),
        },
        1,
    );
    assert_eq!(commands(&effects), [(1, InstanceCommand::Restart)]);
    // 1 runs again: 2, which had failed, starts again.
    let effects = herd.runs(1);
    assert_eq!(starts(&effects), ["local: 5"]);
    let effects = herd.runs(5);
    assert_eq!(commands(&effects), [(3, InstanceCommand::Restart)]);
    let effects = herd.runs(3);
    assert_eq!(
        answers(&effects),
        [(
            1,
            Ok("group web restarted (3 instances; 1 of them had ended and started again)".into())
        )]
    );
    // One instance, by its id within the group.
    let effects = herd.ask(
        Request::Restart {
            target: Target::instance("web", 2),
        },
        2,
    );
    assert_eq!(commands(&effects), [(5, InstanceCommand::Restart)]);
    let effects = herd.runs(5);
    assert_eq!(answers(&effects), [(2, Ok("web:2 restarted".into()))]);
    // One that had ended and fails again: the restart says so.
    fails(&mut herd, 4, "exited with code 3");
    let effects = herd.ask(
        Request::Restart {
            target: Target::group("batch"),
        },
        3,
    );
    assert_eq!(starts(&effects), ["local: 6"]);
    let effects = fails(&mut herd, 6, "exited with code 3");
    assert_eq!(
        answers(&effects),
        [(3, Err("batch:1 did not start: exited with code 3".into()))]
    );
}

#[test]
fn an_autostart_false_group_waits_for_a_start_and_keeps_the_herd_up() {
    let text = WEB.replace(
        "name = \"web\"\ncommand = \"w\"",
        "name = \"web\"\ncommand = \"w\"\nautostart = false",
    );
    let (mut herd, effects) = Herd::started(&text);
    assert_eq!(starts(&effects), ["local: 4"]);
    assert_eq!(
        logs(&effects),
        ["group web not started (autostart = false): `taskherd start web` starts it"]
    );
    assert_eq!(
        listed(&herd, "web"),
        ["1:1 stopped", "2:2 stopped", "3:3 stopped"]
    );
    // batch is done; web waits for an operator.
    herd.runs(4);
    herd.instance(
        4,
        EventKind::Ended {
            end: InstanceEnd::Completed,
        },
    );
    assert!(herd.core.holds_instances());
    let effects = herd.ask(
        Request::Start {
            target: Target::group("web"),
        },
        1,
    );
    assert_eq!(starts(&effects), ["local: 5", "local: 6", "local: 7"]);
    herd.runs(5);
    herd.runs(6);
    herd.runs(7);
    let effects = herd.wait(Duration::from_secs(1));
    assert_eq!(
        answers(&effects),
        [(1, Ok("group web: 3 instances started".into()))]
    );
    // Stopped again: the herd waits again, until it is stopped.
    herd.ask(
        Request::StopInstances {
            target: Target::instance("web", 1),
        },
        2,
    );
    herd.stopped(5);
    assert!(herd.core.holds_instances());
    herd.handle(Event::Stopping {
        reason: "SIGTERM received".into(),
        hint: None,
    });
    assert!(!herd.core.holds_instances());
}

#[test]
fn a_resume_of_a_running_group_and_a_suspend_of_a_suspended_one_say_so() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let effects = herd.ask(
        Request::Resume {
            group: "web".into(),
        },
        1,
    );
    assert!(commands(&effects).is_empty());
    assert_eq!(
        answers(&effects),
        [(
            1,
            Ok("group web was not suspended: nothing to resume (3 instances running)".into())
        )]
    );
    herd.ask(
        Request::Suspend {
            group: "web".into(),
        },
        2,
    );
    for id in 1..=3 {
        herd.instance(id, EventKind::Suspended);
    }
    let effects = herd.ask(
        Request::Suspend {
            group: "web".into(),
        },
        3,
    );
    assert!(commands(&effects).is_empty());
    assert_eq!(
        answers(&effects),
        [(3, Ok("group web was suspended already".into()))]
    );
}

/// `hook: payload` of every hook called.
fn hooks(effects: &[Effect]) -> Vec<(&'static str, serde_json::Value)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Hook(call) => Some((
                call.hook,
                serde_json::from_str(&call.payload).expect("a hook's payload is JSON"),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn the_hook_of_an_instance_a_reload_retired_counts_its_restarts() {
    let text = WEB.replace(
        "name = \"web\"\ncommand = \"w\"",
        "name = \"web\"\ncommand = \"w\"\nhooks = { on_stop = \"notify s\" }",
    );
    let (mut herd, _) = Herd::started(&text);
    for id in 1..=4 {
        herd.runs(id);
    }
    // Instance 3 fails once and runs again: one restart.
    herd.instance(
        3,
        EventKind::Exited {
            how: "exited with code 1".into(),
            failed: true,
        },
    );
    herd.runs(3);
    // A reload to 2 instances retires it; its end leaves the table.
    let smaller = config(&text.replace("instances = 3", "instances = 2"));
    let effects = herd.ask(Request::Reload, 1);
    let effects = herd.feed_back(effects, &smaller);
    assert_eq!(commands(&effects), [(3, InstanceCommand::Remove)]);
    let called = hooks(&herd.stopped(3));
    assert_eq!(called.len(), 1, "{called:?}");
    assert_eq!(called[0].0, "on_stop");
    assert_eq!(called[0].1["restarts"], 1, "{:?}", called[0].1);
    assert_eq!(herd.state(3), None, "retired: gone from the table");
}

#[test]
fn events_call_their_group_s_hooks_with_the_event_as_json() {
    let text = WEB.replace(
        "name = \"web\"\ncommand = \"w\"",
        "name = \"web\"\ncommand = \"w\"\n\
         hooks = { on_failure = \"notify f\", on_restart = \"notify r\", \
         on_exhausted = \"notify x\", on_stop = \"notify s\", timeout = \"2s\" }",
    );
    let (mut herd, _) = Herd::started(&text);
    // A first start is no restart.
    assert!(hooks(&herd.runs(1)).is_empty());
    let effects = herd.instance(
        1,
        EventKind::Exited {
            how: "exited with code 3".into(),
            failed: true,
        },
    );
    let called = hooks(&effects);
    assert_eq!(called.len(), 1, "{effects:?}");
    let (hook, payload) = &called[0];
    assert_eq!(*hook, "on_failure");
    assert_eq!(payload["name"], "web:1");
    assert_eq!(payload["group"], "web");
    assert_eq!(payload["event"]["event"], "exited");
    assert_eq!(payload["event"]["how"], "exited with code 3");
    assert!(matches!(
        &effects[..],
        [Effect::Hook(call), Effect::Publish { .. }]
            if call.command == "notify f" && call.timeout == Duration::from_secs(2)
    ));
    // Its restart, then given up, then another one stopped.
    let called = hooks(&herd.runs(1));
    assert_eq!(called[0].0, "on_restart");
    assert_eq!(called[0].1["restarts"], 1);
    let effects = herd.instance(
        1,
        EventKind::Exited {
            how: "exited with code 3".into(),
            failed: true,
        },
    );
    assert_eq!(hooks(&effects)[0].0, "on_failure");
    let end = InstanceEnd::Failed {
        reason: "exited with code 3".into(),
    };
    let called = hooks(&herd.instance(1, EventKind::Ended { end }));
    assert_eq!(called[0].0, "on_exhausted");
    assert_eq!(called[0].1["event"]["end"]["end"], "failed");
    assert_eq!(hooks(&herd.stopped(2))[0].0, "on_stop");
    // A stop without a failure calls nothing else; batch has no hooks.
    let effects = herd.instance(
        2,
        EventKind::Exited {
            how: "killed by SIGTERM".into(),
            failed: false,
        },
    );
    assert!(hooks(&effects).is_empty());
    herd.runs(4);
    assert!(hooks(&fails(&mut herd, 4, "exited with code 1")).is_empty());
}

/// db (2, ready by a TCP check) <- web (1) <- edge (1), and a lone one.
const ORDERED: &str = r#"
[[group]]
name = "db"
command = "db"
[group.ready]
tcp = "127.0.0.1:5432"
[group.local]
instances = 2

[[group]]
name = "web"
command = "web"
after = ["db"]
[group.local]
instances = 1

[[group]]
name = "edge"
command = "edge"
after = ["web"]
[group.local]
instances = 1

[[group]]
name = "lone"
command = "lone"
[group.local]
instances = 1
"#;

#[test]
fn groups_start_once_the_groups_they_start_after_are_ready() {
    let (mut herd, effects) = Herd::started(ORDERED);
    // db 1 2, web 3, edge 4, lone 5: web and edge wait.
    assert_eq!(starts(&effects), ["local: 1 2 5"]);
    assert_eq!(
        logs(&effects),
        [
            r#"group web waits for db to be ready (after = ["db"])"#,
            r#"group edge waits for web to be ready (after = ["web"])"#
        ]
    );
    assert_eq!(herd.state(3), Some(InstanceState::Waiting));
    let status = herd.core.status(UNIX_EPOCH);
    assert_eq!(status.groups[1].instances[0].state, InstanceState::Waiting);
    // Started is not ready for db; one ready of two is not enough; a
    // late one is said in the status.
    assert!(starts(&herd.runs(1)).is_empty());
    assert!(starts(&herd.runs(2)).is_empty());
    assert!(starts(&herd.instance(1, EventKind::Ready)).is_empty());
    let why = "not ready within 1m".to_string();
    let effects = herd.instance(2, EventKind::NotReady { why });
    assert!(starts(&effects).is_empty());
    assert_eq!(
        logs(&effects),
        ["group web still waits for db: instance 2 not ready within 1m"]
    );
    let health = herd.core.status(UNIX_EPOCH).groups[0].instances[1]
        .health
        .clone();
    assert_eq!(health.as_deref(), Some("not ready: not ready within 1m"));
    // Ready after all: web starts; web has no check: once it runs,
    // edge starts.
    let effects = herd.instance(2, EventKind::Ready);
    assert_eq!(starts(&effects), ["local: 3"]);
    assert_eq!(logs(&effects), ["group web starts: db ready"]);
    assert_eq!(herd.state(3), Some(InstanceState::Pending));
    assert_eq!(starts(&herd.runs(3)), ["local: 4"]);
    herd.runs(4);
    herd.runs(5);
    // db restarting does not stop web or hold it back again.
    let how = "exited with code 1".to_string();
    herd.instance(1, EventKind::Exited { how, failed: true });
    assert!(starts(&herd.runs(1)).is_empty());

    // The stop: edge and lone stop with the herd; web once edge has
    // ended, db once web has.
    let effects = herd.handle(Event::Stopping {
        reason: "test".into(),
        hint: None,
    });
    assert!(commands(&effects).is_empty());
    assert!(commands(&herd.stopped(5)).is_empty());
    let effects = herd.stopped(4);
    assert_eq!(commands(&effects), [(3, InstanceCommand::Remove)]);
    assert_eq!(
        logs(&effects),
        ["stopping group web: the groups after it have ended"]
    );
    let effects = herd.stopped(3);
    assert_eq!(
        commands(&effects),
        [(1, InstanceCommand::Remove), (2, InstanceCommand::Remove)]
    );
    assert!(commands(&herd.stopped(1)).is_empty());
}

#[test]
fn instances_waiting_for_their_dependencies_obey_and_never_run_at_the_stop() {
    let (mut herd, _) = Herd::started(ORDERED);
    // An operator stops edge while it waits: it never runs.
    let effects = herd.ask(
        Request::StopInstances {
            target: Target {
                group: "edge".into(),
                id: None,
            },
        },
        1,
    );
    assert_eq!(never_ran(&effects), [4]);
    // The herd stops: web, waiting, never runs.
    let effects = herd.handle(Event::Stopping {
        reason: "test".into(),
        hint: None,
    });
    assert!(never_ran(&effects).contains(&3), "{effects:?}");
    assert!(starts(&effects).is_empty());
    herd.runs(1);
    herd.instance(1, EventKind::Ready);
    herd.runs(2);
    let effects = herd.instance(2, EventKind::Ready);
    assert!(starts(&effects).is_empty(), "nothing starts once stopping");
}

#[test]
fn a_rolling_restart_moves_on_once_the_restarted_instance_is_ready() {
    let (mut herd, _) = Herd::started(ORDERED);
    for id in [1, 2] {
        herd.runs(id);
        herd.instance(id, EventKind::Ready);
    }
    let effects = herd.ask(
        Request::Restart {
            target: Target {
                group: "db".into(),
                id: None,
            },
        },
        1,
    );
    assert_eq!(commands(&effects), [(1, InstanceCommand::Restart)]);
    let how = "stopped".to_string();
    herd.instance(1, EventKind::Exited { how, failed: false });
    // Running again is not enough: db has a ready check.
    assert!(commands(&herd.runs(1)).is_empty());
    let effects = herd.instance(1, EventKind::Ready);
    assert_eq!(commands(&effects), [(2, InstanceCommand::Restart)]);
    herd.runs(2);
    let effects = herd.instance(2, EventKind::Ready);
    assert_eq!(
        answers(&effects),
        [(1, Ok("group db restarted (2 instances)".into()))]
    );
}

/// A queue group ready when its consumers say so, and a group after it.
const QUEUE_READY: &str = r#"
[[group]]
name = "jobs"
command = "q"
[group.feeder]
bind = "127.0.0.1:4700"
[group.ready]
notify = true
[group.health]
tcp = "127.0.0.1:4800"
[group.local]
instances = 1

[[group]]
name = "web"
command = "web"
after = ["jobs"]
[group.local]
instances = 1
"#;

#[test]
fn a_queue_groups_readiness_and_health_are_its_consumers_not_its_feeders() {
    let (mut herd, effects) = Herd::started(QUEUE_READY);
    // jobs: feeder 1, consumer 2 (held for the feeder); web 3 waits.
    assert_eq!(starts(&effects), ["local: 1"]);
    let Some(Effect::Start { instances, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    assert!(
        instances[0].ready.is_none(),
        "the feeder has no ready check"
    );
    assert!(instances[0].health.is_none(), "nor a health check");
    herd.runs(1);
    let address = FeederAddress::local("127.0.0.1:4700".parse().unwrap());
    let effects = herd.handle(Event::Listening { id: 1, address });
    assert_eq!(starts(&effects), ["local: 2"]);
    let Some(Effect::Start { instances, .. }) = effects.first() else {
        panic!("{effects:?}");
    };
    assert!(instances[0].ready.is_some(), "the consumer has the check");
    assert!(starts(&herd.runs(2)).is_empty(), "started is not ready");
    // The consumer ready is the group ready: its feeder, started, never
    // says it is, and must not hold web back.
    assert_eq!(starts(&herd.instance(2, EventKind::Ready)), ["local: 3"]);
}

#[test]
fn an_instance_suspended_while_it_waits_starts_suspended() {
    let (mut herd, _) = Herd::started(ORDERED);
    // web 3 waits for db; suspended alone meanwhile (its group is not).
    herd.core.command(3, InstanceCommand::Suspend);
    herd.runs(1);
    herd.runs(2);
    herd.instance(1, EventKind::Ready);
    let effects = herd.instance(2, EventKind::Ready);
    assert_eq!(starts(&effects), ["local: 3 (suspended [3])"]);
}

/// A one-shot job (2 instances) and a group after it.
const AFTER_ONE_SHOT: &str = r#"
[[group]]
name = "migrate"
command = "migrate"
[group.local]
instances = 2

[[group]]
name = "web"
command = "web"
after = ["migrate"]
[group.local]
instances = 1
"#;

#[test]
fn a_group_after_a_one_shot_starts_once_it_completed_and_is_given_up_if_it_failed() {
    // migrate has a check and fails before it was ready: web is given
    // up, said in the log, and the run can end.
    let failing = AFTER_ONE_SHOT.replace(
        "instances = 2\n",
        "instances = 2\n[group.ready]\nnotify = true\n",
    );
    let (mut herd, _) = Herd::started(&failing);
    herd.runs(1);
    herd.runs(2);
    let end = InstanceEnd::Completed;
    assert!(never_ran(&herd.instance(1, EventKind::Ended { end })).is_empty());
    let end = InstanceEnd::Failed {
        reason: "exited with code 1".into(),
    };
    let effects = herd.instance(2, EventKind::Ended { end });
    assert_eq!(never_ran(&effects), [3]);
    assert_eq!(
        logs(&effects),
        ["group web will not start: migrate, which it starts after, ended without being ready"]
    );

    // Every instance completed, none ready by its check: web starts.
    let (mut herd, _) = Herd::started(&failing);
    herd.runs(1);
    herd.runs(2);
    let end = InstanceEnd::Completed;
    herd.instance(1, EventKind::Ended { end });
    let end = InstanceEnd::Completed;
    assert_eq!(
        starts(&herd.instance(2, EventKind::Ended { end })),
        ["local: 3"]
    );
}

/// `status`'s restarts of instance `id` of group web.
fn restarts_of(herd: &Herd, id: u32) -> u32 {
    let status = herd.core.status(UNIX_EPOCH);
    let web = status.groups.iter().find(|g| g.name == "web").expect("web");
    web.instances
        .iter()
        .find(|i| i.id == id)
        .map(|i| i.restarts)
        .expect("listed")
}

#[test]
fn restarts_count_what_the_policy_starts_not_what_an_operator_does() {
    let (mut herd, _) = Herd::started(WEB);
    for id in 1..=4 {
        herd.runs(id);
    }
    let crash = EventKind::Exited {
        how: "exited with code 3".into(),
        failed: true,
    };
    // The policy restarts instance 1 after a crash: a restart.
    herd.instance(1, crash.clone());
    herd.instance(1, EventKind::Backoff { delay_ms: 100 });
    herd.runs(1);
    assert_eq!(restarts_of(&herd, 1), 1);

    // An operator's restart starts it again: not one.
    let effects = herd.ask(
        Request::Restart {
            target: Target::instance("web", 1),
        },
        1,
    );
    assert_eq!(commands(&effects), [(1, InstanceCommand::Restart)]);
    herd.instance(1, EventKind::Stopping);
    herd.runs(1);
    assert_eq!(restarts_of(&herd, 1), 1);

    // Nor is a suspend and a resume.
    herd.ask(
        Request::Suspend {
            group: "web".into(),
        },
        2,
    );
    for id in 1..=3 {
        herd.instance(id, EventKind::Suspended);
    }
    herd.ask(
        Request::Resume {
            group: "web".into(),
        },
        3,
    );
    for id in 1..=3 {
        herd.runs(id);
    }
    assert_eq!(
        (1..=3).map(|id| restarts_of(&herd, id)).collect::<Vec<_>>(),
        [1, 0, 0]
    );

    // A resume that reaches a running instance starts nothing: the next
    // crash's restart still counts.
    herd.core.table.operator_command(2, InstanceCommand::Resume);
    herd.instance(2, crash);
    herd.instance(2, EventKind::Backoff { delay_ms: 100 });
    herd.runs(2);
    assert_eq!(restarts_of(&herd, 2), 1);

    // A resume that comes before the instance has said it is suspended:
    // the start after it is still the operator's.
    herd.ask(
        Request::Suspend {
            group: "web".into(),
        },
        4,
    );
    herd.ask(
        Request::Resume {
            group: "web".into(),
        },
        5,
    );
    herd.instance(3, EventKind::Suspended);
    herd.runs(3);
    assert_eq!(restarts_of(&herd, 3), 0);
}
