//! `$reindex`: re-computes the search index rows of stored resources, e.g. after a custom
//! SearchParameter was added (rows are otherwise only written when a resource is written).
//! Contained resources are re-indexed with their container.
//!
//! - `POST [base]/[type]/[id]/$reindex` runs at once and returns a `Parameters` result.
//! - `POST [base]/[type]/$reindex` and `POST [base]/$reindex` start a background job and return
//!   `202 Accepted` with `Content-Location: [base]/$reindex-status?job=[id]`. The job walks the
//!   resources in `rid` order in batches of [`BATCH`], each batch its own committed transaction
//!   (so concurrent writes interleave with it), and records its progress (`processed`, the last
//!   `rid` done, a heartbeat) in the same transaction as the batch's index rows.
//! - `GET [base]/$reindex-status?job=[id]` reports `state` (`running`/`completed`/`failed`),
//!   `processed`, `total`, `started`, `finished`, `error`, and `resumed` (how often the job was
//!   taken over after an interruption).
//!
//! Jobs live in the `reindex_jobs` table of the store's database, so any node of a shared
//! PostgreSQL database (and a restarted node) answers `$reindex-status`. A job interrupted by a
//! crash or a stop is **resumed**, not restarted: a running job whose heartbeat is older than
//! [`STALE_AFTER`] is claimed by the first node that sees it (every [`RESUME_POLL`], and when its
//! status is asked for) and continues after the last batch that committed; nothing is
//! re-indexed twice and none is skipped. The claim is one conditional UPDATE, and every batch
//! checks that its node still owns the job, so two nodes never run one job.

use std::sync::{Arc, OnceLock};

use axum::http::{header, StatusCode};
use kiln_store::{Dialect, SqlValue};
use serde_json::{json, Value};

use super::{param_str, BoxFuture, Definition, Operation, Target};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::RequestContext;
use crate::state::AppState;

/// Resources per transaction.
pub const BATCH: i64 = 500;

/// A running job whose heartbeat is older than this is taken as interrupted.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a node looks for interrupted jobs to resume.
pub const RESUME_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// The `reindex_jobs` table (idempotent; part of the layered schema).
pub fn schema(d: Dialect) -> Vec<String> {
    let int = match d {
        Dialect::Sqlite => "INTEGER",
        Dialect::Postgres => "BIGINT",
    };
    vec![format!(
        "CREATE TABLE IF NOT EXISTS reindex_jobs (
            job_id TEXT PRIMARY KEY,
            resource_type TEXT,
            state TEXT NOT NULL,
            processed {int} NOT NULL DEFAULT 0,
            total {int} NOT NULL DEFAULT 0,
            after_rid {int} NOT NULL DEFAULT 0,
            started {int} NOT NULL,
            finished {int},
            error TEXT,
            owner TEXT NOT NULL,
            heartbeat {int} NOT NULL,
            resumed {int} NOT NULL DEFAULT 0
        )"
    )]
}

/// This process's identity as a job owner.
fn node_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

#[derive(Debug, Clone, PartialEq)]
struct Job {
    /// The resource type, `None` = every type.
    resource_type: Option<String>,
    state: String,
    processed: i64,
    total: i64,
    started: i64,
    finished: Option<i64>,
    error: Option<String>,
    resumed: i64,
}

const JOB_COLUMNS: &str =
    "resource_type, state, processed, total, started, finished, error, resumed, heartbeat";

fn job_from_row(r: &[SqlValue]) -> (Job, i64) {
    let text = |i: usize| r.get(i).and_then(SqlValue::as_str).map(str::to_string);
    let int = |i: usize| r.get(i).and_then(SqlValue::as_i64);
    (
        Job {
            resource_type: text(0),
            state: text(1).unwrap_or_default(),
            processed: int(2).unwrap_or(0),
            total: int(3).unwrap_or(0),
            started: int(4).unwrap_or(0),
            finished: int(5),
            error: text(6),
            resumed: int(7).unwrap_or(0),
        },
        int(8).unwrap_or(0),
    )
}

async fn load_job(state: &AppState, id: &str) -> FhirResult<Option<(Job, i64)>> {
    let rows = state
        .store
        .query_rows(
            &format!("SELECT {JOB_COLUMNS} FROM reindex_jobs WHERE job_id = $1"),
            &[SqlValue::Text(id.to_string())],
        )
        .await?;
    Ok(rows.first().map(|r| job_from_row(r)))
}

