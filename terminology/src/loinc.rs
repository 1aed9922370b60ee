//! LOINC loader. Every file is read by header name, never by column position:
//! - `LoincTable/Loinc.csv` (or `LoincTableCore/LoincTableCore.csv`): the terms, with display
//!   LONG_COMMON_NAME, designations SHORTNAME/CONSUMER_NAME/DisplayName, properties COMPONENT,
//!   PROPERTY, TIME_ASPCT, SYSTEM, SCALE_TYP, METHOD_TYP, CLASS, CLASSTYPE, STATUS, ORDER_OBS;
//!   STATUS DEPRECATED = inactive;
//! - `AccessoryFiles/PartFile/Part.csv`: the LP parts as concepts;
//! - `AccessoryFiles/PartFile/LoincPartLink_Primary.csv`: a term's axis property becomes a
//!   Coding to its part (`COMPONENT = LP14635-4 |Glucose|`);
//! - `AccessoryFiles/AnswerFile/AnswerList.csv` and `LoincAnswerListLink.csv`: LL answer lists
//!   and LA answers as concepts, the list → answers set (implicit value set
//!   `http://loinc.org/vs/LL…`, filter `LIST = LL…`) and the term's `answer-list` property;
//! - `AccessoryFiles/ComponentHierarchyBySystem/ComponentHierarchyBySystem.csv`: the
//!   multiaxial hierarchy as parent/child links (is-a, `$subsumes`, `http://loinc.org/vs/LP…`).

use std::path::Path;

use crate::provider::{Concept, ConceptTable, Designation, PropertyDef, PropertyValue};
use crate::tabular::{find_file, read_file, CsvRows, FileError};

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

/// The texts of a LOINC release: (file text, file name) per file; only the main table is required.
#[derive(Debug, Default, Clone)]
pub struct LoincTexts {
    pub table: (String, String),
    pub parts: Option<(String, String)>,
    pub part_links: Option<(String, String)>,
    pub answer_lists: Option<(String, String)>,
    pub answer_list_links: Option<(String, String)>,
    pub hierarchy: Option<(String, String)>,
}

/// Loads a LOINC release directory (files found by their standard names anywhere below it).
pub fn load_loinc_dir(dir: &Path, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let main = find_file(dir, "Loinc.csv")
        .or_else(|| find_file(dir, "LoincTableCore.csv"))
        .ok_or_else(|| FileError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            message: "no Loinc.csv or LoincTableCore.csv in the release directory".into(),
        })?;
    let opt = |name: &str| -> Result<Option<(String, String)>, FileError> {
        match find_file(dir, name) {
            Some(p) => Ok(Some((read_file(&p)?, p.display().to_string()))),
            None => Ok(None),
        }
    };
    let texts = LoincTexts {
        table: (read_file(&main)?, main.display().to_string()),
        parts: opt("Part.csv")?,
        part_links: opt("LoincPartLink_Primary.csv")?,
        answer_lists: opt("AnswerList.csv")?,
        answer_list_links: opt("LoincAnswerListLink.csv")?,
        hierarchy: opt("ComponentHierarchyBySystem.csv")?,
    };
    load_loinc_texts(&texts, version)
}

/// Loads LOINC from the text of Loinc.csv (and optionally ComponentHierarchyBySystem.csv).
pub fn load_loinc(
    loinc_csv: &str,
    file: &str,
    hierarchy: Option<(&str, &str)>,
    version: Option<&str>,
) -> Result<ConceptTable, FileError> {
    let texts = LoincTexts {
        table: (loinc_csv.to_string(), file.to_string()),
        hierarchy: hierarchy.map(|(t, f)| (t.to_string(), f.to_string())),
        ..Default::default()
    };
    load_loinc_texts(&texts, version)
}

fn coding(code: &str, display: Option<String>) -> PropertyValue {
    PropertyValue::Coding {
        system: Some(LOINC_URL.into()),
        code: code.to_string(),
        display,
    }
}

