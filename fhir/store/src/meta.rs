//! Timestamps (`meta.lastUpdated`, history `_since`/`_at`) and writing `meta` into stored JSON.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// Formats µs since the epoch as a FHIR `instant` (`2026-11-22T02:30:00.123456Z`).
pub fn format_instant(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a FHIR instant/dateTime with a time zone (or a date, taken as its start in UTC) to µs.
pub fn parse_instant(s: &str) -> Option<i64> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_micros());
    }
    // partial forms: YYYY, YYYY-MM, YYYY-MM-DD
    let padded = match s.len() {
        4 => format!("{s}-01-01T00:00:00Z"),
        7 => format!("{s}-01T00:00:00Z"),
        10 => format!("{s}T00:00:00Z"),
        _ => return None,
    };
    DateTime::parse_from_rfc3339(&padded)
        .ok()
        .map(|d| d.timestamp_micros())
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping every other element where it
/// was. A new `meta` goes right after `id` (spec element order); a new `id` after `resourceType`.
pub(crate) fn stamp(resource: &mut Value, id: &str, version: i64, last_updated: i64) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let old = std::mem::take(obj);
    let has_id = old.contains_key("id");
    let has_meta = old.contains_key("meta");
    let mut meta_value = Value::Null;
    let mut out = Map::with_capacity(old.len() + 2);
    let mut pending_meta = !has_meta;
    for (k, v) in old {
        match k.as_str() {
            "id" => {
                out.insert("id".into(), Value::String(id.to_string()));
                if pending_meta {
                    out.insert("meta".into(), Value::Null);
                    pending_meta = false;
                }
            }
            "meta" => {
                meta_value = v;
                out.insert("meta".into(), Value::Null);
            }
            "resourceType" => {
                out.insert(k, v);
                if !has_id {
                    out.insert("id".into(), Value::String(id.to_string()));
                    if pending_meta {
                        out.insert("meta".into(), Value::Null);
                        pending_meta = false;
                    }
                }
            }
            _ => {
                out.insert(k, v);
            }
        }
    }
    if pending_meta {
        out.insert("meta".into(), Value::Null);
    }
    let mut meta = match meta_value {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // versionId and lastUpdated lead meta, as in the spec's element order
    let mut new_meta = Map::with_capacity(meta.len() + 2);
    new_meta.insert("versionId".into(), Value::String(version.to_string()));
    new_meta.insert(
        "lastUpdated".into(),
        Value::String(format_instant(last_updated)),
    );
    meta.remove("versionId");
    meta.remove("lastUpdated");
    new_meta.extend(meta);
    out.insert("meta".into(), Value::Object(new_meta));
    *obj = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamp_keeps_order_and_precision() {
        let mut r: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":1.50}}"#,
        )
        .unwrap();
        stamp(&mut r, "abc", 3, 1_700_000_000_123_456);
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"resourceType":"Observation","id":"abc","meta":{"versionId":"3","lastUpdated":"2023-11-14T22:13:20.123456Z"},"status":"final","valueQuantity":{"value":1.50}}"#
        );
    }

    #[test]
    fn stamp_replaces_existing_meta_values() {
        let mut r = json!({"resourceType":"Patient","id":"x","meta":{"versionId":"9","profile":["p"]},"active":true});
        stamp(&mut r, "x", 2, 0);
        assert_eq!(r["meta"]["versionId"], "2");
        assert_eq!(r["meta"]["profile"][0], "p");
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "active"]);
    }

    #[test]
    fn instants_round_trip() {
        let t = 1_700_000_000_123_456;
        assert_eq!(parse_instant(&format_instant(t)), Some(t));
        assert_eq!(parse_instant("2023"), parse_instant("2023-01-01T00:00:00Z"));
        assert_eq!(parse_instant("garbage"), None);
    }
}
