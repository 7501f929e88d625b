//! The open-file limit of a process that holds many connections.
//!
//! A master holds about four file descriptors per connected host, and the
//! usual soft `RLIMIT_NOFILE` of 1 024 would stop it at about 250 hosts,
//! while the hard limit (what the process may raise itself to) is most
//! often far higher. [`raise_open_files`] raises the soft limit to the hard
//! one, as many daemons do (Go programs do it by default). The processes
//! the master spawns get the limit it was given back
//! (`restore_in_child`, between fork and exec): a program that still uses `select(2)`, or that
//! closes every descriptor up to the limit, sees what it would have seen
//! without taskherd.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft and hard limits before [`raise_open_files`] raised them;
/// `u64::MAX` in the soft one while nothing was raised.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);
static ORIGINAL_HARD: AtomicU64 = AtomicU64::new(u64::MAX);

/// What [`raise_open_files`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit before.
    pub from: u64,
    /// The soft limit now (the hard limit).
    pub to: u64,
}

/// Raises this process's soft limit of open files to its hard limit.
/// `Ok(None)` when they were equal already.
///
/// # Errors
/// The limit could not be read or set.
pub fn raise_open_files() -> std::io::Result<Option<Raised>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(None);
    }
    let (Some(soft), hard) = (limit.current, limit.maximum) else {
        return Ok(None);
    };
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )?;
    ORIGINAL_HARD.store(hard.unwrap_or(libc::RLIM_INFINITY), Ordering::SeqCst);
    ORIGINAL_SOFT.store(soft, Ordering::SeqCst);
    Ok(Some(Raised {
        from: soft,
        to: hard.unwrap_or(u64::MAX),
    }))
}

/// In a child between fork and exec: gives it back the soft limit of open
/// files this process had before [`raise_open_files`] (nothing to do if it
/// raised nothing).
///
/// Async-signal-safe: two atomic loads and one `setrlimit(2)`.
///
/// # Errors
/// `setrlimit` failed.
pub(crate) fn restore_in_child() -> std::io::Result<()> {
    let soft = ORIGINAL_SOFT.load(Ordering::SeqCst);
    if soft == u64::MAX {
        return Ok(());
    }
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: ORIGINAL_HARD.load(Ordering::SeqCst) as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
