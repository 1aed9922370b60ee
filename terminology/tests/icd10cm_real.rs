//! Loads the real CMS FY2026 ICD-10-CM tabular XML from `../shared` (skips when absent).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use kiln_terminology::icd10cm::{dotted, load_tabular_file};
use kiln_terminology::{CodeSystemProvider, Subsumption};

fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/terminology"
    ));
    if p.join("icd10cm-tabular-2026.xml").exists() {
        Some(p)
    } else {
        println!("NOTICE: ../shared/terminology absent; ICD-10-CM real-data test skipped");
        None
    }
}

#[test]
fn icd10cm_2026_tabular() {
    let Some(dir) = shared() else { return };
    let t0 = Instant::now();
    let t = load_tabular_file(&dir.join("icd10cm-tabular-2026.xml")).expect("load");
    println!(
        "ICD-10-CM 2026: {} concepts loaded in {:?}",
        t.len(),
        t0.elapsed()
    );
    assert_eq!(t.version.as_deref(), Some("2026"));
    assert!(t.len() > 90_000, "{}", t.len());

    // A00 subsumes A00.0; is-a A00 = A00, A00.0, A00.1, A00.9
    assert_eq!(t.subsumes("A00", "A00.0"), Some(Subsumption::Subsumes));
    let isa = t.filter("concept", "is-a", "A00").unwrap();
    println!("is-a A00: {isa:?}");
    assert_eq!(isa, vec!["A00", "A00.0", "A00.1", "A00.9"]);
    assert_eq!(t.subsumes("A00-B99", "A00.9"), Some(Subsumption::Subsumes));
    assert!(t.filter("concept", "is-a", "A00-A09").unwrap().len() > 50);
    // 7th character generation
    let s = t.lookup("S00.00XA").expect("S00.00XA");
    assert!(s.display.unwrap().ends_with("initial encounter"));
    assert!(t.lookup("T07.XXXA").is_some());

    // every FY2024 billable code that still exists in FY2026 validates
    let codes = std::fs::read_to_string(dir.join("icd10cm-codes-2024.txt")).unwrap();
    let mut total = 0;
    let mut absent = Vec::new();
    for line in codes.lines() {
        let code = line.get(..7).unwrap_or(line).trim();
        if code.is_empty() {
            continue;
        }
        total += 1;
        if t.lookup(&dotted(code)).is_none() {
            absent.push(code.to_string());
        }
    }
    println!(
        "FY2024 billable codes: {total}; present in FY2026 tabular: {}; absent (deleted in FY2025/2026): {}",
        total - absent.len(),
        absent.len()
    );
    println!("first absent: {:?}", &absent[..absent.len().min(10)]);
    assert_eq!(total, 74_044);
    // deletions between FY2024 and FY2026 are a few hundred codes at most
    assert!(absent.len() < 1_000, "{}", absent.len());
    let uniq: HashSet<_> = absent.iter().collect();
    assert_eq!(uniq.len(), absent.len());
}
