//! The control channel between a parent (the master, or an agent on a
//! remote host) and one slave instance.
//!
//! The parent writes [`ToSlave`] frames, the slave writes [`FromSlave`]
//! frames, over the socketpair whose fd number the slave finds in
//! [`CONTROL_FD_ENV`]. The parent speaks first with
//! [`ToSlave::Identity`]; a slave that uses the library answers with
//! [`FromSlave::Hello`]. A plain program never answers, and the parent then
//! treats it as a plain program (stop by SIGTERM, liveness by output only).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Environment variable that holds the fd number of the control socket.
pub const CONTROL_FD_ENV: &str = "TASKHERD_CONTROL_FD";
/// Environment variable: the global instance id (1..N across groups).
pub const ID_ENV: &str = "TASKHERD_ID";
/// Environment variable: the id within the group (1..group_count).
pub const GROUP_ID_ENV: &str = "TASKHERD_GROUP_ID";
/// Environment variable: how many instances the group has in all.
pub const GROUP_COUNT_ENV: &str = "TASKHERD_GROUP_COUNT";
/// Environment variable: the group name.
pub const GROUP_ENV: &str = "TASKHERD_GROUP";
/// Environment variable: the host name as the master knows it.
pub const HOST_ENV: &str = "TASKHERD_HOST";
/// Environment variable: the group params, as JSON.
pub const PARAMS_ENV: &str = "TASKHERD_PARAMS";

/// Who a slave instance is: the first frame it receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// Global id, 1..N over all groups in config order.
    pub id: u32,
    /// Id within the group, 1..group_count.
    pub group_id: u32,
    /// Number of instances of the group (over all hosts).
    pub group_count: u32,
    /// Name of the group.
    pub group: String,
    /// Host name as the master knows it (`localhost` for local instances).
    pub host: String,
    /// The group's params, any JSON value (a table in the config).
    pub params: serde_json::Value,
    /// Liveness timeout: the slave must ping or print within it. `None`
    /// when liveness is not checked.
    #[serde(with = "super::millis::option")]
    pub timeout: Option<Duration>,
    /// How long the slave has between a Stop and a SIGKILL.
    #[serde(with = "super::millis")]
    pub stop_grace: Duration,
    /// After this many jobs (counted by the library) the slave stops and
    /// asks to be recycled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jobs: Option<u64>,
    /// In a queue group: whether this instance is the feeder or a
    /// consumer, and what it needs to play that part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueRole>,
    /// The values the config's `[host_vars]` gives this instance's host
    /// (empty for local instances and hosts without any). They are in
    /// its environment too.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vars: std::collections::BTreeMap<String, String>,
}

/// The part an instance of a queue group plays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
#[non_exhaustive]
pub enum QueueRole {
    /// Serve jobs to consumers over TCP.
    Feeder {
        /// Address to bind (`127.0.0.1:0` picks a free port).
        bind: String,
        /// Per-run secret consumers must prove they know.
        secret: String,
        /// Leases, attempts, retries, rate.
        settings: QueueSettings,
    },
    /// Pull jobs from the feeder and run them.
    Consumer {
        /// The feeder's address, as it reported it (`host:port`).
        feeder: String,
        /// Per-run secret, to prove to the feeder.
        secret: String,
        /// Jobs run at once by this instance.
        concurrency: u32,
        /// Jobs the feeder may send ahead (prefetch), at least `concurrency`.
        credits: u32,
        /// The group's queue is on NATS JetStream (`[group.queue] backend =
        /// "nats"`): pull from it instead of a feeder (`feeder` and
        /// `secret` are empty then).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jetstream: Option<Box<JetStreamQueue>>,
    },
}

/// A queue group's queue on NATS JetStream, as its consumers reach it.
///
/// The work stream `stream` holds the jobs (subject `subject`, one JSON
/// value per message); `consumer` is the group's durable pull consumer
/// (ack wait = `lease`, max deliver = `max_attempts` + 1); dead jobs go to
/// `dead_stream` on `dead_subject` with their reason in a header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JetStreamQueue {
    /// Server URLs (`nats://host:4222`), tried in turn.
    pub servers: Vec<String>,
    /// How to authenticate.
    #[serde(default)]
    pub auth: NatsAuth,
    /// A CA file to verify the servers' TLS certificates with (TLS is
    /// required then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The work stream.
    pub stream: String,
    /// The subject jobs are published on.
    pub subject: String,
    /// The durable pull consumer every consumer of the group shares.
    pub consumer: String,
    /// The dead-letter stream.
    pub dead_stream: String,
    /// The subject dead jobs are published on.
    pub dead_subject: String,
    /// The subject the group's rate governor broadcasts on (slow down,
    /// pause).
    pub governor_subject: String,
    /// Leases, attempts, retries and rate, as for a feeder.
    pub settings: QueueSettings,
    /// Replicas of the streams (1, or 3 in a cluster), when created.
    #[serde(default = "one")]
    pub replicas: usize,
    /// The streams are kept in memory rather than in files, when created.
    #[serde(default)]
    pub memory: bool,
}

