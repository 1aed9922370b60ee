//! The two sqlx backends behind one enum. Code that runs on both is written once inside the
//! `on_backend!` macro and type-checked for each backend, so there are no generic bounds to fight
//! and no `Any` driver overhead. SQLite reads of the store's own tables go through the
//! synchronous connections of [`crate::sqlite_read`] instead of sqlx.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use crate::cache::{ResourceCache, BY_RIDS_SQL};
use crate::sqlite_read::{self, SqliteReader, SqliteReaders};
use crate::{Result, StoreConfig, StoreError, StoredResource, BUSY_TIMEOUT};

/// SQL dialect of the backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter or column value crossing the store boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl SqlValue {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            SqlValue::Int(i) => Some(*i),
            SqlValue::Real(f) => Some(*f as i64),
            SqlValue::Text(s) => s.parse().ok(),
            SqlValue::Null => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            SqlValue::Text(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub(crate) enum Pools {
    Sqlite {
        /// sqlx readers: [`crate::Store::pool_handle`] (tables of other crates) and the
        /// terminology reads; the store's own reads use `readers`.
        read: SqlitePool,
        /// A single connection: SQLite has one writer; queueing here is cheaper than lock retries.
        write: SqlitePool,
        /// rusqlite readers: every read of `resources` / `resource_history` / search indexes.
        readers: SqliteReaders,
        path: String,
    },
    Postgres {
        pool: PgPool,
        url: String,
        /// Resource JSON by rid, checked against the version on every read.
        cache: Arc<ResourceCache>,
    },
}

/// Runs `$body` with `$p` bound to the backend's read pool, for either backend.
macro_rules! on_read_pool {
    ($pools:expr, |$p:ident| $body:expr) => {
        match $pools {
            Pools::Sqlite { read: $p, .. } => $body,
            Pools::Postgres { pool: $p, .. } => $body,
        }
    };
}
pub(crate) use on_read_pool;

/// Binds `SqlValue`s onto a sqlx query (works for both backends' `query` types).
macro_rules! bind_values {
    ($q:expr, $params:expr) => {{
        let mut q = $q;
        for v in $params {
            q = match v {
                SqlValue::Null => q.bind(Option::<String>::None),
                SqlValue::Int(i) => q.bind(*i),
                SqlValue::Real(f) => q.bind(*f),
                SqlValue::Text(s) => q.bind(s.as_str()),
            };
        }
        q
    }};
}
pub(crate) use bind_values;

/// A column type (its sqlx name, either backend) whose values decode as text.
pub(crate) fn text_type(name: &str) -> bool {
    matches!(name, "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" | "CHAR")
}

/// Decodes one column into a `SqlValue` whatever its SQL type. The column's type picks the
/// decoder; a wrong guess is not free (sqlx formats a "mismatched types" error for it, ~7 % of
/// the server's CPU on PostgreSQL searches when every text column was first tried as an
/// integer), so the chain below is only the fallback for types not named here.
macro_rules! decode_column {
    ($row:expr, $i:expr) => {{
        use sqlx::{Column as _, TypeInfo as _};
        let row = $row;
        let i = $i;
        let ty = row.column(i).type_info().name();
        let first = match ty {
            _ if $crate::backend::text_type(ty) => row
                .try_get::<Option<String>, _>(i)
                .ok()
                .map(|v| v.map(SqlValue::Text).unwrap_or(SqlValue::Null)),
            "INT8" | "INTEGER" | "BIGINT" | "INT" => row
                .try_get::<Option<i64>, _>(i)
                .ok()
                .map(|v| v.map(SqlValue::Int).unwrap_or(SqlValue::Null)),
            "FLOAT8" | "REAL" | "DOUBLE PRECISION" => row
                .try_get::<Option<f64>, _>(i)
                .ok()
                .map(|v| v.map(SqlValue::Real).unwrap_or(SqlValue::Null)),
            "INT4" => row
                .try_get::<Option<i32>, _>(i)
                .ok()
                .map(|v| v.map(|x| SqlValue::Int(x as i64)).unwrap_or(SqlValue::Null)),
            "NULL" => Some(SqlValue::Null),
            _ => None,
        };
        match first {
            Some(v) => v,
            None => {
                if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                    v.map(SqlValue::Int).unwrap_or(SqlValue::Null)
                } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
                    v.map(SqlValue::Text).unwrap_or(SqlValue::Null)
                } else if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
                    v.map(SqlValue::Real).unwrap_or(SqlValue::Null)
                } else if let Ok(v) = row.try_get::<Option<i32>, _>(i) {
                    v.map(|x| SqlValue::Int(x as i64)).unwrap_or(SqlValue::Null)
                } else if let Ok(v) = row.try_get::<Option<i16>, _>(i) {
                    v.map(|x| SqlValue::Int(x as i64)).unwrap_or(SqlValue::Null)
                } else if let Ok(v) = row.try_get::<Option<bool>, _>(i) {
                    v.map(|x| SqlValue::Int(x as i64)).unwrap_or(SqlValue::Null)
                } else {
                    SqlValue::Null
                }
            }
        }
    }};
}
pub(crate) use decode_column;

pub(crate) const RESOURCE_COLUMNS: &str =
    "rid, res_type, res_id, version, last_updated, deleted, content";

macro_rules! stored_from_row {
    ($row:expr) => {{
        let row = $row;
        StoredResource {
            rid: row.try_get::<i64, _>(0)?,
            resource_type: row.try_get::<String, _>(1)?,
            id: row.try_get::<String, _>(2)?,
            version: row.try_get::<i64, _>(3)?,
            last_updated: row.try_get::<i64, _>(4)?,
            // 2 = a contained resource's row: current, not deleted
            deleted: row.try_get::<i64, _>(5)? == 1,
            content: row.try_get::<String, _>(6)?,
        }
    }};
}
pub(crate) use stored_from_row;

