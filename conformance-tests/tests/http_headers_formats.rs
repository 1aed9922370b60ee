//! http.html: content negotiation (`_format`, `Accept`, `_pretty`), `Prefer`, conditional read
//! (`If-None-Match`, `If-Modified-Since`), `X-Request-Id`, gzip, error statuses (405, 413, 415,
//! 400 for malformed and invalid content) and the CapabilityStatement.

use std::io::Read;

use kiln_conformance_tests::{backend_tests, send, Backend, Method, Settings, TestServer};
use serde_json::{json, Value};

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "http://example.org/mrn", "value": "12345"}],
        "active": true,
        "name": [{"family": "Format", "given": ["Xavier", "M."]}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}],
        "gender": "male",
        "birthDate": "1961-03-04",
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
            "valueDateTime": "1961-03-04T10:11:12+01:00"}]},
        "address": [{"line": ["1 Main St", "Apt 2"], "city": "Springfield", "postalCode": "12345"}]
    })
}

backend_tests!(
    format_xml_via_param_and_accept,
    format_json_variants,
    unsupported_format_is_406,
    pretty_printing,
    prefer_return,
    if_none_match_gives_304,
    if_modified_since_gives_304,
    request_id_is_echoed,
    gzip_when_accepted,
    text_plain_is_415,
    xml_body_is_accepted,
    malformed_json_is_400_with_position,
    validation_error_points_at_element,
    unknown_element_is_400,
    wrong_method_is_405,
    empty_body_is_400,
    capability_statement,
);

fn xml_to_json(xml: &str) -> Value {
    kiln_fhir::xml::xml_to_json(xml)
        .unwrap_or_else(|e| panic!("server XML does not parse: {e}\n{xml}"))
}

async fn format_xml_via_param_and_accept(srv: &TestServer) {
    let (id, created) = srv.create(&patient()).await;
    let json_body = created.json();
    let path = format!("Patient/{id}");
    for r in [
        srv.get(&format!("{path}?_format=xml")).await,
        srv.get(&format!("{path}?_format=application/fhir%2Bxml"))
            .await,
        srv.get_with(&path, &[("accept", "application/fhir+xml")])
            .await,
        // _format wins over Accept
        srv.get_with(
            &format!("{path}?_format=xml"),
            &[("accept", "application/fhir+json")],
        )
        .await,
    ] {
        r.assert_status(200);
        let ct = r.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("application/fhir+xml"), "content-type {ct}");
        let text = r.text();
        assert!(text.contains("xmlns=\"http://hl7.org/fhir\""), "{text}");
        assert_eq!(xml_to_json(&text), json_body, "XML is the same resource");
    }
    // plain application/xml is answered as such
    let r = srv.get_with(&path, &[("accept", "application/xml")]).await;
    r.assert_status(200);
    assert!(r.header("content-type").unwrap_or_default().contains("xml"));
    // errors follow the negotiated format too
    let r = srv.get("Patient/missing?_format=xml").await;
    r.assert_status(404);
    let oo = xml_to_json(&r.text());
    assert_eq!(oo["resourceType"], "OperationOutcome");
    // a history Bundle renders as XML
    let r = srv.get(&format!("{path}/_history?_format=xml")).await;
    r.assert_status(200);
    assert_eq!(xml_to_json(&r.text())["type"], "history");
}

async fn format_json_variants(srv: &TestServer) {
    let (id, created) = srv.create(&patient()).await;
    let path = format!("Patient/{id}");
    for (q, accept) in [
        ("?_format=json", None),
        ("?_format=application/fhir%2Bjson", None),
        ("", Some("application/fhir+json")),
        ("", Some("application/json")),
        ("", Some("*/*")),
        ("", None),
    ] {
        let r = match accept {
            Some(a) => srv.get_with(&format!("{path}{q}"), &[("accept", a)]).await,
            None => srv.get(&format!("{path}{q}")).await,
        };
        r.assert_status(200);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .contains("json"));
        assert_eq!(r.json(), created.json());
    }
}

async fn unsupported_format_is_406(srv: &TestServer) {
    let (id, _) = srv.create(&patient()).await;
    let r = srv.get(&format!("Patient/{id}?_format=text/turtle")).await;
    r.assert_status(406);
}

async fn pretty_printing(srv: &TestServer) {
    let (id, created) = srv.create(&patient()).await;
    let path = format!("Patient/{id}");
    let pretty = srv.get(&format!("{path}?_pretty=true")).await;
    pretty.assert_status(200);
    assert!(
        pretty.text().contains("\n  \""),
        "indented: {}",
        pretty.text()
    );
    assert_eq!(pretty.json(), created.json());
    let compact = srv.get(&format!("{path}?_pretty=false")).await;
    assert!(!compact.text().contains('\n'));
    assert_eq!(compact.json(), created.json());
    let xml = srv.get(&format!("{path}?_format=xml&_pretty=true")).await;
    assert!(xml.text().contains("\n  <"), "{}", xml.text());
    assert_eq!(xml_to_json(&xml.text()), created.json());
}

