//! The Inferno SMART App Launch STU2.2 and ONC (g)(10) authorization checks, reimplemented against
//! the integrated server (FHIR API + SMART authorization server, `--auth on`), over HTTP only.
//!
//! Check names carry the Inferno test id (`smart_app_launch/<file>` or the g10 short id from
//! `/work/shared/inferno/g10_short_id_map.yml`). When `/work/shared/inferno` is present the test
//! also confirms the titles it reimplements are still in the Inferno title list.
//!
//! Prints `<check>: passed/failed` and `SMART checks: N passed, M failed`; fails if any failed.

mod smart_support;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kiln_conformance_tests::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use smart_support::*;

/// Inferno test titles this suite reimplements (from `inferno_test_titles.tsv`).
const INFERNO_TITLES: &[&str] = &[
    "FHIR server makes SMART configuration available from well-known endpoint",
    "Well-known configuration contains required fields",
    "SMART .well-known/smart-configuration Endpoint Enables Cross-Origin Resour",
    "SMART metadata Endpoint Enables Cross-Origin Resource Sharing (CORS)",
    "OAuth server redirects client browser to app redirect URI",
    "OAuth server sends code parameter",
    "OAuth token exchange request succeeds when supplied correct information",
    "Token exchange response body contains required information encoded in JS",
    "Response includes correct HTTP Cache-Control and Pragma headers",
    "SMART Token Endpoint Enables Cross-Origin Resource Sharing (CORS)",
    "ID token header contains required information",
    "ID token payload has required claims and a valid signature",
    "FHIR resource representing the current user can be retrieved",
    "JWKS can be retrieved",
    "OpenID Connect well-known configuration can be retrieved",
    "Server successfully refreshes the access token when optional scope parameter omi",
    "Token refresh response contains all required fields",
    "EHR server sends launch parameter",
    "Authorization request fails when client supplies invalid grant_",
    "Authorization request fails when client supplies invalid JWT token",
    "Authorization request succeeds when supplied correct",
    "Access to Patient resource returns unauthorized after token re",
    "Refresh token exchange fails when supplied an invali",
];

fn ok_status(r: &Resp, want: u16) -> Result<(), String> {
    ensure(
        r.status.as_u16() == want,
        format!("expected {want}, got {}", r.short()),
    )
}

fn cors_ok(r: &Resp, origin: &str) -> Result<(), String> {
    let v = r.header("access-control-allow-origin");
    ensure(
        v.as_deref() == Some("*") || v.as_deref() == Some(origin),
        format!("Access-Control-Allow-Origin: {v:?} ({})", r.short()),
    )
}

fn token_body_ok(t: &Value, expect_refresh: bool) -> Result<(), String> {
    ensure(
        t["access_token"].as_str().is_some_and(|s| !s.is_empty()),
        "access_token missing",
    )?;
    ensure(
        t["token_type"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer")),
        format!("token_type {}", t["token_type"]),
    )?;
    ensure(
        t["expires_in"].as_i64().is_some_and(|e| e > 0 && e <= 3600),
        format!("expires_in {}", t["expires_in"]),
    )?;
    ensure(t["scope"].is_string(), "scope missing")?;
    if expect_refresh {
        ensure(t["refresh_token"].is_string(), "refresh_token missing")?;
    }
    Ok(())
}

fn cache_headers_ok(r: &Resp) -> Result<(), String> {
    let cc = r.header("cache-control").unwrap_or_default();
    ensure(cc.contains("no-store"), format!("Cache-Control: {cc:?}"))?;
    let pragma = r.header("pragma").unwrap_or_default();
    ensure(pragma.contains("no-cache"), format!("Pragma: {pragma:?}"))
}

fn has_scope(granted: &str, s: &str) -> bool {
    granted.split(' ').any(|x| x == s)
}

async fn jwks_key(k: &Kiln, kid: &str) -> Result<DecodingKey, String> {
    let jwks = k.get("auth/jwks", &[]).await.json();
    let key = jwks["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|x| x["kid"] == kid))
        .cloned()
        .ok_or(format!("kid {kid} not in JWKS"))?;
    let jwk: Jwk = serde_json::from_value(key).map_err(|e| e.to_string())?;
    DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())
}

async fn introspect(k: &Kiln, token: &str, bearer: &str) -> Resp {
    let auth = format!("Bearer {bearer}");
    k.post_form(
        "auth/introspect",
        &[("token", token)],
        &[("authorization", &auth)],
    )
    .await
}

/// Every check on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_inferno_sqlite() {
    let k = match start_on(Backend::Sqlite).await {
        Ok(Some(k)) => k,
        Ok(None) => unreachable!("SQLite is always available"),
        Err(e) => panic!("cannot start Kiln with SMART: {e}"),
    };
    let names = smart_inferno_checks(&k).await;
    k.finish().await;
    assert_eq!(names.len(), INFERNO_CHECK_COUNT, "checks run: {names:?}");
}

/// The same checks on PostgreSQL (`SqlAuthStore` on PostgreSQL), with identical results: the same
/// named checks run, all pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_inferno_postgres() {
    let k = match start_on(Backend::Postgres).await {
        Ok(Some(k)) => k,
        Ok(None) => return,
        Err(e) => panic!("cannot start Kiln with SMART on PostgreSQL: {e}"),
    };
    let names = smart_inferno_checks(&k).await;
    k.finish().await;
    assert_eq!(names.len(), INFERNO_CHECK_COUNT, "checks run: {names:?}");
}

/// How many named checks [`smart_inferno_checks`] records (both backends must run all of them).
const INFERNO_CHECK_COUNT: usize = 59 + STANDALONE_ENCOUNTER_CHECKS;

