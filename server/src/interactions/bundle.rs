//! `batch` and `transaction` (http.html#transaction).
//!
//! A transaction runs in one store transaction: entries are processed in the spec's order
//! (DELETE, POST, PUT/PATCH, GET/HEAD), `urn:uuid:`/`urn:oid:` fullUrls of created resources are
//! rewritten in every Reference and in narrative, conditional references
//! (`Patient?identifier=…`) are resolved, and any failure rolls the whole Bundle back. Batch
//! entries are independent: each runs in its own store transaction with its own status.

use std::collections::HashMap;

use axum::http::{header, Method, StatusCode};
use kiln_fhir::Issue;
use kiln_store::WriteTx;
use serde_json::{json, Map, Value};

use super::{create, delete, patch, read, update, PreferReturn, RequestContext};
use crate::auth::Access;
use crate::error::{FhirError, FhirResult};
use crate::format::{Body, BodyKind, FhirResponse};
use crate::state::AppState;
use kiln_smart_auth::Interaction;

/// One entry's request, parsed.
#[derive(Debug, Clone)]
struct EntryRequest {
    index: usize,
    method: Method,
    /// Path relative to the base, without query (`Patient`, `Patient/1`, `Patient/1/_history/2`).
    path: Vec<String>,
    /// Raw query string (for conditional interactions and searches).
    query: String,
    full_url: Option<String>,
    resource: Option<Value>,
    ctx: RequestContext,
}

fn status_line(s: StatusCode) -> String {
    format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""))
}

fn parse_entry(
    state: &AppState,
    index: usize,
    entry: &Value,
    prefer: PreferReturn,
) -> FhirResult<EntryRequest> {
    let at = |m: String| FhirError::invalid_at(m, format!("Bundle.entry[{index}].request"));
    let req = entry
        .get("request")
        .ok_or_else(|| at("entry has no request".into()))?;
    let method_s = req
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| at("request.method is missing".into()))?;
    let method = match method_s {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        other => return Err(at(format!("unknown request.method `{other}`"))),
    };
    let url = req
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| at("request.url is missing".into()))?;
    // absolute URLs on this server are accepted as relative ones
    let rel = url
        .strip_prefix(&state.base_url)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path_s, query) = match rel.split_once('?') {
        Some((p, q)) => (p, q.to_string()),
        None => (rel, String::new()),
    };
    let path: Vec<String> = path_s
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if path.is_empty() && (method != Method::GET || query.is_empty()) {
        return Err(at(format!("request.url `{url}` names no resource type")));
    }
    let mut ctx = RequestContext {
        query: form_urlencoded_pairs(&query),
        prefer_return: prefer,
        ..Default::default()
    };
    let s = |k: &str| req.get(k).and_then(Value::as_str).map(str::to_string);
    ctx.if_match = s("ifMatch");
    ctx.if_none_match = s("ifNoneMatch");
    ctx.if_modified_since = s("ifModifiedSince");
    ctx.if_none_exist = s("ifNoneExist");
    Ok(EntryRequest {
        index,
        method,
        path,
        query,
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_string),
        resource: entry.get("resource").cloned(),
        ctx,
    })
}

/// Decodes `a=b&c=d` (percent and `+` decoding).
pub fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn order(m: &Method) -> u8 {
    match *m {
        Method::DELETE => 0,
        Method::POST => 1,
        Method::PUT | Method::PATCH => 2,
        _ => 3,
    }
}

/// Processes a `batch` or `transaction` Bundle.
pub async fn process(
    state: &AppState,
    bundle: Value,
    ctx: &RequestContext,
    access: &Access,
) -> FhirResult<FhirResponse> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::invalid_at(
            "POST to the base takes a batch or transaction Bundle",
            "resourceType",
        ));
    }
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let response = match kind {
        "transaction" => transaction(state, &entries, ctx, access).await,
        "batch" => batch(state, &entries, ctx, access).await,
        other => Err(FhirError::invalid_at(
            format!("Bundle.type `{other}` cannot be processed: use batch or transaction"),
            "Bundle.type",
        )),
    };
    if response.is_ok() && entries.len() >= crate::search::ANALYZE_AFTER_ENTRIES {
        crate::search::refresh_statistics(state).await;
    }
    response
}

