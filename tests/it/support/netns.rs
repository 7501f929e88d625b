//! Network namespaces for partition tests: a namespace joined to the root
//! namespace by a veth pair, whose link can be cut without any FIN or RST.
//!
//! Namespace `th-<pid>-<n>`, veth `th-<pid>-<n>h` (root side,
//! 10.213.<k>.1/30) and `th-<pid>-<n>i` (inside, 10.213.<k>.2/30). A
//! blackhole route for 10.213.<k>.0/30 with the worst metric stays under the
//! connected route: should the veth ever go away or down on the root side,
//! traffic for the namespace is dropped here instead of following the
//! default route out of the machine.
//!
//! Creation and teardown are serialized between test processes by a lock
//! file; a state file per namespace records its <k>, so a later run can
//! clean up after a crashed one.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the lock and the state files live.
const STATE_DIR: &str = "/run/taskherd-tests/netns";

/// Prefix of every namespace (and veth) these tests create.
const PREFIX: &str = "th-";

/// Metric of the safety blackhole route: the worst there is.
const BLACKHOLE_METRIC: &str = "4294967295";

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth link to the root namespace.
pub struct NetNs {
    /// `th-<pid>-<n>`: the creator's pid tells stale namespaces apart.
    name: String,
    /// Root-namespace end of the veth pair.
    outside_if: String,
    /// End of the veth pair inside the namespace.
    inside_if: String,
    /// Third octet of 10.213.<k>.0/30.
    k: u8,
}

/// Runs `ip` with `args`; Err(stderr) when it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run `ip`: {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Holds an exclusive flock on the state dir's lock file while alive.
struct Lock(File);

impl Lock {
    fn take() -> Result<Lock, String> {
        std::fs::create_dir_all(STATE_DIR).map_err(|err| format!("create {STATE_DIR}: {err}"))?;
        let path = Path::new(STATE_DIR).join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|err| format!("open {}: {err}", path.display()))?;
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(format!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Lock(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn state_file(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || last_errno() == libc::EPERM)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The creator pid in `th-<pid>-<n>`.
fn creator_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Does any route of the root namespace (other than the default route)
/// cover 10.213.<k>.0/30 or lie inside it? Then <k> is taken.
fn subnet_taken(routes: &str, k: u8) -> bool {
    let ours = u32::from(Ipv4Addr::new(10, 213, k, 0));
    routes.lines().any(|line| {
        let mut words = line.split_whitespace();
        let mut dest = words.next().unwrap_or("");
        // "blackhole 10.0.0.0/30 ...", "unreachable ...": the type comes first.
        if matches!(
            dest,
            "blackhole"
                | "unreachable"
                | "prohibit"
                | "throw"
                | "unicast"
                | "local"
                | "broadcast"
                | "anycast"
                | "multicast"
                | "nat"
        ) {
            dest = words.next().unwrap_or("");
        }
        if dest == "default" || dest.is_empty() {
            return false;
        }
        let (addr, len) = dest.split_once('/').unwrap_or((dest, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            return false;
        };
        let addr = u32::from(addr);
        // Overlap of addr/len and ours/30: compare under the shorter mask.
        let shorter = len.min(30);
        let mask = if shorter == 0 {
            0
        } else {
            u32::MAX << (32 - shorter)
        };
        addr & mask == ours & mask
    })
}

impl NetNs {
    /// Creates namespace `th-<pid>-<n>` with a veth pair: 10.213.<k>.1/30 on
    /// the root side, 10.213.<k>.2/30 inside, both up, lo up inside.
    /// Namespaces left by dead test processes are removed first.
    ///
    /// # Errors
    ///
    /// The reason, when not root or `ip netns` is unavailable or fails (the
    /// caller skips its test and prints it).
    pub fn create() -> Result<NetNs, String> {
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".to_string());
        }
        ip(&["netns", "list"]).map_err(|err| format!("`ip netns` is not available: {err}"))?;
        let _lock = Lock::take()?;
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT_NS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}-{n}");
        let outside_if = format!("{name}h");
        let inside_if = format!("{name}i");
        if outside_if.len() > 15 {
            return Err(format!("interface name {outside_if} is too long"));
        }
        let routes = ip(&["-4", "route", "show", "table", "all"])?;
        let used: Vec<u8> = std::fs::read_dir(STATE_DIR)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|text| text.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let start = pid.wrapping_mul(31).wrapping_add(n) % 256;
        let k = (0..256u32)
            .map(|i| ((start + i) % 256) as u8)
            .find(|&k| !used.contains(&k) && !subnet_taken(&routes, k))
            .ok_or("no free 10.213.<k>.0/30 subnet")?;
        let ns = NetNs {
            name,
            outside_if,
            inside_if,
            k,
        };
        // Recorded before anything exists, so a crash half-way is swept.
        std::fs::write(state_file(&ns.name), format!("{k}\n"))
            .map_err(|err| format!("write the state of {}: {err}", ns.name))?;
        if let Err(err) = ns.set_up() {
            ns.tear_down();
            return Err(err);
        }
        Ok(ns)
    }

    fn set_up(&self) -> Result<(), String> {
        let (name, outside, inside) = (&self.name, &self.outside_if, &self.inside_if);
        let outside_cidr = format!("{}/30", self.outside_addr());
        let inside_cidr = format!("{}/30", self.inside_addr());
        ip(&["netns", "add", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", outside, "type", "veth", "peer", "name", inside,
        ])?;
        ip(&["link", "set", inside, "netns", name])?;
        ip(&["addr", "add", &outside_cidr, "dev", outside])?;
        ip(&["-n", name, "addr", "add", &inside_cidr, "dev", inside])?;
        ip(&["link", "set", outside, "up"])?;
        ip(&["-n", name, "link", "set", inside, "up"])?;
        ip(&[
            "route",
            "add",
            "blackhole",
            &self.subnet(),
            "metric",
            BLACKHOLE_METRIC,
        ])?;
        self.wait_carrier(true)
    }

    /// "10.213.<k>.0/30".
    fn subnet(&self) -> String {
        format!("10.213.{}.0/30", self.k)
    }

    /// Waits (bounded) until the root side of the veth has (or lost) its
    /// carrier.
    fn wait_carrier(&self, up: bool) -> Result<(), String> {
        let path = format!("/sys/class/net/{}/carrier", self.outside_if);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Reading carrier of an admin-down link fails: that is "no".
            let carrier = std::fs::read_to_string(&path)
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            if carrier == up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not get carrier {} in time",
                    self.outside_if,
                    if up { "up" } else { "down" }
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 10.213.<k>.2, inside the namespace.
    pub fn inside_addr(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.k, 2))
    }

    /// 10.213.<k>.1, the root namespace's end.
    pub fn outside_addr(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, self.k, 1))
    }

    /// Cuts all traffic between the namespace and the root namespace,
    /// silently: the inside end goes down, so both sides' packets are
    /// dropped and nobody sees a FIN or RST (established connections just
    /// stall; new ones time out).
    ///
    /// The inside end, not the root side: with the root side down its
    /// connected route vanishes, and (but for the blackhole route) traffic
    /// would leave through the default route.
    pub fn partition(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inside_if, "down"])
            .expect("partition: set the inside veth down");
        self.wait_carrier(false).expect("partition");
    }

    /// Undoes [`NetNs::partition`]; returns once the link is back up.
    pub fn heal(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inside_if, "up"])
            .expect("heal: set the inside veth up");
        self.wait_carrier(true).expect("heal");
        // Connects tried during the partition left FAILED neighbour
        // entries that answer "no route to host" for a while: forget them.
        let _ = ip(&["neigh", "flush", "dev", &self.outside_if]);
        let _ = ip(&["-n", &self.name, "neigh", "flush", "dev", &self.inside_if]);
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.name)
    }

    fn tear_down(&self) {
        remove(&self.name, Some(self.k));
    }
}

