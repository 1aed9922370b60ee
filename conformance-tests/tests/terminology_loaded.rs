//! Loaded terminology content over HTTP (terminology-service.html): a store prepared the way
//! `kiln terminology load` prepares it (the SNOMED CT RF2 and LOINC fixtures of
//! `terminology/tests/fixtures`, in the official layouts, and the real ICD-10-CM 2026 tabular from
//! `../shared` when present), served by a Kiln server: implicit value sets with ECL, the implicit
//! ICD-10 concept map, dialect displays, LOINC answer lists, and a 400 for bad ECL.

use std::path::{Path, PathBuf};

use kiln_conformance_tests::{shared_dir, Backend, TestServer};
use kiln_server::Settings;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../terminology/tests/fixtures")
        .join(name)
}

fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

fn codes(e: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        for c in v["contains"].as_array().into_iter().flatten() {
            out.push(c["code"].as_str().unwrap_or("").to_string());
            walk(c, out);
        }
    }
    let mut out = Vec::new();
    walk(&e["expansion"], &mut out);
    out.sort();
    out
}

fn q(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

async fn loaded(backend: Backend) {
    let store_dir = tempfile::tempdir().unwrap();
    let ts = kiln_terminology::TerminologyStore::open(store_dir.path()).unwrap();
    ts.import_snomed(&fixture("snomed"), None).unwrap();
    ts.import_loinc(&fixture("loinc"), None).unwrap();
    let icd = shared_dir()
        .map(|d| d.join("terminology/icd10cm-tabular-2026.xml"))
        .filter(|p| p.exists());
    match &icd {
        Some(p) => {
            ts.import_icd10cm(p).unwrap();
        }
        None => println!("NOTICE: ../shared/terminology absent; ICD-10-CM part skipped"),
    }
    let settings = Settings {
        terminology_dir: Some(store_dir.path().to_path_buf()),
        ..Settings::default()
    };
    let Some(srv) = TestServer::start_with(backend, settings).await else {
        return;
    };
    let sct = "http://snomed.info/sct";

    let r = srv
        .get(&format!(
            "ValueSet/$expand?url={}",
            q(&format!("{sct}?fhir_vs=ecl/<< 73211009"))
        ))
        .await;
    r.assert_status(200);
    assert_eq!(codes(&r.json()), vec!["44054006", "73211009"]);
    let r = srv
        .get(&format!(
            "ValueSet/$expand?url={}",
            q(&format!(
                "{sct}?fhir_vs=ecl/< 404684003 : 363698007 = << 73211009"
            ))
        ))
        .await;
    r.assert_status(200);
    assert_eq!(codes(&r.json()), vec!["44054006"]);
    let r = srv
        .get(&format!(
            "ValueSet/$expand?url={}",
            q(&format!("{sct}?fhir_vs=refset/723264001"))
        ))
        .await;
    assert_eq!(codes(&r.json()), vec!["44054006", "73211009"]);

    // a syntax error in the ECL: 400 with an OperationOutcome naming the position
    let r = srv
        .get(&format!(
            "ValueSet/$expand?url={}",
            q(&format!(
                "{sct}?fhir_vs=ecl/<< 73211009 AND 404684003 OR 64572001"
            ))
        ))
        .await;
    r.assert_status(400);
    let text = r.text();
    assert!(
        text.contains("Invalid ECL expression at position 27"),
        "{text}"
    );

    // $validate-code against an ECL value set
    let r = srv
        .get(&format!(
            "ValueSet/$validate-code?url={}&system={}&code=44054006",
            q(&format!("{sct}?fhir_vs=ecl/<< 404684003")),
            q(sct)
        ))
        .await;
    r.assert_status(200);
    assert_eq!(param(&r.json(), "result").unwrap()["valueBoolean"], true);

    // the implicit ICD-10 map and a historical association
    let r = srv
        .get(&format!(
            "ConceptMap/$translate?url={}&system={}&code=44054006",
            q(&format!("{sct}?fhir_cm=447562003")),
            q(sct)
        ))
        .await;
    r.assert_status(200);
    assert!(r.text().contains("\"E11.9\""), "{}", r.text());
    let r = srv
        .get(&format!(
            "CodeSystem/$validate-code?url={}&code=200000001",
            q(sct)
        ))
        .await;
    assert!(
        r.text()
            .contains("REPLACED BY 73211009 |Diabetes mellitus|"),
        "{}",
        r.text()
    );

    // GB English display
    let r = srv
        .get(&format!(
            "CodeSystem/$lookup?system={}&code=44054006&displayLanguage=en-GB",
            q(sct)
        ))
        .await;
    assert_eq!(
        param(&r.json(), "display").unwrap()["valueString"],
        "Type II diabetes mellitus"
    );

    // LOINC answer list
    let r = srv
        .get(&format!(
            "ValueSet/$expand?url={}",
            q("http://loinc.org/vs/LL2201-3")
        ))
        .await;
    r.assert_status(200);
    assert_eq!(r.json()["expansion"]["total"], 4);

    if icd.is_some() {
        let sys = q("http://hl7.org/fhir/sid/icd-10-cm");
        let r = srv
            .get(&format!(
                "CodeSystem/$subsumes?system={sys}&codeA=A00&codeB=A00.0"
            ))
            .await;
        r.assert_status(200);
        assert_eq!(
            param(&r.json(), "outcome").unwrap()["valueCode"],
            "subsumes"
        );
        let r = srv
            .get(&format!(
                "ValueSet/$expand?url={}&count=0",
                q("http://hl7.org/fhir/sid/icd-10-cm?fhir_vs=isa/A00")
            ))
            .await;
        r.assert_status(200);
        assert_eq!(r.json()["expansion"]["total"], 4);
    }
    srv.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_content_sqlite() {
    loaded(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_content_postgres() {
    loaded(Backend::Postgres).await;
}
