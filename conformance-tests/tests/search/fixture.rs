//! The hand-made fixture of the search suite, loaded by one transaction with fixed ids (PUT), and
//! the checking helpers every area uses.
//!
//! | id | what |
//! |---|---|
//! | org1 | Organization "Acme Health" (alias "Acme, Inc."), ACME |
//! | org2 | Organization "Beta Clinic", BETA, partOf org1 |
//! | pr1, pr2 | Practitioner Kildare James (NPI 1111111111), Welby Marcus (NPI 2222222222) |
//! | p1 | Patient Smith Anna Maria, female, 1970-01-01, org1, GP pr1, mrn m1 + MR-typed 123-45, tag vip, profile, security R, source a, narrative "gardening", active, Boston |
//! | p2 | Patient Smithson Bob, male, 1980-06-15, org1, GP pr1, mrn m2, inactive, Springfield, source b, narrative "chess" |
//! | p3 | Patient Jones Carla, female, 1990-12-31, org2, GP pr2, mrn m3 and `a,b\|c$d`, active, Springfield |
//! | p4 | Patient Müller Dieter, other, 2000-02-29, tag test, mrn m4 |
//! | p5 | Patient Zhang Wei, no gender, born 1985 (year only), nothing else |
//! | e1 | Encounter p1 AMB finished 2020-03-04T09:00Z–11:00Z, org1, pr1 |
//! | e2 | Encounter p2 IMP in-progress from 2021-05-01T08:00Z (no end), org2, pr2 |
//! | e3 | Encounter p3 AMB finished 2019-11-20 (a day), org2 |
//! | o1 | Observation p1 vital-signs 29463-7 weight 70 kg, 2020-03-04T10:00:00Z, e1, pr1 |
//! | o2 | Observation p1 vital-signs 8302-2 height 165 cm, 2020-03-04T10:30:00+02:00, e1 |
//! | o3 | Observation p2 laboratory 2339-0 glucose 5.4 mmol/L, 2020-03-15 |
//! | o4 | Observation p2 laboratory 2339-0 glucose 5.449 mmol/L, period 2020-01-01..2020-06-30 |
//! | o5 | Observation p3 laboratory 2339-0 glucose 5.45 mmol/L, 2021-07-01T00:00:00-05:00 |
//! | o6 | Observation p3 laboratory 2339-0 glucose 5.35 mmol/L, 2019-12-31T23:30:00-02:00 |
//! | o7 | Observation p4 preliminary vital-signs 85354-9 BP 120/80 (components), 2021-01-01 |
//! | o8 | Observation p4 amended vital-signs 85354-9 BP 150/95 (components), 2021-02-01T12:00:00Z |
//! | o9 | Observation p5 social-history 72166-2 smoking, value SNOMED 266919005, no date |
//! | o10 | Observation p2 (reference also carries identifier mrn m2) 8867-4 heart rate 72 /min, 2022-01-01T00:00:00Z, no category |
//! | c1 | Condition p1 SNOMED 44054006 "Type 2 diabetes", active, onset 2015-06, e1 |
//! | c2 | Condition p3 SNOMED 38341003 "High blood pressure", resolved, onset 2018 |
//! | c3 | Condition p4 ICD-10-CM E11.9 (display only), active, no onset |
//! | med1 | Medication RxNorm 197361 amlodipine |
//! | mr1 | MedicationRequest p1 metformin (RxNorm 860975) active, pr1, 2020-03-04, e1 |
//! | mr2 | MedicationRequest p3 med1 completed, pr2, 2019-01-01 |
//! | ra1, ra2, ra3 | RiskAssessment p1 0.8, p2 0.25, p3 0.5 |
//! | g1 | Group "Cohort A" members p1, p2 |
//! | l1 | List "Follow-up" subject p1, items o1, o3 |
//! | vs1, vs2, vs3 | ValueSet url …/ValueSet/vitals, …/ValueSet/vitals/bp, http://acme.org/ValueSet/labs |

use kiln_conformance_tests::{entries, link, TestServer};
use serde_json::{json, Value};

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const MRN: &str = "http://example.org/mrn";
pub const NPI: &str = "http://hl7.org/fhir/sid/us-npi";

fn obs_category(code: &str) -> Value {
    json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": code}]}])
}

