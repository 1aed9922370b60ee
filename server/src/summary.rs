//! `_summary` and `_elements`: subsets of a resource (search.html#summary, #elements). A subsetted
//! resource carries the `SUBSETTED` tag.

use serde_json::{json, Map, Value};

const MANDATORY: &[&str] = &["resourceType", "id", "meta"];

fn mark_subsetted(obj: &mut Map<String, Value>) {
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = meta.as_object_mut() {
        let tags = m.entry("tag").or_insert_with(|| json!([]));
        if let Some(a) = tags.as_array_mut() {
            if !a
                .iter()
                .any(|t| t.get("code").and_then(Value::as_str) == Some("SUBSETTED"))
            {
                a.push(json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "SUBSETTED",
                    "display": "subsetted"
                }));
            }
        }
    }
}

/// The JSON name's element (`valueQuantity` → `value[x]`) is a summary element of `ty`?
fn is_summary(ty: &str, name: &str) -> bool {
    let model = kiln_fhir::model::r4();
    match model.resolve_json_name(ty, name.trim_start_matches('_')) {
        Some(m) => m.info.is_summary || m.info.min > 0,
        None => false,
    }
}

/// `_summary=true`: only elements marked as summary (recursively for complex types' top level);
/// `text`: text, id, meta and mandatory elements; `data`: everything but `text`.
pub fn apply_summary(resource: &mut Value, mode: &str) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let ty = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match mode {
        "true" => {
            obj.retain(|k, _| MANDATORY.contains(&k.as_str()) || is_summary(&ty, k));
            mark_subsetted(obj);
        }
        "text" => {
            obj.retain(|k, _| {
                MANDATORY.contains(&k.as_str())
                    || k == "text"
                    || kiln_fhir::model::r4()
                        .resolve_json_name(&ty, k)
                        .is_some_and(|m| m.info.min > 0)
            });
            mark_subsetted(obj);
        }
        "data" => {
            obj.remove("text");
            mark_subsetted(obj);
        }
        _ => {}
    }
}

/// `_elements=a,b`: only the listed top-level elements (plus mandatory ones).
pub fn apply_elements(resource: &mut Value, elements: &[String]) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let ty = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let wanted: Vec<String> = elements
        .iter()
        .map(|e| e.strip_prefix(&format!("{ty}.")).unwrap_or(e).to_string())
        .collect();
    obj.retain(|k, _| {
        let base = k.trim_start_matches('_');
        MANDATORY.contains(&base)
            || wanted.iter().any(|w| {
                w == base
                    || (base.starts_with(w.as_str())
                        && kiln_fhir::model::r4()
                            .resolve_json_name(&ty, base)
                            .is_some_and(|m| m.info.name == *w))
            })
    });
    mark_subsetted(obj);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_keeps_summary_elements() {
        let mut p = json!({"resourceType":"Patient","id":"1","text":{"status":"generated","div":"<div/>"},"name":[{"family":"X"}],"photo":[{"url":"x"}]});
        apply_summary(&mut p, "true");
        assert!(p.get("name").is_some());
        assert!(p.get("photo").is_none());
        assert!(p.get("text").is_none());
        assert_eq!(p["meta"]["tag"][0]["code"], "SUBSETTED");
    }

    #[test]
    fn elements_keep_listed_and_choice() {
        let mut o = json!({"resourceType":"Observation","id":"1","status":"final","valueQuantity":{"value":1},"code":{"text":"x"}});
        apply_elements(
            &mut o,
            &["value".to_string(), "Observation.status".to_string()],
        );
        assert!(o.get("valueQuantity").is_some());
        assert!(o.get("status").is_some());
        assert!(o.get("code").is_none());
    }

    #[test]
    fn data_drops_text() {
        let mut p = json!({"resourceType":"Patient","text":{"div":"x"},"active":true});
        apply_summary(&mut p, "data");
        assert!(p.get("text").is_none());
        assert_eq!(p["active"], true);
    }
}
