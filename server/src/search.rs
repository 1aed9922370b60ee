//! The server side of search: the SearchParameter registry, the [`Indexer`] that writes index rows
//! in the same store transaction as the resource, and the search interaction (type, system and
//! compartment level) turning a parsed query into a `searchset` Bundle.

use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use kiln_search::Registry;
use kiln_store::{Dialect, Indexer, SqlValue, WriteTx};
use serde_json::{json, Value};

use crate::auth::Access;
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::history::encode;
use crate::interactions::RequestContext;
use crate::state::AppState;
use kiln_smart_auth::Interaction;

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

/// How often a node checks the stored SearchParameters for changes made through another node.
pub const CUSTOM_PARAMETER_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Index-table DDL for the store's migrations.
pub fn schema(d: Dialect) -> Vec<String> {
    let mut v = kiln_search::schema(to_search_dialect(d));
    v.extend(crate::operations::reindex_schema(d));
    v
}

/// Bundles with at least this many entries refresh stale PostgreSQL planner statistics after
/// they commit (a bulk load into a new database leaves the search tables without statistics).
pub const ANALYZE_AFTER_ENTRIES: usize = 50;

/// Refreshes missing or stale planner statistics of the search tables (PostgreSQL only; a
/// catalog query when nothing is stale). Failures are logged, not returned: statistics are an
/// optimisation.
/// On PostgreSQL the stale tables get `VACUUM (ANALYZE)`: besides statistics, VACUUM sets the
/// visibility map, without which index-only scans (the counts) read every heap row after a
/// bulk load. Where the catalog cannot say (no `n_ins_since_vacuum` before PostgreSQL 13), the
/// stale tables are analyzed only.
pub async fn refresh_statistics(state: &AppState) {
    let dialect = to_search_dialect(state.store.dialect());
    let Some(stale) = kiln_search::index::stale_tables_statement(dialect) else {
        return;
    };
    match state.store.query_rows(&stale, &[]).await {
        Ok(rows) => {
            for t in rows
                .iter()
                .filter_map(|r| r.first().and_then(SqlValue::as_str))
            {
                // the names come from the fixed list of searched tables in the statement
                if let Err(e) = state
                    .store
                    .query_rows(&format!("VACUUM (ANALYZE) {t}"), &[])
                    .await
                {
                    tracing::warn!("could not vacuum {t}: {e}");
                }
            }
        }
        Err(e) => {
            tracing::debug!("stale tables unknown ({e}); analyzing only");
            if let Some(sql) = kiln_search::index::analyze_stale_statement(dialect) {
                if let Err(e) = state.store.query_rows(&sql, &[]).await {
                    tracing::warn!("could not refresh planner statistics: {e}");
                }
            }
        }
    }
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
        items: &[(i64, Value)],
    ) -> Vec<(String, Vec<SqlValue>)> {
        let reg = match self.registry.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let entries: Vec<(i64, kiln_search::IndexEntries)> = items
            .iter()
            .map(|(rid, r)| (*rid, kiln_search::index_resource(&reg, r)))
            .collect();
        let refs: Vec<(i64, &kiln_search::IndexEntries)> =
            entries.iter().map(|(r, e)| (*r, e)).collect();
        kiln_search::insert_batch(to_search_dialect(dialect), &refs)
            .into_iter()
            .map(|(sql, params)| (sql, params.into_iter().map(to_store_value).collect()))
            .collect()
    }

    fn delete_many_statements(
        &self,
        _dialect: Dialect,
        rids: &[i64],
    ) -> Vec<(String, Vec<SqlValue>)> {
        // row ids are integers: inlined, one statement per table and 500 rows
        let mut out = Vec::new();
        for chunk in rids.chunks(500) {
            let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
            let list = list.join(",");
            for t in kiln_search::index::TABLES {
                out.push((format!("DELETE FROM {t} WHERE rid IN ({list})"), Vec::new()));
            }
        }
        out
    }

    fn contained(&self, resource: &Value) -> Vec<(usize, String, String)> {
        kiln_search::contained_resources(resource)
    }

    fn insert_contained_statements(
        &self,
        dialect: Dialect,
        items: &[(i64, &Value, usize)],
    ) -> Vec<(String, Vec<SqlValue>)> {
        if items.is_empty() {
            return Vec::new();
        }
        let reg = match self.registry.read() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let entries: Vec<(i64, kiln_search::IndexEntries)> = items
            .iter()
            .map(|(rid, container, pos)| {
                (*rid, kiln_search::index_contained(&reg, container, *pos))
            })
            .collect();
        let refs: Vec<(i64, &kiln_search::IndexEntries)> =
            entries.iter().map(|(r, e)| (*r, e)).collect();
        kiln_search::insert_batch(to_search_dialect(dialect), &refs)
            .into_iter()
            .map(|(sql, params)| (sql, params.into_iter().map(to_store_value).collect()))
            .collect()
    }
}

/// `fullUrl` of a search entry: `[base]/[type]/[id]`, or for a contained resource
/// `[base]/[container type]/[container id]#[local id]` (its row id).
fn full_url(base: &str, stored: &kiln_store::StoredResource) -> String {
    if stored.id.contains('#') {
        format!("{base}/{}", stored.id)
    } else {
        format!("{base}/{}/{}", stored.resource_type, stored.id)
    }
}

pub struct SearchEngine {
    registry: Arc<RwLock<Registry>>,
    indexer: Arc<SearchIndexer>,
    /// The official parameters, the base every reload of the custom ones starts from.
    official: Arc<Registry>,
    /// What the registry's custom part was built from.
    custom: std::sync::Mutex<CustomState>,
    /// The terminology service and the server's base URL, for the token modifiers that need
    /// them (set once by [`AppState`]).
    terminology: std::sync::OnceLock<(Arc<crate::terminology::TerminologyService>, String)>,
}

/// The stored SearchParameters the registry reflects.
#[derive(Default)]
struct CustomState {
    /// (count including deleted, newest `lastUpdated`, sum of versions)
    fingerprint: Option<(i64, i64, i64)>,
    /// stored SearchParameter id → its `url` as registered
    urls: std::collections::HashMap<String, String>,
}