/// Runs every check against `k`; fails if any failed; returns the check names.
async fn smart_inferno_checks(k: &Kiln) -> Vec<String> {
    if let Some(dir) =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/inferno"))
            .is_dir()
            .then_some(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/inferno"))
    {
        let titles =
            std::fs::read_to_string(format!("{dir}/inferno_test_titles.tsv")).unwrap_or_default();
        for t in INFERNO_TITLES {
            assert!(titles.contains(t), "Inferno title not found: {t}");
        }
        println!(
            "reimplementing {} Inferno SMART titles (checked against inferno_test_titles.tsv)",
            INFERNO_TITLES.len()
        );
    } else {
        println!(
            "notice: ../shared/inferno absent; running the checks without the title cross-check"
        );
    }

    println!("backend: {:?}", k.backend);
    let mut rep = Report::default();
    let origin = "https://app.example.org";
    let base = k.base.clone();

    // ---------------------------------------------------------------- discovery
    let wk = k
        .get(
            ".well-known/smart-configuration",
            &[("accept", "text/html")],
        )
        .await;
    let cfg = wk.json();
    rep.record(
        "1.8.01 well_known_endpoint: smart-configuration is JSON regardless of Accept",
        (|| {
            ok_status(&wk, 200)?;
            let ct = wk.header("content-type").unwrap_or_default();
            ensure(
                ct.starts_with("application/json"),
                format!("content-type {ct}"),
            )?;
            ensure(cfg.is_object(), "body is not a JSON object")
        })(),
    );
    rep.record(
        "1.8.02 well_known_capabilities_stu2: required fields",
        (|| {
            for f in [
                "issuer",
                "jwks_uri",
                "authorization_endpoint",
                "token_endpoint",
                "grant_types_supported",
                "capabilities",
                "code_challenge_methods_supported",
            ] {
                ensure(!cfg[f].is_null(), format!("{f} missing"))?;
            }
            let methods = cfg["code_challenge_methods_supported"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            ensure(methods.contains(&json!("S256")), "S256 not supported")?;
            ensure(
                !methods.contains(&json!("plain")),
                "plain must not be offered",
            )?;
            ensure(
                cfg["grant_types_supported"]
                    .as_array()
                    .is_some_and(|g| g.contains(&json!("authorization_code"))),
                "authorization_code not in grant_types_supported",
            )?;
            ensure(
                cfg["token_endpoint"] == json!(format!("{base}/auth/token")),
                format!("token_endpoint {}", cfg["token_endpoint"]),
            )
        })(),
    );
    rep.record(
        "1.8.05 g10_smart_well_known_capabilities: ONC-required capabilities",
        (|| {
            let caps: Vec<&str> = cfg["capabilities"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for c in [
                "launch-ehr",
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "sso-openid-connect",
                "context-banner",
                "context-style",
                "context-ehr-patient",
                "context-standalone-patient",
                "permission-offline",
                "permission-patient",
                "permission-user",
                "permission-v2",
                "authorize-post",
            ] {
                ensure(caps.contains(&c), format!("capability {c} missing"))?;
            }
            Ok(())
        })(),
    );
    let r = k
        .get(".well-known/smart-configuration", &[("origin", origin)])
        .await;
    rep.record(
        "1.8.03 smart_cors_well_known_endpoint",
        ok_status(&r, 200).and_then(|_| cors_ok(&r, origin)),
    );
    let meta = k
        .get(
            "metadata",
            &[("origin", origin), ("accept", "application/fhir+json")],
        )
        .await;
    rep.record(
        "1.8.04 smart_cors_metadata_request",
        ok_status(&meta, 200).and_then(|_| cors_ok(&meta, origin)),
    );
    rep.record(
        "discovery_stu1: CapabilityStatement oauth-uris match the well-known endpoints",
        (|| {
            let cs = meta.json();
            let sec = &cs["rest"][0]["security"];
            ensure(
                sec["service"][0]["coding"][0]["code"] == "SMART-on-FHIR",
                format!("security.service {}", sec["service"]),
            )?;
            let ext = sec["extension"]
                .as_array()
                .and_then(|a| {
                    a.iter().find(|e| {
                        e["url"]
                            == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
                    })
                })
                .ok_or("no oauth-uris extension")?;
            let uri = |n: &str| {
                ext["extension"]
                    .as_array()
                    .and_then(|a| a.iter().find(|e| e["url"] == n))
                    .map(|e| e["valueUri"].clone())
                    .unwrap_or(Value::Null)
            };
            ensure(
                uri("authorize") == cfg["authorization_endpoint"],
                "authorize differs",
            )?;
            ensure(uri("token") == cfg["token_endpoint"], "token differs")
        })(),
    );
    let oidc = k.get(".well-known/openid-configuration", &[]).await;
    rep.record(
        "openid_retrieve_configuration + required fields",
        (|| {
            ok_status(&oidc, 200)?;
            let o = oidc.json();
            for f in [
                "issuer",
                "authorization_endpoint",
                "token_endpoint",
                "jwks_uri",
                "response_types_supported",
                "subject_types_supported",
                "id_token_signing_alg_values_supported",
            ] {
                ensure(!o[f].is_null(), format!("{f} missing"))?;
            }
            ensure(
                o["issuer"] == cfg["issuer"],
                "issuer differs from smart-configuration",
            )?;
            ensure(
                o["id_token_signing_alg_values_supported"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!("RS256"))),
                "RS256 not supported",
            )
        })(),
    );
    let jwks = k.get("auth/jwks", &[]).await;
    rep.record(
        "openid_retrieve_jwks: JWKS has RSA keys, no private parts",
        (|| {
            ok_status(&jwks, 200)?;
            let keys = jwks.json()["keys"].as_array().cloned().unwrap_or_default();
            ensure(!keys.is_empty(), "no keys")?;
            for key in keys {
                ensure(key["kid"].is_string(), "key without kid")?;
                ensure(key.get("d").is_none(), "private exponent published")?;
            }
            Ok(())
        })(),
    );

    // ---------------------------------------------------------------- standalone launch (public client, PKCE)
    let full_scope = "launch/patient openid fhirUser offline_access patient/Patient.rs patient/Observation.rs patient/Condition.rs patient/Encounter.rs";
    let (verifier, challenge) = pkce_pair();
    let cb = k
        .authorize(
            &k.public_client,
            full_scope,
            &challenge,
            ("alice", "alice-password-1"),
            None,
            &[],
            &|_| true,
        )
        .await;
    rep.record(
        "1.3.02 smart_app_redirect: redirected to the registered redirect_uri with state",
        cb.clone().and_then(|cb| {
            ensure(cb.starts_with(REDIRECT), format!("redirect to {cb}"))?;
            ensure(
                query_param(&cb, "state").as_deref() == Some("st-e2e"),
                "state not echoed",
            )
        }),
    );
    let code = cb
        .as_ref()
        .ok()
        .and_then(|cb| query_param(cb, "code"))
        .unwrap_or_default();
    rep.record(
        "1.3.03 smart_code_received",
        ensure(!code.is_empty(), "no code parameter"),
    );
    let tr = k
        .send(
            Method::POST,
            "auth/token",
            &[("origin", origin)],
            Some((
                "application/x-www-form-urlencoded",
                format!(
                    "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}&client_id={}",
                    urlencode(&code),
                    urlencode(REDIRECT),
                    urlencode(&verifier),
                    urlencode(&k.public_client)
                ),
            )),
        )
        .await;
    let t = tr.json();
    rep.record(
        "1.3.05 smart_token_exchange (public client + PKCE)",
        ok_status(&tr, 200),
    );
    rep.record(
        "1.3.06 smart_token_response_body (STU2.2)",
        (|| {
            token_body_ok(&t, true)?;
            ensure(
                t["patient"] == PATIENT_A,
                format!("patient {}", t["patient"]),
            )?;
            ensure(
                t["id_token"].is_string(),
                "id_token missing (openid requested)",
            )?;
            ensure(
                t["need_patient_banner"].is_boolean(),
                "need_patient_banner missing",
            )?;
            ensure(t["smart_style_url"].is_string(), "smart_style_url missing")
        })(),
    );
    rep.record("1.3.07 smart_token_response_headers", cache_headers_ok(&tr));
    rep.record("smart_cors_token_exchange", cors_ok(&tr, origin));
    let granted = t["scope"].as_str().unwrap_or_default().to_string();
    rep.record(
        "1.3.08 g10_smart_scopes: requested patient scopes granted",
        (|| {
            for s in full_scope.split(' ') {
                ensure(
                    has_scope(&granted, s),
                    format!("{s} not granted: {granted}"),
                )?;
            }
            Ok(())
        })(),
    );
    let access = t["access_token"].as_str().unwrap_or_default().to_string();
    let refresh = t["refresh_token"].as_str().unwrap_or_default().to_string();
    let r = k.get(&format!("Patient/{PATIENT_A}"), &[]).await;
    rep.record(
        "1.3.09 g10_unauthorized_access: no token → 401 with WWW-Authenticate",
        ok_status(&r, 401).and_then(|_| {
            ensure(
                r.header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Bearer")),
                "WWW-Authenticate: Bearer missing",
            )
        }),
    );
    let r = k.fhir_get(&access, &format!("Patient/{PATIENT_A}")).await;
    rep.record(
        "1.3.10 g10_patient_context: the patient in context can be read",
        ok_status(&r, 200)
            .and_then(|_| ensure(r.json()["id"] == PATIENT_A, "wrong Patient returned")),
    );
    let r = k.fhir_get(&access, "Observation").await;
    rep.record(
        "patient restriction: Observation search returns only the context patient's",
        ok_status(&r, 200).and_then(|_| {
            let ids = bundle_ids(&r.json());
            ensure(
                ids.len() == 2 && ids.iter().all(|i| i.starts_with("Observation/aaaa-")),
                format!("entries {ids:?}"),
            )
        }),
    );

    // ---------------------------------------------------------------- OpenID Connect
    let id_token = t["id_token"].as_str().unwrap_or_default().to_string();
    let header = jsonwebtoken::decode_header(&id_token).map_err(|e| e.to_string());
    rep.record(
        "openid_token_header: RS256 and a kid in the JWKS",
        header.clone().and_then(|h| {
            ensure(h.alg == Algorithm::RS256, format!("alg {:?}", h.alg))?;
            ensure(h.kid.is_some(), "no kid")
        }),
    );
    let claims: Result<Value, String> = async {
        let h = header.clone()?;
        let key = jwks_key(k, h.kid.as_deref().unwrap_or_default()).await?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&[&k.public_client]);
        v.set_issuer(&[cfg["issuer"].as_str().unwrap_or_default()]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Value>(&id_token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| format!("id_token does not verify: {e}"))
    }
    .await;
    rep.record(
        "openid_token_payload: signature verifies, iss/aud/sub/exp/iat",
        claims
            .clone()
            .and_then(|c| ensure(c["sub"].is_string(), "sub missing")),
    );
    let fhir_user = claims
        .as_ref()
        .ok()
        .and_then(|c| c["fhirUser"].as_str())
        .unwrap_or_default()
        .to_string();
    let r = k.fhir_get(&access, &fhir_user).await;
    rep.record(
        "openid_fhir_user_claim: fhirUser resolves to the user's Patient",
        ensure(
            fhir_user == format!("{base}/Patient/{PATIENT_A}"),
            format!("fhirUser {fhir_user:?}"),
        )
        .and_then(|_| ok_status(&r, 200)),
    );
    let auth_hdr = format!("Bearer {access}");
    let r = k
        .get(
            &fhir_user,
            &[("authorization", &auth_hdr), ("origin", origin)],
        )
        .await;
    rep.record("cors_openid_fhir_user_claim", cors_ok(&r, origin));

    // ---------------------------------------------------------------- introspection
    let r = introspect(k, &access, &access).await;
    rep.record(
        "token_introspection: active token → active, scope, client_id, exp, patient",
        ok_status(&r, 200).and_then(|_| {
            let i = r.json();
            ensure(i["active"] == true, "not active")?;
            ensure(
                i["scope"] == json!(granted),
                format!("scope {}", i["scope"]),
            )?;
            ensure(i["client_id"] == json!(k.public_client), "client_id")?;
            ensure(i["exp"].is_number(), "exp")?;
            ensure(i["patient"] == PATIENT_A, "patient")
        }),
    );
    let r = introspect(k, "not-a-token", &access).await;
    rep.record(
        "token_introspection: invalid token → {active: false}",
        ok_status(&r, 200).and_then(|_| ensure(r.json() == json!({"active": false}), r.short())),
    );
    let r = k
        .post_form("auth/introspect", &[("token", &access)], &[])
        .await;
    rep.record(
        "token_introspection: unauthenticated request refused",
        ensure(r.status == StatusCode::UNAUTHORIZED, r.short()),
    );

    // ---------------------------------------------------------------- refresh
    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &k.public_client),
            ],
            &[],
        )
        .await;
    let rt = r.json();
    rep.record(
        "token_refresh (scope omitted) + token_refresh_body + headers",
        ok_status(&r, 200)
            .and_then(|_| token_body_ok(&rt, false))
            .and_then(|_| cache_headers_ok(&r))
            .and_then(|_| {
                ensure(
                    rt["scope"] == json!(granted),
                    format!("scope {}", rt["scope"]),
                )
            }),
    );
    let refresh2 = rt["refresh_token"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(refresh.clone());
    let new_access = rt["access_token"].as_str().unwrap_or_default().to_string();
    let r = k
        .fhir_get(&new_access, &format!("Patient/{PATIENT_A}"))
        .await;
    rep.record(
        "refreshed access token works on the FHIR API",
        ok_status(&r, 200),
    );
    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh2),
                ("client_id", &k.public_client),
                ("scope", "patient/Patient.rs patient/Observation.rs"),
            ],
            &[],
        )
        .await;
    let rt2 = r.json();
    rep.record(
        "token_refresh with a narrower scope",
        ok_status(&r, 200).and_then(|_| {
            ensure(
                rt2["scope"] == "patient/Patient.rs patient/Observation.rs",
                format!("scope {}", rt2["scope"]),
            )
        }),
    );
    let narrow = rt2["access_token"].as_str().unwrap_or_default().to_string();
    let r = k
        .fhir_get(&narrow, &format!("Condition?patient={PATIENT_A}"))
        .await;
    rep.record(
        "narrowed token cannot search Condition (403)",
        ok_status(&r, 403),
    );
    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "invalid-refresh-token"),
                ("client_id", &k.public_client),
            ],
            &[],
        )
        .await;
    rep.record(
        "9.x g10_invalid_token_refresh: invalid refresh token → 400 invalid_grant",
        ok_status(&r, 400).and_then(|_| ensure(r.json()["error"] == "invalid_grant", r.short())),
    );

    let (_v, challenge) = pkce_pair();
    let get_url = k.authorize_url(
        &k.public_client,
        "launch/patient patient/Patient.rs",
        &challenge,
        "s-post",
        &[],
    );
    let form = get_url
        .split_once('?')
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    let r = k
        .send(
            Method::POST,
            "auth/authorize",
            &[],
            Some(("application/x-www-form-urlencoded", form)),
        )
        .await;
    rep.record(
        "authorize-post: POST to the authorization endpoint starts the login",
        ensure(
            r.status == StatusCode::SEE_OTHER && r.location().contains("/auth/login"),
            format!("{} → {}", r.short(), r.location()),
        ),
    );

    // ---------------------------------------------------------------- PKCE / code / client failures
    let scope = "launch/patient patient/Patient.rs";
    for (name, bad) in [
        (
            "pkce: wrong code_verifier → invalid_grant",
            Some("x".repeat(60)),
        ),
        (
            "pkce: missing code_verifier → invalid_grant",
            Some(String::new()),
        ),
        (
            "pkce: code_challenge sent as verifier → invalid_grant",
            None,
        ),
    ] {
        let res: Result<(), String> = async {
            let (_v, challenge) = pkce_pair();
            let cb = k
                .authorize(
                    &k.public_client,
                    scope,
                    &challenge,
                    ("alice", "alice-password-1"),
                    None,
                    &[],
                    &|_| true,
                )
                .await?;
            let code = query_param(&cb, "code").ok_or("no code")?;
            let verifier = bad.clone().unwrap_or(challenge);
            let r = if verifier.is_empty() {
                k.post_form(
                    "auth/token",
                    &[
                        ("grant_type", "authorization_code"),
                        ("code", &code),
                        ("redirect_uri", REDIRECT),
                        ("client_id", &k.public_client),
                    ],
                    &[],
                )
                .await
            } else {
                k.exchange(&code, &verifier, &k.public_client).await
            };
            ok_status(&r, 400)?;
            ensure(r.json()["error"] == "invalid_grant", r.short())
        }
        .await;
        rep.record(name, res);
    }
    let (_v, challenge) = pkce_pair();
    let url = k
        .authorize_url(&k.public_client, scope, &challenge, "s-plain", &[])
        .replace("code_challenge_method=S256", "code_challenge_method=plain");
    let r = k.get(&url, &[]).await;
    rep.record(
        "pkce: plain code_challenge_method refused at authorize",
        ensure(
            query_param(&r.location(), "code").is_none()
                && (query_param(&r.location(), "error").is_some()
                    || r.status == StatusCode::BAD_REQUEST),
            format!("{} → {}", r.status, r.location()),
        ),
    );
    let url = k.authorize_url(&k.public_client, scope, "", "s-none", &[]);
    let r = k.get(&url, &[]).await;
    rep.record(
        "pkce: authorization without code_challenge refused",
        ensure(
            query_param(&r.location(), "error").is_some() || r.status == StatusCode::BAD_REQUEST,
            format!("{} → {}", r.status, r.location()),
        ),
    );
    let (_v, challenge) = pkce_pair();
    let url = k
        .authorize_url(&k.public_client, scope, &challenge, "s-aud", &[])
        .replace(
            &format!("aud={}", urlencode(&base)),
            &format!("aud={}", urlencode("https://evil.example/fhir")),
        );
    let r = k.get(&url, &[]).await;
    rep.record(
        "invalid aud: authorization refused, no code",
        ensure(
            !r.location().contains("code=")
                && (query_param(&r.location(), "error").is_some() || r.status.is_client_error()),
            format!("{} → {}", r.status, r.location()),
        ),
    );
    let res: Result<(), String> = async {
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.public_client,
                scope,
                &challenge,
                ("alice", "alice-password-1"),
                None,
                &[],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or("no code")?;
        ok_status(&k.exchange(&code, &verifier, &k.public_client).await, 200)?;
        let r = k.exchange(&code, &verifier, &k.public_client).await;
        ok_status(&r, 400)?;
        ensure(r.json()["error"] == "invalid_grant", r.short())
    }
    .await;
    rep.record("authorization code reuse → invalid_grant", res);
    let r = k
        .exchange("invalid-code", &verifier, &k.public_client)
        .await;
    rep.record(
        "invalid code → 400 invalid_grant",
        ok_status(&r, 400).and_then(|_| ensure(r.json()["error"] == "invalid_grant", r.short())),
    );
    let r = k
        .exchange("invalid-code", &verifier, "no-such-client")
        .await;
    rep.record(
        "invalid client_id → invalid_client",
        ensure(
            (r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::BAD_REQUEST)
                && r.json()["error"] == "invalid_client",
            r.short(),
        ),
    );
    let res: Result<(), String> = async {
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.public_client,
                scope,
                &challenge,
                ("alice", "alice-password-1"),
                None,
                &[],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or("no code")?;
        let r = k
            .post_form(
                "auth/token",
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", "https://evil.example/cb"),
                    ("code_verifier", &verifier),
                    ("client_id", &k.public_client),
                ],
                &[],
            )
            .await;
        ok_status(&r, 400)?;
        ensure(r.json()["error"] == "invalid_grant", r.short())
    }
    .await;
    rep.record("code bound to redirect_uri → invalid_grant", res);

    // ---------------------------------------------------------------- confidential symmetric client
    let res: Result<(), String> = async {
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.secret_client,
                scope,
                &challenge,
                ("alice", "alice-password-1"),
                None,
                &[],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or("no code")?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.as_str()),
        ];
        let bad = basic(&k.secret_client, "wrong-secret");
        let r = k
            .post_form("auth/token", &form, &[("authorization", &bad)])
            .await;
        ensure(
            r.status == StatusCode::UNAUTHORIZED,
            format!("wrong secret: {}", r.short()),
        )?;
        ensure(r.json()["error"] == "invalid_client", r.short())?;
        let good = basic(&k.secret_client, &k.secret);
        let r = k
            .post_form("auth/token", &form, &[("authorization", &good)])
            .await;
        ok_status(&r, 200)?;
        token_body_ok(&r.json(), false)
    }
    .await;
    rep.record("confidential symmetric client (client_secret_basic)", res);

    // ---------------------------------------------------------------- asymmetric client (private_key_jwt)
    let res: Result<(), String> = async {
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.asym_client,
                "launch/patient openid fhirUser patient/Patient.rs",
                &challenge,
                ("alice", "alice-password-1"),
                None,
                &[],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or("no code")?;
        let stranger = ec_client_key("asym-key-1");
        let r = exchange_with_assertion(
            k,
            &code,
            &verifier,
            sign(
                &stranger,
                &assertion_claims(&k.asym_client, &k.token_endpoint(), 120),
            ),
        )
        .await;
        ensure(
            r.status == StatusCode::UNAUTHORIZED,
            format!("foreign key accepted: {}", r.short()),
        )?;
        let r = exchange_with_assertion(
            k,
            &code,
            &verifier,
            sign(
                &k.asym_key,
                &assertion_claims(&k.asym_client, &k.token_endpoint(), 120),
            ),
        )
        .await;
        ok_status(&r, 200)?;
        let t = r.json();
        token_body_ok(&t, false)?;
        ensure(t["id_token"].is_string(), "id_token missing")
    }
    .await;
    rep.record(
        "asymmetric client standalone launch (RS384 client assertion)",
        res,
    );

    // ---------------------------------------------------------------- limited scopes (g10 limited app)
    let res: Result<(), String> = async {
        let t = k
            .patient_token_keep(
                "launch/patient patient/Patient.rs patient/Observation.rs patient/Condition.rs patient/Encounter.rs",
                &|s| s != "patient/Condition.rs" && s != "patient/Encounter.rs",
            )
            .await?;
        let granted = t["scope"].as_str().unwrap_or_default();
        ensure(
            !granted.contains("Condition") && !granted.contains("Encounter"),
            format!("un-ticked scopes granted: {granted}"),
        )?;
        let tok = t["access_token"].as_str().unwrap_or_default();
        ok_status(&k.fhir_get(tok, &format!("Observation?patient={PATIENT_A}")).await, 200)?;
        ok_status(&k.fhir_get(tok, &format!("Patient/{PATIENT_A}")).await, 200)?;
        let r = k.fhir_get(tok, &format!("Condition?patient={PATIENT_A}")).await;
        ensure(r.status == StatusCode::FORBIDDEN, format!("Condition search: {}", r.short()))?;
        let r = k.fhir_get(tok, "Encounter/aaaa-enc").await;
        ensure(r.status == StatusCode::FORBIDDEN, format!("Encounter read: {}", r.short()))
    }
    .await;
    rep.record(
        "g10 limited access: un-ticked scopes → 403 on those types",
        res,
    );

    // ---------------------------------------------------------------- granular scopes
    for (name, granular) in [
        ("granular scope patient/Observation.rs?category=laboratory", "patient/Observation.rs?category=laboratory"),
        (
            "granular scope with system|code category",
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        ),
    ] {
        let res: Result<(), String> = async {
            let t = k
                .patient_token(&format!("launch/patient patient/Patient.rs {granular}"))
                .await?;
            let tok = t["access_token"].as_str().unwrap_or_default();
            ensure(
                has_scope(t["scope"].as_str().unwrap_or_default(), granular),
                format!("granted {}", t["scope"]),
            )?;
            let r = k.fhir_get(tok, &format!("Observation?patient={PATIENT_A}")).await;
            ok_status(&r, 200)?;
            let ids = bundle_ids(&r.json());
            ensure(ids == vec!["Observation/aaaa-obs-lab".to_string()], format!("search saw {ids:?}"))?;
            let r = k.fhir_get(tok, "Observation?category=vital-signs").await;
            ensure(
                r.status == StatusCode::FORBIDDEN || (r.status == StatusCode::OK && bundle_ids(&r.json()).is_empty()),
                format!("vital-signs search: {}", r.short()),
            )?;
            let r = k.fhir_get(tok, "Observation/aaaa-obs-vital").await;
            ensure(
                r.status == StatusCode::FORBIDDEN || r.status == StatusCode::NOT_FOUND,
                format!("read of a vital sign: {}", r.short()),
            )?;
            ok_status(&k.fhir_get(tok, "Observation/aaaa-obs-lab").await, 200)
        }
        .await;
        rep.record(name, res);
    }

    // ---------------------------------------------------------------- EHR launch
    let res: Result<(), String> = async {
        let r = k
            .post_form(
                "auth/login",
                &[("username", "doc"), ("password", "doctor-password-1")],
                &[],
            )
            .await;
        ensure(
            r.status.is_success() || r.status == StatusCode::SEE_OTHER,
            format!("login {}", r.short()),
        )?;
        let cookie = cookie_of(&r).ok_or("no session cookie")?;
        let r = k
            .get(
                &format!(
                    "auth/ehr-launch?client_id={}&patient={PATIENT_A}&encounter=aaaa-enc",
                    k.ehr_client
                ),
                &[("cookie", &cookie)],
            )
            .await;
        let loc = r.location();
        ensure(
            loc.starts_with(LAUNCH_URI),
            format!("EHR did not redirect to launch_uri: {}", r.short()),
        )?;
        ensure(
            query_param(&loc, "iss").as_deref() == Some(base.as_str()),
            format!("iss in {loc}"),
        )?;
        let launch = query_param(&loc, "launch").ok_or("no launch parameter")?;
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.ehr_client,
                "launch openid fhirUser patient/Patient.rs patient/Encounter.rs",
                &challenge,
                ("doc", "doctor-password-1"),
                None,
                &[("launch", &launch)],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or(format!("no code: {cb}"))?;
        let r = k.exchange(&code, &verifier, &k.ehr_client).await;
        ok_status(&r, 200)?;
        let t = r.json();
        token_body_ok(&t, false)?;
        ensure(
            t["patient"] == PATIENT_A,
            format!("patient {}", t["patient"]),
        )?;
        ensure(
            t["encounter"] == "aaaa-enc",
            format!("encounter {}", t["encounter"]),
        )?;
        let tok = t["access_token"].as_str().unwrap_or_default();
        ok_status(&k.fhir_get(tok, "Encounter/aaaa-enc").await, 200)?;
        ok_status(&k.fhir_get(tok, &format!("Patient/{PATIENT_A}")).await, 200)
    }
    .await;
    rep.record(
        "EHR launch: launch_received, token with patient + encounter context",
        res,
    );
    let res: Result<(), String> = async {
        let admin = format!("Bearer {ADMIN_KEY}");
        let r = k
            .send(
                Method::POST,
                "auth/launch",
                &[("authorization", &admin)],
                Some((
                    "application/json",
                    json!({"patient": PATIENT_B}).to_string(),
                )),
            )
            .await;
        ensure(
            r.status == StatusCode::CREATED || r.status == StatusCode::OK,
            r.short(),
        )?;
        let launch = r.json()["launch"].as_str().unwrap_or_default().to_string();
        let (verifier, challenge) = pkce_pair();
        let cb = k
            .authorize(
                &k.public_client,
                "launch patient/*.rs",
                &challenge,
                ("doc", "doctor-password-1"),
                None,
                &[("launch", &launch)],
                &|_| true,
            )
            .await?;
        let code = query_param(&cb, "code").ok_or(format!("no code: {cb}"))?;
        let t = k.exchange(&code, &verifier, &k.public_client).await.json();
        ensure(
            t["patient"] == PATIENT_B,
            format!("patient {}", t["patient"]),
        )?;
        let tok = t["access_token"].as_str().unwrap_or_default();
        let r = k.fhir_get(tok, "Observation").await;
        let ids = bundle_ids(&r.json());
        ensure(
            ids.len() == 2 && ids.iter().all(|i| i.contains("bbbb-")),
            format!("{ids:?}"),
        )
    }
    .await;
    rep.record(
        "EHR launch via admin /auth/launch: context patient is enforced",
        res,
    );

    // ---------------------------------------------------------------- revocation
    let res: Result<(), String> = async {
        let t = k.patient_token("launch/patient patient/Patient.rs").await?;
        let tok = t["access_token"].as_str().unwrap_or_default().to_string();
        ok_status(
            &k.fhir_get(&tok, &format!("Patient/{PATIENT_A}")).await,
            200,
        )?;
        let r = k
            .post_form(
                "auth/revoke",
                &[("token", &tok), ("client_id", &k.public_client)],
                &[],
            )
            .await;
        ok_status(&r, 200)?;
        let r = k.fhir_get(&tok, &format!("Patient/{PATIENT_A}")).await;
        ensure(
            r.status == StatusCode::UNAUTHORIZED,
            format!("after revocation: {}", r.short()),
        )?;
        let i = introspect(k, &tok, &access).await.json();
        ensure(
            i["active"] == false,
            format!("introspection after revocation: {i}"),
        )
    }
    .await;
    rep.record(
        "g10 token_revocation: Patient read → 401 after revocation",
        res,
    );

    // ---------------------------------------------------------------- backend services
    for (name, client, key) in [
        (
            "backend services RS384: token + system search",
            &k.backend_client,
            &k.backend_key,
        ),
        (
            "backend services ES384: token + system search",
            &k.backend_ec_client,
            &k.backend_ec_key,
        ),
    ] {
        let res: Result<(), String> = async {
            let a = sign(key, &assertion_claims(client, &k.token_endpoint(), 240));
            let r = k
                .backend_token_request(&a, "system/Observation.rs system/Patient.rs")
                .await;
            ok_status(&r, 200)?;
            cache_headers_ok(&r)?;
            let t = r.json();
            token_body_ok(&t, false)?;
            ensure(
                t["expires_in"].as_i64().is_some_and(|e| e <= 300),
                "expires_in > 300",
            )?;
            ensure(
                t.get("refresh_token").is_none(),
                "refresh token for client_credentials",
            )?;
            let tok = t["access_token"].as_str().unwrap_or_default();
            let r = k.fhir_get(tok, "Observation").await;
            ok_status(&r, 200)?;
            let ids = bundle_ids(&r.json());
            ensure(ids.len() == 4, format!("system search saw {ids:?}"))?;
            let r = k.fhir_get(tok, "Condition").await;
            ensure(
                r.status == StatusCode::FORBIDDEN,
                format!("Condition not granted: {}", r.short()),
            )
        }
        .await;
        rep.record(name, res);
    }
    let tep = k.token_endpoint();
    let bk = &k.backend_key;
    let bc = &k.backend_client;
    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "not_a_grant"),
                ("scope", "system/Patient.rs"),
                ("client_assertion_type", ASSERTION_TYPE),
                (
                    "client_assertion",
                    &sign(bk, &assertion_claims(bc, &tep, 240)),
                ),
            ],
            &[],
        )
        .await;
    rep.record(
        "backend_services_invalid_grant_type → 400 unsupported_grant_type",
        ok_status(&r, 400)
            .and_then(|_| ensure(r.json()["error"] == "unsupported_grant_type", r.short())),
    );
    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.rs"),
                ("client_assertion_type", "not_an_assertion_type"),
                (
                    "client_assertion",
                    &sign(bk, &assertion_claims(bc, &tep, 240)),
                ),
            ],
            &[],
        )
        .await;
    rep.record(
        "backend_services_invalid_client_assertion_type → 400/401",
        ensure(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNAUTHORIZED,
            r.short(),
        ),
    );
    let stranger = rsa_client_key("backend-rs384");
    for (name, assertion) in [
        (
            "backend_services_invalid_jwt: signed with an unregistered key",
            sign(&stranger, &assertion_claims(bc, &tep, 240)),
        ),
        (
            "backend services: wrong aud",
            sign(bk, &assertion_claims(bc, "https://evil.example/token", 240)),
        ),
        (
            "backend services: expired assertion",
            sign(bk, &assertion_claims(bc, &tep, -120)),
        ),
        ("backend services: iss ≠ sub", {
            let mut c = assertion_claims(bc, &tep, 240);
            c["iss"] = json!("backend-es");
            sign(bk, &c)
        }),
        (
            "backend services: garbage assertion",
            "abc.def.ghi".to_string(),
        ),
    ] {
        let r = k
            .backend_token_request(&assertion, "system/Patient.rs")
            .await;
        rep.record(
            name,
            ensure(
                (r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::BAD_REQUEST)
                    && r.json()["error"] == "invalid_client"
                    && !r.body.contains("access_token"),
                r.short(),
            ),
        );
    }
    let r = k
        .backend_token_request(
            &sign(bk, &assertion_claims(bc, &tep, 240)),
            "system/Patient.cruds",
        )
        .await;
    rep.record(
        "backend services: scope beyond registration → invalid_scope",
        ensure(
            r.status == StatusCode::BAD_REQUEST && r.json()["error"] == "invalid_scope",
            r.short(),
        ),
    );

    standalone_encounter_checks(k, &cfg, &mut rep).await;

    rep.print("SMART App Launch STU2.2 / ONC g10 authorization checks");
    let (p, f) = (rep.passed(), rep.failed());
    println!("SMART checks ({:?}): {p} passed, {f} failed", k.backend);
    assert_eq!(f, 0, "SMART checks: {p} passed, {f} failed");
    rep.rows.into_iter().map(|(n, _)| n).collect()
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

