//! `patch`: JSON Patch (`application/json-patch+json`, RFC 6902) and FHIRPath Patch (a
//! `Parameters` body). The patched resource goes through the same validation as an update.

use axum::http::StatusCode;
use kiln_store::WriteTx;
use serde_json::Value;

use super::{check_id, check_type, parse_etag, resource_response, RequestContext};
use crate::error::{FhirError, FhirResult};
use crate::format::{BodyKind, FhirResponse};
use crate::state::AppState;
use crate::validation::validate_for_write;

/// Applies a patch document to a resource (no storage).
pub fn apply_patch(resource: &Value, kind: BodyKind, patch: &Value) -> FhirResult<Value> {
    match kind {
        BodyKind::JsonPatch => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| FhirError::bad_request(format!("invalid JSON Patch document: {e}")))?;
            let mut doc = resource.clone();
            json_patch::patch(&mut doc, &p).map_err(|e| {
                FhirError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    kiln_fhir::Issue::error("processing", format!("JSON Patch failed: {e}")),
                )
            })?;
            Ok(doc)
        }
        BodyKind::Json | BodyKind::Xml => {
            if patch.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return Err(FhirError::unsupported_media_type(
                    "a FHIR patch body must be a Parameters resource (FHIRPath Patch) or \
                     application/json-patch+json",
                ));
            }
            kiln_fhirpath::patch::apply(resource, patch).map_err(|e| {
                FhirError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    kiln_fhir::Issue::error("processing", format!("FHIRPath Patch failed: {e}")),
                )
            })
        }
        BodyKind::Form => Err(FhirError::unsupported_media_type(
            "PATCH takes application/json-patch+json or a FHIRPath Patch Parameters resource",
        )),
    }
}

pub async fn patch(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    kind: BodyKind,
    patch: &Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_id(id)?;
    let current = tx.current(ty, id).await?;
    let Some(current) = current else {
        return Err(FhirError::not_found(format!("{ty}/{id} does not exist")));
    };
    if current.deleted {
        return Err(FhirError::gone(format!("{ty}/{id} was deleted")));
    }
    if let Some(if_match) = ctx.if_match.as_deref() {
        if parse_etag(if_match)? != current.version {
            return Err(FhirError::precondition_failed(format!(
                "If-Match {if_match} does not match the current version {}",
                current.version
            )));
        }
    }
    let stored = tx
        .read(ty, id)
        .await?
        .ok_or_else(|| FhirError::internal("resource vanished during patch"))?;
    let doc: Value = serde_json::from_str(&stored.content)
        .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}")))?;
    let patched = apply_patch(&doc, kind, patch)?;
    if patched.get("resourceType") != doc.get("resourceType") || patched.get("id") != doc.get("id")
    {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            kiln_fhir::Issue::error("processing", "a patch may not change resourceType or id"),
        ));
    }
    validate_for_write(state, &patched).await?;
    let stored = tx.put(ty, id, patched, Some(&current), "PATCH").await?;
    Ok(resource_response(
        state,
        &stored,
        StatusCode::OK,
        ctx.prefer_return,
        false,
    ))
}

/// `PATCH [type]?[search]`: exactly one match is patched; 0 → 404, more → 412.
pub async fn conditional_patch(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    query: &str,
    kind: BodyKind,
    body: &Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    let found = state.search.conditional_matches(tx, ty, query).await?;
    match found.len() {
        0 => Err(FhirError::not_found(format!(
            "conditional patch `{query}` matched nothing"
        ))),
        1 => patch(state, tx, ty, &found[0], kind, body, ctx).await,
        n => Err(FhirError::precondition_failed(format!(
            "conditional patch `{query}` matched {n} resources"
        ))),
    }
}
