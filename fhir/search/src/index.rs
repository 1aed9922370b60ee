//! Index extraction (resource → typed index rows), the index table schema, and the
//! INSERT/DELETE statements the store runs on every write.

use serde_json::Value;

use crate::path::Node;
use crate::registry::{BoundParam, ParamType, Registry};
use crate::value::{
    canonical_quantity, normalize_string, parse_date_range, parse_reference, MAX_TIME, MIN_TIME,
};
use crate::{Dialect, SqlValue};

/// `search_string`: string parameters (and `_text`).
#[derive(Debug, Clone, PartialEq)]
pub struct StringRow {
    pub param: String,
    pub grp: i64,
    /// lowercase + accent-folded
    pub norm: String,
    pub exact: String,
}

/// `search_token`: token parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub param: String,
    pub grp: i64,
    pub system: Option<String>,
    pub code: Option<String>,
    /// normalised display / text (for `:text`)
    pub text: Option<String>,
}

/// `search_reference`: reference parameters (and canonical references).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReferenceRow {
    pub param: String,
    pub grp: i64,
    pub ref_type: Option<String>,
    pub ref_id: Option<String>,
    pub ref_version: Option<String>,
    /// absolute / canonical URL (without `|version`)
    pub ref_url: Option<String>,
    pub ident_system: Option<String>,
    pub ident_value: Option<String>,
}

/// `search_date`: inclusive µs range.
#[derive(Debug, Clone, PartialEq)]
pub struct DateRow {
    pub param: String,
    pub grp: i64,
    pub low: i64,
    pub high: i64,
}

/// `search_number`.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberRow {
    pub param: String,
    pub grp: i64,
    pub value: f64,
}

/// `search_quantity`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantityRow {
    pub param: String,
    pub grp: i64,
    pub value: f64,
    pub system: Option<String>,
    pub code: Option<String>,
    pub canon_value: Option<f64>,
    pub canon_code: Option<String>,
}

/// `search_uri`.
#[derive(Debug, Clone, PartialEq)]
pub struct UriRow {
    pub param: String,
    pub grp: i64,
    pub value: String,
}

/// Every index row of one resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexEntries {
    pub strings: Vec<StringRow>,
    pub tokens: Vec<TokenRow>,
    pub references: Vec<ReferenceRow>,
    pub dates: Vec<DateRow>,
    pub numbers: Vec<NumberRow>,
    pub quantities: Vec<QuantityRow>,
    pub uris: Vec<UriRow>,
    /// The resource's type when it is not a contained resource (`None` for a contained one):
    /// written to `search_token.res_type` and `search_reference.res_type`, so a token or a
    /// reference of one type is one range of `search_token_type` / `search_reference_type` in
    /// rid order (contained rows never match a normal search).
    pub res_type: Option<String>,
}

/// Names of the index tables.
pub const TABLES: [&str; 7] = [
    "search_string",
    "search_token",
    "search_reference",
    "search_date",
    "search_number",
    "search_quantity",
    "search_uri",
];

/// The per-resource index of an index table: (rid, param), and for the small tables whose
/// values are compared or sorted per candidate also those values, so a probe (`EXISTS … WHERE
/// rid = r.rid AND param = … AND value > …`) or a sort key (`MIN(low)`) reads no table row
/// (measured on 100 Synthea patients: `Observation?code=X&value-quantity=gtN` 0.24 → 0.14 ms,
/// `Observation?date=geX&_sort=-date` 0.31 → 0.22 ms in SQL). `search_token` covers its
/// code and display text; `search_reference` keeps (rid, param): its probes go through
/// `search_reference_type`.
fn rid_index_columns(table: &str) -> (String, &'static str) {
    let covering = match table {
        "search_date" => Some(("range", "rid, param, low, high")),
        "search_quantity" => Some((
            "values",
            "rid, param, value, code, system, canon_code, canon_value",
        )),
        "search_string" => Some(("value", "rid, param, value_norm")),
        // `:text` probes (the display text) and sort keys (the code) without table rows
        // (`Condition?code:text=X`: ~270 candidates probed for a page of 50)
        "search_token" => Some(("text", "rid, param, code, text_norm")),
        "search_number" => Some(("value", "rid, param, value")),
        _ => None,
    };
    match covering {
        Some((suffix, cols)) => (format!("{table}_rid_{suffix}"), cols),
        None => (format!("{table}_rid"), "rid, param"),
    }
}

/// The name of `table`'s per-resource index (`INDEXED BY` in plans).
pub fn rid_index(table: &str) -> String {
    rid_index_columns(table).0
}

/// Parameters answered from the `resources` table, never indexed.
pub(crate) fn is_resource_column_param(code: &str) -> bool {
    matches!(code, "_id" | "_lastUpdated")
}

/// The index table name used for a parameter type.
pub fn table_for(t: ParamType) -> Option<&'static str> {
    Some(match t {
        ParamType::String => "search_string",
        ParamType::Token => "search_token",
        ParamType::Reference => "search_reference",
        ParamType::Date => "search_date",
        ParamType::Number => "search_number",
        ParamType::Quantity => "search_quantity",
        ParamType::Uri => "search_uri",
        ParamType::Composite | ParamType::Special => return None,
    })
}

/// Component `i` of composite `code` is indexed under this param name.
pub fn component_param(code: &str, i: usize) -> String {
    format!("{code}${i}")
}

