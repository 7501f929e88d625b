//! The operator's link: `taskherd status`, `stop`, `suspend`, ... talk to a
//! running master over its control socket (a unix socket, mode 0600).
//!
//! The client speaks first with [`ToMaster::Hello`]; the master answers
//! with [`FromMaster::Hello`]. Then the client sends one request and reads
//! frames until [`FromMaster::Done`] or [`FromMaster::Error`] (a `logs`
//! request streams [`FromMaster::Log`] frames, the backlog's first, until
//! the client hangs up or the master exits, or until `Done` after the
//! backlog when it does not follow).

use super::slave::{Level, QueueProgress};
use serde::{Deserialize, Serialize};

/// Frames from an operator's command to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToMaster {
    /// First frame.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the client.
        version: u32,
    },
    /// Every group and instance, with their state.
    Status,
    /// Stop the herd cleanly (`kill`: at once); the master answers `Done`
    /// once every instance has ended, just before it exits.
    Stop {
        /// Skip the grace: SIGKILL everything now.
        kill: bool,
    },
    /// Stop a group's instances and keep them stopped.
    Suspend {
        /// The group's name.
        group: String,
    },
    /// Start a suspended group's instances again.
    Resume {
        /// The group's name.
        group: String,
    },
    /// Restart a group's instances one at a time, each once the previous
    /// one runs again (or one instance: `id`); instances that had ended
    /// (failed, stopped, completed) are started again.
    Restart {
        /// The group's name.
        group: String,
        /// Only this instance (its id within the group). Absent in the
        /// frames of older clients: the whole group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
    /// Start the group's instances (or one: `id`) that do not run: failed,
    /// stopped by an operator, completed, or not started yet
    /// (`autostart = false`); answered once they run.
    Start {
        /// The group's name.
        group: String,
        /// Only this instance (its id within the group).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
    /// Stop the group's instances (or one: `id`) and keep them stopped
    /// until started; answered once they have ended. The herd goes on.
    StopInstances {
        /// The group's name.
        group: String,
        /// Only this instance (its id within the group).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
    /// Re-read the config file and apply the differences.
    Reload,
    /// Stream the log (of one group, or every line): the last `tail`
    /// lines the master kept, then (with `follow`) the live log until the
    /// client hangs up or the master exits; without `follow`, `Done`
    /// after the backlog.
    Logs {
        /// Only this group's lines (and the master's own events).
        group: Option<String>,
        /// How many of the last lines the master kept to send first (it
        /// keeps a bounded backlog; 0: none, the live log only).
        #[serde(default)]
        tail: u32,
        /// Go on with the live log after the backlog.
        #[serde(default = "follow_by_default")]
        follow: bool,
    },
}

/// What an operator's `start`, `stop` or `restart` is about: a whole
/// group (`web`) or one of its instances (`web:2`, its id within the
/// group, as `status` shows it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The group's name.
    pub group: String,
    /// One instance's id within the group; `None`: the whole group.
    pub id: Option<u32>,
}

impl Target {
    /// The whole of `group`.
    pub fn group(group: impl Into<String>) -> Self {
        Target {
            group: group.into(),
            id: None,
        }
    }

    /// Instance `id` (within the group) of `group`.
    pub fn instance(group: impl Into<String>, id: u32) -> Self {
        Target {
            group: group.into(),
            id: Some(id),
        }
    }
}

/// `GROUP` or `GROUP:ID` (a group name may hold `:`; only a number
/// after the last one is an instance's id).
impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.rsplit_once(':') {
            Some((group, id)) if !group.is_empty() => match id.parse() {
                Ok(id) => Target::instance(group, id),
                Err(_) => Target::group(text),
            },
            _ => Target::group(text),
        })
    }
}

/// `group web` or `web:2`, as the answers say it.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(f, "{}:{id}", self.group),
            None => write!(f, "group {}", self.group),
        }
    }
}

/// A `logs` request without `follow` (an older client) follows.
fn follow_by_default() -> bool {
    true
}

/// Frames from the master to an operator's command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FromMaster {
    /// Answer to the client's hello.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the master.
        version: u32,
        /// The master's pid.
        pid: u32,
        /// The config file it runs.
        config: String,
    },
    /// The answer to [`ToMaster::Status`].
    Status(HerdStatus),
    /// A line of the live log.
    Log {
        /// The line, formatted as the master's log (text).
        line: String,
        /// Its severity.
        level: Level,
    },
    /// The request is carried out; `message` says what happened.
    Done {
        /// For the operator.
        message: String,
    },
    /// The request was refused or failed.
    Error {
        /// For the operator (a refused reload lists every config error).
        message: String,
    },
}

