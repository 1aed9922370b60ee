//! The SearchParameter registry: official R4 parameters plus custom ones added at run time,
//! indexed by (resource type, code), with per-type compiled expressions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::path::PathExpr;

/// The R4 CompartmentDefinitions other than Patient (from the official examples package, CC0),
/// reduced to `code` and `resource[].code/param`.
static OTHER_COMPARTMENTS: &str = include_str!("../definitions/compartments.json");

/// `SearchParameter.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl ParamType {
    pub fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "number" => ParamType::Number,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "composite" => ParamType::Composite,
            "quantity" => ParamType::Quantity,
            "uri" => ParamType::Uri,
            "special" => ParamType::Special,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Composite => "composite",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Special => "special",
        }
    }
}

/// One `SearchParameter.component` of a composite parameter.
#[derive(Debug, Clone)]
pub struct Component {
    /// Canonical URL of the component's SearchParameter.
    pub definition: String,
    pub expression: String,
    /// Resolved from `definition` once all parameters are loaded.
    pub param_type: ParamType,
    pub path: Option<PathExpr>,
}

/// A SearchParameter definition.
#[derive(Debug, Clone)]
pub struct SearchParam {
    pub url: String,
    pub code: String,
    pub param_type: ParamType,
    pub base: Vec<String>,
    pub expression: Option<String>,
    /// `SearchParameter.target` (reference parameters).
    pub targets: Vec<String>,
    pub components: Vec<Component>,
}

/// A parameter as it applies to one resource type.
#[derive(Debug, Clone)]
pub struct BoundParam {
    pub def: Arc<SearchParam>,
    /// The expression restricted to this resource type; `None` when not indexable
    /// (no expression, or outside the supported subset).
    pub path: Option<PathExpr>,
    /// Token parameters on `code`-typed elements with a required binding: code → the code
    /// system it implicitly belongs to (`male` → `http://hl7.org/fhir/administrative-gender`),
    /// indexed as the row's system so `gender=http://hl7.org/fhir/administrative-gender|male`
    /// matches (search.html#token: "the system is implied").
    pub implied_systems: Option<Arc<HashMap<String, String>>>,
}

/// Code → system for the `code`-typed elements a token expression reaches, from the required
/// bindings of the R4 model (`None` when it reaches none).
fn implied_systems(path: &PathExpr) -> Option<Arc<HashMap<String, String>>> {
    let model = kiln_fhir::model::r4();
    let mut map = HashMap::new();
    'terms: for (root, fields) in path.member_paths() {
        let mut ty = root;
        let mut last = None;
        for f in &fields {
            let Some(e) = model.element_by_name(&ty, f) else {
                continue 'terms;
            };
            last = Some(e);
            match e.child_type_name() {
                Some(t) => ty = t.to_string(),
                None => continue 'terms,
            }
        }
        let Some(e) = last else { continue };
        let is_code = matches!(e.types.as_slice(), [t] if t.code == "code");
        let Some(b) = e.binding.as_ref().filter(|b| b.strength == "required") else {
            continue;
        };
        if !is_code {
            continue;
        }
        for (system, code) in model.required_value_set(&b.value_set).unwrap_or(&[]) {
            map.entry(code.clone()).or_insert_with(|| system.clone());
        }
    }
    (!map.is_empty()).then(|| Arc::new(map))
}

impl BoundParam {
    pub fn code(&self) -> &str {
        &self.def.code
    }
    pub fn param_type(&self) -> ParamType {
        self.def.param_type
    }
}

/// All known search parameters.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// resource type (or `Resource` / `DomainResource`) → code → parameter
    by_type: HashMap<String, BTreeMap<String, BoundParam>>,
    by_url: HashMap<String, Arc<SearchParam>>,
    /// compartment type → resource type → parameter codes
    compartments: HashMap<String, HashMap<String, Vec<String>>>,
    /// Expressions that could not be compiled (url, reason).
    pub unsupported: Vec<(String, String)>,
}

/// Error loading a SearchParameter.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error("not a SearchParameter: {0}")]
    NotSearchParameter(String),
    #[error("SearchParameter is missing {0}")]
    Missing(&'static str),
    #[error("SearchParameter.type '{0}' is not valid")]
    BadType(String),
    #[error("SearchParameter.expression is not supported: {0}")]
    UnsupportedExpression(String),
}

