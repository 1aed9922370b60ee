//! FHIR XML ⇄ JSON (<http://hl7.org/fhir/R4/xml.html>, `json.html`), driven by the R4 model.
//!
//! - element order comes from the StructureDefinitions;
//! - primitives are `value` attributes; their `id`/`extension` come from the JSON `_name` form
//!   (arrays aligned with `null`s);
//! - `Element.id` and `Extension.url` are XML attributes;
//! - `Narrative.div` (type `xhtml`) is passed through verbatim;
//! - a resource is an element named by its `resourceType` in the `http://hl7.org/fhir`
//!   namespace; contained/nested resources are wrapped in their element (`<contained><Patient>`).
//!
//! XML → JSON types numbers and booleans from the model and keeps the lexical form of numbers
//! (serde_json's `arbitrary_precision`).

use std::str::FromStr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde_json::{Map, Number, Value};

use crate::model::{r4, ElementMatch, Model, Representation, TypeInfo, TypeKind};

/// The FHIR XML namespace.
pub const FHIR_NS: &str = "http://hl7.org/fhir";
/// The XHTML namespace of `Narrative.div`.
pub const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";

/// Nesting limit (elements), so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 256;

/// A conversion error. For XML input, `line` and `column` (1-based) locate the problem; for
/// JSON input they are 0 and `path` names the offending element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (line {line}, column {column}{})", if path.is_empty() { String::new() } else { format!(", at {path}") })]
pub struct XmlError {
    pub message: String,
    pub line: usize,
    pub column: usize,
    /// FHIRPath-style location (`Patient.name[0].given`), where known.
    pub path: String,
}

impl XmlError {
    fn json(path: &str, message: impl Into<String>) -> Self {
        XmlError {
            message: message.into(),
            line: 0,
            column: 0,
            path: path.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON → XML
// ---------------------------------------------------------------------------------------------

/// Serialises a FHIR resource (JSON form) as FHIR XML.
pub fn json_to_xml(resource: &Value, pretty: bool) -> Result<String, XmlError> {
    let mut w = XmlWriter {
        out: String::with_capacity(4096),
        pretty,
        model: r4(),
    };
    w.out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    w.newline();
    w.resource(resource, 0, true, "")?;
    if pretty {
        w.out.push('\n');
    }
    Ok(w.out)
}

struct XmlWriter {
    out: String,
    pretty: bool,
    model: &'static Model,
}

/// One element's JSON value(s): the plain property and its `_name` companion.
struct Slot<'a> {
    json_name: &'a str,
    type_code: &'a str,
    type_name: &'a str,
    value: Option<&'a Value>,
    underscore: Option<&'a Value>,
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            '\t' => out.push_str("&#x9;"),
            c => out.push(c),
        }
    }
}

