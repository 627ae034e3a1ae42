//! An in-memory simulator of the Arrakis VM REST server, for tests of code that drives it.
//!
//! It serves the same `/v1/...` API from memory, reproducing the real server's status codes,
//! error texts and quirks as `shared/arrakis/BEHAVIOR.md` documents them (not-found as 500,
//! `{}` for an empty list, CIDR IPs, the §3.2 state machine, §4 allocators, snapshots and
//! restore rules, strict cmd/files bodies, router 404/405/301). On top it offers fault
//! injection (latency, hangs, seeded random 500s, fail-next, dropped connections, zombie
//! boots), a request log, and a `/_sim/` control API; see [`control`] for the routes.
//!
//! In-process use:
//! ```no_run
//! # async fn demo() {
//! let handle = arrakis_sim::spawn(arrakis_sim::SimConfig::for_tests()).await;
//! let base = handle.url(); // http://127.0.0.1:PORT
//! handle.sim.zombie_next();
//! # let _ = base;
//! # }
//! ```

mod api;
pub mod config;
pub mod control;
pub mod fs;
mod gojson;
pub mod server;
pub mod shell;
mod sim;
pub mod world;

use axum::Router;

pub use config::{parse_duration, parse_latencies, parse_ops, ConfigPatch, ConfigView, Op, SimConfig};
pub use control::FailNextRequest;
pub use server::{serve, spawn, spawn_on, SimHandle};
pub use sim::Simulator;
pub use sim::{Failure, LogEntry, ProcessView, SnapshotView, StateView, VmView, INJECTED_FAULT};

impl Simulator {
    /// The whole HTTP surface: Arrakis's routes plus `/_sim/`.
    ///
    /// Serve it with [`serve`] (or [`spawn`]): under a plain `axum::serve`, fail-next "drop"
    /// degrades to an empty 500 because axum cannot close a connection without answering.
    pub fn router(&self) -> Router {
        control::routes().fallback(api::entry).with_state(self.clone())
    }
}
