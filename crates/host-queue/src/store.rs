//! Where a [`crate::HostQueue`] keeps its state: one row per task it holds, plus named
//! counters. The Durable Object implements [`HostStore`] over its SQLite storage (each call one
//! statement, billed per row read or written); [`MemoryStore`] is the native stand-in, and
//! counts rows the same way so tests can state the cost of an operation.
//!
//! Calls are synchronous because the object's SQLite API is: a statement runs to completion
//! inside the object's single thread, which is what makes each queue operation atomic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_task_types::{Task, Timestamp};

/// One task as the queue stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEntry {
    pub task: Task,
    /// The fencing number of the task's current claim; 0 when it has none.
    #[serde(default)]
    pub fence: u64,
    /// The task record's `gen` as last written to KV; behind `task.gen` means a KV write is due.
    #[serde(default)]
    pub mirrored_gen: u64,
    /// When the task became terminal; the entry is purged a while after (see `retain_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The client's cancel of this running long command, waiting for its daemon to stop it
    /// (the heartbeat's answer says so); the message becomes the task's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<String>,
}

/// Rows read and written so far, the units Durable Object SQLite storage is billed in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreOps {
    pub rows_read: u64,
    pub rows_written: u64,
}

/// The queue's persistent state.
pub trait HostStore {
    /// Every entry, in task id order (UUIDv7: creation order).
    fn load_entries(&mut self) -> Vec<StoredEntry>;
    fn put_entry(&mut self, entry: &StoredEntry);
    fn delete_entry(&mut self, id: Uuid);
    /// A named counter; 0 when never set.
    fn counter(&mut self, name: &str) -> u64;
    fn set_counter(&mut self, name: &str, value: u64);
}

/// In-memory [`HostStore`] for tests; survives a "restart" by being handed to a new queue.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    entries: BTreeMap<Uuid, String>,
    counters: BTreeMap<String, u64>,
    pub ops: StoreOps,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries currently stored (for tests that check purging).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl HostStore for MemoryStore {
    fn load_entries(&mut self) -> Vec<StoredEntry> {
        self.ops.rows_read += self.entries.len() as u64;
        // Stored as JSON text, like the SQLite rows, so a field that does not round-trip fails here.
        self.entries.values().map(|text| serde_json::from_str(text).expect("stored entry round-trips")).collect()
    }

    fn put_entry(&mut self, entry: &StoredEntry) {
        self.ops.rows_written += 1;
        self.entries.insert(entry.task.id, serde_json::to_string(entry).expect("entry serializes"));
    }

    fn delete_entry(&mut self, id: Uuid) {
        self.ops.rows_written += 1;
        self.entries.remove(&id);
    }

    fn counter(&mut self, name: &str) -> u64 {
        self.ops.rows_read += 1;
        self.counters.get(name).copied().unwrap_or(0)
    }

    fn set_counter(&mut self, name: &str, value: u64) {
        self.ops.rows_written += 1;
        self.counters.insert(name.to_owned(), value);
    }
}