fn loinc(code: &str, display: &str) -> Value {
    json!({"coding": [{"system": LOINC, "code": code, "display": display}], "text": display})
}

fn qty(value: f64, code: &str) -> Value {
    json!({"value": value, "unit": code, "system": UCUM, "code": code})
}

fn narrative(text: &str) -> Value {
    json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")})
}

/// Every fixture resource (each has its id set).
pub fn resources() -> Vec<Value> {
    let glucose = |id: &str, subject: &str, value: f64, effective: (&str, Value)| {
        let mut o = json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "category": obs_category("laboratory"),
            "code": loinc("2339-0", "Glucose"),
            "subject": {"reference": format!("Patient/{subject}")},
            "valueQuantity": qty(value, "mmol/L")
        });
        o[effective.0] = effective.1;
        o
    };
    let bp = |id: &str, status: &str, date: &str, sys: f64, dia: f64| {
        json!({
            "resourceType": "Observation", "id": id, "status": status,
            "category": obs_category("vital-signs"),
            "code": loinc("85354-9", "Blood pressure panel"),
            "subject": {"reference": "Patient/p4"},
            "effectiveDateTime": date,
            "component": [
                {"code": loinc("8480-6", "Systolic blood pressure"), "valueQuantity": qty(sys, "mm[Hg]")},
                {"code": loinc("8462-4", "Diastolic blood pressure"), "valueQuantity": qty(dia, "mm[Hg]")}
            ]
        })
    };
    vec![
        json!({"resourceType": "Organization", "id": "org1", "active": true, "name": "Acme Health",
            "alias": ["Acme, Inc."],
            "identifier": [{"system": "http://example.org/org", "value": "ACME"}],
            "address": [{"city": "Boston"}]}),
        json!({"resourceType": "Organization", "id": "org2", "active": true, "name": "Beta Clinic",
            "identifier": [{"system": "http://example.org/org", "value": "BETA"}],
            "partOf": {"reference": "Organization/org1"}}),
        json!({"resourceType": "Practitioner", "id": "pr1",
            "identifier": [{"system": NPI, "value": "1111111111"}],
            "name": [{"family": "Kildare", "given": ["James"]}]}),
        json!({"resourceType": "Practitioner", "id": "pr2",
            "identifier": [{"system": NPI, "value": "2222222222"}],
            "name": [{"family": "Welby", "given": ["Marcus"]}]}),
        json!({"resourceType": "Patient", "id": "p1",
            "meta": {
                "tag": [{"system": "http://example.org/tags", "code": "vip"}],
                "profile": ["http://example.org/StructureDefinition/vip-patient"],
                "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                "source": "http://example.org/source-a"
            },
            "text": narrative("Anna Smith enjoys gardening"),
            "identifier": [
                {"system": MRN, "value": "m1"},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                 "system": "http://example.org/ssn", "value": "123-45"}
            ],
            "active": true,
            "name": [{"family": "Smith", "given": ["Anna", "Maria"]}],
            "telecom": [{"system": "phone", "value": "555-0101"}, {"system": "email", "value": "anna@example.org"}],
            "gender": "female", "birthDate": "1970-01-01",
            "address": [{"city": "Boston", "postalCode": "02101"}],
            "generalPractitioner": [{"reference": "Practitioner/pr1"}],
            "managingOrganization": {"reference": "Organization/org1"}}),
        json!({"resourceType": "Patient", "id": "p2",
            "meta": {"source": "http://example.org/source-b"},
            "text": narrative("Bob plays chess"),
            "identifier": [{"system": MRN, "value": "m2"}],
            "active": false,
            "name": [{"family": "Smithson", "given": ["Bob"]}],
            "telecom": [{"system": "phone", "value": "555-0102"}],
            "gender": "male", "birthDate": "1980-06-15",
            "address": [{"city": "Springfield"}],
            "generalPractitioner": [{"reference": "Practitioner/pr1"}],
            "managingOrganization": {"reference": "Organization/org1"}}),
        json!({"resourceType": "Patient", "id": "p3",
            "identifier": [{"system": MRN, "value": "m3"}, {"system": MRN, "value": "a,b|c$d"}],
            "active": true,
            "name": [{"family": "Jones", "given": ["Carla"]}],
            "gender": "female", "birthDate": "1990-12-31",
            "address": [{"city": "Springfield"}],
            "generalPractitioner": [{"reference": "Practitioner/pr2"}],
            "managingOrganization": {"reference": "Organization/org2"}}),
        json!({"resourceType": "Patient", "id": "p4",
            "meta": {"tag": [{"system": "http://example.org/tags", "code": "test"}]},
            "identifier": [{"system": MRN, "value": "m4"}],
            "name": [{"family": "Müller", "given": ["Dieter"]}],
            "gender": "other", "birthDate": "2000-02-29"}),
        json!({"resourceType": "Patient", "id": "p5",
            "name": [{"family": "Zhang", "given": ["Wei"]}],
            "birthDate": "1985"}),
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/p1"},
            "participant": [{"individual": {"reference": "Practitioner/pr1"}}],
            "period": {"start": "2020-03-04T09:00:00Z", "end": "2020-03-04T11:00:00Z"},
            "serviceProvider": {"reference": "Organization/org1"}}),
        json!({"resourceType": "Encounter", "id": "e2", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": "Patient/p2"},
            "participant": [{"individual": {"reference": "Practitioner/pr2"}}],
            "period": {"start": "2021-05-01T08:00:00Z"},
            "serviceProvider": {"reference": "Organization/org2"}}),
        json!({"resourceType": "Encounter", "id": "e3", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/p3"},
            "period": {"start": "2019-11-20", "end": "2019-11-20"},
            "serviceProvider": {"reference": "Organization/org2"}}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "category": obs_category("vital-signs"),
            "code": loinc("29463-7", "Body weight"),
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "performer": [{"reference": "Practitioner/pr1"}],
            "effectiveDateTime": "2020-03-04T10:00:00Z",
            "valueQuantity": qty(70.0, "kg")}),
        json!({"resourceType": "Observation", "id": "o2", "status": "final",
            "category": obs_category("vital-signs"),
            "code": loinc("8302-2", "Body height"),
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "effectiveDateTime": "2020-03-04T10:30:00+02:00",
            "valueQuantity": qty(165.0, "cm")}),
        glucose("o3", "p2", 5.4, ("effectiveDateTime", json!("2020-03-15"))),
        glucose(
            "o4",
            "p2",
            5.449,
            (
                "effectivePeriod",
                json!({"start": "2020-01-01", "end": "2020-06-30"}),
            ),
        ),
        glucose(
            "o5",
            "p3",
            5.45,
            ("effectiveDateTime", json!("2021-07-01T00:00:00-05:00")),
        ),
        glucose(
            "o6",
            "p3",
            5.35,
            ("effectiveDateTime", json!("2019-12-31T23:30:00-02:00")),
        ),
        bp("o7", "preliminary", "2021-01-01", 120.0, 80.0),
        bp("o8", "amended", "2021-02-01T12:00:00Z", 150.0, 95.0),
        json!({"resourceType": "Observation", "id": "o9", "status": "final",
            "category": obs_category("social-history"),
            "code": {"coding": [{"system": LOINC, "code": "72166-2", "display": "Tobacco smoking status"}], "text": "Smoking status"},
            "subject": {"reference": "Patient/p5"},
            "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "266919005", "display": "Never smoked tobacco"}]}}),
        json!({"resourceType": "Observation", "id": "o10", "status": "final",
            "code": loinc("8867-4", "Heart rate"),
            "subject": {"reference": "Patient/p2", "identifier": {"system": MRN, "value": "m2"}},
            "effectiveDateTime": "2022-01-01T00:00:00Z",
            "valueQuantity": qty(72.0, "/min")}),
        json!({"resourceType": "Condition", "id": "c1",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": SNOMED, "code": "44054006", "display": "Diabetes mellitus type 2"}], "text": "Type 2 diabetes"},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "onsetDateTime": "2015-06",
            "recordedDate": "2020-03-04"}),
        json!({"resourceType": "Condition", "id": "c2",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
            "code": {"coding": [{"system": SNOMED, "code": "38341003", "display": "Hypertensive disorder"}], "text": "High blood pressure"},
            "subject": {"reference": "Patient/p3"},
            "onsetDateTime": "2018"}),
        json!({"resourceType": "Condition", "id": "c3",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9", "display": "Type 2 diabetes mellitus without complications"}]},
            "subject": {"reference": "Patient/p4"}}),
        json!({"resourceType": "Medication", "id": "med1",
            "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361", "display": "Amlodipine 5 MG Oral Tablet"}]}}),
        json!({"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975", "display": "metformin"}]},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "authoredOn": "2020-03-04",
            "requester": {"reference": "Practitioner/pr1"},
            "reasonReference": [{"reference": "Condition/c1"}]}),
        json!({"resourceType": "MedicationRequest", "id": "mr2", "status": "completed", "intent": "order",
            "medicationReference": {"reference": "Medication/med1"},
            "subject": {"reference": "Patient/p3"},
            "authoredOn": "2019-01-01",
            "requester": {"reference": "Practitioner/pr2"},
            "reasonReference": [{"reference": "Condition/c2"}]}),
        json!({"resourceType": "RiskAssessment", "id": "ra1", "status": "final",
            "subject": {"reference": "Patient/p1"}, "prediction": [{"probabilityDecimal": 0.8}]}),
        json!({"resourceType": "RiskAssessment", "id": "ra2", "status": "final",
            "subject": {"reference": "Patient/p2"}, "prediction": [{"probabilityDecimal": 0.25}]}),
        json!({"resourceType": "RiskAssessment", "id": "ra3", "status": "final",
            "subject": {"reference": "Patient/p3"}, "prediction": [{"probabilityDecimal": 0.5}]}),
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true, "name": "Cohort A",
            "member": [{"entity": {"reference": "Patient/p1"}}, {"entity": {"reference": "Patient/p2"}}]}),
        json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working", "title": "Follow-up",
            "subject": {"reference": "Patient/p1"},
            "entry": [{"item": {"reference": "Observation/o1"}}, {"item": {"reference": "Observation/o3"}}]}),
        json!({"resourceType": "ValueSet", "id": "vs1", "status": "active",
            "url": "http://example.org/fhir/ValueSet/vitals", "name": "Vitals"}),
        json!({"resourceType": "ValueSet", "id": "vs2", "status": "draft",
            "url": "http://example.org/fhir/ValueSet/vitals/bp", "name": "BloodPressure"}),
        json!({"resourceType": "ValueSet", "id": "vs3", "status": "active",
            "url": "http://acme.org/ValueSet/labs", "name": "Labs"}),
    ]
}

