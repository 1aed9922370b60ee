//! `history` at instance, type and system level: `_since`, `_at`, `_count`, keyset paging.

use kiln_store::{format_instant, parse_instant, HistoryQuery, HistoryScope};
use serde_json::{json, Map, Value};

use super::{check_type, etag, RequestContext};
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::state::AppState;

fn instant_param(ctx: &RequestContext, name: &str) -> FhirResult<Option<i64>> {
    match ctx.param(name) {
        None => Ok(None),
        Some(v) => parse_instant(v).map(Some).ok_or_else(|| {
            FhirError::invalid_at(
                format!("{name}: `{v}` is not a FHIR instant (e.g. 2024-01-01T00:00:00Z)"),
                name,
            )
        }),
    }
}

pub async fn history(
    state: &AppState,
    scope: HistoryScope,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    let path = match &scope {
        HistoryScope::System => "_history".to_string(),
        HistoryScope::Type(t) => {
            check_type(t)?;
            format!("{t}/_history")
        }
        HistoryScope::Instance(t, id) => {
            check_type(t)?;
            if state.store.read(t, id).await?.is_none() {
                return Err(FhirError::not_found(format!("{t}/{id} does not exist")));
            }
            format!("{t}/{id}/_history")
        }
    };
    let count = match ctx.param("_count") {
        None => state.settings.default_page_size,
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| FhirError::invalid_at(format!("_count: `{c}` is not a number"), "_count"))?
            .min(state.settings.max_page_size),
    };
    let before = match ctx.param("_cursor") {
        None => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            FhirError::invalid_at(
                format!("_cursor: `{c}` is not a valid page cursor"),
                "_cursor",
            )
        })?),
    };
    let q = HistoryQuery {
        scope,
        since: instant_param(ctx, "_since")?,
        at: instant_param(ctx, "_at")?,
        count,
        before,
    };
    let page = state.store.history(&q).await?;
    let mut keep: Vec<(String, String)> = ctx
        .query
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "_since" | "_at"))
        .cloned()
        .collect();
    keep.push(("_count".into(), count.to_string()));
    let link = |extra: Option<(String, String)>| {
        let mut params = keep.clone();
        if let Some(e) = extra {
            params.push(e);
        }
        let qs: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        format!("{}/{}?{}", state.base_url, path, qs.join("&"))
    };
    let mut links = vec![
        json!({"relation": "self", "url": link(before.map(|b| ("_cursor".into(), b.to_string())))}),
        json!({"relation": "first", "url": link(None)}),
    ];
    if let Some(next) = page.next {
        links.push(
            json!({"relation": "next", "url": link(Some(("_cursor".into(), next.to_string())))}),
        );
    }
    let mut entries = Vec::with_capacity(page.entries.len());
    for e in page.entries {
        let full_url = format!("{}/{}/{}", state.base_url, e.resource_type, e.id);
        let mut entry = Map::new();
        entry.insert("fullUrl".into(), Value::String(full_url));
        if !e.deleted {
            let r: Value = serde_json::from_str(&e.content).map_err(|err| {
                FhirError::internal(format!("stored resource is not JSON: {err}"))
            })?;
            entry.insert("resource".into(), r);
        }
        let (method, url) = match e.method.as_str() {
            "POST" => ("POST", e.resource_type.clone()),
            m => (m, format!("{}/{}", e.resource_type, e.id)),
        };
        let method = if method == "PATCH" { "PATCH" } else { method };
        entry.insert("request".into(), json!({"method": method, "url": url}));
        let status = match (e.deleted, e.version) {
            (true, _) => "204 No Content",
            (false, 1) => "201 Created",
            _ => "200 OK",
        };
        entry.insert(
            "response".into(),
            json!({"status": status, "etag": etag(e.version), "lastModified": format_instant(e.last_updated)}),
        );
        entries.push(Value::Object(entry));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": format_instant(kiln_store::now_micros())},
        "type": "history",
        "total": page.total,
        "link": links,
        "entry": entries,
    });
    Ok(FhirResponse::ok(Body::Resource(bundle)))
}

/// Percent-encodes a query component.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'~'
            | b':'
            | b'|'
            | b','
            | b'$'
            | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
