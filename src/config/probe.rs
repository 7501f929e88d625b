//! Looks on this machine for what a config names: programs, working
//! directories, files and SSH hosts.
//!
//! `taskherd check` uses it through [`super::Config::load_and_check`], and
//! a spawn that failed uses it to say why (`exec` reports a missing
//! working directory and a missing program alike, as "No such file or
//! directory").

use super::{CheckOptions, ConfigError, HostSpec, SshOptions};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Why a working directory cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirProblem {
    /// Nothing at that path (or a file on the way to it).
    Missing,
    /// Something that is not a directory.
    NotADirectory,
    /// It exists, but could not be looked at.
    Unreadable(String),
}

impl fmt::Display for DirProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirProblem::Missing => write!(f, "does not exist"),
            DirProblem::NotADirectory => write!(f, "is not a directory"),
            DirProblem::Unreadable(why) => write!(f, "cannot be used: {why}"),
        }
    }
}

/// Why a program cannot be started.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgramProblem {
    /// A path with a `/` that leads nowhere.
    Missing,
    /// A bare name that no directory of `PATH` holds.
    NotInPath {
        /// The `PATH` searched.
        path: String,
    },
    /// The path is a directory (the one found in `PATH`, for a bare name).
    Directory(Option<PathBuf>),
    /// The file has no execute permission (the one found in `PATH`, for a
    /// bare name).
    NotExecutable(Option<PathBuf>),
    /// The file is there and executable, yet `exec` found no such file:
    /// the interpreter of its `#!` line (or its ELF loader) is missing.
    /// The file found in `PATH`, for a bare name.
    NoInterpreter(Option<PathBuf>),
}

impl fmt::Display for ProgramProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProgramProblem::Missing => write!(f, "no such file"),
            ProgramProblem::NotInPath { path } => write!(
                f,
                "not found in PATH ({path}); write its path, or set PATH in the group's env"
            ),
            ProgramProblem::Directory(found) => {
                write!(f, "{} a directory, not a program", subject(found, "it is"))
            }
            ProgramProblem::NotExecutable(found) => write!(
                f,
                "permission denied: {} not executable (chmod +x it)",
                subject(found, "it is")
            ),
            ProgramProblem::NoInterpreter(found) => write!(
                f,
                "{} there, but not its interpreter (check its #! line)",
                subject(found, "the file is")
            ),
        }
    }
}

/// `PATH is` when the problem is with a file found in `PATH`, else
/// `default` (the program's own path is named before the problem).
fn subject(found: &Option<PathBuf>, default: &str) -> String {
    found.as_ref().map_or_else(
        || default.to_owned(),
        |path| format!("{} is", path.display()),
    )
}

/// Checks that `dir` exists and is a directory.
///
/// # Errors
/// What is wrong with it.
pub fn probe_dir(dir: &Path) -> Result<(), DirProblem> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(DirProblem::NotADirectory),
        Err(err)
            if err.kind() == std::io::ErrorKind::NotFound
                || err.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Err(DirProblem::Missing)
        }
        Err(err) => Err(DirProblem::Unreadable(err.to_string())),
    }
}

