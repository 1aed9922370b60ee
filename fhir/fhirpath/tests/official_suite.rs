//! Runs the official FHIRPath R4 test suite (`../shared/fhirpath/tests-fhir-r4.xml`) against the
//! engine and asserts a minimum pass rate. Skips (with a notice) when `../shared` is absent.

use kiln_fhirpath::{evaluate, Context, Expression, Item};
use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// Minimum share of passing tests (raised as the engine improves).
const MIN_PASS_RATE: f64 = 0.995;

#[derive(Debug, Default, Clone)]
struct Case {
    group: String,
    name: String,
    input_file: String,
    predicate: bool,
    strict: bool,
    expression: String,
    invalid: Option<String>,
    outputs: Vec<(String, String)>,
}

fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared"));
    p.join("fhirpath/tests-fhir-r4.xml").exists().then_some(p)
}

fn parse_cases(xml: &str) -> Vec<Case> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(false);
    let mut cases = Vec::new();
    let mut group = String::new();
    let mut cur: Option<Case> = None;
    let mut text = String::new();
    let mut in_text: Option<&'static str> = None;
    let mut out_type = String::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let attrs: HashMap<String, String> = e
                    .attributes()
                    .flatten()
                    .map(|a| {
                        (
                            String::from_utf8_lossy(a.key.as_ref()).to_string(),
                            a.unescape_value()
                                .map(|v| v.to_string())
                                .unwrap_or_default(),
                        )
                    })
                    .collect();
                match e.name().as_ref() {
                    b"group" => group = attrs.get("name").cloned().unwrap_or_default(),
                    b"test" => {
                        cur = Some(Case {
                            group: group.clone(),
                            name: attrs.get("name").cloned().unwrap_or_default(),
                            input_file: attrs.get("inputfile").cloned().unwrap_or_default(),
                            predicate: attrs.get("predicate").map(String::as_str) == Some("true"),
                            strict: attrs.get("mode").map(String::as_str) == Some("strict"),
                            ..Default::default()
                        })
                    }
                    b"expression" => {
                        if let Some(c) = cur.as_mut() {
                            c.invalid = attrs.get("invalid").cloned();
                            if attrs.get("mode").map(String::as_str) == Some("strict") {
                                c.strict = true;
                            }
                        }
                        text.clear();
                        in_text = Some("expression");
                    }
                    b"output" => {
                        out_type = attrs.get("type").cloned().unwrap_or_default();
                        text.clear();
                        in_text = Some("output");
                    }
                    _ => {}
                }
            }
            Ok(Event::Text(t)) if in_text.is_some() => {
                text.push_str(&t.decode().unwrap_or_default());
            }
            Ok(Event::CData(t)) if in_text.is_some() => {
                text.push_str(&String::from_utf8_lossy(&t));
            }
            Ok(Event::GeneralRef(r)) if in_text.is_some() => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    text.push(c);
                } else {
                    let name = r.decode().unwrap_or_default();
                    text.push_str(match name.as_ref() {
                        "lt" => "<",
                        "gt" => ">",
                        "amp" => "&",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "?",
                    });
                }
            }
            Ok(Event::End(e)) => match e.name().as_ref() {
                b"expression" => {
                    if let Some(c) = cur.as_mut() {
                        c.expression = text.clone();
                    }
                    in_text = None;
                }
                b"output" => {
                    if let Some(c) = cur.as_mut() {
                        c.outputs.push((out_type.clone(), text.clone()));
                    }
                    in_text = None;
                }
                b"test" => {
                    if let Some(c) = cur.take() {
                        cases.push(c);
                    }
                }
                _ => {}
            },
            Ok(Event::Eof) => break,
            Err(e) => panic!("test XML error: {e}"),
            _ => {}
        }
    }
    cases
}

/// Renders an item the way the test suite writes expected outputs.
fn render(item: &Item<'_>) -> String {
    let j = item.to_json();
    match item {
        Item::Date(_) | Item::DateTime(_) => format!("@{}", j.as_str().unwrap_or("")),
        Item::Time(_) => format!("@T{}", j.as_str().unwrap_or("")),
        Item::Quantity(q) => q.to_string(),
        Item::Node(_) => match (&j, item.type_name()) {
            (Value::String(s), Some("date" | "dateTime" | "instant")) => format!("@{s}"),
            (Value::String(s), Some("time")) => format!("@T{s}"),
            (Value::String(s), _) => s.clone(),
            (Value::Object(o), _) if o.contains_key("value") => {
                let v = o.get("value").map(|v| v.to_string()).unwrap_or_default();
                let u = o
                    .get("code")
                    .or_else(|| o.get("unit"))
                    .and_then(Value::as_str)
                    .unwrap_or("1");
                format!("{v} '{u}'")
            }
            (other, _) => other.to_string(),
        },
        _ => match j {
            Value::String(s) => s,
            other => other.to_string(),
        },
    }
}