async fn exchange_with_assertion(k: &Kiln, code: &str, verifier: &str, assertion: String) -> Resp {
    k.post_form(
        "auth/token",
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &assertion),
        ],
        &[],
    )
    .await
}

/// How many checks [`standalone_encounter_checks`] records.
const STANDALONE_ENCOUNTER_CHECKS: usize = 9;

/// Standalone launch with `launch/encounter` (SMART 2.2 `context-standalone-encounter`) and the
/// patient picker's search by name and identifier, limited to the patients a user may see.
async fn standalone_encounter_checks(k: &Kiln, cfg: &Value, rep: &mut Report) {
    use kiln_smart_auth::{add_user, NewUser};
    const PATIENT_C: &str = "cccc-patient";
    const ENC_NEW: &str = "aaaa-enc-2024";
    const ENC_OLD: &str = "aaaa-enc-2021";
    let setup = async {
        for (username, fhir_user, patients) in [
            ("clinician", format!("Practitioner/{PRACTITIONER}"), vec![]),
            (
                "guardian",
                "RelatedPerson/guardian-1".to_string(),
                vec![PATIENT_A.to_string()],
            ),
        ] {
            add_user(
                k.auth.store(),
                NewUser {
                    username: username.into(),
                    password: format!("{username}-password-1"),
                    fhir_user: Some(fhir_user),
                    patients,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        k.admin_put(&json!({"resourceType": "Patient", "id": PATIENT_C,
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": "MRN-4242"}],
            "name": [{"family": "Carter", "given": ["Cornelius"]}]}))
            .await?;
        for (id, start, end, ty) in [
            (ENC_OLD, "2021-02-03T09:00:00Z", "2021-02-03T09:30:00Z", "Annual check-up"),
            (ENC_NEW, "2024-06-10T22:00:00Z", "2024-06-12T08:00:00Z", "Emergency admission"),
        ] {
            k.admin_put(&json!({"resourceType": "Encounter", "id": id, "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [{"text": ty}],
                "subject": {"reference": format!("Patient/{PATIENT_A}")},
                "period": {"start": start, "end": end}}))
                .await?;
        }
        Ok::<(), String>(())
    }
    .await;
    rep.record(
        "standalone encounter: discovery advertises context-standalone-encounter and launch/encounter",
        setup.clone().and_then(|_| {
            let has = |k: &str, v: &str| {
                cfg[k]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!(v)))
            };
            ensure(
                has("capabilities", "context-standalone-encounter"),
                "capability context-standalone-encounter missing",
            )?;
            ensure(
                has("scopes_supported", "launch/encounter"),
                "launch/encounter not in scopes_supported",
            )
        }),
    );

    let scope =
        "launch/patient launch/encounter openid fhirUser patient/Patient.rs patient/Encounter.rs";
    let clinician = ("clinician", "clinician-password-1");
    let picker = |req: &str, q: &str| {
        format!(
            "auth/select-patient?req={}&q={}",
            urlencode(req),
            urlencode(q)
        )
    };

    // patient picker: search by name (words AND-ed) and by identifier, any patient for a practitioner
    let (verifier, challenge) = pkce_pair();
    let started = k.begin_standalone(scope, &challenge, clinician).await;
    let (req, cookie) = started.clone().unwrap_or_default();
    let ck = [("cookie", cookie.as_str())];
    let by_name = k.get(&picker(&req, "Blackw"), &ck).await;
    let by_two_words = k.get(&picker(&req, "alicia ASH"), &ck).await;
    let by_identifier = k.get(&picker(&req, "MRN-4242"), &ck).await;
    let by_system_value = k
        .get(&picker(&req, "urn:oid:2.16.840.1.113883.4.1|MRN-4242"), &ck)
        .await;
    rep.record(
        "standalone patient picker: search by name and identifier (practitioner: any patient)",
        started.clone().map(|_| ()).and_then(|_| {
            ok_status(&by_name, 200)?;
            let lists = |r: &Resp, id: &str| r.body.contains(&format!("Patient/{id}</code>"));
            ensure(
                by_name.body.contains("Bertram Blackwood")
                    && lists(&by_name, PATIENT_B)
                    && !lists(&by_name, PATIENT_A),
                format!("name=Blackw: {}", by_name.short()),
            )?;
            ensure(
                lists(&by_two_words, PATIENT_A) && !lists(&by_two_words, PATIENT_B),
                format!("name=alicia ASH: {}", by_two_words.short()),
            )?;
            ensure(
                lists(&by_identifier, PATIENT_C)
                    && by_identifier.body.contains("Cornelius Carter")
                    && !lists(&by_identifier, PATIENT_A),
                format!("identifier=MRN-4242: {}", by_identifier.short()),
            )?;
            ensure(
                lists(&by_system_value, PATIENT_C),
                format!("identifier=system|value: {}", by_system_value.short()),
            )
        }),
    );

    // choosing the patient leads to the encounter picker: their encounters, most recent first
    let after_patient = k
        .choose("auth/select-patient", &req, &cookie, "patient", PATIENT_A)
        .await;
    let enc_url = after_patient.location();
    let enc_page = k.get(&enc_url, &ck).await;
    rep.record(
        "standalone encounter picker: shown after the patient, the patient's encounters most recent first",
        (|| {
            ensure(
                after_patient.status == StatusCode::SEE_OTHER
                    && enc_url.contains("/auth/select-encounter?req="),
                format!("after the patient picker: {} → {enc_url}", after_patient.short()),
            )?;
            ok_status(&enc_page, 200)?;
            let b = &enc_page.body;
            ensure(b.contains("<h1>Select an encounter</h1>"), "not the encounter picker")?;
            let new = b.find(&format!("Encounter/{ENC_NEW}<")).ok_or("newest encounter missing")?;
            let old = b.find(&format!("Encounter/{ENC_OLD}<")).ok_or("older encounter missing")?;
            ensure(new < old, "not most recent first")?;
            ensure(
                b.contains("Emergency admission (2024-06-10T22:00:00Z – 2024-06-12T08:00:00Z, finished)"),
                "type/period/status not shown",
            )?;
            ensure(
                !b.contains("bbbb-enc") && !b.contains(SECRET_B),
                "another patient's encounter listed",
            )?;
            ensure(
                b.contains("<fieldset><legend>") && b.contains("<label for=\"e0\">") && b.contains("lang=\"en\""),
                "labelled radio buttons in a fieldset",
            )
        })(),
    );
    let foreign = k
        .choose(
            "auth/select-encounter",
            &req,
            &cookie,
            "encounter",
            "bbbb-enc",
        )
        .await;
    let early_consent = k
        .get(&format!("auth/consent?req={}", urlencode(&req)), &ck)
        .await;
    rep.record(
        "standalone encounter picker: another patient's encounter refused, consent waits for the choice",
        (|| {
            ok_status(&foreign, 400)?;
            ensure(
                foreign.body.contains("Choose one of the listed encounters"),
                foreign.short(),
            )?;
            ensure(
                early_consent.status == StatusCode::SEE_OTHER
                    && early_consent.location().contains("/auth/select-encounter"),
                format!("consent before the encounter: {}", early_consent.short()),
            )
        })(),
    );
    let chosen = k
        .choose("auth/select-encounter", &req, &cookie, "encounter", ENC_OLD)
        .await;
    let token = if chosen.status == StatusCode::SEE_OTHER {
        k.consent_and_exchange(&req, &cookie, scope, &verifier, &|_| true)
            .await
    } else {
        Err(format!("select-encounter: {}", chosen.short()))
    };
    let tok = token.clone().unwrap_or_default();
    let access = tok["access_token"].as_str().unwrap_or_default().to_string();
    let read_enc = k.fhir_get(&access, &format!("Encounter/{ENC_OLD}")).await;
    let read_other = k.fhir_get(&access, "Encounter/bbbb-enc").await;
    let intro = introspect(k, &access, &access).await;
    rep.record(
        "standalone encounter launch: token response carries patient and the chosen encounter",
        token.and_then(|t| {
            ensure(
                t["patient"] == PATIENT_A,
                format!("patient {}", t["patient"]),
            )?;
            ensure(
                t["encounter"] == ENC_OLD,
                format!("encounter {}", t["encounter"]),
            )?;
            ensure(
                t["scope"]
                    .as_str()
                    .is_some_and(|s| has_scope(s, "launch/encounter")),
                format!("scope {}", t["scope"]),
            )?;
            ensure(
                intro.json()["encounter"] == ENC_OLD && intro.json()["active"] == true,
                format!("introspection {}", intro.short()),
            )?;
            ok_status(&read_enc, 200)?;
            ensure(read_enc.json()["id"] == ENC_OLD, read_enc.short())?;
            ensure(
                read_other.status == StatusCode::FORBIDDEN
                    || read_other.status == StatusCode::NOT_FOUND,
                format!("other patient's encounter: {}", read_other.short()),
            )
        }),
    );

    // a patient without encounters: no picker, no encounter
    let (verifier, challenge) = pkce_pair();
    let no_enc = async {
        let (req, cookie) = k.begin_standalone(scope, &challenge, clinician).await?;
        let r = k
            .choose("auth/select-patient", &req, &cookie, "patient", PATIENT_C)
            .await;
        let next = k.get(&r.location(), &[("cookie", cookie.as_str())]).await;
        ensure(
            next.status == StatusCode::SEE_OTHER && next.location().contains("/auth/consent"),
            format!(
                "encounter step for a patient without encounters: {}",
                next.short()
            ),
        )?;
        k.consent_and_exchange(&req, &cookie, scope, &verifier, &|_| true)
            .await
    }
    .await;
    rep.record(
        "standalone encounter launch: a patient without encounters proceeds without one",
        no_enc.and_then(|t| {
            ensure(
                t["patient"] == PATIENT_C,
                format!("patient {}", t["patient"]),
            )?;
            ensure(
                t.get("encounter").is_none(),
                format!("encounter {}", t["encounter"]),
            )
        }),
    );

    // launch/encounter unticked at consent: the chosen encounter is not handed out
    let (verifier, challenge) = pkce_pair();
    let unticked = async {
        let (req, cookie) = k.begin_standalone(scope, &challenge, clinician).await?;
        k.choose("auth/select-patient", &req, &cookie, "patient", PATIENT_A)
            .await;
        k.choose("auth/select-encounter", &req, &cookie, "encounter", ENC_NEW)
            .await;
        k.consent_and_exchange(&req, &cookie, scope, &verifier, &|s| {
            s != "launch/encounter"
        })
        .await
    }
    .await;
    rep.record(
        "standalone encounter launch: launch/encounter unticked → no encounter in the token",
        unticked.and_then(|t| {
            ensure(
                t["patient"] == PATIENT_A,
                format!("patient {}", t["patient"]),
            )?;
            ensure(
                t.get("encounter").is_none(),
                format!("encounter {}", t["encounter"]),
            )
        }),
    );

    // a Patient user: themself, then their encounter picker
    let (verifier, challenge) = pkce_pair();
    let patient_user = async {
        let (req, cookie) = k
            .begin_standalone(scope, &challenge, ("alice", "alice-password-1"))
            .await?;
        let ck = [("cookie", cookie.as_str())];
        let r = k
            .get(&format!("auth/select-patient?req={}", urlencode(&req)), &ck)
            .await;
        ensure(
            r.location().contains("/auth/select-encounter"),
            format!("patient user: {}", r.short()),
        )?;
        let r = k
            .choose("auth/select-encounter", &req, &cookie, "encounter", ENC_NEW)
            .await;
        ensure(r.status == StatusCode::SEE_OTHER, r.short())?;
        k.consent_and_exchange(&req, &cookie, scope, &verifier, &|_| true)
            .await
    }
    .await;
    rep.record(
        "standalone encounter launch: a Patient user picks one of their own encounters",
        patient_user.and_then(|t| {
            ensure(
                t["patient"] == PATIENT_A,
                format!("patient {}", t["patient"]),
            )?;
            ensure(
                t["encounter"] == ENC_NEW,
                format!("encounter {}", t["encounter"]),
            )
        }),
    );

    // a RelatedPerson user linked to patient A: the search never shows anyone else
    let (_, challenge) = pkce_pair();
    let guardian = async {
        let (req, cookie) = k
            .begin_standalone(scope, &challenge, ("guardian", "guardian-password-1"))
            .await?;
        let ck = [("cookie", cookie.as_str())];
        let mut shown = Vec::new();
        for q in ["Blackw", "MRN-4242", PATIENT_B, "Ashworth"] {
            shown.push((q, k.get(&picker(&req, q), &ck).await));
        }
        let pick_b = k
            .choose("auth/select-patient", &req, &cookie, "patient", PATIENT_B)
            .await;
        Ok::<_, String>((shown, pick_b))
    }
    .await;
    rep.record(
        "standalone patient picker: a linked user's search stays within their patients",
        guardian.and_then(|(shown, pick_b)| {
            for (q, r) in &shown {
                ok_status(r, 200)?;
                ensure(
                    r.body.contains(&format!("Patient/{PATIENT_A}</code>")),
                    format!("q={q}: linked patient A not listed"),
                )?;
                ensure(
                    !r.body.contains(&format!("Patient/{PATIENT_B}</code>"))
                        && !r.body.contains(&format!("Patient/{PATIENT_C}</code>")),
                    format!("q={q}: an unlinked patient listed: {}", r.short()),
                )?;
            }
            ok_status(&pick_b, 400)
        }),
    );
}
