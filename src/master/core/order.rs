//! The order between groups (`after`), without I/O: which instances are
//! ready, which groups may start now (every group they start after is
//! ready), and, on the herd's stop, which groups may stop now (every
//! group that starts after them has ended).
//!
//! The core feeds it its instances' events ([`Order::apply`]) and asks
//! it with what the table knows (the live instances of a group);
//! the groups' `after` and `[group.ready]` come from the config as it is
//! now (reloads included).

use crate::config::Config;
use crate::supervise::instance::{EventKind, InstanceEvent};
use std::collections::{BTreeMap, BTreeSet};

/// What the order between groups knows.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// Instances whose running process is ready.
    ready: BTreeSet<u32>,
    /// Groups started once their dependencies were ready: they never
    /// wait again (a restart of a dependency does not stop them).
    released: BTreeSet<String>,
    /// Groups told to wait (said once in the log).
    told_waiting: BTreeSet<String>,
    /// Groups told to stop in the herd's ordered stop.
    told_to_stop: BTreeSet<String>,
    /// Groups whose every instance completed (a one-shot job such as a
    /// migration): ready for good, for the groups after them.
    done: BTreeSet<String>,
    /// Whether an instance has a readiness check of its own, by id, as
    /// its spec says ([`Order::note`]); the config's group otherwise. A
    /// queue group's feeder has none: started is ready.
    checked: BTreeMap<u32, bool>,
}

impl Order {
    /// Notes `event` of instance `event.id` of `group`.
    pub(crate) fn apply(&mut self, config: &Config, group: &str, event: &InstanceEvent) {
        let id = event.id;
        match &event.kind {
            EventKind::Started { .. } => {
                // Without a readiness check, started is ready.
                let checked = self.checked.get(&id).copied().unwrap_or_else(|| {
                    config
                        .groups
                        .iter()
                        .find(|g| g.name == group)
                        .is_some_and(|g| g.ready.is_some())
                });
                if checked {
                    self.ready.remove(&id);
                } else {
                    self.ready.insert(id);
                }
            }
            EventKind::Ready => {
                self.ready.insert(id);
            }
            EventKind::NotReady { .. } | EventKind::Exited { .. } | EventKind::Ended { .. } => {
                self.ready.remove(&id);
            }
            _ => {}
        }
    }

    /// Notes whether instance `id` has a readiness check (its spec's
    /// `ready`).
    pub(crate) fn note(&mut self, id: u32, checked: bool) {
        self.checked.insert(id, checked);
    }

    /// Whether instance `id`'s process is ready.
    pub(crate) fn is_ready(&self, id: u32) -> bool {
        self.ready.contains(&id)
    }

    /// Whether a group whose live instances are `live` is ready: it has
    /// some, and each is ready.
    pub(crate) fn group_ready(&self, live: &[u32]) -> bool {
        !live.is_empty() && live.iter().all(|id| self.ready.contains(id))
    }

    /// The groups `group` starts after that are not ready, in its `after`
    /// order (`live` gives a group's live instances); none once the group
    /// was released.
    pub(crate) fn blockers(
        &self,
        config: &Config,
        group: &str,
        live: impl Fn(&str) -> Vec<u32>,
    ) -> Vec<String> {
        if self.released.contains(group) {
            return Vec::new();
        }
        let Some(spec) = config.groups.iter().find(|g| g.name == group) else {
            return Vec::new();
        };
        spec.after
            .iter()
            .filter(|after| !self.done.contains(*after) && !self.group_ready(&live(after)))
            .cloned()
            .collect()
    }

    /// Notes that every instance of `group` completed: the groups after
    /// it no longer wait for it.
    pub(crate) fn completed(&mut self, group: &str) {
        self.done.insert(group.to_string());
    }

    /// Notes that `group` starts now: it never waits again.
    pub(crate) fn release(&mut self, group: &str) {
        self.released.insert(group.to_string());
        self.told_waiting.remove(group);
    }

