//! Parameter types, prefixes, modifiers, OR/AND and escaping against the fixture
//! (see `fixture.rs` for the data the expected sets come from).

use kiln_conformance_tests::{backend_tests, TestServer};

use super::fixture::{load, Checker};

backend_tests!(
    string_parameters,
    token_parameters,
    reference_parameters,
    date_parameters,
    number_parameters,
    quantity_parameters,
    uri_parameters,
    composite_parameters,
    common_parameters,
);

async fn string_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "string");
    // default: case-insensitive starts-with over family / given / text of the name
    c.set("Patient?family=smith", &["p1", "p2"]).await;
    c.set("Patient?family=SMITHS", &["p2"]).await;
    c.set("Patient?family:exact=Smith", &["p1"]).await;
    c.set("Patient?family:exact=smith", &[]).await;
    c.set("Patient?family:contains=mith", &["p1", "p2"]).await;
    c.set("Patient?family:contains=ONE", &["p3"]).await;
    // accent- and case-folded
    c.set("Patient?family=muller", &["p4"]).await;
    c.set("Patient?family=MÜLLER", &["p4"]).await;
    c.set("Patient?family:exact=Müller", &["p4"]).await;
    c.set("Patient?family:exact=Muller", &[]).await;
    c.set("Patient?name=anna", &["p1"]).await;
    c.set("Patient?name=maria", &["p1"]).await;
    c.set("Patient?given=bob,carla", &["p2", "p3"]).await;
    c.set("Patient?family=smith&given=bob", &["p2"]).await;
    c.set("Patient?family=smith&family=smithson", &["p2"]).await;
    c.set("Patient?address-city=springfield", &["p2", "p3"])
        .await;
    c.set("Patient?address-postalcode=021", &["p1"]).await;
    c.set("Patient?family:missing=true", &[]).await;
    c.set(
        "Patient?family:missing=false",
        &["p1", "p2", "p3", "p4", "p5"],
    )
    .await;
    c.set("Patient?address-city:missing=true", &["p4", "p5"])
        .await;
    c.set("Organization?name=acme", &["org1"]).await;
    // Organization.name | Organization.alias; an escaped comma is part of the value
    c.set("Organization?name:exact=Acme\\, Inc.", &["org1"])
        .await;
    c.set("Organization?name:exact=Acme", &[]).await;
    c.set("Organization?name=Acme\\, Inc,Beta", &["org1", "org2"])
        .await;
    c.set("Practitioner?name=kil", &["pr1"]).await;
    c.set("Practitioner?family=welby&given=marc", &["pr2"])
        .await;
    c.set("Patient?family=nobody", &[]).await;
    c.finish();
}

async fn token_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "token");
    c.set("Patient?gender=female", &["p1", "p3"]).await;
    c.set("Patient?gender=female,male", &["p1", "p2", "p3"])
        .await;
    // :not includes resources without a value (search.html#token)
    c.set("Patient?gender:not=female", &["p2", "p4", "p5"])
        .await;
    c.set("Patient?gender:missing=true", &["p5"]).await;
    c.set("Patient?gender:missing=false", &["p1", "p2", "p3", "p4"])
        .await;
    c.set("Patient?identifier=http://example.org/mrn|m1", &["p1"])
        .await;
    c.set("Patient?identifier=m2", &["p2"]).await;
    c.set(
        "Patient?identifier=http://example.org/mrn|",
        &["p1", "p2", "p3", "p4"],
    )
    .await;
    c.set("Patient?identifier=|m1", &[]).await;
    c.set("Patient?identifier=http://other.org|m1", &[]).await;
    // escaping: \, \| \$ inside a token value
    c.set(
        "Patient?identifier=http://example.org/mrn|a\\,b\\|c\\$d",
        &["p3"],
    )
    .await;
    c.set("Patient?identifier=a\\,b\\|c\\$d,m4", &["p3", "p4"])
        .await;
    c.set("Patient?identifier=a,b", &[]).await;
    c.set(
        "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|123-45",
        &["p1"],
    )
    .await;
    c.set(
        "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|m1",
        &[],
    )
    .await;
    c.set("Patient?active=true", &["p1", "p3"]).await;
    c.set("Patient?active=false", &["p2"]).await;
    c.set("Patient?active:missing=true", &["p4", "p5"]).await;
    c.set("Patient?telecom=555-0101", &["p1"]).await;
    c.set("Patient?email=anna@example.org", &["p1"]).await;
    c.set(
        "Observation?code=http://loinc.org|2339-0",
        &["o3", "o4", "o5", "o6"],
    )
    .await;
    c.set(
        "Observation?code=2339-0,8867-4",
        &["o3", "o4", "o5", "o6", "o10"],
    )
    .await;
    c.set("Observation?code=http://snomed.info/sct|2339-0", &[])
        .await;
    c.set("Observation?code:text=glucose", &["o3", "o4", "o5", "o6"])
        .await;
    c.set("Observation?code:text=body", &["o1", "o2"]).await;
    c.set("Observation?code:text=smoking", &["o9"]).await;
    c.set("Condition?code:text=diabetes", &["c1", "c3"]).await;
    c.set("Condition?code:text=pressure", &["c2"]).await;
    c.set("Condition?code:text=hypertensive", &["c2"]).await;
    c.set(
        "Observation?status=final",
        &["o1", "o2", "o3", "o4", "o5", "o6", "o9", "o10"],
    )
    .await;
    c.set("Observation?status:not=final", &["o7", "o8"]).await;
    c.set("Observation?status:not=final&status:not=amended", &["o7"])
        .await;
    c.set(
        "Observation?category=vital-signs",
        &["o1", "o2", "o7", "o8"],
    )
    .await;
    c.set(
        "Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory&status=final",
        &["o3", "o4", "o5", "o6"],
    )
    .await;
    c.set("Observation?category:missing=true", &["o10"]).await;
    c.set(
        "Observation?value-concept=http://snomed.info/sct|266919005",
        &["o9"],
    )
    .await;
    c.set("Condition?clinical-status=active", &["c1", "c3"])
        .await;
    c.set(
        "Condition?code=http://hl7.org/fhir/sid/icd-10-cm|E11.9",
        &["c3"],
    )
    .await;
    c.set("Condition?code=|44054006", &[]).await;
    c.set("Encounter?class=AMB", &["e1", "e3"]).await;
    c.set("Encounter?status=in-progress", &["e2"]).await;
    c.set(
        "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|2222222222",
        &["pr2"],
    )
    .await;
    c.finish();
}

