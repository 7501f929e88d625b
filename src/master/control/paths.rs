//! The runtime directory, the socket's name and the master's lock file.

use super::ControlError;
use crate::error_text::hex;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the directory taskherd creates in `$XDG_RUNTIME_DIR` or `/run`.
pub const RUNTIME_DIR_NAME: &str = "taskherd";

/// How many hex digits of the config path's sha256 name the socket.
const HASH_HEX_LEN: usize = 12;

/// Longest config file stem kept in the socket name (a unix socket path is
/// limited to 107 bytes).
const STEM_MAX_LEN: usize = 40;

/// Attempts at the master's lock before giving up: a command probing
/// whether a lock is held holds it (shared) for a few microseconds.
const LOCK_ATTEMPTS: u32 = 5;

/// Pause between two attempts at the lock.
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// Where the control sockets of this user live: `$XDG_RUNTIME_DIR/taskherd`
/// when it is set (and absolute), else `/run/taskherd` for root when `/run`
/// is writable, else `/tmp/taskherd-<uid>`. Nothing is created here.
pub fn runtime_dir() -> PathBuf {
    let euid = effective_uid();
    runtime_dir_from(
        std::env::var_os("XDG_RUNTIME_DIR"),
        euid,
        euid == 0 && run_is_writable(),
    )
}

/// The control socket of the master of `config`, in [`runtime_dir`].
///
/// # Errors
/// [`ControlError::Config`] if `config` cannot be canonicalized (it must
/// exist).
pub fn socket_path(config: &Path) -> Result<PathBuf, ControlError> {
    let canonical = canonical_config(config)?;
    Ok(runtime_dir().join(format!("{}.sock", socket_stem(&canonical))))
}

pub(super) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() }
}

fn run_is_writable() -> bool {
    // SAFETY: a NUL-terminated literal; access(2) only reads it.
    unsafe { libc::access(c"/run".as_ptr(), libc::W_OK) == 0 }
}

fn runtime_dir_from(xdg: Option<OsString>, euid: u32, run_writable: bool) -> PathBuf {
    if let Some(xdg) = xdg.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join(RUNTIME_DIR_NAME);
    }
    if euid == 0 && run_writable {
        return Path::new("/run").join(RUNTIME_DIR_NAME);
    }
    PathBuf::from(format!("/tmp/taskherd-{euid}"))
}

/// Where a command looks for masters: [`runtime_dir`] first, then the
/// other places a master of this user may have chosen (one started by
/// systemd without `XDG_RUNTIME_DIR`, say).
pub(super) fn candidate_dirs() -> Vec<PathBuf> {
    let euid = effective_uid();
    let mut dirs = vec![runtime_dir()];
    if euid == 0 {
        dirs.push(Path::new("/run").join(RUNTIME_DIR_NAME));
    }
    dirs.push(runtime_dir_from(None, euid, false));
    let mut unique = Vec::new();
    for dir in dirs {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

pub(super) fn canonical_config(config: &Path) -> Result<PathBuf, ControlError> {
    fs::canonicalize(config).map_err(|source| ControlError::Config {
        path: config.to_owned(),
        source,
    })
}

/// `<stem>-<12 hex>`: the socket's and the lock's name without extension.
pub(super) fn socket_stem(canonical_config: &Path) -> String {
    let stem = canonical_config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(STEM_MAX_LEN)
        .collect();
    if clean.is_empty() {
        clean.push_str("herd");
    }
    let digest = Sha256::digest(canonical_config.as_os_str().as_bytes());
    let hash = hex(&digest);
    format!("{clean}-{}", &hash[..HASH_HEX_LEN])
}

/// Creates `dir` (mode 0700) if needed and checks it.
pub(super) fn ensure_runtime_dir(dir: &Path) -> Result<(), ControlError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(ControlError::RuntimeDir {
                path: dir.to_owned(),
                source,
            })
        }
    }
    check_runtime_dir(dir)
}

