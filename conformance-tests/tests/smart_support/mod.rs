#![allow(dead_code)]
//! Support for the SMART end-to-end suites (`smart_inferno.rs`, `smart_attacks.rs`,
//! `smart_clients.rs`): a Kiln server with `--auth on` started in-process (SQLite in a temp dir, or
//! PostgreSQL in a fresh database when `KILN_TEST_DATABASE_URL` is set), users and clients, seed data for two
//! patients, an HTTP client that does not follow redirects (the authorization flow is driven step by
//! step: authorize → login → consent → code), PKCE, client keys for JWT assertions, and a check
//! recorder that prints a `<check>: passed/failed` table.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kiln_conformance_tests::{Backend, PgDatabase, PG_ENV};
use kiln_server::{open_auth, open_store, serve, AppState, Settings};
use kiln_smart_auth::{add_client, add_user, AuthState, ClientAuthMethod, NewClient, NewUser};
use kiln_store::StoreConfig;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const REDIRECT: &str = "https://app.example.org/callback";
pub const LAUNCH_URI: &str = "https://app.example.org/launch";
pub const ADMIN_KEY: &str = "e2e-admin-key-0123456789";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Patient A (the one in context) and Patient B (the one an attacker wants).
pub const PATIENT_A: &str = "aaaa-patient";
pub const PATIENT_B: &str = "bbbb-patient";
pub const NAME_A: &str = "Ashworth";
pub const NAME_B: &str = "Blackwood";
/// Text only B's resources carry.
pub const SECRET_B: &str = "SECRET-B-7731";
/// A LOINC code only B's lab Observation carries.
pub const CODE_B: &str = "2339-0";
pub const CODE_A: &str = "718-7";

pub const B_IDS: &[&str] = &[
    "bbbb-patient",
    "bbbb-obs-lab",
    "bbbb-obs-vital",
    "bbbb-cond",
    "bbbb-enc",
];
pub const A_IDS: &[&str] = &[
    "aaaa-patient",
    "aaaa-obs-lab",
    "aaaa-obs-vital",
    "aaaa-cond",
    "aaaa-enc",
];
pub const PRACTITIONER: &str = "shared-practitioner";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn location(&self) -> String {
        self.header("location").unwrap_or_default()
    }
    pub fn short(&self) -> String {
        let b: String = self.body.chars().take(300).collect();
        format!("{} {}", self.status.as_u16(), b)
    }
}

/// A client key for `private_key_jwt` (RS384 or ES384).
pub struct ClientKey {
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// The private key as DER (PKCS#1 for RSA, PKCS#8 for EC), for clients in other languages.
    pub der: Vec<u8>,
}

pub fn rsa_client_key(kid: &str) -> ClientKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("RSA keygen");
    let der = key.to_pkcs1_der().expect("RSA DER");
    ClientKey {
        alg: Algorithm::RS384,
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
                    "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())}),
        der: der.as_bytes().to_vec(),
    }
}

pub fn ec_client_key(kid: &str) -> ClientKey {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    use p384::pkcs8::EncodePrivateKey;
    let sk = p384::SecretKey::random(&mut rand_core::OsRng);
    let der = sk.to_pkcs8_der().expect("EC DER");
    let point = sk.public_key().to_encoded_point(false);
    ClientKey {
        alg: Algorithm::ES384,
        kid: kid.into(),
        encoding: EncodingKey::from_ec_der(der.as_bytes()),
        jwk: json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384",
                    "x": URL_SAFE_NO_PAD.encode(point.x().map(|x| x.to_vec()).unwrap_or_default()),
                    "y": URL_SAFE_NO_PAD.encode(point.y().map(|y| y.to_vec()).unwrap_or_default())}),
        der: der.as_bytes().to_vec(),
    }
}

/// RFC 7523 client assertion claims for the token endpoint.
pub fn assertion_claims(client_id: &str, aud: &str, exp_in: i64) -> Value {
    let now = now();
    json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now + exp_in,
           "iat": now, "jti": uuid::Uuid::new_v4().to_string()})
}

