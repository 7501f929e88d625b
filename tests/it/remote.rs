//! Remote placement against real sshd hosts on loopback (and in a network
//! namespace for the partition test): the launcher scenarios of the
//! original suite, plus faults.

use crate::support::netns::NetNs;
use crate::support::sshd::{self, SshHost, SshWorld};
use crate::support::{describe, taskherd_bin, Herd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `[master]` and `[ssh]` tables of a test herd. Hosts are this
/// machine, so the agent is the built binary (`agent_path`); the upload
/// path has its own test.
pub(crate) fn header(world: &SshWorld, master_extra: &str) -> String {
    format!(
        r#"
[master]
agent_path = "{agent}"
heartbeat = "200ms"
orphan_timeout = "3s"
{master_extra}

[ssh]
ssh_config = "{config}"
"#,
        agent = taskherd_bin().display(),
        config = world.ssh_config().display(),
    )
}

/// SIGKILLs the agent named by a `host ...: connected, agent pid N` line.
pub(crate) fn kill_agent(connected: &str) {
    let agent_pid: i32 = connected
        .split("agent pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("agent pid in the log");
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGKILL) }, 0);
}

/// Waits (bounded) until nothing started through `host` is left.
pub(crate) fn assert_host_clean(host: &SshHost) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = host.processes();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let described: Vec<String> = left.iter().map(|pid| describe(*pid)).collect();
            panic!("left on host {}: {described:?}", host.alias());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of `worker` processes among `pids`.
fn workers(pids: &[i32]) -> Vec<i32> {
    pids.iter()
        .copied()
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("examples/worker")
        })
        .collect()
}

#[test]
fn one_instance_on_one_host() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "far"
command = "{{worker}}"
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        header(&world, ""),
        host = host.alias()
    ));
    herd.start();
    herd.wait_for(&format!("host {}: connected", host.alias()));
    herd.wait_for(&format!("[far] [{}] [worker/1/1] Child 1 1", host.alias()));
    herd.wait_for(&format!(
        "[far] [{}] [worker/1/1] Child clean exit",
        host.alias()
    ));
    herd.wait_for("all instances ended");
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_host_clean(&host);
}

#[test]
fn two_hosts_two_instances_each_with_params() {
    let mut world = SshWorld::new();
    let a = world.add_host();
    let b = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "pair"
command = "{{worker}}"
params = {{ message = "Hello from afar" }}
[[group.remote]]
hosts = ["{a}", "{b}"]
instances = 2
"#,
        header(&world, ""),
        a = a.alias(),
        b = b.alias()
    ));
    herd.start();
    for (host, id) in [
        (a.alias(), 1),
        (a.alias(), 2),
        (b.alias(), 3),
        (b.alias(), 4),
    ] {
        herd.wait_for(&format!(
            "[pair] [{host}] [worker/{id}/{id}] Hello from afar"
        ));
    }
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(herd.lines_with("Child clean exit").len(), 4);
    assert_host_clean(&a);
    assert_host_clean(&b);
}

#[test]
fn mixed_remote_and_local_groups() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "remote"
command = "{{worker}}"
[[group.remote]]
hosts = ["{host}"]
instances = 1

[[group]]
name = "local"
command = "{{worker}}"
[group.local]
instances = 1
"#,
        header(&world, ""),
        host = host.alias()
    ));
    herd.start();
    herd.wait_for(&format!(
        "[remote] [{}] [worker/1/1] Child 1 1",
        host.alias()
    ));
    herd.wait_for("[local] [localhost] [worker/2/1] Child 2 1");
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_host_clean(&host);
}

#[test]
fn remote_max_running_time_stops_cleanly_and_ignored_stop_is_killed() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "sleeper"
command = "{{worker}}"
params = {{ sleep = 60 }}
[[group.remote]]
hosts = ["{host}"]
instances = 1

[[group]]
name = "stubborn"
command = "{{worker}}"
params = {{ neverDie = true }}
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        header(&world, "max_running_time = \"3s\"\nstop_grace = \"1s\""),
        host = host.alias()
    ));
    herd.start();
    herd.wait_for("stopping every instance: max running time of 3s reached");
    herd.wait_for(&format!(
        "[sleeper] [{}] [worker/1/1] Child clean exit",
        host.alias()
    ));
    herd.wait_for(&format!(
        "[stubborn] [{}] [worker/2/1] still running 1s after stop: killing it",
        host.alias()
    ));
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.wait_for("had to kill 1 instance after the stop grace");
    assert_host_clean(&host);
}

#[test]
fn remote_hung_slave_is_killed_and_restarted_on_its_host() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "silent"
command = "{{worker}}"
params = {{ forceSleep = 90 }}
timeout = "1s"
restart = {{ initial = "100ms", limit = 2 }}
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        header(&world, ""),
        host = host.alias()
    ));
    herd.start();
    let prefix = format!("[silent] [{}] [worker/1/1]", host.alias());
    herd.wait_for(&format!("{prefix} marked failed after 2 restarts in a row"));
    assert_eq!(herd.wait_exit().code(), Some(1));
    assert_eq!(
        herd.lines_with(&format!("{prefix} liveness timeout: no ping"))
            .len(),
        3
    );
    assert_eq!(herd.lines_with(&format!("{prefix} restarting in")).len(), 2);
    // The host stayed up the whole time: one connection.
    assert_eq!(herd.lines_with("connected, agent pid").len(), 1);
    assert_host_clean(&host);
}

const LONG_RUNNERS: &str = r#"
[[group]]
name = "lib"
command = "{worker}"
params = { sleep = 1000 }
[[group.remote]]
hosts = ["HOSTS"]
instances = 2

[[group]]
name = "plain"
command = "sh"
args = ["-c", "echo plain up; exec sleep 1000"]
[[group.remote]]
hosts = ["HOSTS"]
instances = 1
"#;

fn long_runners(world: &SshWorld, hosts: &[&SshHost]) -> String {
    let names: Vec<&str> = hosts.iter().map(|h| h.alias()).collect();
    format!(
        "{}{}",
        header(world, "stop_grace = \"5s\""),
        LONG_RUNNERS.replace("HOSTS", &names.join("\", \""))
    )
}

#[test]
fn sigterm_to_the_master_leaves_nothing_on_any_host() {
    let mut world = SshWorld::new();
    let a = world.add_host();
    let b = world.add_host();
    let mut herd = Herd::new(&long_runners(&world, &[&a, &b]));
    herd.start();
    herd.wait_for_count("plain up", 2);
    herd.wait_for_count("] Child ", 4);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(herd.lines_with("Child clean exit").len(), 4);
    assert_eq!(herd.lines_with("stopped: killed by SIGTERM").len(), 2);
    assert!(herd.lines_with("had to kill").is_empty(), "{:?}", herd.seen);
    assert_host_clean(&a);
    assert_host_clean(&b);
}

