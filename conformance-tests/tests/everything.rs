//! `Patient/$everything` and `Encounter/$everything` over HTTP, on real Synthea data (two
//! patients' transaction Bundles from `../shared/synthea-r4`; skipped with a notice when absent)
//! and on a small hand-made fixture (parameters, errors).
//!
//! Expected sets are derived from the posted Bundles themselves, not from the server: a
//! patient's compartment is the Patient plus every resource of the Bundle that references it;
//! the included resources are the Organizations/Practitioners those reference (outside
//! `contained`); the care-date window uses each type's clinical date element as the R4 spec
//! names it. Every page of every answer is followed: each resource must come exactly once.

use std::collections::{BTreeMap, BTreeSet};

use kiln_conformance_tests::{backend_tests, entries, link, shared_dir, TestServer};
use serde_json::{json, Value};

const DWAIN: &str = "Dwain_McGlynn_7515d14b-843b-4210-8b6b-a33ab253d560.json";
const FANNIE: &str = "Fannie_Waelchi_8666cd40-7af9-48c6-a1a6-86a161195542.json";

/// Types of the R4 Encounter CompartmentDefinition.
const ENCOUNTER_COMPARTMENT: &[&str] = &[
    "CarePlan",
    "CareTeam",
    "ChargeItem",
    "Claim",
    "ClinicalImpression",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Condition",
    "DeviceRequest",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "Encounter",
    "ExplanationOfBenefit",
    "Media",
    "MedicationAdministration",
    "MedicationRequest",
    "NutritionOrder",
    "Observation",
    "Procedure",
    "QuestionnaireResponse",
    "RequestGroup",
    "ServiceRequest",
    "VisionPrescription",
];

/// One posted Bundle: its resources by server `Type/id`, and the `urn:uuid` → `Type/id` map.
struct Loaded {
    resources: BTreeMap<String, Value>,
    by_urn: BTreeMap<String, String>,
    patient: String,
}

impl Loaded {
    /// `Type/id` of a reference (`urn:uuid:…` of this Bundle), if it points into the Bundle.
    fn target(&self, reference: &str) -> Option<&String> {
        self.by_urn.get(reference)
    }

    /// References of `r` outside `contained` (resolved to `Type/id`). Kiln follows references
    /// that a reference search parameter indexes; of the elements Synthea fills, only
    /// `Claim.supportingInfo.valueReference` (to Immunizations) has none, and is skipped.
    fn refs(&self, r: &Value) -> BTreeSet<String> {
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        match (k.as_str(), x) {
                            ("contained" | "supportingInfo", _) => {}
                            ("reference", Value::String(s)) => out.push(s.clone()),
                            _ => walk(x, out),
                        }
                    }
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(r, &mut out);
        out.iter().filter_map(|x| self.target(x).cloned()).collect()
    }

    /// The Patient plus every resource that references it.
    fn compartment(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self
            .resources
            .iter()
            .filter(|(_, r)| self.refs(r).contains(&self.patient))
            .map(|(k, _)| k.clone())
            .collect();
        s.insert(self.patient.clone());
        s
    }

    /// What `members` reference that is not a member and whose type is not `excluded`.
    fn referenced(
        &self,
        members: &BTreeSet<String>,
        inside: &dyn Fn(&str) -> bool,
    ) -> BTreeSet<String> {
        members
            .iter()
            .flat_map(|m| self.refs(&self.resources[m]))
            .filter(|t| !members.contains(t) && !inside(t.split('/').next().unwrap_or("")))
            .collect()
    }
}

async fn load(srv: &TestServer, file: &str) -> Option<Loaded> {
    let path = shared_dir()?.join("synthea-r4").join(file);
    let bundle: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    let r = srv.post_json("", &bundle).await;
    r.assert_status(200);
    let resp = r.json();
    let mut loaded = Loaded {
        resources: BTreeMap::new(),
        by_urn: BTreeMap::new(),
        patient: String::new(),
    };
    for (req, res) in entries(&bundle).iter().zip(entries(&resp)) {
        let loc = res["response"]["location"].as_str().expect("location");
        let parts: Vec<&str> = loc.split('/').collect();
        let i = parts
            .iter()
            .position(|p| *p == "_history")
            .expect("versioned location");
        let key = format!("{}/{}", parts[i - 2], parts[i - 1]);
        if parts[i - 2] == "Patient" {
            loaded.patient = key.clone();
        }
        loaded.by_urn.insert(
            req["fullUrl"].as_str().expect("fullUrl").to_string(),
            key.clone(),
        );
        loaded.resources.insert(key, req["resource"].clone());
    }
    assert!(!loaded.patient.is_empty(), "{file} has a Patient");
    Some(loaded)
}

