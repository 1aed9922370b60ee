//! The canonical terminology resources stored at first start: every CodeSystem, ValueSet and
//! ConceptMap of the R4 spec and of `hl7.terminology.r4` that Kiln vendors
//! (`terminology/data/r4-terminology.json.gz`) becomes an ordinary, versioned, indexed resource,
//! so `GET [base]/CodeSystem?url=…`, `GET [base]/ValueSet/[id]` and every other search find them.
//! (No NamingSystem is vendored.)
//!
//! Rules:
//! - **Once per bundle.** `kiln_canonical_loads` records the fingerprint of the bundle loaded; a
//!   start with the same bundle costs one query. A newer Kiln with another bundle upgrades the
//!   stored copies. All of a load runs in one write transaction (resources, history, index rows
//!   and the records below commit together), under a PostgreSQL advisory lock, so several
//!   nodes starting at once load it once: the others wait and then find it done.
//! - **Ids** are the resources' own. Where an R4 resource and a THO resource share an id
//!   (213 pairs, e.g. `ValueSet/action-type` is `http://hl7.org/fhir/ValueSet/action-type` in R4
//!   and `http://terminology.hl7.org/ValueSet/action-type` in THO), the R4 one keeps it and the
//!   THO one is stored as `tho-[id]`.
//! - **User content is never clobbered.** `kiln_canonical_resources` records the version Kiln
//!   wrote of each resource. A resource whose current version is not that one (created by a
//!   client before the first load, or updated/deleted by a client since) is left as it is, on
//!   the first load and on every upgrade; so is a vendored resource whose `url` a client's
//!   resource already uses (the client's wins). Upgrades replace (or delete, when the new
//!   bundle drops them) only the copies Kiln wrote and nobody changed since.
//! - **No duplicates in terminology operations.** The terminology service already holds the
//!   vendored content; an unchanged stored copy ([`PRISTINE_FILTER`]) is not supplied to it
//!   again as a `tx-resource`, while a client's modified copy is (and wins).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::OnceLock;

use kiln_store::{Dialect, SqlValue, WriteTx};
use serde_json::Value;

use crate::state::AppState;

/// The name of the vendored bundle in `kiln_canonical_loads`.
pub const BUNDLE_NAME: &str = "r4-terminology";

/// Tables of this module (idempotent DDL, applied with the search schema at every start).
pub fn schema(_d: Dialect) -> Vec<String> {
    vec![
        "CREATE TABLE IF NOT EXISTS kiln_canonical_loads (
            name TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            resources BIGINT NOT NULL,
            loaded_at BIGINT NOT NULL
        )"
        .to_string(),
        "CREATE TABLE IF NOT EXISTS kiln_canonical_resources (
            res_type TEXT NOT NULL,
            res_id TEXT NOT NULL,
            version BIGINT NOT NULL,
            fingerprint TEXT NOT NULL,
            PRIMARY KEY (res_type, res_id)
        )"
        .to_string(),
    ]
}

/// SQL condition (on `resources r`, fingerprint bound as `$N` by the caller through
/// [`pristine_filter`]) true for a stored resource that is the unchanged copy Kiln wrote of
/// this build's vendored bundle, i.e. content the terminology service already has.
pub const PRISTINE_FILTER: &str = "EXISTS (SELECT 1 FROM kiln_canonical_resources c WHERE c.res_type = r.res_type AND c.res_id = r.res_id AND c.version = r.version AND c.fingerprint = ${n})";

/// [`PRISTINE_FILTER`] with its parameter number.
pub fn pristine_filter(n: usize) -> String {
    PRISTINE_FILTER.replace("${n}", &format!("${n}"))
}

/// The fingerprint of the vendored bundle compiled into this build: FNV-1a (64 bit) of its
/// gzip'd bytes plus their length.
pub fn fingerprint() -> &'static str {
    static FP: OnceLock<String> = OnceLock::new();
    FP.get_or_init(|| {
        let bytes = kiln_terminology::service::R4_BUNDLE_GZ;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("fnv1a64:{h:016x}:{}", bytes.len())
    })
}

/// Whether a row of `kiln_canonical_resources` records `ty/id` at `version` as written by Kiln
/// from this build's bundle (parameters: [`pristine_params`]).
const PRISTINE_SQL: &str = "SELECT 1 FROM kiln_canonical_resources WHERE res_type = $1 AND res_id = $2 AND version = $3 AND fingerprint = $4";

