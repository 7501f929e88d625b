//! The master's side: [`ControlSocket`] and one task per operator
//! connection.

use super::paths::{
    candidate_dirs, canonical_config, effective_uid, ensure_runtime_dir, lock_master,
    refuse_other_masters, runtime_dir, socket_stem, SocketFiles,
};
use super::{ControlError, ControlRequest, HANDSHAKE_TIMEOUT, REPLY_CAPACITY};
use crate::error_text::error_chain;
use crate::protocol::control::{FromMaster, ToMaster};
use crate::protocol::{self, Connection, ProtocolError, PROTOCOL_VERSION};
use futures::SinkExt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;

/// How long, once the master stops serving, a reply frame may take to
/// reach a client that does not read.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (out of fds, say), so that it does not
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The master's control socket: bound, with the config's lock held.
///
/// Bind it before starting anything (it refuses a second master on the
/// same config), then serve it for the master's life:
///
/// ```no_run
/// # async fn demo() -> Result<(), taskherd::master::control::ControlError> {
/// use taskherd::master::control::{ControlRequest, ControlSocket};
/// use taskherd::protocol::control::{FromMaster, ToMaster};
/// use tokio::sync::mpsc;
/// use tokio_util::sync::CancellationToken;
///
/// let socket = ControlSocket::bind(std::path::Path::new("herd.toml"))?;
/// let (requests_tx, mut requests_rx) = mpsc::channel::<ControlRequest>(16);
/// let stop_serving = CancellationToken::new();
/// let server = tokio::spawn(socket.serve(requests_tx, stop_serving.clone()));
///
/// // In the run loop (a `select!` branch):
/// if let Some(ControlRequest { request, reply }) = requests_rx.recv().await {
///     let answer = match request {
///         ToMaster::Status => FromMaster::Status(Default::default()),
///         _ => FromMaster::Error { message: "not supported".into() },
///     };
///     // A failed send means the operator hung up.
///     let _ = reply.send(answer).await;
///     // Dropping `reply` ends the operator's connection.
/// }
///
/// // When the master exits: stop accepting (the files go away), drop the
/// // receiver and every reply sender, and let open connections write their
/// // last frames (the `Done` of a `stop`).
/// stop_serving.cancel();
/// drop(requests_rx);
/// let _ = server.await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ControlSocket {
    /// Bound and listening; turned into a tokio listener by `serve`, so
    /// that `bind` needs no runtime.
    listener: std::os::unix::net::UnixListener,
    /// Removed when the socket is dropped or stops serving.
    files: SocketFiles,
    /// The canonical config path, for the hello.
    config: PathBuf,
}

impl ControlSocket {
    /// Takes the lock of `config_path` and binds its socket in
    /// [`runtime_dir`] (created if needed).
    ///
    /// A master of the same config is refused wherever it put its socket:
    /// the other directories a master of this user may use (`/run/taskherd`
    /// for root, `/tmp/taskherd-<uid>`) are checked too, once our lock is
    /// taken, so that a master started by systemd (no `XDG_RUNTIME_DIR`)
    /// and one started from a login shell never both run.
    ///
    /// # Errors
    /// [`ControlError::AlreadyRunning`] if a live master runs this config;
    /// [`ControlError::Config`], [`ControlError::RuntimeDir`],
    /// [`ControlError::InsecureRuntimeDir`], [`ControlError::Lock`] or
    /// [`ControlError::Bind`] otherwise.
    pub fn bind(config_path: &Path) -> Result<ControlSocket, ControlError> {
        ControlSocket::bind_among(&runtime_dir(), &candidate_dirs(), config_path)
    }

    /// [`ControlSocket::bind`] with the socket in `dir` instead of
    /// [`runtime_dir`] (tests, or a master told where to put it); only
    /// `dir` is checked for another master.
    ///
    /// # Errors
    /// As [`ControlSocket::bind`].
    pub fn bind_in(dir: &Path, config_path: &Path) -> Result<ControlSocket, ControlError> {
        ControlSocket::bind_among(dir, &[], config_path)
    }