fn primitive_text(v: &Value, path: &str) -> Result<String, XmlError> {
    match v {
        Value::String(s) => {
            // XML 1.0 cannot carry these characters, not even as character references.
            if s.chars().any(|c| {
                (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{FFFE}' || c == '\u{FFFF}'
            }) {
                return Err(XmlError::json(
                    path,
                    "the value contains a control character that XML cannot represent",
                ));
            }
            Ok(s.clone())
        }
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(XmlError::json(path, "expected a primitive value")),
    }
}

impl XmlWriter {
    fn newline(&mut self) {
        if self.pretty {
            self.out.push('\n');
        }
    }

    fn indent(&mut self, depth: usize) {
        if self.pretty {
            for _ in 0..depth {
                self.out.push_str("  ");
            }
        }
    }

    fn resource(
        &mut self,
        v: &Value,
        depth: usize,
        root: bool,
        path: &str,
    ) -> Result<(), XmlError> {
        if depth > MAX_DEPTH {
            return Err(XmlError::json(path, "nesting too deep"));
        }
        let obj = v
            .as_object()
            .ok_or_else(|| XmlError::json(path, "a resource must be a JSON object"))?;
        let rt = obj
            .get("resourceType")
            .and_then(Value::as_str)
            .ok_or_else(|| XmlError::json(path, "missing resourceType"))?;
        let ti = self
            .model
            .type_info(rt)
            .filter(|t| t.kind == TypeKind::Resource && !t.is_abstract)
            .ok_or_else(|| XmlError::json(path, format!("unknown resource type '{rt}'")))?;
        let path = if path.is_empty() {
            rt.to_string()
        } else {
            path.to_string()
        };
        self.indent(depth);
        self.out.push('<');
        self.out.push_str(rt);
        if root {
            self.out.push_str(" xmlns=\"");
            self.out.push_str(FHIR_NS);
            self.out.push('"');
        }
        self.body(obj, ti, rt, depth, &path)
    }

    /// Writes attributes, `>`, children and the end tag of an element whose start tag `<name`
    /// has been written.
    fn body(
        &mut self,
        obj: &Map<String, Value>,
        ti: &'static TypeInfo,
        tag: &str,
        depth: usize,
        path: &str,
    ) -> Result<(), XmlError> {
        let mut slots: Vec<Option<Slot<'_>>> = Vec::new();
        slots.resize_with(ti.elements.len(), || None);
        for (key, value) in obj {
            if key == "resourceType" && ti.kind == TypeKind::Resource {
                continue;
            }
            if key == "fhir_comments" || key == "_fhir_comments" {
                continue;
            }
            let (bare, is_underscore) = match key.strip_prefix('_') {
                Some(b) => (b, true),
                None => (key.as_str(), false),
            };
            let m: ElementMatch<'static> = ti.resolve_json_name(bare).ok_or_else(|| {
                XmlError::json(path, format!("unknown element '{key}' in {}", ti.name))
            })?;
            let idx = m.index;
            let slot = slots[idx].get_or_insert(Slot {
                json_name: bare,
                type_code: m.type_code,
                type_name: m.type_name(),
                value: None,
                underscore: None,
            });
            if slot.json_name != bare {
                return Err(XmlError::json(
                    path,
                    format!(
                        "both '{}' and '{bare}' given for {}",
                        slot.json_name, m.info.path
                    ),
                ));
            }
            if is_underscore {
                slot.underscore = Some(value);
            } else {
                slot.value = Some(value);
            }
        }
        // Attributes (Element.id, Extension.url).
        for (e, slot) in ti.elements.iter().zip(&slots) {
            if e.representation != Representation::XmlAttr {
                continue;
            }
            if let Some(Slot { value: Some(v), .. }) = slot {
                let text = primitive_text(v, &format!("{path}.{}", e.name))?;
                self.out.push(' ');
                self.out.push_str(&e.name);
                self.out.push_str("=\"");
                escape_into(&mut self.out, &text);
                self.out.push('"');
            }
        }
        let has_children = ti
            .elements
            .iter()
            .zip(&slots)
            .any(|(e, s)| s.is_some() && e.representation != Representation::XmlAttr);
        if !has_children {
            self.out.push_str("/>");
            return Ok(());
        }
        self.out.push('>');
        self.newline();
        for (e, slot) in ti.elements.iter().zip(&slots) {
            let Some(slot) = slot else { continue };
            if e.representation == Representation::XmlAttr {
                continue;
            }
            let child_path = format!("{path}.{}", slot.json_name);
            if e.is_array() {
                let values = match slot.value {
                    None | Some(Value::Null) => &[][..],
                    Some(Value::Array(a)) => a.as_slice(),
                    Some(_) => {
                        return Err(XmlError::json(&child_path, "expected a JSON array"));
                    }
                };
                let unders = match slot.underscore {
                    None | Some(Value::Null) => &[][..],
                    Some(Value::Array(a)) => a.as_slice(),
                    Some(_) => {
                        return Err(XmlError::json(&child_path, "expected a JSON array"));
                    }
                };
                for i in 0..values.len().max(unders.len()) {
                    let v = values.get(i).filter(|v| !v.is_null());
                    let u = unders.get(i).filter(|v| !v.is_null());
                    if v.is_none() && u.is_none() {
                        continue;
                    }
                    self.value(slot, v, u, depth + 1, &format!("{child_path}[{i}]"))?;
                }
            } else {
                if matches!(slot.value, Some(Value::Array(_))) {
                    return Err(XmlError::json(&child_path, "unexpected JSON array"));
                }
                let v = slot.value.filter(|v| !v.is_null());
                let u = slot.underscore.filter(|v| !v.is_null());
                if v.is_some() || u.is_some() {
                    self.value(slot, v, u, depth + 1, &child_path)?;
                }
            }
        }
        self.indent(depth);
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
        self.newline();
        Ok(())
    }

    fn value(
        &mut self,
        slot: &Slot<'_>,
        value: Option<&Value>,
        underscore: Option<&Value>,
        depth: usize,
        path: &str,
    ) -> Result<(), XmlError> {
        if depth > MAX_DEPTH {
            return Err(XmlError::json(path, "nesting too deep"));
        }
        let model = self.model;
        let name = slot.json_name;
        if slot.type_code == "xhtml" {
            let Some(Value::String(div)) = value else {
                return Err(XmlError::json(path, "xhtml must be a JSON string"));
            };
            self.indent(depth);
            self.out.push_str(div);
            self.newline();
            return Ok(());
        }
        let ti = model
            .type_info(slot.type_name)
            .ok_or_else(|| XmlError::json(path, format!("unknown type '{}'", slot.type_name)))?;
        match ti.kind {
            TypeKind::Primitive => {
                self.indent(depth);
                self.out.push('<');
                self.out.push_str(name);
                let under = match underscore {
                    None => None,
                    Some(Value::Object(o)) => Some(o),
                    Some(_) => {
                        return Err(XmlError::json(
                            path,
                            format!("'_{name}' must be a JSON object"),
                        ))
                    }
                };
                if let Some(id) = under.and_then(|o| o.get("id")) {
                    let text = primitive_text(id, path)?;
                    self.out.push_str(" id=\"");
                    escape_into(&mut self.out, &text);
                    self.out.push('"');
                }
                if let Some(v) = value {
                    let text = primitive_text(v, path)?;
                    self.out.push_str(" value=\"");
                    escape_into(&mut self.out, &text);
                    self.out.push('"');
                }
                let extensions = match under.and_then(|o| o.get("extension")) {
                    None | Some(Value::Null) => &[][..],
                    Some(Value::Array(a)) => a.as_slice(),
                    Some(_) => return Err(XmlError::json(path, "extension must be an array")),
                };
                if let Some(o) = under {
                    if let Some(k) = o.keys().find(|k| *k != "id" && *k != "extension") {
                        return Err(XmlError::json(
                            path,
                            format!("unknown element '{k}' in '_{name}'"),
                        ));
                    }
                }
                if extensions.is_empty() {
                    self.out.push_str("/>");
                    self.newline();
                    return Ok(());
                }
                self.out.push('>');
                self.newline();
                let ext_ti = model
                    .type_info("Extension")
                    .ok_or_else(|| XmlError::json(path, "Extension type missing"))?;
                for (i, ext) in extensions.iter().enumerate() {
                    let p = format!("{path}.extension[{i}]");
                    let o = ext
                        .as_object()
                        .ok_or_else(|| XmlError::json(&p, "expected a JSON object"))?;
                    self.indent(depth + 1);
                    self.out.push_str("<extension");
                    self.body(o, ext_ti, "extension", depth + 1, &p)?;
                }
                self.indent(depth);
                self.out.push_str("</");
                self.out.push_str(name);
                self.out.push('>');
                self.newline();
                Ok(())
            }
            TypeKind::Resource => {
                if underscore.is_some() {
                    return Err(XmlError::json(path, format!("unexpected '_{name}'")));
                }
                let Some(v) = value else { return Ok(()) };
                self.indent(depth);
                self.out.push('<');
                self.out.push_str(name);
                self.out.push('>');
                self.newline();
                self.resource(v, depth + 1, false, path)?;
                self.newline_if_needed();
                self.indent(depth);
                self.out.push_str("</");
                self.out.push_str(name);
                self.out.push('>');
                self.newline();
                Ok(())
            }
            TypeKind::Complex | TypeKind::Backbone => {
                if underscore.is_some() {
                    return Err(XmlError::json(path, format!("unexpected '_{name}'")));
                }
                let Some(v) = value else { return Ok(()) };
                let o = v
                    .as_object()
                    .ok_or_else(|| XmlError::json(path, "expected a JSON object"))?;
                self.indent(depth);
                self.out.push('<');
                self.out.push_str(name);
                self.body(o, ti, name, depth, path)?;
                self.newline_if_needed();
                Ok(())
            }
        }
    }

    /// After an empty element (`/>`) no newline was written yet.
    fn newline_if_needed(&mut self) {
        if self.pretty && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// XML → JSON
// ---------------------------------------------------------------------------------------------

/// A parsed XML element (a small DOM; the xhtml `div` is kept as raw text).
#[derive(Debug)]
struct Node {
    name: String,
    /// Namespace prefix of the element name (`f` in `f:Patient`), usually empty.
    prefix: String,
    attrs: Vec<(String, String)>,
    children: Vec<Node>,
    /// For an XHTML `div`: its verbatim XML.
    xhtml: Option<String>,
    /// Byte offset of the start tag, for error positions.
    pos: usize,
}

fn line_col(input: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(input.len());
    let mut p = pos;
    while !input.is_char_boundary(p) {
        p -= 1;
    }
    let before = &input[..p];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = match before.rfind('\n') {
        Some(i) => before[i + 1..].chars().count() + 1,
        None => before.chars().count() + 1,
    };
    (line, col)
}

fn err_at(input: &str, pos: usize, message: impl Into<String>) -> XmlError {
    let (line, column) = line_col(input, pos);
    XmlError {
        message: message.into(),
        line,
        column,
        path: String::new(),
    }
}

fn node_from_start(input: &str, e: &BytesStart<'_>, pos: usize) -> Result<Node, XmlError> {
    let name = std::str::from_utf8(e.local_name().as_ref())
        .map_err(|_| err_at(input, pos, "element name is not UTF-8"))?
        .to_string();
    let prefix = e
        .name()
        .prefix()
        .and_then(|p| std::str::from_utf8(p.as_ref()).ok().map(str::to_string))
        .unwrap_or_default();
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| err_at(input, pos, format!("malformed attribute: {err}")))?;
        let key = std::str::from_utf8(a.key.as_ref())
            .map_err(|_| err_at(input, pos, "attribute name is not UTF-8"))?
            .to_string();
        let value = a
            .unescape_value()
            .map_err(|err| err_at(input, pos, format!("bad attribute value: {err}")))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Node {
        name,
        prefix,
        attrs,
        children: Vec::new(),
        xhtml: None,
        pos,
    })
}

