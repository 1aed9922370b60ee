//! search.html features beyond the basic parameter types, over HTTP on both backends: token
//! `:in` / `:not-in` / `:above` / `:below` through the terminology service, the implied system of
//! `code`-typed elements, custom SearchParameter resources with `$reindex` (type, instance and
//! system level, as a background job), `_list`, `near`, and `_contained` / `_containedType`.

use std::time::{Duration, Instant};

use kiln_conformance_tests::{backend_tests, entries, Method, TestServer};
use serde_json::{json, Value};

fn ids_of(bundle: &Value, ty: &str) -> Vec<String> {
    let mut v: Vec<String> = entries(bundle)
        .iter()
        .filter(|e| e["resource"]["resourceType"] == ty && e["search"]["mode"] == "match")
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

async fn search_ids(srv: &TestServer, path: &str, ty: &str) -> Vec<String> {
    let r = srv.get(path).await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["type"], "searchset", "{path}: {b}");
    ids_of(&b, ty)
}

/// Asserts a 400 OperationOutcome whose text names every one of `names`.
async fn bad_request(srv: &TestServer, path: &str, names: &[&str]) {
    let r = srv.get(path).await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    let text = serde_json::to_string(&issues).unwrap();
    for n in names {
        assert!(
            text.contains(n),
            "{path}: the outcome should name '{n}': {text}"
        );
    }
}

async fn patients_by_gender(srv: &TestServer) -> Vec<String> {
    let mut ids = Vec::new();
    for g in ["male", "female", "other", "unknown"] {
        ids.push(
            srv.create(&json!({"resourceType": "Patient", "gender": g, "name": [{"family": g}]}))
                .await
                .0,
        );
    }
    ids
}

const BODY_SITE: &str = "http://example.org/fhir/CodeSystem/body-site";

/// limb ⊃ arm ⊃ hand, limb ⊃ leg
fn body_site_code_system() -> Value {
    json!({
        "resourceType": "CodeSystem",
        "url": BODY_SITE,
        "status": "active",
        "content": "complete",
        "hierarchyMeaning": "is-a",
        "concept": [{
            "code": "limb", "display": "Limb",
            "concept": [
                {"code": "arm", "display": "Arm", "concept": [{"code": "hand", "display": "Hand"}]},
                {"code": "leg", "display": "Leg"}
            ]
        }]
    })
}

backend_tests!(
    token_in_and_not_in,
    token_above_and_below,
    implied_system_of_code_elements,
    custom_parameter_and_reindex,
    list_membership,
    near_location,
    reference_hierarchy,
    filter_terminology_operators,
    contained_resources,
    reindex_jobs_are_persistent,
);