/// Where stored resources are read from while resolving a search: the store's readers, or the
/// write transaction a conditional interaction runs in (which holds SQLite's only writer).
pub enum Reader<'a> {
    Store(&'a kiln_store::Store),
    Tx(&'a mut WriteTx),
}

impl Reader<'_> {
    async fn query_rows(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> FhirResult<Vec<Vec<SqlValue>>> {
        Ok(match self {
            Reader::Store(s) => s.query_rows(sql, params).await?,
            Reader::Tx(t) => t.query_rows(sql, params).await?,
        })
    }

    /// Current (non-deleted) resources of `ty` whose `url` is `url`, except the unchanged
    /// stored copies of the vendored terminology (the service has those already).
    async fn by_url(&mut self, ty: &str, url: &str) -> FhirResult<Vec<Value>> {
        let sql = format!(
            "SELECT r.content FROM resources r WHERE r.res_type = $1 AND r.deleted = 0 AND r.rid IN (SELECT u.rid FROM search_uri u WHERE u.param = 'url' AND u.value = $2) AND NOT {} ORDER BY r.rid",
            crate::canonical::pristine_filter(3)
        );
        let rows = self
            .query_rows(
                &sql,
                &[
                    SqlValue::Text(ty.to_string()),
                    SqlValue::Text(url.to_string()),
                    SqlValue::Text(crate::canonical::fingerprint().to_string()),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.first().and_then(SqlValue::as_str))
            .filter_map(|c| serde_json::from_str(c).ok())
            .collect())
    }

    async fn by_id(&mut self, ty: &str, id: &str) -> FhirResult<Option<Value>> {
        let rows = self
            .query_rows(
                "SELECT content FROM resources WHERE res_type = $1 AND res_id = $2 AND deleted = 0",
                &[
                    SqlValue::Text(ty.to_string()),
                    SqlValue::Text(id.to_string()),
                ],
            )
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .and_then(SqlValue::as_str)
            .and_then(|c| serde_json::from_str(c).ok()))
    }
}

/// The (system, code) pairs of a `$expand` result (nested `contains` included).
/// The most codes a `:in`/`:not-in`/`:above`/`:below` token search expands to.
const SEARCH_CODE_LIMIT: usize = 10_000;

