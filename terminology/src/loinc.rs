//! LOINC loader: `LoincTable/Loinc.csv` (or `LoincTableCore/LoincTableCore.csv`) read by header
//! name, plus the optional multiaxial hierarchy
//! `AccessoryFiles/ComponentHierarchyBySystem/ComponentHierarchyBySystem.csv` for is-a.

use std::path::Path;

use crate::provider::{Concept, ConceptTable, Designation, PropertyDef, PropertyValue};
use crate::tabular::{find_file, parse_csv, read_file, FileError};

pub const LOINC_URL: &str = "http://loinc.org";

/// Columns copied as concept properties (FHIR LOINC property codes = the column names).
const PROPERTY_COLUMNS: &[&str] = &[
    "COMPONENT",
    "PROPERTY",
    "TIME_ASPCT",
    "SYSTEM",
    "SCALE_TYP",
    "METHOD_TYP",
    "CLASS",
    "CLASSTYPE",
    "STATUS",
    "ORDER_OBS",
    "EXAMPLE_UCUM_UNITS",
    "VersionFirstReleased",
    "VersionLastChanged",
];

/// Loads a LOINC release directory.
pub fn load_loinc_dir(dir: &Path, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let main = find_file(dir, "Loinc.csv")
        .or_else(|| find_file(dir, "LoincTableCore.csv"))
        .ok_or_else(|| FileError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            message: "no Loinc.csv or LoincTableCore.csv in the release directory".into(),
        })?;
    let hierarchy = find_file(dir, "ComponentHierarchyBySystem.csv");
    let main_text = read_file(&main)?;
    let hier_text = match &hierarchy {
        Some(p) => Some((read_file(p)?, p.display().to_string())),
        None => None,
    };
    load_loinc(
        &main_text,
        &main.display().to_string(),
        hier_text.as_ref().map(|(t, f)| (t.as_str(), f.as_str())),
        version,
    )
}