/// A PostgreSQL row of `RESOURCE_COLUMNS`, if there is one.
fn stored_opt(row: Option<sqlx::postgres::PgRow>) -> Result<Option<StoredResource>> {
    Ok(match row {
        Some(r) => Some(stored_from_row!(&r)),
        None => None,
    })
}

/// The current (or contained) resources with these row ids on PostgreSQL, in rid order: each
/// row of [`BY_RIDS_SQL`], with the cache's content where the cache held the row's version
/// (`None`: the row carries its content, now kept in the cache). The rids are bound as one
/// `int8[]`: one statement text whatever the page, kept prepared.
async fn pg_by_rids(
    conn: &mut sqlx::PgConnection,
    cache: &ResourceCache,
    rids: &[i64],
) -> Result<Vec<(sqlx::postgres::PgRow, Option<Arc<str>>)>> {
    let mut rids = rids.to_vec();
    rids.sort_unstable();
    rids.dedup();
    let (versions, held) = cache.held(&rids);
    let rows = sqlx::query(BY_RIDS_SQL)
        .bind(&rids)
        .bind(&versions)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let rid: i64 = row.try_get(0)?;
        let version: i64 = row.try_get(3)?;
        let held = match row.try_get::<Option<&str>, _>(6)? {
            Some(text) => {
                cache.keep(rid, version, text);
                None
            }
            // NULL only where the version sent for the rid was the row's
            None => Some(
                rids.binary_search(&rid)
                    .ok()
                    .and_then(|i| held[i].as_ref())
                    .filter(|h| h.version == version)
                    .map(|h| h.content.clone())
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "row {rid} came back without content for a version not held"
                        ))
                    })?,
            ),
        };
        out.push((row, held));
    }
    Ok(out)
}

/// The JSON of a [`pg_by_rids`] row: the cache's, or the row's own.
fn by_rid_content<'r>(
    row: &'r sqlx::postgres::PgRow,
    held: &'r Option<Arc<str>>,
) -> Result<&'r str> {
    Ok(match held {
        Some(text) => text,
        None => row.try_get(6)?,
    })
}

/// [`pg_by_rids`] as [`StoredResource`]s in the order of `rids`.
async fn pg_fetch_by_rids(
    conn: &mut sqlx::PgConnection,
    cache: &ResourceCache,
    rids: &[i64],
) -> Result<Vec<StoredResource>> {
    let rows = pg_by_rids(conn, cache, rids).await?;
    let mut out = Vec::with_capacity(rows.len());
    for (r, held) in &rows {
        out.push(StoredResource {
            rid: r.try_get::<i64, _>(0)?,
            resource_type: r.try_get::<String, _>(1)?,
            id: r.try_get::<String, _>(2)?,
            version: r.try_get::<i64, _>(3)?,
            last_updated: r.try_get::<i64, _>(4)?,
            // 2 = a contained resource's row: current, not deleted
            deleted: r.try_get::<i64, _>(5)? == 1,
            content: by_rid_content(r, held)?.to_string(),
        });
    }
    // keep the caller's order
    let pos: std::collections::HashMap<i64, usize> =
        rids.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    out.sort_by_key(|r| pos.get(&r.rid).copied().unwrap_or(usize::MAX));
    Ok(out)
}

/// A resource listed by a statement with its version: the JSON with it, or not
/// ([`ReadConn::fold_listed`]).
pub struct ListedRow<'a> {
    pub rid: i64,
    pub version: i64,
    pub resource_type: &'a str,
    pub id: &'a str,
    pub content: Option<&'a str>,
}

/// [`ReadConn::fold_listed`] on PostgreSQL. Counts the rows whose version the cache held (the
/// rate that decides [`ReadConn::listed_content`]) and keeps the JSON that came with rows.
async fn pg_fold_listed<T>(
    conn: &mut sqlx::PgConnection,
    cache: &ResourceCache,
    rows: &[ListedRow<'_>],
    mut acc: T,
    f: fn(&mut T, crate::StoredText<'_>),
) -> Result<T> {
    let mut hits = 0;
    let mut held = Vec::with_capacity(rows.len());
    let mut missing = Vec::new();
    for r in rows {
        let h = cache.get_version(r.rid, r.version);
        match (r.content, &h) {
            (_, Some(_)) => hits += 1,
            (Some(text), None) => cache.keep(r.rid, r.version, text),
            (None, None) => missing.push(r.rid),
        }
        held.push(h);
    }
    cache.note_listed(hits, rows.len() as u64);
    let fetched = if missing.is_empty() {
        Vec::new()
    } else {
        pg_by_rids(conn, cache, &missing).await?
    };
    let at: std::collections::HashMap<i64, usize> = fetched
        .iter()
        .enumerate()
        .map(|(i, (row, _))| Ok((row.try_get::<i64, _>(0)?, i)))
        .collect::<Result<_>>()?;
    for (r, h) in rows.iter().zip(&held) {
        let content = match (r.content, h) {
            (Some(text), _) => text,
            (None, Some(text)) => &**text,
            (None, None) => match at.get(&r.rid) {
                Some(&i) => by_rid_content(&fetched[i].0, &fetched[i].1)?,
                None => continue,
            },
        };
        f(
            &mut acc,
            crate::StoredText {
                resource_type: r.resource_type,
                id: r.id,
                content,
            },
        );
    }
    Ok(acc)
}

/// The text under which a PostgreSQL read is kept prepared, and whether it is kept.
///
/// sqlx keeps a statement prepared per connection keyed by its text, with the parameter
/// types of its first execution; the search planner binds one text with different types
/// (NULL vs text, integer vs real), which PostgreSQL would reject or misread. So a `SELECT`
/// is kept under its text prefixed by a comment naming its parameters' types: each
/// combination is its own prepared statement. Other statements (`VACUUM`, DDL) are parsed
/// every time. Keeping them saves the parse and a round trip per statement, and lets
/// PostgreSQL cache a plan (see [`Pools::connect`] for `plan_cache_mode`).
pub(crate) fn pg_statement(sql: &str, params: &[SqlValue]) -> (String, bool) {
    let head = sql.trim_start().as_bytes();
    let starts = |w: &[u8]| head.len() >= w.len() && head[..w.len()].eq_ignore_ascii_case(w);
    let select = starts(b"SELECT") || starts(b"WITH");
    if !select {
        return (sql.to_string(), false);
    }
    let mut text = String::with_capacity(sql.len() + params.len() + 8);
    text.push_str("/* ");
    for p in params {
        text.push(match p {
            SqlValue::Null => 'n',
            SqlValue::Int(_) => 'i',
            SqlValue::Real(_) => 'r',
            SqlValue::Text(_) => 't',
        });
    }
    text.push_str(" */ ");
    text.push_str(sql);
    (text, true)
}

/// A PostgreSQL read with its values bound, kept prepared as [`pg_statement`] decides.
fn pg_query<'q>(
    sql: &str,
    params: &'q [SqlValue],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (text, keep) = pg_statement(sql, params);
    bind_values!(sqlx::query(AssertSqlSafe(text)), params).persistent(keep)
}

/// Runs one PostgreSQL read with bound values on an executor; every column decoded.
macro_rules! query_rows_on {
    ($exec:expr, $sql:expr, $params:expr) => {{
        let rows = pg_query($sql, $params).fetch_all($exec).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let n = r.len();
            let mut cols = Vec::with_capacity(n);
            for i in 0..n {
                cols.push(decode_column!(r, i));
            }
            out.push(cols);
        }
        Ok::<_, StoreError>(out)
    }};
}

