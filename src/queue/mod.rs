//! Queues: the local queue with visibility timeout and dead letter.

pub mod local;