/// Loads LOINC from the text of Loinc.csv (and optionally ComponentHierarchyBySystem.csv).
pub fn load_loinc(
    loinc_csv: &str,
    file: &str,
    hierarchy: Option<(&str, &str)>,
    version: Option<&str>,
) -> Result<ConceptTable, FileError> {
    let t = parse_csv(loinc_csv, file)?;
    let c_num = t.col("LOINC_NUM")?;
    let c_long = t.col("LONG_COMMON_NAME")?;
    let c_status = t.opt_col("STATUS");
    let c_short = t.opt_col("SHORTNAME");
    let c_consumer = t.opt_col("CONSUMER_NAME");
    let c_display = t.opt_col("DisplayName");
    let props: Vec<(&str, usize)> = PROPERTY_COLUMNS
        .iter()
        .filter_map(|n| t.opt_col(n).map(|i| (*n, i)))
        .collect();
    let mut table = ConceptTable::new(LOINC_URL, version.map(str::to_string));
    table.name = Some("LOINC".into());
    table.title = Some("Logical Observation Identifiers, Names and Codes (LOINC)".into());
    table.case_sensitive = false;
    table.property_defs = props
        .iter()
        .map(|(n, _)| PropertyDef {
            code: (*n).to_string(),
            uri: Some(format!("http://loinc.org/property/{n}")),
            kind: "string".into(),
            description: None,
        })
        .collect();
    let num_re =
        regex::Regex::new(r"^\d{1,7}-\d$").map_err(|e| t.error(&t.rows[0], 0, e.to_string()))?;
    for row in &t.rows {
        let code = row.fields[c_num].trim();
        if !num_re.is_match(code) {
            return Err(t.error(row, c_num, format!("invalid LOINC_NUM '{code}'")));
        }
        let long = row.fields[c_long].trim();
        let mut c = Concept::new(code, (!long.is_empty()).then(|| long.to_string()));
        for (col, use_code) in [
            (c_short, "SHORTNAME"),
            (c_consumer, "CONSUMER_NAME"),
            (c_display, "DisplayName"),
        ] {
            if let Some(i) = col {
                let v = row.fields[i].trim();
                if !v.is_empty() {
                    c.designations.push(Designation {
                        language: Some("en-US".into()),
                        use_system: Some(LOINC_URL.into()),
                        use_code: Some(use_code.into()),
                        use_display: None,
                        value: v.to_string(),
                    });
                }
            }
        }
        if let Some(i) = c_status {
            let st = row.fields[i].trim();
            match st {
                "ACTIVE" | "TRIAL" | "DISCOURAGED" | "" => {}
                "DEPRECATED" => c.inactive = true,
                other => {
                    return Err(t.error(row, i, format!("unknown STATUS '{other}'")));
                }
            }
        }
        for (n, i) in &props {
            let v = row.fields[*i].trim();
            if !v.is_empty() {
                c.properties
                    .push(((*n).to_string(), PropertyValue::String(v.to_string())));
            }
        }
        table.add(c);
    }
    if let Some((text, hfile)) = hierarchy {
        let h = parse_csv(text, hfile)?;
        let c_parent = h.col("IMMEDIATE_PARENT")?;
        let c_code = h.col("CODE")?;
        let c_text = h.col("CODE_TEXT")?;
        for row in &h.rows {
            let code = row.fields[c_code].trim();
            if code.is_empty() {
                return Err(h.error(row, c_code, "empty CODE"));
            }
            let child = match table.index_of(code) {
                Some(i) => i,
                None => {
                    // a LOINC part (LP…) used as a hierarchy node
                    let mut c = Concept::new(code, Some(row.fields[c_text].trim().to_string()));
                    c.not_selectable = code.starts_with("LP");
                    table.add(c)
                }
            };
            let parent = row.fields[c_parent].trim();
            if !parent.is_empty() {
                if let Some(p) = table.index_of(parent) {
                    table.link(p, child);
                }
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{CodeSystemProvider, Subsumption};

    fn fixture() -> std::path::PathBuf {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/loinc"))
    }

    #[test]
    fn loads_fixture_release_by_header_names() {
        let t = load_loinc_dir(&fixture(), Some("2.80")).unwrap();
        let c = t.lookup("2345-7").expect("glucose");
        assert_eq!(
            c.display.as_deref(),
            Some("Glucose [Mass/volume] in Serum or Plasma")
        );
        assert_eq!(
            c.property("COMPONENT")
                .next()
                .map(|v| v.as_text())
                .as_deref(),
            Some("Glucose")
        );
        assert!(c
            .designations
            .iter()
            .any(|d| d.value == "Glucose SerPl-mCnc"));
        assert!(
            t.lookup("11111-1").unwrap().inactive,
            "DEPRECATED is inactive"
        );
        // multiaxial hierarchy
        assert_eq!(
            t.subsumes("LP7786-9", "2345-7"),
            Some(Subsumption::Subsumes)
        );
        assert_eq!(t.filter("concept", "is-a", "LP7786-9").unwrap().len(), 4);
        assert_eq!(t.search("glucose serum", 5)[0], "2345-7");
        assert_eq!(
            t.filter("SCALE_TYP", "=", "Qn").unwrap(),
            vec!["2345-7", "2339-0", "718-7"]
        );
    }

    #[test]
    fn header_order_does_not_matter_and_errors_locate() {
        let csv =
            "\"LONG_COMMON_NAME\",\"STATUS\",\"LOINC_NUM\"\n\"Hemoglobin\",\"ACTIVE\",\"718-7\"\n";
        let t = load_loinc(csv, "Loinc.csv", None, None).unwrap();
        assert_eq!(
            t.get("718-7").unwrap().display.as_deref(),
            Some("Hemoglobin")
        );
        let e = load_loinc(
            "\"LOINC_NUM\",\"COMPONENT\"\n\"1-8\",\"x\"\n",
            "Loinc.csv",
            None,
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("LONG_COMMON_NAME"), "{e}");
        let e = load_loinc(
            "\"LOINC_NUM\",\"LONG_COMMON_NAME\"\n\"1-8\",\"ok\"\n\"bad\",\"x\"\n",
            "Loinc.csv",
            None,
            None,
        )
        .unwrap_err();
        assert_eq!((e.file.as_str(), e.line, e.column), ("Loinc.csv", 3, 1));
        let e = load_loinc(
            "\"LOINC_NUM\",\"LONG_COMMON_NAME\"\n\"1-8\",\"unterminated\n",
            "Loinc.csv",
            None,
            None,
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (2, 7));
    }
}
