//! Chains, reverse chains (`_has`), `_filter`, `_include` / `_revinclude` (`:iterate`, `*`),
//! system-level (`_type`) and compartment search against the fixture.

use kiln_conformance_tests::{backend_tests, entries, TestServer};

use super::fixture::{load, match_ids, mode_refs, Checker};

backend_tests!(
    chained_parameters,
    reverse_chains,
    filter_parameter,
    includes_and_revincludes,
    system_and_compartment_search,
);

async fn chained_parameters(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "chain");
    c.set(
        "Observation?subject:Patient.family=smith",
        &["o1", "o2", "o3", "o4", "o10"],
    )
    .await;
    c.set(
        "Observation?patient.gender=female",
        &["o1", "o2", "o5", "o6"],
    )
    .await;
    c.set("Observation?subject.birthdate=lt1975&code=29463-7", &["o1"])
        .await;
    // depth 2 and 3
    c.set(
        "Observation?subject:Patient.organization.name=Acme",
        &["o1", "o2", "o3", "o4", "o10"],
    )
    .await;
    c.set(
        "Observation?subject:Patient.organization.name=Beta",
        &["o5", "o6"],
    )
    .await;
    c.set(
        "Observation?subject:Patient.organization.partof.name=Acme",
        &["o5", "o6"],
    )
    .await;
    c.set(
        "Observation?subject:Patient.organization.identifier=http://example.org/org|BETA",
        &["o5", "o6"],
    )
    .await;
    c.set(
        "Encounter?subject.general-practitioner.family=welby",
        &["e3"],
    )
    .await;
    c.set(
        "MedicationRequest?requester:Practitioner.identifier=http://hl7.org/fhir/sid/us-npi|1111111111",
        &["mr1"],
    )
    .await;
    c.set(
        "Observation?encounter.service-provider.name=Acme",
        &["o1", "o2"],
    )
    .await;
    c.set(
        "Observation?encounter.class=AMB&patient.family=smith",
        &["o1", "o2"],
    )
    .await;
    // OR inside a chain, AND of two chains
    c.set(
        "Observation?patient.family=jones,zhang",
        &["o5", "o6", "o9"],
    )
    .await;
    c.set(
        "Observation?patient.family=smith&patient.gender=male",
        &["o3", "o4", "o10"],
    )
    .await;
    c.set("Condition?subject:Patient.family=nobody", &[]).await;
    c.finish();
}

async fn reverse_chains(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "_has");
    c.set(
        "Patient?_has:Observation:patient:code=2339-0",
        &["p2", "p3"],
    )
    .await;
    c.set(
        "Patient?_has:Observation:patient:code=2339-0&_has:Observation:patient:date=2021",
        &["p3"],
    )
    .await;
    c.set(
        "Patient?_has:Condition:subject:clinical-status=active",
        &["p1", "p4"],
    )
    .await;
    c.set(
        "Patient?_has:Observation:subject:value-quantity=gt100",
        &["p1"],
    )
    .await;
    c.set(
        "Organization?_has:Patient:organization:gender=male",
        &["org1"],
    )
    .await;
    // nested
    c.set(
        "Practitioner?_has:Patient:general-practitioner:_has:Observation:patient:code=2339-0",
        &["pr1", "pr2"],
    )
    .await;
    c.set(
        "Practitioner?_has:Patient:general-practitioner:_has:Observation:patient:code=29463-7",
        &["pr1"],
    )
    .await;
    c.set(
        "Organization?_has:Patient:organization:_has:Condition:subject:code=38341003",
        &["org2"],
    )
    .await;
    // _has combined with a chain inside
    c.set(
        "Patient?_has:Observation:patient:encounter.class=AMB",
        &["p1"],
    )
    .await;
    c.set("Patient?_has:Observation:patient:code=0000-0", &[])
        .await;
    c.finish();
}