/// CREATE TABLE / CREATE INDEX statements for the index tables (idempotent).
pub fn schema(dialect: Dialect) -> Vec<String> {
    let (rid, text, real) = match dialect {
        Dialect::Sqlite => (
            "rid INTEGER NOT NULL REFERENCES resources(rid) ON DELETE CASCADE",
            "TEXT",
            "REAL",
        ),
        Dialect::Postgres => (
            "rid BIGINT NOT NULL REFERENCES resources(rid) ON DELETE CASCADE",
            "TEXT COLLATE \"C\"",
            "DOUBLE PRECISION",
        ),
    };
    let common = format!("{rid}, param {text} NOT NULL, grp INTEGER NOT NULL DEFAULT 0");
    let mut v = vec![
        format!("CREATE TABLE IF NOT EXISTS search_string ({common}, value_norm {text} NOT NULL, value_exact {text} NOT NULL)"),
        // res_type: the resource's type, NULL for the rows of contained resources (added to
        // existing databases by kiln-store's migration 4, which also fills it)
        format!("CREATE TABLE IF NOT EXISTS search_token ({common}, system {text}, code {text}, text_norm {text}, res_type {text})"),
        // res_type as in search_token (migration 5 adds and fills it in older databases)
        format!("CREATE TABLE IF NOT EXISTS search_reference ({common}, ref_type {text}, ref_id {text}, ref_version {text}, ref_url {text}, ident_system {text}, ident_value {text}, res_type {text})"),
        format!("CREATE TABLE IF NOT EXISTS search_date ({common}, low BIGINT NOT NULL, high BIGINT NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS search_number ({common}, value {real} NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS search_quantity ({common}, value {real} NOT NULL, system {text}, code {text}, canon_value {real}, canon_code {text})"),
        format!("CREATE TABLE IF NOT EXISTS search_uri ({common}, value {text} NOT NULL)"),
    ];
    // Each secondary index costs ingest time (raw SQLite, 3.4k Synthea resources: ~2x faster
    // without the (param, value_exact), (param, system), (param, ref_url), (param, ident_value)
    // and (param, high) indexes, which only served rare searches; those scan by `param`).
    let idx = [
        (
            "search_string_value",
            "search_string(param, value_norm, rid)",
        ),
        // (param, code) ranges for searches (system checked in the index); with res_type
        // the rows of one type come in rid order, so `Type?token=X&_summary=count` is one
        // covering range counted without a sort (`token_count`). Replaces the former
        // search_token_code (param, code, system, rid), dropped below.
        (
            "search_token_type",
            "search_token(param, code, res_type, rid, system)",
        ),
        // references to one target of one type's parameter in rid order, covering: a search
        // by reference drives from this range in page order (`Observation?patient=X`), and it
        // is a single probe per candidate when another criterion drives. Replaces the former
        // search_reference_target (param, ref_type, ref_id, rid), dropped below.
        (
            "search_reference_type",
            "search_reference(param, ref_type, ref_id, res_type, rid)",
        ),
        // the references to a resource (`_revinclude`, `_has`, `$everything`), covering the
        // referencing resource's type and rid. Replaces search_reference_rev (ref_id,
        // ref_type, param), whose matches each needed a table row for `rid`.
        (
            "search_reference_back",
            "search_reference(ref_id, ref_type, param, res_type, rid)",
        ),
        ("search_date_low", "search_date(param, low, high, rid)"),
        // `_sort=-date` walks this in key order (greatest `high` first, ties by rid) instead of
        // computing the key of every candidate (plan::walk_segments)
        ("search_date_high", "search_date(param, high DESC, rid)"),
        ("search_number_value", "search_number(param, value)"),
        (
            "search_quantity_value",
            "search_quantity(param, code, value)",
        ),
        (
            "search_quantity_canon",
            "search_quantity(param, canon_code, canon_value)",
        ),
        ("search_uri_value", "search_uri(param, value)"),
        ("resources_search_type", "resources(res_type, deleted, rid)"),
    ];
    for (name, on) in idx {
        v.push(format!("CREATE INDEX IF NOT EXISTS {name} ON {on}"));
    }
    for replaced in [
        "search_token_code",
        "search_reference_target",
        "search_reference_rev",
        // the store's `resources_type_updated` has the same columns (res_type, last_updated):
        // one more index written with every version and weighed by every plan
        "resources_search_updated",
    ] {
        v.push(format!("DROP INDEX IF EXISTS {replaced}"));
    }
    for t in TABLES {
        // (rid, param): per-resource lookups (sort keys, deletes, includes, probes)
        let (name, columns) = rid_index_columns(t);
        v.push(format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {t}({columns})"
        ));
        if name != format!("{t}_rid") {
            // an earlier release's (rid, param) index, replaced by the covering one
            v.push(format!("DROP INDEX IF EXISTS {t}_rid"));
        }
    }
    if dialect == Dialect::Postgres {
        v.push(postgres_analyze_stale());
    }
    v
}

/// The statement refreshing missing or stale planner statistics of the search tables
/// (PostgreSQL; SQLite has none to refresh). Cheap when nothing is stale (one catalog query).
pub fn analyze_stale_statement(dialect: Dialect) -> Option<String> {
    (dialect == Dialect::Postgres).then(postgres_analyze_stale)
}

