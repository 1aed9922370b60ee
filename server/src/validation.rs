//! Validation on every write: the structural validator of `kiln-fhir` plus the checks that depend
//! on the interaction (id rules). Required bindings whose value set the R4 model cannot
//! enumerate (UCUM units, value sets with filters or nested value sets, THO content, a loaded
//! LOINC answer list…) are checked with the terminology service (`ValueSet/$validate-code`
//! semantics; for a CodeableConcept at least one coding must be in the value set). An unknown
//! value set or code system is not an error. Verdicts are cached per (value set, system, code)
//! for as long as the terminology service they came from is current.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use kiln_fhir::{CodeValidator, CodeVerdict, Issue};
use kiln_terminology::Terminology;
use serde_json::{json, Value};

use crate::error::{FhirError, FhirResult};
use crate::state::AppState;

/// Validates a resource about to be stored. Errors → 400 with an OperationOutcome whose
/// `issue.expression` points at the element.
pub async fn validate_for_write(state: &AppState, resource: &Value) -> FhirResult<()> {
    let issues = validate(state, resource).await;
    if issues.iter().any(Issue::is_error) {
        return Err(FhirError::with_issues(
            axum::http::StatusCode::BAD_REQUEST,
            issues,
        ));
    }
    Ok(())
}

/// All issues (errors and warnings) for a resource.
pub async fn validate(state: &AppState, resource: &Value) -> Vec<Issue> {
    // The terminology service is built on first use: validate without it first and build it
    // only when a binding needs it and no cached verdict answers.
    let current = state.terminology.current();
    let issues = {
        let codes = TerminologyCodes::new(current.as_ref(), &state.binding_cache);
        let issues = kiln_fhir::validate_with(resource, &codes);
        if current.is_some() || !codes.wanted.get() {
            return issues;
        }
        issues
    };
    match state.terminology.get().await {
        Ok(tx) => {
            let codes = TerminologyCodes::new(Some(&tx), &state.binding_cache);
            kiln_fhir::validate_with(resource, &codes)
        }
        Err(e) => {
            tracing::warn!(
                "terminology service unavailable; required bindings outside the R4 model not checked: {:?}",
                e.issues
            );
            issues
        }
    }
}

/// Issues of `resource` against `profile`: its constraints and its `required`/`extensible`
/// bindings, asked of the terminology service (built on first use, as in [`validate`]).
pub async fn validate_profile(
    state: &AppState,
    resource: &Value,
    profile: &kiln_fhir::Profile,
) -> Vec<Issue> {
    let current = state.terminology.current();
    {
        let codes = TerminologyCodes::new(current.as_ref(), &state.binding_cache);
        let issues = profile.validate_with(resource, &codes);
        if current.is_some() || !codes.wanted.get() {
            return issues;
        }
    }
    match state.terminology.get().await {
        Ok(tx) => {
            let codes = TerminologyCodes::new(Some(&tx), &state.binding_cache);
            profile.validate_with(resource, &codes)
        }
        Err(e) => {
            tracing::warn!(
                "terminology service unavailable; profile bindings not checked: {:?}",
                e.issues
            );
            profile.validate(resource)
        }
    }
}

/// The stored StructureDefinition whose `url` is `canonical` (`url|version` picks the version;
/// the most recently created one otherwise), prepared as a [`kiln_fhir::Profile`]. 400 when
/// there is none or it cannot serve as a profile.
pub async fn stored_profile(state: &AppState, canonical: &str) -> FhirResult<kiln_fhir::Profile> {
    let (url, version) = match canonical.split_once('|') {
        Some((u, v)) => (u, Some(v)),
        None => (canonical, None),
    };
    let rows = state
        .store
        .query_rows(
            "SELECT r.content FROM resources r WHERE r.res_type = 'StructureDefinition' AND r.deleted = 0 AND r.rid IN (SELECT u.rid FROM search_uri u WHERE u.param = 'url' AND u.value = $1) ORDER BY r.rid DESC",
            &[kiln_store::SqlValue::Text(url.to_string())],
        )
        .await?;
    let sd = rows
        .iter()
        .filter_map(|r| r.first().and_then(kiln_store::SqlValue::as_str))
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .find(|sd| version.is_none_or(|v| sd["version"].as_str() == Some(v)))
        .ok_or_else(|| {
            FhirError::invalid_at(
                format!("no StructureDefinition with url `{canonical}` is stored on this server"),
                "profile",
            )
        })?;
    kiln_fhir::Profile::from_structure_definition(&sd).map_err(|why| {
        FhirError::invalid_at(
            format!("the StructureDefinition `{canonical}` cannot be used as a profile: {why}"),
            "profile",
        )
    })
}

