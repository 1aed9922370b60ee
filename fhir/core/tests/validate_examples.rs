//! Every JSON example of the R4 examples package validated structurally; and a timing of
//! Synthea Patient/Observation validation.

mod common;

use std::collections::BTreeMap;

use kiln_fhir::validation::validate;
use serde_json::Value;

#[test]
fn examples_validate() {
    let Some(examples) = common::examples() else {
        return;
    };
    let mut clean = 0usize;
    let mut failing: Vec<(String, Vec<String>)> = Vec::new();
    let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
    for (name, json) in &examples {
        let errors: Vec<String> = validate(json)
            .into_iter()
            .filter(|i| i.is_error())
            .map(|i| format!("{} @ {}", i.diagnostics, i.expression.join(",")))
            .collect();
        if errors.is_empty() {
            clean += 1;
        } else {
            for e in &errors {
                let key: String = e
                    .split(" @ ")
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(70)
                    .collect();
                *by_message.entry(key).or_default() += 1;
            }
            failing.push((name.clone(), errors));
        }
    }
    println!(
        "examples validation: {clean} with 0 errors, {} with errors ({} total)",
        failing.len(),
        examples.len()
    );
    for (name, errs) in &failing {
        println!(
            "  {name}: {}",
            errs.iter().take(3).cloned().collect::<Vec<_>>().join(" | ")
        );
    }
    let mut top: Vec<_> = by_message.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    for (m, n) in top.iter().take(20) {
        println!("  {n:5} × {m}");
    }
    // Official examples that really are invalid R4 (checked by hand):
    const KNOWN_INVALID: [(&str, &str); 23] = [
        ("Bundle-dataelements.json", "bdl-7: the de-Quantity.* fullUrls appear twice"),
        ("ActivityDefinition-blood-tubes-supply.json", "txt-2: empty narrative div"),
        ("ActivityDefinition-heart-valve-replacement.json", "txt-2: empty narrative div"),
        ("EventDefinition-example.json", "txt-2: empty narrative div"),
        ("Questionnaire-zika-virus-exposure-assessment.json", "txt-2: empty narrative div"),
        ("DeviceMetric-example.json", "parent references a DeviceDefinition (only Device allowed)"),
        ("DeviceUseStatement-example.json", "reasonReference to Procedure is not an allowed target"),
        ("ImplementationGuide-fhir.json", "no name/status (1..1); a reference id longer than 64"),
        ("ig-r4.json", "same ImplementationGuide as ImplementationGuide-fhir.json"),
        ("MedicationRequest-medrx0301.json", "dispenseRequest.performer references a Practitioner"),
        ("Observation-clinical-gender.json", "performer references an Encounter"),
        ("Questionnaire-qs1.json", "nested items without the required linkId"),
        ("SearchParameter-codesystem-extensions-CodeSystem-author.json", "no base (1..*)"),
        ("SearchParameter-codesystem-extensions-CodeSystem-effective.json", "no base"),
        ("SearchParameter-codesystem-extensions-CodeSystem-end.json", "no base"),
        ("SearchParameter-codesystem-extensions-CodeSystem-keyword.json", "no base"),
        ("SearchParameter-codesystem-extensions-CodeSystem-workflow.json", "no base"),
        ("SearchParameter-valueset-extensions-ValueSet-author.json", "no base"),
        ("SearchParameter-valueset-extensions-ValueSet-effective.json", "no base"),
        ("SearchParameter-valueset-extensions-ValueSet-end.json", "no base"),
        ("SearchParameter-valueset-extensions-ValueSet-keyword.json", "no base"),
        ("SearchParameter-valueset-extensions-ValueSet-workflow.json", "no base"),
        (
            "SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json",
            "id longer than 64 characters",
        ),
    ];
    let unexpected: Vec<&str> = failing
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !KNOWN_INVALID.iter().any(|(k, _)| k == n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected invalid examples: {unexpected:?}"
    );
    assert!(clean * 100 >= examples.len() * 99);
}

fn synthea_resources() -> Option<Vec<Value>> {
    let dir = common::shared_dir()?.join("synthea-r4");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    let text = std::fs::read_to_string(names.first()?).ok()?;
    let bundle: Value = serde_json::from_str(&text).ok()?;
    Some(
        bundle["entry"]
            .as_array()?
            .iter()
            .map(|e| e["resource"].clone())
            .collect(),
    )
}

/// Whole Synthea transaction Bundles validate with 0 errors (the first 3; all 102 with
/// `KILN_ALL_SYNTHEA=1`).
#[test]
fn synthea_bundles_validate() {
    let Some(dir) = common::shared_dir().map(|d| d.join("synthea-r4")) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("NOTICE: {} absent; skipping", dir.display());
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    if std::env::var_os("KILN_ALL_SYNTHEA").is_none() {
        files.truncate(3);
    }
    let (mut resources, mut bad) = (0usize, Vec::new());
    let start = std::time::Instant::now();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let Ok(bundle) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        resources += bundle["entry"].as_array().map_or(0, Vec::len);
        let errors: Vec<_> = validate(&bundle)
            .into_iter()
            .filter(|i| i.is_error())
            .collect();
        if !errors.is_empty() {
            bad.push(format!(
                "{}: {:?}",
                f.display(),
                &errors[..errors.len().min(3)]
            ));
        }
    }
    println!(
        "synthea bundles: {} files, {resources} resources, {} files with errors, {:.2}s",
        files.len(),
        bad.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn synthea_validation_timing() {
    let Some(resources) = synthea_resources() else {
        println!("NOTICE: synthea-r4 absent; skipping");
        return;
    };
    let _ = validate(&resources[0]); // warm up the model and regexes
    let mut invalid = 0;
    for r in &resources {
        let errs: Vec<_> = validate(r).into_iter().filter(|i| i.is_error()).collect();
        if !errs.is_empty() {
            invalid += 1;
            if invalid <= 5 {
                println!("  synthea {}: {:?}", r["resourceType"], errs.first());
            }
        }
    }
    println!(
        "synthea: {} resources, {invalid} with errors",
        resources.len()
    );
    for rt in ["Patient", "Observation"] {
        let Some(r) = resources.iter().find(|r| r["resourceType"] == rt) else {
            continue;
        };
        let n = 2000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(validate(std::hint::black_box(r)));
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("validate Synthea {rt}: {us:.1} µs");
        if let Some(div) = r["text"]["div"].as_str() {
            let start = std::time::Instant::now();
            for _ in 0..n {
                let _ = std::hint::black_box(kiln_fhir::validation::check_xhtml(
                    std::hint::black_box(div),
                ));
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("  of which the narrative check: {us:.1} µs");
        }
    }
}
