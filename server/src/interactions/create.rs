//! `create` and conditional create (`If-None-Exist`).

use axum::http::StatusCode;
use kiln_store::WriteTx;
use serde_json::Value;

use super::{check_body_type, check_type, resource_response, RequestContext};
use crate::error::{FhirError, FhirResult};
use crate::format::FhirResponse;
use crate::state::AppState;
use crate::validation::validate_for_write;

/// Outcome of a create, for transaction processing (which needs the id it got).
pub struct Created {
    pub id: String,
    pub response: FhirResponse,
}

pub async fn create(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    mut resource: Value,
    ctx: &RequestContext,
) -> FhirResult<Created> {
    check_type(ty)?;
    check_body_type(&resource, ty)?;
    if let Some(cond) = ctx.if_none_exist.as_deref() {
        tx.lock(&format!("create:{ty}")).await?;
        let query = cond.trim_start_matches('?');
        let found = state.search.conditional_matches(tx, ty, query).await?;
        match found.len() {
            0 => {}
            1 => {
                // spec: return 200 OK with the existing resource, nothing is created
                let stored = tx
                    .read(ty, &found[0])
                    .await?
                    .ok_or_else(|| FhirError::internal("conditional create match vanished"))?;
                let response =
                    resource_response(state, &stored, StatusCode::OK, ctx.prefer_return, true);
                return Ok(Created {
                    id: found[0].clone(),
                    response,
                });
            }
            n => {
                return Err(FhirError::precondition_failed(format!(
                    "If-None-Exist `{cond}` matched {n} resources"
                )))
            }
        }
    }
    // the server assigns the id; any id in the body is ignored (http.html#create)
    let id = uuid::Uuid::new_v4().to_string();
    if let Some(obj) = resource.as_object_mut() {
        obj.remove("id");
    }
    let response = create_with_id(state, tx, ty, &id, resource, ctx).await?;
    Ok(Created { id, response })
}

/// Validates and stores a new resource under an id already chosen (by `create`, or by a
/// transaction that assigns ids up front to rewrite `urn:uuid:` references).
pub async fn create_with_id(
    state: &AppState,
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    resource: Value,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    check_type(ty)?;
    check_body_type(&resource, ty)?;
    validate_for_write(state, &resource).await?;
    let stored = tx.put(ty, id, resource, None, "POST").await?;
    Ok(resource_response(
        state,
        &stored,
        StatusCode::CREATED,
        ctx.prefer_return,
        true,
    ))
}
