//! The crate's file helpers: `flock` locks ([`lock`], [`try_lock`],
//! [`lock_within`]), directory syncs, atomic replacement of a file
//! ([`Replacement`], [`write_atomic`], [`write_atomic_unsynced`]) and
//! private directories ([`private_dir_of`]).
//!
//! Used by the queue journals (`queue::journal`, the local and durable
//! queues and the durable queue's inbox), the pid killer's state file
//! (`pidkiller::store`), the master's hash cache (`master::exe_hash`) and,
//! for its lock, the master's control paths.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

use crate::backoff::Backoff;

/// Which `flock` to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// `LOCK_SH`: many holders, none exclusive.
    #[allow(
        dead_code,
        reason = "for the master's lock probe (master/control/paths.rs), being rewritten"
    )]
    Shared,
    /// `LOCK_EX`: one holder.
    Exclusive,
}

/// Takes a `flock` on `file`, waiting as long as it takes (retried when
/// interrupted). Released when every descriptor of the open file is
/// closed.
pub(crate) fn lock(file: &File, kind: LockKind) -> io::Result<()> {
    let operation = match kind {
        LockKind::Shared => FlockOperation::LockShared,
        LockKind::Exclusive => FlockOperation::LockExclusive,
    };
    flock(file, operation)
}

/// Takes a `flock` on `file` if no one holds a conflicting one
/// ([`io::ErrorKind::WouldBlock`] otherwise).
pub(crate) fn try_lock(file: &File, kind: LockKind) -> io::Result<()> {
    let operation = match kind {
        LockKind::Shared => FlockOperation::NonBlockingLockShared,
        LockKind::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    flock(file, operation)
}

/// The pauses of [`lock_within`] between tries.
const LOCK_POLL: Backoff =
    Backoff::doubling(Duration::from_millis(1), Duration::from_millis(50), 0.0);

/// Takes a `flock`, waiting at most `grace` for it
/// ([`io::ErrorKind::WouldBlock`] then): `flock` has no timeout of its own,
/// so it is tried again after pauses doubling from 1 ms to 50 ms.
pub(crate) fn lock_within(file: &File, kind: LockKind, grace: Duration) -> io::Result<()> {
    let deadline = Instant::now() + grace;
    let mut step = 0;
    loop {
        match try_lock(file, kind) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(err);
                }
                std::thread::sleep(LOCK_POLL.delay(step, 0.5).min(left));
                step += 1;
            }
            done => return done,
        }
    }
}

/// `flock(operation)`, retried when interrupted.
fn flock(file: &File, operation: FlockOperation) -> io::Result<()> {
    loop {
        match rustix::fs::flock(file, operation) {
            Err(rustix::io::Errno::INTR) => continue,
            done => return done.map_err(io::Error::from),
        }
    }
}

/// Why [`private_dir_of`] refused the directory `dir`.
#[derive(Debug)]
pub(crate) enum PrivateDirError {
    /// It cannot be made or looked at.
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It is not a directory of this user's closed to others.
    Insecure {
        /// The directory.
        dir: PathBuf,
    },
}

/// The directory of `path`, made (mode 0700) if missing, once it is sure
/// to be this user's and not writable by others: nobody else can then
/// swap a file of it. A symlinked directory is fine if its target passes.
///
/// # Errors
/// If it cannot be made or looked at, or is somebody else's.
pub(crate) fn private_dir_of(path: &Path) -> Result<PathBuf, PrivateDirError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let io = |source| PrivateDirError::Io {
        dir: dir.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io)?;
    let meta = std::fs::metadata(&dir).map_err(io)?;
    let euid = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        return Err(PrivateDirError::Insecure { dir });
    }
    Ok(dir)
}

/// `<path><suffix>`, in the same directory.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Syncs the directory holding `path`, making a creation, rename or
/// removal durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Removes `path`; a missing file is fine.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// A new version of a file, written to a sibling (`<path><suffix>`) and
/// put in its place by [`commit`](Self::commit): whoever opens the path
/// finds the old content or the new, never a mix, crash or not. Dropped
/// without a commit, the sibling is removed.
#[derive(Debug)]
pub(crate) struct Replacement {
    /// The file to replace.
    path: PathBuf,
    /// The sibling, open for reading and writing.
    file: File,
    /// Removes the sibling unless committed.
    tmp: Sibling,
}

/// A sibling file removed on drop, unless disarmed.
#[derive(Debug)]
struct Sibling {
    path: PathBuf,
    /// Whether drop removes the file.
    remove: bool,
}

