//! Parsing of search parameters (`GET [base]/[type]?…`) into a [`SearchQuery`].

use kiln_fhir::Issue;

use crate::filter::{parse_filter, FilterNode};
use crate::index::is_resource_column_param;
use crate::registry::{BoundParam, ParamType, Registry};
use crate::value::{parse_date_range, parse_decimal, parse_reference, DateRange, Decimal};

/// Comparison prefix of number / date / quantity values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    pub fn parse(s: &str) -> Option<Prefix> {
        Some(match s {
            "eq" => Prefix::Eq,
            "ne" => Prefix::Ne,
            "gt" => Prefix::Gt,
            "lt" => Prefix::Lt,
            "ge" => Prefix::Ge,
            "le" => Prefix::Le,
            "sa" => Prefix::Sa,
            "eb" => Prefix::Eb,
            "ap" => Prefix::Ap,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
            Prefix::Sa => "sa",
            Prefix::Eb => "eb",
            Prefix::Ap => "ap",
        }
    }
}

/// A parameter modifier (`:exact`, `:not`, `:Patient`, …). `StartsWith` is the default of
/// string parameters; `EndsWith` / `NormEq` only arise from `_filter` (`ew`, `eq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    None,
    Missing,
    Exact,
    Contains,
    Text,
    Not,
    Above,
    Below,
    In,
    NotIn,
    OfType,
    Identifier,
    Type(String),
    EndsWith,
    NormEq,
}

/// One parsed value (an OR alternative).
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    String(String),
    /// `system`: `None` = any system, `Some(None)` = no system (`|code`), `Some(Some(s))`.
    Token {
        system: Option<Option<String>>,
        code: Option<String>,
    },
    Date(Prefix, DateRange),
    Number(Prefix, Decimal),
    Quantity {
        prefix: Prefix,
        value: Decimal,
        system: Option<String>,
        code: Option<String>,
    },
    Reference {
        ref_type: Option<String>,
        id: Option<String>,
        version: Option<String>,
        url: Option<String>,
    },
    Uri(String),
    Composite(Vec<SearchValue>),
    Missing(bool),
    /// reference `:identifier` / token `:of-type` (`system|code|value` → type system/code in
    /// `system`/`code`, `value` in `value`)
    Identifier {
        system: Option<String>,
        value: String,
    },
    OfType {
        system: Option<String>,
        code: String,
        value: String,
    },
    /// A token value resolved through the terminology service (`:in`, `:not-in`, `:above`,
    /// `:below`): the (system, code) pairs it stands for. See [`crate::codes`].
    Codes(Vec<(String, String)>),
    /// reference `:above` / `:below`: `ref_type/id` and the resources above or below it through
    /// `ref_type`'s circular `hierarchy_param`.
    Hierarchy {
        ref_type: String,
        id: String,
        hierarchy_param: String,
        below: bool,
    },
}

/// A parameter with its OR-ed values.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamClause {
    pub code: String,
    pub param_type: ParamType,
    pub modifier: Modifier,
    pub values: Vec<SearchValue>,
    /// component types (composite parameters)
    pub components: Vec<ParamType>,
}

/// One AND-ed search criterion.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    Param(ParamClause),
    /// `subject:Patient.name=x`: resources whose `reference_param` points at a resource of one of
    /// `target_types` satisfying `inner`.
    Chain {
        reference_param: String,
        target_types: Vec<String>,
        inner: Box<Criterion>,
    },
    /// `_has:Observation:patient:code=x`: resources referenced through `reference_param` by a
    /// `source_type` resource satisfying `inner`.
    Has {
        source_type: String,
        reference_param: String,
        inner: Box<Criterion>,
    },
    Filter(FilterNode),
    /// `_list=42`: resources that are an `entry.item` of one of these List resources.
    List(Vec<String>),
    /// `near=lat|long|distance|unit` on `Location.position`: within `km` kilometres.
    Near {
        latitude: f64,
        longitude: f64,
        km: f64,
    },
    /// `inner` applies to the resources of `types` only; resources of other types pass
    /// (`$everything`'s care-date window: each type filtered on its own clinical date).
    ForTypes {
        types: Vec<String>,
        inner: Box<Criterion>,
    },
}

/// Distance assumed when `near` gives none (the spec leaves it to the server).
pub const NEAR_DEFAULT_KM: f64 = 10.0;

fn parse_near(value: &str) -> Result<Criterion, String> {
    let parts: Vec<&str> = value.split('|').collect();
    if parts.len() < 2 || parts.len() > 4 {
        return Err("expected latitude|longitude[|distance[|units]]".into());
    }
    let num = |s: &str, what: &str| -> Result<f64, String> {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("{what} '{s}' is not a number"))
    };
    let latitude = num(parts[0], "latitude")?;
    let longitude = num(parts[1], "longitude")?;
    if !(-90.0..=90.0).contains(&latitude) || !(-180.0..=180.0).contains(&longitude) {
        return Err("latitude must be within ±90 and longitude within ±180".into());
    }
    let distance = match parts.get(2).filter(|d| !d.is_empty()) {
        Some(d) => num(d, "distance")?,
        None => NEAR_DEFAULT_KM,
    };
    if distance < 0.0 {
        return Err("distance must not be negative".into());
    }
    let factor = match parts.get(3).copied().unwrap_or("km") {
        "" | "km" => 1.0,
        "m" => 0.001,
        "mi" | "[mi_i]" | "[mi_us]" => 1.609344,
        "[nmi_i]" => 1.852,
        u => {
            return Err(format!(
                "unknown distance unit '{u}' (km, m, [mi_i] or [nmi_i])"
            ))
        }
    };
    Ok(Criterion::Near {
        latitude,
        longitude,
        km: distance * factor,
    })
}

