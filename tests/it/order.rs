//! Ordering and readiness (`after`, `[group.ready]`) against a real
//! master: a group starts only once the groups it starts after are
//! ready (each way to be ready), a dependency not ready in time holds
//! its dependents back, a cycle is refused, the herd stops from the last
//! groups to the first, and a reload replaces groups in their order.
//!
//! Instances write what they do into a file `order` in the config's
//! directory: its order is the proof, never a timing.

use crate::support::{check, Herd, WAIT};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use taskherd::protocol::control::{HerdStatus, InstanceState};

fn status(herd: &Herd) -> HerdStatus {
    let out = herd.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json parses")
}

/// The states of `group`'s instances.
fn states(status: &HerdStatus, group: &str) -> Vec<InstanceState> {
    status
        .groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.instances.iter().map(|i| i.state).collect())
        .unwrap_or_default()
}

/// The lines of the `order` file next to the config.
fn order_lines(herd: &Herd) -> Vec<String> {
    std::fs::read_to_string(herd.config.with_file_name("order"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn position(lines: &[String], line: &str) -> usize {
    lines
        .iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no line {line:?} in {lines:?}"))
}

/// Makes a FIFO at `path`: an instance reading it waits until the test
/// opens it.
fn fifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Opens the FIFO `path` (once its instance reads it) and closes it: the
/// instance goes on. Bounded: the open waits for the reader in a thread.
fn open_gate(path: PathBuf) {
    let (done_tx, done_rx) = mpsc::channel();
    let shown = path.display().to_string();
    std::thread::spawn(move || {
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"go\n"));
        let _ = done_tx.send(result);
    });
    match done_rx.recv_timeout(WAIT) {
        Ok(result) => result.expect("open the gate"),
        Err(_) => panic!("nobody read the gate {shown} within {WAIT:?}"),
    }
}

/// A port free on 127.0.0.1 now (the kernel's pick).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[test]
fn each_way_to_be_ready_holds_the_groups_after_it_until_it_is() {
    let kinds = ["notify", "tcp", "http", "command", "log"];
    let tcp_port = free_port();
    let http_port = free_port();
    let dep = |kind: &str, command: &str, args: String, ready: &str| {
        format!(
            r#"
[[group]]
name = "{kind}-dep"
command = "{command}"
cwd = "."
{args}
[group.ready]
{ready}
timeout = "60s"
interval = "100ms"
[group.local]
instances = 1

[[group]]
name = "{kind}-app"
command = "sh"
cwd = "."
args = ["-c", "echo {kind}-app started >> order; echo {kind}-app up; exec sleep 1000"]
after = ["{kind}-dep"]
[group.local]
instances = 1
"#
        )
    };
    let gated = |kind: &str, then: &str| {
        format!(
            r#"args = ["-c", "cat gate-{kind} > /dev/null; echo {kind}-dep ready >> order; {then}"]"#
        )
    };
    let config = [
        dep(
            "notify",
            "{worker}",
            r#"params = { gate = "gate-notify", ready = true, readyFile = "order", sleep = 1000 }"#
                .into(),
            "notify = true",
        ),
        dep(
            "tcp",
            "sh",
            gated(
                "tcp",
                &format!(
                    "exec python3 -c 'import socket, time\\ns = socket.socket()\\n\
                     s.bind((\\\"127.0.0.1\\\", {tcp_port}))\\ns.listen()\\ntime.sleep(1000)'"
                ),
            ),
            &format!(r#"tcp = "127.0.0.1:{tcp_port}""#),
        ),
        dep(
            "http",
            "sh",
            gated(
                "http",
                &format!("exec python3 -m http.server --bind 127.0.0.1 {http_port}"),
            ),
            &format!(r#"http = "http://127.0.0.1:{http_port}/""#),
        ),
        dep(
            "command",
            "sh",
            gated("command", "touch command-ready; exec sleep 1000"),
            r#"command = "test -e command-ready""#,
        ),
        dep(
            "log",
            "sh",
            gated("log", "echo db: accepting connections; exec sleep 1000"),
            r#"log = "accepting connections$""#,
        ),
    ]
    .concat();
    let mut herd = Herd::new(&config);
    for kind in kinds {
        fifo(&herd.config.with_file_name(format!("gate-{kind}")));
    }
    herd.start();
    for kind in kinds {
        herd.wait_for(&format!(
            r#"group {kind}-app waits for {kind}-dep to be ready (after = ["{kind}-dep"])"#
        ));
    }
    for kind in kinds {
        // Not ready yet: its dependency waits at its gate.
        let app = format!("{kind}-app");
        assert_eq!(states(&status(&herd), &app), [InstanceState::Waiting]);
        open_gate(herd.config.with_file_name(format!("gate-{kind}")));
        herd.wait_for(&format!("group {app} starts: {kind}-dep ready"));
        herd.wait_for(&format!("{app} up"));
        let lines = order_lines(&herd);
        assert!(
            position(&lines, &format!("{kind}-dep ready"))
                < position(&lines, &format!("{app} started")),
            "{lines:?}"
        );
    }

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn a_dependency_not_ready_in_time_is_said_and_holds_its_dependents_back() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "slow"
command = "sh"
args = ["-c", "echo slow up; exec sleep 1000"]
[group.ready]
command = "false"
timeout = "300ms"
interval = "100ms"
[group.local]
instances = 1

[[group]]
name = "app"
command = "sh"
args = ["-c", "echo app up; exec sleep 1000"]
after = ["slow"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for(
        "[slow] [localhost] [sh/1/1] not ready within 300ms (last check: command `false`: \
         exited with code 1); the groups after it do not start until it is ready",
    );
    // Said by the master once it knows: the status says so from then on.
    herd.wait_for(
        "group app still waits for slow: instance 1 not ready within 300ms (last check: \
         command `false`: exited with code 1)",
    );
    let now = status(&herd);
    assert_eq!(states(&now, "app"), [InstanceState::Waiting]);
    let slow = &now.groups[0].instances[0];
    assert_eq!(slow.state, InstanceState::Running);
    assert!(
        slow.health
            .as_deref()
            .is_some_and(|h| h.starts_with("not ready: not ready within 300ms")),
        "{slow:?}"
    );
    let text = herd.ctl(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("waiting"), "{text}");

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.lines_with("app up").is_empty(), "app never started");
    herd.assert_no_leftovers();
}

#[test]
fn a_cycle_or_an_unknown_group_in_after_is_refused_with_where_it_is() {
    let (code, text, path, _dir) = check(
        r#"[[group]]
name = "a"
command = "true"
after = ["b"]
[group.local]
instances = 1

[[group]]
name = "b"
command = "true"
after = ["a", "nope"]
[group.local]
instances = 1
"#,
    );
    assert_ne!(code, Some(0), "{text}");
    let file = path.display().to_string();
    assert!(text.contains(&file), "{text}");
    assert!(text.contains("group[2].after[1]"), "{text}");
    assert!(
        text.contains("cycle in after: a starts after b starts after a"),
        "{text}"
    );
    assert!(text.contains("group[2].after[2]"), "{text}");
    assert!(text.contains(r#"unknown group "nope" in after"#), "{text}");
}

/// A plain program that notes its start and its SIGTERM in `order`.
fn noting(name: &str, after: &str) -> String {
    format!(
        r#"
[[group]]
name = "{name}"
command = "sh"
cwd = "."
args = ["-c", "trap 'echo {name} term >> order; exit 0' TERM; echo {name} start $V >> order; echo {name} up; while :; do sleep 1000 & wait $!; done"]
env = {{ V = "1" }}
stop_grace = "20s"
{after}
[group.local]
instances = 1
"#
    )
}

#[test]
fn the_herd_stops_from_the_last_groups_to_the_first() {
    // Ready once they said they are up (after noting their start).
    let config = [
        noting("web", r#"after = ["api"]"#),
        noting("db", "[group.ready]\nlog = \"^db up$\""),
        noting("api", "after = [\"db\"]\n[group.ready]\nlog = \"^api up$\""),
    ]
    .concat();
    let mut herd = Herd::new(&config);
    herd.start();
    herd.wait_for("web up");
    assert_eq!(
        order_lines(&herd),
        ["db start 1", "api start 1", "web start 1"]
    );
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let lines = order_lines(&herd);
    assert_eq!(&lines[3..], ["web term", "api term", "db term"]);
    herd.wait_for("stopping group api: the groups after it have ended");
    herd.wait_for("stopping group db: the groups after it have ended");
    herd.assert_no_leftovers();
}

#[test]
fn a_reload_replaces_groups_in_their_order() {
    // web comes first in the file, but starts after db.
    let config = [
        noting("web", r#"after = ["db"]"#),
        noting("db", "[group.ready]\nlog = \"^db up$\""),
    ]
    .concat();
    let mut herd = Herd::new(&config);
    herd.start();
    herd.wait_for("web up");
    assert_eq!(order_lines(&herd), ["db start 1", "web start 1"]);
    std::fs::write(&herd.config, config.replace("V = \"1\"", "V = \"2\"")).expect("rewrite");
    let out = herd.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // web has no readiness probe: its successor counts as ready once
    // started, so the reload may be done before it noted its start.
    herd.wait_for_count("web up", 2);
    let lines = order_lines(&herd);
    let db = position(&lines, "db start 2");
    let web = position(&lines, "web start 2");
    assert!(db < web, "{lines:?}");
    // Each successor ran (and db was ready) before its old instance stopped.
    assert!(position(&lines, "db term") > db, "{lines:?}");
    assert!(position(&lines, "db term") < web, "{lines:?}");

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn a_remote_dependency_is_judged_ready_on_its_host_and_stops_after_its_dependents() {
    use crate::remote::{assert_host_clean, header};
    let mut world = crate::support::sshd::SshWorld::new();
    let host = world.add_host();
    let shared = tempfile::tempdir().expect("temp dir");
    let dir = shared.path().display().to_string();
    let gate = shared.path().join("gate");
    fifo(&gate);
    let config = format!(
        r#"{header}
[[group]]
name = "db"
command = "sh"
args = ["-c", "trap 'echo db term >> {dir}/order; exit 0' TERM; cat {dir}/gate > /dev/null; echo db ready >> {dir}/order; echo db up; while :; do sleep 1000 & wait $!; done"]
[group.ready]
log = "^db up$"
[[group.remote]]
hosts = ["{host}"]
instances = 1

[[group]]
name = "app"
command = "sh"
args = ["-c", "trap 'echo app term >> {dir}/order; exit 0' TERM; echo app started >> {dir}/order; echo app up; while :; do sleep 1000 & wait $!; done"]
after = ["db"]
[group.local]
instances = 1
"#,
        header = header(&world, ""),
        host = host.alias(),
    );
    let mut herd = Herd::new(&config);
    herd.start();
    herd.wait_for(r#"group app waits for db to be ready (after = ["db"])"#);
    herd.wait_for(&format!("host {}: connected", host.alias()));
    assert_eq!(states(&status(&herd), "app"), [InstanceState::Waiting]);
    open_gate(gate);
    herd.wait_for(&format!("[db] [{}] [sh/1/1] ready", host.alias()));
    herd.wait_for("group app starts: db ready");
    herd.wait_for("app up");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let lines: Vec<String> = std::fs::read_to_string(shared.path().join("order"))
        .expect("order file")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines, ["db ready", "app started", "app term", "db term"]);
    assert_host_clean(&host);
    herd.assert_no_leftovers();
}