fn pristine_params(ty: &str, id: &str, version: i64) -> [SqlValue; 4] {
    [
        SqlValue::Text(ty.to_string()),
        SqlValue::Text(id.to_string()),
        SqlValue::Int(version),
        SqlValue::Text(fingerprint().to_string()),
    ]
}

/// Whether `ty/id` at `version` is the unchanged copy of this build's vendored content.
pub async fn is_pristine(
    store: &kiln_store::Store,
    ty: &str,
    id: &str,
    version: i64,
) -> kiln_store::Result<bool> {
    let rows = store
        .query_rows(PRISTINE_SQL, &pristine_params(ty, id, version))
        .await?;
    Ok(!rows.is_empty())
}

/// [`is_pristine`] inside a write transaction.
pub async fn tx_is_pristine(
    tx: &mut WriteTx,
    ty: &str,
    id: &str,
    version: i64,
) -> kiln_store::Result<bool> {
    let rows = tx
        .query_rows(PRISTINE_SQL, &pristine_params(ty, id, version))
        .await?;
    Ok(!rows.is_empty())
}

/// One vendored resource with the id it is stored under.
#[derive(Debug, Clone)]
pub struct CanonicalResource {
    pub resource_type: String,
    pub id: String,
    pub url: String,
    pub resource: Value,
}

/// The vendored CodeSystems/ValueSets/ConceptMaps with their ids (see the module's id rule).
pub fn vendored_resources() -> anyhow::Result<Vec<CanonicalResource>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(kiln_terminology::service::R4_BUNDLE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("cannot decompress the vendored terminology: {e}"))?;
    let mut bundle: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the vendored terminology is not JSON: {e}"))?;
    let entries = match bundle.get_mut("entry").map(Value::take) {
        Some(Value::Array(a)) => a,
        _ => anyhow::bail!("the vendored terminology bundle has no entries"),
    };
    let mut out: Vec<CanonicalResource> = Vec::with_capacity(entries.len());
    for mut e in entries {
        let Some(r) = e.get_mut("resource").map(Value::take) else {
            continue;
        };
        let s = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(ty), Some(id), Some(url)) = (s("resourceType"), s("id"), s("url")) else {
            anyhow::bail!("a vendored terminology resource lacks resourceType, id or url");
        };
        if !matches!(
            ty.as_str(),
            "CodeSystem" | "ValueSet" | "ConceptMap" | "NamingSystem"
        ) {
            continue;
        }
        out.push(CanonicalResource {
            resource_type: ty,
            id,
            url,
            resource: r,
        });
    }
    // R4 keeps a shared id, THO's copy becomes `tho-[id]`
    let is_tho = |c: &CanonicalResource| c.url.starts_with("http://terminology.hl7.org/");
    let mut owners: HashMap<(String, String), bool> = HashMap::new();
    for c in &out {
        let e = owners
            .entry((c.resource_type.clone(), c.id.clone()))
            .or_insert(true);
        *e = *e && is_tho(c);
    }
    let mut taken: HashSet<(String, String)> = HashSet::new();
    for c in out.iter_mut() {
        let key = (c.resource_type.clone(), c.id.clone());
        let only_tho = owners.get(&key).copied().unwrap_or(true);
        if is_tho(c) && !only_tho {
            c.id = format!("tho-{}", c.id);
            c.resource["id"] = Value::String(c.id.clone());
        }
        if !taken.insert((c.resource_type.clone(), c.id.clone())) {
            anyhow::bail!(
                "two vendored terminology resources share the id {}/{}",
                c.resource_type,
                c.id
            );
        }
        if c.id.len() > 64 {
            anyhow::bail!("vendored id {} is longer than 64 characters", c.id);
        }
    }
    Ok(out)
}

/// What a start did with the vendored resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// The bundle was already loaded: nothing done.
    pub already_loaded: bool,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    /// Stored copies identical to the new bundle's (an upgrade).
    pub unchanged: usize,
    /// Vendored resources left out because a client's resource has their id or url.
    pub kept_client_versions: usize,
}