async fn reference_hierarchy(srv: &TestServer) {
    // campus ⊃ building ⊃ ward; elsewhere is unrelated
    let loc = |name: &str, parent: Option<&str>| {
        let mut l = json!({"resourceType": "Location", "name": name});
        if let Some(p) = parent {
            l["partOf"] = json!({"reference": format!("Location/{p}")});
        }
        l
    };
    let (campus, _) = srv.create(&loc("campus", None)).await;
    let (building, _) = srv.create(&loc("building", Some(&campus))).await;
    let (ward, _) = srv.create(&loc("ward", Some(&building))).await;
    let (elsewhere, _) = srv.create(&loc("elsewhere", None)).await;
    let mut at = std::collections::HashMap::new();
    for (k, l) in [
        ("campus", &campus),
        ("building", &building),
        ("ward", &ward),
        ("elsewhere", &elsewhere),
    ] {
        let (id, _) = srv
            .create(&json!({
                "resourceType": "Procedure",
                "status": "completed",
                "subject": {"reference": "Patient/p"},
                "location": {"reference": format!("Location/{l}")}
            }))
            .await;
        at.insert(k, id);
    }
    assert_eq!(
        search_ids(
            srv,
            &format!("Procedure?location:below=Location/{campus}"),
            "Procedure"
        )
        .await,
        sorted(&[&at["campus"], &at["building"], &at["ward"]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Procedure?location:below={building}"),
            "Procedure"
        )
        .await,
        sorted(&[&at["building"], &at["ward"]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Procedure?location:above=Location/{ward}"),
            "Procedure"
        )
        .await,
        sorted(&[&at["campus"], &at["building"], &at["ward"]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Procedure?location:above=Location/{building}"),
            "Procedure"
        )
        .await,
        sorted(&[&at["campus"], &at["building"]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Location?partof:below=Location/{campus}"),
            "Location"
        )
        .await,
        sorted(&[&building, &ward])
    );
    // Patient has no circular reference: no hierarchy
    bad_request(
        srv,
        "Observation?subject:below=Patient/1",
        &["subject:below", "Patient/1"],
    )
    .await;
}

async fn filter_terminology_operators(srv: &TestServer) {
    let p = patients_by_gender(srv).await;
    srv.create(&json!({
        "resourceType": "ValueSet",
        "url": "http://example.org/fhir/ValueSet/binary-gender",
        "status": "active",
        "compose": {"include": [{
            "system": "http://hl7.org/fhir/administrative-gender",
            "concept": [{"code": "male"}, {"code": "female"}]
        }]}
    }))
    .await;
    assert_eq!(
        search_ids(
            srv,
            "Patient?_filter=gender in http://example.org/fhir/ValueSet/binary-gender",
            "Patient"
        )
        .await,
        sorted(&[&p[0], &p[1]])
    );
    assert_eq!(
        search_ids(
            srv,
            "Patient?_filter=gender ni http://example.org/fhir/ValueSet/binary-gender or family eq male",
            "Patient"
        )
        .await,
        sorted(&[&p[0], &p[2], &p[3]])
    );
    srv.create(&body_site_code_system()).await;
    let (arm, _) = srv
        .create(&json!({
            "resourceType": "Condition",
            "subject": {"reference": "Patient/x"},
            "bodySite": [{"coding": [{"system": BODY_SITE, "code": "arm"}]}]
        }))
        .await;
    let (leg, _) = srv
        .create(&json!({
            "resourceType": "Condition",
            "subject": {"reference": "Patient/x"},
            "bodySite": [{"coding": [{"system": BODY_SITE, "code": "leg"}]}]
        }))
        .await;
    assert_eq!(
        search_ids(
            srv,
            &format!("Condition?_filter=body-site sb {BODY_SITE}|limb"),
            "Condition"
        )
        .await,
        sorted(&[&arm, &leg])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Condition?_filter=body-site ss {BODY_SITE}|hand"),
            "Condition"
        )
        .await,
        vec![arm]
    );
    bad_request(
        srv,
        "Patient?_filter=gender in http://example.org/fhir/ValueSet/nope",
        &["http://example.org/fhir/ValueSet/nope"],
    )
    .await;
}

async fn token_in_and_not_in(srv: &TestServer) {
    let p = patients_by_gender(srv).await;
    let (male, female, other, unknown) = (&p[0], &p[1], &p[2], &p[3]);
    // an R4 value set known to the terminology service: every gender (implied system indexed)
    assert_eq!(
        search_ids(
            srv,
            "Patient?gender:in=http://hl7.org/fhir/ValueSet/administrative-gender",
            "Patient"
        )
        .await,
        sorted(&[male, female, other, unknown])
    );
    // a stored value set, by canonical URL and by literal reference
    let (vs_id, _) = srv
        .create(&json!({
            "resourceType": "ValueSet",
            "url": "http://example.org/fhir/ValueSet/binary-gender",
            "status": "active",
            "compose": {"include": [{
                "system": "http://hl7.org/fhir/administrative-gender",
                "concept": [{"code": "male"}, {"code": "female"}]
            }]}
        }))
        .await;
    let mf = sorted(&[male, female]);
    assert_eq!(
        search_ids(
            srv,
            "Patient?gender:in=http://example.org/fhir/ValueSet/binary-gender",
            "Patient"
        )
        .await,
        mf
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Patient?gender:in=ValueSet/{vs_id}"),
            "Patient"
        )
        .await,
        mf
    );
    assert_eq!(
        search_ids(
            srv,
            "Patient?gender:not-in=http://example.org/fhir/ValueSet/binary-gender",
            "Patient"
        )
        .await,
        sorted(&[other, unknown])
    );
    // OR of two value sets, AND with another parameter
    assert_eq!(
        search_ids(
            srv,
            "Patient?gender:in=http://example.org/fhir/ValueSet/binary-gender&family=fem",
            "Patient"
        )
        .await,
        vec![female.clone()]
    );
    // a stored value set over a stored code system with an is-a filter
    srv.create(&body_site_code_system()).await;
    srv.create(&json!({
        "resourceType": "ValueSet",
        "url": "http://example.org/fhir/ValueSet/upper-limb",
        "status": "active",
        "compose": {"include": [{
            "system": BODY_SITE,
            "filter": [{"property": "concept", "op": "is-a", "value": "arm"}]
        }]}
    }))
    .await;
    let mut by_code = std::collections::HashMap::new();
    for code in ["limb", "arm", "hand", "leg"] {
        let (id, _) = srv
            .create(&json!({
                "resourceType": "Condition",
                "subject": {"reference": format!("Patient/{male}")},
                "code": {"coding": [{"system": BODY_SITE, "code": code}]}
            }))
            .await;
        by_code.insert(code, id);
    }
    assert_eq!(
        search_ids(
            srv,
            "Condition?code:in=http://example.org/fhir/ValueSet/upper-limb",
            "Condition"
        )
        .await,
        sorted(&[&by_code["arm"], &by_code["hand"]])
    );
    // chained: patients with a condition in the value set
    assert_eq!(
        search_ids(
            srv,
            "Patient?_has:Condition:subject:code:in=http://example.org/fhir/ValueSet/upper-limb",
            "Patient"
        )
        .await,
        vec![male.clone()]
    );
    // unknown value sets are a 400 naming the parameter and the value
    bad_request(
        srv,
        "Patient?gender:in=http://example.org/fhir/ValueSet/nope",
        &["gender:in", "http://example.org/fhir/ValueSet/nope"],
    )
    .await;
    bad_request(
        srv,
        "Patient?gender:not-in=ValueSet/does-not-exist",
        &["gender:not-in", "ValueSet/does-not-exist"],
    )
    .await;
    // :in is for tokens only
    bad_request(srv, "Patient?birthdate:in=http://x", &["birthdate"]).await;
    // conditional create uses the same resolution (inside the write transaction)
    let r = srv
        .send_json(
            Method::POST,
            "Patient",
            &json!({"resourceType": "Patient", "gender": "male"}),
            &[(
                "If-None-Exist",
                "gender:in=http://example.org/fhir/ValueSet/binary-gender&family=male",
            )],
        )
        .await;
    r.assert_status(200);
    assert_eq!(
        r.json()["id"],
        male.as_str(),
        "matched the existing patient"
    );
}

async fn token_above_and_below(srv: &TestServer) {
    srv.create(&body_site_code_system()).await;
    let mut cond = std::collections::HashMap::new();
    for code in ["limb", "arm", "hand", "leg"] {
        let (id, _) = srv
            .create(&json!({
                "resourceType": "Condition",
                "subject": {"reference": "Patient/x"},
                "bodySite": [{"coding": [{"system": BODY_SITE, "code": code}]}]
            }))
            .await;
        cond.insert(code, id);
    }
    let q = |m: &str, code: &str| format!("Condition?body-site:{m}={BODY_SITE}|{code}");
    assert_eq!(
        search_ids(srv, &q("below", "arm"), "Condition").await,
        sorted(&[&cond["arm"], &cond["hand"]])
    );
    assert_eq!(
        search_ids(srv, &q("below", "limb"), "Condition").await,
        sorted(&[&cond["limb"], &cond["arm"], &cond["hand"], &cond["leg"]])
    );
    assert_eq!(
        search_ids(srv, &q("below", "hand"), "Condition").await,
        vec![cond["hand"].clone()]
    );
    assert_eq!(
        search_ids(srv, &q("above", "hand"), "Condition").await,
        sorted(&[&cond["limb"], &cond["arm"], &cond["hand"]])
    );
    assert_eq!(
        search_ids(srv, &q("above", "leg"), "Condition").await,
        sorted(&[&cond["limb"], &cond["leg"]])
    );
    // an R4 code system shipped with Kiln: v3 ActCode's _ActEncounterCode is-a hierarchy
    let (amb, _) = srv
        .create(&json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
        }))
        .await;
    assert_eq!(
        search_ids(
            srv,
            "Encounter?class:below=http://terminology.hl7.org/CodeSystem/v3-ActCode|_ActEncounterCode",
            "Encounter"
        )
        .await,
        vec![amb]
    );
    // a token without system has no hierarchy to look at
    bad_request(srv, "Condition?body-site:below=arm", &["body-site", "arm"]).await;
    // an unknown code system is a 400 naming the parameter
    bad_request(
        srv,
        "Condition?body-site:below=http://example.org/unknown-system|x",
        &["body-site:below", "http://example.org/unknown-system|x"],
    )
    .await;
}

