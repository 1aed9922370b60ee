//! US Core 6.1.0 examples validated against their US Core profiles (profile-lite: cardinality,
//! fixed/pattern values, restricted choice types, value/pattern slicing).

mod common;

use std::collections::HashMap;

use kiln_fhir::profile::Profile;
use kiln_fhir::validate_with_profile;
use serde_json::json;

#[test]
fn us_core_examples_conform_to_their_profiles() {
    let Some(pkg) = common::npm_package("us-core/hl7.fhir.us.core-6.1.0.tgz", "us-core-6.1.0")
    else {
        return;
    };
    let mut profiles: HashMap<String, Profile> = HashMap::new();
    let mut unusable = Vec::new();
    for (path, sd) in common::json_files(&pkg) {
        if sd["resourceType"] != "StructureDefinition"
            || sd["kind"] != "resource"
            || sd["derivation"] != "constraint"
        {
            continue;
        }
        match Profile::from_structure_definition(&sd) {
            Ok(p) => {
                profiles.insert(p.url.clone(), p);
            }
            Err(e) => unusable.push(format!("{}: {e}", path.display())),
        }
    }
    println!(
        "us-core: {} resource profiles loaded, unusable: {unusable:?}",
        profiles.len()
    );
    assert!(profiles.len() >= 40);
    let (mut checked, mut clean, mut failures) = (0, 0, Vec::new());
    for (path, ex) in common::json_files(&pkg.join("example")) {
        let Some(metas) = ex["meta"]["profile"].as_array() else {
            continue;
        };
        for url in metas.iter().filter_map(|u| u.as_str()) {
            let Some(p) = profiles.get(url.split('|').next().unwrap_or(url)) else {
                continue;
            };
            checked += 1;
            let errors: Vec<String> = validate_with_profile(&ex, p)
                .into_iter()
                .filter(|i| i.is_error())
                .map(|i| format!("{} @ {}", i.diagnostics, i.expression.join(",")))
                .collect();
            if errors.is_empty() {
                clean += 1;
            } else {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                failures.push(format!(
                    "{}: {}",
                    name.unwrap_or_default(),
                    errors.join(" | ")
                ));
            }
        }
    }
    println!("us-core examples: {checked} checked against their profiles, {clean} with 0 errors");
    for f in &failures {
        println!("  {f}");
    }
    assert!(checked > 50);

    // A US Core Patient without identifier/name/gender fails the profile.
    let patient = &profiles["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"];
    let errors: Vec<String> = patient
        .validate(&json!({"resourceType": "Patient", "birthDate": "1970"}))
        .into_iter()
        .flat_map(|i| i.expression)
        .collect();
    assert_eq!(
        errors,
        vec!["Patient.identifier", "Patient.name", "Patient.gender"]
    );

    // Mutations of conforming examples must fail.
    let lab = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab";
    let bp = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-blood-pressure";
    let mut mutated = 0;
    for (path, ex) in common::json_files(&pkg.join("example")) {
        let Some(metas) = ex["meta"]["profile"].as_array() else {
            continue;
        };
        for url in metas.iter().filter_map(|u| u.as_str()) {
            let url = url.split('|').next().unwrap_or(url);
            let mut m = ex.clone();
            if url == lab {
                m.as_object_mut().map(|o| o.remove("category"));
            } else if url == bp {
                if let Some(c) = m["component"].as_array_mut() {
                    c.truncate(1);
                }
            } else {
                continue;
            }
            let errors: Vec<String> = profiles[url]
                .validate(&m)
                .into_iter()
                .map(|i| format!("{} @ {}", i.diagnostics, i.expression.join(",")))
                .collect();
            if mutated == 0 {
                println!("mutated {}: {errors:?}", path.display());
            }
            assert!(
                !errors.is_empty(),
                "{} mutated still passes",
                path.display()
            );
            mutated += 1;
        }
    }
    println!("{mutated} mutated examples all rejected");
    assert!(mutated >= 2);
}

/// US Core 3.1.1 and 7.0.0: every example against its profiles (figures printed).
#[test]
fn other_us_core_versions() {
    for v in ["3.1.1", "7.0.0"] {
        let Some(pkg) = common::npm_package(
            &format!("us-core/hl7.fhir.us.core-{v}.tgz"),
            &format!("us-core-{v}"),
        ) else {
            return;
        };
        let mut profiles: HashMap<String, Profile> = HashMap::new();
        let files = common::json_files(&pkg);
        for (_, sd) in &files {
            if sd["resourceType"] == "StructureDefinition"
                && sd["kind"] == "resource"
                && sd["derivation"] == "constraint"
            {
                if let Ok(p) = Profile::from_structure_definition(sd) {
                    profiles.insert(p.url.clone(), p);
                }
            }
        }
        let (mut checked, mut clean, mut failures) = (0, 0, Vec::new());
        for (path, ex) in &files {
            let Some(metas) = ex["meta"]["profile"].as_array() else {
                continue;
            };
            if ex["resourceType"] == "StructureDefinition" {
                continue;
            }
            for url in metas.iter().filter_map(|u| u.as_str()) {
                let Some(p) = profiles.get(url.split('|').next().unwrap_or(url)) else {
                    continue;
                };
                checked += 1;
                let errors: Vec<String> = validate_with_profile(ex, p)
                    .into_iter()
                    .filter(|i| i.is_error())
                    .map(|i| format!("{} @ {}", i.diagnostics, i.expression.join(",")))
                    .collect();
                if errors.is_empty() {
                    clean += 1;
                } else {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    failures.push(format!(
                        "{}: {}",
                        name.unwrap_or_default(),
                        errors.join(" | ")
                    ));
                }
            }
        }
        println!(
            "us-core {v}: {} profiles, {checked} examples checked, {clean} with 0 errors",
            profiles.len()
        );
        for f in &failures {
            println!("  {f}");
        }
        assert!(profiles.len() >= 25);
        // 3.1.1's DiagnosticReport-cardiology-report has an invalid base64 hash ("EQH/..AgME").
        let known_invalid = failures
            .iter()
            .filter(|f| f.starts_with("DiagnosticReport-cardiology-report.json: not valid base64"))
            .count();
        assert_eq!(failures.len(), known_invalid, "{failures:#?}");
        assert!(checked > 50);
    }
}
