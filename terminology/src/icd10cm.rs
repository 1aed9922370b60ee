//! ICD-10-CM loader from the CMS/NCHS tabular XML (`icd10cm_tabular_YYYY.xml`).
//!
//! Produces a `ConceptTable` with chapters and sections (code = their range, e.g. `A00-B99`,
//! `A00-A09`; notSelectable), categories and codes (written with the dot, `A00.0`), and the
//! 7th-character codes generated from `sevenChrDef` as CMS does (leaf code padded with `X` to six
//! characters plus the extension character: `S00.00` + `A` → `S00.00XA`, `T07` → `T07.XXXA`).
//! Instructional notes (`inclusionTerm`, `includes`, `excludes1`, `excludes2`, `codeFirst`,
//! `useAdditionalCode`, `codeAlso`, `notes`) become string properties.

use std::path::Path;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::provider::{Concept, ConceptTable, PropertyDef, PropertyValue};
use crate::ucum::essence::ref_text;

pub const ICD10CM_URL: &str = "http://hl7.org/fhir/sid/icd-10-cm";

const NOTE_KINDS: &[&str] = &[
    "inclusionTerm",
    "includes",
    "excludes1",
    "excludes2",
    "codeFirst",
    "useAdditionalCode",
    "codeAlso",
    "notes",
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chapter,
    Section,
    Diag,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    name: String,
    desc: String,
    id: String,
    notes: Vec<(String, String)>,
    seven: Option<Vec<(String, String)>>,
    children: Vec<usize>,
}

/// A loader error with its location.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct LoadError {
    pub file: String,
    /// Byte offset in the file.
    pub position: u64,
    /// 1-based line and column.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Loads the tabular XML from a file.
