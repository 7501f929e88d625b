//! Queue groups on the master's side: the feeder's and consumers' roles,
//! the per-run secret, the feeder's port, and the start order.

use super::plan::Plan;
use crate::config::QueueSpec;
use crate::protocol::queue::random_hex;
use crate::protocol::slave::{JetStreamQueue, QueueRole, QueueSettings};
use crate::retry::RetryPolicy;
use crate::supervise::instance::InstanceSpec;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

/// Bytes of randomness in a per-run secret.
const SECRET_BYTES: usize = 32;

/// The role of a queue group's feeder, before [`prepare`] fills in the
/// port and the secret; `joblog` is where the feeder writes its joblog,
/// as a path on its host.
pub fn feeder_role(queue: &QueueSpec, joblog: Option<PathBuf>) -> QueueRole {
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
            joblog,
        },
    }
}

/// The role of a consumer with `concurrency`, before [`prepare`]; a
/// consumer of a JetStream queue (`jetstream`) has no feeder to wait for.
pub fn consumer_role(
    queue: &QueueSpec,
    concurrency: Option<u32>,
    jetstream: Option<Box<JetStreamQueue>>,
) -> QueueRole {
    let concurrency = concurrency.unwrap_or(1).max(1);
    QueueRole::Consumer {
        feeder: queue.bind.clone(),
        secret: String::new(),
        concurrency,
        credits: queue
            .credits
            .unwrap_or(concurrency.saturating_mul(2))
            .max(concurrency),
        jetstream,
    }
}

/// Creates or checks the streams and the durable consumer of every queue
/// group on JetStream. A server that cannot be reached now is not fatal:
/// the master says so and keeps trying in the background while the
/// consumers wait for it.
///
/// # Errors
/// What retrying cannot fix, as a message naming the group: credentials
/// the server refuses, an existing stream that contradicts the config,
/// a server that refuses to create them.
#[cfg(feature = "nats")]
pub(crate) async fn setup_jetstream(
    config: &crate::config::Config,
    sink: &crate::log::LogSink,
) -> Result<(), String> {
    use crate::protocol::slave::Level;
    use crate::queue::nats::{self, NatsError};
    for group in &config.groups {
        let Some(queue) = config.jetstream_queue(&group.name) else {
            continue;
        };
        let name = format!("taskherd master ({})", group.name);
        let attempt = async {
            let client = nats::connect(&queue, &name).await?;
            nats::setup::ensure(&client, &queue).await
        };
        match attempt.await {
            Ok(()) => {
                sink.master_event(
                    Level::Info,
                    format!(
                        "group {}: JetStream stream {} ready on {}",
                        group.name,
                        queue.stream,
                        queue.servers.join(",")
                    ),
                )
                .await;
            }
            Err(err @ NatsError::Unreachable { .. }) => {
                sink.master_event(
                    Level::Warning,
                    format!(
                        "group {}: {err}; its consumers wait for it, and the streams are \
                         set up once it answers",
                        group.name
                    ),
                )
                .await;
                let sink = sink.clone();
                let group = group.name.clone();
                tokio::spawn(async move {
                    let mut step = 0;
                    loop {
                        let delay = crate::backoff::Backoff::doubling(
                            std::time::Duration::from_millis(200),
                            std::time::Duration::from_secs(5),
                            0.25,
                        )
                        .delay(step, crate::random::unit());
                        step = step.saturating_add(1);
                        tokio::time::sleep(delay).await;
                        let attempt = async {
                            let client = nats::connect(&queue, &name).await?;
                            nats::setup::ensure(&client, &queue).await
                        };
                        match attempt.await {
                            Ok(()) => {
                                sink.master_event(
                                    Level::Info,
                                    format!(
                                        "group {group}: JetStream stream {} ready",
                                        queue.stream
                                    ),
                                )
                                .await;
                                return;
                            }
                            Err(NatsError::Unreachable { .. }) => continue,
                            Err(err) => {
                                sink.master_event(Level::Error, format!("group {group}: {err}"))
                                    .await;
                                return;
                            }
                        }
                    }
                });
            }
            Err(err) => return Err(format!("group {}: {err}", group.name)),
        }
    }
    Ok(())
}

