//! Real `sshd` hosts for tests: each on its own loopback address (or inside
//! a network namespace) on an ephemeral port, with generated keys, and an
//! `ssh_config` + `known_hosts` that reach them with strict host key
//! checking.
//!
//! Every session started through one of these sshd gets
//! `TASKHERD_TEST_SSHD=<marker>` in its environment (server-side `SetEnv`),
//! so processes that escaped the sshd's process tree (daemonized, reparented)
//! are still found and killed by [`SshHost::stop`].

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The sshd binary: it must be started by absolute path (it re-executes
/// itself for every connection).
pub const SSHD: &str = "/usr/sbin/sshd";

/// Environment variable sshd sets in every session it starts (value:
/// [`SshHost::marker`]).
pub const SSHD_MARK_VAR: &str = "TASKHERD_TEST_SSHD";

/// How long one sshd may take to show its banner.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// How many times a start is retried (port races, mostly).
const START_ATTEMPTS: u32 = 5;

/// Process-wide counter: host numbers, aliases, markers.
static NEXT_HOST: AtomicU32 = AtomicU32::new(2);

fn next_host_number() -> u32 {
    NEXT_HOST.fetch_add(1, Ordering::Relaxed)
}

/// A loopback address for the `n`-th host of this process:
/// `127.<pid hi>.<pid lo>.<2..=254>`, so concurrently running test processes
/// and tests inside one process get different addresses (any 127.x.y.z is
/// local on Linux without configuration).
fn loopback_for(n: u32) -> IpAddr {
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        ((pid >> 8) & 0xff) as u8,
        (pid & 0xff) as u8,
        (2 + (n - 2) % 253) as u8,
    ))
}

/// A one-of-a-kind string for leftover checks.
fn unique_marker(n: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos}", std::process::id())
}

/// Runs a helper program, panicking with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("{what}: cannot run {cmd:?}: {err}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Generates an ed25519 key pair without passphrase at `path` (+ `.pub`);
/// returns the public key line.
fn keygen(path: &Path, comment: &str) -> String {
    run(
        Command::new("ssh-keygen")
            .args(["-t", "ed25519", "-N", "", "-q", "-C", comment, "-f"])
            .arg(path),
        "generate an ed25519 key",
    );
    let public = path.with_extension("pub");
    let text = std::fs::read_to_string(&public)
        .unwrap_or_else(|err| panic!("read {}: {err}", public.display()));
    text.trim().to_string()
}

/// The installed OpenSSH version as (major, minor), from `sshd -V` (older
/// versions print it in their usage text, which is fine too).
fn sshd_version() -> (u32, u32) {
    static VERSION: OnceLock<(u32, u32)> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new(SSHD)
            .arg("-V")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| {
                panic!("cannot run {SSHD} (is openssh-server installed?): {err}")
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let parsed = text.split("OpenSSH_").nth(1).and_then(|rest| {
            let mut parts = rest.split(|c: char| !c.is_ascii_digit());
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        });
        // Unknown: assume an old one (no optional directives).
        parsed.unwrap_or((0, 0))
    })
}

/// One sshd and what identifies it.
pub struct SshHost {
    /// The Host alias in the world's ssh_config.
    alias: String,
    addr: IpAddr,
    port: u16,
    /// Network namespace the sshd runs in (`ip netns exec`), if any.
    netns: Option<String>,
    /// Value of [`SSHD_MARK_VAR`] in every session of this sshd.
    marker: String,
    /// `known_hosts` key part: "ssh-ed25519 AAAA...".
    host_key: String,
    /// Its sshd_config, host key, pid file and log.
    host_dir: PathBuf,
    /// The listening sshd; `None` once stopped.
    child: Option<Child>,
    /// Its `MaxStartups`.
    max_startups: u32,
    /// Its `MaxSessions`.
    max_sessions: u32,
    /// Keeps the directory holding the sshd's files alive while it runs.
    _dir: Arc<tempfile::TempDir>,
}

impl SshHost {
    /// Starts a standalone sshd on 127.x.y.N on an ephemeral port, with its
    /// own temp dir and an empty authorized_keys: it shows its banner but
    /// lets nobody in. Use [`SshWorld::add_host`] to log in.
    pub fn start() -> SshHost {
        SshHost::start_on(loopback_for(next_host_number()))
    }