impl Drop for NetNs {
    /// Kills every process in the namespace, deletes it, its veth pair and
    /// the blackhole route.
    fn drop(&mut self) {
        let _lock = Lock::take();
        self.tear_down();
    }
}

fn pids_in(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Removes namespace `name` and what belongs to it; every step is
/// best-effort (it may be half-built). Call with the lock held.
fn remove(name: &str, k: Option<u8>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(name);
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("netns harness: processes in {name} would not die: {pids:?}");
            }
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a process inside our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Deleting one end deletes both, at once; the namespace itself is freed
    // asynchronously by the kernel, which would leave the veth for a while.
    let _ = ip(&["link", "del", &format!("{name}h")]);
    let _ = ip(&["netns", "del", name]);
    let k = k.or_else(|| {
        std::fs::read_to_string(state_file(name))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    });
    if let Some(k) = k {
        let _ = ip(&[
            "route",
            "del",
            "blackhole",
            &format!("10.213.{k}.0/30"),
            "metric",
            BLACKHOLE_METRIC,
        ]);
    }
    let _ = std::fs::remove_file(state_file(name));
}

/// Removes namespaces (and state files) whose creator is dead. Call with the
/// lock held.
fn sweep_stale() {
    let mut names: Vec<String> = ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_string)
        .collect();
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if name.starts_with(PREFIX) && !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    for name in names {
        if let Some(pid) = creator_pid(&name) {
            if !pid_alive(pid) {
                remove(&name, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subnet_taken;

    #[test]
    fn subnet_taken_sees_overlaps() {
        let routes = "default via 192.0.2.1 dev eth0\n\
                      192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2\n\
                      10.213.7.0/30 dev x proto kernel scope link\n\
                      blackhole 10.213.9.0/30 metric 4294967295\n\
                      10.213.64.0/18 via 192.0.2.1 dev eth0\n";
        assert!(subnet_taken(routes, 7));
        assert!(subnet_taken(routes, 9));
        assert!(subnet_taken(routes, 70));
        assert!(!subnet_taken(routes, 8));
        assert!(!subnet_taken(routes, 200));
    }
}
