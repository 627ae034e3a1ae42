//! Counts every billable KV and queue operation a worker makes, for `/stats` and the cost
//! figures in BENCHMARKS.md. Counters live per isolate (there is no free global counter on
//! Workers); the local stack runs one isolate per worker, so its counts are exact.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::Value;
use vm_task_types::wire::OpCounts;

use crate::{KvPage, KvStore, QueueMessage, StoreError, TaskQueue};

#[derive(Debug, Default)]
pub struct OpCounters {
    kv_reads: AtomicU64,
    kv_writes: AtomicU64,
    kv_deletes: AtomicU64,
    kv_lists: AtomicU64,
    queue_sends: AtomicU64,
    queue_acks: AtomicU64,
    queue_retries: AtomicU64,
    do_requests: AtomicU64,
    do_ws_messages: AtomicU64,
    do_active_ms: AtomicU64,
    do_rows_read: AtomicU64,
    do_rows_written: AtomicU64,
}

impl OpCounters {
    pub const fn new() -> Self {
        Self {
            kv_reads: AtomicU64::new(0),
            kv_writes: AtomicU64::new(0),
            kv_deletes: AtomicU64::new(0),
            kv_lists: AtomicU64::new(0),
            queue_sends: AtomicU64::new(0),
            queue_acks: AtomicU64::new(0),
            queue_retries: AtomicU64::new(0),
            do_requests: AtomicU64::new(0),
            do_ws_messages: AtomicU64::new(0),
            do_active_ms: AtomicU64::new(0),
            do_rows_read: AtomicU64::new(0),
            do_rows_written: AtomicU64::new(0),
        }
    }

    pub fn snapshot(&self) -> OpCounts {
        OpCounts {
            kv_reads: self.kv_reads.load(Relaxed),
            kv_writes: self.kv_writes.load(Relaxed),
            kv_deletes: self.kv_deletes.load(Relaxed),
            kv_lists: self.kv_lists.load(Relaxed),
            queue_sends: self.queue_sends.load(Relaxed),
            queue_acks: self.queue_acks.load(Relaxed),
            queue_retries: self.queue_retries.load(Relaxed),
            do_requests: self.do_requests.load(Relaxed),
            do_ws_messages: self.do_ws_messages.load(Relaxed),
            do_active_ms: self.do_active_ms.load(Relaxed),
            do_rows_read: self.do_rows_read.load(Relaxed),
            do_rows_written: self.do_rows_written.load(Relaxed),
        }
    }

    pub fn count_acks(&self, acks: u64, retries: u64) {
        self.queue_acks.fetch_add(acks, Relaxed);
        self.queue_retries.fetch_add(retries, Relaxed);
    }

    /// A Durable Object request (stub call, alarm, WebSocket connect) served.
    pub fn count_do_request(&self) {
        self.do_requests.fetch_add(1, Relaxed);
    }

    /// A WebSocket message a Durable Object woke for.
    pub fn count_do_ws_message(&self) {
        self.do_ws_messages.fetch_add(1, Relaxed);
    }

    /// Time some Durable Object was active (had an event in progress).
    pub fn count_do_active_ms(&self, ms: u64) {
        self.do_active_ms.fetch_add(ms, Relaxed);
    }

    /// SQLite rows a Durable Object read and wrote.
    pub fn count_do_rows(&self, read: u64, written: u64) {
        self.do_rows_read.fetch_add(read, Relaxed);
        self.do_rows_written.fetch_add(written, Relaxed);
    }
}

/// A [`KvStore`] that counts what passes through it.
#[derive(Debug)]
pub struct CountingKv<'c, K> {
    inner: K,
    counters: &'c OpCounters,
}

impl<'c, K> CountingKv<'c, K> {
    pub fn new(inner: K, counters: &'c OpCounters) -> Self {
        Self { inner, counters }
    }
}

impl<K: KvStore> KvStore for CountingKv<'_, K> {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.counters.kv_reads.fetch_add(1, Relaxed);
        self.inner.get(key).await
    }

    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError> {
        self.counters.kv_reads.fetch_add(1, Relaxed);
        self.inner.get_with_metadata(key).await
    }

    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError> {
        self.counters.kv_writes.fetch_add(1, Relaxed);
        self.inner.put(key, value, metadata).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.counters.kv_deletes.fetch_add(1, Relaxed);
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError> {
        self.counters.kv_lists.fetch_add(1, Relaxed);
        self.inner.list(prefix, limit, cursor).await
    }
}

/// A [`TaskQueue`] that counts sends.
#[derive(Debug)]
pub struct CountingQueue<'c, Q> {
    inner: Q,
    counters: &'c OpCounters,
}

impl<'c, Q> CountingQueue<'c, Q> {
    pub fn new(inner: Q, counters: &'c OpCounters) -> Self {
        Self { inner, counters }
    }
}

impl<Q: TaskQueue> TaskQueue for CountingQueue<'_, Q> {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError> {
        self.counters.queue_sends.fetch_add(1, Relaxed);
        self.inner.send(message).await
    }
}