impl Drop for Sibling {
    fn drop(&mut self) {
        if self.remove {
            // Best effort: the next replacement truncates it anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Replacement {
    /// Creates (or truncates) `<path><suffix>`, with permissions `mode`
    /// (less the umask) if it is created.
    ///
    /// # Errors
    /// If the sibling cannot be created.
    pub(crate) fn create(path: &Path, suffix: &str, mode: u32) -> io::Result<Self> {
        let tmp = sibling(path, suffix);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        Ok(Replacement {
            path: path.to_owned(),
            file,
            tmp: Sibling {
                path: tmp,
                remove: true,
            },
        })
    }

    /// The sibling, to write the new content to (and to lock if openers
    /// of the path must not slip in as it takes its place).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the new content and renames it over the path. Returns the
    /// file, still open (and locked if it was), now at the path. The
    /// directory is not synced: [`sync_dir`] makes the rename durable (its
    /// failure is the caller's to judge).
    ///
    /// # Errors
    /// If the sync or the rename fails; the sibling is then removed and
    /// the old file stays.
    pub(crate) fn commit(self) -> io::Result<File> {
        self.file.sync_all()?;
        self.rename_over()
    }

    /// Renames the sibling over the path; returns its file.
    fn rename_over(self) -> io::Result<File> {
        let Replacement {
            path,
            file,
            mut tmp,
        } = self;
        std::fs::rename(&tmp.path, &path)?;
        tmp.remove = false;
        Ok(file)
    }

    /// Puts the new content in the path's place without syncing it:
    /// readers find the old content or the new, but a crash of the
    /// machine may leave the path empty or partly written. For files whose
    /// content means nothing after a reboot.
    ///
    /// Where the file system can, the two names are exchanged
    /// (`RENAME_EXCHANGE`) and the old content, now under the sibling's
    /// name, is removed: a rename over an existing file makes ext4 start
    /// writing the new one to the disk at once (its `auto_da_alloc`, for
    /// programs that do not sync), which cost a pid registry write (each
    /// instance's start and end) a third of its time on the benchmark
    /// machine; an exchange does not. Elsewhere, or when the path does
    /// not exist yet, it is a rename.
    ///
    /// # Errors
    /// If the rename fails; the sibling is then removed and the old file
    /// stays.
    pub(crate) fn commit_unsynced(self) -> io::Result<File> {
        let cwd = rustix::fs::CWD;
        let exchanged = rustix::fs::renameat_with(
            cwd,
            &self.tmp.path,
            cwd,
            &self.path,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        if exchanged.is_err() {
            return self.rename_over();
        }
        // Exchanged: dropping the sibling removes the old content.
        Ok(self.file)
    }
}

/// Replaces the file at `path` with `bytes` atomically for the readers
/// of this boot, without a sync: written to `<path>.tmp` (permissions
/// `mode` less the umask) and renamed over `path`. A crash of the machine
/// may leave the file empty or partly written (see
/// [`modified_before_boot`]): for files whose content means nothing after
/// a reboot, where two syncs per write would only cost time.
///
/// # Errors
/// If any step fails; the old file then stays.
pub(crate) fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let replacement = Replacement::create(path, ".tmp", mode)?;
    replacement.file().write_all(bytes)?;
    replacement.commit_unsynced()?;
    Ok(())
}

/// Replaces the file at `path` with `bytes` atomically and durably:
/// written to `<path>.tmp` (permissions `mode` less the umask), synced,
/// renamed over `path`, and the directory synced.
///
/// # Errors
/// If any step fails; the old file then stays (unless only the directory
/// sync failed: the new content is in place, maybe not yet durably).
#[cfg(feature = "master")]
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let replacement = Replacement::create(path, ".tmp", mode)?;
    replacement.file().write_all(bytes)?;
    replacement.commit()?;
    sync_dir(path)
}

/// Whether `path` was last modified before the machine booted (so a file
/// written by [`write_atomic_unsynced`] may have been cut short by a
/// crash). `false` when either time cannot be read.
pub(crate) fn modified_before_boot(path: &Path) -> bool {
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
        stat.lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|secs| secs.trim().parse::<u64>().ok())
    });
    let modified = std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok());
    match (boot, modified) {
        (Some(boot), Some(modified)) => modified.as_secs() < boot,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_as_flock_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let open = || File::create(&path).expect("open");
        let (a, b) = (open(), open());
        lock(&a, LockKind::Shared).expect("shared");
        try_lock(&b, LockKind::Shared).expect("shared too");
        let busy = try_lock(&open(), LockKind::Exclusive).expect_err("held");
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock);
        let waited = Instant::now();
        let busy = lock_within(&open(), LockKind::Exclusive, Duration::from_millis(30));
        assert_eq!(busy.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        assert!(waited.elapsed() >= Duration::from_millis(30));
        drop((a, b));
        // Bounded wait, not none: a test running beside this one may have
        // forked a child that holds copies of `a` and `b` until its exec.
        lock_within(&open(), LockKind::Exclusive, Duration::from_secs(10)).expect("free");
    }

    #[test]
    fn replacements_are_all_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        write_atomic_unsynced(&path, b"one", 0o600).expect("write");
        let mut reader = File::open(&path).expect("open");
        // Over an existing file (the names exchanged where the file system
        // can): a reader of the old one still reads it whole, and the old
        // content is gone from the directory.
        write_atomic_unsynced(&path, b"two", 0o600).expect("write again");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert!(!sibling(&path, ".tmp").exists());
        let mut old = String::new();
        std::io::Read::read_to_string(&mut reader, &mut old).expect("read the old");
        assert_eq!(old, "one");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
        // Committed unsynced: the open file is the one at the path.
        let replacement = Replacement::create(&path, ".tmp", 0o600).expect("create");
        replacement.file().write_all(b"2").expect("write");
        let mut file = replacement.commit_unsynced().expect("commit");
        file.write_all(b"+").expect("append");
        assert_eq!(std::fs::read(&path).expect("read"), b"2+");
        write_atomic_unsynced(&path, b"two", 0o600).expect("write again");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Abandoned: the sibling goes, the file stays.
        let replacement = Replacement::create(&path, ".new", 0o666).expect("create");
        replacement.file().write_all(b"three").expect("write");
        assert!(sibling(&path, ".new").exists());
        drop(replacement);
        assert!(!sibling(&path, ".new").exists());
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        // Committed: the open file is now the one at the path.
        let replacement = Replacement::create(&path, ".new", 0o666).expect("create");
        replacement.file().write_all(b"four").expect("write");
        let mut file = replacement.commit().expect("commit");
        file.write_all(b"+").expect("append");
        assert_eq!(std::fs::read(&path).expect("read"), b"four+");
        remove_if_exists(&path).expect("remove");
        remove_if_exists(&path).expect("missing is fine");
    }
}
