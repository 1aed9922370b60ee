//! search.html over HTTP: type, system and compartment search, paging, `_include`/`_revinclude`,
//! `_summary=count`, `POST _search`, strict handling of unknown parameters.

//!
//! The complete suite over a hand-made fixture (exact expected result sets, run on SQLite and
//! PostgreSQL) lives in `search/`: `fixture.rs` (the data and the checking helpers),
//! `params.rs` (parameter types, prefixes, modifiers, OR/AND, escaping), `graph.rs` (chains,
//! `_has`, `_filter`, includes, system and compartment search), `results.rs` (`_sort`, paging,
//! `_summary`/`_elements`/`_total`, `POST _search`, errors).

#[path = "search/fixture.rs"]
mod fixture;
#[path = "search/graph.rs"]
mod graph;
#[path = "search/params.rs"]
mod params;
#[path = "search/results.rs"]
mod results;

use kiln_conformance_tests::{backend_tests, entries, link, send, Method, TestServer};
use serde_json::{json, Value};

fn patient(family: &str, gender: &str, birth: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "http://example.org/mrn", "value": mrn}],
        "name": [{"family": family, "given": ["Test"]}],
        "gender": gender,
        "birthDate": birth
    })
}

/// Creates 4 patients and 3 observations; returns the patient ids in creation order.
async fn seed(srv: &TestServer) -> Vec<String> {
    let mut ids = Vec::new();
    for (f, g, b, m) in [
        ("Smith", "female", "1970-01-01", "m1"),
        ("Smith", "male", "1980-06-15", "m2"),
        ("Jones", "female", "1990-12-31", "m3"),
        ("Müller", "other", "2000-02-29", "m4"),
    ] {
        ids.push(srv.create(&patient(f, g, b, m)).await.0);
    }
    for (i, code) in ["29463-7", "8302-2", "29463-7"].iter().enumerate() {
        let subject = &ids[if i == 2 { 1 } else { 0 }];
        srv.create(&json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": format!("Patient/{subject}")},
            "valueQuantity": {"value": 70 + i, "unit": "kg"}
        }))
        .await;
    }
    ids
}

fn ids_of(bundle: &Value, ty: &str) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["resource"]["resourceType"] == ty)
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect()
}

async fn search(srv: &TestServer, path: &str) -> Value {
    let r = srv.get(path).await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["resourceType"], "Bundle", "{b}");
    assert_eq!(b["type"], "searchset", "{b}");
    assert!(link(&b, "self").is_some(), "searchset has a self link: {b}");
    b
}

backend_tests!(
    search_by_string_and_token,
    search_by_date_prefixes,
    search_by_reference,
    search_paging,
    search_include_revinclude,
    search_summary_count_and_post,
    search_unknown_param_strict,
    search_compartment_and_system,
    search_excludes_deleted,
);

async fn search_by_string_and_token(srv: &TestServer) {
    let ids = seed(srv).await;
    let b = search(srv, "Patient?family=smith").await;
    let mut got = ids_of(&b, "Patient");
    got.sort();
    let mut want = vec![ids[0].clone(), ids[1].clone()];
    want.sort();
    assert_eq!(got, want, "family is case-insensitive, starts-with");
    assert_eq!(b["total"], 2);
    for e in entries(&b) {
        assert_eq!(e["search"]["mode"], "match");
        assert!(e["fullUrl"].as_str().unwrap_or("").contains("/Patient/"));
    }
    let b = search(srv, "Patient?family:exact=Smith&gender=male").await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[1].clone()]);
    let b = search(srv, "Patient?family=muller").await;
    assert_eq!(
        ids_of(&b, "Patient"),
        vec![ids[3].clone()],
        "accent-insensitive"
    );
    let b = search(srv, "Patient?identifier=http://example.org/mrn|m3").await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[2].clone()]);
    let b = search(srv, &format!("Patient?_id={}", ids[2])).await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[2].clone()]);
    let b = search(srv, "Patient?gender=female,other").await;
    assert_eq!(ids_of(&b, "Patient").len(), 3, "comma is OR");
    let b = search(srv, "Patient?family=Nobody").await;
    assert!(entries(&b).is_empty());
    assert_eq!(b["total"], 0);
}

async fn search_by_date_prefixes(srv: &TestServer) {
    let ids = seed(srv).await;
    let b = search(srv, "Patient?birthdate=ge1980-01-01&birthdate=lt2000-01-01").await;
    let mut got = ids_of(&b, "Patient");
    got.sort();
    let mut want = vec![ids[1].clone(), ids[2].clone()];
    want.sort();
    assert_eq!(got, want);
    let b = search(srv, "Patient?birthdate=1970").await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[0].clone()]);
    srv.get("Patient?birthdate=notadate")
        .await
        .assert_status(400);
}

