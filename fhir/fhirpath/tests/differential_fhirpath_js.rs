//! Optional differential test against the reference JavaScript engine (`fhirpath` npm package).
//! Runs only when `FHIRPATH_JS_RESULTS` (JSON lines `{file, expr, result}` produced by fhirpath.js
//! over the R4 spec examples) and `FHIRPATH_EXAMPLES_DIR` (the unpacked examples) are set.

use kiln_fhirpath::{evaluate, Context, Expression};
use serde_json::Value;
use std::collections::HashMap;

fn normalize(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .to_string()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        other => other.clone(),
    }
}

#[test]
fn differential_against_fhirpath_js() {
    let (Ok(results), Ok(dir)) = (
        std::env::var("FHIRPATH_JS_RESULTS"),
        std::env::var("FHIRPATH_EXAMPLES_DIR"),
    ) else {
        println!("NOTICE: FHIRPATH_JS_RESULTS / FHIRPATH_EXAMPLES_DIR not set; skipping");
        return;
    };
    let text = std::fs::read_to_string(results).expect("results file");
    let mut resources: HashMap<String, Value> = HashMap::new();
    let mut exprs: HashMap<String, Expression> = HashMap::new();
    let (mut same, mut different, mut js_errors) = (0usize, 0usize, 0usize);
    let mut by_expr: HashMap<String, (usize, String)> = HashMap::new();
    for line in text.lines() {
        let rec: Value = serde_json::from_str(line).expect("json line");
        let file = rec["file"].as_str().unwrap_or_default().to_string();
        let src = rec["expr"].as_str().unwrap_or_default().to_string();
        if rec["result"].get("error").is_some() {
            js_errors += 1;
            continue;
        }
        let res = resources.entry(file.clone()).or_insert_with(|| {
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{file}")).unwrap())
                .unwrap()
        });
        let expr = exprs
            .entry(src.clone())
            .or_insert_with(|| Expression::parse(&src).unwrap())
            .clone();
        let ctx = Context::new(res).with_reference_stubs(false);
        let ours: Value = match evaluate(&expr, res, &ctx) {
            Ok(items) => Value::Array(items.iter().map(|i| i.to_json()).collect()),
            Err(e) => Value::String(format!("ERROR {e}")),
        };
        if normalize(&ours) == normalize(&rec["result"]) {
            same += 1;
        } else {
            different += 1;
            let e = by_expr.entry(src.clone()).or_insert((0, String::new()));
            e.0 += 1;
            if e.1.is_empty() {
                e.1 = format!("{file}: js={} ours={}", rec["result"], ours);
            }
        }
    }
    let mut v: Vec<_> = by_expr.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
    for (expr, (n, example)) in v.iter().take(40) {
        println!(
            "{n:5} × `{expr}`\n      {}",
            example.chars().take(400).collect::<String>()
        );
    }
    println!("{same} identical, {different} different, {js_errors} fhirpath.js errors");
}
