//! Subcommands of the `taskherd` binary that have grown past a few lines:
//! each in a file of its own.

pub mod check;
pub mod control;
pub mod diagnostics;
pub mod exec;
pub mod queue;
