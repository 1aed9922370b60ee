//! Write transactions. Every write of Kiln (one interaction or a whole transaction Bundle) runs
//! in one `WriteTx`: resource row, history row and search index rows commit together or not at all.

use std::sync::Arc;

use serde_json::Value;
use sqlx::{AssertSqlSafe, Postgres, Row, Sqlite, Transaction};

use crate::backend::{bind_values, decode_column, stored_from_row, Pools};
use crate::{meta, Dialect, Result, SqlValue, Store, StoreError, StoredResource};

/// What a write needs to know about the current version of a resource.
#[derive(Debug, Clone)]
pub struct Current {
    pub rid: i64,
    pub version: i64,
    pub deleted: bool,
    pub last_updated: i64,
}

/// Writes search index rows for a resource version (implemented by the search engine).
pub trait Indexer: Send + Sync {
    /// Statements removing every index row of `$1` = rid.
    fn delete_statements(&self, dialect: Dialect) -> Vec<String>;
    /// Statements inserting the index rows of many resources (`(rid, resource)`), batched into
    /// multi-row INSERTs.
    fn insert_statements(
        &self,
        dialect: Dialect,
        items: &[(i64, Value)],
    ) -> Vec<(String, Vec<SqlValue>)>;
    /// Statements removing every index row of many rows at once (`$reindex` batches). Default:
    /// [`Indexer::delete_statements`] once per row.
    fn delete_many_statements(
        &self,
        dialect: Dialect,
        rids: &[i64],
    ) -> Vec<(String, Vec<SqlValue>)> {
        let deletes = self.delete_statements(dialect);
        rids.iter()
            .flat_map(|rid| {
                deletes
                    .iter()
                    .map(move |d| (d.clone(), vec![SqlValue::Int(*rid)]))
            })
            .collect()
    }
    /// The resources of a version's `contained` array that get index rows of their own:
    /// (position in `contained`, resource type, row id — `[type]/[id]#[local id]` of the
    /// container). Default: none.
    fn contained(&self, _resource: &Value) -> Vec<(usize, String, String)> {
        Vec::new()
    }
    /// Statements inserting the index rows of contained resources: (their row id, the
    /// container, position in its `contained` array). Default: none.
    fn insert_contained_statements(
        &self,
        _dialect: Dialect,
        _items: &[(i64, &Value, usize)],
    ) -> Vec<(String, Vec<SqlValue>)> {
        Vec::new()
    }
}

enum Inner {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

macro_rules! on_tx {
    ($inner:expr, |$c:ident| $body:expr) => {
        match $inner {
            Inner::Sqlite($c) => $body,
            Inner::Postgres($c) => $body,
        }
    };
}

mod batch;

/// An open write transaction. Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx {
    inner: Inner,
    store: Store,
    indexer: Option<Arc<dyn Indexer>>,
    /// Versions written in this transaction whose index rows are not inserted yet: they go in
    /// as multi-row INSERTs before the next query in the transaction, or at commit.
    pending: Vec<(i64, Value)>,
}

