//! Identity and limits: `user`, `group` and `[group.limits]`, applied to
//! instances on the master's host (as root) and on a real sshd host (as
//! its login user, who may lower limits but not switch users).

use crate::remote::{assert_host_clean, header};
use crate::support::sshd::SshWorld;
use crate::support::Herd;

/// Whether these tests run as root (user switching needs it).
fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// What an instance prints about itself.
const SAYS: &str =
    "echo who=$(id -un) nofile=$(ulimit -n) core=$(ulimit -c) as=$(ulimit -v); exec sleep 1000";

#[test]
fn instances_run_as_their_user_with_their_limits() {
    if !root() {
        eprintln!(
            "skipped: switching users needs the tests to run as root (they run as uid {})",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "jailed"
command = "sh"
args = ["-c", "{SAYS}"]
user = "nobody"
[group.limits]
nofile = 123
core = 0
memory = "256MiB"
[group.local]
instances = 1

[[group]]
name = "nosuch"
command = "sh"
args = ["-c", "echo never"]
user = "taskherd-no-such-user"
restart = {{ policy = "never" }}
[group.local]
instances = 1
"#
    ));
    herd.start();
    // The memory cap is a cgroup's where this host lets the master make
    // one (the whole instance), else RLIMIT_AS (ulimit -v, in KiB).
    let cap = herd.wait_for("[jailed] [localhost] [sh/1/1] memory cap 256 MiB: ");
    let address_space = if cap.contains("RLIMIT_AS") {
        "262144"
    } else {
        "unlimited"
    };
    herd.wait_for(&format!(
        "[jailed] [localhost] [sh/1/1] who=nobody nofile=123 core=0 as={address_space}"
    ));
    herd.wait_for(
        "[nosuch] [localhost] [sh/2/1] user = \"taskherd-no-such-user\": no such user on this host",
    );
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    herd.assert_no_leftovers();
}

#[test]
fn remote_instances_get_their_user_and_limits_where_they_run() {
    // The agent applies them on its host: a user when it logs in as root,
    // a refusal that says why otherwise.
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"{}
[[group]]
name = "limited"
command = "sh"
args = ["-c", "{SAYS}"]
[group.limits]
nofile = 77
core = 0
[[group.remote]]
hosts = ["{host}"]
instances = 1

[[group]]
name = "switched"
command = "sh"
args = ["-c", "echo switched to $(id -un); exec sleep 1000"]
user = "nobody"
restart = {{ policy = "never" }}
[[group.remote]]
hosts = ["{host}"]
instances = 1
"#,
        header(&world, "stop_grace = \"5s\""),
        host = host.alias(),
    ));
    herd.start();
    let said = herd.wait_for("nofile=77 core=0 as=unlimited");
    assert!(said.contains("[limited] "), "{said}");
    if said.contains("who=root ") {
        herd.wait_for("[switched] ");
        herd.wait_for("switched to nobody");
    } else {
        herd.wait_for(
            "user = \"nobody\": only a master (or agent) running as root can run instances \
             as another user or group",
        );
    }
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    assert_host_clean(&host);
}

#[test]
fn an_instance_over_its_memory_cap_is_oom_killed_and_said_so() {
    // Writes 512 MiB under a cap of 64 MiB.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "hog"
command = "python3"
args = ["-c", "print('hog up', flush=True); x = b'1' * (512 << 20); print('hog survived', flush=True)"]
restart = { policy = "never" }
[group.limits]
memory = "64MiB"
[group.local]
instances = 1
"#,
    );
    // What a master killed with SIGKILL leaves in the v1 memory
    // controller (where the test's cgroup is the master's): removed by
    // the next herd (pid 999999999 is above any pid_max).
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.split_once(":memory:")
                    .map(|(_, path)| path.to_string())
            })
        })
        .map(|path| {
            std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'))
        });
    let stale = own
        .map(|own| own.join("taskherd.999999999"))
        .filter(|stale| std::fs::create_dir_all(stale.join("hog.1")).is_ok());
    herd.start();
    let cap = herd.wait_for("[hog] [localhost] [python3/1/1] memory cap 64 MiB: ");
    if cap.contains("RLIMIT_AS") {
        // Without a cgroup the allocation fails in the program instead.
        eprintln!("skipped the OOM part: this host gives no cgroup memory controller: {cap}");
        herd.wait_for("MemoryError");
    } else {
        herd.wait_for("hog up");
        herd.wait_for(
            "[hog] [localhost] [python3/1/1] killed by SIGKILL (out of memory: OOM-killed at \
             its memory cap of 64 MiB (cgroup ",
        );
        assert!(herd.lines_with("hog survived").is_empty());
        // Its cgroup is gone, and the herd's with it.
        let dir = cap
            .split(" of ")
            .nth(1)
            .and_then(|rest| rest.split(" (the whole instance)").next())
            .expect("the cgroup's path in the log")
            .to_string();
        let dir = std::path::Path::new(&dir);
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(!dir.parent().expect("herd dir").exists());
        if let Some(stale) = &stale {
            if cap.contains("cgroup v1") {
                assert!(!stale.exists(), "{} left", stale.display());
            }
        }
    }
    if let Some(stale) = stale {
        let _ = std::fs::remove_dir(stale.join("hog.1"));
        let _ = std::fs::remove_dir(stale);
    }
    herd.wait_for("all instances ended");
    herd.wait_exit();
    herd.assert_no_leftovers();
}