/// Every entry of every page (following `next`): (`Type/id`, search mode); fails on a
/// resource that comes twice.
async fn everything(srv: &TestServer, first: reqwest::RequestBuilder) -> BTreeMap<String, String> {
    let r = kiln_conformance_tests::send(first).await;
    r.assert_status(200);
    let mut page = r.json();
    let mut out = BTreeMap::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 500, "paging does not end");
        assert_eq!(page["type"], "searchset");
        for e in entries(&page) {
            let res = &e["resource"];
            let key = format!(
                "{}/{}",
                res["resourceType"].as_str().unwrap_or(""),
                res["id"].as_str().unwrap_or("")
            );
            assert_eq!(
                e["fullUrl"].as_str(),
                Some(srv.url(&key).as_str()),
                "fullUrl of {key}"
            );
            let mode = e["search"]["mode"].as_str().unwrap_or("").to_string();
            assert!(
                out.insert(key.clone(), mode).is_none(),
                "{key} returned twice (page {pages})"
            );
        }
        let Some(next) = link(&page, "next") else {
            break;
        };
        assert!(next.contains("$everything"), "next link {next}");
        let r = kiln_conformance_tests::send(srv.client.get(&next)).await;
        r.assert_status(200);
        page = r.json();
    }
    out
}

fn get(srv: &TestServer, path: &str) -> reqwest::RequestBuilder {
    srv.request(reqwest::Method::GET, path)
}

/// Expected answer: members as `match`, referenced as `include`.
fn expect(members: &BTreeSet<String>, referenced: &BTreeSet<String>) -> BTreeMap<String, String> {
    members
        .iter()
        .map(|m| (m.clone(), "match".to_string()))
        .chain(
            referenced
                .iter()
                .map(|m| (m.clone(), "include".to_string())),
        )
        .collect()
}

/// `(low, high)` of a care date as `YYYY-MM-DD` prefixes (`None` = no care date; an open
/// period ends at `9999`), per the element each R4 type's date parameter reads.
fn care_range(r: &Value) -> Option<(String, String)> {
    let day = |v: &Value| v.as_str().map(|s| s[..10].to_string());
    let period = |p: &Value| -> Option<(String, String)> {
        let lo = day(&p["start"])?;
        Some((lo, day(&p["end"]).unwrap_or_else(|| "9999-12-31".into())))
    };
    let point = |v: &Value| day(v).map(|d| (d.clone(), d));
    match r["resourceType"].as_str()? {
        "Observation" | "DiagnosticReport" => point(&r["effectiveDateTime"]),
        "Encounter" | "CarePlan" | "CareTeam" => period(&r["period"]),
        "Procedure" => period(&r["performedPeriod"]).or_else(|| point(&r["performedDateTime"])),
        "Immunization" => point(&r["occurrenceDateTime"]),
        "Claim" | "ExplanationOfBenefit" => point(&r["created"]),
        "Condition" => point(&r["onsetDateTime"]),
        "MedicationRequest" => point(&r["authoredOn"]),
        _ => None,
    }
}

