//! http.html: the instance and type interactions (create, read, vread, update, patch, delete,
//! history) with their headers and status codes, against SQLite and PostgreSQL.

use kiln_conformance_tests::{backend_tests, entries, link, Method, TestServer};
use serde_json::{json, Value};

fn patient(family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "active": true,
        "name": [{"family": family, "given": ["Ann"]}],
        "gender": "female",
        "birthDate": "1970-01-02"
    })
}

backend_tests!(
    create_returns_201_location_etag_last_modified,
    create_ignores_body_id,
    read_returns_resource_with_etag,
    read_unknown_id_is_404,
    read_unknown_type_is_404,
    vread_returns_each_version,
    update_bumps_version,
    update_if_match,
    update_id_mismatch_is_400,
    update_without_id_is_400,
    update_as_create_is_201,
    update_body_type_mismatch_is_400,
    json_patch,
    fhirpath_patch,
    patch_failures,
    delete_is_versioned_and_gone,
    history_instance,
    history_type_and_system,
    history_since,
    history_paging_with_count,
);

async fn create_returns_201_location_etag_last_modified(srv: &TestServer) {
    let r = srv.post_json("Patient", &patient("Create")).await;
    r.assert_status(201);
    let body = r.json();
    let id = body["id"].as_str().expect("id assigned").to_string();
    assert!(!id.is_empty());
    assert_eq!(body["meta"]["versionId"], "1", "{body}");
    assert!(body["meta"]["lastUpdated"].is_string(), "{body}");
    assert_eq!(body["name"][0]["family"], "Create");
    // Location: [base]/Patient/[id]/_history/1
    let loc = r.header("location").expect("Location header");
    assert_eq!(loc, srv.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(r.header("etag").as_deref(), Some("W/\"1\""));
    let lm = r.header("last-modified").expect("Last-Modified header");
    assert!(lm.ends_with(" GMT"), "Last-Modified is an HTTP date: {lm}");
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("application/fhir+json"));
}

async fn create_ignores_body_id(srv: &TestServer) {
    let mut p = patient("BodyId");
    p["id"] = json!("client-chosen");
    // the server owns meta.versionId/lastUpdated; other meta (tags) is kept
    p["meta"] = json!({"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z",
        "tag": [{"system": "http://example.org/tags", "code": "keep-me"}]});
    let (id, created) = srv.create(&p).await;
    let body = created.json();
    assert_eq!(body["meta"]["versionId"], "1", "{body}");
    assert_ne!(body["meta"]["lastUpdated"], "2001-01-01T00:00:00Z");
    assert_eq!(body["meta"]["tag"][0]["code"], "keep-me");
    assert_ne!(id, "client-chosen", "server must assign the id on create");
    srv.get(&format!("Patient/{id}")).await.assert_status(200);
    srv.get("Patient/client-chosen").await.assert_status(404);
}

async fn read_returns_resource_with_etag(srv: &TestServer) {
    let (id, created) = srv.create(&patient("Read")).await;
    let r = srv.get(&format!("Patient/{id}")).await;
    r.assert_status(200);
    assert_eq!(r.header("etag").as_deref(), Some("W/\"1\""));
    assert_eq!(r.header("last-modified"), created.header("last-modified"));
    let body = r.json();
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["meta"]["versionId"], "1");
    assert_eq!(body, created.json(), "read returns what create returned");
    // HEAD: same headers, no body
    let h = kiln_conformance_tests::send(srv.request(Method::HEAD, &format!("Patient/{id}"))).await;
    h.assert_status(200);
    assert_eq!(h.header("etag").as_deref(), Some("W/\"1\""));
    assert!(h.body.is_empty());
}

async fn read_unknown_id_is_404(srv: &TestServer) {
    let r = srv.get("Patient/does-not-exist").await;
    r.assert_status(404);
    r.assert_outcome();
}

async fn read_unknown_type_is_404(srv: &TestServer) {
    let r = srv.get("NotAResource/1").await;
    r.assert_status(404);
    r.assert_outcome();
    let r = srv
        .post_json("NotAResource", &json!({"resourceType": "NotAResource"}))
        .await;
    r.assert_status(404);
}

async fn vread_returns_each_version(srv: &TestServer) {
    let (id, _) = srv.create(&patient("V1")).await;
    let mut p = patient("V2");
    p["id"] = json!(id);
    srv.put_json(&format!("Patient/{id}"), &p)
        .await
        .assert_status(200);
    let v1 = srv.get(&format!("Patient/{id}/_history/1")).await;
    v1.assert_status(200);
    assert_eq!(v1.header("etag").as_deref(), Some("W/\"1\""));
    assert_eq!(v1.json()["name"][0]["family"], "V1");
    assert_eq!(v1.json()["meta"]["versionId"], "1");
    let v2 = srv.get(&format!("Patient/{id}/_history/2")).await;
    v2.assert_status(200);
    assert_eq!(v2.json()["name"][0]["family"], "V2");
    assert_eq!(v2.header("etag").as_deref(), Some("W/\"2\""));
    srv.get(&format!("Patient/{id}/_history/3"))
        .await
        .assert_status(404);
    srv.get(&format!("Patient/{id}/_history/x"))
        .await
        .assert_status(404);
    srv.get("Patient/nope/_history/1").await.assert_status(404);
}