fn one() -> usize {
    1
}

/// The environment variable that gives a JetStream queue group's
/// built-in feeder (`taskherd builtin-feeder --jetstream`) its queue, as
/// the JSON of a [`JetStreamQueue`].
pub const JETSTREAM_QUEUE_ENV: &str = "TASKHERD_JETSTREAM_QUEUE";

/// The names of a queue group's JetStream objects, made of its name.
pub mod nats_names {
    /// A stream name made of a group's name: `TASKHERD_` + the name in
    /// upper case, with what stream names cannot hold (`.`, `*`, `>`,
    /// white space, `/`, `\`) as `_`.
    pub fn stream(group: &str) -> String {
        let name: String = group
            .chars()
            .map(|c| match c {
                '.' | '*' | '>' | '/' | '\\' => '_',
                c if c.is_whitespace() => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        format!("TASKHERD_{name}")
    }

    /// A subject token made of a group's name (`.`, `*`, `>` and white
    /// space as `_`).
    pub fn subject_token(group: &str) -> String {
        group
            .chars()
            .map(|c| match c {
                '.' | '*' | '>' => '_',
                c if c.is_whitespace() => '_',
                c => c,
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn names_are_made_of_the_group() {
            assert_eq!(super::stream("jobs"), "TASKHERD_JOBS");
            assert_eq!(super::stream("img.resize *"), "TASKHERD_IMG_RESIZE__");
            assert_eq!(super::subject_token("img.resize"), "img_resize");
        }
    }
}

/// How a NATS client authenticates (`[nats]` of the config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A user name and password.
    User {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// A credentials file (JWT and nkey seed), a path on the consumer's
    /// host.
    Creds(std::path::PathBuf),
    /// An nkey seed file, a path on the consumer's host.
    Nkey(std::path::PathBuf),
}

impl NatsAuth {
    /// Who we are to the server, for error messages: the user, or how we
    /// authenticate (never a secret).
    pub fn who(&self) -> String {
        match self {
            NatsAuth::None => "no credentials".to_string(),
            NatsAuth::User { user, .. } => format!("user {user:?}"),
            NatsAuth::Token(_) => "a token".to_string(),
            NatsAuth::Creds(path) => format!("credentials file {}", path.display()),
            NatsAuth::Nkey(path) => format!("nkey seed file {}", path.display()),
        }
    }
}

/// How a feeder treats its jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSettings {
    /// A job not answered within this long goes back to the queue.
    #[serde(with = "super::millis")]
    pub lease: Duration,
    /// Attempts after which a failing job is dead-lettered.
    pub max_attempts: u32,
    /// Delay before a failed job runs again.
    pub retry: crate::retry::RetryPolicy,
    /// Global rate limit in jobs per second (token bucket), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// How often the feeder reports its counts to the master.
    #[serde(with = "super::millis")]
    pub progress_every: Duration,
    /// Where the feeder appends its joblog, one JSON line per outcome
    /// (`[group.queue] joblog`), if anywhere: a path on the feeder's host
    /// (relative to its working directory; a leading `~/` is its home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joblog: Option<std::path::PathBuf>,
}

/// The feeder's counts, reported to the master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// Jobs acked.
    pub done: u64,
    /// Failed attempts (each retry or dead outcome, and lost leases).
    pub failed: u64,
    /// Jobs put back for another attempt.
    pub retried: u64,
    /// Jobs dead-lettered.
    pub dead: u64,
    /// Jobs leased right now.
    pub in_flight: u64,
    /// Jobs waiting (ready or delayed) in the feeder.
    pub pending: u64,
    /// Consumers connected.
    pub consumers: u32,
    /// Acks per second since the previous report.
    pub rate: f64,
    /// The feeder's source said it has nothing more for now.
    pub empty: bool,
    /// How long the jobs done so far took.
    #[serde(default, skip_serializing_if = "JobDurations::is_empty")]
    pub durations: JobDurations,
}

/// Upper bounds, in seconds, of the buckets of [`JobDurations`] (one more
/// bucket holds what took longer than the last).
pub const JOB_DURATION_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How long the jobs a feeder saw done took, from the lease to the ack
/// (the attempt that succeeded): a histogram of fixed buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JobDurations {
    /// Jobs per bucket, not cumulative: `buckets[i]` took at most
    /// `JOB_DURATION_BOUNDS[i]` seconds and more than the bound before it;
    /// the last one, more than every bound.
    pub buckets: [u64; JOB_DURATION_BOUNDS.len() + 1],
    /// The sum of their durations, in seconds.
    pub sum_seconds: f64,
}

impl JobDurations {
    /// Counts one job that took `took`.
    pub fn observe(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = JOB_DURATION_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(JOB_DURATION_BOUNDS.len());
        self.buckets[bucket] += 1;
        self.sum_seconds += seconds;
    }

