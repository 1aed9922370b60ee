//! http.html conditional interactions: conditional create (`If-None-Exist`), update, delete and
//! patch, and conditional references / `ifNoneExist` in transactions.

use kiln_conformance_tests::{backend_tests, entries, Method, TestServer};
use serde_json::{json, Value};

const SYS: &str = "http://example.org/mrn";

fn patient(mrn: &str, family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": SYS, "value": mrn}],
        "name": [{"family": family}]
    })
}

fn cond(mrn: &str) -> String {
    format!("identifier={SYS}|{mrn}")
}

async fn type_total(srv: &TestServer, ty: &str) -> i64 {
    srv.get(&format!("{ty}/_history")).await.json()["total"]
        .as_i64()
        .unwrap_or(-1)
}

backend_tests!(
    conditional_create,
    conditional_update,
    conditional_delete,
    conditional_patch,
    transaction_if_none_exist_and_conditional_references,
);

async fn conditional_create(srv: &TestServer) {
    let h = [("if-none-exist", cond("c1"))];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = srv
        .send_json(Method::POST, "Patient", &patient("c1", "First"), &h)
        .await;
    r.assert_status(201);
    let id = r.json()["id"].as_str().unwrap_or_default().to_string();
    // one match: 200 with the existing resource, nothing created
    let r = srv
        .send_json(Method::POST, "Patient", &patient("c1", "Second"), &h)
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.json()["name"][0]["family"], "First");
    assert_eq!(type_total(srv, "Patient").await, 1);
    // several matches: 412
    srv.create(&patient("c1", "Duplicate")).await;
    let r = srv
        .send_json(Method::POST, "Patient", &patient("c1", "Third"), &h)
        .await;
    r.assert_status(412);
    assert_eq!(type_total(srv, "Patient").await, 2);
}

async fn conditional_update(srv: &TestServer) {
    let path = format!("Patient?{}", cond("u1"));
    // no match, no id: created
    let r = srv.put_json(&path, &patient("u1", "Created")).await;
    r.assert_status(201);
    let id = r.json()["id"].as_str().unwrap_or_default().to_string();
    // one match: that resource is updated
    let r = srv.put_json(&path, &patient("u1", "Updated")).await;
    r.assert_status(200);
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.etag_version(), Some(2));
    assert_eq!(
        srv.get(&format!("Patient/{id}")).await.json()["name"][0]["family"],
        "Updated"
    );
    // one match but a different id in the body: 400
    let mut other = patient("u1", "X");
    other["id"] = json!("another-id");
    srv.put_json(&path, &other).await.assert_status(400);
    // several matches: 412
    srv.create(&patient("u1", "Twin")).await;
    srv.put_json(&path, &patient("u1", "Y"))
        .await
        .assert_status(412);
}

async fn conditional_delete(srv: &TestServer) {
    let (a, _) = srv.create(&patient("d1", "A")).await;
    let (b, _) = srv.create(&patient("d2", "B")).await;
    let r = srv.delete(&format!("Patient?{}", cond("d1"))).await;
    assert!(matches!(r.status, 200 | 204), "{} {}", r.status, r.text());
    srv.get(&format!("Patient/{a}")).await.assert_status(410);
    srv.get(&format!("Patient/{b}")).await.assert_status(200);
    // no match: success, nothing deleted
    let r = srv.delete(&format!("Patient?{}", cond("none"))).await;
    assert!(matches!(r.status, 200 | 204));
    srv.get(&format!("Patient/{b}")).await.assert_status(200);
}

async fn conditional_patch(srv: &TestServer) {
    let (a, _) = srv.create(&patient("p1", "Before")).await;
    let r = srv
        .patch(
            &format!("Patient?{}", cond("p1")),
            "application/json-patch+json",
            &json!([{"op": "replace", "path": "/name/0/family", "value": "After"}]),
        )
        .await;
    r.assert_status(200);
    assert_eq!(
        srv.get(&format!("Patient/{a}")).await.json()["name"][0]["family"],
        "After"
    );
    let r = srv
        .patch(
            &format!("Patient?{}", cond("nobody")),
            "application/json-patch+json",
            &json!([{"op": "remove", "path": "/active"}]),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

async fn transaction_if_none_exist_and_conditional_references(srv: &TestServer) {
    let (existing, _) = srv.create(&patient("t1", "Existing")).await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:dddddddd-0000-0000-0000-000000000004",
             "resource": patient("t1", "Again"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": cond("t1")}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "a"},
                "subject": {"reference": "urn:uuid:dddddddd-0000-0000-0000-000000000004"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "b"},
                "subject": {"reference": format!("Patient?{}", cond("t1"))}},
             "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let b = r.json();
    let es = entries(&b);
    assert!(
        es[0]["response"]["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("200"),
        "{b}"
    );
    assert_eq!(type_total(srv, "Patient").await, 1);
    for e in &es[1..] {
        let loc = e["response"]["location"].as_str().unwrap_or_default();
        let i = loc.find("Observation/").unwrap_or(0);
        let rel: String = loc[i..].split("/_history").next().unwrap_or("").to_string();
        let o = srv.get(&rel).await.json();
        assert_eq!(o["subject"]["reference"], format!("Patient/{existing}"));
    }
}
