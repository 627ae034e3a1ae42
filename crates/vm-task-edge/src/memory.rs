//! In-memory ports: a KV store with metadata and cursors, a recording queue, a manual clock
//! and deterministic ids. Used by this crate's tests and by anything that hosts the edge
//! logic natively.
//!
//! The KV store can enforce Workers KV's production limits ([`Invocation`]): one write per
//! second per key (by the injected clock; a second write fails like production's 429) and
//! 1,000 operations per invocation. The native tests run with them on, so code that would
//! trip them in production fails here first.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use vm_task_types::Timestamp;

use crate::{Clock, Ids, KvKey, KvPage, KvStore, QueueMessage, StoreError, TaskQueue};

type Entries = BTreeMap<String, (String, Option<Value>)>;

/// Operations a worker invocation may make on KV, across every namespace it binds.
pub const MAX_OPS_PER_INVOCATION: u64 = 1_000;
/// Shortest gap between two writes to one key.
pub const KEY_WRITE_GAP_MS: u64 = 1_000;

/// One worker invocation's share of the production limits: its operation count, and the
/// clock that times writes. Shared by the namespaces of one test edge; [`begin`](Self::begin)
/// starts a new invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    clock: ManualClock,
    ops: Arc<AtomicU64>,
}

impl Invocation {
    pub fn new(clock: &ManualClock) -> Self {
        Self { clock: clock.clone(), ops: Arc::new(AtomicU64::new(0)) }
    }

    /// A new invocation: the operation count starts again.
    pub fn begin(&self) {
        self.ops.store(0, SeqCst);
    }

    /// Operations made so far in this invocation.
    pub fn ops(&self) -> u64 {
        self.ops.load(SeqCst)
    }
}

/// A KV namespace in memory. Clones share the data.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    entries: Arc<Mutex<Entries>>,
    fail_writes: Arc<AtomicBool>,
    fail_prefix: Arc<Mutex<Option<String>>>,
    limits: Option<Invocation>,
    interleave: Arc<AtomicBool>,
    /// When each key was last written, for the one-write-per-second rule.
    last_write: Arc<Mutex<HashMap<String, u64>>>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// A namespace with the production limits of [`Invocation`].
    pub fn with_production_limits(invocation: &Invocation) -> Self {
        Self { limits: Some(invocation.clone()), ..Self::default() }
    }

    /// Makes every later put fail (until turned off), to test error paths.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, SeqCst);
    }

    /// Makes every later put or delete of a key starting with `prefix` fail (`None`: stop).
    pub fn fail_writes_to(&self, prefix: Option<&str>) {
        *self.fail_prefix.lock().unwrap_or_else(|p| p.into_inner()) = prefix.map(str::to_owned);
    }

    /// Makes every operation yield to the executor once before it runs, so futures joined
    /// together interleave operation by operation (races, deterministically).
    pub fn interleave(&self, on: bool) {
        self.interleave.store(on, SeqCst);
    }

    async fn step(&self) {
        if self.interleave.load(SeqCst) {
            YieldOnce(false).await;
        }
    }

    /// Counts one operation against the invocation's budget.
    fn count(&self, what: &str, key: &str) -> Result<(), StoreError> {
        let Some(limits) = &self.limits else { return Ok(()) };
        if limits.ops.fetch_add(1, SeqCst) + 1 > MAX_OPS_PER_INVOCATION {
            return Err(StoreError::other(format!(
                "KV {what} {key} failed: Too many API requests by single worker invocation (over {MAX_OPS_PER_INVOCATION})"
            )));
        }
        Ok(())
    }

    /// Applies the write rules: injected failures, then one write per second per key.
    fn admit_write(&self, what: &str, key: &str) -> Result<(), StoreError> {
        self.count(what, key)?;
        if self.fail_writes.load(SeqCst) && what == "PUT" {
            return Err(StoreError::other(format!("injected write failure for {key}")));
        }
        if let Some(prefix) = self.fail_prefix.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
            if key.starts_with(prefix) {
                return Err(StoreError::other(format!("injected write failure for {key}")));
            }
        }
        let Some(limits) = &self.limits else { return Ok(()) };
        let now = limits.clock.now_ms();
        let mut last = self.last_write.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&at) = last.get(key) {
            if now < at + KEY_WRITE_GAP_MS {
                return Err(StoreError::rate_limited(format!("KV {what} {key} failed: 429 Too Many Requests")));
            }
        }
        last.insert(key.to_owned(), now);
        Ok(())
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
        self.step().await;
        self.count("GET", key)?;
        Ok(self.lock().get(key).map(|(v, _)| v.clone()))
    }

    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError> {
        self.step().await;
        self.count("GET", key)?;
        Ok(self.lock().get(key).cloned())
    }

    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError> {
        self.step().await;
        self.admit_write("PUT", key)?;
        self.lock().insert(key.to_owned(), (value.to_owned(), metadata.cloned()));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.step().await;
        self.admit_write("DELETE", key)?;
        self.lock().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError> {
        self.step().await;
        self.count("LIST", prefix)?;
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
            return Err(StoreError::other("injected queue failure"));
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
        // Let whatever runs beside the sleeper go on, as a real sleep would.
        YieldOnce(false).await;
    }
}

/// Returns `Pending` once (waking itself at once), then `Ready`.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
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

/// A webhook queue that records what was sent and with which delay. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct MemoryWebhookQueue {
    sent: Arc<Mutex<Vec<(crate::webhooks::WebhookMessage, u32)>>>,
    fail: Arc<AtomicBool>,
}

impl MemoryWebhookQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes every message sent so far, with its delay in seconds.
    pub fn drain(&self) -> Vec<(crate::webhooks::WebhookMessage, u32)> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn fail_sends(&self, fail: bool) {
        self.fail.store(fail, SeqCst);
    }
}

impl crate::webhooks::WebhookQueue for MemoryWebhookQueue {
    async fn send(&self, message: &crate::webhooks::WebhookMessage, delay_secs: u32) -> Result<(), StoreError> {
        if self.fail.load(SeqCst) {
            return Err(StoreError::other("injected webhook queue failure"));
        }
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).push((message.clone(), delay_secs));
        Ok(())
    }
}

/// One POST a [`ScriptedFetch`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPost {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ReceivedPost {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A receiver that answers each POST with the next scripted outcome (200 once the script is
/// used up) and records what it received. Clones share both.
#[derive(Debug, Clone, Default)]
pub struct ScriptedFetch {
    script: Arc<Mutex<std::collections::VecDeque<crate::webhooks::FetchOutcome>>>,
    received: Arc<Mutex<Vec<ReceivedPost>>>,
}

impl ScriptedFetch {
    pub fn answering(outcomes: impl IntoIterator<Item = crate::webhooks::FetchOutcome>) -> Self {
        Self { script: Arc::new(Mutex::new(outcomes.into_iter().collect())), received: Arc::default() }
    }

    pub fn received(&self) -> Vec<ReceivedPost> {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl crate::webhooks::WebhookFetch for ScriptedFetch {
    async fn post(&self, url: &str, headers: &[(String, String)], body: &[u8]) -> crate::webhooks::FetchOutcome {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).push(ReceivedPost {
            url: url.to_owned(),
            headers: headers.to_vec(),
            body: body.to_vec(),
        });
        let next = self.script.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        next.unwrap_or(crate::webhooks::FetchOutcome::Status(200))
    }
}
