//! Structural validation of FHIR JSON resources against the R4 StructureDefinitions.
//!
//! Checks: known `resourceType`; unknown elements; JSON shape (object / array / primitive JSON
//! type); cardinality (min/max); primitive formats (the R4 regexes, integer ranges, real
//! calendar dates, base64); `_name` primitive-extension shape and alignment; required bindings
//! on `code` (and Coding/CodeableConcept codes of a known system) where the value set is
//! enumerable, and through a [`CodeValidator`] (the server's terminology service) where it is
//! not; contained resources (recursively, no nested `contained`, local `#id` references
//! must resolve); Reference shape and target types; empty objects/arrays/strings; `ext-1`.
//!
//! The walk is driven by [`TypeInfo`] trees, so a profile's snapshot turned into `TypeInfo`s can
//! be validated with [`Validator::validate_as`].

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::bytes::Regex;
use serde_json::{Map, Value};

use crate::model::{r4, ElementInfo, Model, TypeInfo, TypeKind};
use crate::outcome::Issue;

/// Validates a resource against the base R4 definitions. Empty result = valid.
pub fn validate(resource: &Value) -> Vec<Issue> {
    Validator::new(r4()).validate(resource)
}

/// [`validate`], asking `codes` about required bindings the model cannot enumerate.
pub fn validate_with(resource: &Value, codes: &dyn CodeValidator) -> Vec<Issue> {
    Validator::new(r4())
        .with_code_validator(codes)
        .validate(resource)
}

/// What a [`CodeValidator`] says about one code and one value set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeVerdict {
    /// The code is in the value set.
    Valid,
    /// The code is not in the value set; the text says why.
    Invalid(String),
    /// The value set, or the code system, is unknown: nothing can be said (no error).
    Unknown,
}

/// Answers the required bindings whose value set the model cannot enumerate (filters, nested
/// value sets, whole external code systems such as UCUM, THO content): the server implements it
/// with its terminology service (`ValueSet/$validate-code` semantics), so this crate depends on
/// none.
pub trait CodeValidator {
    /// Whether `code` is in the value set `value_set` (a canonical URL, maybe `|version`).
    /// `system` is the Coding's system; `None` for a `code` element, whose system the value
    /// set implies.
    fn validate_code(&self, value_set: &str, system: Option<&str>, code: &str) -> CodeVerdict;

    /// Whether the value set draws codes from `system` (`Some(true)`/`Some(false)`), or `None`
    /// when that cannot be told (unknown value set, nested value sets). Extensible bindings in
    /// profiles use it: a code of an included system that is not in the value set is a warning,
    /// a code of another system is allowed. See [`value_set_includes_system`].
    fn includes_system(&self, _value_set: &str, _system: &str) -> Option<bool> {
        None
    }
}

/// Whether a ValueSet resource's `compose` includes codes of `system`: `Some(true)` when an
/// `include` names it, `Some(false)` when none does and none imports another value set, `None`
/// otherwise (no compose, or nested value sets that might).
pub fn value_set_includes_system(vs: &Value, system: &str) -> Option<bool> {
    let includes = vs.pointer("/compose/include")?.as_array()?;
    let mut nested = false;
    for i in includes {
        if i.get("system").and_then(Value::as_str) == Some(system) {
            return Some(true);
        }
        nested |= i.get("valueSet").is_some();
    }
    if nested {
        None
    } else {
        Some(false)
    }
}

/// A structural validator over a [`Model`].
pub struct Validator<'m> {
    model: &'m Model,
    codes: Option<&'m dyn CodeValidator>,
}

struct Ctx<'a> {
    issues: Vec<Issue>,
    /// FHIRPath-style location of the value being checked.
    path: String,
    /// `id`s of the contained resources of the enclosing resource, for `#id` references.
    contained_ids: Vec<Vec<&'a str>>,
    depth: usize,
}

impl Ctx<'_> {
    fn error(&mut self, code: &'static str, msg: impl Into<String>) {
        self.issues
            .push(Issue::error(code, msg).at(self.path.clone()));
    }
    fn warning(&mut self, code: &'static str, msg: impl Into<String>) {
        self.issues
            .push(Issue::warning(code, msg).at(self.path.clone()));
    }
}

const MAX_DEPTH: usize = 128;
/// R4: strings are at most 1 MB.
const MAX_STRING: usize = 1024 * 1024;

/// Compiled regexes of the primitive types, keyed by type name (`date`, `id`, ...).
fn primitive_regexes() -> &'static HashMap<String, Regex> {
    static RX: OnceLock<HashMap<String, Regex>> = OnceLock::new();
    RX.get_or_init(|| {
        let model = r4();
        let mut map = HashMap::new();
        for name in [
            "boolean",
            "canonical",
            "code",
            "date",
            "dateTime",
            "decimal",
            "id",
            "instant",
            "integer",
            "oid",
            "positiveInt",
            "time",
            "unsignedInt",
            "uri",
            "url",
            "uuid",
        ] {
            if let Some(rx) = model.type_info(name).and_then(|t| t.regex.as_deref()) {
                // ASCII classes (\s, \S) like the Java regexes the spec was written for.
                if let Ok(re) = Regex::new(&format!("(?-u)^(?:{rx})$")) {
                    map.insert(name.to_string(), re);
                }
            }
        }
        map
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// For a date/dateTime/instant that already matched its regex: is the day real?
fn calendar_day_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 10 {
        return true;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u32>().ok());
    match (num(0..4), num(5..7), num(8..10)) {
        (Some(y), Some(m), Some(d)) => d <= days_in_month(y, m),
        _ => true,
    }
}

fn base64_ok(s: &str) -> bool {
    let mut n = 0usize;
    let mut pad = 0usize;
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' if pad == 0 => n += 1,
            b'=' => {
                pad += 1;
                n += 1;
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => return false,
        }
    }
    n.is_multiple_of(4) && pad <= 2
}

/// The root primitive type deciding the JSON representation.
fn json_primitive_class(type_code: &str) -> &'static str {
    // R4 has no other numeric or boolean primitives (integer64 is R5).
    match type_code {
        "integer" | "positiveInt" | "unsignedInt" => "integer",
        "decimal" => "decimal",
        "boolean" => "boolean",
        _ => "string",
    }
}

impl<'m> Validator<'m> {
    pub fn new(model: &'m Model) -> Self {
        Validator { model, codes: None }
    }

    /// Checks the required bindings the model cannot enumerate with `codes`.
    pub fn with_code_validator(mut self, codes: &'m dyn CodeValidator) -> Self {
        self.codes = Some(codes);
        self
    }

    /// Validates a resource (any concrete resource type).
    pub fn validate(&self, resource: &Value) -> Vec<Issue> {
        let mut ctx = Ctx {
            issues: Vec::new(),
            path: String::new(),
            contained_ids: Vec::new(),
            depth: 0,
        };
        self.resource(resource, &mut ctx, false);
        ctx.issues
    }

    /// Validates a resource against a given type definition (e.g. a profile's root
    /// [`TypeInfo`]); child types are still resolved through the model.
    pub fn validate_as(&self, resource: &Value, type_info: &TypeInfo) -> Vec<Issue> {
        let mut ctx = Ctx {
            issues: Vec::new(),
            path: type_info.name.clone(),
            contained_ids: Vec::new(),
            depth: 0,
        };
        match resource.as_object() {
            Some(obj) => self.resource_body(obj, type_info, &mut ctx, false),
            None => ctx.error("structure", "a resource must be a JSON object"),
        }
        ctx.issues
    }

