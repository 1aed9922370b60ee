//! HTTP endpoints of the authorization server.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, Extensions, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::clients::{
    add_client, authenticate_client, ClientCredentials, ClientError, ClientProof, NewClient,
};
use crate::error::OAuthError;
use crate::html;
use crate::scopes::{Scope, ScopeContext, ScopeSet};
use crate::store::{
    now, AuthStoreExt, AuthorizationCode, Client, ClientAuthMethod, EhrLaunch, LaunchContext,
    PendingAuthorization, RecordKind, RefreshTokenRecord, Session, User,
};
use crate::tokens::{
    bearer_token, sign, verify_access_token, verify_active_access_token, AccessToken,
};
use crate::users::{verify_login, LoginOutcome};
use crate::{random_token, sha256_hex, AuthState};

const SESSION_COOKIE: &str = "kiln_session";

/// The authorization server's routes (mount at the FHIR base). See the crate docs for the list.
pub fn router(state: AuthState) -> Router {
    Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/auth/authorize", get(authorize_get).post(authorize_post))
        .route("/auth/login", get(login_page).post(login_submit))
        .route("/auth/logout", post(logout))
        .route("/auth/select-patient", get(picker_page).post(picker_submit))
        .route(
            "/auth/select-encounter",
            get(encounter_page).post(encounter_submit),
        )
        .route("/auth/consent", get(consent_page).post(consent_submit))
        .route("/auth/token", post(token).options(preflight))
        .route("/auth/introspect", post(introspect).options(preflight))
        .route("/auth/revoke", post(revoke).options(preflight))
        .route("/auth/register", post(register))
        .route("/auth/jwks", get(jwks))
        .route(
            "/auth/userinfo",
            get(userinfo).post(userinfo).options(preflight),
        )
        .route("/auth/launch", post(create_launch))
        .route("/auth/ehr-launch", get(ehr_launch_redirect))
        .route("/auth/smart-style.json", get(smart_style))
        .route("/auth/mfa", get(mfa_page).post(mfa_submit))
        .route("/auth/password-reset", get(reset_page).post(reset_submit))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Parsed `application/x-www-form-urlencoded` body or query (first value wins for `get`).
struct FormData(Vec<(String, String)>);

impl FormData {
    fn parse(bytes: &[u8]) -> FormData {
        FormData(
            form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn non_empty(&self, k: &str) -> Option<&str> {
        self.get(k).filter(|v| !v.is_empty())
    }
    fn all(&self, k: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn client_addr(ext: &Extensions) -> String {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn cors_any(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// Reflects the request `Origin` (token endpoint for browser-based public clients).
fn cors_reflect(headers: &HeaderMap, mut resp: Response) -> Response {
    if let Some(o) = headers.get(header::ORIGIN).cloned() {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

async fn preflight(headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    cors_reflect(&headers, resp)
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, Json(v)).into_response()
}

fn html_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, Html(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn error_page(status: StatusCode, title: &str, text: &str) -> Response {
    html_response(status, html::message(title, text))
}

fn redirect(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(v) => {
            let mut resp = StatusCode::SEE_OTHER.into_response();
            resp.headers_mut().insert(header::LOCATION, v);
            no_store(resp)
        }
        Err(_) => error_page(
            StatusCode::BAD_REQUEST,
            "Error",
            "invalid redirect location",
        ),
    }
}

fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    let q = ser.finish();
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{q}")
}

fn redirect_error(
    redirect_uri: &str,
    state: Option<&str>,
    error: &str,
    description: &str,
) -> Response {
    let mut p = vec![("error", error), ("error_description", description)];
    if let Some(s) = state {
        p.push(("state", s));
    }
    redirect(&with_query(redirect_uri, &p))
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn current_session(state: &AuthState, headers: &HeaderMap) -> Option<(Session, User)> {
    let id = cookie_value(headers, SESSION_COOKIE)?;
    let session = state.store().get_session(&sha256_hex(id)).await.ok()??;
    let user = state.store().get_user(&session.username).await.ok()??;
    if user.locked_until.is_some_and(|t| t > now()) {
        return None;
    }
    Some((session, user))
}

fn session_cookie(state: &AuthState, id: &str, max_age: i64) -> HeaderValue {
    let secure = if state.config().secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("kiln_session=; Max-Age=0"))
}

fn absolute_fhir_user(state: &AuthState, f: &str) -> String {
    if f.starts_with("http://") || f.starts_with("https://") {
        f.to_string()
    } else {
        format!(
            "{}/{}",
            state.config().fhir_base_url,
            f.trim_start_matches('/')
        )
    }
}

fn pkce_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn valid_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
}

fn describe_scope(s: &Scope) -> String {
    match s {
        Scope::Resource(r) => {
            let mut verbs = Vec::new();
            for (bit, v) in [
                (crate::scopes::PERM_CREATE, "create"),
                (crate::scopes::PERM_READ, "read"),
                (crate::scopes::PERM_UPDATE, "update"),
                (crate::scopes::PERM_DELETE, "delete"),
                (crate::scopes::PERM_SEARCH, "search"),
            ] {
                if r.permissions & bit != 0 {
                    verbs.push(v);
                }
            }
            let what = if r.resource_type == "*" {
                "all record types".to_string()
            } else {
                format!("{} records", r.resource_type)
            };
            let whose = match r.context {
                ScopeContext::Patient => "of the selected patient",
                ScopeContext::User => "you can access",
                ScopeContext::System => "(system-wide)",
            };
            let only = if r.filter.is_empty() {
                String::new()
            } else {
                let f: Vec<String> = r.filter.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!(", only where {}", f.join(" and "))
            };
            let mut v = verbs.join(", ");
            if let Some(first) = v.get(..1) {
                v = first.to_uppercase() + v.get(1..).unwrap_or("");
            }
            format!("{v} {what} {whose}{only}")
        }
        Scope::OpenId => "Confirm your identity (OpenID Connect)".into(),
        Scope::FhirUser => "Know which FHIR user record is yours".into(),
        Scope::Profile => "See your basic profile".into(),
        Scope::Launch | Scope::LaunchPatient | Scope::LaunchEncounter => {
            "Receive the launch context (patient / encounter)".into()
        }
        Scope::OfflineAccess => "Keep access after you sign out (offline access)".into(),
        Scope::OnlineAccess => "Keep access while you are signed in".into(),
        Scope::Other(o) => format!("Other permission: {o}"),
    }
}

// ---------------------------------------------------------------------------------------------
// discovery
// ---------------------------------------------------------------------------------------------

const CAPABILITIES: &[&str] = &[
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-banner",
    "context-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-standalone-encounter",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
];

const SCOPES_SUPPORTED: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "user/*.cruds",
    "system/*.cruds",
    "patient/*.read",
    "patient/*.write",
    "user/*.read",
    "user/*.write",
    "system/*.read",
    "system/*.write",
];

/// The `.well-known/smart-configuration` document.
pub fn smart_configuration_document(state: &AuthState) -> Value {
    let c = state.config();
    let mut doc = json!({
        "issuer": c.issuer,
        "jwks_uri": c.endpoint("/auth/jwks"),
        "authorization_endpoint": c.endpoint("/auth/authorize"),
        "token_endpoint": c.token_endpoint(),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "introspection_endpoint": c.endpoint("/auth/introspect"),
        "revocation_endpoint": c.endpoint("/auth/revoke"),
        "userinfo_endpoint": c.endpoint("/auth/userinfo"),
        "code_challenge_methods_supported": ["S256"],
        "capabilities": CAPABILITIES,
    });
    if c.dynamic_registration {
        doc["registration_endpoint"] = Value::String(c.endpoint("/auth/register"));
    }
    doc
}

async fn smart_configuration(State(state): State<AuthState>) -> Response {
    cors_any(json_response(
        StatusCode::OK,
        smart_configuration_document(&state),
    ))
}

async fn openid_configuration(State(state): State<AuthState>) -> Response {
    let c = state.config();
    let mut doc = json!({
        "issuer": c.issuer,
        "authorization_endpoint": c.endpoint("/auth/authorize"),
        "token_endpoint": c.token_endpoint(),
        "jwks_uri": c.endpoint("/auth/jwks"),
        "userinfo_endpoint": c.endpoint("/auth/userinfo"),
        "scopes_supported": ["openid", "fhirUser", "profile", "offline_access"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "name", "preferred_username"],
    });
    if c.dynamic_registration {
        doc["registration_endpoint"] = Value::String(c.endpoint("/auth/register"));
    }
    cors_any(json_response(StatusCode::OK, doc))
}

async fn jwks(State(state): State<AuthState>) -> Response {
    let mut resp = cors_any(json_response(StatusCode::OK, state.key_ring().jwks()));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

async fn smart_style() -> Response {
    cors_any(json_response(
        StatusCode::OK,
        json!({
            "color_background": "#ffffff",
            "color_error": "#aa0000",
            "color_highlight": "#1a5fb4",
            "color_modal_backdrop": "",
            "color_success": "#2e7d32",
            "color_text": "#111111",
            "dim_border_radius": "4px",
            "dim_font_size": "16px",
            "dim_spacing_size": "16px",
            "font_family_body": "system-ui, sans-serif",
            "font_family_heading": "system-ui, sans-serif"
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// authorization endpoint
// ---------------------------------------------------------------------------------------------

async fn authorize_get(
    State(state): State<AuthState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    authorize(&state, &headers, FormData(q)).await
}

async fn authorize_post(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorize(&state, &headers, FormData::parse(&body)).await
}

async fn authorize(state: &AuthState, headers: &HeaderMap, f: FormData) -> Response {
    let store = state.store();
    let Some(client_id) = f.non_empty("client_id") else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "client_id is missing.",
        );
    };
    let client = match store.get_client(client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "Unknown client_id.",
            )
        }
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
    };
    let redirect_uri = match f.non_empty("redirect_uri") {
        Some(r) if client.redirect_uris.iter().any(|u| u == r) => r.to_string(),
        Some(_) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "redirect_uri is not registered for this client.",
            )
        }
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        None => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "redirect_uri is missing.",
            )
        }
    };
    let st = f.get("state");
    let fail = |e: &str, d: &str| redirect_error(&redirect_uri, st, e, d);
    if f.get("response_type") != Some("code") {
        return fail("unsupported_response_type", "response_type must be 'code'");
    }
    if !client.grant_types.iter().any(|g| g == "authorization_code") {
        return fail(
            "unauthorized_client",
            "client may not use the authorization code grant",
        );
    }
    let aud = f.non_empty("aud").or(f.non_empty("resource"));
    let base = &state.config().fhir_base_url;
    if aud.map(|a| a.trim_end_matches('/')) != Some(base.as_str()) {
        return fail("invalid_request", "aud must be this FHIR server's base URL");
    }
    if f.get("code_challenge_method") != Some("S256") {
        return fail(
            "invalid_request",
            "PKCE with code_challenge_method=S256 is required",
        );
    }
    let Some(challenge) = f
        .non_empty("code_challenge")
        .filter(|c| valid_pkce_string(c))
    else {
        return fail("invalid_request", "code_challenge missing or malformed");
    };
    let (requested, _) = ScopeSet::parse_lenient(f.get("scope").unwrap_or(""));
    let allowed = ScopeSet::parse_lenient(&client.scope).0;
    let mut scopes = requested.restrict_to(&allowed);
    let mut context = LaunchContext::default();
    let mut launch_id = None;
    let mut launch_username = None;
    if let Some(l) = f.non_empty("launch") {
        match store.get_launch(l).await {
            Ok(Some(launch)) => {
                if launch
                    .client_id
                    .as_deref()
                    .is_some_and(|c| c != client.client_id)
                {
                    return fail("invalid_request", "this launch is for another client");
                }
                context = launch.context;
                launch_id = Some(l.to_string());
                launch_username = launch.username;
            }
            Ok(None) => return fail("invalid_request", "unknown or expired launch"),
            Err(e) => return fail("server_error", &e.to_string()),
        }
    } else {
        scopes.0.retain(|s| *s != Scope::Launch);
    }
    if scopes.iter().all(|s| matches!(s, Scope::Other(_))) {
        return fail(
            "invalid_scope",
            "no requested scope can be granted to this client",
        );
    }
    let pending = PendingAuthorization {
        id: random_token(24),
        client_id: client.client_id.clone(),
        redirect_uri: redirect_uri.clone(),
        requested_scope: scopes.to_string(),
        state: st.map(str::to_string),
        code_challenge: challenge.to_string(),
        nonce: f.non_empty("nonce").map(str::to_string),
        context,
        launch_id,
        launch_username,
        encounter_chosen: false,
        csrf: random_token(24),
        expires_at: now() + 1800,
    };
    if let Err(e) = store.put_pending(&pending).await {
        return fail("server_error", &e.to_string());
    }
    match current_session(state, headers).await {
        Some((_, user)) => redirect(&next_step(state, &pending, &user)),
        None => redirect(&with_query(
            &state.config().endpoint("/auth/login"),
            &[("req", &pending.id)],
        )),
    }
}

fn needs_patient(p: &PendingAuthorization) -> bool {
    if p.context.patient.is_some() {
        return false;
    }
    let (s, _) = ScopeSet::parse_lenient(&p.requested_scope);
    s.contains(&Scope::LaunchPatient) || s.has_context(ScopeContext::Patient)
}

fn patient_of_user(user: &User) -> Option<&str> {
    user.fhir_user
        .as_deref()
        .and_then(|f| f.rsplit_once("Patient/").map(|(_, id)| id))
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// A standalone launch asked for `launch/encounter`, the patient is chosen, and the encounter
/// picker has not been answered yet (SMART 2.2: the server SHOULD provide the encounter).
fn needs_encounter(p: &PendingAuthorization) -> bool {
    if p.launch_id.is_some()
        || p.encounter_chosen
        || p.context.encounter.is_some()
        || p.context.patient.is_none()
    {
        return false;
    }
    let (s, _) = ScopeSet::parse_lenient(&p.requested_scope);
    s.contains(&Scope::LaunchEncounter)
}

/// The page after login / the patient picker: patient picker, encounter picker or consent.
fn next_step(state: &AuthState, p: &PendingAuthorization, _user: &User) -> String {
    let path = if needs_patient(p) {
        "/auth/select-patient"
    } else if needs_encounter(p) {
        "/auth/select-encounter"
    } else {
        "/auth/consent"
    };
    with_query(&state.config().endpoint(path), &[("req", &p.id)])
}

/// The patients `user` may choose in the picker: administrators and practitioners any; a
/// Patient user themself and their linked patients; anyone else only their linked patients.
fn patient_visibility(user: &User) -> crate::PatientVisibility {
    let practitioner = user.fhir_user.as_deref().is_some_and(|f| {
        let f = f.trim_end_matches('/');
        let ty = f.rsplit('/').nth(1).unwrap_or("");
        ty == "Practitioner" || ty == "PractitionerRole"
    });
    if user.admin || practitioner {
        return crate::PatientVisibility::Any;
    }
    let mut ids: Vec<String> = patient_of_user(user)
        .map(str::to_string)
        .into_iter()
        .collect();
    for p in &user.patients {
        if !ids.contains(p) {
            ids.push(p.clone());
        }
    }
    crate::PatientVisibility::Only(ids)
}

// ---------------------------------------------------------------------------------------------
// login
// ---------------------------------------------------------------------------------------------

async fn login_page(Query(q): Query<Vec<(String, String)>>) -> Response {
    let f = FormData(q);
    html_response(StatusCode::OK, html::login(f.get("req"), None, "", false))
}

async fn login_submit(State(state): State<AuthState>, ext: Extensions, body: Bytes) -> Response {
    let f = FormData::parse(&body);
    let req = f.non_empty("req");
    let username = f.get("username").unwrap_or("").trim().to_string();
    let password = f.get("password").unwrap_or("");
    let addr = client_addr(&ext);
    if !state.login_allowed(&format!("ip:{addr}"))
        || !state.login_allowed(&format!("user:{username}"))
    {
        return html_response(
            StatusCode::TOO_MANY_REQUESTS,
            html::login(
                req,
                Some("Too many sign-in attempts. Wait a minute and try again."),
                &username,
                false,
            ),
        );
    }
    let outcome = match verify_login(
        state.store(),
        state.config(),
        &username,
        password,
        f.get("mfa_code"),
    )
    .await
    {
        Ok(o) => o,
        Err(e) => return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
    };
    match outcome {
        LoginOutcome::Success(user) => {
            // The cookie carries the secret; the store only its hash.
            let cookie_secret = random_token(32);
            let session = Session {
                id: sha256_hex(&cookie_secret),
                username: user,
                created_at: now(),
                expires_at: now() + state.config().session_lifetime,
            };
            if let Err(e) = state.store().put_session(&session).await {
                return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
            }
            let next = match req {
                Some(r) => with_query(
                    &state.config().endpoint("/auth/select-patient"),
                    &[("req", r)],
                ),
                None => String::new(),
            };
            let mut resp = if next.is_empty() {
                html_response(
                    StatusCode::OK,
                    html::message("Signed in", "You are signed in."),
                )
            } else {
                redirect(&next)
            };
            let cookie = session_cookie(&state, &cookie_secret, state.config().session_lifetime);
            resp.headers_mut().insert(header::SET_COOKIE, cookie);
            resp
        }
        LoginOutcome::MfaRequired => html_response(
            StatusCode::OK,
            html::login(
                req,
                Some("Enter the code from your authenticator app."),
                &username,
                true,
            ),
        ),
        LoginOutcome::InvalidCredentials => html_response(
            StatusCode::UNAUTHORIZED,
            html::login(
                req,
                Some("Wrong user name, password or code."),
                &username,
                false,
            ),
        ),
        LoginOutcome::Locked => html_response(
            StatusCode::FORBIDDEN,
            html::login(
                req,
                Some("This account is temporarily locked after too many failed sign-ins."),
                &username,
                false,
            ),
        ),
    }
}

async fn logout(State(state): State<AuthState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers, SESSION_COOKIE) {
        let _ = state.store().delete_session(&sha256_hex(id)).await;
    }
    let mut resp = html_response(
        StatusCode::OK,
        html::message("Signed out", "You are signed out."),
    );
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, "", 0));
    resp
}

/// Loads the pending request for a page that needs a signed-in user.
async fn pending_for(
    state: &AuthState,
    headers: &HeaderMap,
    req: Option<&str>,
) -> Result<(PendingAuthorization, Session, User), Response> {
    let Some(req) = req else {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "Missing authorization request.",
        ));
    };
    let pending = match state.store().get_pending(req).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(error_page(
                StatusCode::BAD_REQUEST,
                "Request expired",
                "This authorization request has expired. Start again from the application.",
            ))
        }
        Err(e) => {
            return Err(error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                &e.to_string(),
            ))
        }
    };
    match current_session(state, headers).await {
        Some((s, u)) => Ok((pending, s, u)),
        None => Err(redirect(&with_query(
            &state.config().endpoint("/auth/login"),
            &[("req", req)],
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// patient picker
// ---------------------------------------------------------------------------------------------

/// The picker's list: the user's linked patients, then (when `q` is not empty) the patients
/// the directory finds by name, identifier or id among those the user may see.
async fn picker_candidates(state: &AuthState, user: &User, q: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(user.patients.len());
    for p in &user.patients {
        let name = match state.patient_directory() {
            Some(d) => d.display_name(p).await,
            None => None,
        };
        out.push((p.clone(), name.unwrap_or_else(|| format!("Patient {p}"))));
    }
    let q = q.trim();
    if q.is_empty() {
        return out;
    }
    if let Some(d) = state.patient_directory() {
        let visible = patient_visibility(user);
        for (id, name) in d.search_visible(q, &visible, 50).await {
            if visible.allows(&id) && !out.iter().any(|(i, _)| *i == id) {
                out.push((id, name));
            }
        }
    }
    out
}

async fn picker_page(
    State(state): State<AuthState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let f = FormData(q);
    let (mut pending, _s, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !needs_patient(&pending) {
        return redirect(&next_step(&state, &pending, &user));
    }
    // A patient user launches for themself.
    if let Some(id) = patient_of_user(&user) {
        pending.context.patient = Some(id.to_string());
        if let Err(e) = state.store().put_pending(&pending).await {
            return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
        }
        return redirect(&next_step(&state, &pending, &user));
    }
    let query = f.get("q").unwrap_or("");
    let candidates = picker_candidates(&state, &user, query).await;
    html_response(
        StatusCode::OK,
        html::picker(
            &pending.id,
            &pending.csrf,
            &candidates,
            query,
            user.admin,
            None,
        ),
    )
}

async fn picker_submit(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = FormData::parse(&body);
    let (mut pending, _s, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if f.get("csrf") != Some(pending.csrf.as_str()) {
        return error_page(StatusCode::FORBIDDEN, "Forbidden", "Invalid form token.");
    }
    let chosen = f
        .non_empty("patient_id")
        .or(f.non_empty("patient"))
        .map(str::trim)
        .unwrap_or("");
    let valid_id = !chosen.is_empty()
        && chosen.len() <= 64
        && chosen
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let permitted = valid_id
        && (user.admin
            || match patient_of_user(&user) {
                Some(own) => own == chosen,
                None => picker_candidates(&state, &user, chosen)
                    .await
                    .iter()
                    .any(|(id, _)| id == chosen),
            });
    if !permitted {
        let candidates = picker_candidates(&state, &user, "").await;
        return html_response(
            StatusCode::BAD_REQUEST,
            html::picker(
                &pending.id,
                &pending.csrf,
                &candidates,
                "",
                user.admin,
                Some("Choose one of the listed patients."),
            ),
        );
    }
    pending.context.patient = Some(chosen.to_string());
    if let Err(e) = state.store().put_pending(&pending).await {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
    }
    redirect(&next_step(&state, &pending, &user))
}

// ---------------------------------------------------------------------------------------------
// encounter picker (standalone launch with launch/encounter)
// ---------------------------------------------------------------------------------------------

const ENCOUNTER_PICKER_LIMIT: usize = 50;

async fn patient_encounters(state: &AuthState, patient: &str) -> Vec<crate::EncounterChoice> {
    match state.patient_directory() {
        Some(d) => d.encounters(patient, ENCOUNTER_PICKER_LIMIT).await,
        None => Vec::new(),
    }
}

async fn encounter_page(
    State(state): State<AuthState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let f = FormData(q);
    let (mut pending, _s, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !needs_encounter(&pending) {
        return redirect(&next_step(&state, &pending, &user));
    }
    let patient = pending.context.patient.clone().unwrap_or_default();
    let encounters = patient_encounters(&state, &patient).await;
    if encounters.is_empty() {
        // nothing to choose: the launch proceeds without an encounter
        pending.encounter_chosen = true;
        if let Err(e) = state.store().put_pending(&pending).await {
            return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
        }
        return redirect(&next_step(&state, &pending, &user));
    }
    let name = match state.patient_directory() {
        Some(d) => d.display_name(&patient).await,
        None => None,
    };
    html_response(
        StatusCode::OK,
        html::encounter_picker(
            &pending.id,
            &pending.csrf,
            &patient,
            name.as_deref(),
            &encounters,
            None,
        ),
    )
}

async fn encounter_submit(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = FormData::parse(&body);
    let (mut pending, _s, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if f.get("csrf") != Some(pending.csrf.as_str()) {
        return error_page(StatusCode::FORBIDDEN, "Forbidden", "Invalid form token.");
    }
    if !needs_encounter(&pending) {
        return redirect(&next_step(&state, &pending, &user));
    }
    let patient = pending.context.patient.clone().unwrap_or_default();
    let encounters = patient_encounters(&state, &patient).await;
    let chosen = f.non_empty("encounter").map(str::trim).unwrap_or("");
    // only one of the chosen patient's encounters
    if !encounters.iter().any(|e| e.id == chosen) {
        let name = match state.patient_directory() {
            Some(d) => d.display_name(&patient).await,
            None => None,
        };
        return html_response(
            StatusCode::BAD_REQUEST,
            html::encounter_picker(
                &pending.id,
                &pending.csrf,
                &patient,
                name.as_deref(),
                &encounters,
                Some("Choose one of the listed encounters."),
            ),
        );
    }
    pending.context.encounter = Some(chosen.to_string());
    pending.encounter_chosen = true;
    if let Err(e) = state.store().put_pending(&pending).await {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
    }
    redirect(&next_step(&state, &pending, &user))
}

// ---------------------------------------------------------------------------------------------
// consent
// ---------------------------------------------------------------------------------------------

async fn consent_page(
    State(state): State<AuthState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let f = FormData(q);
    let (pending, _s, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if needs_patient(&pending) || needs_encounter(&pending) {
        return redirect(&next_step(&state, &pending, &user));
    }
    let client_name = match state.store().get_client(&pending.client_id).await {
        Ok(Some(c)) => c.client_name,
        _ => pending.client_id.clone(),
    };
    let (scopes, _) = ScopeSet::parse_lenient(&pending.requested_scope);
    let items: Vec<(String, String)> = scopes
        .iter()
        .map(|s| (s.to_string(), describe_scope(s)))
        .collect();
    html_response(
        StatusCode::OK,
        html::consent(
            &pending.id,
            &pending.csrf,
            &client_name,
            user.display_name.as_deref().unwrap_or(&user.username),
            pending.context.patient.as_deref(),
            pending.context.encounter.as_deref(),
            &items,
            scopes.contains(&Scope::OfflineAccess),
        ),
    )
}

async fn consent_submit(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = FormData::parse(&body);
    let (pending, session, user) = match pending_for(&state, &headers, f.get("req")).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if f.get("csrf") != Some(pending.csrf.as_str()) {
        return error_page(StatusCode::FORBIDDEN, "Forbidden", "Invalid form token.");
    }
    if needs_encounter(&pending) {
        return redirect(&next_step(&state, &pending, &user));
    }
    // Single use from here on.
    let pending = match state.store().take_pending(&pending.id).await {
        Ok(Some(p)) => p,
        _ => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Request expired",
                "This authorization request was already answered.",
            )
        }
    };
    let st = pending.state.as_deref();
    if pending
        .launch_username
        .as_deref()
        .is_some_and(|u| u != user.username)
    {
        return redirect_error(
            &pending.redirect_uri,
            st,
            "access_denied",
            "the EHR launch was made for another user",
        );
    }
    if f.get("decision") != Some("approve") {
        return redirect_error(
            &pending.redirect_uri,
            st,
            "access_denied",
            "the user denied the request",
        );
    }
    let (requested, _) = ScopeSet::parse_lenient(&pending.requested_scope);
    let selected = f.all("scope");
    let granted = ScopeSet(
        requested
            .iter()
            .filter(|s| selected.contains(&s.to_string().as_str()))
            .cloned()
            .collect(),
    );
    if granted.is_empty() {
        return redirect_error(
            &pending.redirect_uri,
            st,
            "access_denied",
            "no scope was granted",
        );
    }
    if granted.has_context(ScopeContext::Patient) && pending.context.patient.is_none() {
        return redirect_error(
            &pending.redirect_uri,
            st,
            "invalid_request",
            "no patient selected",
        );
    }
    let mut context = pending.context.clone();
    // a standalone encounter is only handed out while launch/encounter stays granted
    if pending.launch_id.is_none() && !granted.contains(&Scope::LaunchEncounter) {
        context.encounter = None;
    }
    if context.patient.is_some() {
        context
            .need_patient_banner
            .get_or_insert(pending.launch_id.is_none());
        context
            .smart_style_url
            .get_or_insert_with(|| state.config().endpoint("/auth/smart-style.json"));
    }
    let code = random_token(32);
    let record = AuthorizationCode {
        client_id: pending.client_id.clone(),
        redirect_uri: pending.redirect_uri.clone(),
        code_challenge: pending.code_challenge.clone(),
        scope: granted.to_string(),
        username: user.username.clone(),
        context,
        nonce: pending.nonce.clone(),
        session_id: session.id.clone(),
        auth_time: session.created_at,
        expires_at: now() + state.config().code_lifetime.min(600),
    };
    if let Err(e) = state.store().put_code(&sha256_hex(&code), &record).await {
        return redirect_error(&pending.redirect_uri, st, "server_error", &e.to_string());
    }
    let mut params = vec![("code", code.as_str())];
    if let Some(s) = st {
        params.push(("state", s));
    }
    redirect(&with_query(&pending.redirect_uri, &params))
}

// ---------------------------------------------------------------------------------------------
// token endpoint
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct IdTokenClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    auth_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    fhir_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    preferred_username: &'a str,
}

struct Issue<'a> {
    client: &'a Client,
    scope: &'a ScopeSet,
    user: Option<&'a User>,
    context: &'a LaunchContext,
    grant_id: &'a str,
    lifetime: i64,
    nonce: Option<&'a str>,
    auth_time: i64,
}

/// Signs an access token (and id_token when `openid` was granted); builds the response body.
fn issue_tokens(state: &AuthState, i: &Issue<'_>) -> Result<Map<String, Value>, OAuthError> {
    let c = state.config();
    let now = now();
    let fhir_user = i
        .user
        .and_then(|u| u.fhir_user.as_deref())
        .map(|f| absolute_fhir_user(state, f));
    let claims = AccessToken {
        iss: c.issuer.clone(),
        sub: i
            .user
            .map(|u| u.username.clone())
            .unwrap_or_else(|| i.client.client_id.clone()),
        aud: c.fhir_base_url.clone(),
        exp: now + i.lifetime,
        iat: now,
        jti: random_token(16),
        client_id: i.client.client_id.clone(),
        scope: i.scope.to_string(),
        gid: Some(i.grant_id.to_string()),
        fhir_user: if i.scope.contains(&Scope::FhirUser) || i.scope.contains(&Scope::OpenId) {
            fhir_user.clone()
        } else {
            None
        },
        patient: i.context.patient.clone(),
        encounter: i.context.encounter.clone(),
        fhir_context: i.context.fhir_context.clone(),
        tenant: i.context.tenant.clone(),
        intent: i.context.intent.clone(),
    };
    let access = sign(state, &claims).map_err(OAuthError::server_error)?;
    let mut body = Map::new();
    body.insert("access_token".into(), Value::String(access));
    body.insert("token_type".into(), Value::String("Bearer".into()));
    body.insert("expires_in".into(), json!(i.lifetime));
    body.insert("scope".into(), Value::String(i.scope.to_string()));
    if let (true, Some(user)) = (i.scope.contains(&Scope::OpenId), i.user) {
        let id = IdTokenClaims {
            iss: &c.issuer,
            sub: &user.username,
            aud: &i.client.client_id,
            exp: now + i.lifetime,
            iat: now,
            auth_time: i.auth_time,
            nonce: i.nonce,
            fhir_user: if i.scope.contains(&Scope::FhirUser) {
                fhir_user
            } else {
                None
            },
            name: if i.scope.contains(&Scope::Profile) {
                user.display_name.as_deref()
            } else {
                None
            },
            preferred_username: &user.username,
        };
        body.insert(
            "id_token".into(),
            Value::String(sign(state, &id).map_err(OAuthError::server_error)?),
        );
    }
    if let Value::Object(ctx) = serde_json::to_value(i.context).unwrap_or(Value::Null) {
        for (k, v) in ctx {
            body.insert(k, v);
        }
    }
    Ok(body)
}

async fn token(
    State(state): State<AuthState>,
    ext: Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match token_inner(&state, &ext, &headers, &body).await {
        Ok(v) => json_response(StatusCode::OK, Value::Object(v)),
        Err(e) => e.into_response(),
    };
    cors_reflect(&headers, no_store(resp))
}

fn credentials(f: &FormData) -> ClientCredentials<'_> {
    ClientCredentials {
        client_id: f.non_empty("client_id"),
        client_secret: f.non_empty("client_secret"),
        assertion_type: f.non_empty("client_assertion_type"),
        assertion: f.non_empty("client_assertion"),
    }
}

async fn token_inner(
    state: &AuthState,
    ext: &Extensions,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Map<String, Value>, OAuthError> {
    if !state.token_allowed(&client_addr(ext)) {
        return Err(OAuthError::slow_down());
    }
    let ct_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !ct_ok {
        return Err(OAuthError::invalid_request(
            "body must be application/x-www-form-urlencoded",
        ));
    }
    let f = FormData::parse(body);
    let grant_type = f
        .non_empty("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("grant_type missing"))?;
    if !["authorization_code", "refresh_token", "client_credentials"].contains(&grant_type) {
        return Err(OAuthError::unsupported_grant_type(format!(
            "unsupported grant_type {grant_type}"
        )));
    }
    let (client, proof) = authenticate_client(state, headers, credentials(&f)).await?;
    if !client.grant_types.iter().any(|g| g == grant_type) {
        return Err(OAuthError::unauthorized_client(format!(
            "client may not use {grant_type}"
        )));
    }
    match grant_type {
        "authorization_code" => grant_authorization_code(state, &client, &f).await,
        "refresh_token" => grant_refresh_token(state, &client, &f).await,
        _ => grant_client_credentials(state, &client, &proof, &f).await,
    }
}

async fn grant_authorization_code(
    state: &AuthState,
    client: &Client,
    f: &FormData,
) -> Result<Map<String, Value>, OAuthError> {
    let store = state.store();
    let code = f
        .non_empty("code")
        .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
    let redirect_uri = f
        .non_empty("redirect_uri")
        .ok_or_else(|| OAuthError::invalid_request("redirect_uri missing"))?;
    let verifier = f.get("code_verifier").unwrap_or("");
    // Single use: taken (deleted) before any other check.
    let record = store
        .take_code(&sha256_hex(code))
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("invalid, expired or already used code"))?;
    if record.client_id != client.client_id {
        return Err(OAuthError::invalid_grant(
            "code was issued to another client",
        ));
    }
    if record.redirect_uri != redirect_uri {
        return Err(OAuthError::invalid_grant(
            "redirect_uri does not match the authorization request",
        ));
    }
    if !valid_pkce_string(verifier) || !crate::ct_eq(&pkce_s256(verifier), &record.code_challenge) {
        return Err(OAuthError::invalid_grant(
            "PKCE code_verifier is missing or wrong",
        ));
    }
    let user = store
        .get_user(&record.username)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("user no longer exists"))?;
    let (scope, _) = ScopeSet::parse_lenient(&record.scope);
    let grant_id = random_token(16);
    let mut body = issue_tokens(
        state,
        &Issue {
            client,
            scope: &scope,
            user: Some(&user),
            context: &record.context,
            grant_id: &grant_id,
            lifetime: state.config().token_lifetime,
            nonce: record.nonce.as_deref(),
            auth_time: record.auth_time,
        },
    )?;
    let offline = scope.contains(&Scope::OfflineAccess);
    let online = scope.contains(&Scope::OnlineAccess);
    if (offline || online) && client.grant_types.iter().any(|g| g == "refresh_token") {
        let session_expiry = match store.get_session(&record.session_id).await? {
            Some(s) => s.expires_at,
            None => now(),
        };
        let rt = RefreshTokenRecord {
            grant_id,
            client_id: client.client_id.clone(),
            scope: scope.to_string(),
            username: Some(user.username.clone()),
            context: record.context.clone(),
            session_id: (!offline).then(|| record.session_id.clone()),
            issued_at: now(),
            expires_at: if offline {
                now() + state.config().refresh_token_lifetime
            } else {
                session_expiry
            },
        };
        let token = random_token(32);
        store.put_refresh_token(&sha256_hex(&token), &rt).await?;
        body.insert("refresh_token".into(), Value::String(token));
    }
    Ok(body)
}

async fn grant_refresh_token(
    state: &AuthState,
    client: &Client,
    f: &FormData,
) -> Result<Map<String, Value>, OAuthError> {
    let store = state.store();
    let token = f
        .non_empty("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
    let hash = sha256_hex(token);
    let tombstone = format!("rotated:{hash}");
    let Some(record) = store.get_refresh_token(&hash).await? else {
        // A rotated-out token presented again signals theft: revoke the whole grant.
        if state.config().refresh_reuse_detection {
            if let Some(v) = store.get(RecordKind::RevokedToken, &tombstone).await? {
                if let Some(gid) = v.get("gid").and_then(Value::as_str) {
                    store
                        .revoke_token_id(gid, now() + state.config().refresh_token_lifetime)
                        .await?;
                }
            }
        }
        return Err(OAuthError::invalid_grant(
            "invalid or expired refresh token",
        ));
    };
    if record.client_id != client.client_id {
        return Err(OAuthError::invalid_grant(
            "refresh token was issued to another client",
        ));
    }
    if store.is_token_id_revoked(&record.grant_id).await? {
        return Err(OAuthError::invalid_grant("refresh token revoked"));
    }
    if let Some(sid) = &record.session_id {
        if store.get_session(sid).await?.is_none() {
            return Err(OAuthError::invalid_grant(
                "the user session ended (online_access)",
            ));
        }
    }
    let original = ScopeSet::parse_lenient(&record.scope).0;
    let scope = match f.non_empty("scope") {
        None => original.clone(),
        Some(s) => {
            let requested =
                ScopeSet::parse_strict(s).map_err(|e| OAuthError::invalid_scope(e.to_string()))?;
            if !requested.is_subset_of(&original) {
                return Err(OAuthError::invalid_scope(
                    "requested scope exceeds the original grant",
                ));
            }
            requested
        }
    };
    let user = match &record.username {
        Some(u) => Some(
            store
                .get_user(u)
                .await?
                .ok_or_else(|| OAuthError::invalid_grant("user no longer exists"))?,
        ),
        None => None,
    };
    // Rotation: the presented token is consumed atomically.
    store
        .take_refresh_token(&hash)
        .await?
        .ok_or_else(|| OAuthError::invalid_grant("refresh token already used"))?;
    if state.config().refresh_reuse_detection {
        store
            .put(
                RecordKind::RevokedToken,
                &tombstone,
                &json!({"gid": record.grant_id}),
                Some(record.expires_at),
            )
            .await?;
    }
    let mut body = issue_tokens(
        state,
        &Issue {
            client,
            scope: &scope,
            user: user.as_ref(),
            context: &record.context,
            grant_id: &record.grant_id,
            lifetime: state.config().token_lifetime,
            nonce: None,
            auth_time: record.issued_at,
        },
    )?;
    let offline = record.session_id.is_none();
    let next = RefreshTokenRecord {
        issued_at: now(),
        expires_at: if offline {
            now() + state.config().refresh_token_lifetime
        } else {
            record.expires_at
        },
        ..record
    };
    let new_token = random_token(32);
    store
        .put_refresh_token(&sha256_hex(&new_token), &next)
        .await?;
    body.insert("refresh_token".into(), Value::String(new_token));
    Ok(body)
}

async fn grant_client_credentials(
    state: &AuthState,
    client: &Client,
    proof: &ClientProof,
    f: &FormData,
) -> Result<Map<String, Value>, OAuthError> {
    if *proof == ClientProof::Public {
        return Err(OAuthError::invalid_client(
            "client_credentials requires client authentication",
        ));
    }
    let requested = f
        .non_empty("scope")
        .ok_or_else(|| OAuthError::invalid_scope("scope is required"))?;
    let (requested, _) = ScopeSet::parse_lenient(requested);
    let system_only = ScopeSet(
        requested
            .iter()
            .filter(|s| matches!(s, Scope::Resource(r) if r.context == ScopeContext::System))
            .cloned()
            .collect(),
    );
    let allowed = ScopeSet::parse_lenient(&client.scope).0;
    let granted = system_only.restrict_to(&allowed);
    if granted.is_empty() {
        return Err(OAuthError::invalid_scope(
            "none of the requested system scopes is allowed for this client",
        ));
    }
    issue_tokens(
        state,
        &Issue {
            client,
            scope: &granted,
            user: None,
            context: &LaunchContext::default(),
            grant_id: &random_token(16),
            lifetime: state.config().backend_token_lifetime,
            nonce: None,
            auth_time: now(),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// introspection, revocation, userinfo
// ---------------------------------------------------------------------------------------------

async fn introspect(
    State(state): State<AuthState>,
    ext: Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match introspect_inner(&state, &ext, &headers, &body).await {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => e.into_response(),
    };
    cors_reflect(&headers, no_store(resp))
}

async fn introspect_inner(
    state: &AuthState,
    ext: &Extensions,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, OAuthError> {
    if !state.token_allowed(&client_addr(ext)) {
        return Err(OAuthError::slow_down());
    }
    let f = FormData::parse(body);
    if state.config().introspection_requires_auth {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let authorized = match bearer {
            Some(t) => verify_active_access_token(state, t).await.is_ok(),
            None => matches!(
                authenticate_client(state, headers, credentials(&f)).await,
                Ok((_, ClientProof::Secret | ClientProof::Assertion))
            ),
        };
        if !authorized {
            return Err(OAuthError::invalid_client(
                "introspection requires a bearer token or client authentication",
            ));
        }
    }
    let Some(token) = f.non_empty("token") else {
        return Err(OAuthError::invalid_request("token missing"));
    };
    if let Ok(c) = verify_active_access_token(state, token).await {
        let mut v = json!({
            "active": true,
            "scope": c.scope,
            "client_id": c.client_id,
            "exp": c.exp,
            "iat": c.iat,
            "iss": c.iss,
            "sub": c.sub,
            "aud": c.aud,
            "token_type": "Bearer",
        });
        if c.sub != c.client_id {
            v["username"] = Value::String(c.sub.clone());
        }
        if let Some(fu) = &c.fhir_user {
            v["fhirUser"] = Value::String(fu.clone());
        }
        if let Value::Object(ctx) = serde_json::to_value(c.context()).unwrap_or(Value::Null) {
            for (k, val) in ctx {
                v[k] = val;
            }
        }
        return Ok(v);
    }
    let store = state.store();
    if let Some(r) = store.get_refresh_token(&sha256_hex(token)).await? {
        if !store.is_token_id_revoked(&r.grant_id).await? {
            let mut v = json!({
                "active": true,
                "scope": r.scope,
                "client_id": r.client_id,
                "exp": r.expires_at,
                "iat": r.issued_at,
                "iss": state.config().issuer,
                "token_type": "refresh_token",
            });
            if let Some(u) = &r.username {
                v["sub"] = Value::String(u.clone());
            }
            return Ok(v);
        }
    }
    Ok(json!({"active": false}))
}

async fn revoke(
    State(state): State<AuthState>,
    ext: Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = match revoke_inner(&state, &ext, &headers, &body).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    };
    cors_reflect(&headers, no_store(resp))
}

async fn revoke_inner(
    state: &AuthState,
    ext: &Extensions,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), OAuthError> {
    if !state.token_allowed(&client_addr(ext)) {
        return Err(OAuthError::slow_down());
    }
    let f = FormData::parse(body);
    let (client, _) = authenticate_client(state, headers, credentials(&f)).await?;
    let token = f
        .non_empty("token")
        .ok_or_else(|| OAuthError::invalid_request("token missing"))?;
    let store = state.store();
    let grant_expiry = now() + state.config().refresh_token_lifetime;
    if let Ok(c) = verify_access_token(state, token) {
        if c.client_id == client.client_id {
            store.revoke_token_id(&c.jti, c.exp + 60).await?;
            if let Some(gid) = &c.gid {
                store.revoke_token_id(gid, grant_expiry).await?;
            }
        }
        return Ok(());
    }
    let hash = sha256_hex(token);
    if let Some(r) = store.get_refresh_token(&hash).await? {
        if r.client_id == client.client_id {
            store.take_refresh_token(&hash).await?;
            store
                .revoke_token_id(&r.grant_id, grant_expiry.max(r.expires_at))
                .await?;
        }
    }
    // RFC 7009 §2.2: unknown tokens are not an error.
    Ok(())
}

async fn userinfo(State(state): State<AuthState>, headers: HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let grant = match crate::authorize_bearer(&state, auth).await {
        Ok(g) => g,
        Err(e) => return cors_reflect(&headers, e.into_response()),
    };
    if !grant.scopes.contains(&Scope::OpenId) {
        return cors_reflect(
            &headers,
            crate::AuthError::Forbidden("openid scope required".into()).into_response(),
        );
    }
    let user = state.store().get_user(grant.subject()).await.ok().flatten();
    let mut v = json!({"sub": grant.subject()});
    if let Some(u) = user {
        v["preferred_username"] = Value::String(u.username.clone());
        if let Some(n) = &u.display_name {
            v["name"] = Value::String(n.clone());
        }
        if let Some(f) = &u.fhir_user {
            v["fhirUser"] = Value::String(absolute_fhir_user(&state, f));
        }
    }
    cors_reflect(&headers, no_store(json_response(StatusCode::OK, v)))
}

// ---------------------------------------------------------------------------------------------
// dynamic registration (RFC 7591)
// ---------------------------------------------------------------------------------------------

fn registration_error(error: &str, d: &str) -> Response {
    no_store(json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": error, "error_description": d}),
    ))
}

async fn register(State(state): State<AuthState>, headers: HeaderMap, body: Bytes) -> Response {
    let c = state.config();
    if !c.dynamic_registration {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "error_description": "dynamic registration is disabled"}),
        );
    }
    if let Some(expected) = &c.registration_access_token {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if !got.is_some_and(|g| crate::ct_eq(g, expected)) {
            let mut resp =
                json_response(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}));
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let Ok(meta) = serde_json::from_slice::<Value>(&body) else {
        return registration_error("invalid_client_metadata", "body must be a JSON object");
    };
    let Some(obj) = meta.as_object() else {
        return registration_error("invalid_client_metadata", "body must be a JSON object");
    };
    let strings = |k: &str| -> Option<Vec<String>> {
        obj.get(k).map(|v| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        })
    };
    let method = match obj
        .get("token_endpoint_auth_method")
        .and_then(Value::as_str)
    {
        None => None,
        Some("none") => Some(ClientAuthMethod::None),
        Some("client_secret_basic") | Some("client_secret_post") => {
            Some(ClientAuthMethod::ClientSecretBasic)
        }
        Some("private_key_jwt") => Some(ClientAuthMethod::PrivateKeyJwt),
        Some(other) => {
            return registration_error(
                "invalid_client_metadata",
                &format!("unsupported token_endpoint_auth_method {other}"),
            )
        }
    };
    let new = NewClient {
        client_id: None,
        client_name: obj
            .get("client_name")
            .and_then(Value::as_str)
            .unwrap_or("Unnamed application")
            .to_string(),
        redirect_uris: strings("redirect_uris").unwrap_or_default(),
        auth_method: method,
        jwks: obj.get("jwks").cloned(),
        jwks_uri: obj
            .get("jwks_uri")
            .and_then(Value::as_str)
            .map(str::to_string),
        scope: obj.get("scope").and_then(Value::as_str).map(str::to_string),
        grant_types: strings("grant_types").unwrap_or_default(),
        launch_uri: obj
            .get("launch_uri")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    match add_client(state.store(), new).await {
        Ok(reg) => {
            let cl = &reg.client;
            let mut v = json!({
                "client_id": cl.client_id,
                "client_id_issued_at": cl.created_at,
                "client_name": cl.client_name,
                "redirect_uris": cl.redirect_uris,
                "grant_types": cl.grant_types,
                "token_endpoint_auth_method": cl.auth_method.as_str(),
                "scope": cl.scope,
            });
            if let Some(s) = reg.client_secret {
                v["client_secret"] = Value::String(s);
                v["client_secret_expires_at"] = json!(0);
            }
            if let Some(j) = &cl.jwks {
                v["jwks"] = j.clone();
            }
            if let Some(u) = &cl.jwks_uri {
                v["jwks_uri"] = Value::String(u.clone());
            }
            no_store(json_response(StatusCode::CREATED, v))
        }
        Err(ClientError::Invalid(d)) if d.contains("redirect_uri") => {
            registration_error("invalid_redirect_uri", &d)
        }
        Err(ClientError::Invalid(d)) => registration_error("invalid_client_metadata", &d),
        Err(ClientError::Store(e)) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "server_error", "error_description": e.to_string()}),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// EHR launch API (admin)
// ---------------------------------------------------------------------------------------------

async fn is_admin(state: &AuthState, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if let Some(t) = bearer {
        if state
            .config()
            .admin_api_key
            .as_deref()
            .is_some_and(|k| crate::ct_eq(k, t))
        {
            return true;
        }
        if let Ok(c) = verify_active_access_token(state, t).await {
            if c.sub != c.client_id {
                if let Ok(Some(u)) = state.store().get_user(&c.sub).await {
                    return u.admin;
                }
            }
        }
        return false;
    }
    current_session(state, headers)
        .await
        .is_some_and(|(_, u)| u.admin)
}

/// `POST /auth/launch` with JSON `{patient?, encounter?, fhirContext?, need_patient_banner?,
/// smart_style_url?, intent?, tenant?, username?, client_id?}` (username/client_id bind the launch) → `201 {"launch": id, "iss": base, "expires_in"}`.
async fn create_launch(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_admin(&state, &headers).await {
        return crate::AuthError::Unauthorized {
            error: Some("invalid_token"),
            description: "admin credentials required".into(),
        }
        .into_response();
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "JSON object expected"}),
            )
        }
    };
    let mut context: LaunchContext = match serde_json::from_value(v.clone()) {
        Ok(c) => c,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": e.to_string()}),
            )
        }
    };
    if let Some(fc) = &context.fhir_context {
        let ok = fc.as_array().is_some_and(|a| {
            a.iter().all(|o| {
                o.as_object().is_some_and(|m| {
                    ["reference", "canonical", "identifier"]
                        .iter()
                        .any(|k| m.contains_key(*k))
                        && !m.get("reference").and_then(Value::as_str).is_some_and(|r| {
                            r.starts_with("Patient/") || r.starts_with("Encounter/")
                        })
                })
            })
        });
        if !ok {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "fhirContext must be an array of objects with reference/canonical/identifier (not Patient/Encounter)"}),
            );
        }
    }
    context.need_patient_banner.get_or_insert(true);
    let launch = EhrLaunch {
        launch_id: random_token(24),
        context,
        username: v
            .get("username")
            .and_then(Value::as_str)
            .map(str::to_string),
        client_id: v
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string),
        created_at: now(),
        expires_at: now() + state.config().launch_lifetime,
    };
    if let Err(e) = state.store().put_launch(&launch).await {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "server_error", "error_description": e.to_string()}),
        );
    }
    no_store(json_response(
        StatusCode::CREATED,
        json!({"launch": launch.launch_id, "iss": state.config().fhir_base_url, "expires_in": state.config().launch_lifetime}),
    ))
}

