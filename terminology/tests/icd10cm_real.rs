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

#[test]
fn icd10cm_through_the_service_and_gem_translate() {
    use kiln_terminology::{Terminology, TerminologyStore};
    use serde_json::json;
    use std::sync::Arc;
    let Some(dir) = shared() else { return };
    let store_dir = std::env::temp_dir().join(format!("kiln-tx-real-{}", std::process::id()));
    let store = TerminologyStore::open(&store_dir).unwrap();
    let t0 = Instant::now();
    store
        .import_icd10cm(&dir.join("icd10cm-tabular-2026.xml"))
        .unwrap();
    let gem = store
        .import_gem(&dir.join("icd10cm-to-icd9-gem.csv"))
        .unwrap();
    println!("import ICD-10-CM + GEM into store: {:?}", t0.elapsed());
    let t1 = Instant::now();
    let table = store.load("icd10cm").unwrap().expect("snapshot");
    println!("reload ICD-10-CM snapshot: {:?}", t1.elapsed());
    let mut tx = Terminology::new();
    tx.add_code_system(Arc::new(table));
    tx.add_resource(store.load_resource("icd10cm-gem").unwrap().expect("gem"))
        .unwrap();
    assert!(gem["group"][0]["element"].as_array().unwrap().len() > 60_000);

    let sys = "http://hl7.org/fhir/sid/icd-10-cm";
    let r = tx
        .validate_code_cs(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "url", "valueUri": sys}, {"name": "code", "valueCode": "E11.9"}]}))
        .unwrap();
    assert!(r["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "result" && p["valueBoolean"] == true));

    let r = tx
        .translate(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "system", "valueUri": sys}, {"name": "code", "valueCode": "A00.0"},
            {"name": "targetsystem", "valueUri": "http://hl7.org/fhir/sid/icd-9-cm"}]}))
        .unwrap();
    let s = r.to_string();
    assert!(s.contains("\"001.0\""), "{s}");
    let r = tx
        .translate(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "system", "valueUri": "http://hl7.org/fhir/sid/icd-9-cm"}, {"name": "code", "valueCode": "001.0"},
            {"name": "targetsystem", "valueUri": sys}, {"name": "reverse", "valueBoolean": true}]}))
        .unwrap();
    assert!(r.to_string().contains("\"A00.0\""), "{r}");

    // implicit value set expansion with a text filter, paged
    let vs = json!({"resourceType": "ValueSet", "url": "http://example.org/vs/e11", "status": "active",
        "compose": {"include": [{"system": sys, "filter": [{"property": "concept", "op": "is-a", "value": "E11"}]}]}});
    let t2 = Instant::now();
    let e = tx
        .expand(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "valueSet", "resource": vs}, {"name": "filter", "valueString": "retinopathy macular"},
            {"name": "count", "valueInteger": 5}]}))
        .unwrap();
    println!("expand is-a E11 + filter: {:?}", t2.elapsed());
    let total = e["expansion"]["total"].as_i64().unwrap();
    assert!(total > 10, "{total}");
    assert_eq!(e["expansion"]["contains"].as_array().unwrap().len(), 5);
    let _ = std::fs::remove_dir_all(&store_dir);
}

#[cfg(feature = "text-index")]
#[test]
fn icd10cm_text_index() {
    use kiln_terminology::TerminologyStore;
    let Some(dir) = shared() else { return };
    let t = load_tabular_file(&dir.join("icd10cm-tabular-2026.xml")).expect("load");
    let store_dir = std::env::temp_dir().join(format!("kiln-tx-index-real-{}", std::process::id()));
    let store = TerminologyStore::open(&store_dir).unwrap();
    let t0 = Instant::now();
    let idx = store.build_text_index("icd10cm", &t).unwrap();
    println!(
        "tantivy index of {} ICD-10-CM concepts built in {:?}",
        idx.len(),
        t0.elapsed()
    );
    let idx = store.open_text_index("icd10cm").unwrap();
    assert_eq!(idx.len(), t.len() as u64);
    let mut indexed = t.clone();
    indexed.set_text_index(std::sync::Arc::new(idx));
    for q in ["diab retin", "fract femur", "E11.9", "cholera"] {
        let t1 = Instant::now();
        let r = indexed.search(q, 10);
        let took = t1.elapsed();
        let t2 = Instant::now();
        let scan = t.search(q, 10);
        println!(
            "search {q:?}: {:?} in {took:?} with the index, {:?} scanning",
            &r[..r.len().min(3)],
            t2.elapsed()
        );
        assert!(!r.is_empty(), "{q}");
        assert_eq!(r, scan, "the index ranks like the scan for {q}");
    }
    // pages and totals of 3-letter filters (and a code prefix) equal the scan's
    for q in ["dia", "fra", "E11"] {
        let t1 = Instant::now();
        let r = indexed.search_page(q, false, 20, 10);
        let took = t1.elapsed();
        let scan = t.search_page(q, false, 20, 10);
        println!(
            "search page {q:?}: total {} in {took:?} with the index",
            r.1
        );
        assert!(r.1 > 30, "{q}: {}", r.1);
        assert_eq!(r, scan, "the index pages and counts like the scan for {q}");
    }
    assert_eq!(indexed.search("E11.9", 1)[0], "E11.9");
    let r = indexed.search("cholera", 5);
    assert_eq!(
        r[0], "A00",
        "display starts with the text ranks first: {r:?}"
    );
    let _ = std::fs::remove_dir_all(&store_dir);
}

