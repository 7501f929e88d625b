//! SSH for remote placements: one OpenSSH ControlMaster connection per
//! host (through the `openssh` crate, so `~/.ssh/config`, ssh-agent,
//! ProxyJump and known_hosts work as with plain `ssh`), and the agent
//! binary on the host, uploaded when missing.

use crate::config::{HostSpec, KnownHostsPolicy, SshOptions, DEFAULT_CONNECT_TIMEOUT};
use crate::queue::spawn::{JobCommand, SpawnOptions};
use crate::supervise::process::Child;
use openssh::{Session, Stdio};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::pipe;

/// Errors of a remote host. They are reported and retried, never fatal to
/// the master.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// ssh could not connect or authenticate; the text is ssh's own.
    #[error("{0}")]
    Connect(String),
    /// A remote command failed.
    #[error("{what}: {detail}")]
    Command {
        /// What we tried.
        what: &'static str,
        /// What went wrong (exit status, stderr).
        detail: String,
    },
    /// The host has another OS or architecture than the master, and no
    /// agent of this version is installed there.
    #[error(
        "the host runs {remote}, the master {local}: install taskherd {version} for {remote} on it and set master.agent_path"
    )]
    Platform {
        /// `uname -s -m` of the host.
        remote: String,
        /// The master's OS and architecture.
        local: String,
        /// Our version.
        version: &'static str,
    },
    /// Our own executable could not be read for the upload.
    #[error("cannot read the master's executable {}: {source}", path.display())]
    OwnExecutable {
        /// Where we looked.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The agent link failed.
    #[error("agent link: {0}")]
    Link(String),
    /// The host closed the connection before the SSH handshake, as sshd
    /// does past its `MaxStartups` (too many connections being set up at
    /// once): worth retrying soon.
    #[error("{0} (refused before the handshake: sshd's MaxStartups?)")]
    Refused(String),
}

/// How a remote command's output is read, whichever way it runs (the
/// ControlMaster's own session or a session over its socket).
pub type RemoteRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// How a remote command's input is written (see [`RemoteRead`]).
pub type RemoteWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// The stdio of a remote command.
pub struct RemoteStdio {
    /// Its stdin.
    pub stdin: RemoteWrite,
    /// Its stdout.
    pub stdout: BufReader<RemoteRead>,
    /// Its stderr.
    pub stderr: RemoteRead,
}

impl std::fmt::Debug for RemoteStdio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStdio").finish_non_exhaustive()
    }
}

/// One SSH connection to a host: an OpenSSH ControlMaster that is this
/// process's child and runs the connection's first command as its own
/// session (as `ssh host COMMAND` does: the command's stdio are the ssh
/// process's pipes), and a [`Session`] over its socket for any further
/// command (the `openssh` crate's native mux: no `ssh` client process per
/// command).
#[derive(Debug)]
pub struct SshConnection {
    /// The ssh process: the ControlMaster. Killed if dropped unclosed.
    master: Child,
    /// Commands over the ControlMaster's socket.
    session: Arc<Session>,
    /// The agent's command when it runs over the socket (it was uploaded)
    /// rather than as the first command.
    agent: Option<openssh::Child<Arc<Session>>>,
    /// The ControlMaster's socket and log, removed at the close.
    socket: PathBuf,
    log: PathBuf,
}

impl SshConnection {
    /// The session over the ControlMaster's socket, for commands beside
    /// the first one. It works as long as the first command runs or
    /// another session is open (the ControlMaster ends with its last
    /// session).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Waits (`limit` at most) for the first command to end, and returns
    /// its exit status (ssh's, which is the command's): `None` when it did
    /// not end in time.
    pub async fn first_status(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.master.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Once ssh has ended or is ending: the connection's failure if it
    /// failed (status 255 or a signal, or no end within `limit`), from
    /// what ssh wrote in its log; `None` when its first command ran and
    /// ended with a status of its own.
    async fn failure(&mut self, limit: Duration, logged_in: bool) -> Option<RemoteError> {
        let status = tokio::time::timeout(limit, self.master.wait()).await;
        if let Ok(Ok(status)) = &status {
            if status.code().is_some_and(|code| code != 255) {
                return None;
            }
        }
        let said = std::fs::read_to_string(&self.log).unwrap_or_default();
        let text = ssh_verdict(&said).unwrap_or_else(|| {
            let how = match status {
                Ok(Ok(status)) => status.to_string(),
                Ok(Err(err)) => err.to_string(),
                Err(_) => "it did not end".to_string(),
            };
            if logged_in {
                // sshd refusing the session (`MaxSessions 0`) says nothing
                // ssh logs at its usual level.
                format!(
                    "ssh ended after logging in, without a word ({how}): \
                     the host refused the session, or the connection dropped"
                )
            } else {
                format!("ssh failed ({how})")
            }
        });
        // sshd past MaxStartups closes the connection at once, before its
        // banner: ssh says so from `kex_exchange_identification`.
        Some(if text.contains("kex_exchange_identification") {
            RemoteError::Refused(text)
        } else {
            RemoteError::Connect(text)
        })
    }

    /// Waits (`limit` at most) for the agent's command to end, whichever
    /// way it runs.
    pub async fn wait_agent(&mut self, limit: Duration) {
        match self.agent.take() {
            Some(agent) => {
                let _ = tokio::time::timeout(limit, agent.wait()).await;
            }
            None => {
                self.first_status(limit).await;
            }
        }
    }

    /// Ends the ControlMaster, and with it whatever still runs over it,
    /// and waits (2 s at most) until it has exited; it is killed then.
    pub async fn close(self) {
        let SshConnection {
            mut master,
            session,
            agent,
            socket,
            log,
        } = self;
        drop(agent);
        // ssh takes SIGTERM as `ssh -O exit` takes its request: it closes
        // the connection and exits. Not reaped yet, its pid is still its.
        if let Some(pid) = master
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), master.wait()).await;
            }
        }
        // Killed and reaped at once (SIGKILL) if it is still there.
        drop(master);
        drop(session);
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&log);
    }
}

