//! FHIRPath Patch (FHIR R4 `PATCH` with a `Parameters` body): operations `add`, `insert`,
//! `delete`, `replace` and `move`, addressed by FHIRPath expressions.
//!
//! The path is evaluated with this engine; the resulting nodes (borrowed from the document) are
//! located by identity and then edited in a copy of the resource.

use crate::error::Error;
use crate::parser::Ast;
use crate::value::Item;
use crate::{evaluate, Context, Expression};
use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn err(msg: impl Into<String>) -> Error {
    Error::execution(msg)
}

/// Applies a FHIRPath Patch `Parameters` resource to `resource`, returning the patched copy.
pub fn apply(resource: &Value, parameters: &Value) -> Result<Value, Error> {
    if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(err("a FHIRPath Patch must be a Parameters resource"));
    }
    let mut doc = resource.clone();
    let empty = Vec::new();
    let params = parameters
        .get("parameter")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for p in params {
        if p.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(err("FHIRPath Patch parameters must be named 'operation'"));
        }
        apply_operation(&mut doc, p)?;
    }
    Ok(doc)
}

struct Operation<'p> {
    kind: String,
    path: String,
    name: Option<String>,
    value: Option<&'p Value>,
    index: Option<i64>,
    source: Option<i64>,
    destination: Option<i64>,
}

fn part_int(part: &Value) -> Option<i64> {
    part.get("valueInteger").and_then(Value::as_i64)
}

fn part_str(part: &Value) -> Option<String> {
    part.as_object()?.iter().find_map(|(k, v)| {
        (k.starts_with("value") && v.is_string()).then(|| v.as_str().unwrap_or("").to_string())
    })
}

fn parse_operation(p: &Value) -> Result<Operation<'_>, Error> {
    let mut op = Operation {
        kind: String::new(),
        path: String::new(),
        name: None,
        value: None,
        index: None,
        source: None,
        destination: None,
    };
    let parts: &[Value] = p
        .get("part")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    for part in parts {
        match part.get("name").and_then(Value::as_str).unwrap_or("") {
            "type" => op.kind = part_str(part).unwrap_or_default(),
            "path" => op.path = part_str(part).unwrap_or_default(),
            "name" => op.name = part_str(part),
            "value" => op.value = Some(part),
            "index" => op.index = part_int(part),
            "source" => op.source = part_int(part),
            "destination" => op.destination = part_int(part),
            other => return Err(err(format!("unknown operation part '{other}'"))),
        }
    }
    if op.kind.is_empty() || op.path.is_empty() {
        return Err(err("an operation needs a type and a path"));
    }
    Ok(op)
}

