//! SNOMED CT RF2 snapshot loader (every file read by header name, streamed row by row):
//! concepts, descriptions (FSN, synonyms), inferred IS-A relationships (116680003), the
//! language reference sets (US English 900000000000509007 and GB English 900000000000508004
//! preferred terms → `en-US`/`en-GB` designations and the display), simple reference sets
//! (members for `^` in ECL and `?fhir_vs=refset/…`), historical associations (inactive concept
//! → replacement: a concept property and a `?fhir_cm={refset}` ConceptMap) and the ICD-10
//! extended map (447562003 → the `?fhir_cm=447562003` ConceptMap for `$translate`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::provider::{Concept, ConceptTable, Designation, PropertyDef, PropertyValue};
use crate::tabular::{find_files, read_file, FileError, Header, TsvRows};

pub const SNOMED_URL: &str = "http://snomed.info/sct";
pub const ICD10_URL: &str = "http://hl7.org/fhir/sid/icd-10";
pub const IS_A: &str = "116680003";
pub const INFERRED: &str = "900000000000011006";
pub const FSN: &str = "900000000000003001";
pub const SYNONYM: &str = "900000000000013009";
pub const US_ENGLISH: &str = "900000000000509007";
pub const GB_ENGLISH: &str = "900000000000508004";
pub const PREFERRED: &str = "900000000000548007";
pub const FULLY_DEFINED: &str = "900000000000073002";
pub const ICD10_MAP: &str = "447562003";

/// Historical association reference sets and the concept property each becomes.
pub const ASSOCIATIONS: &[(&str, &str, &str)] = &[
    ("900000000000526001", "REPLACED BY", "equivalent"),
    ("900000000000527005", "SAME AS", "equal"),
    ("900000000000523009", "POSSIBLY EQUIVALENT TO", "inexact"),
    ("900000000000528000", "WAS A", "wider"),
    ("900000000000524003", "MOVED TO", "relatedto"),
    ("900000000000525002", "MOVED FROM", "relatedto"),
    ("900000000000530003", "ALTERNATIVE", "inexact"),
    ("900000000000531004", "REFERS TO", "relatedto"),
    ("900000000000529008", "SIMILAR TO", "inexact"),
    ("1186921001", "POSSIBLY REPLACED BY", "inexact"),
    ("1186924009", "PARTIALLY EQUIVALENT TO", "inexact"),
];

fn association_name(refset: &str) -> Option<&'static str> {
    ASSOCIATIONS
        .iter()
        .find(|(id, _, _)| *id == refset)
        .map(|(_, n, _)| *n)
}

/// The replacements of an inactive concept, for `$validate-code` messages: ` (REPLACED BY
/// 12345 |Term|)`, or `None` when the concept has no historical association.
pub fn history_note(c: &crate::provider::Concept) -> Option<String> {
    let mut parts = Vec::new();
    for (name, v) in &c.properties {
        if ASSOCIATIONS.iter().any(|(_, n, _)| n == name) {
            if let PropertyValue::Coding { code, display, .. } = v {
                parts.push(match display {
                    Some(d) => format!("{name} {code} |{d}|"),
                    None => format!("{name} {code}"),
                });
            }
        }
    }
    (!parts.is_empty()).then(|| format!(" ({})", parts.join("; ")))
}

fn active(h: &Header, line: usize, f: &[&str], col: usize) -> Result<bool, FileError> {
    match f[col] {
        "1" => Ok(true),
        "0" => Ok(false),
        other => Err(h.error(line, col, format!("active must be 0 or 1, found '{other}'"))),
    }
}

fn sctid<'a>(h: &Header, line: usize, f: &[&'a str], col: usize) -> Result<&'a str, FileError> {
    let v = f[col].trim();
    if v.len() < 6 || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(h.error(line, col, format!("invalid SCTID '{v}'")));
    }
    Ok(v)
}

