//! `Patient/[id]/$everything`, `Patient/$everything` and `Encounter/[id]/$everything`
//! (patient-operation-everything.html, encounter-operation-everything.html).
//!
//! Not a second compartment implementation: the operation is translated into a search of the
//! compartment (`kiln-search`'s `with_compartment`, as `Patient/123/*`) that also matches the
//! resources outside the compartment its members reference (`Compartment::referenced`:
//! Practitioner, Organization, Location, Medication…, `search.mode = include`), and runs through
//! the search engine's `execute`: the same keyset paging (every resource on exactly one page),
//! the same SMART filtering of every entry. Parameters: `start`/`end` (Patient only: each
//! compartment type's care date, see [`care_date_param`]; records without one pass), `_since`
//! (`meta.lastUpdated`), `_type` (comma lists, repeatable), `_count` (page size).

use axum::http::StatusCode;
use kiln_search::Registry;
use kiln_smart_auth::Interaction;
use serde_json::Value;

use super::{parameters_from_query, BoxFuture, Definition, Operation, Target};
use crate::auth::Access;
use crate::error::{FhirError, FhirResult};
use crate::format::FhirResponse;
use crate::interactions::RequestContext;
use crate::state::AppState;

pub struct Everything {
    def: Definition,
}

impl Default for Everything {
    fn default() -> Self {
        Everything {
            def: Definition {
                name: "everything",
                canonical: "http://hl7.org/fhir/OperationDefinition/{type}-everything",
                system: false,
                type_level: true,
                instance: true,
                resource_types: &["Patient", "Encounter"],
                affects_state: false,
            },
        }
    }
}

/// Care-date parameters of the Patient compartment types whose `date` parameter is missing or
/// not the care date (MedicationRequest's `date` is its dosage timing); the others use `date`
/// (Encounter, Observation, Procedure, Immunization, DiagnosticReport, CarePlan, …).
const CARE_DATE: &[(&str, &str)] = &[
    ("Condition", "onset-date"),
    ("MedicationRequest", "authoredon"),
    ("MedicationAdministration", "effective-time"),
    ("MedicationDispense", "whenhandedover"),
    ("MedicationStatement", "effective"),
    ("Claim", "created"),
    ("ExplanationOfBenefit", "created"),
    ("ImagingStudy", "started"),
    ("ServiceRequest", "authored"),
    ("CommunicationRequest", "authored"),
    ("Communication", "sent"),
    ("DeviceRequest", "event-date"),
    ("Goal", "start-date"),
    ("Specimen", "collected"),
    ("NutritionOrder", "datetime"),
];

/// The date search parameter of `ty` that `start`/`end` filter on, if it has one.
pub fn care_date_param(reg: &Registry, ty: &str) -> Option<&'static str> {
    let is_date = |code: &str| {
        reg.get(Some(ty), code)
            .is_some_and(|p| p.param_type() == kiln_search::ParamType::Date)
    };
    match CARE_DATE.iter().find(|(t, _)| *t == ty) {
        Some((_, c)) => Some(*c).filter(|c| is_date(c)),
        None => Some("date").filter(|c| is_date(c)),
    }
}

/// The operation's parameters, from the query string and (POST) a `Parameters` body.
#[derive(Debug, Default, PartialEq)]
struct Request {
    start: Option<String>,
    end: Option<String>,
    since: Option<String>,
    types: Option<Vec<String>>,
    count: Option<String>,
}

/// Query-string parameters that are the server's business, not the operation's.
const IGNORED: &[&str] = &["_format", "_pretty", "_cursor", "_explain", "__explain"];

