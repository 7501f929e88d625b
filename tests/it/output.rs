//! Output relaying: whole lines, partial lines, bad bytes, huge lines.

use crate::support::Herd;

#[test]
fn partial_line_and_non_utf8_line_both_arrive() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "bytes"
command = "sh"
args = ["-c", "printf 'first half'; sleep 0.3; printf ' second half\n'; printf 'bad \\377\\376 bytes\n' >&2; printf 'no newline at the end'"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("info      [bytes] [localhost] [sh/1/1] first half second half");
    herd.wait_for("warning   [bytes] [localhost] [sh/1/1] bad \u{FFFD}\u{FFFD} bytes");
    herd.wait_for("[sh/1/1] no newline at the end");
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.lines_with("first half").len() == 1, "{:?}", herd.seen);
}

#[test]
fn one_mebibyte_line_arrives_split_and_complete() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "big"
command = "sh"
args = ["-c", "head -c 1048576 /dev/zero | tr '\\0' 'x'; echo; echo after"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[sh/1/1] after");
    assert_eq!(herd.wait_exit().code(), Some(0));
    let prefix = "[big] [localhost] [sh/1/1] ";
    let pieces: Vec<&str> = herd
        .seen
        .iter()
        .filter_map(|l| l.split_once(prefix).map(|(_, m)| m))
        .filter(|m| m.starts_with('x'))
        .collect();
    assert!(pieces.len() > 1, "a 1 MiB line must be split");
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    assert_eq!(total, 1 << 20);
    assert!(pieces.iter().all(|p| p.bytes().all(|b| b == b'x')));
}

#[test]
fn many_lines_are_all_relayed_in_order() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "chatty"
command = "{worker}"
params = { lines = 20000 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("Child clean exit");
    assert_eq!(herd.wait_exit().code(), Some(0));
    let numbers: Vec<u32> = herd
        .seen
        .iter()
        .filter_map(|l| {
            l.split_once("[worker/1/1] line ")
                .map(|(_, n)| n.parse().expect("number"))
        })
        .collect();
    assert_eq!(numbers, (1..=20000).collect::<Vec<_>>());
}
