//! Health checks (`[group.health]`): beside liveness (signs of life), a
//! probe of what the instance serves, run where the instance runs (on
//! the master's host or by the agent on a remote one).
//!
//! [`check`] probes every interval while a process runs and sends each
//! result to the instance's supervisor, which counts the failures in a
//! row ([`Tally`]) and kills the process once they reach the group's
//! `failures`: it is restarted per its policy, as after a liveness
//! timeout. A probe is bounded by its `timeout`; a command probe that
//! runs past it is killed with its process group.
//!
//! Probes: `tcp` (a connection is accepted), `http` (a `GET` answers
//! 2xx: a request of HTTP/1.1 with `Connection: close` over a TCP
//! connection, the status line read; plain `http://` only), `command`
//! (`sh -c COMMAND` exits 0).

use crate::protocol::instance::{HealthProbe, HealthSpec, ProcessSpec};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Longest status line an HTTP probe reads.
const MAX_STATUS_LINE: usize = 1024;

/// Probes `spec.probe` every `spec.interval` (the first after one
/// interval), sending each result; ends when the receiver is gone.
/// `process` gives a command probe the instance's directory and
/// environment.
pub(crate) async fn check(
    spec: HealthSpec,
    process: ProcessSpec,
    results_tx: mpsc::Sender<Result<(), String>>,
) {
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + spec.interval, spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe_once(&spec.probe, spec.timeout, &process).await;
        if results_tx.send(result).await.is_err() {
            return;
        }
    }
}

/// The longest one readiness probe may take (or the interval, if longer;
/// at most the readiness timeout): then it failed, and the next one runs.
pub(crate) const READY_PROBE_BOUND: Duration = Duration::from_secs(5);

/// Probes `probe` at once and every `interval` until it passes (each
/// probe bounded by [`READY_PROBE_BOUND`], or `interval` if longer, at
/// most `timeout`: the readiness timeout), sending each result (a failure only when
/// there is room: it is the reason of a later "not ready"); ends on the
/// first success or when the receiver is gone. For `[group.ready]`.
pub(crate) async fn until_ready(
    probe: HealthProbe,
    interval: Duration,
    timeout: Duration,
    process: ProcessSpec,
    results_tx: mpsc::Sender<Result<(), String>>,
) {
    // One probe may not take the whole timeout: a connection to a
    // black-holed address would hold the checks for that long.
    let bound = timeout.min(READY_PROBE_BOUND.max(interval));
    loop {
        match probe_once(&probe, bound, &process).await {
            Ok(()) => {
                let _ = results_tx.send(Ok(())).await;
                return;
            }
            Err(why) => {
                if results_tx.is_closed() {
                    return;
                }
                let _ = results_tx.try_send(Err(why));
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One probe, bounded by `timeout`.
///
/// # Errors
/// Why the instance is not healthy, as the log says it.
pub(crate) async fn probe_once(
    probe: &HealthProbe,
    timeout: Duration,
    process: &ProcessSpec,
) -> Result<(), String> {
    let limit = humantime::format_duration(timeout);
    match probe {
        HealthProbe::Tcp(addr) => {
            match tokio::time::timeout(timeout, TcpStream::connect(addr.as_str())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(format!("tcp {addr}: {err}")),
                Err(_) => Err(format!("tcp {addr}: no connection within {limit}")),
            }
        }
        HealthProbe::Http(url) => match tokio::time::timeout(timeout, http_get(url)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
            Ok(Ok(status)) => Err(format!("http {url}: status {status}")),
            Ok(Err(err)) => Err(format!("http {url}: {err}")),
            Err(_) => Err(format!("http {url}: no answer within {limit}")),
        },
        HealthProbe::Command(command) => run_command(command, timeout, process).await,
    }
}

/// A `GET` of `url` (`http://host[:port][/path]`); the status code.
async fn http_get(url: &str) -> std::io::Result<u16> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(address).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: taskherd-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.contains(&b'\n') && line.len() < MAX_STATUS_LINE {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    // `HTTP/1.1 200 OK`
    let text = String::from_utf8_lossy(&line);
    let status = text
        .lines()
        .next()
        .filter(|first| first.starts_with("HTTP/"))
        .and_then(|first| first.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("no HTTP status line in the answer"))?;
    Ok(status)
}

/// `sh -c command` in the instance's directory and environment, in a
/// process group of its own (killed with it past `timeout`).
async fn run_command(
    command: &str,
    timeout: Duration,
    process: &ProcessSpec,
) -> Result<(), String> {
    let mut sh = tokio::process::Command::new("sh");
    sh.arg("-c")
        .arg(command)
        .envs(process.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &process.cwd {
        sh.current_dir(cwd);
    }
    crate::queue::child::die_with_parent(sh.as_std_mut());
    let mut child = sh
        .spawn()
        .map_err(|err| format!("command `{command}`: cannot start: {err}"))?;
    let pid = child.id();
    let mut stderr = child.stderr.take();
    let work = async {
        let mut said = Vec::new();
        if let Some(stderr) = &mut stderr {
            let _ = stderr.take(4096).read_to_end(&mut said).await;
        }
        (child.wait().await, said)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), said)) => {
            let how = super::instance::describe_status(&Ok(status));
            let said = String::from_utf8_lossy(&said).trim().to_string();
            if said.is_empty() {
                Err(format!("command `{command}`: {how}"))
            } else {
                Err(format!("command `{command}`: {how}: {said}"))
            }
        }
        Ok((Err(err), _)) => Err(format!("command `{command}`: cannot wait for it: {err}")),
        Err(_) => {
            // Not reaped (the wait was cut short): its group is ours.
            if let Some(pid) = pid {
                let _ = super::process::signal_group(pid, libc::SIGKILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "command `{command}`: did not end within {}: killed",
                humantime::format_duration(timeout)
            ))
        }
    }
}

/// A process's health so far: the failures in a row, and the verdict
/// last told.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Probes failed in a row.
    failed: u32,
    /// The verdict last told (none yet for this process).
    told: Option<bool>,
}

/// What a probe's result comes to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing new to tell.
    Same,
    /// Healthy now (the first verdict, or again).
    Healthy,
    /// A failure, `failed` of the `limit` in a row allowed.
    Failing {
        /// Failures in a row.
        failed: u32,
        /// The group's `failures`.
        limit: u32,
        /// Why.
        why: String,
    },
    /// The limit is reached: the process is unhealthy, kill it.
    Unhealthy {
        /// Failures in a row.
        failed: u32,
        /// Why (the last failure).
        why: String,
    },
}

