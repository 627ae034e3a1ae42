//! Filtered, paginated listings over KV prefixes, bounded per request.
//!
//! Filters are applied to listing metadata, so a page costs KV list operations only (one per
//! 1,000 keys), never a read per key. A filter that matches little would otherwise walk the
//! whole prefix in one invocation, so a request examines at most [`SCAN_KEYS_MAX`] keys: when
//! the budget runs out before `limit` keys matched, the page is answered as it is, marked
//! `partial`, with a cursor where the scan stopped.
//!
//! A page can end in the middle of a KV page, and KV cursors only point at page boundaries,
//! so a position is a KV cursor plus how many keys of that KV page were already taken
//! (the same scheme as the sweep's state). It travels signed (see [`crate::auth::sign_cursor`]).

use crate::{AppError, KvKey, KvStore};

/// Keys one request may examine: five KV list operations, and a few milliseconds of CPU
/// decoding metadata.
pub(crate) const SCAN_KEYS_MAX: usize = 5_000;
/// KV's largest page.
const KV_PAGE_MAX: usize = 1_000;
/// Marks a position with a skip count; a bare KV cursor (as issued before filters existed)
/// is read as a position with nothing to skip.
const POSITION_TAG: &str = "p1:";

/// Where a listing continues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// The KV cursor of the KV page to list; `None` for the first.
    pub(crate) kv_cursor: Option<String>,
    /// Keys of that KV page already returned or examined.
    pub(crate) skip: usize,
}

impl Position {
    /// The text that is signed into a client cursor.
    pub(crate) fn encode(&self) -> String {
        format!("{POSITION_TAG}{}:{}", self.skip, self.kv_cursor.as_deref().unwrap_or(""))
    }

    /// Reads [`encode`](Self::encode)'s text, or a bare KV cursor.
    pub(crate) fn decode(text: &str) -> Self {
        let parsed = text.strip_prefix(POSITION_TAG).and_then(|rest| {
            let (skip, kv) = rest.split_once(':')?;
            Some(Self { kv_cursor: (!kv.is_empty()).then(|| kv.to_owned()), skip: skip.parse().ok()? })
        });
        parsed.unwrap_or_else(|| Self { kv_cursor: Some(text.to_owned()), skip: 0 })
    }
}

/// One page of a filtered listing.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) matched: Vec<KvKey>,
    /// Where the next page starts; `None` when the listing is complete.
    pub(crate) next: Option<Position>,
    /// The scan budget ran out before `limit` keys matched.
    pub(crate) partial: bool,
    pub(crate) scanned: usize,
}

/// Lists keys under `prefix` from `from`, keeping those `keep` accepts, until `limit` matched,
/// the prefix ends or [`SCAN_KEYS_MAX`] keys were examined. Without a filter (`filtered`
/// false) a KV page of exactly what is needed is listed, so the unfiltered list costs what it
/// always did.
pub(crate) async fn scan<K: KvStore>(
    kv: &K,
    prefix: &str,
    from: Position,
    limit: usize,
    filtered: bool,
    keep: impl Fn(&KvKey) -> bool,
) -> Result<Scan, AppError> {
    let mut scan = Scan::default();
    let mut at = from;
    let mut lists = 0;
    loop {
        lists += 1;
        let page_size = if filtered { KV_PAGE_MAX } else { (limit - scan.matched.len() + at.skip).min(KV_PAGE_MAX) };
        let page = kv.list(prefix, page_size, at.kv_cursor.as_deref()).await?;
        let more = !page.list_complete && page.cursor.is_some();
        let len = page.keys.len();
        for (index, key) in page.keys.into_iter().enumerate().skip(at.skip) {
            scan.scanned += 1;
            if keep(&key) {
                scan.matched.push(key);
            }
            if scan.matched.len() == limit {
                scan.next = if index + 1 < len {
                    Some(Position { kv_cursor: at.kv_cursor.clone(), skip: index + 1 })
                } else if more {
                    Some(Position { kv_cursor: page.cursor.clone(), skip: 0 })
                } else {
                    None
                };
                return Ok(scan);
            }
        }
        if !more {
            return Ok(scan);
        }
        at = Position { kv_cursor: page.cursor, skip: 0 };
        // KV may answer short (even empty) pages before the end: count list calls as well.
        if scan.scanned >= SCAN_KEYS_MAX || lists > SCAN_KEYS_MAX / KV_PAGE_MAX {
            scan.partial = true;
            scan.next = Some(at);
            return Ok(scan);
        }
    }
}