async fn reference_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "reference");
    c.set("Observation?subject=Patient/p1", &["o1", "o2"]).await;
    c.set("Observation?subject=p1", &["o1", "o2"]).await;
    c.set("Observation?subject:Patient=p2", &["o3", "o4", "o10"])
        .await;
    c.set("Observation?subject:Group=p2", &[]).await;
    c.set("Observation?patient=p3", &["o5", "o6"]).await;
    c.set(
        "Observation?patient=Patient/p3,Patient/p5",
        &["o5", "o6", "o9"],
    )
    .await;
    // an absolute URL on this server's base is the same reference
    c.set(
        &format!("Observation?subject={}/Patient/p1", srv.base),
        &["o1", "o2"],
    )
    .await;
    c.set(
        "Observation?subject=http://elsewhere.org/fhir/Patient/p1",
        &[],
    )
    .await;
    c.set(
        "Observation?subject:identifier=http://example.org/mrn|m2",
        &["o10"],
    )
    .await;
    c.set("Observation?subject:identifier=m2", &["o10"]).await;
    c.set("Observation?encounter=Encounter/e1", &["o1", "o2"])
        .await;
    c.set("Observation?performer=Practitioner/pr1", &["o1"])
        .await;
    c.set(
        "Encounter?service-provider=Organization/org2",
        &["e2", "e3"],
    )
    .await;
    c.set("Encounter?participant=pr2", &["e2"]).await;
    c.set("Patient?organization=org1", &["p1", "p2"]).await;
    c.set(
        "Patient?general-practitioner=Practitioner/pr1",
        &["p1", "p2"],
    )
    .await;
    c.set("Patient?general-practitioner:missing=true", &["p4", "p5"])
        .await;
    c.set("MedicationRequest?medication=Medication/med1", &["mr2"])
        .await;
    c.set("MedicationRequest?requester=Practitioner/pr1", &["mr1"])
        .await;
    c.set("List?item=Observation/o1", &["l1"]).await;
    c.set("Group?member=p1", &["g1"]).await;
    c.set("Organization?partof=org1", &["org2"]).await;
    c.set("Organization?partof:missing=true", &["org1"]).await;
    c.finish();
}

