//! Attack suite against the integrated server with SMART enforcement on: an app holding a
//! patient-context token for Patient A (`patient/*.cruds`) tries every route to Patient B's data.
//!
//! Data: Patients A and B, each with two Observations (lab, vital sign), a Condition and an
//! Encounter, all referencing one shared Practitioner. B's resources carry the marker text
//! `SECRET-B-7731` and B's name is `Blackwood`.
//!
//! Leak rule: no response body may contain B's name, B's marker text or the id of any of B's
//! resources — except a string the attacker itself put in the request (a 404 may echo the id that
//! was asked for; a Bundle's `self` link echoes the query). Writes are checked against ground truth
//! read through a second listener over the same store without authorization.
//!
//! Prints `SMART attack suite: N passed, M failed`; fails if any attack succeeded.

mod smart_support;

use kiln_conformance_tests::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use smart_support::*;

/// Markers of B's data present in `body` and not supplied by the attacker in `request`.
fn leaks(body: &str, request: &str) -> Vec<String> {
    let mut markers: Vec<&str> = vec![NAME_B, SECRET_B, "Bertram", CODE_B];
    markers.extend_from_slice(B_IDS);
    markers
        .into_iter()
        .filter(|m| body.contains(m) && !request.contains(m))
        .map(str::to_string)
        .collect()
}

/// A read-type attack: any status but 2xx-with-B's-data; the body must not leak.
fn no_leak(r: &Resp, request: &str) -> Result<(), String> {
    ensure(r.status.as_u16() != 599, format!("transport: {}", r.body))?;
    let l = leaks(&r.body, request);
    ensure(
        l.is_empty(),
        format!("leaked {l:?} (status {})", r.status.as_u16()),
    )?;
    ensure(
        r.status != StatusCode::INTERNAL_SERVER_ERROR,
        format!("500: {}", r.short()),
    )
}

/// The read is refused with 404 (existence hidden) or 403, and nothing leaks.
fn refused_read(r: &Resp, request: &str) -> Result<(), String> {
    no_leak(r, request)?;
    ensure(
        r.status == StatusCode::NOT_FOUND || r.status == StatusCode::FORBIDDEN,
        format!("expected 404/403, got {}", r.short()),
    )
}

/// The write is refused (4xx) and the body leaks nothing.
fn refused_write(r: &Resp, request: &str) -> Result<(), String> {
    no_leak(r, request)?;
    ensure(
        r.status.is_client_error(),
        format!("write not refused: {}", r.short()),
    )
}

/// B's resource is unchanged (ground truth through the unauthenticated listener).
async fn b_unchanged(k: &Kiln, path: &str, field: &str, expected: &Value) -> Result<(), String> {
    let cur = k
        .admin_read(path)
        .await
        .ok_or(format!("{path} no longer exists"))?;
    ensure(
        cur.pointer(field) == Some(expected),
        format!("{path}{field} is now {:?}", cur.pointer(field)),
    )
}

/// Every attack on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_attacks_sqlite() {
    let k = match start_on(Backend::Sqlite).await {
        Ok(Some(k)) => k,
        Ok(None) => unreachable!("SQLite is always available"),
        Err(e) => panic!("cannot start Kiln with SMART: {e}"),
    };
    let names = smart_attack_suite(&k).await;
    k.finish().await;
    assert_eq!(names.len(), ATTACK_COUNT, "attacks run: {names:?}");
}

/// The same attacks on PostgreSQL, with identical results: the same named attacks, 0 leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_attacks_postgres() {
    let k = match start_on(Backend::Postgres).await {
        Ok(Some(k)) => k,
        Ok(None) => return,
        Err(e) => panic!("cannot start Kiln with SMART on PostgreSQL: {e}"),
    };
    let names = smart_attack_suite(&k).await;
    k.finish().await;
    assert_eq!(names.len(), ATTACK_COUNT, "attacks run: {names:?}");
}

/// How many named attacks [`smart_attack_suite`] records (both backends must run all of them).
const ATTACK_COUNT: usize = 118;