/// Folds PostgreSQL rows into `acc`, each row's columns as text borrowed from the row (`None`
/// for NULL and non-text columns): no `String` per column.
fn fold_pg_text_rows<T>(
    rows: &[sqlx::postgres::PgRow],
    mut acc: T,
    mut f: impl FnMut(&mut T, &[Option<&str>]),
) -> T {
    use sqlx::{Column as _, TypeInfo as _};
    let mut cols: Vec<Option<&str>> = Vec::new();
    for r in rows {
        cols.clear();
        for c in r.columns() {
            cols.push(if text_type(c.type_info().name()) {
                r.try_get::<Option<&str>, _>(c.ordinal()).ok().flatten()
            } else {
                None
            });
        }
        f(&mut acc, &cols);
    }
    acc
}

/// A reader connection taken from the pool for several statements (see [`Pools::reader`]).
pub enum ReadConn {
    Sqlite(SqliteReader),
    Postgres(
        sqlx::pool::PoolConnection<sqlx::Postgres>,
        Arc<ResourceCache>,
    ),
}

impl ReadConn {
    /// [`crate::Store::query_rows`] on this connection.
    pub async fn query_rows(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Vec<Vec<SqlValue>>> {
        match self {
            ReadConn::Sqlite(c) => c.query_rows(sql, params).await,
            ReadConn::Postgres(c, _) => query_rows_on!(&mut **c, sql, params),
        }
    }

    /// Runs one statement and folds its rows into `acc` with `f`, which gets each row's
    /// columns as text (`None` for NULL and non-text values). On SQLite the text is borrowed
    /// from the database's memory, so a large result (the included resources of a page) is
    /// copied once, into whatever `f` writes; on PostgreSQL the rows are read first.
    pub async fn fold_text_rows<T: Send + 'static>(
        &mut self,
        sql: &str,
        params: &[SqlValue],
        acc: T,
        f: fn(&mut T, &[Option<&str>]),
    ) -> Result<T> {
        match self {
            ReadConn::Sqlite(c) => c.fold_text_rows(sql, params, acc, f).await,
            ReadConn::Postgres(c, _) => {
                let rows = pg_query(sql, params).fetch_all(&mut **c).await?;
                Ok(fold_pg_text_rows(&rows, acc, f))
            }
        }
    }

    /// The current (or contained) resources with these row ids, in ascending rid order, folded
    /// into `acc` by `f` with their type, id and JSON text: on SQLite borrowed from the
    /// database's memory (written once, into whatever `f` writes), on PostgreSQL read first.
    pub async fn fold_resources<T: Send + 'static>(
        &mut self,
        rids: &[i64],
        acc: T,
        f: fn(&mut T, crate::StoredText<'_>),
    ) -> Result<T> {
        if rids.is_empty() {
            return Ok(acc);
        }
        match self {
            ReadConn::Sqlite(c) => c.fold_resources(rids, acc, f).await,
            ReadConn::Postgres(c, cache) => {
                let mut acc = acc;
                for (row, held) in pg_by_rids(c, cache, rids).await? {
                    f(
                        &mut acc,
                        crate::StoredText {
                            resource_type: row.try_get(1)?,
                            id: row.try_get(2)?,
                            content: by_rid_content(&row, &held)?,
                        },
                    );
                }
                Ok(acc)
            }
        }
    }

    /// A page's included resources (`kiln_search::included_rows_sql`) folded into `acc` by `f`,
    /// in ascending rid order, each once, none of the page's own (`page_rids`). SQLite: the
    /// statement lists the included rids; those are kept once, the page's left out and the
    /// rest read by rid, type, id and JSON text borrowed. PostgreSQL: the statement reads
    /// `rid, version, type, id` in that order, without the page's; the JSON comes from the
    /// resource cache where it holds that version, the rest from one more statement by rid.
    pub async fn fold_included<T: Send + 'static>(
        &mut self,
        sql: &str,
        params: &[SqlValue],
        page_rids: &[i64],
        acc: T,
        f: fn(&mut T, crate::StoredText<'_>),
    ) -> Result<T> {
        match self {
            ReadConn::Sqlite(c) => c.fold_included(sql, params, page_rids, acc, f).await,
            ReadConn::Postgres(c, cache) => {
                // `rid, version, res_type, res_id` and maybe `content`
                let rows = pg_query(sql, params).fetch_all(&mut **c).await?;
                let mut listed = Vec::with_capacity(rows.len());
                for row in &rows {
                    listed.push(ListedRow {
                        rid: row.try_get(0)?,
                        version: row.try_get(1)?,
                        resource_type: row.try_get(2)?,
                        id: row.try_get(3)?,
                        content: if row.len() > 4 {
                            Some(row.try_get(4)?)
                        } else {
                            None
                        },
                    });
                }
                pg_fold_listed(c, cache, &listed, acc, f).await
            }
        }
    }