/// Numbers the connections of this process: their socket names in the
/// control directory.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Opens an SSH connection to `host` that runs `command` (a command line
/// for the login shell, as `ssh host COMMAND` takes it): one `ssh -M`
/// process, this process's child, that authenticates, listens on its
/// control socket for further sessions, and runs `command` as its own
/// session, whose stdio are returned. It returns once the handshake is
/// over (the socket appeared: `turn` is dropped then), the command
/// answered, or ssh ended.
///
/// No `-f`, no `ControlPersist`: the ControlMaster runs as long as its
/// first command or any session over its socket, and no fork, mux session
/// or mux relay sits between the master and the first command. The
/// ControlMaster's own stdio carries the command's, as pdsh runs its ssh.
///
/// The ssh process starts in a **session of its own** (`setsid`), as pdsh
/// starts its ssh: a terminal's signals do not reach it (the master stops
/// its hosts itself), and with the kernel's per-session scheduling
/// (autogroup) each handshake gets its own share of the CPU rather than
/// all of them sharing the master's. It is started as the instances are
/// (`clone(CLONE_VM | CLONE_VFORK)`, see `queue::spawn`), not by a `fork`
/// of the master, whose copy of the master's memory cost about 0.85 ms of
/// CPU per host between the two processes.
///
/// The key exchange and every other SSH setting are ssh's and the user's
/// ssh_config's, except what the link needs: no tty (`-T`), no X11, no
/// `RemoteCommand`, no `ControlPersist` (see the README's performance
/// section on `KexAlgorithms`).
///
/// # Errors
/// [`RemoteError::Connect`] with ssh's message, lowercased: `connection
/// refused`, `host key verification failed`, `permission denied
/// (publickey)`...; [`RemoteError::Refused`] when the host closed the
/// connection before its banner (sshd past `MaxStartups`).
pub async fn connect<T>(
    host: &HostSpec,
    options: &SshOptions,
    control_dir: &Path,
    keepalive: Duration,
    command: &str,
    turn: T,
) -> Result<(SshConnection, RemoteStdio), RemoteError> {
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let n = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let socket = control_dir.join(format!("{n}.sock"));
    let log = control_dir.join(format!("{n}.log"));
    // The arguments, built as for `Command`; the spawn is `JobCommand`'s.
    let mut ssh = std::process::Command::new("ssh");
    ssh.arg("-E")
        .arg(&log)
        .arg("-S")
        .arg(&socket)
        .args(["-M", "-T", "-x", "-o", "ControlPersist=no"])
        .args(["-o", "RemoteCommand=none", "-o", "BatchMode=yes", "-o"])
        .arg(match options.known_hosts {
            KnownHostsPolicy::Strict => "StrictHostKeyChecking=yes",
            KnownHostsPolicy::AcceptNew => "StrictHostKeyChecking=accept-new",
        })
        .arg("-o")
        .arg(format!(
            "ConnectTimeout={}",
            connect_timeout.as_secs().max(1)
        ))
        .arg("-o")
        .arg(format!(
            "ServerAliveInterval={}",
            keepalive.as_secs().max(1)
        ));
    if let Some(port) = host.port {
        ssh.arg("-p").arg(port.to_string());
    }
    if let Some(user) = &host.user {
        ssh.arg("-l").arg(user);
    }
    if let Some(key) = &options.identity_file {
        // Only that key, as with `ssh -i` in a script.
        ssh.args(["-o", "IdentitiesOnly=yes", "-i"]).arg(key);
    }
    if let Some(file) = &options.config_file {
        ssh.arg("-F").arg(file);
    }
    if let Some(jump) = &options.jump_host {
        ssh.arg("-J").arg(jump);
    }
    ssh.arg("--").arg(&host.name).arg(command);
    let args: Vec<OsString> = ssh.get_args().map(OsStr::to_os_string).collect();
    let cannot_run = |err: std::io::Error| RemoteError::Connect(format!("cannot run ssh: {err}"));
    let ssh = JobCommand::new(ssh.get_program(), &args, std::env::vars_os()).map_err(cannot_run)?;
    // Started as the instances are (`vfork`, no copy of the master's
    // memory), in a session of its own, with no parent-death signal: the
    // master closes its connections itself, and one dropped unclosed (a
    // handshake cut short by the timeout below, a stop meanwhile) is
    // killed and reaped with its `Child`.
    let spawn_options = SpawnOptions {
        new_session: true,
        no_parent_death_signal: true,
        ..SpawnOptions::default()
    };
    // Watched before ssh starts, so its socket cannot appear unseen.
    let watch = SocketWatch::new(control_dir).ok();
    let mut process = ssh.spawn_with(&[], &spawn_options).map_err(cannot_run)?;
    let (Some(stdin), Some(stdout), Some(stderr)) = (
        process.stdin.take(),
        process.stdout.take(),
        process.stderr.take(),
    ) else {
        return Err(RemoteError::Connect("ssh started without pipes".into()));
    };
    let mut master = Child::of(process);
    let pipes = || -> std::io::Result<_> {
        Ok((
            pipe::Sender::from_owned_fd(stdin)?,
            pipe::Receiver::from_owned_fd(stdout)?,
            pipe::Receiver::from_owned_fd(stderr)?,
        ))
    };
    let (stdin, stdout, stderr) =
        pipes().map_err(|err| RemoteError::Connect(format!("cannot watch ssh's pipes: {err}")))?;
    let mut stdout = BufReader::new(Box::new(stdout) as RemoteRead);
    // ssh's ConnectTimeout covers the TCP connect only; a host that
    // accepts and then stalls is bounded here.
    let limit = connect_timeout * 2 + Duration::from_secs(5);
    let handshake = async {
        tokio::select! {
            () = socket_appears(watch.as_ref(), &socket) => false,
            answered = stdout.fill_buf() => answered.is_ok_and(|data| data.is_empty()),
            _ = master.wait() => true,
        }
    };
    let ended = match tokio::time::timeout(limit, handshake).await {
        Ok(ended) => ended,
        Err(_) => {
            drop(master);
            let _ = std::fs::remove_file(&log);
            return Err(RemoteError::Connect(format!(
                "no answer within {}",
                humantime::format_duration(limit)
            )));
        }
    };
    drop(turn);
    drop(watch);
    let session = Arc::new(Session::resume_mux(
        socket.clone().into_boxed_path(),
        Some(log.clone().into_boxed_path()),
    ));
    let mut connection = SshConnection {
        master,
        session,
        agent: None,
        socket,
        log,
    };
    if ended {
        // ssh ended, or is ending. (A command that ran and ended with
        // its own status is the caller's to read.)
        if let Some(failed) = connection.failure(limit, false).await {
            connection.close().await;
            return Err(failed);
        }
    }
    Ok((
        connection,
        RemoteStdio {
            stdin: Box::new(stdin),
            stdout,
            stderr: Box::new(stderr),
        },
    ))
}