pub fn load_tabular_file(path: &Path) -> Result<ConceptTable, LoadError> {
    let xml = crate::tabular::read_file(path).map_err(|e| LoadError {
        file: e.file,
        position: 0,
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    load_tabular(&xml, &path.display().to_string())
}

/// Removes the dot: `A00.0` → `A000`.
pub fn undotted(code: &str) -> String {
    code.replace('.', "")
}

/// Inserts the dot after the third character: `A000` → `A00.0`.
pub fn dotted(code: &str) -> String {
    let c = undotted(code);
    if c.len() > 3 && c.is_ascii() {
        format!("{}.{}", &c[..3], &c[3..])
    } else {
        c
    }
}

/// Parses the tabular XML.
pub fn load_tabular(xml: &str, file: &str) -> Result<ConceptTable, LoadError> {
    let mut reader = Reader::from_str(xml);
    let mut nodes: Vec<Node> = Vec::new();
    let mut roots: Vec<usize> = Vec::new();
    let mut node_stack: Vec<usize> = Vec::new();
    let mut elem_stack: Vec<String> = Vec::new();
    let mut version = String::new();
    let mut text = String::new();
    let mut capturing = false;
    let mut ext_char = String::new();
    let err = |pos: u64, m: String| {
        let (line, column) = crate::tabular::line_col(xml, pos as usize);
        LoadError {
            file: file.to_string(),
            position: pos,
            line,
            column,
            message: m,
        }
    };
    loop {
        let pos = reader.buffer_position();
        let ev = reader.read_event().map_err(|e| err(pos, e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).to_string();
                match name.as_str() {
                    "chapter" | "section" | "diag" => {
                        let kind = match name.as_str() {
                            "chapter" => Kind::Chapter,
                            "section" => Kind::Section,
                            _ => Kind::Diag,
                        };
                        let id = e
                            .try_get_attribute("id")
                            .ok()
                            .flatten()
                            .and_then(|a| a.unescape_value().ok().map(|v| v.to_string()))
                            .unwrap_or_default();
                        let idx = nodes.len();
                        nodes.push(Node {
                            kind,
                            name: String::new(),
                            desc: String::new(),
                            id,
                            notes: Vec::new(),
                            seven: None,
                            children: Vec::new(),
                        });
                        match node_stack.last() {
                            Some(&p) => nodes[p].children.push(idx),
                            None => roots.push(idx),
                        }
                        node_stack.push(idx);
                    }
                    "name" | "desc" | "note" | "version" | "extension" => {
                        capturing = true;
                        text.clear();
                        if name == "extension" {
                            ext_char = e
                                .try_get_attribute("char")
                                .ok()
                                .flatten()
                                .and_then(|a| a.unescape_value().ok().map(|v| v.to_string()))
                                .unwrap_or_default();
                        }
                    }
                    "sevenChrDef" => {
                        if let Some(&n) = node_stack.last() {
                            nodes[n].seven = Some(Vec::new());
                        }
                    }
                    _ => {}
                }
                elem_stack.push(name);
            }
            Event::Text(t) if capturing => {
                text.push_str(&t.decode().map_err(|e| err(pos, e.to_string()))?);
            }
            Event::GeneralRef(r) if capturing => text.push_str(&ref_text(&r)),
            Event::End(_) => {
                let name = elem_stack.pop().unwrap_or_default();
                let parent = elem_stack.last().map(String::as_str).unwrap_or("");
                let cur = node_stack.last().copied();
                match name.as_str() {
                    "chapter" | "section" | "diag" => {
                        node_stack.pop();
                    }
                    "version" if parent == "ICD10CM.tabular" => version = text.trim().to_string(),
                    "name" if matches!(parent, "chapter" | "diag") => {
                        if let Some(n) = cur {
                            nodes[n].name = text.trim().to_string();
                        }
                    }
                    "desc" if matches!(parent, "chapter" | "section" | "diag") => {
                        if let Some(n) = cur {
                            nodes[n].desc = text.trim().to_string();
                        }
                    }
                    "note" if NOTE_KINDS.contains(&parent) => {
                        if let Some(n) = cur {
                            nodes[n]
                                .notes
                                .push((parent.to_string(), text.trim().to_string()));
                        }
                    }
                    "extension" if parent == "sevenChrDef" => {
                        if let Some(n) = cur {
                            if let Some(s) = nodes[n].seven.as_mut() {
                                s.push((ext_char.clone(), text.trim().to_string()));
                            }
                        }
                    }
                    _ => {}
                }
                if matches!(
                    name.as_str(),
                    "name" | "desc" | "note" | "version" | "extension"
                ) {
                    capturing = false;
                }
            }
            Event::Eof => {
                if let Some(open) = elem_stack.last() {
                    return Err(err(pos, format!("unexpected end of file inside <{open}>")));
                }
                break;
            }
            _ => {}
        }
    }
    if nodes.is_empty() {
        return Err(err(
            0,
            "no chapters found: not an ICD-10-CM tabular file".into(),
        ));
    }

    let mut table = ConceptTable::new(ICD10CM_URL, Some(version.clone()));
    table.name = Some("ICD10CM".into());
    table.title = Some("International Classification of Diseases, 10th Revision, Clinical Modification (ICD-10-CM)".into());
    table.case_sensitive = false;
    table.property_defs = NOTE_KINDS
        .iter()
        .map(|k| PropertyDef {
            code: (*k).to_string(),
            kind: "string".into(),
            ..Default::default()
        })
        .chain([PropertyDef {
            code: "notSelectable".into(),
            uri: Some("http://hl7.org/fhir/concept-properties#notSelectable".into()),
            kind: "boolean".into(),
            description: None,
        }])
        .collect();

    fn code_of(n: &Node) -> String {
        match n.kind {
            Kind::Diag => n.name.clone(),
            Kind::Section => n.id.clone(),
            Kind::Chapter => {
                // "Certain infectious and parasitic diseases (A00-B99)"
                match (n.desc.rfind('('), n.desc.rfind(')')) {
                    (Some(a), Some(b)) if b > a + 1 => n.desc[a + 1..b].to_string(),
                    _ => format!("Chapter {}", n.name),
                }
            }
        }
    }

    // depth-first, keeping definition order; carries the nearest sevenChrDef
    struct Frame<'a> {
        node: usize,
        parent: Option<u32>,
        seven: Option<&'a Vec<(String, String)>>,
    }
    let mut stack: Vec<Frame> = roots
        .iter()
        .rev()
        .map(|&r| Frame {
            node: r,
            parent: None,
            seven: None,
        })
        .collect();
    while let Some(f) = stack.pop() {
        let n = &nodes[f.node];
        let code = code_of(n);
        if code.is_empty() {
            continue;
        }
        let mut c = Concept::new(code.clone(), Some(n.desc.clone()));
        if n.kind != Kind::Diag {
            c.not_selectable = true;
            c.properties
                .push(("notSelectable".into(), PropertyValue::Boolean(true)));
        }
        for (k, v) in &n.notes {
            c.properties
                .push((k.clone(), PropertyValue::String(v.clone())));
        }
        let idx = table.add(c);
        if let Some(p) = f.parent {
            table.link(p, idx);
        }
        let seven = if n.kind == Kind::Diag {
            n.seven.as_ref().or(f.seven)
        } else {
            None
        };
        let diag_children: Vec<usize> = n.children.clone();
        if n.kind == Kind::Diag && diag_children.is_empty() {
            if let Some(exts) = seven {
                let mut base = undotted(&code);
                while base.len() < 6 {
                    base.push('X');
                }
                for (ch, text) in exts {
                    let full = dotted(&format!("{base}{ch}"));
                    let display = format!("{}, {}", n.desc, text);
                    let ci = table.add(Concept::new(full, Some(display)));
                    table.link(idx, ci);
                }
            }
        }
        for &ch in diag_children.iter().rev() {
            stack.push(Frame {
                node: ch,
                parent: Some(idx),
                seven,
            });
        }
    }
    crate::tabular::progress(&format!(
        "{}: FY{} tabular, {} concepts incl. generated 7th-character codes",
        file.rsplit('/').next().unwrap_or(file),
        table.version.as_deref().unwrap_or("?"),
        table.len()
    ));
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{CodeSystemProvider, Subsumption};

    const MINI: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<ICD10CM.tabular><version>2026</version>
<chapter><name>19</name><desc>Injury, poisoning and certain other consequences of external causes (S00-T88)</desc>
 <sectionIndex><sectionRef first="S00" last="S09" id="S00-S09">Injuries to the head</sectionRef></sectionIndex>
 <section id="S00-S09"><desc>Injuries to the head (S00-S09)</desc>
  <diag><name>S00</name><desc>Superficial injury of head</desc>
   <excludes2><note>diffuse cerebral contusion (S06.2-)</note></excludes2>
   <sevenChrDef><extension char="A">initial encounter</extension><extension char="D">subsequent encounter</extension></sevenChrDef>
   <diag><name>S00.0</name><desc>Superficial injury of scalp &amp; skin</desc>
     <diag><name>S00.00</name><desc>Unspecified superficial injury of scalp</desc></diag>
   </diag>
  </diag>
 </section>
</chapter>
</ICD10CM.tabular>"#;

    #[test]
    fn seventh_characters_and_hierarchy() {
        let t = load_tabular(MINI, "mini.xml").unwrap();
        assert_eq!(t.version.as_deref(), Some("2026"));
        let c = t.get("S00.00XA").expect("generated 7th char code");
        assert_eq!(
            c.display.as_deref(),
            Some("Unspecified superficial injury of scalp, initial encounter")
        );
        assert!(t.get("S00.00XD").is_some());
        assert!(t.get("S00.0XA").is_none(), "only leaves get extensions");
        assert_eq!(
            t.get("S00.0").unwrap().display.as_deref(),
            Some("Superficial injury of scalp & skin")
        );
        assert!(t.get("S00-T88").unwrap().not_selectable);
        assert!(t.get("S00-S09").is_some());
        assert_eq!(t.subsumes("S00", "S00.00XA"), Some(Subsumption::Subsumes));
        assert_eq!(t.subsumes("S00-T88", "S00.0"), Some(Subsumption::Subsumes));
        let ex: Vec<_> = t.get("S00").unwrap().property("excludes2").collect();
        assert_eq!(ex.len(), 1);
        // case-insensitive lookup
        assert!(t.lookup("s00.00xa").is_some());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(load_tabular("<nothing/>", "x.xml").is_err());
        assert!(load_tabular("<a><b></a>", "x.xml").is_err());
        // a mismatched end tag is located by line and column
        let xml = "<ICD10CM.tabular>\n<version>2026</version>\n<chapter><name>1</name>\n  <desc>x</chapter>\n</ICD10CM.tabular>\n";
        let e = load_tabular(xml, "tab.xml").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.column),
            ("tab.xml", 4, 10),
            "{e}"
        );
        assert!(e.to_string().starts_with("tab.xml:4:10: "), "{e}");
    }

    #[test]
    fn dot_helpers() {
        assert_eq!(dotted("A000"), "A00.0");
        assert_eq!(dotted("A00"), "A00");
        assert_eq!(undotted("S00.00XA"), "S0000XA");
    }
}
