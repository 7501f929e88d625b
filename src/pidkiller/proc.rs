//! What `/proc` says about a process, and signals to processes and groups.
//!
//! Everything here is synchronous and cheap (a read of a small procfs file, a
//! `kill(2)`), except [`signal`], which retries with a short async backoff,
//! and [`wait_exit`], which waits on a pidfd without polling.

use crate::backoff::Backoff;
use rustix::process::{Pid, PidfdFlags};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A process as the kernel knows it: its pid plus its start time.
///
/// A pid alone is not an identity: once a process is reaped its number can be
/// given to any new process. The start time (clock ticks since boot, field 22
/// of `/proc/<pid>/stat`) tells the two apart, so a reused pid is never
/// signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: u32,
    /// `starttime` of `/proc/<pid>/stat`: clock ticks after boot at which the
    /// process started; what makes the pid unambiguous.
    pub start_time: u64,
}

impl ProcessIdentity {
    /// Reads the identity of the live process `pid` from `/proc`.
    ///
    /// # Errors
    /// The error of reading `/proc/<pid>/stat` (`NotFound` when there is no
    /// such process), or `InvalidData` when the file cannot be parsed.
    pub fn of(pid: u32) -> io::Result<Self> {
        let stat = read_stat(pid)?;
        Ok(Self {
            pid,
            start_time: stat.start_time,
        })
    }

    /// The identity of the calling process.
    ///
    /// # Errors
    /// As [`ProcessIdentity::of`].
    pub fn current() -> io::Result<Self> {
        Self::of(std::process::id())
    }

    /// Whether this very process still runs: the pid exists, is not a
    /// zombie, and has the recorded start time.
    pub fn is_alive_same(&self) -> bool {
        read_stat(self.pid)
            .is_ok_and(|stat| stat.is_running() && stat.start_time == self.start_time)
    }
}

impl fmt::Display for ProcessIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pid, self.start_time)
    }
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead)...
    pub(crate) state: u8,
    /// Field 5: the process group.
    pub(crate) pgrp: u32,
    /// Field 22: start time in clock ticks after boot.
    pub(crate) start_time: u64,
}

impl Stat {
    /// Neither a zombie nor dead: signals still matter to it.
    pub(crate) fn is_running(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) sits in parentheses and may itself contain
/// spaces and parentheses, so the fields are counted after the *last* `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // `fields[0]` is field 3 of the file.
    let state = *fields.first()?.as_bytes().first()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        start_time,
    })
}

/// Reads and parses `/proc/<pid>/stat`.
pub(crate) fn read_stat(pid: u32) -> io::Result<Stat> {
    let text = read_small(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// Reads a small file of `/proc` (a stat line) in one read and the read
/// that says its end. `fs::read_to_string` starts with a 32-byte read and
/// doubles, as the kernel gives these files no size: six reads for a stat
/// line, for every process a registry or watchdog looks at.
pub(crate) fn read_small(path: impl AsRef<std::path::Path>) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(1024);
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Nanoseconds of `CLOCK_BOOTTIME`, the clock a process's start time is
/// read from when the kernel forks it; 0 if it cannot be read.
/// Async-signal-safe (a spawn's child reads it before its exec).
pub(crate) fn boot_clock_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; it is
    // async-signal-safe and allocates nothing.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return 0;
    }
    let (Ok(secs), Ok(nanos)) = (u64::try_from(now.tv_sec), u64::try_from(now.tv_nsec)) else {
        return 0;
    };
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// How far from a tick's edge both readings of [`start_time_between`] must
/// be: the clock read in user space and the one the kernel stamps a new
/// process with are the same clock, and this covers any rounding between
/// the two.
const TICK_EDGE_NS: u64 = 1_000;

/// The start time (field 22 of `/proc/<pid>/stat`: clock ticks after
/// boot) of a process forked between two readings of [`boot_clock_ns`],
/// `before` (in the parent, before the fork) and `after` (in the child),
/// when the kernel's stamp cannot be in any other tick: `/proc` shows the
/// boot clock at the fork, in whole ticks. `None` when the readings
/// straddle a tick (or come near its edge), when one failed, or when a
/// tick is not a whole number of nanoseconds: then `/proc` must be read.
///
/// Why not read `/proc/<pid>/stat` at once: while the child is in
/// `execve`, the read waits for it (Linux 6.x takes the exec lock there),
/// and the kernel then often runs the reader after the new program, on
/// its CPU: each instance's start held its agent up until the instance
/// had run for a while.
pub(crate) fn start_time_between(before: u64, after: u64) -> Option<u64> {
    // SAFETY: sysconf only reads a value of the C library.
    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    if ticks_per_second == 0 || 1_000_000_000 % ticks_per_second != 0 {
        return None;
    }
    tick_between(before, after, 1_000_000_000 / ticks_per_second)
}

/// [`start_time_between`] for ticks of `tick_ns` nanoseconds.
fn tick_between(before: u64, after: u64, tick_ns: u64) -> Option<u64> {
    if before == 0 || after < before {
        return None;
    }
    let first = before.checked_sub(TICK_EDGE_NS)? / tick_ns;
    let last = after.checked_add(TICK_EDGE_NS)? / tick_ns;
    (first == last).then_some(first)
}

/// Whether some running process other than a zombie is in group `pgid` and
/// started no earlier than `since` (the recorded start of the group leader:
/// members of the leader's group started after it).
pub(crate) fn group_has_members(pgid: u32, since: u64) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        // A process may vanish between the listing and the read: skip it.
        .filter_map(|pid| read_stat(pid).ok())
        .any(|stat| stat.pgrp == pgid && stat.is_running() && stat.start_time >= since)
}