async fn update_bumps_version(srv: &TestServer) {
    let (id, _) = srv.create(&patient("U1")).await;
    let mut p = patient("U2");
    p["id"] = json!(id);
    let r = srv.put_json(&format!("Patient/{id}"), &p).await;
    r.assert_status(200);
    assert_eq!(r.header("etag").as_deref(), Some("W/\"2\""));
    assert!(r.header("last-modified").is_some());
    let body = r.json();
    assert_eq!(body["meta"]["versionId"], "2");
    assert_eq!(body["name"][0]["family"], "U2");
    let r = srv.get(&format!("Patient/{id}")).await;
    assert_eq!(r.json()["name"][0]["family"], "U2");
    assert_eq!(r.etag_version(), Some(2));
    // a third update
    p["gender"] = json!("male");
    let r = srv.put_json(&format!("Patient/{id}"), &p).await;
    r.assert_status(200);
    assert_eq!(r.etag_version(), Some(3));
}

async fn update_if_match(srv: &TestServer) {
    let (id, _) = srv.create(&patient("IfMatch")).await;
    let mut p = patient("IfMatch2");
    p["id"] = json!(id);
    let path = format!("Patient/{id}");
    let ok = srv
        .send_json(Method::PUT, &path, &p, &[("if-match", "W/\"1\"")])
        .await;
    ok.assert_status(200);
    assert_eq!(ok.etag_version(), Some(2));
    // stale version → 412 and nothing written
    p["gender"] = json!("male");
    let stale = srv
        .send_json(Method::PUT, &path, &p, &[("if-match", "W/\"1\"")])
        .await;
    stale.assert_status(412);
    stale.assert_outcome();
    let cur = srv.get(&path).await;
    assert_eq!(cur.etag_version(), Some(2));
    assert_eq!(cur.json()["gender"], "female");
}

async fn update_id_mismatch_is_400(srv: &TestServer) {
    let (id, _) = srv.create(&patient("Mismatch")).await;
    let mut p = patient("Mismatch");
    p["id"] = json!("some-other-id");
    let r = srv.put_json(&format!("Patient/{id}"), &p).await;
    r.assert_status(400);
    r.assert_outcome();
    assert_eq!(
        srv.get(&format!("Patient/{id}")).await.etag_version(),
        Some(1)
    );
}

async fn update_without_id_is_400(srv: &TestServer) {
    let (id, _) = srv.create(&patient("NoId")).await;
    let r = srv
        .put_json(&format!("Patient/{id}"), &patient("NoId2"))
        .await;
    r.assert_status(400);
    r.assert_outcome();
}

async fn update_as_create_is_201(srv: &TestServer) {
    let mut p = patient("UpdCreate");
    p["id"] = json!("client-id-1");
    let r = srv.put_json("Patient/client-id-1", &p).await;
    r.assert_status(201);
    assert_eq!(r.etag_version(), Some(1));
    assert_eq!(
        r.header("location").as_deref(),
        Some(srv.url("Patient/client-id-1/_history/1").as_str())
    );
    let r = srv.get("Patient/client-id-1").await;
    r.assert_status(200);
    assert_eq!(r.json()["name"][0]["family"], "UpdCreate");
    // an invalid id in the URL is rejected
    let mut bad = patient("Bad");
    bad["id"] = json!("a_b");
    srv.put_json("Patient/a_b", &bad).await.assert_status(400);
}

async fn update_body_type_mismatch_is_400(srv: &TestServer) {
    let body = json!({"resourceType": "Observation", "id": "x1", "status": "final",
        "code": {"text": "x"}});
    let r = srv.put_json("Patient/x1", &body).await;
    r.assert_status(400);
    r.assert_outcome();
}