impl Tally {
    /// Counts one probe's `result` against `limit` failures in a row.
    pub(crate) fn count(&mut self, result: Result<(), String>, limit: u32) -> Verdict {
        match result {
            Ok(()) => {
                self.failed = 0;
                if self.told == Some(true) {
                    Verdict::Same
                } else {
                    self.told = Some(true);
                    Verdict::Healthy
                }
            }
            Err(why) => {
                self.failed += 1;
                if self.failed >= limit {
                    self.told = Some(false);
                    Verdict::Unhealthy {
                        failed: self.failed,
                        why,
                    }
                } else {
                    Verdict::Failing {
                        failed: self.failed,
                        limit,
                        why,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> ProcessSpec {
        ProcessSpec {
            program: "sh".into(),
            own_executable: false,
            args: vec![],
            env: vec![("HEALTH_TEST".into(), "7".into())],
            cwd: None,
        }
    }

    #[test]
    fn failures_in_a_row_make_an_instance_unhealthy_and_a_success_resets_them() {
        let mut tally = Tally::default();
        let failure = || Err("refused".to_string());
        assert_eq!(tally.count(Ok(()), 3), Verdict::Healthy);
        assert_eq!(tally.count(Ok(()), 3), Verdict::Same);
        assert!(matches!(
            tally.count(failure(), 3),
            Verdict::Failing { failed: 1, .. }
        ));
        assert!(matches!(
            tally.count(failure(), 3),
            Verdict::Failing { failed: 2, .. }
        ));
        // A success in between starts the count over.
        assert_eq!(tally.count(Ok(()), 3), Verdict::Same);
        tally.count(failure(), 3);
        tally.count(failure(), 3);
        assert_eq!(
            tally.count(failure(), 3),
            Verdict::Unhealthy {
                failed: 3,
                why: "refused".into()
            }
        );
    }

    #[tokio::test]
    async fn each_probe_tells_healthy_from_not() {
        let second = Duration::from_secs(5);
        // TCP: a listener accepts; a closed port refuses.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        let probe = HealthProbe::Tcp(open.clone());
        assert_eq!(probe_once(&probe, second, &process()).await, Ok(()));
        drop(listener);
        let closed = probe_once(&probe, second, &process()).await;
        assert!(closed.is_err_and(|why| why.starts_with(&format!("tcp {open}: "))));

        // HTTP: a 2xx is healthy, a 503 is not.
        for (answer, healthy) in [
            ("HTTP/1.1 204 No Content", true),
            ("HTTP/1.0 503 Busy", false),
        ] {
            let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/health", server.local_addr().unwrap());
            let serve = tokio::spawn(async move {
                let (mut conn, _) = server.accept().await.unwrap();
                let mut request = vec![0u8; 1024];
                let n = conn.read(&mut request).await.unwrap();
                conn.write_all(format!("{answer}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                String::from_utf8_lossy(&request[..n]).into_owned()
            });
            let result = probe_once(&HealthProbe::Http(url.clone()), second, &process()).await;
            assert_eq!(result.is_ok(), healthy, "{result:?}");
            if !healthy {
                assert_eq!(result, Err(format!("http {url}: status 503")));
            }
            let request = serve.await.unwrap();
            assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        }

        // Command: exit 0 in the instance's environment; a failure says
        // what it printed; one past its timeout is killed.
        let ok = HealthProbe::Command("test \"$HEALTH_TEST\" = 7".into());
        assert_eq!(probe_once(&ok, second, &process()).await, Ok(()));
        let failing = HealthProbe::Command("echo not ready >&2; exit 2".into());
        assert_eq!(
            probe_once(&failing, second, &process()).await,
            Err("command `echo not ready >&2; exit 2`: exited with code 2: not ready".into())
        );
        let hung = HealthProbe::Command("sleep 1000".into());
        assert_eq!(
            probe_once(&hung, Duration::from_millis(200), &process()).await,
            Err("command `sleep 1000`: did not end within 200ms: killed".into())
        );
    }
}
