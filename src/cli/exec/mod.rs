//! `taskherd exec -w HOSTS [-n N] -- COMMAND ARGS...`: a command on hosts
//! without a config file, for the pdsh and GNU parallel habit.
//!
//! It writes the herd a config would hold (one group, `restart = never`,
//! the hosts of `-w` as one remote placement, `local` as a local one) and
//! runs it through the config parser and the master like any other: the
//! same SSH settings (ssh_config, ssh-agent, known_hosts), host ranges,
//! and stop on Ctrl-C. Its output is pdsh's ([`output`]): `HOST: line`,
//! unless `--log-format` or `--log-file` asks for the herd's log. At the
//! end it sums up how every instance ended; the exit code is 1 when any did not exit 0, and
//! 128 + N when signal N (Ctrl-C, SIGTERM) stopped the run (see
//! [`exit_code`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use taskherd::config::{hosts, Config};
use taskherd::log::InstanceLabel;
use taskherd::master::{self, RunReport};
use taskherd::protocol::slave::Level;
use taskherd::supervise::instance::InstanceEnd;

use crate::{LogArgs, Verbosity, EXIT_ERROR, EXIT_FAILED_INSTANCES};

mod output;

/// The `-w` entry that means the master's own host.
pub const LOCAL: &str = "local";

/// The name of the group `exec` runs.
const GROUP: &str = "exec";

/// What `taskherd exec` is given.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Where to run: host names, ranges (`web[01-16]`, `db[1,3,5]`),
    /// `user@host:port`, and `local` for this machine; comma-separated
    /// (commas inside brackets belong to the range), or `-w` again.
    /// `^FILE` reads them from a file (one or more per line, `#`
    /// comments), as pdsh does.
    #[arg(short = 'w', long = "hosts", value_name = "HOSTS", required = true)]
    hosts: Vec<String>,
    /// Hosts to leave out of `-w`: names, ranges, `local`, `^FILE`, as
    /// `-w` takes them (`-w 'node[1-64]' -x 'node[13,57]'`). An entry
    /// without `user@` or `:port` leaves out that host under any user and
    /// port.
    #[arg(short = 'x', long = "exclude", value_name = "HOSTS")]
    exclude: Vec<String>,
    /// Instances of the command on each host.
    #[arg(short = 'n', long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    instances: u32,
    /// Output lines without their `HOST: ` tag, as pdsh's `-N` (the
    /// summary still names hosts).
    #[arg(short = 'N', long = "no-tag")]
    no_tag: bool,
    /// Remote hosts at once, as pdsh's `-f`: the others wait until a
    /// host's instances have all ended, so `-f 1` goes host after host
    /// (a rolling restart). Default: every host at once (at most 32
    /// handshakes at a time). `local` runs at once, outside the count.
    #[arg(short = 'f', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    fanout: Option<u32>,
    /// The login on hosts named without `user@`, as pdsh's `-l`
    /// (default: ssh's, from ssh_config or the local user).
    #[arg(short = 'l', long, value_name = "USER")]
    user: Option<String>,
    /// TCP connect and handshake limit per host (`5s`), as pdsh's `-t`
    /// and `ssh.connect_timeout` (default 10s).
    #[arg(short = 't', long, value_name = "DURATION", value_parser = duration_arg)]
    connect_timeout: Option<std::time::Duration>,
    /// Reach the hosts through this one (`[user@]host[:port]`), as
    /// `ssh -J` and `ssh.jump_host`.
    #[arg(short = 'J', long, value_name = "HOST")]
    jump_host: Option<String>,
    /// The ssh_config file to use (default: ssh's own).
    #[arg(short = 'F', long, value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// The private key to log in with (default: ssh's, or ssh-agent).
    #[arg(short = 'i', long, value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// Add unknown hosts' keys on first contact (a changed key is still
    /// refused), as `known_hosts = "accept-new"`.
    #[arg(long)]
    accept_new_hosts: bool,
    /// A taskherd already installed on the hosts, instead of uploading
    /// this one.
    #[arg(long, value_name = "PATH")]
    agent_path: Option<String>,
    /// Connections in a row a host may lose (unreachable, or lost while
    /// running) before it is given up and its instances end lost, as
    /// `ssh.give_up_after`. The default, 1, tries each host once, as pdsh
    /// does: a command is never run twice. Refusals that look like sshd's
    /// `MaxStartups` are retried regardless.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    give_up_after: u32,
    /// Stop an instance still running this long after its start (`90s`,
    /// `5m`), as pdsh's `-u` and the group key `time_limit`: cleanly
    /// (SIGTERM, then SIGKILL after the stop grace), and it counts as
    /// failed. Each instance has its own clock, so with `-f` every host
    /// gets the whole time.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    timeout: Option<std::time::Duration>,
    /// The command and its arguments (after `--`), run as they are. One
    /// word with spaces or shell syntax (`'uptime | cut -d, -f1'`) runs
    /// through `sh -c`, as pdsh hands its command to the host's shell.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
    #[command(flatten)]
    log: LogArgs,
}

