//! Hooks (`[group.hooks]`): programs run on instances' events with the
//! event as JSON on stdin, against a real master; a hook that hangs is
//! killed at its timeout and holds nothing up.

use crate::support::Herd;
use std::time::{Duration, Instant};

/// The JSON objects of a file of lines (empty while it does not exist).
fn objects(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a hook got one JSON object per line"))
        .collect()
}

/// Waits (bounded) until `path` holds `count` lines.
fn wait_lines(path: &std::path::Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = objects(path);
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {} lines, not {count}",
            path.display(),
            found.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hooks_get_the_event_on_stdin_and_a_hung_one_stalls_nothing() {
    // crashy fails three times in a row and is given up; each failure's
    // hook writes its event, then hangs far beyond its 2 s timeout.
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "5s"

[[group]]
name = "crashy"
command = "sh"
args = ["-c", "echo crashy up; exit 3"]
restart = { policy = "on-failure", initial = "50ms", max = "50ms", limit = 2 }
[group.hooks]
on_failure = "cat >> failures.jsonl; exec sleep 1000"
on_restart = "cat >> restarts.jsonl"
on_exhausted = "cat > exhausted.json; echo paged the on-call; exit 4"
timeout = "2s"
[group.local]
instances = 1

[[group]]
name = "steady"
command = "sh"
args = ["-c", "echo steady up; exec sleep 1000"]
[group.hooks]
on_stop = "cat >> stops.jsonl"
[group.local]
instances = 2
"#,
    );
    // Hooks run in the config file's directory.
    let dir = herd.config.parent().expect("config dir").to_path_buf();
    herd.start();
    herd.wait_for_count("steady up", 2);
    // Three failures in a row, each hook still hanging while the next
    // restart happens: supervision does not wait for them.
    herd.wait_for("[crashy] [localhost] [sh/1/1] marked failed after 2 restarts in a row");
    let failures = wait_lines(&dir.join("failures.jsonl"), 3);
    for failure in &failures {
        assert_eq!(failure["hook"], "on_failure");
        assert_eq!(failure["name"], "crashy:1");
        assert_eq!(failure["event"]["event"], "exited");
        assert_eq!(failure["event"]["how"], "exited with code 3");
    }
    let restarts = wait_lines(&dir.join("restarts.jsonl"), 2);
    assert_eq!(restarts[1]["restarts"], 2);
    let exhausted = wait_lines(&dir.join("exhausted.json"), 1);
    assert_eq!(exhausted[0]["event"]["event"], "ended");
    // A failing hook is logged with what it said.
    herd.wait_for("[crashy] [localhost] [sh/1/1] hook on_exhausted failed: exited with code 4: paged the on-call");
    // Each hung hook is killed at its timeout, its process group with it.
    herd.wait_for_count("hook on_failure: did not end within 2s: killed", 3);

    herd.signal(libc::SIGTERM);
    // The stop's hooks run before the master exits.
    let code = herd.wait_exit().code();
    let stops = objects(&dir.join("stops.jsonl"));
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(stops.iter().all(|stop| stop["hook"] == "on_stop"));
    assert_eq!(herd.lines_with("hook on_stop ran").len(), 2);
    // crashy failed: the run says so.
    assert_eq!(code, Some(1));
    herd.assert_no_leftovers();
}
