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
use tokio::io::AsyncWriteExt;

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
        Ok(Err(err)) => Err(RemoteError::Connect(describe_ssh_error(&err))),
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

/// Where the agent is on a host, and whether it was just uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledAgent {
    /// Remote path of the `taskherd` executable.
    pub path: String,
    /// `true` when this call uploaded it.
    pub uploaded: bool,
}

/// Makes sure the host has an agent of exactly this build and says where:
/// an `agent_path` is used as is; otherwise the agent lives
/// in `agent_dir` as `taskherd-<version>-<hash>` and is uploaded (and its
/// hash checked) when missing, if the host's OS and architecture match.
///
/// # Errors
/// [`RemoteError::Platform`] on a mismatch, [`RemoteError::Command`] when
/// the check or the upload fails.
pub async fn install_agent(
    session: &Session,
    agent_dir: &str,
    agent_path: Option<&str>,
) -> Result<InstalledAgent, RemoteError> {
    if let Some(path) = agent_path {
        return Ok(InstalledAgent {
            path: path.to_string(),
            uploaded: false,
        });
    }
    let own = own_executable().await?;
    let dir = agent_dir.strip_prefix("~/").unwrap_or(agent_dir);
    let file = format!(
        "{dir}/taskherd-{}-{}",
        env!("CARGO_PKG_VERSION"),
        &own.sha256[..16]
    );
    let probe = format!(
        "if [ -x {f} ]; then echo present; else echo missing; uname -s; uname -m; fi",
        f = shell_quote(&file)
    );
    let output = session
        .shell(probe)
        .output()
        .await
        .map_err(|err| RemoteError::Command {
            what: "cannot look for the agent",
            detail: err.to_string(),
        })?;
    let answer = String::from_utf8_lossy(&output.stdout);
    let mut lines = answer.lines();
    match lines.next() {
        Some("present") => {
            return Ok(InstalledAgent {
                path: file,
                uploaded: false,
            })
        }
        Some("missing") => {}
        _ => {
            return Err(RemoteError::Command {
                what: "cannot look for the agent",
                detail: format!(
                    "unexpected answer {:?} ({})",
                    answer.trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
        }
    }
    let remote_os = lines.next().unwrap_or_default().trim().to_lowercase();
    let remote_arch = lines.next().unwrap_or_default().trim().to_string();
    let arch_matches = remote_arch == std::env::consts::ARCH
        || (std::env::consts::ARCH == "aarch64" && remote_arch == "arm64");
    if remote_os != std::env::consts::OS || !arch_matches {
        return Err(RemoteError::Platform {
            remote: format!("{remote_os} {remote_arch}"),
            local: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            version: env!("CARGO_PKG_VERSION"),
        });
    }
    upload(session, own, dir, &file).await?;
    Ok(InstalledAgent {
        path: file,
        uploaded: true,
    })
}

async fn upload(
    session: &Session,
    own: &OwnExecutable,
    dir: &str,
    file: &str,
) -> Result<(), RemoteError> {
    // Written under a temporary name and renamed: a concurrent master or an
    // interrupted upload never leaves a half file under the final name.
    let script = format!(
        "set -e; umask 077; mkdir -p {dir}; t={file}.part.$$; cat > \"$t\"; chmod 700 \"$t\"; \
         if command -v sha256sum >/dev/null 2>&1; then \
           h=$(sha256sum \"$t\" | cut -d' ' -f1); \
           if [ \"$h\" != {hash} ]; then rm -f \"$t\"; echo \"hash mismatch: $h\" >&2; exit 3; fi; \
         fi; mv -f \"$t\" {file}",
        dir = shell_quote(dir),
        file = shell_quote(file),
        hash = shell_quote(&own.sha256),
    );
    let upload_failed = |detail: String| RemoteError::Command {
        what: "cannot upload the agent",
        detail,
    };
    let mut child = session
        .shell(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .await
        .map_err(|err| upload_failed(err.to_string()))?;
    let mut stdin = child
        .stdin()
        .take()
        .ok_or_else(|| upload_failed("no stdin".into()))?;
    let mut local =
        tokio::fs::File::open(&own.path)
            .await
            .map_err(|source| RemoteError::OwnExecutable {
                path: own.path.clone(),
                source,
            })?;
    tokio::io::copy(&mut local, &mut stdin)
        .await
        .map_err(|err| upload_failed(err.to_string()))?;
    stdin
        .shutdown()
        .await
        .map_err(|err| upload_failed(err.to_string()))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .await
        .map_err(|err| upload_failed(err.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(upload_failed(format!(
            "{} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        )))
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
