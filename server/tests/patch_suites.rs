//! fhir-test-cases' JSON Patch suite (`../shared/patch/json-patch-tests.json`) run through the
//! server's patch code (`kiln_server::interactions::patch::apply_patch`). The FHIRPath Patch suite
//! runs in `kiln-fhirpath` (it exercises `kiln_fhirpath::patch::apply`, which the server calls).

use kiln_server::format::BodyKind;
use kiln_server::interactions::patch::apply_patch;
use serde_json::Value;

#[test]
fn official_json_patch_suite() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/patch/json-patch-tests.json"
    );
    let Ok(text) = std::fs::read_to_string(path) else {
        println!("notice: {path} absent: JSON Patch suite skipped");
        return;
    };
    let tests: Vec<Value> = serde_json::from_str(&text).expect("suite is JSON");
    let (mut passed, mut failed) = (0, Vec::new());
    for t in &tests {
        let name = t["comment"].as_str().unwrap_or("?");
        let result = apply_patch(&t["doc"], BodyKind::JsonPatch, &t["patch"]);
        let ok = match (t.get("expected"), t.get("error"), &result) {
            (Some(exp), _, Ok(got)) => got == exp,
            (None, Some(_), Err(_)) => true,
            _ => false,
        };
        if ok {
            passed += 1;
        } else {
            failed.push(format!("{name}: {:?}", result.map_err(|e| e.issues)));
        }
    }
    println!(
        "JSON Patch official suite: {passed} passed, {} failed",
        failed.len()
    );
    for f in &failed {
        println!("  FAILED {f}");
    }
    assert_eq!(tests.len(), 16, "the suite has 16 cases");
    assert!(failed.is_empty(), "{failed:?}");
}
