//! One interface for every host the master places instances on, its own
//! ([`super::local`]) and remote ones ([`super::remote`]): a host's
//! supervisor is a task that takes [`HostCommand`]s (run these instances,
//! command that one), tells the run loop what happens as
//! [`HostReport`]s, stops its instances when the herd stops (the run's
//! [`Shutdown`](crate::supervise::shutdown::Shutdown)), and returns their
//! final reports once every one has ended. It ends, closing its commands,
//! when it has no instance left; the run loop starts another for the
//! next instances placed there.

use super::core::Place;
use super::plan::same_host;
use super::queue::FeederAddress;
use crate::config::HostSpec;
use crate::supervise::instance::{InstanceCommand, InstanceEvent, InstanceSpec};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What a host's supervisor is asked while it runs.
#[derive(Debug, Clone)]
pub enum HostCommand {
    /// Run these instances too.
    Add(Vec<InstanceSpec>),
    /// Suspend, resume, restart or remove one instance.
    Instance {
        /// Its global id.
        id: u32,
        /// What to do.
        command: InstanceCommand,
    },
}

/// What a host's supervisor tells the run loop, in the order it
/// happened.
#[derive(Debug, Clone)]
pub enum HostReport {
    /// An event of one of its instances.
    Event(InstanceEvent),
    /// A feeder listens.
    Listening {
        /// The feeder.
        id: u32,
        /// Where its consumers reach it.
        address: FeederAddress,
    },
    /// The agent was lost; its instances are gone with it until the host
    /// reconnects, in `retry_in`.
    Lost {
        /// The host.
        host: HostSpec,
        /// What happened.
        problem: String,
        /// When it tries again.
        retry_in: Duration,
    },
}

/// The run loop's handle on one host's supervisor.
#[derive(Debug, Clone)]
pub(crate) struct HostHandle {
    /// Which host.
    place: Arc<Place>,
    /// Its supervisor's commands.
    commands: mpsc::UnboundedSender<HostCommand>,
}

impl HostHandle {
    pub(crate) fn new(place: Place, commands: mpsc::UnboundedSender<HostCommand>) -> Self {
        HostHandle {
            place: Arc::new(place),
            commands,
        }
    }

    /// Which host.
    pub(crate) fn place(&self) -> &Place {
        &self.place
    }

    /// Whether this is `place`'s supervisor.
    pub(crate) fn is(&self, place: &Place) -> bool {
        match (&*self.place, place) {
            (Place::Local, Place::Local) => true,
            (Place::Host { host: a, .. }, Place::Host { host: b, .. }) => same_host(a, b),
            _ => false,
        }
    }

    /// Whether its supervisor still takes commands.
    pub(crate) fn is_open(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Hands it `instances`, those in `suspended` noted suspended first
    /// (so that they start suspended).
    ///
    /// # Errors
    /// Its supervisor has ended: the instances are given back, to be
    /// handed to a new one (a note it took meanwhile is moot).
    pub(crate) fn add(
        &self,
        instances: Vec<InstanceSpec>,
        suspended: &[u32],
    ) -> Result<(), Vec<InstanceSpec>> {
        for id in suspended {
            let note = HostCommand::Instance {
                id: *id,
                command: InstanceCommand::Suspend,
            };
            if self.commands.send(note).is_err() {
                return Err(instances);
            }
        }
        self.commands.send(HostCommand::Add(instances)).map_err(
            |mpsc::error::SendError(command)| match command {
                HostCommand::Add(instances) => instances,
                HostCommand::Instance { .. } => {
                    unreachable!("invariant: a failed send gives back what was sent")
                }
            },
        )
    }

    /// Commands one of its instances.
    pub(crate) fn command(&self, id: u32, command: InstanceCommand) {
        let _ = self.commands.send(HostCommand::Instance { id, command });
    }
}