// ---------------------------------------------------------------------------------------------
// account pages: TOTP enrolment, password reset
// ---------------------------------------------------------------------------------------------

fn session_csrf(session: &Session) -> String {
    sha256_hex(&format!("csrf:{}", session.id))
}

async fn mfa_page(State(state): State<AuthState>, headers: HeaderMap) -> Response {
    let Some((session, user)) = current_session(&state, &headers).await else {
        return redirect(&state.config().endpoint("/auth/login"));
    };
    html_response(
        StatusCode::OK,
        html::mfa_status(
            &session_csrf(&session),
            user.totp_enabled,
            user.recovery_codes.len(),
        ),
    )
}

async fn mfa_submit(State(state): State<AuthState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some((session, user)) = current_session(&state, &headers).await else {
        return redirect(&state.config().endpoint("/auth/login"));
    };
    let f = FormData::parse(&body);
    let csrf = session_csrf(&session);
    if f.get("csrf") != Some(csrf.as_str()) {
        return error_page(StatusCode::FORBIDDEN, "Forbidden", "Invalid form token.");
    }
    let store = state.store();
    match f.get("action") {
        Some("enrol") => match crate::users::enrol_totp(store, &user.username, "Kiln").await {
            Ok(e) => html_response(
                StatusCode::OK,
                html::mfa_enrol(&csrf, &e.secret, &e.otpauth_uri, None),
            ),
            Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
        },
        Some("confirm") => {
            match crate::users::confirm_totp(store, &user.username, f.get("code").unwrap_or(""))
                .await
            {
                Ok(codes) => html_response(StatusCode::OK, html::mfa_recovery_codes(&codes)),
                Err(crate::users::UserError::Invalid(msg)) => {
                    let secret = user.totp_secret.clone().unwrap_or_default();
                    html_response(
                        StatusCode::BAD_REQUEST,
                        html::mfa_enrol(&csrf, &secret, "", Some(&msg)),
                    )
                }
                Err(e) => error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
            }
        }
        _ => error_page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "Unknown action.",
        ),
    }
}