fn parse_request(
    query: &[(String, String)],
    body: &Value,
    instance: bool,
    patient: bool,
) -> FhirResult<Request> {
    let mut pairs: Vec<(String, String)> = query.to_vec();
    // GET (and POST without a body) hand the query string over as Parameters too: only a body
    // of its own adds parameters
    if *body != parameters_from_query(query) {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(FhirError::invalid_at(
                "$everything takes a Parameters resource as its body",
                "resourceType",
            ));
        }
        for p in body
            .get("parameter")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            let value = p.as_object().and_then(|o| {
                o.iter()
                    .find(|(k, _)| k.starts_with("value"))
                    .and_then(|(_, v)| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
            });
            let Some(value) = value else {
                return Err(FhirError::invalid_at(
                    format!("parameter `{name}` needs a primitive value[x]"),
                    format!("Parameters.parameter.where(name = '{name}')"),
                ));
            };
            pairs.push((name.to_string(), value));
        }
    }
    let mut r = Request::default();
    let once = |slot: &mut Option<String>, name: &str, value: &str| -> FhirResult<()> {
        if slot.is_some() {
            return Err(FhirError::invalid_at(
                format!("parameter `{name}` given more than once"),
                name.to_string(),
            ));
        }
        *slot = Some(value.to_string());
        Ok(())
    };
    for (name, value) in &pairs {
        match name.as_str() {
            "start" | "end" if patient => {
                if kiln_search::value::parse_date_range(value).is_none() {
                    return Err(FhirError::invalid_at(
                        format!("`{value}` is not a FHIR date for `{name}`"),
                        name.clone(),
                    ));
                }
                let slot = if name == "start" {
                    &mut r.start
                } else {
                    &mut r.end
                };
                once(slot, name, value)?;
            }
            "_since" => {
                // an instant: a full date and time with a zone
                if chrono::DateTime::parse_from_rfc3339(value).is_err() {
                    return Err(FhirError::invalid_at(
                        format!(
                            "`{value}` is not an instant (e.g. 2024-01-31T10:00:00Z) for `_since`"
                        ),
                        "_since",
                    ));
                }
                once(&mut r.since, name, value)?;
            }
            "_type" => {
                let list = r.types.get_or_insert_with(Vec::new);
                for t in value.split(',').map(str::trim) {
                    if !kiln_fhir::model::r4().is_resource_type(t) {
                        return Err(FhirError::invalid_at(
                            format!("`{t}` in `_type` is not a resource type"),
                            "_type",
                        ));
                    }
                    if !list.iter().any(|x| x == t) {
                        list.push(t.to_string());
                    }
                }
            }
            "_count" => {
                if value.trim().parse::<usize>().is_err() {
                    return Err(FhirError::invalid_at(
                        format!("`_count` must be a non-negative integer, not `{value}`"),
                        "_count",
                    ));
                }
                once(&mut r.count, name, value)?;
            }
            n if IGNORED.contains(&n) => {}
            other => {
                return Err(FhirError::invalid_at(
                    format!(
                        "unknown parameter `{other}` for {}$everything ({})",
                        if instance { "an instance " } else { "" },
                        if patient {
                            "start, end, _since, _type, _count"
                        } else {
                            "_since, _type, _count"
                        }
                    ),
                    other.to_string(),
                ))
            }
        }
    }
    if let (Some(s), Some(e)) = (&r.start, &r.end) {
        let (s, e) = (
            kiln_search::value::parse_date_range(s),
            kiln_search::value::parse_date_range(e),
        );
        if let (Some(s), Some(e)) = (s, e) {
            if s.low > e.high {
                return Err(FhirError::invalid_at("`start` is after `end`", "start"));
            }
        }
    }
    Ok(r)
}

impl Operation for Everything {
    fn definition(&self) -> &Definition {
        &self.def
    }