async fn implied_system_of_code_elements(srv: &TestServer) {
    let p = patients_by_gender(srv).await;
    assert_eq!(
        search_ids(
            srv,
            "Patient?gender=http://hl7.org/fhir/administrative-gender|male",
            "Patient"
        )
        .await,
        vec![p[0].clone()]
    );
    assert_eq!(
        search_ids(srv, "Patient?gender=male", "Patient").await,
        vec![p[0].clone()]
    );
    assert!(
        search_ids(srv, "Patient?gender=http://other.org|male", "Patient")
            .await
            .is_empty()
    );
    let (o, _) = srv
        .create(&json!({
            "resourceType": "Observation", "status": "final",
            "code": {"text": "x"}
        }))
        .await;
    srv.create(&json!({
        "resourceType": "Observation", "status": "preliminary",
        "code": {"text": "y"}
    }))
    .await;
    assert_eq!(
        search_ids(
            srv,
            "Observation?status=http://hl7.org/fhir/observation-status|final",
            "Observation"
        )
        .await,
        vec![o.clone()]
    );
    assert_eq!(
        search_ids(
            srv,
            "Observation?status:not=http://hl7.org/fhir/observation-status|preliminary",
            "Observation"
        )
        .await,
        vec![o]
    );
}

fn eye_color_parameter() -> Value {
    json!({
        "resourceType": "SearchParameter",
        "url": "http://example.org/fhir/SearchParameter/patient-eye-color",
        "name": "EyeColor",
        "status": "active",
        "description": "Eye colour of the patient",
        "code": "eye-color",
        "base": ["Patient"],
        "type": "token",
        "expression": "Patient.extension.where(url='http://example.org/eye-color').value"
    })
}

