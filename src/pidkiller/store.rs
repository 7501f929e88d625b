//! The state file: format, locking, atomic writes, and the merge that lets
//! several owners (masters, agents) share one file.
//!
//! The format is described in the [`super`] module docs.
//!
//! # Writing
//!
//! Every read-modify-write holds an exclusive `flock(2)` on `<file>.lock`
//! (the data file itself is replaced by rename, so it cannot carry the lock).
//! The new content goes to `<file>.tmp` in the same directory and is
//! renamed over the file, without a sync (see [`write`]): a reader sees
//! the old or the new document, never a torn one.
//!
//! Entries of other owners that are still alive are kept as they are;
//! entries of owners that died are taken over by the writer (see
//! [`merge`]).

use super::proc::{self, ProcessIdentity};
use super::{Entry, PidKillerError};
use crate::files::{self, sibling, LockKind};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Version of the state file format.
pub(crate) const STATE_VERSION: u32 = 1;

/// The document stored in the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateFile {
    /// [`STATE_VERSION`] at the time of writing.
    pub(crate) version: u32,
    /// Boot the start times refer to.
    #[serde(default)]
    pub(crate) boot_id: String,
    /// All registered processes, of every owner.
    pub(crate) entries: Vec<Entry>,
}

/// The kernel's boot id, or an empty string when it cannot be read (then
/// entries are trusted across boots, as without this check).
pub(crate) fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The state directory from the environment values; see
/// [`super::default_state_dir`].
pub(crate) fn state_dir_from(
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
    uid: u32,
) -> PathBuf {
    // The XDG spec says to ignore relative values.
    if let Some(xdg) = xdg_state_home.map(PathBuf::from) {
        if xdg.is_absolute() {
            return xdg.join("taskherd");
        }
    }
    if let Some(home) = home.map(PathBuf::from) {
        if home.is_absolute() {
            return home.join(".local/state/taskherd");
        }
    }
    PathBuf::from(format!("/tmp/taskherd-state-{uid}"))
}

/// A loaded state file: the document and the text it was read from, which
/// [`write`] compares with its new text.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The document, without entries of another boot; a fresh one when
    /// the file does not exist (or was cut short before this boot).
    pub(crate) state: StateFile,
    /// The file's text; `None` when there was none to keep.
    pub(crate) text: Option<String>,
}