async fn date_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "date");
    // birthDate: p1 1970-01-01, p2 1980-06-15, p3 1990-12-31, p4 2000-02-29, p5 1985 (a year)
    c.set("Patient?birthdate=1970", &["p1"]).await;
    c.set("Patient?birthdate=1970-01", &["p1"]).await;
    c.set("Patient?birthdate=1985", &["p5"]).await;
    c.set("Patient?birthdate=1985-06", &[]).await;
    c.set("Patient?birthdate=eq1980-06-15", &["p2"]).await;
    c.set("Patient?birthdate=ne1980-06-15", &["p1", "p3", "p4", "p5"])
        .await;
    c.set("Patient?birthdate=gt1985", &["p3", "p4"]).await;
    c.set("Patient?birthdate=ge1985", &["p3", "p4", "p5"]).await;
    c.set("Patient?birthdate=lt1985", &["p1", "p2"]).await;
    c.set("Patient?birthdate=le1985", &["p1", "p2", "p5"]).await;
    // precision: a year-only birthDate overlaps both sides of a day inside it
    c.set("Patient?birthdate=lt1985-06-01", &["p1", "p2", "p5"])
        .await;
    c.set("Patient?birthdate=gt1985-06-01", &["p3", "p4", "p5"])
        .await;
    c.set("Patient?birthdate=sa1985-06-01", &["p3", "p4"]).await;
    c.set("Patient?birthdate=eb1985-06-01", &["p1", "p2"]).await;
    c.set("Patient?birthdate=sa1985", &["p3", "p4"]).await;
    c.set("Patient?birthdate=eb1985", &["p1", "p2"]).await;
    c.set(
        "Patient?birthdate=ge1980-01-01&birthdate=lt2000-01-01",
        &["p2", "p3", "p5"],
    )
    .await;
    c.set("Patient?birthdate=1970,1990", &["p1", "p3"]).await;
    // Observation.effective: o1 2020-03-04T10:00Z, o2 08:30Z, o3 2020-03-15, o4 2020-01-01..06-30,
    // o5 2021-07-01T05:00Z, o6 2020-01-01T01:30Z, o7 2021-01-01, o8 2021-02-01T12:00Z, o10 2022
    c.set("Observation?date=2020", &["o1", "o2", "o3", "o4", "o6"])
        .await;
    c.set("Observation?date=2020-03", &["o1", "o2", "o3"]).await;
    c.set("Observation?date=2020-03-04", &["o1", "o2"]).await;
    c.set("Observation?date=2020-03-04T10:00", &["o1"]).await;
    c.set("Observation?date=2020-03-04T10:00:00Z", &["o1"])
        .await;
    // timezones: 10:30+02:00 is 08:30Z
    c.set("Observation?date=2020-03-04T10:30:00+02:00", &["o2"])
        .await;
    c.set("Observation?date=2020-03-04T08:30:00Z", &["o2"])
        .await;
    c.set("Observation?date=2020-03-04T10:00:00+02:00", &[])
        .await;
    c.set("Observation?date=2021-07-01T05:00:00Z", &["o5"])
        .await;
    c.set("Observation?date=lt2020-01-01T02:00:00Z", &["o4", "o6"])
        .await;
    c.set("Observation?date=ge2021", &["o5", "o7", "o8", "o10"])
        .await;
    c.set(
        "Observation?date=gt2020-06-15",
        &["o4", "o5", "o7", "o8", "o10"],
    )
    .await;
    c.set("Observation?date=sa2020-06-15", &["o5", "o7", "o8", "o10"])
        .await;
    c.set("Observation?date=eb2020-03-05", &["o1", "o2", "o6"])
        .await;
    c.set("Observation?date=le2020-03-04", &["o1", "o2", "o4", "o6"])
        .await;
    c.set("Observation?date=ne2020", &["o5", "o7", "o8", "o10"])
        .await;
    c.set("Observation?date:missing=true", &["o9"]).await;
    c.set(
        "Observation?date=ge2020-03-01&date=lt2020-04",
        &["o1", "o2", "o3", "o4"],
    )
    .await;
    // periods: e1 2020-03-04 09:00–11:00Z, e2 from 2021-05-01T08:00Z (open), e3 2019-11-20
    c.set("Encounter?date=2020-03-04", &["e1"]).await;
    c.set("Encounter?date=ge2021", &["e2"]).await;
    c.set("Encounter?date=lt2020", &["e3"]).await;
    c.set("Encounter?date=gt2030", &["e2"]).await;
    c.set("Encounter?date=2021", &[]).await;
    // ap: within 10 % of the distance to now; 2000-02-29 is far enough from the other
    // birth dates that the answer does not change for decades
    c.set("Patient?birthdate=ap2000-02-29", &["p4"]).await;
    c.set("Condition?onset-date=2015", &["c1"]).await;
    c.set("Condition?onset-date=2015-06-15", &[]).await;
    c.set("Condition?onset-date=lt2016", &["c1"]).await;
    c.set("Condition?onset-date=ge2018", &["c2"]).await;
    c.set("MedicationRequest?authoredon=2020-03-04", &["mr1"])
        .await;
    c.finish();
}