/// Loads LOINC from the texts of its release files.
pub fn load_loinc_texts(x: &LoincTexts, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let (t, mut t_rows) = CsvRows::new(&x.table.0, &x.table.1)?;
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
    // without an explicit version: the release's version is the highest VersionLastChanged,
    // found while the rows stream past
    let c_changed = t.opt_col("VersionLastChanged");
    let version_key =
        |v: &str| -> Vec<u32> { v.split('.').filter_map(|x| x.parse().ok()).collect() };
    let mut last_changed: Option<(Vec<u32>, String)> = None;
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
    for (code, kind) in [("answer-list", "Coding"), ("PartTypeName", "string")] {
        table.property_defs.push(PropertyDef {
            code: code.into(),
            kind: kind.into(),
            ..Default::default()
        });
    }
    let is_loinc_num = |code: &str| {
        let Some((a, b)) = code.split_once('-') else {
            return false;
        };
        (1..=7).contains(&a.len())
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.len() == 1
            && b.bytes().all(|c| c.is_ascii_digit())
    };
    while let Some(row) = t_rows.next() {
        let row = &row?;
        if let (None, Some(c)) = (version, c_changed) {
            let v = row.fields[c].trim();
            let k = version_key(v);
            if !v.is_empty() && last_changed.as_ref().is_none_or(|(best, _)| k > *best) {
                last_changed = Some((k, v.to_string()));
            }
        }
        let code = row.fields[c_num].trim();
        if !is_loinc_num(code) {
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
    drop(t);
    if table.version.is_none() {
        table.version = last_changed.map(|(_, v)| v);
    }

    // parts
    if let Some((text, file)) = &x.parts {
        let (p, mut p_rows) = CsvRows::new(text, file)?;
        let (c_num, c_type, c_name) = (
            p.col("PartNumber")?,
            p.col("PartTypeName")?,
            p.col("PartName")?,
        );
        let (c_disp, c_stat) = (p.opt_col("PartDisplayName"), p.opt_col("Status"));
        while let Some(row) = p_rows.next() {
            let row = &row?;
            let code = row.fields[c_num].trim();
            if !code.starts_with("LP") {
                return Err(p.error(row, c_num, format!("invalid PartNumber '{code}'")));
            }
            let display = c_disp
                .map(|i| row.fields[i].trim())
                .filter(|d| !d.is_empty())
                .unwrap_or(row.fields[c_name].trim());
            let mut c = Concept::new(code, Some(display.to_string()));
            c.not_selectable = true;
            c.inactive = match c_stat.map(|i| row.fields[i].trim()).unwrap_or("") {
                "ACTIVE" | "" => false,
                "DEPRECATED" | "INACTIVE" => true,
                other => {
                    return Err(p.error(
                        row,
                        c_stat.unwrap_or(0),
                        format!("unknown part Status '{other}'"),
                    ))
                }
            };
            c.properties.push((
                "PartTypeName".into(),
                PropertyValue::String(row.fields[c_type].trim().to_string()),
            ));
            table.add(c);
        }
    }

    // primary part links: the term's axis property becomes a Coding to the part
    if let Some((text, file)) = &x.part_links {
        let (l, mut l_rows) = CsvRows::new(text, file)?;
        let (c_loinc, c_part, c_name, c_prop) = (
            l.col("LoincNumber")?,
            l.col("PartNumber")?,
            l.col("PartName")?,
            l.col("Property")?,
        );
        while let Some(row) = l_rows.next() {
            let row = &row?;
            let code = row.fields[c_loinc].trim();
            let Some(ci) = table.index_of(code) else {
                return Err(l.error(
                    row,
                    c_loinc,
                    format!("link for unknown LOINC term '{code}'"),
                ));
            };
            let part = row.fields[c_part].trim();
            if !part.starts_with("LP") {
                return Err(l.error(row, c_part, format!("invalid PartNumber '{part}'")));
            }
            let prop_uri = row.fields[c_prop].trim();
            let name = prop_uri.rsplit('/').next().unwrap_or(prop_uri).to_string();
            if name.is_empty() {
                return Err(l.error(row, c_prop, "empty Property"));
            }
            let v = coding(part, Some(row.fields[c_name].trim().to_string()));
            let c = &mut table.concepts[ci as usize];
            match c.properties.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = v,
                None => c.properties.push((name, v)),
            }
        }
    }

    // answer lists: LL and LA concepts, LL → answers
    if let Some((text, file)) = &x.answer_lists {
        let (a, mut a_rows) = CsvRows::new(text, file)?;
        let (c_ll, c_name, c_la, c_text) = (
            a.col("AnswerListId")?,
            a.col("AnswerListName")?,
            a.col("AnswerStringId")?,
            a.col("DisplayText")?,
        );
        while let Some(row) = a_rows.next() {
            let row = &row?;
            let ll = row.fields[c_ll].trim();
            if !ll.starts_with("LL") {
                return Err(a.error(row, c_ll, format!("invalid AnswerListId '{ll}'")));
            }
            if table.index_of(ll).is_none() {
                table.add(Concept::new(
                    ll,
                    Some(row.fields[c_name].trim().to_string()),
                ));
            }
            let la = row.fields[c_la].trim();
            if la.is_empty() {
                continue; // an externally defined list has no LA rows
            }
            if !la.starts_with("LA") {
                return Err(a.error(row, c_la, format!("invalid AnswerStringId '{la}'")));
            }
            let ai = match table.index_of(la) {
                Some(i) => i,
                None => table.add(Concept::new(
                    la,
                    Some(row.fields[c_text].trim().to_string()),
                )),
            };
            table.sets.entry(ll.to_string()).or_default().push(ai);
        }
    }
    if let Some((text, file)) = &x.answer_list_links {
        let (a, mut a_rows) = CsvRows::new(text, file)?;
        let (c_loinc, c_ll) = (a.col("LoincNumber")?, a.col("AnswerListId")?);
        while let Some(row) = a_rows.next() {
            let row = &row?;
            let code = row.fields[c_loinc].trim();
            let Some(ci) = table.index_of(code) else {
                return Err(a.error(
                    row,
                    c_loinc,
                    format!("link for unknown LOINC term '{code}'"),
                ));
            };
            let ll = row.fields[c_ll].trim();
            let display = table.get(ll).and_then(|c| c.display.clone());
            if display.is_none() && !table.sets.contains_key(ll) && table.index_of(ll).is_none() {
                return Err(a.error(row, c_ll, format!("unknown answer list '{ll}'")));
            }
            table.concepts[ci as usize]
                .properties
                .push(("answer-list".into(), coding(ll, display)));
        }
    }

    if let Some((text, hfile)) = &x.hierarchy {
        let (h, mut h_rows) = CsvRows::new(text, hfile)?;
        let c_parent = h.col("IMMEDIATE_PARENT")?;
        let c_code = h.col("CODE")?;
        let c_text = h.col("CODE_TEXT")?;
        while let Some(row) = h_rows.next() {
            let row = &row?;
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
                match table.index_of(parent) {
                    Some(p) => table.link(p, child),
                    None => {
                        return Err(h.error(
                            row,
                            c_parent,
                            format!("IMMEDIATE_PARENT '{parent}' is not defined on an earlier row"),
                        ))
                    }
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
        // the primary part link makes COMPONENT a Coding to the part
        assert_eq!(
            c.property("COMPONENT").next(),
            Some(&PropertyValue::Coding {
                system: Some(LOINC_URL.into()),
                code: "LP14635-4".into(),
                display: Some("Glucose".into())
            })
        );
        assert_eq!(
            t.lookup("718-7")
                .unwrap()
                .property("COMPONENT")
                .next()
                .map(|v| v.as_text())
                .as_deref(),
            Some("Hemoglobin")
        );
        assert_eq!(t.set_members("LL2201-3").len(), 4);
        assert!(t.lookup("LP31755-9").unwrap().inactive);
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
    fn loinc_table_core_layout() {
        // LoincTableCore/LoincTableCore.csv: 15 columns, a different order from Loinc.csv
        let dir = std::env::temp_dir().join(format!("kiln-loinc-core-{}", std::process::id()));
        let core = dir.join("LoincTableCore");
        std::fs::create_dir_all(&core).unwrap();
        std::fs::write(
            core.join("LoincTableCore.csv"),
            "\"LOINC_NUM\",\"COMPONENT\",\"PROPERTY\",\"TIME_ASPCT\",\"SYSTEM\",\"SCALE_TYP\",\"METHOD_TYP\",\"CLASS\",\"CLASSTYPE\",\"LONG_COMMON_NAME\",\"SHORTNAME\",\"EXTERNAL_COPYRIGHT_NOTICE\",\"STATUS\",\"VersionFirstReleased\",\"VersionLastChanged\"\r\n\
             \"2345-7\",\"Glucose\",\"MCnc\",\"Pt\",\"Ser/Plas\",\"Qn\",\"\",\"CHEM\",\"1\",\"Glucose [Mass/volume] in Serum or Plasma\",\"Glucose SerPl-mCnc\",\"\",\"ACTIVE\",\"1.0\",\"2.81\"\r\n\
             \"11111-1\",\"Old\",\"Prid\",\"Pt\",\"XXX\",\"Nom\",\"\",\"MISC\",\"1\",\"Old thing\",\"\",\"\",\"DEPRECATED\",\"1.0\",\"2.40\"\r\n",
        )
        .unwrap();
        let t = load_loinc_dir(&dir, None).unwrap();
        assert_eq!(t.version.as_deref(), Some("2.81"));
        let c = t.lookup("2345-7").unwrap();
        assert_eq!(
            c.display.as_deref(),
            Some("Glucose [Mass/volume] in Serum or Plasma")
        );
        assert_eq!(
            c.property("CLASSTYPE")
                .next()
                .map(|v| v.as_text())
                .as_deref(),
            Some("1")
        );
        assert!(t.lookup("11111-1").unwrap().inactive);
        let _ = std::fs::remove_dir_all(&dir);
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
