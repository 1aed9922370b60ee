//! The LOINC and SNOMED CT loaders on the fixtures in `tests/fixtures/` (hand-made, in the exact
//! official file layouts), through the terminology operations: implicit value sets (LOINC
//! `vs/LL…`/`vs/LP…`, SNOMED CT `?fhir_vs=isa|refset|ecl`), `$lookup` with dialects and
//! historical associations, `$translate` with the ICD-10 map, and malformed releases that must
//! leave the previously loaded version in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_terminology::{loinc, snomed, Terminology, TerminologyStore};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn service() -> Terminology {
    let mut tx = Terminology::new();
    let s = snomed::load_rf2_dir(
        &fixture("snomed"),
        Some("http://snomed.info/sct/900000000000207008/version/20250101"),
    )
    .unwrap();
    for r in &s.resources {
        tx.add_resource(r.clone()).unwrap();
    }
    tx.add_code_system(Arc::new(s));
    let l = loinc::load_loinc_dir(&fixture("loinc"), Some("2.80")).unwrap();
    tx.add_code_system(Arc::new(l));
    tx
}

fn params(ps: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": ps})
}

fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

/// The codes of an expansion, nested `contains` flattened (definition order).
fn codes(expansion: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        for c in v["contains"].as_array().into_iter().flatten() {
            if let Some(code) = c["code"].as_str() {
                out.push(code.to_string());
            }
            walk(c, out);
        }
    }
    let mut out = Vec::new();
    walk(&expansion["expansion"], &mut out);
    out
}

fn expand_url(tx: &Terminology, url: &str) -> Value {
    tx.expand(&params(json!([{"name": "url", "valueUri": url}])))
        .unwrap_or_else(|e| panic!("{url}: {:?}", e.issues))
}

#[test]
fn snomed_implicit_value_sets_and_ecl() {
    let tx = service();
    let sct = "http://snomed.info/sct";
    let mut c = codes(&expand_url(&tx, &format!("{sct}?fhir_vs=ecl/<< 73211009")));
    c.sort();
    assert_eq!(c, vec!["44054006", "73211009"]);
    // URL-encoded ECL, member-of
    let mut c = codes(&expand_url(
        &tx,
        &format!("{sct}?fhir_vs=ecl/%5E%20723264001"),
    ));
    c.sort();
    assert_eq!(c, vec!["44054006", "73211009"]);
    // an inactive member row (64572001) is not a member
    let mut c = codes(&expand_url(&tx, &format!("{sct}?fhir_vs=refset/723264001")));
    c.sort();
    assert_eq!(c, vec!["44054006", "73211009"]);
    assert_eq!(
        codes(&expand_url(&tx, &format!("{sct}?fhir_vs=refset"))),
        vec!["723264001"]
    );
    let mut c = codes(&expand_url(
        &tx,
        &format!("{sct}?fhir_vs=ecl/(<< 404684003 MINUS 44054006) OR 723264001"),
    ));
    c.sort();
    assert_eq!(c, vec!["404684003", "64572001", "723264001", "73211009"]);
    let mut c = codes(&expand_url(&tx, &format!("{sct}?fhir_vs=ecl/> 44054006")));
    c.sort();
    assert_eq!(c, vec!["138875005", "404684003", "64572001", "73211009"]);
    assert_eq!(
        codes(&expand_url(&tx, &format!("{sct}?fhir_vs=isa/73211009"))).len(),
        2
    );
    // all active and inactive concepts
    assert_eq!(
        expand_url(&tx, &format!("{sct}?fhir_vs"))["expansion"]["total"],
        7
    );
    // attribute refinement over the inferred finding-site (363698007) relationship
    assert_eq!(
        codes(&expand_url(
            &tx,
            &format!("{sct}?fhir_vs=ecl/< 404684003 : 363698007 = << 73211009")
        )),
        vec!["44054006"]
    );
    assert!(codes(&expand_url(
        &tx,
        &format!("{sct}?fhir_vs=ecl/< 404684003 : 363698007 = 404684003")
    ))
    .is_empty());
    // an ECL syntax error is a clear error, not an empty expansion
    let e = tx
        .expand(&params(json!([{"name": "url", "valueUri":
            format!("{sct}?fhir_vs=ecl/<< 73211009 AND 404684003 OR 64572001")}])))
        .unwrap_err();
    let text = format!("{:?}", e.issues);
    assert!(
        text.contains("Invalid ECL expression at position"),
        "{text}"
    );

    // $validate-code against an ECL value set
    let r = tx
        .validate_code_vs(&params(json!([
            {"name": "url", "valueUri": format!("{sct}?fhir_vs=ecl/<< 404684003")},
            {"name": "system", "valueUri": sct}, {"name": "code", "valueCode": "44054006"}])))
        .unwrap();
    assert_eq!(param(&r, "result").unwrap()["valueBoolean"], true, "{r}");
    let r = tx
        .validate_code_vs(&params(json!([
            {"name": "url", "valueUri": format!("{sct}?fhir_vs=ecl/<< 404684003")},
            {"name": "system", "valueUri": sct}, {"name": "code", "valueCode": "723264001"}])))
        .unwrap();
    assert_eq!(param(&r, "result").unwrap()["valueBoolean"], false, "{r}");
}

