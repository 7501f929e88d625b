//! `taskherd check`: every config error named with file, line and key.

use crate::support::check;

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
    assert!(text.contains("ok (1 groups, 3 instances)"), "{text}");
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
    let out = std::process::Command::new(crate::support::taskherd_bin())
        .arg("check")
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
    assert!(stdout.contains("ok (1 groups, 11 instances)"), "{stdout}");
}
