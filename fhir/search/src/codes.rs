//! Token modifiers that need a terminology service: `:in` / `:not-in` (a value set) and
//! `:above` / `:below` (the code system's hierarchy).
//!
//! `kiln-search` has no terminology dependency. [`parse`](crate::parse) keeps these values
//! unresolved (`SearchValue::Uri` = the value set, `SearchValue::Token` = system|code); the
//! caller lists them with [`SearchQuery::code_set_requests`], resolves each into (system, code)
//! pairs with whatever terminology it has, and rewrites the query with
//! [`SearchQuery::resolve_code_sets`] before planning. [`plan`](crate::plan()) refuses a query
//! with unresolved values. The resolved values are plain IN / NOT IN lists over
//! `search_token (system, code)`.

use kiln_fhir::Issue;

use crate::filter::FilterNode;
use crate::query::{Criterion, Modifier, ParamClause, SearchQuery, SearchValue};
use crate::registry::ParamType;

/// What one unresolved value asks the terminology service for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CodeSetRequest {
    /// `:in` / `:not-in`: the codes of a value set, given as a canonical URL (optionally
    /// `|version`) or a literal reference (`ValueSet/123`).
    ValueSet(String),
    /// `:below`: the code and every code it subsumes (`is-a`).
    Below { system: String, code: String },
    /// `:above`: the code and every code subsuming it (`generalizes`).
    Above { system: String, code: String },
}

/// Resolves one request into (system, code) pairs, or says why it cannot.
pub type CodeSetResolver<'r> =
    dyn FnMut(&CodeSetRequest) -> Result<Vec<(String, String)>, String> + 'r;

/// An unresolved value with where it came from (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCodeSet {
    pub request: CodeSetRequest,
    /// The parameter as written (`code:below`).
    pub parameter: String,
    /// The value as written (`http://loinc.org|LP1234`).
    pub value: String,
}

fn modifier_name(m: &Modifier) -> &'static str {
    match m {
        Modifier::In => "in",
        Modifier::NotIn => "not-in",
        Modifier::Above => "above",
        _ => "below",
    }
}

fn needs_terminology(c: &ParamClause) -> bool {
    c.param_type == ParamType::Token
        && matches!(
            c.modifier,
            Modifier::In | Modifier::NotIn | Modifier::Above | Modifier::Below
        )
}

fn request_of(c: &ParamClause, v: &SearchValue) -> Option<PendingCodeSet> {
    let parameter = format!("{}:{}", c.code, modifier_name(&c.modifier));
    let (request, value) = match (&c.modifier, v) {
        (Modifier::In | Modifier::NotIn, SearchValue::Uri(u)) => {
            (CodeSetRequest::ValueSet(u.clone()), u.clone())
        }
        (
            Modifier::Above | Modifier::Below,
            SearchValue::Token {
                system: Some(Some(system)),
                code: Some(code),
            },
        ) => {
            let value = format!("{system}|{code}");
            let (system, code) = (system.clone(), code.clone());
            let r = if c.modifier == Modifier::Above {
                CodeSetRequest::Above { system, code }
            } else {
                CodeSetRequest::Below { system, code }
            };
            (r, value)
        }
        _ => return None,
    };
    Some(PendingCodeSet {
        request,
        parameter,
        value,
    })
}

fn visit_clauses<'q>(c: &'q Criterion, f: &mut dyn FnMut(&'q ParamClause)) {
    match c {
        Criterion::Param(p) => f(p),
        Criterion::Chain { inner, .. }
        | Criterion::Has { inner, .. }
        | Criterion::ForTypes { inner, .. } => visit_clauses(inner, f),
        Criterion::Filter(node) => visit_filter(node, f),
        _ => {}
    }
}

fn visit_filter<'q>(n: &'q FilterNode, f: &mut dyn FnMut(&'q ParamClause)) {
    match n {
        FilterNode::Leaf(c) => visit_clauses(c, f),
        FilterNode::Not(i) => visit_filter(i, f),
        FilterNode::And(items) | FilterNode::Or(items) => {
            for i in items {
                visit_filter(i, f)
            }
        }
    }
}

fn visit_clauses_mut(c: &mut Criterion, f: &mut dyn FnMut(&mut ParamClause)) {
    match c {
        Criterion::Param(p) => f(p),
        Criterion::Chain { inner, .. }
        | Criterion::Has { inner, .. }
        | Criterion::ForTypes { inner, .. } => visit_clauses_mut(inner, f),
        Criterion::Filter(node) => visit_filter_mut(node, f),
        _ => {}
    }
}

fn visit_filter_mut(n: &mut FilterNode, f: &mut dyn FnMut(&mut ParamClause)) {
    match n {
        FilterNode::Leaf(c) => visit_clauses_mut(c, f),
        FilterNode::Not(i) => visit_filter_mut(i, f),
        FilterNode::And(items) | FilterNode::Or(items) => {
            for i in items {
                visit_filter_mut(i, f)
            }
        }
    }
}

impl SearchQuery {
    /// Every value that must be resolved through a terminology service before planning
    /// (in query order, duplicates kept).
    pub fn code_set_requests(&self) -> Vec<PendingCodeSet> {
        let mut out = Vec::new();
        for c in &self.criteria {
            visit_clauses(c, &mut |p| {
                if needs_terminology(p) {
                    out.extend(p.values.iter().filter_map(|v| request_of(p, v)));
                }
            });
        }
        out
    }