    fn resource<'a>(&self, v: &'a Value, ctx: &mut Ctx<'a>, contained: bool) {
        let Some(obj) = v.as_object() else {
            ctx.error(
                "structure",
                format!("a resource must be a JSON object, not {}", json_kind(v)),
            );
            return;
        };
        let Some(rt) = obj.get("resourceType") else {
            ctx.error("required", "missing resourceType");
            return;
        };
        let Some(rt) = rt.as_str() else {
            ctx.error("structure", "resourceType must be a string");
            return;
        };
        let Some(ti) = self
            .model
            .type_info(rt)
            .filter(|t| t.kind == TypeKind::Resource && !t.is_abstract)
        else {
            ctx.error("invalid", format!("unknown resource type '{rt}'"));
            return;
        };
        let saved = ctx.path.len();
        if ctx.path.is_empty() {
            ctx.path.push_str(rt);
        } else {
            // nested resources: FHIRPath `resource.ofType(X)` is verbose; keep the element path.
        }
        self.resource_body(obj, ti, ctx, contained);
        ctx.path.truncate(saved);
    }

    fn resource_body<'a>(
        &self,
        obj: &'a Map<String, Value>,
        ti: &TypeInfo,
        ctx: &mut Ctx<'a>,
        contained: bool,
    ) {
        if ti.name == "Bundle" {
            bundle_invariants(obj, ctx);
        }
        if contained && obj.contains_key("contained") {
            ctx.error(
                "invariant",
                "dom-2: a contained resource SHALL NOT contain nested resources",
            );
        }
        if contained {
            if let Some(meta) = obj.get("meta").and_then(Value::as_object) {
                if meta.contains_key("versionId") || meta.contains_key("lastUpdated") {
                    ctx.error(
                        "invariant",
                        "dom-4: a contained resource SHALL NOT have a meta.versionId or a meta.lastUpdated",
                    );
                }
                if meta.contains_key("security") {
                    ctx.error(
                        "invariant",
                        "dom-5: a contained resource SHALL NOT have a security label",
                    );
                }
            }
        }
        let ids: Vec<&'a str> = match obj.get("contained") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|r| r.get("id").and_then(Value::as_str))
                .collect(),
            _ => Vec::new(),
        };
        let pushed = !contained;
        if pushed {
            ctx.contained_ids.push(ids);
        }
        self.object(obj, ti, ctx, true);
        if pushed {
            ctx.contained_ids.pop();
        }
    }

    /// Validates the properties of an object of type `ti`.
    fn object<'a>(
        &self,
        obj: &'a Map<String, Value>,
        ti: &TypeInfo,
        ctx: &mut Ctx<'a>,
        is_resource: bool,
    ) {
        if ctx.depth > MAX_DEPTH {
            ctx.error("structure", "nesting too deep");
            return;
        }
        ctx.depth += 1;
        if obj.is_empty() && !is_resource {
            ctx.error(
                "structure",
                "ele-1: an object must have a value or children (empty objects are not allowed)",
            );
        }
        // Which element (index) each property set, for min cardinality and choice clashes.
        let mut seen: Vec<Option<&'a str>> = vec![None; ti.elements.len()];
        let has_underscore = obj.keys().any(|k| k.starts_with('_'));
        for (key, value) in obj {
            if is_resource && key == "resourceType" {
                continue;
            }
            let (bare, underscore) = match key.strip_prefix('_') {
                Some(b) => (b, true),
                None => (key.as_str(), false),
            };
            let saved = ctx.path.len();
            ctx.path.push('.');
            ctx.path.push_str(key);
            let Some(m) = ti.resolve_json_name(bare) else {
                ctx.error(
                    "structure",
                    format!("unknown element '{key}' in {}", ti.name),
                );
                ctx.path.truncate(saved);
                continue;
            };
            let idx = m.index;
            match seen[idx] {
                Some(prev) if prev != bare => ctx.error(
                    "structure",
                    format!(
                        "only one of the choices of {} may be present ('{prev}' and '{bare}')",
                        m.info.path
                    ),
                ),
                _ => seen[idx] = Some(bare),
            }
            let type_name = m.type_name();
            if underscore {
                self.underscore(obj, bare, value, m.info, type_name, ctx);
            } else {
                let companion = if has_underscore {
                    obj.get(&format!("_{bare}"))
                } else {
                    None
                };
                self.element_value(value, companion, m.info, m.type_code, type_name, ctx);
            }
            ctx.path.truncate(saved);
        }
        for (e, s) in ti.elements.iter().zip(&seen) {
            if e.min > 0 && s.is_none() {
                let saved = ctx.path.len();
                ctx.path.push('.');
                ctx.path.push_str(&e.name);
                ctx.error(
                    "required",
                    format!("{} is required (minimum cardinality {})", e.path, e.min),
                );
                ctx.path.truncate(saved);
            }
        }
        if ti.name == "Extension" {
            let has_value = obj
                .keys()
                .any(|k| k.starts_with("value") || k.starts_with("_value"));
            let has_ext = obj
                .get("extension")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            if has_value == has_ext {
                ctx.error(
                    "invariant",
                    "ext-1: an extension must have either extensions or value[x], not both",
                );
            }
        }
        ctx.depth -= 1;
    }

    /// A property value (single or array) of element `info`.
    #[allow(clippy::too_many_arguments)]
    fn element_value<'a>(
        &self,
        value: &'a Value,
        companion: Option<&'a Value>,
        info: &ElementInfo,
        type_code: &str,
        type_name: &str,
        ctx: &mut Ctx<'a>,
    ) {
        if info.is_array() {
            let Value::Array(items) = value else {
                ctx.error(
                    "structure",
                    format!(
                        "{} repeats: expected a JSON array, found {}",
                        info.path,
                        json_kind(value)
                    ),
                );
                return;
            };
            if items.is_empty() {
                ctx.error("structure", "arrays must not be empty");
                return;
            }
            if let Some(max) = info.max {
                if items.len() > max as usize {
                    ctx.error(
                        "structure",
                        format!(
                            "{} allows at most {max} item(s), found {}",
                            info.path,
                            items.len()
                        ),
                    );
                }
            }
            let comp = companion.and_then(Value::as_array);
            let saved = ctx.path.len();
            for (i, item) in items.iter().enumerate() {
                ctx.path.truncate(saved);
                push_index(&mut ctx.path, i);
                if item.is_null() {
                    let has_ext = comp.and_then(|c| c.get(i)).is_some_and(|c| !c.is_null());
                    if !has_ext {
                        ctx.error(
                            "structure",
                            "null is only allowed where the matching '_' entry has an id or extensions",
                        );
                    }
                    continue;
                }
                self.single(item, info, type_code, type_name, ctx);
            }
            ctx.path.truncate(saved);
        } else {
            if value.is_array() {
                ctx.error(
                    "structure",
                    format!("{} does not repeat: a JSON array is not allowed", info.path),
                );
                return;
            }
            if value.is_null() {
                if companion.is_none() {
                    ctx.error("structure", "null values are not allowed");
                }
                return;
            }
            self.single(value, info, type_code, type_name, ctx);
        }
    }

    /// One value of an element.
    fn single<'a>(
        &self,
        value: &'a Value,
        info: &ElementInfo,
        type_code: &str,
        type_name: &str,
        ctx: &mut Ctx<'a>,
    ) {
        if type_code == "xhtml" {
            match value.as_str() {
                Some(s) => {
                    if let Err(msg) = check_xhtml(s) {
                        ctx.error("value", msg);
                    }
                }
                None => ctx.error("structure", "xhtml must be a JSON string"),
            }
            return;
        }
        let Some(ti) = self.model.type_info(type_name) else {
            // Types outside the model (e.g. the System.* type of a primitive's value).
            return;
        };
        match ti.kind {
            TypeKind::Primitive => self.primitive(value, type_code, info, ctx),
            TypeKind::Resource => {
                let contained = info.name == "contained";
                self.resource(value, ctx, contained);
            }
            TypeKind::Complex | TypeKind::Backbone => {
                let Some(obj) = value.as_object() else {
                    ctx.error(
                        "structure",
                        format!(
                            "expected a JSON object ({}), found {}",
                            type_name,
                            json_kind(value)
                        ),
                    );
                    return;
                };
                self.object(obj, ti, ctx, false);
                match type_code {
                    "Reference" => self.reference(obj, info, ctx),
                    "code" => {}
                    "Coding" => self.coding_binding(obj, info, ctx),
                    "CodeableConcept" => self.codeable_concept_binding(obj, info, ctx),
                    _ => {}
                }
            }
        }
    }

    fn primitive(&self, value: &Value, type_code: &str, info: &ElementInfo, ctx: &mut Ctx<'_>) {
        let class = json_primitive_class(type_code);
        match (class, value) {
            ("boolean", Value::Bool(_)) => {}
            ("integer", Value::Number(n)) => {
                let text = n.to_string();
                let ok = primitive_regexes()
                    .get("integer")
                    .is_none_or(|re| re.is_match(text.as_bytes()));
                match text.parse::<i64>() {
                    Ok(i) if ok && i32::try_from(i).is_ok() => {
                        if type_code == "positiveInt" && i < 1 {
                            ctx.error("value", format!("positiveInt must be ≥ 1, found {i}"));
                        } else if type_code == "unsignedInt" && i < 0 {
                            ctx.error("value", format!("unsignedInt must be ≥ 0, found {i}"));
                        }
                    }
                    _ => ctx.error(
                        "value",
                        format!("'{text}' is not a valid {type_code} (32-bit integer)"),
                    ),
                }
            }
            ("decimal", Value::Number(n)) => {
                let text = n.to_string();
                if let Some(re) = primitive_regexes().get("decimal") {
                    if !re.is_match(text.as_bytes()) {
                        ctx.error("value", format!("'{text}' is not a valid decimal"));
                    }
                }
            }
            ("string", Value::String(s)) => self.string_format(s, type_code, info, ctx),
            _ => ctx.error(
                "structure",
                format!(
                    "{type_code} must be a JSON {}, found {}",
                    match class {
                        "integer" | "decimal" => "number",
                        c => c,
                    },
                    json_kind(value)
                ),
            ),
        }
    }

    fn string_format(&self, s: &str, type_code: &str, info: &ElementInfo, ctx: &mut Ctx<'_>) {
        if s.is_empty() {
            ctx.error("value", "strings must not be empty");
            return;
        }
        if s.len() > MAX_STRING {
            ctx.error("value", "strings are limited to 1 MB");
            return;
        }
        if s.chars()
            .any(|c| c < ' ' && !matches!(c, '\t' | '\n' | '\r'))
        {
            ctx.error(
                "value",
                "control characters (other than tab, CR, LF) are not allowed in FHIR strings",
            );
            return;
        }
        match type_code {
            "string" | "markdown" => {
                if s.trim().is_empty() {
                    ctx.warning("value", "the string is only whitespace");
                }
            }
            "base64Binary" => {
                if !base64_ok(s) {
                    ctx.error("value", "not valid base64");
                }
            }
            _ => {
                let root = if self.model.type_info(type_code).is_some() {
                    type_code
                } else {
                    "string"
                };
                if let Some(re) = primitive_regexes().get(root) {
                    if !re.is_match(s.as_bytes()) {
                        ctx.error("value", format!("'{}' is not a valid {type_code}", clip(s)));
                        return;
                    }
                }
                if matches!(type_code, "date" | "dateTime" | "instant") && !calendar_day_ok(s) {
                    ctx.error("value", format!("'{s}' is not a real calendar date"));
                    return;
                }
                if type_code == "code" {
                    self.code_binding(s, info, ctx);
                }
            }
        }
    }

    fn code_binding(&self, code: &str, info: &ElementInfo, ctx: &mut Ctx<'_>) {
        let Some(b) = &info.binding else { return };
        if b.strength != "required" {
            return;
        }
        let Some(vs) = self.model.required_value_set(&b.value_set) else {
            if let Some(codes) = self.codes {
                match codes.validate_code(&b.value_set, None, code) {
                    CodeVerdict::Valid => return,
                    CodeVerdict::Invalid(why) => {
                        ctx.error(
                            "code-invalid",
                            format!(
                                "'{}' is not in the required value set {}: {why}",
                                clip(code),
                                b.value_set
                            ),
                        );
                        return;
                    }
                    CodeVerdict::Unknown => {}
                }
            }
            // Value sets the terminology cannot answer either: check the code's syntax at least.
            let ok = match b.value_set.as_str() {
                // FHIR allows the shorthands xml/json/ttl (CapabilityStatement.format, TestScript)
                "http://hl7.org/fhir/ValueSet/mimetypes" => {
                    matches!(code, "xml" | "json" | "ttl") || is_mime_type(code)
                }
                "http://hl7.org/fhir/ValueSet/currencies" => {
                    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
                }
                _ => true,
            };
            if !ok {
                ctx.error(
                    "code-invalid",
                    format!("'{}' is not a valid code of {}", clip(code), b.value_set),
                );
            }
            return;
        };
        if !vs.iter().any(|(_, c)| c == code) {
            ctx.error(
                "code-invalid",
                format!(
                    "'{}' is not in the required value set {}",
                    clip(code),
                    b.value_set
                ),
            );
        }
    }

    fn coding_binding(&self, coding: &Map<String, Value>, info: &ElementInfo, ctx: &mut Ctx<'_>) {
        let Some(b) = &info.binding else { return };
        if b.strength != "required" {
            return;
        }
        let (Some(system), Some(code)) = (
            coding.get("system").and_then(Value::as_str),
            coding.get("code").and_then(Value::as_str),
        ) else {
            return;
        };
        let Some(vs) = self.model.required_value_set(&b.value_set) else {
            if let Some(CodeVerdict::Invalid(why)) = self
                .codes
                .map(|c| c.validate_code(&b.value_set, Some(system), code))
            {
                ctx.error(
                    "code-invalid",
                    format!(
                        "'{system}#{}' is not in the required value set {}: {why}",
                        clip(code),
                        b.value_set
                    ),
                );
            }
            return;
        };
        if vs.iter().any(|(s, _)| s == system) && !vs.iter().any(|(s, c)| s == system && c == code)
        {
            ctx.error(
                "code-invalid",
                format!(
                    "'{system}#{}' is not in the required value set {}",
                    clip(code),
                    b.value_set
                ),
            );
        }
    }

    /// A CodeableConcept bound `required`: each coding of the value set's own code systems must
    /// be in it (enumerable value sets); through the [`CodeValidator`], at least one coding must
    /// be in the value set, unless one of them cannot be checked (unknown code system).
    fn codeable_concept_binding(
        &self,
        obj: &Map<String, Value>,
        info: &ElementInfo,
        ctx: &mut Ctx<'_>,
    ) {
        let codings: Vec<&Map<String, Value>> = match obj.get("coding") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_object).collect(),
            _ => return,
        };
        let Some(b) = &info.binding else { return };
        if b.strength != "required" {
            return;
        }
        if self.model.required_value_set(&b.value_set).is_some() {
            for c in &codings {
                self.coding_binding(c, info, ctx);
            }
            return;
        }
        let Some(codes) = self.codes else { return };
        let mut invalid: Vec<String> = Vec::new();
        for c in &codings {
            let (Some(system), Some(code)) = (
                c.get("system").and_then(Value::as_str),
                c.get("code").and_then(Value::as_str),
            ) else {
                continue;
            };
            match codes.validate_code(&b.value_set, Some(system), code) {
                CodeVerdict::Valid | CodeVerdict::Unknown => return,
                CodeVerdict::Invalid(why) => {
                    invalid.push(format!("'{system}#{}': {why}", clip(code)))
                }
            }
        }
        if !invalid.is_empty() {
            ctx.error(
                "code-invalid",
                format!(
                    "none of the codings is in the required value set {} ({})",
                    b.value_set,
                    invalid.join("; ")
                ),
            );
        }
    }

    fn reference(&self, obj: &Map<String, Value>, info: &ElementInfo, ctx: &mut Ctx<'_>) {
        let Some(reference) = obj.get("reference").and_then(Value::as_str) else {
            return;
        };
        let targets: &[String] = info
            .types
            .iter()
            .find(|t| t.code == "Reference")
            .map(|t| t.target_profiles.as_slice())
            .unwrap_or(&[]);
        if let Some(local) = reference.strip_prefix('#') {
            if !local.is_empty() {
                let found = ctx
                    .contained_ids
                    .last()
                    .is_some_and(|ids| ids.contains(&local));
                if !found {
                    ctx.error(
                        "invalid",
                        format!("ref-1: no contained resource with id '{local}'"),
                    );
                }
            }
            return;
        }
        if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
            return;
        }
        let rel = match reference.find("://") {
            Some(_) => {
                // Absolute URL: check the type if it ends in Type/id[/_history/vid].
                let segs: Vec<&str> = reference.split('/').collect();
                let n = segs.len();
                let type_seg = if n >= 4 && segs[n - 2] == "_history" {
                    segs.get(n - 4)
                } else {
                    segs.get(n.wrapping_sub(2))
                };
                if let Some(t) = type_seg.filter(|t| self.model.is_resource_type(t)) {
                    self.reference_target(t, targets, ctx);
                }
                return;
            }
            None => reference,
        };
        let (type_part, rest) = match rel.split_once('?') {
            Some((t, _)) => (t, None), // conditional reference (transactions)
            None => match rel.split_once('/') {
                Some((t, r)) => (t, Some(r)),
                None => {
                    ctx.error(
                        "invalid",
                        format!("invalid reference '{}' (expected Type/id)", clip(reference)),
                    );
                    return;
                }
            },
        };
        if !self.model.is_resource_type(type_part) {
            ctx.error(
                "invalid",
                format!(
                    "invalid reference '{}': unknown resource type '{}'",
                    clip(reference),
                    clip(type_part)
                ),
            );
            return;
        }
        if let Some(rest) = rest {
            let mut parts = rest.split('/');
            let id = parts.next().unwrap_or("");
            let history_ok = match (parts.next(), parts.next(), parts.next()) {
                (None, _, _) => true,
                (Some("_history"), Some(v), None) => !v.is_empty(),
                _ => false,
            };
            let id_ok = primitive_regexes()
                .get("id")
                .is_none_or(|re| re.is_match(id.as_bytes()));
            if !id_ok || !history_ok {
                ctx.error(
                    "invalid",
                    format!("invalid reference '{}'", clip(reference)),
                );
                return;
            }
        }
        self.reference_target(type_part, targets, ctx);
    }

    fn reference_target(&self, type_name: &str, targets: &[String], ctx: &mut Ctx<'_>) {
        if targets.is_empty() || targets.iter().any(|t| t == "Resource" || t == type_name) {
            return;
        }
        ctx.error(
            "invalid",
            format!(
                "a reference to {type_name} is not allowed here (allowed: {})",
                targets.join(", ")
            ),
        );
    }

    /// `_name`: the id/extensions of a primitive (or an array of them aligned with `name`).
    fn underscore<'a>(
        &self,
        obj: &'a Map<String, Value>,
        bare: &str,
        value: &'a Value,
        info: &ElementInfo,
        type_name: &str,
        ctx: &mut Ctx<'a>,
    ) {
        let is_primitive = self
            .model
            .type_info(type_name)
            .is_some_and(|t| t.kind == TypeKind::Primitive);
        if !is_primitive {
            ctx.error(
                "structure",
                format!("'_{bare}' is only allowed for primitive elements"),
            );
            return;
        }
        if info.is_array() {
            let Value::Array(items) = value else {
                ctx.error("structure", format!("'_{bare}' must be a JSON array"));
                return;
            };
            if let Some(Value::Array(values)) = obj.get(bare) {
                if values.len() != items.len() {
                    ctx.error(
                        "structure",
                        format!(
                            "'_{bare}' has {} entries but '{bare}' has {}",
                            items.len(),
                            values.len()
                        ),
                    );
                }
            } else if obj.contains_key(bare) {
                return; // shape error reported on the value itself
            } else if items.is_empty() {
                ctx.error("structure", "arrays must not be empty");
            }
            let saved = ctx.path.len();
            for (i, item) in items.iter().enumerate() {
                ctx.path.truncate(saved);
                push_index(&mut ctx.path, i);
                if !item.is_null() {
                    self.primitive_extras(item, ctx);
                }
            }
            ctx.path.truncate(saved);
        } else {
            self.primitive_extras(value, ctx);
        }
    }

    fn primitive_extras<'a>(&self, value: &'a Value, ctx: &mut Ctx<'a>) {
        let Some(o) = value.as_object() else {
            ctx.error(
                "structure",
                format!(
                    "expected a JSON object with id/extension, found {}",
                    json_kind(value)
                ),
            );
            return;
        };
        if o.is_empty() {
            ctx.error("structure", "ele-1: empty object");
        }
        for (k, v) in o {
            let saved = ctx.path.len();
            ctx.path.push('.');
            ctx.path.push_str(k);
            match k.as_str() {
                "id" => {
                    if v.as_str().is_none_or(|s| s.is_empty()) {
                        ctx.error("structure", "id must be a non-empty string");
                    }
                }
                "extension" => match (v, self.model.type_info("Extension")) {
                    (Value::Array(exts), Some(ext_ti)) if !exts.is_empty() => {
                        let inner = ctx.path.len();
                        for (i, e) in exts.iter().enumerate() {
                            ctx.path.truncate(inner);
                            push_index(&mut ctx.path, i);
                            match e.as_object() {
                                Some(eo) => self.object(eo, ext_ti, ctx, false),
                                None => ctx.error("structure", "an extension must be an object"),
                            }
                        }
                    }
                    _ => ctx.error("structure", "extension must be a non-empty array"),
                },
                _ => ctx.error(
                    "structure",
                    format!("unknown element '{k}' (only id and extension are allowed here)"),
                ),
            }
            ctx.path.truncate(saved);
        }
    }
}

