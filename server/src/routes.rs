//! The HTTP surface: one dispatcher under the FHIR base that maps method + path to an
//! interaction or operation (FHIR's URL grammar has `$operations`, compartments and `_history`
//! segments that read best as one `match`), plus the layers every response goes through.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use kiln_store::HistoryScope;
use serde_json::Value;
use tower_http::compression::CompressionLayer;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::auth::Access;
use crate::error::{FhirError, FhirResult};
use crate::format::{self, Body, BodyKind, FhirResponse, Negotiated};
use crate::interactions::bundle::form_urlencoded_pairs;
use crate::interactions::{
    bundle, capabilities, create, delete, history, parse_prefer, patch, read, update,
    RequestContext,
};
use crate::operations::{parameters_from_query, Target};
use crate::state::AppState;
use kiln_smart_auth::Interaction;

/// The path part of the base URL (`/fhir` for `http://host:8080/fhir`).
pub fn base_path(base_url: &str) -> String {
    let after_scheme = base_url.split_once("://").map(|x| x.1).unwrap_or(base_url);
    match after_scheme.find('/') {
        Some(i) => after_scheme[i..].trim_end_matches('/').to_string(),
        None => String::new(),
    }
}

pub fn router(state: AppState) -> Router {
    let base = base_path(&state.base_url);
    let x_request_id = HeaderName::from_static("x-request-id");
    let mut fhir: Router = Router::new()
        .route("/", any(dispatch))
        .route("/{*rest}", any(dispatch))
        .with_state(state.clone());
    if let Some(auth) = &state.auth {
        // SMART discovery and the authorization server live under the FHIR base
        fhir = fhir.merge(kiln_smart_auth::router(auth.clone()));
    }
    let app = if base.is_empty() {
        fhir
    } else {
        Router::new().nest(&base, fhir)
    };
    app.route("/health", any(health).with_state(state))
        .layer(CompressionLayer::new())
        .layer(CorsLayer::permissive().expose_headers([
            header::ETAG,
            header::LOCATION,
            header::CONTENT_LOCATION,
            header::LAST_MODIFIED,
        ]))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
}

async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}"),
        )
            .into_response(),
    }
}

fn request_context(headers: &HeaderMap, query: Vec<(String, String)>) -> RequestContext {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut ctx = RequestContext {
        query,
        if_match: h("if-match"),
        if_none_match: h("if-none-match"),
        if_modified_since: h("if-modified-since"),
        if_none_exist: h("if-none-exist"),
        ..Default::default()
    };
    for v in headers.get_all("prefer") {
        if let Ok(s) = v.to_str() {
            parse_prefer(s, &mut ctx);
        }
    }
    ctx
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(form_urlencoded_pairs)
        .unwrap_or_default();
    let negotiated = match format::negotiate(&parts.headers, &query) {
        Ok(n) => n,
        Err(e) => return format::render_error(e, &Negotiated::default()),
    };
    let body = match axum::body::to_bytes(body, state.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return format::render_error(
                FhirError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    kiln_fhir::Issue::error(
                        "too-costly",
                        format!(
                            "request body exceeds the limit of {} bytes",
                            state.settings.max_body_bytes
                        ),
                    ),
                ),
                &negotiated,
            )
        }
    };
    let path = parts.uri.path().to_string();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(bundle::percent_decode)
        .collect();
    let ctx = request_context(&parts.headers, query);
    let head = parts.method == Method::HEAD;
    let public = segments.last().map(String::as_str) == Some("metadata");
    let access = match (&state.auth, public) {
        (Some(auth), false) => {
            let header = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match kiln_smart_auth::authorize_bearer(auth, header).await {
                Ok(grant) => Access::from_grant(grant),
                Err(e) => return format::render_error(FhirError::from(e), &negotiated),
            }
        }
        _ => Access::unrestricted(),
    };
    let result = route(
        &state,
        &parts.method,
        &segments,
        &parts.headers,
        body,
        &ctx,
        &access,
    )
    .await;
    if result.is_ok()
        && !matches!(parts.method, Method::GET | Method::HEAD)
        && segments.first().is_none_or(|s| s == "SearchParameter")
    {
        // a SearchParameter (or a Bundle that may hold one) was written: this node's registry
        // follows at once (other nodes within the poll interval, see `serve`)
        if let Err(e) = state.search.refresh_custom_parameters(&state.store).await {
            tracing::warn!("cannot reload custom search parameters: {:?}", e.issues);
        }
    }
    let mut resp = match result {
        Ok(r) => format::render(r, &negotiated),
        Err(e) => format::render_error(e, &negotiated),
    };
    if head {
        *resp.body_mut() = axum::body::Body::empty();
    }
    resp
}

