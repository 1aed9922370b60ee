//! A node-local cache of resource JSON for PostgreSQL reads, keyed by row id and checked
//! against the version the database reports on every read.
//!
//! A stored version's content never changes: an update writes a new version (`version + 1`)
//! and a row id is never reused (contained resources get new rows when their container
//! changes). So a read sends PostgreSQL the version it holds for each rid and gets the content
//! back only where the row has moved on ([`BY_RIDS_SQL`]); a search's included resources are
//! read as `rid, version` first and only the versions not held are fetched. Every node checks
//! each read against the database, so nodes never serve each other's stale content, and no
//! invalidation crosses the network.
//!
//! Why: on PostgreSQL the bytes of the JSON dominate the larger reads. A page of 10 Patients
//! with their 1,369 reverse-included Observations (1.27 MB) took 6.1 ms in PostgreSQL with the
//! content and 2.7 ms with `rid, version` only (pgbench, one client), and Kiln spent about as
//! much again receiving it. SQLite reads its pages in process and is not cached here.

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
}

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
        }
    }

    /// The content held for `rid`, whatever its version.
    pub(crate) fn get(&self, rid: i64) -> Option<Cached> {
        self.cache.as_ref()?.get(&rid)
    }

    /// Keeps `content` as version `version` of `rid` and returns it shared.
    pub(crate) fn put(&self, rid: i64, version: i64, content: &str) -> Arc<str> {
        let content: Arc<str> = Arc::from(content);
        if let Some(c) = &self.cache {
            // an older version held for the rid is replaced
            c.insert(
                rid,
                Cached {
                    version,
                    content: content.clone(),
                },
            );
        }
        content
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
        c.put(1, 1, "{\"v\":1}");
        c.put(1, 2, "{\"v\":2}");
        let e = c.get(1).expect("held");
        assert_eq!((e.version, &*e.content), (2, "{\"v\":2}"));
        let (versions, held) = c.held(&[1, 7]);
        assert_eq!(versions, vec![2, 0]);
        assert!(held[0].is_some() && held[1].is_none());
        // 64 KB hold fewer than 200 entries of 1 KB
        let big = "x".repeat(1000);
        for rid in 100..300 {
            c.put(rid, 1, &big);
        }
        let kept = (100..300).filter(|r| c.get(*r).is_some()).count();
        assert!(kept > 0 && kept < 200, "{kept} of 200 kept in 64 KB");
    }

    #[test]
    fn disabled_holds_nothing() {
        let c = ResourceCache::new(0);
        assert_eq!(&*c.put(1, 1, "{}"), "{}");
        assert!(c.get(1).is_none());
        assert_eq!(c.held(&[1]).0, vec![0]);
    }
}