async fn synthea_everything(srv: &TestServer) {
    let Some(dwain) = load(srv, DWAIN).await else {
        eprintln!("notice: ../shared/synthea-r4 is absent: skipping the Synthea $everything test");
        return;
    };
    let fannie = load(srv, FANNIE).await.expect("second patient");
    let patient_inside = |t: &str| t != "Organization" && t != "Practitioner";

    // every resource of each patient's Bundle, exactly once, across pages of 10
    for p in [&dwain, &fannie] {
        let members = p.compartment();
        let referenced = p.referenced(&members, &patient_inside);
        let want = expect(&members, &referenced);
        let got = everything(
            srv,
            get(srv, &format!("{}/$everything?_count=10", p.patient)),
        )
        .await;
        assert_eq!(got, want, "{}/$everything", p.patient);
        // this Synthea export puts each patient's Organizations and Practitioners in their Bundle
        assert_eq!(
            got.len(),
            p.resources.len(),
            "whole Bundle of {}",
            p.patient
        );
    }
    let dm = dwain.compartment();
    assert_eq!(
        dm.len(),
        90,
        "Dwain: the Patient and 89 resources referencing him"
    );
    assert_eq!(dwain.referenced(&dm, &patient_inside).len(), 6);

    // _type: Observations and the Practitioners the compartment references
    let obs: BTreeSet<String> = dm
        .iter()
        .filter(|k| k.starts_with("Observation/"))
        .cloned()
        .collect();
    assert_eq!(obs.len(), 45);
    let pract: BTreeSet<String> = dwain
        .referenced(&dm, &patient_inside)
        .into_iter()
        .filter(|k| k.starts_with("Practitioner/"))
        .collect();
    let want = expect(&obs, &pract);
    let got = everything(
        srv,
        get(
            srv,
            &format!(
                "{}/$everything?_type=Observation,Practitioner&_count=7",
                dwain.patient
            ),
        ),
    )
    .await;
    assert_eq!(got, want, "_type=Observation,Practitioner");
    // the same through POST with a Parameters body
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueCode": "Observation"},
        {"name": "_type", "valueCode": "Practitioner"},
        {"name": "_count", "valueInteger": 20}
    ]});
    let got = everything(
        srv,
        srv.request(
            reqwest::Method::POST,
            &format!("{}/$everything", dwain.patient),
        )
        .header("content-type", "application/fhir+json")
        .body(body.to_string()),
    )
    .await;
    assert_eq!(got, want, "POST _type=Observation&_type=Practitioner");

    // start/end: the records whose care date overlaps the window, the Patient, and what they
    // reference; Practitioners/Organizations referenced only from other years stay out
    let (start, end) = ("2013-01-01", "2015-08-10");
    let in_window: BTreeSet<String> = dm
        .iter()
        .filter(|k| match care_range(&dwain.resources[*k]) {
            None => true,
            Some((lo, hi)) => hi.as_str() >= start && lo.as_str() <= end,
        })
        .cloned()
        .collect();
    assert!(
        in_window.len() > 10 && in_window.len() < dm.len() - 10,
        "the window must cut: {} of {}",
        in_window.len(),
        dm.len()
    );
    let want = expect(&in_window, &dwain.referenced(&in_window, &patient_inside));
    let got = everything(
        srv,
        get(
            srv,
            &format!(
                "{}/$everything?start={start}&end={end}&_count=15",
                dwain.patient
            ),
        ),
    )
    .await;
    assert_eq!(got, want, "start={start}&end={end}");
    // a window in which only the CarePlan and CareTeam (2015-08-07 … 2017-06-14) are running
    let got = everything(
        srv,
        get(srv, &format!("{}/$everything?start=2016-01-01&end=2016-12-31&_type=CarePlan,CareTeam,Observation", dwain.patient)),
    )
    .await;
    let kinds: Vec<&str> = got
        .keys()
        .map(|k| k.split('/').next().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["CarePlan", "CareTeam"], "2016: {got:?}");

    // _since: only what changed since then
    let obs_id = obs.iter().next().expect("an Observation").clone();
    let mut changed = srv.get(&obs_id).await.json();
    changed["status"] = json!("amended");
    let r = srv.put_json(&obs_id, &changed).await;
    r.assert_status(200);
    let since = r.json()["meta"]["lastUpdated"]
        .as_str()
        .expect("lastUpdated")
        .to_string();
    let got = everything(
        srv,
        get(
            srv,
            &format!(
                "{}/$everything?_since={}",
                dwain.patient,
                since.replace('+', "%2B")
            ),
        ),
    )
    .await;
    assert_eq!(
        got,
        BTreeMap::from([(obs_id.clone(), "match".to_string())]),
        "_since={since}"
    );

    // Encounter/$everything: the Encounter, what its compartment holds, and what they reference
    let enc = dm
        .iter()
        .filter(|k| k.starts_with("Encounter/"))
        .max_by_key(|k| {
            dm.iter()
                .filter(|m| dwain.refs(&dwain.resources[*m]).contains(*k))
                .count()
        })
        .expect("an Encounter")
        .clone();
    let enc_inside = |t: &str| ENCOUNTER_COMPARTMENT.contains(&t);
    let mut members: BTreeSet<String> = dwain
        .resources
        .iter()
        .filter(|(k, r)| {
            enc_inside(k.split('/').next().unwrap_or("")) && dwain.refs(r).contains(&enc)
        })
        .map(|(k, _)| k.clone())
        .collect();
    members.insert(enc.clone());
    assert!(members.len() > 5, "{enc} has records: {members:?}");
    let want = expect(&members, &dwain.referenced(&members, &enc_inside));
    assert!(want.contains_key(&dwain.patient), "the Patient is included");
    let got = everything(srv, get(srv, &format!("{enc}/$everything?_count=4"))).await;
    assert_eq!(got, want, "{enc}/$everything");

    // type level: both patients' everything together, each resource once
    let got = everything(srv, get(srv, "Patient/$everything?_count=50")).await;
    let mut all: BTreeSet<String> = dwain.resources.keys().cloned().collect();
    all.extend(fannie.resources.keys().cloned());
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "Patient/$everything"
    );
}