/// PostgreSQL: the tables searched (`resources` and the index tables) whose planner statistics
/// or visibility map are stale: more rows changed since the last `ANALYZE`, or inserted since
/// the last `VACUUM`, than 10% of the table (as autovacuum would decide). `VACUUM (ANALYZE)` of
/// each (see the server's `refresh_statistics`, after large Bundles) refreshes both: without a
/// visibility map an index-only scan still visits every heap row, so a count right after a bulk
/// load read the heap (`Observation?status=final&_summary=count` 0.04–0.18 M rows/s). A
/// newly loaded table's pages only become all-visible through a VACUUM. `None` on SQLite.
pub fn stale_tables_statement(dialect: Dialect) -> Option<String> {
    (dialect == Dialect::Postgres).then(|| {
        format!(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() \
             AND relname IN ({}) AND (n_mod_since_analyze > 50 + 0.1 * n_live_tup \
             OR n_ins_since_vacuum > 50 + 0.1 * n_live_tup) ORDER BY relname",
            searched_tables().join(", ")
        )
    })
}

/// `'resources', 'search_string', …` quoted for an `IN` list.
fn searched_tables() -> Vec<String> {
    std::iter::once("resources")
        .chain(TABLES.iter().copied())
        .map(|t| format!("'{t}'"))
        .collect()
}

/// PostgreSQL: `ANALYZE` the tables searched whose statistics are missing or stale (more rows
/// changed since the last analyze than 10% of the table, as autovacuum would), run at each start.
/// Without statistics (bulk load, autovacuum off or not yet run) the planner takes the index
/// tables as a few rows and picks nested loops over whole parameters (measured on 39k Synthea
/// resources: `Observation?code=X&_summary=count` 372 ms → 8 ms, `_has` 826 ms → 23 ms); the
/// analyze itself took 1.3 s there and is skipped when nothing changed. Also run after large
/// Bundles (see `analyze_stale_statement`): right after a bulk load into a new database the
/// tables have no statistics until autovacuum gets to them (up to a minute), and chained
/// searches over 210 resources took 300–1,000 ms instead of a few.
fn postgres_analyze_stale() -> String {
    let tables = searched_tables();
    format!(
        "DO $kiln$ DECLARE t record; BEGIN \
         FOR t IN SELECT relname FROM pg_stat_user_tables \
         WHERE schemaname = current_schema() AND relname IN ({}) \
         AND n_mod_since_analyze > 50 + 0.1 * n_live_tup LOOP \
         EXECUTE format('ANALYZE %I', t.relname); END LOOP; END $kiln$",
        tables.join(", ")
    )
}

/// Statements deleting every index row of a resource; `$1` = rid.
pub fn delete_statements(_dialect: Dialect) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| format!("DELETE FROM {t} WHERE rid = $1"))
        .collect()
}

fn opt(s: &Option<String>) -> SqlValue {
    match s {
        Some(s) => SqlValue::Text(s.clone()),
        None => SqlValue::Null,
    }
}

/// Rows per multi-row INSERT. Binding cost through sqlx grows faster than linearly with the
/// parameter count: on SQLite (3,422 Synthea resources, 57k index rows) 400 rows/statement
/// took 4.4 s, 50–64 rows 1.5–2 s, 16 rows 2.3 s, 1 row 3.1 s.
const ROWS_PER_INSERT: usize = 64;

impl IndexEntries {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.strings.len()
            + self.tokens.len()
            + self.references.len()
            + self.dates.len()
            + self.numbers.len()
            + self.quantities.len()
            + self.uris.len()
    }

    /// Multi-row INSERT statements for this resource's rows (`rid` bound as a parameter).
    pub fn insert_statements(&self, dialect: Dialect, rid: i64) -> Vec<(String, Vec<SqlValue>)> {
        insert_batch(dialect, &[(rid, self)])
    }
}

/// Multi-row INSERT statements for many resources at once (bulk ingest).
/// On PostgreSQL a NULL in the numeric `canon_value` column is written as a literal: a NULL
/// parameter is bound as text, and a prepared statement reused with a float there would break.
/// Longest text (bytes) stored in an indexed column. PostgreSQL's btree rejects index rows above
/// ~2.7 KB; values this long (base64 data URIs, pasted documents) are not searched by their tail.
pub const INDEX_TEXT_MAX: usize = 1024;

/// `s` cut to at most [`INDEX_TEXT_MAX`] bytes on a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= INDEX_TEXT_MAX {
        return s.to_string();
    }
    let mut end = INDEX_TEXT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn bounded_opt(v: &Option<String>) -> SqlValue {
    match v {
        Some(s) => SqlValue::Text(bounded(s)),
        None => SqlValue::Null,
    }
}

