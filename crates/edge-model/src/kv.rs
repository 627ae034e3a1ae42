//! Workers KV as production behaves, not as `wrangler dev` does: several locations, each with
//! its own read cache, over one central store.
//!
//! Each rule cites the Cloudflare documentation it models:
//!
//! - **Writes are visible at once where they were made, later elsewhere.** "How KV works"
//!   (<https://developers.cloudflare.com/kv/concepts/how-kv-works/>): changes are usually
//!   immediately visible at the location that made them and may take 60 seconds or more to be
//!   visible at other locations, as their cached versions time out. Modelled as: a write
//!   reaches the central store at once and other locations after a propagation delay
//!   ([`KvConfig::propagation_ms`]); the writer's own cache holds the new value at once.
//! - **Reads are cached per location, missing keys included, for `cacheTtl`.** Glossary
//!   (<https://developers.cloudflare.com/kv/glossary/>): `cacheTtl` is how long a KV result is
//!   cached at the location it was read from (default 60 s, minimum 30 s per "Limits"). A read
//!   that finds nothing caches the absence too (a negative entry), so a key created elsewhere
//!   can stay invisible for the TTL.
//! - **Last write wins.** "How KV works": concurrent writes to one key are resolved by time,
//!   the last one wins; there is no compare-and-swap. Each write carries its location's clock
//!   (which may be a few ms off, [`KvConfig::clock_skew_ms`]) and the highest stamp wins.
//! - **Lists lag.** "List keys" (<https://developers.cloudflare.com/kv/api/list-keys/>): list
//!   results are eventually consistent like reads; a key written recently may be missing from
//!   a listing, and a deleted one may still be there ([`KvConfig::list_lag_ms`]).
//! - **One write per second per key.** "Limits" (<https://developers.cloudflare.com/kv/platform/limits/>):
//!   "Writes to same key: 1 per second"; more fail with 429 Too Many Requests. Deletes are
//!   writes.
//! - **1,000 operations per invocation.** "Limits": a Worker invocation may make up to 1,000
//!   operations to external services; the rest fail. [`Invocation`] counts them across both
//!   namespaces.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::Value;
use vm_task_edge::{Clock, KvKey, KvPage, KvStore, StoreError};
use vm_task_types::Timestamp;

use crate::rng::Rng;

/// A location of Cloudflare's network, by index.
pub type Location = usize;

type Entry = Option<(String, Option<Value>)>;

/// Production limits and delays; [`KvConfig::production`] is what Cloudflare documents.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// `cacheTtl`: how long a location serves a value (or an absence) it read.
    pub cache_ttl_ms: u64,
    /// Central store to another location: uniform in this range.
    pub propagation_ms: (u64, u64),
    /// Extra delay before a change shows in listings: uniform in this range.
    pub list_lag_ms: (u64, u64),
    /// Minimum gap between two writes of one key.
    pub min_write_gap_ms: u64,
    /// Operations one invocation may make.
    pub ops_per_invocation: u32,
    /// Each location's clock is off by up to this much; the stamps of last-write-wins use it.
    pub clock_skew_ms: u64,
}

impl KvConfig {
    pub fn production() -> Self {
        Self {
            cache_ttl_ms: 60_000,
            propagation_ms: (50, 2_000),
            list_lag_ms: (0, 10_000),
            min_write_gap_ms: 1_000,
            ops_per_invocation: 1_000,
            clock_skew_ms: 20,
        }
    }

    /// Strongly consistent (no cache, no propagation delay, no list lag, one clock) but with
    /// production's limits.
    pub fn consistent() -> Self {
        Self { cache_ttl_ms: 0, propagation_ms: (0, 0), list_lag_ms: (0, 0), clock_skew_ms: 0, ..Self::production() }
    }
}

/// One committed write (or delete) of a key.
#[derive(Debug, Clone)]
struct Version {
    /// Last-write-wins order: the writer's clock, then commit order.
    stamp: (u64, u64),
    origin: Location,
    /// When other locations' reads can see it.
    visible_at: u64,
    /// When listings anywhere show it.
    listed_at: u64,
    value: Entry,
}

/// A cached read at one location.
#[derive(Debug, Clone)]
struct Cached {
    value: Entry,
    expires_at: u64,
}

/// A write as it reached the central store, for the invariant checks.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub at: u64,
    pub stamp: (u64, u64),
    pub location: Location,
    pub key: String,
    pub value: Option<String>,
}