#[test]
fn snomed_dialects_history_and_maps() {
    let tx = service();
    let sct = "http://snomed.info/sct";
    let lookup = |code: &str, lang: Option<&str>| {
        let mut ps = vec![
            json!({"name": "system", "valueUri": sct}),
            json!({"name": "code", "valueCode": code}),
        ];
        if let Some(l) = lang {
            ps.push(json!({"name": "displayLanguage", "valueCode": l}));
        }
        tx.lookup(&params(Value::Array(ps))).unwrap()
    };
    let us = lookup("44054006", None);
    assert_eq!(
        param(&us, "display").unwrap()["valueString"],
        "Type 2 diabetes mellitus"
    );
    let us = lookup("44054006", Some("en-US"));
    assert_eq!(
        param(&us, "display").unwrap()["valueString"],
        "Type 2 diabetes mellitus"
    );
    let gb = lookup("44054006", Some("en-GB"));
    assert_eq!(
        param(&gb, "display").unwrap()["valueString"],
        "Type II diabetes mellitus",
        "{gb}"
    );
    // a term preferred in both dialects
    let gb = lookup("73211009", Some("en-GB"));
    assert_eq!(
        param(&gb, "display").unwrap()["valueString"],
        "Diabetes mellitus"
    );

    // the inactive concept names its replacement in $lookup and $validate-code
    let old = lookup("200000001", None);
    let s = old.to_string();
    assert!(s.contains("REPLACED BY") && s.contains("73211009"), "{s}");
    let r = tx
        .validate_code_cs(&params(json!([
            {"name": "url", "valueUri": sct}, {"name": "code", "valueCode": "200000001"}])))
        .unwrap();
    let s = r.to_string();
    assert!(
        s.contains("REPLACED BY 73211009 |Diabetes mellitus|"),
        "{s}"
    );

    // $subsumes over the inferred IS-A closure
    let r = tx
        .subsumes(&params(json!([{"name": "system", "valueUri": sct},
            {"name": "codeA", "valueCode": "404684003"}, {"name": "codeB", "valueCode": "44054006"}])))
        .unwrap();
    assert_eq!(param(&r, "outcome").unwrap()["valueCode"], "subsumes");

    // ICD-10 extended map and historical association as implicit concept maps
    let r = tx
        .translate(&params(json!([
            {"name": "url", "valueUri": format!("{sct}?fhir_cm=447562003")},
            {"name": "system", "valueUri": sct}, {"name": "code", "valueCode": "44054006"}])))
        .unwrap();
    assert!(r.to_string().contains("\"E11.9\""), "{r}");
    let r = tx
        .translate(&params(json!([
            {"name": "url", "valueUri": format!("{sct}?fhir_cm=447562003")},
            {"name": "system", "valueUri": "http://hl7.org/fhir/sid/icd-10"},
            {"name": "code", "valueCode": "E14.9"}, {"name": "reverse", "valueBoolean": true}])))
        .unwrap();
    assert!(r.to_string().contains("\"73211009\""), "{r}");
    let r = tx
        .translate(&params(json!([
            {"name": "url", "valueUri": format!("{sct}?fhir_cm=900000000000526001")},
            {"name": "system", "valueUri": sct}, {"name": "code", "valueCode": "200000001"}])))
        .unwrap();
    assert!(r.to_string().contains("\"73211009\""), "{r}");
}

