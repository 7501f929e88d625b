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
