//! `kiln-store`: the resource store. One API, two backends through sqlx: embedded SQLite (the
//! default, WAL mode) and PostgreSQL (many stateless Kiln nodes on one database).
//!
//! Every version of every resource is kept (`resource_history`); `resources` holds the current
//! version of each logical resource and is what search index rows point at (`rid`). All writes go
//! through a [`WriteTx`], so a single interaction and a whole transaction Bundle share one code path
//! and one database transaction: either everything of it is visible, or nothing is.

mod backend;
mod cache;
mod history;
mod meta;
mod schema;
mod sqlite_read;
mod terminology;
#[cfg(test)]
mod test_pg;
mod tx;

pub use backend::{Dialect, ListedRow, ReadConn, SqlValue};
pub use history::{HistoryEntry, HistoryPage, HistoryQuery, HistoryScope};
pub use meta::{format_instant, now_micros, parse_instant};
pub use sqlite_read::SqliteReader;
pub use terminology::{TerminologyHead, TerminologyItem, CHUNK_BYTES as TERMINOLOGY_CHUNK_BYTES};
pub use tx::{Current, Indexer, WriteTx};

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backend::Pools;

/// Errors of the storage layer. Client mistakes (conflicts, not found) are distinct variants so
/// the HTTP layer can map them to status codes; `Database` is an internal error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An error of a SQLite read (the rusqlite connections; `SQLITE_BUSY` and the like).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("configuration error: {0}")]
    Config(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory of the embedded SQLite database (`kiln.db` inside), created on first use.
    pub data_dir: PathBuf,
    /// `postgres://…` selects PostgreSQL; `sqlite://path` an explicit SQLite file; `None` the
    /// embedded database under `data_dir`.
    pub database: Option<String>,
    /// SQLite `synchronous` pragma: `NORMAL` (default; survives a process crash / kill -9) or
    /// `FULL` (also survives power loss, at one fsync per commit).
    pub sqlite_synchronous_full: bool,
    /// Maximum pooled connections for reads.
    pub max_connections: u32,
    /// PostgreSQL: bytes of resource JSON each node keeps between reads (0: none), checked
    /// against the database's version on every read (see `cache.rs`). SQLite reads its pages
    /// in process and keeps none.
    pub resource_cache_bytes: u64,
}

/// [`StoreConfig::resource_cache_bytes`] by default: 64 MiB.
pub const DEFAULT_RESOURCE_CACHE_BYTES: u64 = 64 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("./kiln-data"),
            database: None,
            sqlite_synchronous_full: false,
            max_connections: 16,
            resource_cache_bytes: DEFAULT_RESOURCE_CACHE_BYTES,
        }
    }
}

/// One row of a resource as stored: the JSON text exactly as a read returns it.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub rid: i64,
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    /// Microseconds since the Unix epoch.
    pub last_updated: i64,
    pub deleted: bool,
    /// The resource JSON (empty for a deletion).
    pub content: String,
}

/// A stored resource's row as text borrowed from the database (see
/// [`ReadConn::fold_resources`]): the JSON exactly as a read returns it.
#[derive(Debug, Clone, Copy)]
pub struct StoredText<'a> {
    pub resource_type: &'a str,
    /// The logical id (`[container type]/[container id]#[local id]` for a contained resource).
    pub id: &'a str,
    pub content: &'a str,
}

/// A sqlx pool of the store's database.
pub enum PoolHandle {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Extra schema statements run at migration time by crates layered on the store (the search
/// index tables). They must be idempotent (`IF NOT EXISTS`).
pub type SchemaHook = Arc<dyn Fn(Dialect) -> Vec<String> + Send + Sync>;

/// The resource store.
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    clock: Arc<AtomicI64>,
    indexer: Arc<std::sync::OnceLock<Arc<dyn Indexer>>>,
}

impl Store {
    /// Opens (creating if needed) the store and runs pending migrations.
    pub async fn open(config: &StoreConfig, extra_schema: Option<SchemaHook>) -> Result<Store> {
        let pools = Pools::connect(config).await?;
        let store = Store {
            pools,
            clock: Arc::new(AtomicI64::new(0)),
            indexer: Arc::new(std::sync::OnceLock::new()),
        };
        schema::migrate(&store.pools, extra_schema).await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.pools.dialect()
    }

    /// Installs the search indexer: from then on every write of this store (and its clones)
    /// writes index rows in the same transaction. Set once; later calls are ignored.
    pub fn set_indexer(&self, indexer: Arc<dyn Indexer>) {
        let _ = self.indexer.set(indexer);
    }

    pub(crate) fn indexer(&self) -> Option<Arc<dyn Indexer>> {
        self.indexer.get().cloned()
    }

    /// A human-readable description of where the data lives (for logs).
    pub fn describe(&self) -> String {
        self.pools.describe()
    }

    /// A strictly increasing timestamp (µs) for this process, so versions written by this node
    /// never share or go back in `lastUpdated`.
    pub fn tick(&self) -> i64 {
        let now = now_micros();
        let mut prev = self.clock.load(Ordering::Relaxed);
        loop {
            let next = if now > prev { now } else { prev + 1 };
            match self
                .clock
                .compare_exchange_weak(prev, next, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Starts a write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`),
    /// so concurrent writers queue instead of failing on lock upgrade.
    pub async fn begin(&self) -> Result<WriteTx> {
        WriteTx::begin(self).await
    }

    /// Current version of a resource (including a deletion marker), or `None` if it never existed.
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<StoredResource>> {
        self.pools.read_current(resource_type, id).await
    }

    /// One specific version.
    pub async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>> {
        self.pools.read_version(resource_type, id, version).await
    }

    /// Current, non-deleted resources by row id (search results), in the order given. Rows of
    /// contained resources are returned too (`id` = `[container type]/[container id]#[local id]`).
    pub async fn fetch_by_rids(&self, rids: &[i64]) -> Result<Vec<StoredResource>> {
        self.pools.fetch_by_rids(rids).await
    }

    /// Runs a read-only query produced by the search planner; returns the rows as strings/ints.
    pub async fn query_rows(&self, sql: &str, params: &[SqlValue]) -> Result<Vec<Vec<SqlValue>>> {
        self.pools.query_rows(sql, params).await
    }

    /// One reader connection for several statements of one request (a search's page, its
    /// resources, includes and count): the pool is visited once instead of once per statement.
    /// Each statement still reads its own snapshot (no transaction). Drop it to give the
    /// connection back.
    pub async fn reader(&self) -> Result<ReadConn> {
        self.pools.reader().await
    }

    /// History at instance, type or system level.
    pub async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        history::history(&self.pools, query).await
    }

    /// Count of current (non-deleted) resources of a type, or of all types.
    pub async fn count(&self, resource_type: Option<&str>) -> Result<i64> {
        self.pools.count(resource_type).await
    }

    /// Closes every connection (checkpointing the SQLite WAL).
    pub async fn close(&self) {
        self.pools.close().await
    }

    /// The underlying connection pool, for components that keep their own tables in the same
    /// database (the SMART authorization server's `auth_*` tables).
    pub fn pool_handle(&self) -> PoolHandle {
        match &self.pools {
            Pools::Sqlite { read, .. } => PoolHandle::Sqlite(read.clone()),
            Pools::Postgres { pool, .. } => PoolHandle::Postgres(pool.clone()),
        }
    }

    pub(crate) fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Waits until the store answers (used by health checks).
    pub async fn ping(&self) -> Result<()> {
        self.pools.query_rows("SELECT 1", &[]).await.map(|_| ())
    }
}

pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(60);