async fn json_patch(srv: &TestServer) {
    let (id, _) = srv.create(&patient("Patch")).await;
    let path = format!("Patient/{id}");
    let ops = json!([
        {"op": "replace", "path": "/name/0/family", "value": "Patched"},
        {"op": "add", "path": "/gender", "value": "other"},
        {"op": "remove", "path": "/active"}
    ]);
    let r = srv.patch(&path, "application/json-patch+json", &ops).await;
    r.assert_status(200);
    assert_eq!(r.etag_version(), Some(2));
    let cur = srv.get(&path).await.json();
    assert_eq!(cur["name"][0]["family"], "Patched");
    assert_eq!(cur["gender"], "other");
    assert!(cur.get("active").is_none());
    assert_eq!(cur["meta"]["versionId"], "2");
    // If-Match on PATCH
    let r = kiln_conformance_tests::send(
        srv.request(Method::PATCH, &path)
            .header("content-type", "application/json-patch+json")
            .header("if-match", "W/\"1\"")
            .body(json!([{"op": "replace", "path": "/gender", "value": "male"}]).to_string()),
    )
    .await;
    r.assert_status(412);
    // history records the PATCH
    let h = srv.get(&format!("{path}/_history")).await.json();
    assert_eq!(h["entry"][0]["request"]["method"], "PATCH", "{h}");
}

async fn fhirpath_patch(srv: &TestServer) {
    let (id, _) = srv.create(&patient("FpPatch")).await;
    let path = format!("Patient/{id}");
    let params = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Patient.birthDate"},
                {"name": "value", "valueDate": "1980-05-06"}
            ]},
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "add"},
                {"name": "path", "valueString": "Patient"},
                {"name": "name", "valueString": "deceasedBoolean"},
                {"name": "value", "valueBoolean": false}
            ]}
        ]
    });
    let r = srv.patch(&path, "application/fhir+json", &params).await;
    r.assert_status(200);
    assert_eq!(r.etag_version(), Some(2));
    let cur = srv.get(&path).await.json();
    assert_eq!(cur["birthDate"], "1980-05-06");
    assert_eq!(cur["deceasedBoolean"], false);
}

async fn patch_failures(srv: &TestServer) {
    let (id, _) = srv.create(&patient("PatchFail")).await;
    let path = format!("Patient/{id}");
    // a failing `test` op: the patch cannot be applied → 422, nothing written
    let r = srv
        .patch(
            &path,
            "application/json-patch+json",
            &json!([{"op": "test", "path": "/gender", "value": "male"},
                     {"op": "replace", "path": "/gender", "value": "unknown"}]),
        )
        .await;
    r.assert_status(422);
    r.assert_outcome();
    // a patch producing an invalid resource is rejected
    let r = srv
        .patch(
            &path,
            "application/json-patch+json",
            &json!([{"op": "replace", "path": "/birthDate", "value": "not a date"}]),
        )
        .await;
    assert!(
        r.status == 400 || r.status == 422,
        "invalid result: {}",
        r.status
    );
    assert_eq!(srv.get(&path).await.etag_version(), Some(1));
    // unknown resource
    srv.patch(
        "Patient/nope",
        "application/json-patch+json",
        &json!([{"op": "remove", "path": "/active"}]),
    )
    .await
    .assert_status(404);
}

async fn delete_is_versioned_and_gone(srv: &TestServer) {
    let (id, _) = srv.create(&patient("Delete")).await;
    let path = format!("Patient/{id}");
    let r = srv.delete(&path).await;
    assert!(
        r.status == 200 || r.status == 204,
        "delete: {} {}",
        r.status,
        r.text()
    );
    let g = srv.get(&path).await;
    g.assert_status(410);
    g.assert_outcome();
    // the version before the delete is still readable
    srv.get(&format!("{path}/_history/1"))
        .await
        .assert_status(200);
    // vread of the deletion itself: 410 (http.html#vread)
    srv.get(&format!("{path}/_history/2"))
        .await
        .assert_status(410);
    // deleting again is not an error and adds no version
    let again = srv.delete(&path).await;
    assert!(again.status == 200 || again.status == 204);
    let h = srv.get(&format!("{path}/_history")).await;
    h.assert_status(200);
    let h = h.json();
    let es = entries(&h);
    assert_eq!(es.len(), 2, "history: create + delete: {h}");
    assert_eq!(es[0]["request"]["method"], "DELETE");
    assert!(es[0].get("resource").is_none());
    assert_eq!(es[1]["request"]["method"], "POST");
    // deleting something that never existed
    let r = srv.delete("Patient/never-existed").await;
    assert!(r.status == 200 || r.status == 204, "{}", r.status);
    // update after delete brings it back (new version)
    let mut p = patient("Revived");
    p["id"] = json!(id);
    let r = srv.put_json(&path, &p).await;
    assert!(r.status == 200 || r.status == 201, "{}", r.status);
    assert_eq!(r.etag_version(), Some(3));
    srv.get(&path).await.assert_status(200);
}

