//! The two sqlx backends behind one enum. Code that runs on both is written once inside the
//! `on_backend!` macro and type-checked for each backend, so there are no generic bounds to fight
//! and no `Any` driver overhead.

use std::str::FromStr;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

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
        read: SqlitePool,
        /// A single connection: SQLite has one writer; queueing here is cheaper than lock retries.
        write: SqlitePool,
        path: String,
    },
    Postgres {
        pool: PgPool,
        url: String,
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

/// Decodes one column into a `SqlValue` whatever its SQL type.
macro_rules! decode_column {
    ($row:expr, $i:expr) => {{
        let row = $row;
        let i = $i;
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

impl Pools {
    pub(crate) async fn connect(config: &StoreConfig) -> Result<Pools> {
        match config.database.as_deref() {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                // JIT off: search plans over the index tables cost above `jit_above_cost` and
                // spent ~70 ms per execution compiling expressions (EXPLAIN ANALYZE "JIT: Emission")
                // for queries that run in a few ms; OLTP statements never recoup it.
                let opts =
                    sqlx::postgres::PgConnectOptions::from_str(url)?.options([("jit", "off")]);
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections.max(2))
                    .acquire_timeout(BUSY_TIMEOUT)
                    .connect_with(opts)
                    .await?;
                Ok(Pools::Postgres {
                    pool,
                    url: redact(url),
                })
            }
            Some(url) if url.starts_with("sqlite:") => {
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
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(opts.clone())
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(opts.read_only(false))
            .await?;
        Ok(Pools::Sqlite { read, write, path })
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
        on_read_pool!(self, |p| {
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(ty)
                .bind(id)
                .fetch_optional(p)
                .await?;
            Ok(match row {
                Some(r) => Some(stored_from_row!(&r)),
                None => None,
            })
        })
    }

    pub(crate) async fn read_version(
        &self,
        ty: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>> {
        let sql = "SELECT rid, res_type, res_id, version, last_updated, deleted, content \
                   FROM resource_history WHERE res_type = $1 AND res_id = $2 AND version = $3";
        on_read_pool!(self, |p| {
            let row = sqlx::query(sql)
                .bind(ty)
                .bind(id)
                .bind(version)
                .fetch_optional(p)
                .await?;
            Ok(match row {
                Some(r) => Some(stored_from_row!(&r)),
                None => None,
            })
        })
    }

    pub(crate) async fn fetch_by_rids(&self, rids: &[i64]) -> Result<Vec<StoredResource>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(rids.len());
        for chunk in rids.chunks(500) {
            // row ids are integers: inlined, not bound (sqlx looks up each bound parameter's
            // name, a linear scan in SQLite, so hundreds of them cost quadratic time)
            let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
            let sql = format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE deleted <> 1 AND rid IN ({})",
                list.join(",")
            );
            // the text varies with every page: not worth a slot in the statement cache
            let mut rows: Vec<StoredResource> = on_read_pool!(self, |p| {
                let q = sqlx::query(AssertSqlSafe(sql)).persistent(false);
                let rows = q.fetch_all(p).await?;
                let mut v = Vec::with_capacity(rows.len());
                for r in &rows {
                    v.push(stored_from_row!(r));
                }
                Ok::<_, StoreError>(v)
            })?;
            // keep the caller's order
            let pos: std::collections::HashMap<i64, usize> =
                chunk.iter().enumerate().map(|(i, r)| (*r, i)).collect();
            rows.sort_by_key(|r| pos.get(&r.rid).copied().unwrap_or(usize::MAX));
            out.extend(rows);
        }
        Ok(out)
    }

    pub(crate) async fn query_rows(
        &self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Vec<Vec<SqlValue>>> {
        // see WriteTx::execute: generated SQL is not kept prepared on PostgreSQL
        let persistent = self.dialect() == Dialect::Sqlite;
        on_read_pool!(self, |p| {
            let q = bind_values!(sqlx::query(AssertSqlSafe(sql.to_string())), params)
                .persistent(persistent);
            let rows = q.fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let n = r.len();
                let mut cols = Vec::with_capacity(n);
                for i in 0..n {
                    cols.push(decode_column!(r, i));
                }
                out.push(cols);
            }
            Ok(out)
        })
    }

    pub(crate) async fn count(&self, ty: Option<&str>) -> Result<i64> {
        on_read_pool!(self, |p| {
            let n: i64 = match ty {
                Some(t) => {
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM resources WHERE res_type = $1 AND deleted = 0",
                    )
                    .bind(t)
                    .fetch_one(p)
                    .await?
                }
                None => {
                    sqlx::query_scalar("SELECT COUNT(*) FROM resources WHERE deleted = 0")
                        .fetch_one(p)
                        .await?
                }
            };
            Ok(n)
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Pools::Sqlite { read, write, .. } => {
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
}