/// Cached binding verdicts of one terminology service (cleared when it is replaced).
#[derive(Default)]
pub struct BindingCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// The service the verdicts came from. A `Weak` keeps the service's allocation alive, so no
    /// later service can be built at the same address while these verdicts are kept.
    service: Weak<Terminology>,
    verdicts: HashMap<(String, Option<String>, String), CodeVerdict>,
}

/// Most verdicts kept; the cache starts over beyond.
const CACHE_LIMIT: usize = 50_000;

impl BindingCache {
    fn get(
        &self,
        service: &Arc<Terminology>,
        key: &(String, Option<String>, String),
    ) -> Option<CodeVerdict> {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !std::ptr::eq(c.service.as_ptr(), Arc::as_ptr(service)) {
            return None;
        }
        c.verdicts.get(key).cloned()
    }

    fn put(
        &self,
        service: &Arc<Terminology>,
        key: (String, Option<String>, String),
        v: CodeVerdict,
    ) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !std::ptr::eq(c.service.as_ptr(), Arc::as_ptr(service))
            || c.verdicts.len() >= CACHE_LIMIT
        {
            c.verdicts.clear();
            c.service = Arc::downgrade(service);
        }
        c.verdicts.insert(key, v);
    }
}

/// The server's [`CodeValidator`]: the terminology service (when built) behind the cache.
struct TerminologyCodes<'a> {
    tx: Option<&'a Arc<Terminology>>,
    cache: &'a BindingCache,
    /// A binding needed the service, which is not built yet.
    wanted: Cell<bool>,
}

impl<'a> TerminologyCodes<'a> {
    fn new(tx: Option<&'a Arc<Terminology>>, cache: &'a BindingCache) -> Self {
        TerminologyCodes {
            tx,
            cache,
            wanted: Cell::new(false),
        }
    }
}

impl CodeValidator for TerminologyCodes<'_> {
    fn validate_code(&self, value_set: &str, system: Option<&str>, code: &str) -> CodeVerdict {
        let Some(tx) = self.tx else {
            self.wanted.set(true);
            return CodeVerdict::Unknown;
        };
        let key = (
            value_set.to_string(),
            system.map(str::to_string),
            code.to_string(),
        );
        if let Some(v) = self.cache.get(tx, &key) {
            return v;
        }
        let v = check(tx, value_set, system, code);
        self.cache.put(tx, key, v.clone());
        v
    }

    fn includes_system(&self, value_set: &str, system: &str) -> Option<bool> {
        let Some(tx) = self.tx else {
            self.wanted.set(true);
            return None;
        };
        let vs = tx.value_set(value_set)?;
        kiln_fhir::value_set_includes_system(&vs, system)
    }
}

/// `ValueSet/$validate-code` of one code, turned into a verdict.
pub fn check(tx: &Terminology, value_set: &str, system: Option<&str>, code: &str) -> CodeVerdict {
    let Some(vs) = tx.value_set(value_set) else {
        return CodeVerdict::Unknown;
    };
    let system = match system {
        Some(s) => Some(s.to_string()),
        // a `code` element: the system the value set implies when it includes exactly one
        None => implied_system(&vs),
    };
    if let Some(s) = &system {
        if !tx.has_code_system(s) {
            return CodeVerdict::Unknown;
        }
    }
    let (url, version) = match value_set.split_once('|') {
        Some((u, v)) => (u, Some(v)),
        None => (value_set, None),
    };
    let mut params = vec![
        json!({"name": "url", "valueUri": url}),
        json!({"name": "code", "valueCode": code}),
    ];
    if let Some(v) = version {
        params.push(json!({"name": "valueSetVersion", "valueString": v}));
    }
    if let Some(s) = &system {
        params.push(json!({"name": "system", "valueUri": s}));
    }
    let result = tx.validate_code_vs(&json!({"resourceType": "Parameters", "parameter": params}));
    match result {
        Ok(out) => verdict(&out),
        Err(e) => {
            if e.status != 404 {
                tracing::debug!(value_set, code, "binding not checked: {:?}", e.issues);
            }
            CodeVerdict::Unknown
        }
    }
}

/// The one code system a value set's `compose.include`s name (no nested value sets), if any.
fn implied_system(vs: &Value) -> Option<String> {
    let includes = vs.pointer("/compose/include")?.as_array()?;
    let mut systems: Vec<&str> = Vec::new();
    for i in includes {
        if i.get("valueSet").is_some() {
            return None;
        }
        let s = i.get("system").and_then(Value::as_str)?;
        if !systems.contains(&s) {
            systems.push(s);
        }
    }
    match systems.as_slice() {
        [one] => Some(one.to_string()),
        _ => None,
    }
}