/// Tells when a file appears in a directory (inotify): how the end of a
/// handshake is seen, as the ControlMaster creates its socket right after
/// authenticating, before it opens the first session.
struct SocketWatch {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl SocketWatch {
    /// Watches `dir` for new files (one inotify instance, for one
    /// handshake; if there are none left, [`socket_appears`] looks for the
    /// socket instead).
    fn new(dir: &Path) -> std::io::Result<SocketWatch> {
        use rustix::fs::inotify;
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
        )?;
        // SAFETY: `fd` is an open inotify descriptor that the AsyncFd
        // owns from here on: it stays open, the same, until it is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|err| err.into_parts().1)?;
        Ok(SocketWatch { fd })
    }

    /// Returns once a file named `name` was created in the directory.
    ///
    /// # Errors
    /// If reading the watch fails.
    async fn saw(&self, name: &std::ffi::OsStr) -> std::io::Result<()> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        loop {
            let mut ready = self.fd.readable().await?;
            let read = ready.try_io(|fd| {
                let mut events = rustix::fs::inotify::Reader::new(fd.get_ref(), &mut buf);
                let mut seen = false;
                loop {
                    match events.next() {
                        // Events were lost: look at the directory instead.
                        Ok(event)
                            if event
                                .events()
                                .contains(rustix::fs::inotify::ReadFlags::QUEUE_OVERFLOW) =>
                        {
                            return Err(std::io::Error::other("inotify queue overflow"));
                        }
                        Ok(event) => {
                            seen |= event
                                .file_name()
                                .is_some_and(|file| file.to_bytes() == name.as_encoded_bytes());
                        }
                        // Read to the end: then `seen`, or wait for more.
                        Err(rustix::io::Errno::AGAIN) if seen => return Ok(()),
                        Err(err) => return Err(std::io::Error::from(err)),
                    }
                }
            });
            match read {
                Ok(result) => return result,
                // Read to the end, not seen: readiness cleared, wait.
                Err(_would_block) => {}
            }
        }
    }
}