    fn invoke<'a>(
        &'a self,
        state: &'a AppState,
        target: Target,
        params: Value,
        ctx: &'a RequestContext,
        access: &'a Access,
    ) -> BoxFuture<'a, FhirResult<FhirResponse>> {
        Box::pin(async move {
            let (cty, id) = match &target {
                Target::Instance(t, i) => (t.clone(), Some(i.clone())),
                Target::Type(t) if t == "Patient" => (t.clone(), None),
                _ => return Err(FhirError::not_found(
                    "$everything is defined on Patient (type and instance) and Encounter instances",
                )),
            };
            let patient = cty == "Patient";
            let req = parse_request(&ctx.query, &params, id.is_some(), patient)?;
            // what a search of the compartment would need
            access.check_any(Interaction::Search)?;
            if let Some(id) = &id {
                match state.store.read(&cty, id).await? {
                    Some(r) if !r.deleted => {}
                    _ => return Err(FhirError::not_found(format!("{cty}/{id} does not exist"))),
                }
            }
            // a patient-context grant: the type level is that patient's $everything
            let id = match id {
                Some(i) => i,
                None => access
                    .compartment_patient(Interaction::Search, "Patient")
                    .unwrap_or_else(|| kiln_search::ANY_COMPARTMENT.to_string()),
            };
            let parsed = {
                let reg = state.search.registry();
                build_query(&reg, &cty, &id, &req, access)?
            };
            let path = match &target {
                Target::Instance(t, i) => format!("{t}/{i}/$everything"),
                _ => format!("{cty}/$everything"),
            };
            state
                .search
                .execute(state, parsed, &path, ctx, access)
                .await
        })
    }
}

