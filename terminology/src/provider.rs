//! The storage-agnostic core: `CodeSystemProvider`, and `ConceptTable`, the in-memory
//! (serde-serialisable) implementation every loader produces.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// `designation` of a concept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Designation {
    pub language: Option<String>,
    pub use_system: Option<String>,
    pub use_code: Option<String>,
    pub use_display: Option<String>,
    pub value: String,
}

/// A concept property value (`CodeSystem.concept.property.value[x]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PropertyValue {
    Code(String),
    Coding {
        system: Option<String>,
        code: String,
        display: Option<String>,
    },
    String(String),
    Integer(i64),
    Boolean(bool),
    DateTime(String),
    Decimal(String),
}

impl PropertyValue {
    /// The value as text, for `=`/`in`/`regex` filters.
    pub fn as_text(&self) -> String {
        match self {
            PropertyValue::Code(s)
            | PropertyValue::String(s)
            | PropertyValue::DateTime(s)
            | PropertyValue::Decimal(s) => s.clone(),
            PropertyValue::Coding { code, .. } => code.clone(),
            PropertyValue::Integer(i) => i.to_string(),
            PropertyValue::Boolean(b) => b.to_string(),
        }
    }

    /// `(value[x] element name, JSON value)` for a `Parameters` part.
    pub fn to_fhir(&self) -> (&'static str, serde_json::Value) {
        use serde_json::json;
        match self {
            PropertyValue::Code(s) => ("valueCode", json!(s)),
            PropertyValue::String(s) => ("valueString", json!(s)),
            PropertyValue::DateTime(s) => ("valueDateTime", json!(s)),
            PropertyValue::Decimal(s) => (
                "valueDecimal",
                serde_json::from_str(s).unwrap_or_else(|_| json!(s)),
            ),
            PropertyValue::Integer(i) => ("valueInteger", json!(i)),
            PropertyValue::Boolean(b) => ("valueBoolean", json!(b)),
            PropertyValue::Coding {
                system,
                code,
                display,
            } => {
                let mut c = serde_json::Map::new();
                if let Some(s) = system {
                    c.insert("system".into(), json!(s));
                }
                c.insert("code".into(), json!(code));
                if let Some(d) = display {
                    c.insert("display".into(), json!(d));
                }
                ("valueCoding", serde_json::Value::Object(c))
            }
        }
    }
}

/// `CodeSystem.property` definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PropertyDef {
    pub code: String,
    pub uri: Option<String>,
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

/// One concept of a code system.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Concept {
    pub code: String,
    pub display: Option<String>,
    pub definition: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub designations: Vec<Designation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<(String, PropertyValue)>,
    /// Indexes of parent concepts in the owning table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<u32>,
    #[serde(default)]
    pub inactive: bool,
    #[serde(default)]
    pub not_selectable: bool,
}

impl Concept {
    pub fn new(code: impl Into<String>, display: Option<String>) -> Self {
        Concept {
            code: code.into(),
            display,
            ..Default::default()
        }
    }

    pub fn property<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a PropertyValue> + 'a {
        self.properties
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// Result of `$subsumes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsumption {
    Equivalent,
    Subsumes,
    SubsumedBy,
    NotSubsumed,
}

impl Subsumption {
    pub fn as_code(self) -> &'static str {
        match self {
            Subsumption::Equivalent => "equivalent",
            Subsumption::Subsumes => "subsumes",
            Subsumption::SubsumedBy => "subsumed-by",
            Subsumption::NotSubsumed => "not-subsumed",
        }
    }
}

/// An error from a filter or provider operation (becomes an OperationOutcome issue).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

