//! The local consumer daemon. [`run`] is the whole program; `main` only parses settings and
//! sets up logging, so tests drive `run` directly against a simulator.

pub mod config;
pub mod daemon;
pub mod decide;
pub mod edge;
pub mod executor;
pub mod guest_job;
pub mod images;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod push;
pub mod report;
pub mod retry;
pub mod scheduler;

pub use daemon::run;
