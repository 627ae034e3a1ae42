//! A model of production for the edge: the real `vm-task-edge` handlers over Workers KV and
//! Queues as Cloudflare documents them (several locations, per-location read caches, lagging
//! listings, one write per second per key, 1,000 operations per invocation, at-least-once
//! batched delivery), driven by clients, daemons and the cron in simulated time, with faults,
//! all from one seed. Invariants are checked at the end of every run; a violation comes with
//! the seed and a readable trace, and the same seed replays the same run.
//!
//! - [`rng`]: the seeded PRNG every choice comes from.
//! - [`kv`]: the KV model ([`kv::KvModel`], [`kv::Invocation`]).
//! - [`durable`]: the Durable Object model of the `durable` dispatch mode.
//! - [`queue`]: the queue model.
//! - [`sim`]: the simulation, its actors and faults, and the invariant checks.

pub mod durable;
pub mod kv;
pub mod queue;
pub mod rng;
pub mod sim;
