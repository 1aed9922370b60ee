//! `AuthStore` over sqlx (SQLite or PostgreSQL). One table per record kind, `auth_*`,
//! each `(id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at BIGINT)`; `data` is the JSON record.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Row};

use crate::error::StoreError;
use crate::store::{now, AuthStore, RecordKind};

/// The server's database pool.
#[derive(Clone, Debug)]
pub enum AnyAuthPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// SQL-backed store. Call [`SqlAuthStore::migrate`] once at start-up.
#[derive(Clone, Debug)]
pub struct SqlAuthStore {
    pool: AnyAuthPool,
}

fn db_err(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn parse(data: String) -> Result<Value, StoreError> {
    serde_json::from_str(&data).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(v: &Value) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Runs the same statement on whichever backend the pool is.
macro_rules! with_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            AnyAuthPool::Sqlite($p) => $body,
            AnyAuthPool::Postgres($p) => $body,
        }
    };
}

impl SqlAuthStore {
    pub fn new(pool: AnyAuthPool) -> Self {
        Self { pool }
    }

    /// Creates the `auth_*` tables if absent.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        for kind in RecordKind::ALL {
            let t = kind.table();
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at BIGINT)"
            );
            let index = format!("CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_at)");
            for sql in [create, index] {
                with_pool!(&self.pool, |p| sqlx::query(AssertSqlSafe(sql))
                    .execute(p)
                    .await
                    .map(|_| ())
                    .map_err(db_err))?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl AuthStore for SqlAuthStore {
    async fn put(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let t = kind.table();
        let sql = format!(
            "INSERT INTO {t} (id, data, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at"
        );
        let data = encode(value)?;
        with_pool!(&self.pool, |p| sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(&data)
            .bind(expires_at)
            .execute(p)
            .await
            .map(|_| ())
            .map_err(db_err))?;
        Ok(())
    }

    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError> {
        let t = kind.table();
        let sql = format!(
            "SELECT data FROM {t} WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2)"
        );
        let data: Option<String> = with_pool!(&self.pool, |p| {
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .bind(now())
                .fetch_optional(p)
                .await
                .map_err(db_err)?;
            match row {
                Some(r) => Some(r.try_get::<String, _>(0).map_err(db_err)?),
                None => None,
            }
        });
        data.map(parse).transpose()
    }

    async fn take(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError> {
        let t = kind.table();
        let sql = format!("DELETE FROM {t} WHERE id = $1 RETURNING data, expires_at");
        let row: Option<(String, Option<i64>)> = with_pool!(&self.pool, |p| {
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(p)
                .await
                .map_err(db_err)?;
            match row {
                Some(r) => Some((
                    r.try_get::<String, _>(0).map_err(db_err)?,
                    r.try_get::<Option<i64>, _>(1).map_err(db_err)?,
                )),
                None => None,
            }
        });
        match row {
            Some((data, exp)) if exp.is_none_or(|e| e > now()) => Ok(Some(parse(data)?)),
            _ => Ok(None),
        }
    }

    async fn insert_new(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let t = kind.table();
        let purge = format!(
            "DELETE FROM {t} WHERE id = $1 AND expires_at IS NOT NULL AND expires_at <= $2"
        );
        let insert = format!(
            "INSERT INTO {t} (id, data, expires_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING"
        );
        let data = encode(value)?;
        let n = with_pool!(&self.pool, |p| {
            sqlx::query(AssertSqlSafe(purge))
                .bind(id)
                .bind(now())
                .execute(p)
                .await
                .map_err(db_err)?;
            sqlx::query(AssertSqlSafe(insert))
                .bind(id)
                .bind(&data)
                .bind(expires_at)
                .execute(p)
                .await
                .map_err(db_err)?
                .rows_affected()
        });
        Ok(n == 1)
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<(), StoreError> {
        let t = kind.table();
        let sql = format!("DELETE FROM {t} WHERE id = $1");
        with_pool!(&self.pool, |p| sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .execute(p)
            .await
            .map(|_| ())
            .map_err(db_err))?;
        Ok(())
    }

    async fn list(&self, kind: RecordKind) -> Result<Vec<Value>, StoreError> {
        let t = kind.table();
        let sql =
            format!("SELECT data FROM {t} WHERE expires_at IS NULL OR expires_at > $1 ORDER BY id");
        let rows: Vec<String> = with_pool!(&self.pool, |p| {
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(now())
                .fetch_all(p)
                .await
                .map_err(db_err)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(r.try_get::<String, _>(0).map_err(db_err)?);
            }
            out
        });
        rows.into_iter().map(parse).collect()
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for kind in RecordKind::ALL {
            let t = kind.table();
            let sql = format!("DELETE FROM {t} WHERE expires_at IS NOT NULL AND expires_at <= $1");
            total += with_pool!(&self.pool, |p| sqlx::query(AssertSqlSafe(sql))
                .bind(now())
                .execute(p)
                .await
                .map_err(db_err)?
                .rows_affected());
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuthStoreExt;
    use serde_json::json;

    #[tokio::test]
    async fn sqlite_store_semantics() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let s = SqlAuthStore::new(AnyAuthPool::Sqlite(pool));
        s.migrate().await.unwrap();
        s.migrate().await.unwrap(); // idempotent
        let k = RecordKind::AuthorizationCode;
        s.put(k, "a", &json!({"x": 1}), Some(now() + 60))
            .await
            .unwrap();
        s.put(k, "a", &json!({"x": 2}), Some(now() + 60))
            .await
            .unwrap();
        assert_eq!(s.get(k, "a").await.unwrap(), Some(json!({"x": 2})));
        assert_eq!(s.list(k).await.unwrap().len(), 1);
        assert!(s.take(k, "a").await.unwrap().is_some());
        assert!(s.take(k, "a").await.unwrap().is_none());
        s.put(k, "old", &json!(1), Some(now() - 1)).await.unwrap();
        assert!(s.get(k, "old").await.unwrap().is_none());
        assert!(s.take(k, "old").await.unwrap().is_none());
        assert!(s.remember_jti("c", "j", now() + 60).await.unwrap());
        assert!(!s.remember_jti("c", "j", now() + 60).await.unwrap());
        s.put(RecordKind::Session, "gone", &json!(1), Some(now() - 5))
            .await
            .unwrap();
        assert!(s.purge_expired().await.unwrap() >= 1);
        s.delete(RecordKind::JtiReplay, "x").await.unwrap();
        s.revoke_token_id("jti-1", now() + 100).await.unwrap();
        assert!(s.is_token_id_revoked("jti-1").await.unwrap());
        assert!(!s.is_token_id_revoked("jti-2").await.unwrap());
    }
}
