//! The memory cap of an instance (`[group.limits] memory`) as a cgroup
//! memory limit, where this host lets us make one; `RLIMIT_AS` of each
//! process otherwise (see [`super::process`]).
//!
//! Where the cap goes, tried in this order at each start of a process:
//!
//! 1. **cgroup v2**: the unified hierarchy (`/sys/fs/cgroup`, or
//!    `/sys/fs/cgroup/unified` on a hybrid host), when the memory
//!    controller is delegated to this process's cgroup (its
//!    `cgroup.subtree_control` lists `memory`): `memory.max` (and
//!    `memory.swap.max = 0`) of `taskherd.PID/GROUP.ID` under it;
//! 2. **cgroup v1**: the memory controller's hierarchy
//!    (`/sys/fs/cgroup/memory`), when this process may make a cgroup
//!    under its own there: `memory.limit_in_bytes` (and
//!    `memory.memsw.limit_in_bytes` when swap is accounted);
//! 3. else `RLIMIT_AS`, with the reason said once in the log.
//!
//! `PID` is the master's (or the agent's) pid: the herd's cgroup. The
//! child joins its instance's cgroup between fork and exec (before it
//! changes user), so the cap counts the whole instance, children
//! included. The kernel's OOM killer ends an instance over its cap
//! (SIGKILL); the supervisor reads the cgroup's OOM kill count to say so.
//! The instance's cgroup is removed after each run, and the herd's once
//! empty; those a killed master or agent left are removed by the next
//! herd that makes its cgroup beside them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The cgroup v1 memory controller's mount point.
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

/// Which cgroup interface holds an instance's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// The unified hierarchy.
    V2,
    /// The v1 memory controller.
    V1,
}

/// One instance's cgroup, made for one run of its process.
#[derive(Debug)]
pub(crate) struct InstanceCgroup {
    /// Which interface.
    pub(crate) version: Version,
    /// Its directory.
    pub(crate) dir: PathBuf,
    /// The herd's directory (its parent), removed once empty.
    herd: PathBuf,
    /// `cgroup.procs` of `dir`, for the child to join (made before the
    /// fork: nothing is allocated after it).
    pub(crate) procs: CString,
    /// OOM kills counted when it was made.
    oom_before: u64,
}

impl InstanceCgroup {
    /// Makes the cgroup of instance `name` (`GROUP.ID`) capped at `bytes`
    /// under the herd's cgroup, with the first interface this host lets
    /// us use.
    ///
    /// # Errors
    /// Why no cgroup could hold the cap (each interface's reason), for
    /// the log of the fallback to `RLIMIT_AS`.
    pub(crate) fn make(name: &str, bytes: u64) -> Result<InstanceCgroup, String> {
        let herd = format!("taskherd.{}", std::process::id());
        let v2 =
            v2_parent().and_then(|parent| make_in(Version::V2, &parent.join(&herd), name, bytes));
        let v2_why = match v2 {
            Ok(cgroup) => return Ok(cgroup),
            Err(why) => why,
        };
        let v1 =
            v1_parent().and_then(|parent| make_in(Version::V1, &parent.join(&herd), name, bytes));
        match v1 {
            Ok(cgroup) => Ok(cgroup),
            Err(v1_why) => Err(format!("cgroup v2: {v2_why}; cgroup v1: {v1_why}")),
        }
    }

    /// OOM kills in its cgroup since it was made.
    pub(crate) fn oom_kills(&self) -> u64 {
        oom_count(self.version, &self.dir).saturating_sub(self.oom_before)
    }

    /// Removes its cgroup (empty once its process group is gone), and the
    /// herd's once it is empty.
    ///
    /// # Errors
    /// Why its cgroup could not be removed (a process left in it).
    pub(crate) async fn remove(self) -> Result<(), String> {
        let result = remove_dir(&self.dir).await;
        // Other instances may still be in the herd's: not an error.
        let _ = std::fs::remove_dir(&self.herd);
        result.map_err(|err| format!("cannot remove cgroup {}: {err}", self.dir.display()))
    }

    /// How the log names it.
    pub(crate) fn describe(&self) -> String {
        let what = match self.version {
            Version::V2 => "cgroup v2 memory.max",
            Version::V1 => "cgroup v1 memory.limit_in_bytes",
        };
        format!("{what} of {}", self.dir.display())
    }
}

/// A cgroup directory goes with `rmdir`, its control files with it; a
/// busy one (a process inside) is retried a few times (the kernel may
/// still be tearing down a process that was just reaped).
async fn remove_dir(dir: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) if tries < 20 && err.raw_os_error() == Some(libc::EBUSY) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Makes `herd/name` capped at `bytes`.
fn make_in(
    version: Version,
    herd: &Path,
    name: &str,
    bytes: u64,
) -> Result<InstanceCgroup, String> {
    let mkdir = |dir: &Path| match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(format!("cannot make {}: {err}", dir.display())),
    };
    let dir = herd.join(name);
    // The herd's cgroup may go between the two mkdirs (its last instance
    // ended meanwhile, on another thread): then it is made again, once.
    for again in [false, true] {
        if mkdir(herd)? {
            if let Some(parent) = herd.parent() {
                sweep_stale(parent);
            }
        }
        if version == Version::V2 {
            // Children of the herd's cgroup get the memory controller.
            let _ = std::fs::write(herd.join("cgroup.subtree_control"), "+memory");
        }
        match std::fs::create_dir(&dir) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !again => continue,
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("cannot make {}: {err}", dir.display()))
            }
            _ => break,
        }
    }
    let write = |file: &str, value: &str| {
        std::fs::write(dir.join(file), value)
            .map_err(|err| format!("cannot write {}: {err}", dir.join(file).display()))
    };
    let set = match version {
        Version::V2 => write("memory.max", &bytes.to_string()).map(|()| {
            // No swapping around the cap, where swap is accounted.
            let _ = write("memory.swap.max", "0");
        }),
        Version::V1 => write("memory.limit_in_bytes", &bytes.to_string()).map(|()| {
            let _ = write("memory.memsw.limit_in_bytes", &bytes.to_string());
        }),
    };
    if let Err(why) = set {
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(herd);
        return Err(why);
    }
    let procs = CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| "a NUL in the cgroup path".to_string())?;
    Ok(InstanceCgroup {
        version,
        oom_before: oom_count(version, &dir),
        herd: herd.to_path_buf(),
        dir,
        procs,
    })
}