/// Loads the state file. Entries of another boot are dropped here.
pub(crate) fn load(path: &Path) -> Result<Loaded, PidKillerError> {
    let missing = || Loaded {
        state: empty_state(),
        text: None,
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(missing()),
        Err(source) => {
            return Err(PidKillerError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut state: StateFile = match serde_json::from_str(&text) {
        Ok(state) => state,
        // Written without a sync (see `write`): a crash of the machine may
        // have cut it short, and what it held ran before the boot.
        Err(_) if files::modified_before_boot(path) => {
            tracing::info!(
                path = %path.display(),
                "ignoring an unreadable pid registry written before this boot"
            );
            return Ok(missing());
        }
        Err(source) => {
            return Err(PidKillerError::Corrupt {
                path: path.to_owned(),
                source,
            })
        }
    };
    if state.version > STATE_VERSION {
        return Err(PidKillerError::UnsupportedVersion {
            path: path.to_owned(),
            version: state.version,
        });
    }
    let boot = boot_id();
    if state.boot_id != boot {
        if !state.entries.is_empty() {
            tracing::info!(
                path = %path.display(), entries = state.entries.len(),
                "ignoring pid entries of a previous boot"
            );
        }
        state.entries.clear();
        state.boot_id = boot;
    }
    Ok(Loaded {
        state,
        text: Some(text),
    })
}

/// Makes sure the directory of `path` exists (created mode 0700) and is
/// ours and not writable by others, so nobody can swap the file under us.
fn ensure_dir(path: &Path) -> Result<PathBuf, PidKillerError> {
    files::private_dir_of(path).map_err(|err| match err {
        files::PrivateDirError::Io { dir, source } => {
            PidKillerError::StateDir { path: dir, source }
        }
        files::PrivateDirError::Insecure { dir } => PidKillerError::InsecureStateDir { path: dir },
    })
}

/// An exclusive lock on `<file>.lock`, released on drop (closing the fd).
pub(crate) struct Lock {
    _file: File,
}

/// Takes the lock of `path`, creating the directory if needed. With
/// `wait`, blocks while another process holds it (it only does so for one
/// read-modify-write); without, fails then with a
/// [`PidKillerError::Lock`] whose source is [`io::ErrorKind::WouldBlock`].
pub(crate) fn lock(path: &Path, wait: bool) -> Result<Lock, PidKillerError> {
    ensure_dir(path)?;
    let lock_path = sibling(path, ".lock");
    let lock_err = |source| PidKillerError::Lock {
        path: lock_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(lock_err)?;
    if wait {
        files::lock(&file, LockKind::Exclusive).map_err(lock_err)?;
    } else {
        files::try_lock(&file, LockKind::Exclusive).map_err(lock_err)?;
    }
    Ok(Lock { _file: file })
}

/// Writes `state` atomically (tmp file, rename): readers see the old
/// document or the new one. Not synced: its entries are processes of this
/// boot (see [`boot_id`]), which a crash of the machine ends anyway, and a
/// file it cut short is ignored (see [`load`]); two syncs per write would
/// cost each instance's start and exit milliseconds on a disk. The caller
/// holds the [`Lock`].
///
/// Nothing is written when the file holds exactly this text already
/// (`on_disk`: its text as read under the same lock): a registry opened,
/// or an owner that ends, with nothing to change costs no write. (A
/// write puts its file in place by exchanging names, which on ext4,
/// unlike a rename over a file, does not send it to the disk at once: see
/// [`files::Replacement::commit_unsynced`].)
pub(crate) fn write(
    path: &Path,
    state: &StateFile,
    on_disk: Option<&str>,
) -> Result<(), PidKillerError> {
    let write_err = |source| PidKillerError::Write {
        path: path.to_owned(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(state)
        .map_err(|err| write_err(io::Error::new(io::ErrorKind::InvalidData, err)))?;
    bytes.push(b'\n');
    if on_disk.is_some_and(|text| text.as_bytes() == bytes) {
        return Ok(());
    }
    ensure_dir(path)?;
    files::write_atomic_unsynced(path, &bytes, 0o600).map_err(write_err)
}

/// The outcome of [`merge`].
#[derive(Debug, Default)]
pub(crate) struct Merged {
    /// Entries of other, live owners: kept in the file, not ours to enforce.
    pub(crate) foreign: Vec<Entry>,
    /// Entries of owners that died whose process (or group) still runs:
    /// leftovers, now owned by `me`, to be stopped.
    pub(crate) orphans: Vec<Entry>,
    /// Entries recorded with our own identity (an earlier `PidKiller` of
    /// this process): ours again, with their deadlines.
    pub(crate) own: Vec<Entry>,
}

/// Sorts the entries of a loaded file by owner.
///
/// Entries whose owner is dead and whose process and group are gone, or
/// whose pid now belongs to another process, are dropped (logged).
pub(crate) fn merge(entries: Vec<Entry>, me: ProcessIdentity) -> Merged {
    let mut merged = Merged::default();
    // Many entries share an owner: ask /proc once per owner.
    let mut owner_alive = std::collections::HashMap::new();
    for mut entry in entries {
        if entry.owner == me {
            merged.own.push(entry);
        } else if *owner_alive
            .entry(entry.owner)
            .or_insert_with(|| entry.owner.is_alive_same())
        {
            merged.foreign.push(entry);
        } else if still_running(&entry) {
            tracing::warn!(
                pid = entry.identity.pid, pgid = entry.pgid, label = %entry.label,
                dead_owner = %entry.owner, "leftover of a crashed run: stopping it"
            );
            entry.owner = me;
            merged.orphans.push(entry);
        } else {
            tracing::debug!(
                pid = entry.identity.pid, label = %entry.label,
                "dropping entry of a dead owner: process gone"
            );
        }
    }
    merged
}

/// Whether the registered process, or what is left of its group, still
/// runs (identity-checked).
pub(crate) fn still_running(entry: &Entry) -> bool {
    matches!(super::task::probe(entry), super::task::Probe::Alive(_))
}

/// Reads the entries of a state file for display; see
/// [`super::read_state`].
pub(crate) fn read_entries(path: &Path) -> Result<Vec<Entry>, PidKillerError> {
    Ok(load(path)?.state.entries)
}

/// A fresh document for the current boot.
pub(crate) fn empty_state() -> StateFile {
    StateFile {
        version: STATE_VERSION,
        boot_id: boot_id(),
        entries: Vec::new(),
    }
}

/// Own process identity: the owner recorded in our entries.
pub(crate) fn me() -> Result<ProcessIdentity, PidKillerError> {
    proc::ProcessIdentity::current().map_err(PidKillerError::OwnIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn state_dir_follows_xdg_then_home_then_tmp() {
        assert_eq!(
            state_dir_from(Some("/x/state".into()), Some("/home/u".into()), 7),
            PathBuf::from("/x/state/taskherd")
        );
        assert_eq!(
            state_dir_from(Some("relative".into()), Some("/home/u".into()), 7),
            PathBuf::from("/home/u/.local/state/taskherd")
        );
        assert_eq!(
            state_dir_from(None, Some("/home/u".into()), 7),
            PathBuf::from("/home/u/.local/state/taskherd")
        );
        assert_eq!(
            state_dir_from(None, None, 7),
            PathBuf::from("/tmp/taskherd-state-7")
        );
    }

    /// An entry of pid 12 (group 12), owned by pid 56, 1.5 s of grace.
    fn sample_entry() -> Entry {
        Entry {
            identity: ProcessIdentity {
                pid: 12,
                start_time: 34,
            },
            pgid: 12,
            deadline: None,
            grace: std::time::Duration::from_millis(1500),
            label: "x".into(),
            owner: ProcessIdentity {
                pid: 56,
                start_time: 78,
            },
        }
    }

    #[test]
    fn write_is_atomic_and_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/pids.json");
        let _lock = lock(&path, true).expect("lock");
        let mut state = empty_state();
        state.entries.push(sample_entry());
        write(&path, &state, None).expect("write");
        assert!(!sibling(&path, ".tmp").exists());
        let mode = fs::metadata(path.parent().expect("dir"))
            .expect("meta")
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let back = read_entries(&path).expect("read");
        assert_eq!(back, state.entries);
        let raw: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("text")).expect("json");
        assert_eq!(raw["entries"][0]["grace"], 1500);
        assert_eq!(raw["entries"][0]["deadline"], serde_json::Value::Null);
    }

    #[test]
    fn an_unchanged_document_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("pids.json");
        let mut state = empty_state();
        write(&path, &state, None).expect("first write");
        let inode = || fs::metadata(&path).expect("meta").ino();
        let first = inode();
        // The same document, as read under the lock: no new file.
        let loaded = load(&path).expect("load");
        let text = loaded.text.expect("the file exists");
        write(&path, &loaded.state, Some(&text)).expect("same");
        assert_eq!(inode(), first, "an unchanged document was written again");
        // A change is written (a new file renamed over the old one).
        state.entries.push(sample_entry());
        write(&path, &state, Some(&text)).expect("changed");
        assert_ne!(inode(), first, "a changed document was not written");
        assert_eq!(read_entries(&path).expect("read"), state.entries);
    }

    #[test]
    fn a_file_cut_short_before_this_boot_is_empty() {
        // Unsynced writes: a crash of the machine may leave half a file,
        // which can only list processes of an earlier boot.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pids.json");
        fs::write(&path, "{\"version\": 1, \"entries\": [{\"pid\"").expect("write");
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(long_ago))
            .expect("set mtime");
        let loaded = load(&path).expect("taken for empty");
        assert!(loaded.text.is_none() && loaded.state.entries.is_empty());
        // The same file written in this boot is a corrupt registry.
        File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(std::time::SystemTime::now()))
            .expect("set mtime");
        let err = load(&path).expect_err("corrupt");
        assert!(matches!(err, PidKillerError::Corrupt { .. }), "{err:?}");
    }

    #[test]
    fn corrupt_and_future_files_are_named_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pids.json");
        assert!(read_entries(&path).expect("missing is empty").is_empty());
        fs::write(&path, "{ not json").expect("write");
        let err = read_entries(&path).expect_err("corrupt");
        assert!(matches!(err, PidKillerError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        fs::write(&path, r#"{"version": 99, "boot_id": "", "entries": []}"#).expect("write");
        let err = read_entries(&path).expect_err("future version");
        assert!(matches!(
            err,
            PidKillerError::UnsupportedVersion { version: 99, .. }
        ));
    }

    #[test]
    fn a_group_writable_dir_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = lock(&dir.path().join("pids.json"), true)
            .err()
            .expect("refused");
        assert!(
            matches!(err, PidKillerError::InsecureStateDir { .. }),
            "{err:?}"
        );
    }
}