/// Returns when the file `path` appears in the watched directory.
/// Without a watch, or if it fails, it looks every 50 ms.
async fn socket_appears(watch: Option<&SocketWatch>, path: &Path) {
    if let (Some(watch), Some(name)) = (watch, path.file_name()) {
        if watch.saw(name).await.is_ok() {
            return;
        }
    }
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ssh's verdict in what it printed: its last line, without the noise
/// (ssh may print a banner of warnings first: a changed host key comes
/// with a box of '@'), lowercased; `None` when it said nothing.
fn ssh_verdict(said: &str) -> Option<String> {
    let text = said
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())?
        .trim_end_matches('.');
    let text = text.strip_prefix("ssh: ").unwrap_or(text);
    let mut text = text.to_string();
    if let Some(first) = text.get(..1) {
        let lower = first.to_lowercase();
        text.replace_range(..1, &lower);
    }
    Some(text)
}

/// Our own executable, its hash and the name it gets on remote hosts.
#[derive(Debug)]
struct OwnExecutable {
    path: PathBuf,
    sha256: String,
}

/// Hashed once per process: hosts that need it at the same moment wait
/// for the one hashing instead of each reading and hashing it again.
static OWN_EXECUTABLE: tokio::sync::OnceCell<OwnExecutable> = tokio::sync::OnceCell::const_new();

async fn own_executable() -> Result<&'static OwnExecutable, RemoteError> {
    OWN_EXECUTABLE.get_or_try_init(hash_own_executable).await
}

