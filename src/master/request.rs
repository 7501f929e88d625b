//! Operators' requests to a running herd and their answers: one
//! [`Request`] type for the [`Herd`](super::Herd) handle and the control
//! socket alike, answered with a [`Result`] of [`Answer`] and
//! [`HerdError`].

use super::control::LogsRequest;
use crate::config::LoadError;
use crate::error_text::error_chain;
use crate::protocol::control::{FromMaster, HerdStatus, Target, ToMaster};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What an operator asks of the whole herd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Every group and instance, with their state.
    Status,
    /// Stop a group's instances and keep them stopped.
    Suspend {
        /// The group.
        group: String,
    },
    /// Start a suspended group's instances again.
    Resume {
        /// The group.
        group: String,
    },
    /// Restart a group's instances one at a time (or one instance), each
    /// once the previous one runs again; instances that had ended (failed,
    /// stopped, completed, never started) are started again. Answered
    /// once the last one runs.
    Restart {
        /// The group, or one of its instances.
        target: Target,
    },
    /// Start the instances of a group (or one instance) that do not run:
    /// failed ones (revived: a fresh restart budget), ones an operator
    /// stopped, completed ones, and those of an `autostart = false` group
    /// not started yet. Answered once they run; running ones are left
    /// alone and counted.
    Start {
        /// The group, or one of its instances.
        target: Target,
    },
    /// Stop the instances of a group (or one instance) and keep them
    /// stopped until a [`Request::Start`] (or a restart); the herd goes on
    /// (it runs until stopped while an instance is stopped so). Answered
    /// once they have ended.
    StopInstances {
        /// The group, or one of its instances.
        target: Target,
    },
    /// Re-read the config file and apply the differences.
    Reload,
    /// Stop the herd (`kill`: at once); answered once every instance has
    /// ended.
    Stop {
        /// Skip the grace: SIGKILL everything now.
        kill: bool,
        /// Why, for the log.
        reason: String,
    },
}

/// What a control socket frame asks: a request of the herd, or the log
/// stream (served beside the herd, by the log sink).
#[derive(Debug)]
pub(crate) enum Asked {
    /// A request of the herd.
    Herd(Request),
    /// `taskherd logs`.
    Logs(LogsRequest),
}

impl Request {
    /// The request a control socket frame carries.
    ///
    /// # Errors
    /// [`HerdError::NotARequest`] for a frame that asks nothing (a hello).
    pub(crate) fn from_wire(frame: ToMaster) -> Result<Asked, HerdError> {
        let request = match frame {
            ToMaster::Status => Request::Status,
            ToMaster::Stop { kill: true } => Request::Stop {
                kill: true,
                reason: "kill requested over the control socket".into(),
            },
            ToMaster::Stop { kill: false } => Request::Stop {
                kill: false,
                reason: "stop requested over the control socket".into(),
            },
            ToMaster::Suspend { group } => Request::Suspend { group },
            ToMaster::Resume { group } => Request::Resume { group },
            ToMaster::Restart { group, id } => Request::Restart {
                target: Target { group, id },
            },
            ToMaster::Start { group, id } => Request::Start {
                target: Target { group, id },
            },
            ToMaster::StopInstances { group, id } => Request::StopInstances {
                target: Target { group, id },
            },
            ToMaster::Reload => Request::Reload,
            ToMaster::Logs {
                group,
                tail,
                follow,
            } => {
                return Ok(Asked::Logs(LogsRequest {
                    group,
                    tail,
                    follow,
                }))
            }
            other => {
                return Err(HerdError::NotARequest {
                    frame: format!("{other:?}"),
                })
            }
        };
        Ok(Asked::Herd(request))
    }
}

/// A request carried out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    /// The answer to [`Request::Status`].
    Status(HerdStatus),
    /// What was done, for the operator.
    Done(String),
}

impl Answer {
    /// The message of a [`Answer::Done`] (a status as JSON, which no
    /// handle asks for).
    pub(crate) fn into_message(self) -> String {
        match self {
            Answer::Done(message) => message,
            Answer::Status(status) => serde_json::to_string(&status).unwrap_or_default(),
        }
    }
}

