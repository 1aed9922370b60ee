//! SQLite reads without sqlx: a pool of synchronous `rusqlite` connections.
//!
//! sqlx's SQLite driver runs every connection on a worker thread of its own and sends each row
//! back over a channel; under a search load that hand-off (thread wake-ups, futex) plus sqlx's
//! row decoding was ~15 % of the server's CPU. A statement over the memory-mapped database file
//! is CPU-bound and mostly short, so here it runs on the calling thread, a statement known to be
//! slow in `block_in_place` (see [`ReadMode`]), and returns all its rows at once. Writes, migrations and the pool of [`crate::Store::pool_handle`] stay
//! on sqlx; both link the one `libsqlite3-sys` build (bundled).

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Row, Statement};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::RESOURCE_COLUMNS;
use crate::{Result, SqlValue, StoreError, StoredResource, BUSY_TIMEOUT};

/// Prepared statements kept per connection (`prepare_cached`): the planner's statements differ
/// by shape, not by value (values are bound), so a few hundred cover a workload.
const STATEMENT_CACHE: usize = 256;

/// A statement text whose last run took at least this long runs in `block_in_place` the next
/// time ([`ReadMode::Adaptive`]): the hand-off is small next to it. Wall time, so a loaded
/// machine stretches it; with 1 ms a fair share of the search mix's statements went through
/// `block_in_place` on a busy machine (+24 % CPU per request), none does with 10 ms.
const SLOW_STATEMENT: Duration = Duration::from_millis(10);

/// How a statement runs from async code (docs/DECISIONS.md has the measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// On the tokio worker that polls the request.
    Inline,
    /// Inside `tokio::task::block_in_place` (the worker hands its other tasks to another
    /// thread first); inline on a current-thread runtime, where `block_in_place` panics.
    BlockInPlace,
    /// On tokio's blocking pool (`spawn_blocking`), one hop per statement.
    SpawnBlocking,
    /// Inline, except statement texts whose last run took [`SLOW_STATEMENT`] or more (on any
    /// connection of the pool): those run in `block_in_place`. The default.
    Adaptive,
}

impl ReadMode {
    /// `KILN_SQLITE_READ_MODE` = `inline` | `block_in_place` | `spawn_blocking` | `adaptive`
    /// (the default): a benchmarking switch, not a setting.
    pub(crate) fn from_env() -> ReadMode {
        match std::env::var("KILN_SQLITE_READ_MODE").as_deref() {
            Ok("inline") => ReadMode::Inline,
            Ok("block_in_place") => ReadMode::BlockInPlace,
            Ok("spawn_blocking") => ReadMode::SpawnBlocking,
            _ => ReadMode::Adaptive,
        }
    }
}

/// Statement texts seen slow, as bits of a small hashed set shared by the pool's connections
/// (a collision only sends a quick statement through `block_in_place`).
struct SlowSet([AtomicU64; 64]);

impl SlowSet {
    fn new() -> SlowSet {
        SlowSet(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn bit(key: u64) -> (usize, u64) {
        let b = (key % (64 * 64)) as usize;
        (b / 64, 1 << (b % 64))
    }

    fn contains(&self, key: u64) -> bool {
        let (w, m) = Self::bit(key);
        self.0[w].load(Ordering::Relaxed) & m != 0
    }

    fn set(&self, key: u64, slow: bool) {
        let (w, m) = Self::bit(key);
        if slow {
            self.0[w].fetch_or(m, Ordering::Relaxed);
        } else {
            self.0[w].fetch_and(!m, Ordering::Relaxed);
        }
    }
}

fn key_of(x: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

fn multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false)
}

/// The pool of reader connections of one SQLite database.
#[derive(Clone)]
pub(crate) struct SqliteReaders {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Connections not in use (opened on demand, up to `permits`' size).
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    closed: AtomicBool,
    mode: ReadMode,
    slow: SlowSet,
}

impl SqliteReaders {
    /// A pool of at most `size` connections to the database file `path` (which must exist: the
    /// writer creates it). Connections are opened on first use.
    pub(crate) fn new(path: PathBuf, size: usize, mode: ReadMode) -> SqliteReaders {
        SqliteReaders {
            shared: Arc::new(Shared {
                path,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size.max(1))),
                closed: AtomicBool::new(false),
                mode,
                slow: SlowSet::new(),
            }),
        }
    }