pub fn insert_batch(
    dialect: Dialect,
    items: &[(i64, &IndexEntries)],
) -> Vec<(String, Vec<SqlValue>)> {
    let mut out = Vec::new();
    // SQLite: anonymous `?` placeholders. Numbered (`?N`) and named (`$N`) ones make sqlx look up
    // every parameter's name (`sqlite3_bind_parameter_name`, a linear scan), quadratic in the
    // parameters of a multi-row INSERT: it was 11 % of `kiln import`'s CPU with `?N`, and
    // 18.8 ms vs 0.1 ms per 3,200-parameter statement with `$N`. Each value is bound once, in
    // order, so positional `?` binds identically.
    let mark = if dialect == Dialect::Sqlite { '?' } else { '$' };
    let mut emit = |table: &str, cols: &str, rows: Vec<Vec<SqlValue>>| {
        let real_cols: Vec<bool> = cols
            .split(", ")
            .map(|c| dialect == Dialect::Postgres && c == "canon_value")
            .collect();
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql = format!("INSERT INTO {table} ({cols}) VALUES ");
            let mut params = Vec::new();
            for (i, row) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push('(');
                for (j, v) in row.iter().enumerate() {
                    if j > 0 {
                        sql.push(',');
                    }
                    if real_cols.get(j).copied().unwrap_or(false) && *v == SqlValue::Null {
                        sql.push_str("NULL");
                    } else {
                        params.push(v.clone());
                        sql.push(mark);
                        if dialect == Dialect::Postgres {
                            sql.push_str(&params.len().to_string());
                        }
                    }
                }
                sql.push(')');
            }
            out.push((sql, params));
        }
    };
    let rows = |f: &dyn Fn(i64, &IndexEntries) -> Vec<Vec<SqlValue>>| -> Vec<Vec<SqlValue>> {
        items.iter().flat_map(|(rid, e)| f(*rid, e)).collect()
    };
    let r = rows(&|rid, e| {
        e.strings
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    SqlValue::Text(bounded(&x.norm)),
                    SqlValue::Text(x.exact.clone()),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit(
            "search_string",
            "rid, param, grp, value_norm, value_exact",
            r,
        );
    }
    let r = rows(&|rid, e| {
        e.tokens
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    bounded_opt(&x.system),
                    bounded_opt(&x.code),
                    opt(&x.text),
                    opt(&e.res_type),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit(
            "search_token",
            "rid, param, grp, system, code, text_norm, res_type",
            r,
        );
    }
    let r = rows(&|rid, e| {
        e.references
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    opt(&x.ref_type),
                    opt(&x.ref_id),
                    opt(&x.ref_version),
                    opt(&x.ref_url),
                    opt(&x.ident_system),
                    opt(&x.ident_value),
                    opt(&e.res_type),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit(
            "search_reference",
            "rid, param, grp, ref_type, ref_id, ref_version, ref_url, ident_system, ident_value, res_type",
            r,
        );
    }
    let r = rows(&|rid, e| {
        e.dates
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    SqlValue::Int(x.low),
                    SqlValue::Int(x.high),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit("search_date", "rid, param, grp, low, high", r);
    }
    let r = rows(&|rid, e| {
        e.numbers
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    SqlValue::Real(x.value),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit("search_number", "rid, param, grp, value", r);
    }
    let r = rows(&|rid, e| {
        e.quantities
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    SqlValue::Real(x.value),
                    opt(&x.system),
                    bounded_opt(&x.code),
                    x.canon_value.map(SqlValue::Real).unwrap_or(SqlValue::Null),
                    bounded_opt(&x.canon_code),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit(
            "search_quantity",
            "rid, param, grp, value, system, code, canon_value, canon_code",
            r,
        );
    }
    let r = rows(&|rid, e| {
        e.uris
            .iter()
            .map(|x| {
                vec![
                    SqlValue::Int(rid),
                    SqlValue::Text(x.param.clone()),
                    SqlValue::Int(x.grp),
                    SqlValue::Text(bounded(&x.value)),
                ]
            })
            .collect()
    });
    if !r.is_empty() {
        emit("search_uri", "rid, param, grp, value", r);
    }
    out
}

/// The contained resources of `container` that get rows of their own: (position in its
/// `contained` array, resource type, row id `[container type]/[container id]#[local id]`).
/// Entries without a type or id, and every one of a container without an id, are skipped.
pub fn contained_resources(container: &Value) -> Vec<(usize, String, String)> {
    let (Some(ct), Some(cid)) = (
        container.get("resourceType").and_then(Value::as_str),
        container.get("id").and_then(Value::as_str),
    ) else {
        return Vec::new();
    };
    container
        .get("contained")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, c)| {
            let ty = c.get("resourceType").and_then(Value::as_str)?;
            let id = c.get("id").and_then(Value::as_str)?;
            Some((i, ty.to_string(), contained_row_id(ct, cid, id)))
        })
        .collect()
}

/// The row id of a contained resource: `[container type]/[container id]#[local id]`.
pub fn contained_row_id(container_type: &str, container_id: &str, local_id: &str) -> String {
    format!("{container_type}/{container_id}#{local_id}")
}

/// Index rows of the contained resource at `pos` of `container` (its local references
/// resolved within the container).
pub fn index_contained(registry: &Registry, container: &Value, pos: usize) -> IndexEntries {
    match container.get("contained").and_then(|c| c.get(pos)) {
        Some(item) => index_in(registry, item, container),
        None => IndexEntries::default(),
    }
}

/// Extracts every index row of a resource (all parameters of its type). Local references
/// (`#id`) to its contained resources are indexed as references to their rows (type of the
/// contained resource, id `[type]/[id]#[local id]`), so chains are evaluated inside contained
/// resources; `#` alone is the resource itself.
pub fn index_resource(registry: &Registry, resource: &Value) -> IndexEntries {
    let mut out = index_in(registry, resource, resource);
    out.res_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .map(str::to_string);
    out
}

fn index_in(registry: &Registry, resource: &Value, container: &Value) -> IndexEntries {
    let mut out = IndexEntries::default();
    let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else {
        return out;
    };
    index_fields(registry, rt, resource, &mut out);
    resolve_local_references(&mut out, container);
    out
}

/// Local references `#id` (indexed with `ref_url` = `#id`) get the contained resource's type and
/// row id.
fn resolve_local_references(out: &mut IndexEntries, container: &Value) {
    if !out
        .references
        .iter()
        .any(|r| r.ref_url.as_deref().is_some_and(|u| u.starts_with('#')))
    {
        return;
    }
    let (Some(ct), Some(cid)) = (
        container.get("resourceType").and_then(Value::as_str),
        container.get("id").and_then(Value::as_str),
    ) else {
        return;
    };
    for r in &mut out.references {
        let Some(local) = r.ref_url.as_deref().and_then(|u| u.strip_prefix('#')) else {
            continue;
        };
        if local.is_empty() {
            r.ref_type = Some(ct.to_string());
            r.ref_id = Some(cid.to_string());
            continue;
        }
        let target = container
            .get("contained")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(local));
        if let Some(ty) = target
            .and_then(|t| t.get("resourceType"))
            .and_then(Value::as_str)
        {
            r.ref_type = Some(ty.to_string());
            r.ref_id = Some(contained_row_id(ct, cid, local));
        }
    }
}

fn index_fields(registry: &Registry, rt: &str, resource: &Value, out: &mut IndexEntries) {
    for p in registry.params_for(rt) {
        if is_resource_column_param(p.code()) {
            continue;
        }
        index_param(p, resource, out);
    }
    // _text: the narrative, tags stripped (no expression in the official definition)
    if registry.get(Some(rt), "_text").is_some() {
        if let Some(div) = resource.pointer("/text/div").and_then(Value::as_str) {
            let plain = strip_tags(div);
            if !plain.trim().is_empty() {
                out.strings.push(StringRow {
                    param: "_text".into(),
                    grp: 0,
                    norm: normalize_string(&plain),
                    exact: plain.trim().to_string(),
                });
            }
        }
    }
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// Index rows of one parameter (used for indexing and for in-memory matching).
pub fn index_param(p: &BoundParam, resource: &Value, out: &mut IndexEntries) {
    let Some(path) = &p.path else { return };
    let nodes = path.evaluate(resource);
    if p.param_type() == ParamType::Special {
        if p.code() == "near" {
            // Location.position: latitude and longitude as two number rows of one group
            for (k, n) in nodes.iter().enumerate() {
                if let (Some(lat), Some(lon)) = (
                    n.value.get("latitude").and_then(num),
                    n.value.get("longitude").and_then(num),
                ) {
                    for (param, value) in [("near$latitude", lat), ("near$longitude", lon)] {
                        out.numbers.push(NumberRow {
                            param: param.into(),
                            grp: (k + 1) as i64,
                            value,
                        });
                    }
                }
            }
        }
        return;
    }
    if p.param_type() == ParamType::Composite {
        for (k, node) in nodes.iter().enumerate() {
            for (j, comp) in p.def.components.iter().enumerate() {
                let Some(cp) = &comp.path else { continue };
                let name = component_param(p.code(), j);
                for n in cp.evaluate_at(resource, *node) {
                    convert(comp.param_type, &name, (k + 1) as i64, n, out);
                }
            }
        }
        return;
    }
    for n in nodes {
        let before = out.tokens.len();
        convert(p.param_type(), p.code(), 0, n, out);
        if let (Some(map), Value::String(code)) = (&p.implied_systems, n.value) {
            if let Some(system) = map.get(code) {
                for r in &mut out.tokens[before..] {
                    if r.system.is_none() {
                        r.system = Some(system.clone());
                    }
                }
            }
        }
    }
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().or_else(|| n.to_string().parse().ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Converts one evaluated node into index rows of the given parameter type.
pub(crate) fn convert(t: ParamType, param: &str, grp: i64, n: Node<'_>, out: &mut IndexEntries) {
    let v = n.value;
    match t {
        ParamType::String => {
            let mut push = |x: &str| {
                if !x.trim().is_empty() {
                    out.strings.push(StringRow {
                        param: param.to_string(),
                        grp,
                        norm: normalize_string(x),
                        exact: x.to_string(),
                    });
                }
            };
            match v {
                Value::String(x) => push(x),
                Value::Object(o) => {
                    let keys: &[&str] = if o.contains_key("family") || o.contains_key("given") {
                        &["family", "given", "prefix", "suffix", "text"]
                    } else if o.contains_key("city")
                        || o.contains_key("line")
                        || o.contains_key("postalCode")
                    {
                        &[
                            "line",
                            "city",
                            "district",
                            "state",
                            "postalCode",
                            "country",
                            "text",
                        ]
                    } else {
                        &[]
                    };
                    if keys.is_empty() {
                        for (k, x) in o {
                            if !matches!(k.as_str(), "use" | "system" | "url" | "id") {
                                if let Some(x) = x.as_str() {
                                    push(x);
                                }
                            }
                        }
                    } else {
                        for k in keys {
                            match o.get(*k) {
                                Some(Value::String(x)) => push(x),
                                Some(Value::Array(a)) => {
                                    a.iter().filter_map(Value::as_str).for_each(&mut push)
                                }
                                _ => {}
                            }
                        }
                        // a HumanName also matches as "given family"
                        if o.contains_key("family") && !o.contains_key("text") {
                            let mut full: Vec<&str> = o
                                .get("given")
                                .and_then(Value::as_array)
                                .map(|a| a.iter().filter_map(Value::as_str).collect())
                                .unwrap_or_default();
                            if let Some(f) = o.get("family").and_then(Value::as_str) {
                                full.push(f);
                            }
                            if full.len() > 1 {
                                push(&full.join(" "));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        ParamType::Token => match v {
            Value::Bool(b) => out.tokens.push(TokenRow {
                param: param.into(),
                grp,
                system: None,
                code: Some(b.to_string()),
                text: None,
            }),
            Value::String(x) => out.tokens.push(TokenRow {
                param: param.into(),
                grp,
                system: None,
                code: Some(x.clone()),
                text: None,
            }),
            Value::Object(o) => {
                if o.contains_key("coding") || (o.contains_key("text") && !o.contains_key("value"))
                {
                    for c in o
                        .get("coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        out.tokens.push(TokenRow {
                            param: param.into(),
                            grp,
                            system: s(c, "system"),
                            code: s(c, "code"),
                            text: s(c, "display").map(|d| normalize_string(&d)),
                        });
                    }
                    if let Some(t) = o.get("text").and_then(Value::as_str) {
                        out.tokens.push(TokenRow {
                            param: param.into(),
                            grp,
                            system: None,
                            code: None,
                            text: Some(normalize_string(t)),
                        });
                    }
                } else if o.contains_key("value") {
                    // Identifier / ContactPoint
                    let value = match o.get("value") {
                        Some(Value::String(x)) => Some(x.clone()),
                        Some(other) if !other.is_null() => Some(other.to_string()),
                        _ => None,
                    };
                    let type_text = v
                        .pointer("/type/text")
                        .and_then(Value::as_str)
                        .map(normalize_string);
                    out.tokens.push(TokenRow {
                        param: param.into(),
                        grp,
                        system: s(v, "system"),
                        code: value.clone(),
                        text: type_text,
                    });
                    for c in v
                        .pointer("/type/coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        out.tokens.push(TokenRow {
                            param: format!("{param}:of-type"),
                            grp,
                            system: s(c, "system"),
                            code: Some(format!(
                                "{}|{}",
                                c.get("code").and_then(Value::as_str).unwrap_or(""),
                                value.as_deref().unwrap_or("")
                            )),
                            text: None,
                        });
                    }
                } else if o.contains_key("code")
                    || o.contains_key("system")
                    || o.contains_key("display")
                {
                    // Coding
                    out.tokens.push(TokenRow {
                        param: param.into(),
                        grp,
                        system: s(v, "system"),
                        code: s(v, "code"),
                        text: s(v, "display").map(|d| normalize_string(&d)),
                    });
                }
            }
            _ => {}
        },
        ParamType::Reference => match v {
            Value::String(x) => {
                let (url, version) = match x.split_once('|') {
                    Some((u, ver)) => (u.to_string(), Some(ver.to_string())),
                    None => (x.clone(), None),
                };
                let parsed = parse_reference(&url).unwrap_or_default();
                out.references.push(ReferenceRow {
                    param: param.into(),
                    grp,
                    ref_type: parsed.res_type,
                    ref_id: parsed.id,
                    ref_version: version.or(parsed.version),
                    ref_url: Some(url),
                    ..Default::default()
                });
            }
            Value::Object(o) => {
                let mut row = ReferenceRow {
                    param: param.into(),
                    grp,
                    ..Default::default()
                };
                if let Some(r) = o.get("reference").and_then(Value::as_str) {
                    if r.starts_with('#') {
                        // a local reference: resolved by `index_resource` within the container
                        row.ref_url = Some(r.to_string());
                    } else if let Some(p) = parse_reference(r) {
                        row.ref_type = p.res_type;
                        row.ref_id = p.id;
                        row.ref_version = p.version;
                        row.ref_url = p.url;
                    }
                }
                if row.ref_type.is_none() {
                    row.ref_type = s(v, "type");
                }
                if let Some(i) = o.get("identifier") {
                    row.ident_system = s(i, "system");
                    row.ident_value = s(i, "value");
                }
                if row.ref_id.is_some() || row.ref_url.is_some() || row.ident_value.is_some() {
                    out.references.push(row);
                }
            }
            _ => {}
        },
        ParamType::Date => {
            let mut push = |low: i64, high: i64| {
                out.dates.push(DateRow {
                    param: param.into(),
                    grp,
                    low,
                    high,
                })
            };
            match v {
                Value::String(x) => {
                    if let Some(r) = parse_date_range(x) {
                        push(r.low, r.high);
                    }
                }
                Value::Object(o) => {
                    if o.contains_key("start") || o.contains_key("end") {
                        let lo = o
                            .get("start")
                            .and_then(Value::as_str)
                            .and_then(parse_date_range);
                        let hi = o
                            .get("end")
                            .and_then(Value::as_str)
                            .and_then(parse_date_range);
                        if lo.is_some() || hi.is_some() {
                            push(
                                lo.map(|r| r.low).unwrap_or(MIN_TIME),
                                hi.map(|r| r.high).unwrap_or(MAX_TIME),
                            );
                        }
                    } else if o.contains_key("event") || o.contains_key("repeat") {
                        // Timing
                        for e in o
                            .get("event")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let Some(r) = e.as_str().and_then(parse_date_range) {
                                push(r.low, r.high);
                            }
                        }
                        if let Some(b) = v.pointer("/repeat/boundsPeriod") {
                            let lo = b
                                .get("start")
                                .and_then(Value::as_str)
                                .and_then(parse_date_range);
                            let hi = b
                                .get("end")
                                .and_then(Value::as_str)
                                .and_then(parse_date_range);
                            if lo.is_some() || hi.is_some() {
                                push(
                                    lo.map(|r| r.low).unwrap_or(MIN_TIME),
                                    hi.map(|r| r.high).unwrap_or(MAX_TIME),
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        ParamType::Number => {
            if let Some(x) = num(v).or_else(|| v.get("value").and_then(num)) {
                out.numbers.push(NumberRow {
                    param: param.into(),
                    grp,
                    value: x,
                });
            }
        }
        ParamType::Quantity => {
            let mut push_q = |q: &Value| {
                let Some(value) = q.get("value").and_then(num) else {
                    return;
                };
                let system = s(q, "system");
                let code = s(q, "code")
                    .or_else(|| s(q, "currency"))
                    .or_else(|| s(q, "unit"));
                let canon = canonical_quantity(value, system.as_deref(), code.as_deref());
                out.quantities.push(QuantityRow {
                    param: param.into(),
                    grp,
                    value,
                    system,
                    code,
                    canon_value: canon.as_ref().map(|c| c.0),
                    canon_code: canon.map(|c| c.1),
                });
            };
            if v.get("low").is_some() || v.get("high").is_some() {
                // Range: both bounds
                if let Some(l) = v.get("low") {
                    push_q(l);
                }
                if let Some(h) = v.get("high") {
                    push_q(h);
                }
            } else {
                push_q(v);
            }
        }
        ParamType::Uri => {
            if let Value::String(x) = v {
                out.uris.push(UriRow {
                    param: param.into(),
                    grp,
                    value: x.clone(),
                });
            }
        }
        ParamType::Composite | ParamType::Special => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reg() -> Registry {
        Registry::from_bundle(&json!([
            {"resourceType":"SearchParameter","url":"u:name","code":"name","type":"string","base":["Patient"],"expression":"Patient.name"},
            {"resourceType":"SearchParameter","url":"u:id","code":"identifier","type":"token","base":["Patient"],"expression":"Patient.identifier"},
            {"resourceType":"SearchParameter","url":"u:bd","code":"birthdate","type":"date","base":["Patient"],"expression":"Patient.birthDate"},
            {"resourceType":"SearchParameter","url":"u:gp","code":"general-practitioner","type":"reference","base":["Patient"],"expression":"Patient.generalPractitioner"},
            {"resourceType":"SearchParameter","url":"u:code","code":"code","type":"token","base":["Observation"],"expression":"Observation.code"},
            {"resourceType":"SearchParameter","url":"u:vq","code":"value-quantity","type":"quantity","base":["Observation"],"expression":"(Observation.value as Quantity)"},
            {"resourceType":"SearchParameter","url":"u:date","code":"date","type":"date","base":["Observation"],"expression":"Observation.effective"},
            {"resourceType":"SearchParameter","url":"u:cvq","code":"code-value-quantity","type":"composite","base":["Observation"],"expression":"Observation",
              "component":[{"definition":"u:code","expression":"code"},{"definition":"u:vq","expression":"value.as(Quantity)"}]},
            {"resourceType":"SearchParameter","url":"u:text","code":"_text","type":"string","base":["DomainResource"]}
        ]))
    }

    #[test]
    fn patient_rows() {
        let p = json!({"resourceType":"Patient","id":"1","name":[{"family":"Müller","given":["Anna","B"]}],
            "identifier":[{"system":"http://hosp","value":"MRN1","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR"}]}}],
            "birthDate":"1970-05","generalPractitioner":[{"reference":"Practitioner/9"}],
            "text":{"div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">Anna &amp; Co</div>"}});
        let e = index_resource(&reg(), &p);
        let norms: Vec<&str> = e
            .strings
            .iter()
            .filter(|s| s.param == "name")
            .map(|s| s.norm.as_str())
            .collect();
        assert_eq!(norms, vec!["muller", "anna", "b", "anna b muller"]);
        assert!(e
            .strings
            .iter()
            .any(|s| s.param == "_text" && s.norm == "anna & co"));
        assert_eq!(e.tokens[0].code.as_deref(), Some("MRN1"));
        assert_eq!(e.tokens[1].param, "identifier:of-type");
        assert_eq!(e.tokens[1].code.as_deref(), Some("MR|MRN1"));
        assert_eq!(e.dates.len(), 1);
        assert_eq!(e.references[0].ref_type.as_deref(), Some("Practitioner"));
        assert_eq!(e.references[0].ref_id.as_deref(), Some("9"));
    }

    #[test]
    fn code_elements_get_their_implied_system() {
        let r = Registry::r4();
        let p = json!({"resourceType":"Patient","gender":"male",
            "contact":[{"gender":"female"}],"communication":[{"language":{"coding":[{"code":"de"}]}}]});
        let e = index_resource(&r, &p);
        let g: Vec<_> = e.tokens.iter().filter(|t| t.param == "gender").collect();
        assert_eq!(g.len(), 1);
        assert_eq!(
            g[0].system.as_deref(),
            Some("http://hl7.org/fhir/administrative-gender")
        );
        assert_eq!(g[0].code.as_deref(), Some("male"));
        // a code outside the required value set keeps no system
        let p = json!({"resourceType":"Patient","gender":"martian"});
        let e = index_resource(&r, &p);
        assert_eq!(
            e.tokens
                .iter()
                .find(|t| t.param == "gender")
                .unwrap()
                .system,
            None
        );
        // a Coding without system is not given one
        let l = e.tokens.iter().find(|t| t.param == "language");
        assert!(l.is_none_or(|t| t.system.is_none()));
    }

    #[test]
    fn observation_rows_and_sql() {
        let o = json!({"resourceType":"Observation","code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"HR"},
            "valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"},
            "effectivePeriod":{"start":"2020-01-01"}});
        let e = index_resource(&reg(), &o);
        assert_eq!(e.tokens.iter().filter(|t| t.param == "code").count(), 2);
        assert_eq!(e.quantities[0].value, 72.0);
        assert_eq!(e.dates[0].high, MAX_TIME);
        assert!(e
            .tokens
            .iter()
            .any(|t| t.param == "code-value-quantity$0" && t.grp == 1));
        assert!(e
            .quantities
            .iter()
            .any(|q| q.param == "code-value-quantity$1" && q.grp == 1));
        let stmts = e.insert_statements(Dialect::Sqlite, 7);
        assert_eq!(stmts.len(), 3); // token, date, quantity
        let (sql, params) = &stmts[0];
        assert!(sql.starts_with("INSERT INTO search_token (rid, param, grp, system, code, text_norm, res_type) VALUES (?,?,?,?,?,?,?),(?"));
        assert_eq!(params.len(), 7 * 4);
        assert_eq!(params[0], SqlValue::Int(7));
        // the resource's type on every token row (NULL on contained resources' rows)
        assert_eq!(e.res_type.as_deref(), Some("Observation"));
        assert_eq!(params[6], SqlValue::Text("Observation".into()));
        let dr = json!({"resourceType": "DiagnosticReport", "id": "dr",
            "contained": [{"resourceType": "Observation", "id": "o", "code": {"coding": [{"code": "x"}]}}]});
        let c = index_contained(&reg(), &dr, 0);
        assert!(!c.tokens.is_empty() && c.res_type.is_none());
    }

    #[test]
    fn contained_resources_and_local_references() {
        let r = Registry::r4();
        let mr = json!({"resourceType": "MedicationRequest", "id": "mr1",
            "contained": [
                {"resourceType": "Medication", "id": "m1", "code": {"coding": [{"code": "111"}]}},
                {"resourceType": "Patient", "name": [{"family": "NoId"}]},
                {"resourceType": "Practitioner", "id": "pr", "name": [{"family": "Who"}]}
            ],
            "medicationReference": {"reference": "#m1"},
            "requester": {"reference": "#missing"},
            "subject": {"reference": "Patient/p1"}});
        assert_eq!(
            contained_resources(&mr),
            vec![
                (
                    0,
                    "Medication".to_string(),
                    "MedicationRequest/mr1#m1".to_string()
                ),
                (
                    2,
                    "Practitioner".to_string(),
                    "MedicationRequest/mr1#pr".to_string()
                ),
            ]
        );
        let e = index_resource(&r, &mr);
        let med = e
            .references
            .iter()
            .find(|x| x.param == "medication")
            .unwrap();
        assert_eq!(med.ref_type.as_deref(), Some("Medication"));
        assert_eq!(med.ref_id.as_deref(), Some("MedicationRequest/mr1#m1"));
        // an unresolvable local reference keeps only its text (present for :missing)
        let req = e
            .references
            .iter()
            .find(|x| x.param == "requester")
            .unwrap();
        assert_eq!(
            (req.ref_type.as_deref(), req.ref_url.as_deref()),
            (None, Some("#missing"))
        );
        // a contained resource's rows; `#` is its container
        let m = index_contained(&r, &mr, 0);
        assert!(m
            .tokens
            .iter()
            .any(|t| t.param == "code" && t.code.as_deref() == Some("111")));
        let p = json!({"resourceType": "Observation", "id": "o1",
            "contained": [{"resourceType": "Patient", "id": "cp", "managingOrganization": {"reference": "#"}}]});
        let c = index_contained(&r, &p, 0);
        let org = c
            .references
            .iter()
            .find(|x| x.param == "organization")
            .unwrap();
        assert_eq!(
            (org.ref_type.as_deref(), org.ref_id.as_deref()),
            (Some("Observation"), Some("o1"))
        );
        assert!(index_contained(&r, &p, 5).is_empty());
        // no id on the container: nothing to name the rows by
        assert!(contained_resources(&json!({"resourceType": "Observation", "contained": [{"resourceType": "Patient", "id": "x"}]})).is_empty());
    }

    #[test]
    fn long_values_are_bounded_for_btree_indexes() {
        let long = "é".repeat(2000);
        let b = bounded(&long);
        assert!(b.len() <= INDEX_TEXT_MAX);
        assert!(long.starts_with(&b));
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn schema_statements() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let s = schema(d);
            assert!(s.iter().filter(|x| x.starts_with("CREATE TABLE")).count() == 7);
            assert_eq!(delete_statements(d).len(), 7);
        }
        assert!(schema(Dialect::Postgres)[0].contains("COLLATE \"C\""));
        // the duplicate of the store's `resources_type_updated` is dropped, not created
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let s = schema(d);
            assert!(s.contains(&"DROP INDEX IF EXISTS resources_search_updated".to_string()));
            assert!(!s
                .iter()
                .any(|x| x.contains("CREATE INDEX IF NOT EXISTS resources_search_updated")));
        }
        // PostgreSQL refreshes missing/stale planner statistics at start; SQLite does not
        let pg = schema(Dialect::Postgres);
        let analyze = pg.last().unwrap();
        assert!(analyze.starts_with("DO $kiln$") && analyze.contains("ANALYZE %I"));
        assert!(analyze.contains("'search_token'") && analyze.contains("'resources'"));
        assert!(!schema(Dialect::Sqlite)
            .iter()
            .any(|x| x.contains("ANALYZE")));
        // the same statement runs after large Bundles
        assert_eq!(
            analyze_stale_statement(Dialect::Postgres).as_deref(),
            Some(analyze.as_str())
        );
        assert!(analyze_stale_statement(Dialect::Sqlite).is_none());
    }
}