#[test]
fn sigkill_to_the_master_leaves_nothing_after_a_few_seconds() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&long_runners(&world, &[&host]));
    herd.start();
    herd.wait_for("plain up");
    herd.wait_for_count("] Child ", 2);
    assert_eq!(workers(&host.processes()).len(), 2);
    herd.signal(libc::SIGKILL);
    herd.wait_exit();
    // The agent sees its stdin close and stops everything; the idle
    // ControlMaster follows within seconds.
    assert_host_clean(&host);
}

#[test]
fn one_remote_command_per_host_with_the_agent_cached_two_when_uploaded() {
    one_command_per_host_as(sshd::RC_LOGIN, sshd::RC_LOGIN_LOG);
}

/// The same through a tcsh login: the start command is run by the login
/// shell itself, and tcsh (not a POSIX shell) runs it too, in one command.
#[test]
fn a_tcsh_login_also_costs_one_command_per_host() {
    one_command_per_host_as(sshd::CSH_LOGIN, sshd::CSH_LOGIN_LOG);
}

/// A login shell that cannot read the start command (elvish: no `&&`)
/// gets it again through `sh -c`, and says so; uploaded, then cached.
#[test]
fn a_login_shell_that_cannot_read_the_start_command_gets_it_through_sh() {
    let Some(mut world) = world_of_login(sshd::ELVISH_LOGIN) else {
        return;
    };
    let host = world.add_host();
    let agents = tempfile::tempdir().expect("temp dir");
    let config = cached_agent_config(&world, agents.path(), &[&host], 2);
    let through_sh = "the login shell cannot run the agent's start command; it ran through sh -c";
    for (run, uploads) in [("first", 1), ("second", 0)] {
        let mut herd = Herd::new(&config);
        herd.start();
        assert_eq!(herd.wait_exit().code(), Some(0), "{run}: {:?}", herd.seen);
        assert_eq!(
            herd.lines_with("Child clean exit").len(),
            2,
            "{run}: {:?}",
            herd.seen
        );
        assert_eq!(
            herd.lines_with(through_sh).len(),
            1,
            "{run}: {:?}",
            herd.seen
        );
        assert_eq!(
            herd.lines_with("uploaded the agent to").len(),
            uploads,
            "{run}: {:?}",
            herd.seen
        );
    }
    assert_host_clean(&host);
}

/// Two runs on two hosts as `login`, whose rc file notes each command in
/// `log`: the first uploads the agent (two commands per host), the second
/// finds it (one).
fn one_command_per_host_as(login: &str, log: &str) {
    let Some(mut world) = world_of_login(login) else {
        return;
    };
    let hosts = [world.add_host(), world.add_host()];
    let agents = tempfile::tempdir().expect("temp dir");
    let config = cached_agent_config(&world, agents.path(), &[&hosts[0], &hosts[1]], 2);
    // Each command a login runs passes through its rc file, which notes it.
    let first_count: Vec<usize> = hosts
        .iter()
        .map(|host| sshd::commands_noted(log, host))
        .collect();
    let mut first = Herd::new(&config);
    first.start();
    first.wait_for_count("uploaded the agent to", 2);
    assert_eq!(first.wait_exit().code(), Some(0), "{:?}", first.seen);
    assert_eq!(
        first.lines_with("Child clean exit").len(),
        4,
        "{:?}",
        first.seen
    );
    // Uploaded: the look, then the upload that starts it.
    for (host, before) in hosts.iter().zip(&first_count) {
        assert_eq!(
            sshd::commands_noted(log, host) - before,
            2,
            "commands on {}",
            host.alias()
        );
    }
    let mut second = Herd::new(&config);
    second.start();
    assert_eq!(second.wait_exit().code(), Some(0), "{:?}", second.seen);
    assert_eq!(
        second.lines_with("Child clean exit").len(),
        4,
        "{:?}",
        second.seen
    );
    assert!(
        second.lines_with("uploaded").is_empty(),
        "{:?}",
        second.seen
    );
    // Cached: one command per host.
    for (host, before) in hosts.iter().zip(&first_count) {
        assert_eq!(
            sshd::commands_noted(log, host) - before,
            3,
            "commands on {}",
            host.alias()
        );
    }
    for host in &hosts {
        assert_host_clean(host);
    }
}

/// A world whose sessions log in as `login`, or `None` (the test skips,
/// saying so) when this machine has no such login.
fn world_of_login(login: &str) -> Option<SshWorld> {
    if !sshd::login_exists(login) {
        eprintln!(
            "skipped: no {login} login here (scripts/test makes it with TASKHERD_TEST_LOGIN=1, as .ci/run does)"
        );
        return None;
    }
    Some(SshWorld::with_login(login))
}

/// A herd of `instances` workers on each of `hosts`, its agents uploaded
/// to (and cached in) `agents`/cache.
fn cached_agent_config(
    world: &SshWorld,
    agents: &Path,
    hosts: &[&SshHost],
    instances: u32,
) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("{:?}", h.alias())).collect();
    format!(
        r#"
[master]
agent_dir = "{dir}"

[ssh]
ssh_config = "{config}"

[[group]]
name = "far"
command = "{{worker}}"
[[group.remote]]
hosts = [{hosts}]
instances = {instances}
"#,
        dir = agents.join("cache").display(),
        config = world.ssh_config().display(),
        hosts = hosts.join(", "),
    )
}

/// A herd of one group with `instances` worker(s) on each of `hosts`
/// (aliases of the world's ssh_config), with `master` lines.
fn herd_on(world: &SshWorld, hosts: &[&str], instances: u32, master: &str) -> Herd {
    let hosts: Vec<String> = hosts.iter().map(|host| format!("{host:?}")).collect();
    Herd::new(&format!(
        r#"{header}
[[group]]
name = "far"
command = "{{worker}}"
[[group.remote]]
hosts = [{hosts}]
instances = {instances}
"#,
        header = header(world, master),
        hosts = hosts.join(", "),
    ))
}

