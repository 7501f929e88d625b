//! SSH for remote placements: one OpenSSH ControlMaster connection per
//! host (through the `openssh` crate, so `~/.ssh/config`, ssh-agent,
//! ProxyJump and known_hosts work as with plain `ssh`), and the agent
//! binary on the host, uploaded when missing.

use crate::config::{HostSpec, KnownHostsPolicy, SshOptions, DEFAULT_CONNECT_TIMEOUT};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
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

/// Opens the ControlMaster connection to `host`.
///
/// # Errors
/// [`RemoteError::Connect`] with ssh's message, lowercased: `connection
/// refused`, `host key verification failed`, `permission denied
/// (publickey)`...
pub async fn connect(
    host: &HostSpec,
    options: &SshOptions,
    control_dir: &Path,
    keepalive: Duration,
) -> Result<Session, RemoteError> {
    let mut builder = SessionBuilder::default();
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    builder
        .known_hosts_check(match options.known_hosts {
            KnownHostsPolicy::Strict => KnownHosts::Strict,
            KnownHostsPolicy::AcceptNew => KnownHosts::Add,
        })
        .connect_timeout(connect_timeout)
        .server_alive_interval(keepalive.max(Duration::from_secs(1)))
        .control_directory(control_dir)
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(CONTROL_PERSIST_SECS).unwrap_or(NonZeroUsize::MIN),
        ));
    if let Some(user) = &host.user {
        builder.user(user.clone());
    }
    if let Some(port) = host.port {
        builder.port(port);
    }
    if let Some(file) = &options.config_file {
        builder.config_file(file);
    }
    if let Some(key) = &options.identity_file {
        builder.keyfile(key);
    }
    if let Some(jump) = &options.jump_host {
        builder.jump_hosts([jump]);
    }
    // ssh's ConnectTimeout covers the TCP connect only; a host that
    // accepts and then stalls is bounded here.
    let limit = connect_timeout * 2 + Duration::from_secs(5);
    match tokio::time::timeout(limit, builder.connect(&host.name)).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(err)) => {
            let text = describe_ssh_error(&err);
            // sshd past MaxStartups closes the connection at once, before
            // its banner: ssh says so from `kex_exchange_identification`.
            if text.contains("kex_exchange_identification") {
                Err(RemoteError::Refused(text))
            } else {
                Err(RemoteError::Connect(text))
            }
        }
        Err(_) => Err(RemoteError::Connect(format!(
            "no answer within {}",
            humantime::format_duration(limit)
        ))),
    }
}

/// ssh's message for a failed connection, without the noise.
fn describe_ssh_error(err: &openssh::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(cause) = source {
        text = cause.to_string();
        source = cause.source();
    }
    // ssh may print a banner of warnings first (a changed host key comes
    // with a box of '@'); its verdict is the last line.
    let text = text
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or("ssh failed without a message")
        .trim_end_matches('.');
    let text = text.strip_prefix("ssh: ").unwrap_or(text);
    let mut text = text.to_string();
    if let Some(first) = text.get(..1) {
        let lower = first.to_lowercase();
        text.replace_range(..1, &lower);
    }
    text
}

/// Our own executable, its hash and the name it gets on remote hosts.
#[derive(Debug)]
struct OwnExecutable {
    path: PathBuf,
    sha256: String,
}

static OWN_EXECUTABLE: OnceLock<OwnExecutable> = OnceLock::new();