    /// Resources already listed with their version (a page's matches read with the page,
    /// `kiln_search::page_with_resources_sql`) folded into `acc` by `f`, in the order given:
    /// the JSON of the version listed, from the row where it came with it, else (PostgreSQL)
    /// from the resource cache where it holds that version; else read by rid now, when a
    /// resource changed since the listing comes as its current version and one deleted since
    /// is left out.
    pub async fn fold_listed<T: Send + 'static>(
        &mut self,
        rows: &[ListedRow<'_>],
        acc: T,
        f: fn(&mut T, crate::StoredText<'_>),
    ) -> Result<T> {
        match self {
            ReadConn::Postgres(c, cache) => pg_fold_listed(c, cache, rows, acc, f).await,
            ReadConn::Sqlite(c) => {
                let missing: Vec<i64> = rows
                    .iter()
                    .filter(|r| r.content.is_none())
                    .map(|r| r.rid)
                    .collect();
                let fetched = c.fetch_by_rids(&missing).await?;
                let at: std::collections::HashMap<i64, &str> = fetched
                    .iter()
                    .map(|r| (r.rid, r.content.as_str()))
                    .collect();
                let mut acc = acc;
                for r in rows {
                    let Some(content) = r.content.or_else(|| at.get(&r.rid).copied()) else {
                        continue;
                    };
                    f(
                        &mut acc,
                        crate::StoredText {
                            resource_type: r.resource_type,
                            id: r.id,
                            content,
                        },
                    );
                }
                Ok(acc)
            }
        }
    }

    /// Whether statements that list resources with their version (included rows,
    /// `kiln_search::included_rows_sql`; a page with its resources,
    /// `kiln_search::page_with_resources_sql`) should read their JSON too: always on SQLite;
    /// on PostgreSQL unless the resource cache has lately held nine in ten of the rows listed.
    pub fn listed_content(&self) -> bool {
        match self {
            ReadConn::Sqlite(_) => true,
            ReadConn::Postgres(_, cache) => !cache.listed_by_version(),
        }
    }

    /// [`crate::Store::fetch_by_rids`] on this connection.
    pub async fn fetch_by_rids(&mut self, rids: &[i64]) -> Result<Vec<StoredResource>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            ReadConn::Sqlite(c) => c.fetch_by_rids(rids).await,
            ReadConn::Postgres(c, cache) => pg_fetch_by_rids(c, cache, rids).await,
        }
    }
}

