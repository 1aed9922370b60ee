//! `read` and `vread`, with conditional read (`If-None-Match`, `If-Modified-Since` → 304).

use axum::http::StatusCode;
use kiln_store::StoredResource;

use super::{
    check_id, check_type, etag, parse_etag, resource_response, PreferReturn, RequestContext,
};
use crate::error::{FhirError, FhirResult};
use crate::format::FhirResponse;
use crate::state::AppState;

fn found(
    state: &AppState,
    stored: StoredResource,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    if stored.deleted {
        let mut e = FhirError::gone(format!(
            "{}/{} was deleted (version {})",
            stored.resource_type, stored.id, stored.version
        ));
        e.headers.push(("etag".into(), etag(stored.version)));
        return Err(e);
    }
    if let Some(inm) = &ctx.if_none_match {
        if inm.trim() == "*" || parse_etag(inm).ok() == Some(stored.version) {
            return Ok(not_modified(state, &stored));
        }
    }
    if let Some(ims) = &ctx.if_modified_since {
        if let Ok(t) = chrono::DateTime::parse_from_rfc2822(ims) {
            // HTTP dates have second precision
            if stored.last_updated / 1_000_000 <= t.timestamp() {
                return Ok(not_modified(state, &stored));
            }
        }
    }
    let mut resp = resource_response(
        state,
        &stored,
        StatusCode::OK,
        PreferReturn::Representation,
        false,
    );
    // `_summary` and `_elements` apply to reads as well as searches
    let summary = ctx
        .param("_summary")
        .and_then(kiln_fhir::summary::SummaryMode::parse);
    let elements: Vec<&str> = ctx
        .param("_elements")
        .map(|e| {
            e.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if summary.is_some() || !elements.is_empty() {
        let mut v: serde_json::Value = serde_json::from_str(&stored.content)
            .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}")))?;
        if let Some(m) = summary {
            v = kiln_fhir::summary::summarize(&v, m);
        }
        if !elements.is_empty() {
            v = kiln_fhir::summary::select_elements(&v, &elements);
        }
        resp.body = Some(crate::format::Body::Resource(v));
    }
    Ok(resp)
}

fn not_modified(state: &AppState, stored: &StoredResource) -> FhirResponse {
    let mut r = resource_response(
        state,
        stored,
        StatusCode::NOT_MODIFIED,
        PreferReturn::Minimal,
        false,
    );
    r.body = None;
    r
}

pub async fn read(
    state: &AppState,
    ty: &str,
    id: &str,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_id(id).map_err(|_| FhirError::not_found(format!("{ty}/{id} is not a valid id")))?;
    match state.store.read(ty, id).await? {
        Some(stored) => found(state, stored, ctx),
        None => Err(FhirError::not_found(format!("{ty}/{id} does not exist"))),
    }
}

pub async fn vread(
    state: &AppState,
    ty: &str,
    id: &str,
    vid: &str,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    let version: i64 = vid
        .parse()
        .map_err(|_| FhirError::not_found(format!("{ty}/{id}/_history/{vid}: no such version")))?;
    match state.store.vread(ty, id, version).await? {
        Some(stored) => found(state, stored, ctx),
        None => Err(FhirError::not_found(format!(
            "{ty}/{id}/_history/{vid} does not exist"
        ))),
    }
}

/// `read` inside a transaction Bundle: sees the transaction's own earlier writes.
pub async fn read_in_tx(
    state: &AppState,
    tx: &mut kiln_store::WriteTx,
    ty: &str,
    id: &str,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    match tx.read(ty, id).await? {
        Some(stored) => found(state, stored, ctx),
        None => Err(FhirError::not_found(format!("{ty}/{id} does not exist"))),
    }
}

/// `vread` inside a transaction Bundle.
pub async fn vread_in_tx(
    state: &AppState,
    tx: &mut kiln_store::WriteTx,
    ty: &str,
    id: &str,
    vid: &str,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    let version: i64 = vid
        .parse()
        .map_err(|_| FhirError::not_found(format!("{ty}/{id}/_history/{vid}: no such version")))?;
    match tx.vread(ty, id, version).await? {
        Some(stored) => found(state, stored, ctx),
        None => Err(FhirError::not_found(format!(
            "{ty}/{id}/_history/{vid} does not exist"
        ))),
    }
}
