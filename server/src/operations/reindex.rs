//! `$reindex`: re-computes the search index rows of stored resources, e.g. after a custom
//! SearchParameter was added (rows are otherwise only written when a resource is written).
//!
//! - `POST [base]/[type]/[id]/$reindex` runs at once and returns a `Parameters` result.
//! - `POST [base]/[type]/$reindex` and `POST [base]/$reindex` start a background job (a tokio
//!   task) and return `202 Accepted` with `Content-Location: [base]/$reindex-status?job=[id]`.
//!   The job walks the resources in `rid` order in batches of [`BATCH`], each batch its own
//!   committed transaction, so concurrent writes interleave with it and progress is durable
//!   batch by batch. `GET [base]/$reindex-status?job=[id]` reports `state`
//!   (`running`/`completed`/`failed`), `processed` and `total`.
//!
//! Job status lives in the memory of the node that runs the job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use kiln_store::SqlValue;
use serde_json::{json, Value};

use super::{param_str, BoxFuture, Definition, Operation, Target};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::RequestContext;
use crate::state::AppState;

/// Resources per transaction.
pub const BATCH: i64 = 500;

#[derive(Debug, Clone)]
struct Job {
    /// The resource type, `None` = every type.
    resource_type: Option<String>,
    state: &'static str,
    processed: i64,
    total: i64,
    started: i64,
    finished: Option<i64>,
    error: Option<String>,
}

type Jobs = Arc<Mutex<HashMap<String, Job>>>;

fn jobs_lock(j: &Jobs) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
    match j.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub struct Reindex {
    def: Definition,
    jobs: Jobs,
}

pub struct ReindexStatus {
    def: Definition,
    jobs: Jobs,
}

/// `$reindex` and `$reindex-status`, sharing their job table.
pub fn all() -> Vec<Arc<dyn Operation>> {
    let jobs: Jobs = Default::default();
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
            jobs: jobs.clone(),
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
            jobs,
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
    json!({"resourceType": "Parameters", "parameter": p})
}

/// Walks every current resource (of one type) after the job started, batch by batch.
async fn run_job(state: AppState, jobs: Jobs, id: String, resource_type: Option<String>) {
    let mut after = 0i64;
    let outcome: FhirResult<()> = async {
        loop {
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
            let Some(&last) = rids.last() else {
                return Ok(());
            };
            state.search.reindex_rids(&state.store, &rids).await?;
            after = last;
            if let Some(j) = jobs_lock(&jobs).get_mut(&id) {
                j.processed += rids.len() as i64;
            }
        }
    }
    .await;
    if let Some(j) = jobs_lock(&jobs).get_mut(&id) {
        j.finished = Some(kiln_store::now_micros());
        match outcome {
            Ok(()) => j.state = "completed",
            Err(e) => {
                j.state = "failed";
                j.error = Some(
                    e.issues
                        .iter()
                        .map(|i| i.diagnostics.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                );
            }
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
            let job = Job {
                resource_type: resource_type.clone(),
                state: "running",
                processed: 0,
                total,
                started: kiln_store::now_micros(),
                finished: None,
                error: None,
            };
            let body = status_parameters(&id, &job);
            jobs_lock(&self.jobs).insert(id.clone(), job);
            tokio::spawn(run_job(
                state.clone(),
                self.jobs.clone(),
                id.clone(),
                resource_type,
            ));
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
        _state: &'a AppState,
        _target: Target,
        params: Value,
        _ctx: &'a RequestContext,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            let Some(id) = param_str(&params, "job") else {
                return Err(FhirError::invalid_at(
                    "$reindex-status needs the job id (?job=…) from the Content-Location of the $reindex kick-off",
                    "job",
                ));
            };
            let job = jobs_lock(&self.jobs).get(id).cloned().ok_or_else(|| {
                FhirError::not_found(format!("no reindex job '{id}' on this server"))
            })?;
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
            state: "running",
            processed: 7,
            total: 5,
            started: 0,
            finished: None,
            error: None,
        };
        let p = status_parameters("j1", &job);
        assert_eq!(param_str(&p, "state"), Some("running"));
        assert_eq!(param_str(&p, "resourceType"), Some("Patient"));
        let total = p["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "total")
            .unwrap();
        // resources created while the job runs are counted too
        assert_eq!(total["valueInteger"], 7);
        let d: Vec<&str> = all().iter().map(|o| o.definition().name).collect();
        assert_eq!(d, vec!["reindex", "reindex-status"]);
    }
}
