//! Real SMART clients, unchanged, against Kiln with `--auth on` (SQLite and PostgreSQL):
//!
//! * **JS `fhirclient`** (npm, browser build) in Debian's headless Chromium, driven by
//!   `conformance-tests/browser/smart_app_launch.mjs` (playwright-core): the app's launch page
//!   calls `FHIR.oauth2.authorize` (standalone, PKCE S256), a user types into Kiln's login page
//!   (a wrong password first), searches the patient picker by name and picks a patient, picks an
//!   encounter on the standalone encounter picker (`launch/encounter`), un-ticks one scope on the
//!   consent page, and the app's page calls `FHIR.oauth2.ready()` + `client.patient.read()`.
//!   A third flow is an EHR launch: the user signs in to Kiln and launches the app from
//!   `/auth/ehr-launch`, which opens the app's `launch_uri` with `iss` and `launch`.
//!   The same run audits Kiln's pages: `lang`, labels tied to every control, no request leaving
//!   Kiln's origin (and nothing leaving the machine).
//! * **Python `fhirclient`** (PyPI 4.4.0, `conformance-tests/python/smart_clients.py`): a standalone
//!   launch with the library's own PKCE S256, the user-agent steps done with `requests`; and a
//!   backend-services client (PyJWT + cryptography assertion, RS384 and ES384) whose system token
//!   fhirclient obtains and uses.
//!
//! The tools come from `.ci/run` (apt `chromium`, `npm ci` in `conformance-tests/browser`, a venv
//! in `conformance-tests/python/.venv`). Without them the tests fail in CI (`CI=true`) and skip
//! with a printed notice elsewhere.

mod smart_support;

use std::path::{Path, PathBuf};

use base64::Engine;
use kiln_conformance_tests::Backend;
use kiln_smart_auth::{add_client, ClientAuthMethod, NewClient};
use serde_json::{json, Value};
use smart_support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The client id of the EHR-launched JS app.
const EHR_APP: &str = "js-ehr-app";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `Some(())` when every tool is there. Missing tools fail the test in CI and skip it (with a
/// notice) elsewhere.
fn tools_or_skip(test: &str, missing: Vec<String>) -> Option<()> {
    if missing.is_empty() {
        return Some(());
    }
    let msg = format!(
        "{test}: missing {} (bash .ci/run installs them)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("notice: skipping {msg}");
    None
}

fn browser_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("node".into());
    }
    let nm = crate_dir().join("browser/node_modules");
    for m in [
        "playwright-core/package.json",
        "fhirclient/build/fhir-client.js",
    ] {
        if !nm.join(m).exists() {
            missing.push(format!(
                "browser/node_modules/{m} (npm ci in conformance-tests/browser)"
            ));
        }
    }
    missing
}

fn python() -> PathBuf {
    match std::env::var_os("KILN_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => crate_dir().join("python/.venv/bin/python"),
    }
}

fn python_tools() -> Vec<String> {
    let ok = std::process::Command::new(python())
        .args(["-c", "import fhirclient, jwt, cryptography, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Vec::new()
    } else {
        vec![format!(
            "{} with fhirclient, PyJWT, cryptography, requests (python/requirements.txt)",
            python().display()
        )]
    }
}

/// Runs `program args… <config file>` off the async runtime; the last stdout line as JSON.
async fn run_json(program: PathBuf, args: Vec<String>, config: &Value) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, config.to_string()).expect("write config");
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .arg(&cfg_path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("(client ran {:.1} s)", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "client exited with {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {stdout}\nstderr: {stderr}"))
}

async fn start_or_skip(backend: Backend) -> Option<Kiln> {
    match start_on(backend).await {
        Ok(k) => k,
        Err(e) => panic!("cannot start Kiln with SMART on {backend:?}: {e}"),
    }
}