#[test]
fn a_host_that_refuses_the_handshake_is_retried_and_joins() {
    let mut world = SshWorld::new();
    let host = world.add_host_with_max_startups(1);
    // A connection that never authenticates holds sshd's one startup:
    // the master's is dropped until it goes (as sshd does past
    // MaxStartups).
    // (The harness's own readiness probe may hold it a moment longer:
    // until then sshd answers "Exceeded MaxStartups".)
    let deadline = Instant::now() + Duration::from_secs(20);
    let squatter = loop {
        let mut stream = std::net::TcpStream::connect((host.addr(), host.port())).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut banner = [0u8; 4];
        if std::io::Read::read_exact(&mut stream, &mut banner).is_ok() && &banner == b"SSH-" {
            break stream;
        }
        assert!(Instant::now() < deadline, "sshd never let a connection in");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut herd = herd_on(&world, &[host.alias()], 1, "");
    herd.start();
    let refused = herd.wait_for("refused before the handshake");
    assert!(
        refused.contains(&format!("host {}", host.alias())),
        "{refused}"
    );
    assert!(refused.contains("info"), "said quietly: {refused}");
    drop(squatter);
    herd.wait_for(&format!("host {}: connected", host.alias()));
    herd.wait_for("Child clean exit");
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    // Said once, however many times it was refused.
    assert_eq!(herd.lines_with("refused before the handshake").len(), 1);
    assert_host_clean(&host);
}

/// A host that lets the login in but refuses every session (sshd's
/// `MaxSessions 0`): ssh ends with 255 after the handshake, which is a
/// connection error with ssh's own words, retried, not a login shell that
/// cannot read the start command (no second try through `sh -c`).
#[test]
fn a_host_that_refuses_sessions_is_a_connection_error() {
    let mut world = SshWorld::new();
    let host = world.add_host_with_max_sessions(0);
    let mut herd = herd_on(&world, &[host.alias()], 1, "");
    herd.start();
    let refused = herd.wait_for("cannot connect");
    assert!(
        refused.contains(&format!("host {}", host.alias())) && refused.contains("after logging in"),
        "{refused}"
    );
    herd.wait_for_count("cannot connect", 2);
    assert!(
        herd.lines_with("through sh -c").is_empty(),
        "{:?}",
        herd.seen
    );
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    assert_host_clean(&host);
}

#[test]
fn handshakes_are_capped_by_max_handshakes() {
    let mut world = SshWorld::new();
    // Two startups at once at most; four hosts (aliases of this sshd)
    // one handshake at a time never meet the limit.
    let host = world.add_host_with_max_startups(2);
    let aliases = ["th-cap-a", "th-cap-b", "th-cap-c", "th-cap-d"];
    for alias in aliases {
        world.add_alias(&host, alias);
    }
    let mut herd = herd_on(&world, &aliases, 1, "max_handshakes = 1");
    herd.start();
    for alias in aliases {
        herd.wait_for(&format!("host {alias}: connected"));
    }
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with("Child clean exit").len(),
        4,
        "{:?}",
        herd.seen
    );
    assert!(
        herd.lines_with("refused before the handshake").is_empty(),
        "{:?}",
        herd.seen
    );
    assert_host_clean(&host);
}

