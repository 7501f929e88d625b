//! Remote start-up time against real sshd hosts on loopback, compared with
//! `pdsh` running the same number of commands (a benchmark, not a test).
//!
//! For H hosts × I instances per host it measures the wall time from the
//! spawn of `taskherd run` until every instance has printed its first line
//! (the master's log line `[bench] [host] [sh/n/n] ready`), and the time
//! `pdsh -R ssh` takes to run `echo ready` on H × I targets (I ssh_config
//! aliases per sshd, so the same commands on the same sshd) and collect
//! their output. Agents are preinstalled (`master.agent_path` is the built
//! binary: the hosts are this machine), so no upload is timed.
//!
//! Two references show where the time goes: pdsh on 8 hosts × 1 command
//! (one SSH connection per host, all at once: what taskherd 8 × 8 cannot do
//! without) and a single `ssh host true`.
//!
//! ```sh
//! cargo bench --bench remote_start                 # 5 runs per scenario
//! BENCH_RUNS=11 cargo bench --bench remote_start
//! BENCH_RUNS=3 cargo bench --bench remote_start -- --fanout
//! BENCH_RUNS=3 cargo bench --bench remote_start -- --scale
//! BENCH_RUNS=1 BENCH_SCALE_COST_HOSTS="64 128 192" cargo bench --bench remote_start -- --scale --costs
//! BENCH_RUNS=5 cargo bench --bench remote_start -- --agent
//! ```
//!
//! With `--agent`, the CPU of one host's side without ssh: an agent and
//! its 4 instances against `sh` starting the same programs (see
//! `agent_cost.rs`).
//!
//! With `--fanout` (what `scripts/bench.sh` runs) it measures instead what
//! issue 7 asks of remote placement, on the same sshd hosts:
//!
//! - **time to completion** of instances that print one line and exit
//!   (`sh -c 'echo done $TASKHERD_ID'`, restart policy `never`): from the
//!   spawn of `taskherd run` to its exit (0, every id's line seen), for
//!   2 hosts × 4 and 8 hosts × 8; against `pdsh -R ssh` and `parallel -S`
//!   running `echo done` as many times on the same hosts (`parallel -S
//!   4/host1,4/host2`: 4 job slots per host, one ssh per job), through the
//!   same ssh_config and login, every output line checked;
//! - the floor of 8 × 8: `pdsh` with one ssh per host, all at once;
//! - **stop latency** of 2 hosts × 4 library instances (`worker`, `sleep =
//!   600`, so they honour Stop): SIGTERM to the master's exit (0), then the
//!   hosts are checked to be quiet.
//!
//! With `--scale` (`BENCH_ONLY=scale scripts/bench.sh`) it measures on 64
//! sshd hosts what the master costs as hosts are added (see
//! `remote_start/scale.rs`): fan-out of 2, 16 and 64 hosts × 4 with the
//! plain `/bin/sh` login and with a login whose rc file costs 0.2 s
//! (`taskherd-rc`), next to `pdsh -R ssh -f 64` running one command per
//! host; the rc file's cost; 64 hosts × 8 long-running instances until
//! all run; the master's CPU, memory and file descriptors per connected
//! host at 8, 16, 32 and 64 hosts, and its CPU per relayed line.
//!
//! It prints one `RESULT <key> <median ms> <min ms> <max ms> <runs>` line
//! per measurement for the script to parse (and, with `--scale`, `FIGURE
//! <key> <value>` lines for costs).
//!
//! Every sshd, master, agent and instance it starts is stopped before it
//! ends (the hosts are checked to be quiet between runs). Without the
//! `--bench` flag that `cargo bench` passes (e.g. `cargo test
//! --all-targets`), it does nothing.

#[allow(dead_code)]
#[path = "../tests/it/support/sshd.rs"]
mod sshd;

#[path = "remote_start/agent_cost.rs"]
mod agent_cost;
#[path = "remote_start/scale.rs"]
mod scale;

use sshd::{SshHost, SshWorld};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// pdsh's fan-out (`-f`) in every row, and taskherd's `max_handshakes`
/// next to it: both tools set up as many connections at once.
const PDSH_FANOUT: u32 = 64;

/// Runs per scenario unless `BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 5;

/// sshd hosts started (the largest scenario uses them all).
const HOSTS: usize = 8;

/// Bound on one start (all instances ready) or one pdsh run.
const START_WITHIN: Duration = Duration::from_secs(60);

/// Bound on the master's exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Bound on the hosts' going quiet after a run.
const QUIET_WITHIN: Duration = Duration::from_secs(30);

/// The master's log line once an agent has answered and got its instances.
const CONNECTED_LINE: &str = ": connected, agent pid ";

/// pdsh, from the Debian package.
const PDSH: &str = "/usr/bin/pdsh";

/// What the herd runs on each host, and how its first line looks.
struct Program {
    /// Label in the printed figures.
    name: &'static str,
    /// `[[group]]` keys `command`, `args` and `params`, as TOML lines.
    group_keys: String,
    /// Substring of the master's log line that says one instance is up.
    ready_line: &'static str,
}