#[test]
fn loinc_implicit_value_sets_parts_and_answers() {
    let tx = service();
    let answers = expand_url(&tx, "http://loinc.org/vs/LL2201-3");
    assert_eq!(
        codes(&answers),
        vec!["LA18976-3", "LA18977-1", "LA15920-4", "LA18978-9"]
    );
    let r = tx
        .validate_code_vs(&params(json!([
            {"name": "url", "valueUri": "http://loinc.org/vs/LL2201-3"},
            {"name": "system", "valueUri": "http://loinc.org"},
            {"name": "code", "valueCode": "LA15920-4"}])))
        .unwrap();
    assert_eq!(param(&r, "result").unwrap()["valueBoolean"], true, "{r}");
    assert_eq!(
        param(&r, "display").unwrap()["valueString"],
        "Former smoker"
    );
    // below the part LP7786-9 in the multiaxial hierarchy
    let mut c = codes(&expand_url(&tx, "http://loinc.org/vs/LP7786-9"));
    c.sort();
    assert!(
        c.contains(&"2345-7".to_string()) && c.contains(&"2339-0".to_string()),
        "{c:?}"
    );
    assert!(!c.contains(&"LP7786-9".to_string()));
    assert!(!c.contains(&"718-7".to_string()));
    // all of LOINC: 5 terms + 7 parts + 2 hierarchy nodes + 1 answer list + 4 answers
    let all = expand_url(&tx, "http://loinc.org/vs");
    assert_eq!(
        all["expansion"]["total"], 19,
        "{}",
        all["expansion"]["total"]
    );

    let r = tx
        .lookup(&params(
            json!([{"name": "system", "valueUri": "http://loinc.org"},
            {"name": "code", "valueCode": "2345-7"}, {"name": "property", "valueCode": "*"}]),
        ))
        .unwrap();
    let s = r.to_string();
    for p in [
        "COMPONENT",
        "PROPERTY",
        "TIME_ASPCT",
        "SYSTEM",
        "SCALE_TYP",
        "CLASS",
        "CLASSTYPE",
        "STATUS",
        "ORDER_OBS",
        "LP14635-4",
        "parent",
    ] {
        assert!(s.contains(p), "{p} missing from $lookup: {s}");
    }
    let r = tx
        .lookup(&params(json!([{"name": "system", "valueUri": "http://loinc.org"},
            {"name": "code", "valueCode": "72166-2"}, {"name": "property", "valueCode": "answer-list"}])))
        .unwrap();
    assert!(r.to_string().contains("LL2201-3"), "{r}");
    // the component part, by code or by name
    let vs = json!({"resourceType": "ValueSet", "status": "active", "compose": {"include": [
        {"system": "http://loinc.org", "filter": [{"property": "COMPONENT", "op": "=", "value": "LP14635-4"}]}]}});
    let mut c = codes(
        &tx.expand(&params(json!([{"name": "valueSet", "resource": vs}])))
            .unwrap(),
    );
    c.sort();
    assert_eq!(c, vec!["2339-0", "2345-7"]);
}