async fn filter_parameter(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "_filter");
    c.set("Patient?_filter=family eq smith", &["p1"]).await;
    c.set("Patient?_filter=family sw smi", &["p1", "p2"]).await;
    c.set("Patient?_filter=family co ONE", &["p3"]).await;
    c.set("Patient?_filter=family ew son", &["p2"]).await;
    c.set("Patient?_filter=given eq \"Anna\"", &["p1"]).await;
    c.set(
        "Patient?_filter=gender eq female and birthdate lt 1980-01-01",
        &["p1"],
    )
    .await;
    c.set(
        "Patient?_filter=gender eq male or family eq Jones",
        &["p2", "p3"],
    )
    .await;
    c.set(
        "Patient?_filter=not (gender eq female)",
        &["p2", "p4", "p5"],
    )
    .await;
    c.set(
        "Patient?_filter=(family eq Smith or family eq Jones) and gender eq female",
        &["p1", "p3"],
    )
    .await;
    c.set("Patient?_filter=birthdate ge 1990-01-01", &["p3", "p4"])
        .await;
    c.set("Patient?_filter=birthdate gt 1985", &["p3", "p4"])
        .await;
    c.set("Patient?_filter=gender pr false", &["p5"]).await;
    c.set("Patient?_filter=gender pr true", &["p1", "p2", "p3", "p4"])
        .await;
    c.set(
        "Patient?_filter=identifier eq http://example.org/mrn|m2",
        &["p2"],
    )
    .await;
    c.set(
        "Observation?_filter=value-quantity gt 60",
        &["o1", "o2", "o10"],
    )
    .await;
    c.set(
        "Observation?_filter=code eq http://loinc.org|2339-0 and value-quantity lt 5.4",
        &["o6"],
    )
    .await;
    // _filter AND-ed with ordinary parameters
    c.set("Patient?_filter=gender eq female&family=smith", &["p1"])
        .await;
    c.finish();
}

async fn includes_and_revincludes(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "_include/_revinclude");
    c.with_includes(
        "MedicationRequest?_include=MedicationRequest:patient",
        &["mr1", "mr2"],
        &["Patient/p1", "Patient/p3"],
    )
    .await;
    c.with_includes(
        "MedicationRequest?_include=MedicationRequest:requester&_include=MedicationRequest:medication",
        &["mr1", "mr2"],
        &["Practitioner/pr1", "Practitioner/pr2", "Medication/med1"],
    )
    .await;
    c.with_includes(
        "Observation?subject=p1&_include=Observation:subject:Patient",
        &["o1", "o2"],
        &["Patient/p1"],
    )
    .await;
    c.with_includes(
        "Observation?subject=p1&_include=Observation:subject:Group",
        &["o1", "o2"],
        &[],
    )
    .await;
    // an included resource that also matches appears once, as a match
    c.with_includes(
        "Organization?_include=Organization:partof",
        &["org1", "org2"],
        &[],
    )
    .await;
    c.with_includes(
        "Observation?_id=o1&_include=Observation:patient&_include:iterate=Patient:organization&_include:iterate=Patient:general-practitioner",
        &["o1"],
        &["Patient/p1", "Organization/org1", "Practitioner/pr1"],
    )
    .await;
    c.with_includes(
        "Patient?_id=p3&_include=Patient:organization&_include:iterate=Organization:partof",
        &["p3"],
        &["Organization/org2", "Organization/org1"],
    )
    .await;
    // without :iterate the second hop is not followed
    c.with_includes(
        "Patient?_id=p3&_include=Patient:organization&_include=Organization:partof",
        &["p3"],
        &["Organization/org2"],
    )
    .await;
    c.with_includes(
        "Observation?_id=o1&_include=*",
        &["o1"],
        &["Patient/p1", "Encounter/e1", "Practitioner/pr1"],
    )
    .await;
    c.with_includes(
        "Group?_include=Group:member",
        &["g1"],
        &["Patient/p1", "Patient/p2"],
    )
    .await;
    c.with_includes(
        "Patient?_id=p1&_revinclude=Observation:subject",
        &["p1"],
        &["Observation/o1", "Observation/o2"],
    )
    .await;
    c.with_includes(
        "Patient?_id=p1&_revinclude=Observation:subject&_revinclude=Condition:subject&_revinclude=MedicationRequest:subject",
        &["p1"],
        &["Observation/o1", "Observation/o2", "Condition/c1", "MedicationRequest/mr1"],
    )
    .await;
    c.with_includes(
        "Patient?_id=p1&_revinclude=Encounter:subject&_revinclude:iterate=Observation:encounter",
        &["p1"],
        &["Encounter/e1", "Observation/o1", "Observation/o2"],
    )
    .await;
    c.with_includes(
        "Practitioner?_id=pr1&_revinclude=Patient:general-practitioner&_revinclude:iterate=Observation:subject",
        &["pr1"],
        &[
            "Patient/p1",
            "Patient/p2",
            "Observation/o1",
            "Observation/o2",
            "Observation/o3",
            "Observation/o4",
            "Observation/o10",
        ],
    )
    .await;
    c.with_includes(
        "Encounter?_id=e1&_revinclude=*",
        &["e1"],
        &[
            "Observation/o1",
            "Observation/o2",
            "Condition/c1",
            "MedicationRequest/mr1",
        ],
    )
    .await;
    // include and revinclude together, with a match filter
    c.with_includes(
        "Observation?code=2339-0&patient.family=jones&_include=Observation:patient&_revinclude=List:item",
        &["o5", "o6"],
        &["Patient/p3"],
    )
    .await;
    c.with_includes(
        "Observation?code=2339-0&_revinclude=List:item",
        &["o3", "o4", "o5", "o6"],
        &["List/l1"],
    )
    .await;
    // :iterate stops when nothing new turns up
    c.with_includes(
        "Organization?_id=org2&_include:iterate=Organization:partof",
        &["org2"],
        &["Organization/org1"],
    )
    .await;
    // includes belong to the page: each page carries the includes of its own matches
    c.with_includes(
        "MedicationRequest?_include=MedicationRequest:patient&_count=1&_sort=authoredon",
        &["mr2"],
        &["Patient/p3"],
    )
    .await;
    if let Some(first) = c
        .search("MedicationRequest?_include=MedicationRequest:patient&_count=1&_sort=authoredon")
        .await
    {
        let pages = srv.all_pages(&first, 5).await;
        let second = pages.get(1).cloned().unwrap_or_default();
        let got = (match_ids(&second), mode_refs(&second, "include"));
        c.check(
            got == (vec!["mr1".to_string()], vec!["Patient/p1".to_string()]),
            || format!("page 2 of an _include search: {got:?}"),
        );
    }
    // matches keep their sort order; includes follow them
    if let Some(b) = c
        .search("Observation?code=2339-0&_sort=-value-quantity&_include=Observation:patient")
        .await
    {
        let modes: Vec<String> = entries(&b)
            .iter()
            .map(|e| e["search"]["mode"].as_str().unwrap_or("").to_string())
            .collect();
        c.check(
            match_ids(&b) == ["o5", "o4", "o3", "o6"]
                && modes == ["match", "match", "match", "match", "include", "include"],
            || {
                format!(
                    "sorted matches then includes: {:?} {modes:?}",
                    match_ids(&b)
                )
            },
        );
    }
    // _summary=count counts matches only
    if let Some(b) = c
        .search("Patient?_id=p1,p2&_revinclude=Observation:subject&_summary=count")
        .await
    {
        c.check(b["total"] == 2 && entries(&b).is_empty(), || {
            format!("_summary=count with _revinclude: {b}")
        });
    }
    c.finish();
}