async fn prefer_return(srv: &TestServer) {
    let minimal = srv
        .send_json(
            Method::POST,
            "Patient",
            &patient(),
            &[("prefer", "return=minimal")],
        )
        .await;
    minimal.assert_status(201);
    assert!(minimal.body.is_empty(), "minimal: {}", minimal.text());
    assert!(minimal.header("location").is_some());
    assert_eq!(minimal.etag_version(), Some(1));

    let rep = srv
        .send_json(
            Method::POST,
            "Patient",
            &patient(),
            &[("prefer", "return=representation")],
        )
        .await;
    rep.assert_status(201);
    assert_eq!(rep.json()["resourceType"], "Patient");

    let oo = srv
        .send_json(
            Method::POST,
            "Patient",
            &patient(),
            &[("prefer", "return=OperationOutcome")],
        )
        .await;
    oo.assert_status(201);
    assert_eq!(oo.json()["resourceType"], "OperationOutcome");

    // on update as well
    let id = rep.json()["id"].as_str().unwrap_or_default().to_string();
    let mut p = patient();
    p["id"] = json!(id);
    let r = srv
        .send_json(
            Method::PUT,
            &format!("Patient/{id}"),
            &p,
            &[("prefer", "return=minimal")],
        )
        .await;
    r.assert_status(200);
    assert!(r.body.is_empty());
    assert_eq!(r.etag_version(), Some(2));
}

async fn if_none_match_gives_304(srv: &TestServer) {
    let (id, _) = srv.create(&patient()).await;
    let path = format!("Patient/{id}");
    let r = srv.get_with(&path, &[("if-none-match", "W/\"1\"")]).await;
    r.assert_status(304);
    assert!(r.body.is_empty());
    assert_eq!(r.etag_version(), Some(1));
    let r = srv.get_with(&path, &[("if-none-match", "W/\"7\"")]).await;
    r.assert_status(200);
    assert_eq!(r.json()["id"], id.as_str());
}