fn parse_resource(headers: &HeaderMap, body: &Bytes) -> FhirResult<Value> {
    let kind = format::body_kind(headers)?;
    format::parse_body(kind, body)
}

/// Runs a write interaction in its own store transaction: committed on success, rolled back
/// (by drop) on error.
macro_rules! in_tx {
    ($state:expr, |$tx:ident| $body:expr) => {{
        let mut t = $state.store.begin().await?;
        let resp = {
            let $tx = &mut t;
            $body
        };
        t.commit().await?;
        Ok(resp)
    }};
}

fn query_string(ctx: &RequestContext) -> String {
    ctx.query
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty"))
        .map(|(k, v)| format!("{}={}", history::encode(k), history::encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn route(
    state: &AppState,
    method: &Method,
    segments: &[String],
    headers: &HeaderMap,
    body: Bytes,
    ctx: &RequestContext,
    access: &Access,
) -> FhirResult<FhirResponse> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = method.clone();
    let get = m == Method::GET || m == Method::HEAD;
    match s.as_slice() {
        [] if m == Method::POST => {
            let bundle = parse_resource(headers, &body)?;
            bundle::process(state, bundle, ctx, access).await
        }
        [] if get => state.search.search_type(state, None, ctx, access).await,
        ["metadata"] if get => Ok(FhirResponse::ok(Body::Resource(
            if ctx.param("mode") == Some("terminology") {
                capabilities::terminology_capabilities(state)
            } else {
                capabilities::capability_statement(state)
            },
        ))),
        ["_history"] if get => {
            access.check_any(Interaction::HistorySystem)?;
            let r = history::history(state, HistoryScope::System, ctx).await?;
            filter_response(state, access, Interaction::HistorySystem, r)
        }
        ["_search"] if m == Method::POST => {
            let ctx = with_form(ctx, headers, &body)?;
            state.search.search_type(state, None, &ctx, access).await
        }
        [op] if op.starts_with('$') => {
            access.check_any(Interaction::Read)?;
            operation(state, access, &m, Target::System, op, headers, &body, ctx).await
        }
        [ty] if get => state.search.search_type(state, Some(ty), ctx, access).await,
        [ty] if m == Method::POST => {
            let resource = parse_resource(headers, &body)?;
            access.check(Interaction::Create, ty)?;
            if ctx.if_none_exist.is_some() {
                // conditional create matches by search: could reveal resources outside the grant
                access.require_unrestricted(Interaction::Create, ty)?;
            }
            access.require_writable(state, Interaction::Create, &resource)?;
            let ty = ty.to_string();
            in_tx!(state, |tx| create::create(state, tx, &ty, resource, ctx)
                .await?
                .response)
        }
        [ty] if m == Method::PUT => {
            let resource = parse_resource(headers, &body)?;
            access.require_unrestricted(Interaction::Update, ty)?;
            let (ty, q) = (ty.to_string(), query_string(ctx));
            if q.is_empty() {
                return Err(FhirError::method_not_allowed(
                    "PUT on a type needs search criteria (conditional update)",
                ));
            }
            in_tx!(state, |tx| update::conditional_update(
                state, tx, &ty, &q, resource, ctx
            )
            .await?)
        }
        [ty] if m == Method::DELETE => {
            access.require_unrestricted(Interaction::Delete, ty)?;
            let (ty, q) = (ty.to_string(), query_string(ctx));
            in_tx!(state, |tx| delete::conditional_delete(
                state, tx, &ty, &q, ctx
            )
            .await?)
        }
        [ty] if m == Method::PATCH => {
            let kind = format::body_kind(headers)?;
            let doc = format::parse_body(kind, &body)?;
            access.require_unrestricted(Interaction::Patch, ty)?;
            let (ty, q) = (ty.to_string(), query_string(ctx));
            in_tx!(state, |tx| patch::conditional_patch(
                state, tx, &ty, &q, kind, &doc, ctx
            )
            .await?)
        }
        [ty, "_search"] if m == Method::POST => {
            let ctx = with_form(ctx, headers, &body)?;
            state
                .search
                .search_type(state, Some(ty), &ctx, access)
                .await
        }
        [ty, "_history"] if get => {
            access.check(Interaction::HistoryType, ty)?;
            let r = history::history(state, HistoryScope::Type(ty.to_string()), ctx).await?;
            filter_response(state, access, Interaction::HistoryType, r)
        }
        [ty, op] if op.starts_with('$') => {
            access.check(Interaction::Read, ty)?;
            operation(
                state,
                access,
                &m,
                Target::Type(ty.to_string()),
                op,
                headers,
                &body,
                ctx,
            )
            .await
        }
        [ty, id] if get => {
            access.check(Interaction::Read, ty)?;
            let r = read::read(state, ty, id, ctx).await?;
            access.require_visible_response(state, Interaction::Read, r)
        }
        [ty, id] if m == Method::PUT => {
            let resource = parse_resource(headers, &body)?;
            access.check(Interaction::Update, ty)?;
            access.require_writable(state, Interaction::Update, &resource)?;
            existing_visible(state, access, Interaction::Update, ty, id).await?;
            let (ty, id) = (ty.to_string(), id.to_string());
            in_tx!(state, |tx| update::update(
                state, tx, &ty, &id, resource, ctx
            )
            .await?)
        }
        [ty, id] if m == Method::DELETE => {
            access.check(Interaction::Delete, ty)?;
            existing_visible(state, access, Interaction::Delete, ty, id).await?;
            let (ty, id) = (ty.to_string(), id.to_string());
            in_tx!(state, |tx| delete::delete(state, tx, &ty, &id, ctx).await?)
        }
        [ty, id] if m == Method::PATCH => {
            let kind = format::body_kind(headers)?;
            let doc = format::parse_body(kind, &body)?;
            access.check(Interaction::Patch, ty)?;
            existing_visible(state, access, Interaction::Patch, ty, id).await?;
            let (ty, id) = (ty.to_string(), id.to_string());
            in_tx!(state, |tx| patch::patch(
                state, tx, &ty, &id, kind, &doc, ctx
            )
            .await?)
        }
        [ty, id, "_history"] if get => {
            access.check(Interaction::HistoryInstance, ty)?;
            existing_visible(state, access, Interaction::HistoryInstance, ty, id).await?;
            let scope = HistoryScope::Instance(ty.to_string(), id.to_string());
            let r = history::history(state, scope, ctx).await?;
            filter_response(state, access, Interaction::HistoryInstance, r)
        }
        [ty, id, "_history", vid] if get => {
            access.check(Interaction::VRead, ty)?;
            existing_visible(state, access, Interaction::VRead, ty, id).await?;
            let r = read::vread(state, ty, id, vid, ctx).await?;
            access.require_visible_response(state, Interaction::VRead, r)
        }
        [ty, id, op] if op.starts_with('$') => {
            access.check(Interaction::Read, ty)?;
            existing_visible(state, access, Interaction::Read, ty, id).await?;
            operation(
                state,
                access,
                &m,
                Target::Instance(ty.to_string(), id.to_string()),
                op,
                headers,
                &body,
                ctx,
            )
            .await
        }
        [cty, cid, ty] if get => {
            state
                .search
                .search_compartment(state, cty, cid, ty, ctx, access)
                .await
        }
        [cty, cid, ty, "_search"] if m == Method::POST => {
            let ctx = with_form(ctx, headers, &body)?;
            state
                .search
                .search_compartment(state, cty, cid, ty, &ctx, access)
                .await
        }
        [ty, ..]
            if !ty.starts_with('$')
                && !ty.starts_with('_')
                && ty.chars().next().is_some_and(|c| c.is_ascii_uppercase()) =>
        {
            crate::interactions::check_type(ty)?;
            Err(FhirError::method_not_allowed(format!(
                "{m} is not supported on /{}",
                segments.join("/")
            )))
        }
        _ => Err(FhirError::not_found(format!(
            "no FHIR endpoint at /{}",
            segments.join("/")
        ))),
    }
}

/// 404 when the current version of `ty/id` exists but is not visible to the grant.
async fn existing_visible(
    state: &AppState,
    access: &Access,
    interaction: Interaction,
    ty: &str,
    id: &str,
) -> FhirResult<()> {
    if access.grant().is_none() {
        return Ok(());
    }
    if let Some(cur) = state.store.read(ty, id).await? {
        if !cur.deleted {
            let v: Value = serde_json::from_str(&cur.content)
                .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}")))?;
            access.require_visible(state, interaction, &v)?;
        } else if access.grant().and_then(|g| g.patient()).is_some() {
            // deleted resources of restricted grants: nothing to show
            return Err(FhirError::not_found(format!("{ty}/{id} does not exist")));
        }
    }
    Ok(())
}

/// Drops the entries of a Bundle response the grant may not see.
fn filter_response(
    state: &AppState,
    access: &Access,
    interaction: Interaction,
    mut r: FhirResponse,
) -> FhirResult<FhirResponse> {
    if access.grant().is_none() {
        return Ok(r);
    }
    if let Some(body) = r.body.take() {
        let mut v = body.into_value()?;
        access.filter_bundle(state, interaction, &mut v);
        r.body = Some(Body::Resource(v));
    }
    Ok(r)
}

/// `POST …/_search`: parameters in an `application/x-www-form-urlencoded` body join the URL's.
fn with_form(
    ctx: &RequestContext,
    headers: &HeaderMap,
    body: &Bytes,
) -> FhirResult<RequestContext> {
    let mut ctx = ctx.clone();
    if body.is_empty() {
        return Ok(ctx);
    }
    if format::body_kind(headers)? != BodyKind::Form {
        return Err(FhirError::unsupported_media_type(
            "_search takes application/x-www-form-urlencoded parameters",
        ));
    }
    let text =
        std::str::from_utf8(body).map_err(|_| FhirError::bad_request("form body is not UTF-8"))?;
    ctx.query.extend(form_urlencoded_pairs(text));
    Ok(ctx)
}

#[allow(clippy::too_many_arguments)]
async fn operation(
    state: &AppState,
    access: &Access,
    method: &Method,
    target: Target,
    op: &str,
    headers: &HeaderMap,
    body: &Bytes,
    ctx: &RequestContext,
) -> FhirResult<FhirResponse> {
    let name = op.trim_start_matches('$');
    let Some(operation) = state.operations.get(name) else {
        return Err(FhirError::not_found(format!("unknown operation ${name}")));
    };
    let d = operation.definition();
    let level_ok = match &target {
        Target::System => d.system,
        Target::Type(t) => {
            crate::interactions::check_type(t)?;
            d.type_level && (d.resource_types.is_empty() || d.resource_types.contains(&t.as_str()))
        }
        Target::Instance(t, _) => {
            crate::interactions::check_type(t)?;
            d.instance && (d.resource_types.is_empty() || d.resource_types.contains(&t.as_str()))
        }
    };
    if !level_ok {
        return Err(FhirError::not_found(format!(
            "${name} is not defined at this level"
        )));
    }
    if d.affects_state {
        // An operation that changes stored data (e.g. `$reindex`) works on whole types: it needs a
        // grant that may update every type it touches without a patient or granular restriction.
        match &target {
            Target::System => {
                for t in kiln_fhir::model::r4().resource_types() {
                    access.require_unrestricted(Interaction::Update, t)?;
                }
            }
            Target::Type(t) | Target::Instance(t, _) => {
                access.require_unrestricted(Interaction::Update, t)?
            }
        }
    }
    let params = if *method == Method::GET || *method == Method::HEAD {
        if d.affects_state {
            return Err(FhirError::method_not_allowed(format!(
                "${name} changes data: use POST"
            )));
        }
        parameters_from_query(&ctx.query)
    } else if *method == Method::POST {
        if body.is_empty() {
            parameters_from_query(&ctx.query)
        } else {
            parse_resource(headers, body)?
        }
    } else {
        return Err(FhirError::method_not_allowed(format!(
            "${name} takes GET or POST"
        )));
    };
    operation.invoke(state, target, params, ctx, access).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn base_paths() {
        assert_eq!(super::base_path("http://127.0.0.1:8080/fhir"), "/fhir");
        assert_eq!(super::base_path("https://x.org/a/fhir/"), "/a/fhir");
        assert_eq!(super::base_path("http://x.org"), "");
    }
}
