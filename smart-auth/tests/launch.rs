//! Discovery, standalone / EHR launch with PKCE, tokens, introspection, refresh, revocation.

mod common;

use axum::http::StatusCode;
use common::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kiln_smart_auth::*;
use serde_json::{json, Value};

#[tokio::test]
async fn discovery_documents() {
    let s = server().await;
    let r = s
        .get(
            "/.well-known/smart-configuration",
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    let d = r.json();
    for k in [
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "revocation_endpoint",
        "registration_endpoint",
    ] {
        assert!(
            d[k].as_str()
                .unwrap()
                .starts_with("http://localhost:8080/fhir/auth/"),
            "{k}"
        );
    }
    assert_eq!(d["issuer"], BASE);
    assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
    let caps: Vec<&str> = d["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for c in [
        "launch-standalone",
        "launch-ehr",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "context-standalone-patient",
        "context-standalone-encounter",
        "context-ehr-patient",
        "permission-offline",
        "permission-patient",
        "permission-user",
        "authorize-post",
        "permission-v1",
        "permission-v2",
        "context-banner",
        "context-style",
    ] {
        assert!(caps.contains(&c), "capability {c}");
    }
    assert!(d["scopes_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("launch/encounter")));
    let grants = d["grant_types_supported"].as_array().unwrap();
    assert!(
        grants.contains(&json!("authorization_code"))
            && grants.contains(&json!("client_credentials"))
    );
    let algs = d["token_endpoint_auth_signing_alg_values_supported"]
        .as_array()
        .unwrap();
    assert!(algs.contains(&json!("RS384")) && algs.contains(&json!("ES384")));

    let o = s.get("/.well-known/openid-configuration", &[]).await.json();
    for k in [
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "response_types_supported",
        "subject_types_supported",
    ] {
        assert!(!o[k].is_null(), "{k}");
    }
    assert!(o["id_token_signing_alg_values_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("RS256")));

    let jwks = s.get("/auth/jwks", &[]).await.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "RSA");
    assert!(keys[0]["kid"].is_string() && keys[0]["n"].is_string() && keys[0]["e"].is_string());
    assert!(keys[0].get("d").is_none(), "no private parts published");
}

async fn jwk_for(s: &Server, kid: &str) -> DecodingKey {
    let jwks = s.get("/auth/jwks", &[]).await.json();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("kid in JWKS")
        .clone();
    let jwk: Jwk = serde_json::from_value(key).unwrap();
    DecodingKey::from_jwk(&jwk).unwrap()
}

#[tokio::test]
async fn standalone_patient_launch_full_cycle() {
    let s = server().await;
    let (verifier, challenge) = pkce_pair();
    let scope = "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs patient/Condition.read";
    let cb = run_authorization(
        &s,
        &s.public_client,
        scope,
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|sc| sc != "patient/Condition.read",
    )
    .await;
    assert!(cb.starts_with(REDIRECT), "{cb}");
    assert_eq!(query_param(&cb, "state").as_deref(), Some("st-123"));
    let code = query_param(&cb, "code").expect("code");

    let r = exchange(&s, &code, &verifier, &s.public_client).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(r.header("pragma").as_deref(), Some("no-cache"));
    let t = r.json();
    assert!(t["token_type"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("bearer"));
    assert!(t["expires_in"].as_i64().unwrap() > 0 && t["expires_in"].as_i64().unwrap() <= 3600);
    assert_eq!(t["patient"], "p1");
    assert_eq!(t["need_patient_banner"], true);
    assert!(t["smart_style_url"].is_string());
    let granted = t["scope"].as_str().unwrap();
    assert!(
        granted.contains("patient/Observation.rs") && !granted.contains("Condition"),
        "user un-ticked Condition: {granted}"
    );
    let access = t["access_token"].as_str().unwrap().to_string();
    let refresh = t["refresh_token"]
        .as_str()
        .expect("offline_access gives a refresh token")
        .to_string();

    // id_token: RS256, kid in JWKS, iss/aud/sub/fhirUser.
    let id_token = t["id_token"].as_str().expect("id_token");
    let h = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(h.alg, Algorithm::RS256);
    let key = jwk_for(&s, h.kid.as_deref().unwrap()).await;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[&s.public_client]);
    v.set_issuer(&[BASE]);
    let claims = jsonwebtoken::decode::<Value>(id_token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "pat");
    assert_eq!(claims["fhirUser"], format!("{BASE}/Patient/p1"));
    assert!(claims["iat"].is_number() && claims["exp"].is_number());

    // Resource server API.
    let grant = authorize_bearer(&s.state, Some(&format!("Bearer {access}")))
        .await
        .unwrap();
    assert_eq!(grant.patient(), Some("p1"));
    assert!(grant.allows(Interaction::Read, "Observation"));
    assert!(grant.allows(Interaction::Search, "Patient"));
    assert!(!grant.allows(Interaction::Read, "Condition"));
    assert!(!grant.allows(Interaction::Create, "Observation"));
    assert!(grant.requires_patient_compartment(Interaction::Search, "Observation"));
    assert!(matches!(
        grant.check(Interaction::Delete, "Observation"),
        Err(AuthError::Forbidden(_))
    ));
    assert_eq!(
        grant.check(Interaction::Read, "Observation").unwrap(),
        ScopeFilter::Unrestricted
    );

    // Userinfo.
    let ui = s
        .get(
            "/auth/userinfo",
            &[("authorization", &format!("Bearer {access}"))],
        )
        .await;
    assert_eq!(ui.status, StatusCode::OK, "{}", ui.body);
    assert_eq!(ui.json()["fhirUser"], format!("{BASE}/Patient/p1"));

    // Introspection (bearer-authenticated).
    let auth = format!("Bearer {access}");
    let r = s
        .post_form(
            "/auth/introspect",
            &[("token", &access)],
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let i = r.json();
    assert_eq!(i["active"], true);
    assert_eq!(i["client_id"], s.public_client.as_str());
    assert_eq!(i["scope"], granted);
    assert_eq!(i["patient"], "p1");
    assert!(i["exp"].is_number() && i["sub"] == "pat" && i["iss"] == BASE);
    let r = s
        .post_form(
            "/auth/introspect",
            &[("token", "garbage")],
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"active": false}));
    let r = s
        .post_form("/auth/introspect", &[("token", &access)], &[])
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "unauthenticated introspection refused"
    );

    // Refresh: escalation refused (and the token survives the failed attempt).
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &s.public_client),
                ("scope", "patient/Observation.rs patient/Condition.rs"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_scope");
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &s.public_client),
                ("scope", "patient/Observation.cruds"),
            ],
            &[],
        )
        .await;
    assert_eq!(
        r.json()["error"],
        "invalid_scope",
        "more letters is escalation"
    );
    // Narrowing allowed.
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &s.public_client),
                ("scope", "patient/Observation.r"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    let t2 = r.json();
    assert_eq!(t2["scope"], "patient/Observation.r");
    assert!(t2["expires_in"].is_number() && t2["access_token"].is_string());
    let refresh2 = t2["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(refresh2, refresh, "rotation");
    // Without scope: the original grant again.
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh2),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t3 = r.json();
    assert_eq!(t3["scope"], granted);
    assert_eq!(t3["patient"], "p1");
    let refresh3 = t3["refresh_token"].as_str().unwrap().to_string();

    // Revoke the access token: the whole grant dies.
    let r = s
        .post_form(
            "/auth/revoke",
            &[("token", &access), ("client_id", &s.public_client)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let e = authorize_bearer(&s.state, Some(&format!("Bearer {access}")))
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    let t3_access = t3["access_token"].as_str().unwrap();
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {t3_access}")))
            .await
            .is_err()
    );
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh3),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = s
        .post_form(
            "/auth/introspect",
            &[
                ("token", &access),
                ("client_id", &s.secret_client),
                ("client_secret", &s.secret),
            ],
            &[],
        )
        .await;
    assert_eq!(r.json()["active"], false);
}

