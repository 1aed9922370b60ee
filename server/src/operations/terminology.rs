//! The terminology operations (terminology-service.html): `CodeSystem/$lookup`,
//! `CodeSystem/$validate-code`, `CodeSystem/$subsumes`, `ValueSet/$expand`,
//! `ValueSet/$validate-code`, `ConceptMap/$translate`. Each is a thin shell over
//! `kiln-terminology`, which takes and returns `Parameters`/`ValueSet` JSON. Resources stored in
//! Kiln take part: at instance level the stored resource is the subject; at type level stored
//! resources whose `url` the request names are supplied as `tx-resource`s.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{BoxFuture, Definition, Operation, Target};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::RequestContext;
use crate::state::AppState;

#[derive(Clone, Copy)]
enum Kind {
    Lookup,
    ValidateCodeCs,
    ValidateCodeVs,
    Subsumes,
    Expand,
    Translate,
}

pub struct TxOperation {
    def: Definition,
    kind: Kind,
}

pub fn all() -> Vec<TxOperation> {
    let d = |name, canonical, types: &'static [&'static str]| Definition {
        name,
        canonical,
        system: false,
        type_level: true,
        instance: true,
        resource_types: types,
        affects_state: false,
    };
    vec![
        TxOperation {
            def: d(
                "lookup",
                "http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup",
                &["CodeSystem"],
            ),
            kind: Kind::Lookup,
        },
        TxOperation {
            def: d(
                "subsumes",
                "http://hl7.org/fhir/OperationDefinition/CodeSystem-subsumes",
                &["CodeSystem"],
            ),
            kind: Kind::Subsumes,
        },
        TxOperation {
            def: d(
                "expand",
                "http://hl7.org/fhir/OperationDefinition/ValueSet-expand",
                &["ValueSet"],
            ),
            kind: Kind::Expand,
        },
        TxOperation {
            def: d(
                "translate",
                "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate",
                &["ConceptMap"],
            ),
            kind: Kind::Translate,
        },
        // one name, two resource types: CodeSystem and ValueSet $validate-code
        TxOperation {
            def: d(
                "validate-code",
                "http://hl7.org/fhir/OperationDefinition/ValueSet-validate-code",
                &["ValueSet", "CodeSystem"],
            ),
            kind: Kind::ValidateCodeVs,
        },
    ]
}

/// Adds a parameter to a `Parameters` resource.
fn push_param(params: &mut Value, p: Value) {
    if params.get("parameter").and_then(Value::as_array).is_none() {
        params["parameter"] = json!([]);
    }
    if let Some(a) = params["parameter"].as_array_mut() {
        a.push(p);
    }
}

/// Stored resources of `ty` whose `url` is `url` (any version), except the unchanged stored
/// copies of the vendored terminology (the service has those already).
async fn stored_by_url(state: &AppState, ty: &str, url: &str) -> FhirResult<Vec<Value>> {
    let url = url.split('|').next().unwrap_or(url);
    let mut tx = state.store.begin().await?;
    let ids = state
        .search
        .conditional_matches(
            &mut tx,
            ty,
            &format!("url={}", crate::interactions::history::encode(url)),
        )
        .await?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(r) = tx.read(ty, &id).await? {
            if !r.deleted && !crate::canonical::tx_is_pristine(&mut tx, ty, &id, r.version).await? {
                out.push(serde_json::from_str(&r.content).map_err(|e| {
                    FhirError::internal(format!("stored resource is not JSON: {e}"))
                })?);
            }
        }
    }
    tx.rollback().await?;
    Ok(out)
}

impl Operation for TxOperation {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        target: Target,
        params: Value,
        _ctx: &'a RequestContext,
        _access: &'a crate::auth::Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return Err(FhirError::bad_request(
                    "terminology operations take a Parameters resource",
                ));
            }
            let mut params = params;
            let mut kind = self.kind;
            let ty = match &target {
                Target::Type(t) | Target::Instance(t, _) => t.clone(),
                Target::System => String::new(),
            };
            if matches!(kind, Kind::ValidateCodeVs) && ty == "CodeSystem" {
                kind = Kind::ValidateCodeCs;
            }
            // instance level: the stored resource is the subject of the operation
            if let Target::Instance(t, id) = &target {
                let stored = state
                    .store
                    .read(t, id)
                    .await?
                    .filter(|r| !r.deleted)
                    .ok_or_else(|| FhirError::not_found(format!("{t}/{id} does not exist")))?;
                let r: Value = serde_json::from_str(&stored.content).map_err(|e| {
                    FhirError::internal(format!("stored resource is not JSON: {e}"))
                })?;
                // the unchanged copy of a vendored code system: the service has it already
                let pristine =
                    crate::canonical::is_pristine(&state.store, t, id, stored.version).await?;
                let url = r.get("url").and_then(Value::as_str).map(str::to_string);
                match kind {
                    Kind::Expand | Kind::ValidateCodeVs => {
                        push_param(&mut params, json!({"name": "valueSet", "resource": r}))
                    }
                    Kind::Translate => {
                        push_param(&mut params, json!({"name": "conceptMap", "resource": r}))
                    }
                    Kind::Lookup | Kind::Subsumes | Kind::ValidateCodeCs => {
                        if let Some(u) = url {
                            if kiln_terminology::service::Params(&params)
                                .str("system")
                                .is_none()
                            {
                                push_param(&mut params, json!({"name": "system", "valueUri": u}));
                            }
                        }
                        if !pristine {
                            push_param(&mut params, json!({"name": "tx-resource", "resource": r}));
                        }
                    }
                }
            } else {
                // type level: stored resources named by canonical URL join the request
                let p = kiln_terminology::service::Params(&params);
                let mut wanted: Vec<(&str, String)> = Vec::new();
                for name in ["url", "valueSet", "system", "conceptMap"] {
                    if let Some(v) = p.str(name) {
                        let t = match (name, kind) {
                            ("system", _) => "CodeSystem",
                            ("conceptMap", _) | ("url", Kind::Translate) => "ConceptMap",
                            ("url", Kind::Lookup | Kind::Subsumes | Kind::ValidateCodeCs) => {
                                "CodeSystem"
                            }
                            _ => "ValueSet",
                        };
                        wanted.push((t, v.to_string()));
                    }
                }
                for (t, url) in wanted {
                    for r in stored_by_url(state, t, &url).await? {
                        push_param(&mut params, json!({"name": "tx-resource", "resource": r}));
                    }
                }
            }
            let tx = state.terminology.get().await?;
            let params2 = params.clone();
            let result = tokio::task::spawn_blocking(move || match kind {
                Kind::Lookup => tx.lookup(&params2),
                Kind::ValidateCodeCs => tx.validate_code_cs(&params2),
                Kind::ValidateCodeVs => tx.validate_code_vs(&params2),
                Kind::Subsumes => tx.subsumes(&params2),
                Kind::Expand => tx.expand(&params2),
                Kind::Translate => tx.translate(&params2),
            })
            .await
            .map_err(|e| FhirError::internal(format!("terminology task failed: {e}")))?;
            match result {
                Ok(v) => Ok(FhirResponse::ok(Body::Resource(v))),
                Err(e) => {
                    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
                    let mut resp = FhirResponse::ok(Body::Resource(e.outcome));
                    resp.status = status;
                    Ok(resp)
                }
            }
        })
    }
}