async fn number_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "number");
    // probabilities: ra1 0.8, ra2 0.25, ra3 0.5
    c.set("RiskAssessment?probability=0.8", &["ra1"]).await;
    c.set("RiskAssessment?probability=0.5", &["ra3"]).await;
    c.set("RiskAssessment?probability=0.25", &["ra2"]).await;
    // the precision of the search value: 1 means [0.5, 1.5)
    c.set("RiskAssessment?probability=1", &["ra1", "ra3"]).await;
    c.set("RiskAssessment?probability=0.83", &[]).await;
    c.set("RiskAssessment?probability=eq0.80", &["ra1"]).await;
    c.set("RiskAssessment?probability=ne0.5", &["ra1", "ra2"])
        .await;
    c.set("RiskAssessment?probability=gt0.3", &["ra1", "ra3"])
        .await;
    c.set("RiskAssessment?probability=lt0.5", &["ra2"]).await;
    c.set("RiskAssessment?probability=le0.5", &["ra2", "ra3"])
        .await;
    c.set("RiskAssessment?probability=ge0.5", &["ra1", "ra3"])
        .await;
    c.set("RiskAssessment?probability=sa0.5", &["ra1"]).await;
    c.set("RiskAssessment?probability=eb0.5", &["ra2"]).await;
    c.set("RiskAssessment?probability=ap0.5", &["ra3"]).await;
    c.set("RiskAssessment?probability=0.25,0.8", &["ra1", "ra2"])
        .await;
    c.set(
        "RiskAssessment?probability=gt0.2&probability=lt0.6",
        &["ra2", "ra3"],
    )
    .await;
    c.finish();
}

async fn quantity_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "quantity");
    // glucose: o3 5.4, o4 5.449, o5 5.45, o6 5.35 mmol/L; o1 70 kg, o2 165 cm, o10 72 /min
    // 5.4 means [5.35, 5.45)
    c.set("Observation?value-quantity=5.4", &["o3", "o4", "o6"])
        .await;
    c.set(
        "Observation?value-quantity=5.4|http://unitsofmeasure.org|mmol/L",
        &["o3", "o4", "o6"],
    )
    .await;
    c.set(
        "Observation?value-quantity=5.4||mmol/L",
        &["o3", "o4", "o6"],
    )
    .await;
    c.set("Observation?value-quantity=5.4||kg", &[]).await;
    c.set("Observation?value-quantity=5.40", &["o3"]).await;
    c.set(
        "Observation?value-quantity=gt5.42",
        &["o1", "o2", "o4", "o5", "o10"],
    )
    .await;
    c.set(
        "Observation?value-quantity=gt5.42|http://unitsofmeasure.org|mmol/L",
        &["o4", "o5"],
    )
    .await;
    c.set("Observation?value-quantity=lt5.38||mmol/L", &["o6"])
        .await;
    c.set("Observation?value-quantity=le5.40||mmol/L", &["o3", "o6"])
        .await;
    c.set("Observation?value-quantity=ge5.449||mmol/L", &["o4", "o5"])
        .await;
    c.set("Observation?value-quantity=ne5.4||mmol/L", &["o5"])
        .await;
    c.set("Observation?value-quantity=sa5.40||mmol/L", &["o4", "o5"])
        .await;
    c.set("Observation?value-quantity=eb5.40||mmol/L", &["o6"])
        .await;
    c.set("Observation?value-quantity=ap70||kg", &["o1"]).await;
    c.set(
        "Observation?value-quantity=70|http://unitsofmeasure.org|kg",
        &["o1"],
    )
    .await;
    // UCUM canonical units: 70 kg = 70000 g, 165 cm = 1.65 m
    c.set(
        "Observation?value-quantity=70000|http://unitsofmeasure.org|g",
        &["o1"],
    )
    .await;
    c.set(
        "Observation?value-quantity=1.65|http://unitsofmeasure.org|m",
        &["o2"],
    )
    .await;
    c.set(
        "Observation?value-quantity:missing=true",
        &["o7", "o8", "o9"],
    )
    .await;
    c.set("Observation?component-value-quantity=gt140", &["o8"])
        .await;
    c.set("Observation?component-value-quantity=80", &["o7"])
        .await;
    c.set(
        "Observation?value-quantity=5.35||mmol/L,72||/min",
        &["o6", "o10"],
    )
    .await;
    c.finish();
}