#[tokio::test]
async fn practitioner_picks_patient_confidential_client() {
    let s = server().await;
    let (verifier, challenge) = pkce_pair();
    let scope = "launch/patient openid fhirUser patient/*.rs user/Practitioner.r";
    let cb = run_authorization(
        &s,
        &s.secret_client,
        scope,
        &challenge,
        ("doc", "doctor-password"),
        Some("p2"),
        &[],
        &|_| true,
    )
    .await;
    let code = query_param(&cb, "code").unwrap();
    // Confidential client without credentials is refused…
    let r = exchange(&s, &code, &verifier, &s.secret_client).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    // …and the code was consumed by that attempt? No: authentication happens before the code is read.
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
            ],
            &[("authorization", &basic(&s.secret_client, &s.secret))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t = r.json();
    assert_eq!(t["patient"], "p2");
    assert!(
        t.get("refresh_token").is_none(),
        "no offline/online access requested"
    );
    let g = authorize_bearer(
        &s.state,
        Some(&format!("bearer {}", t["access_token"].as_str().unwrap())),
    )
    .await
    .unwrap();
    assert_eq!(
        g.fhir_user(),
        Some(format!("{BASE}/Practitioner/dr1").as_str())
    );
    assert!(g.allows(Interaction::Read, "Practitioner"));
    assert!(!g.requires_patient_compartment(Interaction::Read, "Practitioner"));
    assert!(g.requires_patient_compartment(Interaction::Read, "Observation"));
    // Wrong secret.
    let r = s
        .post_form(
            "/auth/token",
            &[("grant_type", "refresh_token"), ("refresh_token", "x")],
            &[("authorization", &basic(&s.secret_client, "wrong"))],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
}

#[tokio::test]
async fn picker_refuses_foreign_patient() {
    let s = server().await;
    let (_v, challenge) = pkce_pair();
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch/patient patient/*.rs",
                &challenge,
                "x",
                &[],
            ),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let mut doc = s
        .post_form(
            "/auth/login",
            &[
                ("username", "doc"),
                ("password", "doctor-password"),
                ("req", &req),
            ],
            &[],
        )
        .await;
    let cookie = cookie_of(&doc);
    doc = s.get(&doc.location(), &[("cookie", &cookie)]).await;
    assert_eq!(doc.status, StatusCode::OK);
    let csrf = hidden(&doc.body, "csrf");
    // doc is admin → free entry allowed; a non-admin practitioner is tested by the csrf check only.
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", "wrong"), ("patient", "p1")],
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", &csrf), ("patient_id", "bad id!")],
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn pkce_failures_code_reuse_and_wrong_client() {
    let s = server().await;
    let scope = "launch/patient patient/Patient.r";
    for (case, verifier_override) in [
        ("missing", Some(String::new())),
        ("wrong", Some("x".repeat(50))),
        ("plain", None),
    ] {
        let (_verifier, challenge) = pkce_pair();
        let cb = run_authorization(
            &s,
            &s.public_client,
            scope,
            &challenge,
            ("pat", "patient-password"),
            None,
            &[],
            &|_| true,
        )
        .await;
        let code = query_param(&cb, "code").unwrap();
        let v = verifier_override
            .clone()
            .unwrap_or_else(|| challenge.clone());
        let r = exchange(&s, &code, &v, &s.public_client).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{case}");
        assert_eq!(r.json()["error"], "invalid_grant", "{case}");
    }
    // plain method refused at the authorization endpoint: redirect with error, no code.
    let (verifier, challenge) = pkce_pair();
    let url = authorize_url(&s.public_client, scope, &challenge, "s1", &[])
        .replace("code_challenge_method=S256", "code_challenge_method=plain");
    let r = s.get(&url, &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(query_param(&r.location(), "code").is_none());
    assert_eq!(
        query_param(&r.location(), "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&r.location(), "state").as_deref(), Some("s1"));
    // No challenge at all.
    let url = authorize_url(&s.public_client, scope, "", "s1", &[]);
    assert_eq!(
        query_param(&s.get(&url, &[]).await.location(), "error").as_deref(),
        Some("invalid_request")
    );

    // Code reuse.
    let cb = run_authorization(
        &s,
        &s.public_client,
        scope,
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|_| true,
    )
    .await;
    let code = query_param(&cb, "code").unwrap();
    assert_eq!(
        exchange(&s, &code, &verifier, &s.public_client)
            .await
            .status,
        StatusCode::OK
    );
    let r = exchange(&s, &code, &verifier, &s.public_client).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_grant");
    // Garbage code, unknown client.
    assert_eq!(
        exchange(&s, "nonsense", &verifier, &s.public_client)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let r = exchange(&s, "nonsense", &verifier, "no-such-client").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    // Code bound to client and redirect_uri.
    let (verifier, challenge) = pkce_pair();
    let cb = run_authorization(
        &s,
        &s.public_client,
        scope,
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|_| true,
    )
    .await;
    let code = query_param(&cb, "code").unwrap();
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "https://evil.example/cb"),
                ("code_verifier", &verifier),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.json()["error"], "invalid_grant");
    // Unsupported grant type, wrong content type.
    let r = s
        .post_form("/auth/token", &[("grant_type", "not_a_grant_type")], &[])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "unsupported_grant_type");
    let r = s
        .post_json(
            "/auth/token",
            &json!({"grant_type": "authorization_code"}),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_request");
}

#[tokio::test]
async fn authorize_errors() {
    let s = server().await;
    let (_v, challenge) = pkce_pair();
    // Wrong aud: redirected back with an error and no code.
    let url = authorize_url(
        &s.public_client,
        "patient/*.rs launch/patient",
        &challenge,
        "abc",
        &[],
    )
    .replace("aud=http", "aud=https%3A%2F%2Fevil.example%2Ffhir&x=http");
    let r = s.get(&url, &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let loc = r.location();
    assert!(loc.starts_with(REDIRECT));
    assert!(query_param(&loc, "code").is_none());
    assert_eq!(
        query_param(&loc, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&loc, "state").as_deref(), Some("abc"));
    // Unregistered redirect_uri: no redirect at all.
    let url = authorize_url(&s.public_client, "patient/*.rs", &challenge, "abc", &[])
        .replace("app.example.org", "evil.example");
    let r = s.get(&url, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.location().is_empty());
    // Unknown client.
    let r = s
        .get(
            &authorize_url("nobody", "patient/*.rs", &challenge, "abc", &[]),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Unknown launch id.
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch patient/*.rs",
                &challenge,
                "abc",
                &[("launch", "nope")],
            ),
            &[],
        )
        .await;
    assert_eq!(
        query_param(&r.location(), "error").as_deref(),
        Some("invalid_request")
    );
    // POST form works too (authorize-post).
    let mut form: Vec<(String, String)> = form_urlencoded::parse(
        authorize_url(
            &s.public_client,
            "openid patient/*.rs",
            &challenge,
            "p",
            &[],
        )
        .split_once('?')
        .unwrap()
        .1
        .as_bytes(),
    )
    .into_owned()
    .collect();
    form.retain(|(k, _)| k != "nothing");
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = s.post_form("/auth/authorize", &pairs, &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().contains("/auth/login?req="));
    // Consent denied → access_denied with state.
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch/patient patient/*.rs",
                &challenge,
                "deny-me",
                &[],
            ),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "pat"),
                ("password", "patient-password"),
                ("req", &req),
            ],
            &[],
        )
        .await;
    let cookie = cookie_of(&r);
    let r = s.get(&r.location(), &[("cookie", &cookie)]).await; // picker auto-selects own patient
    let page = s.get(&r.location(), &[("cookie", &cookie)]).await;
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/consent",
            &[("req", &req), ("csrf", &csrf), ("decision", "deny")],
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(
        query_param(&r.location(), "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(
        query_param(&r.location(), "state").as_deref(),
        Some("deny-me")
    );
    // Consent page without a session → login.
    let r = s.get(&format!("/auth/consent?req={req}"), &[]).await;
    assert!(r.status == StatusCode::BAD_REQUEST || r.location().contains("/auth/login"));
}

#[tokio::test]
async fn granular_scope_selection() {
    let s = server().await;
    let (verifier, challenge) = pkce_pair();
    let lab = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let scope = format!("launch/patient patient/Observation.rs {lab}");
    let cb = run_authorization(
        &s,
        &s.public_client,
        &scope,
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|sc| sc != "patient/Observation.rs",
    )
    .await;
    let t = exchange(
        &s,
        &query_param(&cb, "code").unwrap(),
        &verifier,
        &s.public_client,
    )
    .await
    .json();
    let granted = t["scope"].as_str().unwrap();
    assert!(
        granted.contains(lab) && !granted.split(' ').any(|x| x == "patient/Observation.rs"),
        "{granted}"
    );
    let g = authorize_bearer(
        &s.state,
        Some(&format!("Bearer {}", t["access_token"].as_str().unwrap())),
    )
    .await
    .unwrap();
    assert_eq!(
        g.scope_filter(Interaction::Search, "Observation"),
        ScopeFilter::AnyOf(vec![vec![(
            "category".into(),
            "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".into()
        )]])
    );
    assert_eq!(g.granular_filters("Observation").len(), 1);
}

#[tokio::test]
async fn ehr_launch() {
    let s = server().await;
    // Admin only.
    let r = s
        .post_json("/auth/launch", &json!({"patient": "p1"}), &[])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    let r = s
        .post_json(
            "/auth/launch",
            &json!({"patient": "p1"}),
            &[("authorization", "Bearer wrong")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = s
        .post_json(
            "/auth/launch",
            &json!({"fhirContext": [{"reference": "Patient/p1"}]}),
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "Patient not allowed in fhirContext"
    );
    let body = json!({"patient": "p1", "encounter": "e1", "fhirContext": [{"reference": "Appointment/a1", "role": "http://example.org/role"}], "intent": "reconcile"});
    let r = s
        .post_json(
            "/auth/launch",
            &body,
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let launch = r.json()["launch"].as_str().unwrap().to_string();
    assert_eq!(r.json()["iss"], BASE);
    // Also as a signed-in admin (session cookie).
    let cookie = s.login("doc", "doctor-password").await;
    let r = s
        .post_json(
            "/auth/launch",
            &json!({"patient": "p2"}),
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = s
        .post_json(
            "/auth/launch",
            &json!({"patient": "p2"}),
            &[("cookie", &s.login("pat", "patient-password").await)],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "non-admin session");

    let (verifier, challenge) = pkce_pair();
    let scope = "launch openid fhirUser user/*.rs patient/*.rs";
    let cb = run_authorization(
        &s,
        &s.public_client,
        scope,
        &challenge,
        ("doc", "doctor-password"),
        None,
        &[("launch", &launch)],
        &|_| true,
    )
    .await;
    let t = exchange(
        &s,
        &query_param(&cb, "code").unwrap(),
        &verifier,
        &s.public_client,
    )
    .await
    .json();
    assert_eq!(t["patient"], "p1");
    assert_eq!(t["encounter"], "e1");
    assert_eq!(t["intent"], "reconcile");
    assert_eq!(t["fhirContext"][0]["reference"], "Appointment/a1");
    assert_eq!(t["need_patient_banner"], true);
    assert!(t["smart_style_url"].is_string());
    let style_url = t["smart_style_url"].as_str().unwrap();
    let r = s.get(style_url, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().is_object());
    assert!(t["scope"]
        .as_str()
        .unwrap()
        .split(' ')
        .any(|x| x == "launch"));
    let g = authorize_bearer(
        &s.state,
        Some(&format!("Bearer {}", t["access_token"].as_str().unwrap())),
    )
    .await
    .unwrap();
    assert_eq!(g.encounter(), Some("e1"));
    assert!(
        !g.requires_patient_compartment(Interaction::Search, "Observation"),
        "user/ scope is broader"
    );
}

#[tokio::test]
async fn bearer_validation_failures() {
    let s = server().await;
    let e = authorize_bearer(&s.state, None).await.unwrap_err();
    assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(e.www_authenticate().unwrap(), "Bearer realm=\"kiln\"");
    let e = authorize_bearer(&s.state, Some("Basic abc"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
    let e = authorize_bearer(&s.state, Some("Bearer not.a.jwt"))
        .await
        .unwrap_err();
    assert!(e.www_authenticate().unwrap().contains("invalid_token"));

    let ring = s.state.key_ring();
    let key = ring.active().unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64, aud: &str| {
        json!({"iss": BASE, "sub": "pat", "aud": aud, "exp": exp, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
               "client_id": "public-app", "scope": "patient/*.rs", "patient": "p1"})
    };
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    let good = jsonwebtoken::encode(&header, &claims(now + 300, BASE), &key.encoding).unwrap();
    let g = authorize_bearer(&s.state, Some(&format!("Bearer {good}")))
        .await
        .unwrap();
    assert_eq!(g.patient(), Some("p1"));
    // Expired.
    let expired = jsonwebtoken::encode(&header, &claims(now - 3600, BASE), &key.encoding).unwrap();
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {expired}")))
            .await
            .is_err()
    );
    // Wrong audience.
    let other = jsonwebtoken::encode(
        &header,
        &claims(now + 300, "http://other/fhir"),
        &key.encoding,
    )
    .unwrap();
    assert!(authorize_bearer(&s.state, Some(&format!("Bearer {other}")))
        .await
        .is_err());
    // Tampered payload (scope widened), signature kept.
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    payload["scope"] = json!("system/*.cruds");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(payload.to_string()),
        parts[2]
    );
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {tampered}")))
            .await
            .is_err()
    );
    // alg: none.
    let none_header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {unsigned}")))
            .await
            .is_err()
    );
    // HS256 with the public key as secret (algorithm confusion).
    let mut hs = jsonwebtoken::Header::new(Algorithm::HS256);
    hs.kid = Some(key.kid.clone());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims(now + 300, BASE),
        &jsonwebtoken::EncodingKey::from_secret(key.jwk["n"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {confused}")))
            .await
            .is_err()
    );
    // Unknown kid.
    let mut h2 = header.clone();
    h2.kid = Some("unknown".into());
    let unknown = jsonwebtoken::encode(&h2, &claims(now + 300, BASE), &key.encoding).unwrap();
    assert!(
        authorize_bearer(&s.state, Some(&format!("Bearer {unknown}")))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid() {
    let s = server().await;
    let cc = add_client(
        s.state.store(),
        NewClient {
            client_name: "svc".into(),
            auth_method: Some(ClientAuthMethod::ClientSecretBasic),
            grant_types: vec!["client_credentials".into()],
            scope: Some("system/*.rs".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let basic_auth = basic(&cc.client.client_id, cc.client_secret.as_deref().unwrap());
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.rs system/Observation.c user/*.rs"),
            ],
            &[("authorization", &basic_auth)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t = r.json();
    assert_eq!(
        t["scope"], "system/Patient.rs",
        "only allowed system scopes"
    );
    assert!(t["expires_in"].as_i64().unwrap() <= 300);
    assert!(t.get("refresh_token").is_none());
    let old = t["access_token"].as_str().unwrap().to_string();
    let old_kid = s.state.key_ring().active().unwrap().kid.clone();
    s.state.rotate_signing_key().await.unwrap();
    let ring = s.state.key_ring();
    assert_ne!(ring.active().unwrap().kid, old_kid);
    let jwks = s.get("/auth/jwks", &[]).await.json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    assert!(authorize_bearer(&s.state, Some(&format!("Bearer {old}")))
        .await
        .unwrap()
        .is_system());
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.rs"),
            ],
            &[("authorization", &basic_auth)],
        )
        .await;
    let new = r.json()["access_token"].as_str().unwrap().to_string();
    let h = jsonwebtoken::decode_header(&new).unwrap();
    assert_eq!(h.kid.as_deref(), Some(ring.active().unwrap().kid.as_str()));
    // Public clients can't use client_credentials, nor invalid scopes.
    let r = s
        .post_form(
            "/auth/token",
            &[("grant_type", "client_credentials"), ("scope", "user/*.rs")],
            &[("authorization", &basic_auth)],
        )
        .await;
    assert_eq!(r.json()["error"], "invalid_scope");
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/*.rs"),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "unauthorized_client");
}

#[tokio::test]
async fn dynamic_registration() {
    let s = server().await;
    let r = s.post_json("/auth/register", &json!({"client_name": "Reg", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_basic"}), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let reg = r.json();
    let id = reg["client_id"].as_str().unwrap();
    let secret = reg["client_secret"].as_str().unwrap();
    assert_eq!(reg["token_endpoint_auth_method"], "client_secret_basic");
    let stored = s.state.store().get_client(id).await.unwrap().unwrap();
    assert_ne!(
        stored.secret_hash.as_deref(),
        Some(secret),
        "secret is stored hashed"
    );
    let r = s
        .post_json(
            "/auth/register",
            &json!({"redirect_uris": ["not a uri"]}),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_redirect_uri");
    let r = s.post_json("/auth/register", &json!({"token_endpoint_auth_method": "private_key_jwt", "grant_types": ["client_credentials"]}), &[]).await;
    assert_eq!(
        r.json()["error"],
        "invalid_client_metadata",
        "jwks required"
    );
    // Disabled registration.
    let mut c = config();
    c.dynamic_registration = false;
    let s2 = server_with(c, std::sync::Arc::new(MemoryAuthStore::new())).await;
    assert_eq!(
        s2.post_json("/auth/register", &json!({"redirect_uris": [REDIRECT]}), &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert!(s2
        .get("/.well-known/smart-configuration", &[])
        .await
        .json()
        .get("registration_endpoint")
        .is_none());
}

#[tokio::test]
async fn login_lockout_and_rate_limit() {
    let mut c = config();
    c.max_failed_logins = 2;
    c.login_rate_per_minute = 5;
    let s = server_with(c, std::sync::Arc::new(MemoryAuthStore::new())).await;
    let r = s
        .post_form(
            "/auth/login",
            &[("username", "pat"), ("password", "nope")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("role=\"alert\""));
    let r = s
        .post_form(
            "/auth/login",
            &[("username", "pat"), ("password", "nope")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "locked");
    let r = s
        .post_form(
            "/auth/login",
            &[("username", "pat"), ("password", "patient-password")],
            &[],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "still locked with the right password"
    );
    let mut limited = false;
    for _ in 0..5 {
        let r = s
            .post_form(
                "/auth/login",
                &[("username", "doc"), ("password", "doctor-password")],
                &[],
            )
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
        }
    }
    assert!(limited, "login is rate limited");
}

async fn full_launch_over(store: std::sync::Arc<dyn AuthStore>) {
    let s = server_with(config(), store.clone()).await;
    let (verifier, challenge) = pkce_pair();
    let cb = run_authorization(
        &s,
        &s.public_client,
        "launch/patient offline_access patient/*.rs",
        &challenge,
        ("pat", "patient-password"),
        None,
        &[],
        &|_| true,
    )
    .await;
    let code = query_param(&cb, "code").unwrap();
    let t = exchange(&s, &code, &verifier, &s.public_client)
        .await
        .json();
    assert_eq!(t["patient"], "p1");
    assert_eq!(
        exchange(&s, &code, &verifier, &s.public_client)
            .await
            .status,
        StatusCode::BAD_REQUEST,
        "single use in SQL too"
    );
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", t["refresh_token"].as_str().unwrap()),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = s
        .post_form(
            "/auth/revoke",
            &[
                ("token", r.json()["refresh_token"].as_str().unwrap()),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        authorize_bearer(
            &s.state,
            Some(&format!("Bearer {}", t["access_token"].as_str().unwrap()))
        )
        .await
        .is_err(),
        "grant revoked"
    );
    // A second AuthState over the same store reuses the persisted key.
    let again = AuthState::new(config(), store.clone()).await.unwrap();
    assert_eq!(
        again.key_ring().active().unwrap().kid,
        s.state.key_ring().active().unwrap().kid
    );
    assert!(again.purge_expired().await.is_ok());
    assert_eq!(store.list_users().await.unwrap().len(), 2);
}

#[tokio::test]
async fn sql_store_backs_a_full_launch() {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    let store = SqlAuthStore::new(AnyAuthPool::Sqlite(pool));
    store.migrate().await.unwrap();
    full_launch_over(std::sync::Arc::new(store)).await;
}

/// Runs against PostgreSQL when `KILN_TEST_DATABASE_URL` is set (its `auth_*` tables are emptied).
#[tokio::test]
async fn postgres_store_backs_a_full_launch() {
    let Ok(url) = std::env::var("KILN_TEST_DATABASE_URL") else {
        eprintln!("skipping postgres_store_backs_a_full_launch: KILN_TEST_DATABASE_URL not set");
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let store = SqlAuthStore::new(AnyAuthPool::Postgres(pool.clone()));
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    for kind in kiln_smart_auth::store::RecordKind::ALL {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", kind.table())))
            .execute(&pool)
            .await
            .unwrap();
    }
    full_launch_over(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn rotation_by_another_instance_is_picked_up() {
    let store: std::sync::Arc<dyn AuthStore> = std::sync::Arc::new(MemoryAuthStore::new());
    let a = server_with(config(), store.clone()).await;
    let b = AuthState::new(config(), store.clone()).await.unwrap();
    a.state.rotate_signing_key().await.unwrap();
    let cc = add_client(
        store.as_ref(),
        NewClient {
            client_name: "svc".into(),
            auth_method: Some(ClientAuthMethod::ClientSecretBasic),
            grant_types: vec!["client_credentials".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = a
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Observation.rs"),
            ],
            &[(
                "authorization",
                &basic(&cc.client.client_id, cc.client_secret.as_deref().unwrap()),
            )],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let token = r.json()["access_token"].as_str().unwrap().to_string();
    assert_ne!(
        b.key_ring().active().unwrap().kid,
        a.state.key_ring().active().unwrap().kid
    );
    let g = authorize_bearer(&b, Some(&format!("Bearer {token}")))
        .await
        .unwrap();
    assert!(g.allows(Interaction::Search, "Observation"));
    assert_eq!(b.key_ring().keys.len(), 2, "b reloaded the new key");
}

#[tokio::test]
async fn ehr_launch_redirect_and_capability_security() {
    let s = server().await;
    let app = add_client(
        s.state.store(),
        NewClient {
            client_name: "EHR app".into(),
            redirect_uris: vec![REDIRECT.into()],
            launch_uri: Some("https://app.example.org/launch".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .client;
    let path = format!(
        "/auth/ehr-launch?client_id={}&patient=p2&encounter=e9",
        app.client_id
    );
    assert_eq!(
        s.get(&path, &[]).await.status,
        StatusCode::SEE_OTHER,
        "login first"
    );
    let pat = s.login("pat", "patient-password").await;
    assert_eq!(
        s.get(&path, &[("cookie", &pat)]).await.status,
        StatusCode::FORBIDDEN,
        "not pat's patient"
    );
    let doc = s.login("doc", "doctor-password").await;
    let r = s.get(&path, &[("cookie", &doc)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let loc = r.location();
    assert!(loc.starts_with("https://app.example.org/launch?"), "{loc}");
    assert_eq!(query_param(&loc, "iss").as_deref(), Some(BASE));
    let launch = query_param(&loc, "launch").unwrap();
    let (verifier, challenge) = pkce_pair();
    let cb = run_authorization(
        &s,
        &app.client_id,
        "launch openid fhirUser patient/*.rs",
        &challenge,
        ("doc", "doctor-password"),
        None,
        &[("launch", &launch)],
        &|_| true,
    )
    .await;
    let t = exchange(
        &s,
        &query_param(&cb, "code").unwrap(),
        &verifier,
        &app.client_id,
    )
    .await
    .json();
    assert_eq!(t["patient"], "p2");
    assert_eq!(t["encounter"], "e9");

    let sec = capability_security(&s.state);
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = sec["extension"][0]["extension"].as_array().unwrap();
    assert!(uris
        .iter()
        .any(|e| e["url"] == "token" && e["valueUri"] == format!("{BASE}/auth/token")));
    assert_eq!(
        smart_configuration_document(&s.state)["token_endpoint"],
        format!("{BASE}/auth/token")
    );
}

#[tokio::test]
async fn refresh_token_reuse_revokes_the_grant() {
    for detection in [true, false] {
        let mut c = config();
        c.refresh_reuse_detection = detection;
        let s = server_with(c, std::sync::Arc::new(MemoryAuthStore::new())).await;
        let (verifier, challenge) = pkce_pair();
        let cb = run_authorization(
            &s,
            &s.public_client,
            "launch/patient offline_access patient/*.rs",
            &challenge,
            ("pat", "patient-password"),
            None,
            &[],
            &|_| true,
        )
        .await;
        let t = exchange(
            &s,
            &query_param(&cb, "code").unwrap(),
            &verifier,
            &s.public_client,
        )
        .await
        .json();
        let old = t["refresh_token"].as_str().unwrap().to_string();
        let refresh = |tok: String| {
            let s = &s;
            async move {
                s.post_form(
                    "/auth/token",
                    &[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", &tok),
                        ("client_id", &s.public_client),
                    ],
                    &[],
                )
                .await
            }
        };
        let r = refresh(old.clone()).await;
        assert_eq!(r.status, StatusCode::OK);
        let new = r.json()["refresh_token"].as_str().unwrap().to_string();
        let new_access = r.json()["access_token"].as_str().unwrap().to_string();
        let r = refresh(old.clone()).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "rotated-out token refused"
        );
        assert_eq!(r.json()["error"], "invalid_grant");
        let r = refresh(new).await;
        let still_valid = authorize_bearer(&s.state, Some(&format!("Bearer {new_access}")))
            .await
            .is_ok();
        if detection {
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "reuse revoked the grant");
            assert!(!still_valid);
        } else {
            assert_eq!(r.status, StatusCode::OK);
            assert!(still_valid);
        }
    }
}

#[tokio::test]
async fn ehr_launch_is_bound_to_user_and_client() {
    let s = server().await;
    let admin = [("authorization", format!("Bearer {ADMIN_KEY}"))];
    let admin: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = s
        .post_json(
            "/auth/launch",
            &json!({"patient": "p1", "username": "doc", "client_id": s.public_client}),
            &admin,
        )
        .await;
    let launch = r.json()["launch"].as_str().unwrap().to_string();
    let (_v, challenge) = pkce_pair();
    // Another client can't use it.
    let r = s
        .get(
            &authorize_url(
                &s.secret_client,
                "launch patient/*.rs",
                &challenge,
                "s",
                &[("launch", &launch)],
            ),
            &[],
        )
        .await;
    assert_eq!(
        query_param(&r.location(), "error").as_deref(),
        Some("invalid_request")
    );
    // Another user can't complete it.
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch patient/*.rs",
                &challenge,
                "s",
                &[("launch", &launch)],
            ),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "pat"),
                ("password", "patient-password"),
                ("req", &req),
            ],
            &[],
        )
        .await;
    let cookie = cookie_of(&r);
    let r = s.get(&r.location(), &[("cookie", &cookie)]).await;
    let page = s.get(&r.location(), &[("cookie", &cookie)]).await;
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/consent",
            &[
                ("req", &req),
                ("csrf", &csrf),
                ("decision", "approve"),
                ("scope", "patient/*.rs"),
            ],
            &[("cookie", &cookie)],
        )
        .await;
    assert_eq!(
        query_param(&r.location(), "error").as_deref(),
        Some("access_denied")
    );
    assert!(query_param(&r.location(), "code").is_none());
}

#[tokio::test]
async fn maintenance_rotates_old_keys_and_purges() {
    let mut c = config();
    c.key_rotation_secs = Some(-1); // every pass
    let s = server_with(c, std::sync::Arc::new(MemoryAuthStore::new())).await;
    let before = s.state.key_ring().active().unwrap().kid.clone();
    s.state.run_maintenance().await.unwrap();
    assert_ne!(s.state.key_ring().active().unwrap().kid, before);
    assert!(
        s.state.key_ring().find(&before).is_some(),
        "old key still published"
    );
    let mut c = config();
    c.key_rotation_secs = None;
    let s = server_with(c, std::sync::Arc::new(MemoryAuthStore::new())).await;
    let before = s.state.key_ring().active().unwrap().kid.clone();
    let handle = s
        .state
        .spawn_maintenance(std::time::Duration::from_millis(10));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    handle.abort();
    assert_eq!(s.state.key_ring().active().unwrap().kid, before);
}

struct Directory;

#[async_trait::async_trait]
impl PatientDirectory for Directory {
    async fn search(&self, text: &str, _limit: usize) -> Vec<(String, String)> {
        [("p7", "Seven, Sam"), ("p8", "Eight, Eve")]
            .iter()
            .filter(|(id, name)| {
                text.is_empty()
                    || id.contains(text)
                    || name.to_lowercase().contains(&text.to_lowercase())
            })
            .map(|(id, name)| (id.to_string(), name.to_string()))
            .collect()
    }

    async fn display_name(&self, id: &str) -> Option<String> {
        match id {
            "p7" => Some("Seven, Sam".into()),
            "p8" => Some("Eight, Eve".into()),
            _ => None,
        }
    }

    /// p8 has two encounters (most recent first), p7 none.
    async fn encounters(&self, patient: &str, limit: usize) -> Vec<EncounterChoice> {
        let mut v = Vec::new();
        if patient == "p8" {
            v.push(EncounterChoice {
                id: "e8-new".into(),
                description: "Emergency visit".into(),
                period: Some("2024-05-02 – 2024-05-03".into()),
                status: Some("finished".into()),
            });
            v.push(EncounterChoice {
                id: "e8-old".into(),
                description: "Check-up <annual>".into(),
                period: Some("2021-01-10".into()),
                status: None,
            });
        }
        v.truncate(limit);
        v
    }
}

/// The base server with [`Directory`] plugged in, a practitioner `nurse` and a user `aunt`
/// linked to p7 only (neither a Patient nor a practitioner).
async fn directory_server() -> Server {
    let base = server().await;
    for (username, fhir_user, patients) in [
        ("nurse", Some("Practitioner/n1"), vec![]),
        ("aunt", Some("RelatedPerson/r1"), vec!["p7".to_string()]),
    ] {
        add_user(
            base.state.store(),
            NewUser {
                username: username.into(),
                password: format!("{username}-password"),
                fhir_user: fhir_user.map(str::to_string),
                patients,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let state = base
        .state
        .clone()
        .with_patient_directory(std::sync::Arc::new(Directory));
    Server {
        router: router(state.clone()),
        state,
        ..base
    }
}

/// authorize → login as `user`; the `req` id and the session cookie.
async fn start_as(s: &Server, user: &str, scope: &str, challenge: &str) -> (String, String) {
    let r = s
        .get(
            &authorize_url(&s.public_client, scope, challenge, "enc", &[]),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let password = format!("{user}-password");
    let r = s
        .post_form(
            "/auth/login",
            &[("username", user), ("password", &password), ("req", &req)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "login {user}");
    (req, cookie_of(&r))
}

/// Picks `patient` on the picker; the redirect that follows.
async fn pick_patient(s: &Server, req: &str, cookie: &str, patient: &str) -> String {
    let ck = [("cookie", cookie)];
    let page = s.get(&format!("/auth/select-patient?req={req}"), &ck).await;
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", req), ("csrf", &csrf), ("patient", patient)],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    r.location()
}

/// Approves the consent page keeping the scopes `keep` accepts; the token response.
async fn approve(
    s: &Server,
    req: &str,
    cookie: &str,
    scope: &str,
    verifier: &str,
    keep: &dyn Fn(&str) -> bool,
) -> Value {
    let ck = [("cookie", cookie)];
    let page = s.get(&format!("/auth/consent?req={req}"), &ck).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let csrf = hidden(&page.body, "csrf");
    let mut form = vec![
        ("req", req),
        ("csrf", csrf.as_str()),
        ("decision", "approve"),
    ];
    for sc in scope.split(' ').filter(|sc| keep(sc)) {
        form.push(("scope", sc));
    }
    let r = s.post_form("/auth/consent", &form, &ck).await;
    let code = query_param(&r.location(), "code").expect("code");
    let t = exchange(s, &code, verifier, &s.public_client).await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.body);
    t.json()
}

#[tokio::test]
async fn standalone_encounter_picker_puts_the_chosen_encounter_in_the_token() {
    let s = directory_server().await;
    let scope = "launch/patient launch/encounter patient/*.rs";
    let (verifier, challenge) = pkce_pair();
    let (req, cookie) = start_as(&s, "nurse", scope, &challenge).await;
    let ck = [("cookie", cookie.as_str())];
    let next = pick_patient(&s, &req, &cookie, "p8").await;
    assert!(next.contains("/auth/select-encounter?req="), "{next}");
    // the consent page is not reachable before the encounter is chosen
    let r = s.get(&format!("/auth/consent?req={req}"), &ck).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().contains("/auth/select-encounter"));
    let page = s.get(&next, &ck).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<h1>Select an encounter</h1>"));
    assert!(page.body.contains("Eight, Eve"), "patient named");
    let new = page.body.find("Encounter/e8-new").expect("e8-new listed");
    let old = page.body.find("Encounter/e8-old").expect("e8-old listed");
    assert!(new < old, "most recent first");
    assert!(
        page.body.contains("2024-05-02 – 2024-05-03"),
        "period shown"
    );
    assert!(page
        .body
        .contains("Emergency visit (2024-05-02 – 2024-05-03, finished)"));
    assert!(page.body.contains("Check-up &lt;annual&gt;"), "escaped");
    assert!(
        page.body.contains("<label for=\"e0\">") && page.body.contains("<legend>"),
        "labelled radio buttons in a fieldset"
    );
    let csrf = hidden(&page.body, "csrf");
    // an encounter of another patient, a missing choice and a bad form token are refused
    for (enc, token, status) in [
        ("e7-x", csrf.as_str(), StatusCode::BAD_REQUEST),
        ("", csrf.as_str(), StatusCode::BAD_REQUEST),
        ("e8-new", "forged", StatusCode::FORBIDDEN),
    ] {
        let r = s
            .post_form(
                "/auth/select-encounter",
                &[("req", &req), ("csrf", token), ("encounter", enc)],
                &ck,
            )
            .await;
        assert_eq!(r.status, status, "encounter {enc:?}");
    }
    let r = s
        .post_form(
            "/auth/select-encounter",
            &[("req", &req), ("csrf", &csrf), ("encounter", "e8-old")],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().contains("/auth/consent"), "{}", r.location());
    let consent = s.get(&r.location(), &ck).await;
    assert!(consent.body.contains("Encounter/e8-old"));
    let t = approve(&s, &req, &cookie, scope, &verifier, &|_| true).await;
    assert_eq!(t["patient"], "p8");
    assert_eq!(t["encounter"], "e8-old");
    assert!(t["scope"].as_str().unwrap().contains("launch/encounter"));
    let intro = s
        .post_form(
            "/auth/introspect",
            &[("token", t["access_token"].as_str().unwrap())],
            &[(
                "authorization",
                &format!("Bearer {}", t["access_token"].as_str().unwrap()),
            )],
        )
        .await
        .json();
    assert_eq!(intro["encounter"], "e8-old");
}

#[tokio::test]
async fn standalone_encounter_picker_proceeds_without_encounters_and_honours_unticking() {
    let s = directory_server().await;
    let scope = "launch/patient launch/encounter patient/*.rs";
    // p7 has no encounters: straight on to consent, no encounter in the token
    let (verifier, challenge) = pkce_pair();
    let (req, cookie) = start_as(&s, "nurse", scope, &challenge).await;
    let next = pick_patient(&s, &req, &cookie, "p7").await;
    let r = s.get(&next, &[("cookie", cookie.as_str())]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().contains("/auth/consent"), "{}", r.location());
    let t = approve(&s, &req, &cookie, scope, &verifier, &|_| true).await;
    assert_eq!(t["patient"], "p7");
    assert!(t.get("encounter").is_none(), "{t}");

    // chosen, then launch/encounter unticked on the consent page: no encounter handed out
    let (verifier, challenge) = pkce_pair();
    let (req, cookie) = start_as(&s, "nurse", scope, &challenge).await;
    let ck = [("cookie", cookie.as_str())];
    let next = pick_patient(&s, &req, &cookie, "p8").await;
    let page = s.get(&next, &ck).await;
    let csrf = hidden(&page.body, "csrf");
    s.post_form(
        "/auth/select-encounter",
        &[("req", &req), ("csrf", &csrf), ("encounter", "e8-new")],
        &ck,
    )
    .await;
    let t = approve(&s, &req, &cookie, scope, &verifier, &|sc| {
        sc != "launch/encounter"
    })
    .await;
    assert_eq!(t["patient"], "p8");
    assert!(t.get("encounter").is_none(), "{t}");

    // without launch/encounter no encounter picker is shown
    let (verifier, challenge) = pkce_pair();
    let scope = "launch/patient patient/*.rs";
    let (req, cookie) = start_as(&s, "nurse", scope, &challenge).await;
    let next = pick_patient(&s, &req, &cookie, "p8").await;
    assert!(next.contains("/auth/consent"), "{next}");
    let r = s
        .get(
            &format!("/auth/select-encounter?req={req}"),
            &[("cookie", cookie.as_str())],
        )
        .await;
    assert!(r.location().contains("/auth/consent"));
    let t = approve(&s, &req, &cookie, scope, &verifier, &|_| true).await;
    assert!(t.get("encounter").is_none(), "{t}");
}

#[tokio::test]
async fn picker_search_is_limited_to_the_patients_a_user_may_see() {
    let s = directory_server().await;
    let (_, challenge) = pkce_pair();
    // a practitioner finds any patient by name
    let (req, cookie) = start_as(&s, "nurse", "launch/patient patient/*.rs", &challenge).await;
    let ck = [("cookie", cookie.as_str())];
    let page = s
        .get(&format!("/auth/select-patient?req={req}&q=seven"), &ck)
        .await;
    assert!(page.body.contains("Seven, Sam"), "{}", page.body);
    // a RelatedPerson user linked to p7 sees p7, never p8, whatever they search for
    let (req, cookie) = start_as(&s, "aunt", "launch/patient patient/*.rs", &challenge).await;
    let ck = [("cookie", cookie.as_str())];
    let page = s
        .get(&format!("/auth/select-patient?req={req}&q=eight"), &ck)
        .await;
    assert!(page.body.contains("Patient/p7"), "linked patient listed");
    assert!(!page.body.contains("Eight, Eve"), "{}", page.body);
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", &csrf), ("patient", "p8")],
            &ck,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "p8 is not visible to aunt"
    );
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", &csrf), ("patient", "p7")],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);

    // the trait's default search_visible filters the plain search
    let only = PatientVisibility::Only(vec!["p7".into()]);
    assert_eq!(
        Directory.search_visible("", &only, 10).await,
        vec![("p7".to_string(), "Seven, Sam".to_string())]
    );
    assert_eq!(
        Directory
            .search_visible("", &PatientVisibility::Any, 10)
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn picker_uses_patient_directory_for_practitioners() {
    let base = server().await;
    add_user(
        base.state.store(),
        NewUser {
            username: "nurse".into(),
            password: "nurse-password".into(),
            fhir_user: Some("Practitioner/n1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let state = base
        .state
        .clone()
        .with_patient_directory(std::sync::Arc::new(Directory));
    let s = Server {
        router: router(state.clone()),
        state,
        ..base
    };
    let (verifier, challenge) = pkce_pair();
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch/patient patient/*.rs",
                &challenge,
                "d",
                &[],
            ),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "nurse"),
                ("password", "nurse-password"),
                ("req", &req),
            ],
            &[],
        )
        .await;
    let cookie = cookie_of(&r);
    let ck = [("cookie", cookie.as_str())];
    let page = s
        .get(&format!("/auth/select-patient?req={req}&q=eight"), &ck)
        .await;
    assert!(
        page.body.contains("Eight, Eve") && !page.body.contains("Seven, Sam"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("name=\"patient_id\""),
        "no free entry for non-admins"
    );
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", &csrf), ("patient", "p1")],
            &ck,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "p1 is not in the directory"
    );
    let r = s
        .post_form(
            "/auth/select-patient",
            &[("req", &req), ("csrf", &csrf), ("patient", "p8")],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let page = s.get(&r.location(), &ck).await;
    let csrf = hidden(&page.body, "csrf");
    let r = s
        .post_form(
            "/auth/consent",
            &[
                ("req", &req),
                ("csrf", &csrf),
                ("decision", "approve"),
                ("scope", "launch/patient"),
                ("scope", "patient/*.rs"),
            ],
            &ck,
        )
        .await;
    let t = exchange(
        &s,
        &query_param(&r.location(), "code").unwrap(),
        &verifier,
        &s.public_client,
    )
    .await
    .json();
    assert_eq!(t["patient"], "p8");
}

#[tokio::test]
async fn online_access_ends_with_the_session() {
    let s = server().await;
    let (verifier, challenge) = pkce_pair();
    let r = s
        .get(
            &authorize_url(
                &s.public_client,
                "launch/patient online_access patient/*.rs",
                &challenge,
                "o",
                &[],
            ),
            &[],
        )
        .await;
    let req = query_param(&r.location(), "req").unwrap();
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "pat"),
                ("password", "patient-password"),
                ("req", &req),
            ],
            &[],
        )
        .await;
    let cookie = cookie_of(&r);
    let ck = [("cookie", cookie.as_str())];
    let r = s.get(&r.location(), &ck).await;
    let page = s.get(&r.location(), &ck).await;
    let csrf = hidden(&page.body, "csrf");
    assert!(
        !page.body.contains("offline access:"),
        "no offline notice for online_access"
    );
    let r = s
        .post_form(
            "/auth/consent",
            &[
                ("req", &req),
                ("csrf", &csrf),
                ("decision", "approve"),
                ("scope", "launch/patient"),
                ("scope", "online_access"),
                ("scope", "patient/*.rs"),
            ],
            &ck,
        )
        .await;
    let t = exchange(
        &s,
        &query_param(&r.location(), "code").unwrap(),
        &verifier,
        &s.public_client,
    )
    .await
    .json();
    let rt = t["refresh_token"]
        .as_str()
        .expect("online_access gives a refresh token")
        .to_string();
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let rt = r.json()["refresh_token"].as_str().unwrap().to_string();
    s.post_form("/auth/logout", &[], &ck).await;
    let r = s
        .post_form(
            "/auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", &s.public_client),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "session ended");
}