/// Runs every attack against `k`; fails on any leak; returns the attack names.
async fn smart_attack_suite(k: &Kiln) -> Vec<String> {
    println!("backend: {:?}", k.backend);
    let t = match k
        .patient_token("launch/patient openid fhirUser offline_access patient/*.cruds")
        .await
    {
        Ok(t) => t,
        Err(e) => panic!("cannot obtain Patient A's token: {e}"),
    };
    assert_eq!(t["patient"], PATIENT_A, "token context");
    let tok = t["access_token"].as_str().unwrap_or_default().to_string();
    let mut refresh = t["refresh_token"].as_str().unwrap_or_default().to_string();
    let mut rep = Report::default();

    // Sanity: the token does work for A (otherwise every "refusal" below would be vacuous).
    let r = k.fhir_get(&tok, "Observation").await;
    rep.record(
        "baseline: A's token sees exactly A's 2 Observations",
        (|| {
            ensure(r.status == StatusCode::OK, r.short())?;
            let ids = bundle_ids(&r.json());
            ensure(
                ids.len() == 2 && ids.iter().all(|i| i.contains("aaaa-")),
                format!("{ids:?}"),
            )
        })(),
    );

    let r = k.fhir_get(&tok, "Observation?_format=xml&_include=*").await;
    rep.record(
        "baseline: XML search works for A (so the XML attacks below are not vacuous)",
        ensure(
            r.status == StatusCode::OK
                && r.body.contains("<Bundle")
                && r.body.contains("aaaa-obs-lab"),
            r.short(),
        ),
    );

    // ------------------------------------------------------------ reads by id
    for path in [
        format!("Patient/{PATIENT_B}"),
        "Observation/bbbb-obs-lab".into(),
        "Observation/bbbb-obs-vital".into(),
        "Condition/bbbb-cond".into(),
        "Encounter/bbbb-enc".into(),
        "Observation/bbbb-obs-lab/_history/1".into(),
        format!("Patient/{PATIENT_B}/_history"),
        "Observation/bbbb-obs-lab/_history".into(),
    ] {
        let r = k.fhir_get(&tok, &path).await;
        rep.record(
            &format!("read GET {path} → 404/403"),
            refused_read(&r, &path),
        );
    }
    let r = k
        .send(
            Method::HEAD,
            &format!("Patient/{PATIENT_B}"),
            &[("authorization", &format!("Bearer {tok}"))],
            None,
        )
        .await;
    rep.record(
        "HEAD Patient/B → 404/403",
        ensure(
            r.status == StatusCode::NOT_FOUND || r.status == StatusCode::FORBIDDEN,
            r.short(),
        ),
    );

    // ------------------------------------------------------------ searches
    let searches = [
        format!("Observation?subject=Patient/{PATIENT_B}"),
        format!("Observation?subject={PATIENT_B}"),
        format!("Observation?patient={PATIENT_B}"),
        format!("Observation?patient=Patient/{PATIENT_A},Patient/{PATIENT_B}"),
        format!("Observation?subject:Patient.name={NAME_B}"),
        format!("Observation?subject:Patient.family={NAME_B}"),
        format!("Observation?code=http://loinc.org|{CODE_B}"),
        "Observation?_id=bbbb-obs-lab".into(),
        "Observation?_id=bbbb-obs-lab,aaaa-obs-lab".into(),
        format!("Observation?value-string={SECRET_B}"),
        format!("Patient?_id={PATIENT_B}"),
        format!("Patient?name={NAME_B}"),
        "Patient?gender=female".into(),
        format!("Patient?_has:Observation:patient:code={CODE_B}"),
        format!("Patient?_has:Observation:subject:code=http://loinc.org|{CODE_B}"),
        "Observation?_include=Observation:subject".into(),
        "Observation?_include=Observation:patient&_include:iterate=Patient:general-practitioner".into(),
        format!("Observation?_include=Observation:subject&patient={PATIENT_B}"),
        "Patient?_revinclude=Observation:subject".into(),
        "Patient?_revinclude=Observation:patient&_revinclude=Condition:patient&_revinclude=Encounter:patient".into(),
        format!("Practitioner/{PRACTITIONER}?_revinclude=Encounter:participant"),
        "Practitioner?_revinclude=Encounter:participant&_revinclude=Observation:performer&_revinclude=Condition:asserter".into(),
        "Practitioner?_revinclude=Patient:general-practitioner".into(),
        format!("Encounter?participant=Practitioner/{PRACTITIONER}"),
        format!("Encounter?practitioner={PRACTITIONER}"),
        format!("Observation?performer=Practitioner/{PRACTITIONER}"),
        format!("Condition?asserter=Practitioner/{PRACTITIONER}"),
        "Condition".into(),
        "Encounter".into(),
        "Patient".into(),
        format!("Patient/{PATIENT_B}/Observation"),
        format!("Patient/{PATIENT_B}/Condition"),
        format!("Patient/{PATIENT_B}/Encounter"),
        format!("Patient/{PATIENT_B}/*"),
        format!("Patient/{PATIENT_B}/$everything"),
        format!("Patient/{PATIENT_B}/$everything?_type=Observation,Condition"),
        "Patient/$everything".into(),
        "Patient/$everything?_type=Patient,Observation,Practitioner&_count=1".into(),
        "Encounter/bbbb-enc/$everything".into(),
        "Observation/_history".into(),
        "Patient/_history".into(),
        "_history".into(),
        "?_type=Observation,Patient,Condition,Encounter".into(),
        "?_id=bbbb-obs-lab".into(),
        format!("?_type=Patient&name={NAME_B}"),
        "Observation?_summary=count".into(),
        "Observation?_elements=id,subject".into(),
        "Observation?_sort=-date&_count=1".into(),
        "Observation?_total=accurate".into(),
        "Observation?_list=x".into(),
        format!("Observation?_filter=subject eq Patient/{PATIENT_B}"),
        format!("Observation?_query=x&subject=Patient/{PATIENT_B}"),
        "Observation?_include=*".into(),
        "Encounter?_include=*&_include:iterate=*".into(),
        "Patient?_revinclude=*".into(),
        "Practitioner?_revinclude=*".into(),
        "?_type=Observation&_include=Observation:subject".into(),
        "Observation/_history?_summary=count".into(),
        "Observation?_count=0".into(),
        format!("Observation?subject=Patient/{PATIENT_B}&_format=xml"),
        "Observation?_format=xml&_include=*".into(),
        "_history?_format=xml".into(),
        format!("Patient/{PATIENT_B}?_format=xml"),
        format!("Patient/{PATIENT_B}/_history/1"),
        "Observation/bbbb-obs-lab/$validate".into(),
        format!("Patient/{PATIENT_B}/$validate"),
    ];
    for q in &searches {
        let r = k.fhir_get(&tok, q).await;
        let res = no_leak(&r, q).and_then(|_| {
            if r.status == StatusCode::OK {
                let v = r.json();
                let ids = bundle_ids(&v);
                ensure(
                    ids.iter().all(|i| !B_IDS.iter().any(|b| i.ends_with(b))),
                    format!("returned {ids:?}"),
                )?;
                // counts are an existence leak too: only A's resources may be counted
                if let Some(total) = v["total"].as_u64() {
                    let own = k_max_visible(q);
                    ensure(
                        total as usize <= own,
                        format!("total {total} > {own} visible"),
                    )?;
                }
            }
            Ok(())
        });
        rep.record(&format!("search GET {q}"), res);
    }
    // $everything at type level with a patient token is that patient's $everything: exactly
    // A's own resources (the shared Practitioner lies outside A's compartment, which a
    // patient-scoped grant cannot see), over every page
    let r = k.fhir_get(&tok, "Patient/$everything?_count=2").await;
    let mut ids = Vec::new();
    let mut res = ensure(r.status == StatusCode::OK, r.short());
    if res.is_ok() {
        let mut page = r.json();
        loop {
            ids.extend(bundle_ids(&page));
            let next = page["link"].as_array().and_then(|ls| {
                ls.iter()
                    .find(|l| l["relation"] == "next")
                    .and_then(|l| l["url"].as_str())
                    .map(str::to_string)
            });
            let Some(next) = next else { break };
            let r = k.fhir_get(&tok, &next).await;
            if r.status != StatusCode::OK {
                res = Err(format!("next page: {}", r.short()));
                break;
            }
            page = r.json();
        }
    }
    ids.sort();
    rep.record(
        "Patient/$everything with A's token pages through exactly A's 5 resources",
        res.and_then(|_| {
            let mut want: Vec<String> = vec![
                format!("Patient/{PATIENT_A}"),
                "Condition/aaaa-cond".into(),
                "Encounter/aaaa-enc".into(),
                "Observation/aaaa-obs-lab".into(),
                "Observation/aaaa-obs-vital".into(),
            ];
            want.sort();
            ensure(ids == want, format!("{ids:?}"))
        }),
    );
    let r = k
        .fhir_send(
            &tok,
            Method::POST,
            &format!("Patient/{PATIENT_B}/$everything"),
            &json!({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueCode": "Observation"}]}),
        )
        .await;
    let path = format!("POST Patient/{PATIENT_B}/$everything");
    rep.record(&format!("{path} → 404/403"), refused_read(&r, &path));

    // POST _search with the parameters in the body
    let auth = format!("Bearer {tok}");
    for form in [
        format!("subject=Patient%2F{PATIENT_B}"),
        format!("patient={PATIENT_B}&_include=Observation%3Asubject"),
    ] {
        let r = k
            .send(
                Method::POST,
                "Observation/_search",
                &[
                    ("authorization", &auth),
                    ("accept", "application/fhir+json"),
                ],
                Some(("application/x-www-form-urlencoded", form.clone())),
            )
            .await;
        let res = no_leak(&r, &form).and_then(|_| {
            ensure(
                bundle_ids(&r.json()).iter().all(|i| !i.contains("bbbb-")),
                r.short(),
            )
        });
        rep.record(&format!("search POST Observation/_search {form}"), res);
    }

    // ------------------------------------------------------------ batch / transaction
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{PATIENT_B}")}},
        {"request": {"method": "GET", "url": "Observation/bbbb-obs-lab"}},
        {"request": {"method": "GET", "url": format!("Observation?subject=Patient/{PATIENT_B}")}},
        {"request": {"method": "GET", "url": format!("Patient/{PATIENT_B}/Condition")}},
        {"request": {"method": "GET", "url": "Encounter?_id=bbbb-enc"}},
        {"request": {"method": "GET", "url": "Observation/bbbb-obs-lab/_history/1"}},
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &batch).await;
    let breq = batch.to_string();
    rep.record(
        "batch Bundle of reads of B's resources",
        no_leak(&r, &breq).and_then(|_| {
            ensure(
                r.status == StatusCode::OK || r.status.is_client_error(),
                r.short(),
            )
        }),
    );
    let tx_create = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0f0e4a4e-1111-4a4e-8a4e-000000000001",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "injected-into-B"},
                      "subject": {"reference": format!("Patient/{PATIENT_B}")}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &tx_create).await;
    let injected = k
        .admin_read(&format!(
            "Observation?code:text=injected-into-B&subject=Patient/{PATIENT_B}"
        ))
        .await
        .map(|b| bundle_ids(&b).len())
        .unwrap_or(0);
    rep.record(
        "transaction POST of an Observation for B",
        refused_write(&r, &tx_create.to_string()).and_then(|_| {
            ensure(
                injected == 0,
                format!("{injected} Observation(s) created for B"),
            )
        }),
    );
    let tx_put = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": format!("{}/Patient/{PATIENT_B}", k.base),
         "resource": {"resourceType": "Patient", "id": PATIENT_B, "name": [{"family": "Hijacked"}]},
         "request": {"method": "PUT", "url": format!("Patient/{PATIENT_B}")}}
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &tx_put).await;
    let res = refused_write(&r, &tx_put.to_string());
    let unchanged = b_unchanged(
        k,
        &format!("Patient/{PATIENT_B}"),
        "/name/0/family",
        &json!(NAME_B),
    )
    .await;
    rep.record("transaction PUT overwriting Patient B", res.and(unchanged));
    let tx_del = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/bbbb-obs-lab"}},
        {"request": {"method": "DELETE", "url": format!("Condition?subject=Patient/{PATIENT_B}")}}
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &tx_del).await;
    let still = k.admin_read("Observation/bbbb-obs-lab").await.is_some()
        && k.admin_read("Condition/bbbb-cond").await.is_some();
    rep.record(
        "transaction DELETE of B's Observation + conditional delete of B's Conditions",
        no_leak(&r, &tx_del.to_string())
            .and_then(|_| ensure(still, format!("B's data deleted ({})", r.short()))),
    );
    let batch_write = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Condition", "id": "bbbb-cond", "subject": {"reference": format!("Patient/{PATIENT_A}")},
                      "code": {"text": "stolen"}},
         "request": {"method": "PUT", "url": "Condition/bbbb-cond"}}
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &batch_write).await;
    let res = no_leak(&r, &batch_write.to_string());
    let unchanged = b_unchanged(
        k,
        "Condition/bbbb-cond",
        "/subject/reference",
        &json!(format!("Patient/{PATIENT_B}")),
    )
    .await;
    rep.record(
        "batch PUT moving B's Condition into A's compartment",
        res.and(unchanged),
    );

    // ------------------------------------------------------------ direct writes
    let obs_for_b = json!({"resourceType": "Observation", "id": "evil-new", "status": "final",
        "code": {"text": "planted"}, "subject": {"reference": format!("Patient/{PATIENT_B}")}});
    let r = k
        .fhir_send(&tok, Method::PUT, "Observation/evil-new", &obs_for_b)
        .await;
    let created = k.admin_read("Observation/evil-new").await.is_some();
    rep.record(
        "PUT of a new Observation into B's compartment",
        refused_write(&r, &obs_for_b.to_string())
            .and_then(|_| ensure(!created, "resource was created")),
    );
    let mut post_b = obs_for_b.clone();
    if let Some(o) = post_b.as_object_mut() {
        o.remove("id");
    }
    let r = k
        .fhir_send(&tok, Method::POST, "Observation", &post_b)
        .await;
    rep.record(
        "POST of an Observation for B",
        refused_write(&r, &post_b.to_string()),
    );
    // A data-changing maintenance operation works on whole types: a patient-limited token must
    // not start it at any level, even with patient/*.cruds.
    for path in [
        "$reindex",
        "Observation/$reindex",
        "Observation/aaaa-obs-lab/$reindex",
    ] {
        let r = k
            .fhir_send(
                &tok,
                Method::POST,
                path,
                &json!({"resourceType": "Parameters"}),
            )
            .await;
        rep.record(
            &format!("POST {path} with a patient token → 403"),
            refused_write(&r, path).and_then(|_| {
                ensure(
                    r.status == StatusCode::FORBIDDEN,
                    format!("expected 403, got {}", r.short()),
                )
            }),
        );
    }
    let steal = json!({"resourceType": "Observation", "id": "bbbb-obs-lab", "status": "final",
        "code": {"text": "stolen"}, "subject": {"reference": format!("Patient/{PATIENT_A}")}});
    let r = k
        .fhir_send(&tok, Method::PUT, "Observation/bbbb-obs-lab", &steal)
        .await;
    let res = refused_write(&r, &steal.to_string());
    let unchanged = b_unchanged(
        k,
        "Observation/bbbb-obs-lab",
        "/subject/reference",
        &json!(format!("Patient/{PATIENT_B}")),
    )
    .await;
    rep.record(
        "PUT over B's Observation re-pointing it to A",
        res.and(unchanged),
    );
    let r = k
        .fhir_send(
            &tok,
            Method::PUT,
            &format!("Patient/{PATIENT_B}"),
            &json!({"resourceType": "Patient", "id": PATIENT_B, "name": [{"family": "Hijacked"}]}),
        )
        .await;
    let res = refused_write(&r, "");
    let unchanged = b_unchanged(
        k,
        &format!("Patient/{PATIENT_B}"),
        "/name/0/family",
        &json!(NAME_B),
    )
    .await;
    rep.record("PUT over Patient B", res.and(unchanged));
    let r = k
        .send(
            Method::PATCH,
            "Observation/bbbb-obs-lab",
            &[("authorization", &auth)],
            Some((
                "application/json-patch+json",
                json!([{"op": "replace", "path": "/status", "value": "entered-in-error"}])
                    .to_string(),
            )),
        )
        .await;
    let res = refused_write(&r, "Observation/bbbb-obs-lab");
    let unchanged = b_unchanged(k, "Observation/bbbb-obs-lab", "/status", &json!("final")).await;
    rep.record("PATCH of B's Observation", res.and(unchanged));
    let r = k
        .send(
            Method::DELETE,
            "Observation/bbbb-obs-vital",
            &[("authorization", &auth)],
            None,
        )
        .await;
    let exists = k.admin_read("Observation/bbbb-obs-vital").await.is_some();
    rep.record(
        "DELETE of B's Observation",
        no_leak(&r, "Observation/bbbb-obs-vital")
            .and_then(|_| ensure(exists, format!("deleted ({})", r.short()))),
    );
    let cond_put = json!({"resourceType": "Observation", "status": "final", "code": {"text": "cond-overwrite"},
        "subject": {"reference": format!("Patient/{PATIENT_A}")}});
    let q = format!("Observation?subject=Patient/{PATIENT_B}&category=laboratory");
    let r = k.fhir_send(&tok, Method::PUT, &q, &cond_put).await;
    let res = refused_write(&r, &q);
    let unchanged = b_unchanged(
        k,
        "Observation/bbbb-obs-lab",
        "/subject/reference",
        &json!(format!("Patient/{PATIENT_B}")),
    )
    .await;
    rep.record(
        "conditional update matching B's Observation",
        res.and(unchanged),
    );
    let q = format!("Observation?patient={PATIENT_B}");
    let r = k
        .send(Method::DELETE, &q, &[("authorization", &auth)], None)
        .await;
    let exists = k.admin_read("Observation/bbbb-obs-lab").await.is_some();
    rep.record(
        "conditional delete matching B's Observations",
        no_leak(&r, &q).and_then(|_| ensure(exists, format!("deleted ({})", r.short()))),
    );
    let cond_create = json!({"resourceType": "Observation", "status": "final", "code": {"text": "probe"},
        "subject": {"reference": format!("Patient/{PATIENT_A}")}});
    let probe = format!("code=http://loinc.org|{CODE_B}");
    let r = k
        .send(
            Method::POST,
            "Observation",
            &[
                ("authorization", &auth),
                ("if-none-exist", &probe),
                ("accept", "application/fhir+json"),
            ],
            Some(("application/fhir+json", cond_create.to_string())),
        )
        .await;
    rep.record(
        "conditional create (If-None-Exist probing B's code)",
        no_leak(&r, &probe).and_then(|_| {
            // 200 here would reveal that a matching resource exists outside the compartment
            ensure(
                r.status != StatusCode::OK,
                format!("existence revealed: {}", r.short()),
            )
        }),
    );

    let tx_probe = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0f0e4a4e-1111-4a4e-8a4e-000000000002",
         "resource": cond_create.clone(),
         "request": {"method": "POST", "url": "Observation", "ifNoneExist": probe.clone()}}
    ]});
    let r = k.fhir_send(&tok, Method::POST, "", &tx_probe).await;
    rep.record(
        "transaction conditional create (ifNoneExist probing B's code)",
        no_leak(&r, &probe).and_then(|_| {
            let body = r.json();
            let status = body
                .pointer("/entry/0/response/status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            ensure(
                !status.starts_with("200"),
                format!("existence revealed: entry status {status}"),
            )
        }),
    );

    // ------------------------------------------------------------ forged tokens
    let now = now();
    let claims = |exp: i64, aud: &str, patient: &str| {
        json!({"iss": k.base, "sub": "alice", "aud": aud, "exp": exp, "iat": now,
               "jti": uuid::Uuid::new_v4().to_string(), "client_id": k.public_client,
               "scope": "patient/*.rs", "patient": patient})
    };
    let parts: Vec<&str> = tok.split('.').collect();
    let mut payload = decode_jwt_part(&tok, 1);
    payload["patient"] = json!(PATIENT_B);
    let tampered = format!(
        "{}.{}.{}",
        parts.first().unwrap_or(&""),
        b64url_json(&payload),
        parts.get(2).unwrap_or(&"")
    );
    let mut widened = decode_jwt_part(&tok, 1);
    widened["scope"] = json!("system/*.cruds");
    let tampered_scope = format!(
        "{}.{}.{}",
        parts.first().unwrap_or(&""),
        b64url_json(&widened),
        parts.get(2).unwrap_or(&"")
    );
    let none = format!(
        "{}.{}.",
        b64url_json(&json!({"alg": "none", "typ": "JWT"})),
        b64url_json(&claims(now + 300, &k.base, PATIENT_B))
    );
    let hs = {
        let ring = k.auth.key_ring();
        let kid = ring.active().map(|x| x.kid.clone()).unwrap_or_default();
        let jwks = k.get("auth/jwks", &[]).await.json();
        let n = jwks["keys"][0]["n"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(kid);
        jsonwebtoken::encode(
            &h,
            &claims(now + 300, &k.base, PATIENT_B),
            &jsonwebtoken::EncodingKey::from_secret(n.as_bytes()),
        )
        .unwrap_or_default()
    };
    let forged: Vec<(&str, String)> = vec![
        (
            "tampered payload (patient → B), original signature",
            tampered,
        ),
        (
            "tampered payload (scope → system/*.cruds), original signature",
            tampered_scope,
        ),
        ("alg: none token for B", none),
        ("HS256 token keyed with the server's public modulus", hs),
        (
            "expired token (server-signed)",
            k.server_signed(&claims(now - 3600, &k.base, PATIENT_B)),
        ),
        (
            "token for another audience (server-signed)",
            k.server_signed(&claims(now + 300, "https://other.example/fhir", PATIENT_B)),
        ),
        ("garbage bearer", "not.a.jwt".into()),
        ("empty bearer", String::new()),
    ];
    for (name, bad) in forged {
        let r = k.fhir_get(&bad, &format!("Patient/{PATIENT_B}")).await;
        let r2 = k.fhir_get(&bad, "Observation").await;
        rep.record(
            &format!("forged token: {name} → 401"),
            no_leak(&r, "")
                .and_then(|_| no_leak(&r2, ""))
                .and_then(|_| {
                    ensure(
                        r.status == StatusCode::UNAUTHORIZED
                            && r2.status == StatusCode::UNAUTHORIZED,
                        format!("{} / {}", r.short(), r2.short()),
                    )
                }),
        );
    }
    let r = k
        .get(
            &format!("Patient/{PATIENT_B}"),
            &[("authorization", &format!("Basic {tok}"))],
        )
        .await;
    rep.record(
        "token under a non-Bearer scheme → 401",
        no_leak(&r, "").and_then(|_| ensure(r.status == StatusCode::UNAUTHORIZED, r.short())),
    );
    let r = k
        .get(
            &format!("Observation?access_token={tok}&patient={PATIENT_B}"),
            &[],
        )
        .await;
    rep.record(
        "token in the query string (not accepted) → 401",
        no_leak(&r, "").and_then(|_| ensure(r.status == StatusCode::UNAUTHORIZED, r.short())),
    );

    // ------------------------------------------------------------ backend assertion replay
    let a = sign(
        &k.backend_key,
        &assertion_claims(&k.backend_client, &k.token_endpoint(), 240),
    );
    let first = k.backend_token_request(&a, "system/Patient.rs").await;
    let second = k.backend_token_request(&a, "system/Patient.rs").await;
    rep.record(
        "replayed backend client assertion (same jti) refused",
        ensure(
            first.status == StatusCode::OK,
            format!("first use: {}", first.short()),
        )
        .and_then(|_| {
            ensure(
                second.status == StatusCode::UNAUTHORIZED
                    || second.status == StatusCode::BAD_REQUEST,
                format!("replay: {}", second.short()),
            )?;
            ensure(!second.body.contains("access_token"), "replay got a token")
        }),
    );
    let long = sign(
        &k.backend_key,
        &assertion_claims(&k.backend_client, &k.token_endpoint(), 3600),
    );
    let r = k.backend_token_request(&long, "system/Patient.rs").await;
    rep.record(
        "backend assertion with exp > 5 minutes refused",
        ensure(
            r.status == StatusCode::UNAUTHORIZED || r.status == StatusCode::BAD_REQUEST,
            r.short(),
        ),
    );

    // ------------------------------------------------------------ refresh escalation
    for (name, scope) in [
        (
            "refresh asking for user/*.cruds",
            "patient/*.cruds user/*.cruds",
        ),
        ("refresh asking for system/*.rs", "system/*.rs"),
        (
            "refresh asking for a new patient scope type",
            "patient/*.cruds patient/*.*",
        ),
    ] {
        let r = k
            .post_form(
                "auth/token",
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &refresh),
                    ("client_id", &k.public_client),
                    ("scope", scope),
                ],
                &[],
            )
            .await;
        let granted = r.json()["scope"].as_str().unwrap_or_default().to_string();
        // a successful (down-scoped) refresh rotates the refresh token
        if let Some(next) = r.json()["refresh_token"].as_str() {
            refresh = next.to_string();
        }
        rep.record(
            &format!("scope escalation: {name}"),
            ensure(
                r.status == StatusCode::BAD_REQUEST
                    || (r.status == StatusCode::OK
                        && !granted.contains("user/")
                        && !granted.contains("system/")),
                format!("{} granted {granted:?}", r.short()),
            ),
        );
    }
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
    let t2 = r.json();
    rep.record(
        "refreshed token keeps Patient A's context",
        ensure(
            r.status == StatusCode::OK && t2["patient"] == PATIENT_A,
            r.short(),
        )
        .and_then(|_| async_free_check(&t2)),
    );
    let fresh = t2["access_token"].as_str().unwrap_or_default();
    let r = k.fhir_get(fresh, &format!("Patient/{PATIENT_B}")).await;
    rep.record(
        "refreshed token still cannot read Patient B",
        refused_read(&r, &format!("Patient/{PATIENT_B}")),
    );

    let r = k
        .post_form(
            "auth/token",
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &k.secret_client),
            ],
            &[],
        )
        .await;
    rep.record(
        "refresh token presented by another client refused",
        ensure(r.status.is_client_error(), r.short()),
    );

    // ------------------------------------------------------------ ground truth: B intact
    let mut intact = Ok(());
    for id in B_IDS {
        let ty = match *id {
            "bbbb-patient" => "Patient",
            "bbbb-cond" => "Condition",
            "bbbb-enc" => "Encounter",
            _ => "Observation",
        };
        if k.admin_read(&format!("{ty}/{id}")).await.is_none() {
            intact = Err(format!("{ty}/{id} missing after the attacks"));
        }
    }
    rep.record("ground truth: all of B's resources still exist", intact);

    rep.print("SMART attack suite (token for Patient A; target Patient B)");
    let (p, f) = (rep.passed(), rep.failed());
    println!(
        "SMART attack suite ({:?}): {p} passed, {f} failed",
        k.backend
    );
    assert_eq!(f, 0, "SMART attack suite: {p} passed, {f} failed");
    rep.rows.into_iter().map(|(n, _)| n).collect()
}

/// The refreshed token response must not name another patient.
fn async_free_check(t: &Value) -> Result<(), String> {
    ensure(
        !t.to_string().contains(PATIENT_B),
        "refresh response names Patient B",
    )
}

/// Upper bound of resources A's token may see in a search (for `total`): A's own resources of the
/// searched type, plus includes. Patient A + 2 Observations + Condition + Encounter + the shared
/// Practitioner = 6.
fn k_max_visible(q: &str) -> usize {
    if q.starts_with("Observation") {
        2
    } else if q.starts_with("Patient?")
        || q == "Patient"
        || q.starts_with("Condition")
        || q.starts_with("Encounter")
    {
        1
    } else {
        6
    }
}
