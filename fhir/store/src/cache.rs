//! A node-local cache of resource JSON for PostgreSQL reads, keyed by row id and checked
//! against the version the database reports on every read.
//!
//! A stored version's content never changes: an update writes a new version (`version + 1`)
//! and a row id is never reused (contained resources get new rows when their container
//! changes). So a read sends PostgreSQL the version it holds for each rid and gets the content
//! back only where the row has moved on ([`BY_RIDS_SQL`]); a search's page and its included
//! resources are listed as `rid, version` and only the versions not held are fetched, while
//! the cache holds nine in ten of them ([`ResourceCache::listed_by_version`]). Every node checks
//! each read against the database, so nodes never serve each other's stale content, and no
//! invalidation crosses the network.
//!
//! Why: on PostgreSQL the bytes of the JSON dominate the larger reads. A page of 10 Patients
//! with their 1,337 reverse-included Observations (1.27 MB) took 6.1 ms in PostgreSQL with the
//! content and 2.7 ms with `rid, version` only (pgbench, one client), and Kiln spent about as
//! much again receiving it. SQLite reads its pages in process and is not cached here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

/// The content of one version of a resource.
#[derive(Clone)]
pub(crate) struct Cached {
    pub version: i64,
    pub content: Arc<str>,
}

/// Weighs an entry by its JSON bytes plus the entry's own overhead.
#[derive(Clone)]
struct Bytes;

impl Weighter<i64, Cached> for Bytes {
    fn weight(&self, _: &i64, v: &Cached) -> u64 {
        v.content.len() as u64 + ENTRY_OVERHEAD
    }
}

/// Bytes counted per entry beyond its JSON: the key, version, `Arc` header and the cache's
/// own slot.
const ENTRY_OVERHEAD: u64 = 64;

/// Resources by row id. Disabled (every lookup a miss, nothing kept) when made with 0 bytes.
pub struct ResourceCache {
    cache: Option<Cache<i64, Cached, Bytes>>,
    /// Listed rows (a page's matches, its included resources) whose version was held, of
    /// `listed_lookups`, halved now and then: the
    /// recent hit rate ([`ResourceCache::listed_by_version`]).
    listed_hits: AtomicU64,
    listed_lookups: AtomicU64,
}

/// Lookups after which the listed-rows counters are halved (recent pages weigh most).
const LISTED_WINDOW: u64 = 1 << 16;

/// The statement of [`crate::ReadConn`]'s reads by rid on PostgreSQL: `$1` the rids, `$2` the
/// version held for each (0: none; versions start at 1). The content comes back NULL where
/// the version held is current. Rows in rid order.
pub(crate) const BY_RIDS_SQL: &str =
    "SELECT r.rid, r.res_type, r.res_id, r.version, r.last_updated, r.deleted, \
     CASE WHEN r.version = h.version THEN NULL ELSE r.content END \
     FROM unnest($1::int8[], $2::int8[]) AS h(rid, version) JOIN resources r ON r.rid = h.rid \
     WHERE r.deleted <> 1 ORDER BY r.rid";