fn parse_dom(input: &str) -> Result<Node, XmlError> {
    let mut reader = Reader::from_str(input);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let pos = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|e| {
            err_at(
                input,
                reader.error_position() as usize,
                format!("malformed XML: {e}"),
            )
        })?;
        match event {
            Event::Start(e) => {
                if root.is_some() {
                    return Err(err_at(input, pos, "content after the root element"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(err_at(input, pos, "nesting too deep"));
                }
                let mut node = node_from_start(input, &e, pos)?;
                if node.name == "div" && !stack.is_empty() {
                    let end = e.name().as_ref().to_vec();
                    reader
                        .read_to_end(quick_xml::name::QName(&end))
                        .map_err(|err| {
                            err_at(
                                input,
                                reader.error_position() as usize,
                                format!("malformed XHTML: {err}"),
                            )
                        })?;
                    let end_pos = (reader.buffer_position() as usize).min(input.len());
                    node.xhtml = input.get(pos..end_pos).map(str::to_string);
                    if let Some(parent) = stack.last_mut() {
                        parent.children.push(node);
                    }
                } else {
                    stack.push(node);
                }
            }
            Event::Empty(e) => {
                if root.is_some() {
                    return Err(err_at(input, pos, "content after the root element"));
                }
                let mut node = node_from_start(input, &e, pos)?;
                if node.name == "div" {
                    let end_pos = (reader.buffer_position() as usize).min(input.len());
                    node.xhtml = input.get(pos..end_pos).map(str::to_string);
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| err_at(input, pos, "unexpected end tag"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(t) => {
                if !t.iter().all(|b| b.is_ascii_whitespace()) {
                    return Err(err_at(
                        input,
                        pos,
                        "unexpected text content (FHIR XML carries values in 'value' attributes)",
                    ));
                }
            }
            Event::CData(_) | Event::GeneralRef(_) => {
                return Err(err_at(input, pos, "unexpected text content"));
            }
            Event::DocType(_) => {
                return Err(err_at(input, pos, "DOCTYPE is not allowed in FHIR XML"));
            }
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(err_at(input, input.len(), "unexpected end of document"));
    }
    root.ok_or_else(|| err_at(input, input.len(), "no root element"))
}

/// Parses FHIR XML into the FHIR JSON form.
pub fn xml_to_json(xml: &str) -> Result<Value, XmlError> {
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let root = parse_dom(xml)?;
    let ns_attr = if root.prefix.is_empty() {
        "xmlns".to_string()
    } else {
        format!("xmlns:{}", root.prefix)
    };
    let ns = root
        .attrs
        .iter()
        .find(|(k, _)| *k == ns_attr)
        .map(|(_, v)| v.as_str());
    if ns != Some(FHIR_NS) {
        return Err(err_at(
            xml,
            root.pos,
            format!("the root element must be in the namespace {FHIR_NS}"),
        ));
    }
    let conv = JsonBuilder {
        input: xml,
        model: r4(),
    };
    conv.resource(&root)
}

struct JsonBuilder<'a> {
    input: &'a str,
    model: &'static Model,
}

fn primitive_json(type_code: &str, text: &str) -> Option<Value> {
    match type_code {
        "boolean" => match text {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        "integer" | "positiveInt" | "unsignedInt" | "decimal" => {
            let t = text.trim();
            let valid = if type_code == "decimal" {
                !t.is_empty()
                    && t.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    })
            } else {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_digit() || b == b'-' || b == b'+')
            };
            if !valid {
                return None;
            }
            Number::from_str(t).ok().map(Value::Number)
        }
        _ => Some(Value::String(text.to_string())),
    }
}

/// Accumulates the JSON properties for one element (arrays kept aligned with `_name`).
struct Prop {
    key: String,
    array: bool,
    values: Vec<Value>,
    unders: Vec<Value>,
}

impl<'a> JsonBuilder<'a> {
    fn err(&self, node: &Node, msg: impl Into<String>) -> XmlError {
        err_at(self.input, node.pos, msg)
    }

    fn resource(&self, node: &Node) -> Result<Value, XmlError> {
        let ti = self
            .model
            .type_info(&node.name)
            .filter(|t| t.kind == TypeKind::Resource && !t.is_abstract)
            .ok_or_else(|| self.err(node, format!("unknown resource type '{}'", node.name)))?;
        let mut map = Map::new();
        map.insert("resourceType".into(), Value::String(node.name.clone()));
        self.fill(node, ti, &mut map)?;
        Ok(Value::Object(map))
    }

    fn fill(
        &self,
        node: &Node,
        ti: &'static TypeInfo,
        map: &mut Map<String, Value>,
    ) -> Result<(), XmlError> {
        for (k, v) in &node.attrs {
            if k == "xmlns" || k.starts_with("xmlns:") || k.contains(':') {
                continue;
            }
            match ti.resolve_json_name(k) {
                Some(m) if m.info.representation == Representation::XmlAttr => {
                    map.insert(k.clone(), Value::String(v.clone()));
                }
                _ => {
                    return Err(
                        self.err(node, format!("unknown attribute '{k}' on <{}>", node.name))
                    )
                }
            }
        }
        let mut props: Vec<Prop> = Vec::new();
        let mut last_index: Option<usize> = None;
        for child in &node.children {
            let m = ti.resolve_json_name(&child.name).ok_or_else(|| {
                self.err(
                    child,
                    format!("unknown element '{}' in {}", child.name, ti.name),
                )
            })?;
            if m.info.representation == Representation::XmlAttr {
                return Err(self.err(child, format!("'{}' must be an attribute", child.name)));
            }
            let idx = match props.iter().position(|p| p.key == child.name) {
                Some(i) => {
                    if !props[i].array {
                        return Err(
                            self.err(child, format!("element '{}' may not repeat", child.name))
                        );
                    }
                    if last_index != Some(i) {
                        return Err(self.err(
                            child,
                            format!("repetitions of '{}' must be adjacent", child.name),
                        ));
                    }
                    i
                }
                None => {
                    props.push(Prop {
                        key: child.name.clone(),
                        array: m.info.is_array(),
                        values: Vec::new(),
                        unders: Vec::new(),
                    });
                    props.len() - 1
                }
            };
            last_index = Some(idx);
            let (value, under) = self.value(child, &m)?;
            let p = &mut props[idx];
            p.values.push(value);
            p.unders.push(under);
        }
        for p in props {
            let any_value = p.values.iter().any(|v| !v.is_null());
            let any_under = p.unders.iter().any(|v| !v.is_null());
            if p.array {
                if any_value {
                    map.insert(p.key.clone(), Value::Array(p.values));
                }
                if any_under {
                    map.insert(format!("_{}", p.key), Value::Array(p.unders));
                }
            } else {
                if let Some(v) = p.values.into_iter().next().filter(|v| !v.is_null()) {
                    map.insert(p.key.clone(), v);
                }
                if let Some(u) = p.unders.into_iter().next().filter(|v| !v.is_null()) {
                    map.insert(format!("_{}", p.key), u);
                }
            }
        }
        Ok(())
    }

    /// Converts one child element: (value, `_name` companion or Null).
    fn value(&self, node: &Node, m: &ElementMatch<'static>) -> Result<(Value, Value), XmlError> {
        if m.type_code == "xhtml" {
            let raw = node
                .xhtml
                .clone()
                .ok_or_else(|| self.err(node, "expected an XHTML div"))?;
            return Ok((Value::String(raw), Value::Null));
        }
        let ti = self
            .model
            .type_info(m.type_name())
            .ok_or_else(|| self.err(node, format!("unknown type '{}'", m.type_name())))?;
        match ti.kind {
            TypeKind::Primitive => {
                let mut value = Value::Null;
                let mut under = Map::new();
                for (k, v) in &node.attrs {
                    match k.as_str() {
                        "value" => {
                            value = primitive_json(m.type_code, v).ok_or_else(|| {
                                self.err(node, format!("invalid {} value '{v}'", m.type_code))
                            })?;
                        }
                        "id" => {
                            under.insert("id".into(), Value::String(v.clone()));
                        }
                        k if k.starts_with("xmlns") || k.contains(':') => {}
                        k => {
                            return Err(self
                                .err(node, format!("unknown attribute '{k}' on <{}>", node.name)))
                        }
                    }
                }
                let mut exts = Vec::new();
                let ext_ti = self
                    .model
                    .type_info("Extension")
                    .ok_or_else(|| self.err(node, "Extension type missing"))?;
                for c in &node.children {
                    if c.name != "extension" {
                        return Err(self.err(
                            c,
                            format!("unknown element '{}' in primitive {}", c.name, m.type_code),
                        ));
                    }
                    let mut map = Map::new();
                    self.fill(c, ext_ti, &mut map)?;
                    exts.push(Value::Object(map));
                }
                if !exts.is_empty() {
                    under.insert("extension".into(), Value::Array(exts));
                }
                let under = if under.is_empty() {
                    Value::Null
                } else {
                    Value::Object(under)
                };
                if value.is_null() && under.is_null() {
                    return Err(self.err(
                        node,
                        format!("<{}> has neither a value nor extensions", node.name),
                    ));
                }
                Ok((value, under))
            }
            TypeKind::Resource => {
                let mut inner = node.children.iter();
                let (Some(r), None) = (inner.next(), inner.next()) else {
                    return Err(self.err(
                        node,
                        format!("<{}> must contain exactly one resource", node.name),
                    ));
                };
                Ok((self.resource(r)?, Value::Null))
            }
            TypeKind::Complex | TypeKind::Backbone => {
                let mut map = Map::new();
                self.fill(node, ti, &mut map)?;
                Ok((Value::Object(map), Value::Null))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patient_round_trip() {
        let p = json!({
            "resourceType": "Patient",
            "id": "ex1",
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Hi &amp; <b>bye</b></p></div>"},
            "active": true,
            "name": [{"family": "Doe", "given": ["John", "Q"], "_given": [null, {"extension": [{"url": "http://x", "valueString": "initial"}]}]}],
            "gender": "male",
            "birthDate": "1970-01-02",
            "_birthDate": {"id": "bd", "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1970-01-02T10:00:00Z"}]},
            "multipleBirthInteger": 2,
            "contact": [{"name": {"text": "Jane \"JJ\" <Doe>\nline2"}}]
        });
        let xml = json_to_xml(&p, true).unwrap();
        assert!(xml.contains("<Patient xmlns=\"http://hl7.org/fhir\">"));
        assert!(xml.contains("<birthDate id=\"bd\" value=\"1970-01-02\">"));
        assert!(xml.contains("<multipleBirthInteger value=\"2\"/>"));
        assert!(xml.contains("<extension url=\"http://x\">"));
        // element order from the StructureDefinition: id before text before active
        let i_id = xml.find("<id ").unwrap();
        let i_text = xml.find("<text>").unwrap();
        let i_active = xml.find("<active").unwrap();
        assert!(i_id < i_text && i_text < i_active);
        let back = xml_to_json(&xml).unwrap();
        assert_eq!(back, p);
        assert_eq!(back["multipleBirthInteger"], json!(2));
        assert_eq!(back["active"], json!(true));
        let compact = json_to_xml(&p, false).unwrap();
        assert_eq!(xml_to_json(&compact).unwrap(), p);
    }

    #[test]
    fn hand_written_xml() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Observation xmlns="http://hl7.org/fhir">
  <!-- a comment -->
  <status value="final"/>
  <code><coding><system value="http://loinc.org"/><code value="8867-4"/></coding></code>
  <valueQuantity><value value="72.50"/><unit value="/min"/></valueQuantity>
  <contained><Patient><id value="p1"/></Patient></contained>
</Observation>"#;
        let v = xml_to_json(xml).unwrap();
        assert_eq!(v["resourceType"], "Observation");
        assert_eq!(v["status"], "final");
        assert_eq!(v["code"]["coding"][0]["code"], "8867-4");
        assert_eq!(v["valueQuantity"]["value"].to_string(), "72.50");
        assert_eq!(v["contained"][0]["resourceType"], "Patient");
        assert_eq!(v["contained"][0]["id"], "p1");
    }

    #[test]
    fn bundle_with_nested_resources() {
        let b: Value = serde_json::from_str(
            r#"{"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": [
                {"name": "p", "resource": {"resourceType": "Patient", "active": false}},
                {"name": "n", "valueDecimal": 1.50}
            ]}}
        ]}"#,
        )
        .unwrap();
        let xml = json_to_xml(&b, false).unwrap();
        assert!(xml.contains("<resource><Parameters>"));
        let back = xml_to_json(&xml).unwrap();
        assert_eq!(back, b);
        assert_eq!(
            back["entry"][0]["resource"]["parameter"][1]["valueDecimal"].to_string(),
            "1.50"
        );
    }

    #[test]
    fn malformed_xml_has_position() {
        let xml = "<Patient xmlns=\"http://hl7.org/fhir\">\n  <active value=\"true\">\n</Patient>";
        let e = xml_to_json(xml).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.column >= 1);
        let e = xml_to_json(
            "<Patient xmlns=\"http://hl7.org/fhir\">\n  <foo value=\"1\"/>\n</Patient>",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        assert!(e.message.contains("foo"));
        let e =
            xml_to_json("<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"yes\"/></Patient>")
                .unwrap_err();
        assert!(e.message.contains("boolean"));
        let e = xml_to_json("<Patient><active value=\"true\"/></Patient>").unwrap_err();
        assert!(e.message.contains("namespace"));
        let e = xml_to_json("<Foo xmlns=\"http://hl7.org/fhir\"/>").unwrap_err();
        assert!(e.message.contains("Foo"));
        assert!(xml_to_json("").is_err());
        assert!(
            xml_to_json("<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"true\"/>").is_err()
        );
        let e = xml_to_json("<Patient xmlns=\"http://hl7.org/fhir\"><gender value=\"male\"/><gender value=\"female\"/></Patient>").unwrap_err();
        assert!(e.message.contains("repeat"));
    }

    #[test]
    fn prefixed_namespace_and_bom() {
        let xml = "\u{feff}<f:Patient xmlns:f=\"http://hl7.org/fhir\"><f:active value=\"true\"/></f:Patient>";
        assert_eq!(
            xml_to_json(xml).unwrap(),
            json!({"resourceType": "Patient", "active": true})
        );
    }

    #[test]
    fn no_panic_on_truncated_or_mangled_xml() {
        let p = json!({"resourceType": "Patient", "id": "x",
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>é &amp; ü</p></div>"},
            "name": [{"given": ["Ä", "B"], "_given": [null, {"id": "i"}]}],
            "contained": [{"resourceType": "Organization", "name": "O"}]});
        let xml = json_to_xml(&p, true).unwrap();
        for (i, _) in xml.char_indices() {
            let _ = xml_to_json(&xml[..i]);
            let mut mangled = xml.clone();
            mangled.insert(i, '<');
            let _ = xml_to_json(&mangled);
            let mut mangled = xml.clone();
            mangled.insert(i, '"');
            let _ = xml_to_json(&mangled);
        }
        assert_eq!(xml_to_json(&xml).unwrap(), p);
    }

    #[test]
    fn json_errors() {
        assert!(json_to_xml(&json!({"resourceType": "Nope"}), false).is_err());
        assert!(json_to_xml(&json!({"resourceType": "Patient", "foo": 1}), false).is_err());
        assert!(json_to_xml(
            &json!({"resourceType": "Patient", "name": {"family": "x"}}),
            false
        )
        .is_err());
        assert!(json_to_xml(&json!([1]), false).is_err());
        let e =
            json_to_xml(&json!({"resourceType": "Patient", "id": "a\u{1}b"}), false).unwrap_err();
        assert!(e.message.contains("control character"));
        let e = json_to_xml(
            &json!({"resourceType": "Patient", "name": [{"given": [{}]}]}),
            false,
        )
        .unwrap_err();
        assert_eq!(e.path, "Patient.name[0].given[0]");
    }
}