/// `_sort` key.
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub code: String,
    pub param_type: ParamType,
    pub descending: bool,
}

/// `_include` / `_revinclude`.
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    /// source resource type (`*` for `_include=*`)
    pub source_type: String,
    /// reference parameter code, `None` for `Type:*` / `*`
    pub param: Option<String>,
    pub target_type: Option<String>,
    pub iterate: bool,
}

/// A compartment restriction (`Patient/123/Observation`).
#[derive(Debug, Clone, PartialEq)]
pub struct Compartment {
    pub compartment_type: String,
    /// The focal resource's id; [`ANY_COMPARTMENT`] (`*`, which no FHIR id can be) for the
    /// compartments of every resource of `compartment_type` (type-level `Patient/$everything`).
    pub id: String,
    /// Per resource type, the reference parameters linking it to the compartment.
    pub params: Vec<(String, Vec<String>)>,
    /// Types outside the compartment whose resources also match when a member of the
    /// compartment references them through a reference search parameter (`$everything`:
    /// the Practitioners, Organizations, Medications… the patient's records point at).
    pub referenced: Vec<String>,
}

/// [`Compartment::id`] meaning every compartment of the type.
pub const ANY_COMPARTMENT: &str = "*";

/// A parsed search.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchQuery {
    pub resource_type: Option<String>,
    /// `_type` (system search)
    pub types: Vec<String>,
    pub criteria: Vec<Criterion>,
    pub compartment: Option<Compartment>,
    pub sort: Vec<SortKey>,
    pub count: Option<usize>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub summary: Option<String>,
    pub elements: Vec<String>,
    pub total: Option<String>,
    pub contained: Option<String>,
    pub contained_type: Option<String>,
    /// Warnings (unknown parameters dropped in lenient mode).
    pub warnings: Vec<Issue>,
    self_params: Vec<(String, String)>,
}

impl SearchQuery {
    /// The parameters actually used, for the Bundle `self` link (unknown parameters dropped in
    /// lenient mode; paging/format parameters excluded).
    pub fn self_link_params(&self) -> &[(String, String)] {
        &self.self_params
    }

    /// The resource types the search runs over (`[type]`, else `_type`, else all).
    pub fn target_types(&self) -> Vec<String> {
        match &self.resource_type {
            Some(t) => vec![t.clone()],
            None => self.types.clone(),
        }
    }

    /// Restricts the search to a compartment (`Patient/123/Observation` or `Patient/123/*`).
    pub fn with_compartment(
        mut self,
        registry: &Registry,
        compartment_type: &str,
        id: &str,
    ) -> Result<SearchQuery, Vec<Issue>> {
        let types: Vec<String> = match &self.resource_type {
            Some(t) => vec![t.clone()],
            None => registry
                .compartment_types(compartment_type)
                .into_iter()
                .map(str::to_string)
                .collect(),
        };
        if types.is_empty() && registry.compartment_params(compartment_type, "x").is_none() {
            return Err(vec![Issue::error(
                "not-supported",
                format!("Unknown compartment '{compartment_type}'"),
            )]);
        }
        let mut params = Vec::new();
        for t in &types {
            match registry.compartment_params(compartment_type, t) {
                None => {
                    return Err(vec![Issue::error(
                        "not-supported",
                        format!("Unknown compartment '{compartment_type}'"),
                    )]);
                }
                Some([]) => {
                    if self.resource_type.is_some() {
                        return Err(vec![Issue::error(
                            "invalid",
                            format!(
                                "Resource type {t} is not in the {compartment_type} compartment"
                            ),
                        )]);
                    }
                }
                Some(p) => params.push((t.clone(), p.to_vec())),
            }
        }
        if self.resource_type.is_none() && self.types.is_empty() {
            self.types = params.iter().map(|(t, _)| t.clone()).collect();
        }
        self.compartment = Some(Compartment {
            compartment_type: compartment_type.to_string(),
            id: id.to_string(),
            params,
            referenced: Vec::new(),
        });
        Ok(self)
    }

    /// Also matches the resources of `types` (types outside the compartment) that a member of
    /// the compartment references (see [`Compartment::referenced`]). Needs a compartment.
    pub fn with_referenced(mut self, types: Vec<String>) -> SearchQuery {
        if let Some(comp) = &mut self.compartment {
            for t in types {
                if !self.types.contains(&t) {
                    self.types.push(t.clone());
                }
                if !comp.referenced.contains(&t) {
                    comp.referenced.push(t);
                }
            }
        }
        self
    }

    /// Adds a criterion applied to the resources of `ty` only (see [`Criterion::ForTypes`]):
    /// any of the `alternatives` (`(name, value)` search parameters, OR-ed) must match.
    pub fn add_for_type(
        &mut self,
        registry: &Registry,
        ty: &str,
        alternatives: &[(&str, &str)],
    ) -> Result<(), Vec<Issue>> {
        let mut parsed = Vec::new();
        for (name, value) in alternatives {
            match parse_criterion(registry, &[ty.to_string()], name, value) {
                Ok(c) => parsed.push(c),
                Err(CritError::Unknown(msg)) => {
                    return Err(vec![Issue::error("not-supported", msg).at(name.to_string())])
                }
                Err(CritError::Invalid(issue)) => return Err(vec![issue]),
            }
        }
        let inner = if parsed.len() == 1 {
            parsed.remove(0)
        } else {
            Criterion::Filter(FilterNode::Or(
                parsed
                    .into_iter()
                    .map(|c| FilterNode::Leaf(Box::new(c)))
                    .collect(),
            ))
        };
        self.criteria.push(Criterion::ForTypes {
            types: vec![ty.to_string()],
            inner: Box::new(inner),
        });
        Ok(())
    }