/// A handshake turn ends with the handshake, not with the login's rc
/// files: with one turn, two hosts whose logins are held in their rc file
/// (a gate file that the test login's `.bashrc` waits on) both get to
/// run it. Were the turn held until the start command answers, the
/// second host could not log in while the first is held.
#[test]
fn a_login_held_in_its_rc_file_does_not_hold_a_handshake_turn() {
    let Some(mut world) = world_of_login(sshd::RC_LOGIN) else {
        return;
    };
    let hosts = [world.add_host(), world.add_host()];
    let gates: Vec<Gate> = hosts.iter().map(Gate::close).collect();
    let agents = tempfile::tempdir().expect("temp dir");
    let config = cached_agent_config(&world, agents.path(), &[&hosts[0], &hosts[1]], 2)
        .replace("[master]\n", "[master]\nmax_handshakes = 1\n");
    let before: Vec<usize> = hosts
        .iter()
        .map(|host| sshd::commands_noted(sshd::RC_LOGIN_LOG, host))
        .collect();
    let mut herd = Herd::new(&config);
    herd.start();
    // Shorter than a handshake's own limit (2 × ConnectTimeout + 5 s),
    // past which a held turn would be released by a failure.
    let deadline = Instant::now() + Duration::from_secs(20);
    while hosts
        .iter()
        .zip(&before)
        .any(|(host, before)| sshd::commands_noted(sshd::RC_LOGIN_LOG, host) == *before)
    {
        assert!(
            Instant::now() < deadline,
            "both logins did not reach their rc file with one handshake turn: {:?}",
            herd.seen
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(gates);
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    assert!(
        herd.lines_with("cannot connect").is_empty(),
        "{:?}",
        herd.seen
    );
    assert_eq!(
        herd.lines_with("Child clean exit").len(),
        4,
        "{:?}",
        herd.seen
    );
    for host in &hosts {
        assert_host_clean(host);
    }
}

/// A file that [`sshd::RC_LOGIN`]'s rc file waits on, for the logins of
/// one host, as long as it exists (removed when dropped).
struct Gate(PathBuf);

impl Gate {
    fn close(host: &SshHost) -> Gate {
        let path = PathBuf::from(sshd::rc_gate(host));
        std::fs::write(&path, b"").expect("write the gate");
        Gate(path)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn agent_is_uploaded_once_when_missing() {
    // A master notes its executable's hash only once the file has not
    // changed for 2 s (exe_hash::SETTLED): a binary built just now must
    // age that much first.
    let changed = std::fs::metadata(taskherd_bin())
        .map(|meta| {
            use std::os::unix::fs::MetadataExt as _;
            std::time::UNIX_EPOCH
                + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().max(0) as u32)
        })
        .expect("stat the binary");
    let settled = changed + Duration::from_millis(2100);
    if let Ok(wait) = settled.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(wait.min(Duration::from_millis(2100)));
    }
    let mut world = SshWorld::new();
    let host = world.add_host();
    let agents = tempfile::tempdir().expect("temp dir");
    let config = cached_agent_config(&world, agents.path(), &[&host], 1);
    let mut first = Herd::new(&config);
    first.start();
    let line = first.wait_for("uploaded the agent to");
    assert_eq!(first.wait_exit().code(), Some(0), "{:?}", first.seen);
    let uploaded: Vec<_> = std::fs::read_dir(agents.path().join("cache"))
        .expect("agent dir exists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(uploaded.len(), 1, "{uploaded:?}");
    assert!(uploaded[0].starts_with(&format!("taskherd-{}-", env!("CARGO_PKG_VERSION"))));
    assert!(line.contains(&uploaded[0]), "{line}");
    let copy = std::fs::read(agents.path().join("cache").join(&uploaded[0])).expect("read copy");
    assert!(
        copy == std::fs::read(taskherd_bin()).expect("read binary"),
        "the uploaded agent differs from the binary (was it rebuilt meanwhile?)"
    );
    // The master noted its executable's hash, which names the agent, for
    // its next runs.
    let noted_file = first.state_file().with_file_name("exe-sha256");
    let noted = std::fs::read_to_string(&noted_file).expect("exe-sha256 written");
    let name_hash = uploaded[0].rsplit('-').next().expect("hash in the name");
    assert!(
        noted
            .lines()
            .filter_map(|line| line.rsplit(' ').next())
            .any(|hash| hash.len() == 64 && hash.starts_with(name_hash)),
        "{noted_file:?}: {noted}"
    );

    let mut second = Herd::new(&config);
    second.start();
    second.wait_for("Child clean exit");
    assert_eq!(second.wait_exit().code(), Some(0));
    assert!(
        second.lines_with("uploaded").is_empty(),
        "{:?}",
        second.seen
    );
    assert_host_clean(&host);
}

#[test]
fn a_wrong_hash_in_the_master_s_cache_fails_the_upload_and_is_dropped() {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let mut world = SshWorld::new();
    let host = world.add_host();
    let agents = tempfile::tempdir().expect("temp dir");
    let config = cached_agent_config(&world, agents.path(), &[&host], 1);
    let mut herd = Herd::new(&config);
    // The master's cache (exe_hash.rs: dev ino size mtime ctime sha256)
    // says something else of this very binary.
    let meta = std::fs::metadata(taskherd_bin()).expect("stat the binary");
    let key = format!(
        "{} {} {} {}.{} {}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let wrong = "0123456789abcdef".repeat(4);
    let cache = herd.state_file().with_file_name("exe-sha256");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache.parent().expect("state dir"))
        .expect("state dir");
    std::fs::write(&cache, format!("{key} {wrong}\n")).expect("plant");
    herd.start();
    let error = herd.wait_for("hash mismatch");
    assert!(error.contains("restart the master"), "{error}");
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    let left = std::fs::read_to_string(&cache).expect("cache");
    assert!(!left.contains(&wrong), "{left}");
    // Nothing was left on the host under the wrong name.
    let cached: Vec<_> = std::fs::read_dir(agents.path().join("cache"))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cached.is_empty(), "{cached:?}");
    assert_host_clean(&host);
}

/// A herd of one long-running worker on `good` and one on a host nothing
/// listens for (port 1 of a loopback address), with `master_extra` in
/// `[master]` and `ssh_extra` in `[ssh]`.
fn beside_unreachable(
    world: &SshWorld,
    good: &SshHost,
    master_extra: &str,
    ssh_extra: &str,
) -> String {
    format!(
        r#"{}{ssh_extra}
[[group]]
name = "spread"
command = "{{worker}}"
params = {{ sleep = 1000 }}
[[group.remote]]
hosts = ["{good}", "root@127.0.0.1:1"]
instances = 1
"#,
        header(world, master_extra),
        good = good.alias()
    )
}

#[test]
fn unreachable_host_is_reported_and_the_others_run() {
    let mut world = SshWorld::new();
    let good = world.add_host();
    let mut herd = Herd::new(&beside_unreachable(
        &world,
        &good,
        "max_running_time = \"4s\"",
        "",
    ));
    herd.start();
    let error = herd.wait_for("host 127.0.0.1:1: cannot connect");
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );
    assert!(error.contains("retrying in"), "{error}");
    herd.wait_for(&format!(
        "[spread] [{}] [worker/1/1] Child 1 1",
        good.alias()
    ));
    herd.wait_for(&format!(
        "[spread] [{}] [worker/1/1] Child clean exit",
        good.alias()
    ));
    // The instance that never started makes the run a failure.
    assert_eq!(herd.wait_exit().code(), Some(1));
    herd.wait_for("never started on 127.0.0.1:1");
    assert_host_clean(&good);
}

#[test]
fn a_host_is_given_up_after_its_lost_connections_in_a_row() {
    let mut world = SshWorld::new();
    let good = world.add_host();
    let mut herd = Herd::new(&beside_unreachable(&world, &good, "", "give_up_after = 2"));
    herd.start();
    // Tried twice, then given up: its instance ends lost at once.
    let given_up = herd.wait_for("given up after 2 lost connections in a row");
    assert!(
        given_up.contains("host 127.0.0.1:1: cannot connect")
            && given_up.to_lowercase().contains("connection refused"),
        "{given_up}"
    );
    assert_eq!(herd.lines_with("host 127.0.0.1:1: cannot connect").len(), 2);
    herd.wait_for("[spread] [127.0.0.1:1] [worker/2/2] lost: cannot connect");
    // A connection that reached the agent starts the count again: the
    // good host's agent is lost twice and comes back each time.
    for round in 1..=2 {
        let connected = herd.wait_for_count("connected, agent pid", round);
        herd.wait_for_count(
            &format!("[spread] [{}] [worker/1/1] Child 1 1", good.alias()),
            round,
        );
        kill_agent(&connected);
    }
    herd.wait_for_count("connected, agent pid", 3);
    herd.wait_for_count(
        &format!("[spread] [{}] [worker/1/1] Child 1 1", good.alias()),
        3,
    );
    herd.signal(libc::SIGTERM);
    // The lost instance makes the run a failure.
    assert_eq!(herd.wait_exit().code(), Some(1));
    assert_eq!(herd.lines_with("host 127.0.0.1:1: cannot connect").len(), 2);
    assert_host_clean(&good);
}

#[test]
fn exec_tries_each_host_once_and_never_runs_a_command_twice() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    // An unreachable host: said, its instance lost, no retry, exit 1.
    let mut herd = Herd::new("");
    let hosts = [host.alias(), "root@127.0.0.1:1"];
    exec_sh(
        &mut herd,
        &world,
        &hosts,
        &[],
        "echo \"ran on $TASKHERD_HOST\"",
    );
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with(&format!("ran on {}", host.alias())).len(),
        1
    );
    assert_eq!(
        herd.lines_with("host 127.0.0.1:1: cannot connect").len(),
        1,
        "tried once: {:?}",
        herd.seen
    );
    assert_eq!(
        herd.lines_with("given up after 1 lost connection in a row (ssh.give_up_after)")
            .len(),
        1,
        "{:?}",
        herd.seen
    );
    assert!(herd.lines_with("retrying in").is_empty(), "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with("taskherd exec: 2 instances on 2 hosts: 1 exited 0, 1 lost")
            .len(),
        1,
        "{:?}",
        herd.seen
    );
    // A host lost while its command runs: the command is not run again.
    let mut herd = Herd::new("");
    exec_sh(
        &mut herd,
        &world,
        &[host.alias()],
        &["-v"],
        "echo \"started on $TASKHERD_HOST\"; exec sleep 60",
    );
    let connected = herd.wait_for("connected, agent pid");
    herd.wait_for("started on");
    kill_agent(&connected);
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    assert_eq!(herd.lines_with("started on").len(), 1, "{:?}", herd.seen);
    assert_eq!(herd.lines_with("connected, agent pid").len(), 1);
    assert_eq!(
        herd.lines_with("taskherd exec: 1 instance on 1 host: 0 exited 0, 1 lost")
            .len(),
        1,
        "{:?}",
        herd.seen
    );
    assert_host_clean(&host);
    herd.assert_no_leftovers();
}