/// What a signal is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every process of the group (`kill(-pgid, ..)`).
    Group(u32),
    /// One process (`kill(pid, ..)`): the registered process left its group.
    Process(u32),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Group(pgid) => write!(f, "group {pgid}"),
            Target::Process(pid) => write!(f, "process {pid}"),
        }
    }
}

/// The two signals of the escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Signal {
    /// `SIGTERM`: the polite request, sent at the deadline.
    Term,
    /// `SIGKILL`: sent when the grace period is over.
    Kill,
}

impl Signal {
    fn rustix(self) -> rustix::process::Signal {
        match self {
            Signal::Term => rustix::process::Signal::TERM,
            Signal::Kill => rustix::process::Signal::KILL,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        })
    }
}

/// What a successful [`signal`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The kernel accepted the signal.
    Sent,
    /// `ESRCH`: nothing left to signal.
    NoSuchProcess,
}

/// How many times a failing `kill(2)` is tried in all.
pub(crate) const SIGNAL_ATTEMPTS: u32 = 3;

/// Pauses between attempts: 10 ms before the second, doubled for each
/// further one.
const SIGNAL_RETRY: Backoff =
    Backoff::doubling(Duration::from_millis(10), Duration::from_secs(1), 0.0);

/// One `kill(2)` call.
pub(crate) fn send_once(target: Target, signal: Signal) -> io::Result<Delivery> {
    let (Target::Group(n) | Target::Process(n)) = target;
    // 0 and 1 (kill(2)'s 0 and -1 as a group, or init) would hit our own
    // group, every process we may signal, or init: never, whatever the
    // caller recorded.
    if n <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal {target}"),
        ));
    }
    let pid = pid(n)?;
    let sent = match target {
        Target::Group(_) => rustix::process::kill_process_group(pid, signal.rustix()),
        Target::Process(_) => rustix::process::kill_process(pid, signal.rustix()),
    };
    match sent {
        Ok(()) => Ok(Delivery::Sent),
        Err(rustix::io::Errno::SRCH) => Ok(Delivery::NoSuchProcess),
        Err(err) => Err(err.into()),
    }
}

/// `n` as a pid (0 and anything past `i32::MAX` are none).
fn pid(n: u32) -> io::Result<Pid> {
    i32::try_from(n)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{n} is not a valid pid"),
            )
        })
}

/// Sends `signal` to `target`, trying again with a short backoff when the
/// kernel refuses for another reason than `ESRCH` (each failure logged).
///
/// # Errors
/// The last error after [`SIGNAL_ATTEMPTS`] attempts.
pub(crate) async fn signal(target: Target, signal: Signal, label: &str) -> io::Result<Delivery> {
    let mut attempt = 1;
    loop {
        match send_once(target, signal) {
            Ok(delivery) => return Ok(delivery),
            Err(err) => {
                tracing::warn!(
                    %target, %signal, label, attempt, max_attempts = SIGNAL_ATTEMPTS,
                    cause = %err, "signal failed"
                );
                if attempt >= SIGNAL_ATTEMPTS || err.kind() == io::ErrorKind::InvalidInput {
                    return Err(err);
                }
            }
        }
        tokio::time::sleep(SIGNAL_RETRY.delay(attempt - 1, 0.5)).await;
        attempt += 1;
    }
}

