//! Loads the UCUM unit table (`ucum-essence.xml`, vendored gzip'd in `terminology/data/`).

use std::collections::HashMap;
use std::io::Read;

use quick_xml::events::{BytesRef, Event};
use quick_xml::Reader;

/// One UCUM prefix (`<prefix Code="k">`).
#[derive(Debug, Clone)]
pub struct PrefixDef {
    pub code: String,
    pub name: String,
    pub value: f64,
}

/// The definition of a special (non-ratio) unit: `<function name=".." value=".." Unit=".."/>`.
#[derive(Debug, Clone)]
pub struct FunctionDef {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// One UCUM base unit or defined unit.
#[derive(Debug, Clone)]
pub struct UnitDef {
    pub code: String,
    pub name: String,
    pub print_symbol: String,
    pub property: String,
    pub class: String,
    pub is_base: bool,
    /// Dimension letter of a base unit (L, T, M, A, C, Q, F).
    pub dim: String,
    pub is_metric: bool,
    pub is_special: bool,
    pub is_arbitrary: bool,
    /// `value@value` (1 when absent).
    pub value: f64,
    /// `value@Unit`: the UCUM expression the unit is defined in.
    pub value_unit: String,
    pub function: Option<FunctionDef>,
}

/// The whole essence table.
#[derive(Debug, Clone, Default)]
pub struct Essence {
    pub version: String,
    pub revision_date: String,
    pub prefixes: Vec<PrefixDef>,
    pub units: HashMap<String, UnitDef>,
}

const ESSENCE_GZ: &[u8] = include_bytes!("../../data/ucum-essence.xml.gz");

pub fn load_vendored() -> Result<Essence, String> {
    let mut xml = String::new();
    flate2::read::GzDecoder::new(ESSENCE_GZ)
        .read_to_string(&mut xml)
        .map_err(|e| format!("ucum-essence.xml.gz: {e}"))?;
    parse(&xml)
}

pub(crate) fn ref_text(r: &BytesRef) -> String {
    if let Ok(Some(c)) = r.resolve_char_ref() {
        return c.to_string();
    }
    let name = r.decode().unwrap_or_default();
    quick_xml::escape::resolve_predefined_entity(&name)
        .map(str::to_string)
        .unwrap_or_default()
}

pub fn parse(xml: &str) -> Result<Essence, String> {
    parse_named(xml, "ucum-essence.xml").map_err(|e| e.to_string())
}

/// Parses a `ucum-essence.xml` text; errors name the file, line and column.
pub fn parse_named(xml: &str, file: &str) -> Result<Essence, crate::tabular::FileError> {
    let fail = |pos: usize, message: String| {
        let (line, column) = crate::tabular::line_col(xml, pos);
        crate::tabular::FileError {
            file: file.to_string(),
            line,
            column,
            message,
        }
    };
    let mut reader = Reader::from_str(xml);
    let mut seen_root = false;
    let mut essence = Essence::default();
    let mut cur_unit: Option<UnitDef> = None;
    let mut cur_prefix: Option<PrefixDef> = None;
    let mut text_target: Option<&'static str> = None;
    let mut text = String::new();
    let mut depth_value = false;
    loop {
        let pos = reader.buffer_position() as usize;
        let ev = reader.read_event().map_err(|e| fail(pos, e.to_string()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(ev, Event::Empty(_));
                let name = e.name().as_ref().to_vec();
                let mut attrs: HashMap<String, String> = HashMap::new();
                for a in e.attributes().flatten() {
                    let k = String::from_utf8_lossy(a.key.as_ref()).to_string();
                    let v = a
                        .unescape_value()
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    attrs.insert(k, v);
                }
                let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
                match name.as_slice() {
                    b"root" => {
                        seen_root = true;
                        essence.version = get("version");
                        essence.revision_date = get("revision-date");
                    }
                    b"prefix" | b"base-unit" | b"unit" if get("Code").is_empty() => {
                        return Err(fail(
                            pos,
                            format!(
                                "<{}> without a Code attribute",
                                String::from_utf8_lossy(&name)
                            ),
                        ));
                    }
                    b"prefix" => {
                        cur_prefix = Some(PrefixDef {
                            code: get("Code"),
                            name: String::new(),
                            value: 1.0,
                        })
                    }
                    b"base-unit" | b"unit" => {
                        cur_unit = Some(UnitDef {
                            code: get("Code"),
                            name: String::new(),
                            print_symbol: String::new(),
                            property: String::new(),
                            class: get("class"),
                            is_base: name.as_slice() == b"base-unit",
                            dim: get("dim"),
                            is_metric: name.as_slice() == b"base-unit" || get("isMetric") == "yes",
                            is_special: get("isSpecial") == "yes",
                            is_arbitrary: get("isArbitrary") == "yes",
                            value: 1.0,
                            value_unit: String::new(),
                            function: None,
                        })
                    }
                    b"value" => {
                        let v: f64 = match attrs.get("value") {
                            None => 1.0,
                            Some(s) => s
                                .trim()
                                .parse()
                                .map_err(|_| fail(pos, format!("value=\"{s}\" is not a number")))?,
                        };
                        if let Some(p) = cur_prefix.as_mut() {
                            p.value = v;
                        } else if let Some(u) = cur_unit.as_mut() {
                            u.value = v;
                            u.value_unit = get("Unit");
                        }
                        depth_value = !empty;
                    }
                    b"function" => {
                        if let Some(u) = cur_unit.as_mut() {
                            u.function = Some(FunctionDef {
                                name: get("name"),
                                value: get("value").parse().unwrap_or(1.0),
                                unit: get("Unit"),
                            });
                        }
                    }
                    b"name" if !depth_value => {
                        text_target = Some("name");
                        text.clear();
                    }
                    b"printSymbol" if !depth_value => {
                        text_target = Some("printSymbol");
                        text.clear();
                    }
                    b"property" if !depth_value => {
                        text_target = Some("property");
                        text.clear();
                    }
                    _ => {}
                }
            }
            Event::Text(t) if text_target.is_some() => {
                text.push_str(&t.decode().unwrap_or_default());
            }
            Event::GeneralRef(r) if text_target.is_some() => {
                text.push_str(&ref_text(&r));
            }
            Event::End(e) => match e.name().as_ref() {
                b"prefix" => {
                    if let Some(p) = cur_prefix.take() {
                        essence.prefixes.push(p);
                    }
                }
                b"base-unit" | b"unit" => {
                    if let Some(u) = cur_unit.take() {
                        essence.units.insert(u.code.clone(), u);
                    }
                }
                b"value" => depth_value = false,
                b"name" | b"printSymbol" | b"property" => {
                    if let Some(target) = text_target.take() {
                        let t = text.trim().to_string();
                        if let Some(p) = cur_prefix.as_mut() {
                            if target == "name" {
                                p.name = t;
                            }
                        } else if let Some(u) = cur_unit.as_mut() {
                            match target {
                                "name" if u.name.is_empty() => u.name = t,
                                "printSymbol" => u.print_symbol = t,
                                "property" => u.property = t,
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    if !seen_root {
        return Err(fail(0, "not a UCUM essence file: no <root> element".into()));
    }
    if essence.units.is_empty() {
        return Err(fail(xml.len(), "no units found".into()));
    }
    // Longest prefix first, so that "da" is tried before "d".
    essence
        .prefixes
        .sort_by_key(|p| std::cmp::Reverse(p.code.len()));
    Ok(essence)
}