impl Program {
    /// `sh -c "echo ready; exec sleep 600"`: a plain program.
    fn shell() -> Program {
        Program {
            name: "sh",
            group_keys: format!(
                "command = \"sh\"\nargs = [\"-c\", {}]\n",
                toml_string("echo ready; exec sleep 600")
            ),
            ready_line: "] ready",
        }
    }

    /// The `worker` example (a library slave that gets its identity over
    /// the control channel before it prints `Child {id} {group_id}`).
    fn worker(path: &Path) -> Program {
        Program {
            name: "worker",
            group_keys: format!(
                "command = {}\nparams = {{ sleep = 600 }}\n",
                toml_string(&path.display().to_string())
            ),
            ready_line: "] Child ",
        }
    }
}

impl Program {
    /// `sh -c "echo done $TASKHERD_ID"`, never restarted: prints one line
    /// and exits.
    fn one_line() -> Program {
        Program {
            name: "echo",
            group_keys: format!(
                "command = \"sh\"\nargs = [\"-c\", {}]\nrestart = {{ policy = \"never\" }}\n",
                toml_string("echo done $TASKHERD_ID")
            ),
            ready_line: "] done ",
        }
    }
}

/// Times of one start of the herd, from the spawn of `taskherd run`.
struct StartTimes {
    /// Every agent has answered its hello and received its instances.
    connected: Duration,
    /// Every instance has printed its first line.
    ready: Duration,
}

/// min / median / max of some runs.
struct Figures {
    label: String,
    runs: usize,
    min: Duration,
    median: Duration,
    max: Duration,
}

impl Figures {
    fn of(label: impl Into<String>, mut times: Vec<Duration>) -> Figures {
        assert!(!times.is_empty(), "invariant: at least one run");
        times.sort_unstable();
        let n = times.len();
        let median = if n % 2 == 1 {
            times[n / 2]
        } else {
            (times[n / 2 - 1] + times[n / 2]) / 2
        };
        Figures {
            label: label.into(),
            runs: n,
            min: times[0],
            median,
            max: times[n - 1],
        }
    }
}

/// A running `taskherd run`: its stdout lines arrive on a channel; SIGKILLed
/// and awaited on drop if still running (a panicking bench leaves nothing).
struct Master {
    child: Child,
    /// Lines of the master's stdout (its log), read by a thread.
    lines_rx: mpsc::Receiver<String>,
    /// Its stderr (internal diagnostics), for failure messages.
    stderr: Option<JoinHandle<String>>,
    /// Every stdout line received so far, for failure messages.
    seen: Vec<String>,
    /// When the master exited, from a thread blocked in `waitid(2)` (which
    /// leaves it to be reaped): the wait costs no polling, so the bench
    /// takes no CPU from the run it times (a 1 ms poll cost a loaded
    /// 64-host run about 0.2 s of CPU).
    exited_rx: mpsc::Receiver<Instant>,
}

impl Master {
    fn spawn(taskherd: &Path, config: &Path) -> Master {
        Master::spawn_in(Command::new(taskherd), taskherd, config)
    }

    /// [`Master::spawn`] with `command` (`taskherd`, maybe with some
    /// environment set).
    fn spawn_in(mut command: Command, taskherd: &Path, config: &Path) -> Master {
        let mut child = command
            .arg("run")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", taskherd.display()));
        let stdout = child.stdout.take().expect("invariant: piped stdout");
        let mut stderr = child.stderr.take().expect("invariant: piped stderr");
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let pid = child.id();
        let (exited_tx, exited_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: siginfo_t is plain data; all zeros is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child, WNOWAIT: it stays to be
            // reaped by `Child::wait`/`try_wait`.
            let waited = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if waited == 0 {
                let _ = exited_tx.send(Instant::now());
            }
        });
        Master {
            child,
            lines_rx,
            stderr: Some(stderr),
            seen: Vec::new(),
            exited_rx,
        }
    }

    /// The next stdout line, or `None` at `deadline` or end of stream.
    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = self.lines_rx.recv_timeout(wait).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// SIGTERM, then waits (bounded) and checks it exited with 0.
    fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WITHIN;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => self.fail(&format!("still running {STOP_WITHIN:?} after SIGTERM")),
                Err(err) => self.fail(&format!("cannot wait for it: {err}")),
            }
        };
        if status.code() != Some(0) {
            self.fail(&format!("exited with {status} after SIGTERM"));
        }
    }

    /// Panics with what the master printed (it is killed on drop).
    fn fail(&mut self, why: &str) -> ! {
        self.seen.extend(self.lines_rx.try_iter());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default();
        let tail = self.seen.len().saturating_sub(40);
        panic!(
            "taskherd run: {why}\n--- last stdout lines:\n{}\n--- stderr:\n{stderr}",
            self.seen[tail..].join("\n")
        );
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Runs per scenario: `BENCH_RUNS`, default [`DEFAULT_RUNS`].
fn runs() -> usize {
    match std::env::var("BENCH_RUNS") {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("BENCH_RUNS must be a whole number of at least 1, found {text:?}"),
        },
        Err(_) => DEFAULT_RUNS,
    }
}

