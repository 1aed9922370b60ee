//! Implicit value sets of the large code systems, as `compose.include` elements:
//!
//! - any system: `{system}?fhir_vs` (all codes), `{system}?fhir_vs=isa/{code}` (the code and its
//!   descendants);
//! - SNOMED CT: `?fhir_vs=refset` (the reference sets), `?fhir_vs=refset/{sctid}` (members of
//!   a reference set), `?fhir_vs=ecl/{expression}` (an ECL expression, see `ecl.rs`);
//! - LOINC: `http://loinc.org/vs` (all codes), `http://loinc.org/vs/{LL…}` (the answers of an
//!   answer list), `http://loinc.org/vs/{LP…}` (the codes below a part in the multiaxial
//!   hierarchy).

use serde_json::{json, Value};

use crate::loinc::LOINC_URL;

/// Percent-decodes `s` (the ECL of a `?fhir_vs=ecl/…` URL is usually URL-encoded).
pub fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// The code system and `compose.include` of an implicit value set URL, or `None` when `url` is
/// not one.
pub fn implicit_include(url: &str) -> Option<(String, Value)> {
    if let Some(rest) = url.strip_prefix("http://loinc.org/vs") {
        let include = match rest.strip_prefix('/') {
            None if rest.is_empty() => json!({"system": LOINC_URL}),
            Some(id) if id.starts_with("LL") => {
                json!({"system": LOINC_URL, "filter": [{"property": "LIST", "op": "=", "value": id}]})
            }
            Some(id) if id.starts_with("LP") => json!({"system": LOINC_URL,
                "filter": [{"property": "concept", "op": "descendent-of", "value": id}]}),
            _ => return None,
        };
        return Some((LOINC_URL.to_string(), include));
    }
    let (system, query) = url.split_once("?fhir_vs")?;
    let include = match query.strip_prefix('=') {
        None if query.is_empty() => json!({ "system": system }),
        Some("") => json!({ "system": system }),
        None => return None,
        Some(q) => {
            let filter = if let Some(code) = q.strip_prefix("isa/") {
                json!({"property": "concept", "op": "is-a", "value": percent_decode(code)})
            } else if q == "refset" {
                json!({"property": "refset", "op": "exists", "value": "true"})
            } else if let Some(id) = q.strip_prefix("refset/") {
                json!({"property": "constraint", "op": "=", "value": format!("^ {}", percent_decode(id))})
            } else if let Some(ecl) = q.strip_prefix("ecl/") {
                json!({"property": "constraint", "op": "=", "value": percent_decode(ecl)})
            } else {
                return None;
            };
            json!({"system": system, "filter": [filter]})
        }
    };
    Some((system.to_string(), include))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_value_set_urls() {
        let (s, i) = implicit_include("http://snomed.info/sct?fhir_vs").unwrap();
        assert_eq!(s, "http://snomed.info/sct");
        assert!(i.get("filter").is_none());
        let (_, i) = implicit_include("http://snomed.info/sct?fhir_vs=isa/73211009").unwrap();
        assert_eq!(i["filter"][0]["op"], "is-a");
        let (_, i) =
            implicit_include("http://snomed.info/sct?fhir_vs=ecl/%3C%3C%2073211009").unwrap();
        assert_eq!(i["filter"][0]["value"], "<< 73211009");
        assert_eq!(i["filter"][0]["property"], "constraint");
        let (_, i) = implicit_include("http://snomed.info/sct?fhir_vs=refset/450970008").unwrap();
        assert_eq!(i["filter"][0]["value"], "^ 450970008");
        let (_, i) = implicit_include("http://loinc.org/vs/LL2201-3").unwrap();
        assert_eq!(i["filter"][0]["property"], "LIST");
        let (_, i) = implicit_include("http://loinc.org/vs/LP7786-9").unwrap();
        assert_eq!(i["filter"][0]["op"], "descendent-of");
        let (s, i) = implicit_include("http://loinc.org/vs").unwrap();
        assert_eq!(
            (s.as_str(), i["system"].as_str()),
            (LOINC_URL, Some(LOINC_URL))
        );
        assert!(implicit_include("http://loinc.org/vsx").is_none());
        assert!(implicit_include("http://snomed.info/sct?fhir_vs=bogus/1").is_none());
        assert!(implicit_include("http://example.org/vs").is_none());
        assert_eq!(percent_decode("%3C%3C 1%"), "<< 1%");
    }
}