/// A code system as the terminology operations see it. Implementations may keep their content
/// in memory, in files, or in database tables.
pub trait CodeSystemProvider: Send + Sync {
    fn url(&self) -> &str;
    fn version(&self) -> Option<&str>;
    fn name(&self) -> Option<&str> {
        None
    }
    /// `CodeSystem.content` (complete, fragment, example, not-present, supplement).
    fn content(&self) -> &str {
        "complete"
    }
    fn case_sensitive(&self) -> bool {
        true
    }
    /// The language of the displays (`CodeSystem.language`).
    fn language(&self) -> Option<&str> {
        None
    }
    /// The concept with this code.
    fn lookup(&self, code: &str) -> Option<Concept>;
    fn parents(&self, code: &str) -> Vec<String>;
    fn children(&self, code: &str) -> Vec<String>;
    /// Property definitions (`CodeSystem.property`).
    fn property_defs(&self) -> Vec<PropertyDef> {
        Vec::new()
    }
    /// Every code in the system in definition order; `None` when the system is not enumerable
    /// (UCUM's grammar).
    fn codes(&self) -> Option<Vec<String>>;
    /// Number of codes, when enumerable (cheaper than `codes().len()` for large systems).
    fn size(&self) -> Option<usize> {
        self.codes().map(|c| c.len())
    }
    /// Root concepts (no parents), for hierarchical expansion.
    fn roots(&self) -> Vec<String> {
        self.codes()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| self.parents(c).is_empty())
            .collect()
    }
    /// All codes satisfying a ValueSet compose filter.
    fn filter(&self, property: &str, op: &str, value: &str) -> Result<Vec<String>, ProviderError>;
    /// Whether `code` satisfies a filter (used by `$validate-code`).
    fn filter_matches(
        &self,
        code: &str,
        property: &str,
        op: &str,
        value: &str,
    ) -> Result<bool, ProviderError> {
        Ok(self.filter(property, op, value)?.iter().any(|c| c == code))
    }
    /// Text search over codes and display/designations; best first: exact code, display
    /// starts with the text, then every word of the text a prefix of a word of the display.
    fn search(&self, text: &str, limit: usize) -> Vec<String>;
    /// All ancestors (transitive).
    fn ancestors(&self, code: &str) -> HashSet<String> {
        let mut out = HashSet::new();
        let mut todo = self.parents(code);
        while let Some(p) = todo.pop() {
            if out.insert(p.clone()) {
                todo.extend(self.parents(&p));
            }
        }
        out
    }
    /// `$subsumes` of a and b; `None` when either code is unknown.
    fn subsumes(&self, a: &str, b: &str) -> Option<Subsumption> {
        let ca = self.lookup(a)?;
        let cb = self.lookup(b)?;
        if ca.code == cb.code {
            return Some(Subsumption::Equivalent);
        }
        if self.ancestors(&cb.code).contains(&ca.code) {
            return Some(Subsumption::Subsumes);
        }
        if self.ancestors(&ca.code).contains(&cb.code) {
            return Some(Subsumption::SubsumedBy);
        }
        Some(Subsumption::NotSubsumed)
    }
}

/// Text-search helpers shared by the implementations.
pub fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Score of a text match of `query` against a concept (0 = no match).
pub fn match_score(query: &str, code: &str, texts: &[&str]) -> u32 {
    TextMatcher::new(query).score(code, texts.iter().copied())
}

/// A text query prepared for scoring many concepts (`$expand?filter=`): 100 exact code,
/// 90 a display/designation equal to the text, 80 one starting with it, 60/50 every word of the
/// text a prefix of a word (60 when the first words agree), 40 the code starting with the text,
/// 0 no match. Case-insensitive; ASCII text is compared without allocating.
#[derive(Debug, Clone)]
pub struct TextMatcher {
    q: String,
    words: Vec<String>,
}

/// `a` starts with the lowercase `prefix`, ignoring case.
fn starts_with_ci(a: &str, prefix: &str) -> bool {
    if a.is_ascii() {
        a.len() >= prefix.len()
            && a.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    } else {
        a.to_lowercase().starts_with(prefix)
    }
}

fn eq_ci(a: &str, lower: &str) -> bool {
    if a.is_ascii() {
        a.eq_ignore_ascii_case(lower)
    } else {
        a.to_lowercase() == lower
    }
}

fn text_words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

impl TextMatcher {
    pub fn new(query: &str) -> Self {
        let q = query.trim().to_lowercase();
        let words = words(&q);
        TextMatcher { q, words }
    }

    /// The lowercase words of the query.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    pub fn score<'a>(&self, code: &str, texts: impl IntoIterator<Item = &'a str>) -> u32 {
        let q = self.q.as_str();
        if q.is_empty() {
            return 1;
        }
        if eq_ci(code, q) {
            return 100;
        }
        let mut best = 0;
        for t in texts {
            if eq_ci(t, q) {
                best = best.max(90);
            } else if starts_with_ci(t, q) {
                best = best.max(80);
            } else if best < 60
                && !self.words.is_empty()
                && self
                    .words
                    .iter()
                    .all(|w| text_words(t).any(|x| starts_with_ci(x, w)))
            {
                let first = text_words(t)
                    .next()
                    .map(|f| starts_with_ci(f, &self.words[0]))
                    .unwrap_or(false);
                best = best.max(if first { 60 } else { 50 });
            }
        }
        if best == 0 && starts_with_ci(code, q) {
            best = 40;
        }
        best
    }
}

