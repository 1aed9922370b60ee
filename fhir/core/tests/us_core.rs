//! US Core 6.1.0 examples validated against their US Core profiles (profile-lite: cardinality,
//! fixed/pattern values, restricted choice types, value/pattern slicing).

mod common;

use std::collections::HashMap;

use kiln_fhir::profile::Profile;
use kiln_fhir::{
    validate_with_profile, validate_with_profile_and_codes, value_set_includes_system,
    CodeValidator, CodeVerdict,
};
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

/// A [`CodeValidator`] over the value sets of a US Core package: those whose includes all
/// enumerate concepts are answered; others (filters, whole code systems) are unknown.
struct PackageCodes {
    value_sets: HashMap<String, serde_json::Value>,
}

impl PackageCodes {
    fn enumerated(&self, url: &str) -> Option<Vec<(String, String)>> {
        let vs = self.value_sets.get(url.split('|').next().unwrap_or(url))?;
        let mut out = Vec::new();
        for inc in vs["compose"]["include"].as_array()? {
            let system = inc["system"].as_str()?;
            for c in inc["concept"].as_array()? {
                out.push((system.to_string(), c["code"].as_str()?.to_string()));
            }
        }
        Some(out)
    }
}

impl CodeValidator for PackageCodes {
    fn validate_code(&self, value_set: &str, system: Option<&str>, code: &str) -> CodeVerdict {
        let Some(codes) = self.enumerated(value_set) else {
            return CodeVerdict::Unknown;
        };
        let mut systems: Vec<&str> = codes.iter().map(|(s, _)| s.as_str()).collect();
        systems.dedup();
        let system = match (system, systems.as_slice()) {
            (Some(s), _) => s,
            (None, [only]) => only,
            (None, _) => return CodeVerdict::Unknown,
        };
        if codes.iter().any(|(s, c)| s == system && c == code) {
            CodeVerdict::Valid
        } else {
            CodeVerdict::Invalid(format!("{system}#{code} is not in {value_set}"))
        }
    }

    fn includes_system(&self, value_set: &str, system: &str) -> Option<bool> {
        let vs = self
            .value_sets
            .get(value_set.split('|').next().unwrap_or(value_set))?;
        value_set_includes_system(vs, system)
    }
}

/// US Core 6.1.0 profile bindings (`required` → error, `extensible` → warning for a code of an
/// included system), checked through the same `CodeValidator` trait as the base bindings: the
/// package's examples pass, mutated ones are caught at the bound element.
#[test]
fn us_core_profile_bindings() {
    let Some(pkg) = common::npm_package("us-core/hl7.fhir.us.core-6.1.0.tgz", "us-core-6.1.0")
    else {
        return;
    };
    let files = common::json_files(&pkg);
    let mut profiles: HashMap<String, Profile> = HashMap::new();
    let mut value_sets = HashMap::new();
    for (_, r) in &files {
        if r["resourceType"] == "ValueSet" {
            if let Some(u) = r["url"].as_str() {
                value_sets.insert(u.to_string(), r.clone());
            }
        } else if r["resourceType"] == "StructureDefinition"
            && r["kind"] == "resource"
            && r["derivation"] == "constraint"
        {
            if let Ok(p) = Profile::from_structure_definition(r) {
                profiles.insert(p.url.clone(), p);
            }
        }
    }
    let codes = PackageCodes { value_sets };
    let (mut checked, mut warnings, mut failures) = (0, 0, Vec::new());
    let mut examples = HashMap::new();
    for (path, ex) in common::json_files(&pkg.join("example")) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for url in ex["meta"]["profile"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str())
        {
            let Some(p) = profiles.get(url.split('|').next().unwrap_or(url)) else {
                continue;
            };
            checked += 1;
            for i in validate_with_profile_and_codes(&ex, p, &codes) {
                if i.is_error() {
                    failures.push(format!("{name}: {} @ {:?}", i.diagnostics, i.expression));
                } else if i.code == "code-invalid" {
                    warnings += 1;
                    println!("  warning {name}: {}", i.diagnostics);
                }
            }
        }
        examples.insert(name, ex);
    }
    println!("us-core 6.1.0 with bindings: {checked} checked, {warnings} binding warnings");
    assert!(checked > 50);
    assert!(failures.is_empty(), "{failures:#?}");

    let smoking =
        &profiles["http://hl7.org/fhir/us/core/StructureDefinition/us-core-smokingstatus"];
    let ex = &examples["Observation-some-day-smoker.json"];
    let at = |issues: Vec<kiln_fhir::Issue>| -> Vec<(bool, String)> {
        issues
            .into_iter()
            .filter(|i| i.code == "code-invalid")
            .map(|i| (i.is_error(), i.expression.join(",")))
            .collect()
    };
    // required: `preliminary` is an R4 observation status, not one US Core allows here
    let mut m = ex.clone();
    m["status"] = json!("preliminary");
    assert!(kiln_fhir::validate(&m).iter().all(|i| !i.is_error()));
    assert_eq!(
        at(smoking.validate_with(&m, &codes)),
        vec![(true, "Observation.status".to_string())]
    );
    // extensible: another LOINC code is a warning, a SNOMED CT code is what extensible allows
    let mut m = ex.clone();
    m["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "8867-4"}]});
    assert_eq!(
        at(smoking.validate_with(&m, &codes)),
        vec![(false, "Observation.code".to_string())]
    );
    m["code"] = json!({"coding": [{"system": "http://snomed.info/sct", "code": "229819007"}]});
    assert_eq!(at(smoking.validate_with(&m, &codes)), vec![]);
    // a nested element: CarePlan.text.status bound to us-core-narrative-status
    let careplan = &profiles["http://hl7.org/fhir/us/core/StructureDefinition/us-core-careplan"];
    let mut m = examples["CarePlan-colonoscopy.json"].clone();
    assert_eq!(at(careplan.validate_with(&m, &codes)), vec![]);
    m["text"]["status"] = json!("empty");
    assert_eq!(
        at(careplan.validate_with(&m, &codes)),
        vec![(true, "CarePlan.text.status".to_string())]
    );
}
