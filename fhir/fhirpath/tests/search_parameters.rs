//! Every R4 SearchParameter expression (vendored in kiln-fhir) must compile, and evaluating them
//! over real resources (Synthea bundles in `../shared`, skipped when absent) must not error.
//! Also prints evaluation timings (no timing assertions).

use kiln_fhirpath::{evaluate, Context, Expression, Item};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"));
    p.exists().then_some(p)
}

fn sp_expressions() -> Vec<(String, Vec<String>, String)> {
    kiln_fhir::model::r4()
        .search_parameters()
        .iter()
        .filter_map(|sp| {
            sp.expression
                .as_ref()
                .map(|e| (sp.url.clone(), sp.base.clone(), e.clone()))
        })
        .collect()
}

/// The R4 spec examples (file name, JSON), unpacked once (system `tar`) into
/// `CARGO_TARGET_TMPDIR` and parsed once per test binary. `None` when unavailable.
fn spec_examples() -> Option<&'static [(String, Value)]> {
    static EXAMPLES: std::sync::OnceLock<Option<Vec<(String, Value)>>> = std::sync::OnceLock::new();
    EXAMPLES
        .get_or_init(|| {
            let shared = shared_dir()?;
            let tgz = shared.join("fhir-r4/hl7.fhir.r4.examples-4.0.1.tgz");
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("r4-examples");
            let package = dir.join("package");
            if !package.join("Patient-example.json").exists() {
                let _ = std::fs::create_dir_all(&dir);
                let ok = std::process::Command::new("tar")
                    .arg("xzf")
                    .arg(&tgz)
                    .arg("-C")
                    .arg(&dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    return None;
                }
            }
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&package)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("json"))
                .collect();
            paths.sort();
            Some(
                paths
                    .into_iter()
                    .filter_map(|p| {
                        let text = std::fs::read_to_string(&p).ok()?;
                        let v: Value = serde_json::from_str(&text).ok()?;
                        v["resourceType"].as_str()?;
                        Some((p.file_name()?.to_string_lossy().to_string(), v))
                    })
                    .collect(),
            )
        })
        .as_deref()
}

#[test]
fn all_r4_search_parameter_expressions_compile() {
    let exprs = sp_expressions();
    assert!(exprs.len() > 1000, "only {} expressions", exprs.len());
    let mut failures = Vec::new();
    for (url, _, e) in &exprs {
        if let Err(err) = Expression::parse(e) {
            failures.push(format!("{url}: `{e}`: {err}"));
        }
    }
    for f in &failures {
        println!("{f}");
    }
    println!(
        "{} of {} search parameter expressions compile",
        exprs.len() - failures.len(),
        exprs.len()
    );
    assert!(failures.is_empty());
}

