//! The herd's log: a rotated JSON file that keeps every line once, the
//! filter, and the log flags of `taskherd run`.

use crate::support::{taskherd_bin, Herd};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const LINES: u64 = 1500;
const MAX_SIZE: u64 = 16 * 1024;

/// `path`, then `path.1`, `path.2`... as long as they exist: newest first.
fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    for n in 1.. {
        let rotated = PathBuf::from(format!("{}.{n}", path.display()));
        if !rotated.exists() {
            break;
        }
        files.push(rotated);
    }
    files
}

#[test]
fn rotated_json_file_keeps_every_line_exactly_once() {
    let mut herd = Herd::new(&format!(
        r#"
[log]
format = "json"
file = "logs/herd.log"
max_size = "16KiB"
keep = 200

[[group]]
name = "chatty"
command = "{{worker}}"
params = {{ lines = {LINES} }}
[group.local]
instances = 2
"#
    ));
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.seen.join("\n"));

    let base = herd.config.parent().unwrap().join("logs").join("herd.log");
    let files = log_files(&base);
    assert!(
        files.len() >= 5,
        "expected several rotations of {}: {files:?}",
        base.display()
    );
    // Oldest file first, so that lines come in the order written.
    let mut next_line: BTreeMap<u64, u64> = BTreeMap::new();
    let mut events = Vec::new();
    for file in files.iter().rev() {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.ends_with('\n'), "{} ends mid-line", file.display());
        assert!(
            text.len() as u64 <= MAX_SIZE,
            "{} has {} bytes, over max_size",
            file.display(),
            text.len()
        );
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {line}", file.display()));
            let message = record["message"].as_str().unwrap();
            match (record["stream"].as_str(), message.strip_prefix("line ")) {
                (Some("stdout"), Some(k)) => {
                    let id = record["id"].as_u64().unwrap();
                    let k: u64 = k.parse().unwrap();
                    let expected = next_line.entry(id).or_insert(1);
                    assert_eq!(
                        k, *expected,
                        "instance {id}: line lost, repeated or out of order"
                    );
                    *expected += 1;
                }
                _ => events.push(message.to_owned()),
            }
        }
    }
    assert_eq!(
        next_line,
        BTreeMap::from([(1, LINES + 1), (2, LINES + 1)]),
        "every line of both instances"
    );
    assert!(events.iter().any(|m| m == "Child 1 1"), "{events:?}");
    assert!(
        events.iter().any(|m| m.starts_with("all instances ended")),
        "{events:?}"
    );

    // The terminal got the master's own events, and none of the output.
    let stdout: Vec<serde_json::Value> = herd
        .seen
        .iter()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(!stdout.is_empty());
    assert!(
        stdout.iter().all(|record| record["stream"] == "master"),
        "{:?}",
        herd.seen
    );
    assert!(herd
        .seen
        .iter()
        .any(|line| line.contains("all instances ended")));
    herd.assert_no_leftovers();
}

fn one_worker(log: &str) -> Herd {
    Herd::new(&format!(
        r#"
{log}
[[group]]
name = "one"
command = "{{worker}}"
[group.local]
instances = 1

[[group]]
name = "two"
command = "{{worker}}"
[group.local]
instances = 1
"#
    ))
}

#[test]
fn debug_events_are_hidden_by_default_and_shown_by_a_filter() {
    let mut herd = one_worker("");
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(!herd.seen.is_empty());
    assert_eq!(herd.lines_with("Child 1 1").len(), 1, "{:?}", herd.seen);
    assert!(
        herd.lines_with("started (pid").is_empty(),
        "{:?}",
        herd.seen
    );

    let mut herd = one_worker("");
    herd.start_with(&["--log-filter", "debug"]);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(herd.lines_with("[worker/1/1] started (pid").len(), 1);
    assert_eq!(herd.lines_with("[worker/2/1] started (pid").len(), 1);

    // Per group, from the config: debug for one, only warnings for two.
    let mut herd = one_worker("[log]\nfilter = \"warning,one=debug\"\ncolor = \"never\"\n");
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(
        herd.lines_with("[one] [localhost] [worker/1/1] started (pid")
            .len(),
        1
    );
    assert_eq!(
        herd.lines_with("[one] [localhost] [worker/1/1] Child 1 1")
            .len(),
        1
    );
    assert!(herd.lines_with("[two]").is_empty(), "{:?}", herd.seen);
    assert!(
        herd.lines_with("all instances ended").is_empty(),
        "an info event of the master"
    );

    // The flag overrides the config.
    let mut herd = one_worker("[log]\nfilter = \"off\"\n");
    herd.start_with(&["--log-filter", "info"]);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(herd.lines_with("[worker/2/1] Child 2 1").len(), 1);
}

#[test]
fn color_flag_forces_colors_into_a_pipe() {
    let mut herd = one_worker("");
    herd.start_with(&["--color", "always"]);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let line = herd
        .seen
        .iter()
        .find(|line| line.contains("Child 1 1"))
        .expect("a Child line");
    assert!(line.contains("\x1b[32minfo\x1b[0m"), "{line:?}");

    // auto: stdout is a pipe here, so no colors.
    let mut herd = one_worker("[log]\ncolor = \"auto\"\n");
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.seen.iter().all(|line| !line.contains('\x1b')));
}

#[test]
fn bad_filters_are_clear_errors() {
    let herd = one_worker("");
    let run = |args: &[&str]| {
        let out = Command::new(taskherd_bin())
            .arg("run")
            .arg(&herd.config)
            .args(args)
            .env_remove("TASKHERD_LOG")
            .output()
            .expect("run taskherd");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--log-filter", "info,nope=debug"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "--log-filter: unknown group \"nope\" in the log filter; the groups are: one, two"
        ),
        "{stderr}"
    );
    let (code, stderr) = run(&["--log-filter", "verbose"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown level \"verbose\""), "{stderr}");

    let out = Command::new(taskherd_bin())
        .arg("run")
        .arg(&herd.config)
        .env("TASKHERD_LOG", "info,,one=debug")
        .output()
        .expect("run taskherd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("TASKHERD_LOG=\"info,,one=debug\""),
        "{stderr}"
    );
    assert!(stderr.contains("two commas"), "{stderr}");

    let (code, text, path, _dir) = crate::support::check(
        "[log]\nfilter = \"info,web=loud\"\n[[group]]\nname = \"web\"\ncommand = \"w\"\nlocal = { instances = 1 }\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "{}:2:10: log.filter: unknown level \"loud\"",
            path.display()
        )),
        "{text}"
    );
}

#[test]
fn the_environment_filter_applies_between_config_and_flag() {
    let herd = one_worker("[log]\nfilter = \"off\"\n");
    let run = |env: &str, args: &[&str]| {
        let out = Command::new(taskherd_bin())
            .arg("run")
            .arg(&herd.config)
            .args(args)
            .env("TASKHERD_LOG", env)
            .env(
                "XDG_STATE_HOME",
                herd.config.parent().unwrap().join("state"),
            )
            .env(crate::support::MARK_VAR, &herd.mark)
            .output()
            .expect("run taskherd");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stdout = run("info,two=off", &[]);
    assert!(
        stdout.contains("[one] [localhost] [worker/1/1] Child 1 1"),
        "{stdout}"
    );
    assert!(!stdout.contains("[two]"), "{stdout}");
    let stdout = run("info,two=off", &["--log-filter", "warning"]);
    assert!(!stdout.contains("Child"), "{stdout}");
    herd.assert_no_leftovers();
}
