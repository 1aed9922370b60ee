//! SMART Backend Services: client_credentials with RFC 7523 JWT assertions (RS384 and ES384).

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kiln_smart_auth::*;
use serde_json::{json, Value};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct ClientKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn rsa_client_key(kid: &str) -> ClientKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    ClientKey {
        alg: Algorithm::RS384,
        kid: kid.into(),
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig", "key_ops": ["verify"],
                    "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()), "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())}),
    }
}

fn ec_client_key(kid: &str) -> ClientKey {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    use p384::pkcs8::EncodePrivateKey;
    let sk = p384::SecretKey::random(&mut rand_core::OsRng);
    let der = sk.to_pkcs8_der().unwrap();
    let point = sk.public_key().to_encoded_point(false);
    ClientKey {
        alg: Algorithm::ES384,
        kid: kid.into(),
        encoding: EncodingKey::from_ec_der(der.as_bytes()),
        jwk: json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384",
                    "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(point.y().unwrap())}),
    }
}

fn assertion_with(key: &ClientKey, claims: &Value, kid: Option<&str>) -> String {
    let mut h = Header::new(key.alg);
    h.kid = kid.map(str::to_string);
    h.typ = Some("JWT".into());
    jsonwebtoken::encode(&h, claims, &key.encoding).unwrap()
}

fn claims(client_id: &str, exp_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({"iss": client_id, "sub": client_id, "aud": format!("{BASE}/auth/token"), "exp": now + exp_in,
           "iat": now, "jti": uuid::Uuid::new_v4().to_string()})
}