#[test]
fn search_parameters_evaluate_on_synthea() {
    let Some(shared) = shared_dir() else {
        println!("NOTICE: ../shared not found; skipping Synthea evaluation");
        return;
    };
    let dir = shared.join("synthea-r4");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("NOTICE: ../shared/synthea-r4 not found; skipping");
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    let exprs: Vec<(Vec<String>, Expression)> = sp_expressions()
        .into_iter()
        .map(|(_, base, e)| (base, Expression::parse(&e).expect("compiles")))
        .collect();
    let mut evaluations = 0usize;
    let mut results = 0usize;
    let mut errors = Vec::new();
    let start = Instant::now();
    for f in files.iter().take(3) {
        let bundle: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let Some(list) = bundle["entry"].as_array() else {
            continue;
        };
        for entry in list {
            let res = &entry["resource"];
            let rt = res["resourceType"].as_str().unwrap_or("");
            let ctx = Context::new(res).with_root(&bundle);
            for (base, expr) in &exprs {
                if !base
                    .iter()
                    .any(|b| b == rt || b == "Resource" || b == "DomainResource")
                {
                    continue;
                }
                evaluations += 1;
                match evaluate(expr, res, &ctx) {
                    Ok(r) => results += r.len(),
                    Err(e) => {
                        if errors.len() < 20 {
                            errors.push(format!("{rt}: `{}`: {e}", expr.source()));
                        }
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    for e in &errors {
        println!("{e}");
    }
    println!(
        "{evaluations} search-parameter evaluations on 3 Synthea bundles: {results} values, {} errors, {:.1} µs/evaluation",
        errors.len(),
        elapsed.as_secs_f64() * 1e6 / evaluations.max(1) as f64
    );
    assert!(errors.is_empty());
}

fn time_it(label: &str, src: &str, input: &Value, expected_len: usize) {
    let expr = Expression::parse(src).unwrap();
    let ctx = Context::new(input);
    let n = 20_000;
    let out = evaluate(&expr, input, &ctx).unwrap();
    assert_eq!(out.len(), expected_len, "{src}");
    let start = Instant::now();
    let mut total = 0;
    for _ in 0..n {
        total += evaluate(&expr, input, &ctx).unwrap().len();
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(total, n * expected_len);
    println!("{label}: `{src}` {per:.2} µs/evaluation");
}

#[test]
fn timings() {
    let patient = json!({
        "resourceType": "Patient", "id": "p",
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                 {"use": "usual", "given": ["Jim"]}],
        "birthDate": "1974-12-25", "gender": "male",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}]
    });
    let obs = json!({
        "resourceType": "Observation", "id": "o", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2016-03-28",
        "valueQuantity": {"value": 185, "unit": "lbs", "system": "http://unitsofmeasure.org", "code": "[lb_av]"}
    });
    time_it("path", "Patient.name.given", &patient, 3);
    time_it("choice", "Observation.value.ofType(Quantity)", &obs, 1);
    time_it("as", "(Observation.value as Quantity)", &obs, 1);
    time_it(
        "where",
        "Patient.name.where(use = 'official').family",
        &patient,
        1,
    );
    time_it(
        "union",
        "Observation.subject.where(resolve() is Patient) | Observation.code.coding",
        &obs,
        2,
    );
    time_it("compare", "Observation.value > 100 '[lb_av]'", &obs, 1);
}

/// Every applicable search parameter over every R4 spec example (the examples package in
/// `../shared`): no evaluation errors.
#[test]
fn search_parameters_evaluate_on_all_spec_examples() {
    let Some(examples) = spec_examples() else {
        println!("NOTICE: ../shared R4 examples not available; skipping spec-example evaluation");
        return;
    };
    let exprs: Vec<(Vec<String>, Expression)> = sp_expressions()
        .into_iter()
        .map(|(_, base, e)| (base, Expression::parse(&e).expect("compiles")))
        .collect();
    let files = examples.len();
    let mut evaluations = 0usize;
    let mut errors = Vec::new();
    for (name, res) in examples {
        let rt = res["resourceType"].as_str().unwrap_or_default();
        let ctx = Context::new(res);
        for (base, expr) in &exprs {
            if !base
                .iter()
                .any(|b| b == rt || b == "Resource" || b == "DomainResource")
            {
                continue;
            }
            evaluations += 1;
            if let Err(err) = evaluate(expr, res, &ctx) {
                errors.push(format!("{name}: `{}`: {err}", expr.source()));
            }
        }
    }
    for e in errors.iter().take(30) {
        println!("{e}");
    }
    println!(
        "{files} example resources, {evaluations} search-parameter evaluations, {} errors",
        errors.len()
    );
    assert!(files > 1000, "only {files} examples found");
    assert!(errors.is_empty());
}

/// All invariant (`ElementDefinition.constraint.expression`) expressions of the R4 resource and
/// datatype StructureDefinitions compile, and evaluate without error on the spec examples' own
/// resource types (sampled: the first example file per resource type).
#[test]
fn r4_invariant_expressions_compile() {
    let Some(shared) = shared_dir() else {
        println!("NOTICE: ../shared not found; skipping invariant compilation");
        return;
    };
    let mut total = 0usize;
    let mut failures = Vec::new();
    for f in ["profiles-resources.json", "profiles-types.json"] {
        let Ok(text) = std::fs::read_to_string(shared.join("fhir-r4").join(f)) else {
            println!("NOTICE: {f} missing; skipping");
            return;
        };
        let bundle: Value = serde_json::from_str(&text).unwrap();
        for e in bundle["entry"].as_array().into_iter().flatten() {
            let sd = &e["resource"];
            for el in sd["snapshot"]["element"].as_array().into_iter().flatten() {
                for c in el["constraint"].as_array().into_iter().flatten() {
                    let Some(expr) = c["expression"].as_str() else {
                        continue;
                    };
                    total += 1;
                    if let Err(err) = Expression::parse(expr) {
                        failures.push(format!("{} {}: `{expr}`: {err}", sd["id"], c["key"]));
                    }
                }
            }
        }
    }
    for f in failures.iter().take(20) {
        println!("{f}");
    }
    println!(
        "{} of {total} invariant expressions compile",
        total - failures.len()
    );
    assert!(total > 1000);
    assert!(failures.is_empty());
}

/// The spec examples should satisfy their resource types' invariants: evaluate every resource
/// StructureDefinition constraint on the elements it applies to (via `evaluate_on`), over every
/// spec example, and require (almost) all to be true.
#[test]
fn spec_examples_satisfy_resource_invariants() {
    let Some(shared) = shared_dir() else {
        println!("NOTICE: ../shared not found; skipping invariants on examples");
        return;
    };
    let Ok(text) = std::fs::read_to_string(shared.join("fhir-r4/profiles-resources.json")) else {
        println!("NOTICE: profiles-resources.json missing; skipping");
        return;
    };
    let bundle: Value = serde_json::from_str(&text).unwrap();
    // Datatype invariants apply to every node of that type (found once per resource with
    // `descendants()`); checked on every 4th example to keep the test fast.
    let mut datatype_rules: std::collections::HashMap<String, Vec<(String, Expression)>> =
        Default::default();
    if let Ok(types_text) = std::fs::read_to_string(shared.join("fhir-r4/profiles-types.json")) {
        let types: Value = serde_json::from_str(&types_text).unwrap();
        for e in types["entry"].as_array().into_iter().flatten() {
            let sd = &e["resource"];
            if sd["kind"] != "complex-type" || sd["derivation"] == "constraint" {
                continue;
            }
            let Some(t) = sd["type"].as_str() else {
                continue;
            };
            for el in sd["snapshot"]["element"].as_array().into_iter().flatten() {
                if el["path"].as_str() != Some(t) {
                    continue;
                }
                for c in el["constraint"].as_array().into_iter().flatten() {
                    let key = c["key"].as_str().unwrap_or("").to_string();
                    if c["severity"] != "error" {
                        continue;
                    }
                    let Some(expr) = c["expression"].as_str() else {
                        continue;
                    };
                    let Ok(x) = Expression::parse(expr) else {
                        continue;
                    };
                    datatype_rules
                        .entry(t.to_string())
                        .or_default()
                        .push((key, x));
                }
            }
        }
    }
    // resource type → [(element path expression, key, constraint)]
    let mut rules: std::collections::HashMap<String, Vec<(Expression, String, Expression)>> =
        Default::default();
    for e in bundle["entry"].as_array().into_iter().flatten() {
        let sd = &e["resource"];
        if sd["kind"] != "resource" || sd["derivation"] == "constraint" {
            continue;
        }
        let Some(t) = sd["type"].as_str() else {
            continue;
        };
        for el in sd["snapshot"]["element"].as_array().into_iter().flatten() {
            let path = el["path"].as_str().unwrap_or("").replace("[x]", "");
            for c in el["constraint"].as_array().into_iter().flatten() {
                let key = c["key"].as_str().unwrap_or("").to_string();
                // ele-1 (datatype-level) and the best-practice dom-6 are out of scope here.
                if key == "ele-1" || key == "dom-6" || c["severity"] != "error" {
                    continue;
                }
                let Some(expr) = c["expression"].as_str() else {
                    continue;
                };
                let (Ok(p), Ok(x)) = (Expression::parse(&path), Expression::parse(expr)) else {
                    continue;
                };
                rules.entry(t.to_string()).or_default().push((p, key, x));
            }
        }
    }
    let Some(examples) = spec_examples() else {
        println!("NOTICE: R4 examples not available; skipping");
        return;
    };
    let (mut checks, mut passed) = (0usize, 0usize);
    let mut file_index = 0usize;
    let descendants = Expression::parse("descendants()").unwrap();
    let mut failures = Vec::new();
    for (name, res) in examples {
        let rt = res["resourceType"].as_str().unwrap_or_default();
        let empty = Vec::new();
        let list = rules.get(rt).unwrap_or(&empty);
        let ctx = Context::new(res)
            .with_reference_stubs(false)
            .with_lenient_as(true);
        let mut targets: Vec<(Item<'_>, &String, &Expression)> = Vec::new();
        for (path, key, rule) in list {
            let Ok(nodes) = evaluate(path, res, &ctx) else {
                continue;
            };
            targets.extend(nodes.into_iter().map(|n| (n, key, rule)));
        }
        file_index += 1;
        if file_index.is_multiple_of(4) {
            let all = evaluate(&descendants, res, &ctx).unwrap_or_default();
            for node in all {
                let Some(rs) = node.type_name().and_then(|t| datatype_rules.get(t)) else {
                    continue;
                };
                for (key, rule) in rs {
                    targets.push((node.clone(), key, rule));
                }
            }
        }
        for (node, key, rule) in targets {
            {
                checks += 1;
                match kiln_fhirpath::evaluate_on(rule, vec![node], &ctx) {
                    Ok(r) if r.len() == 1 && r[0].as_bool() == Some(true) => passed += 1,
                    Ok(r) if r.is_empty() => passed += 1,
                    other => failures.push(format!(
                        "{name}: {key} `{}` -> {:?}",
                        rule.source(),
                        other.map(|r| r.iter().map(|i| i.to_json()).collect::<Vec<_>>())
                    )),
                }
            }
        }
    }
    for f in failures.iter().take(40) {
        println!("{}", f.chars().take(300).collect::<String>());
    }
    println!("{passed} of {checks} invariant checks on spec examples are true/empty");
    assert!(checks > 10_000, "only {checks} checks");
    assert!(passed as f64 >= checks as f64 * 0.99);
}
