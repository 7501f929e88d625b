//! `--agent`: the CPU one host's side of a fan-out costs, without ssh:
//! `taskherd agent` given the master's hello and 4 instances (`sh -c 'echo
//! done $TASKHERD_ID'`, what the fan-out rows run) and read until their 4
//! reports, its stdin then closed, against one `sh -c` starting the same
//! 4 programs (what pdsh's one command per host runs in the fan-out rows'
//! "same programs") and one `sh -c` printing the 4 lines with `echo`
//! builtins (pdsh's best case). The agent's watchdog, which leaves its
//! tree when the agent ends, is reaped here (this process is a child
//! subreaper), so its CPU counts.
//!
//! Each figure is the median over `runs` rounds of the CPU (user + system,
//! of the reaped processes: `RUSAGE_CHILDREN`) per run, a round being
//! [`PER_ROUND`] runs; the tools alternate round by round. The processes
//! get the PATH sshd gives a session and a state directory of their own.
//!
//! ```sh
//! BENCH_RUNS=5 cargo bench --bench remote_start -- --agent
//! ```

use super::scale::children_cpu;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taskherd::protocol::agent::{FromAgent, ToAgent};
use taskherd::protocol::instance::InstanceSpec;
use taskherd::protocol::PROTOCOL_VERSION;

/// Runs of each tool per round.
const PER_ROUND: usize = 100;

/// Instances per host, as in the fan-out rows.
const INSTANCES: u32 = 4;

/// What a session started by sshd has on its PATH (Debian's default).
const SESSION_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One way to do a host's work.
#[derive(Clone, Copy)]
enum Tool {
    Agent,
    ShPrograms,
    ShBuiltins,
}

impl Tool {
    fn key(self) -> &'static str {
        match self {
            Tool::Agent => "taskherd_agent",
            Tool::ShPrograms => "sh_programs",
            Tool::ShBuiltins => "sh_builtins",
        }
    }
}

/// Measures and prints `FIGURE agent_cost_<tool>_cpu_ms <median>` lines.
/// It waits for every child of this process between rounds: run it
/// before any other child starts.
pub fn run(dir: &Path, taskherd: &Path, runs: usize) {
    // The agent's watchdog outlives it: reparented here, it is reaped and
    // counted.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("become a child subreaper");
    let state = dir.join("agent-state");
    std::fs::create_dir_all(&state).expect("agent state dir");
    let prelude = prelude();
    let tools = [Tool::Agent, Tool::ShPrograms, Tool::ShBuiltins];
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); tools.len()];
    println!(
        "agent cost: {runs} rounds of {PER_ROUND} runs per tool, {INSTANCES} instances per run"
    );
    for round in 1..=runs {
        let mut said = Vec::new();
        for (tool, figures) in tools.iter().zip(&mut figures) {
            let before = children_cpu();
            let started = Instant::now();
            for _ in 0..PER_ROUND {
                match tool {
                    Tool::Agent => agent_run(taskherd, &state, &prelude),
                    Tool::ShPrograms => sh_run(&format!(
                        "for i in {}; do TASKHERD_ID=$i sh -c 'echo done $TASKHERD_ID' & done; wait",
                        ids()
                    )),
                    Tool::ShBuiltins => sh_run(&format!("for i in {}; do echo done $i; done", ids())),
                }
                reap_orphans(false);
            }
            // The last watchdog counts in this round, not the next tool's.
            reap_orphans(true);
            let cpu =
                children_cpu().saturating_sub(before).as_secs_f64() * 1000.0 / PER_ROUND as f64;
            let wall = started.elapsed().as_secs_f64() * 1000.0 / PER_ROUND as f64;
            said.push(format!(
                "{} {cpu:.2} ms CPU ({wall:.2} ms wall)",
                tool.key()
            ));
            figures.push(cpu);
        }
        println!("round {round}: {}", said.join(", "));
    }
    rustix::process::set_child_subreaper(None).expect("no longer a child subreaper");
    for (tool, mut values) in tools.into_iter().zip(figures) {
        values.sort_by(f64::total_cmp);
        let median = values[values.len() / 2];
        println!("FIGURE agent_cost_{}_cpu_ms {median:.3}", tool.key());
    }
}

/// `1 2 3 4`.
fn ids() -> String {
    (1..=INSTANCES)
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The master's first frames: the hello and the instances.
fn prelude() -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    let instances: Vec<InstanceSpec> = (1..=INSTANCES)
        .map(|id| InstanceSpec::shell("bench", "host", id, INSTANCES, "echo done $TASKHERD_ID"))
        .collect();
    let frames = [
        ToAgent::Hello {
            version: PROTOCOL_VERSION,
            heartbeat: Duration::from_secs(1),
            orphan_timeout: Duration::from_secs(10),
        },
        ToAgent::Start { instances },
    ];
    for frame in frames {
        let body = taskherd::protocol::encode(&frame).expect("encode a frame");
        tokio_util::codec::Encoder::encode(&mut taskherd::protocol::codec(), body, &mut out)
            .expect("frame it");
    }
    out.to_vec()
}

/// One agent run: the prelude in, frames out until every instance has
/// ended, stdin closed, the agent's exit awaited.
fn agent_run(taskherd: &Path, state: &Path, prelude: &[u8]) {
    let mut agent = Command::new(taskherd)
        .arg("agent")
        .env_clear()
        .env("PATH", SESSION_PATH)
        .env("XDG_STATE_HOME", state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start taskherd agent");
    let mut stdin = agent.stdin.take().expect("agent stdin");
    let mut stdout = agent.stdout.take().expect("agent stdout");
    stdin.write_all(prelude).expect("write the prelude");
    let mut ended = 0;
    while ended < INSTANCES {
        let mut length = [0u8; 4];
        stdout.read_exact(&mut length).expect("a frame's length");
        let mut body = vec![0u8; u32::from_be_bytes(length) as usize];
        stdout.read_exact(&mut body).expect("a frame");
        if let Ok(FromAgent::Ended { .. }) = serde_json::from_slice(&body) {
            ended += 1;
        }
    }
    drop(stdin);
    let status = agent.wait().expect("wait for the agent");
    assert!(status.success(), "the agent ended with {status}");
}

/// One `sh -c script`, its output checked.
fn sh_run(script: &str) {
    let output = Command::new("sh")
        .args(["-c", script])
        .env_clear()
        .env("PATH", SESSION_PATH)
        .stderr(Stdio::null())
        .output()
        .expect("run sh");
    let lines = String::from_utf8_lossy(&output.stdout).lines().count();
    assert_eq!(lines, INSTANCES as usize, "sh printed {lines} lines");
}

/// Reaps the children that ended (orphans reparented here included);
/// with `all`, waits until there is none left.
fn reap_orphans(all: bool) {
    let flags = if all { 0 } else { libc::WNOHANG };
    // SAFETY: waitpid on any child; no memory is passed.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), flags) } > 0 {}
}