/// The state of a whole herd.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HerdStatus {
    /// The config file.
    pub config: String,
    /// The master's pid.
    pub pid: u32,
    /// How long the master has run, in ms.
    pub uptime_ms: u64,
    /// Every group, in config order.
    pub groups: Vec<GroupStatus>,
}

/// The state of one group.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Its name.
    pub name: String,
    /// Suspended by an operator.
    pub suspended: bool,
    /// Its instances, in id order.
    pub instances: Vec<InstanceStatus>,
    /// The latest counts of its feeder, for a queue group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueProgress>,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Not started yet (its host is not connected, or its feeder not
    /// listening).
    Pending,
    /// Not started yet: its group starts after other groups (`after`),
    /// and one of them is not ready yet.
    Waiting,
    /// Its process runs.
    Running,
    /// Its process is being stopped.
    Stopping,
    /// Waiting to be restarted after it ended.
    Backoff,
    /// Stopped by an operator; not restarted until resumed.
    Suspended,
    /// Ended and not restarted (its policy says so).
    Completed,
    /// Given up after failing.
    Failed,
    /// Stopped with the herd.
    Stopped,
    /// Its host was lost: nobody knows how it ended.
    Lost,
}

impl InstanceState {
    /// Lower-case name, as `status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Waiting => "waiting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Backoff => "backoff",
            InstanceState::Suspended => "suspended",
            InstanceState::Completed => "completed",
            InstanceState::Failed => "failed",
            InstanceState::Stopped => "stopped",
            InstanceState::Lost => "lost",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Global id.
    pub id: u32,
    /// Id within the group.
    pub group_id: u32,
    /// Host name as the master knows it.
    pub host: String,
    /// Base name of the command.
    pub command: String,
    /// Where it is in its life.
    pub state: InstanceState,
    /// Pid of the running process (on its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How long the current process has run, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Restarts since the master started it first.
    pub restarts: u32,
    /// How its last process ended ("exited with code 3", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Time since its last sign of life (ping, frame or output), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_ms_ago: Option<u64>,
    /// Its health check's verdict on the running process (`healthy`, or
    /// `unhealthy: WHY`); before a first verdict, `not ready: WHY` once
    /// its `[group.ready]` check is past its timeout; none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_as_tagged_json() {
        let request = ToMaster::Suspend {
            group: "web".into(),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"type":"suspend","group":"web"}"#);
        assert_eq!(serde_json::from_str::<ToMaster>(&text).unwrap(), request);
        // A `logs` request of an older client follows, without backlog.
        let old = serde_json::from_str::<ToMaster>(r#"{"type":"logs","group":null}"#).unwrap();
        assert_eq!(
            old,
            ToMaster::Logs {
                group: None,
                tail: 0,
                follow: true
            }
        );
        let state = serde_json::to_string(&InstanceState::Backoff).unwrap();
        assert_eq!(state, r#""backoff""#);
        // A `restart` of an older client is of the whole group.
        let old = serde_json::from_str::<ToMaster>(r#"{"type":"restart","group":"web"}"#).unwrap();
        assert_eq!(
            old,
            ToMaster::Restart {
                group: "web".into(),
                id: None
            }
        );
        let start = ToMaster::Start {
            group: "web".into(),
            id: Some(2),
        };
        let text = serde_json::to_string(&start).unwrap();
        assert_eq!(text, r#"{"type":"start","group":"web","id":2}"#);
    }

    #[test]
    fn targets_are_a_group_or_one_instance() {
        let parse = |text: &str| text.parse::<Target>().unwrap();
        assert_eq!(parse("web"), Target::group("web"));
        assert_eq!(parse("web:2"), Target::instance("web", 2));
        // Only a number after the last `:` is an id.
        assert_eq!(parse("a:b"), Target::group("a:b"));
        assert_eq!(parse("a:b:3"), Target::instance("a:b", 3));
        assert_eq!(parse(":3"), Target::group(":3"));
        assert_eq!(parse("web:2").to_string(), "web:2");
        assert_eq!(parse("web").to_string(), "group web");
    }
}