/// Runs `taskherd exec`.
pub fn run(args: ExecArgs, verbosity: Verbosity) -> anyhow::Result<ExitCode> {
    let lists = host_list("-w", &args.hosts)
        .and_then(|targets| Ok((targets, host_list("-x", &args.exclude)?)));
    let (targets, excluded) = match lists {
        Ok(lists) => lists,
        Err(message) => {
            eprintln!("taskherd exec: {message}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    // Whole entries, and names without user or port (any user, any port).
    let excluded: std::collections::HashSet<&str> = excluded.iter().map(String::as_str).collect();
    let left_out = |entry: &str| {
        excluded.contains(entry) || {
            let name = host_name(entry);
            name != entry && excluded.contains(name.as_str())
        }
    };
    let local = targets.iter().any(|entry| entry == LOCAL) && !left_out(LOCAL);
    let mut seen = std::collections::HashSet::new();
    let remote: Vec<String> = targets
        .into_iter()
        .filter(|entry| entry != LOCAL && !left_out(entry))
        .map(|entry| with_user(entry, args.user.as_deref()))
        .filter(|entry| seen.insert(entry.clone()))
        .collect();
    if !local && remote.is_empty() {
        let after = if excluded.is_empty() {
            ""
        } else {
            " once -x is applied"
        };
        eprintln!("taskherd exec: -w names no host{after}");
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    let text = herd_text(&args, local, &remote)?;
    // Relative commands and files are taken from the current directory.
    let source = Path::new("taskherd exec");
    let mut config = match Config::parse(&text, source) {
        Ok(config) => config,
        Err(errors) => {
            // Said of the flags, not of the config written for them.
            for err in &errors.0 {
                let flag = match err.key.as_str() {
                    key if key.contains(".hosts[") => "-w",
                    "ssh.jump_host" => "-J",
                    key => key,
                };
                eprintln!("taskherd exec: {flag}: {}", err.message);
            }
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    // pdsh's output, unless the herd's log is asked for.
    let plain = args.log.log_format.is_none() && args.log.log_file.is_none();
    let tags = output::Tags {
        with_id: args.instances > 1,
        on_output: !args.no_tag,
    };
    let filter_given = args.log.apply(&mut config, verbosity)?;
    let report = if plain {
        let events = match verbosity {
            _ if filter_given => output::Events::Filter(config.log.filter.clone()),
            Verbosity::Verbose => output::Events::Filter(config.log.filter.clone()),
            Verbosity::Normal => output::Events::Master(Level::Warning),
            Verbosity::Quiet => output::Events::Master(Level::Error),
        };
        let records = config.log.filter.clone();
        output::run(config, tags, events, records)?
    } else {
        master::Launcher::new(config)
            .run_blocking()
            .context("cannot start the master")?
    };
    let summary = if plain {
        summary(&report, &|label| tags.of(label))
    } else {
        summary(&report, &|label| label.to_string())
    };
    eprintln!("taskherd exec: {summary}");
    Ok(ExitCode::from(exit_code(&report)))
}

/// The exit code of a run, as a script expects of a command it ran:
///
/// - 0 when every instance exited 0;
/// - 128 + N when signal N stopped instances before their end (Ctrl-C:
///   130, SIGTERM: 143), as a shell reports a command a signal ended;
/// - 1 when any instance failed, was lost with its host or was stopped
///   another way (`taskherd stop`, closed stdout), or the run could not
///   start; an instance past `--timeout` is a failure.
fn exit_code(report: &RunReport) -> u8 {
    let stopped = report
        .instances
        .iter()
        .any(|r| matches!(r.end, InstanceEnd::Stopped { .. }));
    match report.stop_signal {
        Some(signal) if stopped => u8::try_from(128 + signal).unwrap_or(EXIT_FAILED_INSTANCES),
        _ if stopped || !report.success() => EXIT_FAILED_INSTANCES,
        _ => 0,
    }
}

/// The herd's config: one group, the command, its placements.
fn herd_text(args: &ExecArgs, local: bool, remote: &[String]) -> anyhow::Result<String> {
    use toml::{Table, Value};
    let (program, command_args) = args.command.split_first().context("no command given")?;
    let shell_line;
    let (program, command_args) = match shell_line_of(&args.command) {
        Some(line) => {
            shell_line = ["-c".to_string(), line.to_string()];
            (&"sh".to_string(), &shell_line[..])
        }
        None => (program, command_args),
    };
    let mut root = Table::new();
    let mut master = Table::new();
    if let Some(path) = &args.agent_path {
        master.insert("agent_path".into(), Value::String(path.clone()));
    }
    if let Some(fanout) = args.fanout {
        master.insert("max_active_hosts".into(), Value::Integer(i64::from(fanout)));
    }
    if !master.is_empty() {
        root.insert("master".into(), Value::Table(master));
    }
    let mut ssh = Table::new();
    if let Some(file) = &args.ssh_config {
        ssh.insert("ssh_config".into(), path_value(file)?);
    }
    if let Some(file) = &args.identity_file {
        ssh.insert("identity_file".into(), path_value(file)?);
    }
    if args.accept_new_hosts {
        ssh.insert("known_hosts".into(), Value::String("accept-new".into()));
    }
    if let Some(limit) = args.connect_timeout {
        let text = humantime::format_duration(limit).to_string();
        ssh.insert("connect_timeout".into(), Value::String(text));
    }
    if let Some(jump) = &args.jump_host {
        ssh.insert("jump_host".into(), Value::String(jump.clone()));
    }
    ssh.insert(
        "give_up_after".into(),
        Value::Integer(i64::from(args.give_up_after)),
    );
    root.insert("ssh".into(), Value::Table(ssh));
    let mut group = Table::new();
    group.insert("name".into(), Value::String(GROUP.into()));
    group.insert("command".into(), Value::String(program.clone()));
    group.insert(
        "args".into(),
        Value::Array(command_args.iter().cloned().map(Value::String).collect()),
    );
    let mut restart = Table::new();
    restart.insert("policy".into(), Value::String("never".into()));
    group.insert("restart".into(), Value::Table(restart));
    if let Some(limit) = args.timeout {
        let text = humantime::format_duration(limit).to_string();
        group.insert("time_limit".into(), Value::String(text));
    }
    let instances = Value::Integer(i64::from(args.instances));
    if local {
        let mut placement = Table::new();
        placement.insert("instances".into(), instances.clone());
        group.insert("local".into(), Value::Table(placement));
    }
    if !remote.is_empty() {
        let mut placement = Table::new();
        placement.insert(
            "hosts".into(),
            Value::Array(remote.iter().cloned().map(Value::String).collect()),
        );
        placement.insert("instances".into(), instances);
        group.insert("remote".into(), Value::Array(vec![Value::Table(placement)]));
    }
    root.insert("group".into(), Value::Array(vec![Value::Table(group)]));
    toml::to_string(&root).context("cannot write the herd's config")
}

/// The shell command line `command` is, when it is one word with spaces
/// or shell syntax (`'uptime | cut -d, -f1'`, `'cd /srv && make'`) and
/// not a file here: pdsh's habit of one quoted command for the host's
/// shell. `None` for a program with its arguments, run as they are.
fn shell_line_of(command: &[String]) -> Option<&str> {
    let [word] = command else {
        return None;
    };
    let shell_syntax = |c: char| c.is_whitespace() || "|&;<>()$`\\\"'*?[]#~=%{}".contains(c);
    (word.contains(shell_syntax) && !Path::new(word).exists()).then_some(word.as_str())
}

/// `--timeout`: a duration such as `90s` or `1m 30s`, more than zero.
fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    match taskherd::queue::options::parse_duration(text) {
        Ok(limit) if limit.is_zero() => Err("must be more than 0".into()),
        other => other,
    }
}

/// A path as a TOML string (absolute, so that it does not depend on
/// where the config would be).
fn path_value(path: &Path) -> anyhow::Result<toml::Value> {
    let path = std::path::absolute(path)
        .with_context(|| format!("cannot make {} absolute", path.display()))?;
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(toml::Value::String(text.to_string()))
}

/// The hosts `lists` (the values of `flag`) name, ranges expanded and
/// `^FILE`s read, in order; the error is the message to print.
fn host_list(flag: &str, lists: &[String]) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for entry in lists.iter().flat_map(|list| split_list(list)) {
        let entries = match entry.strip_prefix('^') {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|err| format!("{flag} ^{file}: cannot read it: {err}"))?;
                text.lines()
                    .map(|line| line.split('#').next().unwrap_or_default())
                    .flat_map(|line| line.split_whitespace().flat_map(split_list))
                    .collect()
            }
            None => vec![entry],
        };
        for entry in entries {
            if entry == LOCAL {
                names.push(entry);
                continue;
            }
            if entry.starts_with('@') {
                return Err(format!(
                    "{flag} {entry}: host groups come from a config's [inventory]; \
                     exec takes host names and ranges (or ^FILE)"
                ));
            }
            let expanded = hosts::expand(&entry).map_err(|err| format!("{flag} {entry}: {err}"))?;
            names.extend(expanded);
        }
    }
    Ok(names)
}

/// `entry` with `user@` in front when it names no user (`-l`).
fn with_user(entry: String, user: Option<&str>) -> String {
    match user {
        Some(user) if !entry.contains('@') => format!("{user}@{entry}"),
        _ => entry,
    }
}

/// The host name of an entry, without `user@` and `:port` (`deploy@web2:22`:
/// `web2`; `[::1]:2222`: `::1`), as the config reads it; an entry it does
/// not read (a bare IPv6 address) as it is.
fn host_name(entry: &str) -> String {
    taskherd::config::parse_host(entry).map_or_else(|_| entry.to_string(), |host| host.name)
}

/// `a,b[1,2],c` split at the commas outside brackets; empty entries
/// dropped.
pub fn split_list(list: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                entries.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    entries.push(current);
    entries
        .into_iter()
        .map(|entry| entry.trim().to_string())
        .filter(|entry| !entry.is_empty())
        .collect()
}

/// `8 instances on 4 hosts: 7 exited 0, 1 failed`, then a line for each
/// instance that failed or was lost (`web3/5: exited with code 1`, each
/// instance named by `name`); with `stopped (SIGINT received)` when the
/// run was stopped before some ended, and how many of those had to be
/// killed after their grace.
fn summary(report: &RunReport, name: &dyn Fn(&InstanceLabel) -> String) -> String {
    let instances = &report.instances;
    let hosts: std::collections::BTreeSet<&str> =
        instances.iter().map(|r| r.label.host.as_str()).collect();
    let mut ok = 0usize;
    let mut failed = Vec::new();
    let mut stopped = 0usize;
    let mut lost = Vec::new();
    for r in instances {
        match &r.end {
            InstanceEnd::Completed => ok += 1,
            InstanceEnd::Failed { reason } => failed.push(format!("{}: {reason}", name(&r.label))),
            InstanceEnd::Stopped { .. } => stopped += 1,
            InstanceEnd::Lost { reason } => lost.push(format!("{}: {reason}", name(&r.label))),
        }
    }
    let mut parts = vec![format!("{ok} exited 0")];
    if !failed.is_empty() {
        parts.push(format!("{} failed", failed.len()));
    }
    if !lost.is_empty() {
        parts.push(format!("{} lost", lost.len()));
    }
    if stopped > 0 {
        let mut why: Vec<String> = report.stop_reason.iter().cloned().collect();
        let killed = report.killed_after_grace().count();
        if killed > 0 {
            why.push(format!("{killed} killed after the stop grace"));
        }
        parts.push(if why.is_empty() {
            format!("{stopped} stopped")
        } else {
            format!("{stopped} stopped ({})", why.join("; "))
        });
    }
    let mut text = format!(
        "{} on {}: {}",
        plural(instances.len(), "instance"),
        plural(hosts.len(), "host"),
        parts.join(", ")
    );
    for line in failed.iter().chain(&lost) {
        text.push_str("\n  ");
        text.push_str(line);
    }
    text
}

/// `1 host`, `2 hosts`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lists_expand_ranges_read_files_and_name_hosts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("hosts");
        std::fs::write(
            &file,
            "# the racks\nrack[1-2]  db1,db2 # two dbs\n\nlocal\n",
        )
        .expect("write");
        let lists = vec![
            format!("web[01-02],^{}", file.display()),
            "ops@gw:2222".into(),
        ];
        assert_eq!(
            host_list("-w", &lists).expect("valid"),
            [
                "web01",
                "web02",
                "rack1",
                "rack2",
                "db1",
                "db2",
                "local",
                "ops@gw:2222"
            ]
        );
        let err = host_list("-w", &["web[2-1]".into()]).expect_err("backwards");
        assert!(err.starts_with("-w web[2-1]: "), "{err}");
        let err = host_list("-x", &["^/no/such/file".into()]).expect_err("missing file");
        assert!(
            err.starts_with("-x ^/no/such/file: cannot read it: "),
            "{err}"
        );
        assert_eq!(host_name("deploy@web2:2222"), "web2");
        assert_eq!(host_name("web2"), "web2");
        assert_eq!(host_name("[::1]:2222"), "::1");
        assert_eq!(host_name("fe80::1"), "fe80::1");
        assert_eq!(host_name("ops@[fe80::1]"), "fe80::1");
    }

    #[test]
    fn one_word_of_shell_syntax_runs_through_sh() {
        let words = |list: &[&str]| list.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shell_line_of(&words(&["uptime | cut -d, -f1"])),
            Some("uptime | cut -d, -f1")
        );
        assert_eq!(
            shell_line_of(&words(&["cd /srv && make"])),
            Some("cd /srv && make")
        );
        assert_eq!(shell_line_of(&words(&["echo $HOME"])), Some("echo $HOME"));
        // A program alone, or with its arguments: run as it is.
        assert_eq!(shell_line_of(&words(&["uptime"])), None);
        assert_eq!(shell_line_of(&words(&["/usr/bin/env"])), None);
        assert_eq!(shell_line_of(&words(&["echo", "a | b"])), None);
        // A file here whose name has a space is a program.
        let dir = tempfile::tempdir().expect("temp dir");
        let program = dir.path().join("my tool");
        std::fs::write(&program, "").expect("write");
        let name = program.display().to_string();
        assert_eq!(shell_line_of(&words(&[name.as_str()])), None);
    }

    #[test]
    fn l_names_the_login_of_hosts_without_one() {
        assert_eq!(with_user("web1".into(), Some("ops")), "ops@web1");
        assert_eq!(with_user("web1:2222".into(), Some("ops")), "ops@web1:2222");
        assert_eq!(with_user("root@web1".into(), Some("ops")), "root@web1");
        assert_eq!(with_user("web1".into(), None), "web1");
    }

    #[test]
    fn lists_split_outside_brackets() {
        assert_eq!(
            split_list("web[1,3],db1, local,,[::1]:22"),
            ["web[1,3]", "db1", "local", "[::1]:22"]
        );
        assert!(split_list(" , ").is_empty());
    }

    fn report(
        host: &str,
        id: u32,
        end: InstanceEnd,
    ) -> taskherd::supervise::instance::InstanceReport {
        taskherd::supervise::instance::InstanceReport {
            label: std::sync::Arc::new(taskherd::protocol::instance::InstanceLabel {
                group: GROUP.into(),
                host: host.into(),
                command: "sh".into(),
                id,
                group_id: id,
            }),
            end,
        }
    }

    fn run(ends: Vec<InstanceEnd>, stop_signal: Option<i32>) -> RunReport {
        let stopped = ends
            .iter()
            .any(|end| matches!(end, InstanceEnd::Stopped { .. }));
        RunReport {
            instances: (1..)
                .zip(ends)
                .map(|(id, end)| report("web1", id, end))
                .collect(),
            stop_reason: (stopped || stop_signal.is_some()).then(|| "SIGINT received".into()),
            stop_signal,
            ..RunReport::default()
        }
    }

    #[test]
    fn the_exit_code_says_whether_every_instance_exited_0_or_a_signal_stopped_them() {
        use InstanceEnd::{Completed, Failed, Lost, Stopped};
        let failed = || Failed {
            reason: "exited with code 5".into(),
        };
        let stopped = Stopped { killed: false };
        assert_eq!(exit_code(&run(vec![Completed, Completed], None)), 0);
        assert_eq!(exit_code(&run(vec![Completed, failed()], None)), 1);
        let lost = Lost {
            reason: "host lost".into(),
        };
        assert_eq!(exit_code(&run(vec![Completed, lost], None)), 1);
        // Ctrl-C and SIGTERM before the end: as a shell says it.
        let sigint = Some(libc::SIGINT);
        assert_eq!(
            exit_code(&run(vec![Completed, stopped.clone()], sigint)),
            130
        );
        let sigterm = Some(libc::SIGTERM);
        assert_eq!(
            exit_code(&run(vec![failed(), stopped.clone()], sigterm)),
            143
        );
        // A signal after every instance had ended stopped nothing.
        assert_eq!(exit_code(&run(vec![Completed], sigint)), 0);
        assert_eq!(exit_code(&run(vec![failed()], sigint)), 1);
        // Stopped by an operator's command: not a success either.
        assert_eq!(exit_code(&run(vec![Completed, stopped], None)), 1);
        let fatal = RunReport {
            fatal: Some("cannot bind".into()),
            ..RunReport::default()
        };
        assert_eq!(exit_code(&fatal), 1);
    }

    #[test]
    fn the_summary_says_why_instances_were_stopped() {
        let ends = vec![
            InstanceEnd::Completed,
            InstanceEnd::Stopped { killed: false },
        ];
        let report = run(ends, Some(libc::SIGINT));
        let tags = output::Tags {
            with_id: false,
            on_output: true,
        };
        assert_eq!(
            summary(&report, &|label| tags.of(label)),
            "2 instances on 1 host: 1 exited 0, 1 stopped (SIGINT received)"
        );
        let first = RunReport {
            instances: report.instances[..1].to_vec(),
            ..RunReport::default()
        };
        assert_eq!(
            summary(&first, &|label| tags.of(label)),
            "1 instance on 1 host: 1 exited 0"
        );
        // Killed after the grace: said with the reason.
        let killed = run(
            vec![InstanceEnd::Stopped { killed: true }],
            Some(libc::SIGTERM),
        );
        assert_eq!(
            summary(&killed, &|label| tags.of(label)),
            "1 instance on 1 host: 0 exited 0, 1 stopped (SIGINT received; 1 killed after the stop grace)"
        );
    }

    #[test]
    fn the_summary_names_instances_by_tag_or_by_label() {
        let ends = vec![
            InstanceEnd::Failed {
                reason: "exited with code 1".into(),
            },
            InstanceEnd::Lost {
                reason: "cannot connect".into(),
            },
        ];
        let report = run(ends, None);
        let plain = output::Tags {
            with_id: false,
            on_output: true,
        };
        assert_eq!(
            summary(&report, &|label| plain.of(label)),
            "2 instances on 1 host: 0 exited 0, 1 failed, 1 lost\n  web1: exited with code 1\n  web1: cannot connect"
        );
        let numbered = output::Tags {
            with_id: true,
            on_output: true,
        };
        assert_eq!(
            summary(&report, &|label| numbered.of(label)),
            "2 instances on 1 host: 0 exited 0, 1 failed, 1 lost\n  web1/1: exited with code 1\n  web1/2: cannot connect"
        );
        assert_eq!(
            summary(&report, &|label| label.to_string()),
            "2 instances on 1 host: 0 exited 0, 1 failed, 1 lost\n  [exec] [web1] [sh/1/1]: exited with code 1\n  [exec] [web1] [sh/2/2]: cannot connect"
        );
    }
}
