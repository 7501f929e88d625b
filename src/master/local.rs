//! The master's own host, behind the interface of every host
//! ([`super::host`]): its instances are supervised in this process, each
//! by a task of [`crate::supervise`] (the code every agent runs), without
//! the agent's link: their events go straight to the run loop, and a
//! feeder's address is reported as a remote host reports its feeders'.
//!
//! Running them through an agent in this process instead (over an
//! in-memory pipe) would make the two kinds of hosts one code path down
//! to the frames, but every log line and event would be encoded and
//! decoded once more, on the master's busiest path. `benches/local_hop.rs`
//! measures it: on 2 shared cores, medians of 9 runs, 200 instances of
//! `true` took 361 ms to start and end directly and 454 ms through the
//! agent; 800 000 lines of output reached the log sink in 37 ms directly
//! and 54 ms through the agent (63 ms against 29 ms in a run of 5). Not
//! negligible: the master's own instances stay direct.

use super::host::{HostCommand, HostReport};
use super::queue::FeederAddress;
use crate::protocol::slave::{Level, QueueRole};
use crate::supervise::instance::{self, InstanceCommand, InstanceReport, Supervision};
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Supervises the instances `commands` brings on the master's host until
/// each has ended; returns their final reports.
///
/// Instances noted suspended before they arrive start suspended. It ends
/// once it has no instance left and no command waiting (closing
/// `commands`).
pub(crate) async fn supervise_local(
    context: Supervision,
    reports_tx: mpsc::UnboundedSender<HostReport>,
    mut commands: mpsc::UnboundedReceiver<HostCommand>,
) -> Vec<InstanceReport> {
    let mut host = LocalHost {
        context,
        reports_tx,
        supervisors: JoinSet::new(),
        routes: BTreeMap::new(),
        suspended: BTreeSet::new(),
        relays: JoinSet::new(),
        reports: Vec::new(),
    };
    loop {
        while let Ok(command) = commands.try_recv() {
            host.apply(command);
        }
        if host.supervisors.is_empty() {
            // Nothing more can come in once closed; what came in before
            // is still served.
            commands.close();
            while let Ok(command) = commands.try_recv() {
                host.apply(command);
            }
            if host.supervisors.is_empty() {
                break;
            }
        }
        tokio::select! {
            Some(command) = commands.recv() => host.apply(command),
            Some(joined) = host.supervisors.join_next() => match joined {
                Ok(report) => {
                    host.routes.remove(&report.label.id);
                    host.reports.push(report);
                }
                Err(err) => {
                    let message = format!("an instance supervisor crashed: {err}");
                    host.context.sink.master_event(Level::Critical, message).await;
                }
            },
        }
    }
    host.reports
}

/// The supervisors of the master's host.
struct LocalHost {
    /// What every supervisor shares.
    context: Supervision,
    /// Where feeders' addresses go.
    reports_tx: mpsc::UnboundedSender<HostReport>,
    /// One task per instance.
    supervisors: JoinSet<InstanceReport>,
    /// Each instance's commands.
    routes: BTreeMap<u32, mpsc::UnboundedSender<InstanceCommand>>,
    /// Instances noted suspended before they arrived.
    suspended: BTreeSet<u32>,
    /// Relays of feeders' addresses.
    relays: JoinSet<()>,
    /// Final reports so far.
    reports: Vec<InstanceReport>,
}

impl LocalHost {
    fn apply(&mut self, command: HostCommand) {
        match command {
            HostCommand::Add(instances) => {
                for spec in instances {
                    let id = spec.label.id;
                    let listening = matches!(spec.identity.queue, Some(QueueRole::Feeder { .. }))
                        .then(|| self.relay_listening(id));
                    let (command_tx, command_rx) = mpsc::unbounded_channel();
                    self.routes.insert(id, command_tx);
                    let context = self.context.clone();
                    let suspended = self.suspended.remove(&id);
                    self.supervisors.spawn(instance::supervise(
                        spec, context, listening, command_rx, suspended,
                    ));
                }
            }
            HostCommand::Instance { id, command } => match self.routes.get(&id) {
                Some(route) => {
                    let _ = route.send(command);
                }
                None if command == InstanceCommand::Suspend => {
                    self.suspended.insert(id);
                }
                None => {
                    self.suspended.remove(&id);
                }
            },
        }
    }

    /// A feeder's listening watch: each address it listens at is
    /// reported.
    fn relay_listening(&mut self, id: u32) -> watch::Sender<Option<String>> {
        let (listening_tx, mut listening_rx) = watch::channel::<Option<String>>(None);
        let reports_tx = self.reports_tx.clone();
        self.relays.spawn(async move {
            while listening_rx.changed().await.is_ok() {
                let listened = listening_rx.borrow_and_update().clone();
                if let Some(addr) = listened.and_then(|a| a.parse::<std::net::SocketAddr>().ok()) {
                    let address = FeederAddress::local(addr);
                    let _ = reports_tx.send(HostReport::Listening { id, address });
                }
            }
        });
        listening_tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::log::LogSink;

    use crate::supervise::instance::{EventKind, InstanceEnd, InstanceSpec};

    use crate::supervise::shutdown::Shutdown;

    use std::time::Duration;

    fn spec(id: u32, script: &str) -> InstanceSpec {
        InstanceSpec::shell("g", "localhost", id, 2, script)
    }

    #[tokio::test]
    async fn runs_what_it_is_handed_obeys_and_ends_when_nothing_is_left() {
        let (sink, _records) = LogSink::channel();
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let context = Supervision {
            sink,
            shutdown: Shutdown::new(),
            pids: None,
            events: Some(events_tx),
        };
        let (reports_tx, _reports_rx) = mpsc::unbounded_channel();
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        // 2 is noted suspended before it arrives; 1 runs and is removed.
        let suspend = HostCommand::Instance {
            id: 2,
            command: InstanceCommand::Suspend,
        };
        commands_tx.send(suspend).unwrap();
        let add = HostCommand::Add(vec![spec(1, "exec sleep 600"), spec(2, "exit 0")]);
        commands_tx.send(add).unwrap();
        let host = tokio::spawn(supervise_local(context, reports_tx, commands_rx));
        let wait = Duration::from_secs(10);
        let mut seen = Vec::new();
        while !seen.contains(&(1, "started")) || !seen.contains(&(2, "suspended")) {
            let event = tokio::time::timeout(wait, events_rx.recv())
                .await
                .unwrap()
                .unwrap();
            match event.kind {
                EventKind::Started { .. } => seen.push((event.id, "started")),
                EventKind::Suspended => seen.push((event.id, "suspended")),
                _ => {}
            }
        }
        for (id, command) in [(1, InstanceCommand::Remove), (2, InstanceCommand::Remove)] {
            commands_tx
                .send(HostCommand::Instance { id, command })
                .unwrap();
        }
        let mut reports = tokio::time::timeout(wait, host).await.unwrap().unwrap();
        reports.sort_by_key(|r| r.label.id);
        let ends: Vec<(u32, InstanceEnd)> =
            reports.into_iter().map(|r| (r.label.id, r.end)).collect();
        let stopped = InstanceEnd::Stopped { killed: false };
        assert_eq!(ends, [(1, stopped.clone()), (2, stopped)]);
        assert!(!seen.contains(&(2, "started")), "{seen:?}");
        // Its commands are closed: the next instances go to a new one.
        assert!(commands_tx.is_closed());
    }
}
