//! The operator's side: finding a master, [`ControlClient`], and the
//! `status` table.

use super::paths::{
    candidate_dirs, canonical_config, check_runtime_dir, lock_is_held, read_lock, socket_stem,
    LockInfo,
};
use super::{ControlError, HANDSHAKE_TIMEOUT};
use crate::error_text::error_chain;
use crate::protocol::control::{FromMaster, GroupStatus, HerdStatus, InstanceStatus, ToMaster};
use crate::protocol::{Connection, ProtocolError, PROTOCOL_VERSION};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// An operator's connection to a running master, past the handshake.
///
/// One request per connection: [`ControlClient::request`], then
/// [`ControlClient::next_reply`] until it gives `None`, or a `Done` or
/// `Error` frame.
#[derive(Debug)]
pub struct ControlClient {
    /// The link, past the hello.
    conn: Connection<UnixStream>,
    /// The socket, for error messages.
    socket: PathBuf,
    /// The master's pid, from its hello.
    pid: u32,
    /// The master's config, from its hello.
    config: String,
    /// Whether the one request is sent.
    sent: bool,
}

/// Connects to a running master and does the handshake.
///
/// With `config`, to the master of that config; without, to the only live
/// master of this user (the only socket of the runtime directory whose lock
/// is held).
///
/// # Errors
/// [`ControlError::NoMaster`] when none runs (of `config`, or at all),
/// [`ControlError::SeveralMasters`] without `config` when several run,
/// [`ControlError::Config`] if `config` cannot be resolved, and
/// [`ControlError::Connect`], [`ControlError::Protocol`],
/// [`ControlError::Refused`], [`ControlError::Timeout`],
/// [`ControlError::Closed`] or [`ControlError::Unexpected`] for a failed
/// handshake.
pub async fn connect(config: Option<&Path>) -> Result<ControlClient, ControlError> {
    let socket = find_master(&candidate_dirs(), config)?;
    ControlClient::handshake(socket).await
}

/// [`connect`], looking in `dir` only (see
/// [`ControlSocket::bind_in`](super::ControlSocket::bind_in)).
///
/// # Errors
/// As [`connect`].
pub async fn connect_in(dir: &Path, config: Option<&Path>) -> Result<ControlClient, ControlError> {
    let socket = find_master(&[dir.to_owned()], config)?;
    ControlClient::handshake(socket).await
}

/// The socket of the master of `config`, or of the only live master, in
/// the first of `dirs` that has one. Directories that are missing or not
/// safe are skipped.
fn find_master(dirs: &[PathBuf], config: Option<&Path>) -> Result<PathBuf, ControlError> {
    let usable = dirs.iter().filter(|dir| match check_runtime_dir(dir) {
        Ok(()) => true,
        Err(ControlError::RuntimeDir { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            false
        }
        Err(err) => {
            tracing::warn!(cause = %error_chain(&err), "skipping a runtime directory");
            false
        }
    });
    if let Some(config) = config {
        let canonical = canonical_config(config)?;
        let stem = socket_stem(&canonical);
        for dir in usable {
            if lock_is_held(&dir.join(format!("{stem}.lock"))) {
                return Ok(dir.join(format!("{stem}.sock")));
            }
        }
        return Err(ControlError::NoMaster {
            config: Some(canonical),
        });
    }
    // Every live master of every usable directory, without duplicates.
    let mut live: Vec<(PathBuf, LockInfo)> = Vec::new();
    for dir in usable {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut locks: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "lock"))
            .collect();
        locks.sort();
        for lock in locks {
            if lock_is_held(&lock) {
                let info = read_lock(&lock);
                live.push((lock.with_extension("sock"), info));
            }
        }
    }
    match live.len() {
        0 => Err(ControlError::NoMaster { config: None }),
        1 => Ok(live.remove(0).0),
        _ => Err(ControlError::SeveralMasters {
            configs: live
                .into_iter()
                .map(|(socket, info)| info.config.unwrap_or(socket))
                .collect(),
        }),
    }
}