/// A full-text index over a `ConceptTable` (tantivy, feature `text-index`): every concept whose
/// code or display/designations match the query, as indexes into `ConceptTable::concepts`.
/// `None` means the index cannot answer (the table is scanned instead).
pub trait TextSearcher: Send + Sync + std::fmt::Debug {
    fn matching(&self, query: &str) -> Option<Vec<u32>>;
}

/// An attribute relationship of a concept (SNOMED CT active inferred non-IS-A relationship):
/// (source concept index, attribute type SCTID, destination concept index, role group).
/// Used by ECL attribute refinements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribute(pub u32, pub u64, pub u32, pub u16);

/// An in-memory code system: concepts in an arena with a code index. This is also the
/// snapshot format persisted by `TerminologyStore` for large systems.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConceptTable {
    pub url: String,
    pub version: Option<String>,
    pub name: Option<String>,
    pub title: Option<String>,
    pub content: String,
    pub case_sensitive: bool,
    #[serde(default)]
    pub language: Option<String>,
    pub property_defs: Vec<PropertyDef>,
    pub concepts: Vec<Concept>,
    /// Named member sets over the concepts: SNOMED CT reference sets (refset id → members),
    /// LOINC answer lists (LL… → LA… answers, in sequence order).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sets: BTreeMap<String, Vec<u32>>,
    /// Resources loaded with the code system from the same release (SNOMED CT implicit concept
    /// maps `?fhir_cm=…`: historical associations, the ICD-10 map), kept in the same snapshot so
    /// they are replaced together with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<serde_json::Value>,
    /// Attribute relationships (SNOMED CT), for ECL refinements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<Attribute>,
    #[serde(skip)]
    index: HashMap<String, u32>,
    #[serde(skip)]
    lower_index: HashMap<String, u32>,
    /// Full-text index answering `search` (attached after loading).
    #[serde(skip)]
    text_index: Option<std::sync::Arc<dyn TextSearcher>>,
}

impl ConceptTable {
    pub fn new(url: impl Into<String>, version: Option<String>) -> Self {
        ConceptTable {
            url: url.into(),
            version,
            content: "complete".into(),
            case_sensitive: true,
            ..Default::default()
        }
    }

    /// Adds a concept (replacing one with the same code); returns its index.
    pub fn add(&mut self, concept: Concept) -> u32 {
        if let Some(&i) = self.index.get(&concept.code) {
            let old = &mut self.concepts[i as usize];
            let parents = std::mem::take(&mut old.parents);
            let children = std::mem::take(&mut old.children);
            *old = Concept {
                parents,
                children,
                ..concept
            };
            return i;
        }
        let i = self.concepts.len() as u32;
        self.index.insert(concept.code.clone(), i);
        self.lower_index
            .entry(concept.code.to_lowercase())
            .or_insert(i);
        self.concepts.push(concept);
        i
    }

    /// Records `child` is-a `parent`.
    pub fn link(&mut self, parent: u32, child: u32) {
        if parent == child {
            return;
        }
        let (p, c) = (parent as usize, child as usize);
        if p >= self.concepts.len() || c >= self.concepts.len() {
            return;
        }
        if !self.concepts[c].parents.contains(&parent) {
            self.concepts[c].parents.push(parent);
            self.concepts[p].children.push(child);
        }
    }

    /// Rebuilds the code index (after deserialising).
    pub fn reindex(&mut self) {
        self.index = self
            .concepts
            .iter()
            .enumerate()
            .map(|(i, c)| (c.code.clone(), i as u32))
            .collect();
        self.lower_index = HashMap::new();
        for (i, c) in self.concepts.iter().enumerate() {
            self.lower_index
                .entry(c.code.to_lowercase())
                .or_insert(i as u32);
        }
    }

    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    /// Attaches a full-text index that answers `search` from now on.
    pub fn set_text_index(&mut self, index: std::sync::Arc<dyn TextSearcher>) {
        self.text_index = Some(index);
    }