/// Writes the herd config for `instances` on each of `hosts`.
fn write_herd_config(
    dir: &Path,
    taskherd: &Path,
    ssh_config: &Path,
    hosts: &[SshHost],
    instances: usize,
    program: &Program,
) -> PathBuf {
    let aliases: Vec<String> = hosts.iter().map(|h| toml_string(h.alias())).collect();
    let text = format!(
        "[master]\n\
         agent_path = {agent}\n\
         stop_grace = \"5s\"\n\
         max_handshakes = {fanout}\n\
         \n\
         [ssh]\n\
         ssh_config = {ssh_config}\n\
         \n\
         [[group]]\n\
         name = \"bench\"\n\
         {group_keys}\
         [[group.remote]]\n\
         hosts = [{hosts}]\n\
         instances = {instances}\n",
        agent = toml_string(&taskherd.display().to_string()),
        fanout = PDSH_FANOUT,
        ssh_config = toml_string(&ssh_config.display().to_string()),
        group_keys = program.group_keys,
        hosts = aliases.join(", "),
    );
    let login = ssh_config
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(format!(
        "herd-{}x{instances}-{}-{login}.toml",
        hosts.len(),
        program.name
    ));
    std::fs::write(&path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    path
}

/// One start of the herd: until every instance is ready, then a clean stop.
fn time_herd(
    taskherd: &Path,
    config: &Path,
    hosts: usize,
    expected: usize,
    ready_line: &str,
) -> StartTimes {
    let (master, times) = start_until_ready(taskherd, config, hosts, expected, ready_line);
    master.stop();
    times
}

/// Spawns `taskherd run` and waits (bounded) until `expected` instances on
/// `hosts` hosts have printed `ready_line`; returns the running master.
fn start_until_ready(
    taskherd: &Path,
    config: &Path,
    hosts: usize,
    expected: usize,
    ready_line: &str,
) -> (Master, StartTimes) {
    let command = Command::new(taskherd);
    start_until_ready_in(command, taskherd, config, hosts, expected, ready_line)
}

/// [`start_until_ready`] with `command` (see [`Master::spawn_in`]).
fn start_until_ready_in(
    command: Command,
    taskherd: &Path,
    config: &Path,
    hosts: usize,
    expected: usize,
    ready_line: &str,
) -> (Master, StartTimes) {
    let start = Instant::now();
    let mut master = Master::spawn_in(command, taskherd, config);
    let deadline = start + START_WITHIN;
    let (mut connected_hosts, mut ready) = (0, 0);
    let mut connected = None;
    while ready < expected {
        let Some(line) = master.next_line(deadline) else {
            master.fail(&format!(
                "{ready} of {expected} instances ready, {connected_hosts} of {hosts} hosts connected, within {START_WITHIN:?}"
            ));
        };
        if line.contains(CONNECTED_LINE) {
            connected_hosts += 1;
            if connected_hosts == hosts {
                connected = Some(start.elapsed());
            }
        }
        if line.contains(ready_line) {
            ready += 1;
        }
    }
    let ready_at = start.elapsed();
    let times = StartTimes {
        // Instances only start once their agent is connected.
        connected: connected.unwrap_or(ready_at),
        ready: ready_at,
    };
    (master, times)
}

/// Waits (bounded) until nothing started through `hosts` is left.
fn wait_quiet(hosts: &[SshHost]) {
    let deadline = Instant::now() + QUIET_WITHIN;
    for host in hosts {
        loop {
            let left = host.processes();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "still running on {} {QUIET_WITHIN:?} after the run: {left:?}",
                    host.alias()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a herd scenario `runs` times; prints every run.
fn herd_scenario(
    dir: &Path,
    taskherd: &Path,
    world: &SshWorld,
    hosts: &[SshHost],
    instances: usize,
    program: &Program,
    runs: usize,
) -> (Figures, Figures) {
    let label = format!("taskherd {} × {instances} ({})", hosts.len(), program.name);
    let config = write_herd_config(
        dir,
        taskherd,
        &world.ssh_config(),
        hosts,
        instances,
        program,
    );
    let (mut connected, mut ready) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let times = time_herd(
            taskherd,
            &config,
            hosts.len(),
            hosts.len() * instances,
            program.ready_line,
        );
        wait_quiet(hosts);
        println!(
            "{label}, run {run}: all agents connected at {}, all instances ready at {}",
            ms(times.connected),
            ms(times.ready)
        );
        connected.push(times.connected);
        ready.push(times.ready);
    }
    (
        Figures::of(label.clone(), ready),
        Figures::of("  of which: all agents connected", connected),
    )
}

/// Writes an ssh_config with `per_host` aliases `pd-<h>-<i>` for each of
/// `hosts` (copies of the world's Host blocks); returns the aliases per host.
fn write_pdsh_config(
    dir: &Path,
    world: &SshWorld,
    hosts: &[SshHost],
    per_host: usize,
) -> (PathBuf, Vec<Vec<String>>) {
    let world_config = world.ssh_config();
    let text = std::fs::read_to_string(&world_config)
        .unwrap_or_else(|err| panic!("read {}: {err}", world_config.display()));
    // "\nHost <alias>\n<indented body>" blocks.
    let blocks: HashMap<&str, &str> = text
        .split("\nHost ")
        .skip(1)
        .filter_map(|block| block.split_once('\n'))
        .map(|(alias, body)| (alias.trim(), body))
        .collect();
    let mut config = String::from("# pdsh targets: copies of the taskherd hosts.\n");
    let mut aliases = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let body = blocks
            .get(host.alias())
            .unwrap_or_else(|| panic!("no Host {} in {}", host.alias(), world_config.display()));
        let mut of_host = Vec::new();
        for i in 1..=per_host {
            let alias = format!("pd-{}-{i}", h + 1);
            config.push_str(&format!("\nHost {alias}\n{}\n", body.trim_end()));
            of_host.push(alias);
        }
        aliases.push(of_host);
    }
    let path = dir.join("pdsh_ssh_config");
    std::fs::write(&path, config).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    (path, aliases)
}

/// Runs `command` to its end (bounded by [`START_WITHIN`]): the time from
/// its spawn to its exit with all output collected, and that output.
fn time_command(mut command: Command, what: &str) -> (Duration, Output) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: cannot run {command:?}: {err}"));
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done_tx.send((start.elapsed(), output));
    });
    match done_rx.recv_timeout(START_WITHIN) {
        Ok((elapsed, Ok(output))) => (elapsed, output),
        Ok((_, Err(err))) => panic!("{what}: cannot wait for {command:?}: {err}"),
        Err(_) => {
            // SAFETY: plain kill(2) on our own child, still running.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what}: {command:?} still running after {START_WITHIN:?}");
        }
    }
}