    /// Replaces the parameters the paging links repeat (an operation such as `$everything`
    /// pages with its own parameters, not the search parameters it was translated into).
    pub fn set_self_link_params(&mut self, params: Vec<(String, String)>) {
        self.self_params = params;
    }
}

/// Splits on an unescaped separator (`\,` stays in the segment, still escaped).
pub fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// Removes search escapes (`\,` `\$` `\|` `\\`).
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn invalid(name: &str, value: &str, why: impl std::fmt::Display) -> Issue {
    Issue::error(
        "invalid",
        format!("Invalid value '{value}' for search parameter '{name}': {why}"),
    )
    .at(name.to_string())
}

const RESULT_PARAMS: &[&str] = &[
    "_sort",
    "_count",
    "_include",
    "_revinclude",
    "_summary",
    "_elements",
    "_total",
    "_contained",
    "_containedType",
    "_type",
    "_filter",
];

/// Parameters that are the server's business (format, paging cursor): ignored, not in `self`.
const IGNORED_PARAMS: &[&str] = &[
    "_format", "_pretty", "_cursor", "_page", "_offset", "_explain",
];

/// Parses search parameters. `strict` = `Prefer: handling=strict` (unknown parameters are
/// errors); otherwise unknown parameters are dropped with a warning.
pub fn parse(
    registry: &Registry,
    resource_type: Option<&str>,
    params: &[(String, String)],
    strict: bool,
) -> Result<SearchQuery, Vec<Issue>> {
    let mut q = SearchQuery {
        resource_type: resource_type.map(str::to_string),
        ..Default::default()
    };
    let mut errors = Vec::new();
    // _type first: it decides which parameters are known in a system search
    for (name, value) in params {
        if name == "_type" {
            for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                q.types.push(t.to_string());
            }
        }
    }
    for (name, value) in params {
        let base = name.split(':').next().unwrap_or(name);
        if IGNORED_PARAMS.contains(&base) {
            continue;
        }
        let mut keep = true;
        if RESULT_PARAMS.contains(&base) {
            if let Err(e) = parse_result_param(registry, &mut q, name, value) {
                errors.push(e);
            }
        } else {
            let types = q.target_types();
            match parse_criterion(registry, &types, name, value) {
                Ok(c) => q.criteria.push(c),
                Err(CritError::Unknown(msg)) => {
                    if strict {
                        errors.push(Issue::error("not-supported", msg).at(name.clone()));
                    } else {
                        q.warnings
                            .push(Issue::warning("not-supported", msg).at(name.clone()));
                        keep = false;
                    }
                }
                Err(CritError::Invalid(issue)) => errors.push(issue),
            }
        }
        if keep {
            q.self_params.push((name.clone(), value.clone()));
        }
    }
    if errors.is_empty() {
        Ok(q)
    } else {
        Err(errors)
    }
}

fn parse_result_param(
    registry: &Registry,
    q: &mut SearchQuery,
    name: &str,
    value: &str,
) -> Result<(), Issue> {
    let (base, modifier) = match name.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (name, None),
    };
    let types = q.target_types();
    match base {
        "_type" => {}
        "_count" => {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| invalid(name, value, "expected a non-negative integer"))?;
            q.count = Some(n);
        }
        "_total" => match value {
            "none" | "estimate" | "accurate" => q.total = Some(value.to_string()),
            _ => return Err(invalid(name, value, "expected none, estimate or accurate")),
        },
        "_summary" => match value {
            "true" | "false" | "text" | "data" | "count" => q.summary = Some(value.to_string()),
            _ => {
                return Err(invalid(
                    name,
                    value,
                    "expected true, false, text, data or count",
                ))
            }
        },
        "_contained" => match value {
            "true" | "false" | "both" => q.contained = Some(value.to_string()),
            _ => return Err(invalid(name, value, "expected true, false or both")),
        },
        "_containedType" => match value {
            "container" | "contained" => q.contained_type = Some(value.to_string()),
            _ => return Err(invalid(name, value, "expected container or contained")),
        },
        "_elements" => {
            q.elements.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
        }
        "_sort" => {
            for key in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (descending, code) = match key.strip_prefix('-') {
                    Some(c) => (true, c),
                    None => (false, key),
                };
                let param_type = resolve_param(registry, &types, code)
                    .map(|p| p.param_type())
                    .ok_or_else(|| {
                        invalid(name, value, format!("unknown sort parameter '{code}'"))
                    })?;
                if matches!(param_type, ParamType::Composite | ParamType::Special) {
                    return Err(invalid(
                        name,
                        value,
                        format!("cannot sort on {} parameter '{code}'", param_type.as_str()),
                    ));
                }
                q.sort.push(SortKey {
                    code: code.to_string(),
                    param_type,
                    descending,
                });
            }
        }
        "_include" | "_revinclude" => {
            let iterate = match modifier {
                None => false,
                Some("iterate") | Some("recurse") => true,
                Some(m) => return Err(invalid(name, value, format!("unknown modifier ':{m}'"))),
            };
            let inc =
                parse_include(registry, value, iterate).map_err(|why| invalid(name, value, why))?;
            if base == "_include" {
                q.includes.push(inc);
            } else {
                q.revincludes.push(inc);
            }
        }
        "_filter" => {
            let node =
                parse_filter(registry, &types, value).map_err(|why| invalid(name, value, why))?;
            q.criteria.push(Criterion::Filter(node));
        }
        _ => {}
    }
    Ok(())
}

