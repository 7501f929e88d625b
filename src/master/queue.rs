//! Queue groups on the master's side: the feeder's and consumers' roles,
//! the per-run secret, the feeder's port, and the start order.

use super::instance::InstanceSpec;
use super::launcher::Plan;
use crate::config::QueueSpec;
use crate::protocol::queue::random_hex;
use crate::protocol::slave::{QueueRole, QueueSettings};
use crate::retry::RetryPolicy;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

/// Bytes of randomness in a per-run secret.
const SECRET_BYTES: usize = 32;

/// The role of a queue group's feeder, before [`prepare`] fills in the
/// port and the secret.
pub fn feeder_role(queue: &QueueSpec) -> QueueRole {
    QueueRole::Feeder {
        bind: queue.bind.clone(),
        secret: String::new(),
        settings: QueueSettings {
            lease: queue.lease,
            max_attempts: queue.max_attempts,
            retry: RetryPolicy::exponential(
                queue.retry_initial,
                queue.retry_max,
                queue.max_attempts,
            ),
            rate: queue.rate,
            progress_every: queue.progress_every,
        },
    }
}

/// The role of a consumer with `concurrency`, before [`prepare`].
pub fn consumer_role(queue: &QueueSpec, concurrency: Option<u32>) -> QueueRole {
    let concurrency = concurrency.unwrap_or(1).max(1);
    QueueRole::Consumer {
        feeder: queue.bind.clone(),
        secret: String::new(),
        concurrency,
        credits: queue
            .credits
            .unwrap_or(concurrency.saturating_mul(2))
            .max(concurrency),
    }
}

/// Why a queue group could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueuePrepareError {
    /// The feeder's bind address is not `ip:port`.
    #[error("group {group}: feeder bind address {bind:?} is not ip:port")]
    BadBind {
        /// The group.
        group: String,
        /// What was written.
        bind: String,
    },
    /// No free port could be found for a feeder bound to port 0.
    #[error("group {group}: no free port on {ip} for the feeder")]
    NoPort {
        /// The group.
        group: String,
        /// The address.
        ip: IpAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No randomness for the secret.
    #[error("cannot make the per-run secret")]
    Secret(#[source] std::io::Error),
}

/// Fills in every queue group's per-run secret and the feeder's real
/// port (a port 0 is chosen now, so that a restarted feeder binds the same
/// port and its consumers' address stays true), and gives consumers the
/// address to reach it.
///
/// # Errors
/// A bad bind address, no free port, no randomness.
pub fn prepare(plan: &mut Plan) -> Result<(), QueuePrepareError> {
    for feeder in &mut plan.feeders {
        let group = feeder.label.group.clone();
        let Some(QueueRole::Feeder { bind, secret, .. }) = &mut feeder.identity.queue else {
            continue;
        };
        let mut addr: SocketAddr = bind.parse().map_err(|_| QueuePrepareError::BadBind {
            group: group.clone(),
            bind: bind.clone(),
        })?;
        if addr.port() == 0 {
            let probe = TcpListener::bind(addr).map_err(|source| QueuePrepareError::NoPort {
                group: group.clone(),
                ip: addr.ip(),
                source,
            })?;
            addr = probe
                .local_addr()
                .map_err(|source| QueuePrepareError::NoPort {
                    group: group.clone(),
                    ip: addr.ip(),
                    source,
                })?;
        }
        *bind = addr.to_string();
        *secret = random_hex(SECRET_BYTES).map_err(QueuePrepareError::Secret)?;
        let reach = reachable(addr).to_string();
        let run_secret = secret.clone();
        let consumers = plan
            .local
            .iter_mut()
            .chain(
                plan.hosts
                    .iter_mut()
                    .flat_map(|host| host.instances.iter_mut()),
            )
            .filter(|spec| spec.label.group == group);
        for consumer in consumers {
            set_consumer_link(consumer, &reach, &run_secret);
        }
    }
    Ok(())
}

fn set_consumer_link(consumer: &mut InstanceSpec, reach: &str, run_secret: &str) {
    if let Some(QueueRole::Consumer { feeder, secret, .. }) = &mut consumer.identity.queue {
        *feeder = reach.to_string();
        *secret = run_secret.to_string();
    }
}

/// The address consumers dial: a wildcard bind is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn feeder_first_then_consumers_with_its_port_and_secret() {
        let text = r#"
[[group]]
name = "jobs"
command = "/bin/worker"
[group.feeder]
bind = "127.0.0.1:0"
[group.queue]
credits = 6
[group.local]
instances = 2
concurrency = 3
"#;
        let config = Config::parse(text, "herd.toml".as_ref()).unwrap();
        let mut plan = super::super::launcher::plan(&config);
        prepare(&mut plan).unwrap();
        assert_eq!(plan.feeders.len(), 1);
        let feeder = &plan.feeders[0];
        assert_eq!((feeder.label.id, feeder.label.group_id), (1, 1));
        let Some(QueueRole::Feeder { bind, secret, .. }) = &feeder.identity.queue else {
            panic!("not a feeder: {:?}", feeder.identity.queue);
        };
        assert!(
            !bind.ends_with(":0") && secret.len() == 64,
            "{bind} {secret}"
        );
        assert_eq!(plan.local.len(), 2);
        for (consumer, group_id) in plan.local.iter().zip([2, 3]) {
            assert_eq!(consumer.label.group_id, group_id);
            assert_eq!(consumer.identity.group_count, 3);
            assert_eq!(
                consumer.identity.queue,
                Some(QueueRole::Consumer {
                    feeder: bind.clone(),
                    secret: secret.clone(),
                    concurrency: 3,
                    credits: 6
                })
            );
        }
    }

    #[test]
    fn wildcard_binds_are_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:80".parse().unwrap()).to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            reachable("10.1.2.3:80".parse().unwrap()).to_string(),
            "10.1.2.3:80"
        );
    }
}