#[test]
fn changed_host_key_is_refused_under_the_strict_policy() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    // A known_hosts that pins another key for this host.
    let other_key = std::fs::read_to_string(world.identity_file().with_extension("pub"))
        .expect("user public key");
    let pinned = world.dir().join("wrong_known_hosts");
    std::fs::write(
        &pinned,
        format!("[{}]:{} {other_key}", host.addr(), host.port()),
    )
    .expect("write known_hosts");
    let config = std::fs::read_to_string(world.ssh_config())
        .expect("read ssh_config")
        .replace(
            &world.known_hosts().display().to_string(),
            &pinned.display().to_string(),
        );
    let wrong_config = world.dir().join("wrong_ssh_config");
    std::fs::write(&wrong_config, config).expect("write ssh_config");
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"
max_running_time = "3s"

[ssh]
ssh_config = "{wrong}"

[[group]]
name = "far"
command = "{{worker}}"
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        agent = taskherd_bin().display(),
        wrong = wrong_config.display(),
        host = host.alias()
    ));
    herd.start();
    let error = herd.wait_for(&format!("host {}: cannot connect", host.alias()));
    assert!(error.contains("host key verification failed"), "{error}");
    assert_eq!(herd.wait_exit().code(), Some(1));
    assert!(herd.lines_with("Child 1 1").is_empty());
    assert_host_clean(&host);
}

#[test]
fn killed_agent_is_replaced_and_its_instances_restarted() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&long_runners(&world, &[&host]));
    herd.start();
    let connected = herd.wait_for("connected, agent pid");
    herd.wait_for_count("] Child ", 2);
    let old_workers = workers(&host.processes());
    assert_eq!(old_workers.len(), 2);
    kill_agent(&connected);
    herd.wait_for_count("connected, agent pid", 2);
    herd.wait_for_count("] Child 1 1", 2);
    herd.wait_for_count("] Child 2 2", 2);
    // The dead agent's instances are gone (parent-death signal or their
    // control channel closing), the new ones run.
    let deadline = Instant::now() + Duration::from_secs(15);
    while old_workers
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "old instances outlived their agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_host_clean(&host);
}

#[test]
fn an_instance_with_restart_policy_never_is_not_run_again_after_its_agent_is_lost() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "once"
command = "sh"
args = ["-c", "echo once up; exec sleep 1000"]
restart = {{ policy = "never" }}
[[group.remote]]
hosts = ["{host}"]
instances = 1

[[group]]
name = "service"
command = "sh"
args = ["-c", "echo service up; exec sleep 1000"]
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        header(&world, "stop_grace = \"5s\""),
        host = host.alias()
    ));
    herd.start();
    let connected = herd.wait_for("connected, agent pid");
    herd.wait_for("once up");
    herd.wait_for("service up");
    kill_agent(&connected);
    // The next agent runs the service again, not the one-shot.
    herd.wait_for_count("service up", 2);
    let lost = herd.wait_for("not run again (restart policy never)");
    assert!(
        lost.contains("[once] [") && lost.contains("lost: "),
        "{lost}"
    );
    assert!(
        herd.wait_for_count("connected, agent pid", 2)
            .contains("runs 1 instance"),
        "{:?}",
        herd.seen
    );
    assert_eq!(herd.lines_with("once up").len(), 1, "{:?}", herd.seen);
    herd.signal(libc::SIGTERM);
    // The one-shot that nobody can say ended well makes the run a failure.
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    assert_eq!(herd.lines_with("once up").len(), 1, "{:?}", herd.seen);
    assert_host_clean(&host);
}

#[test]
fn partitioned_host_is_marked_down_then_reconnected() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(reason) => {
            // Straight to stderr, past the test harness's capture, so the
            // skip shows in every run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "remote::partitioned_host_is_marked_down_then_reconnected: SKIPPED: {reason}"
            );
            return;
        }
    };
    let mut world = SshWorld::new();
    let host = world.add_host_on(ns.inside_addr(), Some(ns.name()));
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "cut"
command = "{{worker}}"
params = {{ sleep = 1000 }}
[[group.remote]]
hosts = ["{host}"]
instances = 1
connect_timeout = "2s"
"#,
        header(&world, "stop_grace = \"1s\""),
        host = host.alias()
    ));
    herd.start();
    herd.wait_for(&format!("[cut] [{}] [worker/1/1] Child 1 1", host.alias()));
    assert_eq!(workers(&ns.pids()).len(), 1);

    ns.partition();
    // The master misses the agent's heartbeats; the agent misses the
    // master's and stops its instance on its own.
    herd.wait_for("host marked down");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !workers(&ns.pids()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the partitioned agent kept its instance"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    ns.heal();
    herd.wait_for_count("connected, agent pid", 2);
    herd.wait_for_count(
        &format!("[cut] [{}] [worker/1/1] Child 1 1", host.alias()),
        2,
    );
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_host_clean(&host);
}