    /// Whether `group` waits for the first time (to say so once).
    pub(crate) fn first_wait(&mut self, group: &str) -> bool {
        self.told_waiting.insert(group.to_string())
    }

    /// On the herd's stop: the groups that may stop now and were not told
    /// yet (each is told once). A group other groups start after stops
    /// once every one of them has ended (`ended` says of a group); the
    /// others stop at once with the herd (they are not listed).
    pub(crate) fn may_stop(
        &mut self,
        config: &Config,
        ended: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut now = Vec::new();
        for group in &config.groups {
            if self.told_to_stop.contains(&group.name) {
                continue;
            }
            let mut dependents = config.dependents(&group.name).peekable();
            if dependents.peek().is_none() {
                continue;
            }
            if dependents.all(|after| ended(&after.name)) {
                now.push(group.name.clone());
            }
        }
        self.told_to_stop.extend(now.iter().cloned());
        now
    }

    /// `groups` sorted so that each comes after the groups it starts
    /// after (`after` in `config`), in their given order otherwise.
    pub(crate) fn sorted(config: &Config, groups: Vec<String>) -> Vec<String> {
        let mut left = groups;
        let mut sorted: Vec<String> = Vec::with_capacity(left.len());
        while !left.is_empty() {
            // The first whose dependencies among those left are placed.
            let next = left
                .iter()
                .position(|group| {
                    config
                        .groups
                        .iter()
                        .find(|g| g.name == *group)
                        .is_none_or(|g| g.after.iter().all(|a| !left.contains(a) || a == group))
                })
                // A cycle (a config not validated): keep the given order.
                .unwrap_or(0);
            sorted.push(left.remove(next));
        }
        sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::instance::InstanceEnd;

    fn config(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("herd.toml")).expect("valid config")
    }

    /// db <- api <- web, and cache alone; db has a ready check.
    const HERD: &str = r#"
[[group]]
name = "db"
command = "true"
[group.ready]
tcp = "127.0.0.1:5432"
[group.local]
instances = 2

[[group]]
name = "api"
command = "true"
after = ["db"]
[group.local]
instances = 1

[[group]]
name = "web"
command = "true"
after = ["api", "db"]
[group.local]
instances = 1

[[group]]
name = "cache"
command = "true"
[group.local]
instances = 1
"#;

    fn event(id: u32, kind: EventKind) -> InstanceEvent {
        InstanceEvent {
            id,
            time_ms: 0,
            kind,
        }
    }

    #[test]
    fn a_group_starts_once_the_groups_it_starts_after_are_ready() {
        let config = config(HERD);
        let mut order = Order::default();
        // db: 1 and 2; api: 3.
        let live = |group: &str| -> Vec<u32> {
            match group {
                "db" => vec![1, 2],
                "api" => vec![3],
                _ => vec![],
            }
        };
        assert_eq!(order.blockers(&config, "api", live), ["db"]);
        assert_eq!(order.blockers(&config, "web", live), ["api", "db"]);
        assert!(order.blockers(&config, "cache", live).is_empty());
        assert!(order.blockers(&config, "db", live).is_empty());

        // Started is not ready for db (it has a check).
        order.apply(&config, "db", &event(1, EventKind::Started { pid: 10 }));
        order.apply(&config, "db", &event(2, EventKind::Started { pid: 11 }));
        assert_eq!(order.blockers(&config, "api", live), ["db"]);
        order.apply(&config, "db", &event(1, EventKind::Ready));
        assert_eq!(order.blockers(&config, "api", live), ["db"], "one of two");
        // Late, then ready after all.
        let why = "not ready within 1s".to_string();
        order.apply(&config, "db", &event(2, EventKind::NotReady { why }));
        assert_eq!(order.blockers(&config, "api", live), ["db"]);
        order.apply(&config, "db", &event(2, EventKind::Ready));
        assert!(order.blockers(&config, "api", live).is_empty());
        order.release("api");
        // api has no check: started is ready.
        assert_eq!(order.blockers(&config, "web", live), ["api"]);
        order.apply(&config, "api", &event(3, EventKind::Started { pid: 12 }));
        assert!(order.blockers(&config, "web", live).is_empty());

        // A dependency that exits is not ready any more, but a group
        // released once never waits again.
        let how = "exited with code 1".to_string();
        order.apply(
            &config,
            "db",
            &event(1, EventKind::Exited { how, failed: true }),
        );
        assert!(!order.is_ready(1));
        assert!(order.blockers(&config, "api", live).is_empty());
        assert_eq!(order.blockers(&config, "web", live), ["db"]);
        let end = InstanceEnd::Completed;
        order.apply(&config, "db", &event(2, EventKind::Ended { end }));
        assert!(!order.group_ready(&[2]));
        assert!(!order.group_ready(&[]), "no instance is not ready");
    }

