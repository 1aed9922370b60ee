//! `cargo run -p kiln-fhir --example validate_dir -- <dir> [--xml]`: validates every `*.json`
//! resource in a directory and prints the files with errors and the most frequent messages;
//! with `--xml` also checks that JSON → XML → JSON gives the original.
use std::collections::BTreeMap;

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: validate_dir <dir>");
        std::process::exit(2);
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("cannot read {dir}");
        std::process::exit(1);
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let xml = std::env::args().any(|a| a == "--xml");
    let (mut clean, mut bad, mut xml_ok, mut xml_bad) = (0, 0, 0, 0);
    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
    for p in &paths {
        let Some(v) = std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            continue;
        };
        if v.get("resourceType").is_none() {
            continue;
        }
        if xml {
            let back = kiln_fhir::json_to_xml(&v, false)
                .map_err(|e| e.to_string())
                .and_then(|x| kiln_fhir::xml_to_json(&x).map_err(|e| e.to_string()));
            match back {
                Ok(b) if b == v => xml_ok += 1,
                Ok(_) => {
                    xml_bad += 1;
                    println!("{}: XML round trip differs", p.display());
                }
                Err(e) => {
                    xml_bad += 1;
                    println!("{}: XML round trip failed: {e}", p.display());
                }
            }
        }
        let errors: Vec<_> = kiln_fhir::validate(&v)
            .into_iter()
            .filter(|i| i.is_error())
            .collect();
        if errors.is_empty() {
            clean += 1;
            continue;
        }
        bad += 1;
        println!(
            "{}: {} @ {}",
            p.file_name().unwrap_or_default().to_string_lossy(),
            errors[0].diagnostics,
            errors[0].expression.join(",")
        );
        for e in errors {
            let key: String = e.diagnostics.chars().take(60).collect();
            *messages.entry(key).or_default() += 1;
        }
    }
    let mut top: Vec<_> = messages.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    println!("{clean} valid, {bad} with errors");
    if xml {
        println!("XML round trip: {xml_ok} identical, {xml_bad} not");
    }
    for (m, n) in top.iter().take(25) {
        println!("{n:6} × {m}");
    }
}
