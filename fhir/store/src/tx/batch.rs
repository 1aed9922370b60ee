//! Batch form of [`WriteTx::put`] for creates: many new resources written with multi-row
//! INSERTs (resource rows, history rows; index rows go through the same pending buffer as a
//! single put), for bulk loads that would otherwise pay one statement per row.

use serde_json::Value;

use super::{Inner, WriteTx};
use crate::{meta, Result, SqlValue, StoreError, StoredResource};

/// Bound parameters per statement: below SQLite's limit (32,766 since 3.32) and PostgreSQL's
/// (65,535).
const MAX_PARAMS: usize = 32_000;
/// JSON bytes per statement (one statement should not hold the whole load's text).
const MAX_BYTES: usize = 4 << 20;
/// Parameters per row of `resources` / `resource_history`.
const RESOURCE_COLS: usize = 6;
const HISTORY_COLS: usize = 8;

impl WriteTx {
    /// Creates every resource of `items` (type, id, content; `id` and `meta` are stamped as by
    /// [`WriteTx::put`]) at version 1, in this transaction, with multi-row
    /// INSERTs: the same rows (resource, history with `method`, index rows) as one
    /// [`WriteTx::put`] with no current version per item, in the order given. None of them may
    /// exist yet (not even as a deletion): an existing `type/id`, or one given twice, is a
    /// [`StoreError::Conflict`] and nothing of the call should be committed (the caller rolls
    /// back, as after a failed put).
    pub async fn create_many(
        &mut self,
        items: Vec<(String, String, Value)>,
        method: &str,
    ) -> Result<Vec<StoredResource>> {
        let mut out = Vec::with_capacity(items.len());
        let mut chunk: Vec<(String, String, Value, String, i64)> = Vec::new();
        let mut bytes = 0usize;
        let rows_per_chunk = MAX_PARAMS / HISTORY_COLS.max(RESOURCE_COLS);
        for (ty, id, mut resource) in items {
            let now = self.store.tick();
            meta::stamp(&mut resource, &id, 1, now);
            let content = serde_json::to_string(&resource)
                .map_err(|e| StoreError::Corrupt(format!("cannot serialise resource: {e}")))?;
            if !chunk.is_empty()
                && (chunk.len() >= rows_per_chunk || bytes + content.len() > MAX_BYTES)
            {
                self.create_chunk(std::mem::take(&mut chunk), method, &mut out)
                    .await?;
                bytes = 0;
            }
            bytes += content.len();
            chunk.push((ty, id, resource, content, now));
        }
        if !chunk.is_empty() {
            self.create_chunk(chunk, method, &mut out).await?;
        }
        Ok(out)
    }