    /// One connection, held until the returned value is dropped. Waits (up to the busy
    /// timeout, like the sqlx pools) while every connection is in use.
    pub(crate) async fn acquire(&self) -> Result<SqliteReader> {
        let permit =
            match tokio::time::timeout(BUSY_TIMEOUT, self.shared.permits.clone().acquire_owned())
                .await
            {
                Err(_) => return Err(sqlx::Error::PoolTimedOut.into()),
                Ok(Err(_)) => return Err(sqlx::Error::PoolClosed.into()),
                Ok(Ok(p)) => p,
            };
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(sqlx::Error::PoolClosed.into());
        }
        let idle = self.shared.idle.lock().unwrap().pop();
        let conn = match idle {
            Some(c) => c,
            None => self.shared.open()?,
        };
        Ok(SqliteReader {
            held: Some(Held {
                conn: Some(conn),
                _permit: permit,
                shared: self.shared.clone(),
            }),
        })
    }

    /// Closes the idle connections; connections in use are closed when given back, and no
    /// connection is handed out any more.
    pub(crate) fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.permits.close();
        self.shared.idle.lock().unwrap().clear();
    }
}

impl Shared {
    fn open(&self) -> Result<Connection> {
        // not SQLITE_OPEN_READ_ONLY: `query_only` refuses writes as well, and a read-write
        // handle can take part in WAL recovery like sqlx's readers do
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE
            | OpenFlags::SQLITE_OPEN_EXRESCODE;
        let conn = Connection::open_with_flags(&self.path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // the sqlx readers' pragmas (backend.rs); WAL is a property of the file, set by the writer
        conn.execute_batch(
            "PRAGMA cache_size = -65536; PRAGMA temp_store = memory; \
             PRAGMA mmap_size = 1073741824; PRAGMA query_only = ON;",
        )?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // `rarray(?)`: row ids bound as one array (`each_resource_row`)
        rusqlite::vtab::array::load_module(&conn)?;
        Ok(conn)
    }
}

/// A reader connection taken from [`SqliteReaders`]; given back when dropped.
pub struct SqliteReader {
    /// `None` only while a statement runs on the blocking pool (the connection travels with it,
    /// so a cancelled request still gives it back when the statement ends).
    held: Option<Held>,
}

struct Held {
    conn: Option<Connection>,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // back to the pool before the permit (dropped after this) lets the next waiter in
        if let Some(c) = self.conn.take() {
            if !self.shared.closed.load(Ordering::Acquire) {
                self.shared.idle.lock().unwrap().push(c);
            }
        }
    }
}

impl SqliteReader {
    /// Runs `f` on the connection in the pool's [`ReadMode`]; `key` names the statement text
    /// for [`ReadMode::Adaptive`].
    async fn run<T, F>(&mut self, key: u64, f: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let shared = match &self.held {
            Some(h) => h.shared.clone(),
            None => return Err(sqlx::Error::PoolClosed.into()),
        };
        match shared.mode {
            ReadMode::Inline => f(self.conn()),
            ReadMode::BlockInPlace => {
                if multi_thread_runtime() {
                    let conn = self.conn();
                    tokio::task::block_in_place(move || f(conn))
                } else {
                    f(self.conn())
                }
            }
            ReadMode::Adaptive => {
                let start = Instant::now();
                let r = if shared.slow.contains(key) && multi_thread_runtime() {
                    let conn = self.conn();
                    tokio::task::block_in_place(move || f(conn))
                } else {
                    f(self.conn())
                };
                shared.slow.set(key, start.elapsed() >= SLOW_STATEMENT);
                r
            }
            ReadMode::SpawnBlocking => {
                let mut held = self.held.take().expect("checked above");
                let joined = tokio::task::spawn_blocking(move || {
                    let r = f(held.conn.as_mut().expect("a held connection"));
                    (held, r)
                })
                .await;
                match joined {
                    Ok((held, r)) => {
                        self.held = Some(held);
                        r
                    }
                    Err(e) => match e.try_into_panic() {
                        Ok(payload) => std::panic::resume_unwind(payload),
                        Err(e) => Err(StoreError::Corrupt(format!("reader task failed: {e}"))),
                    },
                }
            }
        }
    }

    fn conn(&mut self) -> &mut Connection {
        self.held
            .as_mut()
            .and_then(|h| h.conn.as_mut())
            .expect("a held connection")
    }