fn expansion_codes(vs: &Value) -> Vec<(String, String)> {
    fn walk(items: &Value, out: &mut Vec<(String, String)>) {
        for c in items.as_array().into_iter().flatten() {
            if let (Some(s), Some(k)) = (
                c.get("system").and_then(Value::as_str),
                c.get("code").and_then(Value::as_str),
            ) {
                out.push((s.to_string(), k.to_string()));
            }
            if let Some(inner) = c.get("contains") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(c) = vs.pointer("/expansion/contains") {
        walk(c, &mut out);
    }
    out
}

/// The diagnostics of an OperationOutcome, joined.
fn outcome_text(oo: &Value) -> String {
    let texts: Vec<String> = oo
        .get("issue")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| {
            i.get("diagnostics")
                .or_else(|| i.pointer("/details/text"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    if texts.is_empty() {
        "the terminology service could not resolve it".into()
    } else {
        texts.join("; ")
    }
}

impl Default for SearchEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl SearchEngine {
    pub fn new() -> SearchEngine {
        // FHIRPath quantity comparisons use the full UCUM of the terminology crate
        kiln_fhirpath::units::set_ucum_canonicalizer(ucum_canonical);
        let official = Arc::new(Registry::r4());
        let registry = Arc::new(RwLock::new((*official).clone()));
        SearchEngine {
            indexer: Arc::new(SearchIndexer {
                registry: registry.clone(),
            }),
            registry,
            official,
            custom: Default::default(),
            terminology: std::sync::OnceLock::new(),
        }
    }

    /// Connects the terminology service (`:in`, `:not-in`, `:above`, `:below` on tokens) and the
    /// base URL literal ValueSet references are relative to.
    pub fn set_terminology(
        &self,
        terminology: Arc<crate::terminology::TerminologyService>,
        base_url: String,
    ) {
        let _ = self.terminology.set((terminology, base_url));
    }

    /// Brings the registry up to date with the stored SearchParameter resources when they changed
    /// since the last call (fingerprint: count, newest `lastUpdated`, sum of versions; one
    /// query). New and updated ones are added incrementally (one query for the rows changed
    /// since); a deletion, a changed `url` or counts that do not add up rebuild it from the
    /// official parameters plus every stored one. Runs at start, after writes that may touch
    /// SearchParameters, before `$reindex`, and periodically so every node of a shared
    /// PostgreSQL database converges. Returns whether the registry changed.
    pub async fn refresh_custom_parameters(&self, store: &kiln_store::Store) -> FhirResult<bool> {
        let rows = store
            .query_rows(
                "SELECT COUNT(*), MAX(last_updated), CAST(SUM(version) AS BIGINT) FROM resources WHERE res_type = 'SearchParameter' AND deleted <> 2",
                &[],
            )
            .await?;
        let col = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .and_then(SqlValue::as_i64)
                .unwrap_or(0)
        };
        let fp = (col(0), col(1), col(2));
        let (old_fp, known) = {
            let st = lock(&self.custom);
            (st.fingerprint, st.urls.clone())
        };
        if old_fp == Some(fp) {
            return Ok(false);
        }
        if let Some(old) = old_fp {
            // incremental: only what was written since the newest version seen
            let rows = store
                .query_rows(
                    "SELECT res_id, deleted, content FROM resources WHERE res_type = 'SearchParameter' AND deleted <> 2 AND last_updated > $1 ORDER BY last_updated",
                    &[SqlValue::Int(old.1)],
                )
                .await?;
            let mut changed = Vec::new();
            let mut new_ids = 0;
            let mut incremental = !rows.is_empty();
            for r in &rows {
                let id = r.first().and_then(SqlValue::as_str).unwrap_or("");
                let deleted = r.get(1).and_then(SqlValue::as_i64).unwrap_or(0) != 0;
                let sp = r
                    .get(2)
                    .and_then(SqlValue::as_str)
                    .and_then(|c| serde_json::from_str::<Value>(c).ok());
                let Some(sp) = sp.filter(|_| !deleted) else {
                    incremental = false;
                    break;
                };
                let url = sp
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                match known.get(id) {
                    Some(u) if *u != url => {
                        incremental = false;
                        break;
                    }
                    Some(_) => {}
                    None => new_ids += 1,
                }
                changed.push((id.to_string(), url, sp));
            }
            if incremental && old.0 + new_ids == fp.0 {
                let mut st = lock(&self.custom);
                {
                    let mut reg = match self.registry.write() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    for (id, url, sp) in changed {
                        if let Err(e) = reg.add_custom(&sp) {
                            tracing::warn!("SearchParameter {url} not usable for search: {e}");
                        }
                        st.urls.insert(id, url);
                    }
                }
                st.fingerprint = Some(fp);
                return Ok(true);
            }
        }
        let rows = store
            .query_rows(
                "SELECT res_id, content FROM resources WHERE res_type = 'SearchParameter' AND deleted = 0 ORDER BY rid",
                &[],
            )
            .await?;
        let mut reg = (*self.official).clone();
        let mut urls = std::collections::HashMap::new();
        for r in &rows {
            let (Some(id), Some(content)) = (
                r.first().and_then(SqlValue::as_str),
                r.get(1).and_then(SqlValue::as_str),
            ) else {
                continue;
            };
            let Ok(sp) = serde_json::from_str::<Value>(content) else {
                continue;
            };
            let url = sp
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if let Err(e) = reg.add_custom(&sp) {
                tracing::warn!("SearchParameter {url} not usable for search: {e}");
            }
            urls.insert(id.to_string(), url);
        }
        let n = urls.len();
        {
            let mut st = lock(&self.custom);
            match self.registry.write() {
                Ok(mut g) => *g = reg,
                Err(p) => *p.into_inner() = reg,
            }
            st.fingerprint = Some(fp);
            st.urls = urls;
        }
        tracing::info!(custom = n, "search parameter registry rebuilt");
        Ok(true)
    }

    /// Re-computes the index rows of the current versions of `rids` (and of the resources they
    /// contain) in one transaction (PostgreSQL locks the rows, so a concurrent update waits and
    /// then writes its own rows; SQLite has a single writer). Returns how many were re-indexed
    /// (deleted ones are skipped).
    pub async fn reindex_rids(&self, store: &kiln_store::Store, rids: &[i64]) -> FhirResult<usize> {
        if rids.is_empty() {
            return Ok(0);
        }
        let mut tx = store.begin().await?;
        let n = self.reindex_in(&mut tx, rids).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// [`SearchEngine::reindex_rids`] inside a transaction the caller commits (a `$reindex` job
    /// records its progress in the same transaction).
    pub async fn reindex_in(&self, tx: &mut WriteTx, rids: &[i64]) -> FhirResult<usize> {
        if rids.is_empty() {
            return Ok(0);
        }
        let dialect = tx.dialect();
        let list: Vec<String> = rids.iter().map(i64::to_string).collect();
        let list = list.join(",");
        let lock_rows = if dialect == Dialect::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let rows = tx
            .query_rows(
                &format!(
                    "SELECT rid, content FROM resources WHERE rid IN ({list}) AND deleted = 0 ORDER BY rid{lock_rows}"
                ),
                &[],
            )
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in &rows {
            let (Some(rid), Some(content)) = (
                r.first().and_then(SqlValue::as_i64),
                r.get(1).and_then(SqlValue::as_str),
            ) else {
                continue;
            };
            let v: Value = serde_json::from_str(content)
                .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}")))?;
            items.push((rid, v));
        }
        let n = items.len();
        tx.reindex(items).await?;
        Ok(n)
    }

    /// Resolves the `:in` / `:not-in` / `:above` / `:below` token values of a query into code
    /// lists through the terminology service (stored ValueSets and CodeSystems take part).
    /// A value set or code that cannot be resolved is a 400 naming the parameter and value.
    pub async fn resolve_code_sets(
        &self,
        reader: &mut Reader<'_>,
        query: &mut kiln_search::SearchQuery,
    ) -> FhirResult<()> {
        let pending = query.code_set_requests();
        if pending.is_empty() {
            return Ok(());
        }
        let Some((terminology, base_url)) = self.terminology.get() else {
            return Err(FhirError::not_supported(
                "no terminology service: ':in', ':not-in', ':above' and ':below' on tokens are not available",
            ));
        };
        let tx = terminology.get().await?;
        let mut resolved: std::collections::HashMap<
            kiln_search::CodeSetRequest,
            Result<Vec<(String, String)>, String>,
        > = Default::default();
        for p in pending {
            if resolved.contains_key(&p.request) {
                continue;
            }
            let result = match Self::expansion_request(base_url, reader, &p.request).await? {
                Err(why) => Err(why),
                Ok(params) => {
                    let tx = tx.clone();
                    tokio::task::spawn_blocking(move || tx.expand(&params))
                        .await
                        .map_err(|e| FhirError::internal(format!("terminology task failed: {e}")))?
                        .map_err(|e| outcome_text(&e.outcome))
                        .and_then(|vs| {
                            let total = vs
                                .pointer("/expansion/total")
                                .and_then(Value::as_u64)
                                .unwrap_or(0);
                            if total > SEARCH_CODE_LIMIT as u64 {
                                Err(format!(
                                    "the expansion has {total} codes, more than the {SEARCH_CODE_LIMIT} a search can use (too-costly)"
                                ))
                            } else {
                                Ok(expansion_codes(&vs))
                            }
                        })
                }
            };
            resolved.insert(p.request, result);
        }
        query
            .resolve_code_sets(&mut |r| {
                resolved
                    .get(r)
                    .cloned()
                    .unwrap_or_else(|| Err("not resolved".into()))
            })
            .map_err(|issues| FhirError::with_issues(StatusCode::BAD_REQUEST, issues))
    }

    /// The `$expand` Parameters for one request, or why it cannot be made.
    async fn expansion_request(
        base_url: &str,
        reader: &mut Reader<'_>,
        request: &kiln_search::CodeSetRequest,
    ) -> FhirResult<Result<Value, String>> {
        use kiln_search::CodeSetRequest as R;
        let mut params = vec![];
        let mut systems: Vec<String> = Vec::new();
        match request {
            R::ValueSet(v) => {
                let local = v
                    .strip_prefix(&format!("{base_url}/"))
                    .unwrap_or(v.as_str());
                let literal = !local.contains("://") && !local.starts_with("urn:");
                let vs = if literal {
                    let Some(id) = local.strip_prefix("ValueSet/") else {
                        return Ok(Err(
                            "expected a value set canonical URL or a ValueSet/[id] reference"
                                .into(),
                        ));
                    };
                    let id = id.split('/').next().unwrap_or(id);
                    match reader.by_id("ValueSet", id).await? {
                        Some(vs) => Some(vs),
                        None => return Ok(Err(format!("ValueSet/{id} does not exist"))),
                    }
                } else {
                    let (url, version) = match v.split_once('|') {
                        Some((u, ver)) => (u, Some(ver)),
                        None => (v.as_str(), None),
                    };
                    let stored = reader.by_url("ValueSet", url).await?;
                    let chosen = stored.into_iter().find(|r| {
                        version
                            .is_none_or(|ver| r.get("version").and_then(Value::as_str) == Some(ver))
                    });
                    if chosen.is_none() {
                        params.push(json!({"name": "url", "valueUri": url}));
                        if let Some(ver) = version {
                            params.push(json!({"name": "valueSetVersion", "valueString": ver}));
                        }
                    }
                    chosen
                };
                if let Some(vs) = vs {
                    // the code systems and value sets it builds on may be stored too
                    for inc in ["include", "exclude"] {
                        for i in vs
                            .pointer(&format!("/compose/{inc}"))
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let Some(s) = i.get("system").and_then(Value::as_str) {
                                systems.push(s.to_string());
                            }
                            for u in i
                                .get("valueSet")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                            {
                                let u = u.split('|').next().unwrap_or(u);
                                for r in reader.by_url("ValueSet", u).await? {
                                    params.push(json!({"name": "tx-resource", "resource": r}));
                                }
                            }
                        }
                    }
                    params.push(json!({"name": "valueSet", "resource": vs}));
                }
            }
            R::Below { system, code } | R::Above { system, code } => {
                let op = if matches!(request, R::Below { .. }) {
                    "is-a"
                } else {
                    "generalizes"
                };
                systems.push(system.clone());
                params.push(json!({"name": "valueSet", "resource": {
                    "resourceType": "ValueSet",
                    "status": "active",
                    "compose": {"include": [{
                        "system": system,
                        "filter": [{"property": "concept", "op": op, "value": code}]
                    }]}
                }}));
            }
        }
        systems.sort();
        systems.dedup();
        for s in systems {
            for r in reader.by_url("CodeSystem", &s).await? {
                params.push(json!({"name": "tx-resource", "resource": r}));
            }
        }
        // one page of up to SEARCH_CODE_LIMIT codes (the terminology service refuses larger
        // unpaged expansions; a larger total is refused below)
        params.push(json!({"name": "count", "valueInteger": SEARCH_CODE_LIMIT}));
        Ok(Ok(
            json!({"resourceType": "Parameters", "parameter": params}),
        ))
    }

    /// The indexer the store runs on every write.
    pub fn indexer(&self) -> Arc<dyn Indexer> {
        self.indexer.clone()
    }

    pub(crate) fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
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

    /// Absolute references on this server's own base are the local references they name
    /// (`subject=http://host/fhir/Patient/1` = `subject=Patient/1`): the base is stripped from
    /// every alternative of a reference parameter's value.
    fn localize_references(
        &self,
        ty: Option<&str>,
        mut query: Vec<(String, String)>,
        base_url: &str,
    ) -> Vec<(String, String)> {
        let prefix = format!("{}/", base_url.trim_end_matches('/'));
        if !query.iter().any(|(_, v)| v.contains(&prefix)) {
            return query;
        }
        let reg = self.registry();
        for (name, value) in query.iter_mut() {
            if name.contains('.') || name.starts_with('_') {
                continue;
            }
            let code = name.split(':').next().unwrap_or(name);
            let is_reference = reg
                .get(ty, code)
                .is_some_and(|p| p.param_type() == kiln_search::ParamType::Reference);
            if !is_reference || name.ends_with(":identifier") {
                continue;
            }
            *value = kiln_search::query::split_unescaped(value, ',')
                .into_iter()
                .map(|alt| match alt.strip_prefix(&prefix) {
                    Some(rest) if rest.starts_with(|c: char| c.is_ascii_uppercase()) => rest,
                    _ => alt,
                })
                .collect::<Vec<_>>()
                .join(",");
        }
        query
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
        let mut parsed = self.parse(Some(ty), &pairs, true)?;
        self.resolve_code_sets(&mut Reader::Tx(tx), &mut parsed)
            .await?;
        if parsed.criteria.is_empty() {
            return Err(FhirError::precondition_failed(format!(
                "conditional criteria `{query}` select nothing specific"
            )));
        }
        parsed.sort.clear();
        parsed.includes.clear();
        parsed.revincludes.clear();
        let page = kiln_search::plan::PageRequest {
            count: 10_000,
            cursor: None,
        };
        let plan = kiln_search::plan::plan(&parsed, to_search_dialect(tx.dialect()), &page)
            .map_err(|i| FhirError::with_issues(StatusCode::BAD_REQUEST, vec![i]))?;
        let params: Vec<SqlValue> = plan.params.into_iter().map(to_store_value).collect();
        let rows = tx.query_rows(&plan.sql, &params).await?;
        let rids: Vec<i64> = rows
            .iter()
            .filter_map(|r| r.first().and_then(SqlValue::as_i64))
            .collect();
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = rids.iter().map(i64::to_string).collect();
        let sql = format!(
            "SELECT res_id FROM resources WHERE rid IN ({})",
            list.join(",")
        );
        let rows = tx.query_rows(&sql, &[]).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                r.into_iter()
                    .next()
                    .and_then(|v| v.as_str().map(str::to_string))
            })
            .collect())
    }

    /// Is `resource` in the compartment `cty/cid` (per the R4 CompartmentDefinition)?
    pub fn in_compartment(&self, resource: &Value, cty: &str, cid: &str) -> bool {
        let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
            return false;
        };
        let reg = self.registry();
        match kiln_search::parse(&reg, Some(ty), &[], false)
            .and_then(|q| q.with_compartment(&reg, cty, cid))
        {
            Ok(q) => kiln_search::matcher::matches(&reg, &q, resource),
            Err(_) => false,
        }
    }

    /// Does `resource` match all of the search parameters `params` (AND)?
    pub fn matches_params(&self, resource: &Value, params: &[(String, String)]) -> bool {
        let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
            return false;
        };
        let reg = self.registry();
        match kiln_search::parse(&reg, Some(ty), params, true) {
            Ok(q) => kiln_search::matcher::matches(&reg, &q, resource),
            Err(_) => false,
        }
    }

    /// Type-level (`ty = Some`) or system-level search.
    pub async fn search_type(
        &self,
        state: &AppState,
        ty: Option<&str>,
        ctx: &RequestContext,
        access: &Access,
    ) -> FhirResult<FhirResponse> {
        if let Some(t) = ty {
            crate::interactions::check_type(t)?;
            access.check(Interaction::Search, t)?;
        } else {
            access.check_any(Interaction::Search)?;
        }
        // a granular scope with one parameter set (`patient/Observation.rs?category=laboratory`)
        // joins the query, so counts and pages are right; several sets are post-filtered
        let mut query = ctx.query.clone();
        if let (Some(t), Some(g)) = (ty, access.grant()) {
            if let kiln_smart_auth::ScopeFilter::AnyOf(sets) =
                g.scope_filter(Interaction::Search, t)
            {
                if sets.len() == 1 {
                    query.extend(sets[0].iter().cloned());
                }
            }
        }
        let query = self.localize_references(ty, query, &state.base_url);
        let mut parsed = self.parse(ty, &query, ctx.strict)?;
        // patient-context grants search inside their patient's compartment
        let compartment_patient = match ty {
            Some(t) => access.compartment_patient(Interaction::Search, t),
            // system search: any type limited to the patient puts the search in the compartment
            None => access.grant().and_then(|g| {
                parsed
                    .target_types()
                    .iter()
                    .any(|t| g.requires_patient_compartment(Interaction::Search, t))
                    .then(|| {
                        g.patient()
                            .unwrap_or("\u{0}no-patient-in-context")
                            .to_string()
                    })
            }),
        };
        if let Some(pid) = compartment_patient {
            if parsed.compartment.is_none() {
                parsed = parsed
                    .with_compartment(&self.registry(), "Patient", &pid)
                    .map_err(|issues| FhirError::with_issues(StatusCode::BAD_REQUEST, issues))?;
            }
        }
        self.resolve_code_sets(&mut Reader::Store(&state.store), &mut parsed)
            .await?;
        let path = ty.unwrap_or("").to_string();
        self.execute(state, parsed, &path, ctx, access).await
    }

    /// Compartment search (`Patient/123/Observation`, `Patient/123/*`).
    pub async fn search_compartment(
        &self,
        state: &AppState,
        cty: &str,
        cid: &str,
        ty: &str,
        ctx: &RequestContext,
        access: &Access,
    ) -> FhirResult<FhirResponse> {
        crate::interactions::check_type(cty)?;
        let target = if ty == "*" { None } else { Some(ty) };
        if let Some(t) = target {
            crate::interactions::check_type(t)?;
            access.check(Interaction::Search, t)?;
        } else {
            access.check_any(Interaction::Search)?;
        }
        let query = self.localize_references(target, ctx.query.clone(), &state.base_url);
        let parsed = self.parse(target, &query, ctx.strict)?;
        let mut parsed = parsed
            .with_compartment(&self.registry(), cty, cid)
            .map_err(|issues| FhirError::with_issues(StatusCode::BAD_REQUEST, issues))?;
        self.resolve_code_sets(&mut Reader::Store(&state.store), &mut parsed)
            .await?;
        self.execute(state, parsed, &format!("{cty}/{cid}/{ty}"), ctx, access)
            .await
    }

    /// Runs a parsed query as a searchset page (also `$everything`, which builds its query in
    /// `operations/everything.rs`). `path` is what the paging links repeat after the base.
    pub(crate) async fn execute(
        &self,
        state: &AppState,
        query: kiln_search::SearchQuery,
        path: &str,
        ctx: &RequestContext,
        access: &Access,
    ) -> FhirResult<FhirResponse> {
        let dialect = to_search_dialect(state.store.dialect());
        let count = query
            .count
            .unwrap_or(state.settings.default_page_size)
            .min(state.settings.max_page_size);
        let summary_count = query.summary.as_deref() == Some("count");
        let page = kiln_search::plan::PageRequest {
            count: if summary_count { 0 } else { count },
            cursor: ctx.param("_cursor").map(str::to_string),
        };
        // every statement of the request on one reader connection (one pool visit)
        let mut db = state.store.reader().await?;
        // the sizes of the index ranges the planner chooses between (SQLite)
        let mut estimates = kiln_search::Estimates::new();
        if let Some((sql, ps, keys)) = kiln_search::estimate_sql(&query, dialect) {
            let ps: Vec<SqlValue> = ps.into_iter().map(to_store_value).collect();
            let row = db.query_rows(&sql, &ps).await?.into_iter().next();
            for (key, v) in keys.into_iter().zip(row.unwrap_or_default()) {
                if let Some(n) = v.as_i64() {
                    estimates.insert(key, n.max(0) as u64);
                }
            }
        }
        let plan = kiln_search::plan_with(&query, dialect, &page, &estimates)
            .map_err(|i| FhirError::with_issues(StatusCode::BAD_REQUEST, vec![i]))?;
        if ctx.param("_explain").is_some() || ctx.param("__explain").is_some() {
            let mut issues = vec![
                kiln_fhir::Issue::information("informational", plan.explain.clone()),
                kiln_fhir::Issue::information("informational", format!("SQL: {}", plan.sql)),
            ];
            if !estimates.is_empty() {
                let mut e: Vec<String> = estimates
                    .iter()
                    .map(|(k, n)| format!("{k} ≈ {n}"))
                    .collect();
                e.sort();
                issues.push(kiln_fhir::Issue::information(
                    "informational",
                    format!(
                        "estimates (index rows, counted up to {}): {}",
                        kiln_search::plan::ESTIMATE_CAP,
                        e.join(", ")
                    ),
                ));
            }
            let oo = kiln_fhir::operation_outcome(&issues);
            return Ok(FhirResponse::ok(Body::Resource(oo)));
        }
        let count_params: Vec<SqlValue> = plan
            .count_params
            .iter()
            .cloned()
            .map(to_store_value)
            .collect();
        let params: Vec<SqlValue> = plan.params.iter().cloned().map(to_store_value).collect();
        let passthrough =
            query.summary.is_none() && query.elements.is_empty() && access.grant().is_none();
        // PostgreSQL: the page's resources joined to the page statement (one statement per
        // page instead of two), their JSON in it unless the resource cache holds most of them
        let page_listed = passthrough && dialect == kiln_search::Dialect::Postgres;
        let page_content = page_listed && db.listed_content();
        let page_sql = |sql: &str| {
            if page_listed {
                kiln_search::page_with_resources_sql(sql, page_content)
            } else {
                sql.to_string()
            }
        };
        let mut rows = if summary_count || count == 0 {
            Vec::new()
        } else {
            db.query_rows(&page_sql(&plan.sql), &params).await?
        };
        // a sort key walked from its index: the resources without a key continue the page
        for (sql, ps) in &plan.more {
            if summary_count || count == 0 || rows.len() > count {
                break;
            }
            let ps: Vec<SqlValue> = ps.iter().cloned().map(to_store_value).collect();
            rows.extend(db.query_rows(&page_sql(sql), &ps).await?);
        }
        // keyset paging both ways: a forward page fetched one extra row (there is a next page);
        // a backward page (a `previous` link) came nearest-first, its extra row meaning there
        // is a page before it
        let row_key = |row: &Vec<SqlValue>| -> (Vec<kiln_search::SqlValue>, i64) {
            let rid = row.first().and_then(SqlValue::as_i64).unwrap_or(0);
            (row[1..].iter().cloned().map(to_search_value).collect(), rid)
        };
        let more = rows.len() > count;
        rows.truncate(count);
        if plan.backward {
            rows.reverse();
        }
        // a listed page's resource columns, split off its rows (which keep the page's rid and
        // keys): `kiln_ord, version, res_type, res_id[, content]`
        let listed_columns: Vec<Vec<SqlValue>> = if page_listed {
            let extra = kiln_search::page_resource_columns(page_content);
            rows.iter_mut()
                .map(|row| row.split_off(row.len().saturating_sub(extra)))
                .collect()
        } else {
            Vec::new()
        };
        let (mut next, mut previous) = (None, None);
        if more || plan.backward {
            if let Some(last) = rows.last() {
                let (keys, rid) = row_key(last);
                next = Some(plan.next_cursor(&keys, rid));
            }
        }
        if (plan.backward && more) || (!plan.backward && page.cursor.is_some()) {
            if let Some(first) = rows.first() {
                let (keys, rid) = row_key(first);
                previous = Some(plan.previous_cursor(&keys, rid));
            }
        }
        let rids: Vec<i64> = rows
            .iter()
            .filter_map(|r| r.first().and_then(SqlValue::as_i64))
            .collect();
        let total_mode = query.total.as_deref().unwrap_or("estimate");
        let total = if summary_count || total_mode == "accurate" {
            let r = db.query_rows(&plan.count_sql, &count_params).await?;
            r.first().and_then(|x| x.first()).and_then(SqlValue::as_i64)
        } else if total_mode != "none" && next.is_none() && page.cursor.is_none() {
            Some(rids.len() as i64)
        } else {
            None
        };
        // Passthrough (nothing to cut or filter): the Bundle is written as text around the
        // stored JSON, never parsed and re-serialised. On PostgreSQL the page listed its
        // resources (`fold_listed`); on SQLite a page in rid order (no `_sort`) is read as
        // borrowed rows written once into the entries (`fold_resources`); otherwise the
        // resources are fetched in the page's order.
        let mut match_text: Vec<String> = Vec::new();
        let match_chunks = || EntryChunks::new(&state.base_url, referenced_types(&query).to_vec());
        let matches = if page_listed {
            let listed: Vec<kiln_store::ListedRow<'_>> = rows
                .iter()
                .zip(&listed_columns)
                .filter_map(|(row, t)| {
                    Some(kiln_store::ListedRow {
                        rid: row.first()?.as_i64()?,
                        version: t.get(1)?.as_i64()?,
                        resource_type: t.get(2)?.as_str()?,
                        id: t.get(3)?.as_str()?,
                        content: t.get(4).and_then(SqlValue::as_str),
                    })
                })
                .collect();
            match_text = db
                .fold_listed(&listed, match_chunks(), EntryChunks::push_match)
                .await?
                .parts;
            Vec::new()
        } else if passthrough && rids.windows(2).all(|w| w[0] < w[1]) {
            match_text = db
                .fold_resources(&rids, match_chunks(), EntryChunks::push_match)
                .await?
                .parts;
            Vec::new()
        } else {
            db.fetch_by_rids(&rids).await?
        };
        // The included entries as text, comma-separated within and between the parts, written
        // from the rows as they are read (SQLite: borrowed from the database's memory). The
        // database concatenating them instead cost more on both backends (1,292
        // reverse-included Observations, server CPU per request on SQLite: 1.79 ms concatenated
        // by SQLite, 1.64 as rows into one string, 1.45 into parts; PostgreSQL `string_agg`:
        // 222 -> 270 req/s as rows). Not with `:iterate`, which needs each level's rids (the
        // loop below).
        let mut included_text: Vec<String> = Vec::new();
        // the includes were read as text (or there were none to read)
        let mut includes_done = false;
        if passthrough {
            let content = db.listed_content();
            if let Some((sql, ps)) = kiln_search::included_rows_sql(&query, dialect, &rids, content)
            {
                let ps: Vec<SqlValue> = ps.into_iter().map(to_store_value).collect();
                let chunks = db
                    .fold_included(
                        &sql,
                        &ps,
                        &rids,
                        EntryChunks::new(&state.base_url, Vec::new()),
                        |chunks, r| {
                            chunks.push_entry(r.resource_type, r.id, r.content.trim(), "include");
                        },
                    )
                    .await?;
                included_text = chunks.parts;
                includes_done = true;
            }
        }
        // includes, iterated until nothing new turns up
        let mut included = Vec::new();
        if !includes_done && (!query.includes.is_empty() || !query.revincludes.is_empty()) {
            let mut seen: std::collections::HashSet<i64> = rids.iter().copied().collect();
            let mut frontier = rids.clone();
            let mut first = true;
            while !frontier.is_empty() {
                let Some((sql, ps)) =
                    kiln_search::plan::include_sql(&query, dialect, &frontier, !first)
                else {
                    break;
                };
                let ps: Vec<SqlValue> = ps.into_iter().map(to_store_value).collect();
                let found = db.query_rows(&sql, &ps).await?;
                let new: Vec<i64> = found
                    .iter()
                    .filter_map(|r| r.first().and_then(SqlValue::as_i64))
                    .filter(|r| seen.insert(*r))
                    .collect();
                included.extend(db.fetch_by_rids(&new).await?);
                frontier = new;
                first = false;
            }
        }
        // the connection goes back before the response is written
        drop(db);
        // Bundle
        let link = |cursor: Option<&str>| {
            let mut ps: Vec<String> = query
                .self_link_params()
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            if !query.self_link_params().iter().any(|(k, _)| k == "_count") {
                ps.push(format!("_count={count}"));
            }
            if let Some(c) = cursor {
                ps.push(format!("_cursor={}", encode(c)));
            }
            let base = if path.is_empty() {
                state.base_url.clone()
            } else {
                format!("{}/{}", state.base_url, path)
            };
            format!("{base}?{}", ps.join("&"))
        };
        let mut links = vec![
            json!({"relation": "self", "url": link(page.cursor.as_deref())}),
            json!({"relation": "first", "url": link(None)}),
        ];
        if let Some(p) = &previous {
            links.push(json!({"relation": "previous", "url": link(Some(p))}));
        }
        if let Some(n) = &next {
            links.push(json!({"relation": "next", "url": link(Some(n))}));
        }
        if passthrough {
            let bundle = searchset_bundle(total, links);
            let head = serde_json::to_string(&bundle)
                .map_err(|e| FhirError::internal(format!("cannot serialise the Bundle: {e}")))?;
            if match_text.is_empty()
                && matches.is_empty()
                && included.is_empty()
                && included_text.is_empty()
                && query.warnings.is_empty()
            {
                return Ok(FhirResponse::ok(Body::StoredJson(head)));
            }
            // the resources fetched in the page's order (and the includes of `:iterate`)
            let mut fetched = EntryChunks::new(&state.base_url, Vec::new());
            for (stored, mode) in matches
                .iter()
                .map(|s| (s, entry_mode(referenced_types(&query), &s.resource_type)))
                .chain(included.iter().map(|s| (s, "include")))
            {
                fetched.push_entry(
                    &stored.resource_type,
                    &stored.id,
                    stored.content.trim(),
                    mode,
                );
            }
            let mut w = BundleText::new(head.len() + 16);
            // `head` is a JSON object: its closing brace is the last byte
            w.cur.push_str(&head[..head.len() - 1]);
            w.cur.push_str(",\"entry\":[");
            w.parts(match_text);
            w.parts(fetched.parts);
            w.parts(included_text);
            if !query.warnings.is_empty() {
                w.separator();
                w.cur.push_str(
                    &json!({
                        "resource": kiln_fhir::operation_outcome(&query.warnings),
                        "search": {"mode": "outcome"},
                    })
                    .to_string(),
                );
            }
            w.cur.push_str("]}");
            return Ok(FhirResponse::ok(w.finish()));
        }
        let mut entries = Vec::with_capacity(matches.len() + included.len());
        for (stored, mode) in matches
            .into_iter()
            .map(|s| {
                let mode = entry_mode(referenced_types(&query), &s.resource_type);
                (s, mode)
            })
            .chain(included.into_iter().map(|s| (s, "include")))
        {
            let mut resource: Value = serde_json::from_str(&stored.content)
                .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}")))?;
            if let Some(m) = query
                .summary
                .as_deref()
                .and_then(kiln_fhir::summary::SummaryMode::parse)
            {
                resource = kiln_fhir::summary::summarize(&resource, m);
            }
            if !query.elements.is_empty() && mode == "match" {
                let els: Vec<&str> = query.elements.iter().map(String::as_str).collect();
                resource = kiln_fhir::summary::select_elements(&resource, &els);
            }
            entries.push(json!({
                "fullUrl": full_url(&state.base_url, &stored),
                "resource": resource,
                "search": {"mode": mode},
            }));
        }
        let mut total = total;
        if access.grant().is_some() {
            // results are filtered, not just the query checked: every match and include
            let before = entries.len();
            entries.retain(|e| access.visible(state, Interaction::Search, &e["resource"]));
            if entries.len() != before {
                // the SQL total counted resources the grant cannot see
                total = None;
            }
        }
        if !query.warnings.is_empty() {
            entries.push(json!({
                "resource": kiln_fhir::operation_outcome(&query.warnings),
                "search": {"mode": "outcome"},
            }));
        }
        let mut bundle = searchset_bundle(total, links);
        if !entries.is_empty() {
            bundle["entry"] = Value::Array(entries);
        }
        Ok(FhirResponse::ok(Body::Resource(bundle)))
    }
}

