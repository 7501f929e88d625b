//! `taskherd check`: every config error named with file, line and key.

use crate::support::check;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn valid_config_passes() {
    let (code, text, _, _dir) = check(
        r#"
[master]
timeout = "5s"
[[group]]
name = "w"
command = "/bin/true"
[group.local]
instances = 3
"#,
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok (1 group, 3 instances)"), "{text}");
}

#[test]
fn every_error_is_reported_with_file_line_and_key() {
    let (code, text, path, _dir) = check(
        r#"[master]
stop_grace = "10 parsecs"
colour = "blue"

[[group]]
name = "w"
command = ""
[group.local]
instances = 0

[[group]]
name = "w"
command = "/bin/true"
[group.local]
instances = 1
"#,
    );
    assert_eq!(code, Some(2), "{text}");
    let file = path.display().to_string();
    let expect = [
        (format!("{file}:2:"), "master.stop_grace", "parsecs"),
        (format!("{file}:3:"), "master.colour", "unknown key"),
        (format!("{file}:7:"), "group[1].command", "empty"),
        (
            format!("{file}:9:"),
            "group[1].local.instances",
            "at least 1",
        ),
        (
            format!("{file}:12:"),
            "group[2].name",
            "duplicate group name",
        ),
    ];
    for (location, key, words) in expect {
        assert!(
            text.lines()
                .any(|l| l.contains(&location) && l.contains(key) && l.contains(words)),
            "no error at {location} for {key} ({words}) in:\n{text}"
        );
    }
    assert!(text.contains("5 errors found"), "{text}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = std::process::Command::new(crate::support::taskherd_bin())
        .args(["check", "/nonexistent/herd.toml"])
        .output()
        .expect("run taskherd");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read config /nonexistent/herd.toml")
            && stderr.contains("No such file"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_config_without_starting_anything() {
    let mut herd = crate::support::Herd::new(
        r#"
[[group]]
name = "w"
command = "{worker}"
instances = 2
"#,
    );
    herd.start();
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(2));
    herd.wait_for("group[1].instances");
    assert!(herd.lines_with("starting").is_empty(), "{:?}", herd.seen);
}

#[test]
fn the_remote_example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/remote.toml");
    // Its hosts and programs are examples: only the text is checked.
    let out = std::process::Command::new(crate::support::taskherd_bin())
        .args(["check", "--config-only"])
        .arg(&path)
        .output()
        .expect("run taskherd");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (1 group, 11 instances)"), "{stdout}");
}

/// Runs `taskherd check` (with `extra` arguments) on `config` written as
/// `herd.toml` in `dir`; returns (exit code, stdout and stderr, path).
fn check_in(dir: &Path, config: &str, extra: &[&str]) -> (Option<i32>, String, PathBuf) {
    let path = dir.join("herd.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(crate::support::taskherd_bin())
        .arg("check")
        .args(extra)
        .arg(&path)
        .output()
        .expect("run taskherd check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, path)
}

#[track_caller]
fn assert_line(text: &str, location: &str, key: &str, words: &str) {
    assert!(
        text.lines().any(|l| l.starts_with("error: ")
            && l.contains(location)
            && l.contains(key)
            && l.contains(words)),
        "no error at {location} for {key} ({words}) in:\n{text}"
    );
}

#[test]
fn check_finds_missing_and_unusable_programs_and_directories() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
    std::fs::write(dir.path().join("bin/plain.sh"), "#!/bin/sh\n").expect("write");
    let config = r#"[[group]]
name = "missing"
command = "./bin/worker"
[group.local]
instances = 1

[[group]]
name = "plain"
command = "bin/plain.sh"
[group.local]
instances = 1

[[group]]
name = "elsewhere"
command = "sh"
cwd = "/srv/taskherd-surely-missing"
[group.local]
instances = 1

[[group]]
name = "typo"
command = "shh-surely-not-a-program"
[group.local]
instances = 1
"#;
    let (code, text, path) = check_in(dir.path(), config, &[]);
    assert_eq!(code, Some(2), "{text}");
    let file = path.display();
    let bin = dir.path().join("bin");
    assert_line(
        &text,
        &format!("{file}:3:11:"),
        "group[1].command",
        &format!("cannot start {}/worker: no such file", bin.display()),
    );
    assert!(!text.contains("/./"), "no doubled ./ in paths:\n{text}");
    assert_line(
        &text,
        &format!("{file}:9:11:"),
        "group[2].command",
        "permission denied: it is not executable (chmod +x it)",
    );
    assert_line(
        &text,
        &format!("{file}:16:7:"),
        "group[3].cwd",
        "working directory /srv/taskherd-surely-missing does not exist",
    );
    assert_line(
        &text,
        &format!("{file}:22:11:"),
        "group[4].command",
        "not found in PATH",
    );
    assert!(text.contains("4 errors found"), "{text}");

    // `--config-only` looks at the text alone.
    let (code, text, _) = check_in(dir.path(), config, &["--config-only"]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn check_resolves_remote_hosts_through_ssh_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good_config");
    std::fs::write(&good, "Host web1\n  HostName 127.0.0.1\n").expect("write");
    let bad = dir.path().join("bad_config");
    std::fs::write(&bad, "Host web2\n  NoSuchOption yes\n").expect("write");
    let config = format!(
        r#"[[group]]
name = "w"
command = "/opt/app/worker"
[[group.remote]]
hosts = ["web1", "deploy@web1:2222"]
instances = 1
ssh_config = "{good}"
[[group.remote]]
hosts = ["web2"]
instances = 1
ssh_config = "{bad}"
[[group.remote]]
hosts = ["web3"]
instances = 1
ssh_config = "missing_config"
"#,
        good = good.display(),
        bad = bad.display()
    );
    let (code, text, path) = check_in(dir.path(), &config, &[]);
    assert_eq!(code, Some(2), "{text}");
    let file = path.display();
    assert_line(
        &text,
        &format!("{file}:9:"),
        "group[1].remote[2].hosts[1]",
        "ssh -G web2 fails",
    );
    assert!(
        text.contains("NoSuchOption") || text.contains("nosuchoption"),
        "{text}"
    );
    assert_line(
        &text,
        &format!("{file}:15:"),
        "group[1].remote[3].ssh_config",
        "does not exist",
    );
    assert!(
        !text.lines().any(|l| l.contains("remote[1]")),
        "web1 resolves through its HostName:\n{text}"
    );
}

#[test]
fn run_names_a_missing_working_directory_not_the_program() {
    let mut herd = crate::support::Herd::new(
        r#"
[[group]]
name = "w"
command = "{worker}"
cwd = "no-such-dir"
restart = { policy = "never" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    let dir = herd
        .config
        .parent()
        .expect("a directory")
        .join("no-such-dir");
    let line = herd.wait_for("working directory");
    assert!(
        line.contains(&format!(
            "working directory {} does not exist",
            dir.display()
        )),
        "{line}"
    );
    assert!(line.contains("[worker/1/1]"), "{line}");
    assert!(
        herd.lines_with("cannot start").is_empty(),
        "{:?}",
        herd.seen
    );
    assert_eq!(herd.wait_exit().code(), Some(1), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn the_readme_example_config_passes_check() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let section = readme
        .split_once("## A config\n")
        .expect("a section \"A config\"")
        .1;
    let example = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a toml block")
        .0;
    // As written it runs from the repository's root after a release build;
    // here the worker of this test build stands in.
    let command = "./target/release/examples/worker";
    assert!(example.contains(command), "{example}");
    let worker = crate::support::worker_bin();
    let config = example.replace(command, &worker.display().to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, text, _) = check_in(dir.path(), &config, &[]);
    assert_eq!(code, Some(0), "{text}\n{config}");
}

#[test]
fn check_connect_logs_in_to_every_remote_host() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let dir = tempfile::tempdir().expect("temp dir");
    // A port nobody listens on: a free one, closed again.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let config = format!(
        r#"[ssh]
ssh_config = "{ssh_config}"
connect_timeout = "3s"

[[group]]
name = "w"
command = "/opt/app/worker"
[[group.remote]]
hosts = ["{good}", "127.0.0.1:{closed}"]
instances = 1
"#,
        ssh_config = world.ssh_config().display(),
        good = host.alias(),
    );
    let (code, text, _) = check_in(dir.path(), &config, &["--connect"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("host {} (group w): connected", host.alias())),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("error: ")
            && l.contains(&format!("host 127.0.0.1:{closed} (group w): cannot log in"))),
        "{text}"
    );
    // Without the unreachable host it passes.
    let config = config.replace(&format!(", \"127.0.0.1:{closed}\""), "");
    let (code, text, _) = check_in(dir.path(), &config, &["--connect"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok (1 group, 1 instance)"), "{text}");
}

#[test]
fn check_hosts_shows_ranges_and_inventory_groups_expanded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herd.toml");
    std::fs::write(
        &path,
        r#"[inventory]
web = ["web[01-03]"]

[[group]]
name = "crawl"
command = "/bin/true"
[[group.remote]]
hosts = ["@web", "deploy@db[1,3]:2222"]
instances = 2
"#,
    )
    .expect("write config");
    let out = Command::new(crate::support::taskherd_bin())
        .args(["check", "--config-only", "--hosts"])
        .arg(&path)
        .output()
        .expect("run taskherd check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "crawl [[group.remote]] 1: 5 hosts x 2 instances: \
             web01 web02 web03 deploy@db1:2222 deploy@db3:2222"
        ),
        "{text}"
    );
    assert!(text.contains("ok (1 group, 10 instances)"), "{text}");
    // A bad range: file, line and key.
    std::fs::write(
        &path,
        "[[group]]\nname = \"crawl\"\ncommand = \"/bin/true\"\n[[group.remote]]\nhosts = [\"web[9-1]\"]\ninstances = 1\n",
    )
    .expect("write config");
    let out = Command::new(crate::support::taskherd_bin())
        .args(["check", "--config-only", "--hosts"])
        .arg(&path)
        .output()
        .expect("run taskherd check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "{}:5:10: group[1].remote[1].hosts[1]: invalid host range [9-1] in \"web[9-1]\": \"9-1\" runs backwards",
            path.display()
        )),
        "{text}"
    );
}