async fn system_and_compartment_search(srv: &TestServer) {
    load(srv).await;
    let mut c = Checker::new(srv, "system/compartment");
    c.set("?_id=p1", &["p1"]).await;
    c.set(
        "?_type=Patient,Organization&_id=p1,org1,o1",
        &["p1", "org1"],
    )
    .await;
    c.set("?_type=Patient,Practitioner&name=kil", &["pr1"])
        .await;
    c.set(
        "?_type=Patient,Practitioner&name=anna,marcus",
        &["p1", "pr2"],
    )
    .await;
    c.set(
        "?_type=Observation,Condition&patient=p1",
        &["o1", "o2", "c1"],
    )
    .await;
    c.set("?_type=RiskAssessment", &["ra1", "ra2", "ra3"]).await;
    c.set("?_tag=http://example.org/tags|vip", &["p1"]).await;
    c.set("Patient/p1/Observation", &["o1", "o2"]).await;
    c.set("Patient/p1/Observation?code=8302-2", &["o2"]).await;
    c.set("Patient/p2/Observation?date=ge2021", &["o10"]).await;
    c.set("Patient/p4/Condition", &["c3"]).await;
    c.set("Patient/p2/Encounter", &["e2"]).await;
    c.set("Patient/p1/MedicationRequest", &["mr1"]).await;
    c.set("Patient/p3/RiskAssessment", &["ra3"]).await;
    c.set("Patient/p5/Encounter", &[]).await;
    c.set("Patient/nobody/Observation", &[]).await;
    c.set(
        "Patient/p2/*",
        &["p2", "o3", "o4", "o10", "e2", "ra2", "g1"],
    )
    .await;
    c.set(
        "Patient/p2/*?_type=Observation,Encounter",
        &["o3", "o4", "o10", "e2"],
    )
    .await;
    c.set("Encounter/e1/Observation", &["o1", "o2"]).await;
    c.set("Practitioner/pr2/Encounter", &["e2"]).await;
    c.finish();
}
