//! `$closure` (ConceptMap/$closure, conceptmap-operation-closure.html): maintenance of a
//! client-side transitive closure table from the server's subsumption logic
//! (terminology-service.html#closure).
//!
//! - `POST [base]/$closure` with only `name` (re)initialises the closure table of that name:
//!   its concepts and entries are forgotten and its version is `0`; the answer is an empty
//!   ConceptMap.
//! - With `concept` Codings, the concepts not yet in the table are added and the answer is a
//!   ConceptMap of the new subsumption relations between them and the concepts already there
//!   (same code system), one `group` per system: element = the new concept, target = the related
//!   one with equivalence `subsumes` (the target is broader: the new concept is-a the target) or
//!   `specializes` (the target is narrower). Each call that finds new relations increments the
//!   table's version, which the ConceptMap reports in `version`.
//! - With `version`, the answer holds every entry added after that version (resynchronisation),
//!   after adding the concepts of the same call if any.
//!
//! Closure tables live in the store's database (`closure_table`, `closure_concept`,
//! `closure_entry`, created on first use) on both backends, so they survive restarts and are
//! shared by the nodes of one PostgreSQL database. Subsumption is decided by the terminology
//! service (`$subsumes`), so every code system it knows (loaded ICD-10-CM, SNOMED CT, LOINC, the
//! R4/THO code systems) can be used. Not an idempotent operation: POST only.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, Row};

use super::{BoxFuture, Definition, Operation, Target};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::interactions::RequestContext;
use crate::state::AppState;

pub struct Closure {
    def: Definition,
    /// Tables created (once per process).
    schema: tokio::sync::OnceCell<()>,
    /// Serialises the changes of closure tables made by this node (the database transaction
    /// keeps each change atomic; PostgreSQL row locks order the nodes).
    lock: tokio::sync::Mutex<()>,
}

impl Default for Closure {
    fn default() -> Self {
        Closure {
            def: Definition {
                name: "closure",
                canonical: "http://hl7.org/fhir/OperationDefinition/ConceptMap-closure",
                system: true,
                type_level: false,
                instance: false,
                resource_types: &["ConceptMap"],
                // the closure table is bookkeeping for the client, not FHIR data: any client
                // that may use the terminology operations may keep closure tables
                affects_state: false,
            },
            schema: tokio::sync::OnceCell::new(),
            lock: tokio::sync::Mutex::new(()),
        }
    }
}

/// A relation found between a new concept (`source`) and one in the table (`target`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    version: i64,
    system: String,
    source: String,
    target: String,
    equivalence: String,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS closure_table (name TEXT PRIMARY KEY, version BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS closure_concept (name TEXT NOT NULL, system TEXT NOT NULL, \
     code TEXT NOT NULL, PRIMARY KEY (name, system, code))",
    "CREATE TABLE IF NOT EXISTS closure_entry (name TEXT NOT NULL, version BIGINT NOT NULL, \
     system TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL, equivalence TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS closure_entry_name_version ON closure_entry (name, version)",
];

fn db_err(e: sqlx::Error) -> FhirError {
    FhirError::internal(format!("closure table storage: {e}"))
}

/// Runs the same code over either backend's pool/transaction type.
macro_rules! with_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            kiln_store::PoolHandle::Sqlite($p) => $body,
            kiln_store::PoolHandle::Postgres($p) => $body,
        }
    };
}

/// The parameters of one call.
struct Request {
    name: String,
    concepts: Vec<(String, String)>,
    since: Option<i64>,
}