    /// Like [`SshHost::start`], on a given (loopback) address.
    pub fn start_on(addr: IpAddr) -> SshHost {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir for a standalone sshd"));
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, "").expect("write an empty authorized_keys");
        SshHost::launch(
            dir,
            addr,
            None,
            &authorized_keys,
            (DEFAULT_MAX_STARTUPS, DEFAULT_MAX_SESSIONS),
        )
    }

    /// Starts an sshd in `dir/<alias>/`, accepting the keys of
    /// `authorized_keys`.
    fn launch(
        dir: Arc<tempfile::TempDir>,
        addr: IpAddr,
        netns: Option<&str>,
        authorized_keys: &Path,
        (max_startups, max_sessions): (u32, u32),
    ) -> SshHost {
        let n = next_host_number();
        let alias = format!("th-host-{n}");
        let host_dir = dir.path().join(&alias);
        std::fs::create_dir_all(&host_dir).expect("create the sshd's directory");
        // Privilege separation directory: sshd refuses to start without it.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let host_key_path = host_dir.join("ssh_host_ed25519_key");
        let host_key_line = keygen(&host_key_path, &alias);
        // "ssh-ed25519 AAAA... comment" -> drop the comment.
        let host_key = host_key_line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let mut host = SshHost {
            alias,
            addr,
            port: 0,
            netns: netns.map(str::to_string),
            marker: unique_marker(n),
            host_key,
            host_dir,
            child: None,
            max_startups,
            max_sessions,
            _dir: dir,
        };
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = host.pick_port(attempt);
            match host.try_start(port, authorized_keys) {
                Ok(child) => {
                    host.port = port;
                    host.child = Some(child);
                    return host;
                }
                Err(why) => failures.push(format!("attempt {attempt} on port {port}: {why}")),
            }
        }
        panic!(
            "could not start sshd on {addr}{}:\n{}",
            netns
                .map(|ns| format!(" in netns {ns}"))
                .unwrap_or_default(),
            failures.join("\n")
        );
    }

    /// An ephemeral port: from the kernel when the address is local here,
    /// else (inside a namespace, where nothing else listens) a pseudo-random
    /// one.
    fn pick_port(&self, attempt: u32) -> u16 {
        if self.netns.is_none() {
            let listener = TcpListener::bind((self.addr, 0))
                .unwrap_or_else(|err| panic!("bind {}:0 to find a free port: {err}", self.addr));
            return listener.local_addr().expect("local address").port();
        }
        let seed = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0),
            )
            .wrapping_add(attempt * 7919);
        20_000 + (seed % 30_000) as u16
    }

    /// Writes the sshd_config for `port`, starts sshd and waits for its
    /// banner. On failure the sshd is gone and the reason is returned.
    fn try_start(&self, port: u16, authorized_keys: &Path) -> Result<Child, String> {
        let listen = match self.addr {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        let mut config = format!(
            "ListenAddress {listen}\n\
             HostKey {host_key}\n\
             PidFile {pid_file}\n\
             AuthorizedKeysFile {authorized_keys}\n\
             StrictModes no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             MaxStartups {max_startups}\n\
             MaxSessions {max_sessions}\n\
             LogLevel ERROR\n\
             PrintMotd no\n\
             X11Forwarding no\n\
             Subsystem sftp internal-sftp\n\
             SetEnv {SSHD_MARK_VAR}={marker} XDG_STATE_HOME={state}\n",
            host_key = self.host_dir.join("ssh_host_ed25519_key").display(),
            // Each host keeps its own state (its agents' pid registry), as
            // a real host does, not one file for every host of the run.
            state = self.host_dir.join("state").display(),
            pid_file = self.host_dir.join("sshd.pid").display(),
            authorized_keys = authorized_keys.display(),
            marker = self.marker,
            max_startups = self.max_startups,
            max_sessions = self.max_sessions,
        );
        // From 9.8 on, sshd penalizes sources that disconnect before
        // authenticating (our readiness probe, host key failures): every
        // test connects from loopback, so that would lock the tests out.
        if sshd_version() >= (9, 8) {
            config.push_str("PerSourcePenalties no\n");
        }
        let config_path = self.host_dir.join("sshd_config");
        std::fs::write(&config_path, config).expect("write sshd_config");
        let log_path = self.host_dir.join("sshd.log");
        let log = std::fs::File::create(&log_path).expect("create the sshd log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the command: the child is sshd itself.
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, SSHD]);
                cmd
            }
            None => Command::new(SSHD),
        };
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log);
        let mut child = cmd.spawn().map_err(|err| format!("spawn {cmd:?}: {err}"))?;
        let deadline = Instant::now() + READY_WITHIN;
        let target = SocketAddr::new(self.addr, port);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on sshd") {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("sshd exited with {status}: {}", log.trim()));
            }
            if banner_at(target) {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "no SSH banner within {READY_WITHIN:?}: {}",
                    log.trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Host alias in the world's ssh_config, e.g. "th-host-3".
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The address sshd listens on.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The port sshd listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listening sshd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Value of [`SSHD_MARK_VAR`] in every session this sshd starts.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The sshd's log (stderr, LogLevel ERROR), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.host_dir.join("sshd.log")).unwrap_or_default()
    }

    /// Live processes started through this sshd: per-connection sshd
    /// processes and everything below them, and anything carrying its
    /// marker (daemonized session processes). The listener itself aside.
    pub fn processes(&self) -> Vec<i32> {
        let mut pids = match self.pid() {
            Some(root) => descendants(root as i32),
            None => Vec::new(),
        };
        for pid in marked_by(&self.marker) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }

    /// Kills every process started through this sshd, then the sshd
    /// (SIGTERM, SIGKILL after a bounded wait) and waits for it. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        let running = child.try_wait().ok().flatten().is_none();
        if running {
            // Frozen, the listener accepts no new connection while its
            // children are being killed. SIGKILL works on a stopped process.
            // SAFETY: plain kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        kill_all_until_gone(|| {
            let mut pids = if running {
                descendants(pid)
            } else {
                Vec::new()
            };
            pids.extend(marked_by(&self.marker));
            pids
        });
        if running {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
                libc::kill(pid, libc::SIGCONT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        // Anything forked in the last instant.
        kill_all_until_gone(|| marked_by(&self.marker));
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when an SSH server answers at `addr` with its banner.
fn banner_at(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 7 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"SSH-2.0")
}

/// SIGKILLs what `victims` lists, again and again, until it lists nothing
/// (bounded: panics after 10 s).
fn kill_all_until_gone(victims: impl Fn() -> Vec<i32>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = victims();
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            // Not a panic in Drop during an unwinding test: report instead.
            eprintln!("sshd harness: processes would not die: {pids:?}");
            return;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a process started through our sshd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (pid, ppid) of every live (non-zombie) process.
fn process_table() -> Vec<(i32, i32)> {
    let mut table = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if !state.starts_with(['Z', 'X']) {
            table.push((pid, ppid));
        }
    }
    table
}

/// Live processes whose parent chain leads to `root` (`root` aside).
fn descendants(root: i32) -> Vec<i32> {
    let table = process_table();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(pid, ppid) in &table {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}

/// Live processes whose environment holds `SSHD_MARK_VAR=marker`.
fn marked_by(marker: &str) -> Vec<i32> {
    let needle = format!("{SSHD_MARK_VAR}={marker}");
    process_table()
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
                .unwrap_or(false)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// What the world remembers of a host to write its config.
struct HostEntry {
    alias: String,
    addr: IpAddr,
    port: u16,
    host_key: String,
}

/// A temp dir with a user key pair, authorized_keys, an ssh_config with one
/// Host block per started host and a known_hosts with every host's key.
pub struct SshWorld {
    /// Shared with the hosts, so their files outlive the world if need be.
    dir: Arc<tempfile::TempDir>,
    hosts: Vec<HostEntry>,
    /// The login of its sessions.
    login: String,
}

impl SshWorld {
    /// A new world without hosts (empty ssh_config and known_hosts),
    /// whose sessions log in as [`login_user`].
    pub fn new() -> SshWorld {
        SshWorld::with_login(login_user())
    }

    /// A new world whose sessions log in as `login`.
    pub fn with_login(login: &str) -> SshWorld {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir for an ssh world"));
        let world = SshWorld {
            dir,
            hosts: Vec::new(),
            login: login.to_string(),
        };
        let public = keygen(&world.identity_file(), "taskherd-test-user");
        std::fs::write(world.authorized_keys(), format!("{public}\n"))
            .expect("write authorized_keys");
        world.write_files();
        world
    }

    fn authorized_keys(&self) -> PathBuf {
        self.dir.path().join("authorized_keys")
    }

    /// Starts a new sshd on 127.x.y.N and adds it to ssh_config and
    /// known_hosts.
    pub fn add_host(&mut self) -> SshHost {
        self.add_host_on(loopback_for(next_host_number()), None)
    }

    /// Starts a new sshd on `addr`, inside network namespace `netns` (via
    /// `ip netns exec`) when given, and adds it to ssh_config and
    /// known_hosts.
    pub fn add_host_on(&mut self, addr: IpAddr, netns: Option<&str>) -> SshHost {
        self.launch_host(addr, netns, (DEFAULT_MAX_STARTUPS, DEFAULT_MAX_SESSIONS))
    }

    /// Starts a new sshd that sets up at most `max_startups` connections
    /// at once (its `MaxStartups`): it drops the next ones, as a busy
    /// sshd or bastion does.
    pub fn add_host_with_max_startups(&mut self, max_startups: u32) -> SshHost {
        self.launch_host(
            loopback_for(next_host_number()),
            None,
            (max_startups, DEFAULT_MAX_SESSIONS),
        )
    }

    /// Starts a new sshd with `MaxSessions` `max_sessions`: with 0 it
    /// lets logins in and refuses every session (a command, a shell).
    pub fn add_host_with_max_sessions(&mut self, max_sessions: u32) -> SshHost {
        self.launch_host(
            loopback_for(next_host_number()),
            None,
            (DEFAULT_MAX_STARTUPS, max_sessions),
        )
    }

    /// Another alias of `host` in ssh_config (same sshd): a second "host"
    /// for a master.
    pub fn add_alias(&mut self, host: &SshHost, alias: &str) {
        self.hosts.push(HostEntry {
            alias: alias.to_string(),
            addr: host.addr,
            port: host.port,
            host_key: host.host_key.clone(),
        });
        self.write_files();
    }

    fn launch_host(&mut self, addr: IpAddr, netns: Option<&str>, limits: (u32, u32)) -> SshHost {
        let host = SshHost::launch(
            self.dir.clone(),
            addr,
            netns,
            &self.authorized_keys(),
            limits,
        );
        self.hosts.push(HostEntry {
            alias: host.alias.clone(),
            addr: host.addr,
            port: host.port,
            host_key: host.host_key.clone(),
        });
        self.write_files();
        host
    }

    /// Rewrites ssh_config and known_hosts from the hosts added so far.
    fn write_files(&self) {
        let identity = self.identity_file();
        let known_hosts = self.known_hosts();
        let mut config = String::from("# Generated by the taskherd test harness.\n");
        let mut known = String::new();
        for host in &self.hosts {
            config.push_str(&format!(
                "\nHost {alias}\n\
                 \x20   HostName {addr}\n\
                 \x20   Port {port}\n\
                 \x20   User {user}\n\
                 \x20   IdentityFile {identity}\n\
                 \x20   IdentitiesOnly yes\n\
                 \x20   UserKnownHostsFile {known_hosts}\n\
                 \x20   GlobalKnownHostsFile /dev/null\n\
                 \x20   StrictHostKeyChecking yes\n\
                 \x20   UpdateHostKeys no\n\
                 \x20   BatchMode yes\n\
                 \x20   LogLevel ERROR\n\
                 \x20   ConnectTimeout 10\n",
                alias = host.alias,
                addr = host.addr,
                port = host.port,
                user = self.login,
                identity = identity.display(),
                known_hosts = known_hosts.display(),
            ));
            known.push_str(&format!(
                "[{}]:{} {}\n",
                host.addr, host.port, host.host_key
            ));
        }
        std::fs::write(self.ssh_config(), config).expect("write ssh_config");
        std::fs::write(&known_hosts, known).expect("write known_hosts");
    }

    /// The generated ssh_config (`[ssh] ssh_config = ...` for taskherd).
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// The generated known_hosts, with every added host's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The user's private key (ed25519, no passphrase).
    pub fn identity_file(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// The world's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `command` on `host` with plain `ssh -F <ssh_config>`.
    pub fn ssh(&self, host: &SshHost, command: &str) -> Output {
        self.ssh_command(host)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh")
    }

    /// An `ssh -F <ssh_config> <alias>` command, to add options and a
    /// remote command to.
    pub fn ssh_command(&self, host: &SshHost) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(self.ssh_config()).arg(host.alias());
        cmd
    }
}

impl Default for SshWorld {
    fn default() -> Self {
        SshWorld::new()
    }
}

/// The login of test sessions: `taskherd-test` when it exists (a uid-0
/// user with `/bin/sh` as shell, made by `scripts/test`), else `root`.
///
/// Root's own shell may be bash with an rc file that does slow or locking
/// work on every ssh command (here: `pyenv rehash`, whose lock is left
/// stale when a test kills a session in the middle of it and then makes
/// every later session wait); sessions of a plain `sh` login start at once.
pub fn login_user() -> &'static str {
    static USER: OnceLock<&'static str> = OnceLock::new();
    USER.get_or_init(|| {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        if passwd
            .lines()
            .any(|l| l.starts_with(&format!("{TEST_LOGIN}:")))
        {
            TEST_LOGIN
        } else {
            "root"
        }
    })
}

/// `MaxStartups` of the test sshds unless a test asks for less.
const DEFAULT_MAX_STARTUPS: u32 = 100;

/// `MaxSessions` of the test sshds unless a test asks for another.
const DEFAULT_MAX_SESSIONS: u32 = 100;

/// Name of the dedicated test login (see [`login_user`]).
pub const TEST_LOGIN: &str = "taskherd-test";

/// A login whose shell is bash with an rc file that costs what a real
/// one does (0.2 s) and notes every command it runs: a line with the
/// sshd's marker (`TASKHERD_TEST_SSHD`) in [`RC_LOGIN_LOG`], then waits
/// while the host's [`rc_gate`] exists. Made by `scripts/test` with
/// `TASKHERD_TEST_LOGIN=1`.
pub const RC_LOGIN: &str = "taskherd-rc";

/// Where [`RC_LOGIN`]'s rc file notes each command.
pub const RC_LOGIN_LOG: &str = "/var/lib/taskherd-rc/commands.log";

/// A login whose shell is tcsh (not a POSIX shell: what many HPC sites
/// give their users), whose `.tcshrc` notes every command it runs in
/// [`CSH_LOGIN_LOG`] as [`RC_LOGIN`]'s does. Made by `scripts/test` with
/// `TASKHERD_TEST_LOGIN=1`.
pub const CSH_LOGIN: &str = "taskherd-csh";

/// A login whose shell is elvish, which cannot read the agent's start
/// command (no `&&`). Made by `scripts/test` with `TASKHERD_TEST_LOGIN=1`.
pub const ELVISH_LOGIN: &str = "taskherd-elvish";

/// Where [`CSH_LOGIN`]'s rc file notes each command.
pub const CSH_LOGIN_LOG: &str = "/var/lib/taskherd-csh/commands.log";

/// Whether the login `name` exists here.
pub fn login_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .any(|line| line.starts_with(&format!("{name}:")))
}

/// The file [`RC_LOGIN`]'s rc file waits on, after noting the command,
/// for as long as it exists: a test holds that host's logins there.
pub fn rc_gate(host: &SshHost) -> String {
    format!("/tmp/taskherd-rc-gate-{}", host.marker())
}

/// How many commands an rc file that notes them in `log` has noted on
/// `host`.
pub fn commands_noted(log: &str, host: &SshHost) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| *line == host.marker())
        .count()
}