/// Expected size of `is-a {root}`, computed from the XML text independently of the loader: a
/// plain scan of `<diag>`/`</diag>`/`<name>`/`<sevenChrDef>`/`<extension>` tags. Every `<diag>`
/// below the root is one code; a leaf `<diag>` under a `sevenChrDef` (its own or its nearest
/// ancestor's) has one more code per 7th-character extension.
fn expected_isa_count(xml: &str, root: &str) -> usize {
    struct D {
        name: String,
        exts: Option<usize>,
        children: Vec<usize>,
        top: bool,
    }
    let mut ds: Vec<D> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut i = 0;
    let mut in_seven: Option<usize> = None;
    while let Some(off) = xml[i..].find('<') {
        let at = i + off;
        let rest = &xml[at..];
        // `<diag>` or `<diag placeholder="true">`
        if rest.starts_with("<diag>") || rest.starts_with("<diag ") {
            let idx = ds.len();
            ds.push(D {
                name: String::new(),
                exts: None,
                children: Vec::new(),
                top: open.is_empty(),
            });
            if let Some(&p) = open.last() {
                ds[p].children.push(idx);
            }
            open.push(idx);
        } else if rest.starts_with("</diag>") {
            open.pop();
        } else if rest.starts_with("<name>") {
            if let Some(&d) = open.last() {
                if ds[d].name.is_empty() {
                    let end = rest.find("</name>").unwrap();
                    ds[d].name = rest[6..end].trim().to_string();
                }
            }
        } else if rest.starts_with("<sevenChrDef>") {
            in_seven = open.last().copied();
            if let Some(d) = in_seven {
                ds[d].exts = Some(0);
            }
        } else if rest.starts_with("</sevenChrDef>") {
            in_seven = None;
        } else if rest.starts_with("<extension ") {
            if let Some(d) = in_seven {
                *ds[d].exts.as_mut().unwrap() += 1;
            }
        }
        i = at + 1;
    }
    fn count(ds: &[D], i: usize, inherited: Option<usize>) -> usize {
        let exts = ds[i].exts.or(inherited);
        if ds[i].children.is_empty() {
            return 1 + exts.unwrap_or(0);
        }
        1 + ds[i]
            .children
            .iter()
            .map(|&c| count(ds, c, exts))
            .sum::<usize>()
    }
    // the root's own sevenChrDef may be inherited from an ancestor: find its chain
    fn find(ds: &[D], i: usize, root: &str, inherited: Option<usize>) -> Option<usize> {
        let exts = ds[i].exts.or(inherited);
        if ds[i].name == root {
            return Some(count(ds, i, inherited));
        }
        ds[i].children.iter().find_map(|&c| find(ds, c, root, exts))
    }
    let tops: Vec<usize> = (0..ds.len()).filter(|&i| ds[i].top).collect();
    tops.into_iter()
        .find_map(|t| find(&ds, t, root, None))
        .unwrap_or_else(|| panic!("{root} not in the XML"))
}