impl Pools {
    pub(crate) async fn connect(config: &StoreConfig) -> Result<Pools> {
        match config.database.as_deref() {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                // JIT off: search plans over the index tables cost above `jit_above_cost` and
                // spent ~70 ms per execution compiling expressions (EXPLAIN ANALYZE "JIT: Emission")
                // for queries that run in a few ms; OLTP statements never recoup it.
                // Queries are kept prepared (see `pg_statement`), but planned for their values
                // every time (`force_custom_plan`): after five runs PostgreSQL would otherwise
                // switch to a plan blind to the values, and a search's best plan depends on
                // them (measured: `Observation?patient=…&code=…` 0.17 → 37 ms and
                // `Observation?date=ge…&_sort=-date` 1 → 38 ms under the generic plan).
                let opts = sqlx::postgres::PgConnectOptions::from_str(url)?
                    .options([("jit", "off"), ("plan_cache_mode", "force_custom_plan")]);
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections.max(2))
                    .acquire_timeout(BUSY_TIMEOUT)
                    // no ping before every acquire: a round trip per statement (sqlx still
                    // pings on release, and a broken connection fails its statement once)
                    .test_before_acquire(false)
                    .connect_with(opts)
                    .await?;
                Ok(Pools::Postgres {
                    pool,
                    url: redact(url),
                    cache: Arc::new(ResourceCache::new(config.resource_cache_bytes)),
                })
            }
            Some(url) if url.starts_with("sqlite:") => {
                // the rusqlite readers open the file by name: an in-memory database (one per
                // connection, or shared-cache with table locks) cannot serve them
                if url.contains(":memory:") || url.contains("mode=memory") {
                    return Err(StoreError::Config(format!(
                        "in-memory SQLite (`{url}`) is not supported: use a file"
                    )));
                }
                let opts = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
                Self::sqlite(opts, url.to_string(), config).await
            }
            Some(other) => Err(StoreError::Config(format!(
                "unsupported --database URL `{other}`: use postgres://… or sqlite://…"
            ))),
            None => {
                std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                    StoreError::Config(format!(
                        "cannot create data directory {}: {e}",
                        config.data_dir.display()
                    ))
                })?;
                let path = config.data_dir.join("kiln.db");
                let opts = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true);
                Self::sqlite(opts, path.display().to_string(), config).await
            }
        }
    }

    async fn sqlite(
        opts: SqliteConnectOptions,
        path: String,
        config: &StoreConfig,
    ) -> Result<Pools> {
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if config.sqlite_synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(false)
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory")
            // pages read from the OS page cache shared by every connection instead of being
            // copied into each connection's own cache
            .pragma("mmap_size", "1073741824");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            // the ping is a round trip to the connection's worker thread; a local file does
            // not hang up
            .test_before_acquire(false)
            .connect_with(opts.clone())
            .await?;
        let file = opts.get_filename().to_path_buf();
        let read = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(BUSY_TIMEOUT)
            .test_before_acquire(false)
            .connect_with(opts.read_only(false))
            .await?;
        // same pragmas, opened on first use (the writer above created the file)
        let readers = SqliteReaders::new(
            file,
            config.max_connections.max(1) as usize,
            sqlite_read::ReadMode::from_env(),
        );
        Ok(Pools::Sqlite {
            read,
            write,
            readers,
            path,
        })
    }

    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Pools::Sqlite { .. } => Dialect::Sqlite,
            Pools::Postgres { .. } => Dialect::Postgres,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Pools::Sqlite { path, .. } => format!("SQLite {path}"),
            Pools::Postgres { url, .. } => format!("PostgreSQL {url}"),
        }
    }

    pub(crate) async fn read_current(&self, ty: &str, id: &str) -> Result<Option<StoredResource>> {
        let sql =
            format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE res_type = $1 AND res_id = $2");
        match self {
            Pools::Sqlite { readers, .. } => {
                let params = vec![SqlValue::Text(ty.into()), SqlValue::Text(id.into())];
                let mut c = readers.acquire().await?;
                c.query_opt(sql, params, sqlite_read::stored_resource).await
            }
            Pools::Postgres { pool, .. } => {
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(ty)
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
                stored_opt(row)
            }
        }
    }

    pub(crate) async fn read_version(
        &self,
        ty: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>> {
        let sql = format!(
            "SELECT {RESOURCE_COLUMNS} FROM resource_history \
             WHERE res_type = $1 AND res_id = $2 AND version = $3"
        );
        match self {
            Pools::Sqlite { readers, .. } => {
                let params = vec![
                    SqlValue::Text(ty.into()),
                    SqlValue::Text(id.into()),
                    SqlValue::Int(version),
                ];
                let mut c = readers.acquire().await?;
                c.query_opt(sql, params, sqlite_read::stored_resource).await
            }
            Pools::Postgres { pool, .. } => {
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(ty)
                    .bind(id)
                    .bind(version)
                    .fetch_optional(pool)
                    .await?;
                stored_opt(row)
            }
        }
    }

    pub(crate) async fn fetch_by_rids(&self, rids: &[i64]) -> Result<Vec<StoredResource>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Pools::Sqlite { readers, .. } => readers.acquire().await?.fetch_by_rids(rids).await,
            Pools::Postgres { pool, cache, .. } => {
                let mut c = pool.acquire().await?;
                pg_fetch_by_rids(&mut c, cache, rids).await
            }
        }
    }

    pub(crate) async fn query_rows(
        &self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Vec<Vec<SqlValue>>> {
        match self {
            Pools::Sqlite { readers, .. } => readers.acquire().await?.query_rows(sql, params).await,
            Pools::Postgres { pool, .. } => query_rows_on!(pool, sql, params),
        }
    }

    /// One pooled reader connection, held until the returned value is dropped (several
    /// statements of one request without a pool round trip each).
    pub(crate) async fn reader(&self) -> Result<ReadConn> {
        Ok(match self {
            Pools::Sqlite { readers, .. } => ReadConn::Sqlite(readers.acquire().await?),
            Pools::Postgres { pool, cache, .. } => {
                ReadConn::Postgres(pool.acquire().await?, cache.clone())
            }
        })
    }

    pub(crate) async fn count(&self, ty: Option<&str>) -> Result<i64> {
        let rows = match ty {
            Some(t) => {
                self.query_rows(
                    "SELECT COUNT(*) FROM resources WHERE res_type = $1 AND deleted = 0",
                    &[SqlValue::Text(t.into())],
                )
                .await?
            }
            None => {
                self.query_rows("SELECT COUNT(*) FROM resources WHERE deleted = 0", &[])
                    .await?
            }
        };
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .and_then(SqlValue::as_i64)
            .unwrap_or(0))
    }

    pub(crate) async fn close(&self) {
        match self {
            Pools::Sqlite {
                read,
                write,
                readers,
                ..
            } => {
                readers.close();
                read.close().await;
                // a clean close checkpoints the WAL into the main database file
                if let Ok(mut c) = write.acquire().await {
                    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .execute(&mut *c)
                        .await;
                }
                write.close().await;
            }
            Pools::Postgres { pool, .. } => pool.close().await,
        }
    }
}