    /// Whether a full-text index is attached.
    pub fn has_text_index(&self) -> bool {
        self.text_index.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    pub fn index_of(&self, code: &str) -> Option<u32> {
        match self.index.get(code) {
            Some(i) => Some(*i),
            None if !self.case_sensitive => self.lower_index.get(&code.to_lowercase()).copied(),
            None => None,
        }
    }

    /// Members of the named set (reference set, answer list), sorted; empty when unknown.
    pub fn set_members(&self, id: &str) -> Vec<u32> {
        let mut v = self.sets.get(id).cloned().unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn get(&self, code: &str) -> Option<&Concept> {
        self.index_of(code).map(|i| &self.concepts[i as usize])
    }

    /// Indexes of `i` and all its descendants.
    pub fn descendants(&self, i: u32, include_self: bool) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut todo = vec![i];
        while let Some(x) = todo.pop() {
            if !seen.insert(x) {
                continue;
            }
            if x != i || include_self {
                out.push(x);
            }
            if let Some(c) = self.concepts.get(x as usize) {
                todo.extend(c.children.iter().rev());
            }
        }
        out.sort_unstable();
        out
    }

    /// Whether `anc` is a proper ancestor of `i`: a depth-first walk up the IS-A links that stops
    /// as soon as `anc` is reached (subsumption without materialising the ancestor set).
    pub fn has_ancestor(&self, i: u32, anc: u32) -> bool {
        let mut seen: HashSet<u32> = HashSet::new();
        let mut todo: Vec<u32> = self.concepts[i as usize].parents.clone();
        while let Some(p) = todo.pop() {
            if p == anc {
                return true;
            }
            if seen.insert(p) {
                todo.extend(self.concepts[p as usize].parents.iter());
            }
        }
        false
    }

    fn ancestors_idx(&self, i: u32) -> HashSet<u32> {
        let mut out = HashSet::new();
        let mut todo: Vec<u32> = self.concepts[i as usize].parents.clone();
        while let Some(p) = todo.pop() {
            if out.insert(p) {
                todo.extend(self.concepts[p as usize].parents.iter());
            }
        }
        out
    }

    fn property_text(&self, c: &Concept, property: &str) -> Vec<String> {
        match property {
            "code" | "concept" => vec![c.code.clone()],
            "display" => c.display.clone().into_iter().collect(),
            "definition" => c.definition.clone().into_iter().collect(),
            "inactive" => vec![c.inactive.to_string()],

            "parent" if c.property("parent").next().is_none() => c
                .parents
                .iter()
                .map(|p| self.concepts[*p as usize].code.clone())
                .collect(),
            "child" if c.property("child").next().is_none() => c
                .children
                .iter()
                .map(|p| self.concepts[*p as usize].code.clone())
                .collect(),
            _ => {
                let mut out = Vec::new();
                for v in c.property(property) {
                    out.push(v.as_text());
                    // a Coding matches by its code or its display (LOINC parts: `COMPONENT =
                    // LP14635-4` or `COMPONENT = Glucose`)
                    if let PropertyValue::Coding {
                        display: Some(d), ..
                    } = v
                    {
                        out.push(d.clone());
                    }
                }
                out
            }
        }
    }

    fn eq_code(&self, a: &str, b: &str) -> bool {
        if self.case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    }

    /// Evaluates a filter to the matching concept indexes (definition order).
    pub fn filter_indexes(
        &self,
        property: &str,
        op: &str,
        value: &str,
    ) -> Result<Vec<u32>, ProviderError> {
        match (property, op) {
            // SNOMED CT `constraint =` / `expression =`: an ECL expression
            ("constraint" | "expression", "=") => {
                return crate::ecl::evaluate(self, value).map_err(|e| ProviderError(e.to_string()))
            }
            // `concept in {refset}`: members of a reference set / answer list
            ("concept", "in") if self.sets.contains_key(value.trim()) => {
                return Ok(self.set_members(value.trim()));
            }
            // LOINC `LIST = LL…`: the answers of an answer list
            ("LIST", "=") if self.url == crate::loinc::LOINC_URL => {
                return Ok(self.set_members(value.trim()))
            }
            // the concepts that are reference sets (`?fhir_vs=refset`)
            ("refset", "exists") if self.url == crate::snomed::SNOMED_URL => {
                let mut v: Vec<u32> = self.sets.keys().filter_map(|k| self.index_of(k)).collect();
                if value == "false" {
                    let set: HashSet<u32> = v.into_iter().collect();
                    v = (0..self.concepts.len() as u32)
                        .filter(|i| !set.contains(i))
                        .collect();
                }
                v.sort_unstable();
                return Ok(v);
            }
            _ => {}
        }
        let hier = matches!(property, "concept" | "code")
            || matches!(
                op,
                "is-a" | "descendent-of" | "is-not-a" | "generalizes" | "child-of"
            );
        if hier
            && matches!(
                op,
                "is-a" | "descendent-of" | "is-not-a" | "generalizes" | "child-of"
            )
        {
            let root = match self.index_of(value) {
                Some(i) => i,
                None => {
                    return if op == "is-not-a" {
                        Ok((0..self.concepts.len() as u32).collect())
                    } else {
                        Ok(Vec::new())
                    }
                }
            };
            return Ok(match op {
                "is-a" => self.descendants(root, true),
                "descendent-of" => self.descendants(root, false),
                "child-of" => {
                    let mut v = self.concepts[root as usize].children.clone();
                    v.sort_unstable();
                    v
                }
                "generalizes" => {
                    let mut v: Vec<u32> = self.ancestors_idx(root).into_iter().collect();
                    v.push(root);
                    v.sort_unstable();
                    v
                }
                _ => {
                    let ex: HashSet<u32> = self.descendants(root, true).into_iter().collect();
                    (0..self.concepts.len() as u32)
                        .filter(|i| !ex.contains(i))
                        .collect()
                }
            });
        }
        let re = if op == "regex" {
            Some(
                regex::Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| ProviderError(format!("Invalid regex '{value}': {e}")))?,
            )
        } else {
            None
        };
        let list: Vec<&str> = value.split(',').map(str::trim).collect();
        let mut out = Vec::new();
        for (i, c) in self.concepts.iter().enumerate() {
            let vals = self.property_text(c, property);
            let m = match op {
                "=" => vals.iter().any(|v| {
                    if property == "code" || property == "concept" {
                        self.eq_code(v, value)
                    } else {
                        v == value
                    }
                }),
                "in" => vals.iter().any(|v| list.contains(&v.as_str())),
                "not-in" => !vals.iter().any(|v| list.contains(&v.as_str())),
                "regex" => vals
                    .iter()
                    .any(|v| re.as_ref().map(|r| r.is_match(v)).unwrap_or(false)),
                "exists" => {
                    let want = value != "false";
                    vals.is_empty() != want
                }
                other => {
                    return Err(ProviderError(format!(
                        "The filter operation '{other}' is not supported for property '{property}'"
                    )))
                }
            };
            if m {
                out.push(i as u32);
            }
        }
        Ok(out)
    }
}

