//! The terminology service: `$lookup`, `$validate-code` (CodeSystem and ValueSet), `$subsumes`,
//! `$expand` and `$translate` on FHIR `Parameters` JSON, as the R4 operation definitions specify.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, OnceLock};

use kiln_fhir::Issue;
use serde_json::{json, Map, Value};

use crate::provider::{CodeSystemProvider, Concept, Designation, PropertyValue, TextMatcher};
use crate::resource::{apply_supplement, arr, code_system_table, s};

const TX_ISSUE_TYPE: &str = "http://hl7.org/fhir/tools/CodeSystem/tx-issue-type";
/// The vendored R4 + THO CodeSystems/ValueSets/ConceptMaps: a gzip'd collection Bundle (the
/// server also stores them as resources at first start).
pub const R4_BUNDLE_GZ: &[u8] = include_bytes!("../data/r4-terminology.json.gz");
/// Expansions larger than this are refused unless paged with `count` (HAPI's and tx.fhir.org's
/// default limit too).
pub const MAX_EXPANSION: usize = 1_000;
/// Code systems larger than this are searched through their text index for `$expand?filter=`.
const LARGE_SYSTEM: usize = 1_000;

/// An operation failure: the issues, the complete `OperationOutcome` to return and the HTTP status.
#[derive(Debug, Clone)]
pub struct TxError {
    pub status: u16,
    pub issues: Vec<Issue>,
    pub outcome: Value,
}

impl TxError {
    pub fn new(status: u16, code: &'static str, tx_code: &str, text: impl Into<String>) -> Self {
        let text = text.into();
        TxError {
            status,
            issues: vec![Issue::error(code, text.clone())],
            outcome: json!({"resourceType": "OperationOutcome", "issue": [issue_json("error", code, tx_code, &text, None)]}),
        }
    }
    fn not_found(text: impl Into<String>) -> Self {
        TxError::new(404, "not-found", "not-found", text)
    }
    fn invalid(text: impl Into<String>) -> Self {
        TxError::new(400, "invalid", "invalid-data", text)
    }
}

impl From<TxError> for Vec<Issue> {
    fn from(e: TxError) -> Self {
        e.issues
    }
}

/// The message identifier tx.fhir.org (and the HL7 validator) give an issue, derived from its
/// tx-issue-type and text; reported as the `operationoutcome-message-id` extension.
fn message_id(tx_code: &str, severity: &str, text: &str) -> Option<&'static str> {
    Some(match tx_code {
        "not-in-vs" if text.starts_with("No valid coding") => "TX_GENERAL_CC_ERROR_MESSAGE",
        "not-in-vs" | "this-code-not-in-vs" => {
            "None_of_the_provided_codes_are_in_the_value_set_one"
        }
        "not-found" if text.starts_with("Required supplement not found") => {
            "VALUESET_SUPPLEMENT_MISSING"
        }
        "not-found" if text.contains("pinned by the default-valueset-version") => {
            "VS_EXP_IMPORT_UNK_PINNED"
        }
        "not-found" if text.starts_with("A definition for the value Set") => {
            "Unable_to_resolve_value_Set_"
        }
        "not-found" if text.contains("No versions of this code system are known") => {
            "UNKNOWN_CODESYSTEM_VERSION_NONE"
        }
        "not-found" if text.contains("' version '") && text.contains("cannot be expanded") => {
            "UNKNOWN_CODESYSTEM_VERSION_EXP"
        }
        "not-found" if text.contains("' version '") => "UNKNOWN_CODESYSTEM_VERSION",
        "not-found" if text.starts_with("A definition for CodeSystem") => "UNKNOWN_CODESYSTEM",
        "vs-invalid" if text.contains("versionless include") => "VALUESET_VALUE_MISMATCH_DEFAULT",
        "vs-invalid" if text.contains("resulting from the version") => {
            "VALUESET_VALUE_MISMATCH_CHANGED"
        }
        "vs-invalid" if text.contains("in the ValueSet include is different") => {
            "VALUESET_VALUE_MISMATCH"
        }
        "invalid-code" if text.contains("labeled as a fragment") => "UNKNOWN_CODE_IN_FRAGMENT",
        "invalid-code" => "Unknown_Code_in_Version",
        "vs-invalid" if text.contains("has no value") => {
            "UNABLE_TO_HANDLE_SYSTEM_FILTER_WITH_NO_VALUE"
        }
        "vs-invalid" if text.starts_with("Cyclic reference") => "VALUESET_CIRCULAR_REFERENCE",
        "code-rule" if text.contains("differs from the correct code") => "CODE_CASE_DIFFERENCE",
        "invalid-display" if text.starts_with("Invalid displayLanguage") => "INVALID_DISPLAY_NAME",
        "invalid-display" if text.starts_with("Wrong whitespace") => {
            "Display_Name_WS_for__should_be_one_of__instead_of"
        }
        "invalid-display" if severity == "information" => "NO_VALID_DISPLAY_FOUND_NONE_FOR_LANG_OK",
        "invalid-display" if text.contains("There are no valid display names found") => {
            "NO_VALID_DISPLAY_FOUND_NONE_FOR_LANG_ERR"
        }
        "invalid-display" => "Display_Name_for__should_be_one_of__instead_of",
        "version-error" => "VALUESET_VERSION_CHECK",
        "code-comment" if text.contains("in the value set") && text.contains("is marked with") => {
            "CONCEPT_DEPRECATED_IN_VALUESET"
        }
        "code-comment" if text.contains("has a status of") => "INACTIVE_CONCEPT_FOUND",
        "code-comment" if text.contains("is deprecated") => "DEPRECATED_CONCEPT_FOUND",
        "status-check" if text.starts_with("Reference to draft") => "MSG_DRAFT",
        "status-check" if text.starts_with("Reference to deprecated") => "MSG_DEPRECATED",
        "status-check" if text.starts_with("Reference to withdrawn") => "MSG_WITHDRAWN",
        "status-check" if text.starts_with("Reference to experimental") => "MSG_EXPERIMENTAL",
        "code-rule" if text.contains("is valid but is not active") => "STATUS_CODE_WARNING_CODE",
        "code-rule" if text.contains("is abstract") => "ABSTRACT_CODE_NOT_ALLOWED",
        "cannot-infer" if text.contains("multiple matches") => {
            "Unable_to_resolve_system__value_set_has_multiple_matches"
        }
        "cannot-infer" => "UNABLE_TO_INFER_CODESYSTEM",
        "invalid-data" if text.contains("references a value set") => {
            "Terminology_TX_System_ValueSet2"
        }
        "invalid-data" if text.contains("is a supplement, so can't be used") => {
            "CODESYSTEM_CS_NO_SUPPLEMENT"
        }
        "invalid-data" if text.contains("must be an absolute reference") => {
            "Terminology_TX_System_Relative"
        }
        "invalid-data" if text.starts_with("Coding has no system") => {
            "Coding_has_no_system__cannot_validate"
        }
        _ => return None,
    })
}

fn issue_json(severity: &str, code: &str, tx_code: &str, text: &str, loc: Option<&str>) -> Value {
    // an issue without a tx-issue-type (e.g. too-costly) carries only its text
    let details = if tx_code.is_empty() {
        json!({ "text": text })
    } else {
        json!({"coding": [{"system": TX_ISSUE_TYPE, "code": tx_code}], "text": text})
    };
    let mut i = json!({
        "severity": severity,
        "code": code,
        "details": details,
    });
    if let Some(l) = loc {
        // tx.fhir.org omits the deprecated `location` for unknown-code errors (and for
        // membership errors about unknown codes, see validate_one)
        if tx_code != "invalid-code" || severity == "warning" {
            i["location"] = json!([l]);
        }
        i["expression"] = json!([l]);
    }
    if let Some(id) = message_id(tx_code, severity, text) {
        i["extension"] = json!([{
            "url": "http://hl7.org/fhir/StructureDefinition/operationoutcome-message-id",
            "valueString": id
        }]);
    }
    i
}

// ---------------------------------------------------------------- Parameters helpers

/// Read access to a `Parameters` resource.
#[derive(Clone, Copy)]
pub struct Params<'a>(pub &'a Value);

impl<'a> Params<'a> {
    pub fn all(&self, name: &str) -> impl Iterator<Item = &'a Value> + '_ {
        let name = name.to_string();
        arr(self.0, "parameter")
            .iter()
            .filter(move |p| s(p, "name") == Some(name.as_str()))
    }
    pub fn param(&self, name: &str) -> Option<&'a Value> {
        self.all(name).next()
    }
    /// The `value[x]` of a parameter.
    pub fn value(&self, name: &str) -> Option<&'a Value> {
        let p = self.param(name)?;
        value_x(p)
    }
    pub fn str(&self, name: &str) -> Option<&'a str> {
        self.value(name).and_then(Value::as_str)
    }
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.value(name)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => Some(s == "true"),
            _ => None,
        }
    }
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.value(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
    pub fn resource(&self, name: &str) -> Option<&'a Value> {
        self.param(name).and_then(|p| p.get("resource"))
    }
}

fn value_x(p: &Value) -> Option<&Value> {
    p.as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .map(|(_, v)| v)
}

fn p_str(name: &str, kind: &str, v: &str) -> Value {
    json!({"name": name, format!("value{kind}"): v})
}
fn p_bool(name: &str, v: bool) -> Value {
    json!({"name": name, "valueBoolean": v})
}

fn split_canonical(url: &str) -> (&str, Option<&str>) {
    match url.split_once('|') {
        Some((u, v)) => (u, Some(v)),
        None => (url, None),
    }
}

fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '-'])
        .map(|p| (p.parse::<u64>().unwrap_or(0), p.to_string()))
        .collect()
}

fn version_matches(have: Option<&str>, want: &str) -> bool {
    match have {
        Some(h) if h == want => true,
        Some(h) => {
            // wildcards: 1.x, 1.*, and partial versions 1.0 matching 1.0.x
            let w: Vec<&str> = want.split('.').collect();
            let hv: Vec<&str> = h.split('.').collect();
            if w.iter().any(|p| *p == "x" || *p == "*") {
                return w
                    .iter()
                    .zip(hv.iter())
                    .all(|(a, b)| *a == "x" || *a == "*" || a == b);
            }
            false
        }
        None => false,
    }
}

// ---------------------------------------------------------------- registry

/// A code system known to the service: a provider, possibly built lazily from a resource.
pub struct CsEntry {
    pub url: String,
    pub version: Option<String>,
    pub resource: Option<Arc<Value>>,
    provider: OnceLock<Arc<dyn CodeSystemProvider>>,
    supplements: Vec<Arc<Value>>,
}

impl CsEntry {
    pub fn from_provider(p: Arc<dyn CodeSystemProvider>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(p.clone());
        CsEntry {
            url: p.url().to_string(),
            version: p.version().map(str::to_string),
            resource: None,
            provider: cell,
            supplements: Vec::new(),
        }
    }
    fn from_resource(r: Arc<Value>) -> Self {
        CsEntry {
            url: s(&r, "url").unwrap_or_default().to_string(),
            version: s(&r, "version").map(str::to_string),
            resource: Some(r),
            provider: OnceLock::new(),
            supplements: Vec::new(),
        }
    }
    /// The code system (without supplements), built once.
    pub fn provider(&self) -> Arc<dyn CodeSystemProvider> {
        self.provider
            .get_or_init(|| {
                let r = self.resource.clone().unwrap_or_else(|| Arc::new(json!({})));
                Arc::new(code_system_table(&r))
            })
            .clone()
    }

    /// The code system with the given supplements applied (resource-backed systems only).
    pub fn provider_with(&self, supplements: &[Arc<Value>]) -> Arc<dyn CodeSystemProvider> {
        match &self.resource {
            Some(r) if !supplements.is_empty() => {
                let mut t = code_system_table(r);
                for sup in supplements {
                    apply_supplement(&mut t, sup);
                }
                Arc::new(t)
            }
            _ => self.provider(),
        }
    }
    fn canonical(&self) -> String {
        match &self.version {
            Some(v) => format!("{}|{}", self.url, v),
            None => self.url.clone(),
        }
    }
}

/// Resources known to the service (or supplied with one request as `tx-resource`).
#[derive(Default)]
pub struct Registry {
    cs: HashMap<String, Vec<Arc<CsEntry>>>,
    vs: HashMap<String, Vec<Arc<Value>>>,
    cm: Vec<Arc<Value>>,
    supplements: Vec<Arc<Value>>,
}

impl Registry {
    pub fn add_provider(&mut self, p: Arc<dyn CodeSystemProvider>) {
        let e = Arc::new(CsEntry::from_provider(p));
        let list = self.cs.entry(e.url.clone()).or_default();
        list.retain(|x| x.version != e.version);
        list.push(e);
    }

    /// Adds a CodeSystem, ValueSet or ConceptMap resource.
    pub fn add_resource(&mut self, r: Value) -> Result<(), TxError> {
        let rt = s(&r, "resourceType").unwrap_or_default().to_string();
        let Some(url) = s(&r, "url").map(str::to_string) else {
            return Err(TxError::invalid(format!("{rt} has no url")));
        };
        let r = Arc::new(r);
        match rt.as_str() {
            "CodeSystem" => {
                if s(&r, "content") == Some("supplement") {
                    self.supplements.push(r);
                    return Ok(());
                }
                let mut e = CsEntry::from_resource(r);
                e.supplements = self
                    .supplements
                    .iter()
                    .filter(|sup| {
                        s(sup, "supplements")
                            .map(|x| split_canonical(x).0 == e.url)
                            .unwrap_or(false)
                    })
                    .cloned()
                    .collect();
                let list = self.cs.entry(url).or_default();
                list.retain(|x| x.version != e.version);
                list.push(Arc::new(e));
            }
            "ValueSet" => {
                let v = s(&r, "version").map(str::to_string);
                let list = self.vs.entry(url).or_default();
                list.retain(|x| s(x, "version").map(str::to_string) != v);
                list.push(r);
            }
            "ConceptMap" => {
                // several maps may share url|version (e.g. one per source system): keep them all
                self.cm.push(r);
            }
            other => {
                return Err(TxError::invalid(format!(
                    "Unsupported terminology resource type '{other}'"
                )))
            }
        }
        Ok(())
    }

    /// Re-applies supplements added after their code system (call after bulk loading).
    fn link_supplements(&mut self) {
        if self.supplements.is_empty() {
            return;
        }
        for list in self.cs.values_mut() {
            for e in list.iter_mut() {
                let sups: Vec<Arc<Value>> = self
                    .supplements
                    .iter()
                    .filter(|sup| {
                        s(sup, "supplements")
                            .map(|x| split_canonical(x).0 == e.url)
                            .unwrap_or(false)
                    })
                    .cloned()
                    .collect();
                if !sups.is_empty() && e.resource.is_some() {
                    let mut ne = CsEntry::from_resource(e.resource.clone().unwrap_or_default());
                    ne.supplements = sups;
                    *e = Arc::new(ne);
                }
            }
        }
    }
}

/// The terminology service.
pub struct Terminology {
    base: Registry,
}

impl Default for Terminology {
    fn default() -> Self {
        Self::new()
    }
}

/// The request context: the service's registry plus `tx-resource`s of one request.
struct Ctx<'a> {
    base: &'a Registry,
    local: Registry,
    params: Params<'a>,
    /// Default parameters a value set declares (`valueset-expansion-parameter`), as
    /// `Parameters.parameter` entries; the request's own parameters win.
    vs_params: std::cell::RefCell<Vec<Value>>,
    /// Supplements requested (`useSupplement`, value set `valueset-supplement`) and used.
    requested_supplements: std::cell::RefCell<Vec<String>>,
    used_supplements: std::cell::RefCell<Vec<String>>,
    /// Contained value sets of the value set being processed, by `#id`.
    contained: std::cell::RefCell<HashMap<String, Arc<Value>>>,
}

impl Terminology {
    /// An empty service with UCUM only.
    pub fn new() -> Self {
        let mut base = Registry::default();
        base.add_provider(Arc::new(crate::ucum::UcumProvider));
        Terminology { base }
    }

    /// The service with the vendored R4 + THO CodeSystems/ValueSets/ConceptMaps and UCUM.
    pub fn with_r4_content() -> Result<Self, TxError> {
        let mut t = Terminology::new();
        let mut sjson = String::new();
        flate2::read::GzDecoder::new(R4_BUNDLE_GZ)
            .read_to_string(&mut sjson)
            .map_err(|e| TxError::new(500, "exception", "internal", e.to_string()))?;
        let bundle: Value = serde_json::from_str(&sjson)
            .map_err(|e| TxError::new(500, "exception", "internal", e.to_string()))?;
        t.add_bundle(bundle)?;
        Ok(t)
    }

