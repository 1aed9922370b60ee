//! SNOMED CT RF2 snapshot loader (read by header name): concepts, descriptions, inferred IS-A
//! relationships and (optionally) the US English language refset for preferred terms.

use std::collections::HashMap;
use std::path::Path;

use crate::provider::{Concept, ConceptTable, Designation, PropertyDef, PropertyValue};
use crate::tabular::{find_file, parse_tsv, read_file, FileError, Table};

pub const SNOMED_URL: &str = "http://snomed.info/sct";
pub const IS_A: &str = "116680003";
pub const INFERRED: &str = "900000000000011006";
pub const FSN: &str = "900000000000003001";
pub const SYNONYM: &str = "900000000000013009";
pub const US_ENGLISH: &str = "900000000000509007";
pub const PREFERRED: &str = "900000000000548007";
pub const FULLY_DEFINED: &str = "900000000000073002";

fn active(t: &Table, row: &crate::tabular::Row, col: usize) -> Result<bool, FileError> {
    match row.fields[col].as_str() {
        "1" => Ok(true),
        "0" => Ok(false),
        other => Err(t.error(row, col, format!("active must be 0 or 1, found '{other}'"))),
    }
}

fn sctid(t: &Table, row: &crate::tabular::Row, col: usize) -> Result<String, FileError> {
    let v = row.fields[col].trim();
    if v.len() < 6 || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(t.error(row, col, format!("invalid SCTID '{v}'")));
    }
    Ok(v.to_string())
}

/// Loads an RF2 release directory (searching for the Snapshot files by their standard names).
pub fn load_rf2_dir(dir: &Path, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let need = |prefix: &str| {
        find_file(dir, prefix).ok_or_else(|| FileError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            message: format!("no {prefix}* file in the release directory"),
        })
    };
    let concepts = need("sct2_Concept_Snapshot")?;
    let descriptions = need("sct2_Description_Snapshot")?;
    let relationships = need("sct2_Relationship_Snapshot")?;
    let language = find_file(dir, "der2_cRefset_LanguageSnapshot");
    let f = |p: &Path| -> Result<(String, String), FileError> {
        Ok((read_file(p)?, p.display().to_string()))
    };
    let c = f(&concepts)?;
    let d = f(&descriptions)?;
    let r = f(&relationships)?;
    let l = match &language {
        Some(p) => Some(f(p)?),
        None => None,
    };
    load_rf2(
        (&c.0, &c.1),
        (&d.0, &d.1),
        (&r.0, &r.1),
        l.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
        version,
    )
}