async fn if_modified_since_gives_304(srv: &TestServer) {
    let (id, created) = srv.create(&patient()).await;
    let path = format!("Patient/{id}");
    let lm = created.header("last-modified").expect("Last-Modified");
    let r = srv.get_with(&path, &[("if-modified-since", &lm)]).await;
    r.assert_status(304);
    assert!(r.body.is_empty());
    let r = srv
        .get_with(
            &path,
            &[("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
        )
        .await;
    r.assert_status(200);
}

async fn request_id_is_echoed(srv: &TestServer) {
    let r = srv
        .get_with("metadata", &[("x-request-id", "conformance-req-42")])
        .await;
    r.assert_status(200);
    assert_eq!(
        r.header("x-request-id").as_deref(),
        Some("conformance-req-42")
    );
    // errors too
    let r = srv
        .get_with("Patient/missing", &[("x-request-id", "req-err-1")])
        .await;
    r.assert_status(404);
    assert_eq!(r.header("x-request-id").as_deref(), Some("req-err-1"));
    // the server assigns one when the client sends none
    let r = srv.get("metadata").await;
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

async fn gzip_when_accepted(srv: &TestServer) {
    let (id, created) = srv.create(&patient()).await;
    let r = srv
        .get_with(&format!("Patient/{id}"), &[("accept-encoding", "gzip")])
        .await;
    r.assert_status(200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_string(&mut text)
        .expect("valid gzip");
    let v: Value = serde_json::from_str(&text).expect("JSON inside gzip");
    assert_eq!(v, created.json());
    let big = srv
        .get_with("metadata", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(big.header("content-encoding").as_deref(), Some("gzip"));
    // not compressed unless asked
    let plain = srv.get(&format!("Patient/{id}")).await;
    assert!(plain.header("content-encoding").is_none());
}

async fn text_plain_is_415(srv: &TestServer) {
    let r = send(
        srv.request(Method::POST, "Patient")
            .header("content-type", "text/plain")
            .body(patient().to_string()),
    )
    .await;
    r.assert_status(415);
    r.assert_outcome();
}

async fn xml_body_is_accepted(srv: &TestServer) {
    let xml = kiln_fhir::xml::json_to_xml(&patient(), false).expect("to XML");
    let r = send(
        srv.request(Method::POST, "Patient")
            .header("content-type", "application/fhir+xml")
            .body(xml),
    )
    .await;
    r.assert_status(201);
    let got = kiln_conformance_tests::without_server_meta(&r.json());
    let mut want = patient();
    want["id"] = got["id"].clone();
    assert_eq!(got, want);
    // malformed XML is a 400
    let r = send(
        srv.request(Method::POST, "Patient")
            .header("content-type", "application/fhir+xml")
            .body("<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"true\"></Patient>"),
    )
    .await;
    r.assert_status(400);
}

async fn malformed_json_is_400_with_position(srv: &TestServer) {
    let r = send(
        srv.request(Method::POST, "Patient")
            .header("content-type", "application/fhir+json")
            .body("{\n  \"resourceType\": \"Patient\",\n  \"active\": true\n  \"gender\": \"male\"\n}"),
    )
    .await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    let text = serde_json::to_string(&issues).unwrap_or_default();
    assert!(text.contains("line 4"), "line reported: {text}");
    assert!(text.contains("column"), "column reported: {text}");
}

async fn validation_error_points_at_element(srv: &TestServer) {
    let mut p = patient();
    p["birthDate"] = json!("not-a-date");
    let r = srv.post_json("Patient", &p).await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    let hit = issues.iter().any(|i| {
        i["expression"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x == "Patient.birthDate"))
    });
    assert!(hit, "issue.expression names Patient.birthDate: {issues:?}");
    // wrong primitive type
    let mut p = patient();
    p["active"] = json!("yes");
    let r = srv.post_json("Patient", &p).await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    assert!(
        serde_json::to_string(&issues)
            .unwrap_or_default()
            .contains("Patient.active"),
        "{issues:?}"
    );
    // nothing was stored
    let h = srv.get("Patient/_history").await.json();
    assert_eq!(h["total"], 0, "{h}");
}

async fn unknown_element_is_400(srv: &TestServer) {
    let mut p = patient();
    p["favouriteColour"] = json!("blue");
    let r = srv.post_json("Patient", &p).await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    assert!(
        serde_json::to_string(&issues)
            .unwrap_or_default()
            .contains("favouriteColour"),
        "{issues:?}"
    );
}

async fn wrong_method_is_405(srv: &TestServer) {
    let (id, _) = srv.create(&patient()).await;
    // POST on an instance is not an interaction
    let r = srv.post_json(&format!("Patient/{id}"), &patient()).await;
    r.assert_status(405);
    r.assert_outcome();
    // PUT on a version
    let r = srv
        .put_json(&format!("Patient/{id}/_history/1"), &patient())
        .await;
    r.assert_status(405);
    // PUT on a type without criteria
    let r = srv.put_json("Patient", &patient()).await;
    r.assert_status(405);
}

async fn empty_body_is_400(srv: &TestServer) {
    let r = send(
        srv.request(Method::POST, "Patient")
            .header("content-type", "application/fhir+json"),
    )
    .await;
    r.assert_status(400);
    r.assert_outcome();
    // a body that is JSON but not a resource
    let r = srv.post_json("Patient", &json!({"active": true})).await;
    r.assert_status(400);
}

async fn capability_statement(srv: &TestServer) {
    let r = srv.get("metadata").await;
    r.assert_status(200);
    let cs = r.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["kind"], "instance");
    assert!(cs["status"].is_string());
    assert!(cs["date"].is_string());
    let formats: Vec<&str> = cs["format"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(formats.iter().any(|f| f.contains("json")), "{formats:?}");
    assert!(formats.iter().any(|f| f.contains("xml")), "{formats:?}");
    let rest = &cs["rest"][0];
    assert_eq!(rest["mode"], "server");
    let patient = rest["resource"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["type"] == "Patient"))
        .expect("Patient is listed");
    let codes: Vec<&str> = patient["interaction"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["code"].as_str()).collect())
        .unwrap_or_default();
    for c in [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ] {
        assert!(codes.contains(&c), "Patient lacks {c}: {codes:?}");
    }
    let sys: Vec<&str> = rest["interaction"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["code"].as_str()).collect())
        .unwrap_or_default();
    for c in ["transaction", "batch", "history-system"] {
        assert!(sys.contains(&c), "system lacks {c}: {sys:?}");
    }
    // every listed type is a real resource type, none twice
    let types: Vec<&str> = rest["resource"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["type"].as_str()).collect())
        .unwrap_or_default();
    let unique: std::collections::HashSet<&&str> = types.iter().collect();
    assert_eq!(unique.len(), types.len());
    assert!(
        types.len() >= 140,
        "R4 has 145 resource types: {}",
        types.len()
    );
    // and it is available as XML
    let x = srv.get("metadata?_format=xml").await;
    x.assert_status(200);
    assert_eq!(
        xml_to_json(&x.text())["resourceType"],
        "CapabilityStatement"
    );
}

/// 413 needs a server with a small body limit.
async fn oversized_body(backend: Backend) {
    let settings = Settings {
        max_body_bytes: 2048,
        ..Settings::default()
    };
    let Some(srv) = TestServer::start_with(backend, settings).await else {
        return;
    };
    let mut p = patient();
    p["name"][0]["given"] = json!(vec!["X".repeat(100); 40]);
    let r = srv.post_json("Patient", &p).await;
    r.assert_status(413);
    r.assert_outcome();
    // a body under the limit is fine
    srv.create(&patient()).await;
    srv.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_sqlite() {
    oversized_body(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_postgres() {
    oversized_body(Backend::Postgres).await;
}