    async fn create_chunk(
        &mut self,
        chunk: Vec<(String, String, Value, String, i64)>,
        method: &str,
        out: &mut Vec<StoredResource>,
    ) -> Result<()> {
        // the index rows of the previous chunk first (bounded memory, same order as puts)
        self.flush_index().await?;
        let sqlite = matches!(self.inner, Inner::Sqlite(_));
        // SQLite: anonymous `?` (see kiln_search::insert_batch: numbered placeholders make sqlx
        // scan every parameter name, quadratic in a multi-row INSERT)
        let values = |rows: usize, cols: usize| {
            let mut s = String::with_capacity(rows * cols * 5);
            let mut n = 0usize;
            for r in 0..rows {
                if r > 0 {
                    s.push(',');
                }
                s.push('(');
                for c in 0..cols {
                    if c > 0 {
                        s.push(',');
                    }
                    n += 1;
                    if sqlite {
                        s.push('?');
                    } else {
                        s.push('$');
                        s.push_str(&n.to_string());
                    }
                }
                s.push(')');
            }
            s
        };
        let sql = format!(
            "INSERT INTO resources (res_type, res_id, version, last_updated, deleted, content) VALUES {} \
             ON CONFLICT (res_type, res_id) DO NOTHING RETURNING rid, res_type, res_id",
            values(chunk.len(), RESOURCE_COLS)
        );
        let mut params = Vec::with_capacity(chunk.len() * RESOURCE_COLS);
        for (ty, id, _, content, now) in &chunk {
            params.push(SqlValue::Text(ty.clone()));
            params.push(SqlValue::Text(id.clone()));
            params.push(SqlValue::Int(1));
            params.push(SqlValue::Int(*now));
            params.push(SqlValue::Int(0));
            params.push(SqlValue::Text(content.clone()));
        }
        let returned = self.query_now(&sql, &params).await?;
        drop(params);
        let mut rids: std::collections::HashMap<(String, String), i64> =
            std::collections::HashMap::with_capacity(returned.len());
        for r in returned {
            let (Some(rid), Some(ty), Some(id)) = (
                r.first().and_then(SqlValue::as_i64),
                r.get(1).and_then(SqlValue::as_str),
                r.get(2).and_then(SqlValue::as_str),
            ) else {
                return Err(StoreError::Corrupt(
                    "INSERT … RETURNING gave an unexpected row".into(),
                ));
            };
            rids.insert((ty.to_string(), id.to_string()), rid);
        }
        let mut hist_params = Vec::with_capacity(chunk.len() * HISTORY_COLS);
        let mut written = Vec::with_capacity(chunk.len());
        for (ty, id, resource, content, now) in chunk {
            // a row given twice gets one rid: the second is the conflict
            let Some(rid) = rids.remove(&(ty.clone(), id.clone())) else {
                return Err(StoreError::Conflict(format!(
                    "{ty}/{id} already exists (or was created concurrently)"
                )));
            };
            hist_params.push(SqlValue::Int(rid));
            hist_params.push(SqlValue::Text(ty.clone()));
            hist_params.push(SqlValue::Text(id.clone()));
            hist_params.push(SqlValue::Int(1));
            hist_params.push(SqlValue::Int(now));
            hist_params.push(SqlValue::Int(0));
            hist_params.push(SqlValue::Text(method.to_string()));
            hist_params.push(SqlValue::Text(content.clone()));
            written.push((rid, resource));
            out.push(StoredResource {
                rid,
                resource_type: ty,
                id,
                version: 1,
                last_updated: now,
                deleted: false,
                content,
            });
        }
        let sql = format!(
            "INSERT INTO resource_history (rid, res_type, res_id, version, last_updated, deleted, method, content) VALUES {}",
            values(written.len(), HISTORY_COLS)
        );
        self.execute_now(&sql, &hist_params).await?;
        if self.indexer.is_some() {
            self.pending.extend(written);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{Store, StoreConfig, StoreError};

    async fn batch_creates(store: &Store) {
        // enough rows and bytes for several statements (≈ 5 MB of JSON > MAX_BYTES)
        let big = "x".repeat(1000);
        let items: Vec<(String, String, serde_json::Value)> = (0..5000)
            .map(|i| {
                let ty = if i % 2 == 0 { "CodeSystem" } else { "ValueSet" };
                (
                    ty.to_string(),
                    format!("r{i}"),
                    json!({"resourceType": ty, "url": format!("http://example.org/{i}"), "description": big}),
                )
            })
            .collect();
        let mut tx = store.begin().await.unwrap();
        let stored = tx.create_many(items, "POST").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(stored.len(), 5000);
        for (i, s) in stored.iter().enumerate() {
            assert_eq!(s.id, format!("r{i}"), "in the order given");
            assert_eq!(s.version, 1);
        }
        let mut rids: Vec<i64> = stored.iter().map(|s| s.rid).collect();
        rids.sort_unstable();
        rids.dedup();
        assert_eq!(rids.len(), 5000, "one row each");
        // what a read returns: the content with id and meta stamped
        let r = store.read("ValueSet", "r4999").await.unwrap().unwrap();
        assert_eq!(r.rid, stored[4999].rid);
        let v: serde_json::Value = serde_json::from_str(&r.content).unwrap();
        assert_eq!(v["id"], "r4999");
        assert_eq!(v["meta"]["versionId"], "1");
        assert_eq!(v["url"], "http://example.org/4999");
        assert_eq!(r.content, stored[4999].content);
        let h = store.vread("CodeSystem", "r0", 1).await.unwrap().unwrap();
        assert_eq!(h.content, stored[0].content);
        assert_eq!(store.count(Some("CodeSystem")).await.unwrap(), 2500);
        let rows = store
            .query_rows(
                "SELECT count(*) FROM resource_history WHERE method = 'POST'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows[0][0].as_i64(), Some(5000));

        // an existing id, or one given twice, is a conflict; nothing of the batch is kept
        for items in [
            vec![("CodeSystem", "new-1"), ("CodeSystem", "r0")],
            vec![("CodeSystem", "new-1"), ("CodeSystem", "new-1")],
        ] {
            let items = items
                .into_iter()
                .map(|(t, i)| (t.to_string(), i.to_string(), json!({"resourceType": t})))
                .collect();
            let mut tx = store.begin().await.unwrap();
            let e = tx.create_many(items, "POST").await.unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
            tx.rollback().await.unwrap();
            assert!(store.read("CodeSystem", "new-1").await.unwrap().is_none());
        }
        assert_eq!(store.count(Some("CodeSystem")).await.unwrap(), 2500);
        // an empty batch writes nothing
        let mut tx = store.begin().await.unwrap();
        assert!(tx.create_many(Vec::new(), "POST").await.unwrap().is_empty());
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn create_many_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StoreConfig {
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        batch_creates(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn create_many_postgres() {
        let Some(db) = crate::test_pg::TestDatabase::create("kiln_batch").await else {
            return;
        };
        let store = Store::open(&db.config(4), None).await.unwrap();
        batch_creates(&store).await;
        store.close().await;
        db.drop().await;
    }
}
