//! Every JSON example of the R4 examples package: JSON → XML → JSON must give the original.

mod common;

use kiln_fhir::xml::{json_to_xml, xml_to_json};

#[test]
fn examples_round_trip_through_xml() {
    let Some(examples) = common::examples() else {
        return;
    };
    let mut passed = 0usize;
    let mut failures = Vec::new();
    let start = std::time::Instant::now();
    for (i, (name, json)) in examples.iter().enumerate() {
        // pretty output for all, compact output for every 4th example as well
        let pretty = i % 4 != 0;
        let result = json_to_xml(json, pretty)
            .map_err(|e| format!("json→xml: {e}"))
            .and_then(|xml| xml_to_json(&xml).map_err(|e| format!("xml→json: {e}")))
            .and_then(|back| match common::first_diff(json, &back, "") {
                None => Ok(()),
                Some(d) => Err(format!("differs: {d}")),
            });
        match result {
            Ok(()) => passed += 1,
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    println!(
        "xml round trip: {passed} passed, {} failed ({} examples, {:.1}s)",
        failures.len(),
        examples.len(),
        start.elapsed().as_secs_f64()
    );
    for f in failures.iter().take(40) {
        println!("  FAIL {f}");
    }
    let total = examples.len().max(1);
    assert!(
        passed * 100 >= total * 99,
        "fewer than 99 % of the examples round-trip"
    );
}

#[test]
fn synthea_xml_timing() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let dir = shared.join("synthea-r4");
    let Some(first) = std::fs::read_dir(&dir).ok().and_then(|d| {
        let mut v: Vec<_> = d
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        v.sort();
        v.into_iter().next()
    }) else {
        println!("NOTICE: {} absent; skipping", dir.display());
        return;
    };
    let Ok(text) = std::fs::read_to_string(&first) else {
        return;
    };
    let Ok(bundle) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    // the whole transaction Bundle round-trips
    let xml = json_to_xml(&bundle, false).expect("bundle to xml");
    assert_eq!(xml_to_json(&xml).expect("bundle from xml"), bundle);
    for rt in ["Patient", "Observation"] {
        let Some(r) = bundle["entry"].as_array().and_then(|a| {
            a.iter()
                .map(|e| &e["resource"])
                .find(|r| r["resourceType"] == rt)
        }) else {
            continue;
        };
        let n = 500;
        let start = std::time::Instant::now();
        let mut xml = String::new();
        for _ in 0..n {
            xml = json_to_xml(std::hint::black_box(r), false).expect("to xml");
        }
        let to_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(xml_to_json(std::hint::black_box(&xml)).expect("from xml"));
        }
        let from_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("Synthea {rt}: json_to_xml {to_us:.1} µs, xml_to_json {from_us:.1} µs");
    }
}
