//! Property test: search results agree with a brute-force FHIRPath filter.
//!
//! Random Patients, Observations and Encounters (a seeded `fastrand` generator; the seed is
//! printed, `KILN_SEARCH_PROPERTY_SEED=<n>` replays a run) are loaded into a real server, then
//! random single- and multi-parameter queries (string with `:exact`/`:contains`, token with
//! `:not`, date and quantity with every prefix but `ap`, reference, `:missing`, OR and AND)
//! are run over HTTP. Each answer is compared with a brute-force evaluation over the same
//! resources: every parameter's official FHIRPath expression (from the vendored R4
//! `search-parameters.json`) evaluated with `kiln-fhirpath`, and the matching rules of
//! search.html implemented here, independently of kiln-search (exact decimal arithmetic on
//! scaled integers, date ranges from a civil-calendar computation, a small accent-folding
//! table for the generated names).
//!
//! About a third of the queries also carry `_sort` with one to three keys (string, token, date,
//! quantity parameters and `_id`, ascending or descending), some of them read in small pages
//! through the keyset `next` links; the order of the answer is checked against the brute-force
//! order under the sort semantics Kiln implements (see `docs/ARCHITECTURE.md`, kiln-search):
//! a key's value is the lowest of the resource's values for an ascending key and the highest for
//! a descending one (strings compared case- and accent-folded, tokens by code, dates by the
//! start of their range ascending and by the end descending, quantities by value); resources
//! without a value come last in either direction; ties keep any order.

use std::collections::{BTreeSet, HashMap};

use kiln_conformance_tests::{backend_tests, entries, link, send, TestServer};
use serde_json::{json, Value};

const DEFAULT_SEED: u64 = 20_261_122;
const QUERIES: usize = 1000;
const UCUM: &str = "http://unitsofmeasure.org";
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const MRN: &str = "http://a.org/mrn";
const SSN: &str = "http://b.org/ssn";

backend_tests!(search_agrees_with_fhirpath);

// ---------------------------------------------------------------- data generation

const FAMILIES: &[&str] = &[
    "Smith", "Smithson", "smith", "Müller", "Muller", "Núñez", "Nunez", "Lee", "Leeds", "van Dijk",
    "Zoë-Ann",
];
const GIVENS: &[&str] = &["Anna", "Ann", "Bob", "Zoë", "Zoe", "José", "Li", "Marie"];
const GENDERS: &[&str] = &["male", "female", "other", "unknown"];
const ID_VALUES: &[&str] = &["1", "2", "3", "A-1", "a-1"];
const OBS_STATUS: &[&str] = &["final", "preliminary", "amended", "cancelled"];
const CODES: &[(Option<&str>, &str)] = &[
    (Some(LOINC), "1-1"),
    (Some(LOINC), "2-2"),
    (Some(SNOMED), "1-1"),
    (Some(SNOMED), "77"),
    (None, "3-3"),
];
const UNITS: &[&str] = &["mmol/L", "kg", "/min"];
const ENC_STATUS: &[&str] = &["planned", "in-progress", "finished"];
const ENC_CLASS: &[&str] = &["AMB", "IMP", "EMER"];
const ZONES: &[&str] = &["Z", "+02:00", "-05:00", "+00:00"];

fn pick<'a, T>(rng: &mut fastrand::Rng, v: &'a [T]) -> &'a T {
    &v[rng.usize(..v.len())]
}

/// A date or dateTime of random precision (year, month, day, seconds with a zone).
fn random_date(rng: &mut fastrand::Rng, allow_time: bool) -> String {
    let y = rng.i32(1950..=2025);
    let m = rng.u32(1..=12);
    let d = rng.u32(1..=28);
    match rng.u8(0..if allow_time { 4 } else { 3 }) {
        0 => format!("{y:04}"),
        1 => format!("{y:04}-{m:02}"),
        2 => format!("{y:04}-{m:02}-{d:02}"),
        _ => format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{}",
            rng.u32(0..24),
            rng.u32(0..60),
            rng.u32(0..60),
            pick(rng, ZONES)
        ),
    }
}

/// A decimal with 0–3 fraction digits, as written.
fn random_decimal(rng: &mut fastrand::Rng, max_int: i64) -> String {
    let int = rng.i64(0..max_int);
    match rng.u8(0..4) {
        0 => format!("{int}"),
        1 => format!("{int}.{}", rng.u8(0..10)),
        2 => format!("{int}.{:02}", rng.u8(0..100)),
        _ => format!("{int}.{:03}", rng.u16(0..1000)),
    }
}