pub fn sign(key: &ClientKey, claims: &Value) -> String {
    let mut h = Header::new(key.alg);
    h.kid = Some(key.kid.clone());
    h.typ = Some("JWT".into());
    jsonwebtoken::encode(&h, claims, &key.encoding).unwrap_or_default()
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

pub fn query_param(url: &str, name: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `name="x" value="..."` from an HTML form.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let pat = format!("name=\"{name}\" value=\"");
    let i = html.find(&pat)? + pat.len();
    html[i..].split('"').next().map(str::to_string)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('"', "&quot;")
}

pub fn cookie_of(r: &Resp) -> Option<String> {
    r.header("set-cookie")
        .and_then(|c| c.split(';').next().map(str::to_string))
}

pub fn b64url_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

pub fn decode_jwt_part(token: &str, i: usize) -> Value {
    token
        .split('.')
        .nth(i)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The running server(s) and registered parties.
pub struct Kiln {
    /// `http://127.0.0.1:<port>/fhir` — SMART enforced.
    pub base: String,
    /// A second listener over the same store without authorization (seeding, ground truth).
    pub admin_base: String,
    pub auth: AuthState,
    pub http: reqwest::Client,
    pub public_client: String,
    pub secret_client: String,
    pub secret: String,
    pub asym_client: String,
    pub asym_key: ClientKey,
    pub ehr_client: String,
    pub backend_client: String,
    pub backend_key: ClientKey,
    pub backend_ec_client: String,
    pub backend_ec_key: ClientKey,
    pub backend: Backend,
    store: kiln_store::Store,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    // dropped after the store is closed (field order = drop order)
    _pg: Option<PgDatabase>,
    _dir: tempfile::TempDir,
}

/// Starts Kiln with SMART on SQLite.
pub async fn start() -> Result<Kiln, String> {
    start_on(Backend::Sqlite)
        .await?
        .ok_or_else(|| "SQLite is always available".to_string())
}

/// Starts Kiln with SMART on `backend`; `Ok(None)` (with a printed notice) for PostgreSQL when
/// `KILN_TEST_DATABASE_URL` is not set.
pub async fn start_on(backend: Backend) -> Result<Option<Kiln>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => match std::env::var(PG_ENV) {
            Ok(url) if !url.trim().is_empty() => Some(
                PgDatabase::create(url.trim())
                    .await
                    .map_err(|e| format!("{PG_ENV} is set but unusable: {e}"))?,
            ),
            _ => {
                eprintln!("notice: {PG_ENV} is not set: skipping the PostgreSQL variant");
                return Ok(None);
            }
        },
    };
    let store = open_store(&StoreConfig {
        data_dir: dir.path().to_path_buf(),
        database: pg.as_ref().map(|p| p.url.clone()),
        max_connections: 8,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let base = format!(
        "http://{}/fhir",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let admin_base = format!(
        "http://{}/fhir",
        admin_listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut cfg = kiln_smart_auth::SmartConfig::new(base.clone());
    cfg.admin_api_key = Some(ADMIN_KEY.into());
    let auth = open_auth(&store, cfg).await.map_err(|e| e.to_string())?;
    let state = AppState::with_auth(
        store.clone(),
        base.clone(),
        Settings::default(),
        Some(auth.clone()),
    );
    let admin_state = AppState::new(store.clone(), admin_base.clone(), Settings::default());
    let mut stops = Vec::new();
    for (l, st) in [(listener, state), (admin_listener, admin_state)] {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        tokio::spawn(async move {
            let _ = serve(l, st, async move {
                let _ = rx.await;
            })
            .await;
        });
    }

    let auth_store = auth.store();
    add_user(
        auth_store,
        NewUser {
            username: "alice".into(),
            password: "alice-password-1".into(),
            fhir_user: Some(format!("Patient/{PATIENT_A}")),
            display_name: Some("Alicia Ashworth".into()),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    add_user(
        auth_store,
        NewUser {
            username: "doc".into(),
            password: "doctor-password-1".into(),
            fhir_user: Some(format!("Practitioner/{PRACTITIONER}")),
            patients: vec![PATIENT_A.into(), PATIENT_B.into()],
            admin: true,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let client = |id: &str, method: ClientAuthMethod| NewClient {
        client_id: Some(id.into()),
        client_name: id.into(),
        redirect_uris: vec![REDIRECT.into()],
        auth_method: Some(method),
        ..Default::default()
    };
    let public = add_client(auth_store, client("public-app", ClientAuthMethod::None))
        .await
        .map_err(|e| e.to_string())?;
    let secret = add_client(
        auth_store,
        client("secret-app", ClientAuthMethod::ClientSecretBasic),
    )
    .await
    .map_err(|e| e.to_string())?;
    let asym_key = rsa_client_key("asym-key-1");
    let asym = add_client(
        auth_store,
        NewClient {
            jwks: Some(json!({"keys": [asym_key.jwk.clone()]})),
            ..client("asym-app", ClientAuthMethod::PrivateKeyJwt)
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let ehr = add_client(
        auth_store,
        NewClient {
            launch_uri: Some(LAUNCH_URI.into()),
            ..client("ehr-app", ClientAuthMethod::None)
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let backend_key = rsa_client_key("backend-rs384");
    let backend_ec_key = ec_client_key("backend-es384");
    let backend_client = |id: &str, key: &ClientKey| NewClient {
        client_id: Some(id.into()),
        client_name: id.into(),
        jwks: Some(json!({"keys": [key.jwk.clone()]})),
        auth_method: Some(ClientAuthMethod::PrivateKeyJwt),
        grant_types: vec!["client_credentials".into()],
        scope: Some("system/*.rs".into()),
        ..Default::default()
    };
    let b1 = add_client(auth_store, backend_client("backend-rs", &backend_key))
        .await
        .map_err(|e| e.to_string())?;
    let b2 = add_client(auth_store, backend_client("backend-es", &backend_ec_key))
        .await
        .map_err(|e| e.to_string())?;

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let k = Kiln {
        base,
        admin_base,
        auth,
        http,
        public_client: public.client.client_id,
        secret_client: secret.client.client_id,
        secret: secret.client_secret.unwrap_or_default(),
        asym_client: asym.client.client_id,
        asym_key,
        ehr_client: ehr.client.client_id,
        backend_client: b1.client.client_id,
        backend_key,
        backend_ec_client: b2.client.client_id,
        backend_ec_key,
        backend,
        store,
        stop: stops,
        _pg: pg,
        _dir: dir,
    };
    k.seed().await?;
    Ok(Some(k))
}

fn patient(id: &str, family: &str, given: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "active": true,
           "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": "1970-01-01",
           "generalPractitioner": [{"reference": format!("Practitioner/{PRACTITIONER}")}]})
}

fn observation(id: &str, pid: &str, category: &str, code: &str, note: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
           "subject": {"reference": format!("Patient/{pid}")},
           "performer": [{"reference": format!("Practitioner/{PRACTITIONER}")}],
           "effectiveDateTime": "2024-01-01T10:00:00Z",
           "valueString": note})
}

fn condition(id: &str, pid: &str, note: &str) -> Value {
    json!({"resourceType": "Condition", "id": id,
           "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}], "text": note},
           "subject": {"reference": format!("Patient/{pid}")},
           "asserter": {"reference": format!("Practitioner/{PRACTITIONER}")}})
}

fn encounter(id: &str, pid: &str, note: &str) -> Value {
    json!({"resourceType": "Encounter", "id": id, "status": "finished",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
           "type": [{"text": note}],
           "subject": {"reference": format!("Patient/{pid}")},
           "participant": [{"individual": {"reference": format!("Practitioner/{PRACTITIONER}")}}]})
}

/// Every seeded resource: (type, id, body).
pub fn seed_resources() -> Vec<Value> {
    vec![
        json!({"resourceType": "Practitioner", "id": PRACTITIONER, "name": [{"family": "Shared", "given": ["Pat"]}]}),
        patient(PATIENT_A, NAME_A, "Alicia"),
        patient(PATIENT_B, NAME_B, "Bertram"),
        observation("aaaa-obs-lab", PATIENT_A, "laboratory", CODE_A, "a lab"),
        observation(
            "aaaa-obs-vital",
            PATIENT_A,
            "vital-signs",
            "8867-4",
            "a vital",
        ),
        observation("bbbb-obs-lab", PATIENT_B, "laboratory", CODE_B, SECRET_B),
        observation(
            "bbbb-obs-vital",
            PATIENT_B,
            "vital-signs",
            "8867-4",
            SECRET_B,
        ),
        condition("aaaa-cond", PATIENT_A, "a condition"),
        condition("bbbb-cond", PATIENT_B, SECRET_B),
        encounter("aaaa-enc", PATIENT_A, "a visit"),
        encounter("bbbb-enc", PATIENT_B, SECRET_B),
    ]
}

impl Kiln {
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else if path.is_empty() || path.starts_with('?') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        }
    }

    /// Stops both listeners and closes the store (before a PostgreSQL database is dropped).
    pub async fn finish(mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
        self.store.close().await;
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/auth/token", self.base)
    }

    async fn seed(&self) -> Result<(), String> {
        for r in seed_resources() {
            self.admin_put(&r).await?;
        }
        Ok(())
    }

    /// Stores `r` (with its id) through the unprotected admin listener.
    pub async fn admin_put(&self, r: &Value) -> Result<(), String> {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        let id = r["id"].as_str().unwrap_or_default();
        let resp = self
            .http
            .put(format!("{}/{ty}/{id}", self.admin_base))
            .header("content-type", "application/fhir+json")
            .body(r.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!(
                "storing {ty}/{id}: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// authorize → login for a standalone launch of the public client; `(req, session cookie)`.
    pub async fn begin_standalone(
        &self,
        scope: &str,
        challenge: &str,
        user: (&str, &str),
    ) -> Result<(String, String), String> {
        let r = self
            .get(
                &self.authorize_url(&self.public_client, scope, challenge, "st-enc", &[]),
                &[],
            )
            .await;
        let login_url = r.location();
        let req = query_param(&login_url, "req").ok_or(format!("authorize: {}", r.short()))?;
        let r = self
            .post_form(
                "auth/login",
                &[("username", user.0), ("password", user.1), ("req", &req)],
                &[],
            )
            .await;
        if r.status != StatusCode::SEE_OTHER {
            return Err(format!("login: {}", r.short()));
        }
        let cookie = cookie_of(&r).ok_or("login set no cookie")?;
        Ok((req, cookie))
    }

    /// Posts one choice (`patient` on `auth/select-patient`, `encounter` on
    /// `auth/select-encounter`) with the page's form token.
    pub async fn choose(
        &self,
        page: &str,
        req: &str,
        cookie: &str,
        field: &str,
        value: &str,
    ) -> Resp {
        let ck = [("cookie", cookie)];
        let shown = self
            .get(&format!("{page}?req={}", urlencode(req)), &ck)
            .await;
        let csrf = hidden(&shown.body, "csrf").unwrap_or_default();
        self.post_form(page, &[("req", req), ("csrf", &csrf), (field, value)], &ck)
            .await
    }

    /// Approves the consent page with every offered scope `keep` accepts; the token response.
    pub async fn consent_and_exchange(
        &self,
        req: &str,
        cookie: &str,
        scope: &str,
        verifier: &str,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Value, String> {
        let ck = [("cookie", cookie)];
        let page = self
            .get(&format!("auth/consent?req={}", urlencode(req)), &ck)
            .await;
        if page.status != StatusCode::OK {
            return Err(format!("consent page: {}", page.short()));
        }
        let csrf = hidden(&page.body, "csrf").ok_or("no csrf on consent")?;
        let mut form: Vec<(&str, &str)> =
            vec![("req", req), ("csrf", &csrf), ("decision", "approve")];
        for sc in scope.split(' ').filter(|sc| keep(sc)) {
            form.push(("scope", sc));
        }
        let r = self.post_form("auth/consent", &form, &ck).await;
        let cb = r.location();
        let code = query_param(&cb, "code").ok_or(format!("no code in {cb}"))?;
        let t = self.exchange(&code, verifier, &self.public_client).await;
        if t.status != StatusCode::OK {
            return Err(format!("token: {}", t.short()));
        }
        Ok(t.json())
    }

    /// Ground truth (no authorization): the current resource, or None.
    pub async fn admin_read(&self, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/{}", self.admin_base, path))
            .send()
            .await
            .ok()?;
        if r.status() != StatusCode::OK {
            return None;
        }
        r.json().await.ok()
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Resp {
        let mut rb = self.http.request(method, self.url(path));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some((ct, b)) = body {
            rb = rb.header("content-type", ct).body(b);
        }
        match rb.send().await {
            Ok(r) => {
                let status = r.status();
                let headers = r.headers().clone();
                let body = r.text().await.unwrap_or_default();
                Resp {
                    status,
                    headers,
                    body,
                }
            }
            Err(e) => Resp {
                status: StatusCode::from_u16(599).unwrap_or(StatusCode::BAD_GATEWAY),
                headers: HeaderMap::new(),
                body: format!("transport error: {e}"),
            },
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, path, headers, None).await
    }

    /// GET with a bearer token.
    pub async fn fhir_get(&self, token: &str, path: &str) -> Resp {
        let auth = format!("Bearer {token}");
        self.get(
            path,
            &[
                ("authorization", &auth),
                ("accept", "application/fhir+json"),
            ],
        )
        .await
    }

    pub async fn fhir_send(&self, token: &str, method: Method, path: &str, body: &Value) -> Resp {
        let auth = format!("Bearer {token}");
        self.send(
            method,
            path,
            &[
                ("authorization", &auth),
                ("accept", "application/fhir+json"),
            ],
            Some(("application/fhir+json", body.to_string())),
        )
        .await
    }

    pub async fn post_form(
        &self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut ser = String::new();
        for (k, v) in form {
            if !ser.is_empty() {
                ser.push('&');
            }
            ser.push_str(&urlencode(k));
            ser.push('=');
            ser.push_str(&urlencode(v));
        }
        self.send(
            Method::POST,
            path,
            headers,
            Some(("application/x-www-form-urlencoded", ser)),
        )
        .await
    }

    pub fn authorize_url(
        &self,
        client_id: &str,
        scope: &str,
        challenge: &str,
        state: &str,
        extra: &[(&str, &str)],
    ) -> String {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", state),
            ("aud", &self.base),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ];
        pairs.extend_from_slice(extra);
        let q: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect();
        format!("{}/auth/authorize?{}", self.base, q.join("&"))
    }

    /// Drives authorize → login → (patient picker) → consent; returns the redirect to the app
    /// (carrying `code` and `state`, or `error`). `keep` decides which offered scopes stay ticked.
    #[allow(clippy::too_many_arguments)]
    pub async fn authorize(
        &self,
        client_id: &str,
        scope: &str,
        challenge: &str,
        user: (&str, &str),
        pick_patient: Option<&str>,
        extra: &[(&str, &str)],
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<String, String> {
        let r = self
            .get(
                &self.authorize_url(client_id, scope, challenge, "st-e2e", extra),
                &[],
            )
            .await;
        if r.status != StatusCode::SEE_OTHER && r.status != StatusCode::FOUND {
            return Err(format!("authorize: {}", r.short()));
        }
        let login_url = r.location();
        if login_url.starts_with(REDIRECT) {
            return Ok(login_url);
        }
        let req = query_param(&login_url, "req").ok_or(format!("no req in {login_url}"))?;
        let r = self
            .post_form(
                "auth/login",
                &[("username", user.0), ("password", user.1), ("req", &req)],
                &[],
            )
            .await;
        if r.status != StatusCode::SEE_OTHER {
            return Err(format!("login: {}", r.short()));
        }
        let cookie = cookie_of(&r).ok_or("login set no cookie")?;
        let ck = [("cookie", cookie.as_str())];
        let mut next = r.location();
        if next.contains("/auth/select-patient") {
            let r = self.get(&next, &ck).await;
            if r.status == StatusCode::OK {
                let p = pick_patient.ok_or("patient picker shown, nothing to pick")?;
                let csrf = hidden(&r.body, "csrf").ok_or("no csrf on picker")?;
                let r = self
                    .post_form(
                        "auth/select-patient",
                        &[("req", &req), ("csrf", &csrf), ("patient", p)],
                        &ck,
                    )
                    .await;
                if r.status != StatusCode::SEE_OTHER {
                    return Err(format!("select-patient: {}", r.short()));
                }
                next = r.location();
            } else {
                next = r.location();
            }
        }
        if next.starts_with(REDIRECT) {
            return Ok(next);
        }
        if !next.contains("/auth/consent") {
            return Err(format!("expected consent, got {next}"));
        }
        let r = self.get(&next, &ck).await;
        if r.status != StatusCode::OK {
            return Err(format!("consent page: {}", r.short()));
        }
        let csrf = hidden(&r.body, "csrf").ok_or("no csrf on consent")?;
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
        let r = self.post_form("auth/consent", &pairs, &ck).await;
        if r.status != StatusCode::SEE_OTHER {
            return Err(format!("consent: {}", r.short()));
        }
        Ok(r.location())
    }

    pub async fn exchange(&self, code: &str, verifier: &str, client: &str) -> Resp {
        self.post_form(
            "auth/token",
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

    /// A full standalone launch by `alice` (Patient A) with the public client; the token response.
    pub async fn patient_token(&self, scope: &str) -> Result<Value, String> {
        self.patient_token_keep(scope, &|_| true).await
    }

    pub async fn patient_token_keep(
        &self,
        scope: &str,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Value, String> {
        let (verifier, challenge) = pkce_pair();
        let cb = self
            .authorize(
                &self.public_client,
                scope,
                &challenge,
                ("alice", "alice-password-1"),
                None,
                &[],
                keep,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or(format!("no code in {cb}"))?;
        let r = self.exchange(&code, &verifier, &self.public_client).await;
        if r.status != StatusCode::OK {
            return Err(format!("token: {}", r.short()));
        }
        Ok(r.json())
    }

    /// client_credentials with a signed assertion.
    pub async fn backend_token_request(&self, assertion: &str, scope: &str) -> Resp {
        self.post_form(
            "auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", assertion),
            ],
            &[],
        )
        .await
    }

    /// A token signed with the server's own active key (forged claims: expiry, audience, ...).
    pub fn server_signed(&self, claims: &Value) -> String {
        let ring = self.auth.key_ring();
        let Some(key) = ring.active() else {
            return String::new();
        };
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&h, claims, &key.encoding).unwrap_or_default()
    }
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Resources (type/id) in a searchset/batch Bundle, at any depth (`entry.resource`, and nested
/// Bundles in batch responses).
pub fn bundle_ids(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_ids(v, &mut out);
    out
}

fn collect_ids(v: &Value, out: &mut Vec<String>) {
    if let Some(entries) = v.get("entry").and_then(Value::as_array) {
        for e in entries {
            if let Some(r) = e.get("resource") {
                if let (Some(t), Some(i)) = (
                    r.get("resourceType").and_then(Value::as_str),
                    r.get("id").and_then(Value::as_str),
                ) {
                    out.push(format!("{t}/{i}"));
                }
                collect_ids(r, out);
            }
        }
    }
}

/// Recorded outcome of named checks; prints the table.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<(String, Result<(), String>)>,
}

impl Report {
    pub fn record(&mut self, name: &str, r: Result<(), String>) {
        match &r {
            Ok(()) => println!("  ✓ {name}"),
            Err(e) => println!("  ✗ {name}: {e}"),
        }
        self.rows.push((name.to_string(), r));
    }

    pub fn failed(&self) -> usize {
        self.rows.iter().filter(|(_, r)| r.is_err()).count()
    }

    pub fn passed(&self) -> usize {
        self.rows.len() - self.failed()
    }

    pub fn print(&self, title: &str) {
        println!("\n{title}");
        for (name, r) in &self.rows {
            match r {
                Ok(()) => println!("{name}: passed"),
                Err(e) => println!("{name}: failed ({e})"),
            }
        }
    }
}

/// `Err(msg)` unless `cond`.
pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg.into())
    }
}