impl ResourceCache {
    pub(crate) fn new(bytes: u64) -> ResourceCache {
        ResourceCache {
            cache: (bytes > 0).then(|| {
                // about 1 KB per resource (Synthea's Observations ~0.9 KB, Patients ~2.7 KB)
                let items = (bytes / 1024).clamp(16, 10_000_000) as usize;
                Cache::with_weighter(items, bytes, Bytes)
            }),
            listed_hits: AtomicU64::new(0),
            listed_lookups: AtomicU64::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// Whether a page's matches and included rows are best listed as `rid, version` (JSON from the cache,
    /// the versions not held fetched by rid in a second statement) rather than with their
    /// JSON: when at least 90 % of the recent listed rows were held. A cold or too small
    /// cache reads the JSON in the one statement, as without a cache (measured: with every
    /// row a miss, the two statements cost the mix 22 %).
    pub(crate) fn listed_by_version(&self) -> bool {
        let lookups = self.listed_lookups.load(Ordering::Relaxed);
        let hits = self.listed_hits.load(Ordering::Relaxed);
        self.enabled() && lookups >= 64 && hits * 10 >= lookups * 9
    }

    /// Counts `hits` of `lookups` listed rows whose version was held.
    pub(crate) fn note_listed(&self, hits: u64, lookups: u64) {
        self.listed_hits.fetch_add(hits, Ordering::Relaxed);
        let total = self.listed_lookups.fetch_add(lookups, Ordering::Relaxed) + lookups;
        if total > LISTED_WINDOW {
            // racy halving is fine: the rate is a hint
            let h = self.listed_hits.load(Ordering::Relaxed);
            self.listed_hits.store(h / 2, Ordering::Relaxed);
            self.listed_lookups.store(total / 2, Ordering::Relaxed);
        }
    }

    /// The content held for `rid`, whatever its version.
    pub(crate) fn get(&self, rid: i64) -> Option<Cached> {
        self.cache.as_ref()?.get(&rid)
    }

    /// The content held for version `version` of `rid`.
    pub(crate) fn get_version(&self, rid: i64, version: i64) -> Option<Arc<str>> {
        self.get(rid)
            .filter(|c| c.version == version)
            .map(|c| c.content)
    }

    /// Keeps `content` as version `version` of `rid` (a copy; nothing when disabled). An
    /// older version held for the rid is replaced.
    pub(crate) fn keep(&self, rid: i64, version: i64, content: &str) {
        if let Some(c) = &self.cache {
            c.insert(
                rid,
                Cached {
                    version,
                    content: Arc::from(content),
                },
            );
        }
    }

    /// The versions held for `rids`, 0 where none is (the `$2` of [`BY_RIDS_SQL`]), and the
    /// entries themselves: held until the rows are read, so an eviction in between cannot lose
    /// a content the database was told not to send.
    pub(crate) fn held(&self, rids: &[i64]) -> (Vec<i64>, Vec<Option<Cached>>) {
        let held: Vec<Option<Cached>> = rids.iter().map(|r| self.get(*r)).collect();
        let versions = held
            .iter()
            .map(|h| h.as_ref().map_or(0, |h| h.version))
            .collect();
        (versions, held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_version_and_evicts_by_bytes() {
        let c = ResourceCache::new(64 * 1024);
        assert!(c.get(1).is_none());
        c.keep(1, 1, "{\"v\":1}");
        c.keep(1, 2, "{\"v\":2}");
        let e = c.get(1).expect("held");
        assert_eq!((e.version, &*e.content), (2, "{\"v\":2}"));
        assert!(c.get_version(1, 1).is_none());
        assert_eq!(c.get_version(1, 2).as_deref(), Some("{\"v\":2}"));
        let (versions, held) = c.held(&[1, 7]);
        assert_eq!(versions, vec![2, 0]);
        assert!(held[0].is_some() && held[1].is_none());
        // 64 KB hold fewer than 200 entries of 1 KB
        let big = "x".repeat(1000);
        for rid in 100..300 {
            c.keep(rid, 1, &big);
        }
        let kept = (100..300).filter(|r| c.get(*r).is_some()).count();
        assert!(kept > 0 && kept < 200, "{kept} of 200 kept in 64 KB");
    }

    #[test]
    fn disabled_holds_nothing() {
        let c = ResourceCache::new(0);
        c.keep(1, 1, "{}");
        assert!(c.get(1).is_none());
        assert_eq!(c.held(&[1]).0, vec![0]);
        c.note_listed(1000, 1000);
        assert!(!c.listed_by_version(), "nothing held: read the JSON");
    }

    #[test]
    fn listed_rows_by_version_once_nine_in_ten_are_held() {
        let c = ResourceCache::new(1 << 20);
        assert!(!c.listed_by_version(), "cold: read the JSON");
        c.note_listed(0, 1000);
        c.note_listed(1000, 1000);
        assert!(!c.listed_by_version(), "50 % held");
        for _ in 0..8 {
            c.note_listed(1000, 1000);
        }
        assert!(c.listed_by_version(), "9,000 of 10,000 held");
        // a working set larger than the cache: misses bring it back to the JSON
        for _ in 0..100 {
            c.note_listed(500, 1000);
        }
        assert!(!c.listed_by_version(), "half held lately");
        assert!(c.listed_lookups.load(Ordering::Relaxed) <= LISTED_WINDOW + 1000);
    }
}
