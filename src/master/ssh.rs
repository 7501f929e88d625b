//! SSH for remote placements: one OpenSSH ControlMaster connection per
//! host (through the `openssh` crate, so `~/.ssh/config`, ssh-agent,
//! ProxyJump and known_hosts work as with plain `ssh`), and the agent
//! binary on the host, uploaded when missing.

use crate::config::{HostSpec, KnownHostsPolicy, SshOptions, DEFAULT_CONNECT_TIMEOUT};
use openssh::{Session, Stdio};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// How long an idle ControlMaster survives the master (it has no other
/// user): long enough to reconnect the agent, short enough not to linger.
const CONTROL_PERSIST_SECS: usize = 5;

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

/// One SSH connection to a host: an OpenSSH ControlMaster that this
/// process started, and the [`Session`] that runs commands over its socket
/// from this process (the `openssh` crate's native mux: no `ssh` client
/// process per command).
#[derive(Debug)]
pub struct SshConnection {
    session: Session,
    /// The ControlMaster's socket and log, removed at the close.
    socket: PathBuf,
    log: PathBuf,
    /// The ControlMaster process (it forked into the background after the
    /// handshake), to end it at the close.
    master: Option<OwnedFd>,
}

impl SshConnection {
    /// The session, to run commands on the host.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Ends the ControlMaster, and with it whatever still runs over it,
    /// and waits (2 s at most) until it has exited.
    pub async fn close(self) {
        let SshConnection {
            session,
            socket,
            log,
            master,
        } = self;
        match master {
            Some(fd) => {
                // ssh takes SIGTERM as `ssh -O exit` takes its request:
                // it closes the connection and exits.
                if rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::TERM).is_ok() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        crate::pidkiller::proc::wait_exit(fd),
                    )
                    .await;
                }
                drop(session);
            }
            None => {
                if let Err(err) = session.close().await {
                    tracing::debug!(cause = %err, "closing the ssh connection");
                }
            }
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&log);
    }
}

