//! `$validate` (type and instance level, `mode=create|update|delete`): the write-time validation,
//! answered as an OperationOutcome, nothing stored. `profile=[canonical]` also validates against a
//! StructureDefinition stored on the server (`kiln_fhir::Profile`: cardinalities, fixed/pattern
//! values, slices, and its required/extensible bindings through the terminology service).

use axum::http::StatusCode;
use kiln_fhir::Issue;
use serde_json::Value;

use super::{param_resource, param_str, BoxFuture, Definition, Operation, Target};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::RequestContext;
use crate::state::AppState;

pub struct Validate {
    def: Definition,
}

impl Default for Validate {
    fn default() -> Self {
        Validate {
            def: Definition {
                name: "validate",
                canonical: "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                system: false,
                type_level: true,
                instance: true,
                resource_types: &[],
                affects_state: false,
            },
        }
    }
}

impl Operation for Validate {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        target: Target,
        params: Value,
        ctx: &'a RequestContext,
        _access: &'a crate::auth::Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            let (ty, id) = match &target {
                Target::Type(t) => (t.clone(), None),
                Target::Instance(t, i) => (t.clone(), Some(i.clone())),
                Target::System => {
                    return Err(FhirError::bad_request("$validate needs a resource type"))
                }
            };
            // the body is either Parameters(resource=…, mode=…) or the resource itself
            let is_parameters =
                params.get("resourceType").and_then(Value::as_str) == Some("Parameters");
            let (resource, mode) = if is_parameters {
                (
                    param_resource(&params, "resource").cloned(),
                    param_str(&params, "mode").map(str::to_string),
                )
            } else {
                (Some(params.clone()), None)
            };
            // `profile`: also validate against a stored StructureDefinition (with its bindings)
            let profile_url = if is_parameters {
                param_str(&params, "profile").or_else(|| ctx.param("profile"))
            } else {
                ctx.param("profile")
            };
            let profile = match profile_url {
                Some(url) => Some(crate::validation::stored_profile(state, url).await?),
                None => None,
            };
            let mut issues: Vec<Issue> = Vec::new();
            match mode.as_deref() {
                Some("delete") => {
                    let Some(id) = &id else {
                        return Err(FhirError::bad_request(
                            "$validate mode=delete needs an instance (Type/id/$validate)",
                        ));
                    };
                    match state.store.read(&ty, id).await? {
                        Some(r) if !r.deleted => {}
                        _ => issues.push(
                            Issue::error("not-found", format!("{ty}/{id} does not exist"))
                                .at(ty.clone()),
                        ),
                    }
                }
                None | Some("create") | Some("update") | Some("profile") => {
                    let Some(resource) = resource else {
                        return Err(FhirError::bad_request(
                            "$validate needs a resource (the body, or the `resource` parameter)",
                        ));
                    };
                    if resource.get("resourceType").and_then(Value::as_str) != Some(ty.as_str()) {
                        issues.push(
                            Issue::error("invalid", format!("the resource is not a {ty}"))
                                .at("resourceType"),
                        );
                    }
                    if mode.as_deref() == Some("update") || id.is_some() {
                        let rid = resource.get("id").and_then(Value::as_str);
                        match (rid, id.as_deref()) {
                            (None, _) => issues.push(
                                Issue::error("required", "an update needs the resource id")
                                    .at(format!("{ty}.id")),
                            ),
                            (Some(a), Some(b)) if a != b => issues.push(
                                Issue::error(
                                    "invalid",
                                    format!("resource id `{a}` does not match `{b}`"),
                                )
                                .at(format!("{ty}.id")),
                            ),
                            _ => {}
                        }
                    }
                    issues.extend(crate::validation::validate(state, &resource).await);
                    if let Some(p) = &profile {
                        issues
                            .extend(crate::validation::validate_profile(state, &resource, p).await);
                    }
                }
                Some(other) => {
                    return Err(FhirError::invalid_at(
                        format!("unknown $validate mode `{other}` (create, update, delete)"),
                        "mode",
                    ))
                }
            }
            // 200 whether or not the resource is valid: the outcome carries the verdict; a 4xx
            // means the validation itself could not run (Resource-validate).
            let mut r = FhirResponse::ok(Body::Resource(kiln_fhir::operation_outcome(&issues)));
            r.status = StatusCode::OK;
            Ok(r)
        })
    }
}
