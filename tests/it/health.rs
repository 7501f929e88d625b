//! Health checks (`[group.health]`) against a real master: an instance
//! whose probe fails enough times in a row is killed and restarted; the
//! verdict shows in `status`.

use crate::support::Herd;
use taskherd::protocol::control::HerdStatus;

fn status(herd: &Herd) -> HerdStatus {
    let out = herd.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json parses")
}

#[test]
fn an_unhealthy_instance_is_restarted_and_status_shows_its_health() {
    // Healthy while there is no file `sick` in the config's directory.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "web"
command = "sh"
cwd = "."
args = ["-c", "echo web up; exec sleep 1000"]
restart = { initial = "100ms" }
[group.health]
command = "test ! -e sick"
interval = "200ms"
failures = 2
[group.local]
instances = 1
"#,
    );
    let sick = herd.config.with_file_name("sick");
    herd.start();
    herd.wait_for("web up");
    herd.wait_for("[web] [localhost] [sh/1/1] healthy");
    let before = status(&herd).groups[0].instances[0].clone();
    assert_eq!(before.health.as_deref(), Some("healthy"));
    let text = herd.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(", healthy")
            || String::from_utf8_lossy(&text.stdout).contains("  healthy"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    std::fs::write(&sick, "").expect("make it sick");
    herd.wait_for(
        "[web] [localhost] [sh/1/1] health check failed (1 of 2 in a row): \
         command `test ! -e sick`: exited with code 1",
    );
    herd.wait_for(
        "[web] [localhost] [sh/1/1] unhealthy: 2 health checks failed in a row, \
         the last: command `test ! -e sick`: exited with code 1; killing it",
    );
    std::fs::remove_file(&sick).expect("make it well");
    // Restarted by its policy, and healthy again.
    herd.wait_for_count("web up", 2);
    herd.wait_for_count("[web] [localhost] [sh/1/1] healthy", 2);
    let after = status(&herd).groups[0].instances[0].clone();
    assert_eq!(after.restarts, 1);
    assert!(
        after
            .last_exit
            .as_deref()
            .is_some_and(|how| how.contains("SIGKILL")),
        "{after:?}"
    );
    assert_ne!(after.pid, before.pid);

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}