/// Refuses a runtime directory that is a symlink, belongs to someone else
/// or is writable by group or others.
pub(super) fn check_runtime_dir(dir: &Path) -> Result<(), ControlError> {
    let meta = fs::symlink_metadata(dir).map_err(|source| ControlError::RuntimeDir {
        path: dir.to_owned(),
        source,
    })?;
    let insecure = |reason: String| ControlError::InsecureRuntimeDir {
        path: dir.to_owned(),
        reason,
    };
    if !meta.is_dir() {
        return Err(insecure("not a directory".into()));
    }
    let euid = effective_uid();
    if meta.uid() != euid {
        return Err(insecure(format!(
            "owned by uid {}, not by uid {euid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(insecure(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// What a lock file says about its master.
#[derive(Debug, Default, PartialEq)]
pub(super) struct LockInfo {
    pub(super) pid: Option<u32>,
    pub(super) config: Option<PathBuf>,
}

/// `<pid>\n<config path>\n`.
fn lock_text(pid: u32, config: &Path) -> Vec<u8> {
    let mut text = format!("{pid}\n").into_bytes();
    text.extend_from_slice(config.as_os_str().as_bytes());
    text.push(b'\n');
    text
}

fn parse_lock(bytes: &[u8]) -> LockInfo {
    let (first, rest) = match bytes.iter().position(|&b| b == b'\n') {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &[][..]),
    };
    let pid = std::str::from_utf8(first)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
    let config =
        (!rest.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(rest).to_owned()));
    LockInfo { pid, config }
}

pub(super) fn read_lock(path: &Path) -> LockInfo {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => parse_lock(&bytes),
        Err(_) => LockInfo::default(),
    }
}

/// `flock(op | LOCK_NB)`: `Ok(false)` if someone else holds a conflicting
/// lock after `attempts` tries.
fn try_flock(file: &File, op: libc::c_int, attempts: u32) -> io::Result<bool> {
    let mut left = attempts;
    loop {
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                left = left.saturating_sub(1);
                if left == 0 {
                    return Ok(false);
                }
                std::thread::sleep(LOCK_RETRY);
            }
            _ => return Err(err),
        }
    }
}

/// Whether a live master holds the lock at `path` (probed with a shared
/// lock, released at once).
pub(super) fn lock_is_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match try_flock(&file, libc::LOCK_SH, 1) {
        Ok(got) => !got,
        Err(err) => {
            tracing::debug!(path = %path.display(), cause = %err, "cannot probe a lock");
            false
        }
    }
}

/// Takes the master's lock at `path` and writes our pid and `config` in it.
pub(super) fn lock_master(path: &Path, config: &Path) -> Result<File, ControlError> {
    let lock_err = |source| ControlError::Lock {
        path: path.to_owned(),
        source,
    };
    // A master that exits unlinks its lock file before closing it: a lock
    // won on such an unlinked file is worthless, so check we locked the
    // file that the path names, and start over if not.
    for _ in 0..LOCK_ATTEMPTS {
        // Std opens with O_CLOEXEC: instances never inherit the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(lock_err)?;
        if !try_flock(&file, libc::LOCK_EX, LOCK_ATTEMPTS).map_err(lock_err)? {
            let mut info = read_lock(path);
            for _ in 0..LOCK_ATTEMPTS {
                if info.pid.is_some() {
                    break;
                }
                // It has the lock but has not written its pid yet.
                std::thread::sleep(LOCK_RETRY);
                info = read_lock(path);
            }
            return Err(ControlError::AlreadyRunning {
                pid: info.pid,
                config: config.to_owned(),
                lock: path.to_owned(),
            });
        }
        let ours = file.metadata().map_err(lock_err)?;
        match fs::metadata(path) {
            Ok(named) if named.dev() == ours.dev() && named.ino() == ours.ino() => {}
            _ => continue,
        }
        file.set_len(0).map_err(lock_err)?;
        file.write_all(&lock_text(std::process::id(), config))
            .map_err(lock_err)?;
        return Ok(file);
    }
    Err(lock_err(io::Error::other(
        "the lock file keeps being replaced",
    )))
}

/// Refuses to start when a live master of the same config holds its lock
/// in one of `dirs` (another runtime directory: a master started by
/// systemd without `XDG_RUNTIME_DIR` and one started from a login shell
/// choose different directories). `our_lock` is the lock we hold, which is
/// skipped if one of `dirs` leads to it.
///
/// Called after taking our own lock, so that of two masters starting at
/// once in two directories, at least one sees the other: never both run
/// (both may refuse, in a tight race).
pub(super) fn refuse_other_masters(
    dirs: &[PathBuf],
    stem: &str,
    our_lock: &File,
    config: &Path,
) -> Result<(), ControlError> {
    let ours = our_lock.metadata().ok();
    for dir in dirs {
        if check_runtime_dir(dir).is_err() {
            // Missing, or not ours: no master of ours can be there.
            continue;
        }
        let lock = dir.join(format!("{stem}.lock"));
        let Ok(theirs) = fs::metadata(&lock) else {
            continue;
        };
        let same_file = ours
            .as_ref()
            .is_some_and(|ours| ours.dev() == theirs.dev() && ours.ino() == theirs.ino());
        if same_file || !lock_is_held(&lock) {
            continue;
        }
        return Err(ControlError::AlreadyRunning {
            pid: read_lock(&lock).pid,
            config: config.to_owned(),
            lock,
        });
    }
    Ok(())
}