async fn uri_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "uri");
    c.set(
        "ValueSet?url=http://example.org/fhir/ValueSet/vitals",
        &["vs1"],
    )
    .await;
    c.set("ValueSet?url=http://example.org/fhir/ValueSet", &[])
        .await;
    c.set(
        "ValueSet?url:below=http://example.org/fhir/ValueSet/vitals",
        &["vs1", "vs2"],
    )
    .await;
    c.set(
        "ValueSet?url:below=http://example.org/fhir",
        &["vs1", "vs2"],
    )
    .await;
    c.set(
        "ValueSet?url:above=http://example.org/fhir/ValueSet/vitals/bp/extra",
        &["vs1", "vs2"],
    )
    .await;
    c.set(
        "ValueSet?url:above=http://example.org/fhir/ValueSet/vitals",
        &["vs1"],
    )
    .await;
    c.set(
        "ValueSet?url=http://acme.org/ValueSet/labs,http://example.org/fhir/ValueSet/vitals/bp",
        &["vs2", "vs3"],
    )
    .await;
    c.set("ValueSet?status=draft", &["vs2"]).await;
    c.set(
        "Patient?_profile=http://example.org/StructureDefinition/vip-patient",
        &["p1"],
    )
    .await;
    c.set("Patient?_source=http://example.org/source-b", &["p2"])
        .await;
    c.set("Patient?_source:missing=true", &["p3", "p4", "p5"])
        .await;
    c.finish();
}

async fn composite_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "composite");
    c.set(
        "Observation?code-value-quantity=http://loinc.org|2339-0$gt5.42",
        &["o4", "o5"],
    )
    .await;
    c.set(
        "Observation?code-value-quantity=2339-0$5.4",
        &["o3", "o4", "o6"],
    )
    .await;
    c.set("Observation?code-value-quantity=29463-7$5.4", &[])
        .await;
    c.set(
        "Observation?component-code-value-quantity=http://loinc.org|8480-6$gt130",
        &["o8"],
    )
    .await;
    // the components must match within the same component: 8462-4 (diastolic) is never > 100
    c.set(
        "Observation?component-code-value-quantity=http://loinc.org|8462-4$gt100",
        &[],
    )
    .await;
    c.set(
        "Observation?component-code-value-quantity=8480-6$lt130,8462-4$gt90",
        &["o7", "o8"],
    )
    .await;
    c.set(
        "Observation?code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|266919005",
        &["o9"],
    )
    .await;
    c.set(
        "Observation?combo-code-value-quantity=8480-6$150,29463-7$70",
        &["o1", "o8"],
    )
    .await;
    c.set("Observation?code-value-date=85354-9$2021-01-01", &[])
        .await;
    c.finish();
}

async fn common_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "common (_id, _lastUpdated, meta, _text, _content)");
    c.set("Patient?_id=p1,p3", &["p1", "p3"]).await;
    c.set("Patient?_id=o1", &[]).await;
    c.set(
        "Patient?_lastUpdated=gt2000-01-01",
        &["p1", "p2", "p3", "p4", "p5"],
    )
    .await;
    c.set("Patient?_lastUpdated=lt2000", &[]).await;
    c.set("Patient?_tag=http://example.org/tags|vip", &["p1"])
        .await;
    c.set("Patient?_tag=vip,test", &["p1", "p4"]).await;
    c.set(
        "Patient?_tag:not=http://example.org/tags|vip",
        &["p2", "p3", "p4", "p5"],
    )
    .await;
    c.set("Patient?_tag:missing=true", &["p2", "p3", "p5"])
        .await;
    c.set(
        "Patient?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R",
        &["p1"],
    )
    .await;
    c.set("Patient?_text=gardening", &["p1"]).await;
    c.set("Patient?_text=chess", &["p2"]).await;
    c.set("Patient?_content=chess", &["p2"]).await;
    c.set("Patient?_content=springfield", &["p2", "p3"]).await;
    c.set("Patient?_content=carla", &["p3"]).await;
    // _lastUpdated sees a later update (instants compared at full precision)
    let r = srv.get("Patient/p4").await;
    r.assert_status(200);
    let mut p4 = r.json();
    p4["active"] = serde_json::json!(true);
    let r = srv.put_json("Patient/p4", &p4).await;
    r.assert_status(200);
    let stamp = r.json()["meta"]["lastUpdated"]
        .as_str()
        .expect("meta.lastUpdated")
        .to_string();
    c.set(&format!("Patient?_lastUpdated=ge{stamp}"), &["p4"])
        .await;
    c.set(
        &format!("Patient?_lastUpdated=lt{stamp}"),
        &["p1", "p2", "p3", "p5"],
    )
    .await;
    c.set("Patient?active=true", &["p1", "p3", "p4"]).await;
    c.finish();
}