    #[test]
    fn the_stop_goes_from_the_last_groups_to_the_first() {
        let config = config(HERD);
        let mut order = Order::default();
        let mut ended: BTreeSet<&str> = BTreeSet::new();
        // web and cache stop with the herd at once (nobody starts after
        // them); api waits for web, db for api and web.
        let stop = |order: &mut Order, ended: &BTreeSet<&str>| {
            order.may_stop(&config, |group| ended.contains(group))
        };
        assert!(stop(&mut order, &ended).is_empty());
        ended.insert("cache");
        assert!(stop(&mut order, &ended).is_empty());
        ended.insert("web");
        assert_eq!(stop(&mut order, &ended), ["api"]);
        assert!(stop(&mut order, &ended).is_empty(), "told once");
        ended.insert("api");
        assert_eq!(stop(&mut order, &ended), ["db"]);
        assert!(stop(&mut order, &ended).is_empty());
    }

    #[test]
    fn changes_go_from_the_first_groups_to_the_last() {
        let config = config(HERD);
        let given = ["web", "cache", "db", "api"].map(String::from).to_vec();
        assert_eq!(Order::sorted(&config, given), ["cache", "db", "api", "web"]);
        let given = ["api", "web"].map(String::from).to_vec();
        assert_eq!(Order::sorted(&config, given), ["api", "web"]);
    }

    #[test]
    fn a_group_waits_as_long_as_the_chain_after_it_may_take_to_stop() {
        let config = config(&HERD.replace("name = \"web\"", "name = \"web\"\nstop_grace = \"7s\""));
        let margin = crate::config::STOP_ORDER_MARGIN;
        let grace = config.stop_grace("api");
        assert_eq!(config.stop_wait("web"), None);
        assert_eq!(config.stop_wait("cache"), None);
        let web = std::time::Duration::from_secs(7) + margin;
        assert_eq!(config.stop_wait("api"), Some(web));
        // db: web directly (7 s), or api then web.
        assert_eq!(config.stop_wait("db"), Some(grace + margin + web));
        assert!(config.longest_stop_grace() >= config.stop_grace("db") + grace + margin + web);
    }

    #[test]
    fn the_stop_wait_of_layers_of_shared_groups_is_worked_out_once_per_group() {
        // 40 layers of 2 groups, each after both groups of the layer
        // before: 2^40 paths from the first layer, 80 groups.
        let mut text = String::new();
        for layer in 0..40 {
            for side in ["a", "b"] {
                text.push_str(&format!(
                    "[[group]]\nname = \"l{layer}{side}\"\ncommand = \"x\"\n"
                ));
                if layer > 0 {
                    let before = layer - 1;
                    text.push_str(&format!("after = [\"l{before}a\", \"l{before}b\"]\n"));
                }
                text.push_str("[group.local]\ninstances = 1\n");
            }
        }
        let config = config(&text);
        let step = config.stop_grace("l1a") + crate::config::STOP_ORDER_MARGIN;
        assert_eq!(config.stop_wait("l0a"), Some(step * 39));
        assert_eq!(config.stop_wait("l39b"), None);
    }
}
