//! Roles the `taskherd` binary plays itself in a queue group, so that a
//! group needs no feeder program of its own.
//!
//! - [`run_file_feeder`]: the durable [`FileFeeder`] as the group's
//!   feeder (`[group.feeder] file = "jobs.queue"`), started by the master
//!   (or a remote agent) as `taskherd builtin-feeder --file PATH`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::feeders::FileFeeder;
use crate::error_text::error_chain;
use crate::retry::Outcome;
use crate::slave::{Handler, HandlerQueue};

/// Exit code of a built-in role that cannot start (not in a queue group,
/// the wrong role, a queue file that cannot be opened).
const EXIT_CANNOT_START: u8 = 2;

/// Runs the built-in file feeder of a queue group on the durable queue at
/// `path` until the master stops it, and returns the exit code for
/// `main` (what `taskherd builtin-feeder --file PATH` does).
///
/// It connects to the master like [`HandlerQueue::from_env`], refuses to
/// run as a consumer, opens `path` with [`FileFeeder::open`] (a leading
/// `~/` is this host's home directory: a remote feeder's file arrives as
/// written in the config), logs each job given up on as a warning of the
/// instance with its id and reason, and serves the queue
/// ([`HandlerQueue::run_queue`]). Jobs are added with `taskherd queue add
/// PATH ...` while it serves.
///
/// Exit code 2, with the reason on stderr or in the instance's log, when
/// it is not started as a queue group's feeder or the queue cannot be
/// opened (locked by another process, not a journal, corrupt, ...);
/// otherwise that of [`HandlerQueue::run_queue`].
pub fn run_file_feeder(path: &Path) -> ExitCode {
    let queue = match HandlerQueue::from_env() {
        Ok(queue) => queue,
        Err(err) => {
            eprintln!("taskherd builtin-feeder: {}", error_chain(&err));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    if !queue.is_feeder() {
        queue.error(
            "the built-in file feeder runs only as its queue group's feeder, \
             not as a consumer",
        );
        return ExitCode::from(EXIT_CANNOT_START);
    }
    // Dead jobs are logged from the feeder's threads through `tracing`:
    // send it to the master as this instance's log. It fails only when a
    // subscriber is set already, which then gets them.
    let _ = queue.init_tracing();
    let path = expand_home(path);
    let feeder = match FileFeeder::open(&path) {
        Ok(feeder) => feeder,
        Err(err) => {
            queue.error(format!(
                "the built-in file feeder cannot start: {}",
                error_chain(&err)
            ));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    let feeder = feeder.with_dead_hook(|job, reason| {
        tracing::warn!(id = job.id(), reason, "job dead");
    });
    queue.run_queue(no_consumer, feeder)
}

/// The consumer part of [`HandlerQueue::run_queue`], never called: the
/// built-in feeder refuses the consumer role before it serves.
fn no_consumer(_: &Handler, _: serde_json::Value) -> Outcome {
    Outcome::Dead("the built-in file feeder does not consume jobs".to_string())
}

/// `path` with a leading `~` or `~/` made this host's home (`HOME`); as it
/// is without one, or when `HOME` is not set.
fn expand_home(path: &Path) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|home| !home.is_empty());
    match (home, path.strip_prefix("~")) {
        (Some(home), Ok(rest)) => Path::new(&home).join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_is_this_hosts_home() {
        let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) else {
            return;
        };
        let home = PathBuf::from(home);
        assert_eq!(expand_home(Path::new("~")), home);
        assert_eq!(expand_home(Path::new("~/q/jobs")), home.join("q/jobs"));
        assert_eq!(expand_home(Path::new("jobs")), PathBuf::from("jobs"));
        assert_eq!(expand_home(Path::new("/q/~/j")), PathBuf::from("/q/~/j"));
        assert_eq!(expand_home(Path::new("~user/j")), PathBuf::from("~user/j"));
    }
}