/// Searchset entries written as text into parts of about [`EntryChunks::PART`] bytes: a part
/// is never reallocated and copied as it grows (a `_revinclude` page is ~1.3 MB; growing one
/// string by doubling cost copies and page faults of fresh memory: ~9 % of that request's CPU
/// in `clear_page_erms`), and the parts go out as they are ([`Body::StoredJsonParts`]).
struct EntryChunks {
    parts: Vec<String>,
    base: String,
    /// `base` as it is inside a JSON string
    base_escaped: String,
    /// resource types whose matches are `search.mode = include` (`$everything`'s referenced
    /// resources)
    referenced: Vec<String>,
}

impl EntryChunks {
    const PART: usize = 256 * 1024;

    fn new(base: &str, referenced: Vec<String>) -> EntryChunks {
        let mut quoted = String::new();
        push_json_string(&mut quoted, base);
        EntryChunks {
            parts: Vec::new(),
            base: base.to_string(),
            base_escaped: quoted[1..quoted.len() - 1].to_string(),
            referenced,
        }
    }

    /// A search match read as text: its entry, with the `search.mode` its type gets
    /// ([`entry_mode`]).
    fn push_match(&mut self, r: kiln_store::StoredText<'_>) {
        let mode = entry_mode(&self.referenced, r.resource_type);
        self.push_entry(r.resource_type, r.id, r.content.trim(), mode);
    }