async fn reset_page(Query(q): Query<Vec<(String, String)>>) -> Response {
    let f = FormData(q);
    html_response(
        StatusCode::OK,
        html::password_reset(f.get("token").unwrap_or(""), None),
    )
}

async fn reset_submit(State(state): State<AuthState>, ext: Extensions, body: Bytes) -> Response {
    if !state.login_allowed(&format!("ip:{}", client_addr(&ext))) {
        return error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            "Wait a minute and try again.",
        );
    }
    let f = FormData::parse(&body);
    let token = f.get("token").unwrap_or("");
    match crate::users::reset_password(state.store(), token, f.get("password").unwrap_or("")).await
    {
        Ok(_) => html_response(
            StatusCode::OK,
            html::message(
                "Password changed",
                "Your password was changed. You can sign in now.",
            ),
        ),
        Err(crate::users::UserError::Store(e)) => {
            error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string())
        }
        Err(e) => html_response(
            StatusCode::BAD_REQUEST,
            html::password_reset(token, Some(&e.to_string())),
        ),
    }
}

/// `GET /auth/ehr-launch?client_id=..&patient=..[&encounter=..]`: acts as the EHR for a signed-in
/// user: creates a launch context and redirects the browser to the client's registered
/// `launch_uri?iss={base}&launch={id}`.
async fn ehr_launch_redirect(
    State(state): State<AuthState>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let f = FormData(q);
    let Some((_, user)) = current_session(&state, &headers).await else {
        return redirect(&state.config().endpoint("/auth/login"));
    };
    let client = match f.non_empty("client_id") {
        Some(id) => match state.store().get_client(id).await {
            Ok(Some(c)) => c,
            _ => {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    "Invalid request",
                    "Unknown client_id.",
                )
            }
        },
        None => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "Invalid request",
                "client_id is missing.",
            )
        }
    };
    let Some(launch_uri) = client.launch_uri.clone() else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "This client has no registered launch_uri.",
        );
    };
    let patient = f.non_empty("patient").map(str::to_string);
    if let Some(p) = &patient {
        let allowed = user.admin
            || patient_of_user(&user) == Some(p.as_str())
            || user.patients.iter().any(|x| x == p);
        if !allowed {
            return error_page(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "You may not launch for this patient.",
            );
        }
    }
    let launch = EhrLaunch {
        launch_id: random_token(24),
        context: LaunchContext {
            patient,
            encounter: f.non_empty("encounter").map(str::to_string),
            need_patient_banner: Some(true),
            ..Default::default()
        },
        username: Some(user.username.clone()),
        client_id: Some(client.client_id.clone()),
        created_at: now(),
        expires_at: now() + state.config().launch_lifetime,
    };
    if let Err(e) = state.store().put_launch(&launch).await {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string());
    }
    redirect(&with_query(
        &launch_uri,
        &[
            ("iss", &state.config().fhir_base_url),
            ("launch", &launch.launch_id),
        ],
    ))
}

/// The `rest.security` element for the server's CapabilityStatement (SMART `oauth-uris`).
pub fn capability_security(state: &AuthState) -> Value {
    let c = state.config();
    let mut ext = vec![
        json!({"url": "authorize", "valueUri": c.endpoint("/auth/authorize")}),
        json!({"url": "token", "valueUri": c.token_endpoint()}),
        json!({"url": "introspect", "valueUri": c.endpoint("/auth/introspect")}),
        json!({"url": "revoke", "valueUri": c.endpoint("/auth/revoke")}),
    ];
    if c.dynamic_registration {
        ext.push(json!({"url": "register", "valueUri": c.endpoint("/auth/register")}));
    }
    json!({
        "cors": true,
        "service": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
        }],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": ext
        }]
    })
}
