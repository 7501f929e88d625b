//! The command line itself: help with examples, shell completions, the
//! man page, and `-q` / `-v`.

use crate::support::{taskherd_bin, Herd};
use std::process::{Command, Output, Stdio};

/// `taskherd ARGS` with no master around; (exit code, stdout, stderr).
fn taskherd(args: &[&str]) -> (Option<i32>, String, String) {
    let out: Output = Command::new(taskherd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run taskherd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_for_each_shell_name_the_commands() {
    let (code, bash, err) = taskherd(&["completions", "bash"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(bash.contains("complete -F _taskherd"), "{bash}");
    for command in ["run", "status", "logs", "stop", "completions", "manpage"] {
        assert!(bash.contains(command), "{command} missing in:\n{bash}");
    }
    assert!(
        bash.contains("--tail") && bash.contains("--no-follow"),
        "{bash}"
    );
    // The hidden `agent` command is not offered.
    assert!(!bash.contains("taskherd__agent"), "{bash}");
    for shell in ["zsh", "fish"] {
        let (code, script, err) = taskherd(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        assert!(script.contains("logs"), "{shell}: {script}");
    }
    let (code, _, err) = taskherd(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn man_pages_of_taskherd_and_of_a_command() {
    let (code, page, err) = taskherd(&["manpage"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(page.starts_with(".ie"), "{page}");
    assert!(page.contains(".TH taskherd 1"), "{page}");
    assert!(
        page.contains("completions") && page.contains("Examples"),
        "{page}"
    );
    let (code, page, err) = taskherd(&["manpage", "logs"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(page.contains(".TH taskherd-logs 1"), "{page}");
    assert!(page.contains("no\\-follow"), "{page}");
    let (code, _, err) = taskherd(&["manpage", "nope"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no command named \"nope\""), "{err}");
}

#[test]
fn help_has_examples_and_the_global_flags() {
    let (code, help, err) = taskherd(&["--help"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(help.contains("Examples:"), "{help}");
    assert!(help.contains("taskherd run herd.toml"), "{help}");
    assert!(
        help.contains("-q, --quiet") && help.contains("-v, --verbose"),
        "{help}"
    );
    let (code, help, err) = taskherd(&["logs", "--help"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(help.contains("taskherd logs web --tail 20"), "{help}");
    assert!(
        help.contains("-q, --quiet"),
        "global flags on commands: {help}"
    );
    let (code, _, err) = taskherd(&["-q", "-v", "status"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

const TALKER: &str = r#"
[[group]]
name = "talk"
command = "sh"
args = ["-c", "echo said on stdout; echo said on stderr >&2"]
restart = { policy = "never" }
[group.local]
instances = 1
"#;

#[test]
fn quiet_and_verbose_set_the_level_of_a_run() {
    let mut herd = Herd::new(TALKER);
    herd.start_with(&["-q"]);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(
        herd.lines_with("said on stderr").len(),
        1,
        "{:?}",
        herd.seen
    );
    assert!(
        herd.lines_with("said on stdout").is_empty(),
        "{:?}",
        herd.seen
    );
    assert!(herd.lines_with(" info ").is_empty(), "{:?}", herd.seen);
    herd.assert_no_leftovers();

    let mut herd = Herd::new(TALKER);
    herd.start_with(&["--verbose"]);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(
        herd.lines_with("said on stdout").len(),
        1,
        "{:?}",
        herd.seen
    );
    assert!(
        !herd.lines_with("started (pid").is_empty(),
        "{:?}",
        herd.seen
    );
    herd.assert_no_leftovers();
}

/// `taskherd exec ARGS` with a state and runtime dir of its own, the
/// mark of leftovers in its environment: (exit code, stdout, stderr).
fn exec(args: &[&str], mark: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(taskherd_bin())
        .arg("exec")
        .args(args)
        .env(crate::support::MARK_VAR, mark)
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .env_remove("TASKHERD_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run taskherd exec");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_writes_output_as_pdsh_does() {
    let mark = format!("exec-plain-{}", std::process::id());
    // Each instance says a line on each stream; the second fails.
    let script =
        "echo \"out $TASKHERD_ID\"; echo \"err $TASKHERD_ID\" >&2; exit $((TASKHERD_ID - 1))";
    let (code, stdout, stderr) = exec(&["-w", "local", "-n", "2", "--", "sh", "-c", script], &mark);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    // Standard output holds the commands' standard output, tagged, and
    // nothing else.
    let mut out: Vec<&str> = stdout.lines().collect();
    out.sort_unstable();
    assert_eq!(
        out,
        ["localhost/1: out 1", "localhost/2: out 2"],
        "{stderr}"
    );
    // Standard error: their standard error, tagged, and the summary; the
    // master's info events and the instances' ends are not said twice.
    let mut err: Vec<&str> = stderr.lines().collect();
    err.sort_unstable();
    assert_eq!(
        err,
        [
            "  localhost/2: exited with code 1",
            "localhost/1: err 1",
            "localhost/2: err 2",
            "taskherd exec: 2 instances on 1 host: 1 exited 0, 1 failed",
        ],
        "{stdout}"
    );
    // One instance per host: the host alone.
    let (code, stdout, stderr) = exec(&["-w", "local", "--", "echo", "hello"], &mark);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "localhost: hello\n", "{stderr}");
    // One word of shell syntax: through sh -c, as pdsh's command.
    let (code, stdout, stderr) = exec(&["-w", "local", "--", "echo a | tr a b"], &mark);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "localhost: b\n", "{stderr}");
    // -N: the lines alone, as pdsh's -N.
    let (code, stdout, stderr) = exec(&["-N", "-w", "local", "--", "echo", "hello"], &mark);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "hello\n", "{stderr}");
    // -v: the master's and the instances' events, on standard error.
    let (code, stdout, stderr) = exec(&["-v", "-w", "local", "--", "echo", "hello"], &mark);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "localhost: hello\n", "{stderr}");
    assert!(
        stderr.contains("taskherd exec: starting 1 instance in 1 group"),
        "{stderr}"
    );
    assert!(
        stderr.contains("taskherd exec: localhost: exited with code 0"),
        "{stderr}"
    );
    // --log-format text: the herd's log, as `taskherd run` writes it.
    let (code, stdout, stderr) = exec(
        &["--log-format", "text", "-w", "local", "--", "echo", "hello"],
        &mark,
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|line| line.contains(" info ")
                && line.ends_with("[exec] [localhost] [echo/1/1] hello")),
        "{stdout}"
    );
    assert!(
        stdout.contains("all instances ended: 1 instance, exiting"),
        "{stdout}"
    );
    assert!(crate::support::marked_processes(&mark).is_empty());
}

#[test]
fn exec_stops_when_its_output_is_closed() {
    use std::io::BufRead as _;
    let mark = format!("exec-closed-{}", std::process::id());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(taskherd_bin())
        .args(["exec", "-w", "local", "--", "yes", "a line"])
        .env(crate::support::MARK_VAR, &mark)
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskherd exec");
    // Read a line, then go away as `| head -1` does.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a line");
    assert_eq!(first, "localhost: a line\n");
    drop(stdout);
    let mut pipe = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        let _ = tx.send(text);
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("taskherd exec did not end once its output was closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("stderr closed");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "taskherd exec: 1 instance on 1 host: 0 exited 0, 1 stopped (standard output was closed)"
        ),
        "{stderr}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !crate::support::marked_processes(&mark).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?}",
            crate::support::marked_processes(&mark)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