    /// One entry (`fullUrl` `[base]/[type]/[id]`, or `[base]/[row id]` for a contained
    /// resource, whose row id is `[container type]/[container id]#[local id]`; the resource's
    /// JSON text as stored; `search.mode`), after a comma unless it is the first.
    fn push_entry(&mut self, ty: &str, id: &str, content: &str, mode: &str) {
        let need = content.len() + self.base.len() + ty.len() + id.len() + mode.len() + 64;
        let first = self.parts.is_empty();
        match self.parts.last_mut() {
            Some(p) if p.capacity() - p.len() >= need => {}
            _ => self.parts.push(String::with_capacity(need.max(Self::PART))),
        }
        let out = self.parts.last_mut().expect("a part was pushed");
        if !first {
            out.push(',');
        }
        out.push_str("{\"fullUrl\":");
        if id.contains('#') {
            push_json_string(out, &format!("{}/{id}", self.base));
        } else if json_plain(ty) && json_plain(id) {
            // ids and types need no escaping (FHIR ids are `[A-Za-z0-9.-]`); the base was
            // escaped once
            out.push('"');
            out.push_str(&self.base_escaped);
            out.push('/');
            out.push_str(ty);
            out.push('/');
            out.push_str(id);
            out.push('"');
        } else {
            push_json_string(out, &format!("{}/{ty}/{id}", self.base));
        }
        out.push_str(",\"resource\":");
        out.push_str(content);
        out.push_str(",\"search\":{\"mode\":\"");
        out.push_str(mode);
        out.push_str("\"}}");
    }
}