fn parse(params: &Value) -> FhirResult<Request> {
    let list = params
        .get("parameter")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let value_str = |p: &Value| -> Option<String> {
        p.as_object()?
            .iter()
            .find(|(k, _)| k.starts_with("value"))
            .and_then(|(_, v)| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
    };
    let mut name = None;
    let mut concepts = Vec::new();
    let mut since = None;
    for (i, p) in list.iter().enumerate() {
        match p.get("name").and_then(Value::as_str) {
            Some("name") => {
                name = value_str(p).filter(|s| !s.trim().is_empty());
            }
            Some("concept") => {
                // a Coding; from a query string, `system|code`
                let (system, code) = match p.get("valueCoding") {
                    Some(c) => (
                        c.get("system").and_then(Value::as_str).map(str::to_string),
                        c.get("code").and_then(Value::as_str).map(str::to_string),
                    ),
                    None => match value_str(p).as_deref().and_then(|s| s.split_once('|')) {
                        Some((s, c)) => (Some(s.to_string()), Some(c.to_string())),
                        None => (None, None),
                    },
                };
                match (system, code) {
                    (Some(s), Some(c)) if !s.is_empty() && !c.is_empty() => concepts.push((s, c)),
                    _ => {
                        return Err(FhirError::invalid_at(
                            "each concept needs a system and a code",
                            format!("Parameters.parameter[{i}].valueCoding"),
                        ))
                    }
                }
            }
            Some("version") => {
                let v = value_str(p).unwrap_or_default();
                since = Some(v.trim().parse::<i64>().map_err(|_| {
                    FhirError::invalid_at(
                        format!("version '{v}' is not a version this server issued (an integer)"),
                        format!("Parameters.parameter[{i}]"),
                    )
                })?);
            }
            _ => {}
        }
    }
    let name = name.ok_or_else(|| {
        FhirError::invalid_at("$closure needs a 'name' parameter", "Parameters.parameter")
    })?;
    Ok(Request {
        name,
        concepts,
        since,
    })
}

/// The answer: the entries as a ConceptMap, one group per code system.
fn concept_map(name: &str, version: i64, entries: &[Entry]) -> Value {
    let mut groups: BTreeMap<&str, BTreeMap<&str, Vec<Value>>> = BTreeMap::new();
    for e in entries {
        groups
            .entry(&e.system)
            .or_default()
            .entry(&e.source)
            .or_default()
            .push(json!({"code": e.target, "equivalence": e.equivalence}));
    }
    let group: Vec<Value> = groups
        .into_iter()
        .map(|(system, elements)| {
            let element: Vec<Value> = elements
                .into_iter()
                .map(|(code, target)| json!({"code": code, "target": target}))
                .collect();
            json!({"source": system, "target": system, "element": element})
        })
        .collect();
    let mut cm = json!({
        "resourceType": "ConceptMap",
        "id": uuid::Uuid::new_v4().to_string(),
        "version": version.to_string(),
        "name": format!("Updates for Closure Table {name}"),
        "status": "active",
        "experimental": true,
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    });
    if !group.is_empty() {
        cm["group"] = Value::Array(group);
    }
    cm
}

impl Closure {
    async fn ensure_schema(&self, pool: &kiln_store::PoolHandle) -> FhirResult<()> {
        self.schema
            .get_or_try_init(|| async {
                for sql in SCHEMA {
                    with_pool!(pool, |p| sqlx::query(AssertSqlSafe(*sql))
                        .execute(p)
                        .await
                        .map(|_| ())
                        .map_err(db_err))?;
                }
                Ok::<(), FhirError>(())
            })
            .await
            .map(|_| ())
    }

    /// The relations of each new concept with the concepts already in the table and the new
    /// ones before it. Unknown systems or codes are 4xx errors naming the concept.
    async fn relations(
        &self,
        state: &AppState,
        existing: &[(String, String)],
        new: &[(String, String)],
    ) -> FhirResult<Vec<(String, String, String, String)>> {
        let tx = state.terminology.get().await?;
        let existing = existing.to_vec();
        let new = new.to_vec();
        tokio::task::spawn_blocking(move || {
            let subsumes = |system: &str, a: &str, b: &str| {
                tx.subsumes(&json!({"resourceType": "Parameters", "parameter": [
                    {"name": "system", "valueUri": system},
                    {"name": "codeA", "valueCode": a},
                    {"name": "codeB", "valueCode": b}]}))
            };
            let outcome = |v: &Value| -> Option<String> {
                v["parameter"]
                    .as_array()?
                    .iter()
                    .find(|p| p["name"] == "outcome")?
                    .get("valueCode")?
                    .as_str()
                    .map(str::to_string)
            };
            let mut out = Vec::new();
            let mut known: Vec<(String, String)> = existing;
            for (system, code) in new {
                // the concept must exist in a code system the server knows
                if let Err(e) = subsumes(&system, &code, &code) {
                    let text = e
                        .issues
                        .first()
                        .map(|i| i.diagnostics.clone())
                        .unwrap_or_default();
                    let status = if e.status == 404 {
                        axum::http::StatusCode::NOT_FOUND
                    } else {
                        axum::http::StatusCode::BAD_REQUEST
                    };
                    return Err(FhirError::new(
                        status,
                        kiln_fhir::Issue::error(
                            if e.status == 404 {
                                "not-found"
                            } else {
                                "invalid"
                            },
                            format!("concept {system}|{code}: {text}"),
                        )
                        .at("Parameters.parameter.valueCoding"),
                    ));
                }
                for (s2, c2) in known.iter().filter(|(s2, _)| *s2 == system) {
                    let r = subsumes(&system, &code, c2).map_err(|e| {
                        FhirError::internal(format!(
                            "subsumption of {code} and {c2} in {system}: {:?}",
                            e.issues.first().map(|i| &i.diagnostics)
                        ))
                    })?;
                    let eq = match outcome(&r).as_deref() {
                        // the new concept is-a the one in the table: the target is broader
                        Some("subsumed-by") => "subsumes",
                        Some("subsumes") => "specializes",
                        Some("equivalent") if code != *c2 => "equal",
                        _ => continue,
                    };
                    out.push((s2.clone(), code.clone(), c2.clone(), eq.to_string()));
                }
                known.push((system, code));
            }
            Ok(out)
        })
        .await
        .map_err(|e| FhirError::internal(format!("closure task failed: {e}")))?
    }

    async fn call(&self, state: &AppState, req: Request) -> FhirResult<Value> {
        let pool = state.store.pool_handle();
        self.ensure_schema(&pool).await?;
        let _guard = self.lock.lock().await;
        let name = req.name.as_str();
        let postgres = matches!(pool, kiln_store::PoolHandle::Postgres(_));
        // initialisation: name only
        if req.concepts.is_empty() && req.since.is_none() {
            with_pool!(&pool, |p| {
                let mut t = p.begin().await.map_err(db_err)?;
                for sql in [
                    "DELETE FROM closure_concept WHERE name = $1",
                    "DELETE FROM closure_entry WHERE name = $1",
                    "INSERT INTO closure_table (name, version) VALUES ($1, 0) \
                     ON CONFLICT (name) DO UPDATE SET version = 0",
                ] {
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(name)
                        .execute(&mut *t)
                        .await
                        .map_err(db_err)?;
                }
                t.commit().await.map_err(db_err)?;
            });
            return Ok(concept_map(name, 0, &[]));
        }
        let select_version = if postgres {
            "SELECT version FROM closure_table WHERE name = $1 FOR UPDATE"
        } else {
            "SELECT version FROM closure_table WHERE name = $1"
        };
        let not_initialised = || {
            FhirError::not_found(format!(
                "closure table '{name}' is not initialised: call $closure with only the name first"
            ))
        };
        // the concepts already in the table (read before the terminology work, which runs
        // outside the transaction; this node's lock keeps the table unchanged meanwhile)
        let (version, existing): (i64, Vec<(String, String)>) = with_pool!(&pool, |p| {
            let row = sqlx::query(AssertSqlSafe(select_version.replace(" FOR UPDATE", "")))
                .bind(name)
                .fetch_optional(p)
                .await
                .map_err(db_err)?;
            let Some(row) = row else {
                return Err(not_initialised());
            };
            let version: i64 = row.try_get(0).map_err(db_err)?;
            let rows = sqlx::query("SELECT system, code FROM closure_concept WHERE name = $1")
                .bind(name)
                .fetch_all(p)
                .await
                .map_err(db_err)?;
            let mut existing = Vec::with_capacity(rows.len());
            for r in rows {
                existing.push((
                    r.try_get::<String, _>(0).map_err(db_err)?,
                    r.try_get::<String, _>(1).map_err(db_err)?,
                ));
            }
            (version, existing)
        });
        let have: HashSet<&(String, String)> = existing.iter().collect();
        let mut new: Vec<(String, String)> = Vec::new();
        for c in &req.concepts {
            if !have.contains(c) && !new.contains(c) {
                new.push(c.clone());
            }
        }
        let found = self.relations(state, &existing, &new).await?;
        let mut version_now = version;
        let mut added: Vec<Entry> = Vec::new();
        if !new.is_empty() {
            if !found.is_empty() {
                version_now += 1;
            }
            added = found
                .into_iter()
                .map(|(system, source, target, equivalence)| Entry {
                    version: version_now,
                    system,
                    source,
                    target,
                    equivalence,
                })
                .collect();
            with_pool!(&pool, |p| {
                let mut t = p.begin().await.map_err(db_err)?;
                let row = sqlx::query(AssertSqlSafe(select_version))
                    .bind(name)
                    .fetch_optional(&mut *t)
                    .await
                    .map_err(db_err)?;
                let current: Option<i64> = match row {
                    Some(r) => Some(r.try_get(0).map_err(db_err)?),
                    None => None,
                };
                if current != Some(version) {
                    // re-initialised or changed by another node meanwhile
                    return Err(FhirError::conflict(format!(
                        "closure table '{name}' changed during the call; repeat it"
                    )));
                }
                for (system, code) in &new {
                    sqlx::query(
                        "INSERT INTO closure_concept (name, system, code) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(name)
                    .bind(system)
                    .bind(code)
                    .execute(&mut *t)
                    .await
                    .map_err(db_err)?;
                }
                for e in &added {
                    sqlx::query(
                        "INSERT INTO closure_entry (name, version, system, source, target, \
                         equivalence) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(name)
                    .bind(e.version)
                    .bind(&e.system)
                    .bind(&e.source)
                    .bind(&e.target)
                    .bind(&e.equivalence)
                    .execute(&mut *t)
                    .await
                    .map_err(db_err)?;
                }
                sqlx::query("UPDATE closure_table SET version = $2 WHERE name = $1")
                    .bind(name)
                    .bind(version_now)
                    .execute(&mut *t)
                    .await
                    .map_err(db_err)?;
                t.commit().await.map_err(db_err)?;
            });
        }
        let Some(since) = req.since else {
            return Ok(concept_map(name, version_now, &added));
        };
        // resynchronisation: every entry after `since`
        let replay: Vec<Entry> = with_pool!(&pool, |p| {
            let rows = sqlx::query(
                "SELECT version, system, source, target, equivalence FROM closure_entry \
                 WHERE name = $1 AND version > $2 ORDER BY version, system, source, target",
            )
            .bind(name)
            .bind(since)
            .fetch_all(p)
            .await
            .map_err(db_err)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(Entry {
                    version: r.try_get(0).map_err(db_err)?,
                    system: r.try_get(1).map_err(db_err)?,
                    source: r.try_get(2).map_err(db_err)?,
                    target: r.try_get(3).map_err(db_err)?,
                    equivalence: r.try_get(4).map_err(db_err)?,
                });
            }
            out
        });
        Ok(concept_map(name, version_now, &replay))
    }
}

impl Operation for Closure {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        _target: Target,
        params: Value,
        _ctx: &'a RequestContext,
        _access: &'a crate::auth::Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return Err(FhirError::bad_request(
                    "$closure takes a Parameters resource",
                ));
            }
            let req = parse(&params)?;
            let cm = self.call(state, req).await?;
            Ok(FhirResponse::ok(Body::Resource(cm)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let r = parse(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "name", "valueString": "problems"},
            {"name": "concept", "valueCoding": {"system": "http://x", "code": "A"}},
            {"name": "concept", "valueString": "http://x|B"},
            {"name": "version", "valueString": "3"}]}))
        .unwrap();
        assert_eq!(r.name, "problems");
        assert_eq!(
            r.concepts,
            vec![
                ("http://x".into(), "A".into()),
                ("http://x".into(), "B".into())
            ]
        );
        assert_eq!(r.since, Some(3));
        let e = parse(&json!({"resourceType": "Parameters", "parameter": []}))
            .err()
            .unwrap();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        let e = parse(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "name", "valueString": "p"}, {"name": "version", "valueString": "x"}]}))
        .err()
        .unwrap();
        assert!(e.issues[0].diagnostics.contains("'x'"));
        let e = parse(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "name", "valueString": "p"},
            {"name": "concept", "valueCoding": {"code": "A"}}]}))
        .err()
        .unwrap();
        assert!(e.issues[0].diagnostics.contains("system and a code"));
    }

    #[test]
    fn concept_map_groups_by_system_and_source() {
        let e = |s: &str, src: &str, t: &str, eq: &str| Entry {
            version: 1,
            system: s.into(),
            source: src.into(),
            target: t.into(),
            equivalence: eq.into(),
        };
        let cm = concept_map(
            "t",
            2,
            &[
                e("http://a", "X", "Y", "subsumes"),
                e("http://a", "X", "Z", "specializes"),
                e("http://b", "P", "Q", "subsumes"),
            ],
        );
        assert_eq!(cm["version"], "2");
        assert_eq!(cm["resourceType"], "ConceptMap");
        let g = cm["group"].as_array().unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0]["source"], "http://a");
        assert_eq!(g[0]["element"][0]["code"], "X");
        assert_eq!(g[0]["element"][0]["target"].as_array().unwrap().len(), 2);
        assert!(concept_map("t", 0, &[]).get("group").is_none());
    }
}