/// Finds the JSON location of `target` (by identity) inside `doc`.
fn locate(doc: &Value, target: *const Value) -> Option<Vec<Seg>> {
    fn walk(v: &Value, target: *const Value, path: &mut Vec<Seg>) -> bool {
        if std::ptr::eq(v, target) {
            return true;
        }
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    path.push(Seg::Key(k.clone()));
                    if walk(c, target, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    if walk(c, target, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    walk(doc, target, &mut path).then_some(path)
}

fn get_mut<'v>(doc: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = doc;
    for s in path {
        cur = match s {
            Seg::Key(k) => cur.get_mut(k.as_str())?,
            Seg::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// A selected node: its location in the document and its FHIR type.
type Located = (Vec<Seg>, Option<&'static str>);

/// Located nodes of the path expression, with their FHIR types.
fn select(doc: &Value, src: &str) -> Result<Vec<Located>, Error> {
    let expr = Expression::parse(src)?;
    let ctx = Context::new(doc).with_reference_stubs(false);
    let items = evaluate(&expr, doc, &ctx)?;
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        let Item::Node(n) = item else {
            return Err(err(format!(
                "'{src}' does not select elements of the resource"
            )));
        };
        let Some(v) = n.value.as_deref() else {
            return Err(err(format!("'{src}' selects a primitive without a value")));
        };
        let loc = locate(doc, v as *const Value)
            .ok_or_else(|| err(format!("'{src}' selects content outside the resource")))?;
        out.push((loc, n.type_name));
    }
    Ok(out)
}

fn element_info(
    parent_type: Option<&str>,
    name: &str,
) -> Option<&'static kiln_fhir::model::ElementInfo> {
    kiln_fhir::model::r4()
        .type_info(parent_type?)?
        .element_by_name(name)
}

/// Converts the `value` part to JSON: a `value[x]` or, for anonymous (backbone) types, nested
/// parts. Returns the JSON and the type suffix of `value[x]` (for choice element names).
fn part_value(part: &Value, owner_type: Option<&str>) -> Result<(Value, Option<String>), Error> {
    let obj = part.as_object().ok_or_else(|| err("invalid value part"))?;
    for (k, v) in obj {
        if let Some(suffix) = k.strip_prefix("value") {
            if suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
                return Ok((v.clone(), Some(suffix.to_string())));
            }
        }
    }
    if let Some(parts) = obj.get("part").and_then(Value::as_array) {
        let mut out = Map::new();
        for p in parts {
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| err("a value part needs a name"))?;
            let info = element_info(owner_type, name);
            let child_type = info.and_then(|i| i.child_type_name());
            let (v, suffix) = part_value(p, child_type)?;
            let key = json_key(info, name, suffix.as_deref());
            if info.is_some_and(|i| i.is_array()) {
                match out.get_mut(&key) {
                    Some(Value::Array(a)) => a.push(v),
                    _ => {
                        out.insert(key, Value::Array(vec![v]));
                    }
                }
            } else {
                out.insert(key, v);
            }
        }
        return Ok((Value::Object(out), None));
    }
    Err(err("the value part has neither value[x] nor parts"))
}

fn json_key(
    info: Option<&kiln_fhir::model::ElementInfo>,
    name: &str,
    suffix: Option<&str>,
) -> String {
    match (info, suffix) {
        (Some(i), Some(s)) if i.is_choice => format!("{name}{s}"),
        _ => name.to_string(),
    }
}

fn index_of(v: Option<i64>, what: &str) -> Result<usize, Error> {
    v.and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| err(format!("missing or negative {what}")))
}

/// The array holding a list and its location, from the located list items or (empty list) from
/// the parent of the path expression.
fn list_location(doc: &Value, path: &str) -> Result<(Vec<Seg>, usize), Error> {
    let items = select(doc, path)?;
    if let Some((first, _)) = items.first() {
        match first.split_last() {
            Some((Seg::Index(_), parent)) => {
                let len = get_ref(doc, parent)
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                return Ok((parent.to_vec(), len));
            }
            _ => return Err(err(format!("'{path}' is not a list"))),
        }
    }
    // Empty list: the path's parent must exist.
    let ast = crate::parser::parse(path)?;
    let (parent_src, name) = match &ast {
        Ast::Member(_, name) => match path.rfind('.') {
            Some(i) => (&path[..i], name.clone()),
            None => return Err(err(format!("no content found at {path}"))),
        },
        _ => return Err(err(format!("no content found at {path}"))),
    };
    let parents = select(doc, parent_src)?;
    match parents.as_slice() {
        [(loc, _)] => {
            let mut l = loc.clone();
            l.push(Seg::Key(name));
            Ok((l, 0))
        }
        _ => Err(err(format!("no content found at {path}"))),
    }
}

fn get_ref<'v>(doc: &'v Value, path: &[Seg]) -> Option<&'v Value> {
    let mut cur = doc;
    for s in path {
        cur = match s {
            Seg::Key(k) => cur.get(k.as_str())?,
            Seg::Index(i) => cur.get(*i)?,
        };
    }
    Some(cur)
}