/// One KV namespace across all locations. Clones share it.
#[derive(Debug, Clone)]
pub struct KvModel {
    inner: Rc<RefCell<Inner>>,
}

#[derive(Debug)]
struct Inner {
    name: &'static str,
    config: KvConfig,
    rng: Rng,
    skew: Vec<u64>,
    versions: BTreeMap<String, Vec<Version>>,
    last_write_at: BTreeMap<String, u64>,
    caches: Vec<BTreeMap<String, Cached>>,
    log: Vec<WriteRecord>,
    commits: u64,
}

impl KvModel {
    pub fn new(name: &'static str, locations: usize, config: KvConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let skew = (0..locations).map(|_| rng.range(0, config.clock_skew_ms)).collect();
        Self {
            inner: Rc::new(RefCell::new(Inner {
                name,
                config,
                rng,
                skew,
                versions: BTreeMap::new(),
                last_write_at: BTreeMap::new(),
                caches: vec![BTreeMap::new(); locations],
                log: Vec::new(),
                commits: 0,
            })),
        }
    }

    /// This namespace as one invocation at `location` sees it.
    pub fn at(&self, invocation: &Invocation) -> SimKv {
        SimKv { model: self.clone(), invocation: invocation.clone() }
    }

    /// The value last-write-wins has settled on, ignoring caches: the truth, for checks.
    pub fn central(&self, key: &str) -> Option<String> {
        let inner = self.inner.borrow();
        inner.versions.get(key).and_then(|vs| latest(vs.iter()).and_then(|v| v.value.clone())).map(|(v, _)| v)
    }

    /// Every key with a value in the central store, with its value.
    pub fn central_entries(&self, prefix: &str) -> Vec<(String, String)> {
        let inner = self.inner.borrow();
        inner
            .versions
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, vs)| latest(vs.iter()).and_then(|v| v.value.clone()).map(|(v, _)| (k.clone(), v)))
            .collect()
    }

    /// The key with this prefix and suffix, if any was ever written (finds a task's record by
    /// its id without computing the edge's key layout).
    pub fn find_key(&self, prefix: &str, suffix: &str) -> Option<String> {
        let inner = self.inner.borrow();
        inner
            .versions
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k)
            .find(|k| k.ends_with(suffix))
            .cloned()
    }

    /// Every write that reached the central store, in commit order.
    pub fn write_log(&self) -> Vec<WriteRecord> {
        self.inner.borrow().log.clone()
    }

    pub fn name(&self) -> &'static str {
        self.inner.borrow().name
    }

    fn read(&self, inv: &Invocation, key: &str) -> Entry {
        let now = inv.now();
        let loc = inv.location;
        let mut inner = self.inner.borrow_mut();
        if let Some(cached) = inner.caches[loc].get(key) {
            if cached.expires_at > now {
                return cached.value.clone();
            }
        }
        let value = inner
            .versions
            .get(key)
            .and_then(|vs| latest(vs.iter().filter(|v| v.origin == loc || v.visible_at <= now)))
            .and_then(|v| v.value.clone());
        let ttl = inner.config.cache_ttl_ms;
        if ttl > 0 {
            inner.caches[loc].insert(key.to_owned(), Cached { value: value.clone(), expires_at: now + ttl });
        }
        value
    }

    fn write(&self, inv: &Invocation, key: &str, value: Entry) -> Result<(), StoreError> {
        let now = inv.now();
        let loc = inv.location;
        let mut inner = self.inner.borrow_mut();
        let gap = inner.config.min_write_gap_ms;
        if let Some(&last) = inner.last_write_at.get(key) {
            if now < last + gap {
                return Err(StoreError::rate_limited(format!(
                    "KV {} 429 Too Many Requests: {key} was written {} ms ago (1 write per second per key)",
                    inner.name,
                    now.saturating_sub(last)
                )));
            }
        }
        inner.last_write_at.insert(key.to_owned(), now);
        inner.commits += 1;
        let stamp = (now + inner.skew[loc], inner.commits);
        let (lo, hi) = inner.config.propagation_ms;
        let visible_at = now + inner.rng.range(lo, hi);
        let (lo, hi) = inner.config.list_lag_ms;
        let listed_at = now + inner.rng.range(lo, hi);
        let record = WriteRecord {
            at: now,
            stamp,
            location: loc,
            key: key.to_owned(),
            value: value.as_ref().map(|(v, _)| v.clone()),
        };
        inner.log.push(record);
        inner.versions.entry(key.to_owned()).or_default().push(Version {
            stamp,
            origin: loc,
            visible_at,
            listed_at,
            value: value.clone(),
        });
        let ttl = inner.config.cache_ttl_ms;
        if ttl > 0 {
            // Visible at once where it was written, unless a later-stamped write already won.
            let winner = latest(inner.versions[key].iter().filter(|v| v.origin == loc || v.visible_at <= now))
                .map(|v| v.value.clone())
                .unwrap_or(value);
            inner.caches[loc].insert(key.to_owned(), Cached { value: winner, expires_at: now + ttl });
        }
        Ok(())
    }

    fn list(&self, inv: &Invocation, prefix: &str, limit: usize, cursor: Option<&str>) -> KvPage {
        let now = inv.now();
        let inner = self.inner.borrow();
        let start = cursor.unwrap_or(prefix).to_owned();
        let mut keys = Vec::new();
        let mut more = false;
        for (name, versions) in inner.versions.range(start..) {
            if !name.starts_with(prefix) {
                break;
            }
            if Some(name.as_str()) == cursor {
                continue;
            }
            let Some((_, metadata)) =
                latest(versions.iter().filter(|v| v.listed_at <= now)).and_then(|v| v.value.clone())
            else {
                continue;
            };
            if keys.len() == limit {
                more = true;
                break;
            }
            keys.push(KvKey { name: name.clone(), metadata });
        }
        let cursor = if more { keys.last().map(|k| k.name.clone()) } else { None };
        KvPage { keys, cursor, list_complete: !more }
    }
}