/// Removes the herd cgroups (`taskherd.PID`) under `parent` of masters
/// or agents that are gone (killed before they could remove them): their
/// instances' cgroups, then theirs. A cgroup with a process inside is
/// never removed (the kernel refuses), so a live one stays.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("taskherd."))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(entry.path()) {
            for child in children.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
        }
        let _ = std::fs::remove_dir(entry.path());
    }
}

/// Where the herd's cgroup goes in the unified hierarchy: this process's
/// cgroup when the memory controller is delegated to its children (its
/// `cgroup.subtree_control` lists `memory`: the root cgroup, as a rule,
/// since a cgroup with processes in it cannot hand controllers down),
/// else its parent's when that one hands the memory controller to its
/// children (this process's cgroup among them): the herd's cgroup is
/// then a sibling of this process's.
fn v2_parent() -> Result<PathBuf, String> {
    let mount = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|mount| mount.join("cgroup.controllers").exists())
        .ok_or("no unified hierarchy mounted")?;
    let own = own_cgroup(|controllers| controllers.is_empty(), "0")?;
    let dir = mount.join(own.trim_start_matches('/'));
    let delegated = |dir: &Path| -> Result<String, String> {
        std::fs::read_to_string(dir.join("cgroup.subtree_control")).map_err(|err| {
            format!(
                "cannot read {}: {err}",
                dir.join("cgroup.subtree_control").display()
            )
        })
    };
    let memory = |controllers: &str| controllers.split_whitespace().any(|c| c == "memory");
    let own_controllers = delegated(&dir)?;
    if memory(&own_controllers) {
        return Ok(dir);
    }
    if let Some(parent) = dir.parent().filter(|_| dir != mount) {
        if delegated(parent).is_ok_and(|controllers| memory(&controllers)) {
            return Ok(parent.to_path_buf());
        }
    }
    Err(format!(
        "the memory controller is not delegated to {} (its cgroup.subtree_control lists [{}]) \
         nor to its parent's children",
        dir.display(),
        own_controllers.trim()
    ))
}

/// This process's cgroup in the v1 memory hierarchy.
fn v1_parent() -> Result<PathBuf, String> {
    let mount = Path::new(V1_MEMORY);
    if !mount.join("memory.limit_in_bytes").exists() {
        return Err(format!("no memory controller mounted at {V1_MEMORY}"));
    }
    let own = own_cgroup(
        |controllers| controllers.split(',').any(|c| c == "memory"),
        "memory",
    )?;
    Ok(mount.join(own.trim_start_matches('/')))
}

/// This process's cgroup path in the hierarchy whose controllers field
/// of `/proc/self/cgroup` passes `pick` (`what` names it for errors).
fn own_cgroup(pick: impl Fn(&str) -> bool, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|err| format!("cannot read /proc/self/cgroup: {err}"))?;
    parse_own_cgroup(&text, pick).ok_or_else(|| format!("no {what} line in /proc/self/cgroup"))
}

/// The path of the line of `/proc/self/cgroup` (`ID:CONTROLLERS:PATH`)
/// whose controllers pass `pick`.
fn parse_own_cgroup(text: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        pick(controllers).then(|| path.to_string())
    })
}

/// The OOM kills counted in `dir` (`oom_kill N` of `memory.events`, v2,
/// or `memory.oom_control`, v1); 0 when unknown.
fn oom_count(version: Version, dir: &Path) -> u64 {
    let file = match version {
        Version::V2 => "memory.events",
        Version::V1 => "memory.oom_control",
    };
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|text| parse_oom_kills(&text))
        .unwrap_or(0)
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

/// In a child between fork and exec: joins the cgroup whose
/// `cgroup.procs` is `procs` (writing 0: "this process").
///
/// Async-signal-safe: `open`, `write`, `close`.
///
/// # Errors
/// The cgroup could not be joined.
pub(crate) fn join_in_child(procs: &CString) -> std::io::Result<()> {
    // SAFETY: a valid NUL-terminated path, a 1-byte buffer that lives
    // across the calls, and a descriptor we opened.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_cgroup_and_the_oom_count_are_read_from_the_kernel_files() {
        let hybrid =
            "9:name=systemd:/\n4:memory:/process_api/bc54\n1:cpu,cpuacct:/x\n0::/user.slice\n";
        assert_eq!(
            parse_own_cgroup(hybrid, |c| c.split(',').any(|c| c == "memory")).as_deref(),
            Some("/process_api/bc54")
        );
        assert_eq!(
            parse_own_cgroup(hybrid, str::is_empty).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(parse_own_cgroup("0::/\n", |c| c == "memory"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom 1\n"), None);
    }
}