/// Without the `nats` feature no config has JetStream groups that work.
#[cfg(not(feature = "nats"))]
pub(crate) async fn setup_jetstream(
    config: &crate::config::Config,
    _sink: &crate::log::LogSink,
) -> Result<(), String> {
    match config
        .groups
        .iter()
        .find(|group| config.jetstream_queue(&group.name).is_some())
    {
        Some(group) => Err(format!(
            "group {}: backend = \"nats\" needs taskherd built with the `nats` feature",
            group.name
        )),
        None => Ok(()),
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

/// Fills in every queue group's per-run secret, and the real port of a
/// feeder on the master's host (a port 0 is chosen now, so that a
/// restarted feeder binds the same port and its consumers' address stays
/// true); consumers of a local feeder get its address now, those of a
/// remote feeder once it listens (the master's core holds them until
/// then).
///
/// # Errors
/// A bad bind address, no free port, no randomness.
pub fn prepare(plan: &mut Plan) -> Result<(), QueuePrepareError> {
    let remote_feeders = plan
        .hosts
        .iter_mut()
        .flat_map(|host| host.instances.iter_mut())
        .filter(|spec| matches!(spec.identity.queue, Some(QueueRole::Feeder { .. })));
    let mut links = Vec::new();
    for feeder in remote_feeders {
        let group = feeder.label.group.clone();
        if let Some(QueueRole::Feeder { bind, secret, .. }) = &mut feeder.identity.queue {
            parse_bind(&group, bind)?;
            *secret = random_hex(SECRET_BYTES).map_err(QueuePrepareError::Secret)?;
            links.push((group, None, secret.clone()));
        }
    }
    for feeder in &mut plan.feeders {
        let group = feeder.label.group.clone();
        let Some(QueueRole::Feeder { bind, secret, .. }) = &mut feeder.identity.queue else {
            continue;
        };
        let mut addr = parse_bind(&group, bind)?;
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
        links.push((group, Some(FeederAddress::local(addr)), secret.clone()));
    }
    for (group, address, run_secret) in links {
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
            let reach = address
                .as_ref()
                .map(|address| address.for_host(&consumer.label.host));
            if let Some(QueueRole::Consumer { feeder, secret, .. }) = &mut consumer.identity.queue {
                *feeder = reach.unwrap_or_default();
                *secret = run_secret.clone();
            }
        }
    }
    Ok(())
}

fn parse_bind(group: &str, bind: &str) -> Result<SocketAddr, QueuePrepareError> {
    bind.parse().map_err(|_| QueuePrepareError::BadBind {
        group: group.to_string(),
        bind: bind.to_string(),
    })
}

/// Points a consumer at its feeder (a no-op for other instances).
pub fn set_feeder_address(consumer: &mut InstanceSpec, address: &FeederAddress) {
    let reach = address.for_host(&consumer.label.host);
    if let Some(QueueRole::Consumer { feeder, .. }) = &mut consumer.identity.queue {
        *feeder = reach;
    }
}

/// Where a feeder listens, and on which host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeederAddress {
    /// The address it bound.
    pub listened: SocketAddr,
    /// Its host's label (as instance labels name hosts).
    pub host: String,
    /// The name other hosts dial it at, for a wildcard bind: `None` for
    /// the master's host (its host name is used then).
    pub dial_name: Option<String>,
}

impl FeederAddress {
    /// A feeder on the master's host.
    pub fn local(listened: SocketAddr) -> Self {
        FeederAddress {
            listened,
            host: super::plan::LOCAL_HOST.to_string(),
            dial_name: None,
        }
    }

    /// The address a consumer on `host` (a host label) dials: a wildcard
    /// bind is reached on loopback from the feeder's own host, and at the
    /// feeder host's name from the others.
    pub fn for_host(&self, host: &str) -> String {
        let addr = self.listened;
        if !addr.ip().is_unspecified() {
            return addr.to_string();
        }
        if host == self.host {
            let loopback: IpAddr = match addr.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            };
            return SocketAddr::new(loopback, addr.port()).to_string();
        }
        let name = match &self.dial_name {
            Some(name) => name.clone(),
            None => master_host_name(),
        };
        if name.contains(':') {
            format!("[{name}]:{}", addr.port())
        } else {
            format!("{name}:{}", addr.port())
        }
    }
}

/// This machine's host name, as remote consumers dial a local feeder bound
/// to a wildcard address.
fn master_host_name() -> String {
    // uname(2)'s node name is what gethostname(2) gives.
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

/// The queue group whose feeder `spec` must wait for, if it is a consumer.
pub fn consumer_of(spec: &InstanceSpec) -> Option<&str> {
    match spec.identity.queue {
        Some(QueueRole::Consumer { .. }) => Some(&spec.label.group),
        _ => None,
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
        let mut plan = super::super::plan::plan(&config);
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
                    credits: 6,
                    jetstream: None,
                })
            );
        }
    }

    #[test]
    fn wildcard_binds_are_reached_on_loopback_from_their_host() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let local = FeederAddress::local(addr("0.0.0.0:80"));
        assert_eq!(local.for_host("localhost"), "127.0.0.1:80");
        assert_eq!(local.for_host("web1"), format!("{}:80", master_host_name()));
        let remote = FeederAddress {
            listened: addr("[::]:80"),
            host: "web1:2222".into(),
            dial_name: Some("web1".into()),
        };
        assert_eq!(remote.for_host("web1:2222"), "[::1]:80");
        assert_eq!(remote.for_host("localhost"), "web1:80");
        let v6_name = FeederAddress {
            dial_name: Some("fe80::1".into()),
            ..remote
        };
        assert_eq!(v6_name.for_host("web2"), "[fe80::1]:80");
        let fixed = FeederAddress::local(addr("10.1.2.3:80"));
        assert_eq!(fixed.for_host("web1"), "10.1.2.3:80");
    }
}