/// txt-1 (no active content: only basic formatting elements and attributes), txt-2 (non-empty),
/// well-formed XML with a `<div>` root in the XHTML namespace.
pub fn check_xhtml(div: &str) -> Result<(), String> {
    use quick_xml::events::Event;
    const ELEMENTS: &[&str] = &[
        "a",
        "abbr",
        "acronym",
        "b",
        "big",
        "blockquote",
        "br",
        "caption",
        "cite",
        "code",
        "col",
        "colgroup",
        "dd",
        "dfn",
        "div",
        "dl",
        "dt",
        "em",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "i",
        "img",
        "li",
        "ol",
        "p",
        "pre",
        "q",
        "samp",
        "small",
        "span",
        "strong",
        "sub",
        "sup",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "tt",
        "ul",
        "var",
    ];
    const ATTRIBUTES: &[&str] = &[
        "abbr",
        "accesskey",
        "align",
        "alt",
        "axis",
        "bgcolor",
        "border",
        "cellhalign",
        "cellpadding",
        "cellspacing",
        "cellvalign",
        "char",
        "charoff",
        "charset",
        "class",
        "colspan",
        "compact",
        "coords",
        "dir",
        "frame",
        "headers",
        "height",
        "href",
        "hreflang",
        "hspace",
        "id",
        "lang",
        "longdesc",
        "name",
        "nowrap",
        "rel",
        "rev",
        "rowspan",
        "rules",
        "scope",
        "shape",
        "span",
        "src",
        "start",
        "style",
        "summary",
        "tabindex",
        "title",
        "type",
        "valign",
        "value",
        "vspace",
        "width",
    ];
    let mut reader = quick_xml::Reader::from_str(div);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut roots = 0usize;
    let mut has_content = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("the narrative is not well-formed XHTML: {e}"))?;
        let start = match &event {
            Event::Start(e) | Event::Empty(e) => Some(e),
            _ => None,
        };
        if let Some(e) = start {
            let qname = e.name();
            let name = String::from_utf8_lossy(qname.local_name().as_ref()).to_ascii_lowercase();
            if depth == 0 {
                roots += 1;
                if name != "div" || roots > 1 {
                    return Err("the narrative must be a single XHTML <div>".into());
                }
                let ns_ok = e.attributes().flatten().any(|a| {
                    let k = a.key.as_ref();
                    (k == b"xmlns" || k.starts_with(b"xmlns:"))
                        && a.value.as_ref() == b"http://www.w3.org/1999/xhtml"
                });
                if !ns_ok {
                    return Err("the narrative <div> must be in the XHTML namespace".into());
                }
            }
            if !ELEMENTS.contains(&name.as_str()) {
                return Err(format!(
                    "txt-1: the narrative contains a disallowed element <{name}>"
                ));
            }
            if name == "img" {
                has_content = true;
            }
            for a in e.attributes() {
                let a = a.map_err(|e| format!("the narrative is not well-formed XHTML: {e}"))?;
                let key = a.key.as_ref();
                if key == b"xmlns" || key.starts_with(b"xmlns:") || key.starts_with(b"xml:") {
                    continue;
                }
                let local =
                    String::from_utf8_lossy(a.key.local_name().as_ref()).to_ascii_lowercase();
                // data-* attributes (e.g. `data-fhir` of generated narratives) are inert.
                if !ATTRIBUTES.contains(&local.as_str()) && !local.starts_with("data-") {
                    return Err(format!(
                        "txt-1: the narrative contains a disallowed attribute '{local}'"
                    ));
                }
                if local == "href" || local == "src" {
                    let v = String::from_utf8_lossy(a.value.as_ref())
                        .trim()
                        .to_ascii_lowercase();
                    if v.starts_with("javascript:") || v.starts_with("vbscript:") {
                        return Err("txt-1: the narrative contains active content".into());
                    }
                }
            }
            if matches!(event, Event::Start(_)) {
                depth += 1;
            }
            continue;
        }
        match event {
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Text(t) if t.iter().any(|b| !b.is_ascii_whitespace()) => {
                if depth == 0 {
                    return Err("text outside the narrative <div>".into());
                }
                has_content = true;
            }
            Event::GeneralRef(r) => {
                let known = r.is_char_ref()
                    || matches!(r.as_ref(), b"amp" | b"lt" | b"gt" | b"quot" | b"apos");
                if !known {
                    return Err(format!(
                        "the narrative uses the undefined entity '&{};' (use a character reference)",
                        String::from_utf8_lossy(r.as_ref())
                    ));
                }
                has_content = true;
            }
            Event::CData(_) => has_content = true,
            Event::DocType(_) => return Err("DOCTYPE is not allowed in the narrative".into()),
            Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 {
        return Err("the narrative is not well-formed XHTML: unclosed element".into());
    }
    if roots == 0 {
        return Err("the narrative must be an XHTML <div>".into());
    }
    if !has_content {
        return Err("txt-2: the narrative must have some non-whitespace content".into());
    }
    Ok(())
}

