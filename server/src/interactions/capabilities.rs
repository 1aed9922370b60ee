//! `capabilities` (`GET /metadata`): a CapabilityStatement generated from what this build serves —
//! the model's resource types, the interactions in this module, the registered search parameters
//! and operations. Nothing here is hand-written per resource.

use serde_json::{json, Value};

use crate::state::AppState;

/// The type-level interactions every resource type supports.
pub const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

/// The system-level interactions.
pub const SYSTEM_INTERACTIONS: &[&str] =
    &["transaction", "batch", "search-system", "history-system"];

pub fn capability_statement(state: &AppState) -> Value {
    let model = kiln_fhir::model::r4();
    let mut resources = Vec::new();
    for ty in model.resource_types() {
        let search_params: Vec<Value> = state
            .search
            .params_for(ty)
            .into_iter()
            .map(|(code, url, kind)| json!({"name": code, "definition": url, "type": kind}))
            .collect();
        let ops: Vec<Value> = state
            .operations
            .iter()
            .filter(|op| {
                let d = op.definition();
                (d.type_level || d.instance)
                    && (d.resource_types.is_empty() || d.resource_types.contains(&ty))
            })
            .map(|op| {
                let d = op.definition();
                json!({"name": d.name, "definition": d.canonical.replace("{type}", ty)})
            })
            .collect();
        let mut r = json!({
            "type": ty,
            "profile": format!("http://hl7.org/fhir/StructureDefinition/{ty}"),
            "interaction": TYPE_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
            "versioning": "versioned-update",
            "readHistory": true,
            "updateCreate": state.settings.update_create,
            "conditionalCreate": true,
            "conditionalRead": "full-support",
            "conditionalUpdate": true,
            "conditionalDelete": "multiple",
            "referencePolicy": ["literal", "logical", "local"],
            "searchInclude": state.search.includes_for(ty),
            "searchRevInclude": state.search.revincludes_for(ty),
            "searchParam": search_params,
        });
        if !ops.is_empty() {
            r["operation"] = Value::Array(ops);
        }
        resources.push(r);
    }
    let system_ops: Vec<Value> = state
        .operations
        .iter()
        .filter(|op| op.definition().system)
        .map(|op| json!({"name": op.definition().name, "definition": op.definition().canonical}))
        .collect();
    let mut rest = json!({
        "mode": "server",
        "resource": resources,
        "interaction": SYSTEM_INTERACTIONS.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
    });
    if !system_ops.is_empty() {
        rest["operation"] = Value::Array(system_ops);
    }
    if let Some(auth) = &state.auth {
        rest["security"] = kiln_smart_auth::capability_security(auth);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": kiln_store::format_instant(kiln_store::now_micros()),
        "publisher": "Kiln",
        "kind": "instance",
        "software": {"name": "Kiln", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Kiln FHIR server", "url": state.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml", "json", "xml"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json", "application/fhir+xml"],
        "rest": [rest],
    })
}

/// `GET /metadata?mode=terminology`: the TerminologyCapabilities of the built-in terminology
/// service (the operations are registered in `operations::terminology`).
pub fn terminology_capabilities(state: &AppState) -> Value {
    let ops: Vec<&str> = state
        .operations
        .iter()
        .map(|o| o.definition().name)
        .filter(|n| {
            matches!(
                *n,
                "lookup" | "validate-code" | "subsumes" | "expand" | "translate"
            )
        })
        .collect();
    let expansion_params: Vec<Value> = [
        "filter",
        "count",
        "offset",
        "activeOnly",
        "includeDesignations",
        "displayLanguage",
        "excludeNested",
        "tx-resource",
    ]
    .iter()
    .map(|p| json!({"name": p}))
    .collect();
    json!({
        "resourceType": "TerminologyCapabilities",
        "status": "active",
        "date": kiln_store::format_instant(kiln_store::now_micros()),
        "kind": "instance",
        "software": {"name": "Kiln", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Kiln terminology service", "url": state.base_url},
        "codeSearch": "all",
        "expansion": {
            "hierarchical": false,
            "paging": true,
            "incomplete": false,
            "parameter": expansion_params,
        },
        "validateCode": {"translations": false},
        "translation": {"needsMap": false},
        "closure": {"translation": false},
        "extension": [{
            "url": "http://hl7.org/fhir/StructureDefinition/capabilitystatement-supported-operations",
            "valueString": ops.join(","),
        }],
    })
}