#[test]
fn exec_runs_a_command_on_hosts_and_locally_and_sums_up() {
    let mut world = SshWorld::new();
    let hosts = [world.add_host(), world.add_host(), world.add_host()];
    let failing = hosts[1].alias().to_string();
    // Tagged output from each, one failure, a summary, exit code 1.
    let script = format!(
        "echo \"out from $TASKHERD_HOST\"; echo \"err from $TASKHERD_HOST\" >&2; \
         if [ \"$TASKHERD_HOST\" = {failing} ]; then exit 5; fi"
    );
    let list = format!("{},{},local", hosts[0].alias(), hosts[1].alias());
    let out = std::process::Command::new(taskherd_bin())
        .args(["exec", "-w", &list, "-w", hosts[2].alias(), "-n", "2", "-F"])
        .arg(world.ssh_config())
        .arg("--agent-path")
        .arg(taskherd_bin())
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("run taskherd exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    // pdsh's form: `HOST/ID: line`, standard output on standard output
    // (and nothing else there), standard error on standard error.
    let tag_of = |line: &str| -> Option<(String, String)> {
        let (tag, text) = line.split_once(": ")?;
        let (host, id) = tag.rsplit_once('/')?;
        id.parse::<u32>().ok()?;
        Some((host.to_string(), text.to_string()))
    };
    for line in stdout.lines() {
        let (host, text) = tag_of(line).unwrap_or_else(|| panic!("untagged: {line}\n{stdout}"));
        assert_eq!(text, format!("out from {host}"), "{stdout}");
    }
    for host in hosts.iter().map(SshHost::alias).chain(["localhost"]) {
        for (stream, said, text) in [("out", &stdout, "out"), ("err", &stderr, "err")] {
            let tagged = said
                .lines()
                .filter_map(tag_of)
                .filter(|(tagged, line)| tagged == host && *line == format!("{text} from {host}"))
                .count();
            assert_eq!(tagged, 2, "two lines from {host} on std{stream}:\n{said}");
        }
    }
    assert!(
        stderr.contains("taskherd exec: 8 instances on 4 hosts: 6 exited 0, 2 failed"),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|line| line.starts_with(&format!("  {failing}/"))
                && line.ends_with(": exited with code 5"))
            .count(),
        2,
        "{stderr}"
    );
    // A bad range: said, exit code 2, nothing started.
    exec_refused(&["-w", "web[2-1]", "--", "true"], "runs backwards");
    // Said of the flag, not of the config exec writes for it.
    exec_refused(
        &["-w", "web[1-3", "--", "true"],
        "taskherd exec: -w: invalid host \"web[1-3\": unmatched bracket",
    );
    exec_refused(
        &["-w", "@web", "--", "true"],
        "-w @web: host groups come from a config's [inventory]",
    );
    for host in &hosts {
        assert_host_clean(host);
    }
}

/// Starts `taskherd exec -w HOST... EXTRA... -- sh -c SCRIPT` in `herd`,
/// with the world's ssh_config and this build as the agent.
fn exec_sh(herd: &mut Herd, world: &SshWorld, hosts: &[&str], extra: &[&str], script: &str) {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for host in hosts {
        args.extend(["-w".into(), (*host).into()]);
    }
    args.extend(extra.iter().map(Into::into));
    args.extend(["-F".into(), world.ssh_config().into()]);
    args.extend(["--agent-path".into(), taskherd_bin().into()]);
    args.extend(["--", "sh", "-c", script].map(Into::into));
    herd.start_exec(&args);
}

/// Runs `taskherd exec ARGS`, which must refuse them: exit code 2, and
/// `said` on stderr.
fn exec_refused(args: &[&str], said: &str) {
    let out = std::process::Command::new(taskherd_bin())
        .arg("exec")
        .args(args)
        .output()
        .expect("run taskherd exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(said), "{stderr}");
}

#[test]
fn exec_stopped_by_ctrl_c_exits_130_and_leaves_nothing() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    // Each instance says it runs, then would run for a minute.
    let script = "echo \"running on $TASKHERD_HOST\"; exec sleep 60";
    let mut herd = Herd::new("");
    exec_sh(&mut herd, &world, &[host.alias(), "local"], &[], script);
    herd.wait_for(&format!("running on {}", host.alias()));
    herd.wait_for("running on localhost");
    herd.signal(libc::SIGINT);
    // As a shell reports a command that Ctrl-C ended: 128 + SIGINT.
    assert_eq!(herd.wait_exit().code(), Some(130), "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with(
            "taskherd exec: 2 instances on 2 hosts: 0 exited 0, 2 stopped (SIGINT received)"
        )
        .len(),
        1,
        "{:?}",
        herd.seen
    );
    assert_host_clean(&host);
    herd.assert_no_leftovers();
}

#[test]
fn exec_takes_hosts_from_a_file_and_leaves_out_those_of_x() {
    let mut world = SshWorld::new();
    let hosts = [world.add_host(), world.add_host()];
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("hosts");
    let listed = format!(
        "# both hosts, and here\n{} {}\nlocal\n",
        hosts[0].alias(),
        hosts[1].alias()
    );
    std::fs::write(&file, listed).expect("write the host file");
    let from_file = format!("^{}", file.display());
    let mut herd = Herd::new("");
    let left_out = ["-x", hosts[1].alias(), "-x", "local"];
    exec_sh(
        &mut herd,
        &world,
        &[&from_file],
        &left_out,
        "echo \"ran on $TASKHERD_HOST\"",
    );
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    assert_eq!(herd.lines_with("ran on").len(), 1, "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with(&format!("ran on {}", hosts[0].alias()))
            .len(),
        1
    );
    let summary = "taskherd exec: 1 instance on 1 host: 1 exited 0";
    assert_eq!(herd.lines_with(summary).len(), 1, "{:?}", herd.seen);
    // Leaving out every host: said, exit code 2.
    exec_refused(
        &["-w", "local", "-x", "local", "--", "true"],
        "-w names no host once -x is applied",
    );
    for host in &hosts {
        assert_host_clean(host);
    }
}