/// Loads the fixture with one transaction (PUT with the fixed ids).
pub async fn load(srv: &TestServer) {
    let entries: Vec<Value> = resources()
        .into_iter()
        .map(|r| {
            let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            json!({"fullUrl": srv.url(&url), "resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    let n = entries.len();
    let r = srv
        .post_json(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .await;
    r.assert_status(200);
    let b = r.json();
    assert_eq!(b["type"], "transaction-response", "{b}");
    assert_eq!(b["entry"].as_array().map(Vec::len), Some(n), "{b}");
}

/// Percent-encodes the names and values of a raw query (`a=b&c=d`) so that `+`, `|`, `$`, `\`,
/// spaces and non-ASCII characters reach the server as written.
pub fn encode_query(raw: &str) -> String {
    fn enc(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z'
                | b'a'..=b'z'
                | b'0'..=b'9'
                | b'-'
                | b'_'
                | b'.'
                | b'~'
                | b':'
                | b'/' => out.push(b as char),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => format!("{}={}", enc(k), enc(v)),
            None => enc(p),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `path?query` with the query encoded by [`encode_query`].
pub fn url_of(path_and_query: &str) -> String {
    match path_and_query.split_once('?') {
        Some((p, q)) => format!("{p}?{}", encode_query(q)),
        None => path_and_query.to_string(),
    }
}

/// Ids of the `match` entries, in Bundle order.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    mode_ids(bundle, "match")
}

/// `Type/id` of the entries with the given search mode, in Bundle order.
pub fn mode_refs(bundle: &Value, mode: &str) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap_or("?"),
                e["resource"]["id"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

pub fn mode_ids(bundle: &Value, mode: &str) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect()
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs many checks against one server and reports every failure at the end (so one run shows
/// all disagreements of an area, not just the first).
pub struct Checker<'a> {
    pub srv: &'a TestServer,
    area: &'static str,
    checks: usize,
    failures: Vec<String>,
}

impl<'a> Checker<'a> {
    pub fn new(srv: &'a TestServer, area: &'static str) -> Checker<'a> {
        Checker {
            srv,
            area,
            checks: 0,
            failures: Vec::new(),
        }
    }

    /// Records one check.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.failures.push(what());
        }
    }

    /// GETs a search (query encoded) and returns the searchset Bundle, or records a failure.
    pub async fn search(&mut self, q: &str) -> Option<Value> {
        let r = self.srv.get(&url_of(q)).await;
        if r.status != 200 {
            self.failures
                .push(format!("{q}: HTTP {} {}", r.status, r.text()));
            self.checks += 1;
            return None;
        }
        let b = r.json();
        if b["resourceType"] != "Bundle" || b["type"] != "searchset" || link(&b, "self").is_none() {
            self.failures
                .push(format!("{q}: not a searchset Bundle with a self link: {b}"));
            self.checks += 1;
            return None;
        }
        Some(b)
    }

    /// The match ids of `q` are exactly `want` (as a set).
    pub async fn set(&mut self, q: &str, want: &[&str]) {
        if let Some(b) = self.search(q).await {
            let got = sorted(&match_ids(&b));
            let want = sorted(&strs(want));
            self.check(got == want, || {
                format!("{q}: expected {want:?}, got {got:?}")
            });
        }
    }

    /// The match ids of `q` are exactly `want`, in this order.
    pub async fn ordered(&mut self, q: &str, want: &[&str]) {
        if let Some(b) = self.search(q).await {
            let got = match_ids(&b);
            let want = strs(want);
            self.check(got == want, || {
                format!("{q}: expected (in order) {want:?}, got {got:?}")
            });
        }
    }

    /// The match ids are `matches` and the include entries (`Type/id`) are `includes` (sets).
    pub async fn with_includes(&mut self, q: &str, matches: &[&str], includes: &[&str]) {
        if let Some(b) = self.search(q).await {
            let got = sorted(&match_ids(&b));
            let want = sorted(&strs(matches));
            self.check(got == want, || {
                format!("{q}: expected matches {want:?}, got {got:?}")
            });
            let got = sorted(&mode_refs(&b, "include"));
            let want = sorted(&strs(includes));
            self.check(got == want, || {
                format!("{q}: expected includes {want:?}, got {got:?}")
            });
            let other: Vec<String> = entries(&b)
                .iter()
                .filter(|e| !matches!(e["search"]["mode"].as_str(), Some("match" | "include")))
                .map(|e| e.to_string())
                .collect();
            self.check(other.is_empty(), || {
                format!("{q}: entries neither match nor include: {other:?}")
            });
        }
    }

    /// `q` is answered with `status` and an OperationOutcome whose diagnostics/expression
    /// mention every string of `mentions`.
    pub async fn error(
        &mut self,
        q: &str,
        headers: &[(&str, &str)],
        status: u16,
        mentions: &[&str],
    ) {
        let r = self.srv.get_with(&url_of(q), headers).await;
        if r.status != status {
            self.check(false, || {
                format!("{q}: expected HTTP {status}, got {} {}", r.status, r.text())
            });
            return;
        }
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let issues = v["issue"].as_array().cloned().unwrap_or_default();
        let has_error = v["resourceType"] == "OperationOutcome"
            && issues
                .iter()
                .any(|i| matches!(i["severity"].as_str(), Some("error" | "fatal")));
        self.check(has_error, || {
            format!("{q}: expected an OperationOutcome with an error, got {v}")
        });
        let text: String = issues
            .iter()
            .map(|i| format!("{} {} ", i["diagnostics"], i["expression"]))
            .collect();
        for m in mentions {
            self.check(text.contains(m), || {
                format!("{q}: OperationOutcome does not mention '{m}': {v}")
            });
        }
    }

    /// Prints the count and fails with every recorded failure.
    pub fn finish(self) {
        println!(
            "search suite [{}] on {:?}: {} checks, {} failed",
            self.area,
            self.srv.backend,
            self.checks,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} checks failed in [{}] on {:?}:\n  {}",
            self.failures.len(),
            self.checks,
            self.area,
            self.srv.backend,
            self.failures.join("\n  ")
        );
    }
}