fn scope_list(t: &Value) -> Vec<String> {
    t["scope"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// JS fhirclient in headless Chromium
// ---------------------------------------------------------------------------------------------

/// Serves the SMART test app (`browser/app/*.html` and fhirclient's browser build) on its own
/// loopback origin; returns its base URL.
async fn serve_app() -> (String, tokio::sync::oneshot::Sender<()>) {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let dir = crate_dir().join("browser");
    let file = |path: PathBuf, ct: &'static str| {
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        move || async move { ([(CONTENT_TYPE, ct)], body) }
    };
    let app = axum::Router::new()
        .route(
            "/launch.html",
            get(file(
                dir.join("app/launch.html"),
                "text/html; charset=utf-8",
            )),
        )
        .route(
            "/index.html",
            get(file(dir.join("app/index.html"), "text/html; charset=utf-8")),
        )
        .route(
            "/fhir-client.js",
            get(file(
                dir.join("node_modules/fhirclient/build/fhir-client.js"),
                "text/javascript; charset=utf-8",
            )),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the app's port");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    (base, tx)
}

async fn js_fhirclient(backend: Backend) {
    if tools_or_skip("JS fhirclient in headless Chromium", browser_tools()).is_none() {
        return;
    }
    let Some(k) = start_or_skip(backend).await else {
        return;
    };
    let (app_base, stop_app) = serve_app().await;
    // A public client (no secret: PKCE only), registered as an administrator would.
    let reg = add_client(
        k.auth.store(),
        NewClient {
            client_name: "Kiln JS test app".into(),
            redirect_uris: vec![format!("{app_base}/index.html")],
            auth_method: Some(ClientAuthMethod::None),
            ..Default::default()
        },
    )
    .await
    .expect("register the JS app");
    let client_id = reg.client.client_id.clone();
    // An EHR-launched app: Kiln opens its launch_uri (carrying the app's settings) with iss+launch.
    let ehr_scope =
        "launch openid fhirUser patient/Patient.read patient/Encounter.read patient/Condition.read";
    let mut launch_uri = reqwest::Url::parse(&format!("{app_base}/launch.html")).expect("URL");
    launch_uri
        .query_pairs_mut()
        .append_pair("app_client_id", EHR_APP)
        .append_pair("app_scope", ehr_scope)
        .append_pair(
            "app_probes",
            r#"["Encounter?patient={patient}","Condition?patient={patient}"]"#,
        );
    add_client(
        k.auth.store(),
        NewClient {
            client_id: Some(EHR_APP.into()),
            client_name: "Kiln JS EHR-launched app".into(),
            redirect_uris: vec![format!("{app_base}/index.html")],
            launch_uri: Some(launch_uri.to_string()),
            auth_method: Some(ClientAuthMethod::None),
            ..Default::default()
        },
    )
    .await
    .expect("register the EHR-launched JS app");
    let flows = json!([
        {
            // a practitioner: wrong password first, the patient picker searched by name, the
            // encounter picker, Observation un-ticked
            "name": "practitioner",
            "clientId": client_id,
            "scope": "launch/patient launch/encounter openid fhirUser online_access patient/Patient.read patient/Encounter.read patient/Observation.read patient/Condition.read",
            "username": "doc", "password": "doctor-password-1",
            "wrongPassword": true,
            // the picker searched by name, then the standalone encounter picker
            "searchPatient": "Blackw",
            "pickPatient": NAME_B,
            "pickEncounter": "bbbb-enc",
            "untick": "patient/Observation.read",
            "probes": ["Observation?patient={patient}", "Condition?patient={patient}"],
        },
        {
            // a patient user (no picker: launches for herself), offline_access un-ticked
            "name": "patient",
            "clientId": client_id,
            "scope": "launch/patient openid fhirUser offline_access patient/*.read",
            "username": "alice", "password": "alice-password-1",
            "wrongPassword": false,
            "untick": "offline_access",
            "probes": ["Observation?patient={patient}"],
        },
        {
            // EHR launch by the practitioner for Patient A in encounter aaaa-enc; Condition
            // un-ticked
            "name": "ehr",
            "clientId": EHR_APP,
            "scope": ehr_scope,
            "username": "doc", "password": "doctor-password-1",
            "ehrLaunch": {"client_id": EHR_APP, "patient": PATIENT_A, "encounter": "aaaa-enc"},
            "untick": "patient/Condition.read",
        },
    ]);
    let config =
        json!({"chromium": CHROMIUM, "kilnBase": k.base, "appBase": app_base, "flows": flows});
    let script = crate_dir().join("browser/smart_app_launch.mjs");
    let out = run_json(
        PathBuf::from("node"),
        vec![script.display().to_string()],
        &config,
    )
    .await;
    let _ = stop_app.send(());

    let mut rep = Report::default();
    println!(
        "backend: {backend:?}; {}",
        out["chromium"].as_str().unwrap_or("?")
    );
    let flows = out["flows"].as_array().cloned().unwrap_or_default();
    assert_eq!(flows.len(), 3, "{out}");
    for f in &flows {
        if let Some(failure) = f["failure"].as_str() {
            panic!(
                "flow {} failed: {failure}\nat {}\n{}\nconsole: {}",
                f["name"], f["lastUrl"], f["lastText"], f["console"]
            );
        }
    }
    let (doc, alice, ehr) = (&flows[0], &flows[1], &flows[2]);

    for f in [doc, alice, ehr] {
        let name = f["name"].as_str().unwrap_or("?");
        let app = &f["app"];
        rep.record(
            &format!("{name}: app completed the launch (no error on the app page)"),
            ensure(
                f["appError"].is_null() && app.is_object(),
                format!("app error {} console {}", f["appError"], f["console"]),
            ),
        );
        let auth_req = f["authorizeRequest"].as_str().unwrap_or_default();
        rep.record(
            &format!("{name}: fhirclient sent PKCE S256 and aud = the FHIR base"),
            ensure(
                query_param(auth_req, "code_challenge_method").as_deref() == Some("S256")
                    && query_param(auth_req, "code_challenge").is_some_and(|c| c.len() >= 43)
                    && query_param(auth_req, "aud").as_deref() == Some(k.base.as_str())
                    && (query_param(auth_req, "launch").is_some() == (name == "ehr")),
                format!("authorize request {auth_req}"),
            ),
        );
        rep.record(
            &format!("{name}: nothing left the machine, Kiln's pages loaded nothing foreign"),
            ensure(
                f["offMachine"].as_array().is_some_and(Vec::is_empty)
                    && f["foreignFromKiln"].as_array().is_some_and(Vec::is_empty),
                format!(
                    "off machine {} foreign {}",
                    f["offMachine"], f["foreignFromKiln"]
                ),
            ),
        );
        for (page, audit) in f["pages"].as_object().cloned().unwrap_or_default() {
            rep.record(
                &format!("{name}: {page} page accessible (lang, title, h1, labelled controls, no external assets)"),
                ensure(
                    audit["lang"] == "en"
                        && audit["problems"].as_array().is_some_and(Vec::is_empty)
                        && audit["controls"].as_array().is_some_and(|c| !c.is_empty()),
                    format!("{audit}"),
                ),
            );
        }
        let token = &app["tokenResponse"];
        rep.record(
            &format!("{name}: token response as SMART 2.2 says"),
            ensure(
                token["token_type"]
                    .as_str()
                    .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
                    && token["expires_in"].is_number()
                    && token["id_token"].is_string()
                    && token["patient"] == app["patientId"],
                format!("{token}"),
            ),
        );
        rep.record(
            &format!("{name}: the un-ticked scope is not granted"),
            ensure(
                !scope_list(token).contains(&f["unticked"].as_str().unwrap_or("?").to_string()),
                format!("unticked {} granted {}", f["unticked"], token["scope"]),
            ),
        );
    }

    // practitioner: wrong password, picker, narrowed grant
    let wp = &doc["wrongPassword"];
    rep.record(
        "login: a wrong password shows an error (401, role=alert) and stays on the login page",
        ensure(
            wp["status"] == 401
                && wp["alert"].as_str().is_some_and(|a| a.contains("Wrong"))
                && wp["url"]
                    .as_str()
                    .is_some_and(|u| u.contains("/auth/login"))
                && wp["problems"].as_array().is_some_and(Vec::is_empty),
            format!("{wp}"),
        ),
    );
    let labels: Vec<String> = doc["pages"]["login"]["controls"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| c["label"].as_str().unwrap_or_default().to_string())
        .collect();
    rep.record(
        "login: user name and password fields found by their labels",
        ensure(
            labels.iter().any(|l| l == "User name") && labels.iter().any(|l| l == "Password"),
            format!("{labels:?}"),
        ),
    );
    rep.record(
        "picker: shown to a practitioner, patients listed by name",
        ensure(
            doc["pages"]["picker"]["controls"]
                .as_array()
                .is_some_and(|c| {
                    c.iter().any(|x| {
                        x["type"] == "radio"
                            && x["label"].as_str().is_some_and(|l| l.contains(NAME_B))
                    }) && c.iter().any(|x| {
                        x["type"] == "radio"
                            && x["label"].as_str().is_some_and(|l| l.contains(NAME_A))
                    })
                }),
            format!("{}", doc["pages"]["picker"]),
        ),
    );
    let search = &doc["pages"]["pickerSearch"];
    rep.record(
        "picker: searched by name (q=Blackw), the patient found by name",
        ensure(
            search["url"]
                .as_str()
                .is_some_and(|u| query_param(u, "q").as_deref() == Some("Blackw"))
                && search["controls"].as_array().is_some_and(|c| {
                    c.iter().any(|x| {
                        x["type"] == "search"
                            && x["label"].as_str().is_some_and(|l| l.contains("by name"))
                    }) && c.iter().any(|x| {
                        x["type"] == "radio"
                            && x["label"].as_str().is_some_and(|l| {
                                l.contains(&format!("Bertram {NAME_B}"))
                                    && l.contains(&format!("Patient/{PATIENT_B}"))
                            })
                    })
                }),
            format!("{search}"),
        ),
    );
    let enc_page = &doc["pages"]["encounterPicker"];
    rep.record(
        "encounter picker: shown after the patient (launch/encounter), only the patient's encounters",
        ensure(
            enc_page["title"] == "Select an encounter"
                && enc_page["controls"].as_array().is_some_and(|c| {
                    c.iter().any(|x| {
                        x["type"] == "radio"
                            && x["label"]
                                .as_str()
                                .is_some_and(|l| l.contains("Encounter/bbbb-enc"))
                    }) && !c.iter().any(|x| {
                        x["label"]
                            .as_str()
                            .is_some_and(|l| l.contains("Encounter/aaaa-enc"))
                    })
                }),
            format!("{enc_page}"),
        ),
    );
    rep.record(
        "practitioner: the picked encounter is in the token and client.encounter.read() returns it",
        ensure(
            doc["app"]["tokenResponse"]["encounter"] == "bbbb-enc"
                && doc["app"]["encounterId"] == "bbbb-enc"
                && doc["app"]["encounter"]["id"] == "bbbb-enc"
                && doc["app"]["encounter"]["subject"]["reference"]
                    == format!("Patient/{PATIENT_B}"),
            format!(
                "token {} app {} {} {}",
                doc["app"]["tokenResponse"]["encounter"],
                doc["app"]["encounterId"],
                doc["app"]["encounter"],
                doc["app"]["encounterError"]
            ),
        ),
    );
    rep.record(
        "picker: not shown to a patient user",
        ensure(alice["pages"]["picker"].is_null(), "picker shown"),
    );
    let app = &doc["app"];
    rep.record(
        "practitioner: the picked patient (B) was read by client.patient.read()",
        ensure(
            app["patientId"] == PATIENT_B
                && app["patient"]["id"] == PATIENT_B
                && app["patient"]["name"][0]["family"] == NAME_B
                && doc["shownName"]
                    .as_str()
                    .is_some_and(|n| n.contains(NAME_B)),
            format!("{} / {}", app["patient"], doc["shownName"]),
        ),
    );
    rep.record(
        "practitioner: fhirUser from the id_token",
        ensure(
            app["fhirUser"] == format!("Practitioner/{PRACTITIONER}"),
            format!("{}", app["fhirUser"]),
        ),
    );
    let granted = scope_list(&app["tokenResponse"]);
    rep.record(
        "practitioner: grant = requested minus un-ticked",
        ensure(
            granted.iter().any(|s| s == "patient/Patient.read")
                && granted.iter().any(|s| s == "patient/Condition.read")
                && !granted.iter().any(|s| s == "patient/Observation.read"),
            format!("{granted:?}"),
        ),
    );
    let probes = &app["probes"];
    rep.record(
        "practitioner: un-ticked Observation.read is enforced (403), Condition.read works",
        ensure(
            probes["Observation?patient={patient}"]["ok"] == false
                && probes["Observation?patient={patient}"]["status"] == 403
                && probes["Condition?patient={patient}"]["ok"] == true
                && probes["Condition?patient={patient}"]["entries"] == 1,
            format!("{probes}"),
        ),
    );

    // patient user
    let app = &alice["app"];
    rep.record(
        "patient: her own record was read by client.patient.read()",
        ensure(
            app["patientId"] == PATIENT_A
                && app["patient"]["name"][0]["family"] == NAME_A
                && app["fhirUser"] == format!("Patient/{PATIENT_A}"),
            format!("{}", app["patient"]),
        ),
    );
    rep.record(
        "patient: offline_access un-ticked → no refresh token; patient/*.read granted and works",
        ensure(
            app["tokenResponse"]["refresh_token"].is_null()
                && scope_list(&app["tokenResponse"]).contains(&"patient/*.read".to_string())
                && app["probes"]["Observation?patient={patient}"]["entries"] == 2,
            format!("{} {}", app["tokenResponse"], app["probes"]),
        ),
    );

    // EHR launch
    let launch_req = ehr["launchRequest"].as_str().unwrap_or_default();
    let launch_id = query_param(launch_req, "launch");
    rep.record(
        "ehr: Kiln opened the app's launch_uri with iss and launch; fhirclient sent that launch",
        ensure(
            query_param(launch_req, "iss").as_deref() == Some(k.base.as_str())
                && launch_id.as_deref().is_some_and(|l| !l.is_empty())
                && query_param(
                    ehr["authorizeRequest"].as_str().unwrap_or_default(),
                    "launch",
                ) == launch_id,
            format!(
                "launch page {launch_req} authorize {}",
                ehr["authorizeRequest"]
            ),
        ),
    );
    rep.record(
        "ehr: the signed-in session is reused (no second login), no picker",
        ensure(
            ehr["pages"]["picker"].is_null()
                && ehr["signedIn"]["title"]
                    .as_str()
                    .is_some_and(|t| t.contains("Signed in")),
            format!("{}", ehr["signedIn"]),
        ),
    );
    let app = &ehr["app"];
    let t = &app["tokenResponse"];
    rep.record(
        "ehr: launch context in the token (patient, encounter, need_patient_banner) and patient read",
        ensure(
            t["patient"] == PATIENT_A
                && t["encounter"] == "aaaa-enc"
                && app["encounterId"] == "aaaa-enc"
                && app["encounter"]["id"] == "aaaa-enc"
                && t["need_patient_banner"] == true
                && app["patient"]["name"][0]["family"] == NAME_A,
            format!("{t} {}", app["patient"]),
        ),
    );
    rep.record(
        "ehr: un-ticked Condition.read refused (403), Encounter.read works",
        ensure(
            app["probes"]["Condition?patient={patient}"]["status"] == 403
                && app["probes"]["Encounter?patient={patient}"]["entries"] == 1,
            format!("{}", app["probes"]),
        ),
    );

    rep.print(&format!("JS fhirclient in headless Chromium ({backend:?})"));
    let (p, f) = (rep.passed(), rep.failed());
    println!("JS fhirclient checks ({backend:?}): {p} passed, {f} failed");
    k.finish().await;
    assert_eq!(f, 0, "JS fhirclient checks: {p} passed, {f} failed");
}

// ---------------------------------------------------------------------------------------------
// Python fhirclient: standalone launch with PKCE, and backend services
// ---------------------------------------------------------------------------------------------

async fn python_fhirclient(backend: Backend) {
    if tools_or_skip("Python fhirclient", python_tools()).is_none() {
        return;
    }
    let Some(k) = start_or_skip(backend).await else {
        return;
    };
    let script = crate_dir().join("python/smart_clients.py");
    let mut rep = Report::default();

    // standalone launch (alice, Patient A), Condition un-ticked on the consent form
    let cfg = json!({
        "base": k.base, "client_id": k.public_client, "redirect_uri": REDIRECT,
        "scope": "launch/patient openid fhirUser patient/Patient.read patient/Observation.read patient/Condition.read",
        "username": "alice", "password": "alice-password-1",
        "untick": ["patient/Condition.read"],
    });
    let out = run_json(
        python(),
        vec![script.display().to_string(), "standalone".into()],
        &cfg,
    )
    .await;
    println!("standalone: {out}");
    assert_eq!(out["ok"], true, "Python standalone launch failed: {out}");
    let ap = &out["authorize_params"];
    rep.record(
        "python standalone: fhirclient's own PKCE (S256) and aud",
        ensure(
            ap["code_challenge_method"] == "S256"
                && ap["code_challenge"].as_str().is_some_and(|c| c.len() >= 43)
                && ap["aud"] == k.base.as_str(),
            format!("{ap}"),
        ),
    );
    rep.record(
        "python standalone: code exchanged (code_verifier) and patient read",
        ensure(
            out["patient_id"] == PATIENT_A
                && out["patient"]["id"] == PATIENT_A
                && out["patient"]["name"][0]["family"] == NAME_A
                && out["has_id_token"] == true,
            format!("{} {}", out["patient_id"], out["patient"]),
        ),
    );
    let granted = scope_list(&out["token"]);
    rep.record(
        "python standalone: consent narrowed the grant",
        ensure(
            !granted.iter().any(|s| s == "patient/Condition.read")
                && granted.iter().any(|s| s == "patient/Observation.read")
                && out["consent_offered"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|s| s == "patient/Condition.read")),
            format!("{granted:?} offered {}", out["consent_offered"]),
        ),
    );
    rep.record(
        "python standalone: Observation search through fhirclient's models sees only A's",
        ensure(
            out["observations"] == json!(["aaaa-obs-lab", "aaaa-obs-vital"]),
            format!("{}", out["observations"]),
        ),
    );

    // backend services: RS384 and ES384 assertions
    let b64 = base64::engine::general_purpose::STANDARD;
    let cfg = json!({
        "base": k.base, "scope": "system/Patient.rs", "read_patient": PATIENT_B,
        "clients": [
            {"client_id": k.backend_client, "kid": k.backend_key.kid, "alg": "RS384",
             "der_b64": b64.encode(&k.backend_key.der)},
            {"client_id": k.backend_ec_client, "kid": k.backend_ec_key.kid, "alg": "ES384",
             "der_b64": b64.encode(&k.backend_ec_key.der)},
        ],
    });
    let out = run_json(
        python(),
        vec![script.display().to_string(), "backend".into()],
        &cfg,
    )
    .await;
    println!("backend: {out}");
    assert_eq!(out["ok"], true, "Python backend services failed: {out}");
    for c in out["clients"].as_array().cloned().unwrap_or_default() {
        let alg = c["alg"].as_str().unwrap_or("?").to_string();
        let t = &c["token"];
        rep.record(
            &format!("python backend services ({alg}): system token, ≤ 300 s, no refresh token"),
            ensure(
                t["scope"] == "system/Patient.rs"
                    && t["token_type"]
                        .as_str()
                        .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
                    && c["has_refresh_token"] == false
                    && c["expires_in"].as_i64().is_some_and(|e| e > 0 && e <= 300)
                    && c["access_token_header"]["kid"].is_string(),
                format!("{c}"),
            ),
        );
        rep.record(
            &format!("python backend services ({alg}): reads with fhirclient and plain requests"),
            ensure(
                c["patient_family"] == NAME_B
                    && c["patient_search_status"] == 200
                    && c["patient_search_total"] == 2,
                format!("{c}"),
            ),
        );
        rep.record(
            &format!("python backend services ({alg}): replayed assertion refused"),
            ensure(
                matches!(c["replay_status"].as_u64(), Some(400 | 401))
                    && c["replay_error"] == "invalid_client",
                format!("{c}"),
            ),
        );
    }
    rep.print(&format!("Python fhirclient ({backend:?})"));
    let (p, f) = (rep.passed(), rep.failed());
    println!("Python fhirclient checks ({backend:?}): {p} passed, {f} failed");
    k.finish().await;
    assert_eq!(f, 0, "Python fhirclient checks: {p} passed, {f} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_fhirclient_in_chromium_sqlite() {
    js_fhirclient(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_fhirclient_in_chromium_postgres() {
    js_fhirclient(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_fhirclient_sqlite() {
    python_fhirclient(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_fhirclient_postgres() {
    python_fhirclient(Backend::Postgres).await;
}
