//! Validation against a profile (a constraining StructureDefinition with a snapshot, e.g. US
//! Core), on top of the base structural validation of [`crate::validation`].
//!
//! Checked: the profiled resource type; cardinalities tightened by the profile (also on nested
//! elements, per parent instance); `fixed[x]` (exact) and `pattern[x]` (contains) values;
//! choice types restricted by the profile; slices whose discriminators are `value`/`pattern`
//! (incl. extensions sliced by `url`): per-slice cardinality and closed slicing.
//! Bindings the profile declares (with [`Profile::validate_with`] and a [`CodeValidator`], the
//! trait the base validation asks about required bindings): `required` — a `code`/`Coding` not
//! in the value set, or a CodeableConcept none of whose codings is, is an error; `extensible` —
//! a code of a code system the value set includes that is not in it is a warning (codes of other
//! systems are what extensible allows). A verdict the validator cannot give (unknown value set
//! or code system) is no issue. Bindings identical to the base element's required binding are
//! left to the base validation.
//! Not checked (reported nowhere, silently skipped): `type`/`profile`/`exists` discriminators,
//! constraints and bindings inside slices, bindings on `string`/`uri` elements, invariants
//! (FHIRPath), target profiles, mustSupport.

use serde_json::Value;

use crate::model::{r4, Binding, ElementInfo, Model};
use crate::outcome::Issue;
use crate::validation::{CodeValidator, CodeVerdict};

/// How a slice recognises its items: the values at `path` (`$this` = the item itself).
#[derive(Debug, Clone)]
struct Discriminator {
    path: String,
    value: Value,
    /// `true`: the item's value must equal `value`; `false`: it must contain it (pattern).
    exact: bool,
}

#[derive(Debug, Clone)]
struct Slice {
    name: String,
    min: u32,
    max: Option<u32>,
    discriminators: Vec<Discriminator>,
}

#[derive(Debug, Clone)]
struct ProfileElement {
    /// `Patient.identifier.system` (FHIRPath names, `value[x]` for choices).
    path: String,
    min: u32,
    max: Option<u32>,
    base_min: u32,
    base_max: Option<u32>,
    fixed: Option<Value>,
    pattern: Option<Value>,
    /// For choice elements restricted by the profile: the allowed type codes.
    allowed_types: Option<Vec<String>>,
    slices: Vec<Slice>,
    slicing_closed: bool,
    /// A `required`/`extensible` binding the base element does not already require.
    binding: Option<Binding>,
}

/// A profile prepared for validation.
#[derive(Debug, Clone)]
pub struct Profile {
    pub url: String,
    /// The constrained resource type (`Patient`).
    pub type_name: String,
    elements: Vec<ProfileElement>,
}

/// A value found in a resource while walking a path.
struct Node<'a> {
    value: &'a Value,
    type_name: String,
    expr: String,
    /// Only the `_name` companion is present (a primitive with extensions but no value).
    extension_only: bool,
}

fn parse_max(v: Option<&Value>) -> Option<Option<u32>> {
    match v.and_then(Value::as_str) {
        Some("*") => Some(None),
        Some(s) => s.parse().ok().map(Some),
        None => None,
    }
}

fn fixed_or_pattern(e: &Value) -> (Option<Value>, Option<Value>) {
    let mut fixed = None;
    let mut pattern = None;
    if let Some(o) = e.as_object() {
        for (k, v) in o {
            if k.starts_with("fixed") && !k.starts_with("fixed_") {
                fixed = Some(v.clone());
            } else if k.starts_with("pattern") {
                pattern = Some(v.clone());
            }
        }
    }
    (fixed, pattern)
}