/// A description id as a number (the key between descriptions and language refsets).
fn component_id(h: &Header, line: usize, f: &[&str], col: usize) -> Result<u64, FileError> {
    f[col]
        .trim()
        .parse()
        .map_err(|_| h.error(line, col, format!("invalid component id '{}'", f[col])))
}

/// One RF2 file: its text (tests) or its path, read only when its turn comes so that a full
/// release is never held in memory all at once.
#[derive(Debug, Clone)]
pub enum Rf2Source {
    Text { text: String, name: String },
    File(PathBuf),
}

impl Default for Rf2Source {
    fn default() -> Self {
        Rf2Source::Text {
            text: String::new(),
            name: String::new(),
        }
    }
}

impl Rf2Source {
    pub fn text(text: &str, name: &str) -> Self {
        Rf2Source::Text {
            text: text.to_string(),
            name: name.to_string(),
        }
    }

    /// The file's text and name.
    fn load(&self) -> Result<(std::borrow::Cow<'_, str>, String), FileError> {
        match self {
            Rf2Source::Text { text, name } => Ok((text.as_str().into(), name.clone())),
            Rf2Source::File(p) => Ok((read_file(p)?.into(), p.display().to_string())),
        }
    }
}

/// The files of an RF2 snapshot, by kind.
#[derive(Debug, Default, Clone)]
pub struct Rf2Texts {
    pub concepts: Vec<Rf2Source>,
    pub descriptions: Vec<Rf2Source>,
    pub relationships: Vec<Rf2Source>,
    pub language: Vec<Rf2Source>,
    pub simple_refsets: Vec<Rf2Source>,
    pub associations: Vec<Rf2Source>,
    pub extended_maps: Vec<Rf2Source>,
}

fn files(ps: &[PathBuf]) -> Vec<Rf2Source> {
    ps.iter().cloned().map(Rf2Source::File).collect()
}

/// The files of an RF2 release directory (searched recursively by their standard names;
/// `Snapshot` files only).
pub fn rf2_files(dir: &Path) -> Result<BTreeMap<&'static str, Vec<PathBuf>>, FileError> {
    let snap = |ps: Vec<PathBuf>| -> Vec<PathBuf> {
        ps.into_iter()
            .filter(|p| p.to_string_lossy().contains("Snapshot"))
            .collect()
    };
    let mut m = BTreeMap::new();
    for (kind, prefix, required) in [
        ("concepts", "sct2_Concept_Snapshot", true),
        ("descriptions", "sct2_Description_Snapshot", true),
        ("relationships", "sct2_Relationship_Snapshot", true),
        ("language", "der2_cRefset_LanguageSnapshot", false),
        ("simple_refsets", "der2_Refset_SimpleSnapshot", false),
        ("associations", "der2_cRefset_AssociationSnapshot", false),
        (
            "associations_old",
            "der2_cRefset_AssociationReferenceSnapshot",
            false,
        ),
        (
            "extended_maps",
            "der2_iisssccRefset_ExtendedMapSnapshot",
            false,
        ),
    ] {
        let found = snap(find_files(dir, prefix));
        if required && found.is_empty() {
            return Err(FileError {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
                message: format!("no {prefix}* file in the release directory"),
            });
        }
        m.insert(kind, found);
    }
    Ok(m)
}

/// Loads an RF2 release directory.
pub fn load_rf2_dir(dir: &Path, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let files = rf2_files(dir)?;
    let mut assoc = files["associations"].clone();
    assoc.extend(files["associations_old"].iter().cloned());
    let texts = Rf2Texts {
        concepts: self::files(&files["concepts"]),
        descriptions: self::files(&files["descriptions"]),
        relationships: self::files(&files["relationships"]),
        language: self::files(&files["language"]),
        simple_refsets: self::files(&files["simple_refsets"]),
        associations: self::files(&assoc),
        extended_maps: self::files(&files["extended_maps"]),
    };
    let derived;
    let version = match version {
        Some(v) => Some(v),
        None => {
            let path = &files["concepts"][0];
            derived = edition_version(path, &read_file(path)?);
            derived.as_deref()
        }
    };
    load_rf2_texts(&texts, version)
}

