//! FHIR operations (`$name`). Each operation is one file implementing [`Operation`] plus one line
//! in [`registry`]; the CapabilityStatement lists whatever is registered here.

mod closure;
mod everything;
mod reindex;

pub use reindex::{
    resume_interrupted as resume_reindex_jobs, schema as reindex_schema,
    RESUME_POLL as REINDEX_RESUME_POLL,
};
mod terminology;
mod validate;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::auth::Access;
use crate::error::FhirResult;
use crate::format::FhirResponse;
use crate::interactions::RequestContext;
use crate::state::AppState;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an operation was invoked.
#[derive(Debug, Clone)]
pub enum Target {
    System,
    Type(String),
    Instance(String, String),
}

/// What the CapabilityStatement and the router need to know about an operation.
pub struct Definition {
    /// Without the `$`.
    pub name: &'static str,
    /// Canonical URL of its OperationDefinition (`{type}` stands for the resource type when
    /// each type has its own, e.g. `Patient-everything` / `Encounter-everything`).
    pub canonical: &'static str,
    pub system: bool,
    pub type_level: bool,
    pub instance: bool,
    /// Resource types it applies to (empty = all).
    pub resource_types: &'static [&'static str],
    /// Whether it changes data (POST only) or may be called with GET.
    pub affects_state: bool,
}

pub trait Operation: Send + Sync {
    fn definition(&self) -> &Definition;
    /// `params` is a `Parameters` resource (built from the query string for GET), or for
    /// operations that take a resource body, the resource itself. `access` is the caller's
    /// grant: the router has checked the level (read of the type, the instance visible, update
    /// for `affects_state`); an operation returning stored resources filters them with it.
    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        target: Target,
        params: Value,
        ctx: &'a RequestContext,
        access: &'a Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>>;
}

#[derive(Clone, Default)]
pub struct OperationRegistry {
    ops: BTreeMap<&'static str, Arc<dyn Operation>>,
}

impl OperationRegistry {
    pub fn register(&mut self, op: Arc<dyn Operation>) {
        self.ops.insert(op.definition().name, op);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Operation>> {
        self.ops.get(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Operation>> {
        self.ops.values()
    }
}

/// Every operation Kiln serves.
pub fn registry() -> OperationRegistry {
    let mut r = OperationRegistry::default();
    r.register(Arc::new(validate::Validate::default()));
    for op in terminology::all() {
        r.register(Arc::new(op));
    }
    reindex::all().into_iter().for_each(|op| r.register(op));
    r.register(Arc::new(closure::Closure::default()));
    r.register(Arc::new(everything::Everything::default()));
    r
}

/// Builds a `Parameters` resource from query-string parameters (GET invocation).
pub fn parameters_from_query(query: &[(String, String)]) -> Value {
    let params: Vec<Value> = query
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| serde_json::json!({"name": k, "valueString": v}))
        .collect();
    serde_json::json!({"resourceType": "Parameters", "parameter": params})
}

/// The value of a named parameter in a `Parameters` resource, as a string (any primitive value[x]).
pub fn param_str<'a>(params: &'a Value, name: &str) -> Option<&'a str> {
    params
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| {
            p.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .and_then(|(_, v)| v.as_str())
        })
}

/// The `resource` of a named parameter.
pub fn param_resource<'a>(params: &'a Value, name: &str) -> Option<&'a Value> {
    params
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("resource"))
}