async fn history_instance(srv: &TestServer) {
    let (id, _) = srv.create(&patient("H1")).await;
    let path = format!("Patient/{id}");
    for fam in ["H2", "H3"] {
        let mut p = patient(fam);
        p["id"] = json!(id);
        srv.put_json(&path, &p).await.assert_status(200);
    }
    let r = srv.get(&format!("{path}/_history")).await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "history");
    assert_eq!(b["total"], 3);
    let es = entries(&b);
    let versions: Vec<&str> = es
        .iter()
        .map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(versions, ["3", "2", "1"], "newest first");
    assert_eq!(es[0]["resource"]["name"][0]["family"], "H3");
    assert_eq!(es[2]["request"]["method"], "POST");
    assert_eq!(es[0]["request"]["method"], "PUT");
    for e in &es {
        assert!(e["fullUrl"].as_str().unwrap_or("").ends_with(&path));
        assert!(e["response"]["status"].is_string());
    }
    srv.get("Patient/none/_history").await.assert_status(404);
}

async fn history_type_and_system(srv: &TestServer) {
    let (a, _) = srv.create(&patient("TA")).await;
    let (b, _) = srv.create(&patient("TB")).await;
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "weight"}, "subject": {"reference": format!("Patient/{a}")}});
    let (o, _) = srv.create(&obs).await;
    srv.delete(&format!("Patient/{b}")).await;
    let t = srv.get("Patient/_history").await;
    t.assert_status(200);
    let t = t.json();
    assert_eq!(t["type"], "history");
    assert_eq!(t["total"], 3, "2 creates + 1 delete: {t}");
    assert!(entries(&t)
        .iter()
        .all(|e| e["fullUrl"].as_str().unwrap_or("").contains("/Patient/")));
    let s = srv.get("_history").await;
    s.assert_status(200);
    let s = s.json();
    assert_eq!(s["total"], 4, "{s}");
    let urls: Vec<String> = entries(&s)
        .iter()
        .map(|e| e["fullUrl"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(urls
        .iter()
        .any(|u| u.ends_with(&format!("Observation/{o}"))));
    // newest first: the delete of b is the latest event
    assert!(urls[0].ends_with(&format!("Patient/{b}")), "{urls:?}");
    srv.get("NotAType/_history").await.assert_status(404);
}

async fn history_since(srv: &TestServer) {
    let (id, _) = srv.create(&patient("S1")).await;
    let path = format!("Patient/{id}");
    let before = srv.get(&path).await.json()["meta"]["lastUpdated"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut p = patient("S2");
    p["id"] = json!(id);
    let r = srv.put_json(&path, &p).await;
    r.assert_status(200);
    let second = r.json()["meta"]["lastUpdated"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(second > before || second.len() != before.len());
    let enc = |s: &str| s.replace('+', "%2B").replace(':', "%3A");
    // _since is inclusive: versions updated at or after the instant
    let h = srv
        .get(&format!("{path}/_history?_since={}", enc(&second)))
        .await;
    h.assert_status(200);
    let es = entries(&h.json());
    assert_eq!(es.len(), 1, "{}", h.text());
    assert_eq!(es[0]["resource"]["meta"]["versionId"], "2");
    let all = srv
        .get(&format!("{path}/_history?_since=2000-01-01T00:00:00Z"))
        .await;
    assert_eq!(entries(&all.json()).len(), 2);
    let none = srv.get("_history?_since=2999-01-01T00:00:00Z").await;
    none.assert_status(200);
    assert!(entries(&none.json()).is_empty());
    srv.get(&format!("{path}/_history?_since=yesterday"))
        .await
        .assert_status(400);
}

async fn history_paging_with_count(srv: &TestServer) {
    let (id, _) = srv.create(&patient("P0")).await;
    let path = format!("Patient/{id}");
    for i in 1..7 {
        let mut p = patient(&format!("P{i}"));
        p["id"] = json!(id);
        srv.put_json(&path, &p).await.assert_status(200);
    }
    let first = srv.get(&format!("{path}/_history?_count=3")).await;
    first.assert_status(200);
    let first = first.json();
    assert_eq!(entries(&first).len(), 3);
    assert_eq!(first["total"], 7);
    assert!(link(&first, "self").is_some());
    assert!(link(&first, "next").is_some(), "{first}");
    let pages = srv.all_pages(&first, 10).await;
    assert_eq!(pages.len(), 3);
    let versions: Vec<i64> = pages
        .iter()
        .flat_map(entries)
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(versions, [7, 6, 5, 4, 3, 2, 1], "complete, no duplicates");
    // a type-level history pages the same way
    for i in 0..4 {
        srv.create(&patient(&format!("T{i}"))).await;
    }
    let t = srv.get("Patient/_history?_count=2").await.json();
    let all: Vec<Value> = srv
        .all_pages(&t, 20)
        .await
        .iter()
        .flat_map(entries)
        .collect();
    assert_eq!(all.len(), 11);
    srv.get("Patient/_history?_count=abc")
        .await
        .assert_status(400);
}