/// Runs the entries of a transaction in `tx`. Returns the response entries in Bundle order.
pub async fn run_transaction(
    state: &AppState,
    tx: &mut WriteTx,
    entries: &[Value],
    prefer: PreferReturn,
    access: &Access,
) -> FhirResult<Vec<Value>> {
    let mut reqs = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        reqs.push(parse_entry(state, i, e, prefer)?);
    }
    for r in &reqs {
        check_entry_access(state, tx, access, r)
            .await
            .map_err(|e| at_entry(e, r.index))?;
    }
    // fullUrls must be unique within a transaction
    let mut seen = HashMap::new();
    for r in &reqs {
        if let Some(f) = &r.full_url {
            if let Some(prev) = seen.insert(f.clone(), r.index) {
                return Err(FhirError::invalid_at(
                    format!("fullUrl `{f}` appears in entries {prev} and {}", r.index),
                    format!("Bundle.entry[{}].fullUrl", r.index),
                ));
            }
        }
    }
    // no two entries may act on the same resource (http.html#transaction: SHALL fail)
    let mut touched: HashMap<String, usize> = HashMap::new();
    for r in &reqs {
        if matches!(r.method, Method::PUT | Method::PATCH | Method::DELETE) && r.path.len() == 2 {
            let key = format!("{}/{}", r.path[0], r.path[1]);
            if let Some(prev) = touched.insert(key.clone(), r.index) {
                return Err(FhirError::invalid_at(
                    format!("entries {prev} and {} both act on {key}: a transaction may not touch one resource twice", r.index),
                    format!("Bundle.entry[{}].request.url", r.index),
                ));
            }
        }
    }
    // 1. DELETEs first (spec order)
    let mut results: Vec<Option<FhirResponse>> = vec![None; reqs.len()];
    let mut sorted: Vec<usize> = (0..reqs.len()).collect();
    sorted.sort_by_key(|&i| (order(&reqs[i].method), i));
    for &i in &sorted {
        if reqs[i].method == Method::DELETE {
            results[i] = Some(
                execute(state, tx, &reqs[i], access)
                    .await
                    .map_err(|e| at_entry(e, i))?,
            );
        }
    }
    // 2. ids for POSTs (honouring ifNoneExist), so every fullUrl can be rewritten up front
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut post_existing: HashMap<usize, String> = HashMap::new();
    for &i in &sorted {
        let r = &reqs[i];
        if r.method != Method::POST || r.path.len() != 1 {
            continue;
        }
        let ty = &r.path[0];
        let mut id = None;
        if let Some(cond) = &r.ctx.if_none_exist {
            tx.lock(&format!("create:{ty}")).await?;
            let found = state
                .search
                .conditional_matches(tx, ty, cond.trim_start_matches('?'))
                .await
                .map_err(|e| at_entry(e, i))?;
            match found.len() {
                0 => {}
                1 => {
                    id = Some(found[0].clone());
                    post_existing.insert(i, found[0].clone());
                }
                n => {
                    return Err(at_entry(
                        FhirError::precondition_failed(format!(
                            "ifNoneExist `{cond}` matched {n} resources"
                        )),
                        i,
                    ))
                }
            }
        }
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if let Some(f) = &r.full_url {
            ids.insert(f.clone(), format!("{ty}/{id}"));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = post_existing.entry(i) {
            slot.insert(String::new());
            // remember the assigned id in the resource itself
            if let Some(res) = reqs[i].resource.as_mut().and_then(Value::as_object_mut) {
                res.insert("id".into(), Value::String(id.clone()));
            }
        }
    }
    // PUT entries with urn fullUrls map to their URL
    for r in &reqs {
        if r.method == Method::PUT && r.path.len() == 2 {
            if let Some(f) = &r.full_url {
                if f.starts_with("urn:") {
                    ids.insert(f.clone(), format!("{}/{}", r.path[0], r.path[1]));
                }
            }
        }
    }
    // 3. rewrite references (incl. conditional references) in every resource
    for &i in &sorted {
        if let Some(mut res) = reqs[i].resource.take() {
            rewrite_references(state, tx, &mut res, &ids)
                .await
                .map_err(|e| at_entry(e, i))?;
            reqs[i].resource = Some(res);
        }
    }
    // 4. POST, PUT/PATCH, GET in order
    for &i in &sorted {
        let r = &reqs[i];
        if r.method == Method::DELETE {
            continue;
        }
        let resp = if r.method == Method::POST && r.path.len() == 1 {
            let ty = &r.path[0];
            match post_existing.get(&i).filter(|s| !s.is_empty()) {
                Some(existing) => {
                    let stored = tx
                        .read(ty, existing)
                        .await?
                        .ok_or_else(|| FhirError::internal("conditional create match vanished"))?;
                    super::resource_response(
                        state,
                        &stored,
                        StatusCode::OK,
                        r.ctx.prefer_return,
                        true,
                    )
                }
                None => {
                    let res = r.resource.clone().ok_or_else(|| {
                        at_entry(FhirError::bad_request("POST entry has no resource"), i)
                    })?;
                    let id = res
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    create::create_with_id(state, tx, ty, &id, res, &r.ctx)
                        .await
                        .map_err(|e| at_entry(e, i))?
                }
            }
        } else if r.method == Method::GET || r.method == Method::HEAD {
            // reads change nothing: a failed read is that entry's outcome, not the transaction's
            match execute(state, tx, r, access).await {
                Ok(resp) => resp,
                Err(e) => {
                    let mut resp =
                        FhirResponse::ok(Body::Resource(kiln_fhir::operation_outcome(&e.issues)));
                    resp.status = e.status;
                    resp
                }
            }
        } else {
            execute(state, tx, r, access)
                .await
                .map_err(|e| at_entry(e, i))?
        };
        results[i] = Some(resp);
    }
    let mut out = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        let resp = r.ok_or_else(|| FhirError::internal(format!("entry {i} was not processed")))?;
        out.push(response_entry(resp)?);
    }
    Ok(out)
}