async fn hash_own_executable() -> Result<OwnExecutable, RemoteError> {
    let path = std::env::current_exe().map_err(|source| RemoteError::OwnExecutable {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let cache = exe_hash_file();
    let hashed = path.clone();
    let sha256 = tokio::task::spawn_blocking(move || super::exe_hash::sha256(&hashed, &cache))
        .await
        .map_err(std::io::Error::other)
        .and_then(|hashed| hashed)
        .map_err(|source| RemoteError::OwnExecutable {
            path: path.clone(),
            source,
        })?;
    Ok(OwnExecutable { path, sha256 })
}

/// The file of the state directory where masters keep the hashes of
/// their executables (see `exe_hash`).
pub const EXE_HASH_FILE: &str = "exe-sha256";

/// [`EXE_HASH_FILE`] in this user's default state directory.
fn exe_hash_file() -> PathBuf {
    crate::pidkiller::default_state_dir().join(EXE_HASH_FILE)
}

/// Quotes a string for a POSIX shell. A word of only letters, digits and
/// `_@%+=:,./-` (most paths) stays as it is: then a command built with it
/// holds no quote of its own, and `sh -c '…'` around it reads the same in
/// shells whose quoting is not POSIX (elvish, rc).
pub fn shell_quote(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The line the start command prints just before it execs the agent:
/// what comes after it on stdout are the agent's frames.
const AGENT_STARTS: &str = "taskherd-agent-starts";

/// The line the start command prints when the agent is not on the host,
/// followed by `uname -s` and `uname -m`.
const AGENT_MISSING: &str = "taskherd-agent-missing";

/// Bytes a login may print on stdout (its rc files' chatter) before the
/// start command's own line; more is taken for a broken login.
const MAX_LOGIN_NOISE: usize = 64 * 1024;

/// How long the start command may take to say whether the agent starts
/// (a login's rc files run first).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent running on a host, its stdio ready for the agent protocol.
pub struct RunningAgent {
    /// The agent's stdin: frames to the agent.
    pub stdin: RemoteWrite,
    /// The agent's stdout, past the start line: frames from the agent.
    pub stdout: BufReader<RemoteRead>,
    /// The agent's stderr: its own log lines and the login's chatter.
    pub stderr: RemoteRead,
    /// Remote path of the `taskherd` executable.
    pub path: String,
    /// `true` when it was uploaded to start it.
    pub uploaded: bool,
    /// `true` when the login shell could not run the start command and it
    /// ran through `sh -c` (one more connection and command).
    pub through_sh: bool,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("path", &self.path)
            .field("uploaded", &self.uploaded)
            .field("through_sh", &self.through_sh)
            .finish_non_exhaustive()
    }
}

/// How to reach a host and its agent, for [`start_agent`].
#[derive(Debug)]
pub struct AgentStart<'a> {
    /// The host.
    pub host: &'a HostSpec,
    /// Its SSH settings.
    pub options: &'a SshOptions,
    /// Where the ControlMaster's socket goes (short: a socket path is
    /// limited to about 100 bytes).
    pub control_dir: &'a Path,
    /// ssh's `ServerAliveInterval`.
    pub keepalive: Duration,
    /// Turns to hold during a handshake (`master.max_handshakes`).
    pub handshakes: &'a tokio::sync::Semaphore,
    /// Where uploaded agents live on the host.
    pub agent_dir: &'a str,
    /// An agent installed on the host (never uploaded), if any.
    pub agent_path: Option<&'a str>,
    /// The master's first frames, written to the agent's stdin at once.
    pub prelude: &'a [u8],
}

/// Connects to the host and starts the agent there in **one remote
/// command** when it is there (each command pays the login's shell rc
/// files), the connection's own: a one-line probe, run by the login
/// shell itself (no `sh` starts before the agent), execs the agent of
/// exactly this build if the host has it, else says what the host is and
/// waits; then, if the OS and architecture match, **one more command**
/// over the connection's socket uploads it and starts it, the executable
/// and then the agent protocol on the same stdin. A login shell that
/// cannot run the probe (it ends without a word) gets it once more
/// through `sh -c`, on a new connection. An `agent_path` is started the
/// same way and is never uploaded. The agent lives in `agent_dir` as
/// `taskherd-<version>-<hash>`; an upload is written under a temporary
/// name, checked (size, and SHA-256 where `sha256sum` exists) and
/// renamed.
///
/// Lines the login prints on stdout before the script's own (rc files
/// that echo) are skipped, up to 64 KiB.
///
/// `prelude` (the master's first frames) is written to the agent's stdin
/// as soon as the command runs, without waiting for its answer: the agent
/// finds it there when it starts, a round trip earlier. A start command
/// that does not start the agent reads none of it.
///
/// # Errors
/// Those of [`connect`]; [`RemoteError::Platform`] on a mismatch,
/// [`RemoteError::Command`] when a command fails or says something
/// unexpected (with its stderr), [`RemoteError::OwnExecutable`] when our
/// executable cannot be read.
pub async fn start_agent(
    how: &AgentStart<'_>,
) -> Result<(SshConnection, RunningAgent), RemoteError> {
    let (file, own) = match how.agent_path {
        Some(path) => (path.to_string(), None),
        None => {
            let own = own_executable().await?;
            let dir = how.agent_dir.strip_prefix("~/").unwrap_or(how.agent_dir);
            let file = format!(
                "{dir}/taskherd-{}-{}",
                env!("CARGO_PKG_VERSION"),
                &own.sha256[..16]
            );
            (file, Some((own, dir)))
        }
    };
    let (connection, mut probe, through_sh) = match Probe::run(how, &file, Through::Login).await? {
        (connection, Probe::Starts(started)) => {
            return Ok(started.running(connection, file, false, false))
        }
        (connection, Probe::Missing(started)) => (connection, started, false),
        // A login shell that cannot parse the probe (not POSIX-like, and
        // without `&&`) ended it without a word: once more through `sh`.
        // Unless ssh itself failed after the handshake (255: the
        // connection dropped, the session was refused).
        (mut connection, Probe::Ended(_)) => {
            let failed = connection.failure(START_TIMEOUT, true).await;
            connection.close().await;
            if let Some(failed) = failed {
                return Err(failed);
            }
            match Probe::run(how, &file, Through::Sh).await? {
                (connection, Probe::Starts(started)) => {
                    return Ok(started.running(connection, file, false, true))
                }
                (connection, Probe::Missing(started)) => (connection, started, true),
                (mut connection, Probe::Ended(started)) => {
                    let failed = match connection.failure(START_TIMEOUT, true).await {
                        Some(failed) => failed,
                        None => started.unexpected(None, Some(&mut connection)).await,
                    };
                    connection.close().await;
                    return Err(failed);
                }
            }
        }
    };
    let Some((own, dir)) = own else {
        connection.close().await;
        return Err(RemoteError::Command {
            what: "cannot start the agent",
            detail: format!("master.agent_path {file} is not an executable file on this host"),
        });
    };
    let remote_os = probe.next_line().await.to_lowercase();
    let remote_arch = probe.next_line().await;
    let arch_matches = remote_arch == std::env::consts::ARCH
        || (std::env::consts::ARCH == "aarch64" && remote_arch == "arm64");
    if remote_os != std::env::consts::OS || !arch_matches {
        connection.close().await;
        return Err(RemoteError::Platform {
            remote: format!("{remote_os} {remote_arch}"),
            local: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            version: env!("CARGO_PKG_VERSION"),
        });
    }
    // The probe waits (`cat`) and so keeps the ControlMaster up until
    // the upload's session is open; it ends as its stdin closes.
    let uploaded = upload_and_start(&connection, own, dir, &file, how.prelude).await;
    drop(probe);
    match uploaded {
        Ok(started) => Ok(started.running(connection, file, true, through_sh)),
        Err(err) => {
            connection.close().await;
            Err(err)
        }
    }
}

/// What the probe of a start command found.
enum Probe {
    /// The agent starts: its frames follow.
    Starts(Started),
    /// The agent is not there; `uname -s` and `uname -m` follow, and the
    /// probe waits for its stdin to close.
    Missing(Started),
    /// The command ended without a word of its own.
    Ended(Started),
}

impl Probe {
    /// Connects and runs the probe of the agent `file` through `through`
    /// as the connection's first command: it execs the agent if the host
    /// has it, else says it is missing and what the host is, and waits.
    /// The prelude is written at once (see [`start_agent`]).
    ///
    /// Through the login shell, the probe is one line that any common
    /// shell runs as is (sh, bash, zsh, ksh, fish, csh): no `sh` starts
    /// before the agent.
    async fn run(
        how: &AgentStart<'_>,
        file: &str,
        through: Through,
    ) -> Result<(SshConnection, Probe), RemoteError> {
        let script = format!(
            "test -x {f} && echo {AGENT_STARTS} && exec {f} agent; \
             echo {AGENT_MISSING}; uname -s; uname -m; cat >/dev/null",
            f = shell_quote(file)
        );
        let command = match through {
            Through::Login => script,
            Through::Sh => format!("sh -c {}", shell_quote(&script)),
        };
        // One of `max_handshakes` turns, held for the handshake only.
        let turn = how.handshakes.acquire().await;
        let (connection, stdio) = connect(
            how.host,
            how.options,
            how.control_dir,
            how.keepalive,
            &command,
            turn,
        )
        .await?;
        let mut started = Started::first(stdio, "cannot start the agent");
        started.send_prelude(how.prelude).await;
        let found = match started.first_line().await {
            Ok(Some(line)) if line == AGENT_STARTS => Probe::Starts(started),
            Ok(Some(_)) => Probe::Missing(started),
            Ok(None) => Probe::Ended(started),
            Err(err) => {
                connection.close().await;
                return Err(err);
            }
        };
        Ok((connection, found))
    }
}

/// How a command reaches the host.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Through {
    /// As the command line of the login shell (what `ssh host COMMAND`
    /// does): no other shell starts.
    Login,
    /// As the script of `sh -c`, whatever the login shell.
    Sh,
}