/// The base-model element at a FHIRPath-style path (`Patient.contact.name`, `Observation.value[x]`).
fn model_element<'m>(model: &'m Model, path: &str) -> Option<&'m ElementInfo> {
    let mut segs = path.split('.');
    let mut type_name = segs.next()?.to_string();
    let mut found: Option<&ElementInfo> = None;
    for seg in segs {
        if let Some(prev) = found {
            type_name = prev.child_type_name()?.to_string();
        }
        found = Some(model.element_by_name(&type_name, seg.trim_end_matches("[x]"))?);
    }
    found
}

/// `value` contains everything `pattern` has (objects by key, arrays item by item).
fn pattern_matches(pattern: &Value, value: &Value) -> bool {
    match (pattern, value) {
        (Value::Object(p), Value::Object(v)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| pattern_matches(pv, vv))),
        (Value::Array(p), Value::Array(v)) => p
            .iter()
            .all(|pi| v.iter().any(|vi| pattern_matches(pi, vi))),
        // a single pattern value against a repeating value
        (p, Value::Array(v)) if !p.is_array() => v.iter().any(|vi| pattern_matches(p, vi)),
        (Value::Number(a), Value::Number(b)) => {
            a == b || a.as_f64().zip(b.as_f64()).is_some_and(|(x, y)| x == y)
        }
        (p, v) => p == v,
    }
}