/// A value visited by [`walk`].
pub struct WalkNode<'a, 'p> {
    pub value: &'a Value,
    /// The value's type: a resource type, datatype, primitive or backbone path
    /// (`Patient.contact`).
    pub type_name: &'p str,
    /// The element holding the value (`None` for the root and nested resources).
    pub element: Option<&'static ElementInfo>,
    /// FHIRPath-style location (`Patient.contact[0].name`).
    pub path: &'p str,
}

/// Visits every value of a resource (itself, nested resources, complex and primitive values)
/// with its type, for evaluating invariants ([`crate::model::Constraint`]) with a FHIRPath
/// engine: for each node, `Model::constraints_with_ancestors(node.type_name)` and
/// `node.element.constraints` apply. Unknown elements are skipped (validation reports them).
pub fn walk(resource: &Value, visit: &mut dyn FnMut(&WalkNode<'_, '_>)) {
    let Some(rt) = resource.get("resourceType").and_then(Value::as_str) else {
        return;
    };
    let mut path = rt.to_string();
    walk_resource(resource, None, &mut path, visit, 0);
}

fn walk_resource(
    resource: &Value,
    element: Option<&'static ElementInfo>,
    path: &mut String,
    visit: &mut dyn FnMut(&WalkNode<'_, '_>),
    depth: usize,
) {
    let model = r4();
    let Some(ti) = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|rt| model.type_info(rt))
    else {
        return;
    };
    visit(&WalkNode {
        value: resource,
        type_name: &ti.name,
        element,
        path,
    });
    walk_children(resource, ti, path, visit, depth);
}