fn generate(rng: &mut fastrand::Rng) -> Vec<Value> {
    let mut out = Vec::new();
    let n_pat = 50;
    for i in 0..n_pat {
        let mut p = json!({"resourceType": "Patient", "id": format!("p{i}")});
        if rng.u8(0..10) > 0 {
            let mut names = Vec::new();
            for _ in 0..rng.usize(1..=2) {
                let mut n = json!({"family": pick(rng, FAMILIES)});
                let given: Vec<&str> = (0..rng.usize(0..=2)).map(|_| *pick(rng, GIVENS)).collect();
                if !given.is_empty() {
                    n["given"] = json!(given);
                }
                names.push(n);
            }
            p["name"] = json!(names);
        }
        if rng.u8(0..5) > 0 {
            p["gender"] = json!(pick(rng, GENDERS));
        }
        if rng.u8(0..6) > 0 {
            p["birthDate"] = json!(random_date(rng, false));
        }
        match rng.u8(0..3) {
            0 => p["active"] = json!(true),
            1 => p["active"] = json!(false),
            _ => {}
        }
        let ids: Vec<Value> = (0..rng.usize(0..=2))
            .map(|_| match rng.u8(0..3) {
                0 => json!({"system": MRN, "value": pick(rng, ID_VALUES)}),
                1 => json!({"system": SSN, "value": pick(rng, ID_VALUES)}),
                _ => json!({"value": pick(rng, ID_VALUES)}),
            })
            .collect();
        if !ids.is_empty() {
            p["identifier"] = json!(ids);
        }
        out.push(p);
    }
    for i in 0..120 {
        let codings: Vec<Value> = (0..rng.usize(1..=2))
            .map(|_| {
                let (s, c) = pick(rng, CODES);
                match s {
                    Some(s) => json!({"system": s, "code": c}),
                    None => json!({"code": c}),
                }
            })
            .collect();
        let mut o = json!({
            "resourceType": "Observation", "id": format!("o{i}"),
            "status": pick(rng, OBS_STATUS),
            "code": {"coding": codings}
        });
        if rng.u8(0..8) > 0 {
            o["subject"] = json!({"reference": format!("Patient/p{}", rng.usize(0..n_pat))});
        }
        match rng.u8(0..5) {
            0 => {}
            1 => {
                let mut period = json!({"start": random_date(rng, true)});
                if rng.bool() {
                    // an end after the start: a later year
                    let start = period["start"].as_str().unwrap_or("2000").to_string();
                    let y: i32 = start[..4].parse().unwrap_or(2000);
                    period["end"] = json!(format!("{}", (y + rng.i32(1..5)).min(2030)));
                }
                o["effectivePeriod"] = period;
            }
            _ => o["effectiveDateTime"] = json!(random_date(rng, true)),
        }
        if rng.u8(0..6) > 0 {
            let v: f64 = random_decimal(rng, 100).parse().unwrap_or(0.0);
            o["valueQuantity"] =
                json!({"value": v, "system": UCUM, "code": pick(rng, UNITS), "unit": "u"});
        }
        out.push(o);
    }
    for i in 0..40 {
        let mut e = json!({
            "resourceType": "Encounter", "id": format!("e{i}"),
            "status": pick(rng, ENC_STATUS),
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": pick(rng, ENC_CLASS)}
        });
        if rng.u8(0..6) > 0 {
            e["subject"] = json!({"reference": format!("Patient/p{}", rng.usize(0..n_pat))});
        }
        if rng.u8(0..5) > 0 {
            let mut period = json!({"start": random_date(rng, true)});
            if rng.bool() {
                let start = period["start"].as_str().unwrap_or("2000").to_string();
                let y: i32 = start[..4].parse().unwrap_or(2000);
                period["end"] = json!(format!("{}-12-31", (y + rng.i32(0..3)).min(2030)));
            }
            e["period"] = period;
        }
        out.push(e);
    }
    out
}

// ---------------------------------------------------------------- queries

/// How a clause reaches the resource it tests.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    /// a parameter of the searched type
    Direct,
    /// `Observation?{reference}.{clause}`: a parameter of the referenced Patient
    Chain(&'static str),
    /// `Patient?_has:Observation:patient:{clause}`: a parameter of an Observation pointing here
    Has,
}

/// One parameter of a query: `name[:modifier]=alt1,alt2`.
#[derive(Debug, Clone)]
struct Clause {
    code: &'static str,
    modifier: Option<&'static str>,
    alternatives: Vec<String>,
    via: Via,
}