fn at_entry(mut e: FhirError, i: usize) -> FhirError {
    for issue in &mut e.issues {
        issue.diagnostics = format!("Bundle.entry[{i}]: {}", issue.diagnostics);
    }
    e
}

/// Executes one non-POST entry (or a POST in a batch) against the open transaction.
async fn execute(
    state: &AppState,
    tx: &mut WriteTx,
    r: &EntryRequest,
    access: &Access,
) -> FhirResult<FhirResponse> {
    let p: Vec<&str> = r.path.iter().map(String::as_str).collect();
    let need_resource = || {
        r.resource
            .clone()
            .ok_or_else(|| FhirError::bad_request("entry has no resource"))
    };
    match (&r.method, p.as_slice()) {
        (&Method::POST, [ty]) => Ok(create::create(state, tx, ty, need_resource()?, &r.ctx)
            .await?
            .response),
        (&Method::PUT, [ty, id]) => {
            update::update(state, tx, ty, id, need_resource()?, &r.ctx).await
        }
        (&Method::PUT, [ty]) => {
            update::conditional_update(state, tx, ty, &r.query, need_resource()?, &r.ctx).await
        }
        (&Method::PATCH, [ty, id]) => {
            let body = need_resource()?;
            let kind = patch_kind(&body);
            patch::patch(state, tx, ty, id, kind, &body, &r.ctx).await
        }
        (&Method::PATCH, [ty]) => {
            let body = need_resource()?;
            let kind = patch_kind(&body);
            patch::conditional_patch(state, tx, ty, &r.query, kind, &body, &r.ctx).await
        }
        (&Method::DELETE, [ty, id]) => delete::delete(state, tx, ty, id, &r.ctx).await,
        (&Method::DELETE, [ty]) => {
            delete::conditional_delete(state, tx, ty, &r.query, &r.ctx).await
        }
        (&Method::GET | &Method::HEAD, [ty, id]) => {
            let r = read::read_in_tx(state, tx, ty, id, &r.ctx).await?;
            access.require_visible_response(state, Interaction::Read, r)
        }
        (&Method::GET | &Method::HEAD, [ty, id, "_history", vid]) => {
            let r = read::vread_in_tx(state, tx, ty, id, vid, &r.ctx).await?;
            access.require_visible_response(state, Interaction::VRead, r)
        }
        (&Method::GET | &Method::HEAD, [ty]) => {
            state
                .search
                .search_type(state, Some(ty), &r.ctx, access)
                .await
        }
        (&Method::GET | &Method::HEAD, []) => {
            state.search.search_type(state, None, &r.ctx, access).await
        }
        (m, _) => Err(FhirError::bad_request(format!(
            "{m} {} is not a supported Bundle entry request",
            r.path.join("/")
        ))),
    }
}