async fn search_by_reference(srv: &TestServer) {
    let ids = seed(srv).await;
    let b = search(srv, &format!("Observation?subject=Patient/{}", ids[0])).await;
    assert_eq!(ids_of(&b, "Observation").len(), 2);
    let b = search(srv, &format!("Observation?patient={}", ids[1])).await;
    assert_eq!(ids_of(&b, "Observation").len(), 1);
    let b = search(srv, "Observation?code=http://loinc.org|29463-7").await;
    assert_eq!(ids_of(&b, "Observation").len(), 2);
    let b = search(srv, "Observation?subject:Patient.family=Smith&code=8302-2").await;
    assert_eq!(ids_of(&b, "Observation").len(), 1, "chained search");
}

async fn search_paging(srv: &TestServer) {
    for i in 0..7 {
        srv.create(&patient("Page", "female", "1970-01-01", &format!("p{i}")))
            .await;
    }
    let first = search(srv, "Patient?family=Page&_count=3").await;
    assert_eq!(entries(&first).len(), 3);
    assert!(link(&first, "next").is_some(), "{first}");
    let pages = srv.all_pages(&first, 10).await;
    assert_eq!(pages.len(), 3);
    let mut all: Vec<String> = pages.iter().flat_map(|p| ids_of(p, "Patient")).collect();
    assert_eq!(all.len(), 7);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 7, "no duplicates across pages");
    assert!(link(pages.last().expect("page"), "next").is_none());
}

async fn search_include_revinclude(srv: &TestServer) {
    let ids = seed(srv).await;
    let b = search(
        srv,
        &format!(
            "Observation?subject=Patient/{}&_include=Observation:subject",
            ids[0]
        ),
    )
    .await;
    assert_eq!(ids_of(&b, "Observation").len(), 2);
    assert_eq!(ids_of(&b, "Patient"), vec![ids[0].clone()], "included once");
    for e in entries(&b) {
        let mode = if e["resource"]["resourceType"] == "Patient" {
            "include"
        } else {
            "match"
        };
        assert_eq!(e["search"]["mode"], mode);
    }
    let b = search(
        srv,
        &format!("Patient?_id={}&_revinclude=Observation:subject", ids[0]),
    )
    .await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[0].clone()]);
    assert_eq!(ids_of(&b, "Observation").len(), 2);
}

async fn search_summary_count_and_post(srv: &TestServer) {
    seed(srv).await;
    let b = search(srv, "Patient?_summary=count").await;
    assert_eq!(b["total"], 4);
    assert!(entries(&b).is_empty());
    let r = send(
        srv.request(Method::POST, "Patient/_search")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("family=Smith&gender=female"),
    )
    .await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["type"], "searchset");
    assert_eq!(ids_of(&b, "Patient").len(), 1);
}

async fn search_unknown_param_strict(srv: &TestServer) {
    seed(srv).await;
    let r = srv
        .get_with("Patient?nonsense=1", &[("prefer", "handling=strict")])
        .await;
    r.assert_status(400);
    r.assert_outcome();
    // lenient (the default): ignored, and left out of the self link
    let b = search(srv, "Patient?nonsense=1&family=Jones").await;
    assert_eq!(ids_of(&b, "Patient").len(), 1);
    let own = link(&b, "self").unwrap_or_default();
    assert!(
        !own.contains("nonsense"),
        "self link shows what was used: {own}"
    );
    srv.get("NotAType?x=1").await.assert_status(404);
}

async fn search_compartment_and_system(srv: &TestServer) {
    let ids = seed(srv).await;
    let b = search(srv, &format!("Patient/{}/Observation", ids[0])).await;
    assert_eq!(ids_of(&b, "Observation").len(), 2);
    let b = search(srv, &format!("?_id={}", ids[1])).await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[1].clone()]);
    let b = search(srv, "?_type=Observation").await;
    assert_eq!(ids_of(&b, "Observation").len(), 3);
}

async fn search_excludes_deleted(srv: &TestServer) {
    let ids = seed(srv).await;
    srv.delete(&format!("Patient/{}", ids[0])).await;
    let b = search(srv, "Patient?family=Smith").await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[1].clone()]);
    // updates are reflected
    let mut p = patient("Renamed", "male", "1980-06-15", "m2");
    p["id"] = json!(ids[1]);
    srv.put_json(&format!("Patient/{}", ids[1]), &p)
        .await
        .assert_status(200);
    let b = search(srv, "Patient?family=Smith").await;
    assert!(ids_of(&b, "Patient").is_empty());
    let b = search(srv, "Patient?family=Renamed").await;
    assert_eq!(ids_of(&b, "Patient"), vec![ids[1].clone()]);
}