fn str_list(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Builds a registry from a Bundle of SearchParameters (or a JSON array of them), e.g. the
    /// official `search-parameters.json`. Parameters whose expression falls outside the supported
    /// subset are still registered (searchable where the SQL needs no index, e.g. `_id`) and
    /// listed in [`Registry::unsupported`].
    pub fn from_bundle(bundle: &Value) -> Registry {
        let mut reg = Registry::new();
        let items: Vec<&Value> = if let Some(a) = bundle.as_array() {
            a.iter().collect()
        } else {
            bundle
                .get("entry")
                .and_then(Value::as_array)
                .map(|e| e.iter().filter_map(|x| x.get("resource")).collect())
                .unwrap_or_default()
        };
        for sp in items {
            if let Err(e) = reg.add_lenient(sp) {
                let url = sp
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                reg.unsupported.push((url, e.to_string()));
            }
        }
        reg.resolve_components();
        reg
    }

    /// The official R4 parameters and the R4 compartments, from `kiln-fhir`'s vendored
    /// definitions. Clone it to add custom parameters.
    pub fn r4() -> Registry {
        let model = kiln_fhir::model::r4();
        let bundle: Value =
            serde_json::from_slice(model.search_parameters_json()).unwrap_or(Value::Null);
        let mut reg = Registry::from_bundle(&bundle);
        let mut map = HashMap::new();
        for (rt, params) in model.patient_compartment() {
            if !params.is_empty() {
                map.insert(rt.clone(), params.clone());
            }
        }
        reg.compartments.insert("Patient".to_string(), map);
        // the other R4 CompartmentDefinitions (Encounter, Practitioner, RelatedPerson, Device)
        if let Ok(Value::Array(defs)) = serde_json::from_str::<Value>(OTHER_COMPARTMENTS) {
            for def in &defs {
                reg.add_compartment(def);
            }
        }
        reg
    }

    /// Adds a custom SearchParameter resource (strict: the expression must compile).
    pub fn add(&mut self, sp: &Value) -> Result<(), RegistryError> {
        let def = Self::parse_def(sp)?;
        if let Some(e) = &def.expression {
            PathExpr::compile(e).map_err(RegistryError::UnsupportedExpression)?;
        }
        for c in &def.components {
            PathExpr::compile_relative(&c.expression)
                .map_err(RegistryError::UnsupportedExpression)?;
        }
        self.insert(def);
        self.resolve_components();
        Ok(())
    }

    /// Adds a SearchParameter resource stored at run time. Like the official ones it is
    /// registered even when its expression is outside the indexable subset (then searching it is
    /// a "not supported" error and the reason is in [`Registry::unsupported`]); `Err` when it
    /// is not a usable definition at all (no code, type or base).
    pub fn add_custom(&mut self, sp: &Value) -> Result<(), RegistryError> {
        self.add_lenient(sp)?;
        self.resolve_components();
        Ok(())
    }

    fn add_lenient(&mut self, sp: &Value) -> Result<(), RegistryError> {
        let def = Self::parse_def(sp)?;
        if let Some(e) = &def.expression {
            if let Err(err) = PathExpr::compile(e) {
                self.unsupported.push((def.url.clone(), err));
            }
        }
        self.insert(def);
        Ok(())
    }

    fn parse_def(sp: &Value) -> Result<SearchParam, RegistryError> {
        // the compact vendored form has no resourceType
        let rt = sp
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("SearchParameter");
        if rt != "SearchParameter" {
            return Err(RegistryError::NotSearchParameter(rt.to_string()));
        }
        let code = sp
            .get("code")
            .and_then(Value::as_str)
            .ok_or(RegistryError::Missing("code"))?
            .to_string();
        let ty = sp
            .get("type")
            .and_then(Value::as_str)
            .ok_or(RegistryError::Missing("type"))?;
        let param_type =
            ParamType::parse(ty).ok_or_else(|| RegistryError::BadType(ty.to_string()))?;
        let base = str_list(sp, "base");
        if base.is_empty() {
            return Err(RegistryError::Missing("base"));
        }
        let url = sp
            .get("url")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("urn:kiln:searchparameter:{}-{}", base[0], code));
        let components = sp
            .get("component")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        let definition = c.get("definition").and_then(Value::as_str)?.to_string();
                        let expression = c.get("expression").and_then(Value::as_str)?.to_string();
                        let path = PathExpr::compile_relative(&expression).ok();
                        Some(Component {
                            definition,
                            expression,
                            param_type: ParamType::Special,
                            path,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(SearchParam {
            url,
            code,
            param_type,
            base,
            expression: sp
                .get("expression")
                .and_then(Value::as_str)
                .map(str::to_string),
            targets: str_list(sp, "target"),
            components,
        })
    }

    fn insert(&mut self, def: SearchParam) {
        let compiled = def
            .expression
            .as_deref()
            .and_then(|e| PathExpr::compile(e).ok());
        let def = Arc::new(def);
        if let Some(old) = self.by_url.insert(def.url.clone(), def.clone()) {
            // replacing a definition: drop its old bindings
            for b in &old.base {
                if let Some(m) = self.by_type.get_mut(b) {
                    if m.get(&old.code).is_some_and(|p| p.def.url == old.url) {
                        m.remove(&old.code);
                    }
                }
            }
        }
        for b in &def.base {
            let path = compiled.as_ref().and_then(|c| c.for_type(b));
            let implied = match (&path, def.param_type) {
                (Some(p), ParamType::Token) => implied_systems(p),
                _ => None,
            };
            self.by_type.entry(b.clone()).or_default().insert(
                def.code.clone(),
                BoundParam {
                    def: def.clone(),
                    path,
                    implied_systems: implied,
                },
            );
        }
    }

    fn resolve_components(&mut self) {
        let types: HashMap<String, ParamType> = self
            .by_url
            .iter()
            .map(|(u, d)| (u.clone(), d.param_type))
            .collect();
        let mut changed = Vec::new();
        for (url, def) in &self.by_url {
            if def
                .components
                .iter()
                .any(|c| c.param_type == ParamType::Special)
            {
                let mut d = (**def).clone();
                for c in &mut d.components {
                    c.param_type = types
                        .get(&c.definition)
                        .copied()
                        .unwrap_or(ParamType::Special);
                }
                changed.push((url.clone(), d));
            }
        }
        for (_, d) in changed {
            if d.components
                .iter()
                .all(|c| c.param_type != ParamType::Special)
            {
                self.insert(d);
            }
        }
    }

    /// The parameter `code` as it applies to `resource_type` (including `Resource` /
    /// `DomainResource` parameters). `resource_type = None` (system search) looks at the
    /// `Resource`-level parameters only.
    pub fn get(&self, resource_type: Option<&str>, code: &str) -> Option<&BoundParam> {
        if let Some(rt) = resource_type {
            if let Some(p) = self.by_type.get(rt).and_then(|m| m.get(code)) {
                return Some(p);
            }
            if rt != "Resource" && rt != "Bundle" && rt != "Binary" && rt != "Parameters" {
                if let Some(p) = self.by_type.get("DomainResource").and_then(|m| m.get(code)) {
                    return Some(p);
                }
            }
        }
        self.by_type.get("Resource").and_then(|m| m.get(code))
    }

    /// Finds a parameter by canonical URL.
    pub fn by_url(&self, url: &str) -> Option<&Arc<SearchParam>> {
        self.by_url.get(url)
    }

    /// All parameters applying to a resource type (own + Resource + DomainResource).
    pub fn params_for(&self, resource_type: &str) -> Vec<&BoundParam> {
        let mut out: Vec<&BoundParam> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let domain = !matches!(resource_type, "Bundle" | "Binary" | "Parameters");
        for t in [
            Some(resource_type),
            domain.then_some("DomainResource"),
            Some("Resource"),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(m) = self.by_type.get(t) {
                for (code, p) in m {
                    if seen.insert(code.as_str()) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    /// Resource types with at least one type-specific parameter.
    pub fn resource_types(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .by_type
            .keys()
            .map(String::as_str)
            .filter(|t| *t != "Resource" && *t != "DomainResource")
            .collect();
        v.sort_unstable();
        v
    }

    /// Registers a CompartmentDefinition (e.g. the Patient compartment).
    pub fn add_compartment(&mut self, def: &Value) {
        let Some(code) = def.get("code").and_then(Value::as_str) else {
            return;
        };
        let mut map = HashMap::new();
        for r in def
            .get("resource")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(rt) = r.get("code").and_then(Value::as_str) {
                let params = str_list(r, "param");
                if !params.is_empty() {
                    map.insert(rt.to_string(), params);
                }
            }
        }
        self.compartments.insert(code.to_string(), map);
    }

    /// The parameters linking `resource_type` to a compartment (`{def}` → `["subject","performer"]`
    /// for Observation in Patient). `None` when the compartment is unknown; an empty slice when
    /// the resource type is not in the compartment.
    pub fn compartment_params(&self, compartment: &str, resource_type: &str) -> Option<&[String]> {
        let c = self.compartments.get(compartment)?;
        Some(c.get(resource_type).map(Vec::as_slice).unwrap_or(&[]))
    }

    /// Resource types that are members of a compartment.
    pub fn compartment_types(&self, compartment: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .compartments
            .get(compartment)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn mini() -> Registry {
        Registry::from_bundle(&json!([
            {"resourceType":"SearchParameter","url":"u:name","code":"name","type":"string","base":["Patient"],"expression":"Patient.name"},
            {"resourceType":"SearchParameter","url":"u:code","code":"code","type":"token","base":["Observation","Condition"],"expression":"Observation.code | Condition.code"},
            {"resourceType":"SearchParameter","url":"u:tag","code":"_tag","type":"token","base":["Resource"],"expression":"Resource.meta.tag"},
            {"resourceType":"SearchParameter","url":"u:vq","code":"value-quantity","type":"quantity","base":["Observation"],"expression":"(Observation.value as Quantity)"},
            {"resourceType":"SearchParameter","url":"u:cvq","code":"code-value-quantity","type":"composite","base":["Observation"],"expression":"Observation",
              "component":[{"definition":"u:code","expression":"code"},{"definition":"u:vq","expression":"value.as(Quantity)"}]},
            {"resourceType":"SearchParameter","url":"u:bad","code":"bad","type":"string","base":["Patient"],"expression":"Patient.name.select(given)"}
        ]))
    }

    #[test]
    fn multi_base_and_resource_level() {
        let r = mini();
        assert_eq!(r.get(Some("Condition"), "code").unwrap().def.url, "u:code");
        assert!(r.get(Some("Condition"), "code").unwrap().path.is_some());
        assert_eq!(r.get(Some("Patient"), "_tag").unwrap().def.url, "u:tag");
        assert!(r.get(None, "_tag").is_some());
        assert!(r.get(Some("Patient"), "code").is_none());
        let cvq = r.get(Some("Observation"), "code-value-quantity").unwrap();
        assert_eq!(cvq.def.components[0].param_type, ParamType::Token);
        assert_eq!(cvq.def.components[1].param_type, ParamType::Quantity);
        assert_eq!(r.unsupported.len(), 1);
        assert!(r.get(Some("Patient"), "bad").unwrap().path.is_none());
    }

    #[test]
    fn official_r4_registry() {
        let r = Registry::r4();
        assert!(r.get(Some("Patient"), "birthdate").is_some());
        assert!(r
            .get(Some("Observation"), "patient")
            .unwrap()
            .path
            .is_some());
        assert!(r
            .get(Some("Observation"), "code-value-quantity")
            .unwrap()
            .path
            .is_some());
        assert_eq!(
            r.get(Some("Observation"), "_lastUpdated")
                .unwrap()
                .param_type(),
            ParamType::Date
        );
        assert_eq!(
            r.compartment_params("Patient", "Observation").unwrap(),
            &["subject".to_string(), "performer".to_string()]
        );
        assert_eq!(
            r.compartment_params("Encounter", "Observation").unwrap(),
            &["encounter".to_string()]
        );
        assert_eq!(
            r.compartment_params("Practitioner", "Encounter").unwrap(),
            &["practitioner".to_string(), "participant".to_string()]
        );
        for c in ["Device", "RelatedPerson"] {
            assert!(!r.compartment_types(c).is_empty(), "{c}");
        }
        // every official expression is inside the supported subset
        assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
    }

    #[test]
    fn implied_systems_of_code_elements() {
        let r = Registry::r4();
        let g = r.get(Some("Patient"), "gender").unwrap();
        assert_eq!(
            g.implied_systems
                .as_ref()
                .unwrap()
                .get("male")
                .map(String::as_str),
            Some("http://hl7.org/fhir/administrative-gender")
        );
        let s = r.get(Some("Observation"), "status").unwrap();
        assert_eq!(
            s.implied_systems
                .as_ref()
                .unwrap()
                .get("final")
                .map(String::as_str),
            Some("http://hl7.org/fhir/observation-status")
        );
        // CodeableConcepts carry their own systems
        assert!(r
            .get(Some("Observation"), "code")
            .unwrap()
            .implied_systems
            .is_none());
    }

    #[test]
    fn custom_parameter() {
        let mut r = mini();
        let sp = json!({"resourceType":"SearchParameter","url":"u:eye","code":"eye-color","type":"token",
            "base":["Patient"],"expression":"Patient.extension.where(url='http://x/eye').value"});
        r.add(&sp).unwrap();
        assert!(r.get(Some("Patient"), "eye-color").unwrap().path.is_some());
        let bad = json!({"resourceType":"SearchParameter","code":"x","type":"token","base":["Patient"],"expression":"Patient.a.b()"});
        assert!(r.add(&bad).is_err());
        assert_eq!(
            r.add(&json!({"resourceType":"Patient"})),
            Err(RegistryError::NotSearchParameter("Patient".into()))
        );
    }
}
