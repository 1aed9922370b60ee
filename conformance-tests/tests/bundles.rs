//! http.html#transaction: batch (independent entries) and transaction (atomic, `urn:uuid:`
//! reference rewriting, processing order, response order).

use kiln_conformance_tests::{backend_tests, entries, TestServer};
use serde_json::{json, Value};

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
}

fn observation(subject: &str) -> Value {
    let mut o = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}], "text": "Body weight"},
        "subject": {"reference": subject},
        "performer": [{"reference": subject}],
        "valueQuantity": {"unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}
    });
    // parsed from text so the decimal keeps its written precision (json! would make it 72.5)
    o["valueQuantity"]["value"] = serde_json::from_str("72.50").expect("decimal");
    o
}

fn entry_status(e: &Value) -> u16 {
    e["response"]["status"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `…/Type/id/_history/n` → `Type/id`.
fn type_id(location: &str) -> String {
    let parts: Vec<&str> = location.split('/').collect();
    let h = parts
        .iter()
        .position(|p| *p == "_history")
        .unwrap_or(parts.len());
    parts[h.saturating_sub(2)..h].join("/")
}

async fn type_total(srv: &TestServer, ty: &str) -> i64 {
    let r = srv.get(&format!("{ty}/_history")).await;
    r.assert_status(200);
    r.json()["total"].as_i64().unwrap_or(-1)
}

backend_tests!(
    batch_entries_are_independent,
    transaction_rewrites_urn_uuid_references,
    transaction_is_atomic,
    transaction_if_match_failure_rolls_back,
    transaction_processing_order,
    transaction_put_with_urn_full_url,
    transaction_duplicate_full_url_is_400,
    transaction_overlapping_identities_fail,
    bundle_type_must_be_batch_or_transaction,
);

async fn batch_entries_are_independent(srv: &TestServer) {
    let (existing, _) = srv.create(&patient("Existing")).await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("BatchA"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
            {"resource": {"resourceType": "Patient", "birthDate": "garbage"},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": format!("Patient/{existing}")}},
            {"request": {"method": "DELETE", "url": format!("Patient/{existing}")}},
            {"resource": observation(&format!("Patient/{existing}")),
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": patient("NoMethod"), "request": {"url": "Patient"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["type"], "batch-response");
    let es = entries(&b);
    assert_eq!(es.len(), 7, "one response per entry, in order: {b}");
    let statuses: Vec<u16> = es.iter().map(entry_status).collect();
    assert_eq!(statuses[0], 201, "{b}");
    assert_eq!(statuses[1], 404);
    assert_eq!(statuses[2], 400);
    assert_eq!(statuses[3], 200);
    assert!(statuses[4] == 200 || statuses[4] == 204);
    assert_eq!(statuses[5], 201);
    assert_eq!(statuses[6], 400, "an entry without request.method: {b}");
    assert_eq!(
        es[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(es[3]["resource"]["id"], existing.as_str());
    // successful entries took effect despite the failing ones
    let loc = es[0]["response"]["location"].as_str().expect("location");
    srv.get(&type_id(loc)).await.assert_status(200);
    assert_eq!(es[0]["response"]["etag"], "W/\"1\"");
    let loc = es[5]["response"]["location"].as_str().expect("location");
    srv.get(&type_id(loc)).await.assert_status(200);
    srv.get(&format!("Patient/{existing}"))
        .await
        .assert_status(410);
}

async fn transaction_rewrites_urn_uuid_references(srv: &TestServer) {
    let pat_url = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a";
    let mut obs = observation(pat_url);
    obs["text"] = json!({"status": "generated",
        "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">Weight of <a href=\"{pat_url}\">the patient</a></div>")});
    obs["extension"] =
        json!([{"url": "http://example.org/ext", "valueReference": {"reference": pat_url}}]);
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059", "resource": obs,
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": pat_url, "resource": patient("Txn"),
             "request": {"method": "POST", "url": "Patient"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["type"], "transaction-response");
    let es = entries(&b);
    assert_eq!(es.len(), 2);
    for e in &es {
        assert_eq!(entry_status(e), 201, "{b}");
        assert_eq!(e["response"]["etag"], "W/\"1\"");
        assert!(e["response"]["lastModified"].is_string(), "{e}");
    }
    // response order = request order: entry 0 is the Observation
    let obs_ref = type_id(es[0]["response"]["location"].as_str().expect("location"));
    let pat_ref = type_id(es[1]["response"]["location"].as_str().expect("location"));
    assert!(obs_ref.starts_with("Observation/"), "{obs_ref}");
    assert!(pat_ref.starts_with("Patient/"), "{pat_ref}");
    let stored = srv.get(&obs_ref).await;
    stored.assert_status(200);
    let stored = stored.json();
    assert_eq!(stored["subject"]["reference"], pat_ref.as_str());
    assert_eq!(stored["performer"][0]["reference"], pat_ref.as_str());
    assert_eq!(
        stored["extension"][0]["valueReference"]["reference"],
        pat_ref.as_str()
    );
    let div = stored["text"]["div"].as_str().unwrap_or_default();
    assert!(!div.contains("urn:uuid"), "narrative rewritten: {div}");
    assert!(div.contains(&pat_ref), "{div}");
    // the decimal keeps its precision
    assert_eq!(stored["valueQuantity"]["value"].to_string(), "72.50");
    srv.get(&pat_ref).await.assert_status(200);
}

async fn transaction_is_atomic(srv: &TestServer) {
    let (existing, _) = srv.create(&patient("Keep")).await;
    let mut bad = observation("urn:uuid:aaaaaaaa-0000-0000-0000-000000000001");
    bad["notAnElement"] = json!(true);
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000001", "resource": patient("Rolled"),
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": format!("Patient/{existing}")}},
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    assert!(
        (400..500).contains(&r.status),
        "a failing entry fails the transaction: {} {}",
        r.status,
        r.text()
    );
    r.assert_outcome();
    // nothing happened: no new Patient, no Observation, the delete was rolled back
    assert_eq!(type_total(srv, "Patient").await, 1);
    assert_eq!(type_total(srv, "Observation").await, 0);
    let cur = srv.get(&format!("Patient/{existing}")).await;
    cur.assert_status(200);
    assert_eq!(cur.etag_version(), Some(1));
}

async fn transaction_if_match_failure_rolls_back(srv: &TestServer) {
    let (id, _) = srv.create(&patient("Versioned")).await;
    let mut upd = patient("Versioned2");
    upd["id"] = json!(id);
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("New"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": upd, "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"9\""}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(412);
    assert_eq!(type_total(srv, "Patient").await, 1);
    // the same with the right version commits both
    let mut bundle = bundle;
    bundle["entry"][1]["request"]["ifMatch"] = json!("W/\"1\"");
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let es = entries(&r.json());
    assert_eq!(entry_status(&es[0]), 201);
    assert_eq!(entry_status(&es[1]), 200);
    assert_eq!(es[1]["response"]["etag"], "W/\"2\"");
    assert_eq!(type_total(srv, "Patient").await, 3);
}

async fn transaction_processing_order(srv: &TestServer) {
    // DELETE, then POST, then PUT/PATCH, then GET — whatever the order in the Bundle
    let (gone, _) = srv.create(&patient("ToDelete")).await;
    let mut put = patient("PutMe");
    put["id"] = json!("order-put");
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/order-put"}},
            {"resource": put, "request": {"method": "PUT", "url": "Patient/order-put"}},
            {"request": {"method": "GET", "url": format!("Patient/{gone}")}},
            {"resource": patient("Posted"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": format!("Patient/{gone}")}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let b = r.json();
    let es = entries(&b);
    assert_eq!(es.len(), 5);
    // the GET ran after the PUT
    assert_eq!(entry_status(&es[0]), 200, "{b}");
    assert_eq!(es[0]["resource"]["name"][0]["family"], "PutMe");
    assert_eq!(entry_status(&es[1]), 201);
    // the GET of the deleted resource ran after the DELETE
    assert_eq!(entry_status(&es[2]), 410, "{b}");
    assert_eq!(entry_status(&es[3]), 201);
    assert!(matches!(entry_status(&es[4]), 200 | 204));
}

async fn transaction_put_with_urn_full_url(srv: &TestServer) {
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:bbbbbbbb-0000-0000-0000-000000000002",
             "resource": {"resourceType": "Patient", "id": "put-urn", "gender": "male"},
             "request": {"method": "PUT", "url": "Patient/put-urn"}},
            {"resource": observation("urn:uuid:bbbbbbbb-0000-0000-0000-000000000002"),
             "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let es = entries(&r.json());
    let obs = type_id(es[1]["response"]["location"].as_str().expect("location"));
    let stored = srv.get(&obs).await.json();
    assert_eq!(stored["subject"]["reference"], "Patient/put-urn");
}

async fn transaction_duplicate_full_url_is_400(srv: &TestServer) {
    let u = "urn:uuid:cccccccc-0000-0000-0000-000000000003";
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": u, "resource": patient("A"), "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": u, "resource": patient("B"), "request": {"method": "POST", "url": "Patient"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(400);
    r.assert_outcome();
    assert_eq!(type_total(srv, "Patient").await, 0);
}

/// http.html#trules: "If any resource identities (including resolved identities from conditional
/// update/delete) overlap in steps 1-3, then the transaction SHALL fail."
async fn transaction_overlapping_identities_fail(srv: &TestServer) {
    let mut a = patient("One");
    a["id"] = json!("overlap");
    let mut b = patient("Two");
    b["id"] = json!("overlap");
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": a, "request": {"method": "PUT", "url": "Patient/overlap"}},
            {"resource": b, "request": {"method": "PUT", "url": "Patient/overlap"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    assert!(
        (400..500).contains(&r.status),
        "two PUTs of Patient/overlap in one transaction must fail, got {}: {}",
        r.status,
        r.text()
    );
    srv.get("Patient/overlap").await.assert_status(404);
}

async fn bundle_type_must_be_batch_or_transaction(srv: &TestServer) {
    let r = srv
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "collection", "entry": []}),
        )
        .await;
    r.assert_status(400);
    r.assert_outcome();
    let r = srv.post_json("", &patient("NotABundle")).await;
    r.assert_status(400);
    // an empty transaction is fine
    let r = srv
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction"}),
        )
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["type"], "transaction-response");
}
