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
