//! In-memory ports: a KV store with metadata and cursors, a recording queue, a manual clock
//! and deterministic ids. Used by this crate's tests and by anything that hosts the edge
//! logic natively.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use vm_task_types::Timestamp;

use crate::{Clock, Ids, KvKey, KvPage, KvStore, QueueMessage, StoreError, TaskQueue};

type Entries = BTreeMap<String, (String, Option<Value>)>;

/// A KV namespace in memory. Clones share the data.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    entries: Arc<Mutex<Entries>>,
    fail_writes: Arc<AtomicBool>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every later put fail (until turned off), to test error paths.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, SeqCst);
    }

    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn metadata(&self, key: &str) -> Option<Value> {
        self.lock().get(key).and_then(|(_, m)| m.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvStore for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().get(key).map(|(v, _)| v.clone()))
    }

    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError> {
        if self.fail_writes.load(SeqCst) {
            return Err(StoreError(format!("injected write failure for {key}")));
        }
        self.lock().insert(key.to_owned(), (value.to_owned(), metadata.cloned()));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError> {
        // The cursor is the last key returned, like an opaque KV cursor would encode.
        let entries = self.lock();
        let start = cursor.unwrap_or(prefix);
        let mut keys = Vec::new();
        let mut more = false;
        for (name, (_, metadata)) in entries.range(start.to_owned()..) {
            if !name.starts_with(prefix) {
                break;
            }
            if Some(name.as_str()) == cursor {
                continue;
            }
            if keys.len() == limit {
                more = true;
                break;
            }
            keys.push(KvKey { name: name.clone(), metadata: metadata.clone() });
        }
        let cursor = if more { keys.last().map(|k| k.name.clone()) } else { None };
        Ok(KvPage { keys, cursor, list_complete: !more })
    }
}

/// A queue that records what was sent. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    sent: Arc<Mutex<Vec<QueueMessage>>>,
    fail: Arc<AtomicBool>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes every message sent so far.
    pub fn drain(&self) -> Vec<QueueMessage> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn fail_sends(&self, fail: bool) {
        self.fail.store(fail, SeqCst);
    }
}

impl TaskQueue for MemoryQueue {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError> {
        if self.fail.load(SeqCst) {
            return Err(StoreError("injected queue failure".into()));
        }
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).push(message.clone());
        Ok(())
    }
}

/// A clock that moves only when told to, or when something sleeps on it.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn at(ms: u64) -> Self {
        Self { now: Arc::new(AtomicU64::new(ms)) }
    }

    pub fn advance_ms(&self, ms: u64) {
        self.now.fetch_add(ms, SeqCst);
    }

    pub fn now_ms(&self) -> u64 {
        self.now.load(SeqCst)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(SeqCst))
    }

    async fn sleep_ms(&self, ms: u64) {
        self.advance_ms(ms);
    }
}

/// Ids from a counter: deterministic, distinct, and still v7 where task ids need it.
#[derive(Debug, Clone, Default)]
pub struct SeqIds {
    next: Arc<AtomicU64>,
}

impl Ids for SeqIds {
    fn random_bytes(&self) -> [u8; 16] {
        let n = self.next.fetch_add(1, SeqCst) + 1;
        let mut bytes = [0u8; 16];
        // The counter goes first: v7 ids keep the first 10 bytes as their random part.
        bytes[..8].copy_from_slice(&n.to_be_bytes());
        bytes
    }
}