    /// Adds every CodeSystem/ValueSet/ConceptMap entry of a Bundle.
    pub fn add_bundle(&mut self, bundle: Value) -> Result<usize, TxError> {
        let mut n = 0;
        if let Value::Object(mut b) = bundle {
            if let Some(Value::Array(entries)) = b.remove("entry") {
                for mut e in entries {
                    if let Some(r) = e.get_mut("resource").map(Value::take) {
                        if matches!(
                            s(&r, "resourceType"),
                            Some("CodeSystem" | "ValueSet" | "ConceptMap")
                        ) && s(&r, "url").is_some()
                        {
                            self.base.add_resource(r)?;
                            n += 1;
                        }
                    }
                }
            }
        }
        self.base.link_supplements();
        Ok(n)
    }

    /// Adds one CodeSystem/ValueSet/ConceptMap resource.
    pub fn add_resource(&mut self, r: Value) -> Result<(), TxError> {
        self.base.add_resource(r)?;
        self.base.link_supplements();
        Ok(())
    }

    /// Adds a code system provider (ICD-10-CM, LOINC, SNOMED CT tables, …).
    pub fn add_code_system(&mut self, p: Arc<dyn CodeSystemProvider>) {
        self.base.add_provider(p);
    }

    /// The value set the service holds under a canonical URL (`|version` optional: the
    /// latest added otherwise).
    pub fn value_set(&self, canonical: &str) -> Option<Arc<Value>> {
        let (url, version) = split_canonical(canonical);
        let list = self.base.vs.get(url)?;
        match version {
            Some(v) => list.iter().find(|x| s(x, "version") == Some(v)).cloned(),
            None => list.last().cloned(),
        }
    }

    /// Whether the service knows a code system with this URL (any version).
    pub fn has_code_system(&self, url: &str) -> bool {
        self.base.cs.contains_key(split_canonical(url).0)
    }

    /// Number of known code systems (all versions) and value sets.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.base.cs.values().map(Vec::len).sum(),
            self.base.vs.values().map(Vec::len).sum(),
            self.base.cm.len(),
        )
    }

    fn ctx<'a>(&'a self, params: &'a Value) -> Result<Ctx<'a>, TxError> {
        if s(params, "resourceType") != Some("Parameters") {
            return Err(TxError::invalid(
                "The request body must be a Parameters resource",
            ));
        }
        let p = Params(params);
        if let Some(l) = p.str("displayLanguage") {
            if !valid_language_list(l) {
                return Err(TxError::new(
                    400,
                    "processing",
                    "invalid-display",
                    format!("Invalid displayLanguage: '{l}'"),
                ));
            }
        }
        let mut local = Registry::default();
        for r in p.all("tx-resource").filter_map(|x| x.get("resource")) {
            local.add_resource(r.clone())?;
        }
        local.link_supplements();
        Ok(Ctx {
            base: &self.base,
            local,
            params: p,
            vs_params: std::cell::RefCell::new(Vec::new()),
            requested_supplements: std::cell::RefCell::new(
                p.all("useSupplement")
                    .filter_map(value_x)
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            used_supplements: std::cell::RefCell::new(Vec::new()),
            contained: std::cell::RefCell::new(HashMap::new()),
        })
    }

    /// `CodeSystem/$lookup`.
    pub fn lookup(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.lookup()
    }

    /// `ValueSet/$validate-code` when `url`/`valueSet`/`context` is given, else `CodeSystem/$validate-code`.
    pub fn validate_code(&self, params: &Value) -> Result<Value, TxError> {
        let p = Params(params);
        if p.param("valueSet").is_some() || p.param("context").is_some() {
            return self.validate_code_vs(params);
        }
        if let Some(url) = p.str("url") {
            let c = self.ctx(params)?;
            if c.find_vs(url, p.str("valueSetVersion")).is_some() || c.find_cs(url, None).is_none()
            {
                return self.validate_code_vs(params);
            }
            return self.validate_code_cs(params);
        }
        self.validate_code_cs(params)
    }

    /// `ValueSet/$validate-code`.
    pub fn validate_code_vs(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.validate(true)
    }

    /// `CodeSystem/$validate-code` (`url` is the code system).
    pub fn validate_code_cs(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.validate(false)
    }

    /// `ValueSet/$batch-validate`: each `validation` parameter (a Parameters resource) is
    /// validated with the request's other parameters (url, valueSet, tx-resource, …) added;
    /// the results come back as `validation` parameters, in order.
    pub fn batch_validate(&self, params: &Value) -> Result<Value, TxError> {
        let p = Params(params);
        let shared: Vec<Value> = arr(params, "parameter")
            .iter()
            .filter(|x| s(x, "name") != Some("validation"))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for v in p.all("validation").filter_map(|x| x.get("resource")) {
            let mut merged: Vec<Value> = arr(v, "parameter").to_vec();
            for sp in &shared {
                let name = s(sp, "name").unwrap_or("");
                if !merged.iter().any(|m| s(m, "name") == Some(name)) || name == "tx-resource" {
                    merged.push(sp.clone());
                }
            }
            let req = json!({"resourceType": "Parameters", "parameter": merged});
            let res = match self.validate_code_vs(&req) {
                Ok(r) => r,
                Err(e) => e.outcome,
            };
            out.push(json!({"name": "validation", "resource": res}));
        }
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    }

    /// `CodeSystem/$subsumes`.
    pub fn subsumes(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.subsumes()
    }

    /// `ValueSet/$expand`: returns the ValueSet with its `expansion`.
    pub fn expand(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.expand()
    }

    /// `ConceptMap/$translate`.
    pub fn translate(&self, params: &Value) -> Result<Value, TxError> {
        self.ctx(params)?.translate()
    }
}

// ---------------------------------------------------------------- expansion model

#[derive(Debug, Clone)]
struct Item {
    system: String,
    version: Option<String>,
    concept: Concept,
    display: Option<String>,
    /// Language of the code system's displays.
    cs_language: Option<String>,
    /// Extensions of the value set's `compose.include.concept` echoed in the expansion.
    vs_extensions: Vec<Value>,
}

#[derive(Default)]
struct Used {
    code_systems: Vec<String>,
    value_sets: Vec<String>,
    /// Expansion parameters to report (e.g. versionsMatch from the value set).
    echo: Vec<Value>,
}

impl Used {
    fn cs(&mut self, c: String) {
        if !self.code_systems.contains(&c) {
            self.code_systems.push(c);
        }
    }
}

/// A coding given to `$validate-code`, with the paths of its elements for issue locations.
struct CodingIn {
    system: Option<String>,
    version: Option<String>,
    code: String,
    display: Option<String>,
    loc_code: String,
    loc_display: String,
    loc_system: String,
    loc_version: String,
    /// The coding itself (`code`, `Coding`, `CodeableConcept.coding[i]`).
    loc_base: String,
}

struct CodingResult {
    valid: bool,
    issues: Vec<Value>,
    messages: Vec<String>,
    code: Option<String>,
    system: Option<String>,
    version: Option<String>,
    display: Option<String>,
    inactive: bool,
    unknown_system: Option<String>,
    not_in_vs: bool,
    pin_missing: bool,
    status: Option<String>,
    /// Whether to report `x-caused-by-unknown-system`.
    unknown_system_param: bool,
    /// The code in its correct case, when given in another case.
    normalized_code: Option<String>,
}

impl<'a> Ctx<'a> {
    fn find_cs(&self, url: &str, version: Option<&str>) -> Option<Arc<CsEntry>> {
        let (url, v2) = split_canonical(url);
        let version = version.or(v2);
        let mut cands: Vec<&Arc<CsEntry>> = Vec::new();
        for r in [&self.local, self.base] {
            if let Some(list) = r.cs.get(url) {
                cands.extend(list.iter());
            }
        }
        match version {
            Some(v) => {
                let m: Vec<Arc<CsEntry>> = cands
                    .into_iter()
                    .filter(|e| version_matches(e.version.as_deref(), v))
                    .cloned()
                    .collect();
                if let Some(exact) = m.iter().find(|e| e.version.as_deref() == Some(v)) {
                    return Some(exact.clone());
                }
                latest(&m, |e| e.version.clone())
            }
            None => {
                // local resources win; else the latest version
                if let Some(l) = self
                    .local
                    .cs
                    .get(url)
                    .and_then(|l| latest(l, |e| e.version.clone()))
                {
                    return Some(l);
                }
                self.base
                    .cs
                    .get(url)
                    .and_then(|l| latest(l, |e| e.version.clone()))
            }
        }
    }

    fn find_vs(&self, url: &str, version: Option<&str>) -> Option<Arc<Value>> {
        if url.starts_with('#') {
            return self.contained.borrow().get(url).cloned();
        }
        if let Some(implicit) = self.implicit_vs(url) {
            return Some(Arc::new(implicit));
        }
        let (url, v2) = split_canonical(url);
        let version = version.or(v2);
        let mut cands: Vec<&Arc<Value>> = Vec::new();
        for r in [&self.local, self.base] {
            if let Some(list) = r.vs.get(url) {
                cands.extend(list.iter());
            }
        }
        match version {
            Some(v) => cands
                .into_iter()
                .find(|e| version_matches(s(e, "version"), v))
                .cloned(),
            None => {
                if let Some(l) = self
                    .local
                    .vs
                    .get(url)
                    .and_then(|l| latest(l, |e| s(e, "version").map(str::to_string)))
                {
                    return Some(l);
                }
                self.base
                    .vs
                    .get(url)
                    .and_then(|l| latest(l, |e| s(e, "version").map(str::to_string)))
            }
        }
    }

    /// The canonical of a value set imported by a compose (`include.valueSet`): a versionless
    /// reference takes the version a `default-valueset-version` parameter gives for its URL.
    fn imported_vs_ref(&self, r: &str) -> String {
        if r.starts_with('#') || split_canonical(r).1.is_some() {
            return r.to_string();
        }
        match self.param_version("default-valueset-version", r) {
            Some(v) => format!("{r}|{v}"),
            None => r.to_string(),
        }
    }

    /// Implicit value sets of a code system (`{system}?fhir_vs` = all codes,
    /// `{system}?fhir_vs=isa/{code}` = the code and its descendants), as SNOMED CT, LOINC and
    /// ICD servers offer them.
    fn implicit_vs(&self, url: &str) -> Option<Value> {
        // the URL → compose mapping (SNOMED CT isa/refset/ecl, LOINC vs/LL…/LP…) is in implicit.rs
        let (system, include) = crate::implicit::implicit_include(url)?;
        self.find_cs(&system, None)?;
        Some(json!({
            "resourceType": "ValueSet",
            "url": url,
            "status": "active",
            "compose": {"include": [include]}
        }))
    }

    /// The version of `system` to use: force-system-version > include.version > system-version.
    fn system_version(&self, system: &str, declared: Option<&str>) -> Option<String> {
        for name in ["force-system-version"] {
            for v in self
                .params
                .all(name)
                .filter_map(value_x)
                .filter_map(Value::as_str)
            {
                let (u, ver) = split_canonical(v);
                if u == system {
                    return ver.map(str::to_string);
                }
            }
        }
        if let Some(d) = declared {
            return Some(d.to_string());
        }
        for name in ["system-version"] {
            for v in self
                .params
                .all(name)
                .filter_map(value_x)
                .filter_map(Value::as_str)
            {
                let (u, ver) = split_canonical(v);
                if u == system {
                    return ver.map(str::to_string);
                }
            }
        }
        None
    }

    fn display_language(&self) -> Option<String> {
        self.params
            .str("displayLanguage")
            .map(str::to_string)
            .or_else(|| self.vs_param_str("displayLanguage"))
    }

    fn vs_param_str(&self, name: &str) -> Option<String> {
        self.vs_params
            .borrow()
            .iter()
            .filter(|p| s(p, "name") == Some(name))
            .find_map(|p| value_x(p).and_then(Value::as_str).map(str::to_string))
    }

    /// The provider for an entry, with the requested supplements that target it.
    fn prov(&self, e: &CsEntry) -> Arc<dyn CodeSystemProvider> {
        let wanted = self.requested_supplements.borrow();
        if wanted.is_empty() {
            return e.provider();
        }
        let sups: Vec<Arc<Value>> = self
            .local
            .supplements
            .iter()
            .chain(self.base.supplements.iter())
            .filter(|sup| {
                let url = s(sup, "url").unwrap_or("");
                wanted.iter().any(|w| split_canonical(w).0 == url)
                    && s(sup, "supplements")
                        .map(|x| split_canonical(x).0 == e.url)
                        .unwrap_or(false)
            })
            .cloned()
            .collect();
        for sup in &sups {
            let c = match s(sup, "version") {
                Some(v) => format!("{}|{v}", s(sup, "url").unwrap_or("")),
                None => s(sup, "url").unwrap_or("").to_string(),
            };
            let mut used = self.used_supplements.borrow_mut();
            if !used.contains(&c) {
                used.push(c);
            }
        }
        e.provider_with(&sups)
    }

    /// Every requested supplement must exist.
    fn check_supplements(&self) -> Result<(), TxError> {
        for w in self.requested_supplements.borrow().iter() {
            let url = split_canonical(w).0;
            let found = self
                .local
                .supplements
                .iter()
                .chain(self.base.supplements.iter())
                .any(|sup| s(sup, "url") == Some(url));
            if !found {
                return Err(TxError::new(
                    404,
                    "not-found",
                    "not-found",
                    format!("Required supplement not found: {w}"),
                ));
            }
        }
        Ok(())
    }

    /// Records the expansion parameters a value set declares in extensions.
    fn note_vs_params(&self, vs: &Value) {
        for e in arr(vs, "extension") {
            if s(e, "url") == Some("http://hl7.org/fhir/StructureDefinition/valueset-supplement") {
                if let Some(v) = value_x(e).and_then(Value::as_str) {
                    let mut r = self.requested_supplements.borrow_mut();
                    if !r.iter().any(|x| x == v) {
                        r.push(v.to_string());
                    }
                }
            }
        }
        let mut list = Vec::new();
        let compose_ext = vs
            .get("compose")
            .map(|c| arr(c, "extension"))
            .unwrap_or(&[]);
        for e in arr(vs, "extension").iter().chain(compose_ext.iter()) {
            if s(e, "url")
                != Some("http://hl7.org/fhir/StructureDefinition/valueset-expansion-parameter")
            {
                continue;
            }
            let parts = arr(e, "extension");
            let name = parts
                .iter()
                .find(|p| s(p, "url") == Some("name"))
                .and_then(|p| value_x(p))
                .and_then(Value::as_str);
            let value = parts
                .iter()
                .find(|p| s(p, "url") == Some("value"))
                .and_then(|p| p.as_object())
                .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")));
            if let (Some(n), Some((k, v))) = (name, value) {
                if self.params.param(n).is_none() && n != "versionsMatch" {
                    list.push(json!({"name": n, k.clone(): v.clone()}));
                }
            }
        }
        *self.vs_params.borrow_mut() = list;
    }

    fn display_for(&self, c: &Concept, lang: Option<&str>) -> Option<String> {
        self.display_in(c, lang, None)
    }

    /// The display of `c` in the requested language(s): the concept display when the code
    /// system's language matches, else the first designation in a requested language.
    fn display_in(&self, c: &Concept, lang: Option<&str>, cs_lang: Option<&str>) -> Option<String> {
        if let Some(lang) = lang {
            for want in requested_languages(lang) {
                if want == "*" {
                    break;
                }
                if cs_lang.map(|l| lang_matches(l, &want)).unwrap_or(false) && c.display.is_some() {
                    return c.display.clone();
                }
                if let Some(d) = c.designations.iter().find(|d| {
                    d.language
                        .as_deref()
                        .map(|l| lang_matches(l, &want))
                        .unwrap_or(false)
                }) {
                    return Some(d.value.clone());
                }
            }
        }
        c.display.clone()
    }

    // ------------------------------------------------------------ expansion

    fn resolve_vs_param(&self) -> Result<(Arc<Value>, String), TxError> {
        let r = self.resolve_vs_param_inner()?;
        {
            let mut c = self.contained.borrow_mut();
            for res in arr(&r.0, "contained") {
                if let (Some("ValueSet"), Some(id)) = (s(res, "resourceType"), s(res, "id")) {
                    c.insert(format!("#{id}"), Arc::new(res.clone()));
                }
            }
        }
        self.note_vs_params(&r.0);
        self.check_supplements()?;
        Ok(r)
    }