/// A searchset Bundle's text: the part being written and the parts before it, with a comma
/// before every entry but the first.
struct BundleText {
    parts: Vec<String>,
    cur: String,
    first: bool,
}

impl BundleText {
    fn new(capacity: usize) -> BundleText {
        BundleText {
            parts: Vec::new(),
            cur: String::with_capacity(capacity),
            first: true,
        }
    }

    /// Before an entry written into `cur`.
    fn separator(&mut self) {
        if !self.first {
            self.cur.push(',');
        }
        self.first = false;
    }

    /// Entries already written as parts of their own (see [`EntryChunks`]), kept as they are.
    fn parts(&mut self, mut entries: Vec<String>) {
        if entries.iter().all(String::is_empty) {
            return;
        }
        self.separator();
        self.parts.push(std::mem::take(&mut self.cur));
        self.parts.append(&mut entries);
    }

    fn finish(mut self) -> Body {
        if self.parts.is_empty() {
            return Body::StoredJson(self.cur);
        }
        self.parts.push(self.cur);
        Body::StoredJsonParts(self.parts)
    }
}

/// `s` is the same inside a JSON string (no quote, backslash or control character).
fn json_plain(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// Appends `s` as a JSON string.
fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&Value::from(s).to_string());
}

/// `search.mode` of a row the query matched: `include` for the resources outside the
/// compartment that match only because a member references them (`$everything`).
fn entry_mode(referenced: &[String], resource_type: &str) -> &'static str {
    if referenced.iter().any(|t| t == resource_type) {
        "include"
    } else {
        "match"
    }
}

