//! FHIR `CodeSystem` resources (JSON) as `ConceptTable`s, and small JSON helpers.

use serde_json::Value;

use crate::provider::{Concept, ConceptTable, Designation, PropertyDef, PropertyValue};

pub fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

pub fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn property_value(p: &Value) -> Option<PropertyValue> {
    let obj = p.as_object()?;
    for (k, v) in obj {
        let Some(kind) = k.strip_prefix("value") else {
            continue;
        };
        return Some(match kind {
            "Code" => PropertyValue::Code(v.as_str()?.to_string()),
            "String" => PropertyValue::String(v.as_str()?.to_string()),
            "Boolean" => PropertyValue::Boolean(v.as_bool()?),
            "Integer" => PropertyValue::Integer(v.as_i64()?),
            "DateTime" => PropertyValue::DateTime(v.as_str()?.to_string()),
            "Decimal" => PropertyValue::Decimal(v.to_string()),
            "Coding" => PropertyValue::Coding {
                system: s(v, "system").map(str::to_string),
                code: s(v, "code")?.to_string(),
                display: s(v, "display").map(str::to_string),
            },
            _ => PropertyValue::String(v.to_string()),
        });
    }
    None
}

/// Builds a `ConceptTable` from a `CodeSystem` resource: nested concepts become is-a links,
/// as do `parent`/`subsumedBy` properties; status `retired`/`inactive` or `inactive=true`
/// mark concepts inactive; `notSelectable=true` marks them abstract.
pub fn code_system_table(res: &Value) -> ConceptTable {
    let mut t = ConceptTable::new(
        s(res, "url").unwrap_or_default(),
        s(res, "version").map(str::to_string),
    );
    t.name = s(res, "name").map(str::to_string);
    t.title = s(res, "title").map(str::to_string);
    t.content = s(res, "content").unwrap_or("complete").to_string();
    t.language = s(res, "language").map(str::to_string);
    t.case_sensitive = res
        .get("caseSensitive")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    t.property_defs = arr(res, "property")
        .iter()
        .map(|p| PropertyDef {
            code: s(p, "code").unwrap_or_default().to_string(),
            uri: s(p, "uri").map(str::to_string),
            description: s(p, "description").map(str::to_string),
            kind: s(p, "type").unwrap_or("string").to_string(),
        })
        .collect();
    // property codes whose uri gives them a standard meaning
    let by_uri = |suffix: &str| -> Vec<String> {
        std::iter::once(suffix.to_string())
            .chain(
                t.property_defs
                    .iter()
                    .filter(|p| {
                        p.code == suffix
                            || p.uri.as_deref()
                                == Some(&format!("http://hl7.org/fhir/concept-properties#{suffix}"))
                    })
                    .map(|p| p.code.clone()),
            )
            .collect()
    };
    let status_props = by_uri("status");
    let inactive_props = by_uri("inactive");
    let not_sel_props = by_uri("notSelectable");
    let mut parent_props = by_uri("parent");
    parent_props.push("subsumedBy".into());

    let mut pending_links: Vec<(u32, String)> = Vec::new();
    let mut stack: Vec<(Option<u32>, &Value)> = arr(res, "concept")
        .iter()
        .rev()
        .map(|c| (None, c))
        .collect();
    while let Some((parent, c)) = stack.pop() {
        let Some(code) = s(c, "code") else { continue };
        let mut concept = Concept::new(code, s(c, "display").map(str::to_string));
        concept.definition = s(c, "definition").map(str::to_string);
        for d in arr(c, "designation") {
            let Some(value) = s(d, "value") else { continue };
            let u = d.get("use");
            concept.designations.push(Designation {
                language: s(d, "language").map(str::to_string),
                use_system: u.and_then(|u| s(u, "system")).map(str::to_string),
                use_code: u.and_then(|u| s(u, "code")).map(str::to_string),
                use_display: u.and_then(|u| s(u, "display")).map(str::to_string),
                value: value.to_string(),
            });
        }
        for e in arr(c, "extension") {
            if s(e, "url")
                == Some(
                    "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status",
                )
            {
                if let Some(v) = s(e, "valueCode") {
                    concept
                        .properties
                        .push(("status".into(), PropertyValue::Code(v.to_string())));
                }
            }
        }
        let mut parents_by_prop = Vec::new();
        for p in arr(c, "property") {
            let Some(pc) = s(p, "code") else { continue };
            let Some(v) = property_value(p) else { continue };
            if status_props.iter().any(|x| x == pc) {
                if let PropertyValue::Code(st) | PropertyValue::String(st) = &v {
                    if st == "retired" || st == "inactive" {
                        concept.inactive = true;
                    }
                }
            }
            if inactive_props.iter().any(|x| x == pc) && v == PropertyValue::Boolean(true) {
                concept.inactive = true;
            }
            if not_sel_props.iter().any(|x| x == pc) && v == PropertyValue::Boolean(true) {
                concept.not_selectable = true;
            }
            if parent_props.iter().any(|x| x == pc) {
                parents_by_prop.push(v.as_text());
            }
            concept.properties.push((pc.to_string(), v));
        }
        let idx = t.add(concept);
        if let Some(p) = parent {
            t.link(p, idx);
        }
        for p in parents_by_prop {
            pending_links.push((idx, p));
        }
        for child in arr(c, "concept").iter().rev() {
            stack.push((Some(idx), child));
        }
    }
    for (child, parent) in pending_links {
        if let Some(p) = t.index_of(&parent) {
            t.link(p, child);
        }
    }
    t
}

/// Applies a supplement's designations and properties to a table.
pub fn apply_supplement(t: &mut ConceptTable, supplement: &Value) {
    fn walk(t: &mut ConceptTable, concepts: &[Value]) {
        for c in concepts {
            if let Some(code) = s(c, "code") {
                if let Some(i) = t.index_of(code) {
                    let i = i as usize;
                    for d in arr(c, "designation") {
                        if let Some(value) = s(d, "value") {
                            let u = d.get("use");
                            t.concepts[i].designations.push(Designation {
                                language: s(d, "language").map(str::to_string),
                                use_system: u.and_then(|u| s(u, "system")).map(str::to_string),
                                use_code: u.and_then(|u| s(u, "code")).map(str::to_string),
                                use_display: u.and_then(|u| s(u, "display")).map(str::to_string),
                                value: value.to_string(),
                            });
                        }
                    }
                    for p in arr(c, "property") {
                        if let (Some(pc), Some(v)) = (s(p, "code"), property_value(p)) {
                            t.concepts[i].properties.push((pc.to_string(), v));
                        }
                    }
                }
            }
            walk(t, arr(c, "concept"));
        }
    }
    walk(t, arr(supplement, "concept"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::CodeSystemProvider;
    use serde_json::json;

    #[test]
    fn nested_concepts_and_status() {
        let cs = json!({"resourceType":"CodeSystem","url":"http://x","version":"1","caseSensitive":true,
          "property":[{"code":"status","uri":"http://hl7.org/fhir/concept-properties#status","type":"code"},
                      {"code":"notSelectable","type":"boolean"}],
          "concept":[{"code":"a","display":"A","concept":[
              {"code":"b","display":"B","property":[{"code":"status","valueCode":"retired"}]},
              {"code":"c","property":[{"code":"notSelectable","valueBoolean":true}]}]}]});
        let t = code_system_table(&cs);
        assert_eq!(t.len(), 3);
        assert_eq!(t.children("a"), vec!["b", "c"]);
        assert!(t.get("b").unwrap().inactive);
        assert!(t.get("c").unwrap().not_selectable);
        assert_eq!(t.version(), Some("1"));
    }
}