pub struct Reindex {
    def: Definition,
}

pub struct ReindexStatus {
    def: Definition,
}

/// `$reindex` and `$reindex-status` (sharing the `reindex_jobs` table).
pub fn all() -> Vec<Arc<dyn Operation>> {
    vec![
        Arc::new(Reindex {
            def: Definition {
                name: "reindex",
                canonical: "urn:kiln:OperationDefinition:reindex",
                system: true,
                type_level: true,
                instance: true,
                resource_types: &[],
                affects_state: true,
            },
        }),
        Arc::new(ReindexStatus {
            def: Definition {
                name: "reindex-status",
                canonical: "urn:kiln:OperationDefinition:reindex-status",
                system: true,
                type_level: false,
                instance: false,
                resource_types: &[],
                affects_state: false,
            },
        }),
    ]
}

fn status_parameters(id: &str, job: &Job) -> Value {
    let mut p = vec![
        json!({"name": "job", "valueString": id}),
        json!({"name": "state", "valueCode": job.state}),
        json!({"name": "processed", "valueInteger": job.processed}),
        json!({"name": "total", "valueInteger": job.total.max(job.processed)}),
        json!({"name": "started", "valueInstant": kiln_store::format_instant(job.started)}),
    ];
    if let Some(t) = &job.resource_type {
        p.push(json!({"name": "resourceType", "valueCode": t}));
    }
    if let Some(f) = job.finished {
        p.push(json!({"name": "finished", "valueInstant": kiln_store::format_instant(f)}));
    }
    if let Some(e) = &job.error {
        p.push(json!({"name": "error", "valueString": e}));
    }
    if job.resumed > 0 {
        p.push(json!({"name": "resumed", "valueInteger": job.resumed}));
    }
    json!({"resourceType": "Parameters", "parameter": p})
}

