//! The small traits the workers implement over their bindings (KV, Queues, clock, randomness).
//!
//! Futures here are not `Send`: on wasm every binding is a JS object on one thread.

use serde_json::Value;
use uuid::Uuid;
use vm_task_types::Timestamp;

use crate::QueueMessage;

/// A failed storage or queue call. Always a server-side problem (5xx), never the client's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub message: String,
    /// KV refused a write because the key was written less than a second ago (429). Callers
    /// that can wait out the window, or know another write covers theirs, branch on this.
    pub rate_limited: bool,
}

impl StoreError {
    pub fn other(message: impl Into<String>) -> Self {
        Self { message: message.into(), rate_limited: false }
    }

    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self { message: message.into(), rate_limited: true }
    }
}

/// One key of a listing, with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct KvKey {
    pub name: String,
    pub metadata: Option<Value>,
}

/// One page of a listing, in key order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvPage {
    pub keys: Vec<KvKey>,
    pub cursor: Option<String>,
    pub list_complete: bool,
}

/// Workers KV, as far as the workers use it.
#[allow(async_fn_in_trait)] // single-threaded wasm: no Send bound wanted.
pub trait KvStore {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Value and metadata in one read.
    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError>;
    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Keys starting with `prefix`, in lexicographic order, at most `limit` (≤ 1000).
    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError>;
}

/// The producer side of the task queue.
#[allow(async_fn_in_trait)]
pub trait TaskQueue {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError>;
}

/// Wall-clock time and sleeping, which differ between wasm and native.
#[allow(async_fn_in_trait)]
pub trait Clock {
    fn now(&self) -> Timestamp;
    async fn sleep_ms(&self, ms: u64);
}

/// Randomness for ids.
pub trait Ids {
    fn random_bytes(&self) -> [u8; 16];

    /// A random (v4) UUID, for claim ids.
    fn random_uuid(&self) -> Uuid {
        uuid::Builder::from_random_bytes(self.random_bytes()).into_uuid()
    }

    /// A time-ordered (v7) UUID for a task created at `now`: its text sorts by creation time,
    /// which the KV key layout relies on.
    fn task_id(&self, now: Timestamp) -> Uuid {
        let bytes = self.random_bytes();
        let mut random = [0u8; 10];
        random.copy_from_slice(&bytes[..10]);
        uuid::Builder::from_unix_timestamp_millis(now.as_millis(), &random).into_uuid()
    }
}

/// Creation time encoded in a v7 task id, or `None` for any other UUID (which no task has).
pub(crate) fn task_id_millis(id: Uuid) -> Option<u64> {
    if id.get_version_num() != 7 {
        return None;
    }
    let b = id.as_bytes();
    Some(b[..6].iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
}