/// Stores the vendored resources unless this bundle is already loaded (see the module docs).
pub async fn ensure_loaded(state: &AppState) -> anyhow::Result<LoadSummary> {
    let fp = fingerprint();
    let t0 = std::time::Instant::now();
    if loaded_fingerprint(&state.store).await?.as_deref() == Some(fp) {
        return Ok(LoadSummary {
            already_loaded: true,
            ..Default::default()
        });
    }
    let vendored = tokio::task::spawn_blocking(vendored_resources)
        .await
        .map_err(|e| anyhow::anyhow!("vendored terminology reader failed: {e}"))??;
    let mut tx = state.store.begin().await?;
    // several nodes on one PostgreSQL database: one loads, the others wait and find it done
    tx.lock("kiln-canonical-terminology").await?;
    let previous = tx_loaded_fingerprint(&mut tx).await?;
    if previous.as_deref() == Some(fp) {
        tx.rollback().await?;
        return Ok(LoadSummary {
            already_loaded: true,
            ..Default::default()
        });
    }
    tracing::info!(
        resources = vendored.len(),
        upgrade = previous.is_some(),
        "storing the canonical terminology resources"
    );
    let summary = load(&mut tx, vendored, previous.is_some()).await?;
    tx.commit().await?;
    crate::search::refresh_statistics(state).await;
    tracing::info!(
        created = summary.created,
        updated = summary.updated,
        deleted = summary.deleted,
        unchanged = summary.unchanged,
        kept_client_versions = summary.kept_client_versions,
        secs = t0.elapsed().as_secs_f64(),
        "canonical terminology resources stored"
    );
    Ok(summary)
}

async fn loaded_fingerprint(store: &kiln_store::Store) -> anyhow::Result<Option<String>> {
    let rows = store
        .query_rows(
            "SELECT fingerprint FROM kiln_canonical_loads WHERE name = $1",
            &[SqlValue::Text(BUNDLE_NAME.into())],
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(SqlValue::as_str)
        .map(str::to_string))
}

async fn tx_loaded_fingerprint(tx: &mut WriteTx) -> anyhow::Result<Option<String>> {
    let rows = tx
        .query_rows(
            "SELECT fingerprint FROM kiln_canonical_loads WHERE name = $1",
            &[SqlValue::Text(BUNDLE_NAME.into())],
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(SqlValue::as_str)
        .map(str::to_string))
}

/// The stored resource without `meta` (what a vendored resource is compared with).
fn without_meta(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
    }
    v
}

const TYPES_IN: &str = "('CodeSystem', 'ValueSet', 'ConceptMap', 'NamingSystem')";

