//! `delete` (a versioned tombstone) and conditional delete (single and multiple).

use axum::http::{header, StatusCode};
use kiln_fhir::Issue;
use kiln_store::WriteTx;

use super::{check_id, check_type, etag, RequestContext};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::state::AppState;

async fn delete_one(tx: &mut WriteTx, ty: &str, id: &str) -> FhirResult<Option<i64>> {
    match tx.current(ty, id).await? {
        Some(c) if !c.deleted => Ok(Some(tx.delete(ty, id, &c).await?)),
        _ => Ok(None),
    }
}

fn deleted_response(version: Option<i64>, message: String) -> FhirResponse {
    let mut r = FhirResponse::ok(Body::Resource(kiln_fhir::operation_outcome(&[
        Issue::information("informational", message),
    ])));
    if let Some(v) = version {
        r = r.with_header(header::ETAG, etag(v));
    }
    r
}

/// Deleting a resource that does not exist, or is already deleted, succeeds without a new
/// version (http.html#delete).
pub async fn delete(
    _state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    _ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_id(id)?;
    let v = delete_one(tx, ty, id).await?;
    let msg = match v {
        Some(v) => format!("deleted {ty}/{id} (version {v})"),
        None => format!("{ty}/{id} did not exist or was already deleted"),
    };
    Ok(deleted_response(v, msg))
}

/// `DELETE [type]?[search]`: deletes every match, up to the configured maximum (412 above).
pub async fn conditional_delete(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    query: &str,
    _ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    if query.trim().is_empty() {
        return Err(FhirError::precondition_failed(
            "a conditional delete needs search criteria",
        ));
    }
    let found = state.search.conditional_matches(tx, ty, query).await?;
    if found.len() > state.settings.max_conditional_delete {
        return Err(FhirError::precondition_failed(format!(
            "conditional delete `{query}` matched {} resources, more than the limit of {}",
            found.len(),
            state.settings.max_conditional_delete
        )));
    }
    let mut last = None;
    for id in &found {
        last = delete_one(tx, ty, id).await?.or(last);
    }
    let version = if found.len() == 1 { last } else { None };
    let mut r = deleted_response(
        version,
        format!(
            "deleted {} {ty} resource(s) matching `{query}`",
            found.len()
        ),
    );
    if found.is_empty() {
        r.status = StatusCode::OK;
    }
    Ok(r)
}