/// Reads a `$validate-code` result: `result`, or unknown when a code system or value set
/// could not be found.
fn verdict(out: &Value) -> CodeVerdict {
    let params = out["parameter"].as_array().cloned().unwrap_or_default();
    let get = |n: &str| params.iter().find(|p| p["name"] == n);
    if get("result").and_then(|p| p["valueBoolean"].as_bool()) == Some(true) {
        return CodeVerdict::Valid;
    }
    if get("x-caused-by-unknown-system").is_some() || get("x-unknown-system").is_some() {
        return CodeVerdict::Unknown;
    }
    let issues = get("issues")
        .and_then(|p| p["resource"]["issue"].as_array().cloned())
        .unwrap_or_default();
    let unknown = issues.iter().any(|i| {
        i["details"]["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| matches!(c["code"].as_str(), Some("not-found" | "cannot-infer")))
    });
    if unknown {
        return CodeVerdict::Unknown;
    }
    let message = get("message")
        .and_then(|p| p["valueString"].as_str())
        .unwrap_or("not in the value set")
        .to_string();
    CodeVerdict::Invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx() -> &'static Terminology {
        static TX: std::sync::OnceLock<Terminology> = std::sync::OnceLock::new();
        TX.get_or_init(|| Terminology::with_r4_content().unwrap())
    }

    #[test]
    fn verdicts_of_the_terminology_service() {
        let t = tx();
        let ucum = "http://hl7.org/fhir/ValueSet/ucum-units";
        assert_eq!(
            check(t, ucum, Some("http://unitsofmeasure.org"), "mg/dL"),
            CodeVerdict::Valid
        );
        assert!(matches!(
            check(t, ucum, Some("http://unitsofmeasure.org"), "mg/zz"),
            CodeVerdict::Invalid(_)
        ));
        // another code system than the value set's: not in it
        assert!(matches!(
            check(t, ucum, Some("http://snomed.info/sct"), "258684004"),
            CodeVerdict::Unknown | CodeVerdict::Invalid(_)
        ));
        // a `code` element: the value set's only system is implied
        assert_eq!(check(t, ucum, None, "kg"), CodeVerdict::Valid);
        // value sets or code systems the service does not know: unknown
        assert_eq!(
            check(t, "http://example.org/ValueSet/none", None, "x"),
            CodeVerdict::Unknown
        );
        assert_eq!(
            check(
                t,
                "http://hl7.org/fhir/ValueSet/mimetypes",
                None,
                "text/plain"
            ),
            CodeVerdict::Unknown
        );
        // a THO value set
        let vs = "http://terminology.hl7.org/ValueSet/v3-ActEncounterCode";
        assert_eq!(
            check(
                t,
                vs,
                Some("http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                "AMB"
            ),
            CodeVerdict::Valid
        );
        assert!(matches!(
            check(
                t,
                vs,
                Some("http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                "NOPE"
            ),
            CodeVerdict::Invalid(_)
        ));
    }

    #[test]
    fn value_set_systems_for_extensible_bindings() {
        let cache = BindingCache::default();
        let t = Arc::new(Terminology::with_r4_content().unwrap());
        let codes = TerminologyCodes::new(Some(&t), &cache);
        let vs = "http://terminology.hl7.org/ValueSet/v3-ActEncounterCode";
        assert_eq!(
            codes.includes_system(vs, "http://terminology.hl7.org/CodeSystem/v3-ActCode"),
            Some(true)
        );
        assert_eq!(
            codes.includes_system(vs, "http://snomed.info/sct"),
            Some(false)
        );
        assert_eq!(
            codes.includes_system("http://example.org/ValueSet/none", "http://x"),
            None
        );
        // no service yet: nothing can be told, and the service is asked for
        let none = TerminologyCodes::new(None, &cache);
        assert_eq!(none.includes_system(vs, "http://x"), None);
        assert!(none.wanted.get());
    }

    #[test]
    fn cache_answers_and_is_dropped_with_its_service() {
        let cache = BindingCache::default();
        let (one, two) = (Arc::new(Terminology::new()), Arc::new(Terminology::new()));
        let key = ("vs".to_string(), None, "c".to_string());
        cache.put(&one, key.clone(), CodeVerdict::Valid);
        assert_eq!(cache.get(&one, &key), Some(CodeVerdict::Valid));
        assert_eq!(cache.get(&two, &key), None, "another service");
        cache.put(&two, ("vs".into(), None, "d".into()), CodeVerdict::Unknown);
        assert_eq!(
            cache.get(&two, &key),
            None,
            "cleared when the service changed"
        );
        // The cache holds a Weak to `two`: dropping it keeps its address from being reused, so a
        // service built afterwards never sees `two`'s verdicts.
        drop(two);
        let three = Arc::new(Terminology::new());
        assert_eq!(
            cache.get(&three, &("vs".into(), None, "d".into())),
            None,
            "a later service"
        );
    }
}
