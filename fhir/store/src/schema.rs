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

pub(crate) async fn migrate(pools: &Pools, extra: Option<SchemaHook>) -> Result<()> {
    let dialect = pools.dialect();
    // (version, statements). Append new migrations; never edit a released one.
    let mut migrations: Vec<(i64, &str, Vec<String>)> = vec![
        (1, "core resource tables", core_migration(dialect)),
        (2, "contained resource rows", contained_migration(dialect)),
        (
            3,
            "loaded code systems (terminology_system, terminology_chunk)",
            crate::terminology::migration(dialect),
        ),
    ];
    if let Some(hook) = extra {
        // Layered schemas (search indexes) are idempotent and re-applied at every start, so a
        // new index table shipped in a later release appears without a numbered migration.
        migrations.push((0, "layered schemas", hook(dialect)));
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
            for (version, description, stmts) in migrations {
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
                    for s in &stmts {
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
            for (version, description, stmts) in migrations {
                let done: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM kiln_migrations WHERE version = $1")
                        .bind(version)
                        .fetch_optional(&mut *tx)
                        .await?;
                if done.is_some() && version != 0 {
                    continue;
                }
                for s in &stmts {
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
