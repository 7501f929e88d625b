//! `taskherd check`: a config's errors, what this machine lacks for it,
//! the hosts it expands to (`--hosts`), and logins (`--connect`).

use std::process::ExitCode;

use anyhow::Context as _;

use taskherd::config::{CheckOptions, Checked, Config};

use crate::{count_text, loaded};

pub(crate) fn check(
    path: &std::path::Path,
    config_only: bool,
    connect: bool,
    hosts: bool,
) -> anyhow::Result<ExitCode> {
    let result = if config_only {
        Config::load(path).map(|config| Checked {
            config,
            skipped: Vec::new(),
        })
    } else {
        Config::load_and_check(path, &CheckOptions::default())
    };
    let Checked { config, skipped } = match loaded(result, path)? {
        Ok(checked) => checked,
        Err(code) => return Ok(code),
    };
    for note in &skipped {
        eprintln!("note: {note}");
    }
    if hosts {
        print_hosts(&config);
    }
    if connect {
        let failed = check_connections(path, &config)?;
        if failed > 0 {
            return Ok(ExitCode::from(1));
        }
    }
    let instances: u32 = config.groups.iter().map(|g| g.instance_count()).sum();
    println!(
        "{}: ok ({}, {})",
        path.display(),
        count_text(config.groups.len() as u64, "group"),
        count_text(u64::from(instances), "instance")
    );
    Ok(ExitCode::SUCCESS)
}

/// `check --hosts`: each remote placement's hosts, expanded.
fn print_hosts(config: &Config) {
    for group in &config.groups {
        for (i, placement) in group.remote.iter().enumerate() {
            let hosts: Vec<String> = placement
                .hosts
                .iter()
                .map(|host| match &host.user {
                    Some(user) => format!("{user}@{}", host.label),
                    None => host.label.clone(),
                })
                .collect();
            println!(
                "{} [[group.remote]] {}: {} x {}: {}",
                group.name,
                i + 1,
                count_text(hosts.len() as u64, "host"),
                count_text(u64::from(placement.instances), "instance"),
                hosts.join(" ")
            );
            for host in placement.hosts.iter().filter(|host| !host.vars.is_empty()) {
                let vars: Vec<String> = host.vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  {}: {}", host.label, vars.join(" "));
            }
        }
    }
}

/// `check --connect`: logs in to every remote host of the config (each
/// once, with the settings of its first placement) and runs `true`;
/// prints each failure; returns how many failed.
fn check_connections(path: &std::path::Path, config: &Config) -> anyhow::Result<usize> {
    use futures::StreamExt;
    use std::os::unix::fs::DirBuilderExt;
    use taskherd::master::ssh;

    let mut hosts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for group in &config.groups {
        let placements = group.remote.iter().flat_map(|placement| {
            placement
                .hosts
                .iter()
                .map(move |host| (host, &placement.ssh))
        });
        let feeder = group.queue.iter().filter_map(|queue| {
            queue
                .feeder_host
                .as_ref()
                .map(|host| (host, &queue.feeder_ssh))
        });
        for (host, options) in placements.chain(feeder) {
            let key = (host.user.clone(), host.name.clone(), host.port);
            if seen.insert(key) {
                hosts.push((group.name.clone(), host.clone(), options.clone()));
            }
        }
    }
    if hosts.is_empty() {
        return Ok(0);
    }
    let control_dir = std::env::temp_dir().join(format!("taskherd-check-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&control_dir)
        .with_context(|| format!("cannot create {}", control_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let results: Vec<(String, String, Result<(), String>)> = runtime.block_on(async {
        futures::stream::iter(hosts)
            .map(|(group, host, options)| {
                let control_dir = control_dir.clone();
                async move {
                    let result = async {
                        let (mut connection, stdio) = ssh::connect(
                            &host,
                            &options,
                            &control_dir,
                            CHECK_KEEPALIVE,
                            "true",
                            (),
                        )
                        .await
                        .map_err(|err| err.to_string())?;
                        // It gets no input; its output (the login's
                        // chatter) is read and dropped until it ends.
                        let ssh::RemoteStdio {
                            stdin,
                            mut stdout,
                            mut stderr,
                        } = stdio;
                        drop(stdin);
                        let drain = async {
                            let mut sink = tokio::io::sink();
                            let mut sink2 = tokio::io::sink();
                            let _ = tokio::join!(
                                tokio::io::copy(&mut stdout, &mut sink),
                                tokio::io::copy(&mut stderr, &mut sink2)
                            );
                        };
                        let (status, _) = tokio::join!(
                            connection.first_status(CHECK_COMMAND_TIMEOUT),
                            tokio::time::timeout(CHECK_COMMAND_TIMEOUT, drain)
                        );
                        connection.close().await;
                        match status {
                            Some(status) if status.success() => Ok(()),
                            Some(status) => Err(format!("`true` ended with {status}")),
                            None => Err(format!(
                                "`true` did not end within {}s",
                                CHECK_COMMAND_TIMEOUT.as_secs()
                            )),
                        }
                    }
                    .await;
                    (group, host.label.clone(), result)
                }
            })
            .buffer_unordered(CHECK_CONNECTIONS)
            .collect()
            .await
    });
    let _ = std::fs::remove_dir_all(&control_dir);
    let mut failed = 0;
    for (group, host, result) in results {
        match result {
            Ok(()) => eprintln!("{}: host {host} (group {group}): connected", path.display()),
            Err(err) => {
                failed += 1;
                eprintln!(
                    "error: {}: host {host} (group {group}): cannot log in: {err}",
                    path.display()
                );
            }
        }
    }
    Ok(failed)
}

/// Hosts `check --connect` logs in to at once.
const CHECK_CONNECTIONS: usize = 8;

/// The SSH keepalive of `check --connect`'s short sessions.
const CHECK_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `true` may take on a host once logged in (its rc files run
/// first).
const CHECK_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