/// Finds the file `program` names, as `exec` would: a path with a `/` as
/// it is (a relative one against `cwd` when given, since the child changes
/// directory first), a bare name in the directories of `path_var`.
///
/// Whether the file is executable is judged by its mode (any execute
/// bit); a file executable by others only passes, and `exec` tells.
///
/// # Errors
/// Why `exec` would fail to find or run it.
pub fn probe_program(
    program: &Path,
    cwd: Option<&Path>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, ProgramProblem> {
    let text = program.as_os_str().as_encoded_bytes();
    if text.contains(&b'/') {
        let path = match cwd {
            Some(cwd) if program.is_relative() => cwd.join(program),
            _ => program.to_path_buf(),
        };
        return match executable(&path) {
            Some(Ok(())) => Ok(clean_path(&path)),
            Some(Err(problem)) => Err(problem(None)),
            None => Err(ProgramProblem::Missing),
        };
    }
    let path_var = path_var.map_or_else(
        || std::env::var_os("PATH").unwrap_or_default(),
        OsStr::to_os_string,
    );
    let mut not_executable = None;
    for dir in std::env::split_paths(&path_var) {
        let candidate = dir.join(program);
        match executable(&candidate) {
            Some(Ok(())) => return Ok(candidate),
            // exec goes on to the next directory, and fails with EACCES
            // if nothing better turns up.
            Some(Err(problem)) => {
                not_executable.get_or_insert(problem(Some(clean_path(&candidate))));
            }
            None => {}
        }
    }
    Err(not_executable.unwrap_or_else(|| ProgramProblem::NotInPath {
        path: path_var.to_string_lossy().into_owned(),
    }))
}

/// What is wrong with a file that exists: a directory, or no execute bit.
type FileProblem = fn(Option<PathBuf>) -> ProgramProblem;

/// `None` if there is no file at `path`, else whether it can be run.
fn executable(path: &Path) -> Option<Result<(), FileProblem>> {
    let meta = std::fs::metadata(path).ok()?;
    Some(if meta.is_dir() {
        Err(ProgramProblem::Directory)
    } else if meta.permissions().mode() & 0o111 == 0 {
        Err(ProgramProblem::NotExecutable)
    } else {
        Ok(())
    })
}

/// `path` without its `.` components (`/srv/./app` is `/srv/app`; a
/// leading `./` stays, since it makes a bare name a path). `..` is kept:
/// through a symlink it is not the lexical parent.
pub fn clean_path(path: &Path) -> PathBuf {
    let mut cleaned: PathBuf = path.components().collect();
    if cleaned.as_os_str().is_empty() {
        cleaned.push(Component::CurDir);
    }
    cleaned
}

/// `~` and `~/...` against the home directory `home`; other paths as they
/// are. `None` if `path` starts with `~` and there is no home.
pub fn expand_home(path: &str, home: Option<&Path>) -> Option<PathBuf> {
    if path == "~" {
        return home.map(Path::to_path_buf);
    }
    match path.strip_prefix("~/") {
        Some(rest) => home.map(|home| home.join(rest)),
        None => Some(PathBuf::from(path)),
    }
}

/// The home directory (`HOME`), for `~`.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// What [`probe_hosts`] found about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCheck {
    /// ssh_config gives it an address that resolves, or a proxy that
    /// reaches it.
    Ok,
    /// Something is wrong; the text says what.
    Problem(String),
    /// Not checked; the text says why (too slow, no `ssh` program).
    Skipped(String),
}

/// Checks each host as ssh would see it, without connecting: `ssh -G`
/// (with the configured ssh_config, user, port and jump host) evaluates
/// ssh_config, then the host name it gives is resolved, unless a proxy
/// reaches the host. All hosts at once, within `timeout` in all.
pub fn probe_hosts(hosts: &[(HostSpec, SshOptions)], timeout: Duration) -> Vec<HostCheck> {
    if hosts.is_empty() {
        return Vec::new();
    }
    // A runtime of its own, on a thread of its own: the caller may be
    // inside a runtime already (a runtime cannot block inside another).
    let checked = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|err| format!("hosts not checked: cannot start a runtime: {err}"))?;
                let checks = runtime.block_on(async {
                    let probes = hosts.iter().map(|(host, ssh)| async move {
                        match tokio::time::timeout(timeout, probe_host(host, ssh)).await {
                            Ok(check) => check,
                            Err(_) => HostCheck::Skipped(format!(
                                "not checked: ssh -G and the name lookup took over {}",
                                humantime::format_duration(timeout)
                            )),
                        }
                    });
                    futures::future::join_all(probes).await
                });
                // A name lookup stuck in the blocking pool must not hold us up.
                runtime.shutdown_background();
                Ok(checks)
            })
            .join()
    });
    match checked {
        Ok(Ok(checks)) => checks,
        Ok(Err(why)) => vec![HostCheck::Skipped(why); hosts.len()],
        Err(_) => {
            let why = "hosts not checked: the check panicked".to_owned();
            vec![HostCheck::Skipped(why); hosts.len()]
        }
    }
}