impl ControlClient {
    async fn handshake(socket: PathBuf) -> Result<ControlClient, ControlError> {
        let stream =
            UnixStream::connect(&socket)
                .await
                .map_err(|source| ControlError::Connect {
                    path: socket.clone(),
                    source,
                })?;
        let mut conn = Connection::new(stream);
        let link_err = |source| ControlError::Protocol {
            path: socket.clone(),
            source,
        };
        let hello = async {
            conn.write_frame(&ToMaster::Hello {
                version: PROTOCOL_VERSION,
            })
            .await
            .map_err(link_err)?;
            conn.read_frame::<FromMaster>().await.map_err(link_err)
        };
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, hello)
            .await
            .map_err(|_| ControlError::Timeout {
                path: socket.clone(),
            })??;
        match answer {
            Some(FromMaster::Hello {
                version,
                pid,
                config,
            }) => {
                if version != PROTOCOL_VERSION {
                    return Err(link_err(ProtocolError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }));
                }
                Ok(ControlClient {
                    conn,
                    socket,
                    pid,
                    config,
                    sent: false,
                })
            }
            Some(FromMaster::Error { message }) => Err(ControlError::Refused { message }),
            Some(frame) => Err(ControlError::Unexpected {
                path: socket,
                frame: format!("{frame:?}"),
            }),
            None => Err(ControlError::Closed { path: socket }),
        }
    }

    /// The master's pid.
    pub fn master_pid(&self) -> u32 {
        self.pid
    }

    /// The config the master runs (canonical path).
    pub fn config(&self) -> &str {
        &self.config
    }

    /// The socket connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends the connection's one request.
    ///
    /// # Errors
    /// [`ControlError::RequestAlreadySent`] on a second call,
    /// [`ControlError::Protocol`] if the link fails.
    ///
    /// # Cancel safety
    /// Not cancel safe: drop the client if this is cancelled.
    pub async fn request(&mut self, request: ToMaster) -> Result<(), ControlError> {
        if self.sent {
            return Err(ControlError::RequestAlreadySent);
        }
        self.sent = true;
        self.conn
            .write_frame(&request)
            .await
            .map_err(|source| ControlError::Protocol {
                path: self.socket.clone(),
                source,
            })
    }

    /// The master's next frame; `None` once it has closed the connection
    /// (it answered everything, or it exited).
    ///
    /// # Errors
    /// [`ControlError::Protocol`] if the link fails or carries garbage.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next_reply(&mut self) -> Result<Option<FromMaster>, ControlError> {
        self.conn
            .read_frame()
            .await
            .map_err(|source| ControlError::Protocol {
                path: self.socket.clone(),
                source,
            })
    }
}