fn parse_include(registry: &Registry, value: &str, iterate: bool) -> Result<Include, String> {
    if value == "*" {
        return Ok(Include {
            source_type: "*".into(),
            param: None,
            target_type: None,
            iterate,
        });
    }
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err("expected Type:param[:targetType]".into());
    }
    let source_type = parts[0].to_string();
    let param = if parts[1] == "*" {
        None
    } else {
        let p = registry
            .get(Some(&source_type), parts[1])
            .ok_or_else(|| format!("unknown parameter '{}' on {source_type}", parts[1]))?;
        if p.param_type() != ParamType::Reference {
            return Err(format!("'{}' is not a reference parameter", parts[1]));
        }
        Some(parts[1].to_string())
    };
    Ok(Include {
        source_type,
        param,
        target_type: parts.get(2).map(|s| s.to_string()),
        iterate,
    })
}

pub(crate) enum CritError {
    Unknown(String),
    Invalid(Issue),
}

/// Looks a parameter up for every type of a (possibly multi-type) search: it must exist on all.
pub(crate) fn resolve_param<'r>(
    registry: &'r Registry,
    types: &[String],
    code: &str,
) -> Option<&'r BoundParam> {
    if types.is_empty() {
        return registry.get(None, code);
    }
    let mut found = None;
    for t in types {
        found = Some(registry.get(Some(t), code)?);
    }
    found
}

pub(crate) fn parse_criterion(
    registry: &Registry,
    types: &[String],
    name: &str,
    value: &str,
) -> Result<Criterion, CritError> {
    if name == "_list" {
        let mut ids = Vec::new();
        for id in value.split(',').map(str::trim) {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                return Err(CritError::Invalid(invalid(
                    name,
                    value,
                    "expected the id of a List resource (functional lists such as $current-problems are not supported)",
                )));
            }
            ids.push(id.to_string());
        }
        return Ok(Criterion::List(ids));
    }
    if let Some(m) = name.strip_prefix("_list:") {
        return Err(CritError::Invalid(invalid(
            name,
            value,
            format!("'_list' takes no modifier ':{m}'"),
        )));
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        // _has:Type:refParam:rest
        let mut it = rest.splitn(3, ':');
        let (Some(src), Some(refp), Some(inner_name)) = (it.next(), it.next(), it.next()) else {
            return Err(CritError::Invalid(invalid(
                name,
                value,
                "expected _has:Type:reference:parameter",
            )));
        };
        match registry.get(Some(src), refp) {
            Some(p) if p.param_type() == ParamType::Reference => {}
            _ => {
                return Err(CritError::Unknown(format!(
                    "Unknown reference parameter '{refp}' on {src} in '{name}'"
                )))
            }
        }
        let inner = parse_criterion(registry, &[src.to_string()], inner_name, value)?;
        return Ok(Criterion::Has {
            source_type: src.to_string(),
            reference_param: refp.to_string(),
            inner: Box::new(inner),
        });
    }
    if let Some((head, tail)) = name.split_once('.') {
        // chain
        let (code, type_mod) = match head.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (head, None),
        };
        let p = resolve_param(registry, types, code).ok_or_else(|| {
            CritError::Unknown(format!(
                "Unknown search parameter '{code}' in chain '{name}'"
            ))
        })?;
        if p.param_type() != ParamType::Reference {
            return Err(CritError::Invalid(invalid(
                name,
                value,
                format!("'{code}' is not a reference parameter"),
            )));
        }
        let chain_code = tail.split([':', '.']).next().unwrap_or(tail);
        let candidates: Vec<String> = match type_mod {
            Some(t) => vec![t.to_string()],
            None => p.def.targets.clone(),
        };
        let target_types: Vec<String> = candidates
            .into_iter()
            .filter(|t| registry.get(Some(t), chain_code).is_some())
            .collect();
        if target_types.is_empty() {
            return Err(CritError::Unknown(format!(
                "Unknown chained parameter '{chain_code}' in '{name}'"
            )));
        }
        // parse the rest once per type; all must accept the value
        let inner = parse_criterion(registry, &target_types, tail, value)?;
        return Ok(Criterion::Chain {
            reference_param: code.to_string(),
            target_types,
            inner: Box::new(inner),
        });
    }
    let (code, modifier) = match name.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (name, None),
    };
    let p = resolve_param(registry, types, code)
        .ok_or_else(|| CritError::Unknown(format!("Unknown search parameter '{code}'")))?;
    if code == "near" && p.param_type() == ParamType::Special && p.path.is_some() {
        if let Some(m) = modifier {
            return Err(CritError::Invalid(invalid(
                name,
                value,
                format!("'near' takes no modifier ':{m}'"),
            )));
        }
        return parse_near(value).map_err(|why| CritError::Invalid(invalid(name, value, why)));
    }
    let answered_without_index = matches!(code, "_id" | "_lastUpdated" | "_content" | "_text");
    if (p.path.is_none() && !answered_without_index) || p.param_type() == ParamType::Special {
        // e.g. `_query`, `_list`, `near`: known, but nothing indexes them
        return Err(CritError::Invalid(
            Issue::error(
                "not-supported",
                format!("Search parameter '{code}' is not supported by this server"),
            )
            .at(name.to_string()),
        ));
    }
    let modifier =
        parse_modifier(p, modifier).map_err(|why| CritError::Invalid(invalid(name, value, why)))?;
    let mut clause = parse_clause(p, modifier, value)
        .map_err(|why| CritError::Invalid(invalid(name, value, why)))?;
    if clause.param_type == ParamType::Reference
        && matches!(clause.modifier, Modifier::Above | Modifier::Below)
    {
        clause.values = hierarchy_values(registry, &clause)
            .map_err(|why| CritError::Invalid(invalid(name, value, why)))?;
    }
    Ok(Criterion::Param(clause))
}