    /// How many jobs were counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }
}

/// Frames from the parent to a slave.
// The identity is sent once per start; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToSlave {
    /// First frame: the protocol version and the slave's identity.
    Identity {
        /// [`super::PROTOCOL_VERSION`] of the parent.
        version: u32,
        /// Who the slave is.
        identity: Identity,
    },
    /// Finish the current work and exit; SIGKILL follows after the grace.
    Stop,
}

/// Frames from a slave to its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FromSlave {
    /// The slave uses the library; first frame it sends.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the slave.
        version: u32,
    },
    /// Liveness: "I am still working".
    Ping,
    /// A structured log record; counts as liveness too.
    Log {
        /// Severity chosen by the slave.
        level: Level,
        /// The message, one or more lines.
        message: String,
    },
    /// The slave is stopping to be recycled (it reached `max_jobs`): its
    /// clean end is to be followed by a fresh start.
    Recycle {
        /// Why, for the log.
        reason: String,
    },
    /// The feeder listens: consumers may be started with this address.
    Listening {
        /// `host:port` as bound (the real port when 0 was asked).
        addr: String,
    },
    /// The program is ready to serve: the groups that start after its
    /// group may start (`[group.ready] notify = true`).
    Ready,
    /// The feeder's counts, at a steady interval and at the end.
    Progress {
        /// The counts.
        progress: QueueProgress,
    },
    /// The user function ended: the last frame before the process exits.
    Outcome {
        /// `true` for a clean end, `false` for an error or a panic.
        success: bool,
        /// Why it failed, for the log.
        message: Option<String>,
    },
}

/// Severity of a log line, from `trace` to `emergency` (the PSR-3 levels
/// of the PHP originals, plus `trace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal events (stdout lines get this level).
    Info,
    /// Normal but significant.
    Notice,
    /// Something unexpected (stderr lines get this level).
    Warning,
    /// An error the program survives.
    Error,
    /// A component is unusable.
    Critical,
    /// Someone must act now.
    Alert,
    /// The system is unusable.
    Emergency,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 9] = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Notice,
        Level::Warning,
        Level::Error,
        Level::Critical,
        Level::Alert,
        Level::Emergency,
    ];

    /// The lowercase name, as in the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Notice => "notice",
            Level::Warning => "warning",
            Level::Error => "error",
            Level::Critical => "critical",
            Level::Alert => "alert",
            Level::Emergency => "emergency",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Error of [`Level::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log level {0:?} (expected one of trace, debug, info, notice, warning, error, critical, alert, emergency)")]
pub struct UnknownLevel(pub String);

impl FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let name = match lower.as_str() {
            "warn" => "warning",
            "crit" => "critical",
            "err" => "error",
            "emerg" => "emergency",
            other => other,
        };
        Level::ALL
            .into_iter()
            .find(|level| level.as_str() == name)
            .ok_or_else(|| UnknownLevel(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_durations_fall_in_the_bucket_of_their_bound() {
        let mut durations = JobDurations::default();
        assert!(durations.is_empty());
        durations.observe(Duration::from_millis(5)); // on the first bound
        durations.observe(Duration::from_millis(6));
        durations.observe(Duration::from_secs(1));
        durations.observe(Duration::from_secs(3600)); // beyond every bound
        assert_eq!(durations.count(), 4);
        assert_eq!(durations.buckets[0], 1);
        assert_eq!(durations.buckets[1], 1);
        assert_eq!(durations.buckets[7], 1, "1 s: the bucket of 1.0");
        assert_eq!(durations.buckets[JOB_DURATION_BOUNDS.len()], 1);
        assert!((durations.sum_seconds - 3601.011).abs() < 1e-9);
        // Reported only once there is something to report, and read back.
        let empty = serde_json::to_value(QueueProgress::default()).expect("json");
        assert!(empty.get("durations").is_none());
        let progress = QueueProgress {
            durations,
            ..QueueProgress::default()
        };
        let text = serde_json::to_string(&progress).expect("json");
        let back: QueueProgress = serde_json::from_str(&text).expect("read back");
        assert_eq!(back, progress);
    }

    #[test]
    fn identity_round_trips() {
        let frame = ToSlave::Identity {
            version: 1,
            identity: Identity {
                vars: Default::default(),
                id: 3,
                group_id: 1,
                group_count: 2,
                group: "g".into(),
                host: "localhost".into(),
                params: serde_json::json!({"message": "hi"}),
                timeout: Some(Duration::from_millis(1500)),
                stop_grace: Duration::from_secs(10),
                max_jobs: None,
                queue: None,
            },
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert!(text.contains(r#""timeout":1500"#), "{text}");
        assert_eq!(serde_json::from_str::<ToSlave>(&text).unwrap(), frame);
    }

    #[test]
    fn levels_parse_with_aliases() {
        assert_eq!("WARN".parse::<Level>().unwrap(), Level::Warning);
        assert_eq!("emergency".parse::<Level>().unwrap(), Level::Emergency);
        assert!("loud".parse::<Level>().is_err());
        assert!(Level::Info < Level::Error);
    }
}
