//! Official FHIR XML (the FHIRPath test-suite inputs) parsed with `xml_to_json` must equal their
//! published JSON versions (narrative `div`s aside: the two renderings differ in whitespace).

mod common;

use kiln_fhir::xml::{json_to_xml, xml_to_json};
use serde_json::Value;

fn strip_divs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("div");
            m.values_mut().for_each(strip_divs);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_divs),
        _ => {}
    }
}

/// The sequence of FHIR elements (name + value/url/id attributes) of an XML document, without
/// whitespace, comments and narrative content.
fn element_sequence(xml: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                let mut attrs: Vec<String> = e
                    .attributes()
                    .flatten()
                    .filter(|a| !a.key.as_ref().starts_with(b"xmlns"))
                    .map(|a| {
                        format!(
                            "{}={}",
                            String::from_utf8_lossy(a.key.as_ref()),
                            a.unescape_value().unwrap_or_default()
                        )
                    })
                    .collect();
                attrs.sort();
                out.push(format!("{name} {}", attrs.join(" ")));
                if name == "div" {
                    // skip the narrative's content
                    let end = e.name().as_ref().to_vec();
                    let _ = reader.read_to_end(quick_xml::name::QName(&end));
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    out
}

/// Our XML for the official JSON has the official XML's elements in the official order.
#[test]
fn xml_output_has_official_element_order() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let xml_dir = shared.join("fhirpath/input");
    let json_dir = shared.join("fhirpath/input-json");
    let Ok(entries) = std::fs::read_dir(&xml_dir) else {
        println!("NOTICE: {} absent; skipping", xml_dir.display());
        return;
    };
    let mut compared = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let n = e.file_name().to_string_lossy().into_owned();
        // parameters-example-types: its JSON twin is wrong (valueUuid as an object);
        // observation-example: the test fixture has <status> before <extension>, which is out of
        // the R4 order (DomainResource.extension comes first).
        if !n.ends_with(".xml")
            || n == "parameters-example-types.xml"
            || n == "observation-example.xml"
        {
            continue;
        }
        let (Ok(xml), Ok(json)) = (
            std::fs::read_to_string(xml_dir.join(&n)),
            std::fs::read_to_string(json_dir.join(n.replace(".xml", ".json"))),
        ) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<Value>(&json) else {
            continue;
        };
        let ours = json_to_xml(&json, true).expect("official JSON converts");
        let (a, b) = (element_sequence(&xml), element_sequence(&ours));
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a.len() == b.len() && first.is_none(),
            "{n}: element sequences differ at {first:?}: official {:?} vs ours {:?}",
            first.map(|i| &a[i]),
            first.map(|i| &b[i])
        );
        compared += 1;
    }
    println!("element order identical to the official XML for {compared} documents");
    assert!(compared >= 5);
}

#[test]
fn official_xml_matches_official_json() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let xml_dir = shared.join("fhirpath/input");
    let json_dir = shared.join("fhirpath/input-json");
    let Ok(entries) = std::fs::read_dir(&xml_dir) else {
        println!("NOTICE: {} absent; skipping", xml_dir.display());
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".xml"))
        .collect();
    names.sort();
    let (mut compared, mut equal, mut failures) = (0, 0, Vec::new());
    for n in &names {
        let Ok(xml) = std::fs::read_to_string(xml_dir.join(n)) else {
            continue;
        };
        let parsed = match xml_to_json(&xml) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{n}: {e}"));
                continue;
            }
        };
        // XML → JSON → XML → JSON is stable.
        let again = json_to_xml(&parsed, false)
            .ok()
            .and_then(|x| xml_to_json(&x).ok());
        if again.as_ref() != Some(&parsed) {
            failures.push(format!("{n}: not stable through json_to_xml"));
        }
        let json_name = n.replace(".xml", ".json");
        let Ok(text) = std::fs::read_to_string(json_dir.join(&json_name)) else {
            continue;
        };
        let Ok(mut expected) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        compared += 1;
        let mut got = parsed;
        strip_divs(&mut got);
        strip_divs(&mut expected);
        match common::first_diff(&expected, &got, "") {
            None => equal += 1,
            Some(d) => failures.push(format!("{n}: {d}")),
        }
    }
    println!(
        "official XML: {} files, {compared} with JSON twins, {equal} equal; failures:",
        names.len()
    );
    for f in &failures {
        println!("  {f}");
    }
    // Known-bad inputs: myconsent-ext.xml is an STU3 StructureDefinition (`contextType` is not
    // R4); the JSON twin of parameters-example-types.xml wrongly writes valueUuid as an object.
    const KNOWN_BAD: [&str; 2] = ["myconsent-ext.xml", "parameters-example-types.xml"];
    let unexpected: Vec<_> = failures
        .iter()
        .filter(|f| !KNOWN_BAD.iter().any(|k| f.starts_with(k)))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(equal >= 6);
}