fn walk_children(
    value: &Value,
    ti: &'static TypeInfo,
    path: &mut String,
    visit: &mut dyn FnMut(&WalkNode<'_, '_>),
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let model = r4();
    let Some(obj) = value.as_object() else { return };
    for (key, v) in obj {
        if key.starts_with('_') || key == "resourceType" {
            continue;
        }
        let Some(m) = ti.resolve_json_name(key) else {
            continue;
        };
        let Some(child_ti) = model.type_info(m.type_name()) else {
            continue;
        };
        let saved = path.len();
        path.push('.');
        path.push_str(key);
        let items: Vec<(Option<usize>, &Value)> = match v {
            Value::Array(a) => a.iter().enumerate().map(|(i, x)| (Some(i), x)).collect(),
            x => vec![(None, x)],
        };
        let base = path.len();
        for (i, item) in items {
            path.truncate(base);
            if let Some(i) = i {
                push_index(path, i);
            }
            if item.is_null() {
                continue;
            }
            if child_ti.kind == TypeKind::Resource {
                walk_resource(item, Some(m.info), path, visit, depth + 1);
                continue;
            }
            visit(&WalkNode {
                value: item,
                type_name: &child_ti.name,
                element: Some(m.info),
                path,
            });
            if matches!(child_ti.kind, TypeKind::Complex | TypeKind::Backbone) {
                walk_children(item, child_ti, path, visit, depth + 1);
            }
        }
        path.truncate(saved);
    }
}

