//! `update` (incl. update-as-create) and conditional update.

use axum::http::StatusCode;
use kiln_store::WriteTx;
use serde_json::Value;

use super::{check_body_type, check_id, check_type, parse_etag, resource_response, RequestContext};
use crate::error::{FhirError, FhirResult};
use crate::format::FhirResponse;
use crate::state::AppState;
use crate::validation::validate_for_write;

pub async fn update(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    resource: Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_id(id)?;
    check_body_type(&resource, ty)?;
    match resource.get("id").and_then(Value::as_str) {
        None => {
            return Err(FhirError::invalid_at(
                "the resource has no id; an update must carry the id of the URL",
                format!("{ty}.id"),
            ))
        }
        Some(body_id) if body_id != id => {
            return Err(FhirError::invalid_at(
                format!("resource id `{body_id}` does not match the URL id `{id}`"),
                format!("{ty}.id"),
            ))
        }
        _ => {}
    }
    validate_for_write(state, &resource).await?;
    write_version(state, tx, ty, id, resource, ctx).await
}

/// Writes `resource` as the next version of `ty/id`, honouring `If-Match`.
async fn write_version(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    resource: Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    let current = tx.current(ty, id).await?;
    if let Some(if_match) = ctx.if_match.as_deref() {
        let wanted = parse_etag(if_match)?;
        match &current {
            Some(c) if !c.deleted && c.version == wanted => {}
            Some(c) => {
                return Err(FhirError::precondition_failed(format!(
                    "If-Match {if_match} does not match the current version {} of {ty}/{id}",
                    c.version
                )))
            }
            None => {
                return Err(FhirError::precondition_failed(format!(
                    "If-Match {if_match}: {ty}/{id} does not exist"
                )))
            }
        }
    }
    match current {
        Some(c) => {
            let status = if c.deleted {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let stored = tx.put(ty, id, resource, Some(&c), "PUT").await?;
            Ok(resource_response(
                state,
                &stored,
                status,
                ctx.prefer_return,
                status == StatusCode::CREATED,
            ))
        }
        None => {
            if !state.settings.update_create {
                return Err(FhirError::method_not_allowed(format!(
                    "{ty}/{id} does not exist and this server does not allow update-as-create"
                )));
            }
            let stored = tx.put(ty, id, resource, None, "PUT").await?;
            Ok(resource_response(
                state,
                &stored,
                StatusCode::CREATED,
                ctx.prefer_return,
                true,
            ))
        }
    }
}

/// `PUT [type]?[search]`: 0 matches → create (or update-as-create with the body's id),
/// 1 match → update it, more → 412.
pub async fn conditional_update(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    query: &str,
    mut resource: Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_body_type(&resource, ty)?;
    tx.lock(&format!("create:{ty}")).await?;
    let found = state.search.conditional_matches(tx, ty, query).await?;
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = match found.len() {
        0 => match body_id {
            Some(id) => {
                check_id(&id)?;
                id
            }
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                resource["id"] = Value::String(id.clone());
                id
            }
        },
        1 => {
            let id = found[0].clone();
            if let Some(b) = body_id {
                if b != id {
                    return Err(FhirError::invalid_at(
                        format!("resource id `{b}` does not match the matched resource `{id}`"),
                        format!("{ty}.id"),
                    ));
                }
            } else {
                resource["id"] = Value::String(id.clone());
            }
            id
        }
        n => {
            return Err(FhirError::precondition_failed(format!(
                "conditional update `{query}` matched {n} resources"
            )))
        }
    };
    validate_for_write(state, &resource).await?;
    write_version(state, tx, ty, &id, resource, ctx).await
}