async fn own_executable() -> Result<&'static OwnExecutable, RemoteError> {
    if let Some(own) = OWN_EXECUTABLE.get() {
        return Ok(own);
    }
    let path = std::env::current_exe().map_err(|source| RemoteError::OwnExecutable {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let read_path = path.clone();
    let bytes = tokio::fs::read(&read_path)
        .await
        .map_err(|source| RemoteError::OwnExecutable {
            path: path.clone(),
            source,
        })?;
    let sha256 =
        tokio::task::spawn_blocking(move || crate::error_text::hex(&Sha256::digest(&bytes)))
            .await
            .map_err(|err| RemoteError::OwnExecutable {
                path: path.clone(),
                source: std::io::Error::other(err),
            })?;
    Ok(OWN_EXECUTABLE.get_or_init(|| OwnExecutable { path, sha256 }))
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
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
}

/// Starts the agent on the host in **one remote command** when it is
/// there (each command pays the login's shell rc files): a short script
/// starts the agent of exactly this build if the host has it, else says
/// what the host is; then, if the OS and architecture match, **one more
/// command** uploads it and starts it, the executable and then the agent
/// protocol on the same stdin. An `agent_path` is started as is. The
/// agent lives in `agent_dir` as `taskherd-<version>-<hash>`; an upload
/// is written under a temporary name, checked (size, and SHA-256 where
/// `sha256sum` exists) and renamed.
///
/// Lines the login prints on stdout before the script's own (rc files
/// that echo) are skipped, up to 64 KiB.
///
/// # Errors
/// [`RemoteError::Platform`] on a mismatch, [`RemoteError::Command`] when
/// a command fails or says something unexpected (with its stderr),
/// [`RemoteError::OwnExecutable`] when our executable cannot be read.
pub async fn start_agent<'s>(
    session: &'s Session,
    agent_dir: &str,
    agent_path: Option<&str>,
) -> Result<RunningAgent<'s>, RemoteError> {
    if let Some(path) = agent_path {
        let script = format!(
            "f={f}; if [ -x \"$f\" ]; then echo {AGENT_STARTS}; exec \"$f\" agent; fi; \
             echo \"master.agent_path $f is not an executable file on this host\" >&2; exit 127",
            f = shell_quote(path)
        );
        let mut started = Started::spawn(session, script, "cannot start the agent").await?;
        return match started.first_line().await? {
            Some(line) if line == AGENT_STARTS => Ok(started.running(path.to_string(), false)),
            line => Err(started.unexpected(line).await),
        };
    }
    let own = own_executable().await?;
    let dir = agent_dir.strip_prefix("~/").unwrap_or(agent_dir);
    let file = format!(
        "{dir}/taskherd-{}-{}",
        env!("CARGO_PKG_VERSION"),
        &own.sha256[..16]
    );
    let script = format!(
        "f={f}; if [ -x \"$f\" ]; then echo {AGENT_STARTS}; exec \"$f\" agent; fi; \
         echo {AGENT_MISSING}; uname -s; uname -m",
        f = shell_quote(&file)
    );
    let mut probe = Started::spawn(session, script, "cannot look for the agent").await?;
    match probe.first_line().await? {
        Some(line) if line == AGENT_STARTS => return Ok(probe.running(file, false)),
        Some(line) if line == AGENT_MISSING => {}
        line => return Err(probe.unexpected(line).await),
    }
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
    upload_and_start(session, own, dir, &file).await
}

/// Uploads our executable as `file` and starts it as the agent, in one
/// command: exactly its size is read off stdin (`head -c`, which reads no
/// further), and what follows on stdin is the agent protocol.
async fn upload_and_start<'s>(
    session: &'s Session,
    own: &OwnExecutable,
    dir: &str,
    file: &str,
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
           h=$(sha256sum \"$t\" | cut -d' ' -f1); \
           if [ \"$h\" != {hash} ]; then rm -f \"$t\"; echo \"hash mismatch: $h\" >&2; exit 3; fi; \
         fi; mv -f \"$t\" {file}; echo {AGENT_STARTS}; exec {file} agent",
        dir = shell_quote(dir),
        file = shell_quote(file),
        hash = shell_quote(&own.sha256),
    );
    let mut started = Started::spawn(session, script, "cannot upload the agent").await?;
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
    started
        .stdin
        .flush()
        .await
        .map_err(|err| RemoteError::Command {
            what: started.what,
            detail: err.to_string(),
        })?;
    match started.first_line().await? {
        Some(line) if line == AGENT_STARTS => Ok(started.running(file.to_string(), true)),
        line => Err(started.unexpected(line).await),
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
    /// Runs `script` through the login's shell.
    async fn spawn(
        session: &'s Session,
        script: String,
        what: &'static str,
    ) -> Result<Started<'s>, RemoteError> {
        let failed = |detail: String| RemoteError::Command { what, detail };
        let mut child = session
            .shell(script)
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
    fn running(self, path: String, uploaded: bool) -> RunningAgent<'s> {
        RunningAgent {
            child: self.child,
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            path,
            uploaded,
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
    }
}