    fn resolve_vs_param_inner(&self) -> Result<(Arc<Value>, String), TxError> {
        if let Some(r) = self.params.resource("valueSet") {
            let canon = vs_canonical(r);
            return Ok((Arc::new(r.clone()), canon));
        }
        let Some(url) = self
            .params
            .str("url")
            .or_else(|| self.params.str("context"))
        else {
            return Err(TxError::invalid(
                "Unable to find value set: no url or valueSet parameter",
            ));
        };
        let version = self.params.str("valueSetVersion");
        match self.find_vs(url, version) {
            Some(vs) => {
                let canon = vs_canonical(&vs);
                Ok((vs, canon))
            }
            None => Err(TxError::not_found(match version {
                Some(v) => format!("A definition for the value Set '{url}|{v}' could not be found"),
                None => format!("A definition for the value Set '{url}' could not be found"),
            })),
        }
    }

    fn expand_vs(&self, vs: &Value, depth: usize, used: &mut Used) -> Result<Vec<Item>, TxError> {
        if depth > 20 {
            return Err(TxError::new(
                422,
                "processing",
                "processing",
                "Value set nesting is too deep (circular reference?)",
            ));
        }
        let Some(compose) = vs.get("compose") else {
            // an already expanded value set
            let mut out = Vec::new();
            fn walk(cs: &[Value], out: &mut Vec<Item>) {
                for c in cs {
                    if let (Some(sys), Some(code)) = (s(c, "system"), s(c, "code")) {
                        let mut concept = Concept::new(code, s(c, "display").map(str::to_string));
                        concept.inactive =
                            c.get("inactive").and_then(Value::as_bool).unwrap_or(false);
                        concept.not_selectable =
                            c.get("abstract").and_then(Value::as_bool).unwrap_or(false);
                        out.push(Item {
                            system: sys.to_string(),
                            version: s(c, "version").map(str::to_string),
                            display: concept.display.clone(),
                            concept,
                            cs_language: None,
                            vs_extensions: Vec::new(),
                        });
                    }
                    walk(arr(c, "contains"), out);
                }
            }
            if let Some(exp) = vs.get("expansion") {
                walk(arr(exp, "contains"), &mut out);
            }
            return Ok(out);
        };
        let inactive_ok = compose
            .get("inactive")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut items: Vec<Item> = Vec::new();
        type Key = (String, Option<String>, String);
        // valueset-expansion-parameter versionsMatch: true merges the versions of a system
        let versions_match = arr(compose, "extension")
            .iter()
            .chain(arr(vs, "extension").iter())
            .filter(|e| {
                s(e, "url")
                    == Some("http://hl7.org/fhir/StructureDefinition/valueset-expansion-parameter")
            })
            .find_map(|e| {
                let parts = arr(e, "extension");
                let name = parts.iter().find(|p| s(p, "url") == Some("name"))?;
                if s(name, "valueCode") != Some("versionsMatch") {
                    return None;
                }
                let v = parts.iter().find(|p| s(p, "url") == Some("value"))?;
                value_x(v).map(|x| x == "true" || x == &Value::Bool(true))
            });
        let mut seen: HashSet<Key> = HashSet::new();
        for inc in arr(compose, "include") {
            for it in self.include_items(inc, depth, used)? {
                if !inactive_ok && it.concept.inactive {
                    continue;
                }
                let v = if versions_match == Some(true) {
                    None
                } else {
                    it.version.clone()
                };
                if seen.insert((it.system.clone(), v, it.concept.code.clone())) {
                    items.push(it);
                }
            }
        }
        // An excluded (system, version, code) removes that version's entry when the expansion
        // has it, otherwise the code in every version (an exclude without a version always
        // removes every version) — unless the value set says versionsMatch=false: then the
        // versions of a system are distinct code systems and an exclude of another version
        // removes nothing.
        let mut cross_version = false;
        let mut excluded: HashSet<Key> = HashSet::new();
        for exc in arr(compose, "exclude") {
            let any_version = s(exc, "version").is_none();
            for it in self.include_items(exc, depth, used)? {
                let v = if any_version { None } else { it.version };
                excluded.insert((it.system, v, it.concept.code));
            }
        }
        if !excluded.is_empty() {
            let present: HashSet<Key> = items
                .iter()
                .map(|i| (i.system.clone(), i.version.clone(), i.concept.code.clone()))
                .collect();
            let mut remove_all: HashSet<(String, String)> = HashSet::new();
            let mut remove_one: HashSet<Key> = HashSet::new();
            for k in excluded {
                if k.1.is_some() && (present.contains(&k) || versions_match == Some(false)) {
                    remove_one.insert(k);
                } else {
                    cross_version |= k.1.is_some();
                    remove_all.insert((k.0, k.2));
                }
            }
            items.retain(|i| {
                !remove_all.contains(&(i.system.clone(), i.concept.code.clone()))
                    && !remove_one.contains(&(
                        i.system.clone(),
                        i.version.clone(),
                        i.concept.code.clone(),
                    ))
            });
        }
        // reported when codes were matched across versions (merged includes, or an exclude
        // of one version applied to another)
        if versions_match == Some(true) || (cross_version && versions_match.is_none()) {
            used.echo
                .push(json!({"name": "versionsMatch", "valueBoolean": true}));
        }
        Ok(items)
    }