/// Validates a list's `limit` query parameter: 1 to `max`, `default` when absent.
pub(crate) fn limit_param(raw: Option<&str>, default: usize, max: usize) -> Result<usize, AppError> {
    match raw {
        None => Ok(default),
        Some(raw) => raw.parse::<usize>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            AppError::invalid_field(vm_task_types::FieldError::new(
                "limit",
                format!("must be an integer from 1 to {max}, got {raw:?}"),
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    use crate::memory::MemoryKv;

    #[test]
    fn positions_round_trip_and_bare_kv_cursors_are_read() {
        let p = Position { kv_cursor: Some("task:00ab:x".into()), skip: 17 };
        assert_eq!(Position::decode(&p.encode()), p);
        let first = Position { kv_cursor: None, skip: 3 };
        assert_eq!(Position::decode(&first.encode()), first);
        assert_eq!(Position::decode("opaque-kv"), Position { kv_cursor: Some("opaque-kv".into()), skip: 0 });
    }

    async fn filled(n: usize) -> MemoryKv {
        let kv = MemoryKv::new();
        for i in 0..n {
            let meta = serde_json::json!({ "even": i % 2 == 0 });
            kv.put(&format!("k:{i:06}"), "", Some(&meta)).await.unwrap();
        }
        kv
    }

    fn even(key: &KvKey) -> bool {
        key.metadata.as_ref().and_then(|m| m["even"].as_bool()) == Some(true)
    }

    #[test]
    fn pages_resume_mid_page_without_repeating_or_losing_keys() {
        let kv = block_on(filled(2_500));
        let mut seen = Vec::new();
        let mut at = Position::default();
        loop {
            let page = block_on(scan(&kv, "k:", at, 7, true, even)).unwrap();
            assert!(page.matched.len() <= 7);
            seen.extend(page.matched.into_iter().map(|k| k.name));
            match page.next {
                Some(next) => at = Position::decode(&next.encode()),
                None => break,
            }
        }
        let expected: Vec<String> = (0..2_500).filter(|i| i % 2 == 0).map(|i| format!("k:{i:06}")).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_filter_matching_nothing_stops_at_the_budget_and_says_so() {
        let kv = block_on(filled(12_000));
        let nothing = |_: &KvKey| false;
        let first = block_on(scan(&kv, "k:", Position::default(), 50, true, nothing)).unwrap();
        assert!(first.partial);
        assert!(first.matched.is_empty());
        assert_eq!(first.scanned, SCAN_KEYS_MAX);
        let second = block_on(scan(&kv, "k:", first.next.unwrap(), 50, true, nothing)).unwrap();
        assert_eq!(second.scanned, SCAN_KEYS_MAX);
        let third = block_on(scan(&kv, "k:", second.next.unwrap(), 50, true, nothing)).unwrap();
        assert_eq!(third.scanned, 2_000);
        assert!(!third.partial && third.next.is_none(), "the end of the listing is complete, not partial");
    }

    #[test]
    fn unfiltered_pages_list_exactly_the_limit() {
        let kv = block_on(filled(30));
        let page = block_on(scan(&kv, "k:", Position::default(), 10, false, |_| true)).unwrap();
        assert_eq!(page.matched.len(), 10);
        assert_eq!(page.scanned, 10);
        assert_eq!(page.next.as_ref().map(|p| p.skip), Some(0), "the page ended on a KV page boundary");
    }
}