impl CodeSystemProvider for ConceptTable {
    fn url(&self) -> &str {
        &self.url
    }
    fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn content(&self) -> &str {
        &self.content
    }
    fn case_sensitive(&self) -> bool {
        self.case_sensitive
    }
    fn language(&self) -> Option<&str> {
        self.language.as_deref()
    }
    fn lookup(&self, code: &str) -> Option<Concept> {
        self.get(code).cloned()
    }
    fn parents(&self, code: &str) -> Vec<String> {
        self.get(code)
            .map(|c| {
                c.parents
                    .iter()
                    .map(|p| self.concepts[*p as usize].code.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn children(&self, code: &str) -> Vec<String> {
        self.get(code)
            .map(|c| {
                c.children
                    .iter()
                    .map(|p| self.concepts[*p as usize].code.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn property_defs(&self) -> Vec<PropertyDef> {
        self.property_defs.clone()
    }
    fn codes(&self) -> Option<Vec<String>> {
        Some(self.concepts.iter().map(|c| c.code.clone()).collect())
    }
    fn roots(&self) -> Vec<String> {
        self.concepts
            .iter()
            .filter(|c| c.parents.is_empty())
            .map(|c| c.code.clone())
            .collect()
    }
    fn filter(&self, property: &str, op: &str, value: &str) -> Result<Vec<String>, ProviderError> {
        Ok(self
            .filter_indexes(property, op, value)?
            .into_iter()
            .map(|i| self.concepts[i as usize].code.clone())
            .collect())
    }
    fn filter_matches(
        &self,
        code: &str,
        property: &str,
        op: &str,
        value: &str,
    ) -> Result<bool, ProviderError> {
        let Some(ci) = self.index_of(code) else {
            return Ok(false);
        };
        match op {
            "is-a" | "descendent-of" | "is-not-a" | "generalizes" => {
                let Some(root) = self.index_of(value) else {
                    return Ok(op == "is-not-a");
                };
                Ok(match op {
                    "is-a" => ci == root || self.has_ancestor(ci, root),
                    "descendent-of" => self.has_ancestor(ci, root),
                    "is-not-a" => !(ci == root || self.has_ancestor(ci, root)),
                    _ => ci == root || self.has_ancestor(root, ci),
                })
            }
            _ => Ok(self.filter_indexes(property, op, value)?.contains(&ci)),
        }
    }
    fn size(&self) -> Option<usize> {
        Some(self.concepts.len())
    }
    fn search(&self, text: &str, limit: usize) -> Vec<String> {
        let m = TextMatcher::new(text);
        let score = |c: &Concept| {
            m.score(
                &c.code,
                c.display
                    .as_deref()
                    .into_iter()
                    .chain(c.designations.iter().map(|d| d.value.as_str())),
            )
        };
        let mut scored: Vec<(u32, usize)> = Vec::new();
        // the index narrows the candidates; the ranking is the same as the scan's
        match self.text_index.as_ref().and_then(|ix| ix.matching(text)) {
            Some(hits) => {
                for i in hits {
                    if let Some(c) = self.concepts.get(i as usize) {
                        let s = score(c);
                        if s > 0 {
                            scored.push((s, i as usize));
                        }
                    }
                }
            }
            None => {
                for (i, c) in self.concepts.iter().enumerate() {
                    let s = score(c);
                    if s > 0 {
                        scored.push((s, i));
                    }
                }
            }
        }
        scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(limit)
            .map(|(_, i)| self.concepts[i].code.clone())
            .collect()
    }
    fn subsumes(&self, a: &str, b: &str) -> Option<Subsumption> {
        let ia = self.index_of(a)?;
        let ib = self.index_of(b)?;
        if ia == ib {
            return Some(Subsumption::Equivalent);
        }
        if self.has_ancestor(ib, ia) {
            return Some(Subsumption::Subsumes);
        }
        if self.has_ancestor(ia, ib) {
            return Some(Subsumption::SubsumedBy);
        }
        Some(Subsumption::NotSubsumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ConceptTable {
        let mut t = ConceptTable::new("http://example.org/cs", Some("1".into()));
        let a = t.add(Concept::new("A", Some("Animal".into())));
        let b = t.add(Concept::new("B", Some("Bird".into())));
        let c = t.add(Concept::new("C", Some("Canary yellow bird".into())));
        let d = t.add(Concept::new("D", Some("Dog".into())));
        t.link(a, b);
        t.link(b, c);
        t.link(a, d);
        t
    }

    #[test]
    fn hierarchy_filters() {
        let t = table();
        assert_eq!(t.filter("concept", "is-a", "B").unwrap(), vec!["B", "C"]);
        assert_eq!(
            t.filter("concept", "descendent-of", "A").unwrap(),
            vec!["B", "C", "D"]
        );
        assert_eq!(
            t.filter("concept", "is-not-a", "B").unwrap(),
            vec!["A", "D"]
        );
        assert_eq!(
            t.filter("concept", "generalizes", "C").unwrap(),
            vec!["A", "B", "C"]
        );
        assert!(t.filter_matches("C", "concept", "is-a", "A").unwrap());
        assert!(!t.filter_matches("D", "concept", "is-a", "B").unwrap());
        assert_eq!(t.subsumes("A", "C"), Some(Subsumption::Subsumes));
        assert_eq!(t.subsumes("C", "A"), Some(Subsumption::SubsumedBy));
        assert_eq!(t.subsumes("C", "D"), Some(Subsumption::NotSubsumed));
        assert_eq!(t.subsumes("C", "Z"), None);
    }

    #[test]
    fn property_filters_and_search() {
        let t = table();
        assert_eq!(t.filter("code", "regex", "[AB]").unwrap(), vec!["A", "B"]);
        assert_eq!(t.filter("code", "in", "A, D").unwrap(), vec!["A", "D"]);
        assert_eq!(t.filter("code", "not-in", "A,D").unwrap(), vec!["B", "C"]);
        assert_eq!(t.filter("parent", "=", "A").unwrap(), vec!["B", "D"]);
        assert!(t.filter("code", "regex", "(").is_err());
        assert_eq!(t.search("bi", 10), vec!["B", "C"]);
        assert_eq!(t.search("d", 10)[0], "D");
        assert_eq!(t.search("yel bir", 10), vec!["C"]);
    }
}
