//! The operator's commands (`status`, `stop`, `suspend`, `reload`, `logs`)
//! against an in-process fake master serving a real control socket.

use crate::support::{taskherd_bin, WAIT};
use std::path::{Path, PathBuf};
use taskherd::master::control::{ControlRequest, ControlSocket};
use taskherd::protocol::control::{
    FromMaster, GroupStatus, HerdStatus, InstanceState, InstanceStatus, ToMaster,
};
use taskherd::protocol::slave::Level;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A runtime dir (`$XDG_RUNTIME_DIR` for the commands), a config, and a
/// fake master answering on the config's socket.
struct FakeMaster {
    dir: tempfile::TempDir,
    config: PathBuf,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

fn status() -> HerdStatus {
    HerdStatus {
        config: "/etc/taskherd/herd.toml".into(),
        pid: 4242,
        uptime_ms: 125_000,
        groups: vec![GroupStatus {
            name: "workers".into(),
            suspended: false,
            instances: vec![InstanceStatus {
                id: 1,
                group_id: 1,
                host: "localhost".into(),
                command: "worker".into(),
                state: InstanceState::Running,
                pid: Some(4250),
                uptime_ms: Some(124_000),
                restarts: 2,
                last_exit: Some("exited with code 3".into()),
                seen_ms_ago: Some(2_000),
                health: None,
            }],
            queue: None,
        }],
    }
}

fn answer(request: ToMaster) -> Vec<FromMaster> {
    let done = |message: String| vec![FromMaster::Done { message }];
    match request {
        ToMaster::Status => vec![FromMaster::Status(status())],
        ToMaster::Stop { kill } => done(format!("stopped (kill: {kill})")),
        ToMaster::Suspend { group } if group == "nope" => vec![FromMaster::Error {
            message: "no group named nope".into(),
        }],
        ToMaster::Suspend { group } => done(format!("{group} suspended")),
        ToMaster::Reload => vec![FromMaster::Error {
            message: "reload refused, the running config is kept:\nerror: herd.toml:3: unknown key `colour`".into(),
        }],
        ToMaster::Logs {
            group,
            tail,
            follow,
        } => {
            // The fake's backlog: `tail` lines, then (without follow) Done.
            let mut frames: Vec<FromMaster> = (1..=tail.min(3))
                .map(|n| FromMaster::Log {
                    line: format!("kept {n} of {}", group.as_deref().unwrap_or("all")),
                    level: Level::Warning,
                })
                .collect();
            if !follow {
                frames.push(FromMaster::Done {
                    message: "end of the backlog".into(),
                });
                return frames;
            }
            frames.extend((1..=3).map(|n| FromMaster::Log {
                line: format!("line {n} of {}", group.as_deref().unwrap_or("all")),
                level: Level::Info,
            }));
            frames
        }
        _ => vec![],
    }
}

impl FakeMaster {
    fn start() -> FakeMaster {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("herd.toml");
        std::fs::write(&config, "").expect("write config");
        let socket = ControlSocket::bind_in(&dir.path().join("taskherd"), &config).expect("bind");
        let (requests_tx, mut requests_rx) = mpsc::channel::<ControlRequest>(4);
        let stop = CancellationToken::new();
        let server = tokio::spawn(socket.serve(requests_tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(ControlRequest { request, reply }) = requests_rx.recv().await {
                for frame in answer(request) {
                    let _ = reply.send(frame).await;
                }
            }
        });
        FakeMaster {
            dir,
            config,
            stop,
            server,
        }
    }

    /// Runs `taskherd ARGS -c CONFIG`; returns (exit code, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        run_in(self.dir.path(), &self.config, args).await
    }
}

async fn run_in(runtime_dir: &Path, config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(taskherd_bin())
            .args(args)
            .arg("-c")
            .arg(config)
            .env("XDG_RUNTIME_DIR", runtime_dir)
            .output(),
    )
    .await
    .expect("command ends in time")
    .expect("run taskherd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_as_table_and_json() {
    let master = FakeMaster::start();
    let (code, out, err) = master.run(&["status"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.starts_with("/etc/taskherd/herd.toml: master pid 4242, up 2m 5s\n"),
        "{out}"
    );
    assert!(out.contains("GROUP"), "{out}");
    let row = out.lines().nth(2).unwrap_or_default();
    for cell in [
        "workers",
        "1/1",
        "localhost",
        "4250",
        "running",
        "2m 4s",
        "exited with code 3",
        "seen 2s ago",
    ] {
        assert!(row.contains(cell), "{cell} missing in {row:?}");
    }

    let (code, out, err) = master.run(&["status", "--json"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let parsed: HerdStatus = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(parsed, status());
}

#[tokio::test]
async fn requests_and_exit_codes() {
    let master = FakeMaster::start();
    let (code, out, err) = master.run(&["stop", "--kill"]).await;
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "stopped (kill: true)\n"),
        "{err}"
    );

    // -q: nothing to say when it worked.
    let (code, out, err) = master.run(&["-q", "stop"]).await;
    assert_eq!((code, out.as_str(), err.as_str()), (Some(0), "", ""));

    let (code, out, err) = master.run(&["suspend", "web"]).await;
    assert_eq!((code, out.as_str()), (Some(0), "web suspended\n"), "{err}");
    let (code, _, err) = master.run(&["suspend", "nope"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no group named nope"), "{err}");

    let (code, _, err) = master.run(&["reload"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("reload refused") && err.contains("unknown key `colour`"),
        "{err}"
    );
}

#[tokio::test]
async fn logs_follow_until_the_master_lets_go() {
    let master = FakeMaster::start();
    let (code, out, err) = master.run(&["logs", "workers"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "line 1 of workers\nline 2 of workers\nline 3 of workers\n"
    );
    let (_, out, _) = master.run(&["logs"]).await;
    assert!(out.starts_with("line 1 of all\n"), "{out}");

    // --tail asks for the backlog first; -q shows warnings and up only.
    let (code, out, err) = master.run(&["logs", "--tail", "2"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("kept 1 of all\nkept 2 of all\nline 1 of all\n"),
        "{out}"
    );
    let (code, out, err) = master.run(&["-q", "logs", "--tail", "2"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "kept 1 of all\nkept 2 of all\n");

    // --no-follow: the whole backlog (the master's bound), then the end.
    let (code, out, err) = master.run(&["logs", "--no-follow", "web"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "kept 1 of web\nkept 2 of web\nkept 3 of web\n");
}

#[tokio::test]
async fn status_of_some_groups() {
    let master = FakeMaster::start();
    let (code, out, err) = master.run(&["status", "--json", "workers"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let parsed: HerdStatus = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(parsed, status());
    let (code, out, err) = master.run(&["status", "workers", "nope"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("no group named \"nope\" (the master has: workers)"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
}

#[tokio::test]
async fn no_master_is_exit_code_2() {
    let master = FakeMaster::start();
    master.stop.cancel();
    let FakeMaster {
        dir,
        config,
        server,
        ..
    } = master;
    tokio::time::timeout(WAIT, server)
        .await
        .expect("serve ends")
        .expect("serve task");
    let (code, out, err) = run_in(dir.path(), &config, &["stop"]).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("no master is running for"), "{err}");
    assert!(err.contains("herd.toml"), "{err}");
}