    /// One statement with bound values; every column decoded (see [`decode`]). The statement
    /// stays prepared on this connection for the next call with the same text.
    pub(crate) async fn query_rows(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Vec<Vec<SqlValue>>> {
        let key = key_of(sql);
        let sql = sql.to_owned();
        let params = params.to_vec();
        self.run(key, move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            rows(&mut stmt, &params, decode_row)
        })
        .await
    }

    /// One statement with bound values (kept prepared, as [`Self::query_rows`]), its rows
    /// folded into `acc` by `f`, which gets each row's columns as text borrowed from SQLite's
    /// memory (`None` for NULL and non-text values): no copy of the values is made.
    pub(crate) async fn fold_text_rows<T: Send + 'static>(
        &mut self,
        sql: &str,
        params: &[SqlValue],
        acc: T,
        f: fn(&mut T, &[Option<&str>]),
    ) -> Result<T> {
        let key = key_of(sql);
        let sql = sql.to_owned();
        let params = params.to_vec();
        self.run(key, move |c| {
            let mut acc = acc;
            let mut stmt = c.prepare_cached(&sql)?;
            bind(&mut stmt, &params)?;
            let n = stmt.column_count();
            let mut rows = stmt.raw_query();
            while let Some(row) = rows.next()? {
                let mut cols = Vec::with_capacity(n);
                for i in 0..n {
                    cols.push(match row.get_ref(i)? {
                        ValueRef::Text(b) => Some(text(b, i)?),
                        _ => None,
                    });
                }
                f(&mut acc, &cols);
            }
            Ok(acc)
        })
        .await
    }

    /// At most one row of a fixed statement, mapped by `map`.
    pub(crate) async fn query_opt<T, F>(
        &mut self,
        sql: String,
        params: Vec<SqlValue>,
        map: F,
    ) -> Result<Option<T>>
    where
        F: FnMut(&Row<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.run(key_of(&sql), move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            Ok(rows(&mut stmt, &params, map)?.into_iter().next())
        })
        .await
    }

    /// The current, non-deleted resources (contained ones included) with these row ids, in the
    /// order given (a rid given twice is read once, at its first place).
    pub(crate) async fn fetch_by_rids(&mut self, rids: &[i64]) -> Result<Vec<StoredResource>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = std::collections::HashSet::with_capacity(rids.len());
        let rids: Vec<i64> = rids.iter().copied().filter(|r| seen.insert(*r)).collect();
        self.run(key_of("fetch_by_rids"), move |c| {
            let mut out = Vec::with_capacity(rids.len());
            each_resource_row(c, &rids, RESOURCE_COLUMNS, |row| {
                out.push(stored_resource(row)?);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }
}

impl SqliteReader {
    /// The current (or contained) resources with these row ids in ascending rid order, each
    /// row's type, id and JSON text borrowed from SQLite's memory and handed to `f` (no copy).
    pub(crate) async fn fold_resources<T: Send + 'static>(
        &mut self,
        rids: &[i64],
        acc: T,
        f: fn(&mut T, crate::StoredText<'_>),
    ) -> Result<T> {
        let mut rids = rids.to_vec();
        rids.sort_unstable();
        rids.dedup();
        self.run(key_of("fold_resources"), move |c| {
            fold_text_resources(c, &rids, acc, f)
        })
        .await
    }

    /// The resources whose rids a statement lists (`kiln_search::included_rows_sql`: a rid
    /// may be listed more than once), less `left_out`, read as [`Self::fold_resources`] does:
    /// each once, in ascending rid order, borrowed. One trip to the reader for both.
    pub(crate) async fn fold_included<T: Send + 'static>(
        &mut self,
        sql: &str,
        params: &[SqlValue],
        left_out: &[i64],
        acc: T,
        f: fn(&mut T, crate::StoredText<'_>),
    ) -> Result<T> {
        let key = key_of(sql);
        let sql = sql.to_owned();
        let params = params.to_vec();
        let left_out: std::collections::HashSet<i64> = left_out.iter().copied().collect();
        self.run(key, move |c| {
            let mut rids = Vec::new();
            {
                let mut stmt = c.prepare_cached(&sql)?;
                bind(&mut stmt, &params)?;
                let mut rows = stmt.raw_query();
                while let Some(row) = rows.next()? {
                    let rid: i64 = row.get(0)?;
                    if !left_out.contains(&rid) {
                        rids.push(rid);
                    }
                }
            }
            rids.sort_unstable();
            rids.dedup();
            fold_text_resources(c, &rids, acc, f)
        })
        .await
    }
}

/// [`SqliteReader::fold_resources`] on the connection, `rids` in the order wanted.
fn fold_text_resources<T>(
    c: &Connection,
    rids: &[i64],
    mut acc: T,
    f: fn(&mut T, crate::StoredText<'_>),
) -> Result<T> {
    each_resource_row(c, rids, "res_type, res_id, content", |row| {
        let column = |i: usize| -> Result<&str> {
            match row.get_ref(i)? {
                ValueRef::Text(b) => text(b, i),
                _ => Err(StoreError::Corrupt(format!(
                    "column {i} of a resource row is not text"
                ))),
            }
        };
        f(
            &mut acc,
            crate::StoredText {
                resource_type: column(0)?,
                id: column(1)?,
                content: column(2)?,
            },
        );
        Ok(())
    })?;
    Ok(acc)
}

/// `{columns}` of the resources with these row ids that are not deleted, in the order of `rids`
/// (a rid listed twice is read twice), every row handed to `each`. One statement that stays
/// prepared, whatever the number of rids: they are bound as one array (`rarray`, rusqlite's
/// port of SQLite's `carray`) and joined to `resources` by rowid in the array's order. A bound
/// `rid IN (?,…)` list made SQLite build and probe a temporary b-tree of the rids on every call
/// (1,351 rows in the sqlite3 shell: 0.64 → 0.19 ms), and its statements came in a size per
/// power of two.
fn each_resource_row(
    c: &Connection,
    rids: &[i64],
    columns: &str,
    mut each: impl FnMut(&Row<'_>) -> Result<()>,
) -> Result<()> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {columns} FROM rarray(?1) a CROSS JOIN resources r ON r.rid = a.value \
         WHERE r.deleted <> 1"
    ))?;
    let array: rusqlite::vtab::array::Array = std::rc::Rc::new(
        rids.iter()
            .map(|r| rusqlite::types::Value::Integer(*r))
            .collect(),
    );
    stmt.raw_bind_parameter(1, &array)?;
    let mut found = stmt.raw_query();
    while let Some(row) = found.next()? {
        each(row)?;
    }
    Ok(())
}

/// Column `col`'s text as `&str`: validated as UTF-8 with SIMD (`simdutf8`, several times
/// faster than `std::str::from_utf8` over the ~1 MB of a large page), the exact error from
/// `std` when it is not UTF-8.
fn text(b: &[u8], col: usize) -> Result<&str> {
    match simdutf8::basic::from_utf8(b) {
        Ok(s) => Ok(s),
        Err(_) => std::str::from_utf8(b).map_err(|e| rusqlite::Error::Utf8Error(col, e).into()),
    }
}

/// Binds `params` (value `k` is `$k`, also `?k`; anonymous `?` take the values in order) and
/// runs the statement, mapping every row.
///
/// The planner's SQL numbers its parameters PostgreSQL-style and does not always use them in
/// ascending order (`… $2 … $4 … $3 …`); SQLite names each distinct one and numbers it in order
/// of first appearance, so the binding goes by name. As with sqlx: a value no parameter names
/// is ignored, and a parameter with no value stays NULL.
fn rows<T>(
    stmt: &mut Statement<'_>,
    params: &[SqlValue],
    mut map: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    bind(stmt, params)?;
    let mut out = Vec::new();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn bind(stmt: &mut Statement<'_>, params: &[SqlValue]) -> Result<()> {
    let mut anonymous = 0;
    // by index, reading each parameter's name: `parameter_index(name)` would be a linear scan
    // per value (quadratic over a long IN list)
    for i in 1..=stmt.parameter_count() {
        let n = match stmt.parameter_name(i) {
            None => {
                anonymous += 1;
                anonymous
            }
            Some(name) => name
                .strip_prefix('$')
                .or_else(|| name.strip_prefix('?'))
                .and_then(|d| d.parse::<usize>().ok())
                .ok_or_else(|| rusqlite::Error::InvalidParameterName(name.to_string()))?,
        };
        let Some(v) = n.checked_sub(1).and_then(|k| params.get(k)) else {
            continue;
        };
        match v {
            SqlValue::Null => stmt.raw_bind_parameter(i, rusqlite::types::Null)?,
            SqlValue::Int(x) => stmt.raw_bind_parameter(i, *x)?,
            SqlValue::Real(x) => stmt.raw_bind_parameter(i, *x)?,
            SqlValue::Text(s) => stmt.raw_bind_parameter(i, s.as_str())?,
        }
    }
    Ok(())
}

fn decode_row(row: &Row<'_>) -> Result<Vec<SqlValue>> {
    let n = row.as_ref().column_count();
    let mut cols = Vec::with_capacity(n);
    for i in 0..n {
        cols.push(decode(row.get_ref(i)?, i)?);
    }
    Ok(cols)
}

/// A column as a `SqlValue`, by the value's storage class, as sqlx's `decode_column!` did:
/// INTEGER → `Int`, REAL → `Real`, TEXT → `Text`, NULL → `Null`. A BLOB is `Null` (sqlx's
/// decoding found no matching type for it either; the store reads no BLOB through here). Text
/// that is not UTF-8 is an error (sqlx gave `Null`).
pub(crate) fn decode(v: ValueRef<'_>, col: usize) -> Result<SqlValue> {
    Ok(match v {
        ValueRef::Null | ValueRef::Blob(_) => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Int(i),
        ValueRef::Real(f) => SqlValue::Real(f),
        ValueRef::Text(b) => SqlValue::Text(
            std::str::from_utf8(b)
                .map_err(|e| rusqlite::Error::Utf8Error(col, e))?
                .to_owned(),
        ),
    })
}

/// A row of `RESOURCE_COLUMNS`.
pub(crate) fn stored_resource(row: &Row<'_>) -> Result<StoredResource> {
    Ok(StoredResource {
        rid: row.get(0)?,
        resource_type: row.get(1)?,
        id: row.get(2)?,
        version: row.get(3)?,
        last_updated: row.get(4)?,
        // 2 = a contained resource's row: current, not deleted
        deleted: row.get::<_, i64>(5)? == 1,
        content: row.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [ReadMode; 4] = [
        ReadMode::Inline,
        ReadMode::BlockInPlace,
        ReadMode::SpawnBlocking,
        ReadMode::Adaptive,
    ];

    /// A WAL database file with a `resources` table, written by a plain connection.
    fn database(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("t.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; \
             CREATE TABLE resources (rid INTEGER PRIMARY KEY, res_type TEXT, res_id TEXT, \
             version INTEGER, last_updated INTEGER, deleted INTEGER, content TEXT);",
        )
        .unwrap();
        path
    }

    fn ints(v: &[i64]) -> Vec<SqlValue> {
        v.iter().map(|i| SqlValue::Int(*i)).collect()
    }

    async fn binds_and_decodes(mode: ReadMode) {
        let dir = tempfile::tempdir().unwrap();
        let readers = SqliteReaders::new(database(dir.path()), 2, mode);
        let mut c = readers.acquire().await.unwrap();
        // numbered out of order, one used twice: bound by name, not by position
        let rows = c
            .query_rows("SELECT $2, $4, $3, $1, $2 + $1", &ints(&[1, 2, 3, 4]))
            .await
            .unwrap();
        assert_eq!(rows, vec![ints(&[2, 4, 3, 1, 3])]);
        // the same text again (from the statement cache) with other values
        let rows = c
            .query_rows("SELECT $2, $4, $3, $1, $2 + $1", &ints(&[10, 20, 30, 40]))
            .await
            .unwrap();
        assert_eq!(rows, vec![ints(&[20, 40, 30, 10, 30])]);
        // a value no parameter names is ignored; a parameter without a value is NULL
        let rows = c.query_rows("SELECT $1, $3", &ints(&[7])).await.unwrap();
        assert_eq!(rows, vec![vec![SqlValue::Int(7), SqlValue::Null]]);
        let rows = c.query_rows("SELECT $2", &ints(&[7, 8, 9])).await.unwrap();
        assert_eq!(rows, vec![ints(&[8])]);
        // ?NNN and anonymous parameters as sqlx binds them
        let rows = c.query_rows("SELECT ?2, ?1", &ints(&[5, 6])).await.unwrap();
        assert_eq!(rows, vec![ints(&[6, 5])]);
        let rows = c.query_rows("SELECT ?, ?", &ints(&[5, 6])).await.unwrap();
        assert_eq!(rows, vec![ints(&[5, 6])]);
        // every bound kind comes back as itself; each storage class decodes to its value
        let params = vec![
            SqlValue::Null,
            SqlValue::Int(-3),
            SqlValue::Real(2.5),
            SqlValue::Text("é".into()),
        ];
        let rows = c
            .query_rows("SELECT $1, $2, $3, $4", &params)
            .await
            .unwrap();
        assert_eq!(rows, vec![params]);
        let rows = c
            .query_rows(
                "SELECT NULL, 42, 0.5, 'x', X'00', 1 = 1, CAST('9' AS INTEGER)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![vec![
                SqlValue::Null,
                SqlValue::Int(42),
                SqlValue::Real(0.5),
                SqlValue::Text("x".into()),
                SqlValue::Null,
                SqlValue::Int(1),
                SqlValue::Int(9),
            ]]
        );
        // no rows, several rows
        let rows = c
            .query_rows("SELECT rid FROM resources", &[])
            .await
            .unwrap();
        assert!(rows.is_empty());
        let rows = c
            .query_rows(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
                 SELECT i FROM n",
                &ints(&[1000]),
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1000);
        assert_eq!(rows[999], ints(&[1000]));
        // errors are database errors, and the connection goes on
        let e = c.query_rows("SELECT nope FROM resources", &[]).await;
        assert!(
            matches!(e, Err(StoreError::Sqlite(_))),
            "{:?}",
            e.map(|_| ())
        );
        // read-only: a write is refused
        let e = c
            .query_rows("INSERT INTO resources (rid) VALUES (1)", &[])
            .await;
        assert!(
            e.as_ref()
                .is_err_and(|e| e.to_string().contains("readonly")),
            "{:?}",
            e.map(|_| ())
        );
        assert_eq!(
            c.query_rows("SELECT 1", &[]).await.unwrap(),
            vec![ints(&[1])]
        );
    }

    #[tokio::test]
    async fn binds_and_decodes_current_thread() {
        for mode in MODES {
            binds_and_decodes(mode).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn binds_and_decodes_multi_thread() {
        for mode in MODES {
            binds_and_decodes(mode).await;
        }
    }

    /// A statement text that took 10 ms or more is remembered as slow (and runs in
    /// `block_in_place` the next time, on any connection); one that got quick again is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adaptive_mode_learns_slow_statements() {
        let dir = tempfile::tempdir().unwrap();
        let readers = SqliteReaders::new(database(dir.path()), 2, ReadMode::Adaptive);
        let sql = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
                   SELECT COUNT(*) FROM n";
        let mut c = readers.acquire().await.unwrap();
        c.query_rows("SELECT 1", &[]).await.unwrap();
        assert!(!readers.shared.slow.contains(key_of("SELECT 1")));
        let rows = c.query_rows(sql, &ints(&[3_000_000])).await.unwrap();
        assert_eq!(rows, vec![ints(&[3_000_000])]);
        assert!(readers.shared.slow.contains(key_of(sql)));
        let mut other = readers.acquire().await.unwrap();
        let rows = other.query_rows(sql, &ints(&[10])).await.unwrap();
        assert_eq!(rows, vec![ints(&[10])], "run in block_in_place");
        assert!(
            !readers.shared.slow.contains(key_of(sql)),
            "quick this time"
        );
    }

    /// The pool hands out at most its size, reuses connections and waits for one to come back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pool_reuses_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let readers = SqliteReaders::new(database(dir.path()), 1, ReadMode::SpawnBlocking);
        let mut a = readers.acquire().await.unwrap();
        a.query_rows("SELECT 1", &[]).await.unwrap();
        let r2 = readers.clone();
        let waiter = tokio::spawn(async move {
            let mut b = r2.acquire().await.unwrap();
            b.query_rows("SELECT 2", &[]).await.unwrap()
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the only connection is held");
        drop(a);
        assert_eq!(waiter.await.unwrap(), vec![ints(&[2])]);
        assert_eq!(readers.shared.idle.lock().unwrap().len(), 1, "one opened");
        readers.close();
        assert!(readers.acquire().await.is_err(), "closed");
    }

    /// Writes Basic resources with rids 1..=n (id `b<rid>`, content from the SQL expression
    /// `content` over `i`): every 7th deleted (1), every 11th otherwise contained (2). Returns
    /// the writing connection.
    fn basics(path: &std::path::Path, n: usize, content: &str) -> Connection {
        let writer = Connection::open(path).unwrap();
        writer
            .execute_batch(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
                 INSERT INTO resources SELECT i, 'Basic', 'b' || i, 1, i, \
                 CASE WHEN i % 7 = 0 THEN 1 WHEN i % 11 = 0 THEN 2 ELSE 0 END, {content} FROM n"
            ))
            .unwrap();
        writer
    }

    /// `fold_resources` and `fold_text_rows` hand out borrowed text in every read mode.
    #[tokio::test]
    async fn folds_borrowed_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path());
        let writer = basics(&path, 1100, "'{\"n\":' || i || '}'");
        for mode in MODES {
            let readers = SqliteReaders::new(path.clone(), 1, mode);
            let mut c = readers.acquire().await.unwrap();
            // ascending rid order whatever the order asked, each once, deleted rows left out
            // (contained ones kept), across the 512-rid statements
            let ask: Vec<i64> = (1..=1100).rev().chain([3, 5000]).collect();
            let got = c
                .fold_resources(&ask, Vec::new(), |acc: &mut Vec<String>, r| {
                    acc.push(format!("{}/{}={}", r.resource_type, r.id, r.content))
                })
                .await
                .unwrap();
            let want: Vec<String> = (1..=1100)
                .filter(|i| i % 7 != 0)
                .map(|i| format!("Basic/b{i}={{\"n\":{i}}}"))
                .collect();
            assert_eq!(got, want, "{mode:?}");
            let sum = c
                .fold_text_rows(
                    "SELECT res_id, NULL, rid FROM resources WHERE rid <= $1 ORDER BY rid",
                    &ints(&[3]),
                    String::new(),
                    |acc, row| {
                        // text borrowed; NULL and integers are None
                        acc.push_str(row[0].unwrap_or("?"));
                        acc.push_str(if row[1].is_none() && row[2].is_none() {
                            ";"
                        } else {
                            "!"
                        });
                    },
                )
                .await
                .unwrap();
            assert_eq!(sum, "b1;b2;b3;");
        }
        // text that is not UTF-8 is an error, not a silently cut value
        writer
            .execute(
                "UPDATE resources SET content = CAST(x'7bff7d' AS TEXT) WHERE rid = 1",
                [],
            )
            .unwrap();
        let readers = SqliteReaders::new(path, 1, ReadMode::Inline);
        let mut c = readers.acquire().await.unwrap();
        let e = c
            .fold_resources(&[1, 2], 0, |n: &mut i32, _| *n += 1)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("utf"), "{e}");
    }

    /// Order of the caller's rids across the 512-rid pages, deleted rows (1) left out, contained
    /// rows (2) returned; a commit of another connection is seen by the next statement of a
    /// connection that already ran one.
    #[tokio::test]
    async fn fetch_by_rids_keeps_order_and_sees_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path());
        let writer = basics(&path, 1200, "'{}'");
        let readers = SqliteReaders::new(path, 1, ReadMode::Inline);
        let mut c = readers.acquire().await.unwrap();
        let want: Vec<i64> = (1..=1200).rev().filter(|i| i % 7 != 0).collect();
        let ask: Vec<i64> = (1..=1200).rev().chain([5000]).collect();
        let got = c.fetch_by_rids(&ask).await.unwrap();
        assert_eq!(got.iter().map(|r| r.rid).collect::<Vec<_>>(), want);
        assert!(got
            .iter()
            .all(|r| !r.deleted && r.id == format!("b{}", r.rid)));
        assert!(c.fetch_by_rids(&[]).await.unwrap().is_empty());
        assert!(c.fetch_by_rids(&[7]).await.unwrap().is_empty());

        writer
            .execute("UPDATE resources SET deleted = 0 WHERE rid = 7", [])
            .unwrap();
        let got = c.fetch_by_rids(&[7, 8]).await.unwrap();
        assert_eq!(got.iter().map(|r| r.rid).collect::<Vec<_>>(), [7, 8]);
        let count = "SELECT COUNT(*) FROM resources WHERE deleted = $1";
        assert_eq!(
            c.query_rows(count, &ints(&[1])).await.unwrap()[0][0],
            SqlValue::Int(1200 / 7 - 1)
        );
        writer
            .execute("UPDATE resources SET deleted = 1 WHERE rid = 8", [])
            .unwrap();
        // the cached statement, a new snapshot
        assert_eq!(
            c.query_rows(count, &ints(&[1])).await.unwrap()[0][0],
            SqlValue::Int(1200 / 7)
        );
    }
}