impl WriteTx {
    pub(crate) async fn begin(store: &Store) -> Result<WriteTx> {
        let inner = match store.pools() {
            Pools::Sqlite { write, .. } => {
                Inner::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?)
            }
            Pools::Postgres { pool, .. } => Inner::Postgres(pool.begin().await?),
        };
        Ok(WriteTx {
            inner,
            indexer: store.indexer(),
            store: store.clone(),
            pending: Vec::new(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.inner {
            Inner::Sqlite(_) => Dialect::Sqlite,
            Inner::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The current version of a resource, locked for the rest of the transaction (PostgreSQL
    /// `FOR UPDATE`; SQLite already holds the write lock).
    pub async fn current(&mut self, ty: &str, id: &str) -> Result<Option<Current>> {
        let sql = match self.inner {
            Inner::Sqlite(_) => {
                "SELECT rid, version, deleted, last_updated FROM resources WHERE res_type = $1 AND res_id = $2"
            }
            Inner::Postgres(_) => {
                "SELECT rid, version, deleted, last_updated FROM resources WHERE res_type = $1 AND res_id = $2 FOR UPDATE"
            }
        };
        on_tx!(&mut self.inner, |c| {
            let row = sqlx::query(sql)
                .bind(ty)
                .bind(id)
                .fetch_optional(&mut **c)
                .await?;
            match row {
                None => Ok(None),
                Some(r) => Ok(Some(Current {
                    rid: r.try_get(0)?,
                    version: r.try_get(1)?,
                    deleted: r.try_get::<i64, _>(2)? != 0,
                    last_updated: r.try_get(3)?,
                })),
            }
        })
    }

    /// The current content of a resource inside this transaction.
    pub async fn read(&mut self, ty: &str, id: &str) -> Result<Option<StoredResource>> {
        let sql = "SELECT rid, res_type, res_id, version, last_updated, deleted, content FROM resources WHERE res_type = $1 AND res_id = $2";
        on_tx!(&mut self.inner, |c| {
            let row = sqlx::query(sql)
                .bind(ty)
                .bind(id)
                .fetch_optional(&mut **c)
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(stored_from_row!(&r)),
            })
        })
    }

    /// One version of a resource inside this transaction.
    pub async fn vread(
        &mut self,
        ty: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>> {
        let sql = "SELECT rid, res_type, res_id, version, last_updated, deleted, content FROM resource_history WHERE res_type = $1 AND res_id = $2 AND version = $3";
        on_tx!(&mut self.inner, |c| {
            let row = sqlx::query(sql)
                .bind(ty)
                .bind(id)
                .bind(version)
                .fetch_optional(&mut **c)
                .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(stored_from_row!(&r)),
            })
        })
    }

    /// Writes a new version of `ty/id`: version 1 if `current` is `None`, else `current.version + 1`
    /// (a deleted resource comes back to life with the next version). Stamps `id`,
    /// `meta.versionId` and `meta.lastUpdated` into `resource`, and re-indexes it.
    pub async fn put(
        &mut self,
        ty: &str,
        id: &str,
        mut resource: Value,
        current: Option<&Current>,
        method: &str,
    ) -> Result<StoredResource> {
        let version = current.map(|c| c.version + 1).unwrap_or(1);
        let now = self.store.tick();
        meta::stamp(&mut resource, id, version, now);
        let content = serde_json::to_string(&resource)
            .map_err(|e| StoreError::Corrupt(format!("cannot serialise resource: {e}")))?;
        let rid = match current {
            Some(c) => {
                let changed = on_tx!(&mut self.inner, |c2| {
                    sqlx::query(
                        "UPDATE resources SET version = $1, last_updated = $2, deleted = 0, content = $3 \
                         WHERE rid = $4 AND version = $5",
                    )
                    .bind(version)
                    .bind(now)
                    .bind(content.as_str())
                    .bind(c.rid)
                    .bind(c.version)
                    .execute(&mut **c2)
                    .await?
                    .rows_affected()
                });
                if changed != 1 {
                    return Err(StoreError::Conflict(format!(
                        "{ty}/{id} was changed concurrently (expected version {})",
                        c.version
                    )));
                }
                c.rid
            }
            None => {
                let rid: Option<i64> = on_tx!(&mut self.inner, |c2| {
                    sqlx::query_scalar(
                        "INSERT INTO resources (res_type, res_id, version, last_updated, deleted, content) \
                         VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (res_type, res_id) DO NOTHING RETURNING rid",
                    )
                    .bind(ty)
                    .bind(id)
                    .bind(version)
                    .bind(now)
                    .bind(content.as_str())
                    .fetch_optional(&mut **c2)
                    .await?
                });
                rid.ok_or_else(|| {
                    StoreError::Conflict(format!("{ty}/{id} was created concurrently"))
                })?
            }
        };
        self.insert_history(rid, ty, id, version, now, false, method, &content)
            .await?;
        if self.indexer.is_some() {
            if current.is_some() {
                self.run_deletes(rid).await?;
            }
            self.pending.push((rid, resource));
        }
        Ok(StoredResource {
            rid,
            resource_type: ty.to_string(),
            id: id.to_string(),
            version,
            last_updated: now,
            deleted: false,
            content,
        })
    }

    /// Writes a deletion (a versioned tombstone) and drops the resource from every index.
    pub async fn delete(&mut self, ty: &str, id: &str, current: &Current) -> Result<i64> {
        let version = current.version + 1;
        let now = self.store.tick();
        let changed = on_tx!(&mut self.inner, |c| {
            sqlx::query(
                "UPDATE resources SET version = $1, last_updated = $2, deleted = 1, content = '' \
                 WHERE rid = $3 AND version = $4",
            )
            .bind(version)
            .bind(now)
            .bind(current.rid)
            .bind(current.version)
            .execute(&mut **c)
            .await?
            .rows_affected()
        });
        if changed != 1 {
            return Err(StoreError::Conflict(format!(
                "{ty}/{id} was changed concurrently"
            )));
        }
        self.insert_history(current.rid, ty, id, version, now, true, "DELETE", "")
            .await?;
        if self.indexer.is_some() {
            self.run_deletes(current.rid).await?;
        }
        Ok(version)
    }

    /// Drops every search index row of `rid` (pending rows of an earlier version in this
    /// transaction included), and the rows of the resources it contained with theirs.
    async fn run_deletes(&mut self, rid: i64) -> Result<()> {
        self.pending.retain(|(r, _)| *r != rid);
        let Some(ix) = self.indexer.clone() else {
            return Ok(());
        };
        let deletes = ix.delete_statements(self.dialect());
        for sql in &deletes {
            self.execute_now(sql, &[SqlValue::Int(rid)]).await?;
        }
        let contained = self
            .query_now(
                "SELECT rid FROM resources WHERE container_rid = $1",
                &[SqlValue::Int(rid)],
            )
            .await?;
        if !contained.is_empty() {
            for row in &contained {
                if let Some(crid) = row.first().and_then(SqlValue::as_i64) {
                    for sql in &deletes {
                        self.execute_now(sql, &[SqlValue::Int(crid)]).await?;
                    }
                }
            }
            self.execute_now(
                "DELETE FROM resources WHERE container_rid = $1",
                &[SqlValue::Int(rid)],
            )
            .await?;
        }
        Ok(())
    }

    /// Re-computes the index rows of current versions (`(rid, resource)`, `$reindex`): their old
    /// rows and those of the resources they contain are dropped now, the new ones written with
    /// the transaction's other pending rows.
    pub async fn reindex(&mut self, items: Vec<(i64, Value)>) -> Result<()> {
        let Some(ix) = self.indexer.clone() else {
            return Ok(());
        };
        if items.is_empty() {
            return Ok(());
        }
        self.flush_index().await?;
        let list: Vec<String> = items.iter().map(|(rid, _)| rid.to_string()).collect();
        let list = list.join(",");
        let mut rids: Vec<i64> = items.iter().map(|(rid, _)| *rid).collect();
        let contained = self
            .query_now(
                &format!("SELECT rid FROM resources WHERE container_rid IN ({list})"),
                &[],
            )
            .await?;
        rids.extend(
            contained
                .iter()
                .filter_map(|r| r.first().and_then(SqlValue::as_i64)),
        );
        for (sql, params) in ix.delete_many_statements(self.dialect(), &rids) {
            self.execute_now(&sql, &params).await?;
        }
        if !contained.is_empty() {
            self.execute_now(
                &format!("DELETE FROM resources WHERE container_rid IN ({list})"),
                &[],
            )
            .await?;
        }
        self.pending.extend(items);
        Ok(())
    }

    /// Inserts the index rows of every version written since the last flush.
    async fn flush_index(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(ix) = self.indexer.clone() else {
            self.pending.clear();
            return Ok(());
        };
        let pending = std::mem::take(&mut self.pending);
        // contained resources: a row of their own in `resources` (`deleted = 2`, version and
        // lastUpdated of the container), which their index rows point at
        let mut contained: Vec<(i64, &Value, usize)> = Vec::new();
        for (rid, resource) in &pending {
            for (pos, ty, res_id) in ix.contained(resource) {
                let Some(item) = resource.get("contained").and_then(|c| c.get(pos)) else {
                    continue;
                };
                let content = serde_json::to_string(item).map_err(|e| {
                    StoreError::Corrupt(format!("cannot serialise contained resource: {e}"))
                })?;
                // a second contained resource with the same type and id (invalid) is skipped
                let row = self
                    .query_now(
                        "INSERT INTO resources (res_type, res_id, version, last_updated, deleted, content, container_rid) \
                         SELECT $1, $2, c.version, c.last_updated, 2, $3, c.rid FROM resources c WHERE c.rid = $4 \
                         ON CONFLICT (res_type, res_id) DO NOTHING RETURNING rid",
                        &[
                            SqlValue::Text(ty),
                            SqlValue::Text(res_id),
                            SqlValue::Text(content),
                            SqlValue::Int(*rid),
                        ],
                    )
                    .await?;
                if let Some(crid) = row
                    .first()
                    .and_then(|r| r.first())
                    .and_then(SqlValue::as_i64)
                {
                    contained.push((crid, resource, pos));
                }
            }
        }
        let mut statements = ix.insert_statements(self.dialect(), &pending);
        statements.extend(ix.insert_contained_statements(self.dialect(), &contained));
        for (sql, params) in statements {
            self.execute_now(&sql, &params).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_history(
        &mut self,
        rid: i64,
        ty: &str,
        id: &str,
        version: i64,
        now: i64,
        deleted: bool,
        method: &str,
        content: &str,
    ) -> Result<()> {
        on_tx!(&mut self.inner, |c| {
            sqlx::query(
                "INSERT INTO resource_history (rid, res_type, res_id, version, last_updated, deleted, method, content) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(rid)
            .bind(ty)
            .bind(id)
            .bind(version)
            .bind(now)
            .bind(deleted as i64)
            .bind(method)
            .bind(content)
            .execute(&mut **c)
            .await?;
            Ok::<_, StoreError>(())
        })
    }

    /// Runs a statement inside the transaction (after the pending index rows, so it sees them).
    pub async fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        self.flush_index().await?;
        self.execute_now(sql, params).await
    }

    async fn execute_now(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        // PostgreSQL: statements generated at run time are not kept prepared. sqlx caches a
        // prepared statement by SQL text with the parameter types of its first execution, and
        // the search planner binds the same text with different types (NULL vs text, int vs
        // real), which PostgreSQL would reject or silently misread.
        let persistent = self.dialect() == Dialect::Sqlite;
        on_tx!(&mut self.inner, |c| {
            let q = bind_values!(sqlx::query(AssertSqlSafe(sql.to_string())), params)
                .persistent(persistent);
            Ok(q.execute(&mut **c).await?.rows_affected())
        })
    }

    /// Runs a query inside the transaction (conditional interactions search here, so they see
    /// the transaction's own earlier writes).
    pub async fn query_rows(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<Vec<Vec<SqlValue>>> {
        self.flush_index().await?;
        self.query_now(sql, params).await
    }

    async fn query_now(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<Vec<SqlValue>>> {
        let persistent = self.dialect() == Dialect::Sqlite;
        on_tx!(&mut self.inner, |c| {
            let q = bind_values!(sqlx::query(AssertSqlSafe(sql.to_string())), params)
                .persistent(persistent);
            let rows = q.fetch_all(&mut **c).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut cols = Vec::with_capacity(r.len());
                for i in 0..r.len() {
                    cols.push(decode_column!(r, i));
                }
                out.push(cols);
            }
            Ok(out)
        })
    }

    /// Takes a transaction-scoped lock named by `key` (PostgreSQL advisory lock; SQLite already
    /// serialises writers). Conditional creates lock on their type so two concurrent
    /// `If-None-Exist` creates cannot both create.
    pub async fn lock(&mut self, key: &str) -> Result<()> {
        if let Inner::Postgres(c) = &mut self.inner {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(key)
                .execute(&mut **c)
                .await?;
        }
        Ok(())
    }

    pub async fn commit(mut self) -> Result<()> {
        self.flush_index().await?;
        match self.inner {
            Inner::Sqlite(t) => t.commit().await?,
            Inner::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self.inner {
            Inner::Sqlite(t) => t.rollback().await?,
            Inner::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}