fn nickname_parameter() -> Value {
    json!({
        "resourceType": "SearchParameter",
        "url": "http://example.org/fhir/SearchParameter/patient-nickname",
        "name": "Nickname",
        "status": "active",
        "description": "Nickname of the patient",
        "code": "nickname",
        "base": ["Patient"],
        "type": "string",
        "expression": "Patient.name.where(use='nickname').given"
    })
}

fn patient_with(eye: &str, nickname: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "extension": [{"url": "http://example.org/eye-color", "valueCode": eye}],
        "name": [{"family": "Doe", "given": ["John"]}, {"use": "nickname", "given": [nickname]}]
    })
}

/// Polls a `$reindex` job's status until it is no longer running; returns the final status.
async fn wait_for_job(srv: &TestServer, location: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = kiln_conformance_tests::send(srv.client.get(location)).await;
        r.assert_status(200);
        let p = r.json();
        let state = param(&p, "state");
        if state != json!("running") {
            return p;
        }
        assert!(Instant::now() < deadline, "reindex job did not finish: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn param(p: &Value, name: &str) -> Value {
    p["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == name)
        .and_then(|x| {
            x.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v.clone())
        })
        .unwrap_or(Value::Null)
}

async fn custom_parameter_and_reindex(srv: &TestServer) {
    // resources written before the parameter exists
    let (blue1, _) = srv.create(&patient_with("blue", "jojo")).await;
    let (green, _) = srv.create(&patient_with("green", "bob")).await;
    let (brown, _) = srv.create(&patient_with("brown", "bob")).await;
    // unknown before: strict handling rejects it
    let r = srv
        .get_with("Patient?eye-color=blue", &[("Prefer", "handling=strict")])
        .await;
    r.assert_status(400);
    srv.create(&eye_color_parameter()).await;
    // listed in the CapabilityStatement
    let cs = srv.get("metadata").await.json();
    let patient = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .cloned()
        .unwrap();
    assert!(
        patient["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "eye-color"
                && p["definition"] == "http://example.org/fhir/SearchParameter/patient-eye-color"
                && p["type"] == "token"),
        "{patient}"
    );
    let ops: Vec<&str> = cs["rest"][0]["operation"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert!(ops.contains(&"reindex"), "{ops:?}");
    // known now, but the old resources have no index rows for it yet
    let r = srv
        .get_with("Patient?eye-color=blue", &[("Prefer", "handling=strict")])
        .await;
    r.assert_status(200);
    assert!(ids_of(&r.json(), "Patient").is_empty());
    // new writes are indexed at once
    let (blue2, _) = srv.create(&patient_with("blue", "al")).await;
    assert_eq!(
        search_ids(srv, "Patient?eye-color=blue", "Patient").await,
        vec![blue2.clone()]
    );
    // type-level $reindex: a background job
    let r = srv
        .post_json("Patient/$reindex", &json!({"resourceType": "Parameters"}))
        .await;
    r.assert_status(202);
    let location = r.header("content-location").expect("Content-Location");
    assert!(location.contains("$reindex-status"), "{location}");
    let done = wait_for_job(srv, &location).await;
    assert_eq!(param(&done, "state"), json!("completed"), "{done}");
    assert_eq!(param(&done, "processed"), json!(4), "{done}");
    assert_eq!(param(&done, "total"), json!(4), "{done}");
    assert_eq!(
        search_ids(srv, "Patient?eye-color=blue", "Patient").await,
        sorted(&[&blue1, &blue2])
    );
    assert_eq!(
        search_ids(srv, "Patient?eye-color=green,brown", "Patient").await,
        sorted(&[&green, &brown])
    );
    // instance level runs at once and touches only that resource
    srv.create(&nickname_parameter()).await;
    let r = srv
        .post_json(
            &format!("Patient/{green}/$reindex"),
            &json!({"resourceType": "Parameters"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(param(&r.json(), "processed"), json!(1));
    assert_eq!(
        search_ids(srv, "Patient?nickname=bob", "Patient").await,
        vec![green.clone()]
    );
    // system level: everything
    let r = srv
        .post_json("$reindex", &json!({"resourceType": "Parameters"}))
        .await;
    r.assert_status(202);
    let done = wait_for_job(srv, &r.header("content-location").unwrap()).await;
    assert_eq!(param(&done, "state"), json!("completed"), "{done}");
    assert!(param(&done, "processed").as_i64().unwrap() >= 6, "{done}");
    assert_eq!(
        search_ids(srv, "Patient?nickname=bob", "Patient").await,
        sorted(&[&green, &brown])
    );
    // errors
    srv.get("$reindex-status?job=no-such-job")
        .await
        .assert_status(404);
    srv.post_json(
        "Patient/nope/$reindex",
        &json!({"resourceType": "Parameters"}),
    )
    .await
    .assert_status(404);
    srv.get("Patient/$reindex").await.assert_status(405);
    // a deleted SearchParameter leaves the registry
    let sp = srv
        .get("SearchParameter?url=http://example.org/fhir/SearchParameter/patient-nickname")
        .await
        .json();
    let sp_id = ids_of(&sp, "SearchParameter");
    assert_eq!(sp_id.len(), 1, "{sp}");
    srv.delete(&format!("SearchParameter/{}", sp_id[0]))
        .await
        .assert_status(200);
    srv.get_with("Patient?nickname=bob", &[("Prefer", "handling=strict")])
        .await
        .assert_status(400);
    // a second node on the same PostgreSQL database loads the custom parameters at start and
    // follows later changes
    if let Some(db) = srv.pg_database() {
        let url = kiln_conformance_tests::with_database(
            std::env::var("KILN_TEST_DATABASE_URL").unwrap().trim(),
            db,
        );
        let dir = tempfile::tempdir().unwrap();
        let config = kiln_store::StoreConfig {
            data_dir: dir.path().to_path_buf(),
            database: Some(url),
            max_connections: 2,
            ..Default::default()
        };
        let (base2, state2, stop2) = kiln_server::spawn_for_tests(&config).await.unwrap();
        // serve() loads the stored parameters before the first request; give it a moment
        let node2 = |path: &str| format!("{base2}/{path}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r =
                kiln_conformance_tests::send(srv.client.get(node2("Patient?eye-color=blue"))).await;
            if r.status == 200 {
                assert_eq!(ids_of(&r.json(), "Patient"), sorted(&[&blue1, &blue2]));
                break;
            }
            assert!(Instant::now() < deadline, "node 2 never knew eye-color");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // added through node 1 → known on node 2 within the poll interval
        srv.create(&nickname_parameter()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = kiln_conformance_tests::send(
                srv.client
                    .get(node2("Patient?nickname=bob"))
                    .header("Prefer", "handling=strict"),
            )
            .await;
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "node 2 never learnt nickname");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = stop2.send(());
        state2.store.close().await;
    }
}

async fn list_membership(srv: &TestServer) {
    let p = patients_by_gender(srv).await;
    let (list, _) = srv
        .create(&json!({
            "resourceType": "List",
            "status": "current",
            "mode": "working",
            "entry": [
                {"item": {"reference": format!("Patient/{}", p[0])}},
                {"item": {"reference": format!("Patient/{}", p[2])}}
            ]
        }))
        .await;
    let (other_list, _) = srv
        .create(&json!({
            "resourceType": "List",
            "status": "current",
            "mode": "working",
            "entry": [{"item": {"reference": format!("Patient/{}", p[3])}}]
        }))
        .await;
    assert_eq!(
        search_ids(srv, &format!("Patient?_list={list}"), "Patient").await,
        sorted(&[&p[0], &p[2]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Patient?_list={list},{other_list}"),
            "Patient"
        )
        .await,
        sorted(&[&p[0], &p[2], &p[3]])
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("Patient?_list={list}&gender=other"),
            "Patient"
        )
        .await,
        vec![p[2].clone()]
    );
    assert!(search_ids(srv, "Patient?_list=no-such-list", "Patient")
        .await
        .is_empty());
    // after the list is deleted nothing is a member
    srv.delete(&format!("List/{list}")).await.assert_status(200);
    assert!(search_ids(srv, &format!("Patient?_list={list}"), "Patient")
        .await
        .is_empty());
    bad_request(srv, "Patient?_list=$current-allergies", &["_list"]).await;
}

async fn near_location(srv: &TestServer) {
    let mut ids = Vec::new();
    for (name, lat, long) in [
        ("Brandenburg Gate", 52.5163, 13.3777),
        ("Alexanderplatz", 52.5219, 13.4132),
        ("Potsdam", 52.3906, 13.0645),
        ("Sydney", -33.8688, 151.2093),
    ] {
        ids.push(
            srv.create(&json!({
                "resourceType": "Location",
                "name": name,
                "position": {"latitude": lat, "longitude": long}
            }))
            .await
            .0,
        );
    }
    srv.create(&json!({"resourceType": "Location", "name": "nowhere"}))
        .await;
    let near = |q: &str| format!("Location?near={q}");
    // Alexanderplatz is 2.48 km from the gate, Potsdam 25.4 km
    assert_eq!(
        search_ids(srv, &near("52.5163|13.3777|1|km"), "Location").await,
        vec![ids[0].clone()]
    );
    assert_eq!(
        search_ids(srv, &near("52.5163|13.3777|3|km"), "Location").await,
        sorted(&[&ids[0], &ids[1]])
    );
    assert_eq!(
        search_ids(srv, &near("52.5163|13.3777|3000|m"), "Location").await,
        sorted(&[&ids[0], &ids[1]])
    );
    assert_eq!(
        search_ids(srv, &near("52.5163|13.3777|30"), "Location").await,
        sorted(&[&ids[0], &ids[1], &ids[2]])
    );
    assert_eq!(
        search_ids(srv, &near("52.5163|13.3777|20|[mi_i]"), "Location").await,
        sorted(&[&ids[0], &ids[1], &ids[2]])
    );
    assert_eq!(
        search_ids(srv, &near("-33.87|151.21|5|km"), "Location").await,
        vec![ids[3].clone()]
    );
    assert_eq!(
        search_ids(
            srv,
            &format!("{}&name=alex", near("52.5163|13.3777|3")),
            "Location"
        )
        .await,
        vec![ids[1].clone()]
    );
    bad_request(srv, &near("north|13"), &["near", "north|13"]).await;
    bad_request(srv, &near("52|13|5|parsec"), &["near", "parsec"]).await;
}

const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

fn rx(code: &str) -> Value {
    json!({"coding": [{"system": RXNORM, "code": code}]})
}

/// A MedicationRequest whose medication is a contained Medication `#m1` with `code`.
fn med_request(id: &str, code: &str, form: &str) -> Value {
    json!({
        "resourceType": "MedicationRequest", "id": id, "status": "active", "intent": "order",
        "contained": [{"resourceType": "Medication", "id": "m1", "code": rx(code),
                       "form": {"text": form}}],
        "medicationReference": {"reference": "#m1"},
        "subject": {"reference": "Patient/pa"}
    })
}

/// (resource type, id, fullUrl) of the matches of a search, in Bundle order.
async fn contained_matches(srv: &TestServer, path: &str) -> Vec<(String, String, String)> {
    let r = srv.get_with(path, &[("prefer", "handling=strict")]).await;
    r.assert_status(200);
    let b = r.json();
    entries(&b)
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| {
            (
                e["resource"]["resourceType"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e["resource"]["id"].as_str().unwrap_or("").to_string(),
                e["fullUrl"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn triples(base: &str, list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter()
        .map(|(t, i, u)| (t.to_string(), i.to_string(), format!("{base}/{u}")))
        .collect()
}

async fn contained_resources(srv: &TestServer) {
    let put = |path: String, body: Value| async move {
        let r = srv.put_json(&path, &body).await;
        assert!(r.status == 200 || r.status == 201, "{path}: {}", r.text());
    };
    put(
        "Patient/pa".into(),
        json!({"resourceType": "Patient", "id": "pa", "name": [{"family": "Taylor"}]}),
    )
    .await;
    put(
        "Medication/medtop".into(),
        json!({"resourceType": "Medication", "id": "medtop", "code": rx("111")}),
    )
    .await;
    put(
        "MedicationRequest/mra".into(),
        med_request("mra", "111", "tablet"),
    )
    .await;
    put(
        "MedicationRequest/mrb".into(),
        med_request("mrb", "222", "syrup"),
    )
    .await;
    put(
        "Observation/obsc".into(),
        json!({"resourceType": "Observation", "id": "obsc", "status": "final",
               "code": {"text": "note"},
               "contained": [{"resourceType": "Patient", "id": "cp", "name": [{"family": "Taylor"}],
                              "managingOrganization": {"reference": "#"}}],
               "subject": {"reference": "#cp"}}),
    )
    .await;
    let base = srv.base.clone();
    let t = |list: &[(&str, &str, &str)]| triples(&base, list);
    // by default contained resources are not searched
    assert_eq!(
        contained_matches(srv, "Medication?code=111").await,
        t(&[("Medication", "medtop", "Medication/medtop")])
    );
    // a count by one token reads the token index alone: contained resources (mra#m1, mrb#m1),
    // other types with the same code, a second coding with the same code and deleted
    // resources are not counted
    put(
        "Medication/meddup".into(),
        json!({"resourceType": "Medication", "id": "meddup", "code": {"coding": [
            {"system": RXNORM, "code": "111"}, {"system": "http://example.org/local", "code": "111"},
            {"system": RXNORM, "code": "111"}]}}),
    )
    .await;
    put(
        "Observation/obs111".into(),
        json!({"resourceType": "Observation", "id": "obs111", "status": "final",
               "code": {"coding": [{"system": RXNORM, "code": "111"}]}}),
    )
    .await;
    let count = |path: &'static str| async move {
        let r = srv.get(path).await;
        r.assert_status(200);
        let b = r.json();
        assert!(entries(&b).is_empty(), "{path}: {b}");
        b["total"].as_i64().unwrap_or(-1)
    };
    assert_eq!(count("Medication?code=111&_summary=count").await, 2);
    assert_eq!(
        count("Medication?code=http://www.nlm.nih.gov/research/umls/rxnorm|111&_summary=count")
            .await,
        2
    );
    assert_eq!(
        count("Medication?code=http://example.org/local|111&_summary=count").await,
        1
    );
    assert_eq!(count("Medication?code=111,222&_summary=count").await, 2);
    assert_eq!(count("Medication?code=222&_summary=count").await, 0);
    assert_eq!(count("Observation?code=111&_summary=count").await, 1);
    assert_eq!(
        count("Medication?code=111&_contained=both&_containedType=contained&_summary=count").await,
        3
    );
    srv.delete("Medication/meddup").await.assert_status(200);
    srv.delete("Observation/obs111").await.assert_status(200);
    assert_eq!(count("Medication?code=111&_summary=count").await, 1);
    assert_eq!(count("Observation?code=111&_summary=count").await, 0);
    assert_eq!(
        contained_matches(srv, "Patient?family=Taylor").await,
        t(&[("Patient", "pa", "Patient/pa")])
    );
    // _containedType=contained: the contained resource itself, fullUrl [container]#[id]
    assert_eq!(
        contained_matches(
            srv,
            "Medication?code=111&_contained=true&_containedType=contained"
        )
        .await,
        t(&[("Medication", "m1", "MedicationRequest/mra#m1")])
    );
    assert_eq!(
        contained_matches(
            srv,
            "Medication?code=111&_contained=both&_containedType=contained&_sort=_lastUpdated"
        )
        .await,
        t(&[
            ("Medication", "medtop", "Medication/medtop"),
            ("Medication", "m1", "MedicationRequest/mra#m1"),
        ])
    );
    assert_eq!(
        contained_matches(
            srv,
            "Patient?family=taylor&_contained=true&_containedType=contained"
        )
        .await,
        t(&[("Patient", "cp", "Observation/obsc#cp")])
    );
    // _id is the local id; two containers may use the same one
    let mut both = contained_matches(
        srv,
        "Medication?_id=m1&_contained=true&_containedType=contained",
    )
    .await;
    both.sort();
    assert_eq!(
        both,
        t(&[
            ("Medication", "m1", "MedicationRequest/mra#m1"),
            ("Medication", "m1", "MedicationRequest/mrb#m1"),
        ])
    );
    assert!(contained_matches(srv, "Medication?_id=m1").await.is_empty());
    // _containedType=container (the default): the containers, once each
    assert_eq!(
        contained_matches(srv, "Medication?code=111&_contained=true").await,
        t(&[("MedicationRequest", "mra", "MedicationRequest/mra")])
    );
    assert_eq!(
        contained_matches(
            srv,
            "Medication?code=111,222&_contained=true&_containedType=container&_sort=-code"
        )
        .await,
        t(&[
            ("MedicationRequest", "mrb", "MedicationRequest/mrb"),
            ("MedicationRequest", "mra", "MedicationRequest/mra"),
        ]),
        "containers sorted by their contained resources' codes"
    );
    assert_eq!(
        contained_matches(srv, "Medication?code=111&_contained=both&_sort=_id").await,
        t(&[
            ("Medication", "medtop", "Medication/medtop"),
            ("MedicationRequest", "mra", "MedicationRequest/mra"),
        ])
    );
    // sort and page over contained resources
    let r = srv
        .get("Medication?_contained=true&_containedType=contained&_sort=-code&_count=1")
        .await;
    r.assert_status(200);
    let first = r.json();
    let pages = srv.all_pages(&first, 5).await;
    let urls: Vec<String> = pages
        .iter()
        .flat_map(entries)
        .filter_map(|e| e["fullUrl"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        urls,
        vec![
            format!("{base}/MedicationRequest/mrb#m1"),
            format!("{base}/MedicationRequest/mra#m1")
        ]
    );
    assert_eq!(
        srv.get("Medication?_contained=true&_containedType=contained&_summary=count")
            .await
            .json()["total"],
        2
    );
    // chains are evaluated inside contained resources
    assert_eq!(
        search_ids(
            srv,
            "MedicationRequest?medication.code=222",
            "MedicationRequest"
        )
        .await,
        vec!["mrb".to_string()]
    );
    assert_eq!(
        search_ids(
            srv,
            "Observation?subject:Patient.family=taylor",
            "Observation"
        )
        .await,
        vec!["obsc".to_string()]
    );
    // a contained resource's `#` reference is its container
    assert_eq!(
        contained_matches(
            srv,
            "Patient?organization:missing=false&_contained=true&_containedType=contained"
        )
        .await,
        t(&[("Patient", "cp", "Observation/obsc#cp")])
    );
    // includes from and to contained resources
    let r = srv
        .get("Medication?code=111&_contained=true&_containedType=contained&_revinclude=MedicationRequest:medication")
        .await;
    r.assert_status(200);
    let b = r.json();
    let inc: Vec<String> = entries(&b)
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .filter_map(|e| e["fullUrl"].as_str().map(str::to_string))
        .collect();
    assert_eq!(inc, vec![format!("{base}/MedicationRequest/mra")], "{b}");
    // updating the container replaces its contained rows; deleting it drops them
    put(
        "MedicationRequest/mra".into(),
        med_request("mra", "333", "tablet"),
    )
    .await;
    assert!(
        contained_matches(srv, "Medication?code=111&_contained=true")
            .await
            .is_empty()
    );
    assert_eq!(
        contained_matches(srv, "Medication?code=333&_contained=true").await,
        t(&[("MedicationRequest", "mra", "MedicationRequest/mra")])
    );
    srv.delete("MedicationRequest/mrb").await.assert_status(200);
    assert!(contained_matches(
        srv,
        "Medication?code=222&_contained=both&_containedType=contained"
    )
    .await
    .is_empty());
    assert!(search_ids(
        srv,
        "MedicationRequest?medication.code=222",
        "MedicationRequest"
    )
    .await
    .is_empty());
    // $reindex re-indexes contained resources with their container
    srv.create(&json!({
        "resourceType": "SearchParameter", "url": "http://example.org/fhir/SearchParameter/medication-form-text",
        "name": "form-text", "status": "active", "description": "Text of the form",
        "code": "form-text", "base": ["Medication"],
        "type": "string", "expression": "Medication.form.text"
    }))
    .await;
    let q = "Medication?form-text=tablet&_contained=true&_containedType=contained";
    assert!(contained_matches(srv, q).await.is_empty());
    let r = srv
        .post_json(
            "MedicationRequest/mra/$reindex",
            &json!({"resourceType": "Parameters"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(
        contained_matches(srv, q).await,
        t(&[("Medication", "m1", "MedicationRequest/mra#m1")])
    );
    // invalid values name the parameter
    bad_request(srv, "Medication?_contained=yes", &["_contained", "yes"]).await;
}

/// Records a `$reindex` job as a node that crashed mid-way would have left it: running, its
/// heartbeat long past, `processed` resources done up to row `after_rid`.
async fn crashed_job(
    srv: &TestServer,
    id: &str,
    resource_type: &str,
    processed: i64,
    after_rid: i64,
) {
    use kiln_store::SqlValue;
    let mut tx = srv.state.store.begin().await.unwrap();
    tx.execute(
        "INSERT INTO reindex_jobs (job_id, resource_type, state, processed, total, after_rid, started, owner, heartbeat) \
         VALUES ($1, $2, 'running', $3, 0, $4, 1, 'a-node-that-crashed', 1)",
        &[
            SqlValue::Text(id.into()),
            SqlValue::Text(resource_type.into()),
            SqlValue::Int(processed),
            SqlValue::Int(after_rid),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn reindex_jobs_are_persistent(srv: &TestServer) {
    let (blue, _) = srv.create(&patient_with("blue", "jojo")).await;
    let (green, _) = srv.create(&patient_with("green", "bob")).await;
    let (brown, _) = srv.create(&patient_with("brown", "bob")).await;
    srv.create(&eye_color_parameter()).await;
    let r = srv
        .post_json("Patient/$reindex", &json!({"resourceType": "Parameters"}))
        .await;
    r.assert_status(202);
    let location = r.header("content-location").expect("Content-Location");
    let done = wait_for_job(srv, &location).await;
    assert_eq!(param(&done, "state"), json!("completed"), "{done}");
    assert_eq!(param(&done, "processed"), json!(3), "{done}");
    assert!(param(&done, "finished").is_string(), "{done}");
    assert_eq!(param(&done, "resumed"), Value::Null, "{done}");
    // another node on the same database reads the job's status
    let (base2, state2, stop2) = kiln_server::spawn_for_tests(&srv.store_config())
        .await
        .unwrap();
    let job = location.split("job=").nth(1).unwrap().to_string();
    let r =
        kiln_conformance_tests::send(srv.client.get(format!("{base2}/$reindex-status?job={job}")))
            .await;
    r.assert_status(200);
    assert_eq!(r.json(), done, "the same status from node 2");
    // a job interrupted by a crash is resumed after the last batch that committed
    srv.create(&nickname_parameter()).await;
    assert!(search_ids(srv, "Patient?nickname=bob", "Patient")
        .await
        .is_empty());
    let rid = |id: &String| {
        let id = id.clone();
        let store = srv.state.store.clone();
        async move { store.read("Patient", &id).await.unwrap().unwrap().rid }
    };
    // it had done the first patient when its node died
    crashed_job(srv, "crashed-1", "Patient", 1, rid(&blue).await).await;
    let status = format!("{}/$reindex-status?job=crashed-1", srv.base);
    let done = wait_for_job(srv, &status).await;
    assert_eq!(param(&done, "state"), json!("completed"), "{done}");
    assert_eq!(param(&done, "resumed"), json!(1), "{done}");
    assert_eq!(
        param(&done, "processed"),
        json!(3),
        "1 before the crash + 2 after: {done}"
    );
    assert_eq!(
        search_ids(srv, "Patient?nickname=bob", "Patient").await,
        sorted(&[&green, &brown])
    );
    // nodes also look for interrupted jobs by themselves (node 2 at its start and every poll)
    crashed_job(srv, "crashed-2", "Patient", 0, 0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = srv
            .state
            .store
            .query_rows(
                "SELECT state, processed, resumed FROM reindex_jobs WHERE job_id = 'crashed-2'",
                &[],
            )
            .await
            .unwrap();
        let row = &rows[0];
        if row[0].as_str() == Some("completed") {
            assert_eq!(row[1].as_i64(), Some(3));
            assert_eq!(row[2].as_i64(), Some(1), "claimed once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no node resumed the job: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop2.send(());
    state2.store.close().await;
}