/// Why an operator's request was refused or failed. Its text is the one
/// `taskherd` prints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HerdError {
    /// The config has no such group.
    #[error("no group named {group:?}")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// The group has no instance with this id.
    #[error("group {group} has no instance {id}")]
    UnknownInstance {
        /// The group.
        group: String,
        /// The id within the group asked for.
        id: u32,
    },
    /// Instances of a queue group are started and stopped with the herd
    /// (its consumers need their feeder, at the address they were given).
    #[error("group {group} is a queue group: its instances start and stop with the herd (suspend, resume or restart it instead)")]
    QueueGroup {
        /// The group.
        group: String,
    },
    /// An instance asked to start did not run.
    #[error("{instance} did not start: {why}")]
    NotStarted {
        /// The instance (`web:2`).
        instance: String,
        /// How it ended, or that it did not run in time.
        why: String,
    },
    /// Instances asked to stop had not ended in time.
    #[error("{target}: not every instance stopped within {}", humantime::format_duration(*.limit))]
    NotStopped {
        /// The group or instance.
        target: Target,
        /// How long they were given.
        limit: Duration,
    },
    /// The herd is stopping: it takes no more changes.
    #[error("the herd is stopping")]
    Stopping,
    /// The herd has ended (or ended before it could answer).
    #[error("the herd is ending")]
    Ending,
    /// The herd stopped while a change was under way.
    #[error("the herd stopped before the change was complete")]
    StoppedMidway,
    /// A suspend or resume that did not settle within its time.
    #[error("group {group}: not every instance {} in time", if *.suspend { "suspended" } else { "resumed" })]
    NotSettled {
        /// The group.
        group: String,
        /// A suspend (else a resume).
        suspend: bool,
    },
    /// An instance of a rolling restart did not run again in time.
    #[error(
        "group {group}: instance {id} did not run again within {}; rolling restart stopped",
        humantime::format_duration(*.limit)
    )]
    RestartStalled {
        /// The group.
        group: String,
        /// The instance (its id within the group).
        id: u32,
        /// How long it was given.
        limit: Duration,
    },
    /// The config file cannot be read or is invalid: nothing changed.
    #[error("reload refused, the herd is unchanged:\n{0}")]
    ConfigRefused(LoadError),
    /// The reloaded config cannot be prepared (a feeder's port, the
    /// per-run secret): nothing changed.
    #[error("reload refused, the herd is unchanged: {}", error_chain(.0))]
    Unprepared(super::queue::QueuePrepareError),
    /// A reload that resizes groups while another change is under way.
    #[error(
        "reload refused, the herd is unchanged: a rolling restart or reload is under way; \
         reload again once it is done (to resize {})",
        .resized.join(", ")
    )]
    ChangeUnderWay {
        /// The groups it would resize.
        resized: Vec<String>,
    },
    /// A new instance of a reloaded group did not run: the replacement
    /// stopped there.
    #[error(
        "reload: group {group}: a new instance did not run ({why}); replacement stopped, {kept} old instances kept"
    )]
    ReplacementFailed {
        /// The group.
        group: String,
        /// How the new instance ended, or that it did not run in time.
        why: String,
        /// Old instances still running.
        kept: usize,
    },
    /// A control socket frame that is not a request.
    #[error("not a request: {frame}")]
    NotARequest {
        /// The frame, as debug text.
        frame: String,
    },
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A [`Herd`](super::Herd) handle waiting (`suspend_and_wait`, ...).
    Handle(oneshot::Sender<Result<Answer, HerdError>>),
    /// An operator's control socket connection.
    Control(mpsc::Sender<FromMaster>),
}

impl Reply {
    /// Sends the answer (an operator who left is fine).
    pub(crate) fn send(self, answer: Result<Answer, HerdError>) {
        match self {
            Reply::Handle(reply) => {
                let _ = reply.send(answer);
            }
            // The first frame on a fresh reply channel always has room.
            Reply::Control(reply) => {
                let _ = reply.try_send(frame_of(answer));
            }
        }
    }
}

/// The control socket frame of an answer.
pub(crate) fn frame_of(answer: Result<Answer, HerdError>) -> FromMaster {
    match answer {
        Ok(Answer::Status(status)) => FromMaster::Status(status),
        Ok(Answer::Done(message)) => FromMaster::Done { message },
        Err(err) => FromMaster::Error {
            message: err.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_operators_read() {
        let said = |err: HerdError| err.to_string();
        assert_eq!(
            said(HerdError::UnknownGroup {
                group: "nope".into()
            }),
            "no group named \"nope\""
        );
        assert_eq!(
            said(HerdError::NotSettled {
                group: "web".into(),
                suspend: false
            }),
            "group web: not every instance resumed in time"
        );
        assert_eq!(
            said(HerdError::RestartStalled {
                group: "web".into(),
                id: 3,
                limit: Duration::from_secs(60)
            }),
            "group web: instance 3 did not run again within 1m; rolling restart stopped"
        );
        assert_eq!(
            said(HerdError::ChangeUnderWay {
                resized: vec!["a".into(), "b".into()]
            }),
            "reload refused, the herd is unchanged: a rolling restart or reload is under way; \
             reload again once it is done (to resize a, b)"
        );
        assert_eq!(
            said(HerdError::ReplacementFailed {
                group: "batch".into(),
                why: "exited with code 127".into(),
                kept: 2
            }),
            "reload: group batch: a new instance did not run (exited with code 127); \
             replacement stopped, 2 old instances kept"
        );
        let invalid = crate::config::Config::load("/nonexistent/herd.toml".as_ref())
            .expect_err("no such file");
        assert_eq!(
            said(HerdError::ConfigRefused(invalid)),
            "reload refused, the herd is unchanged:\ncannot read config /nonexistent/herd.toml"
        );
    }

    #[test]
    fn control_frames_become_requests_and_answers_frames() {
        let asked = Request::from_wire(ToMaster::Suspend {
            group: "web".into(),
        });
        assert!(matches!(
            asked,
            Ok(Asked::Herd(Request::Suspend { group })) if group == "web"
        ));
        let asked = Request::from_wire(ToMaster::Stop { kill: true });
        assert!(matches!(
            asked,
            Ok(Asked::Herd(Request::Stop { kill: true, reason }))
                if reason == "kill requested over the control socket"
        ));
        assert!(matches!(
            Request::from_wire(ToMaster::Hello { version: 1 }),
            Err(HerdError::NotARequest { .. })
        ));
        assert_eq!(
            frame_of(Err(HerdError::Stopping)),
            FromMaster::Error {
                message: "the herd is stopping".into()
            }
        );
        assert_eq!(
            frame_of(Ok(Answer::Done("ok".into()))),
            FromMaster::Done {
                message: "ok".into()
            }
        );
    }
}
