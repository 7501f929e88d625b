//! `--scale`: what the master costs as hosts are added, on up to
//! [`SCALE_HOSTS`] loopback sshd hosts (see the crate docs):
//!
//! - `ssh host true` with [`sshd::RC_LOGIN`] (bash, a .bashrc that sleeps
//!   0.2 s), with the plain `/bin/sh` login, and with that login and the
//!   classic key exchange: wall time (the rc file's cost is the first minus
//!   the second), the client's CPU and the host's;
//! - fan-out to completion of 2, 16 and 64 hosts × 4 instances that print
//!   one line and exit, with both logins, next to `pdsh -R ssh -f 64`
//!   running ONE remote command per host that prints the 4 lines (its best
//!   case: one handshake and one rc file per host, as taskherd; the rc
//!   file's log is checked for exactly one run per host and tool), each
//!   with the CPU it took here and on the hosts (taskherd, as pdsh, starts
//!   each ssh in a session of its own) and the CPU of the whole machine
//!   during the run (which also counts what leaves the tool's tree:
//!   the agents' watchdogs; before taskherd ran its ssh as its own child,
//!   ssh's daemonized ControlMasters);
//! - 64 hosts × 8 long-running instances with the plain login: from the
//!   spawn of `taskherd run` until all 512 have printed their first line
//!   (and where the CPU went until then), then SIGTERM to the master's
//!   exit, the hosts checked quiet; the same with the classic key
//!   exchange;
//! - the master's CPU time, peak RSS and file descriptors at 8, 16, 32 and
//!   64 hosts × 8 (when all are running, and over [`IDLE_WINDOW`] after),
//!   and the same of the ssh processes it keeps (one per host, a
//!   ControlMaster that runs the agent's command) and of those it reaped; the
//!   sshd, agents and instances run on this machine too but belong to the
//!   hosts, so they are not counted;
//! - the master's CPU per relayed line: 8 hosts × 4 instances printing
//!   20 000 lines of 60 bytes each at once, and 1 000 each 5 ms apart (a
//!   frame per line), every line checked in order, minus the same herd
//!   printing one line each.
//!
//! - first, before any sshd starts, the CPU of one host's side without
//!   ssh (`agent_cost.rs`, also alone with `--agent`).
//!
//! Besides `RESULT` lines (times) it prints `FIGURE <key> <value>` lines
//! (costs) for `scripts/bench.sh`. Every run's figures are printed as it
//! goes, with the load average: other work on the machine moves them.

use super::*;

/// sshd hosts started (the largest scenario uses them all).
const SCALE_HOSTS: usize = 64;

/// Host counts of the fan-out rows.
const FANOUT_HOSTS: [usize; 3] = [2, 16, 64];

/// Instances per host of the fan-out rows (pdsh prints as many lines).
const FANOUT_PER_HOST: usize = 4;

/// Host counts of the cost rows unless `BENCH_SCALE_COST_HOSTS` (e.g.
/// "8 64 128 192", at most 253) says otherwise.
const COST_HOSTS: [usize; 4] = [8, 16, 32, 64];

/// The host counts of the cost rows: `BENCH_SCALE_COST_HOSTS`, default
/// [`COST_HOSTS`].
fn cost_hosts() -> Vec<usize> {
    match std::env::var("BENCH_SCALE_COST_HOSTS") {
        Ok(text) => {
            let counts: Vec<usize> = text
                .split_whitespace()
                .map(|n| match n.parse() {
                    Ok(n) if (1..=253).contains(&n) => n,
                    _ => panic!("BENCH_SCALE_COST_HOSTS: {n:?} is not a host count from 1 to 253"),
                })
                .collect();
            assert!(
                counts.len() >= 2,
                "BENCH_SCALE_COST_HOSTS: at least two host counts, for a slope"
            );
            counts
        }
        Err(_) => COST_HOSTS.to_vec(),
    }
}

/// Long-running instances per host of the start and cost rows.
const START_PER_HOST: usize = 8;

/// Target of the 64 × 8 start.
const START_TARGET: Duration = Duration::from_secs(5);

/// How long the herd is left idle to measure what connected hosts cost.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Hosts of the per-line rows.
const LINES_HOSTS: usize = 8;

/// Instances per host of the per-line rows.
const LINES_PER_HOST: usize = 4;

/// Lines per instance of the per-line rows at [`Pace::Burst`].
const LINES_EACH: usize = 20_000;

/// One login of the remote sessions and the ssh_config that uses it.
#[derive(Clone)]
struct Login {
    /// Key part of the `RESULT` lines: `sh` or `rc`.
    key: &'static str,
    /// The user name.
    user: &'static str,
    /// The world's ssh_config with `User` set to [`Login::user`].
    ssh_config: PathBuf,
}

/// The classic key exchange, for [`login_config_with`]: OpenSSH's
/// default since 9.0, sntrup761x25519 (post-quantum), costs the client
/// several times the CPU.
const CLASSIC_KEX: &str = "KexAlgorithms curve25519-sha256";

/// A copy of the world's ssh_config whose hosts log in as `user`.
fn login_config(dir: &Path, world: &SshWorld, hosts: usize, user: &'static str) -> PathBuf {
    login_config_with(dir, world, hosts, user, "")
}