/// Removes the value at `loc`; empty arrays and `_name` companions are removed too.
fn remove_at(doc: &mut Value, loc: &[Seg]) -> Result<(), Error> {
    match loc.split_last() {
        Some((Seg::Index(i), arr_loc)) => {
            let (Some(Seg::Key(key)), obj_loc) = (
                arr_loc.last().cloned(),
                &arr_loc[..arr_loc.len().saturating_sub(1)],
            ) else {
                return Err(err("cannot delete here"));
            };
            let obj = get_mut(doc, obj_loc)
                .and_then(Value::as_object_mut)
                .ok_or_else(|| err("cannot delete here"))?;
            let mut now_empty = false;
            if let Some(Value::Array(a)) = obj.get_mut(&key) {
                if *i < a.len() {
                    a.remove(*i);
                }
                now_empty = a.is_empty();
            }
            let ext_key = format!("_{key}");
            if let Some(Value::Array(a)) = obj.get_mut(&ext_key) {
                if *i < a.len() {
                    a.remove(*i);
                }
                if a.iter().all(Value::is_null) {
                    obj.shift_remove(&ext_key);
                }
            }
            if now_empty {
                obj.shift_remove(&key);
            }
            Ok(())
        }
        Some((Seg::Key(key), obj_loc)) => {
            let obj = get_mut(doc, obj_loc)
                .and_then(Value::as_object_mut)
                .ok_or_else(|| err("cannot delete here"))?;
            obj.shift_remove(key);
            obj.shift_remove(&format!("_{key}"));
            Ok(())
        }
        None => Err(err("cannot delete the resource itself")),
    }
}

/// After a delete, removes objects left empty (`contact.name` with no children) up to the
/// resource root.
fn prune_empty(doc: &mut Value, loc: &[Seg]) {
    let mut end = loc.len();
    while end > 0 {
        let parent = &loc[..end - 1];
        let empty = match get_ref(doc, &loc[..end - 1]) {
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        if !empty || parent.is_empty() {
            return;
        }
        if remove_at(doc, parent).is_err() {
            return;
        }
        end -= 1;
    }
}

fn apply_operation(doc: &mut Value, p: &Value) -> Result<(), Error> {
    let op = parse_operation(p)?;
    match op.kind.as_str() {
        "add" => {
            let name = op.name.as_deref().ok_or_else(|| err("add needs a name"))?;
            let value_part = op.value.ok_or_else(|| err("add needs a value"))?;
            let targets = select(doc, &op.path)?;
            let (loc, parent_type) = match targets.as_slice() {
                [one] => one.clone(),
                [] => return Err(err(format!("No content found at {} when adding", op.path))),
                _ => return Err(err(format!("{} selects multiple elements", op.path))),
            };
            let info = element_info(parent_type, name);
            let (value, suffix) = part_value(value_part, info.and_then(|i| i.child_type_name()))?;
            let key = json_key(info, name, suffix.as_deref());
            let obj = get_mut(doc, &loc)
                .and_then(Value::as_object_mut)
                .ok_or_else(|| err(format!("{} is not an element with children", op.path)))?;
            let is_list = info.map_or(matches!(obj.get(&key), Some(Value::Array(_))), |i| {
                i.is_array()
            });
            if is_list {
                match obj.get_mut(&key) {
                    Some(Value::Array(a)) => a.push(value),
                    _ => {
                        obj.insert(key, Value::Array(vec![value]));
                    }
                }
            } else {
                obj.insert(key, value);
            }
            Ok(())
        }
        "insert" => {
            let value_part = op.value.ok_or_else(|| err("insert needs a value"))?;
            let index = index_of(op.index, "index")?;
            let (arr_loc, len) = list_location(doc, &op.path)?;
            if index > len {
                return Err(err(format!(
                    "insert index {index} is beyond the list ({len})"
                )));
            }
            let owner = arr_loc.split_last().and_then(|(last, parent)| match last {
                Seg::Key(k) => Some((parent, k.clone())),
                _ => None,
            });
            let item_type = owner.as_ref().and_then(|(parent, key)| {
                let parent_type = node_type_at(doc, parent)?;
                element_info(Some(parent_type), key).and_then(|i| i.child_type_name())
            });
            let (value, _) = part_value(value_part, item_type)?;
            match get_mut(doc, &arr_loc) {
                Some(Value::Array(a)) => a.insert(index, value),
                _ => {
                    let (parent, key) = owner.ok_or_else(|| err("cannot insert here"))?;
                    let obj = get_mut(doc, parent)
                        .and_then(Value::as_object_mut)
                        .ok_or_else(|| err("cannot insert here"))?;
                    obj.insert(key, Value::Array(vec![value]));
                }
            }
            Ok(())
        }
        "delete" => {
            let targets = select(doc, &op.path)?;
            match targets.as_slice() {
                [] => Ok(()),
                [(loc, _)] => {
                    remove_at(doc, loc)?;
                    prune_empty(doc, loc);
                    Ok(())
                }
                _ => Err(err(format!("{} selects multiple elements", op.path))),
            }
        }
        "replace" => {
            let value_part = op.value.ok_or_else(|| err("replace needs a value"))?;
            let targets = select(doc, &op.path)?;
            let (loc, t) = match targets.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(err(format!(
                        "No content found at {} when replacing",
                        op.path
                    )))
                }
                _ => return Err(err(format!("{} selects multiple elements", op.path))),
            };
            let (value, _) = part_value(value_part, t)?;
            let slot = get_mut(doc, &loc).ok_or_else(|| err("cannot replace here"))?;
            *slot = value;
            Ok(())
        }
        "move" => {
            let source = index_of(op.source, "source")?;
            let destination = index_of(op.destination, "destination")?;
            let (arr_loc, len) = list_location(doc, &op.path)?;
            if source >= len || destination >= len {
                return Err(err(format!(
                    "move {source} → {destination} outside the list ({len})"
                )));
            }
            if let Some(Value::Array(a)) = get_mut(doc, &arr_loc) {
                let v = a.remove(source);
                a.insert(destination, v);
            }
            Ok(())
        }
        other => Err(err(format!("unknown operation type '{other}'"))),
    }
}