fn redact(url: &str) -> String {
    // hide a password in postgres://user:pass@host/db
    if let Some(at) = url.find('@') {
        if let Some(scheme_end) = url.find("://") {
            let userinfo = &url[scheme_end + 3..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                );
            }
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_password() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    /// A SQLite store in a fresh directory (dropped with the directory).
    async fn sqlite_store(max_connections: u32) -> (tempfile::TempDir, crate::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(
            &crate::StoreConfig {
                data_dir: dir.path().to_path_buf(),
                max_connections,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        (dir, store)
    }

    /// Commits one Basic resource per id, `code.text` = `text(id)`; their rids.
    async fn put_basics(
        store: &crate::Store,
        ids: &[&str],
        text: impl Fn(&str) -> String,
    ) -> Vec<i64> {
        let mut tx = store.begin().await.unwrap();
        let mut rids = Vec::new();
        for id in ids {
            let r = serde_json::json!({"resourceType": "Basic", "code": {"text": text(id)}});
            rids.push(tx.put("Basic", id, r, None, "POST").await.unwrap().rid);
        }
        tx.commit().await.unwrap();
        rids
    }

    /// `fold_listed` on SQLite: the JSON given with a row is used as is, a row without it is
    /// read, a row whose resource is gone is left out; the order given is kept.
    #[tokio::test]
    async fn sqlite_fold_listed_reads_what_was_not_given() {
        use crate::ListedRow;
        let (_dir, store) = sqlite_store(1).await;
        let rids = put_basics(&store, &["a", "b"], str::to_string).await;
        let row = |rid: i64, id: &'static str, content: Option<&'static str>| ListedRow {
            rid,
            version: 1,
            resource_type: "Basic",
            id,
            content,
        };
        let listed = [
            row(rids[1], "b", None),
            row(rids[0], "a", Some("{\"given\":true}")),
            row(rids[1] + 100, "gone", None),
        ];
        let mut db = store.reader().await.unwrap();
        let out = db
            .fold_listed(&listed, Vec::new(), |acc: &mut Vec<String>, r| {
                acc.push(format!("{}:{}", r.id, r.content))
            })
            .await
            .unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("b:{") && out[0].contains("\"text\":\"b\""),
            "{out:?}"
        );
        assert_eq!(out[1], "a:{\"given\":true}");
        assert!(db.listed_content(), "SQLite lists the JSON");
        drop(db);
        store.close().await;
    }

    /// `fold_included` on SQLite: the rids the statement lists (repeated, out of order, one
    /// deleted, one of the page's) are read once each, in rid order, without the page's and
    /// the deleted one.
    #[tokio::test]
    async fn sqlite_fold_included_keeps_each_rid_once_in_order_without_the_page() {
        use crate::SqlValue;
        let (_dir, store) = sqlite_store(1).await;
        let rids = put_basics(&store, &["a", "b", "c", "d"], str::to_string).await;
        let mut tx = store.begin().await.unwrap();
        let cur = tx.current("Basic", "c").await.unwrap().unwrap();
        tx.delete("Basic", "c", &cur).await.unwrap();
        tx.commit().await.unwrap();
        // every Basic's rid twice, in descending order (the deleted `c` still has its row)
        let sql = "SELECT rid FROM resources WHERE res_type = $1 UNION ALL \
                   SELECT rid FROM resources WHERE res_type = $1 ORDER BY 1 DESC";
        let mut db = store.reader().await.unwrap();
        let out = db
            .fold_included(
                sql,
                &[SqlValue::Text("Basic".into())],
                &[rids[1]],
                Vec::new(),
                |acc: &mut Vec<String>, r| acc.push(r.id.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(out, ["a", "d"]);
        drop(db);
        store.close().await;
    }

    /// One reader connection runs several statements: rows in the caller's order, deleted
    /// resources left out, bound values and a later commit seen by the next statement.
    #[tokio::test]
    async fn reader_connection_runs_several_statements() {
        use crate::SqlValue;
        let (_dir, store) = sqlite_store(1).await;
        let rids = put_basics(&store, &["a", "b", "c"], str::to_string).await;
        let mut tx = store.begin().await.unwrap();
        let cur = tx.current("Basic", "b").await.unwrap().unwrap();
        tx.delete("Basic", "b", &cur).await.unwrap();
        tx.commit().await.unwrap();

        let mut db = store.reader().await.unwrap();
        let rows = db
            .query_rows(
                "SELECT res_id FROM resources WHERE res_type = $1 AND deleted = 0 ORDER BY rid",
                &[SqlValue::Text("Basic".into())],
            )
            .await
            .unwrap();
        let ids: Vec<&str> = rows.iter().filter_map(|r| r[0].as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        let found = db
            .fetch_by_rids(&[rids[2], rids[1], rids[0]])
            .await
            .unwrap();
        let ids: Vec<&str> = found.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c", "a"], "caller's order, deleted left out");
        assert!(found[0].content.contains("\"text\":\"c\""));
        assert!(db.fetch_by_rids(&[]).await.unwrap().is_empty());
        // the pool's only reader is held: the statement after a write still sees it
        let mut tx = store.begin().await.unwrap();
        let r = serde_json::json!({"resourceType": "Basic"});
        tx.put("Basic", "d", r, None, "POST").await.unwrap();
        tx.commit().await.unwrap();
        let rows = db
            .query_rows("SELECT COUNT(*) FROM resources WHERE deleted = 0", &[])
            .await
            .unwrap();
        assert_eq!(rows[0][0].as_i64(), Some(3));
        drop(db);
        // given back: the pool of one serves the next request
        assert_eq!(store.count(Some("Basic")).await.unwrap(), 3);
    }

    /// The statement text a PostgreSQL read is kept prepared under names its parameters'
    /// types; statements other than queries are not kept.
    #[test]
    fn pg_statement_keys_by_parameter_types() {
        use super::{pg_statement, SqlValue};
        let sql = "SELECT rid FROM resources WHERE res_type = $1 AND version = $2";
        let (a, keep) = pg_statement(sql, &[SqlValue::Text("Basic".into()), SqlValue::Int(1)]);
        assert!(keep);
        assert_eq!(a, format!("/* ti */ {sql}"));
        let (b, _) = pg_statement(sql, &[SqlValue::Null, SqlValue::Real(1.0)]);
        assert_eq!(b, format!("/* nr */ {sql}"));
        let (c, keep) = pg_statement("  with x AS (SELECT 1) SELECT * FROM x", &[]);
        assert!(keep && c.starts_with("/*  */"), "{c}");
        let (d, keep) = pg_statement("VACUUM (ANALYZE) resources", &[]);
        assert!(!keep);
        assert_eq!(d, "VACUUM (ANALYZE) resources");
    }

    /// On PostgreSQL, one statement text bound with different types in turn (text, NULL,
    /// integer, real) on one kept-prepared connection: every result right; and the rows read by
    /// rid (one array parameter) and folded as borrowed text.
    #[tokio::test]
    async fn postgres_reads_kept_prepared_with_varying_types() {
        use crate::{SqlValue, Store};
        let Some(db) = crate::test_pg::TestDatabase::create("kiln_prep").await else {
            return;
        };
        let store = Store::open(&db.config(1), None).await.unwrap();
        let rids = put_basics(&store, &["a", "b", "c"], str::to_string).await;
        let mut conn = store.reader().await.unwrap();
        // `$1` compared as text, then as a number, over and over (PostgreSQL switches a kept
        // statement to a cached plan after five runs)
        let sql = "SELECT COUNT(*) FROM resources WHERE ($1::text IS NULL OR res_id::text = $1::text OR rid::text = $1::text)";
        for round in 0..8 {
            let cases = [
                (SqlValue::Text("a".into()), 1),
                (SqlValue::Null, 3),
                (SqlValue::Text(rids[1].to_string()), 1),
                (SqlValue::Text("zz".into()), 0),
            ];
            for (v, want) in cases {
                let rows = conn
                    .query_rows(sql, std::slice::from_ref(&v))
                    .await
                    .unwrap();
                assert_eq!(rows[0][0].as_i64(), Some(want), "round {round}: {v:?}");
            }
        }
        let typed = "SELECT $1 + 1";
        for _ in 0..7 {
            let i = conn.query_rows(typed, &[SqlValue::Int(41)]).await.unwrap();
            assert_eq!(i[0][0], SqlValue::Int(42));
            let r = conn
                .query_rows(typed, &[SqlValue::Real(0.5)])
                .await
                .unwrap();
            assert_eq!(r[0][0], SqlValue::Real(1.5));
        }
        let found = conn.fetch_by_rids(&[rids[2], rids[0]]).await.unwrap();
        let ids: Vec<&str> = found.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c", "a"], "caller's order");
        let folded = conn
            .fold_resources(&[rids[2], rids[0], rids[2]], Vec::new(), |acc, r| {
                acc.push(format!("{}/{}", r.resource_type, r.id));
                assert!(r.content.contains("\"resourceType\":\"Basic\""));
            })
            .await
            .unwrap();
        assert_eq!(folded, ["Basic/a", "Basic/c"], "rid order, once each");
        let text = conn
            .fold_text_rows(
                "SELECT res_id, version, NULL::text FROM resources WHERE res_type = $1 ORDER BY rid",
                &[SqlValue::Text("Basic".into())],
                Vec::new(),
                |acc, cols| acc.push(format!("{cols:?}")),
            )
            .await
            .unwrap();
        assert_eq!(
            text,
            [
                "[Some(\"a\"), None, None]",
                "[Some(\"b\"), None, None]",
                "[Some(\"c\"), None, None]"
            ]
        );
        drop(conn);
        store.close().await;
        db.drop().await;
    }

    /// The pool-level reads (one connection per call) see what sqlx's writer committed just
    /// before, and the SQLite readers refuse writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pool_reads_see_the_last_commit() {
        use crate::{HistoryQuery, HistoryScope, SqlValue};
        let (_dir, store) = sqlite_store(2).await;
        assert!(store.read("Basic", "a").await.unwrap().is_none());
        assert_eq!(store.count(None).await.unwrap(), 0);
        for version in 1..=3 {
            let mut tx = store.begin().await.unwrap();
            let r = serde_json::json!({"resourceType": "Basic", "code": {"text": version}});
            let prev = tx.current("Basic", "a").await.unwrap();
            tx.put("Basic", "a", r, prev.as_ref(), "PUT").await.unwrap();
            tx.commit().await.unwrap();
            let cur = store.read("Basic", "a").await.unwrap().unwrap();
            assert_eq!((cur.version, cur.deleted), (version, false));
            assert!(cur.content.contains(&format!("\"text\":{version}")));
            assert_eq!(store.count(Some("Basic")).await.unwrap(), 1);
            let rows = store
                .query_rows(
                    "SELECT version FROM resources WHERE res_type = $1 AND res_id = $2",
                    &[SqlValue::Text("Basic".into()), SqlValue::Text("a".into())],
                )
                .await
                .unwrap();
            assert_eq!(rows, vec![vec![SqlValue::Int(version)]]);
        }
        let v2 = store.vread("Basic", "a", 2).await.unwrap().unwrap();
        assert!(v2.content.contains("\"text\":2"));
        assert!(store.vread("Basic", "a", 4).await.unwrap().is_none());
        let page = store
            .history(&HistoryQuery {
                scope: HistoryScope::Instance("Basic".into(), "a".into()),
                since: None,
                at: None,
                count: 2,
                before: None,
            })
            .await
            .unwrap();
        assert_eq!(page.total, 3);
        let versions: Vec<i64> = page.entries.iter().map(|e| e.version).collect();
        assert_eq!(versions, [3, 2]);
        assert!(page.next.is_some());
        let rid = store.read("Basic", "a").await.unwrap().unwrap().rid;
        assert_eq!(store.fetch_by_rids(&[rid]).await.unwrap().len(), 1);
        let e = store
            .query_rows("DELETE FROM resources", &[])
            .await
            .unwrap_err();
        assert!(matches!(e, crate::StoreError::Sqlite(_)), "{e}");
        assert_eq!(store.count(None).await.unwrap(), 1);
        store.close().await;
    }

    /// The resource cache on PostgreSQL: every read checks the version against the database,
    /// so a write by another node (another `Store` on the same database) is seen at once, a
    /// deleted resource drops out, and a cache of 0 bytes reads the same.
    #[tokio::test]
    async fn postgres_resource_cache_follows_other_nodes_writes() {
        use super::Pools;
        use crate::{SqlValue, Store, StoreConfig};
        let Some(db) = crate::test_pg::TestDatabase::create("kiln_cache").await else {
            return;
        };
        let node_a = Store::open(&db.config(2), None).await.unwrap();
        let node_b = Store::open(&db.config(2), None).await.unwrap();
        let uncached = Store::open(
            &StoreConfig {
                resource_cache_bytes: 0,
                ..db.config(2)
            },
            None,
        )
        .await
        .unwrap();
        let basic = |id: &str, mark: &str| serde_json::json!({"resourceType": "Basic", "code": {"text": format!("{id}-{mark}")}});
        let rids = put_basics(&node_a, &["a", "b", "c"], |id| format!("{id}-v1")).await;
        let held = |store: &Store, rid: i64| match store.pools() {
            Pools::Postgres { cache, .. } => cache.get(rid).map(|c| c.version),
            _ => unreachable!(),
        };
        // what each read returns: `id:text` of every resource, in the order read
        async fn texts(store: &Store, rids: &[i64]) -> [Vec<String>; 4] {
            let text = |content: &str| {
                let v: serde_json::Value = serde_json::from_str(content).unwrap();
                v["code"]["text"].as_str().unwrap().to_string()
            };
            let mut conn = store.reader().await.unwrap();
            let fetched = conn.fetch_by_rids(rids).await.unwrap();
            let folded = conn
                .fold_resources(rids, Vec::new(), |acc: &mut Vec<String>, r| {
                    acc.push(r.content.to_string())
                })
                .await
                .unwrap();
            // the two shapes of included rows: JSON from the cache, JSON in the rows
            let mut included = Vec::new();
            for columns in ["", ", content"] {
                let sql = format!("SELECT rid, version, res_type, res_id{columns} FROM resources WHERE res_type = $1 AND deleted = 0 ORDER BY rid");
                let rows = conn
                    .fold_included(
                        &sql,
                        &[SqlValue::Text("Basic".into())],
                        &[],
                        Vec::new(),
                        |acc: &mut Vec<String>, r| {
                            assert_eq!(r.resource_type, "Basic");
                            acc.push(r.content.to_string())
                        },
                    )
                    .await
                    .unwrap();
                included.push(rows.iter().map(|c| text(c)).collect());
            }
            let [by_version, with_content]: [Vec<String>; 2] = included.try_into().unwrap();
            [
                fetched.iter().map(|r| text(&r.content)).collect(),
                folded.iter().map(|c| text(c)).collect(),
                by_version,
                with_content,
            ]
        }
        let all = [rids[0], rids[1], rids[2]];
        let v1: Vec<String> = ["a-v1", "b-v1", "c-v1"].map(String::from).to_vec();
        assert_eq!(
            texts(&node_a, &all).await,
            [v1.clone(), v1.clone(), v1.clone(), v1.clone()]
        );
        assert_eq!(held(&node_a, rids[0]), Some(1), "read once, held");
        // served from the cache this time (the same answers)
        assert_eq!(
            texts(&node_a, &all).await,
            [v1.clone(), v1.clone(), v1.clone(), v1.clone()]
        );
        // node B writes a new version of `a` and deletes `b`
        let mut tx = node_b.begin().await.unwrap();
        let a = tx.current("Basic", "a").await.unwrap().unwrap();
        tx.put("Basic", "a", basic("a", "v2"), Some(&a), "PUT")
            .await
            .unwrap();
        let b = tx.current("Basic", "b").await.unwrap().unwrap();
        tx.delete("Basic", "b", &b).await.unwrap();
        tx.commit().await.unwrap();
        let now: Vec<String> = ["a-v2", "c-v1"].map(String::from).to_vec();
        assert_eq!(
            texts(&node_a, &all).await,
            [now.clone(), now.clone(), now.clone(), now.clone()]
        );
        assert_eq!(
            held(&node_a, rids[0]),
            Some(2),
            "the new version replaced the old"
        );
        // listed at version 1 before the writes (as a statement's snapshot would have them):
        // the cache holds `b`'s version 1, which is served; it no longer holds `a`'s, which is
        // read now, as its current version; JSON given with a row is used as is
        let listed = [
            crate::ListedRow {
                rid: rids[0],
                version: 1,
                resource_type: "Basic",
                id: "a",
                content: None,
            },
            crate::ListedRow {
                rid: rids[1],
                version: 1,
                resource_type: "Basic",
                id: "b",
                content: None,
            },
            crate::ListedRow {
                rid: rids[2],
                version: 1,
                resource_type: "Basic",
                id: "c",
                content: Some("{\"code\":{\"text\":\"c-given\"}}"),
            },
        ];
        let mut conn = node_a.reader().await.unwrap();
        let out = conn
            .fold_listed(&listed, Vec::new(), |acc: &mut Vec<String>, r| {
                let v: serde_json::Value = serde_json::from_str(r.content).unwrap();
                acc.push(v["code"]["text"].as_str().unwrap().to_string())
            })
            .await
            .unwrap();
        assert_eq!(out, ["a-v2", "b-v1", "c-given"]);
        drop(conn);
        assert_eq!(
            texts(&uncached, &all).await,
            [now.clone(), now.clone(), now.clone(), now.clone()]
        );
        assert_eq!(held(&uncached, rids[0]), None, "0 bytes: nothing held");
        // the caller's order for fetch_by_rids, rid order for the folds
        let mut conn = node_a.reader().await.unwrap();
        let ids: Vec<String> = conn
            .fetch_by_rids(&[rids[2], rids[0]])
            .await
            .unwrap()
            .into_iter()
            .map(|r| format!("{}@{}", r.id, r.version))
            .collect();
        assert_eq!(ids, ["c@1", "a@2"]);
        drop(conn);
        // the cache is what answered: a content changed behind Kiln's back under the same
        // version (never done by Kiln itself) is not seen by the node that holds it
        let pool = match node_b.pools() {
            Pools::Postgres { pool, .. } => pool.clone(),
            _ => unreachable!(),
        };
        sqlx::query(
            "UPDATE resources SET content = '{\"resourceType\":\"Basic\",\"code\":{\"text\":\"c-behind\"}}' WHERE rid = $1",
        )
        .bind(rids[2])
        .execute(&pool)
        .await
        .unwrap();
        let c = [rids[2]];
        let held_c: Vec<String> = ["c-v1"].map(String::from).to_vec();
        let behind: Vec<String> = ["c-behind"].map(String::from).to_vec();
        assert_eq!(texts(&node_a, &c).await[..2], [held_c.clone(), held_c]);
        assert_eq!(texts(&uncached, &c).await[..2], [behind.clone(), behind]);
        for s in [node_a, node_b, uncached] {
            s.close().await;
        }
        db.drop().await;
    }
}
