//! `_summary` and `_elements` (<http://hl7.org/fhir/R4/search.html#summary>, `#elements`), driven by
//! `ElementDefinition.isSummary` and the minimum cardinalities of the R4 model.
//!
//! Subsetted resources are marked with the `SUBSETTED` tag in `meta.tag`.

use serde_json::{json, Map, Value};

use crate::model::{r4, Model, TypeInfo, TypeKind};

/// `_summary` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryMode {
    /// `_summary=true`: only elements marked `isSummary`.
    True,
    /// `_summary=text`: `text`, `id`, `meta` and the mandatory top-level elements.
    Text,
    /// `_summary=data`: everything except `text`.
    Data,
    /// `_summary=count`: no resources (the caller returns only `Bundle.total`).
    Count,
    /// `_summary=false`: the whole resource.
    False,
}

impl SummaryMode {
    /// Parses the `_summary` parameter value.
    pub fn parse(s: &str) -> Option<SummaryMode> {
        match s {
            "true" => Some(SummaryMode::True),
            "text" => Some(SummaryMode::Text),
            "data" => Some(SummaryMode::Data),
            "count" => Some(SummaryMode::Count),
            "false" => Some(SummaryMode::False),
            _ => None,
        }
    }
}

const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

fn mark_subsetted(out: &mut Map<String, Value>) {
    let meta = out
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(tags) = tags.as_array_mut() {
        let present = tags
            .iter()
            .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED");
        if !present {
            tags.push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED", "display": "Resource encoded in summary mode"}));
        }
    }
}

fn is_mandatory_or_meta(ti: &TypeInfo, key: &str) -> bool {
    let bare = key.strip_prefix('_').unwrap_or(key);
    matches!(bare, "resourceType" | "id" | "meta")
        || ti.resolve_json_name(bare).is_some_and(|m| m.info.min > 0)
}

/// Applies `_summary` to a resource. Unknown resource types and `False` return it unchanged;
/// `Count` returns `Value::Null`.
pub fn summarize(resource: &Value, mode: SummaryMode) -> Value {
    let model = r4();
    let Some(obj) = resource.as_object() else {
        return resource.clone();
    };
    let Some(ti) = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|rt| model.type_info(rt))
    else {
        return resource.clone();
    };
    match mode {
        SummaryMode::False => resource.clone(),
        SummaryMode::Count => Value::Null,
        SummaryMode::Data => {
            let mut out = obj.clone();
            if out.remove("text").is_some() {
                mark_subsetted(&mut out);
            }
            Value::Object(out)
        }
        SummaryMode::Text => {
            let mut out = Map::new();
            for (k, v) in obj {
                if k == "text" || is_mandatory_or_meta(ti, k) {
                    out.insert(k.clone(), v.clone());
                }
            }
            mark_subsetted(&mut out);
            Value::Object(out)
        }
        SummaryMode::True => {
            let mut out = summary_object(model, obj, ti, true);
            mark_subsetted(&mut out);
            Value::Object(out)
        }
    }
}

/// Keeps the summary elements of an object; backbone elements are filtered recursively,
/// datatype values are kept whole.
fn summary_object(
    model: &Model,
    obj: &Map<String, Value>,
    ti: &TypeInfo,
    is_resource: bool,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        if is_resource && k == "resourceType" {
            out.insert(k.clone(), v.clone());
            continue;
        }
        let bare = k.strip_prefix('_').unwrap_or(k);
        let Some(m) = ti.resolve_json_name(bare) else {
            continue;
        };
        if !(m.info.is_summary || m.info.min > 0) {
            continue;
        }
        let backbone = m
            .info
            .backbone_type
            .as_deref()
            .and_then(|b| model.type_info(b))
            .filter(|t| t.kind == TypeKind::Backbone);
        match (backbone, v) {
            (Some(bt), Value::Object(o)) => {
                out.insert(
                    k.clone(),
                    Value::Object(summary_object(model, o, bt, false)),
                );
            }
            (Some(bt), Value::Array(items)) => {
                let items = items
                    .iter()
                    .map(|i| match i {
                        Value::Object(o) => Value::Object(summary_object(model, o, bt, false)),
                        other => other.clone(),
                    })
                    .collect();
                out.insert(k.clone(), Value::Array(items));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Applies `_elements=a,b,c`: keeps the listed top-level elements (choice elements by their
/// base name, e.g. `value`) plus `resourceType`, `id`, `meta` and the mandatory elements.
pub fn select_elements(resource: &Value, elements: &[&str]) -> Value {
    let model = r4();
    let Some(obj) = resource.as_object() else {
        return resource.clone();
    };
    let Some(ti) = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|rt| model.type_info(rt))
    else {
        return resource.clone();
    };
    let mut out = Map::new();
    for (k, v) in obj {
        let bare = k.strip_prefix('_').unwrap_or(k);
        let listed = ti
            .resolve_json_name(bare)
            .is_some_and(|m| elements.contains(&m.info.name.as_str()));
        if listed || is_mandatory_or_meta(ti, k) {
            out.insert(k.clone(), v.clone());
        }
    }
    mark_subsetted(&mut out);
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> Value {
        json!({
            "resourceType": "Patient", "id": "p",
            "meta": {"versionId": "2"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "active": true,
            "name": [{"family": "Doe"}],
            "birthDate": "1970-01-01",
            "_birthDate": {"id": "b"},
            "maritalStatus": {"text": "M"},
            "photo": [{"contentType": "image/png"}],
            "contact": [{"name": {"text": "c"}, "relationship": [{"text": "r"}]}],
            "link": [{"other": {"reference": "Patient/q"}, "type": "seealso"}]
        })
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn summary_true() {
        let s = summarize(&patient(), SummaryMode::True);
        assert_eq!(
            keys(&s),
            vec![
                "resourceType",
                "id",
                "meta",
                "active",
                "name",
                "birthDate",
                "_birthDate",
                "link"
            ]
        );
        assert_eq!(s["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(s["meta"]["versionId"], "2");
        // link is summary; its backbone children other and type are summary too
        assert_eq!(s["link"][0]["type"], "seealso");
    }

    #[test]
    fn summary_text_data_count() {
        let t = summarize(&patient(), SummaryMode::Text);
        assert_eq!(keys(&t), vec!["resourceType", "id", "meta", "text"]);
        let d = summarize(&patient(), SummaryMode::Data);
        assert!(d.get("text").is_none());
        assert!(d.get("contact").is_some());
        assert_eq!(d["meta"]["tag"][0]["code"], "SUBSETTED");
        assert_eq!(summarize(&patient(), SummaryMode::Count), Value::Null);
        assert_eq!(summarize(&patient(), SummaryMode::False), patient());
        assert_eq!(SummaryMode::parse("text"), Some(SummaryMode::Text));
        assert_eq!(SummaryMode::parse("x"), None);
    }

    #[test]
    fn elements() {
        let e = select_elements(&patient(), &["birthDate", "photo"]);
        assert_eq!(
            keys(&e),
            vec![
                "resourceType",
                "id",
                "meta",
                "birthDate",
                "_birthDate",
                "photo"
            ]
        );
        let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 1}, "note": [{"text": "n"}]});
        let e = select_elements(&o, &["value"]);
        assert_eq!(
            keys(&e),
            vec!["resourceType", "status", "code", "valueQuantity", "meta"]
        );
    }
}