    /// Binds in `dir`, refusing if a master of the config holds its lock
    /// in `dir` or in one of `other_dirs`.
    pub(super) fn bind_among(
        dir: &Path,
        other_dirs: &[PathBuf],
        config_path: &Path,
    ) -> Result<ControlSocket, ControlError> {
        let config = canonical_config(config_path)?;
        ensure_runtime_dir(dir)?;
        let stem = socket_stem(&config);
        let socket = dir.join(format!("{stem}.sock"));
        let lock = dir.join(format!("{stem}.lock"));
        let lock_file = lock_master(&lock, &config)?;
        if let Err(err) = refuse_other_masters(other_dirs, &stem, &lock_file, &config) {
            // Unlinked before the lock is released (see `lock_master`).
            let _ = fs::remove_file(&lock);
            return Err(err);
        }
        let files = SocketFiles {
            socket,
            lock,
            _lock_file: lock_file,
        };
        let bind_err = |source| ControlError::Bind {
            path: files.socket.clone(),
            source,
        };
        // We hold the lock: a socket file left there is a crashed master's.
        match fs::remove_file(&files.socket) {
            Ok(()) => tracing::info!(
                path = %files.socket.display(),
                "removed the stale socket of a master that died"
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(bind_err(err)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&files.socket).map_err(bind_err)?;
        fs::set_permissions(&files.socket, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ControlSocket {
            listener,
            files,
            config,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.files.socket
    }

    /// Accepts operator connections until `stop` is cancelled, one task
    /// each: the task does the handshake, reads one request, hands it to
    /// the master on `requests`, and writes every reply frame to the
    /// client until the reply channel closes or the client hangs up.
    ///
    /// When `stop` is cancelled it stops accepting, removes the socket and
    /// lock files (releasing the lock), cuts connections that have not
    /// made their request yet, and returns once every connection has ended:
    /// a connection whose request the master holds ends when the master
    /// drops its reply sender (and its client has read the last frames, or
    /// failed to for 5 s).
    ///
    /// A connection that breaks the protocol is closed with a warning; it
    /// never affects the others or the master.
    ///
    /// # Cancel safety
    /// Dropping the future stops accepting and removes the files; accepted
    /// connections are aborted with it.
    pub async fn serve(self, requests: mpsc::Sender<ControlRequest>, stop: CancellationToken) {
        let ControlSocket {
            listener,
            files,
            config,
        } = self;
        let listener = match UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(
                    path = %files.socket.display(), cause = %err,
                    "cannot serve the control socket"
                );
                return;
            }
        };
        let config = config.display().to_string();
        // Dropping the set (this future) aborts the connections.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                Some(ended) = connections.join_next(), if !connections.is_empty() => {
                    log_connection_end(ended);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(
                            stream,
                            requests.clone(),
                            config.clone(),
                            stop.clone(),
                        ));
                    }
                    Err(err) => {
                        tracing::warn!(cause = %err, "cannot accept an operator connection");
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        drop(files);
        drop(requests);
        while let Some(ended) = connections.join_next().await {
            log_connection_end(ended);
        }
    }
}

/// A connection task that panicked is a bug: say so, and go on.
fn log_connection_end(ended: Result<(), tokio::task::JoinError>) {
    if let Err(err) = ended {
        if err.is_panic() {
            tracing::error!(cause = %err, "an operator connection task panicked");
        }
    }
}

/// What waiting for a client's frame gave.
enum Incoming {
    Frame(ToMaster),
    /// The client hung up.
    Closed,
    /// The master stops serving.
    Stopped,
    /// Nothing came in time.
    TimedOut,
    /// A broken or malformed frame.
    Failed(ProtocolError),
}

async fn read_request(conn: &mut Connection<UnixStream>, stop: &CancellationToken) -> Incoming {
    tokio::select! {
        () = stop.cancelled() => Incoming::Stopped,
        read = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.read_frame::<ToMaster>()) => match read {
            Err(_) => Incoming::TimedOut,
            Ok(Ok(Some(frame))) => Incoming::Frame(frame),
            Ok(Ok(None)) => Incoming::Closed,
            Ok(Err(err)) => Incoming::Failed(err),
        },
    }
}

/// Whether the peer runs as us or as root (the socket's mode already keeps
/// others out; this also covers a socket made reachable by mistake).
fn peer_allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == effective_uid() || cred.uid() == 0,
        Err(err) => {
            // Unknown is not allowed.
            tracing::warn!(cause = %err, "cannot read the operator's credentials");
            false
        }
    }
}

