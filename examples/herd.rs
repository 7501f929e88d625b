//! A real herd of local instances, in one self-contained program.
//!
//! ```text
//! cargo run --release --example herd            # embedded config below
//! cargo run --release --example herd -- my.toml # or your own
//! ```
//!
//! This program is both sides: run by you, it embeds the master
//! (`taskherd::master::run_blocking`) with the config below; started by that master
//! (it finds `TASKHERD_CONTROL_FD` in its environment), it is a slave using
//! `taskherd::slave::Handler`. The second group is a plain shell command
//! that gets its identity from the environment. The herd stops by itself
//! after 12 s (`max_running_time`), or on Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;
use taskherd::config::Config;
use taskherd::master;
use taskherd::slave::Handler;

/// `{self}` is replaced by this program's own path.
const DEFAULT_CONFIG: &str = r#"
[master]
timeout = "5s"           # a library instance silent this long is restarted
stop_grace = "3s"        # Stop -> SIGKILL
max_running_time = "12s" # then everything stops cleanly

[[group]]
name = "workers"
command = "{self}"
params = { message = "Hello World!", rounds = 3 }
restart = { policy = "always", initial = "500ms", max = "5s" }
[group.local]
instances = 3

[[group]]
name = "shell"
command = "sh"
args = ["-c", 'echo "plain program $TASKHERD_GROUP_ID/$TASKHERD_GROUP_COUNT, params $TASKHERD_PARAMS"; sleep 4; echo "plain program $TASKHERD_GROUP_ID done"']
params = { colour = "green" }
[group.local]
instances = 2
"#;

fn main() -> ExitCode {
    if std::env::var_os(taskherd::protocol::slave::CONTROL_FD_ENV).is_some() {
        return slave();
    }
    match master() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("herd: {err}");
            ExitCode::from(2)
        }
    }
}

/// The slave side: greets, works a few rounds, and stops early on request.
fn slave() -> ExitCode {
    let handler = match Handler::from_env() {
        Ok(handler) => handler,
        Err(err) => {
            eprintln!("herd: {err}");
            return ExitCode::from(2);
        }
    };
    handler.run(|h| {
        #[derive(serde::Deserialize)]
        struct Params {
            message: String,
            rounds: u32,
        }
        let params: Params = h.params_as().map_err(|err| err.to_string())?;
        println!(
            "{} (I am instance {} of {}, id {})",
            params.message,
            h.group_id(),
            h.group_count(),
            h.id()
        );
        for round in 1..=params.rounds {
            if !h.sleep(Duration::from_secs(1)) {
                // A clean stop is normal: info, not a warning.
                h.info("stop requested: leaving before the last round");
                return Ok(());
            }
            h.info(format!("round {round} of {} done", params.rounds));
        }
        Ok::<(), String>(())
    })
}

/// The master side: the embedded config (or a file), logs on stdout.
fn master() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = match std::env::args_os().nth(1) {
        Some(path) => Config::load(path.as_ref())?,
        None => {
            let me = std::env::current_exe()?;
            let text = DEFAULT_CONFIG.replace("{self}", &me.display().to_string());
            Config::parse(&text, "embedded-herd.toml".as_ref())?
        }
    };
    let report = master::run_blocking(config)?;
    Ok(if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
