//! The `durable` dispatch mode's heart: one [`HostQueue`] per target server owns that server's
//! live tasks. In production it runs inside a Durable Object (one single-threaded owner with
//! transactional storage), so every decision here (claim, cancel, report, lease expiry) is
//! made by one owner in one step: cancel against claim cannot race, and a stale claim's report
//! is refused by its fencing number.
//!
//! The state machine is plain Rust over the [`HostStore`] trait (SQLite rows in the object,
//! [`MemoryStore`] in tests). It does no I/O of its own: every operation returns what the
//! caller must do next ([`Effects`]: task records to mirror to KV, tasks to push to the
//! connected daemon, when to wake up). The KV task record stays what clients read and list;
//! the object writes it after transitions, at most once per second per key (KV's limit),
//! coalescing the transitions in between.
//!
//! `protocol` holds the object's request and reply bodies and the messages pushed to daemons.

pub mod front;
pub mod object;
mod protocol;
mod queue;
mod store;

pub use protocol::{
    CancelRequest, ClaimGranted, EnqueueBatch, EnqueueBatchReply, EnqueueOutcome, FencedLease, FencedReport, Push,
    ReadyList, Refusal,
};
pub use queue::{Effects, HostQueue, QueueConfig, MIRROR_WINDOW_MS};
pub use store::{HostStore, MemoryStore, StoreOps, StoredEntry};