async fn probe_host(host: &HostSpec, ssh: &SshOptions) -> HostCheck {
    let mut command = tokio::process::Command::new("ssh");
    command.arg("-G");
    if let Some(file) = &ssh.config_file {
        command.arg("-F").arg(file);
    }
    if let Some(user) = &host.user {
        command.arg("-l").arg(user);
    }
    if let Some(port) = host.port {
        command.arg("-p").arg(port.to_string());
    }
    if let Some(jump) = &ssh.jump_host {
        command.arg("-J").arg(jump);
    }
    command
        .arg("--")
        .arg(&host.name)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match command.output().await {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return HostCheck::Skipped("not checked: no ssh program in PATH".to_owned())
        }
        Err(err) => return HostCheck::Skipped(format!("not checked: cannot run ssh -G: {err}")),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .unwrap_or("no message");
        return HostCheck::Problem(format!("ssh -G {} fails: {why}", host.name));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let option = |name: &str| {
        stdout.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().to_owned())
        })
    };
    let proxied = ["proxyjump", "proxycommand"]
        .iter()
        .any(|name| option(name).is_some_and(|value| value != "none"));
    if proxied {
        // Only the proxy needs to resolve the name.
        return HostCheck::Ok;
    }
    let hostname = option("hostname").unwrap_or_else(|| host.name.clone());
    let port = option("port")
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or(22);
    let found = tokio::net::lookup_host((hostname.as_str(), port))
        .await
        .map(|mut addresses| addresses.next().is_some());
    match found {
        Ok(true) => HostCheck::Ok,
        Ok(false) => HostCheck::Problem(format!("host name {hostname} has no address")),
        Err(err) if hostname == host.name => {
            HostCheck::Problem(format!("cannot resolve host name {hostname}: {err}"))
        }
        Err(err) => HostCheck::Problem(format!(
            "cannot resolve host name {hostname} (the HostName ssh_config gives {}): {err}",
            host.name
        )),
    }
}

/// Where a key is written, for errors found after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spot {
    /// Index of the file among the config's files (0: the main one).
    pub(super) source: usize,
    pub(super) file: PathBuf,
    pub(super) line: usize,
    pub(super) column: usize,
    pub(super) key: String,
}

impl Spot {
    /// The error `message` at this spot, with its file's index.
    pub(super) fn error(&self, message: impl Into<String>) -> (usize, ConfigError) {
        (
            self.source,
            ConfigError {
                file: self.file.clone(),
                line: self.line,
                column: self.column,
                key: self.key.clone(),
                message: message.into(),
            },
        )
    }
}

/// Something a config names that `taskherd check` looks for on this
/// machine.
#[derive(Debug, Clone)]
pub(super) enum Probe {
    /// The program of a group with instances on this machine.
    Program {
        at: Spot,
        /// Resolved against its file's directory, or a bare name.
        program: PathBuf,
        /// The directory a relative path was resolved against, for the
        /// hint when it is missing.
        relative_to: Option<PathBuf>,
        /// The group's own `PATH`, if its `env` sets one.
        path_var: Option<String>,
    },
    /// The working directory of a group with instances on this machine.
    Dir { at: Spot, dir: PathBuf },
    /// A local file of the ssh settings.
    File {
        at: Spot,
        path: PathBuf,
        /// What it is, in errors: "identity file".
        what: &'static str,
    },
    /// A remote host, with the ssh settings it is reached with.
    Host {
        at: Spot,
        host: HostSpec,
        ssh: SshOptions,
    },
}

