//! CMS General Equivalence Mappings (ICD-10-CM → ICD-9-CM) as a FHIR R4 `ConceptMap`, so that
//! `$translate` works in both directions (forward; `reverse=true` for ICD-9-CM → ICD-10-CM).

use std::path::Path;

use serde_json::{json, Value};

use crate::icd10cm::{dotted, ICD10CM_URL};
use crate::tabular::{parse_csv, read_file, FileError};

pub const ICD9CM_URL: &str = "http://hl7.org/fhir/sid/icd-9-cm";
pub const GEM_10_TO_9_URL: &str = "http://hl7.org/fhir/ConceptMap/icd10cm-to-icd9cm-gem";

/// ICD-9-CM diagnosis code with its dot: `0010` → `001.0`, `E8490` → `E849.0`, `V0481` → `V04.81`.
pub fn icd9_dotted(code: &str) -> String {
    let split = if code.starts_with('E') { 4 } else { 3 };
    if code.len() > split && code.is_ascii() {
        format!("{}.{}", &code[..split], &code[split..])
    } else {
        code.to_string()
    }
}

pub fn load_gem_file(path: &Path) -> Result<Value, FileError> {
    let text = read_file(path)?;
    load_gem(&text, &path.display().to_string())
}

/// Parses the GEM CSV (`icd10cm,icd9cm,flags,approximate,no_map,combination,scenario,choice_list`,
/// by header name). Flags: approximate=1 → `inexact`, else `equivalent`; no_map=1 → `unmatched`;
/// combination entries carry scenario/choice list in `comment`.
pub fn load_gem(text: &str, file: &str) -> Result<Value, FileError> {
    let t = parse_csv(text, file)?;
    let (c10, c9) = (t.col("icd10cm")?, t.col("icd9cm")?);
    let c_approx = t.opt_col("approximate");
    let c_nomap = t.opt_col("no_map");
    let c_comb = t.opt_col("combination");
    let c_scen = t.opt_col("scenario");
    let c_choice = t.opt_col("choice_list");
    let flag = |row: &crate::tabular::Row, c: Option<usize>| -> Result<bool, FileError> {
        match c.map(|i| row.fields[i].trim()) {
            None | Some("0") | Some("") => Ok(false),
            Some("1") => Ok(true),
            Some(other) => Err(t.error(
                row,
                c.unwrap_or(0),
                format!("flag must be 0 or 1, found '{other}'"),
            )),
        }
    };
    let mut elements: Vec<Value> = Vec::new();
    let mut last: Option<String> = None;
    for row in &t.rows {
        let src = row.fields[c10].trim();
        if src.is_empty() {
            return Err(t.error(row, c10, "empty icd10cm code"));
        }
        let tgt = row.fields[c9].trim();
        let mut target = serde_json::Map::new();
        if flag(row, c_nomap)? || tgt == "NoDx" {
            target.insert("equivalence".into(), json!("unmatched"));
        } else {
            target.insert("code".into(), json!(icd9_dotted(tgt)));
            let eq = if flag(row, c_approx)? {
                "inexact"
            } else {
                "equivalent"
            };
            target.insert("equivalence".into(), json!(eq));
        }
        if flag(row, c_comb)? {
            let scen = c_scen.map(|i| row.fields[i].trim()).unwrap_or("");
            let choice = c_choice.map(|i| row.fields[i].trim()).unwrap_or("");
            target.insert(
                "comment".into(),
                json!(format!(
                    "combination: scenario {scen}, choice list {choice}"
                )),
            );
        }
        let code = dotted(src);
        if last.as_deref() == Some(code.as_str()) {
            if let Some(Value::Array(ts)) = elements.last_mut().and_then(|e| e.get_mut("target")) {
                ts.push(Value::Object(target));
            }
        } else {
            elements.push(json!({"code": code, "target": [Value::Object(target)]}));
            last = Some(code);
        }
    }
    Ok(json!({
        "resourceType": "ConceptMap",
        "url": GEM_10_TO_9_URL,
        "name": "ICD10CMtoICD9CMGEM",
        "title": "CMS General Equivalence Mapping ICD-10-CM to ICD-9-CM",
        "status": "active",
        "sourceUri": "http://hl7.org/fhir/sid/icd-10-cm?fhir_vs",
        "targetUri": "http://hl7.org/fhir/sid/icd-9-cm?fhir_vs",
        "group": [{"source": ICD10CM_URL, "target": ICD9CM_URL, "element": elements}]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gem_rows_to_concept_map() {
        let csv = "\"icd10cm\",\"icd9cm\",\"flags\",\"approximate\",\"no_map\",\"combination\",\"scenario\",\"choice_list\"\n\"A000\",\"0010\",\"00000\",0,0,0,0,0\n\"A000\",\"0019\",\"10000\",1,0,0,0,0\n\"Z9989\",\"NoDx\",\"00011\",0,1,0,0,0\n";
        let cm = load_gem(csv, "gem.csv").unwrap();
        let els = cm["group"][0]["element"].as_array().unwrap();
        assert_eq!(els.len(), 2);
        assert_eq!(els[0]["code"], "A00.0");
        assert_eq!(els[0]["target"][0]["code"], "001.0");
        assert_eq!(els[0]["target"][1]["equivalence"], "inexact");
        assert_eq!(els[1]["target"][0]["equivalence"], "unmatched");
        let e = load_gem(
            "\"icd10cm\",\"icd9cm\",\"approximate\"\n\"A000\",\"0010\",\"7\"\n",
            "g.csv",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
        assert_eq!(icd9_dotted("E8490"), "E849.0");
        assert_eq!(icd9_dotted("V0481"), "V04.81");
    }
}