/// SMART enforcement for one entry: the interaction must be granted on the type, written
/// resources must lie within the grant, and existing resources touched must be visible to it.
async fn check_entry_access(
    state: &AppState,
    tx: &mut WriteTx,
    access: &Access,
    r: &EntryRequest,
) -> FhirResult<()> {
    if access.grant().is_none() {
        return Ok(());
    }
    let Some(ty) = r.path.first() else {
        return access.check_any(Interaction::Search);
    };
    let has_id = r.path.len() >= 2;
    let interaction = crate::auth::interaction_for_method(&r.method, has_id);
    access.check(interaction, ty)?;
    let conditional = (!has_id
        && r.method != Method::GET
        && r.method != Method::HEAD
        && r.method != Method::POST)
        || (r.method == Method::POST && r.ctx.if_none_exist.is_some());
    if conditional {
        access.require_unrestricted(interaction, ty)?;
    }
    if let (Some(res), true) = (&r.resource, matches!(r.method, Method::POST | Method::PUT)) {
        access.require_writable(state, interaction, res)?;
    }
    if has_id {
        if let Some(cur) = tx.read(ty, &r.path[1]).await? {
            if !cur.deleted {
                let v: Value = serde_json::from_str(&cur.content).map_err(|e| {
                    FhirError::internal(format!("stored resource is not JSON: {e}"))
                })?;
                access.require_visible(state, interaction, &v)?;
            }
        }
    }
    Ok(())
}

/// A Binary (JSON Patch) entry carries the patch as base64 data; a Parameters entry is FHIRPath Patch.
fn patch_kind(body: &Value) -> BodyKind {
    if body.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
        BodyKind::Json
    } else {
        BodyKind::JsonPatch
    }
}

fn response_entry(resp: FhirResponse) -> FhirResult<Value> {
    let mut response = Map::new();
    response.insert("status".into(), Value::String(status_line(resp.status)));
    if let Some(l) = resp.header(&header::LOCATION) {
        response.insert("location".into(), Value::String(l.to_string()));
    }
    if let Some(e) = resp.header(&header::ETAG) {
        response.insert("etag".into(), Value::String(e.to_string()));
    }
    let mut entry = Map::new();
    if let Some(body) = resp.body {
        let v = body.into_value()?;
        if v.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
            && !resp.status.is_success()
        {
            response.insert("outcome".into(), v);
        } else {
            if let Some(lu) = v.pointer("/meta/lastUpdated").cloned() {
                response.insert("lastModified".into(), lu);
            }
            if let (Some(t), Some(id)) = (
                v.get("resourceType").and_then(Value::as_str),
                v.get("id").and_then(Value::as_str),
            ) {
                if t != "OperationOutcome" && t != "Bundle" {
                    entry.insert("fullUrl".into(), Value::String(format!("{t}/{id}")));
                }
            }
            entry.insert("resource".into(), v);
        }
    }
    entry.insert("response".into(), Value::Object(response));
    Ok(Value::Object(entry))
}

async fn transaction(
    state: &AppState,
    entries: &[Value],
    ctx: &RequestContext,
    access: &Access,
) -> FhirResult<FhirResponse> {
    let mut tx = state.store.begin().await?;
    let out = run_transaction(state, &mut tx, entries, ctx.prefer_return, access).await?;
    tx.commit().await?;
    let mut out = out;
    absolutize_full_urls(state, &mut out);
    Ok(FhirResponse::ok(Body::Resource(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "transaction-response",
        "entry": out,
    }))))
}

fn absolutize_full_urls(state: &AppState, entries: &mut [Value]) {
    for e in entries {
        if let Some(Value::String(f)) = e.get_mut("fullUrl") {
            if !f.contains("://") {
                *f = format!("{}/{}", state.base_url, f);
            }
        }
    }
}