    fn include_items(
        &self,
        inc: &Value,
        depth: usize,
        used: &mut Used,
    ) -> Result<Vec<Item>, TxError> {
        let mut vs_sets: Vec<HashSet<(String, String)>> = Vec::new();
        let mut vs_items: Option<Vec<Item>> = None;
        for v in arr(inc, "valueSet").iter().filter_map(Value::as_str) {
            let pinned = self.imported_vs_ref(v);
            let Some(sub) = self.find_vs(&pinned, None) else {
                if pinned != v {
                    let (url, version) = split_canonical(&pinned);
                    return Err(TxError::not_found(format!(
                        "The imported value set '{url}' version '{}' (pinned by the default-valueset-version parameter) could not be found",
                        version.unwrap_or_default()
                    )));
                }
                return Err(TxError::not_found(format!(
                    "A definition for the value Set '{v}' could not be found"
                )));
            };
            let canon = vs_canonical(&sub);
            if !v.starts_with('#') && !used.value_sets.contains(&canon) {
                used.value_sets.push(canon);
            }
            let items = self.expand_vs(&sub, depth + 1, used)?;
            vs_sets.push(
                items
                    .iter()
                    .map(|i| (i.system.clone(), i.concept.code.clone()))
                    .collect(),
            );
            if vs_items.is_none() {
                vs_items = Some(items);
            }
        }
        let in_all = |sys: &str, code: &str| {
            vs_sets
                .iter()
                .all(|set| set.contains(&(sys.to_string(), code.to_string())))
        };
        let Some(system) = s(inc, "system") else {
            return Ok(vs_items
                .unwrap_or_default()
                .into_iter()
                .filter(|i| in_all(&i.system, &i.concept.code))
                .collect());
        };
        let mut version = self.system_version(system, s(inc, "version"));
        // an include without a version takes its version from the parameters: reported in the
        // expansion when they decided it (system-version, or check-system-version acting as
        // the default when no system-version is given)
        if s(inc, "version").is_none()
            && self.param_version("force-system-version", system).is_none()
        {
            let check = self.param_version("check-system-version", system);
            let applied = if self.param_version("system-version", system).is_some() {
                Some("system-version")
            } else if let Some(chk) = &check {
                if self.find_cs(system, Some(chk)).is_some() {
                    version = Some(chk.clone());
                }
                Some("check-system-version")
            } else {
                None
            };
            if let Some(name) = applied {
                for prm in self.params.all(name) {
                    let Some(v) = value_x(prm).and_then(Value::as_str) else {
                        continue;
                    };
                    if split_canonical(v).0 == system {
                        let e = p_str(name, "Uri", v);
                        if !used.echo.contains(&e) {
                            used.echo.push(e);
                        }
                    }
                }
            }
        }
        let Some(entry) = self.find_cs(system, version.as_deref()) else {
            return Err(TxError::not_found(match &version {
                                Some(v) if self.find_cs(system, None).is_some() => format!(
                    "A definition for CodeSystem '{system}' version '{v}' could not be found, so the value set cannot be expanded. Valid versions: {}",
                    or_list(&self.versions_of(system))
                ),
                Some(v) => format!(
                    "A definition for CodeSystem '{system}' version '{v}' could not be found, so the value set cannot be expanded"
                ),
                None => format!(
                    "A definition for CodeSystem '{system}' could not be found, so the value set cannot be expanded"
                ),
            }));
        };
        if let Some(chk) = self.param_version("check-system-version", system) {
            if !version_matches(entry.version.as_deref(), &chk) {
                return Err(TxError::new(
                    422,
                    "exception",
                    "version-error",
                    format!(
                        "The version '{}' is not allowed for system '{system}': required to be '{chk}' by a version-check parameter",
                        entry.version.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        used.cs(entry.canonical());
        let provider = self.prov(&entry);
        let lang = self.display_language();
        let mut out = Vec::new();
        let cs_language = provider.language().map(str::to_string);
        let mk = |c: Concept, display: Option<String>| Item {
            system: system.to_string(),
            version: entry.version.clone(),
            display,
            concept: c,
            cs_language: cs_language.clone(),
            vs_extensions: Vec::new(),
        };
        let concepts = arr(inc, "concept");
        let filters = arr(inc, "filter");
        if !concepts.is_empty() {
            for c in concepts {
                let Some(code) = s(c, "code") else { continue };
                if !in_all(system, code) {
                    continue;
                }
                if let Some(mut concept) = provider.lookup(code) {
                    let display = s(c, "display").map(str::to_string).or_else(|| {
                        self.display_in(&concept, lang.as_deref(), provider.language())
                    });
                    for d in arr(c, "designation") {
                        if let Some(v) = s(d, "value") {
                            concept.designations.push(Designation {
                                language: s(d, "language").map(str::to_string),
                                value: v.to_string(),
                                ..Default::default()
                            });
                        }
                    }
                    let mut item = mk(concept, display);
                    item.vs_extensions = vs_concept_extensions(c);
                    out.push(item);
                }
            }
            return Ok(out);
        }
        let codes: Vec<String> = if !filters.is_empty() {
            let mut acc: Option<Vec<String>> = None;
            for f in filters {
                let (prop, op, val) = (
                    s(f, "property").unwrap_or_default(),
                    s(f, "op").unwrap_or_default(),
                    s(f, "value").unwrap_or_default(),
                );
                let r = provider
                    .filter(prop, op, val)
                    .map_err(|e| TxError::new(400, "invalid", "vs-invalid", e.0))?;
                acc = Some(match acc {
                    None => r,
                    Some(prev) => {
                        let set: HashSet<&String> = r.iter().collect();
                        prev.into_iter().filter(|c| set.contains(c)).collect()
                    }
                });
            }
            acc.unwrap_or_default()
        } else if let Some(f) = self
            .params
            .str("filter")
            .filter(|f| !f.trim().is_empty())
            .filter(|_| provider.size().unwrap_or(0) > LARGE_SYSTEM)
        {
            // a whole large system under `$expand?filter=`: the provider's text search (its
            // index) finds the matches instead of enumerating every code
            provider.search(f, usize::MAX)
        } else {
            match provider.codes() {
                Some(c) => c,
                None => {
                    return Err(TxError::new(
                        422,
                        "too-costly",
                        "",
                        format!("The code system '{system}' is not enumerable (grammar-based); the value set cannot be expanded"),
                    ))
                }
            }
        };
        // `$expand?filter=`: narrow large systems with the provider's own text search before
        // materialising concepts (the final ranking happens in expand)
        let mut codes = codes;
        if let Some(f) = self.params.str("filter").filter(|f| !f.trim().is_empty()) {
            if codes.len() > LARGE_SYSTEM && !filters.is_empty() {
                let hits: HashSet<String> = provider.search(f, usize::MAX).into_iter().collect();
                codes.retain(|c| hits.contains(c));
            }
        }
        for code in codes {
            if !in_all(system, &code) {
                continue;
            }
            if let Some(c) = provider.lookup(&code) {
                let d = self.display_in(&c, lang.as_deref(), provider.language());
                out.push(mk(c, d));
            }
        }
        Ok(out)
    }

    /// `$expand?filter=…&count=…` of a value set that is one whole large code system: the
    /// provider ranks every match (through its text index) and only the requested page is
    /// materialised. `None` when the value set is not of that shape.
    fn expand_large_filtered(
        &self,
        vs: &Value,
        used: &mut Used,
    ) -> Result<Option<(Vec<Item>, usize)>, TxError> {
        let p = &self.params;
        let (Some(f), Some(count)) = (
            p.str("filter").filter(|f| !f.trim().is_empty()),
            p.int("count"),
        ) else {
            return Ok(None);
        };
        let Some(compose) = vs.get("compose") else {
            return Ok(None);
        };
        let includes = arr(compose, "include");
        if includes.len() != 1
            || !arr(compose, "exclude").is_empty()
            || compose.get("inactive").is_some()
        {
            return Ok(None);
        }
        let inc = &includes[0];
        if inc
            .as_object()
            .map(|o| {
                o.keys()
                    .any(|k| k != "system" && k != "version" && k != "filter")
            })
            .unwrap_or(true)
        {
            return Ok(None);
        }
        // an include with filters (e.g. `?fhir_vs=isa/…`): when the provider can intersect its
        // text index with the filters itself (`search_page_filtered`)
        let mut filters: Vec<(&str, &str, &str)> = Vec::new();
        for f in arr(inc, "filter") {
            let (Some(prop), Some(op), Some(val)) = (s(f, "property"), s(f, "op"), s(f, "value"))
            else {
                return Ok(None);
            };
            filters.push((prop, op, val));
        }
        let Some(system) = s(inc, "system") else {
            return Ok(None);
        };
        let version = self.system_version(system, s(inc, "version"));
        let Some(entry) = self.find_cs(system, version.as_deref()) else {
            return Ok(None);
        };
        if self.param_version("check-system-version", system).is_some() {
            return Ok(None);
        }
        let provider = self.prov(&entry);
        if provider.size().unwrap_or(0) <= LARGE_SYSTEM {
            return Ok(None);
        }
        let offset = p.int("offset").unwrap_or(0).max(0) as usize;
        let active_only = p.bool("activeOnly") == Some(true);
        let (page, total) = if filters.is_empty() {
            provider.search_page(f, active_only, offset, count.max(0) as usize)
        } else {
            match provider.search_page_filtered(
                f,
                &filters,
                active_only,
                offset,
                count.max(0) as usize,
            ) {
                Some(r) => r,
                None => return Ok(None),
            }
        };
        used.cs(entry.canonical());
        let lang = self.display_language();
        let cs_language = provider.language().map(str::to_string);
        let items = page
            .iter()
            .filter_map(|code| provider.lookup(code))
            .map(|c| {
                let display = self.display_in(&c, lang.as_deref(), provider.language());
                Item {
                    system: system.to_string(),
                    version: entry.version.clone(),
                    display,
                    concept: c,
                    cs_language: cs_language.clone(),
                    vs_extensions: Vec::new(),
                }
            })
            .collect();
        Ok(Some((items, total)))
    }

    fn expand(&self) -> Result<Value, TxError> {
        let (vs, _canon) = self.resolve_vs_param()?;
        self.check_value_set(&vs)?;
        let mut used = Used::default();
        let p = &self.params;
        // one page of a filtered expansion of a large code system
        let paged = self.expand_large_filtered(&vs, &mut used)?;
        let (mut items, paged_total) = match paged {
            Some((items, total)) => (items, Some(total)),
            None => (self.expand_vs(&vs, 0, &mut used)?, None),
        };
        if p.bool("activeOnly") == Some(true) {
            items.retain(|i| !i.concept.inactive);
        }
        if let (Some(f), None) = (p.str("filter"), paged_total) {
            let matcher = TextMatcher::new(f);
            let mut scored: Vec<(u32, usize, Item)> = items
                .into_iter()
                .enumerate()
                .filter_map(|(n, i)| {
                    let mut texts: Vec<&str> = Vec::new();
                    if let Some(d) = &i.display {
                        texts.push(d);
                    }
                    for d in &i.concept.designations {
                        texts.push(&d.value);
                    }
                    let sc = matcher.score(&i.concept.code, texts.iter().copied());
                    (sc > 0).then_some((sc, n, i))
                })
                .collect();
            scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            items = scored.into_iter().map(|x| x.2).collect();
        }
        let total = paged_total.unwrap_or(items.len());
        let offset = p.int("offset").unwrap_or(0).max(0) as usize;
        let count = p.int("count").map(|c| c.max(0) as usize);
        if count.is_none() && total > MAX_EXPANSION {
            return Err(TxError::new(
                422,
                "too-costly",
                "",
                format!(
                    "The value set '{}' expansion has too many codes to display ({total} > {MAX_EXPANSION}); use count/offset or a filter",
                    s(&vs, "url").unwrap_or_default()
                ),
            ));
        }
        let page: Vec<&Item> = if paged_total.is_some() {
            items.iter().collect()
        } else {
            items
                .iter()
                .skip(offset)
                .take(count.unwrap_or(usize::MAX))
                .collect()
        };
        let designation_filters: Vec<String> = p
            .all("designation")
            .filter_map(value_x)
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        let include_designations =
            p.bool("includeDesignations") == Some(true) || !designation_filters.is_empty();
        let props: Vec<String> = p
            .all("property")
            .filter_map(value_x)
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        // code systems that define a `status` concept property: their concepts' status is
        // echoed in the expansion (as tx.fhir.org does)
        let status_systems: HashSet<String> = items
            .iter()
            .map(|i| i.system.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|sys| {
                self.find_cs(sys, None)
                    .map(|e| {
                        self.prov(&e)
                            .property_defs()
                            .iter()
                            .any(|d| d.code == "status")
                    })
                    .unwrap_or(false)
            })
            .collect();
        // contains.version only when the expansion mixes versions of one system, or used
        // several versions of it (e.g. one version excluded from another)
        let mut versions_by_system: HashMap<&str, HashSet<Option<&str>>> = HashMap::new();
        for i in &items {
            versions_by_system
                .entry(i.system.as_str())
                .or_default()
                .insert(i.version.as_deref());
        }
        for u in &used.code_systems {
            if let Some((sys, v)) = u.split_once('|') {
                versions_by_system.entry(sys).or_default().insert(Some(v));
            }
        }
        // ... or whose compose names several versions of it
        let mut named: HashMap<&str, HashSet<&str>> = HashMap::new();
        for inc in vs
            .get("compose")
            .map(|c| arr(c, "include"))
            .unwrap_or_default()
        {
            if let (Some(sys), Some(v)) = (s(inc, "system"), s(inc, "version")) {
                named.entry(sys).or_default().insert(v);
            }
        }
        for (sys, vs_named) in named {
            if vs_named.len() > 1 {
                versions_by_system
                    .entry(sys)
                    .or_default()
                    .extend(vs_named.into_iter().map(Some));
            }
        }
        let rendered: Vec<Map<String, Value>> = page
            .iter()
            .map(|i| {
                let mut c = Map::new();
                if !i.vs_extensions.is_empty() {
                    c.insert("extension".into(), json!(i.vs_extensions));
                }
                c.insert("system".into(), json!(i.system));
                if let Some(v) = &i.version {
                    if versions_by_system
                        .get(i.system.as_str())
                        .map(|s| s.len() > 1)
                        .unwrap_or(false)
                    {
                        c.insert("version".into(), json!(v));
                    }
                }
                if i.concept.not_selectable {
                    c.insert("abstract".into(), json!(true));
                }
                if i.concept.inactive {
                    c.insert("inactive".into(), json!(true));
                }
                c.insert("code".into(), json!(i.concept.code));
                if let Some(d) = &i.display {
                    c.insert("display".into(), json!(d));
                }
                if include_designations {
                    // designations other than the one shown as display; when the display was
                    // replaced by another language, the code system's own display becomes one
                    let mut list: Vec<Designation> = Vec::new();
                    if i.display != i.concept.display {
                        if let Some(orig) = &i.concept.display {
                            list.push(Designation {
                                language: i.cs_language.clone(),
                                use_system: Some(
                                    "http://terminology.hl7.org/CodeSystem/hl7TermMaintInfra"
                                        .into(),
                                ),
                                use_code: Some("preferredForLanguage".into()),
                                use_display: Some("Preferred For Language".into()),
                                value: orig.clone(),
                            });
                        }
                    }
                    // a designation repeating the display is redundant only when it is in
                    // the display's own language
                    let display_lang = if i.display == i.concept.display {
                        i.cs_language.clone()
                    } else {
                        i.concept
                            .designations
                            .iter()
                            .find(|d| Some(&d.value) == i.display.as_ref())
                            .and_then(|d| d.language.clone())
                    };
                    for d in &i.concept.designations {
                        let same_lang = match (&d.language, &display_lang) {
                            (None, _) | (_, None) => true,
                            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                        };
                        if Some(&d.value) != i.display.as_ref() || !same_lang {
                            list.push(d.clone());
                        }
                    }
                    list.retain(|d| designation_wanted(d, &designation_filters));
                    if !list.is_empty() {
                        c.insert(
                            "designation".into(),
                            Value::Array(list.iter().map(designation_json).collect()),
                        );
                    }
                }
                // requested properties (`definition` is the concept's definition), plus the
                // concept's `status` where its code system defines that property
                let mut pv: Vec<Value> = Vec::new();
                for n in &props {
                    if n == "definition" && !i.concept.properties.iter().any(|(k, _)| k == n) {
                        if let Some(d) = &i.concept.definition {
                            pv.push(json!({"code": "definition", "valueString": d}));
                        }
                        continue;
                    }
                    for (k, v) in &i.concept.properties {
                        if k == n {
                            let (kind, val) = v.to_fhir();
                            pv.push(json!({"code": n, kind: val}));
                        }
                    }
                }
                if !props.iter().any(|p| p == "status") && status_systems.contains(&i.system) {
                    for v in i
                        .concept
                        .property("status")
                        .filter(|v| v.as_text() != "active")
                    {
                        let (kind, val) = v.to_fhir();
                        pv.push(json!({"code": "status", kind: val}));
                    }
                }
                if !pv.is_empty() {
                    c.insert("property".into(), Value::Array(pv));
                }
                c
            })
            .collect();
        // the properties the page actually carries, in order of first use
        let mut used_props: Vec<String> = Vec::new();
        for c in &rendered {
            for pv in c
                .get("property")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(code) = pv.get("code").and_then(Value::as_str) {
                    if !used_props.iter().any(|u| u == code) {
                        used_props.push(code.to_string());
                    }
                }
            }
        }
        for p in &props {
            if !used_props.contains(p) {
                used_props.push(p.clone());
            }
        }
        // hierarchical (nested) contains unless excludeNested, paging or a text filter
        let enumerated = vs
            .get("compose")
            .map(|c| {
                arr(c, "include")
                    .iter()
                    .any(|i| !arr(i, "concept").is_empty())
            })
            .unwrap_or(false);
        // an imported value set's expansion is taken as it is (flat)
        let imports = vs
            .get("compose")
            .map(|c| {
                arr(c, "include")
                    .iter()
                    .any(|i| !arr(i, "valueSet").is_empty())
            })
            .unwrap_or(false);
        let nest = p.bool("excludeNested") != Some(true)
            && !enumerated
            && !imports
            && p.param("count").is_none()
            && p.param("offset").is_none()
            && p.param("filter").is_none();
        let contains: Vec<Value> = if nest {
            self.nest(&page, rendered)
        } else {
            rendered.into_iter().map(Value::Object).collect()
        };
        let mut parameters: Vec<Value> = Vec::new();
        for name in [
            "excludeNested",
            "includeDesignations",
            "displayLanguage",
            "activeOnly",
            "count",
            "offset",
            "filter",
            "designation",
            "force-system-version",
            "default-to-latest-version",
            "default-valueset-version",
        ] {
            for prm in p.all(name) {
                let mut x = prm.clone();
                if let Some(o) = x.as_object_mut() {
                    o.remove("part");
                    if let Some(v) = o.remove("valueCanonical") {
                        o.insert("valueUri".into(), v);
                    }
                }
                if !parameters.contains(&x) {
                    parameters.push(x);
                }
            }
        }
        for extra in self.vs_params.borrow().iter() {
            if !parameters.contains(extra) {
                parameters.push(extra.clone());
            }
        }
        for c in &used.code_systems {
            parameters.push(p_str("used-codesystem", "Uri", c));
        }
        for e in &used.echo {
            if !parameters.contains(e) {
                parameters.push(e.clone());
            }
        }
        for sup in self.used_supplements.borrow().iter() {
            parameters.push(p_str("used-supplement", "Uri", sup));
        }
        for v in &used.value_sets {
            parameters.push(p_str("used-valueset", "Uri", v));
        }
        // an expansion built on a fragment of a code system is not closed (valueset-unclosed)
        let mut unclosed: Vec<Value> = Vec::new();
        for c in &used.code_systems {
            if let Some(e) = self.find_cs(c, None) {
                if self.prov(&e).content() == "fragment" {
                    parameters.push(p_str("used-fragment", "Uri", c));
                    if unclosed.is_empty() {
                        unclosed.push(json!({"url": "http://hl7.org/fhir/StructureDefinition/valueset-unclosed", "valueBoolean": true}));
                    }
                    unclosed.push(json!({"url": "http://hl7.org/fhir/StructureDefinition/valueset-unclosed-reason",
                        "valueString": format!("This extension is based on a fragment of the code system {}", split_canonical(c).0)}));
                }
            }
            if let Some(r) = self.find_cs(c, None).and_then(|e| e.resource.clone()) {
                for f in resource_status_flags(&r) {
                    parameters.push(p_str(&format!("warning-{f}"), "Uri", c));
                }
            }
        }
        let mut vs_list: Vec<(String, Arc<Value>)> = vec![(vs_canonical(&vs), vs.clone())];
        for v in &used.value_sets {
            if let Some(x) = self.find_vs(v, None) {
                vs_list.push((v.clone(), x));
            }
        }
        for (canon, r) in vs_list {
            for f in vs_status_flags(&r) {
                parameters.push(p_str(&format!("warning-{f}"), "Uri", &canon));
            }
        }
        let mut expansion = Map::new();
        if !unclosed.is_empty() {
            expansion.insert("extension".into(), Value::Array(unclosed));
        }
        expansion.insert(
            "identifier".into(),
            json!(format!("urn:uuid:{}", pseudo_uuid())),
        );
        expansion.insert("timestamp".into(), json!(now_instant()));
        expansion.insert("total".into(), json!(total));
        if p.param("offset").is_some() {
            expansion.insert("offset".into(), json!(offset));
        }
        if !parameters.is_empty() {
            expansion.insert("parameter".into(), Value::Array(parameters));
        }
        if !used_props.is_empty() {
            let defs: Vec<crate::provider::PropertyDef> = used
                .code_systems
                .iter()
                .filter_map(|c| self.find_cs(c, None))
                .flat_map(|e| self.prov(&e).property_defs())
                .collect();
            let list = used_props
                .iter()
                .map(|p| {
                    match defs
                        .iter()
                        .find(|d| &d.code == p)
                        .and_then(|d| d.uri.clone())
                        .or_else(|| standard_property_uri(p))
                    {
                        Some(uri) => json!({"code": p, "uri": uri}),
                        None => json!({"code": p}),
                    }
                })
                .collect();
            expansion.insert("property".into(), Value::Array(list));
        }
        if !contains.is_empty() {
            expansion.insert("contains".into(), Value::Array(contains));
        }
        let mut out = Map::new();
        for k in [
            "resourceType",
            "id",
            "language",
            "extension",
            "url",
            "version",
            "name",
            "title",
            "status",
            "experimental",
            "date",
        ] {
            let Some(v) = vs.get(k) else { continue };
            if k == "extension" {
                // the value set's standards status is reported as a `warning-…` parameter
                let kept: Vec<Value> = arr(&vs, "extension")
                    .iter()
                    .filter(|e| {
                        s(e, "url")
                            != Some("http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status")
                    })
                    .cloned()
                    .collect();
                if !kept.is_empty() {
                    out.insert(k.into(), Value::Array(kept));
                }
                continue;
            }
            out.insert(k.into(), v.clone());
        }
        out.insert("expansion".into(), Value::Object(expansion));
        Ok(Value::Object(out))
    }

    /// Nests rendered `contains` entries under their nearest parent present in the expansion.
    fn nest(&self, page: &[&Item], rendered: Vec<Map<String, Value>>) -> Vec<Value> {
        let pos: HashMap<(&str, &str), usize> = page
            .iter()
            .enumerate()
            .map(|(n, i)| ((i.system.as_str(), i.concept.code.as_str()), n))
            .collect();
        let mut parent_of: Vec<Option<usize>> = vec![None; page.len()];
        type ProviderCache = HashMap<(String, Option<String>), Option<Arc<dyn CodeSystemProvider>>>;
        let mut providers: ProviderCache = HashMap::new();
        for (n, i) in page.iter().enumerate() {
            let prov = providers
                .entry((i.system.clone(), i.version.clone()))
                .or_insert_with(|| {
                    self.find_cs(&i.system, i.version.as_deref())
                        .map(|e| self.prov(&e))
                })
                .clone();
            if let Some(prov) = prov {
                parent_of[n] = prov
                    .parents(&i.concept.code)
                    .iter()
                    .filter_map(|p| pos.get(&(i.system.as_str(), p.as_str())).copied())
                    .find(|&p| p != n);
            }
        }
        // break cycles: a node whose parent chain returns to itself becomes a root
        for n in 0..page.len() {
            let mut seen = HashSet::new();
            let mut cur = parent_of[n];
            while let Some(c) = cur {
                if c == n || !seen.insert(c) {
                    parent_of[n] = None;
                    break;
                }
                cur = parent_of[c];
            }
        }
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); page.len()];
        let mut roots = Vec::new();
        for (n, p) in parent_of.iter().enumerate() {
            match p {
                Some(p) => children[*p].push(n),
                None => roots.push(n),
            }
        }
        let mut slots: Vec<Option<Map<String, Value>>> = rendered.into_iter().map(Some).collect();
        fn build(
            n: usize,
            children: &[Vec<usize>],
            slots: &mut Vec<Option<Map<String, Value>>>,
        ) -> Value {
            let mut m = slots[n].take().unwrap_or_default();
            if !children[n].is_empty() {
                let kids: Vec<Value> = children[n]
                    .iter()
                    .map(|&c| build(c, children, slots))
                    .collect();
                m.insert("contains".into(), Value::Array(kids));
            }
            Value::Object(m)
        }
        roots
            .into_iter()
            .map(|r| build(r, &children, &mut slots))
            .collect()
    }

    /// Structural checks before using a value set: filters must have a value, and value set
    /// references (include/exclude `valueSet`) must not be circular.
    fn check_value_set(&self, vs: &Value) -> Result<(), TxError> {
        if let Some(compose) = vs.get("compose") {
            for (kind, list) in [
                ("include", arr(compose, "include")),
                ("exclude", arr(compose, "exclude")),
            ] {
                for (i, inc) in list.iter().enumerate() {
                    for (j, f) in arr(inc, "filter").iter().enumerate() {
                        if s(f, "value").is_none() {
                            let text = format!(
                                "The system {} filter with property = {}, op = {} has no value",
                                s(inc, "system").unwrap_or(""),
                                s(f, "property").unwrap_or(""),
                                s(f, "op").unwrap_or("")
                            );
                            let loc = format!("ValueSet.compose.{kind}[{i}].filter[{j}]");
                            return Err(TxError {
                                status: 400,
                                issues: vec![Issue::error("invalid", text.clone()).at(loc.clone())],
                                outcome: json!({"resourceType": "OperationOutcome", "issue": [
                                    issue_json("error", "invalid", "vs-invalid", &text, Some(&loc))]}),
                            });
                        }
                    }
                }
            }
        }
        // cycle detection over valueSet references
        let root = vs_canonical(vs);
        let mut stack: Vec<(String, Vec<String>)> = vec![(root.clone(), vec![])];
        let mut expanded = HashSet::new();
        while let Some((canon, path)) = stack.pop() {
            let v = if canon == root {
                Some(Arc::new(vs.clone()))
            } else {
                self.find_vs(&canon, None)
            };
            let Some(v) = v else { continue };
            let Some(compose) = v.get("compose") else {
                continue;
            };
            for inc in arr(compose, "include")
                .iter()
                .chain(arr(compose, "exclude").iter())
            {
                for r in arr(inc, "valueSet").iter().filter_map(Value::as_str) {
                    let r = self.imported_vs_ref(r);
                    let r = r.as_str();
                    let next = self
                        .find_vs(r, None)
                        .map(|x| vs_canonical(&x))
                        .unwrap_or_else(|| r.to_string());
                    let mut p = path.clone();
                    p.push(next.clone());
                    if next == root || split_canonical(&next).0 == split_canonical(&root).0 {
                        let text = format!(
                            "Cyclic reference detected when expanding {root} via [{}]",
                            p.join(", ")
                        );
                        return Err(TxError {
                            status: 422,
                            issues: vec![Issue::error("processing", text.clone())],
                            outcome: json!({"resourceType": "OperationOutcome", "issue": [
                                issue_json("error", "processing", "vs-invalid", &text, None)]}),
                        });
                    }
                    if expanded.insert(next.clone()) {
                        stack.push((next, p));
                    }
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ membership

    /// Whether `(system, code)` is in the value set, without a full expansion.
    fn vs_contains(
        &self,
        vs: &Value,
        system: &str,
        code: &str,
        depth: usize,
    ) -> Result<bool, TxError> {
        if depth > 20 {
            return Ok(false);
        }
        let Some(compose) = vs.get("compose") else {
            let items = self.expand_vs(vs, depth, &mut Used::default())?;
            return Ok(items
                .iter()
                .any(|i| i.system == system && i.concept.code == code));
        };
        let mut inc_any = false;
        for inc in arr(compose, "include") {
            if self.include_matches(inc, system, code, depth)? {
                inc_any = true;
                break;
            }
        }
        if !inc_any {
            return Ok(false);
        }
        for exc in arr(compose, "exclude") {
            if self.include_matches(exc, system, code, depth)? {
                return Ok(false);
            }
        }
        if compose.get("inactive").and_then(Value::as_bool) == Some(false) {
            if let Some(e) = self.find_cs(system, None) {
                if self
                    .prov(&e)
                    .lookup(code)
                    .map(|c| c.inactive)
                    .unwrap_or(false)
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn include_matches(
        &self,
        inc: &Value,
        system: &str,
        code: &str,
        depth: usize,
    ) -> Result<bool, TxError> {
        if let Some(sys) = s(inc, "system") {
            if sys != system {
                return Ok(false);
            }
        }
        for v in arr(inc, "valueSet").iter().filter_map(Value::as_str) {
            let v = self.imported_vs_ref(v);
            let v = v.as_str();
            let Some(sub) = self.find_vs(v, None) else {
                return Err(TxError::not_found(format!(
                    "A definition for the value Set '{v}' could not be found"
                )));
            };
            if !self.vs_contains(&sub, system, code, depth + 1)? {
                return Ok(false);
            }
        }
        let Some(sys) = s(inc, "system") else {
            return Ok(!arr(inc, "valueSet").is_empty());
        };
        let version = self.system_version(sys, s(inc, "version"));
        let Some(entry) = self.find_cs(sys, version.as_deref()) else {
            return Ok(false);
        };
        let provider = self.prov(&entry);
        let concepts = arr(inc, "concept");
        if !concepts.is_empty() {
            let cs = provider.case_sensitive();
            return Ok(concepts.iter().filter_map(|c| s(c, "code")).any(|c| {
                if cs {
                    c == code
                } else {
                    c.eq_ignore_ascii_case(code)
                }
            }));
        }
        if provider.lookup(code).is_none() {
            return Ok(false);
        }
        for f in arr(inc, "filter") {
            let ok = provider
                .filter_matches(
                    code,
                    s(f, "property").unwrap_or_default(),
                    s(f, "op").unwrap_or_default(),
                    s(f, "value").unwrap_or_default(),
                )
                .map_err(|e| TxError::new(400, "invalid", "vs-invalid", e.0))?;
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    // ------------------------------------------------------------ validate-code

    fn codings_in(
        &self,
        vs_mode: bool,
    ) -> Result<(Vec<CodingIn>, Option<Value>, &'static str), TxError> {
        let p = &self.params;
        if let Some(cc) = p.value("codeableConcept") {
            let list = arr(cc, "coding")
                .iter()
                .enumerate()
                .map(|(i, c)| CodingIn {
                    system: s(c, "system").map(str::to_string),
                    version: s(c, "version").map(str::to_string),
                    code: s(c, "code").unwrap_or_default().to_string(),
                    display: s(c, "display").map(str::to_string),
                    loc_code: format!("CodeableConcept.coding[{i}].code"),
                    loc_display: format!("CodeableConcept.coding[{i}].display"),
                    loc_system: format!("CodeableConcept.coding[{i}].system"),
                    loc_version: format!("CodeableConcept.coding[{i}].version"),
                    loc_base: format!("CodeableConcept.coding[{i}]"),
                })
                .collect();
            return Ok((list, Some(cc.clone()), "cc"));
        }
        if let Some(c) = p.value("coding") {
            return Ok((
                vec![CodingIn {
                    system: s(c, "system").map(str::to_string),
                    version: s(c, "version").map(str::to_string),
                    code: s(c, "code").unwrap_or_default().to_string(),
                    display: s(c, "display").map(str::to_string),
                    loc_code: "Coding.code".into(),
                    loc_display: "Coding.display".into(),
                    loc_system: "Coding.system".into(),
                    loc_version: "Coding.version".into(),
                    loc_base: "Coding".into(),
                }],
                None,
                "coding",
            ));
        }
        let Some(code) = p.str("code") else {
            return Err(TxError::new(
                400,
                "invalid",
                "",
                "Unable to find code to validate (looked for coding | codeableConcept | code+system | code+inferSystem in parameters",
            ));
        };
        let system = if vs_mode {
            p.str("system")
        } else {
            p.str("url").or_else(|| p.str("system"))
        };
        let version = if vs_mode {
            p.str("systemVersion")
                .or_else(|| p.str("system-version").filter(|v| !v.contains('|')))
        } else {
            p.str("version")
        };
        Ok((
            vec![CodingIn {
                system: system.map(str::to_string),
                version: version.map(str::to_string),
                code: code.to_string(),
                display: p.str("display").map(str::to_string),
                loc_code: "code".into(),
                loc_display: "display".into(),
                loc_system: "system".into(),
                loc_version: "version".into(),
                loc_base: "code".into(),
            }],
            None,
            "code",
        ))
    }

    fn validate_one(
        &self,
        c: &CodingIn,
        vs: Option<(&Value, &str)>,
        in_cc: bool,
    ) -> Result<CodingResult, TxError> {
        let mut r = CodingResult {
            valid: true,
            issues: Vec::new(),
            messages: Vec::new(),
            code: Some(c.code.clone()),
            system: c.system.clone(),
            version: None,
            display: None,
            inactive: false,
            unknown_system: None,
            not_in_vs: false,
            pin_missing: false,
            status: None,
            unknown_system_param: true,
            normalized_code: None,
        };
        // the value set's own language is the default display language of its validation
        let lang = self
            .display_language()
            .or_else(|| vs.and_then(|(v, _)| s(v, "language")).map(str::to_string));
        let inferred = match (&c.system, vs) {
            (None, Some((_, canon))) if c.loc_base != "code" => {
                r.valid = false;
                let m1 = format!(
                    "The provided code '#{}' was not found in the value set '{canon}'",
                    c.code
                );
                let m2 = "Coding has no system. A code with no system has no defined meaning, and it cannot be validated. A system should be provided".to_string();
                r.issues.push(issue_json(
                    "error",
                    "code-invalid",
                    "not-in-vs",
                    &m1,
                    Some(&c.loc_code),
                ));
                r.issues.push(issue_json(
                    "warning",
                    "invalid",
                    "invalid-data",
                    &m2,
                    Some(&c.loc_base),
                ));
                r.messages.push(m2);
                r.messages.push(m1);
                return Ok(r);
            }
            (None, Some((vsv, canon))) => {
                // infer the system from the value set's includes that know the code
                let systems: Vec<String> = vsv
                    .get("compose")
                    .map(|cmp| {
                        let mut v: Vec<String> = arr(cmp, "include")
                            .iter()
                            .filter_map(|i| s(i, "system").map(str::to_string))
                            .collect();
                        v.dedup();
                        v
                    })
                    .unwrap_or_default();
                let found: Vec<String> = systems
                    .iter()
                    .filter(|sys| {
                        self.find_cs(sys, None)
                            .map(|e| self.prov(&e).lookup(&c.code).is_some())
                            .unwrap_or(false)
                    })
                    .cloned()
                    .collect();
                if found.len() == 1 {
                    found.into_iter().next()
                } else {
                    r.valid = false;
                    r.system = None;
                    let m1 = format!(
                        "The provided code '#{}' was not found in the value set '{canon}'",
                        c.code
                    );
                    let why = if found.len() > 1 {
                        format!(
                            "value set expansion has multiple matches: [{}]",
                            found.join(", ")
                        )
                    } else {
                        format!(
                            "the code is in none of the code systems the value set includes: [{}]",
                            systems.join(", ")
                        )
                    };
                    let m2 = format!(
                        "The System URI could not be determined for the code '{}' in the ValueSet '{canon}': {why}",
                        c.code
                    );
                    r.issues.push(issue_json(
                        "error",
                        "code-invalid",
                        "not-in-vs",
                        &m1,
                        Some(&c.loc_code),
                    ));
                    r.issues.push(issue_json(
                        "error",
                        "not-found",
                        "cannot-infer",
                        &m2,
                        Some(&c.loc_code),
                    ));
                    r.messages.push(m2);
                    r.messages.push(m1);
                    return Ok(r);
                }
            }
            _ => None,
        };
        let Some(system) = c.system.clone().or(inferred) else {
            r.valid = false;
            let m = "Coding has no system. A code with no system has no defined meaning, and it cannot be validated. A system should be provided".to_string();
            r.issues.push(issue_json(
                "error",
                "invalid",
                "invalid-data",
                &m,
                Some(&c.loc_code),
            ));
            r.messages.push(m);
            return Ok(r);
        };
        r.system = Some(system.clone());
        let forced = self.param_version("force-system-version", &system);
        let check = self.param_version("check-system-version", &system);
        let default = self
            .param_version("system-version", &system)
            .or_else(|| check.clone());
        let entry = if self.find_cs(&system, None).is_none() {
            None
        } else if let Some((vsv, _)) = vs {
            match self.vs_mode_entry(
                c,
                &system,
                vsv,
                forced.as_deref(),
                default.as_deref(),
                &mut r,
            )? {
                Some(e) => Some(e),
                None => return Ok(r),
            }
        } else {
            let v = forced.clone().or(c.version.clone()).or(default.clone());
            self.find_cs(&system, v.as_deref())
        };
        let version = forced.clone().or(c.version.clone()).or(default.clone());
        if entry.is_none() {
            // a supplement is not a code system a code can be drawn from
            let sup = [&self.local, self.base]
                .into_iter()
                .flat_map(|reg| reg.supplements.iter())
                .find(|x| s(x, "url") == Some(system.as_str()));
            if let Some(sup) = sup {
                r.valid = false;
                let canon = match s(sup, "version") {
                    Some(v) => format!("{system}|{v}"),
                    None => system.clone(),
                };
                let m = format!(
                    "CodeSystem {canon} is a supplement, so can't be used as a value in {}",
                    c.loc_system
                );
                r.issues.push(issue_json(
                    "error",
                    "invalid",
                    "invalid-data",
                    &m,
                    Some(&c.loc_system),
                ));
                r.messages.push(m);
                return Ok(r);
            }
        }
        let Some(entry) = entry else {
            r.valid = false;
            let system_known = self.find_cs(&system, None).is_some();
            let m = match &version {
                Some(v) if system_known => format!(
                    "A definition for CodeSystem '{system}' version '{v}' could not be found, so the code cannot be validated. Valid versions: {}",
                    or_list(&self.versions_of(&system))
                ),
                Some(v) if vs.is_some() => format!(
                    "A definition for CodeSystem '{system}' version '{v}' could not be found, so the code cannot be validated. No versions of this code system are known"
                ),
                _ => format!(
                    "A definition for CodeSystem '{system}' could not be found, so the code cannot be validated"
                ),
            };
            if self.find_vs(&system, None).is_some() {
                let m =
                    format!("The Coding references a value set, not a code system ('{system}')");
                if let Some((_, canon)) = vs {
                    let n = format!(
                        "The provided code '{system}#{}' was not found in the value set '{canon}'",
                        c.code
                    );
                    r.issues.push(issue_json(
                        "error",
                        "code-invalid",
                        "not-in-vs",
                        &n,
                        Some(&c.loc_code),
                    ));
                }
                r.issues.push(issue_json(
                    "error",
                    "invalid",
                    "invalid-data",
                    &m,
                    Some(&c.loc_system),
                ));
                r.messages.push(m);
                if let Some((_, canon)) = vs {
                    r.messages.push(format!(
                        "The provided code '{system}#{}' was not found in the value set '{canon}'",
                        c.code
                    ));
                }
                r.unknown_system_param = false;
                return Ok(r);
            }
            let vs_mentions_system = vs
                .and_then(|(v, _)| v.get("compose"))
                .map(|cmp| {
                    arr(cmp, "include")
                        .iter()
                        .chain(arr(cmp, "exclude").iter())
                        .any(|i| s(i, "system") == Some(system.as_str()))
                })
                .unwrap_or(true);
            let mut deferred: Option<String> = None;
            if let (Some((_, canon)), false) = (vs, vs_mentions_system) {
                let shown_system = match &c.version {
                    Some(v) => format!("{system}|{v}"),
                    None => system.clone(),
                };
                let n = format!(
                    "The provided code '{shown_system}#{}' was not found in the value set '{canon}'",
                    c.code
                );
                let (sev, tx) = if in_cc {
                    ("information", "this-code-not-in-vs")
                } else {
                    ("error", "not-in-vs")
                };
                r.issues
                    .push(issue_json(sev, "code-invalid", tx, &n, Some(&c.loc_code)));
                r.not_in_vs = in_cc;
                // in a CodeableConcept this is information, summed up by the concept's message
                if !in_cc {
                    deferred = Some(n);
                }
            }
            // a system must be an absolute URI (a local reference names no code system)
            let absolute = system.contains(':');
            // tx.fhir.org words this without quotes when the value set does not use the system
            let m = if vs.is_some() && !vs_mentions_system && version.is_none() && absolute {
                format!(
                    "A definition for CodeSystem {system} could not be found, so the code cannot be validated"
                )
            } else {
                m
            };
            r.issues.push(issue_json(
                "error",
                "not-found",
                "not-found",
                &m,
                Some(&c.loc_system),
            ));
            r.messages.push(m);
            if !absolute {
                let m = format!(
                    "{} must be an absolute reference, not a local reference",
                    c.loc_system
                );
                r.issues.push(issue_json(
                    "error",
                    "invalid",
                    "invalid-data",
                    &m,
                    Some(&c.loc_system),
                ));
                r.messages.push(m);
            }
            r.messages.extend(deferred);
            // the version is named only when the system itself is known
            r.unknown_system = Some(match &version {
                Some(v) if system_known => format!("{system}|{v}"),
                _ => system.clone(),
            });
            r.unknown_system_param = vs_mentions_system;
            return Ok(r);
        };
        let provider = self.prov(&entry);
        r.version = entry.version.clone();
        if let Some(chk) = &check {
            if !version_matches(entry.version.as_deref(), chk) {
                r.valid = false;
                let m = format!(
                    "The version '{}' is not allowed for system '{system}': required to be '{chk}' by a version-check parameter",
                    entry.version.as_deref().unwrap_or("")
                );
                r.issues.push(issue_json(
                    "error",
                    "exception",
                    "version-error",
                    &m,
                    Some(&c.loc_version),
                ));
                r.messages.push(m);
            }
        }
        let concept = provider.lookup(&c.code);
        let mut not_in_vs_msg = None;
        if concept.is_none() && provider.content() == "fragment" {
            let m = format!(
                "Unknown Code '{}' in the CodeSystem '{system}' version '{}' - note that the code system is labeled as a fragment, so the code may be valid in some other fragment",
                c.code,
                entry.version.as_deref().unwrap_or("")
            );
            r.issues.push(issue_json(
                "warning",
                "code-invalid",
                "invalid-code",
                &m,
                Some(&c.loc_code),
            ));
            return Ok(r);
        }
        if let Some(found) = &concept {
            if found.code != c.code {
                let m = format!(
                    "The code '{}' differs from the correct code '{}' by case. Although the code system '{}' is case insensitive, implementers are strongly encouraged to use the correct case anyway",
                    c.code,
                    found.code,
                    entry.canonical()
                );
                r.issues.push(issue_json(
                    "information",
                    "business-rule",
                    "code-rule",
                    &m,
                    Some(&c.loc_code),
                ));
                r.normalized_code = Some(found.code.clone());
            }
        }
        let version_problem = r.unknown_system.is_some();
        if let (Some((vs, canon)), false) = (vs, version_problem) {
            let inactive_excluded = self.params.bool("activeOnly") == Some(true)
                && concept.as_ref().map(|x| x.inactive).unwrap_or(false);
            if concept.is_none()
                || inactive_excluded
                || !self.vs_contains(vs, &system, &c.code, 0)?
            {
                r.valid = false;
                r.not_in_vs = true;
                // the coding as given: `system|version#code ('display')`
                let shown_system = match &c.version {
                    Some(v) => format!("{system}|{v}"),
                    None => system.to_string(),
                };
                let shown_code = match &c.display {
                    Some(d) => format!("{}#{} ('{d}')", shown_system, c.code),
                    None => format!("{}#{}", shown_system, c.code),
                };
                let m = format!(
                    "The provided code '{shown_code}' was not found in the value set '{canon}'"
                );
                let (sev, tx) = if in_cc {
                    ("information", "this-code-not-in-vs")
                } else {
                    ("error", "not-in-vs")
                };
                r.issues
                    .push(issue_json(sev, "code-invalid", tx, &m, Some(&c.loc_code)));
                not_in_vs_msg = Some(m);
            }
        }
        let Some(concept) = concept else {
            r.valid = false;
            for i in r.issues.iter_mut() {
                let tx = i["details"]["coding"][0]["code"].as_str().unwrap_or("");
                if matches!(tx, "not-in-vs" | "this-code-not-in-vs") {
                    if let Some(o) = i.as_object_mut() {
                        o.remove("location");
                    }
                }
            }
            let m = match &entry.version {
                Some(v) => format!(
                    "Unknown code '{}' in the CodeSystem '{system}' version '{v}'",
                    c.code
                ),
                None => format!("Unknown code '{}' in the CodeSystem '{system}'", c.code),
            };
            r.issues.push(issue_json(
                "error",
                "code-invalid",
                "invalid-code",
                &m,
                Some(&c.loc_code),
            ));
            if let Some(n) = not_in_vs_msg {
                if !in_cc {
                    r.messages.push(n);
                }
            }
            r.messages.push(m);
            return Ok(r);
        };
        if let Some(n) = not_in_vs_msg {
            if !in_cc {
                r.messages.push(n);
            }
        }
        r.code = Some(if r.normalized_code.is_some() {
            c.code.clone()
        } else {
            concept.code.clone()
        });
        r.display = self.display_in(&concept, lang.as_deref(), provider.language());
        if concept.inactive {
            r.inactive = true;
        }
        let status = concept.property("status").next().map(|v| v.as_text());
        let mut excluded_inactive = false;
        if let (true, Some((vsv, _))) = (r.not_in_vs, vs) {
            let inactive_excluded = vsv
                .get("compose")
                .and_then(|c| c.get("inactive"))
                .and_then(Value::as_bool)
                == Some(false)
                || self.params.bool("activeOnly") == Some(true);
            if concept.inactive && inactive_excluded {
                // with activeOnly the inactive status is not reported a second time
                excluded_inactive = self.params.bool("activeOnly") == Some(true);
                let m = format!("The concept '{}' is valid but is not active", concept.code);
                r.issues.push(issue_json(
                    "error",
                    "business-rule",
                    "code-rule",
                    &m,
                    Some(&c.loc_code),
                ));
                r.messages.push(m);
            }
        }
        if let (false, Some((vsv, canon))) = (r.not_in_vs, vs) {
            if vs_marks_deprecated(vsv, &system, &concept.code) {
                let m = format!(
                    "The presence of the concept '{}' in the system '{system}' in the value set {canon} is marked with a status of deprecated and its use should be reviewed",
                    concept.code
                );
                r.issues.push(issue_json(
                    "warning",
                    "business-rule",
                    "code-comment",
                    &m,
                    Some(&c.loc_code),
                ));
            }
        }
        if concept.not_selectable && self.params.bool("abstract") == Some(false) {
            r.valid = false;
            let m = format!(
                "Code '{system}#{}' is abstract, and not allowed in this context",
                concept.code
            );
            r.issues.push(issue_json(
                "error",
                "business-rule",
                "code-rule",
                &m,
                Some(&c.loc_code),
            ));
            r.messages.push(m);
        }
        if concept.inactive && !excluded_inactive {
            let st = match status.as_deref() {
                Some(s) if s != "inactive" => format!("{s} and inactive"),
                _ => "inactive".to_string(),
            };
            let mut m = format!(
                "The concept '{}' has a status of {st} and its use should be reviewed",
                concept.code
            );
            // SNOMED CT historical associations: name the replacement
            if let Some(note) = crate::snomed::history_note(&concept) {
                m.push_str(&note);
            }
            r.issues.push(issue_json(
                "warning",
                "business-rule",
                "code-comment",
                &m,
                Some(&c.loc_base),
            ));
            r.messages.push(m);
            r.status = status.clone();
        } else if status.as_deref() == Some("deprecated") {
            let m = format!(
                "The concept '{}' is deprecated and its use should be reviewed",
                concept.code
            );
            r.issues.push(issue_json(
                "warning",
                "business-rule",
                "code-comment",
                &m,
                Some(&c.loc_base),
            ));
            r.messages.push(m);
            r.status = status.clone();
        }
        if let Some(d) = &c.display {
            let cs_lang = provider.language().map(str::to_string);
            // (display, language) candidates
            let mut cands: Vec<(String, Option<String>)> = Vec::new();
            if let Some(disp) = &concept.display {
                cands.push((disp.clone(), cs_lang.clone()));
            }
            // designations with a `use` but no language (e.g. a synonym kind) are not displays
            for des in concept
                .designations
                .iter()
                .filter(|d| d.language.is_some() || d.use_code.is_none())
            {
                if !cands
                    .iter()
                    .any(|(v, l)| v == &des.value && l == &des.language)
                {
                    cands.push((des.value.clone(), des.language.clone()));
                }
            }
            let same =
                |v: &str| v == d || (!provider.case_sensitive() && v.eq_ignore_ascii_case(d));
            // a display that differs only in whitespace is still wrong, but said so
            let ws_only = cands
                .iter()
                .any(|(v, _)| v != d && v.split_whitespace().eq(d.split_whitespace()));
            let req: Vec<String> = lang
                .as_deref()
                .map(requested_languages)
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l != "*" && l != "--")
                .collect();
            let in_lang: Vec<&(String, Option<String>)> = if req.is_empty() {
                cands.iter().collect()
            } else {
                cands
                    .iter()
                    .filter(|(_, l)| {
                        l.as_deref()
                            .map(|l| req.iter().any(|w| lang_matches(l, w)))
                            .unwrap_or(true)
                    })
                    .collect()
            };
            let lang_label = lang.clone().unwrap_or_else(|| "--".into());
            let ok_in_lang = in_lang.iter().any(|(v, _)| same(v));
            let ok_any = cands.iter().any(|(v, _)| same(v));
            if ok_in_lang || cands.is_empty() {
                // fine
            } else if !req.is_empty() && in_lang.is_empty() && ok_any {
                let m = format!(
                    "There are no valid display names found for the code {system}#{} for language(s) '{lang_label}'. The display is '{d}' which is a valid display for the default language",
                    c.code
                );
                r.issues.push(issue_json(
                    "information",
                    "invalid",
                    "invalid-display",
                    &m,
                    Some(&c.loc_display),
                ));
                r.messages.push(m);
            } else {
                let detail = if !req.is_empty() && in_lang.is_empty() {
                    format!(
                        "There are no valid display names found for language(s) '{lang_label}'. Default display is '{}'",
                        concept.display.clone().unwrap_or_default()
                    )
                } else {
                    let shown: Vec<String> = in_lang
                        .iter()
                        .map(|(v, l)| match l {
                            Some(l) => format!("'{v}' ({l})"),
                            None => format!("'{v}'"),
                        })
                        .collect();
                    if shown.len() == 1 {
                        format!(
                            "Valid display is {} (for the language(s) '{lang_label}')",
                            shown[0]
                        )
                    } else {
                        format!(
                            "Valid display is one of {} choices: {} (for the language(s) '{lang_label}')",
                            shown.len(),
                            or_list(&shown)
                        )
                    }
                };
                let m = if ws_only {
                    format!(
                        "Wrong whitespace in Display Name '{d}' for {system}#{}. {detail}",
                        c.code
                    )
                } else {
                    format!("Wrong Display Name '{d}' for {system}#{}. {detail}", c.code)
                };
                let lenient = self.params.bool("lenient-display-validation") == Some(true);
                let sev = if lenient { "warning" } else { "error" };
                r.issues.push(issue_json(
                    sev,
                    "invalid",
                    "invalid-display",
                    &m,
                    Some(&c.loc_display),
                ));
                if !lenient {
                    r.valid = false;
                }
                r.messages.push(m);
            }
        }
        Ok(r)
    }

    /// The version given for `system` by a `system-version`-style parameter (`url|version`).
    fn param_version(&self, name: &str, system: &str) -> Option<String> {
        self.params
            .all(name)
            .filter_map(value_x)
            .filter_map(Value::as_str)
            .find_map(|v| {
                let (u, ver) = split_canonical(v);
                (u == system).then(|| ver.map(str::to_string)).flatten()
            })
    }

    /// Chooses the code system version for ValueSet validation (value set pin, coding version,
    /// force/default parameters) and records version mismatches. `Ok(None)`: `r` is final.
    fn vs_mode_entry(
        &self,
        c: &CodingIn,
        system: &str,
        vs: &Value,
        forced: Option<&str>,
        default: Option<&str>,
        r: &mut CodingResult,
    ) -> Result<Option<Arc<CsEntry>>, TxError> {
        // the version the value set pins; with several pinned versions of the system, the one
        // the coding names, else the latest pinned version that knows the code
        let mut pins: Vec<String> = vs
            .get("compose")
            .map(|cmp| {
                arr(cmp, "include")
                    .iter()
                    .filter(|i| s(i, "system") == Some(system))
                    .filter_map(|i| s(i, "version").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        pins.sort_by_key(|v| std::cmp::Reverse(version_key(v)));
        pins.dedup();
        let pin = if pins.len() > 1 {
            match &c.version {
                Some(cv) => pins
                    .iter()
                    .find(|p| version_matches(Some(cv), p) || *p == cv)
                    .cloned()
                    .or_else(|| pins.first().cloned()),
                // a version whose display for the code is the one given, else any that
                // knows the code
                None => {
                    let knows = |p: &String, display: Option<&str>| {
                        self.find_cs(system, Some(p))
                            .and_then(|e| self.prov(&e).lookup(&c.code))
                            .map(|concept| match display {
                                None => true,
                                Some(d) => {
                                    concept.display.as_deref() == Some(d)
                                        || concept.designations.iter().any(|x| x.value == d)
                                }
                            })
                            .unwrap_or(false)
                    };
                    c.display
                        .as_deref()
                        .and_then(|d| pins.iter().find(|p| knows(p, Some(d))))
                        .or_else(|| pins.iter().find(|p| knows(p, None)))
                        .cloned()
                        .or_else(|| pins.first().cloned())
                }
            }
        } else {
            pins.into_iter().next()
        };
        let mut pin_missing: Option<String> = None;
        let vs_entry = if let Some(f) = forced {
            self.find_cs(system, Some(f))
        } else if let Some(p) = &pin {
            let e = self.find_cs(system, Some(p));
            if e.is_none() {
                pin_missing = Some(p.clone());
            }
            e
        } else if c.version.is_none() && default.is_some() {
            self.find_cs(system, default)
        } else {
            self.find_cs(system, None)
        };
        let not_found = |v: &str| {
            format!(
                "A definition for CodeSystem '{system}' version '{v}' could not be found, so the code cannot be validated. Valid versions: {}",
                or_list(&self.versions_of(system))
            )
        };
        let mismatch = |vsv: &str, cv: &str, versionless: bool| {
            format!(
                "The code system '{system}' version '{vsv}'{} in the ValueSet include is different to the one in the value ('{cv}')",
                if versionless { " for the versionless include" } else { "" }
            )
        };
        let fallback = || {
            default
                .and_then(|d| self.find_cs(system, Some(d)))
                .or_else(|| self.find_cs(system, None))
        };
        // the coding names a version that does not exist: report it, and the version the value
        // set (or a parameter) resolves to instead
        if let (Some(cv), Some(_)) = (&c.version, forced) {
            if self.find_cs(system, Some(cv)).is_none() {
                r.valid = false;
                let m = not_found(cv);
                r.issues.push(issue_json(
                    "error",
                    "not-found",
                    "not-found",
                    &m,
                    Some(&c.loc_system),
                ));
                r.messages.push(m);
                r.unknown_system = Some(format!("{system}|{cv}"));
                let m = format!(
                    "The code system '{system}' version '{}' resulting from the version '{}' in the ValueSet include is different to the one in the value ('{cv}')",
                    forced.unwrap_or(""),
                    pin.as_deref().unwrap_or("")
                );
                r.issues.push(issue_json(
                    "error",
                    "invalid",
                    "vs-invalid",
                    &m,
                    Some(&c.loc_version),
                ));
                r.messages.push(m);
                if let Some(e) = &vs_entry {
                    r.version = e.version.clone();
                    if let Some(concept) = self.prov(e).lookup(&c.code) {
                        r.display = self.display_for(&concept, self.display_language().as_deref());
                    }
                }
                return Ok(None);
            }
        }
        if let (Some(cv), None) = (&c.version, forced) {
            match self.find_cs(system, Some(cv)) {
                None => {
                    r.valid = false;
                    let m = not_found(cv);
                    r.issues.push(issue_json(
                        "error",
                        "not-found",
                        "not-found",
                        &m,
                        Some(&c.loc_system),
                    ));
                    r.messages.push(m);
                    r.unknown_system = Some(format!("{system}|{cv}"));
                    let rep = if pin.is_some() {
                        vs_entry.clone()
                    } else {
                        fallback()
                    };
                    if let Some(e) = &rep {
                        let m = match (pin.is_none(), default) {
                            (true, Some(d)) => format!(
                                "The code system '{system}' version '{d}' resulting from the version '' in the ValueSet include is different to the one in the value ('{cv}')"
                            ),
                            _ => mismatch(e.version.as_deref().unwrap_or(""), cv, pin.is_none()),
                        };
                        let sev = if pin.is_none() && default.is_none() {
                            "warning"
                        } else {
                            "error"
                        };
                        r.issues.push(issue_json(
                            sev,
                            "invalid",
                            "vs-invalid",
                            &m,
                            Some(&c.loc_version),
                        ));
                        if sev == "error" {
                            r.messages.push(m);
                        }
                        r.version = e.version.clone();
                        if let Some(concept) = self.prov(e).lookup(&c.code) {
                            r.display =
                                self.display_for(&concept, self.display_language().as_deref());
                        }
                    }
                    Ok(None)
                }
                Some(ce) => {
                    if let Some(p) = pin_missing {
                        r.valid = false;
                        let m1 = mismatch(&p, cv, false);
                        r.issues.push(issue_json(
                            "error",
                            "invalid",
                            "vs-invalid",
                            &m1,
                            Some(&c.loc_version),
                        ));
                        let m2 = not_found(&p);
                        r.issues.push(issue_json(
                            "error",
                            "not-found",
                            "not-found",
                            &m2,
                            Some(&c.loc_system),
                        ));
                        r.messages.push(m2);
                        r.messages.push(m1);
                        r.unknown_system = Some(format!("{system}|{p}"));
                        r.pin_missing = true;
                        return Ok(Some(ce));
                    }
                    if let Some(p) = &pin {
                        if version_matches(ce.version.as_deref(), p) {
                            return Ok(Some(ce));
                        }
                    }
                    match vs_entry {
                        Some(ve) if ve.version != ce.version => {
                            r.valid = false;
                            let m = mismatch(ve.version.as_deref().unwrap_or(""), cv, false);
                            r.issues.push(issue_json(
                                "error",
                                "invalid",
                                "vs-invalid",
                                &m,
                                Some(&c.loc_version),
                            ));
                            r.messages.push(m);
                            Ok(Some(ve))
                        }
                        _ => Ok(Some(ce)),
                    }
                }
            }
        } else {
            if let Some(p) = pin_missing {
                r.valid = false;
                let m = not_found(&p);
                r.issues.push(issue_json(
                    "error",
                    "not-found",
                    "not-found",
                    &m,
                    Some(&c.loc_system),
                ));
                r.messages.push(m);
                r.unknown_system = Some(format!("{system}|{p}"));
                r.pin_missing = true;
                return Ok(fallback());
            }
            Ok(vs_entry)
        }
    }

    fn versions_of(&self, url: &str) -> Vec<String> {
        let mut v: Vec<String> = [&self.local, self.base]
            .iter()
            .filter_map(|r| r.cs.get(url))
            .flatten()
            .filter_map(|e| e.version.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn validate(&self, vs_mode: bool) -> Result<Value, TxError> {
        let vs = if vs_mode {
            let v = self.resolve_vs_param()?;
            self.check_value_set(&v.0)?;
            Some(v)
        } else {
            None
        };
        let (codings, cc, kind) = self.codings_in(vs_mode)?;
        let in_cc = kind == "cc";
        let vs_ref = vs.as_ref().map(|(v, c)| (v.as_ref(), c.as_str()));
        let mut results = Vec::new();
        for c in &codings {
            match self.validate_one(c, vs_ref, in_cc) {
                Ok(r) => results.push(r),
                Err(e) if e.status == 404 => {
                    // e.g. an imported value set that cannot be resolved
                    let issues: Vec<Value> = arr(&e.outcome, "issue").to_vec();
                    let msg: Vec<String> = e.issues.iter().map(|i| i.diagnostics.clone()).collect();
                    let mut out = vec![p_bool("result", false)];
                    if !msg.is_empty() {
                        out.push(p_str("message", "String", &msg.join("; ")));
                    }
                    out.push(json!({"name": "issues", "resource": {"resourceType": "OperationOutcome", "issue": issues}}));
                    return Ok(json!({"resourceType": "Parameters", "parameter": out}));
                }
                Err(e) => return Err(e),
            }
        }
        let mut out: Vec<Value> = Vec::new();
        let best = results.iter().position(|r| r.valid);
        let mut issues: Vec<Value> = Vec::new();
        let mut messages: Vec<String> = Vec::new();
        let any_error = results
            .iter()
            .flat_map(|r| r.issues.iter())
            .any(|i| i["severity"] == "error");
        let result = best.is_some() && !(in_cc && any_error);
        if in_cc {
            // unknown code systems are reported first
            if best.is_none() {
                for r in results.iter().filter(|r| r.unknown_system.is_some()) {
                    messages.extend(r.messages.iter().cloned());
                }
            }
            if best.is_none() && results.iter().any(|r| r.not_in_vs) {
                if let Some((_, canon)) = &vs {
                    let m = format!("No valid coding was found for the value set '{canon}'");
                    issues.push(issue_json("error", "code-invalid", "not-in-vs", &m, None));
                    messages.push(m);
                }
            }
            for r in &results {
                issues.extend(r.issues.iter().cloned());
                let reported = best.is_none() && r.unknown_system.is_some();
                if (!r.valid || best.is_none()) && !reported {
                    messages.extend(r.messages.iter().cloned());
                }
            }
        } else {
            for r in &results {
                issues.extend(r.issues.iter().cloned());
                messages.extend(r.messages.iter().cloned());
            }
        }
        let shown = best.map(|i| &results[i]).or_else(|| {
            if in_cc {
                results
                    .iter()
                    .find(|r| r.display.is_some() && !r.pin_missing)
            } else {
                results.first()
            }
        });
        if let Some(r) = shown {
            if let Some(c) = &r.code {
                out.push(p_str("code", "Code", c));
            }
            if let Some(sys) = &r.system {
                out.push(p_str("system", "Uri", sys));
            }
            if let Some(v) = &r.version {
                out.push(p_str("version", "String", v));
            }
            if let Some(d) = &r.display {
                out.push(p_str("display", "String", d));
            }
            if r.inactive {
                out.push(p_bool("inactive", true));
            }
            if let Some(st) = &r.status {
                out.push(p_str("status", "Code", st));
            }
            if let Some(n) = &r.normalized_code {
                out.push(p_str("normalized-code", "Code", n));
            }
        }
        for r in &results {
            if let (Some(u), false, false) =
                (&r.unknown_system, r.unknown_system_param, r.pin_missing)
            {
                if r.issues.iter().any(|i| {
                    matches!(
                        i["details"]["coding"][0]["code"].as_str(),
                        Some("not-in-vs" | "this-code-not-in-vs")
                    )
                }) {
                    out.push(p_str("x-unknown-system", "Canonical", u));
                }
            }
            if let (Some(u), true) = (&r.unknown_system, r.unknown_system_param) {
                out.push(p_str("x-caused-by-unknown-system", "Canonical", u));
            }
        }
        if let Some(cc) = cc {
            out.push(json!({"name": "codeableConcept", "valueCodeableConcept": cc}));
        }
        out.push(p_bool("result", result));
        if !messages.is_empty() {
            out.push(p_str("message", "String", &messages.join("; ")));
        }
        // status of the code systems and value set referenced
        let mut seen_cs = HashSet::new();
        for r in &results {
            if let (Some(sys), None) = (&r.system, &r.unknown_system) {
                if let Some(e) = self.find_cs(sys, r.version.as_deref()) {
                    if let Some(res) = &e.resource {
                        if seen_cs.insert(e.canonical()) {
                            for f in resource_status_flags(res) {
                                let m = format!("Reference to {f} CodeSystem {}", e.canonical());
                                issues.push(issue_json(
                                    "information",
                                    "business-rule",
                                    "status-check",
                                    &m,
                                    None,
                                ));
                            }
                        }
                    }
                }
            }
        }
        if let Some((v, canon)) = &vs {
            // the value set and the value sets it imports
            let mut list: Vec<(String, Arc<Value>)> = vec![(canon.clone(), v.clone())];
            self.imported_value_sets(v, 0, &mut list);
            for (canon, v) in &list {
                for f in vs_status_flags(v) {
                    let m = format!("Reference to {f} ValueSet {canon}");
                    issues.push(issue_json(
                        "information",
                        "business-rule",
                        "status-check",
                        &m,
                        None,
                    ));
                }
            }
        }
        if !issues.is_empty() {
            out.push(json!({"name": "issues", "resource": {"resourceType": "OperationOutcome", "issue": issues}}));
        }
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    }

    /// The value sets `vs` imports (`compose.include.valueSet`), transitively, with their
    /// canonical `url|version`; each once.
    fn imported_value_sets(&self, vs: &Value, depth: usize, out: &mut Vec<(String, Arc<Value>)>) {
        if depth > 20 {
            return;
        }
        let Some(compose) = vs.get("compose") else {
            return;
        };
        for inc in arr(compose, "include") {
            for url in arr(inc, "valueSet").iter().filter_map(Value::as_str) {
                let Some(v) = self.find_vs(url, None) else {
                    continue;
                };
                let canon = vs_canonical(&v);
                if out.iter().any(|(c, _)| *c == canon) {
                    continue;
                }
                out.push((canon, v.clone()));
                self.imported_value_sets(&v, depth + 1, out);
            }
        }
    }

    // ------------------------------------------------------------ lookup / subsumes

    fn coding_param(
        &self,
        code_name: &str,
        coding_name: &str,
    ) -> Option<(Option<String>, Option<String>, String)> {
        if let Some(c) = self.params.value(coding_name) {
            return Some((
                s(c, "system").map(str::to_string),
                s(c, "version").map(str::to_string),
                s(c, "code")?.to_string(),
            ));
        }
        let code = self.params.str(code_name)?;
        Some((
            self.params.str("system").map(str::to_string),
            self.params.str("version").map(str::to_string),
            code.to_string(),
        ))
    }

    fn lookup(&self) -> Result<Value, TxError> {
        self.check_supplements()?;
        let Some((system, version, code)) = self.coding_param("code", "coding") else {
            return Err(TxError::invalid(
                "Unable to lookup: no code or coding parameter",
            ));
        };
        let Some(system) = system else {
            return Err(TxError::invalid("Unable to lookup: no system parameter"));
        };
        let entry = self.find_cs(&system, version.as_deref()).ok_or_else(|| {
            TxError::not_found(match &version {
                Some(v) => format!("A definition for CodeSystem '{system}' version '{v}' could not be found, so the code cannot be looked up"),
                None => format!("A definition for CodeSystem '{system}' could not be found, so the code cannot be looked up"),
            })
        })?;
        let provider = self.prov(&entry);
        let Some(c) = provider.lookup(&code) else {
            return Err(TxError::new(
                404,
                "not-found",
                "invalid-code",
                match &entry.version {
                    Some(v) => {
                        format!("Unknown code '{code}' in the CodeSystem '{system}' version '{v}'")
                    }
                    None => format!("Unknown code '{code}' in the CodeSystem '{system}'"),
                },
            ));
        };
        let lang = self.display_language();
        let wanted: Vec<String> = self
            .params
            .all("property")
            .filter_map(value_x)
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        let want = |n: &str| wanted.is_empty() || wanted.iter().any(|w| w == n || w == "*");
        let mut out = vec![
            p_str("name", "String", provider.name().unwrap_or(&system)),
            p_str("system", "Uri", &system),
            p_str("code", "Code", &c.code),
        ];
        if let Some(v) = provider.version() {
            out.push(p_str("version", "String", v));
        }
        if let Some(d) = self.display_in(&c, lang.as_deref(), provider.language()) {
            out.push(p_str("display", "String", &d));
        }
        if let Some(d) = &c.definition {
            out.push(p_str("definition", "String", d));
        }
        out.push(p_bool("abstract", c.not_selectable));
        // the display itself is the preferred designation in the code system's language
        let mut designations = c.designations.clone();
        if let (Some(cs_lang), Some(disp)) = (provider.language(), &c.display) {
            if !designations
                .iter()
                .any(|d| &d.value == disp && d.language.as_deref() == Some(cs_lang))
            {
                designations.push(Designation {
                    language: Some(cs_lang.to_string()),
                    use_system: Some(
                        "http://terminology.hl7.org/CodeSystem/hl7TermMaintInfra".into(),
                    ),
                    use_code: Some("preferredForLanguage".into()),
                    use_display: Some("Preferred For Language".into()),
                    value: disp.clone(),
                });
            }
        }
        for d in &designations {
            let mut parts = Vec::new();
            if let Some(l) = &d.language {
                parts.push(p_str("language", "Code", l));
            }
            if d.use_code.is_some() {
                let mut u = Map::new();
                if let Some(s) = &d.use_system {
                    u.insert("system".into(), json!(s));
                }
                if let Some(s) = &d.use_code {
                    u.insert("code".into(), json!(s));
                }
                if let Some(s) = &d.use_display {
                    u.insert("display".into(), json!(s));
                }
                parts.push(json!({"name": "use", "valueCoding": u}));
            }
            parts.push(p_str("value", "String", &d.value));
            out.push(json!({"name": "designation", "part": parts}));
        }
        let prop = |code: &str, (k, v): (&'static str, Value), desc: Option<String>| {
            let mut parts = vec![p_str("code", "Code", code), json!({"name": "value", k: v})];
            if let Some(d) = desc {
                parts.push(p_str("description", "String", &d));
            }
            json!({"name": "property", "part": parts})
        };
        if want("parent") {
            for p in provider.parents(&c.code) {
                let d = provider.lookup(&p).and_then(|x| x.display);
                out.push(prop("parent", ("valueCode", json!(p)), d));
            }
        }
        if want("child") {
            for p in provider.children(&c.code) {
                let d = provider.lookup(&p).and_then(|x| x.display);
                out.push(prop("child", ("valueCode", json!(p)), d));
            }
        }
        if want("inactive") {
            out.push(prop("inactive", ("valueBoolean", json!(c.inactive)), None));
        }
        for (n, v) in &c.properties {
            if n == "parent" || n == "child" || n == "inactive" || !want(n) {
                continue;
            }
            out.push(prop(n, v.to_fhir(), None));
        }
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    }

    fn subsumes(&self) -> Result<Value, TxError> {
        let a = self.coding_param("codeA", "codingA");
        let b = self.coding_param("codeB", "codingB");
        let (Some((sa, va, ca)), Some((sb, _vb, cb))) = (a, b) else {
            return Err(TxError::invalid(
                "$subsumes needs codeA and codeB (or codingA and codingB)",
            ));
        };
        let system = sa
            .or(sb.clone())
            .ok_or_else(|| TxError::invalid("$subsumes needs a system"))?;
        if let Some(sb) = sb {
            if sb != system {
                return Err(TxError::invalid(format!(
                    "Unable to test subsumption across different code systems ({system} and {sb})"
                )));
            }
        }
        let entry = self.find_cs(&system, va.as_deref()).ok_or_else(|| {
            TxError::not_found(format!(
                "A definition for CodeSystem '{system}' could not be found"
            ))
        })?;
        let provider = self.prov(&entry);
        for c in [&ca, &cb] {
            if provider.lookup(c).is_none() {
                return Err(TxError::new(
                    404,
                    "not-found",
                    "invalid-code",
                    format!("Unknown code '{c}' in the CodeSystem '{system}'"),
                ));
            }
        }
        let outcome = provider
            .subsumes(&ca, &cb)
            .ok_or_else(|| TxError::invalid("Unable to determine subsumption"))?;
        Ok(
            json!({"resourceType": "Parameters", "parameter": [p_str("outcome", "Code", outcome.as_code())]}),
        )
    }

    // ------------------------------------------------------------ translate

    fn translate(&self) -> Result<Value, TxError> {
        let p = &self.params;
        let (mut system, mut code) = (
            p.str("system")
                .or_else(|| p.str("sourceSystem"))
                .map(str::to_string),
            p.str("code")
                .or_else(|| p.str("sourceCode"))
                .map(str::to_string),
        );
        if let Some(c) = p.value("coding").or_else(|| p.value("sourceCoding")) {
            system = s(c, "system").map(str::to_string);
            code = s(c, "code").map(str::to_string);
        }
        let mut reverse = p.bool("reverse") == Some(true);
        let target_code = p.str("targetCode").map(str::to_string);
        if code.is_none() {
            if let Some(tc) = target_code {
                code = Some(tc);
                reverse = true;
            }
        }
        let target_system = p
            .str("targetsystem")
            .or_else(|| p.str("targetSystem"))
            .map(str::to_string);
        if reverse && system.is_none() {
            system = target_system.clone();
        }
        let Some(code) = code else {
            return Err(TxError::invalid(
                "$translate needs a code, coding or codeableConcept",
            ));
        };
        // reverse: R4 gives the code's own system in `system`/`coding` and the wanted system in
        // `targetsystem`; R5 gives `targetCode` + `targetSystem` and the wanted `sourceSystem`.
        let r4_system = p.str("system").map(str::to_string).or_else(|| {
            p.value("coding")
                .and_then(|c| s(c, "system"))
                .map(str::to_string)
        });
        let (src_sys, tgt_sys) = if reverse {
            match r4_system {
                Some(sys) => (Some(sys), p.str("targetsystem").map(str::to_string)),
                None => (
                    p.str("targetSystem").map(str::to_string),
                    p.str("sourceSystem").map(str::to_string),
                ),
            }
        } else {
            (system.clone(), target_system.clone())
        };
        let maps: Vec<Arc<Value>> = if let Some(m) = p.resource("conceptMap") {
            vec![Arc::new(m.clone())]
        } else if let Some(url) = p.str("url") {
            let (u, v) = split_canonical(url);
            let found: Vec<Arc<Value>> = self
                .local
                .cm
                .iter()
                .chain(self.base.cm.iter())
                .filter(|m| {
                    s(m, "url") == Some(u) && v.map(|v| s(m, "version") == Some(v)).unwrap_or(true)
                })
                .cloned()
                .collect();
            if found.is_empty() {
                return Err(TxError::not_found(format!(
                    "A definition for the ConceptMap '{url}' could not be found"
                )));
            }
            found
        } else {
            self.local
                .cm
                .iter()
                .chain(self.base.cm.iter())
                .cloned()
                .collect()
        };
        let mut matches = Vec::new();
        for m in &maps {
            let origin = match s(m, "version") {
                Some(v) => format!("{}|{v}", s(m, "url").unwrap_or_default()),
                None => s(m, "url").unwrap_or_default().to_string(),
            };
            for g in arr(m, "group") {
                let gs = s(g, "source");
                let gt = s(g, "target");
                let (from, to) = if reverse { (gt, gs) } else { (gs, gt) };
                if let (Some(want), Some(have)) = (&src_sys, from) {
                    if want != split_canonical(have).0 {
                        continue;
                    }
                }
                if let (Some(want), Some(have)) = (&tgt_sys, to) {
                    if want != split_canonical(have).0 {
                        continue;
                    }
                }
                for el in arr(g, "element") {
                    for t in arr(el, "target") {
                        let (src_code, dst_code) = if reverse {
                            (s(t, "code"), s(el, "code"))
                        } else {
                            (s(el, "code"), s(t, "code"))
                        };
                        if src_code != Some(code.as_str()) {
                            continue;
                        }
                        let rel = s(t, "equivalence")
                            .or_else(|| s(t, "relationship"))
                            .unwrap_or("equivalent");
                        let equivalence = match rel {
                            "related-to" => "relatedto",
                            "source-is-narrower-than-target" => "wider",
                            "source-is-broader-than-target" => "narrower",
                            "not-related-to" => "unmatched",
                            x => x,
                        };
                        let mut parts = vec![p_str("equivalence", "Code", equivalence)];
                        if reverse {
                            // R5 style: `concept` is the given target code, `source` the mapped source code
                            if let Some(gt) = gt {
                                parts.push(json!({"name": "concept", "valueCoding": {"system": split_canonical(gt).0, "code": code}}));
                            }
                            if let (Some(gs), Some(dc)) = (gs, dst_code) {
                                parts.push(json!({"name": "source", "valueCoding": {"system": split_canonical(gs).0, "code": dc}}));
                            }
                        } else if let Some(dc) = dst_code {
                            let mut coding = Map::new();
                            if let Some(ts) = to {
                                coding.insert("system".into(), json!(split_canonical(ts).0));
                            }
                            coding.insert("code".into(), json!(dc));
                            let disp = if reverse {
                                s(el, "display")
                            } else {
                                s(t, "display")
                            };
                            if let Some(d) = disp {
                                coding.insert("display".into(), json!(d));
                            }
                            parts.push(json!({"name": "concept", "valueCoding": coding}));
                        }
                        parts.push(p_str("originMap", "Canonical", &origin));
                        if let Some(c) = s(t, "comment") {
                            parts.push(p_str("comment", "String", c));
                        }

                        matches.push(json!({"name": "match", "part": parts}));
                    }
                }
            }
        }
        let mut out = vec![p_bool("result", !matches.is_empty())];
        if matches.is_empty() {
            out.push(p_str(
                "message",
                "String",
                &format!(
                    "No translations found for code '{code}'{}",
                    system
                        .as_deref()
                        .map(|s| format!(" in system '{s}'"))
                        .unwrap_or_default()
                ),
            ));
        }
        out.extend(matches);
        Ok(json!({"resourceType": "Parameters", "parameter": out}))
    }
}

/// Status flags worth a warning for a referenced CodeSystem/ValueSet: the standards-status
/// extension (deprecated, withdrawn, …), `status = draft`/`retired`, `experimental = true`.
/// The `http://hl7.org/fhir/concept-properties` URI of a property code FHIR defines for every
/// code system (concept-properties.html).
fn standard_property_uri(code: &str) -> Option<String> {
    let name = match code {
        "weight" | "itemWeight" => "itemWeight",
        "definition" | "status" | "inactive" | "notSelectable" | "parent" | "child" | "partOf"
        | "synonym" | "comment" | "deprecated" | "deprecationDate" | "retirementDate"
        | "alternateCode" | "order" | "label" => code,
        _ => return None,
    };
    Some(format!("http://hl7.org/fhir/concept-properties#{name}"))
}

/// The extensions a value set's `compose.include.concept` carries into its expansion
/// (`valueset-deprecated`, `structuredefinition-standards-status`).
fn vs_concept_extensions(c: &Value) -> Vec<Value> {
    arr(c, "extension")
        .iter()
        .filter(|e| {
            matches!(
                s(e, "url"),
                Some(
                    "http://hl7.org/fhir/StructureDefinition/valueset-deprecated"
                        | "http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status"
                )
            )
        })
        .cloned()
        .collect()
}

/// Whether the value set's compose marks (system, code) as deprecated in this value set.
fn vs_marks_deprecated(vs: &Value, system: &str, code: &str) -> bool {
    let Some(compose) = vs.get("compose") else {
        return false;
    };
    arr(compose, "include")
        .iter()
        .filter(|i| s(i, "system") == Some(system))
        .flat_map(|i| arr(i, "concept").iter())
        .filter(|c| s(c, "code") == Some(code))
        .flat_map(vs_concept_extensions)
        .any(|e| match s(&e, "url") {
            Some("http://hl7.org/fhir/StructureDefinition/valueset-deprecated") => {
                s(&e, "valueCode") == Some("true")
                    || e.get("valueBoolean").and_then(Value::as_bool) == Some(true)
            }
            _ => matches!(s(&e, "valueCode"), Some("deprecated" | "withdrawn")),
        })
}

fn resource_status_flags(r: &Value) -> Vec<String> {
    resource_flags(r, true)
}

/// Only the standards-status extension flags (used for value sets).
fn vs_status_flags(r: &Value) -> Vec<String> {
    resource_flags(r, false)
}

fn resource_flags(r: &Value, with_status: bool) -> Vec<String> {
    let mut out = Vec::new();
    for e in arr(r, "extension") {
        if s(e, "url")
            == Some("http://hl7.org/fhir/StructureDefinition/structuredefinition-standards-status")
        {
            if let Some(v) = s(e, "valueCode") {
                if matches!(v, "deprecated" | "withdrawn" | "draft") {
                    out.push(v.to_string());
                }
            }
        }
    }
    if !with_status {
        return out;
    }
    if let Some(st @ ("draft" | "retired")) = s(r, "status") {
        if !out.iter().any(|x| x == st) {
            out.push(st.to_string());
        }
    }
    if r.get("experimental").and_then(Value::as_bool) == Some(true) {
        out.push("experimental".into());
    }
    out
}

/// Whether `list` is a BCP 47 language tag or an Accept-Language style list of them
/// (`de-CH, de;q=0.8, *;q=0`).
fn valid_language_list(list: &str) -> bool {
    static TAG: once_cell::sync::Lazy<regex::Regex> = once_cell::sync::Lazy::new(|| {
        regex::Regex::new(r"^(\*|[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*)(\s*;\s*q\s*=\s*[0-9.]+)?$")
            .expect("language tag regex")
    });
    !list.trim().is_empty() && list.split(',').all(|t| TAG.is_match(t.trim()))
}

/// Languages of an Accept-Language style list, best first (`de-CH, de;q=0.8, *;q=0`).
fn requested_languages(list: &str) -> Vec<String> {
    let mut v: Vec<(f32, usize, String)> = list
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let tag = it.next()?.trim().to_string();
            let q = it
                .find_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                })
                .unwrap_or(1.0);
            (!tag.is_empty() && q > 0.0).then_some((q, i, tag))
        })
        .collect();
    v.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
    });
    v.into_iter().map(|x| x.2).collect()
}

/// `de` matches `de`, `de-CH`; `de-CH` matches `de`.
fn lang_matches(have: &str, want: &str) -> bool {
    let (h, w) = (have.to_ascii_lowercase(), want.to_ascii_lowercase());
    h == w || h.starts_with(&format!("{w}-")) || w.starts_with(&format!("{h}-"))
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn latest<T: Clone>(list: &[T], version: impl Fn(&T) -> Option<String>) -> Option<T> {
    list.iter()
        .max_by(|a, b| {
            let va = version(a).map(|v| version_key(&v));
            let vb = version(b).map(|v| version_key(&v));
            va.cmp(&vb)
        })
        .cloned()
}

fn vs_canonical(vs: &Value) -> String {
    let Some(url) = s(vs, "url") else {
        return "(unidentified)".to_string();
    };
    match s(vs, "version") {
        Some(v) => format!("{url}|{v}"),
        None => url.to_string(),
    }
}

/// `designation` expansion parameter: `urn:ietf:bcp:47|lang` selects by language,
/// `system|code` by use; no filters selects all.
fn designation_wanted(d: &Designation, filters: &[String]) -> bool {
    if filters.is_empty() {
        return true;
    }
    filters.iter().any(|f| {
        let (sys, code) = split_canonical(f);
        match (sys, code) {
            // a designation filter names one language tag exactly (`de` is not `de-CH`)
            ("urn:ietf:bcp:47", Some(lang)) => d
                .language
                .as_deref()
                .map(|l| l.eq_ignore_ascii_case(lang))
                .unwrap_or(false),
            (sys, Some(code)) => {
                d.use_system.as_deref() == Some(sys) && d.use_code.as_deref() == Some(code)
            }
            (lang, None) => d
                .language
                .as_deref()
                .map(|l| lang_matches(l, lang))
                .unwrap_or(false),
        }
    })
}

fn designation_json(d: &Designation) -> Value {
    let mut o = Map::new();
    if let Some(l) = &d.language {
        o.insert("language".into(), json!(l));
    }
    if d.use_code.is_some() {
        let mut u = Map::new();
        if let Some(s) = &d.use_system {
            u.insert("system".into(), json!(s));
        }
        if let Some(s) = &d.use_code {
            u.insert("code".into(), json!(s));
        }
        if let Some(s) = &d.use_display {
            u.insert("display".into(), json!(s));
        }
        o.insert("use".into(), Value::Object(u));
    }
    o.insert("value".into(), json!(d.value));
    Value::Object(o)
}

fn now_instant() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn pseudo_uuid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x =
        (t as u64) ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ (std::process::id() as u64) << 32;
    let mut hex = String::new();
    for _ in 0..2 {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        hex.push_str(&format!("{z:016x}"));
    }
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// `PropertyValue` is re-exported for callers building providers.
pub type ConceptProperty = (String, PropertyValue);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Concept, ConceptTable};

    fn service() -> Terminology {
        let mut t = ConceptTable::new("http://snomed.info/sct", Some("test".into()));
        let root = t.add(Concept::new("404684003", Some("Clinical finding".into())));
        let dm = t.add(Concept::new("73211009", Some("Diabetes mellitus".into())));
        let t2 = t.add(Concept::new(
            "44054006",
            Some("Type 2 diabetes mellitus".into()),
        ));
        t.link(root, dm);
        t.link(dm, t2);
        let mut tx = Terminology::new();
        tx.add_code_system(Arc::new(t));
        tx
    }

    fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
        arr(p, "parameter")
            .iter()
            .find(|x| s(x, "name") == Some(name))
    }

    #[test]
    fn implicit_isa_value_set_and_subsumes() {
        let tx = service();
        let e = tx
            .expand(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://snomed.info/sct?fhir_vs=isa/73211009"},
                {"name": "excludeNested", "valueBoolean": true}]}))
            .unwrap();
        assert_eq!(e["expansion"]["total"], 2);
        let v = tx
            .validate_code_vs(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://snomed.info/sct?fhir_vs=isa/73211009"},
                {"name": "system", "valueUri": "http://snomed.info/sct"},
                {"name": "code", "valueCode": "404684003"}]}))
            .unwrap();
        assert_eq!(param(&v, "result").unwrap()["valueBoolean"], false);
        let r = tx
            .subsumes(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "system", "valueUri": "http://snomed.info/sct"},
                {"name": "codeA", "valueCode": "404684003"},
                {"name": "codeB", "valueCode": "44054006"}]}))
            .unwrap();
        assert_eq!(param(&r, "outcome").unwrap()["valueCode"], "subsumes");
    }

    #[test]
    fn lookup_and_errors() {
        let tx = service();
        let r = tx
            .lookup(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "system", "valueUri": "http://snomed.info/sct"},
                {"name": "code", "valueCode": "73211009"}]}))
            .unwrap();
        assert_eq!(
            param(&r, "display").unwrap()["valueString"],
            "Diabetes mellitus"
        );
        let e = tx
            .lookup(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "system", "valueUri": "http://snomed.info/sct"},
                {"name": "code", "valueCode": "1"}]}))
            .unwrap_err();
        assert_eq!(e.status, 404);
        assert_eq!(e.outcome["resourceType"], "OperationOutcome");
        let e = tx.lookup(&json!({"resourceType": "Bundle"})).unwrap_err();
        assert_eq!(e.status, 400);
        // UCUM is always available
        let v = tx
            .validate_code_cs(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://unitsofmeasure.org"},
                {"name": "code", "valueCode": "mg/dL"}]}))
            .unwrap();
        assert_eq!(param(&v, "result").unwrap()["valueBoolean"], true);
    }

    #[test]
    fn vendored_r4_content_loads() {
        let tx = Terminology::with_r4_content().unwrap();
        let (cs, vs, cm) = tx.counts();
        assert!(cs > 1000 && vs > 3000 && cm > 10, "{cs} {vs} {cm}");
        let e = tx
            .expand(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://hl7.org/fhir/ValueSet/administrative-gender"}]}))
            .unwrap();
        assert_eq!(e["expansion"]["total"], 4);
    }

    /// A large system (over `LARGE_SYSTEM` codes): a filtered, paged expansion of the whole
    /// system ranks and counts exactly as the general path does.
    #[test]
    fn large_filtered_expansion_pages_like_the_general_path() {
        let mut t = ConceptTable::new("http://example.org/big", Some("1".into()));
        let words = [
            "renal", "cardiac", "chronic", "acute", "diabetes", "retinal",
        ];
        for i in 0..3000 {
            let d = format!(
                "{} {} {}",
                words[i % 6],
                words[(i / 6) % 6],
                words[(i / 36) % 6]
            );
            let mut c = Concept::new(format!("C{i}"), Some(d));
            c.inactive = i % 11 == 0;
            t.add(c);
        }
        t.add(Concept::new("chr", Some("Code equal to the text".into())));
        let mut tx = Terminology::new();
        tx.add_code_system(Arc::new(t));
        let req_active = |count: Option<i64>, offset: i64, general: bool, active_only: bool| {
            let mut p = vec![
                json!({"name": "activeOnly", "valueBoolean": active_only}),
                json!({"name": "filter", "valueString": "chr"}),
                json!({"name": "offset", "valueInteger": offset}),
            ];
            if general {
                // two includes (the second adds nothing) take the general path
                p.push(json!({"name": "valueSet", "resource": {
                    "resourceType": "ValueSet", "status": "active",
                    "compose": {"include": [
                        {"system": "http://example.org/big"},
                        {"system": "http://example.org/big", "concept": [{"code": "C1"}]}]}}}));
            } else {
                p.push(json!({"name": "url", "valueUri": "http://example.org/big?fhir_vs"}));
            }
            if let Some(c) = count {
                p.push(json!({"name": "count", "valueInteger": c}));
            }
            json!({"resourceType": "Parameters", "parameter": p})
        };
        let req = |count: Option<i64>, offset: i64, general: bool| {
            req_active(count, offset, general, false)
        };
        let codes = |v: &Value| -> Vec<String> {
            arr(&v["expansion"], "contains")
                .iter()
                .map(|c| c["code"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        // the general path (count large enough to hold everything)
        let all = tx.expand(&req(Some(5000), 0, true)).unwrap();
        let all_codes = codes(&all);
        let total = all["expansion"]["total"].as_u64().unwrap() as usize;
        assert_eq!(total, all_codes.len());
        assert!(total > 500, "{total}");
        assert_eq!(all_codes[0], "chr", "exact code first");
        // display starting with the text ranks before a later word match
        let first_starts = all_codes
            .iter()
            .position(|c| c != "chr")
            .map(|i| all_codes[i].clone())
            .unwrap();
        let n: usize = first_starts[1..].parse().unwrap();
        assert_eq!(words[n % 6], "chronic");
        // pages agree with the full ranking
        for (count, offset) in [(10, 0), (7, 13), (25, 490)] {
            let page = tx.expand(&req(Some(count), offset, false)).unwrap();
            assert_eq!(page["expansion"]["total"].as_u64().unwrap() as usize, total);
            assert_eq!(page["expansion"]["offset"], json!(offset));
            assert_eq!(
                codes(&page),
                all_codes[offset as usize..(offset + count) as usize].to_vec()
            );
        }
        // activeOnly: the same, over the active concepts
        let all = tx.expand(&req_active(Some(5000), 0, true, true)).unwrap();
        let active_codes = codes(&all);
        let active_total = all["expansion"]["total"].as_u64().unwrap() as usize;
        assert_eq!(active_total, active_codes.len());
        assert!(active_total < total && active_total > 400, "{active_total}");
        assert!(!active_codes.contains(&"C0".to_string()));
        for (count, offset) in [(10, 0), (9, 21), (30, 400)] {
            let page = tx
                .expand(&req_active(Some(count), offset, false, true))
                .unwrap();
            assert_eq!(
                page["expansion"]["total"].as_u64().unwrap() as usize,
                active_total
            );
            assert_eq!(
                codes(&page),
                active_codes[offset as usize..(offset + count) as usize].to_vec()
            );
        }
        // without count an expansion this large is refused
        let e = tx.expand(&req(None, 0, false)).unwrap_err();
        assert_eq!(e.outcome["issue"][0]["code"], "too-costly");
    }
}
