//! Versioned schema migrations, run at start. Each migration runs once, in its own transaction,
//! recorded in `kiln_migrations`. On PostgreSQL an advisory lock keeps several nodes starting at
//! once from racing.

use sqlx::AssertSqlSafe;

use crate::backend::{Dialect, Pools};
use crate::{Result, SchemaHook};

/// Core tables. `resources` holds the current version of every logical resource (search index
/// rows reference its `rid`); `resource_history` every version, including deletions.
fn core_migration(dialect: Dialect) -> Vec<String> {
    let (pk, text, int) = match dialect {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT", "INTEGER"),
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "TEXT", "BIGINT"),
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS resources (
                rid {pk},
                res_type {text} NOT NULL,
                res_id {text} NOT NULL,
                version {int} NOT NULL,
                last_updated {int} NOT NULL,
                deleted {int} NOT NULL DEFAULT 0,
                content {text} NOT NULL,
                UNIQUE (res_type, res_id)
            )"
        ),
        "CREATE INDEX IF NOT EXISTS resources_type_updated ON resources (res_type, last_updated)"
            .to_string(),
        "CREATE INDEX IF NOT EXISTS resources_updated ON resources (last_updated)".to_string(),
        format!(
            "CREATE TABLE IF NOT EXISTS resource_history (
                hid {pk},
                rid {int} NOT NULL,
                res_type {text} NOT NULL,
                res_id {text} NOT NULL,
                version {int} NOT NULL,
                last_updated {int} NOT NULL,
                deleted {int} NOT NULL DEFAULT 0,
                method {text} NOT NULL,
                content {text} NOT NULL,
                UNIQUE (res_type, res_id, version)
            )"
        ),
        "CREATE INDEX IF NOT EXISTS history_type ON resource_history (res_type, hid)".to_string(),
        "CREATE INDEX IF NOT EXISTS history_updated ON resource_history (last_updated)".to_string(),
    ]
}

/// Contained resources (FHIR `contained`) are indexed as rows of their own in `resources`:
/// `deleted = 2` (so every search, read and count that asks for `deleted = 0` skips them),
/// `res_id` = `[container type]/[container id]#[local id]`, `container_rid` = the container's
/// row. They are written and dropped with the container's index rows (see `WriteTx`).
fn contained_migration(dialect: Dialect) -> Vec<String> {
    let int = match dialect {
        Dialect::Sqlite => "INTEGER",
        Dialect::Postgres => "BIGINT",
    };
    vec![
        format!("ALTER TABLE resources ADD COLUMN container_rid {int}"),
        "CREATE INDEX IF NOT EXISTS resources_container ON resources (container_rid) \
         WHERE container_rid IS NOT NULL"
            .to_string(),
    ]
}

/// Migrations 4 and 5: `search_token.res_type` and `search_reference.res_type` (the resource's
/// type; NULL on contained resources' rows), so a token or a reference of one type is a single
/// index range (`search_token_type`, `search_reference_type` (param, ref_type, ref_id, res_type,
/// rid), created by the search schema): a count by token, a page walked in rid order,
/// `_revinclude`/`_has` reading the referencing rows' type and rid from `search_reference_back`.
/// The tables belong to the layered search schema: a database that has one (created by an
/// earlier release) gets the column and every existing row's type here, in place; a new
/// database gets the column from the layered schema's CREATE TABLE, so the guard finds nothing
/// to do.
fn res_type_migration(
    dialect: Dialect,
    version: i64,
    table: &str,
    description: &'static str,
) -> Migration {
    let (guard, add) = match dialect {
        Dialect::Sqlite => (
            format!(
                "SELECT (SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}') \
                 - (SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = 'res_type')"
            ),
            format!("ALTER TABLE {table} ADD COLUMN res_type TEXT"),
        ),
        Dialect::Postgres => (
            format!(
                "SELECT COUNT(*) FROM information_schema.tables t WHERE t.table_schema = current_schema() \
                 AND t.table_name = '{table}' AND NOT EXISTS (SELECT 1 FROM information_schema.columns c \
                 WHERE c.table_schema = current_schema() AND c.table_name = '{table}' AND c.column_name = 'res_type')"
            ),
            format!("ALTER TABLE {table} ADD COLUMN res_type TEXT COLLATE \"C\""),
        ),
    };
    Migration {
        version,
        description,
        only_if: Some(guard),
        statements: vec![
            add,
            // contained resources' rows (deleted = 2) keep NULL; deleted resources have no rows
            format!(
                "UPDATE {table} SET res_type = (SELECT r.res_type FROM resources r \
                 WHERE r.rid = {table}.rid AND r.deleted = 0)"
            ),
        ],
    }
}

/// One numbered migration. `only_if`: a query returning a count; when it is 0 the statements
/// are skipped (the migration is still recorded as applied).
struct Migration {
    version: i64,
    description: &'static str,
    only_if: Option<String>,
    statements: Vec<String>,
}