/// The types [`entry_mode`] marks `include` for this query (its compartment's referenced ones).
fn referenced_types(query: &kiln_search::SearchQuery) -> &[String] {
    query
        .compartment
        .as_ref()
        .map_or(&[], |c| c.referenced.as_slice())
}

/// UCUM canonical form of one unit (`mg/dL` → (10, `g.m-3`)), for FHIRPath quantity comparison.
fn ucum_canonical(unit: &str) -> Option<(f64, String)> {
    kiln_terminology::ucum::canonicalize(1.0, unit).ok()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn to_search_value(v: SqlValue) -> kiln_search::SqlValue {
    match v {
        SqlValue::Null => kiln_search::SqlValue::Null,
        SqlValue::Int(i) => kiln_search::SqlValue::Int(i),
        SqlValue::Real(f) => kiln_search::SqlValue::Real(f),
        SqlValue::Text(s) => kiln_search::SqlValue::Text(s),
    }
}

/// A `searchset` Bundle without entries: new id, `meta.lastUpdated` now, `total` when counted,
/// and the paging links.
fn searchset_bundle(total: Option<i64>, links: Vec<Value>) -> Value {
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": kiln_store::format_instant(kiln_store::now_micros())},
        "type": "searchset",
    });
    if let Some(t) = total {
        bundle["total"] = json!(t);
    }
    bundle["link"] = Value::Array(links);
    bundle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(body: Body) -> String {
        match body {
            Body::StoredJson(s) => s,
            Body::StoredJsonParts(p) => p.concat(),
            Body::Resource(v) => v.to_string(),
        }
    }

    /// Entries written into parts (a part holds ~256 KiB and is never reallocated), with
    /// escaped `fullUrl`s, contained row ids, and commas between groups, make one valid Bundle.
    #[test]
    fn bundle_text_in_parts() {
        let mut chunks = EntryChunks::new("http://h/fhir", vec!["Practitioner".into()]);
        let big = format!(
            "{{\"resourceType\":\"Basic\",\"x\":\"{}\"}}",
            "a".repeat(100_000)
        );
        for i in 0..6 {
            chunks.push_entry("Basic", &format!("b{i}"), &big, "match");
        }
        chunks.push_entry(
            "Medication",
            "MedicationRequest/m1#med",
            "{\"resourceType\":\"Medication\"}",
            "match",
        );
        assert!(chunks.parts.len() >= 3, "{} parts", chunks.parts.len());
        assert!(chunks
            .parts
            .iter()
            .all(|p| p.capacity() <= EntryChunks::PART.max(big.len() + 200)));
        let mut odd = EntryChunks::new("http://h/\"q\"", Vec::new());
        odd.push_entry("Basic", "x", "{}", "include");
        odd.push_entry("Basic", "we\"ird", "{}", "include");
        let mut w = BundleText::new(16);
        w.cur.push_str("{\"resourceType\":\"Bundle\",\"entry\":[");
        w.parts(chunks.parts);
        w.separator();
        w.cur.push_str(
            "{\"resource\":{\"resourceType\":\"Basic\"},\"search\":{\"mode\":\"match\"}}",
        );
        w.parts(odd.parts);
        w.parts(Vec::new());
        w.cur.push_str("]}");
        let body = w.finish();
        assert!(matches!(body, Body::StoredJsonParts(_)));
        let v: Value = serde_json::from_str(&text(body)).unwrap();
        let e = v["entry"].as_array().unwrap();
        assert_eq!(e.len(), 10);
        assert_eq!(e[0]["fullUrl"], "http://h/fhir/Basic/b0");
        assert_eq!(e[0]["resource"]["x"].as_str().unwrap().len(), 100_000);
        assert_eq!(
            e[6]["fullUrl"], "http://h/fhir/MedicationRequest/m1#med",
            "a contained resource's row id"
        );
        assert_eq!(e[8]["fullUrl"], "http://h/\"q\"/Basic/x");
        assert_eq!(e[9]["fullUrl"], "http://h/\"q\"/Basic/we\"ird");
        assert_eq!(e[9]["search"]["mode"], "include");
        // no parts: one string
        let mut w = BundleText::new(16);
        w.cur.push_str("{\"entry\":[]}");
        assert!(matches!(w.finish(), Body::StoredJson(_)));
    }
}
