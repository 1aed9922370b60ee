//! The vendored R4/THO CodeSystems, ValueSets and ConceptMaps stored as resources at first start
//! (`Settings::load_canonical_terminology`, on for `kiln serve`): searchable and readable like any
//! resource, counted against the vendored bundle; a restart does not redo it; an upgrade (a new
//! bundle fingerprint) replaces only the copies Kiln wrote and nobody changed, deletes those the
//! bundle dropped, and keeps clients' versions; terminology operations see no duplicates and use a
//! client's modified copy; two nodes starting at once load it once.
//! Also: required bindings the R4 model cannot enumerate are checked on write through the
//! terminology service (400 naming the element and the value set; a good code is stored).

use kiln_conformance_tests::{entries, Backend, TestServer};
use kiln_server::canonical::{self, LoadSummary};
use kiln_server::Settings;
use kiln_store::SqlValue;
use serde_json::{json, Value};

fn settings() -> Settings {
    Settings {
        load_canonical_terminology: true,
        ..Settings::default()
    }
}

fn total(b: &Value) -> u64 {
    b["total"]
        .as_u64()
        .unwrap_or_else(|| panic!("no total: {b}"))
}

/// Rewrites the load records as an older Kiln (another bundle) would have left them.
async fn pretend_older_bundle(srv: &TestServer) {
    // in a write transaction: the store's SQLite readers refuse writes (`query_only`)
    let mut tx = srv.state.store.begin().await.unwrap();
    tx.execute("UPDATE kiln_canonical_loads SET fingerprint = 'older'", &[])
        .await
        .unwrap();
    tx.execute(
        "UPDATE kiln_canonical_resources SET fingerprint = 'older'",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn stored_and_searchable(backend: Backend) {
    let t0 = std::time::Instant::now();
    let Some(srv) = TestServer::start_with(backend, settings()).await else {
        return;
    };
    // the server answers once the load is done (connections wait in the backlog meanwhile)
    let r = srv.get("CodeSystem?_summary=count").await;
    r.assert_status(200);
    println!(
        "{backend:?}: first start with canonical terminology, ready in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let vendored = canonical::vendored_resources().unwrap();
    for ty in ["CodeSystem", "ValueSet", "ConceptMap"] {
        let want = vendored.iter().filter(|c| c.resource_type == ty).count() as u64;
        assert!(want > 10, "{ty}: {want}");
        let r = srv.get(&format!("{ty}?_summary=count")).await;
        assert_eq!(total(&r.json()), want, "{ty} count");
    }

    // by url, version, name, status
    let r = srv
        .get("CodeSystem?url=http://hl7.org/fhir/administrative-gender")
        .await;
    let e = entries(&r.json());
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["resource"]["id"], "administrative-gender");
    assert_eq!(e[0]["resource"]["meta"]["versionId"], "1");
    let r = srv
        .get("ValueSet?url=http://hl7.org/fhir/ValueSet/administrative-gender&version=4.0.1&status=active")
        .await;
    assert_eq!(entries(&r.json()).len(), 1);
    let r = srv.get("CodeSystem?name=AdministrativeGender").await;
    assert!(!entries(&r.json()).is_empty());
    let r = srv
        .get("ConceptMap?url=http://hl7.org/fhir/ConceptMap/cm-administrative-gender-v2")
        .await;
    assert_eq!(entries(&r.json()).len(), 1);
    // an id R4 and THO share: R4 keeps it, THO's copy is `tho-[id]`
    let r = srv.get("ValueSet/action-type").await;
    r.assert_status(200);
    assert_eq!(r.json()["url"], "http://hl7.org/fhir/ValueSet/action-type");
    let r = srv
        .get("ValueSet?url=http://terminology.hl7.org/ValueSet/action-type")
        .await;
    let e = entries(&r.json());
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["resource"]["id"], "tho-action-type");
    // THO content: a v3 code system read by id
    let r = srv.get("CodeSystem/v3-ActCode").await;
    r.assert_status(200);
    assert_eq!(
        r.json()["url"],
        "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    );
    // history: one version each
    let r = srv.get("CodeSystem/v3-ActCode/_history").await;
    assert_eq!(entries(&r.json()).len(), 1);

    // a restart with the same bundle does nothing
    let again = canonical::ensure_loaded(&srv.state).await.unwrap();
    assert_eq!(
        again,
        LoadSummary {
            already_loaded: true,
            ..Default::default()
        }
    );

    // terminology operations: stored + vendored content without duplicates
    let r = srv
        .get("ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/administrative-gender")
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["expansion"]["total"], 4);
    let r = srv.get("ValueSet/administrative-gender/$expand").await;
    r.assert_status(200);
    assert_eq!(r.json()["expansion"]["total"], 4);
    let r = srv.get("CodeSystem/v3-ActCode/$lookup?code=AMB").await;
    r.assert_status(200);
    let r = srv
        .get("Patient?gender:in=http://hl7.org/fhir/ValueSet/administrative-gender")
        .await;
    r.assert_status(200);

    // a client changes a stored copy: its version wins in operations and survives an upgrade
    let mut vs = srv.get("ValueSet/administrative-gender").await.json();
    vs["compose"] = json!({"include": [{"system": "http://hl7.org/fhir/administrative-gender",
        "concept": [{"code": "female"}, {"code": "male"}]}]});
    srv.put_json("ValueSet/administrative-gender", &vs)
        .await
        .assert_status(200);
    let r = srv
        .get("ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/administrative-gender")
        .await;
    assert_eq!(r.json()["expansion"]["total"], 2, "the client's version");
    // a client's resource with the url of a vendored one that is not stored yet
    // (simulated: delete Kiln's copy, its record and create the client's under another id)
    let url = "http://hl7.org/fhir/ValueSet/address-use";
    let r = srv.get(&format!("ValueSet?url={url}")).await;
    let old_id = entries(&r.json())[0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    srv.delete(&format!("ValueSet/{old_id}")).await;
    let (client_id, r) = srv
        .create(
            &json!({"resourceType": "ValueSet", "url": url, "status": "active",
            "name": "ClientAddressUse",
            "compose": {"include": [{"system": "http://hl7.org/fhir/address-use"}]}}),
        )
        .await;
    r.assert_status(201);

    // an older load: one copy Kiln wrote differs from the bundle, one is not in it any more
    pretend_older_bundle(&srv).await;
    let mut tx = srv.state.store.begin().await.unwrap();
    let cur = tx
        .current("CodeSystem", "v3-ActCode")
        .await
        .unwrap()
        .unwrap();
    let mut cs = srv.get("CodeSystem/v3-ActCode").await.json();
    cs["title"] = json!("An older title");
    let w = tx
        .put("CodeSystem", "v3-ActCode", cs, Some(&cur), "PUT")
        .await
        .unwrap();
    let w2 = tx
        .put(
            "CodeSystem",
            "dropped-by-the-new-bundle",
            json!({"resourceType": "CodeSystem", "url": "http://example.org/dropped",
                "status": "retired", "content": "not-present"}),
            None,
            "POST",
        )
        .await
        .unwrap();
    for (id, v) in [
        ("v3-ActCode", w.version),
        ("dropped-by-the-new-bundle", w2.version),
    ] {
        tx.execute(
            "DELETE FROM kiln_canonical_resources WHERE res_type = 'CodeSystem' AND res_id = $1",
            &[SqlValue::Text(id.into())],
        )
        .await
        .unwrap();
        tx.execute(
            "INSERT INTO kiln_canonical_resources (res_type, res_id, version, fingerprint) VALUES ('CodeSystem', $1, $2, 'older')",
            &[SqlValue::Text(id.into()), SqlValue::Int(v)],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    let t1 = std::time::Instant::now();
    let up = canonical::ensure_loaded(&srv.state).await.unwrap();
    println!(
        "{backend:?}: upgrade in {:.2} s: {up:?}",
        t1.elapsed().as_secs_f64()
    );
    assert!(!up.already_loaded);
    assert_eq!(up.updated, 1, "{up:?}");
    assert_eq!(up.deleted, 1, "{up:?}");
    assert_eq!(up.created, 0, "{up:?}");
    // the client's administrative-gender and the deleted address-use (Kiln's copy deleted by a
    // client; the client's own resource uses the url)
    assert_eq!(up.kept_client_versions, 2, "{up:?}");
    assert_eq!(up.unchanged, vendored.len() - 3, "{up:?}");
    let r = srv.get("CodeSystem/v3-ActCode").await;
    assert!(r.json().get("title").is_none_or(|t| t != "An older title"));
    assert_eq!(r.json()["meta"]["versionId"], "3");
    srv.get("CodeSystem/dropped-by-the-new-bundle")
        .await
        .assert_status(410);
    let r = srv.get("ValueSet/administrative-gender").await;
    assert_eq!(
        r.json()["meta"]["versionId"],
        "2",
        "the client's version stays"
    );
    assert_eq!(
        r.json()["compose"]["include"][0]["concept"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    srv.get(&format!("ValueSet/{old_id}"))
        .await
        .assert_status(410);
    let r = srv.get(&format!("ValueSet?url={url}")).await;
    let e = entries(&r.json());
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["resource"]["id"], client_id.as_str());
    // unchanged copies keep their version
    let r = srv.get("CodeSystem/administrative-gender").await;
    assert_eq!(r.json()["meta"]["versionId"], "1");
    // and the upgrade is recorded
    assert!(
        canonical::ensure_loaded(&srv.state)
            .await
            .unwrap()
            .already_loaded
    );
    srv.finish().await;
}

/// Two nodes on one PostgreSQL database starting at once: one stores the resources, the other
/// waits on the advisory lock and finds them stored.
async fn two_nodes_at_once() {
    let Some(srv) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let admin = std::env::var(kiln_conformance_tests::PG_ENV).unwrap();
    let config = kiln_store::StoreConfig {
        database: srv
            .pg_database()
            .map(|db| kiln_conformance_tests::with_database(admin.trim(), db)),
        max_connections: 4,
        ..Default::default()
    };
    let store2 = kiln_server::open_store(&config).await.unwrap();
    let node2 = kiln_server::AppState::new(store2, "http://node2/fhir".into(), settings());
    let (a, b) = tokio::join!(
        canonical::ensure_loaded(&srv.state),
        canonical::ensure_loaded(&node2)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.already_loaded != b.already_loaded,
        "exactly one node loads: {a:?} {b:?}"
    );
    let vendored = canonical::vendored_resources().unwrap();
    assert_eq!(a.created + b.created, vendored.len());
    let r = srv.get("ValueSet?_summary=count").await;
    let want = vendored
        .iter()
        .filter(|c| c.resource_type == "ValueSet")
        .count() as u64;
    assert_eq!(total(&r.json()), want);
    node2.store.close().await;
    srv.finish().await;
}

/// A required binding to a value set the R4 model cannot enumerate (UCUM units,
/// `ResearchElementDefinition.characteristic.unitOfMeasure`), checked through the terminology
/// service on create, update and `$validate`.
async fn required_bindings_via_terminology(srv: &TestServer) {
    let red = |unit: &str| {
        json!({"resourceType": "ResearchElementDefinition", "status": "active",
            "type": "population",
            "characteristic": [{"definitionCodeableConcept": {"text": "weight"},
                "unitOfMeasure": {"coding": [
                    {"system": "http://unitsofmeasure.org", "code": unit}]}}]})
    };
    let (_, r) = srv.create(&red("mg/dL")).await;
    r.assert_status(201);
    let r = srv
        .post_json("ResearchElementDefinition", &red("mg/zz"))
        .await;
    r.assert_status(400);
    let issues = r.assert_outcome();
    let e = issues
        .iter()
        .find(|i| i["severity"] == "error")
        .expect("an error issue");
    assert_eq!(
        e["expression"][0],
        "ResearchElementDefinition.characteristic[0].unitOfMeasure"
    );
    let text = e["diagnostics"].as_str().unwrap_or_default();
    assert!(
        text.contains("http://hl7.org/fhir/ValueSet/ucum-units") && text.contains("mg/zz"),
        "{text}"
    );
    // the same through update and $validate
    let mut bad = red("mg/zz");
    bad["id"] = json!("red-1");
    srv.put_json("ResearchElementDefinition/red-1", &bad)
        .await
        .assert_status(400);
    let r = srv
        .post_json("ResearchElementDefinition/$validate", &bad)
        .await;
    r.assert_status(200);
    assert!(r.text().contains("ucum-units"), "{}", r.text());
    // a second coding in the value set is enough; an unknown code system is not an error
    let mut two = red("mg/zz");
    two["characteristic"][0]["unitOfMeasure"]["coding"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": "http://unitsofmeasure.org", "code": "kg"}));
    srv.create(&two).await.1.assert_status(201);
    let mut other = red("mg/zz");
    other["characteristic"][0]["unitOfMeasure"]["coding"][0]["system"] =
        json!("http://example.org/units");
    srv.create(&other).await.1.assert_status(201);
    // model-enumerable bindings are unchanged: a wrong gender is still a 400
    srv.post_json(
        "Patient",
        &json!({"resourceType": "Patient", "gender": "man"}),
    )
    .await
    .assert_status(400);
}

/// `$validate?profile=`: a stored profile's binding (`Encounter.class` tightened from extensible
/// to required on THO's v3-ActEncounterCode) is checked through the terminology service.
async fn profile_bindings_via_terminology(srv: &TestServer) {
    let url = "http://example.org/fhir/StructureDefinition/strict-encounter";
    let sd = json!({"resourceType": "StructureDefinition", "url": url, "name": "StrictEncounter",
    "status": "active", "kind": "resource", "abstract": false, "type": "Encounter",
    "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Encounter",
    "derivation": "constraint",
    "snapshot": {"element": [
        {"id": "Encounter", "path": "Encounter", "min": 0, "max": "*"},
        {"id": "Encounter.class", "path": "Encounter.class", "min": 1, "max": "1",
         "binding": {"strength": "required",
             "valueSet": "http://terminology.hl7.org/ValueSet/v3-ActEncounterCode"}}
    ]}});
    srv.create(&sd).await.1.assert_status(201);
    let enc = |code: &str| {
        json!({"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code}})
    };
    let path = format!("Encounter/$validate?profile={url}");
    let errors = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["severity"] == "error")
            .cloned()
            .collect()
    };
    let r = srv.post_json(&path, &enc("AMB")).await;
    r.assert_status(200);
    assert_eq!(errors(&r.json()), Vec::<serde_json::Value>::new());
    // NOPE is no ActCode: fine for the base (extensible), an error for the profile
    let r = srv.post_json("Encounter/$validate", &enc("NOPE")).await;
    r.assert_status(200);
    assert_eq!(errors(&r.json()), Vec::<serde_json::Value>::new());
    let r = srv.post_json(&path, &enc("NOPE")).await;
    r.assert_status(200);
    let e = errors(&r.json());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0]["expression"][0], "Encounter.class");
    assert!(
        e[0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("v3-ActEncounterCode") && d.contains(url)),
        "{e:?}"
    );
    // the same through Parameters
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": enc("NOPE")},
        {"name": "profile", "valueCanonical": url}
    ]});
    let r = srv.post_json("Encounter/$validate", &params).await;
    assert_eq!(errors(&r.json()).len(), 1);
    // an unknown profile: the validation cannot run
    let r = srv
        .post_json(
            "Encounter/$validate?profile=http://example.org/none",
            &enc("AMB"),
        )
        .await;
    r.assert_status(400);
    r.assert_outcome();
}

kiln_conformance_tests::backend_tests!(
    required_bindings_via_terminology,
    profile_bindings_via_terminology
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_and_searchable_sqlite() {
    stored_and_searchable(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_and_searchable_postgres() {
    stored_and_searchable(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_at_once_postgres() {
    two_nodes_at_once().await;
}