async fn load(
    tx: &mut WriteTx,
    vendored: Vec<CanonicalResource>,
    upgrade: bool,
) -> anyhow::Result<LoadSummary> {
    let fp = fingerprint();
    let text = |v: &SqlValue| v.as_str().unwrap_or_default().to_string();
    // what is stored now: (type, id) → (version, deleted)
    let mut current: HashMap<(String, String), kiln_store::Current> = HashMap::new();
    for r in tx
        .query_rows(
            &format!(
                "SELECT res_type, res_id, rid, version, deleted, last_updated FROM resources WHERE res_type IN {TYPES_IN}"
            ),
            &[],
        )
        .await?
    {
        current.insert(
            (text(&r[0]), text(&r[1])),
            kiln_store::Current {
                rid: r[2].as_i64().unwrap_or_default(),
                version: r[3].as_i64().unwrap_or_default(),
                deleted: r[4].as_i64().unwrap_or_default() != 0,
                last_updated: r[5].as_i64().unwrap_or_default(),
            },
        );
    }
    // the versions Kiln wrote
    let mut ours: HashMap<(String, String), i64> = HashMap::new();
    for r in tx
        .query_rows(
            "SELECT res_type, res_id, version FROM kiln_canonical_resources",
            &[],
        )
        .await?
    {
        ours.insert(
            (text(&r[0]), text(&r[1])),
            r[2].as_i64().unwrap_or_default(),
        );
    }
    let pristine = |key: &(String, String), cur: &kiln_store::Current| {
        !cur.deleted && ours.get(key) == Some(&cur.version)
    };
    // canonical URLs clients' resources use (theirs win over a vendored copy)
    let mut client_urls: HashSet<(String, String)> = HashSet::new();
    for r in tx
        .query_rows(
            &format!(
                "SELECT r.res_type, r.res_id, u.value FROM search_uri u JOIN resources r ON r.rid = u.rid \
                 WHERE u.param = 'url' AND r.deleted = 0 AND r.res_type IN {TYPES_IN}"
            ),
            &[],
        )
        .await?
    {
        let key = (text(&r[0]), text(&r[1]));
        let cur = current.get(&key);
        if !cur.is_some_and(|c| pristine(&key, c)) {
            client_urls.insert((key.0, text(&r[2])));
        }
    }

    // an upgrade compares every unchanged copy with the new bundle: their contents in one query
    let mut stored_content: HashMap<(String, String), String> = HashMap::new();
    if upgrade {
        for r in tx
            .query_rows(
                &format!(
                    "SELECT res_type, res_id, content FROM resources WHERE deleted = 0 AND res_type IN {TYPES_IN}"
                ),
                &[],
            )
            .await?
        {
            let key = (text(&r[0]), text(&r[1]));
            if current.get(&key).is_some_and(|c| pristine(&key, c)) {
                stored_content.insert(key, text(&r[2]));
            }
        }
    }

    let mut summary = LoadSummary::default();
    // (type, id, version) records to write
    let mut records: Vec<(String, String, i64)> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    // new resources, written together (multi-row INSERTs) after the loop
    let mut creates: Vec<(String, String, Value)> = Vec::new();
    for c in vendored {
        let key = (c.resource_type.clone(), c.id.clone());
        seen.insert(key.clone());
        match current.get(&key) {
            None => {
                if client_urls.contains(&(c.resource_type.clone(), c.url.clone())) {
                    summary.kept_client_versions += 1;
                    continue;
                }
                creates.push((key.0, key.1, c.resource));
            }
            Some(cur) if pristine(&key, cur) => {
                if !upgrade {
                    records.push((key.0, key.1, cur.version));
                    continue;
                }
                let same = stored_content.get(&key).is_some_and(|s| {
                    serde_json::from_str::<Value>(s)
                        .map(without_meta)
                        .is_ok_and(|v| v == c.resource)
                });
                if same {
                    records.push((key.0, key.1, cur.version));
                    summary.unchanged += 1;
                } else {
                    let stored = tx
                        .put(&c.resource_type, &c.id, c.resource, Some(cur), "PUT")
                        .await?;
                    records.push((key.0, key.1, stored.version));
                    summary.updated += 1;
                }
            }
            Some(_) => {
                tracing::debug!(
                    resource = %format!("{}/{}", c.resource_type, c.id),
                    "a client's version is stored: the vendored copy is not"
                );
                summary.kept_client_versions += 1;
            }
        }
    }
    drop(stored_content);
    for stored in tx.create_many(creates, "POST").await? {
        records.push((stored.resource_type, stored.id, stored.version));
        summary.created += 1;
    }
    // copies of resources the new bundle no longer has: deleted if nobody changed them
    for key in ours.keys() {
        if seen.contains(key) {
            continue;
        }
        if let Some(cur) = current.get(key) {
            if pristine(key, cur) {
                tx.delete(&key.0, &key.1, cur).await?;
                summary.deleted += 1;
            }
        }
    }
    // the records: exactly the copies Kiln wrote and nobody changed
    tx.execute("DELETE FROM kiln_canonical_resources", &[])
        .await?;
    // SQLite: anonymous `?` (numbered placeholders cost sqlx a name lookup per parameter)
    let sqlite = tx.dialect() == kiln_store::Dialect::Sqlite;
    for chunk in records.chunks(2000) {
        let mut sql = String::from(
            "INSERT INTO kiln_canonical_resources (res_type, res_id, version, fingerprint) VALUES ",
        );
        let mut params = Vec::with_capacity(chunk.len() * 4);
        for (i, (ty, id, v)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            if sqlite {
                sql.push_str("(?, ?, ?, ?)");
            } else {
                let b = params.len();
                sql.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
            }
            params.push(SqlValue::Text(ty.clone()));
            params.push(SqlValue::Text(id.clone()));
            params.push(SqlValue::Int(*v));
            params.push(SqlValue::Text(fp.to_string()));
        }
        tx.execute(&sql, &params).await?;
    }
    let n = records.len() as i64;
    tx.execute(
        "DELETE FROM kiln_canonical_loads WHERE name = $1",
        &[SqlValue::Text(BUNDLE_NAME.into())],
    )
    .await?;
    tx.execute(
        "INSERT INTO kiln_canonical_loads (name, fingerprint, resources, loaded_at) VALUES ($1, $2, $3, $4)",
        &[
            SqlValue::Text(BUNDLE_NAME.into()),
            SqlValue::Text(fp.to_string()),
            SqlValue::Int(n),
            SqlValue::Int(kiln_store::now_micros()),
        ],
    )
    .await?;
    Ok(summary)
}