fn latest<'a>(versions: impl Iterator<Item = &'a Version>) -> Option<&'a Version> {
    versions.max_by_key(|v| v.stamp)
}

/// One Worker invocation: where it runs, its clock, and the KV operations it has made.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub location: Location,
    now: Rc<Cell<u64>>,
    ops: Rc<Cell<u32>>,
    max_ops: u32,
}

impl Invocation {
    pub fn new(location: Location, now_ms: u64, max_ops: u32) -> Self {
        Self { location, now: Rc::new(Cell::new(now_ms)), ops: Rc::new(Cell::new(0)), max_ops }
    }

    pub fn now(&self) -> u64 {
        self.now.get()
    }

    pub fn ops(&self) -> u32 {
        self.ops.get()
    }

    fn count(&self) -> Result<(), StoreError> {
        let n = self.ops.get() + 1;
        self.ops.set(n);
        if n > self.max_ops {
            return Err(StoreError::other(format!(
                "too many KV operations in one invocation: this is operation {n}, the limit is {}",
                self.max_ops
            )));
        }
        Ok(())
    }

    /// The invocation's clock: sleeping moves only this invocation's time, so a handler that
    /// waits still finishes within one simulation step.
    pub fn clock(&self) -> InvocationClock {
        InvocationClock { now: self.now.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct InvocationClock {
    now: Rc<Cell<u64>>,
}

impl Clock for InvocationClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.get())
    }

    async fn sleep_ms(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
}

/// A KV namespace binding inside one invocation.
#[derive(Debug, Clone)]
pub struct SimKv {
    model: KvModel,
    invocation: Invocation,
}

impl KvStore for SimKv {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.invocation.count()?;
        Ok(self.model.read(&self.invocation, key).map(|(v, _)| v))
    }

    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError> {
        self.invocation.count()?;
        Ok(self.model.read(&self.invocation, key))
    }

    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError> {
        self.invocation.count()?;
        self.model.write(&self.invocation, key, Some((value.to_owned(), metadata.cloned())))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.invocation.count()?;
        self.model.write(&self.invocation, key, None)
    }

    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError> {
        self.invocation.count()?;
        Ok(self.model.list(&self.invocation, prefix, limit, cursor))
    }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;

    use super::*;

    const A: Location = 0;
    const B: Location = 1;

    fn model() -> KvModel {
        let config = KvConfig { propagation_ms: (500, 500), list_lag_ms: (3_000, 3_000), ..KvConfig::production() };
        KvModel::new("TEST", 2, config, 1)
    }

    fn get(kv: &KvModel, loc: Location, at: u64, key: &str) -> Option<String> {
        block_on(kv.at(&Invocation::new(loc, at, 1000)).get(key)).unwrap()
    }