#[test]
fn exec_timeout_stops_what_still_runs_and_exits_1() {
    // The second instance would run for a minute: stopped at 1 s, failed.
    let mut herd = Herd::new("");
    let script = "if [ \"$TASKHERD_ID\" = 2 ]; then exec sleep 60; fi; echo quick";
    herd.start_exec(&[
        "-w",
        "local",
        "-n",
        "2",
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    let summary = "taskherd exec: 2 instances on 1 host: 1 exited 0, 1 failed";
    assert_eq!(herd.lines_with(summary).len(), 1, "{:?}", herd.seen);
    let why = "  localhost/2: ran longer than its time limit of 1s";
    assert_eq!(herd.lines_with(why).len(), 1, "{:?}", herd.seen);
    herd.assert_no_leftovers();
    // A bad duration: said, exit code 2.
    exec_refused(
        &["-w", "local", "--timeout", "0s", "--", "true"],
        "must be more than 0",
    );
}

#[test]
fn host_vars_reach_the_instances_of_each_host() {
    let mut world = SshWorld::new();
    let hosts = [world.add_host(), world.add_host()];
    let (one, two) = (hosts[0].alias(), hosts[1].alias());
    let config = format!(
        r#"{header}
[inventory]
pair = ["{one}", "{two}"]

[host_vars]
"@pair" = {{ ROLE = "worker" }}
"{one}" = {{ REGION = "eu" }}
"{two}" = {{ REGION = "us", SHARD = 2 }}

[[group]]
name = "vars"
command = "sh"
args = ["-c", "echo \"vars region=$REGION role=$ROLE shard=$${{SHARD:-none}}\""]
restart = {{ policy = "never" }}
[[group.remote]]
hosts = ["@pair"]
instances = 1
"#,
        header = header(&world, ""),
    );
    let mut herd = Herd::new(&config);
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    let line_of = |host: &str| -> String {
        herd.lines_with(&format!("[vars] [{host}] [sh/"))
            .into_iter()
            .find(|line| line.contains("vars region="))
            .cloned()
            .unwrap_or_else(|| panic!("no line from {host}: {:?}", herd.seen))
    };
    assert!(line_of(one).ends_with("vars region=eu role=worker shard=none"));
    let line = line_of(two);
    assert!(
        line.ends_with("vars region=us role=worker shard=2"),
        "{line}"
    );
    // `check --hosts` shows them.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herd.toml");
    std::fs::write(&path, &config).expect("write config");
    let out = std::process::Command::new(taskherd_bin())
        .args(["check", "--config-only", "--hosts"])
        .arg(&path)
        .output()
        .expect("taskherd check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("  {two}: REGION=us ROLE=worker SHARD=2")),
        "{text}"
    );
    for host in &hosts {
        assert_host_clean(host);
    }
}

/// Waits up to 5 s until `left` finds nothing; panics naming what is
/// left.
fn gone_within_5s(what: &str, left: impl Fn() -> Vec<i32>) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    loop {
        let pids = left();
        if pids.is_empty() {
            eprintln!("gone {what} after {:?}", start.elapsed());
            return;
        }
        if Instant::now() >= deadline {
            let described: Vec<String> = pids.iter().map(|pid| describe(*pid)).collect();
            panic!("5 s after the kill, left {what}: {described:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid`'s command line starts with `prefix` (`b"sleep\0"`:
/// the program is `sleep`).
fn command_starts_with(pid: i32, prefix: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.starts_with(prefix))
}

#[test]
fn sigkilled_masters_leave_no_grandchild_here_or_on_a_remote_host() {
    // The issue's loop: plain `sh` instances that start children in the
    // background, here and on a real sshd host, the master SIGKILLed
    // round after round; 5 s after each kill nothing is left on either
    // side (instances, grandchildren, agent, watchdogs, ssh).
    let mut world = SshWorld::new();
    let host = world.add_host();
    let config = format!(
        r#"{}
[[group]]
name = "bg"
command = "sh"
args = ["-c", "sleep 1000 & sleep 1000 & echo bg up; wait"]
[group.local]
instances = 2
[[group.remote]]
hosts = ["{}"]
instances = 2
"#,
        header(&world, "stop_grace = \"5s\""),
        host.alias()
    );
    let mut herd = Herd::new(&config);
    let sleeps = |pids: Vec<i32>| -> usize {
        pids.into_iter()
            .filter(|pid| command_starts_with(*pid, b"sleep\0"))
            .count()
    };
    for round in 1..=3 {
        herd.start();
        herd.wait_for_count("bg up", 4 * round);
        // Every grandchild runs, on both sides, before the kill.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleeps(herd.marked_processes()) < 4 || sleeps(host.processes()) < 4 {
            assert!(Instant::now() < deadline, "round {round}: sleeps never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        // (An instance killed with the master before it is registered is
        // beyond the watchdog: registration follows the spawn.)
        herd.wait_registered(2);
        herd.signal(libc::SIGKILL);
        herd.wait_exit();
        // On the host: instances, grandchildren, agent and its watchdog.
        // The per-connection sshd of the master's idle ControlMaster goes
        // when that does (below).
        let not_sshd = |pids: Vec<i32>| -> Vec<i32> {
            pids.into_iter()
                .filter(|pid| !command_starts_with(*pid, b"sshd"))
                .collect()
        };
        gone_within_5s("on the remote host", || not_sshd(host.processes()));
        // The master's side: its instances, their children and its
        // watchdog. Its idle ssh ControlMaster lingers a few seconds
        // more, by design (ControlPersist), and is not the herd's.
        gone_within_5s("on the master's host", || {
            herd.marked_processes()
                .into_iter()
                .filter(|pid| !command_starts_with(*pid, b"ssh\0"))
                .collect()
        });
        herd.assert_no_leftovers();
        assert_host_clean(&host);
    }
}

#[test]
fn a_sigkilled_agent_s_instances_and_grandchildren_are_gone_at_once() {
    // The agent's own watchdog stops what it registered on its host; the
    // master starts a new agent, which starts the instances again.
    let mut world = SshWorld::new();
    let host = world.add_host();
    let config = format!(
        r#"{}
[[group]]
name = "bg"
command = "sh"
args = ["-c", "sleep 1000 & sleep 1000 & echo bg up; wait"]
[[group.remote]]
hosts = ["{}"]
instances = 2
"#,
        header(&world, "stop_grace = \"5s\""),
        host.alias()
    );
    let mut herd = Herd::new(&config);
    herd.start();
    let connected = herd.wait_for("connected, agent pid");
    herd.wait_for_count("bg up", 2);
    let sleeps = || -> Vec<i32> {
        host.processes()
            .into_iter()
            .filter(|pid| command_starts_with(*pid, b"sleep\0"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeps().len() < 4 {
        assert!(Instant::now() < deadline, "the sleeps never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let old = sleeps();
    // The agent's watchdog is a fork of it (no `taskherd watchdog` exec
    // on the host): a child of the agent with its command line, in a
    // process group of its own.
    let agent: i32 = connected
        .split("agent pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("agent pid in the log");
    let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let on_host = host.processes();
    assert!(
        !on_host
            .iter()
            .any(|pid| cmdline(*pid).windows(9).any(|w| w == b"watchdog\0")),
        "a `taskherd watchdog` was exec'd on the host"
    );
    let watchdog = on_host
        .iter()
        .copied()
        .find(|pid| {
            stat_of(*pid).is_some_and(|(ppid, _, _)| ppid == agent)
                && cmdline(*pid) == cmdline(agent)
        })
        .expect("the agent's forked watchdog runs");
    // SAFETY: getpgid(2) on a pid only reads.
    assert_eq!(unsafe { libc::getpgid(watchdog) }, watchdog);
    kill_agent(&connected);
    gone_within_5s("of the killed agent's instances", || {
        old.iter()
            .copied()
            .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect()
    });
    herd.wait_for_count("bg up", 4);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_host_clean(&host);
}

/// `(ppid, session id, comm)` of a process, from /proc.
fn stat_of(pid: i32) -> Option<(i32, i32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state ppid pgrp session ...
    Some((
        fields.get(1)?.parse().ok()?,
        fields.get(3)?.parse().ok()?,
        comm,
    ))
}

#[test]
fn each_ssh_handshake_runs_in_a_session_of_its_own() {
    // A host that accepts the connection and never says a word: the
    // master's ssh stays in its handshake while we look at it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
connect_timeout = "60s"

[[group]]
name = "far"
command = "sh"
args = ["-c", "true"]
[[group.remote]]
hosts = ["127.0.0.1:{port}"]
instances = 1
"#,
        agent = taskherd_bin().display(),
    ));
    herd.start();
    let _accepted = silent.accept().expect("the master's ssh connects");
    let master = herd.pid();
    let (_, master_session, _) = stat_of(master).expect("the master runs");
    // The ssh child (it connected, so it has exec'd).
    let deadline = Instant::now() + Duration::from_secs(20);
    let ssh = loop {
        let found = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .find(|&pid| {
                stat_of(pid).is_some_and(|(ppid, _, comm)| ppid == master && comm == "ssh")
            });
        if let Some(pid) = found {
            break pid;
        }
        assert!(Instant::now() < deadline, "no ssh child of the master");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, session, _) = stat_of(ssh).expect("the ssh runs");
    // Its own session, which it leads: a terminal's Ctrl-C does not reach
    // it, and the scheduler gives it a CPU share of its own.
    assert_eq!(session, ssh, "ssh {ssh} leads its session");
    assert_ne!(session, master_session);
    // Stopped while connecting: the handshake is not left behind.
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stat_of(ssh).is_some_and(|(_, _, comm)| comm == "ssh") {
        assert!(Instant::now() < deadline, "ssh {ssh} outlived the master");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_fanout_runs_one_host_at_a_time_and_a_stop_ends_the_waiting_ones() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut world = SshWorld::new();
    let hosts = [world.add_host(), world.add_host()];
    let aliases = [hosts[0].alias(), hosts[1].alias()];
    // Each command holds a directory while it runs: a second command
    // running at the same time could not make it.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let busy = dir.path().join("busy");
    let script = format!(
        "mkdir {busy} || echo overlap; echo \"ran on $TASKHERD_HOST\"; sleep 0.3; rmdir {busy}",
        busy = busy.display()
    );
    let mut herd = Herd::new("");
    exec_sh(&mut herd, &world, &aliases, &["-f", "1"], &script);
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    assert!(herd.lines_with("overlap").is_empty(), "{:?}", herd.seen);
    for host in aliases {
        assert_eq!(
            herd.lines_with(&format!("{host}: ran on {host}")).len(),
            1,
            "{:?}",
            herd.seen
        );
    }
    // Ctrl-C while the first host runs: the second never starts, and
    // its instance ends stopped, not lost.
    let mut herd = Herd::new("");
    let script = "echo \"running on $TASKHERD_HOST\"; exec sleep 60";
    exec_sh(&mut herd, &world, &aliases, &["-f", "1"], script);
    herd.wait_for("running on");
    herd.signal(libc::SIGINT);
    assert_eq!(herd.wait_exit().code(), Some(130), "{:?}", herd.seen);
    assert_eq!(herd.lines_with("running on").len(), 1, "{:?}", herd.seen);
    let summary = "taskherd exec: 2 instances on 2 hosts: 0 exited 0, 2 stopped (SIGINT received)";
    assert_eq!(herd.lines_with(summary).len(), 1, "{:?}", herd.seen);
    for host in &hosts {
        assert_host_clean(host);
    }
    herd.assert_no_leftovers();
}

#[test]
fn exec_timeout_counts_for_each_instance_from_its_start() {
    let mut world = SshWorld::new();
    let hosts = [world.add_host(), world.add_host()];
    let aliases = [hosts[0].alias(), hosts[1].alias()];
    // One host after the other, 2 s each, a limit of 4 s: the second
    // starts after more than 2 s of the run, and still has its 4 s.
    let mut herd = Herd::new("");
    exec_sh(
        &mut herd,
        &world,
        &aliases,
        &["-f", "1", "--timeout", "4s"],
        "sleep 2; echo \"done on $TASKHERD_HOST\"",
    );
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    assert_eq!(herd.lines_with(": done on").len(), 2, "{:?}", herd.seen);
    // The host's agent keeps the limit: a command that hangs is stopped.
    let mut herd = Herd::new("");
    exec_sh(
        &mut herd,
        &world,
        &aliases[..1],
        &["--timeout", "1s"],
        "exec sleep 60",
    );
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    let why = format!("  {}: ran longer than its time limit of 1s", aliases[0]);
    assert_eq!(herd.lines_with(&why).len(), 1, "{:?}", herd.seen);
    for host in &hosts {
        assert_host_clean(host);
    }
}

#[test]
fn a_host_that_is_down_gives_its_turn_to_the_others() {
    let mut world = SshWorld::new();
    let good = world.add_host();
    // One host at a time; the unreachable host comes first and is retried
    // for as long as the herd runs (no give_up_after).
    let config = format!(
        r#"{}
[[group]]
name = "once"
command = "sh"
args = ["-c", "echo \"once on $TASKHERD_HOST\""]
restart = {{ policy = "never" }}
[[group.remote]]
hosts = ["root@127.0.0.1:1", "{good}"]
instances = 1
"#,
        header(&world, "max_active_hosts = 1"),
        good = good.alias()
    );
    let mut herd = Herd::new(&config);
    herd.start();
    // While the unreachable host waits for its next try, the good one
    // takes the turn and runs.
    herd.wait_for(&format!("once on {}", good.alias()));
    herd.wait_for_count("host 127.0.0.1:1: cannot connect", 2);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    assert_host_clean(&good);
}

#[test]
fn exec_takes_pdsh_s_login_and_timeout_flags() {
    let mut world = SshWorld::new();
    let host = world.add_host();
    // -l names the login of hosts given without one: here ssh_config's.
    let mut herd = Herd::new("");
    let login = sshd::login_user();
    exec_sh(
        &mut herd,
        &world,
        &[host.alias()],
        &["-l", login, "-t", "20s"],
        "echo \"as $USER\"",
    );
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    let said = format!("{}: as {login}", host.alias());
    assert_eq!(herd.lines_with(&said).len(), 1, "{:?}", herd.seen);
    // A login the host does not know: refused, the instance lost.
    let mut herd = Herd::new("");
    exec_sh(
        &mut herd,
        &world,
        &[host.alias()],
        &["-l", "nobody-here"],
        "echo ran",
    );
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    assert!(herd.lines_with("ran").is_empty(), "{:?}", herd.seen);
    assert_eq!(
        herd.lines_with(&format!(
            "host {}: cannot connect: nobody-here@",
            host.alias()
        ))
        .len(),
        1,
        "{:?}",
        herd.seen
    );
    // Bad values: said of the flag, exit code 2.
    exec_refused(
        &["-w", "web1", "-t", "0s", "--", "true"],
        "must be more than 0",
    );
    exec_refused(
        &["-w", "web1", "-J", "", "--", "true"],
        "taskherd exec: -J: ",
    );
    exec_refused(
        &["-w", "web1", "-n", "0", "--", "true"],
        "invalid value '0' for '--instances <N>'",
    );
    assert_host_clean(&host);
}