impl Migration {
    fn new(version: i64, description: &'static str, statements: Vec<String>) -> Migration {
        Migration {
            version,
            description,
            only_if: None,
            statements,
        }
    }
}

pub(crate) async fn migrate(pools: &Pools, extra: Option<SchemaHook>) -> Result<()> {
    let dialect = pools.dialect();
    // (version, statements). Append new migrations; never edit a released one.
    let mut migrations: Vec<Migration> = vec![
        Migration::new(1, "core resource tables", core_migration(dialect)),
        Migration::new(2, "contained resource rows", contained_migration(dialect)),
        Migration::new(
            3,
            "loaded code systems (terminology_system, terminology_chunk)",
            crate::terminology::migration(dialect),
        ),
        res_type_migration(
            dialect,
            4,
            "search_token",
            "search_token.res_type (count by token as one index range)",
        ),
        res_type_migration(
            dialect,
            5,
            "search_reference",
            "search_reference.res_type (searches by reference as one index range)",
        ),
    ];
    if let Some(hook) = extra {
        // Layered schemas (search indexes) are idempotent and re-applied at every start, so a
        // new index table shipped in a later release appears without a numbered migration.
        migrations.push(Migration::new(0, "layered schemas", hook(dialect)));
    }
    match pools {
        Pools::Sqlite { write, .. } => {
            let mut conn = write.acquire().await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS kiln_migrations (version INTEGER PRIMARY KEY, \
                 description TEXT NOT NULL, applied_at INTEGER NOT NULL)",
            )
            .execute(&mut *conn)
            .await?;
            for m in migrations {
                let Migration {
                    version,
                    description,
                    only_if,
                    statements: stmts,
                } = m;
                let done: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM kiln_migrations WHERE version = $1")
                        .bind(version)
                        .fetch_optional(&mut *conn)
                        .await?;
                if done.is_some() && version != 0 {
                    continue;
                }
                sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
                let r: Result<()> = async {
                    let wanted = match &only_if {
                        Some(q) => {
                            sqlx::query_scalar::<_, i64>(AssertSqlSafe(q.clone()))
                                .fetch_one(&mut *conn)
                                .await?
                                > 0
                        }
                        None => true,
                    };
                    for s in stmts.iter().filter(|_| wanted) {
                        sqlx::query(AssertSqlSafe(s.clone()))
                            .execute(&mut *conn)
                            .await?;
                    }
                    if version != 0 {
                        sqlx::query(
                            "INSERT INTO kiln_migrations (version, description, applied_at) \
                             VALUES ($1, $2, $3)",
                        )
                        .bind(version)
                        .bind(description)
                        .bind(crate::now_micros())
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                }
                .await;
                match r {
                    Ok(()) => {
                        sqlx::query("COMMIT").execute(&mut *conn).await?;
                    }
                    Err(e) => {
                        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                        return Err(e);
                    }
                }
            }
        }
        Pools::Postgres { pool, .. } => {
            let mut tx = pool.begin().await?;
            // serialise migrations across nodes
            sqlx::query("SELECT pg_advisory_xact_lock(7243100)")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS kiln_migrations (version BIGINT PRIMARY KEY, \
                 description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .execute(&mut *tx)
            .await?;
            for m in migrations {
                let Migration {
                    version,
                    description,
                    only_if,
                    statements: stmts,
                } = m;
                let done: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM kiln_migrations WHERE version = $1")
                        .bind(version)
                        .fetch_optional(&mut *tx)
                        .await?;
                if done.is_some() && version != 0 {
                    continue;
                }
                let wanted = match &only_if {
                    Some(q) => {
                        sqlx::query_scalar::<_, i64>(AssertSqlSafe(q.clone()))
                            .fetch_one(&mut *tx)
                            .await?
                            > 0
                    }
                    None => true,
                };
                for s in stmts.iter().filter(|_| wanted) {
                    sqlx::query(AssertSqlSafe(s.clone()))
                        .execute(&mut *tx)
                        .await?;
                }
                if version != 0 {
                    sqlx::query(
                        "INSERT INTO kiln_migrations (version, description, applied_at) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(version)
                    .bind(description)
                    .bind(crate::now_micros())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{SchemaHook, SqlValue, Store, StoreConfig};

    /// The layered `search_token` table as a release before migration 4 created it, or as the
    /// search schema creates it now (`res_type`, the `search_token_type` index).
    fn hook(new: bool) -> SchemaHook {
        Arc::new(move |_d| {
            let mut v = vec![format!(
                "CREATE TABLE IF NOT EXISTS search_token (rid BIGINT NOT NULL, param TEXT NOT NULL, \
                 grp INTEGER NOT NULL DEFAULT 0, system TEXT, code TEXT, text_norm TEXT{})",
                if new { ", res_type TEXT" } else { "" }
            )];
            v.push(format!(
                "CREATE TABLE IF NOT EXISTS search_reference (rid BIGINT NOT NULL, param TEXT NOT NULL, \
                 grp INTEGER NOT NULL DEFAULT 0, ref_type TEXT, ref_id TEXT{})",
                if new { ", res_type TEXT" } else { "" }
            ));
            if new {
                v.push("CREATE INDEX IF NOT EXISTS search_token_type ON search_token(param, code, res_type, rid, system)".into());
                v.push("DROP INDEX IF EXISTS search_token_code".into());
                v.push("CREATE INDEX IF NOT EXISTS search_reference_type ON search_reference(param, ref_type, ref_id, res_type, rid)".into());
                v.push("DROP INDEX IF EXISTS search_reference_target".into());
            } else {
                v.push("CREATE INDEX IF NOT EXISTS search_token_code ON search_token(param, code, system, rid)".into());
                v.push("CREATE INDEX IF NOT EXISTS search_reference_target ON search_reference(param, ref_type, ref_id, rid)".into());
            }
            v
        })
    }

    /// A write statement (SQLite readers are `query_only`: writes go through a transaction).
    async fn exec(store: &Store, sql: &str) {
        let mut tx = store.begin().await.unwrap();
        tx.execute(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        tx.commit().await.unwrap();
    }

    async fn texts(store: &Store, sql: &str) -> Vec<Option<String>> {
        store
            .query_rows(sql, &[])
            .await
            .unwrap()
            .into_iter()
            .map(|r| match r.into_iter().next() {
                Some(SqlValue::Text(s)) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// A database of the release before migrations 4 and 5 (token and reference rows without
    /// `res_type`) is upgraded in place: the columns are added and filled from `resources`
    /// (NULL for contained rows), the old indexes replaced; a second start changes nothing.
    async fn upgrade_in_place(config: StoreConfig) {
        let old = Store::open(&config, Some(hook(false))).await.unwrap();
        // as the earlier release left it: migrations 4 and 5 unknown
        exec(&old, "DELETE FROM kiln_migrations WHERE version IN (4, 5)").await;
        exec(
            &old,
            "INSERT INTO resources (rid, res_type, res_id, version, last_updated, deleted, content) VALUES \
             (1, 'Observation', 'o1', 1, 1, 0, '{}'), (2, 'MedicationRequest', 'm1', 1, 1, 0, '{}'), \
             (3, 'Medication', 'MedicationRequest/m1#med', 1, 1, 2, '{}')",
        )
        .await;
        exec(
            &old,
            "INSERT INTO search_token (rid, param, system, code) VALUES \
             (1, 'code', 's', 'x'), (1, 'status', NULL, 'final'), (2, 'status', NULL, 'active'), \
             (3, 'code', 's', 'x')",
        )
        .await;
        exec(
            &old,
            "INSERT INTO search_reference (rid, param, ref_type, ref_id) VALUES \
             (1, 'patient', 'Patient', 'p1'), (2, 'subject', 'Patient', 'p1'), \
             (3, 'manufacturer', 'Organization', 'o1')",
        )
        .await;
        old.close().await;
        for _ in 0..2 {
            let store = Store::open(&config, Some(hook(true))).await.unwrap();
            assert_eq!(
                texts(
                    &store,
                    "SELECT res_type FROM search_token ORDER BY rid, param"
                )
                .await,
                vec![
                    Some("Observation".to_string()),
                    Some("Observation".to_string()),
                    Some("MedicationRequest".to_string()),
                    None
                ]
            );
            assert_eq!(
                texts(
                    &store,
                    "SELECT res_type FROM search_reference ORDER BY rid, param"
                )
                .await,
                vec![
                    Some("Observation".to_string()),
                    Some("MedicationRequest".to_string()),
                    None
                ]
            );
            let applied = store
                .query_rows(
                    "SELECT COUNT(*) FROM kiln_migrations WHERE version IN (4, 5)",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(applied[0][0].as_i64(), Some(2));
            let count = store
                .query_rows(
                    "SELECT COUNT(*) FROM search_token WHERE param = 'code' AND code = 'x' AND res_type = 'Observation'",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(count[0][0].as_i64(), Some(1));
            store.close().await;
        }
    }

    #[tokio::test]
    async fn token_type_upgrade_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        upgrade_in_place(StoreConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        })
        .await;
        // a new database: the layered schema creates the column, the migration finds nothing to do
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let store = Store::open(&config, Some(hook(true))).await.unwrap();
        exec(&store, "INSERT INTO search_token (rid, param, code, res_type) VALUES (1, 'code', 'x', 'Patient')").await;
        exec(&store, "INSERT INTO search_reference (rid, param, ref_id, res_type) VALUES (1, 'link', 'x', 'Patient')").await;
        store.close().await;
    }

    #[tokio::test]
    async fn token_type_upgrade_postgres() {
        let Some(db) = crate::test_pg::TestDatabase::create("kiln_mig").await else {
            return;
        };
        upgrade_in_place(db.config(2)).await;
        db.drop().await;
    }
}