/// Uploads our executable as `file` and starts it as the agent, in one
/// command over the connection's socket: exactly its size is read off
/// stdin (`head -c`, which reads no further), and what follows on stdin
/// is the agent protocol.
async fn upload_and_start(
    connection: &SshConnection,
    own: &OwnExecutable,
    dir: &str,
    file: &str,
    prelude: &[u8],
) -> Result<Started, RemoteError> {
    let own_error = |source| RemoteError::OwnExecutable {
        path: own.path.clone(),
        source,
    };
    let mut local = tokio::fs::File::open(&own.path).await.map_err(own_error)?;
    let size = local.metadata().await.map_err(own_error)?.len();
    // Written under a temporary name and renamed: a concurrent master or an
    // interrupted upload never leaves a half file under the final name.
    let script = format!(
        "set -e; umask 077; mkdir -p {dir}; t={file}.part.$$; head -c {size} > \"$t\"; \
         if [ \"$(wc -c < \"$t\")\" -ne {size} ]; then rm -f \"$t\"; echo \"short upload\" >&2; exit 3; fi; \
         chmod 700 \"$t\"; \
         if command -v sha256sum >/dev/null 2>&1; then \
           h=$(sha256sum \"$t\" | cut -d\" \" -f1); \
           if [ \"$h\" != {hash} ]; then rm -f \"$t\"; echo \"hash mismatch: $h\" >&2; exit 3; fi; \
         fi; mv -f \"$t\" {file}; echo {AGENT_STARTS}; exec {file} agent",
        dir = shell_quote(dir),
        file = shell_quote(file),
        hash = shell_quote(&own.sha256),
    );
    let mut started = Started::over_socket(connection, script, "cannot upload the agent").await?;
    let copied = tokio::io::copy(&mut (&mut local).take(size), &mut started.stdin).await;
    if let Err(err) = copied.and_then(|n| {
        if n == size {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{n} of {size} bytes sent")))
        }
    }) {
        let mut failed = started.unexpected(None, None).await;
        if let RemoteError::Command { detail, .. } = &mut failed {
            *detail = format!("{err}; {detail}");
        }
        return Err(failed);
    }
    started.send_prelude(prelude).await;
    started
        .stdin
        .flush()
        .await
        .map_err(|err| RemoteError::Command {
            what: started.what,
            detail: err.to_string(),
        })?;
    match started.first_line().await? {
        Some(line) if line == AGENT_STARTS => Ok(started),
        line => {
            let mut failed = started.unexpected(line, None).await;
            if let RemoteError::Command { detail, .. } = &mut failed {
                if detail.contains("hash mismatch") {
                    // Wrong in the cache, or the executable changed under
                    // this master: the next master hashes it again.
                    let (cache, wrong) = (exe_hash_file(), own.sha256.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        super::exe_hash::forget(&cache, &wrong);
                    })
                    .await;
                    detail.push_str(&format!(
                        "; {} no longer gives that hash: restart the master to hash {} again",
                        EXE_HASH_FILE,
                        own.path.display()
                    ));
                }
            }
            Err(failed)
        }
    }
}

