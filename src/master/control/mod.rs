//! The master's control socket, and the client of the operator's commands
//! (`taskherd status`, `stop`, `suspend`, `resume`, `restart`, `reload`,
//! `logs`).
//!
//! # Where
//!
//! A running master listens on a unix socket in a runtime directory
//! ([`runtime_dir`]): `$XDG_RUNTIME_DIR/taskherd/` when that variable is
//! set, else `/run/taskherd/` for root (when `/run` is writable), else
//! `/tmp/taskherd-<uid>/`. The directory is created mode 0700 and refused
//! when it belongs to someone else or others may write to it. The socket is
//! named after the config, `<file stem>-<12 hex of the sha256 of the
//! canonical config path>.sock`, mode 0600: one master per config, and a
//! command finds the master of a config from the config alone.
//!
//! # One master per config
//!
//! Next to the socket, `<same name>.lock` holds the master's pid and config
//! path, and the master holds an exclusive `flock` on it for its whole life.
//! A second master on the same config is refused with "another master
//! (pid N) already runs CONFIG", also when it would choose another runtime
//! directory (a master under systemd, without `XDG_RUNTIME_DIR`, and one
//! from a login shell): once its own lock is taken, a master checks the
//! same lock in the other directories a command searches. The lock is tied to the process, not to a
//! pid written in a file: when a master crashes the kernel releases its lock,
//! and the next master removes the stale socket and takes over. The lock and
//! socket fds are close-on-exec, so no instance ever inherits the lock.
//!
//! # The link
//!
//! Frames of [`crate::protocol::control`] over the one codec. The client
//! sends [`ToMaster::Hello`], the server answers [`FromMaster::Hello`] (or
//! [`FromMaster::Error`] on a version mismatch), the client sends one
//! request, and the server relays every frame the master answers until the
//! master drops the reply channel or the client hangs up. The server does
//! the handshake itself; the master only sees [`ControlRequest`]s.

mod client;
mod logs;
mod paths;
mod server;

pub use client::{connect, connect_in, format_status, ControlClient};
pub(crate) use logs::{stream_logs, LogsRequest};
pub use paths::{runtime_dir, socket_path, RUNTIME_DIR_NAME};
pub use server::ControlSocket;

use crate::protocol::control::{FromMaster, ToMaster};
use crate::protocol::ProtocolError;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Capacity of each request's reply channel: frames the master may queue
/// before a slow client makes its sends wait.
pub const REPLY_CAPACITY: usize = 64;

/// How long a client may take to send its hello, and then its request, and
/// how long a command waits for the master's hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the control socket and of the operator's client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The config file cannot be resolved to a canonical path.
    #[error("cannot resolve the config path {}", path.display())]
    Config {
        /// The path as given.
        path: PathBuf,
        /// Why `canonicalize` failed.
        #[source]
        source: io::Error,
    },
    /// The runtime directory cannot be created or inspected.
    #[error("cannot use the runtime directory {}", path.display())]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The runtime directory is not safe: someone else could replace the
    /// socket.
    #[error("refusing the runtime directory {}: {reason}", path.display())]
    InsecureRuntimeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The lock file cannot be opened, locked or written.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A live master already holds the lock of this config.
    #[error("another master ({}) already runs {}", pid_text(*pid), config.display())]
    AlreadyRunning {
        /// Its pid, from the lock file (unknown if it has not written it).
        pid: Option<u32>,
        /// The config.
        config: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The socket cannot be bound.
    #[error("cannot bind the control socket {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// No live master (of this config, or at all).
    #[error("no master is running{}", for_config(config.as_deref()))]
    NoMaster {
        /// The config asked for, if any.
        config: Option<PathBuf>,
    },
    /// Several masters run and no config says which one is meant.
    #[error(
        "several masters are running ({}): choose one with -c FILE",
        list_paths(configs)
    )]
    SeveralMasters {
        /// Their configs (or sockets, for a master that did not say).
        configs: Vec<PathBuf>,
    },
    /// The socket exists but connecting to it failed.
    #[error("cannot connect to the master at {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The link broke or carried something unreadable.
    #[error("control link {} failed", path.display())]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ProtocolError,
    },
    /// The master answered the hello with an error (a version mismatch).
    #[error("the master refused the connection: {message}")]
    Refused {
        /// The master's reason.
        message: String,
    },
    /// The master closed the connection during the handshake.
    #[error("the master at {} closed the connection", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The master did not answer the hello in time.
    #[error("the master at {} did not answer within {}s", path.display(), HANDSHAKE_TIMEOUT.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// The master's first frame was not a hello.
    #[error("unexpected answer from the master at {}: {frame}", path.display())]
    Unexpected {
        /// The socket.
        path: PathBuf,
        /// The frame, as debug text.
        frame: String,
    },
    /// A second request on one connection (each carries one).
    #[error("a request was already sent on this connection")]
    RequestAlreadySent,
}

impl ControlError {
    /// Whether this says that no master runs (the command's exit code 2).
    pub fn is_no_master(&self) -> bool {
        matches!(self, ControlError::NoMaster { .. })
    }
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_string(),
    }
}

fn for_config(config: Option<&Path>) -> String {
    match config {
        Some(config) => format!(" for {}", config.display()),
        None => String::new(),
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// One operator request, handed to the master by [`ControlSocket::serve`].
///
/// The master answers with frames on `reply`: [`FromMaster::Status`], or
/// [`FromMaster::Done`] / [`FromMaster::Error`], or a stream of
/// [`FromMaster::Log`]. Dropping `reply` ends the client's connection;
/// once the client hangs up, sends on `reply` fail, which is how a `logs`
/// stream learns to stop. The master streams logs from a task of its own,
/// fed by the backlog and a live receiver of
/// [`LogSink::follow`](crate::log::LogSink::follow): a client that
/// reads slowly makes that task wait, and the receiver lag (losing the
/// oldest records, counted), never the herd.
#[derive(Debug)]
pub struct ControlRequest {
    /// What the operator asks (never [`ToMaster::Hello`]).
    pub request: ToMaster,
    /// Where the answer goes (capacity [`REPLY_CAPACITY`]).
    pub reply: mpsc::Sender<FromMaster>,
}

#[cfg(test)]
mod test_support {
    use super::*;
    use std::fs;
    use tokio_util::sync::CancellationToken;

    pub(super) const WAIT: Duration = Duration::from_secs(10);

    /// A runtime dir and a config file in a temp dir.
    pub(super) struct Setup {
        _tmp: tempfile::TempDir,
        pub(super) dir: PathBuf,
        pub(super) config: PathBuf,
    }

    pub(super) fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let config = tmp.path().join("herd.toml");
        fs::write(&config, "").unwrap();
        Setup {
            dir,
            config,
            _tmp: tmp,
        }
    }

    pub(super) fn second_config(setup: &Setup, name: &str) -> PathBuf {
        let path = setup.config.with_file_name(name);
        fs::write(&path, "").unwrap();
        path
    }

    /// Serves `socket` with a fake master answering every request with
    /// `answer`; returns the stop token and the server task.
    pub(super) fn serve_with(
        socket: ControlSocket,
        answer: fn(ToMaster) -> Vec<FromMaster>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let (requests_tx, mut requests_rx) = mpsc::channel::<ControlRequest>(4);
        let stop = CancellationToken::new();
        let server = tokio::spawn(socket.serve(requests_tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(ControlRequest { request, reply }) = requests_rx.recv().await {
                for frame in answer(request) {
                    let _ = reply.send(frame).await;
                }
            }
        });
        (stop, server)
    }
}