async fn batch(
    state: &AppState,
    entries: &[Value],
    ctx: &RequestContext,
    access: &Access,
) -> FhirResult<FhirResponse> {
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let result: FhirResult<FhirResponse> = async {
            let r = parse_entry(state, i, e, ctx.prefer_return)?;
            let mut tx = state.store.begin().await?;
            check_entry_access(state, &mut tx, access, &r).await?;
            let resp = execute(state, &mut tx, &r, access).await?;
            tx.commit().await?;
            Ok(resp)
        }
        .await;
        let entry = match result {
            Ok(resp) => response_entry(resp)?,
            Err(err) => json!({
                "response": {
                    "status": status_line(err.status),
                    "outcome": kiln_fhir::operation_outcome(&err.issues),
                }
            }),
        };
        out.push(entry);
    }
    absolutize_full_urls(state, &mut out);
    Ok(FhirResponse::ok(Body::Resource(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "batch-response",
        "entry": out,
    }))))
}

/// Rewrites `Reference.reference` values that name a Bundle fullUrl, resolves conditional
/// references, and rewrites fullUrls appearing in narrative (`text.div`).
async fn rewrite_references(
    state: &AppState,
    tx: &mut WriteTx,
    resource: &mut Value,
    ids: &HashMap<String, String>,
) -> FhirResult<()> {
    // collect conditional references first (async search), then rewrite synchronously
    let mut conditional = Vec::new();
    collect_refs(resource, &mut |r| {
        if is_conditional_ref(r) {
            conditional.push(r.to_string());
        }
    });
    let mut resolved: HashMap<String, String> = HashMap::new();
    for c in conditional {
        if resolved.contains_key(&c) {
            continue;
        }
        let (ty, q) = c.split_once('?').unwrap_or((&c, ""));
        super::check_type(ty)?;
        let found = state.search.conditional_matches(tx, ty, q).await?;
        match found.len() {
            1 => {
                resolved.insert(c.clone(), format!("{ty}/{}", found[0]));
            }
            n => {
                return Err(FhirError::precondition_failed(format!(
                    "conditional reference `{c}` matched {n} resources (must match exactly one)"
                )))
            }
        }
    }
    rewrite(resource, &|r| {
        ids.get(r).or_else(|| resolved.get(r)).cloned()
    });
    // narrative
    if let Some(Value::String(div)) = resource.pointer_mut("/text/div") {
        for (from, to) in ids {
            if div.contains(from.as_str()) {
                *div = div.replace(from.as_str(), to);
            }
        }
    }
    Ok(())
}

fn is_conditional_ref(r: &str) -> bool {
    match r.split_once('?') {
        Some((ty, _)) => !ty.contains('/') && !ty.contains(':'),
        None => false,
    }
}

fn collect_refs(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "reference" {
                    if let Value::String(s) = x {
                        f(s);
                    }
                } else {
                    collect_refs(x, f);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, f)),
        _ => {}
    }
}

fn rewrite(v: &mut Value, f: &dyn Fn(&str) -> Option<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "reference" {
                    if let Value::String(s) = x {
                        if let Some(n) = f(s) {
                            *s = n;
                        }
                    }
                } else {
                    rewrite(x, f);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, f)),
        _ => {}
    }
}

/// Issue for a Bundle whose type is not processable (used by import).
pub fn not_processable(kind: &str) -> Issue {
    Issue::error(
        "not-supported",
        format!("Bundle.type `{kind}` is not processable"),
    )
    .at("Bundle.type")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query() {
        assert_eq!(
            form_urlencoded_pairs("identifier=http%3A%2F%2Fx%7C1&name=a+b"),
            vec![
                ("identifier".to_string(), "http://x|1".to_string()),
                ("name".to_string(), "a b".to_string())
            ]
        );
    }

    #[test]
    fn rewrites_nested_references() {
        let mut v =
            json!({"subject": {"reference": "urn:uuid:1"}, "x": [{"reference": "urn:uuid:2"}]});
        let mut ids = HashMap::new();
        ids.insert("urn:uuid:1".to_string(), "Patient/a".to_string());
        rewrite(&mut v, &|r| ids.get(r).cloned());
        assert_eq!(v["subject"]["reference"], "Patient/a");
        assert_eq!(v["x"][0]["reference"], "urn:uuid:2");
    }

    #[test]
    fn conditional_refs() {
        assert!(is_conditional_ref("Patient?identifier=x|1"));
        assert!(!is_conditional_ref("Patient/1"));
        assert!(!is_conditional_ref("http://x/Patient?x"));
    }
}