/// Looks for everything `probes` names: the errors found (with their
/// files' indexes), and notes on what was not checked.
pub(super) fn run(
    probes: &[Probe],
    options: &CheckOptions,
) -> (Vec<(usize, ConfigError)>, Vec<String>) {
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let mut hosts: Vec<(&Spot, HostSpec, SshOptions)> = Vec::new();
    for probe in probes {
        match probe {
            Probe::Program {
                at,
                program,
                relative_to,
                path_var,
            } => {
                let path_var = path_var.as_deref().map(OsStr::new);
                if let Err(problem) = probe_program(program, None, path_var) {
                    let mut message = format!("cannot start {}: {problem}", program.display());
                    if let (ProgramProblem::Missing, Some(dir)) = (&problem, relative_to) {
                        message.push_str(&format!(
                            " (a command with a '/' is relative to the directory of {}, {})",
                            at.file.display(),
                            dir.display()
                        ));
                    }
                    errors.push(at.error(message));
                }
            }
            Probe::Dir { at, dir } => {
                if let Err(problem) = probe_dir(dir) {
                    let message = format!("working directory {} {problem}", dir.display());
                    errors.push(at.error(message));
                }
            }
            Probe::File { at, path, what } => match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => errors.push(at.error(format!("{what} {} is not a file", path.display()))),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    errors.push(at.error(format!("{what} {} does not exist", path.display())));
                }
                Err(err) => {
                    errors.push(at.error(format!("cannot read {what} {}: {err}", path.display())));
                }
            },
            Probe::Host { at, host, ssh } => {
                // One check per host and settings, reported where first named.
                let same = |(_, h, s): &(&Spot, HostSpec, SshOptions)| {
                    h.name == host.name && h.user == host.user && h.port == host.port && s == ssh
                };
                if !hosts.iter().any(same) {
                    hosts.push((at, host.clone(), ssh.clone()));
                }
            }
        }
    }
    if options.hosts && !hosts.is_empty() {
        let targets: Vec<(HostSpec, SshOptions)> = hosts
            .iter()
            .map(|(_, host, ssh)| (host.clone(), ssh.clone()))
            .collect();
        let checks = probe_hosts(&targets, options.host_timeout);
        for ((at, host, _), check) in hosts.iter().zip(checks) {
            match check {
                HostCheck::Ok => {}
                HostCheck::Problem(why) => {
                    errors.push(at.error(format!("host {}: {why}", host.label)));
                }
                HostCheck::Skipped(why) => notes.push(format!(
                    "{}:{}:{}: {}: host {}: {why}",
                    at.file.display(),
                    at.line,
                    at.column,
                    at.key,
                    host.label
                )),
            }
        }
    }
    (errors, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe_dir(dir.path()), Ok(()));
        assert_eq!(
            probe_dir(&dir.path().join("nope")),
            Err(DirProblem::Missing)
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(probe_dir(&file), Err(DirProblem::NotADirectory));
        assert_eq!(probe_dir(&file.join("below")), Err(DirProblem::Missing));
    }

    #[test]
    fn programs_by_path_and_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            probe_program(&script, None, None),
            Err(ProgramProblem::NotExecutable(None))
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(probe_program(&script, None, None), Ok(script.clone()));
        // Relative paths are the child's: against its working directory.
        assert_eq!(
            probe_program("./run.sh".as_ref(), Some(dir.path()), None),
            Ok(script.clone())
        );
        assert_eq!(
            probe_program(&dir.path().join("gone"), None, None),
            Err(ProgramProblem::Missing)
        );
        assert_eq!(
            probe_program(dir.path(), None, None),
            Err(ProgramProblem::Directory(None))
        );
        let path_var =
            std::env::join_paths(["/nonexistent", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(
            probe_program("run.sh".as_ref(), None, Some(&path_var)),
            Ok(script.clone())
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            probe_program("run.sh".as_ref(), None, Some(&path_var)),
            Err(ProgramProblem::NotExecutable(Some(script.clone())))
        );
        match probe_program("no-such-program".as_ref(), None, Some(&path_var)) {
            Err(ProgramProblem::NotInPath { path }) => assert!(path.contains("/nonexistent")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clean_and_expand() {
        assert_eq!(clean_path("././bin/x".as_ref()), PathBuf::from("./bin/x"));
        assert_eq!(
            clean_path("/srv/./app/.".as_ref()),
            PathBuf::from("/srv/app")
        );
        assert_eq!(clean_path("a/../b".as_ref()), PathBuf::from("a/../b"));
        let home = Path::new("/home/u");
        assert_eq!(expand_home("~", Some(home)), Some(PathBuf::from("/home/u")));
        assert_eq!(
            expand_home("~/app", Some(home)),
            Some(PathBuf::from("/home/u/app"))
        );
        assert_eq!(expand_home("~/app", None), None);
        assert_eq!(
            expand_home("~other/app", Some(home)),
            Some(PathBuf::from("~other/app"))
        );
        assert_eq!(expand_home("a/~", None), Some(PathBuf::from("a/~")));
    }
}