/// Runs one writing statement in its own transaction (on SQLite through the single writer).
async fn write(state: &AppState, sql: &str, params: &[SqlValue]) -> FhirResult<Vec<Vec<SqlValue>>> {
    let mut tx = state.store.begin().await?;
    let rows = tx.query_rows(sql, params).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Claims a running job whose heartbeat is stale for this node; true if this node got it.
async fn claim_stale(state: &AppState, id: &str) -> FhirResult<bool> {
    let now = kiln_store::now_micros();
    let stale = now - STALE_AFTER.as_micros() as i64;
    let rows = write(
        state,
        "UPDATE reindex_jobs SET owner = $1, heartbeat = $2, resumed = resumed + 1 \
             WHERE job_id = $3 AND state = 'running' AND heartbeat < $4 RETURNING job_id",
        &[
            SqlValue::Text(node_id().to_string()),
            SqlValue::Int(now),
            SqlValue::Text(id.to_string()),
            SqlValue::Int(stale),
        ],
    )
    .await?;
    Ok(!rows.is_empty())
}

/// Resumes every interrupted job (running, heartbeat stale) this node can claim. Called every
/// [`RESUME_POLL`] by `serve`.
pub async fn resume_interrupted(state: &AppState) -> FhirResult<usize> {
    let stale = kiln_store::now_micros() - STALE_AFTER.as_micros() as i64;
    let rows = state
        .store
        .query_rows(
            "SELECT job_id FROM reindex_jobs WHERE state = 'running' AND heartbeat < $1",
            &[SqlValue::Int(stale)],
        )
        .await?;
    let mut n = 0;
    for r in rows {
        let Some(id) = r.first().and_then(SqlValue::as_str) else {
            continue;
        };
        if claim_stale(state, id).await? {
            tracing::info!(job = id, "resuming an interrupted $reindex job");
            tokio::spawn(run_job(state.clone(), id.to_string()));
            n += 1;
        }
    }
    Ok(n)
}

/// One batch: the next resources after the job's last `rid`, re-indexed in one transaction
/// with the job's progress. `None` when the job is done (nothing left) or no longer ours.
async fn run_batch(state: &AppState, id: &str) -> FhirResult<Option<usize>> {
    let rows = state
        .store
        .query_rows(
            "SELECT resource_type, after_rid FROM reindex_jobs WHERE job_id = $1 AND owner = $2 AND state = 'running'",
            &[SqlValue::Text(id.to_string()), SqlValue::Text(node_id().to_string())],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let resource_type = row.first().and_then(SqlValue::as_str).map(str::to_string);
    let after = row.get(1).and_then(SqlValue::as_i64).unwrap_or(0);
    let (sql, mut params) = match &resource_type {
        Some(t) => (
            format!("SELECT rid FROM resources WHERE res_type = $2 AND deleted = 0 AND rid > $1 ORDER BY rid LIMIT {BATCH}"),
            vec![SqlValue::Text(t.clone())],
        ),
        None => (
            format!("SELECT rid FROM resources WHERE deleted = 0 AND rid > $1 ORDER BY rid LIMIT {BATCH}"),
            vec![],
        ),
    };
    params.insert(0, SqlValue::Int(after));
    let rids: Vec<i64> = state
        .store
        .query_rows(&sql, &params)
        .await?
        .iter()
        .filter_map(|r| r.first().and_then(SqlValue::as_i64))
        .collect();
    let now = kiln_store::now_micros();
    let mut tx = state.store.begin().await?;
    let Some(&last) = rids.last() else {
        tx.execute(
            "UPDATE reindex_jobs SET state = 'completed', finished = $1, heartbeat = $1 \
             WHERE job_id = $2 AND owner = $3",
            &[
                SqlValue::Int(now),
                SqlValue::Text(id.to_string()),
                SqlValue::Text(node_id().to_string()),
            ],
        )
        .await?;
        tx.commit().await?;
        return Ok(None);
    };
    let n = state.search.reindex_in(&mut tx, &rids).await?;
    // the progress commits with the batch, and only while this node owns the job
    let owned = tx
        .query_rows(
            "UPDATE reindex_jobs SET processed = processed + $1, after_rid = $2, heartbeat = $3 \
             WHERE job_id = $4 AND owner = $5 AND state = 'running' RETURNING job_id",
            &[
                SqlValue::Int(rids.len() as i64),
                SqlValue::Int(last),
                SqlValue::Int(now),
                SqlValue::Text(id.to_string()),
                SqlValue::Text(node_id().to_string()),
            ],
        )
        .await?;
    if owned.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(n))
}

/// Runs a job this node owns until it is done, fails, or another node took it over.
async fn run_job(state: AppState, id: String) {
    let outcome: FhirResult<()> = async {
        while run_batch(&state, &id).await?.is_some() {}
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let error = e
            .issues
            .iter()
            .map(|i| i.diagnostics.clone())
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(job = id, "$reindex job failed: {error}");
        let now = kiln_store::now_micros();
        if let Err(e2) = write(
            &state,
            "UPDATE reindex_jobs SET state = 'failed', finished = $1, heartbeat = $1, error = $2 \
                 WHERE job_id = $3 AND owner = $4 RETURNING job_id",
            &[
                SqlValue::Int(now),
                SqlValue::Text(error),
                SqlValue::Text(id.clone()),
                SqlValue::Text(node_id().to_string()),
            ],
        )
        .await
        {
            // the heartbeat goes stale and another node (or this one) resumes the job
            tracing::warn!(
                job = id,
                "cannot record the failure of a $reindex job: {:?}",
                e2.issues
            );
        }
    }
}

impl Operation for Reindex {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        target: Target,
        _params: Value,
        _ctx: &'a RequestContext,
        _access: &'a crate::auth::Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            // index with the newest parameter definitions (another node may have added one)
            state.search.refresh_custom_parameters(&state.store).await?;
            let resource_type = match &target {
                Target::Instance(t, id) => {
                    let stored = state
                        .store
                        .read(t, id)
                        .await?
                        .filter(|r| !r.deleted)
                        .ok_or_else(|| FhirError::not_found(format!("{t}/{id} does not exist")))?;
                    let n = state
                        .search
                        .reindex_rids(&state.store, &[stored.rid])
                        .await?;
                    return Ok(FhirResponse::ok(Body::Resource(json!({
                        "resourceType": "Parameters",
                        "parameter": [
                            {"name": "state", "valueCode": "completed"},
                            {"name": "processed", "valueInteger": n},
                            {"name": "total", "valueInteger": 1},
                        ]
                    }))));
                }
                Target::Type(t) => Some(t.clone()),
                Target::System => None,
            };
            let total =
                match &resource_type {
                    Some(t) => state
                        .store
                        .query_rows(
                            "SELECT COUNT(*) FROM resources WHERE res_type = $1 AND deleted = 0",
                            &[SqlValue::Text(t.clone())],
                        )
                        .await?,
                    None => {
                        state
                            .store
                            .query_rows("SELECT COUNT(*) FROM resources WHERE deleted = 0", &[])
                            .await?
                    }
                }
                .first()
                .and_then(|r| r.first())
                .and_then(SqlValue::as_i64)
                .unwrap_or(0);
            let id = uuid::Uuid::new_v4().to_string();
            let now = kiln_store::now_micros();
            let job = Job {
                resource_type: resource_type.clone(),
                state: "running".into(),
                processed: 0,
                total,
                started: now,
                finished: None,
                error: None,
                resumed: 0,
            };
            write(
                state,
                    "INSERT INTO reindex_jobs (job_id, resource_type, state, processed, total, after_rid, started, owner, heartbeat) \
                     VALUES ($1, $2, 'running', 0, $3, 0, $4, $5, $4) RETURNING job_id",
                    &[
                        SqlValue::Text(id.clone()),
                        resource_type
                            .clone()
                            .map(SqlValue::Text)
                            .unwrap_or(SqlValue::Null),
                        SqlValue::Int(total),
                        SqlValue::Int(now),
                        SqlValue::Text(node_id().to_string()),
                    ],
                )
                .await?;
            let body = status_parameters(&id, &job);
            tokio::spawn(run_job(state.clone(), id.clone()));
            let mut resp = FhirResponse::ok(Body::Resource(body)).with_header(
                header::CONTENT_LOCATION,
                format!("{}/$reindex-status?job={id}", state.base_url),
            );
            resp.status = StatusCode::ACCEPTED;
            Ok(resp)
        })
    }
}