/// A start command running, its stdio piped.
struct Started {
    /// What it does, for errors.
    what: &'static str,
    stdin: RemoteWrite,
    stdout: BufReader<RemoteRead>,
    stderr: RemoteRead,
    /// The command when it runs over the socket; `None` for the
    /// connection's first command (whose status is ssh's).
    child: Option<openssh::Child<Arc<Session>>>,
}

impl Started {
    /// The connection's first command, from its stdio.
    fn first(stdio: RemoteStdio, what: &'static str) -> Started {
        Started {
            what,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            child: None,
        }
    }

    /// Runs `script` through `sh -c` over the connection's socket.
    async fn over_socket(
        connection: &SshConnection,
        script: String,
        what: &'static str,
    ) -> Result<Started, RemoteError> {
        let failed = |detail: String| RemoteError::Command { what, detail };
        let mut command = Session::to_command(Arc::clone(connection.session()), "sh");
        command.arg("-c").arg(script);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .map_err(|err| failed(err.to_string()))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            child.stdin().take(),
            child.stdout().take(),
            child.stderr().take(),
        ) else {
            return Err(failed("started without pipes".into()));
        };
        Ok(Started {
            what,
            stdin: Box::new(stdin),
            stdout: BufReader::new(Box::new(stdout)),
            stderr: Box::new(stderr),
            child: Some(child),
        })
    }

    /// Writes `prelude` to the command's stdin. A failure is left for the
    /// answer to tell (the command ended: it says why on stderr).
    async fn send_prelude(&mut self, prelude: &[u8]) {
        if !prelude.is_empty() {
            let _ = self.stdin.write_all(prelude).await;
            let _ = self.stdin.flush().await;
        }
    }

    /// The first line of the script's own on stdout (`None` at its end),
    /// past what the login printed first.
    async fn first_line(&mut self) -> Result<Option<String>, RemoteError> {
        let what = self.what;
        let read = async {
            let mut noise = 0usize;
            loop {
                let mut line = String::new();
                match self.stdout.read_line(&mut line).await {
                    Ok(0) => return Ok(None),
                    Ok(n) => {
                        let line = line.trim_end();
                        if line == AGENT_STARTS || line == AGENT_MISSING {
                            return Ok(Some(line.to_string()));
                        }
                        noise += n;
                        if noise > MAX_LOGIN_NOISE {
                            return Err(RemoteError::Command {
                                what,
                                detail: format!(
                                    "the login printed more than {MAX_LOGIN_NOISE} bytes on stdout \
                                     before the command's answer (last: {line:?})"
                                ),
                            });
                        }
                    }
                    Err(err) => {
                        return Err(RemoteError::Command {
                            what,
                            detail: err.to_string(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(START_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| {
                Err(RemoteError::Command {
                    what,
                    detail: format!("no answer within {}s", START_TIMEOUT.as_secs()),
                })
            })
    }

    /// The next line on stdout, trimmed (empty at the end).
    async fn next_line(&mut self) -> String {
        let mut line = String::new();
        let _ = tokio::time::timeout(START_TIMEOUT, self.stdout.read_line(&mut line)).await;
        line.trim().to_string()
    }

    /// The agent started: its stdio, and the connection that keeps its
    /// command (if it runs over the socket).
    fn running(
        self,
        mut connection: SshConnection,
        path: String,
        uploaded: bool,
        through_sh: bool,
    ) -> (SshConnection, RunningAgent) {
        connection.agent = self.child;
        let running = RunningAgent {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            path,
            uploaded,
            through_sh,
        };
        (connection, running)
    }

    /// The error of a command that did not answer as expected: what it
    /// said instead (`line`), its stderr and its exit status (the
    /// connection's, through `connection`, for its first command).
    async fn unexpected(
        self,
        line: Option<String>,
        connection: Option<&mut SshConnection>,
    ) -> RemoteError {
        let Started {
            what,
            stdin,
            stderr,
            child,
            ..
        } = self;
        drop(stdin);
        let said = said_on(stderr).await;
        let status = match (child, connection) {
            (Some(child), _) => match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                Ok(Err(err)) => err.to_string(),
                Err(_) => "still running".to_string(),
            },
            (None, Some(connection)) => match connection.first_status(START_TIMEOUT).await {
                Some(status) => status.to_string(),
                None => "still running".to_string(),
            },
            (None, None) => "not known".to_string(),
        };
        unexpected_error(what, line, &status, &said)
    }
}

/// What a command said on `stderr` (64 KiB at most, until it ends).
async fn said_on(mut stderr: RemoteRead) -> String {
    let mut said = Vec::new();
    let _ = tokio::time::timeout(
        START_TIMEOUT,
        (&mut stderr)
            .take(MAX_LOGIN_NOISE as u64)
            .read_to_end(&mut said),
    )
    .await;
    String::from_utf8_lossy(&said).trim().to_string()
}

/// The error of a start command that answered `line` (or nothing).
fn unexpected_error(
    what: &'static str,
    line: Option<String>,
    status: &str,
    said: &str,
) -> RemoteError {
    let answer = match line {
        Some(line) => format!("unexpected answer {line:?}"),
        None => "no answer".to_string(),
    };
    RemoteError::Command {
        what,
        detail: format!("{answer} ({status}): {said}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("~/x"), "'~/x'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(
            shell_quote("/opt/taskherd-0.1.0/bin/taskherd"),
            "/opt/taskherd-0.1.0/bin/taskherd"
        );
    }

    /// The end of a handshake as the master sees it: ssh binds its
    /// control socket under a temporary name and hard-links it to its
    /// path; other files come and go in the same directory.
    #[tokio::test]
    async fn a_socket_linked_into_the_directory_is_seen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let watch = SocketWatch::new(dir.path()).expect("inotify");
        let socket = dir.path().join("7.sock");
        let appears = socket_appears(Some(&watch), &socket);
        let make = async {
            tokio::task::yield_now().await;
            std::fs::write(dir.path().join("7.log"), b"").expect("log");
            std::fs::write(dir.path().join("8.sock"), b"").expect("another socket");
            let temporary = dir.path().join("7.sock.XXXXXXXX");
            std::fs::write(&temporary, b"").expect("temporary");
            std::fs::hard_link(&temporary, &socket).expect("link");
            std::fs::remove_file(&temporary).expect("unlink");
        };
        let ((), seen) = tokio::join!(make, tokio::time::timeout(Duration::from_secs(10), appears));
        assert!(seen.is_ok(), "the socket's link was not seen");
        // Nothing else ends the wait: another name stays unseen.
        let unseen = dir.path().join("9.sock");
        let other = socket_appears(Some(&watch), &unseen);
        assert!(tokio::time::timeout(Duration::from_millis(200), other)
            .await
            .is_err());
    }

    /// Without a watch (no inotify instance left), the socket is looked
    /// for instead.
    #[tokio::test]
    async fn without_a_watch_the_socket_is_looked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("1.sock");
        let make = async {
            tokio::task::yield_now().await;
            std::fs::write(&socket, b"").expect("socket");
        };
        let appears = socket_appears(None, &socket);
        let ((), seen) = tokio::join!(make, tokio::time::timeout(Duration::from_secs(10), appears));
        assert!(seen.is_ok(), "the socket was not found");
    }

    #[test]
    fn the_verdict_is_the_last_line_lowercased() {
        let said = "@@@@@@@@\nWARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!\n\nHost key verification failed.\n";
        assert_eq!(
            ssh_verdict(said).as_deref(),
            Some("host key verification failed")
        );
        assert_eq!(
            ssh_verdict("ssh: connect to host x port 22: Connection refused\n").as_deref(),
            Some("connect to host x port 22: Connection refused")
        );
        assert_eq!(ssh_verdict(" \n"), None);
    }
}
