//! The link between the master and the agent on a remote host, carried
//! over the SSH channel's stdin (to the agent) and stdout (to the master).
//!
//! The master speaks first with [`ToAgent::Hello`]; the agent answers with
//! [`FromAgent::Hello`]. Then the master hands over the instances to run
//! ([`ToAgent::Start`]); the agent supervises them with the same code as
//! local instances and relays their log lines and final reports. Both
//! sides send [`ToAgent::Heartbeat`] / [`FromAgent::Heartbeat`] so a
//! network partition (no FIN, no RST) is noticed on both ends.

use super::instance::{InstanceCommand, InstanceEnd, InstanceEvent, InstanceSpec, Stream};
use super::slave::Level;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Frames from the master to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToAgent {
    /// First frame.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the master.
        version: u32,
        /// How often the master sends heartbeats (and expects them).
        #[serde(with = "super::millis")]
        heartbeat: Duration,
        /// Silence after which the agent stops everything and exits.
        #[serde(with = "super::millis")]
        orphan_timeout: Duration,
    },
    /// Run these instances (ids are global, unique within a run).
    Start {
        /// What to run.
        instances: Vec<InstanceSpec>,
    },
    /// Stop every instance cleanly, report each, then exit.
    Stop {
        /// Why, for the agent's log.
        reason: String,
    },
    /// Kill every instance at once, report each, then exit.
    Kill,
    /// Suspend, resume, restart or remove one instance.
    Command {
        /// Global id of the instance.
        id: u32,
        /// What to do.
        command: InstanceCommand,
    },
    /// "I am still here".
    Heartbeat,
}

/// Frames from an agent to the master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FromAgent {
    /// Answer to the master's hello.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// The agent's pid on its host, for the log.
        pid: u32,
    },
    /// A log line of an instance (or of the agent itself when `id` is
    /// `None`).
    Log {
        /// Global id of the instance.
        id: Option<u32>,
        /// When the agent received it, in ms since the Unix epoch.
        time_ms: u64,
        /// Severity.
        level: Level,
        /// Where it came from.
        stream: Stream,
        /// The text.
        message: String,
    },
    /// An instance's supervision ended for good.
    Ended {
        /// Global id of the instance.
        id: u32,
        /// How.
        end: InstanceEnd,
    },
    /// Something happened to an instance (status and events of the
    /// master).
    Event(InstanceEvent),
    /// A feeder instance listens (each time it starts).
    Listening {
        /// Global id of the feeder instance.
        id: u32,
        /// The address it bound, as it reported it (`0.0.0.0:4711`).
        addr: String,
    },
    /// "I am still here".
    Heartbeat,
}

/// The time of a relayed log line ([`FromAgent::Log`]'s `time_ms`).
pub fn time_of(time_ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(time_ms)
}