impl Operation for ReindexStatus {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        _target: Target,
        params: Value,
        _ctx: &'a RequestContext,
        _access: &'a crate::auth::Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            let Some(id) = param_str(&params, "job") else {
                return Err(FhirError::invalid_at(
                    "$reindex-status needs the job id (?job=…) from the Content-Location of the $reindex kick-off",
                    "job",
                ));
            };
            let (mut job, heartbeat) = load_job(state, id)
                .await?
                .ok_or_else(|| FhirError::not_found(format!("no reindex job '{id}'")))?;
            let stale = kiln_store::now_micros() - STALE_AFTER.as_micros() as i64;
            if job.state == "running" && heartbeat < stale && claim_stale(state, id).await? {
                // interrupted (its node crashed or stopped): resumed here
                tracing::info!(job = id, "resuming an interrupted $reindex job");
                tokio::spawn(run_job(state.clone(), id.to_string()));
                if let Some((j, _)) = load_job(state, id).await? {
                    job = j;
                }
            }
            Ok(FhirResponse::ok(Body::Resource(status_parameters(
                id, &job,
            ))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_progress() {
        let job = Job {
            resource_type: Some("Patient".into()),
            state: "running".into(),
            processed: 7,
            total: 5,
            started: 0,
            finished: None,
            error: None,
            resumed: 1,
        };
        let p = status_parameters("j1", &job);
        assert_eq!(param_str(&p, "state"), Some("running"));
        assert_eq!(param_str(&p, "resourceType"), Some("Patient"));
        let int = |name: &str| {
            p["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == name)
                .map(|x| x["valueInteger"].clone())
        };
        // resources created while the job runs are counted too
        assert_eq!(int("total"), Some(json!(7)));
        assert_eq!(int("resumed"), Some(json!(1)));
        let d: Vec<&str> = all().iter().map(|o| o.definition().name).collect();
        assert_eq!(d, vec!["reindex", "reindex-status"]);
        // a job row reads back as it was written
        let row = vec![
            SqlValue::Text("Patient".into()),
            SqlValue::Text("failed".into()),
            SqlValue::Int(3),
            SqlValue::Int(9),
            SqlValue::Int(10),
            SqlValue::Int(20),
            SqlValue::Text("boom".into()),
            SqlValue::Int(0),
            SqlValue::Int(15),
        ];
        let (j, hb) = job_from_row(&row);
        assert_eq!(hb, 15);
        assert_eq!(j.finished, Some(20));
        assert_eq!(j.error.as_deref(), Some("boom"));
        assert_eq!(j.state, "failed");
    }

    #[test]
    fn job_table_schema() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let s = schema(d);
            assert!(s[0].starts_with("CREATE TABLE IF NOT EXISTS reindex_jobs"));
            assert!(s[0].contains("heartbeat") && s[0].contains("after_rid"));
        }
    }
}