/// Numbers the connections of this process: their socket names in the
/// control directory.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Opens the ControlMaster connection to `host`: `ssh -M -f -N`, which
/// returns once it has authenticated and forked into the background.
///
/// The ssh process starts in a **session of its own** (`setsid`), as pdsh
/// starts its ssh: a terminal's signals do not reach it (the master stops
/// its hosts itself), and with the kernel's per-session scheduling
/// (autogroup) each handshake gets its own share of the CPU rather than
/// all of them sharing the master's.
///
/// The key exchange and every other SSH setting are ssh's and the user's
/// ssh_config's: none is forced here (see the README's performance
/// section on `KexAlgorithms`).
///
/// # Errors
/// [`RemoteError::Connect`] with ssh's message, lowercased: `connection
/// refused`, `host key verification failed`, `permission denied
/// (publickey)`...; [`RemoteError::Refused`] when the host closed the
/// connection before its banner (sshd past `MaxStartups`).
pub async fn connect(
    host: &HostSpec,
    options: &SshOptions,
    control_dir: &Path,
    keepalive: Duration,
) -> Result<SshConnection, RemoteError> {
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let n = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
    let socket = control_dir.join(format!("{n}.sock"));
    let log = control_dir.join(format!("{n}.log"));
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .arg("-E")
        .arg(&log)
        .arg("-S")
        .arg(&socket)
        .args(["-M", "-f", "-N", "-o"])
        .arg(format!("ControlPersist={CONTROL_PERSIST_SECS}s"))
        .args(["-o", "BatchMode=yes", "-o"])
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
    ssh.arg("--").arg(&host.name);
    // A handshake cut short by the timeout below is not left running.
    ssh.kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes the setsid(2) system call, which is async-signal-safe; it
    // allocates nothing and touches no lock.
    unsafe {
        ssh.pre_exec(|| {
            rustix::process::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    // ssh's ConnectTimeout covers the TCP connect only; a host that
    // accepts and then stalls is bounded here.
    let limit = connect_timeout * 2 + Duration::from_secs(5);
    let status = match tokio::time::timeout(limit, ssh.status()).await {
        Ok(Ok(status)) => status,
        Ok(Err(err)) => {
            return Err(RemoteError::Connect(format!("cannot run ssh: {err}")));
        }
        Err(_) => {
            let _ = std::fs::remove_file(&log);
            return Err(RemoteError::Connect(format!(
                "no answer within {}",
                humantime::format_duration(limit)
            )));
        }
    };
    if !status.success() {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let text = ssh_verdict(&said).unwrap_or_else(|| format!("ssh failed ({status})"));
        // sshd past MaxStartups closes the connection at once, before
        // its banner: ssh says so from `kex_exchange_identification`.
        return Err(if text.contains("kex_exchange_identification") {
            RemoteError::Refused(text)
        } else {
            RemoteError::Connect(text)
        });
    }
    // The ControlMaster's pid, from itself, to end it at the close.
    let master = match openssh_mux_client::Connection::connect(&socket).await {
        Ok(mut mux) => match mux.send_alive_check().await {
            Ok(pid) => crate::pidkiller::proc::ProcessIdentity::of(pid.get())
                .and_then(crate::pidkiller::proc::pidfd_open)
                .ok(),
            Err(_) => None,
        },
        Err(err) => {
            return Err(RemoteError::Connect(format!(
                "the ssh ControlMaster does not answer on {}: {err}",
                socket.display()
            )))
        }
    };
    let session = Session::resume_mux(
        socket.clone().into_boxed_path(),
        Some(log.clone().into_boxed_path()),
    );
    Ok(SshConnection {
        session,
        socket,
        log,
        master,
    })
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

/// Starts hashing this executable (what names the agent's file on the
/// hosts) in the background, once per process, for hosts about to connect
/// without `master.agent_path`. The first of them then finds the hash
/// ready as its handshake ends, instead of starting it then: with many
/// hosts the handshakes take every CPU by that time, and reading and
/// hashing its 15–25 MB among them took a second (64 hosts on 2 cores), during
/// which no host could start its agent. A failure is left for the hosts
/// to meet and report (they ask again).
pub fn prepare_agent_upload() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if !STARTED.swap(true, Ordering::Relaxed) {
        tokio::spawn(async {
            let _ = own_executable().await;
        });
    }
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
#[derive(Debug)]
pub struct RunningAgent<'s> {
    /// The remote command (the agent, after its shell's `exec`).
    pub child: openssh::Child<&'s Session>,
    /// The agent's stdin: frames to the agent.
    pub stdin: openssh::ChildStdin,
    /// The agent's stdout, past the start line: frames from the agent.
    pub stdout: BufReader<openssh::ChildStdout>,
    /// The agent's stderr: its own log lines and the login's chatter.
    pub stderr: openssh::ChildStderr,
    /// Remote path of the `taskherd` executable.
    pub path: String,
    /// `true` when it was uploaded to start it.
    pub uploaded: bool,
    /// `true` when the login shell could not run the start command and it
    /// ran through `sh -c` (one more command per connection).
    pub through_sh: bool,
}

/// Starts the agent on the host in **one remote command** when it is
/// there (each command pays the login's shell rc files): a one-line
/// probe, run by the login shell itself (no `sh` starts before the
/// agent), execs the agent of exactly this build if the host has it,
/// else says what the host is; then, if the OS and architecture match,
/// **one more command** uploads it and starts it, the executable and then
/// the agent protocol on the same stdin. A login shell that cannot run
/// the probe (it ends without a word) gets it once more through `sh -c`.
/// An `agent_path` is started the same way and is never uploaded. The
/// agent lives in `agent_dir` as `taskherd-<version>-<hash>`; an upload
/// is written under a temporary name, checked (size, and SHA-256 where
/// `sha256sum` exists) and renamed.
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
/// [`RemoteError::Platform`] on a mismatch, [`RemoteError::Command`] when
/// a command fails or says something unexpected (with its stderr),
/// [`RemoteError::OwnExecutable`] when our executable cannot be read.
pub async fn start_agent<'s>(
    session: &'s Session,
    agent_dir: &str,
    agent_path: Option<&str>,
    prelude: &[u8],
) -> Result<RunningAgent<'s>, RemoteError> {
    let (file, own) = match agent_path {
        Some(path) => (path.to_string(), None),
        None => {
            let own = own_executable().await?;
            let dir = agent_dir.strip_prefix("~/").unwrap_or(agent_dir);
            let file = format!(
                "{dir}/taskherd-{}-{}",
                env!("CARGO_PKG_VERSION"),
                &own.sha256[..16]
            );
            (file, Some((own, dir)))
        }
    };
    let (mut probe, through_sh) = match Probe::run(session, &file, Through::Login, prelude).await? {
        Probe::Starts(started) => return Ok(started.running(file, false, false)),
        Probe::Missing(started) => (started, false),
        // A login shell that cannot parse the probe (not POSIX-like, and
        // without `&&`) ended it without a word: once more through `sh`.
        Probe::Ended(_) => match Probe::run(session, &file, Through::Sh, prelude).await? {
            Probe::Starts(started) => return Ok(started.running(file, false, true)),
            Probe::Missing(started) => (started, true),
            Probe::Ended(started) => return Err(started.unexpected(None).await),
        },
    };
    let Some((own, dir)) = own else {
        return Err(RemoteError::Command {
            what: "cannot start the agent",
            detail: format!("master.agent_path {file} is not an executable file on this host"),
        });
    };
    let remote_os = probe.next_line().await.to_lowercase();
    let remote_arch = probe.next_line().await;
    let _ = tokio::time::timeout(START_TIMEOUT, probe.child.wait()).await;
    let arch_matches = remote_arch == std::env::consts::ARCH
        || (std::env::consts::ARCH == "aarch64" && remote_arch == "arm64");
    if remote_os != std::env::consts::OS || !arch_matches {
        return Err(RemoteError::Platform {
            remote: format!("{remote_os} {remote_arch}"),
            local: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            version: env!("CARGO_PKG_VERSION"),
        });
    }
    let mut running = upload_and_start(session, own, dir, &file, prelude).await?;
    running.through_sh = through_sh;
    Ok(running)
}

/// What the probe of a start command found.
enum Probe<'s> {
    /// The agent starts: its frames follow.
    Starts(Started<'s>),
    /// The agent is not there; `uname -s` and `uname -m` follow.
    Missing(Started<'s>),
    /// The command ended without a word of its own.
    Ended(Started<'s>),
}

impl<'s> Probe<'s> {
    /// Runs the probe of the agent `file` through `through`: it execs the
    /// agent if the host has it, else says it is missing and what the
    /// host is. `prelude` is written at once (see [`start_agent`]).
    ///
    /// Through the login shell, the probe is one line that any common
    /// shell runs as is (sh, bash, zsh, ksh, fish, csh): no `sh` starts
    /// before the agent.
    async fn run(
        session: &'s Session,
        file: &str,
        through: Through,
        prelude: &[u8],
    ) -> Result<Probe<'s>, RemoteError> {
        let command = format!(
            "test -x {f} && echo {AGENT_STARTS} && exec {f} agent; \
             echo {AGENT_MISSING}; uname -s; uname -m",
            f = shell_quote(file)
        );
        let mut started =
            Started::spawn(session, command, through, "cannot start the agent").await?;
        started.send_prelude(prelude).await;
        Ok(match started.first_line().await? {
            Some(line) if line == AGENT_STARTS => Probe::Starts(started),
            Some(_) => Probe::Missing(started),
            None => Probe::Ended(started),
        })
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
/// command: exactly its size is read off stdin (`head -c`, which reads no
/// further), and what follows on stdin is the agent protocol.
async fn upload_and_start<'s>(
    session: &'s Session,
    own: &OwnExecutable,
    dir: &str,
    file: &str,
    prelude: &[u8],
) -> Result<RunningAgent<'s>, RemoteError> {
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
    let mut started =
        Started::spawn(session, script, Through::Sh, "cannot upload the agent").await?;
    let copied = tokio::io::copy(&mut (&mut local).take(size), &mut started.stdin).await;
    if let Err(err) = copied.and_then(|n| {
        if n == size {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{n} of {size} bytes sent")))
        }
    }) {
        let mut failed = started.unexpected(None).await;
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
        Some(line) if line == AGENT_STARTS => Ok(started.running(file.to_string(), true, false)),
        line => {
            let mut failed = started.unexpected(line).await;
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
struct Started<'s> {
    /// What it does, for errors.
    what: &'static str,
    child: openssh::Child<&'s Session>,
    stdin: openssh::ChildStdin,
    stdout: BufReader<openssh::ChildStdout>,
    stderr: openssh::ChildStderr,
}

impl<'s> Started<'s> {
    /// Runs `script` on the host, through `through`.
    async fn spawn(
        session: &'s Session,
        script: String,
        through: Through,
        what: &'static str,
    ) -> Result<Started<'s>, RemoteError> {
        let failed = |detail: String| RemoteError::Command { what, detail };
        let mut command = match through {
            Through::Login => session.raw_command(script),
            Through::Sh => session.shell(script),
        };
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
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr,
        })
    }

    /// Writes `prelude` to the command's stdin. A failure is left for the
    /// answer to tell (the command ended: it says why on stderr).
    async fn send_prelude(&mut self, prelude: &[u8]) {
        if !prelude.is_empty() {
            let _ = self.stdin.write_all(prelude).await;
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

    /// The agent started: its stdio.
    fn running(self, path: String, uploaded: bool, through_sh: bool) -> RunningAgent<'s> {
        RunningAgent {
            child: self.child,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            path,
            uploaded,
            through_sh,
        }
    }

    /// The error of a command that did not answer as expected: what it
    /// said instead (`line`), its stderr and its exit status.
    async fn unexpected(mut self, line: Option<String>) -> RemoteError {
        drop(self.stdin);
        let mut stderr = Vec::new();
        let _ = tokio::time::timeout(
            START_TIMEOUT,
            (&mut self.stderr)
                .take(MAX_LOGIN_NOISE as u64)
                .read_to_end(&mut stderr),
        )
        .await;
        let status = match tokio::time::timeout(START_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "still running".to_string(),
        };
        let stderr = String::from_utf8_lossy(&stderr);
        let said = match line {
            Some(line) => format!("unexpected answer {line:?}"),
            None => "no answer".to_string(),
        };
        RemoteError::Command {
            what: self.what,
            detail: format!("{said} ({status}): {}", stderr.trim()),
        }
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