#[test]
fn icd10cm_done_when_through_the_operations() {
    use kiln_terminology::Terminology;
    use serde_json::json;
    use std::sync::Arc;
    let Some(dir) = shared() else { return };
    let xml = std::fs::read_to_string(dir.join("icd10cm-tabular-2026.xml")).unwrap();
    let table = kiln_terminology::icd10cm::load_tabular(&xml, "icd10cm-tabular-2026.xml").unwrap();
    let present: Vec<String> = table.concepts.iter().map(|c| c.code.clone()).collect();
    let mut tx = Terminology::new();
    tx.add_code_system(Arc::new(table));
    let sys = "http://hl7.org/fhir/sid/icd-10-cm";
    let p = |ps: serde_json::Value| json!({"resourceType": "Parameters", "parameter": ps});
    let param = |r: &serde_json::Value, n: &str| -> serde_json::Value {
        r["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .cloned()
            .unwrap_or(json!(null))
    };

    // $subsumes A00 vs A00.0
    let r = tx
        .subsumes(&p(json!([{"name": "system", "valueUri": sys},
            {"name": "codeA", "valueCode": "A00"}, {"name": "codeB", "valueCode": "A00.0"}])))
        .unwrap();
    assert_eq!(param(&r, "outcome")["valueCode"], "subsumes");
    let r = tx
        .subsumes(&p(json!([{"name": "system", "valueUri": sys},
            {"name": "codeA", "valueCode": "A00.0"}, {"name": "codeB", "valueCode": "A00"}])))
        .unwrap();
    assert_eq!(param(&r, "outcome")["valueCode"], "subsumed-by");

    // $expand of is-a value sets: the total equals the count computed from the XML text
    for root in ["A00", "E11", "S72", "T36", "O30"] {
        let expected = expected_isa_count(&xml, root);
        let vs = json!({"resourceType": "ValueSet", "status": "active", "compose": {"include": [
            {"system": sys, "filter": [{"property": "concept", "op": "is-a", "value": root}]}]}});
        let e = tx
            .expand(&p(json!([{"name": "valueSet", "resource": vs},
                {"name": "count", "valueInteger": 1}])))
            .unwrap();
        println!(
            "$expand is-a {root}: total {} (expected from the XML: {expected})",
            e["expansion"]["total"]
        );
        assert_eq!(e["expansion"]["total"], expected, "is-a {root}");
    }

    // every FY2024 billable code still in the FY2026 tabular validates with $validate-code
    let codes = std::fs::read_to_string(dir.join("icd10cm-codes-2024.txt")).unwrap();
    let present: HashSet<String> = present.into_iter().collect();
    let (mut valid, mut absent) = (0usize, Vec::new());
    let t0 = Instant::now();
    for line in codes.lines() {
        let code = line.get(..7).unwrap_or(line).trim();
        if code.is_empty() {
            continue;
        }
        let d = dotted(code);
        if !present.contains(&d) {
            absent.push(d);
            continue;
        }
        let r = tx
            .validate_code_cs(&p(json!([{"name": "url", "valueUri": sys},
                {"name": "code", "valueCode": d}])))
            .unwrap();
        assert_eq!(param(&r, "result")["valueBoolean"], true, "{d}: {r}");
        valid += 1;
    }
    // why the others are gone: their stem was subdivided into more specific codes (so the
    // placeholder/leaf code no longer exists), or they were deleted outright
    let (mut subdivided, mut deleted) = (Vec::new(), Vec::new());
    for a in &absent {
        // the stem of a 7th-character code is the code without its 7th character and `X`
        // placeholders (`S30.1XXA` → `S30.1`)
        let stem = if a.len() == 8 {
            a[..7].trim_end_matches('X').to_string()
        } else {
            a.clone()
        };
        if present.iter().any(|c| {
            c.starts_with(stem.as_str())
                && c.len() > stem.len()
                && !c[stem.len()..].starts_with('X')
        }) {
            subdivided.push(a.clone());
        } else {
            deleted.push(a.clone());
        }
    }
    println!(
        "FY2024 billable codes: {} validate in FY2026 ({:?}); {} not in FY2026: {} subdivided into more specific codes {:?}, {} deleted {:?}",
        valid,
        t0.elapsed(),
        absent.len(),
        subdivided.len(),
        subdivided,
        deleted.len(),
        deleted
    );
    assert_eq!(valid + absent.len(), 74_044);
    assert!(valid > 74_000, "{valid}");
    // and a code that is not in FY2026 is reported invalid
    if let Some(a) = absent.first() {
        let r = tx
            .validate_code_cs(&p(json!([{"name": "url", "valueUri": sys},
                {"name": "code", "valueCode": a}])))
            .unwrap();
        assert_eq!(param(&r, "result")["valueBoolean"], false);
    }
}