/// Values at a dotted path inside a JSON value (arrays flattened); `$this` = the value.
fn values_at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut cur = vec![v];
    if path == "$this" {
        return cur;
    }
    for seg in path.split('.') {
        let mut next = Vec::new();
        for c in cur {
            match c.get(seg) {
                Some(Value::Array(a)) => next.extend(a.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        cur = next;
    }
    cur
}

impl Discriminator {
    fn matches(&self, item: &Value) -> bool {
        let found = values_at(item, &self.path);
        if self.exact {
            match &self.value {
                // a discriminator value taken from a pattern's array: any of the item's values
                Value::Array(alts) => found.iter().any(|f| alts.contains(f)),
                v => found.contains(&v),
            }
        } else {
            found.iter().any(|f| pattern_matches(&self.value, f))
        }
    }
}

impl Profile {
    /// Prepares a constraining StructureDefinition (with a snapshot) for validation.
    pub fn from_structure_definition(sd: &Value) -> Result<Profile, String> {
        let model = r4();
        if sd["resourceType"] != "StructureDefinition" {
            return Err("not a StructureDefinition".into());
        }
        let url = sd["url"].as_str().unwrap_or_default().to_string();
        let type_name = sd["type"]
            .as_str()
            .ok_or("StructureDefinition.type is missing")?
            .to_string();
        if !model.is_resource_type(&type_name) {
            return Err(format!("'{type_name}' is not a resource type"));
        }
        let elements = sd["snapshot"]["element"]
            .as_array()
            .ok_or("the StructureDefinition has no snapshot")?;
        let by_id = |id: &str| elements.iter().find(|e| e["id"] == id);
        let mut out = Vec::new();
        for e in elements {
            let (Some(id), Some(path)) = (e["id"].as_str(), e["path"].as_str()) else {
                continue;
            };
            if id.contains(':') || !path.contains('.') {
                continue; // slice internals, or the root
            }
            let base = model_element(model, path);
            let (fixed, pattern) = fixed_or_pattern(e);
            let min = e["min"].as_u64().map_or(0, |m| m as u32);
            let max = parse_max(e.get("max")).unwrap_or(None);
            let allowed_types = match base {
                Some(b) if b.is_choice => {
                    let codes: Vec<String> = e["type"]
                        .as_array()
                        .map(|ts| {
                            ts.iter()
                                .filter_map(|t| t["code"].as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    (!codes.is_empty() && codes.len() < b.types.len()).then_some(codes)
                }
                _ => None,
            };
            let mut slices = Vec::new();
            let mut slicing_closed = false;
            if let Some(slicing) = e.get("slicing") {
                slicing_closed = slicing["rules"] == "closed";
                let discs: Vec<(String, String)> = slicing["discriminator"]
                    .as_array()
                    .map(|ds| {
                        ds.iter()
                            .filter_map(|d| {
                                Some((
                                    d["type"].as_str()?.to_string(),
                                    d["path"].as_str()?.to_string(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let prefix = format!("{id}:");
                let mut all_known = !discs.is_empty();
                for s in elements {
                    let Some(sid) = s["id"].as_str() else {
                        continue;
                    };
                    let Some(name) = sid.strip_prefix(&prefix) else {
                        continue;
                    };
                    if name.contains('.') || name.contains(':') || name.contains('/') {
                        continue;
                    }
                    let mut ds = Vec::new();
                    for (dtype, dpath) in &discs {
                        if dtype != "value" && dtype != "pattern" {
                            break;
                        }
                        let d = Self::discriminator(s, sid, dpath, &by_id);
                        match d {
                            Some(d) => ds.push(d),
                            None => break,
                        }
                    }
                    if ds.len() != discs.len() {
                        all_known = false;
                        continue;
                    }
                    slices.push(Slice {
                        name: name.to_string(),
                        min: s["min"].as_u64().map_or(0, |m| m as u32),
                        max: parse_max(s.get("max")).unwrap_or(None),
                        discriminators: ds,
                    });
                }
                slicing_closed &= all_known;
            }
            let binding = e["binding"]["valueSet"].as_str().and_then(|vs| {
                let strength = e["binding"]["strength"].as_str()?;
                if strength != "required" && strength != "extensible" {
                    return None;
                }
                let value_set = vs.split('|').next().unwrap_or(vs).to_string();
                let same_as_base = base
                    .and_then(|b| b.binding.as_ref())
                    .is_some_and(|b| b.strength == "required" && b.value_set == value_set);
                (!same_as_base).then(|| Binding {
                    strength: strength.to_string(),
                    value_set,
                })
            });
            out.push(ProfileElement {
                path: path.to_string(),
                min,
                max,
                base_min: base.map_or(0, |b| b.min),
                base_max: base.and_then(|b| b.max),
                fixed,
                pattern,
                allowed_types,
                slices,
                slicing_closed,
                binding,
            });
        }
        Ok(Profile {
            url,
            type_name,
            elements: out,
        })
    }

    /// The discriminator value of slice `s` (id `sid`) at `dpath`.
    fn discriminator<'a>(
        s: &'a Value,
        sid: &str,
        dpath: &str,
        by_id: &dyn Fn(&str) -> Option<&'a Value>,
    ) -> Option<Discriminator> {
        let from = |e: &Value| -> Option<Discriminator> {
            let (fixed, pattern) = fixed_or_pattern(e);
            if let Some(v) = fixed {
                return Some(Discriminator {
                    path: dpath.to_string(),
                    value: v,
                    exact: true,
                });
            }
            pattern.map(|v| Discriminator {
                path: dpath.to_string(),
                value: v,
                exact: false,
            })
        };
        if dpath == "$this" {
            return from(s);
        }
        // The slice's child element at the discriminator path (`...extension:race.url`).
        let child_id = format!(
            "{sid}.{}",
            dpath.replace(".ofType(", "[x]:").replace(')', "")
        );
        if let Some(d) = by_id(&child_id).and_then(from) {
            return Some(d);
        }
        // Extensions sliced by url: the slice's type profile is the url.
        if dpath == "url" {
            if let Some(p) = s["type"][0]["profile"][0].as_str() {
                return Some(Discriminator {
                    path: "url".into(),
                    value: Value::String(p.to_string()),
                    exact: true,
                });
            }
        }
        // A pattern on the slice itself, navigated to the discriminator path.
        let (fixed, pattern) = fixed_or_pattern(s);
        let (v, exact) = match (fixed, pattern) {
            (Some(f), _) => (f, true),
            (None, Some(p)) => (p, true),
            (None, None) => return None,
        };
        let found: Vec<Value> = values_at(&v, dpath).into_iter().cloned().collect();
        match found.len() {
            0 => None,
            1 => Some(Discriminator {
                path: dpath.to_string(),
                value: found.into_iter().next()?,
                exact,
            }),
            _ => Some(Discriminator {
                path: dpath.to_string(),
                value: Value::Array(found),
                exact: true,
            }),
        }
    }

    /// Checks the profile's constraints (not the base structure: use
    /// [`crate::validation::validate`] as well, or [`validate_with_profile`]). Bindings are not
    /// checked: see [`Profile::validate_with`].
    pub fn validate(&self, resource: &Value) -> Vec<Issue> {
        self.check(resource, None)
    }

    /// [`Profile::validate`] plus the profile's `required` and `extensible` bindings, asked of
    /// `codes`.
    pub fn validate_with(&self, resource: &Value, codes: &dyn CodeValidator) -> Vec<Issue> {
        self.check(resource, Some(codes))
    }

    fn check(&self, resource: &Value, codes: Option<&dyn CodeValidator>) -> Vec<Issue> {
        let model = r4();
        let mut issues = Vec::new();
        if resource["resourceType"] != self.type_name.as_str() {
            issues.push(
                Issue::error(
                    "invalid",
                    format!(
                        "the profile {} applies to {} resources",
                        self.url, self.type_name
                    ),
                )
                .at(resource["resourceType"].as_str().unwrap_or("").to_string()),
            );
            return issues;
        }
        for pe in &self.elements {
            let Some((parent_path, last)) = pe.path.rsplit_once('.') else {
                continue;
            };
            let parents = nodes_at(model, resource, &self.type_name, parent_path);
            for parent in &parents {
                if parent.extension_only {
                    continue;
                }
                let items = children(model, parent, last);
                let n = items.len() as u32;
                let here = format!("{}.{}", parent.expr, last.trim_end_matches("[x]"));
                if pe.min > pe.base_min && n < pe.min {
                    issues.push(
                        Issue::error(
                            "required",
                            format!(
                                "{} is required by the profile {} (minimum cardinality {}, found {n})",
                                pe.path, self.url, pe.min
                            ),
                        )
                        .at(here.clone()),
                    );
                }
                if let Some(max) = pe.max {
                    if pe.base_max.is_none_or(|b| max < b) && n > max {
                        issues.push(
                            Issue::error(
                                "structure",
                                format!(
                                    "{} allows at most {max} item(s) in the profile {}, found {n}",
                                    pe.path, self.url
                                ),
                            )
                            .at(here.clone()),
                        );
                    }
                }
                for item in &items {
                    if item.extension_only {
                        continue;
                    }
                    if let Some(f) = &pe.fixed {
                        if !(item.value == f
                            || matches!((f, item.value), (Value::Number(_), Value::Number(_)))
                                && pattern_matches(f, item.value))
                        {
                            issues.push(
                                Issue::error(
                                    "value",
                                    format!("the value must be exactly {f} (profile {})", self.url),
                                )
                                .at(item.expr.clone()),
                            );
                        }
                    }
                    if let Some(p) = &pe.pattern {
                        if !pattern_matches(p, item.value) {
                            issues.push(
                                Issue::error(
                                    "value",
                                    format!(
                                        "the value must match the pattern {p} (profile {})",
                                        self.url
                                    ),
                                )
                                .at(item.expr.clone()),
                            );
                        }
                    }
                    if let (Some(b), Some(codes)) = (&pe.binding, codes) {
                        self.binding(b, item, codes, &mut issues);
                    }
                    if let Some(allowed) = &pe.allowed_types {
                        if !allowed.contains(&item.type_name) {
                            issues.push(
                                Issue::error(
                                    "structure",
                                    format!(
                                        "type {} is not allowed here by the profile {} (allowed: {})",
                                        item.type_name,
                                        self.url,
                                        allowed.join(", ")
                                    ),
                                )
                                .at(item.expr.clone()),
                            );
                        }
                    }
                }
                if !pe.slices.is_empty() {
                    let mut counts = vec![0u32; pe.slices.len()];
                    for item in &items {
                        let mut matched = false;
                        for (i, s) in pe.slices.iter().enumerate() {
                            if s.discriminators.iter().all(|d| d.matches(item.value)) {
                                counts[i] += 1;
                                matched = true;
                                break;
                            }
                        }
                        if !matched && pe.slicing_closed {
                            issues.push(
                                Issue::error(
                                    "structure",
                                    format!(
                                        "the item matches no slice of {} (closed slicing, profile {})",
                                        pe.path, self.url
                                    ),
                                )
                                .at(item.expr.clone()),
                            );
                        }
                    }
                    for (s, &c) in pe.slices.iter().zip(&counts) {
                        if c < s.min {
                            issues.push(
                                Issue::error(
                                    "required",
                                    format!(
                                        "slice '{}' of {} requires at least {} item(s), found {c} (profile {})",
                                        s.name, pe.path, s.min, self.url
                                    ),
                                )
                                .at(here.clone()),
                            );
                        }
                        if s.max.is_some_and(|m| c > m) {
                            issues.push(
                                Issue::error(
                                    "structure",
                                    format!(
                                        "slice '{}' of {} allows at most {} item(s), found {c} (profile {})",
                                        s.name,
                                        pe.path,
                                        s.max.unwrap_or(0),
                                        self.url
                                    ),
                                )
                                .at(here.clone()),
                            );
                        }
                    }
                }
            }
        }
        issues
    }
}

impl Profile {
    /// The profile's binding `b` on one value (`code`, `Coding` or `CodeableConcept`).
    fn binding(
        &self,
        b: &Binding,
        item: &Node<'_>,
        codes: &dyn CodeValidator,
        out: &mut Vec<Issue>,
    ) {
        let required = b.strength == "required";
        // (system, code) pairs; `None` system: a `code` element, its system implied by the value set
        let pairs: Vec<(Option<&str>, &str)> = match item.type_name.as_str() {
            "code" => item.value.as_str().map(|c| (None, c)).into_iter().collect(),
            "Coding" => coding(item.value).into_iter().collect(),
            "CodeableConcept" => item.value["coding"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(coding)
                .collect(),
            _ => return,
        };
        if pairs.is_empty() {
            return;
        }
        let mut invalid = Vec::new();
        for (system, code) in &pairs {
            match codes.validate_code(&b.value_set, *system, code) {
                // one coding in the value set (or one that cannot be checked) satisfies it
                CodeVerdict::Valid | CodeVerdict::Unknown => return,
                CodeVerdict::Invalid(why) => invalid.push((*system, *code, why)),
            }
        }
        let name = |s: Option<&str>, c: &str| match s {
            Some(s) => format!("'{s}#{c}'"),
            None => format!("'{c}'"),
        };
        if required {
            let what: Vec<String> = invalid
                .iter()
                .map(|(s, c, why)| format!("{}: {why}", name(*s, c)))
                .collect();
            out.push(
                Issue::error(
                    "code-invalid",
                    format!(
                        "not in the value set {} required by the profile {} ({})",
                        b.value_set,
                        self.url,
                        what.join("; ")
                    ),
                )
                .at(item.expr.clone()),
            );
            return;
        }
        // extensible: only codes of systems the value set draws from should have been in it
        for (system, code, why) in invalid {
            let included = match system {
                None => Some(true),
                Some(s) => codes.includes_system(&b.value_set, s),
            };
            if included == Some(true) {
                out.push(
                    Issue::warning(
                        "code-invalid",
                        format!(
                            "{} is from a code system of the value set {} (extensible binding of the profile {}) but not in it: {why}",
                            name(system, code),
                            b.value_set,
                            self.url
                        ),
                    )
                    .at(item.expr.clone()),
                );
            }
        }
    }
}

/// `(system, code)` of a Coding with a code.
fn coding(v: &Value) -> Option<(Option<&str>, &str)> {
    let code = v["code"].as_str()?;
    Some((Some(v["system"].as_str()?), code))
}

/// Base validation plus the profile's constraints.
pub fn validate_with_profile(resource: &Value, profile: &Profile) -> Vec<Issue> {
    let mut issues = crate::validation::validate(resource);
    issues.extend(profile.validate(resource));
    issues
}

/// Base validation and the profile's constraints, both asking `codes` about bindings the model
/// cannot enumerate (the profile's `required` and `extensible` bindings among them).
pub fn validate_with_profile_and_codes(
    resource: &Value,
    profile: &Profile,
    codes: &dyn CodeValidator,
) -> Vec<Issue> {
    let mut issues = crate::validation::validate_with(resource, codes);
    issues.extend(profile.validate_with(resource, codes));
    issues
}

/// The nodes at a path (`Patient.contact.name`) below the root.
fn nodes_at<'a>(model: &Model, root: &'a Value, root_type: &str, path: &str) -> Vec<Node<'a>> {
    let mut segs = path.split('.');
    segs.next();
    let mut cur = vec![Node {
        value: root,
        type_name: root_type.to_string(),
        expr: root_type.to_string(),
        extension_only: false,
    }];
    for seg in segs {
        let mut next = Vec::new();
        for n in &cur {
            if !n.extension_only {
                next.extend(children(model, n, seg));
            }
        }
        cur = next;
        if cur.is_empty() {
            break;
        }
    }
    cur
}

/// The values of child element `seg` (FHIRPath name, `value[x]` for choices) of a node.
fn children<'a>(model: &Model, node: &Node<'a>, seg: &str) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    let Some(obj) = node.value.as_object() else {
        return out;
    };
    let base = seg.trim_end_matches("[x]");
    let Some(ti) = model.type_info(&node.type_name) else {
        return out;
    };
    for (key, v) in obj {
        if key.starts_with('_') || !key.starts_with(base) {
            continue;
        }
        let Some(m) = ti.resolve_json_name(key) else {
            continue;
        };
        if m.info.name != base {
            continue;
        }
        let type_name = m.type_name().to_string();
        let under = obj.get(&format!("_{key}"));
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let ext_only = item.is_null();
                    if ext_only && under.and_then(|u| u.get(i)).is_none_or(Value::is_null) {
                        continue;
                    }
                    out.push(Node {
                        value: item,
                        type_name: type_name.clone(),
                        expr: format!("{}.{key}[{i}]", node.expr),
                        extension_only: ext_only,
                    });
                }
            }
            Value::Null => {}
            v => out.push(Node {
                value: v,
                type_name,
                expr: format!("{}.{key}", node.expr),
                extension_only: false,
            }),
        }
    }
    // primitives present only as `_name`
    if out.is_empty() {
        if let Some(m) = ti.resolve_json_name(base) {
            if !m.info.is_choice {
                if let Some(u) = obj.get(&format!("_{base}")) {
                    out.push(Node {
                        value: u,
                        type_name: m.type_name().to_string(),
                        expr: format!("{}.{base}", node.expr),
                        extension_only: true,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile() -> Profile {
        Profile::from_structure_definition(&json!({
            "resourceType": "StructureDefinition", "url": "http://example.org/p", "type": "Patient",
            "snapshot": {"element": [
                {"id": "Patient", "path": "Patient", "min": 0, "max": "*"},
                {"id": "Patient.extension", "path": "Patient.extension", "min": 0, "max": "*",
                 "slicing": {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}},
                {"id": "Patient.extension:race", "path": "Patient.extension", "sliceName": "race", "min": 1, "max": "1",
                 "type": [{"code": "Extension", "profile": ["http://example.org/race"]}]},
                {"id": "Patient.identifier", "path": "Patient.identifier", "min": 1, "max": "*"},
                {"id": "Patient.identifier.system", "path": "Patient.identifier.system", "min": 1, "max": "1"},
                {"id": "Patient.gender", "path": "Patient.gender", "min": 1, "max": "1"},
                {"id": "Patient.maritalStatus", "path": "Patient.maritalStatus", "min": 0, "max": "1",
                 "patternCodeableConcept": {"coding": [{"system": "http://s"}]}},
                {"id": "Patient.deceased[x]", "path": "Patient.deceased[x]", "min": 0, "max": "1",
                 "type": [{"code": "boolean"}]},
                {"id": "Patient.photo", "path": "Patient.photo", "min": 0, "max": "0"}
            ]}
        }))
        .unwrap()
    }

    fn exprs(issues: Vec<Issue>) -> Vec<String> {
        issues.into_iter().map(|i| i.expression.join(",")).collect()
    }

    #[test]
    fn conforming_patient() {
        let p = json!({"resourceType": "Patient",
            "extension": [{"url": "http://example.org/race", "valueString": "x"}, {"url": "http://other", "valueString": "y"}],
            "identifier": [{"system": "http://id", "value": "1"}], "gender": "male",
            "maritalStatus": {"coding": [{"system": "http://s", "code": "M"}], "text": "m"},
            "deceasedBoolean": false});
        assert_eq!(exprs(profile().validate(&p)), Vec::<String>::new());
    }

    #[test]
    fn violations() {
        let p = json!({"resourceType": "Patient",
            "identifier": [{"value": "1"}],
            "maritalStatus": {"coding": [{"system": "http://other", "code": "M"}]},
            "deceasedDateTime": "2020",
            "photo": [{"title": "x"}]});
        let e = exprs(profile().validate(&p));
        assert_eq!(
            e,
            vec![
                "Patient.extension",            // slice race 1..1
                "Patient.identifier[0].system", // 1..1
                "Patient.gender",               // 1..1
                "Patient.maritalStatus",        // pattern
                "Patient.deceasedDateTime",     // type restricted to boolean
                "Patient.photo",                // max 0
            ]
        );
        let wrong = exprs(profile().validate(&json!({"resourceType": "Observation"})));
        assert_eq!(wrong.len(), 1);
    }

    /// Value set `http://vs/status`: codes `final`, `amended` (system `http://s`);
    /// `http://vs/codes`: `http://loinc.org#1`, `#2`, draws from LOINC only.
    struct Codes;

    impl CodeValidator for Codes {
        fn validate_code(&self, vs: &str, system: Option<&str>, code: &str) -> CodeVerdict {
            let ok = match vs {
                "http://vs/status" => system.is_none() && ["final", "amended"].contains(&code),
                "http://vs/codes" => {
                    system == Some("http://loinc.org") && ["1", "2"].contains(&code)
                }
                _ => return CodeVerdict::Unknown,
            };
            if ok {
                CodeVerdict::Valid
            } else {
                CodeVerdict::Invalid(format!("{code} is not in {vs}"))
            }
        }

        fn includes_system(&self, vs: &str, system: &str) -> Option<bool> {
            (vs == "http://vs/codes").then_some(system == "http://loinc.org")
        }
    }

    fn bound(strength: &str) -> Profile {
        Profile::from_structure_definition(&json!({
            "resourceType": "StructureDefinition", "url": "http://example.org/obs", "type": "Observation",
            "snapshot": {"element": [
                {"id": "Observation", "path": "Observation", "min": 0, "max": "*"},
                {"id": "Observation.status", "path": "Observation.status", "min": 1, "max": "1",
                 "binding": {"strength": "required", "valueSet": "http://vs/status|1.0"}},
                {"id": "Observation.code", "path": "Observation.code", "min": 1, "max": "1",
                 "binding": {"strength": strength, "valueSet": "http://vs/codes"}},
                {"id": "Observation.category", "path": "Observation.category", "min": 0, "max": "*",
                 "binding": {"strength": "required", "valueSet": "http://vs/unknown"}},
                {"id": "Observation.interpretation", "path": "Observation.interpretation", "min": 0, "max": "*",
                 "binding": {"strength": "preferred", "valueSet": "http://vs/codes"}}
            ]}
        }))
        .unwrap()
    }

    fn obs(status: &str, codings: Value) -> Value {
        json!({"resourceType": "Observation", "status": status, "code": {"coding": codings},
               "category": [{"coding": [{"system": "http://x", "code": "y"}]}],
               "interpretation": [{"coding": [{"system": "http://loinc.org", "code": "9"}]}]})
    }

    fn found(issues: Vec<Issue>) -> Vec<(bool, String)> {
        issues
            .into_iter()
            .map(|i| (i.is_error(), i.expression.join(",")))
            .collect()
    }

    #[test]
    fn required_bindings() {
        let p = bound("required");
        let good = obs(
            "final",
            json!([{"system": "http://loinc.org", "code": "2"}]),
        );
        assert_eq!(found(p.validate_with(&good, &Codes)), vec![]);
        // one coding in the value set is enough
        let mixed = obs(
            "amended",
            json!([{"system": "http://other", "code": "z"}, {"system": "http://loinc.org", "code": "1"}]),
        );
        assert_eq!(found(p.validate_with(&mixed, &Codes)), vec![]);
        let bad = obs(
            "preliminary",
            json!([{"system": "http://other", "code": "z"}]),
        );
        assert_eq!(
            found(p.validate_with(&bad, &Codes)),
            vec![
                (true, "Observation.status".to_string()),
                (true, "Observation.code".to_string())
            ]
        );
        // without a CodeValidator, bindings are not checked
        assert_eq!(found(p.validate(&bad)), vec![]);
    }

    #[test]
    fn extensible_bindings() {
        let p = bound("extensible");
        // another code system: what extensible allows
        let other = obs(
            "final",
            json!([{"system": "http://snomed.info/sct", "code": "1"}]),
        );
        assert_eq!(found(p.validate_with(&other, &Codes)), vec![]);
        // a LOINC code the value set does not have: a warning
        let loinc = obs(
            "final",
            json!([{"system": "http://loinc.org", "code": "3"}]),
        );
        let issues = p.validate_with(&loinc, &Codes);
        assert_eq!(
            found(issues.clone()),
            vec![(false, "Observation.code".to_string())]
        );
        assert!(
            issues[0].diagnostics.contains("http://loinc.org#3"),
            "{:?}",
            issues[0]
        );
    }

    #[test]
    fn base_required_bindings_are_not_checked_twice() {
        // Observation.status is bound `required` to observation-status in R4 already
        let p = Profile::from_structure_definition(&json!({
            "resourceType": "StructureDefinition", "url": "http://example.org/o2", "type": "Observation",
            "snapshot": {"element": [
                {"id": "Observation", "path": "Observation"},
                {"id": "Observation.status", "path": "Observation.status", "min": 1, "max": "1",
                 "binding": {"strength": "required", "valueSet": "http://hl7.org/fhir/ValueSet/observation-status|4.0.1"}}
            ]}
        }))
        .unwrap();
        assert!(p.elements.iter().all(|e| e.binding.is_none()));
    }

    #[test]
    fn pattern_semantics() {
        assert!(pattern_matches(
            &json!({"coding": [{"system": "a", "code": "b"}]}),
            &json!({"coding": [{"system": "x"}, {"system": "a", "code": "b", "display": "d"}], "text": "t"})
        ));
        assert!(!pattern_matches(
            &json!({"coding": [{"system": "a", "code": "b"}]}),
            &json!({"coding": [{"system": "a", "code": "c"}]})
        ));
    }
}
