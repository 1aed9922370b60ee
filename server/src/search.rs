//! The server side of search: the SearchParameter registry, the [`Indexer`] that writes index rows
//! in the same store transaction as the resource, and the search interaction (type, system and
//! compartment level) turning a parsed query into a `searchset` Bundle.

use std::sync::{Arc, RwLock};

use kiln_search::Registry;
use kiln_store::{Dialect, Indexer, SqlValue, WriteTx};
use serde_json::Value;

use crate::error::{FhirError, FhirResult};
use crate::format::FhirResponse;
use crate::interactions::RequestContext;
use crate::state::AppState;

fn to_search_dialect(d: Dialect) -> kiln_search::Dialect {
    match d {
        Dialect::Sqlite => kiln_search::Dialect::Sqlite,
        Dialect::Postgres => kiln_search::Dialect::Postgres,
    }
}

fn to_store_value(v: kiln_search::SqlValue) -> SqlValue {
    match v {
        kiln_search::SqlValue::Null => SqlValue::Null,
        kiln_search::SqlValue::Int(i) => SqlValue::Int(i),
        kiln_search::SqlValue::Real(f) => SqlValue::Real(f),
        kiln_search::SqlValue::Text(s) => SqlValue::Text(s),
    }
}

/// Index-table DDL for the store's migrations.
pub fn schema(d: Dialect) -> Vec<String> {
    kiln_search::schema(to_search_dialect(d))
}

/// Writes search index rows for every stored version.
pub struct SearchIndexer {
    registry: Arc<RwLock<Registry>>,
}

impl Indexer for SearchIndexer {
    fn delete_statements(&self, dialect: Dialect) -> Vec<String> {
        kiln_search::delete_statements(to_search_dialect(dialect))
    }

    fn insert_statements(
        &self,
        dialect: Dialect,
        rid: i64,
        resource: &Value,
    ) -> Vec<(String, Vec<SqlValue>)> {
        let reg = match self.registry.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let entries = kiln_search::index_resource(&reg, resource);
        entries
            .insert_statements(to_search_dialect(dialect), rid)
            .into_iter()
            .map(|(sql, params)| (sql, params.into_iter().map(to_store_value).collect()))
            .collect()
    }
}

pub struct SearchEngine {
    registry: Arc<RwLock<Registry>>,
    indexer: SearchIndexer,
}

impl Default for SearchEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl SearchEngine {
    pub fn new() -> SearchEngine {
        let registry = Arc::new(RwLock::new(Registry::r4()));
        SearchEngine {
            indexer: SearchIndexer {
                registry: registry.clone(),
            },
            registry,
        }
    }

    pub fn indexer(&self) -> Option<&dyn Indexer> {
        Some(&self.indexer)
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        match self.registry.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        }
    }

    /// `(code, definition url, type)` of every parameter of a resource type (CapabilityStatement).
    pub fn params_for(&self, ty: &str) -> Vec<(String, String, String)> {
        self.registry()
            .params_for(ty)
            .into_iter()
            .map(|p| {
                (
                    p.code().to_string(),
                    p.def.url.clone(),
                    p.param_type().as_str().to_string(),
                )
            })
            .collect()
    }

    pub fn includes_for(&self, ty: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .registry()
            .params_for(ty)
            .into_iter()
            .filter(|p| p.param_type() == kiln_search::ParamType::Reference)
            .map(|p| format!("{ty}:{}", p.code()))
            .collect();
        v.push("*".into());
        v
    }

    pub fn revincludes_for(&self, ty: &str) -> Vec<String> {
        let reg = self.registry();
        let mut v = Vec::new();
        for src in reg.resource_types() {
            for p in reg.params_for(src) {
                if p.param_type() == kiln_search::ParamType::Reference
                    && (p.def.targets.is_empty() || p.def.targets.iter().any(|t| t == ty))
                {
                    v.push(format!("{src}:{}", p.code()));
                }
            }
        }
        v
    }

    fn parse(
        &self,
        ty: Option<&str>,
        query: &[(String, String)],
        strict: bool,
    ) -> FhirResult<kiln_search::SearchQuery> {
        kiln_search::parse(&self.registry(), ty, query, strict)
            .map_err(|issues| FhirError::with_issues(axum::http::StatusCode::BAD_REQUEST, issues))
    }

    /// Ids of the current resources of `ty` matching `query` (a URL query string), seen from
    /// inside the write transaction `tx` (conditional create/update/delete/patch, conditional
    /// references in transactions).
    pub async fn conditional_matches(
        &self,
        tx: &mut WriteTx,
        ty: &str,
        query: &str,
    ) -> FhirResult<Vec<String>> {
        let pairs = crate::interactions::bundle::form_urlencoded_pairs(query);
        let parsed = self.parse(Some(ty), &pairs, true)?;
        let _ = (tx, parsed);
        Err(FhirError::not_supported(
            "conditional interactions need the search planner",
        ))
    }

    /// Type-level (`ty = Some`) or system-level search.
    pub async fn search_type(
        &self,
        state: &AppState,
        ty: Option<&str>,
        ctx: &RequestContext,
    ) -> FhirResult<FhirResponse> {
        if let Some(t) = ty {
            crate::interactions::check_type(t)?;
        }
        let parsed = self.parse(ty, &ctx.query, ctx.strict)?;
        let _ = (state, parsed);
        Err(FhirError::not_supported("search planner not wired yet"))
    }

    /// Compartment search (`Patient/123/Observation`, `Patient/123/*`).
    pub async fn search_compartment(
        &self,
        state: &AppState,
        cty: &str,
        cid: &str,
        ty: &str,
        ctx: &RequestContext,
    ) -> FhirResult<FhirResponse> {
        crate::interactions::check_type(cty)?;
        let target = if ty == "*" { None } else { Some(ty) };
        if let Some(t) = target {
            crate::interactions::check_type(t)?;
        }
        let parsed = self.parse(target, &ctx.query, ctx.strict)?;
        let parsed = parsed
            .with_compartment(&self.registry(), cty, cid)
            .map_err(|issues| {
                FhirError::with_issues(axum::http::StatusCode::BAD_REQUEST, issues)
            })?;
        let _ = (state, parsed);
        Err(FhirError::not_supported("search planner not wired yet"))
    }
}
