//! Self-test of the sshd and netns harness: real sshd hosts are reachable
//! with the generated config, host keys are checked strictly, a partition
//! cuts and heals, and nothing is left behind.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::netns::NetNs;
use crate::support::sshd::{SshHost, SshWorld, SSHD_MARK_VAR};

fn text(out: &Output) -> String {
    format!(
        "status {}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn assert_hello(world: &SshWorld, host: &SshHost) {
    let out = world.ssh(host, "echo hello-$((1+1))");
    assert!(
        out.status.success(),
        "ssh to {} ({}:{}) failed: {}\nsshd log: {}",
        host.alias(),
        host.addr(),
        host.port(),
        text(&out),
        host.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello-2");
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_hosts_answer_and_host_keys_are_strict() {
    let mut world = SshWorld::new();
    let mut a = world.add_host();
    let b = world.add_host();
    assert_ne!(a.addr(), b.addr());
    assert!(a.addr().is_loopback() && b.addr().is_loopback());
    assert_ne!(a.alias(), b.alias());
    assert!(world.dir().join("ssh_config") == world.ssh_config());
    assert!(world.identity_file().exists());
    let known = std::fs::read_to_string(world.known_hosts()).expect("read known_hosts");
    assert!(known.contains(&format!("[{}]:{} ssh-ed25519 ", a.addr(), a.port())));
    assert_hello(&world, &a);
    assert_hello(&world, &b);

    // Sessions carry the host's marker.
    let out = world.ssh(&a, &format!("echo ${SSHD_MARK_VAR}"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.marker());

    // A known_hosts without the key: refused.
    let stranger = SshWorld::new();
    let out = world
        .ssh_command(&a)
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            stranger.known_hosts().display()
        ))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    assert!(!out.status.success(), "ssh succeeded: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out)
    );

    // Stopping a host kills its sessions: a foreground one and a
    // daemonized one that left the sshd's process tree.
    let out = world.ssh(&a, "setsid sleep 300 </dev/null >/dev/null 2>&1 &");
    assert!(out.status.success(), "{}", text(&out));
    let mut session = world
        .ssh_command(&a)
        .arg("sleep 300")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a long ssh session");
    // The daemonized sleep and the per-connection sshd of the live session.
    eventually("both sessions run", || {
        let pids = a.processes();
        pids.len() >= 3
    });
    let pids = a.processes();
    let pid_a = a.pid().expect("sshd a runs");
    a.stop();
    assert!(a.pid().is_none());
    let status = session.wait().expect("wait for the ssh session");
    assert!(!status.success(), "the session outlived its sshd");
    eventually("the sshd and its sessions are gone", || {
        !alive(pid_a) && pids.iter().all(|&pid| !alive(pid as u32))
    });
    a.stop(); // idempotent

    // A standalone host (no world) shows its banner; nobody may log in.
    let mut lone = SshHost::start();
    let mut lone_on = SshHost::start_on("127.0.0.2".parse().expect("an address"));
    assert_eq!(lone_on.addr().to_string(), "127.0.0.2");
    for host in [&lone, &lone_on] {
        assert!(host.port() > 0);
        let out = Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .args(["-i", &world.identity_file().display().to_string()])
            .args(["-p", &host.port().to_string()])
            .arg(format!("root@{}", host.addr()))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out)
        );
    }

    let started: Vec<u32> = [&b, &lone, &lone_on]
        .iter()
        .filter_map(|h| h.pid())
        .collect();
    assert_eq!(started.len(), 3);
    lone.stop();
    lone_on.stop();
    drop(b);
    drop(world);
    for pid in started.into_iter().chain([pid_a]) {
        assert!(!alive(pid), "sshd {pid} is left");
    }
}

#[test]
fn partition_cuts_and_heals_a_namespaced_host() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(reason) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "sshd_harness: partition harness test SKIPPED: {reason}"
            );
            return;
        }
    };
    assert!(ns.name().starts_with("th-"));
    assert_ne!(ns.inside_addr(), ns.outside_addr());
    let mut world = SshWorld::new();
    let host = world.add_host_on(ns.inside_addr(), Some(ns.name()));
    let sshd = host.pid().expect("sshd runs");
    assert!(
        ns.pids().contains(&(sshd as i32)),
        "sshd {sshd} is not in {}",
        ns.name()
    );
    assert_eq!(host.addr(), ns.inside_addr());
    assert_hello(&world, &host);

    // A session open across the partition survives it (no RST, no FIN).
    let session = world
        .ssh_command(&host)
        .args(["-o", "ServerAliveInterval=0"])
        .arg("sleep 6; echo survived")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a session");
    eventually("the session runs", || host.processes().len() >= 2);

    ns.partition();
    let started = Instant::now();
    let out = world
        .ssh_command(&host)
        .args(["-o", "ConnectTimeout=2"])
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    assert!(
        !out.status.success(),
        "ssh through a partition: {}",
        text(&out)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the partition refused instead of dropping: {}",
        text(&out)
    );

    ns.heal();
    assert_hello(&world, &host);
    let out = session.wait_with_output().expect("wait for the session");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "survived");

    let name = ns.name().to_string();
    drop(host);
    drop(world);
    drop(ns);
    assert!(!alive(sshd), "sshd {sshd} is left");
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "namespace {name} is left"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/class/net/{name}h")).exists(),
        "veth {name}h is left"
    );
}