/// The socket and lock files, removed on drop (the lock file before its
/// lock is released, see [`lock_master`]).
#[derive(Debug)]
pub(super) struct SocketFiles {
    pub(super) socket: PathBuf,
    pub(super) lock: PathBuf,
    /// Holds the `flock` while the master lives.
    pub(super) _lock_file: File,
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in [&self.socket, &self.lock] {
            if let Err(err) = fs::remove_file(path) {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), cause = %err, "cannot remove");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{second_config, setup};
    use super::super::ControlSocket;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_name_is_stem_and_hash_of_the_canonical_path() {
        let path = Path::new("/etc/taskherd/herd.toml");
        let stem = socket_stem(path);
        let hash = hex(&Sha256::digest(b"/etc/taskherd/herd.toml"));
        assert_eq!(stem, format!("herd-{}", &hash[..12]));
        let odd = socket_stem(Path::new("/srv/my herd!.toml"));
        assert!(odd.starts_with("my_herd_-"), "{odd}");
        let long = socket_stem(&Path::new("/x").join("a".repeat(200)));
        assert_eq!(long.len(), STEM_MAX_LEN + 1 + HASH_HEX_LEN);
        assert_ne!(
            socket_stem(Path::new("/a/herd.toml")),
            socket_stem(Path::new("/b/herd.toml"))
        );
    }

    #[test]
    fn runtime_dir_choice() {
        let xdg = Some(OsString::from("/run/user/1000"));
        assert_eq!(
            runtime_dir_from(xdg, 1000, false),
            Path::new("/run/user/1000/taskherd")
        );
        let relative = Some(OsString::from("run"));
        assert_eq!(
            runtime_dir_from(relative, 1000, false),
            Path::new("/tmp/taskherd-1000")
        );
        assert_eq!(runtime_dir_from(None, 0, true), Path::new("/run/taskherd"));
        assert_eq!(
            runtime_dir_from(None, 0, false),
            Path::new("/tmp/taskherd-0")
        );
    }

    #[test]
    fn insecure_runtime_dir_is_refused() {
        let setup = setup();
        fs::create_dir(&setup.dir).unwrap();
        fs::set_permissions(&setup.dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap_err();
        assert!(
            matches!(err, ControlError::InsecureRuntimeDir { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("writable by others"), "{err}");
    }

    #[test]
    fn a_second_master_is_refused_with_the_first_ones_pid() {
        let setup = setup();
        let _first = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap();
        let err = ControlSocket::bind_in(&setup.dir, &setup.config).unwrap_err();
        let config = fs::canonicalize(&setup.config).unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "another master (pid {}) already runs {}",
                std::process::id(),
                config.display()
            )
        );
        // Another config is another master.
        let other = second_config(&setup, "other.toml");
        ControlSocket::bind_in(&setup.dir, &other).unwrap();
    }

    #[test]
    fn a_master_in_another_runtime_dir_is_refused() {
        let setup = setup();
        // As under systemd (no XDG_RUNTIME_DIR) and from a login shell.
        let system = setup.dir.with_file_name("run-system");
        let user = setup.dir.with_file_name("run-user");
        let dirs = [user.clone(), system.clone()];
        let first = ControlSocket::bind_among(&system, &dirs, &setup.config).unwrap();
        let err = ControlSocket::bind_among(&user, &dirs, &setup.config).unwrap_err();
        let config = fs::canonicalize(&setup.config).unwrap();
        match &err {
            ControlError::AlreadyRunning { pid, lock, .. } => {
                assert_eq!(*pid, Some(std::process::id()));
                assert!(lock.starts_with(&system), "{}", lock.display());
            }
            other => panic!("{other}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "another master (pid {}) already runs {}",
                std::process::id(),
                config.display()
            )
        );
        // The refused one left nothing behind in its own directory.
        let left: Vec<_> = fs::read_dir(&user).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // Our own directory among the others is not another master.
        let other = second_config(&setup, "other.toml");
        let _other = ControlSocket::bind_among(&user, &dirs, &other).unwrap();
        // Once the first is gone, the second may start.
        drop(first);
        ControlSocket::bind_among(&user, &dirs, &setup.config).unwrap();
    }

    #[test]
    fn lock_file_text_round_trips() {
        let text = lock_text(12, Path::new("/etc/herd.toml"));
        assert_eq!(
            parse_lock(&text),
            LockInfo {
                pid: Some(12),
                config: Some("/etc/herd.toml".into())
            }
        );
        assert_eq!(parse_lock(b""), LockInfo::default());
    }
}