    /// Replaces every unresolved value by the (system, code) pairs `resolve` returns for its
    /// request. `resolve` returning `Err(reason)` makes the search fail with a 4xx issue naming
    /// the parameter and the value.
    pub fn resolve_code_sets(
        &mut self,
        resolve: &mut CodeSetResolver<'_>,
    ) -> Result<(), Vec<Issue>> {
        let mut errors = Vec::new();
        for c in &mut self.criteria {
            visit_clauses_mut(c, &mut |p| {
                if !needs_terminology(p) {
                    return;
                }
                let mut values = Vec::with_capacity(p.values.len());
                for v in &p.values {
                    match request_of(p, v) {
                        Some(pending) => match resolve(&pending.request) {
                            Ok(codes) => values.push(SearchValue::Codes(codes)),
                            Err(why) => errors.push(
                                Issue::error(
                                    "invalid",
                                    format!(
                                        "Invalid value '{}' for search parameter '{}': {why}",
                                        pending.value, pending.parameter
                                    ),
                                )
                                .at(pending.parameter.clone()),
                            ),
                        },
                        None => values.push(v.clone()),
                    }
                }
                p.values = values;
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Whether some `:in`/`:not-in`/`:above`/`:below` token value is still unresolved.
    pub fn has_unresolved_code_sets(&self) -> bool {
        !self.code_set_requests().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::parse;
    use crate::query::tests::R4;

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn filter_terminology_operators() {
        let mut q = parse(
            &R4,
            Some("Observation"),
            &p(&[(
                "_filter",
                "code in http://vs/a or (code sb http://s|x and not (status ni http://vs/b)) or code ss http://s|y",
            )]),
            true,
        )
        .unwrap();
        let reqs: Vec<CodeSetRequest> = q
            .code_set_requests()
            .into_iter()
            .map(|r| r.request)
            .collect();
        assert_eq!(
            reqs,
            vec![
                CodeSetRequest::ValueSet("http://vs/a".into()),
                CodeSetRequest::Below {
                    system: "http://s".into(),
                    code: "x".into()
                },
                CodeSetRequest::ValueSet("http://vs/b".into()),
                CodeSetRequest::Above {
                    system: "http://s".into(),
                    code: "y".into()
                },
            ]
        );
        q.resolve_code_sets(&mut |_| Ok(vec![("http://s".into(), "x".into())]))
            .unwrap();
        let plan = crate::plan(
            &q,
            crate::Dialect::Sqlite,
            &crate::PageRequest {
                count: 10,
                cursor: None,
            },
        )
        .unwrap();
        assert!(plan.sql.contains("NOT IN"), "{}", plan.sql);
        assert!(parse(
            &R4,
            Some("Observation"),
            &p(&[("_filter", "code sb x")]),
            true
        )
        .is_err());
        assert!(parse(
            &R4,
            Some("Patient"),
            &p(&[("_filter", "birthdate in http://vs")]),
            true
        )
        .is_err());
    }

    #[test]
    fn requests_and_resolution() {
        let mut q = parse(
            &R4,
            Some("Observation"),
            &p(&[
                ("code:in", "http://vs/a,ValueSet/7"),
                ("code:below", "http://loinc.org|LP1"),
                ("subject:Patient.gender:not-in", "http://vs/g"),
                ("category:above", "http://x|y"),
            ]),
            true,
        )
        .unwrap();
        let reqs: Vec<CodeSetRequest> = q
            .code_set_requests()
            .into_iter()
            .map(|r| r.request)
            .collect();
        assert_eq!(
            reqs,
            vec![
                CodeSetRequest::ValueSet("http://vs/a".into()),
                CodeSetRequest::ValueSet("ValueSet/7".into()),
                CodeSetRequest::Below {
                    system: "http://loinc.org".into(),
                    code: "LP1".into()
                },
                CodeSetRequest::ValueSet("http://vs/g".into()),
                CodeSetRequest::Above {
                    system: "http://x".into(),
                    code: "y".into()
                },
            ]
        );
        assert!(q.has_unresolved_code_sets());
        let pending = q.code_set_requests();
        assert_eq!(pending[2].parameter, "code:below");
        assert_eq!(pending[2].value, "http://loinc.org|LP1");
        // unresolved queries are not planned
        assert!(crate::plan(&q, crate::Dialect::Sqlite, &Default::default()).is_err());
        q.resolve_code_sets(&mut |r| match r {
            CodeSetRequest::ValueSet(u) if u == "ValueSet/7" => Err("no such value set".into()),
            _ => Ok(vec![("http://s".into(), "c".into())]),
        })
        .map(|_| ())
        .unwrap_err()
        .iter()
        .for_each(|i| {
            assert!(i.diagnostics.contains("code:in") && i.diagnostics.contains("ValueSet/7"))
        });
        let mut q = parse(
            &R4,
            Some("Observation"),
            &p(&[
                ("code:in", "http://vs/a"),
                ("subject:Patient.gender:not-in", "http://vs/g"),
            ]),
            true,
        )
        .unwrap();
        q.resolve_code_sets(&mut |r| match r {
            CodeSetRequest::ValueSet(u) if u == "http://vs/a" => Ok(vec![
                ("http://loinc.org".into(), "1-1".into()),
                ("http://loinc.org".into(), "2-2".into()),
                ("http://snomed.info/sct".into(), "3".into()),
            ]),
            _ => Ok(vec![]),
        })
        .unwrap();
        assert!(!q.has_unresolved_code_sets());
        let plan = crate::plan(
            &q,
            crate::Dialect::Postgres,
            &crate::PageRequest {
                count: 10,
                cursor: None,
            },
        )
        .unwrap();
        // grouped by system: one IN list per code system
        assert!(
            plan.sql.contains(".code IN ($") && plan.sql.contains(".system = $"),
            "{}",
            plan.sql
        );
        assert!(plan.sql.contains("NOT IN"), "{}", plan.sql);
        assert!(plan
            .params
            .contains(&crate::SqlValue::Text("http://snomed.info/sct".into())));
    }
}