    fn put(kv: &KvModel, loc: Location, at: u64, key: &str, value: &str) -> Result<(), StoreError> {
        block_on(kv.at(&Invocation::new(loc, at, 1000)).put(key, value, None))
    }

    #[test]
    fn a_write_is_visible_at_once_where_made_and_after_propagation_elsewhere() {
        let kv = model();
        put(&kv, A, 10_000, "k", "v1").unwrap();
        assert_eq!(get(&kv, A, 10_000, "k").as_deref(), Some("v1"));
        // Not yet propagated to B.
        assert_eq!(get(&kv, B, 10_400, "k"), None);
        assert_eq!(kv.central("k").as_deref(), Some("v1"));
    }

    #[test]
    fn a_location_serves_its_cached_read_absence_included_for_the_ttl() {
        let kv = model();
        assert_eq!(get(&kv, B, 0, "k"), None); // negative entry at B until 60 s
        put(&kv, A, 1_000, "k", "v1").unwrap();
        assert_eq!(get(&kv, B, 59_999, "k"), None, "negative entry still cached");
        assert_eq!(get(&kv, B, 60_000, "k").as_deref(), Some("v1"), "cache expired: B reads the store");
        put(&kv, A, 70_000, "k", "v2").unwrap();
        assert_eq!(get(&kv, A, 70_001, "k").as_deref(), Some("v2"));
        assert_eq!(get(&kv, B, 119_999, "k").as_deref(), Some("v1"), "positive entry still cached");
        assert_eq!(get(&kv, B, 120_000, "k").as_deref(), Some("v2"));
    }

    #[test]
    fn last_write_wins_by_stamp() {
        let kv = model();
        put(&kv, A, 5_000, "k", "from-a").unwrap();
        // B has not seen A's write (its cache says nothing), writes later: B wins centrally.
        kv.inner.borrow_mut().last_write_at.clear();
        put(&kv, B, 5_100, "k", "from-b").unwrap();
        assert_eq!(kv.central("k").as_deref(), Some("from-b"));
        // A still sees its own write until its cache entry expires.
        assert_eq!(get(&kv, A, 5_200, "k").as_deref(), Some("from-a"));
        assert_eq!(get(&kv, A, 65_000, "k").as_deref(), Some("from-b"));
        let log = kv.write_log();
        assert_eq!(log.iter().map(|w| w.location).collect::<Vec<_>>(), vec![A, B]);
    }

    #[test]
    fn a_key_takes_one_write_per_second() {
        let kv = model();
        put(&kv, A, 1_000, "k", "1").unwrap();
        let err = put(&kv, B, 1_999, "k", "2").unwrap_err();
        assert!(err.message.contains("429"), "{err}");
        put(&kv, A, 1_999, "other", "x").unwrap();
        put(&kv, B, 2_000, "k", "2").unwrap();
        let del = block_on(kv.at(&Invocation::new(A, 2_500, 1000)).delete("k")).unwrap_err();
        assert!(del.message.contains("429"), "deletes are writes: {del}");
    }

    #[test]
    fn listings_lag_behind_writes_and_deletes() {
        let kv = model();
        put(&kv, A, 0, "ready:a", "").unwrap();
        let list = |at| {
            block_on(kv.at(&Invocation::new(A, at, 1000)).list("ready:", 10, None))
                .unwrap()
                .keys
                .into_iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
        };
        assert!(list(2_999).is_empty());
        assert_eq!(list(3_000), vec!["ready:a"]);
        block_on(kv.at(&Invocation::new(A, 5_000, 1000)).delete("ready:a")).unwrap();
        assert_eq!(list(7_999), vec!["ready:a"], "a deleted key lingers in listings");
        assert!(list(8_000).is_empty());
    }

    #[test]
    fn an_invocation_may_make_1000_operations() {
        let kv = model();
        let inv = Invocation::new(A, 0, 1000);
        let store = kv.at(&inv);
        for i in 0..1000 {
            block_on(store.get(&format!("k{i}"))).unwrap();
        }
        let err = block_on(store.get("one-more")).unwrap_err();
        assert!(err.message.contains("1001"), "{err}");
        // The count is per invocation, across namespaces.
        let other = model().at(&inv);
        assert!(block_on(other.put("x", "y", None)).is_err());
        assert!(block_on(kv.at(&Invocation::new(A, 0, 1000)).get("k")).is_ok());
    }
}