fn type_ok(expected: &str, item: &Item<'_>) -> bool {
    let t = item.type_name().unwrap_or("");
    match expected {
        "" => true,
        "boolean" => matches!(t, "System.Boolean" | "boolean"),
        "integer" => matches!(
            t,
            "System.Integer" | "integer" | "positiveInt" | "unsignedInt"
        ),
        "decimal" => matches!(t, "System.Decimal" | "decimal" | "System.Integer"),
        "string" | "code" | "id" | "uri" => {
            t == "System.String"
                || !t.starts_with("System.") && item.as_json_node().is_some_and(Value::is_string)
        }
        "date" => matches!(t, "System.Date" | "date"),
        "dateTime" => matches!(t, "System.DateTime" | "dateTime" | "instant"),
        "time" => matches!(t, "System.Time" | "time"),
        "Quantity" => matches!(t, "System.Quantity" | "Quantity"),
        _ => true,
    }
}

fn value_ok(expected_type: &str, expected: &str, item: &Item<'_>) -> bool {
    let got = render(item);
    if got == expected {
        return true;
    }
    let num = |s: &str| s.trim().parse::<f64>().ok();
    if matches!(expected_type, "decimal" | "integer" | "") {
        if let (Some(a), Some(b)) = (num(&got), num(expected)) {
            return (a - b).abs() < 1e-9;
        }
    }
    if expected_type.is_empty() || expected_type == "Quantity" {
        // `1.58650000 'cm'` — compare value numerically and unit textually.
        let split = |s: &str| {
            s.split_once(' ')
                .map(|(v, u)| (num(v), u.trim().to_string()))
        };
        if let (Some((Some(a), ua)), Some((Some(b), ub))) = (split(&got), split(expected)) {
            return (a - b).abs() < 1e-9 && ua == ub;
        }
    }
    false
}

fn run_case(case: &Case, inputs: &HashMap<String, Value>) -> Result<(), String> {
    let input = if case.input_file.is_empty() {
        Value::Object(Default::default())
    } else {
        let json_name = case.input_file.replace(".xml", ".json");
        inputs
            .get(&json_name)
            .cloned()
            .ok_or_else(|| format!("missing input {json_name}"))?
    };
    let expr = match Expression::parse(&case.expression) {
        Ok(e) => e,
        Err(e) => {
            return if case.invalid.is_some() {
                Ok(())
            } else {
                Err(format!("parse error: {e}"))
            };
        }
    };
    let ctx = Context::new(&input).with_strict(case.strict);
    let result = match evaluate(&expr, &input, &ctx) {
        Ok(r) => r,
        Err(e) => {
            return if case.invalid.is_some() {
                Ok(())
            } else {
                Err(format!("error: {e}"))
            };
        }
    };
    if let Some(kind) = &case.invalid {
        return Err(format!(
            "expected {kind} error, got [{}]",
            result.iter().map(render).collect::<Vec<_>>().join(", ")
        ));
    }
    let got: Vec<(String, String)> = if case.predicate {
        vec![("boolean".into(), (!result.is_empty()).to_string())]
    } else {
        result
            .iter()
            .map(|i| (i.type_name().unwrap_or("?").to_string(), render(i)))
            .collect()
    };
    let ok = if case.predicate {
        case.outputs.len() == 1 && got[0].1 == case.outputs[0].1
    } else {
        result.len() == case.outputs.len()
            && result
                .iter()
                .zip(&case.outputs)
                .all(|(item, (t, v))| type_ok(t, item) && value_ok(t, v, item))
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected [{}], got [{}]",
            case.outputs
                .iter()
                .map(|(t, v)| format!("{t}:{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            got.iter()
                .map(|(t, v)| format!("{t}:{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[test]
fn official_fhirpath_r4_suite() {
    let Some(shared) = shared_dir() else {
        println!("NOTICE: ../shared/fhirpath not found; skipping the official FHIRPath suite");
        return;
    };
    let xml = std::fs::read_to_string(shared.join("fhirpath/tests-fhir-r4.xml")).unwrap();
    let cases = parse_cases(&xml);
    let mut inputs = HashMap::new();
    for entry in std::fs::read_dir(shared.join("fhirpath/input-json"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                inputs.insert(name, v);
            }
        }
    }
    let only = std::env::var("FHIRPATH_TEST").ok();
    let mut passed = 0;
    let mut failures = Vec::new();
    for case in &cases {
        if only.as_deref().is_some_and(|o| !case.name.contains(o)) {
            continue;
        }
        let outcome = std::panic::catch_unwind(|| run_case(case, &inputs))
            .unwrap_or_else(|_| Err("PANIC".to_string()));
        match outcome {
            Ok(()) => passed += 1,
            Err(why) => failures.push((case, why)),
        }
    }
    for (case, why) in &failures {
        println!(
            "FAIL [{}] {}: `{}` -> {}",
            case.group,
            case.name,
            case.expression.replace('\n', " "),
            why
        );
    }
    let total = passed + failures.len();
    println!("{passed} passed, {} failed (of {total})", failures.len());
    assert!(
        failures.iter().all(|(_, w)| w != "PANIC"),
        "the engine panicked"
    );
    if only.is_none() {
        assert!(total >= 900, "expected ~937 tests, parsed {total}");
        let rate = passed as f64 / total as f64;
        assert!(
            rate >= MIN_PASS_RATE,
            "pass rate {:.1}% below {:.1}%",
            rate * 100.0,
            MIN_PASS_RATE * 100.0
        );
    }
}