/// `:above` / `:below` on a reference (search.html "Searching Hierarchies"): the target type's
/// circular reference parameter (`Location.partof`, `Organization.partof`, `Encounter.part-of`)
/// spans the hierarchy. `:below` = the referenced resource and every resource transitively part
/// of it; `:above` = it and every resource it is transitively part of.
fn hierarchy_values(registry: &Registry, c: &ParamClause) -> Result<Vec<SearchValue>, String> {
    let below = c.modifier == Modifier::Below;
    let mut out = Vec::new();
    for v in &c.values {
        let SearchValue::Reference {
            ref_type: Some(t),
            id: Some(id),
            ..
        } = v
        else {
            return Err("':above' / ':below' on a reference need Type/id".into());
        };
        let hierarchy = registry
            .params_for(t)
            .into_iter()
            .find(|p| {
                p.param_type() == ParamType::Reference
                    && p.path.is_some()
                    && p.def.targets.len() == 1
                    && p.def.targets[0] == *t
            })
            .ok_or_else(|| format!("{t} has no hierarchy (no circular reference parameter)"))?;
        out.push(SearchValue::Hierarchy {
            ref_type: t.clone(),
            id: id.clone(),
            hierarchy_param: hierarchy.code().to_string(),
            below,
        });
    }
    Ok(out)
}

fn parse_modifier(p: &BoundParam, m: Option<&str>) -> Result<Modifier, String> {
    let Some(m) = m else {
        return Ok(match (p.param_type(), p.code()) {
            (ParamType::String, "_text" | "_content") => Modifier::Contains,
            (ParamType::String, _) => Modifier::None,
            _ => Modifier::None,
        });
    };
    let t = p.param_type();
    let modifier = match m {
        "missing" => Modifier::Missing,
        "exact" if t == ParamType::String => Modifier::Exact,
        "contains" if matches!(t, ParamType::String | ParamType::Uri) => Modifier::Contains,
        "text" if t == ParamType::Token => Modifier::Text,
        "not" if t == ParamType::Token => Modifier::Not,
        "above" if matches!(t, ParamType::Uri | ParamType::Token) => Modifier::Above,
        "below" if matches!(t, ParamType::Uri | ParamType::Token) => Modifier::Below,
        "in" if t == ParamType::Token => Modifier::In,
        "not-in" if t == ParamType::Token => Modifier::NotIn,
        "of-type" if t == ParamType::Token => Modifier::OfType,
        "identifier" if t == ParamType::Reference => Modifier::Identifier,
        "above" if t == ParamType::Reference => Modifier::Above,
        "below" if t == ParamType::Reference => Modifier::Below,
        _ if t == ParamType::Reference
            && m.starts_with(|c: char| c.is_ascii_uppercase())
            && m.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            if !p.def.targets.is_empty() && !p.def.targets.iter().any(|x| x == m) {
                return Err(format!("'{m}' is not a target type of '{}'", p.code()));
            }
            Modifier::Type(m.to_string())
        }
        _ => {
            return Err(format!(
                "unknown modifier ':{m}' for a {} parameter",
                t.as_str()
            ))
        }
    };
    Ok(modifier)
}

pub(crate) fn parse_clause(
    p: &BoundParam,
    modifier: Modifier,
    value: &str,
) -> Result<ParamClause, String> {
    let mut values = Vec::new();
    if modifier == Modifier::Missing {
        match value {
            "true" => values.push(SearchValue::Missing(true)),
            "false" => values.push(SearchValue::Missing(false)),
            _ => return Err("':missing' takes true or false".into()),
        }
    } else {
        let alternatives = split_unescaped(value, ',');
        for alt in alternatives {
            if alt.is_empty() {
                continue;
            }
            values.push(parse_value(p, p.param_type(), &modifier, alt)?);
        }
        if values.is_empty() {
            return Err("empty value".into());
        }
    }
    Ok(ParamClause {
        code: p.code().to_string(),
        param_type: p.param_type(),
        modifier,
        values,
        components: p.def.components.iter().map(|c| c.param_type).collect(),
    })
}

fn split_prefix(raw: &str) -> (Prefix, &str) {
    if raw.len() >= 2 && raw.is_char_boundary(2) {
        if let Some(p) = Prefix::parse(&raw[..2]) {
            return (p, &raw[2..]);
        }
    }
    (Prefix::Eq, raw)
}