async fn errors_and_fixture(srv: &TestServer) {
    // unknown patient / encounter: 404 OperationOutcome
    for path in ["Patient/nope/$everything", "Encounter/nope/$everything"] {
        let r = srv.get(path).await;
        r.assert_status(404);
        r.assert_outcome();
    }
    let (pid, _) = srv
        .create(&json!({"resourceType": "Patient", "name": [{"family": "Solo"}]}))
        .await;
    // bad parameters: 400 naming the parameter
    for (q, at) in [
        ("start=yesterday", "start"),
        ("end=2020-13-45", "end"),
        ("_since=2020-01-01", "_since"),
        ("_type=Observation,Unicorn", "_type"),
        ("_count=many", "_count"),
        ("start=2022&end=2021", "start"),
        ("bogus=1", "bogus"),
    ] {
        let r = srv.get(&format!("Patient/{pid}/$everything?{q}")).await;
        r.assert_status(400);
        let issues = r.assert_outcome();
        assert!(
            issues.iter().any(|i| i["expression"][0] == at),
            "{q}: {issues:?}"
        );
    }
    // Encounter/$everything has no care-date window; it is not defined at type level
    let (eid, _) = srv
        .create(&json!({"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": format!("Patient/{pid}")}}))
        .await;
    srv.get(&format!("Encounter/{eid}/$everything?start=2020"))
        .await
        .assert_status(400);
    srv.get("Encounter/$everything").await.assert_status(404);
    srv.get(&format!("Observation/{eid}/$everything"))
        .await
        .assert_status(404);
    // a patient with one Encounter: both, the Encounter a match
    let got = everything(srv, get(srv, &format!("Patient/{pid}/$everything"))).await;
    assert_eq!(
        got,
        BTreeMap::from([
            (format!("Encounter/{eid}"), "match".to_string()),
            (format!("Patient/{pid}"), "match".to_string()),
        ])
    );
    // Encounter/$everything includes the patient it references
    let got = everything(srv, get(srv, &format!("Encounter/{eid}/$everything"))).await;
    assert_eq!(
        got,
        BTreeMap::from([
            (format!("Encounter/{eid}"), "match".to_string()),
            (format!("Patient/{pid}"), "include".to_string()),
        ])
    );
    // the operation is in the CapabilityStatement for Patient and Encounter
    let cs = srv.get("metadata").await.json();
    for ty in ["Patient", "Encounter"] {
        let res = cs["rest"][0]["resource"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["type"] == ty))
            .cloned()
            .unwrap_or_default();
        assert!(
            res["operation"]
                .as_array()
                .is_some_and(|ops| ops.iter().any(|o| {
                    o["name"] == "everything"
                        && o["definition"]
                            == format!("http://hl7.org/fhir/OperationDefinition/{ty}-everything")
                })),
            "{ty} lists $everything"
        );
    }
}

backend_tests!(synthea_everything, errors_and_fixture);