/// The compartment search `$everything` runs.
fn build_query(
    reg: &Registry,
    cty: &str,
    id: &str,
    req: &Request,
    access: &Access,
) -> FhirResult<kiln_search::SearchQuery> {
    let bad = |issues| FhirError::with_issues(StatusCode::BAD_REQUEST, issues);
    let members: Vec<String> = reg
        .compartment_types(cty)
        .into_iter()
        .map(str::to_string)
        .collect();
    let outside: Vec<String> = kiln_fhir::model::r4()
        .resource_types()
        .into_iter()
        .filter(|t| !members.iter().any(|m| m == t))
        .map(str::to_string)
        .collect();
    let mut types: Vec<String> = match &req.types {
        Some(ts) => ts.clone(),
        None => members.iter().chain(outside.iter()).cloned().collect(),
    };
    // scopes per type: the types the grant may not search are not asked for (every entry is
    // checked again before it leaves, as in a search)
    if let Some(g) = access.grant() {
        types.retain(|t| g.allows(Interaction::Search, t));
        if types.is_empty() {
            return Err(FhirError::from(kiln_smart_auth::AuthError::Forbidden(
                "no granted scope permits searching the types $everything returns".into(),
            )));
        }
    }
    let mut search_params = vec![("_type".to_string(), types.join(","))];
    if let Some(since) = &req.since {
        search_params.push(("_lastUpdated".into(), format!("ge{since}")));
    }
    if let Some(c) = &req.count {
        search_params.push(("_count".into(), c.clone()));
    }
    let query = kiln_search::parse(reg, None, &search_params, true).map_err(bad)?;
    let referenced: Vec<String> = types
        .iter()
        .filter(|t| outside.contains(t))
        .cloned()
        .collect();
    let mut query = query
        .with_compartment(reg, cty, id)
        .map_err(bad)?
        .with_referenced(referenced);
    // care dates: every member type with one (also those not returned: what is referenced only
    // from records outside the window is not included)
    for t in &members {
        let Some(code) = care_date_param(reg, t) else {
            continue;
        };
        let missing = format!("{code}:missing");
        if let Some(start) = &req.start {
            let v = format!("ge{start}");
            query
                .add_for_type(reg, t, &[(code, &v), (&missing, "true")])
                .map_err(bad)?;
        }
        if let Some(end) = &req.end {
            let v = format!("le{end}");
            query
                .add_for_type(reg, t, &[(code, &v), (&missing, "true")])
                .map_err(bad)?;
        }
    }
    // the total would count the included resources too (Bundle.total counts matches only)
    query.total = Some("none".into());
    let mut link = Vec::new();
    for (k, v) in [
        ("start", &req.start),
        ("end", &req.end),
        ("_since", &req.since),
        ("_count", &req.count),
    ] {
        if let Some(v) = v {
            link.push((k.to_string(), v.clone()));
        }
    }
    if let Some(ts) = &req.types {
        link.push(("_type".into(), ts.join(",")));
    }
    query.set_self_link_params(link);
    Ok(query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn care_dates_resolve_to_date_parameters() {
        let reg = Registry::r4();
        for (t, code) in CARE_DATE {
            assert_eq!(care_date_param(&reg, t), Some(*code), "{t}.{code}");
        }
        assert_eq!(care_date_param(&reg, "Observation"), Some("date"));
        assert_eq!(care_date_param(&reg, "Encounter"), Some("date"));
        assert_eq!(care_date_param(&reg, "Patient"), None);
        assert_eq!(care_date_param(&reg, "Coverage"), None);
    }

    #[test]
    fn parameters_from_query_and_body() {
        let query = q(&[
            ("start", "2020-01-01"),
            ("_type", "Observation,Condition"),
            ("_type", "Patient"),
            ("_count", "7"),
            ("_cursor", "abc"),
        ]);
        let r = parse_request(&query, &parameters_from_query(&query), true, true).unwrap();
        assert_eq!(r.start.as_deref(), Some("2020-01-01"));
        assert_eq!(
            r.types,
            Some(vec![
                "Observation".to_string(),
                "Condition".into(),
                "Patient".into()
            ])
        );
        assert_eq!(r.count.as_deref(), Some("7"));
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "end", "valueDate": "2021-06"},
            {"name": "_since", "valueInstant": "2020-01-01T00:00:00Z"},
            {"name": "_count", "valueInteger": 3}
        ]});
        let r = parse_request(&[], &body, true, true).unwrap();
        assert_eq!(r.end.as_deref(), Some("2021-06"));
        assert_eq!(r.since.as_deref(), Some("2020-01-01T00:00:00Z"));
        assert_eq!(r.count.as_deref(), Some("3"));
    }

    /// (query, Patient?, the parameter the 400 names)
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a str);

    #[test]
    fn bad_parameters_are_400_naming_them() {
        let cases: &[Case] = &[
            (&[("start", "yesterday")], true, "start"),
            (&[("_since", "2020-01-01")], true, "_since"),
            (&[("_type", "Observation,Nope")], true, "_type"),
            (&[("_count", "-1")], true, "_count"),
            (&[("start", "2020"), ("start", "2021")], true, "start"),
            (&[("start", "2022"), ("end", "2021")], true, "start"),
            (&[("foo", "1")], true, "foo"),
            // Encounter/$everything has no care-date window
            (&[("start", "2020")], false, "start"),
        ];
        for (pairs, patient, at) in cases {
            let query = q(pairs);
            let e = parse_request(&query, &parameters_from_query(&query), true, *patient)
                .expect_err(&format!("{pairs:?} must be refused"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{pairs:?}");
            assert_eq!(
                e.issues[0].expression.first().map(String::as_str),
                Some(*at),
                "{pairs:?}: {:?}",
                e.issues[0]
            );
        }
        let body = json!({"resourceType": "Patient"});
        assert!(parse_request(&[], &body, true, true).is_err());
    }

    #[test]
    fn query_keeps_the_compartment_and_adds_referenced_types() {
        let reg = Registry::r4();
        let req = Request {
            start: Some("2020-01-01".into()),
            types: Some(vec!["Observation".into(), "Practitioner".into()]),
            ..Default::default()
        };
        let query = build_query(&reg, "Patient", "p1", &req, &Access::unrestricted()).unwrap();
        let comp = query.compartment.as_ref().unwrap();
        assert_eq!(comp.id, "p1");
        assert_eq!(comp.referenced, vec!["Practitioner".to_string()]);
        assert_eq!(query.types, vec!["Observation", "Practitioner"]);
        // one care-date criterion per member type with a date, Observation's among them
        assert!(query.criteria.iter().any(|c| matches!(
            c,
            kiln_search::Criterion::ForTypes { types, .. } if types == &["Observation"]
        )));
        assert_eq!(
            query.self_link_params(),
            &[
                ("start".to_string(), "2020-01-01".to_string()),
                ("_type".to_string(), "Observation,Practitioner".to_string())
            ]
        );
    }
}
