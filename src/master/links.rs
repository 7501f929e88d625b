//! The connection state of each remote host, as its supervisor
//! (`remote.rs`) sees it: connecting, up (its agent answered), or down
//! (lost or refused, until the next try). What `/metrics` and the
//! dashboard show per host; instances alone cannot tell a host whose
//! agent is connected but runs nothing from one that is unreachable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// Where a host's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Opening its SSH connection or starting its agent.
    Connecting,
    /// Its agent answered and is connected.
    Up,
    /// Lost or refused; tried again later (or given up:
    /// `ssh.give_up_after`, said in the problem).
    Down,
}

impl LinkState {
    /// Its name in the metrics and the JSON: `connecting`, `up`, `down`.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// One host's connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    /// Where it is.
    pub state: LinkState,
    /// Since when (Unix ms).
    pub since_ms: u64,
    /// What went wrong last, if it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Every remote host's connection, shared by their supervisors (which
/// write) and the HTTP interface (which reads).
#[derive(Debug, Clone, Default)]
pub struct HostLinks(Arc<Mutex<BTreeMap<String, Link>>>);

impl HostLinks {
    /// Notes that `host` is now `state` (with the `problem` that took it
    /// down).
    pub fn set(&self, host: &str, state: LinkState, problem: Option<String>) {
        let since_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let mut links = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let link = links.entry(host.to_string()).or_insert(Link {
            state,
            since_ms,
            problem: None,
        });
        if link.state != state {
            link.state = state;
            link.since_ms = since_ms;
        }
        link.problem = problem;
    }

    /// Forgets `host` (its supervisor ended: nothing runs there any more).
    pub fn forget(&self, host: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(host);
    }

    /// Every host's connection now.
    pub fn snapshot(&self) -> BTreeMap<String, Link> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_goes_through_its_states_and_keeps_since_when() {
        let links = HostLinks::default();
        links.set("db1", LinkState::Connecting, None);
        links.set("db1", LinkState::Up, None);
        let up = links.snapshot()["db1"].clone();
        assert_eq!(up.state, LinkState::Up);
        links.set("db1", LinkState::Up, None);
        assert_eq!(links.snapshot()["db1"].since_ms, up.since_ms);
        links.set("db1", LinkState::Down, Some("agent link: closed".into()));
        let down = &links.snapshot()["db1"];
        assert_eq!(
            (down.state.name(), down.problem.as_deref()),
            ("down", Some("agent link: closed"))
        );
        links.forget("db1");
        assert!(links.snapshot().is_empty());
    }
}