/// Lines each host prints in the exec output scenario.
const OUTPUT_LINES: u32 = 500_000;

/// `what` printed `seq 1 OUTPUT_LINES` from each of `hosts` hosts as
/// pdsh does, `TAG: n`, every line there once and in order per host.
fn check_seq_output(what: &str, output: &Output, hosts: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut next: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for line in stdout.lines() {
        let parsed = line
            .split_once(": ")
            .and_then(|(tag, n)| Some((tag, n.parse::<u32>().ok()?)));
        let Some((tag, n)) = parsed else {
            panic!("{what}: not `TAG: n`: {line:?}");
        };
        let expected = next.entry(tag).or_insert(1);
        assert_eq!(n, *expected, "{what}: line {n} of {tag} out of order");
        *expected += 1;
    }
    let complete = next.values().filter(|n| **n == OUTPUT_LINES + 1).count();
    if !output.status.success() || next.len() != hosts || complete != hosts {
        panic!(
            "{what} ({}): {complete} of {hosts} hosts printed their {OUTPUT_LINES} lines\n--- stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `taskherd exec -w HOSTS -- seq 1 OUTPUT_LINES`, its output read
/// through a pipe; checked.
fn time_exec_output(taskherd: &Path, world: &SshWorld, hosts: &[SshHost]) -> Duration {
    let mut command = Command::new(taskherd);
    let list: Vec<&str> = hosts.iter().map(SshHost::alias).collect();
    command
        .args(["exec", "-w", &list.join(","), "-F"])
        .arg(world.ssh_config())
        .arg("--agent-path")
        .arg(taskherd)
        .args(["--", "seq", "1", &OUTPUT_LINES.to_string()]);
    let (elapsed, output) = time_command(command, "taskherd exec");
    check_seq_output("taskherd exec", &output, hosts.len());
    elapsed
}

/// `pdsh -R ssh -w HOSTS 'seq 1 OUTPUT_LINES'`, its output read through
/// a pipe; checked.
fn time_pdsh_output(config: &Path, targets: &[String]) -> Duration {
    let command = pdsh_command(config, targets, &format!("seq 1 {OUTPUT_LINES}"));
    let (elapsed, output) = time_command(command, "pdsh");
    check_seq_output("pdsh", &output, targets.len());
    elapsed
}

/// `pdsh -R ssh -f PDSH_FANOUT -w TARGETS REMOTE_COMMAND` with ssh's
/// `config` and the test login.
fn pdsh_command(config: &Path, targets: &[String], remote_command: &str) -> Command {
    let mut command = Command::new(PDSH);
    command
        // The same login as taskherd's sessions (see sshd::login_user):
        // pdsh's %u would otherwise be the local user, with its shell rc.
        .args([
            "-R",
            "ssh",
            "-f",
            &PDSH_FANOUT.to_string(),
            "-l",
            sshd::login_user(),
            "-w",
        ])
        .arg(targets.join(","))
        .arg(remote_command)
        // pdsh's default is "-2 -a -x -l%u %h"; only `-F config` is added.
        .env(
            "PDSH_SSH_ARGS",
            format!("-F {} -2 -a -x -l%u %h", config.display()),
        )
        .env_remove("PDSH_SSH_ARGS_APPEND")
        .env_remove("PDSH_RCMD_TYPE");
    command
}

/// One pdsh run of `echo ready` on `targets`; checks every target answered.
fn time_pdsh(config: &Path, targets: &[String]) -> Duration {
    time_pdsh_echo(config, targets, "ready")
}

/// One pdsh run of `echo <word>` on `targets`; checks every target answered.
fn time_pdsh_echo(config: &Path, targets: &[String], word: &str) -> Duration {
    let command = pdsh_command(config, targets, &format!("echo {word}"));
    let (elapsed, output) = time_command(command, "pdsh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let suffix = format!(": {word}");
    let ready = stdout
        .lines()
        .filter(|line| line.ends_with(&suffix))
        .count();
    if !output.status.success() || ready != targets.len() {
        panic!(
            "pdsh ({}): {ready} of {} targets said {word}\n--- stdout:\n{stdout}\n--- stderr:\n{}",
            output.status,
            targets.len(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    elapsed
}

/// Runs pdsh on `per_host` aliases of each of `hosts`, `runs` times.
fn pdsh_scenario(
    config: &Path,
    aliases: &[Vec<String>],
    hosts: &[SshHost],
    per_host: usize,
    runs: usize,
) -> Figures {
    let label = format!("pdsh {} × {per_host} (echo ready)", hosts.len());
    let targets: Vec<String> = aliases[..hosts.len()]
        .iter()
        .flat_map(|of_host| of_host[..per_host].iter().cloned())
        .collect();
    let mut times = Vec::new();
    for run in 1..=runs {
        let elapsed = time_pdsh(config, &targets);
        wait_quiet(hosts);
        println!(
            "{label}, run {run}: {} commands done in {}",
            targets.len(),
            ms(elapsed)
        );
        times.push(elapsed);
    }
    Figures::of(label, times)
}

/// Plain ssh to `host`, `runs` times each: `ssh host true` (connection,
/// key exchange, authentication, session, the remote shell running `true`),
/// then the two halves apart: the handshake alone (a ControlMaster with `-f
/// -N` returns once authenticated, no command) and `true` over that
/// ControlMaster (session and remote shell only). pdsh pays the whole for
/// every target; taskherd pays a handshake and one command (its agent) per
/// host.
fn ssh_scenarios(dir: &Path, world: &SshWorld, host: &SshHost, runs: usize) -> [Figures; 3] {
    let labels = [
        "ssh host true (1 command)",
        "  handshake alone (ControlMaster)",
        "  true over the ControlMaster",
    ];
    let mut times: [Vec<Duration>; 3] = Default::default();
    let ssh = |options: &[&str], socket: &Path| {
        let mut command = Command::new("ssh");
        command
            .arg("-F")
            .arg(world.ssh_config())
            .args(options)
            .arg("-o")
            .arg(format!("ControlPath={}", socket.display()))
            .arg(host.alias());
        command
    };
    let check = |what: &str, output: &Output| {
        if !output.status.success() {
            panic!(
                "{what} on {}: {}: {}",
                host.alias(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    };
    for run in 1..=runs {
        let socket = dir.join(format!("mux-{run}"));
        let mut whole = ssh(&["-o", "ControlMaster=no"], &socket);
        whole.arg("true");
        let (elapsed, output) = time_command(whole, "ssh host true");
        check("ssh host true", &output);
        times[0].push(elapsed);

        // The backgrounded master keeps whatever stdout/stderr it got: not
        // pipes, or waiting for their end would wait for the master.
        let log = dir.join(format!("mux-{run}.log"));
        let mut master = ssh(
            &[
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=no",
                "-f",
                "-N",
            ],
            &socket,
        );
        master
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let start = Instant::now();
        let status = master
            .status()
            .unwrap_or_else(|err| panic!("cannot run {master:?}: {err}"));
        let handshake = start.elapsed();
        if !status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("ssh ControlMaster to {}: {status}: {log}", host.alias());
        }
        times[1].push(handshake);

        let mut over = ssh(&["-o", "ControlMaster=no"], &socket);
        over.arg("true");
        let (command_time, output) = time_command(over, "ssh true over the ControlMaster");
        check("ssh true over the ControlMaster", &output);
        times[2].push(command_time);

        let exit = ssh(&["-q", "-O", "exit"], &socket);
        let (_, output) = time_command(exit, "ssh -O exit");
        check("ssh -O exit", &output);
        wait_quiet(std::slice::from_ref(host));
        println!(
            "ssh, run {run}: host true {}, handshake alone {}, true over the ControlMaster {}",
            ms(elapsed),
            ms(handshake),
            ms(command_time)
        );
    }
    let [whole, handshake, over] = times;
    [
        Figures::of(labels[0], whole),
        Figures::of(labels[1], handshake),
        Figures::of(labels[2], over),
    ]
}

// ---- `--fanout`: what issue 7 measures (see the crate docs) ----

/// GNU parallel, from the Debian package.
const PARALLEL: &str = "/usr/bin/parallel";

/// Waits until the master exits, keeping its lines; returns the time of
/// its exit since `since`, and its status.
fn wait_exit(master: &mut Master, since: Instant, within: Duration) -> (Duration, ExitStatus) {
    wait_exit_watching(master, since, within, |_| {})
}

/// [`wait_exit`], calling `on_line` with each line as it is read.
fn wait_exit_watching(
    master: &mut Master,
    since: Instant,
    within: Duration,
    mut on_line: impl FnMut(&str),
) -> (Duration, ExitStatus) {
    let deadline = since + within;
    loop {
        // Each line as it comes; the exit time is the waiter's (within
        // 10 ms of it, the loop notices).
        if let Ok(line) = master.lines_rx.recv_timeout(Duration::from_millis(10)) {
            on_line(&line);
            master.seen.push(line);
        }
        if let Ok(at) = master.exited_rx.try_recv() {
            let lines: Vec<String> = master.lines_rx.try_iter().collect();
            lines.iter().for_each(|line| on_line(line));
            master.seen.extend(lines);
            return match master.child.wait() {
                Ok(status) => (at.saturating_duration_since(since), status),
                Err(err) => master.fail(&format!("cannot wait for it: {err}")),
            };
        }
        if Instant::now() >= deadline {
            master.fail(&format!("still running after {within:?}"));
        }
    }
}

/// Reads the rest of an exited master's log (bounded).
fn drain_lines(master: &mut Master) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while master.next_line(deadline).is_some() {}
}

/// One run of a herd whose `expected` instances print `done <id>` and
/// exit: the time from the spawn of `taskherd run` to its exit, and to the
/// last `done` line. Checks the exit status (0) and that every id said done
/// exactly once.
fn time_completion(taskherd: &Path, config: &Path, expected: usize) -> CompletionTimes {
    time_completion_in(Command::new(taskherd), taskherd, config, expected)
}

/// [`time_completion`] with `command` (see [`Master::spawn_in`]).
fn time_completion_in(
    command: Command,
    taskherd: &Path,
    config: &Path,
    expected: usize,
) -> CompletionTimes {
    let start = Instant::now();
    let mut master = Master::spawn_in(command, taskherd, config);
    let (mut connected, mut last_done) = (Duration::ZERO, Duration::ZERO);
    let (elapsed, status) = wait_exit_watching(&mut master, start, START_WITHIN, |line| {
        if line.contains("] done ") {
            last_done = start.elapsed();
        }
        if line.contains(CONNECTED_LINE) {
            connected = start.elapsed();
        }
    });
    drain_lines(&mut master);
    if !status.success() {
        master.fail(&format!("exited with {status}"));
    }
    let mut ids: Vec<u32> = master
        .seen
        .iter()
        .filter_map(|line| line.split_once("] done "))
        .filter_map(|(_, id)| id.trim().parse().ok())
        .collect();
    ids.sort_unstable();
    let want: Vec<u32> = (1..=expected as u32).collect();
    if ids != want {
        master.fail(&format!(
            "`done <id>` lines for ids {ids:?}, expected each of 1..={expected} once"
        ));
    }
    CompletionTimes {
        exit: elapsed,
        connected,
        last_line: last_done,
    }
}

/// Times of one run to completion, from the spawn of `taskherd run`.
struct CompletionTimes {
    /// The master exited.
    exit: Duration,
    /// The last agent connected.
    connected: Duration,
    /// The last instance's line was read.
    last_line: Duration,
}

/// One `parallel -S` run of `echo done <n>` for n in 1..=hosts × per_host,
/// `per_host` job slots on each host (one ssh per job); checks every line.
fn time_parallel(config: &Path, hosts: &[String], per_host: usize) -> Duration {
    let total = hosts.len() * per_host;
    let logins: Vec<String> = hosts.iter().map(|h| format!("{per_host}/{h}")).collect();
    let mut command = Command::new(PARALLEL);
    command
        .arg("--will-cite")
        .arg("--ssh")
        .arg(format!("ssh -F {}", config.display()))
        .arg("-S")
        .arg(logins.join(","))
        .arg("--tag")
        .args(["echo", "done", ":::"])
        .args((1..=total).map(|n| n.to_string()));
    let (elapsed, output) = time_command(command, "parallel");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut seen: Vec<usize> = stdout
        .lines()
        .filter_map(|line| {
            let (tag, rest) = line.split_once('\t')?;
            let n: usize = tag.parse().ok()?;
            (rest == format!("done {n}")).then_some(n)
        })
        .collect();
    seen.sort_unstable();
    if !output.status.success() || seen != (1..=total).collect::<Vec<_>>() {
        panic!(
            "parallel -S ({}): {} of {total} jobs said done\n--- stdout:\n{stdout}\n--- stderr:\n{}",
            output.status,
            seen.len(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    elapsed
}

/// One stop of a herd of `expected` instances that honour Stop: starts it,
/// waits until every instance printed `ready_line`, then the time from
/// SIGTERM to the master's exit (which must be 0).
fn time_remote_stop(taskherd: &Path, config: &Path, expected: usize, ready_line: &str) -> Duration {
    let start = Instant::now();
    let mut master = Master::spawn(taskherd, config);
    let mut ready = 0;
    while ready < expected {
        let Some(line) = master.next_line(start + START_WITHIN) else {
            master.fail(&format!(
                "{ready} of {expected} instances ready within {START_WITHIN:?}"
            ));
        };
        if line.contains(ready_line) {
            ready += 1;
        }
    }
    let pid = master.child.id() as libc::pid_t;
    let sent = Instant::now();
    // SAFETY: plain kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (elapsed, status) = wait_exit(&mut master, sent, STOP_WITHIN);
    if !status.success() {
        drain_lines(&mut master);
        master.fail(&format!("exited with {status} after SIGTERM"));
    }
    elapsed
}

/// Prints the figures of one measurement for `scripts/bench.sh`.
fn result_line(key: &str, figures: &Figures) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "RESULT {key} {:.1} {:.1} {:.1} {}",
        ms(figures.median),
        ms(figures.min),
        ms(figures.max),
        figures.runs
    );
}

/// The `--fanout` measurements, `runs` runs each, tools interleaved.
fn fanout(
    dir: &Path,
    taskherd: &Path,
    world: &SshWorld,
    hosts: &[SshHost],
    pdsh_config: &Path,
    aliases: &[Vec<String>],
    runs: usize,
) {
    let program = Program::one_line();
    let mut results = Vec::new();
    for (host_count, per_host) in [(2, 4), (8, 8)] {
        let of = &hosts[..host_count];
        let config = write_herd_config(dir, taskherd, &world.ssh_config(), of, per_host, &program);
        let targets: Vec<String> = aliases[..host_count]
            .iter()
            .flat_map(|of_host| of_host[..per_host].iter().cloned())
            .collect();
        let firsts: Vec<String> = aliases[..host_count]
            .iter()
            .map(|of_host| of_host[0].clone())
            .collect();
        let (mut ours, mut pdsh, mut parallel) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let times = time_completion(taskherd, &config, host_count * per_host);
            let t = times.exit;
            wait_quiet(of);
            let p = time_pdsh_echo(pdsh_config, &targets, "done");
            wait_quiet(of);
            let q = time_parallel(pdsh_config, &firsts, per_host);
            wait_quiet(of);
            println!(
                "fan-out {host_count} × {per_host}, run {run}: taskherd {} (agents connected at {}, last line at {}), pdsh {}, parallel -S {}",
                ms(t),
                ms(times.connected),
                ms(times.last_line),
                ms(p),
                ms(q)
            );
            ours.push(t);
            pdsh.push(p);
            parallel.push(q);
        }
        let key = format!("fanout_{host_count}x{per_host}");
        results.push((format!("{key}_taskherd"), Figures::of("taskherd", ours)));
        results.push((format!("{key}_pdsh"), Figures::of("pdsh", pdsh)));
        results.push((format!("{key}_parallel"), Figures::of("parallel", parallel)));
    }

    // The floor of 8 × 8: one ssh per host, all at once.
    let firsts: Vec<String> = aliases.iter().map(|of_host| of_host[0].clone()).collect();
    let mut floor = Vec::new();
    for run in 1..=runs {
        let t = time_pdsh_echo(pdsh_config, &firsts, "done");
        wait_quiet(hosts);
        println!(
            "pdsh {} × 1 (one ssh per host), run {run}: {}",
            hosts.len(),
            ms(t)
        );
        floor.push(t);
    }
    results.push((
        format!("fanout_{}x1_pdsh", hosts.len()),
        Figures::of("floor", floor),
    ));

    // Output of ad hoc commands: 2 hosts each printing OUTPUT_LINES
    // lines, `taskherd exec` against pdsh, both tagging `host: line`.
    let pair: Vec<String> = aliases[..2]
        .iter()
        .map(|of_host| of_host[0].clone())
        .collect();
    let (mut ours, mut pdsh) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let t = time_exec_output(taskherd, world, &hosts[..2]);
        wait_quiet(&hosts[..2]);
        let p = time_pdsh_output(pdsh_config, &pair);
        wait_quiet(&hosts[..2]);
        println!(
            "exec output, 2 hosts × {OUTPUT_LINES} lines, run {run}: taskherd exec {}, pdsh {}",
            ms(t),
            ms(p)
        );
        ours.push(t);
        pdsh.push(p);
    }
    results.push(("exec_output_taskherd".into(), Figures::of("taskherd", ours)));
    results.push(("exec_output_pdsh".into(), Figures::of("pdsh", pdsh)));

    let worker = taskherd
        .parent()
        .expect("invariant: the binary is in a directory")
        .join("examples")
        .join("worker");
    assert!(
        worker.exists(),
        "{} is missing (build it with `cargo build --release --example worker`)",
        worker.display()
    );
    let program = Program::worker(&worker);
    let config = write_herd_config(dir, taskherd, &world.ssh_config(), &hosts[..2], 4, &program);
    let mut stops = Vec::new();
    for run in 1..=runs {
        let t = time_remote_stop(taskherd, &config, 8, program.ready_line);
        wait_quiet(&hosts[..2]);
        println!("stop 2 × 4 worker, run {run}: SIGTERM to exit {}", ms(t));
        stops.push(t);
    }
    results.push(("stop_remote_2x4".to_string(), Figures::of("stop", stops)));

    for (key, figures) in &results {
        result_line(key, figures);
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("remote_start: a benchmark; run it with `cargo bench --bench remote_start`");
        return;
    }
    let runs = runs();
    let taskherd = PathBuf::from(env!("CARGO_BIN_EXE_taskherd"));
    let dir = tempfile::tempdir().expect("temp dir for the bench's configs");
    if std::env::args().any(|arg| arg == "--agent") {
        agent_cost::run(dir.path(), &taskherd, runs);
        return;
    }
    if std::env::args().any(|arg| arg == "--scale") {
        let costs_only = std::env::args().any(|arg| arg == "--costs");
        scale::run(dir.path(), &taskherd, runs, costs_only);
        return;
    }

    let mut world = SshWorld::new();
    let hosts: Vec<SshHost> = (0..HOSTS).map(|_| world.add_host()).collect();
    println!(
        "{HOSTS} sshd hosts on loopback ({} ... {}), {runs} runs per scenario",
        hosts[0].addr(),
        hosts[HOSTS - 1].addr()
    );
    let (pdsh_config, aliases) = write_pdsh_config(dir.path(), &world, &hosts, 8);
    if std::env::args().any(|arg| arg == "--fanout") {
        fanout(
            dir.path(),
            &taskherd,
            &world,
            &hosts,
            &pdsh_config,
            &aliases,
            runs,
        );
        drop(hosts);
        drop(world);
        return;
    }
    let shell = Program::shell();

    let mut table = Vec::new();
    let (small, small_connected) =
        herd_scenario(dir.path(), &taskherd, &world, &hosts[..2], 4, &shell, runs);
    let small_pdsh = pdsh_scenario(&pdsh_config, &aliases, &hosts[..2], 4, runs);
    let (large, large_connected) =
        herd_scenario(dir.path(), &taskherd, &world, &hosts, 8, &shell, runs);
    let large_pdsh = pdsh_scenario(&pdsh_config, &aliases, &hosts, 8, runs);
    // One ssh connection per host, all at once: the floor of taskherd 8 × 8.
    let floor_pdsh = pdsh_scenario(&pdsh_config, &aliases, &hosts, 1, runs);
    let (small_median, small_pdsh_median, large_median) =
        (small.median, small_pdsh.median, large.median);
    table.extend([
        small,
        small_connected,
        small_pdsh,
        large,
        large_connected,
        large_pdsh,
        floor_pdsh,
    ]);

    let worker = taskherd
        .parent()
        .expect("invariant: the binary is in a directory")
        .join("examples")
        .join("worker");
    if worker.exists() {
        let (worker_ready, worker_connected) = herd_scenario(
            dir.path(),
            &taskherd,
            &world,
            &hosts[..2],
            4,
            &Program::worker(&worker),
            1,
        );
        table.extend([worker_ready, worker_connected]);
    } else {
        println!(
            "skipping the worker scenario: {} is missing (build it with `cargo build --release --example worker`)",
            worker.display()
        );
    }
    table.extend(ssh_scenarios(dir.path(), &world, &hosts[0], runs));

    println!();
    println!(
        "{:<34} {:>4} {:>11} {:>11} {:>11}",
        "scenario", "runs", "min", "median", "max"
    );
    for row in &table {
        println!(
            "{:<34} {:>4} {:>11} {:>11} {:>11}",
            row.label,
            row.runs,
            ms(row.min),
            ms(row.median),
            ms(row.max)
        );
    }
    println!();
    println!(
        "target 2 × 4 ready faster than pdsh: {} (median {} vs {})",
        if small_median < small_pdsh_median {
            "met"
        } else {
            "NOT met"
        },
        ms(small_median),
        ms(small_pdsh_median)
    );
    println!(
        "target 8 × 8 ready under 1 s: {} (median {})",
        if large_median < Duration::from_secs(1) {
            "met"
        } else {
            "NOT met"
        },
        ms(large_median)
    );

    drop(hosts);
    drop(world);
}