async fn register(s: &Server, jwks: Value) -> String {
    add_client(
        s.state.store(),
        NewClient {
            client_name: "Bulk client".into(),
            jwks: Some(jwks),
            grant_types: vec!["client_credentials".into()],
            scope: Some("system/*.rs system/Group.r".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client
    .client_id
}

async fn token_request(s: &Server, assertion: &str, scope: &str) -> Resp {
    s.post_form(
        "/auth/token",
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

async fn check_backend_flow(key: ClientKey) {
    let s = server().await;
    let other = ec_client_key("unrelated");
    let client_id = register(&s, json!({"keys": [key.jwk.clone(), other.jwk.clone()]})).await;

    // Success.
    let r = token_request(
        &s,
        &assertion_with(&key, &claims(&client_id, 240), Some(&key.kid)),
        "system/Observation.rs system/Patient.r",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let t = r.json();
    assert!(t["token_type"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("bearer"));
    assert!(t["expires_in"].as_i64().unwrap() <= 300);
    assert_eq!(t["scope"], "system/Observation.rs system/Patient.r");
    assert!(t.get("refresh_token").is_none());
    let g = authorize_bearer(
        &s.state,
        Some(&format!("Bearer {}", t["access_token"].as_str().unwrap())),
    )
    .await
    .unwrap();
    assert!(g.is_system());
    assert_eq!(g.client_id(), client_id);
    assert!(g.allows(Interaction::Search, "Observation"));
    assert!(!g.allows(Interaction::Search, "Patient"));
    assert!(!g.allows(Interaction::Create, "Observation"));
    assert!(g.patient().is_none());

    // Replayed jti.
    let c = claims(&client_id, 240);
    let a = assertion_with(&key, &c, Some(&key.kid));
    assert_eq!(
        token_request(&s, &a, "system/Patient.r").await.status,
        StatusCode::OK
    );
    let r = token_request(&s, &a, "system/Patient.r").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("replay"));

    // Expired; exp too far in the future; wrong aud; iss != sub; missing jti; missing kid; wrong kid.
    let bad_cases: Vec<(&str, String)> = vec![
        (
            "expired",
            assertion_with(&key, &claims(&client_id, -120), Some(&key.kid)),
        ),
        (
            "exp > 5 min",
            assertion_with(&key, &claims(&client_id, 3600), Some(&key.kid)),
        ),
        ("aud", {
            let mut c = claims(&client_id, 240);
            c["aud"] = json!("https://elsewhere.example/token");
            assertion_with(&key, &c, Some(&key.kid))
        }),
        ("sub", {
            let mut c = claims(&client_id, 240);
            c["sub"] = json!("someone-else");
            assertion_with(&key, &c, Some(&key.kid))
        }),
        ("jti", {
            let mut c = claims(&client_id, 240);
            c.as_object_mut().unwrap().remove("jti");
            assertion_with(&key, &c, Some(&key.kid))
        }),
        (
            "no kid",
            assertion_with(&key, &claims(&client_id, 240), None),
        ),
        (
            "wrong kid",
            assertion_with(&key, &claims(&client_id, 240), Some("unrelated")),
        ),
        (
            "unknown client",
            assertion_with(&key, &claims("nobody", 240), Some(&key.kid)),
        ),
        (
            "signed by another key",
            assertion_with(&other, &claims(&client_id, 240), Some(&key.kid)),
        ),
    ];
    for (case, a) in bad_cases {
        let r = token_request(&s, &a, "system/Patient.r").await;
        assert!(
            r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::BAD_REQUEST,
            "{case}: {}",
            r.status
        );
        assert_eq!(r.json()["error"], "invalid_client", "{case}");
    }

    // Tampered signature and alg none.
    let good = assertion_with(&key, &claims(&client_id, 240), Some(&key.kid));
    let parts: Vec<&str> = good.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["jti"] = json!("tampered");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    assert_eq!(
        token_request(&s, &tampered, "system/Patient.r")
            .await
            .json()["error"],
        "invalid_client"
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid)),
        parts[1]
    );
    assert_eq!(
        token_request(&s, &none, "system/Patient.r").await.json()["error"],
        "invalid_client"
    );

    // Wrong assertion type, bad grant type, scope outside the client's policy.
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.r"),
                ("client_assertion_type", "not_an_assertion_type"),
                ("client_assertion", &good),
            ],
            &[],
        )
        .await;
    assert!(r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNAUTHORIZED);
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "not_a_grant_type"),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", &good),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = token_request(
        &s,
        &assertion_with(&key, &claims(&client_id, 240), Some(&key.kid)),
        "system/Patient.cruds",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_scope");

    // Introspection authenticated by the client's own assertion.
    let access = t["access_token"].as_str().unwrap();
    let r = s
        .post_form(
            "/auth/introspect",
            &[
                ("token", access),
                ("client_assertion_type", ASSERTION_TYPE),
                (
                    "client_assertion",
                    &assertion_with(&key, &claims(&client_id, 240), Some(&key.kid)),
                ),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["active"], true);
    assert_eq!(r.json()["client_id"], client_id.as_str());
}

#[tokio::test]
async fn backend_services_rs384() {
    check_backend_flow(rsa_client_key("rsa-1")).await;
}

#[tokio::test]
async fn backend_services_es384() {
    check_backend_flow(ec_client_key("ec-1")).await;
}

struct MapFetcher(Value);

#[async_trait::async_trait]
impl JwksFetcher for MapFetcher {
    async fn fetch(&self, url: &str) -> Result<Value, String> {
        if url == "https://client.example/jwks.json" {
            Ok(self.0.clone())
        } else {
            Err("not found".into())
        }
    }
}

#[tokio::test]
async fn jwks_uri_and_jku() {
    let key = ec_client_key("ec-uri");
    let base = server().await;
    let state = base
        .state
        .clone()
        .with_jwks_fetcher(Arc::new(MapFetcher(json!({"keys": [key.jwk.clone()]}))));
    let s = Server {
        router: router(state.clone()),
        state,
        ..base
    };
    let client_id = add_client(
        s.state.store(),
        NewClient {
            client_name: "By URL".into(),
            jwks_uri: Some("https://client.example/jwks.json".into()),
            grant_types: vec!["client_credentials".into()],
            scope: Some("system/*.read".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client
    .client_id;
    let r = token_request(
        &s,
        &assertion_with(&key, &claims(&client_id, 200), Some(&key.kid)),
        "system/Patient.read",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.json()["scope"],
        "system/Patient.read",
        "v1 scopes answered in v1 form"
    );
    // jku must be the registered jwks_uri.
    let mut h = Header::new(Algorithm::ES384);
    h.kid = Some(key.kid.clone());
    h.jku = Some("https://attacker.example/jwks.json".into());
    let a = jsonwebtoken::encode(&h, &claims(&client_id, 200), &key.encoding).unwrap();
    let r = token_request(&s, &a, "system/Patient.read").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    h.jku = Some("https://client.example/jwks.json".into());
    let a = jsonwebtoken::encode(&h, &claims(&client_id, 200), &key.encoding).unwrap();
    assert_eq!(
        token_request(&s, &a, "system/Patient.read").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn asymmetric_client_authorization_code_and_refresh() {
    let s = server().await;
    let key = rsa_client_key("rsa-app");
    let client_id = add_client(
        s.state.store(),
        NewClient {
            client_name: "Asymmetric app".into(),
            redirect_uris: vec![REDIRECT.into()],
            jwks: Some(json!({"keys": [key.jwk.clone()]})),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client
    .client_id;
    let (verifier, challenge) = pkce_pair();
    let scope = "launch/patient openid fhirUser offline_access patient/*.rs";
    let cb = run_authorization(
        &s,
        &client_id,
        scope,
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|_| true,
    )
    .await;
    let code = query_param(&cb, "code").unwrap();
    let a = assertion_with(&key, &claims(&client_id, 200), Some(&key.kid));
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", &a),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t = r.json();
    assert!(t["id_token"].is_string());
    let refresh = t["refresh_token"].as_str().unwrap();
    // Refresh without authenticating is refused; with a fresh assertion it works.
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh),
                ("client_id", &client_id),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let a = assertion_with(&key, &claims(&client_id, 200), Some(&key.kid));
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", &a),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["patient"], "p1");
}