impl Clause {
    fn name(&self) -> String {
        let own = match self.modifier {
            Some(m) => format!("{}:{m}", self.code),
            None => self.code.to_string(),
        };
        match self.via {
            Via::Direct => own,
            Via::Chain(reference) => format!("{reference}.{own}"),
            Via::Has => format!("_has:Observation:patient:{own}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    String,
    Token,
    Reference,
    Date,
    Quantity,
}

fn kind_of(code: &str) -> Kind {
    match code {
        "family" | "given" | "name" => Kind::String,
        "gender" | "identifier" | "active" | "code" | "status" | "class" => Kind::Token,
        "subject" | "patient" => Kind::Reference,
        "birthdate" | "date" => Kind::Date,
        "value-quantity" => Kind::Quantity,
        other => panic!("no kind for {other}"),
    }
}

fn vary_case(rng: &mut fastrand::Rng, s: &str) -> String {
    match rng.u8(0..3) {
        0 => s.to_lowercase(),
        1 => s.to_uppercase(),
        _ => s.to_string(),
    }
}

fn string_clause(rng: &mut fastrand::Rng, code: &'static str) -> Clause {
    let modifier = match rng.u8(0..6) {
        0 => Some("exact"),
        1 => Some("contains"),
        2 => Some("missing"),
        _ => None,
    };
    if modifier == Some("missing") {
        return Clause {
            code,
            modifier,
            alternatives: vec![rng.bool().to_string()],
            via: Via::Direct,
        };
    }
    let n = if rng.u8(0..3) == 0 { 2 } else { 1 };
    let alternatives = (0..n)
        .map(|_| {
            let src = if code == "given" || (code == "name" && rng.bool()) {
                *pick(rng, GIVENS)
            } else {
                *pick(rng, FAMILIES)
            };
            let chars: Vec<char> = src.chars().collect();
            match modifier {
                Some("exact") => {
                    if rng.u8(0..3) == 0 {
                        vary_case(rng, src)
                    } else {
                        src.to_string()
                    }
                }
                // values are trimmed: surrounding whitespace is not significant in string
                // search (a lone space would be an empty value)
                Some("contains") => {
                    let a = rng.usize(0..chars.len());
                    let b = rng.usize(a + 1..=chars.len());
                    let sub: String = chars[a..b].iter().collect();
                    let sub = if sub.trim().is_empty() {
                        src.to_string()
                    } else {
                        sub.trim().to_string()
                    };
                    vary_case(rng, &sub)
                }
                _ => {
                    let b = rng.usize(1..=chars.len());
                    let sub: String = chars[..b].iter().collect();
                    vary_case(rng, sub.trim())
                }
            }
        })
        .collect();
    Clause {
        code,
        modifier,
        alternatives,
        via: Via::Direct,
    }
}

fn token_value(rng: &mut fastrand::Rng, code: &str) -> String {
    match code {
        "gender" => pick(rng, GENDERS).to_string(),
        "active" => rng.bool().to_string(),
        "status" => pick(rng, OBS_STATUS).to_string(),
        "class" => {
            let c = pick(rng, ENC_CLASS);
            if rng.bool() {
                format!("http://terminology.hl7.org/CodeSystem/v3-ActCode|{c}")
            } else {
                c.to_string()
            }
        }
        "identifier" => {
            let v = pick(rng, ID_VALUES);
            let s = if rng.bool() { MRN } else { SSN };
            match rng.u8(0..4) {
                0 => format!("{s}|{v}"),
                1 => format!("|{v}"),
                2 => format!("{s}|"),
                _ => v.to_string(),
            }
        }
        _ => {
            // Observation.code
            let (s, c) = pick(rng, CODES);
            match (rng.u8(0..4), s) {
                (0, Some(s)) => format!("{s}|{c}"),
                (1, _) => format!("|{c}"),
                (2, Some(s)) => format!("{s}|"),
                _ => c.to_string(),
            }
        }
    }
}

fn token_clause(rng: &mut fastrand::Rng, code: &'static str) -> Clause {
    let modifier = match rng.u8(0..6) {
        0 => Some("not"),
        1 => Some("missing"),
        _ => None,
    };
    if modifier == Some("missing") {
        return Clause {
            code,
            modifier,
            alternatives: vec![rng.bool().to_string()],
            via: Via::Direct,
        };
    }
    let n = if rng.u8(0..3) == 0 { 2 } else { 1 };
    Clause {
        code,
        modifier,
        alternatives: (0..n).map(|_| token_value(rng, code)).collect(),
        via: Via::Direct,
    }
}

fn reference_clause(rng: &mut fastrand::Rng, code: &'static str) -> Clause {
    if rng.u8(0..6) == 0 {
        return Clause {
            code,
            modifier: Some("missing"),
            alternatives: vec![rng.bool().to_string()],
            via: Via::Direct,
        };
    }
    let n = if rng.u8(0..3) == 0 { 2 } else { 1 };
    Clause {
        code,
        modifier: None,
        alternatives: (0..n)
            .map(|_| {
                let id = format!("p{}", rng.usize(0..50));
                if rng.bool() {
                    format!("Patient/{id}")
                } else {
                    id
                }
            })
            .collect(),
        via: Via::Direct,
    }
}

const CHAIN_REFERENCES: &[&str] = &["subject:Patient", "patient", "subject"];
const PREFIXES: &[&str] = &["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"];

fn date_clause(rng: &mut fastrand::Rng, code: &'static str) -> Clause {
    if rng.u8(0..8) == 0 {
        return Clause {
            code,
            modifier: Some("missing"),
            alternatives: vec![rng.bool().to_string()],
            via: Via::Direct,
        };
    }
    let n = if rng.u8(0..4) == 0 { 2 } else { 1 };
    Clause {
        code,
        modifier: None,
        alternatives: (0..n)
            .map(|_| format!("{}{}", pick(rng, PREFIXES), random_date(rng, true)))
            .collect(),
        via: Via::Direct,
    }
}

fn quantity_clause(rng: &mut fastrand::Rng, code: &'static str) -> Clause {
    if rng.u8(0..8) == 0 {
        return Clause {
            code,
            modifier: Some("missing"),
            alternatives: vec![rng.bool().to_string()],
            via: Via::Direct,
        };
    }
    let n = if rng.u8(0..4) == 0 { 2 } else { 1 };
    Clause {
        code,
        modifier: None,
        alternatives: (0..n)
            .map(|_| {
                let num = random_decimal(rng, 100);
                let unit = pick(rng, UNITS);
                let tail = match rng.u8(0..3) {
                    0 => format!("|{UCUM}|{unit}"),
                    1 => format!("||{unit}"),
                    _ => String::new(),
                };
                format!("{}{num}{tail}", pick(rng, PREFIXES))
            })
            .collect(),
        via: Via::Direct,
    }
}

fn random_query(rng: &mut fastrand::Rng) -> (&'static str, Vec<Clause>) {
    let (ty, codes): (&str, &[&'static str]) = match rng.u8(0..3) {
        0 => (
            "Patient",
            &[
                "family",
                "given",
                "name",
                "gender",
                "identifier",
                "active",
                "birthdate",
            ],
        ),
        1 => (
            "Observation",
            &[
                "code",
                "status",
                "subject",
                "patient",
                "date",
                "value-quantity",
            ],
        ),
        _ => ("Encounter", &["status", "class", "subject", "date"]),
    };
    let n = match rng.u8(0..10) {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    let clause = |rng: &mut fastrand::Rng, code: &'static str| match kind_of(code) {
        Kind::String => string_clause(rng, code),
        Kind::Token => token_clause(rng, code),
        Kind::Reference => reference_clause(rng, code),
        Kind::Date => date_clause(rng, code),
        Kind::Quantity => quantity_clause(rng, code),
    };
    let clauses = (0..n)
        .map(|_| match (ty, rng.u8(0..4)) {
            // a chain from Observation to its Patient, or a reverse chain from Patient
            ("Observation", 0) => {
                let code = *pick(
                    rng,
                    &["family", "gender", "birthdate", "identifier", "active"],
                );
                let mut c = clause(rng, code);
                c.via = Via::Chain(CHAIN_REFERENCES[rng.usize(..CHAIN_REFERENCES.len())]);
                c
            }
            ("Patient", 0) => {
                let code = *pick(rng, &["code", "status", "date", "value-quantity"]);
                let mut c = clause(rng, code);
                c.via = Via::Has;
                c
            }
            _ => {
                let code = *pick(rng, codes);
                clause(rng, code)
            }
        })
        .collect();
    (ty, clauses)
}

/// One `_sort` key: a parameter code (or `_id`) and its direction.
#[derive(Debug, Clone)]
struct SortKey {
    code: &'static str,
    descending: bool,
}

fn random_sort(rng: &mut fastrand::Rng, ty: &str) -> Vec<SortKey> {
    let codes: &[&'static str] = match ty {
        "Patient" => &[
            "family",
            "given",
            "name",
            "gender",
            "identifier",
            "active",
            "birthdate",
            "_id",
        ],
        "Observation" => &["code", "status", "date", "value-quantity", "_id"],
        _ => &["status", "class", "date", "_id"],
    };
    let n = match rng.u8(0..10) {
        0..=5 => 1,
        6..=8 => 2,
        _ => 3,
    };
    (0..n)
        .map(|_| SortKey {
            code: codes[rng.usize(..codes.len())],
            descending: rng.bool(),
        })
        .collect()
}

/// A resource's value for one sort key (`None`: it has none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Text(String),
    Int(i64),
}

fn sort_value(
    resource: &Value,
    exprs: &HashMap<(String, String), String>,
    ty: &str,
    key: &SortKey,
) -> Option<SortValue> {
    if key.code == "_id" {
        return resource["id"]
            .as_str()
            .map(|s| SortValue::Text(s.to_string()));
    }
    let items = kiln_fhirpath::evaluate_str(expression(exprs, ty, key.code), resource)
        .unwrap_or_else(|e| panic!("FHIRPath for {} fails: {e}", key.code));
    let values: Vec<Value> = items.iter().map(|i| i.to_json()).collect();
    let candidates: Vec<SortValue> = match kind_of(key.code) {
        Kind::String => values
            .iter()
            .flat_map(strings_of)
            .map(|s| SortValue::Text(fold(&s)))
            .collect(),
        Kind::Token => values
            .iter()
            .flat_map(tokens_of)
            .map(|(_, c)| SortValue::Text(c))
            .collect(),
        Kind::Date => values
            .iter()
            .flat_map(date_ranges_of)
            .map(|(lo, hi)| SortValue::Int(if key.descending { hi } else { lo }))
            .collect(),
        Kind::Quantity => values
            .iter()
            .filter_map(|v| v.get("value").and_then(|n| scaled(&n.to_string())))
            .map(|(n, _)| SortValue::Int(n))
            .collect(),
        Kind::Reference => panic!("no reference sort keys are generated"),
    };
    if key.descending {
        candidates.into_iter().max()
    } else {
        candidates.into_iter().min()
    }
}

/// Compares two resources' sort values key by key: missing values last either way.
fn sort_order(
    a: &[Option<SortValue>],
    b: &[Option<SortValue>],
    keys: &[SortKey],
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for ((x, y), k) in a.iter().zip(b).zip(keys) {
        let o = match (x, y) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) if k.descending => y.cmp(x),
            (Some(x), Some(y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// The first place where the server's order breaks the sort semantics, if any.
fn order_violation(
    got: &[String],
    resources: &[Value],
    exprs: &HashMap<(String, String), String>,
    ty: &str,
    keys: &[SortKey],
) -> Option<String> {
    let by_id: HashMap<&str, &Value> = resources
        .iter()
        .filter(|r| r["resourceType"] == ty)
        .filter_map(|r| r["id"].as_str().map(|id| (id, r)))
        .collect();
    let vals = |id: &str| -> Vec<Option<SortValue>> {
        match by_id.get(id) {
            Some(r) => keys.iter().map(|k| sort_value(r, exprs, ty, k)).collect(),
            None => vec![],
        }
    };
    for w in got.windows(2) {
        let (a, b) = (vals(&w[0]), vals(&w[1]));
        if sort_order(&a, &b, keys) == std::cmp::Ordering::Greater {
            return Some(format!("{} ({a:?}) before {} ({b:?})", w[0], w[1]));
        }
    }
    None
}

// ---------------------------------------------------------------- brute force

/// The official FHIRPath expression of `code` on `ty`, from the vendored R4 definitions.
fn expressions() -> HashMap<(String, String), String> {
    let mut out = HashMap::new();
    for sp in kiln_fhir::model::r4().search_parameters() {
        let Some(e) = &sp.expression else { continue };
        for b in &sp.base {
            out.insert((b.clone(), sp.code.clone()), e.clone());
        }
    }
    out
}

/// Case folding plus the accents the generator uses.
fn fold(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| match c {
            'ü' | 'ú' => 'u',
            'ñ' => 'n',
            'ë' | 'é' => 'e',
            c => c,
        })
        .collect()
}

fn strings_of(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Object(o) => {
            let mut out = Vec::new();
            for k in ["family", "text"] {
                if let Some(Value::String(s)) = o.get(k) {
                    out.push(s.clone());
                }
            }
            for k in ["given", "prefix", "suffix"] {
                for s in o.get(k).and_then(Value::as_array).into_iter().flatten() {
                    if let Some(s) = s.as_str() {
                        out.push(s.to_string());
                    }
                }
            }
            out
        }
        _ => vec![],
    }
}

/// (system, code) pairs of a code / boolean / Coding / CodeableConcept / Identifier.
fn tokens_of(v: &Value) -> Vec<(Option<String>, String)> {
    let sys = |o: &serde_json::Map<String, Value>| {
        o.get("system").and_then(Value::as_str).map(str::to_string)
    };
    match v {
        Value::String(s) => vec![(None, s.clone())],
        Value::Bool(b) => vec![(None, b.to_string())],
        Value::Object(o) => {
            if let Some(cs) = o.get("coding").and_then(Value::as_array) {
                cs.iter().flat_map(tokens_of).collect()
            } else if let Some(c) = o.get("code").and_then(Value::as_str) {
                vec![(sys(o), c.to_string())]
            } else if let Some(c) = o.get("value").and_then(Value::as_str) {
                vec![(sys(o), c.to_string())]
            } else {
                vec![]
            }
        }
        _ => vec![],
    }
}

fn token_matches(pairs: &[(Option<String>, String)], q: &str) -> bool {
    match q.split_once('|') {
        None => pairs.iter().any(|(_, c)| c == q),
        Some(("", code)) => pairs.iter().any(|(s, c)| s.is_none() && c == code),
        Some((system, "")) => pairs.iter().any(|(s, _)| s.as_deref() == Some(system)),
        Some((system, code)) => pairs
            .iter()
            .any(|(s, c)| s.as_deref() == Some(system) && c == code),
    }
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const US_PER_DAY: i64 = 86_400_000_000;

/// The instant range `[low, high]` (µs) a date/dateTime of any precision covers.
fn date_range(s: &str) -> Option<(i64, i64)> {
    let num = |a: usize, b: usize| -> Option<i64> { s.get(a..b)?.parse().ok() };
    let y = num(0, 4)?;
    match s.len() {
        4 => Some((
            days_from_civil(y, 1, 1) * US_PER_DAY,
            days_from_civil(y + 1, 1, 1) * US_PER_DAY - 1,
        )),
        7 => {
            let m = num(5, 7)?;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Some((
                days_from_civil(y, m, 1) * US_PER_DAY,
                days_from_civil(ny, nm, 1) * US_PER_DAY - 1,
            ))
        }
        10 => {
            let lo = days_from_civil(y, num(5, 7)?, num(8, 10)?) * US_PER_DAY;
            Some((lo, lo + US_PER_DAY - 1))
        }
        _ => {
            // YYYY-MM-DDThh:mm:ss(Z|±hh:mm), as generated
            let day = days_from_civil(y, num(5, 7)?, num(8, 10)?);
            let secs = num(11, 13)? * 3600 + num(14, 16)? * 60 + num(17, 19)?;
            let zone = &s[19..];
            let offset = if zone == "Z" {
                0
            } else {
                let sign = if zone.starts_with('-') { -1 } else { 1 };
                sign * (zone[1..3].parse::<i64>().ok()? * 3600
                    + zone[4..6].parse::<i64>().ok()? * 60)
            };
            let lo = (day * 86_400 + secs - offset) * 1_000_000;
            Some((lo, lo + 999_999))
        }
    }
}

fn date_ranges_of(v: &Value) -> Vec<(i64, i64)> {
    match v {
        Value::String(s) => date_range(s).into_iter().collect(),
        Value::Object(o) => {
            let lo = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(date_range)
                .map(|r| r.0)
                .unwrap_or(i64::MIN);
            let hi = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(date_range)
                .map(|r| r.1)
                .unwrap_or(i64::MAX);
            vec![(lo, hi)]
        }
        _ => vec![],
    }
}

fn split_prefix(q: &str) -> (&str, &str) {
    if q.len() >= 2 && PREFIXES.contains(&&q[..2]) && !q[..2].chars().all(|c| c.is_ascii_digit()) {
        (&q[..2], &q[2..])
    } else {
        ("eq", q)
    }
}

/// search.html's date prefixes over ranges (`ap` is not generated).
fn date_matches(r: (i64, i64), prefix: &str, s: (i64, i64)) -> bool {
    let (lo, hi) = r;
    let (sl, sh) = s;
    let contained = lo >= sl && hi <= sh;
    match prefix {
        "eq" => contained,
        "ne" => !contained,
        "gt" => hi > sh,
        "lt" => lo < sl,
        "ge" => hi > sh || contained,
        "le" => lo < sl || contained,
        "sa" => lo > sh,
        "eb" => hi < sl,
        p => panic!("prefix {p}"),
    }
}

/// A decimal string as an integer count of 10⁻⁶, and its number of fraction digits.
fn scaled(s: &str) -> Option<(i64, u32)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 6 {
        return None;
    }
    let i: i64 = int.parse().ok()?;
    let f: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().ok()? * 10i64.pow(6 - frac.len() as u32)
    };
    Some((i * 1_000_000 + f, frac.len() as u32))
}

/// Quantity match: the number with its implicit precision for eq/ne, plain comparisons
/// otherwise; `system|code` compared exactly (the generated units do not convert).
fn quantity_matches(v: &Value, q: &str) -> bool {
    let Some(value) = v.get("value").and_then(|n| scaled(&n.to_string())) else {
        return false;
    };
    let (prefix, rest) = split_prefix(q);
    let mut parts = rest.split('|');
    let number = parts.next().unwrap_or("");
    let system = parts.next().filter(|s| !s.is_empty());
    let code = parts.next().filter(|s| !s.is_empty());
    if system.is_some_and(|s| v.get("system").and_then(Value::as_str) != Some(s))
        || code.is_some_and(|c| v.get("code").and_then(Value::as_str) != Some(c))
    {
        return false;
    }
    let Some((n, digits)) = scaled(number) else {
        return false;
    };
    let half = 5 * 10i64.pow(5 - digits);
    let v = value.0;
    match prefix {
        "eq" => v >= n - half && v < n + half,
        "ne" => !(v >= n - half && v < n + half),
        "gt" | "sa" => v > n,
        "lt" | "eb" => v < n,
        "ge" => v >= n,
        "le" => v <= n,
        p => panic!("prefix {p}"),
    }
}

fn reference_matches(v: &Value, q: &str, code: &str) -> bool {
    let Some(r) = v.get("reference").and_then(Value::as_str) else {
        return false;
    };
    if q.contains('/') {
        r == q
    } else if code == "patient" {
        r == format!("Patient/{q}")
    } else {
        r.rsplit('/').next() == Some(q)
    }
}

fn clause_matches(resource: &Value, expr: &str, clause: &Clause) -> bool {
    let items = kiln_fhirpath::evaluate_str(expr, resource)
        .unwrap_or_else(|e| panic!("FHIRPath {expr} fails: {e}"));
    let values: Vec<Value> = items.iter().map(|i| i.to_json()).collect();
    let kind = kind_of(clause.code);
    let present = values.iter().any(|v| match kind {
        Kind::String => !strings_of(v).is_empty(),
        Kind::Token => !tokens_of(v).is_empty(),
        Kind::Date => !date_ranges_of(v).is_empty(),
        _ => true,
    });
    if clause.modifier == Some("missing") {
        return (clause.alternatives[0] == "true") != present;
    }
    let any_alt = |f: &dyn Fn(&str) -> bool| clause.alternatives.iter().any(|a| f(a));
    match (kind, clause.modifier) {
        (Kind::String, m) => {
            let strings: Vec<String> = values.iter().flat_map(strings_of).collect();
            any_alt(&|q| {
                strings.iter().any(|s| match m {
                    Some("exact") => s == q,
                    Some("contains") => fold(s).contains(&fold(q)),
                    _ => fold(s).starts_with(&fold(q)),
                })
            })
        }
        (Kind::Token, m) => {
            let pairs: Vec<(Option<String>, String)> = values.iter().flat_map(tokens_of).collect();
            let hit = any_alt(&|q| token_matches(&pairs, q));
            if m == Some("not") {
                !hit
            } else {
                hit
            }
        }
        (Kind::Reference, _) => {
            any_alt(&|q| values.iter().any(|v| reference_matches(v, q, clause.code)))
        }
        (Kind::Date, _) => {
            let ranges: Vec<(i64, i64)> = values.iter().flat_map(date_ranges_of).collect();
            any_alt(&|q| {
                let (prefix, d) = split_prefix(q);
                let s = date_range(d).expect("generated date");
                ranges.iter().any(|r| date_matches(*r, prefix, s))
            })
        }
        (Kind::Quantity, _) => any_alt(&|q| values.iter().any(|v| quantity_matches(v, q))),
    }
}

fn expression<'e>(exprs: &'e HashMap<(String, String), String>, ty: &str, code: &str) -> &'e str {
    exprs
        .get(&(ty.to_string(), code.to_string()))
        .or_else(|| exprs.get(&("Resource".to_string(), code.to_string())))
        .unwrap_or_else(|| panic!("no expression for {ty}.{code}"))
}

/// `Type/id` of the references a reference parameter's expression finds in `resource`.
fn references_of(resource: &Value, expr: &str) -> Vec<String> {
    kiln_fhirpath::evaluate_str(expr, resource)
        .unwrap_or_else(|e| panic!("FHIRPath {expr} fails: {e}"))
        .iter()
        .filter_map(|i| i.to_json()["reference"].as_str().map(str::to_string))
        .collect()
}

fn ref_of(r: &Value) -> String {
    format!(
        "{}/{}",
        r["resourceType"].as_str().unwrap_or(""),
        r["id"].as_str().unwrap_or("")
    )
}

/// The references of the `subject` and `patient` parameters of every resource, evaluated once
/// (`patient`'s official expression is a union over 50 types with `resolve()`).
type RefCache = HashMap<(String, &'static str), Vec<String>>;

fn reference_cache(resources: &[Value], exprs: &HashMap<(String, String), String>) -> RefCache {
    let mut out = HashMap::new();
    for r in resources {
        let ty = r["resourceType"].as_str().unwrap_or("");
        for code in ["subject", "patient"] {
            if exprs.contains_key(&(ty.to_string(), code.to_string())) {
                out.insert(
                    (ref_of(r), code),
                    references_of(r, expression(exprs, ty, code)),
                );
            }
        }
    }
    out
}

fn brute_force(
    resources: &[Value],
    exprs: &HashMap<(String, String), String>,
    refs: &RefCache,
    ty: &str,
    clauses: &[Clause],
) -> BTreeSet<String> {
    let by_ref: HashMap<String, &Value> = resources.iter().map(|r| (ref_of(r), r)).collect();
    let refs_of = |r: &Value, code: &'static str| -> &[String] {
        refs.get(&(ref_of(r), code))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    };
    let matches = |r: &Value, c: &Clause| -> bool {
        match c.via {
            Via::Direct => clause_matches(r, expression(exprs, ty, c.code), c),
            Via::Chain(reference) => {
                let code = if reference == "patient" {
                    "patient"
                } else {
                    "subject"
                };
                refs_of(r, code)
                    .iter()
                    .filter_map(|target| by_ref.get(target))
                    .filter(|t| t["resourceType"] == "Patient")
                    .any(|t| clause_matches(t, expression(exprs, "Patient", c.code), c))
            }
            Via::Has => {
                let me = ref_of(r);
                resources
                    .iter()
                    .filter(|o| o["resourceType"] == "Observation")
                    .filter(|o| refs_of(o, "patient").contains(&me))
                    .any(|o| clause_matches(o, expression(exprs, "Observation", c.code), c))
            }
        }
    };
    resources
        .iter()
        .filter(|r| r["resourceType"] == ty)
        .filter(|r| clauses.iter().all(|c| matches(r, c)))
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------- the test

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The ids of the matches of every page, in order.
async fn server_ids(srv: &TestServer, query: &str) -> Result<Vec<String>, String> {
    let r = srv.get(query).await;
    if r.status != 200 {
        return Err(format!("HTTP {}: {}", r.status, r.text()));
    }
    let mut ids = Vec::new();
    let mut page = r.json();
    for _ in 0..50 {
        for e in entries(&page) {
            if e["search"]["mode"] == "match" {
                if let Some(id) = e["resource"]["id"].as_str() {
                    ids.push(id.to_string());
                }
            }
        }
        match link(&page, "next") {
            Some(next) => {
                let r = send(srv.client.get(&next)).await;
                if r.status != 200 {
                    return Err(format!("next page HTTP {}", r.status));
                }
                page = r.json();
            }
            None => return Ok(ids),
        }
    }
    Err("more than 50 pages".into())
}

async fn search_agrees_with_fhirpath(srv: &TestServer) {
    let seed = std::env::var("KILN_SEARCH_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SEED);
    println!(
        "search property test on {:?}: seed {seed} (KILN_SEARCH_PROPERTY_SEED={seed} replays it)",
        srv.backend
    );
    let queries: usize = std::env::var("KILN_SEARCH_PROPERTY_QUERIES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(QUERIES);
    let mut rng = fastrand::Rng::with_seed(seed);
    let resources = generate(&mut rng);
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": resources.iter().map(|r| {
            let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        }).collect::<Vec<_>>()
    });
    if let Ok(path) = std::env::var("KILN_SEARCH_PROPERTY_DUMP") {
        std::fs::write(&path, bundle.to_string()).expect("write the generated Bundle");
    }
    srv.post_json("", &bundle).await.assert_status(200);
    let exprs = expressions();
    let refs = reference_cache(&resources, &exprs);
    let started = std::time::Instant::now();
    let mut disagreements = Vec::new();
    let mut non_empty = 0;
    let mut sorted_queries = 0;
    for _ in 0..queries {
        let (ty, clauses) = random_query(&mut rng);
        let sort = if rng.u8(0..3) == 0 {
            random_sort(&mut rng, ty)
        } else {
            vec![]
        };
        // sorted answers are also read in small pages (keyset cursors over the sort keys)
        let count = if !sort.is_empty() && rng.bool() {
            7
        } else {
            200
        };
        let mut params: Vec<(String, String)> = clauses
            .iter()
            .map(|c| (c.name(), c.alternatives.join(",")))
            .collect();
        if !sort.is_empty() {
            sorted_queries += 1;
            let keys: Vec<String> = sort
                .iter()
                .map(|k| format!("{}{}", if k.descending { "-" } else { "" }, k.code))
                .collect();
            params.push(("_sort".into(), keys.join(",")));
        }
        let query = format!(
            "{ty}?{}&_count={count}",
            params
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect::<Vec<_>>()
                .join("&")
        );
        let readable = format!(
            "{ty}?{}{}",
            params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&"),
            if count == 200 { "" } else { " (pages of 7)" }
        );
        let want = brute_force(&resources, &exprs, &refs, ty, &clauses);
        if !want.is_empty() {
            non_empty += 1;
        }
        let t = std::time::Instant::now();
        let answer = server_ids(srv, &query).await;
        if t.elapsed().as_millis() > 500 {
            println!("  slow ({} ms): {readable}", t.elapsed().as_millis());
        }
        let answer = answer.and_then(|list| {
            let set: BTreeSet<String> = list.iter().cloned().collect();
            if set.len() != list.len() {
                return Err(format!("an id is listed twice: {list:?}"));
            }
            if let Some(v) = order_violation(&list, &resources, &exprs, ty, &sort) {
                return Err(format!("out of order: {v}"));
            }
            Ok(set)
        });
        match answer {
            Ok(got) if got == want => {}
            Ok(got) => {
                let missing: Vec<&String> = want.difference(&got).collect();
                let extra: Vec<&String> = got.difference(&want).collect();
                disagreements.push(format!(
                    "{readable}: server lacks {missing:?}, server adds {extra:?}"
                ));
            }
            Err(e) => disagreements.push(format!("{readable}: {e}")),
        }
    }
    println!(
        "search property test on {:?}: {queries} queries ({non_empty} with non-empty expected results, {sorted_queries} sorted) over {} resources, {} disagreements, {:.1} s",
        srv.backend,
        resources.len(),
        disagreements.len(),
        started.elapsed().as_secs_f64()
    );
    for d in disagreements.iter().take(30) {
        println!("  {d}");
    }
    assert!(
        disagreements.is_empty(),
        "seed {seed}: {} of {queries} queries disagree with the brute-force FHIRPath filter (listed above)",
        disagreements.len()
    );
}