/// `status` as a table for a terminal: a header line, one row per
/// instance (group, id/group_id, host, pid, state, uptime, restarts, last
/// exit, liveness), then a line per suspended group and per queue group.
pub fn format_status(status: &HerdStatus) -> String {
    let mut out = format!(
        "{}: master pid {}, up {}\n",
        status.config,
        status.pid,
        format_ms(status.uptime_ms)
    );
    let header = [
        "GROUP",
        "ID",
        "HOST",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "LIVENESS",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for group in &status.groups {
        for instance in &group.instances {
            rows.push(instance_row(group, instance));
        }
    }
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = width - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for group in &status.groups {
        if group.suspended {
            out.push_str(&format!("{}: suspended\n", group.name));
        }
        if let Some(queue) = &group.queue {
            out.push_str(&format!(
                "{}: queue {} pending, {} in flight, {} done, {} retried, {} dead; {} consumer{}, {:.1} jobs/s{}\n",
                group.name,
                queue.pending,
                queue.in_flight,
                queue.done,
                queue.retried,
                queue.dead,
                queue.consumers,
                if queue.consumers == 1 { "" } else { "s" },
                queue.rate,
                if queue.empty { " (source empty)" } else { "" },
            ));
        }
    }
    out
}

fn instance_row(group: &GroupStatus, instance: &InstanceStatus) -> Vec<String> {
    let dash = || "-".to_string();
    vec![
        group.name.clone(),
        format!("{}/{}", instance.id, instance.group_id),
        instance.host.clone(),
        instance.pid.map(|pid| pid.to_string()).unwrap_or_else(dash),
        instance.state.to_string(),
        instance.uptime_ms.map(format_ms).unwrap_or_else(dash),
        instance.restarts.to_string(),
        instance.last_exit.clone().unwrap_or_else(dash),
        liveness(instance),
    ]
}

/// The last sign of life, and the health check's verdict.
fn liveness(instance: &InstanceStatus) -> String {
    let seen = instance.seen_ms_ago.map(|ms| {
        if ms < 1000 {
            "seen just now".to_string()
        } else {
            format!("seen {} ago", format_ms(ms))
        }
    });
    match (seen, &instance.health) {
        (Some(seen), Some(health)) => format!("{seen}, {health}"),
        (Some(seen), None) => seen,
        (None, Some(health)) => health.clone(),
        (None, None) => "-".to_string(),
    }
}

/// Milliseconds as `1h 2m 5s` (whole seconds).
fn format_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{second_config, serve_with, setup, WAIT};
    use super::super::ControlSocket;
    use super::*;
    use crate::protocol::control::InstanceState;
    use crate::protocol::slave::{Level, QueueProgress};

    fn sample_status() -> HerdStatus {
        HerdStatus {
            config: "/etc/taskherd/herd.toml".into(),
            pid: 4242,
            uptime_ms: 3_725_000,
            groups: vec![
                GroupStatus {
                    name: "workers".into(),
                    suspended: false,
                    instances: vec![
                        InstanceStatus {
                            id: 1,
                            group_id: 1,
                            host: "localhost".into(),
                            command: "worker".into(),
                            state: InstanceState::Running,
                            pid: Some(4250),
                            uptime_ms: Some(3_724_000),
                            restarts: 0,
                            last_exit: None,
                            seen_ms_ago: Some(2_300),
                            health: Some("healthy".into()),
                        },
                        InstanceStatus {
                            id: 2,
                            group_id: 2,
                            host: "web1".into(),
                            command: "worker".into(),
                            state: InstanceState::Backoff,
                            pid: None,
                            uptime_ms: None,
                            restarts: 3,
                            last_exit: Some("exited with code 3".into()),
                            seen_ms_ago: None,
                            health: None,
                        },
                    ],
                    queue: None,
                },
                GroupStatus {
                    name: "jobs".into(),
                    suspended: true,
                    instances: vec![],
                    queue: Some(QueueProgress {
                        done: 140,
                        pending: 12,
                        in_flight: 3,
                        consumers: 4,
                        rate: 35.25,
                        ..Default::default()
                    }),
                },
            ],
        }
    }

    #[tokio::test]
    async fn handshake_request_and_replies() {
        let setup = setup();
        let socket = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        let (stop, server) = serve_with(socket, |request| match request {
            ToMaster::Status => vec![FromMaster::Status(sample_status())],
            ToMaster::Suspend { group } => vec![
                FromMaster::Log {
                    line: format!("suspending {group}"),
                    level: Level::Notice,
                },
                FromMaster::Done {
                    message: format!("{group} suspended"),
                },
            ],
            _ => vec![FromMaster::Error {
                message: "no".into(),
            }],
        });
        let mut client = connect_in(&setup.dir, Some(&setup.config)).await.unwrap();
        assert_eq!(client.master_pid(), std::process::id());
        let canonical = fs::canonicalize(&setup.config).unwrap();
        assert_eq!(client.config(), canonical.display().to_string());
        client.request(ToMaster::Status).await.unwrap();
        assert_eq!(
            client.next_reply().await.unwrap(),
            Some(FromMaster::Status(sample_status()))
        );
        assert_eq!(client.next_reply().await.unwrap(), None);
        let again = client.request(ToMaster::Status).await.unwrap_err();
        assert!(matches!(again, ControlError::RequestAlreadySent), "{again}");

        let mut client = connect_in(&setup.dir, None).await.unwrap();
        client
            .request(ToMaster::Suspend { group: "w".into() })
            .await
            .unwrap();
        let mut frames = Vec::new();
        while let Some(frame) = client.next_reply().await.unwrap() {
            frames.push(frame);
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[1],
            FromMaster::Done {
                message: "w suspended".into()
            }
        );

        let path = client.socket().to_owned();
        stop.cancel();
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
        assert!(!path.exists() && !path.with_extension("lock").exists());
        let err = connect_in(&setup.dir, Some(&setup.config))
            .await
            .unwrap_err();
        assert!(err.is_no_master(), "{err}");
    }

    #[tokio::test]
    async fn connect_without_config_picks_the_only_live_master() {
        let setup = setup();
        let err = connect_in(&setup.dir, None).await.unwrap_err();
        assert!(err.is_no_master(), "{err}");
        assert_eq!(err.to_string(), "no master is running");

        let first = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        // A dead master's lock file (not held) is not a master.
        fs::write(setup.dir.join("dead-000000000000.lock"), "1\n/dead.toml\n").unwrap();
        let (_stop, _server) = serve_with(first, |_| vec![]);
        let client = connect_in(&setup.dir, None).await.unwrap();
        assert_eq!(
            client.config(),
            fs::canonicalize(&setup.config)
                .unwrap()
                .display()
                .to_string()
        );

        let other = second_config(&setup, "other.toml");
        let _second = ControlSocket::bind_in(&setup.dir, &other).unwrap();
        let err = connect_in(&setup.dir, None).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ControlError::SeveralMasters { .. }), "{text}");
        assert!(
            text.contains("herd.toml") && text.contains("other.toml"),
            "{text}"
        );
        assert!(text.contains("-c FILE"), "{text}");

        // With a config, the right one; a config with no master is named.
        connect_in(&setup.dir, Some(&setup.config)).await.unwrap();
        let third = second_config(&setup, "third.toml");
        let err = connect_in(&setup.dir, Some(&third)).await.unwrap_err();
        assert!(err.is_no_master(), "{err}");
        assert!(err.to_string().contains("third.toml"), "{err}");
    }

    #[test]
    fn status_table() {
        let text = format_status(&sample_status());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "/etc/taskherd/herd.toml: master pid 4242, up 1h 2m 5s"
        );
        assert!(
            lines[1].starts_with("GROUP    ID   HOST       PID   STATE"),
            "{text}"
        );
        assert!(
            lines[2].contains("running") && lines[2].ends_with("seen 2s ago, healthy"),
            "{text}"
        );
        assert!(lines[3].contains("exited with code 3"), "{text}");
        assert_eq!(lines[4], "jobs: suspended");
        assert_eq!(
            lines[5],
            "jobs: queue 12 pending, 3 in flight, 140 done, 0 retried, 0 dead; 4 consumers, 35.2 jobs/s"
        );
    }
}
