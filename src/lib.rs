#![warn(missing_docs)]
//! taskherd starts, supervises and feeds processes.
#[cfg(feature = "master")]
pub mod agent;
#[cfg(feature = "slave")]
pub mod callback;
#[cfg(feature = "master")]
pub mod config;
mod error_text;
#[cfg(feature = "master")]
pub mod log;
#[cfg(feature = "master")]
pub mod master;
#[cfg(feature = "slave")]
pub mod pidkiller;
pub mod protocol;
#[cfg(feature = "slave")]
pub mod queue;
pub mod retry;
#[cfg(feature = "slave")]
pub mod slave;
#[cfg(feature = "master")]
pub mod supervise;