/// Own process group of the caller, which is never a valid target.
pub(crate) fn own_pgrp() -> u32 {
    rustix::process::getpgrp().as_raw_pid().unsigned_abs()
}

/// Opens a pidfd on `identity` and checks that it is still that process, so
/// the fd cannot refer to a successor that got the pid.
///
/// # Errors
/// `pidfd_open(2)` failed (no such process, kernel older than 5.3), or the
/// pid now belongs to another process.
pub(crate) fn pidfd_open(identity: ProcessIdentity) -> io::Result<OwnedFd> {
    let pid = pid(identity.pid)?;
    let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
    if !identity.is_alive_same() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {identity} is gone"),
        ));
    }
    Ok(fd)
}

/// Waits until the process of `fd` (from [`pidfd_open`]) has exited; a pidfd
/// becomes readable then.
///
/// # Errors
/// The fd cannot be registered with the runtime.
///
/// # Panics
/// If the runtime has no I/O driver (this runs in a watcher task of its
/// own, so the registry then just waits out the grace period).
///
/// # Cancel safety
/// Cancel safe: dropping the future closes the fd and nothing else.
pub(crate) async fn wait_exit(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: the `OwnedFd` is a valid open fd, owned by the `AsyncFd` until
    // it is dropped; nothing else closes or replaces it.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|err| err.into_parts().1)?;
    let _ready = fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_after_the_last_parenthesis() {
        let line = "4242 (we(i)rd) S (name)) R 1 777 777 0 -1 4194560 106 0 0 0 0 0 0 0 20 0 1 0 123456 2379776 218 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, b'R');
        assert_eq!(stat.pgrp, 777);
        assert_eq!(stat.start_time, 123456);
        assert!(parse_stat("12 (x) S 1").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_identity_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcessIdentity::current().expect("own stat");
        assert_eq!(me.pid, std::process::id());
        assert!(me.is_alive_same());
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive_same());
        assert_eq!(
            ProcessIdentity::of(0).expect_err("no pid 0").kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_start_time_is_told_only_when_both_readings_share_a_tick() {
        let tick = 10_000_000;
        // Well inside tick 7.
        assert_eq!(tick_between(72_000_000, 73_000_000, tick), Some(7));
        // Across the edge of ticks 7 and 8, or within 1 µs of it.
        assert_eq!(tick_between(79_000_000, 80_500_000, tick), None);
        assert_eq!(tick_between(75_000_000, 79_999_500, tick), None);
        assert_eq!(tick_between(80_000_200, 81_000_000, tick), None);
        // A failed reading (0), or readings out of order.
        assert_eq!(tick_between(0, 5_000_000, tick), None);
        assert_eq!(tick_between(73_000_000, 72_000_000, tick), None);
    }

    #[test]
    fn the_start_time_told_by_the_clock_is_the_one_proc_shows() {
        // Forked between two readings of the clock, as a spawn's child is:
        // when they share a tick, /proc says that tick.
        let mut told = 0;
        for _ in 0..50 {
            let before = boot_clock_ns();
            let mut child = std::process::Command::new("sleep")
                .arg("5")
                .spawn()
                .expect("spawn sleep");
            let after = boot_clock_ns();
            let from_proc = ProcessIdentity::of(child.id()).expect("identity");
            let _ = child.kill();
            let _ = child.wait();
            if let Some(start_time) = start_time_between(before, after) {
                assert_eq!(start_time, from_proc.start_time);
                told += 1;
            }
        }
        assert!(told > 0, "no spawn fell within one tick");
    }

    #[test]
    fn refuses_dangerous_targets() {
        for target in [Target::Group(0), Target::Group(1), Target::Process(0)] {
            let err = send_once(target, Signal::Term).expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let identity =
            ProcessIdentity::of(child.id()).expect("identity while it runs or is a zombie");
        // Not reaped yet: once it exits it is a zombie, which is not alive.
        let fd = pidfd_open(identity);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        if let Ok(fd) = fd {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), wait_exit(fd))
                    .await
                    .expect("exits in time")
                    .expect("waits");
            });
            assert!(!identity.is_alive_same());
        }
        child.wait().expect("reaped");
        assert!(!identity.is_alive_same());
    }
}