/// [`login_config`], with `option` (an ssh_config line) for every host.
fn login_config_with(
    dir: &Path,
    world: &SshWorld,
    hosts: usize,
    user: &'static str,
    option: &str,
) -> PathBuf {
    let text = std::fs::read_to_string(world.ssh_config())
        .unwrap_or_else(|err| panic!("read {}: {err}", world.ssh_config().display()));
    let from = format!("    User {}\n", sshd::login_user());
    assert_eq!(
        text.matches(&from).count(),
        hosts,
        "one `User` line per host in {}",
        world.ssh_config().display()
    );
    let (to, name) = if option.is_empty() {
        (format!("    User {user}\n"), format!("ssh_config_{user}"))
    } else {
        let name = option.split_whitespace().collect::<Vec<_>>().join("_");
        (
            format!("    User {user}\n    {option}\n"),
            format!("ssh_config_{user}_{name}"),
        )
    };
    let path = dir.join(name);
    std::fs::write(&path, text.replace(&from, &to))
        .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    path
}

/// The 1-minute load average, as /proc/loadavg has it.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

/// Whether the kernel schedules by session (`sched_autogroup_enabled`):
/// then CPU time is shared out per session first, and a process whose
/// children each run in a session of their own (pdsh's ssh) gets a share
/// per child against other work on the machine.
fn autogroup() -> String {
    std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .map(|text| if text.trim() == "1" { "on" } else { "off" }.to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// How many commands [`sshd::RC_LOGIN`]'s rc file has noted per host.
fn rc_counts(hosts: &[SshHost]) -> Vec<usize> {
    let log = std::fs::read_to_string(sshd::RC_LOGIN_LOG).unwrap_or_default();
    let mut per_marker: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        *per_marker.entry(line).or_default() += 1;
    }
    hosts
        .iter()
        .map(|host| per_marker.get(host.marker()).copied().unwrap_or(0))
        .collect()
}

/// Panics unless every host's rc file ran exactly once between `before`
/// and now.
fn check_one_rc_each(what: &str, hosts: &[SshHost], before: &[usize]) {
    let after = rc_counts(hosts);
    let ran: Vec<usize> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    if ran.iter().any(|&n| n != 1) {
        panic!("{what}: the rc file ran {ran:?} times on the hosts, expected once on each");
    }
}

/// What pdsh's one command per host runs for its `per_host` instances.
#[derive(Clone, Copy, PartialEq)]
enum PdshWork {
    /// `echo` builtins of the login shell, no process: pdsh's best case.
    Builtins,
    /// The instances taskherd runs, `sh -c 'echo done $TASKHERD_ID'`,
    /// all started at once (`&`, then `wait`): the same work.
    Programs,
}

/// One pdsh run of ONE command per host printing `done 1` .. `done
/// <per_host>`, as `login`; checks every host printed each line once.
fn time_pdsh_lines(login: &Login, aliases: &[String], per_host: usize, work: PdshWork) -> Duration {
    let ids = (1..=per_host)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new(PDSH);
    command
        .args([
            "-R",
            "ssh",
            "-f",
            &super::PDSH_FANOUT.to_string(),
            "-l",
            login.user,
            "-w",
        ])
        .arg(aliases.join(","))
        .arg(match work {
            PdshWork::Builtins => format!("for i in {ids}; do echo done $i; done"),
            PdshWork::Programs => format!(
                "for i in {ids}; do TASKHERD_ID=$i sh -c 'echo done $TASKHERD_ID' & done; wait"
            ),
        })
        .env(
            "PDSH_SSH_ARGS",
            format!("-F {} -2 -a -x -l%u %h", login.ssh_config.display()),
        )
        .env_remove("PDSH_SSH_ARGS_APPEND")
        .env_remove("PDSH_RCMD_TYPE");
    let (elapsed, output) = time_command(command, "pdsh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut seen: HashMap<&str, Vec<usize>> = HashMap::new();
    for line in stdout.lines() {
        if let Some((alias, rest)) = line.split_once(": done ") {
            if let Ok(n) = rest.trim().parse() {
                seen.entry(alias).or_default().push(n);
            }
        }
    }
    let want: Vec<usize> = (1..=per_host).collect();
    let complete = aliases.iter().all(|alias| {
        seen.get_mut(alias.as_str()).is_some_and(|got| {
            got.sort_unstable();
            *got == want
        })
    });
    if !output.status.success() || !complete || seen.len() != aliases.len() {
        panic!(
            "pdsh ({}): not every host printed done 1..={per_host} once\n--- stdout:\n{stdout}\n--- stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    elapsed
}

/// CPU time of this process's children that it has reaped (and of their
/// descendants that they reaped): a tool's own processes once it has ended.
pub(crate) fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data; all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time the whole machine has spent busy (every CPU, every process
/// and the kernel: /proc/stat's first line less idle, iowait and steal,
/// the time the hypervisor gave other guests). Over a
/// run it counts what the per-process figures miss: processes that left
/// the tool's tree (an agent's watchdog; ssh's daemonized ControlMasters
/// before taskherd ran its ssh as its child)
/// and the kernel's work for them; the bench itself adds a thread that
/// wakes every 10 ms.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in
    // user): the first three and irq, softirq.
    let busy: u64 = ticks
        .iter()
        .take(7)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(busy * 1000 / hz)
}

/// CPU time spent on `hosts` so far: each sshd listener's own and that of
/// its descendants, reaped (sessions, shells, agents, instances that ended)
/// or still running. One pass over /proc.
fn hosts_cpu(hosts: &[SshHost]) -> Duration {
    // pid -> (ppid, utime + stime + cutime + cstime)
    let mut table: HashMap<u32, (u32, Duration)> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse().ok())
        else {
            continue;
        };
        let cpu = cpu_times_of(&stat)
            .map(|t| t.iter().sum())
            .unwrap_or_default();
        table.insert(pid, (ppid, cpu));
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _)) in &table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut total = Duration::ZERO;
    for listener in hosts.iter().filter_map(SshHost::pid) {
        let mut stack = vec![listener];
        while let Some(pid) = stack.pop() {
            total += table.get(&pid).map(|&(_, cpu)| cpu).unwrap_or_default();
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    total
}

/// One way of running `ssh host true`.
struct SshVariant {
    /// Key part of the `RESULT` and `FIGURE` lines.
    key: String,
    login: Login,
    /// Options before the host.
    options: Vec<&'static str>,
}

/// `ssh host true` with each login, and with the plain login and the
/// classic key exchange (curve25519-sha256; OpenSSH's default since 9.0,
/// sntrup761x25519, costs the client far more CPU), interleaved, `runs`
/// times each: wall time, the client's CPU and the host's (sshd and the
/// login shell).
fn ssh_rows(logins: &[Login], host: &SshHost, runs: usize, results: &mut Vec<(String, Figures)>) {
    let one = std::slice::from_ref(host);
    let mut variants: Vec<SshVariant> = logins
        .iter()
        .map(|login| SshVariant {
            key: login.key.to_string(),
            login: login.clone(),
            options: Vec::new(),
        })
        .collect();
    variants.push(SshVariant {
        key: format!("{}_curve25519", logins[0].key),
        login: logins[0].clone(),
        options: vec!["-o", "KexAlgorithms=curve25519-sha256"],
    });
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    let mut cpus: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); variants.len()];
    for run in 1..=runs {
        let mut said = Vec::new();
        for (i, variant) in variants.iter().enumerate() {
            let before = rc_counts(one);
            let (client_before, host_before) = (children_cpu(), hosts_cpu(one));
            let mut ssh = Command::new("ssh");
            ssh.arg("-F")
                .arg(&variant.login.ssh_config)
                .args(["-o", "ControlMaster=no"])
                .args(&variant.options)
                .args([host.alias(), "true"]);
            let (elapsed, output) = time_command(ssh, "ssh host true");
            if !output.status.success() {
                panic!(
                    "ssh {} true as {}: {}: {}",
                    host.alias(),
                    variant.login.user,
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            wait_quiet(one);
            if variant.login.user == sshd::RC_LOGIN {
                check_one_rc_each("ssh host true", one, &before);
            }
            let client = children_cpu().saturating_sub(client_before);
            let on_host = hosts_cpu(one).saturating_sub(host_before);
            said.push(format!(
                "{} {} (ssh CPU {}, host CPU {})",
                variant.key,
                ms(elapsed),
                ms(client),
                ms(on_host)
            ));
            walls[i].push(elapsed);
            cpus[i].0.push(client.as_secs_f64() * 1000.0);
            cpus[i].1.push(on_host.as_secs_f64() * 1000.0);
        }
        println!("ssh host true, run {run}: {}", said.join(", "));
    }
    for ((variant, walls), (client, on_host)) in variants.iter().zip(walls).zip(cpus) {
        let label = format!("ssh host true ({})", variant.key);
        results.push((
            format!("scale_ssh_true_{}", variant.key),
            Figures::of(label, walls),
        ));
        figure_line(
            &format!("scale_ssh_true_{}_client_cpu_ms", variant.key),
            median_of(client),
        );
        figure_line(
            &format!("scale_ssh_true_{}_host_cpu_ms", variant.key),
            median_of(on_host),
        );
    }
}

/// Fan-out to completion with `login`: taskherd `n` × 4 against pdsh with
/// one command per host, for each `n` of [`FANOUT_HOSTS`].
fn fanout_rows(
    dir: &Path,
    taskherd: &Path,
    hosts: &[SshHost],
    login: &Login,
    runs: usize,
    results: &mut Vec<(String, Figures)>,
) {
    #[derive(Clone, Copy, PartialEq)]
    enum Tool {
        Taskherd,
        Pdsh(PdshWork),
    }
    let program = Program::one_line();
    let counts_rc = login.user == sshd::RC_LOGIN;
    let tools: Vec<Tool> = [
        (Tool::Taskherd, "taskherd"),
        (Tool::Pdsh(PdshWork::Builtins), "pdsh"),
        (Tool::Pdsh(PdshWork::Programs), "pdsh_programs"),
    ]
    .into_iter()
    .filter(|(_, name)| listed_or_all("BENCH_SCALE_TOOLS", name))
    .map(|(tool, _)| tool)
    .collect();
    for n in FANOUT_HOSTS
        .into_iter()
        .filter(|n| listed_or_all("BENCH_SCALE_FANOUT", &n.to_string()))
    {
        let of = &hosts[..n];
        let config = write_herd_config(
            dir,
            taskherd,
            &login.ssh_config,
            of,
            FANOUT_PER_HOST,
            &program,
        );
        let aliases: Vec<String> = of.iter().map(|h| h.alias().to_string()).collect();
        let mut times: HashMap<&str, Vec<Duration>> = HashMap::new();
        // (ms of CPU of the tool's processes, ms of CPU on the hosts, ms of
        // CPU of the whole machine during the run).
        let mut cpu: HashMap<&str, Vec<(f64, f64, f64)>> = HashMap::new();
        for run in 1..=runs {
            // Rotated, so no tool always runs on a machine another just
            // warmed (or left busy).
            let mut said = Vec::new();
            let at_load = load();
            for i in 0..tools.len() {
                let tool = tools[(i + run - 1) % tools.len()];
                let before = rc_counts(of);
                let (client_before, hosts_before) = (children_cpu(), hosts_cpu(of));
                let machine_before = machine_busy();
                let (key, elapsed) = match tool {
                    Tool::Taskherd => {
                        let t = time_completion_in(
                            Command::new(taskherd),
                            taskherd,
                            &config,
                            n * FANOUT_PER_HOST,
                        );
                        let key = "taskherd";
                        said.push(format!(
                            "{key} {} (agents connected at {}, last line at {})",
                            ms(t.exit),
                            ms(t.connected),
                            ms(t.last_line)
                        ));
                        (key, t.exit)
                    }
                    Tool::Pdsh(work) => {
                        let t = time_pdsh_lines(login, &aliases, FANOUT_PER_HOST, work);
                        let (key, what) = match work {
                            PdshWork::Builtins => ("pdsh", "echo builtins"),
                            PdshWork::Programs => ("pdsh_programs", "4 sh -c like taskherd's"),
                        };
                        said.push(format!("{key} (one command per host, {what}) {}", ms(t)));
                        (key, t)
                    }
                };
                // After the hosts are quiet: what a tool leaves running
                // (ssh closing, watchdogs) is its work too.
                wait_quiet(of);
                let machine = machine_busy().saturating_sub(machine_before);
                if counts_rc {
                    check_one_rc_each(key, of, &before);
                }
                // Everything has ended and been reaped: the tool's own
                // processes, its ssh included, and the hosts' side.
                let client = children_cpu().saturating_sub(client_before);
                let on_hosts = hosts_cpu(of).saturating_sub(hosts_before);
                if let Some(last) = said.last_mut() {
                    last.push_str(&format!(
                        " [CPU {} here, {} on the hosts, {} machine]",
                        ms(client),
                        ms(on_hosts),
                        ms(machine)
                    ));
                }
                cpu.entry(key).or_default().push((
                    client.as_secs_f64() * 1000.0,
                    on_hosts.as_secs_f64() * 1000.0,
                    machine.as_secs_f64() * 1000.0,
                ));
                times.entry(key).or_default().push(elapsed);
            }
            println!(
                "fan-out {n} × {FANOUT_PER_HOST} as {}, run {run} (load {at_load}): {}",
                login.user,
                said.join(", ")
            );
        }
        let prefix = format!("scale_fanout_{}_{n}x{FANOUT_PER_HOST}", login.key);
        let mut keys: Vec<&str> = times.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let figures = Figures::of(key, times.remove(key).unwrap_or_default());
            results.push((format!("{prefix}_{key}"), figures));
            let runs = cpu.remove(key).unwrap_or_default();
            let of_runs = |pick: fn(&(f64, f64, f64)) -> f64| runs.iter().map(pick).collect();
            figure_line(
                &format!("{prefix}_{key}_client_cpu_ms"),
                median_of(of_runs(|r| r.0)),
            );
            figure_line(
                &format!("{prefix}_{key}_hosts_cpu_ms"),
                median_of(of_runs(|r| r.1)),
            );
            figure_line(
                &format!("{prefix}_{key}_machine_cpu_ms"),
                median_of(of_runs(|r| r.2)),
            );
        }
    }
}

/// What one process has used, from /proc.
#[derive(Clone, Copy, Default)]
struct Usage {
    /// utime + stime.
    cpu: Duration,
    /// cutime + cstime: its waited-for children's.
    children_cpu: Duration,
    /// VmHWM, KiB.
    hwm_kib: u64,
    /// VmRSS, KiB.
    rss_kib: u64,
    /// Open file descriptors.
    fds: usize,
    /// Threads.
    threads: u64,
}

/// Clock ticks per second of /proc's times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime, stime, cutime, cstime of `pid`, or `None` once it is gone.
fn cpu_times(pid: u32) -> Option<[Duration; 4]> {
    cpu_times_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime, stime, cutime, cstime of a /proc/<pid>/stat text.
fn cpu_times_of(stat: &str) -> Option<[Duration; 4]> {
    // "pid (comm) state ppid ...": fields 14-17 are the 12th-15th after ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<Duration> {
        let n: u64 = fields.get(i)?.parse().ok()?;
        Some(Duration::from_secs_f64(n as f64 / clock_ticks()))
    };
    Some([tick(11)?, tick(12)?, tick(13)?, tick(14)?])
}

/// A `Name:   <n> kB` line of /proc/<pid>/status (or smaps_rollup).
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The master's usage now.
fn usage_of(pid: u32) -> Usage {
    let [utime, stime, cutime, cstime] =
        cpu_times(pid).unwrap_or_else(|| panic!("the master ({pid}) is gone"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    Usage {
        cpu: utime + stime,
        children_cpu: cutime + cstime,
        hwm_kib: kib_field(&status, "VmHWM:"),
        rss_kib: kib_field(&status, "VmRSS:"),
        fds,
        threads: kib_field(&status, "Threads:"),
    }
}

/// What the live ssh processes of one master use: one per host, each a
/// ControlMaster running the agent's command (their arguments name its control directory,
/// `$TMPDIR/taskherd-<pid>/`).
#[derive(Clone, Copy, Default)]
struct SshUsage {
    processes: usize,
    /// utime + stime, summed.
    cpu: Duration,
    /// VmRSS, summed, KiB.
    rss_kib: u64,
    /// Proportional set size (shared pages divided among their users),
    /// summed, KiB: what they add to the machine's memory.
    pss_kib: u64,
    /// Open file descriptors, summed.
    fds: usize,
}

fn ssh_usage(master_pid: u32) -> SshUsage {
    let needle = format!("/taskherd-{master_pid}/");
    let mut usage = SshUsage::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() != "ssh" {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let ours = cmdline
            .split(|&b| b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(&needle));
        if !ours {
            continue;
        }
        let Some([utime, stime, _, _]) = cpu_times(pid) else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        usage.processes += 1;
        usage.cpu += utime + stime;
        usage.rss_kib += kib_field(&status, "VmRSS:");
        usage.pss_kib += kib_field(&rollup, "Pss:");
        usage.fds += std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| entries.count())
            .unwrap_or(0);
    }
    usage
}

/// One herd's costs, sampled while it runs.
struct Costs {
    /// All instances running, since the spawn of `taskherd run`.
    ready: Duration,
    /// Master and ssh usage then.
    at_ready: (Usage, SshUsage),
    /// The same [`IDLE_WINDOW`] later.
    after_idle: (Usage, SshUsage),
}

/// Starts `n` hosts × [`START_PER_HOST`], samples at ready and after the
/// idle window, stops, waits for the hosts to go quiet.
fn measure_costs(dir: &Path, taskherd: &Path, hosts: &[SshHost], login: &Login) -> Costs {
    let program = Program::shell();
    let config = write_herd_config(
        dir,
        taskherd,
        &login.ssh_config,
        hosts,
        START_PER_HOST,
        &program,
    );
    let (master, times) = start_until_ready(
        taskherd,
        &config,
        hosts.len(),
        hosts.len() * START_PER_HOST,
        program.ready_line,
    );
    let pid = master.child.id();
    let at_ready = (usage_of(pid), ssh_usage(pid));
    std::thread::sleep(IDLE_WINDOW);
    let after_idle = (usage_of(pid), ssh_usage(pid));
    master.stop();
    wait_quiet(hosts);
    Costs {
        ready: times.ready,
        at_ready,
        after_idle,
    }
}

/// The median of some numbers.
fn median_of(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "invariant: at least one run");
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Least-squares slope and intercept of `y` over `x`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    let slope = if den > 0.0 { num / den } else { 0.0 };
    (slope, my - slope * mx)
}

/// Prints a scalar for `scripts/bench.sh`.
fn figure_line(key: &str, value: f64) {
    println!("FIGURE {key} {value:.3}");
}

/// The cost rows: each of `counts` hosts × `runs`, medians per host count,
/// and their slopes per host.
fn cost_rows(
    dir: &Path,
    taskherd: &Path,
    hosts: &[SshHost],
    login: &Login,
    counts: &[usize],
    runs: usize,
) {
    // Per host count, per quantity, one value per run.
    let quantities = [
        "ready_ms",
        "master_cpu_ms",
        "reaped_cpu_ms",
        "ssh_cpu_ms",
        "master_idle_cpu_pct",
        "ssh_idle_cpu_pct",
        "master_hwm_kib",
        "master_rss_kib",
        "master_fds",
        "master_threads",
        "ssh_processes",
        "ssh_rss_kib",
        "ssh_pss_kib",
        "ssh_fds",
    ];
    let mut values: HashMap<(usize, &str), Vec<f64>> = HashMap::new();
    for run in 1..=runs {
        for &n in counts {
            let costs = measure_costs(dir, taskherd, &hosts[..n], login);
            let ((master, ssh), (master_idle, ssh_idle)) = (costs.at_ready, costs.after_idle);
            let window = IDLE_WINDOW.as_secs_f64();
            let pct =
                |a: Duration, b: Duration| (b.saturating_sub(a)).as_secs_f64() / window * 100.0;
            let row = [
                costs.ready.as_secs_f64() * 1000.0,
                master.cpu.as_secs_f64() * 1000.0,
                master.children_cpu.as_secs_f64() * 1000.0,
                ssh.cpu.as_secs_f64() * 1000.0,
                pct(master.cpu, master_idle.cpu),
                pct(ssh.cpu, ssh_idle.cpu),
                master_idle.hwm_kib as f64,
                master_idle.rss_kib as f64,
                master_idle.fds as f64,
                master_idle.threads as f64,
                ssh_idle.processes as f64,
                ssh_idle.rss_kib as f64,
                ssh_idle.pss_kib as f64,
                ssh_idle.fds as f64,
            ];
            for (quantity, value) in quantities.iter().zip(row) {
                values.entry((n, quantity)).or_default().push(value);
            }
            println!(
                "cost {n} × {START_PER_HOST}, run {run}: all running at {}; master CPU {:.0} ms (+ reaped children {:.0} ms), \
                 live ssh {} processes {:.0} ms; idle {window:.0} s: master {:.2} % of a core, ssh {:.2} %; \
                 master VmHWM {} KiB, VmRSS {} KiB, {} fds, {} threads; ssh RSS {} KiB, PSS {} KiB, {} fds",
                ms(costs.ready),
                row[1],
                row[2],
                ssh.processes,
                row[3],
                row[4],
                row[5],
                master_idle.hwm_kib,
                master_idle.rss_kib,
                master_idle.fds,
                master_idle.threads,
                ssh_idle.rss_kib,
                ssh_idle.pss_kib,
                ssh_idle.fds
            );
        }
    }
    println!();
    println!(
        "{:<22} {}",
        "median per host count",
        counts
            .iter()
            .map(|n| format!("{n:>10}"))
            .collect::<String>()
    );
    for quantity in quantities {
        let medians: Vec<f64> = counts
            .iter()
            .map(|&n| median_of(values[&(n, quantity)].clone()))
            .collect();
        println!(
            "{quantity:<22} {}",
            medians
                .iter()
                .map(|v| format!("{v:>10.1}"))
                .collect::<String>()
        );
        let points: Vec<(f64, f64)> = counts
            .iter()
            .zip(&medians)
            .map(|(&n, &v)| (n as f64, v))
            .collect();
        for (&n, &v) in counts.iter().zip(&medians) {
            figure_line(&format!("scale_cost_{n}_{quantity}"), v);
        }
        let (slope, intercept) = fit(&points);
        figure_line(&format!("scale_cost_per_host_{quantity}"), slope);
        figure_line(&format!("scale_cost_base_{quantity}"), intercept);
    }
}

/// How the instances of the per-line rows print their lines: numbers 1 to
/// n, zero-padded to 60 digits, then quiet.
#[derive(Clone, Copy)]
enum Pace {
    /// As fast as they can (`seq`): the agent relays many lines per frame.
    Burst,
    /// One line every [`TRICKLE_GAP_MS`] (bash's `read -t` on a pipe that
    /// never speaks, no process per line): a frame per line, the worst
    /// case per line.
    Trickle,
}

/// Gap between two lines of [`Pace::Trickle`].
const TRICKLE_GAP_MS: u32 = 5;

/// Lines per instance of [`Pace::Trickle`].
const TRICKLE_EACH: usize = 1_000;

/// The per-line program: `lines` lines at `pace`, then `sleep 600`.
fn lines_program(lines: usize, pace: Pace) -> Program {
    let (command, script) = match pace {
        Pace::Burst => (
            "sh",
            format!("seq -f %060g 1 {lines}; exec sleep 600"),
        ),
        Pace::Trickle => (
            "bash",
            format!(
                "exec 3<> <(:); i=0; while [ $i -lt {lines} ]; do i=$((i+1)); printf '%060d\\n' $i; \
                 read -t 0.{TRICKLE_GAP_MS:03} -u 3; done; exec 3<&-; exec sleep 600"
            ),
        ),
    };
    Program {
        name: "lines",
        group_keys: format!(
            "command = \"{command}\"\nargs = [\"-c\", {}]\n",
            toml_string(&script)
        ),
        ready_line: "",
    }
}

/// What one herd of the per-line rows used.
struct Relayed {
    /// The master's own CPU (utime + stime).
    master_cpu: Duration,
    /// Its ssh processes' (live ones, and those it reaped).
    ssh_cpu: Duration,
    /// From the spawn until the last line was read.
    elapsed: Duration,
}

/// One herd of `hosts` × [`LINES_PER_HOST`] printing `each` lines at
/// `pace`: waits until every line has been relayed (each instance's checked
/// in order) and, with `hold`, until that long after the spawn; then the
/// master's and its ssh processes' CPU, and a clean stop.
fn relay_lines(
    dir: &Path,
    taskherd: &Path,
    hosts: &[SshHost],
    login: &Login,
    each: usize,
    pace: Pace,
    hold: Option<Duration>,
) -> Relayed {
    let program = lines_program(each, pace);
    let config = write_herd_config(
        dir,
        taskherd,
        &login.ssh_config,
        hosts,
        LINES_PER_HOST,
        &program,
    );
    let instances = hosts.len() * LINES_PER_HOST;
    let start = Instant::now();
    let mut master = Master::spawn(taskherd, &config);
    let deadline = start + START_WITHIN;
    // Lines relayed so far per instance id.
    let mut relayed: HashMap<u32, usize> = HashMap::new();
    let mut total = 0;
    while total < instances * each {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = master.lines_rx.recv_timeout(wait) else {
            master.fail(&format!(
                "{total} of {} lines relayed within {START_WITHIN:?}",
                instances * each
            ));
        };
        // "... [bench] [host] [<command>/<id>/<group id>] <60 digits>"
        let Some((_, tail)) = line
            .split_once("] [sh/")
            .or_else(|| line.split_once("] [bash/"))
        else {
            master.seen.push(line);
            continue;
        };
        let parsed = tail.split_once('/').and_then(|(id, rest)| {
            let id: u32 = id.parse().ok()?;
            let (_, payload) = rest.split_once("] ")?;
            let n: usize = payload.trim().parse().ok()?;
            Some((id, n, payload.len()))
        });
        let Some((id, n, len)) = parsed else {
            master.seen.push(line);
            continue;
        };
        let count = relayed.entry(id).or_default();
        if n != *count + 1 || len != 60 {
            master.fail(&format!(
                "instance {id}: line {n} (of {len} bytes) after {count}: {line}"
            ));
        }
        *count += 1;
        total += 1;
    }
    let elapsed = start.elapsed();
    if let Some(hold) = hold {
        std::thread::sleep(hold.saturating_sub(start.elapsed()));
    }
    let pid = master.child.id();
    let usage = usage_of(pid);
    let ssh = ssh_usage(pid);
    master.stop();
    wait_quiet(hosts);
    Relayed {
        master_cpu: usage.cpu,
        ssh_cpu: ssh.cpu + usage.children_cpu,
        elapsed,
    }
}

/// The per-line rows, `runs` times: [`LINES_EACH`] lines each in bursts and
/// [`TRICKLE_EACH`] one by one, each against the same herd printing one
/// line each (held as long, for the trickle: heartbeats cost too).
fn line_rows(dir: &Path, taskherd: &Path, hosts: &[SshHost], login: &Login, runs: usize) {
    let of = &hosts[..LINES_HOSTS];
    let mut figures: HashMap<String, Vec<f64>> = HashMap::new();
    for run in 1..=runs {
        for (pace, key, each) in [
            (Pace::Burst, "burst", LINES_EACH),
            (Pace::Trickle, "trickle", TRICKLE_EACH),
        ] {
            let at_load = load();
            let lines = (LINES_HOSTS * LINES_PER_HOST * (each - 1)) as f64;
            let full = relay_lines(dir, taskherd, of, login, each, pace, None);
            let hold = match pace {
                Pace::Burst => None,
                Pace::Trickle => Some(full.elapsed),
            };
            let base = relay_lines(dir, taskherd, of, login, 1, pace, hold);
            let master_us = full
                .master_cpu
                .saturating_sub(base.master_cpu)
                .as_secs_f64()
                * 1e6
                / lines;
            let ssh_us = full.ssh_cpu.saturating_sub(base.ssh_cpu).as_secs_f64() * 1e6 / lines;
            let rate = lines / full.elapsed.as_secs_f64();
            println!(
                "relay {LINES_HOSTS} × {LINES_PER_HOST} × {each} lines ({key}), run {run} (load {at_load}): master CPU {} \
                 (one line each: {}), {master_us:.2} µs per line; its ssh processes {ssh_us:.2} µs per line; \
                 all relayed at {} ({rate:.0} lines/s from spawn)",
                ms(full.master_cpu),
                ms(base.master_cpu),
                ms(full.elapsed)
            );
            for (quantity, value) in [
                ("master_cpu_us", master_us),
                ("ssh_cpu_us", ssh_us),
                ("rate", rate),
            ] {
                figures
                    .entry(format!("scale_line_{key}_{quantity}"))
                    .or_default()
                    .push(value);
            }
        }
    }
    let mut keys: Vec<&String> = figures.keys().collect();
    keys.sort_unstable();
    for key in keys {
        figure_line(key, median_of(figures[key].clone()));
    }
}

/// One way of starting the 64 × 8 herd.
struct StartVariant {
    /// Suffix of its keys: "" for taskherd as a user runs it.
    key: &'static str,
    /// What the printed figures call it.
    label: &'static str,
    /// Its herd config.
    config: PathBuf,
}

/// 64 × 8 long-running instances: from the spawn until all run (and where
/// the CPU went until then), then SIGTERM until the master's exit; also,
/// to show what the time goes to, with the classic key exchange in the
/// ssh_config.
fn start_rows(
    dir: &Path,
    taskherd: &Path,
    world: &SshWorld,
    hosts: &[SshHost],
    login: &Login,
    runs: usize,
) -> Vec<(String, Figures)> {
    let program = Program::shell();
    let config_of = |ssh_config: &Path| {
        write_herd_config(dir, taskherd, ssh_config, hosts, START_PER_HOST, &program)
    };
    let mut variants = vec![StartVariant {
        key: "",
        label: "taskherd",
        config: config_of(&login.ssh_config),
    }];
    let curve = login_config_with(dir, world, hosts.len(), login.user, CLASSIC_KEX);
    variants.push(StartVariant {
        key: "_curve25519",
        label: "KexAlgorithms curve25519-sha256",
        config: config_of(&curve),
    });
    let expected = hosts.len() * START_PER_HOST;
    let mut times: HashMap<String, Vec<Duration>> = HashMap::new();
    // ms of CPU until all ran, per variant: [master, its ssh, hosts].
    let mut cpu: HashMap<&str, Vec<[f64; 3]>> = HashMap::new();
    for run in 1..=runs {
        let at_load = load();
        let mut said = Vec::new();
        for i in 0..variants.len() {
            let variant = &variants[(i + run - 1) % variants.len()];
            let command = Command::new(taskherd);
            let hosts_before = hosts_cpu(hosts);
            let (master, started) = start_until_ready_in(
                command,
                taskherd,
                &variant.config,
                hosts.len(),
                expected,
                program.ready_line,
            );
            // Where the CPU went until all ran: the master, its ssh
            // processes (reaped ones: the handshakes), the hosts.
            let pid = master.child.id();
            let (usage, ssh) = (usage_of(pid), ssh_usage(pid));
            let on_hosts = hosts_cpu(hosts).saturating_sub(hosts_before);
            let sent = Instant::now();
            master.stop();
            let stop = sent.elapsed();
            wait_quiet(hosts);
            said.push(format!(
                "{}: all agents connected at {}, all {expected} running at {} [CPU until then: master {}, \
                 its ssh {}, hosts {}], SIGTERM to exit {}",
                variant.label,
                ms(started.connected),
                ms(started.ready),
                ms(usage.cpu),
                ms(usage.children_cpu + ssh.cpu),
                ms(on_hosts),
                ms(stop)
            ));
            cpu.entry(variant.key).or_default().push([
                usage.cpu.as_secs_f64() * 1000.0,
                (usage.children_cpu + ssh.cpu).as_secs_f64() * 1000.0,
                on_hosts.as_secs_f64() * 1000.0,
            ]);
            for (what, value) in [
                ("ready", started.ready),
                ("connected", started.connected),
                ("stop", stop),
            ] {
                times
                    .entry(format!("{what}{}", variant.key))
                    .or_default()
                    .push(value);
            }
        }
        println!(
            "start {} × {START_PER_HOST} as {}, run {run} (load {at_load}; target < {}): {}",
            hosts.len(),
            login.user,
            ms(START_TARGET),
            said.join("; ")
        );
    }
    let prefix = format!("scale_start_{}x{START_PER_HOST}", hosts.len());
    for variant in &variants {
        let samples = &cpu[variant.key];
        for (i, what) in ["master", "ssh", "hosts"].iter().enumerate() {
            let values = samples.iter().map(|sample| sample[i]).collect();
            figure_line(
                &format!("{prefix}_{what}_cpu_ms{}", variant.key),
                median_of(values),
            );
        }
    }
    let mut keys: Vec<String> = times.keys().cloned().collect();
    keys.sort_unstable();
    keys.into_iter()
        .map(|key| {
            let figures = Figures::of(key.clone(), times.remove(&key).unwrap_or_default());
            (format!("{prefix}_{key}"), figures)
        })
        .collect()
}

/// The `--scale` measurements, `runs` runs each; with `costs_only`
/// (`--costs`) only the cost rows (at `BENCH_SCALE_COST_HOSTS`, to check
/// the extrapolation further).
pub(super) fn run(dir: &Path, taskherd: &Path, runs: usize, costs_only: bool) {
    let counts = cost_hosts();
    let started = if costs_only {
        counts.iter().copied().max().unwrap_or(SCALE_HOSTS)
    } else {
        SCALE_HOSTS.max(counts.iter().copied().max().unwrap_or(0))
    };
    // Before any sshd starts: it reaps every child it has.
    if !costs_only && part_wanted("agent") {
        super::agent_cost::run(dir, taskherd, runs);
    }
    let mut world = SshWorld::new();
    let hosts: Vec<SshHost> = (0..started).map(|_| world.add_host()).collect();
    println!(
        "{started} sshd hosts on loopback ({} ... {}), {runs} runs per scenario; ulimit -n {}; \
         scheduling by session (autogroup) {}; load {}",
        hosts[0].addr(),
        hosts[started - 1].addr(),
        open_files_limit(),
        autogroup(),
        load()
    );
    let plain = Login {
        key: "sh",
        user: sshd::login_user(),
        ssh_config: login_config(dir, &world, hosts.len(), sshd::login_user()),
    };
    let rc = if sshd::login_exists(sshd::RC_LOGIN) {
        Some(Login {
            key: "rc",
            user: sshd::RC_LOGIN,
            ssh_config: login_config(dir, &world, hosts.len(), sshd::RC_LOGIN),
        })
    } else {
        println!(
            "skipping the rc-login rows: no login {} here (scripts/test makes it with TASKHERD_TEST_LOGIN=1)",
            sshd::RC_LOGIN
        );
        None
    };
    if costs_only {
        cost_rows(dir, taskherd, &hosts, &plain, &counts, runs);
        return;
    }
    let mut results = Vec::new();

    let logins: Vec<Login> = std::iter::once(plain.clone()).chain(rc).collect();
    if part_wanted("ssh") {
        // ssh true is short and noisy: at least 5 runs.
        ssh_rows(&logins, &hosts[0], runs.max(5), &mut results);
    }
    for login in &logins {
        if part_wanted(&format!("fanout-{}", login.key)) {
            fanout_rows(dir, taskherd, &hosts, login, runs, &mut results);
        }
    }
    if part_wanted("start") {
        results.extend(start_rows(
            dir,
            taskherd,
            &world,
            &hosts[..SCALE_HOSTS],
            &plain,
            runs,
        ));
    }
    if part_wanted("costs") {
        cost_rows(dir, taskherd, &hosts, &plain, &counts, runs);
    }
    if part_wanted("lines") {
        line_rows(dir, taskherd, &hosts, &plain, runs);
    }

    for (key, figures) in &results {
        result_line(key, figures);
    }
    drop(hosts);
    drop(world);
}

/// Whether the part `name` of the rows runs: all of them unless
/// `BENCH_SCALE_PARTS` (some of `agent ssh fanout-sh fanout-rc start costs
/// lines`) names the ones wanted, to measure one change in minutes.
fn part_wanted(name: &str) -> bool {
    listed_or_all("BENCH_SCALE_PARTS", name)
}

/// Whether `name` is one of the words of the variable `var`, or `var` is
/// not set. Besides `BENCH_SCALE_PARTS`, the fan-out rows take
/// `BENCH_SCALE_TOOLS` (some of `taskherd pdsh pdsh_programs`) and `BENCH_SCALE_FANOUT`
/// (some of `2 16 64`), to profile one tool at one size.
fn listed_or_all(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(words) => words.split_whitespace().any(|word| word == name),
        Err(_) => true,
    }
}

/// The soft limit of open files of this process (the master inherits it).
fn open_files_limit() -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.to_string()
    } else {
        "?".to_string()
    }
}