#[tracing::instrument(name = "operator", skip_all)]
async fn serve_connection(
    stream: UnixStream,
    requests: mpsc::Sender<ControlRequest>,
    config: String,
    stop: CancellationToken,
) {
    if !peer_allowed(&stream) {
        tracing::warn!("refused an operator connection from another user (or an unknown one)");
        return;
    }
    let mut conn = Connection::new(stream);
    let refuse = |message: String| FromMaster::Error { message };
    match read_request(&mut conn, &stop).await {
        Incoming::Frame(ToMaster::Hello { version }) if version == PROTOCOL_VERSION => {}
        Incoming::Frame(ToMaster::Hello { version }) => {
            let err = ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            };
            tracing::warn!(cause = %err, "refused an operator connection");
            let message = format!(
                "protocol version mismatch: the master speaks {PROTOCOL_VERSION}, this command {version} (use the same taskherd version)"
            );
            let _ = conn.write_frame(&refuse(message)).await;
            return;
        }
        other => {
            end_early(&mut conn, other, "hello").await;
            return;
        }
    }
    let hello = FromMaster::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        config,
    };
    if let Err(err) = conn.write_frame(&hello).await {
        tracing::debug!(cause = %error_chain(&err), "operator left during the handshake");
        return;
    }
    let request = match read_request(&mut conn, &stop).await {
        Incoming::Frame(ToMaster::Hello { .. }) => {
            tracing::warn!("operator sent a second hello; closing");
            let _ = conn
                .write_frame(&refuse("expected a request after the hello".into()))
                .await;
            return;
        }
        Incoming::Frame(request) => request,
        other => {
            end_early(&mut conn, other, "request").await;
            return;
        }
    };
    tracing::debug!(?request, "operator request");
    let (reply_tx, mut reply_rx) = mpsc::channel(REPLY_CAPACITY);
    let handed = ControlRequest {
        request,
        reply: reply_tx,
    };
    // The master may be too busy to take it at once; it never will once
    // it stops.
    let handed = tokio::select! {
        sent = requests.send(handed) => sent.is_ok(),
        () = stop.cancelled() => false,
    };
    if !handed {
        let _ = conn
            .write_frame(&refuse("the master is stopping".into()))
            .await;
        return;
    }
    drop(requests);
    // From now on the client only listens: watch its side for the hang-up
    // while relaying the master's frames on the other.
    let (mut read_half, write_half) = conn.into_inner().into_split();
    let mut writer = FramedWrite::new(write_half, protocol::codec());
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            reply = reply_rx.recv() => {
                let Some(frame) = reply else {
                    break;
                };
                let body = match protocol::encode(&frame) {
                    Ok(body) => body,
                    Err(err) => {
                        tracing::warn!(cause = %error_chain(&err), "cannot encode a reply");
                        match protocol::encode(&refuse(format!("cannot send the answer: {err}"))) {
                            Ok(body) => body,
                            Err(_) => break,
                        }
                    }
                };
                if !send_reply(&mut writer, body, &stop).await {
                    break;
                }
            }
            read = read_half.read(&mut probe) => {
                match read {
                    Ok(0) => tracing::debug!("operator hung up"),
                    Ok(_) => tracing::warn!("operator sent more than one request; closing"),
                    Err(err) => tracing::debug!(cause = %err, "operator link failed"),
                }
                break;
            }
        }
    }
    // Dropping `reply_rx` here makes the master's further sends fail.
}

/// Writes one reply frame; `false` if the client is gone. Once the master
/// stops serving, a client that does not read gets [`FINAL_WRITE_TIMEOUT`]
/// per frame, so that it cannot hold the master's exit.
async fn send_reply(
    writer: &mut FramedWrite<
        tokio::net::unix::OwnedWriteHalf,
        tokio_util::codec::LengthDelimitedCodec,
    >,
    body: bytes::Bytes,
    stop: &CancellationToken,
) -> bool {
    let write = writer.send(body);
    tokio::pin!(write);
    let written = tokio::select! {
        written = &mut write => written,
        () = stop.cancelled() => match tokio::time::timeout(FINAL_WRITE_TIMEOUT, &mut write).await {
            Ok(written) => written,
            Err(_) => {
                tracing::warn!("operator does not read its answer; closing");
                return false;
            }
        },
    };
    match written {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(cause = %err, "operator left");
            false
        }
    }
}

