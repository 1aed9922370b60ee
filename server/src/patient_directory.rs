//! The SMART pickers' directory over the server's search engine: the standalone patient picker
//! finds patients by name, identifier or id (`Patient?name=…`, `Patient?identifier=…`,
//! `Patient?_id=…`) limited to the patients the signed-in user may see, and the standalone
//! encounter picker lists a patient's encounters most recent first
//! (`Encounter?patient=…&_sort=-date`). smart-auth only knows the
//! [`kiln_smart_auth::PatientDirectory`] trait.

use std::sync::Weak;

use kiln_smart_auth::{EncounterChoice, PatientVisibility};
use serde_json::Value;

use crate::auth::Access;
use crate::interactions::RequestContext;
use crate::state::{AppState, Inner};

/// Installed by [`AppState::with_auth`]; holds the state weakly (the state owns the auth server).
pub struct SearchDirectory(pub(crate) Weak<Inner>);

impl SearchDirectory {
    fn state(&self) -> Option<AppState> {
        self.0.upgrade().map(|inner| AppState { inner })
    }

    /// The resources a search finds (matches only), or none when it fails.
    async fn search(&self, ty: &str, query: Vec<(String, String)>) -> Vec<Value> {
        let Some(state) = self.state() else {
            return Vec::new();
        };
        let ctx = RequestContext {
            query,
            ..Default::default()
        };
        let resp = match state
            .search
            .search_type(&state, Some(ty), &ctx, &Access::unrestricted())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("picker search on {ty} failed: {:?}", e.issues);
                return Vec::new();
            }
        };
        let Some(bundle) = resp.body.and_then(|b| b.into_value().ok()) else {
            return Vec::new();
        };
        bundle
            .get("entry")
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e.pointer("/search/mode").and_then(Value::as_str) == Some("match"))
                    .filter_map(|e| e.get("resource").cloned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Escapes the characters FHIR search gives a meaning inside a value (`\`, `,`, `$`, `|`).
fn escape_search_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '$' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// `HumanName.text`, else the given names and the family name, of the first name.
pub(crate) fn patient_display_name(patient: &Value) -> Option<String> {
    human_name(patient.get("name")?.as_array()?.first()?)
}

fn human_name(name: &Value) -> Option<String> {
    if let Some(text) = name.get("text").and_then(Value::as_str) {
        return Some(text.to_string());
    }
    let mut parts: Vec<&str> = name
        .get("given")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(f) = name.get("family").and_then(Value::as_str) {
        parts.push(f);
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// `CodeableConcept.text`, else its first coding's display, else its code.
fn concept_text(c: &Value) -> Option<String> {
    if let Some(t) = c.get("text").and_then(Value::as_str) {
        return Some(t.to_string());
    }
    let coding = c.get("coding")?.as_array()?.first()?;
    coding
        .get("display")
        .or_else(|| coding.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// An Encounter as a picker row: its type (else class), period and status.
pub(crate) fn encounter_choice(enc: &Value) -> Option<EncounterChoice> {
    let id = enc.get("id")?.as_str()?.to_string();
    let types: Vec<String> = enc
        .get("type")
        .and_then(Value::as_array)
        .map(|t| t.iter().filter_map(concept_text).collect())
        .unwrap_or_default();
    let class = enc.get("class").and_then(|c| {
        c.get("display")
            .or_else(|| c.get("code"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let description = if !types.is_empty() {
        types.join(", ")
    } else {
        class.unwrap_or_else(|| "Encounter".to_string())
    };
    let start = enc.pointer("/period/start").and_then(Value::as_str);
    let end = enc.pointer("/period/end").and_then(Value::as_str);
    let period = match (start, end) {
        (Some(s), Some(e)) => Some(format!("{s} – {e}")),
        (Some(s), None) => Some(format!("from {s}")),
        (None, Some(e)) => Some(format!("until {e}")),
        (None, None) => None,
    };
    Some(EncounterChoice {
        id,
        description,
        period,
        status: enc
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

#[async_trait::async_trait]
impl kiln_smart_auth::PatientDirectory for SearchDirectory {
    async fn search(&self, text: &str, limit: usize) -> Vec<(String, String)> {
        self.search_visible(text, &PatientVisibility::Any, limit)
            .await
    }

    async fn search_visible(
        &self,
        text: &str,
        visible: &PatientVisibility,
        limit: usize,
    ) -> Vec<(String, String)> {
        let text = text.trim();
        if text.is_empty() || limit == 0 {
            return Vec::new();
        }
        let restriction = match visible {
            PatientVisibility::Any => None,
            PatientVisibility::Only(ids) => {
                let ids: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|i| is_fhir_id(i))
                    .collect();
                if ids.is_empty() {
                    return Vec::new();
                }
                Some(("_id".to_string(), ids.join(",")))
            }
        };
        let count = ("_count".to_string(), limit.to_string());
        // every word must start a part of some name (`Alicia Ash` finds Alicia Ashworth)
        let mut queries: Vec<Vec<(String, String)>> = vec![text
            .split_whitespace()
            .map(|w| ("name".to_string(), escape_search_value(w)))
            .collect()];
        if !text.contains(char::is_whitespace) {
            // an identifier value (any system) or `system|value`
            let ident = if text.contains('|') {
                text.to_string()
            } else {
                escape_search_value(text)
            };
            queries.push(vec![("identifier".to_string(), ident)]);
        }
        if is_fhir_id(text) && visible.allows(text) {
            queries.push(vec![("_id".to_string(), text.to_string())]);
        }
        let mut found: Vec<(String, String)> = Vec::new();
        for mut q in queries {
            q.extend(restriction.clone());
            q.push(count.clone());
            for p in self.search("Patient", q).await {
                let Some(id) = p.get("id").and_then(Value::as_str) else {
                    continue;
                };
                if !visible.allows(id) || found.iter().any(|(i, _)| i == id) {
                    continue;
                }
                let name = patient_display_name(&p).unwrap_or_else(|| format!("Patient {id}"));
                found.push((id.to_string(), name));
            }
        }
        found.sort_by_key(|(_, name)| name.to_lowercase());
        found.truncate(limit);
        found
    }

    async fn display_name(&self, id: &str) -> Option<String> {
        let state = self.state()?;
        let stored = state.store.read("Patient", id).await.ok()??;
        if stored.deleted {
            return None;
        }
        let patient: Value = serde_json::from_str(&stored.content).ok()?;
        patient_display_name(&patient)
    }

    async fn encounters(&self, patient: &str, limit: usize) -> Vec<EncounterChoice> {
        if !is_fhir_id(patient) || limit == 0 {
            return Vec::new();
        }
        let query = vec![
            ("patient".to_string(), format!("Patient/{patient}")),
            ("_sort".to_string(), "-date".to_string()),
            ("_count".to_string(), limit.to_string()),
        ];
        self.search("Encounter", query)
            .await
            .iter()
            .filter_map(encounter_choice)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn picker_names_come_from_human_name() {
        assert_eq!(
            human_name(&json!({"family": "Blackwood", "given": ["Bertram", "J"]})).as_deref(),
            Some("Bertram J Blackwood")
        );
        assert_eq!(
            human_name(&json!({"text": "Dr. B. Blackwood", "family": "Blackwood"})).as_deref(),
            Some("Dr. B. Blackwood")
        );
        assert_eq!(human_name(&json!({"use": "official"})), None);
    }

    #[test]
    fn encounter_rows_show_type_period_and_status() {
        let e = encounter_choice(&json!({
            "resourceType": "Encounter", "id": "e1", "status": "finished",
            "class": {"code": "AMB"},
            "type": [{"coding": [{"code": "270427003", "display": "Patient-initiated encounter"}]}],
            "period": {"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T10:00:00Z"}
        }))
        .unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.description, "Patient-initiated encounter");
        assert_eq!(
            e.period.as_deref(),
            Some("2024-03-01T09:00:00Z – 2024-03-01T10:00:00Z")
        );
        assert_eq!(e.status.as_deref(), Some("finished"));
        let c = encounter_choice(&json!({"id": "e2", "class": {"code": "IMP"},
            "period": {"start": "2024-01-01"}}))
        .unwrap();
        assert_eq!(c.description, "IMP");
        assert_eq!(c.period.as_deref(), Some("from 2024-01-01"));
        assert_eq!(c.status, None);
        assert!(encounter_choice(&json!({"resourceType": "Encounter"})).is_none());
    }

    #[test]
    fn search_values_are_escaped() {
        assert_eq!(escape_search_value("a,b$c|d\\e"), "a\\,b\\$c\\|d\\\\e");
        assert!(is_fhir_id("aaaa-patient"));
        assert!(!is_fhir_id("a b"));
        assert!(!is_fhir_id(""));
    }
}
