//! Integration tests: the real `taskherd` binary running real processes.
//!
//! One test binary (linking once); `support` holds the harness.

mod check;
mod cli;
mod control;
mod control_cli;
mod dashboard;
mod health;
mod hooks;
mod http;
mod limits;
mod local;
mod logs;
mod order;
mod output;
mod queue;
mod queue_builtin;
mod queue_coprocess;
mod queue_durable;
mod queue_exec;
mod queue_faults;
mod queue_feeders;
mod queue_hostile;
mod queue_nats;
mod queue_options;
mod queue_results;
mod readme;
mod remote;
mod sshd_harness;
mod stop;
mod support;
mod terminal;