/// The SNOMED CT version URI of a release without an explicit version:
/// `http://snomed.info/sct/{module of the root concept}/version/{date in the file name}`.
fn edition_version(concept_file: &Path, text: &str) -> Option<String> {
    let name = concept_file.file_name()?.to_string_lossy().to_string();
    let date = name.strip_suffix(".txt")?.rsplit('_').next()?.to_string();
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut rows = TsvRows::new(text, &name).ok()?;
    let (c_id, c_mod) = (
        rows.header().opt_col("id")?,
        rows.header().opt_col("moduleId")?,
    );
    let mut module = None;
    while let Some(Ok((_, f))) = rows.next() {
        if f[c_id] == "138875005" {
            module = Some(f[c_mod].to_string());
            break;
        }
    }
    let module = module.unwrap_or_else(|| "900000000000207008".to_string());
    Some(format!("{SNOMED_URL}/{module}/version/{date}"))
}

/// Loads SNOMED CT from the texts of the three core RF2 snapshot files and an optional language
/// reference set: (text, file name) pairs.
pub fn load_rf2(
    concepts: (&str, &str),
    descriptions: (&str, &str),
    relationships: (&str, &str),
    language: Option<(&str, &str)>,
    version: Option<&str>,
) -> Result<ConceptTable, FileError> {
    let own = |(t, f): (&str, &str)| Rf2Source::text(t, f);
    let texts = Rf2Texts {
        concepts: vec![own(concepts)],
        descriptions: vec![own(descriptions)],
        relationships: vec![own(relationships)],
        language: language.map(own).into_iter().collect(),
        ..Default::default()
    };
    load_rf2_texts(&texts, version)
}

fn without_null_version(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        if o.get("version").map(Value::is_null).unwrap_or(false) {
            o.remove("version");
        }
    }
    v
}

fn prop_def(code: &str, kind: &str) -> PropertyDef {
    PropertyDef {
        code: code.into(),
        kind: kind.into(),
        ..Default::default()
    }
}

