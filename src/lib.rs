#![warn(missing_docs)]
//! taskherd starts, supervises and feeds processes.
#[cfg(feature = "master")]
pub mod agent;
#[cfg(feature = "master")]
pub mod config;
#[cfg(feature = "master")]
pub mod master;
pub mod protocol;
#[cfg(feature = "slave")]
pub mod slave;