/// FHIR type of the node at `loc` (resource type at the root, model types below).
fn node_type_at(doc: &Value, loc: &[Seg]) -> Option<&'static str> {
    let model = kiln_fhir::model::r4();
    let rt = doc.get("resourceType")?.as_str()?;
    let mut t: &'static str = model.type_info(rt)?.name.as_str();
    let mut cur = doc;
    for s in loc {
        match s {
            Seg::Key(k) => {
                cur = cur.get(k.as_str())?;
                t = match cur.get("resourceType").and_then(Value::as_str) {
                    Some(r) => model.type_info(r)?.name.as_str(),
                    None => model.resolve_json_name(t, k)?.type_name(),
                };
            }
            Seg::Index(i) => cur = cur.get(*i)?,
        }
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(parts: Value) -> Value {
        json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]})
    }

    #[test]
    fn add_replace_delete_insert_move() {
        let p = json!({"resourceType": "Patient", "name": [{"family": "A"}]});
        let out = apply(&p, &op(json!([
            {"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "birthDate"}, {"name": "value", "valueDate": "1930-01-01"}])))
        .unwrap();
        assert_eq!(out["birthDate"], json!("1930-01-01"));
        let out = apply(&out, &op(json!([
            {"name": "type", "valueCode": "insert"}, {"name": "path", "valueString": "Patient.name"},
            {"name": "index", "valueInteger": 0}, {"name": "value", "valueHumanName": {"family": "B"}}])))
        .unwrap();
        assert_eq!(out["name"][0]["family"], json!("B"));
        let out = apply(
            &out,
            &op(json!([
            {"name": "type", "valueCode": "move"}, {"name": "path", "valueString": "Patient.name"},
            {"name": "source", "valueInteger": 0}, {"name": "destination", "valueInteger": 1}])),
        )
        .unwrap();
        assert_eq!(out["name"][1]["family"], json!("B"));
        let out = apply(&out, &op(json!([
            {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name[0].family"},
            {"name": "value", "valueString": "C"}])))
        .unwrap();
        assert_eq!(out["name"][0]["family"], json!("C"));
        let out = apply(
            &out,
            &op(json!([
            {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.name"}])),
        );
        assert!(out.is_err(), "deleting two names at once is an error");
        let out = apply(&p, &op(json!([
            {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.name[0]"}])))
        .unwrap();
        assert!(out.get("name").is_none());
    }
}
