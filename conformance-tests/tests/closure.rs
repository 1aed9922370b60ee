//! `$closure` over HTTP (conceptmap-operation-closure.html, terminology-service.html#closure) on
//! the real ICD-10-CM 2026 tabular from `../shared` (skipped with a notice when absent), on
//! SQLite and PostgreSQL: initialisation, new subsumption relations as a ConceptMap
//! (`subsumes`/`specializes`), concepts already in the table, `version` replay, re-initialisation,
//! separate tables per name, errors, and the CapabilityStatement entry.

use kiln_conformance_tests::{shared_dir, Backend, TestServer};
use kiln_server::Settings;
use serde_json::{json, Value};

const ICD: &str = "http://hl7.org/fhir/sid/icd-10-cm";

fn call(name: &str, concepts: &[&str], version: Option<&str>) -> Value {
    let mut p = vec![json!({"name": "name", "valueString": name})];
    for c in concepts {
        p.push(json!({"name": "concept", "valueCoding": {"system": ICD, "code": c}}));
    }
    if let Some(v) = version {
        p.push(json!({"name": "version", "valueString": v}));
    }
    json!({"resourceType": "Parameters", "parameter": p})
}

/// The entries of a closure ConceptMap as sorted (source, target, equivalence) triples.
fn entries(cm: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for g in cm["group"].as_array().into_iter().flatten() {
        assert_eq!(g["source"], ICD);
        assert_eq!(g["target"], ICD);
        for e in g["element"].as_array().into_iter().flatten() {
            for t in e["target"].as_array().into_iter().flatten() {
                out.push((
                    e["code"].as_str().unwrap().to_string(),
                    t["code"].as_str().unwrap().to_string(),
                    t["equivalence"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn t(s: &str, t: &str, e: &str) -> (String, String, String) {
    (s.to_string(), t.to_string(), e.to_string())
}

async fn closure(backend: Backend) {
    let Some(tabular) = shared_dir()
        .map(|d| d.join("terminology/icd10cm-tabular-2026.xml"))
        .filter(|p| p.exists())
    else {
        println!("NOTICE: ../shared/terminology absent; $closure test skipped");
        return;
    };
    let store_dir = tempfile::tempdir().unwrap();
    let ts = kiln_terminology::TerminologyStore::open(store_dir.path()).unwrap();
    ts.import_icd10cm(&tabular).unwrap();
    let settings = Settings {
        terminology_dir: Some(store_dir.path().to_path_buf()),
        ..Settings::default()
    };
    let Some(srv) = TestServer::start_with(backend, settings).await else {
        return;
    };

    // listed in the CapabilityStatement as a system operation
    let caps = srv.get("metadata").await.json();
    let ops = caps["rest"][0]["operation"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        ops.iter().any(|o| o["name"] == "closure"
            && o["definition"] == "http://hl7.org/fhir/OperationDefinition/ConceptMap-closure"),
        "{ops:?}"
    );

    // initialisation: an empty ConceptMap at version 0
    let r = srv
        .post_json("$closure", &call("problems", &[], None))
        .await;
    r.assert_status(200);
    let cm = r.json();
    assert_eq!(cm["resourceType"], "ConceptMap");
    assert_eq!(cm["version"], "0");
    assert!(cm.get("group").is_none());

    // one concept: nothing to relate yet, the version stays
    let cm = srv
        .post_json("$closure", &call("problems", &["A00.0"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![]);
    assert_eq!(cm["version"], "0");

    // Cholera (A00) subsumes A00.0: the new concept specializes into the one in the table
    let cm = srv
        .post_json("$closure", &call("problems", &["A00"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A00", "A00.0", "specializes")]);
    assert_eq!(cm["version"], "1");

    // A00.1 is-a A00; A01.0 (typhoid fever) is unrelated to the cholera codes;
    // repeated concepts are not added twice
    let cm = srv
        .post_json(
            "$closure",
            &call("problems", &["A00.1", "A01.0", "A00.1", "A00"], None),
        )
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A00.1", "A00", "subsumes")]);
    assert_eq!(cm["version"], "2");
    let cm = srv
        .post_json("$closure", &call("problems", &["A01"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A01", "A01.0", "specializes")]);
    assert_eq!(cm["version"], "3");

    // replay: everything after version 1, then after 0
    let cm = srv
        .post_json("$closure", &call("problems", &[], Some("1")))
        .await
        .json();
    assert_eq!(cm["version"], "3");
    assert_eq!(
        entries(&cm),
        vec![
            t("A00.1", "A00", "subsumes"),
            t("A01", "A01.0", "specializes")
        ]
    );
    let cm = srv
        .post_json("$closure", &call("problems", &[], Some("0")))
        .await
        .json();
    assert_eq!(entries(&cm).len(), 3);
    let cm = srv
        .post_json("$closure", &call("problems", &[], Some("3")))
        .await
        .json();
    assert_eq!(entries(&cm), vec![]);

    // another table is independent of the first
    srv.post_json("$closure", &call("other", &[], None))
        .await
        .assert_status(200);
    let cm = srv
        .post_json("$closure", &call("other", &["A00.9", "A00"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A00", "A00.9", "specializes")]);
    assert_eq!(cm["version"], "1");

    // re-initialisation forgets the concepts: A00 relates to A00.0 again once re-added
    let cm = srv
        .post_json("$closure", &call("problems", &[], None))
        .await
        .json();
    assert_eq!(cm["version"], "0");
    let cm = srv
        .post_json("$closure", &call("problems", &[], Some("0")))
        .await
        .json();
    assert_eq!(entries(&cm), vec![]);
    let cm = srv
        .post_json("$closure", &call("problems", &["A00", "A00.0"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A00.0", "A00", "subsumes")]);

    // errors: unknown table, unknown code, no name, a version that is not ours
    let r = srv
        .post_json("$closure", &call("never-initialised", &["A00"], None))
        .await;
    r.assert_status(404);
    assert!(r.text().contains("never-initialised"), "{}", r.text());
    let r = srv
        .post_json("$closure", &call("problems", &["A00.X"], None))
        .await;
    r.assert_status(404);
    assert!(r.text().contains("A00.X"), "{}", r.text());
    let r = srv
        .post_json(
            "$closure",
            &json!({"resourceType": "Parameters", "parameter": [
                {"name": "concept", "valueCoding": {"system": ICD, "code": "A00"}}]}),
        )
        .await;
    r.assert_status(400);
    assert!(r.text().contains("'name'"), "{}", r.text());
    let r = srv
        .post_json("$closure", &call("problems", &[], Some("latest")))
        .await;
    r.assert_status(400);
    assert!(r.text().contains("latest"), "{}", r.text());
    // the unknown code was not added: the table still holds A00 and A00.0 only
    let cm = srv
        .post_json("$closure", &call("problems", &["A00.1"], None))
        .await
        .json();
    assert_eq!(entries(&cm), vec![t("A00.1", "A00", "subsumes")]);
    srv.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closure_sqlite() {
    closure(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closure_postgres() {
    closure(Backend::Postgres).await;
}