/// Loads SNOMED CT from the texts of an RF2 snapshot.
pub fn load_rf2_texts(x: &Rf2Texts, version: Option<&str>) -> Result<ConceptTable, FileError> {
    let mut table = ConceptTable::new(SNOMED_URL, version.map(str::to_string));
    table.name = Some("SNOMED CT".into());
    table.title = Some("SNOMED CT".into());
    table.case_sensitive = true;
    let mut defs = vec![
        PropertyDef {
            code: "inactive".into(),
            uri: Some("http://hl7.org/fhir/concept-properties#inactive".into()),
            kind: "boolean".into(),
            description: None,
        },
        prop_def("sufficientlyDefined", "boolean"),
        prop_def("moduleId", "code"),
        prop_def("effectiveTime", "string"),
    ];
    for (_, name, _) in ASSOCIATIONS {
        defs.push(prop_def(name, "Coding"));
    }
    table.property_defs = defs;

    // concepts
    for src in &x.concepts {
        let (text, file) = src.load()?;
        let mut rows = TsvRows::new(&text, &file)?;
        let h = rows.header().clone();
        let (c_id, c_eff, c_act, c_mod, c_def) = (
            h.col("id")?,
            h.col("effectiveTime")?,
            h.col("active")?,
            h.col("moduleId")?,
            h.col("definitionStatusId")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            let id = sctid(&h, line, f, c_id)?;
            let mut c = Concept::new(id, None);
            c.inactive = !active(&h, line, f, c_act)?;
            c.properties = vec![
                ("inactive".into(), PropertyValue::Boolean(c.inactive)),
                (
                    "sufficientlyDefined".into(),
                    PropertyValue::Boolean(f[c_def] == FULLY_DEFINED),
                ),
                ("moduleId".into(), PropertyValue::Code(f[c_mod].to_string())),
                (
                    "effectiveTime".into(),
                    PropertyValue::String(f[c_eff].to_string()),
                ),
            ];
            table.add(c);
        }
    }

    // language refsets: description id → (preferred in US, preferred in GB)
    let mut preferred: HashMap<u64, (bool, bool)> = HashMap::new();
    for src in &x.language {
        let (text, file) = src.load()?;
        let (text, file) = (&*text, &file);
        let mut rows = TsvRows::new(text, file)?;
        let h = rows.header().clone();
        let (l_act, l_ref, l_comp, l_acc) = (
            h.col("active")?,
            h.col("refsetId")?,
            h.col("referencedComponentId")?,
            h.col("acceptabilityId")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, l_act)? || f[l_acc] != PREFERRED {
                continue;
            }
            let us = f[l_ref] == US_ENGLISH;
            if !us && f[l_ref] != GB_ENGLISH {
                continue;
            }
            let did = component_id(&h, line, f, l_comp)?;
            let e = preferred.entry(did).or_insert((false, false));
            if us {
                e.0 = true;
            } else {
                e.1 = true;
            }
        }
    }

    // descriptions
    let mut fsn: HashMap<u32, String> = HashMap::new();
    let mut gb_display: HashMap<u32, String> = HashMap::new();
    for src in &x.descriptions {
        let (text, file) = src.load()?;
        let (text, file) = (&*text, &file);
        let mut rows = TsvRows::new(text, file)?;
        let h = rows.header().clone();
        let (d_id, d_act, d_con, d_lang, d_type, d_term) = (
            h.col("id")?,
            h.col("active")?,
            h.col("conceptId")?,
            h.col("languageCode")?,
            h.col("typeId")?,
            h.col("term")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, d_act)? {
                continue;
            }
            let cid = sctid(&h, line, f, d_con)?;
            let Some(ci) = table.index_of(cid) else {
                return Err(h.error(
                    line,
                    d_con,
                    format!("description for unknown concept {cid}"),
                ));
            };
            let type_id = f[d_type];
            let term = f[d_term].to_string();
            let (use_code, use_display) = match type_id {
                FSN => (FSN, Some("Fully specified name")),
                SYNONYM => (SYNONYM, Some("Synonym")),
                _ => (type_id, None),
            };
            if type_id == FSN {
                fsn.insert(ci, term.clone());
            }
            let (us, gb) = if type_id == SYNONYM {
                let did = component_id(&h, line, f, d_id)?;
                preferred.get(&did).copied().unwrap_or((false, false))
            } else {
                (false, false)
            };
            let concept = &mut table.concepts[ci as usize];
            if us {
                concept.display = Some(term.clone());
            } else if gb {
                gb_display.insert(ci, term.clone());
            }
            let language = match (us, gb) {
                (true, _) => "en-US".to_string(),
                (false, true) => "en-GB".to_string(),
                _ => f[d_lang].to_string(),
            };
            let d = Designation {
                language: Some(language),
                use_system: Some(SNOMED_URL.into()),
                use_code: Some(use_code.into()),
                use_display: use_display.map(str::to_string),
                value: term,
            };
            if us && gb {
                let mut g = d.clone();
                g.language = Some("en-GB".into());
                concept.designations.push(g);
            }
            concept.designations.push(d);
        }
    }
    for (i, c) in table.concepts.iter_mut().enumerate() {
        let i = i as u32;
        if c.display.is_none() {
            c.display = gb_display.remove(&i).or_else(|| {
                // no preferred term: the FSN without its semantic tag
                fsn.remove(&i).map(|f| match f.rfind(" (") {
                    Some(p) if f.ends_with(')') => f[..p].to_string(),
                    _ => f,
                })
            });
        }
        // dialect preferred terms first: `displayLanguage=en-GB` picks the first en-GB one
        c.designations.sort_by_key(|d| match d.language.as_deref() {
            Some("en-US") => 0,
            Some("en-GB") => 1,
            _ => 2,
        });
    }
    drop(fsn);
    drop(preferred);

    // relationships: active inferred IS-A
    for src in &x.relationships {
        let (text, file) = src.load()?;
        let mut rows = TsvRows::new(&text, &file)?;
        let h = rows.header().clone();
        let (r_act, r_src, r_dst, r_type, r_char) = (
            h.col("active")?,
            h.col("sourceId")?,
            h.col("destinationId")?,
            h.col("typeId")?,
            h.col("characteristicTypeId")?,
        );
        let r_group = h.opt_col("relationshipGroup");
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, r_act)? || f[r_char] != INFERRED {
                continue;
            }
            let src = sctid(&h, line, f, r_src)?;
            let dst = sctid(&h, line, f, r_dst)?;
            if f[r_type] != IS_A {
                // an attribute relationship (finding site, causative agent, …) for ECL refinements
                let kind: u64 = sctid(&h, line, f, r_type)?.parse().unwrap_or(0);
                let group: u16 = match r_group {
                    Some(g) => f[g].trim().parse().map_err(|_| {
                        h.error(line, g, format!("invalid relationshipGroup '{}'", f[g]))
                    })?,
                    None => 0,
                };
                match (table.index_of(src), table.index_of(dst)) {
                    (Some(s), Some(d)) => table
                        .attributes
                        .push(crate::provider::Attribute(s, kind, d, group)),
                    _ => {
                        return Err(h.error(
                            line,
                            r_src,
                            format!("relationship between unknown concepts {src} -> {dst}"),
                        ))
                    }
                }
                continue;
            }
            match (table.index_of(dst), table.index_of(src)) {
                (Some(p), Some(c)) => table.link(p, c),
                _ => {
                    return Err(h.error(
                        line,
                        r_src,
                        format!("IS-A between unknown concepts {src} -> {dst}"),
                    ))
                }
            }
        }
    }

    // simple reference sets: members
    for src in &x.simple_refsets {
        let (text, file) = src.load()?;
        let (text, file) = (&*text, &file);
        let mut rows = TsvRows::new(text, file)?;
        let h = rows.header().clone();
        let (s_act, s_ref, s_comp) = (
            h.col("active")?,
            h.col("refsetId")?,
            h.col("referencedComponentId")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, s_act)? {
                continue;
            }
            let refset = sctid(&h, line, f, s_ref)?;
            let comp = sctid(&h, line, f, s_comp)?;
            if let Some(i) = table.index_of(comp) {
                table.sets.entry(refset.to_string()).or_default().push(i);
            }
        }
    }

    // historical associations: a property on the inactive concept + one ConceptMap per refset
    let mut assoc_maps: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for src in &x.associations {
        let (text, file) = src.load()?;
        let (text, file) = (&*text, &file);
        let mut rows = TsvRows::new(text, file)?;
        let h = rows.header().clone();
        let (a_act, a_ref, a_comp, a_tgt) = (
            h.col("active")?,
            h.col("refsetId")?,
            h.col("referencedComponentId")?,
            h.col("targetComponentId")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, a_act)? {
                continue;
            }
            let refset = sctid(&h, line, f, a_ref)?;
            let comp = sctid(&h, line, f, a_comp)?;
            let target = sctid(&h, line, f, a_tgt)?;
            let Some(ci) = table.index_of(comp) else {
                // associations of descriptions are not used
                continue;
            };
            let display = table.get(target).and_then(|t| t.display.clone());
            let name = association_name(refset).unwrap_or(refset).to_string();
            table.concepts[ci as usize].properties.push((
                name,
                PropertyValue::Coding {
                    system: Some(SNOMED_URL.into()),
                    code: target.to_string(),
                    display,
                },
            ));
            table.sets.entry(refset.to_string()).or_default().push(ci);
            assoc_maps
                .entry(refset.to_string())
                .or_default()
                .entry(comp.to_string())
                .or_default()
                .push(target.to_string());
        }
    }
    for (refset, elements) in assoc_maps {
        let eq = ASSOCIATIONS
            .iter()
            .find(|(id, _, _)| *id == refset)
            .map(|(_, _, e)| *e)
            .unwrap_or("relatedto");
        let name = association_name(&refset).unwrap_or("association");
        let elements: Vec<Value> = elements
            .into_iter()
            .map(|(code, targets)| {
                json!({"code": code, "target": targets.iter()
                    .map(|t| json!({"code": t, "equivalence": eq}))
                    .collect::<Vec<_>>()})
            })
            .collect();
        table.resources.push(without_null_version(json!({
            "resourceType": "ConceptMap",
            "url": format!("{SNOMED_URL}?fhir_cm={refset}"),
            "version": version,
            "name": format!("SNOMEDCT_{}", name.replace(' ', "_")),
            "title": format!("SNOMED CT historical association {name} ({refset})"),
            "status": "active",
            "sourceUri": format!("{SNOMED_URL}?fhir_vs"),
            "targetUri": format!("{SNOMED_URL}?fhir_vs"),
            "group": [{"source": SNOMED_URL, "target": SNOMED_URL, "element": elements}]
        })));
    }

    // extended maps (ICD-10, 447562003)
    let mut icd: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for src in &x.extended_maps {
        let (text, file) = src.load()?;
        let (text, file) = (&*text, &file);
        let mut rows = TsvRows::new(text, file)?;
        let h = rows.header().clone();
        let (m_act, m_ref, m_comp, m_group, m_prio, m_rule, m_advice, m_target) = (
            h.col("active")?,
            h.col("refsetId")?,
            h.col("referencedComponentId")?,
            h.col("mapGroup")?,
            h.col("mapPriority")?,
            h.col("mapRule")?,
            h.col("mapAdvice")?,
            h.col("mapTarget")?,
        );
        while let Some(r) = rows.next() {
            let (line, f) = r?;
            if !active(&h, line, f, m_act)? || f[m_ref] != ICD10_MAP {
                continue;
            }
            let comp = sctid(&h, line, f, m_comp)?;
            for c in [m_group, m_prio] {
                if f[c].parse::<u32>().is_err() {
                    return Err(h.error(line, c, format!("expected a number, found '{}'", f[c])));
                }
            }
            if let Some(i) = table.index_of(comp) {
                table.sets.entry(ICD10_MAP.to_string()).or_default().push(i);
            }
            let comment = format!(
                "group {}, priority {}, rule {}, advice {}",
                f[m_group], f[m_prio], f[m_rule], f[m_advice]
            );
            let target = f[m_target].trim();
            let t = if target.is_empty() {
                json!({"equivalence": "unmatched", "comment": comment})
            } else {
                let unconditional = matches!(f[m_rule].trim(), "TRUE" | "OTHERWISE TRUE" | "");
                json!({"code": target, "equivalence": if unconditional { "equivalent" } else { "inexact" },
                       "comment": comment})
            };
            icd.entry(comp.to_string()).or_default().push(t);
        }
    }
    if !icd.is_empty() {
        let elements: Vec<Value> = icd
            .into_iter()
            .map(|(code, targets)| json!({"code": code, "target": targets}))
            .collect();
        table.resources.push(without_null_version(json!({
            "resourceType": "ConceptMap",
            "url": format!("{SNOMED_URL}?fhir_cm={ICD10_MAP}"),
            "version": version,
            "name": "SNOMEDCT_ICD10_ExtendedMap",
            "title": "SNOMED CT to ICD-10 extended map (447562003)",
            "status": "active",
            "sourceUri": format!("{SNOMED_URL}?fhir_vs"),
            "targetUri": format!("{ICD10_URL}?fhir_vs"),
            "group": [{"source": SNOMED_URL, "target": ICD10_URL, "element": elements}]
        })));
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
        assert_eq!(t.len(), 7);
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