/// (file to overwrite, its malformed text, file name in the error, (line, column), message).
type MalformedCase = (
    &'static str,
    &'static str,
    &'static str,
    (usize, usize),
    &'static str,
);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-loader-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn malformed_loinc_release_is_located_and_leaves_the_previous_version() {
    let dir = tmp("loinc");
    let store = TerminologyStore::open(dir.join("store")).unwrap();
    store.import_loinc(&fixture("loinc"), Some("2.80")).unwrap();

    let cases: &[MalformedCase] = &[
        (
            "AccessoryFiles/PartFile/Part.csv",
            "\"PartNumber\",\"PartTypeName\",\"PartName\",\"PartDisplayName\",\"Status\"\r\n\"LP1-1\",\"COMPONENT\",\"A\",\"A\",\"ACTIVE\"\r\n\"LP2-2\",\"COMPONENT\",\"B\",\"B\",\"WEIRD\"\r\n",
            "Part.csv",
            (3, 5),
            "unknown part Status 'WEIRD'",
        ),
        (
            "AccessoryFiles/AnswerFile/LoincAnswerListLink.csv",
            "\"LoincNumber\",\"LongCommonName\",\"AnswerListId\"\r\n\"72166-2\",\"x\",\"LL2201-3\"\r\n\"99999-9\",\"y\",\"LL2201-3\"\r\n",
            "LoincAnswerListLink.csv",
            (3, 1),
            "unknown LOINC term",
        ),
        (
            "AccessoryFiles/PartFile/LoincPartLink_Primary.csv",
            "\"LoincNumber\",\"PartNumber\",\"PartName\"\r\n\"2345-7\",\"LP14635-4\",\"Glucose\"\r\n",
            "LoincPartLink_Primary.csv",
            (1, 1),
            "required column 'Property'",
        ),
        (
            "LoincTable/Loinc.csv",
            "\"LOINC_NUM\",\"LONG_COMMON_NAME\",\"STATUS\"\r\n\"2345-7\",\"Glucose\",\"ACTIVE\"\r\n\"718-7\",\"Hemoglobin \"x\" \",\"ACTIVE\"\r\n",
            "Loinc.csv",
            (3, 22),
            "unexpected character after closing quote",
        ),
    ];
    for (i, (file, text, name, (line, col), msg)) in cases.iter().enumerate() {
        let bad = dir.join(format!("bad{i}"));
        copy_dir(&fixture("loinc"), &bad);
        std::fs::write(bad.join(file), text).unwrap();
        let e = loinc::load_loinc_dir(&bad, Some("broken")).unwrap_err();
        println!("{e}");
        assert!(e.file.ends_with(name), "{e}");
        assert_eq!((e.line, e.column), (*line, *col), "{e}");
        assert!(e.message.contains(msg), "{e}");
        let e = store.import_loinc(&bad, Some("broken")).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        let t = store.load("loinc").unwrap().unwrap();
        assert_eq!(t.version.as_deref(), Some("2.80"), "previous version kept");
        assert!(t.get("LA15920-4").is_some());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_snomed_release_is_located_and_leaves_the_previous_version() {
    let dir = tmp("snomed");
    let store = TerminologyStore::open(dir.join("store")).unwrap();
    store.import_snomed(&fixture("snomed"), Some("v1")).unwrap();
    let snap = "SnomedCT_Fixture/Snapshot";
    let cases: &[MalformedCase] = &[
        (
            "Refset/Content/der2_cRefset_AssociationSnapshot_INT_20250101.txt",
            "id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\ttargetComponentId\r\nx\t20250101\t1\t900000000000207008\t900000000000526001\t200000001\t7321100X\r\n",
            "der2_cRefset_AssociationSnapshot_INT_20250101.txt",
            (2, 7),
            "invalid SCTID '7321100X'",
        ),
        (
            "Refset/Map/der2_iisssccRefset_ExtendedMapSnapshot_INT_20250101.txt",
            "id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\tmapGroup\tmapPriority\tmapRule\tmapAdvice\tmapTarget\tcorrelationId\tmapCategoryId\r\nx\t20250101\t1\t900000000000207008\t447562003\t44054006\tone\t1\tTRUE\t\tE11.9\t447561005\t447637006\r\n",
            "der2_iisssccRefset_ExtendedMapSnapshot_INT_20250101.txt",
            (2, 7),
            "expected a number",
        ),
        (
            "Terminology/sct2_Relationship_Snapshot_INT_20250101.txt",
            "id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\r\n1021\t20020131\t1\t900000000000207008\t404684003\t138875005\t0\t116680003\t900000000000011006\r\n",
            "sct2_Relationship_Snapshot_INT_20250101.txt",
            (2, 10),
            "expected 10 tab-separated fields, found 9",
        ),
        (
            "Refset/Language/der2_cRefset_LanguageSnapshot-en_INT_20250101.txt",
            "id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\r\n",
            "der2_cRefset_LanguageSnapshot-en_INT_20250101.txt",
            (1, 1),
            "required column 'acceptabilityId'",
        ),
    ];
    for (i, (file, text, name, (line, col), msg)) in cases.iter().enumerate() {
        let bad = dir.join(format!("bad{i}"));
        copy_dir(&fixture("snomed"), &bad);
        std::fs::write(bad.join(snap).join(file), text).unwrap();
        let e = snomed::load_rf2_dir(&bad, Some("broken")).unwrap_err();
        println!("{e}");
        assert!(e.file.ends_with(name), "{e}");
        assert_eq!((e.line, e.column), (*line, *col), "{e}");
        assert!(e.message.contains(msg), "{e}");
        assert!(store.import_snomed(&bad, Some("broken")).is_err());
        let t = store.load("snomed").unwrap().unwrap();
        assert_eq!(t.version.as_deref(), Some("v1"), "previous version kept");
        assert_eq!(
            t.resources.len(),
            2,
            "concept maps of the previous version kept"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn release_versions_are_derived_when_not_given() {
    let s = snomed::load_rf2_dir(&fixture("snomed"), None).unwrap();
    assert_eq!(
        s.version.as_deref(),
        Some("http://snomed.info/sct/900000000000207008/version/20250101")
    );
    let l = loinc::load_loinc_dir(&fixture("loinc"), None).unwrap();
    assert_eq!(l.version.as_deref(), Some("2.80"));
    let l = loinc::load_loinc_dir(&fixture("loinc"), Some("2.81")).unwrap();
    assert_eq!(l.version.as_deref(), Some("2.81"));
}
