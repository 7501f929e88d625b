//! Errors of the slave library.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::protocol::slave::CONTROL_FD_ENV;
use crate::protocol::ProtocolError;

/// Why a [`Handler`](super::Handler) could not be made or could not do
/// what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlaveError {
    /// The control fd variable is missing: the program was started by hand,
    /// not by a taskherd master.
    #[error(
        "not started by taskherd: {var} is not set; this program is a taskherd slave, \
         run it from a taskherd config with `taskherd run herd.toml`",
        var = CONTROL_FD_ENV
    )]
    NotStarted,
    /// The control fd variable does not hold a usable fd number.
    #[error(
        "{var} must be a file descriptor number above 2, got {value:?}",
        var = CONTROL_FD_ENV
    )]
    InvalidFdVar {
        /// The value found in the environment.
        value: String,
    },
    /// The fd named by the control fd variable is not open.
    #[error("control fd {fd} (from {var}) is not usable", var = CONTROL_FD_ENV)]
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The fd named by the control fd variable is open but is not a socket,
    /// so it cannot be the master's control channel.
    #[error("control fd {fd} (from {var}) is not a socket", var = CONTROL_FD_ENV)]
    NotASocket {
        /// The fd number.
        fd: RawFd,
    },
    /// [`Handler::from_env`](super::Handler::from_env) was already called
    /// in this process: the control channel has one owner.
    #[error("the control channel is already owned by another handler in this process")]
    AlreadyTaken,
    /// The background runtime of the handler could not start.
    #[error("cannot start the slave runtime")]
    Runtime(#[source] std::io::Error),
    /// The master sent no identity in time.
    #[error("no identity from the master within {waited:?}")]
    IdentityTimeout {
        /// How long we waited.
        waited: Duration,
    },
    /// The master closed the control channel before sending the identity.
    #[error("the master closed the control channel before sending the identity")]
    ClosedBeforeIdentity,
    /// The handshake failed on the wire (i/o error, undecodable frame).
    #[error("handshake with the master failed")]
    Handshake(#[source] ProtocolError),
    /// The first frame from the master was not the identity.
    #[error("expected the identity as first frame from the master, got {got}")]
    UnexpectedFirstFrame {
        /// The frame received, for the log.
        got: String,
    },
    /// The master speaks another protocol version.
    #[error("protocol version mismatch: this slave speaks {ours}, the master speaks {theirs}")]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`](crate::protocol::PROTOCOL_VERSION).
        ours: u32,
        /// The version the master announced.
        theirs: u32,
    },
    /// The group params do not have the shape the program expects.
    ///
    /// The message says why (serde's reason, such as ``missing field
    /// `message` ``): programs print it with `{err}` and nothing else, so
    /// the reason is part of it rather than a `source()` a plain print
    /// would drop.
    #[error("params of group {group:?} do not match the expected type: {cause}")]
    Params {
        /// The group name, to find the config entry.
        group: String,
        /// What serde refused, and why.
        cause: serde_json::Error,
    },
    /// A global tracing subscriber is already installed.
    #[error("cannot install the tracing subscriber")]
    Tracing(#[source] tracing::subscriber::SetGlobalDefaultError),
}
