#![allow(dead_code)]
//! Test harness: an in-memory authorization server driven over real HTTP requests (`oneshot`).

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kiln_smart_auth::keys::generate_rsa_key;
use kiln_smart_auth::store::SigningKeyRecord;
use kiln_smart_auth::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

pub const BASE: &str = "http://localhost:8080/fhir";
pub const REDIRECT: &str = "https://app.example.org/callback";
pub const ADMIN_KEY: &str = "admin-secret-key";

/// One RSA signing key shared by all tests (key generation is slow in debug builds).
pub fn shared_key() -> SigningKeyRecord {
    static KEY: OnceLock<SigningKeyRecord> = OnceLock::new();
    KEY.get_or_init(|| generate_rsa_key().expect("keygen"))
        .clone()
}

pub struct Server {
    pub state: AuthState,
    pub router: Router,
    pub public_client: String,
    pub secret_client: String,
    pub secret: String,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn location(&self) -> String {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
}

pub fn config() -> SmartConfig {
    let mut c = SmartConfig::new(BASE);
    c.admin_api_key = Some(ADMIN_KEY.into());
    c.dynamic_registration = true;
    c
}

pub async fn server() -> Server {
    server_with(config(), Arc::new(MemoryAuthStore::new())).await
}

pub async fn server_with(config: SmartConfig, store: Arc<dyn AuthStore>) -> Server {
    store.put_signing_key(&shared_key()).await.unwrap();
    let state = AuthState::new(config, store.clone()).await.unwrap();
    add_user(
        store.as_ref(),
        NewUser {
            username: "pat".into(),
            password: "patient-password".into(),
            fhir_user: Some("Patient/p1".into()),
            display_name: Some("Pat Patient".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    add_user(
        store.as_ref(),
        NewUser {
            username: "doc".into(),
            password: "doctor-password".into(),
            fhir_user: Some("Practitioner/dr1".into()),
            patients: vec!["p1".into(), "p2".into()],
            admin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let public = add_client(
        store.as_ref(),
        NewClient {
            client_id: Some("public-app".into()),
            client_name: "Public App".into(),
            redirect_uris: vec![REDIRECT.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let secret = add_client(
        store.as_ref(),
        NewClient {
            client_id: Some("secret-app".into()),
            client_name: "Confidential App".into(),
            redirect_uris: vec![REDIRECT.into()],
            auth_method: Some(ClientAuthMethod::ClientSecretBasic),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Server {
        router: router(state.clone()),
        state,
        public_client: public.client.client_id,
        secret_client: secret.client.client_id,
        secret: secret.client_secret.unwrap(),
    }
}

impl Server {
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub async fn get(&self, path_or_url: &str, headers: &[(&str, &str)]) -> Resp {
        let path = path_or_url.strip_prefix(BASE).unwrap_or(path_or_url);
        let mut b = Request::builder().method(Method::GET).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Resp {
        let path = path.strip_prefix(BASE).unwrap_or(path);
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::from(body)).unwrap()).await
    }

    pub async fn post_json(&self, path: &str, json: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::from(json.to_string())).unwrap())
            .await
    }

    /// Signs in and returns the session cookie (`kiln_session=...`).
    pub async fn login(&self, user: &str, password: &str) -> String {
        let r = self
            .post_form(
                "/auth/login",
                &[("username", user), ("password", password)],
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        cookie_of(&r)
    }
}

pub fn cookie_of(r: &Resp) -> String {
    let c = r.header("set-cookie").expect("Set-Cookie");
    c.split(';').next().unwrap().to_string()
}

pub fn query_param(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub fn pkce_pair() -> (String, String) {
    let verifier = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

pub fn authorize_url(
    client_id: &str,
    scope: &str,
    challenge: &str,
    state: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    ser.append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", state)
        .append_pair("aud", BASE)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    for (k, v) in extra {
        ser.append_pair(k, v);
    }
    format!("/auth/authorize?{}", ser.finish())
}

/// Extracts `name="req" value="..."` / `name="csrf" value="..."` from a page.
pub fn hidden(html: &str, name: &str) -> String {
    let pat = format!("name=\"{name}\" value=\"");
    let i = html
        .find(&pat)
        .unwrap_or_else(|| panic!("no hidden {name} in {html}"))
        + pat.len();
    html[i..].split('"').next().unwrap().to_string()
}

#[allow(clippy::too_many_arguments)]
/// Drives authorize → login → (picker) → consent and returns the code-bearing redirect URL.
/// `keep` filters the scopes left ticked on the consent page.
pub async fn run_authorization(
    s: &Server,
    client_id: &str,
    scope: &str,
    challenge: &str,
    user: (&str, &str),
    pick_patient: Option<&str>,
    extra: &[(&str, &str)],
    keep: &dyn Fn(&str) -> bool,
) -> String {
    let r = s
        .get(
            &authorize_url(client_id, scope, challenge, "st-123", extra),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let login_url = r.location();
    assert!(
        login_url.starts_with(&format!("{BASE}/auth/login?req=")),
        "{login_url}"
    );
    let req = query_param(&login_url, "req").unwrap();
    let page = s.get(&login_url, &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<label for=\"password\">"));
    let r = s
        .post_form(
            "/auth/login",
            &[("username", user.0), ("password", user.1), ("req", &req)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let cookie = cookie_of(&r);
    let mut next = r.location();
    let ck = [("cookie", cookie.as_str())];
    if next.contains("/auth/select-patient") {
        let r = s.get(&next, &ck).await;
        if r.status == StatusCode::OK {
            let patient = pick_patient.expect("picker shown but no patient to pick");
            assert!(
                r.body.contains(&format!("value=\"{patient}\"")),
                "{}",
                r.body
            );
            let csrf = hidden(&r.body, "csrf");
            let r = s
                .post_form(
                    "/auth/select-patient",
                    &[("req", &req), ("csrf", &csrf), ("patient", patient)],
                    &ck,
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
            next = r.location();
        } else {
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
            next = r.location();
        }
    }
    assert!(next.contains("/auth/consent"), "{next}");
    let r = s.get(&next, &ck).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csrf = hidden(&r.body, "csrf");
    let mut form: Vec<(&str, String)> = vec![
        ("req", req.clone()),
        ("csrf", csrf),
        ("decision", "approve".into()),
    ];
    for sc in scope.split(' ') {
        if r.body.contains(&format!("value=\"{}\"", html_escape(sc))) && keep(sc) {
            form.push(("scope", sc.to_string()));
        }
    }
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = s.post_form("/auth/consent", &pairs, &ck).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    r.location()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('"', "&quot;")
}

pub async fn exchange(s: &Server, code: &str, verifier: &str, client: &str) -> Resp {
    s.post_form(
        "/auth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", client),
        ],
        &[],
    )
    .await
}

pub fn basic(id: &str, secret: &str) -> String {
    use base64::engine::general_purpose::STANDARD;
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}