/// Bundle invariants: bdl-1 (total only in searchset/history), bdl-2 (entry.search only in a
/// searchset), bdl-3 (entry.request in batch/transaction/history), bdl-4 (entry.response in
/// batch-response/transaction-response/history), bdl-7 (fullUrl unique, per versionId).
fn bundle_invariants(obj: &Map<String, Value>, ctx: &mut Ctx<'_>) {
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if obj.contains_key("total") && !matches!(kind, "searchset" | "history") {
        ctx.error("invariant", "bdl-1: total only when a search or history");
    }
    let Some(entries) = obj.get("entry").and_then(Value::as_array) else {
        return;
    };
    let mut seen: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
    let saved = ctx.path.len();
    for (i, e) in entries.iter().enumerate() {
        let Some(e) = e.as_object() else { continue };
        ctx.path.truncate(saved);
        ctx.path.push_str(".entry");
        push_index(&mut ctx.path, i);
        if e.contains_key("search") && kind != "searchset" {
            ctx.error("invariant", "bdl-2: entry.search only when a search");
        }
        if !e.contains_key("request") && matches!(kind, "batch" | "transaction" | "history") {
            ctx.error(
                "invariant",
                "bdl-3: each entry of a batch, transaction or history must have a request",
            );
        }
        if !e.contains_key("response")
            && matches!(kind, "batch-response" | "transaction-response" | "history")
        {
            ctx.error(
                "invariant",
                "bdl-4: each entry of a batch/transaction response or history must have a response",
            );
        }
        if let Some(full_url) = e.get("fullUrl").and_then(Value::as_str) {
            let version = e
                .get("resource")
                .and_then(|r| r.get("meta"))
                .and_then(|m| m.get("versionId"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !seen.insert((full_url, version)) && kind != "history" {
                ctx.error(
                    "invariant",
                    format!(
                        "bdl-7: fullUrl '{}' is not unique in the Bundle",
                        clip(full_url)
                    ),
                );
            }
        }
    }
    ctx.path.truncate(saved);
}

/// BCP 13 media type syntax: `type/subtype` with optional `; parameters`.
fn is_mime_type(code: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    let main = code.split(';').next().unwrap_or("").trim();
    match main.split_once('/') {
        Some((t, s)) => token(t) && token(s),
        None => false,
    }
}

fn push_index(path: &mut String, i: usize) {
    use std::fmt::Write;
    let _ = write!(path, "[{i}]");
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(v: Value) -> Vec<(String, String, &'static str)> {
        validate(&v)
            .into_iter()
            .filter(|i| i.is_error())
            .map(|i| {
                (
                    i.expression.first().cloned().unwrap_or_default(),
                    i.diagnostics,
                    i.code,
                )
            })
            .collect()
    }

    fn expr(v: Value) -> Vec<String> {
        errors(v).into_iter().map(|(e, _, _)| e).collect()
    }

    #[test]
    fn valid_patient() {
        let p = json!({
            "resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "identifier": [{"system": "urn:oid:1.2.3", "value": "123"}],
            "active": true,
            "name": [{"family": "Doe", "given": ["John", "Q"]}],
            "gender": "female", "birthDate": "1970-02-28",
            "deceasedBoolean": false,
            "multipleBirthInteger": 2,
            "managingOrganization": {"reference": "Organization/o1"},
            "generalPractitioner": [{"reference": "#pr1"}],
            "contained": [{"resourceType": "Practitioner", "id": "pr1"}]
        });
        assert_eq!(errors(p), vec![]);
    }

    #[test]
    fn resource_type() {
        assert_eq!(errors(json!({"resourceType": "Nope"}))[0].2, "invalid");
        assert_eq!(errors(json!({"id": "x"}))[0].2, "required");
        assert!(!errors(json!([])).is_empty());
        assert!(!errors(json!({"resourceType": "DomainResource"})).is_empty());
    }

    #[test]
    fn unknown_elements() {
        assert_eq!(
            expr(json!({"resourceType": "Patient", "foo": 1, "name": [{"bar": "x"}]})),
            vec!["Patient.foo", "Patient.name[0].bar"]
        );
        assert_eq!(
            expr(
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueFoo": 1})
            ),
            vec!["Observation.valueFoo"]
        );
    }

    #[test]
    fn json_shapes() {
        assert_eq!(
            expr(json!({"resourceType": "Patient", "name": {"family": "x"}})),
            vec!["Patient.name"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "gender": ["male"]})),
            vec!["Patient.gender"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "active": "true"})),
            vec!["Patient.active"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "multipleBirthInteger": "2"})),
            vec!["Patient.multipleBirthInteger"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "birthDate": 1970})),
            vec!["Patient.birthDate"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "name": []})),
            vec!["Patient.name"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "name": [{}]})),
            vec!["Patient.name[0]"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "maritalStatus": "M"})),
            vec!["Patient.maritalStatus"]
        );
    }

    #[test]
    fn cardinality() {
        // Observation.status and .code are 1..1
        let e = errors(json!({"resourceType": "Observation"}));
        let paths: Vec<_> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(paths, vec!["Observation.status", "Observation.code"]);
        assert!(e.iter().all(|x| x.2 == "required"));
        // Extension.url is required
        assert_eq!(
            expr(json!({"resourceType": "Patient", "extension": [{"valueString": "x"}]})),
            vec!["Patient.extension[0].url"]
        );
        // choice: only one
        assert_eq!(
            expr(
                json!({"resourceType": "Patient", "deceasedBoolean": true, "deceasedDateTime": "2020"})
            ),
            vec!["Patient.deceasedDateTime"]
        );
        // Narrative requires div and status
        assert_eq!(
            expr(json!({"resourceType": "Patient", "text": {"status": "generated"}})),
            vec!["Patient.text.div"]
        );
    }

    #[test]
    fn primitive_formats() {
        let bad = [
            ("birthDate", json!("1970-13-01")),
            ("birthDate", json!("1970-02-30")),
            ("birthDate", json!("70-01-01")),
            ("deceasedDateTime", json!("2020-01-01T10:00:00")), // time without zone
            ("id", json!("has space")),
            ("id", json!("a".repeat(65))),
            ("gender", json!("")),
            ("multipleBirthInteger", json!(1.5)),
            ("multipleBirthInteger", json!(3000000000u64)),
            ("implicitRules", json!("has space")),
            ("language", json!(" en")),
        ];
        for (k, v) in bad {
            let mut p = json!({"resourceType": "Patient"});
            p[k] = v.clone();
            let e = expr(p);
            assert_eq!(e, vec![format!("Patient.{k}")], "{k}: {v}");
        }
        let good = [
            ("birthDate", json!("1970")),
            ("birthDate", json!("1970-02")),
            ("birthDate", json!("2000-02-29")),
            ("deceasedDateTime", json!("2020-01-01T10:00:00.123+05:30")),
            ("id", json!("A-1.b")),
            ("multipleBirthInteger", json!(-3)),
        ];
        for (k, v) in good {
            let mut p = json!({"resourceType": "Patient"});
            p[k] = v.clone();
            assert_eq!(expr(p), Vec::<String>::new(), "{k}: {v}");
        }
        // instant, time, decimal, positiveInt, unsignedInt, base64, oid, uuid, uri
        let obs = |extra: Value| {
            let mut o =
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
            for (k, v) in extra.as_object().unwrap() {
                o[k] = v.clone();
            }
            expr(o)
        };
        assert_eq!(
            obs(json!({"issued": "2020-01-01"})),
            vec!["Observation.issued"]
        );
        assert!(obs(json!({"issued": "2020-01-01T00:00:00Z"})).is_empty());
        assert_eq!(
            obs(json!({"valueTime": "25:00:00"})),
            vec!["Observation.valueTime"]
        );
        assert!(obs(json!({"valueTime": "23:59:59"})).is_empty());
        let dec: Value = serde_json::from_str(r#"{"valueQuantity": {"value": 1.50}}"#).unwrap();
        assert!(obs(dec).is_empty());
        assert_eq!(
            obs(json!({"valueQuantity": {"value": "1.5"}})),
            vec!["Observation.valueQuantity.value"]
        );
        assert_eq!(
            obs(
                json!({"valueSampledData": {"origin": {"value": 0}, "period": 1, "dimensions": 0}})
            ),
            vec!["Observation.valueSampledData.dimensions"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "photo": [{"data": "abc"}]})),
            vec!["Patient.photo[0].data"]
        );
        assert!(
            expr(json!({"resourceType": "Patient", "photo": [{"data": "aGVsbG8="}]})).is_empty()
        );
        assert_eq!(
            obs(json!({"identifier": [{"system": "urn:oid:1.2.x"}]})),
            vec![] as Vec<String>,
            "system is a uri, urn:oid:1.2.x is a valid uri"
        );
        let rt = |extra: Value| {
            let mut o = json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"}});
            for (k, v) in extra.as_object().unwrap() {
                o[k] = v.clone();
            }
            expr(o)
        };
        assert!(rt(json!({"prediction": [{"probabilityDecimal": 0.5}]})).is_empty());
        let p = json!({"resourceType": "Patient", "photo": [{"size": -1}]});
        assert_eq!(expr(p), vec!["Patient.photo[0].size"]);
    }

    #[test]
    fn mime_types_and_currencies() {
        assert!(
            expr(json!({"resourceType": "Patient", "photo": [{"contentType": "image/png"}]}))
                .is_empty()
        );
        assert!(expr(json!({"resourceType": "Patient", "photo": [{"contentType": "text/plain; charset=UTF-8"}]})).is_empty());
        assert_eq!(
            expr(json!({"resourceType": "Patient", "photo": [{"contentType": "png"}]})),
            vec!["Patient.photo[0].contentType"]
        );
        let money = |c: &str| {
            expr(
                json!({"resourceType": "Invoice", "status": "draft", "totalNet": {"value": 1, "currency": c}}),
            )
        };
        assert!(money("USD").is_empty());
        assert_eq!(money("usd"), vec!["Invoice.totalNet.currency"]);
    }

    #[test]
    fn bundle_invariants() {
        let e = expr(
            json!({"resourceType": "Bundle", "type": "transaction", "total": 1, "entry": [
                {"fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "resource": {"resourceType": "Patient"},
                 "request": {"method": "POST", "url": "Patient"}},
                {"fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "resource": {"resourceType": "Patient"},
                 "search": {"mode": "match"}}
            ]}),
        );
        assert_eq!(
            e,
            vec![
                "Bundle",
                "Bundle.entry[1]",
                "Bundle.entry[1]",
                "Bundle.entry[1]"
            ]
        );
        let ok = json!({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [
            {"fullUrl": "http://x/Patient/1", "resource": {"resourceType": "Patient"}, "search": {"mode": "match"}}]});
        assert_eq!(expr(ok), Vec::<String>::new());
    }

    #[test]
    fn walk_visits_typed_nodes() {
        let p = json!({"resourceType": "Patient", "active": true,
            "contact": [{"name": {"family": "x"}}],
            "contained": [{"resourceType": "Organization", "name": "o"}],
            "deceasedDateTime": "2020"});
        let mut seen = Vec::new();
        walk(&p, &mut |n| {
            seen.push(format!("{} {}", n.path, n.type_name))
        });
        assert_eq!(
            seen,
            vec![
                "Patient Patient",
                "Patient.active boolean",
                "Patient.contact[0] Patient.contact",
                "Patient.contact[0].name HumanName",
                "Patient.contact[0].name.family string",
                "Patient.contained[0] Organization",
                "Patient.contained[0].name string",
                "Patient.deceasedDateTime dateTime",
            ]
        );
        // Constraints reachable from the nodes
        let mut keys = Vec::new();
        walk(&p, &mut |n| {
            for c in r4().constraints_with_ancestors(n.type_name) {
                keys.push(c.key.clone());
            }
        });
        assert!(keys.contains(&"pat-1".to_string()));
        assert!(keys.contains(&"dom-2".to_string()));
    }

    #[test]
    fn string_content() {
        let issues = validate(&json!({"resourceType": "Patient", "name": [{"family": "   "}]}));
        assert_eq!(issues.len(), 1);
        assert!(!issues[0].is_error());
        assert_eq!(
            expr(json!({"resourceType": "Patient", "name": [{"family": "a\u{7}b"}]})),
            vec!["Patient.name[0].family"]
        );
        assert!(
            expr(json!({"resourceType": "Patient", "name": [{"family": "a\tb\r\nc"}]})).is_empty()
        );
    }

    #[test]
    fn required_bindings() {
        let e = errors(json!({"resourceType": "Patient", "gender": "man"}));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "Patient.gender");
        assert_eq!(e[0].2, "code-invalid");
        assert!(expr(
            json!({"resourceType": "Observation", "status": "done", "code": {"text": "x"}})
        )
        .contains(&"Observation.status".to_string()));
        // Coding with the value set's own system and a wrong code
        let e = expr(
            json!({"resourceType": "Patient", "contact": [{"name": {"text": "x"}}],
            "communication": [{"language": {"text": "en"}}]}),
        );
        assert!(e.is_empty());
        let e = expr(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 1, "comparator": "=="}}),
        );
        assert_eq!(e, vec!["Observation.valueQuantity.comparator"]);
    }

    /// A terminology that knows UCUM's `mg` and `kg` in the ucum-units value set, and nothing
    /// else (every other value set is unknown).
    struct FakeCodes(std::cell::RefCell<Vec<String>>);

    impl CodeValidator for FakeCodes {
        fn validate_code(&self, vs: &str, system: Option<&str>, code: &str) -> CodeVerdict {
            self.0
                .borrow_mut()
                .push(format!("{vs} {} {code}", system.unwrap_or("-")));
            if vs != "http://hl7.org/fhir/ValueSet/ucum-units" {
                return CodeVerdict::Unknown;
            }
            match (system, code) {
                (Some("http://unitsofmeasure.org") | None, "mg" | "kg") => CodeVerdict::Valid,
                (Some("http://example.org/unknown"), _) => CodeVerdict::Unknown,
                _ => CodeVerdict::Invalid(format!("unknown unit '{code}'")),
            }
        }
    }

    #[test]
    fn required_bindings_through_a_code_validator() {
        let codes = FakeCodes(Default::default());
        let red = |units: serde_json::Value| {
            json!({"resourceType": "ResearchElementDefinition", "status": "active",
                "type": "population",
                "characteristic": [{"definitionCodeableConcept": {"text": "x"},
                    "unitOfMeasure": units}]})
        };
        let errs = |r: serde_json::Value| -> Vec<(String, String)> {
            validate_with(&r, &codes)
                .into_iter()
                .filter(|i| i.is_error())
                .map(|i| (i.expression.join(","), i.diagnostics))
                .collect()
        };
        let ucum = |c: &str| json!({"system": "http://unitsofmeasure.org", "code": c});
        assert!(errs(red(json!({"coding": [ucum("mg")]}))).is_empty());
        let e = errs(red(json!({"coding": [ucum("mgg")]})));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            e[0].0,
            "ResearchElementDefinition.characteristic[0].unitOfMeasure"
        );
        assert!(
            e[0].1.contains("http://hl7.org/fhir/ValueSet/ucum-units"),
            "{}",
            e[0].1
        );
        assert!(e[0].1.contains("unknown unit 'mgg'"), "{}", e[0].1);
        // at least one coding in the value set is enough
        assert!(errs(red(json!({"coding": [ucum("mgg"), ucum("kg")]}))).is_empty());
        // a coding that cannot be checked (unknown code system): no error
        assert!(errs(red(json!({"coding": [ucum("mgg"),
            {"system": "http://example.org/unknown", "code": "x"}]})))
        .is_empty());
        // text only: nothing to check
        assert!(errs(red(json!({"text": "milligrams"}))).is_empty());
        // unknown value sets stay unchecked, the mime type syntax check still applies
        let att = |ct: &str| {
            json!({"resourceType": "DocumentReference", "status": "current",
                "content": [{"attachment": {"contentType": ct}}]})
        };
        assert!(errs(att("text/plain")).is_empty());
        assert_eq!(
            errs(att("no mime type")),
            vec![(
                "DocumentReference.content[0].attachment.contentType".to_string(),
                "'no mime type' is not a valid code of http://hl7.org/fhir/ValueSet/mimetypes"
                    .to_string()
            )]
        );
        // the model's own value sets are not asked about
        let asked = codes.0.borrow().clone();
        assert!(
            asked.iter().all(|a| !a.contains("administrative-gender")),
            "{asked:?}"
        );
        assert!(errs(json!({"resourceType": "Patient", "gender": "male"})).is_empty());
        assert!(!codes.0.borrow().iter().any(|a| a.contains("gender")));
    }

    #[test]
    fn primitive_extensions() {
        let ok = json!({"resourceType": "Patient",
            "birthDate": "1970-01-01",
            "_birthDate": {"extension": [{"url": "http://x", "valueDateTime": "1970-01-01T10:00:00Z"}]},
            "name": [{"given": ["A", null], "_given": [null, {"id": "g2", "extension": [{"url": "http://x", "valueCode": "b"}]}]}]
        });
        assert_eq!(errors(ok), vec![]);
        assert_eq!(
            expr(json!({"resourceType": "Patient", "_birthDate": "x"})),
            vec!["Patient._birthDate"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "_birthDate": {"foo": 1}})),
            vec!["Patient._birthDate.foo"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "_name": {"id": "x"}})),
            vec!["Patient._name"]
        );
        assert_eq!(
            expr(json!({"resourceType": "Patient", "name": [{"given": ["A", null]}]})),
            vec!["Patient.name[0].given[1]"]
        );
        assert_eq!(
            expr(
                json!({"resourceType": "Patient", "name": [{"given": ["A"], "_given": [null, null]}]})
            ),
            vec!["Patient.name[0]._given"]
        );
        // ext-1: value and extensions together
        assert_eq!(
            expr(
                json!({"resourceType": "Patient", "extension": [{"url": "http://x", "valueString": "a",
                "extension": [{"url": "y", "valueString": "b"}]}]})
            ),
            vec!["Patient.extension[0]"]
        );
    }

    #[test]
    fn contained_and_references() {
        let e = expr(json!({"resourceType": "Patient",
            "contained": [{"resourceType": "Organization", "id": "o", "contained": [{"resourceType": "Patient"}]},
                          {"resourceType": "Organization", "id": "o2", "name": 5}],
            "managingOrganization": {"reference": "#missing"}}));
        assert_eq!(
            e,
            vec![
                "Patient.contained[0]",
                "Patient.contained[1].name",
                "Patient.managingOrganization"
            ]
        );
        let refs = [
            ("Organization/1", true),
            ("Organization/1/_history/2", true),
            ("http://example.org/fhir/Organization/1", true),
            ("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", true),
            ("Organization?identifier=x", true),
            ("Patient/1", false),
            ("Foo/1", false),
            ("Organization/bad id", false),
            ("justtext", false),
            ("http://example.org/fhir/Patient/1", false),
        ];
        for (r, ok) in refs {
            let e =
                expr(json!({"resourceType": "Patient", "managingOrganization": {"reference": r}}));
            assert_eq!(e.is_empty(), ok, "{r}: {e:?}");
        }
        let e = expr(json!({"resourceType": "Patient",
            "contained": [{"resourceType": "Organization", "id": "o", "meta": {"versionId": "1"}},
                          {"resourceType": "Organization", "id": "o2", "meta": {"security": [{"code": "R"}]}}]}));
        assert_eq!(e, vec!["Patient.contained[0]", "Patient.contained[1]"]);
        // Bundle.entry.resource may itself contain resources
        let b = json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource":
            {"resourceType": "Patient", "contained": [{"resourceType": "Organization", "id": "o"}],
             "managingOrganization": {"reference": "#o"}}}]});
        assert_eq!(errors(b), vec![]);
    }

    #[test]
    fn narrative_xhtml() {
        let ns = "xmlns=\"http://www.w3.org/1999/xhtml\"";
        assert!(check_xhtml(&format!(
            "<div {ns}><p>Hi &amp; <b>x</b>&#160;</p><img src=\"a.png\"/></div>"
        ))
        .is_ok());
        assert!(check_xhtml(&format!("<div {ns}><p data-fhir=\"generated\">x</p></div>")).is_ok());
        let bad = [
            format!("<div {ns}><script>alert(1)</script></div>"),
            format!("<div {ns}><p onclick=\"x()\">x</p></div>"),
            format!("<div {ns}><a href=\"javascript:x()\">x</a></div>"),
            format!("<div {ns}><p>x</div>"),
            format!("<div {ns}>   </div>"),
            format!("<div {ns}>&nbsp;</div>"),
            "<div>no namespace</div>".to_string(),
            format!("<p {ns}>x</p>"),
            format!("<div {ns}>x</div><div {ns}>y</div>"),
            "plain text".to_string(),
        ];
        for b in bad {
            assert!(check_xhtml(&b).is_err(), "{b}");
        }
        let e = expr(
            json!({"resourceType": "Patient", "text": {"status": "generated", "div": "<div>x</div>"}}),
        );
        assert_eq!(e, vec!["Patient.text.div"]);
    }

    #[test]
    fn validate_as_type_info() {
        let v = Validator::new(r4());
        let ti = r4().type_info("Patient").unwrap();
        let issues = v.validate_as(&json!({"resourceType": "Patient", "gender": "x"}), ti);
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].expression, vec!["Patient.gender"]);
    }
}