/// Closes a connection that did not get as far as a request, saying why.
async fn end_early(conn: &mut Connection<UnixStream>, incoming: Incoming, expected: &str) {
    match incoming {
        Incoming::Frame(frame) => {
            tracing::warn!(?frame, "operator did not start with a hello; closing");
            let message = format!("expected a {expected} first");
            let _ = conn.write_frame(&FromMaster::Error { message }).await;
        }
        Incoming::Closed => tracing::debug!("operator hung up before its {expected}"),
        Incoming::Stopped => {
            let message = "the master is stopping".to_string();
            let _ = conn.write_frame(&FromMaster::Error { message }).await;
        }
        Incoming::TimedOut => tracing::warn!(
            "operator sent no {expected} within {}s; closing",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        Incoming::Failed(err) => {
            tracing::warn!(cause = %error_chain(&err), "bad frame from an operator; closing")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::connect_in;
    use super::super::paths::{lock_is_held, read_lock};
    use super::super::test_support::{serve_with, setup, WAIT};
    use super::*;
    use crate::protocol::slave::Level;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    use tokio::io::AsyncWriteExt;

    #[test]
    fn bind_creates_private_files_and_drop_removes_them() {
        let setup = setup();
        let socket = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        let path = socket.path().to_owned();
        let lock = path.with_extension("lock");
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&setup.dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&lock), 0o600);
        let info = read_lock(&lock);
        assert_eq!(info.pid, Some(std::process::id()));
        assert_eq!(info.config, Some(fs::canonicalize(&setup.config).unwrap()));
        drop(socket);
        assert!(!path.exists() && !lock.exists());
    }

    #[tokio::test]
    async fn a_dead_masters_files_are_taken_over() {
        let setup = setup();
        // What a crashed master leaves: its socket file, and its lock file
        // with its pid, no longer locked (the kernel dropped the lock).
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&setup.dir)
            .unwrap();
        let stem = socket_stem(&fs::canonicalize(&setup.config).unwrap());
        let stale = setup.dir.join(format!("{stem}.sock"));
        let lock = setup.dir.join(format!("{stem}.lock"));
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        fs::write(&lock, "999999\n/old/herd.toml\n").unwrap();
        assert!(stale.exists() && !lock_is_held(&lock));

        let socket = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        assert_eq!(socket.path(), stale);
        assert!(lock_is_held(&lock));
        assert_eq!(read_lock(&lock).pid, Some(std::process::id()));
        let (_stop, _server) = serve_with(socket, |_| vec![]);
        let client = connect_in(&setup.dir, Some(&setup.config)).await.unwrap();
        assert_eq!(client.master_pid(), std::process::id());
    }

    #[tokio::test]
    async fn client_hang_up_drops_the_reply_channel() {
        let setup = setup();
        let socket = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        let (requests_tx, mut requests_rx) = mpsc::channel::<ControlRequest>(4);
        let stop = CancellationToken::new();
        let server = tokio::spawn(socket.serve(requests_tx, stop.clone()));

        let mut client = connect_in(&setup.dir, None).await.unwrap();
        let logs = ToMaster::Logs {
            group: None,
            tail: 0,
            follow: true,
        };
        client.request(logs.clone()).await.unwrap();
        let ControlRequest { request, reply } = tokio::time::timeout(WAIT, requests_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(request, logs);
        let line = |n: u32| FromMaster::Log {
            line: format!("line {n}"),
            level: Level::Info,
        };
        reply.send(line(1)).await.unwrap();
        assert_eq!(client.next_reply().await.unwrap(), Some(line(1)));
        drop(client);
        // The master's stream stops: its sends fail once the client left.
        tokio::time::timeout(WAIT, reply.closed()).await.unwrap();
        assert!(reply.send(line(2)).await.is_err());

        // A connection whose reply sender the master still holds keeps
        // `serve` alive after `stop` until the master lets it go.
        let mut client = connect_in(&setup.dir, None).await.unwrap();
        client
            .request(ToMaster::Stop { kill: false })
            .await
            .unwrap();
        let held = tokio::time::timeout(WAIT, requests_rx.recv())
            .await
            .unwrap()
            .unwrap();
        stop.cancel();
        let mut server = server;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut server)
                .await
                .is_err()
        );
        held.reply
            .send(FromMaster::Done {
                message: "stopped".into(),
            })
            .await
            .unwrap();
        drop(held);
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
        assert_eq!(
            client.next_reply().await.unwrap(),
            Some(FromMaster::Done {
                message: "stopped".into()
            })
        );
        assert_eq!(client.next_reply().await.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_frames_close_only_their_connection() {
        let setup = setup();
        let socket = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        let path = socket.path().to_owned();
        let (_stop, _server) = serve_with(socket, |_| {
            vec![FromMaster::Done {
                message: "ok".into(),
            }]
        });
        // A healthy client, connected before the bad ones.
        let mut good = connect_in(&setup.dir, None).await.unwrap();

        // Garbage instead of a hello.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(&8u32.to_be_bytes()).await.unwrap();
        raw.write_all(b"\x00garbage").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());

        // An absurd length prefix.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());

        // Another version: refused with an Error frame.
        let mut conn = Connection::new(UnixStream::connect(&path).await.unwrap());
        conn.write_frame(&ToMaster::Hello { version: 999 })
            .await
            .unwrap();
        match conn.read_frame::<FromMaster>().await.unwrap() {
            Some(FromMaster::Error { message }) => {
                assert!(message.contains("version mismatch"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.read_frame::<FromMaster>().await.unwrap(), None);

        // A request without a hello.
        let mut conn = Connection::new(UnixStream::connect(&path).await.unwrap());
        conn.write_frame(&ToMaster::Status).await.unwrap();
        assert!(matches!(
            conn.read_frame::<FromMaster>().await.unwrap(),
            Some(FromMaster::Error { .. })
        ));

        // The healthy one is still served.
        good.request(ToMaster::Reload).await.unwrap();
        assert_eq!(
            good.next_reply().await.unwrap(),
            Some(FromMaster::Done {
                message: "ok".into()
            })
        );
    }
}