/// Parses one (escaped) value of type `t`.
pub(crate) fn parse_value(
    p: &BoundParam,
    t: ParamType,
    modifier: &Modifier,
    raw: &str,
) -> Result<SearchValue, String> {
    Ok(match t {
        ParamType::String => SearchValue::String(unescape(raw)),
        ParamType::Uri => SearchValue::Uri(unescape(raw)),
        ParamType::Token => {
            if *modifier == Modifier::Text {
                return Ok(SearchValue::String(unescape(raw)));
            }
            if matches!(modifier, Modifier::In | Modifier::NotIn) {
                // a value set: canonical URL or literal reference, resolved before planning
                return Ok(SearchValue::Uri(unescape(raw)));
            }
            if p.code() == "_id" || is_resource_column_param(p.code()) {
                return Ok(SearchValue::Token {
                    system: None,
                    code: Some(unescape(raw)),
                });
            }
            let parts = split_unescaped(raw, '|');
            if matches!(modifier, Modifier::Above | Modifier::Below) {
                return match parts.as_slice() {
                    [system, code] if !system.is_empty() && !code.is_empty() => {
                        Ok(SearchValue::Token {
                            system: Some(Some(unescape(system))),
                            code: Some(unescape(code)),
                        })
                    }
                    _ => Err(
                        "':above' / ':below' on a token need system|code (the code system decides the hierarchy)"
                            .into(),
                    ),
                };
            }
            if *modifier == Modifier::OfType {
                if parts.len() != 3 {
                    return Err("':of-type' expects system|code|value".into());
                }
                return Ok(SearchValue::OfType {
                    system: Some(unescape(parts[0])).filter(|s| !s.is_empty()),
                    code: unescape(parts[1]),
                    value: unescape(parts[2]),
                });
            }
            match parts.as_slice() {
                [code] => SearchValue::Token {
                    system: None,
                    code: Some(unescape(code)),
                },
                [system, code] => SearchValue::Token {
                    system: Some(Some(unescape(system)).filter(|s| !s.is_empty())),
                    code: Some(unescape(code)).filter(|c| !c.is_empty()),
                },
                _ => return Err("too many '|' in token".into()),
            }
        }
        ParamType::Date => {
            let (prefix, rest) = split_prefix(raw);
            let range = parse_date_range(rest).ok_or("not a valid date/dateTime")?;
            SearchValue::Date(prefix, range)
        }
        ParamType::Number => {
            let (prefix, rest) = split_prefix(raw);
            SearchValue::Number(prefix, parse_decimal(rest).ok_or("not a valid number")?)
        }
        ParamType::Quantity => {
            let (prefix, rest) = split_prefix(raw);
            let parts = split_unescaped(rest, '|');
            let value = parse_decimal(parts[0]).ok_or("not a valid quantity number")?;
            let (system, code) = match parts.as_slice() {
                [_] => (None, None),
                [_, s, c] => (
                    Some(unescape(s)).filter(|s| !s.is_empty()),
                    Some(unescape(c)).filter(|c| !c.is_empty()),
                ),
                _ => return Err("expected number|system|code".into()),
            };
            SearchValue::Quantity {
                prefix,
                value,
                system,
                code,
            }
        }
        ParamType::Reference => {
            let v = unescape(raw);
            if *modifier == Modifier::Identifier {
                let parts = split_unescaped(raw, '|');
                return Ok(match parts.as_slice() {
                    [value] => SearchValue::Identifier {
                        system: None,
                        value: unescape(value),
                    },
                    [s, value] => SearchValue::Identifier {
                        system: Some(unescape(s)).filter(|s| !s.is_empty()),
                        value: unescape(value),
                    },
                    _ => return Err("expected system|value".into()),
                });
            }
            let type_mod = match modifier {
                Modifier::Type(t) => Some(t.clone()),
                _ => None,
            };
            if v.contains("://") || v.starts_with("urn:") {
                let (url, version) = match v.split_once('|') {
                    Some((u, ver)) => (u.to_string(), Some(ver.to_string())),
                    None => (v.clone(), None),
                };
                SearchValue::Reference {
                    ref_type: None,
                    id: None,
                    version,
                    url: Some(url),
                }
            } else if v.contains('/') {
                let pr = parse_reference(&v)
                    .filter(|r| r.id.is_some())
                    .ok_or("not a valid reference")?;
                if type_mod
                    .as_ref()
                    .is_some_and(|t| Some(t) != pr.res_type.as_ref())
                {
                    return Err("reference type does not match the modifier".into());
                }
                SearchValue::Reference {
                    ref_type: pr.res_type,
                    id: pr.id,
                    version: pr.version,
                    url: None,
                }
            } else {
                let single_target = (p.def.targets.len() == 1).then(|| p.def.targets[0].clone());
                SearchValue::Reference {
                    ref_type: type_mod.or(single_target),
                    id: Some(v),
                    version: None,
                    url: None,
                }
            }
        }
        ParamType::Composite => {
            let parts = split_unescaped(raw, '$');
            if parts.len() != p.def.components.len() {
                return Err(format!(
                    "expected {} '$'-separated components",
                    p.def.components.len()
                ));
            }
            let mut vals = Vec::new();
            for (c, part) in p.def.components.iter().zip(parts) {
                vals.push(parse_value(p, c.param_type, &Modifier::None, part)?);
            }
            SearchValue::Composite(vals)
        }
        ParamType::Special => return Err("special parameters are not supported".into()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use once_cell::sync::Lazy;

    pub(crate) static R4: Lazy<Registry> = Lazy::new(Registry::r4);

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn one(rt: &str, name: &str, value: &str) -> Criterion {
        let q =
            parse(&R4, Some(rt), &p(&[(name, value)]), true).unwrap_or_else(|e| panic!("{e:?}"));
        q.criteria.into_iter().next().unwrap()
    }

    fn clause(c: Criterion) -> ParamClause {
        match c {
            Criterion::Param(p) => p,
            other => panic!("not a param: {other:?}"),
        }
    }

    #[test]
    fn tokens_and_escapes() {
        let c = clause(one(
            "Observation",
            "code",
            "http://loinc.org|8867-4,|abc,xyz|,a\\,b",
        ));
        assert_eq!(c.values.len(), 4);
        assert_eq!(
            c.values[0],
            SearchValue::Token {
                system: Some(Some("http://loinc.org".into())),
                code: Some("8867-4".into())
            }
        );
        assert_eq!(
            c.values[1],
            SearchValue::Token {
                system: Some(None),
                code: Some("abc".into())
            }
        );
        assert_eq!(
            c.values[2],
            SearchValue::Token {
                system: Some(Some("xyz".into())),
                code: None
            }
        );
        assert_eq!(
            c.values[3],
            SearchValue::Token {
                system: None,
                code: Some("a,b".into())
            }
        );
        let c = clause(one("Patient", "identifier:of-type", "http://t|MR|123"));
        assert!(matches!(c.values[0], SearchValue::OfType { .. }));
        assert_eq!(
            clause(one("Observation", "code:not", "x")).modifier,
            Modifier::Not
        );
        assert_eq!(
            clause(one("Observation", "code:text", "heart")).values[0],
            SearchValue::String("heart".into())
        );
    }

    #[test]
    fn dates_prefixes_and_errors() {
        let c = clause(one("Patient", "birthdate", "ge1970-01"));
        assert!(matches!(c.values[0], SearchValue::Date(Prefix::Ge, _)));
        let e = parse(&R4, Some("Patient"), &p(&[("birthdate", "ge19x0")]), false).unwrap_err();
        assert!(
            e[0].diagnostics.contains("birthdate") && e[0].diagnostics.contains("ge19x0"),
            "{:?}",
            e
        );
        assert!(parse(&R4, Some("Patient"), &p(&[("birthdate", "xx2000")]), false).is_err());
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("birthdate:foo", "2000")]),
            false
        )
        .is_err());
        assert!(parse(&R4, Some("Patient"), &p(&[("gender:below", "male")]), false).is_err());
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("birthdate:in", "http://vs")]),
            false
        )
        .is_err());
        let c = clause(one(
            "Observation",
            "value-quantity",
            "lt5.4|http://unitsofmeasure.org|mg",
        ));
        match &c.values[0] {
            SearchValue::Quantity {
                prefix,
                value,
                code,
                ..
            } => {
                assert_eq!(*prefix, Prefix::Lt);
                assert_eq!(value.value, 5.4);
                assert_eq!(code.as_deref(), Some("mg"));
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            clause(one("RiskAssessment", "probability", "gt0.8")).values[0],
            SearchValue::Number(Prefix::Gt, _)
        ));
    }

    #[test]
    fn references_chains_has() {
        let c = clause(one("Observation", "subject", "Patient/1"));
        assert_eq!(
            c.values[0],
            SearchValue::Reference {
                ref_type: Some("Patient".into()),
                id: Some("1".into()),
                version: None,
                url: None
            }
        );
        let c = clause(one("Observation", "subject:Patient", "1"));
        assert_eq!(
            c.values[0],
            SearchValue::Reference {
                ref_type: Some("Patient".into()),
                id: Some("1".into()),
                version: None,
                url: None
            }
        );
        let c = clause(one("Observation", "patient", "1"));
        assert!(
            matches!(&c.values[0], SearchValue::Reference { ref_type: Some(t), .. } if t == "Patient")
        );
        match one("Observation", "subject:Patient.organization.name", "acme") {
            Criterion::Chain {
                reference_param,
                target_types,
                inner,
            } => {
                assert_eq!(reference_param, "subject");
                assert_eq!(target_types, vec!["Patient".to_string()]);
                assert!(matches!(*inner, Criterion::Chain { .. }));
            }
            c => panic!("{c:?}"),
        }
        match one("Observation", "subject.name", "x") {
            Criterion::Chain { target_types, .. } => assert!(
                target_types.contains(&"Patient".to_string())
                    && !target_types.contains(&"Device".to_string())
            ),
            c => panic!("{c:?}"),
        }
        match one(
            "Patient",
            "_has:Observation:patient:_has:AuditEvent:entity:agent",
            "Practitioner/1",
        ) {
            Criterion::Has {
                source_type, inner, ..
            } => {
                assert_eq!(source_type, "Observation");
                assert!(matches!(*inner, Criterion::Has { .. }));
            }
            c => panic!("{c:?}"),
        }
        assert!(parse(&R4, Some("Observation"), &p(&[("subject:Foo", "1")]), true).is_err());
        assert_eq!(
            one("Location", "near", "52.5|13.4|2|[mi_i]"),
            Criterion::Near {
                latitude: 52.5,
                longitude: 13.4,
                km: 2.0 * 1.609344
            }
        );
        assert_eq!(
            one("Location", "near", "52.5|13.4"),
            Criterion::Near {
                latitude: 52.5,
                longitude: 13.4,
                km: NEAR_DEFAULT_KM
            }
        );
        for bad in ["1", "x|2", "95|2|1", "1|2|3|parsec", "1|2|-1"] {
            let e = parse(&R4, Some("Location"), &p(&[("near", bad)]), false).unwrap_err();
            assert!(e[0].diagnostics.contains("near"), "{e:?}");
        }
        let c = clause(one("Procedure", "location:below", "Location/42"));
        assert_eq!(
            c.values[0],
            SearchValue::Hierarchy {
                ref_type: "Location".into(),
                id: "42".into(),
                hierarchy_param: "partof".into(),
                below: true
            }
        );
        assert!(parse(
            &R4,
            Some("Observation"),
            &p(&[("subject:below", "Patient/1")]),
            true
        )
        .is_err());
        assert_eq!(
            one("Patient", "_list", "42,a-b"),
            Criterion::List(vec!["42".into(), "a-b".into()])
        );
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("_list", "$current-allergies")]),
            false
        )
        .is_err());
        let e = parse(&R4, Some("Patient"), &p(&[("_query", "x")]), false).unwrap_err();
        assert_eq!(e[0].code, "not-supported");
    }

    #[test]
    fn composite_and_strict_lenient() {
        let c = clause(one(
            "Observation",
            "code-value-quantity",
            "http://loinc.org|8480-6$gt100",
        ));
        match &c.values[0] {
            SearchValue::Composite(v) => {
                assert!(matches!(v[0], SearchValue::Token { .. }));
                assert!(matches!(
                    v[1],
                    SearchValue::Quantity {
                        prefix: Prefix::Gt,
                        ..
                    }
                ));
            }
            v => panic!("{v:?}"),
        }
        let params = p(&[
            ("name", "x"),
            ("foo", "1"),
            ("_count", "5"),
            ("_format", "json"),
        ]);
        assert!(parse(&R4, Some("Patient"), &params, true).is_err());
        let q = parse(&R4, Some("Patient"), &params, false).unwrap();
        assert_eq!(
            q.self_link_params(),
            &p(&[("name", "x"), ("_count", "5")])[..]
        );
        assert_eq!(q.warnings.len(), 1);
        assert_eq!(q.count, Some(5));
    }

    #[test]
    fn contained_parameters() {
        let params = p(&[("_contained", "true"), ("_containedType", "contained")]);
        let q = parse(&R4, Some("Patient"), &params, true).unwrap();
        assert_eq!(q.contained.as_deref(), Some("true"));
        assert_eq!(q.contained_type.as_deref(), Some("contained"));
        assert_eq!(q.self_link_params(), &params[..]);
        let q = parse(&R4, Some("Patient"), &p(&[("_contained", "both")]), true).unwrap();
        assert_eq!(q.contained.as_deref(), Some("both"));
        // a malformed value is an error even when lenient
        assert!(parse(&R4, Some("Patient"), &p(&[("_contained", "maybe")]), false).is_err());
        assert!(parse(&R4, Some("Patient"), &p(&[("_containedType", "x")]), false).is_err());
    }

    #[test]
    fn escapes_and_splitting() {
        assert_eq!(split_unescaped("a\\,b,c", ','), vec!["a\\,b", "c"]);
        assert_eq!(unescape("a\\,b\\$c\\|d\\\\"), "a,b$c|d\\");
        let c = clause(one("Patient", "identifier", "http://x|a\\|b"));
        assert_eq!(
            c.values[0],
            SearchValue::Token {
                system: Some(Some("http://x".into())),
                code: Some("a|b".into())
            }
        );
        let c = clause(one("Patient", "name", "a\\$b,c"));
        assert_eq!(
            c.values,
            vec![
                SearchValue::String("a$b".into()),
                SearchValue::String("c".into())
            ]
        );
        // composite component with an escaped '$'
        let c = clause(one("Observation", "code-value-string", "x\\$y$abc"));
        match &c.values[0] {
            SearchValue::Composite(v) => {
                assert_eq!(
                    v[0],
                    SearchValue::Token {
                        system: None,
                        code: Some("x$y".into())
                    }
                );
                assert_eq!(v[1], SearchValue::String("abc".into()));
            }
            v => panic!("{v:?}"),
        }
        assert!(parse(
            &R4,
            Some("Observation"),
            &p(&[("code-value-string", "a$b$c")]),
            true
        )
        .is_err());
        // multibyte input never panics
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("birthdate", "ééé"), ("birthdate", "é")]),
            true
        )
        .is_err());
        assert!(parse(
            &R4,
            Some("Observation"),
            &p(&[("value-quantity", "g\u{e9}5")]),
            true
        )
        .is_err());
    }

    #[test]
    fn result_parameters() {
        let params = p(&[
            ("_sort", "-birthdate,name,_id"),
            ("_include", "Patient:general-practitioner:Practitioner"),
            ("_revinclude:iterate", "Observation:subject"),
            ("_summary", "count"),
            ("_total", "accurate"),
            ("_elements", "id,name"),
        ]);
        let q = parse(&R4, Some("Patient"), &params, true).unwrap();
        assert_eq!(q.sort.len(), 3);
        assert!(q.sort[0].descending && q.sort[0].param_type == ParamType::Date);
        assert_eq!(q.includes[0].target_type.as_deref(), Some("Practitioner"));
        assert!(q.revincludes[0].iterate);
        assert_eq!(q.elements, vec!["id", "name"]);
        assert!(parse(&R4, Some("Patient"), &p(&[("_sort", "nonexistent")]), true).is_err());
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("_include", "Patient:name")]),
            true
        )
        .is_err());
        assert!(parse(&R4, Some("Patient"), &p(&[("_count", "-1")]), true).is_err());
        let q = parse(
            &R4,
            None,
            &p(&[("_type", "Patient,Practitioner"), ("name", "x")]),
            true,
        )
        .unwrap();
        assert_eq!(q.types.len(), 2);
        let q = parse(&R4, Some("Observation"), &[], true)
            .unwrap()
            .with_compartment(&R4, "Patient", "1")
            .unwrap();
        assert_eq!(
            q.compartment.unwrap().params[0].1,
            vec!["subject", "performer"]
        );
        assert!(parse(&R4, Some("Organization"), &[], true)
            .unwrap()
            .with_compartment(&R4, "Patient", "1")
            .is_err());
    }
}