/// Loads SNOMED CT from the texts of the RF2 snapshot files: (text, file name) pairs.
pub fn load_rf2(
    concepts: (&str, &str),
    descriptions: (&str, &str),
    relationships: (&str, &str),
    language: Option<(&str, &str)>,
    version: Option<&str>,
) -> Result<ConceptTable, FileError> {
    let mut table = ConceptTable::new(SNOMED_URL, version.map(str::to_string));
    table.name = Some("SNOMED CT".into());
    table.case_sensitive = true;
    table.property_defs = vec![
        PropertyDef {
            code: "inactive".into(),
            uri: Some("http://hl7.org/fhir/concept-properties#inactive".into()),
            kind: "boolean".into(),
            description: None,
        },
        PropertyDef {
            code: "sufficientlyDefined".into(),
            kind: "boolean".into(),
            ..Default::default()
        },
        PropertyDef {
            code: "moduleId".into(),
            kind: "code".into(),
            ..Default::default()
        },
        PropertyDef {
            code: "effectiveTime".into(),
            kind: "string".into(),
            ..Default::default()
        },
    ];
    // concepts
    let t = parse_tsv(concepts.0, concepts.1)?;
    let (c_id, c_eff, c_act, c_mod, c_def) = (
        t.col("id")?,
        t.col("effectiveTime")?,
        t.col("active")?,
        t.col("moduleId")?,
        t.col("definitionStatusId")?,
    );
    for row in &t.rows {
        let id = sctid(&t, row, c_id)?;
        let mut c = Concept::new(id, None);
        c.inactive = !active(&t, row, c_act)?;
        c.properties
            .push(("inactive".into(), PropertyValue::Boolean(c.inactive)));
        c.properties.push((
            "sufficientlyDefined".into(),
            PropertyValue::Boolean(row.fields[c_def] == FULLY_DEFINED),
        ));
        c.properties.push((
            "moduleId".into(),
            PropertyValue::Code(row.fields[c_mod].clone()),
        ));
        c.properties.push((
            "effectiveTime".into(),
            PropertyValue::String(row.fields[c_eff].clone()),
        ));
        table.add(c);
    }
    // language refset: description id -> preferred (US)
    let mut preferred: HashMap<String, bool> = HashMap::new();
    if let Some((text, file)) = language {
        let l = parse_tsv(text, file)?;
        let (l_act, l_ref, l_comp, l_acc) = (
            l.col("active")?,
            l.col("refsetId")?,
            l.col("referencedComponentId")?,
            l.col("acceptabilityId")?,
        );
        for row in &l.rows {
            if active(&l, row, l_act)? && row.fields[l_ref] == US_ENGLISH {
                preferred.insert(row.fields[l_comp].clone(), row.fields[l_acc] == PREFERRED);
            }
        }
    }
    // descriptions
    let t = parse_tsv(descriptions.0, descriptions.1)?;
    let (d_id, d_act, d_con, d_lang, d_type, d_term) = (
        t.col("id")?,
        t.col("active")?,
        t.col("conceptId")?,
        t.col("languageCode")?,
        t.col("typeId")?,
        t.col("term")?,
    );
    let mut fsn: HashMap<u32, String> = HashMap::new();
    for row in &t.rows {
        if !active(&t, row, d_act)? {
            continue;
        }
        let cid = sctid(&t, row, d_con)?;
        let Some(ci) = table.index_of(&cid) else {
            return Err(t.error(row, d_con, format!("description for unknown concept {cid}")));
        };
        let type_id = row.fields[d_type].as_str();
        let term = row.fields[d_term].clone();
        let (use_code, use_display) = match type_id {
            FSN => (FSN, "Fully specified name"),
            SYNONYM => (SYNONYM, "Synonym"),
            _ => (type_id, ""),
        };
        if type_id == FSN {
            fsn.insert(ci, term.clone());
        }
        let concept = &mut table.concepts[ci as usize];
        if type_id == SYNONYM && preferred.get(&row.fields[d_id]) == Some(&true) {
            concept.display = Some(term.clone());
        }
        concept.designations.push(Designation {
            language: Some(row.fields[d_lang].clone()),
            use_system: Some(SNOMED_URL.into()),
            use_code: Some(use_code.into()),
            use_display: (!use_display.is_empty()).then(|| use_display.to_string()),
            value: term,
        });
    }
    for (ci, f) in fsn {
        let c = &mut table.concepts[ci as usize];
        if c.display.is_none() {
            // no language refset: the FSN without its semantic tag
            let d = match f.rfind(" (") {
                Some(p) if f.ends_with(')') => f[..p].to_string(),
                _ => f,
            };
            c.display = Some(d);
        }
    }
    // relationships: active inferred IS-A
    let t = parse_tsv(relationships.0, relationships.1)?;
    let (r_act, r_src, r_dst, r_type, r_char) = (
        t.col("active")?,
        t.col("sourceId")?,
        t.col("destinationId")?,
        t.col("typeId")?,
        t.col("characteristicTypeId")?,
    );
    for row in &t.rows {
        if !active(&t, row, r_act)? || row.fields[r_type] != IS_A || row.fields[r_char] != INFERRED
        {
            continue;
        }
        let src = sctid(&t, row, r_src)?;
        let dst = sctid(&t, row, r_dst)?;
        match (table.index_of(&dst), table.index_of(&src)) {
            (Some(p), Some(c)) => table.link(p, c),
            _ => {
                return Err(t.error(
                    row,
                    r_src,
                    format!("IS-A between unknown concepts {src} -> {dst}"),
                ))
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
        std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/snomed"
        ))
    }

    #[test]
    fn loads_fixture_snapshot() {
        let t = load_rf2_dir(
            &fixture(),
            Some("http://snomed.info/sct/900000000000207008/version/20250101"),
        )
        .unwrap();
        assert_eq!(t.len(), 6);
        let dm = t.lookup("73211009").unwrap();
        assert_eq!(dm.display.as_deref(), Some("Diabetes mellitus"));
        assert!(dm.designations.iter().any(
            |d| d.value == "Diabetes mellitus (disorder)" && d.use_code.as_deref() == Some(FSN)
        ));
        assert_eq!(
            t.subsumes("404684003", "44054006"),
            Some(Subsumption::Subsumes)
        );
        assert_eq!(
            t.subsumes("73211009", "44054006"),
            Some(Subsumption::Subsumes)
        );
        assert_eq!(
            t.filter("concept", "is-a", "73211009").unwrap(),
            vec!["73211009", "44054006"]
        );
        // stated (non-inferred) and inactive IS-A rows are ignored
        assert_eq!(t.parents("44054006"), vec!["73211009"]);
        assert!(t.lookup("200000001").unwrap().inactive);
        assert_eq!(t.search("diab", 10)[0], "73211009");
    }

    #[test]
    fn malformed_files_report_file_line_column() {
        let c = "id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\r\n138875005\t20020131\t1\t900000000000207008\t900000000000074008\r\n73211009\t20020131\tX\t900000000000207008\t900000000000074008\r\n";
        let d = "id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId\r\n";
        let r = "id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\r\n";
        let e = load_rf2(
            (c, "sct2_Concept.txt"),
            (d, "d.txt"),
            (r, "r.txt"),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.column),
            ("sct2_Concept.txt", 3, 3)
        );
        // columns are found by name: a missing column is an error at line 1
        let bad_header = "id\teffectiveTime\tactive\tmoduleId\r\n";
        let e = load_rf2(
            (bad_header, "c.txt"),
            (d, "d.txt"),
            (r, "r.txt"),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("definitionStatusId"));
        // wrong number of fields
        let short =
            "id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\r\n138875005\t20020131\t1\r\n";
        let e = load_rf2((short, "c.txt"), (d, "d.txt"), (r, "r.txt"), None, None).unwrap_err();
        assert_eq!((e.line, e.column), (2, 4));
    }
}
